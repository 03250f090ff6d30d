//! Boot tests of the vmfork monitor, against its boot contract:
//! - when boot completes it prints exactly one line `monitor: ready cpus=<N> mem=<MiB>`, with the
//!   number of CPUs and the RAM (in MiB) QEMU gave it;
//! - started without EL2 it prints `needs EL2: start QEMU with -M virt,virtualization=on` and
//!   QEMU exits by itself;
//! - `log=debug` on the command line (`/chosen/bootargs`) enables `DEBUG` lines during boot; they
//!   are off by default.
//!
//! These need the monitor image: run `make` first (or set `VMFORK_MONITOR_IMAGE`).

use std::time::Duration;

use vmfork_tests::{Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// The ready line, exactly.
const READY: &str = r"^monitor: ready cpus=(\d+) mem=(\d+)$";
/// The part of the ready line to wait for.
const READY_PREFIX: &str = "monitor: ready";
/// The message of a monitor started at EL1.
const NEEDS_EL2: &str = "needs EL2: start QEMU with -M virt,virtualization=on";
/// How long to keep watching after the ready line before checking it was printed only once.
/// Not a timing assumption about the monitor: a second ready line later than this still fails
/// the `count` of any test that looks again.
const SETTLE: Duration = Duration::from_secs(2);

/// Waits for the ready line, checks its exact form and numbers, and that it appears once.
fn assert_ready(qemu: &Qemu, cpus: u32, mem_mib: u64) {
    let caps = qemu.wait_for_regex(READY, DEFAULT_TIMEOUT);
    assert_eq!(
        (caps[1].as_str(), caps[2].as_str()),
        (cpus.to_string().as_str(), mem_mib.to_string().as_str()),
        "ready line {:?}: expected cpus={cpus} mem={mem_mib}",
        caps[0]
    );
    std::thread::sleep(SETTLE);
    assert_eq!(
        qemu.count(READY_PREFIX),
        1,
        "the ready line must be printed exactly once"
    );
}

#[test]
fn ready_with_four_cpus_and_2g() {
    let qemu = Qemu::start(QemuConfig::monitor());
    assert_ready(&qemu, 4, 2048);
}

#[test]
fn ready_reports_1g_of_memory() {
    let qemu = Qemu::start(QemuConfig::monitor().mem_mib(1024));
    assert_ready(&qemu, 4, 1024);
}

#[test]
fn ready_reports_two_cpus() {
    let qemu = Qemu::start(QemuConfig::monitor().smp(2));
    assert_ready(&qemu, 2, 2048);
}

#[test]
fn el1_start_asks_for_el2_and_exits() {
    let mut qemu = Qemu::start(QemuConfig::monitor().el2(false));
    // Wait for either line, so that a monitor that wrongly boots at EL1 fails at once.
    let either = format!(
        "{}|{}",
        regex::escape(NEEDS_EL2),
        regex::escape(READY_PREFIX)
    );
    let caps = qemu.wait_for_regex(&either, DEFAULT_TIMEOUT);
    assert_eq!(
        caps[0], NEEDS_EL2,
        "started at EL1, the monitor must refuse"
    );
    // Whatever the code, QEMU must stop by itself rather than hang.
    let code = qemu.wait_exit(DEFAULT_TIMEOUT);
    eprintln!("QEMU exit code after the EL2 refusal: {code}");
    qemu.expect_no(READY_PREFIX);
}

#[test]
fn log_debug_prints_debug_lines_before_ready() {
    let qemu = Qemu::start(QemuConfig::monitor().append("log=debug"));
    assert_ready(&qemu, 4, 2048);
    let log = qemu.serial();
    let before_ready = log.find(READY_PREFIX).map_or("", |at| &log[..at]);
    assert!(
        before_ready.lines().any(|line| line.contains("DEBUG")),
        "with log=debug, at least one DEBUG line must come before the ready line"
    );
}

#[test]
fn default_log_level_prints_no_debug_lines() {
    let qemu = Qemu::start(QemuConfig::monitor());
    assert_ready(&qemu, 4, 2048);
    qemu.expect_no("DEBUG");
}

#[test]
fn a_panic_prints_file_line_and_message_and_fails_qemu() {
    let mut qemu = Qemu::start(
        QemuConfig::monitor()
            .append("selftest=panic")
            .name("panic_exit"),
    );
    qemu.wait_for(
        "monitor: panic on cpu0: panicked at hypervisor/monitor/src/main.rs:",
        DEFAULT_TIMEOUT,
    );
    qemu.wait_for(
        "selftest: panic requested on the command line",
        DEFAULT_TIMEOUT,
    );
    assert_eq!(
        qemu.wait_exit(DEFAULT_TIMEOUT),
        101,
        "a panic must fail QEMU"
    );
}

#[test]
fn an_unexpected_exception_prints_a_decoded_dump_and_fails_qemu() {
    let mut qemu = Qemu::start(
        QemuConfig::monitor()
            .append("selftest=fault")
            .name("fault_exit"),
    );
    let head = qemu.wait_for("unexpected exception on cpu0", DEFAULT_TIMEOUT);
    assert!(head.contains("data abort"), "the class is named: {head}");
    qemu.wait_for_regex(
        r"ESR_EL2=0x[0-9a-f]{16} FAR_EL2=0x0000004000000000",
        DEFAULT_TIMEOUT,
    );
    qemu.wait_for("ELR_EL2=", DEFAULT_TIMEOUT);
    qemu.wait_for("x30=", DEFAULT_TIMEOUT);
    assert_eq!(
        qemu.wait_exit(DEFAULT_TIMEOUT),
        1,
        "an unexpected exception must fail QEMU"
    );
}

#[test]
fn lines_from_four_cpus_never_interleave() {
    // Every CPU logs while it comes up; with log=debug there are many lines from all four.
    let qemu = Qemu::start(
        QemuConfig::monitor()
            .append("log=debug")
            .name("no_interleave"),
    );
    qemu.wait_for(READY_PREFIX, DEFAULT_TIMEOUT);
    std::thread::sleep(SETTLE);
    let log = qemu.serial();
    let line = regex::Regex::new(
        r"^(\[ *\d+\.\d{6}\] (ERROR|WARN |INFO |DEBUG|TRACE) cpu\d+: .*|monitor: ready cpus=\d+ mem=\d+)$",
    )
    .unwrap();
    let mut cpus = std::collections::BTreeSet::new();
    for l in log
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
    {
        assert!(line.is_match(l), "a line that is not whole: {l:?}");
        if let Some(c) = l.split(" cpu").nth(1).and_then(|r| r.split(':').next()) {
            cpus.insert(c.to_string());
        }
    }
    assert!(cpus.len() >= 4, "lines from {cpus:?} only");
}
