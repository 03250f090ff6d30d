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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmfork_proto::msg::kind;
use vmfork_proto::{
    decode_request, Decoder, ErrorReply, Frame, FrameError, Request, Response, VmId,
    MAX_REQUEST_PAYLOAD, PROTOCOL_VERSION,
};

/// Identifies one client connection of the mux.
pub type ClientId = u64;

/// The text of the `Error(Internal)` that waiting clients get when the monitor connection drops.
pub const UPSTREAM_LOST: &str = "vmfork mux: lost the connection to the monitor (did QEMU exit?)";

/// Where a frame the router produced goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// To one client.
    Client(ClientId),
    /// To the monitor.
    Upstream,
}

/// One frame the router wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Where to.
    pub dest: Dest,
    /// The frame.
    pub frame: Frame,
}

/// What the reply to a forwarded request means to the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Pass it to the client.
    Reply,
    /// The reply to a `ConsoleAttach` of this VM (sent on behalf of every waiting client).
    Attach(VmId),
    /// Pass it on; on `Ok` the VM is gone and its console subscribers are told.
    Kill(VmId),
    /// Pass it on; a `DumpReady` handle is recorded for the client (closed if it has gone).
    Dump,
    /// The mux's own request (a detach, a dump close): drop the reply.
    Internal,
}

#[derive(Debug)]
struct Pending {
    /// The client and its request id, for forwarded requests.
    from: Option<(ClientId, u32)>,
    what: Expect,
}

#[derive(Debug)]
struct ClientState {
    decoder: Decoder,
    hello: bool,
    /// Dump handles this client opened and has not closed.
    dumps: BTreeSet<u32>,
}

/// A client whose `ConsoleAttach` waits for the upstream attach reply.
#[derive(Debug)]
struct Waiter {
    client: ClientId,
    attach_id: u32,
    /// Ids of `ConsoleDetach` requests the client sent after this attach, answered after it.
    detach_ids: Vec<u32>,
}

/// One VM's console as the mux sees it.
#[derive(Debug)]
struct Console {
    /// The upstream id of the forwarded `ConsoleAttach`; events carry it once attached.
    upstream_id: u32,
    /// The monitor answered the attach with `Ok`.
    attached: bool,
    /// Attached clients and their attach ids (only when `attached`).
    subs: BTreeMap<ClientId, u32>,
    /// Clients waiting for the attach reply (only while not `attached`).
    waiting: Vec<Waiter>,
}

/// The mux's protocol logic, without I/O: feed it client bytes, client disconnects and upstream
/// frames; it appends the frames to send to an output list, in order.
#[derive(Debug)]
pub struct Router {
    monitor: String,
    next_uid: u32,
    clients: HashMap<ClientId, ClientState>,
    pending: HashMap<u32, Pending>,
    consoles: BTreeMap<VmId, Console>,
    /// Upstream attach id -> VM, for routing console events.
    attach_ids: HashMap<u32, VmId>,
    bad_frames: u64,
}

fn response_frame(id: u32, r: &Response) -> Frame {
    let mut payload = Vec::new();
    r.encode_payload(&mut payload);
    Frame {
        version: PROTOCOL_VERSION,
        kind: r.kind(),
        id,
        payload,
    }
}

fn request_frame(id: u32, r: &Request) -> Frame {
    let mut payload = Vec::new();
    r.encode_payload(&mut payload);
    Frame {
        version: PROTOCOL_VERSION,
        kind: r.kind(),
        id,
        payload,
    }
}

impl Router {
    /// A router for a monitor that called itself `monitor` in its `HelloReply`. Upstream ids are
    /// handed out from `first_uid` on (ids below it were used by the handshake).
    pub fn new(monitor: &str, first_uid: u32) -> Router {
        Router {
            monitor: format!("{monitor} (via vmfork mux {})", env!("CARGO_PKG_VERSION")),
            next_uid: first_uid.max(1),
            clients: HashMap::new(),
            pending: HashMap::new(),
            consoles: BTreeMap::new(),
            attach_ids: HashMap::new(),
            bad_frames: 0,
        }
    }

