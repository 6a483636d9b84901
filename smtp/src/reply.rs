//! The SMTP reply, one type for every side of the relay: what the inbound session answers, what
//! an upstream answered, what bounce classification, DSN diagnostics and the delivery log read.
//!
//! The RFC 3463 enhanced status code is parsed once, where a reply is made or read off the wire
//! ([`Reply::new`], [`parse_replies`]), and carried typed from there ([`Reply::enhanced`]):
//! nothing downstream looks for it in the text again. The text is kept as the server sent it
//! (after the basic code, multi-line replies joined), so logs and DSNs quote it unchanged.
//!
//! Pure: no I/O.

use std::fmt;

/// An RFC 3463 enhanced status code `class.subject.detail`, e.g. `5.1.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnhancedStatusCode {
    /// 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

/// The class of an enhanced status code (its first digit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Success,
    Transient,
    Permanent,
}

impl EnhancedStatusCode {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self { class, subject, detail }
    }

    /// Parses an enhanced code at the start of `text`, after an optional basic code and
    /// separator (`"550-5.1.1 ..."`, `"5.1.1 ..."`). Class must be 2, 4 or 5; subject and
    /// detail 1–3 digits; trailing `,;:.` after the code are allowed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut rest = text.trim_start();
        let b = rest.as_bytes();
        if b.len() >= 3
            && b[..3].iter().all(u8::is_ascii_digit)
            && b.get(3).is_none_or(|c| matches!(c, b' ' | b'-' | b'\t'))
        {
            rest = rest[3..].trim_start_matches(['-', ' ', '\t']);
        }
        let token = rest.split_ascii_whitespace().next()?;
        let token = token.trim_end_matches([',', ';', ':', '.']);
        let mut parts = token.split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let digits = |s: &str, max: usize| !s.is_empty() && s.len() <= max && s.bytes().all(|c| c.is_ascii_digit());
        if !digits(class, 1) || !digits(subject, 3) || !digits(detail, 3) {
            return None;
        }
        let class: u8 = class.parse().ok()?;
        if !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Self::new(class, subject.parse().ok()?, detail.parse().ok()?))
    }

    pub fn status_class(self) -> StatusClass {
        match self.class {
            2 => StatusClass::Success,
            5 => StatusClass::Permanent,
            _ => StatusClass::Transient,
        }
    }

    /// The same subject and detail under another class.
    pub const fn with_class(self, class: u8) -> Self {
        Self { class, ..self }
    }
}

impl fmt::Display for EnhancedStatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// An SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reply {
    /// Basic reply code, e.g. 550.
    pub code: u16,
    /// The enhanced status code the text starts with, if any.
    pub enhanced: Option<EnhancedStatusCode>,
    /// The text after the basic code as sent, continuation lines joined with spaces; it still
    /// starts with the enhanced code when there is one.
    pub text: String,
}

impl Reply {
    /// A reply with `text` after the code; its enhanced code is read from the start of `text`.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        let text = text.into();
        Self {
            code,
            enhanced: EnhancedStatusCode::parse(&text),
            text,
        }
    }

    /// A reply of our own with its enhanced code typed, not parsed: `code enhanced text`.
    pub fn with_code(code: u16, enhanced: EnhancedStatusCode, text: impl AsRef<str>) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            text: format!("{enhanced} {}", text.as_ref()),
        }
    }

    /// From one reply line `"451 4.7.1 text"`; `None` when it does not start with a code.
    pub fn from_line(line: &str) -> Option<Self> {
        let (code, text) = line.split_once(' ')?;
        if code.len() != 3 {
            return None;
        }
        Some(Self::new(code.parse().ok()?, text))
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// `550 5.1.1 text` on one line, as the server sent it.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{} {}", self.code, self.text)
        }
    }
}

/// Parses the last complete reply in `raw` (`NNN-...` lines ending with an `NNN ...` line).
/// The enhanced code repeated at the start of continuation lines is dropped; lines are joined
/// with a space.
pub fn parse_last_reply(raw: &[u8]) -> Option<Reply> {
    parse_replies(raw).pop()
}

/// Every complete reply in `raw`, in order (the answers to pipelined commands).
pub fn parse_replies(raw: &[u8]) -> Vec<Reply> {
    let text = String::from_utf8_lossy(raw);
    let lines: Vec<&str> = text.split('\n').map(|l| l.trim_end_matches('\r')).collect();
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        let b = line.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
            start = None;
            continue;
        }
        match b.get(3) {
            Some(b'-') => {
                start.get_or_insert(i);
            }
            None | Some(b' ') => {
                out.extend(reply_of(&lines[start.unwrap_or(i)..=i]));
                start = None;
            }
            _ => start = None,
        }
    }
    out
}

