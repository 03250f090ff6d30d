//! Cache and TLB maintenance for stage 2.
//!
//! What the caches look like is read from the hardware once per CPU, as it comes up
//! ([`note_this_cpu`], from `mmu::enable_on_this_cpu`), and merged into one system-wide view:
//! the smallest data-cache line of any CPU (CTR_EL0.DminLine), whether every CPU has
//! CTR_EL0.DIC (instruction-cache invalidation not required for data-to-instruction
//! coherence), and the DC ZVA block (DCZID_EL0) if every CPU allows DC ZVA at EL2. That is what
//! the maintenance loops step by: a fixed 64 would skip lines on a CPU with 16- or 32-byte lines
//! (QEMU's `max` CPU reports 64, so only real hardware can tell the difference), and on a
//! big.LITTLE machine one CPU's line can be smaller than another's (Linux merges CTR_EL0 the same
//! way).

use core::sync::atomic::{AtomicU64, Ordering};

use vmfork_core::addr::{Ipa, PhysAddr};
use vmfork_core::stage2::{TlbOps, Vmid};

/// The merged view, packed: bit 63 set once a CPU has been noted; bits 0-7 log2 of the smallest
/// data-cache line in bytes; bit 8 every CPU has CTR_EL0.DIC; bits 16-23 log2 of the smallest
/// DC ZVA block in bytes, or [`NO_ZVA`] when some CPU prohibits DC ZVA at EL2 (DCZID_EL0.DZP).
static CACHES: AtomicU64 = AtomicU64::new(0);
const NOTED: u64 = 1 << 63;
const DIC: u64 = 1 << 8;
const NO_ZVA: u64 = 0xff;

fn read_ctr() -> u64 {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 at EL2 has no side effect.
    unsafe { core::arch::asm!("mrs {0}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    ctr
}

/// This CPU's caches in the packed form of [`CACHES`].
fn this_cpu() -> u64 {
    let ctr = read_ctr();
    let dczid: u64;
    // SAFETY: reading DCZID_EL0 has no side effect.
    unsafe { core::arch::asm!("mrs {0}, dczid_el0", out(reg) dczid, options(nomem, nostack)) };
    let dline = vmfork_core::idregs::dcache_line_bytes(ctr).trailing_zeros() as u64;
    // CTR_EL0.DIC is bit 29; DCZID_EL0.DZP is bit 4 and BS (bits 3:0) is log2 of the block in
    // 4-byte words.
    let dic = if ctr >> 29 & 1 == 1 { DIC } else { 0 };
    let zva = if dczid >> 4 & 1 == 1 {
        NO_ZVA
    } else {
        (dczid & 0xf) + 2
    };
    NOTED | dline | dic | zva << 16
}

/// Merges the calling CPU's cache geometry into the system-wide view. Every CPU calls it once,
/// with its MMU and caches on, before it runs any guest or copies any frame.
pub fn note_this_cpu() {
    let mine = this_cpu();
    let _ = CACHES.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
        if old & NOTED == 0 {
            return Some(mine);
        }
        let dline = (old & 0xff).min(mine & 0xff);
        let dic = old & mine & DIC;
        let zva = (old >> 16 & 0xff).min(mine >> 16 & 0xff);
        let zva = if (old >> 16 & 0xff) == NO_ZVA || (mine >> 16 & 0xff) == NO_ZVA {
            NO_ZVA
        } else {
            zva
        };
        Some(NOTED | dline | dic | zva << 16)
    });
}

fn caches() -> u64 {
    let c = CACHES.load(Ordering::Relaxed);
    // Before the first CPU is noted (nothing copies frames that early), this CPU's own values.
    if c & NOTED != 0 {
        c
    } else {
        this_cpu()
    }
}

/// The smallest data-cache line size in bytes, which the maintenance loops step by.
pub fn dcache_line() -> u64 {
    1 << (caches() & 0xff)
}

/// The DC ZVA block size in bytes, or `None` when DC ZVA may not be used at EL2.
pub fn zva_block() -> Option<u64> {
    let z = caches() >> 16 & 0xff;
    (z != NO_ZVA).then_some(1 << z)
}

/// Whether every CPU reports CTR_EL0.DIC = 1: instruction caches need no invalidation for
/// data-to-instruction coherence (ARM ARM D7.5.9; the D-side clean is still needed unless IDC,
/// and the frame code always cleans to the PoC anyway, for guests with their MMU off).
pub fn icache_coherent() -> bool {
    caches() & DIC != 0
}

