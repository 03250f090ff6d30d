//! The messages: requests (tool to monitor), responses and console events (monitor to tool), and
//! the types they carry. Each message is one frame; its kind says which message it is.
//!
//! Kinds `0x0001` (Hello), `0x8001` (HelloReply) and `0x80FF` (Error) and their payloads are
//! frozen: every protocol version encodes them the same way, so peers of different versions can
//! always tell each other which version they speak.

use crate::frame::{encode_frame, EncodeError, Frame};
use crate::wire::{DecodeError, Reader, Writer};
use crate::{CHUNK_SIZE, PROTOCOL_VERSION};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

#[cfg(feature = "serde")]
use serde::Serialize;

/// A VM's id, unique for the life of the monitor (ids are not reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize), serde(transparent))]
pub struct VmId(pub u32);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a VM is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize), serde(rename_all = "snake_case"))]
pub enum PauseReason {
    /// A `Pause` request.
    Requested,
    /// Created paused by `Fork { paused: true }`.
    Forked,
    /// Restored from a snapshot and not resumed yet (unused by the reference server, which
    /// starts restored VMs running).
    Restored,
}

/// Why a VM has stopped for good (until `Reset`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize), serde(rename_all = "snake_case"))]
pub enum StopReason {
    /// The guest asked to power off (PSCI SYSTEM_OFF).
    PowerOff,
    /// The guest took an exception the monitor could not handle; the text names ESR/FAR/ELR.
    Fault(String),
    /// A copy-on-write fault found no free frame.
    OutOfMemory,
}

/// What a VM is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(Serialize),
    serde(tag = "state", rename_all = "snake_case")
)]
pub enum VmState {
    /// Its vCPUs run.
    Running,
    /// Its vCPUs are stopped and may be resumed.
    Paused {
        /// Why.
        reason: PauseReason,
    },
    /// It has stopped and only `Reset` or `Kill` apply.
    Stopped {
        /// Why.
        reason: StopReason,
    },
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmState::Running => write!(f, "running"),
            VmState::Paused { reason } => {
                let r = match reason {
                    PauseReason::Requested => "requested",
                    PauseReason::Forked => "forked paused",
                    PauseReason::Restored => "restored",
                };
                write!(f, "paused ({r})")
            }
            VmState::Stopped { reason } => match reason {
                StopReason::PowerOff => write!(f, "stopped (power off)"),
                StopReason::Fault(s) => write!(f, "stopped (fault: {s})"),
                StopReason::OutOfMemory => write!(f, "stopped (out of memory)"),
            },
        }
    }
}

/// Everything the monitor accounts for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct VmInfo {
    /// The VM's id.
    pub id: VmId,
    /// The VM it was forked from, if any (the parent may have been killed since).
    pub parent: Option<VmId>,
    /// A name (the kernel's file name, or `<parent name>.<n>` for forks).
    pub name: String,
    /// What it is doing.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// Guest pages mapped to frames only this VM maps.
    pub private_pages: u64,
    /// Guest pages mapped to frames shared with other VMs (copy-on-write).
    pub shared_pages: u64,
    /// Copy-on-write faults this VM has taken.
    pub cow_faults: u64,
    /// Forks taken of this VM.
    pub forks: u64,
    /// Duration of the last fork of this VM, in generic-counter ticks (0 if never forked).
    pub last_fork_ticks: u64,
}

/// The monitor's global accounting.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct GlobalStats {
    /// Frames the allocator can still hand out.
    pub free_frames: u64,
    /// Frames in use (guest memory, stage-2 tables, monitor heap).
    pub used_frames: u64,
    /// All frames the allocator manages.
    pub total_frames: u64,
    /// Live VMs.
    pub vms: u32,
    /// Generic-counter frequency (CNTFRQ_EL0) in Hz, to turn ticks into time.
    pub counter_hz: u64,
    /// Bytes of the monitor's heap in use.
    pub heap_used: u64,
    /// Bytes of the monitor's heap free (the reserve included).
    pub heap_free: u64,
    /// Free heap that forks, uploads and console buffers may not use: below it they are refused.
    pub heap_reserve: u64,
    /// Most VMs alive at once (`max_vms=` on the monitor's command line).
    pub max_vms: u32,
    /// Most forks alive at once in one fork tree (`max_forks_per_tree=`).
    pub max_forks_per_tree: u32,
}

