//! The messages: requests (tool to monitor), responses and console events (monitor to tool), and
//! the types they carry. Each message is one frame; its kind says which message it is.
//!
//! Kinds `0x0001` (Hello), `0x8001` (HelloReply) and `0x80FF` (Error) and their payloads are
//! frozen: every protocol version encodes them the same way, so peers of different versions can
//! always tell each other which version they speak.
//!
//! Every type and message here is declared once, in the tables below: a struct's fields are
//! encoded in declaration order, an enum's as its `= tag` (a `u8`) and then the variant's fields,
//! a message's as the variant's fields under its frame kind. Adding a message is one entry in
//! the `Request` or `Response` table. How each field type is encoded, and the macros, are in
//! `codec`.

#[macro_use]
mod codec;

use crate::frame::{encode_frame, EncodeError, Frame};
use crate::PROTOCOL_VERSION;
use alloc::string::String;
use alloc::vec::Vec;
use codec::{Chunk, Elem};
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

wire_enum! {
    "pause reason";
    /// Why a VM is paused.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[cfg_attr(feature = "serde", derive(Serialize), serde(rename_all = "snake_case"))]
    pub enum PauseReason {
        /// A `Pause` request.
        Requested = 0,
        /// Created paused by `Fork { paused: true }`.
        Forked = 1,
        /// Restored from a snapshot by `Restore { paused: true }` and not resumed yet.
        Restored = 2,
        /// Created by `Create { paused: true }` and not resumed yet.
        Created = 3,
        /// A copy-on-write fault (or the copy of a shared device) found no free frame or heap:
        /// `Resume` retries once memory is free.
        OutOfMemory = 4,
    }
}

wire_enum! {
    "stop reason";
    /// Why a VM has stopped for good. A stopped VM holds no memory; its record stays in `List`
    /// until `Remove`.
    #[derive(Clone, Debug, PartialEq, Eq)]
    #[cfg_attr(feature = "serde", derive(Serialize), serde(rename_all = "snake_case"))]
    pub enum StopReason {
        /// The guest asked to power off (PSCI SYSTEM_OFF).
        PowerOff = 0,
        /// The guest took an exception the monitor could not handle; the text names ESR/FAR/ELR.
        Fault(text: String) = 1,
        /// Not used since version 2 (a VM out of memory is `Paused { OutOfMemory }`); the tag
        /// stays taken.
        OutOfMemory = 2,
        /// Killed by a `Kill` request.
        Killed = 3,
        /// The guest asked for a reset (PSCI SYSTEM_RESET); the monitor tears the VM down.
        SystemReset = 4,
        /// A bug in the monitor stopped it; the text says what.
        Internal(text: String) = 5,
    }
}

wire_enum! {
    "VM state";
    /// What a VM is doing.
    #[derive(Clone, Debug, PartialEq, Eq)]
    #[cfg_attr(
        feature = "serde",
        derive(Serialize),
        serde(tag = "state", rename_all = "snake_case")
    )]
    pub enum VmState {
        /// Its vCPUs run.
        Running = 0,
        /// Its vCPUs are stopped and may be resumed.
        Paused {
            /// Why.
            reason: PauseReason,
        } = 1,
        /// It has stopped: only `Info`, `List`, `ConsoleAttach` (its last output) and `Remove`
        /// apply to it.
        Stopped {
            /// Why.
            reason: StopReason,
        } = 2,
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmState::Running => write!(f, "running"),
            VmState::Paused { reason } => {
                let r = match reason {
                    PauseReason::Requested => "requested",
                    PauseReason::Forked => "forked paused",
                    PauseReason::Restored => "restored paused",
                    PauseReason::Created => "created paused",
                    PauseReason::OutOfMemory => "out of memory",
                };
                write!(f, "paused ({r})")
            }
            VmState::Stopped { reason } => match reason {
                StopReason::PowerOff => write!(f, "stopped (power off)"),
                StopReason::Fault(s) => write!(f, "stopped (fault: {s})"),
                StopReason::OutOfMemory => write!(f, "stopped (out of memory)"),
                StopReason::Killed => write!(f, "stopped (killed)"),
                StopReason::SystemReset => write!(f, "stopped (system reset)"),
                StopReason::Internal(s) => write!(f, "stopped (monitor error: {s})"),
            },
        }
    }
}

