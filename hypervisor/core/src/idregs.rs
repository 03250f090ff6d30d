//! What a guest sees of the CPU's ID registers and of its debug registers.
//!
//! With HCR_EL2.TID3 set, every EL1 read of the feature ID space (Op0 = 3, Op1 = 0, CRn = 0,
//! CRm = 1..7: `ID_AA64PFR0_EL1`, `ID_AA64DFR0_EL1`, `ID_AA64ISAR*_EL1`, `ID_AA64MMFR*_EL1`,
//! the AArch32 `ID_*`/`MVFR*` registers, and the unallocated encodings, which are RAZ) traps to
//! EL2. The monitor answers with the hardware's value passed through [`sanitise`], which hides
//! every feature the monitor does not virtualise: SVE and SME (their registers are not switched
//! and CPTR_EL2 traps them), MTE, the PMU, the statistical profiling and trace units, AMU, MPAM,
//! RME, EL2 itself (no nested virtualisation), AArch32 at EL0, and features that add EL1 system
//! registers the vCPU context does not hold (`TCR2_EL1`, `SCTLR2_EL1`, `PIR_EL1`, LORegions,
//! `ACCDATA_EL1`, ...). Unknown fields of the AArch64 feature registers read as zero, so a
//! future CPU's new feature stays hidden until someone decides otherwise.
//!
//! With MDCR_EL2.{TDA, TDOSA, TDRA} set, the self-hosted debug registers (Op0 = 2) trap too:
//! [`debug_access`] says how each is emulated. The breakpoint and watchpoint registers are RAZ/WI
//! (they are not switched between vCPUs, so a guest must not program the real ones), the OS lock
//! reads as implemented and unlocked, and `MDSCR_EL1` is the vCPU's own saved copy.

/// Number of encodings in the feature ID space: CRm = 1..7, Op2 = 0..7.
pub const ID_SPACE_LEN: usize = 56;

/// Index into the ID space of `S3_0_C0_C<crm>_<op2>`, or `None` for any other register.
pub const fn id_index(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Option<usize> {
    if op0 == 3 && op1 == 0 && crn == 0 && crm >= 1 && crm <= 7 && op2 <= 7 {
        Some((crm as usize - 1) * 8 + op2 as usize)
    } else {
        None
    }
}

/// The (CRm, Op2) of the ID-space register with index `index` (inverse of [`id_index`]).
pub const fn id_encoding(index: usize) -> (u8, u8) {
    ((index / 8 + 1) as u8, (index % 8) as u8)
}

/// `ID_AA64PFR0_EL1` (CRm 4, Op2 0).
pub const ID_AA64PFR0_EL1: usize = 24;
/// `ID_AA64PFR1_EL1`.
pub const ID_AA64PFR1_EL1: usize = 25;
/// `ID_AA64PFR2_EL1`.
pub const ID_AA64PFR2_EL1: usize = 26;
/// `ID_AA64ZFR0_EL1` (SVE).
pub const ID_AA64ZFR0_EL1: usize = 28;
/// `ID_AA64SMFR0_EL1` (SME).
pub const ID_AA64SMFR0_EL1: usize = 29;
/// `ID_AA64FPFR0_EL1`.
pub const ID_AA64FPFR0_EL1: usize = 31;
/// `ID_AA64DFR0_EL1` (CRm 5, Op2 0).
pub const ID_AA64DFR0_EL1: usize = 32;
/// `ID_AA64DFR1_EL1`.
pub const ID_AA64DFR1_EL1: usize = 33;
/// `ID_AA64AFR0_EL1`.
pub const ID_AA64AFR0_EL1: usize = 36;
/// `ID_AA64AFR1_EL1`.
pub const ID_AA64AFR1_EL1: usize = 37;
/// `ID_AA64ISAR0_EL1` (CRm 6, Op2 0).
pub const ID_AA64ISAR0_EL1: usize = 40;
/// `ID_AA64ISAR1_EL1`.
pub const ID_AA64ISAR1_EL1: usize = 41;
/// `ID_AA64ISAR2_EL1`.
pub const ID_AA64ISAR2_EL1: usize = 42;
/// `ID_AA64ISAR3_EL1`.
pub const ID_AA64ISAR3_EL1: usize = 43;
/// `ID_AA64MMFR0_EL1` (CRm 7, Op2 0).
pub const ID_AA64MMFR0_EL1: usize = 48;
/// `ID_AA64MMFR1_EL1`.
pub const ID_AA64MMFR1_EL1: usize = 49;
/// `ID_AA64MMFR2_EL1`.
pub const ID_AA64MMFR2_EL1: usize = 50;
/// `ID_AA64MMFR3_EL1`.
pub const ID_AA64MMFR3_EL1: usize = 51;
/// `ID_AA64MMFR4_EL1`.
pub const ID_AA64MMFR4_EL1: usize = 52;

/// What happens to one 4-bit field of an ID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// The hardware's value.
    Keep,
    /// Reads as this value whatever the hardware has.
    Set(u8),
    /// The hardware's value, but at most this (an unsigned field: lower means less).
    Cap(u8),
}

