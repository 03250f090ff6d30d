//! Control requests as the monitor receives them: the first input byte picks the layer. 0: the
//! byte stream through the frame decoder with the monitor's payload cap, every frame through
//! `decode_request`; otherwise: a request payload of the kind in the next two bytes, which must
//! re-encode to itself when it decodes. (The server's handling of a decoded request runs in the
//! monitor only; see the report of issue 11.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfork_proto::{decode_request, Decoder, Request, MAX_REQUEST_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode == 0 {
        let mut dec = Decoder::with_max_payload(MAX_REQUEST_PAYLOAD);
        let cut = usize::from(rest.first().copied().unwrap_or(1)).max(1);
        for piece in rest.chunks(cut) {
            for f in dec.push(piece).collect::<Vec<_>>().into_iter().flatten() {
                assert!(f.payload.len() <= MAX_REQUEST_PAYLOAD as usize);
                let _ = decode_request(&f);
            }
        }
    } else if rest.len() >= 2 {
        let kind = u16::from_le_bytes([rest[0], rest[1]]);
        let payload = &rest[2..];
        if let Ok(req) = Request::decode(kind, payload) {
            assert_eq!(req.kind(), kind);
            let mut again = Vec::new();
            req.encode_payload(&mut again);
            assert_eq!(again, payload);
        }
    }
});
