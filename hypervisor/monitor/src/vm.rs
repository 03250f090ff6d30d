//! Virtual machines: their vCPUs, stage-2 tables and emulated devices, and what happens when a
//! guest exits to the monitor.
//!
//! All VMs live in one table behind one lock ([`VMS`]). A physical CPU takes a runnable vCPU's
//! context out of the table, runs it without the lock, and takes the lock again to handle each
//! exit. Every piece of a VM's state is plain data (`Clone`), so a VM can be copied whole.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use spin::Mutex;
use vmfork_core::addr::{Ipa, PAGE_SIZE};
use vmfork_core::esr::{Esr, ExceptionClass};
use vmfork_core::guest_dtb::{self, layout, GuestDtbConfig};
use vmfork_core::loader;
use vmfork_core::mmio::{MmioAccess, MmioResult};
use vmfork_core::psci::{self, PsciCall, PsciReturn};
use vmfork_core::shared::Shared;
use vmfork_core::stage2::{FaultOutcome, MemCtx, Perms, Stage2, Stage2Error, Vmid};
use vmfork_core::vgic::{CpuIfState, SgiRegister, Vgic, VgicConfig};
use vmfork_core::vuart::Vuart;

use crate::arch::cache::HwTlb;
use crate::arch::sysregs::{El1Sysregs, PauthKeys};
use crate::arch::vcpu::GuestRegs;
use crate::physmem::IdentityMem;

/// PSTATE of a vCPU that starts: EL1h (EL1 with SP_EL1), D, A, I and F masked.
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;
/// Most typed bytes kept for a guest whose UART FIFO is full.
pub const RX_PENDING_LIMIT: usize = 64 * 1024;
/// Virtual timer PPI as the guest sees it (INTID 27).
pub const VTIMER_INTID: u32 = 27;
/// CNTV_CTL_EL0 bits.
const CNTV_ENABLE: u64 = 1 << 0;
const CNTV_IMASK: u64 = 1 << 1;

/// A running vCPU's complete register state.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct VcpuCtx {
    /// General-purpose, PC/PSTATE and FP/SIMD registers.
    pub regs: GuestRegs,
    /// EL1/EL0 system registers.
    pub sys: El1Sysregs,
    /// Pointer-authentication keys.
    pub pauth: PauthKeys,
    /// GIC virtual CPU interface (list registers are filled from the vGIC at each entry).
    pub cpuif: CpuIfState,
}

/// Whether a VM's `microsoft,vmgenid` page and interrupt show its current generation ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewIdentity {
    /// Nothing to do.
    Done,
    /// The ID page does not hold [`Vm::genid`] yet (a fork or a reset: it still holds what the
    /// fork point's page held) and the interrupt has not been raised. Before any vCPU of the VM
    /// runs again ([`Vm::apply_new_identity`]) the page is written first and the interrupt
    /// raised after, so the guest can never read the old ID, and a guest that takes the
    /// interrupt always reads the new one. A fork that never runs (a paused snapshot fork)
    /// never pays for it.
    Pending,
}

/// Scheduling state of one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VcpuState {
    /// Powered off (not started by PSCI CPU_ON yet, or CPU_OFF).
    Off,
    /// Ready to run.
    Runnable,
    /// Running on the physical CPU with this index; its context is out of the table.
    Running(usize),
    /// In WFI: waits for an interrupt or its virtual timer.
    Waiting,
}

/// One virtual CPU.
#[derive(Clone, Debug)]
pub struct Vcpu {
    /// Context while not running (`None` while a physical CPU holds it).
    pub ctx: Option<Box<VcpuCtx>>,
    /// Scheduling state.
    pub state: VcpuState,
    /// MPIDR affinity the guest sees (VMPIDR_EL2 without the RES1 bit).
    pub mpidr: u64,
}

/// Why a VM does not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Its vCPUs are scheduled.
    Running,
    /// Stopped on purpose or by the monitor, with the reason; its memory and state are kept.
    Paused(String),
    /// Being torn down (the reason); gone once no physical CPU runs one of its vCPUs.
    Stopping(String),
}

/// A virtual machine.
pub struct Vm {
    /// The VM's id (vmN), never reused while the monitor runs.
    pub id: u32,
    /// Name from its configuration.
    pub name: String,
    /// Scheduling state of the whole VM.
    pub state: VmState,
    /// Stage-2 translation tables (None only during teardown).
    pub s2: Option<Stage2>,
    /// Its vCPUs.
    pub vcpus: Vec<Vcpu>,
    /// Emulated GICv3 distributor and redistributors (shared with the fork point until changed).
    pub vgic: Shared<Vgic>,
    /// Emulated PL011.
    pub uart: Vuart,
    /// CNTVOFF_EL2: virtual time = physical count - cntvoff.
    pub cntvoff: u64,
    /// Guest RAM size in bytes (at [`layout::RAM_BASE`]).
    pub ram_size: u64,
    /// The kernel command line it booted with.
    pub cmdline: String,
    /// Console output not yet ended by a newline.
    pub line: Vec<u8>,
    /// The VM this one was forked from.
    pub parent: Option<u32>,
    /// Fork generation: 0 for a VM created from an image, the parent's + 1 for a fork.
    pub generation: u64,
    /// The 16 bytes of its `microsoft,vmgenid` page.
    pub genid: [u8; 16],
    /// Whether the VM still has to get its vmgenid ID written and its interrupt raised.
    pub new_identity: NewIdentity,
    /// Where `reset` puts the VM back to (forks only).
    pub fork_point: Option<crate::fork::ForkSnapshot>,
    /// Operations that need every vCPU of this VM off the CPUs (fork, reset), with who waits
    /// for each; while one waits no vCPU of the VM is scheduled. Each is answered exactly once:
    /// run when the last vCPU leaves ([`crate::fork::run_pending`]), or failed when the VM
    /// goes ([`VmTable::stop`], [`VmTable::destroy`]).
    pub pending: crate::fork::OpQueue,
    /// Counters for `vmfork stats`.
    pub stats: crate::fork::VmStats,
    /// A control-channel client streams this VM's console.
    pub console_attached: bool,
    /// Console output not yet sent to the attached client.
    pub console_tap: Vec<u8>,
    /// Typed input the guest's UART receive FIFO has no room for yet (fed as it drains).
    pub rx_pending: alloc::collections::VecDeque<u8>,
}

/// Everything the monitor knows about its VMs.
pub struct VmTable {
    /// VMs by id.
    pub vms: BTreeMap<u32, Vm>,
    /// Id the next VM gets.
    pub next_id: u32,
    /// VMIDs in use.
    pub vmids: VmidAllocator,
    /// VM whose console receives what is typed on the monitor's console.
    pub focus: Option<u32>,
    /// Round-robin cursor: (vm id, vcpu index) last picked.
    cursor: (u32, usize),
    /// Forks alive per fork tree (by the tree's root VM id), kept as forks are added and
    /// destroyed so that `max_forks_per_tree=` is checked without walking every VM.
    tree_forks: BTreeMap<u32, u32>,
}

