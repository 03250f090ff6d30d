//! The mux's protocol logic: [`Router`], a state machine without I/O. It takes frames from
//! clients and from the monitor and returns the frames to send, as [`Outgoing`] values, so it is
//! tested on its own (tools/vmfork/tests/mux.rs); `super::Mux` runs it over sockets and threads.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use vmfork_proto::msg::kind;
use vmfork_proto::{
    decode_request, Decoder, ErrorReply, Frame, FrameError, Request, Response, VmId,
    MAX_REQUEST_PAYLOAD, PROTOCOL_VERSION,
};

/// Identifies one client connection of the mux.
pub type ClientId = u64;

/// The text of the `Error(Internal)` that waiting clients get when the monitor connection drops.
pub const UPSTREAM_LOST: &str = "vmfork mux: lost the connection to the monitor (did QEMU exit?)";

/// Where a frame the router produced goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// To one client.
    Client(ClientId),
    /// To the monitor.
    Upstream,
}

/// One frame the router wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Where to.
    pub dest: Dest,
    /// The frame.
    pub frame: Frame,
}

/// What the reply to a forwarded request means to the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Pass it to the client.
    Reply,
    /// The reply to a `ConsoleAttach` of this VM (sent on behalf of every waiting client).
    Attach(VmId),
    /// Pass it on; on `Ok` the VM is gone and its console subscribers are told.
    Kill(VmId),
    /// Pass it on; a `DumpReady` handle is recorded for the client (closed if it has gone).
    Dump,
    /// The mux's own request (a detach, a dump close): drop the reply.
    Internal,
}

#[derive(Debug)]
struct Pending {
    /// The client and its request id, for forwarded requests.
    from: Option<(ClientId, u32)>,
    what: Expect,
}

#[derive(Debug)]
struct ClientState {
    decoder: Decoder,
    hello: bool,
    /// Dump handles this client opened and has not closed.
    dumps: BTreeSet<u32>,
}

/// A client whose `ConsoleAttach` waits for the upstream attach reply.
#[derive(Debug)]
struct Waiter {
    client: ClientId,
    attach_id: u32,
    /// Ids of `ConsoleDetach` requests the client sent after this attach, answered after it.
    detach_ids: Vec<u32>,
}

/// One VM's console as the mux sees it.
#[derive(Debug)]
struct Console {
    /// The upstream id of the forwarded `ConsoleAttach`; events carry it once attached.
    upstream_id: u32,
    /// The monitor answered the attach with `Ok`.
    attached: bool,
    /// Attached clients and their attach ids (only when `attached`).
    subs: BTreeMap<ClientId, u32>,
    /// Clients waiting for the attach reply (only while not `attached`).
    waiting: Vec<Waiter>,
}

/// The mux's protocol logic, without I/O: feed it client bytes, client disconnects and upstream
/// frames; it appends the frames to send to an output list, in order.
#[derive(Debug)]
pub struct Router {
    monitor: String,
    next_uid: u32,
    clients: HashMap<ClientId, ClientState>,
    pending: HashMap<u32, Pending>,
    consoles: BTreeMap<VmId, Console>,
    /// Upstream attach id -> VM, for routing console events.
    attach_ids: HashMap<u32, VmId>,
    bad_frames: u64,
}

fn response_frame(id: u32, r: &Response) -> Frame {
    let mut payload = Vec::new();
    r.encode_payload(&mut payload);
    Frame {
        version: PROTOCOL_VERSION,
        kind: r.kind(),
        id,
        payload,
    }
}

fn request_frame(id: u32, r: &Request) -> Frame {
    let mut payload = Vec::new();
    r.encode_payload(&mut payload);
    Frame {
        version: PROTOCOL_VERSION,
        kind: r.kind(),
        id,
        payload,
    }
}

impl Router {
    /// A router for a monitor that called itself `monitor` in its `HelloReply`. Upstream ids are
    /// handed out from `first_uid` on (ids below it were used by the handshake).
    pub fn new(monitor: &str, first_uid: u32) -> Router {
        Router {
            monitor: format!("{monitor} (via vmfork mux {})", env!("CARGO_PKG_VERSION")),
            next_uid: first_uid.max(1),
            clients: HashMap::new(),
            pending: HashMap::new(),
            consoles: BTreeMap::new(),
            attach_ids: HashMap::new(),
            bad_frames: 0,
        }
    }

