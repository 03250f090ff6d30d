//! The one stage-2 walker. Every operation that changes a VM's tables (map, COW fault, monitor
//! write, unmap) is one walk over an IPA range, run twice:
//!
//! 1. **plan**: reads only, and counts the frames the commit will need (new tables, table copies,
//!    frame copies, fresh RAM). It also finds every error (not mapped, already mapped, denied), so
//!    that a walk that would fail changes nothing.
//! 2. **commit**: with exactly that many frames reserved up front in a pool, makes the change. It
//!    cannot run out of memory half-way.
//!
//! Plan mode must predict what commit would do without doing it. Commit privatises tables level by
//! level (copy or take over), and the only way that changes what the next level sees is: after a
//! table copy every target of the copied table has one more reference, and after a copy or a
//! take-over every table entry of it reads as a marker and writable leaves of shared frames read as
//! COW. [`View`] carries exactly that (`bias`, `demoted`) one level down.
//!
//! Descriptor writes, break-before-make and the TLB maintenance they need are in [`Walk::set_desc`]
//! and nowhere else; the table helpers (copy, demote, release) also live here.

use alloc::vec::Vec;

use super::desc::{self, Desc, Perms};
use super::tlb::{TlbOps, Vmid};
use super::{MemCtx, Stage2Stats};
use crate::addr::{Ipa, PhysAddr, PAGE_SHIFT};
use crate::frame::{FrameAllocator, FrameError};
use crate::physmem::{PhysMem, TABLE_ENTRIES};

/// What a walk is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Intent {
    /// A guest read or instruction fetch faulted: make the path hardware-walkable.
    Read,
    /// A guest write faulted: as `Read`, then make the leaf writable (copying a shared frame).
    GuestWrite,
    /// The monitor writes guest memory: make the frame private, keep the leaf's permissions
    /// (a read-only ROM stays read-only, a COW leaf becomes writable).
    MonitorWrite,
    /// Map fresh zeroed RAM frames into unmapped IPAs.
    MapRam(Perms),
    /// Map device memory: IPA `ipa0` to PA `pa0`, linearly.
    MapDevice { ipa0: u64, pa0: u64, perms: Perms },
    /// Remove leaves (dropping their frames' references); empty IPAs are skipped.
    Unmap,
}

impl Intent {
    fn creates(self) -> bool {
        matches!(self, Intent::MapRam(_) | Intent::MapDevice { .. })
    }
}

/// Why a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    NotMapped(Ipa),
    AlreadyMapped(Ipa),
    Denied(Ipa),
    /// A descriptor this module never writes, or a reference count that contradicts the tables.
    Corrupt(Ipa),
    Frame(FrameError),
    /// Commit needed more frames than plan counted (a bug).
    PoolEmpty,
}

/// How the table being visited will look once commit has privatised it (see module docs).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct View {
    /// References commit will have added to each target of this table's entries.
    bias: u32,
    /// Commit will have demoted this table (table entries -> markers, shared leaves -> COW).
    demoted: bool,
}

impl View {
    /// A table that is already private and hardware-walkable (and every table in commit mode).
    pub(super) const PRIVATE: View = View {
        bias: 0,
        demoted: false,
    };
}

/// One descriptor slot, and whether the hardware may be walking it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub table: PhysAddr,
    pub index: usize,
    pub level: u8,
    /// First IPA the entry translates.
    pub ipa: Ipa,
    /// The table is reachable by the hardware walker of `Walk::vmid` (root, or reached from it
    /// through valid table entries only), so the entry may be cached in its TLBs.
    pub live: bool,
}

/// log2 of the IPA span of one entry at `level`.
pub(super) fn level_shift(level: u8) -> u32 {
    PAGE_SHIFT + 9 * (3 - level as u32)
}

