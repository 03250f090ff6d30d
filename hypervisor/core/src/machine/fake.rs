//! A [`Host`] for running the machine model off the hardware: physical memory is a
//! [`FakePhysMem`] over a frame allocator of a chosen size, TLB maintenance is counted, the
//! clock moves on each time it is read, and the heap can be made to look low on purpose. The
//! host tests run whole VMs on it (`tests/machine_model.rs`) and the protocol server
//! (`tests/server.rs`); nothing here runs a guest instruction.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use core::cell::{Cell, RefCell};
use core::fmt;

use super::{El1Sysregs, GuestRegs, HeapLow, HeapUsage, Host};
use crate::addr::{Ipa, PhysAddr, PAGE_SIZE};
use crate::esr::SysRegIss;
use crate::frame::FrameAllocator;
use crate::physmem::FakePhysMem;
use crate::stage2::{MemCtx, TlbOps, Vmid};

/// Where the fake's frames start.
pub const FRAME_BASE: u64 = 0x1_0000_0000;
/// The heap the fake reports when it is not made low.
pub const FAKE_HEAP: usize = 64 << 20;
/// Console lines kept ([`FakeHost::console`]); older ones are dropped.
pub const CONSOLE_LINES: usize = 1024;

/// TLB maintenance, counted, with a model of what the TLBs may hold per VMID (the stage-2 suite
/// checks the per-page rules with its own model): a vCPU entering its guest ([`CountTlb::enter`])
/// may leave entries of its VM's tables under its VMID; `flush_vmid` drops those of one VMID,
/// `flush_all` every one. Entering with a VMID whose entries belong to other tables is a VMID
/// given again without the flush that must come first: `enter` says so.
#[derive(Debug, Default)]
pub struct CountTlb {
    /// Invalidations asked for (`flush_all` included).
    pub flushes: u64,
    /// `flush_all` calls (VMID rollovers).
    pub flush_alls: u64,
    /// For each VMID whose entries the TLBs may hold: the stage-2 root they were walked from.
    pub cached: BTreeMap<u16, u64>,
}

impl CountTlb {
    /// A vCPU enters its guest with `vttbr` (VMID in bits 63:48, the root below). Fails when
    /// the VMID is 0 (a VM without one) or the TLBs may still hold entries of another root
    /// under it (the VMID was given again without a flush).
    pub fn enter(&mut self, vttbr: u64) -> Result<(), String> {
        let vmid = (vttbr >> 48) as u16;
        let root = vttbr & ((1 << 48) - 1);
        if vmid == 0 {
            return Err(format!("a vCPU entered with no VMID (root {root:#x})"));
        }
        match self.cached.insert(vmid, root) {
            Some(old) if old != root => Err(format!(
                "VMID {vmid} given to the tables at {root:#x} while the TLBs may still hold \
                 entries of the tables at {old:#x}: reused without a flush"
            )),
            _ => Ok(()),
        }
    }
}

impl TlbOps for CountTlb {
    fn flush_ipa(&mut self, _: Vmid, _: Ipa) {
        self.flushes += 1;
    }
    fn flush_vmid(&mut self, v: Vmid) {
        self.flushes += 1;
        self.cached.remove(&v.0);
    }
    fn flush_all(&mut self) {
        self.flushes += 1;
        self.flush_alls += 1;
        self.cached.clear();
    }
}

/// The fake's memory: frames, their contents, the TLB counter.
#[derive(Debug)]
pub struct FakeMem {
    /// The frame allocator.
    pub frames: FrameAllocator,
    /// The frames' contents.
    pub mem: FakePhysMem,
    /// TLB maintenance.
    pub tlb: CountTlb,
}

/// A host of fake memory, time and heap.
#[derive(Debug)]
pub struct FakeHost {
    /// Frames, their contents and the TLB counter.
    pub mem: RefCell<FakeMem>,
    /// The counter, moved on by every read.
    pub clock: Cell<u64>,
    /// While set, every heap check and `try_box` fails as if the heap's reserve were reached.
    pub heap_low: Cell<bool>,
    /// The last [`CONSOLE_LINES`] console lines, with their VM.
    pub console: RefCell<VecDeque<(u32, String)>>,
}

impl FakeHost {
    /// A host with `frames` free frames of 4 KiB.
    pub fn new(frames: usize) -> Self {
        let mut fa = FrameAllocator::new(PhysAddr(FRAME_BASE), frames);
        let end = PhysAddr(FRAME_BASE + frames as u64 * PAGE_SIZE);
        fa.add_free(PhysAddr(FRAME_BASE), end)
            .expect("a fresh span is all free");
        Self {
            mem: RefCell::new(FakeMem {
                frames: fa,
                mem: FakePhysMem::new(),
                tlb: CountTlb::default(),
            }),
            clock: Cell::new(1_000_000),
            heap_low: Cell::new(false),
            console: RefCell::new(VecDeque::new()),
        }
    }

    /// Frames free now.
    pub fn free_frames(&self) -> usize {
        self.mem.borrow().frames.free_frames()
    }
}

impl Host for FakeHost {
    type Mem = FakePhysMem;
    type Tlb = CountTlb;

