//! Stage-2 translation tables with lazy-copy fork and copy-on-write.
//!
//! # Format
//! VMSAv8-64 stage 2, 4 KiB granule, 39-bit IPA (VTCR_EL2.T0SZ = 25, SL0 = 0b01): the walk
//! starts at level 1, one 4 KiB root table of 512 entries of 1 GiB each; levels 1 and 2 hold
//! table descriptors, level 3 holds 4 KiB page descriptors (no blocks). See [`desc`] for the
//! bits, including the software bits: COW (55), marker (56), unmanaged (57).
//!
//! # Reference counts ([`FrameAllocator`])
//! * a data frame's count = number of level-3 *tables* with a leaf pointing at it;
//! * a level-2/level-3 table's count = number of entries pointing at it (valid table entries and
//!   markers, in every VM's tables and in every [`ForkPoint`]);
//! * a root table has count 1, held by its [`Stage2`].
//!
//! # Invariant
//! The hardware only walks tables private to that VM: every table reached from a root through
//! valid entries has count 1, and every leaf in it whose frame has count > 1 is read-only with the
//! COW bit. A possibly shared table is reached only through an *invalid* marker entry (bit 0 = 0,
//! bit 56 = 1, table address in bits 47:12), so the hardware faults there and software decides.
//!
//! # Fork (lazy table copy, "On-demand fork")
//! [`Stage2::fork`] turns every valid root entry of the parent into a marker and gives the child
//! (and a [`ForkPoint`], kept so the child can be [`reset`](Stage2::reset)) markers to the same
//! level-2 tables, one reference each. It touches nothing below the root: its cost is O(valid root
//! entries), the same for a 16 MiB and a 1 GiB guest. The parent's VMID is flushed once.
//!
//! ```text
//! Before fork: VM A (VMID 1) alone; the hardware walks root -> L2 -> L3 -> frames.
//!   T = valid table entry, M = marker (invalid, bit 56), P = page leaf, (n) = refcount
//!
//!   A.root[1] --T--> L2 (1) [0] --T--> L3 (1) [0] --P rw--> f0 (1)
//!                                             [1] --P rw--> f1 (1)
//!
//! After A.fork() -> child B (VMID 2) + fork point FP. Only root entries change:
//!
//!   A.root[1] --M--.
//!   B.root[1] --M--+--> L2 (3) [0] --T--> L3 (1) [0] --P rw--> f0 (1)
//!   FP    [1] --M--'                            [1] --P rw--> f1 (1)
//!   (L2 and below are reached only through markers: nobody's hardware walks them, so the
//!    valid-looking entries and rw leaves inside are harmless.)
//!
//! B writes f0's page: translation fault at B.root[1] (a marker). handle_fault unshares down
//! the path, one table per level:
//!   L2 has count 3 > 1: copy it to L2b; L2b's entries are markers, L3 gains a reference (2)
//!   L3 has count 2 > 1: copy it to L3b; L3b's leaves are ro+COW, f0, f1 gain one (2)
//!   leaf f0 is COW with count 2: copy f0 to f0', map it rw (break-before-make, flush_ipa(2)),
//!   drop f0's reference (1). The faulting instruction is re-run.
//!
//!   A.root[1] --M--.
//!   FP    [1] --M--+--> L2 (2) [0] --T--> L3 (1) [0] --P rw--------> f0  (1)
//!                                             [1] --P rw-----.
//!   B.root[1] --T--> L2b (1) [0] --T--> L3b (1) [0] --P rw----+---> f0' (1)
//!                                              [1] --P ro,COW-'--> f1  (2)
//! ```
//! Later, when a table's count is back to 1 (say FP was released and B copied L2), the last
//! holder *takes it over* instead of copying: table entries become markers and writable leaves
//! of shared frames become COW, then the entry is made valid. A COW leaf whose frame count is 1
//! is just made writable again.
//!
//! # Prepare, then commit
//! Every change is a walk run twice (see `walk`): a read-only plan counts the frames needed and
//! finds every error; the prepare step allocates exactly that many; the commit cannot fail for
//! lack of memory. An operation that returns OutOfMemory changed no table and no count.
//! (Reference counts are `u32`; a count cannot overflow while the span is under 32 GiB, since
//! each reference is an 8-byte descriptor; if one did, [`Stage2Error::Frame`] is returned.)
//!
//! # Break-before-make and TLB maintenance
//! All descriptor writes go through one function (`Walk::set_desc`), which applies the
//! architectural rule for each case and calls [`TlbOps`]; see its documentation.
//!
//! # Reset and teardown
//! [`Stage2::reset`] normally costs O(dirty pages): every copy-on-write copy (and monitor write)
//! made since the fork point is logged (table, index, old descriptor), and the reset puts those
//! leaves back to the fork point's frames (read-only, COW; break-before-make and a flush of each
//! IPA, or above `RESET_VMID_FLUSH_ABOVE` leaves all broken, one VMID-wide flush, all made) and
//! drops the private frames. The tables the VM copied since stay: apart from the logged
//! leaves they are equivalent to the fork point's (same frames, read-only/COW), and the fork
//! point's own tables cannot change while it holds them. When the log is not valid (the VM was
//! forked or snapshotted itself, so its tables are shared; or the log overflowed) the reset is
//! the full one: the root points back at the fork point's tables and the old tree's references
//! are dropped, O(private tables and their entries).
//! [`Stage2::destroy`] drops every reference of the VM; frames shared with other VMs survive.

