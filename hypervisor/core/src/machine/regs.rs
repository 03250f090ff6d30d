//! A vCPU's register state as plain data: what the world switch loads and stores, what a fork
//! copies and what a dump writes. The arch layer (`hypervisor/monitor/src/arch`) moves these
//! values in and out of the CPU; nothing here touches a register.

use crate::vgic::CpuIfState;

/// PSTATE of a vCPU entering EL1h with D, A, I and F masked (how a CPU comes out of reset and
/// how the exception entry the monitor injects leaves it).
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;

/// A guest vCPU's general-purpose, PC/PSTATE and FP/SIMD state, laid out for the world switch
/// (`arch/entry.rs` takes its offsets from this struct with `offset_of!`).
#[repr(C, align(16))]
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestRegs {
    /// x0 to x30.
    pub x: [u64; 31],
    /// Program counter (loaded into ELR_EL2 to enter, read from it on exit).
    pub pc: u64,
    /// PSTATE as SPSR_EL2 holds it.
    pub pstate: u64,
    /// Keeps `v` 16-byte aligned.
    pub pad: u64,
    /// The 32 128-bit SIMD registers.
    pub v: [u128; 32],
    /// Floating-point control register.
    pub fpcr: u64,
    /// Floating-point status register.
    pub fpsr: u64,
}

/// Defines a struct of 64-bit system registers with one field per register and its names in
/// field order (a dump stores them by position: [`crate::snapshot`] has the same lists).
macro_rules! sysreg_block {
    ($(#[$doc:meta])* $name:ident { $($field:ident => $reg:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct $name {
            $(
                #[doc = concat!("`", $reg, "`")]
                pub $field: u64,
            )*
        }

        impl $name {
            /// The register names (as the assembler spells them), in field order.
            pub const NAMES: &'static [&'static str] = &[$($reg),*];

            /// The values in field order (a dump's encoding).
            pub fn to_array(&self) -> [u64; $name::NAMES.len()] {
                [$(self.$field),*]
            }

            /// The registers from values in field order.
            pub fn from_array(a: &[u64; $name::NAMES.len()]) -> Self {
                let [$($field),*] = *a;
                Self { $($field),* }
            }
        }
    };
}

/// Calls the macro `$m` as `$m! { HEAD { field => "register", ... } }` with every EL1/EL0
/// system register a vCPU owns: the one list the machine model's [`El1Sysregs`] and the arch
/// layer's load/store code (`arch/sysregs.rs`) are both made from.
#[macro_export]
macro_rules! with_el1_sysregs {
    ($m:ident { $($head:tt)* }) => {
        $m! { $($head)* {
            sctlr_el1 => "sctlr_el1",
            actlr_el1 => "actlr_el1",
            cpacr_el1 => "cpacr_el1",
            ttbr0_el1 => "ttbr0_el1",
            ttbr1_el1 => "ttbr1_el1",
            tcr_el1 => "tcr_el1",
            esr_el1 => "esr_el1",
            afsr0_el1 => "afsr0_el1",
            afsr1_el1 => "afsr1_el1",
            far_el1 => "far_el1",
            mair_el1 => "mair_el1",
            amair_el1 => "amair_el1",
            vbar_el1 => "vbar_el1",
            contextidr_el1 => "contextidr_el1",
            cntkctl_el1 => "cntkctl_el1",
            par_el1 => "par_el1",
            mdscr_el1 => "mdscr_el1",
            csselr_el1 => "csselr_el1",
            tpidr_el0 => "tpidr_el0",
            tpidrro_el0 => "tpidrro_el0",
            tpidr_el1 => "tpidr_el1",
            sp_el0 => "sp_el0",
            sp_el1 => "sp_el1",
            elr_el1 => "elr_el1",
            spsr_el1 => "spsr_el1",
            cntv_ctl_el0 => "cntv_ctl_el0",
            cntv_cval_el0 => "cntv_cval_el0",
        } }
    };
}

/// Calls `$m` with the pointer-authentication key registers, as [`with_el1_sysregs`] does.
#[macro_export]
macro_rules! with_pauth_keys {
    ($m:ident { $($head:tt)* }) => {
        $m! { $($head)* {
            apiakeylo_el1 => "S3_0_C2_C1_0",
            apiakeyhi_el1 => "S3_0_C2_C1_1",
            apibkeylo_el1 => "S3_0_C2_C1_2",
            apibkeyhi_el1 => "S3_0_C2_C1_3",
            apdakeylo_el1 => "S3_0_C2_C2_0",
            apdakeyhi_el1 => "S3_0_C2_C2_1",
            apdbkeylo_el1 => "S3_0_C2_C2_2",
            apdbkeyhi_el1 => "S3_0_C2_C2_3",
            apgakeylo_el1 => "S3_0_C2_C3_0",
            apgakeyhi_el1 => "S3_0_C2_C3_1",
        } }
    };
}

with_el1_sysregs!(sysreg_block {
    /// A vCPU's EL1/EL0 system registers (names as in the ARM ARM, lower case).
    El1Sysregs
});

with_pauth_keys!(sysreg_block {
    /// The pointer-authentication keys (FEAT_PAuth), switched only on CPUs that have them:
    /// on others the registers do not exist and touching them is UNDEFINED.
    PauthKeys
});

impl El1Sysregs {
    /// The registers of a vCPU that has just been reset: MMU and caches off, as the Linux boot
    /// protocol and a CPU coming out of reset both expect. SCTLR_EL1 has its RES1 bits set
    /// (bits 11, 20, 22, 23, 28, 29) and EE=0 (little endian).
    pub fn reset() -> Self {
        Self {
            sctlr_el1: (1 << 11) | (1 << 20) | (1 << 22) | (1 << 23) | (1 << 28) | (1 << 29),
            ..Self::default()
        }
    }
}

/// A vCPU's complete register state.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuCtx {
    /// General-purpose, PC/PSTATE and FP/SIMD registers.
    pub regs: GuestRegs,
    /// EL1/EL0 system registers.
    pub sys: El1Sysregs,
    /// Pointer-authentication keys.
    pub pauth: PauthKeys,
    /// GIC virtual CPU interface (list registers are filled from the vGIC at each entry).
    pub cpuif: CpuIfState,
}

impl VcpuCtx {
    /// A vCPU out of reset, about to run at `entry` in EL1h with everything masked.
    pub fn at_reset(entry: u64) -> Self {
        let mut ctx = Self {
            sys: El1Sysregs::reset(),
            ..Self::default()
        };
        ctx.regs.pc = entry;
        ctx.regs.pstate = PSTATE_EL1H_MASKED;
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_lists_match_the_dump_format() {
        assert_eq!(El1Sysregs::NAMES, &crate::snapshot::EL1_SYSREG_NAMES[..]);
        assert_eq!(PauthKeys::NAMES, &crate::snapshot::PAUTH_KEY_NAMES[..]);
    }

    #[test]
    fn arrays_round_trip() {
        let mut s = El1Sysregs::reset();
        s.vbar_el1 = 0x4000_0800;
        s.cntv_cval_el0 = 7;
        assert_eq!(El1Sysregs::from_array(&s.to_array()), s);
        let k = PauthKeys {
            apgakeyhi_el1: 9,
            ..PauthKeys::default()
        };
        assert_eq!(PauthKeys::from_array(&k.to_array()), k);
    }
}
