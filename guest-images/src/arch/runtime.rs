//! What the guest runs under, and vmfork's own hypercalls.
//!
//! At boot, once the PSCI conduit is known, the runtime asks the SMCCC Vendor Specific
//! Hypervisor Service for its Call UID ([`VENDOR_HYP_CALL_UID`]). The vmfork monitor answers
//! with [`VMFORK_UID`](crate::vmfork_abi::VMFORK_UID); plain QEMU answers `NOT_SUPPORTED`. The
//! answer decides how a failing guest stops ([`exit::fail`](super::exit::fail)): semihosting on
//! plain QEMU, PSCI `SYSTEM_OFF` under the monitor (QEMU itself takes a semihosting `HLT` even
//! from a guest at EL1, so it would end every VM of the machine). Nothing is printed.

use super::psci;
use crate::psci_abi::PsciError;
use crate::vmfork_abi::{
    decode_fork, is_vmfork_uid, ForkOutcome, Identity, VENDOR_HYP_CALL_UID, VMFORK_FORK,
    VMFORK_IDENTITY, VMFORK_RESET,
};
use core::sync::atomic::{AtomicBool, Ordering};

static UNDER_VMFORK: AtomicBool = AtomicBool::new(false);

/// Asks the hypervisor for its Call UID and records whether it is the vmfork monitor. Called
/// by the boot code on the boot CPU after the conduit is set; without a conduit (no `/psci` in
/// the DTB) the answer is "no".
pub fn detect() -> bool {
    let found = psci::conduit().is_some_and(|conduit| {
        is_vmfork_uid(psci::smccc_call(conduit, VENDOR_HYP_CALL_UID, [0; 6]))
    });
    UNDER_VMFORK.store(found, Ordering::Release);
    found
}

/// Whether the guest runs under the vmfork EL2 monitor (as detected at boot).
pub fn under_vmfork() -> bool {
    UNDER_VMFORK.load(Ordering::Acquire)
}

/// Makes one of vmfork's calls, refusing (`NOT_SUPPORTED`) when the hypervisor is not vmfork:
/// another hypervisor may give the same function ID another meaning.
fn vmfork_call(fid: u32) -> Result<[u64; 4], PsciError> {
    if !under_vmfork() {
        return Err(PsciError::NotSupported);
    }
    let conduit = psci::conduit().ok_or(PsciError::NoConduit)?;
    Ok(psci::smccc_call(conduit, fid, [0; 6]))
}

/// `VMFORK_FORK`: forks this VM. The monitor stops every vCPU where it is, copies the VM, and
/// returns [`ForkOutcome::Parent`] here in the original and [`ForkOutcome::Child`] in the copy;
/// the other vCPUs just continue in both. `NOT_SUPPORTED` when not under vmfork.
pub fn fork() -> Result<ForkOutcome, PsciError> {
    decode_fork(vmfork_call(VMFORK_FORK)?[0])
}

/// `VMFORK_IDENTITY`: this VM's ID, parent and fork generation. `NOT_SUPPORTED` when not under
/// vmfork.
pub fn identity() -> Result<Identity, PsciError> {
    Identity::decode(vmfork_call(VMFORK_IDENTITY)?)
}

/// `VMFORK_RESET`: puts this fork back to its fork point; on success it does not return here
/// (execution resumes as the child's return from [`fork`]). `DENIED` when this VM is not a fork,
/// `NOT_SUPPORTED` when not under vmfork.
pub fn reset() -> PsciError {
    match vmfork_call(VMFORK_RESET) {
        Ok(regs) => match PsciError::check(regs[0]) {
            Err(e) => e,
            Ok(_) => PsciError::Unknown(regs[0] as i64),
        },
        Err(e) => e,
    }
}

/// True when the SMCCC conduit is HVC, false for SMC, `None` without one.
pub fn conduit_is_hvc() -> Option<bool> {
    psci::conduit().map(|c| matches!(c, crate::psci_abi::Conduit::Hvc))
}
