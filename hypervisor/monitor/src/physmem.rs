//! [`PhysMem`] over the monitor's identity map: a physical address is a pointer.

use vmfork_core::addr::{PhysAddr, PAGE_SIZE};
use vmfork_core::physmem::PhysMem;

/// All RAM, identity mapped as Normal write-back memory by the monitor's stage 1.
pub struct IdentityMem;

impl PhysMem for IdentityMem {
    fn read_desc(&self, table: PhysAddr, index: usize) -> u64 {
        debug_assert!(index < 512);
        // SAFETY: `table` is a table frame owned by the stage-2 code (from the frame allocator,
        // identity mapped); an aligned 64-bit volatile load is single-copy atomic.
        unsafe { core::ptr::read_volatile((table.0 as *const u64).add(index)) }
    }

    fn write_desc(&mut self, table: PhysAddr, index: usize, desc: u64) {
        debug_assert!(index < 512);
        // SAFETY: as above; table walkers on other CPUs see either the old or the new value.
        unsafe { core::ptr::write_volatile((table.0 as *mut u64).add(index), desc) }
    }

    fn zero_frame(&mut self, pa: PhysAddr) {
        // SAFETY: `pa` is a whole frame the stage-2 code owns.
        unsafe { core::ptr::write_bytes(pa.0 as *mut u8, 0, PAGE_SIZE as usize) }
        // The zeroes were written through the monitor's cacheable map; a guest with its MMU
        // off reads the frame non-cacheably, from memory: clean them to the PoC (and drop the
        // lines), or it sees the frame's previous owner's data (arch::cache::clean_inval_to_poc,
        // ARM ARM B2.16).
        crate::arch::cache::clean_inval_to_poc(pa, PAGE_SIZE);
    }

    fn copy_frame(&mut self, dst: PhysAddr, src: PhysAddr) {
        // The source may have been written non-cacheably by a guest with its MMU off: make the
        // copy read memory, not a stale line of the cacheable alias (ARM ARM B2.16).
        crate::arch::cache::clean_inval_before_read(src, PAGE_SIZE);
        // SAFETY: two distinct whole frames, both identity mapped RAM.
        unsafe {
            core::ptr::copy_nonoverlapping(src.0 as *const u8, dst.0 as *mut u8, PAGE_SIZE as usize)
        }
        // The copy reaches memory for a guest's non-cacheable reads: clean and invalidate to
        // the PoC (as for zero_frame). Then, as it may hold guest code, make it visible to
        // instruction fetch (the D-side clean is repeated there, harmless on clean lines).
        crate::arch::cache::clean_inval_to_poc(dst, PAGE_SIZE);
        crate::arch::cache::sync_for_guest_exec(dst, PAGE_SIZE);
    }

    fn read(&self, pa: PhysAddr, buf: &mut [u8]) {
        // What a guest wrote non-cacheably is in memory, maybe behind a stale line.
        crate::arch::cache::clean_inval_before_read(pa, buf.len() as u64);
        // SAFETY: the span lies inside one frame of RAM (the trait's contract).
        unsafe { core::ptr::copy_nonoverlapping(pa.0 as *const u8, buf.as_mut_ptr(), buf.len()) }
    }

    fn write(&mut self, pa: PhysAddr, buf: &[u8]) {
        // SAFETY: as for `read`.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), pa.0 as *mut u8, buf.len()) }
        crate::arch::cache::sync_for_guest_exec(pa, buf.len() as u64);
    }
}
