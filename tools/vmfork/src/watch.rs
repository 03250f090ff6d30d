//! `vmfork wait`, `vmfork events` and `vmfork top`: watching VMs change.
//!
//! The monitor pushes no events: all three poll `List` (every `--interval` milliseconds) and
//! compare what they see. The comparison and the formatting are pure functions here
//! ([`changes`], [`cow_rates`], [`top_table`], ...); the loops that poll are [`wait`],
//! [`events`] and [`top`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmfork_proto::{GlobalStats, PauseReason, StopReason, VmId, VmInfo, VmState};

use crate::client::Client;
use crate::errors::{CliError, ErrorKind};
use crate::format;

/// The state `vmfork wait` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Its vCPUs run.
    Running,
    /// Paused (for any reason).
    Paused,
    /// Stopped (for any reason), or gone from the list.
    Stopped,
    /// No longer listed (killed or removed).
    Gone,
}

impl Target {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Running => "running",
            Target::Paused => "paused",
            Target::Stopped => "stopped",
            Target::Gone => "gone",
        }
    }
}

/// Where waiting for `target` stands, for a VM that is `vm` in the list now (`None`: not
/// listed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitStatus {
    /// It is there.
    Reached,
    /// Not yet.
    NotYet,
    /// It never will be: the error kind (`stopped`, `vm_gone`) and why.
    Never(ErrorKind, String),
}

/// Whether a VM in the list as `vm` (`None`: not listed) is in `target` (pure).
pub fn wait_status(id: u32, target: Target, vm: Option<&VmInfo>) -> WaitStatus {
    match (target, vm) {
        (Target::Gone, None) | (Target::Stopped, None) => WaitStatus::Reached,
        (Target::Gone, Some(_)) => WaitStatus::NotYet,
        (_, None) => WaitStatus::Never(
            ErrorKind::VmGone,
            format!(
                "vm{id} is gone (removed): it will never be {}",
                target.name()
            ),
        ),
        (_, Some(v)) => match (&v.state, target) {
            (VmState::Running, Target::Running)
            | (VmState::Paused { .. }, Target::Paused)
            | (VmState::Stopped { .. }, Target::Stopped) => WaitStatus::Reached,
            (VmState::Stopped { .. }, _) => WaitStatus::Never(
                ErrorKind::Stopped,
                format!("vm{id} is {}: it will never be {}", v.state, target.name()),
            ),
            _ => WaitStatus::NotYet,
        },
    }
}

/// The line `vmfork wait` prints once the state is reached.
pub fn state_line(id: u32, vm: Option<&VmInfo>) -> String {
    match vm {
        Some(v) => format!("vm{id} {} {}", v.name, v.state),
        None => format!("vm{id} gone"),
    }
}

/// The JSON `vmfork wait --json` prints once the state is reached.
pub fn state_json(id: u32, vm: Option<&VmInfo>, seconds: f64) -> Value {
    match vm {
        Some(v) => json!({
            "vm": id,
            "name": v.name,
            "state": v.state,
            "seconds": seconds,
        }),
        None => json!({
            "vm": id,
            "name": Value::Null,
            "state": { "state": "gone" },
            "seconds": seconds,
        }),
    }
}

/// One change seen between two looks at the list.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Seconds since the watch began.
    pub time: f64,
    /// The VM.
    pub vm: u32,
    /// Its name (the last one it had, for `Removed`).
    pub name: String,
    /// What happened.
    pub kind: EventKind,
}

/// What happened to a VM.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// A new VM with no parent (created, restored); it runs unless a state event follows.
    Created,
    /// A new fork of `parent`; it runs unless a state event follows.
    Forked {
        /// The VM it was forked from.
        parent: u32,
    },
    /// Now paused.
    Paused {
        /// Why.
        reason: PauseReason,
    },
    /// Running again.
    Resumed,
    /// Stopped.
    Stopped {
        /// Why.
        reason: StopReason,
    },
    /// Renamed from `old_name` to the event's name.
    Renamed {
        /// Its name before.
        old_name: String,
    },
    /// No longer listed.
    Removed,
    /// Its copy-on-write faults grew.
    Cow {
        /// Faults per second over the last period.
        per_sec: f64,
        /// Faults in all.
        total: u64,
    },
}

