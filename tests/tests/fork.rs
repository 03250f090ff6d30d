//! Forking running VMs under the monitor: copy-on-write seen from inside the guests (cowcheck),
//! fork trees with parents killed first, reset to the fork point, fork churn that gives every
//! frame back, and running out of memory.

use vmfork_tests::{complete_lines, wait_count, Qemu, QemuConfig, DEFAULT_TIMEOUT};

fn monitor(name: &str) -> QemuConfig {
    QemuConfig::monitor().smp(2).mem_mib(1024).name(name)
}

fn position(q: &Qemu, pattern: &str) -> usize {
    q.serial()
        .find(pattern)
        .unwrap_or_else(|| panic!("`{pattern}` is not in the log"))
}

#[test]
fn cowcheck_parent_and_child_see_only_their_own_writes() {
    // Two vCPUs per VM on two physical CPUs: after the fork, parent and child vCPUs write the
    // same pages at the same time; each VM checks every word, the untouched pages, and a
    // patched code page.
    let mut q = Qemu::start(monitor("cowcheck").guest(0, "cowcheck", "cpus=2 cmdline=mib=4"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    wait_count(&q, "powered off (PSCI SYSTEM_OFF); destroyed", 2);
    for line in [
        "[vm1] cowcheck: filled mib=4 cpus=2",
        "[vm1] cowcheck: parent vm=1 child=2",
        "[vm2] cowcheck: child vm=2 parent=1 generation=1",
        "[vm1] cowcheck: code ok value=43",
        "[vm2] cowcheck: code ok value=44",
        "[vm1] cowcheck: parent ok",
        "[vm2] cowcheck: child ok",
    ] {
        assert_eq!(q.count(line), 1, "missing or repeated: {line}");
    }
    q.expect_no("FAIL");
    q.expect_no("exception:");
    // Every frame came back once both were gone.
    let lines = complete_lines(&q);
    let last = lines
        .iter()
        .rev()
        .find(|l| l.contains("frames free"))
        .expect("a teardown line");
    let (free, total) = frames(last);
    assert_eq!(free, total, "{last}");
    q.kill();
}

/// `frames free A of B` in a log line.
fn frames(line: &str) -> (u64, u64) {
    let rest = &line[line.find("frames free ").expect("frames free") + 12..];
    let mut it = rest.split_whitespace();
    let free = it.next().unwrap().parse().unwrap();
    assert_eq!(it.next(), Some("of"));
    let total = it.next().unwrap().parse().unwrap();
    (free, total)
}

#[test]
fn fork_tree_three_deep_survives_its_parents_dying_first() {
    let mut q =
        Qemu::start(monitor("fork_tree").guest(0, "forkloop", "mem=16M cmdline=mode=tree depth=3"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    q.wait_for("[vm4] forkloop: depth 3 ok vm=4", DEFAULT_TIMEOUT);
    // Each parent powered off (and was torn down) before its child finished.
    for (parent, child) in [(1, 2), (2, 3), (3, 4)] {
        // "vmN: '<name>' powered off ...; destroyed" is the parent's teardown line.
        let parent_down = position(&q, &format!("vm{parent}: 'guest0"));
        let child_done = position(&q, "[vm4] forkloop: depth 3 ok");
        assert!(
            parent_down < child_done,
            "vm{parent} outlived the last child"
        );
        assert_eq!(
            q.count(&format!("forked vm{child}")),
            2,
            "vm{parent} did not fork vm{child} once (monitor and guest lines)"
        );
    }
    wait_count(&q, "powered off (PSCI SYSTEM_OFF); destroyed", 4);
    q.expect_no("FAIL");
    q.kill();
}

#[test]
fn reset_brings_back_the_fork_point_memory() {
    let mut q = Qemu::start(monitor("fork_reset").guest(
        0,
        "forkloop",
        "mem=16M cmdline=mode=reset resets=3 mib=2",
    ));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    q.wait_for("[vm2] forkloop: reset ok resets=3", DEFAULT_TIMEOUT);
    for r in 0..=3 {
        assert_eq!(
            q.count(&format!("[vm2] forkloop: child clean after resets={r}")),
            1,
            "iteration {r}"
        );
    }
    assert_eq!(q.count("vm2: reset to its fork point"), 3);
    q.expect_no("FAIL");
    q.kill();
}

#[test]
fn a_thousand_forks_and_kills_give_every_frame_back() {
    let mut q = Qemu::start(monitor("fork_churn").append("log=debug").guest(
        0,
        "forkloop",
        "mem=16M cmdline=mode=churn forks=1000",
    ));
    let boot = q.wait_for_regex(r"frames: (\d+) free of (\d+)", DEFAULT_TIMEOUT);
    q.wait_for("[vm1] forkloop: churn forks=1000 done", DEFAULT_TIMEOUT);
    wait_count(&q, "powered off (PSCI SYSTEM_OFF); destroyed", 1001);
    let lines = complete_lines(&q);
    let last = lines
        .iter()
        .rev()
        .find(|l| l.contains("frames free"))
        .expect("a teardown line");
    let (free, total) = frames(last);
    assert_eq!(
        free.to_string(),
        boot[1],
        "free frames after 1000 forks: {last}"
    );
    assert_eq!(total.to_string(), boot[2]);
    q.expect_no("FAIL");
    q.kill();
}

#[test]
fn out_of_memory_pauses_only_the_faulting_fork_and_a_failing_fork_changes_nothing() {
    // 256 MiB of RAM: after the monitor's heap and a 160 MiB guest there is not enough left for
    // its child to copy 128 MiB of pages.
    let cfg = QemuConfig::monitor().smp(2).mem_mib(256).name("fork_oom");
    let cfg = cfg.guest(
        0,
        "forkloop",
        "mem=160M cmdline=mode=reset resets=1 mib=128",
    );
    let cfg = cfg.guest(1, "counter", "mem=8M cmdline=ticks=10");
    let mut q = Qemu::start(cfg);
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let paused = q.wait_for(
        "vm3: paused: no free frame for a copy-on-write fault",
        DEFAULT_TIMEOUT,
    );
    assert!(paused.contains("WARN"), "{paused}");
    // The other VM is not affected.
    wait_count(&q, "[vm2] counter: done 10", 1);
    q.expect_no("forkloop: reset ok");
    q.expect_no("panic");
    q.kill();
}

#[test]
fn a_child_gets_a_new_vmgenid_and_the_parent_keeps_its_own() {
    let mut q =
        Qemu::start(monitor("fork_vmgenid").guest(0, "forkloop", "mem=16M cmdline=mode=genid"));
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    wait_count(&q, "powered off (PSCI SYSTEM_OFF); destroyed", 2);
    assert_eq!(q.count("[vm1] forkloop: parent vmgenid unchanged"), 1);
    assert_eq!(q.count("[vm2] forkloop: child vmgenid changed"), 1);
    q.expect_no("FAIL");
    q.kill();
}
