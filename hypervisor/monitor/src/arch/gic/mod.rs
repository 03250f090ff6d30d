//! The physical GICv3: distributor (GICD), one redistributor (GICR) per CPU, the CPU interface
//! (ICC_* system registers) and the IRQ dispatcher the monitor runs on every physical interrupt.
//! The virtual interface control registers (ICH_*_EL2) are in `ich.rs`, the boot-time interrupt
//! self-test in `selftest.rs`.
//!
//! Written by hand rather than with the `arm-gic` crate: that crate finds a CPU's redistributor by
//! a linear index instead of by its GICR_TYPER affinity, has no ICH_* (list register) access, and
//! its `&mut self` API would put a lock around every distributor access, which an interrupt
//! handler that enables or disables an interrupt could deadlock on. Here every per-interrupt
//! register access is lock-free: the set/clear-enable registers are write-1-to-act, priority
//! registers are byte-accessible and IROUTER is one 64-bit register per SPI.
//!
//! The monitor runs non-VHE at EL2 in Non-secure state. Every interrupt is Non-secure Group 1
//! (IGROUPR = 1, IGRPMODR = 0), signalled at EL2 as IRQ. EOImode is 0: one write to
//! ICC_EOIR1_EL1 drops the running priority and deactivates the interrupt.
//!
//! Interrupt handlers run with PSTATE.I masked on the interrupted CPU's stack. They must not
//! allocate (the heap lock is not IRQ-safe) and must silence a level-sensitive source before they
//! return (the dispatcher writes EOI right after).

// The arch layer the scheduler and vCPU code call: parts are not used by the monitor yet.
#![allow(dead_code)]

