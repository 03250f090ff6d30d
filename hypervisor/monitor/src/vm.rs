//! The monitor's side of the machine model (`vmfork_core::machine`): the one table of VMs
//! behind its lock, and [`MonitorHost`], which gives the model this machine's memory, TLB
//! maintenance, counter, heap budget and console.
//!
//! All VMs live in one table behind one lock ([`VMS`]), each VM behind its own lock too
//! ([`vmfork_core::machine::vmmap`]). A physical CPU takes a runnable vCPU's context and a
//! handle to its VM out of the table (`sched.rs`), runs it without any lock, and handles each
//! exit under that VM's lock alone ([`vmfork_core::machine::handle_sync_vm`]); it takes the
//! table lock only when the vCPU leaves its CPU or the VM must stop. Lock order: [`VMS`], then
//! a VM's lock, then the frame allocator (taken inside [`MonitorHost::with_mem`]), then the log
//! limiter and the console. A CPU holding a VM's lock never takes [`VMS`].

use alloc::boxed::Box;
use core::fmt;

use spin::Mutex;
use vmfork_core::esr::SysRegIss;
use vmfork_core::machine::{self, El1Sysregs, GuestRegs, HeapLow, HeapUsage, Host};
use vmfork_core::stage2::MemCtx;

use crate::arch::cache::HwTlb;
use crate::physmem::IdentityMem;

pub use vmfork_core::machine::vm::VTIMER_INTID;
pub use vmfork_core::machine::{ForkError, GuestSpec, Next, Syndrome, VcpuState, VmState};

/// The machine model's view of this machine: every method reaches the monitor's globals.
pub struct MonitorHost;

impl Host for MonitorHost {
    type Mem = IdentityMem;
    type Tlb = HwTlb;

    fn with_mem<R>(&self, f: impl FnOnce(&mut MemCtx<'_, IdentityMem, HwTlb>) -> R) -> R {
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

    fn now(&self) -> u64 {
        crate::arch::counter().0
    }

    fn micros(&self, ticks: u64) -> u64 {
        crate::arch::timer::micros_from_ticks(ticks)
    }

    fn counter_hz(&self) -> u64 {
        crate::arch::counter().1
    }

    fn heap_usage(&self) -> HeapUsage {
        let (used, free) = crate::heap::usage();
        HeapUsage {
            used,
            free,
            reserve: crate::heap::margin(),
        }
    }

    fn heap_check(&self, bytes: usize) -> Result<(), HeapLow> {
        crate::heap::check(bytes)
    }

    fn try_box<T>(&self, value: T) -> Result<Box<T>, HeapLow> {
        crate::heap::try_box(value)
    }

    fn emulate_sysreg(&self, iss: &SysRegIss, regs: &mut GuestRegs, sys: &mut El1Sysregs) -> bool {
        crate::arch::idregs::emulate(iss, regs, sys)
    }

    fn vm_log(&self, level: log::Level, vm: u32, args: fmt::Arguments<'_>) {
        crate::console::vm_log(vm, level, args);
    }

    fn console_line(&self, vm: u32, line: &str) {
        crate::println!("[vm{vm}] {line}");
    }

    fn vm_gone(&self, vm: u32) {
        crate::console::vm_log_forget(vm);
    }
}

/// Everything the monitor knows about its VMs.
pub type VmTable = machine::VmTable<MonitorHost>;

/// The table lock: over the set of VMs, VMIDs, the scheduler's active set and cursor, the
/// pending-operation results (see the module docs for what each VM's own lock guards).
pub static VMS: Mutex<VmTable> = Mutex::new(VmTable::new(MonitorHost));

/// Runs `f` with the frame allocator, physical memory and TLB maintenance the stage-2 code needs
/// (for code outside the machine model: the bench, the control channel's statistics).
/// Lock order: [`VMS`] first, then the frame allocator.
pub fn with_mem<R>(f: impl FnOnce(&mut MemCtx<'_, IdentityMem, HwTlb>) -> R) -> R {
    MonitorHost.with_mem(f)
}
