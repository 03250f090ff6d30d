//! The monitor's side of the control protocol (`vmfork-proto`, docs/PROTOCOL.md): decodes
//! request frames from the virtio console, acts on the VM table, and sends replies and console
//! events. It runs on the boot CPU between vCPU time slices (`control::poll`), never holding the
//! VM lock while it talks to the device, and survives any byte sequence: the decoder skips
//! garbage and bad frames, and a request that cannot be decoded gets a `BadRequest` reply.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::addr::{Ipa, PAGE_SIZE};
use crate::guest_dtb::layout;
use crate::machine::{self, saved as dumpfile};
use vmfork_proto::msg::{
    DiffReport, ErrorReply, GlobalStats, PageRange, PauseReason, Request, Response, StopReason,
    UploadPurpose, VmId, VmInfo, VmState as ProtoState,
};
use vmfork_proto::{Decoder, PROTOCOL_VERSION};

use spin::Mutex;

use super::{ForkError, GuestSpec, Host, Kicks, PendingOp, VcpuCtx, Vm, VmState, VmTable};

/// Console bytes sent in one event.
const CONSOLE_CHUNK: usize = 4096;
/// Reply bytes one [`Server::input`] call makes at most before it leaves the remaining decoded
/// requests queued for the next call (one reply may pass it: a reply is never split).
pub const REPLY_BUDGET: usize = 64 * 1024;
/// Consoles attached at once (each holds a backlog of up to
/// [`crate::machine::CONSOLE_TAP_LIMIT`]).
pub const MAX_ATTACHED_CONSOLES: usize = 16;
/// Guest RAM pages `diff` compares (and a dump scans for non-zero pages) per hold of the VM
/// lock.
pub const DIFF_PAGES_PER_LOCK: u64 = 256;
/// Diffs under way at once; further requests wait, decoded, until one is answered.
pub const MAX_DIFF_JOBS: usize = 4;

/// A `Diff` under way: [`DIFF_PAGES_PER_LOCK`] pages are compared per step of the server.
struct DiffJob {
    id: u32,
    a: VmId,
    b: VmId,
    next: u64,
    report: DiffReport,
}

struct Upload {
    purpose: UploadPurpose,
    total: u64,
    data: Vec<u8>,
}

/// What a request waiting for a fork or reset will answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// `Forked` with the children.
    Fork,
    /// `Ok`.
    Reset,
    /// `DumpReady` for a dump read from the (internal, paused) child of `vm`.
    Dump { vm: u32 },
}

/// Protocol state of the (single) connection, over the table of VMs it serves.
pub struct Server<'a, H: Host> {
    vms: &'a Mutex<VmTable<H>>,
    /// What the monitor says it is in `HelloReply`.
    monitor: String,
    /// CPUs to kick for what the requests did ([`Server::take_kicks`]).
    kicks: Kicks,
    decoder: Decoder,
    /// Requests waiting for a fork or reset to run: request id, ticket, what to answer.
    waiting: Vec<(u32, u64, Waiting)>,
    /// Operations a previous client asked for and did not wait to hear about (a new `Hello`
    /// came): their results are still collected (an internal dump fork is then torn down), but
    /// never sent, since the new client's request ids mean other requests.
    orphans: Vec<(u64, Waiting)>,
    dumps: BTreeMap<u32, dumpfile::Dump>,
    next_dump: u32,
    /// Attached consoles: VM -> the attach request's id.
    consoles: BTreeMap<u32, u32>,
    uploads: BTreeMap<u32, Upload>,
    next_upload: u32,
    /// Decoded requests not handled yet (at most one input chunk's worth: `control::poll`
    /// receives no more while any wait).
    queued: VecDeque<vmfork_proto::Frame>,
    /// Diffs under way, oldest first (one step of the oldest per [`Server::input`]).
    diffs: VecDeque<DiffJob>,
    /// Bad frames seen (logged once each at debug).
    pub bad_frames: u64,
}

impl<'a, H: Host> Server<'a, H> {
    /// A server with no connection state over `vms`; `monitor` is what `HelloReply` names.
    pub fn new(vms: &'a Mutex<VmTable<H>>, monitor: String) -> Self {
        Self {
            vms,
            monitor,
            kicks: Kicks::new(),
            decoder: Decoder::with_max_payload(vmfork_proto::MAX_REQUEST_PAYLOAD),
            waiting: Vec::new(),
            orphans: Vec::new(),
            dumps: BTreeMap::new(),
            next_dump: 1,
            consoles: BTreeMap::new(),
            uploads: BTreeMap::new(),
            next_upload: 1,
            queued: VecDeque::new(),
            diffs: VecDeque::new(),
            bad_frames: 0,
        }
    }

