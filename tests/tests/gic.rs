//! The monitor's physical GICv3 and EL2 timer driver, checked by its `selftest=irq`: every CPU
//! takes three ticks of its EL2 physical timer (PPI 26) through the EL2 IRQ vector and the GIC
//! dispatcher, then CPU 0 sends SGI 1 to each other CPU, which reports it.

use vmfork_tests::{Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// Boots the monitor with `selftest=irq` on `cpus` CPUs and checks every CPU's part.
fn irq_selftest(cpus: u32, name: &str) {
    let q = Qemu::start(
        QemuConfig::monitor()
            .smp(cpus)
            .append("selftest=irq")
            .name(name),
    );
    q.wait_for(&format!("monitor: ready cpus={cpus}"), DEFAULT_TIMEOUT);
    let ok = q.wait_for_regex(r"selftest: irq ok ticks=(\d+)", DEFAULT_TIMEOUT);
    let ticks: u32 = ok[1].parse().expect("the tick count is a number");
    assert_eq!(ticks, 3 * cpus, "each CPU counts exactly three timer ticks");
    for cpu in 1..cpus {
        assert_eq!(
            q.count(&format!("selftest: cpu{cpu} got SGI 1")),
            1,
            "cpu{cpu} must report SGI 1 exactly once"
        );
    }
    assert_eq!(
        q.count("got SGI"),
        (cpus - 1) as usize,
        "only CPUs 1.. get SGIs"
    );
    q.expect_no("FAILED");
    q.expect_no("unexpected interrupt");
    q.expect_no("unexpected exception");
}

#[test]
fn irq_selftest_four_cpus() {
    irq_selftest(4, "gic_selftest");
}

#[test]
fn irq_selftest_two_cpus() {
    irq_selftest(2, "gic_selftest_smp2");
}
