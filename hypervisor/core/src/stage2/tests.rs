//! Unit tests of the stage-2 tables: mapping, fork cost, COW isolation, TLB maintenance,
//! out-of-memory atomicity, teardown.

use super::*;
use crate::physmem::FakePhysMem;

/// Guest RAM base on QEMU virt.
pub(super) const RAM: u64 = 0x4000_0000;
const PA_BASE: u64 = 0x1_0000_0000;

/// Host stand-ins for everything the tables touch.
pub(super) struct Host<T: TlbOps = FakeTlb> {
    pub frames: FrameAllocator,
    pub mem: FakePhysMem,
    pub tlb: T,
}

impl<T: TlbOps + Default> Host<T> {
    pub fn new(frames: usize) -> Self {
        let mut a = FrameAllocator::new(PhysAddr(PA_BASE), frames);
        a.add_free(a.base(), a.end()).unwrap();
        Host {
            frames: a,
            mem: FakePhysMem::new(),
            tlb: T::default(),
        }
    }
}

impl<T: TlbOps> Host<T> {
    pub fn cx(&mut self) -> MemCtx<'_, FakePhysMem, T> {
        MemCtx {
            frames: &mut self.frames,
            mem: &mut self.mem,
            tlb: &mut self.tlb,
        }
    }

    /// Allocates frames until only `left` are free; returns them for `unhog`.
    pub fn hog(&mut self, left: usize) -> Vec<PhysAddr> {
        let mut v = Vec::new();
        while self.frames.free_frames() > left {
            v.push(self.frames.alloc().unwrap());
        }
        v
    }

    pub fn unhog(&mut self, v: Vec<PhysAddr>) {
        for f in v {
            assert!(self.frames.put(f).unwrap());
        }
    }
}

/// A guest access as the hardware would do it: translate with the walker's rules, on a fault
/// call `handle_fault` and retry. Returns the PA accessed, or the outcome that stopped it.
pub(super) fn guest_access<T: TlbOps>(
    h: &mut Host<T>,
    s2: &mut Stage2,
    ipa: Ipa,
    write: bool,
) -> Result<PhysAddr, FaultOutcome> {
    for _ in 0..4 {
        match s2.translate(&h.mem, ipa) {
            Some(t) if t.hw_walkable && (!write || t.perms.write) => return Ok(t.pa),
            _ => match s2.handle_fault(&mut h.cx(), ipa, write) {
                Ok(FaultOutcome::Retry) => continue,
                Ok(o) => return Err(o),
                Err(e) => panic!("handle_fault: {e}"),
            },
        }
    }
    panic!("fault at {ipa} not fixed after retries");
}

fn gwrite(h: &mut Host, s2: &mut Stage2, ipa: u64, v: u64) {
    let pa = guest_access(h, s2, Ipa(ipa), true).unwrap();
    h.mem.write(pa, &v.to_le_bytes());
}

fn gread(h: &mut Host, s2: &mut Stage2, ipa: u64) -> u64 {
    let pa = guest_access(h, s2, Ipa(ipa), false).unwrap();
    let mut b = [0u8; 8];
    h.mem.read(pa, &mut b);
    u64::from_le_bytes(b)
}

fn peek(h: &Host, s2: &Stage2, ipa: u64) -> u64 {
    let mut b = [0u8; 8];
    s2.read_guest(&h.mem, Ipa(ipa), &mut b).unwrap();
    u64::from_le_bytes(b)
}

fn vm(h: &mut Host, vmid: u16, pages: u64) -> Stage2 {
    let mut s = Stage2::new(&mut h.cx(), Vmid(vmid)).unwrap();
    s.map_ram(&mut h.cx(), Ipa(RAM), pages, Perms::RWX).unwrap();
    s
}

fn state(h: &Host) -> (FrameAllocator, FakePhysMem) {
    (h.frames.clone(), h.mem.clone())
}

fn assert_unchanged(h: &Host, before: &(FrameAllocator, FakePhysMem)) {
    assert_eq!(
        h.frames.state(),
        before.0.state(),
        "allocator state changed"
    );
    assert!(h.mem.same_contents(&before.1), "memory contents changed");
}

