//! [`Qemu`], a running QEMU: starting it (its own process group, a watchdog, a private temp dir),
//! waiting for its exit, killing it, and the failure banner printed when a test panics. Reading
//! and writing its serial console is in `console`.

mod console;
pub(crate) mod process;
mod serial;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use self::process::{describe_status, lock_proc, shell_join, Proc};
use self::serial::{spawn_reader, Stream};
use crate::timing::{hard_cap, scaled};
use crate::QemuConfig;

/// How long to wait for QEMU to be reaped after SIGKILL, and for the reader threads to finish.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest test-name part of a temp-dir name, so that Unix socket paths in it stay short.
const MAX_NAME_LEN: usize = 48;

/// Makes every [`Qemu`] temp dir unique within this test process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The test name libtest gave the current thread, or `qemu`.
fn default_name() -> String {
    thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("qemu")
        .to_string()
}

/// `name` reduced to characters that are safe in a file name, at most [`MAX_NAME_LEN`] long.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.');
    let start = s.len().saturating_sub(MAX_NAME_LEN);
    // Keep the end: `module::test_name` is most specific at its end. All chars are ASCII here.
    let s = &s[start..];
    if s.is_empty() {
        "qemu".to_string()
    } else {
        s.to_string()
    }
}

/// A running QEMU: the child process (in its own process group), the threads capturing its serial
/// output and stderr, a watchdog, and a temp dir. Dropping it kills QEMU.
pub struct Qemu {
    name: String,
    cmdline: String,
    pid: u32,
    started: Instant,
    proc: Arc<Mutex<Proc>>,
    stdin: Mutex<Option<ChildStdin>>,
    serial: Arc<Stream>,
    stderr: Arc<Stream>,
    /// Byte offset in the serial log where the next `wait_for` starts looking.
    cursor: Mutex<usize>,
    readers: Vec<JoinHandle<()>>,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    killed_by_harness: Arc<AtomicBool>,
    temp_dir: PathBuf,
}

impl Qemu {
    /// Starts QEMU. Panics with a clear message if `qemu-system-aarch64` is not installed.
    ///
    /// QEMU runs in its own process group and is SIGKILLed by the kernel when the thread that
    /// called `start` exits (`PR_SET_PDEATHSIG`), so that it never outlives a killed test
    /// process. Hence a `Qemu` must not outlive the thread that started it.
    pub fn start(cfg: QemuConfig) -> Qemu {
        let name = cfg.name.clone().unwrap_or_else(default_name);
        let program: OsString = std::env::var_os("VMFORK_QEMU")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "qemu-system-aarch64".into());
        let args = cfg.args();
        let cmdline = shell_join(&program, &args);

        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp_dir = std::env::temp_dir().join("vmfork-tests").join(format!(
            "{}-{}-{n}",
            sanitize(&name),
            std::process::id()
        ));
        if let Err(e) = std::fs::create_dir_all(&temp_dir) {
            panic!("cannot create the temp dir {}: {e}", temp_dir.display());
        }

