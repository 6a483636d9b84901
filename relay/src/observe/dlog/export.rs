//! CSV export of delivery log events (e.g. hard-bounced addresses for list
//! cleaning). Pure: turns events into RFC 4180 CSV bytes, no I/O. Fields are
//! quoted whenever needed, so reply texts with commas, quotes or line breaks
//! stay in their column. Values are written as-is (no spreadsheet-formula
//! escaping), since addresses may legitimately start with `=`, `+` or `-`.

use super::{DeliveryEvent, DlogError, format_time};

/// The CSV columns, in order.
pub const CSV_COLUMNS: [&str; 9] = [
    "time",
    "recipient",
    "result",
    "reply_code",
    "enhanced_code",
    "reply_text",
    "bounce_class",
    "sender",
    "route",
];

/// `events` as CSV rows (CRLF line ends), preceded by the header row when `header`.
pub fn write_csv(events: &[DeliveryEvent], header: bool) -> Result<Vec<u8>, DlogError> {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    if header {
        w.write_record(CSV_COLUMNS)?;
    }
    for ev in events {
        let code = ev.reply_code.map(|c| c.to_string()).unwrap_or_default();
        w.write_record([
            format_time(&ev.time).as_str(),
            ev.recipient.as_str(),
            ev.result.as_str(),
            code.as_str(),
            ev.enhanced_code.as_deref().unwrap_or(""),
            ev.reply_text.as_deref().unwrap_or(""),
            ev.bounce_class.as_deref().unwrap_or(""),
            ev.envelope_from.as_str(),
            ev.route.as_deref().unwrap_or(""),
        ])?;
    }
    w.into_inner()
        .map_err(|e| DlogError::Csv(csv::Error::from(e.into_error())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::dlog::EventResult;
    use chrono::{TimeZone, Utc};

    #[test]
    fn quotes_what_needs_quoting() {
        let mut e = DeliveryEvent::new(
            Utc.timestamp_millis_opt(1_700_000_000_000).unwrap(),
            EventResult::Bounced,
            "q1",
            "news@shop.example",
            "bob@example.com",
        );
        e.reply_code = Some(550);
        e.enhanced_code = Some("5.1.1".into());
        e.reply_text = Some("5.1.1 \"bob\" unknown, sorry\nsee https://x".into());
        e.bounce_class = Some("invalid_recipient".into());
        e.route = Some("mail/o365".into());
        let text = String::from_utf8(write_csv(&[e], true).unwrap()).unwrap();
        assert_eq!(
            text,
            "time,recipient,result,reply_code,enhanced_code,reply_text,bounce_class,sender,route\r\n\
             2023-11-14T22:13:20.000Z,bob@example.com,bounced,550,5.1.1,\
             \"5.1.1 \"\"bob\"\" unknown, sorry\nsee https://x\",invalid_recipient,news@shop.example,mail/o365\r\n"
        );
    }

    #[test]
    fn empty_values_and_no_header() {
        let e = DeliveryEvent::new(
            Utc.timestamp_millis_opt(0).unwrap(),
            EventResult::Expired,
            "q1",
            "",
            "a@b",
        );
        let text = String::from_utf8(write_csv(&[e], false).unwrap()).unwrap();
        assert_eq!(text, "1970-01-01T00:00:00.000Z,a@b,expired,,,,,,\r\n");
        assert!(write_csv(&[], false).unwrap().is_empty());
    }
}