#[test]
fn map_translate_and_monitor_io() {
    let mut h = Host::new(64);
    let mut s = vm(&mut h, 1, 16);
    // 1 root + 1 L2 + 1 L3 + 16 frames.
    assert_eq!(h.frames.used_frames(), 19);
    let t = s.translate(&h.mem, Ipa(RAM + 0x1234)).unwrap();
    assert!(t.hw_walkable && t.perms == Perms::RWX && !t.cow && !t.device);
    assert_eq!(t.pa.page_offset(), 0x234);
    assert_eq!(s.translate(&h.mem, Ipa(RAM + 16 * 4096)), None);
    // A monitor write across a page boundary, read back by the monitor and by the guest.
    let data: Vec<u8> = (0..64u8).collect();
    s.write_guest(&mut h.cx(), Ipa(RAM + 4096 - 32), &data)
        .unwrap();
    let mut back = vec![0u8; 64];
    s.read_guest(&h.mem, Ipa(RAM + 4096 - 32), &mut back)
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(gread(&mut h, &mut s, RAM + 4096) & 0xff, 32);
    assert_eq!(
        s.write_guest(&mut h.cx(), Ipa(RAM + 16 * 4096 - 4), &[1; 8]),
        Err(Stage2Error::NotMapped(Ipa(RAM + 16 * 4096)))
    );
    // The failed write wrote nothing, not even its first 4 bytes.
    assert_eq!(peek(&h, &s, RAM + 16 * 4096 - 8), 0);
    assert_eq!(s.usage(&h.frames, &h.mem).private_frames, 16);
    s.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
}

#[test]
fn map_errors_change_nothing() {
    let mut h = Host::new(64);
    let mut s = vm(&mut h, 1, 4);
    let before = state(&h);
    let mut cx = h.cx();
    assert_eq!(
        s.map_ram(&mut cx, Ipa(RAM + 1), 1, Perms::RWX),
        Err(Stage2Error::Unaligned(Ipa(RAM + 1)))
    );
    assert_eq!(
        s.map_ram(&mut cx, Ipa(RAM - 4096), 2, Perms::RWX),
        Err(Stage2Error::AlreadyMapped(Ipa(RAM)))
    );
    assert_eq!(
        s.map_ram(&mut cx, Ipa(IPA_LIMIT - 4096), 2, Perms::RWX),
        Err(Stage2Error::OutOfRange(Ipa(IPA_LIMIT - 4096)))
    );
    assert_eq!(
        s.map_ram(&mut cx, Ipa(RAM), 0, Perms::RWX),
        Err(Stage2Error::OutOfRange(Ipa(RAM)))
    );
    assert_eq!(
        s.map_ram(&mut cx, Ipa(0x8000_0000), 100, Perms::RWX),
        Err(Stage2Error::OutOfMemory)
    );
    assert_unchanged(&h, &before);
    // Exactly enough memory succeeds: 1 L2 + 1 L3 + pages.
    let free = h.frames.free_frames() as u64;
    s.map_ram(&mut h.cx(), Ipa(0x8000_0000), free - 2, Perms::RWX)
        .unwrap();
    assert_eq!(h.frames.free_frames(), 0);
    s.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
}

#[test]
fn vtcr_and_vttbr() {
    let v = vtcr_el2(0b010, true);
    assert_eq!(v & 0x3f, 25);
    assert_eq!((v >> 6) & 3, 1);
    assert_eq!((v >> 16) & 7, 0b010);
    assert_eq!(v & (1 << 19), 1 << 19);
    assert_eq!(v & (3 << 21), 0, "HA/HD must stay off");
    let mut h: Host = Host::new(4);
    let s = Stage2::new(&mut h.cx(), Vmid(7)).unwrap();
    assert_eq!(s.vttbr_el2(), (7 << 48) | s.root().0);
    s.destroy(&mut h.cx()).unwrap();
}