/// What an upload will be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize), serde(rename_all = "snake_case"))]
pub enum UploadPurpose {
    /// A kernel image (arm64 `Image` or ELF) for `Create`; at most [`crate::MAX_IMAGE_BYTES`].
    Kernel,
    /// An initrd for `Create`; at most [`crate::MAX_IMAGE_BYTES`].
    Initrd,
    /// A snapshot for `Restore`; bounded only by the monitor's memory.
    Snapshot,
}

/// A run of consecutive guest pages, by page index from the start of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct PageRange {
    /// Index of the first page (IPA = `ram_base + first_page * 4096`).
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
}

/// Which guest pages differ between two VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct DiffReport {
    /// IPA of guest RAM's first page.
    pub ram_base: u64,
    /// Pages compared (the smaller of the two RAM sizes).
    pub pages_compared: u64,
    /// Pages whose contents differ.
    pub differing_pages: u64,
    /// The differing pages as ranges, in ascending order, at most [`crate::MAX_DIFF_RANGES`].
    pub ranges: Vec<PageRange>,
    /// True when there were more ranges than were sent.
    pub truncated: bool,
}

/// Why the monitor refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize), serde(rename_all = "snake_case"))]
pub enum ErrorReply {
    /// The VM does not exist (never did, or was killed).
    NoSuchVm(VmId),
    /// Not enough free frames.
    OutOfMemory,
    /// The peer speaks another protocol version.
    VersionMismatch {
        /// The version the replying side speaks.
        ours: u16,
        /// The version the request was sent with.
        theirs: u16,
    },
    /// The request was malformed or makes no sense in the current state.
    BadRequest(String),
    /// The monitor cannot do this now (e.g. a second `Dump` of the same VM); try again.
    Busy,
    /// A bug in the monitor.
    Internal(String),
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorReply::NoSuchVm(vm) => write!(f, "no such VM: {vm}"),
            ErrorReply::OutOfMemory => write!(f, "the monitor is out of memory"),
            ErrorReply::VersionMismatch { ours, theirs } => write!(
                f,
                "protocol version mismatch: the monitor speaks v{ours}, this client speaks v{theirs}"
            ),
            ErrorReply::BadRequest(r) => write!(f, "bad request: {r}"),
            ErrorReply::Busy => write!(f, "the monitor is busy, try again"),
            ErrorReply::Internal(m) => write!(f, "internal monitor error: {m}"),
        }
    }
}

