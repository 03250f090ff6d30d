//! The GICv3 virtual CPU interface control registers (ICH_*_EL2): what the interface implements
//! (ICH_VTR_EL2), the list registers, the active-priority registers and the control, status and
//! maintenance registers the world switch saves and restores.

use core::sync::atomic::Ordering;

use aarch64_cpu::registers::{
    Readable, Writeable, ICH_AP0R0_EL2, ICH_AP0R1_EL2, ICH_AP0R2_EL2, ICH_AP0R3_EL2, ICH_AP1R0_EL2,
    ICH_AP1R1_EL2, ICH_AP1R2_EL2, ICH_AP1R3_EL2, ICH_HCR_EL2, ICH_LR0_EL2, ICH_LR10_EL2,
    ICH_LR11_EL2, ICH_LR12_EL2, ICH_LR13_EL2, ICH_LR14_EL2, ICH_LR15_EL2, ICH_LR1_EL2, ICH_LR2_EL2,
    ICH_LR3_EL2, ICH_LR4_EL2, ICH_LR5_EL2, ICH_LR6_EL2, ICH_LR7_EL2, ICH_LR8_EL2, ICH_LR9_EL2,
    ICH_MISR_EL2, ICH_VMCR_EL2, ICH_VTR_EL2,
};

use super::{GicError, LIST_REGS};

/// ICH_VTR_EL2 decoded: what the virtual CPU interface implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vtr {
    /// The raw register.
    pub raw: u64,
    /// Number of list registers (ListRegs + 1).
    pub list_registers: usize,
    /// Virtual priority bits (PRIbits + 1).
    pub pri_bits: u8,
    /// Virtual preemption bits (PREbits + 1); sets how many ICH_AP<0|1>R<n> exist.
    pub pre_bits: u8,
    /// Virtual INTID bits: 16 (IDbits = 0) or 24 (IDbits = 1).
    pub id_bits: u8,
}

impl Vtr {
    /// Decodes an ICH_VTR_EL2 value: ListRegs[4:0], IDbits[25:23], PREbits[28:26],
    /// PRIbits[31:29].
    pub const fn decode(raw: u64) -> Self {
        Self {
            raw,
            list_registers: (raw & 0x1f) as usize + 1,
            pri_bits: ((raw >> 29) & 7) as u8 + 1,
            pre_bits: ((raw >> 26) & 7) as u8 + 1,
            id_bits: if (raw >> 23) & 7 == 1 { 24 } else { 16 },
        }
    }

    /// Number of implemented ICH_AP0R<n>_EL2 (and ICH_AP1R<n>_EL2): 1, 2 or 4 for 5, 6 or 7
    /// preemption bits.
    pub const fn active_priority_registers(&self) -> usize {
        match self.pre_bits {
            0..=5 => 1,
            6 => 2,
            _ => 4,
        }
    }
}

/// Reads ICH_VTR_EL2.
pub fn ich_vtr() -> Vtr {
    Vtr::decode(ICH_VTR_EL2.get())
}

fn list_registers() -> usize {
    match LIST_REGS.load(Ordering::Relaxed) {
        0 => ich_vtr().list_registers,
        n => n as usize,
    }
}

/// Reads ICH_LR<n>_EL2.
pub fn read_lr(n: usize) -> Result<u64, GicError> {
    if n >= list_registers() {
        return Err(GicError::NoListRegister(n));
    }
    Ok(match n {
        0 => ICH_LR0_EL2.get(),
        1 => ICH_LR1_EL2.get(),
        2 => ICH_LR2_EL2.get(),
        3 => ICH_LR3_EL2.get(),
        4 => ICH_LR4_EL2.get(),
        5 => ICH_LR5_EL2.get(),
        6 => ICH_LR6_EL2.get(),
        7 => ICH_LR7_EL2.get(),
        8 => ICH_LR8_EL2.get(),
        9 => ICH_LR9_EL2.get(),
        10 => ICH_LR10_EL2.get(),
        11 => ICH_LR11_EL2.get(),
        12 => ICH_LR12_EL2.get(),
        13 => ICH_LR13_EL2.get(),
        14 => ICH_LR14_EL2.get(),
        15 => ICH_LR15_EL2.get(),
        _ => return Err(GicError::NoListRegister(n)),
    })
}

