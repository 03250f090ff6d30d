//! Ending the run: power off through PSCI `SYSTEM_OFF` (QEMU exits with status 0), or fail
//! through the Arm semihosting `SYS_EXIT` call (QEMU run with `-semihosting` exits with
//! status 1; under the vmfork monitor `SYSTEM_OFF` instead, see [`fail`]), and the panic
//! handler.

use super::{console, psci, runtime, sysreg};
use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// Semihosting operation `SYS_EXIT`.
const SYS_EXIT: u64 = 0x18;
/// `ADP_Stopped_ApplicationExit`: the reason code that carries an exit status.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

static FAILING: AtomicBool = AtomicBool::new(false);

/// Asks the semihosting host to exit with `status`. Returns only if semihosting is not enabled
/// and the `HLT` trapped instead (then the exception handler calls [`fail`] again).
pub fn semihosting_exit(status: u32) {
    // AArch64 SYS_EXIT takes a pointer to a two-word parameter block.
    let block: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, u64::from(status)];
    // SAFETY: `HLT #0xf000` is the A64 semihosting trap; x1 points at a live, 8-byte aligned
    // block that the host only reads. Without semihosting it raises an exception that our
    // vectors handle.
    unsafe {
        asm!("hlt #0xf000", inout("x0") SYS_EXIT => _, in("x1") block.as_ptr(), options(nostack));
    }
}

/// Powers the machine off: a successful end of the run.
pub fn power_off() -> ! {
    let err = psci::system_off();
    console::print_line_emergency(format_args!("exit: SYSTEM_OFF failed: {err}"));
    fail()
}

/// Stops with a failing status.
///
/// On plain QEMU: semihosting exit 1, else (no `-semihosting`: the `HLT` traps and the handler
/// comes back here) `SYSTEM_OFF`, else spin. Under the vmfork monitor never semihosting: QEMU
/// would take the `HLT` itself and end the whole machine, every other VM with it; `SYSTEM_OFF`
/// powers off only this VM (the `FAIL` line the caller printed is the failure report).
/// Safe to re-enter.
pub fn fail() -> ! {
    sysreg::irq_disable();
    if !FAILING.swap(true, Ordering::SeqCst) && !runtime::under_vmfork() {
        semihosting_exit(1);
    }
    let _ = psci::system_off();
    loop {
        sysreg::wfe();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::print_line_emergency(format_args!("panic: {info}"));
    fail()
}
