//! VMSAv8-64 stage-2 descriptor encoding (ARM ARM D8.3, 4 KiB granule), plus the software bits
//! this module gives meaning to.
//!
//! ```text
//!  63   59 58 57 56 55 54 53 52 51 50     48 47                     12 11 10 9  8 7  6 5     2 1 0
//! +-------+--+--+--+--+-----+--+--+----------+-------------------------+--+--+----+----+--------+-+-+
//! |  ign  |  |UM|MK|CW| XN  |  |DBM|         | output address [47:12]  |  |AF| SH |S2AP|MemAttr |T|V|
//! +-------+--+--+--+--+-----+--+--+----------+-------------------------+--+--+----+----+--------+-+-+
//!  CW (55) = COW: leaf write-protected because its frame is shared; a write copies or re-enables.
//!  MK (56) = marker: an INVALID entry (V=0) naming a possibly shared next-level table in [47:12].
//!  UM (57) = unmanaged: leaf maps memory the frame allocator does not count (device MMIO).
//! ```
//! DBM (bit 51) is never set: with VTCR_EL2.HD the CPU would make a read-only leaf writable by
//! itself and COW would be lost. AF (bit 10) is set in every valid leaf (VTCR_EL2.HA is off).

use crate::addr::PhysAddr;

/// Bit 0: the descriptor is valid.
pub const VALID: u64 = 1 << 0;
/// Bit 1: table descriptor (levels 1, 2) or page descriptor (level 3).
pub const TABLE_OR_PAGE: u64 = 1 << 1;
/// `MemAttr[5:2]` shift.
pub const MEMATTR_SHIFT: u32 = 2;
/// MemAttr = 0b1111: Normal memory, Outer and Inner Write-Back Cacheable.
pub const MEMATTR_NORMAL_WB: u64 = 0b1111 << MEMATTR_SHIFT;
/// MemAttr = 0b0001: Device-nGnRE.
pub const MEMATTR_DEVICE_NGNRE: u64 = 0b0001 << MEMATTR_SHIFT;
/// MemAttr field mask.
pub const MEMATTR_MASK: u64 = 0b1111 << MEMATTR_SHIFT;
/// `S2AP[7:6]` = 0b01: read-only.
pub const S2AP_RO: u64 = 0b01 << 6;
/// `S2AP[7:6]` = 0b11: read/write.
pub const S2AP_RW: u64 = 0b11 << 6;
/// S2AP field mask.
pub const S2AP_MASK: u64 = 0b11 << 6;
/// `SH[9:8]` = 0b11: Inner Shareable.
pub const SH_INNER: u64 = 0b11 << 8;
/// Access flag, bit 10.
pub const AF: u64 = 1 << 10;
/// Dirty Bit Modifier, bit 51: never set by this module.
pub const DBM: u64 = 1 << 51;
/// `XN[54:53]` = 0b10: execute-never at EL1 and EL0.
pub const XN: u64 = 0b10 << 53;
/// XN field mask.
pub const XN_MASK: u64 = 0b11 << 53;
/// Software bit 55: COW leaf (read-only because its frame is shared).
pub const SW_COW: u64 = 1 << 55;
/// Software bit 56: marker (invalid entry naming a shared next-level table).
pub const SW_MARKER: u64 = 1 << 56;
/// Software bit 57: unmanaged leaf (not reference counted, never COW).
pub const SW_UNMANAGED: u64 = 1 << 57;
/// Output address bits `[47:12]`.
pub const OA_MASK: u64 = 0x0000_ffff_ffff_f000;

/// What a descriptor is, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desc {
    /// Invalid, no software meaning: nothing mapped.
    Empty,
    /// Valid table descriptor (levels 1 and 2): the next-level table is private to this VM.
    Table(PhysAddr),
    /// Invalid marker (levels 1 and 2): the next-level table may be shared; walk it in software.
    Marker(PhysAddr),
    /// Valid page descriptor (level 3).
    Page(PhysAddr),
    /// Anything else (a block descriptor, a reserved encoding): never written by this module.
    Other,
}

/// Decodes descriptor `d` found at translation level `level` (1, 2 or 3).
pub fn decode(d: u64, level: u8) -> Desc {
    let oa = PhysAddr(d & OA_MASK);
    if d & VALID == 0 {
        if d == 0 {
            Desc::Empty
        } else if d & SW_MARKER != 0 && level < 3 && d & !(OA_MASK | SW_MARKER) == 0 {
            Desc::Marker(oa)
        } else {
            Desc::Other
        }
    } else if d & TABLE_OR_PAGE == 0 {
        Desc::Other // block descriptor (levels 1, 2) or reserved (level 3)
    } else if level < 3 {
        Desc::Table(oa)
    } else {
        Desc::Page(oa)
    }
}

/// A valid table descriptor pointing at `table`.
pub fn table(table: PhysAddr) -> u64 {
    (table.0 & OA_MASK) | TABLE_OR_PAGE | VALID
}

/// An invalid marker naming `table`.
pub fn marker(table: PhysAddr) -> u64 {
    (table.0 & OA_MASK) | SW_MARKER
}

