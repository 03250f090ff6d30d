//! The table, the targets of issue 6, and run-to-run agreement, from the monitor's lines.

use std::fmt::Write;

use serde_json::{json, Value};

/// Lines of `kind` (`"fork"`, `"cow"`, ...).
fn of<'a>(lines: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    lines.iter().filter(move |v| v["bench"] == kind)
}

/// The first line of `kind` whose fields match every `(key, value)` of `with`.
fn find<'a>(lines: &'a [Value], kind: &'a str, with: &[(&str, Value)]) -> Option<&'a Value> {
    of(lines, kind).find(|v| with.iter().all(|(k, x)| &v[*k] == x))
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v[key].as_f64()
}

fn us(ns: Option<f64>) -> String {
    ns.map_or_else(|| String::from("-"), |n| format!("{:.2}", n / 1000.0))
}

/// One line of progress for a monitor line.
pub fn progress(v: &Value) -> String {
    let m = |k: &str| us(num(v, k));
    match v["bench"].as_str().unwrap_or("?") {
        "fork" => format!(
            "fork {} MiB {} vCPU: {} us",
            v["mem_mib"],
            v["vcpus"],
            m("median_ns")
        ),
        "eager" => format!("eager clone {} MiB: {} us", v["mem_mib"], m("median_ns")),
        "cow" => format!(
            "{}: {} us",
            v["what"].as_str().unwrap_or("?"),
            m("median_ns")
        ),
        "reset" => format!("reset, {} dirty: {} us", v["dirty"], m("median_ns")),
        "phase" => format!(
            "phase {} done ({:.2} s emulated)",
            v["phase"].as_str().unwrap_or("?"),
            num(v, "emulated_ns").unwrap_or(0.0) / 1e9
        ),
        "error" => format!("ERROR in {}: {}", v["phase"], v["msg"]),
        "fork_parts" => format!(
            "fork parts {} MiB: Stage2::fork {} us, genid write {} us",
            v["mem_mib"],
            m("stage2_fork_ns"),
            m("genid_write_ns")
        ),
        "density" => format!("density: {} bytes per idle child", v["bytes_per_child"]),
        "fuzz" => format!(
            "fuzz, {} pages per run: {} cycles/s",
            v["dirty"], v["cycles_per_sec"]
        ),
        "idle" => format!(
            "idle: {} idle forks: {} cycles/s, pick {} us",
            v["idle_forks"],
            v["cycles_per_sec"],
            m("pick_none_ns")
        ),
        "scale" => format!(
            "scale: {} children, stopped by {}",
            v["children"], v["stopped_by"]
        ),
        "smp" => format!(
            "smp round {}: {} VM(s) on {} CPU(s): {} exits/s, {} of {} waited for a lock",
            v["round"],
            v["vms"],
            v["vms"],
            v["exits_per_sec"],
            v["exits_waited"],
            v["exits_handled"]
        ),
        other => other.to_string(),
    }
}

/// A target from issue 6 and whether this run meets it.
pub struct Target {
    /// What is measured.
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// The bound.
    pub limit: f64,
    /// Unit of value and limit.
    pub unit: &'static str,
    /// True: value <= limit is the goal; false: value >= limit.
    pub at_most: bool,
}

impl Target {
    /// Whether the value is on the right side of the limit.
    pub fn met(&self) -> bool {
        if self.at_most {
            self.value <= self.limit
        } else {
            self.value >= self.limit
        }
    }

    /// The target as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name, "value": self.value, "limit": self.limit, "unit": self.unit,
            "at_most": self.at_most, "met": self.met(),
        })
    }

    fn line(&self) -> String {
        let (op, miss) = if self.at_most {
            ("<=", self.value - self.limit)
        } else {
            (">=", self.limit - self.value)
        };
        let verdict = if self.met() {
            String::from("met")
        } else {
            format!("MISSED by {miss:.2} {} ({:.1}x)", self.unit, {
                let r = self.value / self.limit;
                if self.at_most {
                    r
                } else {
                    1.0 / r
                }
            })
        };
        format!(
            "  {:<48} {:>12.2} {op} {:<10} {verdict}",
            self.name,
            self.value,
            format!("{} {}", self.limit, self.unit)
        )
    }
}

fn median(lines: &[Value], kind: &str, with: &[(&str, Value)]) -> Option<f64> {
    find(lines, kind, with).and_then(|v| num(v, "median_ns"))
}

