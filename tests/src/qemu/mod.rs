//! QEMU integration-test harness.
//!
//! A test builds a [`QemuConfig`] (the vmfork monitor at EL2 with [`QemuConfig::monitor`], or any
//! EL1 kernel with [`QemuConfig::plain`]), starts it with [`Qemu::start`] and then reads the serial
//! console with [`Qemu::wait_for`] / [`Qemu::wait_for_regex`], writes to it with [`Qemu::send`] and
//! collects the exit code with [`Qemu::wait_exit`].
//!
//! The harness never runs cargo: the `Makefile` builds the bare-metal images first. A missing image
//! is a panic that names the path and says to run `make`.
//!
//! # Reading the serial output
//! The serial port (QEMU's stdout) is read by a background thread into a growing log. Each [`Qemu`]
//! keeps a *cursor* into that log:
//! - [`Qemu::wait_for`] and [`Qemu::wait_for_regex`] look only at output after the cursor, one line
//!   at a time, and move the cursor past the line they matched; successive waits therefore see
//!   successive output, and waiting for `A` then `B` checks that `B` comes after `A`.
//! - [`Qemu::count`], [`Qemu::expect_no`] and [`Qemu::serial`] look at the whole log so far.
//!
//! A line is complete when it ends in `\n`, when QEMU has exited, or when no output has arrived
//! for two seconds (a prompt without a newline). A match in an incomplete line waits for the line
//! to complete, so the returned line is whole and a regex never matches half a number. Trailing
//! `\r` is removed from returned lines.
//!
//! # Failures
//! Every wait has a deadline. On a timeout, or when QEMU exits before the pattern appears, the
//! wait panics; while the test unwinds, dropping the [`Qemu`] kills QEMU's whole process group and
//! prints a banner with the test name, the QEMU command line, the exit status, the temp dir (kept
//! for inspection, with `serial.log`, `stderr.log` and `command.txt` in it) and the full serial
//! log and QEMU's stderr.
//!
//! # Environment
//! - `VMFORK_MONITOR_IMAGE`: the monitor image (default
//!   `target/aarch64-unknown-none/release/vmfork-monitor`).
//! - `VMFORK_GUEST_DIR`: the directory of guest images (default
//!   `target/aarch64-unknown-none/release`).
//! - `CARGO_TARGET_DIR`: honoured when looking for the default image directory.
//! - `VMFORK_QEMU`: the QEMU binary (default `qemu-system-aarch64`).
//! - `VMFORK_TEST_TIMEOUT_SCALE`: multiplies every timeout (e.g. `3` on a very slow machine).
//! - `VMFORK_TEST_HARD_CAP_SECS`: a watchdog kills any QEMU that lives longer (default 1800).
//! - `VMFORK_TEST_ECHO=1`: also copy the serial output to stderr as it arrives (use with
//!   `--nocapture` to watch a test live).

pub mod linux;
pub mod proto_client;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The timeout tests should use for anything that is not deliberately short: generous, because CI
/// is a loaded 2-core machine. Never tune a test's timeout to be tight.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a line without a trailing newline must stay unchanged before it counts as complete.
const LINE_IDLE: Duration = Duration::from_secs(2);
/// How long to wait for QEMU to be reaped after SIGKILL, and for the reader threads to finish.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default lifetime cap of one QEMU, enforced by a watchdog thread.
const DEFAULT_HARD_CAP: Duration = Duration::from_secs(1800);
/// Longest test-name part of a temp-dir name, so that Unix socket paths in it stay short.
const MAX_NAME_LEN: usize = 48;

/// Makes every [`Qemu`] temp dir unique within this test process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match manifest.parent() {
        Some(root) => root.to_path_buf(),
        None => manifest.to_path_buf(),
    }
}

/// A non-empty environment variable as a path.
fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Where `make` puts the bare-metal images: `<target dir>/aarch64-unknown-none/release`.
fn image_dir() -> PathBuf {
    let target = match env_path("CARGO_TARGET_DIR") {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    };
    target.join("aarch64-unknown-none").join("release")
}

