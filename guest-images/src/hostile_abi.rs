//! The portable half of the hostile guests (`hostile`, `cowmmu`): a fixed-seed PRNG, the
//! choice of random hypercalls that cannot change the caller's state, the register values
//! the architecture fixes for the accesses they check, and what each page of `cowmmu`'s region
//! must hold after the fork. Host-tested here, against the monitor's
//! own decoder (`vmfork-core`, a dev-dependency only).

/// xorshift64* (Vigna): a small, fixed-seed pseudo-random sequence, the same on every run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prng(u64);

impl Prng {
    /// A generator from `seed` (0 is replaced: xorshift has no zero state).
    pub const fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (`n` > 0; 0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// SMCCC function IDs whose call changes the caller's state (powers a CPU on or off, suspends
/// it, ends or forks the VM): a random-call run leaves them out. Bit 16 (the SVE hint) and the
/// upper half of X0 are ignored by the monitor and must be ignored here too.
pub const STATEFUL_IDS: [u32; 10] = [
    0x8400_0001, // CPU_SUSPEND (waits for an interrupt)
    0xc400_0001,
    0x8400_0002, // CPU_OFF
    0x8400_0003, // CPU_ON
    0xc400_0003,
    0x8400_0008, // SYSTEM_OFF
    0x8400_0009, // SYSTEM_RESET
    0x8400_0012, // SYSTEM_RESET2
    0xc600_0001, // VMFORK_FORK
    0xc600_0003, // VMFORK_RESET
];

/// The function IDs the monitor implements (PSCI, SMCCC and vendor calls), whatever their
/// arguments; everything else must answer `NOT_SUPPORTED` in W0.
pub const KNOWN_IDS: [u32; 19] = [
    0x8400_0000, // PSCI_VERSION
    0x8400_0001,
    0xc400_0001,
    0x8400_0002,
    0x8400_0003,
    0xc400_0003,
    0x8400_0004, // AFFINITY_INFO
    0xc400_0004,
    0x8400_0006, // MIGRATE_INFO_TYPE
    0x8400_0008,
    0x8400_0009,
    0x8400_000a, // PSCI_FEATURES
    0x8000_0000, // SMCCC_VERSION
    0x8000_0001, // SMCCC_ARCH_FEATURES
    0x8600_ff01, // Call UID
    0x8600_ff03, // Revision
    0xc600_0001,
    0xc600_0002, // VMFORK_IDENTITY
    0xc600_0003,
];

const SVE_HINT: u32 = 1 << 16;

/// The function the monitor sees in X0 (W0 without the SVE hint).
pub const fn function_of(x0: u64) -> u32 {
    (x0 as u32) & !SVE_HINT
}

/// Whether calling X0 could change the caller's state ([`STATEFUL_IDS`]).
pub fn is_stateful(x0: u64) -> bool {
    STATEFUL_IDS.contains(&function_of(x0))
}

/// Whether the monitor implements the function in X0 ([`KNOWN_IDS`]).
pub fn is_known(x0: u64) -> bool {
    KNOWN_IDS.contains(&function_of(x0))
}

/// A random X0 for a hypercall: fully random, or near the PSCI, SMCCC-architecture or vendor
/// ranges (where a decoder is most likely to go wrong), with random upper bits. Never a
/// [stateful](is_stateful) call.
pub fn random_function(rng: &mut Prng) -> u64 {
    loop {
        let upper = rng.next_u64() & 0xffff_ffff_0000_0000;
        let low = rng.next_u64() as u32;
        let id = match rng.below(5) {
            0 => low,
            1 => 0x8400_0000 | (low & 0x4001_001f),
            2 => 0x8000_0000 | (low & 0x4001_80ff),
            3 => 0x8600_0000 | (low & 0x4001_ff07),
            _ => KNOWN_IDS[rng.below(KNOWN_IDS.len() as u64) as usize] | (low & SVE_HINT),
        };
        let x0 = upper | u64::from(id);
        if !is_stateful(x0) {
            return x0;
        }
    }
}

/// W0 of an SMCCC call the callee does not implement: `NOT_SUPPORTED` (-1).
pub const NOT_SUPPORTED_W0: u32 = 0xffff_ffff;

/// `ICC_SGI1R_EL1`-format value sending SGI `intid` to the PEs of Aff3.Aff2.Aff1 = 0 in
/// `target_list` (IRM = 0, RS = 0), the way all three SGI registers take it.
pub const fn sgi_value(intid: u32, target_list: u16) -> u64 {
    ((intid as u64 & 0xf) << 24) | target_list as u64
}

/// The register image of a big-endian `size`-byte load of a little-endian device register
/// holding `value`: its bytes reversed (what a CPU with SCTLR_EL1.EE = 1 loads).
pub const fn big_endian_image(value: u64, size: u8) -> u64 {
    match size {
        1 => value & 0xff,
        2 => (value as u16).swap_bytes() as u64,
        4 => (value as u32).swap_bytes() as u64,
        _ => value.swap_bytes(),
    }
}

/// ESR_ELx fault status of a synchronous external abort (not on a table walk).
pub const FSC_SYNC_EXTERNAL: u64 = 0x10;
/// ESR_ELx fault status of an alignment fault.
pub const FSC_ALIGNMENT: u64 = 0x21;

/// Whether `fsc` is an address size fault (levels 0-3: 0b0000LL).
pub const fn is_address_size_fault(fsc: u64) -> bool {
    fsc & 0x3c == 0
}

/// The physical address width `ID_AA64MMFR0_EL1.PARange` names (bits), or `None` for a
/// reserved value.
pub const fn pa_bits(mmfr0: u64) -> Option<u32> {
    match mmfr0 & 0xf {
        0 => Some(32),
        1 => Some(36),
        2 => Some(40),
        3 => Some(42),
        4 => Some(44),
        5 => Some(48),
        6 => Some(52),
        7 => Some(56),
        _ => None,
    }
}

/// How `cowmmu` writes one page of its region after the fork (by page number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageOp {
    /// Not written after the fork: keeps the pattern written before it, in both VMs.
    Untouched,
    /// `STR` of every word.
    Store,
    /// `STP` of every pair of words.
    StorePair,
    /// `LDADD` of the version into word 0, `STR` of the others.
    Atomic,
    /// An `LDXR`/`STXR` loop adding `version << 8` to word 0, `STR` of the others.
    Exclusive,
    /// `DC ZVA` of the first block, `STR` of the words after it.
    ZeroBlock,
}

/// The operation for page `page` (every eighth page is left untouched).
pub const fn page_op(page: u64) -> PageOp {
    if page % 8 == 7 {
        return PageOp::Untouched;
    }
    match page % 5 {
        0 => PageOp::Store,
        1 => PageOp::StorePair,
        2 => PageOp::Atomic,
        3 => PageOp::Exclusive,
        _ => PageOp::ZeroBlock,
    }
}

/// The operation `cowmmu` does on `page` on a CPU with or without FEAT_LSE and DC ZVA (`zva`
/// = its block size, 0 when prohibited): an atomic becomes an exclusive loop, a zeroed block
/// plain stores.
pub const fn effective_op(page: u64, lse: bool, zva: u64) -> PageOp {
    match page_op(page) {
        PageOp::Atomic if !lse => PageOp::Exclusive,
        PageOp::ZeroBlock if zva == 0 => PageOp::Store,
        op => op,
    }
}

/// The word at `addr` of a page (whose first word is at `page_base`) after a VM with pattern
/// `version` did `op` on it, `zva` being the DC ZVA block size in bytes.
pub fn expected_word(addr: u64, page_base: u64, op: PageOp, version: u64, zva: u64) -> u64 {
    use crate::cow::{versioned_pattern, VERSION_BEFORE_FORK};
    let first = addr == page_base;
    match op {
        PageOp::Untouched => versioned_pattern(addr, VERSION_BEFORE_FORK),
        PageOp::Store | PageOp::StorePair => versioned_pattern(addr, version),
        PageOp::Atomic if first => {
            versioned_pattern(addr, VERSION_BEFORE_FORK).wrapping_add(version)
        }
        PageOp::Exclusive if first => {
            versioned_pattern(addr, VERSION_BEFORE_FORK).wrapping_add(version << 8)
        }
        PageOp::ZeroBlock if addr < page_base + zva => 0,
        _ => versioned_pattern(addr, version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vmfork_core::psci;

    #[test]
    fn the_lists_match_the_monitors_decoder() {
        for id in KNOWN_IDS {
            assert!(
                !matches!(
                    psci::decode(u64::from(id), 0, 0, 0),
                    psci::PsciCall::Unknown { .. }
                ),
                "{id:#x}"
            );
        }
        for id in STATEFUL_IDS {
            assert!(is_stateful(
                u64::from(id) | 0xdead_0000_0000_0000 | u64::from(SVE_HINT)
            ));
        }
        assert!(!is_stateful(0x8400_0000));
        assert_eq!(function_of(0xffff_ffff_8401_0000), 0x8400_0000);
    }

    #[test]
    fn prng_is_fixed_and_spread() {
        let mut a = Prng::new(1);
        let mut b = Prng::new(1);
        let xs: Vec<u64> = (0..1000).map(|_| a.next_u64()).collect();
        assert!(xs.iter().all(|&x| x == b.next_u64()));
        let mut sorted = xs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 1000);
        assert_eq!(Prng::new(0).below(0), 0);
    }

    #[test]
    fn architected_values() {
        assert_eq!(sgi_value(6, 1), 0x0600_0001);
        assert_eq!(big_endian_image(0x1234_5678, 4), 0x7856_3412);
        assert_eq!(big_endian_image(0xab, 1), 0xab);
        assert_eq!(big_endian_image(1, 8), 1 << 56);
        assert!(is_address_size_fault(0) && is_address_size_fault(3));
        assert!(!is_address_size_fault(FSC_SYNC_EXTERNAL));
        assert_eq!(pa_bits(5), Some(48));
        assert_eq!(pa_bits(0xf), None);
    }

    #[test]
    fn page_ops_cover_everything_and_tell_the_vms_apart() {
        use crate::cow::{VERSION_CHILD, VERSION_PARENT};
        let ops: Vec<PageOp> = (0..40).map(page_op).collect();
        for op in [
            PageOp::Untouched,
            PageOp::Store,
            PageOp::StorePair,
            PageOp::Atomic,
            PageOp::Exclusive,
            PageOp::ZeroBlock,
        ] {
            assert!(ops.contains(&op), "{op:?}");
        }
        let base = 0x4040_0000;
        for page in 0..40u64 {
            let pb = base + page * 4096;
            for addr in [pb, pb + 8, pb + 64, pb + 4088] {
                let op = effective_op(page, true, 64);
                assert_eq!(op, page_op(page));
                let p = expected_word(addr, pb, op, VERSION_PARENT, 64);
                let c = expected_word(addr, pb, op, VERSION_CHILD, 64);
                let untouched = page_op(page) == PageOp::Untouched;
                let zeroed = page_op(page) == PageOp::ZeroBlock && addr < pb + 64;
                assert_eq!(p == c, untouched || zeroed, "page {page} addr {addr:#x}");
            }
        }
        assert_eq!(effective_op(2, false, 64), PageOp::Exclusive);
        assert_eq!(effective_op(4, true, 0), PageOp::Store);
    }

    proptest! {
        /// Random functions are never stateful, and "known" agrees with the monitor's decoder.
        #[test]
        fn random_functions(seed in any::<u64>()) {
            let mut rng = Prng::new(seed);
            for _ in 0..64 {
                let x0 = random_function(&mut rng);
                prop_assert!(!is_stateful(x0));
                let unknown = matches!(psci::decode(x0, 0, 0, 0), psci::PsciCall::Unknown { .. });
                prop_assert_eq!(is_known(x0), !unknown, "{:#x}", x0);
            }
        }
    }
}
