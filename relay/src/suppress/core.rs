//! The suppression list's rules, without I/O: scopes, entries and their expiry, the form an
//! address is compared in, the in-memory copy's hashes, and the CSV of import and export.
//!
//! Must not read the clock (times are arguments), Redis or the network.

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Which list: one per tenant namespace, and the platform's, which applies to everyone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Platform,
    Namespace(String),
}

impl Scope {
    /// The list a message of `namespace` (None: unattributed) is checked against besides the
    /// platform's, and where its bounces are added.
    pub fn of_message(namespace: Option<&str>) -> Scope {
        match namespace {
            Some(n) => Scope::Namespace(n.to_owned()),
            None => Scope::Platform,
        }
    }

    /// The field of the generation hash and the suffix of the list's key: `platform` or
    /// `ns:<namespace>` (a namespace is never called `ns:…`, so the two cannot collide).
    pub fn id(&self) -> String {
        match self {
            Scope::Platform => "platform".to_owned(),
            Scope::Namespace(n) => format!("ns:{n}"),
        }
    }

    /// The inverse of [`Scope::id`].
    pub fn from_id(id: &str) -> Option<Scope> {
        match id {
            "platform" => Some(Scope::Platform),
            _ => id
                .strip_prefix("ns:")
                .filter(|n| !n.is_empty())
                .map(|n| Scope::Namespace(n.to_owned())),
        }
    }

    /// The metric label: the namespace, or `platform` (namespaces are RFC 1123 labels; a
    /// namespace really called `platform` shares the label, never the list).
    pub fn label(&self) -> &str {
        match self {
            Scope::Platform => "platform",
            Scope::Namespace(n) => n,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Platform => f.write_str("the platform list"),
            Scope::Namespace(n) => write!(f, "namespace {n}'s list"),
        }
    }
}

/// What a suppressed recipient gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refused at RCPT with `550 5.1.1`.
    #[default]
    Refuse,
    /// Accepted, not delivered, recorded as `suppressed` in the delivery log.
    Drop,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Refuse => "refuse",
            Mode::Drop => "drop",
        }
    }
}

/// The reply to a suppressed recipient in `refuse` mode.
pub fn refusal(scope: &Scope) -> mailroute_smtp::Reply {
    let whose = match scope {
        Scope::Platform => "the platform's",
        Scope::Namespace(_) => "the sender namespace's",
    };
    mailroute_smtp::Reply::new(
        550,
        format!(
            "5.1.1 Recipient address is suppressed: it is on {whose} suppression list (an earlier hard bounce or an administrator's entry)"
        ),
    )
}

/// How an entry came to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `bounce` (added automatically) or `manual` (the admin API, one by one or imported).
    pub kind: String,
    /// `manual`: who added it (the admin token, or a Kubernetes user name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// `bounce`: the delivery-log record id of the bounce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// `bounce`: the queue id of the message that bounced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

impl Source {
    pub fn bounce(event: Option<String>, message_id: &str) -> Self {
        Source {
            kind: "bounce".into(),
            by: None,
            event,
            message_id: Some(message_id.to_owned()),
        }
    }
    pub fn manual(by: &str) -> Self {
        Source {
            kind: "manual".into(),
            by: Some(by.to_owned()),
            event: None,
            message_id: None,
        }
    }
}

/// One suppressed address, as stored (JSON) under its [`key`] in its scope's list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The address as it was given (the key is its compared form).
    pub address: String,
    pub reason: String,
    pub source: Source,
    pub added_ms: i64,
    /// After this (Unix ms) the entry no longer suppresses; `None`: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

impl Entry {
    /// Whether the entry suppresses at `now_ms`.
    pub fn active(&self, now_ms: i64) -> bool {
        self.expires_ms.is_none_or(|e| now_ms < e)
    }
}

/// A bad address, CSV row or time given to the list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("{0:?} is not an email address (local@domain with a valid domain)")]
    Address(String),
    #[error("line {line}: {message}")]
    Csv { line: u64, message: String },
    #[error("{0}")]
    Time(String),
}

/// The form an address is compared in, which is also its key: the local part with ASCII
/// letters lower-cased (the relay compares recipients ASCII-case-insensitively everywhere,
/// e.g. the delivery-log filter: `Bob@x` and `bob@x` are one recipient; non-ASCII letters of
/// an SMTPUTF8 local part are kept as they are) and the domain as a lower-case A-label, the form
/// RCPT stores.
pub fn key(address: &str) -> Result<String, CoreError> {
    let bad = || CoreError::Address(address.to_owned());
    let address = address.trim();
    let address = address
        .strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(address);
    let (local, domain) = address.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty() || local.len() > 64 || local.chars().any(char::is_control) {
        return Err(bad());
    }
    let domain = crate::outbound::route::ascii_domain(domain)
        .filter(|d| mailroute_api::pattern::is_valid_domain(d))
        .ok_or_else(bad)?;
    Ok(format!("{}@{domain}", local.to_ascii_lowercase()))
}

