//! Message content on the wire, both ways (RFC 5321 §4.5.2 transparency, §2.3.8 line
//! endings): [`DataReceiver`] undoes the dot-stuffing of an inbound message and finds its end;
//! [`mailroute_smtp::wire::write_dot_stuffed`] (the outbound client's) applies it to an outbound one.
//!
//! Only CRLF ends a line. The first line of the content starts a line like any other, so `..x`
//! there is `.x`, and `.` CRLF right after the 354 is an empty message. A bare CR or bare LF is
//! kept as content and reported by [`DataReceiver::saw_bare_line_ending`]; the inbound session
//! refuses such a message with a 5xx (RFC 5321 §2.3.8: they must not be sent), rather than
//! normalising it: the sender and each upstream may read its lines (and so its dots and its
//! end of data) differently, which is how SMTP smuggling works. Nothing here rewrites a byte.
//!
//! smtp-proto's `DataReceiver` and mail-send's `write_message` are not used: the first did not
//! treat the first line as a line start (a first line `..x` stayed `..x`, and `DATA` followed by
//! `.` hung until the timeout); the second did not stuff a dot on the first line.
//!
//! This module is pure (the writer is given); it must not decide what to do with a message.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line (the content's first byte, or after CRLF).
    LineStart,
    /// A `.` at the start of a line was read.
    Dot,
    /// `.` CR at the start of a line was read.
    DotCr,
    /// Inside a line.
    Text,
    /// A CR inside a line was read (not yet written out: CRLF or a bare CR).
    Cr,
}

/// Reads DATA content up to its terminating `CRLF . CRLF`, removing the stuffed dots.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    bare: bool,
}

impl Default for DataReceiver {
    fn default() -> Self {
        Self::new()
    }
}

impl DataReceiver {
    pub fn new() -> Self {
        DataReceiver {
            state: State::LineStart,
            bare: false,
        }
    }

    /// Appends the content in `input` to `out`. Returns how many bytes were consumed and
    /// whether the end of data was reached (bytes after it are left unconsumed: pipelined
    /// commands). The content keeps the CRLF of its last line.
    pub fn ingest(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Text => {
                    // Scan whole lines at once: a CRLF followed by anything but a dot changes
                    // nothing (the next line starts as text), so only the other line endings
                    // and the end of the input stop the scan.
                    let start = i;
                    let mut from = i;
                    loop {
                        let Some(p) = memchr::memchr2(b'\r', b'\n', &input[from..]) else {
                            out.extend_from_slice(&input[start..]);
                            i = input.len();
                            break;
                        };
                        let at = from + p;
                        if input[at] == b'\r'
                            && input.get(at + 1) == Some(&b'\n')
                            && input.get(at + 2).is_some_and(|&next| next != b'.')
                        {
                            from = at + 2;
                            continue;
                        }
                        out.extend_from_slice(&input[start..at]);
                        i = at + 1;
                        if input[at] == b'\r' {
                            self.state = State::Cr;
                        } else {
                            out.push(b'\n');
                            self.bare = true;
                        }
                        break;
                    }
                }
                State::Cr => {
                    if input[i] == b'\n' {
                        out.extend_from_slice(b"\r\n");
                        i += 1;
                        self.state = State::LineStart;
                    } else {
                        out.push(b'\r');
                        self.bare = true;
                        self.state = State::Text;
                    }
                }
                State::LineStart => {
                    if input[i] == b'.' {
                        i += 1;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Text;
                    }
                }
                // A dot followed by anything but CRLF was stuffing: it is dropped.
                State::Dot => {
                    if input[i] == b'\r' {
                        i += 1;
                        self.state = State::DotCr;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        self.state = State::LineStart;
                        return (i + 1, true);
                    }
                    out.push(b'\r');
                    self.bare = true;
                    self.state = State::Text;
                }
            }
        }
        (i, false)
    }

    /// Whether the content had a CR not followed by LF, or an LF not preceded by CR.
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare
    }
}

#[cfg(test)]
mod tests {
    use mailroute_smtp::wire::write_dot_stuffed;

    use super::*;

