//! `selftest=irq`: the boot-time check that every CPU takes its EL2 timer interrupt and SGIs.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::arch::boot::MAX_CPUS;
use crate::arch::timer;
use alloc::vec::Vec;

use super::{
    enable_ppi, irq_enable, online_cpus, register_handler, send_sgi, Handler, DEFAULT_PRIORITY,
};

/// SGI that tells a CPU to start its part of the self-test.
const SELFTEST_START_SGI: u32 = 0;
/// SGI each CPU other than 0 must report receiving.
const SELFTEST_CHECK_SGI: u32 = 1;
/// Timer ticks each CPU counts.
const SELFTEST_TICKS: u32 = 3;
/// Timer period.
const SELFTEST_PERIOD_US: u64 = 10_000;
/// How long each phase may take before the test fails.
const SELFTEST_TIMEOUT_US: u64 = 10_000_000;

static SELFTEST_TICK_COUNT: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
static SELFTEST_SGI_SEEN: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

fn selftest_tick(_intid: u32) {
    let me = crate::arch::percpu::cpu_index();
    let Some(count) = SELFTEST_TICK_COUNT.get(me) else {
        return;
    };
    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
    // The timer interrupt is level-sensitive: re-arming (condition no longer met) or cancelling
    // lowers it before the dispatcher's EOI.
    if n < SELFTEST_TICKS as usize {
        timer::arm_oneshot(timer::ticks_from_micros(SELFTEST_PERIOD_US));
    } else {
        timer::cancel();
    }
}

fn selftest_start(_intid: u32) {
    if let Err(e) = enable_ppi(timer::intid(), DEFAULT_PRIORITY) {
        log::error!("selftest: irq FAILED: cannot enable the hyp timer PPI: {e}");
        return;
    }
    timer::arm_oneshot(timer::ticks_from_micros(SELFTEST_PERIOD_US));
}

fn selftest_check(intid: u32) {
    let me = crate::arch::percpu::cpu_index();
    // Print before counting, so that CPU 0's final line comes after every CPU's report.
    log::info!("selftest: cpu{me} got SGI {intid}");
    if let Some(seen) = SELFTEST_SGI_SEEN.get(me) {
        seen.fetch_add(1, Ordering::SeqCst);
    }
}

/// Polls with IRQs unmasked until `done()` or the self-test timeout; true if done. Polls rather
/// than sleeps: progress on other CPUs does not interrupt this one.
fn selftest_wait(done: impl Fn() -> bool) -> bool {
    let deadline = timer::now().saturating_add(timer::ticks_from_micros(SELFTEST_TIMEOUT_US));
    irq_enable();
    while !done() {
        if timer::now() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// `selftest=irq`: every CPU counts three ticks of its EL2 physical timer (10 ms apart), then CPU
/// 0 sends SGI 1 to every other CPU, and each says `selftest: cpuN got SGI 1`. Ends with
/// `selftest: irq ok ticks=<total>`, or `selftest: irq FAILED ...`. Runs on CPU 0 after every
/// CPU ran [`init_cpu`]; leaves IRQs unmasked.
pub fn irq_selftest() {
    let timer = timer::intid();
    for (intid, f) in [
        (timer, selftest_tick as Handler),
        (SELFTEST_START_SGI, selftest_start),
        (SELFTEST_CHECK_SGI, selftest_check),
    ] {
        if let Err(e) = register_handler(intid, f) {
            log::error!("selftest: irq FAILED: {e}");
            return;
        }
    }
    let cpus: Vec<usize> = online_cpus().collect();
    let others: Vec<usize> = cpus.iter().copied().filter(|&c| c != 0).collect();
    log::info!("selftest: irq on cpus {cpus:?}, timer INTID {timer}");
    for &cpu in &others {
        if let Err(e) = send_sgi(SELFTEST_START_SGI, cpu) {
            log::error!("selftest: irq FAILED: start SGI to cpu{cpu}: {e}");
            return;
        }
    }
    selftest_start(timer);
    let ticks_done = selftest_wait(|| {
        cpus.iter()
            .all(|&c| SELFTEST_TICK_COUNT[c].load(Ordering::SeqCst) >= SELFTEST_TICKS as usize)
    });
    let ticks: Vec<usize> = cpus
        .iter()
        .map(|&c| SELFTEST_TICK_COUNT[c].load(Ordering::SeqCst))
        .collect();
    if !ticks_done {
        log::error!(
            "selftest: irq FAILED: timer ticks per cpu {ticks:?}, wanted {SELFTEST_TICKS} each"
        );
        return;
    }
    for &cpu in &others {
        if let Err(e) = send_sgi(SELFTEST_CHECK_SGI, cpu) {
            log::error!("selftest: irq FAILED: SGI {SELFTEST_CHECK_SGI} to cpu{cpu}: {e}");
            return;
        }
    }
    let sgis_done = selftest_wait(|| {
        others
            .iter()
            .all(|&c| SELFTEST_SGI_SEEN[c].load(Ordering::SeqCst) >= 1)
    });
    if !sgis_done {
        let seen: Vec<usize> = others
            .iter()
            .map(|&c| SELFTEST_SGI_SEEN[c].load(Ordering::SeqCst))
            .collect();
        log::error!(
            "selftest: irq FAILED: SGI {SELFTEST_CHECK_SGI} seen by cpus {others:?}: {seen:?}"
        );
        return;
    }
    let total: usize = ticks.iter().sum();
    log::info!("selftest: irq ok ticks={total}");
}