/// A request from a client to the monitor. Every request gets exactly one reply frame with the
/// same id (a [`Response`], possibly `Error`); after the reply to `ConsoleAttach`, console output
/// arrives as `ConsoleOutput` events carrying the attach request's id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// First message of a connection: say which version the client speaks.
    /// Reply: `HelloReply`, or `Error(VersionMismatch)`.
    Hello {
        /// Protocol version of the client.
        version: u16,
        /// Free text naming the client (e.g. `vmfork 0.1.0`).
        client: String,
    },
    /// Reply: `VmList`.
    List,
    /// Reply: `VmInfo`.
    Info {
        /// The VM.
        vm: VmId,
    },
    /// Reply: `Stats`, with the VM's info when one is named.
    Stats {
        /// The VM, or none for global statistics only.
        vm: Option<VmId>,
    },
    /// Fork `vm` `count` times. Reply: `Forked` with the children's ids.
    Fork {
        /// The parent.
        vm: VmId,
        /// How many children (1 or more).
        count: u32,
        /// Leave the children paused (`Paused { Forked }`).
        paused: bool,
    },
    /// Reply: `Ok`.
    Pause {
        /// The VM.
        vm: VmId,
    },
    /// Reply: `Ok`.
    Resume {
        /// The VM.
        vm: VmId,
    },
    /// Put a fork back to its fork point. Reply: `Ok`; a VM that is not a fork (booted, created
    /// or restored) has no fork point and is refused with `BadRequest`.
    Reset {
        /// The VM.
        vm: VmId,
    },
    /// Destroy a VM; its children live on. Reply: `Ok`.
    Kill {
        /// The VM.
        vm: VmId,
    },
    /// Start uploading `total_len` bytes. Reply: `UploadReady`.
    UploadBegin {
        /// What the bytes are for.
        purpose: UploadPurpose,
        /// Total length.
        total_len: u64,
    },
    /// The next piece of an upload; `offset` must equal the bytes sent so far. Reply: `Ok`.
    UploadChunk {
        /// Upload handle from `UploadReady`.
        upload: u32,
        /// Offset of `data` in the upload.
        offset: u64,
        /// At most [`CHUNK_SIZE`] bytes.
        data: Vec<u8>,
    },
    /// Boot a new VM from completed uploads (which it consumes). Reply: `Created`.
    Create {
        /// Upload handle of the kernel.
        kernel: u32,
        /// Upload handle of the initrd, if any.
        initrd: Option<u32>,
        /// Guest RAM in bytes.
        mem_bytes: u64,
        /// Number of vCPUs.
        vcpus: u32,
        /// Kernel command line (`/chosen/bootargs`).
        cmdline: String,
    },
    /// Stream the VM's console to this connection. Reply: `Ok`, then `ConsoleOutput` events.
    ConsoleAttach {
        /// The VM.
        vm: VmId,
    },
    /// Stop streaming. Reply: `Ok`; no event for this VM follows it.
    ConsoleDetach {
        /// The VM.
        vm: VmId,
    },
    /// Type into the VM's console. Reply: `Ok`.
    ConsoleInput {
        /// The VM.
        vm: VmId,
        /// At most [`CHUNK_SIZE`] bytes.
        data: Vec<u8>,
    },
    /// Take a snapshot of the VM. Reply: `DumpReady` with its total length.
    Dump {
        /// The VM.
        vm: VmId,
    },
    /// Read a piece of a snapshot. Reply: `DumpData` (empty at the end).
    DumpRead {
        /// Dump handle from `DumpReady`.
        dump: u32,
        /// Offset to read from.
        offset: u64,
        /// At most this many bytes (the monitor sends at most [`CHUNK_SIZE`]).
        max_len: u32,
    },
    /// Release a snapshot. Reply: `Ok`.
    DumpClose {
        /// Dump handle.
        dump: u32,
    },
    /// Start a running VM from a completed snapshot upload. Reply: `Created`.
    Restore {
        /// Upload handle.
        upload: u32,
    },
    /// Compare two VMs' memory page by page. Reply: `Diff`.
    Diff {
        /// First VM.
        a: VmId,
        /// Second VM.
        b: VmId,
    },
}

/// A message from the monitor: the reply to a request, or a console event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Reply to `Hello`.
    HelloReply {
        /// Protocol version of the monitor.
        version: u16,
        /// Free text naming the monitor build.
        monitor: String,
    },
    /// The request was done.
    Ok,
    /// Reply to `List`, in id order.
    VmList(Vec<VmInfo>),
    /// Reply to `Info`.
    VmInfo(VmInfo),
    /// Reply to `Stats`.
    Stats {
        /// Global accounting.
        global: GlobalStats,
        /// The named VM's accounting.
        vm: Option<VmInfo>,
    },
    /// Reply to `Fork`.
    Forked {
        /// The children, in creation order.
        children: Vec<VmId>,
    },
    /// Reply to `Create` and `Restore`.
    Created {
        /// The new VM.
        vm: VmId,
    },
    /// Reply to `UploadBegin`.
    UploadReady {
        /// Handle for `UploadChunk`, `Create` and `Restore`.
        upload: u32,
    },
    /// Reply to `Dump`.
    DumpReady {
        /// Handle for `DumpRead` and `DumpClose`.
        dump: u32,
        /// Snapshot length in bytes.
        total_len: u64,
    },
    /// Reply to `DumpRead`.
    DumpData {
        /// Dump handle.
        dump: u32,
        /// Offset of `data`.
        offset: u64,
        /// The bytes; empty at or past the end.
        data: Vec<u8>,
    },
    /// Reply to `Diff`.
    Diff(DiffReport),
    /// Console event: output of an attached VM (id = the `ConsoleAttach` request's id).
    ConsoleOutput {
        /// The VM.
        vm: VmId,
        /// What the guest wrote.
        data: Vec<u8>,
    },
    /// Console event: the attached VM is gone (id = the `ConsoleAttach` request's id). Comes
    /// after the last of its output; the attachment is over.
    ConsoleClosed {
        /// The VM.
        vm: VmId,
        /// Why it went, as the monitor's log says it ("powered off (PSCI SYSTEM_OFF)",
        /// "killed by the control channel", ...).
        reason: String,
    },
    /// The request failed.
    Error(ErrorReply),
}

