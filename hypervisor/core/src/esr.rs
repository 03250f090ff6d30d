//! Decoding of ESR_EL2, the syndrome of an exception taken to EL2, and of HPFAR_EL2.
//!
//! Field positions follow the Arm Architecture Reference Manual (DDI 0487), register ESR_EL2:
//! EC is bits \[31:26\], IL bit \[25\], ISS bits \[24:0\], ISS2 bits \[55:32\]. The ISS layouts decoded
//! here are the ones for Data Aborts (EC 0x24/0x25), Instruction Aborts (EC 0x20/0x21), HVC, SMC,
//! SVC and BRK (imm16 in ISS\[15:0\]), trapped MSR/MRS/System instructions (EC 0x18) and trapped
//! WF* instructions (EC 0x01). Decoding is pure bit extraction: any 64-bit value decodes, nothing
//! panics, and reserved encodings come back as `Other(..)`.

use crate::addr::Ipa;
use core::fmt;

/// The value of ESR_EL2 (Exception Syndrome Register, EL2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Esr(pub u64);

const fn bits(value: u64, high: u32, low: u32) -> u64 {
    (value >> low) & ((1 << (high - low + 1)) - 1)
}

const fn bit(value: u64, n: u32) -> bool {
    (value >> n) & 1 != 0
}

