//! The thin AArch64 layer: boot assembly, exception vectors, the MMU, PSCI and semihosting.
//! Everything that needs real hardware (or QEMU) lives here; the logic is in `vmfork-core`.

pub mod boot;
pub mod cache;
pub mod entry;
pub mod exception;
pub mod frame;
pub mod gic;
pub mod idregs;
pub mod mmu;
pub mod percpu;
pub mod psci;
pub mod semihosting;
pub mod sysregs;
pub mod timer;
pub mod vcpu;

/// The calling CPU's exception level (CurrentEL.EL).
pub fn current_el() -> u64 {
    use aarch64_cpu::registers::{CurrentEL, Readable};
    CurrentEL.get() >> 2 & 3
}

/// This CPU's MPIDR_EL1 affinity bits (Aff3, Aff2, Aff1, Aff0).
pub fn mpidr_affinity() -> u64 {
    use aarch64_cpu::registers::{Readable, MPIDR_EL1};
    MPIDR_EL1.get() & 0xff_00ff_ffff
}

/// The physical counter (CNTPCT_EL0) and its frequency in Hz (CNTFRQ_EL0).
pub fn counter() -> (u64, u64) {
    use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTPCT_EL0};
    // The ISB keeps the counter read from being performed early (ARM ARM: reads of CNTPCT_EL0
    // can occur speculatively and out of order).
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
    (CNTPCT_EL0.get(), CNTFRQ_EL0.get())
}

/// Interrupt bring-up on the boot CPU: the distributor, the EL2 timer's INTID from the device
/// tree, then the boot CPU's own interface ([`init_interrupts_this_cpu`]).
pub fn init_interrupts_boot(
    platform: &vmfork_core::platform::Platform,
) -> Result<(), gic::GicError> {
    gic::init_distributor(platform.gic.as_ref().ok_or(gic::GicError::NoGic)?)?;
    if let Some(t) = &platform.timer {
        timer::set_intid(t.hyp_phys);
    }
    init_interrupts_this_cpu(0)
}

/// Interrupt bring-up on each CPU (index `cpu`), with the MMU on: its redistributor and CPU
/// interface, and its EL2 timer stopped.
pub fn init_interrupts_this_cpu(cpu: usize) -> Result<(), gic::GicError> {
    gic::init_cpu(cpu)?;
    timer::init_cpu();
    Ok(())
}