    /// The text clients get in `HelloReply`.
    pub fn monitor(&self) -> &str {
        &self.monitor
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Requests forwarded upstream and not answered yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// VMs whose console the mux has attached upstream (attach answered `Ok`).
    pub fn attached_vms(&self) -> Vec<VmId> {
        self.consoles
            .iter()
            .filter(|(_, c)| c.attached)
            .map(|(vm, _)| *vm)
            .collect()
    }

    /// Damaged or garbage input skipped so far (from clients and upstream).
    pub fn bad_frames(&self) -> u64 {
        self.bad_frames
    }

    /// A new client connection.
    pub fn add_client(&mut self, c: ClientId) {
        self.clients.insert(
            c,
            ClientState {
                decoder: Decoder::with_max_payload(MAX_REQUEST_PAYLOAD),
                hello: false,
                dumps: BTreeSet::new(),
            },
        );
    }

    fn alloc_uid(&mut self) -> u32 {
        loop {
            let id = self.next_uid;
            self.next_uid = self.next_uid.wrapping_add(1);
            if id != 0 && !self.pending.contains_key(&id) && !self.attach_ids.contains_key(&id) {
                return id;
            }
        }
    }

    fn reply(out: &mut Vec<Outgoing>, c: ClientId, id: u32, r: &Response) {
        out.push(Outgoing {
            dest: Dest::Client(c),
            frame: response_frame(id, r),
        });
    }

    fn internal(&mut self, req: &Request, out: &mut Vec<Outgoing>) {
        let uid = self.alloc_uid();
        self.pending.insert(
            uid,
            Pending {
                from: None,
                what: Expect::Internal,
            },
        );
        out.push(Outgoing {
            dest: Dest::Upstream,
            frame: request_frame(uid, req),
        });
    }

    /// Bytes received from client `c` (any amount, any content).
    pub fn client_bytes(&mut self, c: ClientId, bytes: &[u8], out: &mut Vec<Outgoing>) {
        let Some(st) = self.clients.get_mut(&c) else {
            return;
        };
        let frames: Vec<Result<Frame, FrameError>> = st.decoder.push(bytes).collect();
        for r in frames {
            match r {
                Ok(f) => self.client_frame(c, f, out),
                Err(FrameError::TooLarge { id, len, max }) => {
                    self.bad_frames += 1;
                    let e = ErrorReply::BadRequest(format!(
                        "frame of {len} bytes exceeds the request cap of {max}"
                    ));
                    Self::reply(out, c, id, &Response::Error(e));
                }
                Err(FrameError::BadCrc { id }) => {
                    self.bad_frames += 1;
                    let e = ErrorReply::BadRequest("frame CRC mismatch".into());
                    Self::reply(out, c, id, &Response::Error(e));
                }
                Err(FrameError::Garbage { .. } | FrameError::BadHeaderCrc) => {
                    self.bad_frames += 1;
                }
            }
        }
    }

    fn client_frame(&mut self, c: ClientId, f: Frame, out: &mut Vec<Outgoing>) {
        let req = match decode_request(&f) {
            Ok(r) => r,
            Err(e) => return Self::reply(out, c, f.id, &Response::Error(e)),
        };
        let Some(st) = self.clients.get_mut(&c) else {
            return;
        };
        if let Request::Hello { version, .. } = req {
            let r = if version == PROTOCOL_VERSION {
                st.hello = true;
                Response::HelloReply {
                    version: PROTOCOL_VERSION,
                    monitor: self.monitor.clone(),
                }
            } else {
                Response::Error(ErrorReply::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                })
            };
            return Self::reply(out, c, f.id, &r);
        }
        if !st.hello {
            let e = ErrorReply::BadRequest("say Hello first".into());
            return Self::reply(out, c, f.id, &Response::Error(e));
        }
        let what = match req {
            Request::ConsoleAttach { vm } => return self.attach(c, f.id, vm, out),
            Request::ConsoleDetach { vm } => return self.detach(c, f.id, vm, out),
            Request::Kill { vm } => Expect::Kill(vm),
            Request::Dump { .. } => Expect::Dump,
            Request::DumpClose { dump } => {
                st.dumps.remove(&dump);
                Expect::Reply
            }
            _ => Expect::Reply,
        };
        let uid = self.alloc_uid();
        self.pending.insert(
            uid,
            Pending {
                from: Some((c, f.id)),
                what,
            },
        );
        out.push(Outgoing {
            dest: Dest::Upstream,
            frame: Frame { id: uid, ..f },
        });
    }

