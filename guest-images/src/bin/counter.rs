//! `counter`: counts virtual-timer interrupts (PPI 27 through the GICv3) and prints a tick line
//! every 100 ms; with `ticks=K` in the bootargs it stops after K ticks and powers off.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::sync::atomic::{AtomicU64, Ordering};
    use vmfork_guests::{exit, fail, gic, println, sysreg, timer, BootInfo};

    /// Timer period.
    const PERIOD_MS: u64 = 100;

    /// Interrupts taken so far (written only by the IRQ handler).
    static TICKS: AtomicU64 = AtomicU64::new(0);
    /// Counter ticks per period, set before the timer is first armed.
    static PERIOD_TICKS: AtomicU64 = AtomicU64::new(0);

    fn on_timer(_intid: u32) {
        TICKS.fetch_add(1, Ordering::AcqRel);
        // Re-arming moves the deadline into the future, which drops the level-triggered line.
        timer::arm_in(PERIOD_TICKS.load(Ordering::Relaxed));
    }

    fn main(boot: &'static BootInfo) -> ! {
        let limit = match boot.platform.bootargs.get_u64("ticks") {
            Ok(limit) => limit,
            Err(e) => fail!("counter: FAIL {e}"),
        };
        if limit == Some(0) {
            println!("counter: done 0");
            exit::power_off();
        }
        if let Err(e) = gic::init() {
            fail!("counter: FAIL {e}");
        }
        if let Err(e) = gic::set_handler(timer::VIRTUAL_TIMER_INTID, on_timer) {
            fail!("counter: FAIL {e}");
        }
        if let Err(e) = gic::enable_ppi(timer::VIRTUAL_TIMER_INTID, gic::DEFAULT_PRIORITY) {
            fail!("counter: FAIL {e}");
        }
        let period = timer::ticks_from_ms(PERIOD_MS);
        if period == 0 {
            fail!("counter: FAIL CNTFRQ_EL0 is {}", timer::frequency());
        }
        PERIOD_TICKS.store(period, Ordering::Relaxed);
        timer::arm_in(period);

        let mut printed = 0u64;
        loop {
            // Check with IRQs masked, so a tick between the check and WFI still wakes us.
            sysreg::irq_disable();
            if TICKS.load(Ordering::Acquire) == printed {
                sysreg::wfi();
            }
            sysreg::irq_enable();
            let ticks = TICKS.load(Ordering::Acquire);
            while printed < ticks {
                printed += 1;
                println!("counter: tick {printed}");
                if Some(printed) == limit {
                    timer::disable();
                    println!("counter: done {printed}");
                    exit::power_off();
                }
            }
        }
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("counter is an aarch64-unknown-none guest image; run it under QEMU");
}
