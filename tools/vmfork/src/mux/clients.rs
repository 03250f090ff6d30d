//! The client side: the listening socket (and the link to it), the accept loop, clients that
//! connect before the monitor has answered, and each client's reader and writer threads.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use vmfork_proto::{Decoder, ErrorReply, Response};

use super::{
    dispatch, is_retry, lock, read_some, ClientId, MuxError, MuxLog, Phase, Shared, Sink, Startup,
};

/// Makes `link` a symbolic link to `target` unless something live serves `link` already.
/// Returns whether it did.
pub(super) fn claim_link(link: &Path, target: &Path, log: &MuxLog) -> bool {
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
pub(super) fn release_link(link: &Path, target: &Path) {
    let target = std::path::absolute(target).unwrap_or_else(|_| target.to_path_buf());
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        let _ = std::fs::remove_file(link);
    }
}

pub(super) fn bind(path: &Path, upstream: &Path) -> Result<UnixListener, MuxError> {
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

pub(super) fn accept_loop(startup: Arc<Startup>, listener: UnixListener) {
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
            Err(e) if is_retry(&e) => {}
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
    while let Some(n) = read_some(&mut stream, &mut buf) {
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
