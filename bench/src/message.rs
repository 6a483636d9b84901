//! Test messages for the load generator: the envelope and an RFC 5322 message of an exact size,
//! rendered from a template with a per-message sequence number. The text never puts a `.` at the
//! start of a line, so it goes into SMTP DATA without dot-stuffing. Pure; no I/O.

use thiserror::Error;

/// Envelope sender of every bench message.
pub const SENDER: &str = "bench-sender@bench.example";
/// Domain of the bench recipients (`.example` is reserved, so nothing real is ever addressed).
pub const RECIPIENT_DOMAIN: &str = "bench.example";
/// Width of the zero-padded sequence number written into Subject and Message-ID.
const SEQ_DIGITS: usize = 12;
/// Line length of the body filler (without CRLF), well under the 998 limit.
const LINE: usize = 76;
/// Filler text; starts with a letter so no body line starts with `.`.
const FILLER: &[u8] = b"Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message size {size} is smaller than the {min} bytes the headers need")]
    TooSmall { size: usize, min: usize },
    #[error("a message needs at least one recipient")]
    NoRecipients,
}

/// The recipients of one message: `rcpt-<i>@bench.example`.
pub fn recipients(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("rcpt-{i}@{RECIPIENT_DOMAIN}")).collect()
}

/// A message of a fixed size whose sequence number is patched in per copy.
#[derive(Clone, Debug)]
pub struct MessageTemplate {
    bytes: Vec<u8>,
    seq_offsets: Vec<usize>,
}

impl MessageTemplate {
    /// Builds a message of exactly `size` bytes (headers, blank line and body, CRLF line ends,
    /// without the DATA terminator) addressed to `rcpts`.
    pub fn new(size: usize, rcpts: &[String]) -> Result<Self, MessageError> {
        let first = rcpts.first().ok_or(MessageError::NoRecipients)?;
        let placeholder = "0".repeat(SEQ_DIGITS);
        let more = if rcpts.len() > 1 {
            format!(" (+{} more)", rcpts.len() - 1)
        } else {
            String::new()
        };
        let subject_prefix = "Subject: mailroute bench message ";
        let id_prefix = "Message-ID: <";
        let head_top = format!("From: Bench <{SENDER}>\r\nTo: <{first}>{more}\r\n");
        let mut bytes = head_top.into_bytes();
        let mut seq_offsets = Vec::with_capacity(2);
        bytes.extend_from_slice(subject_prefix.as_bytes());
        seq_offsets.push(bytes.len());
        bytes.extend_from_slice(placeholder.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(id_prefix.as_bytes());
        seq_offsets.push(bytes.len());
        bytes.extend_from_slice(placeholder.as_bytes());
        bytes.extend_from_slice(b"@bench.example>\r\n");
        bytes.extend_from_slice(
            b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n\
              Content-Type: text/plain; charset=us-ascii\r\n\r\n",
        );
        // The smallest body is one "x\r\n" line.
        let min = bytes.len() + 3;
        if size < min {
            return Err(MessageError::TooSmall { size, min });
        }
        let mut remaining = size - bytes.len();
        let mut filler = FILLER.iter().cycle();
        while remaining > 0 {
            // Each line is at least one character plus CRLF; never leave a remainder of 1 or 2
            // bytes, which could not form a line.
            let mut len = remaining.min(LINE + 2) - 2;
            let after = remaining - (len + 2);
            if after > 0 && after < 3 {
                len -= 3 - after;
            }
            bytes.extend(filler.by_ref().take(len));
            bytes.extend_from_slice(b"\r\n");
            remaining -= len + 2;
        }
        Ok(Self { bytes, seq_offsets })
    }

    /// Size of the message in bytes (without the DATA terminator).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a template holds at least its headers.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Replaces `out` with message number `seq` followed by the DATA terminator `.\r\n`.
    pub fn render_data(&self, seq: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.bytes);
        let digits = format!("{:0width$}", seq % 10u64.pow(SEQ_DIGITS as u32), width = SEQ_DIGITS);
        for &off in &self.seq_offsets {
            out[off..off + SEQ_DIGITS].copy_from_slice(digits.as_bytes());
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The pipelined command group of one transaction: MAIL, every RCPT, DATA.
pub fn envelope_commands(rcpts: &[String]) -> Vec<u8> {
    let mut out = format!("MAIL FROM:<{SENDER}>\r\n").into_bytes();
    for r in rcpts {
        out.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
    }
    out.extend_from_slice(b"DATA\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exact_size_for_many_sizes() {
        let rcpts = recipients(1);
        for size in [300, 301, 302, 303, 1000, 1024, 4096, 10 * 1024, 100_000] {
            let t = MessageTemplate::new(size, &rcpts).unwrap();
            let mut out = Vec::new();
            t.render_data(7, &mut out);
            assert_eq!(out.len(), size + 3, "size {size}");
            assert!(out.ends_with(b"\r\n.\r\n"));
        }
    }

    #[test]
    fn lines_are_crlf_short_and_never_start_with_a_dot() {
        let t = MessageTemplate::new(10 * 1024, &recipients(3)).unwrap();
        let mut out = Vec::new();
        t.render_data(1, &mut out);
        let body = &out[..out.len() - 3];
        for line in body.split(|&b| b == b'\n') {
            if line.is_empty() {
                continue; // after the final LF
            }
            assert!(line.ends_with(b"\r"), "bare LF in {:?}", String::from_utf8_lossy(line));
            assert!(line.len() <= 998);
            assert!(!line.starts_with(b"."));
        }
        // The only terminator is the final one.
        assert_eq!(memchr::memmem::find_iter(&out, b"\r\n.\r\n").count(), 1);
    }

    #[test]
    fn sequence_number_is_patched_into_subject_and_message_id() {
        let t = MessageTemplate::new(2000, &recipients(2)).unwrap();
        let mut out = Vec::new();
        t.render_data(42, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Subject: mailroute bench message 000000000042\r\n"));
        assert!(text.contains("Message-ID: <000000000042@bench.example>\r\n"));
        assert!(text.contains("To: <rcpt-0@bench.example> (+1 more)\r\n"));
    }

    #[test]
    fn rejects_impossible_templates() {
        assert!(matches!(
            MessageTemplate::new(10, &recipients(1)),
            Err(MessageError::TooSmall { .. })
        ));
        assert_eq!(MessageTemplate::new(1000, &[]).unwrap_err(), MessageError::NoRecipients);
    }

    #[test]
    fn envelope_group_lists_every_recipient_then_data() {
        let cmds = envelope_commands(&recipients(2));
        assert_eq!(
            String::from_utf8(cmds).unwrap(),
            "MAIL FROM:<bench-sender@bench.example>\r\nRCPT TO:<rcpt-0@bench.example>\r\n\
             RCPT TO:<rcpt-1@bench.example>\r\nDATA\r\n"
        );
    }
}
