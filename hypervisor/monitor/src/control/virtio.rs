//! The control channel's transport: a `virtserialport` of a virtio console (with
//! `VIRTIO_CONSOLE_F_MULTIPORT`) on QEMU's virtio-mmio bus.
//!
//! QEMU side: `-chardev socket,id=ctl,path=SOCK,server=on,wait=off -device virtio-serial-device
//! -device virtserialport,chardev=ctl,name=vmfork.ctl,nr=1`. `virtio-serial-device` is the
//! virtio-mmio flavour of the virtio-serial bus; QEMU's `virt` board puts virtio-mmio devices in
//! 32 slots of 0x200 bytes from 0x0a00_0000, which the device tree lists
//! (`Platform::virtio_mmio`). [`ControlPort::probe`] reads each slot's magic and device ID and
//! takes the first console (device ID 3).
//!
//! # Why a serial port, not a console port
//! QEMU never throttles a *console* port (`virtconsole`): when its socket cannot take what the
//! driver transmits, it drops the bytes (`flush_buf` in QEMU's `hw/char/virtio-console.c`) and
//! still returns the buffer as used, so replies were lost whenever a client fell behind. A
//! `virtserialport` is throttled instead: QEMU keeps the transmit buffer (and stops taking more)
//! until the socket is writable again, so nothing is lost and the monitor sees backpressure as
//! transmit buffers that do not come back ([`ControlError::Timeout`] with the bytes queued so
//! far; the caller keeps the rest). Bytes the monitor sends while no client is connected are
//! still discarded by QEMU (`handle_output` drops them when the host side is closed), so a send
//! never blocks on a missing client. Host-to-monitor bytes are never dropped: QEMU stops
//! reading the socket while the port's receive queue has no buffers.
//!
//! A `virtserialport` cannot be port 0 (QEMU reserves it for a `virtconsole`), and ports other
//! than 0 exist only with MULTIPORT, so the driver negotiates it and drives the control queues.
//! The old single-port mode (a `virtconsole` as port 0 without MULTIPORT) is gone: a device that
//! does not offer MULTIPORT is refused at probe.
//!
//! # The port handshake (virtio 1.2, 5.3.6.2)
//! Queues: 2 and 3 are the control receiveq and transmitq; port N >= 1 has receiveq 2N+2 and
//! transmitq 2N+3. The driver sets up the control queues and the queues of port
//! [`CONTROL_PORT`] (1) only; port 0's queues stay unset. After DRIVER_OK:
//! 1. the driver sends `DEVICE_READY` (1);
//! 2. the device sends `PORT_ADD` for each port; the driver answers `PORT_READY` 1 for port 1
//!    and `PORT_READY` 0 for any other (it does not drive them);
//! 3. the device sends `CONSOLE_PORT` if port 1 is a console port, then `PORT_NAME`, then
//!    `PORT_OPEN` 1 if a client has the socket open;
//! 4. the driver opens port 1 (`PORT_OPEN` 1) when its name is [`CONTROL_PORT_NAME`] and it is
//!    not a console port; otherwise it logs why and leaves the port closed (no channel). Until
//!    the driver has opened the port QEMU passes no host bytes to it.
//!
//! Afterwards the device sends `PORT_OPEN` 1 / 0 whenever a client connects to or leaves the
//! socket: [`ControlPort::host_connected`], and [`ControlPort::host_closes`] counts the leaves
//! so that the caller can drop replies meant for a client that is gone. `PORT_REMOVE` of port 1
//! closes it (a later `PORT_ADD` starts the handshake again).
//!
//! # Restarts
//! When a client leaves, QEMU gives back every transmit buffer it held for it except one it had
//! half written when it throttled the port: `virtio_serial_close` drops that one with
//! `discard_throttle_data`, which detaches it without putting it in the used ring, so the
//! driver would never get it back (16 such leaves and the channel was dead). So when the
//! device reports a leave and transmit buffers are still out after taking back the used ones,
//! the driver resets the device and runs [`start`] and the handshake again. The host bytes the
//! device had already delivered are kept first (at most a receive queue's worth) and handed
//! out by [`ControlPort::recv`] before new ones; the client that is connected by then stays
//! connected (QEMU reports it again after `PORT_READY`). A send in progress when the client
//! leaves stops ([`ControlError::ClientGone`]), so the rest does not go to the next client; a
//! client that connects the moment the last one left can still get one stale buffer (seen: up
//! to 4 KiB), which the protocol's decoder skips as garbage.
//!
//! # A hostile or broken device
//! Everything the device writes is checked: control messages shorter than their 8-byte header
//! are ignored, a message is at most one control buffer ([`CTRL_BUFFER_SIZE`]; a longer port
//! name arrives cut and matches nothing), unknown events and events for ports other than 1 are
//! ignored (a `PORT_ADD` of another port gets its `PORT_READY` 0 only while a control transmit
//! buffer is free), used lengths are clamped to the buffer, and at most [`CTRL_QUEUE_SIZE`]
//! control messages are handled per call. A used-ring entry naming a buffer that is not in
//! flight (out of range, never given, or given back twice) is refused before the virtqueue code
//! sees it: a receive queue is then given up (logged once), a transmit queue's error goes to
//! the caller; nothing the device writes is a reason to panic.
//!
//! Control messages are only seen when the monitor polls (every [`ControlPort::recv`] and
//! [`ControlPort::send`]); QEMU drops a control message when the control receive queue has no
//! buffer, so a burst of more than
//! [`CTRL_QUEUE_SIZE`] connects and disconnects between two polls can leave
//! [`ControlPort::host_connected`] stale until the next event. The data path never depends on
//! it: bytes are sent regardless, and QEMU discards them if nobody is connected.
//!
//! # Memory
//! The virtqueues come from the frame allocator through [`MonitorHal`]; the byte buffers are on
//! the monitor's heap. Both are identity mapped, so a pointer is the physical address the device
//! uses.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr as VirtioPhysAddr};
use vmfork_core::addr::{PhysAddr, PAGE_SIZE};
use vmfork_core::platform::Platform;