pub mod desc;
pub mod tlb;
mod walk;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use alloc::vec::Vec;
use core::fmt;

use crate::addr::{Ipa, PhysAddr, PAGE_SIZE};
use crate::frame::{FrameAllocator, FrameError};
use crate::physmem::{PhysMem, TABLE_ENTRIES};
pub use desc::Perms;
pub use tlb::{FakeTlb, TlbEvent, TlbOps, Vmid};
use walk::{Intent, Stop, View, Walk};

/// IPA bits translated: 39 (VTCR_EL2.T0SZ = 64 - 39 = 25).
pub const IPA_BITS: u32 = 39;
/// First IPA past the translated range.
pub const IPA_LIMIT: u64 = 1 << IPA_BITS;

/// VTCR_EL2 for these tables: T0SZ = 25, SL0 = 0b01 (start at level 1), normal write-back
/// inner-shareable walks, TG0 = 4 KiB, PS = `ps` (the PARange of ID_AA64MMFR0_EL1), VS = 16-bit
/// VMIDs when `vmid16`. HA and HD stay 0: no hardware access-flag or dirty-state management.
pub const fn vtcr_el2(ps: u8, vmid16: bool) -> u64 {
    const RES1: u64 = 1 << 31;
    let t0sz = 64 - IPA_BITS as u64;
    let sl0 = 0b01 << 6;
    let irgn0 = 0b01 << 8;
    let orgn0 = 0b01 << 10;
    let sh0 = 0b11 << 12;
    let tg0 = 0b00 << 14;
    let ps = ((ps & 0b111) as u64) << 16;
    let vs = if vmid16 { 1 << 19 } else { 0 };
    RES1 | t0sz | sl0 | irgn0 | orgn0 | sh0 | tg0 | ps | vs
}

/// Everything the table code touches: frames, physical memory, TLB maintenance. Built by the
/// caller for each call (the monitor from its global allocator and identity map). Calls on VMs
/// that share frames must be serialised (one lock around the allocator and all `Stage2`s); the
/// VM whose tables change need not be stopped for `handle_fault`/`write_guest`/`map_*`, but must
/// be for `fork`, `snapshot`, `reset` and `destroy`.
pub struct MemCtx<'a, M: PhysMem, T: TlbOps> {
    /// The frame allocator all VMs share.
    pub frames: &'a mut FrameAllocator,
    /// Physical memory.
    pub mem: &'a mut M,
    /// TLB maintenance.
    pub tlb: &'a mut T,
}

/// Why a stage-2 operation failed. Nothing was changed unless the variant says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage2Error {
    /// Not enough free frames; nothing changed.
    OutOfMemory,
    /// The IPA (or a page of the range) is not mapped RAM.
    NotMapped(Ipa),
    /// `map_*` over a page that is already mapped.
    AlreadyMapped(Ipa),
    /// A guest write to a page that is read-only by policy.
    PermissionDenied(Ipa),
    /// An address or size is not 4 KiB aligned.
    Unaligned(Ipa),
    /// The range leaves the 39-bit IPA space or is empty.
    OutOfRange(Ipa),
    /// A descriptor or reference count contradicts the invariants (a bug; state may be partial).
    Corrupt(Ipa),
    /// The frame allocator refused a reference operation (a bug or a refcount overflow).
    Frame(FrameError),
}

impl fmt::Display for Stage2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage2Error::OutOfMemory => write!(f, "out of memory for stage-2 tables or frames"),
            Stage2Error::NotMapped(i) => write!(f, "IPA {i} is not mapped RAM"),
            Stage2Error::AlreadyMapped(i) => write!(f, "IPA {i} is already mapped"),
            Stage2Error::PermissionDenied(i) => write!(f, "IPA {i} is read-only"),
            Stage2Error::Unaligned(i) => write!(f, "IPA {i} or size is not 4 KiB aligned"),
            Stage2Error::OutOfRange(i) => write!(f, "IPA range at {i} is outside the IPA space"),
            Stage2Error::Corrupt(i) => write!(f, "stage-2 tables corrupt near IPA {i}"),
            Stage2Error::Frame(e) => write!(f, "frame reference error: {e}"),
        }
    }
}

impl From<Stop> for Stage2Error {
    fn from(s: Stop) -> Self {
        match s {
            Stop::NotMapped(i) => Stage2Error::NotMapped(i),
            Stop::AlreadyMapped(i) => Stage2Error::AlreadyMapped(i),
            Stop::Denied(i) => Stage2Error::PermissionDenied(i),
            Stop::Corrupt(i) => Stage2Error::Corrupt(i),
            Stop::Frame(e) => Stage2Error::Frame(e),
            Stop::PoolEmpty => Stage2Error::Corrupt(Ipa(0)),
        }
    }
}

/// What the caller of [`Stage2::handle_fault`] should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The mapping is fixed (or already was): re-run the faulting instruction, PC unchanged.
    Retry,
    /// Not RAM: emulate MMIO or inject an abort.
    NotMapped,
    /// A write to RAM that is read-only by policy: inject an abort.
    PermissionDenied,
    /// No memory to copy a table or frame; nothing changed. Pause the VM.
    OutOfMemory,
}

