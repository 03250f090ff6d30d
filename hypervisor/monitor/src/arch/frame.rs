//! Whole-frame copy and zero for guest memory, with the cache maintenance a guest needs folded
//! into the same loop: what every copy-on-write fault and every fresh page costs.
//!
//! Why the maintenance is there at all is [`super::cache::clean_inval_to_poc`]: the monitor
//! writes through a cacheable alias, a guest with its MMU off reads past the caches (ARM ARM
//! B2.16). Folding it in: a data-cache instruction by VA executes in program order relative to
//! the loads and stores of this CPU to the same minimum-size cache line through Normal
//! Write-Back memory (ARM ARM D7.5.9.5, "Ordering and completion of data and instruction cache
//! instructions"), and the monitor's identity map is Normal Write-Back. So a `DC CIVAC` of a
//! source line before the loads of that line makes them miss and read memory, and a `DC CIVAC`
//! of a destination line after the stores to it writes them to memory, with one `DSB ISH` at
//! the end completing all of them (ARM ARM D7.5.10: a DSB completes cache maintenance), instead
//! of a separate pass and a DSB per pass. The loops step 64 bytes (one `DC` each), which is
//! every line when CTR_EL0.DminLine is 64 bytes (QEMU and most cores) and every line more than
//! once when it is larger; with smaller lines the copy falls back to separate passes.
//!
//! The loops use SIMD registers (v0-v7 and v16-v23, declared as clobbered, so the compiler
//! keeps nothing there). FP/SIMD is enabled at EL2 (CPTR_EL2.TFP = 0, `boot.rs`), and a guest's
//! registers are not in them while this runs: the world switch stores all of q0-q31, FPCR and
//! FPSR into the vCPU's `GuestRegs` before the monitor runs any Rust code and loads them back
//! at entry (`entry.rs`, `vmfork_guest_exit`/`vmfork_enter_guest`), and an IRQ taken at EL2
//! saves q0-q31 in its frame.

use vmfork_core::addr::{PhysAddr, PAGE_SIZE};

use super::cache;

// One iteration of the fast loops moves 256 bytes (one `DC` per 64 bytes, four unrolled): a
// frame is a whole number of them.
const _: () = assert!(PAGE_SIZE.is_multiple_of(256));

/// Copies the 4 KiB frame at `src` to `dst` for a guest: the source's lines are cleaned and
/// invalidated before they are read (a guest may have written them non-cacheably), the
/// destination's are cleaned and invalidated to the PoC after they are written (a guest may
/// read them non-cacheably), and, as the frame may hold code, it is made visible to instruction
/// fetch ([`cache::sync_icache_after_clean`]).
///
/// # Safety
/// `dst` and `src` are distinct, 4 KiB-aligned frames of RAM that the monitor's identity map
/// covers, and nothing else writes `dst` while this runs.
pub unsafe fn copy_for_guest(dst: PhysAddr, src: PhysAddr) {
    debug_assert!(dst.0.is_multiple_of(PAGE_SIZE) && src.0.is_multiple_of(PAGE_SIZE) && dst != src);
    if cache::dcache_line() >= 64 {
        // SAFETY: the caller's contract: 4 KiB of identity-mapped RAM at each address, the two
        // distinct; the loop reads [src, src + 4 KiB) and writes [dst, dst + 4 KiB) only, and
        // clobbers only the registers declared. Barriers and maintenance (module docs):
        // `DSB ISH` first completes every earlier store of this CPU, the guest's from before
        // its exception included, before the lines are cleaned and read; each `DC CIVAC` is
        // ordered with this CPU's accesses to its line (ARM ARM D7.5.9.5); the last `DSB ISH`
        // completes all the maintenance before the caller publishes the frame to a guest.
        unsafe {
            core::arch::asm!(
                "dsb ish",
                "2:",
                "dc civac, {s}",
                "ldp q0, q1, [{s}], #32",
                "ldp q2, q3, [{s}], #32",
                "dc civac, {s}",
                "ldp q4, q5, [{s}], #32",
                "ldp q6, q7, [{s}], #32",
                "stp q0, q1, [{d}]",
                "stp q2, q3, [{d}, #32]",
                "dc civac, {d}",
                "add {d}, {d}, #64",
                "dc civac, {s}",
                "ldp q16, q17, [{s}], #32",
                "ldp q18, q19, [{s}], #32",
                "stp q4, q5, [{d}]",
                "stp q6, q7, [{d}, #32]",
                "dc civac, {d}",
                "add {d}, {d}, #64",
                "dc civac, {s}",
                "ldp q20, q21, [{s}], #32",
                "ldp q22, q23, [{s}], #32",
                "stp q16, q17, [{d}]",
                "stp q18, q19, [{d}, #32]",
                "dc civac, {d}",
                "add {d}, {d}, #64",
                "stp q20, q21, [{d}]",
                "stp q22, q23, [{d}, #32]",
                "dc civac, {d}",
                "add {d}, {d}, #64",
                "cmp {s}, {end}",
                "b.ne 2b",
                "dsb ish",
                s = inout(reg) src.0 => _,
                d = inout(reg) dst.0 => _,
                end = in(reg) src.0 + PAGE_SIZE,
                out("v0") _, out("v1") _, out("v2") _, out("v3") _,
                out("v4") _, out("v5") _, out("v6") _, out("v7") _,
                out("v16") _, out("v17") _, out("v18") _, out("v19") _,
                out("v20") _, out("v21") _, out("v22") _, out("v23") _,
                options(nostack),
            );
        }
    } else {
        cache::clean_inval_before_read(src, PAGE_SIZE);
        // SAFETY: as above; the copy alone, the maintenance is the separate passes around it.
        unsafe { copy_plain(dst, src) };
        cache::clean_inval_to_poc(dst, PAGE_SIZE);
    }
    cache::sync_icache_after_clean();
}

