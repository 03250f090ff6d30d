//! Entry points: the primary CPU's `_start` (where QEMU jumps) and `_secondary_start` (where PSCI
//! `CPU_ON` starts the others). Both set up a stack, let FP/SIMD instructions run at the current
//! exception level (the compiler uses SIMD registers for copies) and call into Rust.

use core::arch::global_asm;

/// Bytes of stack for each physical CPU; matches `STACK_SIZE` in linker.ld.
pub const STACK_SIZE: usize = 0x10000;
/// Largest number of physical CPUs the monitor drives; matches `MAX_CPUS` in linker.ld.
pub const MAX_CPUS: usize = 16;

global_asm!(
    r#"
.section .text.boot, "ax"
.global _start
_start:
    mov     x19, x0                     // DTB address from QEMU (may be 0 for an ELF kernel)

    // Zero .bss before anything can use it (the stacks live after it).
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    str     xzr, [x1], #8
    b       1b
2:
    // CPU 0's stack is the first STACK_SIZE bytes of the stack area; stacks grow down.
    adrp    x1, __stacks_start
    add     x1, x1, :lo12:__stacks_start
    mov     x2, #{stack_size}
    add     sp, x1, x2

    mrs     x20, CurrentEL
    lsr     x20, x20, #2
    cmp     x20, #2
    b.ne    3f

    // EL2 (non-VHE): CPTR_EL2 with TFP=0 lets FP/SIMD run at EL2 and EL1; 0x33ff are RES1 bits.
    mov     x1, #0x33ff
    msr     cptr_el2, x1
    isb
    mov     x0, x19
    bl      rust_main_el2
    b       .

3:  // Not EL2. At EL1, CPACR_EL1.FPEN=0b11 lets Rust code run so that it can say what is wrong.
    cmp     x20, #1
    b.ne    4f
    mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    isb
4:  mov     x0, x19
    mov     x1, x20
    bl      rust_main_wrong_el
    b       .

.global _secondary_start
_secondary_start:                       // x0 = CPU index (the PSCI CPU_ON context id)
    mov     x19, x0
    adrp    x1, __stacks_start
    add     x1, x1, :lo12:__stacks_start
    add     x2, x19, #1
    mov     x3, #{stack_size}
    mul     x2, x2, x3
    add     sp, x1, x2
    mov     x1, #0x33ff
    msr     cptr_el2, x1
    isb
    mov     x0, x19
    bl      rust_main_secondary
    b       .
"#,
    stack_size = const STACK_SIZE,
);

extern "C" {
    /// Entry of secondary CPUs, given to PSCI `CPU_ON`.
    pub fn _secondary_start();
    static __image_start: u8;
    static __image_end: u8;
}

/// Physical address range `[start, end)` of the monitor image including .bss and the stacks.
pub fn image_range() -> (u64, u64) {
    // Only the addresses of the linker-defined symbols are taken, never their contents.
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    )
}
