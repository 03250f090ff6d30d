use super::regs::*;
use super::*;
use crate::mmio::{MmioAccess, MmioResult};

fn gic(nr_vcpus: usize) -> Vgic {
    Vgic::new(&VgicConfig::qemu_virt(nr_vcpus)).expect("valid config")
}

fn dread(g: &mut Vgic, off: u64, size: u8) -> u64 {
    match g.dist_access(0, MmioAccess::read(off, size)) {
        MmioResult::Read(v) => v,
        other => panic!("GICD read {off:#x}/{size}: {other:?}"),
    }
}

fn dwrite(g: &mut Vgic, off: u64, size: u8, v: u64) {
    assert_eq!(
        g.dist_access(0, MmioAccess::write(off, size, v)),
        MmioResult::Written,
        "GICD write {off:#x}/{size}"
    );
}

fn rread(g: &mut Vgic, off: u64, size: u8) -> u64 {
    match g.redist_access(0, MmioAccess::read(off, size)) {
        MmioResult::Read(v) => v,
        other => panic!("GICR read {off:#x}/{size}: {other:?}"),
    }
}

fn rwrite(g: &mut Vgic, off: u64, size: u8, v: u64) {
    assert_eq!(
        g.redist_access(0, MmioAccess::write(off, size, v)),
        MmioResult::Written,
        "GICR write {off:#x}/{size}"
    );
}

fn sgi_base(vcpu: usize) -> u64 {
    vcpu as u64 * GICR_STRIDE + GICR_SGI_BASE
}

/// Enables Group 1 in GICD_CTLR and `intid` (on vCPU `vcpu` if private) with `prio`.
fn enable(g: &mut Vgic, vcpu: usize, intid: u32, prio: u8) {
    dwrite(g, GICD_CTLR, 4, 0x13);
    if intid < 32 {
        rwrite(g, sgi_base(vcpu) + GICD_ISENABLER, 4, 1 << intid);
        rwrite(
            g,
            sgi_base(vcpu) + GICD_IPRIORITYR + u64::from(intid),
            1,
            prio.into(),
        );
    } else {
        dwrite(
            g,
            GICD_ISENABLER + u64::from(intid / 32) * 4,
            4,
            1 << (intid % 32),
        );
        dwrite(g, GICD_IPRIORITYR + u64::from(intid), 1, prio.into());
    }
}

fn lrs(s: &CpuIfState) -> Vec<ListRegister> {
    s.lrs[..s.nr_lrs]
        .iter()
        .map(|&v| ListRegister(v))
        .filter(|l| l.state() != LrState::Invalid)
        .collect()
}

#[test]
fn config_validation() {
    assert!(Vgic::new(&VgicConfig::qemu_virt(0)).is_err());
    assert!(Vgic::new(&VgicConfig::qemu_virt(65)).is_err());
    let mut c = VgicConfig::qemu_virt(2);
    c.nr_irqs = 100;
    assert!(Vgic::new(&c).is_err());
    c.nr_irqs = 1024;
    assert!(Vgic::new(&c).is_ok());
    c.mpidrs = vec![0, 0];
    assert!(Vgic::new(&c).is_err());
    c.mpidrs = vec![0, 1 << 31];
    assert!(Vgic::new(&c).is_err());
    assert_eq!(qemu_virt_mpidr(17), 0x101);
    let e = VgicError::LrMismatch {
        lr: 1,
        expected: 27,
        found: 3,
    };
    assert!(e.to_string().contains("ICH_LR1_EL2"));
}

#[test]
fn distributor_id_registers() {
    let mut g = gic(4);
    let typer = dread(&mut g, GICD_TYPER, 4) as u32;
    assert_eq!(typer & 0x1f, 7, "ITLinesNumber: 256 INTIDs");
    assert_eq!((typer >> 5) & 7, 3, "CPUNumber");
    assert_eq!((typer >> 19) & 0x1f, 9, "IDbits");
    assert_eq!(typer & (1 << 17), 0, "no LPIs");
    assert_eq!(typer & (1 << 10), 0, "no security extensions");
    assert_ne!(typer & GICD_TYPER_NO1N, 0);
    assert_eq!(dread(&mut g, GICD_PIDR2, 4) & 0xf0, 0x30, "ArchRev = GICv3");
    assert_eq!(dread(&mut g, GICD_IIDR, 4), u64::from(IIDR_VALUE));
    assert_eq!(dread(&mut g, GICD_TYPER2, 4), 0);
    // Read-only registers ignore writes.
    dwrite(&mut g, GICD_TYPER, 4, 0);
    assert_eq!(dread(&mut g, GICD_TYPER, 4) as u32, typer);
}

#[test]
fn gicd_ctlr() {
    let mut g = gic(1);
    assert_eq!(
        dread(&mut g, GICD_CTLR, 4),
        0x50,
        "ARE and DS set, groups off"
    );
    // What Linux writes: ARE_NS | ENABLE_G1A | ENABLE_G1.
    dwrite(&mut g, GICD_CTLR, 4, 0x13);
    assert_eq!(dread(&mut g, GICD_CTLR, 4), 0x53);
    assert_eq!(dread(&mut g, GICD_CTLR, 4) & u64::from(GICD_CTLR_RWP), 0);
    dwrite(&mut g, GICD_CTLR, 4, 0);
    assert_eq!(dread(&mut g, GICD_CTLR, 4), 0x50, "ARE and DS are RAO/WI");
}

#[test]
fn enable_bitmaps() {
    let mut g = gic(2);
    // SPIs 32..63 live in word 1.
    dwrite(&mut g, GICD_ISENABLER + 4, 4, 0x8000_0003);
    assert_eq!(dread(&mut g, GICD_ISENABLER + 4, 4), 0x8000_0003);
    assert_eq!(dread(&mut g, GICD_ICENABLER + 4, 4), 0x8000_0003);
    dwrite(&mut g, GICD_ISENABLER + 4, 4, 0x10);
    dwrite(&mut g, GICD_ICENABLER + 4, 4, 0x1);
    assert_eq!(dread(&mut g, GICD_ISENABLER + 4, 4), 0x8000_0012);
    // Word 0 is RAZ/WI in the distributor: private interrupts are in the redistributors.
    dwrite(&mut g, GICD_ISENABLER, 4, 0xffff_ffff);
    assert_eq!(dread(&mut g, GICD_ISENABLER, 4), 0);
    assert_eq!(rread(&mut g, sgi_base(0) + GICD_ISENABLER, 4), 0);
    // Redistributor word 0 is per vCPU.
    rwrite(&mut g, sgi_base(1) + GICD_ISENABLER, 4, 1 << 27);
    assert_eq!(rread(&mut g, sgi_base(1) + GICD_ISENABLER, 4), 1 << 27);
    assert_eq!(rread(&mut g, sgi_base(0) + GICD_ISENABLER, 4), 0);
    // Beyond the implemented SPIs: RAZ/WI.
    dwrite(&mut g, GICD_ISENABLER + 8 * 4, 4, 0xffff_ffff);
    assert_eq!(dread(&mut g, GICD_ISENABLER + 8 * 4, 4), 0);
}