/// Panics with a clear message unless `path` is an existing file.
fn require_image(path: &Path, what: &str, var: &str) {
    if !path.is_file() {
        panic!(
            "{what} is missing: {}\n\
             Run `make` in the workspace root ({}) first: it builds the monitor and guest images \
             before running the tests (this harness never runs cargo itself).\n\
             Or set {var} to point at an existing image.",
            path.display(),
            workspace_root().display(),
        );
    }
}

/// The monitor image (`VMFORK_MONITOR_IMAGE`, or
/// `target/aarch64-unknown-none/release/vmfork-monitor`). Panics if it does not exist.
pub fn monitor_image() -> PathBuf {
    let path =
        env_path("VMFORK_MONITOR_IMAGE").unwrap_or_else(|| image_dir().join("vmfork-monitor"));
    require_image(&path, "the vmfork monitor image", "VMFORK_MONITOR_IMAGE");
    path
}

/// The host tool `vmfork` (`VMFORK_TOOL`, or `target/release/vmfork`, which `make` builds).
/// Panics if it does not exist.
pub fn vmfork_tool() -> PathBuf {
    let target = env_path("CARGO_TARGET_DIR").unwrap_or_else(|| workspace_root().join("target"));
    let path = env_path("VMFORK_TOOL").unwrap_or_else(|| target.join("release").join("vmfork"));
    require_image(&path, "the vmfork tool", "VMFORK_TOOL");
    path
}

/// The guest image `name` (in `VMFORK_GUEST_DIR`, or `target/aarch64-unknown-none/release`).
/// Panics if it does not exist.
pub fn guest_image(name: &str) -> PathBuf {
    let path = env_path("VMFORK_GUEST_DIR")
        .unwrap_or_else(image_dir)
        .join(name);
    require_image(
        &path,
        &format!("the guest image `{name}`"),
        "VMFORK_GUEST_DIR",
    );
    path
}

/// Multiplies `timeout` by `VMFORK_TEST_TIMEOUT_SCALE` (default 1).
fn scaled(timeout: Duration) -> Duration {
    match std::env::var("VMFORK_TEST_TIMEOUT_SCALE") {
        Ok(s) if !s.trim().is_empty() => match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => timeout.mul_f64(f),
            _ => panic!("VMFORK_TEST_TIMEOUT_SCALE must be a positive number, not {s:?}"),
        },
        _ => timeout,
    }
}

/// The watchdog's lifetime cap of one QEMU (`VMFORK_TEST_HARD_CAP_SECS`, default 1800 s).
fn hard_cap() -> Duration {
    match std::env::var("VMFORK_TEST_HARD_CAP_SECS") {
        Ok(s) if !s.trim().is_empty() => match s.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => panic!("VMFORK_TEST_HARD_CAP_SECS must be a positive integer, not {s:?}"),
        },
        _ => DEFAULT_HARD_CAP,
    }
}

/// How to start QEMU. Build it with [`QemuConfig::monitor`] or [`QemuConfig::plain`] and adjust it
/// with the builder methods; start it with [`Qemu::start`].
#[derive(Clone, Debug)]
pub struct QemuConfig {
    kernel: PathBuf,
    el2: bool,
    smp: u32,
    mem_mib: u64,
    append: Option<String>,
    extra: Vec<String>,
    icount: Option<u32>,
    name: Option<String>,
}

impl QemuConfig {
    /// The vmfork monitor at EL2: `-M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on
    /// -smp 4 -m 2G -semihosting`. Panics if the monitor image is missing.
    pub fn monitor() -> Self {
        QemuConfig {
            kernel: monitor_image(),
            el2: true,
            smp: 4,
            mem_mib: 2048,
            append: None,
            extra: Vec::new(),
            icount: None,
            name: None,
        }
    }