use core::fmt;
use core::ptr::{null_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use aarch64_cpu::registers::{ReadWriteable, Readable, HCR_EL2, ICC_SRE_EL2};
use alloc::vec::Vec;
use spin::Once;
use vmfork_core::platform::{Gic, GicVersion};

use super::boot::MAX_CPUS;

mod ich;
mod selftest;
pub use ich::*;
pub use selftest::irq_selftest;

/// Number of INTIDs below the special range: SGIs 0-15, PPIs 16-31, SPIs 32-1019.
pub const INTID_LIMIT: u32 = 1020;
/// First SPI.
pub const FIRST_SPI: u32 = 32;
/// First PPI.
pub const FIRST_PPI: u32 = 16;
/// Priority given to every interrupt at initialisation (lower is more urgent).
pub const DEFAULT_PRIORITY: u8 = 0xa0;
/// Most interrupts one [`dispatch_pending`] call handles before it returns.
const DISPATCH_BUDGET: usize = 64;

// GICD registers (GICv3 architecture specification, 12.9).
const GICD_CTLR: usize = 0x0000;
const GICD_TYPER: usize = 0x0004;
const GICD_IGROUPR: usize = 0x0080;
const GICD_ISENABLER: usize = 0x0100;
const GICD_ICENABLER: usize = 0x0180;
const GICD_ICPENDR: usize = 0x0280;
const GICD_ICACTIVER: usize = 0x0380;
const GICD_IPRIORITYR: usize = 0x0400;
const GICD_ICFGR: usize = 0x0c00;
const GICD_IGRPMODR: usize = 0x0d00;
const GICD_IROUTER: usize = 0x6000;
/// GICD_CTLR.RWP: a write to CTLR or ICENABLER is still taking effect.
const GICD_CTLR_RWP: u32 = 1 << 31;
/// GICD_CTLR.ARE_NS (bit 4 in both the Non-secure view and the DS=1 layout, where it is ARE).
const GICD_CTLR_ARE_NS: u32 = 1 << 4;
/// GICD_CTLR.EnableGrp1NS (bit 1: EnableGrp1A in the Non-secure view, EnableGrp1 with DS=1).
const GICD_CTLR_ENABLE_GRP1NS: u32 = 1 << 1;
/// GICD_TYPER.ITLinesNumber: SPIs are INTIDs below 32 * (N + 1).
const GICD_TYPER_ITLINES: u32 = 0x1f;

// GICR registers: RD_base frame, then SGI_base frame 64 KiB later (12.10, 12.11).
const GICR_CTLR: usize = 0x0000;
const GICR_TYPER: usize = 0x0008;
const GICR_WAKER: usize = 0x0014;
const GICR_SGI_BASE: usize = 0x1_0000;
const GICR_IGROUPR0: usize = GICR_SGI_BASE + 0x0080;
const GICR_ISENABLER0: usize = GICR_SGI_BASE + 0x0100;
const GICR_ICENABLER0: usize = GICR_SGI_BASE + 0x0180;
const GICR_ICPENDR0: usize = GICR_SGI_BASE + 0x0280;
const GICR_ICACTIVER0: usize = GICR_SGI_BASE + 0x0380;
const GICR_IPRIORITYR: usize = GICR_SGI_BASE + 0x0400;
const GICR_IGRPMODR0: usize = GICR_SGI_BASE + 0x0d00;
/// GICR_CTLR.RWP: a write to ICENABLER0 is still taking effect.
const GICR_CTLR_RWP: u32 = 1 << 3;
/// GICR_TYPER.Last: the last redistributor of its region.
const GICR_TYPER_LAST: u64 = 1 << 4;
/// GICR_TYPER.VLPIS: the redistributor has the two extra GICv4 vLPI frames.
const GICR_TYPER_VLPIS: u64 = 1 << 1;
/// GICR_WAKER.ProcessorSleep: the CPU interface is asleep (1) or may receive interrupts (0).
const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
/// GICR_WAKER.ChildrenAsleep: the redistributor's interface to the CPU is quiescent.
const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
/// One GICv3 redistributor: RD_base + SGI_base frames of 64 KiB.
const GICR_STRIDE_V3: usize = 0x2_0000;
/// One GICv4 redistributor with virtual LPIs: two more 64 KiB frames.
const GICR_STRIDE_V4: usize = 0x4_0000;

/// ICC_CTLR_EL1.RSS: SGIs may target Aff0 values 16-255 through ICC_SGI1R_EL1.RS.
const ICC_CTLR_RSS: u64 = 1 << 18;
/// How long register-write-pending or wake-up polls may take, in microseconds.
const POLL_TIMEOUT_US: u64 = 100_000;

/// What can go wrong driving the GIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicError {
    /// The device tree names no GIC.
    NoGic,
    /// The GIC is not a GICv3 (the monitor needs the system-register CPU interface).
    NotGicV3(u8),
    /// The device tree gives a GICv3 without redistributor regions.
    NoRedistributors,
    /// [`init_distributor`] has not run yet.
    NotInitialized,
    /// No redistributor frame has this CPU's affinity in GICR_TYPER.
    RedistributorNotFound {
        /// The calling CPU's MPIDR affinity.
        mpidr: u64,
    },
    /// GICR_WAKER.ChildrenAsleep stayed 1 after ProcessorSleep was cleared.
    WakeTimeout {
        /// The CPU whose redistributor did not wake.
        mpidr: u64,
    },
    /// GICD_CTLR.RWP or GICR_CTLR.RWP stayed set.
    WriteTimeout,
    /// ICC_SRE_EL2.SRE reads 0 after being set: no system-register CPU interface.
    NoSystemRegisterInterface,
    /// The INTID is not of the kind the call needs (SGI 0-15, PPI 16-31, SPI 32-1019).
    BadIntid(u32),
    /// No CPU with that index has run [`init_cpu`], or the index is out of range.
    UnknownCpu(usize),
    /// The target's Aff0 is above 15 and the CPU interface has no range selector (ICC_CTLR.RSS).
    SgiTargetUnreachable {
        /// The target's MPIDR affinity.
        mpidr: u64,
    },
    /// List register `n` is not implemented (ICH_VTR_EL2.ListRegs).
    NoListRegister(usize),
    /// Active priority register `n` is not implemented (ICH_VTR_EL2.PREbits).
    NoActivePriorityRegister(usize),
}

