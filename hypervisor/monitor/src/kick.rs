//! Telling other physical CPUs about work: the kick SGI makes a CPU leave its guest (to reload
//! a vCPU's interrupts, or to stop it for a fork), and idle CPUs are woken when a vCPU became
//! runnable. The machine model says whom to tell (`vmfork_core::machine::Kicks`); this sends it.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use vmfork_core::machine::Kicks;

use crate::arch::boot::MAX_CPUS;
use crate::arch::gic;

/// SGI used to make another physical CPU leave its guest (it then reloads state or reschedules).
pub const KICK_SGI: u32 = 0;

/// Which CPUs sleep in the scheduler's idle loop (set and cleared by `sched.rs`).
static IDLE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Marks CPU `cpu` idle (about to sleep) or busy again.
pub fn set_idle(cpu: usize, idle: bool) {
    if let Some(flag) = IDLE.get(cpu) {
        flag.store(idle, Ordering::SeqCst);
    }
}

/// Sends the kick SGI to each CPU in `cpus` (other than the caller).
pub fn cpus(cpus: &[usize]) {
    let me = crate::arch::percpu::cpu_index();
    for &c in cpus {
        if c != me {
            let _ = gic::send_sgi(KICK_SGI, c);
        }
    }
}

/// Adds every idle CPU to `out`, so that one of them picks up a vCPU that became runnable.
fn add_idle(out: &mut Vec<usize>) {
    for (c, idle) in IDLE.iter().enumerate() {
        if idle.load(Ordering::SeqCst) && !out.contains(&c) {
            out.push(c);
        }
    }
}

/// Does what `kicks` asks: kicks its CPUs, and every idle CPU when it says so.
pub fn send(kicks: &Kicks) {
    if kicks.is_empty() {
        return;
    }
    let mut out = kicks.cpus.clone();
    if kicks.idle {
        add_idle(&mut out);
    }
    cpus(&out);
}
