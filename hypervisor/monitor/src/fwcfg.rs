//! Driver for QEMU's fw_cfg device, MMIO flavour (`qemu,fw-cfg-mmio` on the virt board).
//!
//! The monitor learns which guests to run from fw_cfg files named `opt/vmfork/<n>/…` (see
//! `vmfork_core::guest_spec`). Registers, all big-endian (QEMU `docs/specs/fw_cfg.rst`):
//!
//! | offset | register | access |
//! |--------|----------|--------|
//! | 0x00   | data     | 1..8 bytes; reads return the selected item's byte stream in address order |
//! | 0x08   | selector | 16-bit; a write selects an item and rewinds its offset to 0 |
//! | 0x10   | DMA address | 64-bit physical address of an `FWCfgDmaAccess`; a 64-bit write, or a 32-bit write of the low half, starts the transfer |
//!
//! Bulk reads use the DMA interface when item [`FW_CFG_ID`] advertises it (bit 1) and the DMA
//! register reads back its `"QEMU CFG"` signature; otherwise they fall back to the data register,
//! eight bytes per access. The monitor's EL2 stage 1 is an identity map, so the virtual address
//! of a buffer is the physical address the device is given.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::ptr;

use spin::Mutex;
use vmfork_core::guest_spec::{self, FwCfgFile, GuestConfig, GuestFiles, SpecError};
use vmfork_core::platform::{Platform, Region};

/// Item holding the signature `"QEMU"`.
pub const FW_CFG_SIGNATURE: u16 = 0x0000;
/// Item holding the feature bitmap (32-bit little-endian).
pub const FW_CFG_ID: u16 = 0x0001;
/// [`FW_CFG_ID`] bit: the DMA interface.
pub const FW_CFG_VERSION_DMA: u32 = 1 << 1;
/// `FWCfgDmaAccess.control`: the transfer failed.
pub const FW_CFG_DMA_CTL_ERROR: u32 = 1 << 0;
/// `FWCfgDmaAccess.control`: read `length` bytes into `address`.
pub const FW_CFG_DMA_CTL_READ: u32 = 1 << 1;
/// `FWCfgDmaAccess.control`: advance the item's offset by `length` bytes.
pub const FW_CFG_DMA_CTL_SKIP: u32 = 1 << 2;
/// `FWCfgDmaAccess.control`: select the item in bits 31:16 first.
pub const FW_CFG_DMA_CTL_SELECT: u32 = 1 << 3;
/// What the DMA address register reads as when the DMA interface exists.
pub const FW_CFG_DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647; // "QEMU CFG"

/// Offset of the data register.
const REG_DATA: usize = 0x00;
/// Offset of the selector register.
const REG_SELECTOR: usize = 0x08;
/// Offset of the DMA address register.
const REG_DMA: usize = 0x10;
/// Bytes of registers without / with the DMA register.
const REGS_LEN: u64 = 0x10;
const REGS_LEN_DMA: u64 = 0x18;
/// How long a DMA transfer may take before it counts as lost (QEMU completes it inside the
/// trigger write; this only bounds a broken device).
const DMA_TIMEOUT_SECS: u64 = 5;
/// Largest config file read into memory.
const MAX_CONFIG_LEN: u32 = 64 << 10;
/// Chunk size of the streamed checksum of an initrd.
const CHECKSUM_CHUNK: usize = 1 << 20;

