//! `vmfork mux` against the in-process fake monitor: several clients at once through one
//! upstream connection, console fan-out, clients that vanish or send garbage, the upstream going
//! away; the real `vmfork` binary through the mux binary; and a property test of the router
//! against a model monitor that keeps one console attachment per VM.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use vmfork::fake::{FakeConfig, FakeMonitor};
use vmfork::mux::{
    Dest, Mux, MuxEnd, MuxError, MuxLog, MuxOptions, Outgoing, Router, UPSTREAM_LOST,
};
use vmfork::{Client, ClientError};
use vmfork_proto::frame::encode_frame;
use vmfork_proto::msg::kind;
use vmfork_proto::{Decoder, ErrorReply, Frame, Request, Response, VmId, PROTOCOL_VERSION};

// Field order matters: the mux stops before the fake, the fake before its directory goes.
struct Env {
    mux: Mux,
    fake: Option<FakeMonitor>,
    listen: PathBuf,
    dir: tempfile::TempDir,
}

fn options(up: &Path, listen: &Path) -> MuxOptions {
    let mut o = MuxOptions::new(up, listen);
    o.connect_wait = Some(Duration::from_secs(5));
    o.hello_wait = Some(Duration::from_secs(10));
    // Beside the listening socket, so the test output stays quiet.
    o.log = MuxLog::file(&log_of(listen)).unwrap();
    o
}

fn log_of(listen: &Path) -> PathBuf {
    let mut p = listen.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.sock");
    let listen = dir.path().join("mux.sock");
    let fake = FakeMonitor::start(&up, FakeConfig::default()).unwrap();
    let mux = Mux::start(&options(&up, &listen)).unwrap();
    Env {
        mux,
        fake: Some(fake),
        listen,
        dir,
    }
}

/// A client speaking raw frames, to see exactly what the mux sends.
struct Raw {
    s: UnixStream,
    dec: Decoder,
    got: VecDeque<Frame>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            s,
            dec: Decoder::new(),
            got: VecDeque::new(),
        }
    }

    fn hello(path: &Path) -> Raw {
        let mut r = Raw::connect(path);
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client: "test".into(),
        };
        match r.call(1, &hello) {
            Response::HelloReply { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
            other => panic!("{other:?}"),
        }
        r
    }

    fn send(&mut self, id: u32, req: &Request) {
        let mut b = Vec::new();
        req.encode_frame(id, &mut b).unwrap();
        self.s.write_all(&b).unwrap();
    }

    /// The next frame, or None after `timeout` without one.
    fn frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.got.pop_front() {
                return Some(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            match self.s.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    for f in self.dec.push(&buf[..n]) {
                        self.got.push_back(f.expect("a damaged frame from the mux"));
                    }
                }
                Err(_) => return None,
            }
        }
    }

    fn recv(&mut self) -> (u32, Response) {
        let f = self
            .frame(Duration::from_secs(10))
            .expect("no frame from the mux");
        assert_eq!(f.version, PROTOCOL_VERSION);
        (f.id, Response::decode(f.kind, &f.payload).unwrap())
    }

    /// The next frame that is not console output (the fake replays a VM's log after an attach).
    fn recv_not_output(&mut self) -> (u32, Response) {
        loop {
            match self.recv() {
                (_, Response::ConsoleOutput { .. }) => {}
                m => return m,
            }
        }
    }

    /// Sends and waits for the reply with `id`, failing on anything else but console output.
    fn call(&mut self, id: u32, req: &Request) -> Response {
        self.send(id, req);
        loop {
            let (rid, r) = self.recv();
            if rid == id {
                return r;
            }
            assert!(
                matches!(
                    r,
                    Response::ConsoleOutput { .. } | Response::ConsoleClosed { .. }
                ),
                "unexpected {rid} {r:?}"
            );
        }
    }

    /// Collects console output of `vm` until it contains `want`; every event must carry
    /// `attach_id`.
    fn output_until(&mut self, vm: u32, attach_id: u32, want: &str) -> String {
        let mut text = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !text.contains(want) {
            assert!(Instant::now() < deadline, "no {want:?} in {text:?}");
            match self.recv() {
                (id, Response::ConsoleOutput { vm: v, data }) => {
                    assert_eq!((id, v), (attach_id, VmId(vm)), "event for {text:?}");
                    text.push_str(&String::from_utf8_lossy(&data));
                }
                other => panic!("unexpected {other:?} while waiting for {want:?}"),
            }
        }
        text
    }

    /// Nothing arrives for `d`.
    fn quiet(&mut self, d: Duration) {
        if let Some(f) = self.frame(d) {
            panic!(
                "unexpected frame {} {:?}",
                f.id,
                Response::decode(f.kind, &f.payload)
            );
        }
    }
}

