//! A PL011 UART model (PrimeCell UART r1p5), one per VM, at QEMU `virt`'s 0x0900_0000 with its
//! interrupt on SPI 1 (INTID 33).
//!
//! # Model
//! - **TX is instant.** Every byte written to UARTDR is appended to an output buffer that the
//!   monitor drains with [`Vuart::take_output`]; the transmit FIFO therefore always reads empty
//!   (UARTFR.TXFE = 1, TXFF = 0, BUSY = 0). If the monitor lets more than [`OUTPUT_CAPACITY`]
//!   bytes pile up, further bytes are dropped and counted ([`Vuart::tx_dropped`]). With
//!   UARTCR.LBE (loopback) set, written bytes go to the receive FIFO instead. Like QEMU's model,
//!   transmission is not gated on UARTCR.UARTEN/TXE, so firmware that never programs UARTCR
//!   still prints.
//! - **TXIS** (transmit interrupt): the FIFO is always at or below any trigger level, so TXIS is
//!   raised while the transmitter is enabled (UARTCR.UARTEN and TXE). The guest can clear it with
//!   UARTICR.TXIC; it is raised again by the next write to UARTDR (the FIFO "drains" again) or by
//!   re-enabling the transmitter. A driver that waits for a TX interrupt before sending its first
//!   byte therefore gets one as soon as it unmasks TXIM.
//! - **RX** is a FIFO of 32 bytes ([`RX_FIFO_DEPTH`]), or a one-byte holding register while
//!   UARTLCR_H.FEN = 0; [`Vuart::push_rx`] answers `false` when it is full, and the monitor keeps
//!   the byte for later. Changing FEN flushes the receive FIFO. Bytes are accepted whatever the
//!   enable bits say, so console input typed before the guest's driver is up is not lost.
//! - **RXIS** is raised while the receive FIFO holds at least the UARTIFLS.RXIFLSEL trigger level
//!   (one byte with FIFOs off); **RTIS** (receive timeout) is raised whenever the FIFO is not
//!   empty, standing for the timeout that real hardware would raise after 32 idle bit periods.
//!   UARTICR.RXIC / RTIC clear them until the next byte arrives; reading the FIFO empty clears
//!   them too.
//! - No modem lines, no errors: UARTRSR reads 0, the modem-status and error interrupt bits never
//!   assert.
//! - The interrupt output is [`Vuart::irq_level`] = (UARTRIS & UARTIMSC) != 0. The monitor
//!   forwards it to the vGIC as a level on INTID 33 after every access and every RX push.
//!
//! Accesses may be 8, 16 or 32 bits wide (Linux's `amba-pl011` driver uses 16-bit accesses,
//! earlycon uses 8 or 32); 64-bit and misaligned accesses fault. A narrower access at an offset
//! that is not a multiple of 4 reads the corresponding byte lanes of the register; such writes
//! are ignored.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::mmio::{MmioAccess, MmioDevice, MmioResult};

/// IPA of the PL011 on QEMU `virt`.
pub const PL011_BASE: u64 = 0x0900_0000;
/// Size of the PL011 register window.
pub const PL011_SIZE: u64 = 0x1000;
/// The PL011's interrupt on QEMU `virt`: SPI 1.
pub const PL011_INTID: u32 = 33;
/// Depth of the receive FIFO (as on the real PL011).
pub const RX_FIFO_DEPTH: usize = 32;
/// Most bytes kept in the output buffer before further TX bytes are dropped.
pub const OUTPUT_CAPACITY: usize = 64 * 1024;

