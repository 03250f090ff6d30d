//! vmfork monitor: the EL2 hypervisor image for QEMU's `virt` board.
//!
//! Boot order on the boot CPU: vectors, find the DTB, heap, MMU and caches, full device-tree
//! parse, console and logger, frame allocator, secondary CPUs through PSCI `CPU_ON`, then the
//! single line `monitor: ready cpus=<N> mem=<MiB>`.
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

extern crate alloc;

mod arch;
mod bench;
mod console;
mod control;
mod fwcfg;
mod guests;
mod heap;
mod kick;
mod mem;
mod physmem;
mod sched;
mod vm;

use core::sync::atomic::{AtomicUsize, Ordering};

use alloc::vec::Vec;
use vmfork_core::platform::{self, Platform};

use arch::percpu;

/// Addresses below RAM on the virt board are all device registers (GIC, UART, RTC, fw_cfg,
/// GPIO, virtio-mmio, PCIe windows): mapped as Device memory.
const DEVICE_WINDOW: (u64, u64) = (0, 0x4000_0000);
/// Where QEMU puts its DTB for an ELF kernel when x0 does not say.
const RAM_BASE_DTB: usize = 0x4000_0000;
/// Fixed part of the heap; the rest grows with RAM (1/16 of it): frame metadata (8 bytes per
/// 4 KiB frame) and guest images read from fw_cfg before they are copied into guest RAM.
/// `heap_mib=` on the command line raises the whole heap to that size.
const HEAP_FIXED: u64 = 16 << 20;

pub use arch::semihosting::{EXIT_EXCEPTION, EXIT_PANIC};

/// Number of CPUs that have finished their bring-up.
static ONLINE: AtomicUsize = AtomicUsize::new(0);

/// Stops the whole machine with `code` as QEMU's exit status (semihosting), or powers it off.
pub fn fatal_stop(code: u32) -> ! {
    arch::semihosting::exit(code)
}

fn fatal(msg: &str) -> ! {
    console::emergency_print(format_args!("monitor: fatal: {msg}\n"));
    fatal_stop(EXIT_PANIC)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::emergency_print(format_args!(
        "monitor: panic on cpu{}: {}\n",
        percpu::cpu_index(),
        info
    ));
    fatal_stop(EXIT_PANIC)
}

fn has_dtb_magic(addr: usize) -> bool {
    if addr == 0 || !addr.is_multiple_of(8) {
        return false;
    }
    // SAFETY: `addr` is either what the loader passed in x0 or the start of RAM; both are RAM on
    // this board, and a 4-byte aligned volatile read of RAM has no side effects.
    let magic = unsafe { core::ptr::read_volatile(addr as *const u32) };
    u32::from_be(magic) == 0xd00d_feed
}

/// Finds the DTB: x0 if it points at one, else the start of RAM (QEMU's place for ELF kernels).
fn locate_dtb(x0: usize) -> Option<&'static [u8]> {
    let addr = [x0, RAM_BASE_DTB].into_iter().find(|&a| has_dtb_magic(a))?;
    // SAFETY: a DTB header is 40 bytes and the magic says one starts at `addr`.
    let header = unsafe { core::slice::from_raw_parts(addr as *const u8, 40) };
    let size = platform::blob_size(header).ok()?;
    // SAFETY: the header says the blob is `size` bytes long; QEMU placed it in RAM, which the
    // monitor never hands out (the frame allocator reserves the blob).
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, size) })
}