/// Fields not listed in a register's rules: the hardware's value, or zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unlisted {
    Keep,
    Zero,
}

const fn rules(index: usize) -> (Unlisted, &'static [(u8, Rule)]) {
    use Rule::{Cap, Keep, Set};
    match index {
        // EL0 [3:0] = 1: AArch64 only (the monitor handles no AArch32 trap); EL1 [7:4] = 1;
        // EL2 [11:8] = 0: no nested virtualisation. FP, AdvSIMD, GIC (system registers, the
        // virtual CPU interface), RAS, DIT, CSV3 as the hardware; CSV2 at most 1 (2 would add
        // SCXTNUM_ELx). SVE, SEL2, MPAM, AMU, RME are zero.
        ID_AA64PFR0_EL1 => (
            Unlisted::Zero,
            &[
                (0, Set(1)),
                (4, Set(1)),
                (12, Keep),
                (16, Keep),
                (20, Keep),
                (24, Keep),
                (28, Cap(1)),
                (48, Keep),
                (56, Cap(1)),
                (60, Keep),
            ],
        ),
        // BT, SSBS, RAS_frac, CSV2_frac; not MTE, SME, MPAM_frac, RNDR_trap, NMI, GCS, THE, ...
        ID_AA64PFR1_EL1 => (
            Unlisted::Zero,
            &[(0, Keep), (4, Keep), (12, Cap(1)), (32, Keep)],
        ),
        // DebugVer, BRPs, WRPs, CTX_CMPs, DoubleLock; not the PMU, SPE, trace, BRBE.
        ID_AA64DFR0_EL1 => (
            Unlisted::Zero,
            &[(0, Keep), (12, Keep), (20, Keep), (28, Keep), (36, Keep)],
        ),
        ID_AA64PFR2_EL1 | ID_AA64ZFR0_EL1 | ID_AA64SMFR0_EL1 | ID_AA64FPFR0_EL1
        | ID_AA64DFR1_EL1 | ID_AA64AFR0_EL1 | ID_AA64AFR1_EL1 | ID_AA64ISAR3_EL1
        | ID_AA64MMFR3_EL1 | ID_AA64MMFR4_EL1 => (Unlisted::Zero, &[]),
        // Instructions EL1 runs natively; not TME [27:24].
        ID_AA64ISAR0_EL1 => (Unlisted::Keep, &[(24, Set(0))]),
        // Not LS64 [63:60] (ACCDATA_EL1 is not switched).
        ID_AA64ISAR1_EL1 => (Unlisted::Keep, &[(60, Set(0))]),
        // Not WFxT [3:0] (WFIT would wait without its timeout), SYSREG_128 [35:32],
        // SYSINSTR_128 [39:36].
        ID_AA64ISAR2_EL1 => (Unlisted::Keep, &[(0, Set(0)), (32, Set(0)), (36, Set(0))]),
        // Not FGT [59:56] (an EL2 feature). BigEnd [11:8] and BigEndEL0 [19:16] stay as the
        // hardware has them: SCTLR_EL1.EE/E0E are not trapped, so hiding mixed-endian support
        // would not make them RES0; the monitor instead byte-swaps the data of big-endian MMIO
        // accesses (vmfork_core::mmio::data_is_big_endian).
        ID_AA64MMFR0_EL1 => (Unlisted::Keep, &[(56, Set(0))]),
        // Not VH [11:8], LO [19:16], TWED [35:32], HCX [43:40], TIDCP1 [55:52].
        ID_AA64MMFR1_EL1 => (
            Unlisted::Keep,
            &[
                (8, Set(0)),
                (16, Set(0)),
                (32, Set(0)),
                (40, Set(0)),
                (52, Set(0)),
            ],
        ),
        // Not NV [27:24], FWB [43:40], EVT [59:56] (EL2 features).
        ID_AA64MMFR2_EL1 => (Unlisted::Keep, &[(24, Set(0)), (40, Set(0)), (56, Set(0))]),
        // The AArch32 registers (CRm 1..3) as the hardware: with EL0 AArch64-only they only
        // describe what AArch32 would be. Unallocated AArch64 encodings are RAZ.
        0..=23 => (Unlisted::Keep, &[]),
        _ => (Unlisted::Zero, &[]),
    }
}

