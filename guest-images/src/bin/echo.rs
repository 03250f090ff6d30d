//! `echo`: console input through the PL011 receive interrupt. Unmasks the UART's receive and
//! receive-timeout interrupts, routes its SPI (INTID 33 on `virt`, from the DTB) through the
//! GICv3 distributor to the boot CPU, and sleeps in WFI. The IRQ handler drains the receive FIFO
//! and prints `echo: <line>` for every complete line; `quit` prints `echo: bye` and powers off.
//! The main loop never touches the UART, so every echoed byte came through the interrupt.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use vmfork_guests::line::{LineAssembler, Printable};
    use vmfork_guests::{console, exit, fail, gic, println, sysreg, BootInfo};

    /// Lines are assembled in the handler only; the lock is never contended.
    static LINE: spin::Mutex<LineAssembler> = spin::Mutex::new(LineAssembler::new());

    fn on_uart(_intid: u32) {
        let mut line = LINE.lock();
        // Read while UARTFR.RXFE is clear: an empty FIFO lowers the interrupt line.
        while let Some(byte) = console::read_byte() {
            let Some(text) = line.push(byte) else {
                continue;
            };
            if text == b"quit" {
                println!("echo: bye");
                exit::power_off();
            }
            println!("echo: {}", Printable(text));
        }
    }

    fn main(boot: &'static BootInfo) -> ! {
        let Some(intid) = boot.platform.uart_intid else {
            fail!("echo: FAIL the DTB gives the pl011 no SPI or PPI interrupt");
        };
        if let Err(e) = gic::init() {
            fail!("echo: FAIL {e}");
        }
        if let Err(e) = gic::set_handler(intid, on_uart) {
            fail!("echo: FAIL {e}");
        }
        console::enable_rx_interrupts();
        if let Err(e) = gic::enable_spi(intid, gic::DEFAULT_PRIORITY, sysreg::mpidr_affinity()) {
            fail!("echo: FAIL {e}");
        }
        if boot.platform.bootargs.has("verbose") {
            println!("echo: uart INTID {intid}");
        }
        println!("echo: ready");
        sysreg::irq_enable();
        loop {
            // Everything happens in the handler; WFI returns after each interrupt.
            sysreg::wfi();
        }
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("echo is an aarch64-unknown-none guest image; run it under QEMU");
}
