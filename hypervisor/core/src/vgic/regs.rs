//! Distributor and redistributor register emulation, and the register offsets and bits it uses.

use super::{
    Vgic, AFFINITY_MASK, FIRST_SPECIAL_INTID, GICR_SGI_BASE, GICR_STRIDE, NR_PRIVATE_IRQS, NR_SGIS,
};
use crate::mmio::{MmioAccess, MmioResult};

/// Distributor control register.
pub const GICD_CTLR: u64 = 0x0000;
/// Interrupt controller type register.
pub const GICD_TYPER: u64 = 0x0004;
/// Implementer identification register.
pub const GICD_IIDR: u64 = 0x0008;
/// Interrupt controller type register 2.
pub const GICD_TYPER2: u64 = 0x000c;
/// Interrupt group registers.
pub const GICD_IGROUPR: u64 = 0x0080;
/// Interrupt set-enable registers.
pub const GICD_ISENABLER: u64 = 0x0100;
/// Interrupt clear-enable registers.
pub const GICD_ICENABLER: u64 = 0x0180;
/// Interrupt set-pending registers.
pub const GICD_ISPENDR: u64 = 0x0200;
/// Interrupt clear-pending registers.
pub const GICD_ICPENDR: u64 = 0x0280;
/// Interrupt set-active registers.
pub const GICD_ISACTIVER: u64 = 0x0300;
/// Interrupt clear-active registers.
pub const GICD_ICACTIVER: u64 = 0x0380;
/// Interrupt priority registers (byte-accessible).
pub const GICD_IPRIORITYR: u64 = 0x0400;
/// Interrupt processor targets registers (RAZ/WI with affinity routing).
pub const GICD_ITARGETSR: u64 = 0x0800;
/// Interrupt configuration registers.
pub const GICD_ICFGR: u64 = 0x0c00;
/// Interrupt routing registers (64-bit, INTID n at 0x6000 + 8n).
pub const GICD_IROUTER: u64 = 0x6000;
/// Peripheral ID2 register (ArchRev in bits 7:4).
pub const GICD_PIDR2: u64 = 0xffe8;

/// GICD_CTLR.EnableGrp0 (one security state).
pub const GICD_CTLR_ENABLE_GRP0: u32 = 1 << 0;
/// GICD_CTLR.EnableGrp1 (one security state; Linux's `GICD_CTLR_ENABLE_G1A`).
pub const GICD_CTLR_ENABLE_GRP1: u32 = 1 << 1;
/// GICD_CTLR.ARE: affinity routing enabled (RAO/WI here).
pub const GICD_CTLR_ARE: u32 = 1 << 4;
/// GICD_CTLR.DS: one security state (RAO/WI here).
pub const GICD_CTLR_DS: u32 = 1 << 6;
/// GICD_CTLR.RWP: register write pending (always 0 here).
pub const GICD_CTLR_RWP: u32 = 1 << 31;

/// GICD_TYPER.IDbits field position (bits 23:19): INTID bits minus one.
pub const GICD_TYPER_IDBITS_SHIFT: u32 = 19;
/// GICD_TYPER.A3V: Aff3 supported.
pub const GICD_TYPER_A3V: u32 = 1 << 24;
/// GICD_TYPER.No1N: 1-of-N SPI routing not supported.
pub const GICD_TYPER_NO1N: u32 = 1 << 25;

/// GICR_CTLR (RD_base).
pub const GICR_CTLR: u64 = 0x0000;
/// GICR_IIDR (RD_base).
pub const GICR_IIDR: u64 = 0x0004;
/// GICR_TYPER (RD_base, 64-bit).
pub const GICR_TYPER: u64 = 0x0008;
/// GICR_WAKER (RD_base).
pub const GICR_WAKER: u64 = 0x0014;
/// GICR_PROPBASER (RD_base, 64-bit; RAZ/WI without LPIs).
pub const GICR_PROPBASER: u64 = 0x0070;
/// GICR_PENDBASER (RD_base, 64-bit; RAZ/WI without LPIs).
pub const GICR_PENDBASER: u64 = 0x0078;
/// GICR_PIDR2 (RD_base).
pub const GICR_PIDR2: u64 = 0xffe8;
/// GICR_ICFGR0 (SGI_base): SGI configuration, read-only all-edge.
pub const GICR_ICFGR0: u64 = 0x0c00;
/// GICR_ICFGR1 (SGI_base): PPI configuration.
pub const GICR_ICFGR1: u64 = 0x0c04;

