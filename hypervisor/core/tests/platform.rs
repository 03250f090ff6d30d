//! Tests of `vmfork_core::platform` against DTBs dumped from QEMU 7.2 (`tests/fixtures`) and
//! against small hand-built blobs.
//!
//! Fixtures (`qemu-system-aarch64 -M virt,...,dumpdtb=FILE -nographic`):
//! - `virt-gicv3-smp4-2g.raw.dtb`: `virtualization=on,gic-version=3 -cpu max,pauth-impdef=on
//!   -smp 4 -m 2G`, kept exactly as dumped (1 MiB, mostly zeros).
//! - `virt-gicv3-smp2-512m-append.dtb`: the same board with `-smp 2 -m 512M -append "log=debug"`
//!   (plus a dummy `-kernel` and a 1600-byte `-initrd`, which `-append` needs), through
//!   `dtc -I dtb -O dtb`.
//! - `virt-gicv2-smp2-1g.dtb`: `gic-version=2` without virtualization (PSCI over HVC),
//!   `-cpu cortex-a57 -smp 2 -m 1G`, through dtc.
//! - `virt-gicv2-virt-smp1-256m.dtb`: `virtualization=on,gic-version=2 -smp 1 -m 256M`
//!   (GICH/GICV and the maintenance interrupt), through dtc.

use proptest::prelude::*;
use vmfork_core::platform::{
    self, blob_size, gic_intids, GicVersion, Platform, PlatformError, PsciConduit, Region, Timer,
};

const GICV3_RAW: &[u8] = include_bytes!("fixtures/virt-gicv3-smp4-2g.raw.dtb");
const GICV3_APPEND: &[u8] = include_bytes!("fixtures/virt-gicv3-smp2-512m-append.dtb");
const GICV2: &[u8] = include_bytes!("fixtures/virt-gicv2-smp2-1g.dtb");
const GICV2_VIRT: &[u8] = include_bytes!("fixtures/virt-gicv2-virt-smp1-256m.dtb");

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn mpidrs(p: &Platform) -> Vec<u64> {
    p.cpus.iter().map(|c| c.mpidr).collect()
}

/// What every `virt` board of QEMU 7.2 has in common.
fn assert_common_virt(p: &Platform) {
    let uart = p.uart.expect("pl011");
    assert_eq!(
        uart.region,
        Region {
            base: 0x0900_0000,
            size: 0x1000
        }
    );
    assert_eq!(uart.intid, Some(33), "SPI 1");
    assert_eq!(
        p.fw_cfg,
        Some(Region {
            base: 0x0902_0000,
            size: 0x18
        })
    );
    assert_eq!(p.stdout_path.as_deref(), Some("/pl011@9000000"));
    assert_eq!(p.virtio_mmio.len(), 32);
    for (n, v) in p.virtio_mmio.iter().enumerate() {
        let n = n as u64;
        assert_eq!(
            v.region,
            Region {
                base: 0x0a00_0000 + n * 0x200,
                size: 0x200
            }
        );
        assert_eq!(
            v.intid,
            Some(32 + 16 + n as u32),
            "virtio slot {n} is SPI {}",
            16 + n
        );
    }
    assert_eq!(
        p.timer,
        Some(Timer {
            secure_phys: 29,
            nonsecure_phys: 30,
            virt: 27,
            hyp_phys: 26,
            hyp_virt: None
        }),
        "PPIs 13, 14, 11, 10"
    );
}

