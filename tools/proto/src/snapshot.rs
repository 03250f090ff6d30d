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
//! Pages not in any run are zero. Runs are in ascending page order, do not overlap, and hold at
//! least one page each. The name is at most [`MAX_NAME_BYTES`], the command line at most
//! [`MAX_CMDLINE_BYTES`] and the state at most [`MAX_STATE_BYTES`] long.

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

    /// Checks a whole snapshot without copying any of it (the header's strings and state are
    /// borrowed too, so a monitor's heap holds the file once): the CRC, the magic and format, the
    /// header's limits ([`MAX_NAME_BYTES`], [`MAX_CMDLINE_BYTES`], [`MAX_STATE_BYTES`]) and every
    /// page run (at least one page, inside guest RAM, ascending, not overlapping). Allocates
    /// nothing, whatever the input; the runs are then walked with [`ParsedSnapshot::runs`].
    pub fn parse(bytes: &[u8]) -> Result<ParsedSnapshot<'_>, SnapshotError> {
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
        let name = bounded_str(&mut r, MAX_NAME_BYTES, "snapshot name too long")?;
        let vcpus = r.u32()?;
        let mem_bytes = r.u64()?;
        let ram_base = r.u64()?;
        let cmdline = bounded_str(&mut r, MAX_CMDLINE_BYTES, "snapshot command line too long")?;
        let state = r.bytes_ref()?;
        if state.len() > MAX_STATE_BYTES {
            return Err(DecodeError::Limit("snapshot state too large"));
        }
        let header = HeaderRef {
            name,
            vcpus,
            mem_bytes,
            ram_base,
            cmdline,
            state,
        };
        let records = r.take(r.remaining())?;
        let ram_pages = mem_bytes / PAGE_BYTES as u64;
        let mut runs = RunIter {
            r: Reader::new(records),
            ram_pages,
            next_free: 0,
            done: false,
        };
        let (mut nr_runs, mut pages) = (0u64, 0u64);
        while let Some(run) = runs.next_run()? {
            nr_runs += 1;
            pages += run.1.len() as u64 / PAGE_BYTES as u64;
        }
        Ok(ParsedSnapshot {
            header,
            records,
            nr_runs,
            pages,
        })
    }

    /// Checks and decodes a snapshot, calling `run(first_page, data)` for each page run with the
    /// run's bytes borrowed from `bytes` (so a monitor can copy them straight into guest frames).
    /// Checks as [`Snapshot::parse`]; `run` is only called once the whole snapshot is known good.
    pub fn visit(
        bytes: &[u8],
        mut run: impl FnMut(u64, &[u8]),
    ) -> Result<SnapshotHeader, SnapshotError> {
        let parsed = Snapshot::parse(bytes)?;
        for (first, data) in parsed.runs() {
            run(first, data);
        }
        Ok(parsed.header.to_header())
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

/// Longest VM name in a snapshot.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest command line in a snapshot.
pub const MAX_CMDLINE_BYTES: usize = 4096;
/// Largest vCPU and device state in a snapshot.
pub const MAX_STATE_BYTES: usize = 16 << 20;

fn bounded_str<'a>(
    r: &mut Reader<'a>,
    max: usize,
    what: &'static str,
) -> Result<&'a str, DecodeError> {
    let b = r.bytes_ref()?;
    if b.len() > max {
        return Err(DecodeError::Limit(what));
    }
    core::str::from_utf8(b).map_err(|_| DecodeError::BadUtf8)
}

/// A snapshot header borrowed from the snapshot's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderRef<'a> {
    /// The VM's name.
    pub name: &'a str,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// IPA of guest RAM.
    pub ram_base: u64,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// vCPU and device state.
    pub state: &'a [u8],
}

impl HeaderRef<'_> {
    /// An owned copy.
    pub fn to_header(&self) -> SnapshotHeader {
        SnapshotHeader {
            name: String::from(self.name),
            vcpus: self.vcpus,
            mem_bytes: self.mem_bytes,
            ram_base: self.ram_base,
            cmdline: String::from(self.cmdline),
            state: self.state.to_vec(),
        }
    }
}

/// A snapshot whose every byte has been checked by [`Snapshot::parse`]; its page runs are still
/// borrowed from the input.
#[derive(Clone, Debug)]
pub struct ParsedSnapshot<'a> {
    /// The header.
    pub header: HeaderRef<'a>,
    records: &'a [u8],
    /// Number of page runs.
    pub nr_runs: u64,
    /// Pages in all runs.
    pub pages: u64,
}

impl<'a> ParsedSnapshot<'a> {
    /// The page runs, `(first_page, data)`, in ascending order, data borrowed from the input.
    pub fn runs(&self) -> RunIter<'a> {
        RunIter {
            r: Reader::new(self.records),
            ram_pages: self.header.mem_bytes / PAGE_BYTES as u64,
            next_free: 0,
            done: false,
        }
    }
}

/// Iterator over the page runs of a [`ParsedSnapshot`].
#[derive(Debug)]
pub struct RunIter<'a> {
    r: Reader<'a>,
    ram_pages: u64,
    next_free: u64,
    done: bool,
}