/// A walk over one VM's tables, in plan or commit mode.
pub(super) struct Walk<'c, 'a, M: PhysMem, T: TlbOps> {
    pub cx: &'c mut MemCtx<'a, M, T>,
    /// The VM's VMID, `None` when it has none: then no TLB holds an entry of its tables
    /// (`machine::table`, "VMIDs"), and every invalidation is skipped.
    pub vmid: Option<Vmid>,
    pub intent: Intent,
    pub plan: bool,
    /// Plan: frames the commit will take.
    pub need: usize,
    /// Commit: frames reserved by the prepare step (each with refcount 1, contents undefined).
    pub pool: Vec<PhysAddr>,
    /// A live table entry went from valid to something else: flush the whole VMID at `finish`.
    pub pending_vmid_flush: bool,
    /// Batched break-before-make: a live valid leaf losing validity defers its flush into
    /// `pending_vmid_flush` instead of a `flush_ipa` each (see [`Walk::flush_pending`]).
    pub defer_leaf_flushes: bool,
    pub stats: Stage2Stats,
    /// Commit: leaves this walk pointed at a new frame (the dirty log, see `Stage2::reset`).
    pub dirty: Vec<DirtyLeaf>,
}

/// A level-3 entry a copy-on-write fault (or a monitor write) pointed at a private copy: where
/// it is and what it held before, so a reset can put it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DirtyLeaf {
    pub table: PhysAddr,
    pub index: usize,
    pub ipa: Ipa,
    pub original: u64,
}

impl<'c, 'a, M: PhysMem, T: TlbOps> Walk<'c, 'a, M, T> {
    pub(super) fn new(cx: &'c mut MemCtx<'a, M, T>, vmid: Option<Vmid>, intent: Intent) -> Self {
        Walk {
            cx,
            vmid,
            intent,
            plan: true,
            need: 0,
            pool: Vec::new(),
            pending_vmid_flush: false,
            defer_leaf_flushes: false,
            stats: Stage2Stats::default(),
            dirty: Vec::new(),
        }
    }

    /// Prepare step: reserves `self.need` frames into the pool and switches to commit mode. On
    /// OutOfMemory every frame taken is returned: nothing changed.
    pub(super) fn prepare(&mut self) -> Result<(), FrameError> {
        self.pool = reserve(self.cx.frames, self.need)?;
        self.plan = false;
        Ok(())
    }

    /// Issues the deferred VMID-wide flush and returns unused pool frames; answers how many
    /// there were (0 after a successful commit: plan counts exactly).
    pub(super) fn finish(&mut self) -> Result<usize, Stop> {
        if self.pending_vmid_flush {
            if let Some(v) = self.vmid {
                self.cx.tlb.flush_vmid(v);
            }
            self.pending_vmid_flush = false;
        }
        let leftover = self.pool.len();
        for f in self.pool.drain(..) {
            self.cx.frames.put(f).map_err(Stop::Frame)?;
        }
        Ok(leftover)
    }

    /// Issues the deferred VMID-wide flush now, if one is pending: after it no TLB or walk
    /// cache of this VMID holds any entry that was live before (ARM ARM D8.16.1: the "break"
    /// of break-before-make is complete once the invalidation is), so the entries broken with
    /// `defer_leaf_flushes` can be made with plain stores.
    pub(super) fn flush_pending(&mut self) {
        if self.pending_vmid_flush {
            if let Some(v) = self.vmid {
                self.cx.tlb.flush_vmid(v);
            }
            self.pending_vmid_flush = false;
        }
    }

    fn take(&mut self) -> Result<PhysAddr, Stop> {
        self.pool.pop().ok_or(Stop::PoolEmpty)
    }

