//! Limits on what guests and the control channel can make the monitor hold (issue 11, items 2,
//! 3 and 6): fork bombs from the channel and from a guest, open uploads, pipelined replies, a
//! long diff beside a running VM, and a flood of hostile control messages. In every case the
//! monitor refuses with an error and goes on: QEMU never exits, `list` answers, and killing what
//! was made gives every frame back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vmfork_proto::frame::encode_frame;
use vmfork_proto::msg::{GlobalStats, Request, Response, UploadPurpose, VmId, VmInfo};
use vmfork_proto::{Decoder, ErrorReply, PROTOCOL_VERSION};
use vmfork_tests::{vmfork_ok, vmfork_run, ControlSocket, Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// The id under which the reader reports a damaged frame.
const BAD_FRAME: u32 = u32::MAX;

fn bad(what: String) -> Response {
    Response::Error(ErrorReply::Internal(what))
}

/// A raw protocol client that can pipeline requests. A thread reads and decodes everything the
/// monitor sends as fast as it arrives (a client that stops reading holds the monitor back,
/// which `pipelined_dump_reads_are_all_answered` tests on its own connection).
struct Client {
    s: UnixStream,
    next_id: u32,
    rx: mpsc::Receiver<(u32, Response)>,
    stop: Arc<AtomicBool>,
    /// Replies read and not yet taken, by request id (console events are dropped).
    replies: BTreeMap<u32, Vec<Response>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.s.shutdown(std::net::Shutdown::Both);
    }
}