#[test]
fn blob_size_reads_totalsize() {
    assert_eq!(blob_size(GICV3_RAW), Ok(0x10_0000));
    assert_eq!(blob_size(&GICV3_RAW[..8]), Ok(0x10_0000));
    assert_eq!(blob_size(GICV3_APPEND), Ok(0x1eb3));
    assert_eq!(
        blob_size(&GICV3_RAW[..7]),
        Err(PlatformError::Truncated {
            needed: 8,
            available: 7
        })
    );
    assert_eq!(
        blob_size(&[0; 8]),
        Err(PlatformError::BadMagic { found: 0 })
    );
    let mut huge = GICV3_RAW[..8].to_vec();
    huge[4..8].copy_from_slice(&0x0100_0000u32.to_be_bytes());
    assert_eq!(
        blob_size(&huge),
        Err(PlatformError::BadTotalSize {
            totalsize: 0x0100_0000
        })
    );
    huge[4..8].copy_from_slice(&39u32.to_be_bytes());
    assert_eq!(
        blob_size(&huge),
        Err(PlatformError::BadTotalSize { totalsize: 39 })
    );
}

#[test]
fn qemu_gicv3_smp4_2g_as_dumped() {
    assert_eq!(GICV3_RAW.len(), 1 << 20, "kept exactly as QEMU dumped it");
    let p = platform::parse(GICV3_RAW).expect("parse");
    assert_eq!(
        p.ram,
        vec![Region {
            base: 0x4000_0000,
            size: 2 * GIB
        }]
    );
    assert_eq!(mpidrs(&p), vec![0, 1, 2, 3]);
    assert_common_virt(&p);
    let gic = p.gic.clone().expect("gic");
    assert_eq!(gic.version, GicVersion::V3);
    assert_eq!(gic.version.number(), 3);
    assert_eq!(
        gic.distributor,
        Region {
            base: 0x0800_0000,
            size: 0x1_0000
        }
    );
    assert_eq!(
        gic.redistributors,
        vec![Region {
            base: 0x080a_0000,
            size: 0xf6_0000
        }]
    );
    assert_eq!(gic.cpu_interface, None);
    assert_eq!(gic.hyp_interface, None);
    assert_eq!(gic.vcpu_interface, None);
    assert_eq!(gic.maintenance_intid, Some(25), "PPI 9");
    assert_eq!(p.psci, Some(PsciConduit::Smc));
    assert_eq!(p.bootargs, None);
    assert_eq!(p.initrd, None);
    // Only `totalsize` bytes matter: a slice of exactly that length parses the same.
    assert_eq!(platform::parse(&GICV3_RAW[..0x10_0000]).expect("parse"), p);
}

#[test]
fn qemu_gicv3_smp2_512m_with_append_and_initrd() {
    let p = platform::parse(GICV3_APPEND).expect("parse");
    assert_eq!(
        p.ram,
        vec![Region {
            base: 0x4000_0000,
            size: 512 * MIB
        }]
    );
    assert_eq!(mpidrs(&p), vec![0, 1]);
    assert_common_virt(&p);
    assert_eq!(p.bootargs.as_deref(), Some("log=debug"));
    assert_eq!(
        p.initrd,
        Some(Region {
            base: 0x4800_0000,
            size: 0x640
        })
    );
    assert_eq!(p.psci, Some(PsciConduit::Smc));
    assert_eq!(p.gic.expect("gic").version, GicVersion::V3);
}

#[test]
fn qemu_gicv2_without_virtualization() {
    let p = platform::parse(GICV2).expect("parse");
    assert_eq!(
        p.ram,
        vec![Region {
            base: 0x4000_0000,
            size: GIB
        }]
    );
    assert_eq!(mpidrs(&p), vec![0, 1]);
    assert_common_virt(&p);
    assert_eq!(p.psci, Some(PsciConduit::Hvc));
    let gic = p.gic.expect("gic");
    assert_eq!(gic.version, GicVersion::V2);
    assert_eq!(
        gic.distributor,
        Region {
            base: 0x0800_0000,
            size: 0x1_0000
        }
    );
    assert_eq!(
        gic.cpu_interface,
        Some(Region {
            base: 0x0801_0000,
            size: 0x1_0000
        })
    );
    assert!(gic.redistributors.is_empty());
    assert_eq!(gic.hyp_interface, None);
    assert_eq!(gic.maintenance_intid, None);
}