/// GICR_TYPER.Last: the last redistributor of the region.
pub const GICR_TYPER_LAST: u64 = 1 << 4;
/// GICR_TYPER.Processor_Number field position (bits 23:8).
pub const GICR_TYPER_PROCESSOR_NUMBER_SHIFT: u32 = 8;
/// GICR_TYPER.Affinity_Value field position (bits 63:32: Aff3.Aff2.Aff1.Aff0).
pub const GICR_TYPER_AFFINITY_SHIFT: u32 = 32;
/// GICR_WAKER.ProcessorSleep.
pub const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
/// GICR_WAKER.ChildrenAsleep.
pub const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;

/// GICD_IIDR / GICR_IIDR value: Implementer 0x43B (JEP106 code of Arm, as KVM's vGIC uses),
/// ProductID 0x56 ('V' for vmfork), Variant 0, Revision 0.
pub const IIDR_VALUE: u32 = 0x5600_043b;
/// PIDR2 value: ArchRev 3 (GICv3), JEDEC bit, DES_1 = 3.
pub const PIDR2_VALUE: u32 = 0x3b;
const CIDR: [u32; 4] = [0x0d, 0xf0, 0x05, 0xb1];

/// Which access widths a register accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Width {
    /// 32-bit only.
    Word,
    /// 8- or 32-bit.
    ByteOrWord,
    /// 32- or 64-bit.
    WordOrDouble,
}

impl Width {
    fn allows(self, acc: &MmioAccess) -> bool {
        acc.is_naturally_aligned()
            && match self {
                Width::Word => acc.size == 4,
                Width::ByteOrWord => acc.size == 1 || acc.size == 4,
                Width::WordOrDouble => acc.size == 4 || acc.size == 8,
            }
    }
}

/// The seven one-bit-per-INTID register kinds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BitReg {
    Group,
    SetEnable,
    ClearEnable,
    SetPending,
    ClearPending,
    SetActive,
    ClearActive,
}

impl BitReg {
    /// Register kind from an offset in 0x080-0x3FF (same layout in GICD and SGI_base).
    fn decode(offset: u64) -> Option<(Self, u64)> {
        let kind = match offset {
            0x080..=0x0ff => Self::Group,
            0x100..=0x17f => Self::SetEnable,
            0x180..=0x1ff => Self::ClearEnable,
            0x200..=0x27f => Self::SetPending,
            0x280..=0x2ff => Self::ClearPending,
            0x300..=0x37f => Self::SetActive,
            0x380..=0x3ff => Self::ClearActive,
            _ => return None,
        };
        let base = if kind == Self::Group {
            0x080
        } else {
            offset & !0x7f
        };
        Some((kind, (offset - base) / 4))
    }
}

/// A 64-bit register seen through a 32- or 64-bit access at `offset` from its base.
fn read_u64_part(value: u64, acc: &MmioAccess, reg_base: u64) -> u64 {
    if acc.size == 8 {
        value
    } else if acc.offset - reg_base == 4 {
        value >> 32
    } else {
        value & 0xffff_ffff
    }
}

/// Merges a 32- or 64-bit write into a 64-bit register.
fn merge_u64_part(old: u64, data: u64, acc: &MmioAccess, reg_base: u64) -> u64 {
    if acc.size == 8 {
        data
    } else if acc.offset - reg_base == 4 {
        (old & 0xffff_ffff) | (data << 32)
    } else {
        (old & !0xffff_ffff) | data
    }
}

fn done(acc: &MmioAccess, value: u64) -> MmioResult {
    if acc.write.is_some() {
        MmioResult::Written
    } else {
        MmioResult::Read(value & acc.size_mask())
    }
}

impl Vgic {
    fn gicd_typer(&self) -> u32 {
        let it_lines = (self.nr_irqs / 32).saturating_sub(1) & 0x1f;
        let cpus = (self.vcpus.len().clamp(1, 8) - 1) as u32;
        it_lines | cpus << 5 | 9 << GICD_TYPER_IDBITS_SHIFT | GICD_TYPER_A3V | GICD_TYPER_NO1N
    }

