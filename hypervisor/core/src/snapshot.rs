//! The vCPU and device state inside a snapshot (the `state` field of the `vmfork_proto::snapshot`
//! container), and the checks a restore makes before it trusts any of it.
//!
//! A snapshot file is hostile input: whoever can hand the monitor a file must not be able to
//! run code at EL2, crash the monitor, pin memory forever or exhaust its heap. So a restore
//! (`hypervisor/monitor/src/snapshot.rs`) first checks the container (CRC, header, page runs:
//! `vmfork_proto`), then everything here, and only then allocates a VMID or a frame:
//!
//! 1. [`check_header`]: guest RAM at [`layout::RAM_BASE`], a multiple of 2 MiB up to
//!    [`MAX_GUEST_MEM`], and no more frames than the machine has free
//!    ([`frames_needed`]); 1 to [`layout::MAX_VCPUS`] vCPUs; a name and a command line of
//!    bounded length without control characters.
//! 2. [`SavedVm::decode`]: at most [`MAX_STATE_BYTES`] of postcard, every `Vec` inside bounded as
//!    it is read (`crate::bounded`), no trailing bytes.
//! 3. [`SavedVm::validate`]: per vCPU, the PSTATE the monitor will `eret` to ([`check_pstate`]:
//!    AArch64 EL0t, EL1t or EL1h, IL clear, no RES0 bit), the scheduling state
//!    ([`check_vcpu_state`]: never `Running`), the MPIDR ([`check_mpidrs`]: the value this
//!    monitor gives that vCPU, which the guest's device tree names), no list-register contents;
//!    the vGIC ([`Vgic::validate`], and the shape every VM of this monitor has) and the PL011
//!    ([`Vuart::validate`]).
//!
//! The other registers a snapshot carries (x0-x30, PC, SIMD/FP, the EL1 system registers, the
//! pointer-authentication keys) are values a guest can set itself at EL1 (MDSCR_EL1, the one
//! the monitor traps, it stores as written): any value is accepted, as from the guest itself.
//! The virtual counter and the fork generation are plain numbers.

use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::guest_dtb::layout;
use crate::guest_spec::{MAX_CMDLINE_LEN, MAX_GUEST_MEM};
use crate::vgic::{CpuIfState, Vgic, VgicError, AFFINITY_MASK, DEFAULT_NR_IRQS};
use crate::vuart::Vuart;

/// Largest encoded state: a VM of [`layout::MAX_VCPUS`] vCPUs takes about 30 KiB.
pub const MAX_STATE_BYTES: usize = 1 << 20;
/// Longest VM name in a snapshot.
pub const MAX_NAME_BYTES: usize = 64;
/// Guest RAM granule.
pub const MEM_ALIGN: u64 = 2 << 20;
/// Guest page size.
const PAGE: u64 = 4096;

/// The EL1/EL0 system registers of [`SavedCtx::sys`], in order (the monitor's `El1Sysregs`
/// checks at compile time that it saves the same registers in the same order).
pub const EL1_SYSREG_NAMES: [&str; 27] = [
    "sctlr_el1",
    "actlr_el1",
    "cpacr_el1",
    "ttbr0_el1",
    "ttbr1_el1",
    "tcr_el1",
    "esr_el1",
    "afsr0_el1",
    "afsr1_el1",
    "far_el1",
    "mair_el1",
    "amair_el1",
    "vbar_el1",
    "contextidr_el1",
    "cntkctl_el1",
    "par_el1",
    "mdscr_el1",
    "csselr_el1",
    "tpidr_el0",
    "tpidrro_el0",
    "tpidr_el1",
    "sp_el0",
    "sp_el1",
    "elr_el1",
    "spsr_el1",
    "cntv_ctl_el0",
    "cntv_cval_el0",
];

/// The pointer-authentication key registers of [`SavedCtx::pauth`], in order (APIAKeyLo_EL1
/// ... APGAKeyHi_EL1, by encoding as the monitor accesses them).
pub const PAUTH_KEY_NAMES: [&str; 10] = [
    "S3_0_C2_C1_0",
    "S3_0_C2_C1_1",
    "S3_0_C2_C1_2",
    "S3_0_C2_C1_3",
    "S3_0_C2_C2_0",
    "S3_0_C2_C2_1",
    "S3_0_C2_C2_2",
    "S3_0_C2_C2_3",
    "S3_0_C2_C3_0",
    "S3_0_C2_C3_1",
];

