//! PSCI 1.1 and SMCCC 1.1 calls made by a guest, decoded.
//!
//! A guest's `HVC #0` (or `SMC #0`, trapped by HCR_EL2.TSC) carries an SMC Calling Convention
//! (Arm DEN0028) function identifier in W0 and arguments in X1-X3. [`decode`] turns those four
//! registers into a [`PsciCall`]; the monitor decides what to do and writes the answer back with
//! [`ret`]. Function IDs were checked against PSCI (Arm DEN0022) and Linux's
//! `include/uapi/linux/psci.h` / `include/linux/arm-smccc.h`.
//!
//! Function ID layout (DEN0028): bit 31 = fast call, bit 30 = SMC64, bits 29:24 = owning entity
//! number (OEN), bit 16 = SVE live-state hint (SMCCC 1.3, ignored here), bits 15:0 = function
//! number. The upper 32 bits of X0 are ignored (the ID is W0). SMC32 calls take 32-bit
//! arguments: their X1-X3 are masked to W1-W3.
//!
//! # vmfork's own calls
//! vmfork reserves fast calls in the SMCCC "Vendor Specific Hypervisor Service Calls" range,
//! OEN 6:
//!
//! | ID            | name                  | meaning                                                 |
//! |---------------|-----------------------|---------------------------------------------------------|
//! | `0x8600_FF01` | Call UID (SMC32)      | returns [`VMFORK_UID`] in W0-W3 (standard SMCCC query) |
//! | `0x8600_FF03` | Revision (SMC32)      | returns major in W0, minor in W1                        |
//! | `0xC600_0001` | `VMFORK_FORK` (SMC64) | fork the calling VM: X0 = child's VM id in the parent, 0 in the child, negative error on failure (-3 DENIED, -6 INTERNAL_FAILURE = out of memory, -10 [`VMFORK_BUSY`]) |
//! | `0xC600_0002` | `VMFORK_IDENTITY` (SMC64) | X0 = this VM's id, X1 = parent's id (`u64::MAX` for none), X2 = fork generation (0 = not a fork), X3 = resets to its fork point so far |
//! | `0xC600_0003` | `VMFORK_RESET` (SMC64) | a fork puts itself back to its fork point (the fuzzing loop): memory, vCPUs and devices; execution resumes as the child's return from `VMFORK_FORK` (X0 = 0). Returns -3 DENIED (X0) when the VM is not a fork, -10 [`VMFORK_BUSY`] |
//!
//! `VMFORK_BUSY` (-10, vmfork's own code beside PSCI's -1 to -9): another fork or reset of the
//! VM was already waiting when the call was made (another vCPU's call at the same instant, or one
//! from the control channel). Nothing was done; the vCPU may call again. A fork copies the
//! refused vCPU into the child with the same -10 in X0 (see `crate::opqueue`).
//!
//! A guest checks the Call UID before using the others, since other hypervisors (KVM) use the
//! same OEN with their own function numbers. Anything unrecognised decodes to
//! [`PsciCall::Unknown`], which the monitor answers with [`PsciReturn::NotSupported`].

use core::fmt;

/// `PSCI_VERSION` (SMC32 only).
pub const PSCI_VERSION: u32 = 0x8400_0000;
/// `CPU_SUSPEND`, SMC32.
pub const PSCI_CPU_SUSPEND_32: u32 = 0x8400_0001;
/// `CPU_SUSPEND`, SMC64.
pub const PSCI_CPU_SUSPEND_64: u32 = 0xC400_0001;
/// `CPU_OFF` (SMC32 only).
pub const PSCI_CPU_OFF: u32 = 0x8400_0002;
/// `CPU_ON`, SMC32.
pub const PSCI_CPU_ON_32: u32 = 0x8400_0003;
/// `CPU_ON`, SMC64.
pub const PSCI_CPU_ON_64: u32 = 0xC400_0003;
/// `AFFINITY_INFO`, SMC32.
pub const PSCI_AFFINITY_INFO_32: u32 = 0x8400_0004;
/// `AFFINITY_INFO`, SMC64.
pub const PSCI_AFFINITY_INFO_64: u32 = 0xC400_0004;
/// `MIGRATE`, SMC32 (not supported: no Trusted OS).
pub const PSCI_MIGRATE_32: u32 = 0x8400_0005;
/// `MIGRATE_INFO_TYPE` (SMC32 only).
pub const PSCI_MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
/// `SYSTEM_OFF` (SMC32 only).
pub const PSCI_SYSTEM_OFF: u32 = 0x8400_0008;
/// `SYSTEM_RESET` (SMC32 only).
pub const PSCI_SYSTEM_RESET: u32 = 0x8400_0009;
/// `PSCI_FEATURES` (SMC32 only, PSCI 1.0+).
pub const PSCI_FEATURES: u32 = 0x8400_000A;
/// `SYSTEM_RESET2`, SMC32 (PSCI 1.1, optional, not supported here).
pub const PSCI_SYSTEM_RESET2_32: u32 = 0x8400_0012;

