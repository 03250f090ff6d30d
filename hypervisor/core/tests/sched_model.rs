//! The scheduler's picks against a plain reference model, on the host.
//!
//! `VmTable::pick` looks only at the active VMs and keeps idle ones in a timer queue
//! (`machine::vmmap`). The reference here is what a pick did before that, written plainly: look
//! at every vCPU of every VM, wake the waiting ones whose timer fired or that have an interrupt,
//! take the first runnable one after the round-robin cursor. Random sequences of vCPUs put back
//! waiting (with or without a timer) or runnable, interrupts raised and taken, VMs paused,
//! resumed and destroyed, time moving on and picks on two CPUs must give the same pick every
//! time, and the same answers to `has_runnable` and `next_timer_deadline`.

mod common;
use common::create_vm;

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use vmfork_core::machine::fake::FakeHost;
use vmfork_core::machine::{PauseReason, VcpuState, VmState, VmTable};
use vmfork_core::mmio::{MmioAccess, MmioResult};
use vmfork_core::vgic::regs::{GICD_CTLR, GICD_ISENABLER};
use vmfork_core::vgic::{Vgic, GICR_SGI_BASE, GICR_STRIDE};

const VMS: usize = 5;
const CPUS: usize = 2;
/// The SPI raised on vCPU 0 of a VM (routed to vCPU 0, the reset routing).
const SPI: u32 = 40;
/// The virtual timer's PPI.
const VTIMER: u32 = 27;
const CNTV_ENABLE: u64 = 1;

fn written(r: MmioResult) {
    assert_eq!(r, MmioResult::Written);
}

