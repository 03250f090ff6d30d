//! `vmfork console`: stream a VM's console output out and keys in.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vmfork_proto::{ErrorReply, Request, Response, VmId, CHUNK_SIZE};

use crate::client::{Client, ClientError};

/// The key that detaches in raw terminal mode: Ctrl-] (GS, 0x1d), as in telnet and virsh.
pub const DETACH_KEY: u8 = 0x1d;

/// How a console session behaves.
#[derive(Clone, Debug)]
pub struct ConsoleOptions {
    /// A byte in the input that detaches instead of being sent (Ctrl-] on a terminal; none for
    /// piped input, which passes every byte through).
    pub detach_key: Option<u8>,
    /// After the input ends (EOF), keep printing output this long before detaching.
    pub linger: Duration,
    /// Show the VM's scroll-back (the last 4 KiB it printed) first.
    pub replay: bool,
}

/// Why a console session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The detach key was pressed.
    DetachKey,
    /// The input ended.
    InputEnded,
    /// The VM went (powered off, killed, crashed): the monitor's reason. Everything it printed
    /// before has been written to the output.
    VmGone(String),
}

enum Event {
    Input(Vec<u8>),
    InputEnd,
    Message(Result<(u32, Response), ClientError>),
}

/// Attaches to `vm`'s console: bytes from `input` go to the guest, the guest's output goes to
/// `output`, until the detach key, the end of input (plus `linger`), or an error (the VM was
/// killed: `NoSuchVm`). Consumes the client: its socket is shared with a reader thread.
pub fn run(
    mut client: Client,
    vm: VmId,
    input: Box<dyn Read + Send>,
    output: &mut dyn Write,
    opts: &ConsoleOptions,
) -> Result<ConsoleEnd, ClientError> {
    let attach_id = client.send(&Request::ConsoleAttach {
        vm,
        replay: opts.replay,
    })?;
    // Wait for the attach reply, printing output that may arrive with it.
    loop {
        let (id, msg) = client.recv()?;
        match msg {
            Response::ConsoleOutput { vm: v, data } if v == vm => {
                output.write_all(&data)?;
                output.flush()?;
            }
            Response::Ok if id == attach_id => break,
            Response::Error(e) if id == attach_id => return Err(ClientError::Monitor(e)),
            _ => {}
        }
    }
    client.stream.set_read_timeout(None)?;

    let (tx, rx) = mpsc::channel();
    {
        let tx = tx.clone();
        let mut input = input;
        thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(Event::InputEnd);
                        return;
                    }
                    Ok(n) => {
                        if tx.send(Event::Input(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        let _ = tx.send(Event::InputEnd);
                        return;
                    }
                }
            }
        });
    }
    // The reader thread owns a clone of the socket and the decoder state (and any queued events).
    let mut reader = client.split_reader()?;
    thread::spawn(move || loop {
        let m = reader.recv();
        let stop = m.is_err();
        if tx.send(Event::Message(m)).is_err() || stop {
            return;
        }
    });

    let mut acks: HashSet<u32> = HashSet::new();
    let mut detach: Option<(u32, ConsoleEnd)> = None;
    let mut deadline: Option<Instant> = None;
    loop {
        let ev = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(ev) => ev,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    deadline = None;
                    let id = client.send(&Request::ConsoleDetach { vm })?;
                    detach = Some((id, ConsoleEnd::InputEnded));
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(ClientError::Closed),
            },
            None => rx.recv().map_err(|_| ClientError::Closed)?,
        };
        match ev {
            Event::Input(bytes) => {
                if detach.is_some() || deadline.is_some() {
                    continue;
                }
                let (send, key) = match opts
                    .detach_key
                    .and_then(|k| bytes.iter().position(|&b| b == k))
                {
                    Some(p) => (&bytes[..p], true),
                    None => (&bytes[..], false),
                };
                for piece in send.chunks(CHUNK_SIZE) {
                    let id = client.send(&Request::ConsoleInput {
                        vm,
                        data: piece.to_vec(),
                    })?;
                    acks.insert(id);
                }
                if key {
                    let id = client.send(&Request::ConsoleDetach { vm })?;
                    detach = Some((id, ConsoleEnd::DetachKey));
                }
            }
            Event::InputEnd => {
                if detach.is_none() && deadline.is_none() {
                    deadline = Some(Instant::now() + opts.linger);
                }
            }
            Event::Message(m) => {
                let (id, msg) = m?;
                match msg {
                    Response::ConsoleOutput { vm: v, data } if v == vm => {
                        output.write_all(&data)?;
                        output.flush()?;
                    }
                    Response::Ok => {
                        if let Some((d, end)) = &detach {
                            if *d == id {
                                return Ok(end.clone());
                            }
                        }
                        acks.remove(&id);
                    }
                    Response::ConsoleClosed { vm: v, reason } if v == vm && id == attach_id => {
                        return Ok(ConsoleEnd::VmGone(reason));
                    }
                    Response::Error(ErrorReply::NoSuchVm(v)) if id == attach_id => {
                        // The VM was killed while we were attached.
                        return Err(ClientError::Monitor(ErrorReply::NoSuchVm(v)));
                    }
                    Response::Error(e) => return Err(ClientError::Monitor(e)),
                    _ => {}
                }
            }
        }
    }
}

/// Puts a terminal into raw mode (no line buffering, no echo, no signals from keys) and restores
/// it when dropped.
#[derive(Debug)]
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Enters raw mode on `fd` (which must be a terminal).
    pub fn enter(fd: &impl AsRawFd) -> io::Result<RawMode> {
        let fd = fd.as_raw_fd();
        // SAFETY: termios is plain old data; an all-zero value is a valid bit pattern, and it is
        // fully written by tcgetattr before being read.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is an open descriptor borrowed for this call; `saved` is a valid, writable
        // termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios obtained from tcgetattr.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so "\n" from guests that send bare newlines still returns
        // the carriage.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `fd` is open; `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: `self.fd` was a terminal when we entered raw mode (stdin lives for the whole
        // process); `saved` is the termios read from it then.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}
