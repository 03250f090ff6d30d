//! Every field a restore refuses, one test each, and that what the monitor writes is accepted.

use super::*;
use crate::vgic::VgicConfig;

fn valid(n: u32) -> SavedVm {
    let mut vm = SavedVm::reset_state(n);
    for v in &mut vm.vcpus {
        v.state = SavedVcpuState::Runnable;
    }
    vm
}

fn refused(vm: &SavedVm) -> StateError {
    vm.validate(vm.vcpus.len() as u32)
        .expect_err("the state should be refused")
}

#[test]
fn reset_states_round_trip_and_validate() {
    for n in 1..=layout::MAX_VCPUS {
        let vm = SavedVm::reset_state(n);
        let bytes = vm.encode().unwrap();
        assert!(bytes.len() < MAX_STATE_BYTES / 8, "{} bytes", bytes.len());
        let back = SavedVm::decode(&bytes).unwrap();
        back.validate(n).unwrap();
        assert_eq!(back.encode().unwrap(), bytes);
        assert_eq!(back.vcpus, vm.vcpus);
    }
}

#[test]
fn pstate_only_aarch64_el0_el1_legal() {
    for ok in [
        0x3c5,
        0x3c4,
        0x0,
        0x5,
        0xf000_03c5,
        0x3c5 | 1 << 22 | 1 << 12 | 1 << 21,
    ] {
        check_pstate(ok).unwrap_or_else(|e| panic!("{ok:#x}: {e}"));
    }
    let cases: [(u64, &str); 9] = [
        (0x3c9, "EL2"),
        (0x3c8, "EL2"),
        (0x3cd, "EL3"),
        (0x3cc, "EL3"),
        (0x3c6, "reserved"),
        (0x3c1, "reserved"),
        (0x3d3, "AArch32"),
        (0x3c5 | PSTATE_IL, "IL"),
        (0x3c5 | 1 << 5, "RES0"),
    ];
    for (p, why) in cases {
        let e = check_pstate(p).expect_err("refused");
        assert!(e.contains(why), "{p:#x}: {e}");
    }
    for bit in [14, 19, 26, 27, 32, 33, 34, 35, 36, 63] {
        assert!(check_pstate(0x3c5 | 1 << bit).is_err(), "bit {bit}");
    }
    // Through the whole state, on any vCPU.
    let mut vm = valid(3);
    vm.vcpus[2].ctx.regs.pstate = 0x3c9;
    let e = refused(&vm);
    assert!(
        matches!(
            e,
            StateError::Pstate {
                vcpu: 2,
                value: 0x3c9,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("EL2"), "{e}");
}

#[test]
fn reserved_register_word_must_be_zero() {
    let mut vm = valid(1);
    vm.vcpus[0].ctx.regs.reserved = 1;
    assert_eq!(refused(&vm), StateError::Reserved(0));
}

#[test]
fn vcpu_state_never_running() {
    for s in [
        SavedVcpuState::Off,
        SavedVcpuState::Runnable,
        SavedVcpuState::Waiting,
    ] {
        let mut vm = valid(2);
        vm.vcpus[1].state = s;
        vm.validate(2).unwrap();
    }
    let mut vm = valid(2);
    vm.vcpus[1].state = SavedVcpuState::Running(0);
    let e = refused(&vm);
    assert_eq!(e, StateError::Running { vcpu: 1, cpu: 0 });
    assert!(e.to_string().contains("running"), "{e}");
}

#[test]
fn list_register_contents_refused() {
    let mut vm = valid(1);
    vm.vcpus[0].ctx.cpuif.lrs[0] = 1 << 62 | 27;
    assert_eq!(refused(&vm), StateError::CpuIf(0));
    let mut vm = valid(1);
    vm.vcpus[0].ctx.cpuif.hcr = 1;
    assert_eq!(refused(&vm), StateError::CpuIf(0));
}

#[test]
fn mpidrs_as_the_monitor_gives_them() {
    check_mpidrs(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    let cases: [(&[u64], &str); 6] = [
        (&[1 << 31], "bit 31"),
        (&[1 << 24], "MT"),
        (&[1 << 30], "U"),
        (&[0, 1 << 16], "Aff2"),
        (&[0, 0], "share"),
        (&[1, 0], "device tree"),
    ];
    for (m, why) in cases {
        let e = check_mpidrs(m).expect_err("refused").to_string();
        assert!(e.contains(why), "{m:x?}: {e}");
    }
    let mut vm = valid(2);
    vm.vcpus[1].mpidr = 1 | 1 << 31;
    assert!(matches!(refused(&vm), StateError::Mpidr { vcpu: 1, .. }));
}

#[test]
fn vcpu_count_must_match_the_header_and_the_limit() {
    let vm = valid(2);
    for header in [0, 1, 3] {
        assert_eq!(
            vm.validate(header).unwrap_err(),
            StateError::StateVcpus { state: 2, header }
        );
    }
    let mut vm = valid(1);
    vm.vcpus.clear();
    assert!(matches!(
        vm.validate(0).unwrap_err(),
        StateError::StateVcpus { state: 0, .. }
    ));
    // Nine vCPUs cannot even be decoded.
    let mut vm = valid(8);
    let extra = vm.vcpus[7].clone();
    vm.vcpus.push(extra);
    let bytes = vm.encode().unwrap();
    assert!(matches!(
        SavedVm::decode(&bytes),
        Err(StateError::Decode(_))
    ));
}

#[test]
fn vgic_must_validate_and_match_the_vcpus() {
    let mut vm = valid(2);
    vm.vgic = Vgic::new(&VgicConfig::qemu_virt(1)).unwrap();
    assert!(matches!(refused(&vm), StateError::VgicShape(w) if w.contains("count")));
    let mut vm = valid(2);
    vm.vgic = Vgic::new(&VgicConfig {
        mpidrs: vec![0, 2],
        nr_irqs: DEFAULT_NR_IRQS,
    })
    .unwrap();
    assert!(matches!(refused(&vm), StateError::VgicShape(w) if w.contains("affinities")));
    let mut vm = valid(1);
    vm.vgic = Vgic::new(&VgicConfig {
        mpidrs: vec![0],
        nr_irqs: 512,
    })
    .unwrap();
    assert!(matches!(refused(&vm), StateError::VgicShape(w) if w.contains("nr_irqs")));
}

/// A vGIC whose SPI table disagrees with `nr_irqs`, made by editing the encoding the way a
/// crafted file would: `nr_irqs` is the vGIC's first field (a postcard varint).
#[test]
fn vgic_size_mismatch_in_the_encoding_is_refused() {
    let vm = valid(1);
    let mut g = postcard::to_allocvec(&vm.vgic).unwrap();
    assert_eq!(&g[..2], &[0x80, 0x02], "nr_irqs = 256 as a varint");
    g[1] = 0x04; // 512
    let vgic: Vgic = postcard::from_bytes(&g).unwrap();
    let mut bad = vm.clone();
    bad.vgic = vgic;
    let e = refused(&bad);
    assert!(
        matches!(e, StateError::Vgic(VgicError::InvalidState(w)) if w.contains("SPI table")),
        "{e:?}"
    );
}

#[test]
fn uart_must_validate() {
    let mut vm = valid(1);
    let mut u = postcard::to_allocvec(&vm.uart).unwrap();
    // rx is the first field: a length varint then the bytes. Two bytes with FIFOs off.
    assert_eq!(u[0], 0);
    u.splice(0..1, [2, b'a', b'b']);
    vm.uart = postcard::from_bytes(&u).unwrap();
    assert!(matches!(refused(&vm), StateError::Uart(w) if w.contains("FIFO")));
    // 33 bytes cannot even be decoded.
    let mut u = postcard::to_allocvec(&Vuart::new()).unwrap();
    u.splice(0..1, core::iter::once(33).chain([0u8; 33]));
    assert!(postcard::from_bytes::<Vuart>(&u).is_err());
}

#[test]
fn state_size_and_trailing_bytes() {
    assert!(matches!(
        SavedVm::decode(&vec![0; MAX_STATE_BYTES + 1]),
        Err(StateError::StateSize(_))
    ));
    let mut bytes = valid(1).encode().unwrap();
    bytes.push(0);
    assert_eq!(
        SavedVm::decode(&bytes).unwrap_err(),
        StateError::TrailingBytes(1)
    );
    // A vCPU count prefix of 2^63 fails without allocating for it.
    let mut huge = vec![0xff; 9];
    huge.push(0x7f);
    assert!(matches!(SavedVm::decode(&huge), Err(StateError::Decode(_))));
}

#[test]
fn header_checks() {
    let mib = 1 << 20;
    let ok = |vcpus, mem, base, name: &str, cmd: &str| {
        check_header(vcpus, mem, base, name, cmd, 1 << 30)
    };
    ok(
        1,
        16 * mib,
        layout::RAM_BASE,
        "guest0.2",
        "console=ttyAMA0 a=b",
    )
    .unwrap();
    ok(8, MAX_GUEST_MEM, layout::RAM_BASE, "", "").unwrap();
    assert_eq!(
        ok(1, 16 * mib, 0, "", "").unwrap_err(),
        StateError::RamBase(0)
    );
    for mem in [
        0,
        mib,
        3 * mib,
        MAX_GUEST_MEM + 2 * mib,
        u64::MAX - 2 * mib + 1,
    ] {
        assert_eq!(
            ok(1, mem, layout::RAM_BASE, "", "").unwrap_err(),
            StateError::MemSize(mem)
        );
    }
    for n in [0, 9, u32::MAX] {
        assert_eq!(
            ok(n, 16 * mib, layout::RAM_BASE, "", "").unwrap_err(),
            StateError::VcpuCount(n)
        );
    }
    let long = "x".repeat(MAX_NAME_BYTES + 1);
    assert_eq!(
        ok(1, 16 * mib, layout::RAM_BASE, &long, "").unwrap_err(),
        StateError::Name
    );
    assert_eq!(
        ok(1, 16 * mib, layout::RAM_BASE, "a\x1b[2J", "").unwrap_err(),
        StateError::Name
    );
    let long = "x".repeat(MAX_CMDLINE_LEN + 1);
    assert_eq!(
        ok(1, 16 * mib, layout::RAM_BASE, "", &long).unwrap_err(),
        StateError::Cmdline
    );
    assert_eq!(
        ok(1, 16 * mib, layout::RAM_BASE, "", "a\nb").unwrap_err(),
        StateError::Cmdline
    );
}

#[test]
fn memory_is_refused_before_allocating_when_the_machine_lacks_it() {
    let mem = 64 << 20;
    let need = frames_needed(mem);
    assert!(need > mem / 4096, "tables counted too");
    check_header(1, mem, layout::RAM_BASE, "", "", need).unwrap();
    assert_eq!(
        check_header(1, mem, layout::RAM_BASE, "", "", need - 1).unwrap_err(),
        StateError::NotEnoughMemory {
            needed: need,
            free: need - 1
        }
    );
}
