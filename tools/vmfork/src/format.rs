//! Human-readable output: tables, sizes, a progress bar.

use std::fmt::Write as _;
use std::io::Write;

use serde::Serialize;
use vmfork_proto::{DiffReport, GlobalStats, VmInfo};

/// Bytes per guest page.
const PAGE: u64 = 4096;

/// Formats a byte count with a binary unit: `512 B`, `64 KiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses a size: a number of bytes with an optional K, M, G or T suffix (powers of 1024,
/// case-insensitive, optional trailing `iB`/`B`): `128M`, `1G`, `65536`, `2GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size `{s}` (use e.g. 128M, 1G or a number of bytes)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// The `vmfork list` table.
pub fn vm_table(vms: &[VmInfo]) -> String {
    let header = [
        "ID",
        "PARENT",
        "NAME",
        "STATE",
        "VCPUS",
        "MEMORY",
        "PRIVATE",
        "SHARED",
        "COW-FAULTS",
        "UPTIME",
        "VCPU-TIME",
    ];
    let rows: Vec<[String; 11]> = vms
        .iter()
        .map(|v| {
            [
                v.id.to_string(),
                v.parent.map_or_else(|| "-".into(), |p| p.to_string()),
                v.name.clone(),
                v.state.to_string(),
                v.vcpus.to_string(),
                bytes(v.mem_bytes),
                v.private_pages.to_string(),
                v.shared_pages.to_string(),
                v.cow_faults.to_string(),
                duration_us(v.uptime_us),
                duration_us(v.vcpu_us),
            ]
        })
        .collect();
    // Text columns left-aligned, numbers right-aligned.
    let right = [
        true, true, false, false, true, true, true, true, true, true, true,
    ];
    table(&header, &rows, &right)
}

/// A table: `header` and `rows` in columns two spaces apart, each as wide as its widest cell,
/// right-aligned where `right` says so; no trailing blanks.
pub fn table<const N: usize>(
    header: &[&str; N],
    rows: &[[String; N]],
    right: &[bool; N],
) -> String {
    let mut width = header.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let pad = " ".repeat(width[i].saturating_sub(c.chars().count()));
            if right[i] {
                l.push_str(&pad);
                l.push_str(c);
            } else {
                l.push_str(c);
                l.push_str(&pad);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(*header);
    for r in rows {
        line(r.each_ref().map(String::as_str));
    }
    out
}

/// `vmfork info` output: one `key: value` line per field.
pub fn vm_details(v: &VmInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "id:              {}", v.id);
    let _ = writeln!(
        s,
        "parent:          {}",
        v.parent.map_or_else(|| "-".into(), |p| p.to_string())
    );
    let _ = writeln!(s, "name:            {}", v.name);
    let _ = writeln!(s, "state:           {}", v.state);
    let _ = writeln!(s, "vcpus:           {}", v.vcpus);
    let _ = writeln!(
        s,
        "memory:          {} ({} bytes)",
        bytes(v.mem_bytes),
        v.mem_bytes
    );
    let _ = writeln!(s, "private pages:   {}", v.private_pages);
    let _ = writeln!(s, "shared pages:    {}", v.shared_pages);
    let _ = writeln!(s, "cow faults:      {}", v.cow_faults);
    let _ = writeln!(s, "forks:           {}", v.forks);
    let _ = writeln!(s, "last fork ticks: {}", v.last_fork_ticks);
    let _ = writeln!(s, "uptime:          {}", duration_us(v.uptime_us));
    let _ = writeln!(s, "vcpu time:       {}", duration_us(v.vcpu_us));
    s
}

/// A duration in microseconds, as `list` shows it: `0.25s`, `42s`, `3m07s`, `2h05m`, `3d04h`.
pub fn duration_us(us: u64) -> String {
    let s = us / 1_000_000;
    match s {
        0..=9 => format!("{}.{:02}s", s, (us / 10_000) % 100),
        10..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
        _ => format!("{}d{:02}h", s / 86_400, (s / 3600) % 24),
    }
}

