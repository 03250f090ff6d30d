//! Debian's arm64 Linux (guest-images/linux) under the monitor: it reaches its busybox shell with
//! one and with two vCPUs, answers on its console, logs no kernel warning, keeps guest time
//! (`sleep 5` is 5 s) and powers off cleanly. The boot time is compared with plain QEMU.
//!
//! The kernel and busybox come from Debian's package archive through
//! `guest-images/linux/build.sh`, once per machine (cached in `~/.cache/vmfork-linux` or
//! `$VMFORK_CACHE`). When they are not built yet and cannot be fetched (no network, no apt),
//! each test prints `SKIP: ...` and passes.

use std::time::Instant;

use vmfork_tests::linux::{one_at_a_time, with_linux, LinuxGuest, CMDLINE, SHELL_UP};
use vmfork_tests::{guest_or_skip, Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// The monitor on `-smp 2 -m 1G` with the Linux guest as vm1 (256 MiB, `cpus` vCPUs).
fn under_monitor(g: &LinuxGuest, cpus: u32, name: &str) -> Qemu {
    let cfg = QemuConfig::monitor().smp(2).mem_mib(1024).name(name);
    Qemu::start(with_linux(cfg, g, 256, cpus))
}

/// Types `line` into the shell and waits for the output line that contains `expect` (which must
/// not occur in the typed command itself).
fn run(q: &Qemu, line: &str, expect: &str) -> String {
    q.send(format!("{line}\n").as_bytes());
    q.wait_for(expect, DEFAULT_TIMEOUT)
}

/// The shell answers, the kernel logged no warning, `sleep 5` takes 5 s of guest time and no
/// less wall time, `poweroff -f` ends the VM and every frame comes back.
fn check_shell_clock_and_poweroff(q: &Qemu) {
    run(q, "echo hi-$((6*7))", "hi-42");

    let counts = run(
        q,
        "echo dmesg-warnings=$(dmesg | grep -c -E 'WARNING|BUG:|Call trace|Oops') x",
        "] dmesg-warnings=",
    );
    assert!(
        counts.ends_with("dmesg-warnings=0 x"),
        "the kernel logged warnings: {counts}\n{}",
        q.serial()
    );

    // Guest time over 5 s of sleep: the monotonic clock before and after, in centiseconds.
    let host = Instant::now();
    q.send(b"a=$(cut -d' ' -f1 /proc/uptime); sleep 5; b=$(cut -d' ' -f1 /proc/uptime); echo slept-cs=$(( (${b%.*}${b#*.}) - (${a%.*}${a#*.}) ))\n");
    let caps = q.wait_for_regex(r"\] slept-cs=(\d+)$", DEFAULT_TIMEOUT);
    let host_secs = host.elapsed().as_secs_f64();
    let guest_secs = caps[1].parse::<f64>().unwrap_or(-1.0) / 100.0;
    eprintln!("linux: sleep 5 took {guest_secs:.2} s of guest time, {host_secs:.2} s wall");
    // At least 5 s of guest time, and the guest's clock never runs ahead of the host's (no
    // upper bound beyond that: tests never fail on a wall-clock time).
    assert!(
        guest_secs >= 5.0,
        "sleep 5 took {guest_secs} s of guest time"
    );
    assert!(
        guest_secs <= host_secs + 0.05,
        "guest time {guest_secs} s against {host_secs} s of wall time"
    );

    q.send(b"poweroff -f\n");
    q.wait_for(
        "vm1: 'linux' powered off (PSCI SYSTEM_OFF); destroyed",
        DEFAULT_TIMEOUT,
    );
    let line = q.serial();
    let frames = regex::Regex::new(r"frames free (\d+) of (\d+)")
        .ok()
        .and_then(|re| re.captures_iter(&line).last())
        .map(|c| (c[1].to_string(), c[2].to_string()));
    match frames {
        Some((free, total)) => assert_eq!(free, total, "frames not returned after poweroff"),
        None => panic!("no `frames free` line after poweroff:\n{line}"),
    }
    q.expect_no("] WARN ");
    q.expect_no("] ERROR ");
    q.expect_no("unhandled exception");
    q.expect_no("external abort injected");
    q.expect_no("monitor: panic");
}

/// Seconds from QEMU's start to the line containing `pattern`.
fn seconds_until(q: &Qemu, started: Instant, pattern: &str) -> f64 {
    q.wait_for(pattern, DEFAULT_TIMEOUT);
    started.elapsed().as_secs_f64()
}

#[test]
fn linux_one_vcpu_boots_to_its_shell_plain_and_under_the_monitor() {
    let g = guest_or_skip!();
    let _one = one_at_a_time();
    let test = Instant::now();

    // Plain QEMU first: the reference time to the shell.
    let started = Instant::now();
    let mut plain = Qemu::start(
        QemuConfig::plain(&g.image)
            .mem_mib(256)
            .append(CMDLINE)
            .arg("-initrd")
            .arg(&g.initrd.display().to_string())
            .name("linux_plain"),
    );
    let plain_secs = seconds_until(&plain, started, "vmfork-linux: init up: ");
    plain.wait_for(SHELL_UP, DEFAULT_TIMEOUT);
    run(&plain, "echo hi-$((6*7))", "hi-42");
    plain.send(b"poweroff -f\n");
    plain.wait_for("reboot: Power down", DEFAULT_TIMEOUT);
    plain.kill();

    let started = Instant::now();
    let mut q = under_monitor(&g, 1, "linux_1vcpu");
    let monitor_secs = seconds_until(&q, started, "[vm1] vmfork-linux: init up: ");
    let line = q.serial();
    assert!(line.contains(" 1 cpu(s)"), "expected 1 cpu:\n{line}");
    q.wait_for(SHELL_UP, DEFAULT_TIMEOUT);
    check_shell_clock_and_poweroff(&q);
    q.kill();

    eprintln!(
        "linux: QEMU start to /init: plain {plain_secs:.1} s, under the monitor {monitor_secs:.1} s \
         ({:.1}x); test took {:.1} s",
        monitor_secs / plain_secs,
        test.elapsed().as_secs_f64()
    );
}

#[test]
fn linux_two_vcpus_boot_through_psci_cpu_on() {
    let g = guest_or_skip!();
    let _one = one_at_a_time();
    let test = Instant::now();
    let mut q = under_monitor(&g, 2, "linux_2vcpus");
    q.wait_for("[vm1] [", DEFAULT_TIMEOUT);
    q.wait_for("CPU1: Booted secondary processor", DEFAULT_TIMEOUT);
    q.wait_for("smp: Brought up 1 node, 2 CPUs", DEFAULT_TIMEOUT);
    q.wait_for("[vm1] vmfork-linux: init up: ", DEFAULT_TIMEOUT);
    let serial = q.serial();
    assert!(serial.contains(" 2 cpu(s)"), "expected 2 cpus:\n{serial}");
    // Work on both CPUs: each prints the CPU it ran on.
    q.wait_for(SHELL_UP, DEFAULT_TIMEOUT);
    run(
        &q,
        "for c in 0 1; do taskset -c $c sh -c 'echo on-cpu-$(( $(cut -d\" \" -f39 /proc/self/stat) + 100 ))'; done",
        "on-cpu-101",
    );
    assert!(
        q.count("on-cpu-100") >= 1,
        "CPU 0 did not answer:\n{}",
        q.serial()
    );
    check_shell_clock_and_poweroff(&q);
    q.kill();
    eprintln!(
        "linux: two-vCPU test took {:.1} s",
        test.elapsed().as_secs_f64()
    );
}
