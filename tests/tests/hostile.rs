//! The hostile-guest suite: guests that attack the monitor from EL1 (guest-images `hostile` and
//! `cowmmu`) run beside a well-behaved VM (`counter`). Each attack must get the architected
//! answer (the guests print `PASS`/`FAIL` lines), the well-behaved VM must finish its work, and
//! the monitor must still answer the control channel afterwards.

use vmfork_tests::{
    guest_image, vm_lines, vmfork_ok, wait_count, ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT,
};

fn boot(name: &str, socket: &ControlSocket) -> QemuConfig {
    QemuConfig::monitor()
        .smp(2)
        .mem_mib(512)
        .name(name)
        .control(socket)
}

/// The attacks of `hostile`'s default run; each has a regression check for a fix of issue 11
/// (endian: MMIO byte order with SCTLR_EL1.EE; sgi: ICC_SGI0R/ASGI1R; psci: CPU_ON checks and
/// CPU_SUSPEND; exec: the vmgenid fetch).
const ATTACKS: [&str; 8] = [
    "mmio", "pairs", "endian", "sgi", "psci", "hvc", "ipa", "exec",
];

fn assert_passed(q: &Qemu, vm: u32, attacks: &[&str]) {
    let lines = vm_lines(q, vm);
    let failures: Vec<&String> = lines.iter().filter(|l| l.contains("FAIL")).collect();
    assert!(failures.is_empty(), "vm{vm} failed: {failures:#?}");
    for a in attacks {
        let pass = format!("hostile: PASS {a}");
        assert!(
            lines.iter().any(|l| l.starts_with(&pass)),
            "vm{vm}: no `{pass}` line in {lines:#?}"
        );
    }
    assert!(
        lines.iter().any(|l| l == "hostile: done failed=0"),
        "{lines:#?}"
    );
}

#[test]
fn every_attack_gets_the_architected_answer_and_the_neighbour_runs_on() {
    let socket = ControlSocket::new();
    let cfg = boot("hostile_all", &socket)
        .guest(0, "counter", "mem=16M cmdline=ticks=20")
        .guest(1, "hostile", "mem=32M cpus=2 cmdline=then=spin");
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm2] hostile: done", DEFAULT_TIMEOUT);
    assert_passed(&q, 2, &ATTACKS);
    // The two VMs report in either order.
    wait_count(&q, "[vm1] counter: done 20", 1);
    let list = vmfork_ok(&socket, &["list"]);
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().next() == Some("2")),
        "{list}"
    );
    vmfork_ok(&socket, &["kill", "2"]);
    q.wait_for(
        "vm2: 'guest1' killed by the control channel; destroyed",
        DEFAULT_TIMEOUT,
    );
    q.expect_no("panic");
    q.expect_no("unexpected exception");
    q.kill();
}

/// The monitor's log lines a VM caused: `WARN cpuN: vm2: ...`.
fn warn_lines(q: &Qemu, vm: u32) -> Vec<(f64, String)> {
    let tag = format!(": vm{vm}: ");
    q.serial()
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains(&tag))
        .filter_map(|l| {
            let t = l.trim_start().strip_prefix('[')?.split(']').next()?.trim();
            Some((t.parse().ok()?, l.to_string()))
        })
        .collect()
}

