//! Model-based property test: random sequences of fork / pause / resume / reset / kill / console
//! writes sent through the client library to the fake monitor, checked against a plain model of
//! the VM tree (ids, parents, states, errors) and the accounting invariants. A killed VM stays
//! listed as stopped until `rm` removes it.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use vmfork::client::{Client, ClientError};
use vmfork::fake::{FakeConfig, FakeMonitor};
use vmfork_proto::{ErrorReply, PauseReason, Request, VmId, VmState};

#[derive(Clone, Debug)]
enum Op {
    Fork(u32, u32, bool),
    Pause(u32),
    Resume(u32),
    Reset(u32),
    Kill(u32),
    Poke(u32, u8),
    Rm(u32, bool),
}

fn op() -> impl Strategy<Value = Op> {
    // Targets range over a few more ids than exist, to hit NoSuchVm.
    let vm = 1u32..12;
    prop_oneof![
        3 => (vm.clone(), 1u32..4, any::<bool>()).prop_map(|(v, n, p)| Op::Fork(v, n, p)),
        1 => vm.clone().prop_map(Op::Pause),
        1 => vm.clone().prop_map(Op::Resume),
        1 => vm.clone().prop_map(Op::Reset),
        1 => vm.clone().prop_map(Op::Kill),
        2 => (vm.clone(), 1u8..20).prop_map(|(v, n)| Op::Poke(v, n)),
        1 => (vm, any::<bool>()).prop_map(|(v, f)| Op::Rm(v, f)),
    ]
}

#[derive(Clone, Debug, PartialEq)]
struct M {
    parent: Option<u32>,
    paused: Option<PauseReason>,
}

/// A request to VM `vm`, absent from the live model, failed as it should: `VmStopped` when it
/// is a stopped VM's record, else `NoSuchVm`.
fn expect_absent(r: Result<impl std::fmt::Debug, ClientError>, vm: u32, stopped: &BTreeSet<u32>) {
    match r {
        Err(ClientError::Monitor(ErrorReply::VmStopped(VmId(v)))) if stopped.contains(&vm) => {
            assert_eq!(v, vm)
        }
        Err(ClientError::Monitor(ErrorReply::NoSuchVm(VmId(v)))) if !stopped.contains(&vm) => {
            assert_eq!(v, vm)
        }
        other => panic!(
            "expected the error for absent vm{vm} (stopped: {}), got {other:?}",
            stopped.contains(&vm)
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fake_monitor_matches_the_model(ops in proptest::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let config = FakeConfig { initial_vms: vec![("root".into(), 1 << 20, 1)], ..FakeConfig::default() };
        let fake = FakeMonitor::start(&sock, config).unwrap();
        let mut c = Client::connect(&sock).unwrap();
        let mut model: BTreeMap<u32, M> = BTreeMap::new();
        model.insert(1, M { parent: None, paused: None });
        let mut stopped: BTreeSet<u32> = BTreeSet::new();
        let mut next = 2u32;
        for op in ops {
            match op {
                Op::Fork(v, n, paused) => {
                    let r = c.fork(VmId(v), n, paused);
                    if model.contains_key(&v) {
                        let ids: Vec<u32> = r.unwrap().into_iter().map(|i| i.0).collect();
                        prop_assert_eq!(ids, (next..next + n).collect::<Vec<_>>());
                        for id in next..next + n {
                            model.insert(id, M { parent: Some(v), paused: paused.then_some(PauseReason::Forked) });
                        }
                        next += n;
                    } else {
                        expect_absent(r, v, &stopped);
                    }
                }
                Op::Rm(v, force) => {
                    let r = c.simple(&Request::Remove { vm: VmId(v), force });
                    if stopped.remove(&v) {
                        r.unwrap();
                    } else if model.contains_key(&v) {
                        if force {
                            r.unwrap();
                            model.remove(&v);
                        } else {
                            prop_assert!(matches!(&r, Err(ClientError::Monitor(ErrorReply::BadRequest(_)))), "{:?}", r);
                        }
                    } else {
                        prop_assert!(matches!(&r, Err(ClientError::Monitor(ErrorReply::NoSuchVm(_)))), "{:?}", r);
                    }
                }
                Op::Pause(v) | Op::Resume(v) | Op::Reset(v) | Op::Kill(v) | Op::Poke(v, _) => {
                    let req = match op {
                        Op::Pause(_) => Request::Pause { vm: VmId(v) },
                        Op::Resume(_) => Request::Resume { vm: VmId(v) },
                        Op::Reset(_) => Request::Reset { vm: VmId(v) },
                        Op::Kill(_) => Request::Kill { vm: VmId(v) },
                        Op::Poke(_, n) => Request::ConsoleInput { vm: VmId(v), data: format!("poke {n}\n").into_bytes() },
                        Op::Fork(..) | Op::Rm(..) => unreachable!(),
                    };
                    let r = c.simple(&req);
                    let Some(m) = model.get_mut(&v) else {
                        expect_absent(r, v, &stopped);
                        continue;
                    };
                    if matches!(op, Op::Reset(_)) && m.parent.is_none() {
                        // Only forks have a fork point (as in the monitor).
                        prop_assert!(
                            matches!(&r, Err(ClientError::Monitor(ErrorReply::BadRequest(e))) if e.contains("not a fork")),
                            "{:?}", r
                        );
                        continue;
                    }
                    r.unwrap();
                    match op {
                        // As the monitor's server: a pause, even of a VM paused already (a
                        // fork made paused), leaves it paused because it was asked to.
                        Op::Pause(_) => m.paused = Some(PauseReason::Requested),
                        Op::Resume(_) | Op::Reset(_) => m.paused = None,
                        Op::Kill(_) => {
                            model.remove(&v);
                            stopped.insert(v);
                        }
                        _ => {}
                    }
                }
            }
            // Compare the tree and states, and check the accounting invariants.
            let list = c.list().unwrap();
            let records: BTreeSet<u32> = list
                .iter()
                .filter(|i| matches!(i.state, VmState::Stopped { .. }))
                .map(|i| i.id.0)
                .collect();
            prop_assert_eq!(&records, &stopped);
            let live: Vec<_> = list.iter().filter(|i| !records.contains(&i.id.0)).collect();
            let got: BTreeMap<u32, M> = live.iter().map(|i| (i.id.0, M {
                parent: i.parent.map(|p| p.0),
                paused: match &i.state {
                    VmState::Paused { reason } => Some(*reason),
                    VmState::Running => None,
                    s => panic!("unexpected state {s:?}"),
                },
            })).collect();
            prop_assert_eq!(&got, &model);
            for i in &live {
                prop_assert_eq!(i.private_pages + i.shared_pages, i.mem_bytes / 4096);
                prop_assert!(i.private_pages <= i.cow_faults + 256);
                let d = c.diff(i.id, i.id).unwrap();
                prop_assert_eq!(d.differing_pages, 0);
            }
            let (g, _) = c.stats(None).unwrap();
            prop_assert_eq!(g.free_frames + g.used_frames, g.total_frames);
            prop_assert_eq!(g.vms as usize, model.len());
        }
        drop(c);
        drop(fake);
    }
}