#[test]
fn qemu_gicv2_with_virtualization() {
    let p = platform::parse(GICV2_VIRT).expect("parse");
    assert_eq!(
        p.ram,
        vec![Region {
            base: 0x4000_0000,
            size: 256 * MIB
        }]
    );
    assert_eq!(mpidrs(&p), vec![0]);
    assert_eq!(p.psci, Some(PsciConduit::Smc));
    let gic = p.gic.expect("gic");
    assert_eq!(gic.version.number(), 2);
    assert_eq!(
        gic.hyp_interface,
        Some(Region {
            base: 0x0803_0000,
            size: 0x1_0000
        })
    );
    assert_eq!(
        gic.vcpu_interface,
        Some(Region {
            base: 0x0804_0000,
            size: 0x1_0000
        })
    );
    assert_eq!(gic.maintenance_intid, Some(25));
}

#[test]
fn region_helpers() {
    let r = Region {
        base: 0x4000_0000,
        size: 0x1000,
    };
    assert_eq!(r.end(), 0x4000_1000);
    assert!(r.contains(0x4000_0000));
    assert!(r.contains(0x4000_0fff));
    assert!(!r.contains(0x4000_1000));
    assert!(!r.contains(0x3fff_ffff));
    assert!(!Region { base: 5, size: 0 }.contains(5));
    assert_eq!(
        Region {
            base: u64::MAX,
            size: 2
        }
        .end(),
        u64::MAX
    );
}

#[test]
fn interrupt_specifiers() {
    let spec = |v: &[u32]| v.iter().flat_map(|c| c.to_be_bytes()).collect::<Vec<u8>>();
    assert_eq!(gic_intids(&spec(&[0, 1, 4, 1, 9, 4]), 3), Ok(vec![33, 25]));
    assert_eq!(
        gic_intids(&spec(&[2, 5, 4, 3, 1, 4]), 3),
        Ok(vec![4101, 1057])
    );
    assert_eq!(gic_intids(&spec(&[0, 987, 4]), 3), Ok(vec![1019]));
    assert!(
        gic_intids(&spec(&[0, 988, 4]), 3).is_err(),
        "INTID 1020 is special"
    );
    assert!(gic_intids(&spec(&[1, 16, 4]), 3).is_err());
    assert!(gic_intids(&spec(&[7, 1, 4]), 3).is_err());
    assert!(gic_intids(&spec(&[0, 1]), 3).is_err());
    assert!(gic_intids(&spec(&[0, 1]), 2).is_err());
    assert_eq!(gic_intids(&spec(&[1, 2, 4, 0xabc]), 4), Ok(vec![18]));
}

/// Rewrites a blob's header after `delta` bytes were inserted at `at` inside the structure
/// block (the strings block follows it in dtc's and QEMU's layout).
fn insert_in_structs(blob: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let word = |b: &[u8], i: usize| u32::from_be_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
    let total = word(blob, 1) as usize;
    let mut out = blob[..total].to_vec();
    out.splice(at..at, bytes.iter().copied());
    let grow = |out: &mut Vec<u8>, i: usize| {
        let v = word(out, i) + bytes.len() as u32;
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    };
    assert!(word(blob, 3) > word(blob, 2), "strings after structs");
    grow(&mut out, 1); // totalsize
    grow(&mut out, 3); // off_dt_strings
    grow(&mut out, 9); // size_dt_struct
    out
}

/// Byte offsets (in the blob) of every token of the structure block.
fn token_offsets(blob: &[u8]) -> Vec<(usize, u32)> {
    let word = |i: usize| u32::from_be_bytes(blob[i..i + 4].try_into().unwrap());
    let mut pos = word(8) as usize;
    let mut out = Vec::new();
    loop {
        let t = word(pos);
        out.push((pos, t));
        pos += match t {
            1 => 4 + ((blob[pos + 4..].iter().position(|&b| b == 0).unwrap() + 1 + 3) & !3),
            3 => 12 + ((word(pos + 4) as usize + 3) & !3),
            9 => return out,
            _ => 4,
        };
    }
}