macro_rules! exception_classes {
    ($($(#[$doc:meta])* $variant:ident = $value:literal, $name:literal;)*) => {
        /// ESR_ELx.EC, the Exception Class: why the exception was taken. Every EC value the Arm
        /// ARM defines for AArch64 has a variant; reserved values are [`ExceptionClass::Other`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ExceptionClass {
            $($(#[$doc])* $variant,)*
            /// A reserved (or newer than this decoder) EC value.
            Other(u8),
        }

        impl ExceptionClass {
            /// Decodes a 6-bit EC value (higher bits are ignored).
            pub const fn from_raw(ec: u8) -> Self {
                match ec & 0x3f {
                    $($value => Self::$variant,)*
                    other => Self::Other(other),
                }
            }

            /// The 6-bit EC value.
            pub const fn raw(self) -> u8 {
                match self {
                    $(Self::$variant => $value,)*
                    Self::Other(ec) => ec & 0x3f,
                }
            }

            /// A human-readable name, for register dumps.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                    Self::Other(_) => "reserved exception class",
                }
            }
        }
    };
}

exception_classes! {
    /// Unknown reason (includes UNDEFINED instructions).
    Unknown = 0x00, "unknown reason";
    /// Trapped WFI, WFE, WFIT or WFET.
    WfiWfe = 0x01, "trapped WFI/WFE";
    /// Trapped AArch32 MCR or MRC access with coproc == 0b1111.
    McrMrcCp15 = 0x03, "trapped AArch32 MCR/MRC (cp15)";
    /// Trapped AArch32 MCRR or MRRC access with coproc == 0b1111.
    McrrMrrcCp15 = 0x04, "trapped AArch32 MCRR/MRRC (cp15)";
    /// Trapped AArch32 MCR or MRC access with coproc == 0b1110.
    McrMrcCp14 = 0x05, "trapped AArch32 MCR/MRC (cp14)";
    /// Trapped AArch32 LDC or STC access.
    LdcStc = 0x06, "trapped AArch32 LDC/STC";
    /// Access to SVE, Advanced SIMD or floating-point trapped by CPACR_EL1/CPTR_EL2.
    FpAsimdAccess = 0x07, "trapped SVE/SIMD/FP access";
    /// Trapped AArch32 VMRS access (ID group trap).
    VmrsAccess = 0x08, "trapped AArch32 VMRS";
    /// Trapped pointer authentication instruction (FEAT_PAuth).
    PointerAuthTrap = 0x09, "trapped pointer authentication instruction";
    /// Trapped LD64B/ST64B* and related instructions (FEAT_LS64).
    Ls64 = 0x0a, "trapped LD64B/ST64B";
    /// Trapped AArch32 MRRC access with coproc == 0b1110.
    MrrcCp14 = 0x0c, "trapped AArch32 MRRC (cp14)";
    /// Branch Target Exception (FEAT_BTI).
    BranchTarget = 0x0d, "branch target exception";
    /// Illegal Execution state.
    IllegalState = 0x0e, "illegal execution state";
    /// SVC in AArch32 state.
    SvcA32 = 0x11, "SVC (AArch32)";
    /// HVC in AArch32 state.
    HvcA32 = 0x12, "HVC (AArch32)";
    /// SMC in AArch32 state.
    SmcA32 = 0x13, "SMC (AArch32)";
    /// SVC in AArch64 state.
    SvcA64 = 0x15, "SVC (AArch64)";
    /// HVC in AArch64 state.
    HvcA64 = 0x16, "HVC (AArch64)";
    /// SMC in AArch64 state (trapped by HCR_EL2.TSC).
    SmcA64 = 0x17, "SMC (AArch64)";
    /// Trapped MSR, MRS or System instruction in AArch64 state.
    MsrMrsTrap = 0x18, "trapped MSR/MRS/system instruction";
    /// Access to SVE functionality trapped by CPACR_EL1.ZEN/CPTR_EL2.
    SveTrap = 0x19, "trapped SVE access";
    /// Trapped ERET, ERETAA or ERETAB (FEAT_NV).
    EretTrap = 0x1a, "trapped ERET";
    /// Trapped TSTART (FEAT_TME).
    TstartTrap = 0x1b, "trapped TSTART";
    /// Pointer authentication failure (FEAT_FPAC).
    PacFail = 0x1c, "pointer authentication failure";
    /// Access to SME functionality trapped.
    SmeTrap = 0x1d, "trapped SME access";
    /// Granule Protection Check exception (FEAT_RME; reported only to EL3).
    GranuleProtectionCheck = 0x1e, "granule protection check";
    /// IMPLEMENTATION DEFINED exception to EL3.
    ImplementationDefinedEl3 = 0x1f, "implementation defined (EL3)";
    /// Instruction Abort from a lower Exception level.
    InstructionAbortLowerEl = 0x20, "instruction abort from a lower EL";
    /// Instruction Abort taken without a change in Exception level.
    InstructionAbortSameEl = 0x21, "instruction abort from the same EL";
    /// PC alignment fault.
    PcAlignment = 0x22, "PC alignment fault";
    /// Data Abort from a lower Exception level.
    DataAbortLowerEl = 0x24, "data abort from a lower EL";
    /// Data Abort taken without a change in Exception level.
    DataAbortSameEl = 0x25, "data abort from the same EL";
    /// SP alignment fault.
    SpAlignment = 0x26, "SP alignment fault";
    /// Memory Operation (CPY*/SET*) exception (FEAT_MOPS).
    MemoryOperation = 0x27, "memory operation exception";
    /// Trapped floating-point exception from AArch32 state.
    FpExceptionA32 = 0x28, "floating-point exception (AArch32)";
    /// Trapped floating-point exception from AArch64 state.
    FpExceptionA64 = 0x2c, "floating-point exception (AArch64)";
    /// Guarded Control Stack exception (FEAT_GCS).
    GcsFail = 0x2d, "guarded control stack exception";
    /// SError exception.
    SError = 0x2f, "SError";
    /// Breakpoint exception from a lower Exception level.
    BreakpointLowerEl = 0x30, "breakpoint from a lower EL";
    /// Breakpoint exception taken without a change in Exception level.
    BreakpointSameEl = 0x31, "breakpoint from the same EL";
    /// Software Step exception from a lower Exception level.
    SoftwareStepLowerEl = 0x32, "software step from a lower EL";
    /// Software Step exception taken without a change in Exception level.
    SoftwareStepSameEl = 0x33, "software step from the same EL";
    /// Watchpoint exception from a lower Exception level.
    WatchpointLowerEl = 0x34, "watchpoint from a lower EL";
    /// Watchpoint exception taken without a change in Exception level.
    WatchpointSameEl = 0x35, "watchpoint from the same EL";
    /// BKPT in AArch32 state.
    BkptA32 = 0x38, "BKPT (AArch32)";
    /// Vector Catch exception from AArch32 state.
    VectorCatchA32 = 0x3a, "vector catch (AArch32)";
    /// BRK in AArch64 state.
    Brk = 0x3c, "BRK (AArch64)";
}

/// A fault status code: ESR_ELx.ISS.DFSC for Data Aborts, ISS.IFSC for Instruction Aborts.
/// Levels are lookup levels of the translation that faulted; -1 exists only with FEAT_LPA2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultStatus {
    /// Address size fault (0b0000LL; level -1 is 0b101001).
    AddressSizeFault {
        /// Lookup level, -1 to 3.
        level: i8,
    },
    /// Translation fault (0b0001LL; level -1 is 0b101011).
    TranslationFault {
        /// Lookup level, -1 to 3.
        level: i8,
    },
    /// Access flag fault (0b0010LL).
    AccessFlagFault {
        /// Lookup level, 0 to 3.
        level: i8,
    },
    /// Permission fault (0b0011LL).
    PermissionFault {
        /// Lookup level, 0 to 3.
        level: i8,
    },
    /// Synchronous External abort, not on a translation table walk (0b010000).
    SyncExternalAbort,
    /// Synchronous Tag Check Fault (0b010001, FEAT_MTE2).
    SyncTagCheckFault,
    /// Synchronous External abort on a translation table walk (0b0101LL; level -1 is 0b010011).
    SyncExternalAbortOnWalk {
        /// Lookup level, -1 to 3.
        level: i8,
    },
    /// Synchronous parity or ECC error, not on a translation table walk (0b011000).
    SyncParityEccError,
    /// Synchronous parity or ECC error on a translation table walk (0b0111LL; level -1 is
    /// 0b011011).
    SyncParityEccErrorOnWalk {
        /// Lookup level, -1 to 3.
        level: i8,
    },
    /// Alignment fault (0b100001).
    AlignmentFault,
    /// Granule Protection Fault on a translation table walk (0b1001LL; level -1 is 0b100011).
    GranuleProtectionFaultOnWalk {
        /// Lookup level, -1 to 3.
        level: i8,
    },
    /// Granule Protection Fault, not on a translation table walk (0b101000).
    GranuleProtectionFault,
    /// TLB conflict abort (0b110000).
    TlbConflictAbort,
    /// Unsupported atomic hardware update fault (0b110001).
    UnsupportedAtomicUpdate,
    /// Any other (reserved or IMPLEMENTATION DEFINED) code.
    Other(u8),
}