impl Client {
    fn new(socket: &ControlSocket) -> Self {
        let s = socket.connect(Duration::from_millis(200));
        let mut r = s.try_clone().expect("clone the socket");
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            let mut dec = Decoder::new();
            let mut buf = vec![0u8; 256 * 1024];
            while !stop2.load(Ordering::SeqCst) {
                let n = match r.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(_) => continue, // read timeout
                };
                for f in dec.push(&buf[..n]) {
                    // A damaged frame is reported under id BAD_FRAME, which `collect` refuses.
                    let (id, resp) = match f {
                        Ok(f) => match Response::decode(f.kind, &f.payload) {
                            Ok(r) => (f.id, r),
                            Err(e) => (BAD_FRAME, bad(format!("undecodable reply: {e}"))),
                        },
                        Err(e) => (BAD_FRAME, bad(format!("bad frame: {e:?}"))),
                    };
                    if !matches!(
                        resp,
                        Response::ConsoleOutput { .. } | Response::ConsoleClosed { .. }
                    ) && tx.send((id, resp)).is_err()
                    {
                        return;
                    }
                }
            }
        });
        let mut c = Client {
            s,
            next_id: 1,
            rx,
            stop,
            replies: BTreeMap::new(),
        };
        match c.call(Request::Hello {
            version: PROTOCOL_VERSION,
            client: "vmfork-tests limits".into(),
        }) {
            Response::HelloReply { .. } => {}
            other => panic!("hello: {other:?}"),
        }
        c
    }

    fn frame(&mut self, req: &Request, out: &mut Vec<u8>) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        req.encode_frame(id, out).expect("encode");
        id
    }

    /// Sends all of `reqs` in one write; returns their ids.
    fn pipeline(&mut self, reqs: &[Request]) -> Vec<u32> {
        let mut out = Vec::new();
        let ids = reqs.iter().map(|r| self.frame(r, &mut out)).collect();
        self.write(&out);
        ids
    }

    fn write(&mut self, bytes: &[u8]) {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut rest = bytes;
        while !rest.is_empty() {
            assert!(Instant::now() < deadline, "the monitor stopped reading");
            if let Ok(n) = self.s.write(rest) {
                rest = &rest[n..];
            }
        }
    }

    /// Takes whatever replies have arrived, waiting at most `wait` for the first.
    fn read_some(&mut self, wait: Duration) {
        let mut next = match self.rx.recv_timeout(wait) {
            Ok(x) => Some(x),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the monitor closed the channel (QEMU exited?)")
            }
        };
        while let Some((id, r)) = next {
            self.replies.entry(id).or_default().push(r);
            next = self.rx.try_recv().ok();
        }
    }

    /// Waits for the replies to all of `ids`; each must come exactly once.
    fn collect(&mut self, ids: &[u32]) -> Vec<Response> {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        while !ids.iter().all(|id| self.replies.contains_key(id)) {
            if let Some(e) = self.replies.get(&BAD_FRAME) {
                panic!("the monitor sent a damaged frame: {e:?}");
            }
            let missing = ids
                .iter()
                .filter(|id| !self.replies.contains_key(id))
                .count();
            assert!(
                Instant::now() < deadline,
                "{missing} of {} requests unanswered",
                ids.len()
            );
            self.read_some(Duration::from_millis(200));
        }
        ids.iter()
            .map(|id| {
                let mut v = self.replies.remove(id).unwrap();
                assert_eq!(v.len(), 1, "request {id} answered {} times: {v:?}", v.len());
                v.pop().unwrap()
            })
            .collect()
    }

    fn call(&mut self, req: Request) -> Response {
        let ids = self.pipeline(&[req]);
        self.collect(&ids).pop().unwrap()
    }

    fn list(&mut self) -> Vec<VmInfo> {
        match self.call(Request::List) {
            Response::VmList(v) => v,
            other => panic!("list: {other:?}"),
        }
    }

    fn stats(&mut self) -> GlobalStats {
        match self.call(Request::Stats { vm: None }) {
            Response::Stats { global, .. } => global,
            other => panic!("stats: {other:?}"),
        }
    }

    /// Kills every VM but `keep` (pipelined), keeping no record of them (`Remove` with force),
    /// and waits until they are gone.
    fn kill_all_but(&mut self, keep: &[u32]) {
        let kills: Vec<Request> = self
            .list()
            .iter()
            .filter(|v| !keep.contains(&v.id.0))
            .map(|v| Request::Remove {
                vm: v.id,
                force: true,
            })
            .collect();
        for chunk in kills.chunks(512) {
            let ids = self.pipeline(chunk);
            for r in self.collect(&ids) {
                assert!(matches!(
                    r,
                    Response::Ok | Response::Error(ErrorReply::NoSuchVm(_))
                ));
            }
        }
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        while self.stats().vms as usize != keep.len() {
            assert!(Instant::now() < deadline, "the killed VMs are not gone");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn monitor(name: &str, socket: &ControlSocket, mem_mib: u64, append: &str) -> QemuConfig {
    QemuConfig::monitor()
        .smp(2)
        .mem_mib(mem_mib)
        .name(name)
        .append(append)
        .control(socket)
}

/// Free frames once the monitor has settled: the same reading twice in a row.
fn settled_free_frames(c: &mut Client) -> u64 {
    let mut last = c.stats().free_frames;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = c.stats().free_frames;
        if now == last {
            return now;
        }
        last = now;
    }
}

fn assert_alive(q: &Qemu) {
    assert!(!q.has_exited(), "QEMU exited: the monitor died");
    q.expect_no("panicked");
    q.expect_no("memory allocation of");
}

/// The issue's reproduction: batches of 1024 paused forks of a 16 MiB guest from the channel
/// until the monitor refuses. Before the fix the heap ran out inside a fork and the monitor
/// panicked (QEMU exit 101); now the fork is refused with `OutOfMemory` and nothing changed.
#[test]
fn channel_fork_batches_are_refused_when_the_heap_is_low() {
    let socket = ControlSocket::new();
    let cfg = monitor(
        "limits_fork_batches",
        &socket,
        256,
        "max_vms=1000000 max_forks_per_tree=1000000",
    )
    .guest(0, "counter", "mem=16M");
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm1] counter: tick 2", DEFAULT_TIMEOUT);
    // QEMU's socket takes one client at a time: the raw client and the tool take turns.
    let before = settled_free_frames(&mut Client::new(&socket));
    let mut forks = 0;
    let refusal = loop {
        let out = vmfork_run(&socket, &["fork", "1", "--count", "1024", "--paused"]);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        forks += 1024;
        assert!(forks < 1024 * 1024, "never refused");
    };
    println!("refused after {forks} forks: {refusal}");
    assert!(refusal.contains("out of memory"), "{refusal}");
    assert_alive(&q);
    // Nothing of the refused batch is left, the monitor answers and still forks one.
    let list = vmfork_ok(&socket, &["list"]);
    assert_eq!(
        list.lines().count(),
        1 + 1 + forks,
        "header, vm1, the forks"
    );
    let mut c = Client::new(&socket);
    let stats = c.stats();
    assert!(stats.heap_free >= stats.heap_reserve, "{stats:?}");
    c.kill_all_but(&[1]);
    assert!(matches!(
        c.call(Request::Fork {
            vm: VmId(1),
            count: 1,
            paused: true,
            remove_on_stop: false,
        }),
        Response::Forked { .. }
    ));
    c.kill_all_but(&[1]);
    q.wait_for_regex(r"\[vm1\] counter: tick \d+", DEFAULT_TIMEOUT);
    assert_eq!(settled_free_frames(&mut c), before, "every frame back");
    assert_alive(&q);
    q.kill();
}

