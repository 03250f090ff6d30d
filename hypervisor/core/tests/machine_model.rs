//! Whole VMs against a plain reference model, on the host.
//!
//! Random sequences of guest stores (through the real exit path: a stage-2 permission fault
//! copies the page), guest register changes, vGIC writes (the vGIC is shared copy-on-write with
//! the fork point), fork (one or several children, paused or not), reset, kill, dump + restore,
//! pause/resume, and failures on purpose (the heap reported low, frames running out) run on a
//! real [`VmTable`] over [`FakePhysMem`], with fewer VMIDs than VMs (1 to 5), so VMIDs roll over
//! to new generations as VMs run. After every step each VM's tracked memory, registers, vGIC
//! state and run state equal the model's; a failed fork or reset changes nothing; a VMID names
//! one VM at most and the TLB model holds entries only under the VMID of their VM (a VMID given
//! again without its flush fails the run as the vCPU enters); and when the VMs are gone every
//! frame, VMID and heap byte is back.
//!
//! The model is plain data: a VM is a map of the words the test wrote, a register value, an
//! interrupt-enable mask and, for a fork, a copy of all that as it was at the fork.

mod common;
use common::create_vm;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use proptest::prelude::*;
use vmfork_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use vmfork_core::esr::Esr;
use vmfork_core::guest_dtb::layout;
use vmfork_core::machine::fake::FakeHost;
use vmfork_core::machine::saved;
use vmfork_core::machine::{
    handle_sync, ForkError, Host, MemoryWant, Next, PauseReason, PendingOp, StopReason, Syndrome,
    VcpuState, VmState, VmTable,
};
use vmfork_core::mmio::{MmioAccess, MmioResult};
use vmfork_core::physmem::PhysMem;
use vmfork_core::stage2::Vmid;

// ---- heap accounting: bytes live per thread (tests run on several threads) ----

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the thread-local counter
// has a const initialiser and no destructor, so touching it never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|l| l.set(l.get() + layout.size() as isize));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get() - layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let _ = LIVE.try_with(|l| l.set(l.get() + new as isize - layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.with(|l| l.get())
}

// ---- the host: vmfork_core::machine::fake (fake memory, a clock, a heap made low on purpose) ----

type TestHost = FakeHost;

// ---- the reference model ----

/// Pages the test writes: both ends of the first 2 MiB block and of the second, so that forks
/// share level-2 and level-3 tables and a write copies a table as well as a page.
const PAGES: [u64; 8] = [0, 1, 2, 3, 511, 512, 513, 1023];
/// Byte offsets of the words written in each page.
const SLOTS: [u64; 3] = [0, 8, 4088];
/// Guest RAM of every VM: 4 MiB (two 2 MiB blocks).
const RAM: u64 = 4 << 20;

type Loc = (u64, u64); // (page, offset)

#[derive(Clone, Debug, PartialEq)]
struct MState {
    words: BTreeMap<Loc, u64>,
    x5: u64,
    /// GICD_ISENABLER1: enabled SPIs 32..63.
    enabled: u32,
}

#[derive(Clone, Debug)]
struct MVm {
    now: MState,
    /// The reset point (forks only).
    reset_to: Option<MState>,
    paused: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        vm: usize,
        page: usize,
        slot: usize,
        value: u64,
    },
    SetReg {
        vm: usize,
        value: u64,
    },
    EnableIrq {
        vm: usize,
        bit: u8,
    },
    Fork {
        vm: usize,
        count: u32,
        paused: bool,
    },
    Reset {
        vm: usize,
    },
    Kill {
        vm: usize,
    },
    DumpRestore {
        vm: usize,
    },
    Pause {
        vm: usize,
    },
    Resume {
        vm: usize,
    },
    HeapLow(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0usize..16;
    prop_oneof![
        6 => (vm.clone(), 0..PAGES.len(), 0..SLOTS.len(), any::<u64>())
            .prop_map(|(vm, page, slot, value)| Op::Write { vm, page, slot, value }),
        2 => (vm.clone(), any::<u64>()).prop_map(|(vm, value)| Op::SetReg { vm, value }),
        2 => (vm.clone(), 0u8..32).prop_map(|(vm, bit)| Op::EnableIrq { vm, bit }),
        4 => (vm.clone(), 1u32..4, any::<bool>())
            .prop_map(|(vm, count, paused)| Op::Fork { vm, count, paused }),
        3 => vm.clone().prop_map(|vm| Op::Reset { vm }),
        2 => vm.clone().prop_map(|vm| Op::Kill { vm }),
        1 => vm.clone().prop_map(|vm| Op::DumpRestore { vm }),
        1 => vm.clone().prop_map(|vm| Op::Pause { vm }),
        2 => vm.prop_map(|vm| Op::Resume { vm }),
        1 => any::<bool>().prop_map(Op::HeapLow),
    ]
}

