//! `make bench`: boots the vmfork monitor under QEMU with `-icount shift=0` and `bench=<phases>`
//! on its command line, collects the `bench: {json}` lines the monitor prints
//! (hypervisor/monitor/src/bench.rs), then prints a table, writes `results.json` and an SVG plot
//! of fork latency against guest memory. With `--runs 2` (the default) it boots QEMU twice, in
//! parallel, and reports how closely the two runs agree. The `smp` phase (part of `all`) needs a
//! boot of its own, made once after those: several CPUs, multi-threaded TCG and no `-icount`
//! (see [`smp_args`]). See docs/BENCHMARKS.md.

mod report;
mod svg;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Command-line options.
#[derive(Debug, Clone)]
struct Options {
    qemu: String,
    monitor: PathBuf,
    out: PathBuf,
    phases: String,
    runs: usize,
    mem: String,
    timeout: Duration,
    svg_copy: Option<PathBuf>,
    replot: Option<PathBuf>,
    smp_workers: Option<usize>,
}

const USAGE: &str = "usage: vmfork-bench [--qemu BIN] [--monitor ELF] [--out DIR] [--phases all|fork,cow,reset,density,fuzz,idle,scale,smp]
                    [--runs N] [--mem 4G] [--timeout-secs S] [--svg-copy PATH] [--smp-workers N]
       vmfork-bench --replot results.json [--svg-copy PATH]   (table and plot again, no QEMU)";

fn parse_args() -> Result<Options> {
    let mut o = Options {
        qemu: String::from("qemu-system-aarch64"),
        monitor: PathBuf::from("target/aarch64-unknown-none/release/vmfork-monitor"),
        out: PathBuf::from("target/bench"),
        phases: String::from("all"),
        runs: 2,
        mem: String::from("4G"),
        timeout: Duration::from_secs(840),
        svg_copy: None,
        replot: None,
        smp_workers: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--qemu" => o.qemu = val()?,
            "--monitor" => o.monitor = PathBuf::from(val()?),
            "--out" => o.out = PathBuf::from(val()?),
            "--phases" => o.phases = val()?,
            "--runs" => o.runs = val()?.parse().context("--runs takes a number")?,
            "--mem" => o.mem = val()?,
            "--timeout-secs" => {
                o.timeout = Duration::from_secs(val()?.parse().context("--timeout-secs")?)
            }
            "--svg-copy" => o.svg_copy = Some(PathBuf::from(val()?)),
            "--replot" => o.replot = Some(PathBuf::from(val()?)),
            "--smp-workers" => {
                let n: usize = val()?.parse().context("--smp-workers takes a number")?;
                if !(2..=7).contains(&n) {
                    bail!("--smp-workers takes 2 to 7 (the monitor drives 8 CPUs)");
                }
                o.smp_workers = Some(n);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(o)
}

/// The phases of the `-icount` runs (`None`: there are none) and whether the `smp` boot runs.
fn split_phases(phases: &str) -> (Option<String>, bool) {
    if phases == "all" {
        return (Some(String::from("all")), true);
    }
    let mut smp = false;
    let rest: Vec<&str> = phases
        .split(',')
        .filter(|p| {
            let is_smp = *p == "smp";
            smp |= is_smp;
            !is_smp && !p.is_empty()
        })
        .collect();
    ((!rest.is_empty()).then(|| rest.join(",")), smp)
}

/// Worker CPUs of the `smp` boot: one per host core up to 4 (a vCPU thread each), at least 2.
fn smp_workers(o: &Options) -> usize {
    o.smp_workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 4)
    })
}

