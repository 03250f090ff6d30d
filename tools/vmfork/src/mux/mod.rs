//! `vmfork mux`: one connection to the monitor, shared by any number of clients.
//!
//! The monitor's control channel is one virtio console that QEMU connects to one Unix socket, and
//! QEMU serves one client at a time. The mux holds that one connection ("upstream") and accepts
//! clients on its own socket. Clients speak the normal protocol to it and cannot tell it from the
//! monitor:
//! - `Hello` is answered by the mux (the monitor's `Hello` drops every console attachment, so a
//!   client's `Hello` is never forwarded; the mux says hello upstream once, when it connects).
//! - Other requests are forwarded with their ids rewritten to unique upstream ids; replies go
//!   back to the client that asked, with its own id. A client that has gone loses its replies.
//! - The monitor keeps one console attachment per VM. The mux attaches a VM upstream when the
//!   first client attaches it, answers later attaches itself, fans `ConsoleOutput` out to every
//!   client attached to the VM (each with its own attach id), and detaches upstream when the last
//!   one detaches or disconnects.
//! - A dump a client leaves open when it disconnects is closed upstream.
//!
//! The protocol logic is [`Router`], a state machine without I/O (tested on its own); [`Mux`]
//! runs it with threads: one reads the upstream socket, one writes it, and each client has a
//! reader and a writer thread. Every frame is routed under one lock, so the frames each client
//! receives are in a consistent order (no event after the `Ok` of a detach).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmfork_proto::{Decoder, ErrorReply, FrameError, Request, Response, PROTOCOL_VERSION};

mod router;
pub use router::{ClientId, Dest, Outgoing, Router, UPSTREAM_LOST};

/// How a mux runs.
#[derive(Clone, Debug)]
pub struct MuxOptions {
    /// The monitor's socket (QEMU's `-chardev socket,...,server=on`).
    pub upstream: PathBuf,
    /// Where clients connect.
    pub listen: PathBuf,
    /// How long to keep trying while the upstream socket does not exist or refuses; `None`:
    /// until it is there.
    pub connect_wait: Option<Duration>,
    /// How long to wait for the monitor's `HelloReply` (the `Hello` is resent meanwhile: QEMU
    /// accepts connections before the monitor drives the console); `None`: until it answers.
    pub hello_wait: Option<Duration>,
    /// How long a client that connects before the monitor has answered is held before it is
    /// told so (an `Error` reply to its `Hello` that says what the mux waits for).
    pub hold_early_clients: Duration,
    /// Bytes queued for one client before it is cut off as too slow.
    pub client_queue_bytes: usize,
    /// Where the mux's log goes (named in what it tells clients).
    pub log: MuxLog,
    /// A second path to make a symbolic link to `listen` while the mux serves, if nothing live
    /// is there (the per-user default socket, [`crate::socket::user_socket`]).
    pub link: Option<PathBuf>,
}

impl MuxOptions {
    /// Defaults: wait for the monitor as long as it takes, hold early clients 5 s, 64 MiB per
    /// client queue, log to stderr, no link.
    pub fn new(upstream: &Path, listen: &Path) -> MuxOptions {
        MuxOptions {
            upstream: upstream.to_path_buf(),
            listen: listen.to_path_buf(),
            connect_wait: None,
            hello_wait: None,
            hold_early_clients: Duration::from_secs(5),
            client_queue_bytes: 64 << 20,
            log: MuxLog::stderr(),
            link: None,
        }
    }
}

/// The mux's log: timestamped lines on stderr or appended to a file.
#[derive(Clone)]
pub struct MuxLog {
    path: Option<PathBuf>,
    out: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl fmt::Debug for MuxLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxLog").field("path", &self.path).finish()
    }
}

impl MuxLog {
    /// Lines go to stderr.
    pub fn stderr() -> MuxLog {
        MuxLog {
            path: None,
            out: Arc::new(Mutex::new(Box::new(io::stderr()))),
        }
    }

