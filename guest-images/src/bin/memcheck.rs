//! `memcheck`: fills `mib=N` MiB (default 8) above the image with an address-derived pattern,
//! verifies every word and prints a checksum of the whole region.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::ptr::{read_volatile, write_volatile};
    use vmfork_guests::pattern::{pattern, region, Checksum};
    use vmfork_guests::{exit, fail, println, BootInfo};

    /// Size checked when the bootargs do not say.
    const DEFAULT_MIB: u64 = 8;

    fn main(boot: &'static BootInfo) -> ! {
        let mib = match boot.platform.bootargs.get_u64("mib") {
            Ok(mib) => mib.unwrap_or(DEFAULT_MIB),
            Err(e) => fail!("memcheck: FAIL {e}"),
        };
        let (start, end) = match region(mib, boot.image_end, boot.platform.memory()) {
            Ok(r) => r,
            Err(e) => fail!("memcheck: FAIL {e}"),
        };
        println!("memcheck: checking mib={mib} at {start:#x}..{end:#x}");

        let mut addr = start;
        while addr < end {
            // SAFETY: [start, end) is RAM from the DTB memory node, above the image and its
            // stacks, which nothing else in this program uses; addr is 8-byte aligned. Volatile
            // keeps the compiler from eliding the stores or the loads below.
            unsafe { write_volatile(addr as *mut u64, pattern(addr)) };
            addr += 8;
        }

        let mut sum = Checksum::new();
        let mut addr = start;
        while addr < end {
            // SAFETY: as above.
            let got = unsafe { read_volatile(addr as *const u64) };
            let expected = pattern(addr);
            if got != expected {
                fail!("memcheck: FAIL at {addr:#x} expected {expected:#018x} got {got:#018x}");
            }
            sum.add(got);
            addr += 8;
        }
        println!("memcheck: ok mib={mib} checksum={:#018x}", sum.value());
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("memcheck is an aarch64-unknown-none guest image; run it under QEMU");
}
