//! The table of all VMs: VMIDs, creation from an image, the scheduler's picks, stop and
//! teardown. (Fork and reset are in [`super::ops`], dump and restore in [`super::saved`].)

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;

use super::devices::Devices;
use super::ops::ForkError;
use super::vm::{StopReason, Vcpu, VcpuState, Vm, VmState};
use super::vmmap::{VmHandle, VmMap};
use super::{Host, Kicks, VcpuCtx};
use crate::addr::{Ipa, PAGE_SIZE};
use crate::cmdline::Limits;
use crate::guest_dtb::{self, layout, GuestDtbConfig};
use crate::loader;
use crate::stage2::{MemCtx, Perms, Stage2, Stage2Error, TlbOps, Vmid};
use crate::vgic::{Vgic, VgicConfig};
use crate::vuart::Vuart;

/// Hands out VMIDs, by generation, as KVM does (docs/ARCHITECTURE.md, "VMIDs").
///
/// A VM holds a VMID only while the current generation gave it one: a new VM, a fork and a
/// restored VM have none, and [`VmTable::pick`] gives the VM it picks one when it has none.
/// When none is free, a **rollover**: a new generation begins, every VM loses its VMID except
/// the VMs with a vCPU on a CPU (they keep theirs, reserved in the new generation, like KVM's
/// `active_vmids`), and one broadcast [`TlbOps::flush_all`] drops every VMID's TLB entries
/// before any VMID is given again. So:
///
/// * a VMID of the current generation names at most one VM (the owner kept here);
/// * a VM without a VMID has no TLB entry on any CPU (it never ran with this one, or its
///   entries went with the rollover's flush), so its TLB maintenance (fork's write-protect
///   flush, COW faults, reset, destroy) is skipped (`stage2::Stage2::vmid` is `None`);
/// * destroying a VM that holds one flushes it (`Stage2::destroy`) and gives it back at once.
///
/// A VM loses its VMID only at a rollover, eagerly: the table walks the holders (at most the
/// number of VMIDs), so a VM's VMID is always of the current generation and nothing checks a
/// generation on the TLB-maintenance paths. Paused and idle VMs so hold no VMID once a
/// rollover passed them, and any number of VMs can be alive.
#[derive(Debug)]
pub struct VmidAllocator {
    /// VMIDs of the current generation given out, with the id of the VM holding each. At most
    /// one entry per VMID (under 1 MiB with 16-bit VMIDs): its nodes are allocated infallibly,
    /// from the margin the heap keeps for small allocations, like the scheduler's sets.
    owners: BTreeMap<u16, u32>,
    next: u16,
    limit: u16,
    generation: u64,
}

impl Default for VmidAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl VmidAllocator {
    /// 8-bit VMIDs (1..=255) until [`VmidAllocator::set_bits`] says otherwise.
    pub const fn new() -> Self {
        Self {
            owners: BTreeMap::new(),
            next: 1,
            limit: 255,
            generation: 0,
        }
    }

    /// Sets how many VMIDs the CPU has (8 or 16 bits).
    pub fn set_bits(&mut self, bits: u32) {
        self.limit = if bits >= 16 { u16::MAX } else { 255 };
    }

    /// Uses only VMIDs 1..=`limit` (tests run out of them on purpose).
    pub fn set_limit(&mut self, limit: u16) {
        self.limit = limit.max(1);
    }

    /// VMIDs in use.
    pub fn in_use(&self) -> usize {
        self.owners.len()
    }

    /// The current generation: how many rollovers there have been.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The VM holding `v`, if one does.
    pub fn owner(&self, v: Vmid) -> Option<u32> {
        self.owners.get(&v.0).copied()
    }