/// A vCPU's general-purpose, PC/PSTATE and SIMD/FP registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRegs {
    /// x0 to x30.
    pub x: [u64; 31],
    /// Program counter (ELR_EL2 on entry).
    pub pc: u64,
    /// PSTATE in the SPSR_EL2 layout: what the monitor `eret`s to. See [`check_pstate`].
    pub pstate: u64,
    /// Always 0 (padding of the monitor's register block).
    pub reserved: u64,
    /// V0 to V31.
    pub v: [u128; 32],
    /// FPCR.
    pub fpcr: u64,
    /// FPSR.
    pub fpsr: u64,
}

/// A vCPU's complete register state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCtx {
    /// General-purpose, PC/PSTATE and SIMD/FP registers.
    pub regs: SavedRegs,
    /// The EL1/EL0 system registers named by [`EL1_SYSREG_NAMES`].
    pub sys: [u64; 27],
    /// The pointer-authentication keys named by [`PAUTH_KEY_NAMES`].
    pub pauth: [u64; 10],
    /// The GIC virtual CPU interface as the monitor last read it. Only a cache of the vGIC
    /// (which the monitor refills before every entry): a dump stores it empty and a restore
    /// refuses anything else.
    pub cpuif: CpuIfState,
}

/// A vCPU's scheduling state in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedVcpuState {
    /// Powered off (PSCI CPU_OFF, or never started).
    Off,
    /// Ready to run.
    Runnable,
    /// Running on a physical CPU. Never valid in a snapshot (a dump records a running vCPU as
    /// `Runnable`): a restored vCPU marked running would never be scheduled, and its VM could
    /// never be torn down (teardown waits for every running vCPU to come back), pinning its
    /// RAM for good. A restore refuses it.
    Running(u64),
    /// In WFI.
    Waiting,
}

/// One vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVcpu {
    /// Its registers.
    pub ctx: SavedCtx,
    /// Its scheduling state.
    pub state: SavedVcpuState,
    /// MPIDR affinity (VMPIDR_EL2 without the RES1 bit 31).
    pub mpidr: u64,
}

/// Everything in a snapshot but memory and the header.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedVm {
    /// The vCPUs, by index.
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_SAVED_VCPUS>")]
    pub vcpus: Vec<SavedVcpu>,
    /// The GICv3 model.
    pub vgic: Vgic,
    /// The PL011 model.
    pub uart: Vuart,
    /// The guest's virtual counter when the snapshot was taken; a restored VM's clock goes on
    /// from there.
    pub virtual_count: u64,
    /// Fork generation.
    pub generation: u64,
}

const MAX_SAVED_VCPUS: usize = layout::MAX_VCPUS as usize;

