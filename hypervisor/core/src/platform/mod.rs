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

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// `FDT_MAGIC`, the first big-endian word of every DTB.
pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// Size of the version 17 DTB header in bytes.
pub const FDT_HEADER_SIZE: usize = 40;
/// Largest DTB accepted: 2 MiB, the limit the Linux arm64 boot protocol puts on the DTB.
pub const MAX_BLOB_SIZE: usize = 2 << 20;
/// Deepest node nesting accepted (QEMU's `virt` tree is 6 deep).
pub const MAX_DEPTH: usize = 32;

const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

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

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads `totalsize` from a DTB header after checking the magic, so that a caller holding only a
/// pointer knows how many bytes to make a slice of. `header` needs at least the first 8 bytes.
pub fn blob_size(header: &[u8]) -> Result<usize, PlatformError> {
    let magic = be32(header, 0).ok_or(PlatformError::Truncated {
        needed: 8,
        available: header.len(),
    })?;
    if magic != FDT_MAGIC {
        return Err(PlatformError::BadMagic { found: magic });
    }
    let totalsize = be32(header, 4).ok_or(PlatformError::Truncated {
        needed: 8,
        available: header.len(),
    })?;
    let size = totalsize as usize;
    if !(FDT_HEADER_SIZE..=MAX_BLOB_SIZE).contains(&size) {
        return Err(PlatformError::BadTotalSize { totalsize });
    }
    Ok(size)
}

/// Where the blocks of a checked DTB lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `totalsize`.
    pub total_size: usize,
    /// Structure block offset (`off_dt_struct`) and length (`size_dt_struct`).
    pub structs: (usize, usize),
    /// Strings block offset (`off_dt_strings`) and length (`size_dt_strings`).
    pub strings: (usize, usize),
    /// Whether the structure block holds `FDT_NOP` tokens.
    pub has_nops: bool,
}

fn bad(offset: usize, what: &'static str) -> PlatformError {
    PlatformError::BadStructure { offset, what }
}

