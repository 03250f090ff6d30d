//! A fake monitor: a thread serving the control protocol on a Unix socket over a small in-memory
//! model of VMs. It is the reference semantics of the server side (`docs/PROTOCOL.md` describes
//! it); the tests run the real `vmfork` binary against it.
//!
//! The model: a VM's memory is a vector of pages, each an `Arc<u64>` standing for a frame whose
//! every 64-bit word holds that value. Forking clones the vector (sharing every frame); a write to
//! a frame that anything else references allocates a new frame (a COW fault). A VM keeps its fork
//! point (the vector as it was at fork/creation) so `Reset` can go back to it. The fake guest's
//! console echoes input, and a line `poke N` writes N pages starting at page 1.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use vmfork_proto::frame::FrameError;
use vmfork_proto::snapshot::{self, Snapshot, SnapshotHeader, PAGE_BYTES};
use vmfork_proto::{
    Decoder, DiffReport, ErrorReply, GlobalStats, PageRange, PauseReason, Request, Response,
    StopReason, UploadPurpose, VmId, VmInfo, VmState, CHUNK_SIZE, MAX_DIFF_RANGES, MAX_IMAGE_BYTES,
    MAX_REQUEST_PAYLOAD, PROTOCOL_VERSION,
};

/// Guest RAM base, as on QEMU virt.
pub const RAM_BASE: u64 = 0x4000_0000;
/// Counter frequency the fake reports (QEMU virt's CNTFRQ_EL0).
pub const COUNTER_HZ: u64 = 62_500_000;
/// Ticks the fake reports for each fork.
pub const FORK_TICKS: u64 = 1_000;
/// Most console output a VM keeps for replay on attach.
pub const CONSOLE_LOG: usize = 4096;
/// Most VMs alive at once (the monitor's default `max_vms=`).
pub const MAX_VMS: u32 = 4096;
/// Most forks alive in one fork tree the fake reports (the monitor's default; not enforced).
pub const MAX_FORKS_PER_TREE: u32 = 1024;
/// The fake's "heap": a fixed size, of which a fixed part is the reserve, and a model of its use
/// (a base plus so much per VM).
pub const HEAP_BYTES: u64 = 32 << 20;
/// Reserve the fake reports (the monitor's smallest).
pub const HEAP_RESERVE: u64 = 6 << 20;
/// Heap the fake counts per live VM.
pub const HEAP_PER_VM: u64 = 8 << 10;

/// How the fake monitor starts.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// The protocol version it claims to speak (another value makes it refuse our clients).
    pub version: u16,
    /// Frames (4 KiB) of "physical memory".
    pub total_frames: u64,
    /// VMs running at start: (name, memory bytes, vCPUs).
    pub initial_vms: Vec<(String, u64, u32)>,
    /// Fault injection: a `DumpRead` at this offset or beyond is answered with an `Internal`
    /// error, as if the monitor failed half-way through a dump.
    pub fail_dump_reads_from: Option<u64>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            version: PROTOCOL_VERSION,
            total_frames: 65536,
            initial_vms: vec![("hello".into(), 16 << 20, 1)],
            fail_dump_reads_from: None,
        }
    }
}

type Page = Arc<u64>;
type Out = Arc<Mutex<UnixStream>>;

struct Sub {
    conn: u64,
    attach_id: u32,
    out: Out,
}

struct Vm {
    id: u32,
    parent: Option<u32>,
    name: String,
    state: VmState,
    vcpus: u32,
    cmdline: String,
    pages: Vec<Page>,
    origin: Vec<Page>,
    cow_faults: u64,
    forks: u64,
    last_fork_ticks: u64,
    log: Vec<u8>,
    line: Vec<u8>,
    pending_input: Vec<u8>,
    subs: Vec<Sub>,
}

struct Model {
    vms: BTreeMap<u32, Vm>,
    next_id: u32,
    next_value: u64,
    total_frames: u64,
}

struct Shared {
    model: Mutex<Model>,
    stop: AtomicBool,
    version: u16,
    conns: Mutex<Vec<UnixStream>>,
    fail_dump_reads_from: Option<u64>,
}