/// The `smp` phase per round: (round, exits/s of 1 VM, exits/s of N VMs, N), rounds with both.
fn smp_rounds(lines: &[Value]) -> Vec<(u64, f64, f64, u64)> {
    let mut out = Vec::new();
    for one in of(lines, "smp").filter(|v| v["vms"] == 1) {
        let round = one["round"].clone();
        let Some(n) = one["workers"].as_u64() else {
            continue;
        };
        let many = find(lines, "smp", &[("round", round.clone()), ("vms", json!(n))]);
        if let (Some(a), Some(b)) = (
            num(one, "exits_per_sec"),
            many.and_then(|m| num(m, "exits_per_sec")),
        ) {
            out.push((round.as_u64().unwrap_or(0), a, b, n));
        }
    }
    out
}

/// The median of the rounds' ratios (N VMs on N CPUs / 1 VM on 1 CPU) and N.
fn smp_ratio(lines: &[Value]) -> Option<(f64, u64)> {
    let rounds = smp_rounds(lines);
    let n = rounds.first()?.3;
    let mut r: Vec<f64> = rounds
        .iter()
        .filter(|x| x.1 > 0.0)
        .map(|x| x.2 / x.1)
        .collect();
    r.sort_by(f64::total_cmp);
    r.get(r.len() / 2).map(|&m| (m, n))
}

/// The targets of issue 6 that this run has figures for.
pub fn targets(lines: &[Value]) -> Vec<Target> {
    let mut t = Vec::new();
    let fork = |mem: u64, cpus: u64| {
        median(
            lines,
            "fork",
            &[("mem_mib", json!(mem)), ("vcpus", json!(cpus))],
        )
    };
    for cpus in [1, 2] {
        if let (Some(big), Some(small)) = (fork(1024, cpus), fork(16, cpus)) {
            t.push(Target {
                name: format!("fork(1 GiB) / fork(16 MiB), {cpus} vCPU"),
                value: big / small,
                limit: 1.2,
                unit: "x",
                at_most: true,
            });
        }
    }
    if let (Some(e), Some(f)) = (
        median(lines, "eager", &[("mem_mib", json!(256))]),
        fork(256, 1),
    ) {
        t.push(Target {
            name: String::from("eager clone / fork at 256 MiB"),
            value: e / f,
            limit: 1000.0,
            unit: "x",
            at_most: false,
        });
    }
    if let Some(f) = fork(256, 1) {
        t.push(Target {
            name: String::from("fork of 256 MiB, 1 vCPU"),
            value: f / 1000.0,
            limit: 20.0,
            unit: "us",
            at_most: true,
        });
    }
    if let (Some(c), Some(copy)) = (
        median(lines, "cow", &[("what", json!("cow_fault"))]),
        median(lines, "cow", &[("what", json!("copy_frame"))]),
    ) {
        t.push(Target {
            name: String::from("COW fault - 4 KiB copy"),
            value: (c - copy) / 1000.0,
            limit: 2.0,
            unit: "us",
            at_most: true,
        });
    }
    for v in of(lines, "reset") {
        let dirty = v["dirty"].as_u64().unwrap_or(0);
        if dirty == 0 {
            continue;
        }
        if let Some(m) = num(v, "median_ns") {
            t.push(Target {
                name: format!("reset after {dirty} dirty pages"),
                value: m / 1000.0,
                limit: 5.0 + dirty as f64,
                unit: "us",
                at_most: true,
            });
        }
    }
    if let Some(d) = of(lines, "density")
        .next()
        .and_then(|v| num(v, "bytes_per_child"))
    {
        t.push(Target {
            name: String::from("memory per idle child"),
            value: d / 1024.0,
            limit: 16.0,
            unit: "KiB",
            at_most: true,
        });
    }
    let idle = |n: u64| {
        find(lines, "idle", &[("idle_forks", json!(n))]).and_then(|v| num(v, "cycles_per_sec"))
    };
    if let Some(base) = idle(0).filter(|&b| b > 0.0) {
        for n in [1000, 10_000, 100_000] {
            if let Some(c) = idle(n) {
                t.push(Target {
                    name: format!("fuzz cycles/s with {n} idle forks / with none"),
                    value: c / base,
                    limit: 0.9,
                    unit: "x",
                    at_most: false,
                });
            }
        }
    }
    if let Some((ratio, n)) = smp_ratio(lines) {
        // Issue 15: 4 VMs on 4 CPUs >= 3.5 x 1 VM on 1 CPU; the same share with other counts.
        t.push(Target {
            name: format!("exits/s, {n} VMs on {n} CPUs / 1 VM on 1 CPU"),
            value: ratio,
            limit: 0.875 * n as f64,
            unit: "x",
            at_most: false,
        });
    }
    t
}

