//! Property fuzzing of the parsers the monitor runs on outside input (issue 11, "fuzzing of
//! every parser"): a snapshot's vCPU and device state and its validator, guest kernel images
//! (arm64 `Image` and ELF64), guest configs and the fw_cfg directory, and the boot DTB. Cheap
//! cases, many of them (about 75,000 here), each asserting no panic and, where there is one, a
//! property of the result. `make fuzz` runs the same parsers under cargo-fuzz (fuzz/).

use proptest::collection::vec;
use proptest::prelude::*;
use vmfork_core::guest_dtb::layout;
use vmfork_core::guest_spec::{self, MAX_CMDLINE_LEN};
use vmfork_core::loader;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
use vmfork_core::platform;
use vmfork_core::snapshot::{check_pstate, SavedVcpuState, SavedVm};

const GICV3_APPEND: &[u8] = include_bytes!("fixtures/virt-gicv3-smp2-512m-append.dtb");
const GICV2: &[u8] = include_bytes!("fixtures/virt-gicv2-smp2-1g.dtb");

#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), prop_oneof![Just(0u8), Just(1), Just(2), Just(0x7f), Just(0x80), Just(0xff), any::<u8>()])
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<usize>().prop_map(Mutation::Remove),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, muts: &[Mutation]) {
    for m in muts {
        let n = bytes.len().max(1);
        match *m {
            Mutation::Set(i, b) => {
                if let Some(x) = bytes.get_mut(i % n) {
                    *x = b;
                }
            }
            Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Mutation::Remove(i) => {
                if !bytes.is_empty() {
                    bytes.remove(i % n);
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % n),
        }
    }
}

/// Decodes a state and, when it decodes, validates it; a state that validates encodes to bytes
/// that decode to a state that validates and encodes the same. (Not necessarily to the input:
/// postcard accepts overlong varints, e.g. `80 00` for 0, so encodings are not canonical; the
/// values are what is checked.)
fn check_state(bytes: &[u8], vcpus: u32) {
    if let Ok(vm) = SavedVm::decode(bytes) {
        if vm.validate(vcpus).is_ok() {
            let again = vm.encode().unwrap();
            let back = SavedVm::decode(&again).expect("a validated state decodes");
            assert!(back.validate(vcpus).is_ok());
            assert!(back.encode().unwrap() == again, "encoding is not stable");
        }
    }
}

fn vcpu_state() -> impl Strategy<Value = SavedVcpuState> {
    prop_oneof![
        Just(SavedVcpuState::Off),
        Just(SavedVcpuState::Runnable),
        Just(SavedVcpuState::Waiting),
        any::<u64>().prop_map(SavedVcpuState::Running),
    ]
}

fn pstate() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0u64..0x20, 0u64..16).prop_map(|(m, daif)| m | daif << 6),
        1 => any::<u64>(),
        1 => (0u64..64).prop_map(|bit| 0x3c5 | 1 << bit),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    /// Damaged encodings of real states: never a panic.
    #[test]
    fn snapshot_state_mutated(n in 1u32..=3, muts in vec(mutation(), 1..5)) {
        let mut bytes = SavedVm::reset_state(n).encode().unwrap();
        mutate(&mut bytes, &muts);
        check_state(&bytes, n);
    }

    /// Arbitrary bytes as a state.
    #[test]
    fn snapshot_state_arbitrary(bytes in vec(any::<u8>(), 0..128), n in 0u32..10) {
        check_state(&bytes, n);
    }

    /// The fields a restore checks, set at random: the state round-trips, and `validate`
    /// accepts it exactly when every vCPU's PSTATE, scheduling state and MPIDR are acceptable.
    #[test]
    fn snapshot_state_fields(
        n in 1u32..=4,
        fields in vec((pstate(), vcpu_state(), prop_oneof![3 => Just(None), 1 => any::<u64>().prop_map(Some)]), 4),
        header in 0u32..6,
    ) {
        let mut vm = SavedVm::reset_state(n);
        for (i, v) in vm.vcpus.iter_mut().enumerate() {
            let (p, s, m) = fields[i];
            v.ctx.regs.pstate = p;
            v.state = s;
            if let Some(m) = m {
                v.mpidr = m;
            }
        }
        let bytes = vm.encode().unwrap();
        let back = SavedVm::decode(&bytes).unwrap();
        prop_assert_eq!(&back.vcpus, &vm.vcpus);
        let expected = header == n
            && vm.vcpus.iter().enumerate().all(|(i, v)| {
                check_pstate(v.ctx.regs.pstate).is_ok()
                    && !matches!(v.state, SavedVcpuState::Running(_))
                    && v.mpidr == layout::vcpu_mpidr_affinity(i as u32)
            });
        prop_assert_eq!(back.validate(header).is_ok(), expected);
    }
}

