//! `cowcheck`: proves that after a vmfork fork, parent and child each see only their own
//! writes, on every CPU, in data and in code.
//!
//! Phase 1: every CPU fills its slice of an `mib=N` MiB region with the version-0 pattern and
//! checks a neighbour's slice. The boot CPU writes a two-instruction function (`mov w0, #42;
//! ret`) into a page of its own and calls it. Then the boot CPU forks the VM through the vmfork
//! hypercall while the other CPUs spin on a shared phase variable, so they are forked
//! mid-loop. Phase 2, in both VMs at once: every CPU rewrites its slice (except every fourth
//! page) with its VM's pattern (parent 1, child 2), then checks a neighbour's slice holds this
//! VM's pattern and the untouched pages still hold version 0; the boot CPU patches the
//! function's immediate (43 in the parent, 44 in the child) and checks the call returns it.
//!
//! Without the vmfork monitor the fork is not supported: the guest says so after phase 1 and
//! powers off cleanly. `simulate=parent` or `simulate=child` skips the hypercall and runs
//! phase 2 as that side (made-up identity), so the rest of the checker runs on plain QEMU too.
//! The MMU stays off (see the README for why).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::arch::asm;
    use core::cell::UnsafeCell;
    use core::ptr::{read_volatile, write_volatile};
    use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use vmfork_guests::cow::{
        code_value, cpu_slice, expected_version_after_fork, is_untouched_page, movz_w0,
        versioned_pattern, which_version, CODE_VALUE_BEFORE_FORK, PAGE_SIZE, RET,
        VERSION_BEFORE_FORK, VERSION_CHILD, VERSION_PARENT,
    };
    use vmfork_guests::pattern::region;
    use vmfork_guests::psci_abi::PsciError;
    use vmfork_guests::vmfork_abi::{ForkOutcome, Identity};
    use vmfork_guests::{exit, fail, println, psci, runtime, smp, timer, BootInfo, MAX_CPUS};

    /// Region size when the bootargs do not say.
    const DEFAULT_MIB: u64 = 4;
    /// How long the boot CPU waits for the other CPUs at a step, in milliseconds.
    const WAIT_TIMEOUT_MS: u64 = 60_000;

    /// `PHASE` values: CPUs are filling and checking the region before the fork.
    const PHASE_BEFORE_FORK: usize = 0;
    /// The boot CPU has forked (this VM's `VERSION` is set): rewrite and check.
    const PHASE_AFTER_FORK: usize = 1;
    /// The fork is not supported: stop.
    const PHASE_STOP: usize = 2;

    /// What the secondaries spin on across the fork.
    static PHASE: AtomicUsize = AtomicUsize::new(PHASE_BEFORE_FORK);
    /// This VM's pattern version after the fork; valid once `PHASE` is `PHASE_AFTER_FORK`.
    static VERSION: AtomicU64 = AtomicU64::new(VERSION_BEFORE_FORK);
    /// Region start and size in pages, and the number of worker CPUs: set before any secondary
    /// starts.
    static REGION_START: AtomicU64 = AtomicU64::new(0);
    static REGION_PAGES: AtomicU64 = AtomicU64::new(0);
    static WORKERS: AtomicU64 = AtomicU64::new(0);
    /// Worker slot of each DTB CPU index (slot 0 is the boot CPU).
    static SLOT_OF: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

    /// Per-step counts of CPUs that finished the step.
    static FILLED: AtomicUsize = AtomicUsize::new(0);
    static CHECKED_BEFORE: AtomicUsize = AtomicUsize::new(0);
    static WRITTEN_AFTER: AtomicUsize = AtomicUsize::new(0);
    static CHECKED_AFTER: AtomicUsize = AtomicUsize::new(0);
    static STOPPED: AtomicUsize = AtomicUsize::new(0);

    /// A page of its own for the patched function, so writing it copies only that page.
    #[repr(C, align(4096))]
    struct CodePage(UnsafeCell<[u32; 1024]>);

    // SAFETY: only the boot CPU touches the page, through raw pointers.
    unsafe impl Sync for CodePage {}

    static CODE: CodePage = CodePage(UnsafeCell::new([0; 1024]));

    /// The words of worker `slot`'s pages, as (page number, address range).
    fn slice_pages(slot: usize) -> core::ops::Range<u64> {
        let pages = REGION_PAGES.load(Ordering::Acquire);
        let workers = WORKERS.load(Ordering::Acquire);
        match cpu_slice(pages, workers, slot as u64) {
            Some((first, end)) => first..end,
            None => fail!("cowcheck: FAIL worker slot {slot} out of {workers}"),
        }
    }

    fn page_addr(page: u64) -> u64 {
        REGION_START.load(Ordering::Acquire) + page * PAGE_SIZE
    }

    /// Writes pattern `version` over worker `slot`'s pages; `skip_untouched` leaves the pages
    /// that must keep their phase-1 contents alone.
    fn fill(slot: usize, version: u64, skip_untouched: bool) {
        for page in slice_pages(slot) {
            if skip_untouched && is_untouched_page(page) {
                continue;
            }
            let base = page_addr(page);
            for addr in (base..base + PAGE_SIZE).step_by(8) {
                // SAFETY: the page is inside the region from the DTB memory node, above the
                // image, used by nothing else; slices are disjoint, so only this CPU writes
                // it; addr is 8-byte aligned (MMU off: Device memory needs aligned accesses).
                unsafe { write_volatile(addr as *mut u64, versioned_pattern(addr, version)) };
            }
        }
    }

    /// Checks worker `slot`'s pages: page `p` must hold pattern `expected(p)` in every word.
    fn check(me: usize, slot: usize, expected: impl Fn(u64) -> u64) {
        for page in slice_pages(slot) {
            let version = expected(page);
            let base = page_addr(page);
            for addr in (base..base + PAGE_SIZE).step_by(8) {
                // SAFETY: as in fill(); reads only.
                let got = unsafe { read_volatile(addr as *const u64) };
                let want = versioned_pattern(addr, version);
                if got != want {
                    let whose = which_version(addr, got).map_or(-1, |v| v as i64);
                    fail!(
                        "cowcheck: FAIL worker {me} at {addr:#x} expected {want:#018x} (pattern \
                         {version}) got {got:#018x} (pattern {whose})"
                    );
                }
            }
        }
    }

    /// Adds this CPU to `counter` and waits until every worker has. The boot CPU gives up
    /// (and fails the run) after [`WAIT_TIMEOUT_MS`]; the others wait as long as it takes.
    fn arrive_and_wait(counter: &AtomicUsize, step: &str, timeout: bool) {
        counter.fetch_add(1, Ordering::AcqRel);
        wait_count(
            counter,
            WORKERS.load(Ordering::Acquire) as usize,
            step,
            timeout,
        );
    }

    fn wait_count(counter: &AtomicUsize, target: usize, step: &str, timeout: bool) {
        let start = timer::now();
        let limit = timer::ticks_from_ms(WAIT_TIMEOUT_MS);
        loop {
            let n = counter.load(Ordering::Acquire);
            if n >= target {
                return;
            }
            if timeout && timer::now().wrapping_sub(start) > limit {
                fail!(
                    "cowcheck: FAIL only {n} of {target} cpus finished {step} within \
                     {WAIT_TIMEOUT_MS} ms"
                );
            }
            core::hint::spin_loop();
        }
    }

    fn neighbour(slot: usize) -> usize {
        (slot + 1) % WORKERS.load(Ordering::Acquire) as usize
    }

    /// Phase 1 on one CPU: fill the own slice with version 0, check the neighbour's.
    fn before_fork(slot: usize, is_boot: bool) {
        fill(slot, VERSION_BEFORE_FORK, false);
        arrive_and_wait(&FILLED, "filling", is_boot);
        check(slot, neighbour(slot), |_| VERSION_BEFORE_FORK);
        CHECKED_BEFORE.fetch_add(1, Ordering::AcqRel);
    }

    /// Phase 2 on one CPU: rewrite the own slice with this VM's version (untouched pages
    /// aside), then check the neighbour's slice.
    fn after_fork(slot: usize, version: u64, is_boot: bool) {
        fill(slot, version, true);
        arrive_and_wait(&WRITTEN_AFTER, "rewriting", is_boot);
        check(slot, neighbour(slot), |page| {
            expected_version_after_fork(page, version)
        });
        CHECKED_AFTER.fetch_add(1, Ordering::AcqRel);
    }

    fn secondary(index: usize) -> ! {
        let slot = SLOT_OF.get(index).map_or(0, |s| s.load(Ordering::Acquire));
        if slot == 0 {
            fail!("cowcheck: FAIL cpu {index} started without a worker slot");
        }
        before_fork(slot, false);
        // Spin here across the fork: in both VMs this CPU goes on reading its own VM's PHASE.
        let phase = loop {
            let p = PHASE.load(Ordering::Acquire);
            if p != PHASE_BEFORE_FORK {
                break p;
            }
            core::hint::spin_loop();
        };
        if phase == PHASE_AFTER_FORK {
            after_fork(slot, VERSION.load(Ordering::Acquire), false);
        } else {
            STOPPED.fetch_add(1, Ordering::AcqRel);
        }
        let err = psci::cpu_off();
        fail!("cowcheck: FAIL cpu {index} CPU_OFF returned: {err}")
    }

    /// Writes `mov w0, #value; ret` at the start of the code page, makes it visible to
    /// instruction fetch (clean to PoU, invalidate the I-cache line) and calls it.
    fn patch_and_call(value: u16) -> u32 {
        let page = CODE.0.get().cast::<u32>();
        // SAFETY: CODE is a 4 KiB static only this (boot) CPU uses; the two words are in
        // bounds and aligned.
        unsafe {
            write_volatile(page, movz_w0(value));
            write_volatile(page.add(1), RET);
        }
        // SAFETY: cache maintenance by VA on a mapped (identity, MMU off) address of our own
        // page; the barriers order it before the instruction fetch (Arm ARM B2.4.4, "Concurrent
        // modification and execution of instructions", the single-PE sequence).
        unsafe {
            asm!(
                "dc cvau, {a}",
                "dsb ish",
                "ic ivau, {a}",
                "dsb ish",
                "isb",
                a = in(reg) page,
                options(nostack, preserves_flags)
            );
        }
        // SAFETY: the page now holds a complete AAPCS64 function taking nothing and returning
        // w0, made visible to instruction fetch above; with the MMU off RAM is executable.
        let f: extern "C" fn() -> u32 =
            unsafe { core::mem::transmute::<*mut u32, extern "C" fn() -> u32>(page) };
        f()
    }

    fn check_code(value: u16) {
        let got = patch_and_call(value);
        if got != u32::from(value) {
            fail!("cowcheck: FAIL code returned {got}, expected {value}");
        }
    }

    /// This VM's identity: from the monitor, or made up for a simulated fork (parent vm=1,
    /// child vm=2).
    fn identity(simulated: bool, version: u64) -> Result<Identity, PsciError> {
        if !simulated {
            return runtime::identity();
        }
        Ok(if version == VERSION_PARENT {
            Identity {
                vm: 1,
                parent: None,
                generation: 0,
                resets: 0,
            }
        } else {
            Identity {
                vm: 2,
                parent: Some(1),
                generation: 1,
                resets: 0,
            }
        })
    }

    fn main(boot: &'static BootInfo) -> ! {
        let args = &boot.platform.bootargs;
        let mib = match args.get_u64("mib") {
            Ok(v) => v.unwrap_or(DEFAULT_MIB),
            Err(e) => fail!("cowcheck: FAIL {e}"),
        };
        let dtb_cpus = boot.platform.cpus().len();
        let cpus = match args.get_u64("cpus") {
            Ok(None) => dtb_cpus,
            Ok(Some(n)) if (1..=dtb_cpus as u64).contains(&n) => n as usize,
            Ok(Some(n)) => fail!("cowcheck: FAIL cpus={n}: the DTB has {dtb_cpus} cpus"),
            Err(e) => fail!("cowcheck: FAIL {e}"),
        };
        let simulate = match args.get("simulate") {
            None => None,
            Some("parent") => Some(ForkOutcome::Parent { child: 2 }),
            Some("child") => Some(ForkOutcome::Child),
            Some(other) => fail!("cowcheck: FAIL simulate={other:?}: expected parent or child"),
        };
        let (start, end) = match region(mib, boot.image_end, boot.platform.memory()) {
            Ok(r) => r,
            Err(e) => fail!("cowcheck: FAIL {e}"),
        };
        // At least 1 MiB (256 pages) and at most MAX_CPUS (16) workers: every slice has 16
        // pages, four of them untouched after the fork.
        REGION_START.store(start, Ordering::Release);
        REGION_PAGES.store((end - start) / PAGE_SIZE, Ordering::Release);
        WORKERS.store(cpus as u64, Ordering::Release);

        let others = (0..dtb_cpus).filter(|&i| i != boot.boot_cpu).take(cpus - 1);
        for (n, index) in others.enumerate() {
            match SLOT_OF.get(index) {
                Some(slot) => slot.store(n + 1, Ordering::Release),
                None => fail!("cowcheck: FAIL cpu index {index} beyond {MAX_CPUS}"),
            }
            if let Err(e) = smp::start_cpu(index, secondary) {
                fail!("cowcheck: FAIL starting cpu {index}: {e}");
            }
        }

        before_fork(0, true);
        wait_count(&CHECKED_BEFORE, cpus, "checking before the fork", true);
        println!("cowcheck: filled mib={mib} cpus={cpus}");
        check_code(CODE_VALUE_BEFORE_FORK);

        let forked = match simulate {
            Some(outcome) => Ok(outcome),
            None => runtime::fork(),
        };
        let version = match forked {
            Err(PsciError::NotSupported) => {
                println!("cowcheck: fork not supported (-1)");
                PHASE.store(PHASE_STOP, Ordering::Release);
                wait_count(&STOPPED, cpus - 1, "stopping", true);
                exit::power_off()
            }
            Err(e) => fail!("cowcheck: FAIL fork: {e}"),
            Ok(ForkOutcome::Parent { child }) => {
                let me = match identity(simulate.is_some(), VERSION_PARENT) {
                    Ok(id) => id,
                    Err(e) => fail!("cowcheck: FAIL identity in the parent: {e}"),
                };
                if me.vm == child {
                    fail!("cowcheck: FAIL parent and child are both vm={child}");
                }
                println!("cowcheck: parent vm={} child={child}", me.vm);
                VERSION_PARENT
            }
            Ok(ForkOutcome::Child) => {
                let me = match identity(simulate.is_some(), VERSION_CHILD) {
                    Ok(id) => id,
                    Err(e) => fail!("cowcheck: FAIL identity in the child: {e}"),
                };
                let Some(parent) = me.parent else {
                    fail!("cowcheck: FAIL the child has no parent: {me}");
                };
                if me.generation == 0 || parent == me.vm {
                    fail!("cowcheck: FAIL bad child identity: {me}");
                }
                println!(
                    "cowcheck: child vm={} parent={parent} generation={}",
                    me.vm, me.generation
                );
                VERSION_CHILD
            }
        };
        VERSION.store(version, Ordering::Release);
        PHASE.store(PHASE_AFTER_FORK, Ordering::Release);

        after_fork(0, version, true);
        wait_count(&CHECKED_AFTER, cpus, "checking after the fork", true);
        let value = code_value(version);
        check_code(value);
        println!("cowcheck: code ok value={value}");
        if version == VERSION_PARENT {
            println!("cowcheck: parent ok");
        } else {
            println!("cowcheck: child ok");
        }
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("cowcheck is an aarch64-unknown-none guest image; run it under QEMU");
}