fn guest_fork_bomb(name: &str, append: &str, expect_error: &str) -> (Qemu, u64) {
    let socket = ControlSocket::new();
    let cfg = monitor(name, &socket, 256, append)
        .guest(0, "counter", "mem=16M")
        .guest(1, "forkbomb", "mem=16M cmdline=every=500");
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm2] forkbomb: start", DEFAULT_TIMEOUT);
    let mut c = Client::new(&socket);
    let caps = q.wait_for_regex(
        r"\[vm2\] forkbomb: refused after (\d+) forks: (\w+)",
        DEFAULT_TIMEOUT * 4,
    );
    let forks: u64 = caps[1].parse().unwrap();
    println!(
        "{name}: the guest's fork refused after {forks} forks: {}",
        caps[2]
    );
    assert_eq!(caps[2], expect_error, "{caps:?}");
    assert_alive(&q);
    // The well-behaved VM beside it goes on.
    let ticks = q.wait_for_regex(r"\[vm1\] counter: tick (\d+)", DEFAULT_TIMEOUT);
    q.wait_for(
        &format!(
            "[vm1] counter: tick {}",
            ticks[1].parse::<u64>().unwrap() + 2
        ),
        DEFAULT_TIMEOUT,
    );
    let list = c.list();
    assert_eq!(list.len() as u64, 2 + forks, "vm1, vm2 and its children");
    c.kill_all_but(&[1]);
    assert_alive(&q);
    let stats = c.stats();
    assert_eq!(stats.vms, 1);
    q.kill();
    (q, forks)
}

/// A guest forking itself, children waiting in WFI, stopped by `max_forks_per_tree=`: the parent
/// gets `DENIED` after exactly the limit.
#[test]
fn guest_fork_bomb_is_stopped_by_the_tree_limit() {
    let (_q, forks) = guest_fork_bomb("limits_bomb_tree", "max_forks_per_tree=300", "Denied");
    assert_eq!(forks, 300);
}

/// The same fork bomb with no limit in its way: the heap check stops it (the parent gets
/// `INTERNAL_FAILURE`, children that cannot copy their vGIC pause) and the monitor goes on.
/// Before the fix the monitor panicked after ~1,540 forks at `-m 256M`.
#[test]
fn guest_fork_bomb_is_stopped_by_the_heap() {
    let (_q, forks) = guest_fork_bomb(
        "limits_bomb_heap",
        "max_vms=1000000 max_forks_per_tree=1000000",
        "InternalFailure",
    );
    assert!(forks > 100, "only {forks} forks");
}

