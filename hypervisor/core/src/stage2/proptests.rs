//! Property test of fork/COW/reset/kill against a plain reference model.
//!
//! The model is a map (holder, page) -> value, where holders are live VMs and fork points, plus
//! a frame identity per (holder, page): a fork copies the identities, a write to an identity held
//! by more than one holder gives the writer a fresh one. So the model knows how many distinct
//! frames must be alive, and every VM's memory.
//!
//! Guests access memory through [`ModelTlb`], a TLB that caches every successful walk forever
//! and only forgets on `flush_ipa`/`flush_vmid`: a missing or wrong-VMID flush lets a guest use a
//! stale translation (write into a shared frame, read a freed one) and the memory check fails.
//!
//! After every step: every VM's memory equals the model (read through its TLB entries when it
//! has them), the set of frames reachable from all roots and fork points has exactly the
//! allocator's reference counts, nothing else is allocated, the number of distinct data frames
//! equals the model's, and the hardware-walkable part of every VM obeys the invariant.

use std::collections::HashMap;

use proptest::prelude::*;

use super::tests::{Host, RAM};
use super::*;
use crate::physmem::FakePhysMem;

/// A TLB that remembers every walk until flushed.
#[derive(Default)]
struct ModelTlb {
    entries: HashMap<(Vmid, u64), (PhysAddr, bool)>,
    flushes: u64,
}

impl TlbOps for ModelTlb {
    fn flush_ipa(&mut self, vmid: Vmid, ipa: Ipa) {
        self.flushes += 1;
        self.entries.remove(&(vmid, ipa.0 >> 12));
    }
    fn flush_vmid(&mut self, vmid: Vmid) {
        self.flushes += 1;
        self.entries.retain(|k, _| k.0 != vmid);
    }
    fn flush_all(&mut self) {
        self.flushes += 1;
        self.entries.clear();
    }
}

/// The IPAs of the test pages: two level-3 tables under one level-2 entry boundary, and a second
/// level-1 entry.
fn pages() -> Vec<u64> {
    let mut v: Vec<u64> = (0..6).map(|i| RAM + i * 4096).collect();
    v.extend((0..4).map(|i| RAM + 0x1f_e000 + i * 4096));
    v.extend((0..3).map(|i| 0x8000_0000 + i * 4096));
    v
}

#[derive(Clone, Debug)]
struct MPages {
    vals: Vec<u64>,
    ids: Vec<u64>,
}

#[derive(Default)]
struct Model {
    id_refs: HashMap<u64, usize>,
    next_id: u64,
}

impl Model {
    fn fresh(&mut self, n: usize) -> MPages {
        let ids: Vec<u64> = (0..n as u64).map(|i| self.next_id + i).collect();
        self.next_id += n as u64;
        let p = MPages {
            vals: vec![0; n],
            ids,
        };
        self.hold(&p);
        p
    }
    fn hold(&mut self, p: &MPages) {
        for id in &p.ids {
            *self.id_refs.entry(*id).or_default() += 1;
        }
    }
    fn release(&mut self, p: &MPages) {
        for id in &p.ids {
            let r = self.id_refs.get_mut(id).unwrap();
            *r -= 1;
            if *r == 0 {
                self.id_refs.remove(id);
            }
        }
    }
    fn write(&mut self, p: &mut MPages, i: usize, v: u64) {
        if self.id_refs[&p.ids[i]] > 1 {
            *self.id_refs.get_mut(&p.ids[i]).unwrap() -= 1;
            p.ids[i] = self.next_id;
            self.next_id += 1;
            self.id_refs.insert(p.ids[i], 1);
        }
        p.vals[i] = v;
    }
}

struct Vm {
    s2: Stage2,
    mem: MPages,
    /// The fork point this VM was born from, and its model.
    fp: Option<(ForkPoint, MPages)>,
}

