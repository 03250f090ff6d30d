//! The machine-wide physical frame allocator: every RAM frame the image, the boot DTB and the
//! heap do not use. Guest memory and stage-2 tables come from here.

use spin::Mutex;
use vmfork_core::addr::{PhysAddr, PAGE_SIZE};
use vmfork_core::frame::{FrameAllocator, FrameError};
use vmfork_core::platform::Region;

/// The allocator; `None` until [`init`] ran on the boot CPU.
pub static FRAMES: Mutex<Option<FrameAllocator>> = Mutex::new(None);

/// Builds the allocator over `ram`, minus the `reserved` ranges.
pub fn init(ram: &[Region], reserved: &[(u64, u64)]) -> Result<(), FrameError> {
    let lo = ram.iter().map(|r| r.base).min().unwrap_or(0) & !(PAGE_SIZE - 1);
    let hi = ram.iter().map(|r| r.base + r.size).max().unwrap_or(0);
    let frames = ((hi.saturating_sub(lo)) / PAGE_SIZE) as usize;
    let mut fa = FrameAllocator::new(PhysAddr(lo), frames);
    for r in ram {
        fa.add_free(PhysAddr(r.base), PhysAddr(r.base + r.size))?;
    }
    for &(start, end) in reserved {
        fa.reserve(PhysAddr(start), PhysAddr(end))?;
    }
    *FRAMES.lock() = Some(fa);
    Ok(())
}

/// Free and total frames, for reports.
pub fn frame_counts() -> (usize, usize) {
    FRAMES
        .lock()
        .as_ref()
        .map_or((0, 0), |fa| (fa.free_frames(), fa.total_frames()))
}