/// What fork costs: descriptor writes, frames allocated, frame copies, TLB calls.
fn fork_cost(pages: u64) -> (u64, usize, u64, usize) {
    let mut h = Host::new(pages as usize + 1024);
    let mut parent = vm(&mut h, 1, pages);
    h.mem.reset_counters();
    h.tlb.events.clear();
    let used = h.frames.used_frames();
    let (child, fp) = parent.fork(&mut h.cx(), Vmid(2)).unwrap();
    let cost = (
        h.mem.desc_writes,
        h.frames.used_frames() - used,
        h.mem.frame_copies,
        h.tlb.events.len(),
    );
    assert_eq!(h.tlb.events.last(), Some(&TlbEvent::FlushVmid(Vmid(1))));
    fp.release(&mut h.cx()).unwrap();
    child.destroy(&mut h.cx()).unwrap();
    parent.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
    cost
}

#[test]
fn fork_cost_is_independent_of_vm_size() {
    let small = fork_cost(16 * 256); // 16 MiB
    let big = fork_cost(1024 * 256); // 1 GiB
    assert_eq!(small, big, "(desc writes, frames, copies, tlb calls)");
    // One root entry: parent marker + child marker; one new frame (the child's root).
    assert_eq!(small, (2, 1, 0, 1));
}

#[test]
fn cow_isolates_parent_and_child_and_flushes() {
    let mut h = Host::new(256);
    let mut p = vm(&mut h, 1, 8);
    gwrite(&mut h, &mut p, RAM, 0xAAAA);
    gwrite(&mut h, &mut p, RAM + 4096, 0xBBBB);
    let (mut c, fp) = p.fork(&mut h.cx(), Vmid(2)).unwrap();
    // Nothing is hardware-walkable after fork.
    assert!(!p.translate(&h.mem, Ipa(RAM)).unwrap().hw_walkable);
    assert!(!c.translate(&h.mem, Ipa(RAM)).unwrap().hw_walkable);
    assert_eq!(gread(&mut h, &mut c, RAM), 0xAAAA);
    // After the read the child's path is private and the leaf is COW.
    let t = c.translate(&h.mem, Ipa(RAM)).unwrap();
    assert!(t.hw_walkable && t.cow && !t.perms.write);
    h.tlb.events.clear();
    gwrite(&mut h, &mut c, RAM, 0xC0C0);
    assert_eq!(c.stats().cow_copies, 1);
    // Break-before-make of the child's live leaf was flushed for the child's VMID only.
    assert!(h
        .tlb
        .events
        .contains(&TlbEvent::FlushIpa(Vmid(2), Ipa(RAM))));
    assert_eq!(h.tlb.flushes_of(Vmid(1)), 0);
    assert_eq!(h.mem.frame_copies, 1);
    gwrite(&mut h, &mut p, RAM + 4096, 0xD0D0);
    assert_eq!(peek(&h, &p, RAM), 0xAAAA);
    assert_eq!(peek(&h, &p, RAM + 4096), 0xD0D0);
    assert_eq!(peek(&h, &c, RAM), 0xC0C0);
    assert_eq!(peek(&h, &c, RAM + 4096), 0xBBBB);
    // A monitor write into the child does not leak into the parent.
    c.write_guest(&mut h.cx(), Ipa(RAM + 2 * 4096), &7u64.to_le_bytes())
        .unwrap();
    assert_eq!(peek(&h, &p, RAM + 2 * 4096), 0);
    assert_eq!(peek(&h, &c, RAM + 2 * 4096), 7);
    // Usage: the child owns 2 frames privately, shares 6.
    let u = c.usage(&h.frames, &h.mem);
    assert_eq!(
        (u.mapped_pages, u.private_frames, u.shared_frames),
        (8, 2, 6)
    );
    // A second write to the same page is free.
    let copies = h.mem.frame_copies;
    gwrite(&mut h, &mut c, RAM, 1);
    assert_eq!(h.mem.frame_copies, copies);
    fp.release(&mut h.cx()).unwrap();
    c.destroy(&mut h.cx()).unwrap();
    // The parent is now sole owner: its COW leaves are re-enabled without copies.
    let copies = h.mem.frame_copies;
    for i in 0..8 {
        gwrite(&mut h, &mut p, RAM + i * 4096, i);
    }
    assert_eq!(h.mem.frame_copies, copies);
    assert_eq!(p.usage(&h.frames, &h.mem).private_frames, 8);
    p.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
}