/// Errors of the fw_cfg driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FwCfgError {
    /// The device-tree region is too small to hold the selector and data registers.
    RegionTooSmall(u64),
    /// Item [`FW_CFG_SIGNATURE`] does not read `"QEMU"`.
    BadSignature([u8; 4]),
    /// The device set the error bit of a DMA transfer.
    DmaError {
        /// The item.
        select: u16,
    },
    /// A transfer longer than the 32-bit `FWCfgDmaAccess.length` allows.
    TooLong(usize),
    /// A read of `len` bytes at `offset` does not fit in the file's `size` bytes.
    OutOfBounds {
        /// The file.
        name: String,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The file's size.
        size: u32,
    },
    /// No heap for a buffer of this many bytes.
    OutOfMemory(usize),
    /// A file the directory listed earlier is gone.
    NoSuchFile(String),
    /// The file directory or the guest file names are malformed.
    Spec(SpecError),
    /// Guest `guest`'s config file is bigger than 64 KiB.
    ConfigTooLarge {
        /// The guest index.
        guest: u32,
        /// The file's size.
        size: u32,
    },
    /// Guest `guest`'s config file is not UTF-8.
    ConfigNotUtf8 {
        /// The guest index.
        guest: u32,
    },
    /// Guest `guest`'s config file does not parse.
    Config {
        /// The guest index.
        guest: u32,
        /// What is wrong.
        error: SpecError,
    },
}

impl fmt::Display for FwCfgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RegionTooSmall(size) => write!(
                f,
                "fw_cfg region of {size:#x} bytes is smaller than its {REGS_LEN:#x} bytes of registers"
            ),
            Self::BadSignature(sig) => write!(f, "fw_cfg signature is {sig:02x?}, not \"QEMU\""),
            Self::DmaError { select } => write!(f, "fw_cfg DMA read of item {select:#x} failed"),
            Self::TooLong(len) => write!(f, "fw_cfg transfer of {len} bytes exceeds 4 GiB"),
            Self::OutOfBounds {
                name,
                offset,
                len,
                size,
            } => write!(
                f,
                "{name}: read of {len} bytes at offset {offset} exceeds its {size} bytes"
            ),
            Self::OutOfMemory(len) => write!(f, "no heap for a {len}-byte fw_cfg buffer"),
            Self::NoSuchFile(name) => write!(f, "fw_cfg has no file {name}"),
            Self::Spec(e) => write!(f, "{e}"),
            Self::ConfigTooLarge { guest, size } => write!(
                f,
                "guest {guest}: config file of {size} bytes exceeds {MAX_CONFIG_LEN}"
            ),
            Self::ConfigNotUtf8 { guest } => write!(f, "guest {guest}: config file is not UTF-8"),
            Self::Config { guest, error } => write!(f, "guest {guest}: {error}"),
        }
    }
}

impl From<SpecError> for FwCfgError {
    fn from(e: SpecError) -> Self {
        Self::Spec(e)
    }
}

/// `FWCfgDmaAccess`: the DMA descriptor, every field big-endian. The device reads it from RAM
/// and writes `control` back: 0 on success, [`FW_CFG_DMA_CTL_ERROR`] on failure.
#[repr(C, align(16))]
struct FwCfgDmaAccess {
    control: u32,
    length: u32,
    address: u64,
}

/// `dsb sy`: completes every memory access before it, as seen by all observers (the DMA
/// master included), before any memory access after it. aarch64-cpu's barrier is not `nomem`,
/// so the compiler also keeps memory accesses on their side of it.
#[inline(always)]
fn dsb_sy() {
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
}

/// One guest's files and its config, or why the config is unusable.
pub type GuestSpec = (GuestFiles, Result<GuestConfig, FwCfgError>);

/// The fw_cfg device: its registers and whether DMA is used.
pub struct FwCfg {
    base: usize,
    dma: bool,
    /// Serialises transactions: selecting an item and reading it must not interleave.
    lock: Mutex<()>,
}

impl FwCfg {
    /// Checks the signature at `region` and whether the DMA interface is there.
    pub fn probe(region: &Region) -> Result<FwCfg, FwCfgError> {
        if region.size < REGS_LEN {
            return Err(FwCfgError::RegionTooSmall(region.size));
        }
        let mut dev = FwCfg {
            base: region.base as usize,
            dma: false,
            lock: Mutex::new(()),
        };
        let mut sig = [0u8; 4];
        dev.read_data_register(FW_CFG_SIGNATURE, 0, &mut sig);
        if &sig != b"QEMU" {
            return Err(FwCfgError::BadSignature(sig));
        }
        let mut id = [0u8; 4];
        dev.read_data_register(FW_CFG_ID, 0, &mut id);
        let id = u32::from_le_bytes(id);
        if id & FW_CFG_VERSION_DMA != 0 && region.size >= REGS_LEN_DMA {
            let sig = dev.read_dma_signature();
            if sig == FW_CFG_DMA_SIGNATURE {
                dev.dma = true;
            } else {
                log::warn!("fw_cfg: DMA register reads {sig:#x}, not \"QEMU CFG\"; not using DMA");
            }
        }
        Ok(dev)
    }

