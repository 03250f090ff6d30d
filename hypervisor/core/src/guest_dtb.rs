//! The flattened device tree (DTB) each guest is booted with.
//!
//! The guest's machine mirrors QEMU `virt` (see `DESIGN.md`), so a kernel that boots on
//! `qemu-system-aarch64 -M virt` at EL1 finds the same devices at the same addresses here. The
//! numbers live in [`layout`] so the monitor's stage-2 set-up and device models use exactly what
//! the guest is told.
//!
//! The tree contains: the root (`#address-cells = #size-cells = 2`, `interrupt-parent` = the GIC),
//! `/cpus` with one `cpu@N` per vCPU (`enable-method = "psci"`, `reg` = MPIDR affinity),
//! `/memory@…`, `/intc@8000000` (GICv3 distributor + one redistributor region), `/timer` (the
//! Generic Timer's four PPIs), `/psci`, `/apb-pclk` (a fixed clock) and `/pl011@9000000` (which
//! the Linux AMBA bus needs to name its `apb_pclk`), `/chosen` and, when asked for,
//! `/rng@…` with `compatible = "microsoft,vmgenid"` and, with
//! [`GuestDtbConfig::power_button`] (off by default), `/pl061@9030000` (a PL061 GPIO controller)
//! and `/gpio-keys` with a `poweroff` key on its line 3. There are no virtio-mmio nodes: the monitor's
//! control device on QEMU's virtio-mmio bus is never shown to a guest.
//!
//! The writer is rust-vmm's `vm-fdt`, built with `default-features = false, features = ["alloc"]`
//! so it runs without `std`.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use vm_fdt::FdtWriter;

/// The guest physical (IPA) memory map, shared by the DTB builder and the monitor.
///
/// Everything below [`RAM_BASE`](layout::RAM_BASE) is device space, as on QEMU `virt`.
pub mod layout {
    /// First IPA of guest RAM (QEMU `virt`'s `VIRT_MEM`).
    pub const RAM_BASE: u64 = 0x4000_0000;

    /// GICv3 distributor (GICD) base.
    pub const GICD_BASE: u64 = 0x0800_0000;
    /// Size of the GICD frame.
    pub const GICD_SIZE: u64 = 0x1_0000;
    /// Base of the GICv3 redistributor (GICR) region.
    pub const GICR_BASE: u64 = 0x080A_0000;
    /// Size of one vCPU's redistributor (RD_base + SGI_base frames, 2 × 64 KiB).
    pub const GICR_STRIDE: u64 = 0x2_0000;
    /// Size of the whole redistributor window QEMU `virt` reserves (room for 123 CPUs).
    pub const GICR_WINDOW_SIZE: u64 = 0x00F6_0000;

    /// PL011 UART base.
    pub const UART_BASE: u64 = 0x0900_0000;
    /// Size of the PL011 register frame.
    pub const UART_SIZE: u64 = 0x1000;
    /// The PL011's interrupt, as an SPI number (INTID = 32 + SPI).
    pub const UART_SPI: u32 = 1;
    /// PL061 GPIO controller base (QEMU `virt`'s `VIRT_GPIO`), present only with
    /// [`GuestDtbConfig::power_button`](super::GuestDtbConfig::power_button).
    pub const GPIO_BASE: u64 = crate::pl061::PL061_BASE;
    /// Size of the PL061 register frame.
    pub const GPIO_SIZE: u64 = crate::pl061::PL061_SIZE;
    /// The PL061's interrupt, as an SPI number (INTID 39).
    pub const GPIO_SPI: u32 = crate::pl061::PL061_SPI;
    /// The PL061 line of the `gpio-keys` power button.
    pub const POWER_BUTTON_LINE: u32 = crate::pl061::POWER_BUTTON_LINE;
    /// The key code the power button reports (`KEY_POWER` in Linux's input-event-codes.h).
    pub const KEY_POWER: u32 = 116;
    /// Frequency of the fixed `apb_pclk` clock given to the PL011 (as on QEMU `virt`).
    pub const APB_PCLK_HZ: u32 = 24_000_000;

    /// IPA of the VM Generation ID page (`microsoft,vmgenid`). The 16-byte generation ID sits
    /// at its start.
    ///
    /// Chosen to be unused both here and by QEMU `virt`: QEMU's misc-I/O window
    /// 0x0900_0000..0x0A00_0000 holds the UART (0x0900_0000), RTC (0x0901_0000), fw_cfg
    /// (0x0902_0000), GPIO (0x0903_0000), secure UART (0x0904_0000), SMMU (0x0905_0000,
    /// 128 KiB), ACPI memory hotplug / GED / NVDIMM (0x0907_0000..0x0909_xxxx), PV time
    /// (0x090A_0000), secure GPIO (0x090B_0000) and, in newer QEMUs, ACPI PCI hotplug
    /// (0x090C_0000); virtio-mmio starts at 0x0A00_0000. 0x090F_0000 is free in all of them.
    /// (0x0901_0000, the RTC's address, was avoided on purpose.)
    pub const VMGENID_BASE: u64 = 0x090F_0000;
    /// Size of the VM Generation ID page.
    pub const VMGENID_SIZE: u64 = 0x1000;
    /// The VM Generation ID notification interrupt, as an SPI number. QEMU `virt` uses SPIs
    /// 1-9 and 16 upwards; 12 is free.
    pub const VMGENID_SPI: u32 = 12;