    /// The text clients get in `HelloReply`.
    pub fn monitor(&self) -> &str {
        &self.monitor
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Requests forwarded upstream and not answered yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// VMs whose console the mux has attached upstream (attach answered `Ok`).
    pub fn attached_vms(&self) -> Vec<VmId> {
        self.consoles
            .iter()
            .filter(|(_, c)| c.attached)
            .map(|(vm, _)| *vm)
            .collect()
    }

    /// Damaged or garbage input skipped so far (from clients and upstream).
    pub fn bad_frames(&self) -> u64 {
        self.bad_frames
    }

    /// A new client connection.
    pub fn add_client(&mut self, c: ClientId) {
        self.clients.insert(
            c,
            ClientState {
                decoder: Decoder::with_max_payload(MAX_REQUEST_PAYLOAD),
                hello: false,
                dumps: BTreeSet::new(),
            },
        );
    }

    fn alloc_uid(&mut self) -> u32 {
        loop {
            let id = self.next_uid;
            self.next_uid = self.next_uid.wrapping_add(1);
            if id != 0 && !self.pending.contains_key(&id) && !self.attach_ids.contains_key(&id) {
                return id;
            }
        }
    }

    fn reply(out: &mut Vec<Outgoing>, c: ClientId, id: u32, r: &Response) {
        out.push(Outgoing {
            dest: Dest::Client(c),
            frame: response_frame(id, r),
        });
    }

    fn internal(&mut self, req: &Request, out: &mut Vec<Outgoing>) {
        let uid = self.alloc_uid();
        self.pending.insert(
            uid,
            Pending {
                from: None,
                what: Expect::Internal,
            },
        );
        out.push(Outgoing {
            dest: Dest::Upstream,
            frame: request_frame(uid, req),
        });
    }

    /// Bytes received from client `c` (any amount, any content).
    pub fn client_bytes(&mut self, c: ClientId, bytes: &[u8], out: &mut Vec<Outgoing>) {
        let Some(st) = self.clients.get_mut(&c) else {
            return;
        };
        let frames: Vec<Result<Frame, FrameError>> = st.decoder.push(bytes).collect();
        for r in frames {
            match r {
                Ok(f) => self.client_frame(c, f, out),
                Err(FrameError::TooLarge { id, len, max }) => {
                    self.bad_frames += 1;
                    let e = ErrorReply::BadRequest(format!(
                        "frame of {len} bytes exceeds the request cap of {max}"
                    ));
                    Self::reply(out, c, id, &Response::Error(e));
                }
                Err(FrameError::BadCrc { id }) => {
                    self.bad_frames += 1;
                    let e = ErrorReply::BadRequest("frame CRC mismatch".into());
                    Self::reply(out, c, id, &Response::Error(e));
                }
                Err(FrameError::Garbage { .. } | FrameError::BadHeaderCrc) => {
                    self.bad_frames += 1;
                }
            }
        }
    }

    fn client_frame(&mut self, c: ClientId, f: Frame, out: &mut Vec<Outgoing>) {
        let req = match decode_request(&f) {
            Ok(r) => r,
            Err(e) => return Self::reply(out, c, f.id, &Response::Error(e)),
        };
        let Some(st) = self.clients.get_mut(&c) else {
            return;
        };
        if let Request::Hello { version, .. } = req {
            let r = if version == PROTOCOL_VERSION {
                st.hello = true;
                Response::HelloReply {
                    version: PROTOCOL_VERSION,
                    monitor: self.monitor.clone(),
                }
            } else {
                Response::Error(ErrorReply::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                })
            };
            return Self::reply(out, c, f.id, &r);
        }
        if !st.hello {
            let e = ErrorReply::BadRequest("say Hello first".into());
            return Self::reply(out, c, f.id, &Response::Error(e));
        }
        let what = match req {
            Request::ConsoleAttach { vm, replay } => return self.attach(c, f.id, vm, replay, out),
            Request::ConsoleDetach { vm } => return self.detach(c, f.id, vm, out),
            Request::Kill { vm } => Expect::Kill(vm),
            Request::Dump { .. } => Expect::Dump,
            Request::DumpClose { dump } => {
                st.dumps.remove(&dump);
                Expect::Reply
            }
            _ => Expect::Reply,
        };
        let uid = self.alloc_uid();
        self.pending.insert(
            uid,
            Pending {
                from: Some((c, f.id)),
                what,
            },
        );
        out.push(Outgoing {
            dest: Dest::Upstream,
            frame: Frame { id: uid, ..f },
        });
    }

