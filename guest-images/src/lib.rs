//! Runtime shared by the EL1 test guests.
#![no_std]