use crate::mem::FRAMES;

/// virtio-mmio `MagicValue` ("virt" little-endian).
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Offset of the `DeviceID` register in a virtio-mmio slot.
const MMIO_DEVICE_ID: usize = 0x008;
/// virtio device ID of a console.
const DEVICE_ID_CONSOLE: u32 = 3;
/// Smallest slot that holds the virtio-mmio registers (the configuration space starts at 0x100).
const MMIO_MIN_SIZE: u64 = 0x100;

/// The port number of the control channel (QEMU `virtserialport,nr=1`).
pub const CONTROL_PORT: u32 = 1;
/// The name the device must give [`CONTROL_PORT`] (QEMU `virtserialport,name=vmfork.ctl`).
pub const CONTROL_PORT_NAME: &[u8] = b"vmfork.ctl";

/// The control receiveq and transmitq (virtio 1.2, 5.3.2, with MULTIPORT).
const CTRL_RECEIVEQ: u16 = 2;
const CTRL_TRANSMITQ: u16 = 3;
/// The data queues of port N >= 1 are 2N+2 (receiveq) and 2N+3 (transmitq).
const RECEIVEQ: u16 = 2 * CONTROL_PORT as u16 + 2;
const TRANSMITQ: u16 = RECEIVEQ + 1;
/// Every queue the driver sets up.
const QUEUES: [u16; 4] = [CTRL_RECEIVEQ, CTRL_TRANSMITQ, RECEIVEQ, TRANSMITQ];
/// Most host bytes kept across restarts for `recv` (a receive queue's worth); older ones are
/// dropped past it (they can only come from clients that have left).
const KEPT_MAX: usize = QUEUE_SIZE * BUFFER_SIZE;
/// Offset of `max_nr_ports` (le32) in the console's configuration space (virtio 1.2, 5.3.4).
const CONFIG_MAX_NR_PORTS: usize = 4;

/// Buffers (and descriptors) in each data queue; QEMU's virtio-serial data queues hold 128.
const QUEUE_SIZE: usize = 16;
/// Bytes per data buffer.
const BUFFER_SIZE: usize = 4096;
/// Buffers in each control queue; QEMU's control queues hold 32.
const CTRL_QUEUE_SIZE: usize = 16;
/// Bytes per control buffer: the 8-byte header and a port name of up to 120 bytes.
const CTRL_BUFFER_SIZE: usize = 128;
/// `struct virtio_console_control`: id le32, event le16, value le16.
const CTRL_HEADER: usize = 8;
/// How long [`ControlPort::send`] waits for the device to hand back a transmit buffer.
const SEND_TIMEOUT_MS: u64 = 1000;
/// How long [`ControlPort::probe`] waits for the port handshake (QEMU answers each control
/// message while handling the notify that announced it, so this is only spent when port 1 is
/// missing or not ours).
const HANDSHAKE_MS: u64 = 100;

/// Control events (virtio 1.2, 5.3.6.2).
mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const PORT_ADD: u16 = 1;
    pub const PORT_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

/// The port id the driver puts in `DEVICE_READY` (`VIRTIO_CONSOLE_BAD_ID`; the device ignores it).
const NO_PORT: u32 = u32::MAX;

bitflags::bitflags! {
    /// Feature bits the driver accepts (virtio 1.2, 6 and 5.3.3): `VIRTIO_F_VERSION_1`, which a
    /// modern (version 2) transport requires and a legacy one never offers, and
    /// `VIRTIO_CONSOLE_F_MULTIPORT`, which the driver requires. Neither indirect descriptors nor
    /// event-index notification suppression are taken.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Features: u64 {
        /// `VIRTIO_CONSOLE_F_MULTIPORT`.
        const MULTIPORT = 1 << 1;
        /// `VIRTIO_F_VERSION_1`.
        const VERSION_1 = 1 << 32;
    }
}

