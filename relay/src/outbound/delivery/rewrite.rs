//! The route's sender override: replaces the envelope sender and the `From:` header's address
//! (keeping its display name) and preserves the original address in `Reply-To:` when the
//! message has none, so replies still reach the real sender.
//!
//! Pure byte work on the header block; the body is never touched. Must not sign (DKIM runs
//! after this) nor decide whether a route overrides (that is the route's configuration).

use crate::inbound::headers;

/// The envelope sender to use: the override, except for the null sender of a bounce, which
/// must stay `<>` so a DSN never bounces.
pub fn override_envelope_sender(mail_from: &str, new_from: &str) -> String {
    if mail_from.is_empty() {
        String::new()
    } else {
        new_from.to_owned()
    }
}

/// Rewrites the first `From:` field to `display-name <new_from>` and adds
/// `Reply-To: <original From value>` right after it if the message has no `Reply-To:`.
/// A message without `From:` gets `From: <new_from>`.
pub fn rewrite_from_header(message: &[u8], new_from: &str) -> Vec<u8> {
    let hlen = headers::header_len(message);
    let eol: &[u8] = if message[..hlen].windows(2).any(|w| w == b"\r\n") || hlen == 0 {
        b"\r\n"
    } else {
        b"\n"
    };
    let has_reply_to = headers::get(message, "Reply-To").is_some_and(|v| !v.trim().is_empty());

    let mut out = Vec::with_capacity(message.len() + new_from.len() + 64);
    let mut done = false;
    let mut i = 0;
    // The header block ends with the blank line (if any); fields are copied or replaced whole.
    let block_end = blank_line_start(message, hlen);
    while i < block_end {
        let end = field_end(message, i, block_end);
        let field = &message[i..end];
        if !done && field_name(field).is_some_and(|n| n.eq_ignore_ascii_case("From")) {
            let value = unfold_value(field);
            let display = first_mailbox_display_name(&value);
            out.extend_from_slice(b"From: ");
            if let Some(d) = &display {
                out.extend_from_slice(d.as_bytes());
                out.push(b' ');
            }
            out.push(b'<');
            out.extend_from_slice(new_from.as_bytes());
            out.push(b'>');
            out.extend_from_slice(eol);
            if !has_reply_to && !value.trim().is_empty() {
                out.extend_from_slice(b"Reply-To: ");
                out.extend_from_slice(value.trim().as_bytes());
                out.extend_from_slice(eol);
            }
            done = true;
        } else {
            out.extend_from_slice(field);
        }
        i = end;
    }
    if !done {
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.extend_from_slice(eol);
        }
        out.extend_from_slice(b"From: <");
        out.extend_from_slice(new_from.as_bytes());
        out.push(b'>');
        out.extend_from_slice(eol);
    }
    out.extend_from_slice(&message[block_end..]);
    out
}

/// Start of the blank line ending the header block (or `hlen` if there is none).
fn blank_line_start(message: &[u8], hlen: usize) -> usize {
    let block = &message[..hlen];
    if block.ends_with(b"\r\n\r\n") || (hlen == 2 && block == b"\r\n") {
        hlen - 2
    } else if block.ends_with(b"\n\n") || (hlen == 1 && block == b"\n") {
        hlen - 1
    } else if block.ends_with(b"\n\r\n") {
        hlen - 2
    } else {
        hlen
    }
}

/// End (exclusive) of the field starting at `start`, including its continuation lines.
fn field_end(message: &[u8], start: usize, limit: usize) -> usize {
    let mut i = start;
    loop {
        let line_end = message[i..limit]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| i + p + 1)
            .unwrap_or(limit);
        i = line_end;
        if i >= limit || !matches!(message[i], b' ' | b'\t') {
            return i;
        }
    }
}

fn field_name(field: &[u8]) -> Option<String> {
    let colon = field.iter().position(|&b| b == b':')?;
    let name = &field[..colon];
    if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace() && *b != b' ') {
        return None;
    }
    Some(String::from_utf8_lossy(name).trim().to_owned())
}

