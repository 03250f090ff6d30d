//! [`VmMap`]: the VMs of a table by id, and which of them the scheduler has to look at.
//!
//! A pick ([`super::VmTable::pick`]) wakes waiting vCPUs whose interrupt or timer is due and
//! takes the next runnable one. Looking at every VM made each pick cost about 175 emulated
//! instructions per idle VM (a fork bomb's children in WFI; `make bench`, phase `idle`), so
//! 10,000 idle forks cut a working VM's fuzzing loop from 27,000 to 560 cycles a second.
//!
//! So the map keeps an **active set**: the VMs that may have a vCPU to run or to wake. The rule
//! that makes it exact is in the type: the only way to change a VM is through [`VmMap::get_mut`]
//! (or [`VmMap::insert`], [`VmMap::values_mut`]), and each of those puts the VM in the active
//! set. Whatever could wake a waiting vCPU (a sibling's SGI in an exit, console input, a control
//! operation, a resume) changes the VM through one of them. The scheduler takes a VM out only
//! when it found no vCPU of it runnable, running or due ([`VmMap::deactivate`]), and files the
//! earliest virtual-timer deadline of its waiting vCPUs in a **timer queue**; a pick at or past
//! that time puts the VM back ([`VmMap::activate_due`]). An idle VM then costs nothing per pick.
//!
//! The sets grow by one entry per VM at most (a VM has at most one timer entry); their nodes are
//! allocated infallibly, like the map's own, from the margin the heap keeps for small
//! allocations (`Host::heap_check` leaves a reserve).

use alloc::boxed::Box;
use alloc::collections::{btree_map, BTreeMap, BTreeSet};
use core::ops::{Index, RangeBounds};

use super::vm::Vm;

/// VMs by id, with the scheduler's active set and timer queue (see the module docs).
#[derive(Default)]
pub struct VmMap {
    /// Boxed: a map node then holds 11 pointers, not 11 whole VMs, most of them half empty when
    /// ids only grow (about 0.6 KiB per VM less).
    map: BTreeMap<u32, Box<Vm>>,
    /// VMs that may have a vCPU to run or to wake.
    active: BTreeSet<u32>,
    /// Idle VMs by the earliest deadline of their waiting vCPUs' virtual timers (physical
    /// counter): (deadline, id). Never an active VM.
    timers: BTreeSet<(u64, u32)>,
    /// Each idle VM's entry in `timers`.
    timer_of: BTreeMap<u32, u64>,
}

impl VmMap {
    /// An empty map.
    pub const fn new() -> Self {
        Self {
            map: BTreeMap::new(),
            active: BTreeSet::new(),
            timers: BTreeSet::new(),
            timer_of: BTreeMap::new(),
        }
    }

    /// VM `id`, to look at.
    pub fn get(&self, id: &u32) -> Option<&Vm> {
        self.map.get(id).map(|vm| &**vm)
    }

    /// VM `id`, to change: it becomes active (the scheduler looks at it at its next pick).
    pub fn get_mut(&mut self, id: &u32) -> Option<&mut Box<Vm>> {
        let vm = self.map.get_mut(id)?;
        if !vm.active {
            vm.active = true;
            Self::activate(&mut self.active, &mut self.timers, &mut self.timer_of, *id);
        }
        Some(vm)
    }

    /// Adds (or replaces) VM `id`, active.
    pub fn insert(&mut self, id: u32, mut vm: Box<Vm>) -> Option<Box<Vm>> {
        vm.active = true;
        Self::activate(&mut self.active, &mut self.timers, &mut self.timer_of, id);
        self.map.insert(id, vm)
    }

    /// Takes VM `id` out, with its place in the active set and the timer queue.
    pub fn remove(&mut self, id: &u32) -> Option<Box<Vm>> {
        let vm = self.map.remove(id)?;
        self.active.remove(id);
        if let Some(d) = self.timer_of.remove(id) {
            self.timers.remove(&(d, *id));
        }
        Some(vm)
    }

    /// True when VM `id` is here.
    pub fn contains_key(&self, id: &u32) -> bool {
        self.map.contains_key(id)
    }