/// Checks a DTB's header and its whole structure block: every token known, nodes balanced and
/// at most [`MAX_DEPTH`] deep, a single root with an empty name, properties before child nodes,
/// names NUL-terminated UTF-8 inside their blocks, property values inside the structure block,
/// `#address-cells`/`#size-cells`/`#interrupt-cells` exactly one cell, and an `FDT_END` token.
pub fn validate(blob: &[u8]) -> Result<Layout, PlatformError> {
    let total_size = blob_size(blob)?;
    if blob.len() < total_size {
        return Err(PlatformError::Truncated {
            needed: total_size,
            available: blob.len(),
        });
    }
    let blob = &blob[..total_size];
    let word = |i: usize| {
        be32(blob, i * 4).ok_or(PlatformError::Truncated {
            needed: FDT_HEADER_SIZE,
            available: blob.len(),
        })
    };
    let (off_struct, off_strings, version, last_comp) = (word(2)?, word(3)?, word(5)?, word(6)?);
    let (size_strings, size_struct) = (word(8)?, word(9)?);
    if version < 17 || last_comp > 17 {
        return Err(PlatformError::UnsupportedVersion {
            version,
            last_comp_version: last_comp,
        });
    }
    let within = |off: u32, size: u32| (off as u64) + (size as u64) <= total_size as u64;
    if !within(off_struct, size_struct) || (off_struct as usize) < FDT_HEADER_SIZE {
        return Err(PlatformError::BadLayout("structure block outside the blob"));
    }
    if !within(off_strings, size_strings) || (off_strings as usize) < FDT_HEADER_SIZE {
        return Err(PlatformError::BadLayout("strings block outside the blob"));
    }
    if off_struct % 4 != 0 || size_struct % 4 != 0 {
        return Err(PlatformError::BadLayout(
            "structure block not 4-byte aligned",
        ));
    }
    let structs = &blob[off_struct as usize..(off_struct + size_struct) as usize];
    let strings = &blob[off_strings as usize..(off_strings + size_strings) as usize];

    #[derive(PartialEq)]
    enum State {
        BeforeRoot,
        Props,
        Children,
        AfterRoot,
    }
    let mut state = State::BeforeRoot;
    let mut depth = 0usize;
    let mut pos = 0usize;
    let mut has_nops = false;
    loop {
        let at = pos;
        let token = be32(structs, pos).ok_or(bad(at, "missing FDT_END"))?;
        pos += 4;
        match token {
            FDT_NOP => has_nops = true,
            FDT_BEGIN_NODE => {
                if state == State::AfterRoot {
                    return Err(bad(at, "second root node"));
                }
                let rest = &structs[pos..];
                let len = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(bad(at, "unterminated node name"))?;
                let name = core::str::from_utf8(&rest[..len])
                    .map_err(|_| bad(at, "node name not UTF-8"))?;
                if state == State::BeforeRoot && !name.is_empty() {
                    return Err(bad(at, "root node has a name"));
                }
                pos += (len + 1 + 3) & !3;
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(bad(at, "nodes nested too deep"));
                }
                state = State::Props;
            }
            FDT_PROP => {
                if state != State::Props {
                    return Err(bad(at, "property outside a node or after a child node"));
                }
                let len = be32(structs, pos).ok_or(bad(at, "truncated property"))? as usize;
                let name_off =
                    be32(structs, pos + 4).ok_or(bad(at, "truncated property"))? as usize;
                pos += 8;
                if structs.len() - pos.min(structs.len()) < len {
                    return Err(bad(at, "property value past the structure block"));
                }
                let name_bytes = strings
                    .get(name_off..)
                    .ok_or(bad(at, "property name offset past the strings block"))?;
                let name_len = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(bad(at, "unterminated property name"))?;
                let name = core::str::from_utf8(&name_bytes[..name_len])
                    .map_err(|_| bad(at, "property name not UTF-8"))?;
                if matches!(name, "#address-cells" | "#size-cells" | "#interrupt-cells") && len != 4
                {
                    return Err(bad(at, "cell count property is not one cell"));
                }
                pos += (len + 3) & !3;
            }
            FDT_END_NODE => {
                if depth == 0 {
                    return Err(bad(at, "FDT_END_NODE without a node"));
                }
                depth -= 1;
                state = if depth == 0 {
                    State::AfterRoot
                } else {
                    State::Children
                };
            }
            FDT_END => {
                if state != State::AfterRoot {
                    return Err(bad(at, "FDT_END inside a node or before the root"));
                }
                break;
            }
            _ => return Err(bad(at, "unknown token")),
        }
    }
    Ok(Layout {
        total_size,
        structs: (off_struct as usize, size_struct as usize),
        strings: (off_strings as usize, size_strings as usize),
        has_nops,
    })
}

/// Copies a validated blob without its `FDT_NOP` tokens: header, an empty memory reservation
/// block, the structure block and the strings block.
fn strip_nops(blob: &[u8], layout: &Layout) -> Vec<u8> {
    let structs = &blob[layout.structs.0..layout.structs.0 + layout.structs.1];
    let strings = &blob[layout.strings.0..layout.strings.0 + layout.strings.1];
    let mut body = Vec::with_capacity(structs.len());
    let mut pos = 0;
    // The stream was validated, so every read below is in bounds; `unwrap_or` keeps it panic-free
    // regardless and stops at FDT_END.
    while let Some(token) = be32(structs, pos) {
        let len = match token {
            FDT_BEGIN_NODE => {
                let name_len = structs
                    .get(pos + 4..)
                    .and_then(|rest| rest.iter().position(|&b| b == 0))
                    .unwrap_or(0);
                4 + ((name_len + 1 + 3) & !3)
            }
            FDT_PROP => 12 + ((be32(structs, pos + 4).unwrap_or(0) as usize + 3) & !3),
            _ => 4,
        };
        if token != FDT_NOP {
            body.extend_from_slice(structs.get(pos..pos + len).unwrap_or(&[]));
        }
        pos += len;
        if token == FDT_END {
            break;
        }
    }
    let off_rsvmap = FDT_HEADER_SIZE;
    let off_struct = off_rsvmap + 16;
    let off_strings = off_struct + body.len();
    let total = off_strings + strings.len();
    let mut out = Vec::with_capacity(total);
    for word in [
        FDT_MAGIC,
        total as u32,
        off_struct as u32,
        off_strings as u32,
        off_rsvmap as u32,
        17,
        16,
        be32(blob, 28).unwrap_or(0),
        strings.len() as u32,
        body.len() as u32,
    ] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&body);
    out.extend_from_slice(strings);
    out
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