/// Why the control port failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// The device kept every transmit buffer for longer than the send timeout (the host is not
    /// reading); the first `queued` bytes were handed to the device, the rest were not.
    Timeout {
        /// Bytes of this send that were queued before the timeout.
        queued: usize,
    },
    /// The client left during the send (the device said so): the rest of the bytes were not
    /// queued, and what was is dropped by QEMU.
    ClientGone,
    /// The device does not offer `VIRTIO_CONSOLE_F_MULTIPORT` (QEMU offers it unless
    /// `max_ports=1`).
    NoMultiport,
    /// The device holds fewer ports than [`CONTROL_PORT`] needs (`max_nr_ports`).
    TooFewPorts(u32),
    /// The virtqueue code reported an error.
    Virtio(virtio_drivers::Error),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { queued } => write!(
                f,
                "the virtio console kept its transmit buffers past the timeout (the host is not \
                 reading; {queued} bytes queued)"
            ),
            Self::ClientGone => write!(f, "the client left"),
            Self::NoMultiport => {
                write!(
                    f,
                    "the virtio console does not offer VIRTIO_CONSOLE_F_MULTIPORT"
                )
            }
            Self::TooFewPorts(n) => write!(
                f,
                "the virtio console holds {n} port(s); the control channel is port {CONTROL_PORT}"
            ),
            Self::Virtio(e) => write!(f, "virtio: {e}"),
        }
    }
}

impl From<virtio_drivers::Error> for ControlError {
    fn from(e: virtio_drivers::Error) -> Self {
        Self::Virtio(e)
    }
}

/// The [`Hal`] of the monitor: DMA memory from the frame allocator, identity-mapped addresses.
pub struct MonitorHal;

// SAFETY: `dma_alloc` returns whole frames taken from the frame allocator (so nothing else uses
// them until `dma_dealloc` puts them back), zeroed, page aligned, and identity mapped as Normal
// memory by the monitor's stage 1, so the pointer is valid and equals the physical address.
// `mmio_phys_to_virt` and `share` return identity addresses, which is what the device uses.
unsafe impl Hal for MonitorHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (VirtioPhysAddr, NonNull<u8>) {
        let pa = FRAMES
            .lock()
            .as_mut()
            .and_then(|fa| fa.alloc_contiguous(pages, 1).ok());
        let Some(pa) = pa else {
            // A zero address is how `Dma::new` learns that the allocation failed.
            return (0, NonNull::dangling());
        };
        let ptr = pa.0 as *mut u8;
        // SAFETY: the allocator just handed out these `pages` frames; they are identity mapped RAM
        // that nothing else references.
        unsafe { core::ptr::write_bytes(ptr, 0, pages * PAGE_SIZE as usize) };
        match NonNull::new(ptr) {
            Some(p) => (pa.0, p),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: VirtioPhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let mut guard = FRAMES.lock();
        let Some(fa) = guard.as_mut() else {
            return -1;
        };
        let mut status = 0;
        for i in 0..pages as u64 {
            if fa.put(PhysAddr(paddr + i * PAGE_SIZE)).is_err() {
                status = -1;
            }
        }
        status
    }

    unsafe fn mmio_phys_to_virt(paddr: VirtioPhysAddr, _size: usize) -> NonNull<u8> {
        // The device window below RAM is identity mapped as Device memory. The console uses the
        // MMIO transport, which never asks for this (only the PCI transport's BARs do).
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> VirtioPhysAddr {
        // Identity map: the buffer's address is its physical address. QEMU's device models read
        // and write guest RAM coherently with the emulated caches, so no maintenance is needed.
        // On hardware with a DMA master that does not snoop the CPU caches, the rule (ARM ARM
        // D7.5, "data cache maintenance for non-coherent DMA") would be: DriverToDevice: clean
        // (DC CVAC) the buffer to the point of coherency, then DSB, before the device is told;
        // DeviceToDriver: clean+invalidate (DC CIVAC) it here, so that no dirty line is later
        // evicted over the device's data; and the virtqueue rings would need a Non-cacheable
        // mapping or the same maintenance on every ring update.
        buffer.as_ptr() as *mut u8 as VirtioPhysAddr
    }

    unsafe fn unshare(_paddr: VirtioPhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Coherent on QEMU. Non-coherent hardware: for DeviceToDriver (and Both), invalidate
        // (DC IVAC) the buffer after the device is done and before the CPU reads it, so that
        // lines speculatively fetched during the transfer are not read.
    }
}

/// A buffer the device has filled that the driver is handing out.
#[derive(Clone, Copy, Debug)]
struct Filled {
    /// Index in `bufs`.
    buf: usize,
    /// Bytes the device wrote (clamped to the buffer).
    len: usize,
    /// Bytes already handed out.
    cursor: usize,
}

/// A device-writable virtqueue with `N` buffers of `B` bytes. Every buffer is in the queue
/// (owned by the device) except the one being drained (`filled`).
struct RxQueue<const N: usize, const B: usize> {
    index: u16,
    queue: VirtQueue<MonitorHal, N>,
    bufs: Vec<Box<[u8; B]>>,
    /// `of_token[t]`: the buffer in the queue with token (head descriptor) `t`; `None` for a
    /// token not in flight, which the device must not name (virtio-drivers would recycle a
    /// free descriptor if it were popped).
    of_token: [Option<usize>; N],
    filled: Option<Filled>,
    /// Set once the device broke the queue's protocol: the queue is not used again.
    broken: bool,
}

impl<const N: usize, const B: usize> RxQueue<N, B> {
    fn new(transport: &mut MmioTransport<'static>, index: u16) -> Result<Self, ControlError> {
        Ok(Self {
            index,
            queue: VirtQueue::new(transport, index, false, false)?,
            bufs: (0..N).map(|_| Box::new([0u8; B])).collect(),
            of_token: [None; N],
            filled: None,
            broken: false,
        })
    }

