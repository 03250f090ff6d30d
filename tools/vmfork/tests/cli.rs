//! Integration tests: the real `vmfork` binary against the in-process fake monitor.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vmfork::fake::{tiny_image, FakeConfig, FakeMonitor};
use vmfork_proto::frame::encode_frame;
use vmfork_proto::{Decoder, ErrorReply, Request, Response, VmState, PROTOCOL_VERSION};

// Field order matters: the fake stops before its directory goes.
struct Env {
    fake: FakeMonitor,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

fn env_with(config: FakeConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vmfork.sock");
    let fake = FakeMonitor::start(&sock, config).unwrap();
    Env {
        _dir: dir,
        sock,
        fake,
    }
}

fn env() -> Env {
    env_with(FakeConfig::default())
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmfork"));
    c.env_remove("VMFORK_SOCKET");
    // A per-user socket directory that does not exist: a real one must not be found.
    c.env("XDG_RUNTIME_DIR", no_runtime_dir());
    c
}

fn no_runtime_dir() -> PathBuf {
    std::env::temp_dir().join(format!("vmfork-cli-test-none-{}", std::process::id()))
}

impl Env {
    fn run(&self, args: &[&str]) -> Output {
        bin()
            .arg("--socket")
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vmfork {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs and expects exit status `code` with exactly one line on stderr; returns that line.
    fn fails(&self, code: i32, args: &[&str]) -> String {
        one_line_failure(self.run(args), code)
    }

    fn console(&self, vm: &str, input: &[u8]) -> String {
        let mut child = bin()
            .arg("--socket")
            .arg(&self.sock)
            .args(["console", vm])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "console failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

fn one_line_failure(o: Output, code: i32) -> String {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    err.trim_end().to_string()
}

#[test]
fn list_prints_a_table() {
    let e = env();
    let out = e.ok(&["list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for col in [
        "ID",
        "PARENT",
        "STATE",
        "VCPUS",
        "MEMORY",
        "PRIVATE",
        "SHARED",
        "COW-FAULTS",
    ] {
        assert!(lines[0].contains(col), "{out}");
    }
    assert!(lines[1].contains("hello") && lines[1].contains("running"));
    assert!(lines[1].contains("16 MiB"));
}

#[test]
fn list_json() {
    let e = env();
    e.ok(&["fork", "1", "--paused"]);
    let v: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "list"])).unwrap();
    let vms = v.as_array().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0]["id"], 1);
    assert_eq!(vms[0]["parent"], serde_json::Value::Null);
    assert_eq!(vms[0]["state"]["state"], "running");
    assert_eq!(vms[1]["parent"], 1);
    assert_eq!(vms[1]["state"]["state"], "paused");
    assert_eq!(vms[1]["state"]["reason"], "forked");
    assert_eq!(vms[1]["shared_pages"], 4096);
    assert_eq!(vms[1]["private_pages"], 0);
}

#[test]
fn fork_count_8_prints_8_ids() {
    let e = env();
    let out = e.ok(&["fork", "1", "--count", "8"]);
    let ids: Vec<u32> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ids, (2..=9).collect::<Vec<_>>());
    assert_eq!(e.fake.list().len(), 9);
    let info = e.ok(&["info", "1"]);
    assert!(info.contains("forks:           8"), "{info}");
    let j: serde_json::Value =
        serde_json::from_str(&e.ok(&["--json", "fork", "1", "-n", "2"])).unwrap();
    assert_eq!(j["children"], serde_json::json!([10, 11]));
}

#[test]
fn monitor_not_running_gives_the_hint() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.sock");
    let o = bin()
        .arg("--socket")
        .arg(&missing)
        .arg("list")
        .output()
        .unwrap();
    let err = one_line_failure(o, 3);
    assert!(err.contains("cannot connect to the monitor at"), "{err}");
    assert!(err.contains("nope.sock"), "{err}");
    assert!(err.contains("make qemu-virt"), "{err}");
    // Default: run/vmfork.sock relative to the current directory.
    let o = bin().current_dir(dir.path()).arg("list").output().unwrap();
    let err = one_line_failure(o, 3);
    assert!(err.contains("run/vmfork.sock"), "{err}");
}

#[test]
fn socket_from_environment() {
    let e = env();
    let o = bin()
        .env("VMFORK_SOCKET", &e.sock)
        .arg("list")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello"));
}

#[test]
fn no_such_vm() {
    let e = env();
    assert_eq!(e.fails(4, &["info", "42"]), "vmfork: no such VM: 42");
    e.fails(4, &["kill", "42"]);
    e.fails(4, &["fork", "42"]);
    e.fails(4, &["diff", "1", "42"]);
}

#[test]
fn version_mismatch() {
    let e = env_with(FakeConfig {
        version: 99,
        ..FakeConfig::default()
    });
    let err = e.fails(9, &["list"]);
    assert!(err.contains("version mismatch"), "{err}");
    assert!(
        err.contains("v99") && err.contains(&format!("v{PROTOCOL_VERSION}")),
        "{err}"
    );
}