/// The value a guest reads from the ID-space register `index` ([`id_index`]) when the hardware
/// holds `hw`. Indexes outside the ID space read as zero.
pub fn sanitise(index: usize, hw: u64) -> u64 {
    if index >= ID_SPACE_LEN {
        return 0;
    }
    let (unlisted, fields) = rules(index);
    let mut out = match unlisted {
        Unlisted::Keep => hw,
        Unlisted::Zero => 0,
    };
    for &(shift, rule) in fields {
        let mask = 0xf_u64 << shift;
        let hw_field = (hw >> shift) & 0xf;
        let field = match rule {
            Rule::Keep => hw_field,
            Rule::Set(v) => u64::from(v),
            Rule::Cap(v) => hw_field.min(u64::from(v)),
        };
        out = (out & !mask) | (field << shift);
    }
    out
}

/// How a trapped access to a debug system register (Op0 = 2) is emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugAccess {
    /// `MDSCR_EL1`: reads and writes go to the vCPU's saved copy.
    Mdscr,
    /// `OSLSR_EL1`: reads as [`OSLSR_UNLOCKED`], writes are ignored.
    OsLockStatus,
    /// Every other debug register (breakpoints, watchpoints, DCC, claim tags, OS lock and
    /// double lock, `MDRAR_EL1`, `DBGPRCR_EL1`, `DBGAUTHSTATUS_EL1`): reads as zero, writes are
    /// ignored.
    RazWi,
}

/// `OSLSR_EL1` as the guest reads it: OSLM = 0b10 (the OS lock is implemented), OSLK = 0
/// (unlocked).
pub const OSLSR_UNLOCKED: u64 = 0b1000;

