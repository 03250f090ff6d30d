//! One VM: its vCPUs, devices, virtual time, identity and stage-2 memory.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use super::devices::Devices;
use super::ops::{OpQueue, ResetPoint, VmStats};
use super::{vm_log, Host, Kicks, VcpuCtx, CONSOLE_TAP_LIMIT, RX_PENDING_LIMIT};
use crate::addr::Ipa;
use crate::guest_dtb::layout;
use crate::stage2::{Stage2, Stage2Error};
use crate::vgic::Vgic;

/// The virtual timer's PPI.
pub const VTIMER_INTID: u32 = 27;
/// INTID of the `microsoft,vmgenid` interrupt (an SPI), raised after a fork, reset or restore.
pub const VMGENID_INTID: u32 = layout::spi_intid(layout::VMGENID_SPI);
/// CNTV_CTL_EL0 bits.
const CNTV_ENABLE: u64 = 1 << 0;
const CNTV_IMASK: u64 = 1 << 1;
/// Console history kept per VM for a client that attaches later.
pub const SCROLLBACK_BYTES: usize = 4096;
/// Console output is printed a line at a time; a line this long is printed unended.
const CONSOLE_LINE_MAX: usize = 1024;

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
    /// The [version](crate::shared::Shared::version) of the VM's vGIC at which this vCPU was
    /// last seen with no interrupt pending, 0 when not known. [`Vm::has_pending`] skips the
    /// scan of every interrupt while the vGIC is unchanged: the scheduler asks for every
    /// waiting vCPU of every VM at each pick, and a thousand forks waiting in WFI made each
    /// pick scan a quarter of a million interrupts.
    pub quiet_at: u64,
    /// When it was last put on a physical CPU (counter ticks; meaningful while running).
    pub on_cpu_since: u64,
}

impl Vcpu {
    /// A vCPU with context `ctx` in state `state`, nothing known about its interrupts.
    pub fn new(ctx: Option<Box<VcpuCtx>>, state: VcpuState, mpidr: u64) -> Self {
        Self {
            ctx,
            state,
            mpidr,
            quiet_at: 0,
            on_cpu_since: 0,
        }
    }
}

/// Why a VM does not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Its vCPUs are scheduled.
    Running,
    /// Stopped on purpose or by the monitor; its memory and state are kept and resuming it
    /// runs it again (an operation that waited for memory is retried).
    Paused(PauseReason),
    /// Being torn down; gone once no physical CPU runs one of its vCPUs.
    Stopping(StopReason),
}

/// Why a VM is paused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PauseReason {
    /// Asked for (the control channel's `Pause`).
    Requested,
    /// A fork made paused (`Fork { paused: true }`, the dump's own fork).
    Forked,
    /// Created paused (`Create { paused: true }`).
    Created,
    /// Restored paused (`Restore { paused: true }`).
    Restored,
    /// What the VM needed could not be had: no free frame or no heap above its reserve.
    OutOfMemory(MemoryWant),
}

/// What a VM paused for want of memory was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryWant {
    /// Its own copy of the vGIC it shares with its reset point (heap).
    VgicCopy,
    /// The copy of its vmgenid page, to write its new ID in (a frame).
    NewIdentity,
    /// The copy of a shared page a guest store hit (a frame, and maybe a table).
    CowWrite(Ipa),
    /// A page or table an instruction fetch needed (a frame).
    Fetch(Ipa),
}

/// Why a VM is being torn down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (PSCI SYSTEM_OFF).
    PowerOff,
    /// The guest asked for a reset (PSCI SYSTEM_RESET): a VM is torn down instead.
    SystemReset,
    /// Killed by the control channel.
    Killed,
    /// The internal fork a dump was read from, once read out.
    DumpDone,
    /// The internal fork of a dump that failed.
    DumpDiscarded,
    /// The guest did something the monitor cannot go on from (an unhandled exception, an
    /// SError): what, with ESR/FAR/PC.
    Fault(String),
    /// A stage-2 error that is not running out of memory: a bug in the monitor.
    Internal(String),
}

