//! The monitor's control-protocol server (`vmfork_core::machine::server`), run on the host over
//! a table of VMs on fake memory (`machine::fake`): a whole session as the `vmfork` tool drives
//! it, and random request streams (hostile ones included) in which every request is answered
//! exactly once and, once the VMs are killed, every frame is back.

use proptest::prelude::*;
use spin::Mutex;
use vmfork_core::machine::fake::FakeHost;
use vmfork_core::machine::fake::InProcess;
use vmfork_core::machine::VmTable;
use vmfork_proto::{
    ErrorReply, Request, Response, StopReason, UploadPurpose, VmId, VmState, CHUNK_SIZE,
    PROTOCOL_VERSION,
};

const FRAMES: usize = 16 * 1024;

/// A tiny Linux arm64 `Image`: the header and a page of nothing.
fn kernel() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..4].copy_from_slice(&0x9100_0000u32.to_le_bytes());
    b[16..24].copy_from_slice(&(4096u64).to_le_bytes());
    b[56..60].copy_from_slice(b"ARM\x64");
    b
}

/// One client talking to one server, in process (`machine::fake::InProcess`), with the
/// uploads and creates the tests need.
struct Session<'a>(InProcess<'a>);

impl<'a> std::ops::Deref for Session<'a> {
    type Target = InProcess<'a>;
    fn deref(&self) -> &InProcess<'a> {
        &self.0
    }
}

impl<'a> std::ops::DerefMut for Session<'a> {
    fn deref_mut(&mut self) -> &mut InProcess<'a> {
        &mut self.0
    }
}

impl<'a> Session<'a> {
    fn new(vms: &'a Mutex<VmTable<FakeHost>>) -> Self {
        Session(InProcess::new(vms))
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.0.feed(bytes).unwrap();
    }

    fn send(&mut self, req: &Request) -> u32 {
        self.0.send(req).unwrap()
    }

    fn call(&mut self, req: Request) -> Response {
        self.0.call(req).unwrap()
    }

    fn upload(&mut self, purpose: UploadPurpose, data: &[u8]) -> u32 {
        let Response::UploadReady { upload } = self.call(Request::UploadBegin {
            purpose,
            total_len: data.len() as u64,
        }) else {
            panic!("no upload");
        };
        for (i, c) in data.chunks(CHUNK_SIZE).enumerate() {
            let r = self.call(Request::UploadChunk {
                upload,
                offset: (i * CHUNK_SIZE) as u64,
                data: c.to_vec(),
            });
            assert_eq!(r, Response::Ok);
        }
        upload
    }

    fn create(&mut self, mem: u64) -> Response {
        let k = self.upload(UploadPurpose::Kernel, &kernel());
        self.call(Request::Create {
            kernel: k,
            initrd: None,
            mem_bytes: mem,
            vcpus: 1,
            cmdline: String::new(),
            paused: false,
            remove_on_stop: false,
        })
    }
}

/// What a guest's stores to its UART data register would print.
fn guest_prints(vm: &mut vmfork_core::machine::Vm, text: &[u8]) {
    use vmfork_core::mmio::{MmioAccess, MmioDevice};
    for b in text {
        let _ = vm.devices.uart.access(
            0,
            MmioAccess {
                offset: 0,
                size: 1,
                write: Some(u64::from(*b)),
            },
        );
    }
}

