//! proptest strategies for every protocol type, shared by the test files.
#![allow(dead_code)]

use proptest::collection::vec;
use proptest::prelude::*;
use vmfork_proto::*;

pub fn vm_id() -> impl Strategy<Value = VmId> {
    any::<u32>().prop_map(VmId)
}

pub fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

pub fn chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..64),
        vec(any::<u8>(), CHUNK_SIZE..=CHUNK_SIZE)
    ]
}

pub fn state() -> impl Strategy<Value = VmState> {
    prop_oneof![
        Just(VmState::Running),
        prop_oneof![
            Just(PauseReason::Requested),
            Just(PauseReason::Forked),
            Just(PauseReason::Restored),
            Just(PauseReason::Created),
            Just(PauseReason::OutOfMemory)
        ]
        .prop_map(|reason| VmState::Paused { reason }),
        prop_oneof![
            Just(StopReason::PowerOff),
            Just(StopReason::OutOfMemory),
            text().prop_map(StopReason::Fault),
            Just(StopReason::Killed),
            Just(StopReason::SystemReset),
            text().prop_map(StopReason::Internal)
        ]
        .prop_map(|reason| VmState::Stopped { reason }),
    ]
}

pub fn info() -> impl Strategy<Value = VmInfo> {
    (
        vm_id(),
        proptest::option::of(vm_id()),
        text(),
        state(),
        any::<u32>(),
        any::<[u64; 8]>(),
    )
        .prop_map(|(id, parent, name, state, vcpus, n)| VmInfo {
            id,
            parent,
            name,
            state,
            vcpus,
            mem_bytes: n[0],
            private_pages: n[1],
            shared_pages: n[2],
            cow_faults: n[3],
            forks: n[4],
            last_fork_ticks: n[5],
            uptime_us: n[6],
            vcpu_us: n[7],
        })
}

pub fn purpose() -> impl Strategy<Value = UploadPurpose> {
    prop_oneof![
        Just(UploadPurpose::Kernel),
        Just(UploadPurpose::Initrd),
        Just(UploadPurpose::Snapshot)
    ]
}

pub fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u16>(), text()).prop_map(|(version, client)| Request::Hello { version, client }),
        Just(Request::List),
        vm_id().prop_map(|vm| Request::Info { vm }),
        proptest::option::of(vm_id()).prop_map(|vm| Request::Stats { vm }),
        (vm_id(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
            |(vm, count, paused, remove_on_stop)| Request::Fork {
                vm,
                count,
                paused,
                remove_on_stop
            }
        ),
        vm_id().prop_map(|vm| Request::Pause { vm }),
        vm_id().prop_map(|vm| Request::Resume { vm }),
        vm_id().prop_map(|vm| Request::Reset { vm }),
        vm_id().prop_map(|vm| Request::Kill { vm }),
        (purpose(), any::<u64>())
            .prop_map(|(purpose, total_len)| Request::UploadBegin { purpose, total_len }),
        (any::<u32>(), any::<u64>(), chunk()).prop_map(|(upload, offset, data)| {
            Request::UploadChunk {
                upload,
                offset,
                data,
            }
        }),
        (
            any::<u32>(),
            proptest::option::of(any::<u32>()),
            any::<u64>(),
            any::<u32>(),
            text(),
            any::<(bool, bool)>()
        )
            .prop_map(
                |(kernel, initrd, mem_bytes, vcpus, cmdline, (paused, remove_on_stop))| {
                    Request::Create {
                        kernel,
                        initrd,
                        mem_bytes,
                        vcpus,
                        cmdline,
                        paused,
                        remove_on_stop,
                    }
                }
            ),
        (vm_id(), any::<bool>()).prop_map(|(vm, replay)| Request::ConsoleAttach { vm, replay }),
        vm_id().prop_map(|vm| Request::ConsoleDetach { vm }),
        (vm_id(), chunk()).prop_map(|(vm, data)| Request::ConsoleInput { vm, data }),
        vm_id().prop_map(|vm| Request::Dump { vm }),
        (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(dump, offset, max_len)| {
            Request::DumpRead {
                dump,
                offset,
                max_len,
            }
        }),
        any::<u32>().prop_map(|dump| Request::DumpClose { dump }),
        (any::<u32>(), any::<(bool, bool)>()).prop_map(|(upload, (paused, remove_on_stop))| {
            Request::Restore {
                upload,
                paused,
                remove_on_stop,
            }
        }),
        (vm_id(), vm_id()).prop_map(|(a, b)| Request::Diff { a, b }),
        (vm_id(), text()).prop_map(|(vm, name)| Request::Rename { vm, name }),
        (vm_id(), any::<bool>()).prop_map(|(vm, force)| Request::Remove { vm, force }),
    ]
}

