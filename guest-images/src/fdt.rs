//! A small, panic-free reader for flattened device trees (DTB), and the extraction of the few
//! facts the guests need ([`Platform`]).
//!
//! The format is the Devicetree Specification v0.4, chapter 5: a 40-byte big-endian header, a
//! structure block of 32-bit tokens (`FDT_BEGIN_NODE` name, `FDT_PROP` len nameoff value,
//! `FDT_END_NODE`, `FDT_NOP`, `FDT_END`) and a strings block holding property names. Every offset
//! and length is bounds-checked: a malformed blob yields a [`DtbError`], never a panic. (The `fdt`
//! crate would do the reading, but it panics on several malformed inputs.)
//!
//! Addresses in `reg` are taken as they are: `ranges` translation is not applied, which is right
//! for QEMU `virt` and for the monitor's DTB (every device sits directly under the root).

use crate::bootargs::{BootArgs, BootArgsError};
use crate::psci_abi::Conduit;
use crate::MAX_CPUS;
use core::fmt;

/// The DTB magic number, stored big-endian at offset 0.
pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// Size of the DTB header (version 17).
pub const FDT_HEADER_SIZE: usize = 40;
/// Largest DTB the reader accepts (QEMU's is 1 MiB at most).
pub const FDT_MAX_SIZE: usize = 2 << 20;
/// Most `/memory` regions recorded in a [`Platform`].
pub const MAX_MEMORY_REGIONS: usize = 8;

const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
const MAX_DEPTH: usize = 16;

/// Why a DTB could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtbError {
    /// The first word is not [`FDT_MAGIC`].
    BadMagic(u32),
    /// The blob is shorter than its header says, or a block lies outside it.
    Truncated,
    /// `totalsize` exceeds [`FDT_MAX_SIZE`].
    TooLarge(u32),
    /// `last_comp_version` is newer than 17 or `version` older than 16.
    UnsupportedVersion(u32),
    /// An unknown token in the structure block, at this offset within the block.
    BadToken {
        /// Offset of the token within the structure block.
        offset: usize,
        /// The token value.
        token: u32,
    },
    /// A node or property name is not NUL-terminated within its block.
    BadString,
    /// Nodes nest deeper than the reader's limit.
    TooDeep,
    /// `FDT_END_NODE` without a matching `FDT_BEGIN_NODE`, or `FDT_END` inside a node.
    Unbalanced,
    /// A property the guests rely on has the wrong size or value.
    BadProperty(&'static str),
    /// More CPU nodes than [`MAX_CPUS`].
    TooManyCpus,
    /// More memory regions than [`MAX_MEMORY_REGIONS`].
    TooManyMemoryRegions,
    /// `/chosen/bootargs` is unusable.
    Bootargs(BootArgsError),
}

impl fmt::Display for DtbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "bad DTB magic {m:#010x} (want {FDT_MAGIC:#010x})"),
            Self::Truncated => write!(f, "DTB truncated: a block lies outside totalsize"),
            Self::TooLarge(s) => write!(f, "DTB totalsize {s:#x} exceeds {FDT_MAX_SIZE:#x}"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported DTB version {v}"),
            Self::BadToken { offset, token } => {
                write!(
                    f,
                    "bad DTB token {token:#x} at structure offset {offset:#x}"
                )
            }
            Self::BadString => write!(f, "DTB name not NUL-terminated"),
            Self::TooDeep => write!(f, "DTB nodes nest deeper than {MAX_DEPTH}"),
            Self::Unbalanced => write!(f, "DTB node begin/end tokens do not match"),
            Self::BadProperty(p) => write!(f, "bad DTB property: {p}"),
            Self::TooManyCpus => write!(f, "DTB lists more than {MAX_CPUS} cpus"),
            Self::TooManyMemoryRegions => {
                write!(f, "DTB lists more than {MAX_MEMORY_REGIONS} memory regions")
            }
            Self::Bootargs(e) => write!(f, "/chosen/bootargs: {e}"),
        }
    }
}

