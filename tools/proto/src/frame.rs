//! Frames: the envelope every message travels in, and the streaming decoder that finds them in a
//! byte stream.
//!
//! ```text
//! offset  size  field
//!      0     4  magic          b"VMFK"
//!      4     2  version        protocol version of the sender (u16 LE)
//!      6     2  kind           message kind (u16 LE), see `msg`
//!      8     4  id             request id (u32 LE); a reply echoes its request's id
//!     12     4  len            payload length (u32 LE), at most the receiver's cap
//!     16     4  header_crc     CRC-32 of bytes 0..16
//!     20   len  payload
//! 20+len     4  frame_crc      CRC-32 of bytes 0..20+len (header and payload)
//! ```
//!
//! The header has its own CRC so that a corrupted length is caught before the decoder waits for
//! (or allocates) a payload that will never come.

use crate::crc::crc32;
use alloc::vec::Vec;
use core::fmt;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"VMFK";
/// Size of the frame header, including its CRC.
pub const HEADER_LEN: usize = 20;
/// Size of the frame trailer (the frame CRC).
pub const TRAILER_LEN: usize = 4;
/// The largest payload any frame may carry, in either direction.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// One frame, checked (both CRCs matched) but not yet interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Protocol version of the sender.
    pub version: u16,
    /// Message kind.
    pub kind: u16,
    /// Request id; replies and console events echo their request's id.
    pub id: u32,
    /// The encoded message.
    pub payload: Vec<u8>,
}

/// A frame could not be built because its payload is over the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeError {
    /// Payload length that was asked for.
    pub len: usize,
    /// The cap, [`MAX_PAYLOAD`].
    pub max: u32,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "payload of {} bytes exceeds the frame cap of {} bytes",
            self.len, self.max
        )
    }
}

/// Appends one complete frame to `out`.
pub fn encode_frame(
    version: u16,
    kind: u16,
    id: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let len = match u32::try_from(payload.len()) {
        Ok(l) if l <= MAX_PAYLOAD => l,
        _ => {
            return Err(EncodeError {
                len: payload.len(),
                max: MAX_PAYLOAD,
            })
        }
    };
    let start = out.len();
    out.reserve(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let hcrc = crc32(&out[start..start + 16]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
    let fcrc = crc32(&out[start..]);
    out.extend_from_slice(&fcrc.to_le_bytes());
    Ok(())
}

impl Frame {
    /// Appends this frame's wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        encode_frame(self.version, self.kind, self.id, &self.payload, out)
    }
}

/// Something in the byte stream that was not a good frame. The decoder has already recovered
/// (resynchronised) when it reports one; the caller may log it, count it, or answer `BadRequest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Bytes that could not start a frame were skipped while looking for the magic.
    Garbage {
        /// How many bytes were skipped.
        skipped: usize,
    },
    /// A header's CRC did not match; the decoder resumes the search one byte further.
    BadHeaderCrc,
    /// A well-formed header announced a payload over the cap; its payload and trailer are skipped
    /// without being stored.
    TooLarge {
        /// Request id of the refused frame, so the receiver can answer it.
        id: u32,
        /// Announced payload length.
        len: u32,
        /// The decoder's cap.
        max: u32,
    },
    /// The frame CRC did not match (damaged or truncated frame); the decoder resumes the search
    /// one byte into the damaged frame, so a good frame inside it is still found.
    BadCrc {
        /// Request id from the (intact) header, so the receiver can answer it.
        id: u32,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Garbage { skipped } => write!(f, "skipped {skipped} bytes of garbage"),
            FrameError::BadHeaderCrc => write!(f, "frame header CRC mismatch"),
            FrameError::TooLarge { id, len, max } => {
                write!(f, "frame {id} announces {len} payload bytes, cap is {max}")
            }
            FrameError::BadCrc { id } => write!(f, "frame {id} CRC mismatch"),
        }
    }
}