#[test]
fn group_pending_active_bitmaps() {
    let mut g = gic(1);
    assert_eq!(
        dread(&mut g, GICD_IGROUPR + 4, 4),
        0xffff_ffff,
        "reset Group 1"
    );
    dwrite(&mut g, GICD_IGROUPR + 4, 4, 0xffff_fffe);
    assert_eq!(dread(&mut g, GICD_IGROUPR + 4, 4), 0xffff_fffe);
    dwrite(&mut g, GICD_ISPENDR + 4, 4, 0x5);
    assert_eq!(dread(&mut g, GICD_ISPENDR + 4, 4), 0x5);
    assert_eq!(dread(&mut g, GICD_ICPENDR + 4, 4), 0x5);
    dwrite(&mut g, GICD_ICPENDR + 4, 4, 0x1);
    assert_eq!(dread(&mut g, GICD_ISPENDR + 4, 4), 0x4);
    dwrite(&mut g, GICD_ISACTIVER + 4, 4, 0x2);
    assert_eq!(dread(&mut g, GICD_ISACTIVER + 4, 4), 0x2);
    dwrite(&mut g, GICD_ICACTIVER + 4, 4, 0x2);
    assert_eq!(dread(&mut g, GICD_ICACTIVER + 4, 4), 0);
    // A level line that is high stays pending through ICPENDR.
    g.set_irq_level(40, 0, true).unwrap();
    dwrite(&mut g, GICD_ICPENDR + 4, 4, 1 << 8);
    assert_eq!(dread(&mut g, GICD_ISPENDR + 4, 4), 0x104);
}

#[test]
fn byte_priorities() {
    let mut g = gic(1);
    dwrite(&mut g, GICD_IPRIORITYR + 33, 1, 0xa0);
    dwrite(&mut g, GICD_IPRIORITYR + 34, 1, 0x10);
    assert_eq!(dread(&mut g, GICD_IPRIORITYR + 32, 4), 0x0010_a000);
    dwrite(&mut g, GICD_IPRIORITYR + 36, 4, 0x8070_6050);
    assert_eq!(dread(&mut g, GICD_IPRIORITYR + 38, 1), 0x70);
    // Private priorities through the distributor are RAZ/WI.
    dwrite(&mut g, GICD_IPRIORITYR + 27, 1, 0x80);
    assert_eq!(dread(&mut g, GICD_IPRIORITYR + 24, 4), 0);
    rwrite(&mut g, sgi_base(0) + GICD_IPRIORITYR + 27, 1, 0x80);
    assert_eq!(
        rread(&mut g, sgi_base(0) + GICD_IPRIORITYR + 24, 4),
        0x8000_0000
    );
    // Halfword accesses fault.
    assert_eq!(
        g.dist_access(0, MmioAccess::read(GICD_IPRIORITYR + 32, 2)),
        MmioResult::Fault
    );
}

#[test]
fn icfgr() {
    let mut g = gic(1);
    // SPIs 48..63: ICFGR3.
    dwrite(&mut g, GICD_ICFGR + 12, 4, 0xffff_ffff);
    assert_eq!(
        dread(&mut g, GICD_ICFGR + 12, 4),
        0xaaaa_aaaa,
        "odd bits only"
    );
    dwrite(&mut g, GICD_ICFGR + 12, 4, 0x2);
    assert_eq!(dread(&mut g, GICD_ICFGR + 12, 4), 0x2);
    assert_eq!(dread(&mut g, GICD_ICFGR, 4), 0, "private: RAZ in GICD");
    assert_eq!(rread(&mut g, sgi_base(0) + GICR_ICFGR0, 4), 0xaaaa_aaaa);
    rwrite(&mut g, sgi_base(0) + GICR_ICFGR0, 4, 0);
    assert_eq!(
        rread(&mut g, sgi_base(0) + GICR_ICFGR0, 4),
        0xaaaa_aaaa,
        "SGIs RO"
    );
    rwrite(&mut g, sgi_base(0) + GICR_ICFGR1, 4, 2 << (2 * 11));
    assert_eq!(rread(&mut g, sgi_base(0) + GICR_ICFGR1, 4), 2 << 22);
}

#[test]
fn irouter() {
    let mut g = gic(18);
    let reg = GICD_IROUTER + 8 * 40;
    assert_eq!(dread(&mut g, reg, 8), 0);
    // vCPU 17 is Aff1 = 1, Aff0 = 1. IRM (bit 31) is RAZ/WI; junk bits are dropped.
    dwrite(&mut g, reg, 8, 0xffff_ffab_8000_0101);
    assert_eq!(dread(&mut g, reg, 8), 0xab_0000_0101);
    dwrite(&mut g, reg, 8, 0x101);
    assert_eq!(g.spis[8].target, Some(17));
    // 32-bit halves.
    dwrite(&mut g, reg, 4, 0x0000_0003);
    assert_eq!(dread(&mut g, reg, 8), 0x3);
    dwrite(&mut g, reg + 4, 4, 0x5);
    assert_eq!(dread(&mut g, reg + 4, 4), 0x5);
    assert_eq!(dread(&mut g, reg, 4), 0x3);
    assert_eq!(g.spis[8].target, None, "no vCPU at 5.0.0.3");
    // IROUTER for private INTIDs is reserved.
    dwrite(&mut g, GICD_IROUTER + 8 * 3, 8, 1);
    assert_eq!(dread(&mut g, GICD_IROUTER + 8 * 3, 8), 0);
    assert_eq!(
        g.dist_access(0, MmioAccess::read(reg + 4, 8)),
        MmioResult::Fault,
        "misaligned"
    );
    assert_eq!(
        g.dist_access(0, MmioAccess::read(reg, 1)),
        MmioResult::Fault
    );
}

#[test]
fn widths_and_reserved() {
    let mut g = gic(1);
    assert_eq!(
        g.dist_access(0, MmioAccess::read(GICD_CTLR, 8)),
        MmioResult::Fault
    );
    assert_eq!(
        g.dist_access(0, MmioAccess::read(GICD_CTLR, 1)),
        MmioResult::Fault
    );
    assert_eq!(
        g.dist_access(0, MmioAccess::read(GICD_TYPER + 1, 4)),
        MmioResult::Fault
    );
    assert_eq!(
        g.dist_access(0, MmioAccess::read(0x1_0000, 4)),
        MmioResult::Fault
    );
    assert_eq!(
        dread(&mut g, 0x0040, 4),
        0,
        "SETSPI_NSR: reserved without MBIS"
    );
    dwrite(&mut g, 0x0f00, 4, 0x1_0000); // GICD_SGIR: ignored with ARE
    assert_eq!(dread(&mut g, GICD_ITARGETSR + 32, 1), 0);
    assert_eq!(rread(&mut g, 0xfff0, 4), 0x0d);
    assert_eq!(
        g.redist_access(0, MmioAccess::read(GICR_STRIDE, 4)),
        MmioResult::Fault
    );
    assert_eq!(
        g.redist_access(0, MmioAccess::read(GICR_WAKER, 2)),
        MmioResult::Fault
    );
}