#[test]
fn out_of_memory() {
    let e = env_with(FakeConfig {
        total_frames: 8192,
        ..FakeConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("Image");
    // A kernel the monitor's loader takes (it checks the Image header).
    std::fs::write(&k, tiny_image()).unwrap();
    // Refused with the figures, before the kernel is even read (it does not exist here).
    let err = e.fails(
        6,
        &["create", "--kernel", "/nonexistent/Image", "--mem", "1G"],
    );
    // vm1's 16 MiB take 4,109 frames: its 4,096 pages of RAM, its vmgenid page and 12 pages
    // of stage-2 tables. The heap is the fake host's: 64 MiB, no reserve.
    assert_eq!(
        err,
        "vmfork: the monitor is out of memory: a VM of 1 GiB needs at least 262144 frames (1 GiB) \
         for its RAM; the monitor has 4083 of 8192 frames free (15.9 MiB of 32 MiB) and 64 MiB of \
         heap free beyond its 0 B reserve"
    );
    let o = e.run(&[
        "--json",
        "create",
        "--kernel",
        k.to_str().unwrap(),
        "--mem",
        "1G",
    ]);
    assert_eq!(o.status.code(), Some(6));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["error"]["kind"], "out_of_memory");
    assert_eq!(j["error"]["memory"]["requested_bytes"], 1u64 << 30);
    assert_eq!(j["error"]["memory"]["requested_frames"], 262144);
    assert_eq!(j["error"]["memory"]["free_frames"], 4083);
    assert_eq!(j["error"]["memory"]["total_frames"], 8192);
    // What fits is created.
    assert_eq!(
        e.ok(&["create", "--kernel", k.to_str().unwrap(), "--mem", "8M"])
            .trim(),
        "2"
    );
}

/// An out-of-memory reply of the monitor (here to a restore, which the tool does not check
/// beforehand) gets the figures too, from `stats`.
#[test]
fn out_of_memory_reply_gets_the_figures() {
    let e = env_with(FakeConfig {
        total_frames: 8192,
        ..FakeConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("vm1.snap");
    e.ok(&["dump", "1", f.to_str().unwrap()]);
    // With its heap at the reserve, the monitor cannot buffer the snapshot's upload:
    // `OutOfMemory` to the first chunk.
    e.fake.set_heap_low(true);
    let err = e.fails(6, &["restore", f.to_str().unwrap()]);
    assert_eq!(
        err,
        "vmfork: the monitor is out of memory: the snapshot's VM of 16 MiB needs at least 4096 \
         frames (16 MiB) for its RAM; the monitor has 4083 of 8192 frames free (15.9 MiB of 32 \
         MiB) and 0 B of heap free beyond its 0 B reserve"
    );
    e.fake.set_heap_low(false);
    // A snapshot whose VM needs more frames than are free is refused by the monitor itself
    // (`BadRequest`, as `restore_hostile` checks on QEMU), not answered `OutOfMemory`: vm1
    // uses 4,109 of the 8,192 frames, its copy would need as many.
    let err = e.fails(7, &["restore", f.to_str().unwrap()]);
    assert_eq!(
        err,
        "vmfork: bad request: snapshot refused: not enough memory: the VM needs 4109 frames, \
         4083 are free"
    );
    assert_eq!(e.fake.list().len(), 1);
}

/// `--cpus 9`, `--mem 3M`, `--mem 100G` and an overlong command line are refused by the tool
/// itself with the monitor's own limits: with nothing listening on the socket and no kernel
/// file, the answer is still the usage error, so nothing was read, connected or uploaded.
#[test]
fn create_checks_the_guest_limits_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let long = "x".repeat(2048);
    for (args, want) in [
        (vec!["--cpus", "9"], "--cpus 9: must be 1..=8"),
        (vec!["--cpus", "0"], "--cpus 0: must be 1..=8"),
        (
            vec!["--mem", "3M"],
            "--mem 3 MiB: must be a non-zero multiple of 2M",
        ),
        (
            vec!["--mem", "100G"],
            "--mem 100 GiB: more than the 32G maximum",
        ),
        (
            vec!["--cmdline", &long],
            "--cmdline: longer than 2047 bytes",
        ),
    ] {
        let o = bin()
            .arg("--socket")
            .arg(&sock)
            .args(["create", "--kernel", "/nonexistent/Image"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            one_line_failure(o, 2),
            format!("vmfork: {want}"),
            "{args:?}"
        );
    }
    // The largest values are accepted locally (and then fail on the missing socket).
    let o = bin()
        .arg("--socket")
        .arg(&sock)
        .args([
            "create",
            "--kernel",
            "/nonexistent/Image",
            "--cpus",
            "8",
            "--mem",
            "32G",
        ])
        .output()
        .unwrap();
    assert!(one_line_failure(o, 3).contains("cannot connect"));
}

#[test]
fn json_errors_are_json_on_stdout_with_the_kinds_exit_status() {
    let e = env();
    let o = e.run(&["--json", "info", "99"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"error": {"kind": "not_found", "message": "no such VM: 99", "exit_code": 4}})
    );
    // The same without --json: one line on stderr, nothing on stdout, the same status.
    let o = e.run(&["info", "99"]);
    assert!(o.stdout.is_empty());
    assert_eq!(one_line_failure(o, 4), "vmfork: no such VM: 99");
    // A refusal, a usage error clap finds, and no monitor at all.
    let o = e.run(&["--json", "reset", "1"]);
    assert_eq!(o.status.code(), Some(7));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["error"]["kind"], "refused");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a fork"),
        "{j}"
    );
    let o = e.run(&["--json", "fork"]);
    assert_eq!(o.status.code(), Some(2));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["error"]["kind"], "usage");
    assert!(
        j["error"]["message"].as_str().unwrap().contains("<VM>"),
        "{j}"
    );
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["error"]["kind"], "connection");
    // --help is still help, on stdout, status 0.
    let o = bin().args(["--json", "--help"]).output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("Usage:"));
}