/// How addresses in a node's `reg` map to CPU physical addresses.
#[derive(Clone, Debug)]
enum Translation {
    /// Child addresses are CPU physical addresses (the root, or `ranges;` all the way up).
    Identity,
    /// `(child base, CPU base, size)` windows from `ranges`.
    Windows(Vec<(u64, u64, u64)>),
    /// No `ranges` property: the bus's children are not CPU-addressable.
    None,
}

impl Translation {
    fn translate(&self, addr: u64, size: u64) -> Option<u64> {
        match self {
            Self::Identity => Some(addr),
            Self::Windows(windows) => windows.iter().find_map(|&(child, cpu, len)| {
                let off = addr.checked_sub(child)?;
                let end = off.checked_add(size)?;
                (end <= len).then(|| cpu.checked_add(off)).flatten()
            }),
            Self::None => None,
        }
    }
}

/// What a node's children inherit.
#[derive(Clone, Debug)]
struct Ctx {
    /// `#address-cells` and `#size-cells` of the parent: how to read this node's `reg`.
    address_cells: u32,
    size_cells: u32,
    translation: Translation,
    interrupt_parent: Option<u32>,
    path: String,
}

/// A device whose interrupt is resolved once the GIC is known.
struct Pending<'a, T> {
    device: T,
    interrupt_parent: Option<u32>,
    interrupts: Option<&'a [u8]>,
    path: String,
}

#[derive(Default)]
struct Collected<'a> {
    platform: Platform,
    uarts: Vec<Pending<'a, Pl011>>,
    virtio: Vec<Pending<'a, VirtioMmio>>,
    timer: Option<Pending<'a, ()>>,
    gic: Option<(Pending<'a, Gic>, Option<u32>, u32)>,
    aliases: Vec<(&'a str, &'a str)>,
}

type Node<'b, 'a> = fdt::node::FdtNode<'b, 'a>;

fn prop<'a>(node: Node<'_, 'a>, name: &str) -> Option<&'a [u8]> {
    node.properties().find(|p| p.name == name).map(|p| p.value)
}

fn prop_u32(node: Node<'_, '_>, name: &str) -> Option<u32> {
    prop(node, name).and_then(|v| be32(v, 0))
}

/// A string property without its trailing NUL; `None` when absent or not UTF-8.
fn prop_str<'a>(node: Node<'_, 'a>, name: &str) -> Option<&'a str> {
    let v = prop(node, name)?;
    let v = v.strip_suffix(&[0]).unwrap_or(v);
    core::str::from_utf8(v).ok()
}

fn compatible_with(node: Node<'_, '_>, any_of: &[&str]) -> bool {
    prop(node, "compatible")
        .map(|v| {
            v.split(|&b| b == 0)
                .any(|s| any_of.iter().any(|c| c.as_bytes() == s))
        })
        .unwrap_or(false)
}

fn enabled(node: Node<'_, '_>) -> bool {
    matches!(prop_str(node, "status"), None | Some("okay") | Some("ok"))
}

/// Reads a big-endian number of `cells` cells; more than two cells are accepted when the high
/// cells are zero.
fn read_cells(bytes: &[u8], cells: u32) -> Option<u64> {
    let mut value: u64 = 0;
    for i in 0..cells as usize {
        if value >> 32 != 0 {
            return None;
        }
        value = (value << 32) | u64::from(be32(bytes, i * 4)?);
    }
    Some(value)
}