    /// Puts buffer `buf` in the queue (without notifying the device).
    fn give(&mut self, buf: usize) -> Result<(), ControlError> {
        let slice: &mut [u8] = self.bufs[buf].as_mut_slice();
        // SAFETY: the buffer is a heap allocation owned by `self.bufs`, which is never resized or
        // dropped while the device can use it (`ControlPort`'s `Drop` resets the device first);
        // the driver does not touch it again until `pop_used` hands it back with this token.
        let token = unsafe { self.queue.add(&[], &mut [slice]) }?;
        let slot = self
            .of_token
            .get_mut(usize::from(token))
            .ok_or(ControlError::Virtio(virtio_drivers::Error::WrongToken))?;
        *slot = Some(buf);
        Ok(())
    }

    /// Puts every buffer in the queue (at initialisation).
    fn give_all(&mut self) -> Result<(), ControlError> {
        (0..N).try_for_each(|buf| self.give(buf))
    }

    /// Takes the next buffer the device has filled, if any.
    fn take_filled(&mut self) -> Result<Option<Filled>, ControlError> {
        let Some(token) = self.queue.peek_used() else {
            return Ok(None);
        };
        // A token out of range or not in flight (the device named it twice, or one it was never
        // given) stops here, before `pop_used`.
        let buf = self
            .of_token
            .get_mut(usize::from(token))
            .and_then(Option::take)
            .ok_or(ControlError::Virtio(virtio_drivers::Error::WrongToken))?;
        let slice: &mut [u8] = self.bufs[buf].as_mut_slice();
        // SAFETY: `token` is in flight and was returned by `add` for exactly this buffer
        // (`of_token`).
        let len = unsafe { self.queue.pop_used(token, &[], &mut [slice]) }?;
        // The device reports how much it wrote; never trust it beyond the buffer.
        let len = (len as usize).min(B);
        Ok(Some(Filled {
            buf,
            len,
            cursor: 0,
        }))
    }

    /// Marks the queue broken after `e`, which is logged the first time.
    fn fail(&mut self, e: ControlError) {
        if !self.broken {
            log::warn!(
                "control: virtqueue {}: {e}; the queue is not used again",
                self.index
            );
        }
        self.broken = true;
    }

    /// Copies into `out` what the device has written so far; returns the byte count and whether
    /// buffers went back into the queue (then the device may want a notify). Takes at most `N`
    /// filled buffers per call, so a device that fills them as fast as they are given back
    /// cannot keep the caller here.
    fn read(&mut self, out: &mut [u8]) -> (usize, bool) {
        let (mut done, mut gave, mut taken) = (0, false, 0);
        while done < out.len() && !self.broken {
            let mut f = match self.filled {
                Some(f) => f,
                None if taken == N => break,
                None => match self.take_filled() {
                    Ok(Some(f)) => {
                        taken += 1;
                        f
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(e);
                        break;
                    }
                },
            };
            let n = (f.len - f.cursor).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.bufs[f.buf][f.cursor..f.cursor + n]);
            done += n;
            f.cursor += n;
            if f.cursor == f.len {
                self.filled = None;
                match self.give(f.buf) {
                    Ok(()) => gave = true,
                    Err(e) => self.fail(e),
                }
            } else {
                self.filled = Some(f);
            }
        }
        (done, gave)
    }

    /// Moves every byte the device has delivered into `kept` without giving any buffer back (so
    /// that this ends: at most `N` buffers), keeping at most `max` bytes in `kept` (the oldest
    /// go first). For a restart, which then drops the queue.
    fn drain_into(&mut self, kept: &mut Vec<u8>, max: usize) {
        let mut put = |bytes: &[u8]| {
            if kept.try_reserve(bytes.len()).is_ok() {
                kept.extend_from_slice(bytes);
            }
            let over = kept.len().saturating_sub(max);
            kept.drain(..over);
        };
        if let Some(f) = self.filled.take() {
            put(&self.bufs[f.buf][f.cursor..f.len]);
        }
        for _ in 0..N {
            if self.broken {
                return;
            }
            match self.take_filled() {
                Ok(Some(f)) => put(&self.bufs[f.buf][..f.len]),
                Ok(None) => return,
                Err(e) => self.fail(e),
            }
        }
    }

    /// Copies the next filled buffer (one whole message) into `out` and gives the buffer back;
    /// returns its length, or `None` when there is none.
    fn next_message(&mut self, out: &mut [u8; B]) -> Option<usize> {
        if self.broken {
            return None;
        }
        let f = match self.take_filled() {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) => {
                self.fail(e);
                return None;
            }
        };
        out[..f.len].copy_from_slice(&self.bufs[f.buf][..f.len]);
        if let Err(e) = self.give(f.buf) {
            self.fail(e);
        }
        Some(f.len)
    }
}

/// A driver-written virtqueue with `N` buffers of `B` bytes, each either free or in flight.
struct TxQueue<const N: usize, const B: usize> {
    index: u16,
    queue: VirtQueue<MonitorHal, N>,
    bufs: Vec<Box<[u8; B]>>,
    /// Buffers the driver owns.
    free: Vec<usize>,
    /// `of_token[t]`: the buffer and length in flight with token `t` (`None`: not in flight;
    /// `reclaim` refuses such a token before `pop_used`).
    of_token: [Option<(usize, usize)>; N],
}

