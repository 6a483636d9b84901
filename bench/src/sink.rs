//! The SMTP protocol of the bench sink as a pure state machine: bytes in, replies out, plus the
//! count of messages, recipients and bytes it accepted. It accepts every well-formed transaction
//! and keeps nothing. Handles pipelined input (any number of commands per read) and DATA split
//! at any byte. No I/O here; `sink_server` owns the sockets.

use memchr::memmem;

/// Longest command line accepted before the session is dropped.
const MAX_LINE: usize = 4096;

/// Greeting sent when a session opens.
pub const GREETING: &[u8] = b"220 sink.bench.example ESMTP mailroute-bench sink\r\n";

const EHLO_REPLY: &[u8] = b"250-sink.bench.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
250-ENHANCEDSTATUSCODES\r\n250-SIZE 104857600\r\n250 SMTPUTF8\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading commands; `rcpts` counts the recipients of the open transaction, if any.
    Command { mail: bool, rcpts: u64 },
    /// Inside DATA; `line_start` while nothing of the body has been consumed yet.
    Data { rcpts: u64, line_start: bool, bytes: u64 },
}

/// What one call to [`SinkSession::feed`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the input consumed; the rest must be offered again with more data appended.
    pub consumed: usize,
    /// The session is over (QUIT, or a protocol violation); close after writing the replies.
    pub close: bool,
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
}

/// One session's protocol state.
#[derive(Clone, Debug)]
pub struct SinkSession {
    state: State,
}

impl Default for SinkSession {
    fn default() -> Self {
        Self {
            state: State::Command { mail: false, rcpts: 0 },
        }
    }
}