/// `SMCCC_VERSION` (SMCCC 1.1+).
pub const SMCCC_VERSION: u32 = 0x8000_0000;
/// `SMCCC_ARCH_FEATURES` (SMCCC 1.1+).
pub const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;
/// `SMCCC_ARCH_WORKAROUND_1` (Spectre-v2 mitigation; not offered).
pub const SMCCC_ARCH_WORKAROUND_1: u32 = 0x8000_8000;

/// Vendor Specific Hypervisor Service: Call UID query.
pub const VENDOR_HYP_CALL_UID: u32 = 0x8600_FF01;
/// Vendor Specific Hypervisor Service: Revision query.
pub const VENDOR_HYP_REVISION: u32 = 0x8600_FF03;
/// vmfork: fork the calling VM.
pub const VMFORK_FORK: u32 = 0xC600_0001;
/// vmfork: report the calling VM's clone identity.
pub const VMFORK_IDENTITY: u32 = 0xC600_0002;
/// vmfork: put the calling fork back to its fork point.
pub const VMFORK_RESET: u32 = 0xC600_0003;

/// vmfork's error code (X0, sign-extended) for a `VMFORK_FORK` or `VMFORK_RESET` made while
/// another fork or reset of the VM waits: nothing was done, call again.
pub const VMFORK_BUSY: i32 = -10;

/// vmfork's UID for the Vendor Specific Hypervisor Service range,
/// `5b32c928-3b06-4833-8220-53dae7fde2ad`, as the four 32-bit words returned in W0-W3
/// (bytes 0-3 of the UUID in W0, little-endian within each word, as SMCCC specifies).
pub const VMFORK_UID: [u32; 4] = [0x28c9_325b, 0x3348_063b, 0xda53_2082, 0xade2_fde7];
/// Revision of vmfork's vendor hypercall ABI: (major, minor).
pub const VMFORK_REVISION: (u32, u32) = (0, 1);

/// PSCI version reported by `PSCI_VERSION`: 1.1 (major in bits 31:16, minor in 15:0).
pub const PSCI_VERSION_1_1: u32 = 0x0001_0001;
/// SMCCC version reported by `SMCCC_VERSION`: 1.1.
pub const SMCCC_VERSION_1_1: u32 = 0x0001_0001;

/// `MIGRATE_INFO_TYPE` answer: a Trusted OS is not present or does not require migration.
pub const MIGRATE_INFO_TYPE_NOT_PRESENT: u32 = 2;

/// Bit 30 of a function ID: SMC64 calling convention.
const SMC64_BIT: u32 = 1 << 30;
/// Bit 16 of a function ID: SVE live-state hint (SMCCC 1.3). Not part of the function.
const SVE_HINT_BIT: u32 = 1 << 16;

/// A PSCI / SMCCC return code (PSCI DEN0022 table 6). Returned in X0, sign-extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum PsciReturn {
    /// Success.
    Success = 0,
    /// The function is not implemented.
    NotSupported = -1,
    /// A parameter is invalid.
    InvalidParameters = -2,
    /// The operation is not allowed.
    Denied = -3,
    /// `CPU_ON`: the target is already on.
    AlreadyOn = -4,
    /// `CPU_ON`: the target is already being turned on.
    OnPending = -5,
    /// The implementation failed.
    InternalFailure = -6,
    /// The target is not present.
    NotPresent = -7,
    /// The target is disabled.
    Disabled = -8,
    /// An address (entry point) is invalid.
    InvalidAddress = -9,
}

impl PsciReturn {
    /// The code as the guest reads it from X0 (sign-extended to 64 bits).
    pub fn to_x0(self) -> u64 {
        ret(self as i32)
    }
}