/// Counters of work done by one VM's tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stage2Stats {
    /// Frames copied because a write hit a shared frame.
    pub cow_copies: u64,
    /// COW leaves made writable in place because their frame was no longer shared.
    pub cow_reuses: u64,
    /// Tables copied because they were shared.
    pub table_copies: u64,
    /// Shared tables taken over in place because their last other holder had gone.
    pub table_takeovers: u64,
    /// Fresh RAM frames mapped by `map_ram`.
    pub frames_mapped: u64,
    /// RAM pages unmapped by `unmap`.
    pub pages_unmapped: u64,
}

impl Stage2Stats {
    fn add(&mut self, o: &Stage2Stats) {
        self.cow_copies += o.cow_copies;
        self.cow_reuses += o.cow_reuses;
        self.table_copies += o.table_copies;
        self.table_takeovers += o.table_takeovers;
        self.frames_mapped += o.frames_mapped;
        self.pages_unmapped += o.pages_unmapped;
    }
}

/// A memory census of one VM (see [`Stage2::usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// RAM pages mapped (device pages excluded).
    pub mapped_pages: usize,
    /// Mapped RAM pages whose frame no other VM or fork point can reach: the frame's count is 1
    /// and so is the count of every table on the path to it.
    pub private_frames: usize,
    /// `mapped_pages - private_frames`: pages whose frame is shared with someone.
    pub shared_frames: usize,
    /// Tables (root included) reached through counts of 1 only.
    pub private_tables: usize,
    /// Level-2/3 tables reached through a table with a count above 1 (shared).
    pub shared_tables: usize,
}

/// The result of a software walk ([`Stage2::translate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address `ipa` translates to.
    pub pa: PhysAddr,
    /// The leaf's permissions.
    pub perms: Perms,
    /// The leaf carries the COW bit (read-only until written).
    pub cow: bool,
    /// The leaf maps device memory (not reference counted).
    pub device: bool,
    /// The hardware can walk to this leaf (no marker on the path): no translation fault.
    pub hw_walkable: bool,
}

/// A frozen copy of a VM's root entries, holding one reference to each level-2 table, so that
/// VMs forked from it can be reset to it. Release it with [`ForkPoint::release`].
#[derive(Debug)]
#[must_use = "a ForkPoint holds table references; release it"]
pub struct ForkPoint {
    /// (root index, level-2 table) of every non-empty root entry.
    entries: Vec<(usize, PhysAddr)>,
    /// RAM pages mapped in it (the VM's count at the fork).
    mapped: u64,
}

impl ForkPoint {
    /// Drops the fork point's references, freeing whatever only it kept alive.
    pub fn release<M: PhysMem, T: TlbOps>(
        self,
        cx: &mut MemCtx<'_, M, T>,
    ) -> Result<(), Stage2Error> {
        for (_, t) in self.entries {
            walk::release(cx.frames, cx.mem, t, 2).map_err(Stage2Error::Frame)?;
        }
        Ok(())
    }

    /// The level-2 tables this fork point holds.
    pub fn tables(&self) -> impl Iterator<Item = PhysAddr> + '_ {
        self.entries.iter().map(|&(_, t)| t)
    }
}

/// One VM's stage-2 translation tables.
#[derive(Debug)]
#[must_use = "a Stage2 owns frames; tear it down with destroy()"]
pub struct Stage2 {
    root: PhysAddr,
    /// The VM's VMID of the current generation, `None` while it has none (it has never run,
    /// or lost it at a rollover): the VM table gives and takes it (`machine::table`).
    vmid: Option<Vmid>,
    stats: Stage2Stats,
    /// RAM pages mapped (device pages excluded), kept as the tables change: what a census would
    /// count as `mapped_pages`, without the walk.
    mapped: u64,
    /// The fork point the dirty log is relative to (`None`: no valid log, the next reset is a
    /// full one). Set when the tables are made from a fork point or fully reset to one; cleared
    /// when this VM is forked or snapshotted itself (its tables become shared) or the log
    /// overflows.
    dirty_base: Option<Vec<(usize, PhysAddr)>>,
    /// Leaves pointed at a private frame since `dirty_base`.
    dirty: Vec<walk::DirtyLeaf>,
}

/// Longest dirty log kept; past it the next reset is a full one (which is then no slower).
const DIRTY_LOG_LIMIT: usize = 1 << 16;

/// A dirty-log reset of more leaves than this breaks them all, flushes the VMID once and then
/// makes them, instead of a break-before-make with a TLBI by IPA for each (`reset_dirty`).
/// Under QEMU one TLBI by IPA and one VMID-wide flush cost the same few instructions, so any
/// threshold above 1 is as fast there; on hardware the VMID-wide flush also drops the VM's
/// translations for pages it did not dirty, which it then walks again, so small resets keep
/// flushing by IPA. 64 pages: the range past which Linux and KVM also stop issuing per-page
/// TLBIs on arm64 is of this order (a few dozen to 512 entries).
const RESET_VMID_FLUSH_ABOVE: usize = 64;

impl Stage2 {
    /// Empty tables for a VM with VMID `vmid` (or none yet): one zeroed root.
    pub fn new<M: PhysMem, T: TlbOps>(
        cx: &mut MemCtx<'_, M, T>,
        vmid: impl Into<Option<Vmid>>,
    ) -> Result<Self, Stage2Error> {
        let root = cx.frames.alloc().map_err(|_| Stage2Error::OutOfMemory)?;
        cx.mem.zero_frame(root);
        Ok(Stage2 {
            root,
            vmid: vmid.into(),
            stats: Stage2Stats::default(),
            mapped: 0,
            dirty_base: None,
            dirty: Vec::new(),
        })
    }

