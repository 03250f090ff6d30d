//! `forkbomb`: a guest that forks itself until the monitor refuses, to show that a fork bomb
//! only ever gets an error back: the monitor, and every other VM, go on.
//!
//! Every child waits in WFI with interrupts masked and nothing armed (so it stays off the CPUs,
//! but has run: its vGIC copy is made). The parent forks again after each child, counting, and
//! prints `forkbomb: progress N` every `every=` forks (default 100). When a fork fails it prints
//! `forkbomb: refused after N forks: <error>` and waits in WFI itself, so that the test can look
//! at the monitor and kill the VMs. `max=N` (default no limit) stops it after N forks with
//! `forkbomb: stopped after N forks`.
//!
//! Under plain QEMU (no vmfork monitor) it says so and powers off.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use vmfork_guests::vmfork_abi::ForkOutcome;
    use vmfork_guests::{exit, fail, println, runtime, sysreg, BootInfo};

    fn wait_forever() -> ! {
        loop {
            sysreg::wfi();
        }
    }

    fn main(boot: &'static BootInfo) -> ! {
        if !runtime::under_vmfork() {
            println!("forkbomb: needs the vmfork monitor");
            exit::power_off()
        }
        let args = &boot.platform.bootargs;
        let num = |key: &str, default: u64| match args.get_u64(key) {
            Ok(v) => v.unwrap_or(default),
            Err(e) => fail!("forkbomb: FAIL {e}"),
        };
        let max = num("max", u64::MAX);
        let every = num("every", 100).max(1);
        let mut forks: u64 = 0;
        println!("forkbomb: start");
        loop {
            if forks >= max {
                println!("forkbomb: stopped after {forks} forks");
                wait_forever()
            }
            match runtime::fork() {
                Ok(ForkOutcome::Child) => wait_forever(),
                Ok(ForkOutcome::Parent { .. }) => {
                    forks += 1;
                    if forks.is_multiple_of(every) {
                        println!("forkbomb: progress {forks}");
                    }
                }
                Err(e) => {
                    println!("forkbomb: refused after {forks} forks: {e:?}");
                    wait_forever()
                }
            }
        }
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("forkbomb is an aarch64-unknown-none guest image; run it under QEMU");
}
