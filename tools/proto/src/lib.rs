//! The vmfork control protocol, shared by the monitor (no_std) and the host tool.
//!
//! Only the version constant exists so far; the framed request/response protocol is built with
//! the control channel (see docs/PROTOCOL.md once it exists).
#![cfg_attr(not(test), no_std)]

/// Protocol version spoken by this build. A peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;
