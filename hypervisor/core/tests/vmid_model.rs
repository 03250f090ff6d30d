//! VMIDs by generation against a plain reference model, on the host.
//!
//! A VM holds a VMID only while the current generation gave it one; `VmTable::pick` gives the
//! VM it picks one, rolling over to a new generation when none is free: every VM loses its
//! VMID but those with a vCPU on a CPU, then one `flush_all` (`machine::table`,
//! `VmidAllocator`). Random picks, put-backs, forks, kills, pauses and resumes over three fake
//! CPUs with only 2 to 4 VMIDs must keep, after every step:
//!
//! * a VMID of the current generation names one VM at most, the one the allocator says;
//! * a vCPU on a CPU has its VM's VMID, unchanged since it entered (a running VM keeps it
//!   across rollovers);
//! * the TLB model (`machine::fake::CountTlb`) holds entries only under the VMID their VM holds
//!   now, and no vCPU enters with a VMID whose entries belong to other tables;
//! * a pick finds a vCPU whenever the reference has one runnable, unless every VMID is held by
//!   a VM on a CPU (only possible with fewer VMIDs than CPUs).

mod common;
use common::create_vm;

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmfork_core::machine::fake::FakeHost;
use vmfork_core::machine::{PauseReason, StopReason, VcpuCtx, VcpuState, VmState, VmTable};
use vmfork_core::stage2::Vmid;

const CPUS: usize = 3;
const MAX_VMS: usize = 10;

/// A table with `vms` VMs of 2 MiB (the odd ones with two vCPUs, both runnable) and `limit`
/// VMIDs.
fn table(vms: usize, limit: u16) -> (VmTable<FakeHost>, Vec<u32>) {
    let mut t = VmTable::new(FakeHost::new(4096));
    t.vmids.set_limit(limit);
    t.limits.max_vms = 64;
    t.limits.max_forks_per_tree = 64;
    let mut ids = Vec::new();
    for n in 0..vms {
        let cpus = 1 + (n % 2) as u32;
        let id = create_vm(&mut t, &format!("v{n}"), 2 << 20, cpus).expect("the VMs fit");
        ids.push(id);
    }
    (t, ids)
}

fn vmid_of(t: &VmTable<FakeHost>, id: u32) -> Option<Vmid> {
    t.vms.get(&id)?.s2.as_ref()?.vmid()
}

fn vttbr_of(t: &VmTable<FakeHost>, id: u32) -> u64 {
    t.vms.get(&id).unwrap().s2.as_ref().unwrap().vttbr_el2()
}

/// What a vCPU entering its guest does to the TLB model.
fn enter(t: &VmTable<FakeHost>, id: u32) -> Result<u64, String> {
    let vttbr = vttbr_of(t, id);
    t.host.mem.borrow_mut().tlb.enter(vttbr).map(|()| vttbr)
}

#[derive(Clone, Debug)]
enum Op {
    Pick { cpu: usize },
    PutBack { cpu: usize },
    Fork { vm: usize, paused: bool },
    Kill { vm: usize },
    Pause { vm: usize },
    Resume { vm: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..CPUS).prop_map(|cpu| Op::Pick { cpu }),
        6 => (0..CPUS).prop_map(|cpu| Op::PutBack { cpu }),
        2 => (0..MAX_VMS, any::<bool>()).prop_map(|(vm, paused)| Op::Fork { vm, paused }),
        1 => (0..MAX_VMS).prop_map(|vm| Op::Kill { vm }),
        1 => (0..MAX_VMS).prop_map(|vm| Op::Pause { vm }),
        2 => (0..MAX_VMS).prop_map(|vm| Op::Resume { vm }),
    ]
}

/// The reference: per VM its vCPU count and whether it is paused or being killed.
#[derive(Clone, Copy, Debug)]
struct MVm {
    vcpus: usize,
    paused: bool,
    stopping: bool,
}

/// What the runs went through.
#[derive(Default, Debug)]
struct Seen {
    rollovers: u64,
    kept_across_rollover: u64,
    no_vmid_for_pick: u64,
    picks: u64,
}

