//! Planning where a guest kernel, its DTB and its initrd go in guest RAM.
//!
//! [`plan`] reads a kernel file (a Linux arm64 `Image` or a static ELF64) and returns a
//! [`LoadPlan`]: the copies to make into guest memory, the entry point and the IPAs of the DTB
//! and initrd. It only computes; the monitor does the copying (through its COW-aware guest
//! memory writer) and then starts vCPU 0 at [`LoadPlan::entry`] with
//! [`LoadPlan::boot_registers`] in X0-X3.
//!
//! # Boot protocol (Linux `Documentation/arch/arm64/booting.rst`)
//! - The `Image` is placed `text_offset` bytes above a 2 MiB aligned base, here the lowest
//!   2 MiB boundary in RAM (so flags bit 3, "may be placed anywhere", never matters), and at
//!   least `image_size` bytes from there are left free for the kernel. `image_size == 0` marks
//!   a pre-3.17 kernel, whose `text_offset` is taken to be 0x80000.
//! - X0 = physical (IP) address of the DTB, X1 = X2 = X3 = 0, MMU and D-cache off, entry at the
//!   first byte of the image. ELF guests are started the same way (X0 = DTB).
//! - The DTB must be 8-byte aligned and at most 2 MiB. It is placed page-aligned right after
//!   the kernel's `image_size` (Linux memblock-reserves it itself). Kernels before v4.2 also
//!   wanted it within 512 MiB of the kernel: true for any guest of up to 512 MiB.
//! - The initrd must lie inside one 1 GiB aligned window of at most 32 GiB that also covers the
//!   kernel. It is placed page-aligned after the DTB and the window is checked.
//! - ELF kernels: PT_LOAD segments go to their `p_paddr`; the DTB goes at the start of RAM (as
//!   QEMU does for ELF kernels) unless a segment is there, then into the first free gap.
//!
//! The ELF parser is hand-written (a few dozen lines) rather than the `elf` or `goblin` crates:
//! only the ELF header and program headers are needed, every bound check has to be ours anyway
//! to name the error precisely, and it keeps the monitor free of another dependency.

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use crate::guest_dtb::MAX_DTB_SIZE;

/// `"ARM\x64"` read as a little-endian u32: the arm64 `Image` header magic (offset 56).
pub const ARM64_IMAGE_MAGIC: u32 = 0x644d_5241;
/// Size of the arm64 `Image` header.
pub const ARM64_IMAGE_HEADER_SIZE: usize = 64;
/// Alignment of the `Image` load base.
pub const KERNEL_BASE_ALIGN: u64 = 2 << 20;
/// `text_offset` assumed when `image_size` is 0 (kernels before 3.17).
pub const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
/// Alignment used for the DTB and the initrd (a page; more than the 8 bytes the DTB needs).
pub const BLOB_ALIGN: u64 = 0x1000;
/// The initrd and kernel must share a 1 GiB aligned window of at most this size.
pub const INITRD_WINDOW: u64 = 32 << 30;

const GIB: u64 = 1 << 30;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EV_CURRENT: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_AARCH64: u16 = 183;
const PT_LOAD: u32 = 1;
const PN_XNUM: u16 = 0xFFFF;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;

/// What kind of kernel file a byte string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A Linux arm64 `Image` (magic `"ARM\x64"` at offset 56).
    LinuxArm64,
    /// An ELF file (magic `\x7fELF`); [`plan`] checks the rest.
    Elf64,
    /// Neither.
    Unknown,
}

/// Recognises a kernel file by its magic numbers.
pub fn detect(bytes: &[u8]) -> ImageKind {
    if bytes.len() >= 4 && bytes[..4] == ELF_MAGIC {
        ImageKind::Elf64
    } else if read_u32(bytes, 56) == Some(ARM64_IMAGE_MAGIC) {
        ImageKind::LinuxArm64
    } else {
        ImageKind::Unknown
    }
}

