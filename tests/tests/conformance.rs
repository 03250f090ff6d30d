//! One protocol service: the same request script against the real monitor under QEMU and
//! against the same server code (`vmfork_core::machine::server`) run in this process over the
//! machine model on fake memory (`machine::fake`). Their answers must be equal, field for
//! field, except what depends on the machine (frame and heap totals, tick counts, the
//! monitor's name, a dump's length: its state holds the virtual clock).
//!
//! The script creates its VM from a tiny image that loops on WFI and pauses it at once, so
//! nothing a guest does can make the two differ; every fork is made paused.

use std::fmt::Write as _;

use spin::Mutex;
use vmfork_core::machine::fake::FakeHost;
use vmfork_core::machine::fake::InProcess;
use vmfork_core::machine::VmTable;
use vmfork_proto::msg::{Request, Response, UploadPurpose, VmId, VmInfo};
use vmfork_proto::{CHUNK_SIZE, PROTOCOL_VERSION};
use vmfork_tests::proto_client::ProtoClient;
use vmfork_tests::{ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// Something that answers requests.
trait Endpoint {
    fn call(&mut self, req: Request) -> Response;
}

impl Endpoint for ProtoClient {
    fn call(&mut self, req: Request) -> Response {
        ProtoClient::call(self, req)
    }
}

/// The monitor's server, in this process, over fake memory.
impl Endpoint for InProcess<'_> {
    fn call(&mut self, req: Request) -> Response {
        InProcess::call(self, req).unwrap()
    }
}

/// A Linux arm64 `Image` whose entry loops on WFI (code0: `wfi`, code1: `b .-4`).
fn wfi_image() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..4].copy_from_slice(&0xd503_207fu32.to_le_bytes());
    b[4..8].copy_from_slice(&0x17ff_ffffu32.to_le_bytes());
    b[16..24].copy_from_slice(&4096u64.to_le_bytes()); // image_size
    b[56..60].copy_from_slice(b"ARM\x64");
    b
}

fn info_line(i: &VmInfo) -> String {
    format!(
        "vm{} parent={:?} name={} state={:?} vcpus={} mem={} private={} shared={} cow={} forks={} timed={}",
        i.id.0,
        i.parent.map(|p| p.0),
        i.name,
        i.state,
        i.vcpus,
        i.mem_bytes,
        i.private_pages,
        i.shared_pages,
        i.cow_faults,
        i.forks,
        i.last_fork_ticks > 0
    )
}

/// The answer without what depends on the machine.
fn normalized(r: &Response) -> String {
    match r {
        Response::HelloReply { version, .. } => format!("HelloReply v{version}"),
        Response::VmInfo(i) => info_line(i),
        Response::VmList(l) => l.iter().map(info_line).collect::<Vec<_>>().join("; "),
        Response::Stats { global, vm } => format!(
            "Stats vms={} max_vms={} max_forks_per_tree={} hz={} vm={}",
            global.vms,
            global.max_vms,
            global.max_forks_per_tree,
            global.counter_hz,
            vm.as_ref().map_or_else(|| "-".to_string(), info_line)
        ),
        Response::DumpReady { dump, .. } => format!("DumpReady {dump}"),
        other => format!("{other:?}"),
    }
}

fn upload(ep: &mut dyn Endpoint, purpose: UploadPurpose, data: &[u8], log: &mut String) -> u32 {
    let r = ep.call(Request::UploadBegin {
        purpose,
        total_len: data.len() as u64,
    });
    let _ = writeln!(log, "UploadBegin {purpose:?} -> {}", normalized(&r));
    let Response::UploadReady { upload } = r else {
        return 0;
    };
    for (i, c) in data.chunks(CHUNK_SIZE).enumerate() {
        let r = ep.call(Request::UploadChunk {
            upload,
            offset: (i * CHUNK_SIZE) as u64,
            data: c.to_vec(),
        });
        assert_eq!(r, Response::Ok, "chunk {i}");
    }
    upload
}

