//! Property fuzzing of every parser the monitor runs on control-channel and snapshot input
//! (issue 11, "fuzzing of every parser"): request payloads, the frame decoder, and the
//! snapshot container. Cheap cases, many of them (about 45,000 in all here), each asserting
//! no panic, bounded results and, where the format allows, that decoding then encoding gives
//! the input back. `make fuzz` runs the same parsers under cargo-fuzz (fuzz/).

use proptest::collection::vec;
use proptest::prelude::*;
use vmfork_proto::crc::Crc32;
use vmfork_proto::msg::kind;
use vmfork_proto::snapshot::{encode_end, encode_run, Snapshot, SnapshotHeader, PAGE_BYTES};
use vmfork_proto::*;

fn request_kind() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => kind::HELLO..=kind::DIFF,
        1 => any::<u16>(),
    ]
}

/// Payload bytes biased towards what the decoders branch on: small tags, lengths, UTF-8.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![
            3 => 0u8..4,
            1 => Just(0xff),
            2 => b'a'..=b'z',
            2 => any::<u8>(),
        ],
        0..48,
    )
}

/// A small snapshot with up to three runs of one or two pages.
fn snapshot_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        "[a-z0-9.]{0,8}",
        0u32..10,
        1u64..12,
        vec(any::<u8>(), 0..24),
        vec((0u64..3, 1usize..3, any::<u8>()), 0..3),
    )
        .prop_map(|(name, vcpus, pages, state, runs)| {
            let header = SnapshotHeader {
                name,
                vcpus,
                mem_bytes: pages * PAGE_BYTES as u64,
                ram_base: 0x4000_0000,
                cmdline: String::from("console=ttyAMA0"),
                state,
            };
            let mut out = Vec::new();
            header.encode(&mut out);
            let mut first = 0;
            for (gap, n, fill) in runs {
                first += gap;
                encode_run(first, &vec![fill; n * PAGE_BYTES], &mut out);
                first += n as u64;
            }
            encode_end(&mut out);
            out
        })
}

#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), prop_oneof![Just(0u8), Just(1), Just(2), Just(0xff), any::<u8>()])
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<usize>().prop_map(Mutation::Remove),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

/// Applies mutations to the body (all but the CRC), then makes the CRC right again, so the
/// parser behind the CRC check sees the damage.
fn mutate_with_good_crc(bytes: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut body = bytes[..bytes.len() - 4].to_vec();
    for m in muts {
        let n = body.len().max(1);
        match *m {
            Mutation::Set(i, b) => {
                if let Some(x) = body.get_mut(i % n) {
                    *x = b;
                }
            }
            Mutation::Insert(i, b) => body.insert(i % (body.len() + 1), b),
            Mutation::Remove(i) => {
                if !body.is_empty() {
                    body.remove(i % n);
                }
            }
            Mutation::Truncate(i) => body.truncate(i % n),
        }
    }
    let mut c = Crc32::new();
    c.update(&body);
    let crc = c.finish();
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

fn check_parsed(bytes: &[u8]) {
    if let Ok(p) = Snapshot::parse(bytes) {
        let ram_pages = p.header.mem_bytes / PAGE_BYTES as u64;
        let mut next = 0;
        let mut runs = 0;
        let mut pages = 0;
        for (first, data) in p.runs() {
            let n = (data.len() / PAGE_BYTES) as u64;
            assert!(n >= 1 && data.len() % PAGE_BYTES == 0);
            assert!(first >= next && first + n <= ram_pages);
            next = first + n;
            runs += 1;
            pages += n;
        }
        assert_eq!((runs, pages), (p.nr_runs, p.pages));
        // What parses re-encodes to the same bytes.
        let whole = Snapshot::decode(bytes).expect("parse and decode agree");
        assert_eq!(whole.encode(), bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12_000))]

    /// Request payloads: never a panic; whatever decodes re-encodes to the same payload.
    #[test]
    fn request_payloads(kind in request_kind(), p in payload()) {
        if let Ok(req) = Request::decode(kind, &p) {
            prop_assert_eq!(req.kind(), kind);
            let mut again = Vec::new();
            req.encode_payload(&mut again);
            prop_assert_eq!(again, p);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    /// The frame decoder with the monitor's cap, fed arbitrary bytes in arbitrary pieces, and
    /// every frame it finds through the request decoder (`decode_request`, as the server does).
    #[test]
    fn frame_decoder_then_requests(bytes in vec(any::<u8>(), 0..512), cut in 1usize..64) {
        let mut dec = Decoder::with_max_payload(MAX_REQUEST_PAYLOAD);
        for piece in bytes.chunks(cut) {
            for f in dec.push(piece).collect::<Vec<_>>().into_iter().flatten() {
                prop_assert!(f.payload.len() <= MAX_REQUEST_PAYLOAD as usize);
                let _ = decode_request(&f);
            }
        }
    }

    /// Framed requests survive arbitrary garbage before them.
    #[test]
    fn requests_after_garbage(garbage in vec(any::<u8>(), 0..64), kind in request_kind(), p in payload(), id in any::<u32>()) {
        if let Ok(req) = Request::decode(kind, &p) {
            let mut stream = garbage;
            req.encode_frame(id, &mut stream).unwrap();
            let mut dec = Decoder::with_max_payload(MAX_REQUEST_PAYLOAD);
            let found: Vec<_> = dec.push(&stream).filter_map(Result::ok).collect();
            let last = found.last().expect("the good frame is found");
            prop_assert_eq!(last.id, id);
            prop_assert_eq!(decode_request(last).ok(), Some(req));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    /// Snapshot containers with any damage behind a correct CRC: no panic, and what parses is
    /// well-formed and re-encodes exactly.
    #[test]
    fn snapshot_containers_with_good_crc(bytes in snapshot_bytes(), muts in vec(mutation(), 0..4)) {
        check_parsed(&bytes);
        check_parsed(&mutate_with_good_crc(&bytes, &muts));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    /// Arbitrary bytes as a snapshot.
    #[test]
    fn snapshot_arbitrary_bytes(bytes in vec(any::<u8>(), 0..256)) {
        check_parsed(&bytes);
        if bytes.len() >= 4 {
            check_parsed(&mutate_with_good_crc(&bytes, &[]));
        }
    }
}