/// Picks the heap: page-aligned, right after the image, inside the RAM bank that holds the image.
fn heap_range(dtb: &[u8], image_end: u64) -> Option<(u64, u64)> {
    let fdt = fdt::Fdt::new(dtb).ok()?;
    let bank = fdt.memory().regions().find(|r| {
        let start = r.starting_address as u64;
        let end = start + r.size.unwrap_or(0) as u64;
        (start..end).contains(&image_end)
    })?;
    let bank_end = bank.starting_address as u64 + bank.size.unwrap_or(0) as u64;
    let total: u64 = fdt
        .memory()
        .regions()
        .map(|r| r.size.unwrap_or(0) as u64)
        .sum();
    let start = (image_end + 0xfff) & !0xfff;
    // `heap_mib=` raises it (bounded: `cmdline::heap_mib`), never below the default, which
    // the frame metadata and the guest images need; a bad value is reported once the log is
    // up (`boot`) and the default used.
    let bootargs = fdt.chosen().bootargs().unwrap_or("");
    let default = HEAP_FIXED + total / 16;
    let want = match vmfork_core::cmdline::heap_mib(bootargs) {
        Ok(Some(mib)) => (mib << 20).max(default),
        _ => default,
    };
    let end = (start + want).min(start + (bank_end - start) / 2) & !0xfff;
    (end > start).then_some((start, end))
}

#[no_mangle]
extern "C" fn rust_main_el2(x0: usize) -> ! {
    percpu::set_cpu_index(0);
    // A fatal exception from here on prints its dump on the console.
    arch::exception::set_fatal_printer(console::emergency_print);
    arch::entry::install_vectors();
    let Some(dtb) = locate_dtb(x0) else {
        fatal("no device tree: neither x0 nor the start of RAM holds one")
    };
    let (image_start, image_end) = arch::boot::image_range();
    let Some((heap_start, heap_end)) = heap_range(dtb, image_end) else {
        fatal("no room for the heap after the image in RAM")
    };
    // SAFETY: [heap_start, heap_end) is RAM after the image and its stacks, inside the RAM bank
    // the DTB describes, and nothing else uses it; this runs once.
    unsafe { heap::init(heap_start, heap_end - heap_start) };

    let platform = match platform::parse(dtb) {
        Ok(p) => p,
        Err(e) => fatal(&alloc::format!("cannot parse the device tree: {e}")),
    };
    let ram: Vec<(u64, u64)> = platform
        .ram
        .iter()
        .map(|r| (r.base, r.base + r.size))
        .collect();
    // Everything written so far went to memory with the caches off; drop stale lines first.
    arch::mmu::invalidate_dcache_range(image_start, heap_end);
    if let Err(e) = arch::mmu::init(DEVICE_WINDOW, &ram) {
        fatal(&alloc::format!("cannot build the EL2 identity map: {e}"));
    }
    boot(
        dtb,
        platform,
        (image_start, image_end),
        (heap_start, heap_end),
    )
}