    fn with_mem<R>(&self, f: impl FnOnce(&mut MemCtx<'_, FakePhysMem, CountTlb>) -> R) -> R {
        let mut m = self.mem.borrow_mut();
        let FakeMem { frames, mem, tlb } = &mut *m;
        f(&mut MemCtx { frames, mem, tlb })
    }

    fn now(&self) -> u64 {
        // Time moves on with every look at the clock, as it would.
        let t = self.clock.get() + 17;
        self.clock.set(t);
        t
    }

    fn micros(&self, ticks: u64) -> u64 {
        ticks / 62
    }

    fn counter_hz(&self) -> u64 {
        62_500_000
    }

    fn heap_usage(&self) -> HeapUsage {
        HeapUsage {
            used: 0,
            free: if self.heap_low.get() { 0 } else { FAKE_HEAP },
            reserve: 0,
        }
    }

    fn heap_check(&self, bytes: usize) -> Result<(), HeapLow> {
        if self.heap_low.get() && bytes > 0 {
            Err(HeapLow {
                wanted: bytes,
                free: 0,
                reserve: 0,
            })
        } else {
            Ok(())
        }
    }

    fn try_box<T>(&self, value: T) -> Result<Box<T>, HeapLow> {
        self.heap_check(core::mem::size_of::<T>())?;
        Ok(Box::new(value))
    }

    fn emulate_sysreg(&self, _: &SysRegIss, _: &mut GuestRegs, _: &mut El1Sysregs) -> bool {
        false
    }

    fn vm_log(&self, _: log::Level, _: u32, _: fmt::Arguments<'_>) {}

    fn console_line(&self, vm: u32, line: &str) {
        let mut c = self.console.borrow_mut();
        if c.len() >= CONSOLE_LINES {
            c.pop_front();
        }
        c.push_back((vm, line.to_string()));
    }

    fn vm_gone(&self, _: u32) {}
}

/// A client of the control-protocol server in the same process: requests are encoded as the
/// wire carries them, the server runs until it has nothing left to do, and its frames are
/// decoded again. For host tests of the server and the conformance test against QEMU.
pub struct InProcess<'a> {
    /// The server.
    pub server: super::server::Server<'a, FakeHost>,
    decoder: vmfork_proto::Decoder,
    /// The id the next request gets.
    pub next_id: u32,
    /// Frames received and not taken yet, by request id, in order (replies and events).
    pub replies: alloc::collections::BTreeMap<u32, alloc::vec::Vec<vmfork_proto::Response>>,
}

impl<'a> InProcess<'a> {
    /// A new connection to a server over `vms`.
    pub fn new(vms: &'a spin::Mutex<super::VmTable<FakeHost>>) -> Self {
        Self {
            server: super::server::Server::new(vms, String::from("fake")),
            decoder: vmfork_proto::Decoder::new(),
            next_id: 1,
            replies: alloc::collections::BTreeMap::new(),
        }
    }

    /// Feeds raw bytes (frames, garbage) and runs the server until it has nothing left to do;
    /// what it sends is filed under `replies`. A frame the server sends that does not decode
    /// is an error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut out = alloc::vec::Vec::new();
        self.server.input(bytes, &mut out);
        loop {
            self.server.pump(&mut out);
            let _ = self.server.take_kicks();
            if !self.server.backlog() {
                break;
            }
            self.server.input(&[], &mut out);
        }
        for f in self.decoder.push(&out) {
            let f = f.map_err(|e| alloc::format!("a frame of the server: {e:?}"))?;
            if f.version != vmfork_proto::PROTOCOL_VERSION {
                return Err(alloc::format!("a frame of version {}", f.version));
            }
            let r = vmfork_proto::Response::decode(f.kind, &f.payload)
                .map_err(|e| alloc::format!("a reply of the server: {e:?}"))?;
            self.replies.entry(f.id).or_default().push(r);
        }
        Ok(())
    }

    /// Sends `req`; returns its id.
    pub fn send(&mut self, req: &vmfork_proto::Request) -> Result<u32, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut bytes = alloc::vec::Vec::new();
        req.encode_frame(id, &mut bytes)
            .map_err(|e| alloc::format!("encoding {req:?}: {e:?}"))?;
        self.feed(&bytes)?;
        Ok(id)
    }

    /// Sends `req` and returns its answer, which must be exactly one (console events under
    /// the same id are not answers).
    pub fn call(&mut self, req: vmfork_proto::Request) -> Result<vmfork_proto::Response, String> {
        use vmfork_proto::Response;
        let id = self.send(&req)?;
        let mut r = self.replies.remove(&id).unwrap_or_default();
        r.retain(|x| {
            !matches!(
                x,
                Response::ConsoleOutput { .. } | Response::ConsoleClosed { .. }
            )
        });
        match (r.pop(), r.is_empty()) {
            (Some(answer), true) => Ok(answer),
            (answer, _) => Err(alloc::format!(
                "{req:?} answered {} times: {r:?} {answer:?}",
                r.len() + usize::from(answer.is_some())
            )),
        }
    }
}
