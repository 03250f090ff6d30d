//! Portable core of the vmfork monitor.
//!
//! Everything in this crate is plain Rust with no inline assembly and no access to system
//! registers, so it compiles for `aarch64-unknown-none` (linked into the monitor) and for the host
//! (where `cargo test` runs its unit and property tests). The monitor's arch layer
//! (`hypervisor/monitor/src/arch`) is the only code that needs QEMU.
#![cfg_attr(not(test), no_std)]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod addr;
mod bounded;
pub mod cmdline;
pub mod esr;
pub mod focus;
pub mod frame;
pub mod guest_dtb;
pub mod guest_spec;
pub mod idregs;
pub mod loader;
pub mod machine;
pub mod mmio;
pub mod opqueue;
pub mod physmem;
pub mod pl061;
pub mod platform;
pub mod psci;
pub mod ratelimit;
pub mod shared;
pub mod snapshot;
pub mod stage2;
pub mod vgic;
pub mod vuart;
