//! The EL1 exception vector table and its Rust handler.
//!
//! Every vector saves the full interrupted context that Rust code may clobber: x0-x18, x29,
//! x30, ELR_EL1, SPSR_EL1, and all of q0-q31 with FPCR/FPSR (the procedure-call standard only
//! preserves the low 64 bits of v8-v15, and Rust on this target uses SIMD registers freely).
//! IRQs go to the GIC driver; everything else is unexpected: it prints the syndrome and stops
//! the machine with a failing status.

use super::{console, exit, gic, sysreg};
use core::arch::global_asm;

/// The register state saved on exception entry, as laid out by the vector code.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    /// x0-x18.
    pub x: [u64; 19],
    /// x29 (frame pointer).
    pub fp: u64,
    /// x30 (link register).
    pub lr: u64,
    /// `ELR_EL1`: where the exception returns to.
    pub elr: u64,
    /// `SPSR_EL1`: the interrupted PSTATE.
    pub spsr: u64,
    /// `FPCR`.
    pub fpcr: u64,
    /// `FPSR`.
    pub fpsr: u64,
    _pad: u64,
    /// q0-q31.
    pub q: [u128; 32],
}

const FRAME_SIZE: usize = core::mem::size_of::<ExceptionFrame>();
const _: () = assert!(FRAME_SIZE == 720 && core::mem::offset_of!(ExceptionFrame, q) == 208);

global_asm!(
    r#"
    .macro VECTOR kind
    .balign 0x80
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       __vmfork_exception_common
    .endm

    .section .text.vectors, "ax"
    .balign 0x800
    .global __vmfork_vectors
__vmfork_vectors:
    VECTOR 0
    VECTOR 1
    VECTOR 2
    VECTOR 3
    VECTOR 4
    VECTOR 5
    VECTOR 6
    VECTOR 7
    VECTOR 8
    VECTOR 9
    VECTOR 10
    VECTOR 11
    VECTOR 12
    VECTOR 13
    VECTOR 14
    VECTOR 15

__vmfork_exception_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x29, [sp, #144]
    mrs     x1, elr_el1
    stp     x30, x1, [sp, #160]
    mrs     x1, spsr_el1
    mrs     x2, fpcr
    stp     x1, x2, [sp, #176]
    mrs     x1, fpsr
    str     x1, [sp, #192]
    stp     q0, q1, [sp, #208]
    stp     q2, q3, [sp, #240]
    stp     q4, q5, [sp, #272]
    stp     q6, q7, [sp, #304]
    stp     q8, q9, [sp, #336]
    stp     q10, q11, [sp, #368]
    stp     q12, q13, [sp, #400]
    stp     q14, q15, [sp, #432]
    stp     q16, q17, [sp, #464]
    stp     q18, q19, [sp, #496]
    stp     q20, q21, [sp, #528]
    stp     q22, q23, [sp, #560]
    stp     q24, q25, [sp, #592]
    stp     q26, q27, [sp, #624]
    stp     q28, q29, [sp, #656]
    stp     q30, q31, [sp, #688]
    mov     x1, sp
    bl      __vmfork_exception
    ldp     q0, q1, [sp, #208]
    ldp     q2, q3, [sp, #240]
    ldp     q4, q5, [sp, #272]
    ldp     q6, q7, [sp, #304]
    ldp     q8, q9, [sp, #336]
    ldp     q10, q11, [sp, #368]
    ldp     q12, q13, [sp, #400]
    ldp     q14, q15, [sp, #432]
    ldp     q16, q17, [sp, #464]
    ldp     q18, q19, [sp, #496]
    ldp     q20, q21, [sp, #528]
    ldp     q22, q23, [sp, #560]
    ldp     q24, q25, [sp, #592]
    ldp     q26, q27, [sp, #624]
    ldp     q28, q29, [sp, #656]
    ldp     q30, q31, [sp, #688]
    ldp     x1, x2, [sp, #176]
    msr     spsr_el1, x1
    msr     fpcr, x2
    ldr     x1, [sp, #192]
    msr     fpsr, x1
    ldp     x30, x1, [sp, #160]
    msr     elr_el1, x1
    ldp     x18, x29, [sp, #144]
    ldp     x16, x17, [sp, #128]
    ldp     x14, x15, [sp, #112]
    ldp     x12, x13, [sp, #96]
    ldp     x10, x11, [sp, #80]
    ldp     x8, x9, [sp, #64]
    ldp     x6, x7, [sp, #48]
    ldp     x4, x5, [sp, #32]
    ldp     x2, x3, [sp, #16]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #{frame}
    eret
"#,
    frame = const FRAME_SIZE,
);

const KIND_NAMES: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];
const SOURCE_NAMES: [&str; 4] = [
    "current EL with SP0",
    "current EL with SPx",
    "lower EL AArch64",
    "lower EL AArch32",
];

/// Vector index of an IRQ taken from EL1 using SP_EL1 (the only expected exception).
const IRQ_CURRENT_EL_SPX: u64 = 5;
/// Vector index of a synchronous exception taken from EL1 using SP_EL1.
const SYNC_CURRENT_EL_SPX: u64 = 4;

/// A handler for synchronous exceptions at EL1: gets ESR_EL1, FAR_EL1 and the frame, and returns
/// true when it dealt with the exception (it may move `frame.elr` past the instruction).
pub type SyncHandler = fn(esr: u64, far: u64, frame: &mut ExceptionFrame) -> bool;

static SYNC_HANDLER: core::sync::atomic::AtomicPtr<()> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Installs `handler` for synchronous exceptions taken at EL1 (for guests that provoke faults on
/// purpose); without one, any such exception fails the guest.
pub fn set_sync_handler(handler: SyncHandler) {
    SYNC_HANDLER.store(handler as *mut (), core::sync::atomic::Ordering::SeqCst);
}

/// Called by the vector code with the vector index (source * 4 + kind) and the saved frame.
#[no_mangle]
extern "C" fn __vmfork_exception(vector: u64, frame: &mut ExceptionFrame) {
    if vector == IRQ_CURRENT_EL_SPX {
        gic::handle_irq();
        return;
    }
    if vector == SYNC_CURRENT_EL_SPX {
        let p = SYNC_HANDLER.load(core::sync::atomic::Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: the only non-null value ever stored is a `SyncHandler` (set_sync_handler);
            // function and data pointers have the same size on AArch64.
            let handler = unsafe { core::mem::transmute::<*mut (), SyncHandler>(p) };
            if handler(sysreg::esr_el1(), sysreg::far_el1(), frame) {
                return;
            }
        }
    }
    let kind = KIND_NAMES[(vector & 3) as usize];
    let source = SOURCE_NAMES[((vector >> 2) & 3) as usize];
    console::print_line_emergency(format_args!(
        "exception: unexpected {kind} from {source}: ESR_EL1={:#x} ELR_EL1={:#x} FAR_EL1={:#x} \
         SPSR_EL1={:#x}",
        sysreg::esr_el1(),
        frame.elr,
        sysreg::far_el1(),
        frame.spsr
    ));
    exit::fail()
}