/// Access permissions of a stage-2 leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Perms {
    /// Writable (S2AP = RW); otherwise read-only.
    pub write: bool,
    /// Executable at EL1/EL0 (XN = 0b00); otherwise XN = 0b10.
    pub exec: bool,
}

impl Perms {
    /// Read, write and execute: ordinary guest RAM.
    pub const RWX: Perms = Perms {
        write: true,
        exec: true,
    };
    /// Read and write, no execute: device registers.
    pub const RW: Perms = Perms {
        write: true,
        exec: false,
    };
    /// Read and execute only: a ROM.
    pub const RX: Perms = Perms {
        write: false,
        exec: true,
    };
}

/// A level-3 page descriptor for Normal Write-Back, Inner Shareable RAM at `pa`.
pub fn ram_page(pa: PhysAddr, perms: Perms) -> u64 {
    leaf(pa, perms) | MEMATTR_NORMAL_WB | SH_INNER
}

/// A level-3 page descriptor for Device-nGnRE memory at `pa`, marked unmanaged.
pub fn device_page(pa: PhysAddr, perms: Perms) -> u64 {
    leaf(
        pa,
        Perms {
            exec: false,
            ..perms
        },
    ) | MEMATTR_DEVICE_NGNRE
        | SW_UNMANAGED
}

fn leaf(pa: PhysAddr, perms: Perms) -> u64 {
    let ap = if perms.write { S2AP_RW } else { S2AP_RO };
    let xn = if perms.exec { 0 } else { XN };
    (pa.0 & OA_MASK) | ap | xn | AF | TABLE_OR_PAGE | VALID
}

/// The leaf's permissions as the hardware applies them.
pub fn perms(d: u64) -> Perms {
    Perms {
        write: d & S2AP_MASK == S2AP_RW,
        exec: d & XN_MASK == 0,
    }
}

/// True when the leaf is writable (S2AP = RW).
pub fn is_writable(d: u64) -> bool {
    d & S2AP_MASK == S2AP_RW
}

/// True when the leaf carries the COW software bit.
pub fn is_cow(d: u64) -> bool {
    d & SW_COW != 0
}

/// True when the leaf maps unmanaged (device) memory.
pub fn is_unmanaged(d: u64) -> bool {
    d & SW_UNMANAGED != 0
}

/// The COW form of a leaf whose frame is (or is about to be) shared: a writable leaf becomes
/// read-only with the COW bit; a read-only or unmanaged leaf is unchanged.
pub fn write_protect(d: u64) -> u64 {
    if is_writable(d) && !is_unmanaged(d) {
        (d & !S2AP_MASK) | S2AP_RO | SW_COW
    } else {
        d
    }
}

/// A COW leaf made writable again (the COW bit cleared, S2AP = RW), optionally with a new frame.
pub fn make_writable(d: u64, pa: PhysAddr) -> u64 {
    (d & !(OA_MASK | S2AP_MASK | SW_COW)) | (pa.0 & OA_MASK) | S2AP_RW
}

/// The same leaf pointing at another frame (attributes and permissions kept).
pub fn with_oa(d: u64, pa: PhysAddr) -> u64 {
    (d & !OA_MASK) | (pa.0 & OA_MASK)
}

/// True when changing valid descriptor `old` into valid descriptor `new` needs break-before-make:
/// the output address, the memory type or the shareability change (ARM ARM D8.16.1: a change of
/// output address or attributes of a live entry needs BBM; a change of permissions alone does not).
pub fn needs_bbm(old: u64, new: u64) -> bool {
    const BBM_FIELDS: u64 = OA_MASK | MEMATTR_MASK | (0b11 << 8) | TABLE_OR_PAGE;
    (old ^ new) & BBM_FIELDS != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_follow_the_arm_arm() {
        let p = PhysAddr(0x4012_3000);
        let d = ram_page(p, Perms::RWX);
        assert_eq!(
            d,
            0x4012_3000 | 0b11 | (0b1111 << 2) | (0b11 << 6) | (0b11 << 8) | (1 << 10)
        );
        assert_eq!(decode(d, 3), Desc::Page(p));
        assert_eq!(decode(d, 2), Desc::Table(p));
        assert_eq!(d & DBM, 0);
        let ro = write_protect(d);
        assert!(!is_writable(ro) && is_cow(ro));
        assert_eq!(make_writable(ro, p), d);
        assert!(!needs_bbm(d, ro));
        assert!(needs_bbm(d, with_oa(d, PhysAddr(0x5000))));
        let dev = device_page(PhysAddr(0x0900_0000), Perms::RWX);
        assert_eq!(dev & MEMATTR_MASK, 0b0001 << 2);
        assert_eq!(perms(dev), Perms::RW);
        assert_eq!(write_protect(dev), dev);
        assert_eq!(decode(marker(p), 1), Desc::Marker(p));
        assert_eq!(decode(marker(p), 3), Desc::Other);
        assert_eq!(decode(table(p), 1), Desc::Table(p));
        assert_eq!(decode(0, 2), Desc::Empty);
        assert_eq!(decode(0x4000_0001, 2), Desc::Other); // a block descriptor
        assert_eq!(perms(ram_page(p, Perms::RX)), Perms::RX);
    }
}
