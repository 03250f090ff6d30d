//! The shared vocabulary of emulated MMIO: one decoded guest access and its outcome.
//!
//! The arch layer turns a stage-2 data abort (ESR_EL2.EC = 0x24 with ISV set) on an unmapped
//! device page into an [`MmioAccess`] whose offset is relative to the device's base, hands it to
//! the device model (an [`MmioDevice`] or a model-specific method such as the vGIC's
//! distributor and redistributor entry points), and applies the [`MmioResult`]: a read value goes
//! to the transfer register (sign extension per ESR_EL2.SSE is the arch layer's business), a
//! [`MmioResult::Fault`] is reflected to the guest as a synchronous external abort.

use crate::addr::Ipa;

/// One decoded guest access to an emulated device register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// Byte offset of the access from the device's base address.
    pub offset: u64,
    /// Access size in bytes: 1, 2, 4 or 8 (ESR_EL2.SAS).
    pub size: u8,
    /// `Some(value)` for a write (the low `size` bytes are the data), `None` for a read.
    pub write: Option<u64>,
}

impl MmioAccess {
    /// A read of `size` bytes at `offset`.
    pub const fn read(offset: u64, size: u8) -> Self {
        Self {
            offset,
            size,
            write: None,
        }
    }

    /// A write of the low `size` bytes of `value` at `offset`.
    pub const fn write(offset: u64, size: u8, value: u64) -> Self {
        Self {
            offset,
            size,
            write: Some(value),
        }
    }

    /// True when the size is one the architecture can produce (1, 2, 4 or 8 bytes).
    pub const fn size_is_valid(&self) -> bool {
        matches!(self.size, 1 | 2 | 4 | 8)
    }

    /// True when the size is valid and the offset is a multiple of it (natural alignment).
    pub const fn is_naturally_aligned(&self) -> bool {
        self.size_is_valid() && self.offset.is_multiple_of(self.size as u64)
    }

    /// Mask covering the low `size` bytes (all ones for 8 bytes, 0 for an invalid size).
    pub const fn size_mask(&self) -> u64 {
        match self.size {
            1 => 0xff,
            2 => 0xffff,
            4 => 0xffff_ffff,
            8 => u64::MAX,
            _ => 0,
        }
    }

    /// The written data truncated to the access size, or `None` for a read.
    pub fn data(&self) -> Option<u64> {
        self.write.map(|v| v & self.size_mask())
    }
}

/// `SCTLR_EL1.EE`, bit 25: explicit data accesses at EL1 (and stage-1 table walks) are
/// big-endian.
pub const SCTLR_EL1_EE: u64 = 1 << 25;
/// `SCTLR_EL1.E0E`, bit 24: explicit data accesses at EL0 are big-endian.
pub const SCTLR_EL1_E0E: u64 = 1 << 24;

/// Whether a data access trapped from the exception level in `pstate` (the vCPU's SPSR_EL2;
/// AArch64 only) was big-endian under `sctlr_el1`.
///
/// The monitor does not hide mixed-endian support (`ID_AA64MMFR0_EL1.BigEnd`/`BigEndEL0` are
/// passed through): hiding the fields would not make `SCTLR_EL1.EE`/`E0E` RES0 on a CPU that
/// has them (they are not trapped; the hardware honours whatever the guest writes, for every
/// access to RAM), so a guest that set EE anyway would see RAM big-endian and MMIO
/// little-endian. Instead the emulated access is made as the hardware would make it: the data
/// of a big-endian access is byte-reversed between the register and the device ([`swap_bytes`]),
/// as KVM does (`vcpu_data_guest_to_host`).
pub const fn data_is_big_endian(pstate: u64, sctlr_el1: u64) -> bool {
    let el = (pstate >> 2) & 3;
    if el == 0 {
        sctlr_el1 & SCTLR_EL1_E0E != 0
    } else {
        sctlr_el1 & SCTLR_EL1_EE != 0
    }
}

