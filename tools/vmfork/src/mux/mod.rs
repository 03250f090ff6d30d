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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// How long to keep trying while the upstream socket does not exist or refuses.
    pub connect_wait: Duration,
    /// How long to wait for the monitor's `HelloReply` (the `Hello` is resent meanwhile: QEMU
    /// accepts connections before the monitor drives the console).
    pub hello_wait: Duration,
    /// Bytes queued for one client before it is cut off as too slow.
    pub client_queue_bytes: usize,
}

impl MuxOptions {
    /// Defaults: 30 s to connect, 60 s for the handshake, 64 MiB per client queue.
    pub fn new(upstream: &Path, listen: &Path) -> MuxOptions {
        MuxOptions {
            upstream: upstream.to_path_buf(),
            listen: listen.to_path_buf(),
            connect_wait: Duration::from_secs(30),
            hello_wait: Duration::from_secs(60),
            client_queue_bytes: 64 << 20,
        }
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

fn connect_upstream(path: &Path, wait: Duration) -> Result<UnixStream, MuxError> {
    let deadline = Instant::now() + wait;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
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

/// Says hello upstream, resending every 2 s until `wait` is over. Returns the monitor's name and
/// the next unused request id.
fn handshake(
    stream: &mut UnixStream,
    dec: &mut Decoder,
    wait: Duration,
) -> Result<(String, u32), MuxError> {
    const RESEND: Duration = Duration::from_secs(2);
    let deadline = Instant::now() + wait;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(MuxError::Io)?;
    let mut id = 0u32;
    let mut sent: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if sent.is_none_or(|t| t.elapsed() >= RESEND) {
            id += 1;
            let hello = Request::Hello {
                version: PROTOCOL_VERSION,
                client: format!("vmfork mux {}", env!("CARGO_PKG_VERSION")),
            };
            let mut bytes = Vec::new();
            hello
                .encode_frame(id, &mut bytes)
                .map_err(|e| MuxError::Handshake(e.to_string()))?;
            stream.write_all(&bytes).map_err(MuxError::Io)?;
            sent = Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return Err(MuxError::Handshake(format!(
                "no HelloReply within {} s (has the monitor booted? is another client connected to QEMU's socket?)",
                wait.as_secs()
            )));
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                return Err(MuxError::Handshake(
                    "the monitor closed the connection".into(),
                ))
            }
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
            return r.map(|m| (m, id + 1));
        }
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
    /// Connects to the monitor (retrying while its socket is missing), says hello, binds the
    /// listening socket and serves clients on threads.
    pub fn start(opts: &MuxOptions) -> Result<Mux, MuxError> {
        let mut up = connect_upstream(&opts.upstream, opts.connect_wait)?;
        let mut dec = Decoder::new();
        let (monitor, first_uid) = handshake(&mut up, &mut dec, opts.hello_wait)?;
        let listener = bind(&opts.listen, &opts.upstream)?;
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
        });
        let up_write = up.try_clone().map_err(MuxError::Io)?;
        let up_read = up.try_clone().map_err(MuxError::Io)?;
        thread::spawn(move || upstream_writer(up_write, up_rx));
        {
            let s = shared.clone();
            thread::spawn(move || upstream_reader(s, up_read, dec));
        }
        {
            let s = shared.clone();
            thread::spawn(move || accept_loop(s, listener));
        }
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

fn accept_loop(shared: Arc<Shared>, listener: UnixListener) {
    let mut next: ClientId = 0;
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let (Ok(write_half), Ok(keep)) = (stream.try_clone(), stream.try_clone()) else {
            continue;
        };
        let _ = write_half.set_write_timeout(Some(Duration::from_secs(30)));
        next += 1;
        let c = next;
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
