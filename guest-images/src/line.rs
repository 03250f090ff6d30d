//! Assembling received console bytes into lines, and printing arbitrary bytes safely: the
//! portable half of the `echo` guest.

use core::fmt;

/// Longest line kept; a longer run of bytes without a line end is cut into lines of this length.
pub const LINE_MAX: usize = 120;

/// Collects bytes into lines. `\n` and `\r` both end a line (so `\r\n` from a terminal works);
/// empty lines are dropped; [`LINE_MAX`] bytes without a line end make a line of their own.
#[derive(Debug, Clone)]
pub struct LineAssembler {
    buf: [u8; LINE_MAX],
    len: usize,
    /// The last call returned the buffer as a line: start over at the next byte.
    complete: bool,
}

impl Default for LineAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl LineAssembler {
    /// An empty assembler.
    pub const fn new() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
            complete: false,
        }
    }

    /// Adds one received byte; returns the line it completes, if any (valid until the next
    /// call).
    pub fn push(&mut self, byte: u8) -> Option<&[u8]> {
        if self.complete {
            self.len = 0;
            self.complete = false;
        }
        if byte == b'\n' || byte == b'\r' {
            if self.len == 0 {
                return None;
            }
            self.complete = true;
            return Some(&self.buf[..self.len]);
        }
        // `len < LINE_MAX` here: a full buffer was returned as a line and reset above.
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
        if self.len == LINE_MAX {
            self.complete = true;
            return Some(&self.buf[..self.len]);
        }
        None
    }

    /// The bytes of the line still being typed.
    pub fn pending(&self) -> &[u8] {
        if self.complete {
            &[]
        } else {
            &self.buf[..self.len]
        }
    }
}

/// Displays bytes as text: printable ASCII as is (a backslash doubled), anything else as
/// `\xNN`, so a received line can never inject control characters into the console.
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            match b {
                b'\\' => f.write_str("\\\\")?,
                0x20..=0x7e => fmt::Write::write_char(f, char::from(b))?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines_of(input: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut a = LineAssembler::new();
        let mut out = Vec::new();
        for &b in input {
            if let Some(line) = a.push(b) {
                out.push(line.to_vec());
            }
        }
        (out, a.pending().to_vec())
    }

    /// Reference model: split at every line end; each terminated piece gives its
    /// LINE_MAX-sized chunks; the unterminated tail gives its full chunks and leaves the rest
    /// pending.
    fn model(input: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let pieces: Vec<&[u8]> = input.split(|&b| b == b'\n' || b == b'\r').collect();
        let (tail, terminated) = pieces
            .split_last()
            .expect("split yields at least one piece");
        let mut out: Vec<Vec<u8>> = terminated
            .iter()
            .flat_map(|p| p.chunks(LINE_MAX).map(<[u8]>::to_vec))
            .collect();
        let full = tail.len() / LINE_MAX * LINE_MAX;
        out.extend(tail[..full].chunks(LINE_MAX).map(<[u8]>::to_vec));
        (out, tail[full..].to_vec())
    }

    #[test]
    fn examples() {
        assert_eq!(lines_of(b"hello\n"), (vec![b"hello".to_vec()], vec![]));
        assert_eq!(
            lines_of(b"a\r\n\nb\rquit"),
            (vec![b"a".to_vec(), b"b".to_vec()], b"quit".to_vec())
        );
        let long = [b'x'; LINE_MAX + 3];
        assert_eq!(
            lines_of(&long),
            (vec![vec![b'x'; LINE_MAX]], b"xxx".to_vec())
        );
        assert_eq!(
            Printable(b"ok \\ \x1b[2J\xff").to_string(),
            "ok \\\\ \\x1b[2J\\xff"
        );
    }

    proptest! {
        #[test]
        fn matches_the_model(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), any::<u8>()], 0..400)
        ) {
            prop_assert_eq!(lines_of(&input), model(&input));
        }

        /// Printable output is printable ASCII only, and distinct inputs stay distinct.
        #[test]
        fn printable_is_ascii_and_injective(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            b in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let (sa, sb) = (Printable(&a).to_string(), Printable(&b).to_string());
            prop_assert!(sa.bytes().all(|c| (0x20..=0x7e).contains(&c)));
            prop_assert_eq!(sa == sb, a == b);
        }
    }
}