/// A little-endian ELF64 AArch64 executable with `phdrs` (type, offset, paddr, filesz, memsz).
fn elf(entry: u64, phdrs: &[(u32, u64, u64, u64, u64)], body: usize) -> Vec<u8> {
    let mut b = vec![0u8; 64 + 56 * phdrs.len() + body];
    b[..4].copy_from_slice(&ELF_MAGIC);
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little endian
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&entry.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    for (i, &(ty, off, paddr, filesz, memsz)) in phdrs.iter().enumerate() {
        let p = 64 + 56 * i;
        b[p..p + 4].copy_from_slice(&ty.to_le_bytes());
        b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
        b[p + 16..p + 24].copy_from_slice(&paddr.to_le_bytes());
        b[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
        b[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        b[p + 48..p + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    }
    b
}

/// An arm64 `Image` header (64 bytes) with the given fields and `body` more bytes.
fn image(text_offset: u64, image_size: u64, flags: u64, body: usize) -> Vec<u8> {
    let mut b = vec![0u8; 64 + body];
    b[8..16].copy_from_slice(&text_offset.to_le_bytes());
    b[16..24].copy_from_slice(&image_size.to_le_bytes());
    b[24..32].copy_from_slice(&flags.to_le_bytes());
    b[56..60].copy_from_slice(&loader::ARM64_IMAGE_MAGIC.to_le_bytes());
    b
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0u64..0x100_0000).prop_map(|o| 0x4000_0000 + o),
        1 => 0u64..0x1000,
        1 => Just(u64::MAX - 0xfff),
        1 => any::<u64>(),
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..0x4000, 1 => Just(u64::MAX), 1 => any::<u64>()]
}

fn kernel() -> impl Strategy<Value = Vec<u8>> {
    let phdr = (
        prop_oneof![3 => Just(1u32), 1 => any::<u32>()],
        0u64..0x300,
        addr(),
        size(),
        size(),
    );
    prop_oneof![
        (addr(), vec(phdr, 0..4), 0usize..0x300).prop_map(|(e, p, body)| elf(e, &p, body)),
        (
            prop_oneof![0u64..0x20_0000, any::<u64>()],
            size(),
            0u64..16,
            0usize..256
        )
            .prop_map(|(t, s, f, body)| image(t, s, f, body)),
        vec(any::<u8>(), 0..128),
    ]
}

/// Checks a load plan stays inside RAM and inside the file.
fn check_plan(bytes: &[u8], ram_base: u64, ram_size: u64, initrd_len: u64, dtb_len: u64) {
    let Ok(p) = loader::plan(bytes, ram_base, ram_size, initrd_len, dtb_len) else {
        return;
    };
    let ram = ram_base..ram_base + ram_size;
    let inside =
        |r: &std::ops::Range<u64>| r.start >= ram.start && r.end <= ram.end && r.start <= r.end;
    for s in &p.segments {
        assert!(
            s.src.start <= s.src.end && s.src.end <= bytes.len(),
            "{s:?}"
        );
        assert!(inside(&s.ipa_range()), "{s:?} outside {ram:x?}");
    }
    let apart =
        |a: &std::ops::Range<u64>, b: &std::ops::Range<u64>| a.end <= b.start || b.end <= a.start;
    assert!(
        inside(&p.dtb) && p.dtb.end - p.dtb.start == dtb_len,
        "{p:?}"
    );
    // The DTB and the initrd may sit in a gap between ELF segments (inside the kernel's hull,
    // as the loader documents), never on a segment.
    for s in &p.segments {
        assert!(apart(&s.ipa_range(), &p.dtb), "DTB on a segment: {p:?}");
    }
    if let Some(i) = &p.initrd {
        assert!(inside(i) && i.end - i.start == initrd_len, "{p:?}");
        assert!(apart(i, &p.dtb), "initrd and DTB overlap: {p:?}");
        for s in &p.segments {
            assert!(apart(&s.ipa_range(), i), "initrd on a segment: {p:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12_000))]

    /// Kernel images of both kinds, well-formed or not, with any RAM, initrd and DTB size.
    #[test]
    fn kernel_images(
        bytes in kernel(),
        muts in vec(mutation(), 0..3),
        ram_mib in prop_oneof![Just(0u64), 1u64..64, Just(u64::MAX >> 20)],
        initrd_len in prop_oneof![Just(0u64), 1u64..0x10_0000, any::<u64>()],
        dtb_len in prop_oneof![Just(0u64), 1u64..0x1_0000, any::<u64>()],
    ) {
        let mut bytes = bytes;
        mutate(&mut bytes, &muts);
        let _ = loader::detect(&bytes);
        let _ = loader::Arm64ImageHeader::parse(&bytes);
        let ram_size = ram_mib.saturating_mul(1 << 20);
        check_plan(&bytes, 0x4000_0000, ram_size, initrd_len, dtb_len);
    }
}

fn config_text() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            Just("mem=".to_string()),
            Just("cpus=".to_string()),
            Just("cmdline=".to_string()),
            Just("name=".to_string()),
            Just("\n".to_string()),
            Just("#".to_string()),
            Just(" ".to_string()),
            "[0-9]{1,12}",
            "[KMGkmgx]",
            "[a-z._-]{1,6}",
            "\\PC{1,3}",
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12_000))]

    /// Guest configs: never a panic; what parses is within the documented limits.
    #[test]
    fn guest_configs(text in config_text()) {
        if let Ok(c) = guest_spec::parse_config(&text) {
            prop_assert!(c.mem >= guest_spec::GUEST_MEM_ALIGN && c.mem <= guest_spec::MAX_GUEST_MEM);
            prop_assert!(c.mem % guest_spec::GUEST_MEM_ALIGN == 0);
            prop_assert!((1..=layout::MAX_VCPUS).contains(&c.cpus));
            prop_assert!(c.cmdline.len() <= MAX_CMDLINE_LEN);
            if let Some(n) = &c.name {
                prop_assert!(!n.is_empty() && n.len() <= guest_spec::MAX_NAME_LEN);
            }
        }
        let _ = guest_spec::parse_size(&text);
    }

    /// fw_cfg directories (big-endian count, then 64-byte entries) and the names in them.
    #[test]
    fn fw_cfg_directories(
        count in prop_oneof![0u32..4, any::<u32>()],
        entries in vec((any::<u32>(), any::<u16>(), prop_oneof![
            Just("opt/vmfork/0/kernel".to_string()),
            Just("opt/vmfork/1/config".to_string()),
            "opt/vmfork/[0-9]{1,4}/[a-z]{0,8}",
            "\\PC{0,60}",
        ]), 0..4),
        muts in vec(mutation(), 0..2),
    ) {
        let mut b = count.to_be_bytes().to_vec();
        for (size, select, name) in &entries {
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&select.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            let mut n = name.as_bytes().to_vec();
            n.resize(56, 0);
            b.extend_from_slice(&n[..56]);
        }
        mutate(&mut b, &muts);
        if let Ok(dir) = guest_spec::parse_fw_cfg_dir(&b) {
            prop_assert!(dir.len() <= b.len() / 64);
            let _ = guest_spec::group(dir.iter().map(|f| f.name.as_str()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    /// Boot DTBs from QEMU with random damage: never a panic, and what parses has sane regions.
    #[test]
    fn boot_dtbs(which in 0usize..2, muts in vec(mutation(), 1..6)) {
        let mut blob = [GICV3_APPEND, GICV2][which].to_vec();
        mutate(&mut blob, &muts);
        let _ = platform::blob_size(&blob);
        if let Ok(p) = platform::parse(&blob) {
            for r in p.ram.iter().chain(p.fw_cfg.iter()).chain(p.initrd.iter()) {
                prop_assert!(r.base.checked_add(r.size).is_some());
            }
        }
    }
}