/// Writes ICH_LR<n>_EL2.
pub fn write_lr(n: usize, value: u64) -> Result<(), GicError> {
    if n >= list_registers() {
        return Err(GicError::NoListRegister(n));
    }
    match n {
        0 => ICH_LR0_EL2.set(value),
        1 => ICH_LR1_EL2.set(value),
        2 => ICH_LR2_EL2.set(value),
        3 => ICH_LR3_EL2.set(value),
        4 => ICH_LR4_EL2.set(value),
        5 => ICH_LR5_EL2.set(value),
        6 => ICH_LR6_EL2.set(value),
        7 => ICH_LR7_EL2.set(value),
        8 => ICH_LR8_EL2.set(value),
        9 => ICH_LR9_EL2.set(value),
        10 => ICH_LR10_EL2.set(value),
        11 => ICH_LR11_EL2.set(value),
        12 => ICH_LR12_EL2.set(value),
        13 => ICH_LR13_EL2.set(value),
        14 => ICH_LR14_EL2.set(value),
        15 => ICH_LR15_EL2.set(value),
        _ => return Err(GicError::NoListRegister(n)),
    }
    Ok(())
}

fn check_apr(n: usize) -> Result<(), GicError> {
    if n < ich_vtr().active_priority_registers() {
        Ok(())
    } else {
        Err(GicError::NoActivePriorityRegister(n))
    }
}

/// Reads ICH_AP0R<n>_EL2 (Group 0 virtual active priorities).
pub fn read_ap0r(n: usize) -> Result<u64, GicError> {
    check_apr(n)?;
    Ok(match n {
        0 => ICH_AP0R0_EL2.get(),
        1 => ICH_AP0R1_EL2.get(),
        2 => ICH_AP0R2_EL2.get(),
        _ => ICH_AP0R3_EL2.get(),
    })
}

/// Writes ICH_AP0R<n>_EL2.
pub fn write_ap0r(n: usize, value: u64) -> Result<(), GicError> {
    check_apr(n)?;
    match n {
        0 => ICH_AP0R0_EL2.set(value),
        1 => ICH_AP0R1_EL2.set(value),
        2 => ICH_AP0R2_EL2.set(value),
        _ => ICH_AP0R3_EL2.set(value),
    }
    Ok(())
}

/// Reads ICH_AP1R<n>_EL2 (Group 1 virtual active priorities).
pub fn read_ap1r(n: usize) -> Result<u64, GicError> {
    check_apr(n)?;
    Ok(match n {
        0 => ICH_AP1R0_EL2.get(),
        1 => ICH_AP1R1_EL2.get(),
        2 => ICH_AP1R2_EL2.get(),
        _ => ICH_AP1R3_EL2.get(),
    })
}

/// Writes ICH_AP1R<n>_EL2.
pub fn write_ap1r(n: usize, value: u64) -> Result<(), GicError> {
    check_apr(n)?;
    match n {
        0 => ICH_AP1R0_EL2.set(value),
        1 => ICH_AP1R1_EL2.set(value),
        2 => ICH_AP1R2_EL2.set(value),
        _ => ICH_AP1R3_EL2.set(value),
    }
    Ok(())
}

/// Reads ICH_HCR_EL2 (En is bit 0).
pub fn read_ich_hcr() -> u64 {
    ICH_HCR_EL2.get()
}

/// Writes ICH_HCR_EL2.
pub fn write_ich_hcr(value: u64) {
    ICH_HCR_EL2.set(value);
}

/// Reads ICH_VMCR_EL2 (the guest's view of PMR, BPRs, EOImode and group enables).
pub fn read_ich_vmcr() -> u64 {
    ICH_VMCR_EL2.get()
}

/// Writes ICH_VMCR_EL2.
pub fn write_ich_vmcr(value: u64) {
    ICH_VMCR_EL2.set(value);
}

/// Reads ICH_MISR_EL2 (why the maintenance interrupt is asserted).
pub fn read_ich_misr() -> u64 {
    ICH_MISR_EL2.get()
}

/// Reads ICH_EISR_EL2: bit n = list register n holds an EOI'd interrupt that asks for a
/// maintenance interrupt.
pub fn read_ich_eisr() -> u64 {
    let v: u64;
    // SAFETY: reading ICH_EISR_EL2 at EL2 has no side effects.
    unsafe { core::arch::asm!("mrs {0}, ich_eisr_el2", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads ICH_ELRSR_EL2: bit n = list register n is empty.
pub fn read_ich_elrsr() -> u64 {
    let v: u64;
    // SAFETY: reading ICH_ELRSR_EL2 at EL2 has no side effects.
    unsafe { core::arch::asm!("mrs {0}, ich_elrsr_el2", out(reg) v, options(nomem, nostack)) };
    v
}