fn unfold_value(field: &[u8]) -> String {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(0);
    let raw = String::from_utf8_lossy(&field[colon + 1..]);
    raw.split('\n')
        .map(|l| l.trim_end_matches('\r').trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The display name of the first mailbox in an address list, ready to be written back:
/// `Shop <a@b>` → `Shop`, `"Doe, J" <a@b>` → `"Doe, J"`, `a@b (Shop Team)` → `"Shop Team"`.
pub fn first_mailbox_display_name(value: &str) -> Option<String> {
    // Cut at the first top-level comma: only the first mailbox counts.
    let mut in_quote = false;
    let mut escaped = false;
    let mut angle = 0usize;
    let mut comment = 0usize;
    let mut end = value.len();
    let mut angle_start = None;
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote || comment > 0 => escaped = true,
            '"' if comment == 0 => in_quote = !in_quote,
            '(' if !in_quote => comment += 1,
            ')' if !in_quote && comment > 0 => comment -= 1,
            '<' if !in_quote && comment == 0 => {
                angle += 1;
                if angle_start.is_none() {
                    angle_start = Some(i);
                }
            }
            '>' if !in_quote && comment == 0 && angle > 0 => angle -= 1,
            ',' if !in_quote && comment == 0 && angle == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let mailbox = value[..end].trim();
    if let Some(start) = angle_start.filter(|&s| s < end) {
        let display = mailbox[..start.min(mailbox.len())].trim();
        // Drop a group name ("Team: Shop <a@b>").
        let display = display.rsplit_once(':').map(|(_, d)| d.trim()).unwrap_or(display);
        return (!display.is_empty()).then(|| quote_phrase(display));
    }
    // `addr (Display Name)`: the comment is the historical display name.
    let open = mailbox.find('(')?;
    let close = mailbox.rfind(')')?;
    let inner = mailbox.get(open + 1..close)?.trim();
    (!inner.is_empty()).then(|| quote_phrase(inner))
}

/// Keeps a phrase that is already a quoted string, an encoded word or plain atoms; quotes the rest.
fn quote_phrase(display: &str) -> String {
    let is_quoted = display.len() >= 2 && display.starts_with('"') && display.ends_with('"');
    let is_encoded = display.contains("=?") && display.contains("?=");
    let atext = |c: char| c.is_alphanumeric() || c == ' ' || "!#$%&'*+-/=?^_`{|}~".contains(c);
    if is_quoted || is_encoded || display.chars().all(atext) {
        return display.to_owned();
    }
    let mut out = String::with_capacity(display.len() + 2);
    out.push('"');
    for c in display.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(msg: &str, new_from: &str) -> String {
        String::from_utf8(rewrite_from_header(msg.as_bytes(), new_from)).expect("utf8")
    }

    #[test]
    fn keeps_display_name_and_adds_reply_to() {
        let out = rw(
            "Subject: hi\r\nFrom: Shop Team <orders@shop.example>\r\nTo: a@b.example\r\n\r\nbody\r\nFrom: not a header\r\n",
            "relay@mail.example",
        );
        assert_eq!(
            out,
            "Subject: hi\r\nFrom: Shop Team <relay@mail.example>\r\nReply-To: Shop Team <orders@shop.example>\r\nTo: a@b.example\r\n\r\nbody\r\nFrom: not a header\r\n"
        );
    }

    #[test]
    fn existing_reply_to_is_kept() {
        let out = rw(
            "From: \"Doe, Jane\" <jane@corp.example>\r\nReply-To: support@corp.example\r\n\r\nx",
            "noreply@relay.example",
        );
        assert_eq!(
            out,
            "From: \"Doe, Jane\" <noreply@relay.example>\r\nReply-To: support@corp.example\r\n\r\nx"
        );
    }

    #[test]
    fn folded_from_and_bare_address() {
        let out = rw(
            "From:\r\n  =?UTF-8?B?5Yqg6Jek?=\r\n <kato@shop.example>\r\nSubject: s\r\n\r\n",
            "r@relay.example",
        );
        assert!(
            out.starts_with("From: =?UTF-8?B?5Yqg6Jek?= <r@relay.example>\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Reply-To: =?UTF-8?B?5Yqg6Jek?= <kato@shop.example>\r\n"),
            "{out}"
        );
        assert!(out.ends_with("Subject: s\r\n\r\n"), "{out}");

        let out = rw("from: app@shop.example\n\nbody\n", "r@relay.example");
        assert_eq!(out, "From: <r@relay.example>\nReply-To: app@shop.example\n\nbody\n");
    }

    #[test]
    fn missing_from_is_added_and_only_the_first_from_changes() {
        assert_eq!(
            rw("Subject: s\r\n\r\nb", "r@x.example"),
            "Subject: s\r\nFrom: <r@x.example>\r\n\r\nb"
        );
        assert_eq!(
            rw("Subject: s\r\n", "r@x.example"),
            "Subject: s\r\nFrom: <r@x.example>\r\n"
        );
        let out = rw("From: a@x.example\r\nFrom: b@x.example\r\n\r\n", "r@x.example");
        assert_eq!(out.matches("From: ").count(), 2);
        assert!(out.contains("From: b@x.example\r\n"));
    }

    #[test]
    fn display_names() {
        assert_eq!(first_mailbox_display_name("Shop <a@b>"), Some("Shop".into()));
        assert_eq!(first_mailbox_display_name("<a@b>"), None);
        assert_eq!(first_mailbox_display_name("a@b"), None);
        assert_eq!(first_mailbox_display_name("a@b (Shop Team)"), Some("Shop Team".into()));
        assert_eq!(
            first_mailbox_display_name("a@b (Shop, Inc.)"),
            Some("\"Shop, Inc.\"".into())
        );
        assert_eq!(
            first_mailbox_display_name("\"Doe, J\" <a@b>, Other <c@d>"),
            Some("\"Doe, J\"".into())
        );
        assert_eq!(first_mailbox_display_name("J. Doe <a@b>"), Some("\"J. Doe\"".into()));
        assert_eq!(first_mailbox_display_name("Team: Shop <a@b>;"), Some("Shop".into()));
    }

    #[test]
    fn envelope_override_keeps_null_sender() {
        assert_eq!(
            override_envelope_sender("app@shop.example", "r@relay.example"),
            "r@relay.example"
        );
        assert_eq!(override_envelope_sender("", "r@relay.example"), "");
    }
}
