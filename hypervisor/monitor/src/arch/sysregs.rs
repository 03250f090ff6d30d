//! The EL1 (and EL0) system registers a guest owns, saved and restored around a run.
//!
//! The monitor runs at EL2 and never uses these registers itself, so they hold the guest's
//! values while it runs and are stored back into an [`El1Sysregs`] when another vCPU needs the
//! CPU. Everything a guest can change is here, so a fork copies a complete vCPU. The register
//! blocks themselves are plain data in the machine model (`vmfork_core::machine::regs`).

pub use vmfork_core::machine::{El1Sysregs, PauthKeys};

/// Defines the functions that move a block of system registers (a struct of the machine model,
/// `vmfork_core::machine::regs`) into and out of the CPU, one `msr`/`mrs` per field, and checks
/// at compile time that the register names agree with the model's list.
macro_rules! sysreg_switch {
    ($(#[$doc:meta])* $ty:ident, $load:ident, $store:ident { $($field:ident => $reg:literal),* $(,)? }) => {
        $(#[$doc])*
        ///
        /// Writes every register of `r` into the CPU.
        ///
        /// # Safety
        /// Only while this CPU runs this vCPU: the values become the EL1 context the next
        /// `eret` to EL1 runs with.
        pub unsafe fn $load(r: &$ty) {
            $(
                // SAFETY: writing an EL1 register at EL2 only changes the context of the
                // guest about to run (the caller's contract); the monitor does not use it.
                unsafe { core::arch::asm!(concat!("msr ", $reg, ", {0}"), in(reg) r.$field, options(nostack, preserves_flags)) };
            )*
            // Context synchronization so the writes are in effect before the ERET
            // (ARM ARM: direct writes to system registers need an ISB to be observed).
            aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
        }

        /// Reads every register of the block from the CPU into `r`.
        pub fn $store(r: &mut $ty) {
            $(
                // SAFETY: reading an EL1 system register at EL2 has no side effect.
                unsafe { core::arch::asm!(concat!("mrs {0}, ", $reg), out(reg) r.$field, options(nostack, preserves_flags)) };
            )*
        }

    };
}

vmfork_core::with_el1_sysregs!(sysreg_switch {
    /// The EL1/EL0 system registers of a vCPU.
    El1Sysregs,
    load_el1,
    store_el1
});

vmfork_core::with_pauth_keys!(sysreg_switch {
    /// The pointer-authentication keys (FEAT_PAuth), switched only on CPUs that have them
    /// ([`has_pauth`]): on others the registers do not exist and touching them is UNDEFINED.
    PauthKeys,
    load_pauth,
    store_pauth
});

/// True when the CPU implements pointer authentication (any of ID_AA64ISAR1_EL1.{APA, API,
/// GPA, GPI} or ID_AA64ISAR2_EL1.{APA3, GPA3} non-zero), so the key registers exist.
pub fn has_pauth() -> bool {
    let isar1: u64;
    let isar2: u64;
    // SAFETY: reading ID registers has no side effect. ID_AA64ISAR2_EL1 is written by its
    // encoding (S3_0_C0_C6_2), which reads as zero on CPUs that predate it.
    unsafe {
        core::arch::asm!("mrs {0}, id_aa64isar1_el1", out(reg) isar1, options(nostack));
        core::arch::asm!("mrs {0}, S3_0_C0_C6_2", out(reg) isar2, options(nostack));
    }
    let field = |v: u64, shift: u32| (v >> shift) & 0xf;
    field(isar1, 4) != 0       // APA
        || field(isar1, 8) != 0 // API
        || field(isar1, 24) != 0 // GPA
        || field(isar1, 28) != 0 // GPI
        || field(isar2, 12) != 0 // APA3
        || field(isar2, 8) != 0 // GPA3
}

/// True when two lists of register names are equal (usable in constants).
const fn same_names(a: &[&str], b: &[&str]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        let (x, y) = (a[i].as_bytes(), b[i].as_bytes());
        if x.len() != y.len() {
            return false;
        }
        let mut j = 0;
        while j < x.len() {
            if x[j] != y[j] {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

// A snapshot stores these registers by position (vmfork_core::snapshot): the lists must agree.
const _: () = assert!(same_names(
    El1Sysregs::NAMES,
    &vmfork_core::snapshot::EL1_SYSREG_NAMES
));
const _: () = assert!(same_names(
    PauthKeys::NAMES,
    &vmfork_core::snapshot::PAUTH_KEY_NAMES
));

// EL2 controls the scheduler writes around every guest run, through aarch64-cpu's typed
// registers like the rest of arch/. Each write that later instructions depend on is followed by
// an ISB (ARM ARM D19.2: a direct write to a system register is only guaranteed to be seen by
// instructions after a context synchronization event; the ERET into the guest is one too).

/// Writes HCR_EL2 (how EL1 and EL0 run: stage 2 on or off, traps, interrupt routing).
pub fn set_hcr_el2(v: u64) {
    use aarch64_cpu::registers::{Writeable, HCR_EL2};
    HCR_EL2.set(v);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// Writes VTTBR_EL2: the stage-2 tables and VMID the next guest run uses.
pub fn set_vttbr_el2(v: u64) {
    use aarch64_cpu::registers::{Writeable, VTTBR_EL2};
    VTTBR_EL2.set(v);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// Writes VMPIDR_EL2, what the guest reads as MPIDR_EL1 (in effect from the next ERET).
pub fn set_vmpidr_el2(v: u64) {
    use aarch64_cpu::registers::{Writeable, VMPIDR_EL2};
    VMPIDR_EL2.set(v);
}

/// Writes VTCR_EL2: the stage-2 translation regime every VM uses.
pub fn set_vtcr_el2(v: u64) {
    use aarch64_cpu::registers::{Writeable, VTCR_EL2};
    VTCR_EL2.set(v);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// Disables the EL1 virtual timer of the guest context just saved, so it cannot fire while
/// another vCPU or the monitor runs.
pub fn stop_guest_vtimer() {
    use aarch64_cpu::registers::{Writeable, CNTV_CTL_EL0};
    CNTV_CTL_EL0.set(0);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// ID_AA64MMFR0_EL1 and ID_AA64MMFR1_EL1: physical address size, VMID width, ...
pub fn mmfr0_mmfr1() -> (u64, u64) {
    use aarch64_cpu::registers::{Readable, ID_AA64MMFR0_EL1, ID_AA64MMFR1_EL1};
    (ID_AA64MMFR0_EL1.get(), ID_AA64MMFR1_EL1.get())
}
