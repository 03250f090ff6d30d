//! Golden bytes: one value of every request, response, error and state variant, encoded as a
//! whole frame and compared with `tests/fixtures/golden.txt` (one line per message: name, then
//! the frame in hex). Each line is also decoded back and must equal the value. Any change in the
//! wire bytes fails this test; when the change is meant (a protocol revision), regenerate with
//! `VMFORK_BLESS=1 cargo test -p vmfork-proto --test golden` and review the diff.
//!
//! The `*_name` helpers match exhaustively, so a new variant does not compile until it is named
//! here; the count checks then fail until it has a sample and a fixture line.
mod common;

use common::*;
use vmfork_proto::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden.txt");
const ID: u32 = 0xA1B2_C3D4;

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Hello { .. } => "Hello",
        Request::List => "List",
        Request::Info { .. } => "Info",
        Request::Stats { .. } => "Stats",
        Request::Fork { .. } => "Fork",
        Request::Pause { .. } => "Pause",
        Request::Resume { .. } => "Resume",
        Request::Reset { .. } => "Reset",
        Request::Kill { .. } => "Kill",
        Request::UploadBegin { .. } => "UploadBegin",
        Request::UploadChunk { .. } => "UploadChunk",
        Request::Create { .. } => "Create",
        Request::ConsoleAttach { .. } => "ConsoleAttach",
        Request::ConsoleDetach { .. } => "ConsoleDetach",
        Request::ConsoleInput { .. } => "ConsoleInput",
        Request::Dump { .. } => "Dump",
        Request::DumpRead { .. } => "DumpRead",
        Request::DumpClose { .. } => "DumpClose",
        Request::Restore { .. } => "Restore",
        Request::Diff { .. } => "Diff",
        Request::Rename { .. } => "Rename",
        Request::Remove { .. } => "Remove",
    }
}
const REQUEST_VARIANTS: usize = 22;

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::HelloReply { .. } => "HelloReply",
        Response::Ok => "Ok",
        Response::VmList(_) => "VmList",
        Response::VmInfo(_) => "VmInfo",
        Response::Stats { .. } => "StatsReply",
        Response::Forked { .. } => "Forked",
        Response::Created { .. } => "Created",
        Response::UploadReady { .. } => "UploadReady",
        Response::DumpReady { .. } => "DumpReady",
        Response::DumpData { .. } => "DumpData",
        Response::Diff(_) => "DiffReply",
        Response::ConsoleOutput { .. } => "ConsoleOutput",
        Response::ConsoleClosed { .. } => "ConsoleClosed",
        Response::Error(e) => match e {
            ErrorReply::NoSuchVm(_) => "Error.NoSuchVm",
            ErrorReply::OutOfMemory => "Error.OutOfMemory",
            ErrorReply::VersionMismatch { .. } => "Error.VersionMismatch",
            ErrorReply::BadRequest(_) => "Error.BadRequest",
            ErrorReply::Busy => "Error.Busy",
            ErrorReply::Internal(_) => "Error.Internal",
            ErrorReply::VmStopped(_) => "Error.VmStopped",
        },
    }
}
/// 13 non-error responses + 7 error replies.
const RESPONSE_VARIANTS: usize = 20;

fn state_name(s: &VmState) -> &'static str {
    match s {
        VmState::Running => "Running",
        VmState::Paused { reason } => match reason {
            PauseReason::Requested => "Paused.Requested",
            PauseReason::Forked => "Paused.Forked",
            PauseReason::Restored => "Paused.Restored",
            PauseReason::Created => "Paused.Created",
            PauseReason::OutOfMemory => "Paused.OutOfMemory",
        },
        VmState::Stopped { reason } => match reason {
            StopReason::PowerOff => "Stopped.PowerOff",
            StopReason::Fault(_) => "Stopped.Fault",
            StopReason::OutOfMemory => "Stopped.OutOfMemory",
            StopReason::Killed => "Stopped.Killed",
            StopReason::SystemReset => "Stopped.SystemReset",
            StopReason::Internal(_) => "Stopped.Internal",
        },
    }
}
const STATE_VARIANTS: usize = 12;

fn purpose_name(p: UploadPurpose) -> &'static str {
    match p {
        UploadPurpose::Kernel => "Kernel",
        UploadPurpose::Initrd => "Initrd",
        UploadPurpose::Snapshot => "Snapshot",
    }
}