impl fmt::Display for GicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoGic => write!(f, "the device tree has no interrupt controller"),
            Self::NotGicV3(v) => write!(f, "GICv{v} found; the monitor needs a GICv3"),
            Self::NoRedistributors => write!(f, "GICv3 without redistributor regions"),
            Self::NotInitialized => write!(f, "the GIC distributor is not initialised"),
            Self::RedistributorNotFound { mpidr } => {
                write!(f, "no redistributor for MPIDR {mpidr:#x}")
            }
            Self::WakeTimeout { mpidr } => {
                write!(f, "redistributor of MPIDR {mpidr:#x} did not wake up")
            }
            Self::WriteTimeout => write!(f, "GIC register write did not complete (RWP)"),
            Self::NoSystemRegisterInterface => {
                write!(f, "ICC_SRE_EL2.SRE cannot be set: no GIC system registers")
            }
            Self::BadIntid(i) => write!(f, "INTID {i} is not valid here"),
            Self::UnknownCpu(c) => write!(f, "cpu{c} has no initialised GIC interface"),
            Self::SgiTargetUnreachable { mpidr } => {
                write!(f, "SGI cannot reach MPIDR {mpidr:#x} (Aff0 > 15, no RSS)")
            }
            Self::NoListRegister(n) => write!(f, "ICH_LR{n}_EL2 is not implemented"),
            Self::NoActivePriorityRegister(n) => {
                write!(f, "ICH_AP<0|1>R{n}_EL2 is not implemented")
            }
        }
    }
}

/// Where the GIC is, from the device tree; set once by [`init_distributor`].
struct Layout {
    gicd: usize,
    /// Redistributor regions as (base, size).
    gicr: Vec<(usize, usize)>,
    /// One past the highest implemented SPI INTID (32 * (ITLinesNumber + 1), at most 1020).
    intid_lines: u32,
}

static LAYOUT: Once<Layout> = Once::new();
/// RD_base of each CPU's redistributor, 0 until that CPU ran [`init_cpu`].
static RD_BASE: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
/// MPIDR affinity of each CPU with [`MPIDR_KNOWN`] set once that CPU ran [`init_cpu`].
static CPU_MPIDR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
const MPIDR_KNOWN: u64 = 1 << 63;
/// Implemented list registers (ICH_VTR_EL2.ListRegs + 1); 0 until a CPU read it.
static LIST_REGS: AtomicU8 = AtomicU8::new(0);
/// An interrupt handler: called with the INTID it was registered for.
pub type Handler = fn(u32);
/// Handler of each INTID below [`INTID_LIMIT`] as a `Handler` cast to a pointer, or null.
static HANDLERS: [AtomicPtr<()>; INTID_LIMIT as usize] =
    [const { AtomicPtr::new(null_mut()) }; INTID_LIMIT as usize];

// ---------------------------------------------------------------------------------------------
// MMIO

fn read32(addr: usize) -> u32 {
    // SAFETY: every caller passes an address inside the GICD or a GICR frame named by the device
    // tree; the monitor's identity map covers them as Device-nGnRE, and a volatile 32-bit read of
    // a GIC register has no effect besides returning it.
    unsafe { read_volatile(addr as *const u32) }
}

fn read64(addr: usize) -> u64 {
    // SAFETY: as in `read32`; the only 64-bit register read is GICR_TYPER, 8-byte aligned.
    unsafe { read_volatile(addr as *const u64) }
}

fn write32(addr: usize, value: u32) {
    // SAFETY: every caller passes the address of a GIC register inside the GICD or a GICR frame
    // (Device memory in the identity map); writing it only changes interrupt configuration.
    unsafe { write_volatile(addr as *mut u32, value) }
}

fn write64(addr: usize, value: u64) {
    // SAFETY: as in `write32`; used only for GICD_IROUTER<n>, 8-byte aligned 64-bit registers.
    unsafe { write_volatile(addr as *mut u64, value) }
}

fn write8(addr: usize, value: u8) {
    // SAFETY: as in `write32`; used only for the byte-accessible IPRIORITYR registers.
    unsafe { write_volatile(addr as *mut u8, value) }
}

/// Polls until `(read32(addr) & mask) == 0`, for at most [`POLL_TIMEOUT_US`].
fn poll_clear(addr: usize, mask: u32) -> bool {
    let deadline =
        super::timer::now().saturating_add(super::timer::ticks_from_micros(POLL_TIMEOUT_US).max(1));
    loop {
        if read32(addr) & mask == 0 {
            return true;
        }
        if super::timer::now() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
}

fn layout() -> Result<&'static Layout, GicError> {
    LAYOUT.get().ok_or(GicError::NotInitialized)
}

