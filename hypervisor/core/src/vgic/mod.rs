//! A GICv3 model, one per VM, laid out like QEMU `virt`'s: the distributor at
//! [`GICD_BASE`] (64 KiB) and one redistributor per vCPU from [`GICR_BASE`], [`GICR_STRIDE`]
//! apart, each an RD_base frame followed by an SGI_base frame.
//!
//! The guest programs the distributor and redistributors through trapped MMIO
//! ([`Vgic::dist_access`], [`Vgic::redist_access`]); it takes and completes interrupts through the
//! real GICv3 virtual CPU interface (ICC_* at EL1 become ICV_*), which the monitor feeds from this
//! model through the list registers.
//!
//! # What the model presents
//! - One security state (GICD_CTLR.DS = 1) with affinity routing always on (ARE = 1, RAO/WI).
//!   GICD_CTLR.EnableGrp0 (bit 0) and EnableGrp1 (bit 1, the bit Linux writes as
//!   `GICD_CTLR_ENABLE_G1A`) gate forwarding of the two groups. RWP always reads 0.
//! - No LPIs, no ITS, no extended SPI/PPI ranges, no 1-of-N SPI routing (GICD_TYPER.No1N = 1,
//!   GICD_IROUTER.Interrupt_Routing_Mode is RAZ/WI). An SPI whose IROUTER names no vCPU stays
//!   pending and is delivered to nobody until it is rerouted.
//! - Interrupts reset to Group 1 (as KVM does, so guests that never touch IGROUPR still get
//!   IRQs, not FIQs), disabled, priority 0, level-sensitive (SGIs: edge, read-only).
//! - Unknown and reserved offsets are RAZ/WI; an access of a width a register does not support,
//!   or a misaligned one, is a [`MmioResult::Fault`].
//!
//! # Interrupt state
//! Per INTID (SGIs and PPIs per vCPU, SPIs shared): enable, group, priority, trigger
//! configuration, active, and a pending state made of two parts: an *edge latch* (set by an edge,
//! by GICD_ISPENDR, or by an SGI; cleared by acknowledgement or GICD_ICPENDR) and, for a
//! level-sensitive interrupt, the *line level* driven by the monitor. A level interrupt is
//! pending while its line is high or its latch is set; an edge interrupt while its latch is set.
//! An active SPI remembers the vCPU that acknowledged it (its *owner*).
//!
//! # List-register protocol
//! The list registers are a cache of this model that lives only while a vCPU runs:
//!
//! 1. **Before entering a vCPU** the arch layer calls [`Vgic::fill_lrs`]`(vcpu, nr_lrs)` with
//!    `nr_lrs` = ICH_VTR_EL2.ListRegs + 1 and writes the returned [`CpuIfState`] to the hardware:
//!    `lrs[0..nr_lrs]` to `ICH_LR<n>_EL2` (unused ones are 0 and must be written too, so stale
//!    maintenance status goes away), `hcr` to ICH_HCR_EL2, `vmcr` to ICH_VMCR_EL2, `ap0r`/`ap1r`
//!    to `ICH_AP0R<n>_EL2`/`ICH_AP1R<n>_EL2` (as many as ICH_VTR_EL2.PREbits implements).
//! 2. **After every exit of that vCPU** (any exception to EL2, including the maintenance
//!    interrupt, PPI 25) the arch layer reads the same registers back into a [`CpuIfState`] and
//!    calls [`Vgic::sync_from_lrs`]. The model then owns all of the vCPU's interrupt state again:
//!    MMIO emulation, injection, fork and reset all act on it alone.
//!
//! `fill_lrs` moves state *into* the LRs: the highest-priority work for the vCPU, active
//! interrupts it owns first (they must be in an LR for the guest's EOI to find them), then
//! pending, enabled interrupts of an enabled group routed to it, by priority then INTID. Each LR
//! is encoded as: State (bits 63:62; 01 pending, 10 active, 11 pending and active), HW (61) = 0,
//! Group (60) from IGROUPR, Priority (55:48), EOI (41) and vINTID (31:0). The EOI bit, which for
//! a virtual interrupt with HW = 0 asks for a maintenance interrupt when the guest deactivates it,
//! is set on every level-sensitive interrupt: the exit lets the model re-sample the line and pend
//! the interrupt again if it is still high. A level interrupt that is active is presented as
//! active only (never pending+active), for the same reason. Edge interrupts need no exit on
//! deactivation; pending+active is presented as such.
//!
//! `sync_from_lrs` moves state back: an LR whose State is 0 has been acknowledged and
//! deactivated; pending bits left in an LR go back to the latch (for level interrupts only if the
//! latch, not the line, had made them pending); active bits make the interrupt active with this
//! vCPU as owner. Guest register writes made by other vCPUs while the interrupt sat in an LR
//! (GICD_ICPENDR, GICD_ICACTIVER) win over what the LR says.
//!
//! ICH_HCR_EL2 returned by `fill_lrs` always has En (bit 0); it also has
//! - UIE (bit 1) when pending interrupts did not fit: the guest exits once at most one LR is
//!   still in use, and the next fill brings the rest (with a single LR, UIE would fire at once, so
//!   instead every LR gets the EOI bit and each deactivation exits);
//! - LRENPIE (bit 2) when active interrupts did not fit: an EOI that finds no LR bumps
//!   ICH_HCR_EL2.EOIcount (bits 31:27) and raises the maintenance interrupt; `sync_from_lrs`
//!   deactivates that many of the vCPU's active interrupts that were not in LRs, highest priority
//!   first (the order an EOImode = 0 guest completes nested interrupts in).
//!
//! Calling `fill_lrs` again without a `sync_from_lrs` in between takes the previous LR contents
//! back as written. Fork and reset must see every vCPU synced: take the snapshot between
//! `sync_from_lrs` and the next `fill_lrs`.
//!
//! # Injection
//! The monitor drives level sources ([`Vgic::set_irq_level`]: the virtual timer PPI 27, the UART
//! SPI), edge sources ([`Vgic::inject_edge`]) and the guest's trapped writes to
//! ICC_SGI1R_EL1, ICC_ASGI1R_EL1 and ICC_SGI0R_EL1 ([`Vgic::send_sgi_from`]). Each call answers which vCPU(s) may now have something new to take or
//! to drop, so the monitor can kick a running vCPU out to refill its LRs, and
//! [`Vgic::has_pending`] tells the scheduler whether a vCPU waiting in WFI should run.

