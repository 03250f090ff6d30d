//! Every fork and reset request gets exactly one answer (issue 11, item 5): two vCPUs forking at
//! the same instant, `vmfork reset` sent while a child resets itself in a loop, and a VM killed
//! while a fork of it waits for its vCPUs to leave the CPUs.

use std::time::{Duration, Instant};

use vmfork_proto::msg::{Request, Response, VmId};
use vmfork_tests::proto_client::ProtoClient;
use vmfork_tests::{vmfork_ok, wait_count, ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT};

#[test]
fn two_vcpus_forking_at_once_each_get_an_answer_in_parent_and_child() {
    // Before the fix the second vCPU got its own function ID back in X0, in parent and child.
    let rounds = 100;
    let mut q = Qemu::start(
        QemuConfig::monitor()
            .smp(2)
            .mem_mib(512)
            .name("ops_forkrace")
            .guest(
                0,
                "forkrace",
                &format!("mem=16M cpus=2 cmdline=rounds={rounds}"),
            ),
    );
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    q.wait_for_regex(r"forkrace: (rounds=\d+ done|FAIL)", DEFAULT_TIMEOUT);
    q.expect_no("FAIL");
    for r in 1..=rounds {
        // The original and at least one child report round r.
        wait_count(&q, &format!("forkrace: round {r} vm="), 2);
    }
    wait_count(&q, &format!("[vm1] forkrace: rounds={rounds} done"), 1);
    q.expect_no("FAIL");
    q.expect_no("unanswered");
    q.kill();
}

#[test]
fn reset_requests_while_a_child_resets_itself_are_all_answered() {
    // Before the fix the child's own VMFORK_RESET overwrote a waiting `vmfork reset`, which
    // then never got a reply (4 of 8 in the issue): the child is in that call nearly always.
    // Three CPUs: the spinning parent and the child each have one, and the boot CPU serves the
    // channel, so the requests arrive while the child is on a CPU.
    let socket = ControlSocket::new();
    let mut q = Qemu::start(
        QemuConfig::monitor()
            .smp(3)
            .mem_mib(512)
            .name("ops_reset_loop")
            // Not a line per reset: the monitor's time per reset is then short, and the child
            // is in its reset call most of the time.
            .append("log=warn")
            .control(&socket)
            .guest(0, "forkrace", "mem=16M cmdline=mode=resetloop"),
    );
    q.wait_for("[vm1] forkrace: parent spins", DEFAULT_TIMEOUT);
    for _ in 0..32 {
        vmfork_ok(&socket, &["reset", "2"]);
    }
    // The child goes on resetting itself (no `vmfork reset` failed, none was lost).
    assert!(vmfork_ok(&socket, &["info", "2"]).contains("running"));
    q.expect_no("FAIL");
    q.kill();
}

#[test]
fn a_vm_killed_while_a_fork_of_it_waits_answers_that_fork_at_once() {
    // The fork waits for the VM's two spinning vCPUs to leave the CPUs; the kill comes right
    // behind it in the same write. Before the fix, whenever the kill won, the fork was dropped
    // with the VM and its client waited forever (120 s for the tool).
    let socket = ControlSocket::new();
    let mut q = Qemu::start(
        QemuConfig::monitor()
            .smp(3)
            .mem_mib(512)
            .name("ops_kill_waiting")
            .control(&socket)
            .guest(0, "forkrace", "mem=16M cpus=2 cmdline=mode=spin"),
    );
    q.wait_for("[vm1] forkrace: spinning", DEFAULT_TIMEOUT);
    let mut c = ProtoClient::new(&socket, "vmfork-tests ops");
    // The original stays paused; each round forks a running copy that has the CPUs to itself.
    assert_eq!(c.call(Request::Pause { vm: VmId(1) }), Response::Ok);
    let (mut ran, mut failed) = (0, 0);
    for round in 0..12 {
        let child = match c.call(Request::Fork {
            vm: VmId(1),
            count: 1,
            paused: false,
            remove_on_stop: false,
        }) {
            Response::Forked { children } => children[0],
            other => panic!("fork of vm1: {other:?}"),
        };
        // Let its vCPUs get onto the CPUs (not a condition of the test, only of the race).
        std::thread::sleep(Duration::from_millis(30));
        let ids = c.send_all(&[
            Request::Fork {
                vm: child,
                count: 1,
                paused: true,
                remove_on_stop: false,
            },
            Request::Kill { vm: child },
        ]);
        assert_eq!(c.reply(ids[1]), Response::Ok, "kill of {child}");
        // Whatever happened to the fork (it ran first, or the kill came first), its answer was
        // sent no later than the kill's: a request sent now is answered after it.
        let list = c.send_all(&[Request::List])[0];
        let listed = c.reply(list);
        assert!(matches!(listed, Response::VmList(_)), "{listed:?}");
        let Some(fork) = c.take_read(ids[0]) else {
            panic!("round {round}: the fork of {child} was not answered when {child} was killed")
        };
        match fork {
            Response::Forked { children } => {
                ran += 1;
                for g in children {
                    assert_eq!(c.call(Request::Kill { vm: g }), Response::Ok);
                }
            }
            Response::Error(e) => {
                failed += 1;
                assert!(e.to_string().contains("torn down"), "round {round}: {e}");
            }
            other => panic!("round {round}: fork of {child}: {other:?}"),
        }
    }
    eprintln!("forks that ran before the kill: {ran}; failed by the kill: {failed}");
    // The monitor still serves, and only the paused original is left live once the last killed
    // child is torn down (teardown waits for its vCPUs to leave the CPUs, after the kill's Ok);
    // the killed ones stay listed as stopped.
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let live = |v: &[vmfork_proto::VmInfo]| {
        v.iter()
            .filter(|i| !matches!(i.state, vmfork_proto::VmState::Stopped { .. }))
            .count()
    };
    loop {
        match c.call(Request::List) {
            Response::VmList(v) if live(&v) == 1 => break,
            Response::VmList(v) => assert!(Instant::now() < deadline, "{v:?}"),
            other => panic!("list: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    q.kill();
}

#[test]
fn a_reset_child_sees_a_new_vmgenid_after_the_fork_and_every_reset() {
    // Before the fix a reset child's vmgenid page was the fork point's again: the parent's ID.
    let resets = 3;
    let mut q = Qemu::start(
        QemuConfig::monitor()
            .smp(2)
            .mem_mib(512)
            .name("ops_genid_reset")
            .guest(
                0,
                "forkloop",
                &format!("mem=16M cmdline=mode=genidreset resets={resets}"),
            ),
    );
    q.wait_for_regex(r"forkloop: (genid reset ok|FAIL)", DEFAULT_TIMEOUT);
    q.expect_no("FAIL");
    let log = q.serial();
    let id_of = |line: &str| {
        line.rsplit_once("vmgenid=")
            .map(|(_, id)| id.trim().to_string())
    };
    let parent = log
        .lines()
        .find(|l| l.contains("[vm1] forkloop: parent vmgenid="))
        .and_then(id_of)
        .expect("the parent's ID");
    let mut ids: Vec<String> = (0..=resets)
        .map(|r| {
            let pat = format!("[vm2] forkloop: child resets={r} vmgenid=");
            log.lines()
                .find(|l| l.contains(&pat))
                .and_then(id_of)
                .unwrap_or_else(|| panic!("no `{pat}` line"))
        })
        .collect();
    ids.push(parent);
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an ID was shown twice: {ids:?}");
    q.kill();
}