fn input(c: &mut Client, vm: u32, s: &str) {
    c.simple(&Request::ConsoleInput {
        vm: VmId(vm),
        data: s.as_bytes().to_vec(),
    })
    .unwrap();
}

#[test]
fn the_mux_answers_hello_itself_with_the_monitors_version_checks() {
    let e = env();
    let mut r = Raw::connect(&e.listen);
    // Anything before Hello is refused, as by the reference server.
    match r.call(3, &Request::List) {
        Response::Error(ErrorReply::BadRequest(m)) => assert_eq!(m, "say Hello first"),
        other => panic!("{other:?}"),
    }
    // A frame of another version.
    let mut b = Vec::new();
    encode_frame(3, kind::HELLO, 4, &[3, 0, 0, 0, 0, 0], &mut b).unwrap();
    r.s.write_all(&b).unwrap();
    assert_eq!(
        r.recv(),
        (
            4,
            Response::Error(ErrorReply::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 3
            })
        )
    );
    // A Hello naming another version in a frame of ours.
    let hello2 = Request::Hello {
        version: 7,
        client: "old".into(),
    };
    assert_eq!(
        r.call(5, &hello2),
        Response::Error(ErrorReply::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: 7
        })
    );
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "t".into(),
    };
    match r.call(6, &hello) {
        Response::HelloReply { version, monitor } => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert!(monitor.contains("fake monitor"), "{monitor}");
            assert!(monitor.contains("via vmfork mux"), "{monitor}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(r.call(7, &Request::List), Response::VmList(l) if l.len() == 1));
    let c = Client::connect(&e.listen).unwrap();
    assert!(c.monitor().contains("via vmfork mux"));
    assert!(e.mux.monitor().contains("fake monitor"));
    assert_eq!(e.mux.listen_path(), e.listen);
}

#[test]
fn two_consoles_on_one_vm_both_get_output_while_another_client_lists_and_forks() {
    let e = env();
    let mut a = Raw::hello(&e.listen);
    assert_eq!(
        a.call(
            10,
            &Request::ConsoleAttach {
                vm: VmId(1),
                replay: true
            }
        ),
        Response::Ok
    );
    // A busy third client, concurrently.
    let listen = e.listen.clone();
    let busy = std::thread::spawn(move || {
        let mut c = Client::connect(&listen).unwrap();
        let mut forked = 0;
        for i in 0..40 {
            assert!(!c.list().unwrap().is_empty());
            if i % 10 == 0 {
                forked += c.fork(VmId(1), 1, false).unwrap().len();
            }
            c.stats(None).unwrap();
        }
        forked
    });
    let mut b = Client::connect(&e.listen).unwrap();
    input(&mut b, 1, "hi\n");
    a.output_until(1, 10, "hi");
    // A second console on the same VM: answered by the mux, fed by the same upstream attach.
    let mut c = Raw::hello(&e.listen);
    assert_eq!(
        c.call(
            77,
            &Request::ConsoleAttach {
                vm: VmId(1),
                replay: true
            }
        ),
        Response::Ok
    );
    input(&mut b, 1, "poke 2\n");
    a.output_until(1, 10, "poked 2 pages");
    c.output_until(1, 77, "poked 2 pages");
    assert_eq!(busy.join().unwrap(), 4);
    assert_eq!(b.list().unwrap().len(), 5);

    // One detaches: no event follows its Ok; the other goes on.
    assert_eq!(
        a.call(11, &Request::ConsoleDetach { vm: VmId(1) }),
        Response::Ok
    );
    input(&mut b, 1, "still\n");
    c.output_until(1, 77, "still");
    a.quiet(Duration::from_millis(300));
    // One client on two VMs.
    assert_eq!(
        c.call(
            78,
            &Request::ConsoleAttach {
                vm: VmId(2),
                replay: true
            }
        ),
        Response::Ok
    );
    input(&mut b, 2, "two\n");
    c.output_until(2, 78, "two");
}

#[test]
fn a_client_that_vanishes_mid_request_does_not_disturb_the_others() {
    let e = env();
    {
        let mut v = Raw::hello(&e.listen);
        assert_eq!(
            v.call(
                2,
                &Request::ConsoleAttach {
                    vm: VmId(1),
                    replay: true
                }
            ),
            Response::Ok
        );
        v.send(3, &Request::List);
        v.send(
            4,
            &Request::Fork {
                vm: VmId(1),
                count: 3,
                paused: false,
                remove_on_stop: false,
            },
        );
        v.send(5, &Request::Dump { vm: VmId(1) });
        // Gone without reading a reply.
    }
    let mut b = Client::connect(&e.listen).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.list().unwrap().len() < 4 {
        assert!(Instant::now() < deadline, "the vanished client's fork");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its console attachment went with it; a new one works (attached upstream afresh).
    let mut a = Raw::hello(&e.listen);
    assert_eq!(
        a.call(
            9,
            &Request::ConsoleAttach {
                vm: VmId(1),
                replay: true
            }
        ),
        Response::Ok
    );
    input(&mut b, 1, "after\n");
    a.output_until(1, 9, "after");
    // A client that vanishes with a half-sent frame.
    {
        let mut h = Raw::hello(&e.listen);
        let mut f = Vec::new();
        Request::List.encode_frame(8, &mut f).unwrap();
        h.s.write_all(&f[..10]).unwrap();
    }
    assert_eq!(b.list().unwrap().len(), 4);
}

#[test]
fn garbage_from_one_client_is_skipped_and_affects_nobody_else() {
    let e = env();
    let mut a = Raw::hello(&e.listen);
    assert_eq!(
        a.call(
            1,
            &Request::ConsoleAttach {
                vm: VmId(1),
                replay: true
            }
        ),
        Response::Ok
    );
    let mut g = Raw::connect(&e.listen);
    let mut x = 0x1234_5678u32;
    let garbage: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    g.s.write_all(&garbage).unwrap();
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "g".into(),
    };
    assert!(matches!(g.call(2, &hello), Response::HelloReply { .. }));
    // A frame with a damaged payload: BadRequest under its (intact) id.
    let mut f = Vec::new();
    Request::Info { vm: VmId(1) }
        .encode_frame(3, &mut f)
        .unwrap();
    f[21] ^= 0xff;
    g.s.write_all(&f).unwrap();
    assert!(matches!(
        g.recv(),
        (3, Response::Error(ErrorReply::BadRequest(_)))
    ));
    // A frame over the request cap: refused without being stored, the stream goes on.
    let big = vec![0u8; 70 * 1024];
    let mut f = Vec::new();
    encode_frame(PROTOCOL_VERSION, kind::UPLOAD_CHUNK, 4, &big, &mut f).unwrap();
    g.s.write_all(&f).unwrap();
    assert!(matches!(
        g.recv(),
        (4, Response::Error(ErrorReply::BadRequest(m))) if m.contains("cap")
    ));
    // An unknown kind.
    let mut f = Vec::new();
    encode_frame(PROTOCOL_VERSION, 0x7777, 5, &[], &mut f).unwrap();
    g.s.write_all(&f).unwrap();
    assert!(matches!(
        g.recv(),
        (5, Response::Error(ErrorReply::BadRequest(_)))
    ));
    assert!(matches!(g.call(6, &Request::List), Response::VmList(_)));
    // The console client saw none of it and still works.
    let mut b = Client::connect(&e.listen).unwrap();
    input(&mut b, 1, "ok\n");
    a.output_until(1, 1, "ok");
}

#[test]
fn killing_a_vm_tells_its_console_clients_once() {
    let e = env();
    let mut b = Client::connect(&e.listen).unwrap();
    assert_eq!(b.fork(VmId(1), 1, false).unwrap(), [VmId(2)]);
    let mut a = Raw::hello(&e.listen);
    let mut c = Raw::hello(&e.listen);
    assert_eq!(
        a.call(
            5,
            &Request::ConsoleAttach {
                vm: VmId(2),
                replay: true
            }
        ),
        Response::Ok
    );
    assert_eq!(
        c.call(
            6,
            &Request::ConsoleAttach {
                vm: VmId(2),
                replay: true
            }
        ),
        Response::Ok
    );
    b.simple(&Request::Kill { vm: VmId(2) }).unwrap();
    let gone = Response::ConsoleClosed {
        vm: VmId(2),
        reason: "killed by the control channel".into(),
    };
    assert_eq!(a.recv_not_output(), (5, gone.clone()));
    assert_eq!(c.recv_not_output(), (6, gone));
    a.quiet(Duration::from_millis(300));
    c.quiet(Duration::from_millis(10));
}

#[test]
fn when_the_monitor_goes_waiting_clients_get_an_error_and_the_mux_ends() {
    let mut e = env();
    let mut a = Raw::hello(&e.listen);
    assert_eq!(
        a.call(
            5,
            &Request::ConsoleAttach {
                vm: VmId(1),
                replay: true
            }
        ),
        Response::Ok
    );
    drop(e.fake.take());
    assert_eq!(e.mux.wait(), MuxEnd::UpstreamClosed);
    assert_eq!(
        a.recv_not_output(),
        (
            5,
            Response::Error(ErrorReply::Internal(UPSTREAM_LOST.into()))
        )
    );
    assert!(a.frame(Duration::from_secs(5)).is_none(), "closed");
    assert!(!e.listen.exists(), "the listening socket is removed");
    assert!(UnixStream::connect(&e.listen).is_err());
}

#[test]
fn the_mux_waits_for_the_upstream_socket_to_appear() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.sock");
    let listen = dir.path().join("mux.sock");
    let up2 = up.clone();
    let later = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        FakeMonitor::start(&up2, FakeConfig::default()).unwrap()
    });
    let mux = Mux::start(&options(&up, &listen)).unwrap();
    let _fake = later.join().unwrap();
    assert_eq!(Client::connect(&listen).unwrap().list().unwrap().len(), 1);
    mux.stop();

    let mut o = options(&dir.path().join("nothing.sock"), &listen);
    o.connect_wait = Some(Duration::from_millis(300));
    let t = Instant::now();
    let err = Mux::start(&o).unwrap_err();
    assert!(matches!(err, MuxError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("cannot connect to the monitor"));
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[test]
fn a_stale_listening_socket_is_replaced_and_a_live_one_is_refused() {
    let e = env();
    let up = e.dir.path().join("up.sock");
    // Live: the running mux serves it.
    let err = Mux::start(&options(&up, &e.listen)).unwrap_err();
    assert!(matches!(err, MuxError::AlreadyServing(_)), "{err}");
    // Stale: a socket file nobody listens on.
    let stale = e.dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    // The fake serves several connections itself, so a second mux on it is possible.
    let m2 = Mux::start(&options(&up, &stale)).unwrap();
    assert_eq!(Client::connect(&stale).unwrap().list().unwrap().len(), 1);
    drop(m2);
    // Not a socket, or the upstream itself: refused.
    let file = e.dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Mux::start(&options(&up, &file)).unwrap_err(),
        MuxError::Listen { .. }
    ));
    assert!(matches!(
        Mux::start(&options(&up, &up)).unwrap_err(),
        MuxError::Listen { .. }
    ));
}