pub mod regs;
#[cfg(test)]
mod tests;

use alloc::vec::Vec;
use core::fmt;

use crate::addr::Ipa;
use crate::mmio::MmioRegion;
use crate::shared::TryClone;

#[allow(unused_imports)] // for the doc links above
use crate::mmio::MmioResult;

/// IPA of the distributor on QEMU `virt`.
pub const GICD_BASE: u64 = 0x0800_0000;
/// Size of the distributor frame.
pub const GICD_SIZE: u64 = 0x1_0000;
/// IPA of the first redistributor on QEMU `virt`.
pub const GICR_BASE: u64 = 0x080A_0000;
/// Distance between two vCPUs' redistributors (RD_base + SGI_base frames).
pub const GICR_STRIDE: u64 = 0x2_0000;
/// Offset of the SGI_base frame inside a redistributor.
pub const GICR_SGI_BASE: u64 = 0x1_0000;

/// Most vCPUs a VM may have in this model.
pub const MAX_VCPUS: usize = 64;
/// Most list registers the architecture allows (ICH_VTR_EL2.ListRegs is 4 bits).
pub const MAX_LRS: usize = 16;
/// INTIDs 0-31 are private to each vCPU (SGIs 0-15, PPIs 16-31).
pub const NR_PRIVATE_IRQS: u32 = 32;
/// INTIDs 0-15 are SGIs.
pub const NR_SGIS: u32 = 16;
/// Default number of implemented INTIDs (private + SPIs).
pub const DEFAULT_NR_IRQS: u32 = 256;
/// INTIDs 1020-1023 are special; SPIs end below.
pub const FIRST_SPECIAL_INTID: u32 = 1020;
/// The GIC maintenance interrupt on QEMU `virt` (a PPI the monitor itself receives).
pub const MAINTENANCE_INTID: u32 = 25;
/// The EL1 virtual timer PPI.
pub const VTIMER_INTID: u32 = 27;

/// `ICH_LR<n>_EL2`.State, bits 63:62.
pub const ICH_LR_STATE_SHIFT: u32 = 62;
/// `ICH_LR<n>_EL2`.State = pending.
pub const ICH_LR_PENDING: u64 = 1 << 62;
/// `ICH_LR<n>_EL2`.State = active.
pub const ICH_LR_ACTIVE: u64 = 1 << 63;
/// `ICH_LR<n>_EL2`.HW: the virtual interrupt is tied to a physical one.
pub const ICH_LR_HW: u64 = 1 << 61;
/// `ICH_LR<n>_EL2`.Group: Group 1.
pub const ICH_LR_GROUP: u64 = 1 << 60;
/// `ICH_LR<n>_EL2`.Priority, bits 55:48.
pub const ICH_LR_PRIORITY_SHIFT: u32 = 48;
/// `ICH_LR<n>_EL2`.EOI (with HW = 0): maintenance interrupt when the guest deactivates it.
pub const ICH_LR_EOI: u64 = 1 << 41;
/// `ICH_LR<n>_EL2`.vINTID, bits 31:0.
pub const ICH_LR_VINTID_MASK: u64 = 0xffff_ffff;

/// ICH_HCR_EL2.En: the virtual CPU interface is enabled.
pub const ICH_HCR_EN: u64 = 1 << 0;
/// ICH_HCR_EL2.UIE: maintenance interrupt when at most one LR holds a valid interrupt.
pub const ICH_HCR_UIE: u64 = 1 << 1;
/// ICH_HCR_EL2.LRENPIE: maintenance interrupt while EOIcount is not 0.
pub const ICH_HCR_LRENPIE: u64 = 1 << 2;
/// ICH_HCR_EL2.NPIE: maintenance interrupt when no LR is in the pending state.
pub const ICH_HCR_NPIE: u64 = 1 << 3;
/// ICH_HCR_EL2.EOIcount, bits 31:27.
pub const ICH_HCR_EOICOUNT_SHIFT: u32 = 27;
/// Mask of ICH_HCR_EL2.EOIcount (after shifting).
pub const ICH_HCR_EOICOUNT_MASK: u64 = 0x1f;

/// ICH_VMCR_EL2.VENG0: virtual Group 0 enable.
pub const ICH_VMCR_VENG0: u64 = 1 << 0;
/// ICH_VMCR_EL2.VENG1: virtual Group 1 enable.
pub const ICH_VMCR_VENG1: u64 = 1 << 1;
/// ICH_VMCR_EL2.VPMR, bits 31:24: the virtual priority mask.
pub const ICH_VMCR_VPMR_SHIFT: u32 = 24;

/// The defined fields of ICH_VMCR_EL2: VPMR (31:24), VBPR0 (23:21), VBPR1 (20:18), VEOIM (9),
/// VCBPR (4), VFIQEn (3), VAckCtl (2), VENG1 (1), VENG0 (0); the rest is RES0.
pub const ICH_VMCR_DEFINED: u64 = 0xfffc_021f;