#[derive(Clone, Debug)]
enum Op {
    GuestWrite(usize, usize, u64),
    MonitorWrite(usize, usize, u64),
    GuestRead(usize, usize),
    Fork(usize),
    Kill(usize),
    /// A reset, batched (one VMID-wide flush) when more than the second number of leaves are
    /// dirty.
    Reset(usize, usize),
    ReleaseFp(usize),
    /// A guest write with only `left` frames free.
    Starved(usize, usize, usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let ix = || 0usize..64;
    prop_oneof![
        8 => (ix(), ix(), any::<u64>()).prop_map(|(a, b, v)| Op::GuestWrite(a, b, v)),
        2 => (ix(), ix(), any::<u64>()).prop_map(|(a, b, v)| Op::MonitorWrite(a, b, v)),
        5 => (ix(), ix()).prop_map(|(a, b)| Op::GuestRead(a, b)),
        3 => ix().prop_map(Op::Fork),
        2 => ix().prop_map(Op::Kill),
        2 => (ix(), 0usize..16).prop_map(|(a, above)| Op::Reset(a, above)),
        1 => ix().prop_map(Op::ReleaseFp),
        1 => (ix(), ix(), 0usize..3, any::<u64>()).prop_map(|(a, b, l, v)| Op::Starved(a, b, l, v)),
    ]
}

/// A guest access of `s2` through the model TLB, faulting like the hardware would.
fn model_access(
    h: &mut Host<ModelTlb>,
    s2: &mut Stage2,
    ipa: u64,
    write: bool,
) -> Result<PhysAddr, FaultOutcome> {
    let key = (s2.vmid().expect("the test's VMs have a VMID"), ipa >> 12);
    for _ in 0..4 {
        if let Some(&(pa, w)) = h.tlb.entries.get(&key) {
            if !write || w {
                return Ok(pa);
            }
            // A permission fault from a cached entry: the hardware does not re-walk.
        } else {
            match s2.translate(&h.mem, Ipa(ipa)) {
                Some(t) if t.hw_walkable && (!write || t.perms.write) => {
                    assert!(!t.device);
                    h.tlb.entries.insert(key, (t.pa, t.perms.write));
                    return Ok(t.pa);
                }
                _ => {}
            }
        }
        match s2.handle_fault(&mut h.cx(), Ipa(ipa), write) {
            Ok(FaultOutcome::Retry) => {}
            Ok(o) => return Err(o),
            Err(e) => panic!("handle_fault: {e}"),
        }
    }
    panic!("fault at {ipa:#x} not fixed (stale TLB entry not flushed?)");
}

/// A reset of many dirty pages (the batched one: one VMID-wide flush) leaves no stale
/// translation: the child's TLB held a writable entry to each private frame, and after the
/// reset every read through the model TLB sees the fork point's value, in the child and in the
/// parent, round after round. A missing or wrong-VMID flush fails here (the child would read
/// its own writes from freed frames).
#[test]
fn a_batched_reset_leaves_no_stale_translation() {
    const PAGES: u64 = 300;
    let mut h: Host<ModelTlb> = Host::new(2048);
    let mut p = Stage2::new(&mut h.cx(), Vmid(1)).unwrap();
    p.map_ram(&mut h.cx(), Ipa(RAM), PAGES, Perms::RWX).unwrap();
    let page = |i: u64| RAM + i * 4096;
    let rd = |h: &mut Host<ModelTlb>, s2: &mut Stage2, i: u64| {
        let pa = model_access(h, s2, page(i), false).unwrap();
        let mut b = [0u8; 8];
        h.mem.read(pa, &mut b);
        u64::from_le_bytes(b)
    };
    for i in 0..PAGES {
        let pa = model_access(&mut h, &mut p, page(i), true).unwrap();
        h.mem.write(pa, &(1000 + i).to_le_bytes());
    }
    let (mut c, fp) = p.fork(&mut h.cx(), Vmid(2)).unwrap();
    for round in 0..3 {
        for i in 0..PAGES {
            let pa = model_access(&mut h, &mut c, page(i), true).unwrap();
            h.mem.write(pa, &(round * 10_000 + i).to_le_bytes());
            assert_eq!(rd(&mut h, &mut c, i), round * 10_000 + i);
        }
        let cached = h.tlb.entries.keys().filter(|k| k.0 == Vmid(2)).count();
        assert_eq!(cached, PAGES as usize);
        let flushes = h.tlb.flushes;
        c.reset(&mut h.cx(), &fp).unwrap();
        assert_eq!(h.tlb.flushes - flushes, 1, "one VMID-wide flush");
        for i in 0..PAGES {
            assert_eq!(
                rd(&mut h, &mut c, i),
                1000 + i,
                "child page {i}, round {round}"
            );
            assert_eq!(
                rd(&mut h, &mut p, i),
                1000 + i,
                "parent page {i}, round {round}"
            );
        }
    }
    fp.release(&mut h.cx()).unwrap();
    c.destroy(&mut h.cx()).unwrap();
    p.destroy(&mut h.cx()).unwrap();
    assert_eq!(h.frames.used_frames(), 0);
}

const MAX_VMS: usize = 6;

struct World {
    h: Host<ModelTlb>,
    vms: Vec<Vm>,
    model: Model,
    ipas: Vec<u64>,
    next_vmid: u16,
}

impl World {
    fn new() -> Self {
        World {
            h: Host::new(2048),
            vms: Vec::new(),
            model: Model::default(),
            ipas: pages(),
            next_vmid: 1,
        }
    }