impl fmt::Display for PsciReturn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PsciReturn::Success => "SUCCESS",
            PsciReturn::NotSupported => "NOT_SUPPORTED",
            PsciReturn::InvalidParameters => "INVALID_PARAMETERS",
            PsciReturn::Denied => "DENIED",
            PsciReturn::AlreadyOn => "ALREADY_ON",
            PsciReturn::OnPending => "ON_PENDING",
            PsciReturn::InternalFailure => "INTERNAL_FAILURE",
            PsciReturn::NotPresent => "NOT_PRESENT",
            PsciReturn::Disabled => "DISABLED",
            PsciReturn::InvalidAddress => "INVALID_ADDRESS",
        };
        write!(f, "{s} ({})", *self as i32)
    }
}

/// Encodes a signed 32-bit result for X0 (sign-extended, as SMCCC requires for SMC32 results
/// read through W0 and as Linux reads them through X0).
pub fn ret(value: i32) -> u64 {
    value as i64 as u64
}

/// `AFFINITY_INFO` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AffinityState {
    /// At least one PE of the affinity instance is on.
    On = 0,
    /// All PEs of the affinity instance are off.
    Off = 1,
    /// A `CPU_ON` for it is in progress.
    OnPending = 2,
}

/// vmfork's vendor hypercalls (OEN 6, SMC64 fast calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmforkCall {
    /// `VMFORK_FORK`: fork the calling VM. Arguments X1-X3 are passed through raw; their
    /// meaning belongs to the fork engine.
    Fork {
        /// X1-X3 as the guest left them.
        args: [u64; 3],
    },
    /// `VMFORK_IDENTITY`: the calling VM asks for its generation counter and clone ID.
    Identity,
    /// `VMFORK_RESET`: the calling fork asks to be put back to its fork point.
    Reset,
}

/// A decoded guest HVC/SMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciCall {
    /// `PSCI_VERSION`: answer [`PSCI_VERSION_1_1`].
    Version,
    /// `CPU_SUSPEND`.
    CpuSuspend {
        /// Power state parameter.
        power_state: u32,
        /// Entry point for a powerdown state (IPA of the guest's resume code).
        entry_point: u64,
        /// Value for X0 at `entry_point`.
        context_id: u64,
    },
    /// `CPU_OFF`: power down the calling vCPU.
    CpuOff,
    /// `CPU_ON`.
    CpuOn {
        /// MPIDR affinity of the vCPU to start.
        target_cpu: u64,
        /// Where it starts (IPA, MMU off).
        entry_point: u64,
        /// Its X0 at `entry_point`.
        context_id: u64,
    },
    /// `AFFINITY_INFO`: answer an [`AffinityState`].
    AffinityInfo {
        /// MPIDR affinity asked about.
        target_affinity: u64,
        /// Lowest affinity level of interest (only 0 is meaningful for us).
        lowest_affinity_level: u32,
    },
    /// `MIGRATE_INFO_TYPE`: answer [`MIGRATE_INFO_TYPE_NOT_PRESENT`].
    MigrateInfoType,
    /// `SYSTEM_OFF`: stop this VM.
    SystemOff,
    /// `SYSTEM_RESET`: reboot this VM.
    SystemReset,
    /// `PSCI_FEATURES`: answer with [`psci_features`].
    Features {
        /// The function ID asked about.
        function_id: u32,
    },
    /// `SMCCC_VERSION`: answer [`SMCCC_VERSION_1_1`].
    SmcccVersion,
    /// `SMCCC_ARCH_FEATURES`: answer with [`smccc_arch_features`].
    SmcccArchFeatures {
        /// The function ID asked about.
        function_id: u32,
    },
    /// Vendor hypervisor Call UID query: answer [`VMFORK_UID`] in X0-X3.
    VendorHypCallUid,
    /// Vendor hypervisor Revision query: answer [`VMFORK_REVISION`] in X0, X1.
    VendorHypRevision,
    /// One of vmfork's own calls.
    Vmfork(VmforkCall),
    /// Anything else: answer [`PsciReturn::NotSupported`].
    Unknown {
        /// The function ID (W0) as the guest gave it.
        function_id: u32,
    },
}