fn boot(dtb: &[u8], platform: Platform, image: (u64, u64), heap: (u64, u64)) -> ! {
    if let Some(uart) = &platform.uart {
        console::set_uart_base(uart.region.base as usize);
    }
    let bootargs = platform.bootargs.as_deref().unwrap_or("");
    let level = vmfork_core::cmdline::log_level(bootargs);
    console::init_logger(level.as_ref().copied().unwrap_or(log::LevelFilter::Info));
    if let Err(e) = &level {
        log::warn!("{e}; using log=info");
    }
    log::info!(
        "vmfork monitor {} at EL{}",
        env!("CARGO_PKG_VERSION"),
        arch::current_el()
    );
    let dtb_range = (dtb.as_ptr() as u64, dtb.as_ptr() as u64 + dtb.len() as u64);
    log::debug!("device tree at {:#x}..{:#x}", dtb_range.0, dtb_range.1);
    log::debug!(
        "image {:#x}..{:#x}, heap {:#x}..{:#x}",
        image.0,
        image.1,
        heap.0,
        heap.1
    );
    for r in &platform.ram {
        log::debug!("ram {:#x}..{:#x}", r.base, r.base + r.size);
    }
    log::debug!(
        "{} cpus, uart {:x?}, gic {:x?}, psci {:?}, {} virtio-mmio slots, fw_cfg {:x?}",
        platform.cpus.len(),
        platform.uart.as_ref().map(|u| u.region.base),
        platform
            .gic
            .as_ref()
            .map(|g| (g.version, g.distributor.base)),
        platform.psci,
        platform.virtio_mmio.len(),
        platform.fw_cfg.as_ref().map(|r| r.base)
    );
    if let Some(psci) = platform.psci {
        arch::psci::set_conduit(psci);
    }
    if let Err(e) = mem::init(&platform.ram, &[dtb_range, image, heap]) {
        fatal(&alloc::format!("cannot set up the frame allocator: {e}"));
    }
    let (free, total) = mem::frame_counts();
    log::debug!("frames: {free} free of {total}");
    fwcfg::log_guests(&platform, bootargs);

    if let Err(e) = arch::init_interrupts_boot(&platform) {
        fatal(&alloc::format!(
            "cannot set up the interrupt controller: {e}"
        ));
    }
    if let Some(uart) = &platform.uart {
        console::set_uart_intid(uart.intid.unwrap_or(0));
    }
    sched::init_cpu(0);
    let (mut limits, bad) = vmfork_core::cmdline::limits(bootargs);
    if let Some((key, e)) = bad {
        log::warn!("{key}=: {e}; its default is kept");
    }
    if let Err(e) = vmfork_core::cmdline::heap_mib(bootargs) {
        log::warn!("heap_mib=: {e}; the default heap (16 MiB + RAM/16) is used");
    }
    limits.max_upload_bytes = Some(limits.max_upload_bytes.unwrap_or(heap::size() as u64 / 2));
    log::info!(
        "limits: max_vms={} max_forks_per_tree={} max_uploads={} max_upload_bytes={} max_stopped={}; heap {} KiB, reserve {} KiB",
        limits.max_vms,
        limits.max_forks_per_tree,
        limits.max_uploads,
        limits.max_upload_bytes.unwrap_or(0),
        limits.max_stopped,
        heap::size() >> 10,
        heap::margin() >> 10
    );
    vm::VMS.lock().limits = limits;
    control::init(&platform, bootargs);
    let guests = guests::create_boot_guests(&platform);
    let cpus = start_secondaries(&platform);
    let ram_mib: u64 = platform.ram.iter().map(|r| r.size).sum::<u64>() >> 20;
    println!("monitor: ready cpus={cpus} mem={ram_mib}");
    log::info!("{guests} guest(s) started");
    if let Some(b) = vmfork_core::cmdline::value(bootargs, "bench") {
        // `make bench`: bench.rs, then QEMU exits. The other CPUs idle, or schedule vCPUs for
        // the phase that measures them.
        let others = if bench::wants_schedulers(b) {
            START_SCHEDULER
        } else {
            START_IDLE
        };
        START.store(others, Ordering::SeqCst);
        bench::run(b, cpus)
    }
    let test = vmfork_core::cmdline::value(bootargs, "selftest");
    if test.is_some() {
        // Self-tests take over the CPUs: secondaries wait for interrupts instead of scheduling.
        START.store(START_IDLE, Ordering::SeqCst);
        selftest(test);
        idle()
    }
    if control::echo_enabled() {
        START.store(START_IDLE, Ordering::SeqCst);
        control::echo_forever()
    }
    START.store(START_SCHEDULER, Ordering::SeqCst);
    sched::run(0)
}

/// What secondary CPUs do once the boot CPU is ready: nothing yet, schedule vCPUs, or idle.
static START: AtomicUsize = AtomicUsize::new(START_WAIT);
const START_WAIT: usize = 0;
const START_SCHEDULER: usize = 1;
const START_IDLE: usize = 2;

/// `selftest=panic|fault` on the command line makes the monitor fail on purpose once it is ready,
/// so that tests can check what a panic or an unexpected exception prints and how QEMU exits;
/// `selftest=irq` checks timer interrupts and SGIs on every CPU (`arch::gic::irq_selftest`).
fn selftest(what: Option<&str>) {
    match what {
        None => {}
        Some("panic") => panic!("selftest: panic requested on the command line"),
        Some("irq") => arch::gic::irq_selftest(),
        Some("fault") => {
            // An address far above RAM that the identity map leaves unmapped.
            let addr = 0x40_0000_0000usize as *const u64;
            // SAFETY: not sound on purpose: the read faults and the exception handler stops the
            // machine; nothing is read.
            let v = unsafe { core::ptr::read_volatile(addr) };
            log::error!("selftest: read of unmapped {addr:p} returned {v:#x}");
        }
        Some(other) => log::warn!("unknown selftest={other}; expected panic, fault or irq"),
    }
}