/// Makes instructions that the monitor wrote into guest memory, and already cleaned from the
/// data cache (to the PoC, which includes the PoU) with a DSB ISH completing it, visible to
/// instruction fetch on every CPU: `IC IALLUIS` (not `IC IVAU` by the monitor's VA: a VIPT
/// instruction cache may hold the guest's lines under other VAs), `DSB ISH` to complete it,
/// `ISB` (ARM ARM D7.5.9, "data and instruction cache coherency": DC CVAU, DSB, IC, DSB, ISB).
/// With CTR_EL0.DIC = 1 on every CPU the instruction cache is coherent and only the ISB stays.
pub fn sync_icache_after_clean() {
    if icache_coherent() {
        // SAFETY: a context synchronization event only.
        unsafe { core::arch::asm!("isb", options(nostack)) };
    } else {
        // SAFETY: instruction-cache invalidation and barriers only affect caches and ordering.
        unsafe { core::arch::asm!("ic ialluis", "dsb ish", "isb", options(nostack)) };
    }
}

/// Cleans `[pa, pa + len)` from the data cache to the point of coherency and makes it visible to
/// instruction fetch, so that code the monitor wrote into guest memory through its cacheable
/// map is what a guest fetches, with its MMU and caches off or on: one pass of `DC CVAC` (to the
/// PoC, not only the PoU, for a guest whose MMU is off), `DSB ISH`, then
/// [`sync_icache_after_clean`].
pub fn sync_for_guest_exec(pa: PhysAddr, len: u64) {
    let line = dcache_line();
    let mut addr = pa.0 & !(line - 1);
    let end = pa.0 + len;
    while addr < end {
        // SAFETY: cleaning a line of RAM the monitor maps has no effect on its contents.
        unsafe { core::arch::asm!("dc cvac, {0}", in(reg) addr, options(nostack)) };
        addr += line;
    }
    // SAFETY: a barrier: the cleans complete before the instruction-cache maintenance (ARM ARM
    // D7.5.9).
    unsafe { core::arch::asm!("dsb ish", options(nostack)) };
    sync_icache_after_clean();
}

/// Cleans and invalidates `[pa, pa + len)` in the data cache to the point of coherency
/// (`DC CIVAC` per line, then `DSB ISH`), so that memory holds what the monitor last wrote
/// there through its cacheable map and no line of the range stays in the caches.
///
/// Why (ARM ARM B2.16, "Mismatched memory attributes", and D7.5.9): the monitor reads and
/// writes guest frames through its identity map as Normal Inner/Outer Write-Back memory, while
/// a guest running with its stage-1 MMU off makes its data accesses Device-nGnRnE (stage 2's
/// Normal Write-Back combines to the more restrictive type, so they stay non-cacheable), and
/// they go straight to memory past the caches; so do a guest's Non-cacheable mappings. Without
/// maintenance such a guest reads memory behind the monitor's dirty lines: stale data, or what
/// another VM had in the frame before it was zeroed or copied. Cleaning to the PoC after the
/// host writes a frame makes the frame's new contents visible to the guest's non-cacheable
/// reads; invalidating as well means no clean copy of the old contents stays in the cache for
/// the monitor to read later instead of what the guest writes non-cacheably (and for the same
/// reason a source frame is cleaned and invalidated before the monitor reads it,
/// [`clean_inval_before_read`]).
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

    fn flush_all(&mut self) {
        // SAFETY: TLB maintenance only drops cached translations. `tlbi alle1is` invalidates
        // every entry of the EL1&0 translation regime, stage 1 and stage 2, of every VMID, on
        // every CPU of the Inner Shareable domain (ARM ARM DDI 0487, C5.5 "TLBI ALLE1IS", and
        // D8.16: a VMID may be reused once the invalidation of its old entries is complete);
        // `dsb ish` completes it on all of them, `isb` synchronises this CPU. The monitor's own
        // EL2 stage 1 is not touched. With HCR_EL2.FB and BSU set while a guest runs, the
        // guest's own TLB maintenance is broadcast too, so no CPU keeps entries this missed.
        // It needs no VMID in VTTBR_EL2.
        unsafe {
            core::arch::asm!(
                "dsb ishst",
                "tlbi alle1is",
                "dsb ish",
                "isb",
                options(nostack)
            );
        }
    }

    fn sync_tables(&mut self) {
        // SAFETY: a barrier: prior descriptor stores become visible to the table walkers before
        // a later store publishes a valid entry that reaches them (ARM ARM D8.2.6).
        unsafe { core::arch::asm!("dsb ishst", options(nostack)) };
    }
}