/// GICD_CTLR.RWP rule: after writing GICD_CTLR or GICD_ICENABLER<n>, wait until RWP reads 0
/// before relying on the change (the write may still be propagating).
fn wait_gicd(gicd: usize) -> Result<(), GicError> {
    poll_clear(gicd + GICD_CTLR, GICD_CTLR_RWP)
        .then_some(())
        .ok_or(GicError::WriteTimeout)
}

/// GICR_CTLR.RWP rule: the same for GICR_ICENABLER0.
fn wait_gicr(rd: usize) -> Result<(), GicError> {
    poll_clear(rd + GICR_CTLR, GICR_CTLR_RWP)
        .then_some(())
        .ok_or(GicError::WriteTimeout)
}

// ---------------------------------------------------------------------------------------------
// Affinity helpers

/// MPIDR affinity (Aff3 in bits 39:32, Aff2..Aff0 in 23:0) packed as GICR_TYPER.Affinity_Value
/// expresses it: Aff3.Aff2.Aff1.Aff0 in 32 bits.
pub const fn packed_affinity(mpidr: u64) -> u32 {
    (((mpidr >> 8) & 0xff00_0000) | (mpidr & 0x00ff_ffff)) as u32
}

/// ICC_SGI1R_EL1 value that sends SGI `intid` to the one CPU with affinity `mpidr`:
/// TargetList[15:0] bit (Aff0 mod 16), Aff1[23:16], INTID[27:24], Aff2[39:32], IRM[40]=0,
/// RS[47:44] = Aff0 / 16, Aff3[55:48].
pub const fn sgi1r_value(intid: u32, mpidr: u64) -> u64 {
    let aff0 = mpidr & 0xff;
    let aff1 = (mpidr >> 8) & 0xff;
    let aff2 = (mpidr >> 16) & 0xff;
    let aff3 = (mpidr >> 32) & 0xff;
    (1 << (aff0 & 0xf))
        | (aff1 << 16)
        | (((intid & 0xf) as u64) << 24)
        | (aff2 << 32)
        | ((aff0 >> 4) << 44)
        | (aff3 << 48)
}

/// MPIDR affinity of CPU `cpu`, if it has run [`init_cpu`].
pub fn cpu_mpidr(cpu: usize) -> Option<u64> {
    let v = CPU_MPIDR.get(cpu)?.load(Ordering::Acquire);
    (v & MPIDR_KNOWN != 0).then_some(v & !MPIDR_KNOWN)
}

/// Indexes of the CPUs whose GIC interface is up, in increasing order.
pub fn online_cpus() -> impl Iterator<Item = usize> {
    (0..MAX_CPUS).filter(|&c| cpu_mpidr(c).is_some())
}

fn this_rd() -> Result<usize, GicError> {
    let cpu = crate::arch::percpu::cpu_index();
    match RD_BASE.get(cpu).map(|r| r.load(Ordering::Acquire)) {
        Some(rd) if rd != 0 => Ok(rd),
        _ => Err(GicError::UnknownCpu(cpu)),
    }
}

// ---------------------------------------------------------------------------------------------
// Initialisation

