//! Physical frame allocator with per-frame reference counts.
//!
//! [`FrameAllocator`] manages the 4 KiB frames of one physical span `[base, base + n * 4 KiB)`.
//! QEMU `virt` has one RAM range, so one span covers it; frames of the span that are not real RAM
//! (or that hold the monitor image, the DTB, the heap) stay *reserved* and are never handed out.
//!
//! Every frame is in exactly one of three states:
//!
//! | state     | free bitmap bit | `refcount` slot      |
//! |-----------|-----------------|----------------------|
//! | reserved  | 0               | [`RESERVED`] sentinel |
//! | free      | 1               | 0                    |
//! | allocated | 0               | 1 ..= [`MAX_REFCOUNT`] |
//!
//! An allocated frame's reference count says how many holders share it (for stage 2: how many
//! tables point at a data frame, how many entries point at a table page). [`FrameAllocator::get`]
//! takes another reference, [`FrameAllocator::put`] drops one and frees the frame when the last
//! goes. Every misuse (unaligned, outside the span, reserved, double free, overflow) is an error,
//! never a panic.
//!
//! Allocation is next-fit: a hint remembers the bitmap word of the last allocation, and the
//! search resumes there, so a run of allocations costs O(1) amortised.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::addr::{PhysAddr, PAGE_SHIFT, PAGE_SIZE};

/// Refcount-slot sentinel of a reserved frame (never handed out, never counted as RAM).
pub const RESERVED: u32 = u32::MAX;
/// Highest reference count a frame can carry; one more [`FrameAllocator::get`] is
/// [`FrameError::RefcountOverflow`].
pub const MAX_REFCOUNT: u32 = u32::MAX - 1;

/// Why a frame-allocator call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// No free frame (or no free run of the requested length and alignment) is left.
    OutOfMemory,
    /// The address is not 4 KiB aligned.
    Unaligned,
    /// The address (or part of the range) lies outside the managed span.
    OutOfRange,
    /// The frame is free: `get`/`put` on it is a use-after-free or a double free.
    NotAllocated,
    /// The frame is reserved (not RAM, or owned by the monitor) and has no reference count.
    Reserved,
    /// The frame already carries [`MAX_REFCOUNT`] references.
    RefcountOverflow,
    /// `add_free`/`reserve` covered a frame that is allocated right now.
    InUse,
    /// A zero count or zero alignment was asked of `alloc_contiguous`, or `start > end`.
    InvalidArgument,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            FrameError::OutOfMemory => "out of physical frames",
            FrameError::Unaligned => "physical address is not 4 KiB aligned",
            FrameError::OutOfRange => "physical address outside the managed span",
            FrameError::NotAllocated => "frame is not allocated (double free or use after free)",
            FrameError::Reserved => "frame is reserved",
            FrameError::RefcountOverflow => "frame reference count overflow",
            FrameError::InUse => "range covers an allocated frame",
            FrameError::InvalidArgument => "invalid count, alignment or range",
        };
        f.write_str(s)
    }
}

/// Reference-counted allocator of the 4 KiB frames of one physical span.
#[derive(Clone, Debug)]
pub struct FrameAllocator {
    /// Physical address of frame 0 of the span.
    base: PhysAddr,
    /// One bit per frame, set when the frame is free.
    free: Vec<u64>,
    /// Per-frame reference count (0 free, [`RESERVED`] reserved).
    refcount: Vec<u32>,
    /// Number of free frames.
    nr_free: usize,
    /// Number of allocated frames (refcount >= 1).
    nr_used: usize,
    /// Bitmap word where the next `alloc` starts looking.
    hint: usize,
}

impl FrameAllocator {
    /// A manager for `frames` frames starting at `base` (rounded down to 4 KiB), all of them
    /// reserved. Mark RAM with [`add_free`](Self::add_free).
    pub fn new(base: PhysAddr, frames: usize) -> Self {
        FrameAllocator {
            base: base.page_base(),
            free: vec![0; frames.div_ceil(64)],
            refcount: vec![RESERVED; frames],
            nr_free: 0,
            nr_used: 0,
            hint: 0,
        }
    }

    /// Start of the managed span.
    pub fn base(&self) -> PhysAddr {
        self.base
    }