/// Runs the script; returns one line per request with its normalized answer.
fn script(ep: &mut dyn Endpoint) -> String {
    let mut log = String::new();
    let call = |ep: &mut dyn Endpoint, log: &mut String, req: Request| -> Response {
        let what = format!("{req:?}");
        let what = if what.len() > 80 { &what[..80] } else { &what };
        let r = ep.call(req);
        let _ = writeln!(log, "{what} -> {}", normalized(&r));
        r
    };
    call(
        ep,
        &mut log,
        Request::Hello {
            version: PROTOCOL_VERSION,
            client: "conformance".into(),
        },
    );
    let image = wfi_image();
    let k = upload(ep, UploadPurpose::Kernel, &image, &mut log);
    let create = |kernel, mem_bytes, vcpus| Request::Create {
        kernel,
        initrd: None,
        mem_bytes,
        vcpus,
        cmdline: "console=ttyAMA0".into(),
        paused: false,
        remove_on_stop: false,
    };
    let r = call(ep, &mut log, create(k, 16 << 20, 1));
    assert_eq!(r, Response::Created { vm: VmId(1) }, "{log}");
    call(ep, &mut log, Request::Pause { vm: VmId(1) });
    // Refused: the size and the vCPU count (checked before the upload is taken, so it stays
    // open), an upload already used, one that was never opened.
    let k2 = upload(ep, UploadPurpose::Kernel, &image, &mut log);
    call(ep, &mut log, create(k2, 3 << 20, 1));
    call(ep, &mut log, create(k2, 16 << 20, 9));
    call(ep, &mut log, create(k, 16 << 20, 1));
    call(ep, &mut log, create(77, 16 << 20, 1));
    // Forks, and what the table says about them.
    for (vm, count) in [(1, 2), (1, 0), (9, 1), (1, 5000)] {
        call(
            ep,
            &mut log,
            Request::Fork {
                vm: VmId(vm),
                count,
                paused: true,
                remove_on_stop: false,
            },
        );
    }
    call(ep, &mut log, Request::List);
    for vm in [1, 2, 3, 9] {
        call(ep, &mut log, Request::Info { vm: VmId(vm) });
    }
    call(ep, &mut log, Request::Stats { vm: None });
    call(ep, &mut log, Request::Stats { vm: Some(VmId(2)) });
    call(ep, &mut log, Request::Stats { vm: Some(VmId(9)) });
    call(
        ep,
        &mut log,
        Request::Diff {
            a: VmId(1),
            b: VmId(2),
        },
    );
    call(
        ep,
        &mut log,
        Request::Diff {
            a: VmId(1),
            b: VmId(9),
        },
    );
    for (vm, name) in [(2, "web.1"), (2, "42"), (2, "a b"), (9, "ghost")] {
        call(
            ep,
            &mut log,
            Request::Rename {
                vm: VmId(vm),
                name: name.into(),
            },
        );
    }
    call(ep, &mut log, Request::Info { vm: VmId(2) });
    call(ep, &mut log, Request::Reset { vm: VmId(1) });
    call(ep, &mut log, Request::Reset { vm: VmId(9) });
    call(ep, &mut log, Request::Resume { vm: VmId(9) });
    // The console of a paused VM.
    call(
        ep,
        &mut log,
        Request::ConsoleAttach {
            vm: VmId(2),
            replay: true,
        },
    );
    call(
        ep,
        &mut log,
        Request::ConsoleInput {
            vm: VmId(2),
            data: b"hello\n".to_vec(),
        },
    );
    call(ep, &mut log, Request::ConsoleDetach { vm: VmId(2) });
    call(
        ep,
        &mut log,
        Request::ConsoleAttach {
            vm: VmId(9),
            replay: true,
        },
    );
    // Dump vm1 (from an internal fork, not listed, with an id of its own range), read it out in
    // order, restore it: the restored VM is vm4, the next id.
    let r = call(ep, &mut log, Request::Dump { vm: VmId(1) });
    let Response::DumpReady { dump, total_len } = r else {
        panic!("no dump: {log}");
    };
    call(ep, &mut log, Request::List);
    call(
        ep,
        &mut log,
        Request::DumpRead {
            dump,
            offset: 5,
            max_len: 100,
        },
    );
    let mut snap = Vec::new();
    loop {
        let r = ep.call(Request::DumpRead {
            dump,
            offset: snap.len() as u64,
            max_len: CHUNK_SIZE as u32,
        });
        match r {
            Response::DumpData { data, .. } if data.is_empty() => break,
            Response::DumpData { data, .. } => snap.extend(data),
            other => panic!("dump read: {other:?}\n{log}"),
        }
    }
    assert_eq!(
        snap.len() as u64,
        total_len,
        "the dump is as long as it said"
    );
    call(ep, &mut log, Request::DumpClose { dump });
    call(ep, &mut log, Request::DumpClose { dump });
    call(
        ep,
        &mut log,
        Request::DumpRead {
            dump,
            offset: 0,
            max_len: 10,
        },
    );
    let up = upload(ep, UploadPurpose::Snapshot, &snap, &mut log);
    let r = call(
        ep,
        &mut log,
        Request::Restore {
            upload: up,
            paused: false,
            remove_on_stop: false,
        },
    );
    assert_eq!(r, Response::Created { vm: VmId(4) }, "{log}");
    call(ep, &mut log, Request::Pause { vm: VmId(4) });
    call(
        ep,
        &mut log,
        Request::Diff {
            a: VmId(1),
            b: VmId(4),
        },
    );
    call(
        ep,
        &mut log,
        Request::Restore {
            upload: up,
            paused: false,
            remove_on_stop: false,
        },
    );
    // A snapshot that is not one.
    let bad = upload(
        ep,
        UploadPurpose::Snapshot,
        &snap[..snap.len() / 2],
        &mut log,
    );
    call(
        ep,
        &mut log,
        Request::Restore {
            upload: bad,
            paused: false,
            remove_on_stop: false,
        },
    );
    // Uploads out of bounds.
    call(
        ep,
        &mut log,
        Request::UploadBegin {
            purpose: UploadPurpose::Kernel,
            total_len: 0,
        },
    );
    call(
        ep,
        &mut log,
        Request::UploadChunk {
            upload: 99,
            offset: 0,
            data: vec![1],
        },
    );
    // Kills of paused VMs take effect at once.
    call(ep, &mut log, Request::Kill { vm: VmId(3) });
    call(ep, &mut log, Request::Info { vm: VmId(3) });
    call(ep, &mut log, Request::Kill { vm: VmId(3) });
    call(ep, &mut log, Request::List);
    log
}

