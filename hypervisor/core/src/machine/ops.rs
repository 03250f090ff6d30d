//! Forking and resetting whole VMs.
//!
//! A fork needs every vCPU of the parent off the CPUs, so it is a *pending operation*: the
//! request (the guest's fork hypercall, or the control channel) is queued on the VM
//! ([`crate::opqueue`]: bounded, and every request answered exactly once), which stops its vCPUs
//! from being scheduled and kicks the CPUs running them; the CPU that puts back the last
//! running vCPU then performs what waits ([`VmTable::run_pending`]). A VM torn down meanwhile
//! fails what waits at once ([`VmTable::fail_pending`]). The copy itself is
//! [`Stage2::fork`] (constant time: the parent's root entries become markers) plus a clone of
//! every vCPU context and device model.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::devices::Devices;
use super::vm::{NewIdentity, PauseReason, Vcpu, Vm, VmState};
use super::{vm_log, HeapLow, Host, Kicks, VcpuCtx, VmTable};
use crate::opqueue::{guest_x0, Busy, GuestError, Waiter};
use crate::physmem::PhysMem;
use crate::shared::Shared;
use crate::stage2::{ForkPoint, MemCtx, Stage2, Stage2Error, TlbOps};
use crate::vuart::Vuart;

/// Where `reset` puts a fork back to: its stage-2 fork point and its vCPUs and devices as they
/// were at the fork.
pub struct ResetPoint {
    /// The stage-2 tables as they were at the fork (shared with the parent and siblings).
    pub point: ForkPoint,
    /// vCPU states and contexts at the fork (the forking vCPU's X0 already holds 0).
    pub vcpus: Vec<Vcpu>,
    /// The devices at the fork (the vGIC shared with the child until either changes it).
    pub devices: Devices,
}

impl ResetPoint {
    /// Drops the reset point's references on the shared tables.
    pub fn release<M: PhysMem, T: TlbOps>(
        self,
        cx: &mut MemCtx<'_, M, T>,
    ) -> Result<(), Stage2Error> {
        self.point.release(cx)
    }
}

/// An operation that waits for every vCPU of a VM to leave the CPUs. Who waits for it is
/// kept beside it in the VM's [`OpQueue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingOp {
    /// Fork `count` children.
    Fork {
        /// How many children.
        count: u32,
        /// Leave the children paused at the fork point.
        paused: bool,
        /// Keep no record of the children once they stop.
        remove_on_stop: bool,
    },
    /// Put the VM back to its reset point.
    Reset,
    /// One paused internal fork for a dump to be read from: not listed, and its id comes from
    /// [`INTERNAL_ID_BASE`] up, so VM ids users see do not skip.
    DumpFork,
}

/// Ids of internal forks (a dump's) start here; the VMs users create, fork and restore are
/// numbered from 1 and never get so far.
pub const INTERNAL_ID_BASE: u32 = 0x8000_0000;

/// The operations waiting on one VM ([`crate::opqueue`]: bounded, each answered once).
pub type OpQueue = crate::opqueue::OpQueue<PendingOp>;

/// Per-VM counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmStats {
    /// Children forked from this VM.
    pub forks: u64,
    /// Counter ticks the last fork took, from the request being run to the children existing.
    pub last_fork_ticks: u64,
    /// Resets to the reset point.
    pub resets: u64,
    /// Counter ticks the last reset took.
    pub last_reset_ticks: u64,
    /// The root of this VM's fork tree (the VM created or restored that it descends from), or
    /// `None` when this VM is a root. Kept when the VMs between them are gone.
    pub tree_root: Option<u32>,
    /// When it was created, forked or restored (counter ticks).
    pub born: u64,
    /// Counter ticks its vCPUs have spent on physical CPUs, all summed.
    pub vcpu_ticks: u64,
}

