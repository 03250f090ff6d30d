//! Guest configurations and the fw_cfg directory they come from: `parse_config` on the input as
//! text, `parse_fw_cfg_dir` and `group` on it as bytes. What parses is within the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfork_core::guest_dtb::layout;
use vmfork_core::guest_spec::{self, MAX_CMDLINE_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = core::str::from_utf8(data) {
        if let Ok(c) = guest_spec::parse_config(text) {
            assert!(c.mem >= guest_spec::GUEST_MEM_ALIGN && c.mem <= guest_spec::MAX_GUEST_MEM);
            assert!(c.mem % guest_spec::GUEST_MEM_ALIGN == 0);
            assert!((1..=layout::MAX_VCPUS).contains(&c.cpus));
            assert!(c.cmdline.len() <= MAX_CMDLINE_LEN);
        }
        let _ = guest_spec::parse_size(text);
    }
    if let Ok(dir) = guest_spec::parse_fw_cfg_dir(data) {
        assert!(dir.len() <= data.len() / 64);
        let _ = guest_spec::group(dir.iter().map(|f| f.name.as_str()));
    }
});