/// One reply from its lines (all starting with the same code).
fn reply_of(lines: &[&str]) -> Option<Reply> {
    let code: u16 = lines.first()?.get(..3)?.parse().ok()?;
    let mut enhanced_prefix: Option<String> = None;
    let mut parts: Vec<String> = Vec::new();
    for line in lines {
        let body = line.get(4..).unwrap_or("").trim();
        let body = match &enhanced_prefix {
            None => {
                if let Some(e) = EnhancedStatusCode::parse(body) {
                    enhanced_prefix = Some(e.to_string());
                }
                body.to_owned()
            }
            Some(prefix) => body.strip_prefix(prefix.as_str()).unwrap_or(body).trim().to_owned(),
        };
        if !body.is_empty() {
            parts.push(body);
        }
    }
    Some(Reply::new(code, parts.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(class: u8, subject: u16, detail: u16) -> Option<EnhancedStatusCode> {
        Some(EnhancedStatusCode::new(class, subject, detail))
    }

    #[test]
    fn enhanced_codes_parse_and_format() {
        assert_eq!(EnhancedStatusCode::parse("5.7.1 Relay access denied"), esc(5, 7, 1));
        assert_eq!(EnhancedStatusCode::parse("550-5.1.1 no"), esc(5, 1, 1));
        assert_eq!(EnhancedStatusCode::parse("4.7.500 busy"), esc(4, 7, 500));
        assert_eq!(EnhancedStatusCode::parse("5.1.1: x"), esc(5, 1, 1));
        assert_eq!(EnhancedStatusCode::parse("Relay access denied"), None);
        assert_eq!(EnhancedStatusCode::parse("5.7 x"), None);
        assert_eq!(EnhancedStatusCode::parse("3.1.1 x"), None);
        assert_eq!(EnhancedStatusCode::parse("5.1.1.1 x"), None);
        assert_eq!(EnhancedStatusCode::parse("5.1234.1 x"), None);
        assert_eq!(esc(4, 7, 500).map(|e| e.to_string()).as_deref(), Some("4.7.500"));
        assert_eq!(esc(4, 7, 1).map(|e| e.status_class()), Some(StatusClass::Transient));
        assert_eq!(esc(4, 7, 1).map(|e| e.with_class(5)), esc(5, 7, 1));
    }

    #[test]
    fn enhanced_code_forms() {
        let p = EnhancedStatusCode::parse;
        assert_eq!(p("5.1.1 User unknown"), esc(5, 1, 1));
        assert_eq!(p("550 5.7.708 Service"), esc(5, 7, 708));
        assert_eq!(p("  4.7.28 x"), esc(4, 7, 28));
        assert_eq!(p("4.4.7"), esc(4, 4, 7));
        assert_eq!(p("5.2.0, quota"), esc(5, 2, 0));
        assert_eq!(p("1 Requested mail action aborted"), None);
        assert_eq!(p("203.0.113.9 is an ip"), None);
        assert_eq!(p("5.a.1"), None);
        assert_eq!(p(""), None);
        assert_eq!(p("550"), None);
        assert_eq!(p("é.1.1 utf8"), None);
    }

    #[test]
    fn reply_lines_parse_and_print_as_sent() {
        let r = Reply::from_line("451 4.7.1 try later").expect("reply");
        assert_eq!(
            (r.code, r.enhanced, r.text.as_str()),
            (451, esc(4, 7, 1), "4.7.1 try later")
        );
        assert_eq!(r.to_string(), "451 4.7.1 try later");
        assert_eq!(Reply::from_line("garbage"), None);
        assert_eq!(Reply::from_line("45 x"), None);
        assert_eq!(Reply::new(221, "").to_string(), "221");
    }

    #[test]
    fn parses_every_reply_of_a_pipelined_exchange_in_order() {
        let raw = b"250 2.1.0 Sender ok\r\n550-5.1.1 No such\r\n550-5.1.1 user here\r\n550 5.1.1 sorry\r\n554 5.5.1 No valid recipients\r\n";
        let got: Vec<(u16, String)> = parse_replies(raw).into_iter().map(|r| (r.code, r.text)).collect();
        assert_eq!(
            got,
            vec![
                (250, "2.1.0 Sender ok".to_string()),
                (550, "5.1.1 No such user here sorry".to_string()),
                (554, "5.5.1 No valid recipients".to_string()),
            ]
        );
        assert!(parse_replies(b"250-incomplete\r\n").is_empty());
    }

    #[test]
    fn parses_single_and_multi_line_replies() {
        let r = parse_last_reply(b"250 2.0.0 OK queued as 7\r\n").expect("reply");
        assert_eq!(
            (r.code, r.enhanced, r.text.as_str()),
            (250, esc(2, 0, 0), "2.0.0 OK queued as 7")
        );

        let gmail = b"550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n\
550-5.1.1 double-checking the recipient's email address for typos or\r\n\
550 5.1.1  https://support.google.com/mail/?p=NoSuchUser d2-20020a05\r\n";
        let r = parse_last_reply(gmail).expect("reply");
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, esc(5, 1, 1));
        assert_eq!(
            r.text,
            "5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or https://support.google.com/mail/?p=NoSuchUser d2-20020a05"
        );
    }

    #[test]
    fn keeps_three_digit_enhanced_details_and_takes_the_last_reply() {
        // smtp-proto would report 4.7.255 here.
        let r = parse_last_reply(b"451 4.7.500 Server busy. Please try again later\r\n").expect("reply");
        assert_eq!(r.enhanced, esc(4, 7, 500));
        assert_eq!(r.to_string(), "451 4.7.500 Server busy. Please try again later");

        let login = b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n535 5.7.8 Username and password not accepted.\r\n";
        let r = parse_last_reply(login).expect("reply");
        assert_eq!((r.code, r.enhanced), (535, esc(5, 7, 8)));

        assert_eq!(parse_last_reply(b"250-PIPELINING\r\n250-SIZE"), None, "incomplete");
        assert_eq!(parse_last_reply(b""), None);
        let bare = parse_last_reply(b"421\r\n").expect("bare code");
        assert_eq!((bare.code, bare.text.as_str()), (421, ""));
    }
}