    /// THE descriptor write. Every stage-2 descriptor this module writes goes through here, so
    /// break-before-make and TLB maintenance live in this one place.
    ///
    /// * Not live, or old entry invalid: the TLBs cannot hold the entry (an invalid entry is never
    ///   cached, ARM ARM D8.16), so a plain store does; before publishing a valid entry the walkers
    ///   must see the stores that filled what it points at (`sync_tables`, a `dsb ishst`).
    /// * Live valid leaf whose output address or attributes change: break-before-make (ARM ARM
    ///   D8.16.1): write invalid (break), `flush_ipa` (so no TLB holds the old entry), write the
    ///   new entry (make).
    /// * Live valid leaf losing validity or only changing permissions: store, then `flush_ipa`
    ///   (a stale entry would let the old permission or the old frame be used; relaxing a
    ///   permission is flushed too so a stale read-only entry cannot fault forever). With
    ///   `defer_leaf_flushes`, a leaf losing validity defers its flush into one VMID-wide flush
    ///   (`flush_pending` or `finish`): the break of a batched break-before-make, whose makes
    ///   come after that flush and see an invalid old entry.
    /// * Live valid table entry becoming invalid (a marker at fork, an empty or marker entry at
    ///   reset): store, then a VMID-wide flush (walk caches hold table entries, and every IPA
    ///   below changed), deferred to `finish` so a fork flushes once.
    ///
    /// With no VMID (`Walk::vmid` is `None`) every invalidation above is skipped, the stores and
    /// their ordering (`sync_tables`) are not: a VM without a VMID of the current generation has
    /// no entry in any TLB (`machine::table`, "VMIDs"), so there is nothing to invalidate.
    pub(super) fn set_desc(&mut self, slot: Slot, old: u64, new: u64) {
        let mem = &mut *self.cx.mem;
        let tlb = &mut *self.cx.tlb;
        if !slot.live || old & desc::VALID == 0 {
            if slot.live && new & desc::VALID != 0 {
                tlb.sync_tables();
            }
            mem.write_desc(slot.table, slot.index, new);
            return;
        }
        let bbm = new & desc::VALID != 0 && desc::needs_bbm(old, new);
        if slot.level == 3 {
            if bbm {
                mem.write_desc(slot.table, slot.index, 0); // break
                if let Some(v) = self.vmid {
                    tlb.flush_ipa(v, slot.ipa);
                }
                tlb.sync_tables();
                mem.write_desc(slot.table, slot.index, new); // make
            } else if self.defer_leaf_flushes && new & desc::VALID == 0 {
                mem.write_desc(slot.table, slot.index, new);
                self.pending_vmid_flush = true;
            } else {
                mem.write_desc(slot.table, slot.index, new);
                if let Some(v) = self.vmid {
                    tlb.flush_ipa(v, slot.ipa);
                }
            }
        } else if bbm {
            // Never done by this module (tables are replaced through markers), but correct.
            mem.write_desc(slot.table, slot.index, 0);
            if let Some(v) = self.vmid {
                tlb.flush_vmid(v);
            }
            tlb.sync_tables();
            mem.write_desc(slot.table, slot.index, new);
        } else {
            mem.write_desc(slot.table, slot.index, new);
            self.pending_vmid_flush = true;
        }
    }

    /// Visits `[start, end)` (inside the span of `table`, which starts at IPA `base`).
    pub(super) fn visit(
        &mut self,
        table: PhysAddr,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        view: View,
    ) -> Result<(), Stop> {
        let shift = level_shift(level);
        let first = ((start - base) >> shift) as usize;
        let last = ((end - 1 - base) >> shift) as usize;
        for index in first..=last.min(TABLE_ENTRIES - 1) {
            let e_base = base + ((index as u64) << shift);
            let s = start.max(e_base);
            let e = end.min(e_base + (1u64 << shift));
            let slot = Slot {
                table,
                index,
                level,
                ipa: Ipa(e_base),
                live: !self.plan,
            };
            if level == 3 {
                self.leaf(slot, view)?;
            } else {
                self.entry(slot, s, e, view)?;
            }
        }
        Ok(())
    }

    /// A level-1 or level-2 entry covering `[s, e)` of the walk.
    fn entry(&mut self, slot: Slot, s: u64, e: u64, view: View) -> Result<(), Stop> {
        let d = self.cx.mem.read_desc(slot.table, slot.index);
        let next = slot.level + 1;
        let kind = match desc::decode(d, slot.level) {
            Desc::Table(t) if view.demoted => Desc::Marker(t),
            k => k,
        };
        match kind {
            Desc::Empty if self.intent.creates() => {
                if self.plan {
                    self.need += fresh_need(next, s, e, self.intent);
                    return Ok(());
                }
                let t = self.take()?;
                self.cx.mem.zero_frame(t);
                self.set_desc(slot, d, desc::table(t));
                self.visit(t, next, slot.ipa.0, s, e, View::PRIVATE)
            }
            Desc::Empty if self.intent == Intent::Unmap => Ok(()),
            Desc::Empty => Err(Stop::NotMapped(Ipa(s))),
            Desc::Table(t) => self.visit(t, next, slot.ipa.0, s, e, View::PRIVATE),
            Desc::Marker(t) => {
                let rc = self.cx.frames.refcount(t);
                if rc == 0 {
                    return Err(Stop::Corrupt(Ipa(s)));
                }
                let copy = rc + view.bias > 1;
                if self.plan {
                    self.need += copy as usize;
                    let below = View {
                        bias: copy as u32,
                        demoted: true,
                    };
                    return self.visit(t, next, slot.ipa.0, s, e, below);
                }
                let private = if copy {
                    let n = self.take()?;
                    self.copy_table(t, n, next)?;
                    self.cx.frames.put(t).map_err(Stop::Frame)?;
                    self.stats.table_copies += 1;
                    n
                } else {
                    self.demote_table(t, next)?;
                    self.stats.table_takeovers += 1;
                    t
                };
                self.set_desc(slot, d, desc::table(private));
                self.visit(private, next, slot.ipa.0, s, e, View::PRIVATE)
            }
            Desc::Page(_) | Desc::Other => Err(Stop::Corrupt(Ipa(s))),
        }
    }

