//! Every way into and out of EL2, in one place: the exception vector table, the entry and exit
//! of exceptions taken at EL2 (fatal ones and IRQs), and the world switch into and out of a guest.
//!
//! All of it is one `global_asm!` block, so its macros are shared: general-purpose registers are
//! saved and restored by `SAVE_X2_X30`/`LOAD_X2_X30`, SIMD registers by `SAVE_Q`/`LOAD_Q`, and
//! every `eret` is `ERET_SB`, which stops straight-line speculation past it. Every offset the
//! assembly uses comes from a `#[repr(C)]` frame struct below through `offset_of!`, and every
//! layout assumption the macros make is checked at compile time.
//!
//! | path | frame | saved |
//! |---|---|---|
//! | fatal exception at EL2 (vectors 0-4, 6, 7) | [`TrapFrame`] on the stack | x0-x30, ELR, SPSR |
//! | IRQ at EL2 (vector 5) | [`IrqFrame`] on the stack | x0-x30, ELR, SPSR, FPCR, FPSR, q0-q31 |
//! | guest entry (`vmfork_enter_guest`) | [`HostFrame`] on the stack | the monitor's x19-x30, d8-d15 |
//! | guest exit (vectors 8-15) | the vCPU's [`GuestRegs`] | x0-x30, PC, PSTATE, q0-q31, FPCR, FPSR |

use core::arch::global_asm;
use core::mem::{offset_of, size_of};

use super::vcpu::GuestRegs;

/// Registers saved when an exception is taken at EL2 (the monitor expects none: they are dumped).
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

/// Registers saved around an IRQ taken at EL2. The interrupted code may hold live values in any
/// general-purpose or SIMD register, and the handler may clobber every caller-saved one (the
/// AAPCS64 preserves only the low halves of v8-v15), so everything it could change is saved.
#[repr(C, align(16))]
pub struct IrqFrame {
    /// x0 to x30.
    pub x: [u64; 31],
    /// Exception link register.
    pub elr: u64,
    /// Saved program status.
    pub spsr: u64,
    /// Floating-point control register.
    pub fpcr: u64,
    /// Floating-point status register.
    pub fpsr: u64,
    _pad: u64,
    /// q0 to q31.
    pub q: [u128; 32],
}

/// The monitor's callee-saved registers (AAPCS64), kept on its stack while a guest runs, and the
/// vCPU's register block the exit path stores the guest's registers into.
#[repr(C)]
pub struct HostFrame {
    /// x19 to x30.
    pub x19_x30: [u64; 12],
    /// d8 to d15 (the low 64 bits of v8-v15).
    pub d8_d15: [u64; 8],
    /// The `GuestRegs` being run.
    pub regs: u64,
    _pad: u64,
}

// What the macros assume about the frames: x0..x30 at offset 0, 8 bytes apart; the pairs the
// assembly loads and stores with one LDP/STP adjacent; SP 16-byte aligned (ARM ARM: SP alignment
// checking, and the AAPCS64 at every call).
const _: () = {
    assert!(offset_of!(TrapFrame, x) == 0);
    assert!(offset_of!(IrqFrame, x) == 0);
    assert!(offset_of!(GuestRegs, x) == 0);
    assert!(offset_of!(TrapFrame, spsr) == offset_of!(TrapFrame, elr) + 8);
    assert!(offset_of!(IrqFrame, spsr) == offset_of!(IrqFrame, elr) + 8);
    assert!(offset_of!(IrqFrame, fpsr) == offset_of!(IrqFrame, fpcr) + 8);
    assert!(offset_of!(GuestRegs, pstate) == offset_of!(GuestRegs, pc) + 8);
    assert!(offset_of!(GuestRegs, fpsr) == offset_of!(GuestRegs, fpcr) + 8);
    assert!(offset_of!(IrqFrame, q).is_multiple_of(16));
    assert!(offset_of!(GuestRegs, v).is_multiple_of(16));
    assert!(offset_of!(HostFrame, x19_x30) == 0);
    assert!(size_of::<TrapFrame>().is_multiple_of(16));
    assert!(size_of::<IrqFrame>().is_multiple_of(16));
    assert!(size_of::<HostFrame>().is_multiple_of(16));
    // Immediate offsets must fit the LDP/STP forms used (signed 7-bit, scaled by 8 or 16).
    assert!(offset_of!(GuestRegs, pc) <= 504);
    assert!(offset_of!(HostFrame, regs) <= 504);
    assert!(offset_of!(IrqFrame, fpcr) <= 504);
};

