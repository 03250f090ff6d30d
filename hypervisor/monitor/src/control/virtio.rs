//! The control channel's transport: port 0 of a virtio console on QEMU's virtio-mmio bus.
//!
//! QEMU side: `-chardev socket,id=ctl,path=SOCK,server=on,wait=off -device virtio-serial-device
//! -device virtconsole,chardev=ctl`. `virtio-serial-device` is the virtio-mmio flavour of the
//! virtio-serial bus; QEMU's `virt` board puts virtio-mmio devices in 32 slots of 0x200 bytes from
//! 0x0a00_0000, which the device tree lists (`Platform::virtio_mmio`). [`ControlPort::probe`]
//! reads each slot's magic and device ID and takes the first console (device ID 3).
//!
//! # Single port, no MULTIPORT
//! The driver does not negotiate `VIRTIO_CONSOLE_F_MULTIPORT`, so the device is a basic console:
//! receiveq 0 and transmitq 1 carry the bytes of port 0 and there is no control queue. QEMU
//! gives port number 0 to the first `virtconsole` on a bus and, when the driver has not taken
//! MULTIPORT, marks port 0 open by the guest as soon as the driver sets DRIVER_OK, so bytes flow
//! both ways with no port handshake. Two consequences of not having the control queue:
//! - The device cannot tell the driver whether a client has the socket open (QEMU reports host
//!   connect/disconnect only as `VIRTIO_CONSOLE_PORT_OPEN` control messages):
//!   [`ControlPort::host_connected`] answers `None`.
//! - `virtconsole` is a *console* port, which QEMU never throttles: when the host end is not
//!   connected, or its socket buffer is full, QEMU drops what the monitor transmits
//!   (`flush_buf` in QEMU's `hw/char/virtio-console.c`) and still returns the buffer as used.
//!   Host-to-monitor bytes are never dropped (QEMU stops reading the socket when the receive
//!   queue has no buffers). So the protocol on top must keep the amount of unread
//!   monitor-to-host data below the host socket's buffer (request/response with bounded
//!   responses does), or move to a `virtserialport` (throttled, lossless, with open/close
//!   events), which needs port number >= 1 and therefore MULTIPORT and the control queue.
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

/// The virtqueue of port 0's host-to-monitor bytes (virtio 1.2, 5.3.2).
const RECEIVEQ_PORT0: u16 = 0;
/// The virtqueue of port 0's monitor-to-host bytes.
const TRANSMITQ_PORT0: u16 = 1;
/// Buffers (and descriptors) in each queue; QEMU's virtio-serial queues hold 128.
const QUEUE_SIZE: usize = 16;
/// Bytes per buffer.
const BUFFER_SIZE: usize = 4096;
/// How long [`ControlPort::send`] waits for the device to hand back a transmit buffer.
const SEND_TIMEOUT_MS: u64 = 1000;

bitflags::bitflags! {
    /// Feature bits the driver accepts (virtio 1.2, 6 and 5.3.3): `VIRTIO_F_VERSION_1` only,
    /// which a modern (version 2) transport requires and a legacy one never offers. Neither
    /// `VIRTIO_CONSOLE_F_MULTIPORT` (bit 1), indirect descriptors nor event-index notification
    /// suppression are taken.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Features: u64 {
        /// `VIRTIO_F_VERSION_1`.
        const VERSION_1 = 1 << 32;
    }
}

