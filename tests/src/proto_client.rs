//! A control-protocol client for tests that speak the protocol directly (the `vmfork` tool
//! sends one request at a time and hides what the monitor answers exactly): requests can be
//! pipelined in one write, replies are matched by id, and frames not asked for yet (console
//! output, replies to other requests) wait in a backlog.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmfork_proto::msg::{Request, Response, VmId, VmInfo};
use vmfork_proto::{Decoder, PROTOCOL_VERSION};

use crate::{ControlSocket, DEFAULT_TIMEOUT};

/// One connection to the monitor's control socket, after `Hello`.
pub struct ProtoClient {
    s: UnixStream,
    dec: Decoder,
    next_id: u32,
    /// Frames read but not yet asked for.
    backlog: Vec<(u32, Response)>,
}

impl ProtoClient {
    /// Connects and says `Hello` as `name`; panics unless the monitor answers with our version.
    pub fn new(socket: &ControlSocket, name: &str) -> Self {
        let mut c = ProtoClient {
            s: socket.connect(Duration::from_millis(200)),
            dec: Decoder::new(),
            next_id: 1,
            backlog: Vec::new(),
        };
        match c.call(Request::Hello {
            version: PROTOCOL_VERSION,
            client: name.into(),
        }) {
            Response::HelloReply { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
            other => panic!("hello: {other:?}"),
        }
        c
    }

    /// Writes raw bytes (a hand-made frame, garbage) to the channel.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    /// Sends `req`; returns its id.
    pub fn send(&mut self, req: &Request) -> u32 {
        self.send_all(std::slice::from_ref(req))[0]
    }

    /// Sends all of `reqs` in one write; returns their ids.
    pub fn send_all(&mut self, reqs: &[Request]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut ids = Vec::new();
        for r in reqs {
            r.encode_frame(self.next_id, &mut out).expect("encode");
            ids.push(self.next_id);
            self.next_id += 1;
        }
        self.s.write_all(&out).expect("send");
        ids
    }

    /// Reads frames until `pred` accepts one (by id and response), which it returns; the
    /// others stay in the backlog. Panics after [`DEFAULT_TIMEOUT`], naming `what`.
    pub fn wait(&mut self, what: &str, mut pred: impl FnMut(u32, &Response) -> bool) -> Response {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            if let Some(i) = self.backlog.iter().position(|(id, r)| pred(*id, r)) {
                return self.backlog.remove(i).1;
            }
            assert!(Instant::now() < deadline, "no reply: {what}");
            let mut buf = [0u8; 65536];
            let n = match self.s.read(&mut buf) {
                Ok(0) => panic!("the monitor closed the channel"),
                Ok(n) => n,
                Err(_) => continue, // read timeout: poll again
            };
            let frames: Vec<_> = self.dec.push(&buf[..n]).collect();
            for f in frames {
                let f = f.expect("the monitor sends only good frames");
                let r = Response::decode(f.kind, &f.payload).expect("decodable reply");
                self.backlog.push((f.id, r));
            }
        }
    }

    /// Takes the reply to request `id` if it has already been read, without reading more.
    pub fn take_read(&mut self, id: u32) -> Option<Response> {
        let i = self.backlog.iter().position(|(rid, r)| {
            *rid == id
                && !matches!(
                    r,
                    Response::ConsoleOutput { .. } | Response::ConsoleClosed { .. }
                )
        })?;
        Some(self.backlog.remove(i).1)
    }

    /// The reply to request `id` (console output sent under an attach's id is not a reply).
    pub fn reply(&mut self, id: u32) -> Response {
        self.wait(&format!("request {id}"), |rid, r| {
            rid == id
                && !matches!(
                    r,
                    Response::ConsoleOutput { .. } | Response::ConsoleClosed { .. }
                )
        })
    }

    /// Sends `req` and waits for its reply.
    pub fn call(&mut self, req: Request) -> Response {
        let what = format!("{req:?}");
        let id = self.send(&req);
        self.wait(&what, |rid, r| {
            rid == id
                && !matches!(
                    r,
                    Response::ConsoleOutput { .. } | Response::ConsoleClosed { .. }
                )
        })
    }

    /// The VM list.
    pub fn list(&mut self) -> Vec<VmInfo> {
        match self.call(Request::List) {
            Response::VmList(v) => v,
            other => panic!("list: {other:?}"),
        }
    }

    /// Collects console output of `vm` until it contains `text`.
    pub fn console_until(&mut self, vm: u32, text: &str) -> String {
        let mut seen = String::new();
        while !seen.contains(text) {
            let r = self.wait(
                &format!("console of vm{vm} showing {text:?}"),
                |_, r| matches!(r, Response::ConsoleOutput { vm: VmId(v), .. } if *v == vm),
            );
            if let Response::ConsoleOutput { data, .. } = r {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        seen
    }
}
