//! Boot code: the entry points of the boot CPU (`_start`) and of CPUs started by PSCI `CPU_ON`
//! (`__vmfork_secondary_start`), then the boot CPU's Rust start-up: find and read the DTB,
//! bring up the console and PSCI conduit, and call the guest's entry point.
//!
//! Entry state on plain QEMU (`-kernel <elf>`, no EL2/EL3): the boot CPU starts at the ELF
//! entry at EL1h with the MMU and caches off; the other CPUs are powered off until `CPU_ON`.
//! QEMU loads the DTB at the start of RAM (0x4000_0000) for an ELF, below the image, but does
//! not pass its address in x0 (x0 is 0: the Linux boot protocol is only used for Image files).
//! Under the vmfork monitor x0 holds the DTB's address. So: x0 if it points at the DTB magic,
//! else [`DEFAULT_DTB_ADDR`](crate::DEFAULT_DTB_ADDR).

use super::{console, psci, runtime, sysreg};
use crate::fdt::{self, Fdt, Platform, FDT_HEADER_SIZE};
use crate::MAX_CPUS;
use core::arch::global_asm;

/// Size of the boot CPU's stack.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;
/// Size of each secondary CPU's stack.
pub const SECONDARY_STACK_SIZE: usize = 16 * 1024;

/// `SCTLR_EL1` value set at entry on every CPU: MMU, alignment check and data cache off,
/// instruction cache on, SP alignment checks on, little-endian; the RES1 bits of Armv8.0
/// (11, 20, 22, 23, 28, 29) set. Setting it explicitly makes plain QEMU and the monitor agree.
pub const SCTLR_EL1_VALUE: u64 = (1 << 29)
    | (1 << 28)
    | (1 << 23)
    | (1 << 22)
    | (1 << 20)
    | (1 << 12)
    | (1 << 11)
    | (1 << 4)
    | (1 << 3);

/// `CPACR_EL1.FPEN = 0b11`: FP/SIMD instructions do not trap at EL1/EL0. Rust code on this
/// target uses SIMD registers, so this must be set before any Rust code runs.
pub const CPACR_EL1_FPEN: u64 = 3 << 20;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    msr     daifset, #0xf
    mov     x19, x0
    mov     x1, #{cpacr}
    msr     cpacr_el1, x1
    ldr     x1, ={sctlr}
    msr     sctlr_el1, x1
    isb
    adrp    x1, __vmfork_boot_stack_top
    add     x1, x1, :lo12:__vmfork_boot_stack_top
    mov     sp, x1
    adrp    x1, __vmfork_vectors
    add     x1, x1, :lo12:__vmfork_vectors
    msr     vbar_el1, x1
    isb
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    str     xzr, [x1], #8
    b       1b
2:  mov     x0, x19
    bl      __vmfork_boot_primary
3:  wfe
    b       3b

    .global __vmfork_secondary_start
__vmfork_secondary_start:
    msr     daifset, #0xf
    mov     x19, x0
    mov     x1, #{cpacr}
    msr     cpacr_el1, x1
    ldr     x1, ={sctlr}
    msr     sctlr_el1, x1
    isb
    cmp     x19, #{max_cpus}
    b.hs    5f
    adrp    x1, __vmfork_secondary_stacks
    add     x1, x1, :lo12:__vmfork_secondary_stacks
    add     x2, x19, #1
    mov     x3, #{sec_stack}
    madd    x1, x2, x3, x1
    mov     sp, x1
    adrp    x1, __vmfork_vectors
    add     x1, x1, :lo12:__vmfork_vectors
    msr     vbar_el1, x1
    isb
    mov     x0, x19
    bl      __vmfork_boot_secondary
5:  wfe
    b       5b

    .section .stacks, "aw", %nobits
    .balign 4096
__vmfork_boot_stack_bottom:
    .space  {boot_stack}
__vmfork_boot_stack_top:
__vmfork_secondary_stacks:
    .space  {sec_stack} * {max_cpus}
"#,
    cpacr = const CPACR_EL1_FPEN,
    sctlr = const SCTLR_EL1_VALUE,
    max_cpus = const MAX_CPUS,
    sec_stack = const SECONDARY_STACK_SIZE,
    boot_stack = const BOOT_STACK_SIZE,
);

/// What the runtime learnt at boot; handed to the guest's entry point.
#[derive(Debug)]
pub struct BootInfo {
    /// Facts read from the DTB.
    pub platform: Platform,
    /// Where the DTB was found.
    pub dtb_addr: u64,
    /// Whether that address came from x0 (else the fixed fallback at the start of RAM).
    pub dtb_from_x0: bool,
    /// The boot CPU's x0 at entry.
    pub entry_x0: u64,
    /// First byte of the guest image (link address).
    pub image_start: u64,
    /// One past the last byte of the image, stacks included (4 KiB aligned).
    pub image_end: u64,
    /// The boot CPU's index in [`Platform::cpus`].
    pub boot_cpu: usize,
}