/// Initialises the distributor once, on the boot CPU: affinity routing on (ARE_NS), every SPI
/// Non-secure Group 1, disabled, not pending, not active, level-sensitive, priority
/// [`DEFAULT_PRIORITY`], routed to the calling CPU; then Group 1 enabled.
pub fn init_distributor(gic: &Gic) -> Result<(), GicError> {
    if gic.version != GicVersion::V3 {
        return Err(GicError::NotGicV3(gic.version.number()));
    }
    if gic.redistributors.is_empty() {
        return Err(GicError::NoRedistributors);
    }
    let layout = LAYOUT.call_once(|| {
        let gicd = gic.distributor.base as usize;
        let typer = read32(gicd + GICD_TYPER);
        Layout {
            gicd,
            gicr: gic
                .redistributors
                .iter()
                .map(|r| (r.base as usize, r.size as usize))
                .collect(),
            intid_lines: (32 * ((typer & GICD_TYPER_ITLINES) + 1)).min(INTID_LIMIT),
        }
    });
    let d = layout.gicd;
    // ARE may only change while every group is disabled: disable, wait, set ARE_NS, wait.
    write32(d + GICD_CTLR, 0);
    wait_gicd(d)?;
    write32(d + GICD_CTLR, GICD_CTLR_ARE_NS);
    wait_gicd(d)?;

    let boot = super::mpidr_affinity();
    let lines = layout.intid_lines;
    // One bit per INTID: registers 1.. cover the SPIs (register 0 is banked per CPU in GICR).
    for n in 1..(lines / 32) as usize {
        write32(d + GICD_ICENABLER + 4 * n, u32::MAX);
        write32(d + GICD_ICPENDR + 4 * n, u32::MAX);
        write32(d + GICD_ICACTIVER + 4 * n, u32::MAX);
        write32(d + GICD_IGROUPR + 4 * n, u32::MAX);
        write32(d + GICD_IGRPMODR + 4 * n, 0);
    }
    // Two bits per INTID: 0b00 is level-sensitive. Registers 2.. cover the SPIs.
    for n in 2..(lines / 16) as usize {
        write32(d + GICD_ICFGR + 4 * n, 0);
    }
    let prio = u32::from_ne_bytes([DEFAULT_PRIORITY; 4]);
    for intid in FIRST_SPI..lines {
        if intid % 4 == 0 {
            write32(d + GICD_IPRIORITYR + intid as usize, prio);
        }
        // Interrupt_Routing_Mode (bit 31) = 0: deliver to the one CPU named by Aff3..Aff0, which
        // use MPIDR's own bit positions.
        write64(d + GICD_IROUTER + 8 * intid as usize, boot);
    }
    wait_gicd(d)?;
    write32(d + GICD_CTLR, GICD_CTLR_ARE_NS | GICD_CTLR_ENABLE_GRP1NS);
    wait_gicd(d)?;
    log::debug!(
        "gic: distributor at {d:#x}, SPIs up to INTID {}, {} redistributor region(s)",
        lines - 1,
        layout.gicr.len()
    );
    Ok(())
}

/// Finds the redistributor whose GICR_TYPER.Affinity_Value matches `mpidr`, walking each region
/// frame by frame until a frame with GICR_TYPER.Last.
fn find_redistributor(layout: &Layout, mpidr: u64) -> Option<usize> {
    let want = packed_affinity(mpidr);
    for &(base, size) in &layout.gicr {
        let end = base.saturating_add(size);
        let mut frame = base;
        while frame.saturating_add(GICR_STRIDE_V3) <= end {
            let typer = read64(frame + GICR_TYPER);
            if (typer >> 32) as u32 == want {
                return Some(frame);
            }
            if typer & GICR_TYPER_LAST != 0 {
                break;
            }
            frame += if typer & GICR_TYPER_VLPIS != 0 {
                GICR_STRIDE_V4
            } else {
                GICR_STRIDE_V3
            };
        }
    }
    None
}

