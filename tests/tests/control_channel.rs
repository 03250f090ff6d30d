//! The control channel's transport: the monitor drives port 1 of a virtio console on QEMU's
//! virtio-mmio bus and QEMU connects it to a Unix socket (`-chardev socket,...,server=on,wait=off
//! -device virtio-serial-device -device virtserialport,chardev=ctl,name=vmfork.ctl,nr=1`). With
//! `control=echo` on the command line the monitor sends back every byte it receives, which these
//! tests check from the host side: small and 1 MiB transfers, reconnecting, and a boot without
//! the device.
//!
//! Transfers go in lock step (send a piece, read its echo, then send the next): the echo service
//! is a transport test, not a server, and drops what the host has not taken within its send
//! timeout (1 s), so the amount of unread echo is kept far below the socket's buffer. Lossless
//! pipelining through the real server is tested in `limits` (`pipelined_dump_reads...`).
//!
//! These need the monitor image: run `make` first (or set `VMFORK_MONITOR_IMAGE`).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmfork_tests::{Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// The monitor's line when it found the control device.
const CONSOLE_FOUND: &str = "control: virtio console at";
/// The monitor's line when there is no control device.
const CONSOLE_OFF: &str = "control: no virtio console; the control channel is off";
/// The ready line's prefix.
const READY: &str = "monitor: ready";
/// How long to wait for any one echo.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest piece of a large transfer: well below a Unix socket's default buffer (~208 KiB).
const MAX_PIECE: usize = 32 * 1024;

/// Makes socket paths unique within this test process.
static SOCKETS: AtomicU32 = AtomicU32::new(0);

/// A Unix socket path under /tmp, short enough for `sun_path` (108 bytes), removed on drop.
struct SocketPath(PathBuf);

impl SocketPath {
    fn new() -> Self {
        let n = SOCKETS.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/vmf-ctl-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        SocketPath(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The monitor with (or without) the control device on `socket`, and `append` as command line.
fn start(socket: Option<&SocketPath>, append: &str) -> Qemu {
    let mut cfg = QemuConfig::monitor().smp(2).mem_mib(512).append(append);
    if let Some(socket) = socket {
        let chardev = format!(
            "socket,id=ctl,path={},server=on,wait=off",
            socket.path().display()
        );
        cfg = cfg
            .arg("-chardev")
            .arg(&chardev)
            .arg("-device")
            .arg("virtio-serial-device")
            .arg("-device")
            .arg("virtserialport,chardev=ctl,name=vmfork.ctl,nr=1");
    }
    Qemu::start(cfg)
}

/// Connects to QEMU's socket, retrying while QEMU has not created it yet.
fn connect(socket: &SocketPath) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(socket.path()) {
            Ok(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))
                    .expect("set a read timeout");
                s.set_write_timeout(Some(IO_TIMEOUT))
                    .expect("set a write timeout");
                return s;
            }
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect to {}: {e}", socket.path().display()),
        }
    }
}

/// Sends `bytes` and reads back exactly as many, which must be the same bytes.
fn echo(s: &mut UnixStream, bytes: &[u8], what: &str) {
    s.write_all(bytes)
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut back = vec![0u8; bytes.len()];
    let mut got = 0;
    while got < back.len() {
        match s.read(&mut back[got..]) {
            Ok(0) => panic!(
                "{what}: the socket closed after {got} of {} bytes",
                bytes.len()
            ),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("{what}: read after {got} of {} bytes: {e}", bytes.len()),
        }
    }
    if back != bytes {
        let at = back
            .iter()
            .zip(bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "{what}: the echo differs from what was sent at byte {at} of {}: sent {:02x?}, got {:02x?}",
            bytes.len(),
            &bytes[at..bytes.len().min(at + 16)],
            &back[at..back.len().min(at + 16)],
        );
    }
}

/// xorshift64*: deterministic pseudo-random bytes for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }

    /// A number in `1..=max`.
    fn size(&mut self, max: usize) -> usize {
        (self.next() % max as u64) as usize + 1
    }
}

/// A seed that differs run to run; printed so that a failure can be replayed.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let seed = t | 1;
    eprintln!("control_channel: seed {seed:#x}");
    seed
}

/// Boots with the device and the echo service and waits for the monitor to be ready.
fn start_echo(socket: &SocketPath) -> Qemu {
    let q = start(Some(socket), "control=echo");
    let found = q.wait_for(CONSOLE_FOUND, DEFAULT_TIMEOUT);
    assert!(
        found.contains("control: virtio console at 0xa00"),
        "the console should be in QEMU virt's virtio-mmio window: {found:?}"
    );
    q.wait_for(READY, DEFAULT_TIMEOUT);
    q
}

#[test]
fn echoes_small_and_one_mib_transfers() {
    let socket = SocketPath::new();
    let q = start_echo(&socket);
    let mut s = connect(&socket);

    echo(&mut s, b"hello, monitor", "a short message");
    echo(&mut s, &[0x00], "a single NUL byte");
    let all_values: Vec<u8> = (0..=255u8).collect();
    echo(&mut s, &all_values, "every byte value");

    let mut rng = Rng(seed());
    let total = 1 << 20;
    let mut sent = 0;
    let mut pieces = 0;
    while sent < total {
        let n = rng.size(MAX_PIECE).min(total - sent);
        let piece = rng.bytes(n);
        echo(
            &mut s,
            &piece,
            &format!("piece {pieces} ({n} bytes at {sent})"),
        );
        sent += n;
        pieces += 1;
    }
    assert_eq!(sent, total);
    assert!(pieces > 1, "1 MiB must go in several pieces");
    q.expect_no("panic");
    q.expect_no("control: echo of");
}