#[test]
fn a_whole_session_as_the_tool_drives_it() {
    let vms = Mutex::new(VmTable::new(FakeHost::new(FRAMES)));
    let mut s = Session::new(&vms);
    let Response::HelloReply { version, monitor } = s.call(Request::Hello {
        version: PROTOCOL_VERSION,
        client: "test".into(),
    }) else {
        panic!("no hello")
    };
    assert_eq!((version, monitor.as_str()), (PROTOCOL_VERSION, "fake"));

    assert_eq!(s.create(4 << 20), Response::Created { vm: VmId(1) });
    // Checked before anything is built.
    assert!(matches!(
        s.create(3 << 20),
        Response::Error(ErrorReply::BadRequest(m)) if m.contains("multiple of 2M")
    ));
    // The limits boot configs and the tool use (vmfork_core::guest_spec), before anything is
    // built.
    assert!(matches!(
        s.create(64 << 30),
        Response::Error(ErrorReply::BadRequest(m)) if m.contains("32G")
    ));
    let Response::Forked { children } = s.call(Request::Fork {
        vm: VmId(1),
        count: 3,
        paused: true,
        remove_on_stop: false,
    }) else {
        panic!("no fork")
    };
    assert_eq!(children, vec![VmId(2), VmId(3), VmId(4)]);
    let Response::VmList(list) = s.call(Request::List) else {
        panic!("no list")
    };
    assert_eq!(list.len(), 4);
    // Pages count guest RAM (the vmgenid page is not RAM): 4 MiB is 1,024 of them, as diff
    // compares. (Before: 1,025.)
    for v in &list {
        assert_eq!(v.private_pages + v.shared_pages, 1024, "{v:?}");
    }
    assert!(matches!(list[1].state, VmState::Paused { .. }));
    assert_eq!(list[1].parent, Some(VmId(1)));
    // Children are named after the parent, counting its forks from 1.
    let names: Vec<&str> = list.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["created", "created.1", "created.2", "created.3"]);
    // Rename: a valid name sticks; one that looks like an id, is empty or has a space is
    // refused and changes nothing; an unknown VM is NoSuchVm.
    let rename = |s: &mut Session, vm: u32, name: &str| {
        s.call(Request::Rename {
            vm: VmId(vm),
            name: name.into(),
        })
    };
    assert_eq!(rename(&mut s, 2, "web.1"), Response::Ok);
    for bad in ["42", "vm7", "", "a b", &"x".repeat(33)] {
        assert!(
            matches!(
                rename(&mut s, 2, bad),
                Response::Error(ErrorReply::BadRequest(_))
            ),
            "{bad:?}"
        );
    }
    assert_eq!(
        rename(&mut s, 99, "web.2"),
        Response::Error(ErrorReply::NoSuchVm(VmId(99)))
    );
    let Response::VmInfo(v2) = s.call(Request::Info { vm: VmId(2) }) else {
        panic!("no info")
    };
    assert_eq!(v2.name, "web.1");
    assert_eq!(s.call(Request::Reset { vm: VmId(3) }), Response::Ok);
    assert!(matches!(
        s.call(Request::Reset { vm: VmId(1) }),
        Response::Error(ErrorReply::BadRequest(m)) if m.contains("not a fork")
    ));
    assert!(matches!(
        s.call(Request::Fork {
            vm: VmId(1),
            count: 0,
            paused: false,
            remove_on_stop: false,
        }),
        Response::Error(ErrorReply::BadRequest(_))
    ));
    let Response::Diff(d) = s.call(Request::Diff {
        a: VmId(1),
        b: VmId(2),
    }) else {
        panic!("no diff")
    };
    assert_eq!((d.pages_compared, d.differing_pages), (1024, 0));
    // A VM diffed with itself: each VM has its own lock, which is not reentrant; taken twice
    // here, it hung the server (the host's lock check panics instead).
    let Response::Diff(d) = s.call(Request::Diff {
        a: VmId(1),
        b: VmId(1),
    }) else {
        panic!("no diff of a VM with itself")
    };
    assert_eq!((d.pages_compared, d.differing_pages), (1024, 0));

    // Dump vm1, read it out, restore it.
    let Response::DumpReady { dump, total_len } = s.call(Request::Dump { vm: VmId(1) }) else {
        panic!("no dump")
    };
    let mut snap = Vec::new();
    loop {
        let Response::DumpData { data, offset, .. } = s.call(Request::DumpRead {
            dump,
            offset: snap.len() as u64,
            max_len: 3000,
        }) else {
            panic!("no dump data")
        };
        assert_eq!(offset, snap.len() as u64);
        if data.is_empty() {
            break;
        }
        snap.extend(data);
    }
    assert_eq!(snap.len() as u64, total_len);
    assert_eq!(s.call(Request::DumpClose { dump }), Response::Ok);
    let up = s.upload(UploadPurpose::Snapshot, &snap);
    let Response::Created { vm: restored } = s.call(Request::Restore {
        upload: up,
        paused: false,
        remove_on_stop: false,
    }) else {
        panic!("no restore")
    };
    // The dump's own fork took no id from the user's range: ids do not skip.
    assert_eq!(restored, VmId(5));
    let Response::Diff(d) = s.call(Request::Diff {
        a: VmId(1),
        b: restored,
    }) else {
        panic!("no diff")
    };
    assert_eq!(
        d.differing_pages, 0,
        "the restored VM's RAM is the dumped one's"
    );

    // A killed VM stays listed, stopped, holding no memory, until removed.
    assert_eq!(s.call(Request::Kill { vm: VmId(2) }), Response::Ok);
    let Response::VmInfo(killed) = s.call(Request::Info { vm: VmId(2) }) else {
        panic!("no record of the killed VM")
    };
    assert_eq!(
        killed.state,
        VmState::Stopped {
            reason: StopReason::Killed
        }
    );
    assert_eq!((killed.private_pages, killed.shared_pages), (0, 0));
    assert_eq!(killed.name, "web.1");
    let Response::VmList(list) = s.call(Request::List) else {
        panic!("no list")
    };
    let ids: Vec<u32> = list.iter().map(|v| v.id.0).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "the record is listed in id order");
    for req in [
        Request::Pause { vm: VmId(2) },
        Request::Resume { vm: VmId(2) },
        Request::Kill { vm: VmId(2) },
        Request::Reset { vm: VmId(2) },
        Request::Dump { vm: VmId(2) },
        Request::Fork {
            vm: VmId(2),
            count: 1,
            paused: false,
            remove_on_stop: false,
        },
        Request::Diff {
            a: VmId(1),
            b: VmId(2),
        },
    ] {
        assert_eq!(
            s.call(req.clone()),
            Response::Error(ErrorReply::VmStopped(VmId(2))),
            "{req:?} on a stopped VM"
        );
    }
    // A live VM is removed only with force.
    assert!(matches!(
        s.call(Request::Remove {
            vm: VmId(3),
            force: false
        }),
        Response::Error(ErrorReply::BadRequest(_))
    ));
    assert_eq!(
        s.call(Request::Remove {
            vm: VmId(2),
            force: false
        }),
        Response::Ok
    );
    assert_eq!(
        s.call(Request::Info { vm: VmId(2) }),
        Response::Error(ErrorReply::NoSuchVm(VmId(2)))
    );
    let Response::Stats { global, .. } = s.call(Request::Stats { vm: None }) else {
        panic!("no stats")
    };
    assert_eq!(global.vms, 4, "vm1, vm3, vm4 and the restored VM");
    assert_eq!(global.stopped_vms, 0, "vm2's record was removed");
    assert_eq!(global.total_frames, FRAMES as u64);
    for id in [1, 3, 4, restored.0] {
        assert_eq!(s.call(Request::Kill { vm: VmId(id) }), Response::Ok);
    }
    drop(s);
    let t = vms.lock();
    assert!(t.vms.is_empty());
    assert_eq!(t.host.free_frames(), FRAMES, "every frame is back");
}