fn be32(data: &[u8], offset: usize) -> Option<u32> {
    let bytes = data.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Returns `totalsize` from a DTB header after checking the magic and the size limit; `header`
/// needs only the first 8 bytes. Used to learn how much memory to look at behind a raw pointer.
pub fn total_size(header: &[u8]) -> Result<usize, DtbError> {
    let magic = be32(header, 0).ok_or(DtbError::Truncated)?;
    if magic != FDT_MAGIC {
        return Err(DtbError::BadMagic(magic));
    }
    let size = be32(header, 4).ok_or(DtbError::Truncated)?;
    if size as usize > FDT_MAX_SIZE {
        return Err(DtbError::TooLarge(size));
    }
    if (size as usize) < FDT_HEADER_SIZE {
        return Err(DtbError::Truncated);
    }
    Ok(size as usize)
}

/// A checked view of a DTB in memory.
#[derive(Debug, Clone, Copy)]
pub struct Fdt<'a> {
    structure: &'a [u8],
    strings: &'a [u8],
}

impl<'a> Fdt<'a> {
    /// Checks the header of `data` and locates the structure and strings blocks.
    pub fn new(data: &'a [u8]) -> Result<Self, DtbError> {
        let total = total_size(data)?;
        let data = data.get(..total).ok_or(DtbError::Truncated)?;
        let field = |i: usize| be32(data, i * 4).ok_or(DtbError::Truncated);
        let (off_struct, off_strings) = (field(2)? as usize, field(3)? as usize);
        let (version, last_comp) = (field(5)?, field(6)?);
        if version < 16 || last_comp > 17 {
            return Err(DtbError::UnsupportedVersion(version));
        }
        let size_strings = field(8)? as usize;
        // size_dt_struct only exists from version 17 on.
        let size_struct = if version >= 17 {
            field(9)? as usize
        } else {
            total.saturating_sub(off_struct)
        };
        let block = |off: usize, len: usize| {
            off.checked_add(len)
                .and_then(|end| data.get(off..end))
                .ok_or(DtbError::Truncated)
        };
        Ok(Self {
            structure: block(off_struct, size_struct)?,
            strings: block(off_strings, size_strings)?,
        })
    }

    /// Iterates over the structure block's tokens (NOPs skipped). The iterator ends after
    /// `FDT_END` or after yielding the first error.
    pub fn tokens(&self) -> Tokens<'a> {
        Tokens {
            fdt: *self,
            offset: 0,
            done: false,
        }
    }

    fn string_at(&self, offset: usize) -> Result<&'a [u8], DtbError> {
        let tail = self.strings.get(offset..).ok_or(DtbError::BadString)?;
        let len = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or(DtbError::BadString)?;
        Ok(&tail[..len])
    }
}

/// One token of the structure block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// Start of a node, with its name (`unit-name@unit-address`; empty for the root).
    BeginNode(&'a [u8]),
    /// End of the innermost open node.
    EndNode,
    /// A property of the innermost open node.
    Property {
        /// Property name from the strings block.
        name: &'a [u8],
        /// Raw property value.
        value: &'a [u8],
    },
}

/// Iterator over a DTB's tokens; see [`Fdt::tokens`].
#[derive(Debug, Clone)]
pub struct Tokens<'a> {
    fdt: Fdt<'a>,
    offset: usize,
    done: bool,
}

impl<'a> Tokens<'a> {
    fn next_token(&mut self) -> Result<Option<Token<'a>>, DtbError> {
        let s = self.fdt.structure;
        loop {
            let at = self.offset;
            let token = be32(s, at).ok_or(DtbError::Truncated)?;
            self.offset = at + 4;
            match token {
                FDT_NOP => continue,
                FDT_END => return Ok(None),
                FDT_END_NODE => return Ok(Some(Token::EndNode)),
                FDT_BEGIN_NODE => {
                    let tail = s.get(self.offset..).ok_or(DtbError::Truncated)?;
                    let len = tail
                        .iter()
                        .position(|&b| b == 0)
                        .ok_or(DtbError::BadString)?;
                    self.offset = align4(self.offset + len + 1);
                    return Ok(Some(Token::BeginNode(&tail[..len])));
                }
                FDT_PROP => {
                    let len = be32(s, self.offset).ok_or(DtbError::Truncated)? as usize;
                    let name_off = be32(s, self.offset + 4).ok_or(DtbError::Truncated)? as usize;
                    let start = self.offset + 8;
                    let value = start
                        .checked_add(len)
                        .and_then(|end| s.get(start..end))
                        .ok_or(DtbError::Truncated)?;
                    self.offset = align4(start + len);
                    let name = self.fdt.string_at(name_off)?;
                    return Ok(Some(Token::Property { name, value }));
                }
                other => {
                    return Err(DtbError::BadToken {
                        offset: at,
                        token: other,
                    })
                }
            }
        }
    }
}