/// Message kind numbers: requests `0x00xx`, responses `0x80xx`.
pub mod kind {
    /// `Request::Hello` (frozen).
    pub const HELLO: u16 = 0x0001;
    /// `Request::List`.
    pub const LIST: u16 = 0x0002;
    /// `Request::Info`.
    pub const INFO: u16 = 0x0003;
    /// `Request::Stats`.
    pub const STATS: u16 = 0x0004;
    /// `Request::Fork`.
    pub const FORK: u16 = 0x0005;
    /// `Request::Pause`.
    pub const PAUSE: u16 = 0x0006;
    /// `Request::Resume`.
    pub const RESUME: u16 = 0x0007;
    /// `Request::Reset`.
    pub const RESET: u16 = 0x0008;
    /// `Request::Kill`.
    pub const KILL: u16 = 0x0009;
    /// `Request::UploadBegin`.
    pub const UPLOAD_BEGIN: u16 = 0x000A;
    /// `Request::UploadChunk`.
    pub const UPLOAD_CHUNK: u16 = 0x000B;
    /// `Request::Create`.
    pub const CREATE: u16 = 0x000C;
    /// `Request::ConsoleAttach`.
    pub const CONSOLE_ATTACH: u16 = 0x000D;
    /// `Request::ConsoleDetach`.
    pub const CONSOLE_DETACH: u16 = 0x000E;
    /// `Request::ConsoleInput`.
    pub const CONSOLE_INPUT: u16 = 0x000F;
    /// `Request::Dump`.
    pub const DUMP: u16 = 0x0010;
    /// `Request::DumpRead`.
    pub const DUMP_READ: u16 = 0x0011;
    /// `Request::DumpClose`.
    pub const DUMP_CLOSE: u16 = 0x0012;
    /// `Request::Restore`.
    pub const RESTORE: u16 = 0x0013;
    /// `Request::Diff`.
    pub const DIFF: u16 = 0x0014;

    /// `Response::HelloReply` (frozen).
    pub const HELLO_REPLY: u16 = 0x8001;
    /// `Response::Ok`.
    pub const OK: u16 = 0x8002;
    /// `Response::VmList`.
    pub const VM_LIST: u16 = 0x8003;
    /// `Response::VmInfo`.
    pub const VM_INFO: u16 = 0x8004;
    /// `Response::Stats`.
    pub const STATS_REPLY: u16 = 0x8005;
    /// `Response::Forked`.
    pub const FORKED: u16 = 0x8006;
    /// `Response::Created`.
    pub const CREATED: u16 = 0x8007;
    /// `Response::UploadReady`.
    pub const UPLOAD_READY: u16 = 0x8008;
    /// `Response::DumpReady`.
    pub const DUMP_READY: u16 = 0x8009;
    /// `Response::DumpData`.
    pub const DUMP_DATA: u16 = 0x800A;
    /// `Response::Diff`.
    pub const DIFF_REPLY: u16 = 0x800B;
    /// `Response::ConsoleOutput` (an event).
    pub const CONSOLE_OUTPUT: u16 = 0x800C;
    /// `Response::ConsoleClosed` (an event).
    pub const CONSOLE_CLOSED: u16 = 0x800D;
    /// `Response::Error` (frozen).
    pub const ERROR: u16 = 0x80FF;
}

fn vm(r: &mut Reader<'_>) -> Result<VmId, DecodeError> {
    Ok(VmId(r.u32()?))
}

fn chunk(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
    let b = r.bytes()?;
    if b.len() > CHUNK_SIZE {
        return Err(DecodeError::Limit("chunk larger than CHUNK_SIZE"));
    }
    Ok(b)
}

