//! GICv3 register encodings (Arm IHI 0069) that the driver computes: the portable half of
//! `arch::gic`, unit-tested on the host.
//!
//! - Where an INTID's bits live in the one-bit-per-INTID registers (`GICD_IGROUPR<n>`,
//!   `GICD_ISENABLER<n>`, ...), in `GICD_IPRIORITYR<n>` (one byte each) and in `GICD_ICFGR<n>`
//!   (two bits each, bit 2m+1 = edge-triggered).
//! - `GICD_IROUTER<n>` with affinity routing to one PE (Interrupt_Routing_Mode = 0).
//! - `ICC_SGI1R_EL1` for one target PE named by its MPIDR affinity.
//! - The INTID of a device-tree `interrupts` specifier of the `arm,gic-v3` binding.

use core::fmt;

/// Number of SGIs (INTIDs 0-15).
pub const NR_SGIS: u32 = 16;
/// First SPI.
pub const FIRST_SPI: u32 = 32;
/// First special INTID (1020-1023); SPIs end below it.
pub const FIRST_SPECIAL_INTID: u32 = 1020;
/// The affinity fields of an MPIDR (Aff3 in bits 39:32, Aff2..Aff0 in 23:0), also the routing
/// fields of `GICD_IROUTER<n>`.
pub const AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// An INTID that the requested operation does not apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntidError {
    /// Not an SGI (0-15).
    NotSgi(u32),
    /// Not an SPI (32-1019).
    NotSpi(u32),
}

impl fmt::Display for IntidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSgi(i) => write!(f, "INTID {i} is not an SGI (0-15)"),
            Self::NotSpi(i) => write!(f, "INTID {i} is not an SPI (32-1019)"),
        }
    }
}

/// A register index and the position of an INTID's field in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Byte offset of the 32-bit register from the first register of its array.
    pub offset: usize,
    /// Bit position of the field's least significant bit.
    pub shift: u32,
}

/// The bit of `intid` in a one-bit-per-INTID register array (`GICD_IGROUPR`,
/// `GICD_ISENABLER`, `GICD_ICENABLER`, ...).
pub const fn bit_field(intid: u32) -> Field {
    Field {
        offset: (intid / 32) as usize * 4,
        shift: intid % 32,
    }
}

/// The byte of `intid` in `GICD_IPRIORITYR` (accessed as 32-bit words).
pub const fn priority_field(intid: u32) -> Field {
    Field {
        offset: (intid / 4) as usize * 4,
        shift: (intid % 4) * 8,
    }
}

/// The two bits of `intid` in `GICD_ICFGR` (bit `shift + 1` set = edge-triggered, clear =
/// level-sensitive; bit `shift` is reserved).
pub const fn config_field(intid: u32) -> Field {
    Field {
        offset: (intid / 16) as usize * 4,
        shift: (intid % 16) * 2,
    }
}

/// Byte offset of `GICD_IROUTER<intid>` from `GICD_IROUTER<0>` (8 bytes per INTID).
pub fn irouter_offset(intid: u32) -> Result<usize, IntidError> {
    check_spi(intid)?;
    Ok(intid as usize * 8)
}

/// `GICD_IROUTER<n>` routing an SPI to the one PE with MPIDR affinity `affinity`
/// (Interrupt_Routing_Mode = 0; bits outside the affinity fields are dropped).
pub const fn irouter_value(affinity: u64) -> u64 {
    affinity & AFFINITY_MASK
}

fn check_spi(intid: u32) -> Result<(), IntidError> {
    if (FIRST_SPI..FIRST_SPECIAL_INTID).contains(&intid) {
        Ok(())
    } else {
        Err(IntidError::NotSpi(intid))
    }
}

/// Checks that `intid` is an SPI (32-1019).
pub fn spi(intid: u32) -> Result<u32, IntidError> {
    check_spi(intid).map(|()| intid)
}

/// `ICC_SGI1R_EL1` sending SGI `intid` to the one PE with MPIDR affinity `target`:
/// TargetList (15:0) = bit `Aff0 % 16`, Aff1 (23:16), INTID (27:24), Aff2 (39:32),
/// IRM (40) = 0, RS (47:44) = `Aff0 / 16`, Aff3 (55:48). An RS other than 0 needs
/// `ICC_CTLR_EL1.RSS`; QEMU `virt` and the vmfork monitor give every Aff0 below 16.
pub fn sgi1r_value(intid: u32, target: u64) -> Result<u64, IntidError> {
    if intid >= NR_SGIS {
        return Err(IntidError::NotSgi(intid));
    }
    let aff0 = target & 0xff;
    let aff1 = (target >> 8) & 0xff;
    let aff2 = (target >> 16) & 0xff;
    let aff3 = (target >> 32) & 0xff;
    Ok((1 << (aff0 % 16))
        | aff1 << 16
        | u64::from(intid) << 24
        | aff2 << 32
        | (aff0 / 16) << 44
        | aff3 << 48)
}

