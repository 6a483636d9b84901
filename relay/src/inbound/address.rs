//! Envelope addresses: the checks made on a raw `MAIL`/`RCPT` line before smtp-proto parses it
//! ([`check_envelope_line`]), and the one way an address is written back out in RFC 5321 form
//! ([`wire_form`], the outbound client's, re-exported), used on every outbound path (smarthost,
//! MX, DSN).
//!
//! Inside the relay an address is kept as smtp-proto returns it: the local part without its
//! quotes and backslash escapes (`"a b"@x` is `a b@x`), split from the domain at the last `@`.
//! Writing it out unquoted would let a quoted local part such as `"a> AUTH=<x@y>"@z` add ESMTP
//! parameters to the relay's upstream session, so [`wire_form`] quotes what needs quoting, and
//! refuses what cannot be written at all (control characters).
//!
//! Defects of smtp-proto's parser worked around here: invalid UTF-8 in an address or a
//! parameter becomes U+FFFD; a CR inside an address is silently dropped; a SIZE beyond the
//! integer range wraps (`SIZE=99999999999999999999999` reads as 999) or is reported as an
//! invalid parameter instead of a message too big.
//!
//! Pure functions only; the session decides what to do with the result.

pub use mailroute_smtp::wire::wire_form;

/// What the raw line check found (the line is fine when it returns `Ok`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeCommand {
    Mail,
    Rcpt,
    /// Not MAIL or RCPT: nothing checked.
    Other,
}

/// Checks a raw command line before smtp-proto parses it. For `MAIL` and `RCPT`: the address
/// between `<` and `>` must be UTF-8 without control characters (`553 5.1.7` for the sender,
/// `553 5.1.3` for a recipient), the rest of the line UTF-8 (`501 5.5.4`), and a `SIZE=` of
/// `MAIL` must fit the integer range (`552 5.3.4`). `Err` is the full reply line.
pub fn check_envelope_line(line: &[u8]) -> Result<EnvelopeCommand, String> {
    let verb = line.get(..4).map(<[u8]>::to_ascii_uppercase);
    let cmd = match verb.as_deref() {
        Some(b"MAIL") => EnvelopeCommand::Mail,
        Some(b"RCPT") => EnvelopeCommand::Rcpt,
        _ => return Ok(EnvelopeCommand::Other),
    };
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (head, addr, params) = split_path(line);
    let bad_addr = |what: &str| match cmd {
        EnvelopeCommand::Mail => format!("553 5.1.7 Bad sender address: {what}"),
        _ => format!("553 5.1.3 Bad recipient address: {what}"),
    };
    if std::str::from_utf8(addr).is_err() {
        return Err(bad_addr("not valid UTF-8"));
    }
    if addr.iter().any(|b| b.is_ascii_control()) {
        return Err(bad_addr("control characters"));
    }
    let (Ok(_), Ok(params)) = (std::str::from_utf8(head), std::str::from_utf8(params)) else {
        return Err("501 5.5.4 Syntax error: the command is not valid UTF-8".into());
    };
    if cmd == EnvelopeCommand::Mail {
        for p in params.split_ascii_whitespace() {
            if let Some((key, value)) = p.split_once('=')
                && key.eq_ignore_ascii_case("SIZE")
                && !value.is_empty()
                && value.bytes().all(|b| b.is_ascii_digit())
                && value.parse::<usize>().is_err()
            {
                return Err("552 5.3.4 Message size exceeds fixed maximum message size".into());
            }
        }
    }
    Ok(cmd)
}

/// Splits `MAIL FROM:<path> params` into the part before `<`, the path between the brackets
/// (a `>` inside a quoted string does not end it) and the rest. Without `<`, everything is
/// the first part.
fn split_path(line: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let Some(open) = line.iter().position(|&b| b == b'<') else {
        return (line, &[], &[]);
    };
    let mut in_quote = false;
    let mut escaped = false;
    for (i, &b) in line.iter().enumerate().skip(open + 1) {
        if escaped {
            escaped = false;
        } else if in_quote && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            in_quote = !in_quote;
        } else if b == b'>' && !in_quote {
            return (&line[..open], &line[open + 1..i], &line[i + 1..]);
        }
    }
    (&line[..open], &line[open + 1..], &[])
}

#[cfg(test)]
mod tests {
    use mailroute_smtp::wire::AddressError;

    use super::*;

    #[test]
    fn writes_dot_strings_as_they_are() {
        for a in [
            "",
            "a@example.com",
            "first.last+tag@sub.example.com",
            "!#$%&'*+-/=?^_`{|}~@example.com",
            "用户@例子.广告",
            "postmaster",
            "a@[192.0.2.1]",
            "a@[IPv6:2001:db8::1]",
        ] {
            assert_eq!(wire_form(a).unwrap(), a);
        }
    }