    /// How many VMs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when there is no VM.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// VM ids, in order.
    pub fn keys(&self) -> btree_map::Keys<'_, u32, Box<Vm>> {
        self.map.keys()
    }

    /// VMs, by id.
    pub fn values(&self) -> btree_map::Values<'_, u32, Box<Vm>> {
        self.map.values()
    }

    /// (id, VM) pairs, in order.
    pub fn iter(&self) -> btree_map::Iter<'_, u32, Box<Vm>> {
        self.map.iter()
    }

    /// (id, VM) pairs with ids in `range`.
    pub fn range<R: RangeBounds<u32>>(&self, range: R) -> btree_map::Range<'_, u32, Box<Vm>> {
        self.map.range(range)
    }

    /// Every VM, to change: all become active.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Box<Vm>> + '_ {
        let (active, timers, timer_of) = (&mut self.active, &mut self.timers, &mut self.timer_of);
        self.map.iter_mut().map(move |(&id, vm)| {
            if !vm.active {
                vm.active = true;
                Self::activate(active, timers, timer_of, id);
            }
            vm
        })
    }

    /// Puts `id` in the active set and takes its entry out of the timer queue: an active VM's
    /// timers are looked at by every pick, and the queue holds idle VMs only, so its first
    /// deadline is exact.
    fn activate(
        active: &mut BTreeSet<u32>,
        timers: &mut BTreeSet<(u64, u32)>,
        timer_of: &mut BTreeMap<u32, u64>,
        id: u32,
    ) {
        active.insert(id);
        if let Some(d) = timer_of.remove(&id) {
            timers.remove(&(d, id));
        }
    }

    /// Every VM, for a change that can never make a vCPU runnable or wake one (printing a
    /// console line): the active set stays as it is.
    pub(super) fn values_mut_inert(&mut self) -> btree_map::ValuesMut<'_, u32, Box<Vm>> {
        self.map.values_mut()
    }

    /// The active VMs' ids, in order.
    pub(super) fn active_ids(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.active.iter().copied()
    }

    /// Active VM ids in `range`, in order.
    pub(super) fn active_range<R: RangeBounds<u32>>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.active.range(range).copied()
    }

    /// Active VM `id`, to change without touching the active set (the scheduler's own scan).
    pub(super) fn get_mut_inert(&mut self, id: &u32) -> Option<&mut Box<Vm>> {
        self.map.get_mut(id)
    }

    /// Takes VM `id` out of the active set: none of its vCPUs can run, is on a CPU or is due.
    /// `deadline` is the earliest time one of its waiting vCPUs' virtual timer fires, if one
    /// is armed; at that time [`VmMap::activate_due`] puts it back.
    pub(super) fn deactivate(&mut self, id: u32, deadline: Option<u64>) {
        let Some(vm) = self.map.get_mut(&id) else {
            self.active.remove(&id);
            return;
        };
        vm.active = false;
        self.active.remove(&id);
        if let Some(old) = self.timer_of.remove(&id) {
            self.timers.remove(&(old, id));
        }
        if let Some(d) = deadline {
            self.timers.insert((d, id));
            self.timer_of.insert(id, d);
        }
    }

    /// Makes every idle VM whose timer deadline is at or before `now` active again.
    pub(super) fn activate_due(&mut self, now: u64) {
        while let Some(&(d, id)) = self.timers.first() {
            if d > now {
                break;
            }
            self.timers.remove(&(d, id));
            self.timer_of.remove(&id);
            if let Some(vm) = self.map.get_mut(&id) {
                vm.active = true;
                self.active.insert(id);
            }
        }
    }

    /// The earliest deadline in the timer queue (idle VMs only).
    pub(super) fn first_deadline(&self) -> Option<u64> {
        self.timers.first().map(|&(d, _)| d)
    }

    /// How many VMs are active (for tests and statistics).
    pub fn active_count(&self) -> usize {
        self.active.len()
    }
}

impl Index<&u32> for VmMap {
    type Output = Vm;
    fn index(&self, id: &u32) -> &Vm {
        &self.map[id]
    }
}