impl Event {
    /// The event's `"event"` name.
    pub fn name(&self) -> &'static str {
        match self.kind {
            EventKind::Created => "created",
            EventKind::Forked { .. } => "forked",
            EventKind::Paused { .. } => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Stopped { .. } => "stopped",
            EventKind::Renamed { .. } => "renamed",
            EventKind::Removed => "removed",
            EventKind::Cow { .. } => "cow",
        }
    }

    /// Its JSON line (docs/vmfork-json.schema.json, `event`).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "event": self.name(),
            "vm": self.vm,
            "name": self.name,
            // Milliseconds are enough.
            "time": (self.time * 1000.0).round() / 1000.0,
        });
        match &self.kind {
            EventKind::Created => v["parent"] = Value::Null,
            EventKind::Forked { parent } => v["parent"] = json!(parent),
            EventKind::Paused { reason } => v["reason"] = json!(reason),
            EventKind::Stopped { reason } => v["reason"] = json!(reason),
            EventKind::Renamed { old_name } => v["old_name"] = json!(old_name),
            EventKind::Cow { per_sec, total } => {
                v["cow_faults_per_sec"] = json!((per_sec * 10.0).round() / 10.0);
                v["cow_faults"] = json!(total);
            }
            EventKind::Resumed | EventKind::Removed => {}
        }
        v
    }
}

fn by_id(vms: &[VmInfo]) -> BTreeMap<u32, &VmInfo> {
    vms.iter().map(|v| (v.id.0, v)).collect()
}

/// The event that takes a VM from state `from` (`None`: just made, so running) to `to`, if any.
fn state_event(from: Option<&VmState>, to: &VmState) -> Option<EventKind> {
    let from = from.unwrap_or(&VmState::Running);
    if from == to {
        return None;
    }
    Some(match to {
        VmState::Running => EventKind::Resumed,
        VmState::Paused { reason } => EventKind::Paused { reason: *reason },
        VmState::Stopped { reason } => EventKind::Stopped {
            reason: reason.clone(),
        },
    })
}

