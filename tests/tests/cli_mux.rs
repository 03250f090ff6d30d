//! `vmfork mux` in front of the real monitor under QEMU: several `vmfork` processes at once on
//! QEMU's one control socket.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmfork_tests::{
    vmfork_ok, vmfork_tool, ControlSocket, MuxProcess, Qemu, QemuConfig, DEFAULT_TIMEOUT,
};

/// `vmfork console VM --linger MS` in a child process, its output collected as it comes.
struct Console {
    child: Child,
    out: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Console {
    fn start(socket: &ControlSocket, vm: u32, linger_ms: u64) -> Console {
        let mut child = Command::new(vmfork_tool())
            .arg("--socket")
            .arg(socket.path())
            .args([
                "console",
                &vm.to_string(),
                "--linger",
                &linger_ms.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vmfork console");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let out = Arc::new(Mutex::new(String::new()));
        let o = out.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    return;
                }
                if let Ok(mut s) = o.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Console {
            child,
            out,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        self.out.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until the console has printed a tick line (so it is attached and streaming).
    fn wait_streaming(&mut self) {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        while ticks(&self.text()).is_empty() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("console exited early ({status}): {:?}", self.text());
            }
            assert!(Instant::now() < deadline, "no console output");
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the console to end; returns its status, output and stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let status = self.child.wait().expect("wait for the console");
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status, self.text(), err)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tick numbers of the complete `counter: tick N` lines in `text`.
fn ticks(text: &str) -> Vec<u64> {
    text.split('\n')
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("counter: tick "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn boot(name: &str, socket: &ControlSocket) -> QemuConfig {
    QemuConfig::monitor()
        .smp(2)
        .mem_mib(512)
        .name(name)
        .control(socket)
        .guest(0, "counter", "mem=16M")
}

#[test]
fn a_console_streams_while_other_processes_list_and_fork() {
    let socket = ControlSocket::new();
    let listen = ControlSocket::new();
    let mut q = Qemu::start(boot("mux_console_list_fork", &socket));
    q.wait_for("[vm1] counter: tick 1", DEFAULT_TIMEOUT);
    let _mux = MuxProcess::start(&socket, &listen);

    // Long enough that the other commands surely run while it is attached.
    let mut console = Console::start(&listen, 1, 8000);
    console.wait_streaming();
    let list = vmfork_ok(&listen, &["list"]);
    assert_eq!(list.lines().count(), 2, "header + vm1:\n{list}");
    assert_eq!(vmfork_ok(&listen, &["fork", "1"]).trim(), "2");
    let list = vmfork_ok(&listen, &["list"]);
    assert_eq!(list.lines().count(), 3, "header + 2 VMs:\n{list}");
    assert!(
        console.running(),
        "the console ended before list and fork were done"
    );
    // Their Hellos did not detach it: output printed after them still reaches it.
    let now = q.count("[vm1] counter: tick") as u64;
    let later = now + 3;
    q.wait_for(&format!("[vm1] counter: tick {later}"), DEFAULT_TIMEOUT);
    let (status, out, err) = console.finish();
    assert!(status.success(), "console failed: {err}");
    let got = ticks(&out);
    assert!(got.contains(&later), "tick {later} missing from {got:?}");
    // Consecutive: nothing lost on the way through the mux.
    assert!(
        got.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks not consecutive: {got:?}"
    );
    q.expect_no("panic");
    q.kill();
}

#[test]
fn two_consoles_on_two_vms_at_once_each_get_their_vms_output() {
    let socket = ControlSocket::new();
    let listen = ControlSocket::new();
    let mut q = Qemu::start(boot("mux_two_consoles", &socket));
    q.wait_for("[vm1] counter: tick 1", DEFAULT_TIMEOUT);
    let _mux = MuxProcess::start(&socket, &listen);

    // vm2 is a fork of vm1 kept paused while vm1 counts on: once resumed it counts from where
    // the fork was taken, far below vm1, so the two consoles' ticks tell the VMs apart.
    assert_eq!(vmfork_ok(&listen, &["fork", "1", "--paused"]).trim(), "2");
    q.wait_for("[vm1] counter: tick 100", DEFAULT_TIMEOUT);
    vmfork_ok(&listen, &["resume", "2"]);
    q.wait_for("[vm2] counter: tick", DEFAULT_TIMEOUT);

    let mut c1 = Console::start(&listen, 1, 3000);
    let mut c2 = Console::start(&listen, 2, 3000);
    c1.wait_streaming();
    c2.wait_streaming();
    assert!(
        c1.running() && c2.running(),
        "both consoles are attached at once"
    );
    // And a third process meanwhile.
    assert_eq!(vmfork_ok(&listen, &["list"]).lines().count(), 3);
    let (s1, out1, err1) = c1.finish();
    let (s2, out2, err2) = c2.finish();
    assert!(s1.success(), "console 1: {err1}");
    assert!(s2.success(), "console 2: {err2}");
    let (t1, t2) = (ticks(&out1), ticks(&out2));
    assert!(!t1.is_empty() && !t2.is_empty(), "{t1:?} {t2:?}");
    // An attach replays the VM's history first (its last 4 KiB), then streams: vm1's console
    // reaches past tick 100, vm2 (a fork, no history of the parent's) never gets there; each
    // is consecutive (nothing lost, nothing of the other VM).
    assert!(t1.iter().any(|&t| t >= 100), "vm1's console: {t1:?}");
    assert!(t2.iter().all(|&t| t < 100), "vm2's console: {t2:?}");
    for t in [&t1, &t2] {
        assert!(
            t.windows(2).all(|w| w[1] == w[0] + 1),
            "not consecutive: {t:?}"
        );
    }
    q.expect_no("panic");
    q.kill();
}