impl FaultStatus {
    /// Decodes a 6-bit DFSC/IFSC value (higher bits are ignored).
    pub const fn from_raw(fsc: u8) -> Self {
        let fsc = fsc & 0x3f;
        let level = (fsc & 3) as i8;
        match fsc {
            0x00..=0x03 => Self::AddressSizeFault { level },
            0x29 => Self::AddressSizeFault { level: -1 },
            0x04..=0x07 => Self::TranslationFault { level },
            0x2b => Self::TranslationFault { level: -1 },
            0x08..=0x0b => Self::AccessFlagFault { level },
            0x0c..=0x0f => Self::PermissionFault { level },
            0x10 => Self::SyncExternalAbort,
            0x11 => Self::SyncTagCheckFault,
            0x13 => Self::SyncExternalAbortOnWalk { level: -1 },
            0x14..=0x17 => Self::SyncExternalAbortOnWalk { level },
            0x18 => Self::SyncParityEccError,
            0x1b => Self::SyncParityEccErrorOnWalk { level: -1 },
            0x1c..=0x1f => Self::SyncParityEccErrorOnWalk { level },
            0x21 => Self::AlignmentFault,
            0x23 => Self::GranuleProtectionFaultOnWalk { level: -1 },
            0x24..=0x27 => Self::GranuleProtectionFaultOnWalk { level },
            0x28 => Self::GranuleProtectionFault,
            0x30 => Self::TlbConflictAbort,
            0x31 => Self::UnsupportedAtomicUpdate,
            other => Self::Other(other),
        }
    }

    /// The lookup level, for the kinds of fault that have one.
    pub const fn level(self) -> Option<i8> {
        match self {
            Self::AddressSizeFault { level }
            | Self::TranslationFault { level }
            | Self::AccessFlagFault { level }
            | Self::PermissionFault { level }
            | Self::SyncExternalAbortOnWalk { level }
            | Self::SyncParityEccErrorOnWalk { level }
            | Self::GranuleProtectionFaultOnWalk { level } => Some(level),
            _ => None,
        }
    }
}

/// ISS of a Data Abort (EC 0x24 or 0x25).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DataAbortIss {
    /// ISV, bit \[24\]: the instruction syndrome (SAS, SSE, SRT, SF, AR) is valid. Only stage-2
    /// aborts of single-register loads and stores without writeback set it.
    pub isv: bool,
    /// SAS, bits \[23:22\], as the access size in bytes: 1, 2, 4 or 8.
    pub sas: u8,
    /// SSE, bit \[21\]: the loaded value must be sign-extended.
    pub sse: bool,
    /// SRT, bits \[20:16\]: the transfer register; 31 is XZR/WZR.
    pub srt: u8,
    /// SF, bit \[15\]: the register is 64 bits wide (Xt rather than Wt).
    pub sf: bool,
    /// AR, bit \[14\]: the instruction has acquire/release semantics.
    pub ar: bool,
    /// VNCR, bit \[13\]: the fault came from EL1 use of VNCR_EL2 (FEAT_NV2).
    pub vncr: bool,
    /// FnV, bit \[10\]: FAR is not valid (for synchronous External aborts).
    pub fnv: bool,
    /// EA, bit \[9\]: IMPLEMENTATION DEFINED External abort type.
    pub ea: bool,
    /// CM, bit \[8\]: the abort came from a cache maintenance or address translation instruction.
    pub cm: bool,
    /// S1PTW, bit \[7\]: stage-2 fault on an access made for a stage-1 translation table walk.
    pub s1ptw: bool,
    /// WnR, bit \[6\]: the access was a write.
    pub wnr: bool,
    /// DFSC, bits \[5:0\].
    pub dfsc: FaultStatus,
}

/// The register transfer of a trapped load or store, when ESR's instruction syndrome is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyndromeAccess {
    /// Access size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// Transfer register number; 31 is the zero register.
    pub register: u8,
    /// A store (write) rather than a load.
    pub write: bool,
    /// A load whose value is sign-extended.
    pub sign_extend: bool,
    /// The register is 64 bits wide.
    pub sixty_four: bool,
}

impl DataAbortIss {
    /// The emulatable access described by the syndrome, or `None` when ISV is 0 (the caller
    /// then has to decode the instruction itself, or refuse).
    pub const fn access(&self) -> Option<SyndromeAccess> {
        if !self.isv {
            return None;
        }
        Some(SyndromeAccess {
            size: self.sas,
            register: self.srt,
            write: self.wnr,
            sign_extend: self.sse,
            sixty_four: self.sf,
        })
    }
}