    /// Whether bulk reads go through DMA.
    pub fn uses_dma(&self) -> bool {
        self.dma
    }

    /// Makes every read go through the data register (to test the fallback path).
    pub fn disable_dma(&mut self) {
        self.dma = false;
    }

    /// The file directory (item [`guest_spec::FW_CFG_FILE_DIR`]).
    pub fn files(&self) -> Result<Vec<FwCfgFile>, FwCfgError> {
        let mut count = [0u8; 4];
        self.read_item(guest_spec::FW_CFG_FILE_DIR, 0, &mut count)?;
        let entries = u32::from_be_bytes(count) as usize;
        let len = entries
            .checked_mul(guest_spec::FW_CFG_FILE_ENTRY_LEN)
            .and_then(|n| n.checked_add(4))
            .ok_or(FwCfgError::TooLong(usize::MAX))?;
        let mut dir = try_zeroed(len)?;
        self.read_item(guest_spec::FW_CFG_FILE_DIR, 0, &mut dir)?;
        Ok(guest_spec::parse_fw_cfg_dir(&dir)?)
    }

    /// Reads all of `file` into `dst`, which must be exactly `file.size` bytes long.
    pub fn read_file(&self, file: &FwCfgFile, dst: &mut [u8]) -> Result<(), FwCfgError> {
        if dst.len() as u64 != u64::from(file.size) {
            return Err(out_of_bounds(file, 0, dst.len()));
        }
        self.read_file_at(file, 0, dst)
    }

    /// Reads `dst.len()` bytes of `file` starting at byte `offset`.
    pub fn read_file_at(
        &self,
        file: &FwCfgFile,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), FwCfgError> {
        let fits = offset
            .checked_add(dst.len() as u64)
            .is_some_and(|end| end <= u64::from(file.size));
        if !fits {
            return Err(out_of_bounds(file, offset, dst.len()));
        }
        self.read_item(file.select, offset as u32, dst)
    }

    /// Reads all of `file` into a new heap buffer.
    pub fn read_file_vec(&self, file: &FwCfgFile) -> Result<Vec<u8>, FwCfgError> {
        let mut buf = try_zeroed(file.size as usize)?;
        self.read_file(file, &mut buf)?;
        Ok(buf)
    }

    /// Every guest named by `opt/vmfork/<n>/…` files, in index order, with its parsed config
    /// (the defaults when it has none). The first bad name or config is the error.
    #[allow(dead_code)] // the VM loader's entry point once it exists
    pub fn guest_files(&self) -> Result<Vec<(GuestFiles, GuestConfig)>, FwCfgError> {
        let dir = self.files()?;
        self.guest_specs(&dir)?
            .into_iter()
            .map(|(files, config)| config.map(|c| (files, c)))
            .collect()
    }

    /// Like [`FwCfg::guest_files`] for the directory `dir`, but a config that fails to read or
    /// parse is an error of that guest alone. Bad file names still fail the whole list.
    pub fn guest_specs(&self, dir: &[FwCfgFile]) -> Result<Vec<GuestSpec>, FwCfgError> {
        let groups = guest_spec::group(dir.iter().map(|f| f.name.as_str()))?;
        Ok(groups
            .into_iter()
            .map(|g| {
                let config = match &g.config {
                    None => Ok(GuestConfig::default()),
                    Some(name) => self.read_config(dir, g.index, name),
                };
                (g, config)
            })
            .collect())
    }

