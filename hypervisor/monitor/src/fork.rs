//! Forking and resetting whole VMs.
//!
//! A fork needs every vCPU of the parent off the CPUs, so it is a *pending operation*: the
//! request (the guest's fork hypercall, or the monitor's API) is queued on the VM
//! (`vmfork_core::opqueue`: bounded, and every request answered exactly once), which stops its
//! vCPUs from being scheduled and kicks the CPUs running them; the CPU that puts back the last
//! running vCPU then performs what waits (`run_pending`). A VM torn down meanwhile fails what
//! waits at once (`fail_pending`). The copy itself is `Stage2::fork` (constant time: the
//! parent's root entries become markers) plus a clone of every vCPU context and device model.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use vmfork_core::cmdline::Limits;
use vmfork_core::guest_dtb::layout;
use vmfork_core::opqueue::{guest_x0, Busy, GuestError, Waiter};
use vmfork_core::shared::Shared;
use vmfork_core::stage2::{ForkPoint, MemCtx, Stage2, Stage2Error, TlbOps};
use vmfork_core::vgic::Vgic;
use vmfork_core::vuart::Vuart;

use crate::heap::HeapLow;
use crate::vm::{new_generation_id, with_mem, Vcpu, VcpuCtx, Vm, VmState, VmTable};

/// INTID of the `microsoft,vmgenid` interrupt (an SPI), raised in a child after its fork.
pub const VMGENID_INTID: u32 = layout::spi_intid(layout::VMGENID_SPI);

/// Everything a fork needs to be put back to its fork point.
pub struct ForkSnapshot {
    /// The stage-2 tables as they were at the fork (shared with the parent and siblings).
    pub point: ForkPoint,
    /// vCPU states and contexts at the fork (the forking vCPU's X0 already holds 0).
    pub vcpus: Vec<Vcpu>,
    /// The interrupt controller at the fork (shared with the child until it changes).
    pub vgic: Shared<Vgic>,
    /// The UART at the fork.
    pub uart: Vuart,
}

impl ForkSnapshot {
    /// Drops the snapshot's references on the shared tables.
    pub fn release<M: vmfork_core::physmem::PhysMem, T: TlbOps>(
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
    },
    /// Put the VM back to its fork point.
    Reset,
}

/// The operations waiting on one VM (`vmfork_core::opqueue`: bounded, each answered once).
pub type OpQueue = vmfork_core::opqueue::OpQueue<PendingOp>;

/// Per-VM counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmStats {
    /// Children forked from this VM.
    pub forks: u64,
    /// Counter ticks the last fork took, from the request being run to the children existing.
    pub last_fork_ticks: u64,
    /// Resets to the fork point.
    pub resets: u64,
    /// Counter ticks the last reset took.
    pub last_reset_ticks: u64,
    /// The root of this VM's fork tree (the VM created or restored that it descends from), or
    /// `None` when this VM is a root. Kept when the VMs between them are gone.
    pub tree_root: Option<u32>,
}

/// Why a fork or reset failed. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForkError {
    /// No VM with that id.
    NoSuchVm(u32),
    /// Not enough free frames, or the monitor's heap is low (its reserve counted).
    OutOfMemory,
    /// No VMID left.
    NoVmid,
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
            ForkError::NoVmid => write!(f, "no VMID left"),
            ForkError::NotAFork(id) => write!(f, "vm{id} is not a fork: it has no fork point"),
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

/// The limits in force, from the command line ([`set_limits`]).
static LIMITS: Mutex<Limits> = Mutex::new(Limits::DEFAULT);

/// Sets the limits (once, at boot, from the command line).
pub fn set_limits(l: Limits) {
    *LIMITS.lock() = l;
}

/// The limits in force.
pub fn limits() -> Limits {
    *LIMITS.lock()
}

/// The root of `vm`'s fork tree.
pub fn tree_root(vm: &Vm) -> u32 {
    vm.stats.tree_root.unwrap_or(vm.id)
}

