//! The monitor's command line (`/chosen/bootargs`, QEMU's `-append`).
//!
//! Tokens are separated by whitespace; a double-quoted part may hold whitespace
//! (`key="a b"`), as in the Linux kernel's parser. A bare `--` ends the options: what follows is
//! not for the monitor. Nothing here allocates, so it can run before the heap exists.

use core::fmt;

/// Why a command-line value was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError {
    /// `log=` has a value other than off, error, warn, info, debug or trace.
    UnknownLogLevel,
    /// A size is empty or has no digits.
    EmptySize,
    /// A size has a character that is neither a digit nor a known suffix.
    BadSize,
    /// A size does not fit in 64 bits.
    SizeOverflow,
    /// A limit is 0 or does not fit in 32 bits.
    LimitRange,
    /// `heap_mib=` is not a number from [`HEAP_MIB_MIN`] to [`HEAP_MIB_MAX`].
    HeapRange,
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownLogLevel => "unknown log level (expected off|error|warn|info|debug|trace)",
            Self::EmptySize => "empty size",
            Self::BadSize => {
                "bad size (expected digits with an optional K, M, G, T, P or E suffix)"
            }
            Self::SizeOverflow => "size does not fit in 64 bits",
            Self::LimitRange => "limit must be 1 to 4294967295",
            Self::HeapRange => "heap_mib must be 16 to 65536",
        })
    }
}

/// The whitespace-separated tokens of `cmdline` up to a bare `--`, quotes kept.
pub fn tokens(cmdline: &str) -> impl Iterator<Item = &str> {
    let mut rest = cmdline;
    core::iter::from_fn(move || {
        rest = rest.trim_start();
        if rest.is_empty() {
            return None;
        }
        let mut in_quote = false;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                if c == '"' {
                    in_quote = !in_quote;
                }
                c.is_whitespace() && !in_quote
            })
            .map_or(rest.len(), |(i, _)| i);
        let (token, tail) = rest.split_at(end);
        rest = tail;
        Some(token)
    })
    .take_while(|&t| t != "--")
}

/// Splits a token into key and value (`None` for a bare key); a value wholly in double quotes
/// loses them.
fn split(token: &str) -> (&str, Option<&str>) {
    let token = match token.strip_prefix('"') {
        // `"key=value"`, the whole token quoted.
        Some(inner) if !inner.contains('"') || inner.ends_with('"') => {
            inner.strip_suffix('"').unwrap_or(inner)
        }
        _ => token,
    };
    match token.split_once('=') {
        None => (token, None),
        Some((key, value)) => {
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            (key, Some(value))
        }
    }
}

/// The value of the last `key=value` token, or `None` when there is none (a bare `key` has no
/// value). `key=` gives `Some("")`.
pub fn value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    tokens(cmdline)
        .map(split)
        .filter(|&(k, v)| k == key && v.is_some())
        .last()
        .and_then(|(_, v)| v)
}

/// Whether the boolean option `key` is on: a bare `key` turns it on, as does `key=1|y|yes|on|true`;
/// `key=0|n|no|off|false` turns it off; the last such token wins. Other values are ignored.
pub fn flag(cmdline: &str, key: &str) -> bool {
    const ON: [&str; 5] = ["1", "y", "yes", "on", "true"];
    const OFF: [&str; 5] = ["0", "n", "no", "off", "false"];
    let is = |words: &[&str], v: &str| words.iter().any(|w| w.eq_ignore_ascii_case(v));
    let mut on = false;
    for (k, v) in tokens(cmdline).map(split) {
        match v {
            _ if k != key => {}
            None => on = true,
            Some(v) if is(&ON, v) => on = true,
            Some(v) if is(&OFF, v) => on = false,
            Some(_) => {}
        }
    }
    on
}

/// The `log=` level: `off`, `error`, `warn`, `info`, `debug` or `trace` (any case). Absent means
/// `Info`; an unknown value is an error (the monitor reports it and uses `Info`).
pub fn log_level(cmdline: &str) -> Result<log::LevelFilter, CmdlineError> {
    let Some(v) = value(cmdline, "log") else {
        return Ok(log::LevelFilter::Info);
    };
    use log::LevelFilter::*;
    [Off, Error, Warn, Info, Debug, Trace]
        .into_iter()
        .find(|level| level.as_str().eq_ignore_ascii_case(v))
        .ok_or(CmdlineError::UnknownLogLevel)
}

