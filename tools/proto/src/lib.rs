//! The vmfork control protocol, shared by the monitor (bare metal, `no_std` + `alloc`) and the
//! host tool. Specified byte for byte in `docs/PROTOCOL.md`.
//!
//! - [`frame`]: the envelope (magic, version, kind, request id, length, CRCs) and the streaming
//!   [`Decoder`] that finds frames in a byte stream and survives any garbage.
//! - [`msg`]: [`Request`] and [`Response`] and the types they carry.
//! - [`snapshot`]: the self-describing snapshot format of `Dump` / `Restore`.
//! - [`wire`]: the little-endian field encoding.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod crc;
pub mod frame;
pub mod msg;
pub mod snapshot;
pub mod wire;

pub use frame::{Decoder, EncodeError, Frame, FrameError, MAX_PAYLOAD};
pub use msg::{
    decode_request, DiffReport, ErrorReply, GlobalStats, PageRange, PauseReason, Request, Response,
    StopReason, UploadPurpose, VmId, VmInfo, VmState,
};
pub use wire::DecodeError;

/// Protocol version spoken by this build. A peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of the pieces large transfers (uploads, dumps, console input) are cut into.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// The largest request payload: a chunk plus its few fields. The monitor decodes requests with
/// `Decoder::with_max_payload(MAX_REQUEST_PAYLOAD)`.
pub const MAX_REQUEST_PAYLOAD: u32 = CHUNK_SIZE as u32 + 1024;
/// The largest kernel or initrd upload.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// The most ranges a `Diff` reply carries.
pub const MAX_DIFF_RANGES: usize = 4096;