/// Brings up the calling CPU's side of the GIC; `cpu` is its monitor index (0 = boot CPU). Runs
/// on every CPU after [`init_distributor`], with the MMU on.
///
/// Redistributor: found by affinity, woken (GICR_WAKER), SGIs and PPIs Non-secure Group 1 at
/// [`DEFAULT_PRIORITY`], PPIs disabled, SGIs enabled. CPU interface: ICC_SRE_EL2.{SRE,Enable}
/// (EL1 may use the system registers too), ICC_SRE_EL1.SRE, PMR 0xff, BPR1 0, EOImode 0,
/// Group 1 enabled. HCR_EL2.{IMO,FMO} = 1 so that physical interrupts are taken to EL2.
pub fn init_cpu(cpu: usize) -> Result<(), GicError> {
    if cpu >= MAX_CPUS {
        return Err(GicError::UnknownCpu(cpu));
    }
    let layout = layout()?;
    let mpidr = super::mpidr_affinity();
    let rd = find_redistributor(layout, mpidr).ok_or(GicError::RedistributorNotFound { mpidr })?;

    // Wake the redistributor: clear ProcessorSleep, then wait for ChildrenAsleep to read 0.
    let waker = read32(rd + GICR_WAKER);
    write32(rd + GICR_WAKER, waker & !GICR_WAKER_PROCESSOR_SLEEP);
    if !poll_clear(rd + GICR_WAKER, GICR_WAKER_CHILDREN_ASLEEP) {
        return Err(GicError::WakeTimeout { mpidr });
    }

    write32(rd + GICR_ICENABLER0, u32::MAX);
    wait_gicr(rd)?;
    write32(rd + GICR_ICPENDR0, u32::MAX);
    write32(rd + GICR_ICACTIVER0, u32::MAX);
    write32(rd + GICR_IGROUPR0, u32::MAX);
    write32(rd + GICR_IGRPMODR0, 0);
    let prio = u32::from_ne_bytes([DEFAULT_PRIORITY; 4]);
    for n in 0..8 {
        write32(rd + GICR_IPRIORITYR + 4 * n, prio);
    }
    // SGIs are the monitor's IPIs: always enabled. PPIs are enabled one by one (enable_ppi).
    write32(rd + GICR_ISENABLER0, 0x0000_ffff);

    init_cpu_interface()?;
    route_interrupts_to_el2();

    let vtr = ich_vtr();
    LIST_REGS.store(vtr.list_registers as u8, Ordering::Relaxed);
    RD_BASE[cpu].store(rd, Ordering::Release);
    CPU_MPIDR[cpu].store(mpidr | MPIDR_KNOWN, Ordering::Release);
    log::debug!(
        "gic: cpu{cpu} redistributor {rd:#x}, {} list registers, {} priority bits",
        vtr.list_registers,
        vtr.pri_bits
    );
    Ok(())
}

fn init_cpu_interface() -> Result<(), GicError> {
    // ICC_SRE_EL2: SRE (bit 0) = use the system registers at EL2; Enable (bit 3) = EL1 may
    // access ICC_SRE_EL1 (guests need it to turn on their own system-register interface).
    ICC_SRE_EL2.modify(ICC_SRE_EL2::SRE::SET + ICC_SRE_EL2::ENABLE::SET);
    isb(); // ICC_SRE_EL2.SRE changes how ICC_* accesses behave: synchronise before any of them.
    if !ICC_SRE_EL2.is_set(ICC_SRE_EL2::SRE) {
        return Err(GicError::NoSystemRegisterInterface);
    }
    // SAFETY: with E2H=0, EL2 accesses to ICC_SRE_EL1, ICC_PMR_EL1, ICC_BPR1_EL1, ICC_CTLR_EL1 and
    // ICC_IGRPEN1_EL1 reach the physical CPU interface (and ICC_SRE_EL1 the Non-secure EL1 copy);
    // the values configure interrupt signalling only. The ISBs are the context synchronisation
    // that writes to ICC_* system registers need before they affect later instructions.
    unsafe {
        core::arch::asm!(
            "msr icc_sre_el1, {sre}",   // SRE: system-register interface for EL1 too
            "isb",
            "msr icc_pmr_el1, {pmr}",   // let every priority through
            "msr icc_bpr1_el1, xzr",    // no sub-priority grouping: every level preempts
            "msr icc_ctlr_el1, xzr",    // EOImode 0: EOIR drops priority and deactivates
            "isb",
            "msr icc_igrpen1_el1, {one}",
            "isb",
            sre = in(reg) 1u64,
            pmr = in(reg) 0xffu64,
            one = in(reg) 1u64,
            options(nostack),
        );
    }
    Ok(())
}

/// Sets HCR_EL2.IMO and HCR_EL2.FMO: physical IRQs and FIQs are taken to EL2 (and, at EL1,
/// ICC_* accesses become the virtual ICV_* view). Without IMO an IRQ is routed to EL1 and is
/// never taken while the CPU runs at EL2. The vCPU code must keep these bits when it writes
/// HCR_EL2 for a guest.
pub fn route_interrupts_to_el2() {
    HCR_EL2.modify(HCR_EL2::IMO::SET + HCR_EL2::FMO::SET);
    isb();
}

// ---------------------------------------------------------------------------------------------
// Per-interrupt configuration

