//! Guest-level I/O paths, each run on plain QEMU and under the monitor with the outputs compared:
//! console input through the PL011 receive interrupt and the monitor's console focus (`echo`),
//! SGIs between vCPUs (`sgi`), and PSCI over SMC (the `psci=smc` bootarg).

use vmfork_tests::{
    complete_lines, guest_image, plain_lines, vm_lines, wait_count, Qemu, QemuConfig,
    DEFAULT_TIMEOUT,
};

/// The monitor's key that moves the console focus to the next VM (Ctrl-T).
const FOCUS_KEY: &[u8] = b"\x14";

/// What the monitor prints when a VM's guest powers itself off.
fn powered_off(vm: u32, guest: u32) -> String {
    format!("vm{vm}: 'guest{guest}' powered off (PSCI SYSTEM_OFF); destroyed")
}

fn monitor(name: &str) -> QemuConfig {
    QemuConfig::monitor().smp(2).mem_mib(1024).name(name)
}

/// Waits for `line` from VM `vm` (prefixed) after the read cursor.
fn wait_vm(q: &Qemu, vm: u32, line: &str) -> String {
    q.wait_for(&format!("[vm{vm}] {line}"), DEFAULT_TIMEOUT)
}

/// Runs `image` alone under the monitor (config `config`) until it powers off and returns its
/// lines.
fn monitor_lines(name: &str, image: &str, config: &str, last: &str) -> Vec<String> {
    let mut q = Qemu::start(monitor(name).guest(0, image, config));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    wait_vm(&q, 1, last);
    q.wait_for(&powered_off(1, 0), DEFAULT_TIMEOUT);
    q.expect_no("unexpected exception");
    q.expect_no("panic");
    let lines = vm_lines(&q, 1);
    q.kill();
    lines
}

// ---- 1. UART RX through the interrupt, and console focus ----

/// The echo session every run types: one line, then `quit`.
fn echo_expected() -> Vec<String> {
    ["echo: ready", "echo: hello", "echo: bye"]
        .map(String::from)
        .to_vec()
}

#[test]
fn echo_on_plain_qemu_takes_input_through_the_uart_interrupt() {
    let mut q = Qemu::start(QemuConfig::plain(guest_image("echo")));
    q.wait_for("echo: ready", DEFAULT_TIMEOUT);
    q.send(b"hello\n");
    q.wait_for("echo: hello", DEFAULT_TIMEOUT);
    q.send(b"quit\n");
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 0);
    assert_eq!(
        complete_lines(&q)
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
        echo_expected()
    );
}

#[test]
fn echo_escapes_control_bytes_and_takes_cr_as_line_end() {
    let mut q = Qemu::start(QemuConfig::plain(guest_image("echo")));
    q.wait_for("echo: ready", DEFAULT_TIMEOUT);
    q.send(b"a\\b\x1b[2J\r\n\r\n");
    q.wait_for(r"echo: a\\b\x1b[2J", DEFAULT_TIMEOUT);
    q.send(b"quit\r");
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 0);
    assert_eq!(
        complete_lines(&q)
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
        ["echo: ready", r"echo: a\\b\x1b[2J", "echo: bye"]
    );
}

#[test]
fn echo_under_the_monitor_matches_plain_qemu() {
    let mut q = Qemu::start(monitor("echo_under_monitor").guest(0, "echo", ""));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    wait_vm(&q, 1, "echo: ready");
    // The console focus is on the first VM at boot.
    q.send(b"hello\n");
    wait_vm(&q, 1, "echo: hello");
    q.send(b"quit\n");
    q.wait_for(&powered_off(1, 0), DEFAULT_TIMEOUT);
    assert_eq!(vm_lines(&q, 1), echo_expected());
    q.expect_no("irq: INTID");
    q.kill();
}