    /// A plain EL1 guest on QEMU virt: `-M virt,gic-version=3 -cpu max,pauth-impdef=on -smp 1
    /// -m 128M -semihosting` with `kernel` as `-kernel`.
    pub fn plain(kernel: impl AsRef<Path>) -> Self {
        QemuConfig {
            kernel: kernel.as_ref().to_path_buf(),
            el2: false,
            smp: 1,
            mem_mib: 128,
            append: None,
            extra: Vec::new(),
            icount: None,
            name: None,
        }
    }

    /// The image passed as `-kernel` (ELF, Linux arm64 Image, or a raw binary).
    pub fn kernel(mut self, p: impl AsRef<Path>) -> Self {
        self.kernel = p.as_ref().to_path_buf();
        self
    }

    /// Whether the CPUs implement EL2 and start there (`virtualization=on`) or start at EL1.
    pub fn el2(mut self, on: bool) -> Self {
        self.el2 = on;
        self
    }

    /// Number of CPUs (`-smp`).
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n;
        self
    }

    /// RAM size in MiB (`-m <mib>M`).
    pub fn mem_mib(mut self, mib: u64) -> Self {
        self.mem_mib = mib;
        self
    }

    /// The kernel command line (`-append`), which QEMU puts in the DTB's `/chosen/bootargs`.
    pub fn append(mut self, cmdline: &str) -> Self {
        self.append = Some(cmdline.to_string());
        self
    }

    /// One extra raw QEMU argument, added after the standard ones; call once per argument
    /// (`.arg("-fw_cfg").arg("name=opt/x,file=/path")`).
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }

    /// Instruction counting (`-icount shift=<shift>`): the virtual clock advances 2^shift ns per
    /// emulated instruction, so timings repeat run to run.
    pub fn icount(mut self, shift: u32) -> Self {
        self.icount = Some(shift);
        self
    }

    /// The test's name, used in the temp dir name and the failure banner. Defaults to the name of
    /// the current thread, which libtest sets to the test's name.
    pub fn name(mut self, test_name: &str) -> Self {
        self.name = Some(test_name.to_string());
        self
    }

    /// QEMU's arguments, without the program name.
    fn args(&self) -> Vec<OsString> {
        let machine = if self.el2 {
            "virt,virtualization=on,gic-version=3"
        } else {
            "virt,gic-version=3"
        };
        // QEMU runs in the test's working directory, so make a relative kernel path absolute now
        // (the failure banner then shows a path that can be pasted anywhere).
        let kernel = std::path::absolute(&self.kernel).unwrap_or_else(|_| self.kernel.clone());
        let mut args: Vec<OsString> = [
            "-M",
            machine,
            "-cpu",
            "max,pauth-impdef=on",
            "-smp",
            &self.smp.to_string(),
            "-m",
            &format!("{}M", self.mem_mib),
            "-semihosting",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push("-kernel".into());
        args.push(kernel.into_os_string());
        if let Some(cmdline) = &self.append {
            args.push("-append".into());
            args.push(cmdline.into());
        }
        if let Some(shift) = self.icount {
            args.push("-icount".into());
            args.push(format!("shift={shift}").into());
        }
        args.extend(self.extra.iter().map(OsString::from));
        args
    }
}

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

/// One argument quoted for a POSIX shell, if it needs quoting.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,.:/+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The command line as a shell would take it, for the failure banner.
fn shell_join(program: &OsString, args: &[OsString]) -> String {
    std::iter::once(program)
        .chain(args)
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bytes read so far from one of QEMU's output pipes.
struct StreamState {
    bytes: Vec<u8>,
    /// The pipe reached end of file (QEMU exited) or failed.
    eof: bool,
    /// When the last bytes arrived.
    last_rx: Instant,
}

/// One of QEMU's output pipes, filled by a reader thread.
struct Stream {
    state: Mutex<StreamState>,
    cond: Condvar,
}

impl Stream {
    fn new() -> Arc<Stream> {
        Arc::new(Stream {
            state: Mutex::new(StreamState {
                bytes: Vec::new(),
                eof: false,
                last_rx: Instant::now(),
            }),
            cond: Condvar::new(),
        })
    }

    /// Locks the state, ignoring poisoning: a panicking test must still be able to print the log.
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The whole stream so far, as (lossy) text.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock().bytes).into_owned()
    }

    /// Appends bytes that did not come from QEMU (e.g. a watchdog note) and wakes waiters.
    fn note(&self, msg: &str) {
        self.lock().bytes.extend_from_slice(msg.as_bytes());
        self.cond.notify_all();
    }
}