/// Kills the mux child process when the test ends, however it ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmfork"));
    c.env_remove("VMFORK_SOCKET");
    c
}

fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(p).is_err() {
        assert!(Instant::now() < deadline, "{} never served", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_vmfork_binary_works_unchanged_through_the_mux_binary() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.sock");
    let listen = dir.path().join("mux.sock");
    let fake = FakeMonitor::start(&up, FakeConfig::default()).unwrap();
    let mut mux = Reap(
        bin()
            .args(["mux", "--upstream"])
            .arg(&up)
            .arg("--listen")
            .arg(&listen)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&listen);
    let run = |args: &[&str]| {
        let o = bin()
            .arg("--socket")
            .arg(&listen)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "vmfork {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let console = |vm: &str, text: &str| {
        let mut ch = bin()
            .arg("--socket")
            .arg(&listen)
            .args(["console", vm, "--linger", "500"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        ch.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        ch
    };
    assert_eq!(
        run(&["fork", "1", "--count", "2"])
            .split_whitespace()
            .count(),
        2
    );
    // Two consoles at once on different VMs, while other commands run.
    let c1 = console("1", "poke 1\n");
    let c2 = console("2", "poke 3\n");
    assert_eq!(run(&["list"]).lines().count(), 4);
    let snap = dir.path().join("s.snap");
    run(&["dump", "1", snap.to_str().unwrap()]);
    assert_eq!(run(&["restore", snap.to_str().unwrap()]).trim(), "4");
    for (ch, want) in [(c1, "poked 1 pages"), (c2, "poked 3 pages")] {
        let o = ch.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(want), "{out:?}");
    }
    // QEMU exits: the mux says so and exits with the connection status.
    drop(fake);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = mux.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the mux did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(3));
    let mut err = String::new();
    mux.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("serving"), "{err}");
    assert!(err.contains("closed the connection"), "{err}");
    assert!(!listen.exists());
}

