//! A running QEMU's serial console: the waits that read it line by line after the read cursor,
//! the checks over the whole log, and writing to it (QEMU's stdin).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::process::{describe_status, lock_proc};
use super::Qemu;
use crate::timing::scaled;

/// How long a line without a trailing newline must stay unchanged before it counts as complete.
const LINE_IDLE: Duration = Duration::from_secs(2);

/// The last `n` lines of `text`, or `(none)`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "(none)".to_string();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Qemu {
    /// Waits for the first line after the cursor for which `matcher` returns `Some`, moves the
    /// cursor past it and returns the line and the matcher's result. `what` describes the wait for
    /// panic messages.
    fn wait_line<T>(
        &self,
        what: &str,
        timeout: Duration,
        matcher: impl Fn(&str) -> Option<T>,
    ) -> (String, T) {
        let timeout = scaled(timeout);
        let start = Instant::now();
        let deadline = start + timeout;
        let mut cursor = self.cursor();
        let mut scan = *cursor;
        let mut st = self.serial.lock();
        loop {
            // Complete lines first; `scan` only ever moves past lines that did not match.
            while let Some(nl) = st.bytes[scan..].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&st.bytes[scan..scan + nl]);
                let line = line.trim_end_matches('\r');
                if let Some(found) = matcher(line) {
                    *cursor = scan + nl + 1;
                    return (line.to_string(), found);
                }
                scan += nl + 1;
            }
            let now = Instant::now();
            let partial = scan < st.bytes.len();
            let idle = now.duration_since(st.last_rx) >= LINE_IDLE;
            if partial && (st.eof || idle) {
                let line = String::from_utf8_lossy(&st.bytes[scan..]);
                let line = line.trim_end_matches('\r');
                if let Some(found) = matcher(line) {
                    *cursor = st.bytes.len();
                    return (line.to_string(), found);
                }
            }
            if st.eof {
                let since = String::from_utf8_lossy(&st.bytes[*cursor..]).into_owned();
                drop(st);
                drop(cursor);
                let status = lock_proc(&self.proc).reap(Duration::from_secs(2));
                panic!(
                    "[{}] QEMU exited ({}) before the serial output showed {what}\n\
                     output after the read cursor (last 20 lines):\n{}\n\
                     (full serial log and QEMU command line follow)",
                    self.name,
                    describe_status(status, self.killed_by_harness.load(Ordering::SeqCst)),
                    tail(&since, 20),
                );
            }
            if now >= deadline {
                let since = String::from_utf8_lossy(&st.bytes[*cursor..]).into_owned();
                drop(st);
                drop(cursor);
                panic!(
                    "[{}] timed out after {:.1} s waiting for {what} in the serial output\n\
                     output after the read cursor (last 20 lines):\n{}\n\
                     (full serial log and QEMU command line follow)",
                    self.name,
                    timeout.as_secs_f64(),
                    tail(&since, 20),
                );
            }
            // Sleep until new output, the deadline, or (with a partial line) the idle point.
            let mut wake = deadline;
            if partial && !idle {
                wake = wake.min(st.last_rx + LINE_IDLE);
            }
            let dur = wake
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            st = match self.serial.cond.wait_timeout(st, dur) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Waits until `pattern` (a substring, without newlines) appears in the serial output after
    /// the read cursor; returns the whole line containing it (without the line end) and moves the
    /// cursor past that line. Panics on timeout or if QEMU exits first; the full log is printed.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> String {
        assert!(
            !pattern.contains('\n'),
            "wait_for matches within one line; the pattern must not contain a newline: {pattern:?}"
        );
        self.wait_line(&format!("{pattern:?}"), timeout, |line| {
            line.contains(pattern).then_some(())
        })
        .0
    }

    /// Waits until a line after the read cursor matches the regex `re`; returns its capture
    /// groups (index 0 is the whole match; a group that did not participate is empty) and moves
    /// the cursor past the line. Panics on an invalid regex, on timeout, or if QEMU exits first.
    pub fn wait_for_regex(&self, re: &str, timeout: Duration) -> Vec<String> {
        let regex = match regex::Regex::new(re) {
            Ok(r) => r,
            Err(e) => panic!("invalid regex {re:?}: {e}"),
        };
        self.wait_line(&format!("a line matching /{re}/"), timeout, |line| {
            regex.captures(line).map(|caps| {
                caps.iter()
                    .map(|g| g.map_or_else(String::new, |m| m.as_str().to_string()))
                    .collect()
            })
        })
        .1
    }

    /// Panics if `pattern` appears anywhere in the serial output so far (cursor ignored).
    pub fn expect_no(&self, pattern: &str) {
        let log = self.serial.text();
        if let Some(pos) = log.find(pattern) {
            let line_start = log[..pos].rfind('\n').map_or(0, |i| i + 1);
            let line_end = log[pos..].find('\n').map_or(log.len(), |i| pos + i);
            panic!(
                "[{}] the serial output contains {pattern:?}, which it must not; in line:\n{}\n\
                 (full serial log and QEMU command line follow)",
                self.name,
                log[line_start..line_end].trim_end_matches('\r'),
            );
        }
    }

    /// The number of (non-overlapping) occurrences of `pattern` in the whole serial output so far.
    pub fn count(&self, pattern: &str) -> usize {
        if pattern.is_empty() {
            return 0;
        }
        self.serial.text().matches(pattern).count()
    }

    /// Writes `bytes` to the serial port (QEMU's stdin). Panics if QEMU no longer reads it.
    pub fn send(&self, bytes: &[u8]) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let result = match stdin.as_mut() {
            Some(pipe) => pipe.write_all(bytes).and_then(|()| pipe.flush()),
            None => Err(std::io::Error::other("QEMU's stdin is closed")),
        };
        if let Err(e) = result {
            drop(stdin);
            let status = match lock_proc(&self.proc).poll() {
                None => "still running".to_string(),
                status => describe_status(status, self.killed_by_harness.load(Ordering::SeqCst)),
            };
            panic!(
                "[{}] cannot write {} bytes to QEMU's serial port: {e}; QEMU {status}",
                self.name,
                bytes.len(),
            );
        }
    }

    /// The whole serial output so far (lossy UTF-8).
    pub fn serial(&self) -> String {
        self.serial.text()
    }

    /// True once QEMU's serial output has ended (QEMU exited).
    pub fn has_exited(&self) -> bool {
        self.serial.lock().eof
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_takes_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "(none)");
    }
}