/// Why a snapshot's header or state cannot be restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateError {
    /// Guest RAM is not where this monitor puts it.
    RamBase(u64),
    /// Guest RAM size is 0, not a multiple of 2 MiB, or above [`MAX_GUEST_MEM`].
    MemSize(u64),
    /// The machine has fewer free frames than the VM needs.
    NotEnoughMemory {
        /// Frames the VM needs (RAM and stage-2 tables).
        needed: u64,
        /// Frames free now.
        free: u64,
    },
    /// The header's vCPU count is 0 or above [`layout::MAX_VCPUS`].
    VcpuCount(u32),
    /// The name is too long or holds control characters.
    Name,
    /// The command line is too long or holds control characters.
    Cmdline,
    /// The encoded state is larger than [`MAX_STATE_BYTES`].
    StateSize(usize),
    /// The state does not decode.
    Decode(postcard::Error),
    /// Bytes are left after the state.
    TrailingBytes(usize),
    /// The state has another number of vCPUs than the header.
    StateVcpus {
        /// vCPUs in the state.
        state: usize,
        /// vCPUs in the header.
        header: u32,
    },
    /// A vCPU's PSTATE would not return to AArch64 EL0 or EL1 in a legal state.
    Pstate {
        /// vCPU index.
        vcpu: usize,
        /// The PSTATE.
        value: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A vCPU's register block has its reserved word set.
    Reserved(usize),
    /// A vCPU is recorded as running.
    Running {
        /// vCPU index.
        vcpu: usize,
        /// The physical CPU it claims to run on.
        cpu: u64,
    },
    /// A vCPU carries list-register contents.
    CpuIf(usize),
    /// A vCPU's MPIDR is not the one this monitor gives it.
    Mpidr {
        /// vCPU index.
        vcpu: usize,
        /// The MPIDR.
        value: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The vGIC state breaks an invariant of the model.
    Vgic(VgicError),
    /// The vGIC does not have the shape of this monitor's VMs.
    VgicShape(&'static str),
    /// The PL011 state breaks an invariant of the model.
    Uart(&'static str),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RamBase(b) => write!(f, "guest RAM at {b:#x}, expected {:#x}", layout::RAM_BASE),
            Self::MemSize(m) => write!(
                f,
                "guest RAM of {m} bytes: must be a multiple of 2 MiB from 2 MiB to {} GiB",
                MAX_GUEST_MEM >> 30
            ),
            Self::NotEnoughMemory { needed, free } => write!(
                f,
                "not enough memory: the VM needs {needed} frames, {free} are free"
            ),
            Self::VcpuCount(n) => write!(f, "{n} vCPUs: must be 1 to {}", layout::MAX_VCPUS),
            Self::Name => write!(
                f,
                "VM name longer than {MAX_NAME_BYTES} bytes or with control characters"
            ),
            Self::Cmdline => write!(
                f,
                "command line longer than {MAX_CMDLINE_LEN} bytes or with control characters"
            ),
            Self::StateSize(n) => write!(
                f,
                "vCPU and device state of {n} bytes: at most {MAX_STATE_BYTES}"
            ),
            Self::Decode(e) => write!(f, "vCPU and device state does not decode: {e}"),
            Self::TrailingBytes(n) => {
                write!(f, "{n} bytes after the vCPU and device state")
            }
            Self::StateVcpus { state, header } => {
                write!(f, "the state has {state} vCPUs, the header {header}")
            }
            Self::Pstate { vcpu, value, why } => {
                write!(f, "vCPU {vcpu}: PSTATE {value:#x} refused: {why}")
            }
            Self::Reserved(v) => write!(f, "vCPU {v}: reserved register word is not 0"),
            Self::Running { vcpu, cpu } => write!(
                f,
                "vCPU {vcpu} is recorded as running on CPU {cpu}: a snapshot's vCPUs must be \
                 off, runnable or waiting"
            ),
            Self::CpuIf(v) => write!(
                f,
                "vCPU {v}: the snapshot carries list-register contents (must be empty)"
            ),
            Self::Mpidr { vcpu, value, why } => {
                write!(f, "vCPU {vcpu}: MPIDR {value:#x} refused: {why}")
            }
            Self::Vgic(e) => write!(f, "{e}"),
            Self::VgicShape(why) => write!(f, "invalid vGIC state: {why}"),
            Self::Uart(why) => write!(f, "invalid PL011 state: {why}"),
        }
    }
}

/// PSTATE fields a snapshot may hold (SPSR_EL2 layout for an exception taken from AArch64,
/// ARM ARM C5.2.19): N, Z, C, V (31:28), TCO (25), DIT (24), UAO (23), PAN (22), SS (21),
/// ALLINT (13), SSBS (12), BTYPE (11:10), D, A, I, F (9:6) and M[4:0]. IL (20) and M are
/// checked on their own; everything else is RES0 or belongs to a feature the monitor does not
/// give guests (PM, PPEND, EXLOCK, PACM, UINJ in 36:32).
pub const PSTATE_ALLOWED: u64 = 0xf3e0_3fdf;
/// PSTATE.IL, the illegal execution state bit.
pub const PSTATE_IL: u64 = 1 << 20;
/// PSTATE.M[4]: set for AArch32.
pub const PSTATE_NRW: u64 = 1 << 4;
/// PSTATE.M[3:0] values a guest vCPU may be in: EL0t, EL1t, EL1h.
pub const PSTATE_GUEST_MODES: [u64; 3] = [0b0000, 0b0100, 0b0101];

/// Checks a PSTATE the monitor will load into SPSR_EL2 and `eret` to: it must return to
/// AArch64 EL0t, EL1t or EL1h (an EL2 mode would run the guest's code at EL2), with IL clear
/// and no RES0 or unsupported bit set.
pub fn check_pstate(pstate: u64) -> Result<(), &'static str> {
    if pstate & PSTATE_IL != 0 {
        return Err("PSTATE.IL (illegal execution state) is set");
    }
    if pstate & PSTATE_NRW != 0 {
        return Err("AArch32 state (M[4] set)");
    }
    let mode = pstate & 0xf;
    if !PSTATE_GUEST_MODES.contains(&mode) {
        return Err(match mode >> 2 {
            2 => "the mode is EL2",
            3 => "the mode is EL3",
            _ => "reserved mode",
        });
    }
    if pstate & !PSTATE_ALLOWED != 0 {
        return Err("RES0 or unsupported bits are set");
    }
    Ok(())
}