/// Uploads opened greedily (large first, then smaller) never take the monitor's heap: past
/// `max_uploads=` or `max_upload_bytes=` they are refused, and the monitor still forks, lists
/// and creates. Before the fix each `UploadBegin` reserved its whole size at once, with no limit
/// on how many were open, until the heap was gone and the next allocation panicked.
#[test]
fn open_uploads_are_bounded() {
    let socket = ControlSocket::new();
    let cfg =
        monitor("limits_uploads", &socket, 256, "max_uploads=64").guest(0, "counter", "mem=16M");
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm1] counter: tick 2", DEFAULT_TIMEOUT);
    let mut c = Client::new(&socket);
    let mut open = Vec::new();
    let mut refused = Vec::new();
    let mut size: u64 = 64 << 20;
    while size >= 4096 {
        let r = c.call(Request::UploadBegin {
            purpose: UploadPurpose::Snapshot,
            total_len: size,
        });
        match r {
            Response::UploadReady { upload } => open.push((upload, size)),
            Response::Error(e) => {
                refused.push(format!("{e}"));
                size /= 2;
            }
            other => panic!("{other:?}"),
        }
        assert!(open.len() < 10_000);
    }
    println!("{} uploads open, refusals: {:?}", open.len(), &refused[..3]);
    // What is open leaves the monitor able to work: it forks and lists (before the fix the
    // uploads had reserved the heap and the fork's allocations aborted the monitor).
    let forked = c.call(Request::Fork {
        vm: VmId(1),
        count: 8,
        paused: true,
        remove_on_stop: false,
    });
    assert!(matches!(forked, Response::Forked { .. }), "{forked:?}");
    assert_eq!(c.list().len(), 9);
    assert_alive(&q);
    assert!(
        refused.iter().any(|e| e.contains("limit reached")),
        "{refused:?}"
    );
    // Filling what is open, chunk by chunk, stops with an error before the heap's reserve.
    let mut filled_bytes = 0u64;
    'fill: for &(upload, size) in &open {
        let mut offset = 0;
        while offset < size {
            let n = (size - offset).min(60 * 1024) as usize;
            match c.call(Request::UploadChunk {
                upload,
                offset,
                data: vec![0x5a; n],
            }) {
                Response::Ok => offset += n as u64,
                Response::Error(ErrorReply::OutOfMemory) => break 'fill,
                other => panic!("{other:?}"),
            }
            filled_bytes += n as u64;
        }
    }
    println!("filled {filled_bytes} bytes");
    let stats = c.stats();
    assert!(stats.heap_free >= stats.heap_reserve, "{stats:?}");
    assert_alive(&q);
    // The monitor goes on: it forks and lists, and a new client's Hello drops the uploads.
    let forked = c.call(Request::Fork {
        vm: VmId(1),
        count: 8,
        paused: true,
        remove_on_stop: false,
    });
    assert!(matches!(forked, Response::Forked { .. }), "{forked:?}");
    assert_eq!(c.list().len(), 17);
    drop(c);
    let mut c = Client::new(&socket);
    let r = c.call(Request::UploadBegin {
        purpose: UploadPurpose::Snapshot,
        total_len: 1 << 20,
    });
    assert!(matches!(r, Response::UploadReady { .. }), "{r:?}");
    assert_alive(&q);
    q.kill();
}

