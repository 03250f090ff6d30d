//! The guest's side of vmfork's own hypercalls (SMCCC "Vendor Specific Hypervisor Service
//! Calls", owning entity number 6), portable half: function IDs, the monitor's Call UID and the
//! decoding of the answers. The calls themselves are in `arch::runtime`.
//!
//! The guest crate does not depend on `vmfork-core`: the values below are copies of the
//! constants in `hypervisor/core/src/psci.rs` (`VENDOR_HYP_CALL_UID`, `VMFORK_UID`,
//! `VMFORK_FORK`, `VMFORK_IDENTITY`); a host unit test checks them against that crate, which is
//! only a dev-dependency.
//!
//! A guest must check the Call UID before making any other call in this range: other
//! hypervisors (KVM) give the same function numbers their own meanings. Plain QEMU answers every
//! unknown SMCCC function with `NOT_SUPPORTED` (-1), so the UID query is safe everywhere.

use crate::psci_abi::PsciError;
use core::fmt;

/// Vendor Specific Hypervisor Service: Call UID query (SMC32 fast call). Answer in W0-W3.
pub const VENDOR_HYP_CALL_UID: u32 = 0x8600_FF01;
/// `VMFORK_FORK` (SMC64 fast call): fork the calling VM.
pub const VMFORK_FORK: u32 = 0xC600_0001;
/// `VMFORK_IDENTITY` (SMC64 fast call): this VM's ID, its parent's ID and its fork generation.
pub const VMFORK_IDENTITY: u32 = 0xC600_0002;
/// `VMFORK_RESET` (SMC64 fast call): a fork goes back to its fork point.
pub const VMFORK_RESET: u32 = 0xC600_0003;

/// The vmfork monitor's Call UID, UUID `5b32c928-3b06-4833-8220-53dae7fde2ad`, as the four
/// 32-bit words it returns in W0-W3: bytes 0-3 of the UUID in W0, each word little-endian
/// (the same encoding as `VMFORK_UID` in `hypervisor/core/src/psci.rs`).
pub const VMFORK_UID: [u32; 4] = [0x28c9_325b, 0x3348_063b, 0xda53_2082, 0xade2_fde7];

/// vmfork's own error code (x0, sign-extended) from `VMFORK_FORK`/`VMFORK_RESET` made while
/// another fork or reset of the VM waits (another vCPU's call at the same instant): nothing was
/// done; call again. Copy of `vmfork_core::psci::VMFORK_BUSY`.
pub const VMFORK_BUSY: i64 = -10;

/// The parent ID `VMFORK_IDENTITY` reports for a VM that was not forked from another.
pub const NO_PARENT: u64 = u64::MAX;

/// Whether x0-x3 returned by the Call UID query name the vmfork monitor. Only the low 32 bits
/// of each register count (an SMC32 call returns its results in W0-W3).
pub fn is_vmfork_uid(regs: [u64; 4]) -> bool {
    regs.iter()
        .zip(VMFORK_UID.iter())
        .all(|(&r, &w)| r as u32 == w)
}

/// What `VMFORK_FORK` returned to the calling vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkOutcome {
    /// This is the original VM; the child has this VM ID.
    Parent {
        /// The new child's VM ID (> 0).
        child: u64,
    },
    /// This is the new child VM.
    Child,
}

/// Decodes x0 after `VMFORK_FORK`: a positive value is the child's ID (in the parent), 0 means
/// "you are the child", a negative value is a PSCI-style error (`NOT_SUPPORTED` without the
/// monitor, `DENIED`, `INTERNAL_FAILURE` when it runs out of memory, `Unknown(VMFORK_BUSY)`
/// when another fork or reset of the VM was waiting).
pub fn decode_fork(x0: u64) -> Result<ForkOutcome, PsciError> {
    match x0 as i64 {
        0 => Ok(ForkOutcome::Child),
        v if v > 0 => Ok(ForkOutcome::Parent { child: x0 }),
        _ => PsciError::check(x0).map(|_| ForkOutcome::Child),
    }
}

/// A VM's clone identity, as `VMFORK_IDENTITY` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// This VM's ID (x0).
    pub vm: u64,
    /// The VM it was forked from (x1), `None` for an original VM ([`NO_PARENT`]).
    pub parent: Option<u64>,
    /// Fork generation (x2): 0 for an original VM, the parent's plus one for a child.
    pub generation: u64,
    /// Resets to its fork point so far (x3).
    pub resets: u64,
}