pub fn error_reply() -> impl Strategy<Value = ErrorReply> {
    prop_oneof![
        vm_id().prop_map(ErrorReply::NoSuchVm),
        Just(ErrorReply::OutOfMemory),
        (any::<u16>(), any::<u16>())
            .prop_map(|(ours, theirs)| ErrorReply::VersionMismatch { ours, theirs }),
        text().prop_map(ErrorReply::BadRequest),
        Just(ErrorReply::Busy),
        text().prop_map(ErrorReply::Internal),
        vm_id().prop_map(ErrorReply::VmStopped),
    ]
}

pub fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (any::<u16>(), text())
            .prop_map(|(version, monitor)| Response::HelloReply { version, monitor }),
        Just(Response::Ok),
        vec(info(), 0..6).prop_map(Response::VmList),
        info().prop_map(Response::VmInfo),
        (
            any::<[u64; 7]>(),
            any::<[u32; 5]>(),
            proptest::option::of(info())
        )
            .prop_map(|(n, m, vm)| {
                Response::Stats {
                    global: GlobalStats {
                        free_frames: n[0],
                        used_frames: n[1],
                        total_frames: n[2],
                        vms: m[0],
                        counter_hz: n[3],
                        heap_used: n[4],
                        heap_free: n[5],
                        heap_reserve: n[6],
                        max_vms: m[1],
                        max_forks_per_tree: m[2],
                        stopped_vms: m[3],
                        max_stopped: m[4],
                    },
                    vm,
                }
            }),
        vec(vm_id(), 0..10).prop_map(|children| Response::Forked { children }),
        vm_id().prop_map(|vm| Response::Created { vm }),
        any::<u32>().prop_map(|upload| Response::UploadReady { upload }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(dump, total_len)| Response::DumpReady { dump, total_len }),
        (any::<u32>(), any::<u64>(), chunk()).prop_map(|(dump, offset, data)| Response::DumpData {
            dump,
            offset,
            data
        }),
        (
            any::<[u64; 3]>(),
            vec((any::<u64>(), any::<u64>()), 0..20),
            any::<bool>()
        )
            .prop_map(|(n, r, truncated)| Response::Diff(DiffReport {
                ram_base: n[0],
                pages_compared: n[1],
                differing_pages: n[2],
                ranges: r
                    .into_iter()
                    .map(|(first_page, pages)| PageRange { first_page, pages })
                    .collect(),
                truncated
            })),
        (vm_id(), chunk()).prop_map(|(vm, data)| Response::ConsoleOutput { vm, data }),
        (vm_id(), "[ -~]{0,40}").prop_map(|(vm, reason)| Response::ConsoleClosed { vm, reason }),
        error_reply().prop_map(Response::Error),
    ]
}

/// Decodes everything in `bytes`, fed in pieces of the given sizes (cycled).
pub fn decode_all(
    dec: &mut Decoder,
    bytes: &[u8],
    pieces: &[usize],
) -> (Vec<Frame>, Vec<FrameError>) {
    let mut frames = Vec::new();
    let mut errors = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = if pieces.is_empty() {
            bytes.len()
        } else {
            pieces[i % pieces.len()].max(1)
        };
        i += 1;
        let end = (at + n).min(bytes.len());
        for r in dec.push(&bytes[at..end]) {
            match r {
                Ok(f) => frames.push(f),
                Err(e) => errors.push(e),
            }
        }
        at = end;
    }
    (frames, errors)
}
