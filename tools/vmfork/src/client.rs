//! The client side of the control channel: connect, handshake, request/response, transfers.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmfork_proto::msg::kind;
use vmfork_proto::{
    Decoder, DiffReport, ErrorReply, Frame, FrameError, GlobalStats, Request, Response,
    UploadPurpose, VmId, VmInfo, CHUNK_SIZE, PROTOCOL_VERSION,
};

/// Everything that can go wrong talking to the monitor. Each displays as one line.
#[derive(Debug)]
pub enum ClientError {
    /// The socket could not be connected.
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
        /// What the tool can tell about why: empty, or a sentence starting with "; ".
        hint: String,
    },
    /// Reading or writing the socket failed (a timeout shows up here too).
    Io(io::Error),
    /// The monitor speaks another protocol version.
    VersionMismatch {
        /// The monitor's version.
        monitor: u16,
        /// Ours, [`PROTOCOL_VERSION`].
        ours: u16,
    },
    /// The monitor refused the request.
    Monitor(ErrorReply),
    /// The monitor sent something this client cannot make sense of.
    Protocol(String),
    /// The monitor closed the connection.
    Closed,
    /// The server refused the handshake and said why: a `vmfork mux` that has not reached the
    /// monitor yet says so, with how long it has waited and where its log is.
    NotReady(String),
    /// `path` is QEMU's own socket, which serves one client at a time, and the `vmfork mux`
    /// serving `mux` holds that one connection.
    HeldByMux {
        /// The socket we tried.
        path: PathBuf,
        /// The mux's socket, to use instead.
        mux: PathBuf,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { path, source, hint } if hint.is_empty() => write!(
                f,
                "cannot connect to the monitor at {}: {source} (is it running? start it with `make qemu-virt`)",
                path.display()
            ),
            ClientError::Connect { path, source, hint } => write!(
                f,
                "cannot connect to the monitor at {}: {source}{hint}",
                path.display()
            ),
            ClientError::Io(e) if is_timeout(e) => {
                write!(f, "the monitor did not answer in time")
            }
            ClientError::Io(e) => write!(f, "control channel: {e}"),
            ClientError::VersionMismatch { monitor, ours } => write!(
                f,
                "protocol version mismatch: the monitor speaks v{monitor}, this vmfork speaks v{ours}; use a vmfork built with the monitor"
            ),
            ClientError::Monitor(e) => write!(f, "{e}"),
            ClientError::Protocol(m) => write!(f, "protocol error: {m}"),
            ClientError::Closed => write!(f, "the monitor closed the connection"),
            ClientError::NotReady(m) => write!(f, "{m}"),
            ClientError::HeldByMux { path, mux } => write!(
                f,
                "{} did not answer: it is QEMU's socket, which serves one client at a time, and the vmfork mux at {} holds it; use --socket {} (or VMFORK_SOCKET)",
                path.display(),
                mux.display(),
                mux.display()
            ),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// How a new VM (created, forked or restored) starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartFlags {
    /// Paused before its first instruction (resume it with `Resume`).
    pub paused: bool,
    /// No record of it is kept once it stops: it leaves `list` at once.
    pub remove_on_stop: bool,
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// How long to wait for the monitor's `HelloReply` (QEMU accepts the connection even when the
    /// monitor is not driving the console yet).
    pub handshake_timeout: Duration,
    /// How long to wait for each reply.
    pub request_timeout: Duration,
    /// Our name, sent in `Hello`.
    pub client_name: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            client_name: format!("vmfork {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A connection to the monitor, after a successful handshake.
#[derive(Debug)]
pub struct Client {
    pub(crate) stream: UnixStream,
    pub(crate) dec: Decoder,
    next_id: u32,
    /// Frames read while waiting for another reply (console events), oldest first.
    pub(crate) pending: VecDeque<(u32, Response)>,
    monitor: String,
    opts: ClientOptions,
}

impl Client {
    /// Connects to the socket at `path` and says hello.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Self::connect_with(path, ClientOptions::default())
    }

    /// Connects with explicit options.
    pub fn connect_with(path: &Path, mut opts: ClientOptions) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
            hint: qemu_beside(path),
        })?;
        // QEMU accepts a second connection to its socket but serves it only once the first
        // (the mux's) goes: do not wait long to say so.
        let mux = mux_beside(path);
        if mux.is_some() {
            opts.handshake_timeout = opts.handshake_timeout.min(MUX_HOLDS_TIMEOUT);
        }
        match Self::handshake(stream, opts) {
            Err(ClientError::Io(e)) if is_timeout(&e) && mux.is_some() => {
                Err(ClientError::HeldByMux {
                    path: path.to_path_buf(),
                    mux: mux.unwrap_or_default(),
                })
            }
            r => r,
        }
    }

    /// Says hello over an already connected stream.
    pub fn handshake(stream: UnixStream, opts: ClientOptions) -> Result<Client, ClientError> {
        let mut c = Client {
            stream,
            dec: Decoder::new(),
            next_id: 1,
            pending: VecDeque::new(),
            monitor: String::new(),
            opts,
        };
        c.stream.set_read_timeout(Some(c.opts.handshake_timeout))?;
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client: c.opts.client_name.clone(),
        };
        let reply = match c.call(&hello) {
            // The only error a monitor answers `Hello` with is a version mismatch (its own
            // variant by now); anything else is a server that is not ready to serve.
            Err(ClientError::Monitor(e)) => {
                return Err(ClientError::NotReady(match e {
                    ErrorReply::BadRequest(m) | ErrorReply::Internal(m) => m,
                    e => e.to_string(),
                }))
            }
            r => r?,
        };
        match reply {
            Response::HelloReply { version, monitor } if version == PROTOCOL_VERSION => {
                c.monitor = monitor;
            }
            Response::HelloReply { version, .. } => {
                return Err(ClientError::VersionMismatch {
                    monitor: version,
                    ours: PROTOCOL_VERSION,
                })
            }
            other => return Err(unexpected("Hello", &other)),
        }
        c.stream.set_read_timeout(Some(c.opts.request_timeout))?;
        Ok(c)
    }

    /// A second handle on the same connection that takes over receiving: it gets a clone of the
    /// socket, the decoder state and any queued messages. `self` should only send afterwards.
    pub(crate) fn split_reader(&mut self) -> io::Result<Client> {
        Ok(Client {
            stream: self.stream.try_clone()?,
            dec: std::mem::take(&mut self.dec),
            next_id: 0,
            pending: std::mem::take(&mut self.pending),
            monitor: self.monitor.clone(),
            opts: self.opts.clone(),
        })
    }

    /// The monitor's self-description from its `HelloReply`.
    pub fn monitor(&self) -> &str {
        &self.monitor
    }

    /// Sends a request and returns its id.
    pub fn send(&mut self, req: &Request) -> Result<u32, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let mut buf = Vec::new();
        req.encode_frame(id, &mut buf)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.stream.write_all(&buf).map_err(|e| {
            if e.kind() == io::ErrorKind::BrokenPipe {
                ClientError::Closed
            } else {
                ClientError::Io(e)
            }
        })?;
        Ok(id)
    }

    /// Reads the next message from the monitor (reply or event), with its id.
    pub fn recv(&mut self) -> Result<(u32, Response), ClientError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::Closed)
                }
                Err(e) => return Err(e.into()),
            };
            let mut err = None;
            for r in self.dec.push(&buf[..n]) {
                match r
                    .map_err(frame_error)
                    .and_then(|f| interpret(&f).map(|m| (f.id, m)))
                {
                    Ok(m) => self.pending.push_back(m),
                    Err(Some(e)) => {
                        err.get_or_insert(e);
                    }
                    Err(None) => {}
                }
            }
            if let Some(e) = err {
                return Err(e);
            }
            if let Some(m) = self.pending.pop_front() {
                return Ok(m);
            }
        }
    }

    /// Sends `req` and waits for its reply; events that arrive meanwhile stay queued for
    /// [`Client::recv`]. An `Error` reply becomes `Err(ClientError::Monitor)`.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let id = self.send(req)?;
        self.wait_reply(id)
    }

    /// Waits for the reply to request `id`, queueing anything else.
    pub fn wait_reply(&mut self, id: u32) -> Result<Response, ClientError> {
        let mut others = VecDeque::new();
        let result = loop {
            match self.recv() {
                Ok((rid, resp)) if rid == id => break Ok(resp),
                Ok(m) => others.push_back(m),
                Err(e) => break Err(e),
            }
        };
        // Keep the order: what was queued before stays in front of what is still pending.
        others.append(&mut self.pending);
        self.pending = others;
        match result? {
            Response::Error(e) => Err(match e {
                ErrorReply::VersionMismatch { ours, .. } => ClientError::VersionMismatch {
                    monitor: ours,
                    ours: PROTOCOL_VERSION,
                },
                e => ClientError::Monitor(e),
            }),
            r => Ok(r),
        }
    }

    /// All VMs.
    pub fn list(&mut self) -> Result<Vec<VmInfo>, ClientError> {
        match self.call(&Request::List)? {
            Response::VmList(l) => Ok(l),
            other => Err(unexpected("List", &other)),
        }
    }

    /// One VM.
    pub fn info(&mut self, vm: VmId) -> Result<VmInfo, ClientError> {
        match self.call(&Request::Info { vm })? {
            Response::VmInfo(i) => Ok(i),
            other => Err(unexpected("Info", &other)),
        }
    }

    /// Global statistics, and one VM's when named.
    pub fn stats(
        &mut self,
        vm: Option<VmId>,
    ) -> Result<(GlobalStats, Option<VmInfo>), ClientError> {
        match self.call(&Request::Stats { vm })? {
            Response::Stats { global, vm } => Ok((global, vm)),
            other => Err(unexpected("Stats", &other)),
        }
    }

    /// Forks `vm` `count` times; returns the children's ids.
    pub fn fork(&mut self, vm: VmId, count: u32, paused: bool) -> Result<Vec<VmId>, ClientError> {
        let start = StartFlags {
            paused,
            remove_on_stop: false,
        };
        self.fork_with(vm, count, start)
    }

    /// Forks `vm` `count` times, the children paused and/or kept out of `list` once stopped as
    /// `start` says; returns the children's ids.
    pub fn fork_with(
        &mut self,
        vm: VmId,
        count: u32,
        start: StartFlags,
    ) -> Result<Vec<VmId>, ClientError> {
        let req = Request::Fork {
            vm,
            count,
            paused: start.paused,
            remove_on_stop: start.remove_on_stop,
        };
        match self.call(&req)? {
            Response::Forked { children } => Ok(children),
            other => Err(unexpected("Fork", &other)),
        }
    }

    /// Sends a request whose reply is `Ok` (pause, resume, reset, kill, ...).
    pub fn simple(&mut self, req: &Request) -> Result<(), ClientError> {
        match self.call(req)? {
            Response::Ok => Ok(()),
            other => Err(unexpected("request", &other)),
        }
    }

    /// Uploads `data` in chunks; `progress(sent, total)` after each chunk. Returns the handle.
    pub fn upload(
        &mut self,
        purpose: UploadPurpose,
        data: &[u8],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u32, ClientError> {
        let total = data.len() as u64;
        let upload = match self.call(&Request::UploadBegin {
            purpose,
            total_len: total,
        })? {
            Response::UploadReady { upload } => upload,
            other => return Err(unexpected("UploadBegin", &other)),
        };
        let mut offset = 0u64;
        for piece in data.chunks(CHUNK_SIZE) {
            self.simple(&Request::UploadChunk {
                upload,
                offset,
                data: piece.to_vec(),
            })?;
            offset += piece.len() as u64;
            progress(offset, total);
        }
        Ok(upload)
    }

    /// Uploads a kernel (and initrd) and boots a new VM from them.
    #[allow(clippy::too_many_arguments)] // one per field of the request, and the progress
    pub fn create(
        &mut self,
        kernel: &[u8],
        initrd: Option<&[u8]>,
        mem_bytes: u64,
        vcpus: u32,
        cmdline: &str,
        start: StartFlags,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VmId, ClientError> {
        let kernel = self.upload(UploadPurpose::Kernel, kernel, progress)?;
        let initrd = match initrd {
            Some(i) => Some(self.upload(UploadPurpose::Initrd, i, progress)?),
            None => None,
        };
        match self.call(&Request::Create {
            kernel,
            initrd,
            mem_bytes,
            vcpus,
            cmdline: cmdline.to_string(),
            paused: start.paused,
            remove_on_stop: start.remove_on_stop,
        })? {
            Response::Created { vm } => Ok(vm),
            other => Err(unexpected("Create", &other)),
        }
    }

    /// Streams a snapshot of `vm` into `out`; `progress(written, total)` after each chunk.
    /// Returns the snapshot's length.
    pub fn dump(
        &mut self,
        vm: VmId,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        let (dump, total) = match self.call(&Request::Dump { vm })? {
            Response::DumpReady { dump, total_len } => (dump, total_len),
            other => return Err(unexpected("Dump", &other)),
        };
        let mut offset = 0u64;
        progress(0, total);
        while offset < total {
            match self.call(&Request::DumpRead {
                dump,
                offset,
                max_len: CHUNK_SIZE as u32,
            })? {
                Response::DumpData {
                    offset: got, data, ..
                } if got == offset && !data.is_empty() => {
                    out.write_all(&data)?;
                    offset += data.len() as u64;
                    progress(offset, total);
                }
                other => return Err(unexpected("DumpRead", &other)),
            }
        }
        self.simple(&Request::DumpClose { dump })?;
        Ok(total)
    }

    /// Uploads a snapshot and starts a VM from it.
    pub fn restore(
        &mut self,
        snapshot: &[u8],
        start: StartFlags,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VmId, ClientError> {
        let upload = self.upload(UploadPurpose::Snapshot, snapshot, progress)?;
        let req = Request::Restore {
            upload,
            paused: start.paused,
            remove_on_stop: start.remove_on_stop,
        };
        match self.call(&req)? {
            Response::Created { vm } => Ok(vm),
            other => Err(unexpected("Restore", &other)),
        }
    }

    /// Which pages differ between two VMs.
    pub fn diff(&mut self, a: VmId, b: VmId) -> Result<DiffReport, ClientError> {
        match self.call(&Request::Diff { a, b })? {
            Response::Diff(d) => Ok(d),
            other => Err(unexpected("Diff", &other)),
        }
    }
}

/// How long to wait for a `HelloReply` on QEMU's socket while a mux serves beside it.
const MUX_HOLDS_TIMEOUT: Duration = Duration::from_secs(2);

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `make qemu-virt` names QEMU's socket `SOCKET.qemu` and serves the mux on `SOCKET`: when
/// `path` is such a `.qemu` socket and something serves `SOCKET`, that is the mux.
fn mux_beside(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let mux = path.with_file_name(name.strip_suffix(".qemu").filter(|n| !n.is_empty())?);
    UnixStream::connect(&mux).ok().map(|_| mux)
}

/// When nothing serves `path` but QEMU's `path.qemu` is there (`make qemu-virt`'s layout),
/// QEMU runs and its mux has gone or not started: say so, and name the mux's log if it has one.
fn qemu_beside(path: &Path) -> String {
    let mut qemu = path.as_os_str().to_owned();
    qemu.push(".qemu");
    let qemu = PathBuf::from(qemu);
    if std::fs::symlink_metadata(&qemu).is_err() {
        return String::new();
    }
    let mut log = path.as_os_str().to_owned();
    log.push(".log");
    let log = PathBuf::from(log);
    let see = if log.exists() {
        format!(": see its log {}", log.display())
    } else {
        String::new()
    };
    format!(
        "; QEMU's socket {} is there, so the `vmfork mux` that serves {} has exited or not started{see}",
        qemu.display(),
        path.display()
    )
}

fn unexpected(what: &str, got: &Response) -> ClientError {
    ClientError::Protocol(format!(
        "unexpected reply to {what}: kind {:#06x}",
        got.kind()
    ))
}

/// A damaged frame from the monitor is an error; skipped garbage is not (the console device may
/// carry stray bytes from before the monitor drove it).
fn frame_error(e: FrameError) -> Option<ClientError> {
    match e {
        FrameError::Garbage { .. } | FrameError::BadHeaderCrc => None,
        e => Some(ClientError::Protocol(format!(
            "damaged frame from the monitor: {e}"
        ))),
    }
}

/// Interprets one frame from the monitor. A frame of another version is answered as a version
/// mismatch, reading the frozen `Error` / `HelloReply` payloads when it is one of those.
fn interpret(f: &Frame) -> Result<Response, Option<ClientError>> {
    if f.version != PROTOCOL_VERSION {
        let monitor = match (f.kind, Response::decode(f.kind, &f.payload)) {
            (kind::ERROR, Ok(Response::Error(ErrorReply::VersionMismatch { ours, .. }))) => ours,
            (kind::HELLO_REPLY, Ok(Response::HelloReply { version, .. })) => version,
            _ => f.version,
        };
        return Err(Some(ClientError::VersionMismatch {
            monitor,
            ours: PROTOCOL_VERSION,
        }));
    }
    Response::decode(f.kind, &f.payload).map_err(|e| {
        Some(ClientError::Protocol(format!(
            "bad reply {:#06x}: {e}",
            f.kind
        )))
    })
}
