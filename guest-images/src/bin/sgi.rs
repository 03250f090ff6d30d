//! `sgi`: software-generated interrupts between CPUs. The boot CPU starts the other CPUs one at
//! a time; each enables SGI 3 on its redistributor and sleeps in WFI. The boot CPU sends SGI 3
//! to it with `ICC_SGI1R_EL1` (TargetList/Aff1.. from its DTB MPIDR); the target's handler counts
//! it and prints `sgi: cpu <i> got sgi 3`, then the target sends SGI 4 back to the boot CPU and
//! turns itself off. The boot CPU waits for that reply before it moves to the next CPU, so the
//! output order is fixed and no two SGIs can merge into one pending state. At the end it checks
//! every count and prints `sgi: cpu <b> got <N-1> replies`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use vmfork_guests::{
        boot_info, exit, fail, gic, println, psci, smp, sysreg, timer, BootInfo, MAX_CPUS,
    };

    /// The SGI the boot CPU sends to each other CPU.
    const SGI_PING: u32 = 3;
    /// The SGI each CPU sends back.
    const SGI_REPLY: u32 = 4;
    /// How long to wait for a CPU to come up, or for a reply, in milliseconds.
    const TIMEOUT_MS: u64 = 5_000;

    /// Per CPU: its GIC is set up and SGI 3 enabled.
    static READY: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
    /// Per CPU: SGI 3 interrupts its handler took.
    static PINGS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
    /// SGI 4 interrupts the boot CPU's handler took.
    static REPLIES: AtomicU32 = AtomicU32::new(0);

    fn on_ping(intid: u32) {
        let Some(index) = smp::current_cpu_index() else {
            fail!("sgi: FAIL SGI {intid} on a CPU that is not in the DTB");
        };
        if let Some(count) = PINGS.get(index) {
            count.fetch_add(1, Ordering::AcqRel);
        }
        println!("sgi: cpu {index} got sgi {intid}");
    }

    fn on_reply(_intid: u32) {
        REPLIES.fetch_add(1, Ordering::AcqRel);
    }

    fn enable(index: usize, intid: u32) {
        if let Err(e) = gic::enable_ppi(intid, gic::DEFAULT_PRIORITY) {
            fail!("sgi: FAIL cpu {index}: {e}");
        }
    }

    fn secondary(index: usize) -> ! {
        if let Err(e) = gic::init_cpu() {
            fail!("sgi: FAIL cpu {index}: {e}");
        }
        enable(index, SGI_PING);
        READY[index].store(true, Ordering::Release);
        // Sleep until the handler has counted the SGI (checked with IRQs masked, so an SGI
        // between the check and WFI still wakes the CPU).
        loop {
            sysreg::irq_disable();
            if PINGS[index].load(Ordering::Acquire) > 0 {
                break;
            }
            sysreg::wfi();
            sysreg::irq_enable();
        }
        let boot = boot_info().and_then(|b| b.platform.cpus().get(b.boot_cpu).copied());
        match boot.map(|mpidr| gic::send_sgi(SGI_REPLY, mpidr)) {
            Some(Ok(())) => {}
            Some(Err(e)) => fail!("sgi: FAIL cpu {index} replying: {e}"),
            None => fail!("sgi: FAIL cpu {index}: no boot information"),
        }
        let err = psci::cpu_off();
        fail!("sgi: FAIL cpu {index} CPU_OFF returned: {err}")
    }

    /// Spins (IRQs unmasked, so handlers run) until `done()` or the timeout.
    fn wait(what: &str, index: usize, done: impl Fn() -> bool) {
        let timeout = timer::ticks_from_ms(TIMEOUT_MS);
        let start = timer::now();
        while !done() {
            if timer::now().wrapping_sub(start) > timeout {
                fail!("sgi: FAIL cpu {index} {what} within {TIMEOUT_MS} ms");
            }
            core::hint::spin_loop();
        }
    }

    fn main(boot: &'static BootInfo) -> ! {
        let cpus = boot.platform.cpus();
        let me = boot.boot_cpu;
        if let Err(e) = gic::init() {
            fail!("sgi: FAIL {e}");
        }
        for (intid, handler) in [(SGI_PING, on_ping as fn(u32)), (SGI_REPLY, on_reply)] {
            if let Err(e) = gic::set_handler(intid, handler) {
                fail!("sgi: FAIL {e}");
            }
        }
        enable(me, SGI_REPLY);
        sysreg::irq_enable();
        let mut expected = 0;
        for (index, &mpidr) in cpus.iter().enumerate().filter(|&(i, _)| i != me) {
            if let Err(e) = smp::start_cpu(index, secondary) {
                fail!("sgi: FAIL starting cpu {index}: {e}");
            }
            wait("did not come up", index, || {
                READY[index].load(Ordering::Acquire)
            });
            if let Err(e) = gic::send_sgi(SGI_PING, mpidr) {
                fail!("sgi: FAIL sending sgi {SGI_PING} to cpu {index}: {e}");
            }
            expected += 1;
            wait("sent no reply", index, || {
                REPLIES.load(Ordering::Acquire) >= expected
            });
            let replies = REPLIES.load(Ordering::Acquire);
            if replies != expected {
                fail!("sgi: FAIL {replies} replies after {expected} sgis");
            }
        }
        for (index, count) in PINGS.iter().enumerate().take(cpus.len()) {
            let got = count.load(Ordering::Acquire);
            let want = u32::from(index != me);
            if got != want {
                fail!("sgi: FAIL cpu {index} took sgi {SGI_PING} {got} times, expected {want}");
            }
        }
        sysreg::irq_disable();
        println!(
            "sgi: cpu {me} got {} replies",
            REPLIES.load(Ordering::Acquire)
        );
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("sgi is an aarch64-unknown-none guest image; run it under QEMU");
}
