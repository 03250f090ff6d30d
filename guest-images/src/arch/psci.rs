//! PSCI calls through the conduit the DTB names (`hvc` on plain QEMU at EL1, `smc` elsewhere),
//! and a generic SMCCC call for other services (e.g. the monitor's own hypercalls).

use crate::psci_abi::{self, Conduit, PsciError};
use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

const NONE: u8 = 0;
const HVC: u8 = 1;
const SMC: u8 = 2;

static CONDUIT: AtomicU8 = AtomicU8::new(NONE);

/// Records the conduit read from the DTB (`None`: no `/psci` node).
pub fn set_conduit(conduit: Option<Conduit>) {
    let v = match conduit {
        None => NONE,
        Some(Conduit::Hvc) => HVC,
        Some(Conduit::Smc) => SMC,
    };
    CONDUIT.store(v, Ordering::Release);
}

/// The conduit in use, if the DTB named one.
pub fn conduit() -> Option<Conduit> {
    match CONDUIT.load(Ordering::Acquire) {
        HVC => Some(Conduit::Hvc),
        SMC => Some(Conduit::Smc),
        _ => None,
    }
}

/// Makes an SMC Calling Convention call with function ID `fid` and arguments x1-x6 through
/// `conduit`; returns x0-x3.
pub fn smccc_call(conduit: Conduit, fid: u32, args: [u64; 6]) -> [u64; 4] {
    let (mut r0, mut r1, mut r2, mut r3) = (u64::from(fid), args[0], args[1], args[2]);
    match conduit {
        // SAFETY: an SMCCC call only changes registers (x0-x17 may be clobbered by SMCCC v1.0
        // implementations, covered by clobber_abi("C")) and state the callee owns; arguments
        // that are addresses are the caller's responsibility.
        Conduit::Hvc => unsafe {
            asm!("hvc #0", inout("x0") r0, inout("x1") r1, inout("x2") r2, inout("x3") r3,
                 in("x4") args[3], in("x5") args[4], in("x6") args[5], clobber_abi("C"),
                 options(nostack));
        },
        // SAFETY: as for HVC above.
        Conduit::Smc => unsafe {
            asm!("smc #0", inout("x0") r0, inout("x1") r1, inout("x2") r2, inout("x3") r3,
                 in("x4") args[3], in("x5") args[4], in("x6") args[5], clobber_abi("C"),
                 options(nostack));
        },
    }
    [r0, r1, r2, r3]
}

fn call(fid: u32, a1: u64, a2: u64, a3: u64) -> Result<u64, PsciError> {
    let conduit = conduit().ok_or(PsciError::NoConduit)?;
    PsciError::check(smccc_call(conduit, fid, [a1, a2, a3, 0, 0, 0])[0])
}

/// `PSCI_VERSION`: (major, minor).
pub fn version() -> Result<(u16, u16), PsciError> {
    let v = call(psci_abi::PSCI_VERSION, 0, 0, 0)?;
    Ok(((v >> 16) as u16, v as u16))
}

/// `CPU_ON`: starts the CPU with MPIDR `target` at physical address `entry`, x0 = `context_id`.
pub fn cpu_on(target: u64, entry: u64, context_id: u64) -> Result<(), PsciError> {
    call(psci_abi::CPU_ON_64, target, entry, context_id).map(|_| ())
}

/// `CPU_OFF`: powers the calling CPU off. Returns only on failure.
pub fn cpu_off() -> PsciError {
    match call(psci_abi::CPU_OFF, 0, 0, 0) {
        Err(e) => e,
        Ok(v) => PsciError::Unknown(v as i64),
    }
}

/// `AFFINITY_INFO` for one CPU: 0 = ON, 1 = OFF, 2 = ON_PENDING.
pub fn affinity_info(target: u64) -> Result<u64, PsciError> {
    call(psci_abi::AFFINITY_INFO_64, target, 0, 0)
}

/// `SYSTEM_OFF`. Returns only on failure.
pub fn system_off() -> PsciError {
    match call(psci_abi::SYSTEM_OFF, 0, 0, 0) {
        Err(e) => e,
        Ok(v) => PsciError::Unknown(v as i64),
    }
}