#[test]
fn exit_statuses_are_in_the_help_and_the_man_page() {
    let help = String::from_utf8(bin().arg("--help").output().unwrap().stdout).unwrap();
    let man = bin().arg("man").output().unwrap();
    assert!(man.status.success());
    let man = String::from_utf8(man.stdout).unwrap();
    assert!(
        man.starts_with(".ie") || man.contains(".TH vmfork 1"),
        "{man}"
    );
    assert!(man.contains(".SH \"EXIT STATUS\""), "{man}");
    for (code, kind) in [
        (1, "internal"),
        (2, "usage"),
        (3, "connection"),
        (4, "not_found"),
        (5, "busy"),
        (6, "out_of_memory"),
        (7, "refused"),
        (8, "io"),
        (9, "protocol"),
    ] {
        assert!(
            help.contains(&format!("  {code}  {kind} ")),
            "{kind} in\n{help}"
        );
        let roff_kind = kind.replace('-', "\\-");
        assert!(
            man.contains(&format!("\\fB{code}\\fR \\fI{roff_kind}\\fR")),
            "{kind} in\n{man}"
        );
    }
    // One page per command.
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    for page in [
        "vmfork.1",
        "vmfork-list.1",
        "vmfork-create.1",
        "vmfork-mux.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let top = std::fs::read_to_string(dir.path().join("vmfork.1")).unwrap();
    assert_eq!(top, man);
}

/// Regression: with VMFORK_SOCKET set, clap put `--socket <PATH>` into `create`'s usage line as
/// if it were required.
#[test]
fn create_usage_does_not_show_socket_as_required() {
    for env in [None, Some("/tmp/x.sock")] {
        let mut c = bin();
        if let Some(v) = env {
            c.env("VMFORK_SOCKET", v);
        }
        let o = c.arg("create").output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8(o.stderr).unwrap();
        let usage = err.lines().find(|l| l.starts_with("Usage:")).unwrap();
        assert_eq!(usage, "Usage: vmfork create --kernel <FILE>", "{err}");
    }
    let help =
        String::from_utf8(bin().args(["create", "--help"]).output().unwrap().stdout).unwrap();
    assert!(
        help.contains("Usage: vmfork create [OPTIONS] --kernel <FILE>\n"),
        "{help}"
    );
}

/// Regression: `reset --help` promised that a booted VM goes back to its boot state; only forks
/// can be reset.
#[test]
fn reset_help_says_forks_only() {
    let help = String::from_utf8(bin().args(["reset", "--help"]).output().unwrap().stdout).unwrap();
    assert!(!help.contains("boot state"), "{help}");
    assert!(help.contains("forks only"), "{help}");
    let e = env();
    assert_eq!(
        e.fails(7, &["reset", "1"]),
        "vmfork: bad request: vm1 is not a fork: it has no reset point"
    );
}

#[test]
fn diff_json_gives_addresses_and_indexes() {
    let e = env();
    e.ok(&["fork", "1"]);
    e.console("2", b"poke 5\n");
    let j: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "diff", "1", "2"])).unwrap();
    assert_eq!(j["page_size"], 4096);
    let base = j["ram_base"].as_u64().unwrap();
    let r = &j["ranges"][0];
    assert_eq!(r["first_page"], 1);
    assert_eq!(r["pages"], 5);
    assert_eq!(r["ipa"], base + 4096);
    assert_eq!(r["ipa"], 0x4000_1000u64);
    assert_eq!(r["ipa_end"], 0x4000_6000u64);
}

#[test]
fn create_uploads_the_kernel() {
    let e = env();
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("Image");
    let i = dir.path().join("initrd");
    // An Image the monitor's loader takes, larger than one chunk, so the upload is chunked.
    let mut image = tiny_image();
    image.extend((image.len() as u32..200_000).map(|x| x as u8));
    std::fs::write(&k, image).unwrap();
    std::fs::write(&i, b"initrd").unwrap();
    let out = e.ok(&[
        "create",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--mem",
        "8M",
        "--cpus",
        "2",
        "--cmdline",
        "console=ttyAMA0",
    ]);
    assert_eq!(out.trim(), "2");
    let info = e.fake.list().into_iter().find(|v| v.id.0 == 2).unwrap();
    assert_eq!(info.vcpus, 2);
    assert_eq!(info.mem_bytes, 8 << 20);
    let missing = e.fails(8, &["create", "--kernel", "/nonexistent/Image"]);
    assert!(
        missing.contains("cannot read /nonexistent/Image"),
        "{missing}"
    );
    // A usage error is clap's (exit code 2, with the usage line).
    let o = e.run(&["create", "--kernel", k.to_str().unwrap(), "--mem", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid size"));
}

#[test]
fn pause_resume_reset_kill() {
    let e = env();
    e.ok(&["fork", "1"]);
    assert_eq!(e.ok(&["pause", "2"]), "");
    assert!(e.ok(&["list"]).contains("paused (requested)"));
    e.ok(&["resume", "2"]);
    assert!(matches!(e.fake.list()[1].state, VmState::Running));
    // Dirty three pages, reset drops them again.
    e.console("2", b"poke 3\n");
    assert_eq!(e.fake.list()[1].private_pages, 3);
    e.ok(&["reset", "2"]);
    assert_eq!(e.fake.list()[1].private_pages, 0);
    e.ok(&["kill", "2"]);
    // Killed, it stays listed, stopped, until removed; only info, console and rm apply.
    let info = e.ok(&["info", "2"]);
    assert!(info.contains("state:           stopped (killed)"), "{info}");
    assert!(e.ok(&["list"]).contains("stopped (killed)"));
    let err = e.fails(11, &["pause", "2"]);
    assert!(err.contains("vm2 has stopped"), "{err}");
    e.fails(11, &["kill", "2"]);
    // A live VM is removed only with --force.
    e.fails(7, &["rm", "1"]);
    assert_eq!(e.ok(&["rm", "hello.1"]), "");
    assert_eq!(e.fails(4, &["info", "2"]), "vmfork: no such VM: 2");
    assert_eq!(e.fake.list().len(), 1);
    // --rm: no record once stopped; rm --force kills and removes.
    assert_eq!(e.ok(&["fork", "1", "--rm"]).trim(), "3");
    e.ok(&["kill", "3"]);
    e.fails(4, &["info", "3"]);
    assert_eq!(e.ok(&["fork", "1"]).trim(), "4");
    e.ok(&["rm", "--force", "4"]);
    e.fails(4, &["info", "4"]);
    assert_eq!(e.fake.list().len(), 1);
}

#[test]
fn console_streams_with_piped_stdin_and_diff_counts_writes() {
    let e = env();
    e.ok(&["fork", "1"]);
    let out = e.console("2", b"hello\npoke 5\n");
    assert!(out.contains("vm 2: forked from vm 1"), "{out}");
    assert!(out.contains("hello\n"), "{out}");
    assert!(out.contains("poked 5 pages"), "{out}");
    // The parent's console is its own.
    let parent = e.console("1", b"");
    assert!(
        parent.contains("booted") && !parent.contains("poked"),
        "{parent}"
    );
    let diff = e.ok(&["diff", "1", "2"]);
    assert!(diff.starts_with("5 of 4096 pages differ"), "{diff}");
    assert!(diff.contains("0x40001000-0x40005fff  5 pages"), "{diff}");
    let j: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "diff", "1", "2"])).unwrap();
    assert_eq!(j["differing_pages"], 5);
    let info: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "info", "2"])).unwrap();
    // Five guest faults, and the monitor's own copy of the fork's vmgenid page when it wrote
    // the fork's new ID before its first run (a write to a shared frame, counted as every
    // copy-on-write; that page is not RAM, so not among the private pages).
    assert_eq!(info["cow_faults"], 6);
    assert_eq!(info["private_pages"], 5);
}