#[test]
fn ctrl_t_moves_console_input_to_the_next_vm() {
    let mut q = Qemu::start(
        monitor("echo_focus")
            .guest(0, "echo", "mem=16M")
            .guest(1, "echo", "mem=16M"),
    );
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    // Both are ready before anything is typed (bytes typed earlier could find FIFOs off).
    for vm in [1, 2] {
        wait_count(&q, &format!("[vm{vm}] echo: ready"), 1);
    }
    q.send(b"one\n");
    wait_vm(&q, 1, "echo: one");
    q.send(FOCUS_KEY);
    q.wait_for("monitor: console focus on vm2", DEFAULT_TIMEOUT);
    q.send(b"hi\n");
    wait_vm(&q, 2, "echo: hi");
    assert_eq!(vm_lines(&q, 1), ["echo: ready", "echo: one"]);
    assert_eq!(vm_lines(&q, 2), ["echo: ready", "echo: hi"]);
    // Ctrl-T, an id and Enter jump to that VM (the Ctrl-T moves on at once, to vm1 here).
    q.send(b"\x142\r");
    wait_count(&q, "monitor: console focus on vm2", 2);
    q.send(b"again\n");
    wait_vm(&q, 2, "echo: again");
    // No vm9: the focus stays where the Ctrl-T put it (vm1).
    q.send(b"\x149\r");
    q.wait_for("monitor: no vm9 to focus", DEFAULT_TIMEOUT);
    q.send(b"x\n");
    wait_vm(&q, 1, "echo: x");
    q.send(b"\x142\r");
    wait_count(&q, "monitor: console focus on vm2", 4);
    // vm2 quits; the focus key then wraps around to vm1, the only VM left.
    q.send(b"quit\n");
    q.wait_for(&powered_off(2, 1), DEFAULT_TIMEOUT);
    q.send(FOCUS_KEY);
    wait_count(&q, "monitor: console focus on vm1", 3);
    q.send(b"quit\n");
    q.wait_for(&powered_off(1, 0), DEFAULT_TIMEOUT);
    assert_eq!(
        vm_lines(&q, 1),
        ["echo: ready", "echo: one", "echo: x", "echo: bye"]
    );
    assert_eq!(
        vm_lines(&q, 2),
        ["echo: ready", "echo: hi", "echo: again", "echo: bye"]
    );
    q.kill();
}

/// A 50-byte line typed in one go: more than the guest's 32-byte receive FIFO (and QEMU's
/// 16-byte one). Plain QEMU holds bytes back until the FIFO has room, so nothing is lost.
fn long_line() -> String {
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN".to_string()
}

#[test]
fn a_line_longer_than_the_rx_fifo_arrives_whole_on_plain_qemu() {
    let mut q = Qemu::start(QemuConfig::plain(guest_image("echo")));
    q.wait_for("echo: ready", DEFAULT_TIMEOUT);
    q.send(format!("{}\nquit\n", long_line()).as_bytes());
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 0);
    assert_eq!(
        complete_lines(&q)
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
        [
            "echo: ready".to_string(),
            format!("echo: {}", long_line()),
            "echo: bye".to_string()
        ]
    );
}

#[test]
fn a_line_longer_than_the_rx_fifo_arrives_whole_under_the_monitor() {
    let mut q = Qemu::start(monitor("echo_long_line").guest(0, "echo", ""));
    wait_vm(&q, 1, "echo: ready");
    q.send(format!("{}\nquit\n", long_line()).as_bytes());
    q.wait_for(&powered_off(1, 0), DEFAULT_TIMEOUT);
    assert_eq!(
        vm_lines(&q, 1),
        [
            "echo: ready".to_string(),
            format!("echo: {}", long_line()),
            "echo: bye".to_string()
        ]
    );
    q.kill();
}

// ---- 2. SGIs between vCPUs ----

#[test]
fn sgi_on_four_plain_cpus() {
    let lines = plain_lines("sgi", 4, "", "sgi: cpu 0 got 3 replies");
    assert_eq!(
        lines,
        [
            "sgi: cpu 1 got sgi 3",
            "sgi: cpu 2 got sgi 3",
            "sgi: cpu 3 got sgi 3",
            "sgi: cpu 0 got 3 replies"
        ]
    );
}