fn bad_tag(what: &'static str, value: u8) -> DecodeError {
    DecodeError::BadTag {
        what,
        value: u32::from(value),
    }
}

impl Request {
    /// This request's frame kind.
    pub fn kind(&self) -> u16 {
        use kind::*;
        match self {
            Request::Hello { .. } => HELLO,
            Request::List => LIST,
            Request::Info { .. } => INFO,
            Request::Stats { .. } => STATS,
            Request::Fork { .. } => FORK,
            Request::Pause { .. } => PAUSE,
            Request::Resume { .. } => RESUME,
            Request::Reset { .. } => RESET,
            Request::Kill { .. } => KILL,
            Request::UploadBegin { .. } => UPLOAD_BEGIN,
            Request::UploadChunk { .. } => UPLOAD_CHUNK,
            Request::Create { .. } => CREATE,
            Request::ConsoleAttach { .. } => CONSOLE_ATTACH,
            Request::ConsoleDetach { .. } => CONSOLE_DETACH,
            Request::ConsoleInput { .. } => CONSOLE_INPUT,
            Request::Dump { .. } => DUMP,
            Request::DumpRead { .. } => DUMP_READ,
            Request::DumpClose { .. } => DUMP_CLOSE,
            Request::Restore { .. } => RESTORE,
            Request::Diff { .. } => DIFF,
        }
    }

    /// Appends the payload encoding to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        match self {
            Request::Hello { version, client } => {
                w.u16(*version);
                w.str(client);
            }
            Request::List => {}
            Request::Info { vm }
            | Request::Pause { vm }
            | Request::Resume { vm }
            | Request::Reset { vm }
            | Request::Kill { vm }
            | Request::ConsoleAttach { vm }
            | Request::ConsoleDetach { vm }
            | Request::Dump { vm } => w.u32(vm.0),
            Request::Stats { vm } => w.opt_u32(vm.map(|v| v.0)),
            Request::Fork { vm, count, paused } => {
                w.u32(vm.0);
                w.u32(*count);
                w.bool(*paused);
            }
            Request::UploadBegin { purpose, total_len } => {
                w.u8(match purpose {
                    UploadPurpose::Kernel => 0,
                    UploadPurpose::Initrd => 1,
                    UploadPurpose::Snapshot => 2,
                });
                w.u64(*total_len);
            }
            Request::UploadChunk {
                upload,
                offset,
                data,
            } => {
                w.u32(*upload);
                w.u64(*offset);
                w.bytes(data);
            }
            Request::Create {
                kernel,
                initrd,
                mem_bytes,
                vcpus,
                cmdline,
            } => {
                w.u32(*kernel);
                w.opt_u32(*initrd);
                w.u64(*mem_bytes);
                w.u32(*vcpus);
                w.str(cmdline);
            }
            Request::ConsoleInput { vm, data } => {
                w.u32(vm.0);
                w.bytes(data);
            }
            Request::DumpRead {
                dump,
                offset,
                max_len,
            } => {
                w.u32(*dump);
                w.u64(*offset);
                w.u32(*max_len);
            }
            Request::DumpClose { dump } => w.u32(*dump),
            Request::Restore { upload } => w.u32(*upload),
            Request::Diff { a, b } => {
                w.u32(a.0);
                w.u32(b.0);
            }
        }
    }

    /// Appends this request as a complete frame of [`PROTOCOL_VERSION`] with request id `id`.
    pub fn encode_frame(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        encode_frame(PROTOCOL_VERSION, self.kind(), id, &payload, out)
    }

    /// Decodes a request from its kind and payload (the caller has checked the frame version).
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Request, DecodeError> {
        use kind::*;
        let mut r = Reader::new(payload);
        let req = match kind {
            HELLO => Request::Hello {
                version: r.u16()?,
                client: r.str()?,
            },
            LIST => Request::List,
            INFO => Request::Info { vm: vm(&mut r)? },
            STATS => Request::Stats {
                vm: r.opt_u32()?.map(VmId),
            },
            FORK => Request::Fork {
                vm: vm(&mut r)?,
                count: r.u32()?,
                paused: r.bool()?,
            },
            PAUSE => Request::Pause { vm: vm(&mut r)? },
            RESUME => Request::Resume { vm: vm(&mut r)? },
            RESET => Request::Reset { vm: vm(&mut r)? },
            KILL => Request::Kill { vm: vm(&mut r)? },
            UPLOAD_BEGIN => Request::UploadBegin {
                purpose: match r.u8()? {
                    0 => UploadPurpose::Kernel,
                    1 => UploadPurpose::Initrd,
                    2 => UploadPurpose::Snapshot,
                    t => return Err(bad_tag("upload purpose", t)),
                },
                total_len: r.u64()?,
            },
            UPLOAD_CHUNK => Request::UploadChunk {
                upload: r.u32()?,
                offset: r.u64()?,
                data: chunk(&mut r)?,
            },
            CREATE => Request::Create {
                kernel: r.u32()?,
                initrd: r.opt_u32()?,
                mem_bytes: r.u64()?,
                vcpus: r.u32()?,
                cmdline: r.str()?,
            },
            CONSOLE_ATTACH => Request::ConsoleAttach { vm: vm(&mut r)? },
            CONSOLE_DETACH => Request::ConsoleDetach { vm: vm(&mut r)? },
            CONSOLE_INPUT => Request::ConsoleInput {
                vm: vm(&mut r)?,
                data: chunk(&mut r)?,
            },
            DUMP => Request::Dump { vm: vm(&mut r)? },
            DUMP_READ => Request::DumpRead {
                dump: r.u32()?,
                offset: r.u64()?,
                max_len: r.u32()?,
            },
            DUMP_CLOSE => Request::DumpClose { dump: r.u32()? },
            RESTORE => Request::Restore { upload: r.u32()? },
            DIFF => Request::Diff {
                a: vm(&mut r)?,
                b: vm(&mut r)?,
            },
            k => return Err(DecodeError::UnknownKind(k)),
        };
        r.finish()?;
        Ok(req)
    }
}