        let mut command = Command::new(&program);
        command
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A process group of its own, so that killing the group leaves no orphan behind.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        // Being in its own group, QEMU no longer gets the terminal's ^C; if the test process dies
        // without running Drop (^C, a killed `cargo test`), the kernel kills QEMU instead.
        let parent = std::process::id();
        let die_with_parent = move || {
            // SIGKILL fits in c_ulong; prctl's unused arguments must be zero.
            let sig = libc::SIGKILL as libc::c_ulong;
            // SAFETY: runs in the forked child before exec; prctl(2) takes plain integers here.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody would ever kill QEMU.
            // SAFETY: getppid(2) cannot fail and has no preconditions.
            if u32::try_from(unsafe { libc::getppid() }).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        };
        // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are
        // allowed: it calls prctl(2) and getppid(2) only and allocates nothing (an `io::Error` made
        // from an OS error code is not heap-allocated).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, die_with_parent);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&temp_dir);
                if e.kind() == std::io::ErrorKind::NotFound {
                    panic!(
                        "`{}` not found: install QEMU with `apt-get install -y qemu-system-arm` \
                         (or set VMFORK_QEMU to the binary)\ncommand: {cmdline}",
                        program.to_string_lossy()
                    );
                }
                panic!("cannot start QEMU: {e}\ncommand: {cmdline}");
            }
        };
        let pid = child.id();

        let serial = Stream::new();
        let stderr = Stream::new();
        let echo = std::env::var("VMFORK_TEST_ECHO").is_ok_and(|v| v == "1");
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(
                format!("qemu-serial-{pid}"),
                out,
                serial.clone(),
                echo,
            ));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(
                format!("qemu-stderr-{pid}"),
                err,
                stderr.clone(),
                false,
            ));
        }
        let stdin = child.stdin.take();
        let proc = Arc::new(Mutex::new(Proc {
            child,
            status: None,
        }));
        let killed_by_harness = Arc::new(AtomicBool::new(false));

        let cap = hard_cap();
        let (cancel, cancelled) = mpsc::channel::<()>();
        let watchdog = {
            let watched = proc.clone();
            let stderr = stderr.clone();
            let killed = killed_by_harness.clone();
            let body = move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(cap) {
                    let mut p = lock_proc(&watched);
                    if p.poll().is_none() {
                        killed.store(true, Ordering::SeqCst);
                        p.kill_group();
                        stderr.note(&format!(
                            "\n[vmfork-tests: watchdog killed QEMU after the hard cap of {} s \
                             (VMFORK_TEST_HARD_CAP_SECS)]\n",
                            cap.as_secs()
                        ));
                    }
                }
            };
            match thread::Builder::new()
                .name(format!("qemu-watchdog-{pid}"))
                .spawn(body)
            {
                Ok(handle) => Some((cancel, handle)),
                Err(e) => {
                    let mut p = lock_proc(&proc);
                    p.kill_group();
                    p.reap(REAP_TIMEOUT);
                    panic!("cannot spawn the QEMU watchdog thread: {e}");
                }
            }
        };

        Qemu {
            name,
            cmdline,
            pid,
            started: Instant::now(),
            proc,
            stdin: Mutex::new(stdin),
            serial,
            stderr,
            cursor: Mutex::new(0),
            readers,
            watchdog,
            killed_by_harness,
            temp_dir,
        }
    }

    /// QEMU's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The cursor, ignoring poisoning.
    fn cursor(&self) -> MutexGuard<'_, usize> {
        self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for QEMU to exit by itself and returns its exit code (with `-semihosting`, the code
    /// the guest passed to SYS_EXIT). On timeout QEMU is killed and this panics; it also panics if
    /// QEMU was killed by a signal.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = lock_proc(&self.proc).poll() {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "[{}] QEMU did not exit within {:.1} s; killed it\n\
                     (full serial log and QEMU command line follow)",
                    self.name,
                    timeout.as_secs_f64()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        // QEMU has exited: let the readers drain the pipes so that serial() is complete.
        self.join_readers();
        match status.code() {
            Some(code) => code,
            None => panic!(
                "[{}] QEMU did not exit normally: {}",
                self.name,
                describe_status(Some(status), self.killed_by_harness.load(Ordering::SeqCst))
            ),
        }
    }

    /// This QEMU's private temp dir: `<tmp>/vmfork-tests/<name>-<pid>-<counter>`. It is removed
    /// when the `Qemu` is dropped after a passing test and kept when the test fails.
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }

    /// Kills QEMU's whole process group (if still running) and reaps it.
    pub fn kill(&mut self) {
        let mut p = lock_proc(&self.proc);
        if p.poll().is_none() {
            self.killed_by_harness.store(true, Ordering::SeqCst);
            p.kill_group();
        }
        p.reap(REAP_TIMEOUT);
        drop(p);
        // Nobody reads stdin any more; closing it lets QEMU's siblings (if any) see EOF.
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Joins the output reader threads, waiting at most [`REAP_TIMEOUT`] for them to finish.
    fn join_readers(&mut self) {
        let deadline = Instant::now() + REAP_TIMEOUT;
        while self.readers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let (done, pending): (Vec<_>, Vec<_>) =
            self.readers.drain(..).partition(|h| h.is_finished());
        for handle in done {
            let _ = handle.join();
        }
        // A reader still blocked (a pipe held open by a stray process) is left detached.
        self.readers = pending;
    }

    /// Stops the watchdog thread, so it can never act after QEMU has been reaped.
    fn cancel_watchdog(&mut self) {
        if let Some((cancel, handle)) = self.watchdog.take() {
            drop(cancel);
            let _ = handle.join();
        }
    }

    /// The failure banner: test name, command line, status, temp dir and the full logs.
    fn banner(&self) -> String {
        let status = lock_proc(&self.proc).status;
        let status = describe_status(status, self.killed_by_harness.load(Ordering::SeqCst));
        let serial = self.serial.lock().bytes.clone();
        let cursor = (*self.cursor()).min(serial.len());
        let stderr = self.stderr.text();
        let rule = "=".repeat(24);
        let mut out = String::new();
        out.push_str(&format!(
            "\n{rule} vmfork-tests: QEMU of failed test `{}` {rule}\n",
            self.name
        ));
        out.push_str(&format!("command:  {}\n", self.cmdline));
        out.push_str(&format!("status:   {status}\n"));
        out.push_str(&format!(
            "ran for:  {:.1} s\n",
            self.started.elapsed().as_secs_f64()
        ));
        out.push_str(&format!(
            "temp dir: {} (kept for inspection)\n",
            self.temp_dir.display()
        ));
        out.push_str(&format!(
            "---------- serial output ({} bytes) ----------\n",
            serial.len()
        ));
        out.push_str(&String::from_utf8_lossy(&serial[..cursor]));
        if !serial[..cursor].ends_with(b"\n") && cursor > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "---------- (wait_for read cursor at byte {cursor}) ----------\n"
        ));
        out.push_str(&String::from_utf8_lossy(&serial[cursor..]));
        if !serial.ends_with(b"\n") && serial.len() > cursor {
            out.push('\n');
        }
        out.push_str(&format!(
            "---------- QEMU stderr ({} bytes) ----------\n",
            stderr.len()
        ));
        out.push_str(&stderr);
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!(
            "{rule} end of QEMU log of `{}` {rule}\n",
            self.name
        ));
        out
    }

    /// Writes `command.txt`, `serial.log` and `stderr.log` into the temp dir (best effort).
    fn save_logs(&self) {
        let serial = self.serial.lock().bytes.clone();
        let _ = std::fs::write(self.temp_dir.join("serial.log"), serial);
        let _ = std::fs::write(self.temp_dir.join("stderr.log"), self.stderr.text());
        let _ = std::fs::write(
            self.temp_dir.join("command.txt"),
            format!("{}\n", self.cmdline),
        );
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.cancel_watchdog();
        self.kill();
        self.join_readers();
        if thread::panicking() {
            self.save_logs();
            eprintln!("{}", self.banner());
        } else {
            let _ = std::fs::remove_dir_all(&self.temp_dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_the_end_of_long_names() {
        assert_eq!(sanitize("boot::ready_line"), "boot__ready_line");
        assert_eq!(sanitize(""), "qemu");
        assert_eq!(sanitize("..//"), "__");
        let long = "a".repeat(40) + &"b".repeat(40);
        let s = sanitize(&long);
        assert_eq!(s.len(), MAX_NAME_LEN);
        assert!(s.ends_with(&"b".repeat(40)));
    }
}
