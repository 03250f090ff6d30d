//! A snapshot through every check a restore makes before it builds anything: the container
//! (`Snapshot::parse`), the header (`check_header`), the state (`SavedVm::decode`,
//! `SavedVm::validate`), and the page runs. The first input byte picks how the rest is used:
//! 0: a whole snapshot file; 1: a snapshot body whose CRC is made right (so the fuzzer gets past
//! the CRC); 2: a state alone; 3: edits `(offset, byte)` to a real state of 1 to 3 vCPUs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfork_core::snapshot::{check_header, SavedVm};
use vmfork_proto::crc::Crc32;
use vmfork_proto::snapshot::{Snapshot, PAGE_BYTES};

fn restore_checks(bytes: &[u8]) {
    let Ok(p) = Snapshot::parse(bytes) else {
        return;
    };
    let h = &p.header;
    let ram_pages = h.mem_bytes / PAGE_BYTES as u64;
    let mut next = 0;
    for (first, data) in p.runs() {
        let n = (data.len() / PAGE_BYTES) as u64;
        assert!(n >= 1 && first >= next && first + n <= ram_pages);
        next = first + n;
    }
    if check_header(
        h.vcpus,
        h.mem_bytes,
        h.ram_base,
        h.name,
        h.cmdline,
        1 << 20,
    )
    .is_ok()
    {
        state_checks(h.state, h.vcpus);
    }
}

fn state_checks(state: &[u8], vcpus: u32) {
    if let Ok(vm) = SavedVm::decode(state) {
        if vm.validate(vcpus).is_ok() {
            let again = vm.encode().expect("a validated state encodes");
            let back = SavedVm::decode(&again).expect("and decodes");
            assert!(back.validate(vcpus).is_ok());
            assert!(back.encode().unwrap() == again);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => restore_checks(rest),
        1 => {
            let mut b = rest.to_vec();
            let mut c = Crc32::new();
            c.update(&b);
            b.extend_from_slice(&c.finish().to_le_bytes());
            restore_checks(&b);
        }
        2 => state_checks(rest, u32::from(mode >> 2) % 10),
        _ => {
            let vcpus = u32::from(mode >> 2) % 3 + 1;
            let mut state = SavedVm::reset_state(vcpus).encode().unwrap();
            for edit in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % state.len();
                state[at] = edit[2];
            }
            state_checks(&state, vcpus);
        }
    }
});