/// Splits a `reg`-like list of `(address, size)` pairs.
fn pairs(
    value: &[u8],
    address_cells: u32,
    size_cells: u32,
    node: &'static str,
) -> Result<Vec<(u64, u64)>, PlatformError> {
    let malformed = |what| PlatformError::Malformed { node, what };
    if address_cells > 4 || size_cells > 4 {
        return Err(malformed("#address-cells or #size-cells above 4"));
    }
    let entry = (address_cells + size_cells) as usize * 4;
    if entry == 0 || !value.len().is_multiple_of(entry) {
        return Err(malformed("reg length is not a whole number of entries"));
    }
    value
        .chunks_exact(entry)
        .map(|e| {
            let addr =
                read_cells(e, address_cells).ok_or(malformed("address wider than 64 bits"))?;
            let size = read_cells(&e[address_cells as usize * 4..], size_cells)
                .ok_or(malformed("size wider than 64 bits"))?;
            Ok((addr, size))
        })
        .collect()
}

/// A node's `reg` as CPU-physical regions, or `None` when it has no `reg` or its addresses are
/// not CPU-addressable.
fn regions(
    node: Node<'_, '_>,
    ctx: &Ctx,
    kind: &'static str,
) -> Result<Option<Vec<Region>>, PlatformError> {
    let Some(value) = prop(node, "reg") else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (addr, size) in pairs(value, ctx.address_cells, ctx.size_cells, kind)? {
        if addr.checked_add(size).is_none() {
            return Err(PlatformError::Malformed {
                node: kind,
                what: "region wraps around",
            });
        }
        match ctx.translation.translate(addr, size) {
            Some(base) if base.checked_add(size).is_some() => out.push(Region { base, size }),
            _ => {
                log::debug!("{}: reg {addr:#x} not CPU-addressable, ignored", ctx.path);
                return Ok(None);
            }
        }
    }
    Ok(Some(out))
}

fn first_region(
    node: Node<'_, '_>,
    ctx: &Ctx,
    kind: &'static str,
) -> Result<Option<Region>, PlatformError> {
    match regions(node, ctx, kind)? {
        None => Ok(None),
        Some(r) => r
            .first()
            .copied()
            .map(Some)
            .ok_or(PlatformError::Malformed {
                node: kind,
                what: "empty reg",
            }),
    }
}

const GIC_V3: &[&str] = &["arm,gic-v3"];
const GIC_V2: &[&str] = &[
    "arm,cortex-a15-gic",
    "arm,gic-400",
    "arm,cortex-a9-gic",
    "arm,cortex-a7-gic",
    "arm,arm11mp-gic",
];
const TIMER: &[&str] = &["arm,armv8-timer", "arm,armv7-timer"];
const PSCI: &[&str] = &["arm,psci-1.0", "arm,psci-0.2", "arm,psci"];

fn parse_valid(blob: &[u8]) -> Result<Platform, PlatformError> {
    let fdt =
        fdt::Fdt::new(blob).map_err(|_| PlatformError::BadLayout("rejected by the fdt crate"))?;
    let root = fdt
        .find_node("/")
        .ok_or(PlatformError::BadLayout("no root node"))?;
    let ctx = Ctx {
        address_cells: 2,
        size_cells: 1,
        translation: Translation::Identity,
        interrupt_parent: None,
        path: String::new(),
    };
    let mut c = Collected::default();
    walk(root, &ctx, 0, &mut c)?;
    finish(c)
}

fn walk<'a>(
    node: Node<'_, 'a>,
    ctx: &Ctx,
    depth: usize,
    c: &mut Collected<'a>,
) -> Result<(), PlatformError> {
    let is_root = depth == 0;
    let name = node.name;
    let base_name = name.split('@').next().unwrap_or(name);
    if !is_root && !enabled(node) {
        return Ok(());
    }

    if depth == 1 && base_name == "chosen" {
        chosen(node, &mut c.platform)?;
    } else if depth == 1 && base_name == "aliases" {
        for p in node.properties() {
            let v = p.value.strip_suffix(&[0]).unwrap_or(p.value);
            if let Ok(target) = core::str::from_utf8(v) {
                c.aliases.push((p.name, target));
            }
        }
    } else if depth == 1 && base_name == "cpus" {
        cpus(node, &mut c.platform)?;
        return Ok(());
    } else if !is_root {
        device(node, ctx, c)?;
    }

    // What the children inherit from this node.
    let address_cells = prop_u32(node, "#address-cells").unwrap_or(2);
    let size_cells = prop_u32(node, "#size-cells").unwrap_or(1);
    let interrupt_parent = prop_u32(node, "interrupt-parent").or(ctx.interrupt_parent);
    let mut path = ctx.path.clone();
    if !is_root {
        path.push('/');
        path.push_str(name);
    }
    let mut children = node.children().peekable();
    if children.peek().is_none() {
        return Ok(());
    }
    let translation = if is_root {
        Translation::Identity
    } else {
        child_translation(node, ctx, address_cells, size_cells)
    };
    let child_ctx = Ctx {
        address_cells,
        size_cells,
        translation,
        interrupt_parent,
        path,
    };
    for child in children {
        walk(child, &child_ctx, depth + 1, c)?;
    }
    Ok(())
}

