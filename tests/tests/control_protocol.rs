//! The monitor's control-protocol server over the real virtio console and QEMU socket: the
//! monitor-side fork/reset/pause/resume/kill API, console streaming, diff, and garbage on the
//! channel. Speaks the protocol directly with `vmfork-proto`.

use std::io::Write;
use std::time::{Duration, Instant};

use vmfork_proto::msg::{ErrorReply, Request, Response, StopReason, VmId, VmState};
use vmfork_proto::PROTOCOL_VERSION;
use vmfork_tests::proto_client::ProtoClient;
use vmfork_tests::{ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT};

fn boot(name: &str, socket: &ControlSocket) -> Qemu {
    let cfg = QemuConfig::monitor()
        .smp(2)
        .mem_mib(1024)
        .name(name)
        .control(socket)
        .guest(0, "counter", "mem=32M");
    let q = Qemu::start(cfg);
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    q
}

#[test]
fn fork_reset_pause_resume_kill_through_the_monitor_api() {
    let socket = ControlSocket::new();
    let mut q = boot("ctl_api", &socket);
    let mut c = ProtoClient::new(&socket, "vmfork-tests");
    q.wait_for("[vm1] counter: tick 2", DEFAULT_TIMEOUT);

    let vms = c.list();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].state, VmState::Running);

    // Fork 8 children of a running VM in one call.
    let children = match c.call(Request::Fork {
        vm: VmId(1),
        count: 8,
        paused: false,
        remove_on_stop: false,
    }) {
        Response::Forked { children } => children,
        other => panic!("fork: {other:?}"),
    };
    assert_eq!(children, (2..=9).map(VmId).collect::<Vec<_>>());
    for vm in 2..=9 {
        q.wait_for_regex(&format!(r"\[vm{vm}\] counter: tick \d+"), DEFAULT_TIMEOUT);
    }
    let vms = c.list();
    assert_eq!(vms.len(), 9);
    let parent = vms.iter().find(|v| v.id == VmId(1)).unwrap();
    assert_eq!(parent.forks, 8);
    assert!(parent.last_fork_ticks > 0);
    assert!(vms.iter().filter(|v| v.parent == Some(VmId(1))).count() == 8);
    assert!(vms.iter().all(|v| v.shared_pages > 0), "{vms:#?}");

    // A paused fork: it does not run until resumed.
    let paused = match c.call(Request::Fork {
        vm: VmId(2),
        count: 1,
        paused: true,
        remove_on_stop: false,
    }) {
        Response::Forked { children } => children[0],
        other => panic!("fork --paused: {other:?}"),
    };
    let info = match c.call(Request::Info { vm: paused }) {
        Response::VmInfo(i) => i,
        other => panic!("info: {other:?}"),
    };
    assert!(matches!(info.state, VmState::Paused { .. }), "{info:?}");
    assert_eq!(info.parent, Some(VmId(2)));
    assert_eq!(
        q.count(&format!("[vm{}] ", paused.0)),
        0,
        "a paused fork printed"
    );
    assert_eq!(c.call(Request::Resume { vm: paused }), Response::Ok);
    q.wait_for(&format!("[vm{}] counter: tick", paused.0), DEFAULT_TIMEOUT);

    // Pause and resume the parent.
    assert_eq!(c.call(Request::Pause { vm: VmId(1) }), Response::Ok);
    let info = match c.call(Request::Info { vm: VmId(1) }) {
        Response::VmInfo(i) => i,
        other => panic!("{other:?}"),
    };
    assert!(matches!(info.state, VmState::Paused { .. }));
    assert_eq!(c.call(Request::Resume { vm: VmId(1) }), Response::Ok);

    // Reset a fork; a VM that is not a fork cannot be reset.
    assert_eq!(c.call(Request::Reset { vm: VmId(3) }), Response::Ok);
    q.wait_for("vm3: reset to its fork point", DEFAULT_TIMEOUT);
    match c.call(Request::Reset { vm: VmId(1) }) {
        Response::Error(ErrorReply::BadRequest(m)) => assert!(m.contains("not a fork"), "{m}"),
        other => panic!("reset of vm1: {other:?}"),
    }

    // Kill the parent: every child goes on.
    assert_eq!(c.call(Request::Kill { vm: VmId(1) }), Response::Ok);
    q.wait_for(
        "vm1: stopping: killed by the control channel",
        DEFAULT_TIMEOUT,
    );
    let before = q.count("[vm5] counter: tick");
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while q.count("[vm5] counter: tick") < before + 2 {
        assert!(
            Instant::now() < deadline,
            "vm5 stopped after its parent was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A killed VM's record: stopped, holding no pages, until removed.
    match c.call(Request::Info { vm: VmId(1) }) {
        Response::VmInfo(i)
            if i.state
                == (VmState::Stopped {
                    reason: StopReason::Killed,
                })
                && i.private_pages + i.shared_pages == 0 => {}
        other => panic!("info of a killed VM: {other:?}"),
    }
    assert_eq!(
        c.call(Request::Remove {
            vm: VmId(1),
            force: false
        }),
        Response::Ok
    );
    match c.call(Request::Info { vm: VmId(1) }) {
        Response::Error(ErrorReply::NoSuchVm(VmId(1))) => {}
        other => panic!("info of a removed VM: {other:?}"),
    }
    match c.call(Request::Fork {
        vm: VmId(42),
        count: 1,
        paused: false,
        remove_on_stop: false,
    }) {
        Response::Error(ErrorReply::NoSuchVm(VmId(42))) => {}
        other => panic!("fork of a missing VM: {other:?}"),
    }
    q.expect_no("panic");
    q.kill();
}

#[test]
fn console_streams_and_diff_counts_pages() {
    let socket = ControlSocket::new();
    let mut q = boot("ctl_console", &socket);
    let mut c = ProtoClient::new(&socket, "vmfork-tests");
    assert_eq!(
        c.call(Request::ConsoleAttach {
            vm: VmId(1),
            replay: true
        }),
        Response::Ok
    );
    let text = c.console_until(1, "counter: tick");
    assert!(text.contains("counter: tick"), "{text}");

    // The parent is paused around the fork and the first diff: a diff runs in steps while
    // guests run, so a running parent could write a page before the diff is done.
    assert_eq!(c.call(Request::Pause { vm: VmId(1) }), Response::Ok);
    let child = match c.call(Request::Fork {
        vm: VmId(1),
        count: 1,
        paused: true,
        remove_on_stop: false,
    }) {
        Response::Forked { children } => children[0],
        other => panic!("{other:?}"),
    };
    // Right after a paused fork the two share every page.
    match c.call(Request::Diff {
        a: VmId(1),
        b: child,
    }) {
        Response::Diff(d) => {
            assert_eq!(d.pages_compared, 32 << 8);
            assert_eq!(d.differing_pages, 0, "{d:?}");
        }
        other => panic!("diff: {other:?}"),
    }
    assert_eq!(c.call(Request::Resume { vm: VmId(1) }), Response::Ok);
    // The parent runs on (its counter and stack pages change); the child does not.
    q.wait_for("[vm1] counter: tick 5", DEFAULT_TIMEOUT);
    match c.call(Request::Diff {
        a: VmId(1),
        b: child,
    }) {
        Response::Diff(d) => {
            assert!(d.differing_pages > 0 && d.differing_pages < 64, "{d:?}");
            let in_ranges: u64 = d.ranges.iter().map(|r| r.pages).sum();
            assert_eq!(in_ranges, d.differing_pages);
        }
        other => panic!("diff: {other:?}"),
    }
    assert_eq!(c.call(Request::ConsoleDetach { vm: VmId(1) }), Response::Ok);
    q.kill();
}

#[test]
fn garbage_and_bad_versions_do_not_wedge_the_monitor() {
    let socket = ControlSocket::new();
    let mut q = boot("ctl_garbage", &socket);
    {
        let mut s = socket.connect(Duration::from_millis(200));
        // Random bytes, a truncated frame, a frame with a huge length, and magic with junk.
        let mut junk: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        junk.extend_from_slice(b"VMFK\x01\x00\x02\x00\x01\x00\x00\x00\xff\xff\xff\x7f");
        junk.extend_from_slice(b"VMFKVMFKVMFK");
        s.write_all(&junk).expect("send garbage");
        let mut out = Vec::new();
        Request::List.encode_frame(7, &mut out).unwrap();
        s.write_all(&out[..out.len() / 2]).expect("half a frame");
        // The client vanishes mid-request.
    }
    // A new client is served, a wrong version gets a clear error, and the VM still runs.
    let mut c = ProtoClient::new(&socket, "vmfork-tests");
    let mut out = Vec::new();
    vmfork_proto::frame::encode_frame(99, vmfork_proto::msg::kind::LIST, 5, &[], &mut out).unwrap();
    c.write_raw(&out);
    let r = c.wait("version mismatch", |id, _| id == 5);
    assert_eq!(
        r,
        Response::Error(ErrorReply::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: 99
        })
    );
    assert_eq!(c.list().len(), 1);
    let ticks = q.count("[vm1] counter: tick");
    q.wait_for(
        &format!("[vm1] counter: tick {}", ticks + 2),
        DEFAULT_TIMEOUT,
    );
    q.expect_no("panic");
    q.kill();
}
