//! Cache and TLB maintenance for stage 2.

use vmfork_core::addr::{Ipa, PhysAddr};
use vmfork_core::stage2::{TlbOps, Vmid};

/// The smallest data-cache line size of this CPU, which the maintenance loops step by
/// (CTR_EL0.DminLine: a fixed 64 would skip lines on a CPU with 16- or 32-byte lines; QEMU's
/// `max` CPU reports 64, so only real hardware can tell the difference).
fn dcache_line() -> u64 {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 at EL2 has no side effect.
    unsafe { core::arch::asm!("mrs {0}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    vmfork_core::idregs::dcache_line_bytes(ctr)
}

/// Cleans `[pa, pa + len)` from the data cache to the point of coherency and invalidates the
/// whole instruction cache, so that code the monitor wrote into guest memory through its
/// cacheable map is what a guest fetches, with its MMU and caches off or on (ARM ARM D7.5.9:
/// "data and instruction cache coherency": DC CVAC, DSB, IC IALLUIS, DSB, ISB).
pub fn sync_for_guest_exec(pa: PhysAddr, len: u64) {
    let line = dcache_line();
    let mut addr = pa.0 & !(line - 1);
    let end = pa.0 + len;
    while addr < end {
        // SAFETY: cleaning a line of RAM the monitor maps has no effect on its contents.
        unsafe { core::arch::asm!("dc cvac, {0}", in(reg) addr, options(nostack)) };
        addr += line;
    }
    // SAFETY: barriers and instruction-cache invalidation only affect ordering and caches.
    unsafe { core::arch::asm!("dsb ish", "ic ialluis", "dsb ish", "isb", options(nostack)) };
}

/// Cleans and invalidates `[pa, pa + len)` in the data cache to the point of coherency
/// (`DC CIVAC` per line, then `DSB ISH`), so that memory holds what the monitor last wrote
/// there through its cacheable map and no line of the range stays in the caches.
///
/// Why (ARM ARM B2.16, "Mismatched memory attributes", and D7.5.9): the monitor reads and
/// writes guest frames through its identity map as Normal Inner/Outer Write-Back memory, while
/// a guest running with its stage-1 MMU off makes its data accesses Device-nGnRnE (stage 2's
/// Normal Write-Back combines to the more restrictive type, so they stay non-cacheable), and
/// they go straight to memory past the caches; so do a guest's Non-cacheable mappings. Without maintenance such a guest reads
/// memory behind the monitor's dirty lines: stale data, or what another VM had in the frame
/// before it was zeroed or copied. Cleaning to the PoC after the host writes a frame makes the
/// frame's new contents visible to the guest's non-cacheable reads; invalidating as well means
/// no clean copy of the old contents stays in the cache for the monitor to read later instead
/// of what the guest writes non-cacheably (and for the same reason a source frame is cleaned
/// and invalidated before the monitor reads it, [`clean_inval_before_read`]).
pub fn clean_inval_to_poc(pa: PhysAddr, len: u64) {
    let line = dcache_line();
    let mut addr = pa.0 & !(line - 1);
    let end = pa.0 + len;
    while addr < end {
        // SAFETY: clean and invalidate of a line of RAM the monitor maps: memory gets the
        // line's data first, so no content changes.
        unsafe { core::arch::asm!("dc civac, {0}", in(reg) addr, options(nostack)) };
        addr += line;
    }
    // SAFETY: a barrier: the maintenance completes before any later access (ARM ARM D7.5.10:
    // a DSB is needed for cache maintenance to complete before following instructions).
    unsafe { core::arch::asm!("dsb ish", options(nostack)) };
}

/// Before the monitor reads a guest frame (to copy it): cleans and invalidates its lines, so
/// the reads miss and fetch what a guest wrote non-cacheably with its MMU off, instead of a
/// stale line of the monitor's cacheable alias (ARM ARM B2.16). Lines the guest wrote with
/// cacheable attributes are dirty and reach memory first, so either kind of write survives.
pub fn clean_inval_before_read(pa: PhysAddr, len: u64) {
    clean_inval_to_poc(pa, len);
}

/// Stage-2 TLB maintenance on the real CPU (see `vmfork_core::stage2::tlb` for the sequence).
/// TLBI by IPA and `vmalls12e1is` act on the VMID in this CPU's VTTBR_EL2, so each operation
/// loads the target VMID into VTTBR_EL2 and puts the previous value back afterwards. Only the
/// VMID field matters to TLB maintenance, so the table address is left 0: HCR_EL2.VM is clear
/// while the monitor runs, so no walk uses it.
pub struct HwTlb;

fn vttbr_for(vmid: Vmid) -> u64 {
    (vmid.0 as u64) << 48
}

fn with_vttbr(vttbr: u64, f: impl FnOnce()) {
    let old: u64;
    // SAFETY: the monitor runs at EL2 with stage 2 unused by itself; VTTBR_EL2 only selects the
    // VMID that the following TLB maintenance targets and is restored before returning. The ISB
    // makes the new VMID current for the TLBIs (ARM ARM: system register writes need context
    // synchronization before instructions that depend on them).
    unsafe {
        core::arch::asm!("mrs {old}, vttbr_el2", "msr vttbr_el2, {new}", "isb", old = out(reg) old, new = in(reg) vttbr, options(nostack));
    }
    f();
    // SAFETY: puts back the value read above.
    unsafe { core::arch::asm!("msr vttbr_el2, {0}", "isb", in(reg) old, options(nostack)) };
}

impl TlbOps for HwTlb {
    fn flush_ipa(&mut self, vmid: Vmid, ipa: Ipa) {
        with_vttbr(vttbr_for(vmid), || {
            // SAFETY: TLB maintenance only drops cached translations. Sequence (ARM ARM D8.14,
            // "TLB maintenance requirements"): `dsb ishst` makes the descriptor store visible to
            // the walkers before the invalidation; `tlbi ipas2e1is` drops the stage-2 entry for
            // the IPA on all CPUs of the Inner Shareable domain; `dsb ish` completes it; then
            // `tlbi vmalle1is` drops combined stage-1+2 entries, which are tagged by VA and so
            // cannot be found by IPA; the final `dsb ish; isb` complete and synchronise.
            unsafe {
                core::arch::asm!(
                    "dsb ishst",
                    "tlbi ipas2e1is, {0}",
                    "dsb ish",
                    "tlbi vmalle1is",
                    "dsb ish",
                    "isb",
                    in(reg) ipa.0 >> 12,
                    options(nostack)
                );
            }
        });
    }

    fn flush_vmid(&mut self, vmid: Vmid) {
        with_vttbr(vttbr_for(vmid), || {
            // SAFETY: as above; `tlbi vmalls12e1is` drops every stage-1 and stage-2 entry of the
            // current VMID on all CPUs of the Inner Shareable domain.
            unsafe {
                core::arch::asm!(
                    "dsb ishst",
                    "tlbi vmalls12e1is",
                    "dsb ish",
                    "isb",
                    options(nostack)
                );
            }
        });
    }

    fn sync_tables(&mut self) {
        // SAFETY: a barrier: prior descriptor stores become visible to the table walkers before
        // a later store publishes a valid entry that reaches them (ARM ARM D8.2.6).
        unsafe { core::arch::asm!("dsb ishst", options(nostack)) };
    }
}