/// Spawns the thread that copies `pipe` into `stream` until end of file.
fn spawn_reader(
    thread_name: String,
    mut pipe: impl Read + Send + 'static,
    stream: Arc<Stream>,
    echo: bool,
) -> JoinHandle<()> {
    let body = move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    stream.note(&format!(
                        "\n[vmfork-tests: reading QEMU's output failed: {e}]\n"
                    ));
                    break;
                }
            };
            if echo {
                eprint!("{}", String::from_utf8_lossy(&buf[..n]));
            }
            let mut st = stream.lock();
            st.bytes.extend_from_slice(&buf[..n]);
            st.last_rx = Instant::now();
            drop(st);
            stream.cond.notify_all();
        }
        stream.lock().eof = true;
        stream.cond.notify_all();
    };
    match thread::Builder::new().name(thread_name).spawn(body) {
        Ok(handle) => handle,
        Err(e) => panic!("cannot spawn a QEMU output reader thread: {e}"),
    }
}

/// The QEMU child and, once reaped, its exit status. Reaping happens only under this lock, so a
/// holder that sees `status == None` knows QEMU's pid (= process group id) has not been reused.
struct Proc {
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    /// The exit status if QEMU has exited (reaping it), `None` while it runs.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
            }
        }
        self.status
    }

    /// SIGKILLs QEMU's whole process group unless QEMU has already been reaped.
    fn kill_group(&mut self) {
        if self.poll().is_some() {
            return;
        }
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            // Cannot happen on Linux (pids fit in pid_t); fall back to killing the leader.
            let _ = self.child.kill();
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions. `pgid` is the pid of the QEMU child
        // we spawned with `process_group(0)`, so it is also its process group id; we hold the
        // `Proc` lock and have just seen that the child is not reaped, so the id cannot have been
        // reused by an unrelated process group.
        let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if rc != 0 {
            let _ = self.child.kill();
        }
    }

    /// Waits (bounded) for the killed or exiting QEMU to be reaped.
    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Locks a `Proc`, ignoring poisoning.
fn lock_proc(p: &Mutex<Proc>) -> MutexGuard<'_, Proc> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A human description of an exit status.
fn describe_status(status: Option<ExitStatus>, killed_by_harness: bool) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "still running (could not be reaped)".to_string(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(sig)) if killed_by_harness && sig == libc::SIGKILL => {
                "killed by the test harness (SIGKILL)".to_string()
            }
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => format!("{s}"),
        },
    }
}