fn put_state(w: &mut Writer<'_>, s: &VmState) {
    match s {
        VmState::Running => w.u8(0),
        VmState::Paused { reason } => {
            w.u8(1);
            w.u8(match reason {
                PauseReason::Requested => 0,
                PauseReason::Forked => 1,
                PauseReason::Restored => 2,
            });
        }
        VmState::Stopped { reason } => {
            w.u8(2);
            match reason {
                StopReason::PowerOff => w.u8(0),
                StopReason::Fault(s) => {
                    w.u8(1);
                    w.str(s);
                }
                StopReason::OutOfMemory => w.u8(2),
            }
        }
    }
}

fn get_state(r: &mut Reader<'_>) -> Result<VmState, DecodeError> {
    Ok(match r.u8()? {
        0 => VmState::Running,
        1 => VmState::Paused {
            reason: match r.u8()? {
                0 => PauseReason::Requested,
                1 => PauseReason::Forked,
                2 => PauseReason::Restored,
                t => return Err(bad_tag("pause reason", t)),
            },
        },
        2 => VmState::Stopped {
            reason: match r.u8()? {
                0 => StopReason::PowerOff,
                1 => StopReason::Fault(r.str()?),
                2 => StopReason::OutOfMemory,
                t => return Err(bad_tag("stop reason", t)),
            },
        },
        t => return Err(bad_tag("VM state", t)),
    })
}

fn put_info(w: &mut Writer<'_>, i: &VmInfo) {
    w.u32(i.id.0);
    w.opt_u32(i.parent.map(|p| p.0));
    w.str(&i.name);
    put_state(w, &i.state);
    w.u32(i.vcpus);
    w.u64(i.mem_bytes);
    w.u64(i.private_pages);
    w.u64(i.shared_pages);
    w.u64(i.cow_faults);
    w.u64(i.forks);
    w.u64(i.last_fork_ticks);
}

fn get_info(r: &mut Reader<'_>) -> Result<VmInfo, DecodeError> {
    Ok(VmInfo {
        id: vm(r)?,
        parent: r.opt_u32()?.map(VmId),
        name: r.str()?,
        state: get_state(r)?,
        vcpus: r.u32()?,
        mem_bytes: r.u64()?,
        private_pages: r.u64()?,
        shared_pages: r.u64()?,
        cow_faults: r.u64()?,
        forks: r.u64()?,
        last_fork_ticks: r.u64()?,
    })
}

