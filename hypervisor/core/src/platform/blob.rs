//! The raw blob: its header ([`blob_size`]), the check of its whole structure block that makes
//! the `fdt` crate safe to use on it ([`validate`], [`Layout`]), and the copy of a blob without
//! its `FDT_NOP` tokens.

use alloc::vec::Vec;

use super::PlatformError;

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

pub(super) fn be32(bytes: &[u8], at: usize) -> Option<u32> {
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
pub(super) fn strip_nops(blob: &[u8], layout: &Layout) -> Vec<u8> {
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