#[test]
fn nops_anywhere_are_ignored() {
    let expected = platform::parse(GICV3_APPEND).expect("parse");
    let nop = 4u32.to_be_bytes();
    // Put a NOP before every token (done back to front so offsets stay valid).
    let mut blob = GICV3_APPEND.to_vec();
    for (at, _) in token_offsets(GICV3_APPEND).into_iter().rev() {
        blob = insert_in_structs(&blob, at, &nop);
    }
    assert!(platform::validate(&blob).expect("valid").has_nops);
    assert_eq!(platform::parse(&blob).expect("parse with NOPs"), expected);
}

#[test]
fn structural_errors() {
    let tokens = token_offsets(GICV3_APPEND);
    let set = |at: usize, v: u32| {
        let mut b = GICV3_APPEND.to_vec();
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        b
    };
    let last_end_node = tokens.iter().rev().find(|t| t.1 == 2).unwrap().0;
    let first_prop = tokens.iter().find(|t| t.1 == 3).unwrap().0;
    let end = tokens.last().unwrap().0;
    // Unknown token, root closed twice, missing FDT_END, property value past the block, property
    // name offset past the strings block, version 16.
    assert!(matches!(
        platform::parse(&set(first_prop, 7)),
        Err(PlatformError::BadStructure { .. })
    ));
    assert!(matches!(
        platform::parse(&set(end, 2)),
        Err(PlatformError::BadStructure { .. })
    ));
    assert!(matches!(
        platform::parse(&set(last_end_node, 9)),
        Err(PlatformError::BadStructure { .. })
    ));
    assert!(matches!(
        platform::parse(&set(first_prop + 4, 0x10_0000)),
        Err(PlatformError::BadStructure { .. })
    ));
    assert!(matches!(
        platform::parse(&set(first_prop + 8, 0x10_0000)),
        Err(PlatformError::BadStructure { .. })
    ));
    assert!(matches!(
        platform::parse(&set(20, 16)),
        Err(PlatformError::UnsupportedVersion { .. })
    ));
    assert!(matches!(
        platform::parse(&set(8, 0x10_0000)),
        Err(PlatformError::BadLayout(_))
    ));
    let total = GICV3_APPEND.len();
    assert_eq!(
        platform::parse(&GICV3_APPEND[..total - 1]),
        Err(PlatformError::Truncated {
            needed: total,
            available: total - 1
        })
    );
    // Every error has a message.
    assert!(!platform::parse(&set(first_prop, 7))
        .unwrap_err()
        .to_string()
        .is_empty());
}

/// A minimal DTB writer for hand-built trees.
#[derive(Default)]
struct Builder {
    structs: Vec<u8>,
    strings: Vec<u8>,
}

fn cells(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|c| c.to_be_bytes()).collect()
}

fn string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