fn align4(x: usize) -> usize {
    (x + 3) & !3
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Result<Token<'a>, DtbError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_token() {
            Ok(Some(t)) => Some(Ok(t)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// A `reg` entry: physical base address and size in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl MemoryRegion {
    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// Whether `addr` lies inside the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
}

/// The GICv3 frames named by the `arm,gic-v3` node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicRegions {
    /// Distributor (GICD) base.
    pub distributor: u64,
    /// First redistributor region (GICR frames, one pair of 64 KiB frames per CPU).
    pub redistributors: MemoryRegion,
}

/// What the guests need from the DTB.
#[derive(Debug, Clone)]
pub struct Platform {
    /// Base of the first `arm,pl011` UART.
    pub uart: Option<u64>,
    /// INTID of that UART's interrupt (its `interrupts` property in the `arm,gic-v3` binding;
    /// `None` without one or with one that is not an SPI or PPI).
    pub uart_intid: Option<u32>,
    /// GICv3 distributor and redistributor region.
    pub gic: Option<GicRegions>,
    /// PSCI conduit from `/psci` `method`.
    pub psci: Option<Conduit>,
    /// The `microsoft,vmgenid` page (its first `reg`), when the DTB has one.
    pub vmgenid: Option<MemoryRegion>,
    /// `/chosen/bootargs` (empty when absent).
    pub bootargs: BootArgs,
    cpus: [u64; MAX_CPUS],
    cpu_count: usize,
    memory: [MemoryRegion; MAX_MEMORY_REGIONS],
    memory_count: usize,
}

impl Platform {
    /// The CPUs' MPIDR affinity values (`/cpus/cpu@*` `reg`), in DTB order; a CPU's position in
    /// this list is its CPU index.
    pub fn cpus(&self) -> &[u64] {
        &self.cpus[..self.cpu_count]
    }

    /// The RAM regions from the memory node(s), in DTB order.
    pub fn memory(&self) -> &[MemoryRegion] {
        &self.memory[..self.memory_count]
    }

    /// The memory region holding `addr`, if any.
    pub fn memory_containing(&self, addr: u64) -> Option<MemoryRegion> {
        self.memory().iter().copied().find(|r| r.contains(addr))
    }

    /// The CPU index whose DTB MPIDR equals `affinity` (MPIDR_EL1 with only Aff3..Aff0 kept).
    pub fn cpu_index(&self, affinity: u64) -> Option<usize> {
        self.cpus().iter().position(|&m| m == affinity)
    }

    /// Reads the facts the guests need from `fdt` in one pass over its nodes.
    pub fn from_fdt(fdt: &Fdt<'_>) -> Result<Self, DtbError> {
        let mut p = Platform {
            uart: None,
            uart_intid: None,
            gic: None,
            psci: None,
            vmgenid: None,
            bootargs: BootArgs::empty(),
            cpus: [0; MAX_CPUS],
            cpu_count: 0,
            memory: [MemoryRegion::default(); MAX_MEMORY_REGIONS],
            memory_count: 0,
        };
        let mut stack = [Node::default(); MAX_DEPTH];
        let mut depth = 0usize;
        let mut ended = false;
        for token in fdt.tokens() {
            match token? {
                Token::BeginNode(name) => {
                    if depth > 0 {
                        p.finish_node(&mut stack, depth)?;
                    }
                    if depth == MAX_DEPTH {
                        return Err(DtbError::TooDeep);
                    }
                    stack[depth] = Node {
                        name,
                        ..Node::default()
                    };
                    depth += 1;
                }
                Token::EndNode => {
                    if depth == 0 {
                        return Err(DtbError::Unbalanced);
                    }
                    p.finish_node(&mut stack, depth)?;
                    depth -= 1;
                    if depth == 0 {
                        ended = true;
                    }
                }
                Token::Property { name, value } => {
                    if depth == 0 {
                        return Err(DtbError::Unbalanced);
                    }
                    stack[depth - 1].set(name, value)?;
                }
            }
        }
        if depth != 0 || !ended {
            return Err(DtbError::Unbalanced);
        }
        Ok(p)
    }

