//! PSCI calls from the monitor to QEMU's firmware emulation (SMC conduit when QEMU starts us at
//! EL2), through the `smccc` crate.

use smccc::{psci, Hvc, Smc};
use vmfork_core::platform::PsciConduit;

use core::sync::atomic::{AtomicBool, Ordering};

static USE_HVC: AtomicBool = AtomicBool::new(false);

/// Selects the conduit named by the device tree's `/psci` node.
pub fn set_conduit(c: PsciConduit) {
    USE_HVC.store(matches!(c, PsciConduit::Hvc), Ordering::Relaxed);
}

fn hvc() -> bool {
    USE_HVC.load(Ordering::Relaxed)
}

/// Starts the CPU with affinity `mpidr` at physical address `entry` with `context` in x0.
pub fn cpu_on(mpidr: u64, entry: u64, context: u64) -> Result<(), psci::error::Error> {
    if hvc() {
        psci::cpu_on::<Hvc>(mpidr, entry, context)
    } else {
        psci::cpu_on::<Smc>(mpidr, entry, context)
    }
}

/// Powers the whole machine off (QEMU exits with status 0). Never returns; if the call fails the
/// CPU waits forever.
pub fn system_off() -> ! {
    let _ = if hvc() {
        psci::system_off::<Hvc>()
    } else {
        psci::system_off::<Smc>()
    };
    loop {
        aarch64_cpu::asm::wfe();
    }
}