impl Builder {
    fn word(&mut self, w: u32) {
        self.structs.extend_from_slice(&w.to_be_bytes());
    }
    fn begin(&mut self, name: &str) -> &mut Self {
        self.word(1);
        self.structs.extend_from_slice(&string(name));
        while !self.structs.len().is_multiple_of(4) {
            self.structs.push(0);
        }
        self
    }
    fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(&string(name));
        self.word(3);
        self.word(value.len() as u32);
        self.word(off);
        self.structs.extend_from_slice(value);
        while !self.structs.len().is_multiple_of(4) {
            self.structs.push(0);
        }
        self
    }
    fn end(&mut self) -> &mut Self {
        self.word(2);
        self
    }
    fn finish(&mut self) -> Vec<u8> {
        self.word(9);
        let off_struct = 40 + 16;
        let off_strings = off_struct + self.structs.len();
        let total = off_strings + self.strings.len();
        let mut out = Vec::new();
        for w in [
            0xd00d_feed,
            total as u32,
            off_struct as u32,
            off_strings as u32,
            40,
            17,
            16,
            0,
            self.strings.len() as u32,
            self.structs.len() as u32,
        ] {
            out.extend_from_slice(&u32::to_be_bytes(w));
        }
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&self.structs);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// A root with one-cell addresses and sizes, a GIC (phandle 1), two PL011s under a bus whose
/// `ranges` moves them by 0x1000_0000, and `/chosen` naming the second UART through an alias.
fn small_tree(psci_method: &str, timer_irqs: &[u32]) -> Vec<u8> {
    let mut b = Builder::default();
    b.begin("")
        .prop("#address-cells", &cells(&[1]))
        .prop("#size-cells", &cells(&[1]))
        .prop("interrupt-parent", &cells(&[1]));
    b.begin("memory@80000000")
        .prop("device_type", &string("memory"))
        .prop("reg", &cells(&[0x8000_0000, 0x1000_0000, 0xa000_0000, 0]))
        .end();
    b.begin("cpus")
        .prop("#address-cells", &cells(&[2]))
        .prop("#size-cells", &cells(&[0]));
    b.begin("cpu@100")
        .prop("device_type", &string("cpu"))
        .prop("reg", &cells(&[0, 0x100]))
        .end();
    b.begin("cpu@1")
        .prop("device_type", &string("cpu"))
        .prop("reg", &cells(&[0x80, 1]))
        .end();
    b.begin("cpu@2")
        .prop("reg", &cells(&[0, 2]))
        .prop("status", &string("disabled"))
        .end();
    b.end();
    b.begin("intc@1000")
        .prop("compatible", &string("arm,gic-400"))
        .prop("reg", &cells(&[0x1000, 0x1000, 0x2000, 0x2000]))
        .prop("#interrupt-cells", &cells(&[3]))
        .prop("interrupt-controller", &[])
        .prop("phandle", &cells(&[1]))
        .end();
    b.begin("psci")
        .prop("compatible", &string("arm,psci-0.2"))
        .prop("method", &string(psci_method))
        .end();
    b.begin("timer")
        .prop("compatible", &string("arm,armv8-timer"))
        .prop("interrupts", &cells(timer_irqs))
        .end();
    b.begin("soc")
        .prop("compatible", &string("simple-bus"))
        .prop("#address-cells", &cells(&[1]))
        .prop("#size-cells", &cells(&[1]))
        .prop("ranges", &cells(&[0x0, 0x1000_0000, 0x10_0000]));
    b.begin("uart@1000")
        .prop(
            "compatible",
            &[string("arm,pl011"), string("arm,primecell")].concat(),
        )
        .prop("reg", &cells(&[0x1000, 0x1000]))
        .prop("interrupts", &cells(&[0, 5, 4]))
        .end();
    b.begin("uart@2000")
        .prop("compatible", &string("arm,pl011"))
        .prop("reg", &cells(&[0x2000, 0x1000]))
        .prop("interrupts", &cells(&[0, 6, 4]))
        .end();
    b.begin("virtio@f0000")
        .prop("compatible", &string("virtio,mmio"))
        .prop("reg", &cells(&[0xf_0000, 0x200]))
        .end();
    b.begin("virtio@f0200")
        .prop("compatible", &string("virtio,mmio"))
        .prop("reg", &cells(&[0xf_0200, 0x200]))
        .prop("interrupt-parent", &cells(&[7]))
        .prop("interrupts", &cells(&[0, 1, 1]))
        .end();
    b.begin("virtio@100000")
        .prop("compatible", &string("virtio,mmio"))
        .prop("reg", &cells(&[0x10_0000, 0x200]))
        .prop("status", &string("okay"))
        .end();
    b.end();
    b.begin("hidden")
        .prop("#address-cells", &cells(&[1]))
        .prop("#size-cells", &cells(&[1]));
    b.begin("virtio@0")
        .prop("compatible", &string("virtio,mmio"))
        .prop("reg", &cells(&[0, 0x200]))
        .end();
    b.end();
    b.begin("aliases")
        .prop("serial1", &string("/soc/uart@2000"))
        .end();
    b.begin("chosen")
        .prop("stdout-path", &string("serial1:115200n8"))
        .prop("bootargs", &string(""))
        .end();
    b.end();
    b.finish()
}