/// Decodes a guest's SMCCC call from X0-X3.
///
/// Total: every input gives a [`PsciCall`], unknown IDs give [`PsciCall::Unknown`].
pub fn decode(x0: u64, x1: u64, x2: u64, x3: u64) -> PsciCall {
    let raw_id = x0 as u32;
    let id = raw_id & !SVE_HINT_BIT;
    let smc64 = id & SMC64_BIT != 0;
    // SMC32 calls take their arguments in W1-W3.
    let arg = |x: u64| if smc64 { x } else { x & 0xFFFF_FFFF };
    let (a1, a2, a3) = (arg(x1), arg(x2), arg(x3));
    match id {
        PSCI_VERSION => PsciCall::Version,
        PSCI_CPU_SUSPEND_32 | PSCI_CPU_SUSPEND_64 => PsciCall::CpuSuspend {
            power_state: a1 as u32,
            entry_point: a2,
            context_id: a3,
        },
        PSCI_CPU_OFF => PsciCall::CpuOff,
        PSCI_CPU_ON_32 | PSCI_CPU_ON_64 => PsciCall::CpuOn {
            target_cpu: a1,
            entry_point: a2,
            context_id: a3,
        },
        PSCI_AFFINITY_INFO_32 | PSCI_AFFINITY_INFO_64 => PsciCall::AffinityInfo {
            target_affinity: a1,
            lowest_affinity_level: a2 as u32,
        },
        PSCI_MIGRATE_INFO_TYPE => PsciCall::MigrateInfoType,
        PSCI_SYSTEM_OFF => PsciCall::SystemOff,
        PSCI_SYSTEM_RESET => PsciCall::SystemReset,
        PSCI_FEATURES => PsciCall::Features {
            function_id: a1 as u32,
        },
        SMCCC_VERSION => PsciCall::SmcccVersion,
        SMCCC_ARCH_FEATURES => PsciCall::SmcccArchFeatures {
            function_id: a1 as u32,
        },
        VENDOR_HYP_CALL_UID => PsciCall::VendorHypCallUid,
        VENDOR_HYP_REVISION => PsciCall::VendorHypRevision,
        VMFORK_FORK => PsciCall::Vmfork(VmforkCall::Fork { args: [a1, a2, a3] }),
        VMFORK_IDENTITY => PsciCall::Vmfork(VmforkCall::Identity),
        VMFORK_RESET => PsciCall::Vmfork(VmforkCall::Reset),
        _ => PsciCall::Unknown {
            function_id: raw_id,
        },
    }
}

/// Function IDs this monitor implements among the PSCI and SMCCC architecture calls.
pub const SUPPORTED_PSCI_FUNCTIONS: [u32; 14] = [
    PSCI_VERSION,
    PSCI_CPU_SUSPEND_32,
    PSCI_CPU_SUSPEND_64,
    PSCI_CPU_OFF,
    PSCI_CPU_ON_32,
    PSCI_CPU_ON_64,
    PSCI_AFFINITY_INFO_32,
    PSCI_AFFINITY_INFO_64,
    PSCI_MIGRATE_INFO_TYPE,
    PSCI_SYSTEM_OFF,
    PSCI_SYSTEM_RESET,
    PSCI_FEATURES,
    SMCCC_VERSION,
    SMCCC_ARCH_FEATURES,
];

/// The answer to `PSCI_FEATURES(function_id)`, for X0.
///
/// Supported functions return 0 (for `CPU_SUSPEND` that also means: original power-state
/// format, no OS-initiated mode; the monitor enters every power state as a standby, waiting
/// like WFI and returning SUCCESS, as PSCI allows and KVM does); everything else returns
/// `NOT_SUPPORTED`. `SMCCC_VERSION`
/// counts as supported: that is how a guest learns SMCCC 1.1 is there.
pub fn psci_features(function_id: u32) -> i32 {
    if SUPPORTED_PSCI_FUNCTIONS.contains(&function_id) {
        PsciReturn::Success as i32
    } else {
        PsciReturn::NotSupported as i32
    }
}

/// The affinity fields of an MPIDR as PSCI takes them in `target_cpu` / `target_affinity`:
/// Aff3 in bits 39:32, Aff2..Aff0 in bits 23:0. PSCI (DEN0022, 5.1.4 CPU_ON) requires every
/// other bit to be zero: bit 31 (RES1 in MPIDR_EL1 itself), bit 30 (U), bit 24 (MT) and bits
/// 63:40 are not part of an affinity value.
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// The affinity a `target_cpu` argument names, or `None` when a bit outside the affinity
/// fields is set (answer `INVALID_PARAMETERS`: such a value names no PE, however its affinity
/// fields compare).
pub const fn target_affinity(target: u64) -> Option<u64> {
    if target & !MPIDR_AFFINITY_MASK != 0 {
        None
    } else {
        Some(target)
    }
}