impl core::fmt::Display for PauseReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PauseReason::Requested => write!(f, "requested"),
            PauseReason::Forked => write!(f, "forked paused"),
            PauseReason::Created => write!(f, "created paused"),
            PauseReason::Restored => write!(f, "restored paused"),
            PauseReason::OutOfMemory(MemoryWant::VgicCopy) => write!(f, "out of memory: vGIC copy"),
            PauseReason::OutOfMemory(MemoryWant::NewIdentity) => {
                write!(f, "out of memory writing its new vmgenid ID")
            }
            PauseReason::OutOfMemory(MemoryWant::CowWrite(ipa)) => {
                write!(f, "out of memory copying a page for a write to IPA {ipa}")
            }
            PauseReason::OutOfMemory(MemoryWant::Fetch(ipa)) => {
                write!(f, "out of memory on an instruction fetch at IPA {ipa}")
            }
        }
    }
}

impl core::fmt::Display for StopReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StopReason::PowerOff => write!(f, "powered off (PSCI SYSTEM_OFF)"),
            StopReason::SystemReset => {
                write!(f, "reset requested (PSCI SYSTEM_RESET): torn down")
            }
            StopReason::Killed => write!(f, "killed by the control channel"),
            StopReason::DumpDone => write!(f, "snapshot read out"),
            StopReason::DumpDiscarded => write!(f, "snapshot fork discarded"),
            StopReason::Fault(s) | StopReason::Internal(s) => write!(f, "{s}"),
        }
    }
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
    /// Its device models: the vGIC (shared with the reset point until changed), the PL011.
    pub devices: Devices,
    /// CNTVOFF_EL2: virtual time = physical count - cntvoff.
    pub cntvoff: u64,
    /// Guest RAM size in bytes (at [`layout::RAM_BASE`]).
    pub ram_size: u64,
    /// The kernel command line it booted with.
    pub cmdline: String,
    /// Console output not yet ended by a newline.
    pub line: Vec<u8>,
    /// When `line` got its first byte (counter ticks): a line left unended this long is
    /// printed anyway ([`super::VmTable::flush_stale_lines`]), so a prompt shows.
    pub line_since: u64,
    /// The VM this one was forked from.
    pub parent: Option<u32>,
    /// Fork generation: 0 for a VM created from an image, the parent's + 1 for a fork.
    pub generation: u64,
    /// The 16 bytes of its `microsoft,vmgenid` page.
    pub genid: [u8; 16],
    /// Whether the VM still has to get its vmgenid ID written and its interrupt raised.
    pub new_identity: NewIdentity,
    /// Where `reset` puts the VM back to (forks only).
    pub reset_point: Option<ResetPoint>,
    /// Operations that need every vCPU of this VM off the CPUs (fork, reset), with who waits
    /// for each; while one waits no vCPU of the VM is scheduled. Each is answered exactly once:
    /// run when the last vCPU leaves ([`super::VmTable::run_pending`]), or failed when the VM
    /// goes ([`super::VmTable::stop`], [`super::VmTable::destroy`]).
    pub pending: OpQueue,
    /// Counters for `vmfork stats`.
    pub stats: VmStats,
    /// A control-channel client streams this VM's console.
    pub console_attached: bool,
    /// Console output not yet sent to the attached client.
    pub console_tap: Vec<u8>,
    /// Typed input the guest's UART receive FIFO has no room for yet (fed as it drains).
    pub rx_pending: VecDeque<u8>,
    /// The last [`SCROLLBACK_BYTES`] of its console output, replayed to a client that attaches
    /// (grown as it prints, fallibly: a VM that never prints holds none).
    pub scrollback: VecDeque<u8>,
    /// The monitor's own fork (a dump's): not listed.
    pub internal: bool,
    /// Keep no record of it once it stops (`--rm`): it leaves `list` at once.
    pub remove_on_stop: bool,
    /// In its table's active set ([`super::vmmap`]): kept by [`super::vmmap::VmMap`] only.
    pub(super) active: bool,
}

