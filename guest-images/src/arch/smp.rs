//! Starting secondary CPUs with PSCI `CPU_ON`, and CPU identity.
//!
//! Each CPU is named by its index in the DTB's `/cpus` list. `CPU_ON` gets the runtime's
//! secondary entry point and the index as context ID; the entry code picks the index's stack,
//! installs the vectors and calls the function given to [`start_cpu`].

use super::{boot, psci, sysreg};
use crate::psci_abi::PsciError;
use crate::MAX_CPUS;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Why a CPU could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpError {
    /// The index is not in the DTB's CPU list (or beyond [`MAX_CPUS`]).
    NoSuchCpu(usize),
    /// The runtime has not finished booting.
    NotBooted,
    /// `CPU_ON` failed.
    Psci(PsciError),
}

impl fmt::Display for SmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchCpu(i) => write!(f, "no cpu with index {i}"),
            Self::NotBooted => write!(f, "runtime not booted"),
            Self::Psci(e) => write!(f, "CPU_ON failed: {e}"),
        }
    }
}

/// Entry function of a started CPU: gets its CPU index.
pub type SecondaryMain = fn(usize) -> !;

static ENTRIES: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

extern "C" {
    fn __vmfork_secondary_start();
}

/// Starts the CPU with DTB index `index` running `main(index)` on its own stack.
pub fn start_cpu(index: usize, main: SecondaryMain) -> Result<(), SmpError> {
    let info = boot::boot_info().ok_or(SmpError::NotBooted)?;
    let mpidr = *info
        .platform
        .cpus()
        .get(index)
        .ok_or(SmpError::NoSuchCpu(index))?;
    ENTRIES[index].store(main as usize, Ordering::Release);
    sysreg::dsb_sy();
    let entry = __vmfork_secondary_start as *const () as u64;
    psci::cpu_on(mpidr, entry, index as u64).map_err(SmpError::Psci)
}

/// The calling CPU's index in the DTB's CPU list.
pub fn current_cpu_index() -> Option<usize> {
    boot::boot_info()?
        .platform
        .cpu_index(sysreg::mpidr_affinity())
}

/// Called by the boot code on a CPU started by [`start_cpu`].
pub(super) fn secondary_entry(index: usize) -> ! {
    let main = ENTRIES.get(index).map_or(0, |e| e.load(Ordering::Acquire));
    if main == 0 {
        super::console::print_line_emergency(format_args!(
            "smp: cpu {index} started without an entry"
        ));
        super::exit::fail();
    }
    // SAFETY: start_cpu() only stores `SecondaryMain` pointers in ENTRIES.
    let main: SecondaryMain = unsafe { core::mem::transmute::<usize, SecondaryMain>(main) };
    main(index)
}