/// Affinity fields of an MPIDR_EL1 / GICD_IROUTER value: Aff3 (39:32), Aff2, Aff1, Aff0 (23:0).
pub const AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// The MPIDR affinity QEMU `virt` gives vCPU `index` with a GICv3: 16 CPUs per cluster,
/// Aff0 = index % 16, Aff1 = index / 16. (VMPIDR_EL2 is this value with bit 31, RES1, set.)
pub const fn qemu_virt_mpidr(index: usize) -> u64 {
    let i = index as u64;
    ((i / 16) & 0xff) << 8 | (i % 16)
}

/// Errors from the vGIC's monitor-facing API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VgicError {
    /// The vCPU index is not one of this VM's.
    InvalidVcpu(usize),
    /// The INTID is not implemented (or is not usable for that call).
    InvalidIntid(u32),
    /// `nr_lrs` must be 1..=16.
    InvalidLrCount(usize),
    /// The configuration cannot be built (message says why).
    InvalidConfig(&'static str),
    /// A saved state (a snapshot being restored) breaks an invariant of the model (message
    /// says which); see [`Vgic::validate`].
    InvalidState(&'static str),
    /// A list register read back held another vINTID than the one written.
    LrMismatch {
        /// List register index.
        lr: usize,
        /// vINTID the model had written.
        expected: u32,
        /// vINTID found.
        found: u32,
    },
}

impl fmt::Display for VgicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidVcpu(v) => write!(f, "no vCPU {v} in this VM"),
            Self::InvalidIntid(i) => write!(f, "INTID {i} not usable here"),
            Self::InvalidLrCount(n) => write!(f, "{n} list registers: must be 1 to 16"),
            Self::InvalidConfig(why) => write!(f, "invalid vGIC configuration: {why}"),
            Self::InvalidState(why) => write!(f, "invalid vGIC state: {why}"),
            Self::LrMismatch {
                lr,
                expected,
                found,
            } => write!(
                f,
                "ICH_LR{lr}_EL2 holds vINTID {found}, the vGIC wrote {expected}"
            ),
        }
    }
}

/// Shape of a VM's GIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VgicConfig {
    /// MPIDR affinity (Aff3..Aff0 as in MPIDR_EL1) of each vCPU, by vCPU index.
    pub mpidrs: Vec<u64>,
    /// Number of implemented INTIDs including the 32 private ones: a multiple of 32, 32..=1024
    /// (INTIDs 1020-1023 are never implemented).
    pub nr_irqs: u32,
}

impl VgicConfig {
    /// `nr_vcpus` vCPUs with QEMU `virt` affinities and [`DEFAULT_NR_IRQS`] INTIDs.
    pub fn qemu_virt(nr_vcpus: usize) -> Self {
        Self {
            mpidrs: (0..nr_vcpus).map(qemu_virt_mpidr).collect(),
            nr_irqs: DEFAULT_NR_IRQS,
        }
    }
}

/// The virtual CPU interface registers of one vCPU, as the arch layer writes them on entry
/// ([`Vgic::fill_lrs`]) and reads them on exit ([`Vgic::sync_from_lrs`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuIfState {
    /// How many list registers the hardware implements (ICH_VTR_EL2.ListRegs + 1).
    pub nr_lrs: usize,
    /// `ICH_LR<n>_EL2`, n < `nr_lrs`.
    pub lrs: [u64; MAX_LRS],
    /// ICH_HCR_EL2.
    pub hcr: u64,
    /// ICH_VMCR_EL2 (the guest's priority mask, binary points, group enables, EOI mode).
    pub vmcr: u64,
    /// `ICH_AP0R<n>_EL2`.
    pub ap0r: [u32; 4],
    /// `ICH_AP1R<n>_EL2`.
    pub ap1r: [u32; 4],
}

/// State field of a list register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrState {
    /// 0b00: the LR holds no interrupt.
    Invalid,
    /// 0b01.
    Pending,
    /// 0b10.
    Active,
    /// 0b11.
    PendingActive,
}

impl LrState {
    /// True for Pending and PendingActive.
    pub const fn is_pending(self) -> bool {
        matches!(self, Self::Pending | Self::PendingActive)
    }
    /// True for Active and PendingActive.
    pub const fn is_active(self) -> bool {
        matches!(self, Self::Active | Self::PendingActive)
    }
    const fn from_bits(pending: bool, active: bool) -> Self {
        match (pending, active) {
            (false, false) => Self::Invalid,
            (true, false) => Self::Pending,
            (false, true) => Self::Active,
            (true, true) => Self::PendingActive,
        }
    }
}

/// An `ICH_LR<n>_EL2` value with field accessors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListRegister(pub u64);

impl ListRegister {
    /// A virtual (HW = 0) list register entry.
    pub const fn new(vintid: u32, priority: u8, group1: bool, state: LrState, eoi: bool) -> Self {
        let mut v = vintid as u64 | (priority as u64) << ICH_LR_PRIORITY_SHIFT;
        if group1 {
            v |= ICH_LR_GROUP;
        }
        if eoi {
            v |= ICH_LR_EOI;
        }
        if state.is_pending() {
            v |= ICH_LR_PENDING;
        }
        if state.is_active() {
            v |= ICH_LR_ACTIVE;
        }
        Self(v)
    }
    /// The State field.
    pub const fn state(self) -> LrState {
        LrState::from_bits(self.0 & ICH_LR_PENDING != 0, self.0 & ICH_LR_ACTIVE != 0)
    }
    /// The same entry with another State.
    pub const fn with_state(self, state: LrState) -> Self {
        let base = self.0 & !(ICH_LR_PENDING | ICH_LR_ACTIVE);
        let mut v = base;
        if state.is_pending() {
            v |= ICH_LR_PENDING;
        }
        if state.is_active() {
            v |= ICH_LR_ACTIVE;
        }
        Self(v)
    }
    /// The vINTID field.
    pub const fn vintid(self) -> u32 {
        (self.0 & ICH_LR_VINTID_MASK) as u32
    }
    /// The Priority field.
    pub const fn priority(self) -> u8 {
        (self.0 >> ICH_LR_PRIORITY_SHIFT) as u8
    }
    /// The Group field (true = Group 1).
    pub const fn group1(self) -> bool {
        self.0 & ICH_LR_GROUP != 0
    }
    /// The EOI field (maintenance interrupt on deactivation).
    pub const fn eoi(self) -> bool {
        self.0 & ICH_LR_EOI != 0
    }
}

