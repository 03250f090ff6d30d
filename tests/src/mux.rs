//! `vmfork mux` as a child process of a test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{vmfork_run, vmfork_tool, ControlSocket, DEFAULT_TIMEOUT};

/// The mux process; killed when the test ends, however it ends.
pub struct MuxProcess(Child);

impl MuxProcess {
    /// Starts `vmfork mux` between QEMU's socket and `listen`, and waits until it serves (it
    /// listens at once, and answers clients once the monitor has answered it).
    pub fn start(upstream: &ControlSocket, listen: &ControlSocket) -> MuxProcess {
        let child = Command::new(vmfork_tool())
            .arg("mux")
            .arg("--upstream")
            .arg(upstream.path())
            .arg("--listen")
            .arg(listen.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start vmfork mux");
        let mut mux = MuxProcess(child);
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        while !vmfork_run(listen, &["list"]).status.success() {
            if let Ok(Some(status)) = mux.0.try_wait() {
                panic!("vmfork mux exited before serving: {status}");
            }
            assert!(Instant::now() < deadline, "vmfork mux never served");
            std::thread::sleep(Duration::from_millis(50));
        }
        mux
    }
}

impl Drop for MuxProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
