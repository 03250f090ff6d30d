//! Per-physical-CPU identity. TPIDR_EL2 holds the CPU's index (0 = the boot CPU), set first thing
//! on every CPU; nothing else reads or writes TPIDR_EL2.

use aarch64_cpu::registers::{Readable, Writeable, TPIDR_EL2};

/// Records `index` as the calling CPU's index.
pub fn set_cpu_index(index: usize) {
    TPIDR_EL2.set(index as u64);
}

/// Index of the calling physical CPU.
pub fn cpu_index() -> usize {
    TPIDR_EL2.get() as usize
}
