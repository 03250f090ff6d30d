//! Entering and leaving a guest: the world switch.
//!
//! [`enter_guest`] saves the monitor's callee-saved registers on its stack, loads the guest's
//! general-purpose and FP/SIMD registers from a [`GuestRegs`], and `eret`s to EL1. Any exception
//! from the guest arrives at the lower-EL vector entries, which store the guest's registers back
//! into the same [`GuestRegs`] (its address sits on the stack, under the monitor's registers),
//! restore the monitor's registers and return from [`enter_guest`] with the vector index. The
//! exception syndrome (ESR/FAR/HPFAR) is still in the EL2 registers for the caller to decode.
//!
//! The EL1 system registers are not touched here: [`El1Sysregs`] loads and stores them around the
//! call, since the monitor itself never uses them.

use core::arch::global_asm;
use core::mem::offset_of;

/// A guest vCPU's general-purpose, PC/PSTATE and FP/SIMD state.
#[repr(C, align(16))]
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GuestRegs {
    /// x0 to x30.
    pub x: [u64; 31],
    /// Program counter (loaded into ELR_EL2 to enter, read from it on exit).
    pub pc: u64,
    /// PSTATE as SPSR_EL2 holds it.
    pub pstate: u64,
    _pad: u64,
    /// The 32 128-bit SIMD registers.
    pub v: [u128; 32],
    /// Floating-point control register.
    pub fpcr: u64,
    /// Floating-point status register.
    pub fpsr: u64,
}

/// Bytes of the monitor's registers saved by `enter_guest` on its stack: x19-x30 (96),
/// d8-d15 (64) and the `GuestRegs` pointer (8, padded to 16).
const HOST_FRAME: usize = 176;
const HOST_REGS_PTR: usize = 160;

