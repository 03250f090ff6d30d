//! Arm semihosting, used only to give QEMU a real exit status (`-semihosting` on its command
//! line). Without `-semihosting`, `HLT #0xF000` is an undefined instruction: the exception handler
//! sees [`ATTEMPTING`] set and falls back to PSCI `SYSTEM_OFF`.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// Set while a semihosting call is in flight, so that the exception handler can tell an
/// undefined-instruction exception from the `HLT` apart from a real fault.
pub static ATTEMPTING: AtomicBool = AtomicBool::new(false);

/// Exit status for an unexpected exception at EL2.
pub const EXIT_EXCEPTION: u32 = 1;
/// Exit status for a panic.
pub const EXIT_PANIC: u32 = 101;

const SYS_EXIT: u64 = 0x18;
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

/// Ends QEMU with `code` as its exit status.
pub fn exit(code: u32) -> ! {
    let block: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, code as u64];
    ATTEMPTING.store(true, Ordering::SeqCst);
    // SAFETY: SYS_EXIT reads the two-word parameter block that x1 points at, which lives on this
    // stack frame for the duration of the call; the call does not return when semihosting is on.
    unsafe {
        asm!("hlt #0xf000", in("x0") SYS_EXIT, in("x1") block.as_ptr(), options(nostack));
    }
    super::psci::system_off()
}