    /// A client attaches to `vm`'s console. The first one's `replay` is what the one upstream
    /// attachment asks for; a client that joins an attachment under way gets what streams from
    /// then on.
    fn attach(&mut self, c: ClientId, id: u32, vm: VmId, replay: bool, out: &mut Vec<Outgoing>) {
        match self.consoles.get_mut(&vm) {
            Some(con) if con.attached => {
                // Like the monitor: a second attach from one connection replaces the first.
                con.subs.insert(c, id);
                Self::reply(out, c, id, &Response::Ok);
            }
            Some(con) => con.waiting.push(Waiter {
                client: c,
                attach_id: id,
                detach_ids: Vec::new(),
            }),
            None => {
                let uid = self.alloc_uid();
                self.pending.insert(
                    uid,
                    Pending {
                        from: None,
                        what: Expect::Attach(vm),
                    },
                );
                self.consoles.insert(
                    vm,
                    Console {
                        upstream_id: uid,
                        attached: false,
                        subs: BTreeMap::new(),
                        waiting: vec![Waiter {
                            client: c,
                            attach_id: id,
                            detach_ids: Vec::new(),
                        }],
                    },
                );
                out.push(Outgoing {
                    dest: Dest::Upstream,
                    frame: request_frame(uid, &Request::ConsoleAttach { vm, replay }),
                });
            }
        }
    }

    fn detach(&mut self, c: ClientId, id: u32, vm: VmId, out: &mut Vec<Outgoing>) {
        if let Some(con) = self.consoles.get_mut(&vm) {
            if con.subs.remove(&c).is_some() {
                Self::reply(out, c, id, &Response::Ok);
                self.release_if_unused(vm, out);
                return;
            }
            if let Some(w) = con.waiting.iter_mut().rev().find(|w| w.client == c) {
                // Answered right after the attach it follows.
                w.detach_ids.push(id);
                return;
            }
        }
        // Not attached through this client: nothing to undo (the monitor answers `Ok` too).
        Self::reply(out, c, id, &Response::Ok);
    }

    /// Detaches `vm` upstream if no client is attached or waiting any more.
    fn release_if_unused(&mut self, vm: VmId, out: &mut Vec<Outgoing>) {
        let unused = self
            .consoles
            .get(&vm)
            .is_some_and(|con| con.attached && con.subs.is_empty() && con.waiting.is_empty());
        if unused {
            if let Some(con) = self.consoles.remove(&vm) {
                self.attach_ids.remove(&con.upstream_id);
            }
            self.internal(&Request::ConsoleDetach { vm }, out);
        }
    }

    /// Client `c` disconnected: its attachments and open dumps go with it; replies still due to
    /// it will be dropped.
    pub fn client_gone(&mut self, c: ClientId, out: &mut Vec<Outgoing>) {
        let Some(st) = self.clients.remove(&c) else {
            return;
        };
        for dump in st.dumps {
            self.internal(&Request::DumpClose { dump }, out);
        }
        let vms: Vec<VmId> = self.consoles.keys().copied().collect();
        for vm in vms {
            if let Some(con) = self.consoles.get_mut(&vm) {
                con.subs.remove(&c);
                con.waiting.retain(|w| w.client != c);
            }
            self.release_if_unused(vm, out);
        }
    }