    /// Every VMID given out, with its VM.
    pub fn owners(&self) -> impl Iterator<Item = (Vmid, u32)> + '_ {
        self.owners.iter().map(|(&v, &id)| (Vmid(v), id))
    }

    /// A free VMID of the current generation, now held by VM `vm`. It holds no TLB entry:
    /// never given before, or given back flushed, or flushed by the last rollover.
    pub fn alloc(&mut self, vm: u32) -> Option<Vmid> {
        if self.owners.len() >= usize::from(self.limit) {
            return None;
        }
        for _ in 0..self.limit {
            let v = self.next;
            self.next = if self.next >= self.limit {
                1
            } else {
                self.next + 1
            };
            if let alloc::collections::btree_map::Entry::Vacant(e) = self.owners.entry(v) {
                e.insert(vm);
                return Some(Vmid(v));
            }
        }
        None
    }

    /// Gives back a VMID whose TLB entries have been flushed.
    pub fn free(&mut self, v: Vmid) {
        self.owners.remove(&v.0);
    }

    /// Starts a new generation: keeps the VMIDs whose VM `keep` says so (the caller takes the
    /// others from their VMs) and returns how many were dropped. The caller flushes every VMID
    /// ([`TlbOps::flush_all`]) before it gives one again. When `keep` keeps them all there is
    /// no new generation (nothing to flush, nothing to give).
    pub fn new_generation(&mut self, mut keep: impl FnMut(Vmid, u32) -> bool) -> usize {
        let before = self.owners.len();
        self.owners.retain(|&v, &mut id| keep(Vmid(v), id));
        let dropped = before - self.owners.len();
        if dropped > 0 {
            self.generation = self.generation.wrapping_add(1);
            self.next = 1;
        }
        dropped
    }
}

/// What a new guest is made of.
pub struct GuestSpec<'a> {
    /// Name for logs and the tool.
    pub name: String,
    /// Kernel image (Linux arm64 `Image` or ELF).
    pub kernel: &'a [u8],
    /// Optional initrd.
    pub initrd: Option<&'a [u8]>,
    /// RAM in bytes (a multiple of 2 MiB).
    pub mem: u64,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Kernel command line.
    pub cmdline: String,
}

/// Why a VM could not be created. Nothing is left behind.
#[derive(Debug)]
pub enum CreateError {
    /// The stage-2 code failed (usually out of memory).
    Stage2(Stage2Error),
    /// The kernel image cannot be loaded.
    Load(loader::LoadError),
    /// The guest DTB cannot be built.
    Dtb(guest_dtb::DtbError),
    /// The vGIC refused the configuration.
    Config(String),
    /// A limit of the monitor's command line.
    Limit(ForkError),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CreateError::Stage2(e) => write!(f, "{e}"),
            CreateError::Load(e) => write!(f, "cannot load the kernel: {e}"),
            CreateError::Dtb(e) => write!(f, "cannot build the guest device tree: {e}"),
            CreateError::Config(e) => write!(f, "{e}"),
            CreateError::Limit(e) => write!(f, "{e}"),
        }
    }
}

/// Everything the monitor knows about its VMs.
pub struct VmTable<H: Host> {
    /// Memory, time, heap and log.
    pub host: H,
    /// VMs by id, with the scheduler's active set ([`super::vmmap`]): changing a VM through
    /// it (`get_mut`) is what lets the next pick see that VM.
    pub vms: VmMap,
    /// Id the next VM gets.
    pub next_id: u32,
    /// Id the next internal fork (a dump's) gets: from [`super::ops::INTERNAL_ID_BASE`] up.
    pub next_internal_id: u32,
    /// VMIDs given out, by generation (given when a VM is picked to run, see
    /// [`VmidAllocator`]).
    pub vmids: VmidAllocator,
    /// VM whose console receives what is typed on the monitor's console.
    pub focus: Option<u32>,
    /// The limits of the monitor's command line (`max_vms=`, `max_forks_per_tree=`).
    pub limits: Limits,
    /// Round-robin cursor: (vm id, vcpu index) last picked.
    cursor: (u32, usize),
    /// Forks alive per fork tree (by the tree's root VM id), kept as forks are added and
    /// destroyed so that `max_forks_per_tree=` is checked without walking every VM.
    tree_forks: BTreeMap<u32, u32>,
    /// Results of operations asked for by ticket ([`VmTable::request`]), until taken.
    pub(super) results: BTreeMap<u64, Result<Vec<u32>, ForkError>>,
    /// The next ticket.
    pub(super) next_ticket: u64,
    /// Consoles whose VM went while a client streamed them: the VM's id, its output the client
    /// has not had yet, and why it went. The control server sends these and ends the stream
    /// ([`VmTable::take_closed_console`]); at most [`CLOSED_CONSOLES_KEPT`], oldest dropped.
    closed_consoles: VecDeque<(u32, Vec<u8>, String)>,
    /// Records of the VMs that stopped (powered off, crashed, killed, ...), by id, for `list`
    /// and `info` until `Remove`: they hold no memory. At most `max_stopped=`; beyond it the
    /// record of the lowest id goes.
    pub stopped: BTreeMap<u32, StoppedVm>,
}

