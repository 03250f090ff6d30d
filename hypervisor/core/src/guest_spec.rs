//! How guests are named at boot: QEMU fw_cfg files under `opt/vmfork/<n>/`.
//!
//! The monitor is started with one group of fw_cfg files per guest:
//!
//! ```text
//! -fw_cfg name=opt/vmfork/0/kernel,file=Image        (required: arm64 Image or ELF)
//! -fw_cfg name=opt/vmfork/0/initrd,file=initrd.cpio  (optional)
//! -fw_cfg name=opt/vmfork/0/config,file=guest0.cfg   (optional, see parse_config)
//! ```
//!
//! `<n>` is a decimal index without leading zeros, at most [`MAX_GUEST_INDEX`]; guests start in
//! index order and indices need not be contiguous. The monitor's arch layer reads the fw_cfg
//! file directory (selector [`FW_CFG_FILE_DIR`]) through the DMA interface and hands the raw
//! bytes to [`parse_fw_cfg_dir`]; [`group`] then sorts the names into [`GuestFiles`]. Files
//! outside `opt/vmfork/` (QEMU's own `etc/…`, `bootorder`, …) are ignored.
//!
//! # Config file
//! Plain text, `key=value` pairs separated by whitespace or newlines; `#` starts a comment that
//! runs to the end of the line. Keys:
//!
//! | key       | value                                   | default |
//! |-----------|-----------------------------------------|---------|
//! | `mem`     | size: `64M`, `1G`, `512K` or plain bytes (K/M/G are powers of 1024) | `64M` |
//! | `cpus`    | 1..=8                                   | 1       |
//! | `cmdline` | the rest of the line, spaces included   | empty   |
//! | `name`    | 1-32 of `[A-Za-z0-9._-]`                | none    |
//!
//! `mem` must be a multiple of 2 MiB, from 2 MiB to [`MAX_GUEST_MEM`]: guest RAM is mapped with
//! 2 MiB stage-2 blocks and the Linux `Image` needs a 2 MiB aligned base; 32 GiB keeps all of a
//! guest's RAM inside the window arm64 Linux requires the kernel and initrd to share.
//! Each key may appear once; unknown keys and bad values are errors naming the line.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::guest_dtb::layout::MAX_VCPUS;

/// fw_cfg selector of the file directory.
pub const FW_CFG_FILE_DIR: u16 = 0x0019;
/// Size of `FWCfgFile.name`, NUL terminator included.
pub const FW_CFG_NAME_LEN: usize = 56;
/// Size of one `FWCfgFile` directory entry.
pub const FW_CFG_FILE_ENTRY_LEN: usize = 64;
/// Prefix of every vmfork guest file.
pub const GUEST_PREFIX: &str = "opt/vmfork/";
/// Largest guest index.
pub const MAX_GUEST_INDEX: u32 = 255;
/// Default guest RAM.
pub const DEFAULT_GUEST_MEM: u64 = 64 << 20;
/// Guest RAM granule: `mem` must be a multiple of this.
pub const GUEST_MEM_ALIGN: u64 = 2 << 20;
/// Largest guest RAM.
pub const MAX_GUEST_MEM: u64 = 32 << 30;
/// Longest kernel command line (Linux arm64 `COMMAND_LINE_SIZE` less its NUL).
pub const MAX_CMDLINE_LEN: usize = 2047;
/// Longest guest name.
pub const MAX_NAME_LEN: usize = 32;

/// Whether `name` can name a VM (a guest config's `name=`, or a `Rename` request): 1 to
/// [`MAX_NAME_LEN`] of `[A-Za-z0-9._-]`, and not only digits nor `vm` and digits, which the tool
/// reads as VM ids.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err("must be 1-32 of [A-Za-z0-9._-]");
    }
    let digits = name.strip_prefix("vm").unwrap_or(name);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must not look like a VM id (only digits, or vm and digits)");
    }
    Ok(())
}