/// Refuses a new VM when `max_vms` VMs are alive.
pub fn check_vm_limit(t: &VmTable, adding: u32) -> Result<(), ForkError> {
    let limit = limits().max_vms;
    let alive = u32::try_from(t.vms.len()).unwrap_or(u32::MAX);
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

/// Heap bytes one fork of `parent` takes: the child (its share of a map node too), its vCPU
/// contexts and those of its fork point, its name and command line, its UARTs, and slack for
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
        + 2 * (size_of::<vmfork_core::vuart::Vuart>() + 128)
        + 512
}

/// Results of operations requested through the monitor's API, by ticket.
static RESULTS: Mutex<BTreeMap<u64, Result<Vec<u32>, ForkError>>> = Mutex::new(BTreeMap::new());
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// Asks for `op` on VM `id` for the monitor's API. It runs at once if none of the VM's vCPUs is
/// on a CPU, else when the last one comes back, after the operations already waiting. Returns
/// the ticket to collect the result with [`take_result`] (exactly one result is filed under it,
/// whatever happens to the VM), and the CPUs to kick. Refused with `Busy` when
/// [`vmfork_core::opqueue::MAX_WAITING`] operations already wait on the VM.
pub fn request(t: &mut VmTable, id: u32, op: PendingOp) -> Result<(u64, Vec<usize>), ForkError> {
    let vm = t.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
    if matches!(vm.state, VmState::Stopping(_)) {
        return Err(ForkError::Stopping(id));
    }
    let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
    vm.pending
        .push_ticket(ticket, op)
        .map_err(|Busy| ForkError::Busy(id))?;
    let kicks = vm.running_cpus();
    if kicks.is_empty() {
        run_pending(t, id);
    }
    Ok((ticket, kicks))
}