    /// Feeds received bytes (possibly none) and handles the requests they complete, in order,
    /// appending the replies to `out`, until about [`REPLY_BUDGET`] bytes of replies are made:
    /// the rest stay queued ([`Server::backlog`]) for the next call. Every request is answered
    /// exactly once, in the order received.
    pub fn input(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.collect_orphans();
        for f in self.decoder.push(bytes) {
            match f {
                Ok(frame) => self.queued.push_back(frame),
                Err(e) => {
                    self.bad_frames += 1;
                    log::debug!("control: bad input skipped: {e:?}");
                }
            }
        }
        let start = out.len();
        while out.len() - start < REPLY_BUDGET && self.diffs.len() < MAX_DIFF_JOBS {
            let Some(frame) = self.queued.pop_front() else {
                break;
            };
            if frame.version != PROTOCOL_VERSION {
                reply(
                    out,
                    frame.id,
                    Response::Error(ErrorReply::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: frame.version,
                    }),
                );
                continue;
            }
            match Request::decode(frame.kind, &frame.payload) {
                Ok(req) => self.handle(frame.id, req, out),
                Err(e) => reply(
                    out,
                    frame.id,
                    Response::Error(ErrorReply::BadRequest(format!("{e}"))),
                ),
            }
        }
        self.step_diff(out);
    }

    /// What the requests handled so far ask the CPUs to do (taken: cleared).
    pub fn take_kicks(&mut self) -> Kicks {
        core::mem::take(&mut self.kicks)
    }

    /// True while decoded requests wait to be handled or diffs are under way: call
    /// [`Server::input`] again (with no new bytes) before receiving more.
    pub fn backlog(&self) -> bool {
        !self.queued.is_empty() || !self.diffs.is_empty()
    }

    /// One step of the oldest diff: [`DIFF_PAGES_PER_LOCK`] pages under one hold of the VM
    /// lock; its reply once it is done.
    fn step_diff(&mut self, out: &mut Vec<u8>) {
        let Some(job) = self.diffs.front_mut() else {
            return;
        };
        if let Some(resp) = diff_step(self.vms, job) {
            let id = job.id;
            self.diffs.pop_front();
            reply(out, id, resp);
        }
    }

    /// Sends what became ready since the last call: results of forks and resets, console
    /// output of attached VMs.
    pub fn pump(&mut self, out: &mut Vec<u8>) {
        self.collect_orphans();
        let mut still = Vec::new();
        for (id, ticket, what) in core::mem::take(&mut self.waiting) {
            let result = self.vms.lock().take_result(ticket);
            match (result, what) {
                (None, _) => still.push((id, ticket, what)),
                (Some(Err(e)), _) => reply(out, id, Response::Error(fork_error(e))),
                (Some(Ok(children)), Waiting::Fork) => reply(
                    out,
                    id,
                    Response::Forked {
                        children: children.into_iter().map(VmId).collect(),
                    },
                ),
                (Some(Ok(_)), Waiting::Reset) => reply(out, id, Response::Ok),
                (Some(Ok(children)), Waiting::Dump { vm }) => {
                    let resp = self.dump_ready(vm, children.first().copied());
                    reply(out, id, resp);
                }
            }
        }
        self.waiting = still;
        if self.consoles.is_empty() {
            return;
        }
        let mut guard = self.vms.lock();
        let t = &mut *guard;
        let mut gone = Vec::new();
        for (&vm_id, &req) in &self.consoles {
            match t.vms.get_mut(&vm_id) {
                None => gone.push(vm_id),
                Some(mut vm) => {
                    vm.drain_console(&t.host);
                    let data = core::mem::take(&mut vm.console_tap);
                    for chunk in data.chunks(CONSOLE_CHUNK) {
                        reply(
                            out,
                            req,
                            Response::ConsoleOutput {
                                vm: VmId(vm_id),
                                data: chunk.to_vec(),
                            },
                        );
                    }
                }
            }
        }
        // A VM that went while streamed: the rest of its output, then why it went, and the
        // stream is over.
        for g in gone {
            let Some(req) = self.consoles.remove(&g) else {
                continue;
            };
            let (rest, reason) = t
                .take_closed_console(g)
                .unwrap_or_else(|| (Vec::new(), String::from("gone")));
            for chunk in rest.chunks(CONSOLE_CHUNK) {
                reply(
                    out,
                    req,
                    Response::ConsoleOutput {
                        vm: VmId(g),
                        data: chunk.to_vec(),
                    },
                );
            }
            reply(
                out,
                req,
                Response::ConsoleClosed {
                    vm: VmId(g),
                    reason,
                },
            );
        }
    }

    fn handle(&mut self, id: u32, req: Request, out: &mut Vec<u8>) {
        let resp = match req {
            Request::Hello { version, client } => {
                // A new client: whatever the previous one attached is dropped.
                self.detach_all();
                log::debug!("control: hello from {client} (v{version})");
                Response::HelloReply {
                    version: PROTOCOL_VERSION,
                    monitor: self.monitor.clone(),
                }
            }
            Request::List => {
                // One VM per hold of the VM lock, not the whole table at once.
                // The monitor's own forks (a dump's) are not listed.
                // Stopped VMs' records are listed among them, in id order.
                let ids: Vec<u32> = {
                    let t = self.vms.lock();
                    let mut ids: Vec<u32> = t
                        .vms
                        .iter()
                        .filter(|(_, v)| !v.internal)
                        .map(|(id, _)| id)
                        .collect();
                    ids.extend(t.stopped.keys().copied());
                    ids.sort_unstable();
                    drop(t);
                    ids
                };
                // Building the reply takes about four times its encoded size (~120 bytes a
                // VM) at once: that may use the heap's reserve, which is kept for it, but
                // never more than is free.
                let need = ids.len().saturating_mul(4 * 128);
                let mut list = Vec::new();
                let free = self.vms.lock().host.heap_usage().free;
                if free < need || list.try_reserve_exact(ids.len()).is_err() {
                    return reply(out, id, Response::Error(ErrorReply::OutOfMemory));
                }
                for vm in ids {
                    let t = self.vms.lock();
                    let one = match t.vms.get(&vm) {
                        Some(v) => Some(info(&t.host, &v)),
                        None => t.stopped.get(&vm).map(|r| r.info.clone()),
                    };
                    list.extend(one);
                }
                Response::VmList(list)
            }
            Request::Info { vm } => {
                let t = self.vms.lock();
                let r = match t.vms.get(&vm.0) {
                    None => match t.stopped.get(&vm.0) {
                        Some(r) => Response::VmInfo(r.info.clone()),
                        None => Response::Error(ErrorReply::NoSuchVm(vm)),
                    },
                    Some(v) => Response::VmInfo(info(&t.host, &v)),
                };
                r
            }
            Request::Stats { vm } => {
                let t = self.vms.lock();
                let global = global_stats(&t);
                let r = match vm {
                    None => Response::Stats { global, vm: None },
                    Some(v) => match t.vms.get(&v.0) {
                        Some(x) => Response::Stats {
                            global,
                            vm: Some(info(&t.host, &x)),
                        },
                        None => match t.stopped.get(&v.0) {
                            Some(r) => Response::Stats {
                                global,
                                vm: Some(r.info.clone()),
                            },
                            None => Response::Error(ErrorReply::NoSuchVm(v)),
                        },
                    },
                };
                r
            }
            Request::Fork {
                vm,
                count,
                paused,
                remove_on_stop,
            } => {
                if count == 0 || count > 1024 {
                    Response::Error(ErrorReply::BadRequest(format!(
                        "fork count {count}: must be 1 to 1024"
                    )))
                } else {
                    let op = PendingOp::Fork {
                        count,
                        paused,
                        remove_on_stop,
                    };
                    return self.start_op(id, vm, op, out);
                }
            }
            Request::Reset { vm } => {
                return self.start_op(id, vm, PendingOp::Reset, out);
            }
            Request::Pause { vm } => {
                let mut t = self.vms.lock();
                let absent = missing(&t, vm);
                let kicks = match t.vms.get_mut(&vm.0) {
                    None => return reply(out, id, Response::Error(absent)),
                    Some(mut v) => match v.state {
                        VmState::Stopping(_) => {
                            return reply(
                                out,
                                id,
                                Response::Error(ErrorReply::BadRequest(format!(
                                    "vm{} is being torn down",
                                    vm.0
                                ))),
                            )
                        }
                        _ => {
                            v.state = VmState::Paused(machine::PauseReason::Requested);
                            let mut k = Kicks::new();
                            k.extend(v.running_cpus());
                            k
                        }
                    },
                };
                drop(t);
                self.kicks.merge(kicks);
                Response::Ok
            }
            Request::Resume { vm } => {
                let mut t = self.vms.lock();
                let absent = missing(&t, vm);
                let r = match t.vms.get_mut(&vm.0) {
                    None => Response::Error(absent),
                    Some(mut v) => match v.state {
                        VmState::Paused(_) => {
                            v.state = VmState::Running;
                            self.kicks.idle = true;
                            Response::Ok
                        }
                        VmState::Running => Response::Ok,
                        VmState::Stopping(_) => Response::Error(ErrorReply::BadRequest(format!(
                            "vm{} is being torn down",
                            vm.0
                        ))),
                    },
                };
                drop(t);
                r
            }
            Request::Kill { vm } => {
                let mut t = self.vms.lock();
                if !t.vms.contains_key(&vm.0) {
                    Response::Error(missing(&t, vm))
                } else {
                    let kicks = t.stop(vm.0, machine::StopReason::Killed);
                    drop(t);
                    self.kicks.merge(kicks);
                    // An attached console gets the rest of the output and `ConsoleClosed`
                    // (from `pump`), as when the VM goes by itself.
                    Response::Ok
                }
            }
            Request::ConsoleAttach { vm, replay } => {
                let mut guard = self.vms.lock();
                // A stopped VM's console: its last output, then why it went.
                let record = match guard.vms.contains_key(&vm.0) {
                    true => None,
                    false => guard.stopped.get(&vm.0).map(|r| {
                        let history: Vec<u8> = if replay {
                            r.scrollback.iter().copied().collect()
                        } else {
                            Vec::new()
                        };
                        (history, r.why.clone())
                    }),
                };
                if let Some((history, why)) = record {
                    drop(guard);
                    reply(out, id, Response::Ok);
                    for chunk in history.chunks(CONSOLE_CHUNK) {
                        let data = chunk.to_vec();
                        reply(out, id, Response::ConsoleOutput { vm, data });
                    }
                    let closed = Response::ConsoleClosed { vm, reason: why };
                    return reply(out, id, closed);
                }
                let t = &mut *guard;
                let attached = match t.vms.get_mut(&vm.0) {
                    None => Err(Response::Error(ErrorReply::NoSuchVm(vm))),
                    Some(_)
                        if !self.consoles.contains_key(&vm.0)
                            && self.consoles.len() >= MAX_ATTACHED_CONSOLES =>
                    {
                        Err(Response::Error(ErrorReply::BadRequest(format!(
                            "limit reached: {MAX_ATTACHED_CONSOLES} consoles attached already"
                        ))))
                    }
                    Some(mut v) => {
                        // What it printed so far is history (replayed below); what it prints
                        // from now on streams.
                        v.drain_console(&t.host);
                        v.console_attached = true;
                        v.console_tap.clear();
                        let history: Vec<u8> = if replay {
                            v.scrollback.iter().copied().collect()
                        } else {
                            Vec::new()
                        };
                        self.consoles.insert(vm.0, id);
                        Ok(history)
                    }
                };
                drop(guard);
                match attached {
                    Err(r) => r,
                    Ok(history) => {
                        reply(out, id, Response::Ok);
                        for chunk in history.chunks(CONSOLE_CHUNK) {
                            reply(
                                out,
                                id,
                                Response::ConsoleOutput {
                                    vm,
                                    data: chunk.to_vec(),
                                },
                            );
                        }
                        return;
                    }
                }
            }
            Request::ConsoleDetach { vm } => {
                self.consoles.remove(&vm.0);
                if let Some(mut v) = self.vms.lock().vms.get_mut(&vm.0) {
                    v.console_attached = false;
                    v.console_tap.clear();
                }
                Response::Ok
            }
            Request::ConsoleInput { vm, data } => {
                let mut guard = self.vms.lock();
                let t = &mut *guard;
                let mut kicks = Kicks::new();
                let absent = missing(t, vm);
                let r = match t.vms.get_mut(&vm.0) {
                    None => Response::Error(absent),
                    Some(mut v) => {
                        if let Some(k) = v.type_input(&t.host, &data) {
                            v.kick_vcpu(k, &mut kicks);
                        }
                        Response::Ok
                    }
                };
                drop(guard);
                self.kicks.merge(kicks);
                r
            }
            Request::UploadBegin { purpose, total_len } => self.upload_begin(purpose, total_len),
            Request::UploadChunk {
                upload,
                offset,
                data,
            } => self.upload_chunk(upload, offset, &data),
            Request::Create {
                kernel,
                initrd,
                mem_bytes,
                vcpus,
                cmdline,
                paused,
                remove_on_stop,
            } => {
                let flags = (paused, remove_on_stop);
                self.create(kernel, initrd, mem_bytes, vcpus, cmdline, flags)
            }
            Request::Rename { vm, name } => {
                let mut t = self.vms.lock();
                let absent = missing(&t, vm);
                let r = match t.vms.get_mut(&vm.0) {
                    Some(mut v) if !v.internal => match crate::guest_spec::check_name(&name) {
                        Err(why) => {
                            Response::Error(ErrorReply::BadRequest(format!("name {name:?}: {why}")))
                        }
                        Ok(()) => {
                            v.name = name;
                            Response::Ok
                        }
                    },
                    Some(_) => Response::Error(ErrorReply::NoSuchVm(vm)),
                    None => Response::Error(absent),
                };
                r
            }
            Request::Remove { vm, force } => self.remove(vm, force),
            Request::Diff { a, b } => match diff_start(self.vms, id, a, b) {
                Ok(job) => return self.diffs.push_back(job),
                Err(e) => Response::Error(e),
            },
            Request::Dump { vm } => {
                // A paused fork, made now in constant time, is what the snapshot is read from:
                // the VM itself keeps running.
                let op = PendingOp::DumpFork;
                return self.start_waiting(id, vm, op, Waiting::Dump { vm: vm.0 }, out);
            }
            Request::DumpRead {
                dump,
                offset,
                max_len,
            } => match self.dumps.get_mut(&dump) {
                None => Response::Error(ErrorReply::BadRequest(format!("no dump {dump}"))),
                Some(d) => {
                    let max = (max_len as usize).min(vmfork_proto::CHUNK_SIZE);
                    let t = self.vms.lock();
                    match d.read(&t, offset, max) {
                        Ok(data) => Response::DumpData { dump, offset, data },
                        Err(e) => Response::Error(ErrorReply::BadRequest(e)),
                    }
                }
            },
            Request::DumpClose { dump } => self.close_dump(dump),
            Request::Restore {
                upload,
                paused,
                remove_on_stop,
            } => {
                if let Err(e) = self.vms.lock().check_vm_limit(1) {
                    self.uploads.remove(&upload);
                    return reply(out, id, Response::Error(fork_error(e)));
                }
                match self.take_upload(upload, UploadPurpose::Snapshot) {
                    Err(e) => Response::Error(e),
                    Ok(bytes) => {
                        let mut t = self.vms.lock();
                        let result = dumpfile::restore(&mut t, &bytes);
                        if let Ok(vm) = result {
                            // Under the table lock still: it has not run yet.
                            set_start(&mut t, vm, paused, machine::PauseReason::Restored);
                            if let Some(mut v) = t.vms.get_mut(&vm) {
                                v.remove_on_stop = remove_on_stop;
                            }
                        }
                        drop(t);
                        match result {
                            Ok(vm) => {
                                self.kicks.idle |= !paused;
                                Response::Created { vm: VmId(vm) }
                            }
                            Err(e) => Response::Error(ErrorReply::BadRequest(e)),
                        }
                    }
                }
            }
        };
        reply(out, id, resp);
    }

    fn dump_ready(&mut self, source: u32, child: Option<u32>) -> Response {
        let Some(child) = child else {
            return Response::Error(ErrorReply::Internal(String::from("no snapshot fork")));
        };
        let name = self
            .vms
            .lock()
            .vms
            .get(&source)
            .map_or_else(String::new, |v| v.name.clone());
        let begun = dumpfile::begin(&self.vms.lock(), child, &name);
        // The non-zero pages are found DIFF_PAGES_PER_LOCK at a time, the VM lock taken again
        // for each step (the fork being dumped is paused: its memory stays as it is).
        let scanned = begun.and_then(|mut d| loop {
            match d.scan(&self.vms.lock(), DIFF_PAGES_PER_LOCK) {
                Ok(true) => break Ok(d),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        });
        match scanned {
            Ok(d) => {
                let handle = self.next_dump;
                self.next_dump = self.next_dump.wrapping_add(1).max(1);
                let total = d.total;
                self.dumps.insert(handle, d);
                Response::DumpReady {
                    dump: handle,
                    total_len: total,
                }
            }
            Err(e) => {
                let kicks = self
                    .vms
                    .lock()
                    .stop(child, machine::StopReason::DumpDiscarded);
                self.kicks.merge(kicks);
                Response::Error(ErrorReply::Internal(e))
            }
        }
    }

    fn close_dump(&mut self, handle: u32) -> Response {
        match self.dumps.remove(&handle) {
            None => Response::Error(ErrorReply::BadRequest(format!("no dump {handle}"))),
            Some(d) => {
                let kicks = self.vms.lock().stop(d.vm, machine::StopReason::DumpDone);
                self.kicks.merge(kicks);
                Response::Ok
            }
        }
    }

    /// Takes the results of what a previous client left waiting; a dump's internal fork that
    /// nobody will read is torn down.
    fn collect_orphans(&mut self) {
        let mut still = Vec::new();
        for (ticket, what) in core::mem::take(&mut self.orphans) {
            let result = self.vms.lock().take_result(ticket);
            match (result, what) {
                (None, _) => still.push((ticket, what)),
                (Some(Ok(children)), Waiting::Dump { .. }) => {
                    for c in children {
                        let kicks = self.vms.lock().stop(c, machine::StopReason::DumpDiscarded);
                        self.kicks.merge(kicks);
                    }
                }
                (Some(_), _) => {}
            }
        }
        self.orphans = still;
    }

    fn detach_all(&mut self) {
        // What the previous client waits for is answered to nobody (see `orphans`), and its
        // diffs under way are dropped: they only read.
        let waiting = core::mem::take(&mut self.waiting);
        self.orphans
            .extend(waiting.into_iter().map(|(_, ticket, what)| (ticket, what)));
        self.diffs.clear();
        let mut t = self.vms.lock();
        for vm in self.consoles.keys() {
            if let Some(mut v) = t.vms.get_mut(vm) {
                v.console_attached = false;
                v.console_tap.clear();
            }
        }
        self.consoles.clear();
        self.uploads.clear();
        drop(t);
        for handle in self.dumps.keys().copied().collect::<Vec<_>>() {
            let _ = self.close_dump(handle);
        }
    }

    fn start_op(&mut self, id: u32, vm: VmId, op: PendingOp, out: &mut Vec<u8>) {
        let what = match op {
            PendingOp::Fork { .. } => Waiting::Fork,
            PendingOp::Reset => Waiting::Reset,
            PendingOp::DumpFork => Waiting::Dump { vm: vm.0 },
        };
        self.start_waiting(id, vm, op, what, out);
    }

    fn start_waiting(
        &mut self,
        id: u32,
        vm: VmId,
        op: PendingOp,
        what: Waiting,
        out: &mut Vec<u8>,
    ) {
        let result = { self.vms.lock().request(vm.0, op) };
        match result {
            Ok((ticket, kicks)) => {
                self.kicks.merge(kicks);
                self.waiting.push((id, ticket, what));
                self.pump(out);
            }
            Err(ForkError::NoSuchVm(v)) => {
                let e = missing(&self.vms.lock(), VmId(v));
                reply(out, id, Response::Error(e))
            }
            Err(e) => reply(out, id, Response::Error(fork_error(e))),
        }
    }

    /// `Remove`: forgets a stopped VM's record; a live VM only with `force`, killed and then
    /// not recorded.
    fn remove(&mut self, vm: VmId, force: bool) -> Response {
        let mut t = self.vms.lock();
        if t.remove_record(vm.0) {
            return Response::Ok;
        }
        let state = match t.vms.get_mut(&vm.0) {
            Some(mut v) if !v.internal => {
                if force {
                    v.remove_on_stop = true;
                }
                v.state.clone()
            }
            _ => return Response::Error(ErrorReply::NoSuchVm(vm)),
        };
        if !force {
            return Response::Error(ErrorReply::BadRequest(format!(
                "vm{} is {}: kill it first, or remove it with force (vmfork rm --force)",
                vm.0,
                match state {
                    VmState::Running => "running",
                    VmState::Paused(_) => "paused",
                    VmState::Stopping(_) => "stopping",
                }
            )));
        }
        if !matches!(state, VmState::Stopping(_)) {
            let kicks = t.stop(vm.0, machine::StopReason::Killed);
            drop(t);
            self.kicks.merge(kicks);
        }
        Response::Ok
    }

    /// Opens an upload. Nothing is reserved yet: the buffer grows as chunks arrive. Bounded by
    /// `max_uploads=` (uploads open at once) and `max_upload_bytes=` (bytes all open uploads
    /// announce together).
    fn upload_begin(&mut self, purpose: UploadPurpose, total: u64) -> Response {
        let limit = match purpose {
            UploadPurpose::Kernel | UploadPurpose::Initrd => vmfork_proto::MAX_IMAGE_BYTES,
            // Bounded by max_upload_bytes and the monitor's heap in practice.
            UploadPurpose::Snapshot => 4 << 30,
        };
        if total == 0 || total > limit {
            return Response::Error(ErrorReply::BadRequest(format!(
                "upload of {total} bytes: must be 1 to {limit}"
            )));
        }
        let limits = self.vms.lock().limits;
        if self.uploads.len() >= limits.max_uploads as usize {
            return Response::Error(ErrorReply::BadRequest(format!(
                "limit reached: max_uploads={}, {} uploads open already",
                limits.max_uploads,
                self.uploads.len()
            )));
        }
        let announced: u64 = self.uploads.values().map(|u| u.total).sum();
        let max_bytes = limits.max_upload_bytes.unwrap_or(u64::MAX);
        if announced.saturating_add(total) > max_bytes {
            return Response::Error(ErrorReply::BadRequest(format!(
                "limit reached: max_upload_bytes={max_bytes}, {announced} bytes announced by \
                 open uploads already and {total} more asked for"
            )));
        }
        let handle = self.next_upload;
        self.next_upload = self.next_upload.wrapping_add(1).max(1);
        self.uploads.insert(
            handle,
            Upload {
                purpose,
                total,
                data: Vec::new(),
            },
        );
        Response::UploadReady { upload: handle }
    }

    fn upload_chunk(&mut self, handle: u32, offset: u64, data: &[u8]) -> Response {
        let Some(up) = self.uploads.get_mut(&handle) else {
            return Response::Error(ErrorReply::BadRequest(format!("no upload {handle}")));
        };
        if offset != up.data.len() as u64 {
            return Response::Error(ErrorReply::BadRequest(format!(
                "upload {handle}: chunk at offset {offset}, expected {}",
                up.data.len()
            )));
        }
        let needed = up.data.len() as u64 + data.len() as u64;
        if needed > up.total {
            return Response::Error(ErrorReply::BadRequest(format!(
                "upload {handle}: more than the {} bytes announced",
                up.total
            )));
        }
        if needed as usize > up.data.capacity() {
            // Grow geometrically (at most to the announced size), fallibly and only with the
            // heap's reserve left; a growth that fails leaves the upload as it was.
            let target = (up.data.capacity().saturating_mul(2))
                .max(needed as usize)
                .min(up.total as usize);
            let grow = target - up.data.capacity();
            if let Err(e) = self.vms.lock().host.heap_check(target) {
                log::warn!("control: upload {handle} of {} bytes: {e}", up.total);
                return Response::Error(ErrorReply::OutOfMemory);
            }
            if up.data.try_reserve_exact(target - up.data.len()).is_err() {
                log::warn!("control: upload {handle}: no heap for {grow} more bytes");
                return Response::Error(ErrorReply::OutOfMemory);
            }
        }
        up.data.extend_from_slice(data);
        Response::Ok
    }

    fn take_upload(&mut self, handle: u32, purpose: UploadPurpose) -> Result<Vec<u8>, ErrorReply> {
        match self.uploads.remove(&handle) {
            Some(up) if up.purpose == purpose && up.data.len() as u64 == up.total => Ok(up.data),
            Some(up) => {
                let msg = format!(
                    "upload {handle} is not a complete {purpose:?} upload ({} of {} bytes)",
                    up.data.len(),
                    up.total
                );
                Err(ErrorReply::BadRequest(msg))
            }
            None => Err(ErrorReply::BadRequest(format!("no upload {handle}"))),
        }
    }

    fn create(
        &mut self,
        kernel: u32,
        initrd: Option<u32>,
        mem: u64,
        vcpus: u32,
        cmdline: String,
        (paused, remove_on_stop): (bool, bool),
    ) -> Response {
        // The guest limits boot configs and the tool check too (one set of rules).
        if let Err(why) = crate::guest_spec::check_mem(mem) {
            return Response::Error(ErrorReply::BadRequest(format!("memory {mem} bytes: {why}")));
        }
        if let Err(why) = crate::guest_spec::check_cpus(vcpus) {
            return Response::Error(ErrorReply::BadRequest(format!("{vcpus} vCPUs: {why}")));
        }
        if let Err(why) = crate::guest_spec::check_cmdline(&cmdline) {
            return Response::Error(ErrorReply::BadRequest(format!("command line: {why}")));
        }
        let kernel = match self.take_upload(kernel, UploadPurpose::Kernel) {
            Ok(k) => k,
            Err(e) => return Response::Error(e),
        };
        let initrd = match initrd.map(|h| self.take_upload(h, UploadPurpose::Initrd)) {
            None => None,
            Some(Ok(i)) => Some(i),
            Some(Err(e)) => return Response::Error(e),
        };
        if let Err(e) = self.vms.lock().check_vm_limit(1) {
            return Response::Error(fork_error(e));
        }
        // The VM's bookkeeping (vCPU contexts, vGIC, device tree) is built with infallible
        // allocations: ask for a generous estimate of it first.
        let estimate =
            64 * 1024 + vcpus as usize * 4 * core::mem::size_of::<VcpuCtx>() + cmdline.len() * 4;
        if let Err(e) = self.vms.lock().host.heap_check(estimate) {
            log::warn!("control: create refused: {e}");
            return Response::Error(ErrorReply::OutOfMemory);
        }
        let spec = GuestSpec {
            name: String::from("created"),
            kernel: &kernel,
            initrd: initrd.as_deref(),
            mem,
            cpus: vcpus,
            cmdline,
        };
        let mut t = self.vms.lock();
        let result = t.create(&spec);
        if let Ok(vm) = result {
            // Under the table lock still: it has not run yet.
            set_start(&mut t, vm, paused, machine::PauseReason::Created);
            if let Some(mut v) = t.vms.get_mut(&vm) {
                v.remove_on_stop = remove_on_stop;
            }
        }
        drop(t);
        match result {
            Ok(id) => {
                self.kicks.idle |= !paused;
                Response::Created { vm: VmId(id) }
            }
            Err(machine::CreateError::Stage2(crate::stage2::Stage2Error::OutOfMemory)) => {
                Response::Error(ErrorReply::OutOfMemory)
            }
            Err(e) => Response::Error(ErrorReply::BadRequest(format!("{e}"))),
        }
    }
}