impl<const N: usize, const B: usize> TxQueue<N, B> {
    fn new(transport: &mut MmioTransport<'static>, index: u16) -> Result<Self, ControlError> {
        Ok(Self {
            index,
            queue: VirtQueue::new(transport, index, false, false)?,
            bufs: (0..N).map(|_| Box::new([0u8; B])).collect(),
            free: (0..N).rev().collect(),
            of_token: [None; N],
        })
    }

    /// Takes back every buffer the device has finished with.
    fn reclaim(&mut self) -> Result<(), ControlError> {
        while let Some(token) = self.queue.peek_used() {
            let Some((buf, len)) = self
                .of_token
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                return Err(ControlError::Virtio(virtio_drivers::Error::WrongToken));
            };
            let slice: &[u8] = &self.bufs[buf][..len];
            // SAFETY: `token` was returned by `add` for exactly this buffer and length.
            unsafe { self.queue.pop_used(token, &[slice], &mut []) }?;
            self.free.push(buf);
        }
        Ok(())
    }

    /// Buffers the device has and has not given back.
    fn in_flight(&self) -> usize {
        N - self.free.len()
    }

    /// Queues the first (up to) `B` bytes of `chunk` in a free buffer and notifies the device
    /// if it asks for that. `Ok(false)` when no buffer is free.
    fn push(
        &mut self,
        transport: &mut MmioTransport<'static>,
        chunk: &[u8],
    ) -> Result<bool, ControlError> {
        let len = chunk.len().min(B);
        if len == 0 {
            return Ok(true);
        }
        let Some(buf) = self.free.pop() else {
            return Ok(false);
        };
        self.bufs[buf][..len].copy_from_slice(&chunk[..len]);
        let slice: &[u8] = &self.bufs[buf][..len];
        // SAFETY: the buffer is a heap allocation owned by `self.bufs` that is not written again
        // until `reclaim` pops it with this token; `ControlPort`'s `Drop` resets the device first.
        let token = match unsafe { self.queue.add(&[slice], &mut []) } {
            Ok(t) => t,
            Err(e) => {
                self.free.push(buf);
                return Err(e.into());
            }
        };
        match self.of_token.get_mut(usize::from(token)) {
            Some(slot) => *slot = Some((buf, len)),
            None => return Err(ControlError::Virtio(virtio_drivers::Error::WrongToken)),
        }
        if self.queue.should_notify() {
            transport.notify(self.index);
        }
        Ok(true)
    }
}

/// Where port [`CONTROL_PORT`] is in the handshake (module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortState {
    /// The device has not added the port (or has removed it).
    Absent,
    /// The driver sent `PORT_READY` and waits for the name; `console` once the device said the
    /// port is a console port.
    Added { console: bool },
    /// The driver opened the port: bytes flow.
    Open,
    /// Not the control port (another name, or a console port): left closed.
    Refused,
}

/// A control message: `struct virtio_console_control` and what follows it.
struct ControlMsg<'a> {
    id: u32,
    event: u16,
    value: u16,
    extra: &'a [u8],
}

impl<'a> ControlMsg<'a> {
    /// `None` when `bytes` is shorter than the header. Little endian: a modern device's byte
    /// order, and a legacy device's too on this little-endian monitor.
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        let (head, extra) = bytes.split_at_checked(CTRL_HEADER)?;
        Some(Self {
            id: u32::from_le_bytes([head[0], head[1], head[2], head[3]]),
            event: u16::from_le_bytes([head[4], head[5]]),
            value: u16::from_le_bytes([head[6], head[7]]),
            extra,
        })
    }
}

/// Port [`CONTROL_PORT`] of a virtio console: the monitor's end of the control channel.
pub struct ControlPort {
    /// Physical address of the virtio-mmio slot.
    base: u64,
    transport: MmioTransport<'static>,
    ctrl_rx: RxQueue<CTRL_QUEUE_SIZE, CTRL_BUFFER_SIZE>,
    ctrl_tx: TxQueue<CTRL_QUEUE_SIZE, CTRL_BUFFER_SIZE>,
    rx: RxQueue<QUEUE_SIZE, BUFFER_SIZE>,
    tx: TxQueue<QUEUE_SIZE, BUFFER_SIZE>,
    state: PortState,
    /// The device's last `PORT_OPEN` for the port: a client has the socket open.
    host_connected: bool,
    /// How many times the device reported the client gone (wrapping).
    host_closes: u32,
    /// Host bytes taken out of the receive queue by a restart, handed out first by `recv`.
    kept: Vec<u8>,
    /// A restart is under way (its handshake polls events, which must not restart again).
    restarting: bool,
}

// SAFETY: the port owns its MMIO slot (`probe` creates at most one transport per slot and the
// monitor does not touch the slot otherwise) and its queues and buffers; nothing in it is tied
// to the CPU that created it. The monitor keeps it behind a lock.
unsafe impl Send for ControlPort {}

/// The device ID in the virtio-mmio slot at `base`, if the slot holds a virtio device.
fn slot_device_id(base: u64) -> Option<u32> {
    // SAFETY: `base` is a virtio-mmio slot from the device tree, inside the device window the
    // monitor identity-maps as Device memory; reading MagicValue and DeviceID has no side
    // effects (virtio 1.2, 4.2.2).
    let (magic, id) = unsafe {
        (
            core::ptr::read_volatile(base as *const u32),
            core::ptr::read_volatile((base as usize + MMIO_DEVICE_ID) as *const u32),
        )
    };
    (magic == MMIO_MAGIC && id != 0).then_some(id)
}