/// Why a kernel cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// Neither an arm64 `Image` nor an ELF file.
    UnknownFormat,
    /// The file ends inside a header.
    Truncated(&'static str),
    /// RAM is empty or wraps around the address space.
    BadRam {
        /// Requested base.
        base: u64,
        /// Requested size.
        size: u64,
    },
    /// The kernel does not fit in guest RAM.
    KernelTooLarge {
        /// Bytes the kernel occupies (from its load address).
        needed: u64,
        /// Bytes of RAM available from the load address.
        available: u64,
    },
    /// ELF: not ELFCLASS64.
    ElfNot64Bit,
    /// ELF: not little-endian.
    ElfNotLittleEndian,
    /// ELF: `e_ident[EI_VERSION]` / `e_version` is not 1.
    ElfBadVersion,
    /// ELF: not `EM_AARCH64`.
    ElfWrongMachine(u16),
    /// ELF: not `ET_EXEC`.
    ElfNotExecutable(u16),
    /// ELF: program header entries smaller than an `Elf64_Phdr`.
    ElfBadPhentsize(u16),
    /// ELF: extended program header numbering (`PN_XNUM`) is not supported.
    ElfTooManySegments,
    /// ELF: no non-empty `PT_LOAD` segment.
    ElfNoLoadSegments,
    /// ELF: a segment's file bytes lie beyond the end of the file.
    SegmentBeyondFile(usize),
    /// ELF: a segment's `p_filesz` exceeds its `p_memsz`.
    SegmentFileszExceedsMemsz(usize),
    /// ELF: a segment is not entirely inside guest RAM.
    SegmentOutsideRam(usize),
    /// ELF: two segments overlap in guest memory.
    SegmentsOverlap(usize, usize),
    /// ELF: `e_entry` is not inside any loaded segment.
    EntryOutsideSegments(u64),
    /// The DTB is empty or larger than 2 MiB.
    BadDtbSize(u64),
    /// No free, aligned room in RAM for the DTB.
    NoRoomForDtb,
    /// No free, aligned room in RAM for the initrd.
    NoRoomForInitrd,
    /// The initrd would not share a 1 GiB aligned, 32 GiB window with the kernel.
    InitrdOutsideWindow,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::UnknownFormat => write!(f, "not an arm64 Image nor an ELF file"),
            LoadError::Truncated(what) => write!(f, "file too short for its {what}"),
            LoadError::BadRam { base, size } => {
                write!(f, "guest RAM {size:#x} bytes at {base:#x} is not usable")
            }
            LoadError::KernelTooLarge { needed, available } => write!(
                f,
                "kernel needs {needed:#x} bytes but only {available:#x} are available"
            ),
            LoadError::ElfNot64Bit => write!(f, "ELF is not 64-bit"),
            LoadError::ElfNotLittleEndian => write!(f, "ELF is not little-endian"),
            LoadError::ElfBadVersion => write!(f, "ELF version is not 1"),
            LoadError::ElfWrongMachine(m) => write!(f, "ELF machine {m} is not AArch64 (183)"),
            LoadError::ElfNotExecutable(t) => write!(f, "ELF type {t} is not ET_EXEC"),
            LoadError::ElfBadPhentsize(n) => write!(f, "ELF program header size {n} < 56"),
            LoadError::ElfTooManySegments => {
                write!(f, "ELF uses extended program header numbering")
            }
            LoadError::ElfNoLoadSegments => write!(f, "ELF has no PT_LOAD segment"),
            LoadError::SegmentBeyondFile(i) => write!(f, "segment {i} extends past end of file"),
            LoadError::SegmentFileszExceedsMemsz(i) => {
                write!(f, "segment {i} has p_filesz > p_memsz")
            }
            LoadError::SegmentOutsideRam(i) => write!(f, "segment {i} is not inside guest RAM"),
            LoadError::SegmentsOverlap(a, b) => write!(f, "segments {a} and {b} overlap"),
            LoadError::EntryOutsideSegments(e) => {
                write!(f, "entry point {e:#x} is not inside a loaded segment")
            }
            LoadError::BadDtbSize(n) => {
                write!(f, "DTB size {n} is not in 1..={MAX_DTB_SIZE}")
            }
            LoadError::NoRoomForDtb => write!(f, "no room in guest RAM for the DTB"),
            LoadError::NoRoomForInitrd => write!(f, "no room in guest RAM for the initrd"),
            LoadError::InitrdOutsideWindow => write!(
                f,
                "initrd and kernel do not fit one 1 GiB aligned 32 GiB window"
            ),
        }
    }
}

/// The arm64 `Image` header fields (all little-endian in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arm64ImageHeader {
    /// Executable code (usually a branch to the kernel's start).
    pub code0: u32,
    /// Executable code.
    pub code1: u32,
    /// Offset of the image above its 2 MiB aligned base.
    pub text_offset: u64,
    /// Bytes the kernel occupies from its start, including BSS (0: unknown, old kernel).
    pub image_size: u64,
    /// Informative flags: bit 0 big-endian kernel, bits 1-2 page size, bit 3 placement.
    pub flags: u64,
}

impl Arm64ImageHeader {
    /// Parses and checks the header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, LoadError> {
        let trunc = LoadError::Truncated("arm64 Image header");
        if bytes.len() < ARM64_IMAGE_HEADER_SIZE {
            return Err(trunc);
        }
        if read_u32(bytes, 56) != Some(ARM64_IMAGE_MAGIC) {
            return Err(LoadError::UnknownFormat);
        }
        Ok(Arm64ImageHeader {
            code0: read_u32(bytes, 0).ok_or(trunc.clone())?,
            code1: read_u32(bytes, 4).ok_or(trunc.clone())?,
            text_offset: read_u64(bytes, 8).ok_or(trunc.clone())?,
            image_size: read_u64(bytes, 16).ok_or(trunc.clone())?,
            flags: read_u64(bytes, 24).ok_or(trunc)?,
        })
    }

    /// Flags bit 0: the kernel runs big-endian (it switches itself; the loader need not care).
    pub fn big_endian(&self) -> bool {
        self.flags & 1 != 0
    }

    /// Flags bits 1-2: the kernel's page size in bytes, or `None` when unspecified.
    pub fn page_size(&self) -> Option<u64> {
        match (self.flags >> 1) & 3 {
            1 => Some(4 << 10),
            2 => Some(16 << 10),
            3 => Some(64 << 10),
            _ => None,
        }
    }

    /// Flags bit 3: the 2 MiB aligned base may be anywhere in RAM (else: near its start).
    pub fn placement_anywhere(&self) -> bool {
        self.flags & 8 != 0
    }

    /// The effective `text_offset` (0x80000 for pre-3.17 kernels with `image_size == 0`).
    pub fn effective_text_offset(&self) -> u64 {
        if self.image_size == 0 {
            LEGACY_TEXT_OFFSET
        } else {
            self.text_offset
        }
    }
}