    /// A frame from the monitor.
    pub fn upstream_frame(&mut self, f: Frame, out: &mut Vec<Outgoing>) {
        if let Some(p) = self.pending.remove(&f.id) {
            match p.what {
                Expect::Internal => {}
                Expect::Attach(vm) => self.attach_reply(vm, f, out),
                Expect::Reply => self.pass_back(p.from, f, out),
                // The monitor ends the VM's console stream itself (the rest of its output,
                // then `ConsoleClosed`, under the attach id): nothing to do here.
                Expect::Kill(_) => self.pass_back(p.from, f, out),
                Expect::Dump => {
                    let handle = match Response::decode(f.kind, &f.payload) {
                        Ok(Response::DumpReady { dump, .. }) => Some(dump),
                        _ => None,
                    };
                    let client = p.from.and_then(|(c, _)| self.clients.get_mut(&c));
                    match (handle, client) {
                        (Some(h), Some(st)) => {
                            st.dumps.insert(h);
                        }
                        (Some(h), None) => self.internal(&Request::DumpClose { dump: h }, out),
                        (None, _) => {}
                    }
                    self.pass_back(p.from, f, out);
                }
            }
            return;
        }
        let Some(&vm) = self.attach_ids.get(&f.id) else {
            // A late reply to a resent handshake Hello, or a stray frame: nobody waits for it.
            return;
        };
        match f.kind {
            kind::CONSOLE_OUTPUT => {
                if let Some(con) = self.consoles.get(&vm) {
                    for (&c, &aid) in &con.subs {
                        out.push(Outgoing {
                            dest: Dest::Client(c),
                            frame: Frame {
                                id: aid,
                                ..f.clone()
                            },
                        });
                    }
                }
            }
            kind::ERROR | kind::CONSOLE_CLOSED => {
                // The attachment ended upstream (the VM went: `ConsoleClosed`, or an error
                // from an older server): tell every subscriber.
                self.attach_ids.remove(&f.id);
                if let Some(con) = self.consoles.remove(&vm) {
                    for (c, aid) in con.subs {
                        out.push(Outgoing {
                            dest: Dest::Client(c),
                            frame: Frame {
                                id: aid,
                                ..f.clone()
                            },
                        });
                    }
                }
            }
            _ => {}
        }
    }

    /// A damaged frame from the monitor that still named its id: the client waiting for it gets
    /// an error rather than waiting forever.
    pub fn upstream_damaged(&mut self, uid: u32, out: &mut Vec<Outgoing>) {
        self.bad_frames += 1;
        let Some(p) = self.pending.get(&uid) else {
            return;
        };
        if matches!(p.what, Expect::Reply | Expect::Kill(_) | Expect::Dump) {
            if let Some(p) = self.pending.remove(&uid) {
                let e = ErrorReply::Internal("vmfork mux: the monitor's reply was damaged".into());
                self.pass_back(p.from, response_frame(uid, &Response::Error(e)), out);
            }
        }
    }

    fn pass_back(&mut self, from: Option<(ClientId, u32)>, f: Frame, out: &mut Vec<Outgoing>) {
        if let Some((c, id)) = from {
            if self.clients.contains_key(&c) {
                out.push(Outgoing {
                    dest: Dest::Client(c),
                    frame: Frame { id, ..f },
                });
            }
        }
    }

    fn attach_reply(&mut self, vm: VmId, f: Frame, out: &mut Vec<Outgoing>) {
        let Some(mut con) = self.consoles.remove(&vm) else {
            return;
        };
        if con.upstream_id != f.id || con.attached {
            self.consoles.insert(vm, con);
            return;
        }
        let ok = f.kind == kind::OK && f.version == PROTOCOL_VERSION;
        let waiting = std::mem::take(&mut con.waiting);
        for w in waiting {
            if ok {
                con.subs.insert(w.client, w.attach_id);
                Self::reply(out, w.client, w.attach_id, &Response::Ok);
            } else {
                out.push(Outgoing {
                    dest: Dest::Client(w.client),
                    frame: Frame {
                        id: w.attach_id,
                        ..f.clone()
                    },
                });
            }
            for d in w.detach_ids {
                con.subs.remove(&w.client);
                Self::reply(out, w.client, d, &Response::Ok);
            }
        }
        if !ok {
            return;
        }
        con.attached = true;
        self.attach_ids.insert(con.upstream_id, vm);
        self.consoles.insert(vm, con);
        self.release_if_unused(vm, out);
    }

    /// The monitor connection dropped: every client waiting for a reply, and every attached
    /// console, gets `Error(Internal(UPSTREAM_LOST))`.
    pub fn upstream_closed(&mut self, out: &mut Vec<Outgoing>) {
        let lost = Response::Error(ErrorReply::Internal(UPSTREAM_LOST.into()));
        let mut pending: Vec<(u32, Pending)> = self.pending.drain().collect();
        pending.sort_by_key(|(uid, _)| *uid);
        for (_, p) in pending {
            if let Some((c, id)) = p.from {
                if self.clients.contains_key(&c) {
                    Self::reply(out, c, id, &lost);
                }
            }
        }
        for (_, con) in std::mem::take(&mut self.consoles) {
            for (c, aid) in con.subs {
                Self::reply(out, c, aid, &lost);
            }
            for w in con.waiting {
                Self::reply(out, w.client, w.attach_id, &lost);
                for d in w.detach_ids {
                    Self::reply(out, w.client, d, &lost);
                }
            }
        }
        self.attach_ids.clear();
    }
}
