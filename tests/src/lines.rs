//! Helpers over a whole serial log: its complete lines, the lines of one VM, waiting for a count
//! of lines, and the reference output of a guest run on plain QEMU.

use std::thread;
use std::time::{Duration, Instant};

use crate::images::guest_image;
use crate::timing::scaled;
use crate::{Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// The lines a guest prints on plain QEMU with `smp` CPUs and bootargs `cmdline` (none when
/// empty), once it has printed `last` and QEMU has exited with status 0: every non-empty line of
/// the serial port, since the guest is its only writer.
pub fn plain_lines(image: &str, smp: u32, cmdline: &str, last: &str) -> Vec<String> {
    let mut cfg = QemuConfig::plain(guest_image(image))
        .smp(smp)
        .name(&format!("{image}_plain_ref"));
    if !cmdline.is_empty() {
        cfg = cfg.append(cmdline);
    }
    let mut q = Qemu::start(cfg);
    q.wait_for(last, DEFAULT_TIMEOUT);
    assert_eq!(
        q.wait_exit(DEFAULT_TIMEOUT),
        0,
        "plain run of {image} failed"
    );
    complete_lines(&q)
        .into_iter()
        .filter(|l| !l.is_empty())
        .collect()
}

/// The complete lines VM `vm` printed on the monitor's console, without their `[vmN] ` prefix.
pub fn vm_lines(q: &Qemu, vm: u32) -> Vec<String> {
    let prefix = format!("[vm{vm}] ");
    complete_lines(q)
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// The lines of the serial log that are complete (ended by a newline; `\r` removed). After QEMU
/// has exited, the last unterminated line counts as complete too.
pub fn complete_lines(q: &Qemu) -> Vec<String> {
    let log = q.serial();
    let mut lines: Vec<String> = log
        .split('\n')
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    let last = lines.pop().unwrap_or_default();
    if !last.is_empty() && q.has_exited() {
        lines.push(last);
    }
    lines
}

/// Waits until `pattern` appears in `n` complete lines anywhere in the log (for events of
/// several VMs, which come in any order). Panics with the log after [`DEFAULT_TIMEOUT`].
pub fn wait_count(q: &Qemu, pattern: &str, n: usize) {
    let deadline = Instant::now() + scaled(DEFAULT_TIMEOUT);
    while complete_lines(q)
        .iter()
        .filter(|l| l.contains(pattern))
        .count()
        < n
    {
        assert!(
            Instant::now() < deadline,
            "`{pattern}` did not appear in {n} lines:\n{}",
            q.serial()
        );
        thread::sleep(Duration::from_millis(100));
    }
}