/// Why a fork or reset failed. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForkError {
    /// No VM with that id.
    NoSuchVm(u32),
    /// Not enough free frames, or the monitor's heap is low (its reserve counted).
    OutOfMemory,
    /// Reset of a VM that is not a fork.
    NotAFork(u32),
    /// The VM is being torn down.
    Stopping(u32),
    /// As many forks and resets of the VM as may wait already wait.
    Busy(u32),
    /// A limit set on the monitor's command line (`max_vms=`, `max_forks_per_tree=`).
    Limit {
        /// The limit's command-line key.
        key: &'static str,
        /// Its value.
        limit: u32,
        /// How many there are already.
        alive: u32,
        /// How many the fork would add.
        asked: u32,
    },
    /// A stage-2 error other than running out of memory (a bug).
    Internal(String),
}

impl From<HeapLow> for ForkError {
    /// The heap running low is reported like the frames running out: the guest gets
    /// `INTERNAL_FAILURE`, the channel `OutOfMemory` (the detail is logged where it happens).
    fn from(_: HeapLow) -> Self {
        ForkError::OutOfMemory
    }
}

impl core::fmt::Display for ForkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ForkError::NoSuchVm(id) => write!(f, "no such VM: vm{id}"),
            ForkError::OutOfMemory => write!(f, "out of memory"),
            ForkError::NotAFork(id) => write!(f, "vm{id} is not a fork: it has no reset point"),
            ForkError::Stopping(id) => write!(f, "vm{id} is being torn down"),
            ForkError::Busy(id) => write!(f, "vm{id} has too many forks or resets waiting"),
            ForkError::Limit {
                key,
                limit,
                alive,
                asked,
            } => write!(
                f,
                "limit reached: {key}={limit}, {alive} alive and {asked} more asked for"
            ),
            ForkError::Internal(e) => write!(f, "internal error: {e}"),
        }
    }
}

fn stage2_error(e: Stage2Error) -> ForkError {
    match e {
        Stage2Error::OutOfMemory => ForkError::OutOfMemory,
        e => ForkError::Internal(format!("{e}")),
    }
}

/// Heap bytes one fork of `parent` takes: the child (its share of a map node too), its vCPU
/// contexts and those of its reset point, its name and command line, its UARTs, and slack for
/// the small allocations around them. (Not the copy of the vGIC a running child makes: that is
/// fallible, and `fork_now` adds it for children that run.)
pub fn fork_heap_cost(parent: &Vm) -> usize {
    use core::mem::size_of;
    let vcpus = parent.vcpus.len();
    2 * size_of::<Vm>()
        + 2 * vcpus * (size_of::<VcpuCtx>() + size_of::<Vcpu>() + 16)
        + parent.name.len()
        + 12
        + parent.cmdline.len()
        + 2 * (size_of::<Vuart>() + 128)
        + 512
}

fn guest_error(e: &ForkError) -> GuestError {
    match e {
        ForkError::OutOfMemory => GuestError::OutOfMemory,
        ForkError::Busy(_) => GuestError::Busy,
        _ => GuestError::Denied,
    }
}

/// Guest vCPU `vcpu`'s `VMFORK_FORK`/`VMFORK_RESET`, queued on its VM, with the CPUs to kick.
/// `Ok`: the vCPU leaves its CPU and its X0 is written when the operation runs (or the VM goes).
/// `Err(x0)`: refused, answer `x0` now: another fork or reset already waits (`VMFORK_BUSY`;
/// see [`crate::opqueue`] for why it is not queued behind), or the VM is going.
pub fn guest_request(
    vm: &mut Vm,
    vcpu: usize,
    op: PendingOp,
    kicks: &mut Kicks,
) -> Result<(), u64> {
    if matches!(vm.state, VmState::Stopping(_)) {
        return Err(guest_x0(Err(GuestError::Denied)));
    }
    if vm.pending.push_vcpu(vcpu, op).is_err() {
        log::debug!(
            "vm{} vcpu{vcpu}: {op:?} refused: another fork or reset waits",
            vm.id
        );
        return Err(guest_x0(Err(GuestError::Busy)));
    }
    kicks.extend(vm.running_cpus());
    Ok(())
}

