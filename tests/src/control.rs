//! The monitor's control channel seen from the host: [`ControlSocket`], the Unix socket path QEMU
//! serves it on, and running the `vmfork` tool against it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::images::vmfork_tool;

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