    fn vmid(&mut self) -> Vmid {
        self.next_vmid = self.next_vmid.wrapping_add(1).max(1);
        Vmid(self.next_vmid)
    }

    fn new_vm(&mut self) {
        let vmid = self.vmid();
        let mut s2 = Stage2::new(&mut self.h.cx(), vmid).unwrap();
        for (base, n) in [(RAM, 6), (RAM + 0x1f_e000, 4), (0x8000_0000, 3)] {
            s2.map_ram(&mut self.h.cx(), Ipa(base), n, Perms::RWX)
                .unwrap();
        }
        let mem = self.model.fresh(self.ipas.len());
        self.vms.push(Vm { s2, mem, fp: None });
    }

    /// A guest access through the model TLB, faulting like the hardware would.
    fn access(&mut self, v: usize, ipa: u64, write: bool) -> Result<PhysAddr, FaultOutcome> {
        model_access(&mut self.h, &mut self.vms[v].s2, ipa, write)
    }

    fn apply(&mut self, op: Op) {
        if self.vms.is_empty() {
            self.new_vm();
        }
        let n = self.vms.len();
        let np = self.ipas.len();
        match op {
            Op::GuestWrite(a, p, val) => {
                let (a, p) = (a % n, p % np);
                let pa = self.access(a, self.ipas[p], true).unwrap();
                self.h.mem.write(pa, &val.to_le_bytes());
                let Vm { mem, .. } = &mut self.vms[a];
                self.model.write(mem, p, val);
            }
            Op::MonitorWrite(a, p, val) => {
                let (a, p) = (a % n, p % np);
                // When the previous page is contiguous, straddle it: 8 bytes at the end of page
                // p-1 (outside what the model compares, but they make that frame private too).
                let straddle = p > 0 && self.ipas[p - 1] + 4096 == self.ipas[p];
                let mut buf = [0u8; 16];
                buf[..8].copy_from_slice(&val.rotate_left(7).to_le_bytes());
                buf[8..].copy_from_slice(&val.to_le_bytes());
                let (ipa, bytes) = if straddle {
                    (self.ipas[p] - 8, &buf[..])
                } else {
                    (self.ipas[p], &buf[8..])
                };
                let vm = &mut self.vms[a];
                vm.s2
                    .write_guest(&mut self.h.cx(), Ipa(ipa), bytes)
                    .unwrap();
                if straddle {
                    let same = vm.mem.vals[p - 1];
                    self.model.write(&mut vm.mem, p - 1, same);
                }
                self.model.write(&mut vm.mem, p, val);
                let mut back = [0u8; 16];
                vm.s2
                    .read_guest(&self.h.mem, Ipa(ipa), &mut back[..bytes.len()])
                    .unwrap();
                assert_eq!(&back[..bytes.len()], bytes);
            }
            Op::GuestRead(a, p) => {
                let (a, p) = (a % n, p % np);
                let pa = self.access(a, self.ipas[p], false).unwrap();
                let mut b = [0u8; 8];
                self.h.mem.read(pa, &mut b);
                assert_eq!(u64::from_le_bytes(b), self.vms[a].mem.vals[p]);
            }
            Op::Fork(a) => {
                let a = a % n;
                if n >= MAX_VMS {
                    return self.apply(Op::Kill(a));
                }
                let vmid = self.vmid();
                let (child, fp) = self.vms[a].s2.fork(&mut self.h.cx(), vmid).unwrap();
                let m = self.vms[a].mem.clone();
                self.model.hold(&m);
                self.model.hold(&m);
                self.vms.push(Vm {
                    s2: child,
                    mem: m.clone(),
                    fp: Some((fp, m)),
                });
            }
            Op::Kill(a) => {
                let vm = self.vms.swap_remove(a % n);
                vm.s2.destroy(&mut self.h.cx()).unwrap();
                self.model.release(&vm.mem);
                if let Some((fp, m)) = vm.fp {
                    fp.release(&mut self.h.cx()).unwrap();
                    self.model.release(&m);
                }
            }
            Op::Reset(a, above) => {
                let vm = &mut self.vms[a % n];
                if let Some((fp, m)) = &vm.fp {
                    vm.s2.reset_above(&mut self.h.cx(), fp, above).unwrap();
                    self.model.hold(m);
                    self.model.release(&vm.mem);
                    vm.mem = m.clone();
                }
            }
            Op::ReleaseFp(a) => {
                if let Some((fp, m)) = self.vms[a % n].fp.take() {
                    fp.release(&mut self.h.cx()).unwrap();
                    self.model.release(&m);
                }
            }
            Op::Starved(a, p, left, val) => {
                let (a, p) = (a % n, p % np);
                let hog = self.h.hog(left);
                let before = (self.h.frames.state(), self.h.mem.clone());
                match self.access(a, self.ipas[p], true) {
                    Ok(pa) => {
                        self.h.mem.write(pa, &val.to_le_bytes());
                        let Vm { mem, .. } = &mut self.vms[a];
                        self.model.write(mem, p, val);
                    }
                    Err(FaultOutcome::OutOfMemory) => {
                        assert_eq!(self.h.frames.state(), before.0, "OOM changed refcounts");
                        assert!(self.h.mem.same_contents(&before.1), "OOM changed tables");
                    }
                    Err(o) => panic!("unexpected {o:?}"),
                }
                self.h.unhog(hog);
            }
        }
    }

