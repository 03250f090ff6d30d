//! The machine model: whole VMs (vCPUs, vGIC, UART, virtual time, identity, memory) and the
//! table of them, with everything done to a VM as a whole (create, run an exit, fork, reset,
//! dump, restore, stop, destroy), as plain Rust that `cargo test` runs on the host.
//!
//! The monitor keeps only the scheduler loop, the arch layer and the glue: it implements
//! [`Host`] (physical memory and TLB maintenance, the counter, its heap budget, its log) and
//! keeps one [`VmTable`] behind a lock. Nothing here reads a clock or touches a CPU: time comes
//! in through [`Host::now`], and what the caller must do afterwards (kick the CPUs running a
//! vCPU, wake an idle CPU) comes back as [`Kicks`].
//!
//! The words: a VM's *reset point* ([`ResetPoint`]) is what `reset` puts a fork back to: its
//! stage-2 *fork point* ([`crate::stage2::ForkPoint`], the tables shared at the fork) plus
//! the vCPUs and devices as they were. A *dump* is a VM written out as a snapshot file
//! ([`saved`]); a *restore* builds a VM from one.
//!
//! Module map: [`regs`] (register state as data), [`vm`] (one VM), [`table`] (all VMs, VMIDs,
//! scheduling picks, create/stop/destroy), [`ops`] (fork and reset, queued until every vCPU of
//! the VM is off the CPUs), [`exit`] (a vCPU's synchronous exits: aborts, MMIO, PSCI and the
//! vmfork hypercalls, trapped system registers), [`saved`] (dump and restore), [`server`] (the
//! control protocol served over a table of VMs: the monitor's control channel and the host
//! tool's fake monitor run this same code).

pub mod devices;
pub mod exit;
pub mod fake;
pub mod ops;
pub mod regs;
pub mod saved;
pub mod server;
pub mod table;
pub mod vm;
pub mod vmmap;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use crate::esr::SysRegIss;
use crate::physmem::PhysMem;
use crate::stage2::{MemCtx, TlbOps};

pub use devices::{DeviceState, Devices, Window};
pub use exit::{handle_sync, handle_sync_vm, Handled, Next, Syndrome};
pub use ops::{ForkError, PendingOp, ResetPoint, VmStats};
pub use regs::{El1Sysregs, GuestRegs, PauthKeys, VcpuCtx, PSTATE_EL1H_MASKED};
pub use table::{CreateError, GuestSpec, Picked, VmTable, VmidAllocator};
pub use vm::{MemoryWant, NewIdentity, PauseReason, StopReason, Vcpu, VcpuState, Vm, VmState};
pub use vmmap::{VmGuard, VmHandle, VmLock, VmMap};

/// Most console output kept for a control-channel client that streams a VM's console and has
/// not read it yet; older bytes are dropped first.
pub const CONSOLE_TAP_LIMIT: usize = 64 * 1024;

/// Most typed input queued for a guest's UART beyond its receive FIFO.
pub const RX_PENDING_LIMIT: usize = 64 * 1024;

/// What the machine model needs from whoever runs it: memory, time, a heap budget and a log.
///
/// The monitor implements it over its frame allocator, identity map, hardware TLB maintenance,
/// CNTPCT_EL0 and its heap; the host tests over [`crate::physmem::FakePhysMem`] with budgets
/// they can run out of on purpose.
pub trait Host {
    /// Physical memory as the stage-2 code sees it.
    type Mem: PhysMem;
    /// TLB maintenance.
    type Tlb: TlbOps;