/// The 4 KiB copy alone, 64 bytes an iteration in SIMD registers, no cache maintenance.
///
/// # Safety
/// As for [`copy_for_guest`].
pub unsafe fn copy_plain(dst: PhysAddr, src: PhysAddr) {
    // SAFETY: the caller's contract; reads [src, src + 4 KiB), writes [dst, dst + 4 KiB).
    unsafe {
        core::arch::asm!(
            "2:",
            "ldp q0, q1, [{s}], #32",
            "ldp q2, q3, [{s}], #32",
            "stp q0, q1, [{d}], #32",
            "stp q2, q3, [{d}], #32",
            "cmp {s}, {end}",
            "b.ne 2b",
            s = inout(reg) src.0 => _,
            d = inout(reg) dst.0 => _,
            end = in(reg) src.0 + PAGE_SIZE,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _,
            options(nostack),
        );
    }
}

/// Zeroes the 4 KiB frame at `pa` for a guest, cleaned and invalidated to the PoC (a guest with
/// its MMU off reads it from memory; it must not see the previous owner's data). With DC ZVA
/// usable at EL2 (DCZID_EL0.DZP = 0 on every CPU) and 64-byte blocks and lines, each 64 bytes
/// are one `DC ZVA` (the architectural zeroing of a block, on Normal memory only: the identity
/// map maps RAM Normal Write-Back) and one `DC CIVAC` of the same line: for ordering, DC ZVA
/// behaves as a set of stores to the bytes of its block (ARM ARM D7.5.9.5 and the DC ZVA
/// description), so the clean that follows it in program order writes the zeroes out. Other
/// geometries zero first (DC ZVA by block, or SIMD stores) and clean in a second pass.
///
/// # Safety
/// `pa` is a 4 KiB-aligned frame of RAM that the monitor's identity map covers, and nothing
/// else uses it while this runs.
pub unsafe fn zero_for_guest(pa: PhysAddr) {
    debug_assert!(pa.0.is_multiple_of(PAGE_SIZE));
    let zva = cache::zva_block();
    if zva == Some(64) && cache::dcache_line() >= 64 {
        // SAFETY: the caller's contract; the loop zeroes and cleans [pa, pa + 4 KiB) only (each
        // DC ZVA zeroes the 64-byte block at an address that is 64-byte aligned); the final
        // `DSB ISH` completes the zeroing and the maintenance (ARM ARM D7.5.10).
        unsafe {
            core::arch::asm!(
                "2:",
                "dc zva, {a}",
                "dc civac, {a}",
                "add {a}, {a}, #64",
                "dc zva, {a}",
                "dc civac, {a}",
                "add {a}, {a}, #64",
                "dc zva, {a}",
                "dc civac, {a}",
                "add {a}, {a}, #64",
                "dc zva, {a}",
                "dc civac, {a}",
                "add {a}, {a}, #64",
                "cmp {a}, {end}",
                "b.ne 2b",
                "dsb ish",
                a = inout(reg) pa.0 => _,
                end = in(reg) pa.0 + PAGE_SIZE,
                options(nostack),
            );
        }
        return;
    }
    match zva {
        Some(block) if block <= PAGE_SIZE => {
            let mut a = pa.0;
            while a < pa.0 + PAGE_SIZE {
                // SAFETY: zeroes the naturally aligned `block` bytes at `a`, inside the frame
                // (the frame is 4 KiB-aligned and `block` a power of two no larger).
                unsafe { core::arch::asm!("dc zva, {0}", in(reg) a, options(nostack)) };
                a += block;
            }
        }
        _ => {
            // SAFETY: the caller's contract; writes [pa, pa + 4 KiB) only.
            unsafe {
                core::arch::asm!(
                    "movi v0.2d, #0",
                    "2:",
                    "stp q0, q0, [{a}], #32",
                    "stp q0, q0, [{a}], #32",
                    "cmp {a}, {end}",
                    "b.ne 2b",
                    a = inout(reg) pa.0 => _,
                    end = in(reg) pa.0 + PAGE_SIZE,
                    out("v0") _,
                    options(nostack),
                );
            }
        }
    }
    cache::clean_inval_to_poc(pa, PAGE_SIZE);
}