#[test]
fn gicr_typer_and_waker() {
    let mut g = gic(3);
    for v in 0..3u64 {
        let typer = rread(&mut g, v * GICR_STRIDE + GICR_TYPER, 8);
        assert_eq!(typer >> 32, v, "Affinity_Value = Aff0 = vCPU index");
        assert_eq!((typer >> 8) & 0xffff, v, "Processor_Number");
        assert_eq!(typer & GICR_TYPER_LAST != 0, v == 2, "Last");
        let lo = rread(&mut g, v * GICR_STRIDE + GICR_TYPER, 4);
        let hi = rread(&mut g, v * GICR_STRIDE + GICR_TYPER + 4, 4);
        assert_eq!(hi << 32 | lo, typer);
    }
    let g17 = &mut gic(18);
    let typer = rread(g17, 17 * GICR_STRIDE + GICR_TYPER, 8);
    assert_eq!(typer >> 32, 0x0101, "Aff1 = 1, Aff0 = 1");
    assert_eq!(rread(&mut g, GICR_PIDR2, 4) & 0xf0, 0x30);
    // Linux's gic_enable_redist: clear ProcessorSleep, wait for ChildrenAsleep to clear.
    assert_eq!(rread(&mut g, GICR_WAKER, 4), 0x6);
    let w = rread(&mut g, GICR_WAKER, 4) & !u64::from(GICR_WAKER_PROCESSOR_SLEEP);
    rwrite(&mut g, GICR_WAKER, 4, w);
    assert_eq!(rread(&mut g, GICR_WAKER, 4), 0);
    assert_eq!(rread(&mut g, GICR_STRIDE + GICR_WAKER, 4), 0x6, "per vCPU");
    rwrite(&mut g, GICR_WAKER, 4, 0x2);
    assert_eq!(rread(&mut g, GICR_WAKER, 4), 0x6);
    assert_eq!(rread(&mut g, GICR_CTLR, 4), 0);
    assert_eq!(rread(&mut g, GICR_PROPBASER, 8), 0);
}

#[test]
fn level_timer_round_trip() {
    let mut g = gic(1);
    enable(&mut g, 0, VTIMER_INTID, 0xa0);
    assert!(!g.has_pending(0));
    assert_eq!(g.set_irq_level(VTIMER_INTID, 0, true), Ok(Some(0)));
    assert_eq!(
        g.set_irq_level(VTIMER_INTID, 0, true),
        Ok(None),
        "no change"
    );
    assert_eq!(
        g.pending_for(0),
        Some(PendingIrq {
            intid: 27,
            priority: 0xa0
        })
    );
    let mut s = g.fill_lrs(0, 4).unwrap();
    assert_eq!(s.hcr, ICH_HCR_EN);
    let lr = ListRegister(s.lrs[0]);
    assert_eq!(lr.state(), LrState::Pending);
    assert_eq!(lr.vintid(), 27);
    assert_eq!(lr.priority(), 0xa0);
    assert!(lr.group1());
    assert!(lr.eoi(), "level: maintenance on deactivation");
    assert_eq!(lr.0 & ICH_LR_HW, 0);
    assert_eq!(
        lr.0,
        1 << 62 | 1 << 60 | 0xa0 << 48 | 1 << 41 | 27,
        "exact ICH_LR encoding"
    );
    assert_eq!(s.lrs[1..], [0; MAX_LRS - 1]);
    // ISPENDR reads show the LR's pending state.
    assert_eq!(rread(&mut g, sgi_base(0) + GICD_ISPENDR, 4), 1 << 27);
    // The guest acknowledges: pending -> active. Exit.
    s.lrs[0] = lr.with_state(LrState::Active).0;
    g.sync_from_lrs(0, &s).unwrap();
    assert!(!g.lrs_loaded(0));
    assert!(!g.has_pending(0), "active, not deliverable again");
    // Line still high: presented as active only.
    let mut s = g.fill_lrs(0, 4).unwrap();
    assert_eq!(ListRegister(s.lrs[0]).state(), LrState::Active);
    assert!(ListRegister(s.lrs[0]).eoi());
    // The guest deactivates (timer handler masked the timer, but the line is still high here):
    // the LR goes invalid, maintenance interrupt, exit.
    s.lrs[0] = ListRegister(s.lrs[0]).with_state(LrState::Invalid).0;
    g.sync_from_lrs(0, &s).unwrap();
    assert!(g.has_pending(0), "re-sampled: line still high");
    // The monitor lowers the line: nothing left.
    assert_eq!(g.set_irq_level(VTIMER_INTID, 0, false), Ok(Some(0)));
    assert!(!g.has_pending(0));
    let s = g.fill_lrs(0, 4).unwrap();
    assert!(lrs(&s).is_empty());
}

#[test]
fn level_line_drop_while_listed() {
    let mut g = gic(1);
    enable(&mut g, 0, 33, 0x80);
    g.set_irq_level(33, 0, true).unwrap();
    let s = g.fill_lrs(0, 4).unwrap();
    assert_eq!(lrs(&s).len(), 1);
    // The UART line drops before the guest took it: the kick target is the listed vCPU.
    assert_eq!(g.set_irq_level(33, 0, false), Ok(Some(0)));
    g.sync_from_lrs(0, &s).unwrap();
    assert!(
        !g.has_pending(0),
        "retracted: its pending state came from the line"
    );
    // A software-pended level interrupt keeps its latch through an untaken round trip.
    dwrite(&mut g, GICD_ISPENDR + 4, 4, 1 << 1);
    let s = g.fill_lrs(0, 4).unwrap();
    assert_eq!(lrs(&s).len(), 1);
    g.sync_from_lrs(0, &s).unwrap();
    assert!(g.has_pending(0));
}

#[test]
fn edge_pending_and_active() {
    let mut g = gic(1);
    dwrite(&mut g, GICD_ICFGR + 8, 4, 2 << 2); // INTID 33 edge
    enable(&mut g, 0, 33, 0x40);
    g.inject_edge(33, 0).unwrap();
    g.inject_edge(33, 0).unwrap(); // coalesces
    let mut s = g.fill_lrs(0, 4).unwrap();
    let lr = ListRegister(s.lrs[0]);
    assert!(!lr.eoi(), "edge: no maintenance needed");
    s.lrs[0] = lr.with_state(LrState::Active).0;
    g.sync_from_lrs(0, &s).unwrap();
    // A new edge while active: pending + active.
    g.inject_edge(33, 0).unwrap();
    assert_eq!(dread(&mut g, GICD_ISACTIVER + 4, 4), 2);
    assert_eq!(dread(&mut g, GICD_ISPENDR + 4, 4), 2);
    let mut s = g.fill_lrs(0, 4).unwrap();
    let lr = ListRegister(s.lrs[0]);
    assert_eq!(lr.state(), LrState::PendingActive);
    // The guest deactivates; the pending part remains in the LR.
    s.lrs[0] = lr.with_state(LrState::Pending).0;
    g.sync_from_lrs(0, &s).unwrap();
    assert_eq!(dread(&mut g, GICD_ISACTIVER + 4, 4), 0);
    assert!(g.has_pending(0));
    // Acknowledge and deactivate without exiting in between.
    let mut s = g.fill_lrs(0, 4).unwrap();
    s.lrs[0] = 0;
    g.sync_from_lrs(0, &s).unwrap();
    assert!(!g.has_pending(0));
    assert_eq!(dread(&mut g, GICD_ISPENDR + 4, 4), 0);
}