#[test]
fn spurious_fault_is_retry() {
    let mut h = Host::new(64);
    let mut s = vm(&mut h, 1, 2);
    let mut cx = h.cx();
    assert_eq!(
        s.handle_fault(&mut cx, Ipa(RAM), true),
        Ok(FaultOutcome::Retry)
    );
    assert_eq!(
        s.handle_fault(&mut cx, Ipa(RAM + 2 * 4096), false),
        Ok(FaultOutcome::NotMapped)
    );
    assert_eq!(
        s.handle_fault(&mut cx, Ipa(IPA_LIMIT), true),
        Ok(FaultOutcome::NotMapped)
    );
    s.destroy(&mut h.cx()).unwrap();
}

#[test]
fn fork_and_cow_out_of_memory_change_nothing() {
    let mut h = Host::new(128);
    let mut p = vm(&mut h, 1, 8);
    gwrite(&mut h, &mut p, RAM, 11);
    // Fork needs one frame.
    let hog = h.hog(0);
    let before = state(&h);
    assert!(matches!(
        p.fork(&mut h.cx(), Vmid(2)),
        Err(Stage2Error::OutOfMemory)
    ));
    assert_unchanged(&h, &before);
    h.unhog(hog);
    let (mut c, fp) = p.fork(&mut h.cx(), Vmid(2)).unwrap();
    // A write in the child needs 3 frames (L2 copy, L3 copy, frame copy): fail with 0, 1, 2.
    for left in 0..3 {
        let hog = h.hog(left);
        let before = state(&h);
        let mut cx = h.cx();
        assert_eq!(
            c.handle_fault(&mut cx, Ipa(RAM), true),
            Ok(FaultOutcome::OutOfMemory)
        );
        assert_eq!(
            c.write_guest(&mut cx, Ipa(RAM), &[1]),
            Err(Stage2Error::OutOfMemory)
        );
        assert_unchanged(&h, &before);
        h.unhog(hog);
    }
    // A read needs 2 (the tables); with 2 it succeeds, and then a write needs only 1.
    let hog = h.hog(2);
    assert_eq!(gread(&mut h, &mut c, RAM), 11);
    assert_eq!(h.frames.free_frames(), 0);
    let before = state(&h);
    assert_eq!(
        c.handle_fault(&mut h.cx(), Ipa(RAM), true),
        Ok(FaultOutcome::OutOfMemory)
    );
    assert_unchanged(&h, &before);
    h.unhog(hog);
    gwrite(&mut h, &mut c, RAM, 22);
    assert_eq!(peek(&h, &p, RAM), 11);
    assert_eq!(peek(&h, &c, RAM), 22);
    fp.release(&mut h.cx()).unwrap();
    c.destroy(&mut h.cx()).unwrap();
    p.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0, "nothing leaked");
}

#[test]
fn thousand_forks_and_kills_return_every_frame() {
    let mut h = Host::new(4096);
    let mut p = vm(&mut h, 1, 64);
    for i in 0..64 {
        gwrite(&mut h, &mut p, RAM + i * 4096, i);
    }
    let free0 = h.frames.free_frames();
    for k in 0..1000u64 {
        let (mut c, fp) = p.fork(&mut h.cx(), Vmid(2 + (k % 1000) as u16)).unwrap();
        if k % 3 == 0 {
            gwrite(&mut h, &mut c, RAM + (k % 64) * 4096, k);
        }
        if k % 5 == 0 {
            gwrite(&mut h, &mut p, RAM + (k % 64) * 4096, k);
        }
        if k % 2 == 0 {
            c.destroy(&mut h.cx()).unwrap();
            fp.release(&mut h.cx()).unwrap();
        } else {
            fp.release(&mut h.cx()).unwrap();
            c.destroy(&mut h.cx()).unwrap();
        }
    }
    // The parent's writes may have made more of its memory private but never more than its
    // 64 pages + its 3 tables: compare after making everything private once.
    for i in 0..64 {
        gwrite(&mut h, &mut p, RAM + i * 4096, i);
    }
    assert_eq!(h.frames.free_frames(), free0);
    assert_eq!(p.usage(&h.frames, &h.mem).private_frames, 64);
    p.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
}

