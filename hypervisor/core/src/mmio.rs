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
