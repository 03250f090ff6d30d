//! `forkloop`: exercises fork trees, fork churn and reset through vmfork's hypercalls. It only
//! does something useful under the vmfork monitor; on plain QEMU it says so and powers off.
//!
//! Bootargs: `mode=churn|reset|tree` (default churn), `mib=N` (default 1: the region the modes
//! write, above the image), and
//! - churn, `forks=N` (default 100): fork N times; each child powers off at once; the parent
//!   prints `forkloop: churn forks=N done` and powers off.
//! - reset, `resets=K` (default 3): fill the region with pattern 0, fork; the parent powers off;
//!   the child checks it sees pattern 0 (the fork point), prints `forkloop: child clean after
//!   resets=R`, dirties the whole region with pattern 2 and resets itself, K times, then prints
//!   `forkloop: reset ok resets=K`.
//! - dirty, `pages=N` (default 16): fork; after the fork neither side writes RAM except the
//!   child, which writes exactly N pages of the region (the fork, the writes and the report are
//!   one assembly block: no stack, no variables); the parent prints `P`, the child `C`
//!   (straight to the UART), and both then wait forever. `vmfork diff` of the two must report
//!   exactly N pages.
//! - genid: reads the 16-byte `microsoft,vmgenid` ID (the page at 0x090F_0000), forks, and
//!   reads it again: the parent prints `forkloop: parent vmgenid unchanged`, the child
//!   `forkloop: child vmgenid changed` (or FAIL lines).
//! - genidreset, `resets=K` (default 3): reads the vmgenid ID, forks; the parent prints
//!   `forkloop: parent vmgenid=<hex>` and powers off; the child, after the fork and after each
//!   of K resets of itself, checks the page no longer holds the parent's ID and prints
//!   `forkloop: child resets=R vmgenid=<hex>` (each reset must show a new one: the test
//!   compares them), then `forkloop: genid reset ok resets=K`.
//! - tree, `depth=D` (default 3): each generation marks its own page with its pattern and forks;
//!   the parent powers off at once and the child waits 100 ms before going on, so parents die
//!   before their children; generation D checks that every
//!   marker page and the rest of the region are intact and prints `forkloop: depth D ok`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::ptr::{read_volatile, write_volatile};
    use vmfork_guests::cow::versioned_pattern;
    use vmfork_guests::pattern::region;
    use vmfork_guests::vmfork_abi::ForkOutcome;
    use vmfork_guests::{exit, fail, println, runtime, timer, BootInfo};

    const PAGE: u64 = 4096;

    fn fill(start: u64, end: u64, version: u64) {
        let mut a = start;
        while a < end {
            // SAFETY: [start, end) is RAM above the image that only this program uses;
            // 8-byte aligned.
            unsafe { write_volatile(a as *mut u64, versioned_pattern(a, version)) };
            a += 8;
        }
    }

    fn check(start: u64, end: u64, version: u64, what: &str) {
        let mut a = start;
        while a < end {
            // SAFETY: as in `fill`.
            let got = unsafe { read_volatile(a as *const u64) };
            let want = versioned_pattern(a, version);
            if got != want {
                fail!("forkloop: FAIL {what}: at {a:#x} expected {want:#x} got {got:#x}");
            }
            a += 8;
        }
    }

    /// The 16-byte `microsoft,vmgenid` ID, from the page the monitor maps at 0x090F_0000.
    fn read_genid() -> [u64; 2] {
        const VMGENID: usize = 0x090F_0000;
        // SAFETY: the monitor maps the vmgenid page read-only at this IPA; 8-byte aligned reads.
        unsafe {
            [
                read_volatile(VMGENID as *const u64),
                read_volatile((VMGENID + 8) as *const u64),
            ]
        }
    }

    fn fork() -> ForkOutcome {
        match runtime::fork() {
            Ok(o) => o,
            Err(e) => fail!("forkloop: FAIL fork: {e:?}"),
        }
    }

    fn main(boot: &'static BootInfo) -> ! {
        if !runtime::under_vmfork() {
            println!("forkloop: needs the vmfork monitor");
            exit::power_off()
        }
        let args = &boot.platform.bootargs;
        let num = |key: &str, default: u64| match args.get_u64(key) {
            Ok(v) => v.unwrap_or(default),
            Err(e) => fail!("forkloop: FAIL {e}"),
        };
        let mib = num("mib", 1);
        let (start, end) = match region(mib, boot.image_end, boot.platform.memory()) {
            Ok(r) => r,
            Err(e) => fail!("forkloop: FAIL {e}"),
        };
        match args.get("mode").unwrap_or("churn") {
            "churn" => {
                let forks = num("forks", 100);
                for _ in 0..forks {
                    if fork() == ForkOutcome::Child {
                        exit::power_off()
                    }
                }
                println!("forkloop: churn forks={forks} done");
            }
            "reset" => {
                let resets = num("resets", 3);
                fill(start, end, 0);
                if let ForkOutcome::Parent { child } = fork() {
                    println!("forkloop: parent forked vm{child}");
                    exit::power_off()
                }
                // Every reset comes back here, as the child's return from the fork.
                let id = match runtime::identity() {
                    Ok(id) => id,
                    Err(e) => fail!("forkloop: FAIL identity: {e:?}"),
                };
                check(start, end, 0, "fork-point memory after reset");
                println!("forkloop: child clean after resets={}", id.resets);
                if id.resets >= resets {
                    println!("forkloop: reset ok resets={resets}");
                    exit::power_off()
                }
                fill(start, end, 2);
                check(start, end, 2, "child's own writes");
                let e = runtime::reset();
                fail!("forkloop: FAIL reset returned {e:?}");
            }
            "tree" => {
                let depth = num("depth", 3);
                if (end - start) / PAGE <= depth {
                    fail!("forkloop: FAIL region too small for depth {depth}");
                }
                fill(start, end, 0);
                loop {
                    let id = match runtime::identity() {
                        Ok(id) => id,
                        Err(e) => fail!("forkloop: FAIL identity: {e:?}"),
                    };
                    let g = id.generation;
                    // Marker pages of the generations before this one, then the untouched rest.
                    for older in 0..g {
                        let page = start + older * PAGE;
                        check(page, page + PAGE, older + 1, "an ancestor's marker page");
                    }
                    check(start + depth * PAGE, end, 0, "memory no generation wrote");
                    if g >= depth {
                        println!("forkloop: depth {depth} ok vm={}", id.vm);
                        exit::power_off()
                    }
                    let page = start + g * PAGE;
                    fill(page, page + PAGE, g + 1);
                    if let ForkOutcome::Parent { child } = fork() {
                        println!("forkloop: generation {g} vm={} forked vm{child}", id.vm);
                        exit::power_off()
                    }
                    // Give the parent time to power off first: the tree must outlive it.
                    timer::delay(timer::ticks_from_ms(100));
                }
            }
            "genidreset" => {
                let resets = num("resets", 3);
                let before = read_genid();
                if before == [0, 0] {
                    fail!("forkloop: FAIL the vmgenid page is zero");
                }
                if let ForkOutcome::Parent { .. } = fork() {
                    println!(
                        "forkloop: parent vmgenid={:016x}{:016x}",
                        before[0], before[1]
                    );
                    exit::power_off()
                }
                // After the fork and after every reset: `before` is fork-point memory, so it
                // still holds the parent's ID.
                let id = match runtime::identity() {
                    Ok(id) => id,
                    Err(e) => fail!("forkloop: FAIL identity: {e:?}"),
                };
                let now = read_genid();
                if now == before {
                    fail!(
                        "forkloop: FAIL resets={}: the vmgenid page still holds the parent's ID",
                        id.resets
                    );
                }
                println!(
                    "forkloop: child resets={} vmgenid={:016x}{:016x}",
                    id.resets, now[0], now[1]
                );
                if id.resets >= resets {
                    println!("forkloop: genid reset ok resets={resets}");
                    exit::power_off()
                }
                let e = runtime::reset();
                fail!("forkloop: FAIL reset returned {e:?}");
            }
            "genid" => {
                let read = read_genid;
                let before = read();
                if before == [0, 0] {
                    fail!("forkloop: FAIL the vmgenid page is zero");
                }
                match fork() {
                    ForkOutcome::Parent { .. } if read() == before => {
                        println!("forkloop: parent vmgenid unchanged")
                    }
                    ForkOutcome::Child if read() != before => {
                        println!("forkloop: child vmgenid changed")
                    }
                    _ => fail!("forkloop: FAIL vmgenid {:x?} -> {:x?}", before, read()),
                }
            }
            "dirty" => {
                let pages = num("pages", 16);
                if pages * PAGE > end - start {
                    fail!("forkloop: FAIL region too small for x21 pages");
                }
                let Some(uart) = boot.platform.uart else {
                    fail!("forkloop: FAIL no UART")
                };
                let hvc = matches!(runtime::conduit_is_hvc(), Some(true));
                println!("forkloop: dirty pages={pages} at {start:#x}");
                // SAFETY: the region [start, start + pages * 4 KiB) is RAM above the image that
                // only this program uses; `uart` is the PL011's data register (MMIO, not RAM).
                // Interrupts are masked, so nothing else runs on this vCPU afterwards; the block
                // never returns.
                unsafe {
                    core::arch::asm!(
                        "msr daifset, #0xf",
                        "mov x0, #0x0001",
                        "movk x0, #0xc600, lsl #16", // VMFORK_FORK
                        "cbz x20, 1f",
                        "hvc #0",
                        "b 2f",
                        "1: smc #0",
                        "2: cbnz x0, 5f",            // parent: x0 = child id
                        // child: one store per page
                        "3: cbz x21, 4f",
                        "str x21, [x22]",
                        "add x22, x22, #4096",
                        "sub x21, x21, #1",
                        "b 3b",
                        "4: mov w1, #0x43",          // 'C'
                        "b 6f",
                        "5: mov w1, #0x50",          // 'P'
                        "6: str w1, [x23]",
                        "mov w1, #0x0a",
                        "str w1, [x23]",
                        "7: wfi",
                        "b 7b",
                        // SMCCC preserves x18-x30 across the call; x0-x3 are free to clobber
                        // because the block never returns.
                        in("x20") hvc as u64,
                        in("x21") pages,
                        in("x22") start,
                        in("x23") uart,
                        options(noreturn),
                    );
                }
            }
            other => fail!("forkloop: FAIL unknown mode={other}"),
        }
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("forkloop is an aarch64-unknown-none guest image; run it under QEMU");
}