    fn gicd_ctlr(&self) -> u32 {
        let mut v = GICD_CTLR_ARE | GICD_CTLR_DS;
        if self.enable_grp0 {
            v |= GICD_CTLR_ENABLE_GRP0;
        }
        if self.enable_grp1 {
            v |= GICD_CTLR_ENABLE_GRP1;
        }
        v
    }

    /// Reads 32 bits of a one-bit-per-INTID register covering INTIDs `first..first + 32`.
    fn bitmap_read(&self, vcpu: usize, first: u32, kind: BitReg) -> u32 {
        let mut v = 0;
        for bit in 0..32 {
            let Some(irq) = self
                .irq(vcpu, first + bit)
                .filter(|_| self.implemented(first + bit))
            else {
                continue;
            };
            let set = match kind {
                BitReg::Group => irq.group1,
                BitReg::SetEnable | BitReg::ClearEnable => irq.enabled,
                BitReg::SetPending | BitReg::ClearPending => irq.pending_view(),
                BitReg::SetActive | BitReg::ClearActive => irq.active_view(),
            };
            if set {
                v |= 1 << bit;
            }
        }
        v
    }

    /// Writes 32 bits of a one-bit-per-INTID register covering INTIDs `first..first + 32`.
    /// `accessor` is the vCPU doing the write (owner of an SPI made active with no route).
    fn bitmap_write(&mut self, vcpu: usize, first: u32, kind: BitReg, val: u32, accessor: usize) {
        for bit in 0..32 {
            let intid = first + bit;
            if !self.implemented(intid) {
                continue;
            }
            let one = val & (1 << bit) != 0;
            if kind != BitReg::Group && !one {
                continue;
            }
            let nr_vcpus = self.vcpus.len();
            let Some(irq) = self.irq_mut(vcpu, intid) else {
                continue;
            };
            match kind {
                BitReg::Group => irq.group1 = one,
                BitReg::SetEnable => irq.enabled = true,
                BitReg::ClearEnable => irq.enabled = false,
                BitReg::SetPending => irq.latch = true,
                BitReg::ClearPending => {
                    irq.latch = false;
                    if let Some(r) = irq.resident.as_mut() {
                        r.pending_cleared = true;
                    }
                }
                BitReg::SetActive => {
                    if !irq.active_view() {
                        irq.active = true;
                        irq.owner = if intid < NR_PRIVATE_IRQS {
                            vcpu as u16
                        } else {
                            let fallback = accessor.min(nr_vcpus.saturating_sub(1));
                            irq.target.unwrap_or(fallback as u16)
                        };
                    }
                }
                BitReg::ClearActive => {
                    irq.active = false;
                    if let Some(r) = irq.resident.as_mut() {
                        r.active_cleared = true;
                    }
                }
            }
        }
    }

    /// Byte-wide priority access for INTIDs `first..first + size`.
    fn priority_access(&mut self, vcpu: usize, first: u32, acc: &MmioAccess) -> MmioResult {
        let n = u32::from(acc.size);
        match acc.data() {
            None => {
                let mut v = 0u64;
                for i in 0..n {
                    if let Some(irq) = self
                        .irq(vcpu, first + i)
                        .filter(|_| self.implemented(first + i))
                    {
                        v |= u64::from(irq.priority) << (8 * i);
                    }
                }
                MmioResult::Read(v)
            }
            Some(data) => {
                for i in 0..n {
                    if !self.implemented(first + i) {
                        continue;
                    }
                    if let Some(irq) = self.irq_mut(vcpu, first + i) {
                        irq.priority = (data >> (8 * i)) as u8;
                    }
                }
                MmioResult::Written
            }
        }
    }

    /// ICFGR word covering INTIDs `first..first + 16` (bit 2n+1 = edge).
    fn icfgr_access(&mut self, vcpu: usize, first: u32, acc: &MmioAccess) -> MmioResult {
        match acc.data() {
            None => {
                let mut v = 0u64;
                for i in 0..16 {
                    if let Some(irq) = self
                        .irq(vcpu, first + i)
                        .filter(|_| self.implemented(first + i))
                    {
                        if irq.edge {
                            v |= 2 << (2 * i);
                        }
                    }
                }
                MmioResult::Read(v)
            }
            Some(data) => {
                for i in 0..16 {
                    if first + i < NR_SGIS || !self.implemented(first + i) {
                        continue;
                    }
                    if let Some(irq) = self.irq_mut(vcpu, first + i) {
                        irq.edge = data & (2 << (2 * i)) != 0;
                    }
                }
                MmioResult::Written
            }
        }
    }

