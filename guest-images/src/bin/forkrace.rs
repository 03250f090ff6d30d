//! `forkrace`: two vCPUs call `VMFORK_FORK` at the same instant, `rounds=N` times (default 5),
//! and every VM checks what each of its two vCPUs got back in X0. Only useful under the vmfork
//! monitor (2 vCPUs: `cpus=2`); on plain QEMU it says so and powers off.
//!
//! Each vCPU's X0 must be a fork's answer: 0 (this VM is the child of that vCPU's fork), a VM
//! id (this VM is the parent), or a documented error: `VMFORK_BUSY` (-10: the other vCPU's fork
//! was already waiting), `DENIED`, `INTERNAL_FAILURE`. The function ID itself (the call left
//! unanswered) or anything else is a failure. Each VM prints
//! `forkrace: round R vm=V cpu0=<answer> cpu1=<answer>`; a VM that is a child (one of its
//! vCPUs got 0) then powers off, the original goes on to the next round and finally prints
//! `forkrace: rounds=N done busy=B` (B: rounds in which one vCPU was refused).
//!
//! `mode=spin` instead: both vCPUs spin forever without a trap (`forkrace: spinning`), so the
//! VM is on the CPUs whenever the monitor is asked for something that waits for it to leave.
//! `mode=resetloop`: forks once; the parent (`forkrace: parent spins`) spins forever, the child
//! calls `VMFORK_RESET` again and again, silently, so it is in that call whenever the monitor is asked
//! for something; a reset that returns (`VMFORK_BUSY`) is simply made again.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::fmt;
    use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use vmfork_guests::vmfork_abi::{ForkOutcome, VMFORK_BUSY, VMFORK_FORK};
    use vmfork_guests::{exit, fail, println, psci, runtime, smp, BootInfo};

    /// Barrier: each vCPU adds one when it reaches round R's fork, and calls once it reads 2R.
    static ARRIVED: AtomicUsize = AtomicUsize::new(0);
    /// What each vCPU's fork returned in the latest round, and how many answers came in (2 per
    /// round).
    static X0: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
    static DONE: AtomicUsize = AtomicUsize::new(0);

    /// One vCPU's answer, classified.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Answer {
        Child,
        Parent(u64),
        Busy,
        Error(i64),
        Bad(u64),
    }

    impl Answer {
        fn of(x0: u64) -> Self {
            match x0 as i64 {
                0 => Answer::Child,
                v if v == VMFORK_BUSY => Answer::Busy,
                -3 | -6 => Answer::Error(x0 as i64),
                // VM ids are small; the function ID (0xC600_0001) is not one.
                v if v > 0 && x0 < 0x1_0000 => Answer::Parent(x0),
                _ => Answer::Bad(x0),
            }
        }
    }

    impl fmt::Display for Answer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Answer::Child => write!(f, "child"),
                Answer::Parent(c) => write!(f, "parent-of-vm{c}"),
                Answer::Busy => write!(f, "busy"),
                Answer::Error(e) => write!(f, "error{e}"),
                Answer::Bad(x) if *x == u64::from(VMFORK_FORK) => {
                    write!(f, "unanswered({x:#x})")
                }
                Answer::Bad(x) => write!(f, "bad({x:#x})"),
            }
        }
    }

    fn fork_raw() -> u64 {
        match psci::conduit() {
            Some(c) => psci::smccc_call(c, VMFORK_FORK, [0; 6])[0],
            None => fail!("forkrace: FAIL no PSCI conduit"),
        }
    }

    /// vCPU `cpu`'s fork of round `round`: both leave the barrier together (a plain load loop,
    /// no `yield` that would let QEMU deschedule the vCPU), so their calls trap at nearly the
    /// same instant, before the monitor's kick for the first one reaches the second.
    fn race(cpu: usize, round: usize) {
        ARRIVED.fetch_add(1, Ordering::AcqRel);
        while ARRIVED.load(Ordering::Acquire) < 2 * round {}
        let x0 = fork_raw();
        X0[cpu].store(x0, Ordering::Release);
        DONE.fetch_add(1, Ordering::AcqRel);
    }

    fn spin(_index: usize) -> ! {
        loop {
            core::hint::spin_loop();
        }
    }

    fn secondary(_index: usize) -> ! {
        let mut round = 1;
        loop {
            race(1, round);
            round += 1;
        }
    }

    fn main(boot: &'static BootInfo) -> ! {
        if !runtime::under_vmfork() {
            println!("forkrace: needs the vmfork monitor");
            exit::power_off()
        }
        let rounds = match boot.platform.bootargs.get_u64("rounds") {
            Ok(v) => v.unwrap_or(5) as usize,
            Err(e) => fail!("forkrace: FAIL {e}"),
        };
        let other = (0..2).find(|&i| i != boot.boot_cpu).unwrap_or(1);
        match boot.platform.bootargs.get("mode").unwrap_or("race") {
            "race" => {}
            "spin" => {
                if let Err(e) = smp::start_cpu(other, spin) {
                    fail!("forkrace: FAIL starting cpu {other}: {e}");
                }
                println!("forkrace: spinning");
                spin(0)
            }
            "resetloop" => match runtime::fork() {
                Ok(ForkOutcome::Parent { .. }) => {
                    // Spins: it keeps one CPU busy, so the child runs on another one while
                    // the boot CPU serves the control channel.
                    println!("forkrace: parent spins");
                    spin(0)
                }
                // Every reset comes back here, as the child's return from the fork; nothing
                // else is done between two resets.
                Ok(ForkOutcome::Child) => loop {
                    let _ = runtime::reset();
                },
                Err(e) => fail!("forkrace: FAIL fork: {e:?}"),
            },
            m => fail!("forkrace: FAIL unknown mode={m}"),
        }
        if boot.platform.cpus().len() < 2 {
            fail!("forkrace: FAIL needs 2 vCPUs");
        }
        if let Err(e) = smp::start_cpu(other, secondary) {
            fail!("forkrace: FAIL starting cpu {other}: {e}");
        }
        let mut busy = 0;
        for round in 1..=rounds {
            race(0, round);
            // No time limit here: a fork that never returns shows as a missing line.
            while DONE.load(Ordering::Acquire) < 2 * round {
                core::hint::spin_loop();
            }
            let a = [0, 1].map(|c| Answer::of(X0[c].load(Ordering::Acquire)));
            let vm = runtime::identity().map_or(0, |id| id.vm);
            println!(
                "forkrace: round {round} vm={vm} cpu0={} cpu1={}",
                a[0], a[1]
            );
            if a.iter().any(|x| matches!(x, Answer::Bad(_))) {
                fail!(
                    "forkrace: FAIL round {round} vm={vm}: cpu0={} cpu1={}",
                    a[0],
                    a[1]
                );
            }
            if a.contains(&Answer::Child) {
                exit::power_off()
            }
            if a.contains(&Answer::Busy) {
                busy += 1;
            }
        }
        println!("forkrace: rounds={rounds} done busy={busy}");
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("forkrace is an aarch64-unknown-none guest image; run it under QEMU");
}