fn states() -> Vec<VmState> {
    vec![
        VmState::Running,
        VmState::Paused {
            reason: PauseReason::Requested,
        },
        VmState::Paused {
            reason: PauseReason::Forked,
        },
        VmState::Paused {
            reason: PauseReason::Restored,
        },
        VmState::Paused {
            reason: PauseReason::Created,
        },
        VmState::Paused {
            reason: PauseReason::OutOfMemory,
        },
        VmState::Stopped {
            reason: StopReason::PowerOff,
        },
        VmState::Stopped {
            reason: StopReason::Fault("ESR 0x96000045 FAR 0xdead ELR 0xbeef".into()),
        },
        VmState::Stopped {
            reason: StopReason::OutOfMemory,
        },
        VmState::Stopped {
            reason: StopReason::Killed,
        },
        VmState::Stopped {
            reason: StopReason::SystemReset,
        },
        VmState::Stopped {
            reason: StopReason::Internal("stage-2 walk failed".into()),
        },
    ]
}

fn info(n: u32, state: VmState) -> VmInfo {
    let b = u64::from(n) << 8;
    VmInfo {
        id: VmId(0x1000 + n),
        parent: if n.is_multiple_of(2) {
            None
        } else {
            Some(VmId(0x0F00 + n))
        },
        name: format!("vm-{n}.é"),
        state,
        vcpus: 0x0300 + n,
        mem_bytes: 0x1122_3344_5566_7788 ^ b,
        private_pages: 0x0102_0304_0506_0708 ^ b,
        shared_pages: 0x1112_1314_1516_1718 ^ b,
        cow_faults: 0x2122_2324_2526_2728 ^ b,
        forks: 0x3132_3334_3536_3738 ^ b,
        last_fork_ticks: 0x4142_4344_4546_4748 ^ b,
        uptime_us: 0x5152_5354_5556_5758 ^ b,
        vcpu_us: 0x6162_6364_6566_6768 ^ b,
    }
}

fn global() -> GlobalStats {
    GlobalStats {
        free_frames: 0x0A0A_0000_0000_0001,
        used_frames: 0x0B0B_0000_0000_0002,
        total_frames: 0x0C0C_0000_0000_0003,
        vms: 0x0D0D_0004,
        counter_hz: 62_500_000,
        heap_used: 0x0E0E_0000_0000_0005,
        heap_free: 0x0F0F_0000_0000_0006,
        heap_reserve: 0x1010_0000_0000_0007,
        max_vms: 0x1111_0008,
        max_forks_per_tree: 0x1212_0009,
        stopped_vms: 0x1313_000A,
        max_stopped: 0x1414_000B,
    }
}

fn requests() -> Vec<(String, Request)> {
    let mut v = vec![
        Request::Hello {
            version: 0xBEEF,
            client: "golden client 1.2.3".into(),
        },
        Request::List,
        Request::Info {
            vm: VmId(0x0102_0304),
        },
        Request::Stats { vm: None },
        Request::Stats {
            vm: Some(VmId(0x0506_0708)),
        },
        Request::Fork {
            vm: VmId(0x1111_2222),
            count: 0x3333_4444,
            paused: true,
            remove_on_stop: false,
        },
        Request::Pause {
            vm: VmId(0x0000_0011),
        },
        Request::Resume {
            vm: VmId(0x0000_0022),
        },
        Request::Reset {
            vm: VmId(0x0000_0033),
        },
        Request::Kill {
            vm: VmId(0x0000_0044),
        },
    ];
    for (i, p) in [
        UploadPurpose::Kernel,
        UploadPurpose::Initrd,
        UploadPurpose::Snapshot,
    ]
    .into_iter()
    .enumerate()
    {
        v.push(Request::UploadBegin {
            purpose: p,
            total_len: 0x0102_0304_0506_0700 + i as u64,
        });
    }
    v.extend([
        Request::UploadChunk {
            upload: 0x5555_6666,
            offset: 0x7777_8888_9999_AAAA,
            data: vec![0x00, 0x01, 0xFE, 0xFF, 0x7F, 0x80],
        },
        Request::Create {
            kernel: 0x0000_0101,
            initrd: None,
            mem_bytes: 0x0000_0001_0000_0000,
            vcpus: 4,
            cmdline: "console=hvc0 quiet".into(),
            paused: false,
            remove_on_stop: true,
        },
        Request::Create {
            kernel: 0x0000_0202,
            initrd: Some(0x0000_0303),
            mem_bytes: 0x0000_0000_4000_0000,
            vcpus: 1,
            cmdline: String::new(),
            paused: true,
            remove_on_stop: false,
        },
        Request::ConsoleAttach {
            vm: VmId(0x0000_0055),
            replay: true,
        },
        Request::ConsoleDetach {
            vm: VmId(0x0000_0066),
        },
        Request::ConsoleInput {
            vm: VmId(0x0000_0077),
            data: b"ls -l\r\n".to_vec(),
        },
        Request::Dump {
            vm: VmId(0x0000_0088),
        },
        Request::DumpRead {
            dump: 0xCAFE_0001,
            offset: 0xFEED_FACE_0000_0002,
            max_len: 0x0001_0000,
        },
        Request::DumpClose { dump: 0xCAFE_0003 },
        Request::Restore {
            upload: 0xCAFE_0004,
            paused: true,
            remove_on_stop: true,
        },
        Request::Diff {
            a: VmId(0xAAAA_0001),
            b: VmId(0xBBBB_0002),
        },
        Request::Rename {
            vm: VmId(0x0000_0099),
            name: String::from("web.1"),
        },
        Request::Remove {
            vm: VmId(0x0000_00AB),
            force: true,
        },
    ]);
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    v.into_iter()
        .map(|r| {
            let name = request_name(&r);
            let n = seen.entry(name).or_default();
            *n += 1;
            (format!("req.{name}.{n}"), r)
        })
        .collect()
}