    /// A level-3 entry.
    fn leaf(&mut self, slot: Slot, view: View) -> Result<(), Stop> {
        let d = self.cx.mem.read_desc(slot.table, slot.index);
        let ipa = slot.ipa;
        let f = match desc::decode(d, 3) {
            Desc::Page(f) => f,
            Desc::Empty => {
                return match self.intent {
                    Intent::MapRam(perms) => {
                        if self.plan {
                            self.need += 1;
                        } else {
                            let f = self.take()?;
                            self.cx.mem.zero_frame(f);
                            self.set_desc(slot, d, desc::ram_page(f, perms));
                            self.stats.frames_mapped += 1;
                        }
                        Ok(())
                    }
                    Intent::MapDevice { ipa0, pa0, perms } => {
                        if !self.plan {
                            let pa = PhysAddr(pa0 + (ipa.0 - ipa0));
                            self.set_desc(slot, d, desc::device_page(pa, perms));
                        }
                        Ok(())
                    }
                    Intent::Unmap => Ok(()),
                    _ => Err(Stop::NotMapped(ipa)),
                };
            }
            _ => return Err(Stop::Corrupt(ipa)),
        };
        let unmanaged = desc::is_unmanaged(d);
        match self.intent {
            Intent::MapRam(_) | Intent::MapDevice { .. } => Err(Stop::AlreadyMapped(ipa)),
            Intent::Read => Ok(()),
            Intent::Unmap => {
                if !self.plan {
                    self.set_desc(slot, d, 0);
                    if !unmanaged {
                        self.cx.frames.put(f).map_err(Stop::Frame)?;
                        self.stats.pages_unmapped += 1;
                    }
                }
                Ok(())
            }
            Intent::GuestWrite | Intent::MonitorWrite if unmanaged => {
                match (self.intent, desc::is_writable(d)) {
                    (Intent::GuestWrite, true) => Ok(()),
                    (Intent::GuestWrite, false) => Err(Stop::Denied(ipa)),
                    _ => Err(Stop::NotMapped(ipa)), // the monitor writes RAM only
                }
            }
            Intent::GuestWrite | Intent::MonitorWrite => {
                let rc = self.cx.frames.refcount(f);
                if rc == 0 {
                    return Err(Stop::Corrupt(ipa));
                }
                let shared = rc + view.bias > 1;
                let demote = view.demoted && shared && desc::is_writable(d);
                let cow = desc::is_cow(d) || demote;
                let writable = desc::is_writable(d) && !demote;
                if writable {
                    return Ok(()); // already private and writable: a spurious fault
                }
                if !cow && self.intent == Intent::GuestWrite {
                    return Err(Stop::Denied(ipa)); // read-only by policy (a ROM)
                }
                if self.plan {
                    self.need += shared as usize;
                    return Ok(());
                }
                if shared {
                    let n = self.take()?;
                    self.cx.mem.copy_frame(n, f);
                    let new = if cow {
                        desc::make_writable(d, n)
                    } else {
                        desc::with_oa(d, n)
                    };
                    self.set_desc(slot, d, new);
                    self.cx.frames.put(f).map_err(Stop::Frame)?;
                    self.stats.cow_copies += 1;
                    self.dirty.push(DirtyLeaf {
                        table: slot.table,
                        index: slot.index,
                        ipa,
                        original: d,
                    });
                } else if cow {
                    self.set_desc(slot, d, desc::make_writable(d, f));
                    self.stats.cow_reuses += 1;
                }
                Ok(())
            }
        }
    }