/// Enables PPI `intid` (16-31) on the calling CPU with `priority`.
pub fn enable_ppi(intid: u32, priority: u8) -> Result<(), GicError> {
    if !(FIRST_PPI..FIRST_SPI).contains(&intid) {
        return Err(GicError::BadIntid(intid));
    }
    let rd = this_rd()?;
    write8(rd + GICR_IPRIORITYR + intid as usize, priority);
    write32(rd + GICR_ISENABLER0, 1 << intid);
    Ok(())
}

/// Routes SPI `intid` (32 up to the implemented limit) to CPU `cpu` and enables it.
pub fn enable_spi(intid: u32, cpu: usize) -> Result<(), GicError> {
    let layout = layout()?;
    if !(FIRST_SPI..layout.intid_lines).contains(&intid) {
        return Err(GicError::BadIntid(intid));
    }
    let mpidr = cpu_mpidr(cpu).ok_or(GicError::UnknownCpu(cpu))?;
    let d = layout.gicd;
    write64(d + GICD_IROUTER + 8 * intid as usize, mpidr);
    write32(
        d + GICD_ISENABLER + 4 * (intid / 32) as usize,
        1 << (intid % 32),
    );
    Ok(())
}

/// Disables `intid`: an SPI in the distributor, an SGI or PPI on the calling CPU. Returns once
/// the disable has taken effect (RWP clear).
pub fn disable(intid: u32) -> Result<(), GicError> {
    if intid < FIRST_SPI {
        let rd = this_rd()?;
        write32(rd + GICR_ICENABLER0, 1 << intid);
        wait_gicr(rd)
    } else {
        let layout = layout()?;
        if intid >= layout.intid_lines {
            return Err(GicError::BadIntid(intid));
        }
        write32(
            layout.gicd + GICD_ICENABLER + 4 * (intid / 32) as usize,
            1 << (intid % 32),
        );
        wait_gicd(layout.gicd)
    }
}

// ---------------------------------------------------------------------------------------------
// CPU interface