    fn read_config(
        &self,
        dir: &[FwCfgFile],
        guest: u32,
        name: &str,
    ) -> Result<GuestConfig, FwCfgError> {
        let file = lookup(dir, name)?;
        if file.size > MAX_CONFIG_LEN {
            return Err(FwCfgError::ConfigTooLarge {
                guest,
                size: file.size,
            });
        }
        let bytes = self.read_file_vec(file)?;
        // A config written by C tools may carry its string's NUL terminator.
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let text =
            core::str::from_utf8(&bytes[..end]).map_err(|_| FwCfgError::ConfigNotUtf8 { guest })?;
        guest_spec::parse_config(text).map_err(|error| FwCfgError::Config { guest, error })
    }

    /// Reads `dst.len()` bytes of item `select` starting at `offset`.
    fn read_item(&self, select: u16, offset: u32, dst: &mut [u8]) -> Result<(), FwCfgError> {
        if self.dma {
            self.read_dma(select, offset, dst)
        } else {
            self.read_data_register(select, offset, dst);
            Ok(())
        }
    }

    /// The traditional interface: select, skip `offset` bytes, then read the data register,
    /// eight bytes per access while at least eight remain.
    fn read_data_register(&self, select: u16, offset: u32, dst: &mut [u8]) {
        let _guard = self.lock.lock();
        let data = (self.base + REG_DATA) as *const u64;
        let data8 = (self.base + REG_DATA) as *const u8;
        // SAFETY: `base` is the fw_cfg register block (checked to be at least REGS_LEN bytes),
        // mapped as Device memory by the monitor's identity map; the selector register takes an
        // aligned 16-bit write, and the data register aligned 1- and 8-byte reads, which have no
        // effect beyond advancing the selected item's offset.
        unsafe {
            ptr::write_volatile((self.base + REG_SELECTOR) as *mut u16, select.to_be());
            let (mut skip8, skip1) = (offset / 8, offset % 8);
            while skip8 > 0 {
                ptr::read_volatile(data);
                skip8 -= 1;
            }
            for _ in 0..skip1 {
                ptr::read_volatile(data8);
            }
            let mut chunks = dst.chunks_exact_mut(8);
            for chunk in &mut chunks {
                // The device presents the stream in address order: the first byte of the
                // stream is at the lowest address of the 8-byte access.
                chunk.copy_from_slice(&ptr::read_volatile(data).to_ne_bytes());
            }
            for b in chunks.into_remainder() {
                *b = ptr::read_volatile(data8);
            }
        }
    }

    /// What the DMA address register reads as ([`FW_CFG_DMA_SIGNATURE`] when DMA exists).
    fn read_dma_signature(&self) -> u64 {
        // SAFETY: the caller checked that the region holds the DMA register; an aligned 64-bit
        // read of it returns the signature and has no side effect.
        u64::from_be(unsafe { ptr::read_volatile((self.base + REG_DMA) as *const u64) })
    }

    /// The DMA interface: one descriptor that selects the item and skips to `offset` (when not
    /// 0), then one that reads `dst.len()` bytes straight into `dst`.
    fn read_dma(&self, select: u16, offset: u32, dst: &mut [u8]) -> Result<(), FwCfgError> {
        let len = u32::try_from(dst.len()).map_err(|_| FwCfgError::TooLong(dst.len()))?;
        let sel = (u32::from(select) << 16) | FW_CFG_DMA_CTL_SELECT;
        let _guard = self.lock.lock();
        if offset == 0 {
            if len > 0 {
                self.dma_transfer(select, sel | FW_CFG_DMA_CTL_READ, len, dst.as_mut_ptr())?;
            }
            return Ok(());
        }
        self.dma_transfer(select, sel | FW_CFG_DMA_CTL_SKIP, offset, ptr::null_mut())?;
        if len > 0 {
            self.dma_transfer(select, FW_CFG_DMA_CTL_READ, len, dst.as_mut_ptr())?;
        }
        Ok(())
    }

