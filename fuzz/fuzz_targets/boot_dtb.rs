//! The boot DTB QEMU (or firmware) hands the monitor: `platform::blob_size` and
//! `platform::parse`. Seeds: the QEMU dumps in hypervisor/core/tests/fixtures.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfork_core::platform;

fuzz_target!(|data: &[u8]| {
    let _ = platform::blob_size(data);
    if let Ok(p) = platform::parse(data) {
        for r in p.ram.iter().chain(p.fw_cfg.iter()).chain(p.initrd.iter()) {
            assert!(r.base.checked_add(r.size).is_some());
        }
    }
});
