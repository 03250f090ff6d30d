//! What went wrong, as a script sees it: an error kind with its own exit status, and the JSON
//! form of an error that `--json` prints (docs/PROTOCOL.md, "vmfork --json output").

use std::fmt;

use serde::Serialize;
use vmfork_proto::ErrorReply;

use crate::client::ClientError;

/// The kinds of failure, each with its own exit status. The table in `vmfork --help` and the
/// man page is made from [`ErrorKind::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A bug: the monitor reported an internal error, or vmfork itself failed unexpectedly.
    Internal,
    /// The command line is wrong, or a value is out of range (checked before the monitor is
    /// contacted).
    Usage,
    /// The monitor cannot be reached, or the connection was lost or timed out.
    Connection,
    /// The VM does not exist.
    NotFound,
    /// The monitor cannot do it now; try again.
    Busy,
    /// Not enough memory (frames or heap) in the monitor.
    OutOfMemory,
    /// The monitor refused the request (wrong state, a limit, an invalid image or snapshot), or
    /// vmfork refused a snapshot file that is not valid.
    Refused,
    /// A local file cannot be read or written.
    Io,
    /// The monitor speaks another protocol version, or sent something vmfork does not understand.
    Protocol,
    /// `vmfork console`: the VM went (powered off, was killed, crashed) while attached; all it
    /// printed was shown first. `vmfork wait`: the VM is gone, so it can never reach the state
    /// waited for.
    VmGone,
    /// The VM has stopped (powered off, crashed, killed): it is listed until `vmfork rm`, but
    /// only `info`, `console` and `rm` apply to it.
    Stopped,
    /// `vmfork wait`: the state was not reached within `--timeout`.
    Timeout,
}