/// A vCPU on a CPU: its VM, its index, its context and the VTTBR_EL2 it entered with.
type OnCpu = (u32, usize, Box<VcpuCtx>, u64);

struct World {
    t: VmTable<FakeHost>,
    limit: u16,
    model: BTreeMap<u32, MVm>,
    /// What each CPU runs.
    on_cpu: [Option<OnCpu>; CPUS],
    seen: Seen,
}

impl World {
    fn new(limit: u16) -> Self {
        let (t, ids) = table(4, limit);
        let model = ids
            .iter()
            .map(|&id| {
                let vcpus = t.vms.get(&id).unwrap().vcpus.len();
                (
                    id,
                    MVm {
                        vcpus,
                        paused: false,
                        stopping: false,
                    },
                )
            })
            .collect();
        Self {
            t,
            limit,
            model,
            on_cpu: [None, None, None],
            seen: Seen::default(),
        }
    }

    fn nth(&self, i: usize) -> Option<u32> {
        let ids: Vec<u32> = self.model.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }

    fn on_cpus(&self, id: u32) -> usize {
        self.on_cpu.iter().flatten().filter(|c| c.0 == id).count()
    }

    /// The reference has a vCPU to run: a VM neither paused nor stopping with a vCPU that is
    /// not on a CPU (every vCPU is runnable whenever it is not on one).
    fn model_runnable(&self) -> bool {
        self.model
            .iter()
            .any(|(&id, m)| !m.paused && !m.stopping && m.vcpus > self.on_cpus(id))
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Pick { cpu } => {
                if self.on_cpu[cpu].is_some() {
                    return Ok(());
                }
                let runnable = self.model_runnable();
                let generation = self.t.vmids.generation();
                let running_before: Vec<(u32, Option<Vmid>)> = self
                    .on_cpu
                    .iter()
                    .flatten()
                    .map(|c| (c.0, vmid_of(&self.t, c.0)))
                    .collect();
                match self.t.pick(cpu, 1_000) {
                    Some((id, vcpu, ctx)) => {
                        self.seen.picks += 1;
                        prop_assert!(runnable, "picked vm{} the reference cannot run", id);
                        let m = self.model[&id];
                        prop_assert!(!m.paused && !m.stopping, "picked vm{} {:?}", id, m);
                        prop_assert!(vmid_of(&self.t, id).is_some(), "vm{} runs with no VMID", id);
                        let vttbr = enter(&self.t, id).map_err(TestCaseError::fail)?;
                        self.on_cpu[cpu] = Some((id, vcpu, ctx, vttbr));
                    }
                    None => {
                        if runnable {
                            // Only when every VMID is held by a VM on a CPU.
                            self.seen.no_vmid_for_pick += 1;
                            prop_assert_eq!(self.t.vmids.in_use(), usize::from(self.limit));
                            for (_, owner) in self.t.vmids.owners() {
                                prop_assert!(
                                    self.on_cpus(owner) > 0,
                                    "vm{} is not on a CPU",
                                    owner
                                );
                            }
                        }
                    }
                }
                if self.t.vmids.generation() != generation {
                    self.seen.rollovers += 1;
                    for (id, v) in running_before {
                        prop_assert_eq!(vmid_of(&self.t, id), v, "vm{} on a CPU kept its VMID", id);
                        self.seen.kept_across_rollover += 1;
                    }
                }
            }
            Op::PutBack { cpu } => {
                let Some((id, vcpu, ctx, _)) = self.on_cpu[cpu].take() else {
                    return Ok(());
                };
                let _ = self.t.put_back(id, vcpu, ctx, VcpuState::Runnable);
                if self.model[&id].stopping && self.on_cpus(id) == 0 {
                    self.model.remove(&id);
                }
            }
            Op::Fork { vm, paused } => {
                let Some(id) = self.nth(vm) else {
                    return Ok(());
                };
                if self.on_cpus(id) > 0 || self.model[&id].stopping || self.model.len() >= MAX_VMS {
                    return Ok(());
                }
                let vmids = self.t.vmids.in_use();
                let children = self
                    .t
                    .fork_now(id, 1, paused, None)
                    .map_err(|e| TestCaseError::fail(format!("fork: {e}")))?;
                prop_assert_eq!(self.t.vmids.in_use(), vmids, "a fork takes no VMID");
                for c in children {
                    prop_assert_eq!(vmid_of(&self.t, c), None, "a new fork has no VMID");
                    let parent = self.model[&id];
                    self.model.insert(
                        c,
                        MVm {
                            vcpus: parent.vcpus,
                            paused,
                            stopping: false,
                        },
                    );
                }
            }
            Op::Kill { vm } => {
                let Some(id) = self.nth(vm) else {
                    return Ok(());
                };
                let held = vmid_of(&self.t, id);
                let _ = self.t.stop(id, StopReason::Killed);
                if self.on_cpus(id) == 0 {
                    self.model.remove(&id);
                    if let Some(v) = held {
                        prop_assert_eq!(self.t.vmids.owner(v), None, "a VM's VMID goes with it");
                    }
                } else {
                    self.model.get_mut(&id).unwrap().stopping = true;
                }
            }
            Op::Pause { vm } => {
                let Some(id) = self.nth(vm) else {
                    return Ok(());
                };
                if !self.model[&id].stopping {
                    self.model.get_mut(&id).unwrap().paused = true;
                    self.t.vms.get_mut(&id).unwrap().state =
                        VmState::Paused(PauseReason::Requested);
                }
            }
            Op::Resume { vm } => {
                let Some(id) = self.nth(vm) else {
                    return Ok(());
                };
                if !self.model[&id].stopping {
                    self.model.get_mut(&id).unwrap().paused = false;
                    self.t.vms.get_mut(&id).unwrap().state = VmState::Running;
                }
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            self.t.vms.keys().copied().collect::<Vec<_>>(),
            self.model.keys().copied().collect::<Vec<_>>()
        );
        let mut roots = BTreeMap::new();
        let mut holders = 0;
        for &id in self.model.keys() {
            let vm = self.t.vms.get(&id).unwrap();
            let s2 = vm.s2.as_ref().unwrap();
            roots.insert(s2.root().0, (id, s2.vmid()));
            if let Some(v) = s2.vmid() {
                holders += 1;
                prop_assert_eq!(self.t.vmids.owner(v), Some(id), "vm{} holds {:?}", id, v);
            }
        }
        prop_assert_eq!(self.t.vmids.in_use(), holders, "one VM per VMID given");
        prop_assert!(holders <= usize::from(self.limit));
        for (id, _, _, vttbr) in self.on_cpu.iter().flatten() {
            prop_assert_eq!(
                vttbr_of(&self.t, *id),
                *vttbr,
                "vm{} on a CPU kept its VTTBR",
                id
            );
        }
        for (&v, root) in &self.t.host.mem.borrow().tlb.cached {
            match roots.get(root) {
                Some(&(id, vmid)) => {
                    prop_assert_eq!(vmid, Some(Vmid(v)), "vm{} has entries under VMID {}", id, v)
                }
                None => prop_assert!(
                    self.t.vmids.owner(Vmid(v)).is_none(),
                    "entries of a VM gone under VMID {}, given again",
                    v
                ),
            }
        }
        Ok(())
    }