#[test]
fn rising_line_on_edge_interrupt_latches() {
    let mut g = gic(1);
    dwrite(&mut g, GICD_ICFGR + 8, 4, 2 << 2);
    enable(&mut g, 0, 33, 0);
    g.set_irq_level(33, 0, true).unwrap();
    g.set_irq_level(33, 0, false).unwrap();
    assert!(g.has_pending(0), "edge latched");
}

#[test]
fn disabled_and_group_gating() {
    let mut g = gic(1);
    g.inject_edge(40, 0).unwrap();
    assert!(!g.has_pending(0), "disabled");
    enable(&mut g, 0, 40, 0);
    assert!(g.has_pending(0));
    dwrite(&mut g, GICD_CTLR, 4, 0x1); // Group 1 off
    assert!(!g.has_pending(0));
    assert!(lrs(&g.fill_lrs(0, 4).unwrap()).is_empty());
    g.sync_from_lrs(0, &CpuIfState::default()).unwrap();
    dwrite(&mut g, GICD_IGROUPR + 4, 4, 0); // now Group 0, which is enabled
    let s = g.fill_lrs(0, 4).unwrap();
    let l = lrs(&s);
    assert_eq!(l.len(), 1);
    assert!(!l[0].group1());
}

#[test]
fn priority_order_and_underflow() {
    let mut g = gic(1);
    let prios = [
        (33, 0x80),
        (34, 0x10),
        (35, 0x40),
        (36, 0x40),
        (37, 0xf0),
        (38, 0x20),
    ];
    for &(i, p) in &prios {
        enable(&mut g, 0, i, p);
        g.inject_edge(i, 0).unwrap();
    }
    let s = g.fill_lrs(0, 4).unwrap();
    let got: Vec<u32> = lrs(&s).iter().map(|l| l.vintid()).collect();
    assert_eq!(got, [34, 38, 35, 36]);
    assert_eq!(s.hcr, ICH_HCR_EN | ICH_HCR_UIE);
    // Nothing taken: the round trip loses nothing.
    g.sync_from_lrs(0, &s).unwrap();
    assert_eq!(dread(&mut g, GICD_ISPENDR + 4, 4), 0x7e);
    // One LR: no UIE (it would fire at once); EOI on the LR instead.
    let s = g.fill_lrs(0, 1).unwrap();
    assert_eq!(s.hcr, ICH_HCR_EN);
    assert!(ListRegister(s.lrs[0]).eoi());
    assert_eq!(ListRegister(s.lrs[0]).vintid(), 34);
    // Fill again without a sync: the LR contents come back as written.
    let s2 = g.fill_lrs(0, 4).unwrap();
    assert_eq!(lrs(&s2).len(), 4);
    assert!(matches!(
        g.fill_lrs(0, 0),
        Err(VgicError::InvalidLrCount(0))
    ));
    assert!(matches!(
        g.fill_lrs(0, 17),
        Err(VgicError::InvalidLrCount(17))
    ));
}

#[test]
fn eoicount_for_unlisted_actives() {
    let mut g = gic(1);
    // Five nested active interrupts, two LRs.
    for (n, i) in (40..45u32).enumerate() {
        enable(&mut g, 0, i, 0x10 * n as u8);
        dwrite(&mut g, GICD_ISACTIVER + 4, 4, 1 << (i - 32));
    }
    let s = g.fill_lrs(0, 2).unwrap();
    let got: Vec<u32> = lrs(&s).iter().map(|l| l.vintid()).collect();
    assert_eq!(got, [40, 41], "most urgent actives listed");
    assert_eq!(s.hcr & ICH_HCR_LRENPIE, ICH_HCR_LRENPIE);
    // The guest EOIs both listed ones and one more that misses: EOIcount = 1.
    let mut back = s;
    back.lrs = [0; MAX_LRS];
    back.hcr = s.hcr | 1 << ICH_HCR_EOICOUNT_SHIFT;
    g.sync_from_lrs(0, &back).unwrap();
    assert_eq!(dread(&mut g, GICD_ISACTIVER + 4, 4), 0b11000 << 8);
}

#[test]
fn clear_pending_while_listed_wins() {
    let mut g = gic(2);
    enable(&mut g, 0, 50, 0);
    dwrite(&mut g, GICD_ICFGR + 12, 4, 2 << 4);
    g.inject_edge(50, 0).unwrap();
    let s = g.fill_lrs(0, 4).unwrap();
    // vCPU 1 clears it while it sits, untaken, in vCPU 0's LR.
    assert_eq!(
        g.dist_access(1, MmioAccess::write(GICD_ICPENDR + 4, 4, 1 << 18)),
        MmioResult::Written
    );
    assert_eq!(dread(&mut g, GICD_ISPENDR + 4, 4), 0);
    g.sync_from_lrs(0, &s).unwrap();
    assert!(!g.has_pending(0));
}

#[test]
fn lr_mismatch_reported() {
    let mut g = gic(1);
    enable(&mut g, 0, 40, 0);
    g.inject_edge(40, 0).unwrap();
    let mut s = g.fill_lrs(0, 4).unwrap();
    s.lrs[0] = ListRegister(s.lrs[0]).0 & !ICH_LR_VINTID_MASK | 41;
    assert_eq!(
        g.sync_from_lrs(0, &s),
        Err(VgicError::LrMismatch {
            lr: 0,
            expected: 40,
            found: 41
        })
    );
    assert!(!g.lrs_loaded(0));
    assert!(g.has_pending(0), "state still taken back");
}

#[test]
fn sgi_decoding() {
    let mut g = gic(20);
    for v in 0..20 {
        enable(&mut g, v, 3, 0);
    }
    // TargetList {0, 2} in cluster Aff1 = 0, INTID 3.
    let m = g.send_sgi(5, 3 << 24 | 0b101).unwrap();
    assert_eq!(m.iter().collect::<Vec<_>>(), [0, 2]);
    // Aff1 = 1: vCPU 16 + n.
    let m = g.send_sgi(0, 3 << 24 | 1 << 16 | 0b1001).unwrap();
    assert_eq!(m.iter().collect::<Vec<_>>(), [16, 19]);
    // RS = 1 with Aff1 = 0 names Aff0 16-31, which do not exist.
    assert!(g.send_sgi(0, 3 << 24 | 1 << 44 | 1).unwrap().is_empty());
    // Aff2 mismatch.
    assert!(g.send_sgi(0, 3 << 24 | 1 << 32 | 1).unwrap().is_empty());
    // IRM: everyone but the sender.
    let m = g.send_sgi(7, 3 << 24 | 1 << 40).unwrap();
    assert_eq!(m.iter().count(), 19);
    assert!(!m.contains(7));
    assert_eq!(g.pending_for(16).map(|p| p.intid), Some(3));
    assert!(g.send_sgi(99, 0).is_err());
}