/// Errors in the fw_cfg directory, the guest file names or a guest config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// The directory is shorter than its count says.
    DirTruncated {
        /// Bytes the count needs.
        needed: usize,
        /// Bytes there are.
        have: usize,
    },
    /// Directory entry `n`'s name has no NUL within its 56 bytes.
    NameNotTerminated(usize),
    /// Directory entry `n`'s name is not UTF-8.
    NameNotUtf8(usize),
    /// A `opt/vmfork/<n>/…` name whose `<n>` is not a canonical decimal ≤ [`MAX_GUEST_INDEX`].
    BadIndex(String),
    /// A name under `opt/vmfork/` that is not `<n>/kernel`, `<n>/initrd` or `<n>/config`.
    UnknownGuestFile(String),
    /// The same guest file given twice.
    DuplicateFile(String),
    /// Guest `n` has an initrd or config but no kernel.
    MissingKernel(u32),
    /// Config line `line` (1-based) has a token without `=`.
    MissingEquals {
        /// Line number.
        line: usize,
        /// The token.
        token: String,
    },
    /// Config line `line` has a key this version does not know.
    UnknownKey {
        /// Line number.
        line: usize,
        /// The key.
        key: String,
    },
    /// Config key given more than once.
    DuplicateKey {
        /// Line number of the repeat.
        line: usize,
        /// The key.
        key: String,
    },
    /// Config value that does not parse or is out of range.
    BadValue {
        /// Line number.
        line: usize,
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::DirTruncated { needed, have } => write!(
                f,
                "fw_cfg file directory truncated: needs {needed} bytes, has {have}"
            ),
            SpecError::NameNotTerminated(i) => {
                write!(f, "fw_cfg file {i}: name not NUL-terminated")
            }
            SpecError::NameNotUtf8(i) => write!(f, "fw_cfg file {i}: name is not UTF-8"),
            SpecError::BadIndex(n) => write!(
                f,
                "{n}: guest index must be a decimal 0..={MAX_GUEST_INDEX} without leading zeros"
            ),
            SpecError::UnknownGuestFile(n) => write!(
                f,
                "{n}: expected {GUEST_PREFIX}<n>/kernel, /initrd or /config"
            ),
            SpecError::DuplicateFile(n) => write!(f, "{n}: given twice"),
            SpecError::MissingKernel(i) => {
                write!(f, "guest {i}: no {GUEST_PREFIX}{i}/kernel file")
            }
            SpecError::MissingEquals { line, token } => {
                write!(f, "config line {line}: `{token}` is not key=value")
            }
            SpecError::UnknownKey { line, key } => write!(
                f,
                "config line {line}: unknown key `{key}` (known: mem, cpus, cmdline, name)"
            ),
            SpecError::DuplicateKey { line, key } => {
                write!(f, "config line {line}: `{key}` given twice")
            }
            SpecError::BadValue {
                line,
                key,
                value,
                why,
            } => write!(f, "config line {line}: {key}={value}: {why}"),
        }
    }
}

/// One entry of the fw_cfg file directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfgFile {
    /// File size in bytes.
    pub size: u32,
    /// Selector to read it with.
    pub select: u16,
    /// Its name, e.g. `opt/vmfork/0/kernel`.
    pub name: String,
}

