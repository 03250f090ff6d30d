//! The EL2 physical timer (CNTHP_*_EL2), which drives the monitor's scheduling time slices, and
//! the counter-timer controls EL2 sets for its guests (CNTHCTL_EL2, CNTVOFF_EL2).
//!
//! The timer raises PPI 10 (INTID 26 on QEMU virt; the device tree's `arm,armv8-timer` node
//! says which) while CNTHP_CTL_EL2.ENABLE = 1, IMASK = 0 and CNTPCT_EL0 >= CNTHP_CVAL_EL2. The
//! interrupt is level-sensitive: a handler must re-arm the timer into the future or cancel it
//! before it ends the interrupt.

// The arch layer the scheduler and vCPU code call: parts are not used by the monitor yet.
#![allow(dead_code)]

use core::sync::atomic::{AtomicU32, Ordering};

use aarch64_cpu::registers::{
    Readable, Writeable, CNTFRQ_EL0, CNTHCTL_EL2, CNTHP_CTL_EL2, CNTPCT_EL0, CNTVOFF_EL2,
};

/// The EL2 physical timer's INTID on QEMU virt (PPI 10), used until the device tree says.
pub const DEFAULT_INTID: u32 = 26;

static INTID: AtomicU32 = AtomicU32::new(DEFAULT_INTID);

/// CNTHP_CTL_EL2.ENABLE (bit 0).
const CTL_ENABLE: u64 = 1 << 0;
/// CNTHP_CTL_EL2.IMASK (bit 1): condition met but no interrupt.
const CTL_IMASK: u64 = 1 << 1;
/// CNTHP_CTL_EL2.ISTATUS (bit 2, read-only): the timer condition is met.
const CTL_ISTATUS: u64 = 1 << 2;

/// CNTHCTL_EL2.EL1PCTEN with HCR_EL2.E2H = 0 (bit 0): EL1 and EL0 may read CNTPCT_EL0.
const CNTHCTL_EL1PCTEN: u64 = 1 << 0;
/// CNTHCTL_EL2.EL1PCEN with HCR_EL2.E2H = 0 (bit 1): EL1 and EL0 may use the EL1 physical timer
/// (CNTP_*); 0 traps those accesses to EL2.
const CNTHCTL_EL1PCEN: u64 = 1 << 1;

/// Records the timer's INTID from the device tree (`Timer::hyp_phys`).
pub fn set_intid(intid: u32) {
    INTID.store(intid, Ordering::Relaxed);
}

/// The EL2 physical timer's INTID.
pub fn intid() -> u32 {
    INTID.load(Ordering::Relaxed)
}

/// The system counter frequency in Hz (CNTFRQ_EL0).
pub fn freq() -> u64 {
    CNTFRQ_EL0.get()
}

/// The physical count (CNTPCT_EL0).
pub fn now() -> u64 {
    // The ISB stops the counter read from being performed early, out of program order (ARM ARM:
    // reads of CNTPCT_EL0 can occur speculatively).
    isb();
    CNTPCT_EL0.get()
}

/// Counter ticks in `micros` microseconds (saturating; 0 if the frequency is unknown).
pub fn ticks_from_micros(micros: u64) -> u64 {
    let ticks = u128::from(freq()) * u128::from(micros) / 1_000_000;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// Microseconds in `ticks` counter ticks (saturating; 0 if the frequency is unknown).
pub fn micros_from_ticks(ticks: u64) -> u64 {
    match freq() {
        0 => 0,
        f => u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(f)).unwrap_or(u64::MAX),
    }
}

fn isb() {
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

fn write_cval(deadline: u64) {
    // SAFETY: CNTHP_CVAL_EL2 only sets when the EL2 physical timer fires; it has no effect on
    // memory. The register is accessible at EL2.
    unsafe {
        core::arch::asm!("msr cnthp_cval_el2, {0}", in(reg) deadline, options(nomem, nostack));
    }
}

/// Reads CNTHP_CVAL_EL2, the current deadline.
pub fn deadline() -> u64 {
    let v: u64;
    // SAFETY: reading CNTHP_CVAL_EL2 at EL2 has no side effects.
    unsafe { core::arch::asm!("mrs {0}, cnthp_cval_el2", out(reg) v, options(nomem, nostack)) };
    v
}

/// Arms the calling CPU's EL2 physical timer to fire when CNTPCT_EL0 reaches `deadline` (at once
/// if it already has).
pub fn arm_at(deadline: u64) {
    write_cval(deadline);
    CNTHP_CTL_EL2.set(CTL_ENABLE);
    // Writes to the timer's system registers take effect only after context synchronisation:
    // without the ISB an old deadline could still fire (or the new one be missed) after return.
    isb();
}

/// Arms the calling CPU's EL2 physical timer `ticks` counter ticks from now.
pub fn arm_oneshot(ticks: u64) {
    arm_at(now().saturating_add(ticks));
}

/// Stops the calling CPU's EL2 physical timer (ENABLE = 0): its interrupt drops.
pub fn cancel() {
    CNTHP_CTL_EL2.set(0);
    isb(); // as in `arm_at`: the interrupt must be deasserted before the caller EOIs it.
}

/// Whether the timer is enabled and its condition met (ENABLE and ISTATUS), masked or not.
pub fn is_expired() -> bool {
    let ctl = CNTHP_CTL_EL2.get();
    ctl & CTL_ENABLE != 0 && ctl & CTL_ISTATUS != 0
}

/// Whether the timer is enabled and not masked (it will interrupt when the deadline passes).
pub fn is_armed() -> bool {
    CNTHP_CTL_EL2.get() & (CTL_ENABLE | CTL_IMASK) == CTL_ENABLE
}

/// Per-CPU set-up: stops the EL2 timer (its state is UNKNOWN after reset) and sets the guest
/// counter-timer controls with [`set_guest_timer_access`].
pub fn init_cpu() {
    cancel();
    set_guest_timer_access();
}

/// CNTHCTL_EL2 for guests (E2H = 0 layout): EL1PCTEN = 1 (EL1/EL0 read the physical counter
/// directly), EL1PCEN = 0 (EL1/EL0 accesses to the EL1 physical timer CNTP_* trap to EL2, to be
/// emulated); the event-stream bits are left as they are. The virtual timer (CNTV_*) is never
/// trapped: guests use it with the offset in CNTVOFF_EL2.
pub fn set_guest_timer_access() {
    let v = (CNTHCTL_EL2.get() | CNTHCTL_EL1PCTEN) & !CNTHCTL_EL1PCEN;
    CNTHCTL_EL2.set(v);
    isb(); // the new trap controls must apply before the next guest entry or EL1 access.
}

/// Writes CNTVOFF_EL2: EL1/EL0 see CNTVCT_EL0 = CNTPCT_EL0 - offset.
pub fn write_cntvoff(offset: u64) {
    CNTVOFF_EL2.set(offset);
    isb(); // context synchronisation before EL1 reads the virtual counter with the new offset.
}

/// Reads CNTVOFF_EL2.
pub fn read_cntvoff() -> u64 {
    CNTVOFF_EL2.get()
}
