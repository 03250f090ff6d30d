//! Time limits: the default timeout of a wait, the lifetime cap of one QEMU, and their overrides
//! from the environment (`VMFORK_TEST_TIMEOUT_SCALE`, `VMFORK_TEST_HARD_CAP_SECS`).

use std::time::Duration;

/// The timeout tests should use for anything that is not deliberately short: generous, because CI
/// is a loaded 2-core machine. Never tune a test's timeout to be tight.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Default lifetime cap of one QEMU, enforced by a watchdog thread.
const DEFAULT_HARD_CAP: Duration = Duration::from_secs(1800);

/// Multiplies `timeout` by `VMFORK_TEST_TIMEOUT_SCALE` (default 1).
pub(crate) fn scaled(timeout: Duration) -> Duration {
    match std::env::var("VMFORK_TEST_TIMEOUT_SCALE") {
        Ok(s) if !s.trim().is_empty() => match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => timeout.mul_f64(f),
            _ => panic!("VMFORK_TEST_TIMEOUT_SCALE must be a positive number, not {s:?}"),
        },
        _ => timeout,
    }
}

/// The watchdog's lifetime cap of one QEMU (`VMFORK_TEST_HARD_CAP_SECS`, default 1800 s).
pub(crate) fn hard_cap() -> Duration {
    match std::env::var("VMFORK_TEST_HARD_CAP_SECS") {
        Ok(s) if !s.trim().is_empty() => match s.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => panic!("VMFORK_TEST_HARD_CAP_SECS must be a positive integer, not {s:?}"),
        },
        _ => DEFAULT_HARD_CAP,
    }
}