// ---- what the runs went through (the test checks every outcome happened) ----

#[derive(Clone, Copy, Debug)]
enum Seen {
    Steps,
    CowFault,
    StorePausedNoFrame,
    EntryPaused,
    ForkOk,
    ForkNoMemory,
    Rollover,
    ResetOk,
    ResetNotAFork,
    ResetNoMemory,
    Kill,
    RestoreOk,
    RestoreRefused,
}

const SEEN_KINDS: usize = 13;
static SEEN: [std::sync::atomic::AtomicU64; SEEN_KINDS] =
    [const { std::sync::atomic::AtomicU64::new(0) }; SEEN_KINDS];

fn seen(what: Seen) {
    SEEN[what as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn seen_count(what: Seen) -> u64 {
    SEEN[what as usize].load(std::sync::atomic::Ordering::Relaxed)
}

// ---- driving the real machine ----

fn ipa(loc: Loc) -> u64 {
    layout::RAM_BASE + loc.0 * PAGE_SIZE + loc.1
}

/// ESR of a data abort from a lower EL: ISV with an 8-byte (or 4-byte) access through X1.
fn data_abort_esr(write: bool, size_log2: u64, fault: u64) -> Esr {
    let ec = 0x24u64;
    let isv = 1 << 24;
    let sas = size_log2 << 22;
    let srt = 1 << 16;
    let sf = if size_log2 == 3 { 1 << 15 } else { 0 };
    let wnr = if write { 1 << 6 } else { 0 };
    Esr((ec << 26) | (1 << 25) | isv | sas | srt | sf | wnr | fault)
}

/// What the scheduler does before vCPU 0 of `id` runs (`sched.rs`): the VM gets its own vGIC
/// and shows its new vmgenid ID. False when that paused the VM (no heap for the vGIC copy, no
/// frame for the ID page): the vCPU does not run.
fn enter(t: &mut VmTable<TestHost>, id: u32) -> bool {
    let h = &t.host;
    let mut vm = t.vms.get_mut(&id).expect("a live VM");
    let ran = vm.schedulable() && vm.vgic_mut(h).is_some() && vm.apply_new_identity(h);
    if !ran {
        assert!(
            matches!(
                vm.state,
                VmState::Paused(PauseReason::OutOfMemory(
                    MemoryWant::VgicCopy | MemoryWant::NewIdentity
                ))
            ),
            "a VM that cannot be entered is paused for memory: {:?}",
            vm.state
        );
        seen(Seen::EntryPaused);
    }
    drop(vm);
    if ran {
        // The scheduler's pick gives the VM a VMID (rolling over when none is free), then the
        // vCPU enters with its VTTBR_EL2: the TLB model may now hold entries under it.
        let generation = t.vmids.generation();
        assert!(t.give_vmid(id), "a VMID for a VM with no vCPU on a CPU");
        if t.vmids.generation() != generation {
            seen(Seen::Rollover);
        }
        let vttbr = t.vms.get(&id).unwrap().s2.as_ref().unwrap().vttbr_el2();
        if let Err(e) = t.host.mem.borrow_mut().tlb.enter(vttbr) {
            panic!("vm{id}: {e}");
        }
    }
    ran
}

/// Runs one trapped access of vCPU 0 of `id` through the exit path, as the scheduler does:
/// the context leaves the table, the exit is handled, the context goes back.
fn trap(t: &mut VmTable<TestHost>, id: u32, esr: Esr, addr: u64, x1: u64) -> Next {
    let mut vm = t.vms.get_mut(&id).expect("a live VM");
    let mut ctx = vm.vcpus[0].ctx.take().expect("vCPU 0 is not running");
    vm.vcpus[0].state = VcpuState::Running(0);
    drop(vm);
    ctx.regs.x[1] = x1;
    let pc = ctx.regs.pc;
    let syn = Syndrome {
        esr,
        far: addr & 0xfff,
        hpfar: (addr >> 12) << 4,
    };
    let (next, _kicks) = handle_sync(t, id, 0, &mut ctx, syn);
    if next == Next::Resume {
        // An emulated device access steps over the instruction; a fault on RAM is retried.
        let step = if addr < layout::RAM_BASE { 4 } else { 0 };
        assert_eq!(ctx.regs.pc, pc + step, "the PC after the exit");
    }
    ctx.regs.pc = pc;
    let _ = t.put_back(id, 0, ctx, VcpuState::Runnable);
    next
}

/// A guest store of `value` at `loc`: straight to memory when the page is writable, else the
/// stage-2 permission fault is taken first (copy-on-write) and the store retried. Returns
/// false when the VM paused for want of memory instead (nothing stored).
fn guest_store(t: &mut VmTable<TestHost>, id: u32, loc: Loc, value: u64) -> bool {
    for attempt in 0..2 {
        let a = ipa(loc);
        let vm = t.vms.get(&id).unwrap();
        let s2 = vm.s2.as_ref().unwrap();
        let tr = t.host.with_mem(|cx| s2.translate(&*cx.mem, Ipa(a)));
        drop(vm);
        let tr = tr.expect("RAM is mapped");
        // What the hardware does: a marker on the walk (an invalid descriptor) is a translation
        // fault, a read-only leaf a permission fault; only a walkable writable leaf stores.
        if tr.hw_walkable && tr.perms.write {
            t.host
                .with_mem(|cx| cx.mem.write(PhysAddr(tr.pa.0), &value.to_le_bytes()));
            return true;
        }
        assert_eq!(attempt, 0, "a copy-on-write fault leaves the page writable");
        seen(Seen::CowFault);
        let dfsc = if tr.hw_walkable { 0b00_1111 } else { 0b00_0101 };
        let next = trap(t, id, data_abort_esr(true, 3, dfsc), a, value);
        if next != Next::Resume {
            let vm = t.vms.get(&id).unwrap();
            assert!(
                matches!(
                    vm.state,
                    VmState::Paused(PauseReason::OutOfMemory(MemoryWant::CowWrite(_)))
                ),
                "a fault that does not resume pauses the VM for memory: {:?}",
                vm.state
            );
            seen(Seen::StorePausedNoFrame);
            return false;
        }
    }
    unreachable!()
}

fn read_word<H: Host>(t: &VmTable<H>, id: u32, loc: Loc) -> u64 {
    let vm = t.vms.get(&id).unwrap();
    let s2 = vm.s2.as_ref().unwrap();
    let mut b = [0u8; 8];
    t.host
        .with_mem(|cx| s2.read_guest(&*cx.mem, Ipa(ipa(loc)), &mut b))
        .expect("RAM reads");
    u64::from_le_bytes(b)
}

const GICD_ISENABLER1: u64 = 0x104;

fn read_enabled(t: &VmTable<TestHost>, id: u32) -> u32 {
    // A copy, so that looking never copies the VM's shared vGIC.
    let mut g = (*t.vms.get(&id).unwrap().devices.vgic).clone();
    match g.dist_access(
        0,
        MmioAccess {
            offset: GICD_ISENABLER1,
            size: 4,
            write: None,
        },
    ) {
        MmioResult::Read(v) => v as u32,
        r => panic!("GICD_ISENABLER1 read: {r:?}"),
    }
}

fn x5(t: &VmTable<TestHost>, id: u32) -> u64 {
    t.vms.get(&id).unwrap().vcpus[0]
        .ctx
        .as_ref()
        .unwrap()
        .regs
        .x[5]
}

fn observe(t: &VmTable<TestHost>, id: u32) -> MState {
    let mut words = BTreeMap::new();
    for &p in &PAGES {
        for &o in &SLOTS {
            words.insert((p, o), read_word(t, id, (p, o)));
        }
    }
    MState {
        words,
        x5: x5(t, id),
        enabled: read_enabled(t, id),
    }
}

struct World {
    t: VmTable<TestHost>,
    model: BTreeMap<u32, MVm>,
    steps: u64,
}

impl World {
    fn new(frames: usize, vmids: u16) -> Self {
        let mut t = VmTable::new(FakeHost::new(frames));
        t.vmids.set_limit(vmids);
        let mut model = BTreeMap::new();
        for name in ["a", "b"] {
            let id = create_vm(&mut t, name, RAM, 1).expect("the first VMs fit");
            // The model starts from what the loader put there.
            let now = observe(&t, id);
            model.insert(
                id,
                MVm {
                    now,
                    reset_to: None,
                    paused: false,
                },
            );
        }
        Self { t, model, steps: 0 }
    }

    fn pick(&self, i: usize) -> Option<u32> {
        let ids: Vec<u32> = self.model.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }

    fn request(&mut self, id: u32, op: PendingOp) -> Result<Vec<u32>, ForkError> {
        let (ticket, _) = self.t.request(id, op)?;
        // No vCPU is on a CPU: the operation ran at once and its answer is filed.
        self.t.take_result(ticket).expect("answered at once")
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.steps += 1;
        seen(Seen::Steps);
        match *op {
            Op::Write {
                vm,
                page,
                slot,
                value,
            } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                if self.model[&id].paused {
                    return Ok(()); // a paused guest runs no instruction
                }
                if !enter(&mut self.t, id) {
                    self.model.get_mut(&id).unwrap().paused = true;
                    return self.check();
                }
                let loc = (PAGES[page], SLOTS[slot]);
                if guest_store(&mut self.t, id, loc, value) {
                    self.model
                        .get_mut(&id)
                        .unwrap()
                        .now
                        .words
                        .insert(loc, value);
                } else {
                    self.model.get_mut(&id).unwrap().paused = true;
                }
            }
            Op::SetReg { vm, value } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                if self.model[&id].paused {
                    return Ok(());
                }
                if !enter(&mut self.t, id) {
                    self.model.get_mut(&id).unwrap().paused = true;
                    return self.check();
                }
                let mut v = self.t.vms.get_mut(&id).unwrap();
                v.vcpus[0].ctx.as_mut().unwrap().regs.x[5] = value;
                self.model.get_mut(&id).unwrap().now.x5 = value;
            }
            Op::EnableIrq { vm, bit } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                if self.model[&id].paused {
                    return Ok(());
                }
                if !enter(&mut self.t, id) {
                    self.model.get_mut(&id).unwrap().paused = true;
                    return self.check();
                }
                // A 32-bit store to GICD_ISENABLER1: a translation fault (nothing is mapped
                // there), emulated by the vGIC.
                let addr = layout::GICD_BASE + GICD_ISENABLER1;
                let next = trap(
                    &mut self.t,
                    id,
                    data_abort_esr(true, 2, 0b00_0111),
                    addr,
                    1 << bit,
                );
                // The vGIC became the VM's own at entry: the write is emulated, whatever the heap.
                prop_assert_eq!(next, Next::Resume, "a vGIC write resumes");
                self.model.get_mut(&id).unwrap().now.enabled |= 1 << bit;
            }
            Op::Fork { vm, count, paused } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                let before = self.snapshot();
                match self.request(
                    id,
                    PendingOp::Fork {
                        count,
                        paused,
                        remove_on_stop: false,
                    },
                ) {
                    Ok(children) => {
                        prop_assert!(!self.t.host.heap_low.get(), "a fork passed a low heap");
                        prop_assert_eq!(children.len(), count as usize);
                        seen(Seen::ForkOk);
                        let parent = self.model[&id].now.clone();
                        for c in children {
                            self.model.insert(
                                c,
                                MVm {
                                    now: parent.clone(),
                                    reset_to: Some(parent.clone()),
                                    paused,
                                },
                            );
                        }
                    }
                    Err(ForkError::OutOfMemory | ForkError::Limit { .. }) => {
                        seen(Seen::ForkNoMemory);
                        // All or nothing: every VM is as it was.
                        prop_assert_eq!(
                            &before,
                            &self.snapshot(),
                            "a failed fork changed something"
                        );
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("fork failed: {e}"))),
                }
            }
            Op::Reset { vm } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                let before = self.snapshot();
                match self.request(id, PendingOp::Reset) {
                    Ok(_) => {
                        let m = self.model.get_mut(&id).unwrap();
                        let to = m.reset_to.clone();
                        prop_assert!(to.is_some(), "a VM that is no fork was reset");
                        m.now = to.unwrap();
                        m.paused = false;
                        seen(Seen::ResetOk);
                    }
                    Err(ForkError::NotAFork(_)) => {
                        prop_assert!(self.model[&id].reset_to.is_none());
                        seen(Seen::ResetNotAFork);
                    }
                    Err(ForkError::OutOfMemory) => {
                        seen(Seen::ResetNoMemory);
                        prop_assert_eq!(
                            &before,
                            &self.snapshot(),
                            "a failed reset changed something"
                        );
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("reset failed: {e}"))),
                }
            }
            Op::Kill { vm } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                let kicks = self.t.stop(id, StopReason::Killed);
                prop_assert!(kicks.cpus.is_empty(), "no vCPU runs: nothing to kick");
                prop_assert!(!self.t.vms.contains_key(&id), "torn down at once");
                self.model.remove(&id);
                seen(Seen::Kill);
            }
            Op::DumpRestore { vm } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                if self.t.host.heap_low.get() {
                    return Ok(());
                }
                // As the control channel does: a paused fork is dumped, then discarded.
                let snap = match self.request(
                    id,
                    PendingOp::Fork {
                        count: 1,
                        paused: true,
                        remove_on_stop: false,
                    },
                ) {
                    Ok(c) => c[0],
                    Err(_) => return Ok(()), // out of VMIDs or frames: nothing happened
                };
                let mut d = saved::begin(&self.t, snap, "dumped").map_err(TestCaseError::fail)?;
                while !d.scan(&self.t, 300).map_err(TestCaseError::fail)? {}
                let mut bytes = Vec::new();
                loop {
                    let chunk = d
                        .read(&self.t, bytes.len() as u64, 5000)
                        .map_err(TestCaseError::fail)?;
                    if chunk.is_empty() {
                        break;
                    }
                    bytes.extend(chunk);
                }
                prop_assert_eq!(
                    bytes.len() as u64,
                    d.total,
                    "the dump is as long as it said"
                );
                let _ = self.t.stop(snap, StopReason::DumpDone);
                match saved::restore(&mut self.t, &bytes) {
                    Ok(new) => {
                        let now = self.model[&id].now.clone();
                        self.model.insert(
                            new,
                            MVm {
                                now,
                                reset_to: None,
                                paused: false,
                            },
                        );
                        seen(Seen::RestoreOk);
                    }
                    Err(e) => {
                        seen(Seen::RestoreRefused);
                        prop_assert!(
                            e.contains("VMID") || e.contains("memory") || e.contains("frames"),
                            "restore failed for another reason: {e}"
                        );
                    }
                }
            }
            Op::Pause { vm } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                self.t.vms.get_mut(&id).unwrap().state = VmState::Paused(PauseReason::Requested);
                self.model.get_mut(&id).unwrap().paused = true;
            }
            Op::Resume { vm } => {
                let Some(id) = self.pick(vm) else {
                    return Ok(());
                };
                self.t.vms.get_mut(&id).unwrap().state = VmState::Running;
                self.model.get_mut(&id).unwrap().paused = false;
            }
            Op::HeapLow(low) => self.t.host.heap_low.set(low),
        }
        self.check()
    }

    /// Every VM's observable state, for all-or-nothing checks.
    fn snapshot(&self) -> BTreeMap<u32, (MState, bool)> {
        self.t
            .vms
            .keys()
            .map(|&id| {
                (
                    id,
                    (
                        observe(&self.t, id),
                        !matches!(self.t.vms.get(&id).unwrap().state, VmState::Running),
                    ),
                )
            })
            .collect()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            self.t.vms.keys().collect::<Vec<_>>(),
            self.model.keys().collect::<Vec<_>>(),
            "the table holds the model's VMs"
        );
        for (&id, m) in &self.model {
            let real = observe(&self.t, id);
            prop_assert_eq!(&real, &m.now, "vm{} differs from the model", id);
            let vm = &self.t.vms.get(&id).unwrap();
            prop_assert_eq!(
                vm.state != VmState::Running,
                m.paused,
                "vm{} run state: {:?}",
                id,
                vm.state
            );
            prop_assert_eq!(vm.reset_point.is_some(), m.reset_to.is_some());
            prop_assert!(vm.pending.is_empty(), "nothing waits");
        }
        // A VMID names one VM at most, and each VM's VMID is the one the allocator gave it.
        let mut holders = 0;
        let mut roots = BTreeMap::new();
        for &id in self.model.keys() {
            let vm = self.t.vms.get(&id).unwrap();
            let s2 = vm.s2.as_ref().unwrap();
            roots.insert(s2.root().0, (id, s2.vmid()));
            if let Some(v) = s2.vmid() {
                holders += 1;
                prop_assert_eq!(self.t.vmids.owner(v), Some(id), "vm{} holds {:?}", id, v);
            }
        }
        prop_assert_eq!(self.t.vmids.in_use(), holders, "every VMID given is held");
        // The TLBs hold entries only under the VMID their VM holds now: a VM without a VMID
        // has none anywhere, so skipping its TLB maintenance is safe.
        for (&v, root) in &self.t.host.mem.borrow().tlb.cached {
            let Some(&(id, vmid)) = roots.get(root) else {
                // Tables of a VM gone: its VMID was flushed when it went, or not given again.
                prop_assert!(
                    self.t.vmids.owner(Vmid(v)).is_none(),
                    "VMID {} of a VM gone",
                    v
                );
                continue;
            };
            prop_assert_eq!(vmid, Some(Vmid(v)), "vm{} has entries under VMID {}", id, v);
        }
        prop_assert_eq!(self.t.results_waiting(), 0, "every answer was taken");
        Ok(())
    }

    /// Kills every VM; then every frame and VMID is back.
    fn teardown(mut self, frames: usize) -> Result<(), TestCaseError> {
        let ids: Vec<u32> = self.t.vms.keys().copied().collect();
        for id in ids {
            let _ = self.t.stop(id, StopReason::Killed);
        }
        prop_assert!(self.t.vms.is_empty());
        prop_assert_eq!(self.t.vmids.in_use(), 0);
        prop_assert_eq!(self.t.host.free_frames(), frames, "every frame is back");
        Ok(())
    }
}