    /// Interprets the node at `stack[depth - 1]` once all its properties have been seen.
    fn finish_node(
        &mut self,
        stack: &mut [Node<'_>; MAX_DEPTH],
        depth: usize,
    ) -> Result<(), DtbError> {
        let node = stack[depth - 1];
        if node.finished {
            return Ok(());
        }
        stack[depth - 1].finished = true;
        if depth < 2 {
            return Ok(());
        }
        let parent = stack[depth - 2];
        let base_name = node.name.split(|&b| b == b'@').next().unwrap_or(&[]);
        let regs = || RegIter::new(node.reg, parent.address_cells, parent.size_cells);

        if depth == 2 && (node.device_type == b"memory" || base_name == b"memory") {
            for r in regs()? {
                let r = r?;
                if r.size == 0 {
                    continue;
                }
                if self.memory_count == MAX_MEMORY_REGIONS {
                    return Err(DtbError::TooManyMemoryRegions);
                }
                self.memory[self.memory_count] = r;
                self.memory_count += 1;
            }
        }
        if depth == 2 && node.name == b"chosen" {
            if let Some(args) = node.bootargs {
                self.bootargs = BootArgs::from_property(args).map_err(DtbError::Bootargs)?;
            }
        }
        let parent_name = parent.name.split(|&b| b == b'@').next().unwrap_or(&[]);
        if depth == 3
            && parent_name == b"cpus"
            && (node.device_type == b"cpu" || base_name == b"cpu")
        {
            let mpidr = regs()?
                .next()
                .ok_or(DtbError::BadProperty("cpu node without reg"))??
                .base;
            if self.cpu_count == MAX_CPUS {
                return Err(DtbError::TooManyCpus);
            }
            self.cpus[self.cpu_count] = mpidr;
            self.cpu_count += 1;
        }
        if self.uart.is_none() && has_compatible(node.compatible, b"arm,pl011") {
            let r = regs()?
                .next()
                .ok_or(DtbError::BadProperty("pl011 without reg"))??;
            self.uart = Some(r.base);
            self.uart_intid = crate::gic_abi::intid_from_dt(node.interrupts);
        }
        if self.gic.is_none() && has_compatible(node.compatible, b"arm,gic-v3") {
            let mut it = regs()?;
            let d = it
                .next()
                .ok_or(DtbError::BadProperty("gic-v3 without GICD reg"))??;
            let r = it
                .next()
                .ok_or(DtbError::BadProperty("gic-v3 without GICR reg"))??;
            self.gic = Some(GicRegions {
                distributor: d.base,
                redistributors: r,
            });
        }
        if self.vmgenid.is_none() && has_compatible(node.compatible, b"microsoft,vmgenid") {
            self.vmgenid = regs()?.next().transpose()?;
        }
        if self.psci.is_none()
            && (has_compatible(node.compatible, b"arm,psci")
                || has_compatible(node.compatible, b"arm,psci-0.2")
                || has_compatible(node.compatible, b"arm,psci-1.0"))
        {
            let method = node.method.split(|&b| b == 0).next().unwrap_or(&[]);
            self.psci = Some(match method {
                b"hvc" => Conduit::Hvc,
                b"smc" => Conduit::Smc,
                _ => return Err(DtbError::BadProperty("psci method is neither hvc nor smc")),
            });
        }
        Ok(())
    }
}

/// Properties of an open node that matter to [`Platform::from_fdt`].
#[derive(Debug, Clone, Copy)]
struct Node<'a> {
    name: &'a [u8],
    compatible: &'a [u8],
    reg: &'a [u8],
    device_type: &'a [u8],
    method: &'a [u8],
    interrupts: &'a [u8],
    bootargs: Option<&'a [u8]>,
    /// `#address-cells` / `#size-cells` for this node's children (defaults 2 and 1).
    address_cells: u32,
    size_cells: u32,
    finished: bool,
}

impl Default for Node<'_> {
    fn default() -> Self {
        Node {
            name: &[],
            compatible: &[],
            reg: &[],
            device_type: &[],
            method: &[],
            interrupts: &[],
            bootargs: None,
            address_cells: 2,
            size_cells: 1,
            finished: false,
        }
    }
}

