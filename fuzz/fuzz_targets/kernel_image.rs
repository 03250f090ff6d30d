//! Guest kernel images (arm64 `Image` or ELF64) through `loader::plan`, with RAM, initrd and
//! DTB sizes from the first 24 input bytes; a plan must stay inside RAM and inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfork_core::loader;

fuzz_target!(|data: &[u8]| {
    if data.len() < 24 {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let ram_size = (word(0) % (64 << 20)) & !0xfff;
    let initrd_len = word(8) % (1 << 22);
    let dtb_len = word(16) % (1 << 22);
    let bytes = &data[24..];
    let _ = loader::detect(bytes);
    let _ = loader::Arm64ImageHeader::parse(bytes);
    let ram_base = 0x4000_0000u64;
    let Ok(p) = loader::plan(bytes, ram_base, ram_size, initrd_len, dtb_len) else {
        return;
    };
    let ram = ram_base..ram_base + ram_size;
    let inside =
        |r: &core::ops::Range<u64>| r.start <= r.end && r.start >= ram.start && r.end <= ram.end;
    for s in &p.segments {
        assert!(s.src.start <= s.src.end && s.src.end <= bytes.len());
        assert!(inside(&s.ipa_range()));
    }
    let apart =
        |a: &core::ops::Range<u64>, b: &core::ops::Range<u64>| a.end <= b.start || b.end <= a.start;
    assert!(inside(&p.dtb) && p.dtb.end - p.dtb.start == dtb_len);
    // The DTB and the initrd may sit in a gap between ELF segments (inside the kernel's hull),
    // never on a segment.
    for s in &p.segments {
        assert!(apart(&s.ipa_range(), &p.dtb), "DTB on a segment: {p:x?}");
    }
    if let Some(i) = &p.initrd {
        assert!(inside(i) && i.end - i.start == initrd_len);
        assert!(apart(i, &p.dtb), "initrd on the DTB: {p:x?}");
        for s in &p.segments {
            assert!(apart(&s.ipa_range(), i), "initrd on a segment: {p:x?}");
        }
    }
});