#[test]
fn echoes_again_after_reconnecting() {
    let socket = SocketPath::new();
    let q = start_echo(&socket);
    let mut rng = Rng(seed());

    let mut s = connect(&socket);
    echo(&mut s, b"first connection", "first connection");
    drop(s);

    let mut s = connect(&socket);
    echo(&mut s, b"second connection", "second connection");

    // Leave a client with its echo unread. QEMU drops what it cannot deliver, and when it notices
    // the hang-up it also discards what it had not yet read from that client, so the next client
    // may see a contiguous part of that echo before its own bytes, but nothing else.
    let unread = rng.bytes(16 * 1024);
    s.write_all(&unread).expect("write the unread bytes");
    drop(s);

    let mut s = connect(&socket);
    let marker = b"third connection: the marker";
    s.write_all(marker).expect("write the marker");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(marker) {
        assert!(
            got.len() <= unread.len() + marker.len(),
            "more bytes came back than were sent: {} bytes",
            got.len()
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("the socket closed after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the marker's echo after {} bytes: {e}", got.len()),
        }
    }
    let before = &got[..got.len() - marker.len()];
    let at = if before.is_empty() {
        Some(0)
    } else {
        unread.windows(before.len()).position(|w| w == before)
    };
    let Some(at) = at else {
        panic!(
            "{} bytes came back before the marker that are not a contiguous part of the unread \
             echo",
            before.len()
        )
    };
    eprintln!(
        "control_channel: {} stale echo bytes (from offset {at} of the unread {}) before the marker",
        before.len(),
        unread.len()
    );
    echo(&mut s, b"still echoing", "third connection");
    q.expect_no("panic");
}

#[test]
fn without_the_echo_service_bytes_are_not_echoed() {
    let socket = SocketPath::new();
    let q = start(Some(&socket), "");
    q.wait_for(CONSOLE_FOUND, DEFAULT_TIMEOUT);
    q.wait_for(READY, DEFAULT_TIMEOUT);
    let mut s = connect(&socket);
    s.write_all(b"nobody answers").expect("write");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("set a read timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => panic!("{n} bytes came back without control=echo: {:?}", &buf[..n]),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "unexpected read error: {e}"
        ),
    }
    assert_eq!(q.count("control: echo service on"), 0);
}

#[test]
fn boots_without_the_control_device() {
    let q = start(None, "control=echo");
    let off = q.wait_for(CONSOLE_OFF, DEFAULT_TIMEOUT);
    assert!(
        !off.contains("ERROR") && !off.contains("WARN"),
        "a missing control device is not an error: {off:?}"
    );
    q.wait_for(READY, DEFAULT_TIMEOUT);
    q.expect_no(CONSOLE_FOUND);
    q.expect_no("panic");
}

/// Clients that leave while the monitor is held back, many times over: QEMU throttles the port
/// once the socket is full, and when the client then leaves it drops the transmit buffer it had
/// half written without giving it back to the driver (`discard_throttle_data` in QEMU's
/// `hw/char/virtio-serial-bus.c`). The driver restarts the device when that happens; before it
/// did, every such leave cost one of its 16 transmit buffers and the channel went dead after 16
/// of them (seen: no reply on the 17th connection). 24 leaves here, then the echo still works.
#[test]
fn clients_that_leave_while_held_back_do_not_wedge_the_channel() {
    use std::os::unix::io::AsRawFd;
    let socket = SocketPath::new();
    let q = start_echo(&socket);
    let mut rng = Rng(seed());
    // Bytes of the echo waiting in the socket (`FIONREAD`).
    let unread = |s: &UnixStream| {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a socket this test owns writes one c_int through the pointer.
        let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n as usize
    };
    let mut sent = Vec::new();
    for cycle in 0..24 {
        let mut s = connect(&socket);
        // More than the socket holds, so the echo fills it and the device holds back.
        sent = rng.bytes(256 * 1024);
        s.write_all(&sent)
            .unwrap_or_else(|e| panic!("leave {cycle}: write: {e}"));
        // Wait until the socket is full: the bytes waiting in it stop growing.
        let deadline = Instant::now() + IO_TIMEOUT;
        let (mut last, mut same) = (0, 0);
        while same < 3 || last < 64 * 1024 {
            assert!(
                Instant::now() < deadline,
                "leave {cycle}: the echo never filled the socket ({last} bytes waiting)"
            );
            std::thread::sleep(Duration::from_millis(100));
            let now = unread(&s);
            same = if now == last { same + 1 } else { 0 };
            last = now;
        }
        drop(s);
    }
    // The next client may first get the echo of what the last one sent and the monitor had
    // not read yet (never more than that), then its own.
    let mut s = connect(&socket);
    let marker = b"after 24 leaves: the marker";
    s.write_all(marker).expect("write the marker");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(marker) {
        assert!(
            got.len() <= sent.len() + marker.len(),
            "more bytes came back than the last client sent: {} bytes",
            got.len()
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("the socket closed after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("no echo of the marker after {} bytes: {e}", got.len()),
        }
    }
    eprintln!(
        "control_channel: {} stale echo bytes before the marker",
        got.len() - marker.len()
    );
    echo(&mut s, b"still echoing", "after the leaves");
    q.expect_no("panic");
}