/// The events that take list `a` to list `b`, stamped `time`, in id order (pure). A VM new in
/// `b` is `created` (no parent) or `forked`, then paused or stopped if it is not running;
/// one in both may be `renamed`, then change state; one only in `a` is `removed`.
pub fn changes(a: &[VmInfo], b: &[VmInfo], time: f64) -> Vec<Event> {
    let (old, new) = (by_id(a), by_id(b));
    let mut ids: Vec<u32> = old.keys().chain(new.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::new();
    let mut push = |vm: u32, name: &str, kind: EventKind| {
        out.push(Event {
            time,
            vm,
            name: name.to_string(),
            kind,
        })
    };
    for id in ids {
        match (old.get(&id), new.get(&id)) {
            (None, Some(n)) => {
                let kind = match n.parent {
                    Some(p) => EventKind::Forked { parent: p.0 },
                    None => EventKind::Created,
                };
                push(id, &n.name, kind);
                if let Some(k) = state_event(None, &n.state) {
                    push(id, &n.name, k);
                }
            }
            (Some(o), Some(n)) => {
                if o.name != n.name {
                    push(
                        id,
                        &n.name,
                        EventKind::Renamed {
                            old_name: o.name.clone(),
                        },
                    );
                }
                if let Some(k) = state_event(Some(&o.state), &n.state) {
                    push(id, &n.name, k);
                }
            }
            (Some(o), None) => push(id, &o.name, EventKind::Removed),
            (None, None) => {}
        }
    }
    out
}

/// Copy-on-write faults per second of each VM in both lists whose faults grew from `a` to `b`,
/// `elapsed` seconds apart, as `cow` events stamped `time` (pure).
pub fn cow_rates(a: &[VmInfo], b: &[VmInfo], elapsed: f64, time: f64) -> Vec<Event> {
    let old = by_id(a);
    b.iter()
        .filter_map(|n| {
            let o = old.get(&n.id.0)?;
            let grew = n.cow_faults.checked_sub(o.cow_faults).filter(|&d| d > 0)?;
            Some(Event {
                time,
                vm: n.id.0,
                name: n.name.clone(),
                kind: EventKind::Cow {
                    per_sec: rate(grew, elapsed),
                    total: n.cow_faults,
                },
            })
        })
        .collect()
}

/// `count` per second over `secs` (0 when no time passed).
pub fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// What a VM looks like to someone who only saw the events: name and state.
pub type Replayed = BTreeMap<u32, (String, VmState)>;

/// The view of list `vms` that [`replay`] keeps.
pub fn view(vms: &[VmInfo]) -> Replayed {
    vms.iter()
        .map(|v| (v.id.0, (v.name.clone(), v.state.clone())))
        .collect()
}

/// Applies `events` to `view` as a script reading them would (pure).
pub fn replay(view: &mut Replayed, events: &[Event]) {
    for e in events {
        match &e.kind {
            EventKind::Created | EventKind::Forked { .. } => {
                view.insert(e.vm, (e.name.clone(), VmState::Running));
            }
            EventKind::Removed => {
                view.remove(&e.vm);
            }
            EventKind::Cow { .. } => {}
            k => {
                if let Some((name, state)) = view.get_mut(&e.vm) {
                    *name = e.name.clone();
                    match k {
                        EventKind::Paused { reason } => {
                            *state = VmState::Paused { reason: *reason }
                        }
                        EventKind::Stopped { reason } => {
                            *state = VmState::Stopped {
                                reason: reason.clone(),
                            }
                        }
                        EventKind::Resumed => *state = VmState::Running,
                        _ => {}
                    }
                }
            }
        }
    }
}

/// vCPU use in percent: `vcpu` microseconds run over `elapsed` microseconds of the VM's uptime
/// (above 100 with several vCPUs busy); `None` when no time passed.
pub fn vcpu_percent(vcpu: u64, elapsed: u64) -> Option<f64> {
    (elapsed > 0).then(|| vcpu as f64 * 100.0 / elapsed as f64)
}

/// A duration for the UPTIME column: `42s`, `3m07s`, `2h05m`, `4d03h`.
pub fn duration(secs: u64) -> String {
    let (m, s) = (secs / 60, secs % 60);
    let (h, m) = (m / 60, m % 60);
    let (d, h) = (h / 24, h % 24);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The `vmfork top` table for list `cur` (pure): a header line with the monitor's figures from
/// `g`, then one row per VM by id. Rates come from `prev`, the list `elapsed` seconds before
/// (`-` without it, or for a VM it did not have).
pub fn top_table(g: &GlobalStats, prev: Option<&[VmInfo]>, cur: &[VmInfo], elapsed: f64) -> String {
    let mut out = String::new();
    let page = |n: u64| format::bytes(n.saturating_mul(4096));
    let _ = writeln!(
        out,
        "vmfork top - {} VMs live (at most {}), {} stopped, memory {} free of {}, heap {} free",
        g.vms,
        g.max_vms,
        g.stopped_vms,
        page(g.free_frames),
        page(g.total_frames),
        format::bytes(g.heap_free),
    );
    let old = prev.map(by_id).unwrap_or_default();
    let mut vms: Vec<&VmInfo> = cur.iter().collect();
    vms.sort_by_key(|v| v.id);
    let header = [
        "ID", "NAME", "STATE", "VCPU%", "COW/s", "PRIVATE", "SHARED", "UPTIME",
    ];
    let rows: Vec<[String; 8]> = vms
        .iter()
        .map(|v| {
            let o = old.get(&v.id.0);
            let vcpu = o
                .and_then(|o| {
                    let run = v.vcpu_us.checked_sub(o.vcpu_us)?;
                    let time = v.uptime_us.checked_sub(o.uptime_us)?;
                    vcpu_percent(run, time)
                })
                .map_or_else(|| "-".into(), |p| format!("{p:.1}"));
            let cow = o
                .filter(|_| elapsed > 0.0)
                .map(|o| rate(v.cow_faults.saturating_sub(o.cow_faults), elapsed))
                .map_or_else(|| "-".into(), |r| format!("{r:.0}"));
            let up = duration(v.uptime_us / 1_000_000);
            [
                v.id.to_string(),
                v.name.clone(),
                v.state.to_string(),
                vcpu,
                cow,
                page(v.private_pages),
                page(v.shared_pages),
                up,
            ]
        })
        .collect();
    let right = [true, false, false, true, true, true, true, true];
    out.push_str(&crate::format::table(&header, &rows, &right));
    out
}

/// `vmfork wait`: polls until `vm` is in `target`; prints its state line (JSON with `json`).
/// Fails with `timeout` after `timeout`, and at once when it can never get there.
pub fn wait(
    c: &mut Client,
    vm: u32,
    target: Target,
    timeout: Option<Duration>,
    interval: Duration,
    json: bool,
) -> Result<(), CliError> {
    let start = Instant::now();
    let mut first = true;
    loop {
        let vms = c.list()?;
        let info = vms.iter().find(|v| v.id == VmId(vm));
        if first && info.is_none() && target != Target::Gone {
            return Err(CliError::new(
                ErrorKind::NotFound,
                format!("no such VM: {vm}"),
            ));
        }
        first = false;
        match wait_status(vm, target, info) {
            WaitStatus::Reached => {
                let secs = start.elapsed().as_secs_f64();
                if json {
                    let s = serde_json::to_string_pretty(&state_json(vm, info, secs))
                        .map_err(|e| CliError::new(ErrorKind::Internal, e.to_string()))?;
                    println!("{s}");
                } else {
                    println!("{}", state_line(vm, info));
                }
                return Ok(());
            }
            WaitStatus::Never(kind, why) => return Err(CliError::new(kind, why)),
            WaitStatus::NotYet => {}
        }
        if let Some(t) = timeout {
            let spent = start.elapsed();
            if spent >= t {
                return Err(CliError::new(
                    ErrorKind::Timeout,
                    format!(
                        "vm{vm} was not {} within {} s (it is {})",
                        target.name(),
                        t.as_secs_f64(),
                        info.map_or_else(|| "gone".to_string(), |v| v.state.to_string())
                    ),
                ));
            }
            std::thread::sleep(interval.min(t - spent));
        } else {
            std::thread::sleep(interval);
        }
    }
}

/// `vmfork events`: prints the events between successive lists as JSON lines, `cow` events
/// once a second; ends after `count` events, or fails when the monitor goes.
pub fn events(c: &mut Client, interval: Duration, count: Option<u64>) -> Result<(), CliError> {
    let start = Instant::now();
    let mut prev = c.list()?;
    let (mut cow_base, mut cow_at) = (prev.clone(), 0.0f64);
    let mut left = count;
    let stdout = io::stdout();
    let io_err = |e: io::Error| CliError::new(ErrorKind::Io, format!("cannot write stdout: {e}"));
    if left == Some(0) {
        return Ok(());
    }
    loop {
        std::thread::sleep(interval);
        let cur = c.list()?;
        let now = start.elapsed().as_secs_f64();
        let mut evs = changes(&prev, &cur, now);
        if now - cow_at >= 1.0 {
            evs.extend(cow_rates(&cow_base, &cur, now - cow_at, now));
            cow_base = cur.clone();
            cow_at = now;
        }
        let mut out = stdout.lock();
        for e in &evs {
            writeln!(out, "{}", e.to_json()).map_err(io_err)?;
            if let Some(n) = left.as_mut() {
                *n -= 1;
                if *n == 0 {
                    return out.flush().map_err(io_err);
                }
            }
        }
        out.flush().map_err(io_err)?;
        prev = cur;
    }
}

/// `vmfork top`: the table every `interval`, redrawn in place on a terminal (`live`); without
/// `live`, one table from two lists `interval` apart.
pub fn top(c: &mut Client, interval: Duration, live: bool) -> Result<(), CliError> {
    let mut prev = c.list()?;
    let mut at = Instant::now();
    let io_err = |e: io::Error| CliError::new(ErrorKind::Io, format!("cannot write stdout: {e}"));
    loop {
        std::thread::sleep(interval);
        let (g, _) = c.stats(None)?;
        let cur = c.list()?;
        let elapsed = at.elapsed().as_secs_f64();
        at = Instant::now();
        let table = top_table(&g, Some(&prev), &cur, elapsed);
        let mut out = io::stdout().lock();
        if live {
            // Home, clear the screen, then the table.
            write!(out, "\x1b[H\x1b[2J{table}").map_err(io_err)?;
            out.flush().map_err(io_err)?;
        } else {
            write!(out, "{table}").map_err(io_err)?;
            return out.flush().map_err(io_err);
        }
        prev = cur;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vm(id: u32, parent: Option<u32>, name: &str, state: VmState) -> VmInfo {
        VmInfo {
            id: VmId(id),
            parent: parent.map(VmId),
            name: name.into(),
            state,
            vcpus: 1,
            mem_bytes: 16 << 20,
            private_pages: 10,
            shared_pages: 20,
            cow_faults: 0,
            forks: 0,
            last_fork_ticks: 0,
            uptime_us: 0,
            vcpu_us: 0,
        }
    }

    const PAUSED: VmState = VmState::Paused {
        reason: PauseReason::Requested,
    };

    fn stopped() -> VmState {
        VmState::Stopped {
            reason: StopReason::PowerOff,
        }
    }

    #[test]
    fn wait_reaches_and_refuses() {
        let r = vm(3, None, "a", VmState::Running);
        let p = vm(3, None, "a", PAUSED);
        let s = vm(3, None, "a", stopped());
        use WaitStatus::*;
        assert_eq!(wait_status(3, Target::Running, Some(&r)), Reached);
        assert_eq!(wait_status(3, Target::Paused, Some(&r)), NotYet);
        assert_eq!(wait_status(3, Target::Paused, Some(&p)), Reached);
        assert_eq!(wait_status(3, Target::Stopped, Some(&p)), NotYet);
        assert_eq!(wait_status(3, Target::Stopped, Some(&s)), Reached);
        assert_eq!(wait_status(3, Target::Stopped, None), Reached);
        assert_eq!(wait_status(3, Target::Gone, Some(&s)), NotYet);
        assert_eq!(wait_status(3, Target::Gone, None), Reached);
        let Never(kind, why) = wait_status(3, Target::Running, Some(&s)) else {
            panic!()
        };
        assert_eq!(kind, ErrorKind::Stopped);
        assert_eq!(why, "vm3 is stopped (power off): it will never be running");
        assert!(matches!(
            wait_status(3, Target::Paused, None),
            Never(ErrorKind::VmGone, _)
        ));
        assert_eq!(state_line(3, Some(&p)), "vm3 a paused (requested)");
        assert_eq!(state_line(3, None), "vm3 gone");
        let j = state_json(3, Some(&p), 0.5);
        assert_eq!(
            j["state"],
            json!({"state": "paused", "reason": "requested"})
        );
        assert_eq!(state_json(3, None, 0.0)["state"]["state"], "gone");
    }

    #[test]
    fn changes_name_each_kind() {
        let a = vec![
            vm(1, None, "a", VmState::Running),
            vm(2, Some(1), "a.1", VmState::Running),
            vm(3, Some(1), "a.2", PAUSED),
        ];
        let b = vec![
            vm(1, None, "first", PAUSED),
            vm(3, Some(1), "a.2", VmState::Running),
            vm(
                4,
                Some(1),
                "a.3",
                VmState::Paused {
                    reason: PauseReason::Forked,
                },
            ),
            vm(5, None, "new", VmState::Running),
        ];
        let lines: Vec<Value> = changes(&a, &b, 1.5).iter().map(Event::to_json).collect();
        assert_eq!(
            lines,
            [
                json!({"event": "renamed", "vm": 1, "name": "first", "time": 1.5, "old_name": "a"}),
                json!({"event": "paused", "vm": 1, "name": "first", "time": 1.5, "reason": "requested"}),
                json!({"event": "removed", "vm": 2, "name": "a.1", "time": 1.5}),
                json!({"event": "resumed", "vm": 3, "name": "a.2", "time": 1.5}),
                json!({"event": "forked", "vm": 4, "name": "a.3", "time": 1.5, "parent": 1}),
                json!({"event": "paused", "vm": 4, "name": "a.3", "time": 1.5, "reason": "forked"}),
                json!({"event": "created", "vm": 5, "name": "new", "time": 1.5, "parent": null}),
            ]
        );
        assert!(changes(&b, &b, 2.0).is_empty());
        let c = vec![vm(1, None, "first", stopped())];
        let e = changes(&b[..1], &c, 3.0);
        assert_eq!(e[0].to_json()["reason"], "power_off");
        let f = vec![vm(
            1,
            None,
            "first",
            VmState::Stopped {
                reason: StopReason::Fault("ESR 0x96".into()),
            },
        )];
        assert_eq!(
            changes(&c, &f, 3.0)[0].to_json()["reason"],
            json!({"fault": "ESR 0x96"})
        );
    }

    #[test]
    fn cow_rates_only_for_vms_whose_faults_grew() {
        let mut a = vec![
            vm(1, None, "a", VmState::Running),
            vm(2, Some(1), "b", VmState::Running),
        ];
        a[0].cow_faults = 100;
        let mut b = a.clone();
        b[0].cow_faults = 400;
        b.push(vm(3, Some(1), "c", VmState::Running));
        b[2].cow_faults = 50; // new: no rate yet
        let e = cow_rates(&a, &b, 2.0, 7.25);
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].to_json(),
            json!({"event": "cow", "vm": 1, "name": "a", "time": 7.25,
                   "cow_faults_per_sec": 150.0, "cow_faults": 400})
        );
        assert!(cow_rates(&a, &a, 1.0, 1.0).is_empty());
        assert_eq!(rate(10, 0.0), 0.0);
    }

    #[test]
    fn durations_and_percentages() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(187), "3m07s");
        assert_eq!(duration(2 * 3600 + 5 * 60 + 9), "2h05m");
        assert_eq!(duration(4 * 86400 + 3 * 3600), "4d03h");
        assert_eq!(vcpu_percent(50, 100), Some(50.0));
        assert_eq!(vcpu_percent(200, 100), Some(200.0));
        assert_eq!(vcpu_percent(5, 0), None);
    }

    fn stats() -> GlobalStats {
        GlobalStats {
            free_frames: 1000,
            used_frames: 24,
            total_frames: 1024,
            vms: 2,
            counter_hz: 1000,
            heap_used: 0,
            heap_free: 1 << 20,
            heap_reserve: 0,
            max_vms: 64,
            max_forks_per_tree: 64,
            stopped_vms: 1,
            max_stopped: 64,
        }
    }

    #[test]
    fn top_table_rows_by_id_with_rates() {
        let mut a = vec![
            vm(2, Some(1), "kid", PAUSED),
            vm(1, None, "parent", VmState::Running),
        ];
        a[1].cow_faults = 10;
        a[1].uptime_us = 10_000_000;
        a[1].vcpu_us = 1_000_000;
        let mut b = a.clone();
        b[1].cow_faults = 30;
        b[1].uptime_us = 3_600_000_000 + 10_500_000;
        b[1].vcpu_us = 1_000_000 + (3_600_000_000 + 500_000) / 4;
        let t = top_table(&stats(), Some(&a), &b, 0.5);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[0].contains("2 VMs live")
                && lines[0].contains("1 stopped")
                && lines[0].contains("3.9 MiB free of 4 MiB"),
            "{t}"
        );
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols,
            ["ID", "NAME", "STATE", "VCPU%", "COW/s", "PRIVATE", "SHARED", "UPTIME"]
        );
        assert!(lines[2].starts_with(" 1  parent  running"), "{t}");
        assert!(lines[2].contains(" 40 "), "COW/s of vm1: {t}");
        assert!(lines[2].contains(" 25.0 "), "VCPU% of vm1: {t}");
        assert!(lines[2].ends_with("1h00m"), "UPTIME of vm1: {t}");
        assert!(lines[3].contains(" 0s") || lines[3].ends_with("0s"), "{t}");
        assert!(
            lines[3].starts_with(" 2  kid     paused (requested)"),
            "{t}"
        );
        assert!(
            lines[3].contains("40 KiB") && lines[3].contains("80 KiB"),
            "{t}"
        );
        // Without a previous list there are no rates.
        let t = top_table(&stats(), None, &b, 0.0);
        assert!(t.lines().nth(2).unwrap().contains("  -  "), "{t}");
    }

    fn arb_state() -> impl Strategy<Value = VmState> {
        prop_oneof![
            Just(VmState::Running),
            Just(PAUSED),
            Just(VmState::Paused {
                reason: PauseReason::Forked
            }),
            Just(stopped()),
            Just(VmState::Stopped {
                reason: StopReason::Fault("x".into())
            }),
        ]
    }

    /// A list: some of ids 1..=8, each with a parent or none, a name and a state.
    fn arb_list() -> impl Strategy<Value = Vec<VmInfo>> {
        proptest::collection::btree_map(
            1u32..=8,
            (proptest::option::of(1u32..=8), "[a-c]{1,2}", arb_state()),
            0..8,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(id, (p, name, state))| vm(id, p, &name, state))
                .collect()
        })
    }

    proptest! {
        /// Replaying the events from list A on A's view gives B's ids, names and states.
        #[test]
        fn replaying_changes_gives_the_second_list(a in arb_list(), b in arb_list()) {
            let mut v = view(&a);
            replay(&mut v, &changes(&a, &b, 1.0));
            prop_assert_eq!(v, view(&b));
        }
    }
}