/// A running fake monitor. Dropping it stops the server and closes every connection.
pub struct FakeMonitor {
    path: PathBuf,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeMonitor")
            .field("path", &self.path)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeMonitor {
    /// Binds `path` and serves it on a thread.
    pub fn start(path: &Path, config: FakeConfig) -> io::Result<FakeMonitor> {
        let listener = UnixListener::bind(path)?;
        let mut model = Model {
            vms: BTreeMap::new(),
            next_id: 1,
            next_value: 1,
            total_frames: config.total_frames,
        };
        for (name, mem, vcpus) in &config.initial_vms {
            model
                .create(name, b"fake kernel", *mem, *vcpus, "")
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        let shared = Arc::new(Shared {
            model: Mutex::new(model),
            stop: AtomicBool::new(false),
            version: config.version,
            conns: Mutex::new(Vec::new()),
            fail_dump_reads_from: config.fail_dump_reads_from,
        });
        let s = shared.clone();
        let accept = thread::spawn(move || {
            let mut conn_id = 0u64;
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                conn_id += 1;
                if let Ok(c) = stream.try_clone() {
                    lock(&s.conns).push(c);
                }
                let s = s.clone();
                let id = conn_id;
                thread::spawn(move || serve(s, id, stream));
            }
        });
        Ok(FakeMonitor {
            path: path.to_path_buf(),
            shared,
            accept: Some(accept),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VMs, as `List` would report them.
    pub fn list(&self) -> Vec<VmInfo> {
        lock(&self.shared.model).list()
    }
}

impl Drop for FakeMonitor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop. If the socket file is already gone (its directory was removed),
        // the loop cannot be woken: leave the thread to end with the process.
        if UnixStream::connect(&self.path).is_ok() {
            if let Some(h) = self.accept.take() {
                let _ = h.join();
            }
        }
        for c in lock(&self.shared.conns).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Upload {
    purpose: UploadPurpose,
    total: u64,
    data: Vec<u8>,
}

struct Conn {
    id: u64,
    out: Out,
    hello: bool,
    uploads: HashMap<u32, Upload>,
    dumps: HashMap<u32, Vec<u8>>,
    next_handle: u32,
}

fn send(out: &Out, version: u16, id: u32, resp: &Response) -> io::Result<()> {
    let mut buf = Vec::new();
    resp.encode_frame_as(version, id, &mut buf)
        .map_err(|e| io::Error::other(e.to_string()))?;
    lock(out).write_all(&buf)
}

fn serve(shared: Arc<Shared>, conn_id: u64, stream: UnixStream) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut conn = Conn {
        id: conn_id,
        out: Arc::new(Mutex::new(write_half)),
        hello: false,
        uploads: HashMap::new(),
        dumps: HashMap::new(),
        next_handle: 1,
    };
    let mut dec = Decoder::with_max_payload(MAX_REQUEST_PAYLOAD);
    let mut stream = stream;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut replies = Vec::new();
        for r in dec.push(&buf[..n]) {
            match r {
                Ok(frame) if frame.version != shared.version => replies.push((
                    frame.id,
                    Response::Error(ErrorReply::VersionMismatch {
                        ours: shared.version,
                        theirs: frame.version,
                    }),
                )),
                Ok(frame) => {
                    match Request::decode(frame.kind, &frame.payload) {
                        Ok(req) => {
                            // Replies go out in order, after any events the request caused.
                            for reply in handle(&shared, &mut conn, frame.id, req) {
                                replies.push(reply);
                            }
                        }
                        Err(e) => replies.push((
                            frame.id,
                            Response::Error(ErrorReply::BadRequest(e.to_string())),
                        )),
                    }
                }
                Err(FrameError::TooLarge { id, len, max }) => replies.push((
                    id,
                    Response::Error(ErrorReply::BadRequest(format!(
                        "frame of {len} bytes exceeds the request cap of {max}"
                    ))),
                )),
                Err(FrameError::BadCrc { id }) => replies.push((
                    id,
                    Response::Error(ErrorReply::BadRequest("frame CRC mismatch".into())),
                )),
                Err(_) => {}
            }
            // Write as we go so that replies and events interleave in order.
            for (id, r) in replies.drain(..) {
                if send(&conn.out, shared.version, id, &r).is_err() {
                    break;
                }
            }
        }
    }
    // The client vanished: drop its console subscriptions, uploads and dumps.
    let mut m = lock(&shared.model);
    for vm in m.vms.values_mut() {
        vm.subs.retain(|s| s.conn != conn.id);
    }
}

/// Handles one request; returns the frames to send to the requester, in order.
fn handle(shared: &Shared, conn: &mut Conn, id: u32, req: Request) -> Vec<(u32, Response)> {
    let err = |e: ErrorReply| vec![(id, Response::Error(e))];
    let bad = |s: String| vec![(id, Response::Error(ErrorReply::BadRequest(s)))];
    if let Request::Hello { version, .. } = req {
        if version != shared.version {
            return err(ErrorReply::VersionMismatch {
                ours: shared.version,
                theirs: version,
            });
        }
        conn.hello = true;
        return vec![(
            id,
            Response::HelloReply {
                version: shared.version,
                monitor: format!("vmfork fake monitor {}", env!("CARGO_PKG_VERSION")),
            },
        )];
    }
    if !conn.hello {
        return bad("say Hello first".into());
    }
    let mut m = lock(&shared.model);
    let one = |r: Result<Response, ErrorReply>| vec![(id, r.unwrap_or_else(Response::Error))];
    match req {
        Request::Hello { .. } => Vec::new(),
        Request::List => vec![(id, Response::VmList(m.list()))],
        Request::Info { vm } => one(m.info(vm.0).map(Response::VmInfo)),
        Request::Stats { vm } => {
            let info = match vm {
                Some(v) => match m.info(v.0) {
                    Ok(i) => Some(i),
                    Err(e) => return err(e),
                },
                None => None,
            };
            vec![(
                id,
                Response::Stats {
                    global: m.global(),
                    vm: info,
                },
            )]
        }
        Request::Fork { vm, count, paused } => one(m.fork(vm.0, count, paused)),
        Request::Pause { vm } => one(m.pause(vm.0)),
        Request::Resume { vm } => one(m.resume(vm.0)),
        Request::Reset { vm } => one(m.reset(vm.0)),
        Request::Kill { vm } => one(m.kill(vm.0)),
        Request::UploadBegin { purpose, total_len } => {
            if purpose != UploadPurpose::Snapshot && total_len > MAX_IMAGE_BYTES {
                return bad(format!(
                    "image of {total_len} bytes exceeds {MAX_IMAGE_BYTES}"
                ));
            }
            if total_len > m.free_frames().saturating_mul(PAGE_BYTES as u64) {
                return err(ErrorReply::OutOfMemory);
            }
            let h = conn.next_handle;
            conn.next_handle += 1;
            conn.uploads.insert(
                h,
                Upload {
                    purpose,
                    total: total_len,
                    data: Vec::new(),
                },
            );
            vec![(id, Response::UploadReady { upload: h })]
        }
        Request::UploadChunk {
            upload,
            offset,
            data,
        } => {
            let Some(u) = conn.uploads.get_mut(&upload) else {
                return bad(format!("no upload {upload}"));
            };
            if offset != u.data.len() as u64 {
                return bad(format!(
                    "upload {upload}: chunk at offset {offset}, expected {}",
                    u.data.len()
                ));
            }
            if offset + data.len() as u64 > u.total {
                return bad(format!(
                    "upload {upload}: more than the announced {} bytes",
                    u.total
                ));
            }
            u.data.extend_from_slice(&data);
            vec![(id, Response::Ok)]
        }
        Request::Create {
            kernel,
            initrd,
            mem_bytes,
            vcpus,
            cmdline,
        } => {
            let k = match take_upload(conn, kernel, UploadPurpose::Kernel) {
                Ok(k) => k,
                Err(e) => return err(e),
            };
            if let Some(i) = initrd {
                if let Err(e) = take_upload(conn, i, UploadPurpose::Initrd) {
                    return err(e);
                }
            }
            one(m
                .create("guest", &k, mem_bytes, vcpus, &cmdline)
                .map(|vm| Response::Created { vm: VmId(vm) }))
        }
        Request::ConsoleAttach { vm } => {
            let Some(v) = m.vms.get_mut(&vm.0) else {
                return err(ErrorReply::NoSuchVm(vm));
            };
            v.subs.retain(|s| s.conn != conn.id);
            v.subs.push(Sub {
                conn: conn.id,
                attach_id: id,
                out: conn.out.clone(),
            });
            let mut out = vec![(id, Response::Ok)];
            if !v.log.is_empty() {
                out.push((
                    id,
                    Response::ConsoleOutput {
                        vm,
                        data: v.log.clone(),
                    },
                ));
            }
            out
        }
        Request::ConsoleDetach { vm } => {
            let Some(v) = m.vms.get_mut(&vm.0) else {
                return err(ErrorReply::NoSuchVm(vm));
            };
            v.subs.retain(|s| s.conn != conn.id);
            vec![(id, Response::Ok)]
        }
        Request::ConsoleInput { vm, data } => {
            // Release the requester's own output lock order: events are written inside.
            one(m.input(vm.0, &data, shared.version).map(|()| Response::Ok))
        }
        Request::Dump { vm } => match m.dump(vm.0) {
            Ok(bytes) => {
                let h = conn.next_handle;
                conn.next_handle += 1;
                let total_len = bytes.len() as u64;
                conn.dumps.insert(h, bytes);
                vec![(id, Response::DumpReady { dump: h, total_len })]
            }
            Err(e) => err(e),
        },
        Request::DumpRead {
            dump,
            offset,
            max_len,
        } => {
            let Some(d) = conn.dumps.get(&dump) else {
                return bad(format!("no dump {dump}"));
            };
            if shared.fail_dump_reads_from.is_some_and(|at| offset >= at) {
                return err(ErrorReply::Internal(format!(
                    "injected failure: dump read at {offset}"
                )));
            }
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(d.len());
            let len = (max_len as usize).min(CHUNK_SIZE).min(d.len() - start);
            vec![(
                id,
                Response::DumpData {
                    dump,
                    offset,
                    data: d[start..start + len].to_vec(),
                },
            )]
        }
        Request::DumpClose { dump } => {
            if conn.dumps.remove(&dump).is_none() {
                return bad(format!("no dump {dump}"));
            }
            vec![(id, Response::Ok)]
        }
        Request::Restore { upload } => {
            let bytes = match take_upload(conn, upload, UploadPurpose::Snapshot) {
                Ok(b) => b,
                Err(e) => return err(e),
            };
            one(m
                .restore(&bytes)
                .map(|vm| Response::Created { vm: VmId(vm) }))
        }
        Request::Diff { a, b } => one(m.diff(a.0, b.0).map(Response::Diff)),
    }
}

fn take_upload(conn: &mut Conn, h: u32, purpose: UploadPurpose) -> Result<Vec<u8>, ErrorReply> {
    match conn.uploads.get(&h) {
        None => Err(ErrorReply::BadRequest(format!("no upload {h}"))),
        Some(u) if u.purpose != purpose => Err(ErrorReply::BadRequest(format!(
            "upload {h} is not a {purpose:?} upload"
        ))),
        Some(u) if (u.data.len() as u64) != u.total => Err(ErrorReply::BadRequest(format!(
            "upload {h} is incomplete: {} of {} bytes",
            u.data.len(),
            u.total
        ))),
        Some(_) => Ok(conn.uploads.remove(&h).map(|u| u.data).unwrap_or_default()),
    }
}

fn no_such(id: u32) -> ErrorReply {
    ErrorReply::NoSuchVm(VmId(id))
}

/// The 4 KiB contents the fake stands for with page value `v`.
fn page_bytes(v: u64) -> Vec<u8> {
    v.to_le_bytes().repeat(PAGE_BYTES / 8)
}

/// The page value standing for 4 KiB of contents: the repeated word if uniform, else a hash.
fn page_value(data: &[u8]) -> u64 {
    let first = data.get(..8).map_or(0, |w| {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        u64::from_le_bytes(a)
    });
    if data.chunks(8).all(|w| w == first.to_le_bytes()) {
        first
    } else {
        u64::from(vmfork_proto::crc::crc32(data)) | 1 << 63
    }
}

impl Model {
    fn used_frames(&self) -> u64 {
        let mut seen: HashSet<*const u64> = HashSet::new();
        for vm in self.vms.values() {
            for p in vm.pages.iter().chain(&vm.origin) {
                seen.insert(Arc::as_ptr(p));
            }
        }
        seen.len() as u64
    }

    fn free_frames(&self) -> u64 {
        self.total_frames.saturating_sub(self.used_frames())
    }

    fn global(&self) -> GlobalStats {
        let used = self.used_frames();
        GlobalStats {
            free_frames: self.total_frames.saturating_sub(used),
            used_frames: used,
            total_frames: self.total_frames,
            vms: self.vms.len() as u32,
            counter_hz: COUNTER_HZ,
            heap_used: self.heap_used(),
            heap_free: HEAP_BYTES.saturating_sub(self.heap_used()),
            heap_reserve: HEAP_RESERVE,
            max_vms: MAX_VMS,
            max_forks_per_tree: MAX_FORKS_PER_TREE,
        }
    }

    fn heap_used(&self) -> u64 {
        (1 << 20) + self.vms.len() as u64 * HEAP_PER_VM
    }

    /// How many live VMs map each frame.
    fn mappers(&self) -> HashMap<*const u64, u32> {
        let mut n = HashMap::new();
        for vm in self.vms.values() {
            for p in &vm.pages {
                *n.entry(Arc::as_ptr(p)).or_insert(0) += 1;
            }
        }
        n
    }

    fn info_with(&self, vm: &Vm, mappers: &HashMap<*const u64, u32>) -> VmInfo {
        let private = vm
            .pages
            .iter()
            .filter(|p| mappers.get(&Arc::as_ptr(p)).copied().unwrap_or(0) <= 1)
            .count() as u64;
        VmInfo {
            id: VmId(vm.id),
            parent: vm.parent.map(VmId),
            name: vm.name.clone(),
            state: vm.state.clone(),
            vcpus: vm.vcpus,
            mem_bytes: vm.pages.len() as u64 * PAGE_BYTES as u64,
            private_pages: private,
            shared_pages: vm.pages.len() as u64 - private,
            cow_faults: vm.cow_faults,
            forks: vm.forks,
            last_fork_ticks: vm.last_fork_ticks,
        }
    }

    fn list(&self) -> Vec<VmInfo> {
        let m = self.mappers();
        self.vms.values().map(|v| self.info_with(v, &m)).collect()
    }

    fn info(&self, id: u32) -> Result<VmInfo, ErrorReply> {
        let vm = self.vms.get(&id).ok_or(no_such(id))?;
        Ok(self.info_with(vm, &self.mappers()))
    }

    fn new_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn create(
        &mut self,
        name: &str,
        kernel: &[u8],
        mem_bytes: u64,
        vcpus: u32,
        cmdline: &str,
    ) -> Result<u32, ErrorReply> {
        if !(1..=64).contains(&vcpus) {
            return Err(ErrorReply::BadRequest(format!(
                "{vcpus} vCPUs: must be 1 to 64"
            )));
        }
        if mem_bytes < 1 << 20 || !mem_bytes.is_multiple_of(PAGE_BYTES as u64) {
            return Err(ErrorReply::BadRequest(format!(
                "memory of {mem_bytes} bytes: must be a multiple of 4 KiB and at least 1 MiB"
            )));
        }
        if kernel.is_empty() {
            return Err(ErrorReply::BadRequest("empty kernel image".into()));
        }
        let pages = mem_bytes / PAGE_BYTES as u64;
        if pages > self.free_frames() {
            return Err(ErrorReply::OutOfMemory);
        }
        // The kernel is "loaded" at the start of RAM.
        let kpages = kernel.len().div_ceil(PAGE_BYTES);
        let pages: Vec<Page> = (0..pages as usize)
            .map(|i| {
                Arc::new(match kernel.get(i * PAGE_BYTES..) {
                    Some(k) if i < kpages => {
                        u64::from(vmfork_proto::crc::crc32(&k[..k.len().min(PAGE_BYTES)])) | 1
                    }
                    _ => 0,
                })
            })
            .collect();
        let id = self.new_id();
        let name = if name == "guest" {
            format!("guest{id}")
        } else {
            name.to_string()
        };
        let log = format!("fake guest {name} (vm {id}) booted\r\n").into_bytes();
        self.vms.insert(
            id,
            Vm {
                id,
                parent: None,
                name,
                state: VmState::Running,
                vcpus,
                cmdline: cmdline.to_string(),
                origin: pages.clone(),
                pages,
                cow_faults: 0,
                forks: 0,
                last_fork_ticks: 0,
                log,
                line: Vec::new(),
                pending_input: Vec::new(),
                subs: Vec::new(),
            },
        );
        Ok(id)
    }

    fn fork(&mut self, parent: u32, count: u32, paused: bool) -> Result<Response, ErrorReply> {
        if !(1..=1024).contains(&count) {
            return Err(ErrorReply::BadRequest(format!(
                "fork count {count}: must be 1 to 1024"
            )));
        }
        let p = self.vms.get(&parent).ok_or(no_such(parent))?;
        if let VmState::Stopped { .. } = p.state {
            return Err(ErrorReply::BadRequest(format!("vm {parent} is stopped")));
        }
        let alive = self.vms.len() as u32;
        if alive.saturating_add(count) > MAX_VMS {
            return Err(ErrorReply::BadRequest(format!(
                "limit reached: max_vms={MAX_VMS}, {alive} alive and {count} more asked for"
            )));
        }
        let (pname, vcpus, cmdline, pages, first_n) = (
            p.name.clone(),
            p.vcpus,
            p.cmdline.clone(),
            p.pages.clone(),
            p.forks,
        );
        let mut children = Vec::new();
        for k in 0..u64::from(count) {
            let id = self.new_id();
            let log = format!("vm {id}: forked from vm {parent}\r\n").into_bytes();
            self.vms.insert(
                id,
                Vm {
                    id,
                    parent: Some(parent),
                    name: format!("{pname}.{}", first_n + k + 1),
                    state: if paused {
                        VmState::Paused {
                            reason: PauseReason::Forked,
                        }
                    } else {
                        VmState::Running
                    },
                    vcpus,
                    cmdline: cmdline.clone(),
                    pages: pages.clone(),
                    origin: pages.clone(),
                    cow_faults: 0,
                    forks: 0,
                    last_fork_ticks: 0,
                    log,
                    line: Vec::new(),
                    pending_input: Vec::new(),
                    subs: Vec::new(),
                },
            );
            children.push(VmId(id));
        }
        if let Some(p) = self.vms.get_mut(&parent) {
            p.forks += u64::from(count);
            p.last_fork_ticks = FORK_TICKS;
        }
        Ok(Response::Forked { children })
    }

    fn pause(&mut self, id: u32) -> Result<Response, ErrorReply> {
        let vm = self.vms.get_mut(&id).ok_or(no_such(id))?;
        match vm.state {
            VmState::Running => {
                vm.state = VmState::Paused {
                    reason: PauseReason::Requested,
                }
            }
            VmState::Paused { .. } => {}
            VmState::Stopped { .. } => {
                return Err(ErrorReply::BadRequest(format!("vm {id} is stopped")))
            }
        }
        Ok(Response::Ok)
    }

    fn resume(&mut self, id: u32) -> Result<Response, ErrorReply> {
        let vm = self.vms.get_mut(&id).ok_or(no_such(id))?;
        match vm.state {
            VmState::Paused { .. } => vm.state = VmState::Running,
            VmState::Running => {}
            VmState::Stopped { .. } => {
                return Err(ErrorReply::BadRequest(format!("vm {id} is stopped")))
            }
        }
        let pending = std::mem::take(&mut vm.pending_input);
        self.run_input(id, &pending);
        Ok(Response::Ok)
    }

    fn reset(&mut self, id: u32) -> Result<Response, ErrorReply> {
        let vm = self.vms.get_mut(&id).ok_or(no_such(id))?;
        // As the monitor: only a fork has a point to go back to.
        if vm.parent.is_none() {
            return Err(ErrorReply::BadRequest(format!(
                "vm{id} is not a fork: it has no fork point"
            )));
        }
        vm.pages = vm.origin.clone();
        vm.state = VmState::Running;
        vm.line.clear();
        vm.pending_input.clear();
        self.output(id, b"reset to fork point\r\n");
        Ok(Response::Ok)
    }

    fn kill(&mut self, id: u32) -> Result<Response, ErrorReply> {
        let vm = self.vms.remove(&id).ok_or(no_such(id))?;
        // As the monitor: the console stream ends with why the VM went.
        let closed = Response::ConsoleClosed {
            vm: VmId(id),
            reason: "killed by the control channel".into(),
        };
        for s in vm.subs {
            let _ = send_raw(&s.out, s.attach_id, &closed);
        }
        Ok(Response::Ok)
    }

    /// Console input: queued while paused, dropped when stopped.
    fn input(&mut self, id: u32, data: &[u8], _version: u16) -> Result<(), ErrorReply> {
        let vm = self.vms.get_mut(&id).ok_or(no_such(id))?;
        match vm.state {
            VmState::Running => self.run_input(id, data),
            VmState::Paused { .. } => vm.pending_input.extend_from_slice(data),
            VmState::Stopped { .. } => {}
        }
        Ok(())
    }

    /// The fake guest: echo, and run `poke N` lines.
    fn run_input(&mut self, id: u32, data: &[u8]) {
        for &b in data {
            self.output(id, &[b]);
            let Some(vm) = self.vms.get_mut(&id) else {
                return;
            };
            if b == b'\n' || b == b'\r' {
                let line = String::from_utf8_lossy(&std::mem::take(&mut vm.line)).into_owned();
                if b == b'\r' {
                    self.output(id, b"\n");
                }
                self.command(id, line.trim());
            } else {
                vm.line.push(b);
            }
        }
    }

    fn command(&mut self, id: u32, line: &str) {
        let Some(n) = line
            .strip_prefix("poke ")
            .and_then(|n| n.trim().parse::<u64>().ok())
        else {
            return;
        };
        let mut free = self.free_frames();
        let mut written = 0u64;
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let npages = vm.pages.len() as u64;
        for k in 0..n {
            let i = (1 + k % npages.saturating_sub(1).max(1)) as usize % vm.pages.len().max(1);
            let value = self.next_value;
            self.next_value += 1;
            match Arc::get_mut(&mut vm.pages[i]) {
                Some(v) => *v = value,
                None => {
                    if free == 0 {
                        vm.state = VmState::Stopped {
                            reason: StopReason::OutOfMemory,
                        };
                        break;
                    }
                    free -= 1;
                    vm.cow_faults += 1;
                    vm.pages[i] = Arc::new(value);
                }
            }
            written += 1;
        }
        self.output(id, format!("poked {written} pages\r\n").as_bytes());
    }

    /// Guest output: logged for replay, and streamed to attached consoles.
    fn output(&mut self, id: u32, data: &[u8]) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        vm.log.extend_from_slice(data);
        if vm.log.len() > CONSOLE_LOG {
            let cut = vm.log.len() - CONSOLE_LOG;
            vm.log.drain(..cut);
        }
        let resp = Response::ConsoleOutput {
            vm: VmId(id),
            data: data.to_vec(),
        };
        vm.subs
            .retain(|s| send_raw(&s.out, s.attach_id, &resp).is_ok());
    }

    fn dump(&self, id: u32) -> Result<Vec<u8>, ErrorReply> {
        let vm = self.vms.get(&id).ok_or(no_such(id))?;
        let mut out = Vec::new();
        SnapshotHeader {
            name: vm.name.clone(),
            vcpus: vm.vcpus,
            mem_bytes: vm.pages.len() as u64 * PAGE_BYTES as u64,
            ram_base: RAM_BASE,
            cmdline: vm.cmdline.clone(),
            state: vm.log.clone(),
        }
        .encode(&mut out);
        let mut i = 0;
        while i < vm.pages.len() {
            if *vm.pages[i] == 0 {
                i += 1;
                continue;
            }
            let start = i;
            let mut data = Vec::new();
            while i < vm.pages.len() && *vm.pages[i] != 0 && i - start < 256 {
                data.extend(page_bytes(*vm.pages[i]));
                i += 1;
            }
            snapshot::encode_run(start as u64, &data, &mut out);
        }
        snapshot::encode_end(&mut out);
        Ok(out)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<u32, ErrorReply> {
        let mut values = Vec::new();
        let header = Snapshot::visit(bytes, |first, data| {
            for (k, page) in data.chunks(PAGE_BYTES).enumerate() {
                values.push((first + k as u64, page_value(page)));
            }
        })
        .map_err(|e| ErrorReply::BadRequest(format!("not a valid snapshot: {e}")))?;
        let npages = header.mem_bytes / PAGE_BYTES as u64;
        if npages > self.free_frames() {
            return Err(ErrorReply::OutOfMemory);
        }
        if !(1..=64).contains(&header.vcpus) {
            return Err(ErrorReply::BadRequest(
                "snapshot has a bad vCPU count".into(),
            ));
        }
        let mut pages: Vec<Page> = (0..npages).map(|_| Arc::new(0)).collect();
        for (i, v) in values {
            if let Some(p) = pages.get_mut(i as usize) {
                *p = Arc::new(v);
            }
        }
        let id = self.new_id();
        let mut log = header.state.clone();
        log.extend_from_slice(format!("vm {id}: restored from snapshot\r\n").as_bytes());
        self.vms.insert(
            id,
            Vm {
                id,
                parent: None,
                name: header.name,
                state: VmState::Running,
                vcpus: header.vcpus,
                cmdline: header.cmdline,
                origin: pages.clone(),
                pages,
                cow_faults: 0,
                forks: 0,
                last_fork_ticks: 0,
                log,
                line: Vec::new(),
                pending_input: Vec::new(),
                subs: Vec::new(),
            },
        );
        Ok(id)
    }

    fn diff(&self, a: u32, b: u32) -> Result<DiffReport, ErrorReply> {
        let va = self.vms.get(&a).ok_or(no_such(a))?;
        let vb = self.vms.get(&b).ok_or(no_such(b))?;
        let n = va.pages.len().min(vb.pages.len());
        let mut ranges: Vec<PageRange> = Vec::new();
        let mut differing = 0u64;
        let mut truncated = false;
        for i in 0..n {
            let (pa, pb) = (&va.pages[i], &vb.pages[i]);
            if Arc::ptr_eq(pa, pb) || **pa == **pb {
                continue;
            }
            differing += 1;
            let full = ranges.len() == MAX_DIFF_RANGES;
            match ranges.last_mut() {
                Some(r) if r.first_page + r.pages == i as u64 => r.pages += 1,
                _ if full => truncated = true,
                _ => ranges.push(PageRange {
                    first_page: i as u64,
                    pages: 1,
                }),
            }
        }
        Ok(DiffReport {
            ram_base: RAM_BASE,
            pages_compared: n as u64,
            differing_pages: differing,
            ranges,
            truncated,
        })
    }
}

fn send_raw(out: &Out, id: u32, resp: &Response) -> io::Result<()> {
    send(out, PROTOCOL_VERSION, id, resp)
}
