//! Exceptions taken at EL2 itself. The vector stubs (`arch/entry.rs`) save x0-x30, ELR_EL2 and
//! SPSR_EL2 into a [`TrapFrame`] on the current stack and call [`handle_exception`]. The monitor
//! expects no such exception at all: anything that arrives is dumped, decoded, and stops the
//! machine with a failure status.

use core::fmt;

use aarch64_cpu::registers::{Readable, ESR_EL2, FAR_EL2, HPFAR_EL2};
use vmfork_core::esr::Esr;

use super::entry::TrapFrame;

/// How a fatal exception's dump is printed: the console registers its lock-free emergency path
/// at boot ([`set_fatal_printer`]), so the arch layer does not depend on the console driver.
static FATAL_PRINT: spin::Once<fn(fmt::Arguments<'_>)> = spin::Once::new();

/// Sets how a fatal exception's dump is printed (once, at boot, by the console).
pub fn set_fatal_printer(print: fn(fmt::Arguments<'_>)) {
    FATAL_PRINT.call_once(|| print);
}

/// Which of the 16 vector entries was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorKind {
    /// Synchronous exception from EL2 with SP_EL0 (never used: the monitor runs on SP_EL2).
    CurrentSp0Sync,
    /// IRQ from EL2 with SP_EL0.
    CurrentSp0Irq,
    /// FIQ from EL2 with SP_EL0.
    CurrentSp0Fiq,
    /// SError from EL2 with SP_EL0.
    CurrentSp0SError,
    /// Synchronous exception from EL2.
    CurrentSync,
    /// IRQ taken while at EL2.
    CurrentIrq,
    /// FIQ taken while at EL2.
    CurrentFiq,
    /// SError taken while at EL2.
    CurrentSError,
    /// Synchronous exception from a lower EL running AArch64.
    LowerSync,
    /// IRQ from a lower EL running AArch64.
    LowerIrq,
    /// FIQ from a lower EL running AArch64.
    LowerFiq,
    /// SError from a lower EL running AArch64.
    LowerSError,
    /// Any exception from a lower EL running AArch32 (guests are AArch64 only).
    LowerAarch32(u64),
}

impl VectorKind {
    fn from_index(i: u64) -> Self {
        match i {
            0 => Self::CurrentSp0Sync,
            1 => Self::CurrentSp0Irq,
            2 => Self::CurrentSp0Fiq,
            3 => Self::CurrentSp0SError,
            4 => Self::CurrentSync,
            5 => Self::CurrentIrq,
            6 => Self::CurrentFiq,
            7 => Self::CurrentSError,
            8 => Self::LowerSync,
            9 => Self::LowerIrq,
            10 => Self::LowerFiq,
            11 => Self::LowerSError,
            n => Self::LowerAarch32(n),
        }
    }
}

struct Dump<'a> {
    frame: &'a TrapFrame,
    kind: VectorKind,
    esr: Esr,
    far: u64,
    hpfar: u64,
}

impl fmt::Display for Dump<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ec = self.esr.ec();
        writeln!(
            f,
            "unexpected exception on cpu{}: {:?}, {} (EC {:#04x})",
            crate::arch::percpu::cpu_index(),
            self.kind,
            ec.name(),
            self.esr.0 >> 26 & 0x3f
        )?;
        writeln!(
            f,
            "  ESR_EL2={:#018x} FAR_EL2={:#018x} HPFAR_EL2={:#018x}",
            self.esr.0, self.far, self.hpfar
        )?;
        writeln!(
            f,
            "  ELR_EL2={:#018x} SPSR_EL2={:#018x}",
            self.frame.elr, self.frame.spsr
        )?;
        for (i, pair) in self.frame.x.chunks(2).enumerate() {
            match pair {
                [a, b] => writeln!(
                    f,
                    "  x{:<2}={:#018x} x{:<2}={:#018x}",
                    2 * i,
                    a,
                    2 * i + 1,
                    b
                )?,
                [a] => writeln!(f, "  x{:<2}={:#018x}", 2 * i, a)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Called by the vector stubs with the saved registers and the vector index.
#[no_mangle]
extern "C" fn handle_exception(frame: &mut TrapFrame, index: u64) {
    let kind = VectorKind::from_index(index);
    let esr = Esr(ESR_EL2.get());
    if kind == VectorKind::CurrentSync
        && esr.ec() == vmfork_core::esr::ExceptionClass::Unknown
        && super::semihosting::ATTEMPTING.load(core::sync::atomic::Ordering::SeqCst)
    {
        // The HLT of a semihosting call is undefined when QEMU runs without -semihosting.
        super::psci::system_off();
    }
    let dump = Dump {
        frame,
        kind,
        esr,
        far: FAR_EL2.get(),
        hpfar: HPFAR_EL2.get(),
    };
    if let Some(print) = FATAL_PRINT.get() {
        print(format_args!("{dump}"));
    }
    super::semihosting::exit(super::semihosting::EXIT_EXCEPTION);
}