/// The one lock over all VMs.
pub static VMS: Mutex<VmTable> = Mutex::new(VmTable {
    vms: BTreeMap::new(),
    next_id: 1,
    vmids: VmidAllocator::new(),
    focus: None,
    cursor: (0, 0),
    tree_forks: BTreeMap::new(),
});

/// Hands out VMIDs. A VMID is flushed from every TLB when its VM is destroyed (`destroy` does a
/// `flush_vmid`), so it can be given to the next VM at once: that is the whole rollover scheme,
/// and with 16-bit VMIDs (65,535 usable) there is no generation counter to wrap.
pub struct VmidAllocator {
    used: BTreeSet<u16>,
    next: u16,
    limit: u16,
}

impl VmidAllocator {
    const fn new() -> Self {
        Self {
            used: BTreeSet::new(),
            next: 1,
            limit: 255,
        }
    }

    /// Sets how many VMIDs the CPU has (8 or 16 bits).
    pub fn set_bits(&mut self, bits: u32) {
        self.limit = if bits >= 16 { u16::MAX } else { 255 };
    }

    /// A free VMID, now marked used.
    pub fn alloc(&mut self) -> Option<Vmid> {
        for _ in 0..self.limit {
            let v = self.next;
            self.next = if self.next >= self.limit {
                1
            } else {
                self.next + 1
            };
            if self.used.insert(v) {
                return Some(Vmid(v));
            }
        }
        None
    }

    /// Gives back a VMID whose TLB entries have been flushed.
    pub fn free(&mut self, v: Vmid) {
        self.used.remove(&v.0);
    }
}