/// Queues guest vCPU `vcpu`'s `VMFORK_FORK`/`VMFORK_RESET` on its VM, adding the CPUs to kick.
/// `Ok`: the vCPU leaves its CPU and its X0 is written when the operation runs (or the VM goes).
/// `Err(x0)`: refused, answer `x0` now: another fork or reset already waits (`VMFORK_BUSY`;
/// see `vmfork_core::opqueue` for why it is not queued behind), or the VM is going.
pub fn guest_request(
    vm: &mut Vm,
    vcpu: usize,
    op: PendingOp,
    kicks: &mut Vec<usize>,
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

/// The result of the operation with `ticket`, once it has run.
pub fn take_result(ticket: u64) -> Option<Result<Vec<u32>, ForkError>> {
    RESULTS.lock().remove(&ticket)
}

fn guest_error(e: &ForkError) -> GuestError {
    match e {
        ForkError::OutOfMemory => GuestError::OutOfMemory,
        ForkError::Busy(_) => GuestError::Busy,
        _ => GuestError::Denied,
    }
}

/// Answers `waiter` with `result`: files it under the ticket, or writes a failure into the
/// calling vCPU's X0 (a fork's success is written by [`fork_now`] itself, into parent and
/// child; a reset's replaces the whole vCPU).
fn answer(vm: Option<&mut Vm>, waiter: Waiter, result: Result<Vec<u32>, ForkError>) {
    match waiter {
        Waiter::Ticket(ticket) => {
            RESULTS.lock().insert(ticket, result);
        }
        Waiter::Vcpu(c) => {
            if let (Err(e), Some(vm)) = (&result, vm) {
                if let Some(ctx) = vm.vcpus.get_mut(c).and_then(|v| v.ctx.as_mut()) {
                    ctx.regs.x[0] = guest_x0(Err(guest_error(e)));
                }
            }
        }
    }
}

/// Fails every operation waiting on `vm` (it is being torn down): each waiter is answered now.
pub fn fail_pending(vm: &mut Vm) {
    let id = vm.id;
    for w in vm.pending.drain() {
        crate::vm_log!(
            Info,
            id,
            "vm{id}: {:?} not run: the VM is being torn down",
            w.op
        );
        answer(Some(vm), w.waiter, Err(ForkError::Stopping(id)));
    }
}

/// Runs every operation waiting on VM `id`, oldest first, and answers each. None of its vCPUs
/// may be on a CPU.
pub fn run_pending(t: &mut VmTable, id: u32) {
    let mut ran = false;
    while let Some(w) = t.vms.get_mut(&id).and_then(|vm| vm.pending.pop()) {
        ran = true;
        let caller = match w.waiter {
            Waiter::Vcpu(c) => Some(c),
            Waiter::Ticket(_) => None,
        };
        let result = match w.op {
            PendingOp::Fork { count, paused } => fork_now(t, id, count, paused, caller),
            PendingOp::Reset => reset_now(t, id).map(|()| Vec::new()),
        };
        if let Err(e) = &result {
            crate::vm_log!(Warn, id, "vm{id}: {:?} failed: {e}", w.op);
        }
        answer(t.vms.get_mut(&id), w.waiter, result);
    }
    if ran {
        crate::sched::kick_idle();
    }
}

/// Frees a child that was being built when a later step failed.
fn discard(t: &mut VmTable, s2: Stage2, fp: ForkPoint) {
    let vmid = s2.vmid();
    let result = with_mem(|cx| {
        fp.release(cx)?;
        s2.destroy(cx)
    });
    match result {
        Ok(()) => t.vmids.free(vmid),
        Err(e) => log::error!("discarding a half-built fork failed: {e}"),
    }
}

/// Forks VM `id` `count` times, now. All or nothing. Refused, with nothing changed, when a
/// limit would be passed ([`limits`]) or the heap cannot take `count` forks with its reserve
/// left ([`fork_heap_cost`], [`crate::heap::check`]); the big pieces are allocated fallibly too.
pub(crate) fn fork_now(
    t: &mut VmTable,
    id: u32,
    count: u32,
    paused: bool,
    caller: Option<usize>,
) -> Result<Vec<u32>, ForkError> {
    let t0 = crate::arch::counter().0;
    let count = count.max(1);
    let parent = t.vms.get(&id).ok_or(ForkError::NoSuchVm(id))?;
    // The limits first: they are cheap, and say more than the heap running out.
    check_vm_limit(t, count)?;
    let root = tree_root(parent);
    let limit = limits().max_forks_per_tree;
    // Kept by the table as forks come and go: a walk of every VM here made forking N children
    // O(N^2) (the bench's scale phase, 65,534 forks, no longer finished).
    let in_tree = t.tree_forks(root);
    if in_tree.saturating_add(count) > limit {
        return Err(ForkError::Limit {
            key: "max_forks_per_tree",
            limit,
            alive: in_tree,
            asked: count,
        });
    }
    // Children that run copy the vGIC they share on their first interrupt, and a running
    // parent needs its own copy again (the children's fork points keep the one it had), made
    // below: counted too, so that a fork bomb is refused its fork rather than paused for want
    // of a vGIC copy.
    let vgic = parent.vgic.copy_bytes() + 64;
    let per_child = fork_heap_cost(parent) + if paused { 0 } else { vgic };
    let cost = per_child
        .saturating_mul(count as usize)
        .saturating_add(vgic);
    if let Err(e) = crate::heap::check(cost) {
        crate::vm_log!(Warn, id, "vm{id}: fork of {count} refused: {e}");
        return Err(e.into());
    }
    // A running parent gets its own vGIC copy now (fallibly), rather than lazily on its next
    // entry, where want of heap could only pause it.
    let parent_vgic = if matches!(parent.state, VmState::Running) {
        match parent.vgic.try_clone_value() {
            Ok(g) => Some(Shared::new(g)),
            Err(_) => return Err(ForkError::OutOfMemory),
        }
    } else {
        None
    };
    let mut built: Vec<Vm> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    if built.try_reserve_exact(count as usize).is_err()
        || ids.try_reserve_exact(count as usize).is_err()
    {
        return Err(ForkError::OutOfMemory);
    }
    for _ in 0..count {
        match fork_one(t, id, root, paused, caller) {
            Ok(child) => built.push(child),
            Err(e) => {
                for mut child in built {
                    if let (Some(s2), Some(snap)) = (child.s2.take(), child.fork_point.take()) {
                        discard(t, s2, snap.point);
                    }
                }
                return Err(e);
            }
        }
    }
    let ticks = crate::arch::counter().0.wrapping_sub(t0);
    ids.extend(built.iter().map(|c| c.id));
    for child in built {
        t.insert_fork(child);
    }
    let parent = t.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
    if let Some(g) = parent_vgic {
        parent.vgic = g;
    }
    parent.stats.forks += ids.len() as u64;
    parent.stats.last_fork_ticks = ticks;
    if let Some(ctx) = caller.and_then(|c| parent.vcpus.get_mut(c)?.ctx.as_mut()) {
        ctx.regs.x[0] = u64::from(ids[0]);
    }
    // Children get consecutive ids: name the first and the last (no list to allocate).
    let (first, last) = (ids[0], ids[ids.len() - 1]);
    let us = crate::arch::timer::micros_from_ticks(ticks);
    if first == last {
        crate::vm_log!(
            Info,
            id,
            "vm{id}: forked vm{first} in {ticks} counter ticks ({us} us)"
        );
    } else {
        crate::vm_log!(
            Info,
            id,
            "vm{id}: forked {} children vm{first}..vm{last} in {ticks} counter ticks ({us} us)",
            ids.len()
        );
    }
    Ok(ids)
}

/// A copy of `vcpus` whose allocations fail instead of aborting.
fn try_clone_vcpus(vcpus: &[Vcpu]) -> Result<Vec<Vcpu>, HeapLow> {
    let mut out = Vec::new();
    out.try_reserve_exact(vcpus.len()).map_err(|_| HeapLow {
        wanted: core::mem::size_of_val(vcpus),
        free: crate::heap::usage().1,
    })?;
    for v in vcpus {
        let ctx = match &v.ctx {
            Some(c) => Some(crate::heap::try_box(VcpuCtx::clone(c))?),
            None => None,
        };
        out.push(Vcpu {
            ctx,
            state: v.state,
            mpidr: v.mpidr,
        });
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
        free: crate::heap::usage().1,
    })?;
    out.push_str(s);
    // At most a few digits: fits in what was reserved.
    let _ = out.write_fmt(suffix);
    Ok(out)
}