/// The 64-bit hash of an address key in a scope, as the in-memory copy holds it.
pub fn hash(scope: &Scope, key: &str) -> u64 {
    // SipHash with fixed keys: stable within the process, which is all the copy needs.
    let mut h = std::hash::DefaultHasher::new();
    scope.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

/// One scope's list as a relay holds it: the sorted hashes of its active entries (8 bytes
/// each) and the generation they were read at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeCopy {
    /// The scope's generation counter when the copy was read (`""`: never written).
    pub generation: String,
    hashes: Vec<u64>,
    /// When the first of its entries expires (then the scope is read again, and the expired
    /// entries removed).
    pub next_expiry_ms: Option<i64>,
}

impl ScopeCopy {
    pub fn new(generation: String, mut hashes: Vec<u64>, next_expiry_ms: Option<i64>) -> Self {
        hashes.sort_unstable();
        hashes.dedup();
        hashes.shrink_to_fit();
        ScopeCopy {
            generation,
            hashes,
            next_expiry_ms,
        }
    }

    /// Whether the copy must be read again: its generation moved, or an entry expired.
    pub fn stale(&self, generation: &str, now_ms: i64) -> bool {
        self.generation != generation || self.next_expiry_ms.is_some_and(|t| t <= now_ms)
    }

    /// Whether a stale copy read at `read_at_ms` is read again at `now_ms`: a list is read
    /// whole, so a large one is read at most every `poll` × entries / [`ENTRIES_PER_POLL`]
    /// (a million entries: every 100 polls), never less often than [`MAX_REREAD_MS`]. Until
    /// then the copy keeps its old generation, so the enqueue's commit script checks the
    /// list itself: nothing slips through, a new entry is dropped at the enqueue instead of
    /// refused at RCPT.
    pub fn reread_due(&self, generation: &str, now_ms: i64, read_at_ms: i64, poll_ms: i64) -> bool {
        if !self.stale(generation, now_ms) {
            return false;
        }
        let polls = (self.len() / ENTRIES_PER_POLL).max(1) as i64;
        let wait = poll_ms.saturating_mul(polls).min(MAX_REREAD_MS);
        now_ms.saturating_sub(read_at_ms) >= wait
    }
    pub fn len(&self) -> usize {
        self.hashes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
    /// Whether the copy may hold `h` (a hit can be a hash collision: confirm before refusing).
    pub fn may_contain(&self, h: u64) -> bool {
        self.hashes.binary_search(&h).is_ok()
    }
    /// Bytes the hashes take.
    pub fn bytes(&self) -> usize {
        self.hashes.capacity() * std::mem::size_of::<u64>()
    }
}

/// Entries a list may hold and still be read again at every poll when it changed.
pub const ENTRIES_PER_POLL: usize = 10_000;
/// The longest a changed list waits to be read again (5 minutes).
pub const MAX_REREAD_MS: i64 = 300_000;

/// The scopes a message of `namespace` is checked against, in the order a hit is reported.
pub fn scopes_for(namespace: Option<&str>) -> Vec<Scope> {
    match namespace {
        Some(n) => vec![Scope::Namespace(n.to_owned()), Scope::Platform],
        None => vec![Scope::Platform],
    }
}

/// Columns of the CSV, in order.
pub const CSV_COLUMNS: [&str; 8] = [
    "address",
    "reason",
    "source",
    "by",
    "event",
    "message_id",
    "added",
    "expires",
];

fn time_text(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// An RFC 3339 time as Unix ms.
pub fn parse_time(s: &str) -> Result<i64, CoreError> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| CoreError::Time(format!("{s:?} is not an RFC 3339 time: {e}")))
}

/// Entries as CSV with a header row (the csv crate quotes commas, quotes and line breaks).
pub fn render_csv(entries: &[Entry]) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing to a Vec cannot fail.
    let _ = w.write_record(CSV_COLUMNS);
    for e in entries {
        let _ = w.write_record([
            e.address.as_str(),
            &e.reason,
            &e.source.kind,
            e.source.by.as_deref().unwrap_or(""),
            e.source.event.as_deref().unwrap_or(""),
            e.source.message_id.as_deref().unwrap_or(""),
            &time_text(e.added_ms),
            &e.expires_ms.map(time_text).unwrap_or_default(),
        ]);
    }
    w.into_inner().unwrap_or_default()
}