impl<'a> Node<'a> {
    fn set(&mut self, name: &'a [u8], value: &'a [u8]) -> Result<(), DtbError> {
        let cells = |what| match value {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => Err(DtbError::BadProperty(what)),
        };
        match name {
            b"compatible" => self.compatible = value,
            b"reg" => self.reg = value,
            b"device_type" => self.device_type = value.strip_suffix(&[0]).unwrap_or(value),
            b"method" => self.method = value,
            b"interrupts" => self.interrupts = value,
            b"bootargs" => self.bootargs = Some(value),
            b"#address-cells" => self.address_cells = cells("#address-cells is not one cell")?,
            b"#size-cells" => self.size_cells = cells("#size-cells is not one cell")?,
            _ => {}
        }
        Ok(())
    }
}

/// Whether a `compatible` string list contains `want`.
fn has_compatible(list: &[u8], want: &[u8]) -> bool {
    list.split(|&b| b == 0).any(|s| s == want)
}

/// Iterator over `reg` entries with the parent's cell counts.
struct RegIter<'a> {
    data: &'a [u8],
    address_cells: usize,
    size_cells: usize,
}

impl<'a> RegIter<'a> {
    fn new(data: &'a [u8], address_cells: u32, size_cells: u32) -> Result<Self, DtbError> {
        if !(1..=2).contains(&address_cells) || size_cells > 2 {
            return Err(DtbError::BadProperty(
                "unsupported #address-cells/#size-cells",
            ));
        }
        let entry = (address_cells + size_cells) as usize * 4;
        if !data.len().is_multiple_of(entry) {
            return Err(DtbError::BadProperty(
                "reg length is not a whole number of entries",
            ));
        }
        Ok(Self {
            data,
            address_cells: address_cells as usize,
            size_cells: size_cells as usize,
        })
    }

    fn take(&mut self, cells: usize) -> u64 {
        let mut v = 0u64;
        for _ in 0..cells {
            // new() checked that the length is a whole number of entries.
            v = (v << 32) | u64::from(be32(self.data, 0).unwrap_or(0));
            self.data = self.data.get(4..).unwrap_or(&[]);
        }
        v
    }
}

