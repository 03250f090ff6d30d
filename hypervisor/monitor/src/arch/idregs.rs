//! The traps that hide what the monitor does not virtualise from guests: ID registers
//! (HCR_EL2.TID3), debug registers (MDCR_EL2.TDA/TDOSA/TDRA) and the PMU (MDCR_EL2.TPM/TPMCR).
//! The policy (which fields a guest sees, how each debug register reads) is
//! `vmfork_core::idregs`; this file reads the hardware and answers the trapped accesses.

use core::sync::atomic::{AtomicU64, Ordering};

use vmfork_core::esr::SysRegIss;
use vmfork_core::idregs::{self, DebugAccess, ID_SPACE_LEN};

use super::sysregs::El1Sysregs;
use super::vcpu::GuestRegs;

/// HCR_EL2.TID3 (bit 18): EL1 reads of the feature ID registers trap to EL2. OR it into the
/// guest's HCR_EL2.
pub const HCR_EL2_TRAPS: u64 = 1 << 18;

/// MDCR_EL2 bits set while guests run (HPMN is kept as the hardware reset it): TPMCR (5) and
/// TPM (6) trap the PMU, TDA (9) the debug registers, TDOSA (10) the OS lock registers, TDRA
/// (11) MDRAR_EL1, TPMS (14) the statistical profiling unit, TTRF (19) the trace filter. E2PB
/// and E2TB stay 0: the profiling and trace buffers belong to EL2 and EL1 accesses trap.
const MDCR_EL2_TRAPS: u64 =
    (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 14) | (1 << 19);

/// The guest's view of the ID space, sanitised once from CPU 0's registers (QEMU's CPUs are
/// identical; a real big.LITTLE machine would want the intersection).
static GUEST_ID: [AtomicU64; ID_SPACE_LEN] = [const { AtomicU64::new(0) }; ID_SPACE_LEN];

/// Reads the 56 registers `S3_0_C0_C<1..7>_<0..7>`. Unallocated encodings in this space are
/// RAZ (ARM ARM D23.3.1), so every one of them can be read at EL2.
macro_rules! read_id_space {
    ($($crm:literal),*) => {{
        let mut v = [0u64; ID_SPACE_LEN];
        $(
            read_id_space!(@row v, $crm, 0, 1, 2, 3, 4, 5, 6, 7);
        )*
        v
    }};
    (@row $v:ident, $crm:literal, $($op2:literal),*) => {
        $(
            // SAFETY: reading an ID register at EL2 has no side effect.
            unsafe {
                core::arch::asm!(
                    concat!("mrs {0}, S3_0_C0_C", $crm, "_", $op2),
                    out(reg) $v[($crm - 1) * 8 + $op2],
                    options(nomem, nostack, preserves_flags)
                )
            };
        )*
    };
}

/// Per-CPU setup: MDCR_EL2's traps on every CPU; on CPU 0 also the guests' ID register values.
pub fn init_cpu(cpu: usize) {
    if cpu == 0 {
        let hw = read_id_space!(1, 2, 3, 4, 5, 6, 7);
        for (i, v) in hw.iter().enumerate() {
            GUEST_ID[i].store(idregs::sanitise(i, *v), Ordering::Relaxed);
        }
        log::debug!(
            "idregs: guests see ID_AA64PFR0 {:#x} (hw {:#x}), ID_AA64PFR1 {:#x} (hw {:#x}), ID_AA64DFR0 {:#x} (hw {:#x})",
            GUEST_ID[idregs::ID_AA64PFR0_EL1].load(Ordering::Relaxed),
            hw[idregs::ID_AA64PFR0_EL1],
            GUEST_ID[idregs::ID_AA64PFR1_EL1].load(Ordering::Relaxed),
            hw[idregs::ID_AA64PFR1_EL1],
            GUEST_ID[idregs::ID_AA64DFR0_EL1].load(Ordering::Relaxed),
            hw[idregs::ID_AA64DFR0_EL1],
        );
    }
    let mut mdcr: u64;
    // SAFETY: MDCR_EL2 only controls which EL1/EL0 debug, PMU and trace accesses trap to EL2;
    // HPMN [4:0] is kept. The monitor at EL2 is not affected by any of these bits.
    unsafe {
        core::arch::asm!("mrs {0}, mdcr_el2", out(reg) mdcr, options(nomem, nostack));
        mdcr = (mdcr & 0x1f) | MDCR_EL2_TRAPS;
        core::arch::asm!("msr mdcr_el2, {0}", "isb", in(reg) mdcr, options(nostack));
    }
}

/// Emulates a trapped MRS/MSR of an ID or debug register: does the access, steps the PC over
/// it and returns true; returns false for any other register (the caller decides).
pub fn emulate(iss: &SysRegIss, regs: &mut GuestRegs, sys: &mut El1Sysregs) -> bool {
    let rt = usize::from(iss.rt);
    let written = if rt == 31 { 0 } else { regs.x[rt] };
    let read = if let Some(i) = idregs::id_index(iss.op0, iss.op1, iss.crn, iss.crm, iss.op2) {
        // Writes to ID registers are UNDEFINED: leave them to the caller.
        if !iss.read {
            return false;
        }
        GUEST_ID[i].load(Ordering::Relaxed)
    } else {
        match idregs::debug_access(iss.op0, iss.op1, iss.crn, iss.crm, iss.op2) {
            Some(DebugAccess::Mdscr) => {
                if !iss.read {
                    sys.mdscr_el1 = written;
                }
                sys.mdscr_el1
            }
            Some(DebugAccess::OsLockStatus) => idregs::OSLSR_UNLOCKED,
            Some(DebugAccess::RazWi) => 0,
            None => return false,
        }
    };
    if iss.read && rt != 31 {
        regs.x[rt] = read;
    }
    regs.pc += 4;
    true
}