/// Parses the fw_cfg file directory: a big-endian u32 count, then `count` entries of
/// `{u32 size, u16 select, u16 reserved, char name[56]}`, all big-endian. Bytes after the last
/// entry are ignored.
pub fn parse_fw_cfg_dir(bytes: &[u8]) -> Result<Vec<FwCfgFile>, SpecError> {
    let have = bytes.len();
    let count_bytes: [u8; 4] = bytes
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or(SpecError::DirTruncated { needed: 4, have })?;
    let count = u32::from_be_bytes(count_bytes) as usize;
    let needed = count
        .checked_mul(FW_CFG_FILE_ENTRY_LEN)
        .and_then(|n| n.checked_add(4))
        .unwrap_or(usize::MAX);
    if needed > have {
        return Err(SpecError::DirTruncated { needed, have });
    }
    bytes[4..needed]
        .chunks_exact(FW_CFG_FILE_ENTRY_LEN)
        .enumerate()
        .map(|(i, e)| {
            let raw = &e[8..8 + FW_CFG_NAME_LEN];
            let nul = raw
                .iter()
                .position(|&b| b == 0)
                .ok_or(SpecError::NameNotTerminated(i))?;
            let name = core::str::from_utf8(&raw[..nul]).map_err(|_| SpecError::NameNotUtf8(i))?;
            Ok(FwCfgFile {
                size: u32::from_be_bytes([e[0], e[1], e[2], e[3]]),
                select: u16::from_be_bytes([e[4], e[5]]),
                name: name.to_string(),
            })
        })
        .collect()
}

/// The directory entry called `name`, if any.
pub fn find<'a>(dir: &'a [FwCfgFile], name: &str) -> Option<&'a FwCfgFile> {
    dir.iter().find(|f| f.name == name)
}

/// The fw_cfg files naming one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFiles {
    /// The guest's `<n>`.
    pub index: u32,
    /// Name of its kernel file.
    pub kernel: String,
    /// Name of its initrd file, if any.
    pub initrd: Option<String>,
    /// Name of its config file, if any.
    pub config: Option<String>,
}

/// Which of a guest's files a name is.
#[derive(Clone, Copy)]
enum Part {
    Kernel,
    Initrd,
    Config,
}

fn parse_index(s: &str) -> Option<u32> {
    let canonical = !s.is_empty()
        && s.len() <= 3
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    s.parse::<u32>()
        .ok()
        .filter(|&n| canonical && n <= MAX_GUEST_INDEX)
}

/// Sorts fw_cfg file names into guests, in index order.
///
/// Names outside `opt/vmfork/` are ignored; malformed ones under it are errors, as are
/// duplicates and guests without a kernel.
pub fn group<'a>(file_names: impl Iterator<Item = &'a str>) -> Result<Vec<GuestFiles>, SpecError> {
    // (index, kernel, initrd, config), kept sorted by index.
    type Slot = (u32, Option<String>, Option<String>, Option<String>);
    let mut slots: Vec<Slot> = Vec::new();
    for name in file_names {
        let Some(rest) = name.strip_prefix(GUEST_PREFIX) else {
            continue;
        };
        let (idx, part) = rest
            .split_once('/')
            .ok_or_else(|| SpecError::UnknownGuestFile(name.to_string()))?;
        let index = parse_index(idx).ok_or_else(|| SpecError::BadIndex(name.to_string()))?;
        let part = match part {
            "kernel" => Part::Kernel,
            "initrd" => Part::Initrd,
            "config" => Part::Config,
            _ => return Err(SpecError::UnknownGuestFile(name.to_string())),
        };
        let pos = match slots.binary_search_by_key(&index, |s| s.0) {
            Ok(p) => p,
            Err(p) => {
                slots.insert(p, (index, None, None, None));
                p
            }
        };
        let slot = &mut slots[pos];
        let field = match part {
            Part::Kernel => &mut slot.1,
            Part::Initrd => &mut slot.2,
            Part::Config => &mut slot.3,
        };
        if field.is_some() {
            return Err(SpecError::DuplicateFile(name.to_string()));
        }
        *field = Some(name.to_string());
    }
    slots
        .into_iter()
        .map(|(index, kernel, initrd, config)| {
            Ok(GuestFiles {
                index,
                kernel: kernel.ok_or(SpecError::MissingKernel(index))?,
                initrd,
                config,
            })
        })
        .collect()
}

/// A guest's settings from its config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Bytes of guest RAM.
    pub mem: u64,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Kernel command line.
    pub cmdline: String,
    /// Optional human name.
    pub name: Option<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            mem: DEFAULT_GUEST_MEM,
            cpus: 1,
            cmdline: String::new(),
            name: None,
        }
    }
}

