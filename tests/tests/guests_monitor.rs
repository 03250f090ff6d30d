//! The test guests under the monitor: each alone (compared line by line with the same guest on
//! plain QEMU), several at once on fewer physical CPUs, and teardown giving every frame back.

use vmfork_tests::{plain_lines, vm_lines, wait_count, Qemu, QemuConfig, DEFAULT_TIMEOUT};

fn monitor(name: &str) -> QemuConfig {
    QemuConfig::monitor().smp(2).mem_mib(1024).name(name)
}

/// Runs `image` alone under the monitor with `cpus` vCPUs and compares its output with a plain
/// QEMU run with as many CPUs.
fn same_output_both_ways(image: &str, cpus: u32, cmdline: &str, last: &str) {
    let expected = plain_lines(image, cpus, cmdline, last);
    let config = if cmdline.is_empty() {
        format!("cpus={cpus}")
    } else {
        format!("cpus={cpus} cmdline={cmdline}")
    };
    let mut q = Qemu::start(monitor(&format!("{image}_under_monitor")).guest(0, image, &config));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    q.wait_for(&format!("[vm1] {last}"), DEFAULT_TIMEOUT);
    q.wait_for(
        "vm1: 'guest0' powered off (PSCI SYSTEM_OFF); destroyed",
        DEFAULT_TIMEOUT,
    );
    assert_eq!(
        vm_lines(&q, 1),
        expected,
        "{image}: output differs from plain QEMU"
    );
    q.expect_no("unexpected exception");
    q.expect_no("panic");
    q.kill();
}

#[test]
fn hello_matches_plain_qemu() {
    same_output_both_ways("hello", 1, "", "hello: bye");
}

#[test]
fn counter_matches_plain_qemu() {
    same_output_both_ways("counter", 1, "ticks=5", "counter: done 5");
}

#[test]
fn memcheck_matches_plain_qemu() {
    same_output_both_ways("memcheck", 1, "mib=16", "memcheck: ok");
}

#[test]
fn smp_with_four_vcpus_on_two_cpus_matches_plain_qemu() {
    same_output_both_ways("smp", 4, "", "smp: all 4 cpus up");
}

#[test]
fn four_guests_share_two_cpus_and_all_progress() {
    let mut cfg = monitor("four_guests");
    for i in 0..4 {
        cfg = cfg.guest(i, "counter", "mem=16M cmdline=ticks=10");
    }
    let mut q = Qemu::start(cfg);
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    // The four finish in any order: wait until all four have been torn down.
    wait_count(&q, "powered off (PSCI SYSTEM_OFF); destroyed", 4);
    let serial = q.serial();
    for vm in 1..=4 {
        let lines = vm_lines(&q, vm);
        let expected: Vec<String> = (1..=10)
            .map(|n| format!("counter: tick {n}"))
            .chain(std::iter::once("counter: done 10".to_string()))
            .collect();
        assert_eq!(lines, expected, "vm{vm} did not count to 10");
    }
    // They ran at the same time: every VM ticked before any of them finished.
    let first_done = serial.find("counter: done").expect("a done line");
    for vm in 1..=4 {
        let tick = serial
            .find(&format!("[vm{vm}] counter: tick 2"))
            .expect("a tick line");
        assert!(
            tick < first_done,
            "vm{vm} only started after another VM had finished"
        );
    }
    q.kill();
}

#[test]
fn powered_off_guest_gives_every_frame_back() {
    let mut q = Qemu::start(monitor("teardown_frames").append("log=debug").guest(
        0,
        "memcheck",
        "mem=32M cmdline=mib=8",
    ));
    let before = q.wait_for_regex(r"frames: (\d+) free of (\d+)", DEFAULT_TIMEOUT);
    q.wait_for("vm1: created", DEFAULT_TIMEOUT);
    let after = q.wait_for_regex(
        r"vm1: 'guest0' powered off \(PSCI SYSTEM_OFF\); destroyed, its 32 MiB of RAM returned; frames free (\d+) of (\d+)",
        DEFAULT_TIMEOUT,
    );
    assert_eq!(
        before[1], after[1],
        "free frames after teardown differ from boot"
    );
    assert_eq!(before[2], after[2]);
    q.kill();
}

#[test]
fn a_guest_that_fails_to_load_does_not_stop_the_others() {
    // Guest 0 is not a kernel at all; guest 1 must still run.
    let dir = std::env::temp_dir().join(format!("vmfork-notakernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, vec![0x5au8; 8192]).expect("write junk");
    let cfg = monitor("bad_kernel_then_good")
        .arg("-fw_cfg")
        .arg(&format!("name=opt/vmfork/0/kernel,file={}", junk.display()));
    let mut q = Qemu::start(cfg.guest(1, "hello", ""));
    q.wait_for(
        "guest 0: not started: cannot load the kernel",
        DEFAULT_TIMEOUT,
    );
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    q.wait_for("[vm1] hello: bye", DEFAULT_TIMEOUT);
    q.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_accesses_abort_in_the_guest_while_others_run() {
    let expected = plain_lines("badaccess", 1, "", "badaccess: still running");
    let cfg = monitor("badaccess_and_counter").guest(0, "badaccess", "");
    let mut q = Qemu::start(cfg.guest(1, "counter", "cmdline=ticks=5"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    wait_count(&q, "powered off (PSCI SYSTEM_OFF); destroyed", 2);
    assert_eq!(q.count("[vm2] counter: done 5"), 1);
    // The guest saw the same aborts as on plain QEMU (data abort, external abort, WnR right).
    assert_eq!(vm_lines(&q, 1), expected);
    assert_eq!(q.count("hits no RAM or device: external abort injected"), 2);
    q.kill();
}

#[test]
fn an_unhandled_exception_class_stops_only_that_vm() {
    let cfg = monitor("sve_trap").guest(0, "badaccess", "cmdline=trap=sve");
    let mut q = Qemu::start(cfg.guest(1, "counter", "cmdline=ticks=5"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let stop = q.wait_for(
        "vm1: stopping: unhandled exception from the guest: trapped SVE access (EC 0x19)",
        DEFAULT_TIMEOUT,
    );
    assert!(stop.contains("PC 0x"), "{stop}");
    wait_count(&q, "[vm2] counter: done 5", 1);
    // The dump names the vCPU and shows its registers.
    assert_eq!(q.count("vm1 vcpu0: PC "), 1);
    assert!(q.count("x30=") >= 1);
    q.expect_no("badaccess: SVE vector length");
    q.kill();
}