    /// Every check of the module docs.
    fn check(&self) {
        let mem = &self.h.mem;
        // 1. Memory equals the model, read as the guest would (through cached translations).
        for vm in &self.vms {
            for (i, &ipa) in self.ipas.iter().enumerate() {
                let pa = match self.h.tlb.entries.get(&(vm.s2.vmid().unwrap(), ipa >> 12)) {
                    Some(&(pa, _)) => pa,
                    None => vm.s2.translate(mem, Ipa(ipa)).unwrap().pa,
                };
                let mut b = [0u8; 8];
                mem.read(pa, &mut b);
                assert_eq!(
                    u64::from_le_bytes(b),
                    vm.mem.vals[i],
                    "vm {:?} page {ipa:#x}",
                    vm.s2.vmid()
                );
            }
        }
        // 2. References found by walking all roots and fork points = the allocator's counts.
        let mut refs: HashMap<PhysAddr, u32> = HashMap::new();
        let mut data: HashMap<PhysAddr, ()> = HashMap::new();
        let mut seen: HashMap<PhysAddr, ()> = HashMap::new();
        for vm in &self.vms {
            refs.insert(vm.s2.root(), 1);
            walk_all(mem, vm.s2.root(), 1, &mut refs, &mut data, &mut seen);
            if let Some((fp, _)) = &vm.fp {
                for t in fp.tables() {
                    *refs.entry(t).or_default() += 1;
                    if seen.insert(t, ()).is_none() {
                        walk_all(mem, t, 2, &mut refs, &mut data, &mut seen);
                    }
                }
            }
        }
        for (pa, n) in &refs {
            assert_eq!(self.h.frames.refcount(*pa), *n, "refcount of {pa:?}");
        }
        assert_eq!(
            self.h.frames.used_frames(),
            refs.len(),
            "leaked or lost frames"
        );
        assert_eq!(data.len(), self.model.id_refs.len(), "distinct data frames");
        assert_eq!(
            self.h.frames.free_frames(),
            self.h.frames.total_frames() - data.len() - (refs.len() - data.len())
        );
        // 3. The invariant on what the hardware can walk.
        for vm in &self.vms {
            hw_invariant(&self.h.frames, mem, vm.s2.root(), 1);
        }
        // 4. The kept counters and the census that skips shared tables equal the full walk.
        for vm in &self.vms {
            assert_counters_match_census(&vm.s2, &self.h.frames, mem);
        }
    }
}

/// [`Stage2::mapped_pages`] and [`Stage2::usage_private`] against [`Stage2::usage`].
fn assert_counters_match_census(s2: &Stage2, frames: &FrameAllocator, mem: &FakePhysMem) {
    let full = s2.usage(frames, mem);
    let fast = s2.usage_private(frames, mem);
    assert_eq!(
        s2.mapped_pages() as usize,
        full.mapped_pages,
        "mapped pages"
    );
    assert_eq!(fast.mapped_pages, full.mapped_pages);
    assert_eq!(fast.private_frames, full.private_frames, "private frames");
    assert_eq!(fast.shared_frames, full.shared_frames, "shared frames");
    assert_eq!(fast.private_tables, full.private_tables, "private tables");
}

fn read_table(mem: &FakePhysMem, t: PhysAddr) -> [u64; 512] {
    let mut bytes = [0u8; 4096];
    mem.read(t, &mut bytes);
    let mut d = [0u64; 512];
    for (i, c) in bytes.chunks_exact(8).enumerate() {
        d[i] = u64::from_le_bytes(c.try_into().unwrap());
    }
    d
}

fn walk_all(
    mem: &FakePhysMem,
    t: PhysAddr,
    level: u8,
    refs: &mut HashMap<PhysAddr, u32>,
    data: &mut HashMap<PhysAddr, ()>,
    seen: &mut HashMap<PhysAddr, ()>,
) {
    for d in read_table(mem, t) {
        match desc::decode(d, level) {
            desc::Desc::Table(x) | desc::Desc::Marker(x) => {
                *refs.entry(x).or_default() += 1;
                if seen.insert(x, ()).is_none() {
                    walk_all(mem, x, level + 1, refs, data, seen);
                }
            }
            desc::Desc::Page(f) => {
                assert_ne!(d & desc::AF, 0, "AF clear in a leaf");
                assert_eq!(d & desc::DBM, 0, "DBM set in a leaf");
                *refs.entry(f).or_default() += 1;
                data.insert(f, ());
            }
            desc::Desc::Empty => {}
            desc::Desc::Other => panic!("unexpected descriptor {d:#x}"),
        }
    }
}

/// Tables the hardware walks have count 1; their writable leaves have frames of count 1.
fn hw_invariant(frames: &FrameAllocator, mem: &FakePhysMem, t: PhysAddr, level: u8) {
    for d in read_table(mem, t) {
        match desc::decode(d, level) {
            desc::Desc::Table(x) => {
                assert_eq!(frames.refcount(x), 1, "hardware-walkable shared table");
                hw_invariant(frames, mem, x, level + 1);
            }
            desc::Desc::Page(f) if desc::is_writable(d) => {
                assert_eq!(frames.refcount(f), 1, "writable leaf of a shared frame");
                assert!(!desc::is_cow(d));
            }
            _ => {}
        }
    }
}

proptest! {
    // 80 cases x ~1,300 ops ≈ 100,000 operations, each followed by the full check.
    #![proptest_config(ProptestConfig { cases: 80, ..ProptestConfig::default() })]
    #[test]
    fn fork_cow_reset_kill_match_the_model(ops in proptest::collection::vec(op(), 1200..1400)) {
        let mut w = World::new();
        w.new_vm();
        for op in ops {
            w.apply(op);
            w.check();
        }
        // Tear everything down: every frame comes back.
        while !w.vms.is_empty() {
            let n = w.vms.len();
            w.apply(Op::Kill(n - 1));
        }
        prop_assert_eq!(w.h.frames.used_frames(), 0);
        prop_assert!(w.h.tlb.flushes > 0);
    }
}

/// What the counters test does: map or unmap a run of pages, write one (a COW fault), fork,
/// kill, reset.
#[derive(Clone, Debug)]
enum CountOp {
    Map(usize, u64, u64),
    Unmap(usize, u64, u64),
    Write(usize, u64),
    Fork(usize),
    Kill(usize),
    Reset(usize),
}

fn count_op() -> impl Strategy<Value = CountOp> {
    // Page indexes over 3 MiB: runs cross level-3 and level-2 table boundaries.
    let page = || 0u64..768;
    let run = || 1u64..80;
    let ix = || 0usize..8;
    prop_oneof![
        3 => (ix(), page(), run()).prop_map(|(a, p, n)| CountOp::Map(a, p, n)),
        2 => (ix(), page(), run()).prop_map(|(a, p, n)| CountOp::Unmap(a, p, n)),
        5 => (ix(), page()).prop_map(|(a, p)| CountOp::Write(a, p)),
        2 => ix().prop_map(CountOp::Fork),
        1 => ix().prop_map(CountOp::Kill),
        1 => ix().prop_map(CountOp::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// The per-VM counters kept as tables change (and the census that stops at shared tables)
    /// equal a full walk after any sequence of maps, unmaps, COW writes, forks, kills and resets.
    #[test]
    fn kept_counters_equal_the_full_census(ops in proptest::collection::vec(count_op(), 1..200)) {
        let mut h: Host<ModelTlb> = Host::new(8192);
        let mut next = 1u16;
        let mut vms: Vec<(Stage2, Option<ForkPoint>)> = Vec::new();
        for op in ops {
            if vms.is_empty() {
                next += 1;
                vms.push((Stage2::new(&mut h.cx(), Vmid(next)).unwrap(), None));
            }
            let n = vms.len();
            match op {
                CountOp::Map(a, p, k) => {
                    // Refused (nothing changed) when a page of the run is mapped already.
                    let _ = vms[a % n].0.map_ram(&mut h.cx(), Ipa(RAM + p * 4096), k, Perms::RWX);
                }
                CountOp::Unmap(a, p, k) => {
                    vms[a % n].0.unmap(&mut h.cx(), Ipa(RAM + p * 4096), k).unwrap();
                }
                CountOp::Write(a, p) => {
                    let _ = vms[a % n].0.handle_fault(&mut h.cx(), Ipa(RAM + p * 4096), true);
                }
                CountOp::Fork(a) if n < 6 => {
                    next += 1;
                    let (c, fp) = vms[a % n].0.fork(&mut h.cx(), Vmid(next)).unwrap();
                    vms.push((c, Some(fp)));
                }
                CountOp::Fork(a) | CountOp::Kill(a) => {
                    let (s2, fp) = vms.swap_remove(a % n);
                    s2.destroy(&mut h.cx()).unwrap();
                    if let Some(fp) = fp {
                        fp.release(&mut h.cx()).unwrap();
                    }
                }
                CountOp::Reset(a) => {
                    let (s2, fp) = &mut vms[a % n];
                    if let Some(fp) = fp {
                        s2.reset(&mut h.cx(), fp).unwrap();
                    }
                }
            }
            for (s2, _) in &vms {
                assert_counters_match_census(s2, &h.frames, &h.mem);
            }
        }
        for (s2, fp) in vms {
            s2.destroy(&mut h.cx()).unwrap();
            if let Some(fp) = fp {
                fp.release(&mut h.cx()).unwrap();
            }
        }
        prop_assert_eq!(h.frames.used_frames(), 0);
    }
}