/// ISS of an Instruction Abort (EC 0x20 or 0x21).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InstructionAbortIss {
    /// FnV, bit \[10\]: FAR is not valid.
    pub fnv: bool,
    /// EA, bit \[9\]: IMPLEMENTATION DEFINED External abort type.
    pub ea: bool,
    /// S1PTW, bit \[7\]: stage-2 fault on a stage-1 translation table walk.
    pub s1ptw: bool,
    /// IFSC, bits \[5:0\].
    pub ifsc: FaultStatus,
}

/// ISS of a trapped MSR, MRS or System instruction (EC 0x18): the instruction's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SysRegIss {
    /// Op0, bits \[21:20\].
    pub op0: u8,
    /// Op2, bits \[19:17\].
    pub op2: u8,
    /// Op1, bits \[16:14\].
    pub op1: u8,
    /// CRn, bits \[13:10\].
    pub crn: u8,
    /// Rt, bits \[9:5\]: the general-purpose register; 31 is XZR.
    pub rt: u8,
    /// CRm, bits \[4:1\].
    pub crm: u8,
    /// Direction, bit \[0\]: `true` for a read (MRS), `false` for a write (MSR or System
    /// instruction).
    pub read: bool,
}

impl SysRegIss {
    /// True when this is an access to the system register `S<op0>_<op1>_C<crn>_C<crm>_<op2>`.
    pub const fn is(&self, op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> bool {
        self.op0 == op0 && self.op1 == op1 && self.crn == crn && self.crm == crm && self.op2 == op2
    }
}

impl fmt::Display for SysRegIss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reg = |f: &mut fmt::Formatter<'_>| {
            write!(
                f,
                "S{}_{}_C{}_C{}_{}",
                self.op0, self.op1, self.crn, self.crm, self.op2
            )
        };
        if self.read {
            write!(f, "MRS X{}, ", self.rt)?;
            reg(f)
        } else {
            f.write_str("MSR ")?;
            reg(f)?;
            write!(f, ", X{}", self.rt)
        }
    }
}

/// Which WF* instruction was trapped (ISS.TI, bits \[1:0\] of EC 0x01).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WfxKind {
    /// WFI.
    Wfi,
    /// WFE.
    Wfe,
    /// WFIT (FEAT_WFxT).
    Wfit,
    /// WFET (FEAT_WFxT).
    Wfet,
}

/// ISS of a trapped WF* instruction (EC 0x01).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WfxIss {
    /// TI, bits \[1:0\].
    pub kind: WfxKind,
    /// RV, bit \[2\]: `rn` is valid (WFIT/WFET).
    pub rv: bool,
    /// RN, bits \[9:5\]: the timeout register of WFIT/WFET.
    pub rn: u8,
}

impl Esr {
    /// EC, bits \[31:26\], raw.
    pub const fn ec_raw(self) -> u8 {
        bits(self.0, 31, 26) as u8
    }

    /// EC, bits \[31:26\]: the Exception Class.
    pub const fn ec(self) -> ExceptionClass {
        ExceptionClass::from_raw(self.ec_raw())
    }

    /// IL, bit \[25\]: the trapped instruction is 32 bits long (always set for A64 instructions
    /// and for exceptions that do not trap an instruction).
    pub const fn il(self) -> bool {
        bit(self.0, 25)
    }

    /// Length in bytes of the trapped instruction: 4 when IL is set, else 2 (T32).
    pub const fn instruction_len(self) -> u64 {
        if self.il() {
            4
        } else {
            2
        }
    }

    /// ISS, bits \[24:0\]: the Instruction Specific Syndrome.
    pub const fn iss(self) -> u32 {
        bits(self.0, 24, 0) as u32
    }

    /// ISS2, bits \[55:32\].
    pub const fn iss2(self) -> u32 {
        bits(self.0, 55, 32) as u32
    }

    /// The Data Abort syndrome, when EC is 0x24 or 0x25.
    pub const fn data_abort(self) -> Option<DataAbortIss> {
        match self.ec() {
            ExceptionClass::DataAbortLowerEl | ExceptionClass::DataAbortSameEl => {
                let v = self.0;
                Some(DataAbortIss {
                    isv: bit(v, 24),
                    sas: 1 << bits(v, 23, 22),
                    sse: bit(v, 21),
                    srt: bits(v, 20, 16) as u8,
                    sf: bit(v, 15),
                    ar: bit(v, 14),
                    vncr: bit(v, 13),
                    fnv: bit(v, 10),
                    ea: bit(v, 9),
                    cm: bit(v, 8),
                    s1ptw: bit(v, 7),
                    wnr: bit(v, 6),
                    dfsc: FaultStatus::from_raw(bits(v, 5, 0) as u8),
                })
            }
            _ => None,
        }
    }

    /// The Instruction Abort syndrome, when EC is 0x20 or 0x21.
    pub const fn instruction_abort(self) -> Option<InstructionAbortIss> {
        match self.ec() {
            ExceptionClass::InstructionAbortLowerEl | ExceptionClass::InstructionAbortSameEl => {
                Some(InstructionAbortIss {
                    fnv: bit(self.0, 10),
                    ea: bit(self.0, 9),
                    s1ptw: bit(self.0, 7),
                    ifsc: FaultStatus::from_raw(bits(self.0, 5, 0) as u8),
                })
            }
            _ => None,
        }
    }

