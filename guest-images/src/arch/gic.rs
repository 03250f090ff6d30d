//! GICv3 driver: distributor set-up (affinity routing, group 1 enabled), per-CPU redistributor
//! wake-up and SGI/PPI enabling, SPI configuration and routing to one CPU, SGIs through
//! `ICC_SGI1R_EL1`, the ICC system-register CPU interface, and IRQ dispatch to registered
//! handlers.
//!
//! All interrupts used are non-secure group 1, signalled as IRQ at EL1. With one security state
//! (QEMU `virt` without `secure=on`, GICD_CTLR.DS = 1) and from the non-secure side of two
//! (DS = 0) the bits written to GICD_CTLR are the same: bit 1 (EnableGrp1 / EnableGrp1A) and
//! bit 4 (ARE / ARE_NS).

use super::{console, smp, sysreg};
use crate::gic_abi::{self, IntidError};
use core::arch::asm;
use core::fmt;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicUsize, Ordering};

const GICD_CTLR: usize = 0x0000;
const GICD_CTLR_ENABLE_GRP1: u32 = 1 << 1;
const GICD_CTLR_ARE: u32 = 1 << 4;
const GICD_CTLR_RWP: u32 = 1 << 31;
const GICD_TYPER: usize = 0x0004;
const GICD_IGROUPR: usize = 0x0080;
const GICD_ISENABLER: usize = 0x0100;
const GICD_ICENABLER: usize = 0x0180;
const GICD_IPRIORITYR: usize = 0x0400;
const GICD_ICFGR: usize = 0x0c00;
const GICD_IROUTER: usize = 0x6000;

const GICR_CTLR: usize = 0x0000;
const GICR_CTLR_RWP: u32 = 1 << 3;
const GICR_TYPER: usize = 0x0008;
const GICR_TYPER_VLPIS: u32 = 1 << 1;
const GICR_TYPER_LAST: u32 = 1 << 4;
const GICR_WAKER: usize = 0x0014;
const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
/// SGI_base frame, 64 KiB after RD_base.
const SGI_BASE: usize = 0x1_0000;
const GICR_IGROUPR0: usize = SGI_BASE + 0x0080;
const GICR_ISENABLER0: usize = SGI_BASE + 0x0100;
const GICR_ICENABLER0: usize = SGI_BASE + 0x0180;
const GICR_IPRIORITYR: usize = SGI_BASE + 0x0400;

/// Priority given to every SGI/PPI at reset of the redistributor (lower is more urgent).
pub const DEFAULT_PRIORITY: u8 = 0xa0;
/// Number of INTIDs that can have a handler (SGIs, PPIs and the first 32 SPIs).
pub const MAX_HANDLED_INTID: u32 = 64;
/// INTIDs 1020-1023 are special (spurious and the like).
const INTID_SPECIAL_FIRST: u32 = 1020;

/// Why the GIC could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GicError {
    /// The DTB has no `arm,gic-v3` node.
    NotInDtb,
    /// [`init`] has not run.
    NotInitialised,
    /// No redistributor frame's GICR_TYPER affinity matches this CPU.
    NoRedistributor {
        /// The CPU's MPIDR affinity.
        affinity: u64,
    },
    /// The INTID is not an SGI/PPI (for per-CPU calls) or is beyond [`MAX_HANDLED_INTID`].
    BadIntid(u32),
    /// The INTID is not of the kind the call needs (an SGI to send, an SPI to route).
    WrongKind(IntidError),
    /// The SPI is beyond what GICD_TYPER.ITLinesNumber says the distributor implements.
    NotImplemented {
        /// The INTID asked for.
        intid: u32,
        /// One past the last implemented INTID.
        limit: u32,
    },
}