    /// Generic Timer PPIs as DT PPI numbers (INTID - 16): secure physical (INTID 29).
    pub const TIMER_PPI_SEC_PHYS: u32 = 13;
    /// Non-secure physical timer PPI (INTID 30).
    pub const TIMER_PPI_NS_PHYS: u32 = 14;
    /// Virtual timer PPI (INTID 27): the one a guest at EL1 uses.
    pub const TIMER_PPI_VIRT: u32 = 11;
    /// Non-secure EL2 (hypervisor) physical timer PPI (INTID 26).
    pub const TIMER_PPI_HYP_PHYS: u32 = 10;

    /// Most vCPUs a guest may have.
    pub const MAX_VCPUS: u32 = 8;

    /// GIC INTID of an SPI number.
    pub const fn spi_intid(spi: u32) -> u32 {
        32 + spi
    }

    /// GIC INTID of a PPI number.
    pub const fn ppi_intid(ppi: u32) -> u32 {
        16 + ppi
    }

    /// Size of the redistributor region for `vcpus` vCPUs.
    pub const fn gicr_size(vcpus: u32) -> u64 {
        GICR_STRIDE * vcpus as u64
    }

    /// The MPIDR_EL1 affinity fields (Aff1, Aff0) the monitor gives vCPU `index` through
    /// VMPIDR_EL2, and the `reg` of its `cpu@` node. As QEMU `virt` does with GICv3, 16 vCPUs
    /// share an Aff1 cluster.
    pub const fn vcpu_mpidr_affinity(index: u32) -> u64 {
        (((index / 16) as u64) << 8) | (index % 16) as u64
    }
}

/// Largest DTB Linux accepts (arm64 `booting.rst`: "must not exceed 2 megabytes").
pub const MAX_DTB_SIZE: usize = 2 << 20;

/// phandle of the GIC node.
const PHANDLE_GIC: u32 = 1;
/// phandle of the `apb-pclk` fixed clock.
const PHANDLE_APB_PCLK: u32 = 2;
/// phandle of the PL061 GPIO controller (only with a power button).
const PHANDLE_GPIO: u32 = 3;

/// DT interrupt specifier type cell for an SPI.
const GIC_SPI: u32 = 0;
/// DT interrupt specifier type cell for a PPI.
const GIC_PPI: u32 = 1;
/// DT interrupt flags: rising edge.
const IRQ_TYPE_EDGE_RISING: u32 = 1;
/// DT interrupt flags: active-high level.
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// The PSCI conduit the guest is told to use (`method` of `/psci`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciMethodName {
    /// `HVC #0`: trapped to the monitor at EL2 directly. The default for our guests.
    Hvc,
    /// `SMC #0`: trapped to EL2 with HCR_EL2.TSC set.
    Smc,
}

impl PsciMethodName {
    /// The string written into the `method` property.
    pub fn as_str(self) -> &'static str {
        match self {
            PsciMethodName::Hvc => "hvc",
            PsciMethodName::Smc => "smc",
        }
    }
}

/// What the guest's DTB describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDtbConfig {
    /// Number of vCPUs, 1..=[`layout::MAX_VCPUS`].
    pub vcpus: u32,
    /// First IPA of guest RAM (normally [`layout::RAM_BASE`]).
    pub ram_base: u64,
    /// Bytes of guest RAM.
    pub ram_size: u64,
    /// Kernel command line (`/chosen/bootargs`).
    pub bootargs: String,
    /// Initrd `[start, end)` IPAs, if one is loaded (`linux,initrd-start/end`).
    pub initrd: Option<(u64, u64)>,
    /// PSCI conduit.
    pub psci_method: PsciMethodName,
    /// IPA of the `microsoft,vmgenid` page, or `None` to leave the node out.
    pub vmgenid: Option<u64>,
    /// Bytes for `/chosen/rng-seed` (and the first 8 for `kaslr-seed`), if any.
    pub rng_seed: Option<[u8; 32]>,
    /// Describe the power button: `/pl061@9030000` (a PL061 GPIO controller on SPI 7) and
    /// `/gpio-keys` whose `poweroff` key (`KEY_POWER`) is its line 3, as on QEMU `virt`. Off by
    /// default: the monitor does not emulate the PL061 for guests yet.
    pub power_button: bool,
}