/// Runs `f` with the frame allocator, physical memory and TLB maintenance the stage-2 code needs.
/// Lock order: [`VMS`] first, then the frame allocator.
pub fn with_mem<R>(f: impl FnOnce(&mut MemCtx<'_, IdentityMem, HwTlb>) -> R) -> R {
    let mut frames = crate::mem::FRAMES.lock();
    let frames = frames
        .as_mut()
        .expect("the frame allocator is set up before any VM exists");
    let mut mem = IdentityMem;
    let mut tlb = HwTlb;
    let mut cx = MemCtx {
        frames,
        mem: &mut mem,
        tlb: &mut tlb,
    };
    f(&mut cx)
}

/// Stage-2 tables for a new VM with VMID `vmid`: `mem` bytes of zeroed RAM at
/// [`layout::RAM_BASE`], the read-only `microsoft,vmgenid` page (outside RAM, because Linux claims
/// its region as a device resource) holding `genid`, and whatever `fill` writes. All or nothing:
/// on an error every frame is given back.
pub fn guest_memory(
    vmid: Vmid,
    mem: u64,
    genid: &[u8; 16],
    fill: impl FnOnce(&mut Stage2, &mut MemCtx<'_, IdentityMem, HwTlb>) -> Result<(), Stage2Error>,
) -> Result<Stage2, Stage2Error> {
    with_mem(|cx| {
        let mut s2 = Stage2::new(cx, vmid)?;
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
    /// No VMID left.
    NoVmid,
    /// The stage-2 code failed (usually out of memory).
    Stage2(Stage2Error),
    /// The kernel image cannot be loaded.
    Load(loader::LoadError),
    /// The guest DTB cannot be built.
    Dtb(guest_dtb::DtbError),
    /// The vGIC refused the configuration.
    Config(String),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CreateError::NoVmid => write!(f, "no VMID left"),
            CreateError::Stage2(e) => write!(f, "{e}"),
            CreateError::Load(e) => write!(f, "cannot load the kernel: {e}"),
            CreateError::Dtb(e) => write!(f, "cannot build the guest device tree: {e}"),
            CreateError::Config(e) => write!(f, "{e}"),
        }
    }
}

/// A 16-byte generation ID for `microsoft,vmgenid`, different for every VM and every fork.
pub fn new_generation_id(vm: u32) -> [u8; 16] {
    let (now, _) = crate::arch::counter();
    let mut x = now ^ ((vm as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = [0u8; 16];
    for chunk in out.chunks_mut(8) {
        // splitmix64: a cheap, well-mixed sequence from the counter and the VM id.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    out
}

impl VmTable {
    /// Forks alive in the tree rooted at VM `root` (the root itself not counted).
    pub fn tree_forks(&self, root: u32) -> u32 {
        self.tree_forks.get(&root).copied().unwrap_or(0)
    }

    /// Puts a new fork into the table, counting it in its tree.
    pub fn insert_fork(&mut self, child: Vm) {
        if let Some(root) = child.stats.tree_root {
            *self.tree_forks.entry(root).or_insert(0) += 1;
        }
        self.vms.insert(child.id, child);
    }

    /// Tells the VMID allocator how wide VMIDs are on this CPU.
    pub fn set_vmid_bits(&mut self, bits: u32) {
        self.vmids.set_bits(bits);
    }

    /// Creates a VM from `spec`, loads its kernel, DTB and initrd, and makes vCPU 0 runnable.
    pub fn create(&mut self, spec: &GuestSpec) -> Result<u32, CreateError> {
        let vmid = self.vmids.alloc().ok_or(CreateError::NoVmid)?;
        match self.build(spec, vmid) {
            Ok(vm) => {
                let id = vm.id;
                self.vms.insert(id, vm);
                if self.focus.is_none() {
                    self.focus = Some(id);
                }
                Ok(id)
            }
            Err(e) => {
                self.vmids.free(vmid);
                Err(e)
            }
        }
    }

    fn build(&mut self, spec: &GuestSpec, vmid: Vmid) -> Result<Vm, CreateError> {
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
        let genid = new_generation_id(id);
        let vgic = Vgic::new(&VgicConfig::qemu_virt(cpus as usize))
            .map_err(|e| CreateError::Config(format!("vgic: {e:?}")))?;

        let s2 = guest_memory(vmid, spec.mem, &genid, |s2, cx| {
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
            let mut ctx = Box::new(VcpuCtx {
                sys: El1Sysregs::reset(),
                ..VcpuCtx::default()
            });
            let state = if i == 0 {
                ctx.regs.pc = plan.entry;
                ctx.regs.x[..4].copy_from_slice(&plan.boot_registers());
                ctx.regs.pstate = PSTATE_EL1H_MASKED;
                VcpuState::Runnable
            } else {
                VcpuState::Off
            };
            vcpus.push(Vcpu {
                ctx: Some(ctx),
                state,
                mpidr: layout::vcpu_mpidr_affinity(i),
            });
        }
        self.next_id += 1;
        let (now, _) = crate::arch::counter();
        log::info!(
            "vm{id}: created '{}' with {} MiB, {cpus} vCPU(s), entry {:#x}, VMID {}",
            spec.name,
            spec.mem >> 20,
            plan.entry,
            vmid.0
        );
        Ok(Vm {
            id,
            name: spec.name.clone(),
            state: VmState::Running,
            s2: Some(s2),
            vcpus,
            vgic: Shared::new(vgic),
            uart: Vuart::new(),
            // The guest's virtual count starts near zero, like on a fresh machine.
            cntvoff: now,
            ram_size: spec.mem,
            cmdline: spec.cmdline.clone(),
            line: Vec::new(),
            parent: None,
            generation: 0,
            genid,
            new_identity: NewIdentity::Done,
            fork_point: None,
            pending: Default::default(),
            stats: Default::default(),
            console_attached: false,
            console_tap: Vec::new(),
            rx_pending: Default::default(),
        })
    }

    /// Picks a vCPU for physical CPU `cpu` to run: wakes waiting vCPUs whose interrupt or timer
    /// is due, then takes the next runnable one after the round-robin cursor. Returns the VM id,
    /// vCPU index and its context, now marked as running on `cpu`.
    pub fn pick(&mut self, cpu: usize) -> Option<(u32, usize, Box<VcpuCtx>)> {
        let now = crate::arch::counter().0;
        for vm in self.vms.values_mut() {
            if !vm.schedulable() {
                continue;
            }
            for i in 0..vm.vcpus.len() {
                if vm.vcpus[i].state == VcpuState::Waiting {
                    vm.wake_if_due(i, now);
                }
            }
        }
        let keys: Vec<(u32, usize)> = self
            .vms
            .iter()
            .filter(|(_, vm)| vm.schedulable())
            .flat_map(|(&id, vm)| (0..vm.vcpus.len()).map(move |i| (id, i)))
            .collect();
        if keys.is_empty() {
            return None;
        }
        let start = keys.iter().position(|&k| k > self.cursor).unwrap_or(0);
        for n in 0..keys.len() {
            let (id, i) = keys[(start + n) % keys.len()];
            let vm = self.vms.get_mut(&id)?;
            if vm.vcpus[i].state == VcpuState::Runnable {
                if let Some(ctx) = vm.vcpus[i].ctx.take() {
                    vm.vcpus[i].state = VcpuState::Running(cpu);
                    self.cursor = (id, i);
                    return Some((id, i, ctx));
                }
            }
        }
        None
    }

    /// Earliest physical-counter time at which a waiting vCPU's virtual timer fires.
    pub fn next_timer_deadline(&self) -> Option<u64> {
        let now = crate::arch::counter().0;
        self.vms
            .values()
            .filter(|vm| vm.schedulable())
            .flat_map(|vm| {
                vm.vcpus.iter().filter_map(move |v| {
                    let ctx = v.ctx.as_ref()?;
                    (v.state == VcpuState::Waiting).then(|| vm.timer_deadline(ctx, now))?
                })
            })
            .min()
    }

    /// Hands a vCPU's context back after it ran, with its new state. Tears the VM down if it is
    /// stopping and this was the last of its vCPUs on a CPU.
    pub fn put_back(&mut self, id: u32, vcpu: usize, ctx: Box<VcpuCtx>, state: VcpuState) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        vm.vcpus[vcpu].ctx = Some(ctx);
        vm.vcpus[vcpu].state = state;
        if vm.any_running() {
            return;
        }
        if matches!(vm.state, VmState::Stopping(_)) {
            self.destroy(id);
        } else if !vm.pending.is_empty() {
            crate::fork::run_pending(self, id);
        }
    }

    /// Stops VM `id` for `reason`: it is torn down now if none of its vCPUs is on a CPU, else
    /// when the last one comes back. Returns the physical CPUs to kick.
    pub fn stop(&mut self, id: u32, reason: String) -> Vec<usize> {
        let Some(vm) = self.vms.get_mut(&id) else {
            return Vec::new();
        };
        log::info!("vm{id}: stopping: {reason}");
        vm.state = VmState::Stopping(reason);
        // Whoever waits for a fork or reset of it is told now, not when its last vCPU leaves
        // (which may be never).
        crate::fork::fail_pending(vm);
        let cpus = vm.running_cpus();
        if cpus.is_empty() {
            self.destroy(id);
        }
        cpus
    }

    /// Removes VM `id` and frees everything it holds. None of its vCPUs may be on a CPU.
    pub fn destroy(&mut self, id: u32) {
        let Some(mut vm) = self.vms.remove(&id) else {
            return;
        };
        if let Some(root) = vm.stats.tree_root {
            if let Some(n) = self.tree_forks.get_mut(&root) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.tree_forks.remove(&root);
                }
            }
        }
        // A VM that stopped by itself (SYSTEM_OFF, a fatal exit) may still have waiters.
        crate::fork::fail_pending(&mut vm);
        vm.flush_console_line();
        if let Some(fp) = vm.fork_point.take() {
            if let Err(e) = with_mem(|cx| fp.release(cx)) {
                log::error!("vm{id}: releasing its fork point failed: {e}");
            }
        }
        if let Some(s2) = vm.s2.take() {
            let vmid = s2.vmid();
            match with_mem(|cx| s2.destroy(cx)) {
                Ok(()) => self.vmids.free(vmid),
                Err(e) => log::error!("vm{id}: teardown of its stage-2 tables failed: {e}"),
            }
        }
        if self.focus == Some(id) {
            self.focus = self.vms.keys().next().copied();
        }
        let (free, total) = crate::mem::frame_counts();
        let reason = match &vm.state {
            VmState::Stopping(r) => r.as_str(),
            _ => "stopped",
        };
        log::info!(
            "vm{id}: '{}' {reason}; destroyed, its {} MiB of RAM returned; frames free {free} of {total}",
            vm.name,
            vm.ram_size >> 20
        );
        crate::console::vm_log_forget(id);
    }

    /// True when some vCPU of a running VM is ready to run.
    pub fn has_runnable(&self) -> bool {
        self.vms
            .values()
            .any(|vm| vm.schedulable() && vm.vcpus.iter().any(|v| v.state == VcpuState::Runnable))
    }
}

impl Vm {
    /// True when its vCPUs may be put on a CPU: running, with no fork or reset waiting.
    pub fn schedulable(&self) -> bool {
        self.state == VmState::Running && self.pending.is_empty()
    }

    /// True when one of its vCPUs is on a CPU.
    pub fn any_running(&self) -> bool {
        self.vcpus
            .iter()
            .any(|v| matches!(v.state, VcpuState::Running(_)))
    }

    /// The CPUs its vCPUs run on.
    pub fn running_cpus(&self) -> Vec<usize> {
        self.vcpus
            .iter()
            .filter_map(|v| match v.state {
                VcpuState::Running(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// Physical-counter time at which the vCPU's virtual timer condition becomes true, if it is
    /// enabled and not masked (`now` if it already is). Virtual time is the physical count minus
    /// CNTVOFF modulo 2^64, as the hardware computes it (a restored VM's offset may wrap).
    pub fn timer_deadline(&self, ctx: &VcpuCtx, now: u64) -> Option<u64> {
        let ctl = ctx.sys.cntv_ctl_el0;
        if ctl & CNTV_ENABLE == 0 || ctl & CNTV_IMASK != 0 {
            return None;
        }
        let vnow = now.wrapping_sub(self.cntvoff);
        let cval = ctx.sys.cntv_cval_el0;
        Some(if cval <= vnow {
            now
        } else {
            now.saturating_add(cval - vnow)
        })
    }

    /// If the vCPU's virtual timer has fired (condition true, not masked), injects its PPI and
    /// masks the timer in the saved context so it does not fire again until the guest rearms it
    /// (the guest's handler writes CNTV_CTL_EL0 itself; ISTATUS is unaffected by IMASK).
    pub fn check_vtimer(&mut self, vcpu: usize, ctx: &mut VcpuCtx, now: u64) {
        if let Some(deadline) = self.timer_deadline(ctx, now) {
            if now >= deadline {
                let id = self.id;
                // Without a vGIC (the VM just paused: no heap for its copy) the timer stays
                // unmasked, so it fires again once the VM is resumed.
                let Some(vgic) = self.vgic_mut() else {
                    return;
                };
                ctx.sys.cntv_ctl_el0 |= CNTV_IMASK;
                if let Err(e) = vgic.inject_edge(VTIMER_INTID, vcpu) {
                    crate::vm_log!(Warn, id, "vm{id}: cannot inject the virtual timer: {e:?}");
                }
            }
        }
    }

    fn wake_if_due(&mut self, vcpu: usize, now: u64) {
        if let Some(mut ctx) = self.vcpus[vcpu].ctx.take() {
            self.check_vtimer(vcpu, &mut ctx, now);
            self.vcpus[vcpu].ctx = Some(ctx);
        }
        if self.vgic.has_pending(vcpu) {
            self.vcpus[vcpu].state = VcpuState::Runnable;
        }
    }

    /// Prints the guest's console output, one `[vmN] ` line at a time.
    pub fn drain_console(&mut self) {
        let out: Vec<u8> = self.uart.take_output().collect();
        // The backlog for an attached client is kept only while the heap has room above its
        // reserve; past that (or past the limit, oldest first) bytes are dropped, as a slow
        // terminal would lose them.
        let room = |tap: &mut Vec<u8>| {
            crate::heap::check(out.len()).is_ok() && tap.try_reserve(out.len()).is_ok()
        };
        if self.console_attached && room(&mut self.console_tap) {
            self.console_tap.extend_from_slice(&out);
            let limit = crate::control::server::CONSOLE_TAP_LIMIT;
            if self.console_tap.len() > limit {
                let excess = self.console_tap.len() - limit;
                self.console_tap.drain(..excess);
            }
        }
        for b in out {
            match b {
                b'\n' => self.flush_console_line(),
                b'\r' => {}
                _ => {
                    self.line.push(b);
                    if self.line.len() >= 1024 {
                        self.flush_console_line();
                    }
                }
            }
        }
    }

    fn flush_console_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        crate::println!("[vm{}] {}", self.id, text);
        self.line.clear();
    }

    /// Shows the guest its new vmgenid ID if it does not see it yet (after a fork, a reset or a
    /// restore): writes the ID page, then raises the interrupt, in that order, so a guest that
    /// takes the interrupt reads the new ID (Linux 6.10+ then reseeds its RNG). Called before
    /// every run of a vCPU. Out of memory for the page (it is copied on write like any other)
    /// pauses the VM with the reason, and false is returned: the vCPU must not run.
    pub fn apply_new_identity(&mut self) -> bool {
        match self.show_new_identity() {
            // Not done only when the VM just paused for want of heap for its vGIC.
            Ok(()) => self.new_identity == NewIdentity::Done,
            Err(Stage2Error::OutOfMemory) => {
                self.state =
                    VmState::Paused(String::from("out of memory writing its new vmgenid ID"));
                crate::vm_log!(
                    Warn,
                    self.id,
                    "vm{}: paused: no free frame for its vmgenid page",
                    self.id
                );
                false
            }
            Err(e) => {
                self.state =
                    VmState::Stopping(format!("stage-2 error writing its vmgenid ID: {e}"));
                false
            }
        }
    }

    fn show_new_identity(&mut self) -> Result<(), Stage2Error> {
        if self.new_identity == NewIdentity::Done {
            return Ok(());
        }
        let id = self.id;
        // The interrupt needs the VM's own vGIC: when a shared one cannot be copied the VM is
        // paused (`vgic_mut`) and nothing is written; this runs again before its next run.
        if self.vgic_mut().is_none() {
            return Ok(());
        }
        let s2 = self
            .s2
            .as_mut()
            .ok_or(Stage2Error::NotMapped(Ipa(layout::VMGENID_BASE)))?;
        let genid = self.genid;
        with_mem(|cx| s2.write_guest(cx, Ipa(layout::VMGENID_BASE), &genid))?;
        // Only now that the page holds the new ID.
        if let Some(vgic) = self.vgic_mut() {
            if let Err(e) = vgic.inject_edge(crate::fork::VMGENID_INTID, 0) {
                crate::vm_log!(
                    Warn,
                    id,
                    "vm{id}: cannot raise the vmgenid interrupt: {e:?}"
                );
            }
        }
        self.new_identity = NewIdentity::Done;
        Ok(())
    }

    /// Writes the VM's new vmgenid ID (and raises its interrupt) if it does not show it yet,
    /// before a stage-2 fault at `ipa` is handled in the low GiB (where the ID page is). A
    /// vCPU never runs before [`Vm::apply_new_identity`], so this is a second line of defence.
    /// Out of memory is returned as is.
    pub fn write_new_identity(&mut self, ipa: Ipa) -> Result<(), Stage2Error> {
        if self.new_identity == NewIdentity::Done || ipa.0 >= layout::RAM_BASE {
            return Ok(());
        }
        self.show_new_identity()
    }

    /// Queues typed bytes for the guest's UART (at most [`RX_PENDING_LIMIT`] wait; beyond that
    /// they are dropped, as a real line would overrun) and moves what fits into its FIFO.
    /// Returns the vCPU to kick when its interrupt line changed.
    pub fn type_input(&mut self, bytes: &[u8]) -> Option<usize> {
        let n = bytes
            .len()
            .min(RX_PENDING_LIMIT.saturating_sub(self.rx_pending.len()));
        // Fallibly, and only with the heap's reserve left: otherwise the bytes are dropped too.
        if crate::heap::check(n).is_ok() && self.rx_pending.try_reserve(n).is_ok() {
            self.rx_pending.extend(&bytes[..n]);
        }
        self.feed_uart()
    }

    /// Moves queued input into the UART's receive FIFO while it has room.
    pub fn feed_uart(&mut self) -> Option<usize> {
        while let Some(&b) = self.rx_pending.front() {
            if !self.uart.push_rx(b) {
                break;
            }
            self.rx_pending.pop_front();
        }
        self.uart_irq_changed()
    }

    /// Re-evaluates the UART's interrupt line after any UART activity. Returns the vCPU to kick.
    pub fn uart_irq_changed(&mut self) -> Option<usize> {
        let level = self.uart.irq_level();
        self.vgic_mut()?
            .set_irq_level(vmfork_core::vuart::PL011_INTID, 0, level)
            .ok()
            .flatten()
    }

    /// The vGIC, to change. A fork shares its vGIC with its fork point (and a parent with its
    /// children's fork points) until the first change, which copies it: that copy is made here,
    /// fallibly and only with the heap's reserve left ([`crate::heap::check`]). When it cannot
    /// be made the VM is paused with an "out of memory" reason and `None` is returned: nothing
    /// changed, and resuming the VM tries again.
    pub fn vgic_mut(&mut self) -> Option<&mut Vgic> {
        if self.vgic.is_shared() {
            let copied = crate::heap::check(self.vgic.copy_bytes())
                .map_err(|e| format!("{e}"))
                .and_then(|()| {
                    self.vgic
                        .try_make_mut()
                        .map(|_| ())
                        .map_err(|e| format!("{e}"))
                });
            if let Err(e) = copied {
                if !matches!(self.state, VmState::Stopping(_)) {
                    crate::vm_log!(
                        Warn,
                        self.id,
                        "vm{}: paused: no heap to copy its vGIC: {e}",
                        self.id
                    );
                    self.state = VmState::Paused(String::from("out of memory: vGIC copy"));
                }
                return None;
            }
        }
        // Not shared now: this never copies.
        self.vgic.try_make_mut().ok()
    }
}

/// What the physical CPU does after an exit was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run the same vCPU again.
    Resume,
    /// The vCPU waits for an interrupt (WFI).
    Wait,
    /// Give the CPU to another vCPU (WFE, PSCI CPU_OFF of itself handled separately).
    Yield,
    /// The vCPU is off (CPU_OFF).
    Off,
    /// The VM is stopping or paused: put the vCPU back.
    Leave,
}

/// The syndrome registers of a synchronous exit.
#[derive(Clone, Copy, Debug)]
pub struct Syndrome {
    /// ESR_EL2.
    pub esr: Esr,
    /// FAR_EL2.
    pub far: u64,
    /// HPFAR_EL2.
    pub hpfar: u64,
}

/// Handles a synchronous exit of vCPU `vcpu` of VM `id`. Returns what to do next and the
/// physical CPUs to kick (vCPUs that got an interrupt while running elsewhere).
pub fn handle_sync(
    t: &mut VmTable,
    id: u32,
    vcpu: usize,
    ctx: &mut VcpuCtx,
    syn: Syndrome,
) -> (Next, Vec<usize>) {
    let mut kicks = Vec::new();
    let Some(vm) = t.vms.get_mut(&id) else {
        return (Next::Leave, kicks);
    };
    let esr = syn.esr;
    let next = match esr.ec() {
        ExceptionClass::DataAbortLowerEl => data_abort(vm, vcpu, ctx, syn, &mut kicks),
        ExceptionClass::InstructionAbortLowerEl => instruction_abort(vm, ctx, syn),
        ExceptionClass::HvcA64 => hypercall(vm, vcpu, ctx, &mut kicks),
        ExceptionClass::SmcA64 => {
            // A trapped SMC returns to the SMC itself (ARM ARM D1.10.2): step over it.
            ctx.regs.pc += 4;
            hypercall(vm, vcpu, ctx, &mut kicks)
        }
        ExceptionClass::WfiWfe => {
            ctx.regs.pc += 4;
            let is_wfe = esr.iss() & 1 == 1;
            if is_wfe {
                Next::Yield
            } else if vm.vgic.has_pending(vcpu) {
                Next::Resume
            } else {
                Next::Wait
            }
        }
        ExceptionClass::MsrMrsTrap => sysreg(vm, vcpu, ctx, esr, &mut kicks),
        _ => {
            let reason = format!(
                "unhandled exception from the guest: {} (EC {:#04x}), ESR {:#x}, FAR {:#x}, HPFAR {:#x}, PC {:#x}",
                esr.ec().name(),
                esr.ec_raw(),
                esr.0,
                syn.far,
                syn.hpfar,
                ctx.regs.pc
            );
            dump_vcpu(id, vcpu, ctx);
            kicks.extend(t.stop(id, reason));
            return (Next::Leave, kicks);
        }
    };
    // A stop requested while handling (SYSTEM_OFF, a fatal access) wins.
    let next = match t.vms.get(&id) {
        Some(vm) if vm.schedulable() => next,
        _ => Next::Leave,
    };
    (next, kicks)
}

fn dump_vcpu(id: u32, vcpu: usize, ctx: &VcpuCtx) {
    let mut s = format!(
        "vm{id} vcpu{vcpu}: PC {:#018x} PSTATE {:#x} SP_EL1 {:#x} ELR_EL1 {:#x} ESR_EL1 {:#x} FAR_EL1 {:#x}\n",
        ctx.regs.pc,
        ctx.regs.pstate,
        ctx.sys.sp_el1,
        ctx.sys.elr_el1,
        ctx.sys.esr_el1,
        ctx.sys.far_el1
    );
    for (i, x) in ctx.regs.x.iter().enumerate() {
        s += &format!("  x{i:<2}={x:#018x}{}", if i % 4 == 3 { "\n" } else { "" });
    }
    crate::println!("{s}");
}

/// Injects a synchronous external abort into the guest as the hardware would for an access
/// that no device answers (ARM ARM D1.10: exception entry to EL1): ESR_EL1 describes a data or
/// instruction abort with DFSC/IFSC 0b010000, FAR_EL1 the faulting VA, and the vCPU continues
/// at its EL1 vector.
fn inject_abort(ctx: &mut VcpuCtx, far: u64, instruction: bool, write: bool) {
    let from_el0 = ctx.regs.pstate & 0xf == 0;
    let ec: u64 = match (instruction, from_el0) {
        (false, true) => 0x24,
        (false, false) => 0x25,
        (true, true) => 0x20,
        (true, false) => 0x21,
    };
    // IL (bit 25): 32-bit instruction; WnR (bit 6) for a store; DFSC/IFSC 0b010000.
    let wnr = if write && !instruction { 1 << 6 } else { 0 };
    let esr = (ec << 26) | (1 << 25) | wnr | 0x10;
    inject_exception(ctx, esr, Some(far));
}

/// Injects an UNDEFINED exception (EC 0) for an instruction the monitor does not emulate.
fn inject_undef(ctx: &mut VcpuCtx) {
    inject_exception(ctx, 1 << 25, None);
}

fn inject_exception(ctx: &mut VcpuCtx, esr: u64, far: Option<u64>) {
    let pstate = ctx.regs.pstate;
    let vector_offset = match pstate & 0xf {
        0b0000 => 0x400, // from EL0 (AArch64): lower EL, synchronous
        0b0100 => 0x000, // EL1t: current EL with SP_EL0
        _ => 0x200,      // EL1h: current EL with SP_ELx
    };
    ctx.sys.esr_el1 = esr;
    if let Some(far) = far {
        ctx.sys.far_el1 = far;
    }
    ctx.sys.elr_el1 = ctx.regs.pc;
    ctx.sys.spsr_el1 = pstate;
    ctx.regs.pc = ctx.sys.vbar_el1 + vector_offset;
    ctx.regs.pstate = PSTATE_EL1H_MASKED;
}

/// Writes a fork's pending vmgenid ID before a fault in the low GiB is handled; `Some` when the
/// vCPU cannot go on (out of memory pauses the VM, as for a copy-on-write fault).
fn new_identity_first(vm: &mut Vm, ipa: Ipa) -> Option<Next> {
    match vm.write_new_identity(ipa) {
        Ok(()) => None,
        Err(Stage2Error::OutOfMemory) => {
            vm.state = VmState::Paused(String::from(
                "out of memory writing its vmgenid ID after the fork",
            ));
            crate::vm_log!(
                Warn,
                vm.id,
                "vm{}: paused: no free frame for its vmgenid page",
                vm.id
            );
            Some(Next::Leave)
        }
        Err(e) => {
            vm.state = VmState::Stopping(format!("stage-2 error writing its vmgenid ID: {e}"));
            Some(Next::Leave)
        }
    }
}

fn instruction_abort(vm: &mut Vm, ctx: &mut VcpuCtx, syn: Syndrome) -> Next {
    let ipa = vmfork_core::esr::hpfar_to_ipa(syn.hpfar, syn.far);
    if let Some(next) = new_identity_first(vm, ipa) {
        return next;
    }
    // A fault on a stage-1 table walk counts as a write: with FEAT_HAFDBS (Linux sets
    // TCR_EL1.HA) the walk writes the Access flag into the descriptor, so a shared table page
    // must be copied, or the fetch faults again forever.
    let write = syn.esr.instruction_abort().is_some_and(|i| i.s1ptw);
    let Some(s2) = vm.s2.as_mut() else {
        return Next::Leave;
    };
    match with_mem(|cx| s2.handle_fault(cx, ipa, write)) {
        // A fetch from a page mapped without execute permission (the vmgenid page) faults
        // again however often it is retried: the guest gets an instruction abort instead. It
        // is a synchronous external abort (IFSC 0b010000), as for a fetch outside RAM and as
        // KVM injects for a fetch it cannot serve: the guest's own translation may be off, in
        // which case no stage-1 permission fault is architecturally possible, while an
        // external abort always is.
        Ok(FaultOutcome::Retry)
            if s2
                .translate(&IdentityMem, ipa)
                .is_some_and(|t| !t.perms.exec) =>
        {
            crate::vm_log!(
                Warn,
                vm.id,
                "vm{}: instruction fetch from non-executable IPA {ipa} (PC {:#x}): external abort injected",
                vm.id,
                ctx.regs.pc
            );
            inject_abort(ctx, syn.far, true, false);
            Next::Resume
        }
        Ok(FaultOutcome::Retry) => Next::Resume,
        Ok(FaultOutcome::OutOfMemory) => {
            vm.state = VmState::Paused(format!(
                "out of memory on an instruction fetch at IPA {ipa}"
            ));
            crate::vm_log!(Warn, vm.id, "vm{}: paused: out of memory", vm.id);
            Next::Leave
        }
        Ok(_) => {
            crate::vm_log!(
                Warn,
                vm.id,
                "vm{}: instruction fetch from IPA {ipa} (PC {:#x}) outside RAM: external abort injected",
                vm.id,
                ctx.regs.pc
            );
            inject_abort(ctx, syn.far, true, false);
            Next::Resume
        }
        Err(e) => {
            vm.state = VmState::Stopping(format!("stage-2 error at IPA {ipa}: {e}"));
            Next::Leave
        }
    }
}

fn data_abort(
    vm: &mut Vm,
    vcpu: usize,
    ctx: &mut VcpuCtx,
    syn: Syndrome,
    kicks: &mut Vec<usize>,
) -> Next {
    let ipa = vmfork_core::esr::hpfar_to_ipa(syn.hpfar, syn.far);
    if let Some(next) = new_identity_first(vm, ipa) {
        return next;
    }
    let iss = syn.esr.data_abort();
    // A fault on a stage-1 table walk counts as a write (the walk may update the Access flag
    // or dirty state of the descriptor: FEAT_HAFDBS), as for instruction fetches above.
    let write = iss.as_ref().is_some_and(|d| d.wnr || d.s1ptw);
    let Some(s2) = vm.s2.as_mut() else {
        return Next::Leave;
    };
    match with_mem(|cx| s2.handle_fault(cx, ipa, write)) {
        Ok(FaultOutcome::Retry) => return Next::Resume,
        Ok(FaultOutcome::OutOfMemory) => {
            vm.state = VmState::Paused(format!(
                "out of memory copying a page for a write to IPA {ipa}"
            ));
            crate::vm_log!(
                Warn,
                vm.id,
                "vm{}: paused: no free frame for a copy-on-write fault at {ipa}",
                vm.id
            );
            return Next::Leave;
        }
        Ok(FaultOutcome::NotMapped) | Ok(FaultOutcome::PermissionDenied) => {}
        Err(e) => {
            vm.state = VmState::Stopping(format!("stage-2 error at IPA {ipa}: {e}"));
            return Next::Leave;
        }
    }
    // A cache maintenance instruction by VA (DC CIVAC, CVAC, IVAC, ...; ESR CM = 1) on
    // something that is not writable RAM: on hardware it completes (Device memory, or nothing,
    // holds no cache lines), so it is stepped over, not answered with an abort, as KVM does
    // (the monitor cleans what it writes itself). DC ZVA is a store, with CM = 0. A stage-2
    // fault on an address translation's table walk (CM and S1PTW) goes on to the abort below.
    if iss.as_ref().is_some_and(|d| d.cm && !d.s1ptw) {
        ctx.regs.pc += 4;
        return Next::Resume;
    }
    // Not RAM: an emulated device, or nothing.
    let Some(access) = iss.and_then(|d| d.access()) else {
        crate::vm_log!(
            Warn,
            vm.id,
            "vm{}: access to IPA {ipa} without a valid syndrome (PC {:#x}): external abort injected",
            vm.id,
            ctx.regs.pc
        );
        inject_abort(ctx, syn.far, false, write);
        return Next::Resume;
    };
    let size = access.size;
    // A big-endian access (SCTLR_EL1.EE, or E0E from EL0) moves the register's bytes reversed:
    // the device sees, and the register receives, what the hardware would have transferred
    // (vmfork_core::mmio::data_is_big_endian says why the ID registers are left alone).
    let big_endian = vmfork_core::mmio::data_is_big_endian(ctx.regs.pstate, ctx.sys.sctlr_el1);
    let write_value = access.write.then(|| {
        let v = if access.register == 31 {
            0
        } else {
            ctx.regs.x[access.register as usize]
        };
        let v = if size >= 8 {
            v
        } else {
            v & ((1u64 << (size as u32 * 8)) - 1)
        };
        if big_endian {
            vmfork_core::mmio::swap_bytes(v, size)
        } else {
            v
        }
    });
    let a = ipa.0;
    let result = if (layout::GICD_BASE..layout::GICD_BASE + layout::GICD_SIZE).contains(&a) {
        match vm.vgic_mut() {
            // Paused: the access is made again when the VM is resumed.
            None => return Next::Leave,
            Some(vgic) => vgic.dist_access(
                vcpu,
                MmioAccess {
                    offset: a - layout::GICD_BASE,
                    size,
                    write: write_value,
                },
            ),
        }
    } else if (layout::GICR_BASE..layout::GICR_BASE + layout::gicr_size(vm.vcpus.len() as u32))
        .contains(&a)
    {
        match vm.vgic_mut() {
            // Paused: the access is made again when the VM is resumed.
            None => return Next::Leave,
            Some(vgic) => vgic.redist_access(
                vcpu,
                MmioAccess {
                    offset: a - layout::GICR_BASE,
                    size,
                    write: write_value,
                },
            ),
        }
    } else if (layout::UART_BASE..layout::UART_BASE + layout::UART_SIZE).contains(&a) {
        let r = vmfork_core::mmio::MmioDevice::access(
            &mut vm.uart,
            vcpu,
            MmioAccess {
                offset: a - layout::UART_BASE,
                size,
                write: write_value,
            },
        );
        vm.drain_console();
        // A read may have made room in the receive FIFO for queued input.
        if let Some(k) = vm.feed_uart() {
            vm.kick_vcpu(k, kicks);
        }
        r
    } else {
        MmioResult::Fault
    };
    match result {
        MmioResult::Read(v) => {
            let v = if big_endian {
                vmfork_core::mmio::swap_bytes(v, size)
            } else {
                v
            };
            let v = if access.sign_extend && size < 8 {
                let shift = 64 - size as u32 * 8;
                (((v << shift) as i64) >> shift) as u64
            } else {
                v
            };
            let v = if access.sixty_four {
                v
            } else {
                v & 0xffff_ffff
            };
            if access.register != 31 {
                ctx.regs.x[access.register as usize] = v;
            }
            ctx.regs.pc += 4;
            Next::Resume
        }
        MmioResult::Written => {
            ctx.regs.pc += 4;
            Next::Resume
        }
        MmioResult::Fault => {
            crate::vm_log!(
                Warn,
                vm.id,
                "vm{}: {} of {} bytes at IPA {ipa} (PC {:#x}) hits no RAM or device: external abort injected",
                vm.id,
                if access.write { "write" } else { "read" },
                size,
                ctx.regs.pc
            );
            inject_abort(ctx, syn.far, false, access.write);
            Next::Resume
        }
    }
}

impl Vm {
    /// Marks a vCPU that has a new interrupt: a waiting one becomes runnable (and an idle CPU is
    /// woken for it); one running on a CPU gets that CPU kicked so it reloads its list registers.
    pub fn kick_vcpu(&mut self, vcpu: usize, kicks: &mut Vec<usize>) {
        match self.vcpus.get(vcpu).map(|v| v.state) {
            Some(VcpuState::Waiting) => {
                self.vcpus[vcpu].state = VcpuState::Runnable;
                crate::sched::wake_idle(kicks);
            }
            Some(VcpuState::Running(c)) => kicks.push(c),
            _ => {}
        }
    }
}

fn hypercall(vm: &mut Vm, vcpu: usize, ctx: &mut VcpuCtx, kicks: &mut Vec<usize>) -> Next {
    let x = &ctx.regs.x;
    let call = psci::decode(x[0], x[1], x[2], x[3]);
    let mut next = Next::Resume;
    let ret: u64 = match call {
        PsciCall::Version => psci::PSCI_VERSION_1_1 as u64,
        PsciCall::SmcccVersion => psci::SMCCC_VERSION_1_1 as u64,
        PsciCall::Features { function_id } => psci::ret(psci::psci_features(function_id)),
        PsciCall::SmcccArchFeatures { function_id } => {
            psci::ret(psci::smccc_arch_features(function_id))
        }
        PsciCall::MigrateInfoType => psci::MIGRATE_INFO_TYPE_NOT_PRESENT as u64,
        PsciCall::CpuOn {
            target_cpu,
            entry_point,
            context_id,
        } => cpu_on(vm, target_cpu, entry_point, context_id, kicks),
        PsciCall::CpuOff => {
            next = Next::Off;
            0
        }
        PsciCall::CpuSuspend { .. } => {
            // Every power state is a standby state here, as KVM treats them: PSCI (DEN0022,
            // 5.4.2) lets an implementation enter a shallower state than asked, and a
            // powerdown request that is entered as standby returns like one, SUCCESS in X0 at
            // the instruction after the call, with the entry point unused. The vCPU waits as
            // in WFI: until an interrupt is pending for it (whatever PSTATE.{I,F} mask) or its
            // timer fires.
            next = if vm.vgic.has_pending(vcpu) {
                Next::Resume
            } else {
                Next::Wait
            };
            0
        }
        PsciCall::AffinityInfo {
            target_affinity,
            lowest_affinity_level,
        } => {
            if lowest_affinity_level != 0 {
                PsciReturn::InvalidParameters.to_x0()
            } else {
                match psci::find_target(target_affinity, vm.vcpus.iter().map(|v| v.mpidr)) {
                    Err(e) => e.to_x0(),
                    Ok(i) if vm.vcpus[i].state == VcpuState::Off => 1, // OFF
                    Ok(_) => 0,                                        // ON
                }
            }
        }
        PsciCall::SystemOff => {
            vm.state = VmState::Stopping(String::from("powered off (PSCI SYSTEM_OFF)"));
            0
        }
        PsciCall::SystemReset => {
            vm.state = VmState::Stopping(String::from(
                "reset requested (PSCI SYSTEM_RESET): torn down",
            ));
            0
        }
        PsciCall::VendorHypCallUid => {
            let uid = psci::VMFORK_UID;
            ctx.regs.x[1] = uid[1] as u64;
            ctx.regs.x[2] = uid[2] as u64;
            ctx.regs.x[3] = uid[3] as u64;
            uid[0] as u64
        }
        PsciCall::Vmfork(psci::VmforkCall::Identity) => {
            ctx.regs.x[1] = vm.parent.map_or(u64::MAX, u64::from);
            ctx.regs.x[2] = vm.generation;
            ctx.regs.x[3] = vm.stats.resets;
            vm.id as u64
        }
        PsciCall::Vmfork(psci::VmforkCall::Reset) => {
            if vm.fork_point.is_none() {
                PsciReturn::Denied.to_x0()
            } else {
                // Like a fork: every vCPU leaves first; the reset then replaces all of them
                // with their fork-point contexts, so nothing is returned here when it is queued.
                match crate::fork::guest_request(vm, vcpu, crate::fork::PendingOp::Reset, kicks) {
                    Ok(()) => {
                        next = Next::Leave;
                        ctx.regs.x[0]
                    }
                    Err(x0) => x0,
                }
            }
        }
        PsciCall::Vmfork(psci::VmforkCall::Fork { .. }) => {
            // Every vCPU of the VM must be off the CPUs first: this one leaves now, the others
            // are kicked; the last one back runs the fork (crate::fork::run_pending), which
            // also writes this call's result into X0 of parent and child. Refused at once
            // (VMFORK_BUSY in X0) when another fork or reset already waits.
            let op = crate::fork::PendingOp::Fork {
                count: 1,
                paused: false,
            };
            match crate::fork::guest_request(vm, vcpu, op, kicks) {
                Ok(()) => {
                    next = Next::Leave;
                    ctx.regs.x[0]
                }
                Err(x0) => x0,
            }
        }
        PsciCall::VendorHypRevision => {
            ctx.regs.x[1] = psci::VMFORK_REVISION.1 as u64;
            psci::VMFORK_REVISION.0 as u64
        }
        _ => PsciReturn::NotSupported.to_x0(),
    };
    ctx.regs.x[0] = ret;
    next
}

fn cpu_on(vm: &mut Vm, target: u64, entry: u64, context: u64, kicks: &mut Vec<usize>) -> u64 {
    // The target must name a vCPU exactly (no bits outside Aff3..Aff0) and the entry point
    // must be in the VM's RAM: a vCPU started anywhere else could only loop on aborts.
    let i = match psci::check_cpu_on(
        target,
        entry,
        layout::RAM_BASE,
        vm.ram_size,
        vm.vcpus.iter().map(|v| v.mpidr),
    ) {
        Ok(i) => i,
        Err(e) => return e.to_x0(),
    };
    if vm.vcpus[i].state != VcpuState::Off {
        return PsciReturn::AlreadyOn.to_x0();
    }
    let Some(ctx) = vm.vcpus[i].ctx.as_mut() else {
        return PsciReturn::InternalFailure.to_x0();
    };
    ctx.regs = GuestRegs::default();
    ctx.regs.pc = entry;
    ctx.regs.x[0] = context;
    ctx.regs.pstate = PSTATE_EL1H_MASKED;
    ctx.sys = El1Sysregs::reset();
    ctx.pauth = PauthKeys::default();
    vm.vcpus[i].state = VcpuState::Runnable;
    crate::sched::wake_idle(kicks);
    0
}

/// ICC_SGI1R_EL1 as Op0/Op1/CRn/CRm/Op2 = 3/0/12/11/5.
const ICC_SGI1R_EL1: (u8, u8, u8, u8, u8) = (3, 0, 12, 11, 5);
/// ICC_ASGI1R_EL1: 3/0/12/11/6.
const ICC_ASGI1R_EL1: (u8, u8, u8, u8, u8) = (3, 0, 12, 11, 6);
/// ICC_SGI0R_EL1: 3/0/12/11/7.
const ICC_SGI0R_EL1: (u8, u8, u8, u8, u8) = (3, 0, 12, 11, 7);

fn sysreg(vm: &mut Vm, vcpu: usize, ctx: &mut VcpuCtx, esr: Esr, kicks: &mut Vec<usize>) -> Next {
    let Some(iss) = esr.sys_reg() else {
        inject_undef(ctx);
        return Next::Resume;
    };
    // ID, debug registers (HCR_EL2.TID3, MDCR_EL2.TDA): arch/idregs.rs.
    if crate::arch::idregs::emulate(&iss, &mut ctx.regs, &mut ctx.sys) {
        return Next::Resume;
    }
    // The three SGI generation registers (write-only: a read is UNDEFINED, below). With
    // HCR_EL2.IMO/FMO set, EL1 writes to them trap here (ARM ARM D13.x, ICC_SGI*R_EL1 traps);
    // which targets take the SGI depends on the register and the SGI's group (vgic).
    let sgi_register = [
        (ICC_SGI1R_EL1, SgiRegister::Sgi1r),
        (ICC_ASGI1R_EL1, SgiRegister::Asgi1r),
        (ICC_SGI0R_EL1, SgiRegister::Sgi0r),
    ]
    .into_iter()
    .find(|&((op0, op1, crn, crm, op2), _)| iss.is(op0, op1, crn, crm, op2));
    if let (Some((_, register)), false) = (sgi_register, iss.read) {
        let value = if iss.rt == 31 {
            0
        } else {
            ctx.regs.x[iss.rt as usize]
        };
        let Some(vgic) = vm.vgic_mut() else {
            // Paused: the write is made again when the VM is resumed.
            return Next::Leave;
        };
        match vgic.send_sgi_from(vcpu, value, register) {
            Ok(targets) => {
                for t in targets.iter() {
                    vm.kick_vcpu(t, kicks);
                }
            }
            Err(e) => crate::vm_log!(
                Debug,
                vm.id,
                "vm{}: SGI write {value:#x} refused: {e:?}",
                vm.id
            ),
        }
        ctx.regs.pc += 4;
        return Next::Resume;
    }
    crate::vm_log!(
        Debug,
        vm.id,
        "vm{} vcpu{vcpu}: {} at PC {:#x} is not emulated: UNDEFINED injected",
        vm.id,
        iss,
        ctx.regs.pc
    );
    inject_undef(ctx);
    Next::Resume
}