/// Leaves new VM `vm` paused for `why` when `paused`.
fn set_start<H: Host>(t: &mut VmTable<H>, vm: u32, paused: bool, why: machine::PauseReason) {
    if paused {
        if let Some(mut v) = t.vms.get_mut(&vm) {
            v.state = VmState::Paused(why);
        }
    }
}

/// The error for a request that needs live VM `vm`, which is not in the table: it stopped
/// (its record is kept), or there is no such VM.
fn missing<H: Host>(t: &VmTable<H>, vm: VmId) -> ErrorReply {
    if t.stopped.contains_key(&vm.0) {
        ErrorReply::VmStopped(vm)
    } else {
        ErrorReply::NoSuchVm(vm)
    }
}

fn reply(out: &mut Vec<u8>, id: u32, resp: Response) {
    if let Err(e) = resp.encode_frame(id, out) {
        // Only a reply over the frame cap gets here; say so instead.
        let msg = Response::Error(ErrorReply::Internal(format!("reply too large: {e}")));
        let _ = msg.encode_frame(id, out);
    }
}

fn fork_error(e: ForkError) -> ErrorReply {
    match e {
        ForkError::NoSuchVm(id) => ErrorReply::NoSuchVm(VmId(id)),
        ForkError::OutOfMemory => ErrorReply::OutOfMemory,
        ForkError::Busy(_) => ErrorReply::Busy,
        ForkError::Internal(m) => ErrorReply::Internal(m),
        e => ErrorReply::BadRequest(format!("{e}")),
    }
}