    #[test]
    fn quotes_local_parts_that_are_not_dot_strings() {
        let cases = [
            (
                "a> AUTH=<ceo@corp.example>@good.example",
                r#""a> AUTH=<ceo@corp.example>"@good.example"#,
            ),
            ("a b@example.com", r#""a b"@example.com"#),
            (r#"say "hi"@example.com"#, r#""say \"hi\""@example.com"#),
            (r"back\slash@example.com", r#""back\\slash"@example.com"#),
            (".lead@example.com", r#"".lead"@example.com"#),
            ("trail.@example.com", r#""trail."@example.com"#),
            ("dou..ble@example.com", r#""dou..ble"@example.com"#),
            ("a@b@example.com", r#""a@b"@example.com"#),
            ("@example.com", r#"""@example.com"#),
            ("a,b:c;d@example.com", r#""a,b:c;d"@example.com"#),
        ];
        for (stored, wire) in cases {
            assert_eq!(wire_form(stored).unwrap(), wire, "{stored}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_written() {
        for a in [
            "a\r\nRSET@example.com",
            "a\tb@example.com",
            "a\0@example.com",
            "a\u{85}@example.com",
        ] {
            assert_eq!(wire_form(a), Err(AddressError::ControlCharacter), "{a:?}");
        }
        for a in ["a@exa mple.com", "a@example.com> SIZE=1", "a@\"x\""] {
            assert_eq!(wire_form(a), Err(AddressError::Domain), "{a:?}");
        }
    }

    /// What smtp-proto makes of a line, then written back: the same address, never a parameter.
    #[test]
    fn parsed_then_written_gives_the_same_path() {
        for (line, wire) in [
            (
                "MAIL FROM:<\"a> AUTH=<ceo@corp.example>\"@good.example>\r\n",
                "\"a> AUTH=<ceo@corp.example>\"@good.example",
            ),
            ("MAIL FROM:<\"a\\\"b\"@x.example>\r\n", "\"a\\\"b\"@x.example"),
            ("MAIL FROM:<\"a\\\\b\"@x.example>\r\n", "\"a\\\\b\"@x.example"),
            ("MAIL FROM:<\"plain\"@x.example>\r\n", "plain@x.example"),
        ] {
            let smtp_proto::Request::Mail { from } = smtp_proto::Request::parse(&mut line.as_bytes().iter()).unwrap()
            else {
                panic!("{line}")
            };
            assert_eq!(wire_form(&from.address).unwrap(), wire, "{line}");
        }
    }

    #[test]
    fn envelope_line_checks() {
        let ok = |l: &[u8]| check_envelope_line(l).map(|_| ()).map_err(|e| e[..9].to_owned());
        assert_eq!(check_envelope_line(b"EHLO x\r\n"), Ok(EnvelopeCommand::Other));
        assert_eq!(
            check_envelope_line(b"mail FROM:<a@b.example>\r\n"),
            Ok(EnvelopeCommand::Mail)
        );
        assert_eq!(
            check_envelope_line(b"RCPT TO:<\"x>y\"@b.example>\r\n"),
            Ok(EnvelopeCommand::Rcpt)
        );
        assert_eq!(ok(b"MAIL FROM:<a\xff@b.example>\r\n"), Err("553 5.1.7".into()));
        assert_eq!(ok(b"RCPT TO:<a@b\xc3.example>\r\n"), Err("553 5.1.3".into()));
        assert_eq!(ok(b"RCPT TO:<\"a\rb\"@b.example>\r\n"), Err("553 5.1.3".into()));
        assert_eq!(ok(b"MAIL FROM:<\"a\x01\"@b.example>\r\n"), Err("553 5.1.7".into()));
        assert_eq!(ok(b"MAIL FROM:<a@b.example> ENVID=\xff\r\n"), Err("501 5.5.4".into()));
        assert_eq!(
            ok(b"MAIL FROM:<a@b.example> SIZE=99999999999999999999999\r\n"),
            Err("552 5.3.4".into())
        );
        assert_eq!(
            ok(b"MAIL FROM:<a@b.example> size=18446744073709551616\r\n"),
            Err("552 5.3.4".into())
        );
        assert_eq!(ok(b"MAIL FROM:<a@b.example> SIZE=1000\r\n"), Ok(()));
        // UTF-8 is fine here; whether SMTPUTF8 was given is the session's check.
        assert_eq!(ok("MAIL FROM:<用户@例子.广告>\r\n".as_bytes()), Ok(()));
    }
}