#[test]
fn the_monitor_and_the_host_run_of_its_server_answer_the_same() {
    // The host run first: it needs no QEMU.
    let vms = Mutex::new(VmTable::new(FakeHost::new(64 * 1024)));
    let mut here = InProcess::new(&vms);
    let host_log = script(&mut here);

    let socket = ControlSocket::new();
    let cfg = QemuConfig::monitor()
        .smp(2)
        .mem_mib(512)
        .name("conformance")
        .control(&socket);
    let q = Qemu::start(cfg);
    q.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    let mut c = ProtoClient::new(&socket, "conformance");
    let qemu_log = script(&mut c);

    if host_log != qemu_log {
        let mut diff = String::new();
        for (i, (a, b)) in host_log.lines().zip(qemu_log.lines()).enumerate() {
            if a != b {
                let _ = writeln!(diff, "line {i}:\n  host: {a}\n  qemu: {b}");
            }
        }
        panic!(
            "the answers differ:\n{diff}\nhost:\n{host_log}\nqemu:\n{qemu_log}\nserial:\n{}",
            q.serial()
        );
    }
    // The script saw what it meant to: refusals as well as successes.
    assert!(host_log.contains("NoSuchVm(VmId(9))"), "{host_log}");
    assert!(host_log.contains("not a fork"), "{host_log}");
    assert!(host_log.contains("multiple of 2M"), "{host_log}");
}