/// Milliseconds of the generic counter as ticks.
fn ms_to_ticks(ms: u64, freq: u64) -> u64 {
    freq.saturating_mul(ms) / 1000
}

/// The four virtqueues of a started device.
struct Queues {
    ctrl_rx: RxQueue<CTRL_QUEUE_SIZE, CTRL_BUFFER_SIZE>,
    ctrl_tx: TxQueue<CTRL_QUEUE_SIZE, CTRL_BUFFER_SIZE>,
    rx: RxQueue<QUEUE_SIZE, BUFFER_SIZE>,
    tx: TxQueue<QUEUE_SIZE, BUFFER_SIZE>,
}

/// Initialises a reset device up to DRIVER_OK: features (MULTIPORT required), the control
/// queues and port [`CONTROL_PORT`]'s queues, with every receive buffer given. On failure the
/// device is reset before the queues made so far are freed, so that it forgets their addresses
/// first.
fn start(transport: &mut MmioTransport<'static>) -> Result<Queues, ControlError> {
    macro_rules! or_reset {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => {
                    transport.set_status(DeviceStatus::empty());
                    return Err(e.into());
                }
            }
        };
    }
    let features = transport.begin_init(Features::VERSION_1 | Features::MULTIPORT);
    if !features.contains(Features::MULTIPORT) {
        transport.set_status(DeviceStatus::empty());
        return Err(ControlError::NoMultiport);
    }
    let max_ports: u32 = or_reset!(transport.read_config_space(CONFIG_MAX_NR_PORTS));
    if max_ports <= CONTROL_PORT {
        transport.set_status(DeviceStatus::empty());
        return Err(ControlError::TooFewPorts(max_ports));
    }
    let mut ctrl_rx = or_reset!(RxQueue::new(transport, CTRL_RECEIVEQ));
    let ctrl_tx = or_reset!(TxQueue::new(transport, CTRL_TRANSMITQ));
    let mut rx = or_reset!(RxQueue::new(transport, RECEIVEQ));
    let tx = or_reset!(TxQueue::new(transport, TRANSMITQ));
    // Every receive buffer before DRIVER_OK (virtio 1.2, 5.3.6: "the driver SHOULD fill the
    // receive queue with buffers"); QEMU drops a control message when the control receiveq has
    // no buffer.
    or_reset!(ctrl_rx.give_all());
    or_reset!(rx.give_all());
    transport.finish_init();
    transport.notify(CTRL_RECEIVEQ);
    transport.notify(RECEIVEQ);
    Ok(Queues {
        ctrl_rx,
        ctrl_tx,
        rx,
        tx,
    })
}

impl ControlPort {
    /// Finds the first virtio console among the platform's virtio-mmio slots, initialises it
    /// with MULTIPORT and runs the port handshake (module comment). `None` when there is none or
    /// it cannot be initialised (that is logged). A console without a usable port
    /// [`CONTROL_PORT`] is kept (logged): the device may add the port later.
    pub fn probe(platform: &Platform) -> Option<ControlPort> {
        let slot = platform.virtio_mmio.iter().find(|v| {
            v.region.size >= MMIO_MIN_SIZE
                && v.region.base < crate::DEVICE_WINDOW.1
                && slot_device_id(v.region.base) == Some(DEVICE_ID_CONSOLE)
        })?;
        match Self::init(slot.region.base, slot.region.size) {
            Ok(port) => Some(port),
            Err(e) => {
                log::warn!(
                    "control: virtio console at {:#x} does not initialise: {e}",
                    slot.region.base
                );
                None
            }
        }
    }

    fn init(base: u64, size: u64) -> Result<ControlPort, ControlError> {
        let header = NonNull::new(base as *mut VirtIOHeader)
            .ok_or(ControlError::Virtio(virtio_drivers::Error::InvalidParam))?;
        // SAFETY: `base` is a virtio-mmio slot of `size` bytes that the device tree describes and
        // the monitor identity-maps as Device memory for its whole life ('static); `probe` makes
        // one transport per slot and nothing else touches the slot.
        let mut transport = unsafe { MmioTransport::new(header, size as usize) }
            .map_err(|_| ControlError::Virtio(virtio_drivers::Error::InvalidParam))?;
        if transport.device_type() != DeviceType::Console {
            return Err(ControlError::Virtio(virtio_drivers::Error::InvalidParam));
        }
        log::debug!(
            "control: virtio console at {base:#x}, {:?} transport",
            transport.version()
        );
        let q = start(&mut transport)?;
        let mut port = ControlPort {
            base,
            transport,
            ctrl_rx: q.ctrl_rx,
            ctrl_tx: q.ctrl_tx,
            rx: q.rx,
            tx: q.tx,
            state: PortState::Absent,
            host_connected: false,
            host_closes: 0,
            kept: Vec::new(),
            restarting: false,
        };
        port.handshake()?;
        Ok(port)
    }