#[test]
fn sgi_groups_follow_the_generating_register() {
    let mut g = gic(4);
    for v in 0..4 {
        enable(&mut g, v, 3, 0);
    }
    // vCPU 0 makes SGI 3 Group 0; the others keep it Group 1.
    rwrite(&mut g, sgi_base(0) + GICD_IGROUPR, 4, 0xffff_fff7);
    let everyone = 3 << 24 | 0b1111;
    let got = |g: &mut Vgic, r| {
        g.send_sgi_from(3, everyone, r)
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
    };
    // ICC_SGI1R_EL1 with DS = 1: both groups.
    assert_eq!(got(&mut g, SgiRegister::Sgi1r), [0, 1, 2, 3]);
    // ICC_SGI0R_EL1 and ICC_ASGI1R_EL1: only the Group 0 configuration.
    assert_eq!(got(&mut g, SgiRegister::Sgi0r), [0]);
    assert_eq!(got(&mut g, SgiRegister::Asgi1r), [0]);
    // IRM works the same through every register.
    let m = g
        .send_sgi_from(1, 3 << 24 | 1 << 40, SgiRegister::Sgi0r)
        .unwrap();
    assert_eq!(m.iter().collect::<Vec<_>>(), [0]);
    assert!(g.send_sgi_from(9, 0, SgiRegister::Sgi0r).is_err());
}

#[test]
fn spi_routing_and_kick_targets() {
    let mut g = gic(2);
    enable(&mut g, 0, 33, 0);
    dwrite(&mut g, GICD_IROUTER + 8 * 33, 8, 1);
    assert_eq!(g.set_irq_level(33, 0, true), Ok(Some(1)));
    assert!(!g.has_pending(0));
    assert!(g.has_pending(1));
    dwrite(&mut g, GICD_IROUTER + 8 * 33, 8, 9);
    assert!(!g.has_pending(1), "routed nowhere");
    assert_eq!(g.set_irq_level(33, 0, false), Ok(None));
    assert!(g.set_irq_level(3, 0, true).is_err(), "SGIs have no line");
    assert!(g.set_irq_level(256, 0, true).is_err());
    assert!(g.set_irq_level(27, 2, true).is_err());
    assert!(g.inject_edge(300, 0).is_err());
}

#[test]
fn cpu_interface_state_survives() {
    let mut g = gic(1);
    let mut s = g.fill_lrs(0, 4).unwrap();
    assert_eq!(s.vmcr, 0);
    s.vmcr = 0xf000_0002;
    s.ap1r[0] = 1;
    g.sync_from_lrs(0, &s).unwrap();
    let s = g.fill_lrs(0, 4).unwrap();
    assert_eq!(s.vmcr, 0xf000_0002);
    assert_eq!(s.ap1r, [1, 0, 0, 0]);
}

#[test]
fn fork_copies_and_reset_restores() {
    let mut parent = gic(2);
    enable(&mut parent, 0, 40, 0x20);
    parent.inject_edge(40, 0).unwrap();
    let snapshot = parent.clone();
    let mut child = parent.clone();
    // The child takes the interrupt; the parent still has it.
    let mut s = child.fill_lrs(0, 4).unwrap();
    s.lrs[0] = 0;
    child.sync_from_lrs(0, &s).unwrap();
    assert!(!child.has_pending(0));
    assert!(parent.has_pending(0));
    // Reset the child to the fork point.
    child = snapshot.clone();
    assert!(child.has_pending(0));
    assert_eq!(dread(&mut child, GICD_IPRIORITYR + 40, 1), 0x20);
}

mod prop {
    //! Random interrupt traffic against a reference model: per-INTID enabled/pending/priority,
    //! SPI routes, and a guest that takes the most urgent pending interrupt from its LRs.
    use super::*;
    use proptest::prelude::*;

    const NR_VCPUS: usize = 2;
    const NR_LRS: usize = 4;
    /// SGIs 0-3, PPIs 16-19, SPIs 32-39.
    const INTIDS: [u32; 16] = [0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 36, 37, 38, 39];

    #[derive(Clone, Debug)]
    enum Op {
        Inject { vcpu: usize, idx: usize },
        Sgi { from: usize, to: usize, idx: usize },
        Enable { vcpu: usize, idx: usize, on: bool },
        Priority { vcpu: usize, idx: usize, prio: u8 },
        Route { idx: usize, vcpu: usize },
        Group1 { on: bool },
        Run { vcpu: usize, action: Action },
    }

    #[derive(Clone, Copy, Debug)]
    enum Action {
        /// Enter and exit without taking anything.
        Idle,
        /// Take the most urgent interrupt and complete it at once.
        TakeAndEoi,
        /// Take the most urgent interrupt and keep it active across exits.
        TakeAndHold,
        /// Complete the interrupt held active.
        EoiHeld,
    }

    fn op() -> impl Strategy<Value = Op> {
        let v = 0..NR_VCPUS;
        let i = 0..INTIDS.len();
        prop_oneof![
            4 => (v.clone(), i.clone()).prop_map(|(vcpu, idx)| Op::Inject { vcpu, idx }),
            1 => (v.clone(), v.clone(), 0..4usize).prop_map(|(from, to, idx)| Op::Sgi { from, to, idx }),
            2 => (v.clone(), i.clone(), any::<bool>()).prop_map(|(vcpu, idx, on)| Op::Enable { vcpu, idx, on }),
            1 => (v.clone(), i.clone(), prop_oneof![Just(0x00u8), Just(0x40), Just(0x80), Just(0xa0), any::<u8>()])
                .prop_map(|(vcpu, idx, prio)| Op::Priority { vcpu, idx, prio }),
            1 => (8..INTIDS.len(), v.clone()).prop_map(|(idx, vcpu)| Op::Route { idx, vcpu }),
            1 => prop_oneof![9 => Just(true), 1 => Just(false)].prop_map(|on| Op::Group1 { on }),
            6 => (v, prop_oneof![
                    Just(Action::Idle),
                    Just(Action::TakeAndEoi),
                    Just(Action::TakeAndHold),
                    Just(Action::EoiHeld)
                ]).prop_map(|(vcpu, action)| Op::Run { vcpu, action }),
        ]
    }

    #[derive(Clone, Copy, Debug, Default)]
    struct RefIrq {
        enabled: bool,
        pending: bool,
        active: bool,
        priority: u8,
    }

    #[derive(Debug)]
    struct Reference {
        /// private[vcpu][intid] for intid < 32; SPIs in `spis`.
        private: Vec<[RefIrq; 32]>,
        spis: [RefIrq; 8],
        route: [usize; 8],
        group1: bool,
        /// The interrupt each vCPU's guest holds active, if any.
        held: [Option<u32>; NR_VCPUS],
        delivered: usize,
    }

    impl Reference {
        fn irq(&mut self, vcpu: usize, intid: u32) -> &mut RefIrq {
            if intid < 32 {
                &mut self.private[vcpu][intid as usize]
            } else {
                &mut self.spis[(intid - 32) as usize]
            }
        }
        /// Pending, enabled, not active interrupts a vCPU may take: (priority, intid).
        fn deliverable(&self, vcpu: usize) -> Vec<(u8, u32)> {
            if !self.group1 {
                return Vec::new();
            }
            let mut out = Vec::new();
            for &intid in &INTIDS {
                let (irq, here) = if intid < 32 {
                    (self.private[vcpu][intid as usize], true)
                } else {
                    let k = (intid - 32) as usize;
                    (self.spis[k], self.route[k] == vcpu)
                };
                if here && irq.enabled && irq.pending && !irq.active {
                    out.push((irq.priority, intid));
                }
            }
            out
        }
    }

