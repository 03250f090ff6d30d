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
//!
//! **Each VM has its own lock** ([`VmLock`]): the table (under the table lock) holds every VM
//! in an `Arc`, and a physical CPU running one of the VM's vCPUs takes a [`VmHandle`] to it, so
//! that it handles that vCPU's exits holding the VM's lock only, never the table's
//! ([`super::exit`]). Lock order: the table lock first, then VM locks. A CPU handling exits
//! holds one VM lock and takes no other lock but the leaf ones (frames, heap, log), never the
//! table's: it returns what must change in the table as values. Only the holder of the table
//! lock may hold two VM locks at once. A handle is only taken for a VM with a vCPU on a CPU, so the active-set
//! rule above holds for what it changes too: such a VM is never taken out of the active set.
//! Every method here that gives a VM out locks it, for as long as the returned guard lives.

use alloc::boxed::Box;
use alloc::collections::{btree_map, BTreeMap, BTreeSet};
use alloc::sync::Arc;
use core::ops::RangeBounds;

use super::vm::Vm;

/// A VM with its lock. The `Vm` stays in the `Box` it was built in: moving its ~850 bytes into
/// the lock's allocation (three copies and an allocation) made every fork 4.9 us slower.
pub type VmLock = spin::Mutex<Box<Vm>>;
/// A locked VM: the lock is held until it is dropped.
pub type VmGuard<'a> = spin::MutexGuard<'a, Box<Vm>>;
/// A VM, to lock outside the table lock (a CPU handling one of its vCPU's exits).
pub type VmHandle = Arc<VmLock>;

/// Locks `vm`. On the hardware it spins until the CPU holding it lets go. Off it (host tests, the
/// tool's fake monitor), every VM lock is taken under the table lock, so a VM lock found held
/// for long is one thread taking it twice, which would spin forever: that panics instead,
/// naming the rule, so the bug shows as a failed test and not as a hung one.
pub fn lock(vm: &VmLock) -> VmGuard<'_> {
    #[cfg(not(target_os = "none"))]
    {
        for _ in 0..1u64 << 28 {
            if let Some(g) = vm.try_lock() {
                return g;
            }
            core::hint::spin_loop();
        }
        panic!("a VM lock held for too long: taken twice by one thread (see machine::vmmap)");
    }
    #[cfg(target_os = "none")]
    vm.lock()
}

/// VMs by id, with the scheduler's active set and timer queue (see the module docs).
#[derive(Default)]
pub struct VmMap {
    /// Each VM in its own allocation with its lock: a map node then holds 11 pointers, not 11
    /// whole VMs, and a CPU can hold on to one VM while the table changes.
    map: BTreeMap<u32, VmHandle>,
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

    /// VM `id`, locked, to look at. Never ask for a VM whose guard is still alive: the lock is
    /// not reentrant.
    pub fn get(&self, id: &u32) -> Option<VmGuard<'_>> {
        self.map.get(id).map(|vm| lock(vm))
    }

    /// VM `id`, locked, to change: it becomes active (the scheduler looks at it at its next
    /// pick).
    pub fn get_mut(&mut self, id: &u32) -> Option<VmGuard<'_>> {
        let mut vm = lock(self.map.get(id)?);
        if !vm.active {
            vm.active = true;
            Self::activate(&mut self.active, &mut self.timers, &mut self.timer_of, *id);
        }
        Some(vm)
    }

    /// VM `id`, to lock without the table lock, for a CPU that runs one of its vCPUs (the
    /// scheduler marked it running: see the module docs). It becomes active, as through
    /// [`VmMap::get_mut`].
    pub fn handle(&mut self, id: &u32) -> Option<VmHandle> {
        drop(self.get_mut(id)?);
        self.map.get(id).cloned()
    }

    /// Adds (or replaces) VM `id`, active.
    pub fn insert(&mut self, id: u32, mut vm: Box<Vm>) {
        vm.active = true;
        Self::activate(&mut self.active, &mut self.timers, &mut self.timer_of, id);
        self.map.insert(id, Arc::new(spin::Mutex::new(vm)));
    }

    /// Takes VM `id` out, with its place in the active set and the timer queue. Whoever still
    /// holds a [`VmHandle`] to it keeps a VM that is in no table.
    pub fn remove(&mut self, id: &u32) -> Option<VmHandle> {
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
    pub fn keys(&self) -> btree_map::Keys<'_, u32, VmHandle> {
        self.map.keys()
    }

    /// VM ids in `range`, in order (no VM is locked).
    pub fn ids_in<R: RangeBounds<u32>>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.map.range(range).map(|(&id, _)| id)
    }

    /// VMs, by id, each locked while its guard lives.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = VmGuard<'_>> + '_ {
        self.map.values().map(|vm| lock(vm))
    }

    /// (id, VM) pairs, in order, each VM locked while its guard lives.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u32, VmGuard<'_>)> + '_ {
        self.map.iter().map(|(&id, vm)| (id, lock(vm)))
    }

    /// (id, VM) pairs with ids in `range`, each VM locked while its guard lives.
    pub fn range<R: RangeBounds<u32>>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = (u32, VmGuard<'_>)> + '_ {
        self.map.range(range).map(|(&id, vm)| (id, lock(vm)))
    }

    /// Every VM, to change: all become active.
    pub fn values_mut(&mut self) -> impl Iterator<Item = VmGuard<'_>> + '_ {
        let (active, timers, timer_of) = (&mut self.active, &mut self.timers, &mut self.timer_of);
        self.map.iter().map(move |(&id, vm)| {
            let mut vm = lock(vm);
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
    pub(super) fn values_mut_inert(&mut self) -> impl Iterator<Item = VmGuard<'_>> + '_ {
        self.map.values().map(|vm| lock(vm))
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

    /// VM `id`, to change without touching the active set (the scheduler's own scan, which
    /// may take it out with [`VmMap::deactivate`] while it holds the lock).
    pub(super) fn handle_inert(&self, id: &u32) -> Option<VmHandle> {
        self.map.get(id).cloned()
    }

    /// Takes VM `id` out of the active set: none of its vCPUs can run, is on a CPU or is due.
    /// `deadline` is the earliest time one of its waiting vCPUs' virtual timer fires, if one
    /// is armed; at that time [`VmMap::activate_due`] puts it back. `vm` is VM `id` itself,
    /// locked by the caller.
    pub(super) fn deactivate(&mut self, id: u32, vm: Option<&mut Vm>, deadline: Option<u64>) {
        self.active.remove(&id);
        let Some(vm) = vm else {
            return;
        };
        vm.active = false;
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
            if let Some(vm) = self.map.get(&id) {
                lock(vm).active = true;
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