/// Reverses the low `size` bytes of `value` (1, 2, 4 or 8; other sizes are returned unchanged):
/// the register image of a big-endian access from the device's bytes, and back.
pub const fn swap_bytes(value: u64, size: u8) -> u64 {
    match size {
        1 => value & 0xff,
        2 => (value as u16).swap_bytes() as u64,
        4 => (value as u32).swap_bytes() as u64,
        8 => value.swap_bytes(),
        _ => value,
    }
}

/// The outcome of an emulated access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioResult {
    /// A read completed; the value is already truncated to the access size.
    Read(u64),
    /// A write completed (possibly ignored, for write-ignored registers).
    Written,
    /// The access is not allowed (bad size, alignment or offset): the guest gets an external
    /// abort.
    Fault,
}

/// A device that the guest reaches through MMIO.
pub trait MmioDevice {
    /// Performs one access from the vCPU with index `vcpu`; `acc.offset` is relative to the
    /// device's base.
    fn access(&mut self, vcpu: usize, acc: MmioAccess) -> MmioResult;
}

/// A window of guest IPA space occupied by one emulated device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioRegion {
    /// First IPA of the window.
    pub base: Ipa,
    /// Size of the window in bytes.
    pub size: u64,
}

impl MmioRegion {
    /// A window of `size` bytes starting at `base`.
    pub const fn new(base: Ipa, size: u64) -> Self {
        Self { base, size }
    }

    /// The offset of `ipa` from the window's base if `ipa` lies inside the window.
    pub fn offset_of(&self, ipa: Ipa) -> Option<u64> {
        let off = ipa.0.checked_sub(self.base.0)?;
        (off < self.size).then_some(off)
    }

    /// True when `ipa` lies inside the window.
    pub fn contains(&self, ipa: Ipa) -> bool {
        self.offset_of(ipa).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_helpers() {
        let r = MmioAccess::read(0x10, 4);
        assert!(r.is_naturally_aligned());
        assert_eq!(r.data(), None);
        let w = MmioAccess::write(0x12, 2, 0xdead_beef);
        assert!(w.is_naturally_aligned());
        assert_eq!(w.data(), Some(0xbeef));
        assert!(!MmioAccess::read(0x2, 4).is_naturally_aligned());
        assert!(!MmioAccess::read(0x0, 3).is_naturally_aligned());
        assert!(!MmioAccess::read(0x0, 16).size_is_valid());
        assert_eq!(MmioAccess::write(0, 8, u64::MAX).data(), Some(u64::MAX));
    }

    #[test]
    fn endianness_of_trapped_accesses() {
        let el1h = 0x3c5;
        let el0 = 0x0;
        assert!(!data_is_big_endian(el1h, 0));
        assert!(data_is_big_endian(el1h, SCTLR_EL1_EE));
        assert!(!data_is_big_endian(el1h, SCTLR_EL1_E0E));
        assert!(data_is_big_endian(el0, SCTLR_EL1_E0E));
        assert!(!data_is_big_endian(el0, SCTLR_EL1_EE));
        assert_eq!(swap_bytes(0x1122_3344_5566_7788, 1), 0x88);
        assert_eq!(swap_bytes(0x1122_3344_5566_7788, 2), 0x8877);
        assert_eq!(swap_bytes(0x1122_3344_5566_7788, 4), 0x8877_6655);
        assert_eq!(swap_bytes(0x1122_3344_5566_7788, 8), 0x8877_6655_4433_2211);
        for size in [1u8, 2, 4, 8] {
            let m = MmioAccess::read(0, size).size_mask();
            let v = 0x0123_4567_89ab_cdef & m;
            assert_eq!(swap_bytes(swap_bytes(v, size), size), v);
        }
    }

    #[test]
    fn region_offsets() {
        let r = MmioRegion::new(Ipa(0x0900_0000), 0x1000);
        assert_eq!(r.offset_of(Ipa(0x0900_0018)), Some(0x18));
        assert_eq!(r.offset_of(Ipa(0x0900_1000)), None);
        assert_eq!(r.offset_of(Ipa(0x08ff_ffff)), None);
        assert!(r.contains(Ipa(0x0900_0fff)));
        let top = MmioRegion::new(Ipa(u64::MAX - 1), 0x1000);
        assert!(top.contains(Ipa(u64::MAX)));
    }
}
