//! [`PhysMem`] over the monitor's identity map: a physical address is a pointer.

use vmfork_core::addr::PhysAddr;
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
        // The zeroes are cleaned and invalidated to the PoC as they are written: a guest with
        // its MMU off reads the frame non-cacheably, from memory, and must not see the frame's
        // previous owner's data (arch::frame, ARM ARM B2.16).
        // SAFETY: `pa` is a whole frame of RAM the stage-2 code owns, identity mapped.
        unsafe { crate::arch::frame::zero_for_guest(pa) }
    }

    fn copy_frame(&mut self, dst: PhysAddr, src: PhysAddr) {
        // One pass: the source's lines cleaned and invalidated before they are read (a guest
        // may have written them non-cacheably), the destination's after they are written (a
        // guest may read them non-cacheably), then the instruction cache, as the frame may hold
        // code (arch::frame, ARM ARM B2.16 and D7.5.9).
        // SAFETY: two distinct whole frames of RAM the stage-2 code owns, identity mapped.
        unsafe { crate::arch::frame::copy_for_guest(dst, src) }
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