static BOOT_INFO: spin::Once<BootInfo> = spin::Once::new();

/// The boot information, once the boot CPU has read the DTB.
pub fn boot_info() -> Option<&'static BootInfo> {
    BOOT_INFO.get()
}

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

extern "Rust" {
    /// Defined by the guest program with [`entry!`](crate::entry).
    fn __vmfork_guest_main(boot: &'static BootInfo) -> !;
}

/// Whether `addr` looks like it holds a DTB: non-null, 8-byte aligned, magic in place.
fn dtb_at(addr: u64) -> bool {
    if addr == 0 || !addr.is_multiple_of(8) {
        return false;
    }
    // SAFETY: x0 is either 0 (rejected above) or the DTB address the monitor passes, which lies
    // in guest RAM; reading 4 bytes of RAM with the MMU off has no side effects.
    let magic = unsafe { core::ptr::read_volatile(addr as *const u32) };
    u32::from_be(magic) == fdt::FDT_MAGIC
}

/// Reads the DTB at `addr` into a [`Platform`].
fn read_platform(addr: u64) -> Result<Platform, fdt::DtbError> {
    // SAFETY: `addr` is in guest RAM (x0 from the monitor or the start of RAM); the header is
    // 40 bytes of plain memory that nothing writes while we read it.
    let header = unsafe { core::slice::from_raw_parts(addr as *const u8, FDT_HEADER_SIZE) };
    let size = fdt::total_size(header)?;
    // SAFETY: as above; total_size() bounded the length by FDT_MAX_SIZE, and the loader placed
    // a DTB of that size there.
    let blob = unsafe { core::slice::from_raw_parts(addr as *const u8, size) };
    Platform::from_fdt(&Fdt::new(blob)?)
}

/// The boot CPU's first Rust code, called from `_start` with the entry value of x0.
#[no_mangle]
extern "C" fn __vmfork_boot_primary(x0: u64) -> ! {
    let from_x0 = dtb_at(x0);
    let dtb_addr = if from_x0 { x0 } else { crate::DEFAULT_DTB_ADDR };
    let platform = match read_platform(dtb_addr) {
        Ok(p) => p,
        Err(e) => crate::fail!("boot: cannot read the DTB at {dtb_addr:#x}: {e}"),
    };
    if let Some(uart) = platform.uart {
        console::init(uart);
    }
    // `psci=hvc|smc` overrides the DTB's conduit. A bad value is reported only after the Call
    // UID query through the DTB's conduit, so that under the monitor the failure does not use
    // semihosting (which would end every VM of the machine).
    let conduit = crate::psci_abi::conduit_override(&platform.bootargs);
    psci::set_conduit(match conduit {
        Ok(Some(c)) => Some(c),
        Ok(None) | Err(_) => platform.psci,
    });
    runtime::detect();
    if let Err(e) = conduit {
        crate::fail!("boot: FAIL {e}");
    }
    let affinity = sysreg::mpidr_affinity();
    let Some(boot_cpu) = platform.cpu_index(affinity) else {
        crate::fail!("boot: MPIDR affinity {affinity:#x} is not in the DTB's /cpus");
    };
    // The linker script defines both symbols; only their addresses are taken.
    let image_start = core::ptr::addr_of!(__image_start) as u64;
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let info = BOOT_INFO.call_once(|| BootInfo {
        platform,
        dtb_addr,
        dtb_from_x0: from_x0,
        entry_x0: x0,
        image_start,
        image_end,
        boot_cpu,
    });
    if info.platform.bootargs.has("verbose") {
        crate::println!(
            "boot: x0={:#x}, dtb at {:#x} ({}), image {:#x}..{:#x}, cpu {} of {}, EL{}, vmfork {}, \
             psci {}",
            info.entry_x0,
            info.dtb_addr,
            if info.dtb_from_x0 {
                "from x0"
            } else {
                "fixed address"
            },
            info.image_start,
            info.image_end,
            info.boot_cpu,
            info.platform.cpus().len(),
            sysreg::current_el(),
            if runtime::under_vmfork() { "yes" } else { "no" },
            psci::conduit().map_or("none", |c| c.name())
        );
    }
    // SAFETY: every guest binary defines this symbol through entry!, which checks its type.
    unsafe { __vmfork_guest_main(info) }
}

/// A secondary CPU's first Rust code, called with its CPU index (the `CPU_ON` context ID).
#[no_mangle]
extern "C" fn __vmfork_boot_secondary(index: u64) -> ! {
    super::smp::secondary_entry(index as usize)
}