wire_struct! {
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
        /// Microseconds since it was created, forked or restored; frozen once it stopped.
        pub uptime_us: u64,
        /// Microseconds its vCPUs have spent on a physical CPU, all vCPUs summed (a fork
        /// starts at 0).
        pub vcpu_us: u64,
    }
}

/// A lower bound, below the real smallest encoding (78 bytes).
impl Elem for VmInfo {
    const MIN_SIZE: usize = 76;
}

wire_struct! {
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
        /// Live VMs (stopped ones not counted).
        pub vms: u32,
        /// Generic-counter frequency (CNTFRQ_EL0) in Hz, to turn ticks into time.
        pub counter_hz: u64,
        /// Bytes of the monitor's heap in use.
        pub heap_used: u64,
        /// Bytes of the monitor's heap free (the reserve included).
        pub heap_free: u64,
        /// Free heap that forks, uploads and console buffers may not use: below it they are
        /// refused.
        pub heap_reserve: u64,
        /// Most VMs alive at once (`max_vms=` on the monitor's command line).
        pub max_vms: u32,
        /// Most forks alive at once in one fork tree (`max_forks_per_tree=`).
        pub max_forks_per_tree: u32,
        /// Records of stopped VMs kept (listed until `Remove`).
        pub stopped_vms: u32,
        /// Most records of stopped VMs kept (`max_stopped=`); beyond it the oldest goes.
        pub max_stopped: u32,
    }
}

wire_enum! {
    "upload purpose";
    /// What an upload will be used for.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[cfg_attr(feature = "serde", derive(Serialize), serde(rename_all = "snake_case"))]
    pub enum UploadPurpose {
        /// A kernel image (arm64 `Image` or ELF) for `Create`; at most [`crate::MAX_IMAGE_BYTES`].
        Kernel = 0,
        /// An initrd for `Create`; at most [`crate::MAX_IMAGE_BYTES`].
        Initrd = 1,
        /// A snapshot for `Restore`; bounded only by the monitor's memory.
        Snapshot = 2,
    }
}

wire_struct! {
    /// A run of consecutive guest pages, by page index from the start of guest RAM.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[cfg_attr(feature = "serde", derive(Serialize))]
    pub struct PageRange {
        /// Index of the first page (IPA = `ram_base + first_page * 4096`).
        pub first_page: u64,
        /// Number of pages.
        pub pages: u64,
    }
}

impl Elem for PageRange {
    const MIN_SIZE: usize = 16;
}

wire_struct! {
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
}

wire_enum! {
    "error";
    /// Why the monitor refused a request.
    #[derive(Clone, Debug, PartialEq, Eq)]
    #[cfg_attr(feature = "serde", derive(Serialize), serde(rename_all = "snake_case"))]
    pub enum ErrorReply {
        /// The VM does not exist (never did, or was killed).
        NoSuchVm(vm: VmId) = 1,
        /// Not enough free frames.
        OutOfMemory = 2,
        /// The peer speaks another protocol version.
        VersionMismatch {
            /// The version the replying side speaks.
            ours: u16,
            /// The version the request was sent with.
            theirs: u16,
        } = 3,
        /// The request was malformed or makes no sense in the current state.
        BadRequest(reason: String) = 4,
        /// The monitor cannot do this now (e.g. a second `Dump` of the same VM); try again.
        Busy = 5,
        /// A bug in the monitor.
        Internal(message: String) = 6,
        /// The VM has stopped (its record is kept until `Remove`): the request needs a live VM.
        VmStopped(vm: VmId) = 7,
    }
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
            ErrorReply::VmStopped(vm) => write!(
                f,
                "vm{vm} has stopped (see `vmfork info {vm}`; `vmfork rm {vm}` removes it)"
            ),
        }
    }
}

