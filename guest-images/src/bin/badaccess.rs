//! `badaccess`: reads and then writes an address where the `virt` board has neither RAM nor a
//! device, expects a synchronous external abort for each (as QEMU raises on plain `virt`, and
//! as the vmfork monitor injects), then shows it still runs and powers off.
//!
//! With `trap=sve` in the bootargs it then executes an SVE instruction (`rdvl`): plain QEMU
//! runs it; the vmfork monitor does not support SVE in guests, traps it (CPTR_EL2.TZ) and stops
//! just that VM with a decoded dump.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::sync::atomic::{AtomicU64, Ordering};
    use vmfork_guests::exceptions::{set_sync_handler, ExceptionFrame};
    use vmfork_guests::{exit, println, BootInfo};

    /// Between the last virtio-mmio slot (0x0a00_4000) and the platform bus (0x0c00_0000):
    /// nothing answers here on QEMU `virt`, nor in a vmfork guest.
    const HOLE: usize = 0x0b00_0000;

    /// ESR_EL1 of the last abort taken (0 = none).
    static LAST_ESR: AtomicU64 = AtomicU64::new(0);
    static LAST_FAR: AtomicU64 = AtomicU64::new(0);

    fn on_abort(esr: u64, far: u64, frame: &mut ExceptionFrame) -> bool {
        let ec = esr >> 26;
        if ec != 0x25 {
            return false; // not a data abort from EL1: let the runtime report it
        }
        LAST_ESR.store(esr, Ordering::SeqCst);
        LAST_FAR.store(far, Ordering::SeqCst);
        frame.elr += 4; // skip the faulting load or store
        true
    }

    /// Describes the abort the last access took: data abort, fault status and direction.
    fn report(what: &str) {
        let esr = LAST_ESR.swap(0, Ordering::SeqCst);
        let far = LAST_FAR.load(Ordering::SeqCst);
        if esr == 0 {
            vmfork_guests::fail!("badaccess: FAIL {what} at {HOLE:#x} did not abort");
        }
        let dfsc = esr & 0x3f;
        let wnr = (esr >> 6) & 1;
        println!("badaccess: {what} at {far:#x} aborted: EC=0x25 DFSC={dfsc:#x} WnR={wnr}");
        if dfsc != 0x10 || far != HOLE as u64 {
            vmfork_guests::fail!(
                "badaccess: FAIL expected a synchronous external abort at {HOLE:#x}"
            );
        }
    }

    fn main(boot: &'static BootInfo) -> ! {
        set_sync_handler(on_abort);
        // SAFETY: not sound by design: the access targets a hole in the address space and is
        // expected to abort; the handler skips the instruction.
        let v = unsafe { core::ptr::read_volatile(HOLE as *const u32) };
        let _ = v;
        report("read");
        // SAFETY: as above, for a store.
        unsafe { core::ptr::write_volatile(HOLE as *mut u32, 0xdead_beef) };
        report("write");
        println!("badaccess: still running");
        if boot.platform.bootargs.get("trap") == Some("sve") {
            let vl: u64;
            // SAFETY: CPACR_EL1.ZEN = 0b11 lets EL1 use SVE (ARM ARM D19.2.30); `rdvl` only reads
            // the vector length. An ISB makes the CPACR_EL1 write take effect first.
            unsafe {
                core::arch::asm!(
                    "mrs {t}, cpacr_el1",
                    "orr {t}, {t}, #(3 << 16)",
                    "msr cpacr_el1, {t}",
                    "isb",
                    ".inst 0x04bf5020", // rdvl x0, #1
                    t = out(reg) _,
                    out("x0") vl,
                );
            }
            println!("badaccess: SVE vector length {vl} bytes");
        }
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("badaccess is an aarch64-unknown-none guest image; run it under QEMU");
}
