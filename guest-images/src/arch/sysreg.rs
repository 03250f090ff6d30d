//! Small wrappers around the system registers and barrier instructions the runtime uses.

use core::arch::asm;

macro_rules! sysreg_read {
    ($(#[$doc:meta])* $fn:ident, $reg:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $fn() -> u64 {
            let v: u64;
            // SAFETY: reading this EL0/EL1-accessible register has no side effects and touches
            // no memory.
            unsafe { asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }
    };
}

sysreg_read!(
    /// `CurrentEL` (the exception level is bits [3:2]).
    current_el_raw, "CurrentEL"
);
sysreg_read!(
    /// `MPIDR_EL1`.
    mpidr_el1, "mpidr_el1"
);
sysreg_read!(
    /// `ESR_EL1`.
    esr_el1, "esr_el1"
);
sysreg_read!(
    /// `FAR_EL1`.
    far_el1, "far_el1"
);
sysreg_read!(
    /// `SCTLR_EL1`.
    sctlr_el1, "sctlr_el1"
);
sysreg_read!(
    /// `DAIF`.
    daif, "daif"
);
sysreg_read!(
    /// `CNTFRQ_EL0`: the system counter frequency in Hz.
    cntfrq_el0, "cntfrq_el0"
);

/// The current exception level (0..=3).
pub fn current_el() -> u64 {
    (current_el_raw() >> 2) & 3
}

/// The affinity fields of `MPIDR_EL1` (Aff3 in bits [39:32], Aff2..Aff0 in [23:0]) as the DTB's
/// `/cpus/cpu@*/reg` writes them.
pub fn mpidr_affinity() -> u64 {
    mpidr_el1() & 0xff_00ff_ffff
}

/// Masks IRQs on this CPU and returns the previous `DAIF` for [`restore_daif`].
#[inline(always)]
pub fn irq_save() -> u64 {
    let old = daif();
    // SAFETY: masking IRQs only changes PSTATE.I; the compiler barrier (no `nomem`) keeps memory
    // accesses of the critical section after it.
    unsafe { asm!("msr daifset, #2", options(nostack, preserves_flags)) };
    old
}

/// Restores a `DAIF` value saved by [`irq_save`].
#[inline(always)]
pub fn restore_daif(old: u64) {
    // SAFETY: writes back a DAIF value read earlier on this CPU; acts as a compiler barrier.
    unsafe { asm!("msr daif, {}", in(reg) old, options(nostack, preserves_flags)) };
}

/// Unmasks IRQs on this CPU.
#[inline(always)]
pub fn irq_enable() {
    // SAFETY: the vectors are installed before any guest code runs, so an IRQ taken from here
    // on is handled; acts as a compiler barrier.
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack, preserves_flags)) };
}

/// Masks IRQs on this CPU.
#[inline(always)]
pub fn irq_disable() {
    // SAFETY: only sets PSTATE.I; acts as a compiler barrier.
    unsafe { asm!("msr daifset, #2", options(nostack, preserves_flags)) };
}

/// Waits for an interrupt (returns early on any pending, even masked, interrupt).
#[inline(always)]
pub fn wfi() {
    // SAFETY: WFI only suspends execution until an interrupt or event.
    unsafe { asm!("wfi", options(nostack, preserves_flags)) };
}

/// Waits for an event.
#[inline(always)]
pub fn wfe() {
    // SAFETY: WFE only suspends execution until an event.
    unsafe { asm!("wfe", options(nostack, preserves_flags)) };
}

/// Signals an event to all CPUs (wakes WFE).
#[inline(always)]
pub fn sev() {
    // SAFETY: SEV only sets the event register of every PE.
    unsafe { asm!("dsb sy", "sev", options(nostack, preserves_flags)) };
}

/// Instruction synchronization barrier.
#[inline(always)]
pub fn isb() {
    // SAFETY: a barrier has no effect besides ordering.
    unsafe { asm!("isb", options(nostack, preserves_flags)) };
}

/// Full-system data synchronization barrier.
#[inline(always)]
pub fn dsb_sy() {
    // SAFETY: a barrier has no effect besides ordering.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}
