//! The monitor's own EL2 stage-1 translation: an identity map built with `aarch64-paging`.
//! RAM is Normal write-back cacheable; the device window below RAM (GIC, UART, fw_cfg,
//! virtio-mmio, ...) is Device-nGnRE and never executable. Nothing else is mapped, so a stray
//! pointer faults instead of touching something by accident.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, Ordering};

use aarch64_cpu::registers::{Readable, ID_AA64MMFR0_EL1};
use aarch64_paging::descriptor::El23Attributes;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{El2, MemoryRegion};

/// MAIR_EL2 attribute index 0: Device-nGnRE.
const MAIR_DEVICE_NGNRE: u64 = 0x04;
/// MAIR_EL2 attribute index 1: Normal, inner/outer write-back, read- and write-allocate.
const MAIR_NORMAL_WB: u64 = 0xff;
const MAIR_VALUE: u64 = MAIR_DEVICE_NGNRE | (MAIR_NORMAL_WB << 8);

const NORMAL: El23Attributes = El23Attributes::ATTRIBUTE_INDEX_1
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::VALID)
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::USER_RES1);
const DEVICE: El23Attributes = El23Attributes::ATTRIBUTE_INDEX_0
    .union(El23Attributes::VALID)
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::USER_RES1)
    .union(El23Attributes::XN);

/// Virtual (= physical) address bits translated by the map: 39, so the walk starts at level 1.
const VA_BITS: u64 = 39;

/// Values every CPU programs into its MMU registers (set by the boot CPU, read by the others).
static TTBR0: AtomicU64 = AtomicU64::new(0);
static TCR: AtomicU64 = AtomicU64::new(0);

/// Builds the identity map for `device` (MMIO window) and `ram` ranges and turns the MMU and the
/// caches on for the calling CPU. Runs once, on the boot CPU, with the heap already usable.
pub fn init(device: (u64, u64), ram: &[(u64, u64)]) -> Result<(), aarch64_paging::MapError> {
    let mut idmap = IdMap::new(1, El2);
    idmap.map_range(
        &MemoryRegion::new(device.0 as usize, device.1 as usize),
        DEVICE,
    )?;
    for &(start, end) in ram {
        idmap.map_range(&MemoryRegion::new(start as usize, end as usize), NORMAL)?;
    }
    // The tables live for as long as the machine runs: every CPU uses them.
    let idmap = Box::leak(Box::new(idmap));
    // Mark the tables active without writing TTBR0_EL2 yet: `enable_on_this_cpu` does that
    // together with TCR and MAIR.
    idmap.mark_active();
    TTBR0.store(idmap.root_address().0 as u64, Ordering::SeqCst);

    // PS: the physical address size this CPU implements (ID_AA64MMFR0_EL1.PARange, capped at
    // 48 bits; 52-bit output addresses need FEAT_LPA descriptors that we do not use).
    let parange = ID_AA64MMFR0_EL1.get() & 0xf;
    let ps = parange.min(0b101);
    let tcr = (64 - VA_BITS)      // T0SZ
        | (0b01 << 8)             // IRGN0: inner write-back, write-allocate
        | (0b01 << 10)            // ORGN0: outer write-back, write-allocate
        | (0b11 << 12)            // SH0: inner shareable
        // TG0 (bits 15:14) = 0b00: 4 KiB granule
        | (ps << 16)              // PS
        | (1 << 23)               // RES1
        | (1 << 31); // RES1
    TCR.store(tcr, Ordering::SeqCst);
    enable_on_this_cpu();
    Ok(())
}

/// Programs MAIR/TCR/TTBR0 from the boot CPU's values and enables the MMU, the data cache and
/// the instruction cache on the calling CPU.
pub fn enable_on_this_cpu() {
    let ttbr = TTBR0.load(Ordering::SeqCst);
    let tcr = TCR.load(Ordering::SeqCst);
    // SCTLR_EL2 (non-VHE): RES1 bits 4, 5, 11, 16, 18, 22, 23, 28, 29; M (bit 0) MMU on,
    // C (bit 2) data cache, SA (bit 3) SP alignment check, I (bit 12) instruction cache.
    let sctlr: u64 = (1 << 4)
        | (1 << 5)
        | (1 << 11)
        | (1 << 16)
        | (1 << 18)
        | (1 << 22)
        | (1 << 23)
        | (1 << 28)
        | (1 << 29)
        | 1
        | (1 << 2)
        | (1 << 3)
        | (1 << 12);
    // SAFETY: the tables at `ttbr` identity-map all RAM (code, data, stacks, heap) and the device
    // window, so enabling translation does not change the meaning of any address the monitor uses.
    // Barriers: `dsb ish` completes the table writes before the walker may read them; `tlbi alle2`
    // drops any stale EL2 translation left by firmware; the `dsb ish; isb` after it completes the
    // invalidation and synchronises the new register values before SCTLR_EL2.M takes effect; the
    // final `isb` makes the instruction stream after it run translated (ARM ARM D8.13, "TLB
    // maintenance" and "Synchronization requirements for system registers").
    unsafe {
        core::arch::asm!(
            "msr mair_el2, {mair}",
            "msr tcr_el2, {tcr}",
            "msr ttbr0_el2, {ttbr}",
            "dsb ish",
            "tlbi alle2",
            "dsb ish",
            "isb",
            "msr sctlr_el2, {sctlr}",
            "isb",
            mair = in(reg) MAIR_VALUE,
            tcr = in(reg) tcr,
            ttbr = in(reg) ttbr,
            sctlr = in(reg) sctlr,
            options(nostack),
        );
    }
    // With the caches on: this CPU's cache geometry joins the system-wide view the cache
    // maintenance steps by.
    super::cache::note_this_cpu();
}

/// Discards any data-cache lines that cover `[start, end)`, so that data written there with the
/// MMU and caches off (non-cacheable) is not hidden behind stale lines once caches are on.
/// Invalidate (not clean): memory holds the truth and there is nothing dirty of ours to keep.
pub fn invalidate_dcache_range(start: u64, end: u64) {
    const LINE: u64 = 64; // smallest line size we assume (CTR_EL0.DminLine is >= 16 words)
    let mut addr = start & !(LINE - 1);
    while addr < end {
        // SAFETY: `dc ivac` only affects cache state for an address the caller owns; with the
        // MMU off all data accesses are non-cacheable, so no line of ours can be dirty.
        unsafe { core::arch::asm!("dc ivac, {0}", in(reg) addr, options(nostack)) };
        addr += LINE;
    }
    // SAFETY: a barrier has no effect but ordering: the invalidations complete before later
    // memory accesses (ARM ARM: cache maintenance completes with a DSB).
    unsafe { core::arch::asm!("dsb ish", options(nostack)) };
}