/// Data register.
pub const UARTDR: u64 = 0x000;
/// Receive status register (read) / error clear register (write).
pub const UARTRSR: u64 = 0x004;
/// Flag register.
pub const UARTFR: u64 = 0x018;
/// IrDA low-power counter register.
pub const UARTILPR: u64 = 0x020;
/// Integer baud rate register.
pub const UARTIBRD: u64 = 0x024;
/// Fractional baud rate register.
pub const UARTFBRD: u64 = 0x028;
/// Line control register.
pub const UARTLCR_H: u64 = 0x02c;
/// Control register.
pub const UARTCR: u64 = 0x030;
/// Interrupt FIFO level select register.
pub const UARTIFLS: u64 = 0x034;
/// Interrupt mask set/clear register.
pub const UARTIMSC: u64 = 0x038;
/// Raw interrupt status register.
pub const UARTRIS: u64 = 0x03c;
/// Masked interrupt status register.
pub const UARTMIS: u64 = 0x040;
/// Interrupt clear register.
pub const UARTICR: u64 = 0x044;
/// DMA control register.
pub const UARTDMACR: u64 = 0x048;
/// First of UARTPeriphID0-3 and UARTPCellID0-3 (0xFE0-0xFFC).
pub const UARTPERIPHID0: u64 = 0xfe0;

/// UARTFR.BUSY: transmitting.
pub const FR_BUSY: u32 = 1 << 3;
/// UARTFR.RXFE: receive FIFO empty.
pub const FR_RXFE: u32 = 1 << 4;
/// UARTFR.TXFF: transmit FIFO full.
pub const FR_TXFF: u32 = 1 << 5;
/// UARTFR.RXFF: receive FIFO full.
pub const FR_RXFF: u32 = 1 << 6;
/// UARTFR.TXFE: transmit FIFO empty.
pub const FR_TXFE: u32 = 1 << 7;

/// UARTLCR_H.FEN: FIFOs enabled.
pub const LCR_H_FEN: u32 = 1 << 4;

/// UARTCR.UARTEN: UART enable.
pub const CR_UARTEN: u32 = 1 << 0;
/// UARTCR.LBE: loopback enable.
pub const CR_LBE: u32 = 1 << 7;
/// UARTCR.TXE: transmit enable.
pub const CR_TXE: u32 = 1 << 8;
/// UARTCR.RXE: receive enable.
pub const CR_RXE: u32 = 1 << 9;

/// Interrupt bit (UARTIMSC/RIS/MIS/ICR) RXIM/RXRIS/RXMIS/RXIC: receive.
pub const INT_RX: u32 = 1 << 4;
/// Interrupt bit TXIM/TXRIS/TXMIS/TXIC: transmit.
pub const INT_TX: u32 = 1 << 5;
/// Interrupt bit RTIM/RTRIS/RTMIS/RTIC: receive timeout.
pub const INT_RT: u32 = 1 << 6;
/// All eleven interrupt bits (RIMIM .. OEIM).
pub const INT_ALL: u32 = 0x7ff;

const PERIPH_CELL_ID: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];
const CR_RESET: u32 = CR_TXE | CR_RXE;
const IFLS_RESET: u32 = 0x12;

/// The state of one PL011.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Vuart {
    #[serde(deserialize_with = "crate::bounded::vec_deque::<_, _, RX_FIFO_DEPTH>")]
    rx: VecDeque<u8>,
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, OUTPUT_CAPACITY>")]
    output: Vec<u8>,
    tx_dropped: u64,
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    dmacr: u32,
    /// TXIS was cleared through UARTICR and no byte has been written since.
    tx_cleared: bool,
    /// RXIS was cleared through UARTICR and no byte has arrived since.
    rx_cleared: bool,
    /// RTIS was cleared through UARTICR and no byte has arrived since.
    rt_cleared: bool,
}

impl Default for Vuart {
    fn default() -> Self {
        Self::new()
    }
}

impl Vuart {
    /// A PL011 in its reset state: UARTCR = 0x300 (TXE, RXE, UART disabled), UARTIFLS = 0x12,
    /// FIFOs off, all interrupts masked.
    pub fn new() -> Self {
        Self {
            rx: VecDeque::with_capacity(RX_FIFO_DEPTH),
            output: Vec::new(),
            tx_dropped: 0,
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: CR_RESET,
            ifls: IFLS_RESET,
            imsc: 0,
            dmacr: 0,
            tx_cleared: false,
            rx_cleared: false,
            rt_cleared: false,
        }
    }

