//! Access to physical memory, abstracted so that the stage-2 code runs unchanged on the host and
//! at EL2.
//!
//! At EL2 the monitor implements [`PhysMem`] over its identity map of RAM (a descriptor write is a
//! volatile 64-bit store to the table page). On the host, [`FakePhysMem`] keeps frames in a sparse
//! map and counts descriptor writes, frame copies and frame zeroings so tests can show what an
//! operation cost.
//!
//! All addresses are real physical addresses of frames handed out by
//! [`FrameAllocator`](crate::frame::FrameAllocator). Byte accesses ([`PhysMem::read`],
//! [`PhysMem::write`]) never cross a 4 KiB frame boundary; the callers split them.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;

use crate::addr::{PhysAddr, PAGE_SIZE};

/// Entries in one translation table (4 KiB granule, 8-byte descriptors).
pub const TABLE_ENTRIES: usize = 512;

/// Physical memory as the stage-2 code sees it.
pub trait PhysMem {
    /// Reads descriptor `index` (0..512) of the translation table at `table`.
    fn read_desc(&self, table: PhysAddr, index: usize) -> u64;
    /// Writes descriptor `index` of the table at `table` as one single-copy-atomic 64-bit store.
    /// Only `stage2`'s one descriptor-writing function calls this.
    fn write_desc(&mut self, table: PhysAddr, index: usize, desc: u64);
    /// Fills the frame at `pa` with zeros.
    fn zero_frame(&mut self, pa: PhysAddr);
    /// Copies the 4 KiB frame at `src` to the frame at `dst`.
    fn copy_frame(&mut self, dst: PhysAddr, src: PhysAddr);
    /// Reads `buf.len()` bytes at `pa`; the span stays inside one frame.
    fn read(&self, pa: PhysAddr, buf: &mut [u8]);
    /// Writes `buf` at `pa`; the span stays inside one frame.
    fn write(&mut self, pa: PhysAddr, buf: &[u8]);
}

type Frame = Box<[u8; PAGE_SIZE as usize]>;

/// Host stand-in for physical memory: a sparse map from frame address to 4 KiB of bytes. A frame
/// never written (or last zeroed) is absent and reads as zeros, so a "1 GiB VM" of zeroed frames
/// costs no host memory. Counts the operations the stage-2 code performs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakePhysMem {
    frames: BTreeMap<u64, Frame>,
    /// Descriptor writes ([`PhysMem::write_desc`]) so far.
    pub desc_writes: u64,
    /// Frame copies ([`PhysMem::copy_frame`]) so far.
    pub frame_copies: u64,
    /// Frame zeroings ([`PhysMem::zero_frame`]) so far.
    pub frame_zeroes: u64,
}

impl FakePhysMem {
    /// Empty memory (everything reads as zero).
    pub fn new() -> Self {
        Self::default()
    }

    /// Resets the operation counters to zero.
    pub fn reset_counters(&mut self) {
        self.desc_writes = 0;
        self.frame_copies = 0;
        self.frame_zeroes = 0;
    }

    /// The contents of memory only (counters ignored), for before/after comparisons.
    pub fn same_contents(&self, other: &Self) -> bool {
        // Absent and all-zero frames are equal.
        let zero = |f: &Frame| f.iter().all(|&b| b == 0);
        self.frames
            .iter()
            .all(|(k, f)| other.frames.get(k).map_or(zero(f), |g| g == f))
            && other
                .frames
                .iter()
                .all(|(k, g)| self.frames.contains_key(k) || zero(g))
    }

    fn frame_mut(&mut self, pa: PhysAddr) -> &mut Frame {
        self.frames
            .entry(pa.page_base().0)
            .or_insert_with(|| Box::new([0; PAGE_SIZE as usize]))
    }

    fn span(pa: PhysAddr, len: usize) -> (u64, usize) {
        let off = pa.page_offset() as usize;
        // Clamp to the frame: a caller bug must not panic the host fake.
        let end = (off + len).min(PAGE_SIZE as usize);
        (pa.page_base().0, end)
    }
}

impl PhysMem for FakePhysMem {
    fn read_desc(&self, table: PhysAddr, index: usize) -> u64 {
        let i = (index % TABLE_ENTRIES) * 8;
        self.frames.get(&table.page_base().0).map_or(0, |f| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&f[i..i + 8]);
            u64::from_le_bytes(b)
        })
    }

    fn write_desc(&mut self, table: PhysAddr, index: usize, desc: u64) {
        self.desc_writes += 1;
        let i = (index % TABLE_ENTRIES) * 8;
        self.frame_mut(table)[i..i + 8].copy_from_slice(&desc.to_le_bytes());
    }

    fn zero_frame(&mut self, pa: PhysAddr) {
        self.frame_zeroes += 1;
        self.frames.remove(&pa.page_base().0);
    }

    fn copy_frame(&mut self, dst: PhysAddr, src: PhysAddr) {
        self.frame_copies += 1;
        match self.frames.get(&src.page_base().0).cloned() {
            Some(f) => {
                self.frames.insert(dst.page_base().0, f);
            }
            None => {
                self.frames.remove(&dst.page_base().0);
            }
        }
    }

    fn read(&self, pa: PhysAddr, buf: &mut [u8]) {
        let (base, end) = Self::span(pa, buf.len());
        let off = pa.page_offset() as usize;
        let n = end - off;
        match self.frames.get(&base) {
            Some(f) => buf[..n].copy_from_slice(&f[off..end]),
            None => buf[..n].fill(0),
        }
    }

    fn write(&mut self, pa: PhysAddr, buf: &[u8]) {
        let (_, end) = Self::span(pa, buf.len());
        let off = pa.page_offset() as usize;
        let n = end - off;
        self.frame_mut(pa)[off..end].copy_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_memory_roundtrip_and_counters() {
        let mut m = FakePhysMem::new();
        let t = PhysAddr(0x4000_0000);
        assert_eq!(m.read_desc(t, 3), 0);
        m.write_desc(t, 3, 0xdead_beef_0000_0003);
        assert_eq!(m.read_desc(t, 3), 0xdead_beef_0000_0003);
        m.write(PhysAddr(0x4000_1ffe), b"abcd"); // clamped to the frame: writes "ab"
        let mut b = [9u8; 4];
        m.read(PhysAddr(0x4000_1ffe), &mut b);
        assert_eq!(&b[..2], b"ab");
        m.copy_frame(PhysAddr(0x4000_2000), PhysAddr(0x4000_1000));
        let mut c = [0u8; 2];
        m.read(PhysAddr(0x4000_2ffe), &mut c);
        assert_eq!(&c, b"ab");
        m.zero_frame(PhysAddr(0x4000_2000));
        m.read(PhysAddr(0x4000_2ffe), &mut c);
        assert_eq!(c, [0, 0]);
        assert_eq!((m.desc_writes, m.frame_copies, m.frame_zeroes), (1, 1, 1));
        let mut z = FakePhysMem::new();
        z.write(PhysAddr(0x5000), &[0; 8]);
        assert!(z.same_contents(&FakePhysMem::new()));
        assert!(!m.same_contents(&FakePhysMem::new()));
    }
}