    /// Lines are appended to `path` (created if missing).
    pub fn file(path: &Path) -> io::Result<MuxLog> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(MuxLog {
            path: Some(path.to_path_buf()),
            out: Arc::new(Mutex::new(Box::new(f))),
        })
    }

    /// The log file, if it is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes one line, `<UTC time> vmfork mux: <msg>`.
    pub fn line(&self, msg: &str) {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let mut out = lock(&self.out);
        let _ = writeln!(out, "{now} vmfork mux[{}]: {msg}", std::process::id());
        let _ = out.flush();
    }

    /// ` (log: PATH)` when the log is a file, for messages that send the reader there.
    pub fn hint(&self) -> String {
        self.path
            .as_ref()
            .map(|p| format!("; its log: {}", p.display()))
            .unwrap_or_default()
    }
}

/// Why a mux could not start. Each displays as one line.
#[derive(Debug)]
pub enum MuxError {
    /// The upstream socket could not be connected in time.
    Connect {
        /// Its path.
        path: PathBuf,
        /// The last error.
        source: io::Error,
    },
    /// The monitor did not complete the handshake.
    Handshake(String),
    /// The monitor speaks another protocol version.
    VersionMismatch {
        /// The monitor's version.
        monitor: u16,
    },
    /// The listening socket could not be created.
    Listen {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another mux (or something else) already serves the listening path.
    AlreadyServing(PathBuf),
    /// QEMU closed the connection before the monitor answered.
    Closed,
    /// Socket I/O during start-up failed.
    Io(io::Error),
}

impl fmt::Display for MuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MuxError::Connect { path, source } => write!(
                f,
                "cannot connect to the monitor at {}: {source} (is QEMU running? start it with `make qemu-virt`)",
                path.display()
            ),
            MuxError::Handshake(m) => write!(f, "handshake with the monitor failed: {m}"),
            MuxError::VersionMismatch { monitor } => write!(
                f,
                "protocol version mismatch: the monitor speaks v{monitor}, this vmfork speaks v{PROTOCOL_VERSION}"
            ),
            MuxError::Listen { path, reason } => {
                write!(f, "cannot listen on {}: {reason}", path.display())
            }
            MuxError::AlreadyServing(p) => {
                write!(f, "something already serves {} (another vmfork mux?)", p.display())
            }
            MuxError::Closed => write!(f, "QEMU closed the connection before the monitor answered"),
            MuxError::Io(e) => write!(f, "control channel: {e}"),
        }
    }
}

impl std::error::Error for MuxError {}

/// How a running mux ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MuxEnd {
    /// The monitor's socket closed (QEMU exited).
    UpstreamClosed,
    /// [`Mux::stop`] was called.
    Stopped,
}

struct Sink {
    tx: mpsc::Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    stream: UnixStream,
}

struct Inner {
    router: Router,
    sinks: HashMap<ClientId, Sink>,
    upstream: mpsc::Sender<Vec<u8>>,
}