/// Why the control port failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// The device kept every transmit buffer for longer than the send timeout; the first
    /// `queued` bytes were handed to the device, the rest were not.
    Timeout {
        /// Bytes of this send that were queued before the timeout.
        queued: usize,
    },
    /// The virtqueue code reported an error.
    Virtio(virtio_drivers::Error),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { queued } => write!(
                f,
                "the virtio console kept its transmit buffers for {SEND_TIMEOUT_MS} ms \
                 ({queued} bytes queued)"
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

/// A 4 KiB byte buffer shared with the device.
type Buffer = Box<[u8; BUFFER_SIZE]>;

fn new_buffers() -> Vec<Buffer> {
    (0..QUEUE_SIZE)
        .map(|_| Box::new([0u8; BUFFER_SIZE]))
        .collect()
}

/// A receive buffer the device has filled and the driver is handing out.
#[derive(Clone, Copy, Debug)]
struct Filled {
    /// Index in `rx_bufs`.
    buf: usize,
    /// Bytes the device wrote.
    len: usize,
    /// Bytes already handed out.
    cursor: usize,
}

/// Port 0 of a virtio console: the monitor's end of the control channel.
pub struct ControlPort {
    /// Physical address of the virtio-mmio slot.
    base: u64,
    transport: MmioTransport<'static>,
    receiveq: VirtQueue<MonitorHal, QUEUE_SIZE>,
    transmitq: VirtQueue<MonitorHal, QUEUE_SIZE>,
    /// Receive buffers; each is either in `receiveq` (owned by the device) or in `filled`.
    rx_bufs: Vec<Buffer>,
    /// `rx_of_token[t]`: the receive buffer added to `receiveq` with token (head descriptor) `t`.
    rx_of_token: [usize; QUEUE_SIZE],
    /// The receive buffer being drained by [`ControlPort::recv`].
    filled: Option<Filled>,
    /// Transmit buffers; each is either in `tx_free` or in flight in `transmitq`.
    tx_bufs: Vec<Buffer>,
    /// Transmit buffers the driver owns.
    tx_free: Vec<usize>,
    /// `tx_of_token[t]`: the transmit buffer and length in flight with token `t`.
    tx_of_token: [Option<(usize, usize)>; QUEUE_SIZE],
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

impl ControlPort {
    /// Finds the first virtio console among the platform's virtio-mmio slots and initialises it
    /// as a basic single-port console. `None` when there is none or it cannot be initialised
    /// (that is logged).
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
        let features = transport.begin_init(Features::VERSION_1);
        log::debug!(
            "control: virtio console at {base:#x}, {:?} transport, features {:#x}",
            transport.version(),
            features.bits()
        );
        // On failure before `port` exists, reset the device so that it forgets the queue
        // addresses before the queues' memory goes back to the allocator.
        let receiveq = match VirtQueue::new(&mut transport, RECEIVEQ_PORT0, false, false) {
            Ok(q) => q,
            Err(e) => {
                transport.set_status(DeviceStatus::empty());
                return Err(e.into());
            }
        };
        let transmitq = match VirtQueue::new(&mut transport, TRANSMITQ_PORT0, false, false) {
            Ok(q) => q,
            Err(e) => {
                transport.set_status(DeviceStatus::empty());
                return Err(e.into());
            }
        };
        let mut port = ControlPort {
            base,
            transport,
            receiveq,
            transmitq,
            rx_bufs: new_buffers(),
            rx_of_token: [0; QUEUE_SIZE],
            filled: None,
            tx_bufs: new_buffers(),
            tx_free: (0..QUEUE_SIZE).rev().collect(),
            tx_of_token: [None; QUEUE_SIZE],
        };
        // Give the device every receive buffer before DRIVER_OK (virtio 1.2, 5.3.6: "the driver
        // SHOULD fill the receive queue with buffers").
        for buf in 0..QUEUE_SIZE {
            port.give_rx(buf)?;
        }
        port.transport.finish_init();
        if port.receiveq.should_notify() {
            port.transport.notify(RECEIVEQ_PORT0);
        }
        Ok(port)
    }

    /// Physical address of the device's virtio-mmio slot.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Whether a client has the host end open. Always `None`: a basic (non-MULTIPORT) console
    /// has no control queue, which is the only way the device reports host connects.
    #[allow(
        dead_code,
        reason = "API for the protocol layer, which is not wired yet"
    )]
    pub fn host_connected(&self) -> Option<bool> {
        None
    }

    /// Puts receive buffer `buf` in the receive queue (without notifying the device).
    fn give_rx(&mut self, buf: usize) -> Result<(), ControlError> {
        let slice: &mut [u8] = self.rx_bufs[buf].as_mut_slice();
        // SAFETY: the buffer is a heap allocation owned by `self.rx_bufs`, which is never resized
        // or dropped while the device can use it (`Drop` resets the device first); the driver does
        // not touch it again until `pop_used` hands it back with this token.
        let token = unsafe { self.receiveq.add(&[], &mut [slice]) }?;
        match self.rx_of_token.get_mut(usize::from(token)) {
            Some(slot) => *slot = buf,
            None => return Err(ControlError::Virtio(virtio_drivers::Error::WrongToken)),
        }
        Ok(())
    }

    /// Takes the next receive buffer the device has filled, if any.
    fn take_filled(&mut self) -> Result<Option<Filled>, ControlError> {
        let Some(token) = self.receiveq.peek_used() else {
            return Ok(None);
        };
        let buf = *self
            .rx_of_token
            .get(usize::from(token))
            .ok_or(ControlError::Virtio(virtio_drivers::Error::WrongToken))?;
        let slice: &mut [u8] = self.rx_bufs[buf].as_mut_slice();
        // SAFETY: `token` was returned by `add` for exactly this buffer (`rx_of_token`).
        let len = unsafe { self.receiveq.pop_used(token, &[], &mut [slice]) }?;
        // The device reports how much it wrote; never trust it beyond the buffer.
        let len = (len as usize).min(BUFFER_SIZE);
        Ok(Some(Filled {
            buf,
            len,
            cursor: 0,
        }))
    }

    /// Copies into `buf` what has arrived from the host so far and returns the byte count; 0 when
    /// nothing has arrived. Never blocks. Bytes not asked for stay queued for the next call;
    /// while they do, the device's unused receive buffers keep the host side flowing.
    pub fn recv(&mut self, buf: &mut [u8]) -> usize {
        let mut done = 0;
        let mut notify = false;
        while done < buf.len() {
            let mut f = match self.filled {
                Some(f) => f,
                None => match self.take_filled() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("control: receive queue: {e}");
                        break;
                    }
                },
            };
            let n = (f.len - f.cursor).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.rx_bufs[f.buf][f.cursor..f.cursor + n]);
            done += n;
            f.cursor += n;
            if f.cursor == f.len {
                self.filled = None;
                match self.give_rx(f.buf) {
                    Ok(()) => notify = true,
                    Err(e) => log::warn!("control: receive queue: {e}"),
                }
            } else {
                self.filled = Some(f);
            }
        }
        if notify && self.receiveq.should_notify() {
            self.transport.notify(RECEIVEQ_PORT0);
        }
        done
    }

    /// Takes back every transmit buffer the device has finished with.
    fn reclaim_tx(&mut self) -> Result<(), ControlError> {
        while let Some(token) = self.transmitq.peek_used() {
            let Some((buf, len)) = self
                .tx_of_token
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                return Err(ControlError::Virtio(virtio_drivers::Error::WrongToken));
            };
            let slice: &[u8] = &self.tx_bufs[buf][..len];
            // SAFETY: `token` was returned by `add` for exactly this buffer and length.
            unsafe { self.transmitq.pop_used(token, &[slice], &mut []) }?;
            self.tx_free.push(buf);
        }
        Ok(())
    }

    /// Queues `bytes` for the host and returns once all of them are in the transmit queue. Waits
    /// for free transmit buffers at most [`SEND_TIMEOUT_MS`] ms in total; with no client
    /// connected QEMU discards the bytes (see the module comment), so this does not block on a
    /// missing client.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), ControlError> {
        self.send_within(bytes, SEND_TIMEOUT_MS)
    }

    /// [`ControlPort::send`] waiting at most `timeout_ms` ms for transmit buffers.
    pub fn send_within(&mut self, bytes: &[u8], timeout_ms: u64) -> Result<(), ControlError> {
        let (start, freq) = crate::arch::counter();
        let timeout = ms_to_ticks(timeout_ms, freq);
        let mut queued = 0;
        for chunk in bytes.chunks(BUFFER_SIZE) {
            let buf = loop {
                self.reclaim_tx()?;
                if let Some(buf) = self.tx_free.pop() {
                    break buf;
                }
                if crate::arch::counter().0.wrapping_sub(start) > timeout {
                    return Err(ControlError::Timeout { queued });
                }
                core::hint::spin_loop();
            };
            self.tx_bufs[buf][..chunk.len()].copy_from_slice(chunk);
            let slice: &[u8] = &self.tx_bufs[buf][..chunk.len()];
            // SAFETY: the buffer is a heap allocation owned by `self.tx_bufs` that is not written
            // again until `reclaim_tx` pops it with this token; `Drop` resets the device first.
            let token = match unsafe { self.transmitq.add(&[slice], &mut []) } {
                Ok(t) => t,
                Err(e) => {
                    self.tx_free.push(buf);
                    return Err(e.into());
                }
            };
            match self.tx_of_token.get_mut(usize::from(token)) {
                Some(slot) => *slot = Some((buf, chunk.len())),
                None => return Err(ControlError::Virtio(virtio_drivers::Error::WrongToken)),
            }
            if self.transmitq.should_notify() {
                self.transport.notify(TRANSMITQ_PORT0);
            }
            queued += chunk.len();
        }
        // Take back what QEMU consumed during the notify, so an idle port holds no buffers.
        self.reclaim_tx()
    }
}

impl Drop for ControlPort {
    fn drop(&mut self) {
        // Reset the device first (virtio 1.2, 4.2.2.1: writing 0 to Status resets it), so it
        // stops using the queues and buffers before they are freed.
        self.transport.set_status(DeviceStatus::empty());
        self.transport.queue_unset(RECEIVEQ_PORT0);
        self.transport.queue_unset(TRANSMITQ_PORT0);
    }
}