/// Parses a size: decimal digits with an optional `K`, `M` or `G` suffix (either case,
/// powers of 1024). Returns `None` on anything else or on overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Checks a guest RAM size: a non-zero multiple of [`GUEST_MEM_ALIGN`], at most
/// [`MAX_GUEST_MEM`]. The error says what is wrong. The one rule for boot configs, `vmfork
/// create` (checked by the tool before it uploads anything) and the monitor's `Create`.
pub fn check_mem(bytes: u64) -> Result<(), &'static str> {
    if bytes == 0 || !bytes.is_multiple_of(GUEST_MEM_ALIGN) {
        return Err("must be a non-zero multiple of 2M");
    }
    if bytes > MAX_GUEST_MEM {
        return Err("more than the 32G maximum");
    }
    Ok(())
}

/// Checks a vCPU count: 1 to [`MAX_VCPUS`].
pub fn check_cpus(n: u32) -> Result<(), &'static str> {
    if (1..=MAX_VCPUS).contains(&n) {
        Ok(())
    } else {
        Err("must be 1..=8")
    }
}

/// Checks a kernel command line: at most [`MAX_CMDLINE_LEN`] bytes, no NUL.
pub fn check_cmdline(s: &str) -> Result<(), &'static str> {
    if s.len() > MAX_CMDLINE_LEN {
        return Err("longer than 2047 bytes");
    }
    if s.contains('\0') {
        return Err("contains a NUL byte");
    }
    Ok(())
}

fn set_once<T>(slot: &mut Option<T>, v: T, line: usize, key: &str) -> Result<(), SpecError> {
    if slot.is_some() {
        return Err(SpecError::DuplicateKey {
            line,
            key: key.to_string(),
        });
    }
    *slot = Some(v);
    Ok(())
}

