//! The memory checker's pattern, checksum and region choice.
//!
//! Each 64-bit word holds a value derived from its own address, so a write that lands on the
//! wrong word (aliasing, a bad copy-on-write mapping) is caught as well as a lost write. The
//! checksum folds every word in address order; for a given binary and size it is the same on
//! plain QEMU and under the monitor because the region starts at a fixed place (the first
//! 2 MiB boundary above the image).

use crate::fdt::MemoryRegion;
use core::fmt;

/// Golden-ratio constant mixed into each word's address.
pub const PATTERN_KEY: u64 = 0x9e37_79b9_7f4a_7c15;
/// Alignment of the checked region's start.
pub const REGION_ALIGN: u64 = 2 << 20;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// The value stored in the word at `addr` (8-byte aligned).
pub fn pattern(addr: u64) -> u64 {
    (addr ^ PATTERN_KEY).rotate_left(((addr >> 3) & 63) as u32)
}

/// A 64-bit running checksum over words (an FNV-1a style multiply-xor fold with a final mix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// FNV-1a 64-bit offset basis.
    pub const fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    /// Folds in one word.
    pub fn add(&mut self, word: u64) {
        let h = (self.0 ^ word).wrapping_mul(0x0000_0100_0000_01b3);
        self.0 = h ^ (h >> 29);
    }

    /// The checksum so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Why a region of `mib` MiB cannot be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionError {
    /// `mib=0` was asked for.
    Empty,
    /// The image's end is not inside any RAM region from the DTB.
    ImageNotInRam {
        /// End of the guest image.
        image_end: u64,
    },
    /// The region would run past the end of the RAM that holds the image.
    TooLarge {
        /// MiB asked for.
        mib: u64,
        /// Region start.
        start: u64,
        /// RAM end.
        ram_end: u64,
        /// Largest size that fits, in MiB.
        max_mib: u64,
    },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "mib must be at least 1"),
            Self::ImageNotInRam { image_end } => {
                write!(
                    f,
                    "image end {image_end:#x} is not in any DTB memory region"
                )
            }
            Self::TooLarge {
                mib,
                start,
                ram_end,
                max_mib,
            } => write!(
                f,
                "mib={mib} does not fit: region from {start:#x} would pass RAM end {ram_end:#x} \
                 (at most {max_mib} MiB)"
            ),
        }
    }
}

/// The region `[start, end)` to check: `mib` MiB from the first [`REGION_ALIGN`] boundary at or
/// above `image_end`, inside the RAM region that holds the image.
pub fn region(mib: u64, image_end: u64, ram: &[MemoryRegion]) -> Result<(u64, u64), RegionError> {
    if mib == 0 {
        return Err(RegionError::Empty);
    }
    let holder = ram
        .iter()
        .find(|r| r.base < image_end && image_end <= r.end())
        .ok_or(RegionError::ImageNotInRam { image_end })?;
    let ram_end = holder.end();
    let start = image_end
        .checked_add(REGION_ALIGN - 1)
        .map(|x| x & !(REGION_ALIGN - 1))
        .unwrap_or(u64::MAX);
    let max_mib = ram_end.saturating_sub(start) / MIB;
    match mib.checked_mul(MIB).and_then(|len| start.checked_add(len)) {
        Some(end) if end <= ram_end => Ok((start, end)),
        _ => Err(RegionError::TooLarge {
            mib,
            start,
            ram_end,
            max_mib,
        }),
    }
}

/// The checksum a correct run over `[start, end)` produces (the host-side reference model).
pub fn expected_checksum(start: u64, end: u64) -> u64 {
    let mut c = Checksum::new();
    let mut addr = start;
    while addr < end {
        c.add(pattern(addr));
        addr += 8;
    }
    c.value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: [MemoryRegion; 1] = [MemoryRegion {
        base: 0x4000_0000,
        size: 128 << 20,
    }];

    #[test]
    fn region_starts_on_2mib_boundary() {
        assert_eq!(region(8, 0x4024_3000, &RAM), Ok((0x4040_0000, 0x40c0_0000)));
        assert_eq!(region(1, 0x4040_0000, &RAM), Ok((0x4040_0000, 0x4050_0000)));
    }

    #[test]
    fn region_limits() {
        assert_eq!(region(0, 0x4024_3000, &RAM), Err(RegionError::Empty));
        assert_eq!(
            region(124, 0x4024_3000, &RAM),
            Ok((0x4040_0000, 0x4800_0000))
        );
        let err = region(125, 0x4024_3000, &RAM).unwrap_err();
        assert_eq!(
            err,
            RegionError::TooLarge {
                mib: 125,
                start: 0x4040_0000,
                ram_end: 0x4800_0000,
                max_mib: 124
            }
        );
        assert!(err.to_string().contains("at most 124 MiB"));
        assert!(matches!(
            region(u64::MAX, 0x4024_3000, &RAM),
            Err(RegionError::TooLarge { .. })
        ));
        assert_eq!(
            region(1, 0x1000, &RAM),
            Err(RegionError::ImageNotInRam { image_end: 0x1000 })
        );
    }

    /// Pins the value the `memcheck` guest prints for the default size, so a change to the
    /// pattern, checksum or image layout that moves it is noticed (README contract).
    #[test]
    fn default_checksum_is_stable() {
        let (start, end) = region(8, 0x4025_a000, &RAM).unwrap();
        assert_eq!(expected_checksum(start, end), 0x14e3_b7f3_600d_6f68);
    }

    #[test]
    fn pattern_differs_between_neighbours() {
        let a = 0x4040_0000u64;
        for i in 0..4096u64 {
            assert_ne!(pattern(a + 8 * i), pattern(a + 8 * i + 8));
        }
    }

    #[test]
    fn checksum_is_order_sensitive() {
        let mut x = Checksum::new();
        x.add(1);
        x.add(2);
        let mut y = Checksum::new();
        y.add(2);
        y.add(1);
        assert_ne!(x, y);
    }

    proptest! {
        /// Any single corrupted word changes the checksum of a small region.
        #[test]
        fn corruption_changes_checksum(words in 1usize..512, at in any::<usize>(), flip in 1u64..) {
            let start = 0x4040_0000u64;
            let end = start + 8 * words as u64;
            let good = expected_checksum(start, end);
            let bad_index = (at % words) as u64;
            let mut c = Checksum::new();
            for i in 0..words as u64 {
                let w = pattern(start + 8 * i);
                c.add(if i == bad_index { w ^ flip } else { w });
            }
            prop_assert_ne!(c.value(), good);
        }
    }
}
