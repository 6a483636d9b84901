//! The stored form of a queued message's record in the Redis hash: what the fields `meta` and
//! `body` hold, written and read here only. Pure functions; no I/O.
//!
//! Two forms, both read:
//!
//! - **JSON** (relays before the compact record): `meta` is the [`MessageMeta`] as JSON, `body`
//!   the whole body.
//! - **Compact** (written now): `meta` starts with [`COMPACT`] (a byte JSON never starts with),
//!   then the meta in a binary layout (LEB128 integers, length-prefixed strings; the id is the
//!   key's and not repeated), then the length of the body's *tail* and the tail; `body` holds the body's head. The body
//!   is cut so that the head fills a jemalloc size class exactly (Redis allocates each hash value
//!   as an sds string rounded up to a class: a 4,289-byte body took 5,120 bytes, 831 of them
//!   empty) and the tail shares the meta's allocation. Only tails up to [`MAX_TAIL`] are split
//!   off, so that reading `meta` alone (the admin API, bulk control) stays small.
//!
//! Relays of the JSON era cannot read the compact record: their JSON parse of `meta` fails, which
//! they treat as a load error and retry after the visibility timeout (the job stays leased, then
//! another relay takes it over); `meta` and `body` are always both present, since an old relay
//! takes a record without them as gone. So during a rolling upgrade a message written by a new
//! relay and picked up by an old one is delayed, never lost; once no old relay is left, every
//! message is delivered. Rolling back to a JSON-era relay strands compact records until a relay
//! of this version runs again (they are not lost either), so a rollback first sets the relays'
//! `--queue-record json` ([`Form`]) and waits for the compact records to drain.

use crate::inbound::listener::ListenerKind;
use crate::queue::message::{DeliveryOptions, MessageMeta, Origin};

/// First byte of a compact `meta` value (format 2).
pub const COMPACT: u8 = 0x02;

/// Largest body tail kept in `meta`; a longer one (bodies over about 32 KiB) is not split off.
pub const MAX_TAIL: usize = 4096;

const TLS: u64 = 1;
const DSN: u64 = 1 << 1;
const AUTH_USER: u64 = 1 << 2;
const NAMESPACE: u64 = 1 << 3;
const SERVICE_ACCOUNT: u64 = 1 << 4;
const MESSAGE_ID: u64 = 1 << 5;
const QUOTA: u64 = 1 << 6;
const DELIVER_AFTER: u64 = 1 << 7;
const EXPIRE_AT: u64 = 1 << 8;
const RETRY_INTERVAL: u64 = 1 << 9;
const QUIET_HOURS: u64 = 1 << 10;
const KNOWN: u64 = (1 << 11) - 1;

/// A record as the hash stores it: the `meta` value and how many body bytes go into `body`
/// (`body[..head]`; the rest is at the end of `meta`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub meta: Vec<u8>,
    pub head: usize,
}