/// A request from a small set of VM ids, handles and sizes, so that the stream hits live VMs,
/// open uploads and dumps as well as absent ones.
fn request() -> impl Strategy<Value = Request> {
    let vm = (0u32..8).prop_map(VmId);
    let handle = 0u32..4;
    prop_oneof![
        Just(Request::List),
        vm.clone().prop_map(|vm| Request::Info { vm }),
        prop::option::of(vm.clone()).prop_map(|vm| Request::Stats { vm }),
        (vm.clone(), 0u32..5, any::<bool>()).prop_map(|(vm, count, paused)| Request::Fork {
            vm,
            count,
            paused,
            remove_on_stop: false,
        }),
        vm.clone().prop_map(|vm| Request::Pause { vm }),
        vm.clone().prop_map(|vm| Request::Resume { vm }),
        vm.clone().prop_map(|vm| Request::Reset { vm }),
        vm.clone().prop_map(|vm| Request::Kill { vm }),
        (0u64..10_000).prop_map(|n| Request::UploadBegin {
            purpose: UploadPurpose::Snapshot,
            total_len: n
        }),
        (
            handle.clone(),
            0u64..64,
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(upload, offset, data)| Request::UploadChunk {
                upload,
                offset,
                data
            }),
        vm.clone()
            .prop_map(|vm| Request::ConsoleAttach { vm, replay: true }),
        vm.clone().prop_map(|vm| Request::ConsoleDetach { vm }),
        (vm.clone(), prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(vm, data)| Request::ConsoleInput { vm, data }),
        vm.clone().prop_map(|vm| Request::Dump { vm }),
        (handle.clone(), 0u64..5000, 0u32..5000).prop_map(|(dump, offset, max_len)| {
            Request::DumpRead {
                dump,
                offset,
                max_len,
            }
        }),
        handle.clone().prop_map(|dump| Request::DumpClose { dump }),
        handle.prop_map(|upload| Request::Restore {
            upload,
            paused: false,
            remove_on_stop: false
        }),
        (vm.clone(), vm.clone()).prop_map(|(a, b)| Request::Diff { a, b }),
        (
            vm,
            prop_oneof![Just("web.1"), Just("42"), Just(""), Just("a b")]
        )
            .prop_map(|(vm, name)| Request::Rename {
                vm,
                name: name.into()
            }),
    ]
}

