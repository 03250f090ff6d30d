//! `Snapshot::parse` allocates nothing, whatever the snapshot holds: a monitor's heap holds the
//! uploaded file once, not a second copy of its (up to 16 MiB) state. Counted with a wrapping
//! global allocator; this file has one test so nothing else allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use vmfork_proto::snapshot::{encode_end, encode_run, Snapshot, SnapshotHeader, MAX_STATE_BYTES};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, only counting the bytes asked for.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::SeqCst);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn parse_allocates_nothing() {
    let header = SnapshotHeader {
        name: "n".repeat(200),
        vcpus: 2,
        mem_bytes: 64 << 12,
        ram_base: 0x4000_0000,
        cmdline: "c".repeat(4000),
        state: vec![7; MAX_STATE_BYTES],
    };
    let mut bytes = Vec::new();
    header.encode(&mut bytes);
    encode_run(3, &[1; 8192], &mut bytes);
    encode_run(9, &[2; 4096], &mut bytes);
    encode_end(&mut bytes);

    let before = ALLOCATED.load(Ordering::SeqCst);
    let parsed = Snapshot::parse(&bytes).expect("a good snapshot");
    let runs = parsed.runs().count();
    let after = ALLOCATED.load(Ordering::SeqCst);
    assert_eq!(
        after - before,
        0,
        "parse allocated {} bytes",
        after - before
    );
    assert_eq!((runs, parsed.pages), (2, 3));
    assert_eq!(parsed.header.state.len(), MAX_STATE_BYTES);
    assert_eq!(parsed.header.to_header(), header);
}
