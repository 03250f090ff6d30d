//! Whole-VM operations (fork, reset) waiting for every vCPU of their VM to leave the CPUs, and
//! the rule that each is answered exactly once.
//!
//! A fork or reset needs all of a VM's vCPUs off the physical CPUs, so it waits: the monitor
//! queues it on the VM, stops scheduling the VM's vCPUs, and runs the queue when the last one
//! comes back. Two kinds of requester wait:
//!
//! - a guest vCPU that made `VMFORK_FORK` or `VMFORK_RESET` ([`Waiter::Vcpu`]). Its answer goes
//!   into its X0 (and, for a fork, into the child's copy of it). It is accepted only when
//!   nothing else waits on the VM: a fork that ran while another vCPU's call was still
//!   unanswered would copy that vCPU into the child mid-call, with X0 still holding the
//!   function ID. A second call gets [`crate::psci::VMFORK_BUSY`] at once instead (in its X0,
//!   so the parent and the child it is copied into both see it), and the guest may call again.
//! - a host request from the control channel ([`Waiter::Ticket`]), answered through its ticket.
//!   Up to [`MAX_WAITING`] may wait on one VM, behind a guest's call if there is one; one more
//!   is refused with [`Busy`].
//!
//! Every accepted entry leaves the queue exactly once, by [`OpQueue::pop`] (the monitor then
//! runs it and answers its waiter with the result) or by [`OpQueue::drain`] when the VM goes
//! (the monitor answers each with an error at once). The queue owns its entries by value and
//! hands each out by move, so the only way to lose one is to drop what `pop`/`drain` returned:
//! [`Waiting`] is `#[must_use]`. The queue holds its entries in place (no heap), so queueing
//! cannot fail for want of memory.

/// Most operations waiting on one VM at once (a guest's call counts as one).
pub const MAX_WAITING: usize = 4;

/// Who waits for an operation's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    /// The vCPU with this index made the hypercall; its X0 gets the result.
    Vcpu(usize),
    /// A host request; the result is filed under this ticket.
    Ticket(u64),
}

/// The queue is full (or, for a guest's call, not empty): the request is refused and nothing
/// was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

/// One queued operation and who waits for it. Whoever takes it out of the queue must answer
/// its waiter.
#[must_use = "a queued operation's waiter must be answered"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting<Op> {
    /// The operation.
    pub op: Op,
    /// Who gets its result.
    pub waiter: Waiter,
}

/// The operations waiting on one VM, first come first served.
#[derive(Clone, Debug)]
pub struct OpQueue<Op> {
    slots: [Option<Waiting<Op>>; MAX_WAITING],
    head: usize,
    len: usize,
}

impl<Op> Default for OpQueue<Op> {
    fn default() -> Self {
        Self::new()
    }
}

impl<Op> OpQueue<Op> {
    /// An empty queue.
    pub const fn new() -> Self {
        Self {
            slots: [const { None }; MAX_WAITING],
            head: 0,
            len: 0,
        }
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many operations wait.
    pub fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, w: Waiting<Op>) {
        let tail = (self.head + self.len) % MAX_WAITING;
        debug_assert!(self.slots[tail].is_none());
        self.slots[tail] = Some(w);
        self.len += 1;
    }

    /// Queues guest vCPU `vcpu`'s call. Refused unless the queue is empty (see the module
    /// documentation for why).
    pub fn push_vcpu(&mut self, vcpu: usize, op: Op) -> Result<(), Busy> {
        if !self.is_empty() {
            return Err(Busy);
        }
        self.push(Waiting {
            op,
            waiter: Waiter::Vcpu(vcpu),
        });
        Ok(())
    }

    /// Queues a host request answered through `ticket`. Refused when [`MAX_WAITING`] wait.
    pub fn push_ticket(&mut self, ticket: u64, op: Op) -> Result<(), Busy> {
        if self.len >= MAX_WAITING {
            return Err(Busy);
        }
        self.push(Waiting {
            op,
            waiter: Waiter::Ticket(ticket),
        });
        Ok(())
    }

