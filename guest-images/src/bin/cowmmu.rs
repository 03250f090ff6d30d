//! `cowmmu`: copy-on-write with the guest's MMU on, on two CPUs, in parent and child at once.
//!
//! The boot CPU fills a 64-page region with the version-0 pattern (MMU off), builds an
//! identity stage-1 map (4 KiB granule, 39-bit VA: devices as one Device-nGnRnE block, RAM in
//! 2 MiB Normal write-back blocks, the region in 4 KiB pages of one level-3 table whose
//! descriptors have the Access flag clear when the CPU has FEAT_HAFDBS, TCR_EL1.HA set so the
//! table walker sets it), and both CPUs turn their MMU and caches on. The boot CPU reads the
//! first half of the region (its Access flags get set), then forks the VM while the other CPU
//! spins. After the fork, in both VMs at once, each CPU rewrites its half of the region with
//! this VM's version, page by page with a different kind of write: `STR`, `STP`, an LSE
//! `LDADD`, an `LDXR`/`STXR` loop, `DC ZVA` (the first write to a shared page copies it, and a
//! write by the table walker, setting an Access flag in the shared level-3 table, copies the
//! table); every eighth page stays untouched. Then each CPU checks every word of its half, and
//! the boot CPU checks the other half as well. Two pages are read by one VM only (one in the
//! parent, one in the child): with HA, each VM must see its own page's Access flag set and the
//! other's still clear, so the walker's writes went to the VM's own copy of the table.
//!
//! Prints `cowmmu: parent PASS ...` and `cowmmu: child PASS ...`, or `cowmmu: FAIL ...`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::arch::asm;
    use core::cell::UnsafeCell;
    use core::ptr::{read_volatile, write_volatile};
    use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use vmfork_guests::cow::{
        versioned_pattern, VERSION_BEFORE_FORK, VERSION_CHILD, VERSION_PARENT,
    };
    use vmfork_guests::hostile_abi::{effective_op, expected_word, page_op, PageOp};
    use vmfork_guests::vmfork_abi::ForkOutcome;
    use vmfork_guests::{exit, fail, println, psci, runtime, smp, timer, BootInfo};

    /// Pages in the region (one level-3 table covers 512).
    const PAGES: u64 = 64;
    const PAGE: u64 = 4096;
    const BLOCK_2M: u64 = 2 << 20;
    /// Pages read by one VM only after the fork, never written: the parent's and the child's.
    const PARENT_ONLY: u64 = PAGES - 2;
    const CHILD_ONLY: u64 = PAGES - 1;

    /// Stage-1 descriptor bits (VMSAv8-64, 4 KiB granule).
    const VALID: u64 = 1 << 0;
    const TABLE: u64 = 1 << 1; // table at levels 1-2, page at level 3
    const ATTR_DEVICE: u64 = 0 << 2; // MAIR_EL1 attribute 0: Device-nGnRnE
    const ATTR_NORMAL: u64 = 1 << 2; // MAIR_EL1 attribute 1: Normal write-back
    const INNER_SHAREABLE: u64 = 3 << 8;
    const AF: u64 = 1 << 10;
    const PXN_UXN: u64 = 3 << 53;

    #[repr(C, align(4096))]
    struct Table(UnsafeCell<[u64; 512]>);
    // SAFETY: written by the boot CPU before any other CPU uses them, then only by the table
    // walkers (Access flags) and read with volatile loads.
    unsafe impl Sync for Table {}

    static L1: Table = Table(UnsafeCell::new([0; 512]));
    static L2: Table = Table(UnsafeCell::new([0; 512]));
    static L3: Table = Table(UnsafeCell::new([0; 512]));

    static REGION: AtomicU64 = AtomicU64::new(0);
    static ZVA_BYTES: AtomicU64 = AtomicU64::new(0);
    static HA: AtomicU64 = AtomicU64::new(0);
    static LSE: AtomicU64 = AtomicU64::new(0);
    static TCR: AtomicU64 = AtomicU64::new(0);

    const PHASE_BEFORE: usize = 0;
    const PHASE_AFTER: usize = 1;
    const PHASE_STOP: usize = 2;
    static PHASE: AtomicUsize = AtomicUsize::new(PHASE_BEFORE);
    static VERSION: AtomicU64 = AtomicU64::new(VERSION_BEFORE_FORK);
    static MMU_ON: AtomicUsize = AtomicUsize::new(0);
    static WRITTEN: AtomicUsize = AtomicUsize::new(0);
    /// First failure of the other CPU (0 = none): the page it failed at + 1.
    static SECONDARY_FAILED: AtomicU64 = AtomicU64::new(0);

    fn page_addr(page: u64) -> u64 {
        REGION.load(Ordering::Acquire) + page * PAGE
    }

    fn l3_desc(page: u64) -> u64 {
        // SAFETY: an aligned read of a descriptor of our own table (the walker may write it
        // concurrently: a single-copy-atomic 64-bit load).
        unsafe { read_volatile(L3.0.get().cast::<u64>().add(page as usize)) }
    }

    /// Builds the identity map over `ram` (base, size) with the region in 4 KiB pages.
    fn build_tables(ram: (u64, u64), region: u64, ha: bool) {
        let l1 = L1.0.get().cast::<u64>();
        let l2 = L2.0.get().cast::<u64>();
        let l3 = L3.0.get().cast::<u64>();
        let ram_gib = ram.0 >> 30;
        // SAFETY: the tables are ours, not yet in use (the MMU is off); indices are < 512.
        unsafe {
            // 0..1 GiB: the devices (GIC, PL011, vmgenid page), never executable.
            write_volatile(l1, VALID | ATTR_DEVICE | AF | PXN_UXN);
            write_volatile(l1.add(ram_gib as usize), l2 as u64 | VALID | TABLE);
            for i in 0..512u64 {
                let pa = (ram_gib << 30) + i * BLOCK_2M;
                let d = if pa == region {
                    l3 as u64 | VALID | TABLE
                } else if pa >= ram.0 && pa + BLOCK_2M <= ram.0 + ram.1 {
                    pa | VALID | ATTR_NORMAL | INNER_SHAREABLE | AF
                } else {
                    0
                };
                write_volatile(l2.add(i as usize), d);
            }
            for i in 0..512u64 {
                let af = if ha { 0 } else { AF };
                let d = (region + i * PAGE) | VALID | TABLE | ATTR_NORMAL | INNER_SHAREABLE | af;
                write_volatile(l3.add(i as usize), d);
            }
        }
    }

    /// Cleans and invalidates `[start, start + len)` to the point of coherency: what was
    /// written with the MMU off (non-cacheable) is in memory, and no stale line stays for the
    /// cacheable accesses once the MMU is on (Arm ARM B2.16, mismatched attributes).
    fn clean_inval(start: u64, len: u64) {
        let mut a = start & !63;
        while a < start + len {
            // SAFETY: cache maintenance by VA (= PA, MMU off) of our own memory.
            unsafe { asm!("dc civac, {}", in(reg) a, options(nostack, preserves_flags)) };
            a += 64;
        }
        // SAFETY: a barrier.
        unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    }

    /// Turns this CPU's MMU and caches on with the tables built by the boot CPU.
    fn enable_mmu() {
        let mair: u64 = 0xff << 8; // attr 1 Normal WB RA/WA inner and outer; attr 0 Device-nGnRnE
        let ttbr = L1.0.get() as u64;
        let tcr = TCR.load(Ordering::Acquire);
        // SAFETY: the tables map this image, its stacks and the devices at their own
        // addresses, so execution goes on at the next instruction; the sequence follows the Arm
        // ARM (D8.2, enabling stage 1): tables visible (DSB), registers written, TLBs of this
        // CPU invalidated, ISB, then SCTLR_EL1.{M, C, I} and an ISB.
        unsafe {
            asm!(
                "msr mair_el1, {mair}",
                "msr tcr_el1, {tcr}",
                "msr ttbr0_el1, {ttbr}",
                "dsb ish",
                "isb",
                "tlbi vmalle1",
                "dsb nsh",
                "isb",
                "mrs {t}, sctlr_el1",
                "orr {t}, {t}, #1",        // M
                "orr {t}, {t}, #(1 << 2)", // C
                "orr {t}, {t}, #(1 << 12)", // I
                "msr sctlr_el1, {t}",
                "isb",
                mair = in(reg) mair,
                tcr = in(reg) tcr,
                ttbr = in(reg) ttbr,
                t = out(reg) _,
                options(nostack),
            );
        }
        MMU_ON.fetch_add(1, Ordering::AcqRel);
    }

    fn words(page: u64) -> impl Iterator<Item = u64> {
        let base = page_addr(page);
        (base..base + PAGE).step_by(8)
    }

    /// This VM's post-fork write of `page`.
    fn write_page(page: u64, version: u64) {
        let base = page_addr(page);
        let zva = ZVA_BYTES.load(Ordering::Acquire);
        let rest_from = match op_of(page) {
            PageOp::Untouched => return,
            PageOp::Store => base,
            PageOp::StorePair => {
                for a in (base..base + PAGE).step_by(16) {
                    let (x, y) = (
                        versioned_pattern(a, version),
                        versioned_pattern(a + 8, version),
                    );
                    // SAFETY: a store pair into our own region (16-byte aligned).
                    unsafe {
                        asm!("stp {x}, {y}, [{a}]", x = in(reg) x, y = in(reg) y, a = in(reg) a, options(nostack))
                    };
                }
                return;
            }
            PageOp::Atomic => {
                // SAFETY: an LSE atomic add to an aligned word of our own region.
                unsafe {
                    asm!(".arch_extension lse", "ldadd {v}, {o}, [{a}]", v = in(reg) version, o = out(reg) _, a = in(reg) base, options(nostack));
                }
                base + 8
            }
            PageOp::Exclusive => {
                let add = version << 8;
                // SAFETY: an exclusive read-modify-write of an aligned word of our own region;
                // the loop retries until the store-exclusive succeeds (an exception between
                // the two, such as the copy-on-write fault of the first store, clears the
                // monitor and makes it fail once).
                unsafe {
                    asm!(
                        "1: ldxr {t}, [{a}]",
                        "add {t}, {t}, {v}",
                        "stxr {s:w}, {t}, [{a}]",
                        "cbnz {s:w}, 1b",
                        t = out(reg) _,
                        s = out(reg) _,
                        a = in(reg) base,
                        v = in(reg) add,
                        options(nostack),
                    );
                }
                base + 8
            }
            PageOp::ZeroBlock => {
                // SAFETY: DC ZVA zeroes one naturally aligned block of our own region (the
                // page start is aligned to any block size up to 2 KiB).
                unsafe { asm!("dc zva, {}", in(reg) base, options(nostack)) };
                base + zva
            }
        };
        for a in (rest_from..base + PAGE).step_by(8) {
            // SAFETY: our own region, aligned.
            unsafe { write_volatile(a as *mut u64, versioned_pattern(a, version)) };
        }
    }

    /// The operation this CPU does on `page` ([`effective_op`]).
    fn op_of(page: u64) -> PageOp {
        effective_op(
            page,
            LSE.load(Ordering::Acquire) != 0,
            ZVA_BYTES.load(Ordering::Acquire),
        )
    }

    /// Checks `page` after this VM wrote it with `version`; the first wrong word on failure.
    fn check_page(page: u64, version: u64) -> Result<(), (u64, u64, u64)> {
        let base = page_addr(page);
        let zva = ZVA_BYTES.load(Ordering::Acquire);
        let op = op_of(page);
        for a in (base..base + PAGE).step_by(8) {
            // SAFETY: our own region, aligned.
            let got = unsafe { read_volatile(a as *const u64) };
            let want = expected_word(a, base, op, version, zva);
            if got != want {
                return Err((a, got, want));
            }
        }
        Ok(())
    }

    fn secondary(_index: usize) -> ! {
        enable_mmu();
        let phase = loop {
            let p = PHASE.load(Ordering::Acquire);
            if p != PHASE_BEFORE {
                break p;
            }
            core::hint::spin_loop();
        };
        if phase == PHASE_AFTER {
            let version = VERSION.load(Ordering::Acquire);
            for page in PAGES / 2..PARENT_ONLY {
                write_page(page, version);
            }
            for page in PAGES / 2..PARENT_ONLY {
                if check_page(page, version).is_err() {
                    SECONDARY_FAILED.store(page + 1, Ordering::Release);
                    break;
                }
            }
            WRITTEN.fetch_add(1, Ordering::AcqRel);
        }
        let e = psci::cpu_off();
        fail!("cowmmu: FAIL cpu 1 CPU_OFF returned {e}")
    }

    fn wait(what: &str, done: impl Fn() -> bool) {
        let start = timer::now();
        while !done() {
            if timer::now().wrapping_sub(start) > timer::ticks_from_ms(60_000) {
                fail!("cowmmu: FAIL waiting for {what}");
            }
            core::hint::spin_loop();
        }
    }

    fn main(boot: &'static BootInfo) -> ! {
        let p = &boot.platform;
        if p.cpus().len() < 2 {
            fail!("cowmmu: FAIL needs 2 cpus");
        }
        let Some(ram) = p.memory_containing(boot.image_end) else {
            fail!("cowmmu: FAIL the image is not in RAM");
        };
        let region = (boot.image_end + BLOCK_2M - 1) & !(BLOCK_2M - 1);
        if region + BLOCK_2M > ram.end() || ram.base & (BLOCK_2M - 1) != 0 {
            fail!(
                "cowmmu: FAIL no 2 MiB block free for the region above {:#x}",
                boot.image_end
            );
        }
        REGION.store(region, Ordering::Release);
        let (mmfr0, mmfr1, isar0, dczid): (u64, u64, u64, u64);
        // SAFETY: reading ID registers has no side effects.
        unsafe {
            asm!("mrs {}, id_aa64mmfr0_el1", out(reg) mmfr0, options(nomem, nostack));
            asm!("mrs {}, id_aa64mmfr1_el1", out(reg) mmfr1, options(nomem, nostack));
            asm!("mrs {}, id_aa64isar0_el1", out(reg) isar0, options(nomem, nostack));
            asm!("mrs {}, dczid_el0", out(reg) dczid, options(nomem, nostack));
        }
        let ha = mmfr1 & 0xf >= 1;
        let lse = (isar0 >> 20) & 0xf >= 2;
        let zva = if dczid & (1 << 4) != 0 {
            0
        } else {
            4u64 << (dczid & 0xf)
        };
        HA.store(ha as u64, Ordering::Release);
        LSE.store(lse as u64, Ordering::Release);
        ZVA_BYTES.store(zva, Ordering::Release);
        // T0SZ = 25 (39-bit VA, walks start at level 1), inner/outer write-back walks, inner
        // shareable, 4 KiB granule, no TTBR1 walks (EPD1), IPS = PARange (at most 48 bits),
        // HA when the CPU has FEAT_HAFDBS.
        let ips = (mmfr0 & 0xf).min(5);
        let tcr = 25 | 1 << 8 | 1 << 10 | 3 << 12 | 1 << 23 | ips << 32 | (ha as u64) << 39;
        TCR.store(tcr, Ordering::Release);

        // Version 0 over the region, MMU off.
        for page in 0..PAGES {
            for a in words(page) {
                // SAFETY: the region is RAM above the image, used by nothing else.
                unsafe { write_volatile(a as *mut u64, versioned_pattern(a, VERSION_BEFORE_FORK)) };
            }
        }
        build_tables((ram.base, ram.size), region, ha);
        clean_inval(region, PAGES * PAGE);
        clean_inval(L1.0.get() as u64, 3 * PAGE);
        if let Err(e) = smp::start_cpu(1, secondary) {
            fail!("cowmmu: FAIL starting cpu 1: {e}");
        }
        enable_mmu();
        wait("cpu 1's MMU", || MMU_ON.load(Ordering::Acquire) == 2);
        // The boot CPU's half is read through the MMU before the fork (its Access flags set);
        // the other half's flags stay clear until after the fork.
        for page in 0..PAGES / 2 {
            for a in words(page) {
                // SAFETY: our region, aligned.
                let got = unsafe { read_volatile(a as *const u64) };
                if got != versioned_pattern(a, VERSION_BEFORE_FORK) {
                    fail!("cowmmu: FAIL before the fork at {a:#x}: {got:#x}");
                }
            }
        }
        if ha && (l3_desc(0) & AF == 0 || l3_desc(PAGES / 2) & AF != 0) {
            fail!(
                "cowmmu: FAIL Access flags before the fork: page 0 {:#x}, page {} {:#x}",
                l3_desc(0),
                PAGES / 2,
                l3_desc(PAGES / 2)
            );
        }
        println!("cowmmu: mmu on ha={ha} lse={lse} zva={zva} region={region:#x}");

        let (side, version) = match runtime::fork() {
            Ok(ForkOutcome::Parent { .. }) => ("parent", VERSION_PARENT),
            Ok(ForkOutcome::Child) => ("child", VERSION_CHILD),
            Err(e) => {
                PHASE.store(PHASE_STOP, Ordering::Release);
                println!("cowmmu: fork not supported ({e})");
                exit::power_off()
            }
        };
        VERSION.store(version, Ordering::Release);
        PHASE.store(PHASE_AFTER, Ordering::Release);
        for page in 0..PAGES / 2 {
            write_page(page, version);
        }
        // One page read by this VM only: its Access flag is set by this VM's walker.
        let (mine, theirs) = if version == VERSION_PARENT {
            (PARENT_ONLY, CHILD_ONLY)
        } else {
            (CHILD_ONLY, PARENT_ONLY)
        };
        // SAFETY: our region, aligned.
        let first = unsafe { read_volatile(page_addr(mine) as *const u64) };
        if first != versioned_pattern(page_addr(mine), VERSION_BEFORE_FORK) {
            fail!("cowmmu: {side} FAIL page {mine} reads {first:#x}");
        }
        wait("cpu 1's writes", || WRITTEN.load(Ordering::Acquire) == 1);
        let failed = SECONDARY_FAILED.load(Ordering::Acquire);
        if failed != 0 {
            fail!("cowmmu: {side} FAIL cpu 1's check of page {}", failed - 1);
        }
        for page in 0..PARENT_ONLY {
            if let Err((a, got, want)) = check_page(page, version) {
                fail!(
                    "cowmmu: {side} FAIL page {page} ({:?}) at {a:#x}: {got:#x}, expected {want:#x}",
                    page_op(page)
                );
            }
        }
        // The own read-only page still holds version 0 (the other VM's one is not read: that
        // would set its Access flag).
        for a in words(mine) {
            // SAFETY: our region, aligned.
            let got = unsafe { read_volatile(a as *const u64) };
            if got != versioned_pattern(a, VERSION_BEFORE_FORK) {
                fail!("cowmmu: {side} FAIL page {mine} at {a:#x}: {got:#x}");
            }
        }
        if ha {
            let (m, t) = (l3_desc(mine), l3_desc(theirs));
            if m & AF == 0 || t & AF != 0 {
                fail!(
                    "cowmmu: {side} FAIL Access flags: own page {mine} {m:#x}, the other VM's page {theirs} {t:#x}"
                );
            }
            for page in 0..PARENT_ONLY {
                let d = l3_desc(page);
                if d & AF == 0 {
                    fail!("cowmmu: {side} FAIL page {page} accessed but its Access flag is clear: {d:#x}");
                }
            }
        }
        println!("cowmmu: {side} PASS pages={PAGES} ha={ha} lse={lse} zva={zva}");
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("cowmmu is an aarch64-unknown-none guest image; run it under QEMU");
}