/// The translation for the children of `node` from its `ranges`. Entries that cannot be
/// expressed (e.g. PCI addresses of three cells) are skipped rather than failing the parse.
fn child_translation(
    node: Node<'_, '_>,
    ctx: &Ctx,
    address_cells: u32,
    size_cells: u32,
) -> Translation {
    let Some(ranges) = prop(node, "ranges") else {
        return Translation::None;
    };
    if ranges.is_empty() {
        return ctx.translation.clone();
    }
    if address_cells > 4 || ctx.address_cells > 4 || size_cells > 4 {
        return Translation::None;
    }
    let entry = (address_cells + ctx.address_cells + size_cells) as usize * 4;
    if entry == 0 {
        return Translation::None;
    }
    let windows = ranges
        .chunks_exact(entry)
        .filter_map(|e| {
            let child = read_cells(e, address_cells)?;
            let parent = read_cells(e.get(address_cells as usize * 4..)?, ctx.address_cells)?;
            let size = read_cells(
                e.get((address_cells + ctx.address_cells) as usize * 4..)?,
                size_cells,
            )?;
            let cpu = ctx.translation.translate(parent, size)?;
            Some((child, cpu, size))
        })
        .collect();
    Translation::Windows(windows)
}

fn chosen(node: Node<'_, '_>, p: &mut Platform) -> Result<(), PlatformError> {
    p.bootargs = prop_str(node, "bootargs").map(String::from);
    p.stdout_path = prop_str(node, "stdout-path").map(String::from);
    let addr = |name| -> Result<Option<u64>, PlatformError> {
        match prop(node, name) {
            None => Ok(None),
            Some(v) if v.len() == 4 || v.len() == 8 => Ok(read_cells(v, v.len() as u32 / 4)),
            Some(_) => Err(PlatformError::Malformed {
                node: "chosen",
                what: "initrd address not 1 or 2 cells",
            }),
        }
    };
    p.initrd = match (addr("linux,initrd-start")?, addr("linux,initrd-end")?) {
        (Some(start), Some(end)) if end >= start => Some(Region {
            base: start,
            size: end - start,
        }),
        (Some(_), Some(_)) => {
            return Err(PlatformError::Malformed {
                node: "chosen",
                what: "initrd ends before it starts",
            })
        }
        (None, None) => None,
        _ => {
            return Err(PlatformError::Malformed {
                node: "chosen",
                what: "only one of initrd-start/end",
            })
        }
    };
    Ok(())
}

fn cpus(node: Node<'_, '_>, p: &mut Platform) -> Result<(), PlatformError> {
    let address_cells = prop_u32(node, "#address-cells").unwrap_or(2);
    if !(1..=2).contains(&address_cells) {
        return Err(PlatformError::Malformed {
            node: "cpus",
            what: "#address-cells not 1 or 2",
        });
    }
    for cpu in node.children() {
        let is_cpu = prop_str(cpu, "device_type") == Some("cpu")
            || cpu.name.split('@').next() == Some("cpu");
        if !is_cpu || !enabled(cpu) {
            continue;
        }
        let reg = prop(cpu, "reg").ok_or(PlatformError::Malformed {
            node: "cpu",
            what: "no reg",
        })?;
        if reg.len() != address_cells as usize * 4 {
            return Err(PlatformError::Malformed {
                node: "cpu",
                what: "reg is not one MPIDR",
            });
        }
        let mpidr = read_cells(reg, address_cells).ok_or(PlatformError::Malformed {
            node: "cpu",
            what: "bad reg",
        })?;
        p.cpus.push(Cpu { mpidr });
    }
    Ok(())
}

