//! `hello`: prints the exception level it runs at and powers off.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use vmfork_guests::{exit, println, sysreg, BootInfo};

    fn main(_boot: &'static BootInfo) -> ! {
        let el = sysreg::current_el();
        println!("hello: vmfork guest running at EL{el}");
        if el != 1 {
            vmfork_guests::fail!("hello: FAIL expected EL1, running at EL{el}");
        }
        println!("hello: bye");
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("hello is an aarch64-unknown-none guest image; run it under QEMU");
}