/// The system register an SGI is generated through (GICv3 CPU interface, AArch64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SgiRegister {
    /// `ICC_SGI1R_EL1` (S3_0_C12_C11_5): Group 1 SGIs, or any group with GICD_CTLR.DS = 1.
    Sgi1r,
    /// `ICC_ASGI1R_EL1` (S3_0_C12_C11_6): Group 1 SGIs of the other security state.
    Asgi1r,
    /// `ICC_SGI0R_EL1` (S3_0_C12_C11_7): Group 0 SGIs.
    Sgi0r,
}

/// A set of vCPU indices (bit n = vCPU n).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuMask(pub u64);

impl VcpuMask {
    /// True when vCPU `vcpu` is in the set.
    pub const fn contains(self, vcpu: usize) -> bool {
        vcpu < 64 && self.0 & (1 << vcpu) != 0
    }
    /// True when the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The vCPU indices in the set, ascending.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..64).filter(move |&i| self.0 & (1u64 << i) != 0)
    }
    fn insert(&mut self, vcpu: usize) {
        if vcpu < 64 {
            self.0 |= 1 << vcpu;
        }
    }
}

/// The highest-priority interrupt a vCPU could take now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingIrq {
    /// Its INTID.
    pub intid: u32,
    /// Its priority (lower is more urgent).
    pub priority: u8,
}

/// Where an interrupt's state is while it sits in a list register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Residency {
    vcpu: u16,
    /// Presented as pending.
    pending: bool,
    /// Presented as active.
    active: bool,
    /// The pending state presented came from the edge latch (which was moved into the LR).
    latched: bool,
    /// GICD_ICPENDR hit it while resident: drop the LR's pending state at sync.
    pending_cleared: bool,
    /// GICD_ICACTIVER hit it while resident: drop the LR's active state at sync.
    active_cleared: bool,
}

/// The state of one INTID (one per vCPU for SGIs/PPIs, one per VM for SPIs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Irq {
    enabled: bool,
    /// Edge latch / software pending state.
    latch: bool,
    /// Input line level (level-sensitive sources).
    line: bool,
    active: bool,
    /// vCPU holding the active state (SPIs; equal to the vCPU for private interrupts).
    owner: u16,
    priority: u8,
    group1: bool,
    /// Edge-triggered (GICD_ICFGR bit 2n+1).
    edge: bool,
    /// GICD_IROUTER affinity (SPIs only).
    route: u64,
    /// vCPU index that `route` names, if any (SPIs only).
    target: Option<u16>,
    resident: Option<Residency>,
}

impl Irq {
    const fn reset(edge: bool, owner: u16) -> Self {
        Self {
            enabled: false,
            latch: false,
            line: false,
            active: false,
            owner,
            priority: 0,
            group1: true,
            edge,
            route: 0,
            target: None,
            resident: None,
        }
    }

    /// Pending in the model (not counting state that sits in an LR).
    fn pending(&self) -> bool {
        self.latch || (!self.edge && self.line)
    }

    /// Pending as a register read should show it, LR contents included.
    fn pending_view(&self) -> bool {
        self.pending()
            || self
                .resident
                .is_some_and(|r| r.pending && !r.pending_cleared)
    }

    /// Active as a register read should show it, LR contents included.
    fn active_view(&self) -> bool {
        self.active || self.resident.is_some_and(|r| r.active && !r.active_cleared)
    }
}

/// One LR the model filled: which INTID and the value written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Slot {
    intid: u32,
    lr: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct VcpuState {
    mpidr: u64,
    private: [Irq; NR_PRIVATE_IRQS as usize],
    /// GICR_WAKER.ProcessorSleep.
    processor_sleep: bool,
    slots: [Option<Slot>; MAX_LRS],
    vmcr: u64,
    ap0r: [u32; 4],
    ap1r: [u32; 4],
}

/// A candidate for a list register.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    intid: u32,
    priority: u8,
    pending: bool,
    active: bool,
}

/// The GICv3 model of one VM. `Clone` gives an exact copy of the interrupt state (fork); assign
/// a saved clone back to reset.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Vgic {
    nr_irqs: u32,
    enable_grp0: bool,
    enable_grp1: bool,
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_VCPUS>")]
    vcpus: Vec<VcpuState>,
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_SPIS>")]
    spis: Vec<Irq>,
}

/// Most SPIs: INTIDs 32 to 1019.
const MAX_SPIS: usize = (FIRST_SPECIAL_INTID - NR_PRIVATE_IRQS) as usize;

impl TryClone for Vgic {
    /// An exact copy, like `clone`, whose tables are allocated fallibly.
    fn try_clone(&self) -> Result<Self, alloc::collections::TryReserveError> {
        Ok(Self {
            nr_irqs: self.nr_irqs,
            enable_grp0: self.enable_grp0,
            enable_grp1: self.enable_grp1,
            vcpus: self.vcpus.try_clone()?,
            spis: self.spis.try_clone()?,
        })
    }
}