/// Checks a vCPU's scheduling state: `Off`, `Runnable` or `Waiting` (see
/// [`SavedVcpuState::Running`] for why `Running` is refused rather than mapped).
pub fn check_vcpu_state(vcpu: usize, state: SavedVcpuState) -> Result<(), StateError> {
    match state {
        SavedVcpuState::Running(cpu) => Err(StateError::Running { vcpu, cpu }),
        SavedVcpuState::Off | SavedVcpuState::Runnable | SavedVcpuState::Waiting => Ok(()),
    }
}

/// Checks the vCPUs' MPIDRs: affinity fields only (no U, MT, RES1 bit 31 or RES0 bit), all
/// different, and each the value this monitor gives that vCPU index
/// ([`layout::vcpu_mpidr_affinity`]): the `reg` of its `cpu@` node in the guest's device tree
/// (Aff1 and Aff0 only), which PSCI CPU_ON targets.
pub fn check_mpidrs(mpidrs: &[u64]) -> Result<(), StateError> {
    for (vcpu, &value) in mpidrs.iter().enumerate() {
        let err = |why| Err(StateError::Mpidr { vcpu, value, why });
        if value & !AFFINITY_MASK != 0 {
            return err("bits other than the affinity fields are set (bit 31, U, MT or RES0)");
        }
        if value >> 16 != 0 {
            return err("Aff2 or Aff3 set: the guest's device tree names Aff1 and Aff0 only");
        }
        if mpidrs[..vcpu].contains(&value) {
            return err("two vCPUs share it");
        }
        if value != layout::vcpu_mpidr_affinity(vcpu as u32) {
            return err("not the affinity this monitor and the guest's device tree give the vCPU");
        }
    }
    Ok(())
}

/// Frames a VM with `mem_bytes` of RAM takes: its pages, the stage-2 tables over them (a level-3
/// table per 2 MiB, a level-2 table per GiB, the root) and the `vmgenid` page with its tables.
pub fn frames_needed(mem_bytes: u64) -> u64 {
    let pages = mem_bytes / PAGE;
    pages + pages.div_ceil(512) + pages.div_ceil(512 * 512) + 1 + 3
}