struct Shared {
    inner: Mutex<Inner>,
    stop: AtomicBool,
    listen: PathBuf,
    queue_limit: usize,
    writers: Mutex<Vec<JoinHandle<()>>>,
    ended: Mutex<Option<MuxEnd>>,
    ended_cv: Condvar,
    next_client: AtomicU64,
    /// Our link to `listen`, removed at the end.
    link: Option<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends what the router produced. Called with the lock held, so that the order in which frames
/// are queued is the order in which the router produced them; nothing here blocks.
fn dispatch(inner: &mut Inner, out: &mut Vec<Outgoing>, limit: usize) {
    let mut slow = Vec::new();
    for o in out.drain(..) {
        let mut bytes = Vec::new();
        if o.frame.encode(&mut bytes).is_err() {
            continue;
        }
        match o.dest {
            Dest::Upstream => {
                let _ = inner.upstream.send(bytes);
            }
            Dest::Client(c) => {
                if let Some(s) = inner.sinks.get(&c) {
                    let n = bytes.len();
                    if s.queued.load(Ordering::SeqCst) + n > limit {
                        slow.push(c);
                    } else {
                        s.queued.fetch_add(n, Ordering::SeqCst);
                        let _ = s.tx.send(bytes);
                    }
                }
            }
        }
    }
    for c in slow {
        // Too far behind: cut it off. Its reader sees the end and reports it gone.
        if let Some(s) = inner.sinks.remove(&c) {
            let _ = s.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A running mux. Dropping it stops it.
pub struct Mux {
    shared: Arc<Shared>,
    upstream: UnixStream,
    monitor: String,
}

impl fmt::Debug for Mux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mux")
            .field("listen", &self.shared.listen)
            .field("monitor", &self.monitor)
            .finish()
    }
}

/// What the mux is doing, shared with the accept loop, which serves clients only once the
/// monitor has answered and tells early ones what it waits for.
struct Startup {
    phase: Mutex<Phase>,
    since: Instant,
    listen: PathBuf,
    hold: Duration,
    gives_up: bool,
    log: MuxLog,
}

enum Phase {
    /// Not serving yet; what it waits for.
    Waiting(String),
    /// The monitor answered.
    Serving(Arc<Shared>),
    /// It gave up (the reason), or has stopped.
    Over(String),
}

impl Startup {
    fn waiting(&self, what: String) {
        *lock(&self.phase) = Phase::Waiting(what);
    }

    /// What an early client is told.
    fn not_ready(&self) -> String {
        match &*lock(&self.phase) {
            Phase::Waiting(what) => format!(
                "vmfork mux at {}: the monitor has not answered yet: {what} ({} s so far); the mux {}{}",
                self.listen.display(),
                self.since.elapsed().as_secs(),
                if self.gives_up { "gives up after its --wait" } else { "keeps trying" },
                self.log.hint()
            ),
            Phase::Over(why) => format!(
                "vmfork mux at {}: gave up: {why}{}",
                self.listen.display(),
                self.log.hint()
            ),
            Phase::Serving(_) => String::from("vmfork mux: serving"),
        }
    }
}

/// Logs `msg` the first time and then every 30 s while a wait goes on.
struct Every30s(Option<Instant>);

impl Every30s {
    fn due(&mut self) -> bool {
        if self
            .0
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
        {
            self.0 = Some(Instant::now());
            return true;
        }
        false
    }
}

fn connect_upstream(
    path: &Path,
    wait: Option<Duration>,
    st: &Startup,
) -> Result<UnixStream, MuxError> {
    let deadline = wait.map(|w| Instant::now() + w);
    let mut report = Every30s(None);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && deadline.is_none_or(|d| Instant::now() < d) =>
            {
                let what = if e.kind() == io::ErrorKind::NotFound {
                    format!(
                        "QEMU's socket {} does not exist yet (is QEMU running?)",
                        path.display()
                    )
                } else {
                    format!(
                        "QEMU's socket {} refuses connections (is QEMU running?)",
                        path.display()
                    )
                };
                if report.due() {
                    st.log.line(&format!("waiting: {what}"));
                }
                st.waiting(what);
                thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(MuxError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Says hello upstream, resending every 2 s (every 10 s after the first 30 s) until `wait` is
/// over. Returns the monitor's name and the next unused request id.
fn handshake(
    stream: &mut UnixStream,
    dec: &mut Decoder,
    wait: Option<Duration>,
    log: &MuxLog,
) -> Result<(String, u32), MuxError> {
    let start = Instant::now();
    let deadline = wait.map(|w| start + w);
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(MuxError::Io)?;
    // While the monitor is not driving the console, QEMU stops reading the socket: a resend
    // that does not fit is dropped rather than blocking the mux.
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .map_err(MuxError::Io)?;
    let mut id = 0u32;
    let mut sent: Option<Instant> = None;
    let mut report = Every30s(Some(Instant::now()));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let resend = if start.elapsed() < Duration::from_secs(30) {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        };
        if sent.is_none_or(|t| t.elapsed() >= resend) {
            id += 1;
            let hello = Request::Hello {
                version: PROTOCOL_VERSION,
                client: format!("vmfork mux {}", env!("CARGO_PKG_VERSION")),
            };
            let mut bytes = Vec::new();
            hello
                .encode_frame(id, &mut bytes)
                .map_err(|e| MuxError::Handshake(e.to_string()))?;
            match stream.write_all(&bytes) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(MuxError::Closed),
                Err(e) => return Err(MuxError::Io(e)),
            }
            sent = Some(Instant::now());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(MuxError::Handshake(format!(
                "no HelloReply within {} s (has the monitor booted? is another client connected to QEMU's socket?)",
                start.elapsed().as_secs()
            )));
        }
        if report.due() {
            log.line(&format!(
                "still no HelloReply from the monitor after {} s (booting? QEMU started with -S? another client on QEMU's socket?)",
                start.elapsed().as_secs()
            ));
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err(MuxError::Closed),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(MuxError::Closed),
            Err(e) => return Err(MuxError::Io(e)),
        };
        let mut result = None;
        for f in dec.push(&buf[..n]).flatten() {
            if result.is_some() {
                continue;
            }
            match Response::decode(f.kind, &f.payload) {
                Ok(Response::HelloReply { version, monitor }) => {
                    result = Some(if version == PROTOCOL_VERSION && f.version == version {
                        Ok(monitor)
                    } else {
                        Err(MuxError::VersionMismatch { monitor: version })
                    });
                }
                Ok(Response::Error(ErrorReply::VersionMismatch { ours, .. })) => {
                    result = Some(Err(MuxError::VersionMismatch { monitor: ours }));
                }
                _ => {}
            }
        }
        if let Some(r) = result {
            stream.set_read_timeout(None).map_err(MuxError::Io)?;
            stream.set_write_timeout(None).map_err(MuxError::Io)?;
            return r.map(|m| (m, id + 1));
        }
    }
}

/// Connects to QEMU's socket and says hello, connecting again when QEMU closes the connection
/// before the monitor answered (a QEMU that was restarted).
fn reach_monitor(
    opts: &MuxOptions,
    st: &Startup,
) -> Result<(UnixStream, Decoder, String, u32), MuxError> {
    loop {
        let mut up = connect_upstream(&opts.upstream, opts.connect_wait, st)?;
        let what = format!(
            "connected to QEMU's socket {}, no HelloReply from the monitor (still booting? QEMU started with -S?)",
            opts.upstream.display()
        );
        st.log.line(&format!(
            "connected to QEMU's socket {}; waiting for the monitor to answer",
            opts.upstream.display()
        ));
        st.waiting(what);
        let mut dec = Decoder::new();
        match handshake(&mut up, &mut dec, opts.hello_wait, &opts.log) {
            Ok((monitor, uid)) => return Ok((up, dec, monitor, uid)),
            Err(MuxError::Closed) => {
                st.log.line(
                    "QEMU closed the connection before the monitor answered; connecting again",
                );
                thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes `link` a symbolic link to `target` unless something live serves `link` already.
/// Returns whether it did.
fn claim_link(link: &Path, target: &Path, log: &MuxLog) -> bool {
    if UnixStream::connect(link).is_ok() {
        log.line(&format!(
            "not linking {}: another monitor's socket is served there",
            link.display()
        ));
        return false;
    }
    let target = std::path::absolute(target).unwrap_or_else(|_| target.to_path_buf());
    let r = crate::socket::private_dir_for(link).and_then(|()| {
        match std::fs::remove_file(link) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::os::unix::fs::symlink(&target, link)
    });
    match r {
        Ok(()) => {
            log.line(&format!(
                "{} now leads to {}",
                link.display(),
                target.display()
            ));
            true
        }
        Err(e) => {
            log.line(&format!("cannot link {}: {e}", link.display()));
            false
        }
    }
}

/// Removes `link` if it is still our link to `target`.
fn release_link(link: &Path, target: &Path) {
    let target = std::path::absolute(target).unwrap_or_else(|_| target.to_path_buf());
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        let _ = std::fs::remove_file(link);
    }
}

fn bind(path: &Path, upstream: &Path) -> Result<UnixListener, MuxError> {
    if path == upstream {
        return Err(MuxError::Listen {
            path: path.to_path_buf(),
            reason: "it is the upstream socket".into(),
        });
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if !is_socket {
                return Err(MuxError::Listen {
                    path: path.to_path_buf(),
                    reason: "the path exists and is not a socket".into(),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(MuxError::AlreadyServing(path.to_path_buf()));
            }
            // A stale socket left by a mux that was killed.
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(|e| MuxError::Listen {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
        Err(e) => Err(MuxError::Listen {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

impl Mux {
    /// Binds the listening socket, connects to the monitor (retrying while its socket is
    /// missing, as long as `connect_wait` allows), says hello, and then serves clients on
    /// threads. Clients that connect before the monitor has answered are held for
    /// `hold_early_clients`, then told what the mux waits for.
    pub fn start(opts: &MuxOptions) -> Result<Mux, MuxError> {
        let listener = bind(&opts.listen, &opts.upstream)?;
        let startup = Arc::new(Startup {
            phase: Mutex::new(Phase::Waiting(String::from("starting"))),
            since: Instant::now(),
            listen: opts.listen.clone(),
            hold: opts.hold_early_clients,
            gives_up: opts.connect_wait.is_some() || opts.hello_wait.is_some(),
            log: opts.log.clone(),
        });
        let linked = opts
            .link
            .as_ref()
            .filter(|l| claim_link(l, &opts.listen, &opts.log))
            .cloned();
        {
            let st = startup.clone();
            thread::spawn(move || accept_loop(st, listener));
        }
        let (up, dec, monitor, first_uid) = match reach_monitor(opts, &startup) {
            Ok(r) => r,
            Err(e) => {
                opts.log.line(&format!("giving up: {e}"));
                *lock(&startup.phase) = Phase::Over(e.to_string());
                // Early clients still waiting get told; the accept loop wakes and ends.
                let _ = UnixStream::connect(&opts.listen);
                let _ = std::fs::remove_file(&opts.listen);
                if let Some(l) = &linked {
                    release_link(l, &opts.listen);
                }
                return Err(e);
            }
        };
        let (up_tx, up_rx) = mpsc::channel::<Vec<u8>>();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                router: Router::new(&monitor, first_uid),
                sinks: HashMap::new(),
                upstream: up_tx,
            }),
            stop: AtomicBool::new(false),
            listen: opts.listen.clone(),
            queue_limit: opts.client_queue_bytes,
            writers: Mutex::new(Vec::new()),
            ended: Mutex::new(None),
            ended_cv: Condvar::new(),
            next_client: AtomicU64::new(1),
            link: linked,
        });
        let up_write = up.try_clone().map_err(MuxError::Io)?;
        let up_read = up.try_clone().map_err(MuxError::Io)?;
        thread::spawn(move || upstream_writer(up_write, up_rx));
        {
            let s = shared.clone();
            thread::spawn(move || upstream_reader(s, up_read, dec));
        }
        *lock(&startup.phase) = Phase::Serving(shared.clone());
        opts.log.line(&format!(
            "serving {} for {} at {}",
            opts.listen.display(),
            monitor,
            opts.upstream.display()
        ));
        Ok(Mux {
            shared,
            upstream: up,
            monitor,
        })
    }

    /// The monitor's name from its `HelloReply`.
    pub fn monitor(&self) -> &str {
        &self.monitor
    }

    /// The socket clients connect to.
    pub fn listen_path(&self) -> &Path {
        &self.shared.listen
    }

    /// Blocks until the mux ends (the monitor connection closes, or [`Mux::stop`]).
    pub fn wait(&self) -> MuxEnd {
        let mut e = lock(&self.shared.ended);
        loop {
            if let Some(end) = *e {
                return end;
            }
            e = self
                .shared
                .ended_cv
                .wait(e)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops serving: closes the monitor connection and every client, removes the socket.
    pub fn stop(&self) -> MuxEnd {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.upstream.shutdown(std::net::Shutdown::Both);
        self.wait()
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.stop();
    }
}

fn upstream_writer(mut up: UnixStream, rx: mpsc::Receiver<Vec<u8>>) {
    for bytes in rx {
        if up.write_all(&bytes).is_err() {
            // The reader sees the end too and shuts everything down.
            let _ = up.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

fn upstream_reader(shared: Arc<Shared>, mut up: UnixStream, mut dec: Decoder) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match up.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut inner = lock(&shared.inner);
        for r in dec.push(&buf[..n]) {
            match r {
                Ok(f) => inner.router.upstream_frame(f, &mut out),
                Err(FrameError::BadCrc { id } | FrameError::TooLarge { id, .. }) => {
                    inner.router.upstream_damaged(id, &mut out)
                }
                Err(_) => {}
            }
        }
        dispatch(&mut inner, &mut out, shared.queue_limit);
    }
    let end = if shared.stop.load(Ordering::SeqCst) {
        MuxEnd::Stopped
    } else {
        MuxEnd::UpstreamClosed
    };
    shut_down(&shared, end);
}

/// Tells the clients, lets their queued frames drain (for up to 3 s), closes everything.
fn shut_down(shared: &Shared, end: MuxEnd) {
    shared.stop.store(true, Ordering::SeqCst);
    let sinks = {
        let mut inner = lock(&shared.inner);
        let mut out = Vec::new();
        inner.router.upstream_closed(&mut out);
        dispatch(&mut inner, &mut out, usize::MAX);
        std::mem::take(&mut inner.sinks)
    };
    // Wake the accept loop, then remove the socket so no new client finds it.
    let _ = UnixStream::connect(&shared.listen);
    let _ = std::fs::remove_file(&shared.listen);
    if let Some(l) = &shared.link {
        release_link(l, &shared.listen);
    }
    for s in sinks.values() {
        let _ = s.stream.shutdown(std::net::Shutdown::Read);
    }
    drop(sinks);
    let writers = std::mem::take(&mut *lock(&shared.writers));
    let deadline = Instant::now() + Duration::from_secs(3);
    while writers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    *lock(&shared.ended) = Some(end);
    shared.ended_cv.notify_all();
}

fn accept_loop(startup: Arc<Startup>, listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let serving = match &*lock(&startup.phase) {
            Phase::Over(_) => return,
            Phase::Serving(shared) => Some(shared.clone()),
            Phase::Waiting(_) => None,
        };
        match serving {
            Some(shared) if shared.stop.load(Ordering::SeqCst) => return,
            Some(shared) => add_client(&shared, stream, &[]),
            None => {
                let st = startup.clone();
                thread::spawn(move || early_client(st, stream));
            }
        }
    }
}

/// A client that connected before the monitor answered: gets served if the monitor answers
/// within the hold time (what it sent meanwhile is passed on), else its first request is
/// answered with an error that says what the mux waits for.
fn early_client(st: Arc<Startup>, mut stream: UnixStream) {
    const MAX_EARLY_BYTES: usize = 64 * 1024;
    let deadline = Instant::now() + st.hold;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let serving = match &*lock(&st.phase) {
            Phase::Serving(shared) => Some(shared.clone()),
            Phase::Over(_) => break,
            Phase::Waiting(_) => None,
        };
        if let Some(shared) = serving {
            let _ = stream.set_read_timeout(None);
            if !shared.stop.load(Ordering::SeqCst) {
                add_client(&shared, stream, &bytes);
            }
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) if bytes.len() + n > MAX_EARLY_BYTES => return,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
    // Answer the first complete request (normally the Hello), then hang up.
    let first = Decoder::new().push(&bytes).into_iter().find_map(Result::ok);
    if let Some(f) = first {
        let msg = st.not_ready();
        let mut out = Vec::new();
        if Response::Error(ErrorReply::BadRequest(msg))
            .encode_frame(f.id, &mut out)
            .is_ok()
        {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
            let _ = stream.write_all(&out);
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Registers a client with the router and starts its threads; `early` is what it sent before.
fn add_client(shared: &Arc<Shared>, stream: UnixStream, early: &[u8]) {
    let (Ok(write_half), Ok(keep)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let _ = write_half.set_write_timeout(Some(Duration::from_secs(30)));
    let c = shared.next_client.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let queued = Arc::new(AtomicUsize::new(0));
    {
        let mut inner = lock(&shared.inner);
        inner.router.add_client(c);
        inner.sinks.insert(
            c,
            Sink {
                tx,
                queued: queued.clone(),
                stream: keep,
            },
        );
        if !early.is_empty() {
            let mut out = Vec::new();
            inner.router.client_bytes(c, early, &mut out);
            dispatch(&mut inner, &mut out, shared.queue_limit);
        }
    }
    let w = thread::spawn(move || client_writer(write_half, rx, queued));
    {
        let mut writers = lock(&shared.writers);
        writers.retain(|h| !h.is_finished());
        writers.push(w);
    }
    let s = shared.clone();
    thread::spawn(move || client_reader(s, c, stream));
}

fn client_writer(mut stream: UnixStream, rx: mpsc::Receiver<Vec<u8>>, queued: Arc<AtomicUsize>) {
    for bytes in rx {
        if stream.write_all(&bytes).is_err() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        queued.fetch_sub(bytes.len(), Ordering::SeqCst);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn client_reader(shared: Arc<Shared>, c: ClientId, mut stream: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut inner = lock(&shared.inner);
        inner.router.client_bytes(c, &buf[..n], &mut out);
        dispatch(&mut inner, &mut out, shared.queue_limit);
    }
    let mut inner = lock(&shared.inner);
    inner.router.client_gone(c, &mut out);
    dispatch(&mut inner, &mut out, shared.queue_limit);
    // Dropping the sink ends the writer once it has sent what is queued.
    inner.sinks.remove(&c);
}