#[test]
fn three_deep_fork_tree_survives_killing_parents_first() {
    let mut h = Host::new(1024);
    let mut a = vm(&mut h, 1, 32);
    gwrite(&mut h, &mut a, RAM, 1);
    let (mut b, fpb) = a.fork(&mut h.cx(), Vmid(2)).unwrap();
    gwrite(&mut h, &mut b, RAM + 4096, 2);
    let (mut c, fpc) = b.fork(&mut h.cx(), Vmid(3)).unwrap();
    gwrite(&mut h, &mut c, RAM + 2 * 4096, 3);
    let (mut d, fpd) = c.fork(&mut h.cx(), Vmid(4)).unwrap();
    gwrite(&mut h, &mut d, RAM, 4);
    // Kill from the top.
    a.destroy(&mut h.cx()).unwrap();
    fpb.release(&mut h.cx()).unwrap();
    b.destroy(&mut h.cx()).unwrap();
    assert_eq!([0, 1, 2].map(|i| peek(&h, &c, RAM + i * 4096)), [1, 2, 3]);
    assert_eq!([0, 1, 2].map(|i| peek(&h, &d, RAM + i * 4096)), [4, 2, 3]);
    fpc.release(&mut h.cx()).unwrap();
    c.destroy(&mut h.cx()).unwrap();
    assert_eq!(gread(&mut h, &mut d, RAM + 4096), 2);
    gwrite(&mut h, &mut d, RAM + 4096, 5);
    assert_eq!(peek(&h, &d, RAM + 4096), 5);
    // d is the last VM alive; its fork point still pins c's old tables.
    fpd.release(&mut h.cx()).unwrap();
    let u = d.usage(&h.frames, &h.mem);
    assert_eq!(u.private_frames, 32, "{u:?}");
    d.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
}

#[test]
fn reset_returns_to_fork_point_in_dirty_time() {
    // The same dirtying on a small and a big VM must cost the same to reset. The first reset
    // (the log starts at the fork) puts back only the dirty leaves: each gets its fork-point
    // frame back (and a flush of its IPA), its private frame is freed, and the tables the child
    // copied stay, equivalent to the fork point's.
    fn run(pages: u64) -> (u64, usize, usize) {
        let mut h = Host::new(pages as usize + 1024);
        let mut p = vm(&mut h, 1, pages);
        gwrite(&mut h, &mut p, RAM, 0x1111);
        let (mut c, fp) = p.fork(&mut h.cx(), Vmid(2)).unwrap();
        let mut free_after_reset = None;
        for round in 0..3 {
            for i in 0..4 {
                gwrite(&mut h, &mut c, RAM + i * 4096, 100 + i + round);
            }
            c.write_guest(&mut h.cx(), Ipa(RAM + (pages - 1) * 4096), &[9])
                .unwrap();
            h.mem.reset_counters();
            h.tlb.events.clear();
            let free_dirty = h.frames.free_frames();
            c.reset(&mut h.cx(), &fp).unwrap();
            for ipa in [0, 1, 2, 3, pages - 1].map(|i| Ipa(RAM + i * 4096)) {
                assert!(
                    h.tlb.events.contains(&TlbEvent::FlushIpa(Vmid(2), ipa)),
                    "no flush of {ipa}"
                );
            }
            // Only the five private frames are freed, and every round ends at the same count.
            assert_eq!(h.frames.free_frames() - free_dirty, 5);
            let free = h.frames.free_frames();
            assert_eq!(*free_after_reset.get_or_insert(free), free);
            assert_eq!(peek(&h, &c, RAM), 0x1111);
            assert_eq!(peek(&h, &c, RAM + 4096), 0);
            assert_eq!(peek(&h, &c, RAM + (pages - 1) * 4096), 0);
            assert_eq!(peek(&h, &p, RAM), 0x1111);
            if round == 2 {
                let freed = h.frames.free_frames() - free_dirty;
                fp.release(&mut h.cx()).unwrap();
                c.destroy(&mut h.cx()).unwrap();
                p.destroy(&mut h.cx()).unwrap();
                assert_eq!(h.frames.used_frames(), 0);
                return (h.mem.desc_writes, h.tlb.events.len(), freed);
            }
        }
        unreachable!()
    }
    let small = run(16 * 256);
    let big = run(1024 * 256);
    assert_eq!(small, big);
    assert_eq!(small.2, 5);
}

