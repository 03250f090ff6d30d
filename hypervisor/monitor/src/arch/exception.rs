//! EL2 exception vectors. Every entry saves x0-x30, ELR_EL2 and SPSR_EL2 into a [`TrapFrame`] on
//! the current stack and calls [`handle_exception`]. So far the monitor expects no exception at
//! all: anything that arrives is dumped, decoded, and stops the machine with a failure status.

use core::arch::global_asm;
use core::fmt;

use aarch64_cpu::registers::{Readable, ESR_EL2, FAR_EL2, HPFAR_EL2};
use vmfork_core::esr::Esr;

/// Registers saved by the vector stubs, in the order the assembly stores them.
#[repr(C)]
pub struct TrapFrame {
    /// x0 to x30.
    pub x: [u64; 31],
    /// Exception link register: where the exception was taken.
    pub elr: u64,
    /// Saved program status.
    pub spsr: u64,
    _pad: u64,
}

const FRAME_SIZE: usize = core::mem::size_of::<TrapFrame>();
const _: () = assert!(
    FRAME_SIZE.is_multiple_of(16),
    "the stack pointer must stay 16-byte aligned"
);

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

global_asm!(
    r#"
.macro VENTRY index
    .balign 0x80
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp, #0]
    mov     x0, #\index
    b       el2_exception_common
.endm

// Exceptions from a guest (lower EL) leave the guest through the world switch in vcpu.rs.
.macro VENTRY_GUEST index
    .balign 0x80
    stp     x0, x1, [sp, #-16]!
    mov     x1, #\index
    b       vmfork_guest_exit
.endm

.section .text.vectors, "ax"
.balign 0x800
.global el2_vectors
el2_vectors:
    VENTRY 0
    VENTRY 1
    VENTRY 2
    VENTRY 3
    VENTRY 4
    .balign 0x80                        // 5: IRQ at EL2: the GIC dispatcher (arch/gic.rs)
    b       el2_irq_current_el
    VENTRY 6
    VENTRY 7
    VENTRY_GUEST 8
    VENTRY_GUEST 9
    VENTRY_GUEST 10
    VENTRY_GUEST 11
    VENTRY_GUEST 12
    VENTRY_GUEST 13
    VENTRY_GUEST 14
    VENTRY_GUEST 15

el2_exception_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x30, x2, [sp, #240]
    str     x3, [sp, #256]
    mov     x1, x0
    mov     x0, sp
    bl      handle_exception
    ldp     x30, x2, [sp, #240]
    ldr     x3, [sp, #256]
    msr     elr_el2, x2
    msr     spsr_el2, x3
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #{frame}
    eret
"#,
    frame = const FRAME_SIZE,
);

extern "C" {
    static el2_vectors: u8;
}

/// Points VBAR_EL2 at the vector table. Called on every CPU before anything can fault.
pub fn install_vectors() {
    // SAFETY: `el2_vectors` is the 2 KiB-aligned table above; writing VBAR_EL2 only changes where
    // exceptions taken to EL2 go. The ISB makes the new base take effect before we go on
    // (ARM ARM: writes to system registers need context synchronization).
    unsafe {
        let base = core::ptr::addr_of!(el2_vectors) as u64;
        core::arch::asm!("msr vbar_el2, {0}", "isb", in(reg) base, options(nostack));
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
            crate::percpu::cpu_index(),
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
    crate::console::emergency_print(format_args!("{dump}"));
    crate::fatal_stop(1);
}
