//! Runtime shared by the vmfork EL1 test guests.
//!
//! The guests are small `no_std` programs for `aarch64-unknown-none` that boot on plain QEMU
//! `virt` (`-kernel <elf>`, entered at EL1 with the MMU off) and, unchanged, under the vmfork EL2
//! monitor. Everything they learn about the machine comes from the device tree: the PL011, the
//! GICv3 distributor and redistributors, the PSCI conduit, `/chosen/bootargs`, the memory node and
//! the CPUs' MPIDRs.
//!
//! The crate has two halves:
//! - portable modules ([`fdt`], [`bootargs`], [`pattern`], [`psci_abi`], [`vmfork_abi`],
//!   [`cow`], [`gic_abi`], [`hostile_abi`], [`line`]) that compile and are unit-tested on the host;
//! - the bare-metal runtime (boot assembly, exception vectors, PL011 console, GICv3, virtual
//!   timer, PSCI calls, vmfork detection and hypercalls, exit, SMP start-up) that only exists for
//!   `target_os = "none"`.
//!
//! A guest program names its entry point with [`entry!`]; the runtime calls it on the boot CPU
//! with the parsed [`BootInfo`] once the console is up.
#![cfg_attr(not(test), no_std)]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod bootargs;
pub mod cow;
pub mod fdt;
pub mod gic_abi;
pub mod hostile_abi;
pub mod line;
pub mod pattern;
pub mod psci_abi;
pub mod vmfork_abi;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod arch;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub use arch::{
    boot::boot_info, boot::BootInfo, console, exceptions, exit, gic, psci, runtime, smp, sysreg,
    timer,
};

/// Most CPUs the runtime can start (one secondary stack each) and the DTB reader records.
pub const MAX_CPUS: usize = 16;

/// Address the runtime falls back to for the DTB when x0 does not point at one: the start of
/// RAM on QEMU `virt`, where QEMU places the DTB for an ELF `-kernel`.
pub const DEFAULT_DTB_ADDR: u64 = 0x4000_0000;

/// PL011 base used before the DTB has been read (and when the DTB names none): QEMU `virt`'s.
pub const DEFAULT_UART_BASE: u64 = 0x0900_0000;

/// Declares the guest's entry point: `entry!(main)` with `fn main(boot: &'static BootInfo) -> !`.
///
/// The runtime calls it on the boot CPU after zeroing `.bss`, reading the DTB and setting up the
/// console, PSCI conduit and exception vectors. Interrupts are still masked.
#[macro_export]
macro_rules! entry {
    ($path:path) => {
        /// Entry point called by the vmfork guest runtime on the boot CPU.
        #[no_mangle]
        pub extern "Rust" fn __vmfork_guest_main(boot: &'static $crate::BootInfo) -> ! {
            let f: fn(&'static $crate::BootInfo) -> ! = $path;
            f(boot)
        }
    };
}

/// Prints a formatted line on the PL011 console; the whole line is written under the console
/// lock (with IRQs masked on this CPU), so lines from several CPUs never interleave.
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::console::print_line(format_args!($($arg)*))
    };
}

/// Prints a formatted line, then stops with a failing status (`exit::fail`).
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {{
        $crate::console::print_line(format_args!($($arg)*));
        $crate::exit::fail()
    }};
}