    /// Feeds `chunks` one after the other; returns the content, whether it ended, the bytes
    /// left over after the end, and whether a bare line ending was seen.
    fn receive(chunks: &[&[u8]]) -> (Vec<u8>, bool, Vec<u8>, bool) {
        let mut r = DataReceiver::new();
        let mut out = Vec::new();
        for (n, chunk) in chunks.iter().enumerate() {
            let (used, done) = r.ingest(chunk, &mut out);
            if done {
                let mut rest = chunk[used..].to_vec();
                for later in &chunks[n + 1..] {
                    rest.extend_from_slice(later);
                }
                return (out, true, rest, r.saw_bare_line_ending());
            }
            assert_eq!(used, chunk.len(), "all input is consumed before the end");
        }
        (out, false, Vec::new(), r.saw_bare_line_ending())
    }

    #[test]
    fn first_line_is_a_line_start() {
        assert_eq!(
            receive(&[b"..hidden\r\nx\r\n.\r\n"]),
            (b".hidden\r\nx\r\n".to_vec(), true, vec![], false)
        );
        assert_eq!(
            receive(&[b".\r\nQUIT\r\n"]),
            (vec![], true, b"QUIT\r\n".to_vec(), false)
        );
        // A lone stuffed dot on the first line of content.
        assert_eq!(receive(&[b"..\r\n.\r\n"]), (b".\r\n".to_vec(), true, vec![], false));
    }

    #[test]
    fn unstuffs_every_line_start_and_ends_only_at_crlf_dot_crlf() {
        let (body, done, rest, bare) = receive(&[b"a\r\n..b\r\n...\r\n\r\n.\r\nNOOP\r\n"]);
        assert_eq!(body, b"a\r\n.b\r\n..\r\n\r\n");
        assert!(done && !bare);
        assert_eq!(rest, b"NOOP\r\n");
    }

