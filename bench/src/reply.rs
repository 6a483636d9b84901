//! SMTP reply lines as the load generator reads them: the three-digit code and whether the line
//! ends a (possibly multi-line) reply. Pure; no I/O.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed SMTP reply line {0:?}")]
pub struct ReplyError(pub String);

/// One parsed line of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    /// `false` for `250-…` continuation lines.
    pub last: bool,
}

/// Parses `250 ok\r\n`, `250-PIPELINING\r\n` or a bare `250\r\n`.
pub fn parse_reply_line(line: &[u8]) -> Result<ReplyLine, ReplyError> {
    let bad = || ReplyError(String::from_utf8_lossy(line).into_owned());
    let trimmed = line.strip_suffix(b"\n").unwrap_or(line);
    let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
    if trimmed.len() < 3 || !trimmed[..3].iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let code = trimmed[..3].iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let last = match trimmed.get(3) {
        None | Some(b' ') => true,
        Some(b'-') => false,
        Some(_) => return Err(bad()),
    };
    Ok(ReplyLine { code, last })
}

/// Whether a multi-line EHLO reply line announces `keyword` (e.g. `PIPELINING`).
pub fn ehlo_line_has(line: &[u8], keyword: &str) -> bool {
    let text = line.get(4..).unwrap_or_default();
    let word = text.split(|b| b.is_ascii_whitespace()).next().unwrap_or_default();
    word.eq_ignore_ascii_case(keyword.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_last_and_continuation_lines() {
        assert_eq!(
            parse_reply_line(b"250 2.0.0 Ok\r\n").unwrap(),
            ReplyLine { code: 250, last: true }
        );
        assert_eq!(
            parse_reply_line(b"250-PIPELINING\r\n").unwrap(),
            ReplyLine { code: 250, last: false }
        );
        assert_eq!(
            parse_reply_line(b"354\r\n").unwrap(),
            ReplyLine { code: 354, last: true }
        );
        assert_eq!(
            parse_reply_line(b"421 bye").unwrap(),
            ReplyLine { code: 421, last: true }
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_reply_line(b"25\r\n").is_err());
        assert!(parse_reply_line(b"abc ok\r\n").is_err());
        assert!(parse_reply_line(b"250xok\r\n").is_err());
    }

    #[test]
    fn finds_ehlo_keywords_case_insensitively() {
        assert!(ehlo_line_has(b"250-PIPELINING\r\n", "PIPELINING"));
        assert!(ehlo_line_has(b"250 pipelining\r\n", "PIPELINING"));
        assert!(!ehlo_line_has(b"250-SIZE 1000\r\n", "PIPELINING"));
        assert!(!ehlo_line_has(b"250-PIPELININGX\r\n", "PIPELINING"));
        assert!(!ehlo_line_has(b"250\r\n", "PIPELINING"));
    }
}