    fn attach(&mut self, c: ClientId, id: u32, vm: VmId, out: &mut Vec<Outgoing>) {
        match self.consoles.get_mut(&vm) {
            Some(con) if con.attached => {
                // Like the monitor: a second attach from one connection replaces the first.
                con.subs.insert(c, id);
                Self::reply(out, c, id, &Response::Ok);
            }
            Some(con) => con.waiting.push(Waiter {
                client: c,
                attach_id: id,
                detach_ids: Vec::new(),
            }),
            None => {
                let uid = self.alloc_uid();
                self.pending.insert(
                    uid,
                    Pending {
                        from: None,
                        what: Expect::Attach(vm),
                    },
                );
                self.consoles.insert(
                    vm,
                    Console {
                        upstream_id: uid,
                        attached: false,
                        subs: BTreeMap::new(),
                        waiting: vec![Waiter {
                            client: c,
                            attach_id: id,
                            detach_ids: Vec::new(),
                        }],
                    },
                );
                out.push(Outgoing {
                    dest: Dest::Upstream,
                    frame: request_frame(uid, &Request::ConsoleAttach { vm }),
                });
            }
        }
    }

    fn detach(&mut self, c: ClientId, id: u32, vm: VmId, out: &mut Vec<Outgoing>) {
        if let Some(con) = self.consoles.get_mut(&vm) {
            if con.subs.remove(&c).is_some() {
                Self::reply(out, c, id, &Response::Ok);
                self.release_if_unused(vm, out);
                return;
            }
            if let Some(w) = con.waiting.iter_mut().rev().find(|w| w.client == c) {
                // Answered right after the attach it follows.
                w.detach_ids.push(id);
                return;
            }
        }
        // Not attached through this client: nothing to undo (the monitor answers `Ok` too).
        Self::reply(out, c, id, &Response::Ok);
    }

    /// Detaches `vm` upstream if no client is attached or waiting any more.
    fn release_if_unused(&mut self, vm: VmId, out: &mut Vec<Outgoing>) {
        let unused = self
            .consoles
            .get(&vm)
            .is_some_and(|con| con.attached && con.subs.is_empty() && con.waiting.is_empty());
        if unused {
            if let Some(con) = self.consoles.remove(&vm) {
                self.attach_ids.remove(&con.upstream_id);
            }
            self.internal(&Request::ConsoleDetach { vm }, out);
        }
    }

    /// Client `c` disconnected: its attachments and open dumps go with it; replies still due to
    /// it will be dropped.
    pub fn client_gone(&mut self, c: ClientId, out: &mut Vec<Outgoing>) {
        let Some(st) = self.clients.remove(&c) else {
            return;
        };
        for dump in st.dumps {
            self.internal(&Request::DumpClose { dump }, out);
        }
        let vms: Vec<VmId> = self.consoles.keys().copied().collect();
        for vm in vms {
            if let Some(con) = self.consoles.get_mut(&vm) {
                con.subs.remove(&c);
                con.waiting.retain(|w| w.client != c);
            }
            self.release_if_unused(vm, out);
        }
    }

    /// A frame from the monitor.
    pub fn upstream_frame(&mut self, f: Frame, out: &mut Vec<Outgoing>) {
        if let Some(p) = self.pending.remove(&f.id) {
            match p.what {
                Expect::Internal => {}
                Expect::Attach(vm) => self.attach_reply(vm, f, out),
                Expect::Reply => self.pass_back(p.from, f, out),
                Expect::Kill(vm) => {
                    if f.kind == kind::OK {
                        self.vm_gone(vm, out);
                    }
                    self.pass_back(p.from, f, out);
                }
                Expect::Dump => {
                    let handle = match Response::decode(f.kind, &f.payload) {
                        Ok(Response::DumpReady { dump, .. }) => Some(dump),
                        _ => None,
                    };
                    let client = p.from.and_then(|(c, _)| self.clients.get_mut(&c));
                    match (handle, client) {
                        (Some(h), Some(st)) => {
                            st.dumps.insert(h);
                        }
                        (Some(h), None) => self.internal(&Request::DumpClose { dump: h }, out),
                        (None, _) => {}
                    }
                    self.pass_back(p.from, f, out);
                }
            }
            return;
        }
        let Some(&vm) = self.attach_ids.get(&f.id) else {
            // A late reply to a resent handshake Hello, or a stray frame: nobody waits for it.
            return;
        };
        match f.kind {
            kind::CONSOLE_OUTPUT => {
                if let Some(con) = self.consoles.get(&vm) {
                    for (&c, &aid) in &con.subs {
                        out.push(Outgoing {
                            dest: Dest::Client(c),
                            frame: Frame {
                                id: aid,
                                ..f.clone()
                            },
                        });
                    }
                }
            }
            kind::ERROR => {
                // The attachment ended upstream (the VM was killed): tell every subscriber.
                self.attach_ids.remove(&f.id);
                if let Some(con) = self.consoles.remove(&vm) {
                    for (c, aid) in con.subs {
                        out.push(Outgoing {
                            dest: Dest::Client(c),
                            frame: Frame {
                                id: aid,
                                ..f.clone()
                            },
                        });
                    }
                }
            }
            _ => {}
        }
    }

