//! PL011 UART console. Output uses only the data register (`UARTDR`), the flag register
//! (`UARTFR`) and the control register (`UARTCR`), so an emulated PL011 needs little to satisfy
//! it. Input ([`enable_rx_interrupts`], [`read_byte`]) adds the line control register
//! (`UARTLCR_H`, FIFOs on) and the interrupt mask (`UARTIMSC`); only the `echo` guest uses it.
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
const UARTLCR_H: usize = 0x02c;
const UARTCR: usize = 0x030;
const UARTIMSC: usize = 0x038;
/// `UARTFR.RXFE`: receive FIFO empty.
const FR_RXFE: u32 = 1 << 4;
/// `UARTLCR_H.FEN` (FIFOs enabled) and `WLEN` = 0b11 (8-bit words).
const LCR_H_FEN: u32 = 1 << 4;
const LCR_H_WLEN_8: u32 = 0b11 << 5;
/// `UARTCR.RXE`: receive enable.
const CR_RXE: u32 = 1 << 9;
/// `UARTIMSC.RXIM` (receive) and `UARTIMSC.RTIM` (receive timeout).
pub const IMSC_RXIM: u32 = 1 << 4;
/// See [`IMSC_RXIM`].
pub const IMSC_RTIM: u32 = 1 << 6;
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

impl Pl011 {
    /// Turns the FIFOs on (8-bit words), enables the receiver and unmasks the receive and
    /// receive-timeout interrupts.
    fn enable_rx(&mut self) {
        // SAFETY: as for enable(): PL011 registers of the DTB's UART, 32-bit aligned.
        unsafe {
            // Changing FEN flushes the receive FIFO: write it only when it changes.
            let lcr = read_volatile(self.reg(UARTLCR_H));
            if lcr & (LCR_H_FEN | LCR_H_WLEN_8) != LCR_H_FEN | LCR_H_WLEN_8 {
                write_volatile(self.reg(UARTLCR_H), lcr | LCR_H_FEN | LCR_H_WLEN_8);
            }
            let cr = read_volatile(self.reg(UARTCR));
            if cr & CR_RXE == 0 {
                write_volatile(self.reg(UARTCR), cr | CR_RXE);
            }
            write_volatile(self.reg(UARTIMSC), IMSC_RXIM | IMSC_RTIM);
        }
    }

    /// One byte from the receive FIFO, or `None` while `UARTFR.RXFE` is set.
    fn read_byte(&mut self) -> Option<u8> {
        // SAFETY: as for write_byte(). Reading UARTDR pops the FIFO; only the caller, holding
        // the console lock, does that.
        unsafe {
            if read_volatile(self.reg(UARTFR)) & FR_RXFE != 0 {
                return None;
            }
            Some(read_volatile(self.reg(UARTDR)) as u8)
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

/// Enables reception on the console UART: FIFOs on (`UARTLCR_H.FEN`, 8-bit words), receiver
/// on (`UARTCR.RXE`), and the receive and receive-timeout interrupts unmasked
/// (`UARTIMSC` = RXIM | RTIM). The UART's interrupt line then stays high while the receive
/// FIFO holds data; [`read_byte`] until it answers `None` lowers it. Routing the interrupt to a
/// CPU is the GIC's business ([`gic::enable_spi`](super::gic::enable_spi)).
pub fn enable_rx_interrupts() {
    let saved = sysreg::irq_save();
    {
        let _guard = LOCK.lock();
        uart().enable_rx();
    }
    sysreg::restore_daif(saved);
}

/// Takes one received byte from the console UART, `None` when its receive FIFO is empty.
pub fn read_byte() -> Option<u8> {
    let saved = sysreg::irq_save();
    let byte = {
        let _guard = LOCK.lock();
        uart().read_byte()
    };
    sysreg::restore_daif(saved);
    byte
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