// ---- The router against a model monitor ----

/// The monitor as far as the router can tell: one console attachment per VM (the latest attach
/// replaces it), every request answered in order.
#[derive(Default)]
struct ModelMonitor {
    queue: VecDeque<Frame>,
    attached: BTreeMap<u32, u32>,
}

impl ModelMonitor {
    fn process(&mut self, f: Frame) -> Frame {
        assert_ne!(f.kind, kind::HELLO, "a client's Hello was forwarded");
        assert!(
            !self.attached.values().any(|&a| a == f.id),
            "upstream id {} reused while it names an attachment",
            f.id
        );
        let req = Request::decode(f.kind, &f.payload).unwrap();
        let resp = match req {
            Request::ConsoleAttach { vm, .. } => {
                self.attached.insert(vm.0, f.id);
                Response::Ok
            }
            Request::ConsoleDetach { vm } => {
                self.attached.remove(&vm.0);
                Response::Ok
            }
            Request::List => Response::VmList(Vec::new()),
            _ => Response::Ok,
        };
        let mut payload = Vec::new();
        resp.encode_payload(&mut payload);
        Frame {
            version: PROTOCOL_VERSION,
            kind: resp.kind(),
            id: f.id,
            payload,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Attach(u32),
    Detach(u32),
    Other,
}

struct ModelClient {
    id: u64,
    next_req: u32,
    outstanding: BTreeMap<u32, Sent>,
    /// VM -> attach id, for attaches answered `Ok` and not detached since.
    confirmed: BTreeMap<u32, u32>,
}

impl ModelClient {
    fn busy_with(&self, vm: u32) -> bool {
        self.outstanding
            .values()
            .any(|s| *s == Sent::Attach(vm) || *s == Sent::Detach(vm))
    }
}

#[derive(Clone, Debug)]
enum Op {
    Attach(usize, u32),
    Detach(usize, u32),
    Input(usize, u32),
    List(usize),
    Output(u32),
    Deliver(usize),
    Reconnect(usize),
    Garbage(usize, Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0usize..3;
    let vm = 1u32..4;
    prop_oneof![
        3 => (c.clone(), vm.clone()).prop_map(|(c, v)| Op::Attach(c, v)),
        2 => (c.clone(), vm.clone()).prop_map(|(c, v)| Op::Detach(c, v)),
        1 => (c.clone(), vm.clone()).prop_map(|(c, v)| Op::Input(c, v)),
        1 => c.clone().prop_map(Op::List),
        3 => vm.prop_map(Op::Output),
        3 => (1usize..4).prop_map(Op::Deliver),
        1 => c.clone().prop_map(Op::Reconnect),
        1 => (c, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(c, g)| Op::Garbage(c, g)),
    ]
}

/// Who must (client -> attach id) and who may (client -> possible attach ids) get one output of
/// a VM.
type Expected = (u32, BTreeMap<u64, u32>, BTreeMap<u64, BTreeSet<u32>>);

struct Harness {
    router: Router,
    monitor: ModelMonitor,
    clients: Vec<ModelClient>,
    next_client: u64,
    /// Output sequence number -> (VM, clients that must get it with this id, clients that may
    /// get it with one of these ids).
    expect: HashMap<u64, Expected>,
    received: BTreeSet<(u64, u64)>,
    seq: u64,
}

impl Harness {
    fn new() -> Harness {
        let mut h = Harness {
            router: Router::new("model", 1),
            monitor: ModelMonitor::default(),
            clients: Vec::new(),
            next_client: 1,
            expect: HashMap::new(),
            received: BTreeSet::new(),
            seq: 0,
        };
        for slot in 0..3 {
            h.connect(slot);
        }
        h
    }

    /// A new client in `slot` (replacing the one there), which says hello.
    fn connect(&mut self, slot: usize) {
        let id = self.next_client;
        self.next_client += 1;
        self.router.add_client(id);
        let mut c = ModelClient {
            id,
            next_req: 1,
            outstanding: BTreeMap::new(),
            confirmed: BTreeMap::new(),
        };
        c.outstanding.insert(0, Sent::Other);
        if slot < self.clients.len() {
            self.clients[slot] = c;
        } else {
            self.clients.push(c);
        }
        let mut bytes = Vec::new();
        Request::Hello {
            version: PROTOCOL_VERSION,
            client: "model".into(),
        }
        .encode_frame(0, &mut bytes)
        .unwrap();
        let mut out = Vec::new();
        self.router.client_bytes(id, &bytes, &mut out);
        self.route(out);
    }

    fn send(&mut self, slot: usize, req: Request, what: Sent) {
        let c = &mut self.clients[slot];
        let id = c.next_req;
        c.next_req += 1;
        c.outstanding.insert(id, what);
        let cid = c.id;
        let mut bytes = Vec::new();
        req.encode_frame(id, &mut bytes).unwrap();
        let mut out = Vec::new();
        self.router.client_bytes(cid, &bytes, &mut out);
        self.route(out);
    }

    fn route(&mut self, out: Vec<Outgoing>) {
        for o in out {
            match o.dest {
                Dest::Upstream => {
                    assert!(
                        !self.monitor.queue.iter().any(|f| f.id == o.frame.id),
                        "two requests in flight with upstream id {}",
                        o.frame.id
                    );
                    self.monitor.queue.push_back(o.frame);
                }
                Dest::Client(c) => self.deliver_to_client(c, o.frame),
            }
        }
    }

    fn deliver_to_client(&mut self, cid: u64, f: Frame) {
        let slot = self
            .clients
            .iter()
            .position(|c| c.id == cid)
            .unwrap_or_else(|| panic!("frame {} for client {cid}, which is gone", f.id));
        let resp = Response::decode(f.kind, &f.payload).unwrap();
        let c = &mut self.clients[slot];
        if let Response::ConsoleOutput { vm, data } = resp {
            let seq = u64::from_le_bytes(data.try_into().unwrap());
            let (evm, must, may) = &self.expect[&seq];
            assert_eq!(vm.0, *evm);
            let ok =
                must.get(&cid) == Some(&f.id) || may.get(&cid).is_some_and(|s| s.contains(&f.id));
            assert!(
                ok,
                "client {cid} got output {seq} of vm{evm} with id {}",
                f.id
            );
            assert!(
                self.received.insert((cid, seq)),
                "output {seq} twice to {cid}"
            );
            return;
        }
        let what = c
            .outstanding
            .remove(&f.id)
            .unwrap_or_else(|| panic!("client {cid}: reply {} to no request: {resp:?}", f.id));
        match what {
            Sent::Attach(vm) | Sent::Detach(vm) => {
                // Replies to one VM's attaches and detaches come in request order.
                let earlier = c.outstanding.iter().any(|(&id, s)| {
                    id < f.id && (*s == Sent::Attach(vm) || *s == Sent::Detach(vm))
                });
                assert!(
                    !earlier,
                    "client {cid}: reply {} overtook an earlier one",
                    f.id
                );
                assert_eq!(resp, Response::Ok);
                if what == Sent::Attach(vm) {
                    c.confirmed.insert(vm, f.id);
                } else {
                    c.confirmed.remove(&vm);
                }
            }
            Sent::Other => assert!(!matches!(resp, Response::Error(_)), "{resp:?}"),
        }
    }

    fn output(&mut self, vm: u32) {
        self.seq += 1;
        let mut must = BTreeMap::new();
        let mut may = BTreeMap::new();
        for c in &self.clients {
            if c.busy_with(vm) {
                let mut ids: BTreeSet<u32> = c
                    .outstanding
                    .iter()
                    .filter(|(_, s)| **s == Sent::Attach(vm))
                    .map(|(&id, _)| id)
                    .collect();
                ids.extend(c.confirmed.get(&vm));
                may.insert(c.id, ids);
            } else if let Some(&aid) = c.confirmed.get(&vm) {
                must.insert(c.id, aid);
            }
        }
        self.expect.insert(self.seq, (vm, must.clone(), may));
        if let Some(&aid) = self.monitor.attached.get(&vm) {
            let ev = Response::ConsoleOutput {
                vm: VmId(vm),
                data: self.seq.to_le_bytes().to_vec(),
            };
            let mut payload = Vec::new();
            ev.encode_payload(&mut payload);
            let f = Frame {
                version: PROTOCOL_VERSION,
                kind: ev.kind(),
                id: aid,
                payload,
            };
            let mut out = Vec::new();
            self.router.upstream_frame(f, &mut out);
            self.route(out);
        }
        for (c, _) in must {
            assert!(
                self.received.contains(&(c, self.seq)),
                "client {c} attached to vm{vm} missed output {}",
                self.seq
            );
        }
    }

    fn deliver(&mut self, n: usize) {
        for _ in 0..n {
            let Some(f) = self.monitor.queue.pop_front() else {
                return;
            };
            let reply = self.monitor.process(f);
            let mut out = Vec::new();
            self.router.upstream_frame(reply, &mut out);
            self.route(out);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Attach(c, vm) => self.send(
                c,
                Request::ConsoleAttach {
                    vm: VmId(vm),
                    replay: true,
                },
                Sent::Attach(vm),
            ),
            Op::Detach(c, vm) => {
                self.send(c, Request::ConsoleDetach { vm: VmId(vm) }, Sent::Detach(vm))
            }
            Op::Input(c, vm) => self.send(
                c,
                Request::ConsoleInput {
                    vm: VmId(vm),
                    data: b"x".to_vec(),
                },
                Sent::Other,
            ),
            Op::List(c) => self.send(c, Request::List, Sent::Other),
            Op::Output(vm) => self.output(vm),
            Op::Deliver(n) => self.deliver(n),
            Op::Reconnect(slot) => {
                let gone = self.clients[slot].id;
                let mut out = Vec::new();
                self.router.client_gone(gone, &mut out);
                self.route(out);
                self.connect(slot);
            }
            Op::Garbage(c, g) => {
                // Garbage never starts with a frame's magic here, so it cannot swallow a frame.
                let g: Vec<u8> = g.into_iter().filter(|&b| b != b'V').collect();
                let mut out = Vec::new();
                self.router.client_bytes(self.clients[c].id, &g, &mut out);
                assert!(out.is_empty());
            }
        }
    }

    fn settle_and_check(&mut self) {
        while !self.monitor.queue.is_empty() {
            self.deliver(1);
        }
        for c in &self.clients {
            assert!(
                c.outstanding.is_empty(),
                "client {} unanswered: {:?}",
                c.id,
                c.outstanding
            );
        }
        let wanted: BTreeSet<u32> = self
            .clients
            .iter()
            .flat_map(|c| c.confirmed.keys().copied())
            .collect();
        let upstream: BTreeSet<u32> = self.monitor.attached.keys().copied().collect();
        assert_eq!(upstream, wanted, "the monitor's attachments");
        let router: BTreeSet<u32> = self.router.attached_vms().iter().map(|v| v.0).collect();
        assert_eq!(router, wanted);
        assert_eq!(self.router.pending(), 0);
        for vm in 1..4 {
            self.output(vm);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every request gets exactly one reply with its id; output reaches exactly the clients
    /// attached to the VM, with their own attach ids; once everything is delivered the monitor
    /// has the VMs some client is attached to attached, and no others.
    #[test]
    fn router_matches_the_model(ops in proptest::collection::vec(op(), 0..80)) {
        let mut h = Harness::new();
        for op in ops {
            h.apply(op);
        }
        h.settle_and_check();
        prop_assert_eq!(h.router.clients(), 3);
    }
}

#[test]
fn upstream_loss_answers_every_waiting_request_once() {
    let mut r = Router::new("m", 10);
    r.add_client(1);
    r.add_client(2);
    let mut out = Vec::new();
    let frame = |id: u32, req: &Request| {
        let mut b = Vec::new();
        req.encode_frame(id, &mut b).unwrap();
        b
    };
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "x".into(),
    };
    r.client_bytes(1, &frame(1, &hello), &mut out);
    r.client_bytes(2, &frame(1, &hello), &mut out);
    r.client_bytes(1, &frame(2, &Request::List), &mut out);
    r.client_bytes(
        1,
        &frame(
            3,
            &Request::ConsoleAttach {
                vm: VmId(1),
                replay: true,
            },
        ),
        &mut out,
    );
    r.client_bytes(
        2,
        &frame(
            4,
            &Request::ConsoleAttach {
                vm: VmId(1),
                replay: true,
            },
        ),
        &mut out,
    );
    r.client_bytes(
        2,
        &frame(5, &Request::ConsoleDetach { vm: VmId(1) }),
        &mut out,
    );
    // Two hellos answered, two requests upstream (one attach for both clients).
    assert_eq!(out.iter().filter(|o| o.dest == Dest::Upstream).count(), 2);
    out.clear();
    r.upstream_closed(&mut out);
    let mut got: Vec<(Dest, u32)> = out.iter().map(|o| (o.dest, o.frame.id)).collect();
    got.sort_by_key(|(d, id)| (format!("{d:?}"), *id));
    assert_eq!(
        got,
        [
            (Dest::Client(1), 2),
            (Dest::Client(1), 3),
            (Dest::Client(2), 4),
            (Dest::Client(2), 5)
        ]
    );
    for o in &out {
        assert_eq!(
            Response::decode(o.frame.kind, &o.frame.payload).unwrap(),
            Response::Error(ErrorReply::Internal(UPSTREAM_LOST.into()))
        );
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Regression: the mux gave up after 60 s and, until then, its socket did not exist, so
/// `vmfork list` said to start QEMU. Now it listens at once, waits as long as it takes by
/// default, and early clients are told what it waits for and where its log is.
#[test]
fn clients_before_the_monitor_are_told_what_the_mux_waits_for() {
    assert_eq!(
        MuxOptions::new(Path::new("a"), Path::new("b")).connect_wait,
        None
    );
    assert_eq!(
        MuxOptions::new(Path::new("a"), Path::new("b")).hello_wait,
        None
    );
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.sock");
    let listen = dir.path().join("mux.sock");
    let mut o = options(&up, &listen);
    o.connect_wait = None;
    o.hello_wait = None;
    o.hold_early_clients = Duration::from_millis(300);
    let starting = std::thread::spawn(move || Mux::start(&o));
    wait_until("the mux to listen", || UnixStream::connect(&listen).is_ok());
    let log = log_of(&listen);
    match Client::connect(&listen) {
        Err(ClientError::NotReady(m)) => {
            assert!(m.contains("the monitor has not answered yet"), "{m}");
            assert!(m.contains("does not exist yet"), "{m}");
            assert!(m.contains("keeps trying"), "{m}");
            assert!(m.contains(&log.display().to_string()), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // QEMU's socket comes, with a monitor behind it: the mux serves.
    let _fake = FakeMonitor::start(&up, FakeConfig::default()).unwrap();
    let mux = starting.join().unwrap().unwrap();
    assert_eq!(Client::connect(&listen).unwrap().list().unwrap().len(), 1);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("waiting: QEMU's socket"), "{text}");
    assert!(text.contains("serving"), "{text}");
    drop(mux);
}

/// A client that connects shortly before the monitor answers is held, then served normally
/// (its Hello, sent while it waited, answered by the mux).
#[test]
fn an_early_client_is_held_until_the_monitor_answers() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.sock");
    let listen = dir.path().join("mux.sock");
    let mut o = options(&up, &listen);
    o.connect_wait = None;
    o.hold_early_clients = Duration::from_secs(8);
    let starting = std::thread::spawn(move || Mux::start(&o));
    wait_until("the mux to listen", || UnixStream::connect(&listen).is_ok());
    let l2 = listen.clone();
    let client = std::thread::spawn(move || Client::connect(&l2).and_then(|mut c| c.list()));
    std::thread::sleep(Duration::from_millis(300));
    let _fake = FakeMonitor::start(&up, FakeConfig::default()).unwrap();
    let _mux = starting.join().unwrap().unwrap();
    assert_eq!(client.join().unwrap().unwrap().len(), 1);
}

/// With a link path (`--user-socket`), the mux makes it lead to its socket while it serves, and
/// removes it at the end; a link path something live serves already is left alone.
#[test]
fn the_per_user_link_is_made_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.sock");
    let listen = dir.path().join("mux.sock");
    // As $XDG_RUNTIME_DIR: there; its vmfork/ directory is made by the mux.
    std::fs::create_dir(dir.path().join("user")).unwrap();
    let link = dir.path().join("user/vmfork/vmfork.sock");
    let _fake = FakeMonitor::start(&up, FakeConfig::default()).unwrap();
    let mut o = options(&up, &listen);
    o.link = Some(link.clone());
    let mux = Mux::start(&o).unwrap();
    assert_eq!(std::fs::read_link(&link).unwrap(), listen);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(link.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(Client::connect(&link).unwrap().list().unwrap().len(), 1);
    mux.stop();
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "the link is removed"
    );
    // Someone else's live socket there stays.
    let other = UnixListener::bind(&link).unwrap();
    let mux = Mux::start(&o).unwrap();
    assert!(std::fs::read_link(&link).is_err(), "not replaced");
    mux.stop();
    assert!(link.exists());
    drop(other);
}

/// The mux binary with --log: its messages go to the file, and a client that comes while it
/// waits is told, by status 3 and a message naming the log.
#[test]
fn the_mux_binary_logs_to_its_file_and_clients_are_sent_there() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.sock");
    let listen = dir.path().join("mux.sock");
    let log = dir.path().join("mux.log");
    let _mux = Reap(
        bin()
            .args(["mux", "--upstream"])
            .arg(&up)
            .arg("--listen")
            .arg(&listen)
            .arg("--log")
            .arg(&log)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&listen);
    let o = bin()
        .arg("--socket")
        .arg(&listen)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("has not answered yet"), "{err}");
    assert!(
        err.contains(&format!("its log: {}", log.display())),
        "{err}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("starting: serving"), "{text}");
    assert!(text.contains("does not exist yet"), "{text}");
}
