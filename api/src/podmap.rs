//! The pod-IP identity map's Redis contract, shared by its one writer (the leading operator) and
//! its readers (the relays): key names, the value of each hash field, and the meaning of the
//! generation and heartbeat keys. Pure: no I/O, no Kubernetes types.
//!
//! Layout, every key under the relay's Redis prefix (one hash tag, so the writer's
//! transactions and RENAME stay on one cluster slot):
//! - `<prefix>podmap:ips`: hash, canonical IP text → JSON [`Entry`];
//! - `<prefix>podmap:generation`: integer, changed in the same transaction as every change of
//!   the hash (readers reload the hash when it differs from theirs): a full replacement sets a
//!   fresh value (Unix ms × 1000, never a count from zero that could repeat after Redis lost its
//!   data), each diff increments it;
//! - `<prefix>podmap:heartbeat`: the writer's Unix time in ms, written every publish interval
//!   with a TTL of [`heartbeat_ttl`]: while the key exists the map is current. Expiry runs on the
//!   Redis server's clock, so no reader compares clocks with the writer.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Redis key names under a prefix (e.g. the relay's `{mailroute}:`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// The live hash readers load.
    pub ips: String,
    /// Where a full replacement is staged before it is RENAMEd over `ips`.
    pub staging: String,
    pub generation: String,
    pub heartbeat: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            ips: format!("{prefix}podmap:ips"),
            staging: format!("{prefix}podmap:ips:staging"),
            generation: format!("{prefix}podmap:generation"),
            heartbeat: format!("{prefix}podmap:heartbeat"),
        }
    }
}

/// How long a heartbeat keeps the map current: three publish intervals, so one late or lost
/// write does not blank the map, and a writer that died (or lost its Pod watch) stops
/// vouching for it within seconds.
pub fn heartbeat_ttl(publish_interval: Duration) -> Duration {
    publish_interval * 3
}

/// What an IP stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Entry {
    /// Exactly one live pod has this IP.
    #[serde(rename_all = "camelCase")]
    Pod {
        namespace: String,
        service_account: String,
        pod_uid: String,
    },
    /// Several live pods claim this IP (typically one terminating while its successor starts
    /// with the reused address): nobody is attributed.
    #[serde(rename_all = "camelCase")]
    Ambiguous { pods: u32 },
}

/// The hash field of an IP: its canonical text (IPv4 dotted, IPv6 compressed; an IPv4-mapped
/// IPv6 address is stored and looked up as IPv4).
pub fn field(ip: IpAddr) -> String {
    canonical(ip).to_string()
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`, how a dual-stack listener sees IPv4 clients) as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Entry {
    pub fn encode(&self) -> String {
        // Serialising plain strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(s: &str) -> Result<Entry, serde_json::Error> {
        serde_json::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_in_a_stable_wire_form() {
        let e = Entry::Pod {
            namespace: "team-a".into(),
            service_account: "mailer".into(),
            pod_uid: "u1".into(),
        };
        assert_eq!(
            e.encode(),
            r#"{"pod":{"namespace":"team-a","serviceAccount":"mailer","podUid":"u1"}}"#
        );
        assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        let a = Entry::Ambiguous { pods: 2 };
        assert_eq!(a.encode(), r#"{"ambiguous":{"pods":2}}"#);
        assert_eq!(Entry::decode(&a.encode()).unwrap(), a);
        assert!(Entry::decode("{}").is_err());
    }

    #[test]
    fn mapped_ipv4_is_the_same_field_as_ipv4() {
        assert_eq!(field("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.3");
        assert_eq!(field("fd00::0001".parse().unwrap()), "fd00::1");
        assert_eq!(Keys::new("{m}:").generation, "{m}:podmap:generation");
    }
}