    /// End (exclusive) of the managed span.
    pub fn end(&self) -> PhysAddr {
        PhysAddr(self.base.0 + (self.refcount.len() as u64) * PAGE_SIZE)
    }

    /// Frames in the span, reserved ones included.
    pub fn span_frames(&self) -> usize {
        self.refcount.len()
    }

    /// Managed RAM frames: free plus allocated (reserved frames are not counted).
    pub fn total_frames(&self) -> usize {
        self.nr_free + self.nr_used
    }

    /// Frames free right now.
    pub fn free_frames(&self) -> usize {
        self.nr_free
    }

    /// Frames allocated right now (refcount >= 1).
    pub fn used_frames(&self) -> usize {
        self.nr_used
    }

    /// Marks the RAM in `[start, end)` free, rounding inward to whole frames. Frames already free
    /// stay free. Changes nothing and fails if any frame of the range is outside the span or
    /// allocated.
    pub fn add_free(&mut self, start: PhysAddr, end: PhysAddr) -> Result<(), FrameError> {
        if start > end {
            return Err(FrameError::InvalidArgument);
        }
        let first = start.0.div_ceil(PAGE_SIZE);
        let last = end.0 / PAGE_SIZE; // exclusive, in frame numbers
        if first >= last {
            return Ok(());
        }
        let (a, b) = self.frame_range(first, last)?;
        if self.refcount[a..b].iter().any(|&r| r != 0 && r != RESERVED) {
            return Err(FrameError::InUse);
        }
        for i in a..b {
            if self.refcount[i] == RESERVED {
                self.refcount[i] = 0;
                self.set_free_bit(i);
                self.nr_free += 1;
            }
        }
        Ok(())
    }

    /// Marks `[start, end)` reserved, rounding outward to whole frames (the monitor image, the
    /// DTB, the heap). Frames already reserved stay reserved. Changes nothing and fails if any
    /// frame of the range is outside the span or allocated.
    pub fn reserve(&mut self, start: PhysAddr, end: PhysAddr) -> Result<(), FrameError> {
        if start > end {
            return Err(FrameError::InvalidArgument);
        }
        let first = start.0 / PAGE_SIZE;
        let last = end.0.div_ceil(PAGE_SIZE);
        if first >= last {
            return Ok(());
        }
        let (a, b) = self.frame_range(first, last)?;
        if self.refcount[a..b].iter().any(|&r| r != 0 && r != RESERVED) {
            return Err(FrameError::InUse);
        }
        for i in a..b {
            if self.refcount[i] == 0 {
                self.refcount[i] = RESERVED;
                self.clear_free_bit(i);
                self.nr_free -= 1;
            }
        }
        Ok(())
    }