    /// Physical address of the level-1 root table (VTTBR_EL2.BADDR).
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// This VM's VMID of the current generation, if it has one.
    pub fn vmid(&self) -> Option<Vmid> {
        self.vmid
    }

    /// Gives this VM a VMID or takes it away. Only the VM table does this: a VMID given must
    /// hold no TLB entry (fresh, or flushed since its last VM had it), a VMID taken must be
    /// flushed before it is given again (`machine::table`, "VMIDs").
    pub fn set_vmid(&mut self, vmid: Option<Vmid>) {
        self.vmid = vmid;
    }

    /// VTTBR_EL2 for this VM: VMID in bits 63:48, root table address (CnP = 0). VMID 0 (never
    /// given to a VM) when it has none: a vCPU only runs once its VM has one.
    pub fn vttbr_el2(&self) -> u64 {
        ((self.vmid.map_or(0, |v| v.0) as u64) << 48) | self.root.0
    }

    /// Work counters since creation.
    pub fn stats(&self) -> Stage2Stats {
        self.stats
    }

    /// Maps `pages` fresh zeroed frames at `ipa` with `perms` (Normal WB, inner shareable). All
    /// or nothing: fails with nothing changed if a page is already mapped or memory runs out.
    pub fn map_ram<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        ipa: Ipa,
        pages: u64,
        perms: Perms,
    ) -> Result<(), Stage2Error> {
        let (s, e) = page_range(ipa, pages)?;
        self.run(cx, Intent::MapRam(perms), s, e)
    }

    /// Maps `size` bytes of device memory at `pa` to `ipa` (Device-nGnRE, execute-never, not
    /// reference counted, never COW: forks share it as is).
    pub fn map_device<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        ipa: Ipa,
        pa: PhysAddr,
        size: u64,
        perms: Perms,
    ) -> Result<(), Stage2Error> {
        if !pa.is_page_aligned() || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Stage2Error::Unaligned(ipa));
        }
        let (s, e) = page_range(ipa, size / PAGE_SIZE)?;
        let intent = Intent::MapDevice {
            ipa0: s,
            pa0: pa.0,
            perms,
        };
        self.run(cx, intent, s, e)
    }

    /// Unmaps `pages` pages at `ipa`, dropping each frame's reference (frames shared with other
    /// VMs survive). Unmapped pages in the range are skipped; emptied tables are kept. May need
    /// memory to unshare tables on the way (OutOfMemory changes nothing).
    pub fn unmap<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        ipa: Ipa,
        pages: u64,
    ) -> Result<(), Stage2Error> {
        let (s, e) = page_range(ipa, pages)?;
        self.run(cx, Intent::Unmap, s, e)
    }

    /// Plan, prepare, commit (module docs): the one driver of every table-changing walk.
    fn run<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        intent: Intent,
        s: u64,
        e: u64,
    ) -> Result<(), Stage2Error> {
        let mut w = Walk::new(cx, self.vmid, intent);
        w.visit(self.root, 1, 0, s, e, View::PRIVATE)?;
        w.prepare().map_err(|_| Stage2Error::OutOfMemory)?;
        let r = w.visit(self.root, 1, 0, s, e, View::PRIVATE);
        let f = w.finish();
        self.stats.add(&w.stats);
        self.mapped = (self.mapped + w.stats.frames_mapped).saturating_sub(w.stats.pages_unmapped);
        if w.stats.frames_mapped > 0 || w.stats.pages_unmapped > 0 {
            // The dirty log records copies only: a reset from it would keep pages mapped or
            // unmapped since (the counters proptest found it). The next reset is a full one.
            self.dirty_base = None;
            self.dirty = Vec::new();
        }
        if self.dirty_base.is_some() {
            self.dirty.append(&mut w.dirty);
            if self.dirty.len() > DIRTY_LOG_LIMIT {
                self.dirty_base = None;
                self.dirty = Vec::new();
            }
        }
        r?;
        // After a successful commit the pool is empty: plan and commit agree.
        debug_assert_eq!(f, Ok(0), "plan over-counted");
        f?;
        Ok(())
    }

    /// Services a stage-2 abort at `ipa` (a data abort with `write` = ESR_EL2.ISS.WnR, or an
    /// instruction abort with `write = false`). A marker on the path is unshared (copy or take
    /// over, level by level); a write to a COW leaf copies the frame or re-enables writing.
    pub fn handle_fault<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        ipa: Ipa,
        write: bool,
    ) -> Result<FaultOutcome, Stage2Error> {
        if ipa.0 >= IPA_LIMIT {
            return Ok(FaultOutcome::NotMapped);
        }
        let s = ipa.page_base().0;
        let intent = if write {
            Intent::GuestWrite
        } else {
            Intent::Read
        };
        match self.run(cx, intent, s, s + PAGE_SIZE) {
            Ok(()) => Ok(FaultOutcome::Retry),
            Err(Stage2Error::NotMapped(_)) => Ok(FaultOutcome::NotMapped),
            Err(Stage2Error::PermissionDenied(_)) => Ok(FaultOutcome::PermissionDenied),
            Err(Stage2Error::OutOfMemory) => Ok(FaultOutcome::OutOfMemory),
            Err(e) => Err(e),
        }
    }

    /// The monitor writes `buf` into guest RAM at `ipa` (a DTB, a console buffer). The pages are
    /// first made private like a guest write would (so a fork never sees it), but keep their
    /// permissions. All or nothing: NotMapped (a device page counts as not RAM) or OutOfMemory
    /// change nothing.
    pub fn write_guest<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        ipa: Ipa,
        buf: &[u8],
    ) -> Result<(), Stage2Error> {
        if buf.is_empty() {
            return Ok(());
        }
        let (s, e) = byte_range(ipa, buf.len())?;
        self.run(cx, Intent::MonitorWrite, s, e)?;
        for (pa, off, n) in self.chunks(cx.mem, ipa, buf.len())? {
            cx.mem.write(pa, &buf[off..off + n]);
        }
        Ok(())
    }

    /// The monitor reads guest RAM at `ipa` into `buf` (follows markers; changes nothing).
    pub fn read_guest<M: PhysMem>(
        &self,
        mem: &M,
        ipa: Ipa,
        buf: &mut [u8],
    ) -> Result<(), Stage2Error> {
        if buf.is_empty() {
            return Ok(());
        }
        byte_range(ipa, buf.len())?;
        for (pa, off, n) in self.chunks(mem, ipa, buf.len())? {
            mem.read(pa, &mut buf[off..off + n]);
        }
        Ok(())
    }

    /// Splits `[ipa, ipa + len)` into page-bounded pieces `(pa, offset in buffer, length)`,
    /// failing unless every piece is RAM.
    fn chunks<M: PhysMem>(
        &self,
        mem: &M,
        ipa: Ipa,
        len: usize,
    ) -> Result<Vec<(PhysAddr, usize, usize)>, Stage2Error> {
        let mut chunks = Vec::new();
        let mut off = 0usize;
        while off < len {
            let a = Ipa(ipa.0 + off as u64);
            let n = ((PAGE_SIZE - a.page_offset()) as usize).min(len - off);
            match self.translate(mem, a) {
                Some(t) if !t.device => chunks.push((t.pa, off, n)),
                _ => return Err(Stage2Error::NotMapped(a)),
            }
            off += n;
        }
        Ok(chunks)
    }

    /// Software walk of `ipa`, following markers. `None` when nothing is mapped there.
    pub fn translate<M: PhysMem>(&self, mem: &M, ipa: Ipa) -> Option<Translation> {
        if ipa.0 >= IPA_LIMIT {
            return None;
        }
        let mut table = self.root;
        let mut hw = true;
        for level in 1..=3u8 {
            let shift = walk::level_shift(level);
            let index = ((ipa.0 >> shift) & 511) as usize;
            let d = mem.read_desc(table, index);
            match desc::decode(d, level) {
                desc::Desc::Table(t) => table = t,
                desc::Desc::Marker(t) => {
                    hw = false;
                    table = t;
                }
                desc::Desc::Page(f) => {
                    return Some(Translation {
                        pa: PhysAddr(f.0 | ipa.page_offset()),
                        perms: desc::perms(d),
                        cow: desc::is_cow(d),
                        device: desc::is_unmanaged(d),
                        hw_walkable: hw,
                    })
                }
                _ => return None,
            }
        }
        None
    }

    /// Forks this VM: returns the child's tables (VMID `child`, `None` in the monitor: a fork
    /// gets one when it is first scheduled) and the fork point the child can
    /// be reset to. O(valid root entries), independent of guest memory size. The parent's root
    /// entries become markers and the parent's VMID is flushed. The parent's vCPUs must be
    /// stopped. Release the fork point if resets are not wanted (it costs one extra table copy
    /// per touched region). OutOfMemory changes nothing.
    pub fn fork<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        child: impl Into<Option<Vmid>>,
    ) -> Result<(Stage2, ForkPoint), Stage2Error> {
        let child = child.into();
        // Prepare: the child's root is the only allocation.
        let root = cx.frames.alloc().map_err(|_| Stage2Error::OutOfMemory)?;
        let fp = match self.snapshot(cx) {
            Ok(fp) => fp,
            Err(e) => {
                cx.frames.put(root).map_err(Stage2Error::Frame)?;
                return Err(e);
            }
        };
        match Stage2::with_root_from(cx, root, &fp, child) {
            Ok(c) => Ok((c, fp)),
            Err(e) => {
                // Only a refcount overflow gets here; the parent stays frozen (markers).
                cx.frames.put(root).map_err(Stage2Error::Frame)?;
                fp.release(cx)?;
                Err(e)
            }
        }
    }

    /// Freezes this VM's memory into a fork point without creating a child (the parent's root
    /// entries become markers, the parent's VMID is flushed). Needs no memory.
    pub fn snapshot<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
    ) -> Result<ForkPoint, Stage2Error> {
        let mut entries = Vec::new();
        for index in 0..TABLE_ENTRIES {
            let d = cx.mem.read_desc(self.root, index);
            match desc::decode(d, 1) {
                desc::Desc::Empty => {}
                desc::Desc::Table(t) | desc::Desc::Marker(t) => entries.push((index, t)),
                _ => return Err(Stage2Error::Corrupt(Ipa((index as u64) << 30))),
            }
        }
        take_refs(cx.frames, &entries)?;
        // Our tables are shared from now on: the dirty log no longer describes them.
        self.dirty_base = None;
        self.dirty = Vec::new();
        let mut w = Walk::new(cx, self.vmid, Intent::Read);
        for &(index, t) in &entries {
            let d = w.cx.mem.read_desc(self.root, index);
            if d & desc::VALID != 0 {
                let slot = self.root_slot(index);
                w.set_desc(slot, d, desc::marker(t));
            }
        }
        w.finish()?;
        Ok(ForkPoint {
            entries,
            mapped: self.mapped,
        })
    }

    /// New tables for VM `vmid` holding markers to `fp`'s tables (a fresh child of a fork point).
    pub fn from_fork_point<M: PhysMem, T: TlbOps>(
        cx: &mut MemCtx<'_, M, T>,
        fp: &ForkPoint,
        vmid: impl Into<Option<Vmid>>,
    ) -> Result<Stage2, Stage2Error> {
        let root = cx.frames.alloc().map_err(|_| Stage2Error::OutOfMemory)?;
        Stage2::with_root_from(cx, root, fp, vmid.into()).inspect_err(|_| {
            let _ = cx.frames.put(root);
        })
    }

    fn with_root_from<M: PhysMem, T: TlbOps>(
        cx: &mut MemCtx<'_, M, T>,
        root: PhysAddr,
        fp: &ForkPoint,
        vmid: Option<Vmid>,
    ) -> Result<Stage2, Stage2Error> {
        take_refs(cx.frames, &fp.entries)?;
        cx.mem.zero_frame(root);
        let s = Stage2 {
            root,
            vmid,
            stats: Stage2Stats::default(),
            mapped: fp.mapped,
            dirty_base: Some(fp.entries.clone()),
            dirty: Vec::new(),
        };
        let mut w = Walk::new(cx, vmid, Intent::Read);
        for &(index, t) in &fp.entries {
            w.set_desc(s.root_slot(index), 0, desc::marker(t));
        }
        w.finish()?;
        Ok(s)
    }

    /// Returns this VM's memory to `fp`: the root again holds markers to the fork point's tables,
    /// and everything the VM made private since is released. Cost O(tables and pages made
    /// private), not O(VM size). The VM's vCPUs must be stopped; its VMID is flushed.
    pub fn reset<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        fp: &ForkPoint,
    ) -> Result<(), Stage2Error> {
        self.reset_above(cx, fp, RESET_VMID_FLUSH_ABOVE)
    }

    /// [`Stage2::reset`], with a dirty-log reset of more than `vmid_flush_above` leaves done
    /// with one VMID-wide flush (tests vary the threshold to run both ways).
    fn reset_above<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        fp: &ForkPoint,
        vmid_flush_above: usize,
    ) -> Result<(), Stage2Error> {
        if self.dirty_base.as_ref() == Some(&fp.entries) {
            self.reset_dirty(cx, vmid_flush_above)?;
            self.mapped = fp.mapped;
            return Ok(());
        }
        // Prepare: take the fork point's references first (so a table in both trees never drops
        // to zero in between).
        take_refs(cx.frames, &fp.entries)?;
        let mut old_tables = Vec::new();
        let mut w = Walk::new(cx, self.vmid, Intent::Read);
        for index in 0..TABLE_ENTRIES {
            let d = w.cx.mem.read_desc(self.root, index);
            let want = fp.entries.iter().find(|&&(i, _)| i == index);
            let new = want.map_or(0, |&(_, t)| desc::marker(t));
            match desc::decode(d, 1) {
                desc::Desc::Table(t) | desc::Desc::Marker(t) => old_tables.push(t),
                desc::Desc::Empty => {}
                _ => return Err(Stage2Error::Corrupt(Ipa((index as u64) << 30))),
            }
            if d != new {
                w.set_desc(self.root_slot(index), d, new);
            }
        }
        // The VMID flush happens before anything is freed: no TLB may still reach a freed frame.
        w.finish()?;
        for t in old_tables {
            walk::release(cx.frames, cx.mem, t, 2).map_err(Stage2Error::Frame)?;
        }
        self.dirty_base = Some(fp.entries.clone());
        self.dirty = Vec::new();
        self.mapped = fp.mapped;
        Ok(())
    }

    /// The O(dirty pages) reset: the tables the VM copied since its fork point stay (apart from
    /// the leaves in the log they are equivalent to the fork point's: the same frames,
    /// read-only and COW, and the fork point's tables cannot change while it holds them); every
    /// leaf the log names gets its fork-point frame back, and its private frame is dropped.
    /// Allocates nothing. More than `vmid_flush_above` leaves: [`Stage2::reset_dirty_batched`].
    fn reset_dirty<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        vmid_flush_above: usize,
    ) -> Result<(), Stage2Error> {
        let log = core::mem::take(&mut self.dirty);
        let mut w = Walk::new(cx, self.vmid, Intent::Read);
        w.plan = false;
        if log.len() > vmid_flush_above {
            return Self::reset_dirty_batched(&mut w, &log);
        }
        for leaf in log.iter().rev() {
            let cur = w.cx.mem.read_desc(leaf.table, leaf.index);
            let desc::Desc::Page(private) = desc::decode(cur, 3) else {
                return Err(Stage2Error::Corrupt(leaf.ipa));
            };
            let desc::Desc::Page(original) = desc::decode(leaf.original, 3) else {
                return Err(Stage2Error::Corrupt(leaf.ipa));
            };
            w.cx.frames.get(original).map_err(Stage2Error::Frame)?;
            let back = if desc::is_writable(leaf.original) {
                desc::write_protect(leaf.original)
            } else {
                leaf.original
            };
            let slot = walk::Slot {
                table: leaf.table,
                index: leaf.index,
                level: 3,
                ipa: leaf.ipa,
                live: true,
            };
            w.set_desc(slot, cur, back);
            w.cx.frames.put(private).map_err(Stage2Error::Frame)?;
        }
        w.finish()?;
        Ok(())
    }

    /// The dirty-log reset as one batched break-before-make (ARM ARM D8.16.1): every logged leaf
    /// is broken (made invalid, the flush deferred), then one VMID-wide flush completes all the
    /// breaks, then every leaf is made (its fork-point entry written, a plain store onto an
    /// invalid entry) and only then its private frame freed: no TLB can reach a freed frame.
    /// One `flush_vmid` instead of a `flush_ipa` per leaf.
    ///
    /// A broken leaf keeps its private frame's address in the bits an invalid descriptor leaves
    /// to software (hardware ignores bits 63:1 when bit 0 is clear, ARM ARM D8.3), so the make
    /// knows what to free without a list (nothing is allocated); nothing else reads the tables
    /// in between (this holds the VM's tables exclusively, and no walker uses invalid entries).
    /// The break checks every leaf (a page now, a page at the fork point); if one is not, the
    /// leaves broken so far get their entries back and nothing has changed but a VMID flush.
    /// So a leaf logged twice is reported as corrupt: it cannot be, a leaf is logged when it
    /// stops being shared and stays private until the log is dropped.
    fn reset_dirty_batched<M: PhysMem, T: TlbOps>(
        w: &mut Walk<'_, '_, M, T>,
        log: &[walk::DirtyLeaf],
    ) -> Result<(), Stage2Error> {
        let slot = |leaf: &walk::DirtyLeaf| walk::Slot {
            table: leaf.table,
            index: leaf.index,
            level: 3,
            ipa: leaf.ipa,
            live: true,
        };
        w.defer_leaf_flushes = true;
        for (k, leaf) in log.iter().enumerate() {
            let cur = w.cx.mem.read_desc(leaf.table, leaf.index);
            let (desc::Desc::Page(_), desc::Desc::Page(_)) =
                (desc::decode(cur, 3), desc::decode(leaf.original, 3))
            else {
                for done in &log[..k] {
                    let parked = w.cx.mem.read_desc(done.table, done.index);
                    w.set_desc(slot(done), parked, parked | desc::VALID); // as it was
                }
                w.defer_leaf_flushes = false;
                return Err(Stage2Error::Corrupt(leaf.ipa));
            };
            w.set_desc(slot(leaf), cur, cur & !desc::VALID); // break, flush deferred
        }
        w.flush_pending();
        w.defer_leaf_flushes = false;
        for leaf in log {
            let cur = w.cx.mem.read_desc(leaf.table, leaf.index);
            let (desc::Desc::Other, desc::Desc::Page(private), desc::Desc::Page(original)) = (
                desc::decode(cur, 3),
                desc::decode(cur | desc::VALID, 3),
                desc::decode(leaf.original, 3),
            ) else {
                return Err(Stage2Error::Corrupt(leaf.ipa));
            };
            w.cx.frames.get(original).map_err(Stage2Error::Frame)?;
            let back = if desc::is_writable(leaf.original) {
                desc::write_protect(leaf.original)
            } else {
                leaf.original
            };
            w.set_desc(slot(leaf), cur, back); // make
            w.cx.frames.put(private).map_err(Stage2Error::Frame)?;
        }
        w.finish()?;
        Ok(())
    }

    /// Tears the VM's tables down: flushes its VMID (if it has one), then drops every reference it holds; frames
    /// and tables shared with other VMs or fork points survive. The vCPUs must be stopped and
    /// VTTBR_EL2 no longer hold this root.
    pub fn destroy<M: PhysMem, T: TlbOps>(
        self,
        cx: &mut MemCtx<'_, M, T>,
    ) -> Result<(), Stage2Error> {
        if let Some(v) = self.vmid {
            cx.tlb.flush_vmid(v);
        }
        for index in 0..TABLE_ENTRIES {
            let d = cx.mem.read_desc(self.root, index);
            match desc::decode(d, 1) {
                desc::Desc::Table(t) | desc::Desc::Marker(t) => {
                    walk::release(cx.frames, cx.mem, t, 2).map_err(Stage2Error::Frame)?;
                }
                _ => {}
            }
        }
        cx.frames.put(self.root).map_err(Stage2Error::Frame)?;
        Ok(())
    }

    /// RAM pages mapped (device pages excluded): the census's `mapped_pages`, kept as the
    /// tables change (O(1)).
    pub fn mapped_pages(&self) -> u64 {
        self.mapped
    }

    /// The census `vmfork list` shows, without walking what is shared: `mapped_pages` from
    /// [`Stage2::mapped_pages`], `private_frames` from a walk that stops at every shared table
    /// (everything below one is shared), `shared_frames` the rest, the same numbers as
    /// [`Stage2::usage`]. `shared_tables` counts only the shared tables met, not those below
    /// them. O(private tables): a fresh fork costs O(1), a VM that owns most of its memory
    /// O(its private pages / 512) tables of 512 entries.
    pub fn usage_private<M: PhysMem>(&self, frames: &FrameAllocator, mem: &M) -> Usage {
        let mut u = Usage {
            private_tables: 1,
            ..Usage::default()
        };
        census_private(frames, mem, self.root, 1, &mut u);
        u.mapped_pages = self.mapped as usize;
        u.shared_frames = u.mapped_pages.saturating_sub(u.private_frames);
        u
    }

    /// Memory census of this VM (walks its whole tree: O(VM size), for statistics only).
    pub fn usage<M: PhysMem>(&self, frames: &FrameAllocator, mem: &M) -> Usage {
        let mut u = Usage {
            private_tables: 1,
            ..Usage::default()
        };
        census(frames, mem, self.root, 1, true, &mut u);
        u.shared_frames = u.mapped_pages - u.private_frames;
        u
    }

    fn root_slot(&self, index: usize) -> walk::Slot {
        walk::Slot {
            table: self.root,
            index,
            level: 1,
            ipa: Ipa((index as u64) << 30),
            live: true,
        }
    }
}