    /// Steps 1 to 4 of the handshake (module comment) on a started device, waiting at most
    /// [`HANDSHAKE_MS`] for them; logs why the port did not open.
    fn handshake(&mut self) -> Result<(), ControlError> {
        if !self.send_control(NO_PORT, event::DEVICE_READY, 1) {
            return Err(ControlError::Virtio(virtio_drivers::Error::QueueFull));
        }
        let (start, freq) = crate::arch::counter();
        let timeout = ms_to_ticks(HANDSHAKE_MS, freq);
        while matches!(self.state, PortState::Absent | PortState::Added { .. })
            && crate::arch::counter().0.wrapping_sub(start) <= timeout
        {
            self.poll_events();
            core::hint::spin_loop();
        }
        match self.state {
            PortState::Open => log::debug!(
                "control: port {CONTROL_PORT} '{}' open, client {}",
                CONTROL_PORT_NAME.escape_ascii(),
                if self.host_connected {
                    "connected"
                } else {
                    "not connected"
                }
            ),
            PortState::Absent => log::warn!(
                "control: the virtio console has no port {CONTROL_PORT} (QEMU: -device \
                 virtserialport,chardev=ID,name={},nr={CONTROL_PORT})",
                CONTROL_PORT_NAME.escape_ascii()
            ),
            PortState::Added { .. } => log::warn!(
                "control: port {CONTROL_PORT} of the virtio console has no name; the control \
                 channel needs name={}",
                CONTROL_PORT_NAME.escape_ascii()
            ),
            PortState::Refused => {}
        }
        Ok(())
    }

    /// Resets the device and starts it again (module comment, "Restarts"), keeping the host
    /// bytes it had already delivered. On failure the device stays reset and the channel is off
    /// (logged).
    fn restart(&mut self) {
        self.restarting = true;
        self.rx.drain_into(&mut self.kept, KEPT_MAX);
        // Reset first (virtio 1.2, 4.2.2.1), so that the device forgets the old queues before
        // their memory goes back; then release them for `VirtQueue::new`.
        self.transport.set_status(DeviceStatus::empty());
        for q in QUEUES {
            self.transport.queue_unset(q);
        }
        self.state = PortState::Absent;
        self.host_connected = false;
        let started = start(&mut self.transport).and_then(|q| {
            self.ctrl_rx = q.ctrl_rx;
            self.ctrl_tx = q.ctrl_tx;
            self.rx = q.rx;
            self.tx = q.tx;
            self.handshake()
        });
        if let Err(e) = started {
            self.transport.set_status(DeviceStatus::empty());
            self.state = PortState::Absent;
            log::warn!("control: the virtio console does not restart: {e}; the channel is off");
        }
        self.restarting = false;
    }

    /// Physical address of the device's virtio-mmio slot.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Whether a client has the host end open, as the device last reported it (`PORT_OPEN`);
    /// false before the handshake. See the module comment for when this can be stale.
    pub fn host_connected(&self) -> bool {
        self.host_connected
    }

    /// How many times the device has reported the client gone (`PORT_OPEN` 0 after 1, or the
    /// port removed while connected), wrapping: a change means that replies not yet sent were
    /// meant for a client that has left.
    pub fn host_closes(&self) -> u32 {
        self.host_closes
    }

    /// Sends a control message; false (logged) when it could not be queued.
    fn send_control(&mut self, id: u32, event: u16, value: u16) -> bool {
        let mut m = [0u8; CTRL_HEADER];
        m[..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&event.to_le_bytes());
        m[6..].copy_from_slice(&value.to_le_bytes());
        let queued = self
            .ctrl_tx
            .reclaim()
            .and_then(|()| self.ctrl_tx.push(&mut self.transport, &m));
        match queued {
            Ok(true) => true,
            Ok(false) => {
                log::debug!("control: control transmitq full; event {event} for port {id} dropped");
                false
            }
            Err(e) => {
                log::warn!("control: control transmitq: {e}; event {event} for port {id} dropped");
                false
            }
        }
    }

    /// Handles the control messages the device has sent (at most one queue's worth per call).
    /// [`ControlPort::recv`] and [`ControlPort::send`] call this; call it when neither is used.
    pub fn poll_events(&mut self) {
        let closes = self.host_closes;
        let mut gave = false;
        for _ in 0..CTRL_QUEUE_SIZE {
            let mut msg = [0u8; CTRL_BUFFER_SIZE];
            let Some(len) = self.ctrl_rx.next_message(&mut msg) else {
                break;
            };
            gave = true;
            match ControlMsg::parse(&msg[..len]) {
                Some(m) => self.on_control(&m),
                None => log::debug!("control: a control message of {len} bytes ignored"),
            }
        }
        if gave && self.ctrl_rx.queue.should_notify() {
            self.transport.notify(CTRL_RECEIVEQ);
        }
        if closes != self.host_closes && !self.restarting {
            // QEMU gives back every transmit buffer of a client that left before it reports
            // the leave, except one it had half written, which it drops without giving back
            // (`discard_throttle_data`): a buffer still out now never comes back.
            let _ = self.tx.reclaim();
            let lost = self.tx.in_flight();
            if lost > 0 {
                log::debug!(
                    "control: the client left with {lost} transmit buffer(s) held by the \
                     device; restarting it"
                );
                self.restart();
            }
        }
    }

