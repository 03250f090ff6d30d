//! What the monitor learns about the machine from the flattened device tree (DTB) that QEMU's
//! `virt` board passes in `x0`: RAM, CPUs (by MPIDR), the PL011 UART, the GIC, the generic timer's
//! PPIs, the PSCI conduit, the virtio-mmio transports, fw_cfg and the `/chosen` node.
//!
//! The blob is untrusted input as far as this module is concerned: [`parse`] never panics. The
//! `fdt` crate (0.1.5) does the node and property navigation, but it panics on several kinds of
//! malformed blob (out-of-range string offsets, unbalanced nodes, truncated properties, ...), so
//! [`parse`] first checks the whole structure block itself ([`validate`]) and hands the crate only
//! blobs on which its panicking paths cannot be reached. Blobs containing `FDT_NOP` tokens are
//! copied without them first, because the crate mishandles NOPs between properties and nodes.
//!
//! Addresses of devices below a bus are translated to CPU physical addresses through the `ranges`
//! properties of their ancestors; devices whose address cannot be translated are ignored.
//!
//! The parse runs in steps, one file each: `blob` checks the raw blob (header, structure block)
//! and strips NOPs; `reg` reads properties, cells and `reg` through the `ranges` translation;
//! `walk` goes over the tree and recognises the devices; `resolve` then turns their interrupt
//! specifiers into INTIDs through the GIC and picks the console. This file holds the types of
//! what comes out ([`Platform`] and its parts, [`PlatformError`]) and [`parse`].

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

mod blob;
mod reg;
mod resolve;
mod walk;

pub use blob::{blob_size, validate, Layout, FDT_HEADER_SIZE, FDT_MAGIC, MAX_BLOB_SIZE, MAX_DEPTH};
pub use resolve::gic_intids;

use blob::strip_nops;
use walk::parse_valid;

/// Why a DTB was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformError {
    /// Fewer bytes than the header or than the header's `totalsize`.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The first word is not [`FDT_MAGIC`].
    BadMagic {
        /// The word found instead.
        found: u32,
    },
    /// `totalsize` is smaller than the header or larger than [`MAX_BLOB_SIZE`].
    BadTotalSize {
        /// The header's `totalsize`.
        totalsize: u32,
    },
    /// The blob is older than version 17 or not backwards compatible with it.
    UnsupportedVersion {
        /// The header's `version`.
        version: u32,
        /// The header's `last_comp_version`.
        last_comp_version: u32,
    },
    /// The structure or strings block lies outside the blob or is misaligned.
    BadLayout(&'static str),
    /// The structure block is not a well-formed token stream.
    BadStructure {
        /// Byte offset inside the structure block.
        offset: usize,
        /// What is wrong there.
        what: &'static str,
    },
    /// A node the monitor relies on has a property that does not follow its binding.
    Malformed {
        /// The kind of node (e.g. `"gic"`, `"memory"`).
        node: &'static str,
        /// What is wrong with it.
        what: &'static str,
    },
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, available } => {
                write!(f, "DTB truncated: need {needed} bytes, have {available}")
            }
            Self::BadMagic { found } => write!(f, "DTB bad magic {found:#010x}"),
            Self::BadTotalSize { totalsize } => write!(f, "DTB bad totalsize {totalsize:#x}"),
            Self::UnsupportedVersion {
                version,
                last_comp_version,
            } => write!(
                f,
                "DTB version {version} (last compatible {last_comp_version}) not supported"
            ),
            Self::BadLayout(what) => write!(f, "DTB bad layout: {what}"),
            Self::BadStructure { offset, what } => {
                write!(f, "DTB bad structure block at offset {offset:#x}: {what}")
            }
            Self::Malformed { node, what } => write!(f, "DTB {node} node malformed: {what}"),
        }
    }
}

/// A range of physical addresses `[base, base + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// One past the last address (saturating at `u64::MAX`; [`parse`] only returns regions that
    /// do not wrap).
    pub const fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// True when `addr` lies inside the region.
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }
}

/// One CPU node under `/cpus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// The affinity fields of the CPU's MPIDR_EL1 (the node's `reg`).
    pub mpidr: u64,
}

/// An ARM PrimeCell PL011 UART (`arm,pl011`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pl011 {
    /// Its MMIO registers.
    pub region: Region,
    /// Its interrupt as a GIC INTID (SPI n is INTID 32 + n), when it is wired to the GIC.
    pub intid: Option<u32>,
}

