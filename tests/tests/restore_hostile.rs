//! Hostile snapshots (issue 11, item 1): a real VM is dumped, one field of the snapshot is
//! patched the way a crafted file would have it, and the monitor must refuse the restore with a
//! clear error, change nothing (no VM made, `vmfork list` still answers, the dumped VM still
//! runs), and still restore the unmodified file.
//!
//! The state is patched through `vmfork_core::snapshot::SavedVm`, the type the monitor itself
//! decodes the state as (postcard); the test first checks that decoding and re-encoding the
//! real dump gives back the same bytes, so a patched file differs in the one field only.

use vmfork_core::snapshot::{SavedVcpuState, SavedVm};
use vmfork_core::vgic::Vgic;
use vmfork_proto::msg::{ErrorReply, Request, Response, UploadPurpose};
use vmfork_proto::snapshot::{encode_end, encode_run, Snapshot};
use vmfork_proto::CHUNK_SIZE;
use vmfork_tests::proto_client::ProtoClient;
use vmfork_tests::{vmfork_ok, vmfork_run, ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT};

fn encode_with(snap: &Snapshot, state: &SavedVm) -> Vec<u8> {
    let mut s = snap.clone();
    s.header.state = state.encode().expect("encode the state");
    s.encode()
}

/// Uploads `bytes` and asks the monitor itself to restore them (the `vmfork` tool checks the
/// container before sending, so a broken container only reaches the monitor this way).
/// Returns the monitor's error.
fn restore_raw(socket: &ControlSocket, bytes: &[u8]) -> String {
    let mut c = ProtoClient::new(socket, "restore_hostile");
    let begin = Request::UploadBegin {
        purpose: UploadPurpose::Snapshot,
        total_len: bytes.len() as u64,
    };
    let Response::UploadReady { upload } = c.call(begin) else {
        panic!("upload refused");
    };
    for (i, chunk) in bytes.chunks(CHUNK_SIZE).enumerate() {
        let r = c.call(Request::UploadChunk {
            upload,
            offset: (i * CHUNK_SIZE) as u64,
            data: chunk.to_vec(),
        });
        assert!(matches!(r, Response::Ok), "chunk {i}: {r:?}");
    }
    match c.call(Request::Restore {
        upload,
        paused: false,
        remove_on_stop: false,
    }) {
        Response::Error(ErrorReply::BadRequest(e)) => e,
        other => panic!("restore of a broken container answered {other:?}"),
    }
}