    /// Records whether a client has the host end open.
    fn set_host_connected(&mut self, connected: bool) {
        if self.host_connected && !connected {
            self.host_closes = self.host_closes.wrapping_add(1);
        }
        self.host_connected = connected;
    }

    /// One step of the handshake (module comment). Whatever the device sends, this changes only
    /// the port's state and queues at most one control message.
    fn on_control(&mut self, m: &ControlMsg<'_>) {
        if m.id != CONTROL_PORT {
            // Not a port this driver uses (a `virtconsole` as port 0, say): tell the device so.
            if m.event == event::PORT_ADD {
                self.send_control(m.id, event::PORT_READY, 0);
            }
            return;
        }
        match (m.event, self.state) {
            (event::PORT_ADD, PortState::Absent) => {
                // Without PORT_READY the device sends nothing more: stay absent.
                if self.send_control(CONTROL_PORT, event::PORT_READY, 1) {
                    self.state = PortState::Added { console: false };
                } else {
                    self.state = PortState::Absent;
                }
            }
            (event::PORT_REMOVE, _) => {
                self.state = PortState::Absent;
                self.set_host_connected(false);
            }
            (event::CONSOLE_PORT, PortState::Added { .. }) => {
                self.state = PortState::Added { console: true };
            }
            (event::PORT_NAME, PortState::Added { console }) => {
                let name = m.extra.split(|&b| b == 0).next().unwrap_or_default();
                if console {
                    log::warn!(
                        "control: port {CONTROL_PORT} is a console port, which QEMU does not \
                         throttle (it drops bytes): use -device virtserialport, not virtconsole"
                    );
                    self.state = PortState::Refused;
                } else if name != CONTROL_PORT_NAME {
                    log::warn!(
                        "control: port {CONTROL_PORT} is named '{}', not '{}': not used",
                        name.escape_ascii(),
                        CONTROL_PORT_NAME.escape_ascii()
                    );
                    self.state = PortState::Refused;
                } else if self.send_control(CONTROL_PORT, event::PORT_OPEN, 1) {
                    self.state = PortState::Open;
                    // The device may have host bytes waiting for the port to open.
                    self.transport.notify(RECEIVEQ);
                }
            }
            (event::PORT_OPEN, _) => self.set_host_connected(m.value != 0),
            // A repeated PORT_ADD, events out of order, RESIZE, and events this driver does not
            // know.
            _ => {}
        }
    }

    /// Copies into `buf` what has arrived from the host so far and returns the byte count; 0 when
    /// nothing has arrived or the port is not open. Never blocks. Bytes not asked for stay queued
    /// for the next call; while they do, the device's unused receive buffers keep the host side
    /// flowing.
    pub fn recv(&mut self, buf: &mut [u8]) -> usize {
        self.poll_events();
        if self.state != PortState::Open {
            return 0;
        }
        if !self.kept.is_empty() {
            let n = self.kept.len().min(buf.len());
            buf[..n].copy_from_slice(&self.kept[..n]);
            self.kept.drain(..n);
            return n;
        }
        let (n, gave) = self.rx.read(buf);
        if gave && self.rx.queue.should_notify() {
            self.transport.notify(RECEIVEQ);
        }
        n
    }

    /// Queues `bytes` for the host and returns once all of them are in the transmit queue. Waits
    /// for free transmit buffers at most [`SEND_TIMEOUT_MS`] ms in total.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), ControlError> {
        self.send_within(bytes, SEND_TIMEOUT_MS)
    }

    /// [`ControlPort::send`] waiting at most `timeout_ms` ms for transmit buffers. The device
    /// keeps them while the client does not read (QEMU throttles the port), so a timeout is
    /// backpressure: [`ControlError::Timeout`] says how many bytes were queued, and the caller
    /// sends the rest later. With no client connected QEMU discards what arrives, so this does
    /// not wait on a missing client; while the port is not open the bytes are dropped here.
    pub fn send_within(&mut self, bytes: &[u8], timeout_ms: u64) -> Result<(), ControlError> {
        self.poll_events();
        if self.state != PortState::Open {
            return Ok(());
        }
        let (start, freq) = crate::arch::counter();
        let timeout = ms_to_ticks(timeout_ms, freq);
        let closes = self.host_closes;
        let mut queued = 0;
        for chunk in bytes.chunks(BUFFER_SIZE) {
            loop {
                // A client that leaves must not get the rest, nor must the next one.
                self.poll_events();
                if self.host_closes != closes || self.state != PortState::Open {
                    return Err(ControlError::ClientGone);
                }
                self.tx.reclaim()?;
                if self.tx.push(&mut self.transport, chunk)? {
                    break;
                }
                if crate::arch::counter().0.wrapping_sub(start) > timeout {
                    return Err(ControlError::Timeout { queued });
                }
                core::hint::spin_loop();
            }
            queued += chunk.len();
        }
        // Take back what QEMU consumed during the notify, so an idle port holds no buffers.
        self.tx.reclaim()
    }
}

impl Drop for ControlPort {
    fn drop(&mut self) {
        // Reset the device first (virtio 1.2, 4.2.2.1: writing 0 to Status resets it), so it
        // stops using the queues and buffers before they are freed.
        self.transport.set_status(DeviceStatus::empty());
        for q in QUEUES {
            self.transport.queue_unset(q);
        }
    }
}
