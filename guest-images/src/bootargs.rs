//! The kernel command line from `/chosen/bootargs`: whitespace-separated `key=value` words and
//! bare flags, copied out of the DTB so that it outlives the DTB's memory.

use core::fmt;

/// Longest command line kept (bytes).
pub const BOOTARGS_MAX: usize = 256;

/// Why `/chosen/bootargs` could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootArgsError {
    /// Longer than [`BOOTARGS_MAX`] bytes.
    TooLong(usize),
    /// Not UTF-8.
    NotUtf8,
}

impl fmt::Display for BootArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong(n) => write!(f, "{n} bytes, more than {BOOTARGS_MAX}"),
            Self::NotUtf8 => write!(f, "not UTF-8"),
        }
    }
}

/// A `key=value` word whose value is not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadNumber<'a> {
    /// The key looked up.
    pub key: &'a str,
    /// The value found for it.
    pub value: &'a str,
}

impl fmt::Display for BadNumber<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bootarg {}={:?} is not a number", self.key, self.value)
    }
}

/// An owned copy of the command line.
#[derive(Clone)]
pub struct BootArgs {
    buf: [u8; BOOTARGS_MAX],
    len: usize,
}

impl fmt::Debug for BootArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl BootArgs {
    /// An empty command line.
    pub const fn empty() -> Self {
        Self {
            buf: [0; BOOTARGS_MAX],
            len: 0,
        }
    }

    /// Copies a `bootargs` property value (a NUL-terminated string; the NUL is optional).
    pub fn from_property(value: &[u8]) -> Result<Self, BootArgsError> {
        let text = value.split(|&b| b == 0).next().unwrap_or(&[]);
        if text.len() > BOOTARGS_MAX {
            return Err(BootArgsError::TooLong(text.len()));
        }
        core::str::from_utf8(text).map_err(|_| BootArgsError::NotUtf8)?;
        let mut buf = [0; BOOTARGS_MAX];
        buf[..text.len()].copy_from_slice(text);
        Ok(Self {
            buf,
            len: text.len(),
        })
    }

    /// The command line as text.
    pub fn as_str(&self) -> &str {
        // from_property() checked UTF-8; an invalid prefix cannot occur, but stay panic-free.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// The value of the last `key=value` word (`Some("")` for a bare `key`), if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.as_str()
            .split_ascii_whitespace()
            .rev()
            .find_map(|word| match word.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if word == key => Some(""),
                _ => None,
            })
    }

    /// Whether `key` appears, bare or as `key=...`.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The value of `key` as an unsigned number (decimal or `0x` hexadecimal).
    pub fn get_u64<'a>(&'a self, key: &'a str) -> Result<Option<u64>, BadNumber<'a>> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => parse_u64(value).map(Some).ok_or(BadNumber { key, value }),
        }
    }
}

/// Parses a decimal or `0x`-prefixed hexadecimal number.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn args(s: &str) -> BootArgs {
        BootArgs::from_property(s.as_bytes()).unwrap()
    }

    #[test]
    fn finds_keys_and_flags() {
        let a = args("ticks=5  verbose mib=0x10\tx=");
        assert_eq!(a.get("ticks"), Some("5"));
        assert_eq!(a.get("verbose"), Some(""));
        assert_eq!(a.get("x"), Some(""));
        assert_eq!(a.get("tick"), None);
        assert_eq!(a.get_u64("mib"), Ok(Some(16)));
        assert_eq!(a.get_u64("ticks"), Ok(Some(5)));
        assert_eq!(a.get_u64("absent"), Ok(None));
        assert!(a.has("verbose"));
    }

    #[test]
    fn last_occurrence_wins() {
        assert_eq!(args("mib=1 mib=2").get_u64("mib"), Ok(Some(2)));
    }

    #[test]
    fn bad_numbers_are_errors() {
        let a = args("mib=12k ticks=-1 n=0x");
        assert!(a.get_u64("mib").is_err());
        assert!(a.get_u64("ticks").is_err());
        assert!(a.get_u64("n").is_err());
        let e = a.get_u64("mib").unwrap_err();
        assert_eq!(e.to_string(), "bootarg mib=\"12k\" is not a number");
    }

    #[test]
    fn property_nul_and_limits() {
        assert_eq!(BootArgs::from_property(b"a=1\0").unwrap().as_str(), "a=1");
        assert_eq!(BootArgs::from_property(b"").unwrap().as_str(), "");
        let long = [b'a'; BOOTARGS_MAX + 1];
        assert_eq!(
            BootArgs::from_property(&long).unwrap_err(),
            BootArgsError::TooLong(257)
        );
        assert_eq!(
            BootArgs::from_property(&[0xff, 0xfe]).unwrap_err(),
            BootArgsError::NotUtf8
        );
    }

    proptest! {
        /// Matches a simple model: the last word equal to `key` or starting with `key=`.
        #[test]
        fn get_matches_model(words in proptest::collection::vec("[a-c]{1,2}(=[0-9a-c]{0,3})?", 0..8)) {
            let line = words.join(" ");
            let a = args(&line);
            for key in ["a", "b", "ab", "c"] {
                let model = words.iter().rev().find_map(|w| {
                    if w == key { Some(String::new()) }
                    else { w.strip_prefix(&format!("{key}=")).map(String::from) }
                });
                prop_assert_eq!(a.get(key).map(String::from), model);
            }
        }

        /// Decimal and hex renderings round-trip.
        #[test]
        fn numbers_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_u64(&n.to_string()), Some(n));
            prop_assert_eq!(parse_u64(&format!("{n:#x}")), Some(n));
        }
    }
}
