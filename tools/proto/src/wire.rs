//! Little-endian payload encoding: a growable writer and a bounds-checked reader.
//!
//! Every integer is fixed-width little-endian; byte strings and UTF-8 strings carry a `u32` length
//! prefix; `Option<T>` is a `u8` tag (0 = none, 1 = some) followed by the value; `bool` is a `u8`
//! that must be 0 or 1. The reader never allocates more than the bytes it actually holds, so a
//! lying length prefix cannot make it allocate.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Why a payload could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ended in the middle of a field.
    Truncated,
    /// Bytes were left over after the last field.
    TrailingBytes(usize),
    /// A string was not valid UTF-8.
    BadUtf8,
    /// A tag byte (enum discriminant, bool, option) had a value that means nothing.
    BadTag {
        /// What the tag selects.
        what: &'static str,
        /// The value found.
        value: u32,
    },
    /// The frame kind is not a message of this protocol version (or not of this direction).
    UnknownKind(u16),
    /// A field broke a documented limit (e.g. a chunk larger than `CHUNK_SIZE`).
    Limit(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "payload truncated"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} trailing bytes after the payload"),
            DecodeError::BadUtf8 => write!(f, "string is not valid UTF-8"),
            DecodeError::BadTag { what, value } => write!(f, "invalid {what} tag {value}"),
            DecodeError::UnknownKind(k) => write!(f, "unknown message kind {k:#06x}"),
            DecodeError::Limit(what) => write!(f, "limit exceeded: {what}"),
        }
    }
}

/// Appends little-endian fields to a byte vector.
#[derive(Debug)]
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// A writer appending to `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }
    /// Appends one byte.
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    /// Appends a `u16`.
    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a bool as 0 or 1.
    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    /// Appends a `u32` length and the bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        // Lengths are bounded by the frame cap (far below 4 GiB) when encoding a frame; saturate
        // rather than wrap so a misuse yields a frame the peer rejects, never a misparse.
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.out.extend_from_slice(v);
    }
    /// Appends a string as its UTF-8 bytes.
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    /// Appends an optional `u32`.
    pub fn opt_u32(&mut self, v: Option<u32>) {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                self.u32(x);
            }
        }
    }
}

/// Reads little-endian fields from a byte slice, failing (never panicking) on short input.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// Takes `n` raw bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    /// Reads a `u16`.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Reads a `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Reads a `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Reads a bool (0 or 1).
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadTag {
                what: "bool",
                value: u32::from(v),
            }),
        }
    }
    /// Reads a length-prefixed byte string, borrowed.
    pub fn bytes_ref(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    /// Reads a length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        Ok(self.bytes_ref()?.to_vec())
    }
    /// Reads a length-prefixed UTF-8 string.
    pub fn str(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes_ref()?;
        core::str::from_utf8(b)
            .map(String::from)
            .map_err(|_| DecodeError::BadUtf8)
    }
    /// Reads an optional `u32`.
    pub fn opt_u32(&mut self) -> Result<Option<u32>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u32()?)),
            v => Err(DecodeError::BadTag {
                what: "option",
                value: u32::from(v),
            }),
        }
    }
    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}
