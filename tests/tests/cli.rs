//! The real `vmfork` tool against the real monitor under QEMU.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmfork_tests::{
    vmfork_ok, vmfork_run, vmfork_tool, ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT,
};

/// Runs `vmfork` expecting failure; returns stderr.
fn fails(socket: &ControlSocket, args: &[&str]) -> String {
    let out = vmfork_run(socket, args);
    assert_eq!(out.status.code(), Some(1), "vmfork {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn boot(name: &str, socket: &ControlSocket, mem_mib: u64) -> QemuConfig {
    QemuConfig::monitor()
        .smp(2)
        .mem_mib(mem_mib)
        .name(name)
        .control(socket)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn fork_eight_list_console_pause_resume_reset_kill() {
    let socket = ControlSocket::new();
    let mut q = Qemu::start(boot("cli_fork", &socket, 1024).guest(0, "counter", "mem=32M"));
    q.wait_for("[vm1] counter: tick 1", DEFAULT_TIMEOUT);

    let ids = vmfork_ok(&socket, &["fork", "1", "--count", "8"]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    assert_eq!(ids, ["2", "3", "4", "5", "6", "7", "8", "9"]);
    let list = vmfork_ok(&socket, &["list"]);
    assert_eq!(list.lines().count(), 10, "header + 9 VMs:\n{list}");
    for id in 2..=9 {
        assert!(
            list.lines().any(
                |l| l.split_whitespace().take(2).collect::<Vec<_>>() == [&*id.to_string(), "1"]
            ),
            "vm{id} with parent 1 missing:\n{list}"
        );
    }
    let json = vmfork_ok(&socket, &["--json", "list"]);
    assert!(
        json.contains("\"parent\": 1") || json.contains("\"parent\":1"),
        "{json}"
    );

    // Console output of the parent and of a child, through the tool.
    for vm in ["1", "5"] {
        let out = Command::new(vmfork_tool())
            .args(["--socket"])
            .arg(socket.path())
            .args(["console", vm, "--linger", "1500"])
            .stdin(Stdio::null())
            .output()
            .expect("vmfork console");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("counter: tick"),
            "console of vm{vm}: {text:?}"
        );
    }

    // Pause, resume, reset of a fork, kill of the parent.
    vmfork_ok(&socket, &["pause", "3"]);
    assert!(vmfork_ok(&socket, &["info", "3"]).contains("paused"));
    vmfork_ok(&socket, &["resume", "3"]);
    assert!(vmfork_ok(&socket, &["info", "3"]).contains("running"));
    vmfork_ok(&socket, &["reset", "4"]);
    q.wait_for("vm4: reset to its fork point", DEFAULT_TIMEOUT);
    let err = fails(&socket, &["reset", "1"]);
    assert!(err.contains("not a fork"), "{err}");
    vmfork_ok(&socket, &["kill", "1"]);
    let err = fails(&socket, &["info", "1"]);
    assert!(err.contains("no such VM"), "{err}");
    let before = q.count("[vm9] counter: tick");
    wait_until("vm9 to go on after its parent died", || {
        q.count("[vm9] counter: tick") > before + 1
    });
    let stats = vmfork_ok(&socket, &["stats"]);
    assert!(
        stats.contains("vms:") && stats.contains("frames:"),
        "{stats}"
    );
    q.expect_no("panic");
    q.kill();
}

#[test]
fn diff_counts_exactly_the_pages_a_fork_wrote() {
    let socket = ControlSocket::new();
    let mut q = Qemu::start(boot("cli_diff", &socket, 512).guest(
        0,
        "forkloop",
        "mem=16M cmdline=mode=dirty pages=37",
    ));
    // Parent and child report in either order.
    wait_until("both sides of the fork to report", || {
        q.count("[vm2] C") == 1 && q.count("[vm1] P") == 1
    });
    let out = vmfork_ok(&socket, &["diff", "1", "2"]);
    assert!(out.contains("37 of 4096 pages differ"), "{out}");
    let json = vmfork_ok(&socket, &["--json", "diff", "1", "2"]);
    assert!(
        json.contains("\"differing_pages\": 37") || json.contains("\"differing_pages\":37"),
        "{json}"
    );
    q.kill();
}

#[test]
fn out_of_memory_pauses_a_fork_that_resumes_when_memory_comes_back() {
    let socket = ControlSocket::new();
    // 256 MiB: after the monitor's heap and the two guests, too little is left for the fork of
    // guest 0 to copy the 64 MiB it writes.
    let cfg = boot("cli_oom", &socket, 256)
        .guest(0, "forkloop", "mem=96M cmdline=mode=reset resets=1 mib=64")
        .guest(1, "counter", "mem=64M");
    let mut q = Qemu::start(cfg);
    q.wait_for(
        "vm3: paused: no free frame for a copy-on-write fault",
        DEFAULT_TIMEOUT,
    );
    let info = vmfork_ok(&socket, &["info", "3"]);
    assert!(info.contains("out of memory"), "{info}");
    // Memory comes back when another VM goes; then the fork can go on and finish.
    vmfork_ok(&socket, &["kill", "2"]);
    q.wait_for(
        "vm2: 'guest1' killed by the control channel",
        DEFAULT_TIMEOUT,
    );
    vmfork_ok(&socket, &["resume", "3"]);
    q.wait_for("[vm3] forkloop: reset ok resets=1", DEFAULT_TIMEOUT);
    q.expect_no("FAIL");
    q.kill();
}

#[test]
fn errors_are_one_line_and_exit_one() {
    let socket = ControlSocket::new();
    let err = fails(&socket, &["list"]);
    assert!(err.contains("cannot connect to the monitor"), "{err}");
    assert!(err.contains("make qemu-virt"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let mut q = Qemu::start(boot("cli_errors", &socket, 512).guest(0, "counter", "mem=16M"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let err = fails(&socket, &["kill", "77"]);
    assert_eq!(err.trim_end(), "vmfork: no such VM: 77");
    let err = fails(&socket, &["fork", "77"]);
    assert!(err.contains("no such VM"), "{err}");
    q.kill();
}

#[test]
fn dump_then_restore_continues_from_the_dumped_state_even_on_a_fresh_monitor() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("vm1.snap");
    let file_s = file.to_str().expect("utf-8 path");

    let socket = ControlSocket::new();
    let mut q = Qemu::start(boot("cli_dump", &socket, 512).guest(0, "counter", "mem=16M"));
    q.wait_for("[vm1] counter: tick 5", DEFAULT_TIMEOUT);
    let out = vmfork_ok(&socket, &["dump", "1", file_s]);
    assert!(out.contains("written to"), "{out}");
    // The dumped VM kept running, and the snapshot fork is gone once read out.
    q.wait_for("'guest0.dump' snapshot read out", DEFAULT_TIMEOUT);
    let at_dump = q.count("[vm1] counter: tick");
    q.wait_for(
        &format!("[vm1] counter: tick {}", at_dump + 2),
        DEFAULT_TIMEOUT,
    );
    let id = vmfork_ok(&socket, &["restore", file_s]);
    let id = id.trim();
    // The restored VM counts on from where the dump was taken, not from 1.
    let caps = q.wait_for_regex(&format!(r"\[vm{id}\] counter: tick (\d+)"), DEFAULT_TIMEOUT);
    let first: u64 = caps[1].parse().unwrap();
    assert!(first >= 5, "the restored VM started counting at {first}");
    q.kill();

    // A monitor booted with no guest at all restores it too.
    let socket2 = ControlSocket::new();
    let mut q2 = Qemu::start(boot("cli_restore_fresh", &socket2, 512));
    q2.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    assert_eq!(vmfork_ok(&socket2, &["restore", file_s]).trim(), "1");
    let caps = q2.wait_for_regex(r"\[vm1\] counter: tick (\d+)", DEFAULT_TIMEOUT);
    let first: u64 = caps[1].parse().unwrap();
    assert!(first >= 5, "the restored VM started counting at {first}");
    // A damaged snapshot is refused with a clear error and changes nothing.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, &bytes).unwrap();
    let err = fails(&socket2, &["restore", bad.to_str().unwrap()]);
    assert!(err.contains("snapshot") || err.contains("CRC"), "{err}");
    assert_eq!(vmfork_ok(&socket2, &["list"]).lines().count(), 2);
    q2.kill();
}

#[test]
fn create_boots_a_guest_sent_over_the_channel() {
    let socket = ControlSocket::new();
    let mut q = Qemu::start(boot("cli_create", &socket, 512));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let counter = vmfork_tests::guest_image("counter");
    let id = vmfork_ok(
        &socket,
        &[
            "create",
            "--kernel",
            counter.to_str().unwrap(),
            "--mem",
            "32M",
            "--cpus",
            "2",
            "--cmdline",
            "ticks=3",
        ],
    );
    assert_eq!(id.trim(), "1");
    q.wait_for("[vm1] counter: done 3", DEFAULT_TIMEOUT);
    // Not a kernel, and a size the monitor refuses: one clear line each, nothing created.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 5000]).unwrap();
    let err = fails(
        &socket,
        &["create", "--kernel", junk.to_str().unwrap(), "--mem", "16M"],
    );
    assert!(err.contains("cannot load the kernel"), "{err}");
    let err = fails(
        &socket,
        &[
            "create",
            "--kernel",
            counter.to_str().unwrap(),
            "--mem",
            "3M",
        ],
    );
    assert!(
        err.contains("multiple of 2 MiB") || err.contains("2M"),
        "{err}"
    );
    q.kill();
}

/// `vmfork console` of a guest that powers off: everything it printed last arrives, then why it
/// went, and the tool exits with status 3 (before: `echo: line on`, no `bye`, and the tool
/// stayed attached to a VM that no longer existed).
#[test]
fn a_console_gets_the_last_words_of_a_vm_that_powers_off_and_says_why() {
    use std::io::Write as _;
    let socket = ControlSocket::new();
    let mut q = Qemu::start(boot("cli_last_words", &socket, 512).guest(0, "echo", "mem=16M"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let mut child = Command::new(vmfork_tool())
        .arg("--socket")
        .arg(socket.path())
        .args(["console", "1", "--linger", "60000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmfork console");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"line one\nquit\n").unwrap();
    drop(stdin);
    // The tool ends by itself when the VM goes (long before the linger), or the harness's
    // timeout kills QEMU and the tool sees the channel close.
    q.wait_for("vm1: 'guest0' powered off", DEFAULT_TIMEOUT);
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmfork console did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("echo: line one"), "stdout: {stdout:?}");
    assert!(stdout.contains("echo: bye"), "stdout: {stdout:?}");
    assert!(
        stderr.contains("vm1 powered off (PSCI SYSTEM_OFF)"),
        "stderr: {stderr:?}"
    );
    assert_eq!(status.code(), Some(3), "stderr: {stderr:?}");
    q.kill();
}