    /// Puts every vCPU back and kills every VM: every VMID is back.
    fn teardown(mut self) -> Result<Seen, TestCaseError> {
        for cpu in 0..CPUS {
            self.step(&Op::PutBack { cpu })?;
        }
        let ids: Vec<u32> = self.t.vms.keys().copied().collect();
        for id in ids {
            let _ = self.t.stop(id, StopReason::Killed);
        }
        prop_assert!(self.t.vms.is_empty());
        prop_assert_eq!(self.t.vmids.in_use(), 0);
        Ok(self.seen)
    }
}

#[test]
fn vmids_follow_the_model() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    let totals = std::cell::RefCell::new(Seen::default());
    let strategy = (proptest::collection::vec(op(), 20..150), 2u16..=4);
    let result = runner.run(&strategy, |(ops, limit)| {
        let mut w = World::new(limit);
        for op in &ops {
            w.step(op)?;
        }
        let s = w.teardown()?;
        let mut t = totals.borrow_mut();
        t.rollovers += s.rollovers;
        t.kept_across_rollover += s.kept_across_rollover;
        t.no_vmid_for_pick += s.no_vmid_for_pick;
        t.picks += s.picks;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let t = totals.into_inner();
    eprintln!("vmid model: {t:?}");
    assert!(
        t.rollovers > 0 && t.kept_across_rollover > 0 && t.no_vmid_for_pick > 0,
        "{t:?}"
    );
}

/// A rollover: the VM on a CPU keeps its VMID, the others lose theirs, one `flush_all` comes
/// before the VMID taken back is given again, and with every VMID held by a VM on a CPU a pick
/// finds nothing (its vCPU stays runnable, in the table).
#[test]
fn a_rollover_keeps_the_running_vms_vmid_and_flushes_once() {
    let (mut t, ids) = table(3, 2);
    let [a, b, c] = [ids[0], ids[1], ids[2]];
    // v1 (b) has two vCPUs: keep it to one so that picks go a, b, c.
    t.vms.get_mut(&b).unwrap().vcpus[1].state = VcpuState::Off;
    for &id in &ids {
        assert_eq!(vmid_of(&t, id), None, "a new VM has no VMID");
    }
    let (ga, _, ctx_a) = t.pick(0, 1_000).unwrap();
    assert_eq!(ga, a);
    enter(&t, a).unwrap();
    let (gb, _, ctx_b) = t.pick(1, 1_000).unwrap();
    assert_eq!(gb, b);
    enter(&t, b).unwrap();
    let (va, vb) = (vmid_of(&t, a).unwrap(), vmid_of(&t, b).unwrap());
    assert_ne!(va, vb);
    assert_eq!(t.vmids.generation(), 0);
    assert_eq!(t.host.mem.borrow().tlb.flush_alls, 0);

    // b leaves its CPU; c is picked: no VMID free, so a rollover. a keeps its VMID.
    let _ = t.put_back(b, 0, ctx_b, VcpuState::Runnable);
    let (gc, _, ctx_c) = t.pick(1, 1_000).unwrap();
    assert_eq!(gc, c);
    assert_eq!(t.vmids.generation(), 1);
    assert_eq!(t.host.mem.borrow().tlb.flush_alls, 1, "one broadcast flush");
    assert_eq!(vmid_of(&t, a), Some(va), "the VM on a CPU keeps its VMID");
    assert_eq!(vmid_of(&t, b), None, "the VM off every CPU lost its VMID");
    assert_eq!(vmid_of(&t, c), Some(vb), "c got the VMID b had, flushed");
    enter(&t, c).expect("no entry of b's tables left under c's VMID");

    // Three CPUs, two VMIDs, both held by VMs on a CPU: b cannot run now.
    assert!(t.pick(2, 1_000).is_none());
    assert!(t.has_runnable(), "b's vCPU is still runnable");
    assert_eq!(t.vms.get(&b).unwrap().vcpus[0].state, VcpuState::Runnable);
    assert!(t.vms.get(&b).unwrap().vcpus[0].ctx.is_some());
    // a leaves (its vCPU off, so that b is next): b runs, after another rollover (c keeps its
    // VMID).
    let _ = t.put_back(a, 0, ctx_a, VcpuState::Off);
    let (gb2, _, _) = t.pick(2, 1_000).unwrap();
    assert_eq!(gb2, b);
    assert_eq!(t.vmids.generation(), 2);
    assert_eq!(vmid_of(&t, c), Some(vb));
    assert_eq!(vmid_of(&t, a), None);
    assert_eq!(vmid_of(&t, b), Some(va));
    enter(&t, b).unwrap();
    let _ = t.put_back(c, 0, ctx_c, VcpuState::Runnable);
}

/// The TLB model catches a VMID given again without a flush (what a rollover without its
/// `flush_all` would do).
#[test]
fn the_tlb_model_catches_a_vmid_reused_without_a_flush() {
    let (t, ids) = table(2, 2);
    let root = |id: u32| t.vms.get(&id).unwrap().s2.as_ref().unwrap().root().0;
    let mut tlb = t.host.mem.borrow_mut();
    tlb.tlb.enter((1 << 48) | root(ids[0])).unwrap();
    tlb.tlb.enter((1 << 48) | root(ids[0])).unwrap();
    assert!(tlb.tlb.enter((1 << 48) | root(ids[1])).is_err());
    assert!(tlb.tlb.enter(root(ids[1])).is_err(), "VMID 0 is no VMID");
}

/// TLB maintenance of a VM without a VMID is skipped: a fork of a VM that never ran and the
/// kill of a fork that never ran flush nothing; a VM that holds a VMID is flushed when forked and
/// when killed, and its VMID given back.
#[test]
fn a_vm_without_a_vmid_needs_no_tlb_maintenance() {
    let (mut t, ids) = table(2, 4);
    let (a, b) = (ids[0], ids[1]);
    t.vms.get_mut(&b).unwrap().vcpus[1].state = VcpuState::Off;
    let flushes = |t: &VmTable<FakeHost>| t.host.mem.borrow().tlb.flushes;
    // a runs once (it gets a VMID) and is paused; b never runs.
    let (id, vcpu, ctx) = t.pick(0, 1_000).unwrap();
    assert_eq!(id, a);
    let va = vmid_of(&t, a).unwrap();
    let _ = t.put_back(a, vcpu, ctx, VcpuState::Runnable);
    t.vms.get_mut(&a).unwrap().state = VmState::Paused(PauseReason::Requested);

    let f0 = flushes(&t);
    let kids = t.fork_now(b, 1, true, None).unwrap();
    assert_eq!(
        flushes(&t),
        f0,
        "a fork of a VM with no VMID flushes nothing"
    );
    let _ = t.stop(kids[0], StopReason::Killed);
    let _ = t.stop(b, StopReason::Killed);
    assert_eq!(
        flushes(&t),
        f0,
        "a kill of a VM with no VMID flushes nothing"
    );

    let kids = t.fork_now(a, 1, true, None).unwrap();
    let f1 = flushes(&t);
    assert!(f1 > f0, "the parent's VMID is flushed at the fork");
    assert_eq!(vmid_of(&t, kids[0]), None);
    let _ = t.stop(a, StopReason::Killed);
    assert!(flushes(&t) > f1, "its VMID is flushed when it goes");
    assert_eq!(t.vmids.owner(va), None, "and given back");
    assert_eq!(t.vmids.in_use(), 0);
}

/// More VMs than VMIDs can be alive, paused or idle: none of them holds one.
#[test]
fn more_vms_than_vmids_are_alive() {
    let (mut t, ids) = table(1, 2);
    let a = ids[0];
    let kids = t.fork_now(a, 40, true, None).unwrap();
    assert_eq!(kids.len(), 40);
    assert_eq!(t.vmids.in_use(), 0);
    // Each fork runs once in turn: a rollover every second one, every one with a clean VMID.
    for &k in &kids {
        t.vms.get_mut(&k).unwrap().state = VmState::Running;
    }
    let mut ran = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let Some((id, vcpu, ctx)) = t.pick(0, 1_000) else {
            break;
        };
        enter(&t, id).unwrap();
        ran.insert(id);
        let _ = t.put_back(id, vcpu, ctx, VcpuState::Runnable);
    }
    assert!(ran.len() > 40, "every VM ran: {}", ran.len());
    assert!(
        t.vmids.generation() >= 20,
        "rollovers: {}",
        t.vmids.generation()
    );
    assert!(t.vmids.in_use() <= 2);
}