/// The compact record of `meta` and `body`.
pub fn encode(meta: &MessageMeta, body: &[u8]) -> Encoded {
    // Every field named: one added to MessageMeta does not compile until it is stored here
    // (with a new flag, which this version's readers refuse as unknown: a retry, not a loss).
    let MessageMeta {
        id: _,
        received_at_ms: _,
        source_ip: _,
        listener: _,
        auth_user: _,
        namespace: _,
        service_account: _,
        tls: _,
        mail_from: _,
        rcpts: _,
        message_id_header: _,
        size: _,
        options:
            DeliveryOptions {
                deliver_after_ms: _,
                expire_at_ms: _,
                retry_interval_secs: _,
                quiet_hours: _,
            },
        quota: _,
        is_dsn: _,
    } = meta;
    let mut out = Vec::with_capacity(128 + meta.rcpts.iter().map(String::len).sum::<usize>());
    out.push(COMPACT);
    let o = &meta.options;
    let mut flags = 0;
    for (set, bit) in [
        (meta.tls, TLS),
        (meta.is_dsn, DSN),
        (meta.auth_user.is_some(), AUTH_USER),
        (meta.namespace.is_some(), NAMESPACE),
        (meta.service_account.is_some(), SERVICE_ACCOUNT),
        (meta.message_id_header.is_some(), MESSAGE_ID),
        (meta.quota.is_some(), QUOTA),
        (o.deliver_after_ms.is_some(), DELIVER_AFTER),
        (o.expire_at_ms.is_some(), EXPIRE_AT),
        (o.retry_interval_secs.is_some(), RETRY_INTERVAL),
        (o.quiet_hours.is_some(), QUIET_HOURS),
    ] {
        if set {
            flags |= bit;
        }
    }
    put_uint(&mut out, flags);
    out.push(match meta.listener {
        Origin::Listener(ListenerKind::Smtp) => 0,
        Origin::Listener(ListenerKind::Submission) => 1,
        Origin::Listener(ListenerKind::Smtps) => 2,
        Origin::Dsn => 3,
    });
    put_int(&mut out, meta.received_at_ms);
    put_uint(&mut out, meta.size as u64);
    put_str(&mut out, &meta.source_ip);
    put_str(&mut out, &meta.mail_from);
    put_uint(&mut out, meta.rcpts.len() as u64);
    for r in &meta.rcpts {
        put_str(&mut out, r);
    }
    for s in [
        &meta.auth_user,
        &meta.namespace,
        &meta.service_account,
        &meta.message_id_header,
        &meta.quota,
    ]
    .into_iter()
    .flatten()
    {
        put_str(&mut out, s);
    }
    if let Some(v) = o.deliver_after_ms {
        put_int(&mut out, v);
    }
    if let Some(v) = o.expire_at_ms {
        put_int(&mut out, v);
    }
    if let Some(v) = o.retry_interval_secs {
        put_uint(&mut out, v);
    }
    if let Some(s) = &o.quiet_hours {
        put_str(&mut out, s);
    }
    // The tail's length (at most two bytes, as MAX_TAIL < 2^14) lets a reader check it.
    let head = split(out.len() + 2, body.len());
    put_uint(&mut out, (body.len() - head) as u64);
    out.extend_from_slice(&body[head..]);
    Encoded { meta: out, head }
}

/// Which form an enqueue writes. Readers take both; `Json` is for going back to a relay of the
/// JSON era (set it, let the compact records drain, then roll back: an older relay cannot read
/// them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Form {
    #[default]
    Compact,
    Json,
}

/// The record of `meta` and `body` in `form`.
pub fn encode_as(form: Form, meta: &MessageMeta, body: &[u8]) -> Result<Encoded, String> {
    match form {
        Form::Compact => Ok(encode(meta, body)),
        Form::Json => serde_json::to_vec(meta)
            .map(|meta| Encoded { meta, head: body.len() })
            .map_err(|e| e.to_string()),
    }
}

/// The meta of a stored record (either form) and the body's tail kept in it (empty for JSON).
/// `id` is the message's (its key's) id.
pub fn decode<'a>(id: &str, raw: &'a [u8]) -> Result<(MessageMeta, &'a [u8]), String> {
    match raw.first() {
        Some(&COMPACT) => decode_compact(id, &raw[1..]),
        _ => serde_json::from_slice::<MessageMeta>(raw)
            .map(|m| (m, &raw[..0]))
            .map_err(|e| e.to_string()),
    }
}