impl fmt::Display for GicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInDtb => write!(f, "no arm,gic-v3 node in the DTB"),
            Self::NotInitialised => write!(f, "GIC not initialised"),
            Self::NoRedistributor { affinity } => {
                write!(f, "no GICv3 redistributor for MPIDR affinity {affinity:#x}")
            }
            Self::BadIntid(i) => write!(f, "INTID {i} not supported here"),
            Self::WrongKind(e) => write!(f, "{e}"),
            Self::NotImplemented { intid, limit } => write!(
                f,
                "INTID {intid} not implemented by the distributor (INTIDs below {limit})"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Gic {
    gicd: usize,
    gicr: usize,
    gicr_size: usize,
}

static GIC: spin::Once<Gic> = spin::Once::new();
static HANDLERS: [AtomicUsize; MAX_HANDLED_INTID as usize] =
    [const { AtomicUsize::new(0) }; MAX_HANDLED_INTID as usize];

fn read32(addr: usize) -> u32 {
    // SAFETY: callers pass GICD/GICR register addresses from the DTB, 4-byte aligned.
    unsafe { read_volatile(addr as *const u32) }
}

fn write32(addr: usize, value: u32) {
    // SAFETY: callers pass GICD/GICR register addresses from the DTB, 4-byte aligned.
    unsafe { write_volatile(addr as *mut u32, value) }
}

fn wait_clear(addr: usize, bit: u32) {
    while read32(addr) & bit != 0 {
        core::hint::spin_loop();
    }
}

/// Sets up the distributor (once, on the boot CPU) and this CPU's redistributor and CPU
/// interface. Interrupts stay masked in PSTATE until the caller unmasks them.
pub fn init() -> Result<(), GicError> {
    let platform = &super::boot::boot_info()
        .ok_or(GicError::NotInitialised)?
        .platform;
    let regions = platform.gic.ok_or(GicError::NotInDtb)?;
    GIC.call_once(|| {
        let gicd = regions.distributor as usize;
        // ARE must be set while the groups are disabled.
        write32(gicd + GICD_CTLR, 0);
        wait_clear(gicd + GICD_CTLR, GICD_CTLR_RWP);
        write32(gicd + GICD_CTLR, GICD_CTLR_ARE);
        wait_clear(gicd + GICD_CTLR, GICD_CTLR_RWP);
        write32(gicd + GICD_CTLR, GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1);
        wait_clear(gicd + GICD_CTLR, GICD_CTLR_RWP);
        Gic {
            gicd,
            gicr: regions.redistributors.base as usize,
            gicr_size: regions.redistributors.size as usize,
        }
    });
    init_cpu()
}

/// Finds the calling CPU's redistributor (RD_base) by matching GICR_TYPER.Affinity_Value.
fn redistributor() -> Result<usize, GicError> {
    let gic = GIC.get().ok_or(GicError::NotInitialised)?;
    let affinity = sysreg::mpidr_affinity();
    // GICR_TYPER[63:32] = Aff3.Aff2.Aff1.Aff0.
    let want = (((affinity >> 32) & 0xff) << 24 | (affinity & 0xff_ffff)) as u32;
    let mut offset = 0;
    while offset + 2 * SGI_BASE <= gic.gicr_size {
        let rd = gic.gicr + offset;
        let typer_lo = read32(rd + GICR_TYPER);
        let typer_hi = read32(rd + GICR_TYPER + 4);
        if typer_hi == want {
            return Ok(rd);
        }
        if typer_lo & GICR_TYPER_LAST != 0 {
            break;
        }
        // GICv4 redistributors with virtual LPIs have two more 64 KiB frames.
        offset += if typer_lo & GICR_TYPER_VLPIS != 0 {
            4
        } else {
            2
        } * SGI_BASE;
    }
    Err(GicError::NoRedistributor { affinity })
}

/// Wakes the calling CPU's redistributor, puts all its SGIs/PPIs in group 1 at
/// [`DEFAULT_PRIORITY`], disabled, and enables the CPU interface (ICC_SRE_EL1.SRE,
/// ICC_PMR_EL1 = 0xff, ICC_BPR1_EL1 = 0, ICC_IGRPEN1_EL1 = 1). Call on each CPU that takes
/// interrupts, after [`init`] ran on the boot CPU.
pub fn init_cpu() -> Result<(), GicError> {
    let rd = redistributor()?;
    write32(
        rd + GICR_WAKER,
        read32(rd + GICR_WAKER) & !GICR_WAKER_PROCESSOR_SLEEP,
    );
    wait_clear(rd + GICR_WAKER, GICR_WAKER_CHILDREN_ASLEEP);
    write32(rd + GICR_ICENABLER0, u32::MAX);
    wait_clear(rd + GICR_CTLR, GICR_CTLR_RWP);
    write32(rd + GICR_IGROUPR0, u32::MAX);
    let prio = u32::from_ne_bytes([DEFAULT_PRIORITY; 4]);
    for i in 0..8 {
        write32(rd + GICR_IPRIORITYR + 4 * i, prio);
    }
    // SAFETY: enabling the system-register interface (SRE, with FIQ/IRQ bypass disabled),
    // opening the priority mask and enabling group 1 only affect how this CPU's interrupts are
    // signalled; PSTATE.I still masks them.
    unsafe {
        asm!(
            "mrs {t}, icc_sre_el1",
            "orr {t}, {t}, #7",
            "msr icc_sre_el1, {t}",
            "isb",
            "msr icc_pmr_el1, {pmr}",
            "msr icc_bpr1_el1, xzr",
            "msr icc_igrpen1_el1, {one}",
            "isb",
            t = out(reg) _,
            pmr = in(reg) 0xffu64,
            one = in(reg) 1u64,
            options(nostack, preserves_flags),
        );
    }
    Ok(())
}

/// Enables the SGI/PPI `intid` (< 32) on the calling CPU's redistributor with `priority`.
pub fn enable_ppi(intid: u32, priority: u8) -> Result<(), GicError> {
    if intid >= 32 {
        return Err(GicError::BadIntid(intid));
    }
    let rd = redistributor()?;
    let reg = rd + GICR_IPRIORITYR + (intid as usize & !3);
    let shift = (intid % 4) * 8;
    write32(
        reg,
        (read32(reg) & !(0xff << shift)) | (u32::from(priority) << shift),
    );
    write32(rd + GICR_ISENABLER0, 1 << intid);
    Ok(())
}

/// Disables the SGI/PPI `intid` (< 32) on the calling CPU's redistributor.
pub fn disable_ppi(intid: u32) -> Result<(), GicError> {
    if intid >= 32 {
        return Err(GicError::BadIntid(intid));
    }
    let rd = redistributor()?;
    write32(rd + GICR_ICENABLER0, 1 << intid);
    wait_clear(rd + GICR_CTLR, GICR_CTLR_RWP);
    Ok(())
}

/// Read-modify-writes the `width`-bit field at `field` of the register array at `base`.
fn write_field(base: usize, field: gic_abi::Field, width: u32, value: u32) {
    let reg = base + field.offset;
    let mask = ((1u64 << width) - 1) as u32;
    write32(
        reg,
        (read32(reg) & !(mask << field.shift)) | ((value & mask) << field.shift),
    );
}

/// Configures the SPI `intid` in the distributor and enables it: group 1 (`GICD_IGROUPR<n>`),
/// `priority` (`GICD_IPRIORITYR<n>`), level-sensitive (`GICD_ICFGR<n>`), routed with affinity
/// routing to the one CPU with MPIDR affinity `target` (`GICD_IROUTER<n>`, written as two
/// 32-bit halves, Interrupt_Routing_Mode = 0), then `GICD_ISENABLER<n>`. The SPI is disabled
/// (`GICD_ICENABLER<n>`, then RWP) while it is reconfigured.
pub fn enable_spi(intid: u32, priority: u8, target: u64) -> Result<(), GicError> {
    let irouter = gic_abi::irouter_offset(intid).map_err(GicError::WrongKind)?;
    let gicd = GIC.get().ok_or(GicError::NotInitialised)?.gicd;
    // GICD_TYPER.ITLinesNumber (4:0): the distributor implements INTIDs below 32 * (N + 1).
    let limit = 32 * ((read32(gicd + GICD_TYPER) & 0x1f) + 1);
    if intid >= limit {
        return Err(GicError::NotImplemented { intid, limit });
    }
    let bit = gic_abi::bit_field(intid);
    write32(gicd + GICD_ICENABLER + bit.offset, 1 << bit.shift);
    wait_clear(gicd + GICD_CTLR, GICD_CTLR_RWP);
    write_field(gicd + GICD_IGROUPR, bit, 1, 1);
    write_field(
        gicd + GICD_IPRIORITYR,
        gic_abi::priority_field(intid),
        8,
        u32::from(priority),
    );
    // Bit 2m+1 clear: level-sensitive.
    write_field(gicd + GICD_ICFGR, gic_abi::config_field(intid), 2, 0);
    let route = gic_abi::irouter_value(target);
    write32(gicd + GICD_IROUTER + irouter, route as u32);
    write32(gicd + GICD_IROUTER + irouter + 4, (route >> 32) as u32);
    write32(gicd + GICD_ISENABLER + bit.offset, 1 << bit.shift);
    Ok(())
}

/// Sends SGI `intid` (0-15) to the one CPU with MPIDR affinity `target` through
/// `ICC_SGI1R_EL1` (group 1). Memory writes before the call are visible to the target's
/// handler (`DSB` before the write).
pub fn send_sgi(intid: u32, target: u64) -> Result<(), GicError> {
    let value = gic_abi::sgi1r_value(intid, target).map_err(GicError::WrongKind)?;
    // SAFETY: writing ICC_SGI1R_EL1 only makes an SGI pending on the target CPU; the DSB
    // orders earlier memory writes before it, the ISB makes it take effect now.
    unsafe {
        asm!(
            "dsb sy",
            "msr icc_sgi1r_el1, {}",
            "isb",
            in(reg) value,
            options(nostack, preserves_flags)
        );
    }
    Ok(())
}

/// Registers `handler` for `intid` (on every CPU). It runs in IRQ context with IRQs masked,
/// after the acknowledge and before the end of interrupt.
pub fn set_handler(intid: u32, handler: fn(u32)) -> Result<(), GicError> {
    let slot = HANDLERS
        .get(intid as usize)
        .ok_or(GicError::BadIntid(intid))?;
    slot.store(handler as usize, Ordering::Release);
    Ok(())
}

/// Acknowledges and dispatches pending group 1 interrupts; called from the IRQ vector.
pub fn handle_irq() {
    loop {
        let intid: u64;
        // SAFETY: reading ICC_IAR1_EL1 acknowledges the highest-priority pending interrupt; the
        // matching EOI is written below.
        unsafe { asm!("mrs {}, icc_iar1_el1", out(reg) intid, options(nostack, preserves_flags)) };
        let intid = (intid & 0xff_ffff) as u32;
        if intid >= INTID_SPECIAL_FIRST {
            return;
        }
        let handler = HANDLERS
            .get(intid as usize)
            .map_or(0, |h| h.load(Ordering::Acquire));
        if handler == 0 {
            console::print_line_emergency(format_args!(
                "irq: INTID {intid} on cpu {:?} has no handler",
                smp::current_cpu_index()
            ));
        } else {
            // SAFETY: set_handler() only stores `fn(u32)` pointers in HANDLERS.
            let f: fn(u32) = unsafe { core::mem::transmute::<usize, fn(u32)>(handler) };
            f(intid);
        }
        // SAFETY: EOImode is 0, so this write drops the running priority and deactivates the
        // interrupt acknowledged above.
        unsafe {
            asm!("msr icc_eoir1_el1, {}", in(reg) u64::from(intid), options(nostack, preserves_flags));
        }
    }
}