/// Parses a size such as `4096`, `512K`, `64M`, `2G` or `0x8000`: decimal (or `0x` hexadecimal)
/// digits and an optional binary suffix K, M, G, T, P or E (any case). Overflow is an error.
pub fn parse_size(s: &str) -> Result<u64, CmdlineError> {
    let s = s.trim();
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let (number, suffix) = digits.split_at(end);
    if number.is_empty() {
        return Err(if s.is_empty() {
            CmdlineError::EmptySize
        } else {
            CmdlineError::BadSize
        });
    }
    let mut value: u64 = 0;
    for c in number.chars() {
        let d = c.to_digit(radix).ok_or(CmdlineError::BadSize)?;
        value = value
            .checked_mul(u64::from(radix))
            .and_then(|v| v.checked_add(u64::from(d)))
            .ok_or(CmdlineError::SizeOverflow)?;
    }
    let shift = match suffix {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(CmdlineError::BadSize),
    };
    if shift > 0 && value.leading_zeros() < shift {
        return Err(CmdlineError::SizeOverflow);
    }
    Ok(value << shift)
}

/// Limits on what the control channel and guests can make the monitor hold, from
/// `max_vms=`, `max_forks_per_tree=`, `max_uploads=`, `max_upload_bytes=` and `max_stopped=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// VMs alive at once, forks and internal snapshot forks included (`max_vms=`).
    pub max_vms: u32,
    /// Forks alive at once in one fork tree: the descendants of one VM that was created or
    /// restored, its children's children included (`max_forks_per_tree=`).
    pub max_forks_per_tree: u32,
    /// Uploads open at once on the control channel (`max_uploads=`).
    pub max_uploads: u32,
    /// Bytes all open uploads may announce together (`max_upload_bytes=`, a size); `None`: half
    /// the monitor's heap, decided at boot.
    pub max_upload_bytes: Option<u64>,
    /// Records of stopped VMs kept for `list` until removed (`max_stopped=`); beyond it the
    /// record of the lowest id goes.
    pub max_stopped: u32,
}

