//! Stage-2 TLB maintenance, abstracted so the table code runs on the host.
//!
//! At EL2 the monitor implements [`TlbOps`] with the textbook sequence (DESIGN.md): load the
//! target VM's VTTBR_EL2 (TLBI by IPA only reaches the VMID in VTTBR_EL2), `dsb ishst`,
//! `tlbi ipas2e1is, (ipa >> 12)`, `dsb ish`, `tlbi vmalle1is` (combined stage-1+2 entries are
//! tagged by VA, not IPA), `dsb ish`, `isb`; `flush_vmid` is `tlbi vmalls12e1is` under the VM's
//! VTTBR_EL2; `flush_all` (a VMID rollover) is `tlbi alle1is`, every VMID at once. Never
//! `tlbi vae2is`: that is the monitor's own stage 1.

use alloc::vec::Vec;

use crate::addr::Ipa;

/// A virtual machine identifier, as tagged in VTTBR_EL2.VMID and in TLB entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Vmid(pub u16);

/// TLB and table-walk maintenance for stage 2.
pub trait TlbOps {
    /// Invalidates every cached translation of the 4 KiB page at `ipa` for `vmid` (stage-2 and
    /// combined stage-1+2 entries), and completes (the descriptor store that preceded the call is
    /// visible to the walkers first).
    fn flush_ipa(&mut self, vmid: Vmid, ipa: Ipa);
    /// Invalidates every cached translation and walk entry of `vmid`, and completes.
    fn flush_vmid(&mut self, vmid: Vmid);
    /// Invalidates every cached stage-1 and stage-2 translation and walk entry of the guests'
    /// regime (EL1&0), of every VMID, on every CPU of the Inner Shareable domain, and completes:
    /// a VMID rollover does this once before any VMID is given again (`machine::table`).
    fn flush_all(&mut self);
    /// Makes prior descriptor stores visible to the table walkers (`dsb ishst`) before a new
    /// valid entry that reaches them is published.
    fn sync_tables(&mut self) {}
}

/// What a [`FakeTlb`] was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbEvent {
    /// [`TlbOps::flush_ipa`].
    FlushIpa(Vmid, Ipa),
    /// [`TlbOps::flush_vmid`].
    FlushVmid(Vmid),
    /// [`TlbOps::flush_all`].
    FlushAll,
    /// [`TlbOps::sync_tables`].
    Sync,
}

/// Host TLB that records every maintenance call.
#[derive(Clone, Debug, Default)]
pub struct FakeTlb {
    /// Every call, in order.
    pub events: Vec<TlbEvent>,
}

impl FakeTlb {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of flushes (by IPA or by VMID) of `vmid` recorded.
    pub fn flushes_of(&self, vmid: Vmid) -> usize {
        self.events
            .iter()
            .filter(
                |e| matches!(e, TlbEvent::FlushIpa(v, _) | TlbEvent::FlushVmid(v) if *v == vmid),
            )
            .count()
    }
}

impl TlbOps for FakeTlb {
    fn flush_ipa(&mut self, vmid: Vmid, ipa: Ipa) {
        self.events.push(TlbEvent::FlushIpa(vmid, ipa));
    }
    fn flush_vmid(&mut self, vmid: Vmid) {
        self.events.push(TlbEvent::FlushVmid(vmid));
    }
    fn flush_all(&mut self) {
        self.events.push(TlbEvent::FlushAll);
    }
    fn sync_tables(&mut self) {
        self.events.push(TlbEvent::Sync);
    }
}