fn census<M: PhysMem>(
    frames: &FrameAllocator,
    mem: &M,
    t: PhysAddr,
    level: u8,
    private: bool,
    u: &mut Usage,
) {
    for index in 0..TABLE_ENTRIES {
        let d = mem.read_desc(t, index);
        match desc::decode(d, level) {
            desc::Desc::Table(x) | desc::Desc::Marker(x) if level < 3 => {
                let p = private && frames.refcount(x) == 1;
                if p {
                    u.private_tables += 1;
                } else {
                    u.shared_tables += 1;
                }
                census(frames, mem, x, level + 1, p, u);
            }
            desc::Desc::Page(f) if !desc::is_unmanaged(d) => {
                u.mapped_pages += 1;
                if private && frames.refcount(f) == 1 {
                    u.private_frames += 1;
                }
            }
            _ => {}
        }
    }
}

/// [`census`] of private tables only: a shared table is counted and not entered.
impl Stage2 {
    /// Whether the RAM page at `ipa` counts as private in [`Stage2::usage_private`]: its frame
    /// and every table on the way to it have a count of 1. `None` when no RAM page is mapped
    /// there. One walk, O(levels).
    pub fn page_is_private<M: PhysMem>(
        &self,
        frames: &FrameAllocator,
        mem: &M,
        ipa: Ipa,
    ) -> Option<bool> {
        if ipa.0 >= IPA_LIMIT {
            return None;
        }
        let mut table = self.root;
        let mut private = true;
        for level in 1..=3u8 {
            let index = ((ipa.0 >> walk::level_shift(level)) & 511) as usize;
            let d = mem.read_desc(table, index);
            match desc::decode(d, level) {
                desc::Desc::Table(t) | desc::Desc::Marker(t) if level < 3 => {
                    private &= frames.refcount(t) == 1;
                    table = t;
                }
                desc::Desc::Page(f) if !desc::is_unmanaged(d) => {
                    return Some(private && frames.refcount(f) == 1);
                }
                _ => return None,
            }
        }
        None
    }
}

