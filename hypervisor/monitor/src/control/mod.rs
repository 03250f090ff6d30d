//! The control channel: how the host's `vmfork` tool talks to the monitor.
//!
//! This module owns the transport ([`virtio::ControlPort`], a virtio console wired by QEMU to a
//! Unix socket) and the service that consumes its bytes. [`init`] probes for the device at boot;
//! [`poll`] moves whatever has arrived through the service and is meant to be called
//! periodically from the boot CPU's idle loop (interrupts come later).
//!
//! Services, chosen with `control=` on the monitor's command line:
//! - none (the default): bytes stay queued for the protocol handler, which is not wired yet;
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
    out: alloc::vec::Vec<u8>,
    /// Pacing of what is sent (see [`SEND_RATE`]): bytes that may go now, and when that was
    /// last brought up to date (counter ticks).
    send_tokens: usize,
    send_at: u64,
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
                send_tokens: SEND_BURST,
                send_at: 0,
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
            let mut buf = [0u8; POLL_CHUNK];
            // While decoded requests still wait (their replies were over one step's budget),
            // nothing more is received: the host's bytes stay in the device and its socket
            // until the server has caught up, so what the server holds stays bounded.
            // Replies a previous step could not queue go out first, whole: until they have,
            // nothing new is made (a reply is never cut, the stream never loses a byte).
            if !ch.out.is_empty() {
                // Briefly: a client that does not read must not keep this CPU from its guests.
                flush(ch, RETRY_SEND_MS);
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
            flush(ch, SEND_MS);
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

/// How long a step waits for the host to take fresh replies, and replies left over from a
/// previous step.
const SEND_MS: u64 = 1000;
const RETRY_SEND_MS: u64 = 2;
/// Bytes per microsecond sent at most, on average, and the largest burst. QEMU's virtconsole
/// drops what its socket cannot take at once instead of holding it back (it behaves like a serial
/// line), so the monitor paces what it sends to give the host's reader time: 8 MB/s, 64 KiB at
/// once (a third of a Unix socket's default buffer).
const SEND_RATE: u64 = 8;
const SEND_BURST: usize = 64 * 1024;

/// Sends what `ch.out` holds (as much as the pacing allows now), waiting at most `timeout_ms`
/// for the device. What is not sent (paced, or the device could not take it) stays in `ch.out`
/// for the next step; a device error drops it.
fn flush(ch: &mut Channel, timeout_ms: u64) {
    let now = crate::arch::counter().0;
    let elapsed = crate::arch::timer::micros_from_ticks(now.wrapping_sub(ch.send_at));
    ch.send_at = now;
    let refill = usize::try_from(elapsed.saturating_mul(SEND_RATE)).unwrap_or(usize::MAX);
    ch.send_tokens = ch.send_tokens.saturating_add(refill).min(SEND_BURST);
    let n = ch.out.len().min(ch.send_tokens);
    if n == 0 {
        return;
    }
    match ch.port.send_within(&ch.out[..n], timeout_ms) {
        Ok(()) => {
            ch.send_tokens -= n;
            ch.out.drain(..n);
        }
        Err(virtio::ControlError::Timeout { queued }) => {
            ch.send_tokens = ch.send_tokens.saturating_sub(queued);
            ch.out.drain(..queued.min(ch.out.len()));
        }
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