#[test]
fn hand_built_tree() {
    let p = platform::parse(&small_tree(
        "hvc",
        &[1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8, 1, 12, 8],
    ))
    .expect("parse");
    assert_eq!(
        p.ram,
        vec![Region {
            base: 0x8000_0000,
            size: 0x1000_0000
        }],
        "zero-size bank dropped"
    );
    assert_eq!(
        mpidrs(&p),
        vec![0x100, 0x80_0000_0001],
        "DT order, two-cell MPIDR, disabled skipped"
    );
    let gic = p.gic.expect("gic");
    assert_eq!(gic.version, GicVersion::V2);
    assert_eq!(
        gic.cpu_interface,
        Some(Region {
            base: 0x2000,
            size: 0x2000
        })
    );
    assert_eq!(p.psci, Some(PsciConduit::Hvc));
    let timer = p.timer.expect("timer");
    assert_eq!(timer.hyp_virt, Some(28));
    let uart = p.uart.expect("uart");
    assert_eq!(
        uart.region,
        Region {
            base: 0x1000_2000,
            size: 0x1000
        },
        "stdout alias, translated"
    );
    assert_eq!(uart.intid, Some(38));
    assert_eq!(p.stdout_path.as_deref(), Some("serial1:115200n8"));
    assert_eq!(p.bootargs.as_deref(), Some(""));
    // The first virtio node has no interrupt; the second's parent is not the GIC; the third's
    // bus has no `ranges`, and the fourth lies outside its bus's window: neither is
    // CPU-addressable.
    assert_eq!(p.virtio_mmio.len(), 2);
    assert_eq!(p.virtio_mmio[0].region.base, 0x100f_0000);
    assert_eq!(p.virtio_mmio[0].intid, None);
    assert_eq!(p.virtio_mmio[1].region.base, 0x100f_0200);
    assert_eq!(p.virtio_mmio[1].intid, None);
    assert_eq!(p.fw_cfg, None);
    assert_eq!(p.initrd, None);
}

#[test]
fn malformed_nodes_are_errors() {
    let timer = [1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8];
    assert!(platform::parse(&small_tree("hvc", &timer)).is_ok());
    assert_eq!(
        platform::parse(&small_tree("svc", &timer)),
        Err(PlatformError::Malformed {
            node: "psci",
            what: "method is not smc or hvc"
        })
    );
    assert!(matches!(
        platform::parse(&small_tree("smc", &timer[..6])),
        Err(PlatformError::Malformed { node: "timer", .. })
    ));
    assert!(matches!(
        platform::parse(&small_tree("smc", &timer[..5])),
        Err(PlatformError::Malformed {
            node: "interrupts",
            ..
        })
    ));
}

#[test]
fn empty_tree_has_nothing() {
    let mut b = Builder::default();
    b.begin("").end();
    assert_eq!(platform::parse(&b.finish()), Ok(Platform::default()));
    let mut b = Builder::default();
    b.begin("root").end();
    assert!(matches!(
        platform::parse(&b.finish()),
        Err(PlatformError::BadStructure { .. })
    ));
    let mut b = Builder::default();
    b.begin("").prop("#address-cells", &[0, 0, 1]).end();
    assert!(matches!(
        platform::parse(&b.finish()),
        Err(PlatformError::BadStructure { .. })
    ));
}

fn flip_bits(blob: &[u8], flips: &[(usize, u8)]) -> Vec<u8> {
    let mut b = blob.to_vec();
    let len = b.len();
    for &(at, bit) in flips {
        b[at % len] ^= 1 << (bit % 8);
    }
    b
}