    /// Emulates an access to the distributor frame (`acc.offset` from [`super::GICD_BASE`]) by
    /// vCPU `vcpu`.
    pub fn dist_access(&mut self, vcpu: usize, acc: MmioAccess) -> MmioResult {
        let off = acc.offset;
        let width = match off {
            GICD_IPRIORITYR..=0x0bff => Width::ByteOrWord,
            0x6000..=0x7fff => Width::WordOrDouble,
            _ => Width::Word,
        };
        if !width.allows(&acc) || off >= super::GICD_SIZE {
            return MmioResult::Fault;
        }
        match off {
            GICD_CTLR => {
                if let Some(v) = acc.data() {
                    let v = v as u32;
                    self.enable_grp0 = v & GICD_CTLR_ENABLE_GRP0 != 0;
                    self.enable_grp1 = v & GICD_CTLR_ENABLE_GRP1 != 0;
                }
                done(&acc, u64::from(self.gicd_ctlr()))
            }
            GICD_TYPER => done(&acc, u64::from(self.gicd_typer())),
            GICD_IIDR => done(&acc, u64::from(IIDR_VALUE)),
            GICD_TYPER2 => done(&acc, 0),
            0x0080..=0x03ff => {
                let Some((kind, index)) = BitReg::decode(off) else {
                    return done(&acc, 0);
                };
                // With affinity routing, word 0 (SGIs and PPIs) lives in the redistributors.
                let first = (index * 32) as u32;
                if first < NR_PRIVATE_IRQS {
                    return done(&acc, 0);
                }
                match acc.data() {
                    None => MmioResult::Read(u64::from(self.bitmap_read(0, first, kind))),
                    Some(v) => {
                        self.bitmap_write(0, first, kind, v as u32, vcpu);
                        MmioResult::Written
                    }
                }
            }
            GICD_IPRIORITYR..=0x07ff => {
                let first = (off - GICD_IPRIORITYR) as u32;
                if first < NR_PRIVATE_IRQS {
                    return done(&acc, 0);
                }
                self.priority_access(0, first, &acc)
            }
            GICD_ICFGR..=0x0cff => {
                let first = ((off - GICD_ICFGR) / 4 * 16) as u32;
                if first < NR_PRIVATE_IRQS {
                    return done(&acc, 0);
                }
                self.icfgr_access(0, first, &acc)
            }
            0x6000..=0x7fff => {
                let reg_base = off & !7;
                let intid = ((reg_base - GICD_IROUTER) / 8) as u32;
                if !(NR_PRIVATE_IRQS..FIRST_SPECIAL_INTID).contains(&intid) {
                    return done(&acc, 0);
                }
                let new_target = acc.data().map(|data| {
                    let old = self.irq(0, intid).map_or(0, |irq| irq.route);
                    let route = merge_u64_part(old, data, &acc, reg_base) & AFFINITY_MASK;
                    (route, self.vcpu_by_affinity(route))
                });
                let Some(irq) = self.irq_mut(0, intid).filter(|_| intid >= NR_PRIVATE_IRQS) else {
                    return done(&acc, 0);
                };
                match new_target {
                    Some((route, target)) => {
                        irq.route = route;
                        irq.target = target;
                        MmioResult::Written
                    }
                    None => MmioResult::Read(read_u64_part(irq.route, &acc, reg_base)),
                }
            }
            GICD_PIDR2 => done(&acc, u64::from(PIDR2_VALUE)),
            0xfff0..=0xfffc => done(&acc, u64::from(CIDR[((off - 0xfff0) / 4) as usize])),
            // GICD_STATUSR, SETSPI/CLRSPI (no MBIS), IGRPMODR and NSACR (one security state),
            // ITARGETSR and SGIR/CPENDSGIR/SPENDSGIR (affinity routing), reserved: RAZ/WI.
            _ => done(&acc, 0),
        }
    }