impl Default for GuestDtbConfig {
    fn default() -> Self {
        GuestDtbConfig {
            vcpus: 1,
            ram_base: layout::RAM_BASE,
            ram_size: 64 << 20,
            bootargs: String::new(),
            initrd: None,
            psci_method: PsciMethodName::Hvc,
            vmgenid: Some(layout::VMGENID_BASE),
            rng_seed: None,
            power_button: false,
        }
    }
}

/// Why a DTB could not be built.
#[derive(Debug, PartialEq, Eq)]
pub enum DtbError {
    /// `vcpus` was 0 or above [`layout::MAX_VCPUS`].
    BadVcpuCount(u32),
    /// RAM is empty, wraps around, or overlaps the device window below [`layout::RAM_BASE`].
    BadRam {
        /// Requested base.
        base: u64,
        /// Requested size.
        size: u64,
    },
    /// The initrd range is empty-inverted or not inside RAM.
    BadInitrd {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
    },
    /// The vmgenid page is not page aligned, overlaps RAM or another device.
    BadVmgenid(u64),
    /// The finished blob is larger than [`MAX_DTB_SIZE`].
    TooLarge(usize),
    /// The FDT writer refused (e.g. a NUL byte inside `bootargs`).
    Writer(vm_fdt::Error),
}

impl fmt::Display for DtbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DtbError::BadVcpuCount(n) => {
                write!(f, "{n} vCPUs requested, 1..={} allowed", layout::MAX_VCPUS)
            }
            DtbError::BadRam { base, size } => {
                write!(f, "guest RAM {size:#x} bytes at {base:#x} is not usable")
            }
            DtbError::BadInitrd { start, end } => {
                write!(f, "initrd [{start:#x}, {end:#x}) is not inside guest RAM")
            }
            DtbError::BadVmgenid(ipa) => write!(
                f,
                "vmgenid page at {ipa:#x} must be page aligned and clear of RAM and devices"
            ),
            DtbError::TooLarge(n) => {
                write!(
                    f,
                    "DTB is {n} bytes, more than the {MAX_DTB_SIZE} Linux accepts"
                )
            }
            DtbError::Writer(e) => write!(f, "FDT writer: {e}"),
        }
    }
}

impl From<vm_fdt::Error> for DtbError {
    fn from(e: vm_fdt::Error) -> Self {
        DtbError::Writer(e)
    }
}

/// True when `[a, a+alen)` and `[b, b+blen)` share a byte (no overflow: callers pass sane
/// device ranges, and RAM has been checked not to wrap).
fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

fn validate(cfg: &GuestDtbConfig) -> Result<(), DtbError> {
    if cfg.vcpus == 0 || cfg.vcpus > layout::MAX_VCPUS {
        return Err(DtbError::BadVcpuCount(cfg.vcpus));
    }
    let bad_ram = || DtbError::BadRam {
        base: cfg.ram_base,
        size: cfg.ram_size,
    };
    let ram_end = cfg.ram_base.checked_add(cfg.ram_size).ok_or_else(bad_ram)?;
    if cfg.ram_size == 0 || cfg.ram_base < layout::RAM_BASE {
        return Err(bad_ram());
    }
    if let Some((start, end)) = cfg.initrd {
        if start > end || start < cfg.ram_base || end > ram_end {
            return Err(DtbError::BadInitrd { start, end });
        }
    }
    if let Some(ipa) = cfg.vmgenid {
        let size = layout::VMGENID_SIZE;
        let devices = [
            (layout::GICD_BASE, layout::GICD_SIZE),
            (layout::GICR_BASE, layout::GICR_WINDOW_SIZE),
            (layout::UART_BASE, layout::UART_SIZE),
            (cfg.ram_base, cfg.ram_size),
        ];
        let gpio = cfg
            .power_button
            .then_some((layout::GPIO_BASE, layout::GPIO_SIZE));
        if !ipa.is_multiple_of(size)
            || ipa.checked_add(size).is_none()
            || devices
                .iter()
                .chain(gpio.iter())
                .any(|&(b, l)| overlaps(ipa, size, b, l))
        {
            return Err(DtbError::BadVmgenid(ipa));
        }
    }
    Ok(())
}