impl Vgic {
    /// Builds a GIC in its reset state.
    pub fn new(config: &VgicConfig) -> Result<Self, VgicError> {
        let n = config.mpidrs.len();
        if n == 0 || n > MAX_VCPUS {
            return Err(VgicError::InvalidConfig("vCPU count must be 1 to 64"));
        }
        if !config.nr_irqs.is_multiple_of(32) || !(32..=1024).contains(&config.nr_irqs) {
            return Err(VgicError::InvalidConfig(
                "nr_irqs must be a multiple of 32 from 32 to 1024",
            ));
        }
        for (i, a) in config.mpidrs.iter().enumerate() {
            if a & !AFFINITY_MASK != 0 {
                return Err(VgicError::InvalidConfig(
                    "MPIDR values may only hold affinity fields",
                ));
            }
            if config.mpidrs[..i].contains(a) {
                return Err(VgicError::InvalidConfig("two vCPUs share an MPIDR"));
            }
        }
        let vcpus = config
            .mpidrs
            .iter()
            .enumerate()
            .map(|(i, &mpidr)| VcpuState {
                mpidr,
                private: core::array::from_fn(|intid| {
                    Irq::reset((intid as u32) < NR_SGIS, i as u16)
                }),
                processor_sleep: true,
                slots: [None; MAX_LRS],
                vmcr: 0,
                ap0r: [0; 4],
                ap1r: [0; 4],
            })
            .collect();
        let nr_spis = (config.nr_irqs.min(FIRST_SPECIAL_INTID) - NR_PRIVATE_IRQS) as usize;
        let mut gic = Self {
            nr_irqs: config.nr_irqs,
            enable_grp0: false,
            enable_grp1: false,
            vcpus,
            spis: alloc::vec![Irq::reset(false, 0); nr_spis],
        };
        let target = gic.vcpu_by_affinity(0);
        for spi in &mut gic.spis {
            spi.target = target;
        }
        Ok(gic)
    }

    /// Checks every invariant the model and the list-register code rely on, for a state that
    /// was not built by [`Vgic::new`] and this model's own operations (a snapshot being
    /// restored). Nothing a register write or an injection can produce is refused; everything
    /// that could make an INTID the model does not implement reach a list register, index a
    /// vCPU that does not exist, or leave state in a list register that no vCPU holds, is:
    ///
    /// - 1 to [`MAX_VCPUS`] vCPUs; `nr_irqs` a multiple of 32 from 32 to 1024 and exactly
    ///   `nr_irqs - 32` SPIs (fewer than 1020 - 32), so every INTID a list register can be
    ///   given (private 0-31, SPI `32 + index`) is implemented and below the special 1020-1023;
    /// - MPIDRs with affinity fields only, all different;
    /// - per vCPU: no list register filled (the state is taken synced, between
    ///   `sync_from_lrs` and `fill_lrs`), ICH_VMCR_EL2 only its defined fields (VPMR, VBPR0,
    ///   VBPR1, VEOIM, VCBPR, VFIQEn, VAckCtl, VENG1, VENG0);
    /// - per INTID: not resident in a list register; the active owner an existing vCPU (the
    ///   vCPU itself for SGIs and PPIs); SGIs edge-triggered (GICR_ICFGR0 is read-only);
    ///   private interrupts with no route; an SPI's route only affinity bits and its cached
    ///   target the vCPU that route names, as a GICD_IROUTER write would have set it.
    ///
    /// Priorities (8 bits, all implemented) and the one-bit enable, group, pending, line and
    /// active states hold any value. ICH_AP0R/AP1R are the guest's active-priority bits, as its
    /// own acknowledges could have left them: any value.
    pub fn validate(&self) -> Result<(), VgicError> {
        let bad = VgicError::InvalidState;
        let n = self.vcpus.len();
        if n == 0 || n > MAX_VCPUS {
            return Err(bad("vCPU count must be 1 to 64"));
        }
        if !self.nr_irqs.is_multiple_of(32) || !(32..=1024).contains(&self.nr_irqs) {
            return Err(bad("nr_irqs must be a multiple of 32 from 32 to 1024"));
        }
        let nr_spis = (self.nr_irqs.min(FIRST_SPECIAL_INTID) - NR_PRIVATE_IRQS) as usize;
        if self.spis.len() != nr_spis {
            return Err(bad("the SPI table does not match nr_irqs"));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.mpidr & !AFFINITY_MASK != 0 {
                return Err(bad("an MPIDR holds more than affinity fields"));
            }
            if self.vcpus[..i].iter().any(|w| w.mpidr == v.mpidr) {
                return Err(bad("two vCPUs share an MPIDR"));
            }
            if v.slots.iter().any(Option::is_some) {
                return Err(bad("list registers of a vCPU are still filled"));
            }
            if v.vmcr & !ICH_VMCR_DEFINED != 0 {
                return Err(bad("ICH_VMCR_EL2 holds undefined bits"));
            }
            for (intid, irq) in v.private.iter().enumerate() {
                if irq.resident.is_some() {
                    return Err(bad("an interrupt is resident in a list register"));
                }
                if irq.owner as usize != i {
                    return Err(bad("an SGI or PPI is owned by another vCPU"));
                }
                if (intid as u32) < NR_SGIS && !irq.edge {
                    return Err(bad("an SGI is level-sensitive"));
                }
                if irq.route != 0 || irq.target.is_some() {
                    return Err(bad("an SGI or PPI has a route"));
                }
            }
        }
        for irq in &self.spis {
            if irq.resident.is_some() {
                return Err(bad("an interrupt is resident in a list register"));
            }
            if irq.owner as usize >= n {
                return Err(bad("an SPI is owned by a vCPU that does not exist"));
            }
            if irq.route & !AFFINITY_MASK != 0 {
                return Err(bad("an SPI route holds more than affinity fields"));
            }
            if irq.target != self.vcpu_by_affinity(irq.route) {
                return Err(bad("an SPI's target is not the vCPU its route names"));
            }
        }
        Ok(())
    }

