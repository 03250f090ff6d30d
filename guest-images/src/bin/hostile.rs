//! `hostile`: attacks the monitor from EL1 and checks every answer is the architected one.
//!
//! Each attack prints `hostile: PASS <name> ...` or `hostile: FAIL <name>: <why>`; at the end
//! `hostile: done failed=<n>`. `attack=a,b,...` picks attacks (default: all, in this order):
//!
//! - `mmio`: reads of 1, 2, 4 and 8 bytes at known, reserved and unaligned offsets of every
//!   emulated device (GIC distributor and redistributor, PL011, vmgenid page) and writes to
//!   read-only and reserved ones: each gives a value or a synchronous external abort with FAR =
//!   the address (an unaligned access to Device memory: an alignment fault), and a few
//!   architected values are checked (GICD_PIDR2.ArchRev = 3, GICR_TYPER's affinity, the
//!   vmgenid ID unchanged by writes, which abort).
//! - `pairs`: LDP/STP, post-indexed loads and an LSE atomic on device registers (ESR ISV = 0):
//!   a synchronous external abort each.
//! - `cmo`: DC CIVAC, CVAC and CVAU by VA on device registers, a hole and the vmgenid page
//!   complete without an exception, as on hardware.
//! - `endian`: with SCTLR_EL1.EE = 1, MMIO loads see the device's bytes reversed and stores
//!   reach it reversed (32- and 64-bit), 8-bit accesses are unchanged.
//! - `sgi`: `sgis=N` random ICC_SGI1R_EL1 writes (default 10000); then ICC_SGI0R_EL1 and
//!   ICC_ASGI1R_EL1 make a Group 0 SGI pending and not a Group 1 one, ICC_SGI1R_EL1 either
//!   (GICD_CTLR.DS = 1); reading ICC_SGI0R_EL1 is UNDEFINED.
//! - `psci`: CPU_ON with MPIDRs with bits outside Aff3..Aff0 answers INVALID_PARAMETERS (so
//!   does AFFINITY_INFO: `psci-mpidr`), with entry points outside RAM INVALID_ADDRESS
//!   (`psci-entry`); a good CPU_ON starts the CPU (`psci-start`); CPU_SUSPEND, which
//!   PSCI_FEATURES advertises, waits for the timer and returns SUCCESS (`psci-suspend`).
//! - `hvc`: `calls=N` (default 10000) HVC and SMC calls with fixed-seed random function IDs
//!   and arguments (never one that changes state): unknown IDs answer NOT_SUPPORTED, X4-X7 are
//!   preserved.
//! - `ipa`: loads and stores outside RAM and outside the IPA space: a synchronous external
//!   abort below the PA size, an address size fault at and above it.
//! - `exec`: a branch to the vmgenid page (mapped execute-never) gets an instruction abort.
//! - `flood` (not in the default list): `aborts=N` (default 2000) loads from a hole, each a
//!   synchronous external abort the monitor would log.
//!
//! `then=spin` makes it wait forever after the attacks instead of powering off (so a test can
//! kill it).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    use core::arch::{asm, global_asm};
    use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use vmfork_guests::exceptions::{set_sync_handler, ExceptionFrame};
    use vmfork_guests::hostile_abi::{
        big_endian_image, is_address_size_fault, is_known, pa_bits, random_function, sgi_value,
        Prng, FSC_ALIGNMENT, FSC_SYNC_EXTERNAL, NOT_SUPPORTED_W0,
    };
    use vmfork_guests::psci_abi::Conduit;
    use vmfork_guests::{exit, gic, println, psci, runtime, smp, sysreg, timer, BootInfo};

    /// Failed checks so far.
    static FAILED: AtomicUsize = AtomicUsize::new(0);

    /// The last synchronous exception the handler took (0 = none), and its FAR.
    static TRAP_ESR: AtomicU64 = AtomicU64::new(0);
    static TRAP_FAR: AtomicU64 = AtomicU64::new(0);

    /// Data aborts (EC 0x25) and UNDEFINED (EC 0) skip the instruction; an instruction abort
    /// (EC 0x21, from `exec`) returns to the caller of the branch (x30).
    fn on_sync(esr: u64, far: u64, frame: &mut ExceptionFrame) -> bool {
        match esr >> 26 {
            0x25 | 0x00 => frame.elr += 4,
            0x21 => frame.elr = frame.lr,
            _ => return false,
        }
        TRAP_FAR.store(far, Ordering::SeqCst);
        TRAP_ESR.store(esr, Ordering::SeqCst);
        true
    }

    fn take_trap() -> Option<(u64, u64)> {
        let esr = TRAP_ESR.swap(0, Ordering::SeqCst);
        (esr != 0).then(|| (esr, TRAP_FAR.load(Ordering::SeqCst)))
    }

    macro_rules! check {
        ($name:expr, $cond:expr, $($why:tt)+) => {
            if !$cond {
                FAILED.fetch_add(1, Ordering::SeqCst);
                println!("hostile: FAIL {}: {}", $name, format_args!($($why)+));
                return;
            }
        };
    }

    /// What one access did.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Outcome {
        /// It completed (the value loaded; 0 for a store).
        Value(u64),
        /// It took a data abort with this ESR_EL1 and FAR_EL1.
        Abort(u64, u64),
        /// Another synchronous exception (ESR_EL1).
        Other(u64),
    }

    fn outcome(value: u64) -> Outcome {
        match take_trap() {
            None => Outcome::Value(value),
            Some((esr, far)) if esr >> 26 == 0x25 => Outcome::Abort(esr, far),
            Some((esr, _)) => Outcome::Other(esr),
        }
    }

    /// A load of `size` bytes at `addr` (it may abort; the handler skips it).
    fn load(addr: u64, size: u8) -> Outcome {
        let mut v: u64 = 0xdead_beef_dead_beef;
        take_trap();
        // SAFETY: not sound by design: the address is a device register, a hole or outside
        // the IPA space, and the access may abort; the handler skips the instruction, and the
        // asm touches no Rust-visible memory.
        unsafe {
            match size {
                1 => {
                    asm!("ldrb {v:w}, [{a}]", v = inout(reg) v, a = in(reg) addr, options(nostack))
                }
                2 => {
                    asm!("ldrh {v:w}, [{a}]", v = inout(reg) v, a = in(reg) addr, options(nostack))
                }
                4 => asm!("ldr {v:w}, [{a}]", v = inout(reg) v, a = in(reg) addr, options(nostack)),
                _ => asm!("ldr {v}, [{a}]", v = inout(reg) v, a = in(reg) addr, options(nostack)),
            }
        }
        outcome(v)
    }

    /// A store of the low `size` bytes of `value` at `addr` (it may abort).
    fn store(addr: u64, size: u8, value: u64) -> Outcome {
        take_trap();
        // SAFETY: as for `load`.
        unsafe {
            match size {
                1 => {
                    asm!("strb {v:w}, [{a}]", v = in(reg) value, a = in(reg) addr, options(nostack))
                }
                2 => {
                    asm!("strh {v:w}, [{a}]", v = in(reg) value, a = in(reg) addr, options(nostack))
                }
                4 => {
                    asm!("str {v:w}, [{a}]", v = in(reg) value, a = in(reg) addr, options(nostack))
                }
                _ => asm!("str {v}, [{a}]", v = in(reg) value, a = in(reg) addr, options(nostack)),
            }
        }
        outcome(0)
    }

    /// Whether `o` is an architected answer to an access of `size` bytes at `addr` on an
    /// emulated device: a value, a synchronous external abort at exactly `addr`, or (unaligned:
    /// the MMU is off, so device accesses are Device memory) an alignment fault.
    fn architected(o: Outcome, addr: u64, size: u8) -> bool {
        match o {
            Outcome::Value(_) => true,
            Outcome::Abort(esr, far) => {
                let fsc = esr & 0x3f;
                far == addr
                    && (fsc == FSC_SYNC_EXTERNAL
                        || (fsc == FSC_ALIGNMENT && !addr.is_multiple_of(u64::from(size))))
            }
            Outcome::Other(_) => false,
        }
    }

    struct Devices {
        gicd: u64,
        gicr: u64,
        uart: u64,
        vmgenid: u64,
    }

    fn devices(boot: &BootInfo) -> Option<Devices> {
        let p = &boot.platform;
        let gic = p.gic?;
        Some(Devices {
            gicd: gic.distributor,
            gicr: gic.redistributors.base,
            uart: p.uart?,
            vmgenid: p.vmgenid?.base,
        })
    }

    fn attack_mmio(d: &Devices) {
        const NAME: &str = "mmio";
        // GICD: CTLR, TYPER, IIDR, reserved, SETSPI (WO), IGROUPR, ISENABLER, IPRIORITYR,
        // ITARGETSR (RAZ/WI with ARE), ICFGR, reserved, IROUTER<32>, a reserved page, PIDR2,
        // the last word, and unaligned ones.
        let gicd_offsets: &[u64] = &[
            0x0, 0x4, 0x8, 0x10, 0x40, 0x80, 0x100, 0x400, 0x800, 0xc00, 0xe00, 0x6100, 0xa000,
            0xffe8, 0xfffc, 0x1, 0x3, 0x6, 0x7ff9,
        ];
        // GICR (vCPU 0): CTLR, IIDR, TYPER, WAKER, reserved, PROPBASER, the SGI frame's
        // IGROUPR0, ISENABLER0, IPRIORITYR, ICFGR1, reserved, PIDR2, and unaligned ones; the
        // next frame pair (another vCPU's, or nothing).
        let gicr_offsets: &[u64] = &[
            0x0, 0x4, 0x8, 0x14, 0x40, 0x70, 0xfff8, 0x1_0080, 0x1_0100, 0x1_0400, 0x1_0c04,
            0x1_8000, 0xffe8, 0x2, 0x1_0081, 0x2_0008,
        ];
        // PL011: DR is left alone (a read would take typed input); FR, IBRD, CR, IMSC, RIS,
        // MIS, a reserved offset, PeriphID0, CellID3, unaligned.
        let uart_offsets: &[u64] = &[0x18, 0x24, 0x30, 0x38, 0x3c, 0x40, 0x90, 0xfe0, 0xffc, 0x19];
        let vmgenid_offsets: &[u64] = &[0x0, 0x8, 0xff8, 0x1, 0x7];
        let mut values = 0u32;
        let mut aborts = 0u32;
        for (base, offsets) in [
            (d.gicd, gicd_offsets),
            (d.gicr, gicr_offsets),
            (d.uart, uart_offsets),
            (d.vmgenid, vmgenid_offsets),
        ] {
            for &off in offsets {
                for size in [1u8, 2, 4, 8] {
                    let addr = base + off;
                    let o = load(addr, size);
                    check!(
                        NAME,
                        architected(o, addr, size),
                        "load {size} at {addr:#x}: {o:?}"
                    );
                    match o {
                        Outcome::Value(_) => values += 1,
                        _ => aborts += 1,
                    }
                }
            }
        }
        // Architected values: GICD_PIDR2.ArchRev (bits 7:4) = 3 for GICv3; GICR_TYPER's
        // Affinity_Value (63:32) is this CPU's (Aff0 = 0 for the boot CPU of a vmfork VM).
        let pidr2 = load(d.gicd + 0xffe8, 4);
        check!(
            NAME,
            matches!(pidr2, Outcome::Value(v) if (v >> 4) & 0xf == 3),
            "GICD_PIDR2 {pidr2:?}"
        );
        let typer = load(d.gicr + 0x8, 8);
        let aff = sysreg::mpidr_affinity();
        let want = ((aff >> 32) & 0xff) << 24 | (aff & 0xff_ffff);
        check!(
            NAME,
            matches!(typer, Outcome::Value(v) if v >> 32 == want),
            "GICR_TYPER {typer:?}"
        );
        // Writes to read-only and reserved registers, every width: ignored or aborted, and the
        // read-only values stay.
        let gicd_typer = load(d.gicd + 0x4, 4);
        for off in [0x4u64, 0x8, 0x10, 0xa000, 0xffe8] {
            for size in [1u8, 2, 4, 8] {
                let addr = d.gicd + off;
                let o = store(addr, size, 0xffff_ffff_ffff_ffff);
                check!(
                    NAME,
                    architected(o, addr, size),
                    "store {size} at {addr:#x}: {o:?}"
                );
            }
        }
        let again = load(d.gicd + 0x4, 4);
        check!(
            NAME,
            again == gicd_typer,
            "GICD_TYPER {gicd_typer:?} became {again:?}"
        );
        // The vmgenid page is read-only RAM: a store of any width aborts and changes nothing.
        let id = [load(d.vmgenid, 8), load(d.vmgenid + 8, 8)];
        for size in [1u8, 2, 4, 8] {
            let o = store(d.vmgenid + 8, size, 0x5a5a_5a5a_5a5a_5a5a);
            check!(
                NAME,
                matches!(o, Outcome::Abort(esr, far) if esr & 0x3f == FSC_SYNC_EXTERNAL && far == d.vmgenid + 8),
                "store {size} to the vmgenid page: {o:?}"
            );
        }
        let after = [load(d.vmgenid, 8), load(d.vmgenid + 8, 8)];
        check!(NAME, id == after, "vmgenid ID {id:?} changed to {after:?}");
        println!("hostile: PASS {NAME} values={values} aborts={aborts}");
    }

    fn attack_pairs(d: &Devices) {
        const NAME: &str = "pairs";
        let mut n = 0;
        // The vmgenid page is RAM, read-only: a load pair reads it like two loads, a store pair
        // aborts (a write to a read-only page also has ISV = 0 here).
        let id = [load(d.vmgenid, 8), load(d.vmgenid + 8, 8)];
        let (mut a, mut b) = (0u64, 0u64);
        take_trap();
        // SAFETY: a load pair from the (readable) vmgenid page.
        unsafe {
            asm!("ldp {a}, {b}, [{p}]", a = inout(reg) a, b = inout(reg) b, p = in(reg) d.vmgenid, options(nostack));
        }
        let o = outcome(0);
        check!(
            NAME,
            o == Outcome::Value(0) && id == [Outcome::Value(a), Outcome::Value(b)],
            "ldp of the vmgenid page: {o:?} {a:#x} {b:#x}, loads {id:?}"
        );
        take_trap();
        // SAFETY: a store pair to the read-only vmgenid page: it aborts and is skipped.
        unsafe {
            asm!("stp {a}, {b}, [{p}]", a = in(reg) !a, b = in(reg) !b, p = in(reg) d.vmgenid, options(nostack));
        }
        let o = outcome(0);
        check!(
            NAME,
            matches!(o, Outcome::Abort(esr, far) if esr & 0x3f == FSC_SYNC_EXTERNAL && far == d.vmgenid),
            "stp to the vmgenid page: {o:?}"
        );
        let after = [load(d.vmgenid, 8), load(d.vmgenid + 8, 8)];
        check!(NAME, after == id, "the vmgenid ID changed to {after:?}");
        n += 2;
        for addr in [d.gicd, d.gicd + 0x10, d.gicr + 0x1_0080, d.uart + 0x18] {
            let (mut a, mut b) = (1u64, 2u64);
            take_trap();
            // SAFETY: as for `load`: the access aborts (ISV = 0) and is skipped.
            unsafe {
                asm!("ldp {a}, {b}, [{p}]", a = inout(reg) a, b = inout(reg) b, p = in(reg) addr, options(nostack));
            }
            let o = outcome(a ^ b);
            check!(
                NAME,
                matches!(o, Outcome::Abort(esr, far) if esr & 0x3f == FSC_SYNC_EXTERNAL && far == addr),
                "ldp at {addr:#x}: {o:?}"
            );
            take_trap();
            // SAFETY: as above, for 32-bit pairs.
            unsafe {
                asm!("ldp {a:w}, {b:w}, [{p}]", a = out(reg) _, b = out(reg) _, p = in(reg) addr, options(nostack));
            }
            let o = outcome(0);
            check!(
                NAME,
                matches!(o, Outcome::Abort(..)),
                "ldp w at {addr:#x}: {o:?}"
            );
            take_trap();
            // SAFETY: as above, for a store pair (of zeroes).
            unsafe {
                asm!("stp xzr, xzr, [{p}]", p = in(reg) addr, options(nostack));
            }
            let o = outcome(0);
            check!(
                NAME,
                matches!(o, Outcome::Abort(..)),
                "stp at {addr:#x}: {o:?}"
            );
            let mut p = addr;
            take_trap();
            // SAFETY: as above; a post-indexed load (writeback: ISV = 0). The base register is
            // not written back when the load aborts.
            unsafe {
                asm!("ldr {v}, [{p}], #8", v = out(reg) _, p = inout(reg) p, options(nostack));
            }
            let o = outcome(0);
            check!(
                NAME,
                matches!(o, Outcome::Abort(..)) && p == addr,
                "post-indexed ldr at {addr:#x}: {o:?} base {p:#x}"
            );
            n += 4;
        }
        // An LSE atomic on a device register: ISV = 0, an abort (only if FEAT_LSE is there).
        let isar0: u64;
        // SAFETY: reading an ID register has no side effects.
        unsafe { asm!("mrs {}, id_aa64isar0_el1", out(reg) isar0, options(nomem, nostack)) };
        if (isar0 >> 20) & 0xf >= 2 {
            let addr = d.gicd + 0x10;
            take_trap();
            // SAFETY: as above.
            unsafe {
                asm!(".arch_extension lse", "ldadd {i}, {o}, [{p}]", i = in(reg) 1u64, o = out(reg) _, p = in(reg) addr, options(nostack));
            }
            let o = outcome(0);
            check!(
                NAME,
                matches!(o, Outcome::Abort(esr, _) if esr & 0x3f == FSC_SYNC_EXTERNAL),
                "ldadd at {addr:#x}: {o:?}"
            );
            n += 1;
        }
        println!("hostile: PASS {NAME} accesses={n}");
    }

    /// Data cache maintenance by VA on device registers, a hole and the read-only vmgenid page
    /// completes like on hardware (nothing there is cached): no exception.
    fn attack_cmo(d: &Devices) {
        const NAME: &str = "cmo";
        let mut n = 0;
        for addr in [
            d.gicd,
            d.gicr + 0x1_0000,
            d.uart,
            d.vmgenid,
            0x0b00_0000,
            1 << 39,
        ] {
            take_trap();
            // SAFETY: cache maintenance by VA changes no memory contents (DC IVAC is not used:
            // on RAM it could discard data).
            unsafe {
                asm!("dc civac, {a}", "dc cvac, {a}", "dc cvau, {a}", "dsb sy",
                    a = in(reg) addr, options(nostack));
            }
            let t = take_trap();
            check!(
                NAME,
                t.is_none(),
                "DC CIVAC/CVAC/CVAU at {addr:#x}: exception {t:x?}"
            );
            n += 3;
        }
        println!("hostile: PASS {NAME} operations={n}");
    }

    /// One MMIO access with SCTLR_EL1.EE = 1 for just that instruction (nothing else runs with
    /// big-endian data: no stack, no Rust code in between).
    fn big_endian_access(addr: u64, size: u8, write: Option<u64>) -> u64 {
        let sctlr = sysreg::sctlr_el1();
        let be = sctlr | (1 << 25);
        let mut v = write.unwrap_or(0);
        // SAFETY: EE only changes the endianness of explicit data accesses (and stage-1 walks:
        // the MMU is off); the one access between the two SCTLR writes is a device register, and
        // the ISBs make each SCTLR write take effect before the next instruction.
        unsafe {
            match (size, write.is_some()) {
                (4, false) => {
                    asm!("msr sctlr_el1, {be}", "isb", "ldr {v:w}, [{a}]", "msr sctlr_el1, {le}", "isb",
                    be = in(reg) be, le = in(reg) sctlr, v = inout(reg) v, a = in(reg) addr, options(nostack))
                }
                (4, true) => {
                    asm!("msr sctlr_el1, {be}", "isb", "str {v:w}, [{a}]", "msr sctlr_el1, {le}", "isb",
                    be = in(reg) be, le = in(reg) sctlr, v = in(reg) v, a = in(reg) addr, options(nostack))
                }
                (8, false) => {
                    asm!("msr sctlr_el1, {be}", "isb", "ldr {v}, [{a}]", "msr sctlr_el1, {le}", "isb",
                    be = in(reg) be, le = in(reg) sctlr, v = inout(reg) v, a = in(reg) addr, options(nostack))
                }
                (8, true) => {
                    asm!("msr sctlr_el1, {be}", "isb", "str {v}, [{a}]", "msr sctlr_el1, {le}", "isb",
                    be = in(reg) be, le = in(reg) sctlr, v = in(reg) v, a = in(reg) addr, options(nostack))
                }
                (_, false) => {
                    asm!("msr sctlr_el1, {be}", "isb", "ldrb {v:w}, [{a}]", "msr sctlr_el1, {le}", "isb",
                    be = in(reg) be, le = in(reg) sctlr, v = inout(reg) v, a = in(reg) addr, options(nostack))
                }
                (_, true) => {
                    asm!("msr sctlr_el1, {be}", "isb", "strb {v:w}, [{a}]", "msr sctlr_el1, {le}", "isb",
                    be = in(reg) be, le = in(reg) sctlr, v = in(reg) v, a = in(reg) addr, options(nostack))
                }
            }
        }
        v
    }

    fn attack_endian(d: &Devices) {
        const NAME: &str = "endian";
        let mmfr0: u64;
        // SAFETY: reading an ID register has no side effects.
        unsafe { asm!("mrs {}, id_aa64mmfr0_el1", out(reg) mmfr0, options(nomem, nostack)) };
        if (mmfr0 >> 8) & 0xf == 0 {
            println!("hostile: PASS {NAME} skipped: no mixed-endian support (BigEnd = 0)");
            return;
        }
        let value = |o: Outcome| match o {
            Outcome::Value(v) => v,
            _ => u64::MAX,
        };
        // A read-only register: the big-endian load sees its bytes reversed.
        let typer = value(load(d.gicd + 0x4, 4));
        let be = big_endian_access(d.gicd + 0x4, 4, None);
        check!(
            NAME,
            be == big_endian_image(typer, 4),
            "GICD_TYPER {typer:#x} read big-endian as {be:#x}"
        );
        // A byte is a byte.
        let prio = d.gicd + 0x420;
        let b = value(load(prio, 1));
        let be = big_endian_access(prio, 1, None);
        check!(
            NAME,
            be == b,
            "GICD_IPRIORITYR byte {b:#x} read big-endian as {be:#x}"
        );
        // A 32-bit store reaches the device reversed (priorities with their low bits clear,
        // so every implemented priority width keeps them).
        big_endian_access(prio, 4, Some(0x1020_3040));
        let le = value(load(prio, 4));
        check!(
            NAME,
            le == 0x4030_2010,
            "GICD_IPRIORITYR8 after a big-endian store of 0x10203040: {le:#x}"
        );
        // A 64-bit store to GICD_IROUTER<32>: routing to Aff0 = 1 written big-endian.
        let irouter = d.gicd + 0x6100;
        big_endian_access(irouter, 8, Some(big_endian_image(1, 8)));
        let le = value(load(irouter, 8));
        check!(
            NAME,
            le == 1,
            "GICD_IROUTER32 after a big-endian store of Aff0=1: {le:#x}"
        );
        let be = big_endian_access(irouter, 8, None);
        check!(
            NAME,
            be == big_endian_image(1, 8),
            "GICD_IROUTER32 read big-endian as {be:#x}"
        );
        store(irouter, 8, 0);
        store(prio, 4, 0);
        println!("hostile: PASS {NAME}");
    }

    /// Writes an SGI generation register: 7 = ICC_SGI0R_EL1, 6 = ICC_ASGI1R_EL1,
    /// 5 = ICC_SGI1R_EL1.
    fn sgi_write(op2: u8, value: u64) {
        // SAFETY: generating an SGI only sets pending state in the (virtual) GIC; interrupts
        // stay masked in PSTATE, and with IMO/FMO set the write traps to the monitor.
        unsafe {
            match op2 {
                7 => asm!("msr S3_0_C12_C11_7, {}", in(reg) value, options(nostack)),
                6 => asm!("msr S3_0_C12_C11_6, {}", in(reg) value, options(nostack)),
                _ => asm!("msr S3_0_C12_C11_5, {}", in(reg) value, options(nostack)),
            }
            asm!("isb", options(nostack));
        }
    }

    fn attack_sgi(d: &Devices, flood: u64) {
        const NAME: &str = "sgi";
        let sgi_frame = d.gicr + 0x1_0000;
        let (igroupr0, ispendr0, icpendr0) =
            (sgi_frame + 0x80, sgi_frame + 0x200, sgi_frame + 0x280);
        // A flood of random ICC_SGI1R_EL1 values: any INTID, target list, Aff fields, RS, IRM.
        let mut rng = Prng::new(0x5eed_5617);
        for _ in 0..flood {
            take_trap();
            sgi_write(5, rng.next_u64());
            check!(
                NAME,
                take_trap().is_none(),
                "an ICC_SGI1R_EL1 write trapped in the guest"
            );
        }
        store(icpendr0, 4, 0xffff);
        // SGI 5 Group 1 (as gic::init_cpu left it), SGI 6 Group 0.
        let groups = match load(igroupr0, 4) {
            Outcome::Value(v) => v,
            o => {
                check!(NAME, false, "GICR_IGROUPR0: {o:?}");
                return;
            }
        };
        store(igroupr0, 4, groups & !(1 << 6));
        let pending = || match load(ispendr0, 4) {
            Outcome::Value(v) => v & 0xffff,
            _ => u64::MAX,
        };
        let me = 1u16 << (sysreg::mpidr_affinity() & 0xf);
        for (op2, name, group1_taken) in [
            (7u8, "ICC_SGI0R_EL1", false),
            (6, "ICC_ASGI1R_EL1", false),
            (5, "ICC_SGI1R_EL1", true),
        ] {
            store(icpendr0, 4, 0xffff);
            take_trap();
            sgi_write(op2, sgi_value(5, me));
            sgi_write(op2, sgi_value(6, me));
            let trap = take_trap();
            check!(
                NAME,
                trap.is_none(),
                "{name} write is UNDEFINED: ESR {:#x}",
                trap.map_or(0, |t| t.0)
            );
            let p = pending();
            let want = 1 << 6 | if group1_taken { 1 << 5 } else { 0 };
            check!(
                NAME,
                p == want,
                "{name}: pending SGIs {p:#x}, expected {want:#x}"
            );
        }
        store(icpendr0, 4, 0xffff);
        store(igroupr0, 4, groups);
        // The SGI registers are write-only: a read is UNDEFINED (EC 0).
        take_trap();
        // SAFETY: an MRS of a write-only register: UNDEFINED, skipped by the handler.
        unsafe { asm!("mrs {}, S3_0_C12_C11_7", out(reg) _, options(nostack)) };
        let t = take_trap();
        check!(
            NAME,
            matches!(t, Some((esr, _)) if esr >> 26 == 0),
            "reading ICC_SGI0R_EL1: {t:?}"
        );
        println!("hostile: PASS {NAME} flood={flood}");
    }

    global_asm!(
        ".section .text.hostile_park, \"ax\"",
        ".global hostile_park",
        "hostile_park:",
        "    wfe",
        "    b hostile_park",
    );
    extern "C" {
        fn hostile_park();
    }

    static SECONDARY_RAN: AtomicBool = AtomicBool::new(false);

    fn secondary(_index: usize) -> ! {
        SECONDARY_RAN.store(true, Ordering::SeqCst);
        let e = psci::cpu_off();
        vmfork_guests::fail!("hostile: FAIL psci: CPU_OFF returned {e}")
    }

    fn call(conduit: Conduit, x0: u64, x: [u64; 7]) -> ([u64; 4], [u64; 4]) {
        let (mut r0, mut r1, mut r2, mut r3) = (x0, x[0], x[1], x[2]);
        let (mut r4, mut r5, mut r6, mut r7) = (x[3], x[4], x[5], x[6]);
        // SAFETY: an SMCCC call changes registers only (x0-x17 at most, covered by
        // clobber_abi("C") except the ones named); the function is never a stateful one.
        unsafe {
            match conduit {
                Conduit::Hvc => {
                    asm!("hvc #0", inout("x0") r0, inout("x1") r1, inout("x2") r2, inout("x3") r3,
                    inout("x4") r4, inout("x5") r5, inout("x6") r6, inout("x7") r7, clobber_abi("C"), options(nostack))
                }
                Conduit::Smc => {
                    asm!("smc #0", inout("x0") r0, inout("x1") r1, inout("x2") r2, inout("x3") r3,
                    inout("x4") r4, inout("x5") r5, inout("x6") r6, inout("x7") r7, clobber_abi("C"), options(nostack))
                }
            }
        }
        ([r0, r1, r2, r3], [r4, r5, r6, r7])
    }

    fn x0(r: ([u64; 4], [u64; 4])) -> i64 {
        r.0[0] as i64
    }

    /// The PSCI attacks, each its own check (one failing does not hide the others):
    /// `psci-mpidr`, `psci-entry`, `psci-start` (with two CPUs) and `psci-suspend`, then
    /// `psci` when all passed.
    fn attack_psci(boot: &BootInfo) {
        let Some(conduit) = psci::conduit() else {
            check!("psci", false, "no PSCI conduit");
            return;
        };
        let before = FAILED.load(Ordering::SeqCst);
        let cpus = boot.platform.cpus();
        if cpus.len() >= 2 {
            let ram = boot
                .platform
                .memory_containing(boot.image_end)
                .unwrap_or_default();
            psci_mpidr(conduit, cpus[1]);
            psci_entry(conduit, cpus[1], ram.base, ram.end());
            psci_start(conduit, cpus[1]);
        }
        psci_suspend(conduit);
        if FAILED.load(Ordering::SeqCst) == before {
            println!("hostile: PASS psci");
        }
    }

    /// MPIDRs with bits outside Aff3..Aff0 name no CPU, even when their affinity fields are
    /// cpu 1's: CPU_ON and AFFINITY_INFO answer INVALID_PARAMETERS, and cpu 1 stays off.
    fn psci_mpidr(conduit: Conduit, target: u64) {
        const NAME: &str = "psci-mpidr";
        let good_entry = hostile_park as *const () as u64;
        for bad in [1 << 31, 1 << 24, 1 << 30, 1 << 40, 1 << 63, 0xff << 24] {
            let mpidr = target | bad;
            let r = x0(call(
                conduit,
                0xc400_0003,
                [mpidr, good_entry, 0, 0, 0, 0, 0],
            ));
            check!(
                NAME,
                r == -2,
                "CPU_ON of MPIDR {mpidr:#x}: {r} (expected INVALID_PARAMETERS)"
            );
            let r = x0(call(conduit, 0xc400_0004, [mpidr, 0, 0, 0, 0, 0, 0]));
            check!(NAME, r == -2, "AFFINITY_INFO of MPIDR {mpidr:#x}: {r}");
        }
        let r = x0(call(conduit, 0xc400_0004, [target, 0, 0, 0, 0, 0, 0]));
        check!(NAME, r == 1, "AFFINITY_INFO of cpu 1: {r} (expected OFF)");
        println!("hostile: PASS {NAME}");
    }

    /// CPU_ON with an entry point outside RAM answers INVALID_ADDRESS and starts nothing.
    fn psci_entry(conduit: Conduit, target: u64, ram_base: u64, ram_end: u64) {
        const NAME: &str = "psci-entry";
        for entry in [
            0u64,
            ram_base.wrapping_sub(4),
            ram_end,
            1 << 39,
            u64::MAX,
            0x0800_0000,
        ] {
            let r = x0(call(conduit, 0xc400_0003, [target, entry, 0, 0, 0, 0, 0]));
            check!(
                NAME,
                r == -9,
                "CPU_ON at entry {entry:#x}: {r} (expected INVALID_ADDRESS)"
            );
        }
        let r = x0(call(conduit, 0xc400_0004, [target, 0, 0, 0, 0, 0, 0]));
        check!(NAME, r == 1, "AFFINITY_INFO of cpu 1: {r} (expected OFF)");
        println!("hostile: PASS {NAME}");
    }

    /// A good CPU_ON starts cpu 1 (which had not run), and it turns itself off again.
    fn psci_start(conduit: Conduit, target: u64) {
        const NAME: &str = "psci-start";
        check!(
            NAME,
            !SECONDARY_RAN.load(Ordering::SeqCst),
            "cpu 1 ran after a refused CPU_ON"
        );
        if let Err(e) = smp::start_cpu(1, secondary) {
            check!(NAME, false, "CPU_ON of cpu 1: {e}");
        }
        let start = timer::now();
        while !SECONDARY_RAN.load(Ordering::SeqCst) {
            check!(
                NAME,
                timer::now().wrapping_sub(start) < timer::ticks_from_ms(10_000),
                "cpu 1 did not start within 10 s"
            );
            core::hint::spin_loop();
        }
        // Wait until it is off again.
        while x0(call(conduit, 0xc400_0004, [target, 0, 0, 0, 0, 0, 0])) != 1 {
            core::hint::spin_loop();
        }
        println!("hostile: PASS {NAME}");
    }

    /// CPU_SUSPEND is advertised, so it works: a standby until the virtual timer fires (its
    /// PPI enabled, PSTATE.I masked: like WFI, it wakes without taking the interrupt), SUCCESS.
    fn psci_suspend(conduit: Conduit) {
        const NAME: &str = "psci-suspend";
        let f = x0(call(conduit, 0x8400_000a, [0xc400_0001, 0, 0, 0, 0, 0, 0]));
        check!(NAME, f >= 0, "PSCI_FEATURES(CPU_SUSPEND) = {f}");
        if let Err(e) = gic::enable_ppi(27, gic::DEFAULT_PRIORITY) {
            check!(NAME, false, "enabling the timer PPI: {e}");
        }
        let ticks = timer::ticks_from_ms(20);
        let start = timer::now();
        timer::arm_in(ticks);
        let r = x0(call(conduit, 0xc400_0001, [0, 0, 0, 0, 0, 0, 0]));
        let waited = timer::now().wrapping_sub(start);
        timer::disable();
        let _ = gic::disable_ppi(27);
        check!(NAME, r == 0, "CPU_SUSPEND returned {r} (expected SUCCESS)");
        check!(
            NAME,
            waited >= ticks,
            "CPU_SUSPEND returned after {waited} of {ticks} ticks, before its wake-up event"
        );
        println!("hostile: PASS {NAME}");
    }

    fn attack_hvc(calls: u64) {
        const NAME: &str = "hvc";
        let Some(dt_conduit) = psci::conduit() else {
            check!(NAME, false, "no PSCI conduit");
            return;
        };
        let mut rng = Prng::new(0x00c0_ffee_5eed);
        let mut unknown = 0u64;
        // Both conduits under the monitor, which traps SMC as well as HVC; elsewhere only the
        // DTB's (plain QEMU has no EL3 for an SMC).
        let both = runtime::under_vmfork();
        for i in 0..calls {
            let conduit = match (both, i % 2) {
                (true, 0) => Conduit::Hvc,
                (true, _) => Conduit::Smc,
                (false, _) => dt_conduit,
            };
            let x0 = random_function(&mut rng);
            let args = [0; 7].map(|_: u64| rng.next_u64());
            let (r, preserved) = call(conduit, x0, args);
            check!(
                NAME,
                preserved == [args[3], args[4], args[5], args[6]],
                "call {i} {x0:#x}: X4-X7 changed to {preserved:x?}"
            );
            if !is_known(x0) {
                unknown += 1;
                check!(
                    NAME,
                    r[0] as u32 == NOT_SUPPORTED_W0,
                    "call {i}: unknown function {x0:#x} answered {:#x}",
                    r[0]
                );
            }
        }
        println!("hostile: PASS {NAME} calls={calls} unknown={unknown}");
    }

    fn attack_ipa(boot: &BootInfo) {
        const NAME: &str = "ipa";
        let mmfr0: u64;
        // SAFETY: reading an ID register has no side effects.
        unsafe { asm!("mrs {}, id_aa64mmfr0_el1", out(reg) mmfr0, options(nomem, nostack)) };
        let Some(pa) = pa_bits(mmfr0) else {
            check!(NAME, false, "reserved PARange {mmfr0:#x}");
            return;
        };
        let ram = boot
            .platform
            .memory_containing(boot.image_end)
            .unwrap_or_default();
        let mut addrs: [u64; 9] = [
            0,
            0x0b00_0000,
            ram.end(),
            ram.end() + 0x20_0000,
            1 << 38,
            (1 << 39) - 8,
            1 << 39,
            0,
            0,
        ];
        addrs[7] = (1u64 << pa) - 8;
        addrs[8] = 1u64 << pa;
        let mut n = 0;
        for addr in addrs {
            for write in [false, true] {
                let o = if write {
                    store(addr, 8, 0x1234)
                } else {
                    load(addr, 8)
                };
                let Outcome::Abort(esr, far) = o else {
                    check!(
                        NAME,
                        false,
                        "{} at {addr:#x}: {o:?}",
                        if write { "store" } else { "load" }
                    );
                    return;
                };
                let fsc = esr & 0x3f;
                let expect_size_fault = pa < 64 && addr >> pa != 0;
                let ok = if expect_size_fault {
                    is_address_size_fault(fsc)
                } else {
                    fsc == FSC_SYNC_EXTERNAL && far == addr
                };
                check!(
                    NAME,
                    ok,
                    "access at {addr:#x} (PA size {pa} bits): ESR {esr:#x} FAR {far:#x}"
                );
                let wnr = (esr >> 6) & 1 == 1;
                check!(
                    NAME,
                    wnr == write || expect_size_fault,
                    "access at {addr:#x}: WnR {wnr}"
                );
                n += 1;
            }
        }
        println!("hostile: PASS {NAME} accesses={n} pa_bits={pa}");
    }

    fn attack_exec(d: &Devices) {
        const NAME: &str = "exec";
        take_trap();
        // SAFETY: not sound by design: a branch into the vmgenid page, which holds data and
        // is mapped execute-never; the instruction abort returns to the instruction after the
        // BLR (the handler sets ELR_EL1 to x30).
        unsafe { asm!("blr {t}", t = in(reg) d.vmgenid, clobber_abi("C"), options(nostack)) };
        let t = take_trap();
        check!(
            NAME,
            matches!(t, Some((esr, far)) if esr >> 26 == 0x21 && esr & 0x3f == FSC_SYNC_EXTERNAL && far == d.vmgenid),
            "branch to the vmgenid page: {t:x?}"
        );
        println!("hostile: PASS {NAME}");
    }

    /// `count` loads from a hole in the address space, each aborted by the monitor (which logs
    /// each one, rate-limited).
    fn attack_flood(count: u64) {
        const NAME: &str = "flood";
        const HOLE: u64 = 0x0b00_0000;
        for i in 0..count {
            let o = load(HOLE, 4);
            check!(
                NAME,
                matches!(o, Outcome::Abort(esr, far) if esr & 0x3f == FSC_SYNC_EXTERNAL && far == HOLE),
                "load {i} at {HOLE:#x}: {o:?}"
            );
        }
        println!("hostile: PASS {NAME} aborts={count}");
    }

    fn main(boot: &'static BootInfo) -> ! {
        set_sync_handler(on_sync);
        let args = &boot.platform.bootargs;
        let Some(d) = devices(boot) else {
            vmfork_guests::fail!(
                "hostile: FAIL the DTB lacks the GIC, the PL011 or the vmgenid page"
            );
        };
        if let Err(e) = gic::init() {
            vmfork_guests::fail!("hostile: FAIL gic: {e}");
        }
        let number = |key: &str, default: u64| match args.get_u64(key) {
            Ok(v) => v.unwrap_or(default),
            Err(e) => vmfork_guests::fail!("hostile: FAIL {e}"),
        };
        let calls = number("calls", 10_000);
        let sgis = number("sgis", 10_000);
        let aborts = number("aborts", 2_000);
        let list = args
            .get("attack")
            .unwrap_or("mmio,pairs,cmo,endian,sgi,psci,hvc,ipa,exec");
        for attack in list.split(',') {
            match attack {
                "mmio" => attack_mmio(&d),
                "pairs" => attack_pairs(&d),
                "cmo" => attack_cmo(&d),
                "endian" => attack_endian(&d),
                "sgi" => attack_sgi(&d, sgis),
                "psci" => attack_psci(boot),
                "hvc" => attack_hvc(calls),
                "ipa" => attack_ipa(boot),
                "exec" => attack_exec(&d),
                "flood" => attack_flood(aborts),
                other => vmfork_guests::fail!("hostile: FAIL unknown attack {other:?}"),
            }
        }
        let failed = FAILED.load(Ordering::SeqCst);
        println!("hostile: done failed={failed}");
        if args.get("then") == Some("spin") {
            loop {
                sysreg::wfi();
            }
        }
        if failed > 0 {
            exit::fail()
        }
        exit::power_off()
    }

    vmfork_guests::entry!(main);
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("hostile is an aarch64-unknown-none guest image; run it under QEMU");
}
