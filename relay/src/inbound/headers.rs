//! Header work on accepted messages: reading and stripping the `X-Mailroute-*` extension
//! headers, adding `Received:` and a missing `Message-ID:`, reading single header values.
//! Pure byte manipulation; it must not parse MIME bodies or touch anything but the header block.

use chrono::{DateTime, Utc};

use crate::outbound::retry;
use crate::queue::message::DeliveryOptions;

pub const DELIVER_AFTER: &str = "X-Mailroute-Deliver-After";
pub const EXPIRE: &str = "X-Mailroute-Expire";
pub const RETRY_INTERVAL: &str = "X-Mailroute-Retry-Interval";
pub const QUIET_HOURS: &str = "X-Mailroute-Quiet-Hours";

/// A bad extension header value: answered with `550 5.6.0` naming the header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {header} header: {reason}")]
pub struct HeaderError {
    pub header: &'static str,
    pub reason: String,
}

/// Length of the header block including the blank line (or the whole message if none).
pub fn header_len(msg: &[u8]) -> usize {
    let mut i = 0;
    while i < msg.len() {
        let line_end = msg[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| i + p + 1)
            .unwrap_or(msg.len());
        let line = &msg[i..line_end];
        if line == b"\r\n" || line == b"\n" {
            return line_end;
        }
        i = line_end;
    }
    msg.len()
}

/// The header fields as (name, raw value with folding removed), in order.
pub fn fields(msg: &[u8]) -> Vec<(String, String)> {
    let block = &msg[..header_len(msg)];
    let text = String::from_utf8_lossy(block);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    out
}

/// First value of header `name` (case-insensitive).
pub fn get(msg: &[u8], name: &str) -> Option<String> {
    fields(msg)
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// Reads the extension headers into [`DeliveryOptions`]. Relative values count from `now`.
pub fn extension_options(msg: &[u8], now: DateTime<Utc>) -> Result<DeliveryOptions, HeaderError> {
    let mut o = DeliveryOptions::default();
    for (name, value) in fields(msg) {
        if name.eq_ignore_ascii_case(DELIVER_AFTER) {
            o.deliver_after_ms = Some(parse_time_or_offset(&value, now).map_err(|reason| HeaderError {
                header: DELIVER_AFTER,
                reason,
            })?);
        } else if name.eq_ignore_ascii_case(EXPIRE) {
            o.expire_at_ms =
                Some(parse_time_or_offset(&value, now).map_err(|reason| HeaderError { header: EXPIRE, reason })?);
        } else if name.eq_ignore_ascii_case(RETRY_INTERVAL) {
            let d = retry::parse_duration(&value).map_err(|e| HeaderError {
                header: RETRY_INTERVAL,
                reason: e.to_string(),
            })?;
            if d.as_secs() < 1 {
                return Err(HeaderError {
                    header: RETRY_INTERVAL,
                    reason: "must be at least 1s".into(),
                });
            }
            o.retry_interval_secs = Some(d.as_secs());
        } else if name.eq_ignore_ascii_case(QUIET_HOURS) {
            let q = retry::parse_quiet_hours(&value).map_err(|e| HeaderError {
                header: QUIET_HOURS,
                reason: e.to_string(),
            })?;
            o.quiet_hours = Some(q.to_string());
        }
    }
    Ok(o)
}

/// RFC 3339, RFC 2822, or a duration from now (`90m`, `2h`).
fn parse_time_or_offset(v: &str, now: DateTime<Utc>) -> Result<i64, String> {
    let v = v.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(t) = DateTime::parse_from_rfc2822(v) {
        return Ok(t.timestamp_millis());
    }
    match humantime::parse_duration(v.trim_start_matches('+')) {
        Ok(d) => Ok(now
            .timestamp_millis()
            .saturating_add(d.as_millis().min(i64::MAX as u128) as i64)),
        Err(_) => Err(format!(
            "{v:?} is neither an RFC 3339/RFC 2822 time nor a duration like 2h"
        )),
    }
}

fn is_extension(name: &str) -> bool {
    [DELIVER_AFTER, EXPIRE, RETRY_INTERVAL, QUIET_HOURS]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// What the relay stores: extension headers stripped, `Received:` prepended, `Message-ID:`
/// added when missing. Works on the message's own buffer: only the header block is rewritten
/// and the rest moved once, so a large body is never copied into a second buffer. Returns the
/// Message-ID.
pub fn prepare_in_place(msg: &mut Vec<u8>, received: &str, hostname: &str, queue_id: &str) -> String {
    remove_fields_in_place(msg, is_extension);
    let mut ours = Vec::with_capacity(received.len() + 128);
    ours.extend_from_slice(received.as_bytes());
    let id = match get(msg, "Message-ID") {
        Some(id) => id,
        None => {
            let id = format!("<{queue_id}@{hostname}>");
            ours.extend_from_slice(format!("Message-ID: {id}\r\n").as_bytes());
            id
        }
    };
    // A message without any header block still gets ours in front, separated properly.
    if !starts_with_field(msg) {
        ours.extend_from_slice(b"\r\n");
    }
    msg.splice(0..0, ours);
    id
}

/// Removes every field whose name satisfies `drop` (with its continuation lines), on the
/// message's own buffer: kept header lines move forward over dropped ones, then the body once.
fn remove_fields_in_place(msg: &mut Vec<u8>, drop: impl Fn(&str) -> bool) {
    let hlen = header_len(msg);
    let mut kept = 0;
    let mut dropping = false;
    let mut i = 0;
    while i < hlen {
        let end = msg[i..hlen]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| i + p + 1)
            .unwrap_or(hlen);
        let line = &msg[i..end];
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            let name = line
                .iter()
                .position(|&b| b == b':')
                .map(|p| String::from_utf8_lossy(&line[..p]).into_owned());
            dropping = name.is_some_and(|n| drop(n.trim()));
        }
        if !dropping {
            if kept != i {
                msg.copy_within(i..end, kept);
            }
            kept += end - i;
        }
        i = end;
    }
    if kept < hlen {
        msg.copy_within(hlen.., kept);
        msg.truncate(msg.len() - (hlen - kept));
    }
}