/// The last `n` lines of `text`, or `(none)`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "(none)".to_string();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
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

    /// Waits for the first line after the cursor for which `matcher` returns `Some`, moves the
    /// cursor past it and returns the line and the matcher's result. `what` describes the wait for
    /// panic messages.
    fn wait_line<T>(
        &self,
        what: &str,
        timeout: Duration,
        matcher: impl Fn(&str) -> Option<T>,
    ) -> (String, T) {
        let timeout = scaled(timeout);
        let start = Instant::now();
        let deadline = start + timeout;
        let mut cursor = self.cursor();
        let mut scan = *cursor;
        let mut st = self.serial.lock();
        loop {
            // Complete lines first; `scan` only ever moves past lines that did not match.
            while let Some(nl) = st.bytes[scan..].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&st.bytes[scan..scan + nl]);
                let line = line.trim_end_matches('\r');
                if let Some(found) = matcher(line) {
                    *cursor = scan + nl + 1;
                    return (line.to_string(), found);
                }
                scan += nl + 1;
            }
            let now = Instant::now();
            let partial = scan < st.bytes.len();
            let idle = now.duration_since(st.last_rx) >= LINE_IDLE;
            if partial && (st.eof || idle) {
                let line = String::from_utf8_lossy(&st.bytes[scan..]);
                let line = line.trim_end_matches('\r');
                if let Some(found) = matcher(line) {
                    *cursor = st.bytes.len();
                    return (line.to_string(), found);
                }
            }
            if st.eof {
                let since = String::from_utf8_lossy(&st.bytes[*cursor..]).into_owned();
                drop(st);
                drop(cursor);
                let status = lock_proc(&self.proc).reap(Duration::from_secs(2));
                panic!(
                    "[{}] QEMU exited ({}) before the serial output showed {what}\n\
                     output after the read cursor (last 20 lines):\n{}\n\
                     (full serial log and QEMU command line follow)",
                    self.name,
                    describe_status(status, self.killed_by_harness.load(Ordering::SeqCst)),
                    tail(&since, 20),
                );
            }
            if now >= deadline {
                let since = String::from_utf8_lossy(&st.bytes[*cursor..]).into_owned();
                drop(st);
                drop(cursor);
                panic!(
                    "[{}] timed out after {:.1} s waiting for {what} in the serial output\n\
                     output after the read cursor (last 20 lines):\n{}\n\
                     (full serial log and QEMU command line follow)",
                    self.name,
                    timeout.as_secs_f64(),
                    tail(&since, 20),
                );
            }
            // Sleep until new output, the deadline, or (with a partial line) the idle point.
            let mut wake = deadline;
            if partial && !idle {
                wake = wake.min(st.last_rx + LINE_IDLE);
            }
            let dur = wake
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            st = match self.serial.cond.wait_timeout(st, dur) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Waits until `pattern` (a substring, without newlines) appears in the serial output after
    /// the read cursor; returns the whole line containing it (without the line end) and moves the
    /// cursor past that line. Panics on timeout or if QEMU exits first; the full log is printed.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> String {
        assert!(
            !pattern.contains('\n'),
            "wait_for matches within one line; the pattern must not contain a newline: {pattern:?}"
        );
        self.wait_line(&format!("{pattern:?}"), timeout, |line| {
            line.contains(pattern).then_some(())
        })
        .0
    }

    /// Waits until a line after the read cursor matches the regex `re`; returns its capture
    /// groups (index 0 is the whole match; a group that did not participate is empty) and moves
    /// the cursor past the line. Panics on an invalid regex, on timeout, or if QEMU exits first.
    pub fn wait_for_regex(&self, re: &str, timeout: Duration) -> Vec<String> {
        let regex = match regex::Regex::new(re) {
            Ok(r) => r,
            Err(e) => panic!("invalid regex {re:?}: {e}"),
        };
        self.wait_line(&format!("a line matching /{re}/"), timeout, |line| {
            regex.captures(line).map(|caps| {
                caps.iter()
                    .map(|g| g.map_or_else(String::new, |m| m.as_str().to_string()))
                    .collect()
            })
        })
        .1
    }

    /// Panics if `pattern` appears anywhere in the serial output so far (cursor ignored).
    pub fn expect_no(&self, pattern: &str) {
        let log = self.serial.text();
        if let Some(pos) = log.find(pattern) {
            let line_start = log[..pos].rfind('\n').map_or(0, |i| i + 1);
            let line_end = log[pos..].find('\n').map_or(log.len(), |i| pos + i);
            panic!(
                "[{}] the serial output contains {pattern:?}, which it must not; in line:\n{}\n\
                 (full serial log and QEMU command line follow)",
                self.name,
                log[line_start..line_end].trim_end_matches('\r'),
            );
        }
    }

    /// The number of (non-overlapping) occurrences of `pattern` in the whole serial output so far.
    pub fn count(&self, pattern: &str) -> usize {
        if pattern.is_empty() {
            return 0;
        }
        self.serial.text().matches(pattern).count()
    }

    /// Writes `bytes` to the serial port (QEMU's stdin). Panics if QEMU no longer reads it.
    pub fn send(&self, bytes: &[u8]) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let result = match stdin.as_mut() {
            Some(pipe) => pipe.write_all(bytes).and_then(|()| pipe.flush()),
            None => Err(std::io::Error::other("QEMU's stdin is closed")),
        };
        if let Err(e) = result {
            drop(stdin);
            let status = match lock_proc(&self.proc).poll() {
                None => "still running".to_string(),
                status => describe_status(status, self.killed_by_harness.load(Ordering::SeqCst)),
            };
            panic!(
                "[{}] cannot write {} bytes to QEMU's serial port: {e}; QEMU {status}",
                self.name,
                bytes.len(),
            );
        }
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

    /// The whole serial output so far (lossy UTF-8).
    pub fn serial(&self) -> String {
        self.serial.text()
    }

    /// True once QEMU's serial output has ended (QEMU exited).
    pub fn has_exited(&self) -> bool {
        self.serial.lock().eof
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

/// The lines a guest prints on plain QEMU with `smp` CPUs and bootargs `cmdline` (none when
/// empty), once it has printed `last` and QEMU has exited with status 0: every non-empty line of
/// the serial port, since the guest is its only writer.
pub fn plain_lines(image: &str, smp: u32, cmdline: &str, last: &str) -> Vec<String> {
    let mut cfg = QemuConfig::plain(guest_image(image))
        .smp(smp)
        .name(&format!("{image}_plain_ref"));
    if !cmdline.is_empty() {
        cfg = cfg.append(cmdline);
    }
    let mut q = Qemu::start(cfg);
    q.wait_for(last, DEFAULT_TIMEOUT);
    assert_eq!(
        q.wait_exit(DEFAULT_TIMEOUT),
        0,
        "plain run of {image} failed"
    );
    complete_lines(&q)
        .into_iter()
        .filter(|l| !l.is_empty())
        .collect()
}

/// The complete lines VM `vm` printed on the monitor's console, without their `[vmN] ` prefix.
pub fn vm_lines(q: &Qemu, vm: u32) -> Vec<String> {
    let prefix = format!("[vm{vm}] ");
    complete_lines(q)
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// The lines of the serial log that are complete (ended by a newline; `\r` removed). After QEMU
/// has exited, the last unterminated line counts as complete too.
pub fn complete_lines(q: &Qemu) -> Vec<String> {
    let log = q.serial();
    let mut lines: Vec<String> = log
        .split('\n')
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    let last = lines.pop().unwrap_or_default();
    if !last.is_empty() && q.has_exited() {
        lines.push(last);
    }
    lines
}

/// Waits until `pattern` appears in `n` complete lines anywhere in the log (for events of
/// several VMs, which come in any order). Panics with the log after [`DEFAULT_TIMEOUT`].
pub fn wait_count(q: &Qemu, pattern: &str, n: usize) {
    let deadline = Instant::now() + scaled(DEFAULT_TIMEOUT);
    while complete_lines(q)
        .iter()
        .filter(|l| l.contains(pattern))
        .count()
        < n
    {
        assert!(
            Instant::now() < deadline,
            "`{pattern}` did not appear in {n} lines:\n{}",
            q.serial()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the `vmfork` tool against the monitor at `socket` with `args` (stdin empty).
pub fn vmfork_run(socket: &ControlSocket, args: &[&str]) -> std::process::Output {
    Command::new(vmfork_tool())
        .arg("--socket")
        .arg(socket.path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vmfork")
}

/// Runs the `vmfork` tool and returns its stdout, failing the test (with stderr) on an error.
pub fn vmfork_ok(socket: &ControlSocket, args: &[&str]) -> String {
    let out = vmfork_run(socket, args);
    assert!(
        out.status.success(),
        "vmfork {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Unix socket path for the monitor's control channel: unique, short enough for `sun_path`
/// (108 bytes, so under /tmp rather than the test's temp dir), removed on drop.
pub struct ControlSocket(PathBuf);

static CONTROL_SOCKETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl ControlSocket {
    /// A fresh path (nothing is created until QEMU starts).
    pub fn new() -> Self {
        let n = CONTROL_SOCKETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/vmf-ctl-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        ControlSocket(path)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Connects, retrying for up to 30 s while QEMU has not created the socket yet; reads and
    /// writes time out after `io_timeout`.
    pub fn connect(&self, io_timeout: Duration) -> std::os::unix::net::UnixStream {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match std::os::unix::net::UnixStream::connect(&self.0) {
                Ok(s) => {
                    s.set_read_timeout(Some(io_timeout)).expect("read timeout");
                    s.set_write_timeout(Some(io_timeout))
                        .expect("write timeout");
                    return s;
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot connect to {}: {e}", self.0.display()),
            }
        }
    }
}

impl Default for ControlSocket {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl QemuConfig {
    /// Adds the monitor's control channel: port 1 (`virtserialport`, named `vmfork.ctl`) of a
    /// virtio console on QEMU's virtio-mmio bus, backed by a Unix socket server at `socket` that
    /// waits for nobody.
    pub fn control(self, socket: &ControlSocket) -> Self {
        let chardev = format!(
            "socket,id=ctl,path={},server=on,wait=off",
            socket.path().display()
        );
        self.arg("-chardev")
            .arg(&chardev)
            .arg("-device")
            .arg("virtio-serial-device")
            .arg("-device")
            .arg("virtserialport,chardev=ctl,name=vmfork.ctl,nr=1")
    }

    /// Adds guest `index` of the monitor: `image` (a guest-images name or a path) as its kernel
    /// and, unless empty, `config` as its fw_cfg config text.
    pub fn guest(self, index: u32, image: &str, config: &str) -> Self {
        let path = if Path::new(image).exists() {
            PathBuf::from(image)
        } else {
            guest_image(image)
        };
        self.guest_files(index, &path, None, config)
    }

    /// Adds guest `index` of the monitor from files: `kernel`, an optional `initrd` and, unless
    /// empty, `config` as its fw_cfg config text.
    pub fn guest_files(
        self,
        index: u32,
        kernel: &Path,
        initrd: Option<&Path>,
        config: &str,
    ) -> Self {
        let mut cfg = self.arg("-fw_cfg").arg(&format!(
            "name=opt/vmfork/{index}/kernel,file={}",
            kernel.display()
        ));
        if let Some(initrd) = initrd {
            cfg = cfg.arg("-fw_cfg").arg(&format!(
                "name=opt/vmfork/{index}/initrd,file={}",
                initrd.display()
            ));
        }
        if config.is_empty() {
            return cfg;
        }
        // fw_cfg's `string=` takes commas doubled.
        cfg.arg("-fw_cfg").arg(&format!(
            "name=opt/vmfork/{index}/config,string={}",
            config.replace(',', ",,")
        ))
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

    #[test]
    fn shell_quote_quotes_only_when_needed() {
        assert_eq!(shell_quote("-M"), "-M");
        assert_eq!(shell_quote("virt,gic-version=3"), "virt,gic-version=3");
        assert_eq!(shell_quote("log=debug x"), "'log=debug x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn monitor_args_match_the_contract() {
        let cfg = QemuConfig {
            kernel: PathBuf::from("/img"),
            el2: true,
            smp: 4,
            mem_mib: 2048,
            append: Some("log=debug".into()),
            extra: vec!["-fw_cfg".into(), "name=opt/x,string=1".into()],
            icount: Some(0),
            name: None,
        };
        let line = shell_join(&"qemu".into(), &cfg.args());
        assert_eq!(
            line,
            "qemu -M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on -smp 4 \
             -m 2048M -semihosting -display none -monitor none -serial stdio -no-reboot \
             -kernel /img -append log=debug -icount shift=0 -fw_cfg name=opt/x,string=1"
        );
    }

    #[test]
    fn plain_args_are_el1_single_cpu() {
        let line = shell_join(&"qemu".into(), &QemuConfig::plain("/k").args());
        assert!(line.starts_with(
            "qemu -M virt,gic-version=3 -cpu max,pauth-impdef=on -smp 1 -m 128M -semihosting"
        ));
        assert!(line.ends_with("-kernel /k"));
    }

    #[test]
    fn tail_takes_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "(none)");
    }
}