/// What the tool shows for a VM. Its page counts come from `Stage2::usage_private`: a counter
/// and a walk of its private tables only, never of what it shares (a fork costs O(1)). They
/// count guest RAM: the `microsoft,vmgenid` page, mapped outside RAM, is left out, so a 64 MiB
/// VM has 16,384 pages in all, as `diff` compares.
pub fn info<H: Host>(host: &H, vm: &Vm) -> VmInfo {
    let mut info = info_without_pages(host, vm);
    let counts = vm.s2.as_ref().map(|s2| {
        host.with_mem(|cx| {
            let u = s2.usage_private(cx.frames, &*cx.mem);
            let genid = s2.page_is_private(cx.frames, &*cx.mem, Ipa(layout::VMGENID_BASE));
            (u, genid)
        })
    });
    let (private, shared) = match counts {
        Some((u, genid)) => {
            let (mut p, mut s) = (u.private_frames as u64, u.shared_frames as u64);
            match genid {
                Some(true) => p = p.saturating_sub(1),
                Some(false) => s = s.saturating_sub(1),
                None => {}
            }
            (p, s)
        }
        None => (0, 0),
    };
    info.private_pages = private;
    info.shared_pages = shared;
    info
}

/// [`info`] without the page counts (0): no walk of its tables. What a stopped VM's record
/// keeps.
pub fn info_without_pages<H: Host>(host: &H, vm: &Vm) -> VmInfo {
    let cow = vm.s2.as_ref().map_or(0, |s| {
        let st = s.stats();
        st.cow_copies + st.cow_reuses
    });
    let state = match &vm.state {
        VmState::Running => ProtoState::Running,
        VmState::Paused(machine::PauseReason::OutOfMemory(_)) => ProtoState::Paused {
            reason: PauseReason::OutOfMemory,
        },
        VmState::Paused(machine::PauseReason::Forked) => ProtoState::Paused {
            reason: PauseReason::Forked,
        },
        VmState::Paused(machine::PauseReason::Requested) => ProtoState::Paused {
            reason: PauseReason::Requested,
        },
        VmState::Paused(machine::PauseReason::Created) => ProtoState::Paused {
            reason: PauseReason::Created,
        },
        VmState::Paused(machine::PauseReason::Restored) => ProtoState::Paused {
            reason: PauseReason::Restored,
        },
        VmState::Stopping(r) => ProtoState::Stopped {
            reason: stop_reason(r).unwrap_or(StopReason::Killed),
        },
    };
    // A vCPU on a CPU now has run since it was put there.
    let now = host.now();
    let running: u64 = vm
        .vcpus
        .iter()
        .filter(|v| matches!(v.state, machine::VcpuState::Running(_)))
        .map(|v| now.saturating_sub(v.on_cpu_since))
        .sum();
    VmInfo {
        id: VmId(vm.id),
        parent: vm.parent.map(VmId),
        name: vm.name.clone(),
        state,
        vcpus: vm.vcpus.len() as u32,
        mem_bytes: vm.ram_size,
        private_pages: 0,
        shared_pages: 0,
        cow_faults: cow,
        forks: vm.stats.forks,
        last_fork_ticks: vm.stats.last_fork_ticks,
        uptime_us: host.micros(now.saturating_sub(vm.stats.born)),
        vcpu_us: host.micros(vm.stats.vcpu_ticks.saturating_add(running)),
    }
}