/// Runs `vmfork restore` on `bytes`, expecting a refusal whose message contains `why`.
fn refused(socket: &ControlSocket, dir: &std::path::Path, what: &str, bytes: &[u8], why: &str) {
    let file = dir.join(format!("{what}.snap"));
    std::fs::write(&file, bytes).unwrap();
    let out = vmfork_run(socket, &["restore", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    // 7: refused (by the monitor, or by the tool's own check of the container).
    assert_eq!(
        out.status.code(),
        Some(7),
        "{what}: restore should be refused; stdout {:?} stderr {err:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains(why), "{what}: expected `{why}` in {err:?}");
    assert_no_new_vm(socket, what);
}

/// `vmfork list` answers and shows vm1 and no other VM (the dump's own fork is not listed).
fn assert_no_new_vm(socket: &ControlSocket, what: &str) {
    let list = vmfork_ok(socket, &["list"]);
    let ids: Vec<u32> = list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(ids, [1], "{what}: a VM was made or vm1 is gone:\n{list}");
}

#[test]
fn hostile_snapshots_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("vm1.snap");
    let file_s = file.to_str().unwrap();
    let socket = ControlSocket::new();
    let mut q = Qemu::start(
        QemuConfig::monitor()
            .smp(2)
            .mem_mib(512)
            .name("restore_hostile")
            .control(&socket)
            .guest(0, "counter", "mem=16M cpus=2"),
    );
    q.wait_for("[vm1] counter: tick 3", DEFAULT_TIMEOUT);
    vmfork_ok(&socket, &["dump", "1", file_s]);
    q.wait_for("'guest0.dump' snapshot read out", DEFAULT_TIMEOUT);

    let bytes = std::fs::read(&file).unwrap();
    let snap = Snapshot::decode(&bytes).expect("a valid snapshot");
    let state = SavedVm::decode(&snap.header.state).expect("the monitor's state encoding");
    state.validate(snap.header.vcpus).expect("a dump validates");
    assert_eq!(
        encode_with(&snap, &state),
        bytes,
        "decoding and re-encoding a dump must be exact"
    );
    assert_eq!(state.vcpus.len(), 2);

    // PSTATE = EL2h with D, A, I, F masked: restored unchecked, this ran guest code at EL2.
    let mut s = state.clone();
    s.vcpus[0].ctx.regs.pstate = 0x3c9;
    refused(&socket, dir.path(), "el2h", &encode_with(&snap, &s), "EL2");
    // AArch32 and IL.
    let mut s = state.clone();
    s.vcpus[1].ctx.regs.pstate = 0x3d3;
    refused(
        &socket,
        dir.path(),
        "aarch32",
        &encode_with(&snap, &s),
        "AArch32",
    );
    let mut s = state.clone();
    s.vcpus[0].ctx.regs.pstate |= 1 << 20;
    refused(
        &socket,
        dir.path(),
        "il",
        &encode_with(&snap, &s),
        "PSTATE.IL",
    );

    // A vCPU "running" on CPU 1: such a VM could never be torn down.
    let mut s = state.clone();
    s.vcpus[1].state = SavedVcpuState::Running(1);
    refused(
        &socket,
        dir.path(),
        "running",
        &encode_with(&snap, &s),
        "running",
    );

    // MPIDR with bit 31 (RES1 in MPIDR_EL1, never part of the affinity).
    let mut s = state.clone();
    s.vcpus[1].mpidr |= 1 << 31;
    refused(
        &socket,
        dir.path(),
        "mpidr",
        &encode_with(&snap, &s),
        "MPIDR",
    );

    // A vGIC whose nr_irqs (its first field, a postcard varint) disagrees with its SPI table.
    let mut g = postcard::to_allocvec(&state.vgic).unwrap();
    assert_eq!(&g[..2], &[0x80, 0x02], "nr_irqs = 256");
    g[1] = 0x04; // 512
    let mut s = state.clone();
    s.vgic = postcard::from_bytes::<Vgic>(&g).unwrap();
    refused(
        &socket,
        dir.path(),
        "vgic",
        &encode_with(&snap, &s),
        "SPI table",
    );

    // The header and the state disagree on the vCPU count.
    let mut bad = snap.clone();
    bad.header.vcpus = 1;
    refused(&socket, dir.path(), "vcpus", &bad.encode(), "vCPUs");

    // More RAM than the machine has: refused before allocating.
    let mut bad = snap.clone();
    bad.header.mem_bytes = 16 << 30;
    refused(
        &socket,
        dir.path(),
        "mem",
        &bad.encode(),
        "not enough memory",
    );

    // A zero-length page run among the real ones (a file of these exhausted the heap).
    let mut raw = Vec::new();
    snap.header.encode(&mut raw);
    encode_run(0, &[], &mut raw);
    for run in &snap.runs {
        encode_run(run.first_page, &run.data, &mut raw);
    }
    encode_end(&mut raw);
    let err = restore_raw(&socket, &raw);
    assert!(err.contains("empty page run"), "{err}");
    assert_no_new_vm(&socket, "empty_run");

    // Trailing bytes after the state.
    let mut bad = snap.clone();
    bad.header.state.push(0);
    refused(
        &socket,
        dir.path(),
        "trailing",
        &bad.encode(),
        "after the vCPU and device state",
    );

    // The dumped VM kept running through all of it, and the real file still restores.
    let ticks = q.count("[vm1] counter: tick");
    q.wait_for(
        &format!("[vm1] counter: tick {}", ticks + 2),
        DEFAULT_TIMEOUT,
    );
    let id = vmfork_ok(&socket, &["restore", file_s]);
    let id = id.trim();
    // The dump's fork had an id of its own range: the restored VM is the next user id.
    assert_eq!(
        id, "2",
        "vm1 is the only VM made before: nothing else was made"
    );
    let caps = q.wait_for_regex(&format!(r"\[vm{id}\] counter: tick (\d+)"), DEFAULT_TIMEOUT);
    let first: u64 = caps[1].parse().unwrap();
    assert!(first >= 3, "the restored VM started counting at {first}");
    q.kill();
}
