//! Runs each guest image on plain QEMU `virt` (EL1, no monitor) and checks the output contract
//! written down in guest-images/README.md. The same lines are what the under-monitor tests
//! compare against.

use vmfork_tests::{guest_image, Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// The `memcheck` checksum for the default `mib=8` (pinned by a unit test in vmfork-guests too).
const MEMCHECK_DEFAULT_CHECKSUM: &str = "0x14e3b7f3600d6f68";

fn start(guest: &str, smp: u32, append: &str, name: &str) -> Qemu {
    let mut config = QemuConfig::plain(guest_image(guest))
        .smp(smp)
        .mem_mib(128)
        .name(name);
    if !append.is_empty() {
        config = config.append(append);
    }
    Qemu::start(config)
}

/// The log's lines that start with `prefix`, in order, without trailing whitespace.
fn lines_with(q: &mut Qemu, prefix: &str) -> Vec<String> {
    q.serial()
        .lines()
        .map(|l| l.trim_end().to_string())
        .filter(|l| l.starts_with(prefix))
        .collect()
}

fn assert_clean(q: &mut Qemu) {
    let log = q.serial();
    for bad in ["panic:", "exception:", "FAIL"] {
        assert_eq!(q.count(bad), 0, "unexpected {bad:?} in the log:\n{log}");
    }
}

fn hello(smp: u32) {
    let mut q = start("hello", smp, "", &format!("hello_plain_smp{smp}"));
    let first = q.wait_for("hello: vmfork guest running at", DEFAULT_TIMEOUT);
    assert_eq!(first.trim_end(), "hello: vmfork guest running at EL1");
    q.wait_for("hello: bye", DEFAULT_TIMEOUT);
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 0, "log:\n{}", q.serial());
    assert_eq!(
        lines_with(&mut q, "hello:"),
        ["hello: vmfork guest running at EL1", "hello: bye"]
    );
    assert_clean(&mut q);
}

#[test]
fn hello_smp1() {
    hello(1);
}

#[test]
fn hello_smp4() {
    hello(4);
}

fn counter_ticks(smp: u32, ticks: u32) {
    let mut q = start(
        "counter",
        smp,
        &format!("ticks={ticks}"),
        &format!("counter_plain_smp{smp}"),
    );
    q.wait_for(&format!("counter: done {ticks}"), DEFAULT_TIMEOUT);
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 0, "log:\n{}", q.serial());
    let mut expected: Vec<String> = (1..=ticks).map(|n| format!("counter: tick {n}")).collect();
    expected.push(format!("counter: done {ticks}"));
    assert_eq!(lines_with(&mut q, "counter:"), expected);
    assert_clean(&mut q);
}

#[test]
fn counter_ticks5_smp1() {
    counter_ticks(1, 5);
}

#[test]
fn counter_ticks5_smp4() {
    counter_ticks(4, 5);
}

#[test]
fn counter_without_limit_keeps_ticking() {
    let mut q = start("counter", 1, "", "counter_plain_forever");
    q.wait_for("counter: tick 12", DEFAULT_TIMEOUT);
    assert_eq!(q.count("counter: done"), 0, "log:\n{}", q.serial());
    assert_clean(&mut q);
    // Dropping `q` stops QEMU.
}

#[test]
fn counter_rejects_bad_bootarg() {
    let mut q = start("counter", 1, "ticks=five", "counter_plain_badarg");
    q.wait_for("counter: FAIL", DEFAULT_TIMEOUT);
    assert_ne!(q.wait_exit(DEFAULT_TIMEOUT), 0, "log:\n{}", q.serial());
}

fn memcheck(smp: u32, mib: Option<u32>) -> String {
    let append = mib.map(|m| format!("mib={m}")).unwrap_or_default();
    let mut q = start(
        "memcheck",
        smp,
        &append,
        &format!("memcheck_plain_smp{smp}"),
    );
    let caps = q.wait_for_regex(
        r"memcheck: ok mib=(\d+) checksum=(0x[0-9a-f]{16})",
        DEFAULT_TIMEOUT,
    );
    assert_eq!(caps[1], mib.unwrap_or(8).to_string());
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 0, "log:\n{}", q.serial());
    assert_clean(&mut q);
    caps[2].clone()
}

#[test]
fn memcheck_default_smp1() {
    assert_eq!(memcheck(1, None), MEMCHECK_DEFAULT_CHECKSUM);
}