/// Parses an import: a header row naming at least `address` (other columns of
/// [`CSV_COLUMNS`] optional, in any order; unknown ones are an error so that a typo is not
/// silently dropped). A row without a source becomes `manual` by `by`; without `added`, `now_ms`.
/// Rows are checked all before any is stored: one bad row refuses the file, naming its line.
pub fn parse_csv(data: &[u8], by: &str, now_ms: i64) -> Result<Vec<Entry>, CoreError> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::Headers)
        .from_reader(data);
    let err = |line: u64, message: String| CoreError::Csv { line, message };
    let headers = r.headers().map_err(|e| err(1, e.to_string()))?.clone();
    let mut col = [None; CSV_COLUMNS.len()];
    for (i, h) in headers.iter().enumerate() {
        let Some(c) = CSV_COLUMNS.iter().position(|c| c.eq_ignore_ascii_case(h)) else {
            return Err(err(
                1,
                format!("unknown column {h:?}; expected {}", CSV_COLUMNS.join(",")),
            ));
        };
        if col[c].replace(i).is_some() {
            return Err(err(1, format!("column {h:?} given twice")));
        }
    }
    if col[0].is_none() {
        return Err(err(1, "the header row must name an `address` column".into()));
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| err(e.position().map_or(0, |p| p.line()), e.to_string()))?;
        let line = rec.position().map_or(0, |p| p.line());
        let field = |c: usize| col[c].and_then(|i| rec.get(i)).map(str::trim).filter(|v| !v.is_empty());
        let Some(address) = field(0) else {
            return Err(err(line, "empty address".into()));
        };
        let k = key(address).map_err(|e| err(line, e.to_string()))?;
        if !seen.insert(k) {
            return Err(err(line, format!("{address:?} appears twice in the file")));
        }
        let source = match field(2) {
            None => Source::manual(by),
            Some(kind @ ("bounce" | "manual")) => Source {
                kind: kind.to_owned(),
                by: field(3).map(str::to_owned),
                event: field(4).map(str::to_owned),
                message_id: field(5).map(str::to_owned),
            },
            Some(other) => return Err(err(line, format!("source {other:?} is neither bounce nor manual"))),
        };
        let time = |c: usize| {
            field(c)
                .map(parse_time)
                .transpose()
                .map_err(|e| err(line, e.to_string()))
        };
        out.push(Entry {
            address: address.to_owned(),
            reason: field(1).unwrap_or("imported").to_owned(),
            source,
            added_ms: time(6)?.unwrap_or(now_ms),
            expires_ms: time(7)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(address: &str, expires_ms: Option<i64>) -> Entry {
        Entry {
            address: address.into(),
            reason: "hard bounce: 550 5.1.1 no such user".into(),
            source: Source::bounce(Some("1733390000000-0".into()), "0193a7c2"),
            added_ms: 1_733_390_000_123,
            expires_ms,
        }
    }

    #[test]
    fn addresses_compare_like_recipients() {
        assert_eq!(key("Bob@Example.COM").unwrap(), "bob@example.com");
        assert_eq!(key("<bob@example.com>").unwrap(), "bob@example.com");
        // U-label domains compare as their A-label, the form RCPT stores.
        assert_eq!(key("ü@bücher.example").unwrap(), "ü@xn--bcher-kva.example");
        assert_eq!(key("Ü@xn--bcher-kva.example").unwrap(), "Ü@xn--bcher-kva.example");
        assert_eq!(key("\"a,b\"@x.example").unwrap(), "\"a,b\"@x.example");
        for bad in ["", "nobody", "@x.example", "a@", "a@-x-.example", "a\r@x.example"] {
            assert!(key(bad).is_err(), "{bad}");
        }
        assert!(key(&format!("{}@x.example", "a".repeat(65))).is_err());
    }

    #[test]
    fn scopes_round_trip_and_never_collide() {
        for s in [
            Scope::Platform,
            Scope::Namespace("team-a".into()),
            Scope::Namespace("platform".into()),
        ] {
            assert_eq!(Scope::from_id(&s.id()), Some(s.clone()));
        }
        assert_ne!(Scope::Platform.id(), Scope::Namespace("platform".into()).id());
        assert_eq!(Scope::from_id("ns:"), None);
        assert_eq!(scopes_for(None), vec![Scope::Platform]);
        assert_eq!(
            scopes_for(Some("team-a")),
            vec![Scope::Namespace("team-a".into()), Scope::Platform]
        );
        assert_ne!(
            hash(&Scope::Platform, "a@x.example"),
            hash(&Scope::Namespace("a".into()), "a@x.example")
        );
    }

    #[test]
    fn entries_expire_at_their_time() {
        assert!(entry("a@x.example", None).active(i64::MAX));
        let e = entry("a@x.example", Some(1000));
        assert!(e.active(999));
        assert!(!e.active(1000));
    }

    #[test]
    fn the_copy_answers_by_hash() {
        let s = Scope::Platform;
        let c = ScopeCopy::new(
            "3".into(),
            vec![hash(&s, "b@x"), hash(&s, "a@x"), hash(&s, "a@x")],
            Some(100),
        );
        assert_eq!(c.len(), 2);
        assert!(!c.stale("3", 99));
        assert!(c.stale("3", 100));
        assert!(c.stale("4", 0));
        assert!(c.may_contain(hash(&s, "a@x")));
        assert!(!c.may_contain(hash(&s, "c@x")));
        assert_eq!(c.bytes(), 16);
    }

    #[test]
    fn large_lists_are_read_again_less_often() {
        let small = ScopeCopy::new("1".into(), vec![1, 2, 3], None);
        assert!(!small.reread_due("1", 10_000, 0, 2000));
        assert!(small.reread_due("2", 2000, 0, 2000));
        assert!(!small.reread_due("2", 1999, 0, 2000));
        let big = ScopeCopy::new("1".into(), (0..50_000).collect(), None);
        assert!(!big.reread_due("2", 9_999, 0, 2000));
        assert!(big.reread_due("2", 10_000, 0, 2000));
        let huge = ScopeCopy::new("1".into(), (0..2_000_000).collect(), None);
        assert!(!huge.reread_due("2", MAX_REREAD_MS - 1, 0, 2000));
        assert!(huge.reread_due("2", MAX_REREAD_MS, 0, 2000));
    }

    #[test]
    fn a_million_entries_cost_eight_megabytes() {
        let s = Scope::Namespace("team-a".into());
        let n = 1_000_000;
        let mut hashes = Vec::with_capacity(n);
        hashes.extend((0..n).map(|i| hash(&s, &format!("user{i}@example.com"))));
        let c = ScopeCopy::new("1".into(), hashes, None);
        assert_eq!(c.len(), n);
        assert_eq!(c.bytes(), 8_000_000);
        assert!(c.may_contain(hash(&s, "user999999@example.com")));
        assert!(!c.may_contain(hash(&s, "user1000000@example.com")));
    }

    #[test]
    fn the_refusal_is_a_550_5_1_1_that_says_suppressed() {
        let r = refusal(&Scope::Namespace("team-a".into())).to_string();
        assert!(r.starts_with("550 5.1.1 "), "{r}");
        assert!(r.contains("suppressed"), "{r}");
    }

    #[test]
    fn csv_round_trips_awkward_addresses() {
        let entries = vec![
            entry("\"john,doe\"@example.com", None),
            entry("\"say \\\"hi\\\"\"@example.com", Some(1_800_000_000_000)),
            entry("用户@例子.广告", None),
            Entry {
                reason: "line one\nline two, with a comma".into(),
                source: Source::manual("system:serviceaccount:team-a:ops"),
                ..entry("Plain@Example.com", None)
            },
        ];
        let csv = render_csv(&entries);
        let back = parse_csv(&csv, "importer", 42).unwrap();
        assert_eq!(back, entries);
    }

    #[test]
    fn csv_import_fills_defaults_and_refuses_bad_rows() {
        let got = parse_csv(b"Address\nbob@example.com\n", "admin", 7).unwrap();
        assert_eq!(got[0].source, Source::manual("admin"));
        assert_eq!(got[0].added_ms, 7);
        assert_eq!(got[0].reason, "imported");
        let e = parse_csv(b"address\nok@example.com\nnot-an-address\n", "admin", 7).unwrap_err();
        assert!(matches!(e, CoreError::Csv { line: 3, .. }), "{e}");
        assert!(parse_csv(b"adress\nok@example.com\n", "a", 0).is_err());
        assert!(parse_csv(b"address\nA@x.example\na@X.example\n", "a", 0).is_err());
        assert!(parse_csv(b"address,expires\na@x.example,tomorrow\n", "a", 0).is_err());
        assert!(parse_csv(b"address,source\na@x.example,guess\n", "a", 0).is_err());
    }
}