/// Regression: the fake guest made N stores for `poke N`, so a huge N held the fake's table
/// (and every client) for ever; it writes each page once at most.
#[test]
fn a_huge_poke_writes_every_page_once() {
    let e = env_with(FakeConfig {
        initial_vms: vec![("small".into(), 2 << 20, 1)],
        ..FakeConfig::default()
    });
    e.ok(&["fork", "1"]);
    let out = e.console("2", format!("poke {}\n", u64::MAX).as_bytes());
    assert!(out.contains(&format!("poked {} pages", u64::MAX)), "{out}");
    // Every page of the 2 MiB but page 0.
    assert_eq!(e.fake.list()[1].private_pages, 511);
}

#[test]
fn dump_then_restore() {
    let e = env();
    e.console("1", b"poke 7\n");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("vm1.snap");
    let out = e.ok(&["dump", "1", f.to_str().unwrap()]);
    assert!(out.contains("written to"), "{out}");
    let bytes = std::fs::read(&f).unwrap();
    let snap = vmfork_proto::snapshot::Snapshot::decode(&bytes).unwrap();
    assert_eq!(snap.header.mem_bytes, 16 << 20);
    assert_eq!(e.ok(&["restore", f.to_str().unwrap()]).trim(), "2");
    // The restored VM has the dumped memory; its console starts afresh (a snapshot holds no
    // console history), with what the guest printed once restored.
    assert!(e
        .ok(&["diff", "1", "2"])
        .starts_with("0 of 4096 pages differ"));
    let con = e.console("2", b"");
    assert!(
        !con.contains("poked 7 pages") && con.contains("vm 2: restored from snapshot"),
        "{con}"
    );
    // A damaged file is refused locally with a clear message.
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let err = e.fails(7, &["restore", bad.to_str().unwrap()]);
    assert!(err.contains("not a valid vmfork snapshot"), "{err}");
    // A dump of a VM that does not exist leaves no file.
    let none = dir.path().join("none.snap");
    e.fails(4, &["dump", "9", none.to_str().unwrap()]);
    assert!(!none.exists());
}

/// Names in `dir` other than `keep` (temporary files left behind, for instance).
fn others_in(dir: &std::path::Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn dump_refuses_to_replace_a_file_without_force() {
    let e = env();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("vm1.snap");
    std::fs::write(&f, b"the previous snapshot").unwrap();
    let err = e.fails(8, &["dump", "1", f.to_str().unwrap()]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&f).unwrap(), b"the previous snapshot");
    // With --force it is replaced by the whole new snapshot, and nothing else is left.
    e.ok(&["dump", "1", f.to_str().unwrap(), "--force"]);
    let bytes = std::fs::read(&f).unwrap();
    vmfork_proto::snapshot::Snapshot::decode(&bytes).unwrap();
    assert_eq!(others_in(dir.path(), &["vm1.snap"]), Vec::<String>::new());
}

#[test]
fn a_dump_that_fails_half_way_leaves_the_previous_file_whole() {
    let e = env_with(FakeConfig {
        // The first chunk is read and written, the second read fails.
        fail_dump_reads_from: Some(vmfork_proto::CHUNK_SIZE as u64),
        ..FakeConfig::default()
    });
    // Enough pages that the snapshot is more than one chunk.
    e.console("1", b"poke 64\n");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("vm1.snap");
    std::fs::write(&f, b"the previous snapshot").unwrap();
    let err = e.fails(1, &["dump", "1", f.to_str().unwrap(), "--force"]);
    assert!(err.contains("injected failure"), "{err}");
    assert_eq!(std::fs::read(&f).unwrap(), b"the previous snapshot");
    assert_eq!(others_in(dir.path(), &["vm1.snap"]), Vec::<String>::new());
    // With no previous file, none is left either.
    let g = dir.path().join("new.snap");
    e.fails(1, &["dump", "1", g.to_str().unwrap()]);
    assert!(!g.exists());
    assert_eq!(others_in(dir.path(), &["vm1.snap"]), Vec::<String>::new());
}

#[test]
fn completions_for_bash() {
    let o = bin().args(["completions", "bash"]).output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("_vmfork") && s.contains("complete"), "{s}");
    assert!(s.contains("fork") && s.contains("--paused"));
}