/// Reads a `u32` count of items, each at least `min_size` bytes, refusing counts the remaining
/// payload cannot hold (so a lying count allocates nothing).
fn count(r: &mut Reader<'_>, min_size: usize) -> Result<usize, DecodeError> {
    let n = r.u32()? as usize;
    if n.saturating_mul(min_size) > r.remaining() {
        return Err(DecodeError::Truncated);
    }
    Ok(n)
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Response {
    /// This response's frame kind.
    pub fn kind(&self) -> u16 {
        use kind::*;
        match self {
            Response::HelloReply { .. } => HELLO_REPLY,
            Response::Ok => OK,
            Response::VmList(_) => VM_LIST,
            Response::VmInfo(_) => VM_INFO,
            Response::Stats { .. } => STATS_REPLY,
            Response::Forked { .. } => FORKED,
            Response::Created { .. } => CREATED,
            Response::UploadReady { .. } => UPLOAD_READY,
            Response::DumpReady { .. } => DUMP_READY,
            Response::DumpData { .. } => DUMP_DATA,
            Response::Diff(_) => DIFF_REPLY,
            Response::ConsoleOutput { .. } => CONSOLE_OUTPUT,
            Response::ConsoleClosed { .. } => CONSOLE_CLOSED,
            Response::Error(_) => ERROR,
        }
    }

    /// Appends the payload encoding to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        match self {
            Response::HelloReply { version, monitor } => {
                w.u16(*version);
                w.str(monitor);
            }
            Response::Ok => {}
            Response::VmList(list) => {
                w.u32(len_u32(list.len()));
                for i in list {
                    put_info(&mut w, i);
                }
            }
            Response::VmInfo(i) => put_info(&mut w, i),
            Response::Stats { global, vm } => {
                w.u64(global.free_frames);
                w.u64(global.used_frames);
                w.u64(global.total_frames);
                w.u32(global.vms);
                w.u64(global.counter_hz);
                w.u64(global.heap_used);
                w.u64(global.heap_free);
                w.u64(global.heap_reserve);
                w.u32(global.max_vms);
                w.u32(global.max_forks_per_tree);
                match vm {
                    None => w.u8(0),
                    Some(i) => {
                        w.u8(1);
                        put_info(&mut w, i);
                    }
                }
            }
            Response::Forked { children } => {
                w.u32(len_u32(children.len()));
                for c in children {
                    w.u32(c.0);
                }
            }
            Response::Created { vm } => w.u32(vm.0),
            Response::UploadReady { upload } => w.u32(*upload),
            Response::DumpReady { dump, total_len } => {
                w.u32(*dump);
                w.u64(*total_len);
            }
            Response::DumpData { dump, offset, data } => {
                w.u32(*dump);
                w.u64(*offset);
                w.bytes(data);
            }
            Response::Diff(d) => {
                w.u64(d.ram_base);
                w.u64(d.pages_compared);
                w.u64(d.differing_pages);
                w.u32(len_u32(d.ranges.len()));
                for r in &d.ranges {
                    w.u64(r.first_page);
                    w.u64(r.pages);
                }
                w.bool(d.truncated);
            }
            Response::ConsoleOutput { vm, data } => {
                w.u32(vm.0);
                w.bytes(data);
            }
            Response::ConsoleClosed { vm, reason } => {
                w.u32(vm.0);
                w.str(reason);
            }
            Response::Error(e) => match e {
                ErrorReply::NoSuchVm(vm) => {
                    w.u8(1);
                    w.u32(vm.0);
                }
                ErrorReply::OutOfMemory => w.u8(2),
                ErrorReply::VersionMismatch { ours, theirs } => {
                    w.u8(3);
                    w.u16(*ours);
                    w.u16(*theirs);
                }
                ErrorReply::BadRequest(s) => {
                    w.u8(4);
                    w.str(s);
                }
                ErrorReply::Busy => w.u8(5),
                ErrorReply::Internal(s) => {
                    w.u8(6);
                    w.str(s);
                }
            },
        }
    }

    /// Appends this response as a complete frame of [`PROTOCOL_VERSION`] with id `id`.
    pub fn encode_frame(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_frame_as(PROTOCOL_VERSION, id, out)
    }

    /// Like [`Response::encode_frame`] but with an explicit version in the header (for test
    /// servers that pretend to be another version; only the frozen messages mean the same).
    pub fn encode_frame_as(
        &self,
        version: u16,
        id: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        encode_frame(version, self.kind(), id, &payload, out)
    }

    /// Decodes a response from its kind and payload (the caller has checked the frame version).
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Response, DecodeError> {
        use kind::*;
        let mut r = Reader::new(payload);
        let resp = match kind {
            HELLO_REPLY => Response::HelloReply {
                version: r.u16()?,
                monitor: r.str()?,
            },
            OK => Response::Ok,
            VM_LIST => {
                let n = count(&mut r, 60)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    list.push(get_info(&mut r)?);
                }
                Response::VmList(list)
            }
            VM_INFO => Response::VmInfo(get_info(&mut r)?),
            STATS_REPLY => Response::Stats {
                global: GlobalStats {
                    free_frames: r.u64()?,
                    used_frames: r.u64()?,
                    total_frames: r.u64()?,
                    vms: r.u32()?,
                    counter_hz: r.u64()?,
                    heap_used: r.u64()?,
                    heap_free: r.u64()?,
                    heap_reserve: r.u64()?,
                    max_vms: r.u32()?,
                    max_forks_per_tree: r.u32()?,
                },
                vm: match r.u8()? {
                    0 => None,
                    1 => Some(get_info(&mut r)?),
                    t => return Err(bad_tag("option", t)),
                },
            },
            FORKED => {
                let n = count(&mut r, 4)?;
                let mut children = Vec::with_capacity(n);
                for _ in 0..n {
                    children.push(vm(&mut r)?);
                }
                Response::Forked { children }
            }
            CREATED => Response::Created { vm: vm(&mut r)? },
            UPLOAD_READY => Response::UploadReady { upload: r.u32()? },
            DUMP_READY => Response::DumpReady {
                dump: r.u32()?,
                total_len: r.u64()?,
            },
            DUMP_DATA => Response::DumpData {
                dump: r.u32()?,
                offset: r.u64()?,
                data: chunk(&mut r)?,
            },
            DIFF_REPLY => {
                let ram_base = r.u64()?;
                let pages_compared = r.u64()?;
                let differing_pages = r.u64()?;
                let n = count(&mut r, 16)?;
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    ranges.push(PageRange {
                        first_page: r.u64()?,
                        pages: r.u64()?,
                    });
                }
                Response::Diff(DiffReport {
                    ram_base,
                    pages_compared,
                    differing_pages,
                    ranges,
                    truncated: r.bool()?,
                })
            }
            CONSOLE_OUTPUT => Response::ConsoleOutput {
                vm: vm(&mut r)?,
                data: r.bytes()?,
            },
            CONSOLE_CLOSED => Response::ConsoleClosed {
                vm: vm(&mut r)?,
                reason: r.str()?,
            },
            ERROR => Response::Error(match r.u8()? {
                1 => ErrorReply::NoSuchVm(vm(&mut r)?),
                2 => ErrorReply::OutOfMemory,
                3 => ErrorReply::VersionMismatch {
                    ours: r.u16()?,
                    theirs: r.u16()?,
                },
                4 => ErrorReply::BadRequest(r.str()?),
                5 => ErrorReply::Busy,
                6 => ErrorReply::Internal(r.str()?),
                t => return Err(bad_tag("error", t)),
            }),
            k => return Err(DecodeError::UnknownKind(k)),
        };
        r.finish()?;
        Ok(resp)
    }
}

/// Decodes a frame a server received: a request of our version, or the reason to refuse it.
/// A frame of another version yields `Err(ErrorReply::VersionMismatch)`, which the server sends
/// back (with the frame's id) as the answer.
pub fn decode_request(frame: &Frame) -> Result<Request, ErrorReply> {
    if frame.version != PROTOCOL_VERSION {
        return Err(ErrorReply::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: frame.version,
        });
    }
    Request::decode(frame.kind, &frame.payload).map_err(|e| {
        let mut s = String::new();
        let _ = fmt::write(&mut s, format_args!("{e}"));
        ErrorReply::BadRequest(s)
    })
}