/// The whole 48 MiB snapshot of a VM whose memory is non-zero, read by `DumpRead`s of 64 KiB that
/// are all sent before any reply is read: the monitor's replies fill the host socket (the test
/// waits until the bytes waiting in it stop growing) and the monitor has to hold back, which only
/// a throttled port (`virtserialport`) does without losing bytes (a `virtconsole` drops what the
/// socket cannot take: this test lost replies with one). Every request answered exactly once, in
/// order, with the right data, and the dump's non-zero scan done in bounded steps (`Dump::scan`).
#[test]
fn pipelined_dump_reads_are_all_answered() {
    use std::os::unix::io::AsRawFd;

    /// A blocking client without a reader thread, so that replies pile up in the socket.
    struct Raw {
        s: UnixStream,
        dec: Decoder,
        buf: Vec<u8>,
        ready: std::collections::VecDeque<(u32, Response)>,
    }
    impl Raw {
        fn send(&mut self, reqs: &[(u32, Request)]) {
            let mut out = Vec::new();
            for (id, r) in reqs {
                r.encode_frame(*id, &mut out).expect("encode");
            }
            self.s.write_all(&out).expect("write the requests");
        }
        /// The next reply (console output skipped); `what` names it in a failure.
        fn next(&mut self, what: &str) -> (u32, Response) {
            while self.ready.is_empty() {
                let n = match self.s.read(&mut self.buf) {
                    Ok(0) => panic!("{what}: the monitor closed the channel"),
                    Ok(n) => n,
                    Err(e) => panic!("{what}: no reply: {e}"),
                };
                for f in self.dec.push(&self.buf[..n]) {
                    let f = f.unwrap_or_else(|e| panic!("{what}: bad frame: {e:?}"));
                    let r = Response::decode(f.kind, &f.payload)
                        .unwrap_or_else(|e| panic!("{what}: undecodable reply: {e}"));
                    if !matches!(r, Response::ConsoleOutput { .. }) {
                        self.ready.push_back((f.id, r));
                    }
                }
            }
            self.ready.pop_front().unwrap()
        }
        /// Bytes the monitor sent that are waiting in the socket (`FIONREAD`).
        fn unread(&self) -> usize {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD on a socket this test owns writes one c_int through the pointer.
            let rc = unsafe { libc::ioctl(self.s.as_raw_fd(), libc::FIONREAD, &mut n) };
            assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
            n as usize
        }
    }

    let socket = ControlSocket::new();
    let cfg = monitor("limits_dump_reads", &socket, 256, "").guest(
        0,
        "forkloop",
        "mem=64M cmdline=mode=dirty mib=48 pages=12288",
    );
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm2] C", DEFAULT_TIMEOUT);
    let mut c = Raw {
        s: socket.connect(DEFAULT_TIMEOUT),
        dec: Decoder::new(),
        buf: vec![0u8; 256 * 1024],
        ready: Default::default(),
    };
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "vmfork-tests limits raw".into(),
    };
    c.send(&[(1, hello), (2, Request::Dump { vm: VmId(2) })]);
    assert!(matches!(c.next("hello"), (1, Response::HelloReply { .. })));
    let (dump, total) = match c.next("dump") {
        (2, Response::DumpReady { dump, total_len }) => (dump, total_len),
        other => panic!("dump: {other:?}"),
    };
    assert!(
        total > 48 << 20,
        "the snapshot holds the 48 MiB written: {total}"
    );
    let chunk = vmfork_proto::CHUNK_SIZE as u64;
    let n = total.div_ceil(chunk) + 2;
    let reads: Vec<(u32, Request)> = (0..n)
        .map(|i| {
            let req = Request::DumpRead {
                dump,
                offset: (i * chunk).min(total),
                max_len: chunk as u32,
            };
            (3 + i as u32, req)
        })
        .collect();
    // All of them at once (about 20 bytes each: the socket takes them without a reader).
    c.send(&reads);
    // Read nothing until the socket is full: the bytes waiting in it stop growing. The monitor
    // has far more than a socket buffer to send (48 MiB), so it is then being held back.
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let (mut last, mut same) = (0, 0);
    while same < 3 || last < 64 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the replies never filled the socket ({last} bytes waiting)"
        );
        std::thread::sleep(Duration::from_millis(250));
        let now = c.unread();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    println!("{n} reads pipelined; the socket filled with {last} bytes of replies");
    let mut got = 0u64;
    for (i, (id, _)) in reads.iter().enumerate() {
        let what = format!("read {i} of {n}");
        match c.next(&what) {
            (rid, Response::DumpData { offset, data, .. }) if rid == *id => {
                assert_eq!(offset, (i as u64 * chunk).min(total), "{what}");
                assert_eq!(data.len() as u64, chunk.min(total - offset), "{what}");
                got += data.len() as u64;
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(got, total);
    assert!(
        c.ready.is_empty(),
        "replies nobody asked for: {:?}",
        c.ready
    );
    assert_alive(&q);
    c.send(&[(u32::MAX - 1, Request::DumpClose { dump })]);
    assert!(matches!(c.next("close"), (_, Response::Ok)));
    drop(c);
    // A new connection after the old one closed: the channel goes on.
    let mut c = Client::new(&socket);
    assert_eq!(c.list().len(), 2);
    q.kill();
}

/// Counter ticks of vm1 per second of host time over `f`.
fn tick_rate(q: &Qemu, f: impl FnOnce()) -> f64 {
    let count = || q.count("[vm1] counter: tick");
    let (n0, t0) = (count(), Instant::now());
    f();
    let (n1, t1) = (count(), Instant::now());
    (n1 - n0) as f64 / (t1 - t0).as_secs_f64()
}

/// Diffs of two 512 MiB VMs (every page read: their frames all differ) beside a running counter
/// guest: the diff holds the VM lock only for a bounded number of pages at a time, so the
/// counter's exits go on. Compared as a ratio of tick rates with and without diffs running
/// (never a wall-clock bound). Before the fix the lock was held across each whole diff and the
/// counter stalled for its duration (measured: 9.8 ticks/s quiet, 0.00 during the diffs; after
/// it 6 to 9.4).
#[test]
fn a_long_diff_does_not_stall_another_vm() {
    let socket = ControlSocket::new();
    let cfg = monitor("limits_diff_stall", &socket, 2048, "")
        .guest(0, "counter", "mem=16M")
        .guest(1, "counter", "mem=512M")
        .guest(2, "counter", "mem=512M");
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm3] counter: tick 2", DEFAULT_TIMEOUT);
    let mut c = Client::new(&socket);
    for vm in [2, 3] {
        assert!(matches!(
            c.call(Request::Pause { vm: VmId(vm) }),
            Response::Ok
        ));
    }
    q.wait_for("[vm1] counter: tick 20", DEFAULT_TIMEOUT);
    let quiet = tick_rate(&q, || std::thread::sleep(Duration::from_secs(5)));
    let mut pages = 0;
    let busy = tick_rate(&q, || {
        // Three diffs (393,216 pages): about 20 s on a quiet 2-core host, and well inside the
        // 120 s answer deadline on a loaded one (six once took longer than that in CI, with
        // the counter ticking on throughout).
        let ids = c.pipeline(&vec![
            Request::Diff {
                a: VmId(2),
                b: VmId(3)
            };
            3
        ]);
        for r in c.collect(&ids) {
            match r {
                Response::Diff(d) => pages += d.pages_compared,
                other => panic!("diff: {other:?}"),
            }
        }
    });
    println!("counter ticks/s: quiet {quiet:.2}, during {pages} pages of diffs {busy:.2}");
    assert!(quiet > 1.0, "the counter does not run: {quiet}");
    assert!(
        busy >= quiet * 0.3,
        "the counter slowed from {quiet:.2} to {busy:.2} ticks/s during the diffs"
    );
    assert_alive(&q);
    q.kill();
}

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 10,000 hostile control messages: garbage, frames with bad CRCs, over-cap frames, unknown
/// kinds and undecodable payloads, requests with bad handles, forks over the limits, uploads
/// never finished, all pipelined. Every well-formed frame gets exactly one answer; afterwards
/// `vmfork list` answers and, once what the attacker made is killed, the free frames are what
/// they were.
#[test]
fn ten_thousand_hostile_control_messages() {
    let socket = ControlSocket::new();
    let cfg = monitor("limits_hostile", &socket, 512, "max_forks_per_tree=64")
        .guest(0, "counter", "mem=16M");
    let mut q = Qemu::start(cfg);
    q.wait_for("[vm1] counter: tick 2", DEFAULT_TIMEOUT);
    let mut c = Client::new(&socket);
    let before = settled_free_frames(&mut c);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut answered_ids: Vec<u32> = Vec::new();
    let mut sent = 0usize;
    while sent < 10_000 {
        let mut out = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..200 {
            sent += 1;
            match rng.below(10) {
                // Garbage without the magic's first byte.
                0 => {
                    let n = rng.below(300) as usize;
                    out.extend((0..n).map(|_| match rng.next() as u8 {
                        b'V' => b'v',
                        b => b,
                    }));
                }
                // A frame whose payload CRC is wrong: dropped, not answered.
                1 => {
                    let start = out.len();
                    let id = c.next_id;
                    c.next_id += 1;
                    encode_frame(PROTOCOL_VERSION, 0x0002, id, &[1, 2, 3], &mut out).unwrap();
                    let last = out.len() - 1;
                    out[last] ^= 0xff;
                    assert!(out.len() > start);
                }
                // An over-cap frame (valid header, the payload sent and skipped).
                2 => {
                    let id = c.next_id;
                    c.next_id += 1;
                    let payload = vec![0u8; vmfork_proto::MAX_REQUEST_PAYLOAD as usize + 1];
                    encode_frame(PROTOCOL_VERSION, 0x000B, id, &payload, &mut out).unwrap();
                }
                // An unknown kind or an undecodable payload: answered with an error.
                3 => {
                    let id = c.next_id;
                    c.next_id += 1;
                    let kind = rng.below(0x40) as u16;
                    let n = rng.below(64) as usize;
                    let payload: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    encode_frame(PROTOCOL_VERSION, kind, id, &payload, &mut out).unwrap();
                    ids.push(id);
                }
                // Requests with bad handles, bad VMs, absurd sizes, or over the limits.
                _ => {
                    let h = rng.next() as u32;
                    let vm = VmId(if rng.below(4) == 0 { 1 } else { h });
                    let req = match rng.below(12) {
                        0 => Request::DumpRead {
                            dump: h,
                            offset: rng.next(),
                            max_len: u32::MAX,
                        },
                        1 => Request::UploadChunk {
                            upload: h,
                            offset: rng.next(),
                            data: vec![0; rng.below(2048) as usize],
                        },
                        2 => Request::UploadBegin {
                            purpose: UploadPurpose::Snapshot,
                            total_len: rng.next() >> rng.below(64),
                        },
                        3 => Request::Restore {
                            upload: h,
                            paused: false,
                            remove_on_stop: false,
                        },
                        4 => Request::Fork {
                            vm,
                            count: rng.below(2048) as u32,
                            paused: true,
                            remove_on_stop: false,
                        },
                        5 => Request::Kill {
                            vm: VmId(h | 0x8000_0000),
                        },
                        6 => Request::Diff { a: vm, b: VmId(h) },
                        7 => Request::DumpClose { dump: h },
                        8 => Request::ConsoleInput {
                            vm: VmId(h),
                            data: vec![b'x'; 100],
                        },
                        9 => Request::Create {
                            kernel: h,
                            initrd: Some(h ^ 1),
                            mem_bytes: rng.next(),
                            vcpus: rng.next() as u32,
                            cmdline: "x".repeat(rng.below(1000) as usize),
                            paused: false,
                            remove_on_stop: false,
                        },
                        10 => Request::Stats { vm: Some(vm) },
                        _ => Request::List,
                    };
                    ids.push(c.frame(&req, &mut out));
                }
            }
        }
        c.write(&out);
        answered_ids.extend(ids);
    }
    let replies = c.collect(&answered_ids);
    assert_eq!(replies.len(), answered_ids.len());
    let unique: BTreeSet<u32> = answered_ids.iter().copied().collect();
    assert_eq!(unique.len(), answered_ids.len());
    println!(
        "{sent} hostile messages, {} answered; monitor says: {:?}",
        replies.len(),
        c.stats()
    );
    assert_alive(&q);
    c.read_some(Duration::from_millis(500));
    assert!(
        c.replies.is_empty(),
        "answers to frames that must get none: {:?}",
        c.replies.keys().collect::<Vec<_>>()
    );
    drop(c);
    let list = vmfork_ok(&socket, &["list"]);
    assert!(list.lines().count() >= 2, "{list}");
    // A new client's Hello drops the attacker's uploads; its forks are killed.
    let mut c = Client::new(&socket);
    c.kill_all_but(&[1]);
    assert_eq!(settled_free_frames(&mut c), before, "every frame back");
    drop(c);
    let stats = vmfork_ok(&socket, &["stats"]);
    assert!(stats.contains("max_forks_per_tree=64"), "{stats}");
    assert_alive(&q);
    q.kill();
}