fn decode_compact<'a>(id: &str, raw: &'a [u8]) -> Result<(MessageMeta, &'a [u8]), String> {
    let mut r = Reader(raw);
    let flags = r.uint()?;
    if flags & !KNOWN != 0 {
        return Err(format!("unknown record flags {flags:#x}"));
    }
    let listener = match r.byte()? {
        0 => Origin::Listener(ListenerKind::Smtp),
        1 => Origin::Listener(ListenerKind::Submission),
        2 => Origin::Listener(ListenerKind::Smtps),
        3 => Origin::Dsn,
        b => return Err(format!("unknown origin {b}")),
    };
    let received_at_ms = r.int()?;
    let size = usize::try_from(r.uint()?).map_err(|_| "size out of range".to_owned())?;
    let source_ip = r.string()?;
    let mail_from = r.string()?;
    let n = r.uint()?;
    // Each recipient takes at least its length byte: a count beyond the bytes left is corrupt.
    if n > r.0.len() as u64 {
        return Err(format!("{n} recipients in {} bytes", r.0.len()));
    }
    let rcpts = (0..n).map(|_| r.string()).collect::<Result<Vec<_>, _>>()?;
    let mut opt = |bit| {
        if flags & bit != 0 {
            r.string().map(Some)
        } else {
            Ok(None)
        }
    };
    let auth_user = opt(AUTH_USER)?;
    let namespace = opt(NAMESPACE)?;
    let service_account = opt(SERVICE_ACCOUNT)?;
    let message_id_header = opt(MESSAGE_ID)?;
    let quota = opt(QUOTA)?;
    let deliver_after_ms = if flags & DELIVER_AFTER != 0 {
        Some(r.int()?)
    } else {
        None
    };
    let expire_at_ms = if flags & EXPIRE_AT != 0 { Some(r.int()?) } else { None };
    let retry_interval_secs = if flags & RETRY_INTERVAL != 0 {
        Some(r.uint()?)
    } else {
        None
    };
    let quiet_hours = if flags & QUIET_HOURS != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let tail = r.uint()?;
    if tail != r.0.len() as u64 {
        return Err(format!("body tail of {} bytes, {tail} expected", r.0.len()));
    }
    let meta = MessageMeta {
        id: id.to_owned(),
        received_at_ms,
        source_ip,
        listener,
        auth_user,
        namespace,
        service_account,
        tls: flags & TLS != 0,
        mail_from,
        rcpts,
        message_id_header,
        size,
        options: DeliveryOptions {
            deliver_after_ms,
            expire_at_ms,
            retry_interval_secs,
            quiet_hours,
        },
        quota,
        is_dsn: flags & DSN != 0,
    };
    Ok((meta, r.0))
}

/// The body: `head` (the `body` field) followed by `tail` (from `meta`).
pub fn join(head: Vec<u8>, tail: &[u8]) -> bytes::Bytes {
    if tail.is_empty() {
        return bytes::Bytes::from(head);
    }
    let mut b = head;
    b.extend_from_slice(tail);
    bytes::Bytes::from(b)
}

/// Where to cut a body of `body` bytes whose tail goes after `meta` bytes of meta, so that the
/// two values take the fewest bytes in Redis' allocator. Returns the head's length: the whole
/// body when cutting saves nothing. The head is never empty unless the body is.
pub fn split(meta: usize, body: usize) -> usize {
    let cost = |head: usize| sds_alloc(head) + sds_alloc(meta + body - head);
    let mut best = body;
    // The largest head that fills its class exactly, and the one a class below.
    let mut class = smaller_class(sds_alloc(body));
    for _ in 0..2 {
        let head = payload(class);
        if head == 0 || head >= body || body - head > MAX_TAIL {
            break;
        }
        if cost(head) < cost(best) {
            best = head;
        }
        class = smaller_class(class);
    }
    best
}

/// Bytes Redis allocates for a string value of `len` bytes (an sds: header, bytes, NUL), as
/// jemalloc rounds it.
pub fn sds_alloc(len: usize) -> usize {
    size_class(sds_header(len) + len + 1)
}

fn sds_header(len: usize) -> usize {
    match len {
        0..32 => 1,
        32..256 => 3,
        256..65536 => 5,
        _ => 9,
    }
}

