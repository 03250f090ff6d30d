//! The monitor's console: the board's PL011 UART, a lock that keeps lines from different CPUs
//! whole, and the `log` logger on top of it.
//!
//! The lock records which CPU holds it, so that a fault or panic raised while a CPU is printing
//! can still print its report from that same CPU instead of deadlocking.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::arch::percpu::cpu_index;

/// Where QEMU's virt board puts its PL011; used until the device tree has been read.
pub const EARLY_UART_BASE: usize = 0x0900_0000;

static UART_BASE: AtomicUsize = AtomicUsize::new(EARLY_UART_BASE);
const NO_OWNER: usize = usize::MAX;
static OWNER: AtomicUsize = AtomicUsize::new(NO_OWNER);

/// PL011 data register offset.
const UARTDR: usize = 0x00;
/// PL011 flag register offset.
const UARTFR: usize = 0x18;
/// UARTFR.TXFF: transmit FIFO full.
const FR_TXFF: u32 = 1 << 5;

/// INTID of the console UART's interrupt, from the device tree.
static UART_INTID: AtomicUsize = AtomicUsize::new(0);
/// PL011 interrupt mask set/clear register offset.
const UARTIMSC: usize = 0x38;
/// UARTFR.RXFE: receive FIFO empty.
const FR_RXFE: u32 = 1 << 4;
/// UARTIMSC.RXIM and RTIM: receive and receive-timeout interrupts.
const IMSC_RX: u32 = (1 << 4) | (1 << 6);

/// Records the console UART's INTID (0 = unknown: no console input).
pub fn set_uart_intid(intid: u32) {
    UART_INTID.store(intid as usize, Ordering::SeqCst);
}

/// INTID of the console UART, if known.
pub fn rx_intid() -> Option<u32> {
    match UART_INTID.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n as u32),
    }
}

/// Unmasks the UART's receive interrupts, so typed characters raise its interrupt.
pub fn enable_rx_interrupt() {
    let base = UART_BASE.load(Ordering::Relaxed);
    // SAFETY: the console PL011's mask register, a Device-memory register of the UART the
    // monitor owns; enabling the RX and RX-timeout interrupts has no other effect.
    unsafe {
        let imsc = (base + UARTIMSC) as *mut u32;
        core::ptr::write_volatile(imsc, core::ptr::read_volatile(imsc) | IMSC_RX);
    }
}

/// A byte typed on the console, if one is waiting.
pub fn read_byte() -> Option<u8> {
    let base = UART_BASE.load(Ordering::Relaxed);
    // SAFETY: reads of the console PL011's flag and data registers; reading DR pops the FIFO,
    // which is the intent.
    unsafe {
        if core::ptr::read_volatile((base + UARTFR) as *const u32) & FR_RXFE != 0 {
            return None;
        }
        Some(core::ptr::read_volatile((base + UARTDR) as *const u32) as u8)
    }
}

/// Uses the PL011 at `base` (from the device tree) from now on.
pub fn set_uart_base(base: usize) {
    UART_BASE.store(base, Ordering::SeqCst);
}

fn put_byte(b: u8) {
    let base = UART_BASE.load(Ordering::Relaxed);
    // SAFETY: `base` is the PL011 named by the device tree (or QEMU virt's fixed one), mapped as
    // Device memory (or accessed with the MMU off, which is Device too). Volatile accesses of the
    // register width are how the UART is driven.
    unsafe {
        while core::ptr::read_volatile((base + UARTFR) as *const u32) & FR_TXFF != 0 {
            core::hint::spin_loop();
        }
        core::ptr::write_volatile((base + UARTDR) as *mut u32, b as u32);
    }
}

/// Writer that sends text to the UART, turning `\n` into `\r\n`.
struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put_byte(b'\r');
            }
            put_byte(b);
        }
        Ok(())
    }
}

/// Holds the console for one CPU. Re-entrant on the same CPU (an exception raised while printing
/// may print its own report).
struct ConsoleGuard {
    release: bool,
}

impl ConsoleGuard {
    fn acquire(force_after_spins: Option<u64>) -> Self {
        let me = cpu_index();
        let mut spins = 0u64;
        loop {
            match OWNER.compare_exchange(NO_OWNER, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Self { release: true },
                Err(owner) if owner == me => return Self { release: false },
                Err(_) => {
                    spins += 1;
                    if force_after_spins.is_some_and(|limit| spins > limit) {
                        // Another CPU holds the console and does not let go (it may be wedged):
                        // an emergency report matters more than a clean line.
                        return Self { release: false };
                    }
                    core::hint::spin_loop();
                }
            }
        }
    }
}

impl Drop for ConsoleGuard {
    fn drop(&mut self) {
        if self.release {
            OWNER.store(NO_OWNER, Ordering::Release);
        }
    }
}

/// Prints formatted text as one uninterrupted block.
pub fn print(args: fmt::Arguments) {
    let _guard = ConsoleGuard::acquire(None);
    let _ = Uart.write_fmt(args);
}

