//! The copy-on-write checker's portable parts: versioned patterns, the split of the region
//! between CPUs, which pages stay untouched after the fork, and the instruction words of the
//! tiny function the checker patches in both VMs.

#[cfg(test)]
use crate::pattern::pattern;
use crate::pattern::PATTERN_KEY;

/// 4 KiB: the unit of the per-CPU split and of copy-on-write.
pub const PAGE_SIZE: u64 = 4096;

/// Odd multiplier that turns a pattern version into the value mixed into each word.
const VERSION_KEY: u64 = 0xd1b5_4a32_d192_ed03;

/// Pattern version written before the fork (phase 1): the same words as `memcheck`'s.
pub const VERSION_BEFORE_FORK: u64 = 0;
/// Pattern version the parent writes after the fork.
pub const VERSION_PARENT: u64 = 1;
/// Pattern version the child writes after the fork.
pub const VERSION_CHILD: u64 = 2;

/// Every `UNTOUCHED_STRIDE`-th page (the last of each group) is not written after the fork and
/// must still hold the version-0 pattern in both VMs.
pub const UNTOUCHED_STRIDE: u64 = 4;

/// The word at `addr` for pattern `version`: memcheck's pattern with the version mixed in before
/// the address-dependent rotation, so two versions differ in every word and version 0 is exactly
/// [`pattern`].
pub fn versioned_pattern(addr: u64, version: u64) -> u64 {
    (addr ^ PATTERN_KEY ^ version.wrapping_mul(VERSION_KEY)).rotate_left(((addr >> 3) & 63) as u32)
}

/// Whether page number `page` (counted from the region start) keeps its phase-1 contents.
pub fn is_untouched_page(page: u64) -> bool {
    page % UNTOUCHED_STRIDE == UNTOUCHED_STRIDE - 1
}

/// The pages `[first, end)` (counted from the region start) that worker `slot` of `workers`
/// owns when `pages` pages are split as evenly as possible. `None` if `slot >= workers`.
pub fn cpu_slice(pages: u64, workers: u64, slot: u64) -> Option<(u64, u64)> {
    if slot >= workers {
        return None;
    }
    // pages * (slot + 1) cannot overflow for any real region (pages < 2^52, workers <= 2^12),
    // but stay total anyway.
    let at = |s: u64| {
        (u128::from(pages) * u128::from(s) / u128::from(workers))
            .try_into()
            .unwrap_or(u64::MAX)
    };
    Some((at(slot), at(slot + 1)))
}

/// Encodes `MOVZ W0, #imm16` (`mov w0, #imm16`).
pub const fn movz_w0(imm16: u16) -> u32 {
    0x5280_0000 | ((imm16 as u32) << 5)
}

/// `RET` (to x30).
pub const RET: u32 = 0xd65f_03c0;

/// The value the patched function returns before the fork.
pub const CODE_VALUE_BEFORE_FORK: u16 = 42;

/// The value a VM patches into the function after the fork: 42 + its pattern version
/// (43 in the parent, 44 in the child).
pub fn code_value(version: u64) -> u16 {
    CODE_VALUE_BEFORE_FORK.wrapping_add(version as u16)
}

/// Which of the three versions (before the fork, parent, child) `word` at `addr` holds, if any:
/// tells a lost write (old version) from a leak of the other VM's write.
pub fn which_version(addr: u64, word: u64) -> Option<u64> {
    (VERSION_BEFORE_FORK..=VERSION_CHILD).find(|&v| versioned_pattern(addr, v) == word)
}

/// The pattern version page `page` must hold after the fork in a VM that wrote `version`.
pub fn expected_version_after_fork(page: u64, version: u64) -> u64 {
    if is_untouched_page(page) {
        VERSION_BEFORE_FORK
    } else {
        version
    }
}

// An odd multiplier is invertible mod 2^64: distinct versions mix in distinct values, so two
// versions never give the same word at the same address.
const _: () = assert!(VERSION_KEY % 2 == 1);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn instruction_words() {
        assert_eq!(movz_w0(42), 0x5280_0540);
        assert_eq!(movz_w0(43), 0x5280_0560);
        assert_eq!(movz_w0(0xffff), 0x529f_ffe0);
        assert_eq!(code_value(VERSION_PARENT), 43);
        assert_eq!(code_value(VERSION_CHILD), 44);
    }

    #[test]
    fn untouched_pages() {
        let kept: Vec<u64> = (0..12).filter(|&p| is_untouched_page(p)).collect();
        assert_eq!(kept, [3, 7, 11]);
        assert_eq!(expected_version_after_fork(3, VERSION_CHILD), 0);
        assert_eq!(expected_version_after_fork(4, VERSION_CHILD), VERSION_CHILD);
    }

    #[test]
    fn slices_of_small_regions() {
        assert_eq!(cpu_slice(1024, 4, 0), Some((0, 256)));
        assert_eq!(cpu_slice(1024, 4, 3), Some((768, 1024)));
        assert_eq!(cpu_slice(256, 3, 0), Some((0, 85)));
        assert_eq!(cpu_slice(256, 3, 2), Some((170, 256)));
        assert_eq!(cpu_slice(256, 3, 3), None);
        assert_eq!(cpu_slice(256, 0, 0), None);
    }

    #[test]
    fn versions_are_told_apart() {
        let addr = 0x4040_1238;
        for v in 0..3 {
            assert_eq!(which_version(addr, versioned_pattern(addr, v)), Some(v));
        }
        assert_eq!(which_version(addr, versioned_pattern(addr + 8, 0)), None);
        assert_eq!(which_version(addr, versioned_pattern(addr, 3)), None);
    }

    proptest! {
        /// Version 0 is memcheck's pattern; the three versions differ in every word.
        #[test]
        fn versions_differ_everywhere(word in 0u64..(1 << 45)) {
            let addr = word * 8;
            prop_assert_eq!(versioned_pattern(addr, 0), pattern(addr));
            let v: Vec<u64> = (0..3).map(|k| versioned_pattern(addr, k)).collect();
            prop_assert_ne!(v[0], v[1]);
            prop_assert_ne!(v[0], v[2]);
            prop_assert_ne!(v[1], v[2]);
        }

        /// Within a version, neighbouring words differ, so a misplaced page or word is caught.
        #[test]
        fn neighbours_differ(word in 0u64..(1 << 45), version in 0u64..3) {
            let addr = word * 8;
            prop_assert_ne!(versioned_pattern(addr, version), versioned_pattern(addr + 8, version));
            prop_assert_ne!(
                versioned_pattern(addr, version),
                versioned_pattern(addr + PAGE_SIZE, version)
            );
        }

        /// The slices partition [0, pages) in order: disjoint, complete, each at least
        /// floor(pages / workers) long.
        #[test]
        fn slices_partition(pages in 0u64..100_000, workers in 1u64..64) {
            let mut next = 0;
            for slot in 0..workers {
                let (first, end) = cpu_slice(pages, workers, slot).unwrap();
                prop_assert_eq!(first, next);
                prop_assert!(end >= first);
                prop_assert!(end - first >= pages / workers);
                prop_assert!(end - first <= pages / workers + 1);
                next = end;
            }
            prop_assert_eq!(next, pages);
        }
    }
}
