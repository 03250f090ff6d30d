//! Feeds arbitrary bytes, split at fuzzer-chosen points, into the frame decoder and every frame
//! it yields into the message and snapshot decoders: nothing may panic, and the decoder may never
//! hold more than its cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfork_proto::frame::{HEADER_LEN, TRAILER_LEN};
use vmfork_proto::{Decoder, Request, Response, MAX_REQUEST_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let mut dec = Decoder::with_max_payload(MAX_REQUEST_PAYLOAD);
    let step = usize::from(split).max(1);
    for piece in rest.chunks(step) {
        for f in dec.push(piece).flatten() {
            let _ = Request::decode(f.kind, &f.payload);
            let _ = Response::decode(f.kind, &f.payload);
        }
        assert!(dec.buffered() <= HEADER_LEN + MAX_REQUEST_PAYLOAD as usize + TRAILER_LEN);
    }
    let _ = vmfork_proto::snapshot::Snapshot::decode(rest);
});