    /// The 16-bit immediate, ISS\[15:0\], of an AArch64 HVC, SMC, SVC or BRK.
    pub const fn imm16(self) -> Option<u16> {
        match self.ec() {
            ExceptionClass::HvcA64
            | ExceptionClass::SmcA64
            | ExceptionClass::SvcA64
            | ExceptionClass::Brk => Some(bits(self.0, 15, 0) as u16),
            _ => None,
        }
    }

    /// The trapped system register access, when EC is 0x18.
    pub const fn sys_reg(self) -> Option<SysRegIss> {
        match self.ec() {
            ExceptionClass::MsrMrsTrap => Some(SysRegIss {
                op0: bits(self.0, 21, 20) as u8,
                op2: bits(self.0, 19, 17) as u8,
                op1: bits(self.0, 16, 14) as u8,
                crn: bits(self.0, 13, 10) as u8,
                rt: bits(self.0, 9, 5) as u8,
                crm: bits(self.0, 4, 1) as u8,
                read: bit(self.0, 0),
            }),
            _ => None,
        }
    }

    /// The trapped WF* instruction, when EC is 0x01.
    pub const fn wfx(self) -> Option<WfxIss> {
        match self.ec() {
            ExceptionClass::WfiWfe => Some(WfxIss {
                kind: match bits(self.0, 1, 0) {
                    0 => WfxKind::Wfi,
                    1 => WfxKind::Wfe,
                    2 => WfxKind::Wfit,
                    _ => WfxKind::Wfet,
                },
                rv: bit(self.0, 2),
                rn: bits(self.0, 9, 5) as u8,
            }),
            _ => None,
        }
    }
}

impl fmt::Debug for Esr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Esr({:#x}: {})", self.0, self.ec().name())
    }
}

impl fmt::Display for Esr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ESR_EL2 {:#010x}: EC {:#04x} ({}), IL {}, ISS {:#09x}",
            self.0,
            self.ec_raw(),
            self.ec().name(),
            u8::from(self.il()),
            self.iss()
        )?;
        if let Some(da) = self.data_abort() {
            write!(
                f,
                ", {} {:?}",
                if da.wnr { "write" } else { "read" },
                da.dfsc
            )?;
            if let Some(a) = da.access() {
                let reg = if a.sixty_four { 'X' } else { 'W' };
                write!(f, ", {} bytes via {reg}{}", a.size, a.register)?;
            }
        } else if let Some(ia) = self.instruction_abort() {
            write!(f, ", {:?}", ia.ifsc)?;
        } else if let Some(imm) = self.imm16() {
            write!(f, ", #{imm:#x}")?;
        } else if let Some(sys) = self.sys_reg() {
            write!(f, ", {sys}")?;
        }
        Ok(())
    }
}

