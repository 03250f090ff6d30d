//! `vmfork wait`, `events` and `top` against the real monitor under QEMU (issue 16 item 3): one
//! boot of the counter guest, behind `vmfork mux` (QEMU's socket serves one client at a time,
//! and `events` and `wait` stay connected while other commands run).

use std::process::{Command, Stdio};
use std::time::Duration;

use vmfork_tests::{
    vmfork_ok, vmfork_run, vmfork_tool, ControlSocket, MuxProcess, Qemu, QemuConfig,
    DEFAULT_TIMEOUT,
};

#[test]
fn wait_events_and_top_see_a_fork_and_a_pause() {
    let qemu_socket = ControlSocket::new();
    let socket = ControlSocket::new();
    let mut q = Qemu::start(
        QemuConfig::monitor()
            .smp(2)
            .mem_mib(512)
            .name("lifecycle_watch")
            .control(&qemu_socket)
            .guest(0, "counter", "mem=16M"),
    );
    q.wait_for("[vm1] counter: tick 1", DEFAULT_TIMEOUT);
    let _mux = MuxProcess::start(&qemu_socket, &socket);

    // The stream, started before anything happens: a fork made paused is `forked` and then
    // `paused` (one look at the list sees both, before any `cow` event of that look).
    let events = Command::new(vmfork_tool())
        .arg("--socket")
        .arg(socket.path())
        .args(["events", "--count", "2", "--interval", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmfork events");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vmfork_ok(&socket, &["fork", "1", "--paused"]).trim(), "2");
    let e = events.wait_with_output().unwrap();
    assert!(
        e.status.success(),
        "events: {}",
        String::from_utf8_lossy(&e.stderr)
    );
    let evs: Vec<serde_json::Value> = String::from_utf8_lossy(&e.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!(evs[0]["event"], "forked", "{evs:?}");
    assert_eq!(evs[0]["vm"], 2);
    assert_eq!(evs[0]["parent"], 1);
    assert_eq!(evs[1]["event"], "paused", "{evs:?}");
    assert_eq!(evs[1]["vm"], 2);
    assert_eq!(evs[1]["reason"], "forked");
    vmfork_ok(&socket, &["resume", "2"]);

    // A wait that the pause ends.
    let wait = Command::new(vmfork_tool())
        .arg("--socket")
        .arg(socket.path())
        .args(["wait", "vm2", "--state", "paused", "--timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmfork wait");
    std::thread::sleep(Duration::from_millis(500));
    vmfork_ok(&socket, &["pause", "2"]);
    let w = wait.wait_with_output().unwrap();
    assert!(
        w.status.success(),
        "wait: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    let line = String::from_utf8_lossy(&w.stdout);
    assert!(
        line.starts_with("vm2 ") && line.contains("paused (requested)"),
        "{line}"
    );

    // Already there, and a timeout.
    let o = vmfork_run(
        &socket,
        &["wait", "1", "--state", "paused", "--timeout", "0.5"],
    );
    assert_eq!(
        o.status.code(),
        Some(12),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // One table of both VMs, the parent running and using its vCPU.
    let top = vmfork_ok(&socket, &["top", "--once", "--interval", "500"]);
    let lines: Vec<&str> = top.lines().collect();
    assert_eq!(lines.len(), 4, "{top}");
    assert!(lines[0].contains("2 VMs live"), "{top}");
    assert!(
        lines[1].contains("VCPU%") && lines[1].contains("UPTIME"),
        "{top}"
    );
    let row1: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(row1[0], "1", "{top}");
    assert_eq!(row1[2], "running", "{top}");
    assert_ne!(row1[3], "-", "vm1's VCPU%: {top}");
    let row2: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(row2[0], "2", "{top}");
    assert_eq!(row2[2], "paused", "{top}");
    q.expect_no("panic");
    q.kill();
}

/// The lifecycle on the real monitor: `create --paused` runs nothing until resumed; a guest that
/// powers off stays listed, stopped, with its last words on its console, until `rm`; `--rm`
/// keeps no record; `restore --paused`; `rm --force` of a live VM.
#[test]
fn stopped_vms_stay_listed_until_rm_and_paused_starts_run_nothing() {
    let socket = ControlSocket::new();
    let mut q = Qemu::start(
        QemuConfig::monitor()
            .smp(2)
            .mem_mib(512)
            .name("lifecycle_flags")
            .control(&socket),
    );
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let row = |id: u32| {
        let list = vmfork_ok(&socket, &["list"]);
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
            .map(str::to_string)
    };
    let hello = vmfork_tests::guest_image("hello");
    let hello = hello.to_str().unwrap();
    let counter = vmfork_tests::guest_image("counter");
    let counter = counter.to_str().unwrap();

    // Created paused: it has not run, so it has not said hello.
    let id = vmfork_ok(
        &socket,
        &["create", "--kernel", hello, "--mem", "16M", "--paused"],
    );
    assert_eq!(id.trim(), "1");
    assert!(
        row(1).unwrap().contains("paused (created paused)"),
        "{:?}",
        row(1)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(q.count("[vm1] hello:"), 0, "a VM created paused ran");
    // Resumed, it says hello and powers off: its record stays, with its last words.
    vmfork_ok(&socket, &["resume", "hello"]);
    q.wait_for("vm1: 'hello' powered off", DEFAULT_TIMEOUT);
    let r = row(1).expect("no record of the VM that powered off");
    assert!(r.contains("stopped (power off)"), "{r}");
    let o = vmfork_run(&socket, &["console", "1"]);
    assert_eq!(o.status.code(), Some(10), "console of a stopped VM");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("hello: bye"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("vm1 powered off"));
    let o = vmfork_run(&socket, &["pause", "1"]);
    assert_eq!(o.status.code(), Some(11), "pause of a stopped VM");
    vmfork_ok(&socket, &["rm", "hello"]);
    assert_eq!(row(1), None);

    // --rm: gone from the list as soon as it stops.
    let id = vmfork_ok(
        &socket,
        &["create", "--kernel", hello, "--mem", "16M", "--rm"],
    );
    assert_eq!(id.trim(), "2");
    q.wait_for("vm2: 'hello' powered off", DEFAULT_TIMEOUT);
    let o = vmfork_run(&socket, &["info", "2"]);
    assert_eq!(o.status.code(), Some(4), "a --rm VM left a record");

    // restore --paused: the copy waits; rm --force kills a live VM and keeps nothing.
    let id = vmfork_ok(&socket, &["create", "--kernel", counter, "--mem", "16M"]);
    assert_eq!(id.trim(), "3");
    q.wait_for("[vm3] counter: tick 2", DEFAULT_TIMEOUT);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("counter.snap");
    vmfork_ok(&socket, &["dump", "3", snap.to_str().unwrap()]);
    let id = vmfork_ok(&socket, &["restore", snap.to_str().unwrap(), "--paused"]);
    assert_eq!(id.trim(), "4");
    assert!(
        row(4).unwrap().contains("paused (restored paused)"),
        "{:?}",
        row(4)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        q.count("[vm4] counter: tick"),
        0,
        "a VM restored paused ran"
    );
    vmfork_ok(&socket, &["resume", "4"]);
    q.wait_for("[vm4] counter: tick", DEFAULT_TIMEOUT);
    let o = vmfork_run(&socket, &["rm", "4"]);
    assert_eq!(o.status.code(), Some(7), "rm of a live VM without --force");
    vmfork_ok(&socket, &["rm", "--force", "4"]);
    q.wait_for(
        "vm4: 'counter' killed by the control channel",
        DEFAULT_TIMEOUT,
    );
    assert_eq!(row(4), None);
    assert!(row(3).unwrap().contains("running"));
    q.expect_no("panic");
    q.kill();
}