/// The most bytes an sds string in an allocation of exactly `class` bytes holds.
fn payload(class: usize) -> usize {
    // The header depends on the length: the smallest header whose length fits is the longest.
    [1, 3, 5, 9]
        .into_iter()
        .map(|h| class.saturating_sub(h + 1))
        .find(|&len| sds_header(len) + len < class)
        .unwrap_or(0)
}

/// jemalloc's size class for `n` bytes (its default configuration, as Redis builds it: 16-byte
/// quantum, four classes per doubling).
pub fn size_class(n: usize) -> usize {
    match n {
        0..=8 => 8,
        9..=128 => n.div_ceil(16) * 16,
        _ => {
            let spacing = n.next_power_of_two() / 8;
            n.div_ceil(spacing) * spacing
        }
    }
}

/// The class below `class` (a size class above 8).
fn smaller_class(class: usize) -> usize {
    match class {
        0..=16 => 8,
        17..=128 => class - 16,
        _ => class - class.next_power_of_two() / 8,
    }
}

fn put_uint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_int(out: &mut Vec<u8>, v: i64) {
    put_uint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.0.split_first().ok_or("record cut short")?;
        self.0 = rest;
        Ok(b)
    }

    fn uint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("integer too long".to_owned())
    }

    fn int(&mut self) -> Result<i64, String> {
        let u = self.uint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = usize::try_from(self.uint()?).map_err(|_| "length out of range".to_owned())?;
        if n > self.0.len() {
            return Err("record cut short".to_owned());
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(s.to_vec()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> MessageMeta {
        MessageMeta {
            id: "1a245dc7aa803c1952b93bde53".into(),
            received_at_ms: 1_764_932_400_123,
            source_ip: "127.0.0.1".into(),
            listener: ListenerKind::Smtp.into(),
            auth_user: None,
            namespace: None,
            service_account: None,
            tls: false,
            mail_from: String::new(),
            rcpts: vec!["rcpt-0@bench.example".into()],
            message_id_header: None,
            size: 4096,
            options: DeliveryOptions::default(),
            quota: None,
            is_dsn: false,
        }
    }

    fn full() -> MessageMeta {
        MessageMeta {
            id: "0193".into(),
            received_at_ms: -5,
            source_ip: "2001:db8::1".into(),
            listener: Origin::Dsn,
            auth_user: Some("shop".into()),
            namespace: Some("team-a".into()),
            service_account: Some("mailer".into()),
            tls: true,
            mail_from: "bounces@shop.example".into(),
            rcpts: (0..300).map(|i| format!("r{i}@ünïcode.example")).collect(),
            message_id_header: Some("<a@b>".into()),
            size: usize::MAX >> 1,
            options: DeliveryOptions {
                deliver_after_ms: Some(i64::MIN),
                expire_at_ms: Some(i64::MAX),
                retry_interval_secs: Some(u64::MAX),
                quiet_hours: Some("22:00-07:00 Asia/Tokyo".into()),
            },
            quota: Some("team-a/q".into()),
            is_dsn: true,
        }
    }

    fn round_trip(meta: &MessageMeta, body: &[u8]) {
        let rec = encode(meta, body);
        assert_eq!(rec.meta[0], COMPACT);
        assert!(rec.head <= body.len());
        let (back, tail) = decode(&meta.id, &rec.meta).expect("decodes");
        assert_eq!(&back, meta);
        let joined = join(body[..rec.head].to_vec(), tail);
        assert_eq!(&joined[..], body, "body of {} bytes", body.len());
    }

    #[test]
    fn records_round_trip_whatever_the_meta_and_body() {
        for origin in [
            Origin::Listener(ListenerKind::Smtp),
            Origin::Listener(ListenerKind::Submission),
            Origin::Listener(ListenerKind::Smtps),
            Origin::Dsn,
        ] {
            let mut m = minimal();
            m.listener = origin;
            round_trip(&m, b"x");
        }
        for len in [
            0, 1, 31, 32, 255, 256, 4089, 4090, 4091, 4289, 8000, 10_446, 40_000, 200_000,
        ] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            round_trip(&minimal(), &body);
            round_trip(&full(), &body);
        }
    }

    #[test]
    fn records_of_relays_before_the_compact_form_still_read() {
        let m = full();
        let json = serde_json::to_vec(&m).unwrap();
        let (back, tail) = decode("ignored: JSON carries its id", &json).unwrap();
        assert_eq!(back, m);
        assert!(tail.is_empty());
        let old = br#"{"id":"m1","received_at_ms":1,"source_ip":"10.0.0.1","listener":"smtp","tls":false,"mail_from":"a@b.example","rcpts":["c@d.example"],"size":10,"options":{},"is_dsn":false}"#;
        assert_eq!(decode("m1", old).unwrap().0.rcpts, ["c@d.example"]);
    }

    /// What a relay from before the compact record does with one: its JSON parse fails (a load
    /// error it retries), it does not take the record for a message without meta.
    #[test]
    fn relays_before_the_compact_form_refuse_it_as_unreadable() {
        let rec = encode(&minimal(), &[b'a'; 4289]);
        assert!(serde_json::from_slice::<MessageMeta>(&rec.meta).is_err());
        assert!(rec.head > 0, "the body field is never empty for a non-empty body");
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let rec = encode(&full(), &[b'a'; 4289]);
        for cut in 1..rec.meta.len() {
            assert!(decode("x", &rec.meta[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = rec.meta.clone();
        longer.push(b'!');
        assert!(decode("x", &longer).is_err());
        assert!(
            decode(
                "x",
                &[
                    COMPACT, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
                ]
            )
            .is_err()
        );
        assert!(decode("x", &[COMPACT, 0x80, 0x80, 0x01]).is_err(), "unknown flags");
        assert!(decode("x", &[COMPACT, 0, 9]).is_err(), "unknown origin");
        assert!(decode("x", b"").is_err());
    }

    #[test]
    fn size_classes_are_jemalloc_s() {
        let classes: Vec<usize> = (1..=16384).map(size_class).collect();
        let mut distinct = classes.clone();
        distinct.dedup();
        assert_eq!(
            distinct[..24],
            [
                8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280,
                1536, 1792
            ]
        );
        assert_eq!(
            (size_class(4096), size_class(4097), size_class(10_447)),
            (4096, 5120, 12288)
        );
        for c in distinct.iter().skip(1) {
            assert_eq!(size_class(smaller_class(*c)), smaller_class(*c));
            assert!(smaller_class(*c) < *c && size_class(smaller_class(*c) + 1) == *c);
        }
        assert_eq!(payload(4096), 4090);
        assert_eq!(sds_alloc(4090), 4096);
        assert_eq!(sds_alloc(4091), 5120);
        assert_eq!(sds_alloc(4289), 5120);
    }

    /// The cut fills the head's class exactly and never costs more than no cut.
    #[test]
    fn the_cut_wastes_less_than_the_whole_body() {
        for body in (1..40_000).step_by(7) {
            for meta in [40, 120, 600] {
                let head = split(meta, body);
                let cost = sds_alloc(head) + sds_alloc(meta + body - head);
                assert!(cost <= sds_alloc(body) + sds_alloc(meta), "{meta} + {body}");
                assert!(body - head <= MAX_TAIL);
                if head < body {
                    assert_eq!(
                        sds_alloc(head),
                        head + sds_header(head) + 1,
                        "{body}: head fills its class"
                    );
                }
            }
        }
        // The bench's 4 KiB message with its Received header: 5,120 + 128 bytes become 4,096 + 320.
        let head = split(110, 4289);
        assert_eq!(head, 4090);
        assert_eq!(sds_alloc(head) + sds_alloc(110 + 4289 - head), 4096 + 320);
    }
}