    #[test]
    fn every_split_of_the_input_gives_the_same_result() {
        let input: &[u8] = b"..one\r\ntwo.\r\n..\r\n.x\r\n.\r\nRSET\r\n";
        let whole = receive(&[input]);
        assert_eq!(whole.0, b".one\r\ntwo.\r\n.\r\nx\r\n");
        for cut in 0..input.len() {
            assert_eq!(receive(&[&input[..cut], &input[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(receive(&bytes), whole);
    }

    #[test]
    fn bare_cr_and_lf_are_content_and_reported_never_an_end() {
        for (input, body) in [
            (&b"a\n.\r\nb\r\n.\r\n"[..], &b"a\n.\r\nb\r\n"[..]),
            (b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n"),
            (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),
            (b"\n.\r\n.\r\n", b"\n.\r\n"),
            (b".\n.\r\n.\r\n", b"\n.\r\n"),
            (b"x\r\n.\rMAIL\r\n.\r\n", b"x\r\n\rMAIL\r\n"),
        ] {
            let (got, done, rest, bare) = receive(&[input]);
            assert!(done, "{:?}", String::from_utf8_lossy(input));
            assert!(bare, "{:?}", String::from_utf8_lossy(input));
            assert!(rest.is_empty());
            assert_eq!(got, body, "{:?}", String::from_utf8_lossy(input));
        }
        assert!(!receive(&[b"a\r\n\r\n.\r\n"]).3);
    }

    #[test]
    fn unfinished_content_is_not_an_end() {
        for input in [&b""[..], b".", b".\r", b"a\r\n.", b"a\r\n.\r", b"a\n.\n"] {
            assert!(!receive(&[input]).1, "{:?}", String::from_utf8_lossy(input));
        }
    }

    /// The rule of the module doc, byte by byte over the whole input: the content, where the
    /// end of data ends (its index after `.` CRLF), and whether a bare line ending was seen.
    fn by_the_rule(input: &[u8]) -> (Vec<u8>, Option<usize>, bool) {
        let (mut out, mut bare, mut line_start, mut i) = (Vec::new(), false, true, 0);
        while i < input.len() {
            let at_line_start = std::mem::replace(&mut line_start, false);
            if at_line_start && input[i] == b'.' {
                if input[i + 1..].starts_with(b"\r\n") {
                    return (out, Some(i + 3), bare);
                }
                i += 1;
                continue;
            }
            if input[i..].starts_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
                i += 2;
                line_start = true;
                continue;
            }
            bare |= input[i] == b'\r' || input[i] == b'\n';
            out.push(input[i]);
            i += 1;
        }
        (out, None, bare)
    }

    /// `input` then an end of data and a pipelined command, received whole and cut at every
    /// position (and at every pair of positions when `pairs`), must give what the rule gives.
    fn agrees_with_the_rule(input: &[u8], pairs: bool) {
        let mut wire = input.to_vec();
        wire.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let (body, end, bare) = by_the_rule(&wire);
        let end = end.expect("the appended end of data is found");
        let want = (body, true, wire[end..].to_vec(), bare);
        let show = String::from_utf8_lossy(&wire).into_owned();
        assert_eq!(receive(&[&wire]), want, "{show:?}");
        for a in 0..=wire.len() {
            assert_eq!(receive(&[&wire[..a], &wire[a..]]), want, "{show:?} cut at {a}");
            if pairs {
                for b in a..=wire.len() {
                    let got = receive(&[&wire[..a], &wire[a..b], &wire[b..]]);
                    assert_eq!(got, want, "{show:?} cut at {a} and {b}");
                }
            }
        }
    }

    #[test]
    fn every_short_input_is_received_as_the_byte_by_byte_rule_says() {
        // Every string of up to 6 bytes over dot, CR, LF and a letter: dots at line starts
        // and not, bare CR and LF, CR as the last byte of a chunk, ends inside the input.
        let alphabet = [b'.', b'\r', b'\n', b'a'];
        for len in 0..=6u32 {
            for mut k in 0..alphabet.len().pow(len) {
                let mut input = Vec::new();
                for _ in 0..len {
                    input.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                agrees_with_the_rule(&input, len <= 4);
            }
        }
    }

    #[test]
    fn long_lines_with_dots_are_received_as_the_byte_by_byte_rule_says() {
        let mut input = Vec::new();
        for n in 0..40 {
            let dots = ".".repeat(n % 4);
            let text = "x".repeat(n * 7 % 90);
            input.extend_from_slice(format!("{dots}{text}.{dots}\r\n").as_bytes());
            if n % 9 == 0 {
                input.extend_from_slice(b"\r\n..\r\n.\r\r\n.\nbare\r\n");
            }
        }
        agrees_with_the_rule(&input, false);
        agrees_with_the_rule(&input[..input.len() - 2], false);
    }

    async fn stuffed(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_dot_stuffed(&mut out, message).await.unwrap();
        out
    }

    #[tokio::test]
    async fn stuffs_line_starts_including_the_first_line() {
        assert_eq!(stuffed(b".hidden\r\n").await, b"..hidden\r\n.\r\n");
        assert_eq!(stuffed(b"a\r\n.\r\n..b\r\n").await, b"a\r\n..\r\n...b\r\n.\r\n");
        assert_eq!(stuffed(b"no final crlf").await, b"no final crlf\r\n.\r\n");
        assert_eq!(stuffed(b"").await, b".\r\n");
        assert_eq!(stuffed(b"a.b\r\n").await, b"a.b\r\n.\r\n");
        // Defence in depth: a dot after a bare CR or LF is stuffed too.
        assert_eq!(stuffed(b"a\n.\r\n").await, b"a\n..\r\n.\r\n");
        assert_eq!(stuffed(b"a\r.\r\n").await, b"a\r..\r\n.\r\n");
    }

    #[tokio::test]
    async fn stuffing_then_receiving_gives_the_message_back() {
        for message in [
            &b".hidden\r\n"[..],
            b"\r\n",
            b"a\r\n.\r\n..\r\n.b\r\n",
            b"Subject: x\r\n\r\n.\r\n",
        ] {
            let wire = stuffed(message).await;
            let (body, done, rest, bare) = receive(&[&wire]);
            assert!(done && rest.is_empty() && !bare);
            assert_eq!(body, message);
        }
    }
}