impl Vm {
    /// A VM in state `state` with everything else empty: no parent, no reset point, nothing
    /// pending, no console client.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u32,
        name: String,
        state: VmState,
        s2: Stage2,
        vcpus: Vec<Vcpu>,
        devices: Devices,
        cntvoff: u64,
        ram_size: u64,
        cmdline: String,
        genid: [u8; 16],
    ) -> Self {
        Self {
            id,
            name,
            state,
            s2: Some(s2),
            vcpus,
            devices,
            cntvoff,
            ram_size,
            cmdline,
            line: Vec::new(),
            line_since: 0,
            parent: None,
            generation: 0,
            genid,
            new_identity: NewIdentity::Done,
            reset_point: None,
            pending: OpQueue::default(),
            stats: VmStats::default(),
            console_attached: false,
            console_tap: Vec::new(),
            rx_pending: VecDeque::new(),
            scrollback: VecDeque::new(),
            internal: false,
            remove_on_stop: false,
            active: false,
        }
    }

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
    pub fn running_cpus(&self) -> impl Iterator<Item = usize> + '_ {
        self.vcpus.iter().filter_map(|v| match v.state {
            VcpuState::Running(c) => Some(c),
            _ => None,
        })
    }

    /// The root of this VM's fork tree.
    pub fn tree_root(&self) -> u32 {
        self.stats.tree_root.unwrap_or(self.id)
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
    pub fn check_vtimer<H: Host>(&mut self, h: &H, vcpu: usize, ctx: &mut VcpuCtx, now: u64) {
        if let Some(deadline) = self.timer_deadline(ctx, now) {
            if now >= deadline {
                let id = self.id;
                // Without a vGIC (the VM just paused: no heap for its copy) the timer stays
                // unmasked, so it fires again once the VM is resumed.
                let Some(vgic) = self.vgic_mut(h) else {
                    return;
                };
                ctx.sys.cntv_ctl_el0 |= CNTV_IMASK;
                if let Err(e) = vgic.inject_edge(VTIMER_INTID, vcpu) {
                    vm_log!(
                        h,
                        Warn,
                        id,
                        "vm{id}: cannot inject the virtual timer: {e:?}"
                    );
                }
            }
        }
    }

    /// True when vCPU `vcpu` has an interrupt to take ([`Vgic::has_pending`]), remembering a
    /// "no" until the vGIC changes (see [`Vcpu::quiet_at`]).
    pub fn has_pending(&mut self, vcpu: usize) -> bool {
        let version = self.devices.vgic.version();
        let Some(v) = self.vcpus.get_mut(vcpu) else {
            return false;
        };
        if v.quiet_at == version {
            return false;
        }
        let pending = self.devices.vgic.has_pending(vcpu);
        if !pending {
            v.quiet_at = version;
        }
        pending
    }

    /// Makes waiting vCPU `vcpu` runnable when its timer fired or an interrupt is pending.
    pub fn wake_if_due<H: Host>(&mut self, h: &H, vcpu: usize, now: u64) {
        if let Some(mut ctx) = self.vcpus[vcpu].ctx.take() {
            self.check_vtimer(h, vcpu, &mut ctx, now);
            self.vcpus[vcpu].ctx = Some(ctx);
        }
        if self.has_pending(vcpu) {
            self.vcpus[vcpu].state = VcpuState::Runnable;
        }
    }

    /// Hands the guest's console output to the host, one line at a time, and keeps a copy for
    /// an attached control-channel client.
    pub fn drain_console<H: Host>(&mut self, h: &H) {
        let out: Vec<u8> = self.devices.uart.take_output().collect();
        // The backlog for an attached client is kept only while the heap has room above its
        // reserve; past that (or past the limit, oldest first) bytes are dropped, as a slow
        // terminal would lose them.
        if self.console_attached
            && h.heap_check(out.len()).is_ok()
            && self.console_tap.try_reserve(out.len()).is_ok()
        {
            self.console_tap.extend_from_slice(&out);
            if self.console_tap.len() > CONSOLE_TAP_LIMIT {
                let excess = self.console_tap.len() - CONSOLE_TAP_LIMIT;
                self.console_tap.drain(..excess);
            }
        }
        self.keep_history(h, &out);
        for b in out {
            match b {
                b'\n' => self.flush_console_line(h),
                b'\r' => {}
                _ => {
                    if self.line.is_empty() {
                        self.line_since = h.now();
                    }
                    // The line is bounded: reserved fallibly, printed when full.
                    if self.line.try_reserve(1).is_ok() {
                        self.line.push(b);
                    }
                    if self.line.len() >= CONSOLE_LINE_MAX {
                        self.flush_console_line(h);
                    }
                }
            }
        }
    }

    /// Adds `out` to the scrollback, dropping its oldest bytes past [`SCROLLBACK_BYTES`]. The
    /// room is reserved fallibly, with the heap's reserve kept; without it the history is kept
    /// as far as it fits.
    fn keep_history<H: Host>(&mut self, h: &H, out: &[u8]) {
        let out = &out[out.len().saturating_sub(SCROLLBACK_BYTES)..];
        let want = (self.scrollback.len() + out.len()).min(SCROLLBACK_BYTES);
        if want > self.scrollback.capacity() {
            let more = want - self.scrollback.len();
            if h.heap_check(more).is_err() || self.scrollback.try_reserve(more).is_err() {
                return;
            }
        }
        let excess = (self.scrollback.len() + out.len()).saturating_sub(SCROLLBACK_BYTES);
        self.scrollback.drain(..excess.min(self.scrollback.len()));
        self.scrollback.extend(out);
    }

    /// Prints what is left of the current console line.
    pub fn flush_console_line<H: Host>(&mut self, h: &H) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        h.console_line(self.id, &text);
        self.line.clear();
    }

    /// Shows the guest its new vmgenid ID if it does not see it yet (after a fork, a reset or a
    /// restore): writes the ID page, then raises the interrupt, in that order, so a guest that
    /// takes the interrupt reads the new ID (Linux 6.10+ then reseeds its RNG). Called before
    /// every run of a vCPU. Out of memory for the page (it is copied on write like any other)
    /// pauses the VM with the reason, and false is returned: the vCPU must not run.
    pub fn apply_new_identity<H: Host>(&mut self, h: &H) -> bool {
        match self.show_new_identity(h) {
            // Not done only when the VM just paused for want of heap for its vGIC.
            Ok(()) => self.new_identity == NewIdentity::Done,
            Err(Stage2Error::OutOfMemory) => {
                self.state = VmState::Paused(PauseReason::OutOfMemory(MemoryWant::NewIdentity));
                vm_log!(
                    h,
                    Warn,
                    self.id,
                    "vm{}: paused: no free frame for its vmgenid page",
                    self.id
                );
                false
            }
            Err(e) => {
                self.state = VmState::Stopping(StopReason::Internal(alloc::format!(
                    "stage-2 error writing its vmgenid ID: {e}"
                )));
                false
            }
        }
    }

    fn show_new_identity<H: Host>(&mut self, h: &H) -> Result<(), Stage2Error> {
        if self.new_identity == NewIdentity::Done {
            return Ok(());
        }
        let id = self.id;
        // The interrupt needs the VM's own vGIC: when a shared one cannot be copied the VM is
        // paused (`vgic_mut`) and nothing is written; this runs again before its next run.
        if self.vgic_mut(h).is_none() {
            return Ok(());
        }
        let s2 = self
            .s2
            .as_mut()
            .ok_or(Stage2Error::NotMapped(Ipa(layout::VMGENID_BASE)))?;
        let genid = self.genid;
        h.with_mem(|cx| s2.write_guest(cx, Ipa(layout::VMGENID_BASE), &genid))?;
        // Only now that the page holds the new ID.
        if let Some(vgic) = self.vgic_mut(h) {
            if let Err(e) = vgic.inject_edge(VMGENID_INTID, 0) {
                vm_log!(
                    h,
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
    pub fn write_new_identity<H: Host>(&mut self, h: &H, ipa: Ipa) -> Result<(), Stage2Error> {
        if self.new_identity == NewIdentity::Done || ipa.0 >= layout::RAM_BASE {
            return Ok(());
        }
        self.show_new_identity(h)
    }

    /// Queues typed bytes for the guest's UART (at most [`RX_PENDING_LIMIT`] wait; beyond that
    /// they are dropped, as a real line would overrun) and moves what fits into its FIFO.
    /// Returns the vCPU to kick when its interrupt line changed.
    pub fn type_input<H: Host>(&mut self, h: &H, bytes: &[u8]) -> Option<usize> {
        let n = bytes
            .len()
            .min(RX_PENDING_LIMIT.saturating_sub(self.rx_pending.len()));
        // Fallibly, and only with the heap's reserve left: otherwise the bytes are dropped too.
        if h.heap_check(n).is_ok() && self.rx_pending.try_reserve(n).is_ok() {
            self.rx_pending.extend(&bytes[..n]);
        }
        self.feed_uart(h)
    }

    /// Moves queued input into the UART's receive FIFO while it has room.
    pub fn feed_uart<H: Host>(&mut self, h: &H) -> Option<usize> {
        while let Some(&b) = self.rx_pending.front() {
            if !self.devices.uart.push_rx(b) {
                break;
            }
            self.rx_pending.pop_front();
        }
        self.uart_irq_changed(h)
    }

    /// Re-evaluates the UART's interrupt line after any UART activity. Returns the vCPU to kick.
    pub fn uart_irq_changed<H: Host>(&mut self, h: &H) -> Option<usize> {
        let level = self.devices.uart.irq_level();
        self.vgic_mut(h)?
            .set_irq_level(crate::vuart::PL011_INTID, 0, level)
            .ok()
            .flatten()
    }

    /// The vGIC, to change. A fork shares its vGIC with its reset point (and a parent with its
    /// children's reset points) until the first change, which copies it: that copy is made
    /// here, fallibly and only with the heap's reserve left ([`Host::heap_check`]). When it
    /// cannot be made the VM is paused with an "out of memory" reason and `None` is returned:
    /// nothing changed, and resuming the VM tries again.
    pub fn vgic_mut<H: Host>(&mut self, h: &H) -> Option<&mut Vgic> {
        if self.devices.vgic.is_shared() {
            let copied = match h.heap_check(self.devices.vgic.copy_bytes()) {
                Err(e) => Err(alloc::format!("{e}")),
                Ok(()) => self
                    .devices
                    .vgic
                    .try_make_mut()
                    .map(|_| ())
                    .map_err(|e| alloc::format!("{e}")),
            };
            if let Err(e) = copied {
                if !matches!(self.state, VmState::Stopping(_)) {
                    vm_log!(
                        h,
                        Warn,
                        self.id,
                        "vm{}: paused: no heap to copy its vGIC: {e}",
                        self.id
                    );
                    self.state = VmState::Paused(PauseReason::OutOfMemory(MemoryWant::VgicCopy));
                }
                return None;
            }
        }
        // Not shared now: this never copies.
        self.devices.vgic.try_make_mut().ok()
    }

    /// Marks a vCPU that has a new interrupt: a waiting one becomes runnable (and an idle CPU is
    /// woken for it); one running on a CPU gets that CPU kicked so it reloads its list registers.
    pub fn kick_vcpu(&mut self, vcpu: usize, kicks: &mut Kicks) {
        match self.vcpus.get(vcpu).map(|v| v.state) {
            Some(VcpuState::Waiting) => {
                self.vcpus[vcpu].state = VcpuState::Runnable;
                kicks.idle = true;
            }
            Some(VcpuState::Running(c)) => kicks.cpu(c),
            _ => {}
        }
    }
}