fn responses() -> Vec<(String, Response)> {
    let mut v = vec![
        Response::HelloReply {
            version: 0xFACE,
            monitor: "golden monitor 9.8.7".into(),
        },
        Response::Ok,
        Response::VmList(Vec::new()),
        // Every VM state goes on the wire inside a VmInfo: one list carries them all.
        Response::VmList(
            states()
                .into_iter()
                .enumerate()
                .map(|(i, s)| info(i as u32, s))
                .collect(),
        ),
        Response::VmInfo(info(
            9,
            VmState::Paused {
                reason: PauseReason::Forked,
            },
        )),
        Response::Stats {
            global: global(),
            vm: None,
        },
        Response::Stats {
            global: global(),
            vm: Some(info(10, VmState::Running)),
        },
        Response::Forked {
            children: Vec::new(),
        },
        Response::Forked {
            children: vec![VmId(0x0000_0101), VmId(0x0000_0102), VmId(0xFFFF_FFFF)],
        },
        Response::Created {
            vm: VmId(0x0BAD_F00D),
        },
        Response::UploadReady {
            upload: 0x1234_5678,
        },
        Response::DumpReady {
            dump: 0x8765_4321,
            total_len: 0x0000_0123_4567_89AB,
        },
        Response::DumpData {
            dump: 0x8765_4321,
            offset: 0x0000_0000_0001_0000,
            data: vec![0xDE, 0xAD, 0xBE, 0xEF],
        },
        Response::DumpData {
            dump: 0x8765_4321,
            offset: 0x0000_0123_4567_89AB,
            data: Vec::new(),
        },
        Response::Diff(DiffReport {
            ram_base: 0x4000_0000,
            pages_compared: 0x0004_0000,
            differing_pages: 0x0000_0107,
            ranges: vec![
                PageRange {
                    first_page: 0x0000_0001,
                    pages: 0x0000_0002,
                },
                PageRange {
                    first_page: 0x0003_FFFF,
                    pages: 0x0000_0105,
                },
            ],
            truncated: true,
        }),
        Response::Diff(DiffReport {
            ram_base: 0x8000_0000,
            pages_compared: 0,
            differing_pages: 0,
            ranges: Vec::new(),
            truncated: false,
        }),
        Response::ConsoleOutput {
            vm: VmId(0x0000_0099),
            data: b"login: \x1b[0m\n".to_vec(),
        },
        Response::ConsoleClosed {
            vm: VmId(0x0000_00AA),
            reason: "powered off (PSCI SYSTEM_OFF)".into(),
        },
    ];
    v.extend(
        [
            ErrorReply::NoSuchVm(VmId(0xDEAD_0001)),
            ErrorReply::OutOfMemory,
            ErrorReply::VersionMismatch {
                ours: 0x0001,
                theirs: 0x0102,
            },
            ErrorReply::BadRequest("unknown message kind 0x1234".into()),
            ErrorReply::Busy,
            ErrorReply::Internal("frame table corrupt".into()),
            ErrorReply::VmStopped(VmId(0x0000_00BC)),
        ]
        .map(Response::Error),
    );
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    v.into_iter()
        .map(|r| {
            let name = response_name(&r);
            let n = seen.entry(name).or_default();
            *n += 1;
            (format!("resp.{name}.{n}"), r)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn one_frame(bytes: &[u8], max: u32) -> Frame {
    let mut dec = Decoder::with_max_payload(max);
    let (frames, errors) = decode_all(&mut dec, bytes, &[]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(frames.len(), 1);
    assert_eq!(dec.buffered(), 0);
    frames.into_iter().next().unwrap()
}

#[test]
fn samples_cover_every_variant() {
    use std::collections::HashSet;
    let reqs = requests();
    let r: HashSet<_> = reqs.iter().map(|(_, r)| request_name(r)).collect();
    assert_eq!(r.len(), REQUEST_VARIANTS, "a request variant has no sample");
    let resps = responses();
    let r: HashSet<_> = resps.iter().map(|(_, r)| response_name(r)).collect();
    assert_eq!(
        r.len(),
        RESPONSE_VARIANTS,
        "a response variant has no sample"
    );
    let mut s = HashSet::new();
    for (_, resp) in &resps {
        if let Response::VmList(l) = resp {
            s.extend(l.iter().map(|i| state_name(&i.state)));
        }
    }
    assert_eq!(s.len(), STATE_VARIANTS, "a VM state has no sample");
    let p: HashSet<_> = reqs
        .iter()
        .filter_map(|(_, r)| match r {
            Request::UploadBegin { purpose, .. } => Some(purpose_name(*purpose)),
            _ => None,
        })
        .collect();
    assert_eq!(p.len(), 3, "an upload purpose has no sample");
}

#[test]
fn golden_bytes() {
    let mut lines = Vec::new();
    for (name, req) in requests() {
        let mut b = Vec::new();
        req.encode_frame(ID, &mut b).unwrap();
        lines.push((name, hex(&b)));
    }
    for (name, resp) in responses() {
        let mut b = Vec::new();
        resp.encode_frame(ID, &mut b).unwrap();
        lines.push((name, hex(&b)));
    }
    let text: String = lines.iter().map(|(n, h)| format!("{n} {h}\n")).collect();
    if std::env::var_os("VMFORK_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(FIXTURE, &text).unwrap();
        return;
    }
    let fixture = std::fs::read_to_string(FIXTURE)
        .expect("tests/fixtures/golden.txt missing: run with VMFORK_BLESS=1 to create it");
    let want: Vec<(&str, &str)> = fixture
        .lines()
        .map(|l| l.split_once(' ').expect("fixture line: name hex"))
        .collect();
    let got: Vec<(&str, &str)> = lines
        .iter()
        .map(|(n, h)| (n.as_str(), h.as_str()))
        .collect();
    let want_names: Vec<_> = want.iter().map(|(n, _)| *n).collect();
    let got_names: Vec<_> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(got_names, want_names, "the set of golden messages changed");
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert_eq!(g, w, "{name}: encoding differs from the golden bytes");
    }
}

#[test]
fn golden_fixture_decodes_to_the_values() {
    let fixture = std::fs::read_to_string(FIXTURE).expect("tests/fixtures/golden.txt");
    let mut lines = fixture
        .lines()
        .map(|l| l.split_once(' ').expect("fixture line: name hex"));
    for (name, req) in requests() {
        let (n, h) = lines.next().expect("fixture line missing");
        assert_eq!(n, name);
        let f = one_frame(&unhex(h), MAX_REQUEST_PAYLOAD);
        assert_eq!(f.id, ID, "{name}");
        assert_eq!(f.version, PROTOCOL_VERSION, "{name}");
        assert_eq!(f.kind, req.kind(), "{name}");
        assert_eq!(decode_request(&f), Ok(req), "{name}");
    }
    for (name, resp) in responses() {
        let (n, h) = lines.next().expect("fixture line missing");
        assert_eq!(n, name);
        let f = one_frame(&unhex(h), MAX_PAYLOAD);
        assert_eq!(f.id, ID, "{name}");
        assert_eq!(f.version, PROTOCOL_VERSION, "{name}");
        assert_eq!(f.kind, resp.kind(), "{name}");
        assert_eq!(Response::decode(f.kind, &f.payload), Ok(resp), "{name}");
    }
    assert!(lines.next().is_none(), "fixture has extra lines");
}
