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
                    let rest = &input[i..];
                    match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
                        None => {
                            out.extend_from_slice(rest);
                            i = input.len();
                        }
                        Some(p) => {
                            out.extend_from_slice(&rest[..p]);
                            i += p + 1;
                            if rest[p] == b'\r' {
                                self.state = State::Cr;
                            } else {
                                out.push(b'\n');
                                self.bare = true;
                            }
                        }
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