/// The faulting IPA of a stage-2 abort: HPFAR_EL2.FIPA, bits \[43:4\], holds IPA\[51:12\] (bits
/// \[43:40\] are RES0 without FEAT_LPA, and bit 63, NS, is not part of the address); the offset
/// inside the 4 KiB page comes from FAR_EL2\[11:0\].
///
/// HPFAR_EL2 is only valid for stage-2 Translation, Access flag and Permission faults (and some
/// External aborts on stage-2 walks); the caller checks the fault status first.
pub const fn hpfar_to_ipa(hpfar: u64, far: u64) -> Ipa {
    Ipa((bits(hpfar, 43, 4) << 12) | (far & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;

    #[test]
    fn str_x1_to_mmio_from_el1() {
        // `str x1, [x0]` faulting at stage 2 (permission, level 3): EC 0x24, IL, ISV, SAS 3,
        // SRT 1, SF, WnR, DFSC 0b001111.
        let esr = Esr(0x93c1_804f);
        assert_eq!(esr.ec(), ExceptionClass::DataAbortLowerEl);
        assert_eq!(esr.ec_raw(), 0x24);
        assert!(esr.il());
        assert_eq!(esr.instruction_len(), 4);
        assert_eq!(esr.iss(), 0x1c1_804f);
        let da = esr.data_abort().expect("data abort");
        assert_eq!(
            da,
            DataAbortIss {
                isv: true,
                sas: 8,
                sse: false,
                srt: 1,
                sf: true,
                ar: false,
                vncr: false,
                fnv: false,
                ea: false,
                cm: false,
                s1ptw: false,
                wnr: true,
                dfsc: FaultStatus::PermissionFault { level: 3 },
            }
        );
        assert_eq!(
            da.access(),
            Some(SyndromeAccess {
                size: 8,
                register: 1,
                write: true,
                sign_extend: false,
                sixty_four: true
            })
        );
        assert_eq!(esr.instruction_abort(), None);
        assert_eq!(esr.imm16(), None);
        assert_eq!(esr.sys_reg(), None);
        assert_eq!(
            esr.to_string(),
            "ESR_EL2 0x93c1804f: EC 0x24 (data abort from a lower EL), IL 1, ISS 0x1c1804f, \
             write PermissionFault { level: 3 }, 8 bytes via X1"
        );
    }

    #[test]
    fn other_loads_and_stores() {
        // `ldrsb w2, [x3]`, translation fault level 2: SAS 0, SSE, SRT 2, 32-bit, read.
        let da = Esr(0x9322_0006).data_abort().expect("data abort");
        assert!(da.isv && da.sse && !da.sf && !da.wnr);
        assert_eq!((da.sas, da.srt), (1, 2));
        assert_eq!(da.dfsc, FaultStatus::TranslationFault { level: 2 });
        // `ldarh w5, [x0]`: SAS 1, SRT 5, AR.
        let da = Esr(0x9345_4007).data_abort().expect("data abort");
        assert_eq!((da.sas, da.srt, da.ar, da.sf), (2, 5, true, false));
        // `str wzr, [x0]`: SAS 2, SRT 31.
        let da = Esr(0x939f_0047).data_abort().expect("data abort");
        assert_eq!((da.sas, da.srt, da.wnr), (4, 31, true));
        // `stp x0, x1, [x2]`: no valid syndrome; the access cannot be emulated from ESR alone.
        let da = Esr(0x9200_0047).data_abort().expect("data abort");
        assert!(!da.isv);
        assert_eq!(da.access(), None);
        // Linux's classic kernel oops: EC 0x25, WnR, translation fault level 1.
        let da = Esr(0x9600_0045).data_abort().expect("data abort");
        assert_eq!(Esr(0x9600_0045).ec(), ExceptionClass::DataAbortSameEl);
        assert_eq!(da.dfsc, FaultStatus::TranslationFault { level: 1 });
        assert!(da.wnr);
        // Stage-2 fault on a stage-1 walk, access flag level 3.
        let da = Esr(0x9200_008b).data_abort().expect("data abort");
        assert!(da.s1ptw);
        assert_eq!(da.dfsc, FaultStatus::AccessFlagFault { level: 3 });
        // External abort with FAR not valid, from a cache maintenance instruction.
        let da = Esr(0x9200_0510).data_abort().expect("data abort");
        assert!(da.fnv && da.cm && !da.ea);
        assert_eq!(da.dfsc, FaultStatus::SyncExternalAbort);
    }

    #[test]
    fn instruction_abort() {
        let ia = Esr(0x8200_0007)
            .instruction_abort()
            .expect("instruction abort");
        assert_eq!(
            Esr(0x8200_0007).ec(),
            ExceptionClass::InstructionAbortLowerEl
        );
        assert_eq!(ia.ifsc, FaultStatus::TranslationFault { level: 3 });
        let ia = Esr(0x8600_000f)
            .instruction_abort()
            .expect("instruction abort");
        assert_eq!(
            Esr(0x8600_000f).ec(),
            ExceptionClass::InstructionAbortSameEl
        );
        assert_eq!(ia.ifsc, FaultStatus::PermissionFault { level: 3 });
        assert_eq!(Esr(0x8600_000f).data_abort(), None);
    }

    #[test]
    fn hvc_smc_svc_brk_immediates() {
        // `hvc #0` (PSCI from a Linux guest) and `smc #0`.
        assert_eq!(Esr(0x5a00_0000).ec(), ExceptionClass::HvcA64);
        assert_eq!(Esr(0x5a00_0000).imm16(), Some(0));
        assert_eq!(Esr(0x5e00_0000).ec(), ExceptionClass::SmcA64);
        assert_eq!(Esr(0x5a00_4711).imm16(), Some(0x4711));
        assert_eq!(Esr(0x5600_0001).ec(), ExceptionClass::SvcA64);
        assert_eq!(Esr(0x5600_0001).imm16(), Some(1));
        assert_eq!(Esr(0xf200_0800).ec(), ExceptionClass::Brk);
        assert_eq!(Esr(0xf200_0800).imm16(), Some(0x800));
        assert_eq!(Esr(0x4a00_0000).ec(), ExceptionClass::HvcA32);
        assert_eq!(Esr(0x4a00_0000).imm16(), None);
        assert_eq!(
            Esr(0x5a00_4711).to_string(),
            "ESR_EL2 0x5a004711: EC 0x16 (HVC (AArch64)), IL 1, ISS 0x0004711, #0x4711"
        );
    }

    #[test]
    fn msr_mrs_traps() {
        // `mrs x0, cntpct_el0` (S3_3_C14_C0_1).
        let esr = Esr(0x6232_f801);
        assert_eq!(esr.ec(), ExceptionClass::MsrMrsTrap);
        let sys = esr.sys_reg().expect("sysreg");
        assert_eq!(
            sys,
            SysRegIss {
                op0: 3,
                op2: 1,
                op1: 3,
                crn: 14,
                rt: 0,
                crm: 0,
                read: true
            }
        );
        assert!(sys.is(3, 3, 14, 0, 1));
        assert_eq!(sys.to_string(), "MRS X0, S3_3_C14_C0_1");
        // `msr sctlr_el1, x3` (S3_0_C1_C0_0).
        let sys = Esr(0x6230_0460).sys_reg().expect("sysreg");
        assert_eq!(
            sys,
            SysRegIss {
                op0: 3,
                op2: 0,
                op1: 0,
                crn: 1,
                rt: 3,
                crm: 0,
                read: false
            }
        );
        assert_eq!(sys.to_string(), "MSR S3_0_C1_C0_0, X3");
        // `mrs x30, id_aa64mmfr0_el1` (S3_0_C0_C7_0).
        let sys = Esr(0x6230_03cf).sys_reg().expect("sysreg");
        assert!(sys.is(3, 0, 0, 7, 0) && sys.read);
        assert_eq!(sys.rt, 30);
    }

    #[test]
    fn wfx_traps() {
        // From AArch64, CV = 1 and COND = 0b1110.
        assert_eq!(Esr(0x07e0_0000).ec(), ExceptionClass::WfiWfe);
        assert_eq!(Esr(0x07e0_0000).wfx().map(|w| w.kind), Some(WfxKind::Wfi));
        assert_eq!(Esr(0x07e0_0001).wfx().map(|w| w.kind), Some(WfxKind::Wfe));
        let wfit = Esr(0x07e0_0066).wfx().expect("wfx");
        assert_eq!((wfit.kind, wfit.rv, wfit.rn), (WfxKind::Wfit, true, 3));
        assert_eq!(Esr(0x5a00_0000).wfx(), None);
    }

    #[test]
    fn il_and_iss2() {
        assert!(!Esr(0x0400_0000).il());
        assert_eq!(Esr(0x0400_0000).instruction_len(), 2);
        assert_eq!(Esr(0x00ab_cdef_0000_0000).iss2(), 0xab_cdef);
        assert_eq!(
            Esr(0xff00_0000_0000_0000).iss2(),
            0,
            "bits above 55 are not ISS2"
        );
    }

    #[test]
    fn fault_status_codes() {
        use FaultStatus::*;
        let cases = [
            (0x00, AddressSizeFault { level: 0 }),
            (0x03, AddressSizeFault { level: 3 }),
            (0x29, AddressSizeFault { level: -1 }),
            (0x04, TranslationFault { level: 0 }),
            (0x07, TranslationFault { level: 3 }),
            (0x2b, TranslationFault { level: -1 }),
            (0x08, AccessFlagFault { level: 0 }),
            (0x0b, AccessFlagFault { level: 3 }),
            (0x0c, PermissionFault { level: 0 }),
            (0x0d, PermissionFault { level: 1 }),
            (0x0f, PermissionFault { level: 3 }),
            (0x10, SyncExternalAbort),
            (0x11, SyncTagCheckFault),
            (0x13, SyncExternalAbortOnWalk { level: -1 }),
            (0x14, SyncExternalAbortOnWalk { level: 0 }),
            (0x17, SyncExternalAbortOnWalk { level: 3 }),
            (0x18, SyncParityEccError),
            (0x1b, SyncParityEccErrorOnWalk { level: -1 }),
            (0x1f, SyncParityEccErrorOnWalk { level: 3 }),
            (0x21, AlignmentFault),
            (0x23, GranuleProtectionFaultOnWalk { level: -1 }),
            (0x26, GranuleProtectionFaultOnWalk { level: 2 }),
            (0x28, GranuleProtectionFault),
            (0x30, TlbConflictAbort),
            (0x31, UnsupportedAtomicUpdate),
            (0x12, Other(0x12)),
            (0x22, Other(0x22)),
            (0x3f, Other(0x3f)),
        ];
        for (raw, expected) in cases {
            assert_eq!(FaultStatus::from_raw(raw), expected, "FSC {raw:#x}");
        }
        assert_eq!(
            FaultStatus::from_raw(0x40 | 0x0f),
            PermissionFault { level: 3 }
        );
        assert_eq!(PermissionFault { level: 2 }.level(), Some(2));
        assert_eq!(AlignmentFault.level(), None);
    }

    #[test]
    fn exception_class_values() {
        use ExceptionClass::*;
        let named = [
            (0x00, Unknown),
            (0x01, WfiWfe),
            (0x07, FpAsimdAccess),
            (0x0e, IllegalState),
            (0x15, SvcA64),
            (0x16, HvcA64),
            (0x17, SmcA64),
            (0x18, MsrMrsTrap),
            (0x19, SveTrap),
            (0x20, InstructionAbortLowerEl),
            (0x21, InstructionAbortSameEl),
            (0x22, PcAlignment),
            (0x24, DataAbortLowerEl),
            (0x25, DataAbortSameEl),
            (0x26, SpAlignment),
            (0x2c, FpExceptionA64),
            (0x2f, SError),
            (0x30, BreakpointLowerEl),
            (0x32, SoftwareStepLowerEl),
            (0x35, WatchpointSameEl),
            (0x3c, Brk),
        ];
        for (raw, ec) in named {
            assert_eq!(ExceptionClass::from_raw(raw), ec);
            assert_eq!(ec.raw(), raw);
        }
        for reserved in [
            0x02, 0x0b, 0x0f, 0x10, 0x14, 0x23, 0x29, 0x2a, 0x2b, 0x2e, 0x36, 0x37, 0x39, 0x3b,
            0x3d, 0x3e, 0x3f,
        ] {
            assert_eq!(ExceptionClass::from_raw(reserved), Other(reserved));
        }
        assert_eq!(SError.name(), "SError");
        assert_eq!(Other(0x3f).name(), "reserved exception class");
    }

    #[test]
    fn stage2_fault_ipa() {
        // IPA 0x4000_1123: HPFAR holds IPA[51:12] in bits [43:4]; FAR holds the page offset.
        let hpfar = (0x4000_1123u64 >> 12) << 4;
        assert_eq!(hpfar_to_ipa(hpfar, 0xffff_0000_dead_b123), Ipa(0x4000_1123));
        // The NS bit (63) and the RES0 bits [3:0] are not address bits.
        assert_eq!(
            hpfar_to_ipa(hpfar | (1 << 63) | 0xf, 0x123),
            Ipa(0x4000_1123)
        );
        // The highest IPA with 52-bit physical addresses.
        let top = (1u64 << 52) - 1;
        assert_eq!(hpfar_to_ipa((top >> 12) << 4, top), Ipa(top));
        assert_eq!(hpfar_to_ipa(u64::MAX, u64::MAX), Ipa(top));
    }

    /// Encodes a data-abort ESR from its fields, the way the ARM ARM lays them out.
    #[allow(clippy::too_many_arguments)]
    fn encode_data_abort(
        lower: bool,
        isv: bool,
        sas_log2: u64,
        sse: bool,
        srt: u64,
        sf: bool,
        ar: bool,
        wnr: bool,
        s1ptw: bool,
        dfsc: u64,
    ) -> u64 {
        let ec = if lower { 0x24 } else { 0x25 };
        (ec << 26)
            | (1 << 25)
            | (u64::from(isv) << 24)
            | (sas_log2 << 22)
            | (u64::from(sse) << 21)
            | (srt << 16)
            | (u64::from(sf) << 15)
            | (u64::from(ar) << 14)
            | (u64::from(s1ptw) << 7)
            | (u64::from(wnr) << 6)
            | dfsc
    }

    proptest! {
        #[test]
        fn data_abort_fields_round_trip(
            lower in any::<bool>(), isv in any::<bool>(), sas_log2 in 0u64..4, sse in any::<bool>(),
            srt in 0u64..32, sf in any::<bool>(), ar in any::<bool>(), wnr in any::<bool>(),
            s1ptw in any::<bool>(), dfsc in 0u64..64,
        ) {
            let esr = Esr(encode_data_abort(lower, isv, sas_log2, sse, srt, sf, ar, wnr, s1ptw, dfsc));
            let da = esr.data_abort().expect("data abort");
            prop_assert_eq!(da.isv, isv);
            prop_assert_eq!(u64::from(da.sas), 1u64 << sas_log2);
            prop_assert_eq!(da.sse, sse);
            prop_assert_eq!(u64::from(da.srt), srt);
            prop_assert_eq!(da.sf, sf);
            prop_assert_eq!(da.ar, ar);
            prop_assert_eq!(da.wnr, wnr);
            prop_assert_eq!(da.s1ptw, s1ptw);
            prop_assert_eq!(da.dfsc, FaultStatus::from_raw(dfsc as u8));
            prop_assert!(!da.vncr && !da.fnv && !da.ea && !da.cm);
        }

        #[test]
        fn sys_reg_fields_round_trip(op0 in 0u64..4, op1 in 0u64..8, crn in 0u64..16, crm in 0u64..16, op2 in 0u64..8, rt in 0u64..32, read in any::<bool>()) {
            let iss = (op0 << 20) | (op2 << 17) | (op1 << 14) | (crn << 10) | (rt << 5) | (crm << 1) | u64::from(read);
            let sys = Esr((0x18 << 26) | (1 << 25) | iss).sys_reg().expect("sysreg");
            prop_assert!(sys.is(op0 as u8, op1 as u8, crn as u8, crm as u8, op2 as u8));
            prop_assert_eq!((u64::from(sys.rt), sys.read), (rt, read));
        }

        #[test]
        fn exception_class_round_trips(ec in 0u8..64) {
            prop_assert_eq!(ExceptionClass::from_raw(ec).raw(), ec);
            prop_assert_eq!(Esr(u64::from(ec) << 26).ec(), ExceptionClass::from_raw(ec));
            prop_assert!(!ExceptionClass::from_raw(ec).name().is_empty());
        }

        #[test]
        fn fault_status_levels_match_the_low_bits(fsc in 0u8..0x20) {
            // Below 0x20, every levelled code carries its level in bits [1:0].
            if let Some(level) = FaultStatus::from_raw(fsc).level() {
                if level >= 0 {
                    prop_assert_eq!(level as u8, fsc & 3);
                }
            }
        }

        #[test]
        fn any_value_decodes(v in any::<u64>(), hpfar in any::<u64>()) {
            let esr = Esr(v);
            let _ = (esr.ec(), esr.data_abort(), esr.instruction_abort(), esr.imm16(), esr.sys_reg(), esr.wfx());
            prop_assert!(!esr.to_string().is_empty());
            prop_assert_eq!(hpfar_to_ipa(hpfar, v).page_offset(), v & 0xfff);
            prop_assert!(hpfar_to_ipa(hpfar, v).0 < 1 << 52);
        }
    }
}
