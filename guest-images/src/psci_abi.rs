//! PSCI (Arm DEN 0022) function identifiers, return codes and conduits: the portable half of
//! the PSCI client; the calls themselves are in `arch::psci`.

use crate::bootargs::BootArgs;
use core::fmt;

/// How PSCI calls reach the firmware or hypervisor (`/psci` `method` in the DTB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conduit {
    /// `HVC #0`: plain QEMU at EL1 without EL2 (QEMU emulates PSCI itself).
    Hvc,
    /// `SMC #0`: firmware at EL3, or a hypervisor trapping SMC.
    Smc,
}

impl Conduit {
    /// The conduit a DTB `method` or a `psci=` bootarg names: `hvc` or `smc`.
    pub fn from_name(name: &str) -> Option<Conduit> {
        match name {
            "hvc" => Some(Conduit::Hvc),
            "smc" => Some(Conduit::Smc),
            _ => None,
        }
    }

    /// The instruction's name, as the DTB writes it.
    pub fn name(self) -> &'static str {
        match self {
            Conduit::Hvc => "hvc",
            Conduit::Smc => "smc",
        }
    }
}

/// A `psci=` bootarg whose value is neither `hvc` nor `smc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadConduit<'a>(pub &'a str);

impl fmt::Display for BadConduit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bootarg psci={:?} is neither hvc nor smc", self.0)
    }
}

/// The conduit the `psci=hvc` / `psci=smc` bootarg asks for, overriding the DTB's `method`;
/// `Ok(None)` without the bootarg (the last `psci=` word wins, as for every bootarg).
pub fn conduit_override(args: &BootArgs) -> Result<Option<Conduit>, BadConduit<'_>> {
    match args.get("psci") {
        None => Ok(None),
        Some(v) => Conduit::from_name(v).map(Some).ok_or(BadConduit(v)),
    }
}

/// `PSCI_VERSION`.
pub const PSCI_VERSION: u32 = 0x8400_0000;
/// `CPU_OFF`.
pub const CPU_OFF: u32 = 0x8400_0002;
/// `CPU_ON` (SMC64 calling convention).
pub const CPU_ON_64: u32 = 0xc400_0003;
/// `AFFINITY_INFO` (SMC64).
pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
/// `SYSTEM_OFF`.
pub const SYSTEM_OFF: u32 = 0x8400_0008;
/// `SYSTEM_RESET`.
pub const SYSTEM_RESET: u32 = 0x8400_0009;

/// A PSCI error return (negative values in x0), or a missing conduit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciError {
    /// -1 `NOT_SUPPORTED`.
    NotSupported,
    /// -2 `INVALID_PARAMETERS`.
    InvalidParameters,
    /// -3 `DENIED`.
    Denied,
    /// -4 `ALREADY_ON`.
    AlreadyOn,
    /// -5 `ON_PENDING`.
    OnPending,
    /// -6 `INTERNAL_FAILURE`.
    InternalFailure,
    /// -7 `NOT_PRESENT`.
    NotPresent,
    /// -8 `DISABLED`.
    Disabled,
    /// -9 `INVALID_ADDRESS`.
    InvalidAddress,
    /// Another negative value.
    Unknown(i64),
    /// The DTB has no `/psci` node, so there is no conduit to call through.
    NoConduit,
}

impl PsciError {
    /// Decodes x0 after a call: non-negative values are success and returned as they are.
    pub fn check(ret: u64) -> Result<u64, PsciError> {
        let code = ret as i64;
        if code >= 0 {
            return Ok(ret);
        }
        Err(match code {
            -1 => Self::NotSupported,
            -2 => Self::InvalidParameters,
            -3 => Self::Denied,
            -4 => Self::AlreadyOn,
            -5 => Self::OnPending,
            -6 => Self::InternalFailure,
            -7 => Self::NotPresent,
            -8 => Self::Disabled,
            -9 => Self::InvalidAddress,
            other => Self::Unknown(other),
        })
    }
}

impl fmt::Display for PsciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::NotSupported => "NOT_SUPPORTED",
            Self::InvalidParameters => "INVALID_PARAMETERS",
            Self::Denied => "DENIED",
            Self::AlreadyOn => "ALREADY_ON",
            Self::OnPending => "ON_PENDING",
            Self::InternalFailure => "INTERNAL_FAILURE",
            Self::NotPresent => "NOT_PRESENT",
            Self::Disabled => "DISABLED",
            Self::InvalidAddress => "INVALID_ADDRESS",
            Self::Unknown(c) => return write!(f, "PSCI error {c}"),
            Self::NoConduit => "no /psci node in the DTB",
        };
        write!(f, "PSCI {name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_return_codes() {
        assert_eq!(PsciError::check(0), Ok(0));
        assert_eq!(PsciError::check(0x1_0001), Ok(0x1_0001));
        assert_eq!(PsciError::check(-4i64 as u64), Err(PsciError::AlreadyOn));
        assert_eq!(
            PsciError::check(-9i64 as u64),
            Err(PsciError::InvalidAddress)
        );
        assert_eq!(
            PsciError::check(-42i64 as u64),
            Err(PsciError::Unknown(-42))
        );
        assert_eq!(PsciError::AlreadyOn.to_string(), "PSCI ALREADY_ON");
    }

    fn args(s: &str) -> BootArgs {
        BootArgs::from_property(s.as_bytes()).unwrap()
    }

    #[test]
    fn psci_bootarg_overrides_the_conduit() {
        assert_eq!(conduit_override(&args("")), Ok(None));
        assert_eq!(conduit_override(&args("ticks=3")), Ok(None));
        assert_eq!(
            conduit_override(&args("psci=smc ticks=3")),
            Ok(Some(Conduit::Smc))
        );
        assert_eq!(conduit_override(&args("psci=hvc")), Ok(Some(Conduit::Hvc)));
        assert_eq!(
            conduit_override(&args("psci=hvc psci=smc")),
            Ok(Some(Conduit::Smc))
        );
        assert_eq!(conduit_override(&args("psci=SMC")), Err(BadConduit("SMC")));
        assert_eq!(conduit_override(&args("psci")), Err(BadConduit("")));
        assert_eq!(
            BadConduit("x").to_string(),
            "bootarg psci=\"x\" is neither hvc nor smc"
        );
        for c in [Conduit::Hvc, Conduit::Smc] {
            assert_eq!(Conduit::from_name(c.name()), Some(c));
        }
    }
}
