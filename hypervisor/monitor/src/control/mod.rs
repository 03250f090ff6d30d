//! The control channel: how the host's `vmfork` tool talks to the monitor.
//!
//! This module owns the transport ([`virtio::ControlPort`], port 1 of a virtio console: a
//! `virtserialport` that QEMU wires to a Unix socket) and the service that consumes its bytes.
//! [`init`] probes for the device at boot; [`poll`] moves whatever has arrived through the
//! service and is meant to be called periodically from the boot CPU's idle loop (interrupts come
//! later).
//!
//! Services, chosen with `control=` on the monitor's command line:
//! - `control=on` (the default): the control protocol (docs/PROTOCOL.md, [`server`]);
//! - `control=off`: bytes stay queued (the device then stops taking them from the host);
//! - `control=echo`: a debug service that sends every received byte straight back, and makes the
//!   boot CPU serve the channel forever after `monitor: ready` ([`echo_forever`]).

pub mod virtio;

use spin::Mutex;
use vmfork_core::platform::Platform;

use vmfork_core::machine::server::Server;

use crate::vm::{MonitorHost, VMS};
use virtio::ControlPort;

/// Bytes moved per [`poll`] step: one virtio buffer.
const POLL_CHUNK: usize = 4096;

/// What the monitor does with the bytes that arrive on the control channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// Leave them queued (the device then stops taking bytes from the host once its receive
    /// buffers are full).
    Idle,
    /// Send every byte back (`control=echo`), for testing the transport.
    Echo,
    /// Serve the control protocol (docs/PROTOCOL.md): the default.
    Protocol,
}

/// The control channel's state: `None` until [`init`] found a device.
struct Channel {
    port: ControlPort,
    service: Service,
    server: Server<'static, MonitorHost>,
    /// Replies made and not yet taken by the device (it holds back while the client does not
    /// read); sent before anything new is made.
    out: alloc::vec::Vec<u8>,
    /// [`ControlPort::host_closes`] when `out` was last checked against it.
    closes_seen: u32,
}

static CHANNEL: Mutex<Option<Channel>> = Mutex::new(None);

/// Probes for the control device, logs the outcome and picks the service from `bootargs`.
/// Returns true when there is a control channel. Call once, on the boot CPU, after the frame
/// allocator and the heap are up.
pub fn init(platform: &Platform, bootargs: &str) -> bool {
    let service = match vmfork_core::cmdline::value(bootargs, "control") {
        None | Some("on") => Service::Protocol,
        Some("off") => Service::Idle,
        Some("echo") => Service::Echo,
        Some(other) => {
            log::warn!("unknown control={other}; expected on, off or echo");
            Service::Protocol
        }
    };
    match ControlPort::probe(platform) {
        Some(port) => {
            log::info!("control: virtio console at {:#x}", port.base());
            if service == Service::Echo {
                log::info!("control: echo service on");
            }
            *CHANNEL.lock() = Some(Channel {
                port,
                service,
                server: Server::new(
                    &VMS,
                    alloc::format!("vmfork-monitor {}", env!("CARGO_PKG_VERSION")),
                ),
                out: alloc::vec::Vec::new(),
                closes_seen: 0,
            });
            true
        }
        None => {
            log::info!("control: no virtio console; the control channel is off");
            false
        }
    }
}

/// One step of the control service: takes up to one buffer of received bytes and handles them.
/// Returns true when it did some work (call again soon), false when the channel was quiet or
/// there is none. Never blocks for long: a send waits at most the transport's send timeout.
pub fn poll() -> bool {
    let mut guard = CHANNEL.lock();
    let Some(ch) = guard.as_mut() else {
        return false;
    };
    match ch.service {
        Service::Idle => false,
        Service::Protocol => {
            ch.port.poll_events();
            if ch.port.host_closes() != ch.closes_seen {
                // The client left: what it did not get is not for the next one. (QEMU drops
                // what the device held for it when it left.)
                ch.closes_seen = ch.port.host_closes();
                if !ch.out.is_empty() {
                    log::debug!(
                        "control: client gone, {} bytes of replies dropped (connected now: {})",
                        ch.out.len(),
                        ch.port.host_connected()
                    );
                    ch.out.clear();
                }
            }
            let mut buf = [0u8; POLL_CHUNK];
            // While decoded requests still wait (their replies were over one step's budget),
            // nothing more is received: the host's bytes stay in the device and its socket
            // until the server has caught up, so what the server holds stays bounded.
            // Replies a previous step could not queue go out first, whole: until they have,
            // nothing new is made (a reply is never cut, the stream never loses a byte).
            if !ch.out.is_empty() {
                flush(ch);
                return true;
            }
            let n = if ch.server.backlog() {
                0
            } else {
                ch.port.recv(&mut buf)
            };
            ch.server.input(&buf[..n], &mut ch.out);
            ch.server.pump(&mut ch.out);
            crate::kick::send(&ch.server.take_kicks());
            if ch.out.is_empty() {
                return n > 0 || ch.server.backlog();
            }
            flush(ch);
            true
        }
        Service::Echo => {
            let mut buf = [0u8; POLL_CHUNK];
            let n = ch.port.recv(&mut buf);
            if n == 0 {
                return false;
            }
            if let Err(e) = ch.port.send(&buf[..n]) {
                log::warn!("control: echo of {n} bytes: {e}");
            }
            true
        }
    }
}

/// How long a step waits for the device to take replies. The port is throttled: while the
/// client does not read, QEMU keeps the transmit buffers and a send times out with part of the
/// bytes queued; nothing is lost, the rest waits in `Channel::out`. So the wait is short: a
/// client that does not read must not keep this CPU from its guests.
const SEND_MS: u64 = 2;

/// Sends what `ch.out` holds, waiting at most [`SEND_MS`] for the device. What the device could
/// not take yet stays in `ch.out` for the next step; a client that leaves, or a device error,
/// drops it.
fn flush(ch: &mut Channel) {
    match ch.port.send_within(&ch.out, SEND_MS) {
        Ok(()) => ch.out.clear(),
        Err(virtio::ControlError::Timeout { queued }) => {
            ch.out.drain(..queued.min(ch.out.len()));
        }
        // The replies were for the client that left (the next poll sees the leave too).
        Err(virtio::ControlError::ClientGone) => ch.out.clear(),
        Err(e) => {
            log::warn!("control: sending {} bytes: {e}", ch.out.len());
            ch.out.clear();
        }
    }
}

/// True when the echo service is on: the boot CPU should then call [`echo_forever`].
pub fn echo_enabled() -> bool {
    CHANNEL
        .lock()
        .as_ref()
        .is_some_and(|ch| ch.service == Service::Echo)
}

/// Serves the echo service on this CPU forever, busy-polling the device (no interrupts yet).
pub fn echo_forever() -> ! {
    loop {
        if !poll() {
            core::hint::spin_loop();
        }
    }
}