/// Index of the vCPU with MPIDR affinity `target` among `mpidrs` (each already an affinity
/// value), or `INVALID_PARAMETERS` when `target` has bits outside the affinity fields or matches
/// none.
pub fn find_target(
    target: u64,
    mpidrs: impl IntoIterator<Item = u64>,
) -> Result<usize, PsciReturn> {
    let aff = target_affinity(target).ok_or(PsciReturn::InvalidParameters)?;
    mpidrs
        .into_iter()
        .position(|m| m == aff)
        .ok_or(PsciReturn::InvalidParameters)
}

/// Checks a `CPU_ON` request against the VM: the target must name one of its vCPUs
/// ([`find_target`]), and the entry point must be inside its RAM `[ram_base, ram_base +
/// ram_size)`: anything else is `INVALID_ADDRESS` (DEN0022 5.6.2: the entry point is "known by
/// the implementation to be invalid"), instead of starting a vCPU that can only fault. Returns
/// the vCPU's index; whether it is already on is for the caller.
pub fn check_cpu_on(
    target: u64,
    entry_point: u64,
    ram_base: u64,
    ram_size: u64,
    mpidrs: impl IntoIterator<Item = u64>,
) -> Result<usize, PsciReturn> {
    let index = find_target(target, mpidrs)?;
    let in_ram = entry_point >= ram_base && entry_point - ram_base < ram_size;
    if !in_ram {
        return Err(PsciReturn::InvalidAddress);
    }
    Ok(index)
}