#[test]
fn help_on_every_command() {
    for cmd in [
        "list",
        "info",
        "stats",
        "fork",
        "pause",
        "resume",
        "reset",
        "kill",
        "create",
        "console",
        "dump",
        "restore",
        "diff",
        "completions",
    ] {
        let o = bin().args([cmd, "--help"]).output().unwrap();
        assert!(o.status.success(), "{cmd} --help");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage:"));
    }
    let o = bin().args(["console", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("Ctrl-]"));
    let o = bin().args(["dump", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("BGSAVE"));
}

#[test]
fn stats_global_and_per_vm() {
    let e = env();
    let s = e.ok(&["stats"]);
    assert!(s.contains("vms:             1"), "{s}");
    assert!(
        s.contains("limits:          max_vms=4096 max_forks_per_tree=1024"),
        "{s}"
    );
    // The fake host's heap: 64 MiB, none of it used or kept in reserve.
    assert!(
        s.contains("heap:            0 B used, 64 MiB free (0 B of it the reserve)"),
        "{s}"
    );
    assert!(
        s.contains("frames:          4109 used, 61427 free, 65536 total"),
        "{s}"
    );
    let j: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "stats", "1"])).unwrap();
    assert_eq!(j["global"]["total_frames"], 65536);
    // vm1: 4,096 pages of RAM, its vmgenid page and 12 pages of stage-2 tables.
    assert_eq!(j["global"]["used_frames"], 4109);
    assert_eq!(j["global"]["max_vms"], 4096);
    assert_eq!(j["global"]["heap_reserve"], 0);
    assert_eq!(j["global"]["heap_free"], 64 << 20);
    assert_eq!(j["vm"]["id"], 1);
}

/// Raw garbage, a huge length and a bad CRC on one connection: the monitor skips them (it
/// answers no frame it could not read whole: the mux answers those for its clients), keeps
/// serving that connection and every other one.
#[test]
fn garbage_over_the_socket() {
    let e = env();
    let mut s = UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut bytes = b"\x00\xffVMFKgarbage VM".to_vec();
    // A well-formed header announcing 1 MiB: refused as too large, its body skipped.
    let mut big = Vec::new();
    encode_frame(PROTOCOL_VERSION, 2, 77, &vec![0; 1 << 20], &mut big).unwrap();
    bytes.extend(&big);
    // A damaged frame.
    let mut bad = Vec::new();
    Request::List.encode_frame(78, &mut bad).unwrap();
    let n = bad.len();
    bad[n - 1] ^= 0x40;
    bytes.extend(&bad);
    // Then a good Hello.
    Request::Hello {
        version: PROTOCOL_VERSION,
        client: "raw".into(),
    }
    .encode_frame(79, &mut bytes)
    .unwrap();
    // Then a request with a bad version, answered with the mismatch.
    encode_frame(99, 1, 80, &[], &mut bytes).unwrap();
    s.write_all(&bytes).unwrap();
    let mut dec = Decoder::new();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 2 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        for f in dec.push(&buf[..n]) {
            let f = f.unwrap();
            got.push((f.id, Response::decode(f.kind, &f.payload).unwrap()));
        }
    }
    // Answers come in the order of the requests: nothing came for 77 and 78 before 79's.
    assert!(
        matches!(&got[0], (79, Response::HelloReply { .. })),
        "{got:?}"
    );
    assert!(
        matches!(
            &got[1],
            (
                80,
                Response::Error(ErrorReply::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: 99
                })
            )
        ),
        "{got:?}"
    );
    assert_eq!(got.len(), 2, "{got:?}");
    // A client that vanishes mid-frame.
    let mut s2 = UnixStream::connect(&e.sock).unwrap();
    s2.write_all(&big[..1000]).unwrap();
    drop(s2);
    // Everything still answers.
    assert!(e.ok(&["list"]).contains("hello"));
}

/// A second client works while the first is attached to a console, and killing the attached VM
/// ends that console with what it printed, why it went, and status 3.
#[test]
fn second_client_while_a_console_is_attached() {
    let e = env();
    e.ok(&["fork", "1"]);
    let mut child = bin()
        .arg("--socket")
        .arg(&e.sock)
        .args(["console", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"poke 2\n").unwrap();
    stdin.flush().unwrap();
    // Wait until the first client's input has landed.
    for _ in 0..100 {
        if e.fake.list()[1].private_pages == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A fork is named after its parent and how many forks the parent had: its first is .1.
    assert!(e.ok(&["list"]).contains("hello.1"));
    assert_eq!(e.ok(&["fork", "1"]).trim(), "3");
    e.ok(&["kill", "2"]);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(10));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("vm2 killed by the control channel"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("poked 2 pages"));
    drop(stdin);
}

/// Without --socket or VMFORK_SOCKET: the checkout's run/vmfork.sock from any directory inside
/// it, else the per-user socket; VMFORK_SOCKET and --socket come first.
#[test]
fn the_socket_is_found_from_anywhere() {
    let e = env();
    let dir = tempfile::tempdir().unwrap();
    let checkout = dir.path().join("checkout");
    let deep = checkout.join("tools/vmfork/src");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(checkout.join("run")).unwrap();
    std::os::unix::fs::symlink(&e.sock, checkout.join("run/vmfork.sock")).unwrap();
    let list =
        |cwd: &std::path::Path, c: &mut Command| c.current_dir(cwd).arg("list").output().unwrap();
    for cwd in [&checkout, &deep] {
        let o = list(cwd, &mut bin());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("hello"));
    }
    // Outside the checkout: nothing found, and the message says where vmfork looked.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let err = one_line_failure(list(&elsewhere, &mut bin()), 3);
    assert!(err.contains("no monitor socket found"), "{err}");
    assert!(
        err.contains("run/vmfork.sock") && err.contains("elsewhere"),
        "{err}"
    );
    assert!(
        err.contains(&no_runtime_dir().display().to_string()),
        "{err}"
    );
    // The per-user socket, in a directory of ours alone.
    let runtime = dir.path().join("xdg");
    std::fs::create_dir_all(runtime.join("vmfork")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        runtime.join("vmfork"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::symlink(&e.sock, runtime.join("vmfork/vmfork.sock")).unwrap();
    let o = list(&elsewhere, bin().env("XDG_RUNTIME_DIR", &runtime));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // VMFORK_SOCKET beats the checkout's socket, --socket beats VMFORK_SOCKET.
    let missing = dir.path().join("missing.sock");
    let o = list(&deep, bin().env("VMFORK_SOCKET", &missing));
    assert!(one_line_failure(o, 3).contains("missing.sock"));
    let o = list(
        &elsewhere,
        bin()
            .env("VMFORK_SOCKET", &missing)
            .arg("--socket")
            .arg(&e.sock),
    );
    assert!(o.status.success());
}

/// Regression: connecting to QEMU's socket while `vmfork mux` held it waited 10 s and said only
/// "did not answer in time".
#[test]
fn qemus_socket_held_by_the_mux_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mux = dir.path().join("vmfork.sock");
    let qemu = dir.path().join("vmfork.sock.qemu");
    // QEMU busy with its one client: connections are queued, never served.
    let _qemu = std::os::unix::net::UnixListener::bind(&qemu).unwrap();
    let _mux = std::os::unix::net::UnixListener::bind(&mux).unwrap();
    let o = bin()
        .arg("--socket")
        .arg(&qemu)
        .arg("list")
        .output()
        .unwrap();
    let err = one_line_failure(o, 3);
    assert!(err.contains("vmfork mux"), "{err}");
    assert!(
        err.contains(&format!("--socket {}", mux.display())),
        "{err}"
    );
}

/// QEMU's socket is there but nothing serves the mux's: the mux has gone, see its log.
#[test]
fn a_missing_mux_is_named_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vmfork.sock");
    let _qemu =
        std::os::unix::net::UnixListener::bind(dir.path().join("vmfork.sock.qemu")).unwrap();
    let o = bin()
        .arg("--socket")
        .arg(&sock)
        .arg("list")
        .output()
        .unwrap();
    let err = one_line_failure(o, 3);
    assert!(
        err.contains("`vmfork mux`") && !err.contains("log"),
        "{err}"
    );
    std::fs::write(dir.path().join("vmfork.sock.log"), b"").unwrap();
    let o = bin()
        .arg("--socket")
        .arg(&sock)
        .arg("list")
        .output()
        .unwrap();
    let err = one_line_failure(o, 3);
    assert!(err.contains("vmfork.sock.log"), "{err}");
}