    fn set_edge_everywhere(g: &mut Vgic) {
        for v in 0..NR_VCPUS {
            assert_eq!(
                g.redist_access(
                    v,
                    MmioAccess::write(sgi_base(v) + GICR_ICFGR1, 4, 0xaaaa_aaaa)
                ),
                MmioResult::Written
            );
        }
        dwrite(g, GICD_ICFGR + 8, 4, 0xaaaa_aaaa);
    }

    fn run(
        g: &mut Vgic,
        r: &mut Reference,
        vcpu: usize,
        action: Action,
    ) -> Result<(), TestCaseError> {
        let mut s = g
            .fill_lrs(vcpu, NR_LRS)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let listed = lrs(&s);
        // No INTID twice.
        let mut ids: Vec<u32> = listed.iter().map(|l| l.vintid()).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        prop_assert_eq!(ids.len(), n, "duplicate INTID in LRs");
        // The held interrupt is listed as active.
        if let Some(h) = r.held[vcpu] {
            prop_assert!(
                listed
                    .iter()
                    .any(|l| l.vintid() == h && l.state().is_active()),
                "held INTID {} not listed active",
                h
            );
        }
        // Every pending LR is deliverable in the reference (no spurious, no duplicate).
        let deliverable = r.deliverable(vcpu);
        for l in &listed {
            if l.state() == LrState::Pending {
                prop_assert!(
                    deliverable.contains(&(l.priority(), l.vintid())),
                    "LR {:?} not deliverable; reference {:?}",
                    l,
                    deliverable
                );
            }
        }
        // The most urgent deliverable interrupt is listed (nothing lost).
        let best = deliverable.iter().map(|d| d.0).min();
        let listed_best = listed
            .iter()
            .filter(|l| l.state() == LrState::Pending)
            .map(|l| l.priority())
            .min();
        prop_assert_eq!(best, listed_best);
        prop_assert_eq!(
            s.hcr & ICH_HCR_UIE != 0,
            deliverable.len() + usize::from(r.held[vcpu].is_some()) > NR_LRS
        );

        // The guest.
        let running = r.held[vcpu].map(|h| r.irq(vcpu, h).priority);
        match action {
            Action::Idle => {}
            Action::TakeAndEoi | Action::TakeAndHold => {
                let pick = (0..NR_LRS)
                    .filter(|&i| ListRegister(s.lrs[i]).state() == LrState::Pending)
                    .filter(|&i| running.is_none_or(|rp| ListRegister(s.lrs[i]).priority() < rp))
                    .min_by_key(|&i| (ListRegister(s.lrs[i]).priority(), i));
                let hold = matches!(action, Action::TakeAndHold) && r.held[vcpu].is_none();
                if let Some(i) = pick {
                    let lr = ListRegister(s.lrs[i]);
                    let intid = lr.vintid();
                    r.delivered += 1;
                    let irq = r.irq(vcpu, intid);
                    prop_assert!(irq.pending && irq.enabled && !irq.active);
                    prop_assert_eq!(Some(lr.priority()), best);
                    irq.pending = false;
                    if hold {
                        irq.active = true;
                        r.held[vcpu] = Some(intid);
                        s.lrs[i] = lr.with_state(LrState::Active).0;
                    } else {
                        s.lrs[i] = lr.with_state(LrState::Invalid).0;
                    }
                } else {
                    prop_assert!(best.is_none() || running.is_some_and(|rp| best >= Some(rp)));
                }
            }
            Action::EoiHeld => {
                if let Some(h) = r.held[vcpu].take() {
                    r.irq(vcpu, h).active = false;
                    let i = (0..NR_LRS).find(|&i| {
                        ListRegister(s.lrs[i]).vintid() == h
                            && ListRegister(s.lrs[i]).state().is_active()
                    });
                    let Some(i) = i else {
                        return Err(TestCaseError::fail("held interrupt missing from LRs"));
                    };
                    let lr = ListRegister(s.lrs[i]);
                    let after = if lr.state() == LrState::PendingActive {
                        LrState::Pending
                    } else {
                        LrState::Invalid
                    };
                    s.lrs[i] = lr.with_state(after).0;
                }
            }
        }
        g.sync_from_lrs(vcpu, &s)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        Ok(())
    }