fn pending<'a, T>(node: Node<'_, 'a>, ctx: &Ctx, device: T) -> Pending<'a, T> {
    let mut path = ctx.path.clone();
    path.push('/');
    path.push_str(node.name);
    Pending {
        device,
        interrupt_parent: prop_u32(node, "interrupt-parent").or(ctx.interrupt_parent),
        interrupts: prop(node, "interrupts"),
        path,
    }
}

fn device<'a>(node: Node<'_, 'a>, ctx: &Ctx, c: &mut Collected<'a>) -> Result<(), PlatformError> {
    if prop_str(node, "device_type") == Some("memory") {
        if let Some(regions) = regions(node, ctx, "memory")? {
            c.platform
                .ram
                .extend(regions.into_iter().filter(|r| r.size != 0));
        }
    } else if compatible_with(node, &["arm,pl011"]) {
        if let Some(region) = first_region(node, ctx, "pl011")? {
            c.uarts.push(pending(
                node,
                ctx,
                Pl011 {
                    region,
                    intid: None,
                },
            ));
        }
    } else if compatible_with(node, &["virtio,mmio"]) {
        if let Some(region) = first_region(node, ctx, "virtio-mmio")? {
            c.virtio.push(pending(
                node,
                ctx,
                VirtioMmio {
                    region,
                    intid: None,
                },
            ));
        }
    } else if compatible_with(node, &["qemu,fw-cfg-mmio"]) {
        if c.platform.fw_cfg.is_none() {
            c.platform.fw_cfg = first_region(node, ctx, "fw-cfg")?;
        }
    } else if compatible_with(node, TIMER) {
        if c.timer.is_none() {
            c.timer = Some(pending(node, ctx, ()));
        }
    } else if compatible_with(node, PSCI) {
        if c.platform.psci.is_none() {
            c.platform.psci = match prop_str(node, "method") {
                Some("smc") => Some(PsciConduit::Smc),
                Some("hvc") => Some(PsciConduit::Hvc),
                _ => {
                    return Err(PlatformError::Malformed {
                        node: "psci",
                        what: "method is not smc or hvc",
                    })
                }
            };
        }
    } else if c.gic.is_none() && (compatible_with(node, GIC_V3) || compatible_with(node, GIC_V2)) {
        let gic = gic(node, ctx)?;
        let phandle = prop_u32(node, "phandle").or_else(|| prop_u32(node, "linux,phandle"));
        let cells = prop_u32(node, "#interrupt-cells").unwrap_or(0);
        if let Some(gic) = gic {
            c.gic = Some((pending(node, ctx, gic), phandle, cells));
        }
    }
    Ok(())
}

fn gic(node: Node<'_, '_>, ctx: &Ctx) -> Result<Option<Gic>, PlatformError> {
    let malformed = |what| PlatformError::Malformed { node: "gic", what };
    let Some(regs) = regions(node, ctx, "gic")? else {
        return Ok(None);
    };
    let mut regs = regs.into_iter();
    let distributor = regs.next().ok_or(malformed("no distributor in reg"))?;
    if compatible_with(node, GIC_V3) {
        let count = prop_u32(node, "#redistributor-regions").unwrap_or(1) as usize;
        if count == 0 {
            return Err(malformed("#redistributor-regions is 0"));
        }
        let redistributors: Vec<Region> = regs.by_ref().take(count).collect();
        if redistributors.len() != count {
            return Err(malformed(
                "fewer redistributor regions than #redistributor-regions",
            ));
        }
        Ok(Some(Gic {
            version: GicVersion::V3,
            distributor,
            redistributors,
            cpu_interface: regs.next(),
            hyp_interface: regs.next(),
            vcpu_interface: regs.next(),
            maintenance_intid: None,
        }))
    } else {
        let cpu_interface = Some(regs.next().ok_or(malformed("no CPU interface in reg"))?);
        Ok(Some(Gic {
            version: GicVersion::V2,
            distributor,
            redistributors: Vec::new(),
            cpu_interface,
            hyp_interface: regs.next(),
            vcpu_interface: regs.next(),
            maintenance_intid: None,
        }))
    }
}

