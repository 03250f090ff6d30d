//! A fake monitor for the tool's tests (cargo feature `fake`, off by default: it does not ship
//! in the `vmfork` library): the monitor's own control-protocol server
//! (`vmfork_core::machine::server::Server`) over its own machine model
//! (`VmTable<FakeHost>`: fake physical memory, clock and heap), served on a Unix socket, with a
//! small fake guest in every running VM. Nothing here is a second implementation of the
//! protocol or of the VMs: copy-on-write counts, forks, resets, dumps, restores and diffs are
//! the real code's.
//!
//! What is the fake's own:
//! - The socket front: one thread per connection, each with a `Server` of its own over the one
//!   table (the real monitor has one connection, its virtio console; `vmfork mux` multiplexes).
//!   It feeds received bytes to `Server::input`, runs the fake guest, calls `Server::pump` and
//!   writes out what the server made; with nothing received it still runs the guest and pumps
//!   every few milliseconds, so that console output streams. A connection that goes is ended
//!   for its server as a new client's `Hello` would (its consoles detached, uploads dropped,
//!   dumps closed).
//! - Two knobs the tests use, done in the front and not in the server: a claimed protocol
//!   version other than ours (frames of another version are answered `VersionMismatch` by the
//!   front; frames of the claimed version are passed on as ours and the server's answers sent
//!   back as the claimed version), and fault injection on `DumpRead` (answered `Internal` by the
//!   front from a given offset on, as if the monitor failed half-way through a dump).
//!   A third, in the host: [`FakeMonitor::set_heap_low`] makes the heap look exhausted, which
//!   the real code then answers as the monitor does (`OutOfMemory`).
//! - The fake guest (`Guest`): run between server steps on every running VM, through the
//!   model's real paths, as the scheduler would run a vCPU: it is entered as the scheduler
//!   enters a vCPU (its vGIC and new vmgenid ID applied), reads its UART and writes to it by
//!   trapped MMIO accesses through the exit path (`handle_sync`), and stores to RAM as the
//!   hardware does, taking the stage-2 copy-on-write fault through the exit path when the page
//!   is not writable. It prints `fake guest NAME (vm N) booted` when it first runs,
//!   `vm N: forked from vm P` in a fork, `vm N: restored from snapshot` in a restored VM and
//!   `reset to fork point` after a reset (it tells these apart by a new vmgenid ID and whether it
//!   knew the VM); it echoes its console input, and a line `poke N` writes N pages starting at
//!   page 1 (every page but page 0 at most: a larger N writes those once) and prints
//!   `poked N pages`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::mux::is_retry;
use spin::Mutex;
use vmfork_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use vmfork_core::esr::Esr;
use vmfork_core::guest_dtb::layout;
use vmfork_core::machine::fake::FakeHost;
use vmfork_core::machine::ops::INTERNAL_ID_BASE;
use vmfork_core::machine::server::{self, Server};
use vmfork_core::machine::{
    handle_sync, GuestSpec, Host, NewIdentity, Next, Syndrome, VcpuState, VmState, VmTable,
};
use vmfork_core::physmem::PhysMem;
use vmfork_core::vuart::FR_RXFE;
use vmfork_proto::frame::encode_frame;
use vmfork_proto::{Decoder, ErrorReply, Request, Response, VmInfo, PROTOCOL_VERSION};

/// Guest RAM base, as on QEMU virt.
pub const RAM_BASE: u64 = layout::RAM_BASE;

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

/// A tiny Linux arm64 `Image` (the header and a page of nothing): the kernel of the initial
/// VMs. Tests that create VMs need one too (the real loader checks the header).
pub fn tiny_image() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..4].copy_from_slice(&0x9100_0000u32.to_le_bytes());
    b[16..24].copy_from_slice(&(4096u64).to_le_bytes()); // image_size
    b[56..60].copy_from_slice(b"ARM\x64");
    b
}

type Table = Mutex<VmTable<FakeHost>>;