/// What goes on the wire: a request, or bytes that are not one.
#[derive(Clone, Debug)]
enum Input {
    Request(Request),
    Garbage(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        40 => request().prop_map(Input::Request),
        1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(Input::Garbage),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every request is answered exactly once, whatever came before it; the server never
    /// panics; after killing every VM every frame is back.
    #[test]
    fn every_request_is_answered_once(
        inputs in prop::collection::vec(input(), 1..60),
        heap_low_at in prop::option::of(0usize..60),
    ) {
        let vms = Mutex::new(VmTable::new(FakeHost::new(FRAMES)));
        let mut s = Session::new(&vms);
        s.call(Request::Hello { version: PROTOCOL_VERSION, client: "fuzz".into() });
        let created = matches!(s.create(2 << 20), Response::Created { .. });
        prop_assert!(created, "the first VM is created");
        let mut sent = Vec::new();
        for (i, inp) in inputs.iter().enumerate() {
            if Some(i) == heap_low_at {
                vms.lock().host.heap_low.set(true);
            }
            match inp {
                Input::Request(r) => sent.push(s.send(r)),
                // Garbage may swallow the frames after it until the decoder resynchronises:
                // end the stream with it, as a client that sends garbage gets no promise.
                Input::Garbage(g) => {
                    s.feed(g);
                    break;
                }
            }
        }
        for id in &sent {
            let n = s
                .replies
                .get(id)
                .map_or(0, |r| r.iter().filter(|x| !matches!(x, Response::ConsoleOutput { .. } | Response::ConsoleClosed { .. })).count());
            prop_assert_eq!(n, 1, "request {} answered {} times", id, n);
        }
        // Nothing answered that was not asked.
        for id in s.replies.keys() {
            prop_assert!(*id == 1 || *id < s.next_id, "a reply to {} nobody sent", id);
        }
        vms.lock().host.heap_low.set(false);
        // Whatever happened, every VM's pages add up to its RAM.
        if let Response::VmList(list) = s.call(Request::List) {
            for v in &list {
                // A stopped VM's record holds no pages.
                let want = match v.state {
                    VmState::Stopped { .. } => 0,
                    _ => v.mem_bytes / 4096,
                };
                prop_assert_eq!(v.private_pages + v.shared_pages, want, "{:?}", v);
            }
        }
        drop(s);
        let mut t = vms.lock();
        let ids: Vec<u32> = t.vms.keys().copied().collect();
        for id in ids {
            let _ = t.stop(id, vmfork_core::machine::StopReason::Killed);
        }
        prop_assert!(t.vms.is_empty());
        prop_assert_eq!(t.host.free_frames(), FRAMES, "every frame is back");
    }
}

/// A client that asked for a dump and went away before it was ready (a new `Hello` came): the
/// new client never gets the old request's answer under its own ids, and the dump's internal
/// fork, which nobody will read out, is torn down. (Before: the `DumpReady` went to the new
/// client and the paused fork stayed forever.)
#[test]
fn what_a_previous_client_waited_for_is_not_answered_to_the_next() {
    use vmfork_core::machine::VcpuState;
    let vms = Mutex::new(VmTable::new(FakeHost::new(FRAMES)));
    let mut s = Session::new(&vms);
    s.call(Request::Hello {
        version: PROTOCOL_VERSION,
        client: "first".into(),
    });
    assert_eq!(s.create(2 << 20), Response::Created { vm: VmId(1) });
    // vm1's vCPU is on a CPU: a dump (a fork) waits for it to come back.
    let ctx = {
        let mut t = vms.lock();
        let v = &mut t.vms.get_mut(&1).unwrap().vcpus[0];
        v.state = VcpuState::Running(0);
        v.ctx.take().unwrap()
    };
    let dump = s.send(&Request::Dump { vm: VmId(1) });
    let fork = s.send(&Request::Fork {
        vm: VmId(1),
        count: 1,
        paused: true,
        remove_on_stop: false,
    });
    assert!(!s.replies.contains_key(&dump) && !s.replies.contains_key(&fork));
    // A new client; then the vCPU comes back and both operations run.
    s.call(Request::Hello {
        version: PROTOCOL_VERSION,
        client: "second".into(),
    });
    let _ = vms.lock().put_back(1, 0, ctx, VcpuState::Runnable);
    let Response::VmList(list) = s.call(Request::List) else {
        panic!("no list")
    };
    assert!(
        !s.replies.contains_key(&dump) && !s.replies.contains_key(&fork),
        "answers to the previous client: {:?}",
        s.replies
    );
    // vm1 and the fork it asked for (vm2) are there; the dump's internal fork (never listed)
    // is gone from the table too.
    let ids: Vec<u32> = list.iter().map(|v| v.id.0).collect();
    assert_eq!(ids, vec![1, 2], "{list:#?}");
    let all: Vec<u32> = vms.lock().vms.keys().copied().collect();
    assert_eq!(all, vec![1, 2], "the dump's fork is left in the table");
}

/// A VM that powers off while its console is streamed: the client gets the rest of its output,
/// then `ConsoleClosed` with the reason, and nothing more for it.
#[test]
fn a_streamed_console_ends_with_the_last_output_and_why() {
    use vmfork_core::esr::Esr;
    use vmfork_core::machine::{handle_sync, Syndrome, VcpuState};
    let vms = Mutex::new(VmTable::new(FakeHost::new(FRAMES)));
    let mut s = Session::new(&vms);
    s.call(Request::Hello {
        version: PROTOCOL_VERSION,
        client: "console".into(),
    });
    assert_eq!(s.create(2 << 20), Response::Created { vm: VmId(1) });
    let attach = s.send(&Request::ConsoleAttach {
        vm: VmId(1),
        replay: true,
    });
    {
        let mut guard = vms.lock();
        let t = &mut *guard;
        let mut vm = t.vms.get_mut(&1).unwrap();
        // The guest's last words, not yet read out by anyone...
        guest_prints(&mut vm, b"bye\n");
        // ...then PSCI SYSTEM_OFF through the exit path, and its vCPU comes back.
        let mut ctx = vm.vcpus[0].ctx.take().unwrap();
        vm.vcpus[0].state = VcpuState::Running(0);
        drop(vm);
        ctx.regs.x[0] = 0x8400_0008;
        let syn = Syndrome {
            esr: Esr((0x16 << 26) | (1 << 25)),
            far: 0,
            hpfar: 0,
        };
        let _ = handle_sync(t, 1, 0, &mut ctx, syn);
        let _ = t.put_back(1, 0, ctx, VcpuState::Runnable);
        assert!(t.vms.is_empty(), "torn down");
    }
    s.call(Request::List);
    let events = s.replies.remove(&attach).unwrap();
    let text: Vec<u8> = events
        .iter()
        .filter_map(|r| match r {
            Response::ConsoleOutput { data, .. } => Some(data.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(String::from_utf8_lossy(&text).contains("bye"), "{events:?}");
    assert_eq!(
        events.last(),
        Some(&Response::ConsoleClosed {
            vm: VmId(1),
            reason: "powered off (PSCI SYSTEM_OFF)".into()
        }),
        "{events:?}"
    );
    assert_eq!(
        events.iter().filter(|r| matches!(r, Response::Ok)).count(),
        1
    );
    // Nothing more for it.
    s.call(Request::List);
    assert!(!s.replies.contains_key(&attach));
}

/// What a VM printed before anyone attached is replayed on attach (its last 4 KiB), then the
/// stream goes on with new output only.
#[test]
fn an_attach_replays_the_scrollback_then_streams() {
    use vmfork_core::machine::vm::SCROLLBACK_BYTES;
    let vms = Mutex::new(VmTable::new(FakeHost::new(FRAMES)));
    let mut s = Session::new(&vms);
    s.call(Request::Hello {
        version: PROTOCOL_VERSION,
        client: "replay".into(),
    });
    assert_eq!(s.create(2 << 20), Response::Created { vm: VmId(1) });
    let print = |text: &[u8]| {
        let mut guard = vms.lock();
        let t = &mut *guard;
        let mut vm = t.vms.get_mut(&1).unwrap();
        guest_prints(&mut vm, text);
        vm.drain_console(&t.host);
    };
    // 10 KiB of numbered lines: only the last 4 KiB are kept.
    let mut all = Vec::new();
    for i in 0..1000 {
        all.extend_from_slice(format!("line {i:04}\n").as_bytes());
    }
    print(&all);
    assert_eq!(
        vms.lock().vms.get(&1).unwrap().scrollback.len(),
        SCROLLBACK_BYTES
    );
    let attach = s.send(&Request::ConsoleAttach {
        vm: VmId(1),
        replay: true,
    });
    print(b"after\n");
    s.call(Request::List);
    let events = s.replies.remove(&attach).unwrap();
    assert_eq!(events[0], Response::Ok, "the attach is answered first");
    let text: Vec<u8> = events[1..]
        .iter()
        .flat_map(|r| match r {
            Response::ConsoleOutput { data, .. } => data.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let mut want = all[all.len() - SCROLLBACK_BYTES..].to_vec();
    want.extend_from_slice(b"after\n");
    assert_eq!(
        String::from_utf8_lossy(&text),
        String::from_utf8_lossy(&want)
    );
}

/// A console line the guest leaves unended (a shell prompt) is printed once it is old enough,
/// not when the guest ends it (before: `vmfork-linux# ` showed only after Enter).
#[test]
fn an_unended_console_line_is_printed_after_a_while() {
    let vms = Mutex::new(VmTable::new(FakeHost::new(FRAMES)));
    let mut s = Session::new(&vms);
    assert_eq!(s.create(2 << 20), Response::Created { vm: VmId(1) });
    let mut guard = vms.lock();
    let t = &mut *guard;
    let mut vm = t.vms.get_mut(&1).unwrap();
    guest_prints(&mut vm, b"prompt# ");
    vm.drain_console(&t.host);
    let since = vm.line_since;
    drop(vm);
    let printed = |t: &VmTable<FakeHost>| {
        t.host
            .console
            .borrow()
            .iter()
            .any(|(vm, l)| *vm == 1 && l == "prompt# ")
    };
    t.flush_stale_lines(since + 999, 1000);
    assert!(!printed(t), "too young to print");
    t.flush_stale_lines(since + 1000, 1000);
    assert!(printed(t), "printed once old enough");
    assert!(t.vms.get(&1).unwrap().line.is_empty());
}

/// Powers VM `id` off through the exit path (PSCI SYSTEM_OFF from vCPU 0), after it printed
/// `last`; it is torn down when its vCPU comes back.
fn power_off(t: &mut VmTable<FakeHost>, id: u32, last: &[u8]) {
    use vmfork_core::esr::Esr;
    use vmfork_core::machine::{handle_sync, Syndrome, VcpuState};
    let mut vm = t.vms.get_mut(&id).unwrap();
    guest_prints(&mut vm, last);
    let mut ctx = vm.vcpus[0].ctx.take().unwrap();
    vm.vcpus[0].state = VcpuState::Running(0);
    vm.vcpus[0].on_cpu_since = vmfork_core::machine::Host::now(&t.host);
    drop(vm);
    ctx.regs.x[0] = 0x8400_0008;
    let syn = Syndrome {
        esr: Esr((0x16 << 26) | (1 << 25)),
        far: 0,
        hpfar: 0,
    };
    let _ = handle_sync(t, id, 0, &mut ctx, syn);
    let _ = t.put_back(id, 0, ctx, VcpuState::Runnable);
}

/// The events of attach request `attach`: its output as text, and the rest.
fn console_events(s: &mut Session, attach: u32) -> (String, Vec<Response>) {
    s.call(Request::List);
    let events = s.replies.remove(&attach).unwrap();
    let mut text = Vec::new();
    let mut rest = Vec::new();
    for e in events {
        match e {
            Response::ConsoleOutput { data, .. } => text.extend(data),
            other => rest.push(other),
        }
    }
    (String::from_utf8_lossy(&text).into_owned(), rest)
}

/// A VM that stops stays listed, stopped and holding no memory, with its last output and why
/// it went, until `Remove`; one made with `remove_on_stop` leaves no record; `paused` starts it
/// paused; uptime and vCPU time are accounted.
#[test]
fn a_stopped_vm_is_kept_with_its_last_output_until_removed() {
    let vms = Mutex::new(VmTable::new(FakeHost::new(FRAMES)));
    let mut s = Session::new(&vms);
    s.call(Request::Hello {
        version: PROTOCOL_VERSION,
        client: "lifecycle".into(),
    });
    let k = s.upload(UploadPurpose::Kernel, &kernel());
    let created = s.call(Request::Create {
        kernel: k,
        initrd: None,
        mem_bytes: 2 << 20,
        vcpus: 1,
        cmdline: String::new(),
        paused: true,
        remove_on_stop: false,
    });
    assert_eq!(created, Response::Created { vm: VmId(1) });
    let Response::VmInfo(i) = s.call(Request::Info { vm: VmId(1) }) else {
        panic!("no info")
    };
    assert_eq!(
        i.state,
        VmState::Paused {
            reason: vmfork_proto::PauseReason::Created
        }
    );
    assert_eq!(
        vms.lock().pick(0, 2_000_000),
        None,
        "a paused VM is not run"
    );
    assert_eq!(s.call(Request::Resume { vm: VmId(1) }), Response::Ok);
    // 62.5 MHz: 625,000 ticks on a CPU are 10 ms of vCPU time.
    {
        use vmfork_core::machine::VcpuState;
        let mut t = vms.lock();
        t.host.clock.set(3_000_000 - 17);
        let (id, vcpu, ctx) = t.pick(0, 3_000_000).expect("runnable");
        t.host.clock.set(3_000_000 + 625_000 - 17);
        let _ = t.put_back(id, vcpu, ctx, VcpuState::Runnable);
    }
    let Response::VmInfo(i) = s.call(Request::Info { vm: VmId(1) }) else {
        panic!("no info")
    };
    assert_eq!(i.vcpu_us, 625_000 / 62, "{i:?}");
    assert!(i.uptime_us >= i.vcpu_us, "{i:?}");

    power_off(&mut vms.lock(), 1, b"bye\n");
    let Response::VmList(list) = s.call(Request::List) else {
        panic!("no list")
    };
    assert_eq!(list.len(), 1);
    let r = &list[0];
    assert_eq!(
        r.state,
        VmState::Stopped {
            reason: StopReason::PowerOff
        }
    );
    assert_eq!((r.private_pages, r.shared_pages), (0, 0));
    assert!(
        r.vcpu_us >= i.vcpu_us && r.vcpu_us < i.vcpu_us + 10,
        "{r:?}"
    );
    assert_eq!(vms.lock().host.free_frames(), FRAMES, "it holds no memory");
    // Its console: the last output (with replay), then why it went; the attachment is over.
    let attach = s.send(&Request::ConsoleAttach {
        vm: VmId(1),
        replay: true,
    });
    let (text, rest) = console_events(&mut s, attach);
    assert!(text.contains("bye"), "{text:?}");
    assert_eq!(
        rest,
        [
            Response::Ok,
            Response::ConsoleClosed {
                vm: VmId(1),
                reason: "powered off (PSCI SYSTEM_OFF)".into()
            }
        ]
    );
    let attach = s.send(&Request::ConsoleAttach {
        vm: VmId(1),
        replay: false,
    });
    let (text, rest) = console_events(&mut s, attach);
    assert_eq!(text, "", "no replay asked for");
    assert_eq!(rest.len(), 2);
    assert_eq!(
        s.call(Request::ConsoleInput {
            vm: VmId(1),
            data: b"x".to_vec()
        }),
        Response::Error(ErrorReply::VmStopped(VmId(1)))
    );
    assert_eq!(
        s.call(Request::Remove {
            vm: VmId(1),
            force: false
        }),
        Response::Ok
    );
    assert_eq!(s.call(Request::List), Response::VmList(Vec::new()));
    assert_eq!(
        s.call(Request::Remove {
            vm: VmId(1),
            force: false
        }),
        Response::Error(ErrorReply::NoSuchVm(VmId(1)))
    );

    // remove_on_stop: no record once it stops; a fork's children too.
    let k = s.upload(UploadPurpose::Kernel, &kernel());
    let created = s.call(Request::Create {
        kernel: k,
        initrd: None,
        mem_bytes: 2 << 20,
        vcpus: 1,
        cmdline: String::new(),
        paused: false,
        remove_on_stop: true,
    });
    assert_eq!(created, Response::Created { vm: VmId(2) });
    let Response::Forked { children } = s.call(Request::Fork {
        vm: VmId(2),
        count: 2,
        paused: true,
        remove_on_stop: true,
    }) else {
        panic!("no fork")
    };
    assert_eq!(children, [VmId(3), VmId(4)]);
    // A fork without the flag is kept.
    let Response::Forked { children } = s.call(Request::Fork {
        vm: VmId(2),
        count: 1,
        paused: true,
        remove_on_stop: false,
    }) else {
        panic!("no fork")
    };
    assert_eq!(children, [VmId(5)]);
    assert_eq!(
        vms.lock().focus,
        Some(2),
        "the monitor console types into vm2"
    );
    power_off(&mut vms.lock(), 2, b"");
    assert_eq!(vms.lock().focus, Some(3), "its death moved the focus on");
    for id in [3, 4, 5] {
        assert_eq!(s.call(Request::Kill { vm: VmId(id) }), Response::Ok);
    }
    let Response::VmList(list) = s.call(Request::List) else {
        panic!("no list")
    };
    let ids: Vec<u32> = list.iter().map(|v| v.id.0).collect();
    assert_eq!(
        ids,
        [5],
        "only the fork made without remove_on_stop is kept"
    );
    // Remove with force kills a live VM and keeps no record.
    let k = s.upload(UploadPurpose::Kernel, &kernel());
    s.call(Request::Create {
        kernel: k,
        initrd: None,
        mem_bytes: 2 << 20,
        vcpus: 1,
        cmdline: String::new(),
        paused: false,
        remove_on_stop: false,
    });
    assert_eq!(
        s.call(Request::Remove {
            vm: VmId(6),
            force: true
        }),
        Response::Ok
    );
    let Response::Stats { global, .. } = s.call(Request::Stats { vm: None }) else {
        panic!("no stats")
    };
    assert_eq!((global.vms, global.stopped_vms), (0, 1));
    assert_eq!(global.max_stopped, 1024);
    assert_eq!(vms.lock().host.free_frames(), FRAMES);
}

/// Beyond `max_stopped` records, the one of the lowest id goes.
#[test]
fn records_are_bounded_by_max_stopped() {
    let vms = Mutex::new(VmTable::new(FakeHost::new(FRAMES)));
    vms.lock().limits.max_stopped = 2;
    let mut s = Session::new(&vms);
    s.call(Request::Hello {
        version: PROTOCOL_VERSION,
        client: "bounded".into(),
    });
    for id in 1..=4 {
        assert_eq!(s.create(2 << 20), Response::Created { vm: VmId(id) });
    }
    for id in [3, 1, 4, 2] {
        assert_eq!(s.call(Request::Kill { vm: VmId(id) }), Response::Ok);
    }
    let Response::VmList(list) = s.call(Request::List) else {
        panic!("no list")
    };
    let ids: Vec<u32> = list.iter().map(|v| v.id.0).collect();
    assert_eq!(ids, [3, 4]);
}