/// Decodes a GIC interrupt specifier list (`cells` >= 3 cells each: type, number, flags) into
/// INTIDs: SPI n is 32 + n, PPI n is 16 + n, extended SPI n is 4096 + n, extended PPI n is
/// 1056 + n.
pub fn gic_intids(spec: &[u8], cells: u32) -> Result<Vec<u32>, PlatformError> {
    let malformed = |what| PlatformError::Malformed {
        node: "interrupts",
        what,
    };
    if !(3..=4).contains(&cells) {
        return Err(malformed("GIC #interrupt-cells is not 3 or 4"));
    }
    let entry = cells as usize * 4;
    if !spec.len().is_multiple_of(entry) {
        return Err(malformed("length is not a whole number of specifiers"));
    }
    spec.chunks_exact(entry)
        .map(|e| {
            let kind = be32(e, 0).unwrap_or(u32::MAX);
            let n = be32(e, 4).unwrap_or(u32::MAX);
            match kind {
                0 if n < 988 => Ok(32 + n),
                1 if n < 16 => Ok(16 + n),
                2 if n < 1024 => Ok(4096 + n),
                3 if n < 64 => Ok(1056 + n),
                0..=3 => Err(malformed("interrupt number out of range for its type")),
                _ => Err(malformed("unknown interrupt type")),
            }
        })
        .collect()
}

fn finish(c: Collected<'_>) -> Result<Platform, PlatformError> {
    let mut p = c.platform;
    let (gic_phandle, gic_cells) = match &c.gic {
        Some((_, phandle, cells)) => (*phandle, *cells),
        None => (None, 0),
    };
    // INTIDs of a device, when its interrupt parent is the GIC.
    let intids = |interrupt_parent: Option<u32>,
                  spec: Option<&[u8]>|
     -> Result<Option<Vec<u32>>, PlatformError> {
        match (spec, gic_phandle) {
            (Some(spec), Some(gic)) if interrupt_parent == Some(gic) => {
                gic_intids(spec, gic_cells).map(Some)
            }
            _ => Ok(None),
        }
    };

    if let Some((pending, _, _)) = c.gic {
        let mut gic = pending.device;
        gic.maintenance_intid =
            intids(pending.interrupt_parent, pending.interrupts)?.and_then(|v| v.first().copied());
        p.gic = Some(gic);
    }

    if let Some(t) = c.timer {
        if let Some(v) = intids(t.interrupt_parent, t.interrupts)? {
            if v.len() < 4 {
                return Err(PlatformError::Malformed {
                    node: "timer",
                    what: "fewer than four interrupts",
                });
            }
            p.timer = Some(Timer {
                secure_phys: v[0],
                nonsecure_phys: v[1],
                virt: v[2],
                hyp_phys: v[3],
                hyp_virt: v.get(4).copied(),
            });
        }
    }

    // The console: stdout-path (possibly an alias, possibly with ":options") else the first.
    let stdout = p
        .stdout_path
        .as_deref()
        .map(|s| s.split(':').next().unwrap_or(s))
        .map(|s| {
            if s.starts_with('/') {
                s
            } else {
                c.aliases
                    .iter()
                    .find(|(alias, _)| *alias == s)
                    .map(|(_, t)| *t)
                    .unwrap_or(s)
            }
        });
    let console = c
        .uarts
        .iter()
        .position(|u| Some(u.path.as_str()) == stdout)
        .unwrap_or(0);
    if let Some(u) = c.uarts.get(console) {
        let intid = intids(u.interrupt_parent, u.interrupts)?.and_then(|v| v.first().copied());
        p.uart = Some(Pl011 { intid, ..u.device });
    }

    for v in c.virtio {
        let intid = intids(v.interrupt_parent, v.interrupts)?.and_then(|i| i.first().copied());
        p.virtio_mmio.push(VirtioMmio { intid, ..v.device });
    }
    p.virtio_mmio.sort_by_key(|v| v.region.base);
    Ok(p)
}
