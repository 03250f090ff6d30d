//! Rate limits for what a guest can make the monitor print.
//!
//! A guest that loops on an injected abort, a bad MMIO access or a reset makes the monitor log a
//! line per exit: thousands a second, for as long as it likes, filling the host's log and
//! stealing the serial line from every other VM. [`LogLimiter`] is a token bucket (the generic
//! cell-rate algorithm): it holds up to `burst` messages' worth of credit, earns one message's
//! worth every `interval` counter ticks, and each message printed spends one. What it refuses is
//! counted, so the line that is printed next can say how many were dropped ("vmN: M messages
//! suppressed").
//!
//! Time is passed in (counter ticks and their frequency), so the limiter is plain data, tested
//! here on the host, and never reads a clock itself.

/// Whether a message may be printed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Print it; `suppressed` messages were dropped since the last one printed (report them
    /// first when non-zero).
    Print {
        /// Messages refused since the previous [`Admit::Print`].
        suppressed: u64,
    },
    /// Drop it (it is counted).
    Drop,
}

/// A token bucket over counter ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimiter {
    /// Most messages printed back to back after a quiet period.
    burst: u32,
    /// Messages earned per second once the burst is spent.
    per_second: u32,
    /// Credit in ticks, at most `burst * interval`; `None` until the first message (a new
    /// limiter starts full).
    credit: Option<u64>,
    /// Counter value at the last update.
    last: u64,
    /// Messages refused since the last one printed.
    suppressed: u64,
    /// Messages refused in all.
    dropped_total: u64,
}

impl LogLimiter {
    /// A full bucket: `burst` messages at once, then `per_second` a second. Zero values are
    /// taken as 1.
    pub const fn new(burst: u32, per_second: u32) -> Self {
        Self {
            burst: if burst == 0 { 1 } else { burst },
            per_second: if per_second == 0 { 1 } else { per_second },
            credit: None,
            last: 0,
            suppressed: 0,
            dropped_total: 0,
        }
    }

    /// Ticks one message costs at counter frequency `freq` (at least 1).
    fn interval(&self, freq: u64) -> u64 {
        (freq / u64::from(self.per_second)).max(1)
    }

    /// Decides about one message at counter value `now` (ticks at `freq` Hz). A counter that
    /// goes backwards (another CPU's earlier reading) earns nothing and never panics.
    pub fn admit(&mut self, now: u64, freq: u64) -> Admit {
        let interval = self.interval(freq);
        let cap = interval.saturating_mul(u64::from(self.burst));
        let credit = match self.credit {
            None => cap,
            Some(c) => c.saturating_add(now.saturating_sub(self.last)).min(cap),
        };
        if now > self.last || self.credit.is_none() {
            self.last = now;
        }
        if credit >= interval {
            self.credit = Some(credit - interval);
            let suppressed = self.suppressed;
            self.suppressed = 0;
            Admit::Print { suppressed }
        } else {
            self.credit = Some(credit);
            self.suppressed = self.suppressed.saturating_add(1);
            self.dropped_total = self.dropped_total.saturating_add(1);
            Admit::Drop
        }
    }

    /// Messages refused since the last one printed (to report when the VM goes away).
    pub fn pending_suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Messages refused since the limiter was made.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HZ: u64 = 62_500_000;

    fn printed(a: Admit) -> bool {
        matches!(a, Admit::Print { .. })
    }

    #[test]
    fn burst_then_rate() {
        let mut l = LogLimiter::new(10, 5);
        // A flood at one instant: the burst passes, the rest is dropped.
        let at_once = (0..1000).filter(|_| printed(l.admit(HZ, HZ))).count();
        assert_eq!(at_once, 10);
        assert_eq!(l.pending_suppressed(), 990);
        // One second later: five more earned; the first says what was dropped.
        assert_eq!(l.admit(2 * HZ, HZ), Admit::Print { suppressed: 990 });
        let more = (0..100).filter(|_| printed(l.admit(2 * HZ, HZ))).count();
        assert_eq!(more, 4);
        assert_eq!(l.dropped_total(), 990 + 96);
    }

    #[test]
    fn a_flood_of_10000_a_second_prints_about_the_rate() {
        let mut l = LogLimiter::new(20, 10);
        let step = HZ / 10_000;
        let mut n = 0;
        for i in 0..100_000u64 {
            if printed(l.admit(i * step, HZ)) {
                n += 1;
            }
        }
        // Ten seconds of flood: the burst plus ten a second, never more.
        assert!((100..=20 + 101).contains(&n), "{n}");
    }

    #[test]
    fn quiet_refills_and_time_going_back_is_harmless() {
        let mut l = LogLimiter::new(2, 1);
        assert!(printed(l.admit(100 * HZ, HZ)));
        assert!(printed(l.admit(100 * HZ, HZ)));
        assert_eq!(l.admit(100 * HZ, HZ), Admit::Drop);
        assert_eq!(l.admit(50 * HZ, HZ), Admit::Drop);
        // Long quiet: full again, but only `burst`.
        assert_eq!(l.admit(1000 * HZ, HZ), Admit::Print { suppressed: 2 });
        assert!(printed(l.admit(1000 * HZ, HZ)));
        assert_eq!(l.admit(1000 * HZ, HZ), Admit::Drop);
        // Degenerate parameters and frequencies do not panic.
        let mut z = LogLimiter::new(0, 0);
        assert!(printed(z.admit(0, 0)));
        assert_eq!(z.admit(0, 0), Admit::Drop);
        assert!(printed(z.admit(u64::MAX, u64::MAX)));
    }

    proptest! {
        /// Over any sequence of times, printed <= burst + elapsed * rate, and every refused
        /// message is reported exactly once by a later Print or is still pending.
        #[test]
        fn never_more_than_the_bucket_allows(
            burst in 1u32..50,
            rate in 1u32..100,
            steps in proptest::collection::vec(0u64..HZ, 1..500),
        ) {
            let mut l = LogLimiter::new(burst, rate);
            let mut now = 0u64;
            let (mut printed_n, mut reported) = (0u64, 0u64);
            for s in &steps {
                now += s;
                if let Admit::Print { suppressed } = l.admit(now, HZ) {
                    printed_n += 1;
                    reported += suppressed;
                }
            }
            let interval = HZ / u64::from(rate);
            prop_assert!(printed_n <= u64::from(burst) + now / interval + 1);
            prop_assert_eq!(reported + l.pending_suppressed(), l.dropped_total());
            prop_assert_eq!(printed_n + l.dropped_total(), steps.len() as u64);
        }
    }
}