    /// Takes everything the guest has transmitted since the last call, oldest byte first.
    pub fn take_output(&mut self) -> impl Iterator<Item = u8> + '_ {
        self.output.drain(..)
    }

    /// Number of transmitted bytes waiting in the output buffer.
    pub fn output_len(&self) -> usize {
        self.output.len()
    }

    /// Bytes dropped because the output buffer was full.
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped
    }

    /// Checks the invariants the emulation relies on, for a state that did not come from this
    /// model's own operations (a snapshot being restored): the receive FIFO holds no more than
    /// its current capacity (32 bytes, or one with FIFOs off), the output buffer no more than
    /// [`OUTPUT_CAPACITY`], and every register only the bits a guest write can set.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.rx.len() > self.rx_capacity() {
            return Err("receive FIFO holds more bytes than its depth");
        }
        if self.output.len() > OUTPUT_CAPACITY {
            return Err("output buffer larger than its capacity");
        }
        let fields = [
            (
                self.ilpr,
                0xff,
                "UARTILPR holds bits a guest write cannot set",
            ),
            (
                self.ibrd,
                0xffff,
                "UARTIBRD holds bits a guest write cannot set",
            ),
            (
                self.fbrd,
                0x3f,
                "UARTFBRD holds bits a guest write cannot set",
            ),
            (
                self.lcr_h,
                0xff,
                "UARTLCR_H holds bits a guest write cannot set",
            ),
            (
                self.cr,
                0xffff,
                "UARTCR holds bits a guest write cannot set",
            ),
            (
                self.ifls,
                0x3f,
                "UARTIFLS holds bits a guest write cannot set",
            ),
            (
                self.imsc,
                INT_ALL,
                "UARTIMSC holds bits a guest write cannot set",
            ),
            (
                self.dmacr,
                0x7,
                "UARTDMACR holds bits a guest write cannot set",
            ),
        ];
        for (value, mask, why) in fields {
            if value & !mask != 0 {
                return Err(why);
            }
        }
        Ok(())
    }

    /// Offers one received byte to the guest. Returns `false` (and keeps nothing) when the
    /// receive FIFO is full.
    pub fn push_rx(&mut self, byte: u8) -> bool {
        if self.rx.len() >= self.rx_capacity() {
            return false;
        }
        self.rx.push_back(byte);
        self.rx_cleared = false;
        self.rt_cleared = false;
        true
    }

    /// Number of bytes in the receive FIFO.
    pub fn rx_len(&self) -> usize {
        self.rx.len()
    }

    /// The raw interrupt status (UARTRIS).
    pub fn raw_interrupt_status(&self) -> u32 {
        let mut ris = 0;
        let tx_enabled = self.cr & (CR_UARTEN | CR_TXE) == CR_UARTEN | CR_TXE;
        if tx_enabled && !self.tx_cleared {
            ris |= INT_TX;
        }
        if !self.rx.is_empty() {
            if self.rx.len() >= self.rx_trigger_level() && !self.rx_cleared {
                ris |= INT_RX;
            }
            if !self.rt_cleared {
                ris |= INT_RT;
            }
        }
        ris
    }

    /// The masked interrupt status (UARTMIS = UARTRIS & UARTIMSC).
    pub fn masked_interrupt_status(&self) -> u32 {
        self.raw_interrupt_status() & self.imsc
    }

    /// The level of the UART's interrupt line (UARTINTR).
    pub fn irq_level(&self) -> bool {
        self.masked_interrupt_status() != 0
    }

    fn fifo_enabled(&self) -> bool {
        self.lcr_h & LCR_H_FEN != 0
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled() {
            RX_FIFO_DEPTH
        } else {
            1
        }
    }

    /// Receive trigger level in bytes from UARTIFLS.RXIFLSEL (bits 5:3): 1/8, 1/4, 1/2, 3/4 or
    /// 7/8 of the FIFO; one byte with FIFOs off.
    fn rx_trigger_level(&self) -> usize {
        if !self.fifo_enabled() {
            return 1;
        }
        match (self.ifls >> 3) & 0x7 {
            0 => RX_FIFO_DEPTH / 8,
            1 => RX_FIFO_DEPTH / 4,
            2 => RX_FIFO_DEPTH / 2,
            3 => RX_FIFO_DEPTH * 3 / 4,
            // 0b100 is 7/8; 0b101-0b111 are reserved: treat them as 7/8 too.
            _ => RX_FIFO_DEPTH * 7 / 8,
        }
    }

    fn flags(&self) -> u32 {
        let mut fr = FR_TXFE;
        if self.rx.is_empty() {
            fr |= FR_RXFE;
        }
        if self.rx.len() >= self.rx_capacity() {
            fr |= FR_RXFF;
        }
        fr
    }

    fn transmit(&mut self, byte: u8) {
        if self.cr & CR_LBE != 0 {
            // Loopback: the byte comes back on the receive side; if the FIFO is full it is lost
            // exactly as a real overrun would lose it.
            let _ = self.push_rx(byte);
        } else if self.output.len() < OUTPUT_CAPACITY {
            self.output.push(byte);
        } else {
            self.tx_dropped = self.tx_dropped.saturating_add(1);
        }
        self.tx_cleared = false;
    }

    fn read_reg(&mut self, reg: u64) -> u32 {
        match reg {
            UARTDR => {
                let v = self.rx.pop_front().map_or(0, u32::from);
                if self.rx.is_empty() {
                    self.rt_cleared = false;
                    self.rx_cleared = false;
                }
                v
            }
            UARTRSR => 0,
            UARTFR => self.flags(),
            UARTILPR => self.ilpr,
            UARTIBRD => self.ibrd,
            UARTFBRD => self.fbrd,
            UARTLCR_H => self.lcr_h,
            UARTCR => self.cr,
            UARTIFLS => self.ifls,
            UARTIMSC => self.imsc,
            UARTRIS => self.raw_interrupt_status(),
            UARTMIS => self.masked_interrupt_status(),
            UARTDMACR => self.dmacr,
            0xfe0..=0xffc => {
                let idx = ((reg - UARTPERIPHID0) / 4) as usize;
                PERIPH_CELL_ID.get(idx).copied().map_or(0, u32::from)
            }
            // UARTICR is write-only; reserved and test registers read as zero.
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u64, val: u32) {
        match reg {
            UARTDR => self.transmit(val as u8),
            // UARTECR: any write clears the (always clear) error flags.
            UARTRSR => {}
            UARTILPR => self.ilpr = val & 0xff,
            UARTIBRD => self.ibrd = val & 0xffff,
            UARTFBRD => self.fbrd = val & 0x3f,
            UARTLCR_H => {
                if (self.lcr_h ^ val) & LCR_H_FEN != 0 {
                    self.rx.clear();
                }
                self.lcr_h = val & 0xff;
            }
            UARTCR => {
                let was_tx = self.cr & (CR_UARTEN | CR_TXE) == CR_UARTEN | CR_TXE;
                self.cr = val & 0xffff;
                let is_tx = self.cr & (CR_UARTEN | CR_TXE) == CR_UARTEN | CR_TXE;
                if is_tx && !was_tx {
                    self.tx_cleared = false;
                }
            }
            UARTIFLS => self.ifls = val & 0x3f,
            UARTIMSC => self.imsc = val & INT_ALL,
            UARTICR => {
                if val & INT_TX != 0 {
                    self.tx_cleared = true;
                }
                if val & INT_RX != 0 {
                    self.rx_cleared = true;
                }
                if val & INT_RT != 0 {
                    self.rt_cleared = true;
                }
            }
            UARTDMACR => self.dmacr = val & 0x7,
            // UARTFR, UARTRIS, UARTMIS and the ID registers are read-only; reserved: WI.
            _ => {}
        }
    }
}