    fn check_idle_state(g: &Vgic, r: &Reference) -> Result<(), TestCaseError> {
        for v in 0..NR_VCPUS {
            let d = r.deliverable(v);
            let best = d.iter().map(|x| x.0).min();
            prop_assert_eq!(g.pending_for(v).map(|p| p.priority), best, "vCPU {}", v);
            prop_assert_eq!(g.has_pending(v), !d.is_empty());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn lr_round_trips_match_reference(
            ops in proptest::collection::vec(op(), 1..120),
            prios in proptest::collection::vec(any::<u8>(), 2 * 8 + 8),
        ) {
            let mut g = gic(NR_VCPUS);
            set_edge_everywhere(&mut g);
            dwrite(&mut g, GICD_CTLR, 4, 0x13);
            let mut r = Reference {
                private: vec![[RefIrq::default(); 32]; NR_VCPUS],
                spis: [RefIrq::default(); 8],
                route: [0; 8],
                group1: true,
                held: [None; NR_VCPUS],
                delivered: 0,
            };
            // Random initial priorities, everything enabled.
            let mut p = prios.iter().copied();
            for v in 0..NR_VCPUS {
                for &intid in &INTIDS[..8] {
                    let prio = p.next().unwrap_or(0);
                    enable(&mut g, v, intid, prio);
                    *r.irq(v, intid) = RefIrq { enabled: true, priority: prio, ..RefIrq::default() };
                }
            }
            for &intid in &INTIDS[8..] {
                let prio = p.next().unwrap_or(0);
                enable(&mut g, 0, intid, prio);
                *r.irq(0, intid) = RefIrq { enabled: true, priority: prio, ..RefIrq::default() };
            }

            for op in ops {
                match op {
                    Op::Inject { vcpu, idx } => {
                        let intid = INTIDS[idx];
                        g.inject_edge(intid, vcpu).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        r.irq(vcpu, intid).pending = true;
                    }
                    Op::Sgi { from, to, idx } => {
                        let aff0 = g.vcpu_mpidr(to).unwrap_or(0) & 0xff;
                        let m = g.send_sgi(from, (idx as u64) << 24 | 1 << aff0)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(m, VcpuMask(1 << to));
                        r.irq(to, idx as u32).pending = true;
                    }
                    Op::Enable { vcpu, idx, on } => {
                        let intid = INTIDS[idx];
                        let reg = if on { GICD_ISENABLER } else { GICD_ICENABLER };
                        if intid < 32 {
                            let res = g.redist_access(vcpu, MmioAccess::write(sgi_base(vcpu) + reg, 4, 1 << intid));
                            prop_assert_eq!(res, MmioResult::Written);
                        } else {
                            dwrite(&mut g, reg + 4, 4, 1 << (intid - 32));
                        }
                        r.irq(vcpu, intid).enabled = on;
                    }
                    Op::Priority { vcpu, idx, prio } => {
                        let intid = INTIDS[idx];
                        if intid < 32 {
                            let res = g.redist_access(vcpu, MmioAccess::write(sgi_base(vcpu) + GICD_IPRIORITYR + u64::from(intid), 1, prio.into()));
                            prop_assert_eq!(res, MmioResult::Written);
                        } else {
                            dwrite(&mut g, GICD_IPRIORITYR + u64::from(intid), 1, prio.into());
                        }
                        r.irq(vcpu, intid).priority = prio;
                    }
                    Op::Route { idx, vcpu } => {
                        let intid = INTIDS[idx];
                        let aff = g.vcpu_mpidr(vcpu).unwrap_or(0);
                        dwrite(&mut g, GICD_IROUTER + 8 * u64::from(intid), 8, aff);
                        r.route[(intid - 32) as usize] = vcpu;
                    }
                    Op::Group1 { on } => {
                        dwrite(&mut g, GICD_CTLR, 4, if on { 0x13 } else { 0x11 });
                        r.group1 = on;
                    }
                    Op::Run { vcpu, action } => run(&mut g, &mut r, vcpu, action)?,
                }
                check_idle_state(&g, &r)?;
            }

            // Drain: complete held interrupts, enable everything, and take until idle. Every
            // pending interrupt must come out exactly once.
            dwrite(&mut g, GICD_CTLR, 4, 0x13);
            r.group1 = true;
            for v in 0..NR_VCPUS {
                run(&mut g, &mut r, v, Action::EoiHeld)?;
                let res = g.redist_access(v, MmioAccess::write(sgi_base(v) + GICD_ISENABLER, 4, 0xffff_ffff));
                prop_assert_eq!(res, MmioResult::Written);
                for &intid in &INTIDS[..8] {
                    r.irq(v, intid).enabled = true;
                }
            }
            dwrite(&mut g, GICD_ISENABLER + 4, 4, 0xffff_ffff);
            for &intid in &INTIDS[8..] {
                r.irq(0, intid).enabled = true;
            }
            let outstanding = (0..NR_VCPUS).map(|v| r.deliverable(v).len()).sum::<usize>();
            let before = r.delivered;
            for _ in 0..(outstanding + 2) {
                for v in 0..NR_VCPUS {
                    run(&mut g, &mut r, v, Action::TakeAndEoi)?;
                }
            }
            prop_assert_eq!(r.delivered - before, outstanding);
            for v in 0..NR_VCPUS {
                prop_assert!(!g.has_pending(v));
                prop_assert!(r.deliverable(v).is_empty());
            }
            prop_assert_eq!(dread(&mut g, GICD_ISPENDR + 4, 4), 0);
            prop_assert_eq!(dread(&mut g, GICD_ISACTIVER + 4, 4), 0);
        }
    }
}

mod prop_level {
    //! Level-sensitive sources against a reference: a line per INTID and the guest's active
    //! state. The guest must see an interrupt exactly while its line is high and it is not
    //! active, and every deactivation of a level interrupt must be observable (EOI bit).
    use super::*;
    use proptest::prelude::*;

    /// The virtual timer PPI and two SPIs, with distinct priorities.
    const SOURCES: [(u32, u8); 3] = [(VTIMER_INTID, 0x20), (33, 0x80), (40, 0x40)];

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Line(usize, bool),
        /// Enter, optionally acknowledge the most urgent pending LR, optionally deactivate
        /// it (or a previously held one) before exiting.
        Run {
            take: bool,
            deactivate: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..SOURCES.len(), any::<bool>()).prop_map(|(i, l)| Op::Line(i, l)),
            (any::<bool>(), any::<bool>())
                .prop_map(|(take, deactivate)| Op::Run { take, deactivate }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn level_interrupts_follow_their_lines(ops in proptest::collection::vec(op(), 1..80)) {
            let mut g = gic(1);
            for &(intid, prio) in &SOURCES {
                enable(&mut g, 0, intid, prio);
            }
            let mut line = [false; SOURCES.len()];
            let mut active = [false; SOURCES.len()];
            let idx = |intid: u32| SOURCES.iter().position(|s| s.0 == intid);
            for op in ops {
                match op {
                    Op::Line(i, l) => {
                        g.set_irq_level(SOURCES[i].0, 0, l)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        line[i] = l;
                    }
                    Op::Run { take, deactivate } => {
                        let mut s = g.fill_lrs(0, 4).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        for (i, &(intid, _)) in SOURCES.iter().enumerate() {
                            let lr = lrs(&s).into_iter().find(|l| l.vintid() == intid);
                            let expect = match (line[i] && !active[i], active[i]) {
                                (true, _) => Some(LrState::Pending),
                                (false, true) => Some(LrState::Active),
                                (false, false) => None,
                            };
                            prop_assert_eq!(lr.map(|l| l.state()), expect, "INTID {}", intid);
                            if let Some(l) = lr {
                                prop_assert!(l.eoi(), "level interrupts always carry EOI");
                            }
                        }
                        let mut taken = None;
                        if take {
                            let pick = (0..4)
                                .filter(|&n| ListRegister(s.lrs[n]).state() == LrState::Pending)
                                .min_by_key(|&n| ListRegister(s.lrs[n]).priority());
                            if let Some(n) = pick {
                                let lr = ListRegister(s.lrs[n]);
                                let i = idx(lr.vintid()).ok_or_else(|| TestCaseError::fail("unknown INTID"))?;
                                s.lrs[n] = lr.with_state(LrState::Active).0;
                                active[i] = true;
                                taken = Some(n);
                            }
                        }
                        if deactivate {
                            // Deactivate the one just taken, else any active one.
                            let n = taken.or_else(|| {
                                (0..4).find(|&n| ListRegister(s.lrs[n]).state() == LrState::Active)
                            });
                            if let Some(n) = n {
                                let lr = ListRegister(s.lrs[n]);
                                let i = idx(lr.vintid()).ok_or_else(|| TestCaseError::fail("unknown INTID"))?;
                                s.lrs[n] = lr.with_state(LrState::Invalid).0;
                                active[i] = false;
                            }
                        }
                        g.sync_from_lrs(0, &s).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                }
                let best = SOURCES
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| line[i] && !active[i])
                    .min_by_key(|&(_, s)| s.1)
                    .map(|(_, s)| s.0);
                prop_assert_eq!(g.pending_for(0).map(|p| p.intid), best);
                let ispend = rread(&mut g, sgi_base(0) + GICD_ISPENDR, 4);
                prop_assert_eq!(ispend & (1 << VTIMER_INTID) != 0, line[0]);
                let isactive = dread(&mut g, GICD_ISACTIVER + 4, 4);
                prop_assert_eq!(isactive & (1 << 1) != 0, active[1]);
            }
        }
    }
}

/// `Vgic::validate`: a state restored from a snapshot must keep every invariant the model and
/// the list-register code rely on.
mod validate {
    use super::*;

    fn bad(g: &Vgic, what: &str) {
        match g.validate() {
            Err(VgicError::InvalidState(why)) => {
                assert!(why.contains(what), "expected `{what}`, got `{why}`")
            }
            other => panic!("expected a refusal for `{what}`, got {other:?}"),
        }
    }