/// A copy of `vcpus` whose allocations fail instead of aborting.
fn try_clone_vcpus<H: Host>(h: &H, vcpus: &[Vcpu]) -> Result<Vec<Vcpu>, HeapLow> {
    let mut out = Vec::new();
    out.try_reserve_exact(vcpus.len()).map_err(|_| HeapLow {
        wanted: core::mem::size_of_val(vcpus),
        free: 0,
        reserve: 0,
    })?;
    for v in vcpus {
        let ctx = match &v.ctx {
            Some(c) => Some(h.try_box(VcpuCtx::clone(c))?),
            None => None,
        };
        out.push(Vcpu::new(ctx, v.state, v.mpidr));
    }
    Ok(out)
}

/// `s` copied into a string allocated fallibly, with `suffix` appended.
fn try_string(s: &str, suffix: core::fmt::Arguments<'_>) -> Result<String, HeapLow> {
    use core::fmt::Write;
    let mut out = String::new();
    let want = s.len() + 16;
    out.try_reserve_exact(want).map_err(|_| HeapLow {
        wanted: want,
        free: 0,
        reserve: 0,
    })?;
    out.push_str(s);
    // At most a few digits: fits in what was reserved.
    let _ = out.write_fmt(suffix);
    Ok(out)
}

impl<H: Host> VmTable<H> {
    /// Asks for `op` on VM `id` for the control channel. It runs at once if none of the VM's
    /// vCPUs is on a CPU, else when the last one comes back, after the operations already
    /// waiting. Returns the ticket to collect the result with [`VmTable::take_result`] (exactly
    /// one result is filed under it, whatever happens to the VM), and what to kick. Refused
    /// with `Busy` when [`crate::opqueue::MAX_WAITING`] operations already wait on the VM.
    pub fn request(&mut self, id: u32, op: PendingOp) -> Result<(u64, Kicks), ForkError> {
        let ticket = self.next_ticket;
        let mut kicks = Kicks::new();
        {
            let mut vm = self.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
            if matches!(vm.state, VmState::Stopping(_)) {
                return Err(ForkError::Stopping(id));
            }
            vm.pending
                .push_ticket(ticket, op)
                .map_err(|Busy| ForkError::Busy(id))?;
            kicks.extend(vm.running_cpus());
        }
        self.next_ticket += 1;
        if kicks.cpus.is_empty() {
            kicks.merge(self.run_pending(id));
        }
        Ok((ticket, kicks))
    }

    /// The result of the operation with `ticket`, once it has run.
    pub fn take_result(&mut self, ticket: u64) -> Option<Result<Vec<u32>, ForkError>> {
        self.results.remove(&ticket)
    }

    /// Tickets whose results wait to be taken.
    pub fn results_waiting(&self) -> usize {
        self.results.len()
    }

    /// Answers `waiter` with `result`: files it under the ticket, or writes a failure into the
    /// calling vCPU's X0 (a fork's success is written by [`VmTable::fork_now`] itself, into
    /// parent and child; a reset's replaces the whole vCPU).
    fn answer(&mut self, id: u32, waiter: Waiter, result: Result<Vec<u32>, ForkError>) {
        match waiter {
            Waiter::Ticket(ticket) => {
                self.results.insert(ticket, result);
            }
            Waiter::Vcpu(c) => {
                if let (Err(e), Some(mut vm)) = (&result, self.vms.get_mut(&id)) {
                    if let Some(ctx) = vm.vcpus.get_mut(c).and_then(|v| v.ctx.as_mut()) {
                        ctx.regs.x[0] = guest_x0(Err(guest_error(e)));
                    }
                }
            }
        }
    }

    /// Fails every operation waiting on VM `id` (it is being torn down): each waiter is
    /// answered now.
    pub fn fail_pending(&mut self, id: u32) {
        loop {
            let Some(w) = self.vms.get_mut(&id).and_then(|mut vm| vm.pending.pop()) else {
                return;
            };
            vm_log!(
                &self.host,
                Info,
                id,
                "vm{id}: {:?} not run: the VM is being torn down",
                w.op
            );
            self.answer(id, w.waiter, Err(ForkError::Stopping(id)));
        }
    }