impl ErrorKind {
    /// Every kind, in exit-status order.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::Internal,
        ErrorKind::Usage,
        ErrorKind::Connection,
        ErrorKind::NotFound,
        ErrorKind::Busy,
        ErrorKind::OutOfMemory,
        ErrorKind::Refused,
        ErrorKind::Io,
        ErrorKind::Protocol,
        ErrorKind::VmGone,
        ErrorKind::Stopped,
        ErrorKind::Timeout,
    ];

    /// The process exit status for this kind (0 is success).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Connection => 3,
            ErrorKind::NotFound => 4,
            ErrorKind::Busy => 5,
            ErrorKind::OutOfMemory => 6,
            ErrorKind::Refused => 7,
            ErrorKind::Io => 8,
            ErrorKind::Protocol => 9,
            ErrorKind::VmGone => 10,
            ErrorKind::Stopped => 11,
            ErrorKind::Timeout => 12,
        }
    }

    /// The name in JSON (`"kind"`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Internal => "internal",
            ErrorKind::Usage => "usage",
            ErrorKind::Connection => "connection",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Busy => "busy",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::Refused => "refused",
            ErrorKind::Io => "io",
            ErrorKind::Protocol => "protocol",
            ErrorKind::VmGone => "vm_gone",
            ErrorKind::Stopped => "stopped",
            ErrorKind::Timeout => "timeout",
        }
    }

    /// One line on what it means.
    pub fn meaning(self) -> &'static str {
        match self {
            ErrorKind::Internal => "a bug: the monitor reported an internal error",
            ErrorKind::Usage => "bad command line, or a value out of range (nothing was sent)",
            ErrorKind::Connection => {
                "the monitor cannot be reached (no socket, still booting, the mux holds QEMU's socket), or did not answer"
            }
            ErrorKind::NotFound => "no such VM",
            ErrorKind::Busy => "the monitor is busy with that VM; try again",
            ErrorKind::OutOfMemory => "the monitor has too little free memory",
            ErrorKind::Refused => {
                "the monitor refused the request (state, a limit, a bad image or snapshot)"
            }
            ErrorKind::Io => "a local file cannot be read or written",
            ErrorKind::Protocol => "protocol version mismatch, or a reply vmfork cannot read",
            ErrorKind::Stopped => "the VM has stopped (listed until `vmfork rm`)",
            ErrorKind::VmGone => {
                "console: the VM went while attached (its last output was shown); wait: the VM is gone, it will never reach the state"
            }
            ErrorKind::Timeout => "wait: the state was not reached within --timeout",
        }
    }

    /// The exit-status table for `--help` and the man page.
    pub fn help_table() -> String {
        let mut s = String::from("Exit status:\n  0  success\n");
        for k in ErrorKind::ALL {
            s.push_str(&format!(
                "  {}  {:<13}  {}\n",
                k.exit_code(),
                k.name(),
                k.meaning()
            ));
        }
        s.push_str(
            "\nWith --json, a failure prints {\"error\": {\"kind\": KIND, \"message\": TEXT, \"exit_code\": N}}\n\
             on stdout instead of one line on stderr; the shapes are in docs/vmfork-json.schema.json.\n\
             `vmfork man` prints the man page.",
        );
        s
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of a client error.
pub fn client_error_kind(e: &ClientError) -> ErrorKind {
    match e {
        ClientError::Connect { .. }
        | ClientError::Io(_)
        | ClientError::Closed
        | ClientError::NotReady(_)
        | ClientError::HeldByMux { .. } => ErrorKind::Connection,
        ClientError::VersionMismatch { .. } | ClientError::Protocol(_) => ErrorKind::Protocol,
        ClientError::Monitor(r) => match r {
            ErrorReply::NoSuchVm(_) => ErrorKind::NotFound,
            ErrorReply::OutOfMemory => ErrorKind::OutOfMemory,
            ErrorReply::BadRequest(_) => ErrorKind::Refused,
            ErrorReply::Busy => ErrorKind::Busy,
            ErrorReply::VersionMismatch { .. } => ErrorKind::Protocol,
            ErrorReply::Internal(_) => ErrorKind::Internal,
            ErrorReply::VmStopped(_) => ErrorKind::Stopped,
        },
    }
}

/// Figures that go with an out-of-memory error: what was asked for and what the monitor has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryFigures {
    /// Guest RAM the new VM would have, in bytes.
    pub requested_bytes: u64,
    /// Frames (4 KiB) its RAM needs at least.
    pub requested_frames: u64,
    /// Frames the monitor has free.
    pub free_frames: u64,
    /// Frames the monitor manages.
    pub total_frames: u64,
    /// Bytes of the monitor's heap free (uploads are held there), its reserve included.
    pub heap_free_bytes: u64,
    /// Free heap that uploads and forks may not use.
    pub heap_reserve_bytes: u64,
}

/// A failure of one `vmfork` command: its kind, one line of text, and for some kinds figures.
#[derive(Debug)]
pub struct CliError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// One line, without the `vmfork: ` prefix.
    pub message: String,
    /// For out-of-memory errors, when known.
    pub memory: Option<MemoryFigures>,
}

impl CliError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> CliError {
        CliError {
            kind,
            message: message.into(),
            memory: None,
        }
    }

    /// The JSON document `--json` prints for this error.
    pub fn to_json(&self) -> serde_json::Value {
        let mut e = serde_json::json!({
            "kind": self.kind,
            "message": self.message,
            "exit_code": self.kind.exit_code(),
        });
        if let Some(m) = &self.memory {
            e["memory"] = serde_json::to_value(m).unwrap_or(serde_json::Value::Null);
        }
        serde_json::json!({ "error": e })
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::new(client_error_kind(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_not_zero() {
        let mut codes: Vec<u8> = ErrorKind::ALL.iter().map(|k| k.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
        assert!(!codes.contains(&0));
        let t = ErrorKind::help_table();
        for k in ErrorKind::ALL {
            assert!(
                t.contains(&format!("{}  {}", k.exit_code(), k.name())),
                "{t}"
            );
            // The serde name is the one the table shows.
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }
}