    /// Heap bytes a copy of this GIC takes (its tables plus the value itself): what a fork's
    /// first write to a shared vGIC allocates.
    pub fn copy_bytes(&self) -> usize {
        core::mem::size_of::<Self>()
            + self.vcpus.len() * core::mem::size_of::<VcpuState>()
            + self.spis.len() * core::mem::size_of::<Irq>()
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// Number of implemented INTIDs as GICD_TYPER reports them (private + SPIs).
    pub fn nr_irqs(&self) -> u32 {
        self.nr_irqs
    }

    /// MPIDR affinity of vCPU `vcpu`.
    pub fn vcpu_mpidr(&self, vcpu: usize) -> Option<u64> {
        self.vcpus.get(vcpu).map(|v| v.mpidr)
    }

    /// The distributor's IPA window.
    pub fn dist_region(&self) -> MmioRegion {
        MmioRegion::new(Ipa(GICD_BASE), GICD_SIZE)
    }

    /// The redistributors' IPA window (one [`GICR_STRIDE`] per vCPU).
    pub fn redist_region(&self) -> MmioRegion {
        MmioRegion::new(Ipa(GICR_BASE), GICR_STRIDE * self.vcpus.len() as u64)
    }

    fn vcpu_by_affinity(&self, aff: u64) -> Option<u16> {
        let aff = aff & AFFINITY_MASK;
        self.vcpus
            .iter()
            .position(|v| v.mpidr == aff)
            .map(|i| i as u16)
    }

    fn check_vcpu(&self, vcpu: usize) -> Result<(), VgicError> {
        if vcpu < self.vcpus.len() {
            Ok(())
        } else {
            Err(VgicError::InvalidVcpu(vcpu))
        }
    }

    /// True when `intid` is an implemented INTID.
    fn implemented(&self, intid: u32) -> bool {
        intid < NR_PRIVATE_IRQS + self.spis.len() as u32
    }

    fn irq(&self, vcpu: usize, intid: u32) -> Option<&Irq> {
        if intid < NR_PRIVATE_IRQS {
            self.vcpus.get(vcpu)?.private.get(intid as usize)
        } else {
            self.spis.get((intid - NR_PRIVATE_IRQS) as usize)
        }
    }

    fn irq_mut(&mut self, vcpu: usize, intid: u32) -> Option<&mut Irq> {
        if intid < NR_PRIVATE_IRQS {
            self.vcpus.get_mut(vcpu)?.private.get_mut(intid as usize)
        } else {
            self.spis.get_mut((intid - NR_PRIVATE_IRQS) as usize)
        }
    }

    fn group_enabled(&self, group1: bool) -> bool {
        if group1 {
            self.enable_grp1
        } else {
            self.enable_grp0
        }
    }

    /// The vCPU that should look at `intid` after its state changed: the one whose LRs hold it,
    /// else the owner of its active state, else (private) its vCPU or (SPI) its route target.
    fn interested_vcpu(&self, vcpu: usize, intid: u32) -> Option<usize> {
        let irq = self.irq(vcpu, intid)?;
        if let Some(r) = irq.resident {
            return Some(r.vcpu as usize);
        }
        if intid < NR_PRIVATE_IRQS {
            return Some(vcpu);
        }
        if irq.active {
            return Some(irq.owner as usize);
        }
        irq.target.map(usize::from)
    }

    /// Drives the input line of a level-sensitive source: a PPI (`intid` 16-31) of vCPU `vcpu`,
    /// or an SPI (`vcpu` is ignored). If the interrupt is configured edge-triggered, a rising
    /// line latches an edge. Answers the vCPU to kick when the level changed.
    pub fn set_irq_level(
        &mut self,
        intid: u32,
        vcpu: usize,
        level: bool,
    ) -> Result<Option<usize>, VgicError> {
        if intid < NR_SGIS || !self.implemented(intid) {
            return Err(VgicError::InvalidIntid(intid));
        }
        if intid < NR_PRIVATE_IRQS {
            self.check_vcpu(vcpu)?;
        }
        let Some(irq) = self.irq_mut(vcpu, intid) else {
            return Err(VgicError::InvalidIntid(intid));
        };
        let old = irq.line;
        irq.line = level;
        if old == level {
            return Ok(None);
        }
        if irq.edge && level {
            irq.latch = true;
        }
        Ok(self.interested_vcpu(vcpu, intid))
    }

    /// Latches an edge on `intid` (of vCPU `vcpu` for SGIs/PPIs; `vcpu` is ignored for SPIs).
    /// Answers the vCPU to kick.
    pub fn inject_edge(&mut self, intid: u32, vcpu: usize) -> Result<Option<usize>, VgicError> {
        if !self.implemented(intid) {
            return Err(VgicError::InvalidIntid(intid));
        }
        if intid < NR_PRIVATE_IRQS {
            self.check_vcpu(vcpu)?;
        }
        let Some(irq) = self.irq_mut(vcpu, intid) else {
            return Err(VgicError::InvalidIntid(intid));
        };
        irq.latch = true;
        Ok(self.interested_vcpu(vcpu, intid))
    }

    /// Emulates a write of `value` to ICC_SGI1R_EL1 by vCPU `from` ([`Vgic::send_sgi_from`]
    /// with [`SgiRegister::Sgi1r`]). Answers the vCPUs that got it.
    pub fn send_sgi(&mut self, from: usize, value: u64) -> Result<VcpuMask, VgicError> {
        self.send_sgi_from(from, value, SgiRegister::Sgi1r)
    }

    /// Emulates a write of `value` to one of the SGI generation registers by vCPU `from`:
    /// TargetList (15:0), Aff1 (23:16), INTID (27:24), Aff2 (39:32), IRM (40), RS (47:44), Aff3
    /// (55:48). With IRM = 1 the SGI goes to every vCPU but the sender.
    ///
    /// Which targets take it depends on the register and on the group each target gave the SGI
    /// (GICR_IGROUPR0), as the GICv3 architecture says for an access from Non-secure EL1 with
    /// GICD_CTLR.DS = 1 (one security state, which this distributor always has; IHI 0069, "Use
    /// of control registers for SGI forwarding"): ICC_SGI1R_EL1 forwards to a target whatever
    /// group it configured; ICC_SGI0R_EL1 only to a target that made the SGI Group 0; and
    /// ICC_ASGI1R_EL1, whose "other security state" does not exist with DS = 1, behaves as
    /// ICC_SGI0R_EL1 (KVM's vGIC reads the table the same way). Answers the vCPUs that got it.
    pub fn send_sgi_from(
        &mut self,
        from: usize,
        value: u64,
        register: SgiRegister,
    ) -> Result<VcpuMask, VgicError> {
        self.check_vcpu(from)?;
        let intid = ((value >> 24) & 0xf) as usize;
        let irm = value & (1 << 40) != 0;
        let upper = ((value >> 48) & 0xff) << 32
            | ((value >> 32) & 0xff) << 16
            | ((value >> 16) & 0xff) << 8;
        let rs = (value >> 44) & 0xf;
        let list = value & 0xffff;
        let mut mask = VcpuMask::default();
        for (i, v) in self.vcpus.iter_mut().enumerate() {
            let hit = if irm {
                i != from
            } else {
                let aff0 = v.mpidr & 0xff;
                v.mpidr & !0xff == upper && aff0 / 16 == rs && list & (1 << (aff0 % 16)) != 0
            };
            let forwarded = match register {
                SgiRegister::Sgi1r => true,
                SgiRegister::Sgi0r | SgiRegister::Asgi1r => !v.private[intid].group1,
            };
            if hit && forwarded {
                v.private[intid].latch = true;
                mask.insert(i);
            }
        }
        Ok(mask)
    }

    /// The highest-priority interrupt vCPU `vcpu` could acknowledge now: pending, not active,
    /// enabled, its group enabled in GICD_CTLR, routed to this vCPU (ties go to the lower INTID).
    /// The guest's own priority mask and group enables (ICH_VMCR_EL2) are not applied, so a
    /// vCPU may be woken for an interrupt it then masks; it is never left asleep wrongly.
    pub fn pending_for(&self, vcpu: usize) -> Option<PendingIrq> {
        let v = self.vcpus.get(vcpu)?;
        let mut best: Option<PendingIrq> = None;
        let mut consider = |intid: u32, irq: &Irq, routed_here: bool| {
            let deliverable = match irq.resident {
                Some(r) => r.vcpu as usize == vcpu && r.pending && !r.active && !r.pending_cleared,
                None => {
                    routed_here
                        && !irq.active
                        && irq.pending()
                        && irq.enabled
                        && self.group_enabled(irq.group1)
                }
            };
            if deliverable && best.is_none_or(|b| irq.priority < b.priority) {
                best = Some(PendingIrq {
                    intid,
                    priority: irq.priority,
                });
            }
        };
        for (i, irq) in v.private.iter().enumerate() {
            consider(i as u32, irq, true);
        }
        for (i, irq) in self.spis.iter().enumerate() {
            let here = irq.target == Some(vcpu as u16);
            consider(i as u32 + NR_PRIVATE_IRQS, irq, here);
        }
        best
    }

    /// True when vCPU `vcpu` has an interrupt to take (see [`Vgic::pending_for`]): a vCPU in WFI
    /// should be made runnable.
    pub fn has_pending(&self, vcpu: usize) -> bool {
        self.pending_for(vcpu).is_some()
    }

    fn candidates(&self, vcpu: usize) -> Vec<Candidate> {
        let mut out = Vec::new();
        let Some(v) = self.vcpus.get(vcpu) else {
            return out;
        };
        let mut consider = |intid: u32, irq: &Irq, routed_here: bool| {
            if irq.resident.is_some() {
                return;
            }
            let owned_active = irq.active && irq.owner as usize == vcpu;
            let can_pend = irq.pending() && irq.enabled && self.group_enabled(irq.group1);
            if owned_active {
                out.push(Candidate {
                    intid,
                    priority: irq.priority,
                    pending: can_pend && irq.edge,
                    active: true,
                });
            } else if !irq.active && can_pend && routed_here {
                out.push(Candidate {
                    intid,
                    priority: irq.priority,
                    pending: true,
                    active: false,
                });
            }
        };
        for (i, irq) in v.private.iter().enumerate() {
            consider(i as u32, irq, true);
        }
        for (i, irq) in self.spis.iter().enumerate() {
            let here = irq.target == Some(vcpu as u16);
            consider(i as u32 + NR_PRIVATE_IRQS, irq, here);
        }
        out
    }

    /// Takes an LR's contents back into the model (see the module docs).
    fn unload(&mut self, vcpu: usize, intid: u32, lr: ListRegister) {
        let Some(irq) = self.irq_mut(vcpu, intid) else {
            return;
        };
        let Some(res) = irq.resident else {
            return;
        };
        if res.vcpu as usize != vcpu {
            return;
        }
        irq.resident = None;
        let state = lr.state();
        let pending = state.is_pending() && !res.pending_cleared;
        let active = state.is_active() && !res.active_cleared;
        if pending && (irq.edge || res.latched) {
            irq.latch = true;
        }
        if active {
            irq.active = true;
            irq.owner = vcpu as u16;
        }
    }

    /// Builds the virtual CPU interface contents for entering vCPU `vcpu` on hardware with
    /// `nr_lrs` list registers (see the module docs for the protocol).
    pub fn fill_lrs(&mut self, vcpu: usize, nr_lrs: usize) -> Result<CpuIfState, VgicError> {
        self.check_vcpu(vcpu)?;
        if nr_lrs == 0 || nr_lrs > MAX_LRS {
            return Err(VgicError::InvalidLrCount(nr_lrs));
        }
        // A fill without a sync since the last one: take the old contents back as written.
        for slot in 0..MAX_LRS {
            if let Some(s) = self.vcpus[vcpu].slots[slot].take() {
                self.unload(vcpu, s.intid, ListRegister(s.lr));
            }
        }
        let mut cands = self.candidates(vcpu);
        cands.sort_unstable_by_key(|c| (!c.active, c.priority, c.intid));
        let overflow = cands.get(nr_lrs..).unwrap_or(&[]);
        let active_overflow = overflow.iter().any(|c| c.active);
        let pending_overflow = overflow.iter().any(|c| c.pending);
        let eoi_all = pending_overflow && nr_lrs == 1;

        let mut out = CpuIfState {
            nr_lrs,
            hcr: ICH_HCR_EN,
            ..CpuIfState::default()
        };
        if pending_overflow && !eoi_all {
            out.hcr |= ICH_HCR_UIE;
        }
        if active_overflow {
            out.hcr |= ICH_HCR_LRENPIE;
        }
        for (slot, c) in cands.iter().take(nr_lrs).enumerate() {
            let Some(irq) = self.irq_mut(vcpu, c.intid) else {
                continue;
            };
            let latched = c.pending && irq.latch;
            if c.pending {
                irq.latch = false;
            }
            if c.active {
                irq.active = false;
            }
            let lr = ListRegister::new(
                c.intid,
                irq.priority,
                irq.group1,
                LrState::from_bits(c.pending, c.active),
                !irq.edge || eoi_all,
            );
            irq.resident = Some(Residency {
                vcpu: vcpu as u16,
                pending: c.pending,
                active: c.active,
                latched,
                pending_cleared: false,
                active_cleared: false,
            });
            self.vcpus[vcpu].slots[slot] = Some(Slot {
                intid: c.intid,
                lr: lr.0,
            });
            out.lrs[slot] = lr.0;
        }
        let v = &self.vcpus[vcpu];
        out.vmcr = v.vmcr;
        out.ap0r = v.ap0r;
        out.ap1r = v.ap1r;
        Ok(out)
    }

    /// Takes back the virtual CPU interface contents read at an exit of vCPU `vcpu` (see the
    /// module docs). All state is taken back even when an LR's vINTID does not match what was
    /// written; that case is then reported as [`VgicError::LrMismatch`].
    pub fn sync_from_lrs(&mut self, vcpu: usize, cpuif: &CpuIfState) -> Result<(), VgicError> {
        self.check_vcpu(vcpu)?;
        {
            let v = &mut self.vcpus[vcpu];
            v.vmcr = cpuif.vmcr;
            v.ap0r = cpuif.ap0r;
            v.ap1r = cpuif.ap1r;
        }
        // EOIs that found no LR: they completed active interrupts that were left out of the LRs,
        // most urgent first.
        let eoicount = (cpuif.hcr >> ICH_HCR_EOICOUNT_SHIFT) & ICH_HCR_EOICOUNT_MASK;
        for _ in 0..eoicount {
            let Some(intid) = self.highest_unlisted_active(vcpu) else {
                break;
            };
            if let Some(irq) = self.irq_mut(vcpu, intid) {
                irq.active = false;
            }
        }
        let mut result = Ok(());
        for slot in 0..MAX_LRS {
            let Some(s) = self.vcpus[vcpu].slots[slot].take() else {
                continue;
            };
            let lr = if slot < cpuif.nr_lrs.min(MAX_LRS) {
                ListRegister(cpuif.lrs[slot])
            } else {
                ListRegister(s.lr)
            };
            if lr.state() != LrState::Invalid && lr.vintid() != s.intid && result.is_ok() {
                result = Err(VgicError::LrMismatch {
                    lr: slot,
                    expected: s.intid,
                    found: lr.vintid(),
                });
            }
            self.unload(vcpu, s.intid, lr);
        }
        result
    }

    fn highest_unlisted_active(&self, vcpu: usize) -> Option<u32> {
        let v = self.vcpus.get(vcpu)?;
        let private = v.private.iter().enumerate().map(|(i, irq)| (i as u32, irq));
        let spis = self
            .spis
            .iter()
            .enumerate()
            .map(|(i, irq)| (i as u32 + NR_PRIVATE_IRQS, irq));
        private
            .chain(spis)
            .filter(|(_, irq)| irq.active && irq.owner as usize == vcpu && irq.resident.is_none())
            .min_by_key(|(intid, irq)| (irq.priority, *intid))
            .map(|(intid, _)| intid)
    }

    /// True when some of vCPU `vcpu`'s state sits in list registers (a fill without a sync).
    pub fn lrs_loaded(&self, vcpu: usize) -> bool {
        self.vcpus
            .get(vcpu)
            .is_some_and(|v| v.slots.iter().any(Option::is_some))
    }
}