    /// Runs every operation waiting on VM `id`, oldest first, and answers each. None of its
    /// vCPUs may be on a CPU. Returns what to wake (the VM's vCPUs may run again).
    pub fn run_pending(&mut self, id: u32) -> Kicks {
        let mut kicks = Kicks::new();
        while let Some(w) = self.vms.get_mut(&id).and_then(|mut vm| vm.pending.pop()) {
            kicks.idle = true;
            let caller = match w.waiter {
                Waiter::Vcpu(c) => Some(c),
                Waiter::Ticket(_) => None,
            };
            let result = match w.op {
                PendingOp::Fork {
                    count,
                    paused,
                    remove_on_stop,
                } => {
                    let r = self.fork_now(id, count, paused, caller);
                    // Under the table lock still: no child has run yet.
                    if let (Ok(kids), true) = (&r, remove_on_stop) {
                        for c in kids {
                            if let Some(mut vm) = self.vms.get_mut(c) {
                                vm.remove_on_stop = true;
                            }
                        }
                    }
                    r
                }
                PendingOp::Reset => self.reset_now(id).map(|()| Vec::new()),
                PendingOp::DumpFork => self.fork_many(id, 1, true, None, true),
            };
            if let Err(e) = &result {
                vm_log!(&self.host, Warn, id, "vm{id}: {:?} failed: {e}", w.op);
            }
            self.answer(id, w.waiter, result);
        }
        kicks
    }

    /// Frees a child that was being built when a later step failed.
    fn discard(&mut self, s2: Stage2, fp: ForkPoint) {
        // A child that never ran: it holds no VMID.
        let result = self.host.with_mem(|cx| {
            fp.release(cx)?;
            s2.destroy(cx)
        });
        if let Err(e) = result {
            log::error!("discarding a half-built fork failed: {e}");
        }
    }

    /// Forks VM `id` `count` times, now. All or nothing. Refused, with nothing changed, when a
    /// limit would be passed ([`VmTable::limits`]) or the heap cannot take `count` forks with
    /// its reserve left ([`fork_heap_cost`], [`Host::heap_check`]); the big pieces are
    /// allocated fallibly too. `caller` is the vCPU whose hypercall asked for it: its X0 gets
    /// the first child's id in the parent and 0 in the children.
    pub fn fork_now(
        &mut self,
        id: u32,
        count: u32,
        paused: bool,
        caller: Option<usize>,
    ) -> Result<Vec<u32>, ForkError> {
        self.fork_many(id, count, paused, caller, false)
    }