/// Checks `value` against `#/$defs/<def>` of docs/vmfork-json.schema.json.
fn check_schema(def: &str, value: &serde_json::Value) -> Result<(), String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/vmfork-json.schema.json"
    );
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
    schemas
        .validate(value, index)
        .map_err(|e| format!("{def}: {e}\n{value:#}"))
}

/// Every command's --json output, the errors included, has the shape docs/vmfork-json.schema.json
/// gives it; and the schema does refuse what does not.
#[test]
fn json_output_matches_the_schema() {
    let e = env();
    let dir = tempfile::tempdir().unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_slice(&e.run(&a).stdout).unwrap()
    };
    let check = |def: &str, v: &serde_json::Value| check_schema(def, v).unwrap();
    check("fork", &json(&["fork", "1", "--paused"]));
    e.console("1", b"poke 3\n");
    check("list", &json(&["list"]));
    check("info", &json(&["info", "2"]));
    check("stats", &json(&["stats"]));
    check("stats", &json(&["stats", "1"]));
    check("ok", &json(&["resume", "2"]));
    check("ok", &json(&["reset", "2"]));
    let diff = json(&["diff", "1", "2"]);
    assert_eq!(diff["ranges"].as_array().unwrap().len(), 1);
    check("diff", &diff);
    let k = dir.path().join("Image");
    std::fs::write(&k, tiny_image()).unwrap();
    check(
        "created",
        &json(&["create", "--kernel", k.to_str().unwrap(), "--mem", "2M"]),
    );
    let f = dir.path().join("vm1.snap");
    check("dump", &json(&["dump", "1", f.to_str().unwrap()]));
    check("ok", &json(&["kill", "3"]));
    check("created", &json(&["restore", f.to_str().unwrap()]));
    // A stopped VM's record, and the error for what does not apply to it.
    let stopped = json(&["info", "3"]);
    assert_eq!(stopped["state"]["reason"], "killed", "{stopped}");
    check("vm", &stopped);
    let v = json(&["pause", "3"]);
    check("error", &v);
    assert_eq!(v["error"]["kind"], "stopped");
    check("rm", &json(&["rm", "3"]));
    for args in [
        &["info", "99"][..],
        &["reset", "1"],
        &["fork"],
        &["create", "--kernel", k.to_str().unwrap(), "--mem", "1G"],
        &["dump", "1", f.to_str().unwrap()],
    ] {
        let v = json(args);
        check("error", &v);
        assert_eq!(
            v["error"]["exit_code"],
            e.run(args).status.code().unwrap(),
            "{args:?}"
        );
    }
    // A stopped VM's state (the fake makes none here), written by hand.
    let mut vm = json(&["info", "1"]);
    check("vm", &vm);
    vm["state"] = serde_json::json!({"state": "stopped", "reason": {"fault": "ESR 0x96000045"}});
    check("vm", &vm);
    // What is not the shape is refused.
    vm["state"] = serde_json::json!({"state": "paused", "reason": "bored"});
    assert!(check_schema("vm", &vm).is_err());
    let mut d = diff.clone();
    d["ranges"][0].as_object_mut().unwrap().remove("ipa");
    assert!(check_schema("diff", &d).is_err());
    let mut extra = json(&["info", "1"]);
    extra["surprise"] = 1.into();
    assert!(check_schema("info", &extra).is_err());
}

