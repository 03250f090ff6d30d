//! How a mux is set up and reports: [`MuxOptions`], the log it writes ([`MuxLog`]), and why it
//! could not start ([`MuxError`]).

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmfork_proto::PROTOCOL_VERSION;

use super::lock;

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