/// Starts every other CPU of the device tree and waits for each to come online.
fn start_secondaries(platform: &Platform) -> usize {
    ONLINE.store(1, Ordering::SeqCst);
    let me = arch::mpidr_affinity();
    let others: Vec<u64> = platform
        .cpus
        .iter()
        .map(|c| c.mpidr)
        .filter(|&m| m != me)
        .take(arch::boot::MAX_CPUS - 1)
        .collect();
    if platform.cpus.len() > arch::boot::MAX_CPUS {
        log::warn!(
            "{} CPUs in the device tree; the monitor drives the first {}",
            platform.cpus.len(),
            arch::boot::MAX_CPUS
        );
    }
    let entry = arch::boot::_secondary_start as *const () as u64;
    let mut started = 1;
    for (i, &mpidr) in others.iter().enumerate() {
        let index = i + 1;
        log::debug!("starting cpu{index} (MPIDR {mpidr:#x})");
        match arch::psci::cpu_on(mpidr, entry, index as u64) {
            Ok(()) => started += 1,
            Err(e) => log::error!("PSCI CPU_ON for MPIDR {mpidr:#x} failed: {e:?}"),
        }
    }
    // Wait (up to two seconds of counter time) for the started CPUs to check in.
    let (t0, freq) = arch::counter();
    while ONLINE.load(Ordering::SeqCst) < started {
        let (now, _) = arch::counter();
        if now.wrapping_sub(t0) > 2 * freq {
            log::error!(
                "only {} of {} CPUs came online",
                ONLINE.load(Ordering::SeqCst),
                started
            );
            break;
        }
        core::hint::spin_loop();
    }
    ONLINE.load(Ordering::SeqCst)
}

#[no_mangle]
extern "C" fn rust_main_secondary(index: usize) -> ! {
    percpu::set_cpu_index(index);
    arch::entry::install_vectors();
    arch::mmu::enable_on_this_cpu();
    if let Err(e) = arch::init_interrupts_this_cpu(index) {
        log::error!("cpu{index}: cannot set up its interrupt controller interface: {e}");
    }
    sched::init_cpu(index);
    log::debug!("cpu{index} online (MPIDR {:#x})", arch::mpidr_affinity());
    ONLINE.fetch_add(1, Ordering::SeqCst);
    loop {
        match START.load(Ordering::SeqCst) {
            START_SCHEDULER => sched::run(index),
            START_IDLE => idle(),
            _ => core::hint::spin_loop(),
        }
    }
}

/// Waits for interrupts (IPIs, timer) forever, handling them as they come.
fn idle() -> ! {
    arch::gic::irq_enable();
    loop {
        aarch64_cpu::asm::wfi();
    }
}

/// Entered at any exception level other than EL2: say what is needed and power off.
#[no_mangle]
extern "C" fn rust_main_wrong_el(x0: usize, el: u64) -> ! {
    // TPIDR_EL2 and every other EL2 register are undefined below EL2: print without the lock.
    console::print_unlocked(format_args!(
        "needs EL2: start QEMU with -M virt,virtualization=on (the monitor was entered at EL{el})\n"
    ));
    // Power off through the conduit the device tree names (HVC when QEMU has no EL2).
    let conduit = locate_dtb(x0)
        .and_then(|dtb| fdt::Fdt::new(dtb).ok())
        .and_then(|fdt| {
            fdt.find_node("/psci")
                .and_then(|n| n.property("method"))
                .and_then(|p| p.as_str())
                .map(|m| {
                    if m == "smc" {
                        platform::PsciConduit::Smc
                    } else {
                        platform::PsciConduit::Hvc
                    }
                })
        })
        .unwrap_or(platform::PsciConduit::Hvc);
    arch::psci::set_conduit(conduit);
    arch::psci::system_off()
}