/// Builds the guest's DTB.
///
/// Errors when the configuration is inconsistent (see [`DtbError`]); never panics.
pub fn build(cfg: &GuestDtbConfig) -> Result<Vec<u8>, DtbError> {
    validate(cfg)?;
    let mut w = FdtWriter::new()?;

    let root = w.begin_node("")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_string("model", "vmfork guest (QEMU virt layout)")?;
    w.property_u32("interrupt-parent", PHANDLE_GIC)?;

    // /cpus
    let cpus = w.begin_node("cpus")?;
    w.property_u32("#address-cells", 1)?;
    w.property_u32("#size-cells", 0)?;
    for i in 0..cfg.vcpus {
        let aff = layout::vcpu_mpidr_affinity(i);
        let cpu = w.begin_node(&alloc::format!("cpu@{aff:x}"))?;
        w.property_string("device_type", "cpu")?;
        w.property_string("compatible", "arm,armv8")?;
        // Affinity fits in 32 bits: Aff1 < 1 for MAX_VCPUS ≤ 16, checked above.
        w.property_u32("reg", aff as u32)?;
        w.property_string("enable-method", "psci")?;
        w.end_node(cpu)?;
    }
    w.end_node(cpus)?;

    // /memory
    let mem = w.begin_node(&alloc::format!("memory@{:x}", cfg.ram_base))?;
    w.property_string("device_type", "memory")?;
    w.property_array_u64("reg", &[cfg.ram_base, cfg.ram_size])?;
    w.end_node(mem)?;

    // /intc: GICv3, one redistributor region sized for this guest's vCPUs.
    let gic = w.begin_node(&alloc::format!("intc@{:x}", layout::GICD_BASE))?;
    w.property_string("compatible", "arm,gic-v3")?;
    w.property_u32("#interrupt-cells", 3)?;
    w.property_null("interrupt-controller")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_null("ranges")?;
    w.property_u32("#redistributor-regions", 1)?;
    w.property_array_u64(
        "reg",
        &[
            layout::GICD_BASE,
            layout::GICD_SIZE,
            layout::GICR_BASE,
            layout::gicr_size(cfg.vcpus),
        ],
    )?;
    w.property_phandle(PHANDLE_GIC)?;
    w.end_node(gic)?;

    // /timer: the four Generic Timer PPIs, level-high as QEMU gives them with GICv3.
    let timer = w.begin_node("timer")?;
    w.property_string_list(
        "compatible",
        alloc::vec!["arm,armv8-timer".into(), "arm,armv7-timer".into()],
    )?;
    w.property_array_u32(
        "interrupts",
        &[
            GIC_PPI,
            layout::TIMER_PPI_SEC_PHYS,
            IRQ_TYPE_LEVEL_HIGH,
            GIC_PPI,
            layout::TIMER_PPI_NS_PHYS,
            IRQ_TYPE_LEVEL_HIGH,
            GIC_PPI,
            layout::TIMER_PPI_VIRT,
            IRQ_TYPE_LEVEL_HIGH,
            GIC_PPI,
            layout::TIMER_PPI_HYP_PHYS,
            IRQ_TYPE_LEVEL_HIGH,
        ],
    )?;
    w.property_null("always-on")?;
    w.end_node(timer)?;

    // /psci
    let psci = w.begin_node("psci")?;
    w.property_string_list(
        "compatible",
        alloc::vec![
            "arm,psci-1.0".into(),
            "arm,psci-0.2".into(),
            "arm,psci".into()
        ],
    )?;
    w.property_string("method", cfg.psci_method.as_str())?;
    // PSCI 0.1 function-ID properties for "arm,psci"-only kernels.
    w.property_u32("cpu_suspend", crate::psci::PSCI_CPU_SUSPEND_64)?;
    w.property_u32("cpu_off", crate::psci::PSCI_CPU_OFF)?;
    w.property_u32("cpu_on", crate::psci::PSCI_CPU_ON_64)?;
    w.end_node(psci)?;

    // /apb-pclk: the fixed clock the PL011 (a PrimeCell on the AMBA bus) names twice.
    let clk = w.begin_node("apb-pclk")?;
    w.property_string("compatible", "fixed-clock")?;
    w.property_u32("#clock-cells", 0)?;
    w.property_u32("clock-frequency", layout::APB_PCLK_HZ)?;
    w.property_string("clock-output-names", "clk24mhz")?;
    w.property_phandle(PHANDLE_APB_PCLK)?;
    w.end_node(clk)?;

    // /pl011
    let uart_name = alloc::format!("pl011@{:x}", layout::UART_BASE);
    let uart = w.begin_node(&uart_name)?;
    w.property_string_list(
        "compatible",
        alloc::vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    w.property_array_u64("reg", &[layout::UART_BASE, layout::UART_SIZE])?;
    w.property_array_u32(
        "interrupts",
        &[GIC_SPI, layout::UART_SPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    w.property_array_u32("clocks", &[PHANDLE_APB_PCLK, PHANDLE_APB_PCLK])?;
    w.property_string_list(
        "clock-names",
        alloc::vec!["uartclk".into(), "apb_pclk".into()],
    )?;
    w.end_node(uart)?;

    // /pl061 and /gpio-keys: the power button.
    if cfg.power_button {
        let gpio = w.begin_node(&alloc::format!("pl061@{:x}", layout::GPIO_BASE))?;
        w.property_string_list(
            "compatible",
            alloc::vec!["arm,pl061".into(), "arm,primecell".into()],
        )?;
        w.property_array_u64("reg", &[layout::GPIO_BASE, layout::GPIO_SIZE])?;
        w.property_array_u32(
            "interrupts",
            &[GIC_SPI, layout::GPIO_SPI, IRQ_TYPE_LEVEL_HIGH],
        )?;
        w.property_null("gpio-controller")?;
        w.property_u32("#gpio-cells", 2)?;
        w.property_u32("clocks", PHANDLE_APB_PCLK)?;
        w.property_string("clock-names", "apb_pclk")?;
        w.property_phandle(PHANDLE_GPIO)?;
        w.end_node(gpio)?;

        let keys = w.begin_node("gpio-keys")?;
        w.property_string("compatible", "gpio-keys")?;
        let key = w.begin_node("poweroff")?;
        w.property_string("label", "GPIO Key Poweroff")?;
        w.property_u32("linux,code", layout::KEY_POWER)?;
        // Flags 0: GPIO_ACTIVE_HIGH.
        w.property_array_u32("gpios", &[PHANDLE_GPIO, layout::POWER_BUTTON_LINE, 0])?;
        w.end_node(key)?;
        w.end_node(keys)?;
    }

    // /rng: the VM Generation ID (Linux 6.10+ reseeds its RNG when it changes).
    if let Some(ipa) = cfg.vmgenid {
        let node = w.begin_node(&alloc::format!("rng@{ipa:x}"))?;
        w.property_string("compatible", "microsoft,vmgenid")?;
        w.property_array_u64("reg", &[ipa, layout::VMGENID_SIZE])?;
        w.property_array_u32(
            "interrupts",
            &[GIC_SPI, layout::VMGENID_SPI, IRQ_TYPE_EDGE_RISING],
        )?;
        w.end_node(node)?;
    }

    // /chosen
    let chosen = w.begin_node("chosen")?;
    w.property_string("bootargs", &cfg.bootargs)?;
    w.property_string("stdout-path", &alloc::format!("/{uart_name}"))?;
    if let Some((start, end)) = cfg.initrd {
        w.property_u64("linux,initrd-start", start)?;
        w.property_u64("linux,initrd-end", end)?;
    }
    if let Some(seed) = cfg.rng_seed {
        w.property("rng-seed", &seed)?;
        let mut kaslr = [0u8; 8];
        kaslr.copy_from_slice(&seed[..8]);
        w.property_u64("kaslr-seed", u64::from_le_bytes(kaslr))?;
    }
    w.end_node(chosen)?;

    w.end_node(root)?;
    let blob = w.finish()?;
    if blob.len() > MAX_DTB_SIZE {
        return Err(DtbError::TooLarge(blob.len()));
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use fdt::Fdt;
    use proptest::prelude::*;

    fn be32s(v: &[u8]) -> Vec<u32> {
        v.chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn be64s(v: &[u8]) -> Vec<u64> {
        v.chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_be_bytes(b)
            })
            .collect()
    }

    fn strs(v: &[u8]) -> Vec<&str> {
        v.split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| core::str::from_utf8(s).unwrap())
            .collect()
    }

    fn prop<'a>(fdt: &'a Fdt<'a>, node: &str, name: &str) -> &'a [u8] {
        fdt.find_node(node)
            .unwrap_or_else(|| panic!("node {node} missing"))
            .property(name)
            .unwrap_or_else(|| panic!("{node}/{name} missing"))
            .value
    }

    fn full_cfg() -> GuestDtbConfig {
        GuestDtbConfig {
            vcpus: 4,
            ram_base: layout::RAM_BASE,
            ram_size: 256 << 20,
            bootargs: "console=ttyAMA0 earlycon rdinit=/init".to_string(),
            initrd: Some((0x4800_0000, 0x4812_3456)),
            psci_method: PsciMethodName::Hvc,
            vmgenid: Some(layout::VMGENID_BASE),
            rng_seed: Some([7; 32]),
            power_button: false,
        }
    }

    #[test]
    fn every_node_and_property() {
        let cfg = full_cfg();
        let blob = build(&cfg).unwrap();
        let fdt = Fdt::new(&blob).unwrap();

        // Root.
        assert_eq!(be32s(prop(&fdt, "/", "#address-cells")), [2]);
        assert_eq!(be32s(prop(&fdt, "/", "#size-cells")), [2]);
        assert_eq!(be32s(prop(&fdt, "/", "interrupt-parent")), [PHANDLE_GIC]);
        assert_eq!(strs(prop(&fdt, "/", "compatible")), ["linux,dummy-virt"]);

        // CPUs.
        let cpus: Vec<_> = fdt.find_node("/cpus").unwrap().children().collect();
        assert_eq!(cpus.len(), 4);
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu.name, alloc::format!("cpu@{i:x}"));
            let p = |n: &str| cpu.property(n).unwrap().value;
            assert_eq!(strs(p("device_type")), ["cpu"]);
            assert_eq!(strs(p("compatible")), ["arm,armv8"]);
            assert_eq!(strs(p("enable-method")), ["psci"]);
            assert_eq!(be32s(p("reg")), [i as u32]);
        }
        assert_eq!(be32s(prop(&fdt, "/cpus", "#address-cells")), [1]);
        assert_eq!(be32s(prop(&fdt, "/cpus", "#size-cells")), [0]);

        // Memory.
        let regions: Vec<_> = fdt.memory().regions().collect();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].starting_address as u64, layout::RAM_BASE);
        assert_eq!(regions[0].size, Some(256 << 20));
        assert_eq!(
            strs(prop(&fdt, "/memory@40000000", "device_type")),
            ["memory"]
        );

        // GIC.
        let g = "/intc@8000000";
        assert_eq!(strs(prop(&fdt, g, "compatible")), ["arm,gic-v3"]);
        assert_eq!(be32s(prop(&fdt, g, "#interrupt-cells")), [3]);
        assert!(prop(&fdt, g, "interrupt-controller").is_empty());
        assert_eq!(be32s(prop(&fdt, g, "#redistributor-regions")), [1]);
        assert_eq!(
            be64s(prop(&fdt, g, "reg")),
            [0x0800_0000, 0x1_0000, 0x080A_0000, 4 * 0x2_0000]
        );
        assert_eq!(be32s(prop(&fdt, g, "phandle")), [PHANDLE_GIC]);

        // Timer: PPIs 13, 14, 11, 10, level high.
        assert_eq!(
            strs(prop(&fdt, "/timer", "compatible")),
            ["arm,armv8-timer", "arm,armv7-timer"]
        );
        assert_eq!(
            be32s(prop(&fdt, "/timer", "interrupts")),
            [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );

        // PSCI.
        assert_eq!(
            strs(prop(&fdt, "/psci", "compatible")),
            ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]
        );
        assert_eq!(strs(prop(&fdt, "/psci", "method")), ["hvc"]);
        assert_eq!(be32s(prop(&fdt, "/psci", "cpu_on")), [0xC400_0003]);
        assert_eq!(be32s(prop(&fdt, "/psci", "cpu_off")), [0x8400_0002]);

        // UART and its clock.
        let u = "/pl011@9000000";
        assert_eq!(
            strs(prop(&fdt, u, "compatible")),
            ["arm,pl011", "arm,primecell"]
        );
        assert_eq!(be64s(prop(&fdt, u, "reg")), [0x0900_0000, 0x1000]);
        assert_eq!(be32s(prop(&fdt, u, "interrupts")), [0, 1, 4]);
        assert_eq!(
            be32s(prop(&fdt, u, "clocks")),
            [PHANDLE_APB_PCLK, PHANDLE_APB_PCLK]
        );
        assert_eq!(strs(prop(&fdt, u, "clock-names")), ["uartclk", "apb_pclk"]);
        let clk = fdt.find_phandle(PHANDLE_APB_PCLK).unwrap();
        assert_eq!(clk.name, "apb-pclk");
        assert_eq!(be32s(clk.property("#clock-cells").unwrap().value), [0]);
        assert_eq!(
            be32s(clk.property("clock-frequency").unwrap().value),
            [24_000_000]
        );

        // vmgenid.
        let r = "/rng@90f0000";
        assert_eq!(strs(prop(&fdt, r, "compatible")), ["microsoft,vmgenid"]);
        assert_eq!(be64s(prop(&fdt, r, "reg")), [0x090F_0000, 0x1000]);
        assert_eq!(be32s(prop(&fdt, r, "interrupts")), [0, 12, 1]);

        // Chosen.
        let chosen = fdt.chosen();
        assert_eq!(
            chosen.bootargs(),
            Some("console=ttyAMA0 earlycon rdinit=/init")
        );
        assert_eq!(chosen.stdout().unwrap().name, "pl011@9000000");
        assert_eq!(
            be64s(prop(&fdt, "/chosen", "linux,initrd-start")),
            [0x4800_0000]
        );
        assert_eq!(
            be64s(prop(&fdt, "/chosen", "linux,initrd-end")),
            [0x4812_3456]
        );
        assert_eq!(prop(&fdt, "/chosen", "rng-seed"), [7u8; 32]);
        assert_eq!(prop(&fdt, "/chosen", "kaslr-seed").len(), 8);

        // Exactly these top-level nodes: in particular no virtio-mmio.
        let mut names: Vec<_> = fdt
            .find_node("/")
            .unwrap()
            .children()
            .map(|n| n.name)
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "apb-pclk",
                "chosen",
                "cpus",
                "intc@8000000",
                "memory@40000000",
                "pl011@9000000",
                "psci",
                "rng@90f0000",
                "timer"
            ]
        );
        assert!(!fdt.all_nodes().any(|n| n.name.starts_with("virtio")));
    }

    #[test]
    fn optional_parts_left_out() {
        let cfg = GuestDtbConfig {
            psci_method: PsciMethodName::Smc,
            vmgenid: None,
            ..GuestDtbConfig::default()
        };
        let blob = build(&cfg).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(strs(prop(&fdt, "/psci", "method")), ["smc"]);
        assert!(fdt.find_compatible(&["microsoft,vmgenid"]).is_none());
        let chosen = fdt.find_node("/chosen").unwrap();
        assert!(chosen.property("linux,initrd-start").is_none());
        assert!(chosen.property("rng-seed").is_none());
        assert_eq!(fdt.cpus().count(), 1);
        assert_eq!(
            be64s(prop(&fdt, "/intc@8000000", "reg"))[3],
            layout::GICR_STRIDE
        );
    }

    #[test]
    fn power_button_nodes() {
        // Off by default: neither node, and the default tree is unchanged otherwise.
        let off = build(&full_cfg()).unwrap();
        let fdt = Fdt::new(&off).unwrap();
        assert!(fdt.find_compatible(&["arm,pl061"]).is_none());
        assert!(fdt.find_node("/gpio-keys").is_none());
        assert!(fdt.find_phandle(PHANDLE_GPIO).is_none());
        assert!(!GuestDtbConfig::default().power_button);

        let cfg = GuestDtbConfig {
            power_button: true,
            ..full_cfg()
        };
        let blob = build(&cfg).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let g = "/pl061@9030000";
        assert_eq!(
            strs(prop(&fdt, g, "compatible")),
            ["arm,pl061", "arm,primecell"]
        );
        assert_eq!(be64s(prop(&fdt, g, "reg")), [0x0903_0000, 0x1000]);
        assert_eq!(
            be32s(prop(&fdt, g, "interrupts")),
            [GIC_SPI, 7, IRQ_TYPE_LEVEL_HIGH]
        );
        assert_eq!(layout::spi_intid(layout::GPIO_SPI), 39);
        assert!(prop(&fdt, g, "gpio-controller").is_empty());
        assert_eq!(be32s(prop(&fdt, g, "#gpio-cells")), [2]);
        assert_eq!(be32s(prop(&fdt, g, "clocks")), [PHANDLE_APB_PCLK]);
        assert_eq!(strs(prop(&fdt, g, "clock-names")), ["apb_pclk"]);
        assert_eq!(be32s(prop(&fdt, g, "phandle")), [PHANDLE_GPIO]);
        assert_eq!(
            fdt.find_phandle(PHANDLE_GPIO).unwrap().name,
            "pl061@9030000"
        );

        assert_eq!(strs(prop(&fdt, "/gpio-keys", "compatible")), ["gpio-keys"]);
        let k = "/gpio-keys/poweroff";
        assert_eq!(strs(prop(&fdt, k, "label")), ["GPIO Key Poweroff"]);
        assert_eq!(be32s(prop(&fdt, k, "linux,code")), [116]);
        assert_eq!(be32s(prop(&fdt, k, "gpios")), [PHANDLE_GPIO, 3, 0]);

        // Everything else is as without the button.
        assert_eq!(
            fdt.all_nodes().count(),
            Fdt::new(&off).unwrap().all_nodes().count() + 3
        );
        // The vmgenid page may not sit on the PL061 then (and may without it).
        let on_gpio = GuestDtbConfig {
            vmgenid: Some(layout::GPIO_BASE),
            ..cfg.clone()
        };
        assert_eq!(
            build(&on_gpio),
            Err(DtbError::BadVmgenid(layout::GPIO_BASE))
        );
        assert!(build(&GuestDtbConfig {
            power_button: false,
            ..on_gpio
        })
        .is_ok());
    }

    #[test]
    fn rejects_bad_configs() {
        let ok = GuestDtbConfig::default();
        let with = |f: &dyn Fn(&mut GuestDtbConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            build(&c)
        };
        assert_eq!(with(&|c| c.vcpus = 0), Err(DtbError::BadVcpuCount(0)));
        assert_eq!(with(&|c| c.vcpus = 9), Err(DtbError::BadVcpuCount(9)));
        assert!(matches!(
            with(&|c| c.ram_size = 0),
            Err(DtbError::BadRam { .. })
        ));
        assert!(matches!(
            with(&|c| c.ram_size = u64::MAX),
            Err(DtbError::BadRam { .. })
        ));
        assert!(matches!(
            with(&|c| c.ram_base = 0x0800_0000),
            Err(DtbError::BadRam { .. })
        ));
        assert!(matches!(
            with(&|c| c.initrd = Some((0x4000_0000, 0x5000_0000))),
            Err(DtbError::BadInitrd { .. })
        ));
        assert!(matches!(
            with(&|c| c.initrd = Some((0x4100_0000, 0x4000_0000))),
            Err(DtbError::BadInitrd { .. })
        ));
        for bad in [
            0x0900_0000,
            0x090F_0800,
            0x4000_0000,
            0x0800_0000,
            0x080B_0000,
        ] {
            assert_eq!(
                with(&|c| c.vmgenid = Some(bad)),
                Err(DtbError::BadVmgenid(bad))
            );
        }
        assert_eq!(
            with(&|c| c.bootargs = "a\0b".to_string()),
            Err(DtbError::Writer(vm_fdt::Error::InvalidString))
        );
        assert!(matches!(
            with(&|c| c.bootargs = "x".repeat(MAX_DTB_SIZE)),
            Err(DtbError::TooLarge(_))
        ));
        assert!(!DtbError::BadVmgenid(1).to_string().is_empty());
    }

    #[test]
    fn mpidr_affinity() {
        assert_eq!(layout::vcpu_mpidr_affinity(0), 0);
        assert_eq!(layout::vcpu_mpidr_affinity(7), 7);
        assert_eq!(layout::vcpu_mpidr_affinity(17), 0x101);
        assert_eq!(layout::spi_intid(layout::VMGENID_SPI), 44);
        assert_eq!(layout::ppi_intid(layout::TIMER_PPI_VIRT), 27);
    }

    /// Decompiles with `dtc` when it is installed; skipped (with a note) otherwise.
    #[test]
    fn dtc_accepts_the_blob() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let blob = build(&full_cfg()).unwrap();
        let child = Command::new("dtc")
            .args(["-I", "dtb", "-O", "dts", "-o", "-", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            std::eprintln!("dtc not installed: skipping the dtc check");
            return;
        };
        child.stdin.take().unwrap().write_all(&blob).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dtc failed: {stderr}");
        // dtc's own checks (reg format, unit addresses, phandles) must not complain.
        assert!(stderr.trim().is_empty(), "dtc warnings: {stderr}");
        // Older dtc versions print string lists as "a\0b", newer ones as "a", "b".
        let dts = String::from_utf8(out.stdout)
            .unwrap()
            .replace("\\0", "\", \"");
        for needle in [
            "compatible = \"microsoft,vmgenid\";",
            "interrupt-parent = <0x01>;",
            "stdout-path = \"/pl011@9000000\";",
            "clock-names = \"uartclk\", \"apb_pclk\";",
            "method = \"hvc\";",
            "#redistributor-regions = <0x01>;",
        ] {
            assert!(dts.contains(needle), "{needle} missing from:\n{dts}");
        }
    }

    /// The power-button nodes pass `dtc`'s checks too (the `gpios` phandle and `#gpio-cells`);
    /// skipped when `dtc` is not installed.
    #[test]
    fn dtc_accepts_the_power_button() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let blob = build(&GuestDtbConfig {
            power_button: true,
            ..full_cfg()
        })
        .unwrap();
        let Ok(mut child) = Command::new("dtc")
            .args(["-I", "dtb", "-O", "dts", "-o", "-", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            std::eprintln!("dtc not installed: skipping the dtc check");
            return;
        };
        child.stdin.take().unwrap().write_all(&blob).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dtc failed: {stderr}");
        assert!(stderr.trim().is_empty(), "dtc warnings: {stderr}");
        let dts = String::from_utf8(out.stdout)
            .unwrap()
            .replace("\\0", "\", \"");
        for needle in [
            "pl061@9030000 {",
            "compatible = \"arm,pl061\", \"arm,primecell\";",
            "gpio-controller;",
            "gpio-keys {",
            "poweroff {",
            "linux,code = <0x74>;",
            "gpios = <0x03 0x03 0x00>;",
        ] {
            assert!(dts.contains(needle), "{needle} missing from:\n{dts}");
        }
    }

    proptest! {
        #[test]
        fn any_valid_config_round_trips(
            vcpus in 1u32..=8,
            ram_mib in 2u64..4096,
            bootargs in "[ -~]{0,200}",
            smc in any::<bool>(),
            genid in any::<bool>(),
        ) {
            let cfg = GuestDtbConfig {
                vcpus,
                ram_size: ram_mib << 20,
                bootargs: bootargs.clone(),
                psci_method: if smc { PsciMethodName::Smc } else { PsciMethodName::Hvc },
                vmgenid: genid.then_some(layout::VMGENID_BASE),
                ..GuestDtbConfig::default()
            };
            let blob = build(&cfg).unwrap();
            let fdt = Fdt::new(&blob).unwrap();
            prop_assert_eq!(fdt.cpus().count() as u32, vcpus);
            prop_assert_eq!(fdt.chosen().bootargs(), Some(bootargs.as_str()));
            prop_assert_eq!(fdt.memory().regions().next().unwrap().size, Some((ram_mib << 20) as usize));
            prop_assert_eq!(fdt.find_compatible(&["microsoft,vmgenid"]).is_some(), genid);
        }

        #[test]
        fn arbitrary_configs_never_panic(
            vcpus in any::<u32>(),
            ram_base in any::<u64>(),
            ram_size in any::<u64>(),
            initrd in proptest::option::of((any::<u64>(), any::<u64>())),
            vmgenid in proptest::option::of(any::<u64>()),
        ) {
            let cfg = GuestDtbConfig { vcpus, ram_base, ram_size, initrd, vmgenid, ..GuestDtbConfig::default() };
            let _ = build(&cfg);
        }
    }
}