/// Prints without the console lock and without reading TPIDR_EL2: for the one message printed
/// when the monitor was started at the wrong exception level, where EL2 registers are undefined.
pub fn print_unlocked(args: fmt::Arguments) {
    let _ = Uart.write_fmt(args);
}

/// Prints a fault or panic report: like [`print`], but it will not wait forever for a CPU that
/// holds the console.
pub fn emergency_print(args: fmt::Arguments) {
    let _guard = ConsoleGuard::acquire(Some(10_000_000));
    let _ = Uart.write_fmt(args);
}

/// `print!` on the monitor console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// `println!` on the monitor console; the whole line is written under the console lock.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The `log` backend: `[seconds.micros] LEVEL cpuN: message`, one line at a time.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let (ticks, freq) = crate::arch::counter();
        let micros = if freq == 0 {
            0
        } else {
            (ticks as u128 * 1_000_000 / freq as u128) as u64
        };
        print(format_args!(
            "[{:>5}.{:06}] {:<5} cpu{}: {}\n",
            micros / 1_000_000,
            micros % 1_000_000,
            record.level(),
            cpu_index(),
            record.args()
        ));
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger with the given maximum level.
pub fn init_logger(level: log::LevelFilter) {
    // set_logger fails only if a logger is already installed; then the level still applies.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Messages a guest may make the monitor print back to back after a quiet period (per VM).
pub const VM_LOG_BURST: u32 = 20;
/// Messages a second a guest may make the monitor print once its burst is spent (per VM).
pub const VM_LOG_PER_SECOND: u32 = 10;

/// The per-VM limiters of [`vm_log`]: one entry per VM that printed something, removed by
/// [`vm_log_forget`] when the VM is destroyed (so at most one per VM alive).
struct GuestLog {
    vms: alloc::vec::Vec<(u32, vmfork_core::ratelimit::LogLimiter)>,
    /// Lines dropped because the table could not grow (out of heap), reported with the next
    /// line printed.
    lost: u64,
}

static GUEST_LOG: spin::Mutex<GuestLog> = spin::Mutex::new(GuestLog {
    vms: alloc::vec::Vec::new(),
    lost: 0,
});

/// Logs a line that a guest's behaviour caused (an abort it provoked, a device error, a pause),
/// at most [`VM_LOG_BURST`] at once and [`VM_LOG_PER_SECOND`] a second per VM: a guest looping
/// on an abort must not flood the monitor's console. What is dropped is counted and reported
/// as `vmN: M messages suppressed` before the next line of that VM that is printed (or when the
/// VM is destroyed). `args` is only formatted when the line is printed. Lines that can happen
/// at most once in a VM's life (created, stopping, destroyed) are logged directly: their number
/// is bounded by the number of VMs.
///
/// Use it through [`vm_log!`](crate::vm_log).
pub fn vm_log(vm: u32, level: log::Level, args: fmt::Arguments) {
    if level > log::max_level() {
        return;
    }
    let (now, freq) = crate::arch::counter();
    let (admit, lost) = {
        let mut g = GUEST_LOG.lock();
        let pos = match g.vms.iter().position(|(id, _)| *id == vm) {
            Some(p) => Some(p),
            None if g.vms.try_reserve(1).is_ok() => {
                g.vms.push((
                    vm,
                    vmfork_core::ratelimit::LogLimiter::new(VM_LOG_BURST, VM_LOG_PER_SECOND),
                ));
                Some(g.vms.len() - 1)
            }
            None => None,
        };
        match pos {
            Some(p) => {
                let admit = g.vms[p].1.admit(now, freq);
                let lost = if matches!(admit, vmfork_core::ratelimit::Admit::Print { .. }) {
                    core::mem::take(&mut g.lost)
                } else {
                    0
                };
                (admit, lost)
            }
            None => {
                g.lost = g.lost.saturating_add(1);
                (vmfork_core::ratelimit::Admit::Drop, 0)
            }
        }
    };
    if let vmfork_core::ratelimit::Admit::Print { suppressed } = admit {
        if lost > 0 {
            log::warn!("monitor: {lost} guest-caused messages lost (no memory to track them)");
        }
        if suppressed > 0 {
            log::warn!("vm{vm}: {suppressed} messages suppressed");
        }
        log::log!(level, "{args}");
    }
}

/// Forgets VM `vm`'s limiter (it was destroyed), reporting what it still had suppressed.
pub fn vm_log_forget(vm: u32) {
    let suppressed = {
        let mut g = GUEST_LOG.lock();
        match g.vms.iter().position(|(id, _)| *id == vm) {
            Some(p) => g.vms.swap_remove(p).1.pending_suppressed(),
            None => 0,
        }
    };
    if suppressed > 0 {
        log::warn!("vm{vm}: {suppressed} messages suppressed");
    }
}

/// `vm_log!(Warn, vm_id, "format", args...)`: a guest-caused log line, rate-limited per VM
/// ([`console::vm_log`](crate::console::vm_log)). The level is a `log::Level` variant name.
#[macro_export]
macro_rules! vm_log {
    ($level:ident, $vm:expr, $($arg:tt)+) => {
        $crate::console::vm_log($vm, log::Level::$level, format_args!($($arg)+))
    };
}