fn census_private<M: PhysMem>(
    frames: &FrameAllocator,
    mem: &M,
    t: PhysAddr,
    level: u8,
    u: &mut Usage,
) {
    for index in 0..TABLE_ENTRIES {
        let d = mem.read_desc(t, index);
        match desc::decode(d, level) {
            desc::Desc::Table(x) | desc::Desc::Marker(x) if level < 3 => {
                if frames.refcount(x) == 1 {
                    u.private_tables += 1;
                    census_private(frames, mem, x, level + 1, u);
                } else {
                    u.shared_tables += 1;
                }
            }
            desc::Desc::Page(f) if !desc::is_unmanaged(d) && frames.refcount(f) == 1 => {
                u.private_frames += 1;
            }
            _ => {}
        }
    }
}

/// Takes one reference to each table; all or nothing.
fn take_refs(
    frames: &mut FrameAllocator,
    entries: &[(usize, PhysAddr)],
) -> Result<(), Stage2Error> {
    for (k, &(_, t)) in entries.iter().enumerate() {
        if let Err(e) = frames.get(t) {
            for &(_, u) in &entries[..k] {
                let _ = frames.put(u);
            }
            return Err(Stage2Error::Frame(e));
        }
    }
    Ok(())
}

fn page_range(ipa: Ipa, pages: u64) -> Result<(u64, u64), Stage2Error> {
    if !ipa.is_page_aligned() {
        return Err(Stage2Error::Unaligned(ipa));
    }
    let end = pages
        .checked_mul(PAGE_SIZE)
        .and_then(|b| ipa.0.checked_add(b))
        .filter(|&e| e <= IPA_LIMIT && pages > 0)
        .ok_or(Stage2Error::OutOfRange(ipa))?;
    Ok((ipa.0, end))
}

fn byte_range(ipa: Ipa, len: usize) -> Result<(u64, u64), Stage2Error> {
    let end = ipa
        .0
        .checked_add(len as u64)
        .filter(|&e| e <= IPA_LIMIT)
        .ok_or(Stage2Error::OutOfRange(ipa))?;
    Ok((ipa.page_base().0, end))
}