#[test]
fn sgi_with_four_vcpus_on_two_cpus_matches_plain_qemu() {
    let expected = plain_lines("sgi", 4, "", "sgi: cpu 0 got 3 replies");
    let got = monitor_lines(
        "sgi_under_monitor",
        "sgi",
        "cpus=4",
        "sgi: cpu 0 got 3 replies",
    );
    assert_eq!(got, expected);
}

#[test]
fn sgi_with_one_cpu_gets_no_replies_both_ways() {
    let expected = plain_lines("sgi", 1, "", "sgi: cpu 0 got 0 replies");
    assert_eq!(expected, ["sgi: cpu 0 got 0 replies"]);
    let got = monitor_lines("sgi_one_vcpu", "sgi", "cpus=1", "sgi: cpu 0 got 0 replies");
    assert_eq!(got, expected);
}

// ---- 3. PSCI over SMC ----

/// Splits off the `verbose` boot line (which differs between plain QEMU and the monitor).
fn without_boot_line(mut lines: Vec<String>) -> (String, Vec<String>) {
    assert!(
        lines.first().is_some_and(|l| l.starts_with("boot: ")),
        "no boot: line first in {lines:?}"
    );
    let boot = lines.remove(0);
    (boot, lines)
}

#[test]
fn smp_over_smc_under_the_monitor_matches_plain_qemu_over_hvc() {
    let expected = plain_lines("smp", 4, "", "smp: all 4 cpus up");
    let got = monitor_lines(
        "smp_over_smc",
        "smp",
        "cpus=4 cmdline=psci=smc verbose",
        "smp: all 4 cpus up",
    );
    let (boot, got) = without_boot_line(got);
    // The conduit really is SMC (CPU_ON, CPU_OFF, SYSTEM_OFF and the Call UID all went that way).
    assert!(boot.ends_with("vmfork yes, psci smc"), "{boot}");
    assert_eq!(got, expected);
}

#[test]
fn hello_over_smc_powers_off() {
    let expected = plain_lines("hello", 1, "", "hello: bye");
    let got = monitor_lines("hello_over_smc", "hello", "cmdline=psci=smc", "hello: bye");
    assert_eq!(got, expected);
}

#[test]
fn psci_hvc_bootarg_keeps_plain_qemu_working() {
    let lines = plain_lines("hello", 1, "psci=hvc verbose", "hello: bye");
    let (boot, lines) = without_boot_line(lines);
    assert!(boot.ends_with("vmfork no, psci hvc"), "{boot}");
    assert_eq!(lines, plain_lines("hello", 1, "", "hello: bye"));
}

#[test]
fn psci_smc_on_plain_qemu_fails_visibly() {
    // Plain QEMU at EL1 has no SMC handler: the first call (the Call UID query) is UNDEFINED.
    let mut q = Qemu::start(QemuConfig::plain(guest_image("hello")).append("psci=smc"));
    q.wait_for("exception: unexpected synchronous", DEFAULT_TIMEOUT);
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 1);
    q.expect_no("hello:");
}

#[test]
fn a_bad_psci_bootarg_fails_the_guest_both_ways() {
    let bad = r#"boot: FAIL bootarg psci="hvcx" is neither hvc nor smc"#;
    let mut q = Qemu::start(QemuConfig::plain(guest_image("hello")).append("psci=hvcx"));
    q.wait_for(bad, DEFAULT_TIMEOUT);
    assert_eq!(q.wait_exit(DEFAULT_TIMEOUT), 1);
    // Under the monitor the failure ends only that VM (no semihosting): another VM goes on.
    let mut q = Qemu::start(
        monitor("bad_psci_bootarg")
            .guest(0, "hello", "cmdline=psci=hvcx")
            .guest(1, "counter", "mem=16M cmdline=ticks=3"),
    );
    wait_count(&q, &format!("[vm1] {bad}"), 1);
    wait_count(&q, &powered_off(1, 0), 1);
    wait_count(&q, "[vm2] counter: done 3", 1);
    q.expect_no("[vm1] hello:");
    q.kill();
}
