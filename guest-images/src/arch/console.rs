//! PL011 UART console. Only the data register (`UARTDR`), the flag register (`UARTFR`) and the
//! control register (`UARTCR`) are used, so an emulated PL011 needs little to satisfy it.
//!
//! A spin lock guards the UART, and IRQs are masked on this CPU while it is held, so a whole
//! line goes out in one piece even with several CPUs printing and an IRQ handler printing.
//! Lines end with a bare `\n`.

use super::sysreg;
use core::fmt::{self, Write};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicUsize, Ordering};

const UARTDR: usize = 0x000;
const UARTFR: usize = 0x018;
const UARTCR: usize = 0x030;
/// `UARTFR.TXFF`: transmit FIFO full.
const FR_TXFF: u32 = 1 << 5;
/// `UARTCR.UARTEN`, `UARTCR.TXE`.
const CR_UARTEN: u32 = 1 << 0;
const CR_TXE: u32 = 1 << 8;

/// A PL011 at a given base address.
#[derive(Debug)]
pub struct Pl011 {
    base: usize,
}

impl Pl011 {
    fn reg(&self, offset: usize) -> *mut u32 {
        (self.base + offset) as *mut u32
    }

    /// Sets `UARTEN` and `TXE` if firmware left them clear (QEMU does; it transmits anyway).
    fn enable(&mut self) {
        // SAFETY: `base` is the PL011 named by the DTB; UARTCR is a 32-bit aligned register.
        unsafe {
            let cr = read_volatile(self.reg(UARTCR));
            if cr & (CR_UARTEN | CR_TXE) != (CR_UARTEN | CR_TXE) {
                write_volatile(self.reg(UARTCR), cr | CR_UARTEN | CR_TXE);
            }
        }
    }

    /// Writes one byte, waiting while the transmit FIFO is full.
    pub fn write_byte(&mut self, byte: u8) {
        // SAFETY: `base` is the PL011 named by the DTB (or QEMU virt's before the DTB is read);
        // UARTFR and UARTDR are 32-bit aligned registers. Callers hold the console lock except
        // on the emergency path, where an interleaved line is the lesser evil.
        unsafe {
            while read_volatile(self.reg(UARTFR)) & FR_TXFF != 0 {
                core::hint::spin_loop();
            }
            write_volatile(self.reg(UARTDR), u32::from(byte));
        }
    }
}

impl Write for Pl011 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.write_byte(b));
        Ok(())
    }
}

static UART_BASE: AtomicUsize = AtomicUsize::new(crate::DEFAULT_UART_BASE as usize);
static LOCK: spin::Mutex<()> = spin::Mutex::new(());

fn uart() -> Pl011 {
    Pl011 {
        base: UART_BASE.load(Ordering::Acquire),
    }
}

/// Switches the console to the PL011 at `base` (from the DTB) and enables its transmitter.
pub fn init(base: u64) {
    let saved = sysreg::irq_save();
    {
        let _guard = LOCK.lock();
        UART_BASE.store(base as usize, Ordering::Release);
        uart().enable();
    }
    sysreg::restore_daif(saved);
}

/// Prints `args` followed by `\n` as one uninterrupted line; used by [`println!`](crate::println).
pub fn print_line(args: fmt::Arguments<'_>) {
    let saved = sysreg::irq_save();
    {
        let _guard = LOCK.lock();
        let mut uart = uart();
        // Pl011::write_str never fails.
        let _ = uart.write_fmt(args);
        uart.write_byte(b'\n');
    }
    sysreg::restore_daif(saved);
}

/// Prints a line for the panic and fatal-exception paths: takes the lock if it can get it in
/// reasonable time, else writes without it (the holder may be this very CPU, stuck).
pub fn print_line_emergency(args: fmt::Arguments<'_>) {
    sysreg::irq_disable();
    let mut guard = None;
    for _ in 0..1_000_000 {
        guard = LOCK.try_lock();
        if guard.is_some() {
            break;
        }
        core::hint::spin_loop();
    }
    let mut uart = uart();
    let _ = uart.write_fmt(args);
    uart.write_byte(b'\n');
    drop(guard);
}