    /// [`VmTable::fork_now`], or (`internal`) the forks a dump reads from: numbered from
    /// [`INTERNAL_ID_BASE`], named `<name>.dump`, not counted in the parent's forks.
    fn fork_many(
        &mut self,
        id: u32,
        count: u32,
        paused: bool,
        caller: Option<usize>,
        internal: bool,
    ) -> Result<Vec<u32>, ForkError> {
        let t0 = self.host.now();
        let count = count.max(1);
        let parent_guard = self.vms.get(&id).ok_or(ForkError::NoSuchVm(id))?;
        let parent = &*parent_guard;
        // The limits first: they are cheap, and say more than the heap running out.
        self.check_vm_limit(count)?;
        let root = parent.tree_root();
        let limit = self.limits.max_forks_per_tree;
        // Kept by the table as forks come and go: a walk of every VM here made forking N
        // children O(N^2).
        let in_tree = self.tree_forks(root);
        if in_tree.saturating_add(count) > limit {
            return Err(ForkError::Limit {
                key: "max_forks_per_tree",
                limit,
                alive: in_tree,
                asked: count,
            });
        }
        // Children that run copy the vGIC they share on their first interrupt, and a running
        // parent needs its own copy again (the children's reset points keep the one it had),
        // made below: counted too, so that a fork bomb is refused its fork rather than paused
        // for want of a vGIC copy.
        // Children are named `<parent>.<n>`, n counting the parent's forks from 1.
        let forks_before = parent.stats.forks;
        let vgic = parent.devices.vgic.copy_bytes() + 64;
        let per_child = fork_heap_cost(parent) + if paused { 0 } else { vgic };
        let cost = per_child
            .saturating_mul(count as usize)
            .saturating_add(vgic);
        if let Err(e) = self.host.heap_check(cost) {
            vm_log!(&self.host, Warn, id, "vm{id}: fork of {count} refused: {e}");
            return Err(e.into());
        }
        // A running parent gets its own vGIC copy now (fallibly), rather than lazily on its
        // next entry, where want of heap could only pause it.
        let parent_vgic = if matches!(parent.state, VmState::Running) {
            match parent.devices.vgic.try_clone_value() {
                Ok(g) => Some(Shared::new(g)),
                Err(_) => return Err(ForkError::OutOfMemory),
            }
        } else {
            None
        };
        // Each child is built from the parent locked again (`fork_one`).
        drop(parent_guard);
        let mut built: Vec<Box<Vm>> = Vec::new();
        let mut ids: Vec<u32> = Vec::new();
        if built.try_reserve_exact(count as usize).is_err()
            || ids.try_reserve_exact(count as usize).is_err()
        {
            return Err(ForkError::OutOfMemory);
        }
        for k in 0..u64::from(count) {
            let seq = forks_before.saturating_add(k + 1);
            match self.fork_one(id, root, paused, caller, internal, seq) {
                // Within the fork's heap cost, checked above.
                Ok(child) => built.push(Box::new(child)),
                Err(e) => {
                    for mut child in built {
                        if let (Some(s2), Some(rp)) = (child.s2.take(), child.reset_point.take()) {
                            self.discard(s2, rp.point);
                        }
                    }
                    // The ids handed out to the discarded children are not reused: ids only
                    // grow, so a VM's id never names another VM later.
                    return Err(e);
                }
            }
        }
        let ticks = self.host.now().wrapping_sub(t0);
        ids.extend(built.iter().map(|c| c.id));
        for child in built {
            self.insert_fork(child);
        }
        let mut parent = self.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
        if let Some(g) = parent_vgic {
            parent.devices.vgic = g;
        }
        if !internal {
            parent.stats.forks += ids.len() as u64;
            parent.stats.last_fork_ticks = ticks;
        }
        if let Some(ctx) = caller.and_then(|c| parent.vcpus.get_mut(c)?.ctx.as_mut()) {
            ctx.regs.x[0] = u64::from(ids[0]);
        }
        // Children get consecutive ids: name the first and the last (no list to allocate).
        let (first, last) = (ids[0], ids[ids.len() - 1]);
        let us = self.host.micros(ticks);
        if first == last {
            vm_log!(
                &self.host,
                Info,
                id,
                "vm{id}: forked vm{first} in {ticks} counter ticks ({us} us)"
            );
        } else {
            vm_log!(
                &self.host,
                Info,
                id,
                "vm{id}: forked {} children vm{first}..vm{last} in {ticks} counter ticks ({us} us)",
                ids.len()
            );
        }
        Ok(ids)
    }