    /// Runs one `FWCfgDmaAccess` with `control`, `length` and destination `dst` (`length` bytes
    /// of RAM, or null for a skip) and waits for it.
    fn dma_transfer(
        &self,
        select: u16,
        control: u32,
        length: u32,
        dst: *mut u8,
    ) -> Result<(), FwCfgError> {
        let mut access = FwCfgDmaAccess {
            control: 0,
            length: 0,
            address: 0,
        };
        let desc = ptr::addr_of_mut!(access);
        // SAFETY: `desc` points at the local descriptor above; it lives until this function
        // returns, and the function returns only once the device has finished with it.
        unsafe {
            ptr::write_volatile(ptr::addr_of_mut!((*desc).length), length.to_be());
            ptr::write_volatile(ptr::addr_of_mut!((*desc).address), (dst as u64).to_be());
            ptr::write_volatile(ptr::addr_of_mut!((*desc).control), control.to_be());
        }
        // Ordering rule 1: the descriptor (Normal cacheable RAM) must be visible to the device
        // before the write to the DMA register (Device memory) that makes the device read it.
        // Stores to Normal and to Device memory are not ordered against each other, so a DSB
        // makes the descriptor stores complete first. It also completes any earlier CPU stores
        // to the destination, so none of them can land after the device's writes.
        dsb_sy();
        // SAFETY: the region holds the DMA register (`self.dma` is only set after checking the
        // size and the register's signature); a 64-bit big-endian write of the descriptor's
        // physical address (= its address: the monitor's stage 1 is an identity map) starts the
        // transfer. The device writes only the descriptor's control word and `length` bytes at
        // `dst`, which the caller owns exclusively through `&mut`.
        unsafe { ptr::write_volatile((self.base + REG_DMA) as *mut u64, (desc as u64).to_be()) };
        // Ordering rule 2: poll the control word with volatile reads until the device clears
        // every bit but the error bit (the compiler may neither cache nor elide these reads).
        let (t0, freq) = crate::arch::counter();
        let status = loop {
            // SAFETY: `desc` is the live local descriptor; the device writes its control word,
            // which an aligned volatile read observes.
            let c = u32::from_be(unsafe { ptr::read_volatile(ptr::addr_of!((*desc).control)) });
            if c & !FW_CFG_DMA_CTL_ERROR == 0 {
                break c;
            }
            let (now, _) = crate::arch::counter();
            if now.wrapping_sub(t0) > DMA_TIMEOUT_SECS.saturating_mul(freq) {
                // A transfer cannot be cancelled: returning would let the device write into a
                // dead stack frame and a buffer the caller reuses. Stop the machine instead.
                log::error!(
                    "fw_cfg: DMA of item {select:#x} not done after {DMA_TIMEOUT_SECS} s \
                     (control {c:#x}); stopping"
                );
                crate::arch::semihosting::exit(crate::arch::semihosting::EXIT_PANIC);
            }
            core::hint::spin_loop();
        };
        // Ordering rule 3: the loads of the destination must not be performed before the load
        // that saw the transfer complete (the CPU may otherwise read stale data speculatively);
        // a DSB after the poll orders them.
        dsb_sy();
        if status & FW_CFG_DMA_CTL_ERROR != 0 {
            return Err(FwCfgError::DmaError { select });
        }
        Ok(())
    }
}

fn out_of_bounds(file: &FwCfgFile, offset: u64, len: usize) -> FwCfgError {
    FwCfgError::OutOfBounds {
        name: file.name.clone(),
        offset,
        len: len as u64,
        size: file.size,
    }
}

fn lookup<'a>(dir: &'a [FwCfgFile], name: &str) -> Result<&'a FwCfgFile, FwCfgError> {
    guest_spec::find(dir, name).ok_or_else(|| FwCfgError::NoSuchFile(name.into()))
}

/// A zero-filled heap buffer of `len` bytes, or an error instead of the allocator's panic.
fn try_zeroed(len: usize) -> Result<Vec<u8>, FwCfgError> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| FwCfgError::OutOfMemory(len))?;
    buf.resize(len, 0);
    Ok(buf)
}