/// Every command takes `N`, `vmN` or a name; a name must name one VM (issue 16 item 2).
#[test]
fn vms_are_named_by_id_vm_id_or_name() {
    let e = env();
    let info: serde_json::Value =
        serde_json::from_str(&e.ok(&["--json", "info", "hello"])).unwrap();
    assert_eq!(info["id"], 1);
    let by_vm: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "info", "vm1"])).unwrap();
    let timeless = |mut v: serde_json::Value| {
        let o = v.as_object_mut().unwrap();
        assert!(o.remove("uptime_us").is_some() && o.remove("vcpu_us").is_some());
        v
    };
    assert_eq!(timeless(by_vm), timeless(info.clone()));
    assert_eq!(e.ok(&["fork", "hello"]).trim(), "2");
    e.ok(&["pause", "hello.1"]);
    let child: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "info", "vm2"])).unwrap();
    assert_eq!(child["state"]["state"], "paused", "{child}");
    assert!(e
        .ok(&["diff", "hello", "hello.1"])
        .contains("of 4096 pages differ"));
    assert_eq!(
        e.fails(4, &["kill", "nosuch"]),
        "vmfork: no VM is named nosuch"
    );
    // A restored copy has the snapshot's name: the name is ambiguous, the ids are not.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("hello.snap");
    e.ok(&["dump", "hello", f.to_str().unwrap()]);
    let copy = e.ok(&["restore", f.to_str().unwrap()]);
    let copy = copy.trim();
    assert_eq!(
        e.fails(2, &["reset", "hello"]),
        format!("vmfork: 2 VMs are named hello (vm1, vm{copy}): name one by its id")
    );
    e.ok(&["kill", &format!("vm{copy}")]);
    e.ok(&["resume", "hello.1"]);
    let o = e.run(&["info", "two words"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("VM names have no spaces"), "{err}");
}

/// `rename`, `--name` on create, fork and restore, and a created VM named after its kernel
/// file by default (issue 16 item 2).
#[test]
fn names_are_given_at_create_fork_restore_and_by_rename() {
    let e = env();
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("counter");
    std::fs::write(&k, tiny_image()).unwrap();
    let name_of = |id: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "info", id])).unwrap();
        v["name"].as_str().unwrap().to_string()
    };
    let a = e.ok(&["create", "--kernel", k.to_str().unwrap(), "--mem", "2M"]);
    assert_eq!(name_of(a.trim()), "counter");
    let b = e.ok(&[
        "create",
        "--kernel",
        k.to_str().unwrap(),
        "--mem",
        "2M",
        "--name",
        "web",
    ]);
    assert_eq!(name_of(b.trim()), "web");
    let kids = e.ok(&["fork", "web", "-n", "2", "--name", "worker"]);
    let kids: Vec<&str> = kids.split_whitespace().collect();
    assert_eq!(name_of(kids[0]), "worker.1");
    assert_eq!(name_of(kids[1]), "worker.2");
    let one = e.ok(&["fork", "web", "--name", "solo"]);
    assert_eq!(name_of(one.trim()), "solo");
    e.ok(&["rename", "solo", "solo-2"]);
    assert_eq!(name_of(one.trim()), "solo-2");
    let f = dir.path().join("web.snap");
    e.ok(&["dump", "web", f.to_str().unwrap()]);
    let r = e.ok(&["restore", f.to_str().unwrap(), "--name", "web-copy"]);
    assert_eq!(name_of(r.trim()), "web-copy");
    // Refused before anything is sent: names that look like ids, or with other characters.
    assert_eq!(
        e.fails(2, &["rename", "web", "42"]),
        "vmfork: name \"42\": must not look like a VM id (only digits, or vm and digits)"
    );
    assert_eq!(
        e.fails(2, &["rename", "web", "a/b"]),
        "vmfork: name \"a/b\": must be 1-32 of [A-Za-z0-9._-]"
    );
    let long = "x".repeat(31);
    assert!(e
        .fails(2, &["fork", "web", "-n", "10", "--name", &long])
        .contains(&format!("{long}.10")));
    assert_eq!(
        e.fails(4, &["rename", "vm99", "ghost"]),
        "vmfork: no such VM: 99"
    );
}

#[test]
fn wait_for_states_timeout_and_never() {
    let e = env();
    assert_eq!(
        e.ok(&["wait", "1", "--state", "running"]),
        "vm1 hello running\n"
    );
    let err = e.fails(12, &["wait", "1", "--state", "paused", "--timeout", "0.3"]);
    assert!(err.contains("was not paused within 0.3 s"), "{err}");
    // A wait that a pause ends.
    let child = bin()
        .arg("--socket")
        .arg(&e.sock)
        .args(["wait", "hello", "--state", "paused", "--interval", "20"])
        .args(["--timeout", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    e.ok(&["pause", "1"]);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vm1 hello paused (requested)\n"
    );
    // A stopped VM will never run again: at once, with the `stopped` status.
    e.ok(&["kill", "1"]);
    let err = e.fails(11, &["wait", "1", "--state", "running", "--timeout", "30"]);
    assert!(err.contains("will never be running"), "{err}");
    let j: serde_json::Value =
        serde_json::from_str(&e.ok(&["--json", "wait", "1", "--state", "stopped"])).unwrap();
    assert_eq!(j["state"]["state"], "stopped");
    assert_eq!(j["vm"], 1);
    check_schema("wait", &j).unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&e.ok(&["--json", "wait", "9", "--state", "gone"])).unwrap();
    check_schema("wait", &j).unwrap();
    let o = e.run(&["--json", "wait", "1", "--state", "paused"]);
    assert_eq!(o.status.code(), Some(11));
    check_schema("error", &serde_json::from_slice(&o.stdout).unwrap()).unwrap();
    e.fails(4, &["wait", "99", "--state", "running"]);
    assert_eq!(e.ok(&["wait", "99", "--state", "gone"]), "vm99 gone\n");
}