#[test]
fn a_reset_of_many_dirty_pages_flushes_the_vmid_once() {
    // Past RESET_VMID_FLUSH_ABOVE dirty leaves, the reset breaks them all, flushes the child's
    // VMID once, then makes them: no TLBI by IPA, one flush_vmid, and that flush comes before
    // any leaf is made valid again (every Sync, which precedes each make, follows it). At the
    // threshold itself it still flushes page by page.
    for (dirty, batched) in [
        (RESET_VMID_FLUSH_ABOVE as u64, false),
        (RESET_VMID_FLUSH_ABOVE as u64 + 1, true),
        (700, true),
    ] {
        let mut h = Host::new(4096);
        let mut p = vm(&mut h, 1, 1024);
        for i in 0..dirty {
            gwrite(&mut h, &mut p, RAM + i * 4096, 7_000 + i);
        }
        let (mut c, fp) = p.fork(&mut h.cx(), Vmid(2)).unwrap();
        for i in 0..dirty {
            gwrite(&mut h, &mut c, RAM + i * 4096, i);
        }
        h.tlb.events.clear();
        let free_dirty = h.frames.free_frames();
        c.reset(&mut h.cx(), &fp).unwrap();
        let ev = &h.tlb.events;
        let ipa_flushes = ev
            .iter()
            .filter(|e| matches!(e, TlbEvent::FlushIpa(..)))
            .count();
        let vmid_flushes: Vec<usize> = (0..ev.len())
            .filter(|&i| ev[i] == TlbEvent::FlushVmid(Vmid(2)))
            .collect();
        if batched {
            assert_eq!(ipa_flushes, 0, "{dirty} dirty pages: {ev:?}");
            assert_eq!(vmid_flushes.len(), 1, "{dirty} dirty pages");
            let syncs: Vec<usize> = (0..ev.len()).filter(|&i| ev[i] == TlbEvent::Sync).collect();
            assert!(syncs.len() >= dirty as usize);
            assert!(
                syncs.iter().all(|&i| i > vmid_flushes[0]),
                "made before the flush"
            );
        } else {
            assert_eq!(ipa_flushes, dirty as usize);
            assert!(vmid_flushes.is_empty());
        }
        // Every private frame is freed, and the child is back at the fork point.
        assert_eq!(h.frames.free_frames() - free_dirty, dirty as usize);
        for i in 0..dirty {
            assert_eq!(peek(&h, &c, RAM + i * 4096), 7_000 + i);
            assert_eq!(peek(&h, &p, RAM + i * 4096), 7_000 + i);
        }
        // The leaves are read-only COW again: a write copies once more, and the log is valid.
        gwrite(&mut h, &mut c, RAM, 1);
        assert_eq!(peek(&h, &p, RAM), 7_000);
        c.reset(&mut h.cx(), &fp).unwrap();
        assert_eq!(peek(&h, &c, RAM), 7_000);
        fp.release(&mut h.cx()).unwrap();
        c.destroy(&mut h.cx()).unwrap();
        p.destroy(&mut h.cx()).unwrap();
        assert_eq!(h.frames.used_frames(), 0);
    }
}

#[test]
fn a_batched_reset_of_a_corrupt_log_changes_nothing() {
    // The batched reset checks each leaf as it breaks it: one that is not a page any more is
    // reported, and the leaves broken before it get their entries back.
    let mut h = Host::new(4096);
    let mut p = vm(&mut h, 1, 1024);
    let (mut c, fp) = p.fork(&mut h.cx(), Vmid(2)).unwrap();
    for i in 0..100 {
        gwrite(&mut h, &mut c, RAM + i * 4096, i);
    }
    let bad = c.dirty[70];
    h.mem.write_desc(bad.table, bad.index, 0);
    let before = state(&h);
    assert_eq!(
        c.reset(&mut h.cx(), &fp),
        Err(Stage2Error::Corrupt(bad.ipa))
    );
    assert_unchanged(&h, &before);
    assert_eq!(peek(&h, &c, RAM + 69 * 4096), 69);
}