    /// A damaged frame from the monitor that still named its id: the client waiting for it gets
    /// an error rather than waiting forever.
    pub fn upstream_damaged(&mut self, uid: u32, out: &mut Vec<Outgoing>) {
        self.bad_frames += 1;
        let Some(p) = self.pending.get(&uid) else {
            return;
        };
        if matches!(p.what, Expect::Reply | Expect::Kill(_) | Expect::Dump) {
            if let Some(p) = self.pending.remove(&uid) {
                let e = ErrorReply::Internal("vmfork mux: the monitor's reply was damaged".into());
                self.pass_back(p.from, response_frame(uid, &Response::Error(e)), out);
            }
        }
    }

    fn pass_back(&mut self, from: Option<(ClientId, u32)>, f: Frame, out: &mut Vec<Outgoing>) {
        if let Some((c, id)) = from {
            if self.clients.contains_key(&c) {
                out.push(Outgoing {
                    dest: Dest::Client(c),
                    frame: Frame { id, ..f },
                });
            }
        }
    }

    fn attach_reply(&mut self, vm: VmId, f: Frame, out: &mut Vec<Outgoing>) {
        let Some(mut con) = self.consoles.remove(&vm) else {
            return;
        };
        if con.upstream_id != f.id || con.attached {
            self.consoles.insert(vm, con);
            return;
        }
        let ok = f.kind == kind::OK && f.version == PROTOCOL_VERSION;
        let waiting = std::mem::take(&mut con.waiting);
        for w in waiting {
            if ok {
                con.subs.insert(w.client, w.attach_id);
                Self::reply(out, w.client, w.attach_id, &Response::Ok);
            } else {
                out.push(Outgoing {
                    dest: Dest::Client(w.client),
                    frame: Frame {
                        id: w.attach_id,
                        ..f.clone()
                    },
                });
            }
            for d in w.detach_ids {
                con.subs.remove(&w.client);
                Self::reply(out, w.client, d, &Response::Ok);
            }
        }
        if !ok {
            return;
        }
        con.attached = true;
        self.attach_ids.insert(con.upstream_id, vm);
        self.consoles.insert(vm, con);
        self.release_if_unused(vm, out);
    }

    /// `vm` was killed through the mux: its subscribers get `NoSuchVm` with their attach ids,
    /// as the reference server sends them.
    fn vm_gone(&mut self, vm: VmId, out: &mut Vec<Outgoing>) {
        let attached = self.consoles.get(&vm).is_some_and(|c| c.attached);
        if !attached {
            return;
        }
        if let Some(con) = self.consoles.remove(&vm) {
            self.attach_ids.remove(&con.upstream_id);
            for (c, aid) in con.subs {
                let r = Response::Error(ErrorReply::NoSuchVm(vm));
                Self::reply(out, c, aid, &r);
            }
        }
    }

    /// The monitor connection dropped: every client waiting for a reply, and every attached
    /// console, gets `Error(Internal(UPSTREAM_LOST))`.
    pub fn upstream_closed(&mut self, out: &mut Vec<Outgoing>) {
        let lost = Response::Error(ErrorReply::Internal(UPSTREAM_LOST.into()));
        let mut pending: Vec<(u32, Pending)> = self.pending.drain().collect();
        pending.sort_by_key(|(uid, _)| *uid);
        for (_, p) in pending {
            if let Some((c, id)) = p.from {
                if self.clients.contains_key(&c) {
                    Self::reply(out, c, id, &lost);
                }
            }
        }
        for (_, con) in std::mem::take(&mut self.consoles) {
            for (c, aid) in con.subs {
                Self::reply(out, c, aid, &lost);
            }
            for w in con.waiting {
                Self::reply(out, w.client, w.attach_id, &lost);
                for d in w.detach_ids {
                    Self::reply(out, w.client, d, &lost);
                }
            }
        }
        self.attach_ids.clear();
    }
}

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