/// The answer to `SMCCC_ARCH_FEATURES(function_id)`, for X0.
///
/// Only the SMCCC architecture calls themselves are implemented; the Spectre workaround calls
/// (`SMCCC_ARCH_WORKAROUND_*`) are not offered and answer `NOT_SUPPORTED`.
pub fn smccc_arch_features(function_id: u32) -> i32 {
    match function_id {
        SMCCC_VERSION | SMCCC_ARCH_FEATURES => PsciReturn::Success as i32,
        _ => PsciReturn::NotSupported as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;

    #[test]
    fn ids_match_the_specs() {
        // PSCI DEN0022: base 0x8400_0000 + function number, SMC64 sets bit 30.
        assert_eq!(PSCI_CPU_ON_64, PSCI_CPU_ON_32 | SMC64_BIT);
        assert_eq!(PSCI_AFFINITY_INFO_64, PSCI_AFFINITY_INFO_32 | SMC64_BIT);
        assert_eq!(PSCI_FEATURES, 0x8400_0000 + 10);
        assert_eq!(PSCI_SYSTEM_RESET2_32, 0x8400_0000 + 18);
        // Vendor hypervisor range: fast call, OEN 6.
        for id in [
            VMFORK_FORK,
            VMFORK_IDENTITY,
            VMFORK_RESET,
            VENDOR_HYP_CALL_UID,
        ] {
            assert_eq!(id >> 31, 1);
            assert_eq!((id >> 24) & 0x3F, 6);
        }
    }

    #[test]
    fn decodes_every_psci_call() {
        assert_eq!(decode(0x8400_0000, 1, 2, 3), PsciCall::Version);
        assert_eq!(decode(0x8400_0002, 0, 0, 0), PsciCall::CpuOff);
        assert_eq!(decode(0x8400_0006, 0, 0, 0), PsciCall::MigrateInfoType);
        assert_eq!(decode(0x8400_0008, 0, 0, 0), PsciCall::SystemOff);
        assert_eq!(decode(0x8400_0009, 0, 0, 0), PsciCall::SystemReset);
        assert_eq!(decode(0x8000_0000, 0, 0, 0), PsciCall::SmcccVersion);
        assert_eq!(
            decode(0xC400_0003, 0x101, 0x4008_0000, 0xFFFF_FFFF_0000_0001),
            PsciCall::CpuOn {
                target_cpu: 0x101,
                entry_point: 0x4008_0000,
                context_id: 0xFFFF_FFFF_0000_0001
            }
        );
        // SMC32 masks arguments to 32 bits.
        assert_eq!(
            decode(
                0x8400_0003,
                0xAAAA_0000_0000_0002,
                0xBBBB_0000_4008_0000,
                u64::MAX
            ),
            PsciCall::CpuOn {
                target_cpu: 2,
                entry_point: 0x4008_0000,
                context_id: 0xFFFF_FFFF
            }
        );
        assert_eq!(
            decode(0x8400_0004, 0x1_0000_0003, 0x1_0000_0000, 0),
            PsciCall::AffinityInfo {
                target_affinity: 3,
                lowest_affinity_level: 0
            }
        );
        assert_eq!(
            decode(0xC400_0001, 0x1_0001_0000, 0x4000_1000, 9),
            PsciCall::CpuSuspend {
                power_state: 0x0001_0000,
                entry_point: 0x4000_1000,
                context_id: 9
            }
        );
        assert_eq!(
            decode(0x8400_000A, 0xC400_0003, 0, 0),
            PsciCall::Features {
                function_id: 0xC400_0003
            }
        );
        assert_eq!(
            decode(0x8000_0001, 0x8000_8000, 0, 0),
            PsciCall::SmcccArchFeatures {
                function_id: 0x8000_8000
            }
        );
    }

    #[test]
    fn upper_x0_and_sve_hint_are_ignored() {
        assert_eq!(decode(0xFFFF_FFFF_8400_0000, 0, 0, 0), PsciCall::Version);
        assert_eq!(decode(0x8401_0002, 0, 0, 0), PsciCall::CpuOff);
    }

    #[test]
    fn unknown_and_wrong_width_ids() {
        for id in [
            0xC400_0000u32, // PSCI_VERSION has no SMC64 form
            0xC400_0002,    // nor CPU_OFF
            0xC400_0008,    // nor SYSTEM_OFF
            0x8400_0005,    // MIGRATE: not implemented
            0x8400_0012,    // SYSTEM_RESET2: not implemented
            0x0400_0000,    // yielding call
            0x8600_0001,    // SMC32 twin of VMFORK_FORK
            0xC600_0004,    // past the last vmfork call
            0x8000_8000,    // ARCH_WORKAROUND_1
            0,
        ] {
            assert_eq!(
                decode(id as u64, 0, 0, 0),
                PsciCall::Unknown { function_id: id },
                "{id:#x}"
            );
        }
    }

    #[test]
    fn vendor_calls() {
        assert_eq!(decode(0x8600_FF01, 0, 0, 0), PsciCall::VendorHypCallUid);
        assert_eq!(decode(0x8600_FF03, 0, 0, 0), PsciCall::VendorHypRevision);
        assert_eq!(
            decode(0xC600_0001, 1, 2, 3),
            PsciCall::Vmfork(VmforkCall::Fork { args: [1, 2, 3] })
        );
        assert_eq!(
            decode(0xC600_0002, 0, 0, 0),
            PsciCall::Vmfork(VmforkCall::Identity)
        );
        // UID words are the UUID's bytes in order, little-endian in each word.
        let bytes: [u8; 16] = [
            0x5b, 0x32, 0xc9, 0x28, 0x3b, 0x06, 0x48, 0x33, 0x82, 0x20, 0x53, 0xda, 0xe7, 0xfd,
            0xe2, 0xad,
        ];
        for (i, w) in VMFORK_UID.iter().enumerate() {
            let b = &bytes[i * 4..i * 4 + 4];
            assert_eq!(*w, u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
    }

    #[test]
    fn feature_answers() {
        for id in SUPPORTED_PSCI_FUNCTIONS {
            assert_eq!(psci_features(id), 0, "{id:#x}");
            // Every supported ID must decode to something known.
            assert!(!matches!(
                decode(id as u64, 0, 0, 0),
                PsciCall::Unknown { .. }
            ));
        }
        assert_eq!(psci_features(PSCI_MIGRATE_32), -1);
        assert_eq!(psci_features(PSCI_SYSTEM_RESET2_32), -1);
        assert_eq!(psci_features(0xC400_0000), -1);
        assert_eq!(smccc_arch_features(SMCCC_ARCH_WORKAROUND_1), -1);
        assert_eq!(smccc_arch_features(SMCCC_VERSION), 0);
    }

    #[test]
    fn return_codes() {
        assert_eq!(PsciReturn::NotSupported.to_x0(), u64::MAX);
        assert_eq!(PsciReturn::InvalidAddress.to_x0(), (-9i64) as u64);
        assert_eq!(PsciReturn::Success.to_x0(), 0);
        assert_eq!(PsciReturn::AlreadyOn as i32, -4);
        assert_eq!(PsciReturn::Disabled as i32, -8);
        assert_eq!(PsciReturn::Denied.to_string(), "DENIED (-3)");
        assert_eq!(ret(PSCI_VERSION_1_1 as i32), 0x0001_0001);
    }

    #[test]
    fn cpu_on_targets_and_entry_points() {
        let mpidrs = [0x0, 0x1, 0x2, 0x1_0000_0003];
        let ram = (0x4000_0000u64, 0x100_0000u64);
        let on = |t, e| check_cpu_on(t, e, ram.0, ram.1, mpidrs);
        assert_eq!(on(1, 0x4000_0000), Ok(1));
        assert_eq!(on(0x1_0000_0003, 0x40ff_fffc), Ok(3));
        // Entry points outside RAM: below, at the end, far above, wrapping.
        assert_eq!(on(1, 0x3fff_fffc), Err(PsciReturn::InvalidAddress));
        assert_eq!(on(1, 0x4100_0000), Err(PsciReturn::InvalidAddress));
        assert_eq!(on(1, 0), Err(PsciReturn::InvalidAddress));
        assert_eq!(on(1, u64::MAX), Err(PsciReturn::InvalidAddress));
        // Bits outside the affinity fields never match, even when Aff3..Aff0 would.
        for bad in [
            1 | 1 << 31,
            1 | 1 << 24,
            1 | 1 << 30,
            1 | 1 << 40,
            1 | 1 << 63,
            2 | 0xff << 24,
        ] {
            assert_eq!(
                on(bad, 0x4000_0000),
                Err(PsciReturn::InvalidParameters),
                "{bad:#x}"
            );
        }
        // No such vCPU.
        assert_eq!(on(4, 0x4000_0000), Err(PsciReturn::InvalidParameters));
        assert_eq!(on(0x100, 0x4000_0000), Err(PsciReturn::InvalidParameters));
        assert_eq!(find_target(0x1_0000_0003, mpidrs), Ok(3));
        assert_eq!(
            find_target(0x1_8000_0003, mpidrs),
            Err(PsciReturn::InvalidParameters)
        );
    }

    proptest! {
        #[test]
        fn decode_is_total_and_masks_smc32(x0 in any::<u64>(), x1 in any::<u64>(), x2 in any::<u64>(), x3 in any::<u64>()) {
            let call = decode(x0, x1, x2, x3);
            let id = (x0 as u32) & !SVE_HINT_BIT;
            let known = SUPPORTED_PSCI_FUNCTIONS.contains(&id)
                || [VENDOR_HYP_CALL_UID, VENDOR_HYP_REVISION, VMFORK_FORK, VMFORK_IDENTITY, VMFORK_RESET].contains(&id);
            prop_assert_eq!(known, !matches!(call, PsciCall::Unknown { .. }));
            if id & SMC64_BIT == 0 {
                if let PsciCall::CpuOn { target_cpu, entry_point, context_id } = call {
                    prop_assert!(target_cpu <= 0xFFFF_FFFF && entry_point <= 0xFFFF_FFFF && context_id <= 0xFFFF_FFFF);
                }
            }
            // Upper X0 bits never change the decode.
            prop_assert_eq!(decode(x0 & 0xFFFF_FFFF, x1, x2, x3), call);
        }

        #[test]
        fn cpu_on_accepts_exactly_ram_and_known_affinities(target in any::<u64>(), entry in any::<u64>()) {
            let mpidrs = [0u64, 1, 2, 3];
            let r = check_cpu_on(target, entry, 0x4000_0000, 1 << 24, mpidrs);
            let known = target < 4;
            let in_ram = (0x4000_0000..0x4000_0000 + (1 << 24)).contains(&entry);
            match r {
                Ok(i) => prop_assert!(known && in_ram && i as u64 == target),
                Err(PsciReturn::InvalidParameters) => prop_assert!(!known),
                Err(PsciReturn::InvalidAddress) => prop_assert!(known && !in_ram),
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
        }

        #[test]
        fn known_ids_decode_the_same_with_any_upper_bits(upper in any::<u32>(), i in 0usize..14) {
            let id = SUPPORTED_PSCI_FUNCTIONS[i];
            prop_assert_eq!(decode(((upper as u64) << 32) | id as u64, 0, 0, 0), decode(id as u64, 0, 0, 0));
        }
    }
}