    /// Fills fresh table `dst` (level `level`) as a shared copy of `src`: table entries become
    /// markers, managed leaves become COW; every target gains a reference. `dst` is not live yet.
    fn copy_table(&mut self, src: PhysAddr, dst: PhysAddr, level: u8) -> Result<(), Stop> {
        self.cx.mem.zero_frame(dst);
        for index in 0..TABLE_ENTRIES {
            let d = self.cx.mem.read_desc(src, index);
            let new = match desc::decode(d, level) {
                Desc::Empty => continue,
                Desc::Table(t) | Desc::Marker(t) => {
                    self.cx.frames.get(t).map_err(Stop::Frame)?;
                    desc::marker(t)
                }
                Desc::Page(f) => {
                    if !desc::is_unmanaged(d) {
                        self.cx.frames.get(f).map_err(Stop::Frame)?;
                    }
                    desc::write_protect(d)
                }
                Desc::Other => return Err(Stop::Corrupt(Ipa(0))),
            };
            self.set_desc(not_live(dst, index, level), 0, new);
        }
        Ok(())
    }

    /// Takes over table `t` (refcount 1, reached only through our marker, so not live): its table
    /// entries become markers (the subtree below was never checked for this VM) and its writable
    /// leaves of shared frames become COW. No reference changes hands.
    fn demote_table(&mut self, t: PhysAddr, level: u8) -> Result<(), Stop> {
        for index in 0..TABLE_ENTRIES {
            let d = self.cx.mem.read_desc(t, index);
            let new = match desc::decode(d, level) {
                Desc::Empty | Desc::Marker(_) => continue,
                Desc::Table(x) => desc::marker(x),
                Desc::Page(f) => {
                    if desc::is_writable(d)
                        && !desc::is_unmanaged(d)
                        && self.cx.frames.refcount(f) > 1
                    {
                        desc::write_protect(d)
                    } else {
                        continue;
                    }
                }
                Desc::Other => return Err(Stop::Corrupt(Ipa(0))),
            };
            self.set_desc(not_live(t, index, level), d, new);
        }
        Ok(())
    }
}

fn not_live(table: PhysAddr, index: usize, level: u8) -> Slot {
    Slot {
        table,
        index,
        level,
        ipa: Ipa(0),
        live: false,
    }
}

/// Frames a fresh (empty) table at `level` covering `[s, e)` and everything under it will take.
fn fresh_need(level: u8, s: u64, e: u64, intent: Intent) -> usize {
    let pages = if matches!(intent, Intent::MapRam(_)) {
        ((e - s) >> PAGE_SHIFT) as usize
    } else {
        0
    };
    let l3_tables = if level == 2 {
        (((e - 1) >> level_shift(2)) - (s >> level_shift(2)) + 1) as usize
    } else {
        0
    };
    1 + l3_tables + pages
}

/// Allocates `n` frames or none.
pub(super) fn reserve(frames: &mut FrameAllocator, n: usize) -> Result<Vec<PhysAddr>, FrameError> {
    if n > frames.free_frames() {
        return Err(FrameError::OutOfMemory);
    }
    // The list itself is heap: reserved fallibly, so a large plan on a full heap is refused
    // like one the frames cannot cover, never an allocation failure (an abort at EL2).
    let mut pool = Vec::new();
    pool.try_reserve_exact(n)
        .map_err(|_| FrameError::OutOfMemory)?;
    for _ in 0..n {
        match frames.alloc() {
            Ok(f) => pool.push(f),
            Err(e) => {
                for f in pool {
                    // Just allocated by us: put cannot fail.
                    let _ = frames.put(f);
                }
                return Err(e);
            }
        }
    }
    Ok(pool)
}

/// Drops one reference to table `t` (at `level`) and, when that frees it, to everything it
/// points at, recursively. Returns the number of frames freed.
pub(super) fn release(
    frames: &mut FrameAllocator,
    mem: &impl PhysMem,
    t: PhysAddr,
    level: u8,
) -> Result<usize, FrameError> {
    if !frames.put(t)? {
        return Ok(0);
    }
    let mut freed = 1;
    for index in 0..TABLE_ENTRIES {
        let d = mem.read_desc(t, index);
        match desc::decode(d, level) {
            Desc::Table(x) | Desc::Marker(x) => freed += release(frames, mem, x, level + 1)?,
            Desc::Page(f) if !desc::is_unmanaged(d) => freed += frames.put(f)? as usize,
            _ => {}
        }
    }
    Ok(freed)
}
