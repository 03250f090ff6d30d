//! `smp`: starts every CPU in the DTB with PSCI `CPU_ON`, one at a time so the output order is
//! fixed; each sets up its GIC redistributor, takes one interrupt from its own virtual timer
//! and reports its MPIDR. Then all CPUs hammer a shared lock-protected counter to check
//! that the spin lock (exclusive accesses) works across CPUs, and the boot CPU powers off.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use vmfork_guests::{
        boot_info, exit, fail, gic, println, psci, smp, sysreg, timer, BootInfo, MAX_CPUS,
    };

    /// Increments each CPU makes to the shared counter.
    const LOCK_ROUNDS: u64 = 10_000;
    /// How long to wait for a CPU to come up, in milliseconds.
    const START_TIMEOUT_MS: u64 = 5_000;

    /// CPUs that printed their line (the boot CPU included).
    static UP: AtomicUsize = AtomicUsize::new(0);
    /// Set by the boot CPU once every CPU is up: starts the lock phase.
    static GO: AtomicBool = AtomicBool::new(false);
    /// CPUs that finished the lock phase.
    static DONE: AtomicUsize = AtomicUsize::new(0);
    /// The shared counter; a plain u64 behind the lock.
    static COUNTER: spin::Mutex<u64> = spin::Mutex::new(0);

    /// Per CPU: its own virtual timer interrupt arrived.
    static TIMER_SEEN: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

    fn on_timer(_intid: u32) {
        timer::disable();
        if let Some(seen) = smp::current_cpu_index().and_then(|i| TIMER_SEEN.get(i)) {
            seen.store(true, Ordering::Release);
        }
    }

    /// Brings up this CPU's redistributor and CPU interface and waits for one interrupt from
    /// this CPU's virtual timer (PPI 27), proving per-CPU interrupt delivery.
    fn timer_check(index: usize) {
        if let Err(e) = gic::init_cpu() {
            fail!("smp: FAIL cpu {index}: {e}");
        }
        if let Err(e) = gic::enable_ppi(timer::VIRTUAL_TIMER_INTID, gic::DEFAULT_PRIORITY) {
            fail!("smp: FAIL cpu {index}: {e}");
        }
        timer::arm_in(timer::ticks_from_ms(1));
        loop {
            sysreg::irq_disable();
            if TIMER_SEEN[index].load(Ordering::Acquire) {
                break;
            }
            sysreg::wfi();
            sysreg::irq_enable();
        }
        if let Err(e) = gic::disable_ppi(timer::VIRTUAL_TIMER_INTID) {
            fail!("smp: FAIL cpu {index}: {e}");
        }
    }

    fn report(index: usize) {
        timer_check(index);
        let mpidr = sysreg::mpidr_affinity();
        let expected = boot_info().and_then(|b| b.platform.cpus().get(index).copied());
        if expected != Some(mpidr) {
            fail!("smp: FAIL cpu {index} has mpidr={mpidr:#x}, DTB says {expected:x?}");
        }
        println!("smp: cpu {index} mpidr={mpidr:#x} up");
    }

    fn lock_phase() {
        for _ in 0..LOCK_ROUNDS {
            let mut c = COUNTER.lock();
            // Read-modify-write through volatile so a lost update cannot be optimised away.
            let p: *mut u64 = &mut *c;
            // SAFETY: `p` points at the counter this CPU holds the lock for.
            unsafe { p.write_volatile(p.read_volatile() + 1) };
        }
        DONE.fetch_add(1, Ordering::AcqRel);
    }

    fn secondary(index: usize) -> ! {
        report(index);
        UP.fetch_add(1, Ordering::AcqRel);
        while !GO.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        lock_phase();
        let err = psci::cpu_off();
        fail!("smp: FAIL cpu {index} CPU_OFF returned: {err}")
    }

    fn main(boot: &'static BootInfo) -> ! {
        let cpus = boot.platform.cpus();
        if let Err(e) = gic::init() {
            fail!("smp: FAIL {e}");
        }
        if let Err(e) = gic::set_handler(timer::VIRTUAL_TIMER_INTID, on_timer) {
            fail!("smp: FAIL {e}");
        }
        report(boot.boot_cpu);
        UP.store(1, Ordering::Release);
        let timeout = timer::ticks_from_ms(START_TIMEOUT_MS);
        for index in (0..cpus.len()).filter(|&i| i != boot.boot_cpu) {
            let before = UP.load(Ordering::Acquire);
            if let Err(e) = smp::start_cpu(index, secondary) {
                fail!("smp: FAIL starting cpu {index}: {e}");
            }
            let start = timer::now();
            while UP.load(Ordering::Acquire) == before {
                if timer::now().wrapping_sub(start) > timeout {
                    fail!("smp: FAIL cpu {index} did not come up within {START_TIMEOUT_MS} ms");
                }
                core::hint::spin_loop();
            }
        }
        GO.store(true, Ordering::Release);
        lock_phase();
        let start = timer::now();
        while DONE.load(Ordering::Acquire) < cpus.len() {
            if timer::now().wrapping_sub(start) > timeout {
                fail!("smp: FAIL lock phase did not finish within {START_TIMEOUT_MS} ms");
            }
            core::hint::spin_loop();
        }
        let total = *COUNTER.lock();
        let expected = LOCK_ROUNDS * cpus.len() as u64;
        if total != expected {
            fail!("smp: FAIL lock counter={total} expected {expected}");
        }
        println!("smp: lock counter={total}");
        println!("smp: all {} cpus up", cpus.len());
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("smp is an aarch64-unknown-none guest image; run it under QEMU");
}