/// How closely later runs repeat the first: the largest relative difference of any `*_ns`
/// figure, and how many figures are identical.
pub fn agreement(runs: &[Vec<Value>]) -> Value {
    if runs.len() < 2 {
        return json!({ "runs": runs.len() });
    }
    let mut compared = 0u64;
    let mut identical = 0u64;
    let mut worst = (0.0f64, String::new());
    let mut mismatched = 0u64;
    for other in &runs[1..] {
        if other.len() != runs[0].len() {
            mismatched += 1;
        }
        for (a, b) in runs[0].iter().zip(other) {
            let (Some(ao), Some(bo)) = (a.as_object(), b.as_object()) else {
                continue;
            };
            for (k, av) in ao {
                if !k.ends_with("_ns") {
                    continue;
                }
                let (Some(x), Some(y)) = (av.as_f64(), bo.get(k).and_then(Value::as_f64)) else {
                    continue;
                };
                compared += 1;
                if x == y {
                    identical += 1;
                }
                let rel = if x.max(y) > 0.0 {
                    (x - y).abs() / x.max(y)
                } else {
                    0.0
                };
                if rel > worst.0 {
                    worst = (rel, format!("{} {}", progress(a), k));
                }
            }
        }
    }
    json!({
        "runs": runs.len(),
        "figures_compared": compared,
        "figures_identical": identical,
        "max_relative_difference": worst.0,
        "worst_figure": worst.1,
        "runs_with_different_line_counts": mismatched,
    })
}

fn fork_table(w: &mut String, lines: &[Value]) {
    let _ = writeln!(w, "\n1. Fork latency (us)");
    let _ = writeln!(
        w,
        "  {:>9} {:>12} {:>12} {:>14} {:>10} {:>14} {:>12}",
        "guest MiB",
        "fork 1 vCPU",
        "fork 2 vCPU",
        "eager clone",
        "eager/fork",
        "Stage2::fork",
        "genid write"
    );
    for mem in [16u64, 64, 256, 1024] {
        let f1 = median(
            lines,
            "fork",
            &[("mem_mib", json!(mem)), ("vcpus", json!(1))],
        );
        let f2 = median(
            lines,
            "fork",
            &[("mem_mib", json!(mem)), ("vcpus", json!(2))],
        );
        let e = median(lines, "eager", &[("mem_mib", json!(mem))]);
        let parts = find(lines, "fork_parts", &[("mem_mib", json!(mem))]);
        if f1.is_none() && e.is_none() {
            continue;
        }
        let ratio = match (e, f1) {
            (Some(e), Some(f)) => format!("{:.0}", e / f),
            _ => String::from("-"),
        };
        let _ = writeln!(
            w,
            "  {mem:>9} {:>12} {:>12} {:>14} {ratio:>10} {:>14} {:>12}",
            us(f1),
            us(f2),
            us(e),
            us(parts.and_then(|p| num(p, "stage2_fork_ns"))),
            us(parts.and_then(|p| num(p, "genid_write_ns"))),
        );
    }
}