impl<'a> RunIter<'a> {
    /// The next run, `None` at the end marker (which must be the last byte).
    fn next_run(&mut self) -> Result<Option<(u64, &'a [u8])>, DecodeError> {
        if self.done {
            return Ok(None);
        }
        match self.r.u8()? {
            0 => {
                self.done = true;
                if self.r.remaining() != 0 {
                    return Err(DecodeError::TrailingBytes(self.r.remaining()));
                }
                Ok(None)
            }
            1 => {
                let first = self.r.u64()?;
                let pages = u64::from(self.r.u32()?);
                if pages == 0 {
                    return Err(DecodeError::Limit("empty page run"));
                }
                let end = first
                    .checked_add(pages)
                    .ok_or(DecodeError::Limit("page run overflows"))?;
                if first < self.next_free || end > self.ram_pages {
                    return Err(DecodeError::Limit("page run outside RAM or out of order"));
                }
                let len = usize::try_from(pages)
                    .ok()
                    .and_then(|p| p.checked_mul(PAGE_BYTES))
                    .ok_or(DecodeError::Truncated)?;
                let data = self.r.take(len)?;
                self.next_free = end;
                Ok(Some((first, data)))
            }
            t => Err(DecodeError::BadTag {
                what: "snapshot record",
                value: u32::from(t),
            }),
        }
    }
}

impl<'a> Iterator for RunIter<'a> {
    type Item = (u64, &'a [u8]);

    /// Runs of a parsed snapshot were all checked: this never meets an error (and stops if it
    /// did).
    fn next(&mut self) -> Option<Self::Item> {
        match self.next_run() {
            Ok(run) => run,
            Err(_) => {
                self.done = true;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Writer;

    fn header(mem_pages: u64) -> SnapshotHeader {
        SnapshotHeader {
            name: String::from("guest0.2"),
            vcpus: 1,
            mem_bytes: mem_pages * PAGE_BYTES as u64,
            ram_base: 0x4000_0000,
            cmdline: String::from("console=ttyAMA0"),
            state: vec![1, 2, 3],
        }
    }

    /// A snapshot of `h` with raw run records `(first, pages field, data pages)`.
    fn raw(h: &SnapshotHeader, runs: &[(u64, u32, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        h.encode(&mut out);
        for &(first, pages, data) in runs {
            let mut w = Writer::new(&mut out);
            w.u8(1);
            w.u64(first);
            w.u32(pages);
            out.extend(core::iter::repeat_n(0xa5, data * PAGE_BYTES));
        }
        encode_end(&mut out);
        out
    }

    #[test]
    fn good_runs_parse_and_iterate() {
        let h = header(16);
        let bytes = raw(&h, &[(0, 2, 2), (2, 1, 1), (10, 6, 6)]);
        let p = Snapshot::parse(&bytes).unwrap();
        assert_eq!((p.nr_runs, p.pages), (3, 9));
        let runs: Vec<(u64, usize)> = p.runs().map(|(f, d)| (f, d.len())).collect();
        assert_eq!(runs, [(0, 8192), (2, 4096), (10, 6 * 4096)]);
        assert_eq!(p.header.to_header(), h);
    }

    /// Zero-page runs were accepted, so a file made of them (13 bytes each) made a restore push
    /// one entry per record: the heap ran out. They are refused.
    #[test]
    fn empty_runs_are_refused() {
        let h = header(16);
        let bytes = raw(&h, &[(0, 0, 0)]);
        assert_eq!(
            Snapshot::parse(&bytes).unwrap_err(),
            DecodeError::Limit("empty page run")
        );
        let many: Vec<(u64, u32, usize)> = (0..10_000).map(|_| (3, 0, 0)).collect();
        let mut calls = 0;
        assert!(Snapshot::visit(&raw(&h, &many), |_, _| calls += 1).is_err());
        assert_eq!(calls, 0);
    }

    #[test]
    fn runs_outside_ram_overlapping_or_overflowing_are_refused() {
        let h = header(16);
        for runs in [
            &[(15, 2, 2)][..],
            &[(16, 1, 1)],
            &[(4, 2, 2), (5, 1, 1)],
            &[(4, 1, 1), (3, 1, 1)],
            &[(u64::MAX, 1, 1)],
            &[(0, u32::MAX, 0)],
        ] {
            assert!(Snapshot::parse(&raw(&h, runs)).is_err(), "{runs:?}");
        }
    }

    /// `visit` used to call back for the runs before a bad one; now nothing is visited unless
    /// the whole snapshot is good.
    #[test]
    fn visit_calls_back_only_for_a_good_snapshot() {
        let h = header(16);
        let bytes = raw(&h, &[(0, 1, 1), (1, 1, 1), (0, 1, 1)]);
        let mut calls = 0;
        assert!(Snapshot::visit(&bytes, |_, _| calls += 1).is_err());
        assert_eq!(calls, 0);
    }

    #[test]
    fn header_limits() {
        let mut h = header(16);
        h.name = "n".repeat(MAX_NAME_BYTES + 1);
        assert!(Snapshot::parse(&raw(&h, &[])).is_err());
        h.name = "n".repeat(MAX_NAME_BYTES);
        assert!(Snapshot::parse(&raw(&h, &[])).is_ok());
        let mut h = header(16);
        h.cmdline = "c".repeat(MAX_CMDLINE_BYTES + 1);
        assert!(Snapshot::parse(&raw(&h, &[])).is_err());
        let mut h = header(16);
        h.state = vec![0; MAX_STATE_BYTES + 1];
        assert_eq!(
            Snapshot::parse(&raw(&h, &[])).unwrap_err(),
            DecodeError::Limit("snapshot state too large")
        );
    }

    #[test]
    fn bytes_after_the_end_marker_are_refused() {
        let h = header(16);
        let mut bytes = Vec::new();
        h.encode(&mut bytes);
        bytes.push(0);
        bytes.push(7);
        let mut c = Crc32::new();
        c.update(&bytes);
        let crc = c.finish();
        bytes.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Snapshot::parse(&bytes).unwrap_err(),
            DecodeError::TrailingBytes(1)
        );
    }
}
