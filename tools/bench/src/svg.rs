//! The plot: fork latency and eager-clone latency against guest memory, log-log, as plain SVG.

use std::fmt::Write;

use serde_json::Value;

const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// One series: label, colour, (memory MiB, microseconds) points, and where its values are
/// written (above or below the points; 0: not written).
struct Series {
    label_dy: f64,
    label: &'static str,
    colour: &'static str,
    dash: &'static str,
    points: Vec<(f64, f64)>,
}

fn points(lines: &[Value], kind: &str, vcpus: Option<u64>) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = lines
        .iter()
        .filter(|v| v["bench"] == kind)
        .filter(|v| vcpus.is_none_or(|c| v["vcpus"].as_u64() == Some(c)))
        .filter_map(|v| Some((v["mem_mib"].as_f64()?, v["median_ns"].as_f64()? / 1000.0)))
        .filter(|&(m, u)| m > 0.0 && u > 0.0)
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    p
}

/// The SVG document for the `fork` and `eager` lines of one run.
pub fn fork_plot(lines: &[Value]) -> String {
    let series = [
        Series {
            label_dy: 18.0,
            label: "lazy fork, 1 vCPU",
            colour: "#1f77b4",
            dash: "",
            points: points(lines, "fork", Some(1)),
        },
        Series {
            label_dy: 0.0,
            label: "lazy fork, 2 vCPUs",
            colour: "#2ca02c",
            dash: "6,4",
            points: points(lines, "fork", Some(2)),
        },
        Series {
            label_dy: -10.0,
            label: "eager clone",
            colour: "#d62728",
            dash: "",
            points: points(lines, "eager", None),
        },
    ];
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.clone()).collect();
    // Axes: memory in powers of two, time in decades, both covering every point.
    let (mut xlo, mut xhi) = (16.0f64, 1024.0f64);
    let (mut ylo, mut yhi) = (10.0f64, 1000.0f64);
    for &(x, y) in &all {
        xlo = xlo.min(x);
        xhi = xhi.max(x);
        ylo = ylo.min(y);
        yhi = yhi.max(y);
    }
    // Half a step of room left and right so that the end points and their labels stay inside.
    let (x0, x1) = (xlo.log2().floor() - 0.5, xhi.log2().ceil() + 0.5);
    let (y0, y1) = (ylo.log10().floor(), yhi.log10().ceil());
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x.log2() - x0) / (x1 - x0).max(1.0) * pw;
    let sy = |y: f64| TOP + ph - (y.log10() - y0) / (y1 - y0).max(1.0) * ph;

    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(w, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        w,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">Fork latency against guest memory (emulated, QEMU -icount shift=0)</text>"#,
        LEFT + pw / 2.0
    );
    // Grid and tick labels.
    for e in (y0 as i32)..=(y1 as i32) {
        let y = sy(10f64.powi(e));
        let _ = writeln!(
            w,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            LEFT + pw
        );
        let label = match e {
            e if e < 3 => format!("{} us", 10f64.powi(e)),
            e if e < 6 => format!("{} ms", 10f64.powi(e - 3)),
            e => format!("{} s", 10f64.powi(e - 6)),
        };
        let _ = writeln!(
            w,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for e in (x0.ceil() as i32)..=(x1.floor() as i32) {
        let mib = 2f64.powi(e);
        let x = sx(mib);
        let _ = writeln!(
            w,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/>"##,
            TOP + ph
        );
        let label = if mib >= 1024.0 {
            format!("{} GiB", mib / 1024.0)
        } else {
            format!("{mib} MiB")
        };
        let _ = writeln!(
            w,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + ph + 18.0
        );
    }
    let _ = writeln!(
        w,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        w,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">guest memory (log scale)</text>"#,
        LEFT + pw / 2.0,
        H - 16.0
    );
    let _ = writeln!(
        w,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">latency, median (log scale)</text>"#,
        TOP + ph / 2.0
    );
    // Series and legend.
    for (i, se) in series.iter().enumerate() {
        if se.points.is_empty() {
            continue;
        }
        let path: Vec<String> = se
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            w,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2" stroke-dasharray="{}"/>"#,
            path.join(" "),
            se.colour,
            se.dash
        );
        for &(x, y) in &se.points {
            let _ = writeln!(
                w,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"><title>{}: {x} MiB, {y:.2} us</title></circle>"#,
                sx(x),
                sy(y),
                se.colour,
                se.label
            );
        }
        if se.label_dy != 0.0 {
            for &(x, y) in &se.points {
                let v = if y >= 1000.0 {
                    format!("{:.1} ms", y / 1000.0)
                } else {
                    format!("{y:.1} us")
                };
                let _ = writeln!(
                    w,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11" fill="{}">{v}</text>"#,
                    sx(x),
                    sy(y) + se.label_dy,
                    se.colour
                );
            }
        }
        let ly = TOP + 14.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            w,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2" stroke-dasharray="{}"/>"#,
            lx + 24.0,
            se.colour,
            se.dash
        );
        let _ = writeln!(
            w,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 30.0,
            ly + 4.0,
            se.label
        );
    }
    let _ = writeln!(
        w,
        r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#555">1 emulated instruction = 1 ns</text>"##,
        LEFT + pw + 12.0,
        TOP + 14.0 + 3.0 * 20.0
    );
    let _ = writeln!(w, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plot_has_one_line_per_series_and_every_point() {
        let mut lines = Vec::new();
        for (i, mem) in [16u64, 64, 256, 1024].into_iter().enumerate() {
            lines.push(json!({"bench":"fork","mem_mib":mem,"vcpus":1,"median_ns":30000}));
            lines.push(json!({"bench":"fork","mem_mib":mem,"vcpus":2,"median_ns":33000}));
            lines.push(json!({"bench":"eager","mem_mib":mem,"median_ns":10_000_000u64 << (2 * i)}));
        }
        let s = fork_plot(&lines);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 3);
        assert_eq!(s.matches("<circle").count(), 12);
        assert!(s.contains("160.0 ms") && s.contains("30.0 us"));
        // Log scale: every point lies inside the plot area.
        for c in s.split("<circle").skip(1) {
            let cy: f64 = c
                .split("cy=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!((TOP..=H - BOTTOM).contains(&cy), "{cy}");
        }
    }

    #[test]
    fn plot_without_data_is_still_a_document() {
        let s = fork_plot(&[]);
        assert!(s.contains("</svg>") && !s.contains("<polyline"));
    }
}