/// A `Received:` field for this hop (RFC 5321 §4.4), folded, ending in CRLF. No recipient is
/// named when there are several, so the header does not leak the envelope.
pub fn received(
    helo: &str,
    source_ip: &str,
    hostname: &str,
    with: &str,
    queue_id: &str,
    single_rcpt: Option<&str>,
    now: DateTime<Utc>,
) -> String {
    let helo = sanitize(helo);
    let mut s =
        format!("Received: from {helo} ([{source_ip}])\r\n\tby {hostname} (mailroute) with {with} id {queue_id}");
    if let Some(r) = single_rcpt {
        s.push_str(&format!("\r\n\tfor <{}>", sanitize(r)));
    }
    s.push_str(&format!(";\r\n\t{}\r\n", now.to_rfc2822()));
    s
}

/// Whether the message begins with a header field (`name:`), RFC 5322 field-name characters.
fn starts_with_field(msg: &[u8]) -> bool {
    let name_len = msg
        .iter()
        .take_while(|&&b| (33..=126).contains(&b) && b != b':')
        .count();
    name_len > 0 && msg.get(name_len) == Some(&b':')
}

fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && *c != '<' && *c != '>')
        .take(255)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// [`prepare_in_place`] on a copy: the new message and its Message-ID.
    fn prepare(msg: &[u8], received: &str, hostname: &str, queue_id: &str) -> (Vec<u8>, String) {
        let mut out = msg.to_vec();
        let id = prepare_in_place(&mut out, received, hostname, queue_id);
        (out, id)
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap()
    }

    const MSG: &[u8] = b"From: a@b.example\r\nX-Mailroute-Deliver-After: 2026-11-24T09:00:00+09:00\r\nSubject: hi\r\n there\r\nx-mailroute-expire: 2h\r\nX-Mailroute-Retry-Interval: 5m\r\nX-Mailroute-Quiet-Hours: 22:00-07:00 Asia/Tokyo\r\n\r\nX-Mailroute-Expire: body line stays\r\n";

    #[test]
    fn reads_extension_headers() {
        let o = extension_options(MSG, now()).unwrap();
        assert_eq!(
            o.deliver_after_ms,
            Some(Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap().timestamp_millis())
        );
        assert_eq!(o.expire_at_ms, Some(now().timestamp_millis() + 2 * 3600 * 1000));
        assert_eq!(o.retry_interval_secs, Some(300));
        assert_eq!(o.quiet_hours.as_deref(), Some("22:00-07:00 Asia/Tokyo"));
    }

    #[test]
    fn bad_values_name_the_header() {
        let e = extension_options(b"X-Mailroute-Expire: soon\r\n\r\nx", now()).unwrap_err();
        assert_eq!(e.header, EXPIRE);
        let e = extension_options(b"X-Mailroute-Quiet-Hours: 25:00-07:00\r\n\r\nx", now()).unwrap_err();
        assert_eq!(e.header, QUIET_HOURS);
    }

    #[test]
    fn prepare_strips_extensions_keeps_body_and_adds_ids() {
        let rcv = received(
            "app",
            "10.0.0.1",
            "relay.test",
            "ESMTP",
            "q1",
            Some("x@y.example"),
            now(),
        );
        let (out, id) = prepare(MSG, &rcv, "relay.test", "q1");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("Received: from app ([10.0.0.1])\r\n\tby relay.test"));
        assert_eq!(id, "<q1@relay.test>");
        assert!(text.contains("Message-ID: <q1@relay.test>\r\n"));
        assert!(!text.to_ascii_lowercase().contains("x-mailroute-deliver-after"));
        assert!(!text.contains("x-mailroute-expire: 2h"));
        assert!(text.contains("Subject: hi\r\n there\r\n"));
        assert!(text.ends_with("\r\n\r\nX-Mailroute-Expire: body line stays\r\n"));
    }

    #[test]
    fn existing_message_id_is_kept() {
        let (out, id) = prepare(b"Message-ID: <abc@x>\r\n\r\nbody", "Received: x\r\n", "h", "q");
        assert_eq!(id, "<abc@x>");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: x\r\nMessage-ID: <abc@x>\r\n\r\nbody"
        );
    }

    #[test]
    fn prepare_in_place_matches_prepare_and_reuses_the_buffer() {
        let rcv = "Received: x\r\n";
        for msg in [
            MSG,
            b"just text\r\n".as_slice(),
            b"Message-ID: <abc@x>\r\n\r\nbody",
            b"",
        ] {
            let (copy, id) = prepare(msg, rcv, "h", "q");
            let mut buf = Vec::with_capacity(msg.len() + 1024);
            buf.extend_from_slice(msg);
            let ptr = buf.as_ptr();
            assert_eq!(prepare_in_place(&mut buf, rcv, "h", "q"), id);
            assert_eq!(buf, copy);
            assert_eq!(buf.as_ptr(), ptr, "rewritten in its own buffer");
        }
    }

    #[test]
    fn headerless_message_gets_a_separator() {
        let (out, _) = prepare(b"just text\r\n", "Received: x\r\n", "h", "q");
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s, "Received: x\r\nMessage-ID: <q@h>\r\n\r\njust text\r\n");
    }

    #[test]
    fn folded_values_are_unfolded() {
        assert_eq!(get(MSG, "subject").as_deref(), Some("hi there"));
    }
}