    /// Allocates one frame with reference count 1. Next-fit from the hint.
    pub fn alloc(&mut self) -> Result<PhysAddr, FrameError> {
        let words = self.free.len();
        if self.nr_free == 0 || words == 0 {
            return Err(FrameError::OutOfMemory);
        }
        for step in 0..words {
            let w = (self.hint + step) % words;
            let bits = self.free[w];
            if bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                self.hint = w;
                self.take(i);
                return Ok(self.addr_of(i));
            }
        }
        // nr_free > 0 but no bit set would be an internal inconsistency; report it as exhaustion
        // rather than panicking.
        Err(FrameError::OutOfMemory)
    }

    /// Allocates `count` physically contiguous frames whose first frame number is a multiple of
    /// `align_frames` (both counted in frames), each with reference count 1. Returns the first.
    pub fn alloc_contiguous(
        &mut self,
        count: usize,
        align_frames: usize,
    ) -> Result<PhysAddr, FrameError> {
        if count == 0 || align_frames == 0 {
            return Err(FrameError::InvalidArgument);
        }
        if count > self.nr_free {
            return Err(FrameError::OutOfMemory);
        }
        let n = self.refcount.len();
        let base_pfn = self.base.0 >> PAGE_SHIFT;
        let align = align_frames as u64;
        // First index i >= from with (base_pfn + i) % align == 0.
        let aligned_from = |from: usize| -> usize {
            let pfn = base_pfn + from as u64;
            let up = pfn.div_ceil(align) * align;
            (up - base_pfn) as usize
        };
        let mut i = aligned_from(0);
        while i.checked_add(count).is_some_and(|e| e <= n) {
            match (i..i + count).find(|&j| !self.is_free(j)) {
                None => {
                    for j in i..i + count {
                        self.take(j);
                    }
                    return Ok(self.addr_of(i));
                }
                Some(busy) => i = aligned_from(busy + 1),
            }
        }
        Err(FrameError::OutOfMemory)
    }

    /// Takes another reference to an allocated frame; returns the new count.
    pub fn get(&mut self, pa: PhysAddr) -> Result<u32, FrameError> {
        let i = self.allocated_index(pa)?;
        if self.refcount[i] >= MAX_REFCOUNT {
            return Err(FrameError::RefcountOverflow);
        }
        self.refcount[i] += 1;
        Ok(self.refcount[i])
    }

    /// Drops one reference to an allocated frame; returns true when that was the last one and
    /// the frame is free again.
    pub fn put(&mut self, pa: PhysAddr) -> Result<bool, FrameError> {
        let i = self.allocated_index(pa)?;
        self.refcount[i] -= 1;
        if self.refcount[i] == 0 {
            self.set_free_bit(i);
            self.nr_used -= 1;
            self.nr_free += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Reference count of the frame at `pa`: 0 when free, reserved, unaligned or outside the span.
    pub fn refcount(&self, pa: PhysAddr) -> u32 {
        match self.index_of(pa) {
            Ok(i) if self.refcount[i] != RESERVED => self.refcount[i],
            _ => 0,
        }
    }

    /// True when `pa` is a frame of the span that is allocated.
    pub fn is_allocated(&self, pa: PhysAddr) -> bool {
        self.refcount(pa) > 0
    }

    /// Free bitmap and per-frame reference counts, to compare allocator states in tests.
    #[cfg(test)]
    pub(crate) fn state(&self) -> (Vec<u64>, Vec<u32>, usize, usize) {
        (
            self.free.clone(),
            self.refcount.clone(),
            self.nr_free,
            self.nr_used,
        )
    }

    /// Forces a frame's reference count (tests of the overflow path only).
    #[cfg(test)]
    pub(crate) fn force_refcount(&mut self, pa: PhysAddr, count: u32) {
        if let Ok(i) = self.allocated_index(pa) {
            self.refcount[i] = count;
        }
    }

    fn frame_range(&self, first: u64, last: u64) -> Result<(usize, usize), FrameError> {
        let base_pfn = self.base.0 >> PAGE_SHIFT;
        let n = self.refcount.len() as u64;
        if first < base_pfn || last - base_pfn > n {
            return Err(FrameError::OutOfRange);
        }
        Ok(((first - base_pfn) as usize, (last - base_pfn) as usize))
    }

    fn index_of(&self, pa: PhysAddr) -> Result<usize, FrameError> {
        if !pa.is_page_aligned() {
            return Err(FrameError::Unaligned);
        }
        if pa < self.base {
            return Err(FrameError::OutOfRange);
        }
        let i = (pa.0 - self.base.0) >> PAGE_SHIFT;
        if i >= self.refcount.len() as u64 {
            return Err(FrameError::OutOfRange);
        }
        Ok(i as usize)
    }

    fn allocated_index(&self, pa: PhysAddr) -> Result<usize, FrameError> {
        let i = self.index_of(pa)?;
        match self.refcount[i] {
            RESERVED => Err(FrameError::Reserved),
            0 => Err(FrameError::NotAllocated),
            _ => Ok(i),
        }
    }

    fn addr_of(&self, i: usize) -> PhysAddr {
        PhysAddr(self.base.0 + ((i as u64) << PAGE_SHIFT))
    }

    fn is_free(&self, i: usize) -> bool {
        self.free[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_free_bit(&mut self, i: usize) {
        self.free[i / 64] |= 1 << (i % 64);
    }

    fn clear_free_bit(&mut self, i: usize) {
        self.free[i / 64] &= !(1 << (i % 64));
    }

    /// Free frame `i` -> allocated with refcount 1.
    fn take(&mut self, i: usize) {
        self.clear_free_bit(i);
        self.refcount[i] = 1;
        self.nr_free -= 1;
        self.nr_used += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    const BASE: u64 = 0x4000_0000;

    fn pa(frame: u64) -> PhysAddr {
        PhysAddr(BASE + frame * PAGE_SIZE)
    }

    fn ram(frames: usize) -> FrameAllocator {
        let mut a = FrameAllocator::new(PhysAddr(BASE), frames);
        a.add_free(pa(0), pa(frames as u64)).unwrap();
        a
    }

    #[test]
    fn starts_reserved_then_add_free_rounds_inward() {
        let mut a = FrameAllocator::new(PhysAddr(BASE), 16);
        assert_eq!(a.total_frames(), 0);
        assert_eq!(a.alloc(), Err(FrameError::OutOfMemory));
        // [frame 1 + 1 byte, frame 5 + 1 byte) rounds inward to frames 2..5.
        a.add_free(PhysAddr(pa(1).0 + 1), PhysAddr(pa(5).0 + 1))
            .unwrap();
        assert_eq!(a.free_frames(), 3);
        assert_eq!(a.total_frames(), 3);
        let got: BTreeSet<_> = (0..3).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(got, [pa(2), pa(3), pa(4)].into_iter().collect());
        assert_eq!(a.alloc(), Err(FrameError::OutOfMemory));
        // A range inside one frame rounds to nothing.
        a.add_free(PhysAddr(pa(8).0 + 1), PhysAddr(pa(8).0 + 100))
            .unwrap();
        assert_eq!(a.free_frames(), 0);
    }

    #[test]
    fn reserve_rounds_outward_and_refuses_allocated() {
        let mut a = ram(16);
        a.reserve(PhysAddr(pa(3).0 + 5), PhysAddr(pa(5).0 + 1))
            .unwrap();
        assert_eq!(a.free_frames(), 13); // frames 3, 4, 5 reserved
        assert_eq!(a.get(pa(4)), Err(FrameError::Reserved));
        assert_eq!(a.put(pa(5)), Err(FrameError::Reserved));
        let f = a.alloc().unwrap();
        assert_eq!(a.reserve(f, PhysAddr(f.0 + 1)), Err(FrameError::InUse));
        assert_eq!(
            a.add_free(f, PhysAddr(f.0 + PAGE_SIZE)),
            Err(FrameError::InUse)
        );
        assert_eq!(a.reserve(pa(15), pa(17)), Err(FrameError::OutOfRange));
        assert_eq!(a.add_free(PhysAddr(0), pa(1)), Err(FrameError::OutOfRange));
        assert_eq!(a.reserve(pa(2), pa(1)), Err(FrameError::InvalidArgument));
        assert_eq!(a.free_frames(), 12);
    }

    #[test]
    fn refcounts_share_and_free() {
        let mut a = ram(4);
        let f = a.alloc().unwrap();
        assert_eq!(a.refcount(f), 1);
        assert_eq!(a.get(f), Ok(2));
        assert_eq!(a.put(f), Ok(false));
        assert_eq!(a.put(f), Ok(true));
        assert_eq!(a.put(f), Err(FrameError::NotAllocated));
        assert_eq!(a.get(f), Err(FrameError::NotAllocated));
        assert_eq!(a.get(PhysAddr(f.0 + 8)), Err(FrameError::Unaligned));
        assert_eq!(a.get(pa(4)), Err(FrameError::OutOfRange));
        assert_eq!(a.put(PhysAddr(0)), Err(FrameError::OutOfRange));
        assert_eq!(a.free_frames(), 4);
    }

    #[test]
    fn refcount_overflow_is_an_error() {
        let mut a = ram(2);
        let f = a.alloc().unwrap();
        a.force_refcount(f, MAX_REFCOUNT);
        assert_eq!(a.get(f), Err(FrameError::RefcountOverflow));
        assert_eq!(a.refcount(f), MAX_REFCOUNT);
        assert_eq!(a.put(f), Ok(false));
    }

    #[test]
    fn contiguous_respects_alignment_and_holes() {
        let mut a = ram(64);
        let _hole = a.alloc().unwrap(); // frame 0
        let r = a.alloc_contiguous(8, 8).unwrap();
        assert_eq!(r, pa(8));
        let r2 = a.alloc_contiguous(3, 1).unwrap();
        assert_eq!(r2, pa(1));
        let before = a.state();
        assert_eq!(a.alloc_contiguous(64, 1), Err(FrameError::OutOfMemory));
        assert_eq!(a.alloc_contiguous(40, 32), Err(FrameError::OutOfMemory));
        assert_eq!(a.state(), before, "a failed allocation changes nothing");
        assert_eq!(a.alloc_contiguous(0, 1), Err(FrameError::InvalidArgument));
        assert_eq!(a.alloc_contiguous(1, 0), Err(FrameError::InvalidArgument));
        assert_eq!(a.used_frames(), 12);
        // Alignment is of the physical frame number, not of the index in the span.
        let mut b = FrameAllocator::new(PhysAddr(0x1000), 32);
        b.add_free(PhysAddr(0x1000), PhysAddr(0x21000)).unwrap();
        assert_eq!(b.alloc_contiguous(2, 4), Ok(PhysAddr(0x4000)));
    }

    #[test]
    fn next_fit_wraps_around() {
        let mut a = ram(130);
        let all: Vec<_> = (0..130).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(a.alloc(), Err(FrameError::OutOfMemory));
        a.put(all[3]).unwrap();
        assert_eq!(a.alloc(), Ok(all[3]));
        a.put(all[129]).unwrap();
        assert_eq!(a.alloc(), Ok(all[129]));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc,
        Contig(usize, usize),
        Get(usize),
        Put(usize),
        BadAddr(u64),
        Reserve(u64, u64),
        AddFree(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Alloc),
            1 => (1usize..6, prop_oneof![Just(1usize), Just(2), Just(4), Just(8)])
                .prop_map(|(c, a)| Op::Contig(c, a)),
            3 => any::<usize>().prop_map(Op::Get),
            5 => any::<usize>().prop_map(Op::Put),
            1 => any::<u64>().prop_map(Op::BadAddr),
            1 => (0u64..(100 * PAGE_SIZE), 0u64..(3 * PAGE_SIZE)).prop_map(|(s, l)| Op::Reserve(s, l)),
            1 => (0u64..(100 * PAGE_SIZE), 0u64..(3 * PAGE_SIZE)).prop_map(|(s, l)| Op::AddFree(s, l)),
        ]
    }

    /// Reference model: allocated frame -> refcount, the set of free frames, reserved = the rest.
    struct Model {
        refs: HashMap<u64, u32>,
        free: BTreeSet<u64>,
        frames: u64,
    }

    impl Model {
        fn check(&self, a: &FrameAllocator) {
            assert_eq!(a.free_frames(), self.free.len());
            assert_eq!(a.used_frames(), self.refs.len());
            assert_eq!(a.total_frames(), self.free.len() + self.refs.len());
            for f in 0..self.frames {
                let want = self.refs.get(&f).copied().unwrap_or(0);
                assert_eq!(a.refcount(pa(f)), want, "frame {f}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn matches_reference_model(ops in proptest::collection::vec(op(), 1..300)) {
            const N: u64 = 100;
            let mut a = FrameAllocator::new(PhysAddr(BASE), N as usize);
            // RAM is frames 0..90; 90..100 stay reserved ("not RAM").
            a.add_free(pa(0), pa(90)).unwrap();
            let mut m = Model { refs: HashMap::new(), free: (0..90).collect(), frames: N };
            // Allocated frames in allocation order, to pick get/put targets from.
            let mut live: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc => match a.alloc() {
                        Ok(p) => {
                            let f = (p.0 - BASE) / PAGE_SIZE;
                            prop_assert!(m.free.remove(&f), "handed out non-free frame {}", f);
                            m.refs.insert(f, 1);
                            live.push(f);
                        }
                        Err(e) => {
                            prop_assert_eq!(e, FrameError::OutOfMemory);
                            prop_assert!(m.free.is_empty());
                        }
                    },
                    Op::Contig(c, al) => match a.alloc_contiguous(c, al) {
                        Ok(p) => {
                            let f = (p.0 - BASE) / PAGE_SIZE;
                            prop_assert!((p.0 / PAGE_SIZE).is_multiple_of(al as u64));
                            for g in f..f + c as u64 {
                                prop_assert!(m.free.remove(&g), "contig handed out busy {}", g);
                                m.refs.insert(g, 1);
                                live.push(g);
                            }
                        }
                        Err(e) => {
                            prop_assert_eq!(e, FrameError::OutOfMemory);
                            // The model agrees that no aligned free run exists.
                            let exists = (0..N).any(|s| (BASE / PAGE_SIZE + s).is_multiple_of(al as u64)
                                && s + c as u64 <= N
                                && (s..s + c as u64).all(|g| m.free.contains(&g)));
                            prop_assert!(!exists);
                        }
                    },
                    Op::Get(i) | Op::Put(i) if live.is_empty() => {
                        // Exercise the double-free path on a frame that is free or reserved.
                        let f = (i as u64) % N;
                        let want = if m.free.contains(&f) {
                            FrameError::NotAllocated
                        } else {
                            FrameError::Reserved
                        };
                        prop_assert_eq!(a.put(pa(f)), Err(want));
                    }
                    Op::Get(i) => {
                        let f = live[i % live.len()];
                        let r = m.refs.get_mut(&f).unwrap();
                        *r += 1;
                        prop_assert_eq!(a.get(pa(f)), Ok(*r));
                    }
                    Op::Put(i) => {
                        let k = i % live.len();
                        let f = live[k];
                        let r = m.refs.get_mut(&f).unwrap();
                        *r -= 1;
                        let freed = *r == 0;
                        if freed {
                            m.refs.remove(&f);
                            m.free.insert(f);
                            live.swap_remove(k);
                        }
                        prop_assert_eq!(a.put(pa(f)), Ok(freed));
                    }
                    Op::BadAddr(x) => {
                        let p = PhysAddr(x);
                        let e = a.get(p);
                        let f = x.wrapping_sub(BASE) / PAGE_SIZE;
                        if x % PAGE_SIZE != 0 {
                            prop_assert_eq!(e, Err(FrameError::Unaligned));
                        } else if x < BASE || f >= N {
                            prop_assert_eq!(e, Err(FrameError::OutOfRange));
                        } else if m.free.contains(&f) {
                            prop_assert_eq!(e, Err(FrameError::NotAllocated));
                        } else if m.refs.contains_key(&f) {
                            // A valid get: undo it so the model stays right.
                            prop_assert!(e.is_ok());
                            prop_assert_eq!(a.put(p), Ok(false));
                        } else {
                            prop_assert_eq!(e, Err(FrameError::Reserved));
                        }
                    }
                    Op::Reserve(s, l) => {
                        let (s, e) = (BASE + s, BASE + s + l);
                        let (f0, f1) = (s / PAGE_SIZE - BASE / PAGE_SIZE, e.div_ceil(PAGE_SIZE) - BASE / PAGE_SIZE);
                        let r = a.reserve(PhysAddr(s), PhysAddr(e));
                        if f0 >= f1 {
                            prop_assert_eq!(r, Ok(()));
                        } else if f1 > N {
                            prop_assert_eq!(r, Err(FrameError::OutOfRange));
                        } else if (f0..f1).any(|f| m.refs.contains_key(&f)) {
                            prop_assert_eq!(r, Err(FrameError::InUse));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            for f in f0..f1 {
                                m.free.remove(&f);
                            }
                        }
                    }
                    Op::AddFree(s, l) => {
                        let (s, e) = (BASE + s, BASE + s + l);
                        let (f0, f1) = (s.div_ceil(PAGE_SIZE) - BASE / PAGE_SIZE, e / PAGE_SIZE - BASE / PAGE_SIZE);
                        let r = a.add_free(PhysAddr(s), PhysAddr(e));
                        if f0 >= f1 {
                            prop_assert_eq!(r, Ok(()));
                        } else if f1 > N {
                            prop_assert_eq!(r, Err(FrameError::OutOfRange));
                        } else if (f0..f1).any(|f| m.refs.contains_key(&f)) {
                            prop_assert_eq!(r, Err(FrameError::InUse));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            for f in f0..f1 {
                                m.free.insert(f);
                            }
                        }
                    }
                }
                m.check(&a);
            }
            // Returning every reference frees everything that was RAM.
            for f in live {
                let r = m.refs[&f];
                for k in 0..r {
                    prop_assert_eq!(a.put(pa(f)), Ok(k + 1 == r));
                }
            }
            prop_assert_eq!(a.used_frames(), 0);
        }
    }
}