/// The emulation of a trapped debug-register access `S<op0>_<op1>_C<crn>_C<crm>_<op2>`, or
/// `None` when the register is not a debug register.
pub const fn debug_access(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Option<DebugAccess> {
    if op0 != 2 {
        return None;
    }
    match (op1, crn, crm, op2) {
        (0, 0, 2, 2) => Some(DebugAccess::Mdscr),
        (0, 1, 1, 4) => Some(DebugAccess::OsLockStatus),
        // Op1 0: DBGB*/DBGW*, MDCCINT, OSDTR*, OSECCR, MDRAR, OSLAR, OSDLR, DBGPRCR, DBGCLAIM*,
        // DBGAUTHSTATUS. Op1 3: MDCCSR_EL0, DBGDTR*_EL0. Op1 4 would be the AArch32 DBGVCR32_EL2,
        // not an EL1 register.
        (0, _, _, _) | (3, _, _, _) => Some(DebugAccess::RazWi),
        _ => None,
    }
}

/// The smallest data-cache line in bytes, from CTR_EL0.DminLine (bits [19:16], log2 of the
/// number of 4-byte words). Cache maintenance by address must step by this: stepping by a
/// larger guess skips lines on a CPU with smaller ones (architecturally DminLine can be as small
/// as 16 bytes; QEMU's `max` CPU reports 64).
pub const fn dcache_line_bytes(ctr_el0: u64) -> u64 {
    4 << ((ctr_el0 >> 16) & 0xf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn field(v: u64, shift: u32) -> u64 {
        (v >> shift) & 0xf
    }

    #[test]
    fn index_round_trips_over_the_id_space() {
        for i in 0..ID_SPACE_LEN {
            let (crm, op2) = id_encoding(i);
            assert_eq!(id_index(3, 0, 0, crm, op2), Some(i));
        }
        assert_eq!(id_index(3, 0, 0, 4, 0), Some(ID_AA64PFR0_EL1));
        assert_eq!(id_index(3, 0, 0, 7, 2), Some(ID_AA64MMFR2_EL1));
        assert_eq!(
            id_index(3, 0, 0, 0, 0),
            None,
            "MIDR_EL1 is not trapped by TID3"
        );
        assert_eq!(id_index(3, 0, 0, 8, 0), None);
        assert_eq!(id_index(3, 0, 1, 4, 0), None);
        assert_eq!(id_index(3, 1, 0, 4, 0), None);
        assert_eq!(id_index(2, 0, 0, 4, 0), None);
    }

    /// Values shaped like QEMU's `-cpu max` (EL0-EL3 AArch64+AArch32, FP, GICv3, RAS, SVE;
    /// DebugVer v8.4, 6 breakpoints, 4 watchpoints, PMUv3 and SPE).
    const QEMU_MAX_PFR0: u64 = 0x0001_0001_1111_2222;
    const QEMU_MAX_DFR0: u64 = 0x0000_0001_1030_5606;

    #[test]
    fn sve_el2_aarch32_pmu_and_spe_are_hidden() {
        let pfr0 = sanitise(
            ID_AA64PFR0_EL1,
            QEMU_MAX_PFR0 | (1 << 32) | (1 << 44) | (1 << 40),
        );
        assert_eq!(field(pfr0, 32), 0, "SVE");
        assert_eq!(field(pfr0, 44), 0, "AMU");
        assert_eq!(field(pfr0, 40), 0, "MPAM");
        assert_eq!(field(pfr0, 8), 0, "EL2");
        assert_eq!(field(pfr0, 0), 1, "EL0 AArch64 only");
        assert_eq!(field(pfr0, 4), 1, "EL1 AArch64 only");
        assert_eq!(field(pfr0, 24), 1, "GIC system registers stay");
        assert_eq!(field(pfr0, 16), 1, "FP as the hardware");
        let dfr0 = sanitise(ID_AA64DFR0_EL1, QEMU_MAX_DFR0);
        assert_eq!(field(dfr0, 8), 0, "PMUVer");
        assert_eq!(field(dfr0, 32), 0, "PMSVer");
        assert_eq!(field(dfr0, 0), 6, "DebugVer");
        assert_eq!(field(dfr0, 12), 5, "BRPs");
        assert_eq!(field(dfr0, 20), 3, "WRPs");
        assert_eq!(sanitise(ID_AA64ZFR0_EL1, u64::MAX), 0);
        assert_eq!(sanitise(ID_AA64SMFR0_EL1, u64::MAX), 0);
    }

    #[test]
    fn mte_and_sme_are_hidden_bti_stays() {
        let pfr1 = sanitise(ID_AA64PFR1_EL1, 0x0000_0000_0100_0321);
        assert_eq!(field(pfr1, 8), 0, "MTE");
        assert_eq!(field(pfr1, 24), 0, "SME");
        assert_eq!(field(pfr1, 0), 1, "BT");
        assert_eq!(field(pfr1, 4), 2, "SSBS");
    }

    #[test]
    fn instruction_sets_pass_through_except_what_needs_the_monitor() {
        let isar0 = 0x1221_1111_2121_1120;
        assert_eq!(sanitise(ID_AA64ISAR0_EL1, isar0), isar0 & !(0xf << 24));
        let isar2 = 0x0000_0000_0000_1111;
        assert_eq!(field(sanitise(ID_AA64ISAR2_EL1, isar2), 0), 0, "WFxT");
        assert_eq!(field(sanitise(ID_AA64ISAR2_EL1, isar2), 4), 1, "RPRES");
        let mmfr1 = 0x0000_0000_1012_1122_u64;
        let s = sanitise(ID_AA64MMFR1_EL1, mmfr1);
        assert_eq!(field(s, 8), 0, "VH");
        assert_eq!(field(s, 16), 0, "LO");
        assert_eq!(field(s, 0), 2, "HAFDBS");
    }

    #[test]
    fn out_of_space_reads_as_zero() {
        assert_eq!(sanitise(ID_SPACE_LEN, u64::MAX), 0);
        assert_eq!(sanitise(usize::MAX, u64::MAX), 0);
    }

    #[test]
    fn debug_registers_are_classified() {
        assert_eq!(debug_access(2, 0, 0, 2, 2), Some(DebugAccess::Mdscr));
        assert_eq!(debug_access(2, 0, 1, 1, 4), Some(DebugAccess::OsLockStatus));
        // DBGBCR0_EL1, DBGWVR3_EL1, OSLAR_EL1, MDCCSR_EL0, DBGAUTHSTATUS_EL1.
        for (op1, crn, crm, op2) in [
            (0, 0, 0, 5),
            (0, 0, 3, 6),
            (0, 1, 0, 4),
            (3, 0, 1, 0),
            (0, 7, 14, 6),
        ] {
            assert_eq!(
                debug_access(2, op1, crn, crm, op2),
                Some(DebugAccess::RazWi)
            );
        }
        assert_eq!(debug_access(3, 0, 0, 2, 2), None);
        assert_eq!(debug_access(2, 4, 0, 7, 0), None);
    }

    /// Which fields of each register may show the hardware's value at all (the reference).
    fn visible_mask(index: usize) -> u64 {
        (0..16)
            .map(|f| {
                let bit = 1u64 << (4 * f);
                let hw = 0xf * bit;
                if sanitise(index, hw) != sanitise(index, 0) {
                    0xf * bit
                } else {
                    0
                }
            })
            .fold(0, |a, b| a | b)
    }

    proptest! {
        /// Sanitising is a fixed point: what the guest sees, sanitised again, is the same.
        #[test]
        fn sanitise_is_idempotent(index in 0usize..ID_SPACE_LEN, hw in any::<u64>()) {
            let once = sanitise(index, hw);
            prop_assert_eq!(sanitise(index, once), once);
        }

        /// No guest-visible field is ever above the hardware's for a field the rules pass
        /// through or cap, and hidden fields never depend on the hardware.
        #[test]
        fn guest_never_sees_more_than_the_hardware(index in 0usize..ID_SPACE_LEN, hw in any::<u64>()) {
            let s = sanitise(index, hw);
            let visible = visible_mask(index);
            prop_assert_eq!(s & !visible, sanitise(index, 0) & !visible);
            for f in 0..16 {
                if visible & (0xf << (4 * f)) != 0 {
                    prop_assert!(field(s, 4 * f) <= field(hw, 4 * f));
                }
            }
        }

        #[test]
        fn hidden_features_stay_hidden(hw in any::<u64>()) {
            prop_assert_eq!(field(sanitise(ID_AA64PFR0_EL1, hw), 32), 0);
            prop_assert_eq!(field(sanitise(ID_AA64PFR0_EL1, hw), 8), 0);
            prop_assert_eq!(field(sanitise(ID_AA64PFR1_EL1, hw), 8), 0);
            prop_assert_eq!(field(sanitise(ID_AA64PFR1_EL1, hw), 24), 0);
            prop_assert_eq!(field(sanitise(ID_AA64DFR0_EL1, hw), 8), 0);
            prop_assert_eq!(field(sanitise(ID_AA64MMFR2_EL1, hw), 24), 0);
            prop_assert_eq!(sanitise(ID_AA64MMFR3_EL1, hw), 0);
        }
    }

    #[test]
    fn dcache_line_comes_from_ctr_dminline() {
        // QEMU's max CPU: CTR_EL0 = 0x8444c004 (DminLine 4: 64 bytes).
        assert_eq!(dcache_line_bytes(0x8444_c004), 64);
        assert_eq!(dcache_line_bytes(2 << 16), 16);
        assert_eq!(dcache_line_bytes(3 << 16), 32);
        assert_eq!(dcache_line_bytes(0xf << 16), 4 << 15);
    }
}