#[test]
fn memcheck_default_smp4() {
    assert_eq!(memcheck(4, None), MEMCHECK_DEFAULT_CHECKSUM);
}

#[test]
fn memcheck_checksum_depends_on_size_and_repeats() {
    let a = memcheck(1, Some(3));
    let b = memcheck(1, Some(3));
    assert_eq!(a, b, "the checksum must be deterministic");
    assert_ne!(a, MEMCHECK_DEFAULT_CHECKSUM);
}

#[test]
fn memcheck_largest_region_fits() {
    // 128 MiB RAM, region from 0x4040_0000: 124 MiB fit exactly.
    memcheck(1, Some(124));
}

#[test]
fn memcheck_too_large_is_a_clear_failure() {
    let mut q = start("memcheck", 1, "mib=125", "memcheck_plain_too_large");
    let line = q.wait_for("memcheck: FAIL", DEFAULT_TIMEOUT);
    assert!(line.contains("mib=125 does not fit"), "{line}");
    assert!(line.contains("at most 124 MiB"), "{line}");
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 1, "log:\n{}", q.serial());
    assert_eq!(q.count("memcheck: ok"), 0);
}

fn smp(n: u32) {
    let mut q = start("smp", n, "", &format!("smp_plain_smp{n}"));
    q.wait_for(&format!("smp: all {n} cpus up"), DEFAULT_TIMEOUT);
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 0, "log:\n{}", q.serial());
    // QEMU virt numbers CPUs 0..n with MPIDR affinity equal to the index (Aff0) for n <= 8.
    let mut expected: Vec<String> = (0..n)
        .map(|i| format!("smp: cpu {i} mpidr={i:#x} up"))
        .collect();
    expected.push(format!("smp: lock counter={}", 10_000 * n));
    expected.push(format!("smp: all {n} cpus up"));
    assert_eq!(lines_with(&mut q, "smp:"), expected);
    assert_clean(&mut q);
}

#[test]
fn smp_smp1() {
    smp(1);
}

#[test]
fn smp_smp4() {
    smp(4);
}

/// Runs `cowcheck` to its end (exit 0) and returns its `cowcheck:` lines.
fn cowcheck(smp: u32, append: &str, name: &str) -> Vec<String> {
    let mut q = start("cowcheck", smp, append, name);
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 0, "log:\n{}", q.serial());
    assert_clean(&mut q);
    lines_with(&mut q, "cowcheck:")
}

/// Without the monitor the fork hypercall is not supported: phase 1 runs on every CPU, then
/// the guest says so and powers off cleanly.
fn cowcheck_without_monitor(smp: u32) {
    assert_eq!(
        cowcheck(smp, "", &format!("cowcheck_plain_smp{smp}")),
        [
            format!("cowcheck: filled mib=4 cpus={smp}"),
            "cowcheck: fork not supported (-1)".to_string(),
        ]
    );
}

#[test]
fn cowcheck_without_monitor_smp1() {
    cowcheck_without_monitor(1);
}

#[test]
fn cowcheck_without_monitor_smp4() {
    cowcheck_without_monitor(4);
}

/// `simulate=` runs phase 2 without a fork, so the rewrite/check and code-patching paths are
/// exercised on plain QEMU too.
#[test]
fn cowcheck_simulated_parent_and_child() {
    assert_eq!(
        cowcheck(4, "simulate=parent mib=2", "cowcheck_plain_sim_parent"),
        [
            "cowcheck: filled mib=2 cpus=4",
            "cowcheck: parent vm=1 child=2",
            "cowcheck: code ok value=43",
            "cowcheck: parent ok",
        ]
    );
    assert_eq!(
        cowcheck(3, "simulate=child cpus=2", "cowcheck_plain_sim_child"),
        [
            "cowcheck: filled mib=4 cpus=2",
            "cowcheck: child vm=2 parent=1 generation=1",
            "cowcheck: code ok value=44",
            "cowcheck: child ok",
        ]
    );
}

#[test]
fn cowcheck_rejects_more_cpus_than_the_dtb_has() {
    let mut q = start("cowcheck", 2, "cpus=3", "cowcheck_plain_badcpus");
    let line = q.wait_for("cowcheck: FAIL", DEFAULT_TIMEOUT);
    assert!(line.contains("cpus=3: the DTB has 2 cpus"), "{line}");
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 1, "log:\n{}", q.serial());
}
