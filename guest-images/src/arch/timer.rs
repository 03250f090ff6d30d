//! The EL1 virtual timer (CNTV_*_EL0), whose interrupt is PPI INTID 27 on QEMU `virt` and under
//! the monitor.

use core::arch::asm;

/// INTID of the EL1 virtual timer's PPI.
pub const VIRTUAL_TIMER_INTID: u32 = 27;

/// `CNTV_CTL_EL0.ENABLE`.
const CTL_ENABLE: u64 = 1 << 0;

/// The system counter frequency (`CNTFRQ_EL0`), in Hz.
pub fn frequency() -> u64 {
    super::sysreg::cntfrq_el0()
}

/// The virtual count (`CNTVCT_EL0`), read after an ISB so it is not taken early.
pub fn now() -> u64 {
    let v: u64;
    // SAFETY: reading the virtual counter has no side effects.
    unsafe {
        asm!("isb", "mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Counter ticks in `ms` milliseconds.
pub fn ticks_from_ms(ms: u64) -> u64 {
    frequency().saturating_mul(ms) / 1000
}

/// Arms the timer to fire `ticks` counter ticks from now (`CNTV_CVAL_EL0`), interrupt unmasked.
pub fn arm_in(ticks: u64) {
    let deadline = now().wrapping_add(ticks);
    // SAFETY: programming this CPU's own virtual timer only affects its PPI 27.
    unsafe {
        asm!(
            "msr cntv_cval_el0, {cval}",
            "msr cntv_ctl_el0, {ctl}",
            "isb",
            cval = in(reg) deadline,
            ctl = in(reg) CTL_ENABLE,
            options(nomem, nostack, preserves_flags),
        );
    }
}

/// Disables the timer (its interrupt line drops).
pub fn disable() {
    // SAFETY: disabling this CPU's own virtual timer only affects its PPI 27.
    unsafe {
        asm!(
            "msr cntv_ctl_el0, xzr",
            "isb",
            options(nomem, nostack, preserves_flags)
        )
    };
}

/// Busy-waits for `ticks` counter ticks.
pub fn delay(ticks: u64) {
    let start = now();
    while now().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}