#[test]
fn a_fork_of_a_fork_falls_back_to_the_full_reset() {
    // Once the child is forked itself its tables are shared: its next reset cannot use the
    // dirty log and releases its whole private tree instead; the one after uses the log again.
    let mut h = Host::new(4096);
    let mut p = vm(&mut h, 1, 1024);
    gwrite(&mut h, &mut p, RAM, 1);
    let (mut c, fp) = p.fork(&mut h.cx(), Vmid(2)).unwrap();
    gwrite(&mut h, &mut c, RAM, 2);
    let (g, fpg) = c.fork(&mut h.cx(), Vmid(3)).unwrap();
    gwrite(&mut h, &mut c, RAM + 4096, 3);
    c.reset(&mut h.cx(), &fp).unwrap();
    assert_eq!(peek(&h, &c, RAM), 1);
    assert_eq!(peek(&h, &c, RAM + 4096), 0);
    assert_eq!(
        peek(&h, &g, RAM),
        2,
        "the grandchild keeps its fork point's memory"
    );
    gwrite(&mut h, &mut c, RAM, 4);
    h.tlb.events.clear();
    c.reset(&mut h.cx(), &fp).unwrap();
    assert!(h
        .tlb
        .events
        .contains(&TlbEvent::FlushIpa(Vmid(2), Ipa(RAM))));
    assert_eq!(peek(&h, &c, RAM), 1);
    for s in [g, c, p] {
        s.destroy(&mut h.cx()).unwrap();
    }
    fpg.release(&mut h.cx()).unwrap();
    fp.release(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
}

#[test]
fn rom_and_device_pages() {
    let mut h = Host::new(128);
    let mut s = Stage2::new(&mut h.cx(), Vmid(1)).unwrap();
    s.map_ram(&mut h.cx(), Ipa(0), 2, Perms::RX).unwrap();
    s.map_device(
        &mut h.cx(),
        Ipa(0x0900_0000),
        PhysAddr(0x0900_0000),
        4096,
        Perms::RW,
    )
    .unwrap();
    // The monitor may load a ROM; the guest may not write it.
    s.write_guest(&mut h.cx(), Ipa(0), &[0xEE; 4]).unwrap();
    assert_eq!(
        guest_access(&mut h, &mut s, Ipa(0), true),
        Err(FaultOutcome::PermissionDenied)
    );
    let dev = s.translate(&h.mem, Ipa(0x0900_0010)).unwrap();
    assert!(dev.device && dev.pa == PhysAddr(0x0900_0010) && !dev.perms.exec);
    assert_eq!(
        s.write_guest(&mut h.cx(), Ipa(0x0900_0000), &[1]),
        Err(Stage2Error::NotMapped(Ipa(0x0900_0000)))
    );
    let (mut c, fp) = s.fork(&mut h.cx(), Vmid(2)).unwrap();
    // The fork shares the device mapping (writable, not COW) and the ROM stays read-only.
    assert!(guest_access(&mut h, &mut c, Ipa(0x0900_0000), true).is_ok());
    assert_eq!(
        guest_access(&mut h, &mut c, Ipa(0), true),
        Err(FaultOutcome::PermissionDenied)
    );
    // A monitor write to the child's ROM copies it; the parent keeps its contents.
    c.write_guest(&mut h.cx(), Ipa(0), &[0x11]).unwrap();
    assert_eq!(peek(&h, &s, 0) & 0xff, 0xEE);
    assert_eq!(peek(&h, &c, 0) & 0xff, 0x11);
    assert_eq!(c.translate(&h.mem, Ipa(0)).unwrap().perms, Perms::RX);
    // Unmap drops references (device pages have none).
    c.unmap(&mut h.cx(), Ipa(0), 2).unwrap();
    c.unmap(&mut h.cx(), Ipa(0x0900_0000), 1).unwrap();
    assert_eq!(c.translate(&h.mem, Ipa(0)), None);
    assert_eq!(peek(&h, &s, 4096), 0);
    fp.release(&mut h.cx()).unwrap();
    c.destroy(&mut h.cx()).unwrap();
    s.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
}
