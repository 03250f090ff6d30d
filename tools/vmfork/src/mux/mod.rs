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
//!
//! Files: `router.rs` is [`Router`]; `options.rs` holds [`MuxOptions`], [`MuxLog`] and
//! [`MuxError`]; `upstream.rs` the connection to the monitor (connect, handshake, its reader and
//! writer threads); `clients.rs` the client side (the listening socket and link, the accept loop,
//! early clients, each client's threads). This file holds [`Mux`] itself, the state the threads
//! share, and how frames are dispatched and the mux is shut down.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

mod clients;
mod options;
mod router;
mod upstream;

pub use options::{MuxError, MuxLog, MuxOptions};
pub use router::{ClientId, Dest, Outgoing, Router, UPSTREAM_LOST};

use clients::{accept_loop, bind, claim_link, release_link};
use upstream::{reach_monitor, upstream_reader, upstream_writer};

/// Whether a socket read or write that failed with `e` is worth trying again: a read timeout
/// (`WouldBlock` or `TimedOut`, by platform) or a signal. The mux's and the fake monitor's
/// polling loops use it.
pub(crate) fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

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

/// Reads what `stream` has into `buf`, again when interrupted: `None` at its end or on an
/// error (the reader threads then end their side).
fn read_some(stream: &mut UnixStream, buf: &mut [u8]) -> Option<usize> {
    loop {
        match std::io::Read::read(stream, buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
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
