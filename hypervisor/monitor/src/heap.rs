//! The monitor's heap: a RAM range chosen at boot, right after the image, managed by `talc`
//! (boundary-tagged chunks in free lists binned by size). It holds the monitor's own data (page
//! tables of its identity map, frame-allocator metadata, VM bookkeeping); guest memory comes from
//! the frame allocator instead.
//!
//! A binned allocator, not a first-fit list: with `linked_list_allocator` (first-fit over one
//! address-ordered list of holes, walked by every allocation and every free) each fork left
//! holes that later allocations walked past, so a fork cost O(VMs alive) and the bench's scale
//! phase (65,534 forks) no longer finished (docs/BENCHMARKS.md). Here an allocation takes the
//! first chunk of the smallest non-empty bin whose chunks all fit (a bitmap scan), and a free
//! merges with its neighbours through their boundary tags: neither depends on how many chunks
//! or holes the heap has.
//!
//! Rust's `alloc` aborts (here: panics the monitor, killing every VM) when an allocation fails,
//! so whatever a guest or the control channel can make the monitor allocate is budgeted:
//! - the big pieces (vCPU contexts, vGIC copies, uploads, console buffers) are allocated
//!   fallibly (`try_reserve*`, [`try_box`]) and the operation fails or the VM pauses;
//! - before an operation that also makes small infallible allocations (map nodes, log lines,
//!   the reference count of a vGIC copy), [`check`] asks for its estimated cost plus a safety
//!   [`margin`] that is never handed out to such operations. The margin is what the monitor
//!   itself needs to go on (replies, logging, the scheduler): it is large next to any one
//!   infallible allocation, so a free chunk is always there for those.

use alloc::boxed::Box;
use core::alloc::Layout;
use core::sync::atomic::{AtomicUsize, Ordering};

use talc::source::Manual;
use talc::TalcLock;

#[global_allocator]
static HEAP: TalcLock<spin::mutex::SpinMutex<()>, Manual> = TalcLock::new(Manual);

/// Size of the heap, set by [`init`].
static SIZE: AtomicUsize = AtomicUsize::new(0);

/// Smallest safety margin. Building the largest reply (a 1 MiB frame: `List` of thousands of
/// VMs) takes about four times its size at once (the list, its encoding as it grows, the frame
/// in the output buffer); the rest is room for logging and the scheduler.
const MARGIN_MIN: usize = 6 << 20;

/// Gives the allocator `[start, start + size)`.
///
/// # Safety
/// The range must be RAM that nothing else uses, now or later, and this must be called once.
pub unsafe fn init(start: u64, size: u64) {
    // SAFETY: the caller guarantees the range is unused RAM that nothing else mutates, handed
    // over exactly once and never released (what `claim` requires).
    let claimed = unsafe { HEAP.lock().claim(start as *mut u8, size as usize) };
    if claimed.is_some() {
        SIZE.store(size as usize, Ordering::Relaxed);
    }
}

/// Bytes in use and bytes free on the heap. In use counts the allocator's own overhead too (its
/// bin heads, a tag per allocation, rounding to its 32-byte chunks): it is the heap less what can
/// still be handed out, so `used + free` is the heap's size.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    let c = heap.counters();
    (c.claimed_bytes - c.available_bytes, c.available_bytes)
}

/// Bytes of the heap in all.
pub fn size() -> usize {
    SIZE.load(Ordering::Relaxed)
}

/// Free heap that guest- and channel-driven work may never use: 1/32 of the heap, at least
/// [`MARGIN_MIN`] (6 MiB).
pub fn margin() -> usize {
    (size() / 32).max(MARGIN_MIN)
}

/// Not enough heap for an operation (the margin counted).
pub use vmfork_core::machine::HeapLow;

/// Whether `bytes` more can be allocated while keeping the [`margin`] free.
pub fn check(bytes: usize) -> Result<(), HeapLow> {
    let (_, free) = usage();
    if free >= bytes.saturating_add(margin()) {
        Ok(())
    } else {
        Err(HeapLow {
            wanted: bytes,
            free,
            reserve: margin(),
        })
    }
}

/// `Box::new(value)` that fails instead of aborting when the heap cannot hold it (the margin
/// counted).
pub fn try_box<T>(value: T) -> Result<Box<T>, HeapLow> {
    let layout = Layout::new::<T>();
    check(layout.size())?;
    if layout.size() == 0 {
        return Ok(Box::new(value));
    }
    // SAFETY: the layout has a non-zero size, as `alloc` requires.
    let p = unsafe { alloc::alloc::alloc(layout) }.cast::<T>();
    if p.is_null() {
        return Err(HeapLow {
            wanted: layout.size(),
            free: usage().1,
            reserve: margin(),
        });
    }
    // SAFETY: `p` is a fresh allocation of `T`'s layout from the global allocator, which is what
    // `Box::from_raw` requires; writing `value` initialises it first.
    unsafe {
        p.write(value);
        Ok(Box::from_raw(p))
    }
}
