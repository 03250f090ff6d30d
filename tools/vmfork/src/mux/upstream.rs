//! The connection to the monitor: connecting to QEMU's socket (retrying while it is missing or
//! refuses), the `Hello` handshake (resent until the monitor answers), and the threads that write
//! frames to it and route the frames that come from it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use vmfork_proto::{Decoder, ErrorReply, FrameError, Request, Response, PROTOCOL_VERSION};

use super::{
    dispatch, is_retry, lock, read_some, shut_down, MuxEnd, MuxError, MuxLog, MuxOptions, Shared,
    Startup,
};

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
            Err(e) if is_retry(&e) => continue,
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
pub(super) fn reach_monitor(
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

pub(super) fn upstream_writer(mut up: UnixStream, rx: mpsc::Receiver<Vec<u8>>) {
    for bytes in rx {
        if up.write_all(&bytes).is_err() {
            // The reader sees the end too and shuts everything down.
            let _ = up.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

pub(super) fn upstream_reader(shared: Arc<Shared>, mut up: UnixStream, mut dec: Decoder) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    while let Some(n) = read_some(&mut up, &mut buf) {
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