/// `vmfork stats` global part.
pub fn global_stats(g: &GlobalStats) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "vms:             {}", g.vms);
    let _ = writeln!(
        s,
        "frames:          {} used, {} free, {} total ({} used of {})",
        g.used_frames,
        g.free_frames,
        g.total_frames,
        bytes(g.used_frames.saturating_mul(4096)),
        bytes(g.total_frames.saturating_mul(4096))
    );
    let _ = writeln!(
        s,
        "heap:            {} used, {} free ({} of it the reserve)",
        bytes(g.heap_used),
        bytes(g.heap_free),
        bytes(g.heap_reserve)
    );
    let _ = writeln!(
        s,
        "limits:          max_vms={} max_forks_per_tree={}",
        g.max_vms, g.max_forks_per_tree
    );
    let _ = writeln!(s, "counter:         {} Hz", g.counter_hz);
    s
}

/// `vmfork diff` output.
pub fn diff(d: &DiffReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} of {} pages differ ({})",
        d.differing_pages,
        d.pages_compared,
        bytes(d.differing_pages.saturating_mul(4096))
    );
    for r in &d.ranges {
        let start = d.ram_base.saturating_add(r.first_page.saturating_mul(4096));
        let end = start
            .saturating_add(r.pages.saturating_mul(4096))
            .saturating_sub(1);
        let _ = writeln!(
            s,
            "  {start:#x}-{end:#x}  {} page{}",
            r.pages,
            if r.pages == 1 { "" } else { "s" }
        );
    }
    if d.truncated {
        let _ = writeln!(s, "  ... (more ranges not shown)");
    }
    s
}

/// One range of `vmfork diff --json`: a run of differing pages, by index and by address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiffRangeJson {
    /// Index of the first page from the start of guest RAM.
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
    /// Guest-physical address of the first page.
    pub ipa: u64,
    /// Guest-physical address just past the last page.
    pub ipa_end: u64,
}

/// `vmfork diff --json`: the monitor's report with the ranges' guest-physical addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiffJson {
    /// IPA of guest RAM's first page.
    pub ram_base: u64,
    /// Bytes per page.
    pub page_size: u64,
    /// Pages compared.
    pub pages_compared: u64,
    /// Pages whose contents differ.
    pub differing_pages: u64,
    /// The differing pages, ascending.
    pub ranges: Vec<DiffRangeJson>,
    /// True when the monitor had more ranges than it sent.
    pub truncated: bool,
}

/// The JSON form of a diff report.
pub fn diff_json(d: &DiffReport) -> DiffJson {
    let ipa = |page: u64| d.ram_base.saturating_add(page.saturating_mul(PAGE));
    DiffJson {
        ram_base: d.ram_base,
        page_size: PAGE,
        pages_compared: d.pages_compared,
        differing_pages: d.differing_pages,
        ranges: d
            .ranges
            .iter()
            .map(|r| DiffRangeJson {
                first_page: r.first_page,
                pages: r.pages,
                ipa: ipa(r.first_page),
                ipa_end: ipa(r.first_page.saturating_add(r.pages)),
            })
            .collect(),
        truncated: d.truncated,
    }
}

/// A one-line progress bar on stderr, redrawn in place.
#[derive(Debug)]
pub struct Progress {
    label: String,
    last_percent: Option<u64>,
}

impl Progress {
    /// A bar with a label (e.g. `dump vm 3`).
    pub fn new(label: &str) -> Self {
        Progress {
            label: label.to_string(),
            last_percent: None,
        }
    }

    /// Redraws for `done` of `total` bytes (only when the percentage changes).
    pub fn update(&mut self, done: u64, total: u64) {
        let percent = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        if self.last_percent == Some(percent) {
            return;
        }
        self.last_percent = Some(percent);
        let filled = (percent / 4) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {:>3}% {} / {}",
            self.label,
            "#".repeat(filled),
            "-".repeat(25 - filled.min(25)),
            percent,
            bytes(done),
            bytes(total)
        );
        let _ = err.flush();
    }

    /// Ends the line.
    pub fn finish(&mut self) {
        if self.last_percent.is_some() {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KB"), Ok(64 << 10));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(128 << 20), "128 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_us(0), "0.00s");
        assert_eq!(duration_us(250_000), "0.25s");
        assert_eq!(duration_us(9_999_999), "9.99s");
        assert_eq!(duration_us(42_000_000), "42s");
        assert_eq!(duration_us(187_000_000), "3m07s");
        assert_eq!(duration_us(7_500_000_000), "2h05m");
        assert_eq!(duration_us(273_600_000_000), "3d04h");
        assert_eq!(duration_us(u64::MAX), "213503982d08h");
    }
}
