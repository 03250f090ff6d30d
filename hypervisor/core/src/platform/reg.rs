//! Reading nodes: property helpers over the `fdt` crate's nodes, numbers of cells, `reg` lists as
//! CPU-physical [`Region`]s, and the address translation that `ranges` sets up for a bus's
//! children ([`Translation`], inherited through [`Ctx`]).

use alloc::string::String;
use alloc::vec::Vec;

use super::blob::be32;
use super::{PlatformError, Region};

/// How addresses in a node's `reg` map to CPU physical addresses.
#[derive(Clone, Debug)]
pub(super) enum Translation {
    /// Child addresses are CPU physical addresses (the root, or `ranges;` all the way up).
    Identity,
    /// `(child base, CPU base, size)` windows from `ranges`.
    Windows(Vec<(u64, u64, u64)>),
    /// No `ranges` property: the bus's children are not CPU-addressable.
    None,
}

impl Translation {
    pub(super) fn translate(&self, addr: u64, size: u64) -> Option<u64> {
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
pub(super) struct Ctx {
    /// `#address-cells` and `#size-cells` of the parent: how to read this node's `reg`.
    pub(super) address_cells: u32,
    pub(super) size_cells: u32,
    pub(super) translation: Translation,
    pub(super) interrupt_parent: Option<u32>,
    pub(super) path: String,
}

pub(super) type Node<'b, 'a> = fdt::node::FdtNode<'b, 'a>;

pub(super) fn prop<'a>(node: Node<'_, 'a>, name: &str) -> Option<&'a [u8]> {
    node.properties().find(|p| p.name == name).map(|p| p.value)
}

pub(super) fn prop_u32(node: Node<'_, '_>, name: &str) -> Option<u32> {
    prop(node, name).and_then(|v| be32(v, 0))
}

/// A string property without its trailing NUL; `None` when absent or not UTF-8.
pub(super) fn prop_str<'a>(node: Node<'_, 'a>, name: &str) -> Option<&'a str> {
    let v = prop(node, name)?;
    let v = v.strip_suffix(&[0]).unwrap_or(v);
    core::str::from_utf8(v).ok()
}

pub(super) fn compatible_with(node: Node<'_, '_>, any_of: &[&str]) -> bool {
    prop(node, "compatible")
        .map(|v| {
            v.split(|&b| b == 0)
                .any(|s| any_of.iter().any(|c| c.as_bytes() == s))
        })
        .unwrap_or(false)
}

pub(super) fn enabled(node: Node<'_, '_>) -> bool {
    matches!(prop_str(node, "status"), None | Some("okay") | Some("ok"))
}

/// Reads a big-endian number of `cells` cells; more than two cells are accepted when the high
/// cells are zero.
pub(super) fn read_cells(bytes: &[u8], cells: u32) -> Option<u64> {
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
pub(super) fn regions(
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

pub(super) fn first_region(
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

/// The translation for the children of `node` from its `ranges`. Entries that cannot be
/// expressed (e.g. PCI addresses of three cells) are skipped rather than failing the parse.
pub(super) fn child_translation(
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