fn has_control_chars(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Checks a snapshot header before anything is decoded or allocated: RAM base and size (and that
/// `free_frames` cover it), vCPU count, name and command line.
pub fn check_header(
    vcpus: u32,
    mem_bytes: u64,
    ram_base: u64,
    name: &str,
    cmdline: &str,
    free_frames: u64,
) -> Result<(), StateError> {
    if ram_base != layout::RAM_BASE {
        return Err(StateError::RamBase(ram_base));
    }
    if mem_bytes == 0 || !mem_bytes.is_multiple_of(MEM_ALIGN) || mem_bytes > MAX_GUEST_MEM {
        return Err(StateError::MemSize(mem_bytes));
    }
    let needed = frames_needed(mem_bytes);
    if needed > free_frames {
        return Err(StateError::NotEnoughMemory {
            needed,
            free: free_frames,
        });
    }
    if vcpus == 0 || vcpus > layout::MAX_VCPUS {
        return Err(StateError::VcpuCount(vcpus));
    }
    if name.len() > MAX_NAME_BYTES || has_control_chars(name) {
        return Err(StateError::Name);
    }
    if cmdline.len() > MAX_CMDLINE_LEN || has_control_chars(cmdline) {
        return Err(StateError::Cmdline);
    }
    Ok(())
}

impl SavedVm {
    /// The state of a VM of `vcpus` vCPUs (1 to [`layout::MAX_VCPUS`]) as the monitor creates
    /// it: vCPU 0 runnable at EL1h with interrupts masked, the others off, a vGIC and a PL011
    /// in their reset states. A valid starting point for tests and fuzzers.
    pub fn reset_state(vcpus: u32) -> Self {
        let n = vcpus.clamp(1, layout::MAX_VCPUS);
        let vgic = Vgic::new(&crate::vgic::VgicConfig::qemu_virt(n as usize))
            .unwrap_or_else(|_| unreachable!("1..=8 vCPUs with the default INTIDs are valid"));
        let vcpus = (0..n)
            .map(|i| SavedVcpu {
                ctx: SavedCtx {
                    regs: SavedRegs {
                        pstate: 0x3c5,
                        ..SavedRegs::default()
                    },
                    ..SavedCtx::default()
                },
                state: if i == 0 {
                    SavedVcpuState::Runnable
                } else {
                    SavedVcpuState::Off
                },
                mpidr: layout::vcpu_mpidr_affinity(i),
            })
            .collect();
        Self {
            vcpus,
            vgic,
            uart: Vuart::new(),
            virtual_count: 0,
            generation: 0,
        }
    }

    /// Encodes the state (postcard).
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(self)
    }

    /// Decodes a state of at most [`MAX_STATE_BYTES`], refusing trailing bytes. Decoding only
    /// checks the shape; [`SavedVm::validate`] checks the values.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() > MAX_STATE_BYTES {
            return Err(StateError::StateSize(bytes.len()));
        }
        let (vm, rest) = postcard::take_from_bytes::<SavedVm>(bytes).map_err(StateError::Decode)?;
        if !rest.is_empty() {
            return Err(StateError::TrailingBytes(rest.len()));
        }
        Ok(vm)
    }

    /// Checks every value against what the monitor relies on (see the module docs), for a VM
    /// whose header says `header_vcpus` vCPUs.
    pub fn validate(&self, header_vcpus: u32) -> Result<(), StateError> {
        let n = self.vcpus.len();
        if n == 0 || n != header_vcpus as usize || n > layout::MAX_VCPUS as usize {
            return Err(StateError::StateVcpus {
                state: n,
                header: header_vcpus,
            });
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            let pstate = v.ctx.regs.pstate;
            check_pstate(pstate).map_err(|why| StateError::Pstate {
                vcpu: i,
                value: pstate,
                why,
            })?;
            if v.ctx.regs.reserved != 0 {
                return Err(StateError::Reserved(i));
            }
            check_vcpu_state(i, v.state)?;
            if v.ctx.cpuif != CpuIfState::default() {
                return Err(StateError::CpuIf(i));
            }
        }
        let mpidrs: Vec<u64> = self.vcpus.iter().map(|v| v.mpidr).collect();
        check_mpidrs(&mpidrs)?;
        self.vgic.validate().map_err(StateError::Vgic)?;
        if self.vgic.nr_vcpus() != n {
            return Err(StateError::VgicShape(
                "its vCPU count differs from the snapshot's",
            ));
        }
        if (0..n).any(|i| self.vgic.vcpu_mpidr(i) != Some(mpidrs[i])) {
            return Err(StateError::VgicShape(
                "its redistributor affinities differ from the vCPUs' MPIDRs",
            ));
        }
        if self.vgic.nr_irqs() != DEFAULT_NR_IRQS {
            return Err(StateError::VgicShape(
                "nr_irqs is not the 256 every VM of this monitor has",
            ));
        }
        self.uart.validate().map_err(StateError::Uart)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
