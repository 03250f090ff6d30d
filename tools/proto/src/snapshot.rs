//! The snapshot file format that `Dump` produces and `Restore` consumes: self-describing, so a
//! freshly booted monitor can restore it.
//!
//! ```text
//! magic        8  b"VMFKSNAP"
//! format       4  u32 = SNAPSHOT_FORMAT
//! name         str (u32 length + UTF-8)
//! vcpus        4  u32
//! mem_bytes    8  u64   guest RAM size
//! ram_base     8  u64   IPA of guest RAM
//! cmdline      str
//! state        bytes (u32 length + bytes): vCPU and device state, the monitor's own encoding
//! runs         repeated: tag u8 = 1, first_page u64, pages u32, pages * 4096 bytes
//! end          tag u8 = 0, crc u32 = CRC-32 of every byte before it
//! ```
//!
//! Pages not in any run are zero. Runs are in ascending page order and do not overlap.

use crate::crc::Crc32;
use crate::wire::{DecodeError, Reader, Writer};
use alloc::string::String;
use alloc::vec::Vec;

/// Magic at the start of a snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"VMFKSNAP";
/// Version of the snapshot format.
pub const SNAPSHOT_FORMAT: u32 = 1;
/// Guest page size in snapshots.
pub const PAGE_BYTES: usize = 4096;

/// The fixed part of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The VM's name.
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// IPA of guest RAM.
    pub ram_base: u64,
    /// Kernel command line the VM booted with.
    pub cmdline: String,
    /// vCPU and device state, in the monitor's own encoding.
    pub state: Vec<u8>,
}

/// A run of pages with their contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Index of the first page from the start of guest RAM.
    pub first_page: u64,
    /// Contents, a whole number of pages.
    pub data: Vec<u8>,
}

/// A whole snapshot in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The header.
    pub header: SnapshotHeader,
    /// Nonzero memory.
    pub runs: Vec<PageRun>,
}

/// Why bytes are not a snapshot.
pub type SnapshotError = DecodeError;

impl SnapshotHeader {
    /// Appends the encoded header (magic included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        let mut w = Writer::new(out);
        w.u32(SNAPSHOT_FORMAT);
        w.str(&self.name);
        w.u32(self.vcpus);
        w.u64(self.mem_bytes);
        w.u64(self.ram_base);
        w.str(&self.cmdline);
        w.bytes(&self.state);
    }
}

/// Appends one page run to `out`. `data` must be a whole number of pages.
pub fn encode_run(first_page: u64, data: &[u8], out: &mut Vec<u8>) {
    let mut w = Writer::new(out);
    w.u8(1);
    w.u64(first_page);
    w.u32(u32::try_from(data.len() / PAGE_BYTES).unwrap_or(u32::MAX));
    out.extend_from_slice(data);
}

/// Appends the end marker and the CRC of `out` (which must hold the whole snapshot so far).
pub fn encode_end(out: &mut Vec<u8>) {
    out.push(0);
    let mut c = Crc32::new();
    c.update(out);
    let crc = c.finish();
    out.extend_from_slice(&crc.to_le_bytes());
}

impl Snapshot {
    /// Encodes the whole snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.header.encode(&mut out);
        for run in &self.runs {
            encode_run(run.first_page, &run.data, &mut out);
        }
        encode_end(&mut out);
        out
    }

    /// Checks and decodes a snapshot, calling `run(first_page, data)` for each page run with the
    /// run's bytes borrowed from `bytes` (so a monitor can copy them straight into guest frames).
    /// Runs are checked to lie inside guest RAM, ascend and not overlap.
    pub fn visit(
        bytes: &[u8],
        mut run: impl FnMut(u64, &[u8]),
    ) -> Result<SnapshotHeader, SnapshotError> {
        if bytes.len() < SNAPSHOT_MAGIC.len() + 5 {
            return Err(DecodeError::Truncated);
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let mut c = Crc32::new();
        c.update(body);
        if c.finish().to_le_bytes() != crc {
            return Err(DecodeError::Limit("snapshot CRC mismatch"));
        }
        let mut r = Reader::new(body);
        if r.take(SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
            return Err(DecodeError::Limit("not a vmfork snapshot (bad magic)"));
        }
        let format = r.u32()?;
        if format != SNAPSHOT_FORMAT {
            return Err(DecodeError::BadTag {
                what: "snapshot format",
                value: format,
            });
        }
        let header = SnapshotHeader {
            name: r.str()?,
            vcpus: r.u32()?,
            mem_bytes: r.u64()?,
            ram_base: r.u64()?,
            cmdline: r.str()?,
            state: r.bytes()?,
        };
        let ram_pages = header.mem_bytes / PAGE_BYTES as u64;
        let mut next_free = 0u64;
        loop {
            match r.u8()? {
                0 => break,
                1 => {
                    let first = r.u64()?;
                    let pages = u64::from(r.u32()?);
                    let end = first
                        .checked_add(pages)
                        .ok_or(DecodeError::Limit("page run overflows"))?;
                    if first < next_free || end > ram_pages {
                        return Err(DecodeError::Limit("page run outside RAM or out of order"));
                    }
                    let len = usize::try_from(pages)
                        .ok()
                        .and_then(|p| p.checked_mul(PAGE_BYTES))
                        .ok_or(DecodeError::Truncated)?;
                    run(first, r.take(len)?);
                    next_free = end;
                }
                t => {
                    return Err(DecodeError::BadTag {
                        what: "snapshot record",
                        value: u32::from(t),
                    })
                }
            }
        }
        r.finish()?;
        Ok(header)
    }

    /// Decodes a whole snapshot into memory.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let mut runs = Vec::new();
        let header = Snapshot::visit(bytes, |first_page, data| {
            runs.push(PageRun {
                first_page,
                data: data.to_vec(),
            })
        })?;
        Ok(Snapshot { header, runs })
    }
}