/// One copy into guest memory: `bytes[src]` to `ipa`, followed by `zero_fill` zero bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest address of the first byte.
    pub ipa: u64,
    /// Byte range of the kernel file to copy.
    pub src: Range<usize>,
    /// Zero bytes following the copied ones (ELF BSS; the `Image`'s room up to `image_size`).
    pub zero_fill: u64,
}

impl Segment {
    /// The guest range this segment covers.
    pub fn ipa_range(&self) -> Range<u64> {
        let len = (self.src.end - self.src.start) as u64 + self.zero_fill;
        self.ipa..self.ipa + len
    }
}

/// Where everything goes, and how the boot vCPU starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    /// What was recognised.
    pub kind: ImageKind,
    /// Copies to make, in file order.
    pub segments: Vec<Segment>,
    /// IPA where the boot vCPU starts (PC), MMU off.
    pub entry: u64,
    /// Guest range the kernel occupies (hull of its segments / its `image_size`).
    pub kernel: Range<u64>,
    /// Guest range to write the DTB to.
    pub dtb: Range<u64>,
    /// Guest range to write the initrd to (`None` when `initrd_len` was 0).
    pub initrd: Option<Range<u64>>,
}

impl LoadPlan {
    /// X0-X3 for the boot vCPU: X0 = DTB address, X1-X3 = 0 (arm64 boot protocol).
    pub fn boot_registers(&self) -> [u64; 4] {
        [self.dtb.start, 0, 0, 0]
    }
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// Lowest `align`-aligned address ≥ `from` where `len` bytes fit below `end` without touching
/// any range in `occupied` (sorted by start, non-overlapping).
fn first_fit(occupied: &[Range<u64>], from: u64, len: u64, align: u64, end: u64) -> Option<u64> {
    let mut at = align_up(from, align)?;
    for r in occupied {
        if r.end <= at {
            continue;
        }
        if r.start >= at.checked_add(len)? {
            break;
        }
        at = align_up(r.end, align)?;
    }
    (at.checked_add(len)? <= end).then_some(at)
}

/// Plans loading `bytes` into guest RAM `[ram_base, ram_base + ram_size)` together with a DTB of
/// `dtb_len` bytes and an initrd of `initrd_len` bytes (0: no initrd).
///
/// Every malformed input gives a [`LoadError`]; nothing panics.
pub fn plan(
    bytes: &[u8],
    ram_base: u64,
    ram_size: u64,
    initrd_len: u64,
    dtb_len: u64,
) -> Result<LoadPlan, LoadError> {
    let ram_end = ram_base
        .checked_add(ram_size)
        .filter(|_| ram_size > 0)
        .ok_or(LoadError::BadRam {
            base: ram_base,
            size: ram_size,
        })?;
    if dtb_len == 0 || dtb_len > MAX_DTB_SIZE as u64 {
        return Err(LoadError::BadDtbSize(dtb_len));
    }
    match detect(bytes) {
        ImageKind::LinuxArm64 => plan_image(bytes, ram_base, ram_end, initrd_len, dtb_len),
        ImageKind::Elf64 => plan_elf(bytes, ram_base, ram_end, initrd_len, dtb_len),
        ImageKind::Unknown => Err(LoadError::UnknownFormat),
    }
}

fn plan_image(
    bytes: &[u8],
    ram_base: u64,
    ram_end: u64,
    initrd_len: u64,
    dtb_len: u64,
) -> Result<LoadPlan, LoadError> {
    let hdr = Arm64ImageHeader::parse(bytes)?;
    let file_len = bytes.len() as u64;
    let size = hdr.image_size.max(file_len);
    let too_large = |load: u64| LoadError::KernelTooLarge {
        needed: size,
        available: ram_end.saturating_sub(load),
    };
    let base = align_up(ram_base, KERNEL_BASE_ALIGN).ok_or(too_large(ram_end))?;
    let load = base
        .checked_add(hdr.effective_text_offset())
        .ok_or(too_large(ram_end))?;
    let kernel_end = load
        .checked_add(size)
        .filter(|&e| e <= ram_end)
        .ok_or(too_large(load))?;
    let kernel = load..kernel_end;
    let segments = alloc::vec![Segment {
        ipa: load,
        src: 0..bytes.len(),
        zero_fill: size - file_len,
    }];
    let (dtb, initrd) = place_blobs(
        core::slice::from_ref(&kernel),
        kernel_end,
        ram_end,
        dtb_len,
        initrd_len,
    )?;
    check_initrd_window(&kernel, initrd.as_ref())?;
    Ok(LoadPlan {
        kind: ImageKind::LinuxArm64,
        segments,
        entry: load,
        kernel,
        dtb,
        initrd,
    })
}

/// Places the DTB then the initrd at the first free aligned spots from `from`.
fn place_blobs(
    occupied: &[Range<u64>],
    from: u64,
    ram_end: u64,
    dtb_len: u64,
    initrd_len: u64,
) -> Result<(Range<u64>, Option<Range<u64>>), LoadError> {
    let dtb_at =
        first_fit(occupied, from, dtb_len, BLOB_ALIGN, ram_end).ok_or(LoadError::NoRoomForDtb)?;
    let dtb = dtb_at..dtb_at + dtb_len;
    if initrd_len == 0 {
        return Ok((dtb, None));
    }
    let mut taken: Vec<Range<u64>> = occupied.to_vec();
    taken.push(dtb.clone());
    taken.sort_unstable_by_key(|r| r.start);
    let at = first_fit(&taken, from, initrd_len, BLOB_ALIGN, ram_end)
        .ok_or(LoadError::NoRoomForInitrd)?;
    Ok((dtb, Some(at..at + initrd_len)))
}

fn check_initrd_window(kernel: &Range<u64>, initrd: Option<&Range<u64>>) -> Result<(), LoadError> {
    let Some(initrd) = initrd else {
        return Ok(());
    };
    let window = kernel.start.min(initrd.start) & !(GIB - 1);
    if kernel.end.max(initrd.end) - window > INITRD_WINDOW {
        return Err(LoadError::InitrdOutsideWindow);
    }
    Ok(())
}

/// One `PT_LOAD` program header.
struct LoadSegment {
    index: usize,
    vaddr: u64,
    paddr: u64,
    offset: usize,
    filesz: usize,
    memsz: u64,
}

fn plan_elf(
    bytes: &[u8],
    ram_base: u64,
    ram_end: u64,
    initrd_len: u64,
    dtb_len: u64,
) -> Result<LoadPlan, LoadError> {
    if bytes.len() < ELF64_EHDR_SIZE {
        return Err(LoadError::Truncated("ELF header"));
    }
    if bytes[4] != ELFCLASS64 {
        return Err(LoadError::ElfNot64Bit);
    }
    if bytes[5] != ELFDATA2LSB {
        return Err(LoadError::ElfNotLittleEndian);
    }
    let trunc = LoadError::Truncated("ELF header");
    let e_type = read_u16(bytes, 16).ok_or(trunc.clone())?;
    let e_machine = read_u16(bytes, 18).ok_or(trunc.clone())?;
    let e_version = read_u32(bytes, 20).ok_or(trunc.clone())?;
    let e_entry = read_u64(bytes, 24).ok_or(trunc.clone())?;
    let e_phoff = read_u64(bytes, 32).ok_or(trunc.clone())?;
    let e_phentsize = read_u16(bytes, 54).ok_or(trunc.clone())?;
    let e_phnum = read_u16(bytes, 56).ok_or(trunc)?;
    if bytes[6] != EV_CURRENT || e_version != u32::from(EV_CURRENT) {
        return Err(LoadError::ElfBadVersion);
    }
    if e_machine != EM_AARCH64 {
        return Err(LoadError::ElfWrongMachine(e_machine));
    }
    if e_type != ET_EXEC {
        return Err(LoadError::ElfNotExecutable(e_type));
    }
    if e_phnum == PN_XNUM {
        return Err(LoadError::ElfTooManySegments);
    }
    if usize::from(e_phentsize) < ELF64_PHDR_SIZE {
        return Err(LoadError::ElfBadPhentsize(e_phentsize));
    }

    let ph_trunc = LoadError::Truncated("ELF program headers");
    let phoff = usize::try_from(e_phoff).map_err(|_| ph_trunc.clone())?;
    let ph_table_len = usize::from(e_phnum) * usize::from(e_phentsize);
    let ph_end = phoff.checked_add(ph_table_len).ok_or(ph_trunc.clone())?;
    if ph_end > bytes.len() {
        return Err(ph_trunc);
    }

    let mut loads: Vec<LoadSegment> = Vec::new();
    for index in 0..usize::from(e_phnum) {
        let ph = phoff + index * usize::from(e_phentsize);
        let field =
            |off: usize| read_u64(bytes, ph + off).ok_or(LoadError::SegmentBeyondFile(index));
        let p_type = read_u32(bytes, ph).ok_or(LoadError::SegmentBeyondFile(index))?;
        if p_type != PT_LOAD {
            continue;
        }
        let (p_offset, p_vaddr, p_paddr) = (field(8)?, field(16)?, field(24)?);
        let (p_filesz, p_memsz) = (field(32)?, field(40)?);
        if p_filesz > p_memsz {
            return Err(LoadError::SegmentFileszExceedsMemsz(index));
        }
        let beyond = LoadError::SegmentBeyondFile(index);
        let offset = usize::try_from(p_offset).map_err(|_| beyond.clone())?;
        let filesz = usize::try_from(p_filesz).map_err(|_| beyond.clone())?;
        if offset.checked_add(filesz).is_none_or(|e| e > bytes.len()) {
            return Err(beyond);
        }
        if p_memsz == 0 {
            continue;
        }
        let inside = p_paddr >= ram_base
            && p_paddr
                .checked_add(p_memsz)
                .is_some_and(|end| end <= ram_end);
        if !inside {
            return Err(LoadError::SegmentOutsideRam(index));
        }
        loads.push(LoadSegment {
            index,
            vaddr: p_vaddr,
            paddr: p_paddr,
            offset,
            filesz,
            memsz: p_memsz,
        });
    }
    if loads.is_empty() {
        return Err(LoadError::ElfNoLoadSegments);
    }

    // Overlap check on guest ranges, in address order.
    let mut by_addr: Vec<&LoadSegment> = loads.iter().collect();
    by_addr.sort_unstable_by_key(|s| s.paddr);
    for pair in by_addr.windows(2) {
        if pair[0].paddr + pair[0].memsz > pair[1].paddr {
            let (a, b) = (pair[0].index, pair[1].index);
            return Err(LoadError::SegmentsOverlap(a.min(b), a.max(b)));
        }
    }
    let occupied: Vec<Range<u64>> = by_addr.iter().map(|s| s.paddr..s.paddr + s.memsz).collect();

    // The entry point is a virtual address; translate it through its segment.
    let entry = loads
        .iter()
        .find(|s| e_entry >= s.vaddr && e_entry - s.vaddr < s.memsz)
        .map(|s| s.paddr + (e_entry - s.vaddr))
        .ok_or(LoadError::EntryOutsideSegments(e_entry))?;

    let kernel = occupied[0].start..occupied[occupied.len() - 1].end;
    let (dtb, initrd) = place_blobs(&occupied, ram_base, ram_end, dtb_len, initrd_len)?;
    check_initrd_window(&kernel, initrd.as_ref())?;
    let segments = loads
        .iter()
        .map(|s| Segment {
            ipa: s.paddr,
            src: s.offset..s.offset + s.filesz,
            zero_fill: s.memsz - s.filesz as u64,
        })
        .collect();
    Ok(LoadPlan {
        kind: ImageKind::Elf64,
        segments,
        entry,
        kernel,
        dtb,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;

    const RAM: u64 = 0x4000_0000;
    const MIB: u64 = 1 << 20;

    fn image(text_offset: u64, image_size: u64, flags: u64, body: usize) -> Vec<u8> {
        let mut b = alloc::vec![0u8; ARM64_IMAGE_HEADER_SIZE + body];
        b[0..4].copy_from_slice(&0x9100_0000u32.to_le_bytes());
        b[8..16].copy_from_slice(&text_offset.to_le_bytes());
        b[16..24].copy_from_slice(&image_size.to_le_bytes());
        b[24..32].copy_from_slice(&flags.to_le_bytes());
        b[56..60].copy_from_slice(b"ARM\x64");
        b
    }

    /// (p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz)
    type Ph = (u32, u64, u64, u64, u64, u64);

    fn elf(entry: u64, phs: &[Ph], file_len: usize) -> Vec<u8> {
        let phoff = 64usize;
        let len = file_len.max(phoff + phs.len() * 56);
        let mut b = alloc::vec![0u8; len];
        b[0..4].copy_from_slice(&ELF_MAGIC);
        b[4] = ELFCLASS64;
        b[5] = ELFDATA2LSB;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_AARCH64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phs.len() as u16).to_le_bytes());
        for (i, &(t, off, va, pa, fsz, msz)) in phs.iter().enumerate() {
            let p = phoff + i * 56;
            b[p..p + 4].copy_from_slice(&t.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            b[p + 16..p + 24].copy_from_slice(&va.to_le_bytes());
            b[p + 24..p + 32].copy_from_slice(&pa.to_le_bytes());
            b[p + 32..p + 40].copy_from_slice(&fsz.to_le_bytes());
            b[p + 40..p + 48].copy_from_slice(&msz.to_le_bytes());
        }
        b
    }

    fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
        a.start < b.end && b.start < a.end
    }

    #[test]
    fn detects() {
        assert_eq!(detect(&image(0, 0x10000, 0, 0)), ImageKind::LinuxArm64);
        assert_eq!(detect(&elf(RAM, &[], 64)), ImageKind::Elf64);
        assert_eq!(detect(b""), ImageKind::Unknown);
        assert_eq!(detect(&[0u8; 100]), ImageKind::Unknown);
    }

    #[test]
    fn header_fields() {
        let h = Arm64ImageHeader::parse(&image(0x8_0000, 0x123_0000, 0b1011, 0)).unwrap();
        assert_eq!(h.text_offset, 0x8_0000);
        assert_eq!(h.image_size, 0x123_0000);
        assert!(h.big_endian());
        assert_eq!(h.page_size(), Some(4096));
        assert!(h.placement_anywhere());
        assert_eq!(h.code0, 0x9100_0000);
        let h = Arm64ImageHeader::parse(&image(0, 0x1000, 0b110, 0)).unwrap();
        assert_eq!(h.page_size(), Some(64 << 10));
        assert!(!h.big_endian() && !h.placement_anywhere());
        assert_eq!(
            Arm64ImageHeader::parse(&image(0, 0, 0, 0)[..63]),
            Err(LoadError::Truncated("arm64 Image header"))
        );
    }

    #[test]
    fn modern_image() {
        // text_offset 0 (Linux >= 5.8), image_size 20 MiB, file 1 MiB.
        let img = image(0, 20 * MIB, 0b1010, MIB as usize);
        let p = plan(&img, RAM, 64 * MIB, 5000, 0x3000).unwrap();
        assert_eq!(p.kind, ImageKind::LinuxArm64);
        assert_eq!(p.entry, RAM);
        assert_eq!(p.kernel, RAM..RAM + 20 * MIB);
        assert_eq!(p.segments.len(), 1);
        assert_eq!(p.segments[0].src, 0..img.len());
        assert_eq!(p.segments[0].ipa_range(), p.kernel);
        assert_eq!(p.dtb, RAM + 20 * MIB..RAM + 20 * MIB + 0x3000);
        assert_eq!(
            p.initrd,
            Some(RAM + 20 * MIB + 0x3000..RAM + 20 * MIB + 0x3000 + 5000)
        );
        assert_eq!(p.boot_registers(), [p.dtb.start, 0, 0, 0]);
    }

    #[test]
    fn legacy_image_uses_0x80000() {
        // image_size 0: text_offset field ignored, 0x80000 assumed.
        let img = image(0x1234, 0, 0, 4096);
        let p = plan(&img, RAM, 64 * MIB, 0, 0x1000).unwrap();
        assert_eq!(p.entry, RAM + 0x8_0000);
        assert_eq!(p.kernel, RAM + 0x8_0000..RAM + 0x8_0000 + img.len() as u64);
        assert_eq!(p.initrd, None);
        assert!(p.dtb.start.is_multiple_of(BLOB_ALIGN));
        assert!(p.dtb.start >= p.kernel.end);
    }

    #[test]
    fn image_base_is_2mib_aligned() {
        let img = image(0x8_0000, MIB, 0, 0);
        let p = plan(&img, RAM + 0x1000, 64 * MIB, 0, 0x1000).unwrap();
        assert_eq!(p.entry, RAM + 2 * MIB + 0x8_0000);
    }

    #[test]
    fn image_errors() {
        let img = image(0, 65 * MIB, 0, 16);
        assert!(matches!(
            plan(&img, RAM, 64 * MIB, 0, 0x1000),
            Err(LoadError::KernelTooLarge { .. })
        ));
        // Kernel exactly fills RAM: no room for the DTB.
        let img = image(0, 64 * MIB, 0, 16);
        assert_eq!(
            plan(&img, RAM, 64 * MIB, 0, 0x1000),
            Err(LoadError::NoRoomForDtb)
        );
        // DTB fits but the initrd does not.
        let img = image(0, 62 * MIB, 0, 16);
        assert_eq!(
            plan(&img, RAM, 64 * MIB, 3 * MIB, 0x1000),
            Err(LoadError::NoRoomForInitrd)
        );
        let img = image(u64::MAX - 10, 8, 0, 16);
        assert!(matches!(
            plan(&img, RAM, 64 * MIB, 0, 0x1000),
            Err(LoadError::KernelTooLarge { .. })
        ));
        assert_eq!(
            plan(&image(0, MIB, 0, 0), RAM, 64 * MIB, 0, 0),
            Err(LoadError::BadDtbSize(0))
        );
        assert_eq!(
            plan(&image(0, MIB, 0, 0), RAM, 64 * MIB, 0, 2 * MIB + 1),
            Err(LoadError::BadDtbSize(2 * MIB + 1))
        );
        assert!(matches!(
            plan(&image(0, MIB, 0, 0), u64::MAX, 2, 0, 8),
            Err(LoadError::BadRam { .. })
        ));
        assert!(matches!(
            plan(&image(0, MIB, 0, 0), RAM, 0, 0, 8),
            Err(LoadError::BadRam { .. })
        ));
        assert_eq!(
            plan(b"nonsense", RAM, MIB, 0, 8),
            Err(LoadError::UnknownFormat)
        );
    }

    #[test]
    fn initrd_window() {
        // 40 GiB of RAM, kernel at the bottom, initrd pushed past 32 GiB by a huge image_size.
        let img = image(0, 32 * GIB, 0, 16);
        assert_eq!(
            plan(&img, RAM, 40 * GIB, 4096, 0x1000),
            Err(LoadError::InitrdOutsideWindow)
        );
        let img = image(0, 31 * GIB, 0, 16);
        assert!(plan(&img, RAM, 40 * GIB, 4096, 0x1000).is_ok());
    }

    #[test]
    fn elf_with_bss_and_gap() {
        // Text at RAM + 2 MiB (so the DTB can go at the start of RAM), data + BSS after it.
        let phs = [
            (
                PT_LOAD,
                0x1000,
                RAM + 2 * MIB,
                RAM + 2 * MIB,
                0x2000,
                0x2000,
            ),
            (6, 0x40, 0, 0, 0x70, 0x70), // PT_PHDR: ignored
            (PT_LOAD, 0x3000, RAM + 3 * MIB, RAM + 3 * MIB, 0x100, 0x5000),
        ];
        let f = elf(RAM + 2 * MIB + 0x10, &phs, 0x3100);
        let p = plan(&f, RAM, 16 * MIB, 0x800, 0x2000).unwrap();
        assert_eq!(p.kind, ImageKind::Elf64);
        assert_eq!(p.entry, RAM + 2 * MIB + 0x10);
        assert_eq!(
            p.segments,
            [
                Segment {
                    ipa: RAM + 2 * MIB,
                    src: 0x1000..0x3000,
                    zero_fill: 0
                },
                Segment {
                    ipa: RAM + 3 * MIB,
                    src: 0x3000..0x3100,
                    zero_fill: 0x4F00
                },
            ]
        );
        assert_eq!(p.kernel, RAM + 2 * MIB..RAM + 3 * MIB + 0x5000);
        assert_eq!(p.dtb, RAM..RAM + 0x2000);
        assert_eq!(p.initrd, Some(RAM + 0x2000..RAM + 0x2800));
    }

    #[test]
    fn elf_at_ram_start_pushes_dtb_up() {
        let phs = [(PT_LOAD, 0x1000, RAM, RAM, 0x1800, 0x1800)];
        let f = elf(RAM, &phs, 0x2800);
        let p = plan(&f, RAM, 16 * MIB, 0, 0x100).unwrap();
        assert_eq!(p.dtb, RAM + 0x2000..RAM + 0x2100);
    }

    #[test]
    fn elf_virtual_entry_is_translated() {
        let va = 0xFFFF_0000_0000_0000u64;
        let phs = [(PT_LOAD, 0x1000, va, RAM + MIB, 0x1000, 0x1000)];
        let f = elf(va + 0x40, &phs, 0x2000);
        let p = plan(&f, RAM, 16 * MIB, 0, 0x100).unwrap();
        assert_eq!(p.entry, RAM + MIB + 0x40);
    }

    #[test]
    fn elf_errors() {
        let good = [(PT_LOAD, 0x1000, RAM, RAM, 0x100, 0x100)];
        let base = elf(RAM, &good, 0x1100);
        assert!(plan(&base, RAM, MIB, 0, 8).is_ok());

        let mut f = base.clone();
        f[4] = 1;
        assert_eq!(plan(&f, RAM, MIB, 0, 8), Err(LoadError::ElfNot64Bit));
        let mut f = base.clone();
        f[5] = 2;
        assert_eq!(plan(&f, RAM, MIB, 0, 8), Err(LoadError::ElfNotLittleEndian));
        let mut f = base.clone();
        f[18] = 62; // EM_X86_64
        assert_eq!(
            plan(&f, RAM, MIB, 0, 8),
            Err(LoadError::ElfWrongMachine(62))
        );
        let mut f = base.clone();
        f[16] = 3; // ET_DYN
        assert_eq!(
            plan(&f, RAM, MIB, 0, 8),
            Err(LoadError::ElfNotExecutable(3))
        );
        let mut f = base.clone();
        f[6] = 0;
        assert_eq!(plan(&f, RAM, MIB, 0, 8), Err(LoadError::ElfBadVersion));
        let mut f = base.clone();
        f[54] = 32;
        assert_eq!(
            plan(&f, RAM, MIB, 0, 8),
            Err(LoadError::ElfBadPhentsize(32))
        );
        let mut f = base.clone();
        f[56..58].copy_from_slice(&0xFFFFu16.to_le_bytes());
        assert_eq!(plan(&f, RAM, MIB, 0, 8), Err(LoadError::ElfTooManySegments));
        let mut f = base.clone();
        f[56..58].copy_from_slice(&100u16.to_le_bytes());
        assert_eq!(
            plan(&f, RAM, MIB, 0, 8),
            Err(LoadError::Truncated("ELF program headers"))
        );
        assert_eq!(
            plan(&base[..40], RAM, MIB, 0, 8),
            Err(LoadError::Truncated("ELF header"))
        );

        let bad = |phs: &[Ph], entry: u64| plan(&elf(entry, phs, 0x1100), RAM, MIB, 0, 8);
        assert_eq!(bad(&[], RAM), Err(LoadError::ElfNoLoadSegments));
        assert_eq!(
            bad(&[(PT_LOAD, 0, RAM, RAM, 0, 0)], RAM),
            Err(LoadError::ElfNoLoadSegments)
        );
        assert_eq!(
            bad(&[(PT_LOAD, 0x1000, RAM, RAM, 0x200, 0x200)], RAM),
            Err(LoadError::SegmentBeyondFile(0))
        );
        assert_eq!(
            bad(&[(PT_LOAD, u64::MAX, RAM, RAM, 2, 2)], RAM),
            Err(LoadError::SegmentBeyondFile(0))
        );
        assert_eq!(
            bad(&[(PT_LOAD, 0x1000, RAM, RAM, 0x100, 0x10)], RAM),
            Err(LoadError::SegmentFileszExceedsMemsz(0))
        );
        assert_eq!(
            bad(&[(PT_LOAD, 0x1000, 0, 0x0900_0000, 0x100, 0x100)], 0),
            Err(LoadError::SegmentOutsideRam(0))
        );
        assert_eq!(
            bad(&[(PT_LOAD, 0x1000, RAM, RAM + MIB - 8, 0x100, 0x100)], RAM),
            Err(LoadError::SegmentOutsideRam(0))
        );
        assert_eq!(
            bad(&[(PT_LOAD, 0x1000, RAM, u64::MAX - 4, 0x10, 0x10)], RAM),
            Err(LoadError::SegmentOutsideRam(0))
        );
        assert_eq!(
            bad(
                &[
                    (PT_LOAD, 0x1000, RAM + 0x800, RAM + 0x800, 0x100, 0x1000),
                    (PT_LOAD, 0x1000, RAM, RAM, 0x100, 0x900),
                ],
                RAM
            ),
            Err(LoadError::SegmentsOverlap(0, 1))
        );
        assert_eq!(
            bad(&[(PT_LOAD, 0x1000, RAM, RAM, 0x100, 0x100)], RAM + 0x100),
            Err(LoadError::EntryOutsideSegments(RAM + 0x100))
        );
        // Whole RAM taken by the segment: no room for the DTB.
        assert_eq!(
            bad(&[(PT_LOAD, 0x1000, RAM, RAM, 0x100, MIB)], RAM),
            Err(LoadError::NoRoomForDtb)
        );
        assert!(!LoadError::SegmentsOverlap(1, 2).to_string().is_empty());
    }

    fn check_plan(p: &LoadPlan, file_len: usize, ram_end: u64, dtb_len: u64, initrd_len: u64) {
        let in_ram = |r: &Range<u64>| r.start >= RAM && r.end <= ram_end;
        assert!(in_ram(&p.dtb) && p.dtb.start.is_multiple_of(8));
        assert_eq!(p.dtb.end - p.dtb.start, dtb_len);
        for s in &p.segments {
            assert!(s.src.end <= file_len && s.src.start <= s.src.end);
            assert!(in_ram(&s.ipa_range()));
            assert!(!overlap(&s.ipa_range(), &p.dtb));
        }
        if let Some(i) = &p.initrd {
            assert_eq!(i.end - i.start, initrd_len);
            assert!(in_ram(i) && !overlap(i, &p.dtb));
            for s in &p.segments {
                assert!(!overlap(&s.ipa_range(), i));
            }
        }
        assert!(p.segments.iter().any(|s| s.ipa_range().contains(&p.entry)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                       ram_base in any::<u64>(), ram_size in any::<u64>(),
                                       initrd in any::<u64>(), dtb in any::<u64>()) {
            let _ = detect(&bytes);
            let _ = plan(&bytes, ram_base, ram_size, initrd, dtb);
            let _ = plan(&bytes, RAM, 64 * MIB, initrd % (8 * MIB), dtb % (3 * MIB));
        }

        #[test]
        fn mutated_headers_never_panic(idx in 0usize..0x1100, val in any::<u8>(), which in any::<bool>()) {
            let mut f = if which {
                elf(RAM + 0x10, &[(PT_LOAD, 0x1000, RAM, RAM, 0x100, 0x200)], 0x1100)
            } else {
                image(0, MIB, 0, 0x1100 - 64)
            };
            f[idx] = val;
            if let Ok(p) = plan(&f, RAM, 16 * MIB, 0x3000, 0x2000) {
                check_plan(&p, f.len(), RAM + 16 * MIB, 0x2000, 0x3000);
            }
        }

        #[test]
        fn valid_elfs_plan_disjointly(
            sizes in proptest::collection::vec((1u64..0x4000, 0u64..0x4000, 0u64..0x3), 1..6),
            ram_mib in 1u64..8, dtb in 1u64..0x4000, initrd in 0u64..0x10000,
        ) {
            // Segments laid out in order with random gaps; file bytes shared (offset 0x1000).
            let mut phs = Vec::new();
            let mut at = RAM + (sizes[0].2 << 16);
            for &(memsz, gap, _) in &sizes {
                phs.push((PT_LOAD, 0x1000, at, at, memsz.min(0x100), memsz));
                at += memsz + gap;
            }
            let f = elf(phs[0].2, &phs, 0x1100);
            let ram_end = RAM + ram_mib * MIB;
            match plan(&f, RAM, ram_mib * MIB, initrd, dtb) {
                Ok(p) => {
                    prop_assert!(at <= ram_end);
                    check_plan(&p, f.len(), ram_end, dtb, initrd);
                }
                Err(e) => prop_assert!(matches!(e,
                    LoadError::SegmentOutsideRam(_) | LoadError::NoRoomForDtb | LoadError::NoRoomForInitrd)),
            }
        }
    }
}