global_asm!(
    r#"
// x2..x30 of a frame whose x0..x30 start at \base (x0 and x1 are the callers' scratch registers).
.macro SAVE_X2_X30 base
    stp     x2, x3, [\base, #16]
    stp     x4, x5, [\base, #32]
    stp     x6, x7, [\base, #48]
    stp     x8, x9, [\base, #64]
    stp     x10, x11, [\base, #80]
    stp     x12, x13, [\base, #96]
    stp     x14, x15, [\base, #112]
    stp     x16, x17, [\base, #128]
    stp     x18, x19, [\base, #144]
    stp     x20, x21, [\base, #160]
    stp     x22, x23, [\base, #176]
    stp     x24, x25, [\base, #192]
    stp     x26, x27, [\base, #208]
    stp     x28, x29, [\base, #224]
    str     x30, [\base, #240]
.endm

.macro LOAD_X2_X30 base
    ldp     x2, x3, [\base, #16]
    ldp     x4, x5, [\base, #32]
    ldp     x6, x7, [\base, #48]
    ldp     x8, x9, [\base, #64]
    ldp     x10, x11, [\base, #80]
    ldp     x12, x13, [\base, #96]
    ldp     x14, x15, [\base, #112]
    ldp     x16, x17, [\base, #128]
    ldp     x18, x19, [\base, #144]
    ldp     x20, x21, [\base, #160]
    ldp     x22, x23, [\base, #176]
    ldp     x24, x25, [\base, #192]
    ldp     x26, x27, [\base, #208]
    ldp     x28, x29, [\base, #224]
    ldr     x30, [\base, #240]
.endm

// q0..q31 at \base (16-byte aligned).
.macro SAVE_Q base
    stp     q0, q1, [\base, #0]
    stp     q2, q3, [\base, #32]
    stp     q4, q5, [\base, #64]
    stp     q6, q7, [\base, #96]
    stp     q8, q9, [\base, #128]
    stp     q10, q11, [\base, #160]
    stp     q12, q13, [\base, #192]
    stp     q14, q15, [\base, #224]
    stp     q16, q17, [\base, #256]
    stp     q18, q19, [\base, #288]
    stp     q20, q21, [\base, #320]
    stp     q22, q23, [\base, #352]
    stp     q24, q25, [\base, #384]
    stp     q26, q27, [\base, #416]
    stp     q28, q29, [\base, #448]
    stp     q30, q31, [\base, #480]
.endm

.macro LOAD_Q base
    ldp     q0, q1, [\base, #0]
    ldp     q2, q3, [\base, #32]
    ldp     q4, q5, [\base, #64]
    ldp     q6, q7, [\base, #96]
    ldp     q8, q9, [\base, #128]
    ldp     q10, q11, [\base, #160]
    ldp     q12, q13, [\base, #192]
    ldp     q14, q15, [\base, #224]
    ldp     q16, q17, [\base, #256]
    ldp     q18, q19, [\base, #288]
    ldp     q20, q21, [\base, #320]
    ldp     q22, q23, [\base, #352]
    ldp     q24, q25, [\base, #384]
    ldp     q26, q27, [\base, #416]
    ldp     q28, q29, [\base, #448]
    ldp     q30, q31, [\base, #480]
.endm

// ERET, then a barrier that nothing after it runs even speculatively. Nothing after an ERET is
// architecturally executed, but a CPU may speculate straight past it (Arm's straight-line
// speculation advisory); DSB NSH + ISB is the sequence for CPUs without FEAT_SB's SB instruction.
.macro ERET_SB
    eret
    dsb     nsh
    isb
.endm

// A fatal exception at EL2: build a TrapFrame and call handle_exception(frame, index).
.macro VENTRY index
    .balign 0x80
    sub     sp, sp, #{trap_frame}
    stp     x0, x1, [sp, #0]
    mov     x0, #\index
    b       el2_exception_common
.endm

// An exception from a guest: leave it through the world switch below, x1 = the vector index.
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
    .balign 0x80                        // 5: IRQ at EL2
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
    SAVE_X2_X30 sp
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [sp, #{trap_elr}]
    mov     x1, x0
    mov     x0, sp
    bl      handle_exception
    ldp     x2, x3, [sp, #{trap_elr}]
    msr     elr_el2, x2
    msr     spsr_el2, x3
    LOAD_X2_X30 sp
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #{trap_frame}
    ERET_SB

.section .text.irq, "ax"
el2_irq_current_el:
    sub     sp, sp, #{irq_frame}
    stp     x0, x1, [sp, #0]
    SAVE_X2_X30 sp
    mrs     x0, elr_el2
    mrs     x1, spsr_el2
    stp     x0, x1, [sp, #{irq_elr}]
    mrs     x0, fpcr
    mrs     x1, fpsr
    stp     x0, x1, [sp, #{irq_fpcr}]
    add     x0, sp, #{irq_q}
    SAVE_Q  x0
    bl      handle_current_el_irq
    add     x0, sp, #{irq_q}
    LOAD_Q  x0
    ldp     x0, x1, [sp, #{irq_fpcr}]
    msr     fpcr, x0
    msr     fpsr, x1
    ldp     x0, x1, [sp, #{irq_elr}]
    msr     elr_el2, x0
    msr     spsr_el2, x1
    LOAD_X2_X30 sp
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #{irq_frame}
    ERET_SB

// vmfork_enter_guest(regs: *mut GuestRegs) -> vector index. Saves the monitor's callee-saved
// registers in a HostFrame, loads the guest's registers from `regs` and ERETs to it.
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
    stp     d8, d9, [sp, #{host_d}]
    stp     d10, d11, [sp, #({host_d} + 16)]
    stp     d12, d13, [sp, #({host_d} + 32)]
    stp     d14, d15, [sp, #({host_d} + 48)]
    str     x0, [sp, #{host_regs}]

    add     x1, x0, #{guest_v}
    LOAD_Q  x1
    add     x1, x0, #{guest_fpcr}
    ldp     x2, x3, [x1]
    msr     fpcr, x2
    msr     fpsr, x3
    ldp     x2, x3, [x0, #{guest_pc}]
    msr     elr_el2, x2
    msr     spsr_el2, x3
    LOAD_X2_X30 x0
    ldp     x0, x1, [x0, #0]
    ERET_SB

// Lower-EL vector entries branch here with the guest's x0/x1 pushed and x1 = the vector index.
// Stores the guest's registers into the GuestRegs named in the HostFrame, restores the monitor's
// registers and returns from vmfork_enter_guest with the index.
vmfork_guest_exit:
    ldr     x0, [sp, #(16 + {host_regs})]
    SAVE_X2_X30 x0
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x0, #0]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [x0, #{guest_pc}]
    add     x2, x0, #{guest_v}
    SAVE_Q  x2
    mrs     x3, fpcr
    mrs     x4, fpsr
    add     x2, x0, #{guest_fpcr}
    stp     x3, x4, [x2]

    mov     x0, x1
    ldp     x19, x20, [sp, #0]
    ldp     x21, x22, [sp, #16]
    ldp     x23, x24, [sp, #32]
    ldp     x25, x26, [sp, #48]
    ldp     x27, x28, [sp, #64]
    ldp     x29, x30, [sp, #80]
    ldp     d8, d9, [sp, #{host_d}]
    ldp     d10, d11, [sp, #({host_d} + 16)]
    ldp     d12, d13, [sp, #({host_d} + 32)]
    ldp     d14, d15, [sp, #({host_d} + 48)]
    add     sp, sp, #{host_frame}
    ret
"#,
    trap_frame = const size_of::<TrapFrame>(),
    trap_elr = const offset_of!(TrapFrame, elr),
    irq_frame = const size_of::<IrqFrame>(),
    irq_elr = const offset_of!(IrqFrame, elr),
    irq_fpcr = const offset_of!(IrqFrame, fpcr),
    irq_q = const offset_of!(IrqFrame, q),
    host_frame = const size_of::<HostFrame>(),
    host_d = const offset_of!(HostFrame, d8_d15),
    host_regs = const offset_of!(HostFrame, regs),
    guest_v = const offset_of!(GuestRegs, v),
    guest_fpcr = const offset_of!(GuestRegs, fpcr),
    guest_pc = const offset_of!(GuestRegs, pc),
);

extern "C" {
    static el2_vectors: u8;
    fn vmfork_enter_guest(regs: *mut GuestRegs) -> u64;
}

/// Points VBAR_EL2 at the vector table. Called on every CPU before anything can fault.
pub fn install_vectors() {
    use aarch64_cpu::registers::{Writeable, VBAR_EL2};
    let base = core::ptr::addr_of!(el2_vectors) as u64;
    // `el2_vectors` is the 2 KiB-aligned table above; writing VBAR_EL2 only changes where
    // exceptions taken to EL2 go. The ISB makes the new base take effect before we go on (ARM ARM:
    // direct writes to system registers need a context synchronization event).
    VBAR_EL2.set(base);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// Runs the guest whose registers `regs` holds until it takes an exception to EL2; returns the
/// index of the lower-EL vector taken (8-15).
///
/// # Safety
/// VTTBR_EL2, HCR_EL2 and the other per-guest EL2 registers must describe this guest, and the
/// guest's stage-2 tables must only map memory the guest may use: the guest then runs with
/// whatever those registers allow.
pub unsafe fn run_guest(regs: &mut GuestRegs) -> u64 {
    // SAFETY: the assembly saves every callee-saved register of the AAPCS64 (x19-x30, d8-d15)
    // in a HostFrame and restores them before returning, and writes only `regs` and its own
    // stack frame; the guest cannot reach the monitor's memory except through its stage-2
    // tables, which the caller vouches for.
    unsafe { vmfork_enter_guest(regs) }
}