global_asm!(
    r#"
.section .text.guest, "ax"
.global vmfork_enter_guest
vmfork_enter_guest:
    sub     sp, sp, #{host_frame}
    stp     x19, x20, [sp, #0]
    stp     x21, x22, [sp, #16]
    stp     x23, x24, [sp, #32]
    stp     x25, x26, [sp, #48]
    stp     x27, x28, [sp, #64]
    stp     x29, x30, [sp, #80]
    stp     d8, d9, [sp, #96]
    stp     d10, d11, [sp, #112]
    stp     d12, d13, [sp, #128]
    stp     d14, d15, [sp, #144]
    str     x0, [sp, #{host_regs_ptr}]

    add     x1, x0, #{v}
    ldp     q0, q1, [x1, #0]
    ldp     q2, q3, [x1, #32]
    ldp     q4, q5, [x1, #64]
    ldp     q6, q7, [x1, #96]
    ldp     q8, q9, [x1, #128]
    ldp     q10, q11, [x1, #160]
    ldp     q12, q13, [x1, #192]
    ldp     q14, q15, [x1, #224]
    ldp     q16, q17, [x1, #256]
    ldp     q18, q19, [x1, #288]
    ldp     q20, q21, [x1, #320]
    ldp     q22, q23, [x1, #352]
    ldp     q24, q25, [x1, #384]
    ldp     q26, q27, [x1, #416]
    ldp     q28, q29, [x1, #448]
    ldp     q30, q31, [x1, #480]
    add     x1, x0, #{fpcr}
    ldp     x2, x3, [x1]
    msr     fpcr, x2
    msr     fpsr, x3
    ldp     x2, x3, [x0, #{pc}]
    msr     elr_el2, x2
    msr     spsr_el2, x3

    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0, #0]
    eret
    // Nothing after an ERET is architecturally executed; stop straight-line speculation.
    dsb     nsh
    isb

// Lower-EL vector entries branch here with the guest's x0/x1 pushed and x1 = vector index.
.global vmfork_guest_exit
vmfork_guest_exit:
    ldr     x0, [sp, #(16 + {host_regs_ptr})]
    stp     x2, x3, [x0, #16]
    stp     x4, x5, [x0, #32]
    stp     x6, x7, [x0, #48]
    stp     x8, x9, [x0, #64]
    stp     x10, x11, [x0, #80]
    stp     x12, x13, [x0, #96]
    stp     x14, x15, [x0, #112]
    stp     x16, x17, [x0, #128]
    stp     x18, x19, [x0, #144]
    stp     x20, x21, [x0, #160]
    stp     x22, x23, [x0, #176]
    stp     x24, x25, [x0, #192]
    stp     x26, x27, [x0, #208]
    stp     x28, x29, [x0, #224]
    str     x30, [x0, #240]
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x0, #0]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [x0, #{pc}]

    add     x2, x0, #{v}
    stp     q0, q1, [x2, #0]
    stp     q2, q3, [x2, #32]
    stp     q4, q5, [x2, #64]
    stp     q6, q7, [x2, #96]
    stp     q8, q9, [x2, #128]
    stp     q10, q11, [x2, #160]
    stp     q12, q13, [x2, #192]
    stp     q14, q15, [x2, #224]
    stp     q16, q17, [x2, #256]
    stp     q18, q19, [x2, #288]
    stp     q20, q21, [x2, #320]
    stp     q22, q23, [x2, #352]
    stp     q24, q25, [x2, #384]
    stp     q26, q27, [x2, #416]
    stp     q28, q29, [x2, #448]
    stp     q30, q31, [x2, #480]
    mrs     x3, fpcr
    mrs     x4, fpsr
    add     x2, x0, #{fpcr}
    stp     x3, x4, [x2]

    mov     x0, x1
    ldp     x19, x20, [sp, #0]
    ldp     x21, x22, [sp, #16]
    ldp     x23, x24, [sp, #32]
    ldp     x25, x26, [sp, #48]
    ldp     x27, x28, [sp, #64]
    ldp     x29, x30, [sp, #80]
    ldp     d8, d9, [sp, #96]
    ldp     d10, d11, [sp, #112]
    ldp     d12, d13, [sp, #128]
    ldp     d14, d15, [sp, #144]
    add     sp, sp, #{host_frame}
    ret
"#,
    host_frame = const HOST_FRAME,
    host_regs_ptr = const HOST_REGS_PTR,
    v = const offset_of!(GuestRegs, v),
    fpcr = const offset_of!(GuestRegs, fpcr),
    pc = const offset_of!(GuestRegs, pc),
);

const _: () = assert!(offset_of!(GuestRegs, fpsr) == offset_of!(GuestRegs, fpcr) + 8);
const _: () = assert!(offset_of!(GuestRegs, pstate) == offset_of!(GuestRegs, pc) + 8);

extern "C" {
    fn vmfork_enter_guest(regs: *mut GuestRegs) -> u64;
}

/// Why the guest stopped running: which lower-EL vector was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// A synchronous exception (trap, abort, HVC, SMC, ...): decode ESR_EL2.
    Sync,
    /// A physical IRQ arrived while the guest ran (HCR_EL2.IMO routes it to EL2).
    Irq,
    /// A physical FIQ (not used on this board).
    Fiq,
    /// An SError (asynchronous external abort).
    SError,
    /// An exception from AArch32 state, which guests never enter legitimately.
    Aarch32(u64),
}

/// Runs the guest described by `regs` (with its EL1 system registers, stage-2 tables and GIC
/// state already loaded) until it takes an exception to EL2.
///
/// # Safety
/// VTTBR_EL2, HCR_EL2 and the other per-guest EL2 registers must describe this guest, and the
/// guest's stage-2 tables must only map memory the guest may use: the guest then runs with
/// whatever those registers allow.
pub unsafe fn enter_guest(regs: &mut GuestRegs) -> GuestExit {
    // SAFETY: the assembly saves every callee-saved register of the AAPCS64 (x19-x30, d8-d15)
    // and restores them before returning; the guest cannot reach the monitor's memory except
    // through its stage-2 tables, which the caller vouches for.
    let index = unsafe { vmfork_enter_guest(regs) };
    match index {
        8 => GuestExit::Sync,
        9 => GuestExit::Irq,
        10 => GuestExit::Fiq,
        11 => GuestExit::SError,
        n => GuestExit::Aarch32(n),
    }
}