/// The streaming frame decoder: feed it bytes as they arrive, in pieces of any size.
///
/// It never panics, never holds more than `HEADER_LEN + max_payload + TRAILER_LEN` bytes, refuses
/// a too-large length before allocating for it, and after any damage resumes at the next magic.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max_payload: u32,
    /// Bytes still to skip of a refused over-cap frame.
    discard: u64,
    /// Garbage bytes skipped and not reported yet.
    skipped: usize,
    /// Total length of the frame in the buffer once its header has been checked.
    frame_len: Option<usize>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder accepting payloads up to [`MAX_PAYLOAD`].
    pub fn new() -> Self {
        Self::with_max_payload(MAX_PAYLOAD)
    }

    /// A decoder accepting payloads up to `max` bytes (clamped to [`MAX_PAYLOAD`]). The monitor
    /// uses [`crate::MAX_REQUEST_PAYLOAD`]: no request is bigger.
    pub fn with_max_payload(max: u32) -> Self {
        Decoder {
            buf: Vec::new(),
            max_payload: max.min(MAX_PAYLOAD),
            discard: 0,
            skipped: 0,
            frame_len: None,
        }
    }

    /// Forgets any partial frame (e.g. when a client disconnects).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discard = 0;
        self.skipped = 0;
        self.frame_len = None;
    }

    /// Bytes currently held for a partial frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds `bytes` and returns the frames (and errors) they complete, in stream order.
    ///
    /// The iterator consumes `bytes` lazily: drive it to the end (bytes not consumed when it is
    /// dropped are lost, as if they had never arrived).
    pub fn push<'d, 'i>(&'d mut self, bytes: &'i [u8]) -> Frames<'d, 'i> {
        Frames {
            dec: self,
            input: bytes,
        }
    }

    /// Drops bytes from the front of the buffer until it starts with something that may begin a
    /// frame (a prefix of the magic), or is empty.
    fn resync_buffer(&mut self, from: usize, count_as_garbage: bool) {
        let from = from.min(self.buf.len());
        let cut = self.buf[from..]
            .iter()
            .position(|&b| b == MAGIC[0])
            .map_or(self.buf.len(), |p| from + p);
        if count_as_garbage {
            self.skipped += cut;
        }
        self.buf.drain(..cut);
    }

    fn buffer_prefix_ok(&self) -> bool {
        let n = self.buf.len().min(MAGIC.len());
        self.buf[..n] == MAGIC[..n]
    }

    fn take_garbage_report(&mut self) -> Option<FrameError> {
        if self.skipped > 0 {
            let skipped = self.skipped;
            self.skipped = 0;
            Some(FrameError::Garbage { skipped })
        } else {
            None
        }
    }

    fn step(&mut self, input: &mut &[u8]) -> Option<Result<Frame, FrameError>> {
        loop {
            if self.discard > 0 {
                let n = usize::try_from(self.discard)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *input = &input[n..];
                self.discard -= n as u64;
                if self.discard > 0 {
                    return None;
                }
                continue;
            }
            let Some(frame_len) = self.frame_len else {
                // Synchronise: the buffer holds a prefix of a possible frame, or nothing.
                while !self.buf.is_empty() && !self.buffer_prefix_ok() {
                    self.resync_buffer(1, true);
                }
                if !self.buf.is_empty() {
                    if let Some(e) = self.take_garbage_report() {
                        return Some(Err(e));
                    }
                }
                if self.buf.is_empty() {
                    match input.iter().position(|&b| b == MAGIC[0]) {
                        Some(p) => {
                            self.skipped += p;
                            *input = &input[p..];
                        }
                        None => {
                            self.skipped += input.len();
                            *input = &[];
                        }
                    }
                    if let Some(e) = self.take_garbage_report() {
                        return Some(Err(e));
                    }
                    if input.is_empty() {
                        return None;
                    }
                }
                if self.buf.len() < HEADER_LEN {
                    let n = (HEADER_LEN - self.buf.len()).min(input.len());
                    self.buf.extend_from_slice(&input[..n]);
                    *input = &input[n..];
                    if !self.buffer_prefix_ok() {
                        continue;
                    }
                    if self.buf.len() < HEADER_LEN {
                        return None;
                    }
                }
                // A whole header: check it before trusting its length.
                let (hcrc, id, len) =
                    (le32(&self.buf, 16), le32(&self.buf, 8), le32(&self.buf, 12));
                if crc32(&self.buf[..16]) != hcrc {
                    self.resync_buffer(1, false);
                    return Some(Err(FrameError::BadHeaderCrc));
                }
                if len > self.max_payload {
                    // The buffer never holds a whole over-cap frame (it is at most one cap long),
                    // so everything buffered belongs to the refused frame.
                    let held = (self.buf.len() - HEADER_LEN) as u64;
                    self.discard = (u64::from(len) + TRAILER_LEN as u64).saturating_sub(held);
                    self.buf.clear();
                    return Some(Err(FrameError::TooLarge {
                        id,
                        len,
                        max: self.max_payload,
                    }));
                }
                self.frame_len = Some(HEADER_LEN + len as usize + TRAILER_LEN);
                continue;
            };
            if self.buf.len() < frame_len {
                let n = (frame_len - self.buf.len()).min(input.len());
                self.buf.extend_from_slice(&input[..n]);
                *input = &input[n..];
                if self.buf.len() < frame_len {
                    return None;
                }
            }
            // A whole frame.
            self.frame_len = None;
            let body = frame_len - TRAILER_LEN;
            let id = le32(&self.buf, 8);
            if crc32(&self.buf[..body]) != le32(&self.buf, body) {
                self.resync_buffer(1, false);
                return Some(Err(FrameError::BadCrc { id }));
            }
            let frame = Frame {
                version: u16::from_le_bytes([self.buf[4], self.buf[5]]),
                kind: u16::from_le_bytes([self.buf[6], self.buf[7]]),
                id,
                payload: self.buf[HEADER_LEN..body].to_vec(),
            };
            self.buf.drain(..frame_len);
            return Some(Ok(frame));
        }
    }
}

/// Reads a little-endian `u32` at `at`; the callers have checked `buf` holds it.
fn le32(buf: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = buf.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

/// Iterator over the frames completed by one [`Decoder::push`].
#[derive(Debug)]
pub struct Frames<'d, 'i> {
    dec: &'d mut Decoder,
    input: &'i [u8],
}

impl Iterator for Frames<'_, '_> {
    type Item = Result<Frame, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.dec.step(&mut self.input)
    }
}
