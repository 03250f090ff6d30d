//! Entering and leaving a guest: the world switch.
//!
//! [`enter_guest`] runs the world switch in `arch/entry.rs`: it saves the monitor's callee-saved
//! registers on its stack, loads the guest's general-purpose and FP/SIMD registers from a
//! [`GuestRegs`], and `eret`s to EL1. Any exception from the guest arrives at the lower-EL vector
//! entries, which store the guest's registers back into the same [`GuestRegs`] (its address sits
//! on the stack, in the monitor's frame), restore the monitor's registers and return from
//! [`enter_guest`] with the vector index. The exception syndrome (ESR/FAR/HPFAR) is still in the
//! EL2 registers for the caller to decode.
//!
//! The EL1 system registers are not touched here: [`El1Sysregs`] loads and stores them around the
//! call, since the monitor itself never uses them.

pub use vmfork_core::machine::GuestRegs;

/// Why the guest stopped running: which lower-EL vector was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// A synchronous exception (trap, abort, HVC, SMC, ...): decode ESR_EL2.
    Sync,
    /// A physical IRQ arrived while the guest ran (HCR_EL2.IMO routes it to EL2).
    Irq,
    /// A physical FIQ (not used on this board).
    Fiq,
    /// An SError (asynchronous external abort).
    SError,
    /// An exception from AArch32 state, which guests never enter legitimately.
    Aarch32(u64),
}

/// Runs the guest described by `regs` (with its EL1 system registers, stage-2 tables and GIC
/// state already loaded) until it takes an exception to EL2.
///
/// # Safety
/// VTTBR_EL2, HCR_EL2 and the other per-guest EL2 registers must describe this guest, and the
/// guest's stage-2 tables must only map memory the guest may use: the guest then runs with
/// whatever those registers allow.
pub unsafe fn enter_guest(regs: &mut GuestRegs) -> GuestExit {
    // SAFETY: the caller's contract is `run_guest`'s.
    let index = unsafe { super::entry::run_guest(regs) };
    match index {
        8 => GuestExit::Sync,
        9 => GuestExit::Irq,
        10 => GuestExit::Fiq,
        11 => GuestExit::SError,
        n => GuestExit::Aarch32(n),
    }
}