/// FNV-1a 64 of `bytes`, continuing from `hash` (start with [`FNV1A_OFFSET`]).
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// FNV-1a 64 offset basis.
const FNV1A_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// At boot: lists the guests the fw_cfg files name, one info line each, and one error line per
/// malformed guest spec. At debug level, also logs the FNV-1a 64 of each kernel (read in one
/// transfer, as a loader does) and each initrd (read in 1 MiB chunks). `fw_cfg=nodma` on the
/// monitor's command line forces the data-register interface.
pub fn log_guests(platform: &Platform, bootargs: &str) {
    let Some(region) = &platform.fw_cfg else {
        log::info!("fw_cfg: none in the device tree; no guests");
        return;
    };
    let mut dev = match FwCfg::probe(region) {
        Ok(d) => d,
        Err(e) => {
            log::error!("fw_cfg: {e}");
            return;
        }
    };
    if vmfork_core::cmdline::value(bootargs, "fw_cfg") == Some("nodma") {
        dev.disable_dma();
    }
    log::debug!(
        "fw_cfg at {:#x}: {} interface",
        region.base,
        if dev.uses_dma() {
            "DMA"
        } else {
            "data register"
        }
    );
    let dir = match dev.files() {
        Ok(d) => d,
        Err(e) => {
            log::error!("fw_cfg: file directory: {e}");
            return;
        }
    };
    let specs = match dev.guest_specs(&dir) {
        Ok(s) => s,
        Err(e) => {
            log::error!("fw_cfg: guest files: {e}");
            return;
        }
    };
    if specs.is_empty() {
        log::info!(
            "fw_cfg: no guests (no {}<n>/kernel files)",
            guest_spec::GUEST_PREFIX
        );
    }
    for (files, config) in specs {
        if let Err(e) = log_guest(&dev, &dir, &files, config) {
            log::error!("fw_cfg: {e}");
        }
    }
}

fn log_guest(
    dev: &FwCfg,
    dir: &[FwCfgFile],
    files: &GuestFiles,
    config: Result<GuestConfig, FwCfgError>,
) -> Result<(), FwCfgError> {
    let n = files.index;
    let config = config?;
    let kernel = lookup(dir, &files.kernel)?;
    let initrd = files
        .initrd
        .as_deref()
        .map(|name| lookup(dir, name))
        .transpose()?;
    let initrd_text = match initrd {
        Some(f) => alloc::format!("initrd {} ({} bytes)", f.name, f.size),
        None => String::from("initrd none"),
    };
    log::info!(
        "fw_cfg: guest {n}: kernel {} ({} bytes), {initrd_text}, mem={}M cpus={} cmdline=\"{}\"{}",
        kernel.name,
        kernel.size,
        config.mem >> 20,
        config.cpus,
        config.cmdline,
        config
            .name
            .as_deref()
            .map(|s| alloc::format!(" name={s}"))
            .unwrap_or_default(),
    );
    if log::log_enabled!(log::Level::Debug) {
        let bytes = dev.read_file_vec(kernel)?;
        log::debug!(
            "fw_cfg: guest {n}: kernel fnv1a={:#018x}",
            fnv1a(FNV1A_OFFSET, &bytes)
        );
        drop(bytes);
        if let Some(f) = initrd {
            let mut chunk = try_zeroed(CHECKSUM_CHUNK.min(f.size as usize))?;
            let (mut offset, mut hash) = (0u64, FNV1A_OFFSET);
            while offset < u64::from(f.size) {
                let len = chunk.len().min((u64::from(f.size) - offset) as usize);
                dev.read_file_at(f, offset, &mut chunk[..len])?;
                hash = fnv1a(hash, &chunk[..len]);
                offset += len as u64;
            }
            log::debug!("fw_cfg: guest {n}: initrd fnv1a={hash:#018x}");
        }
    }
    Ok(())
}