impl SinkSession {
    /// Consumes as much of `input` as forms complete commands or DATA, appending the replies to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Fed {
        let mut fed = Fed::default();
        while fed.consumed < input.len() && !fed.close {
            let rest = &input[fed.consumed..];
            match self.state {
                State::Command { mail, rcpts } => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        if rest.len() > MAX_LINE {
                            out.extend_from_slice(b"500 5.5.6 line too long\r\n");
                            fed.close = true;
                        }
                        break;
                    };
                    fed.consumed += nl + 1;
                    let line = trim_crlf(&rest[..=nl]);
                    fed.close = self.command(line, mail, rcpts, out);
                }
                State::Data {
                    rcpts,
                    line_start,
                    bytes,
                } => {
                    if line_start {
                        if rest.len() < 3 {
                            break;
                        }
                        if rest.starts_with(b".\r\n") {
                            fed.consumed += 3;
                            self.finish(rcpts, 0, &mut fed, out);
                            continue;
                        }
                    }
                    match memmem::find(rest, b"\r\n.\r\n") {
                        Some(i) => {
                            fed.consumed += i + 5;
                            self.finish(rcpts, bytes + i as u64 + 2, &mut fed, out);
                        }
                        None => {
                            // Keep the last 4 bytes: they may begin the terminator.
                            let take = rest.len().saturating_sub(4);
                            if take == 0 {
                                break;
                            }
                            fed.consumed += take;
                            self.state = State::Data {
                                rcpts,
                                line_start: false,
                                bytes: bytes + take as u64,
                            };
                        }
                    }
                }
            }
        }
        fed
    }

    fn finish(&mut self, rcpts: u64, bytes: u64, fed: &mut Fed, out: &mut Vec<u8>) {
        fed.messages += 1;
        fed.recipients += rcpts;
        fed.bytes += bytes;
        out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
        self.state = State::Command { mail: false, rcpts: 0 };
    }

    /// Handles one command line; returns true when the session must close.
    fn command(&mut self, line: &[u8], mail: bool, rcpts: u64, out: &mut Vec<u8>) -> bool {
        let verb = line.get(..4).unwrap_or(line);
        let is = |v: &[u8]| verb.eq_ignore_ascii_case(v);
        if is(b"EHLO") {
            self.state = State::Command { mail: false, rcpts: 0 };
            out.extend_from_slice(EHLO_REPLY);
        } else if is(b"HELO") {
            self.state = State::Command { mail: false, rcpts: 0 };
            out.extend_from_slice(b"250 sink.bench.example\r\n");
        } else if is(b"MAIL") {
            if mail {
                out.extend_from_slice(b"503 5.5.1 nested MAIL command\r\n");
            } else {
                self.state = State::Command { mail: true, rcpts: 0 };
                out.extend_from_slice(b"250 2.1.0 Ok\r\n");
            }
        } else if is(b"RCPT") {
            if mail {
                self.state = State::Command { mail, rcpts: rcpts + 1 };
                out.extend_from_slice(b"250 2.1.5 Ok\r\n");
            } else {
                out.extend_from_slice(b"503 5.5.1 need MAIL command\r\n");
            }
        } else if is(b"DATA") {
            if rcpts > 0 {
                self.state = State::Data {
                    rcpts,
                    line_start: true,
                    bytes: 0,
                };
                out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
            } else {
                out.extend_from_slice(b"503 5.5.1 need RCPT command\r\n");
            }
        } else if is(b"RSET") {
            self.state = State::Command { mail: false, rcpts: 0 };
            out.extend_from_slice(b"250 2.0.0 Ok\r\n");
        } else if is(b"NOOP") {
            out.extend_from_slice(b"250 2.0.0 Ok\r\n");
        } else if is(b"VRFY") {
            out.extend_from_slice(b"252 2.0.0 Ok\r\n");
        } else if is(b"QUIT") {
            out.extend_from_slice(b"221 2.0.0 Bye\r\n");
            return true;
        } else {
            out.extend_from_slice(b"500 5.5.2 command not recognized\r\n");
        }
        false
    }
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessageTemplate, envelope_commands, recipients};

    fn transcript(rcpts: usize, size: usize) -> Vec<u8> {
        let rcpts = recipients(rcpts);
        let mut input = b"EHLO client\r\n".to_vec();
        input.extend(envelope_commands(&rcpts));
        let mut data = Vec::new();
        MessageTemplate::new(size, &rcpts).unwrap().render_data(1, &mut data);
        input.extend(data);
        input
    }

    #[test]
    fn a_pipelined_transaction_in_one_read_is_accepted_and_counted() {
        let mut s = SinkSession::default();
        let mut out = Vec::new();
        let mut input = transcript(2, 1000);
        input.extend_from_slice(b"QUIT\r\n");
        let fed = s.feed(&input, &mut out);
        assert_eq!(fed.consumed, input.len());
        assert!(fed.close);
        assert_eq!((fed.messages, fed.recipients, fed.bytes), (1, 2, 1000));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("250-PIPELINING\r\n"));
        assert!(text.ends_with("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n"));
    }

    #[test]
    fn input_split_at_every_byte_gives_the_same_result() {
        let mut input = transcript(1, 700);
        input.extend(transcript(3, 500).split_off(b"EHLO client\r\n".len()));
        let mut whole_out = Vec::new();
        let whole = SinkSession::default().feed(&input, &mut whole_out);
        assert_eq!((whole.messages, whole.recipients, whole.bytes), (2, 4, 1200));

        // Feed one byte at a time, re-offering what was not consumed, as the server loop does.
        let mut s = SinkSession::default();
        let mut out = Vec::new();
        let mut pending = Vec::new();
        let (mut messages, mut rcpts, mut bytes) = (0, 0, 0);
        for &b in &input {
            pending.push(b);
            let fed = s.feed(&pending, &mut out);
            pending.drain(..fed.consumed);
            messages += fed.messages;
            rcpts += fed.recipients;
            bytes += fed.bytes;
        }
        assert!(pending.is_empty());
        assert_eq!((messages, rcpts, bytes), (2, 4, 1200));
        assert_eq!(out, whole_out);
    }

    #[test]
    fn an_empty_body_ends_at_the_first_dot_line() {
        let mut s = SinkSession::default();
        let mut out = Vec::new();
        let input = b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\nNOOP\r\n";
        let fed = s.feed(input, &mut out);
        assert_eq!((fed.consumed, fed.messages, fed.bytes), (input.len(), 1, 0));
        assert!(
            String::from_utf8(out)
                .unwrap()
                .ends_with("250 2.0.0 Ok: queued\r\n250 2.0.0 Ok\r\n")
        );
    }

    #[test]
    fn out_of_order_commands_are_refused() {
        let mut s = SinkSession::default();
        let mut out = Vec::new();
        let fed = s.feed(
            b"RCPT TO:<c@d>\r\nDATA\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nDATA\r\nFOO\r\n",
            &mut out,
        );
        assert_eq!(fed.messages, 0);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "503 5.5.1 need MAIL command\r\n503 5.5.1 need RCPT command\r\n250 2.1.0 Ok\r\n\
             503 5.5.1 nested MAIL command\r\n503 5.5.1 need RCPT command\r\n500 5.5.2 command not recognized\r\n"
        );
    }

    #[test]
    fn an_endless_line_closes_the_session() {
        let mut s = SinkSession::default();
        let mut out = Vec::new();
        let fed = s.feed(&vec![b'a'; MAX_LINE + 1], &mut out);
        assert!(fed.close);
        assert_eq!(out, b"500 5.5.6 line too long\r\n");
    }
}
