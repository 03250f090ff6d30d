//! The QEMU child process: [`Proc`] (reaping under a lock, killing its process group), the text of
//! an exit status, and the command line quoted for a shell (for the failure banner).

use std::ffi::OsString;
use std::process::{Child, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// One argument quoted for a POSIX shell, if it needs quoting.
pub(crate) fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,.:/+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The command line as a shell would take it, for the failure banner.
pub(crate) fn shell_join(program: &OsString, args: &[OsString]) -> String {
    std::iter::once(program)
        .chain(args)
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The QEMU child and, once reaped, its exit status. Reaping happens only under this lock, so a
/// holder that sees `status == None` knows QEMU's pid (= process group id) has not been reused.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) status: Option<ExitStatus>,
}

impl Proc {
    /// The exit status if QEMU has exited (reaping it), `None` while it runs.
    pub(crate) fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
            }
        }
        self.status
    }

    /// SIGKILLs QEMU's whole process group unless QEMU has already been reaped.
    pub(crate) fn kill_group(&mut self) {
        if self.poll().is_some() {
            return;
        }
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            // Cannot happen on Linux (pids fit in pid_t); fall back to killing the leader.
            let _ = self.child.kill();
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions. `pgid` is the pid of the QEMU child
        // we spawned with `process_group(0)`, so it is also its process group id; we hold the
        // `Proc` lock and have just seen that the child is not reaped, so the id cannot have been
        // reused by an unrelated process group.
        let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if rc != 0 {
            let _ = self.child.kill();
        }
    }

    /// Waits (bounded) for the killed or exiting QEMU to be reaped.
    pub(crate) fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Locks a `Proc`, ignoring poisoning.
pub(crate) fn lock_proc(p: &Mutex<Proc>) -> MutexGuard<'_, Proc> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A human description of an exit status.
pub(crate) fn describe_status(status: Option<ExitStatus>, killed_by_harness: bool) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "still running (could not be reaped)".to_string(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(sig)) if killed_by_harness && sig == libc::SIGKILL => {
                "killed by the test harness (SIGKILL)".to_string()
            }
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => format!("{s}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_quotes_only_when_needed() {
        assert_eq!(shell_quote("-M"), "-M");
        assert_eq!(shell_quote("virt,gic-version=3"), "virt,gic-version=3");
        assert_eq!(shell_quote("log=debug x"), "'log=debug x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