    /// Runs `f` with the frame allocator, physical memory and TLB maintenance.
    fn with_mem<R>(&self, f: impl FnOnce(&mut MemCtx<'_, Self::Mem, Self::Tlb>) -> R) -> R;

    /// The physical counter (CNTPCT_EL0 ticks).
    fn now(&self) -> u64;

    /// Microseconds in `ticks` counter ticks (for logs).
    fn micros(&self, ticks: u64) -> u64;

    /// The counter's frequency in Hz (CNTFRQ_EL0).
    fn counter_hz(&self) -> u64;

    /// The monitor's heap: bytes used, free and kept in reserve.
    fn heap_usage(&self) -> HeapUsage;

    /// Whether `bytes` more can be allocated on the monitor's heap with its reserve kept.
    fn heap_check(&self, bytes: usize) -> Result<(), HeapLow>;

    /// `Box::new(value)`, failing instead of aborting when the heap cannot take it.
    fn try_box<T>(&self, value: T) -> Result<Box<T>, HeapLow>;

    /// Emulates a trapped access to an ID or debug system register (values come from the
    /// hardware): does the access, steps the PC and returns true, or returns false for any
    /// other register.
    fn emulate_sysreg(&self, iss: &SysRegIss, regs: &mut GuestRegs, sys: &mut El1Sysregs) -> bool;

    /// A log line a guest can cause: rate-limited per VM by the implementation.
    fn vm_log(&self, level: log::Level, vm: u32, args: fmt::Arguments<'_>);

    /// One complete line of VM `vm`'s console output (without its newline).
    fn console_line(&self, vm: u32, line: &str);

    /// VM `vm` is gone: forget what was kept for it (its log limiter).
    fn vm_gone(&self, vm: u32);

    /// A fresh 16-byte `microsoft,vmgenid` generation ID for VM `vm`.
    fn generation_id(&self, vm: u32) -> [u8; 16] {
        generation_id(self.now(), vm)
    }
}

/// A guest-caused log line through [`Host::vm_log`].
macro_rules! vm_log {
    ($host:expr, $level:ident, $vm:expr, $($arg:tt)+) => {
        $crate::machine::Host::vm_log($host, log::Level::$level, $vm, format_args!($($arg)+))
    };
}
pub(crate) use vm_log;

/// The monitor's heap as `vmfork stats` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapUsage {
    /// Bytes allocated.
    pub used: usize,
    /// Bytes free, the reserve included.
    pub free: usize,
    /// Bytes kept free for the monitor itself.
    pub reserve: usize,
}

/// Not enough heap for an operation (the reserve counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapLow {
    /// Bytes asked for.
    pub wanted: usize,
    /// Bytes free, the reserve included.
    pub free: usize,
    /// Bytes of the heap kept free for the monitor itself.
    pub reserve: usize,
}

impl fmt::Display for HeapLow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "monitor heap low: {} KiB wanted, {} KiB free of which {} KiB is the reserve",
            self.wanted >> 10,
            self.free >> 10,
            self.reserve >> 10
        )
    }
}

/// Physical CPUs to tell about what an operation did: each CPU in `cpus` runs a vCPU that must
/// leave its guest (to pick up an interrupt or stop for a fork), and with `idle` set an idle
/// CPU should look for a vCPU that became runnable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kicks {
    /// CPUs to interrupt.
    pub cpus: Vec<usize>,
    /// Wake every idle CPU too.
    pub idle: bool,
}

impl Kicks {
    /// Nothing to do.
    pub const fn new() -> Self {
        Self {
            cpus: Vec::new(),
            idle: false,
        }
    }

    /// Adds CPU `cpu`.
    pub fn cpu(&mut self, cpu: usize) {
        if !self.cpus.contains(&cpu) {
            self.cpus.push(cpu);
        }
    }

    /// Adds every CPU of `cpus`.
    pub fn extend(&mut self, cpus: impl IntoIterator<Item = usize>) {
        for c in cpus {
            self.cpu(c);
        }
    }

    /// Adds what `other` asks for.
    pub fn merge(&mut self, other: Kicks) {
        self.extend(other.cpus);
        self.idle |= other.idle;
    }

    /// True when nothing is to be done.
    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty() && !self.idle
    }
}

/// A 16-byte `microsoft,vmgenid` generation ID from a counter value and a VM id: different for
/// every VM and every call at a different time (splitmix64 over both).
pub fn generation_id(now: u64, vm: u32) -> [u8; 16] {
    let mut x = now ^ ((vm as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = [0u8; 16];
    for chunk in out.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    out
}