    fn fork_one(
        &mut self,
        id: u32,
        root: u32,
        paused: bool,
        caller: Option<usize>,
        internal: bool,
        seq: u64,
    ) -> Result<Vm, ForkError> {
        let child_id = if internal {
            self.next_internal_id
        } else {
            self.next_id
        };
        let host = &self.host;
        let mut parent = self.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
        if matches!(parent.state, VmState::Stopping(_)) {
            return Err(ForkError::Stopping(id));
        }
        // What the parent printed so far is the parent's; the child starts with an empty line.
        parent.drain_console(host);
        // The heap first (fallibly), then the tables: nothing to undo if the heap fails.
        let mut vcpus = try_clone_vcpus(host, &parent.vcpus)?;
        if let Some(ctx) = caller.and_then(|c| vcpus.get_mut(c)?.ctx.as_mut()) {
            ctx.regs.x[0] = 0; // the fork hypercall returns 0 in the child
        }
        let reset_vcpus = try_clone_vcpus(host, &vcpus)?;
        let name = if internal {
            try_string(&parent.name, format_args!(".dump"))?
        } else {
            try_string(&parent.name, format_args!(".{seq}"))?
        };
        let cmdline = try_string(&parent.cmdline, format_args!(""))?;
        let Some(s2) = parent.s2.as_mut() else {
            return Err(ForkError::Stopping(id));
        };
        // The child has no VMID until it is first picked to run (`VmTable::pick`): a paused or
        // idle fork holds none.
        let (child_s2, point) = host
            .with_mem(|cx| s2.fork(cx, None))
            .map_err(stage2_error)?;
        // The child's own vmgenid ID is written, and its interrupt raised, when the child first
        // needs them (`Vm::apply_new_identity`), not here: that keeps the fork constant and
        // small.
        let genid = host.generation_id(child_id);
        // The devices for the child and for its reset point: the vGIC shared, the UART copied.
        let (devices, kept) = match (parent.devices.try_fork(), parent.devices.try_fork()) {
            (Ok(d), Ok(k)) => (d, k),
            (Err(e), _) | (_, Err(e)) => {
                // Nothing of the child exists yet but its tables: give them back.
                let result = host.with_mem(|cx| {
                    point.release(cx)?;
                    child_s2.destroy(cx)
                });
                if let Err(e) = result {
                    log::error!("discarding a half-built fork failed: {e}");
                }
                return Err(e.into());
            }
        };
        let reset_point = ResetPoint {
            point,
            vcpus: reset_vcpus,
            devices: kept,
        };
        let state = if paused {
            VmState::Paused(PauseReason::Forked)
        } else {
            VmState::Running
        };
        let mut child = Vm::new(
            child_id,
            name,
            state,
            child_s2,
            vcpus,
            devices,
            parent.cntvoff,
            parent.ram_size,
            cmdline,
            genid,
        );
        child.parent = Some(id);
        child.generation = parent.generation + 1;
        child.new_identity = NewIdentity::Pending;
        child.reset_point = Some(reset_point);
        child.stats.tree_root = Some(root);
        child.internal = internal;
        if internal {
            self.next_internal_id = self.next_internal_id.wrapping_add(1).max(INTERNAL_ID_BASE);
        } else {
            self.next_id += 1;
        }
        Ok(child)
    }

    /// Puts fork `id` back to its reset point: memory (dropping only the pages it made
    /// private), vCPUs and devices. Virtual time is not rewound: CNTVOFF stays, so the guest's
    /// clock goes on.
    pub fn reset_now(&mut self, id: u32) -> Result<(), ForkError> {
        let host = &self.host;
        let t0 = host.now();
        let mut guard = self.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
        let vm = &mut *guard;
        if matches!(vm.state, VmState::Stopping(_)) {
            return Err(ForkError::Stopping(id));
        }
        let rp = vm.reset_point.as_ref().ok_or(ForkError::NotAFork(id))?;
        // The vCPU copies first, fallibly: a reset that fails changes nothing.
        let vcpus = try_clone_vcpus(host, &rp.vcpus)?;
        let devices = rp.devices.try_fork()?;
        let s2 = vm.s2.as_mut().ok_or(ForkError::Stopping(id))?;
        host.with_mem(|cx| s2.reset(cx, &rp.point))
            .map_err(stage2_error)?;
        // The fork point's ID page holds what the parent's held: a reset is a new generation
        // for the guest (its RNG state was rolled back with its memory), so it gets a new ID,
        // written (then its interrupt raised) before any of its vCPUs runs again
        // (Vm::apply_new_identity).
        vm.genid = host.generation_id(id);
        vm.new_identity = NewIdentity::Pending;
        vm.vcpus = vcpus;
        vm.devices = devices;
        vm.line.clear();
        if matches!(vm.state, VmState::Paused(_)) {
            vm.state = VmState::Running;
        }
        let ticks = host.now().wrapping_sub(t0);
        vm.stats.resets += 1;
        vm.stats.last_reset_ticks = ticks;
        vm_log!(
            host,
            Info,
            id,
            "vm{id}: reset to its fork point in {ticks} counter ticks ({} us)",
            host.micros(ticks)
        );
        Ok(())
    }
}