impl Limits {
    /// The limits when the command line sets none.
    pub const DEFAULT: Limits = Limits {
        max_vms: 4096,
        max_forks_per_tree: 1024,
        max_uploads: 8,
        max_upload_bytes: None,
        max_stopped: 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Parses a count limit: like [`parse_size`] (so `64K` works), 1 to `u32::MAX`.
pub fn parse_limit(s: &str) -> Result<u32, CmdlineError> {
    let v = parse_size(s)?;
    u32::try_from(v)
        .ok()
        .filter(|&v| v > 0)
        .ok_or(CmdlineError::LimitRange)
}

/// Smallest heap `heap_mib=` may ask for, in MiB (the fixed part of the default heap).
pub const HEAP_MIB_MIN: u64 = 16;
/// Largest heap `heap_mib=` may ask for, in MiB; the monitor also never takes more than half
/// of the RAM bank it runs in.
pub const HEAP_MIB_MAX: u64 = 64 << 10;

/// `heap_mib=N`: the monitor's heap in MiB, for many idle VMs (each holds about 4 KiB of
/// heap); the monitor never makes it smaller than its default (16 MiB + RAM/16). `Ok(None)` when not set; a value outside
/// [`HEAP_MIB_MIN`]..=[`HEAP_MIB_MAX`] (or not a number) is an error, and the default is kept.
pub fn heap_mib(cmdline: &str) -> Result<Option<u64>, CmdlineError> {
    let Some(v) = value(cmdline, "heap_mib") else {
        return Ok(None);
    };
    let n = parse_size(v).map_err(|_| CmdlineError::HeapRange)?;
    if (HEAP_MIB_MIN..=HEAP_MIB_MAX).contains(&n) {
        Ok(Some(n))
    } else {
        Err(CmdlineError::HeapRange)
    }
}

/// The limits `cmdline` sets, defaults for the rest. A bad value keeps its default and is
/// reported (the first one, with its key), so the monitor can say so and boot on.
pub fn limits(cmdline: &str) -> (Limits, Option<(&'static str, CmdlineError)>) {
    let mut l = Limits::DEFAULT;
    let mut first_error = None;
    let mut note = |key: &'static str, e: CmdlineError| {
        first_error.get_or_insert((key, e));
    };
    for (key, slot) in [
        ("max_vms", &mut l.max_vms),
        ("max_forks_per_tree", &mut l.max_forks_per_tree),
        ("max_uploads", &mut l.max_uploads),
        ("max_stopped", &mut l.max_stopped),
    ] {
        if let Some(v) = value(cmdline, key) {
            match parse_limit(v) {
                Ok(v) => *slot = v,
                Err(e) => note(key, e),
            }
        }
    }
    if let Some(v) = value(cmdline, "max_upload_bytes") {
        match parse_size(v) {
            Ok(0) => note("max_upload_bytes", CmdlineError::LimitRange),
            Ok(v) => l.max_upload_bytes = Some(v),
            Err(e) => note("max_upload_bytes", e),
        }
    }
    (l, first_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::String;
    use alloc::vec::Vec;
    use log::LevelFilter;
    use proptest::prelude::*;

    #[test]
    fn heap_mib_is_bounded() {
        assert_eq!(heap_mib("log=warn"), Ok(None));
        assert_eq!(heap_mib("heap_mib=1024 log=warn"), Ok(Some(1024)));
        assert_eq!(heap_mib("heap_mib=16"), Ok(Some(16)));
        assert_eq!(heap_mib("heap_mib=65536"), Ok(Some(65536)));
        for bad in [
            "heap_mib=15",
            "heap_mib=0",
            "heap_mib=65537",
            "heap_mib=",
            "heap_mib=x",
        ] {
            assert_eq!(heap_mib(bad), Err(CmdlineError::HeapRange), "{bad}");
        }
        assert_eq!(
            heap_mib("heap_mib=99999999999999999999999"),
            Err(CmdlineError::HeapRange)
        );
    }

    #[test]
    fn values() {
        let c = "console=ttyAMA0  log=debug\tmem=64M  quiet log=trace x=";
        assert_eq!(value(c, "console"), Some("ttyAMA0"));
        assert_eq!(value(c, "log"), Some("trace"), "last one wins");
        assert_eq!(value(c, "mem"), Some("64M"));
        assert_eq!(value(c, "quiet"), None, "bare key has no value");
        assert_eq!(value(c, "x"), Some(""));
        assert_eq!(value(c, "lo"), None);
        assert_eq!(value(c, "og"), None);
        assert_eq!(value("", "log"), None);
        assert_eq!(value("a=b=c", "a"), Some("b=c"));
        assert_eq!(value("a=1 -- a=2", "a"), Some("1"), "after -- is not ours");
        assert_eq!(value(r#"name="two words" x=1"#, "name"), Some("two words"));
        assert_eq!(
            value(r#""name=quoted whole" x=1"#, "name"),
            Some("quoted whole")
        );
        assert_eq!(value(r#"name="unterminated x=1"#, "x"), None);
    }

    #[test]
    fn tokens_split_on_whitespace_outside_quotes() {
        let t: Vec<&str> = tokens(" a  b=\"c d\"\n e ").collect();
        assert_eq!(t, ["a", "b=\"c d\"", "e"]);
    }

    #[test]
    fn flags() {
        assert!(flag("quiet", "quiet"));
        assert!(!flag("quieter", "quiet"));
        assert!(!flag("", "quiet"));
        assert!(flag("quiet=yes", "quiet"));
        assert!(flag("quiet=ON", "quiet"));
        assert!(!flag("quiet quiet=0", "quiet"));
        assert!(flag("quiet=off quiet", "quiet"));
        assert!(flag("quiet quiet=banana", "quiet"), "unknown value ignored");
        assert!(!flag("-- quiet", "quiet"));
    }

    #[test]
    fn log_levels() {
        assert_eq!(log_level(""), Ok(LevelFilter::Info));
        assert_eq!(log_level("console=x"), Ok(LevelFilter::Info));
        assert_eq!(log_level("log=off"), Ok(LevelFilter::Off));
        assert_eq!(log_level("log=error"), Ok(LevelFilter::Error));
        assert_eq!(log_level("log=warn"), Ok(LevelFilter::Warn));
        assert_eq!(log_level("log=info"), Ok(LevelFilter::Info));
        assert_eq!(log_level("log=debug"), Ok(LevelFilter::Debug));
        assert_eq!(log_level("log=TRACE"), Ok(LevelFilter::Trace));
        assert_eq!(log_level("log=debug log=warn"), Ok(LevelFilter::Warn));
        assert_eq!(log_level("log=verbose"), Err(CmdlineError::UnknownLogLevel));
        assert_eq!(log_level("log="), Err(CmdlineError::UnknownLogLevel));
        assert!(!CmdlineError::UnknownLogLevel.to_string().is_empty());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("0x1000"), Ok(0x1000));
        assert_eq!(parse_size("0x10M"), Ok(16 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("16E"), Err(CmdlineError::SizeOverflow));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_size("18446744073709551616"),
            Err(CmdlineError::SizeOverflow)
        );
        assert_eq!(parse_size("17179869184G"), Err(CmdlineError::SizeOverflow));
        assert_eq!(parse_size(""), Err(CmdlineError::EmptySize));
        assert_eq!(parse_size("M"), Err(CmdlineError::BadSize));
        assert_eq!(parse_size("0x"), Err(CmdlineError::BadSize));
        assert_eq!(parse_size("12MB"), Err(CmdlineError::BadSize));
        assert_eq!(parse_size("-1"), Err(CmdlineError::BadSize));
        assert_eq!(parse_size("1.5G"), Err(CmdlineError::BadSize));
    }

    fn key() -> impl Strategy<Value = String> {
        "[a-c]{1,2}"
    }

    proptest! {
        /// `value` agrees with a plain model: the last `key=value` token of the list.
        #[test]
        fn value_matches_model(
            entries in proptest::collection::vec((key(), proptest::option::of("[a-z0-9=]{0,4}")), 0..8),
            seps in proptest::collection::vec("[ \t\n]{1,3}", 8),
            probe in key(),
        ) {
            let mut line = String::new();
            for (i, (k, v)) in entries.iter().enumerate() {
                line.push_str(&seps[i]);
                line.push_str(k);
                if let Some(v) = v {
                    line.push('=');
                    line.push_str(v);
                }
            }
            let model = entries
                .iter()
                .rfind(|(k, v)| *k == probe && v.is_some())
                .and_then(|(_, v)| v.as_deref());
            prop_assert_eq!(value(&line, &probe), model);
            let model_flag = entries.iter().filter(|(k, _)| *k == probe).fold(false, |on, (_, v)| {
                match v.as_deref() {
                    None | Some("1" | "y" | "yes" | "on" | "true") => true,
                    Some("0" | "n" | "no" | "off" | "false") => false,
                    _ => on,
                }
            });
            prop_assert_eq!(flag(&line, &probe), model_flag);
        }

        /// Sizes agree with 128-bit arithmetic, including where they overflow.
        #[test]
        fn size_matches_u128_model(n in any::<u64>(), suffix in 0usize..7, lower in any::<bool>(), hex in any::<bool>()) {
            let letters = ["", "K", "M", "G", "T", "P", "E"];
            let hex = hex && suffix != 6; // `E` would be a hex digit
            let mut text = if hex { format!("0x{n:x}") } else { format!("{n}") };
            text.push_str(&if lower { letters[suffix].to_lowercase() } else { letters[suffix].into() });
            let model = u64::try_from(u128::from(n) << (10 * suffix)).ok();
            prop_assert_eq!(parse_size(&text).ok(), model);
            if model.is_none() {
                prop_assert_eq!(parse_size(&text), Err(CmdlineError::SizeOverflow));
            }
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,40}", k in "\\PC{0,4}") {
            let _ = value(&s, &k);
            let _ = flag(&s, &k);
            let _ = log_level(&s);
            let _ = parse_size(&s);
        }
    }

    #[test]
    fn limits_default_and_set() {
        assert_eq!(limits(""), (Limits::DEFAULT, None));
        let (l, e) = limits("log=info max_vms=100 max_forks_per_tree=64K max_uploads=2");
        assert_eq!(e, None);
        assert_eq!(l.max_vms, 100);
        assert_eq!(l.max_forks_per_tree, 65536);
        assert_eq!(l.max_uploads, 2);
        assert_eq!(l.max_upload_bytes, None);
        let (l, e) = limits("max_upload_bytes=16M max_vms=1");
        assert_eq!(e, None);
        assert_eq!(l.max_upload_bytes, Some(16 << 20));
        assert_eq!(l.max_vms, 1);
        assert_eq!(limits("max_vms=1 -- max_vms=2").0.max_vms, 1);
    }

    #[test]
    fn bad_limits_keep_their_default_and_are_reported() {
        let (l, e) = limits("max_vms=0 max_forks_per_tree=x max_uploads=4G");
        assert_eq!(l, Limits::DEFAULT);
        assert_eq!(e, Some(("max_vms", CmdlineError::LimitRange)));
        let (l, e) = limits("max_vms=10 max_forks_per_tree=x");
        assert_eq!(l.max_vms, 10);
        assert_eq!(e, Some(("max_forks_per_tree", CmdlineError::BadSize)));
        assert_eq!(
            limits("max_uploads=4294967296").1,
            Some(("max_uploads", CmdlineError::LimitRange))
        );
        assert_eq!(
            limits("max_upload_bytes=0").1,
            Some(("max_upload_bytes", CmdlineError::LimitRange))
        );
        assert_eq!(parse_limit("4294967295"), Ok(u32::MAX));
    }

    proptest! {
        #[test]
        fn limits_never_panic_and_stay_in_range(s in "\\PC{0,80}") {
            let (l, _) = limits(&s);
            prop_assert!(l.max_vms >= 1 && l.max_forks_per_tree >= 1 && l.max_uploads >= 1);
            prop_assert!(l.max_upload_bytes != Some(0));
        }
    }
}