impl Identity {
    /// Decodes x0-x2 after `VMFORK_IDENTITY`. A negative x0 is an error (the call is not
    /// implemented): VM IDs never have bit 63 set.
    pub fn decode(regs: [u64; 4]) -> Result<Self, PsciError> {
        let vm = PsciError::check(regs[0])?;
        Ok(Self {
            vm,
            parent: (regs[1] != NO_PARENT).then_some(regs[1]),
            generation: regs[2],
            resets: regs[3],
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm={}", self.vm)?;
        match self.parent {
            Some(p) => write!(f, " parent={p}")?,
            None => write!(f, " parent=none")?,
        }
        write!(f, " generation={}", self.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vmfork_core::psci;

    /// The copies must match the monitor's definitions exactly.
    #[test]
    fn constants_match_vmfork_core() {
        assert_eq!(VENDOR_HYP_CALL_UID, psci::VENDOR_HYP_CALL_UID);
        assert_eq!(VMFORK_FORK, psci::VMFORK_FORK);
        assert_eq!(VMFORK_IDENTITY, psci::VMFORK_IDENTITY);
        assert_eq!(VMFORK_RESET, psci::VMFORK_RESET);
        assert_eq!(VMFORK_UID, psci::VMFORK_UID);
        assert_eq!(VMFORK_BUSY, i64::from(psci::VMFORK_BUSY));
        // And the monitor decodes them as the calls we mean.
        assert_eq!(
            psci::decode(u64::from(VENDOR_HYP_CALL_UID), 0, 0, 0),
            psci::PsciCall::VendorHypCallUid
        );
        assert_eq!(
            psci::decode(u64::from(VMFORK_IDENTITY), 0, 0, 0),
            psci::PsciCall::Vmfork(psci::VmforkCall::Identity)
        );
        assert!(matches!(
            psci::decode(u64::from(VMFORK_FORK), 0, 0, 0),
            psci::PsciCall::Vmfork(psci::VmforkCall::Fork { .. })
        ));
    }

    #[test]
    fn uid_words_are_the_uuid_bytes_little_endian() {
        let uuid = "5b32c928-3b06-4833-8220-53dae7fde2ad".replace('-', "");
        let bytes: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&uuid[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        for (i, w) in VMFORK_UID.iter().enumerate() {
            let b = &bytes[4 * i..4 * i + 4];
            assert_eq!(*w, u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
    }

    #[test]
    fn uid_recognition() {
        let uid = VMFORK_UID.map(u64::from);
        assert!(is_vmfork_uid(uid));
        // Upper halves are ignored (SMC32 results).
        assert!(is_vmfork_uid(uid.map(|w| w | 0xffff_ffff_0000_0000)));
        // Plain QEMU: NOT_SUPPORTED in x0, the rest untouched (here: the arguments, zero).
        assert!(!is_vmfork_uid([u64::MAX, 0, 0, 0]));
        let mut wrong = uid;
        wrong[3] ^= 1;
        assert!(!is_vmfork_uid(wrong));
    }

    #[test]
    fn fork_returns() {
        assert_eq!(decode_fork(0), Ok(ForkOutcome::Child));
        assert_eq!(decode_fork(7), Ok(ForkOutcome::Parent { child: 7 }));
        assert_eq!(decode_fork(u64::MAX), Err(PsciError::NotSupported));
        assert_eq!(decode_fork(-3i64 as u64), Err(PsciError::Denied));
        assert_eq!(decode_fork(-6i64 as u64), Err(PsciError::InternalFailure));
        assert_eq!(
            decode_fork(VMFORK_BUSY as u64),
            Err(PsciError::Unknown(VMFORK_BUSY))
        );
    }

    #[test]
    fn identity_returns() {
        assert_eq!(
            Identity::decode([1, NO_PARENT, 0, 0]),
            Ok(Identity {
                vm: 1,
                parent: None,
                generation: 0,
                resets: 0,
            })
        );
        let child = Identity::decode([3, 1, 1, 0]).unwrap();
        assert_eq!(child.parent, Some(1));
        assert_eq!(child.to_string(), "vm=3 parent=1 generation=1");
        assert_eq!(
            Identity::decode([u64::MAX, 0, 0, 0]),
            Err(PsciError::NotSupported)
        );
    }

    proptest! {
        /// The fork decoding agrees with the sign of x0 for every value.
        #[test]
        fn fork_decode_follows_the_sign(x0 in any::<u64>()) {
            match decode_fork(x0) {
                Ok(ForkOutcome::Child) => prop_assert_eq!(x0, 0),
                Ok(ForkOutcome::Parent { child }) => {
                    prop_assert_eq!(child, x0);
                    prop_assert!((x0 as i64) > 0);
                }
                Err(_) => prop_assert!((x0 as i64) < 0),
            }
        }
    }
}