/// What the protocol calls a stop for `r`; `None` for the monitor's own (a dump's fork read
/// out or discarded), which users never see.
pub fn stop_reason(r: &machine::StopReason) -> Option<StopReason> {
    use machine::StopReason as S;
    Some(match r {
        S::PowerOff => StopReason::PowerOff,
        S::SystemReset => StopReason::SystemReset,
        S::Killed => StopReason::Killed,
        S::Fault(s) => StopReason::Fault(s.clone()),
        S::Internal(s) => StopReason::Internal(s.clone()),
        S::DumpDone | S::DumpDiscarded => return None,
    })
}

fn global_stats<H: Host>(t: &VmTable<H>) -> GlobalStats {
    let (free, total) = t
        .host
        .with_mem(|cx| (cx.frames.free_frames(), cx.frames.total_frames()));
    let heap = t.host.heap_usage();
    let limits = t.limits;
    GlobalStats {
        free_frames: free as u64,
        used_frames: (total - free) as u64,
        total_frames: total as u64,
        vms: t.vms.len() as u32,
        counter_hz: t.host.counter_hz(),
        heap_used: heap.used as u64,
        heap_free: heap.free as u64,
        heap_reserve: heap.reserve as u64,
        max_vms: limits.max_vms,
        max_forks_per_tree: limits.max_forks_per_tree,
        stopped_vms: t.stopped.len() as u32,
        max_stopped: limits.max_stopped,
    }
}