/// Frames for the two 4 MiB VMs the world starts with (1,031 each: RAM is mapped eagerly, plus
/// six tables and the vmgenid page) and thirty spare: copy-on-write faults, forks and
/// restores run out now and then, and kills give frames back.
const FRAMES: usize = 2 * 1031 + 30;

fn run_case(ops: &[Op], vmids: u16) -> Result<u64, TestCaseError> {
    let heap0 = live_bytes();
    let steps;
    {
        let mut w = World::new(FRAMES, vmids);
        w.check()?;
        for op in ops {
            w.step(op)?;
        }
        steps = w.steps;
        w.teardown(FRAMES)?;
    }
    prop_assert_eq!(live_bytes(), heap0, "every heap byte is back");
    Ok(steps)
}

/// Random operation sequences against the model: 700 cases of 150 to 200 operations (more
/// than 10^5 in all), and every kind of outcome, failures included, must have happened.
#[test]
fn whole_vms_follow_the_model() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 700,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (prop::collection::vec(op(), 150..200), 1u16..6);
    let result = runner.run(&strategy, |(ops, vmids)| {
        let n = run_case(&ops, vmids)?;
        prop_assert_eq!(n, ops.len() as u64);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let all = [
        Seen::Steps,
        Seen::CowFault,
        Seen::StorePausedNoFrame,
        Seen::EntryPaused,
        Seen::ForkOk,
        Seen::ForkNoMemory,
        Seen::Rollover,
        Seen::ResetOk,
        Seen::ResetNotAFork,
        Seen::ResetNoMemory,
        Seen::Kill,
        Seen::RestoreOk,
        Seen::RestoreRefused,
    ];
    let counts: Vec<(Seen, u64)> = all.iter().map(|&k| (k, seen_count(k))).collect();
    eprintln!("machine model: {counts:?}");
    assert!(seen_count(Seen::Steps) >= 100_000, "{counts:?}");
    for (k, n) in &counts {
        assert!(*n > 0, "no run went through {k:?}: {counts:?}");
    }
}

#[test]
fn the_runner_sees_a_wrong_model() {
    let ops = vec![
        Op::Write {
            vm: 0,
            page: 0,
            slot: 0,
            value: 7,
        },
        Op::Fork {
            vm: 0,
            count: 1,
            paused: false,
        },
        Op::Write {
            vm: 2,
            page: 0,
            slot: 0,
            value: 9,
        },
        Op::Reset { vm: 2 },
    ];
    let mut w = World::new(FRAMES, 8);
    for op in &ops {
        w.step(op).unwrap();
    }
    // The fork (vm3) was reset to its fork point: it reads 7 again, and its parent still 7.
    assert_eq!(read_word(&w.t, 3, (0, 0)), 7);
    assert_eq!(read_word(&w.t, 1, (0, 0)), 7);
    // A model that is wrong is caught.
    w.model.get_mut(&3).unwrap().now.words.insert((0, 0), 9);
    assert!(w.check().is_err(), "the check sees a difference");
}

#[test]
fn a_failed_fork_under_a_low_heap_changes_nothing_and_a_paused_vgic_write_resumes() {
    let mut w = World::new(FRAMES, 8);
    w.step(&Op::Fork {
        vm: 0,
        count: 2,
        paused: false,
    })
    .unwrap();
    w.step(&Op::HeapLow(true)).unwrap();
    let before = w.snapshot();
    assert!(matches!(
        w.request(
            1,
            PendingOp::Fork {
                count: 1,
                paused: false,
                remove_on_stop: false,
            }
        ),
        Err(ForkError::OutOfMemory)
    ));
    assert_eq!(before, w.snapshot());
    // vm3 shares its vGIC with its reset point: the write cannot copy it, so the VM pauses.
    w.step(&Op::EnableIrq { vm: 2, bit: 3 }).unwrap();
    assert!(w.model[&3].paused);
    w.step(&Op::HeapLow(false)).unwrap();
    w.step(&Op::Resume { vm: 2 }).unwrap();
    w.step(&Op::EnableIrq { vm: 2, bit: 3 }).unwrap();
    assert_eq!(read_enabled(&w.t, 3), 1 << 3);
    assert_eq!(read_enabled(&w.t, 4), 0, "the sibling's vGIC is its own");
    w.teardown(FRAMES).unwrap();
}

/// The scheduler remembers that a waiting vCPU has nothing pending (`Vcpu::quiet_at`) and skips
/// the scan of its vGIC while that is unchanged (a thousand forks in WFI made every pick scan a
/// quarter of a million interrupts and a fork bomb test time out). An interrupt raised after the
/// "no" was kept wakes the vCPU all the same: in the VM, and in a fork that shares its vGIC.
#[test]
fn a_waiting_vcpu_seen_quiet_still_wakes_for_a_new_interrupt() {
    fn raise(t: &mut VmTable<TestHost>, id: u32, intid: u32) {
        let h = &t.host;
        let mut vm = t.vms.get_mut(&id).unwrap();
        let g = vm.vgic_mut(h).expect("heap");
        let write = |g: &mut vmfork_core::vgic::Vgic, off: u64, v: u64| {
            assert_eq!(
                g.dist_access(0, MmioAccess::write(off, 4, v)),
                MmioResult::Written
            );
        };
        write(g, 0x0, 0x13); // GICD_CTLR: Group 1 and affinity routing on
        write(g, 0x100 + u64::from(intid / 32) * 4, 1 << (intid % 32)); // GICD_ISENABLER
        g.inject_edge(intid, 0).expect("a valid SPI");
    }
    fn wait(t: &mut VmTable<TestHost>, id: u32) {
        t.vms.get_mut(&id).unwrap().vcpus[0].state = VcpuState::Waiting;
    }
    let mut t = VmTable::new(FakeHost::new(FRAMES));
    let id = create_vm(&mut t, "quiet", RAM, 1).unwrap();
    wait(&mut t, id);
    assert!(t.pick(0, 0).is_none(), "nothing pending, no timer armed");
    {
        let vm = t.vms.get(&id).unwrap();
        assert_eq!(
            vm.vcpus[0].quiet_at,
            vm.devices.vgic.version(),
            "the no is kept"
        );
    }
    assert!(t.pick(0, 0).is_none(), "and still holds");
    raise(&mut t, id, 40);
    let (got, vcpu, ctx) = t.pick(0, 0).expect("woken by the new SPI");
    assert_eq!((got, vcpu), (id, 0));
    let _ = t.put_back(id, 0, ctx, VcpuState::Waiting);
    // Acknowledge it the way a guest's run does: the vGIC moves it to a list register and
    // the LR comes back empty (taken and deactivated).
    {
        let h = &t.host;
        let mut vm = t.vms.get_mut(&id).unwrap();
        let g = vm.vgic_mut(h).unwrap();
        let mut lrs = g.fill_lrs(0, 4).unwrap();
        assert_ne!(lrs.lrs[0], 0, "SPI 40 is listed");
        lrs.lrs[0] = 0;
        g.sync_from_lrs(0, &lrs).unwrap();
    }
    assert_eq!(
        t.vms.get(&id).unwrap().devices.vgic.pending_for(0),
        None,
        "taken"
    );
    assert!(t.pick(0, 0).is_none(), "taken: quiet again");
    // A paused fork shares the quiet vGIC; resumed and waiting, it wakes for its own SPI.
    let (ticket, kicks) = t
        .request(
            id,
            PendingOp::Fork {
                count: 1,
                paused: true,
                remove_on_stop: false,
            },
        )
        .unwrap();
    assert!(kicks.cpus.is_empty());
    let child = t.take_result(ticket).expect("answered at once").unwrap()[0];
    assert_ne!(child, id);
    assert!(t.vms.get(&child).unwrap().devices.vgic.is_shared());
    t.vms.get_mut(&child).unwrap().state = VmState::Running;
    wait(&mut t, child);
    assert!(
        t.pick(0, 0).is_none(),
        "the fork has nothing pending either"
    );
    raise(&mut t, child, 41);
    let (got, _, ctx) = t.pick(0, 0).expect("the fork wakes");
    assert_eq!(got, child);
    let _ = t.put_back(child, 0, ctx, VcpuState::Waiting);
    let (got, _, _) = t.pick(0, 0).expect("SPI 41 is still pending");
    assert_eq!(got, child, "the parent's vGIC did not change");
    assert_eq!(t.vms.get(&id).unwrap().vcpus[0].state, VcpuState::Waiting);
}