fn check_no_panic(blob: &[u8]) {
    if let Ok(p) = platform::parse(blob) {
        for r in p.ram.iter().chain(p.fw_cfg.iter()).chain(p.initrd.iter()) {
            assert!(r.base.checked_add(r.size).is_some());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = blob_size(&bytes);
        check_no_panic(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_real_header_never_panic(
        header_words in proptest::collection::vec(0u32..0x2000, 8),
        body in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = 0xd00d_feedu32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&((40 + body.len()) as u32).to_be_bytes());
        for w in header_words {
            bytes.extend_from_slice(&w.to_be_bytes());
        }
        bytes[20..24].copy_from_slice(&17u32.to_be_bytes());
        bytes.extend_from_slice(&body);
        check_no_panic(&bytes);
    }

    #[test]
    fn bit_flipped_qemu_blobs_never_panic(
        which in 0usize..3,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let blob = [GICV3_APPEND, GICV2, GICV2_VIRT][which];
        check_no_panic(&flip_bits(blob, &flips));
    }

    #[test]
    fn bit_flipped_raw_blob_never_panics(
        flips in proptest::collection::vec((0usize..0x1f80, any::<u8>()), 1..4),
    ) {
        check_no_panic(&flip_bits(GICV3_RAW, &flips));
    }

    #[test]
    fn overwritten_words_never_panic(
        which in 0usize..3,
        at in any::<usize>(),
        value in prop_oneof![Just(0u32), Just(1), Just(2), Just(3), Just(4), Just(9), Just(u32::MAX), any::<u32>()],
    ) {
        let mut blob = [GICV3_APPEND, GICV2, GICV2_VIRT][which].to_vec();
        let at = (at % (blob.len() / 4)) * 4;
        blob[at..at + 4].copy_from_slice(&value.to_be_bytes());
        check_no_panic(&blob);
    }

    #[test]
    fn truncated_blobs_are_errors(len in 0usize..0x1eb3) {
        prop_assert!(platform::parse(&GICV3_APPEND[..len]).is_err());
    }

    /// A NOP inserted before any token changes nothing.
    #[test]
    fn one_nop_changes_nothing(pick in any::<usize>()) {
        let tokens = token_offsets(GICV2);
        let (at, _) = tokens[pick % tokens.len()];
        let blob = insert_in_structs(GICV2, at, &4u32.to_be_bytes());
        prop_assert_eq!(platform::parse(&blob), platform::parse(GICV2));
    }
}

#[test]
fn huge_cell_counts_are_not_a_panic() {
    // A bus whose cell counts would overflow 32-bit arithmetic: an error, not an overflow.
    let mut b = Builder::default();
    b.begin("")
        .prop("#address-cells", &cells(&[0xffff_fffe]))
        .prop("#size-cells", &cells(&[1]));
    b.begin("bus")
        .prop("#address-cells", &cells(&[0xffff_ffff]))
        .prop("#size-cells", &cells(&[0xffff_ffff]))
        .prop("ranges", &cells(&[0, 0, 0]));
    b.begin("virtio@0")
        .prop("compatible", &string("virtio,mmio"))
        .prop("reg", &cells(&[0, 0x200]))
        .end();
    b.end();
    b.end();
    assert!(matches!(
        platform::parse(&b.finish()),
        Err(PlatformError::Malformed {
            node: "virtio-mmio",
            ..
        })
    ));
    // A memory node read with such cell counts is malformed.
    let mut b = Builder::default();
    b.begin("")
        .prop("#address-cells", &cells(&[0xffff_ffff]))
        .prop("#size-cells", &cells(&[1]));
    b.begin("memory@0")
        .prop("device_type", &string("memory"))
        .prop("reg", &cells(&[0, 0]))
        .end();
    b.end();
    assert!(matches!(
        platform::parse(&b.finish()),
        Err(PlatformError::Malformed { node: "memory", .. })
    ));
}