/// What is kept of a stopped VM: its last accounting, why it went and its last output.
#[derive(Clone, Debug)]
pub struct StoppedVm {
    /// As `info` showed it when it stopped, in state `Stopped`, with no pages (it holds none).
    pub info: vmfork_proto::VmInfo,
    /// Why it went, as the monitor's log said it.
    pub why: String,
    /// The last of its console output ([`super::vm::SCROLLBACK_BYTES`] at most).
    pub scrollback: VecDeque<u8>,
}

/// A vCPU picked to run ([`VmTable::pick_to_run`]).
pub struct Picked {
    /// Its VM's id.
    pub id: u32,
    /// Its index in the VM.
    pub vcpu: usize,
    /// Its context, out of the table while it runs.
    pub ctx: Box<VcpuCtx>,
    /// Its VM, to lock without the table lock.
    pub vm: VmHandle,
}

/// Most closed consoles kept for the control server (as many as may be attached at once).
pub const CLOSED_CONSOLES_KEPT: usize = 16;

impl<H: Host> VmTable<H> {
    /// An empty table.
    pub const fn new(host: H) -> Self {
        Self {
            host,
            vms: VmMap::new(),
            next_id: 1,
            next_internal_id: super::ops::INTERNAL_ID_BASE,
            vmids: VmidAllocator::new(),
            focus: None,
            limits: Limits::DEFAULT,
            cursor: (0, 0),
            tree_forks: BTreeMap::new(),
            results: BTreeMap::new(),
            next_ticket: 1,
            closed_consoles: VecDeque::new(),
            stopped: BTreeMap::new(),
        }
    }

    /// Forks alive in the tree rooted at VM `root` (the root itself not counted).
    pub fn tree_forks(&self, root: u32) -> u32 {
        self.tree_forks.get(&root).copied().unwrap_or(0)
    }

    /// Puts a new fork into the table, counting it in its tree.
    pub fn insert_fork(&mut self, mut child: Box<Vm>) {
        child.stats.born = self.host.now();
        if let Some(root) = child.stats.tree_root {
            *self.tree_forks.entry(root).or_insert(0) += 1;
        }
        self.vms.insert(child.id, child);
    }

    /// Tells the VMID allocator how wide VMIDs are on this CPU.
    pub fn set_vmid_bits(&mut self, bits: u32) {
        self.vmids.set_bits(bits);
    }

    /// Refuses `adding` new VMs when `max_vms` VMs are alive.
    pub fn check_vm_limit(&self, adding: u32) -> Result<(), ForkError> {
        let limit = self.limits.max_vms;
        let alive = u32::try_from(self.vms.len()).unwrap_or(u32::MAX);
        if alive.saturating_add(adding) > limit {
            return Err(ForkError::Limit {
                key: "max_vms",
                limit,
                alive,
                asked: adding,
            });
        }
        Ok(())
    }