/// Starts a diff of VMs `a` and `b` (request `id`): which guest RAM pages differ. The pages are
/// compared by [`diff_step`], [`DIFF_PAGES_PER_LOCK`] at a time, one step per server step, so
/// the VM lock is never held across the scan and the boot CPU runs guests in between.
fn diff_start<H: Host>(
    vms: &Mutex<VmTable<H>>,
    id: u32,
    a: VmId,
    b: VmId,
) -> Result<DiffJob, ErrorReply> {
    let t = vms.lock();
    // A VM diffed with itself is locked once: its lock is not reentrant.
    let Some(va) = t.vms.get(&a.0) else {
        return Err(gone(&t, a, b));
    };
    let other = (b != a).then(|| t.vms.get(&b.0));
    let vb: &Vm = match &other {
        None => &va,
        Some(Some(g)) => g,
        Some(None) => return Err(gone(&t, a, b)),
    };
    Ok(DiffJob {
        id,
        a,
        b,
        next: 0,
        report: DiffReport {
            ram_base: layout::RAM_BASE,
            pages_compared: va.ram_size.min(vb.ram_size) / PAGE_SIZE,
            differing_pages: 0,
            ranges: Vec::new(),
            truncated: false,
        },
    })
}

fn gone<H: Host>(t: &VmTable<H>, a: VmId, b: VmId) -> ErrorReply {
    let absent = if t.vms.contains_key(&a.0) { b } else { a };
    missing(t, absent)
}

