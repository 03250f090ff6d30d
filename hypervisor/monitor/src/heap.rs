//! The monitor's heap: a linked-list allocator over a RAM range chosen at boot, right after the
//! image. It holds the monitor's own data (page tables of its identity map, frame-allocator
//! metadata, VM bookkeeping); guest memory comes from the frame allocator instead.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives the allocator `[start, start + size)`.
///
/// # Safety
/// The range must be RAM that nothing else uses, now or later, and this must be called once.
pub unsafe fn init(start: u64, size: u64) {
    // SAFETY: the caller guarantees the range is unused RAM, handed over exactly once.
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) };
}

/// Bytes currently allocated and bytes free on the heap.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