struct Shared {
    vms: Table,
    guest: StdMutex<Guest>,
    stop: AtomicBool,
    conns: StdMutex<Vec<UnixStream>>,
    config: FakeConfig,
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

fn lock<T>(m: &StdMutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeMonitor {
    /// Binds `path` and serves it on a thread.
    pub fn start(path: &Path, config: FakeConfig) -> io::Result<FakeMonitor> {
        let frames = usize::try_from(config.total_frames).map_err(io::Error::other)?;
        let mut table = VmTable::new(FakeHost::new(frames));
        let kernel = tiny_image();
        for (name, mem, vcpus) in &config.initial_vms {
            table
                .create(&GuestSpec {
                    name: name.clone(),
                    kernel: &kernel,
                    initrd: None,
                    mem: *mem,
                    cpus: *vcpus,
                    cmdline: String::new(),
                })
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        let listener = UnixListener::bind(path)?;
        let shared = Arc::new(Shared {
            vms: Mutex::new(table),
            guest: StdMutex::new(Guest::default()),
            stop: AtomicBool::new(false),
            conns: StdMutex::new(Vec::new()),
            config,
        });
        // The initial VMs boot (and say so) before anyone connects.
        lock(&shared.guest).step(&shared.vms);
        let s = shared.clone();
        let accept = thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(c) = stream.try_clone() {
                    lock(&s.conns).push(c);
                }
                let s = s.clone();
                thread::spawn(move || serve(&s, stream));
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

    /// Makes the monitor's heap look exhausted (or not any more): every heap check of the real
    /// code fails as at the heap's reserve (`FakeHost::heap_low`), so uploads, forks, creates
    /// and `List` are refused with `OutOfMemory` as the monitor refuses them.
    pub fn set_heap_low(&self, low: bool) {
        self.shared.vms.lock().host.heap_low.set(low);
    }

    /// The VMs, as `List` would report them.
    pub fn list(&self) -> Vec<VmInfo> {
        let t = self.shared.vms.lock();
        t.vms
            .iter()
            .filter(|(_, v)| !v.internal)
            .map(|(_, v)| server::info(&t.host, &v))
            .collect()
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

/// How often a connection with nothing received runs the guest and pumps.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// Serves one connection with a server of its own.
fn serve(shared: &Shared, mut stream: UnixStream) {
    let monitor = format!("vmfork fake monitor {}", env!("CARGO_PKG_VERSION"));
    let mut server = Server::new(&shared.vms, monitor);
    let mut front = Front::new(&shared.config);
    if stream.set_read_timeout(Some(IDLE_POLL)).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if is_retry(&e) => 0,
            Err(_) => break,
        };
        let mut out = Vec::new();
        front.input(shared, &mut server, &buf[..n], &mut out);
        if !out.is_empty() && stream.write_all(&out).is_err() {
            break;
        }
    }
    // The client went: end its session as a new client's Hello would (consoles detached,
    // uploads dropped, dumps closed), and drop what that answers.
    let mut hello = Vec::new();
    let bye = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "gone".into(),
    };
    if bye.encode_frame(0, &mut hello).is_ok() {
        let mut sink = Vec::new();
        step(shared, &mut server, &hello, &mut sink);
    }
}

/// Feeds `bytes` to the server and runs it, with the guest between its steps, until it has
/// nothing left to do.
fn step(shared: &Shared, server: &mut Server<'_, FakeHost>, bytes: &[u8], out: &mut Vec<u8>) {
    server.input(bytes, out);
    loop {
        lock(&shared.guest).step(&shared.vms);
        server.pump(out);
        // Kicks are for physical CPUs: the fake guest runs every VM at each step anyway.
        let _ = server.take_kicks();
        if !server.backlog() {
            break;
        }
        server.input(&[], out);
    }
}

/// The socket front's own part: the claimed version and the dump-read fault injection (see the
/// module documentation). With neither, bytes go to the server as they came.
struct Front {
    version: u16,
    fail_dump_reads_from: Option<u64>,
    decoder: Decoder,
}

impl Front {
    fn new(config: &FakeConfig) -> Self {
        Front {
            version: config.version,
            fail_dump_reads_from: config.fail_dump_reads_from,
            decoder: Decoder::with_max_payload(vmfork_proto::MAX_REQUEST_PAYLOAD),
        }
    }

    fn input(
        &mut self,
        shared: &Shared,
        server: &mut Server<'_, FakeHost>,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) {
        if self.version == PROTOCOL_VERSION && self.fail_dump_reads_from.is_none() {
            return step(shared, server, bytes, out);
        }
        // Frame by frame, so that what the front answers itself stays in order. Frames the
        // decoder refuses are dropped here (no test with a knob sends any).
        let frames: Vec<_> = self.decoder.push(bytes).filter_map(Result::ok).collect();
        if frames.is_empty() {
            return self.relay(shared, server, &[], out);
        }
        for f in frames {
            if f.version != self.version {
                let r = Response::Error(ErrorReply::VersionMismatch {
                    ours: self.version,
                    theirs: f.version,
                });
                let _ = r.encode_frame_as(self.version, f.id, out);
                continue;
            }
            if let (Some(at), Ok(Request::DumpRead { offset, .. })) = (
                self.fail_dump_reads_from,
                Request::decode(f.kind, &f.payload),
            ) {
                if offset >= at {
                    let r = Response::Error(ErrorReply::Internal(format!(
                        "injected failure: dump read at {offset}"
                    )));
                    let _ = r.encode_frame_as(self.version, f.id, out);
                    continue;
                }
            }
            let mut frame = Vec::new();
            if encode_frame(PROTOCOL_VERSION, f.kind, f.id, &f.payload, &mut frame).is_ok() {
                self.relay(shared, server, &frame, out);
            }
        }
    }

    /// Runs the server on `bytes` and passes on what it answers as the claimed version.
    fn relay(
        &mut self,
        shared: &Shared,
        server: &mut Server<'_, FakeHost>,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) {
        let mut answers = Vec::new();
        step(shared, server, bytes, &mut answers);
        if self.version == PROTOCOL_VERSION {
            return out.extend_from_slice(&answers);
        }
        for f in Decoder::new().push(&answers).filter_map(Result::ok) {
            let _ = encode_frame(self.version, f.kind, f.id, &f.payload, out);
        }
    }
}

/// Bytes of console input the guest reads in one run, at most.
const READ_PER_RUN: usize = 4096;

/// The fake guest of every VM (see the module documentation). What it keeps outside the VMs is
/// only what a guest would keep in its own memory and registers: which VMs it has run in and
/// the console line typed so far; and the value its next `poke` store writes (different for
/// every store, so that a poked page differs from every other one).
#[derive(Default)]
struct Guest {
    /// VMs it has run in, with the console line typed so far.
    known: HashMap<u32, Vec<u8>>,
    next_value: u64,
}

impl Guest {
    /// Runs every running VM once.
    fn step(&mut self, vms: &Table) {
        let mut t = vms.lock();
        let ids: Vec<u32> = t
            .vms
            .keys()
            .copied()
            .filter(|&id| id < INTERNAL_ID_BASE)
            .collect();
        self.known.retain(|id, _| t.vms.contains_key(id));
        for id in ids {
            self.run(&mut t, id);
        }
    }

    fn run(&mut self, t: &mut VmTable<FakeHost>, id: u32) {
        // Entered as the scheduler enters vCPU 0: only a running VM whose vCPU 0 is not on a
        // CPU; its own vGIC and its new vmgenid ID first.
        let entered = {
            let h = &t.host;
            let Some(mut vm) = t.vms.get_mut(&id) else {
                return;
            };
            let ready = vm.schedulable() && vm.vcpus.first().is_some_and(|v| v.ctx.is_some());
            if !ready {
                return;
            }
            let new_identity = vm.new_identity != NewIdentity::Done;
            let ok = vm.vgic_mut(h).is_some() && vm.apply_new_identity(h);
            ok.then(|| (new_identity, vm.parent, vm.name.clone()))
        };
        let Some((new_identity, parent, name)) = entered else {
            return;
        };
        let hello = match (self.known.contains_key(&id), parent, new_identity) {
            (false, Some(p), _) => Some(format!("vm {id}: forked from vm {p}\r\n")),
            (false, None, true) => Some(format!("vm {id}: restored from snapshot\r\n")),
            (false, None, false) => Some(format!("fake guest {name} (vm {id}) booted\r\n")),
            (true, _, true) => Some("reset to fork point\r\n".to_string()),
            (true, _, false) => None,
        };
        if hello.is_some() {
            self.known.insert(id, Vec::new());
        }
        if let Some(text) = hello {
            if !print(t, id, text.as_bytes()) {
                return;
            }
        }
        for _ in 0..READ_PER_RUN {
            let Some(fr) = mmio(t, id, layout::UART_BASE + 0x18, None) else {
                return;
            };
            if fr & u64::from(FR_RXFE) != 0 {
                return;
            }
            let Some(b) = mmio(t, id, layout::UART_BASE, None) else {
                return;
            };
            let b = b as u8;
            let echo: &[u8] = if b == b'\r' { b"\r\n" } else { &[b] };
            if !print(t, id, echo) {
                return;
            }
            let line = self.known.entry(id).or_default();
            if b == b'\n' || b == b'\r' {
                let line = String::from_utf8_lossy(&std::mem::take(line)).into_owned();
                if !self.command(t, id, line.trim()) {
                    return;
                }
            } else if line.len() < 4096 {
                line.push(b);
            }
        }
    }

    /// Runs a console line; false when the VM stopped running.
    fn command(&mut self, t: &mut VmTable<FakeHost>, id: u32, line: &str) -> bool {
        let Some(n) = line
            .strip_prefix("poke ")
            .and_then(|n| n.trim().parse::<u64>().ok())
        else {
            return true;
        };
        let Some(pages) = t.vms.get(&id).map(|v| v.ram_size / PAGE_SIZE) else {
            return false;
        };
        let span = pages.saturating_sub(1).max(1);
        // Past `span` stores the pages would be written again, which changes nothing a test
        // can see but the values: a huge N does not hold the table for ever.
        for k in 0..n.min(span) {
            let page = 1 + k % span;
            self.next_value += 1;
            let ipa = RAM_BASE + (page % pages.max(1)) * PAGE_SIZE;
            if !store(t, id, ipa, self.next_value) {
                // Paused (no frame for the copy): the guest stops here, as a vCPU would.
                return false;
            }
        }
        print(t, id, format!("poked {n} pages\r\n").as_bytes())
    }
}

/// Writes `text` to the UART's data register, a byte at a time; false when the VM stopped
/// running.
fn print(t: &mut VmTable<FakeHost>, id: u32, text: &[u8]) -> bool {
    text.iter()
        .all(|&b| mmio(t, id, layout::UART_BASE, Some(u64::from(b))).is_some())
}

/// The ESR of a data abort from a lower EL with a valid syndrome: an access of 2^`size_log2`
/// bytes through X1, with fault status `dfsc`.
fn data_abort(write: bool, size_log2: u64, dfsc: u64) -> Esr {
    let ec = 0x24u64;
    let sf = if size_log2 == 3 { 1 << 15 } else { 0 };
    let wnr = if write { 1 << 6 } else { 0 };
    Esr((ec << 26) | (1 << 25) | (1 << 24) | (size_log2 << 22) | (1 << 16) | sf | wnr | dfsc)
}

/// A trapped access of vCPU 0 of VM `id` at `ipa` through the exit path, as the scheduler runs
/// one: the context leaves the VM, the exit is handled, the context goes back. A 32-bit access
/// through X1 (`write` is the value stored), or with `dfsc` a RAM fault of a 64-bit store.
/// Returns X1 afterwards (what a load read), or None when the VM is not to run on.
fn trap(t: &mut VmTable<FakeHost>, id: u32, ipa: u64, write: Option<u64>, esr: Esr) -> Option<u64> {
    let mut ctx = {
        let mut vm = t.vms.get_mut(&id)?;
        let ctx = vm.vcpus.first_mut()?.ctx.take()?;
        vm.vcpus[0].state = VcpuState::Running(0);
        ctx
    };
    ctx.regs.x[1] = write.unwrap_or(0);
    let pc = ctx.regs.pc;
    let syn = Syndrome {
        esr,
        far: ipa & 0xfff,
        hpfar: (ipa >> 12) << 4,
    };
    let (next, _kicks) = handle_sync(t, id, 0, &mut ctx, syn);
    let x1 = ctx.regs.x[1];
    // The guest's "program" does not move: the same instructions serve every access.
    ctx.regs.pc = pc;
    let _ = t.put_back(id, 0, ctx, VcpuState::Runnable);
    let running = t
        .vms
        .get(&id)
        .is_some_and(|v| matches!(v.state, VmState::Running));
    (next == Next::Resume && running).then_some(x1)
}

/// A 32-bit MMIO access of the guest (a device register).
fn mmio(t: &mut VmTable<FakeHost>, id: u32, ipa: u64, write: Option<u64>) -> Option<u64> {
    // A translation fault: devices are not mapped at stage 2.
    trap(t, id, ipa, write, data_abort(write.is_some(), 2, 0b00_0101))
}

/// A guest store of `value` at RAM address `ipa`: straight to memory when the page is mapped
/// writable (as the hardware would), else the stage-2 fault is taken through the exit path
/// (copy-on-write) and the store made again. False when the VM is not to run on (paused for
/// want of a frame, stopped).
fn store(t: &mut VmTable<FakeHost>, id: u32, ipa: u64, value: u64) -> bool {
    for _ in 0..2 {
        let tr = {
            let Some(vm) = t.vms.get(&id) else {
                return false;
            };
            let Some(s2) = vm.s2.as_ref() else {
                return false;
            };
            t.host.with_mem(|cx| s2.translate(&*cx.mem, Ipa(ipa)))
        };
        let Some(tr) = tr else {
            return false;
        };
        if tr.hw_walkable && tr.perms.write {
            t.host
                .with_mem(|cx| cx.mem.write(PhysAddr(tr.pa.0), &value.to_le_bytes()));
            return true;
        }
        // A marker on the walk is a translation fault, a read-only leaf a permission fault.
        let dfsc = if tr.hw_walkable { 0b00_1111 } else { 0b00_0101 };
        if trap(t, id, ipa, Some(value), data_abort(true, 3, dfsc)).is_none() {
            return false;
        }
    }
    false
}