impl Iterator for RegIter<'_> {
    type Item = Result<MemoryRegion, DtbError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.data.is_empty() {
            return None;
        }
        let base = self.take(self.address_cells);
        let size = self.take(self.size_cells);
        Some(Ok(MemoryRegion { base, size }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// A tiny DTB writer for the tests.
    #[derive(Default)]
    struct Builder {
        structure: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn word(&mut self, w: u32) -> &mut Self {
            self.structure.extend_from_slice(&w.to_be_bytes());
            self
        }
        fn pad(&mut self) {
            while !self.structure.len().is_multiple_of(4) {
                self.structure.push(0);
            }
        }
        fn begin(&mut self, name: &str) -> &mut Self {
            self.word(FDT_BEGIN_NODE);
            self.structure.extend_from_slice(name.as_bytes());
            self.structure.push(0);
            self.pad();
            self
        }
        fn end(&mut self) -> &mut Self {
            self.word(FDT_END_NODE)
        }
        fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            self.word(FDT_PROP).word(value.len() as u32).word(off);
            self.structure.extend_from_slice(value);
            self.pad();
            self
        }
        fn prop_cells(&mut self, name: &str, cells: &[u32]) -> &mut Self {
            let v: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
            self.prop(name, &v)
        }
        fn prop_str(&mut self, name: &str, s: &str) -> &mut Self {
            let mut v = s.as_bytes().to_vec();
            v.push(0);
            self.prop(name, &v)
        }
        fn finish(&mut self) -> Vec<u8> {
            self.word(FDT_END);
            let off_rsv = FDT_HEADER_SIZE as u32;
            let off_struct = off_rsv + 16;
            let off_strings = off_struct + self.structure.len() as u32;
            let total = off_strings + self.strings.len() as u32;
            let mut out = Vec::new();
            for w in [
                FDT_MAGIC,
                total,
                off_struct,
                off_strings,
                off_rsv,
                17,
                16,
                0,
                self.strings.len() as u32,
                self.structure.len() as u32,
            ] {
                out.extend_from_slice(&w.to_be_bytes());
            }
            out.extend_from_slice(&[0; 16]);
            out.extend_from_slice(&self.structure);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A DTB shaped like QEMU virt's (gic-version=3, 4 cpus).
    fn virt_like(method: &str, bootargs: Option<&str>, ncpus: u32) -> Vec<u8> {
        let mut b = Builder::default();
        b.begin("")
            .prop_cells("#address-cells", &[2])
            .prop_cells("#size-cells", &[2]);
        b.prop_str("compatible", "linux,dummy-virt");
        b.begin("psci")
            .prop("compatible", b"arm,psci-1.0\0arm,psci-0.2\0arm,psci\0");
        b.prop_str("method", method).end();
        b.begin("memory@40000000").prop_str("device_type", "memory");
        b.prop_cells("reg", &[0, 0x4000_0000, 0, 0x0800_0000]).end();
        b.begin("pl011@9000000")
            .prop("compatible", b"arm,pl011\0arm,primecell\0");
        b.prop_cells("reg", &[0, 0x0900_0000, 0, 0x1000]);
        b.prop_cells("interrupts", &[0, 1, 4]).end();
        b.begin("intc@8000000").prop_str("compatible", "arm,gic-v3");
        b.prop_cells(
            "reg",
            &[0, 0x0800_0000, 0, 0x1_0000, 0, 0x080a_0000, 0, 0x00f6_0000],
        );
        b.end();
        b.begin("cpus")
            .prop_cells("#address-cells", &[1])
            .prop_cells("#size-cells", &[0]);
        for i in 0..ncpus {
            b.begin(&format!("cpu@{i}")).prop_str("device_type", "cpu");
            b.prop_str("compatible", "arm,cortex-a57")
                .prop_cells("reg", &[i])
                .end();
        }
        b.begin("cpu-map").begin("socket0").end().end();
        b.end();
        b.begin("chosen");
        if let Some(a) = bootargs {
            b.prop_str("bootargs", a);
        }
        b.prop_str("stdout-path", "/pl011@9000000").end();
        b.end();
        b.finish()
    }

    #[test]
    fn reads_virt_like_tree() {
        let blob = virt_like("hvc", Some("ticks=5 mib=3"), 4);
        let p = Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap();
        assert_eq!(p.uart, Some(0x0900_0000));
        assert_eq!(p.uart_intid, Some(33));
        assert_eq!(
            p.gic,
            Some(GicRegions {
                distributor: 0x0800_0000,
                redistributors: MemoryRegion {
                    base: 0x080a_0000,
                    size: 0xf6_0000
                },
            })
        );
        assert_eq!(p.psci, Some(Conduit::Hvc));
        assert_eq!(p.cpus(), &[0, 1, 2, 3]);
        assert_eq!(
            p.memory(),
            &[MemoryRegion {
                base: 0x4000_0000,
                size: 0x0800_0000
            }]
        );
        assert_eq!(p.bootargs.as_str(), "ticks=5 mib=3");
        assert_eq!(p.cpu_index(2), Some(2));
        assert_eq!(
            p.memory_containing(0x4020_0000).map(|r| r.base),
            Some(0x4000_0000)
        );
    }

    #[test]
    fn reads_the_monitors_tree_with_its_vmgenid_page() {
        use vmfork_core::guest_dtb::{self, layout, GuestDtbConfig};
        let blob = guest_dtb::build(&GuestDtbConfig {
            vcpus: 2,
            vmgenid: Some(layout::VMGENID_BASE),
            ..GuestDtbConfig::default()
        })
        .unwrap();
        let p = Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap();
        assert_eq!(
            p.vmgenid,
            Some(MemoryRegion {
                base: layout::VMGENID_BASE,
                size: layout::VMGENID_SIZE
            })
        );
        assert_eq!(p.cpus().len(), 2);
        let plain = virt_like("hvc", None, 1);
        assert_eq!(
            Platform::from_fdt(&Fdt::new(&plain).unwrap())
                .unwrap()
                .vmgenid,
            None
        );
    }

    #[test]
    fn smc_conduit_and_missing_bootargs() {
        let blob = virt_like("smc", None, 1);
        let p = Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap();
        assert_eq!(p.psci, Some(Conduit::Smc));
        assert_eq!(p.bootargs.as_str(), "");
        assert_eq!(p.uart_intid, Some(33));
        assert_eq!(p.cpus(), &[0]);
    }

    #[test]
    fn rejects_unknown_psci_method() {
        let blob = virt_like("svc", None, 1);
        let err = Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap_err();
        assert!(matches!(err, DtbError::BadProperty(_)), "{err}");
    }

    #[test]
    fn rejects_bad_magic_and_truncation() {
        let mut blob = virt_like("hvc", None, 2);
        assert!(matches!(Fdt::new(&blob[..20]), Err(DtbError::Truncated)));
        assert!(matches!(
            Fdt::new(&blob[..blob.len() - 1]),
            Err(DtbError::Truncated)
        ));
        blob[0] = 0;
        assert!(matches!(Fdt::new(&blob), Err(DtbError::BadMagic(_))));
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let blob = virt_like("hvc", None, MAX_CPUS as u32 + 1);
        let err = Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap_err();
        assert_eq!(err, DtbError::TooManyCpus);
    }

    #[test]
    fn two_cell_cpu_reg_reads_aff3() {
        let mut b = Builder::default();
        b.begin("")
            .begin("cpus")
            .prop_cells("#address-cells", &[2])
            .prop_cells("#size-cells", &[0]);
        b.begin("cpu@100000000")
            .prop_str("device_type", "cpu")
            .prop_cells("reg", &[1, 0x0102]);
        b.end().end().end();
        let blob = b.finish();
        let p = Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap();
        assert_eq!(p.cpus(), &[0x1_0000_0102]);
    }

    #[test]
    fn unbalanced_tree_is_an_error() {
        let mut b = Builder::default();
        b.begin("").begin("x");
        let blob = b.finish();
        assert_eq!(
            Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap_err(),
            DtbError::Unbalanced
        );
        let mut b = Builder::default();
        b.begin("").end().end();
        let blob = b.finish();
        assert_eq!(
            Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap_err(),
            DtbError::Unbalanced
        );
    }

    #[test]
    fn pl011_interrupt_is_optional() {
        let mut b = Builder::default();
        b.begin("")
            .prop_cells("#address-cells", &[2])
            .prop_cells("#size-cells", &[2]);
        b.begin("pl011@9000000")
            .prop_str("compatible", "arm,pl011")
            .prop_cells("reg", &[0, 0x0900_0000, 0, 0x1000])
            .end()
            .end();
        let blob = b.finish();
        let p = Platform::from_fdt(&Fdt::new(&blob).unwrap()).unwrap();
        assert_eq!((p.uart, p.uart_intid), (Some(0x0900_0000), None));
    }

    #[test]
    fn reg_with_odd_length_is_an_error() {
        let mut b = Builder::default();
        b.begin("")
            .begin("pl011@0")
            .prop_str("compatible", "arm,pl011");
        // The root has the default #address-cells = 2, #size-cells = 1: 12-byte entries.
        b.prop_cells("reg", &[0, 0x0900_0000, 0, 0x1000])
            .end()
            .end();
        let blob = b.finish();
        assert!(matches!(
            Platform::from_fdt(&Fdt::new(&blob).unwrap()),
            Err(DtbError::BadProperty(_))
        ));
    }

    proptest! {
        /// Arbitrary corruption of a valid DTB never panics: the reader returns Ok or Err.
        #[test]
        fn corrupted_dtb_never_panics(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut blob = virt_like("hvc", Some("a=b"), 4);
            for (at, byte) in edits {
                let n = blob.len();
                blob[at % n] = byte;
            }
            let keep = blob.len() - cut % 64;
            blob.truncate(keep);
            if let Ok(fdt) = Fdt::new(&blob) {
                let _ = fdt.tokens().count();
                let _ = Platform::from_fdt(&fdt);
            }
        }

        /// Random bytes behind a valid-looking header never panic either.
        #[test]
        fn random_body_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut blob = Vec::new();
            let total = (FDT_HEADER_SIZE + body.len()) as u32;
            for w in [FDT_MAGIC, total, 40, 40 + total / 2 - 20, 40, 17, 16, 0, 64, 64] {
                blob.extend_from_slice(&w.to_be_bytes());
            }
            blob.extend_from_slice(&body);
            if let Ok(fdt) = Fdt::new(&blob) {
                let _ = Platform::from_fdt(&fdt);
            }
        }
    }
}