impl MmioDevice for Vuart {
    fn access(&mut self, _vcpu: usize, acc: MmioAccess) -> MmioResult {
        if !acc.is_naturally_aligned() || acc.size > 4 || acc.offset >= PL011_SIZE {
            return MmioResult::Fault;
        }
        let reg = acc.offset & !3;
        let lane = (acc.offset & 3) * 8;
        match acc.data() {
            None => {
                // A narrow read of the upper lanes must not pop the RX FIFO.
                let v = if reg == UARTDR && lane != 0 {
                    0
                } else {
                    self.read_reg(reg)
                };
                MmioResult::Read((u64::from(v) >> lane) & acc.size_mask())
            }
            Some(v) => {
                if lane == 0 {
                    self.write_reg(reg, v as u32);
                }
                MmioResult::Written
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(u: &mut Vuart, off: u64) -> u32 {
        match u.access(0, MmioAccess::read(off, 4)) {
            MmioResult::Read(v) => v as u32,
            other => panic!("read {off:#x}: {other:?}"),
        }
    }

    fn wr(u: &mut Vuart, off: u64, v: u32) {
        assert_eq!(
            u.access(0, MmioAccess::write(off, 4, u64::from(v))),
            MmioResult::Written
        );
    }

    /// The register writes of Linux's `pl011_startup` / `pl011_set_termios`, reduced.
    fn linux_init(u: &mut Vuart) {
        wr(u, UARTCR, 0); // disable while configuring
        wr(u, UARTIMSC, 0);
        wr(u, UARTICR, INT_ALL);
        wr(u, UARTIFLS, 0x12); // RX 1/2, TX 1/2
        wr(u, UARTIBRD, 13);
        wr(u, UARTFBRD, 1);
        wr(u, UARTLCR_H, LCR_H_FEN | (3 << 5)); // 8N1, FIFOs on
        wr(u, UARTCR, CR_UARTEN | CR_TXE | CR_RXE);
        wr(u, UARTIMSC, INT_RX | INT_RT);
    }

    /// `validate`: a PL011 state restored from a snapshot keeps the FIFO and buffer bounds and
    /// register widths the emulation relies on.
    #[test]
    fn validate_refuses_what_the_model_cannot_reach() {
        let mut u = Vuart::new();
        linux_init(&mut u);
        for b in 0..RX_FIFO_DEPTH as u8 {
            assert!(u.push_rx(b));
        }
        wr(&mut u, UARTDR, b'x' as u32);
        u.validate().expect("a full FIFO after Linux's init");

        let mut u = Vuart::new();
        u.rx.extend([1, 2]); // FIFOs off: a one-byte holding register
        assert!(u.validate().unwrap_err().contains("FIFO"));
        let mut u = Vuart::new();
        u.lcr_h = LCR_H_FEN;
        u.rx.extend([0; RX_FIFO_DEPTH + 1]);
        assert!(u.validate().unwrap_err().contains("FIFO"));
        let mut u = Vuart::new();
        u.output = vec![0; OUTPUT_CAPACITY + 1];
        assert!(u.validate().unwrap_err().contains("output"));
        type Field = fn(&mut Vuart) -> &mut u32;
        let regs: [(Field, u32, &str); 8] = [
            (|u| &mut u.ilpr, 0x100, "UARTILPR"),
            (|u| &mut u.ibrd, 0x1_0000, "UARTIBRD"),
            (|u| &mut u.fbrd, 0x40, "UARTFBRD"),
            (|u| &mut u.lcr_h, 0x100, "UARTLCR_H"),
            (|u| &mut u.cr, 0x1_0000, "UARTCR"),
            (|u| &mut u.ifls, 0x40, "UARTIFLS"),
            (|u| &mut u.imsc, 0x800, "UARTIMSC"),
            (|u| &mut u.dmacr, 0x8, "UARTDMACR"),
        ];
        for (field, bit, name) in regs {
            let mut u = Vuart::new();
            *field(&mut u) |= bit;
            assert!(u.validate().unwrap_err().contains(name), "{name}");
        }
    }

    #[test]
    fn reset_values() {
        let mut u = Vuart::new();
        assert_eq!(rd(&mut u, UARTFR), FR_TXFE | FR_RXFE);
        assert_eq!(rd(&mut u, UARTCR), 0x300);
        assert_eq!(rd(&mut u, UARTIFLS), 0x12);
        assert_eq!(rd(&mut u, UARTIMSC), 0);
        assert_eq!(rd(&mut u, UARTRIS), 0, "UART disabled: no TX interrupt");
        assert!(!u.irq_level());
    }

    #[test]
    fn id_registers() {
        let mut u = Vuart::new();
        let ids: Vec<u32> = (0..8).map(|i| rd(&mut u, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        // AMBA bus: PeriphID = 0x00141011 -> part 0x011, designer 0x41 ('A'), revision 1.
        let pid = ids[..4]
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (b << (8 * i)));
        assert_eq!(pid & 0x000f_ffff, 0x0004_1011);
        // ID registers are read-only.
        wr(&mut u, 0xfe0, 0xff);
        assert_eq!(rd(&mut u, 0xfe0), 0x11);
    }

    #[test]
    fn linux_init_and_tx_line() {
        let mut u = Vuart::new();
        linux_init(&mut u);
        assert_eq!(rd(&mut u, UARTLCR_H), 0x70);
        assert_eq!(rd(&mut u, UARTIBRD), 13);
        assert_eq!(rd(&mut u, UARTFBRD), 1);
        assert!(!u.irq_level(), "TX interrupt raw but masked, RX empty");
        for b in b"hello, world\n" {
            assert_eq!(rd(&mut u, UARTFR) & FR_TXFF, 0);
            // Linux's amba-pl011 uses 16-bit accesses.
            assert_eq!(
                u.access(0, MmioAccess::write(UARTDR, 2, u64::from(*b))),
                MmioResult::Written
            );
        }
        assert_eq!(rd(&mut u, UARTFR) & (FR_TXFE | FR_BUSY), FR_TXFE);
        let out: Vec<u8> = u.take_output().collect();
        assert_eq!(out, b"hello, world\n");
        assert_eq!(u.take_output().count(), 0);
    }

    #[test]
    fn tx_interrupt_semantics() {
        let mut u = Vuart::new();
        linux_init(&mut u);
        // ICR cleared TX while disabled; re-enabling the transmitter raised it again.
        assert_eq!(rd(&mut u, UARTRIS) & INT_TX, INT_TX);
        wr(&mut u, UARTIMSC, INT_TX);
        assert!(u.irq_level());
        assert_eq!(rd(&mut u, UARTMIS), INT_TX);
        wr(&mut u, UARTICR, INT_TX);
        assert!(!u.irq_level());
        wr(&mut u, UARTDR, u32::from(b'x'));
        assert!(u.irq_level(), "FIFO drained again after the write");
        wr(&mut u, UARTCR, CR_UARTEN | CR_RXE);
        assert!(!u.irq_level(), "transmitter disabled");
        // earlycon-style byte write still transmits (the model does not gate TX on TXE).
        assert_eq!(
            u.access(0, MmioAccess::write(UARTDR, 1, 0x41)),
            MmioResult::Written
        );
        assert_eq!(u.take_output().collect::<Vec<_>>(), b"xA");
    }

    #[test]
    fn rx_with_interrupts() {
        let mut u = Vuart::new();
        linux_init(&mut u);
        assert!(!u.irq_level());
        assert!(u.push_rx(b'a'));
        // Below the 1/2 trigger: only the receive timeout interrupt.
        assert_eq!(rd(&mut u, UARTRIS) & (INT_RX | INT_RT), INT_RT);
        assert!(u.irq_level());
        assert_eq!(rd(&mut u, UARTFR) & FR_RXFE, 0);
        for b in 1..16u8 {
            assert!(u.push_rx(b));
        }
        assert_eq!(rd(&mut u, UARTMIS), INT_RX | INT_RT);
        // Drain like pl011_rx_chars: read DR while RXFE is clear.
        let mut got = Vec::new();
        while rd(&mut u, UARTFR) & FR_RXFE == 0 {
            got.push(rd(&mut u, UARTDR) as u8);
        }
        assert_eq!(got.len(), 16);
        assert_eq!(got[0], b'a');
        assert!(!u.irq_level());
        // Empty FIFO reads zero and does not underflow.
        assert_eq!(rd(&mut u, UARTDR), 0);
    }

    #[test]
    fn rx_masked_and_cleared() {
        let mut u = Vuart::new();
        linux_init(&mut u);
        wr(&mut u, UARTIMSC, 0);
        assert!(u.push_rx(b'z'));
        assert_eq!(rd(&mut u, UARTRIS) & INT_RT, INT_RT);
        assert!(!u.irq_level(), "masked");
        wr(&mut u, UARTIMSC, INT_RT);
        assert!(u.irq_level());
        wr(&mut u, UARTICR, INT_RT);
        assert!(!u.irq_level(), "cleared until more data arrives");
        assert!(u.push_rx(b'y'));
        assert!(u.irq_level());
        assert_eq!(u.rx_len(), 2);
    }

    #[test]
    fn rx_fifo_full() {
        let mut u = Vuart::new();
        linux_init(&mut u);
        for i in 0..RX_FIFO_DEPTH {
            assert!(u.push_rx(i as u8), "byte {i}");
        }
        assert!(!u.push_rx(0xff));
        assert_eq!(rd(&mut u, UARTFR) & FR_RXFF, FR_RXFF);
        assert_eq!(rd(&mut u, UARTDR), 0);
        assert_eq!(rd(&mut u, UARTFR) & FR_RXFF, 0);
        assert!(u.push_rx(0xff));
        // FIFOs off: a one-byte holding register; toggling FEN flushes.
        wr(&mut u, UARTLCR_H, 3 << 5);
        assert_eq!(u.rx_len(), 0);
        assert!(u.push_rx(1));
        assert!(!u.push_rx(2));
        assert_eq!(rd(&mut u, UARTFR) & (FR_RXFF | FR_RXFE), FR_RXFF);
    }

    #[test]
    fn loopback() {
        let mut u = Vuart::new();
        linux_init(&mut u);
        wr(&mut u, UARTCR, CR_UARTEN | CR_TXE | CR_RXE | CR_LBE);
        wr(&mut u, UARTDR, 0x55);
        assert_eq!(u.output_len(), 0);
        assert_eq!(rd(&mut u, UARTDR), 0x55);
    }

    #[test]
    fn widths_and_lanes() {
        let mut u = Vuart::new();
        assert_eq!(u.access(0, MmioAccess::read(UARTFR, 8)), MmioResult::Fault);
        assert_eq!(
            u.access(0, MmioAccess::read(UARTFR + 2, 4)),
            MmioResult::Fault
        );
        assert_eq!(
            u.access(0, MmioAccess::read(PL011_SIZE, 4)),
            MmioResult::Fault
        );
        assert_eq!(
            u.access(0, MmioAccess::read(UARTCR + 1, 1)),
            MmioResult::Read(0x3)
        );
        assert_eq!(
            u.access(0, MmioAccess::read(UARTFR, 1)),
            MmioResult::Read(u64::from(FR_TXFE | FR_RXFE))
        );
        // Upper-lane write is ignored, upper-lane DR read does not pop.
        assert_eq!(
            u.access(0, MmioAccess::write(UARTCR + 1, 1, 0)),
            MmioResult::Written
        );
        assert_eq!(rd(&mut u, UARTCR), 0x300);
        assert!(u.push_rx(7));
        assert_eq!(u.access(0, MmioAccess::read(1, 1)), MmioResult::Read(0));
        assert_eq!(u.rx_len(), 1);
        // Reserved offsets are RAZ/WI.
        wr(&mut u, 0x100, 0xffff_ffff);
        assert_eq!(rd(&mut u, 0x100), 0);
    }

    #[test]
    fn output_is_bounded() {
        let mut u = Vuart::new();
        for _ in 0..OUTPUT_CAPACITY + 3 {
            wr(&mut u, UARTDR, u32::from(b'.'));
        }
        assert_eq!(u.output_len(), OUTPUT_CAPACITY);
        assert_eq!(u.tx_dropped(), 3);
    }

    #[test]
    fn clone_is_independent() {
        let mut u = Vuart::new();
        linux_init(&mut u);
        assert!(u.push_rx(1));
        let mut child = u.clone();
        assert_eq!(rd(&mut child, UARTDR), 1);
        assert_eq!(u.rx_len(), 1);
        assert_eq!(child.rx_len(), 0);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Copy, Debug)]
        enum Op {
            Push(u8),
            ReadDr,
            Write(u8),
            Imsc(u32),
            Ifls(u32),
            Fen(bool),
            Icr(u32),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => any::<u8>().prop_map(Op::Push),
                3 => Just(Op::ReadDr),
                2 => any::<u8>().prop_map(Op::Write),
                1 => (0..0x800u32).prop_map(Op::Imsc),
                1 => (0..0x40u32).prop_map(Op::Ifls),
                1 => prop_oneof![9 => Just(true), 1 => Just(false)].prop_map(Op::Fen),
                1 => (0..0x800u32).prop_map(Op::Icr),
            ]
        }

        proptest! {
            /// The RX FIFO behaves as a bounded queue, TX output is exactly what was written,
            /// flags agree with the queue, and the interrupt line is (RIS & IMSC) != 0.
            #[test]
            fn fifo_and_flags_match_reference(ops in proptest::collection::vec(op(), 1..200)) {
                let mut u = Vuart::new();
                linux_init(&mut u);
                let mut rx: VecDeque<u8> = VecDeque::new();
                let mut tx = Vec::new();
                let mut fen = true;
                for op in ops {
                    match op {
                        Op::Push(b) => {
                            let cap = if fen { RX_FIFO_DEPTH } else { 1 };
                            let ok = u.push_rx(b);
                            prop_assert_eq!(ok, rx.len() < cap);
                            if ok {
                                rx.push_back(b);
                            }
                        }
                        Op::ReadDr => {
                            prop_assert_eq!(rd(&mut u, UARTDR), rx.pop_front().map_or(0, u32::from));
                        }
                        Op::Write(b) => {
                            wr(&mut u, UARTDR, u32::from(b));
                            tx.push(b);
                        }
                        Op::Imsc(m) => wr(&mut u, UARTIMSC, m),
                        Op::Ifls(v) => wr(&mut u, UARTIFLS, v),
                        Op::Fen(on) => {
                            wr(&mut u, UARTLCR_H, (3 << 5) | if on { LCR_H_FEN } else { 0 });
                            if on != fen {
                                rx.clear();
                            }
                            fen = on;
                        }
                        Op::Icr(v) => wr(&mut u, UARTICR, v),
                    }
                    let fr = rd(&mut u, UARTFR);
                    prop_assert_eq!(fr & FR_RXFE != 0, rx.is_empty());
                    let cap = if fen { RX_FIFO_DEPTH } else { 1 };
                    prop_assert_eq!(fr & FR_RXFF != 0, rx.len() >= cap);
                    prop_assert_eq!(fr & (FR_TXFE | FR_TXFF | FR_BUSY), FR_TXFE);
                    let ris = rd(&mut u, UARTRIS);
                    let imsc = rd(&mut u, UARTIMSC);
                    prop_assert_eq!(rd(&mut u, UARTMIS), ris & imsc);
                    prop_assert_eq!(u.irq_level(), ris & imsc != 0);
                    if rx.is_empty() {
                        prop_assert_eq!(ris & (INT_RX | INT_RT), 0);
                    }
                    prop_assert_eq!(ris & !(INT_RX | INT_RT | INT_TX), 0);
                }
                prop_assert_eq!(u.take_output().collect::<Vec<_>>(), tx);
            }
        }
    }
}