/// Parses a guest config file (format in the module doc).
pub fn parse_config(text: &str) -> Result<GuestConfig, SpecError> {
    let (mut mem, mut cpus, mut cmdline, mut name) = (None, None, None, None);
    for (i, raw_line) in text.lines().enumerate() {
        let line = i + 1;
        let mut rest = raw_line.trim_start();
        while !rest.is_empty() && !rest.starts_with('#') {
            let token_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let Some(eq) = rest[..token_end].find('=') else {
                return Err(SpecError::MissingEquals {
                    line,
                    token: rest[..token_end].to_string(),
                });
            };
            let key = &rest[..eq];
            let bad = |key: &'static str, value: &str, why: &'static str| SpecError::BadValue {
                line,
                key,
                value: value.to_string(),
                why,
            };
            if key == "cmdline" {
                let value = rest[eq + 1..].trim();
                check_cmdline(value).map_err(|why| bad("cmdline", value, why))?;
                set_once(&mut cmdline, value.to_string(), line, key)?;
                break;
            }
            let value = &rest[eq + 1..token_end];
            match key {
                "mem" => {
                    let bytes = parse_size(value)
                        .ok_or_else(|| bad("mem", value, "not a size like 64M, 1G or 512K"))?;
                    check_mem(bytes).map_err(|why| bad("mem", value, why))?;
                    set_once(&mut mem, bytes, line, key)?;
                }
                "cpus" => {
                    let n = value
                        .parse::<u32>()
                        .map_err(|_| bad("cpus", value, "must be 1..=8"))?;
                    check_cpus(n).map_err(|why| bad("cpus", value, why))?;
                    set_once(&mut cpus, n, line, key)?;
                }
                "name" => {
                    check_name(value).map_err(|why| bad("name", value, why))?;
                    set_once(&mut name, value.to_string(), line, key)?;
                }
                _ => {
                    return Err(SpecError::UnknownKey {
                        line,
                        key: key.to_string(),
                    })
                }
            }
            rest = rest[token_end..].trim_start();
        }
    }
    let d = GuestConfig::default();
    Ok(GuestConfig {
        mem: mem.unwrap_or(d.mem),
        cpus: cpus.unwrap_or(d.cpus),
        cmdline: cmdline.unwrap_or(d.cmdline),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use proptest::prelude::*;

    fn dir_bytes(files: &[(u32, u16, &str)]) -> Vec<u8> {
        let mut b = (files.len() as u32).to_be_bytes().to_vec();
        for &(size, select, name) in files {
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&select.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FW_CFG_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            b.extend_from_slice(&n);
        }
        b
    }

    #[test]
    fn vm_shape_limits() {
        assert_eq!(check_mem(GUEST_MEM_ALIGN), Ok(()));
        assert_eq!(check_mem(MAX_GUEST_MEM), Ok(()));
        assert!(check_mem(0).is_err());
        assert!(check_mem(3 << 20).is_err());
        assert!(check_mem(MAX_GUEST_MEM + GUEST_MEM_ALIGN).is_err());
        assert_eq!(check_cpus(1), Ok(()));
        assert_eq!(check_cpus(MAX_VCPUS), Ok(()));
        assert!(check_cpus(0).is_err());
        assert!(check_cpus(MAX_VCPUS + 1).is_err());
        assert_eq!(check_cmdline(&"x".repeat(MAX_CMDLINE_LEN)), Ok(()));
        assert!(check_cmdline(&"x".repeat(MAX_CMDLINE_LEN + 1)).is_err());
        assert!(check_cmdline("a\0b").is_err());
        // The config parser applies the same rules.
        assert!(parse_config("cpus=9").is_err());
        assert!(parse_config("mem=3M").is_err());
    }

    #[test]
    fn fw_cfg_dir() {
        let b = dir_bytes(&[
            (0x1234_5678, 0x20, "opt/vmfork/0/kernel"),
            (12, 0x21, "etc/boot-fail-wait"),
        ]);
        assert_eq!(b.len(), 4 + 2 * 64);
        let d = parse_fw_cfg_dir(&b).unwrap();
        assert_eq!(
            d[0],
            FwCfgFile {
                size: 0x1234_5678,
                select: 0x20,
                name: "opt/vmfork/0/kernel".into()
            }
        );
        assert_eq!(d[1].name, "etc/boot-fail-wait");
        assert_eq!(find(&d, "etc/boot-fail-wait").map(|f| f.select), Some(0x21));
        assert_eq!(find(&d, "nope"), None);
        assert_eq!(parse_fw_cfg_dir(&[0, 0, 0, 0]).unwrap(), []);
    }

    #[test]
    fn fw_cfg_dir_errors() {
        assert_eq!(
            parse_fw_cfg_dir(&[0, 0]),
            Err(SpecError::DirTruncated { needed: 4, have: 2 })
        );
        let b = dir_bytes(&[(1, 2, "a")]);
        assert_eq!(
            parse_fw_cfg_dir(&b[..60]),
            Err(SpecError::DirTruncated {
                needed: 68,
                have: 60
            })
        );
        assert!(matches!(
            parse_fw_cfg_dir(&[0xFF; 8]),
            Err(SpecError::DirTruncated { .. })
        ));
        let mut b = dir_bytes(&[(1, 2, "a"), (1, 3, "b")]);
        let name1 = 4 + 64 + 8;
        b[name1..name1 + 56].fill(b'x');
        assert_eq!(parse_fw_cfg_dir(&b), Err(SpecError::NameNotTerminated(1)));
        b[name1] = 0xFF;
        b[name1 + 1] = 0;
        assert_eq!(parse_fw_cfg_dir(&b), Err(SpecError::NameNotUtf8(1)));
    }

    #[test]
    fn groups_in_index_order() {
        let names = [
            "bootorder",
            "opt/vmfork/10/kernel",
            "opt/vmfork/2/config",
            "opt/vmfork/2/kernel",
            "opt/vmfork/0/initrd",
            "opt/vmfork/0/kernel",
            "etc/ramfb",
        ];
        let g = group(names.iter().copied()).unwrap();
        assert_eq!(g.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 2, 10]);
        assert_eq!(
            g[0],
            GuestFiles {
                index: 0,
                kernel: "opt/vmfork/0/kernel".into(),
                initrd: Some("opt/vmfork/0/initrd".into()),
                config: None,
            }
        );
        assert_eq!(g[1].config.as_deref(), Some("opt/vmfork/2/config"));
        assert_eq!(g[2].initrd, None);
        assert_eq!(group(["etc/x"].into_iter()).unwrap(), []);
    }

    #[test]
    fn group_errors() {
        let one = |n: &'static str| group([n, "opt/vmfork/0/kernel"].into_iter());
        for bad in [
            "opt/vmfork/01/kernel",
            "opt/vmfork//kernel",
            "opt/vmfork/x/kernel",
            "opt/vmfork/256/kernel",
            "opt/vmfork/+1/kernel",
            "opt/vmfork/-1/kernel",
            "opt/vmfork/1000/kernel",
        ] {
            assert_eq!(one(bad), Err(SpecError::BadIndex(bad.into())), "{bad}");
        }
        for bad in [
            "opt/vmfork/0",
            "opt/vmfork/0/kernel2",
            "opt/vmfork/0/initrd/x",
        ] {
            assert_eq!(
                one(bad),
                Err(SpecError::UnknownGuestFile(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            one("opt/vmfork/0/kernel"),
            Err(SpecError::DuplicateFile("opt/vmfork/0/kernel".into()))
        );
        assert_eq!(one("opt/vmfork/3/config"), Err(SpecError::MissingKernel(3)));
        assert!(group(["opt/vmfork/255/kernel"].into_iter()).is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size("2m"), Some(2 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        for bad in [
            "",
            "M",
            "1.5G",
            "-1M",
            "+1M",
            "0x10",
            "1T",
            "1MB",
            "18446744073709551615K",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_defaults_and_full() {
        assert_eq!(parse_config("").unwrap(), GuestConfig::default());
        assert_eq!(parse_config("  \n# nothing\n").unwrap().mem, 64 << 20);
        let c = parse_config(
            "# guest 0\nmem=128M cpus=2   name=web-1\ncmdline=console=ttyAMA0 earlycon rdinit=/sbin/init  \r\n",
        )
        .unwrap();
        assert_eq!(
            c,
            GuestConfig {
                mem: 128 << 20,
                cpus: 2,
                cmdline: "console=ttyAMA0 earlycon rdinit=/sbin/init".into(),
                name: Some("web-1".into()),
            }
        );
        // cmdline swallows the rest of its line, '#' included; other lines still parse.
        let c = parse_config("cpus=8 cmdline=a=b # c mem=4M\nmem=1G # trailing comment").unwrap();
        assert_eq!(c.cmdline, "a=b # c mem=4M");
        assert_eq!(c.mem, 1 << 30);
        assert_eq!(c.cpus, 8);
        assert_eq!(parse_config("cmdline=").unwrap().cmdline, "");
    }

    #[test]
    fn config_errors() {
        let e = |t: &str| parse_config(t).unwrap_err();
        // A name the tool would read as a VM id.
        for id_like in ["name=42", "name=vm7"] {
            assert!(
                matches!(e(id_like), SpecError::BadValue { key: "name", .. }),
                "{id_like}"
            );
        }
        assert!(parse_config("name=vm").is_ok() && parse_config("name=vm7a").is_ok());
        assert_eq!(
            e("mem=64M\nbogus"),
            SpecError::MissingEquals {
                line: 2,
                token: "bogus".into()
            }
        );
        assert_eq!(
            e("ram=64M"),
            SpecError::UnknownKey {
                line: 1,
                key: "ram".into()
            }
        );
        assert_eq!(
            e("=5"),
            SpecError::UnknownKey {
                line: 1,
                key: "".into()
            }
        );
        assert_eq!(
            e("cpus=1\ncpus=2"),
            SpecError::DuplicateKey {
                line: 2,
                key: "cpus".into()
            }
        );
        assert!(matches!(
            e("cmdline=a\ncmdline=b"),
            SpecError::DuplicateKey { line: 2, .. }
        ));
        for (text, key) in [
            ("mem=3M", "mem"),
            ("mem=0", "mem"),
            ("mem=1000", "mem"),
            ("mem=64G", "mem"),
            ("mem=lots", "mem"),
            ("mem=", "mem"),
            ("cpus=0", "cpus"),
            ("cpus=9", "cpus"),
            ("cpus=two", "cpus"),
            ("name=", "name"),
            ("name=a/b", "name"),
            ("name=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "name"),
        ] {
            match e(text) {
                SpecError::BadValue {
                    key: k, line: 1, ..
                } => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let long = format!("cmdline={}", "x".repeat(MAX_CMDLINE_LEN + 1));
        assert!(matches!(
            e(&long),
            SpecError::BadValue { key: "cmdline", .. }
        ));
        assert!(matches!(
            e("cmdline=a\0b"),
            SpecError::BadValue { key: "cmdline", .. }
        ));
        assert!(e("cpus=9").to_string().contains("1..=8"));
    }

    proptest! {
        #[test]
        fn dir_arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_fw_cfg_dir(&b);
        }

        #[test]
        fn dir_round_trips(files in proptest::collection::vec((any::<u32>(), any::<u16>(), "[a-z0-9/._-]{0,55}"), 0..20)) {
            let refs: Vec<(u32, u16, &str)> = files.iter().map(|(s, sel, n)| (*s, *sel, n.as_str())).collect();
            let d = parse_fw_cfg_dir(&dir_bytes(&refs)).unwrap();
            prop_assert_eq!(d.len(), files.len());
            for (got, (size, select, name)) in d.iter().zip(&files) {
                prop_assert_eq!(got.size, *size);
                prop_assert_eq!(got.select, *select);
                prop_assert_eq!(&got.name, name);
            }
        }

        #[test]
        fn config_arbitrary_text_never_panics(t in "\\PC{0,200}", u in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_config(&t);
            let _ = parse_config(&String::from_utf8_lossy(&u));
        }

        #[test]
        fn group_arbitrary_names_never_panic(names in proptest::collection::vec("(opt/vmfork/)?[0-9a-z/]{0,12}", 0..10)) {
            let _ = group(names.iter().map(|s| s.as_str()));
        }

        /// Model: a config rendered from known values with random separators parses back.
        #[test]
        fn config_round_trips(
            mem_units in 1u64..=16384, cpus in 1u32..=8,
            name in proptest::option::of(
                "[A-Za-z0-9._-]{1,32}".prop_filter("not like a VM id", |n| check_name(n).is_ok())
            ),
            cmdline in proptest::option::of("[!-~]([ -~]{0,60}[!-~])?"),
            seps in proptest::collection::vec(prop_oneof![Just(" "), Just("\n"), Just("\t"), Just("  \n# c\n")], 4),
            order in 0usize..6,
        ) {
            let mem = mem_units * GUEST_MEM_ALIGN;
            let mem_text = if mem.is_multiple_of(1 << 30) { format!("{}G", mem >> 30) } else { format!("{}M", mem >> 20) };
            let mut items = alloc::vec![format!("mem={mem_text}"), format!("cpus={cpus}")];
            if let Some(n) = &name { items.push(format!("name={n}")); }
            let rot = order % items.len();
            items.rotate_left(rot);
            let mut text = String::new();
            for (i, it) in items.iter().enumerate() {
                text.push_str(it);
                text.push_str(seps[i % seps.len()]);
            }
            if let Some(c) = &cmdline { text.push_str(&format!("\ncmdline={c}\n")); }
            let got = parse_config(&text).unwrap();
            prop_assert_eq!(got, GuestConfig { mem, cpus, cmdline: cmdline.unwrap_or_default(), name });
        }
    }
}