fn fork_one(
    t: &mut VmTable,
    id: u32,
    root: u32,
    paused: bool,
    caller: Option<usize>,
) -> Result<Vm, ForkError> {
    let child_id = t.next_id;
    let parent = t.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
    if matches!(parent.state, VmState::Stopping(_)) {
        return Err(ForkError::Stopping(id));
    }
    // What the parent printed so far is the parent's; the child starts with an empty line.
    parent.drain_console();
    // The heap first (fallibly), then a VMID and the tables: nothing to undo if the heap fails.
    let parent = t.vms.get(&id).ok_or(ForkError::NoSuchVm(id))?;
    let mut vcpus = try_clone_vcpus(&parent.vcpus)?;
    if let Some(ctx) = caller.and_then(|c| vcpus.get_mut(c)?.ctx.as_mut()) {
        ctx.regs.x[0] = 0; // the fork hypercall returns 0 in the child
    }
    let snapshot_vcpus = try_clone_vcpus(&vcpus)?;
    let name = try_string(&parent.name, format_args!(".{child_id}"))?;
    let cmdline = try_string(&parent.cmdline, format_args!(""))?;
    let vmid = t.vmids.alloc().ok_or(ForkError::NoVmid)?;
    let parent = t.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
    let Some(s2) = parent.s2.as_mut() else {
        t.vmids.free(vmid);
        return Err(ForkError::Stopping(id));
    };
    let (child_s2, point) = match with_mem(|cx| s2.fork(cx, vmid)) {
        Ok(r) => r,
        Err(e) => {
            t.vmids.free(vmid);
            return Err(stage2_error(e));
        }
    };
    // The child's own vmgenid ID is written, and its interrupt raised, when the child first
    // needs them (`Vm::apply_new_identity`), not here: that keeps the fork constant and small.
    let genid = new_generation_id(child_id);
    let parent = t.vms.get(&id).ok_or(ForkError::NoSuchVm(id))?;
    let vgic = parent.vgic.clone();
    let snapshot = ForkSnapshot {
        point,
        vcpus: snapshot_vcpus,
        vgic: vgic.clone(),
        uart: parent.uart.clone(),
    };
    let child = Vm {
        id: child_id,
        name,
        state: if paused {
            VmState::Paused(String::from("forked paused"))
        } else {
            VmState::Running
        },
        s2: Some(child_s2),
        vcpus,
        vgic,
        uart: parent.uart.clone(),
        cntvoff: parent.cntvoff,
        ram_size: parent.ram_size,
        cmdline,
        line: Vec::new(),
        parent: Some(id),
        generation: parent.generation + 1,
        genid,
        new_identity: crate::vm::NewIdentity::Pending,
        fork_point: Some(snapshot),
        pending: Default::default(),
        stats: VmStats {
            tree_root: Some(root),
            ..VmStats::default()
        },
        console_attached: false,
        console_tap: Vec::new(),
        rx_pending: Default::default(),
    };
    t.next_id += 1;
    Ok(child)
}