fn isb() {
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// Acknowledges the highest-priority pending Group 1 interrupt (ICC_IAR1_EL1) and returns its
/// INTID, or `None` when the read returns a special INTID (1020-1023: nothing pending).
pub fn ack() -> Option<u32> {
    let iar: u64;
    // SAFETY: reading ICC_IAR1_EL1 acknowledges one interrupt (it becomes active); the caller
    // must EOI it, which `dispatch_pending` does. The `dsb sy` completes the acknowledge before
    // later memory accesses, pairing with the `dsb` a sender issues before generating an SGI, so
    // the handler sees the data written before the interrupt was sent.
    unsafe {
        core::arch::asm!("mrs {0}, icc_iar1_el1", "dsb sy", out(reg) iar, options(nostack));
    }
    let intid = (iar & 0xff_ffff) as u32;
    (!(1020..=1023).contains(&intid)).then_some(intid)
}

/// Ends interrupt `intid` (ICC_EOIR1_EL1): with EOImode 0 this drops the running priority and
/// deactivates it.
pub fn eoi(intid: u32) {
    // SAFETY: writing ICC_EOIR1_EL1 ends an interrupt this CPU acknowledged; it has no effect on
    // memory. The ISB makes the priority drop take effect before the following instructions
    // (writes to ICC_* registers need context synchronisation).
    unsafe {
        core::arch::asm!("msr icc_eoir1_el1, {0}", "isb", in(reg) intid as u64, options(nostack));
    }
}

/// Sends SGI `intid` (0-15) to CPU `cpu` (a monitor CPU index, possibly the caller).
pub fn send_sgi(intid: u32, cpu: usize) -> Result<(), GicError> {
    if intid >= FIRST_PPI {
        return Err(GicError::BadIntid(intid));
    }
    let mpidr = cpu_mpidr(cpu).ok_or(GicError::UnknownCpu(cpu))?;
    if mpidr & 0xff > 15 && read_icc_ctlr() & ICC_CTLR_RSS == 0 {
        return Err(GicError::SgiTargetUnreachable { mpidr });
    }
    let value = sgi1r_value(intid, mpidr);
    // SAFETY: writing ICC_SGI1R_EL1 generates one Group 1 SGI; it has no effect on memory.
    // `dsb ishst` first: the target must observe every store made before the SGI once it takes
    // the interrupt (a system-register write is not ordered after earlier stores otherwise).
    // The ISB afterwards makes sure the SGI is generated before the caller goes on (writes to
    // ICC_* registers need context synchronisation).
    unsafe {
        core::arch::asm!(
            "dsb ishst",
            "msr icc_sgi1r_el1, {0}",
            "isb",
            in(reg) value,
            options(nostack),
        );
    }
    Ok(())
}

fn read_icc_ctlr() -> u64 {
    let v: u64;
    // SAFETY: reading ICC_CTLR_EL1 has no side effects.
    unsafe { core::arch::asm!("mrs {0}, icc_ctlr_el1", out(reg) v, options(nomem, nostack)) };
    v
}

// ---------------------------------------------------------------------------------------------
// PSTATE interrupt masks

/// Unmasks IRQs at the current exception level (PSTATE.I = 0).
pub fn irq_enable() {
    // SAFETY: the IRQ vector is installed on every CPU before this can run, and its handler
    // saves and restores all state it touches. No `nomem`: the compiler must not move memory
    // accesses across the point where handlers may start to run.
    unsafe { core::arch::asm!("msr daifclr, #2", options(nostack)) };
}

/// Masks IRQs at the current exception level (PSTATE.I = 1).
pub fn irq_disable() {
    // SAFETY: masking interrupts only delays them. No `nomem`, as in `irq_enable`.
    unsafe { core::arch::asm!("msr daifset, #2", options(nostack)) };
}

/// Masks IRQs and returns whether they were unmasked before, for [`irq_restore`].
pub fn irq_save() -> bool {
    let daif: u64;
    // SAFETY: reading DAIF has no side effects.
    unsafe { core::arch::asm!("mrs {0}, daif", out(reg) daif, options(nomem, nostack)) };
    irq_disable();
    daif & (1 << 7) == 0
}

/// Unmasks IRQs if `were_enabled` (the value [`irq_save`] returned).
pub fn irq_restore(were_enabled: bool) {
    if were_enabled {
        irq_enable();
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers and dispatch

/// Registers `handler` for `intid`, replacing any earlier one. Handlers are global: the same
/// function runs on whichever CPU takes the interrupt (use [`crate::arch::percpu::cpu_index`]).
pub fn register_handler(intid: u32, handler: Handler) -> Result<(), GicError> {
    let slot = HANDLERS
        .get(intid as usize)
        .ok_or(GicError::BadIntid(intid))?;
    slot.store(handler as *mut (), Ordering::Release);
    Ok(())
}

/// Removes the handler of `intid`.
pub fn unregister_handler(intid: u32) -> Result<(), GicError> {
    let slot = HANDLERS
        .get(intid as usize)
        .ok_or(GicError::BadIntid(intid))?;
    slot.store(null_mut(), Ordering::Release);
    Ok(())
}

fn handler(intid: u32) -> Option<Handler> {
    let p = HANDLERS.get(intid as usize)?.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: the only non-null values ever stored in HANDLERS are `Handler` function pointers
    // (`register_handler`), and function pointers and data pointers have the same size here.
    Some(unsafe { core::mem::transmute::<*mut (), Handler>(p) })
}

/// Acknowledges, handles and ends every pending interrupt of the calling CPU (at most 64 per
/// call; any left over keeps the IRQ line asserted). Call with IRQs masked: from the EL2 IRQ
/// vector, or from the vCPU exit path after a guest-time IRQ. Returns how many it handled.
///
/// An interrupt without a handler is logged; an SPI or PPI without one is also disabled so that
/// a level-sensitive source cannot storm.
pub fn dispatch_pending() -> usize {
    let mut handled = 0;
    while handled < DISPATCH_BUDGET {
        let Some(intid) = ack() else { break };
        match handler(intid) {
            Some(f) => f(intid),
            None => {
                log::warn!("gic: unexpected interrupt {intid}");
                if (FIRST_PPI..INTID_LIMIT).contains(&intid) {
                    let _ = disable(intid);
                }
            }
        }
        eoi(intid);
        handled += 1;
    }
    handled
}

/// Called by the IRQ stub (`arch/entry.rs`, which saves every register the interrupted code
/// may hold live) for an IRQ taken at EL2.
#[no_mangle]
extern "C" fn handle_current_el_irq() {
    dispatch_pending();
}