/// Architecture version of the GIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicVersion {
    /// GICv2 (`arm,cortex-a15-gic`, `arm,gic-400`, ...): memory-mapped CPU interface.
    V2,
    /// GICv3 (`arm,gic-v3`): redistributors and a system-register CPU interface.
    V3,
}

impl GicVersion {
    /// The version as a number, 2 or 3.
    pub const fn number(self) -> u8 {
        match self {
            Self::V2 => 2,
            Self::V3 => 3,
        }
    }
}

/// The Generic Interrupt Controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gic {
    /// Architecture version.
    pub version: GicVersion,
    /// The distributor (GICD).
    pub distributor: Region,
    /// The redistributor regions (GICR); empty for GICv2.
    pub redistributors: Vec<Region>,
    /// The memory-mapped CPU interface (GICC): always present for GICv2, optional for GICv3.
    pub cpu_interface: Option<Region>,
    /// The virtual interface control registers (GICH), if the board exposes virtualization.
    pub hyp_interface: Option<Region>,
    /// The virtual CPU interface (GICV), if the board exposes virtualization.
    pub vcpu_interface: Option<Region>,
    /// The virtual interface maintenance interrupt as an INTID (PPI 9 is INTID 25).
    pub maintenance_intid: Option<u32>,
}

/// The four (or five) PPIs of the ARM generic timer (`arm,armv8-timer`), as INTIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timer {
    /// Secure EL1 physical timer (CNTPS).
    pub secure_phys: u32,
    /// Non-secure EL1 physical timer (CNTP).
    pub nonsecure_phys: u32,
    /// Virtual timer (CNTV).
    pub virt: u32,
    /// EL2 physical timer (CNTHP).
    pub hyp_phys: u32,
    /// EL2 virtual timer (CNTHV), present only on boards describing FEAT_VHE.
    pub hyp_virt: Option<u32>,
}

/// How PSCI calls reach the firmware (`/psci` `method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciConduit {
    /// `method = "smc"`: PSCI is implemented at EL3 (QEMU with `virtualization=on`).
    Smc,
    /// `method = "hvc"`: PSCI is implemented at EL2.
    Hvc,
}

/// One virtio-mmio transport slot (`virtio,mmio`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Its MMIO registers.
    pub region: Region,
    /// Its interrupt as a GIC INTID (SPI n is INTID 32 + n), when it is wired to the GIC.
    pub intid: Option<u32>,
}

/// Everything the monitor takes from the DTB.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Platform {
    /// RAM from every enabled `device_type = "memory"` node, in DT order (zero-sized ranges
    /// dropped). May be empty; it is the caller's choice whether that is fatal.
    pub ram: Vec<Region>,
    /// CPUs under `/cpus`, in DT order.
    pub cpus: Vec<Cpu>,
    /// The console UART: the PL011 named by `/chosen/stdout-path`, else the first PL011.
    pub uart: Option<Pl011>,
    /// The first GIC found.
    pub gic: Option<Gic>,
    /// The generic timer, when its interrupts are wired to the GIC.
    pub timer: Option<Timer>,
    /// The PSCI conduit.
    pub psci: Option<PsciConduit>,
    /// virtio-mmio transports, sorted by base address.
    pub virtio_mmio: Vec<VirtioMmio>,
    /// QEMU's fw_cfg registers (`qemu,fw-cfg-mmio`).
    pub fw_cfg: Option<Region>,
    /// `/chosen/bootargs`, the kernel command line.
    pub bootargs: Option<String>,
    /// `/chosen/linux,initrd-start` .. `linux,initrd-end`.
    pub initrd: Option<Region>,
    /// `/chosen/stdout-path` as written (including any `:options` suffix).
    pub stdout_path: Option<String>,
}

/// Parses a DTB (as QEMU's `virt` board produces it) into a [`Platform`].
///
/// `blob` may be longer than the DTB (e.g. the 1 MiB QEMU reserves); only `totalsize` bytes are
/// read. Absent optional devices come back as `None`/empty; malformed blobs and malformed nodes
/// of the devices listed in [`Platform`] are errors. Never panics.
pub fn parse(blob: &[u8]) -> Result<Platform, PlatformError> {
    let layout = validate(blob)?;
    let blob = &blob[..layout.total_size];
    if layout.has_nops {
        let stripped = strip_nops(blob, &layout);
        let again = validate(&stripped)?;
        if again.has_nops {
            return Err(PlatformError::BadLayout(
                "FDT_NOP tokens left after stripping",
            ));
        }
        return parse_valid(&stripped);
    }
    parse_valid(blob)
}
