//! Forking Debian's arm64 Linux (guest-images/linux) while it runs, from the host with the
//! `vmfork` tool: parent and child both go on (a shell loop started before the fork prints in
//! both), each shell answers on its own console, a file written in the child's `/tmp` is absent
//! in the parent, the two share the memory neither wrote since, and only the child's kernel
//! reseeds its RNG through the `microsoft,vmgenid` device; `reset` takes the fork back to its
//! fork point, where it reseeds again (a 2-vCPU guest). Eight forks of a 1-vCPU guest all answer and give their memory
//! back when killed in any order.
//!
//! The guest is built as for `tests/tests/linux.rs` (`guest-images/linux/build.sh`, cached per
//! machine); when it is not built and cannot be fetched, each test prints `SKIP: ...` and passes.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmfork_tests::linux::{one_at_a_time, with_linux, LinuxGuest, SHELL_UP};
use vmfork_tests::{
    guest_or_skip, vmfork_ok, vmfork_tool, ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT,
};

/// The guest's RAM, in MiB and in 4 KiB pages.
const GUEST_MIB: u64 = 256;
const GUEST_PAGES: u64 = GUEST_MIB * 256;
/// What Linux 6.12 logs when the vmgenid interrupt says the generation ID changed.
const RESEED: &str = "crng reseeded due to virtual machine fork";
/// The shell loop started before a fork: it prints `tick-N` once a second, in the background.
const TICK_LOOP: &str = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done &\n";

/// The monitor on `-smp 2 -m <host_mib>` with its control channel on `socket` and the Linux guest
/// as vm1 (256 MiB, `cpus` vCPUs).
fn under_monitor(g: &LinuxGuest, socket: &ControlSocket, cpus: u32, host_mib: u64) -> Qemu {
    let cfg = QemuConfig::monitor()
        .smp(2)
        .mem_mib(host_mib)
        .control(socket);
    Qemu::start(with_linux(cfg, g, GUEST_MIB, cpus))
}