#[test]
fn events_sees_a_fork_a_pause_and_a_rename() {
    let e = env();
    let child = bin()
        .arg("--socket")
        .arg(&e.sock)
        .args(["events", "--count", "4", "--interval", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    e.ok(&["fork", "1", "--paused"]);
    std::thread::sleep(Duration::from_millis(200));
    e.ok(&["rename", "2", "kid"]);
    std::thread::sleep(Duration::from_millis(200));
    e.ok(&["pause", "1"]);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let evs: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<(&str, u64)> = evs
        .iter()
        .map(|v| (v["event"].as_str().unwrap(), v["vm"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("forked", 2), ("paused", 2), ("renamed", 2), ("paused", 1)]
    );
    for ev in &evs {
        check_schema("event", ev).unwrap();
    }
    assert_eq!(evs[0]["parent"], 1);
    assert_eq!(evs[1]["reason"], "forked");
    assert_eq!(evs[2]["name"], "kid");
    assert!(evs[3]["time"].as_f64().unwrap() > evs[0]["time"].as_f64().unwrap());
}

#[test]
fn events_fails_when_the_monitor_goes() {
    let e = env();
    let child = bin()
        .arg("--socket")
        .arg(&e.sock)
        .args(["events", "--interval", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(e);
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn top_once_prints_one_table() {
    let e = env();
    e.ok(&["fork", "1", "--name", "kid"]);
    let out = e.ok(&["top", "--once", "--interval", "50"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].contains("2 VMs live"), "{out}");
    for col in [
        "ID", "NAME", "STATE", "VCPU%", "COW/s", "PRIVATE", "SHARED", "UPTIME",
    ] {
        assert!(lines[1].contains(col), "{out}");
    }
    assert!(lines[2].trim_start().starts_with("1  hello"), "{out}");
    assert!(lines[3].trim_start().starts_with("2  kid"), "{out}");
    assert!(!out.contains('\x1b'), "no escapes when piped: {out:?}");
    let help = String::from_utf8(bin().arg("--help").output().unwrap().stdout).unwrap();
    assert!(help.contains("  12  timeout "), "{help}");
}

/// Runs `script` in bash after sourcing `vmfork completions bash`, with the tool on PATH and
/// `socket` as VMFORK_SOCKET; its stdout, and how long it took. None (and a message) when there
/// is no bash.
fn in_bash(socket: &std::path::Path, script: &str) -> Option<(String, Duration)> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vmfork.bash");
    let o = bin().args(["completions", "bash"]).output().unwrap();
    assert!(o.status.success());
    std::fs::write(&file, &o.stdout).unwrap();
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_vmfork"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    // The function the script registers for vmfork, called as bash would.
    let full = format!(
        "source {:?} || exit 9\nf=$(complete -p vmfork | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')\n[ -n \"$f\" ] || exit 8\ncomplete_at() {{ COMP_WORDS=(\"$@\"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=(); \"$f\" vmfork \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; for w in \"${{COMPREPLY[@]}}\"; do echo \"$w\"; done | sort | tr '\\n' ' '; echo; }}\n{script}",
        file
    );
    let start = std::time::Instant::now();
    let o = match Command::new("bash")
        .arg("--norc")
        .arg("-c")
        .arg(&full)
        .env("PATH", path)
        .env("VMFORK_SOCKET", socket)
        .env("XDG_RUNTIME_DIR", no_runtime_dir())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: no bash ({e})");
            return None;
        }
    };
    let took = start.elapsed();
    assert!(
        o.status.success(),
        "bash: {:?} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Some((String::from_utf8(o.stdout).unwrap(), took))
}

#[test]
fn bash_completes_vm_arguments_with_the_live_vms() {
    let e = env_with(FakeConfig {
        initial_vms: vec![("web".into(), 2 << 20, 1), ("db".into(), 2 << 20, 1)],
        ..FakeConfig::default()
    });
    e.ok(&["fork", "web", "--name", "web-kid"]);
    let vms = e.fake.list();
    assert_eq!(vms.len(), 3);
    let mut all: Vec<String> = vms.iter().map(|v| format!("vm{}", v.id.0)).collect();
    all.extend(vms.iter().map(|v| v.name.clone()));
    all.sort();
    let all = format!("{} ", all.join(" "));
    let web = vms.iter().find(|v| v.name == "web").unwrap().id.0;
    let Some((out, _)) = in_bash(
        &e.sock,
        &format!(
            "complete_at vmfork pause ''
complete_at vmfork diff vm{web} ''
complete_at vmfork fork -n 2 --name=x w
complete_at vmfork --socket {sock:?} --json info d
VMFORK_SOCKET=/nonexistent complete_at vmfork --socket {sock:?} kill vm
complete_at vmfork dump vm{web} ''
complete_at vmfork pau
complete_at vmfork pause vm{web} ''",
            sock = e.sock
        ),
    ) else {
        return;
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    assert_eq!(lines[0], all, "pause VM");
    assert_eq!(lines[1], all, "diff's second VM");
    assert_eq!(lines[2], "web web-kid ", "after options with values");
    assert_eq!(lines[3], "db ", "--socket given");
    let ids: Vec<String> = vms.iter().map(|v| format!("vm{}", v.id.0)).collect();
    let mut ids = ids;
    ids.sort();
    assert_eq!(lines[4], format!("{} ", ids.join(" ")), "--socket wins");
    // Not a VM argument: clap's completion (a file name; never a VM).
    assert!(!lines[5].contains("web"), "dump's FILE: {}", lines[5]);
    assert_eq!(lines[6], "pause ", "subcommands as before");
    // pause takes one VM: then clap's options, no VM.
    assert!(!lines[7].contains("vm"), "after pause's VM: {}", lines[7]);
}

#[test]
fn bash_completion_without_a_monitor_is_quick_and_empty() {
    let dir = tempfile::tempdir().unwrap();
    // No socket at all; then one that accepts connections and never answers.
    let none = dir.path().join("none.sock");
    let Some((out, took)) = in_bash(&none, "complete_at vmfork pause ''") else {
        return;
    };
    assert_eq!(out, "\n");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let mute = dir.path().join("mute.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    let (out, took) = in_bash(&mute, "complete_at vmfork info ''").unwrap();
    assert_eq!(out, "\n");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The hidden command itself: exit 0, nothing on stdout or stderr.
    let o = bin()
        .args(["--socket", mute.to_str().unwrap(), "__complete-vms"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(o.stdout.is_empty() && o.stderr.is_empty(), "{o:?}");
}

#[test]
fn complete_vms_prints_ids_and_names() {
    let e = env();
    let vms = e.fake.list();
    let out = e.ok(&["__complete-vms"]);
    let mut want: Vec<String> = vms.iter().map(|v| format!("vm{}", v.id.0)).collect();
    want.extend(vms.iter().map(|v| v.name.clone()));
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
}