    /// Emulates an access to the redistributor region (`acc.offset` from
    /// [`super::GICR_BASE`]; frame `offset / GICR_STRIDE` belongs to that vCPU) by vCPU `vcpu`.
    pub fn redist_access(&mut self, vcpu: usize, acc: MmioAccess) -> MmioResult {
        let frame = (acc.offset / GICR_STRIDE) as usize;
        let off = acc.offset % GICR_STRIDE;
        if frame >= self.vcpus.len() {
            return MmioResult::Fault;
        }
        if off < GICR_SGI_BASE {
            self.rd_base_access(frame, off, acc)
        } else {
            self.sgi_base_access(frame, off - GICR_SGI_BASE, acc, vcpu)
        }
    }

    fn gicr_typer(&self, frame: usize) -> u64 {
        let mpidr = self.vcpus[frame].mpidr;
        let aff = (mpidr >> 32 & 0xff) << 24 | (mpidr & 0xff_ffff);
        let mut v = aff << GICR_TYPER_AFFINITY_SHIFT
            | ((frame as u64) & 0xffff) << GICR_TYPER_PROCESSOR_NUMBER_SHIFT;
        if frame + 1 == self.vcpus.len() {
            v |= GICR_TYPER_LAST;
        }
        v
    }

    fn rd_base_access(&mut self, frame: usize, off: u64, acc: MmioAccess) -> MmioResult {
        let width = match off {
            GICR_TYPER..=0x000f | GICR_PROPBASER..=0x007f => Width::WordOrDouble,
            _ => Width::Word,
        };
        // Re-base the access so the 64-bit helpers see frame-relative offsets.
        let acc = MmioAccess { offset: off, ..acc };
        if !width.allows(&acc) {
            return MmioResult::Fault;
        }
        match off {
            GICR_IIDR => done(&acc, u64::from(IIDR_VALUE)),
            GICR_TYPER..=0x000f => done(
                &acc,
                read_u64_part(self.gicr_typer(frame), &acc, GICR_TYPER),
            ),
            GICR_WAKER => {
                let v = &mut self.vcpus[frame];
                if let Some(data) = acc.data() {
                    v.processor_sleep = data as u32 & GICR_WAKER_PROCESSOR_SLEEP != 0;
                }
                // No real power domains: ChildrenAsleep follows ProcessorSleep at once.
                let val = if v.processor_sleep {
                    GICR_WAKER_PROCESSOR_SLEEP | GICR_WAKER_CHILDREN_ASLEEP
                } else {
                    0
                };
                done(&acc, u64::from(val))
            }
            GICR_PIDR2 => done(&acc, u64::from(PIDR2_VALUE)),
            0xfff0..=0xfffc => done(&acc, u64::from(CIDR[((off - 0xfff0) / 4) as usize])),
            // GICR_CTLR (no LPIs: EnableLPIs RAZ/WI, RWP 0), STATUSR, PROPBASER, PENDBASER,
            // reserved: RAZ/WI.
            _ => done(&acc, 0),
        }
    }

    fn sgi_base_access(
        &mut self,
        frame: usize,
        off: u64,
        acc: MmioAccess,
        accessor: usize,
    ) -> MmioResult {
        let width = match off {
            GICD_IPRIORITYR..=0x041f => Width::ByteOrWord,
            _ => Width::Word,
        };
        let acc = MmioAccess { offset: off, ..acc };
        if !width.allows(&acc) {
            return MmioResult::Fault;
        }
        match off {
            0x0080..=0x03ff => match BitReg::decode(off) {
                // Only word 0 of each register exists here (no extended PPI range).
                Some((kind, 0)) => match acc.data() {
                    None => MmioResult::Read(u64::from(self.bitmap_read(frame, 0, kind))),
                    Some(v) => {
                        self.bitmap_write(frame, 0, kind, v as u32, accessor);
                        MmioResult::Written
                    }
                },
                _ => done(&acc, 0),
            },
            GICD_IPRIORITYR..=0x041f => {
                let first = (off - GICD_IPRIORITYR) as u32;
                self.priority_access(frame, first, &acc)
            }
            GICR_ICFGR0 => done(&acc, 0xaaaa_aaaa),
            GICR_ICFGR1 => self.icfgr_access(frame, 16, &acc),
            // IGRPMODR0, NSACR (one security state), reserved: RAZ/WI.
            _ => done(&acc, 0),
        }
    }
}
