//! The real `vmfork` tool against the real monitor under QEMU.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmfork_tests::{
    vmfork_ok, vmfork_run, vmfork_tool, ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT,
};

/// Runs `vmfork` expecting failure with exit status `code`; returns stderr.
fn fails(socket: &ControlSocket, code: i32, args: &[&str]) -> String {
    let out = vmfork_run(socket, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "vmfork {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

    // Pause, resume, reset of a fork, kill of the parent. A VM is named by its id, by vmN or
    // by its name (forks have names of their own).
    let vms: serde_json::Value = serde_json::from_str(&json).unwrap();
    let name3 = vms
        .as_array()
        .and_then(|a| a.iter().find(|v| v["id"] == 3))
        .and_then(|v| v["name"].as_str())
        .expect("vm3 in the list")
        .to_string();
    vmfork_ok(&socket, &["pause", &name3]);
    assert!(vmfork_ok(&socket, &["info", "vm3"]).contains("paused"));
    vmfork_ok(&socket, &["resume", "vm3"]);
    assert!(vmfork_ok(&socket, &["info", &name3]).contains("running"));
    let err = fails(&socket, 4, &["info", "no-such-name"]);
    assert!(err.contains("no VM is named no-such-name"), "{err}");
    vmfork_ok(&socket, &["rename", &name3, "third"]);
    assert!(vmfork_ok(&socket, &["list"]).contains("third"));
    assert!(vmfork_ok(&socket, &["info", "third"]).contains("running"));
    vmfork_ok(&socket, &["reset", "4"]);
    q.wait_for("vm4: reset to its fork point", DEFAULT_TIMEOUT);
    let err = fails(&socket, 7, &["reset", "1"]);
    assert!(err.contains("not a fork"), "{err}");
    vmfork_ok(&socket, &["kill", "1"]);
    // Killed, it stays listed as stopped until removed.
    let info = vmfork_ok(&socket, &["info", "1"]);
    assert!(info.contains("stopped (killed)"), "{info}");
    let err = fails(&socket, 11, &["pause", "1"]);
    assert!(err.contains("has stopped"), "{err}");
    vmfork_ok(&socket, &["rm", "1"]);
    let err = fails(&socket, 4, &["info", "1"]);
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
fn errors_are_one_line_with_the_kinds_exit_status() {
    let socket = ControlSocket::new();
    let err = fails(&socket, 3, &["list"]);
    assert!(err.contains("cannot connect to the monitor"), "{err}");
    assert!(err.contains("make qemu-virt"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let mut q = Qemu::start(boot("cli_errors", &socket, 512).guest(0, "counter", "mem=16M"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let err = fails(&socket, 4, &["kill", "77"]);
    assert_eq!(err.trim_end(), "vmfork: no such VM: 77");
    let err = fails(&socket, 4, &["fork", "77"]);
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
    let err = fails(&socket2, 7, &["restore", bad.to_str().unwrap()]);
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
        7,
        &["create", "--kernel", junk.to_str().unwrap(), "--mem", "16M"],
    );
    assert!(err.contains("cannot load the kernel"), "{err}");
    let err = fails(
        &socket,
        2,
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
/// went, and the tool exits with status 10, vm_gone (before: `echo: line on`, no `bye`, and the tool
/// stayed attached to a VM that no longer existed).
#[test]
fn a_console_gets_the_last_words_of_a_vm_that_powers_off_and_says_why() {
    use std::io::Write as _;
    let socket = ControlSocket::new();
    let mut q = Qemu::start(boot("cli_last_words", &socket, 512).guest(0, "echo", "mem=16M"));
    // Typed before the guest reads its UART, the first bytes could be lost to its setup.
    q.wait_for("[vm1] echo: ready", DEFAULT_TIMEOUT);
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
    assert_eq!(status.code(), Some(10), "stderr: {stderr:?}");
    q.kill();
}

/// Checks `value` against `#/$defs/<def>` of docs/vmfork-json.schema.json.
fn check_schema(def: &str, value: &serde_json::Value) {
    let path = vmfork_tests::workspace_root().join("docs/vmfork-json.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("urn:vmfork:json-output", schema)
        .unwrap();
    let index = compiler
        .compile(
            &format!("urn:vmfork:json-output#/$defs/{def}"),
            &mut schemas,
        )
        .unwrap_or_else(|e| panic!("{def}: {e:#}"));
    if let Err(e) = schemas.validate(value, index) {
        panic!("{def}: {e}\n{value:#}");
    }
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {:?} / {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Issue 16 against the real monitor: --json output (errors too) has the documented shapes and
/// each error kind its exit status; create's limits are the monitor's and are checked before
/// the upload; an out-of-memory refusal has figures; diff --json has addresses.
#[test]
fn json_shapes_exit_statuses_and_create_limits_on_the_real_monitor() {
    let socket = ControlSocket::new();
    let mut q = Qemu::start(boot("cli_json", &socket, 512).guest(0, "counter", "mem=16M"));
    q.wait_for("[vm1] counter: tick 1", DEFAULT_TIMEOUT);
    let run = |args: &[&str]| vmfork_run(&socket, args);

    // Regression: `info 99 --json` printed its error as text.
    let o = run(&["info", "99", "--json"]);
    assert_eq!(o.status.code(), Some(4));
    let e = json_of(&o);
    check_schema("error", &e);
    assert_eq!(e["error"]["kind"], "not_found");

    check_schema("list", &json_of(&run(&["--json", "list"])));
    check_schema("info", &json_of(&run(&["--json", "info", "1"])));
    check_schema("stats", &json_of(&run(&["--json", "stats", "1"])));
    let o = run(&["--json", "fork", "1", "--paused"]);
    let f = json_of(&o);
    check_schema("fork", &f);
    assert_eq!(f["children"], serde_json::json!([2]));
    // The paused child has the fork point's memory; the parent runs on and writes.
    wait_until("the parent to write pages after the fork", || {
        let d = json_of(&run(&["--json", "diff", "1", "2"]));
        d["differing_pages"].as_u64().unwrap() > 0
    });
    let d = json_of(&run(&["--json", "diff", "1", "2"]));
    check_schema("diff", &d);
    let base = d["ram_base"].as_u64().unwrap();
    for r in d["ranges"].as_array().unwrap() {
        let first = r["first_page"].as_u64().unwrap();
        let pages = r["pages"].as_u64().unwrap();
        assert_eq!(r["ipa"].as_u64().unwrap(), base + first * 4096, "{d}");
        assert_eq!(
            r["ipa_end"].as_u64().unwrap(),
            base + (first + pages) * 4096,
            "{d}"
        );
    }
    // Reset is for forks only, and says so.
    let o = run(&["--json", "reset", "1"]);
    assert_eq!(o.status.code(), Some(7));
    let e = json_of(&o);
    check_schema("error", &e);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a fork"),
        "{e}"
    );
    check_schema("ok", &json_of(&run(&["--json", "reset", "2"])));

    // Limits: refused by the tool with the monitor's rules, before the (missing) kernel is read.
    for (args, want) in [
        (["--cpus", "9"], "must be 1..=8"),
        (["--mem", "3M"], "multiple of 2M"),
        (["--mem", "100G"], "32G maximum"),
    ] {
        let mut a = vec!["create", "--kernel", "/nonexistent/Image"];
        a.extend_from_slice(&args);
        let err = fails(&socket, 2, &a);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // More than the machine has: refused before the upload, with the figures.
    let counter = vmfork_tests::guest_image("counter");
    let counter = counter.to_str().unwrap();
    let o = run(&["--json", "create", "--kernel", counter, "--mem", "1G"]);
    assert_eq!(o.status.code(), Some(6));
    let e = json_of(&o);
    check_schema("error", &e);
    let m = &e["error"]["memory"];
    assert_eq!(m["requested_frames"], 262144, "{e}");
    let free = m["free_frames"].as_u64().unwrap();
    assert!(free > 0 && free < 262144, "{e}");
    let err = fails(&socket, 6, &["create", "--kernel", counter, "--mem", "1G"]);
    assert!(
        err.contains("needs at least 262144 frames (1 GiB)") && err.contains("frames free"),
        "{err}"
    );
    // What fits is created.
    let o = run(&[
        "--json",
        "create",
        "--kernel",
        counter,
        "--mem",
        "16M",
        "--cmdline",
        "ticks=2",
    ]);
    let c = json_of(&o);
    check_schema("created", &c);
    q.wait_for(&format!("[vm{}] counter: done 2", c["vm"]), DEFAULT_TIMEOUT);
    q.expect_no("panic");
    q.kill();
}

/// Regression: connecting to QEMU's socket while the mux held it waited 10 s and said only
/// "did not answer in time". With `make qemu-virt`'s names (SOCKET for the mux, SOCKET.qemu
/// for QEMU) the tool says the mux holds it and where to go instead.
#[test]
fn qemus_socket_held_by_the_mux_says_where_to_go() {
    let socket = ControlSocket::new();
    let mut q = Qemu::start(boot("cli_mux_holds", &socket, 512).guest(0, "counter", "mem=16M"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let dir = tempfile::tempdir().unwrap();
    let listen = dir.path().join("vmfork.sock");
    let qemu = dir.path().join("vmfork.sock.qemu");
    std::os::unix::fs::symlink(socket.path(), &qemu).unwrap();
    let log = dir.path().join("vmfork.sock.log");
    /// Kills the mux when the test ends, however it ends.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _mux = Reap(
        Command::new(vmfork_tool())
            .args(["mux", "--upstream"])
            .arg(&qemu)
            .arg("--listen")
            .arg(&listen)
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vmfork mux"),
    );
    let through_mux = |args: &[&str]| {
        Command::new(vmfork_tool())
            .arg("--socket")
            .arg(&listen)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    wait_until("the mux to serve", || {
        through_mux(&["list"]).status.success()
    });
    let o = Command::new(vmfork_tool())
        .arg("--socket")
        .arg(&qemu)
        .arg("list")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("vmfork mux"), "{err}");
    assert!(
        err.contains(&format!("--socket {}", listen.display())),
        "{err}"
    );
    // The mux still serves, and its log says when it started serving.
    assert!(through_mux(&["list"]).status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("serving"), "{text}");
    q.kill();
}
