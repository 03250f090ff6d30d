//! Capturing QEMU's output: a [`Stream`] is the bytes read so far from one pipe (the serial port
//! or stderr), filled by a reader thread and waited on with its condition variable.

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Instant;

/// Bytes read so far from one of QEMU's output pipes.
pub(crate) struct StreamState {
    pub(crate) bytes: Vec<u8>,
    /// The pipe reached end of file (QEMU exited) or failed.
    pub(crate) eof: bool,
    /// When the last bytes arrived.
    pub(crate) last_rx: Instant,
}

/// One of QEMU's output pipes, filled by a reader thread.
pub(crate) struct Stream {
    state: Mutex<StreamState>,
    pub(crate) cond: Condvar,
}

impl Stream {
    pub(crate) fn new() -> Arc<Stream> {
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
    pub(crate) fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The whole stream so far, as (lossy) text.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock().bytes).into_owned()
    }

    /// Appends bytes that did not come from QEMU (e.g. a watchdog note) and wakes waiters.
    pub(crate) fn note(&self, msg: &str) {
        self.lock().bytes.extend_from_slice(msg.as_bytes());
        self.cond.notify_all();
    }
}

/// Spawns the thread that copies `pipe` into `stream` until end of file.
pub(crate) fn spawn_reader(
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