/// The INTID of the first interrupt of a device-tree `interrupts` property in the
/// `arm,gic-v3` binding (`<type number flags>`: type 0 = SPI `32 + number`, type 1 = PPI
/// `16 + number`); `None` for anything else (another type, a number out of range, fewer than
/// two cells).
pub fn intid_from_dt(interrupts: &[u8]) -> Option<u32> {
    let cell = |i: usize| {
        interrupts
            .get(i * 4..i * 4 + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let (kind, number) = (cell(0)?, cell(1)?);
    match kind {
        0 => number
            .checked_add(FIRST_SPI)
            .filter(|&i| i < FIRST_SPECIAL_INTID),
        1 if number < 16 => Some(16 + number),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reference for which PEs an ICC_SGI1R_EL1 write reaches, written from the register
    /// description (the same rule as the vmfork monitor's vGIC): a PE whose Aff3.Aff2.Aff1 equal
    /// the value's, whose Aff0 / 16 equals RS, and whose bit Aff0 % 16 is in TargetList.
    fn reaches(value: u64, mpidr: u64) -> bool {
        let same_upper = (value >> 48) & 0xff == (mpidr >> 32) & 0xff
            && (value >> 32) & 0xff == (mpidr >> 16) & 0xff
            && (value >> 16) & 0xff == (mpidr >> 8) & 0xff;
        let aff0 = mpidr & 0xff;
        value & (1 << 40) == 0
            && same_upper
            && (value >> 44) & 0xf == aff0 / 16
            && value & (1 << (aff0 % 16)) != 0
    }

    #[test]
    fn fields_of_the_uart_spi() {
        // INTID 33 (QEMU virt's PL011): word 1 bit 1; priority word 8 byte 1; ICFGR word 2
        // bits 3:2; IROUTER at 0x108 from IROUTER<0>.
        assert_eq!(
            bit_field(33),
            Field {
                offset: 4,
                shift: 1
            }
        );
        assert_eq!(
            priority_field(33),
            Field {
                offset: 32,
                shift: 8
            }
        );
        assert_eq!(
            config_field(33),
            Field {
                offset: 8,
                shift: 2
            }
        );
        assert_eq!(irouter_offset(33), Ok(0x108));
        assert_eq!(irouter_offset(31), Err(IntidError::NotSpi(31)));
        assert_eq!(irouter_offset(1020), Err(IntidError::NotSpi(1020)));
        assert_eq!(spi(1019), Ok(1019));
    }

    #[test]
    fn sgi1r_examples() {
        // SGI 3 to MPIDR 0x1: TargetList bit 1, INTID 3.
        assert_eq!(sgi1r_value(3, 1), Ok(0x0300_0002));
        // SGI 4 to Aff3=1 Aff2=2 Aff1=3 Aff0=0x15: RS 1, TargetList bit 5.
        assert_eq!(
            sgi1r_value(4, 0x1_0002_0315),
            Ok(1 << 48 | 1 << 44 | 2 << 32 | 4 << 24 | 3 << 16 | 1 << 5)
        );
        assert_eq!(sgi1r_value(16, 0), Err(IntidError::NotSgi(16)));
    }

    #[test]
    fn dt_interrupt_specifiers() {
        let spec =
            |cells: &[u32]| -> Vec<u8> { cells.iter().flat_map(|c| c.to_be_bytes()).collect() };
        assert_eq!(intid_from_dt(&spec(&[0, 1, 4])), Some(33));
        assert_eq!(intid_from_dt(&spec(&[1, 11, 4])), Some(27));
        assert_eq!(intid_from_dt(&spec(&[1, 16, 4])), None);
        assert_eq!(intid_from_dt(&spec(&[0, 988, 4])), None);
        assert_eq!(intid_from_dt(&spec(&[0, u32::MAX, 4])), None);
        assert_eq!(intid_from_dt(&spec(&[2, 1, 4])), None);
        assert_eq!(intid_from_dt(&spec(&[0])), None);
        assert_eq!(intid_from_dt(&[0, 0, 0, 0, 0, 0, 1]), None);
    }

    proptest! {
        /// An SGI aimed at one PE reaches exactly that PE among any set of distinct PEs.
        #[test]
        fn sgi_reaches_only_its_target(
            intid in 0u32..16,
            target in any::<u64>(),
            others in proptest::collection::vec(any::<u64>(), 0..16),
        ) {
            let target = target & AFFINITY_MASK;
            let value = sgi1r_value(intid, target).unwrap();
            prop_assert_eq!((value >> 24) & 0xf, u64::from(intid));
            prop_assert!(reaches(value, target));
            for other in others.into_iter().map(|o| o & AFFINITY_MASK) {
                prop_assert_eq!(reaches(value, other), other == target);
            }
        }

        /// Every INTID's fields are inside its register and distinct INTIDs never share one.
        #[test]
        fn fields_do_not_overlap(a in 0u32..1020, b in 0u32..1020) {
            for f in [bit_field, priority_field, config_field] {
                let (fa, fb) = (f(a), f(b));
                prop_assert!(fa.shift < 32 && fa.offset % 4 == 0);
                if a != b {
                    prop_assert!(fa != fb);
                }
            }
            prop_assert_eq!(irouter_value(u64::MAX), AFFINITY_MASK);
        }
    }
}