/// Group 1 on, SPI 40 and every vCPU's timer PPI enabled.
fn enable_interrupts(g: &mut Vgic, vcpus: usize) {
    written(g.dist_access(0, MmioAccess::write(GICD_CTLR, 4, 0x13)));
    written(g.dist_access(
        0,
        MmioAccess::write(GICD_ISENABLER + u64::from(SPI / 32) * 4, 4, 1 << (SPI % 32)),
    ));
    for v in 0..vcpus as u64 {
        let at = v * GICR_STRIDE + GICR_SGI_BASE + GICD_ISENABLER;
        written(g.redist_access(0, MmioAccess::write(at, 4, 1 << VTIMER)));
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Pick on `cpu`; the picked vCPU (if any) is put back at once as `back`.
    Pick {
        cpu: usize,
        back: Back,
    },
    /// Put back the vCPU running on `cpu` (if any) as `back`.
    PutBack {
        cpu: usize,
        back: Back,
    },
    Raise {
        vm: usize,
    },
    /// vCPU `vcpu` of `vm` takes what it has pending (if it is not on a CPU).
    Take {
        vm: usize,
        vcpu: usize,
    },
    Pause {
        vm: usize,
    },
    Resume {
        vm: usize,
    },
    Destroy {
        vm: usize,
    },
    Advance {
        ticks: u64,
    },
}

#[derive(Clone, Copy, Debug)]
enum Back {
    Runnable,
    /// Waiting, with its timer armed to fire `Some(ticks)` from now, or not armed.
    Waiting(Option<u64>),
    /// Still running (the pick's vCPU stays on the CPU).
    Stay,
}

fn back() -> impl Strategy<Value = Back> {
    prop_oneof![
        1 => Just(Back::Runnable),
        3 => proptest::option::of(0u64..3000).prop_map(Back::Waiting),
        1 => Just(Back::Stay),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..VMS;
    prop_oneof![
        6 => (0..CPUS, back()).prop_map(|(cpu, back)| Op::Pick { cpu, back }),
        2 => (0..CPUS, back()).prop_map(|(cpu, back)| Op::PutBack { cpu, back }),
        2 => vm.clone().prop_map(|vm| Op::Raise { vm }),
        2 => (vm.clone(), 0..2usize).prop_map(|(vm, vcpu)| Op::Take { vm, vcpu }),
        1 => vm.clone().prop_map(|vm| Op::Pause { vm }),
        1 => vm.clone().prop_map(|vm| Op::Resume { vm }),
        1 => vm.prop_map(|vm| Op::Destroy { vm }),
        3 => (0u64..2000).prop_map(|ticks| Op::Advance { ticks }),
    ]
}

/// A vCPU as the reference sees it.
#[derive(Clone, Debug, PartialEq)]
struct MVcpu {
    state: VcpuState,
    /// Absolute deadline of its armed timer.
    timer: Option<u64>,
    /// Interrupts pending for it (SPI 40, the timer PPI).
    pending: BTreeSet<u32>,
}

#[derive(Clone, Debug)]
struct MVm {
    paused: bool,
    vcpus: Vec<MVcpu>,
}

struct World {
    t: VmTable<FakeHost>,
    model: BTreeMap<u32, MVm>,
    ids: Vec<u32>,
    now: u64,
    cursor: (u32, usize),
    /// What each CPU runs: (vm, vcpu, its context).
    on_cpu: [Option<(u32, usize, Box<vmfork_core::machine::VcpuCtx>)>; CPUS],
}

impl World {
    fn new() -> Self {
        let mut t = VmTable::new(FakeHost::new(4096));
        let mut model = BTreeMap::new();
        let mut ids = Vec::new();
        for n in 0..VMS {
            let cpus = 1 + (n % 2) as u32;
            let id = create_vm(&mut t, &format!("s{n}"), 2 << 20, cpus).expect("the VMs fit");
            let h = &t.host;
            let mut vm = t.vms.get_mut(&id).unwrap();
            enable_interrupts(vm.vgic_mut(h).unwrap(), cpus as usize);
            // vCPU 1 is powered on, waiting: it wakes for its timer only.
            if let Some(v) = vm.vcpus.get_mut(1) {
                v.state = VcpuState::Waiting;
            }
            let vcpus = vm
                .vcpus
                .iter()
                .map(|v| MVcpu {
                    state: v.state,
                    timer: None,
                    pending: BTreeSet::new(),
                })
                .collect();
            model.insert(
                id,
                MVm {
                    paused: false,
                    vcpus,
                },
            );
            ids.push(id);
        }
        Self {
            t,
            model,
            ids,
            now: 2_000_000,
            cursor: (0, 0),
            on_cpu: [None, None],
        }
    }

    /// The reference pick (the scan of every VM), applied to the model.
    fn model_pick(&mut self, cpu: usize) -> Option<(u32, usize)> {
        let now = self.now;
        for vm in self.model.values_mut().filter(|vm| !vm.paused) {
            for v in &mut vm.vcpus {
                if v.state != VcpuState::Waiting {
                    continue;
                }
                if v.timer.is_some_and(|d| d <= now) {
                    v.timer = None;
                    v.pending.insert(VTIMER);
                }
                if !v.pending.is_empty() {
                    v.state = VcpuState::Runnable;
                }
            }
        }
        let all: Vec<(u32, usize)> = self
            .model
            .iter()
            .filter(|(_, vm)| !vm.paused)
            .flat_map(|(&id, vm)| {
                vm.vcpus
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.state == VcpuState::Runnable)
                    .map(move |(i, _)| (id, i))
            })
            .collect();
        let cursor = self.cursor;
        let got = all
            .iter()
            .find(|&&p| p > cursor)
            .or_else(|| all.iter().find(|&&p| p <= cursor))
            .copied()?;
        self.model.get_mut(&got.0).unwrap().vcpus[got.1].state = VcpuState::Running(cpu);
        self.cursor = got;
        Some(got)
    }

    fn model_deadline(&self) -> Option<u64> {
        self.model
            .values()
            .filter(|vm| !vm.paused)
            .flat_map(|vm| vm.vcpus.iter())
            .filter(|v| v.state == VcpuState::Waiting)
            .filter_map(|v| v.timer)
            .min()
    }

    fn model_has_runnable(&self) -> bool {
        self.model
            .values()
            .filter(|vm| !vm.paused)
            .flat_map(|vm| vm.vcpus.iter())
            .any(|v| v.state == VcpuState::Runnable)
    }

    fn put_back(&mut self, cpu: usize, back: Back) {
        if matches!(back, Back::Stay) {
            return;
        }
        let Some((id, i, mut ctx)) = self.on_cpu[cpu].take() else {
            return;
        };
        let cntvoff = self.t.vms.get(&id).unwrap().cntvoff;
        let m = &mut self.model.get_mut(&id).unwrap().vcpus[i];
        let state = match back {
            Back::Runnable | Back::Stay => {
                ctx.sys.cntv_ctl_el0 = 0;
                m.timer = None;
                VcpuState::Runnable
            }
            Back::Waiting(timer) => {
                match timer {
                    Some(dt) => {
                        let deadline = self.now + dt;
                        ctx.sys.cntv_ctl_el0 = CNTV_ENABLE;
                        ctx.sys.cntv_cval_el0 = deadline.wrapping_sub(cntvoff);
                        m.timer = Some(deadline);
                    }
                    None => {
                        ctx.sys.cntv_ctl_el0 = 0;
                        m.timer = None;
                    }
                }
                VcpuState::Waiting
            }
        };
        m.state = state;
        let _ = self.t.put_back(id, i, ctx, state);
    }

    fn running(&self, id: u32) -> bool {
        self.model[&id]
            .vcpus
            .iter()
            .any(|v| matches!(v.state, VcpuState::Running(_)))
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Pick { cpu, back } => {
                if self.on_cpu[cpu].is_some() {
                    return Ok(());
                }
                let want = self.model_pick(cpu);
                let got = self.t.pick(cpu, self.now);
                prop_assert_eq!(got.as_ref().map(|g| (g.0, g.1)), want, "pick on cpu{}", cpu);
                self.on_cpu[cpu] = got;
                prop_assert_eq!(
                    self.t.next_timer_deadline(self.now),
                    self.model_deadline(),
                    "next timer deadline"
                );
                self.put_back(cpu, back);
            }
            Op::PutBack { cpu, back } => self.put_back(cpu, back),
            Op::Raise { vm } => {
                let id = self.ids[vm];
                if !self.model.contains_key(&id) {
                    return Ok(());
                }
                let h = &self.t.host;
                let mut vm = self.t.vms.get_mut(&id).unwrap();
                let g = vm.vgic_mut(h).unwrap();
                g.inject_edge(SPI, 0).unwrap();
                self.model.get_mut(&id).unwrap().vcpus[0]
                    .pending
                    .insert(SPI);
            }
            Op::Take { vm, vcpu } => {
                let id = self.ids[vm];
                let Some(m) = self.model.get(&id) else {
                    return Ok(());
                };
                if vcpu >= m.vcpus.len() || matches!(m.vcpus[vcpu].state, VcpuState::Running(_)) {
                    return Ok(());
                }
                let h = &self.t.host;
                let mut vm = self.t.vms.get_mut(&id).unwrap();
                let g = vm.vgic_mut(h).unwrap();
                // The vCPU acknowledges and deactivates everything listed for it.
                let mut s = g.fill_lrs(vcpu, 4).unwrap();
                s.lrs = [0; 16];
                g.sync_from_lrs(vcpu, &s).unwrap();
                self.model.get_mut(&id).unwrap().vcpus[vcpu].pending.clear();
            }
            Op::Pause { vm } => {
                let id = self.ids[vm];
                if let Some(m) = self.model.get_mut(&id) {
                    m.paused = true;
                    self.t.vms.get_mut(&id).unwrap().state =
                        VmState::Paused(PauseReason::Requested);
                }
            }
            Op::Resume { vm } => {
                let id = self.ids[vm];
                if let Some(m) = self.model.get_mut(&id) {
                    m.paused = false;
                    self.t.vms.get_mut(&id).unwrap().state = VmState::Running;
                }
            }
            Op::Destroy { vm } => {
                let id = self.ids[vm];
                if self.model.contains_key(&id) && !self.running(id) {
                    self.t.destroy(id);
                    self.model.remove(&id);
                }
            }
            Op::Advance { ticks } => self.now += ticks,
        }
        prop_assert_eq!(self.t.has_runnable(), self.model_has_runnable());
        for (id, m) in &self.model {
            let vm = self.t.vms.get(id).unwrap();
            for (i, v) in m.vcpus.iter().enumerate() {
                // A vCPU the table has not looked at yet may still show Waiting where the
                // reference already woke it; both wake it at the same pick.
                prop_assert_eq!(vm.vcpus[i].state, v.state, "vm{} vcpu{} state", id, i);
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn picks_follow_the_scan_of_every_vm(ops in proptest::collection::vec(op(), 1..120)) {
        let mut w = World::new();
        for op in &ops {
            w.step(op)?;
        }
    }
}

/// Idle VMs leave the active set and come back for their timer, their interrupt or a change.
#[test]
fn idle_vms_leave_the_active_set_and_come_back() {
    let mut w = World::new();
    // vm1..vm5: vCPU 0 runnable. Run each once and put it back waiting without a timer.
    for _ in 0..VMS {
        w.step(&Op::Pick {
            cpu: 0,
            back: Back::Waiting(None),
        })
        .unwrap();
    }
    w.step(&Op::Pick {
        cpu: 0,
        back: Back::Stay,
    })
    .unwrap();
    assert!(w.on_cpu[0].is_none(), "nothing to run");
    assert_eq!(w.t.vms.active_count(), 0, "every VM is idle");
    // One gets an interrupt: it is active again and runs.
    w.step(&Op::Raise { vm: 2 }).unwrap();
    assert_eq!(w.t.vms.active_count(), 1);
    w.step(&Op::Pick {
        cpu: 1,
        back: Back::Waiting(Some(500)),
    })
    .unwrap();
    w.step(&Op::Take { vm: 2, vcpu: 0 }).unwrap();
    w.step(&Op::Pick {
        cpu: 1,
        back: Back::Stay,
    })
    .unwrap();
    assert!(w.on_cpu[1].is_none());
    assert_eq!(w.t.vms.active_count(), 0, "idle again, its timer filed");
    w.step(&Op::Advance { ticks: 499 }).unwrap();
    w.step(&Op::Pick {
        cpu: 1,
        back: Back::Stay,
    })
    .unwrap();
    assert!(w.on_cpu[1].is_none(), "not yet");
    w.step(&Op::Advance { ticks: 1 }).unwrap();
    w.step(&Op::Pick {
        cpu: 1,
        back: Back::Stay,
    })
    .unwrap();
    assert_eq!(
        w.on_cpu[1].as_ref().map(|c| c.0),
        Some(w.ids[2]),
        "woken by its timer"
    );
}