    #[test]
    fn states_the_model_makes_are_valid() {
        for n in [1, 2, 8, MAX_VCPUS] {
            gic(n).validate().expect("reset state");
        }
        // A busy state: enabled, pending, active, routed SPIs, synced after an entry.
        let mut g = gic(2);
        dwrite(&mut g, GICD_CTLR, 4, 0x3);
        dwrite(&mut g, GICD_ISENABLER + 4, 4, 0xffff_ffff);
        dwrite(&mut g, GICD_ISPENDR + 4, 4, 0x0000_00ff);
        dwrite(&mut g, GICD_ISACTIVER + 4, 4, 0x0000_0f00);
        dwrite(&mut g, GICD_IROUTER + 8 * 40, 8, qemu_virt_mpidr(1));
        dwrite(&mut g, GICD_IROUTER + 8 * 41, 8, 0x77); // names no vCPU
        g.set_irq_level(VTIMER_INTID, 1, true).unwrap();
        let cpuif = g.fill_lrs(0, 4).unwrap();
        g.validate().expect_err("LRs filled: not a synced state");
        g.sync_from_lrs(0, &cpuif).unwrap();
        g.validate().expect("synced busy state");
        let nr = Vgic::new(&VgicConfig {
            mpidrs: vec![0],
            nr_irqs: 1024,
        })
        .unwrap();
        nr.validate().expect("1024 INTIDs");
    }

    #[test]
    fn refuses_bad_sizes() {
        let mut g = gic(1);
        g.nr_irqs = 100;
        bad(&g, "nr_irqs");
        g.nr_irqs = 2048;
        bad(&g, "nr_irqs");
        // More SPIs than nr_irqs says: INTIDs past the table (here up to 1055) would be
        // given to list registers.
        let mut g = gic(1);
        g.spis = vec![Irq::reset(false, 0); 1024];
        bad(&g, "SPI table");
        let mut g = gic(1);
        g.spis.pop();
        bad(&g, "SPI table");
        let mut g = gic(1);
        g.vcpus.clear();
        bad(&g, "vCPU count");
        let mut g = gic(1);
        let extra = g.vcpus[0].clone();
        for i in 0..MAX_VCPUS {
            let mut v = extra.clone();
            v.mpidr = 0x100 + i as u64;
            g.vcpus.push(v);
        }
        bad(&g, "vCPU count");
    }

    /// What an unchecked state with a long SPI table does: a pending, enabled SPI past INTID
    /// 1019 reaches a list register (special INTIDs there are UNPREDICTABLE). `validate`
    /// stops such a state before it is used.
    #[test]
    fn a_long_spi_table_would_put_special_intids_in_list_registers() {
        let mut g = gic(1);
        g.enable_grp1 = true;
        let mut irq = Irq::reset(false, 0);
        irq.enabled = true;
        irq.latch = true;
        irq.target = Some(0);
        g.spis = vec![Irq::reset(false, 0); 1000];
        g.spis[1020 - 32] = irq;
        let cpuif = g.fill_lrs(0, 4).unwrap();
        assert_eq!(ListRegister(cpuif.lrs[0]).vintid(), 1020);
        let mut g = gic(1);
        g.spis = vec![Irq::reset(false, 0); 1000];
        bad(&g, "SPI table");
    }

    #[test]
    fn refuses_bad_vcpu_state() {
        let mut g = gic(2);
        g.vcpus[1].mpidr = g.vcpus[0].mpidr;
        bad(&g, "share an MPIDR");
        let mut g = gic(2);
        g.vcpus[1].mpidr |= 1 << 31;
        bad(&g, "affinity");
        let mut g = gic(1);
        g.vcpus[0].slots[3] = Some(Slot { intid: 27, lr: 0 });
        bad(&g, "list registers");
        let mut g = gic(1);
        g.vcpus[0].vmcr = 1 << 5;
        bad(&g, "ICH_VMCR_EL2");
        let mut g = gic(1);
        g.vcpus[0].vmcr = 1 << 32;
        bad(&g, "ICH_VMCR_EL2");
        let mut g = gic(1);
        g.vcpus[0].vmcr = ICH_VMCR_DEFINED;
        g.vcpus[0].ap0r = [u32::MAX; 4];
        g.validate()
            .expect("every defined VMCR field and any APR value");
    }

    #[test]
    fn refuses_bad_interrupt_state() {
        let resident = Residency {
            vcpu: 0,
            pending: true,
            active: false,
            latched: true,
            pending_cleared: false,
            active_cleared: false,
        };
        let mut g = gic(2);
        g.vcpus[0].private[27].resident = Some(resident);
        bad(&g, "resident");
        let mut g = gic(2);
        g.spis[3].resident = Some(resident);
        bad(&g, "resident");
        let mut g = gic(2);
        g.vcpus[1].private[20].owner = 0;
        bad(&g, "owned by another vCPU");
        let mut g = gic(2);
        g.vcpus[0].private[3].edge = false;
        bad(&g, "SGI is level");
        let mut g = gic(2);
        g.vcpus[0].private[20].target = Some(0);
        bad(&g, "route");
        let mut g = gic(2);
        g.vcpus[0].private[20].route = 1;
        bad(&g, "route");
        let mut g = gic(2);
        g.spis[0].owner = 2;
        bad(&g, "does not exist");
        let mut g = gic(2);
        g.spis[0].route = 1 << 31;
        bad(&g, "affinity");
        let mut g = gic(2);
        g.spis[0].target = Some(1); // route 0 names vCPU 0
        bad(&g, "target");
        let mut g = gic(2);
        g.spis[0].target = Some(9);
        bad(&g, "target");
        let mut g = gic(2);
        g.spis[0].route = 0x77;
        bad(&g, "target"); // names nobody, but the cached target still says vCPU 0
        g.spis[0].target = None;
        g.validate().expect("a route that names nobody");
        let mut g = gic(2);
        g.vcpus[1].private[30].priority = 0xff;
        g.spis[7].priority = 0x01;
        g.spis[8].line = true;
        g.spis[8].active = true;
        g.spis[8].owner = 1;
        g.validate().expect("any priority, line, active state");
    }
}

#[test]
fn try_clone_is_an_exact_copy_and_shared_copies_on_first_write() {
    let mut g = gic(4);
    enable(&mut g, 1, 40, 0x80);
    enable(&mut g, 0, 27, 0x80);
    g.inject_edge(40, 1).unwrap();
    let copy = g.try_clone().expect("a copy");
    assert_eq!(format!("{copy:?}"), format!("{g:?}"));
    assert!(g.copy_bytes() >= core::mem::size_of::<Vgic>() + 4 * 32 * 8);

    let mut a = crate::shared::Shared::new(g);
    let b = a.clone();
    a.try_make_mut().unwrap().inject_edge(27, 0).unwrap();
    assert!(!a.is_shared());
    assert_eq!(format!("{:?}", *b), format!("{copy:?}"), "b is untouched");
    assert_ne!(
        format!("{:?}", *a),
        format!("{copy:?}"),
        "the write went to a's copy"
    );
}