messages! {
    /// Message kind numbers: requests `0x00xx`, responses `0x80xx`.
    pub mod kind;

    /// A request from a client to the monitor. Every request gets exactly one reply frame with
    /// the same id (a [`Response`], possibly `Error`); after the reply to `ConsoleAttach`,
    /// console output arrives as `ConsoleOutput` events carrying the attach request's id.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Request {
        /// First message of a connection: say which version the client speaks.
        /// Reply: `HelloReply`, or `Error(VersionMismatch)`.
        Hello {
            /// Protocol version of the client.
            version: u16,
            /// Free text naming the client (e.g. `vmfork 0.1.0`).
            client: String,
        } = HELLO(0x0001, "frozen"),
        /// Reply: `VmList`.
        List = LIST(0x0002),
        /// Reply: `VmInfo`.
        Info {
            /// The VM.
            vm: VmId,
        } = INFO(0x0003),
        /// Reply: `Stats`, with the VM's info when one is named.
        Stats {
            /// The VM, or none for global statistics only.
            vm: Option<VmId>,
        } = STATS(0x0004),
        /// Fork `vm` `count` times. Reply: `Forked` with the children's ids.
        Fork {
            /// The parent.
            vm: VmId,
            /// How many children (1 or more).
            count: u32,
            /// Leave the children paused (`Paused { Forked }`).
            paused: bool,
            /// Remove the children's records when they stop (no `Stopped` entry in `List`).
            remove_on_stop: bool,
        } = FORK(0x0005),
        /// Reply: `Ok`.
        Pause {
            /// The VM.
            vm: VmId,
        } = PAUSE(0x0006),
        /// Reply: `Ok`.
        Resume {
            /// The VM.
            vm: VmId,
        } = RESUME(0x0007),
        /// Put a fork back to its fork point. Reply: `Ok`; a VM that is not a fork (booted, created
        /// or restored) has no fork point and is refused with `BadRequest`.
        Reset {
            /// The VM.
            vm: VmId,
        } = RESET(0x0008),
        /// Stop a VM and free its memory; its children live on, its record stays (`Stopped {
        /// Killed }`) until `Remove`. Reply: `Ok`.
        Kill {
            /// The VM.
            vm: VmId,
        } = KILL(0x0009),
        /// Start uploading `total_len` bytes. Reply: `UploadReady`.
        UploadBegin {
            /// What the bytes are for.
            purpose: UploadPurpose,
            /// Total length.
            total_len: u64,
        } = UPLOAD_BEGIN(0x000A),
        /// The next piece of an upload; `offset` must equal the bytes sent so far. Reply: `Ok`.
        UploadChunk {
            /// Upload handle from `UploadReady`.
            upload: u32,
            /// Offset of `data` in the upload.
            offset: u64,
            /// At most [`CHUNK_SIZE`](crate::CHUNK_SIZE) bytes.
            data: Vec<u8> as Chunk,
        } = UPLOAD_CHUNK(0x000B),
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
            /// Leave it paused before its first instruction (`Paused { Created }`).
            paused: bool,
            /// Remove its record when it stops.
            remove_on_stop: bool,
        } = CREATE(0x000C),
        /// Stream the VM's console to this connection. Reply: `Ok`, then (with `replay`) what
        /// it printed last, then `ConsoleOutput` events. A stopped VM's console replays and then
        /// closes (`ConsoleClosed`).
        ConsoleAttach {
            /// The VM.
            vm: VmId,
            /// Send the VM's scroll-back (the last 4 KiB it printed) first.
            replay: bool,
        } = CONSOLE_ATTACH(0x000D),
        /// Stop streaming. Reply: `Ok`; no event for this VM follows it.
        ConsoleDetach {
            /// The VM.
            vm: VmId,
        } = CONSOLE_DETACH(0x000E),
        /// Type into the VM's console. Reply: `Ok`.
        ConsoleInput {
            /// The VM.
            vm: VmId,
            /// At most [`CHUNK_SIZE`](crate::CHUNK_SIZE) bytes.
            data: Vec<u8> as Chunk,
        } = CONSOLE_INPUT(0x000F),
        /// Take a snapshot of the VM. Reply: `DumpReady` with its total length.
        Dump {
            /// The VM.
            vm: VmId,
        } = DUMP(0x0010),
        /// Read a piece of a snapshot. Reply: `DumpData` (empty at the end).
        DumpRead {
            /// Dump handle from `DumpReady`.
            dump: u32,
            /// Offset to read from.
            offset: u64,
            /// At most this many bytes (the monitor sends at most
            /// [`CHUNK_SIZE`](crate::CHUNK_SIZE)).
            max_len: u32,
        } = DUMP_READ(0x0011),
        /// Release a snapshot. Reply: `Ok`.
        DumpClose {
            /// Dump handle.
            dump: u32,
        } = DUMP_CLOSE(0x0012),
        /// Start a VM from a completed snapshot upload. Reply: `Created`.
        Restore {
            /// Upload handle.
            upload: u32,
            /// Leave it paused (`Paused { Restored }`).
            paused: bool,
            /// Remove its record when it stops.
            remove_on_stop: bool,
        } = RESTORE(0x0013),
        /// Compare two VMs' memory page by page. Reply: `Diff`.
        Diff {
            /// First VM.
            a: VmId,
            /// Second VM.
            b: VmId,
        } = DIFF(0x0014),
        /// Give a VM a new name: 1 to 32 of `[A-Za-z0-9._-]`, not only digits and not `vm` and
        /// digits (those name VMs by id in the tool). Reply: `Ok`.
        Rename {
            /// The VM.
            vm: VmId,
            /// Its new name.
            name: String,
        } = RENAME(0x0015),
        /// Forget a stopped VM's record. A live VM is refused with `BadRequest` unless `force`,
        /// which kills it and keeps no record. Reply: `Ok`.
        Remove {
            /// The VM.
            vm: VmId,
            /// Kill it first if it is live.
            force: bool,
        } = REMOVE(0x0016),
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
        } = HELLO_REPLY(0x8001, "frozen"),
        /// The request was done.
        Ok = OK(0x8002),
        /// Reply to `List`, in id order.
        VmList(list: Vec<VmInfo>) = VM_LIST(0x8003),
        /// Reply to `Info`.
        VmInfo(info: VmInfo) = VM_INFO(0x8004),
        /// Reply to `Stats`.
        Stats {
            /// Global accounting.
            global: GlobalStats,
            /// The named VM's accounting.
            vm: Option<VmInfo>,
        } = STATS_REPLY(0x8005),
        /// Reply to `Fork`.
        Forked {
            /// The children, in creation order.
            children: Vec<VmId>,
        } = FORKED(0x8006),
        /// Reply to `Create` and `Restore`.
        Created {
            /// The new VM.
            vm: VmId,
        } = CREATED(0x8007),
        /// Reply to `UploadBegin`.
        UploadReady {
            /// Handle for `UploadChunk`, `Create` and `Restore`.
            upload: u32,
        } = UPLOAD_READY(0x8008),
        /// Reply to `Dump`.
        DumpReady {
            /// Handle for `DumpRead` and `DumpClose`.
            dump: u32,
            /// Snapshot length in bytes.
            total_len: u64,
        } = DUMP_READY(0x8009),
        /// Reply to `DumpRead`.
        DumpData {
            /// Dump handle.
            dump: u32,
            /// Offset of `data`.
            offset: u64,
            /// The bytes; empty at or past the end.
            data: Vec<u8> as Chunk,
        } = DUMP_DATA(0x800A),
        /// Reply to `Diff`.
        Diff(report: DiffReport) = DIFF_REPLY(0x800B),
        /// Console event: output of an attached VM (id = the `ConsoleAttach` request's id).
        ConsoleOutput {
            /// The VM.
            vm: VmId,
            /// What the guest wrote.
            data: Vec<u8>,
        } = CONSOLE_OUTPUT(0x800C, "an event"),
        /// Console event: the attached VM is gone (id = the `ConsoleAttach` request's id). Comes
        /// after the last of its output; the attachment is over.
        ConsoleClosed {
            /// The VM.
            vm: VmId,
            /// Why it went, as the monitor's log says it ("powered off (PSCI SYSTEM_OFF)",
            /// "killed by the control channel", ...).
            reason: String,
        } = CONSOLE_CLOSED(0x800D, "an event"),
        /// The request failed.
        Error(error: ErrorReply) = ERROR(0x80FF, "frozen"),
    }
}

impl Request {
    /// Appends this request as a complete frame of [`PROTOCOL_VERSION`] with request id `id`.
    pub fn encode_frame(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        encode_frame(PROTOCOL_VERSION, self.kind(), id, &payload, out)
    }
}

impl Response {
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
