//! The bare-metal half of the runtime: only built for `aarch64-unknown-none`.
//!
//! The MMU stays off, so every data access is to Device-nGnRnE memory: accesses must be aligned
//! (the target has `+strict-align`, and MMIO goes through aligned 32-bit volatile accesses), and
//! memory that the compiler must not cache in registers is accessed with volatile operations.

pub mod boot;
pub mod console;
pub mod exceptions;
pub mod exit;
pub mod gic;
pub mod psci;
pub mod runtime;
pub mod smp;
pub mod sysreg;
pub mod timer;