    /// Takes the oldest operation out, to be run and answered.
    pub fn pop(&mut self) -> Option<Waiting<Op>> {
        if self.len == 0 {
            return None;
        }
        let w = self.slots[self.head].take();
        self.head = (self.head + 1) % MAX_WAITING;
        self.len -= 1;
        w
    }

    /// Takes every operation out, oldest first, to be answered with an error (the VM is going).
    /// The queue is empty afterwards even if the iterator is not run to the end.
    pub fn drain(&mut self) -> Drain<Op> {
        Drain {
            rest: core::mem::take(self),
        }
    }
}

/// The operations [`OpQueue::drain`] took out.
#[must_use = "every drained operation's waiter must be answered"]
pub struct Drain<Op> {
    rest: OpQueue<Op>,
}

impl<Op> Iterator for Drain<Op> {
    type Item = Waiting<Op>;

    fn next(&mut self) -> Option<Waiting<Op>> {
        self.rest.pop()
    }
}

/// Why a queued operation failed, as far as its guest caller needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestError {
    /// Another fork or reset of the VM is waiting: nothing was done, call again.
    Busy,
    /// Not enough memory.
    OutOfMemory,
    /// Not allowed (not a fork, the VM is being torn down, no VMID left, ...).
    Denied,
}

/// X0 for a guest caller: the (non-negative) value on success, the documented error code
/// otherwise (`docs/GUESTS.md`, [`crate::psci`]'s table of vmfork calls).
pub fn guest_x0(result: Result<u64, GuestError>) -> u64 {
    use crate::psci::{self, PsciReturn};
    match result {
        Ok(v) => v,
        Err(GuestError::Busy) => psci::ret(psci::VMFORK_BUSY),
        Err(GuestError::OutOfMemory) => PsciReturn::InternalFailure.to_x0(),
        Err(GuestError::Denied) => PsciReturn::Denied.to_x0(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    #[test]
    fn a_guest_call_waits_only_alone() {
        let mut q = OpQueue::new();
        assert_eq!(q.push_vcpu(0, 'f'), Ok(()));
        // A second vCPU's call, at the same instant, is refused, not queued behind.
        assert_eq!(q.push_vcpu(1, 'f'), Err(Busy));
        // Host requests queue behind it.
        assert_eq!(q.push_ticket(7, 'r'), Ok(()));
        assert_eq!(
            q.pop(),
            Some(Waiting {
                op: 'f',
                waiter: Waiter::Vcpu(0)
            })
        );
        assert_eq!(
            q.push_vcpu(1, 'f'),
            Err(Busy),
            "the host request still waits"
        );
        assert_eq!(
            q.pop(),
            Some(Waiting {
                op: 'r',
                waiter: Waiter::Ticket(7)
            })
        );
        assert_eq!(q.pop(), None);
        assert_eq!(q.push_vcpu(1, 'f'), Ok(()));
    }

    #[test]
    fn host_requests_are_bounded() {
        let mut q = OpQueue::new();
        for t in 0..MAX_WAITING as u64 {
            assert_eq!(q.push_ticket(t, ()), Ok(()));
        }
        assert_eq!(q.push_ticket(99, ()), Err(Busy));
        assert_eq!(q.len(), MAX_WAITING);
        let drained: Vec<Waiter> = q.drain().map(|w| w.waiter).collect();
        assert_eq!(
            drained,
            (0..MAX_WAITING as u64)
                .map(Waiter::Ticket)
                .collect::<Vec<_>>()
        );
        assert!(q.is_empty());
    }

    #[test]
    fn a_dropped_drain_still_empties_the_queue() {
        let mut q = OpQueue::new();
        q.push_ticket(1, ()).unwrap();
        q.push_ticket(2, ()).unwrap();
        let mut d = q.drain();
        assert_eq!(d.next().map(|w| w.waiter), Some(Waiter::Ticket(1)));
        drop(d);
        assert!(q.is_empty());
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn guest_error_codes() {
        assert_eq!(guest_x0(Ok(5)), 5);
        assert_eq!(guest_x0(Err(GuestError::Busy)) as i64, -10);
        assert_eq!(guest_x0(Err(GuestError::OutOfMemory)) as i64, -6);
        assert_eq!(guest_x0(Err(GuestError::Denied)) as i64, -3);
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// A guest vCPU calls.
        Vcpu(usize),
        /// A host request arrives.
        Host,
        /// The last vCPU came back: the monitor runs one queued operation.
        RunOne,
        /// ... or all of them, as `run_pending` does.
        RunAll,
        /// The VM is killed: every waiter is answered with an error.
        Gone,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..4).prop_map(Step::Vcpu),
            Just(Step::Host),
            Just(Step::Host),
            Just(Step::RunOne),
            Just(Step::RunAll),
            Just(Step::Gone),
        ]
    }

    /// How a request was answered, in the model.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Answer {
        Refused,
        Ran,
        Gone,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Against a plain model (a list of what waits): every request is answered exactly
        /// once (refused at once, run, or failed when the VM goes), in the order accepted; a
        /// guest's call is accepted only alone; never more than MAX_WAITING wait.
        #[test]
        fn every_request_is_answered_exactly_once(steps in proptest::collection::vec(step(), 0..200)) {
            let mut q: OpQueue<u64> = OpQueue::new();
            let mut model: Vec<u64> = Vec::new();
            let mut answers: BTreeMap<u64, Vec<Answer>> = BTreeMap::new();
            let mut next = 0u64;
            let mut order: Vec<u64> = Vec::new();
            let answer = |req: u64, a: Answer, answers: &mut BTreeMap<u64, Vec<Answer>>| {
                answers.entry(req).or_default().push(a);
            };
            for s in steps.iter().chain([Step::Gone].iter()) {
                match s {
                    Step::Vcpu(v) => {
                        let req = next;
                        next += 1;
                        let accepted = q.push_vcpu(*v, req).is_ok();
                        prop_assert_eq!(accepted, model.is_empty());
                        if accepted { model.push(req) } else { answer(req, Answer::Refused, &mut answers) }
                    }
                    Step::Host => {
                        let req = next;
                        next += 1;
                        let accepted = q.push_ticket(req, req).is_ok();
                        prop_assert_eq!(accepted, model.len() < MAX_WAITING);
                        if accepted { model.push(req) } else { answer(req, Answer::Refused, &mut answers) }
                    }
                    Step::RunOne => {
                        let got = q.pop().map(|w| w.op);
                        let want = (!model.is_empty()).then(|| model.remove(0));
                        prop_assert_eq!(got, want);
                        if let Some(req) = got { order.push(req); answer(req, Answer::Ran, &mut answers) }
                    }
                    Step::RunAll => {
                        while let Some(w) = q.pop() {
                            prop_assert_eq!(Some(w.op), (!model.is_empty()).then(|| model.remove(0)));
                            order.push(w.op);
                            answer(w.op, Answer::Ran, &mut answers);
                        }
                        prop_assert!(model.is_empty());
                    }
                    Step::Gone => {
                        for w in q.drain() {
                            prop_assert_eq!(w.op, model.remove(0));
                            if let Waiter::Ticket(t) = w.waiter { prop_assert_eq!(t, w.op) }
                            answer(w.op, Answer::Gone, &mut answers);
                        }
                        prop_assert!(model.is_empty());
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert!(q.len() <= MAX_WAITING);
            }
            // Every request got exactly one answer.
            prop_assert_eq!(answers.len() as u64, next);
            for (req, a) in &answers {
                prop_assert_eq!(a.len(), 1, "request {} answered {:?}", req, a);
            }
            // Operations ran in the order they were accepted.
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