/// The QEMU command line of the `smp` boot: the workers plus the boot CPU (which only sleeps
/// between readings), multi-threaded TCG (each CPU a host thread, so exits of different CPUs
/// really overlap) and no `-icount` (it serialises the CPUs): the counter follows host time.
fn smp_args(o: &Options) -> Vec<String> {
    [
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
        "-accel",
        "tcg,thread=multi",
        "-smp",
        &(smp_workers(o) + 1).to_string(),
        "-m",
        &o.mem,
        "-nographic",
        "-semihosting",
        "-kernel",
        &o.monitor.display().to_string(),
        "-append",
        "log=warn bench=smp",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The QEMU command line of one run. `-icount shift=0,sleep=off`: the virtual clock advances by
/// 1 ns per emulated instruction and never with host time, so the monitor's counter readings
/// repeat run to run. One CPU: the benchmark runs on the boot CPU only.
fn qemu_args(o: &Options, phases: &str) -> Vec<String> {
    [
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
        "-smp",
        "1",
        "-m",
        &o.mem,
        "-icount",
        "shift=0,sleep=off",
        "-nographic",
        "-semihosting",
        "-kernel",
        &o.monitor.display().to_string(),
        "-append",
        // The scale phase forks until the heap or the frames run out (idle forks hold no
        // VMID): lift the VM limits past that, and give the heap 1 GiB of the 4 GiB (the
        // default, 16 MiB + RAM/16, holds about 60,000 idle forks; the idle and scale phases
        // want 100,000 and more).
        &format!("log=warn max_vms=1M max_forks_per_tree=1M heap_mib=1024 bench={phases}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One boot of the monitor: the parsed `bench:` lines and the wall-clock time it took.
struct Run {
    lines: Vec<Value>,
    wall: Duration,
}

fn run_once(o: &Options, args: &[String], index: usize) -> Result<Run> {
    let start = Instant::now();
    let mut child = Command::new(&o.qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", o.qemu))?;
    let stdout = child.stdout.take().context("QEMU has no stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = start + o.timeout;
    let mut lines = Vec::new();
    let mut done = false;
    let mut console_tail: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                if let Some(j) = line.strip_prefix("bench: ") {
                    let v: Value = serde_json::from_str(j)
                        .with_context(|| format!("run {index}: bad bench line: {line}"))?;
                    eprintln!("[run {index}] {}", report::progress(&v));
                    done |= v["bench"] == "done";
                    lines.push(v);
                } else {
                    console_tail.push(line.to_string());
                    if console_tail.len() > 20 {
                        console_tail.remove(0);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "run {index}: timed out after {:?}; last console lines:\n{}",
                    o.timeout,
                    console_tail.join("\n")
                );
            }
        }
    }
    let status = child.wait().context("waiting for QEMU")?;
    let _ = reader.join();
    if !done {
        bail!(
            "run {index}: QEMU exited ({status}) before the benchmark finished; last console lines:\n{}",
            console_tail.join("\n")
        );
    }
    Ok(Run {
        lines,
        wall: start.elapsed(),
    })
}

fn qemu_version(qemu: &str) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| String::from("unknown"))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| String::from("unknown"));
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| String::from("unknown"));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({ "cpu": cpu, "cores": cores, "os": os })
}

/// Prints the table and writes the plot again from a `results.json` of an earlier run.
fn replot(o: &Options, path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let results: Value = serde_json::from_str(&text).context("results.json is not JSON")?;
    let runs: Vec<Vec<Value>> = results["runs"]
        .as_array()
        .context("results.json has no runs")?
        .iter()
        .map(|r| r["lines"].as_array().cloned().unwrap_or_default())
        .collect();
    let smp = results["smp_run"]["lines"].as_array().cloned();
    if runs.is_empty() && smp.is_none() {
        bail!("results.json has no runs");
    }
    let mut first = runs.first().cloned().unwrap_or_default();
    first.extend(smp.unwrap_or_default());
    let targets = report::targets(&first);
    print!(
        "{}",
        report::table(
            &first,
            &targets,
            &report::agreement(&runs),
            results["qemu"].as_str().unwrap_or("?"),
            &results["machine"]
        )
    );
    let plot = svg::fork_plot(&first);
    let svg_path = o
        .svg_copy
        .clone()
        .unwrap_or_else(|| o.out.join("bench-fork.svg"));
    std::fs::write(&svg_path, plot)
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    println!("wrote {}", svg_path.display());
    Ok(())
}

fn main() -> Result<()> {
    let o = parse_args()?;
    if let Some(path) = &o.replot {
        return replot(&o, path);
    }
    if !o.monitor.exists() {
        bail!(
            "{} not found: build it with `make monitor`",
            o.monitor.display()
        );
    }
    let qemu = qemu_version(&o.qemu);
    let (icount_phases, smp) = split_phases(&o.phases);
    if icount_phases.is_none() && !smp {
        bail!("--phases names no phase\n{USAGE}");
    }
    let args = icount_phases.as_deref().map(|p| qemu_args(&o, p));
    let runs: Vec<Run> = match &args {
        None => Vec::new(),
        Some(args) => {
            eprintln!(
                "vmfork-bench: {} run(s) of `{} {}`",
                o.runs,
                o.qemu,
                args.join(" ")
            );
            // The runs are independent QEMU processes with deterministic virtual time: run them
            // side by side (one host core each).
            let runs: Vec<Result<Run>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..o.runs)
                    .map(|i| {
                        let (o, args) = (&o, &args);
                        s.spawn(move || run_once(o, args, i))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("run thread panicked")))
                    })
                    .collect()
            });
            runs.into_iter().collect::<Result<_>>()?
        }
    };
    // The smp boot measures host time: alone, after the others.
    let smp_args = smp.then(|| smp_args(&o));
    let smp_run = match &smp_args {
        None => None,
        Some(a) => {
            eprintln!("vmfork-bench: the smp run: `{} {}`", o.qemu, a.join(" "));
            Some(run_once(&o, a, o.runs)?)
        }
    };
    let mut first = runs.first().map(|r| r.lines.clone()).unwrap_or_default();
    if let Some(r) = &smp_run {
        first.extend(r.lines.iter().cloned());
    }
    let targets = report::targets(&first);
    let agreement = report::agreement(&runs.iter().map(|r| r.lines.clone()).collect::<Vec<_>>());
    let machine = machine();
    print!(
        "{}",
        report::table(&first, &targets, &agreement, &qemu, &machine)
    );

    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("cannot create {}", o.out.display()))?;
    let results = json!({
        "qemu": qemu,
        "qemu_args": args,
        "machine": machine,
        "runs": runs.iter().map(|r| json!({
            "wall_secs": r.wall.as_secs_f64(),
            "lines": r.lines,
        })).collect::<Vec<_>>(),
        "smp_run": smp_run.as_ref().map(|r| json!({
            "qemu_args": smp_args,
            "wall_secs": r.wall.as_secs_f64(),
            "lines": r.lines,
        })),
        "targets": targets.iter().map(report::Target::to_json).collect::<Vec<_>>(),
        "agreement": agreement,
    });
    let json_path = o.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let plot = svg::fork_plot(&first);
    let svg_path = o.out.join("bench-fork.svg");
    std::fs::write(&svg_path, &plot)
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    if let Some(p) = &o.svg_copy {
        std::fs::write(p, &plot).with_context(|| format!("cannot write {}", p.display()))?;
    }
    println!(
        "wrote {} and {} (wall: {})",
        json_path.display(),
        svg_path.display(),
        runs.iter()
            .chain(smp_run.as_ref())
            .map(|r| format!("{:.0} s", r.wall.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_split_into_the_icount_runs_and_the_smp_boot() {
        assert_eq!(split_phases("all"), (Some(String::from("all")), true));
        assert_eq!(
            split_phases("fork,cow"),
            (Some(String::from("fork,cow")), false)
        );
        assert_eq!(split_phases("fork,smp"), (Some(String::from("fork")), true));
        assert_eq!(split_phases("smp"), (None, true));
        assert_eq!(split_phases(""), (None, false));
    }
}