    /// Stage-2 tables for a new VM (with no VMID: it gets one when first picked): `mem` bytes of zeroed RAM at
    /// [`layout::RAM_BASE`], the read-only `microsoft,vmgenid` page (outside RAM, because Linux
    /// claims its region as a device resource) holding `genid`, and whatever `fill` writes. All
    /// or nothing: on an error every frame is given back.
    pub fn guest_memory(
        &self,
        mem: u64,
        genid: &[u8; 16],
        fill: impl FnOnce(&mut Stage2, &mut MemCtx<'_, H::Mem, H::Tlb>) -> Result<(), Stage2Error>,
    ) -> Result<Stage2, Stage2Error> {
        self.host.with_mem(|cx| {
            let mut s2 = Stage2::new(cx, None)?;
            let read_only = Perms {
                write: false,
                exec: false,
            };
            let result = s2
                .map_ram(cx, Ipa(layout::RAM_BASE), mem / PAGE_SIZE, Perms::RWX)
                .and_then(|()| s2.map_ram(cx, Ipa(layout::VMGENID_BASE), 1, read_only))
                .and_then(|()| s2.write_guest(cx, Ipa(layout::VMGENID_BASE), genid))
                .and_then(|()| fill(&mut s2, cx));
            match result {
                Ok(()) => Ok(s2),
                Err(e) => {
                    // Give every frame back before reporting.
                    let _ = s2.destroy(cx);
                    Err(e)
                }
            }
        })
    }

    /// Creates a VM from `spec`, loads its kernel, DTB and initrd, and makes vCPU 0 runnable.
    pub fn create(&mut self, spec: &GuestSpec) -> Result<u32, CreateError> {
        self.check_vm_limit(1).map_err(CreateError::Limit)?;
        let mut vm = self.build(spec)?;
        vm.stats.born = self.host.now();
        let id = vm.id;
        // Within the estimate the caller checked the heap for.
        self.vms.insert(id, Box::new(vm));
        if self.focus.is_none() {
            self.focus = Some(id);
        }
        Ok(id)
    }

    fn build(&mut self, spec: &GuestSpec) -> Result<Vm, CreateError> {
        let id = self.next_id;
        let cpus = spec.cpus.clamp(1, layout::MAX_VCPUS);
        let initrd_len = spec.initrd.map_or(0, |i| i.len() as u64);
        let mut dtb_cfg = GuestDtbConfig {
            vcpus: cpus,
            ram_base: layout::RAM_BASE,
            ram_size: spec.mem,
            bootargs: spec.cmdline.clone(),
            initrd: (initrd_len > 0).then_some((layout::RAM_BASE, layout::RAM_BASE + initrd_len)),
            vmgenid: Some(layout::VMGENID_BASE),
            ..GuestDtbConfig::default()
        };
        // The DTB's size does not depend on the initrd's address: size it first, plan, then
        // build it for real with the planned addresses.
        let probe = guest_dtb::build(&dtb_cfg).map_err(CreateError::Dtb)?;
        let plan = loader::plan(
            spec.kernel,
            layout::RAM_BASE,
            spec.mem,
            initrd_len,
            probe.len() as u64,
        )
        .map_err(CreateError::Load)?;
        dtb_cfg.initrd = plan.initrd.as_ref().map(|r| (r.start, r.end));
        let dtb = guest_dtb::build(&dtb_cfg).map_err(CreateError::Dtb)?;
        let genid = self.host.generation_id(id);
        let vgic = Vgic::new(&VgicConfig::qemu_virt(cpus as usize))
            .map_err(|e| CreateError::Config(alloc::format!("vgic: {e:?}")))?;

        let s2 = self
            .guest_memory(spec.mem, &genid, |s2, cx| {
                for seg in &plan.segments {
                    s2.write_guest(cx, Ipa(seg.ipa), &spec.kernel[seg.src.clone()])?;
                }
                s2.write_guest(cx, Ipa(plan.dtb.start), &dtb)?;
                if let (Some(r), Some(initrd)) = (&plan.initrd, spec.initrd) {
                    s2.write_guest(cx, Ipa(r.start), initrd)?;
                }
                Ok(())
            })
            .map_err(CreateError::Stage2)?;

        let mut vcpus = Vec::new();
        for i in 0..cpus {
            let mut ctx = Box::new(VcpuCtx::at_reset(0));
            let state = if i == 0 {
                ctx.regs.pc = plan.entry;
                ctx.regs.x[..4].copy_from_slice(&plan.boot_registers());
                VcpuState::Runnable
            } else {
                VcpuState::Off
            };
            vcpus.push(Vcpu::new(Some(ctx), state, layout::vcpu_mpidr_affinity(i)));
        }
        self.next_id += 1;
        log::info!(
            "vm{id}: created '{}' with {} MiB, {cpus} vCPU(s), entry {:#x}",
            spec.name,
            spec.mem >> 20,
            plan.entry
        );
        Ok(Vm::new(
            id,
            spec.name.clone(),
            VmState::Running,
            s2,
            vcpus,
            Devices::new(vgic, Vuart::new()),
            // The guest's virtual count starts near zero, like on a fresh machine.
            self.host.now(),
            spec.mem,
            spec.cmdline.clone(),
            genid,
        ))
    }

    /// Picks a vCPU for physical CPU `cpu` to run at time `now`: wakes waiting vCPUs whose
    /// interrupt or timer is due, then takes the next runnable one after the round-robin
    /// cursor. Returns the VM id, vCPU index and its context, now marked as running on `cpu`.
    ///
    /// Only active VMs are looked at ([`super::vmmap`]): idle VMs whose timer is due become
    /// active first, and an active VM found with nothing to run or wake is taken out, its
    /// earliest timer deadline filed. A pick so costs what the active VMs cost, whatever the
    /// number of idle ones.
    pub fn pick(&mut self, cpu: usize, now: u64) -> Option<(u32, usize, Box<VcpuCtx>)> {
        self.vms.activate_due(now);
        self.settle_active(now);
        // The first runnable vCPU after the cursor, going round once; only active VMs can
        // have one.
        let cursor = self.cursor;
        let found = {
            let vms = &self.vms;
            let runnable = |id: u32| {
                let vm = vms.get(&id)?;
                vm.schedulable().then_some(())?;
                Some(
                    (0..vm.vcpus.len())
                        .filter(move |&i| {
                            vm.vcpus[i].state == VcpuState::Runnable && vm.vcpus[i].ctx.is_some()
                        })
                        .map(move |i| (id, i)),
                )
            };
            let after = vms
                .active_range(cursor.0..)
                .filter_map(runnable)
                .flatten()
                .filter(|&p| p > cursor);
            let before = vms
                .active_range(..=cursor.0)
                .filter_map(runnable)
                .flatten()
                .filter(|&p| p <= cursor);
            after.chain(before).next()
        };
        let (id, i) = found?;
        let mut vm = self.vms.get_mut(&id)?;
        // Its VM needs a VMID of the current generation before the vCPU runs; with every
        // VMID held by a VM on a CPU (only when there are fewer VMIDs than CPUs: tests) the
        // pick finds nothing this time.
        if vm.s2.as_ref().is_some_and(|s2| s2.vmid().is_none()) {
            drop(vm);
            if !self.give_vmid(id) {
                return None;
            }
            vm = self.vms.get_mut(&id)?;
        }
        let ctx = vm.vcpus[i].ctx.take()?;
        vm.vcpus[i].state = VcpuState::Running(cpu);
        // The host's clock, as `put_back` reads it (the caller's `now` is for timers and may
        // be another count in tests).
        vm.vcpus[i].on_cpu_since = self.host.now();
        self.cursor = (id, i);
        Some((id, i, ctx))
    }

    /// Makes sure VM `id` holds a VMID of the current generation, rolling over to a new
    /// generation if none is free ([`VmidAllocator`]). False if it cannot have one (no tables,
    /// or every VMID is held by a VM with a vCPU on a CPU). [`VmTable::pick`] does this; a host
    /// test that runs a VM's exits without picks does it as the scheduler would.
    pub fn give_vmid(&mut self, id: u32) -> bool {
        match self
            .vms
            .get(&id)
            .and_then(|vm| vm.s2.as_ref().map(|s2| s2.vmid()))
        {
            None => return false,
            Some(Some(_)) => return true,
            Some(None) => {}
        }
        let vmid = match self.vmids.alloc(id) {
            Some(v) => v,
            None => {
                self.new_vmid_generation();
                match self.vmids.alloc(id) {
                    Some(v) => v,
                    None => return false,
                }
            }
        };
        if let Some(s2) = self.vms.get(&id).as_mut().and_then(|vm| vm.s2.as_mut()) {
            s2.set_vmid(Some(vmid));
        }
        true
    }

    /// A VMID rollover: every VM loses its VMID but those with a vCPU on a CPU (they keep it
    /// into the new generation), then one broadcast flush of every VMID, so no TLB holds an
    /// entry of a VM that has no VMID and a VMID given from now on holds none.
    fn new_vmid_generation(&mut self) {
        let vms = &self.vms;
        let dropped = self.vmids.new_generation(|vmid, owner| {
            let Some(mut vm) = vms.get(&owner) else {
                return false;
            };
            if vm.any_running() {
                return true;
            }
            if let Some(s2) = vm.s2.as_mut() {
                if s2.vmid() == Some(vmid) {
                    s2.set_vmid(None);
                }
            }
            false
        });
        if dropped == 0 {
            // Every VMID is held by a VM on a CPU: none to give (fewer VMIDs than CPUs).
            return;
        }
        // ARM ARM (DDI 0487) D8.16 and the TLBI ALLE1IS description: the old generation's
        // entries of every VMID are gone from every CPU of the Inner Shareable domain once the
        // invalidation completes (its DSB ISH), so a VMID given from here on holds none.
        self.host.with_mem(|cx| cx.tlb.flush_all());
        log::debug!(
            "VMID rollover to generation {}: {dropped} VMIDs taken back, {} kept by running VMs",
            self.vmids.generation(),
            self.vmids.in_use()
        );
    }

    /// [`VmTable::pick`], with a handle to the picked vCPU's VM: the CPU that runs it handles
    /// its exits under that VM's lock alone ([`super::exit::handle_sync_vm`]).
    pub fn pick_to_run(&mut self, cpu: usize, now: u64) -> Option<Picked> {
        let (id, vcpu, ctx) = self.pick(cpu, now)?;
        // Picked from the table a moment ago, under the same lock: it is there.
        self.vms.handle(&id).map(|vm| Picked { id, vcpu, ctx, vm })
    }

    /// Wakes the due waiting vCPUs of every active VM, and takes out of the active set each VM
    /// with no vCPU runnable or on a CPU (or that cannot be scheduled), filing the earliest
    /// timer deadline of its waiting vCPUs.
    fn settle_active(&mut self, now: u64) {
        let host = &self.host;
        // Walked by id from the last one seen: the set changes as it is walked.
        let mut next = self.vms.active_ids().next();
        while let Some(id) = next {
            next = self.vms.active_range(id + 1..).next();
            let Some(handle) = self.vms.handle_inert(&id) else {
                self.vms.deactivate(id, None, None);
                continue;
            };
            let mut vm = super::vmmap::lock(&handle);
            if !vm.schedulable() {
                // Paused, stopping, or a fork or reset waits: whatever changes that goes
                // through `get_mut` and makes it active again. Its vCPUs on a CPU come back
                // through `put_back`, which does too.
                self.vms.deactivate(id, Some(&mut vm), None);
                continue;
            }
            for i in 0..vm.vcpus.len() {
                if vm.vcpus[i].state == VcpuState::Waiting {
                    vm.wake_if_due(host, i, now);
                }
            }
            let busy = vm
                .vcpus
                .iter()
                .any(|v| matches!(v.state, VcpuState::Runnable | VcpuState::Running(_)));
            if !busy {
                let deadline = vm
                    .vcpus
                    .iter()
                    .filter(|v| v.state == VcpuState::Waiting)
                    .filter_map(|v| vm.timer_deadline(v.ctx.as_ref()?, now))
                    .min();
                self.vms.deactivate(id, Some(&mut vm), deadline);
            }
        }
    }

    /// Earliest physical-counter time at which a waiting vCPU's virtual timer fires.
    pub fn next_timer_deadline(&self, now: u64) -> Option<u64> {
        let active = self
            .vms
            .active_ids()
            .filter_map(|id| {
                let vm = self.vms.get(&id)?;
                if !vm.schedulable() {
                    return None;
                }
                vm.vcpus
                    .iter()
                    .filter(|v| v.state == VcpuState::Waiting)
                    .filter_map(|v| vm.timer_deadline(v.ctx.as_ref()?, now))
                    .min()
            })
            .min();
        match (active, self.vms.first_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Hands a vCPU's context back after it ran, with its new state. Tears the VM down if it is
    /// stopping and this was the last of its vCPUs on a CPU, or runs the forks and resets that
    /// wait for that. Returns what to wake.
    pub fn put_back(&mut self, id: u32, vcpu: usize, ctx: Box<VcpuCtx>, state: VcpuState) -> Kicks {
        let now = self.host.now();
        let (stopping, pending) = {
            let Some(mut vm) = self.vms.get_mut(&id) else {
                return Kicks::new();
            };
            let Some(v) = vm.vcpus.get_mut(vcpu) else {
                return Kicks::new();
            };
            let ran = match v.state {
                VcpuState::Running(_) => now.saturating_sub(v.on_cpu_since),
                _ => 0,
            };
            v.ctx = Some(ctx);
            v.state = state;
            vm.stats.vcpu_ticks = vm.stats.vcpu_ticks.saturating_add(ran);
            if vm.any_running() {
                return Kicks::new();
            }
            (
                matches!(vm.state, VmState::Stopping(_)),
                !vm.pending.is_empty(),
            )
        };
        if stopping {
            self.destroy(id);
            Kicks::new()
        } else if pending {
            self.run_pending(id)
        } else {
            Kicks::new()
        }
    }

    /// Stops VM `id` for `reason`: it is torn down now if none of its vCPUs is on a CPU, else
    /// when the last one comes back. Returns the physical CPUs to kick.
    pub fn stop(&mut self, id: u32, reason: StopReason) -> Kicks {
        {
            let Some(mut vm) = self.vms.get_mut(&id) else {
                return Kicks::new();
            };
            log::info!("vm{id}: stopping: {reason}");
            vm.state = VmState::Stopping(reason);
        }
        // Whoever waits for a fork or reset of it is told now, not when its last vCPU leaves
        // (which may be never).
        self.fail_pending(id);
        let mut kicks = Kicks::new();
        if let Some(vm) = self.vms.get(&id) {
            kicks.extend(vm.running_cpus());
        }
        if kicks.cpus.is_empty() {
            self.destroy(id);
        }
        kicks
    }

    /// Removes VM `id` and frees everything it holds. None of its vCPUs may be on a CPU.
    pub fn destroy(&mut self, id: u32) {
        // A VM that stopped by itself (SYSTEM_OFF, a fatal exit) may still have waiters.
        self.fail_pending(id);
        let Some(handle) = self.vms.remove(&id) else {
            return;
        };
        // No vCPU of it is on a CPU, so no one else holds its lock.
        let mut vm = super::vmmap::lock(&handle);
        if let Some(root) = vm.stats.tree_root {
            if let Some(n) = self.tree_forks.get_mut(&root) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.tree_forks.remove(&root);
                }
            }
        }
        vm.drain_console(&self.host);
        vm.flush_console_line(&self.host);
        // Taken before its memory goes: the record keeps its COW count.
        let record = self.record_of(&mut vm);
        if vm.console_attached {
            // The streaming client gets the rest of the output and why the VM went.
            if self.closed_consoles.len() >= CLOSED_CONSOLES_KEPT {
                self.closed_consoles.pop_front();
            }
            let why = match &vm.state {
                VmState::Stopping(r) => alloc::format!("{r}"),
                _ => String::from("destroyed"),
            };
            let rest = core::mem::take(&mut vm.console_tap);
            self.closed_consoles.push_back((id, rest, why));
        }
        if let Some(rp) = vm.reset_point.take() {
            if let Err(e) = self.host.with_mem(|cx| rp.release(cx)) {
                log::error!("vm{id}: releasing its reset point failed: {e}");
            }
        }
        if let Some(s2) = vm.s2.take() {
            let vmid = s2.vmid();
            // `destroy` flushes the VM's VMID first, if it holds one; a VMID whose teardown
            // failed stays taken (it may still have entries) until the next rollover flushes it.
            match self.host.with_mem(|cx| s2.destroy(cx)) {
                Ok(()) => {
                    if let Some(v) = vmid {
                        self.vmids.free(v);
                    }
                }
                Err(e) => log::error!("vm{id}: teardown of its stage-2 tables failed: {e}"),
            }
        }
        if self.focus == Some(id) {
            self.focus = self
                .vms
                .keys()
                .copied()
                .find(|&k| k < super::ops::INTERNAL_ID_BASE);
            // Said on the monitor's console, where the focus is used.
            match self.focus {
                Some(next) => {
                    log::info!("vm{id} had the console focus: input now goes to vm{next}")
                }
                None => log::info!("vm{id} had the console focus: no VM is left to type into"),
            }
        }
        let (free, total) = self
            .host
            .with_mem(|cx| (cx.frames.free_frames(), cx.frames.total_frames()));
        let reason = match &vm.state {
            VmState::Stopping(r) => alloc::format!("{r}"),
            _ => String::from("stopped"),
        };
        log::info!(
            "vm{id}: '{}' {reason}; destroyed, its {} MiB of RAM returned; frames free {free} of {total}",
            vm.name,
            vm.ram_size >> 20
        );
        if let Some(r) = record {
            self.keep_record(id, r);
        }
        self.host.vm_gone(id);
    }

    /// The record to keep of `vm`, which is being torn down: none for the monitor's own forks,
    /// a VM that asked for none (`remove_on_stop`), or one not stopped for a reason a user sees
    /// (a table entry destroyed directly, a dump's fork). Takes its scroll-back.
    fn record_of(&self, vm: &mut Vm) -> Option<StoppedVm> {
        if vm.internal || vm.remove_on_stop {
            return None;
        }
        let VmState::Stopping(r) = &vm.state else {
            return None;
        };
        let reason = super::server::stop_reason(r)?;
        let why = alloc::format!("{r}");
        let mut info = super::server::info_without_pages(&self.host, vm);
        info.state = vmfork_proto::VmState::Stopped { reason };
        Some(StoppedVm {
            info,
            why,
            scrollback: core::mem::take(&mut vm.scrollback),
        })
    }

    /// Files the record of stopped VM `id`, within `max_stopped=` and the heap's reserve (a
    /// record the heap cannot take is dropped, and the log says so).
    fn keep_record(&mut self, id: u32, r: StoppedVm) {
        // A map node and the strings: a generous estimate.
        let bytes = 256 + r.info.name.len() + r.why.len();
        if let Err(e) = self.host.heap_check(bytes) {
            log::warn!("vm{id}: no record kept of it (heap low: {e:?})");
            return;
        }
        self.stopped.insert(id, r);
        while self.stopped.len() > self.limits.max_stopped as usize {
            if let Some((old, _)) = self.stopped.pop_first() {
                log::info!(
                    "vm{old}: its record dropped: more than max_stopped={} stopped VMs kept",
                    self.limits.max_stopped
                );
            }
        }
    }

    /// Forgets the record of stopped VM `id`; false if there was none.
    pub fn remove_record(&mut self, id: u32) -> bool {
        self.stopped.remove(&id).is_some()
    }

    /// Prints the unended console line of every VM that has had one for `max_age` counter
    /// ticks or more (a shell's prompt, a progress line): it would otherwise show only when the
    /// guest ends the line. What the guest prints next starts a line of its own.
    pub fn flush_stale_lines(&mut self, now: u64, max_age: u64) {
        let host = &self.host;
        // Printing a line wakes no vCPU: the scheduler's active set stays as it is.
        for mut vm in self.vms.values_mut_inert() {
            if !vm.line.is_empty() && now.wrapping_sub(vm.line_since) >= max_age {
                vm.flush_console_line(host);
            }
        }
    }

    /// The rest of the output of VM `id`, gone while its console was streamed, and why it
    /// went; `None` if it was not streamed (or was dropped as one of too many).
    pub fn take_closed_console(&mut self, id: u32) -> Option<(Vec<u8>, String)> {
        let i = self.closed_consoles.iter().position(|c| c.0 == id)?;
        self.closed_consoles
            .remove(i)
            .map(|(_, data, why)| (data, why))
    }

    /// True when some vCPU of a running VM is ready to run.
    pub fn has_runnable(&self) -> bool {
        // Only an active VM can have one (`super::vmmap`).
        self.vms
            .active_ids()
            .filter_map(|id| self.vms.get(&id))
            .any(|vm| vm.schedulable() && vm.vcpus.iter().any(|v| v.state == VcpuState::Runnable))
    }
}