/// The whole report.
pub fn table(
    lines: &[Value],
    targets: &[Target],
    agreement: &Value,
    qemu: &str,
    machine: &Value,
) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        "\nvmfork benchmark: emulated time (QEMU -icount shift=0: 1 instruction = 1 ns), medians"
    );
    let _ = writeln!(
        w,
        "{qemu}; host {} ({} cores, {})",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["os"].as_str().unwrap_or("?")
    );
    for e in of(lines, "error") {
        let _ = writeln!(w, "ERROR in phase {}: {}", e["phase"], e["msg"]);
    }

    if find(lines, "fork", &[]).is_some() || find(lines, "eager", &[]).is_some() {
        fork_table(w, lines);
    }

    let cow_rows = [
        (
            "cow_fault",
            "COW fault: first write to a shared page (its L3 private)",
        ),
        (
            "copy_frame",
            "4 KiB copy (copy_frame: SIMD copy + D/I-cache maintenance)",
        ),
        ("copy_4k_simd", "4 KiB SIMD copy loop alone"),
        ("memcpy_4k", "4 KiB memcpy alone (compiler_builtins)"),
        ("zero_frame", "4 KiB zero (zero_frame: DC ZVA + clean)"),
        (
            "first_touch_l2_l3",
            "first touch after the fork (read: copies L2 + L3)",
        ),
        (
            "first_touch_l3",
            "first touch of another 2 MiB region (copies L3)",
        ),
        (
            "first_write_region",
            "first write in an untouched region (L3 + frame)",
        ),
        (
            "parent_first_touch",
            "the parent's first touch after the fork",
        ),
    ];
    if find(lines, "cow", &[]).is_some() {
        let mem = find(lines, "cow", &[]).map_or(json!(0), |v| v["mem_mib"].clone());
        let _ = writeln!(w, "\n2. After the fork ({mem} MiB guest, us)");
        for (what, label) in cow_rows {
            let _ = writeln!(
                w,
                "  {label:<58} {:>10}",
                us(median(lines, "cow", &[("what", json!(what))]))
            );
        }
    }

    if of(lines, "reset").next().is_some() {
        let _ = writeln!(w, "\n3. Reset to the fork point (us)");
        let _ = writeln!(
            w,
            "  {:>11} {:>12} {:>15} {:>13} {:>10}",
            "dirty pages", "reset_now", "Stage2::reset", "frames freed", "target"
        );
        for v in of(lines, "reset") {
            let dirty = v["dirty"].as_u64().unwrap_or(0);
            let _ = writeln!(
                w,
                "  {dirty:>11} {:>12} {:>15} {:>13} {:>10}",
                us(num(v, "median_ns")),
                us(num(v, "stage2_reset_ns")),
                v["frames_freed"].to_string(),
                if dirty == 0 {
                    String::from("-")
                } else {
                    format!("{}", 5 + dirty)
                }
            );
        }
    }

    if let Some(d) = of(lines, "density").next() {
        let kib = |k: &str| num(d, k).unwrap_or(0.0) / 1024.0;
        let _ = writeln!(
            w,
            "\n4. Density: {} idle children of a {} MiB guest",
            d["children"], d["mem_mib"]
        );
        let _ = writeln!(
            w,
            "  per child: {:.1} KiB frames + {:.1} KiB heap = {:.1} KiB (vGIC clone {} B and vCPUs {} B, each held twice: live and in the fork snapshot); frames leaked after teardown: {}; fork median {} us",
            kib("frame_bytes_per_child"),
            kib("heap_bytes_per_child"),
            kib("bytes_per_child"),
            d["vgic_clone_heap"],
            d["vcpus_clone_heap"],
            d["frames_leaked"],
            us(num(d, "median_ns"))
        );
    }

    if of(lines, "fuzz").next().is_some() {
        let _ = writeln!(
            w,
            "\n5. Fuzzing loop: reset + run the workload in the child (us, emulated)"
        );
        let _ = writeln!(
            w,
            "  {:>14} {:>10} {:>10} {:>10} {:>12}",
            "pages written", "cycle", "reset", "run", "cycles/s"
        );
        for v in of(lines, "fuzz") {
            let _ = writeln!(
                w,
                "  {:>14} {:>10} {:>10} {:>10} {:>12}",
                v["dirty"].to_string(),
                us(num(v, "median_ns")),
                us(num(v, "reset_median_ns")),
                us(num(v, "run_median_ns")),
                v["cycles_per_sec"].to_string()
            );
        }
    }

    if of(lines, "idle").next().is_some() {
        let _ = writeln!(
            w,
            "\n6. Idle forks beside a working VM: the fuzzing loop (1 page), and a pick that finds nothing (us, emulated)"
        );
        let _ = writeln!(
            w,
            "  {:>12} {:>10} {:>12} {:>12}",
            "idle forks", "cycle", "cycles/s", "empty pick"
        );
        for v in of(lines, "idle") {
            let _ = writeln!(
                w,
                "  {:>12} {:>10} {:>12} {:>12}",
                v["idle_forks"].to_string(),
                us(num(v, "median_ns")),
                v["cycles_per_sec"].to_string(),
                us(num(v, "pick_none_ns"))
            );
        }
    }

    if let Some(v) = of(lines, "scale").next() {
        let _ = writeln!(w, "\n7. Scale: idle forks alive at once");
        let _ = writeln!(
            w,
            "  {} children of a {} MiB guest; stopped by: {} ({} frames used by them, {} MiB heap used, {} frames still free)",
            v["children"],
            v["mem_mib"],
            v["stopped_by"].as_str().unwrap_or("?"),
            v["frames_used"],
            num(v, "heap_used").unwrap_or(0.0) as u64 >> 20,
            v["frames_free"]
        );
        let _ = writeln!(
            w,
            "  fork: {} us for the first 100, {} us for the last 100; a 1 KiB heap allocation: {} us -> {} us",
            us(num(v, "fork_first100_median_ns")),
            us(num(v, "fork_last100_median_ns")),
            us(num(v, "heap_alloc_first_ns")),
            us(num(v, "heap_alloc_last_ns")),
        );
        let secs =
            |k: &str| num(v, k).map_or_else(|| String::from("-"), |n| format!("{:.2}", n / 1e9));
        let _ = writeln!(
            w,
            "  all forks {} s, destroying all {} s; destroy: {} us for the first 100, {} us for the last 100",
            secs("forks_ns"),
            secs("destroy_all_ns"),
            us(num(v, "destroy_first100_median_ns")),
            us(num(v, "destroy_last100_median_ns")),
        );
    }

    let rounds = smp_rounds(lines);
    if !rounds.is_empty() {
        let n = rounds[0].3;
        let _ = writeln!(
            w,
            "\n8. Scale across CPUs: exits/s of busy VMs, one per CPU (host wall clock: {}+1 CPUs, multi-threaded TCG, no icount)",
            n
        );
        let _ = writeln!(
            w,
            "  {:>6} {:>16} {:>16} {:>8} {:>22} {:>22}",
            "round",
            "1 VM, 1 CPU",
            format!("{n} VMs, {n} CPUs"),
            "ratio",
            "waited for a lock (1)",
            format!("waited for a lock ({n})")
        );
        let waited = |round: u64, vms: u64| {
            find(
                lines,
                "smp",
                &[("round", json!(round)), ("vms", json!(vms))],
            )
            .map_or_else(
                || String::from("-"),
                |v| format!("{} of {}", v["exits_waited"], v["exits_handled"]),
            )
        };
        for (round, one, many, _) in &rounds {
            let _ = writeln!(
                w,
                "  {round:>6} {one:>16.0} {many:>16.0} {:>8.2} {:>22} {:>22}",
                if *one > 0.0 { many / one } else { 0.0 },
                waited(*round, 1),
                waited(*round, n)
            );
        }
    }

    if !targets.is_empty() {
        let _ = writeln!(w, "\nTargets (issue 6)");
        for t in targets {
            let _ = writeln!(w, "{}", t.line());
        }
    }
    if agreement["runs"].as_u64().unwrap_or(1) > 1 {
        let _ = writeln!(
            w,
            "\nAgreement of {} runs: {} of {} figures identical; largest difference {:.4}% ({})",
            agreement["runs"],
            agreement["figures_identical"],
            agreement["figures_compared"],
            agreement["max_relative_difference"].as_f64().unwrap_or(0.0) * 100.0,
            agreement["worst_figure"].as_str().unwrap_or("-")
        );
    }
    if let Some(d) = of(lines, "done").next() {
        let _ = writeln!(
            w,
            "emulated time of the whole benchmark: {:.2} s",
            num(d, "emulated_ns").unwrap_or(0.0) / 1e9
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> Vec<Value> {
        vec![
            json!({"bench":"fork","mem_mib":16,"vcpus":1,"median_ns":10000}),
            json!({"bench":"fork","mem_mib":1024,"vcpus":1,"median_ns":13000}),
            json!({"bench":"fork","mem_mib":256,"vcpus":1,"median_ns":25000}),
            json!({"bench":"eager","mem_mib":256,"median_ns":20_000_000}),
            json!({"bench":"cow","what":"cow_fault","median_ns":5000}),
            json!({"bench":"cow","what":"copy_frame","median_ns":2500}),
            json!({"bench":"reset","dirty":0,"median_ns":1000}),
            json!({"bench":"reset","dirty":16,"median_ns":20000}),
            json!({"bench":"density","bytes_per_child":20480}),
            json!({"bench":"idle","idle_forks":0,"cycles_per_sec":20000,"median_ns":50000,"pick_none_ns":300}),
            json!({"bench":"idle","idle_forks":1000,"cycles_per_sec":19000,"median_ns":52000,"pick_none_ns":9000}),
            json!({"bench":"idle","idle_forks":10000,"cycles_per_sec":10000,"median_ns":100000,"pick_none_ns":90000}),
            json!({"bench":"scale","mem_mib":16,"children":60023,"stopped_by":"heap",
                "frames_used":60023,"frames_free":978296,"heap_used":271935648,
                "fork_first100_median_ns":15376,"fork_last100_median_ns":16624,
                "heap_alloc_first_ns":208,"heap_alloc_last_ns":240,"forks_ns":1042038304,
                "destroy_all_ns":766616656,"destroy_first100_median_ns":12800,
                "destroy_last100_median_ns":12700}),
        ]
    }

    fn target<'a>(t: &'a [Target], name: &str) -> &'a Target {
        t.iter()
            .find(|x| x.name.starts_with(name))
            .unwrap_or_else(|| panic!("no target {name}"))
    }

    #[test]
    fn targets_compute_ratios_and_verdicts() {
        let t = targets(&lines());
        let ratio = target(&t, "fork(1 GiB) / fork(16 MiB), 1");
        assert!((ratio.value - 1.3).abs() < 1e-9 && !ratio.met());
        assert!(
            t.iter().all(|x| !x.name.contains("2 vCPU")),
            "no 2-vCPU data"
        );
        let eager = target(&t, "eager clone / fork");
        assert!((eager.value - 800.0).abs() < 1e-9 && !eager.met());
        assert!(!target(&t, "fork of 256 MiB").met()); // 25 us > 20 us
        let cow = target(&t, "COW fault");
        assert!((cow.value - 2.5).abs() < 1e-9 && !cow.met());
        let reset = target(&t, "reset after 16");
        assert!((reset.limit - 21.0).abs() < 1e-9 && reset.met());
        assert!(t.iter().all(|x| x.name != "reset after 0 dirty pages"));
        assert!(!target(&t, "memory per idle child").met()); // 20 KiB > 16 KiB
        let idle = target(&t, "fuzz cycles/s with 1000 idle forks / with none");
        assert!((idle.value - 0.95).abs() < 1e-9 && idle.met());
        assert!(!target(&t, "fuzz cycles/s with 10000 idle forks / with none").met());
    }

    #[test]
    fn agreement_counts_identical_and_worst_difference() {
        let a = lines();
        let mut b = lines();
        b[2]["median_ns"] = json!(25250); // 1 % off
        let g = agreement(&[a.clone(), a.clone()]);
        assert_eq!(g["figures_identical"], g["figures_compared"]);
        assert_eq!(g["max_relative_difference"].as_f64(), Some(0.0));
        let g = agreement(&[a, b]);
        assert_eq!(
            g["figures_identical"].as_u64().unwrap() + 1,
            g["figures_compared"].as_u64().unwrap()
        );
        let d = g["max_relative_difference"].as_f64().unwrap();
        assert!((d - 250.0 / 25250.0).abs() < 1e-12);
        assert!(g["worst_figure"].as_str().unwrap().contains("256 MiB"));
    }

    #[test]
    fn table_lists_every_section_with_data() {
        let l = lines();
        let s = table(&l, &targets(&l), &json!({"runs":1}), "QEMU x", &json!({}));
        assert!(s.contains("1. Fork latency") && s.contains("3. Reset"));
        assert!(s.contains("MISSED") && s.contains("met"));
        assert!(!s.contains("5. Fuzzing loop"), "no fuzz lines, no section");
        assert!(s.contains("60023 children of a 16 MiB guest; stopped by: heap"));
        assert!(s.contains("6. Idle forks") && s.contains("90.00"), "{s}");
        assert!(s.contains("all forks 1.04 s, destroying all 0.77 s; destroy: 12.80 us"));
    }

    #[test]
    fn smp_ratio_is_the_median_of_the_rounds_paired_within_each() {
        let smp = |round: u64, vms: u64, eps: u64| json!({"bench":"smp","round":round,"vms":vms,"workers":2,"exits_per_sec":eps});
        // Round 1's host was slower for both windows: pairing within the round cancels it.
        let l = vec![
            smp(0, 1, 1000),
            smp(0, 2, 1900),
            smp(1, 1, 500),
            smp(1, 2, 950),
            smp(2, 1, 1000),
            smp(2, 2, 1200),
        ];
        let (ratio, n) = smp_ratio(&l).unwrap();
        assert_eq!(n, 2);
        assert!((ratio - 1.9).abs() < 1e-9, "{ratio}");
        let t = targets(&l);
        let scale = target(&t, "exits/s, 2 VMs on 2 CPUs");
        assert!(scale.met() && scale.limit == 1.75);
        let s = table(&l, &t, &json!({"runs":1}), "QEMU x", &json!({}));
        assert!(
            s.contains("8. Scale across CPUs") && s.contains("1.20"),
            "{s}"
        );
        assert!(smp_ratio(&[smp(0, 1, 1000)]).is_none(), "no pair, no ratio");
    }
}
