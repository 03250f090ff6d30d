//! The monitor console's focus keys: what typed bytes do before they reach the focused VM.
//!
//! **Ctrl-T** moves the focus to the next VM at once (as it always did). Digits typed right
//! after it, ended by Enter, then jump to that VM instead: `Ctrl-T 1 2 Enter` focuses vm12.
//! Those digits are held back until it is clear what they are: Enter after them makes the
//! jump (the Enter is not sent on), and any other byte sends the held digits and itself on to
//! the VM that has the focus then (so typing a number after a Ctrl-T loses nothing). At most
//! [`MAX_DIGITS`] digits are held; one more sends them on.

use alloc::vec::Vec;

/// The key that moves the focus: Ctrl-T.
pub const FOCUS_KEY: u8 = 0x14;
/// Most digits of a VM id after Ctrl-T (u32 has 10).
pub const MAX_DIGITS: usize = 10;

/// What a typed byte makes the monitor do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FocusAction {
    /// Move the focus to the next VM.
    Next,
    /// Move the focus to vmN.
    Jump(u32),
    /// Send these bytes to the focused VM.
    Send(Vec<u8>),
}

/// The state of the focus keys between typed bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FocusKeys {
    /// Just after Ctrl-T: the digits typed since (`None`: not after a Ctrl-T).
    held: Option<Vec<u8>>,
}

impl FocusKeys {
    /// No Ctrl-T pending.
    pub const fn new() -> Self {
        Self { held: None }
    }

    /// Takes one typed byte; what it makes happen goes into `out`.
    pub fn feed(&mut self, b: u8, out: &mut Vec<FocusAction>) {
        if b == FOCUS_KEY {
            self.flush(out);
            self.held = Some(Vec::new());
            out.push(FocusAction::Next);
            return;
        }
        let Some(held) = self.held.as_mut() else {
            push_send(out, b);
            return;
        };
        if b.is_ascii_digit() && held.len() < MAX_DIGITS {
            held.push(b);
            return;
        }
        if (b == b'\r' || b == b'\n') && !held.is_empty() {
            let n = held.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            self.held = None;
            match u32::try_from(n) {
                Ok(id) => out.push(FocusAction::Jump(id)),
                // More than any VM id: nothing to jump to; the digits were not meant as input.
                Err(_) => out.push(FocusAction::Jump(u32::MAX)),
            }
            return;
        }
        self.flush(out);
        push_send(out, b);
    }

    /// Sends on the digits held since the last Ctrl-T, if any.
    fn flush(&mut self, out: &mut Vec<FocusAction>) {
        if let Some(held) = self.held.take() {
            for d in held {
                push_send(out, d);
            }
        }
    }
}

/// Appends `b` to the last `Send` of `out`, or starts one.
fn push_send(out: &mut Vec<FocusAction>, b: u8) {
    match out.last_mut() {
        Some(FocusAction::Send(v)) => v.push(b),
        _ => out.push(FocusAction::Send(alloc::vec![b])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn run(bytes: &[u8]) -> Vec<FocusAction> {
        let mut k = FocusKeys::new();
        let mut out = Vec::new();
        for &b in bytes {
            k.feed(b, &mut out);
        }
        out
    }

    use FocusAction::{Jump, Next, Send};

    #[test]
    fn plain_bytes_go_to_the_focused_vm() {
        assert_eq!(run(b"ls\n"), vec![Send(b"ls\n".to_vec())]);
    }

    #[test]
    fn ctrl_t_moves_at_once_and_digits_then_enter_jump() {
        assert_eq!(run(b"\x14"), vec![Next]);
        assert_eq!(run(b"\x1412\r"), vec![Next, Jump(12)]);
        assert_eq!(run(b"\x143\n"), vec![Next, Jump(3)]);
        assert_eq!(
            run(b"a\x147\rb"),
            vec![Send(b"a".to_vec()), Next, Jump(7), Send(b"b".to_vec())]
        );
    }

    #[test]
    fn digits_not_ended_by_enter_are_sent_on_whole() {
        // Typed after a Ctrl-T, a number and a space: the next VM gets all of it.
        assert_eq!(run(b"\x1442 x"), vec![Next, Send(b"42 x".to_vec())]);
        // Enter with no digits is plain input.
        assert_eq!(run(b"\x14\n"), vec![Next, Send(b"\n".to_vec())]);
        // A second Ctrl-T sends the held digits first, then moves again.
        assert_eq!(run(b"\x149\x14"), vec![Next, Send(b"9".to_vec()), Next]);
        // Too many digits: sent on.
        let mut long = vec![FOCUS_KEY];
        long.extend_from_slice(b"12345678901\r");
        assert_eq!(run(&long), vec![Next, Send(b"12345678901\r".to_vec())]);
    }

    #[test]
    fn an_id_too_large_jumps_nowhere() {
        assert_eq!(run(b"\x149999999999\r"), vec![Next, Jump(u32::MAX)]);
    }
}