#[test]
fn an_abort_flood_is_rate_limited_and_every_dropped_line_counted() {
    const ABORTS: u64 = 2000;
    let socket = ControlSocket::new();
    let cfg = boot("hostile_flood", &socket)
        .guest(0, "counter", "mem=16M cmdline=ticks=10")
        .guest(
            1,
            "hostile",
            &format!("mem=16M cmdline=attack=flood aborts={ABORTS} then=spin"),
        );
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm2] hostile: done", DEFAULT_TIMEOUT);
    assert_passed(&q, 2, &["flood"]);
    wait_count(&q, "[vm1] counter: done 10", 1);
    vmfork_ok(&socket, &["kill", "2"]);
    q.wait_for(
        "vm2: 'guest1' killed by the control channel; destroyed",
        DEFAULT_TIMEOUT,
    );
    // The kill prints what was still suppressed: every abort is either printed or counted.
    let lines = warn_lines(&q, 2);
    let printed: Vec<&(f64, String)> = lines
        .iter()
        .filter(|(_, l)| l.contains("hits no RAM or device"))
        .collect();
    let suppressed: u64 = lines
        .iter()
        .filter_map(|(_, l)| {
            let (_, rest) = l.split_once(": vm2: ")?;
            rest.strip_suffix(" messages suppressed")?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(
        printed.len() as u64 + suppressed,
        ABORTS,
        "printed {} + suppressed {suppressed} aborts",
        printed.len()
    );
    // At most the burst plus the rate over the time the lines span (from the monitor's own
    // timestamps: a bound on the limiter, whatever the machine's speed).
    let span = printed.last().map_or(0.0, |l| l.0) - printed.first().map_or(0.0, |l| l.0);
    let bound = 20.0 + 10.0 * (span + 1.0);
    assert!(
        (printed.len() as f64) <= bound,
        "{} abort lines printed over {span:.1} s (bound {bound})",
        printed.len()
    );
    q.expect_no("panic");
    q.kill();
}

/// `vmfork stats`' free frames.
fn free_frames(socket: &ControlSocket) -> u64 {
    let stats = vmfork_ok(socket, &["stats"]);
    let line = stats
        .lines()
        .find(|l| l.starts_with("frames:"))
        .unwrap_or_else(|| panic!("no frames line: {stats}"));
    line.split(',')
        .find_map(|part| part.trim().strip_suffix(" free")?.parse().ok())
        .unwrap_or_else(|| panic!("no free count: {line}"))
}

#[test]
fn ten_thousand_hypercalls_then_a_kill_give_every_frame_back() {
    let socket = ControlSocket::new();
    let cfg = boot("hostile_hvc_frames", &socket).guest(0, "counter", "mem=16M");
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm1] counter: tick 1", DEFAULT_TIMEOUT);
    let before = free_frames(&socket);
    let kernel = guest_image("hostile");
    let out = vmfork_ok(
        &socket,
        &[
            "create",
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--mem",
            "32M",
            "--cpus",
            "2",
            "--cmdline",
            "attack=hvc,sgi,psci calls=10000 then=spin",
        ],
    );
    let id: u32 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("create: {out}"));
    q.wait_for(&format!("[vm{id}] hostile: done"), DEFAULT_TIMEOUT);
    assert_passed(&q, id, &["hvc", "sgi", "psci-suspend", "psci"]);
    vmfork_ok(&socket, &["kill", &id.to_string()]);
    // `vmfork create` names the VM after its kernel file by default.
    q.wait_for(
        &format!("vm{id}: 'hostile' killed by the control channel; destroyed"),
        DEFAULT_TIMEOUT,
    );
    // Its record stays, stopped and holding nothing, until removed.
    let listed = |list: &str| {
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
            .map(str::to_string)
    };
    let list = vmfork_ok(&socket, &["list"]);
    let row = listed(&list).unwrap_or_else(|| panic!("no record of vm{id}:\n{list}"));
    assert!(row.contains("stopped (killed)"), "{list}");
    assert_eq!(free_frames(&socket), before, "frames lost to the attacker");
    vmfork_ok(&socket, &["rm", &id.to_string()]);
    let list = vmfork_ok(&socket, &["list"]);
    assert_eq!(listed(&list), None, "{list}");
    // The well-behaved VM went on all along.
    let ticks = q.count("[vm1] counter: tick");
    wait_count(&q, "[vm1] counter: tick", ticks + 2);
    q.expect_no("panic");
    q.kill();
}

#[test]
fn copy_on_write_with_the_guest_mmu_on_atomics_exclusives_and_zva_in_both_vms() {
    let socket = ControlSocket::new();
    let cfg = boot("hostile_cowmmu", &socket)
        .guest(0, "counter", "mem=16M cmdline=ticks=20")
        .guest(1, "cowmmu", "mem=32M cpus=2");
    let mut q = Qemu::start(cfg);
    wait_count(&q, "cowmmu: parent PASS", 1);
    wait_count(&q, "cowmmu: child PASS", 1);
    wait_count(&q, "[vm1] counter: done 20", 1);
    let serial = q.serial();
    assert!(!serial.contains("cowmmu: FAIL"), "{serial}");
    // The stage-1 walks over shared tables set Access flags: the test ran with FEAT_HAFDBS.
    assert!(serial.contains("cowmmu: mmu on ha=true"), "{serial}");
    let list = vmfork_ok(&socket, &["list"]);
    assert!(list.contains("ID"), "{list}");
    q.expect_no("panic");
    q.kill();
}