/// Compares the next [`DIFF_PAGES_PER_LOCK`] pages of `job`; returns its reply once done. Pages
/// that map the same frame are equal without reading them (the common case within a fork
/// tree). Both VMs are looked up again at every step (a VM killed meanwhile ends the diff with
/// `NoSuchVm`), so only frames they map at that moment are read. A VM that runs meanwhile may
/// change pages already compared: the report is best-effort, each page's verdict right for the
/// moment it was compared.
fn diff_step<H: Host>(vms: &Mutex<VmTable<H>>, job: &mut DiffJob) -> Option<Response> {
    let t = vms.lock();
    // A VM diffed with itself is locked once: its lock is not reentrant.
    let Some(va) = t.vms.get(&job.a.0) else {
        return Some(Response::Error(gone(&t, job.a, job.b)));
    };
    let other = (job.b != job.a).then(|| t.vms.get(&job.b.0));
    let vb: &Vm = match &other {
        None => &va,
        Some(Some(g)) => g,
        Some(None) => return Some(Response::Error(gone(&t, job.a, job.b))),
    };
    let (Some(sa), Some(sb)) = (va.s2.as_ref(), vb.s2.as_ref()) else {
        return Some(Response::Error(ErrorReply::BadRequest(String::from(
            "a VM is being torn down",
        ))));
    };
    let host = &t.host;
    let report = &mut job.report;
    let mut ba = [0u8; PAGE_SIZE as usize];
    let mut bb = [0u8; PAGE_SIZE as usize];
    let end = report.pages_compared.min(job.next + DIFF_PAGES_PER_LOCK);
    for q in job.next..end {
        let ipa = Ipa(layout::RAM_BASE + q * PAGE_SIZE);
        let differs = host.with_mem(|cx| {
            let mem = &*cx.mem;
            let same_frame = match (sa.translate(mem, ipa), sb.translate(mem, ipa)) {
                (Some(x), Some(y)) => x.pa == y.pa,
                _ => false,
            };
            !same_frame && {
                let ra = sa.read_guest(mem, ipa, &mut ba);
                let rb = sb.read_guest(mem, ipa, &mut bb);
                ra.is_err() || rb.is_err() || ba != bb
            }
        });
        if differs {
            report.differing_pages += 1;
            let full = report.ranges.len() >= vmfork_proto::MAX_DIFF_RANGES;
            match report.ranges.last_mut() {
                Some(r) if r.first_page + r.pages == q => r.pages += 1,
                _ if full => report.truncated = true,
                _ => report.ranges.push(PageRange {
                    first_page: q,
                    pages: 1,
                }),
            }
        }
    }
    job.next = end;
    (end == report.pages_compared).then(|| {
        Response::Diff(DiffReport {
            ranges: core::mem::take(&mut report.ranges),
            ..*report
        })
    })
}