/// Types `line` into `vm`'s console with `vmfork console <vm>` (piped stdin), which keeps
/// printing the VM's output for a moment after its input ends; returns that output.
fn type_into(socket: &ControlSocket, vm: u32, line: &str) -> String {
    let mut child = Command::new(vmfork_tool())
        .arg("--socket")
        .arg(socket.path())
        .args(["console", &vm.to_string(), "--linger", "3000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmfork console");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to vmfork console");
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    let status = child.wait().expect("wait for vmfork console");
    assert!(status.success(), "vmfork console {vm} failed: {err}");
    out
}

/// Polls the whole serial log until `done` holds for it; returns that log.
fn wait_log(q: &Qemu, what: &str, mut done: impl FnMut(&str) -> bool) -> String {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    loop {
        let log = q.serial();
        if done(&log) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; serial log:\n{log}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Whether some `[vm<vm>] ` line of `log` contains `text`.
fn vm_said(log: &str, vm: u32, text: &str) -> bool {
    let prefix = format!("[vm{vm}] ");
    log.lines()
        .any(|l| l.starts_with(&prefix) && l.contains(text))
}

/// The `tick-N` numbers `vm` printed in `log`, in order. The loop's output may share a line with
/// the shell's prompt, so `tick-N` is looked for at a line's end; the typed loop itself reads
/// `tick-$i`, which is not a number.
fn ticks(log: &str, vm: u32) -> Vec<u64> {
    let prefix = format!("[vm{vm}] ");
    log.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.trim_end().rsplit_once("tick-"))
        .filter_map(|(_, n)| n.parse().ok())
        .collect()
}

/// Types `line` into `vm`'s console and waits until the VM printed `answer` (which the typed line
/// itself must not contain) on the serial log.
fn ask(q: &Qemu, socket: &ControlSocket, vm: u32, line: &str, answer: &str) {
    assert!(!line.contains(answer), "{line:?} would echo {answer:?}");
    let out = type_into(socket, vm, line);
    wait_log(q, &format!("vm{vm} to answer {answer}"), |log| {
        vm_said(log, vm, answer)
    });
    // The console client saw the same answer, unless it detached just before it came.
    if !out.contains(answer) {
        eprintln!("linux_fork: vm{vm}'s answer {answer} came after its console detached");
    }
}

/// A `key: value` number from `vmfork info` / `vmfork stats` output.
fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{key}` number in:\n{text}"))
}

/// Used and free frames from `vmfork stats` output.
fn frames(stats: &str) -> (u64, u64) {
    let re = regex::Regex::new(r"frames: +(\d+) used, (\d+) free").expect("regex");
    re.captures(stats)
        .and_then(|c| Some((c[1].parse().ok()?, c[2].parse().ok()?)))
        .unwrap_or_else(|| panic!("no frames line in:\n{stats}"))
}

/// With no VM left, the monitor holds only its own few frames (the control channel's buffers):
/// nothing of any VM's 256 MiB (65,536 frames) or its tables, and the last teardown line agrees.
fn assert_all_memory_back(socket: &ControlSocket, q: &Qemu) {
    let stats = vmfork_ok(socket, &["stats"]);
    let (used, free) = frames(&stats);
    let teardown = last_frames_free(&q.serial()).expect("a `frames free` teardown line");
    eprintln!("linux_fork: all killed: {stats}");
    assert_eq!(field(&stats, "vms:"), 0, "{stats}");
    assert_eq!(
        teardown.0, free,
        "teardown line {teardown:?} against {stats}"
    );
    assert!(used < 64, "frames still used with no VM left:\n{stats}");
}

/// The last `frames free X of Y` teardown line of the log.
fn last_frames_free(log: &str) -> Option<(u64, u64)> {
    let re = regex::Regex::new(r"frames free (\d+) of (\d+)").ok()?;
    let c = re.captures_iter(log).last()?;
    Some((c[1].parse().ok()?, c[2].parse().ok()?))
}

/// Boots Linux as vm1 (`cpus` vCPUs) under the monitor and starts the tick loop in its shell (typed on the
/// monitor's console, whose focus is on vm1); returns when vm1 has printed a few ticks.
fn boot_with_ticks(g: &LinuxGuest, socket: &ControlSocket, cpus: u32, host_mib: u64) -> Qemu {
    let q = under_monitor(g, socket, cpus, host_mib);
    let up = q.wait_for("[vm1] vmfork-linux: init up: ", DEFAULT_TIMEOUT);
    assert!(
        up.contains(&format!(" {cpus} cpu(s)")),
        "expected {cpus} cpu(s): {up}"
    );
    q.wait_for(SHELL_UP, DEFAULT_TIMEOUT);
    q.send(TICK_LOOP.as_bytes());
    wait_log(&q, "vm1's tick-2", |log| ticks(log, 1).contains(&2));
    q
}

fn check_monitor_log_clean(q: &Qemu) {
    q.expect_no("] WARN ");
    q.expect_no("] ERROR ");
    q.expect_no("unhandled exception");
    q.expect_no("external abort injected");
    q.expect_no("monitor: panic");
}

#[test]
fn linux_forked_from_the_host_runs_on_in_both_with_own_consoles_tmp_and_rng_then_resets() {
    let g = guest_or_skip!();
    let _one = one_at_a_time();
    let test = Instant::now();
    let socket = ControlSocket::new();
    let mut q = boot_with_ticks(&g, &socket, 2, 1024);

    let fork_started = Instant::now();
    assert_eq!(vmfork_ok(&socket, &["fork", "1"]).trim(), "2");
    let forked_at = fork_started.elapsed();
    let at_fork = ticks(&q.serial(), 1).last().copied().unwrap_or(0);
    q.wait_for("vm1: forked vm2 in", DEFAULT_TIMEOUT);

    // Both go on: the loop started before the fork prints in both, past the fork point.
    let log = wait_log(&q, "ticks in vm1 and vm2 after the fork", |log| {
        ticks(log, 1).iter().any(|&t| t >= at_fork + 3)
            && ticks(log, 2).iter().any(|&t| t >= at_fork + 3)
    });
    let child_ticks = ticks(&log, 2);
    assert!(
        child_ticks.first().is_some_and(|&t| t <= at_fork + 2),
        "the child's loop does not go on from the fork point (tick {at_fork}): {child_ticks:?}"
    );
    assert!(
        child_ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "the child's ticks are not consecutive: {child_ticks:?}"
    );

    // The child's kernel learnt it is a clone from the vmgenid interrupt.
    wait_log(&q, "the child's crng reseed", |log| vm_said(log, 2, RESEED));

    // Each shell answers on its own console.
    ask(&q, &socket, 1, "echo parent-$((6*7))", "parent-42");
    ask(&q, &socket, 2, "echo child-$((6*7))", "child-42");
    let log = q.serial();
    assert!(!vm_said(&log, 2, "parent-42") && !vm_said(&log, 1, "child-42"));

    // A file written in the child's /tmp is absent in the parent.
    ask(
        &q,
        &socket,
        2,
        "echo x > /tmp/childfile; test -e /tmp/childfile && echo child-has-$((1+1))",
        "child-has-2",
    );
    ask(
        &q,
        &socket,
        1,
        "ls /tmp/childfile || echo parent-lacks-$((1+1))",
        "parent-lacks-2",
    );
    ask(
        &q,
        &socket,
        2,
        "echo child-reseeds=$(dmesg | grep -c 'virtual machine fork')",
        "child-reseeds=1",
    );
    ask(
        &q,
        &socket,
        1,
        "echo parent-reseeds=$(dmesg | grep -c 'virtual machine fork')",
        "parent-reseeds=0",
    );
    assert!(
        !vm_said(&q.serial(), 1, RESEED),
        "the parent reseeded as if it were the fork"
    );

    // The two share what neither wrote since the fork.
    let info = vmfork_ok(&socket, &["info", "2"]);
    let (private, shared) = (
        field(&info, "private pages:"),
        field(&info, "shared pages:"),
    );
    let parent = vmfork_ok(&socket, &["info", "1"]);
    eprintln!(
        "linux_fork: after the fork, vm2 has {private} private and {shared} shared pages, vm1 {} \
         private and {} shared, of {GUEST_PAGES}",
        field(&parent, "private pages:"),
        field(&parent, "shared pages:")
    );
    assert!(
        shared >= 10 * private && private < GUEST_PAGES / 20,
        "vm2 shares too little with vm1:\n{info}"
    );

    // Reset: the child goes back to its fork point; its /tmp file is gone, its ticks go back.
    let child_before = ticks(&q.serial(), 2).last().copied().unwrap_or(0);
    vmfork_ok(&socket, &["reset", "2"]);
    q.wait_for("vm2: reset to its fork point", DEFAULT_TIMEOUT);
    let reset_at = q.serial().len();
    let after = wait_log(&q, "vm2's ticks after its reset", |log| {
        !ticks(&log[reset_at..], 2).is_empty()
    });
    let first = ticks(&after[reset_at..], 2)[0];
    assert!(
        first < child_before && first <= at_fork + 2,
        "vm2's ticks did not go back to the fork point (tick {at_fork}): {first} after \
         {child_before}"
    );
    ask(
        &q,
        &socket,
        2,
        "test -e /tmp/childfile || echo reset-lacks-$((1+1))",
        "reset-lacks-2",
    );
    // A reset is a new generation too (its RNG state went back with its memory): the child's
    // kernel reseeds again, from a new vmgenid ID written before the interrupt that announces
    // it. Its dmesg went back to the fork point, which had no reseed, so it has one again.
    let reset_line = q
        .serial()
        .find("vm2: reset to its fork point")
        .expect("the reset line");
    wait_log(&q, "the reset child's crng reseed", |log| {
        vm_said(&log[reset_line..], 2, RESEED)
    });
    ask(
        &q,
        &socket,
        2,
        "echo reset-reseeds=$(dmesg | grep -c 'virtual machine fork')",
        "reset-reseeds=1",
    );
    // The parent went on as it was.
    ask(
        &q,
        &socket,
        1,
        "echo parent-still-$((6*7))",
        "parent-still-42",
    );

    // The parent dies first: the child runs on with the memory it shared, then dies too.
    vmfork_ok(&socket, &["kill", "1"]);
    q.wait_for("vm1: 'linux' killed", DEFAULT_TIMEOUT);
    ask(&q, &socket, 2, "echo orphan-$((6*7))", "orphan-42");
    vmfork_ok(&socket, &["kill", "2"]);
    q.wait_for("vm2: 'linux.1' killed", DEFAULT_TIMEOUT);
    assert_all_memory_back(&socket, &q);

    check_monitor_log_clean(&q);
    q.kill();
    eprintln!(
        "linux_fork: fork took {:.0} ms from the host; test took {:.1} s",
        forked_at.as_secs_f64() * 1000.0,
        test.elapsed().as_secs_f64()
    );
}

#[test]
fn linux_forked_eight_times_all_nine_answer_and_killing_them_returns_the_memory() {
    let g = guest_or_skip!();
    let _one = one_at_a_time();
    let test = Instant::now();
    let socket = ControlSocket::new();
    let mut q = boot_with_ticks(&g, &socket, 1, 1024);
    let booted = vmfork_ok(&socket, &["stats"]);
    eprintln!("linux_fork: after boot:\n{booted}");

    let ids = vmfork_ok(&socket, &["fork", "1", "--count", "8"]);
    let ids: Vec<u32> = ids
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    assert_eq!(ids, [2, 3, 4, 5, 6, 7, 8, 9]);
    let list = vmfork_ok(&socket, &["list"]);
    assert_eq!(list.lines().count(), 10, "header + 9 VMs:\n{list}");

    // All nine run on: each one's loop ticks on and its shell answers on its own console.
    let at_fork = ticks(&q.serial(), 1).last().copied().unwrap_or(0);
    wait_log(&q, "every VM to tick after the fork", |log| {
        (1..=9).all(|vm| ticks(log, vm).iter().any(|&t| t > at_fork + 1))
    });
    for vm in 1..=9u32 {
        ask(
            &q,
            &socket,
            vm,
            &format!("echo vm-$(({vm}*100+42))"),
            &format!("vm-{}", vm * 100 + 42),
        );
    }
    // Every child's kernel, and only the children's, reseeded its RNG.
    let log = wait_log(&q, "every child's crng reseed", |log| {
        (2..=9).all(|vm| vm_said(log, vm, RESEED))
    });
    assert!(!vm_said(&log, 1, RESEED), "the parent reseeded");
    let stats = vmfork_ok(&socket, &["stats"]);
    eprintln!("linux_fork: nine VMs:\n{stats}");

    // The forks killed in an order that is neither forward nor backward: every frame they took
    // comes back while the parent lives (its copies replace the frames it shared).
    for vm in [5u32, 9, 2, 7, 3, 8, 4, 6] {
        vmfork_ok(&socket, &["kill", &vm.to_string()]);
        // vm2..vm9 are vm1's forks 1 to 8: named linux.1 .. linux.8.
        q.wait_for(
            &format!("vm{vm}: 'linux.{}' killed", vm - 1),
            DEFAULT_TIMEOUT,
        );
    }
    let (free, total) = last_frames_free(&q.serial()).expect("a `frames free` teardown line");
    let (_, booted_free) = frames(&booted);
    eprintln!("linux_fork: forks killed: frames free {free} of {total}, {booted_free} after boot");
    assert_eq!(
        free, booted_free,
        "the forks' frames did not all come back (after boot: {booted})"
    );
    ask(
        &q,
        &socket,
        1,
        "echo parent-alone-$((6*7))",
        "parent-alone-42",
    );
    vmfork_ok(&socket, &["kill", "1"]);
    q.wait_for("vm1: 'linux' killed", DEFAULT_TIMEOUT);
    assert_all_memory_back(&socket, &q);
    check_monitor_log_clean(&q);
    q.kill();
    eprintln!(
        "linux_fork: eight-fork test took {:.1} s",
        test.elapsed().as_secs_f64()
    );
}
