//! Integration tests: the real `vmfork` binary against the in-process fake monitor.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vmfork::fake::{FakeConfig, FakeMonitor};
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
    c
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

    /// Runs and expects exit code 1 with exactly one line on stderr; returns that line.
    fn fails(&self, args: &[&str]) -> String {
        one_line_failure(self.run(args))
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

fn one_line_failure(o: Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
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
    let err = one_line_failure(o);
    assert!(err.contains("cannot connect to the monitor at"), "{err}");
    assert!(err.contains("nope.sock"), "{err}");
    assert!(err.contains("make qemu-virt"), "{err}");
    // Default: run/vmfork.sock relative to the current directory.
    let o = bin().current_dir(dir.path()).arg("list").output().unwrap();
    let err = one_line_failure(o);
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
    assert_eq!(e.fails(&["info", "42"]), "vmfork: no such VM: 42");
    e.fails(&["kill", "42"]);
    e.fails(&["fork", "42"]);
    e.fails(&["diff", "1", "42"]);
}

#[test]
fn version_mismatch() {
    let e = env_with(FakeConfig {
        version: 99,
        ..FakeConfig::default()
    });
    let err = e.fails(&["list"]);
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
    std::fs::write(&k, vec![7u8; 10_000]).unwrap();
    let err = e.fails(&["create", "--kernel", k.to_str().unwrap(), "--mem", "1G"]);
    assert_eq!(err, "vmfork: the monitor is out of memory");
}

#[test]
fn create_uploads_the_kernel() {
    let e = env();
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("Image");
    let i = dir.path().join("initrd");
    // Larger than one chunk, so the upload is chunked.
    std::fs::write(&k, (0..200_000u32).map(|x| x as u8).collect::<Vec<_>>()).unwrap();
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
    let missing = e.fails(&["create", "--kernel", "/nonexistent/Image"]);
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
    assert_eq!(e.fails(&["info", "2"]), "vmfork: no such VM: 2");
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
    assert_eq!(info["cow_faults"], 5);
    assert_eq!(info["private_pages"], 5);
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
    // The restored VM has the dumped memory and console history.
    assert!(e
        .ok(&["diff", "1", "2"])
        .starts_with("0 of 4096 pages differ"));
    let con = e.console("2", b"");
    assert!(
        con.contains("poked 7 pages") && con.contains("restored from snapshot"),
        "{con}"
    );
    // A damaged file is refused locally with a clear message.
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let err = e.fails(&["restore", bad.to_str().unwrap()]);
    assert!(err.contains("not a valid vmfork snapshot"), "{err}");
    // A dump of a VM that does not exist leaves no file.
    let none = dir.path().join("none.snap");
    e.fails(&["dump", "9", none.to_str().unwrap()]);
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
    let err = e.fails(&["dump", "1", f.to_str().unwrap()]);
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
    let err = e.fails(&["dump", "1", f.to_str().unwrap(), "--force"]);
    assert!(err.contains("injected failure"), "{err}");
    assert_eq!(std::fs::read(&f).unwrap(), b"the previous snapshot");
    assert_eq!(others_in(dir.path(), &["vm1.snap"]), Vec::<String>::new());
    // With no previous file, none is left either.
    let g = dir.path().join("new.snap");
    e.fails(&["dump", "1", g.to_str().unwrap()]);
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
    assert!(
        s.contains("heap:            1.0 MiB used, 31.0 MiB free (6 MiB of it the reserve)"),
        "{s}"
    );
    let j: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "stats", "1"])).unwrap();
    assert_eq!(j["global"]["total_frames"], 65536);
    assert_eq!(j["global"]["used_frames"], 4096);
    assert_eq!(j["global"]["max_vms"], 4096);
    assert_eq!(j["global"]["heap_reserve"], 6 << 20);
    assert_eq!(j["vm"]["id"], 1);
}

/// Raw garbage, a huge length and a bad CRC on one connection: the server answers what it can,
/// keeps serving that connection and every other one.
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
    s.write_all(&bytes).unwrap();
    let mut dec = Decoder::new();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        for f in dec.push(&buf[..n]) {
            let f = f.unwrap();
            got.push((f.id, Response::decode(f.kind, &f.payload).unwrap()));
        }
    }
    assert!(
        matches!(&got[0], (77, Response::Error(ErrorReply::BadRequest(_)))),
        "{got:?}"
    );
    assert!(
        matches!(&got[1], (78, Response::Error(ErrorReply::BadRequest(_)))),
        "{got:?}"
    );
    assert!(
        matches!(&got[2], (79, Response::HelloReply { .. })),
        "{got:?}"
    );
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
    assert!(e.ok(&["list"]).contains("hello.1"));
    assert_eq!(e.ok(&["fork", "1"]).trim(), "3");
    e.ok(&["kill", "2"]);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("vm2 killed by the control channel"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("poked 2 pages"));
    drop(stdin);
}