/// Puts fork `id` back to its fork point: memory (dropping only the pages it made private),
/// vCPUs and devices. Virtual time is not rewound: CNTVOFF stays, so the guest's clock goes on.
pub(crate) fn reset_now(t: &mut VmTable, id: u32) -> Result<(), ForkError> {
    let t0 = crate::arch::counter().0;
    let vm = t.vms.get_mut(&id).ok_or(ForkError::NoSuchVm(id))?;
    if matches!(vm.state, VmState::Stopping(_)) {
        return Err(ForkError::Stopping(id));
    }
    let snap = vm.fork_point.as_ref().ok_or(ForkError::NotAFork(id))?;
    // The vCPU copies first, fallibly: a reset that fails changes nothing.
    let vcpus = try_clone_vcpus(&snap.vcpus)?;
    let s2 = vm.s2.as_mut().ok_or(ForkError::Stopping(id))?;
    with_mem(|cx| s2.reset(cx, &snap.point)).map_err(stage2_error)?;
    // The fork point's ID page holds what the parent's held: a reset is a new generation for
    // the guest (its RNG state was rolled back with its memory), so it gets a new ID, written
    // (then its interrupt raised) before any of its vCPUs runs again (Vm::apply_new_identity).
    vm.genid = new_generation_id(id);
    vm.new_identity = crate::vm::NewIdentity::Pending;
    vm.vcpus = vcpus;
    vm.vgic = snap.vgic.clone();
    vm.uart = snap.uart.clone();
    vm.line.clear();
    if matches!(vm.state, VmState::Paused(_)) {
        vm.state = VmState::Running;
    }
    let ticks = crate::arch::counter().0.wrapping_sub(t0);
    vm.stats.resets += 1;
    vm.stats.last_reset_ticks = ticks;
    crate::vm_log!(
        Info,
        id,
        "vm{id}: reset to its fork point in {ticks} counter ticks ({} us)",
        crate::arch::timer::micros_from_ticks(ticks)
    );
    Ok(())
}
