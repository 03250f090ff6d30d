//! Every message survives encode -> frame -> streaming decode -> decode unchanged.
mod common;

use common::*;
use proptest::prelude::*;
use vmfork_proto::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_round_trips(req in request(), id in any::<u32>(), pieces in proptest::collection::vec(1usize..300, 0..4)) {
        let mut bytes = Vec::new();
        req.encode_frame(id, &mut bytes).unwrap();
        let mut dec = Decoder::with_max_payload(MAX_REQUEST_PAYLOAD);
        let (frames, errors) = decode_all(&mut dec, &bytes, &pieces);
        prop_assert!(errors.is_empty(), "{:?}", errors);
        prop_assert_eq!(frames.len(), 1);
        prop_assert_eq!(frames[0].id, id);
        prop_assert_eq!(frames[0].version, PROTOCOL_VERSION);
        prop_assert_eq!(decode_request(&frames[0]), Ok(req));
        prop_assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn response_round_trips(resp in response(), id in any::<u32>(), pieces in proptest::collection::vec(1usize..300, 0..4)) {
        let mut bytes = Vec::new();
        resp.encode_frame(id, &mut bytes).unwrap();
        let mut dec = Decoder::new();
        let (frames, errors) = decode_all(&mut dec, &bytes, &pieces);
        prop_assert!(errors.is_empty(), "{:?}", errors);
        prop_assert_eq!(frames.len(), 1);
        prop_assert_eq!(frames[0].id, id);
        prop_assert_eq!(Response::decode(frames[0].kind, &frames[0].payload), Ok(resp));
    }

    /// A payload with a byte cut off or one added never decodes to a message.
    #[test]
    fn payload_length_is_exact(req in request()) {
        let mut p = Vec::new();
        req.encode_payload(&mut p);
        let mut longer = p.clone();
        longer.push(0);
        prop_assert!(Request::decode(req.kind(), &longer).is_err());
        if !p.is_empty() {
            prop_assert!(Request::decode(req.kind(), &p[..p.len() - 1]).is_err());
        }
    }

    /// Arbitrary payloads under any kind never panic the message decoders.
    #[test]
    fn message_decoders_never_panic(kind in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Request::decode(kind, &payload);
        let _ = Response::decode(kind, &payload);
        let _ = snapshot::Snapshot::decode(&payload);
    }

    #[test]
    fn snapshot_round_trips(
        name in text(), vcpus in any::<u32>(), cmdline in text(),
        state in proptest::collection::vec(any::<u8>(), 0..100),
        runs in proptest::collection::vec((0u64..4, 1usize..3, any::<u8>()), 0..5),
    ) {
        let mut first = 0;
        let mut page_runs = Vec::new();
        for (gap, pages, fill) in runs {
            first += gap;
            page_runs.push(snapshot::PageRun { first_page: first, data: vec![fill; pages * 4096] });
            first += pages as u64;
        }
        let snap = snapshot::Snapshot {
            header: snapshot::SnapshotHeader { name, vcpus, mem_bytes: (first + 3) * 4096, ram_base: 0x4000_0000, cmdline, state },
            runs: page_runs,
        };
        let bytes = snap.encode();
        prop_assert_eq!(snapshot::Snapshot::decode(&bytes), Ok(snap));
        // Any single bit flip is caught.
        let mut bad = bytes.clone();
        let i = bytes.len() / 2;
        bad[i] ^= 1;
        prop_assert!(snapshot::Snapshot::decode(&bad).is_err());
    }
}

#[test]
fn a_peer_of_another_version_gets_version_mismatch() {
    let mut bytes = Vec::new();
    frame::encode_frame(99, msg::kind::HELLO, 7, &[], &mut bytes).unwrap();
    let mut dec = Decoder::new();
    let frames: Vec<_> = dec.push(&bytes).collect();
    let f = frames[0].clone().unwrap();
    assert_eq!(
        decode_request(&f),
        Err(ErrorReply::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: 99
        })
    );
}

#[test]
fn hello_encoding_is_frozen() {
    // Hello { version: 1, client: "x" }: kind 0x0001, payload 01 00 | 01 00 00 00 'x'.
    let mut p = Vec::new();
    Request::Hello {
        version: 1,
        client: "x".into(),
    }
    .encode_payload(&mut p);
    assert_eq!(p, [1, 0, 1, 0, 0, 0, b'x']);
    let mut p = Vec::new();
    Response::Error(ErrorReply::VersionMismatch { ours: 2, theirs: 1 }).encode_payload(&mut p);
    assert_eq!(p, [3, 2, 0, 1, 0]);
}

#[test]
fn oversize_encode_is_refused() {
    let mut out = Vec::new();
    let big = vec![0u8; MAX_PAYLOAD as usize + 1];
    assert!(frame::encode_frame(1, 1, 1, &big, &mut out).is_err());
    assert!(out.is_empty());
}
