//! Name resolution for delivery: the injectable [`MxResolver`] (MX records and host addresses),
//! its hickory-resolver implementation for production, a static map implementation for tests
//! and local runs, and the pure MX ordering rules of RFC 5321 §5.1 / RFC 7505 ([`mx_hosts`]).
//!
//! This module must not connect to mail servers or decide what a DNS failure means for the
//! message (the caller maps [`DnsError`] to a `bounce::Failure`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// A failed lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// NXDOMAIN: the name does not exist.
    #[error("{0}: no such domain")]
    NoSuchDomain(String),
    /// The name exists but has no records of the asked type.
    #[error("{0}: no records")]
    NoRecords(String),
    /// Anything that may succeed later (SERVFAIL, timeouts, unreachable resolver).
    #[error("DNS lookup of {name} failed: {reason}")]
    Temporary { name: String, reason: String },
}

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    /// Host name, as published (a trailing dot is allowed; `.` is the RFC 7505 null MX).
    pub exchange: String,
}

/// Looks up MX records and addresses. Implementations must be cheap to share between tasks.
pub trait MxResolver: Send + Sync {
    /// The MX records of `domain`; an empty list when the domain exists but publishes none
    /// (then the domain itself is the implicit MX), [`DnsError::NoSuchDomain`] when it does not exist.
    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<Vec<MxRecord>, DnsError>>;

    /// The A and AAAA addresses of `host`.
    fn ips<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, DnsError>>;
}

/// Where to deliver mail for a domain, from its MX records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxPlan {
    /// Host names to try, in order.
    Hosts(Vec<String>),
    /// RFC 7505 null MX: the domain accepts no mail.
    NullMx,
}

/// Orders MX records for delivery: by preference (stable, so equal preferences keep the order
/// the resolver returned), lower-cased, without trailing dots and duplicates. No records means
/// the domain itself (RFC 5321 §5.1 implicit MX). A lone `.` exchange is a null MX; a `.` among
/// real hosts is ignored.
pub fn mx_hosts(domain: &str, mut records: Vec<MxRecord>) -> MxPlan {
    let norm = |s: &str| s.trim().trim_end_matches('.').to_ascii_lowercase();
    if records.is_empty() {
        return MxPlan::Hosts(vec![norm(domain)]);
    }
    records.sort_by_key(|r| r.preference);
    let mut hosts: Vec<String> = Vec::new();
    for r in &records {
        let h = norm(&r.exchange);
        if !h.is_empty() && !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    if hosts.is_empty() {
        MxPlan::NullMx
    } else {
        MxPlan::Hosts(hosts)
    }
}

/// The production resolver: hickory-resolver with the system configuration or a given server.
#[derive(Clone)]
pub struct HickoryResolver {
    inner: Arc<TokioResolver>,
}

impl std::fmt::Debug for HickoryResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HickoryResolver")
    }
}

impl HickoryResolver {
    /// Uses `/etc/resolv.conf`.
    pub fn system() -> Result<Self, DnsError> {
        let builder = TokioResolver::builder_tokio().map_err(|e| DnsError::Temporary {
            name: "/etc/resolv.conf".into(),
            reason: e.to_string(),
        })?;
        let inner = builder.build().map_err(|e| DnsError::Temporary {
            name: "resolver".into(),
            reason: e.to_string(),
        })?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Queries only `server` (UDP, then TCP for truncated answers), e.g. `--dns-server`.
    pub fn with_server(server: SocketAddr) -> Result<Self, DnsError> {
        Self::with_server_and_search(server, vec![], ResolverOpts::default())
    }

    /// Like [`Self::with_server`], with a search list and options, as a pod's resolv.conf
    /// gives them (tests use it to show that lookups never walk the search list).
    fn with_server_and_search(
        server: SocketAddr,
        search: Vec<hickory_resolver::proto::rr::Name>,
        opts: ResolverOpts,
    ) -> Result<Self, DnsError> {
        let mut udp = ConnectionConfig::udp();
        udp.port = server.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = server.port();
        let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
        let config = ResolverConfig::from_parts(None, search, vec![ns]);
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| DnsError::Temporary {
                name: server.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self { inner: Arc::new(inner) })
    }
}

/// Fully qualified, so the resolver does not walk the search list (Kubernetes uses ndots:5).
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

fn map_err(name: &str, e: &NetError) -> DnsError {
    if e.is_nx_domain() {
        DnsError::NoSuchDomain(name.to_owned())
    } else if e.is_no_records_found() {
        DnsError::NoRecords(name.to_owned())
    } else {
        DnsError::Temporary {
            name: name.to_owned(),
            reason: e.to_string(),
        }
    }
}

impl MxResolver for HickoryResolver {
    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<Vec<MxRecord>, DnsError>> {
        Box::pin(async move {
            match self.inner.mx_lookup(fqdn(domain)).await {
                Ok(lookup) => Ok(lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some(MxRecord {
                            preference: mx.preference,
                            exchange: mx.exchange.to_ascii(),
                        }),
                        _ => None,
                    })
                    .collect()),
                Err(e) => match map_err(domain, &e) {
                    DnsError::NoRecords(_) => Ok(vec![]),
                    other => Err(other),
                },
            }
        })
    }

    fn ips<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, DnsError>> {
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(vec![ip]);
            }
            match self.inner.lookup_ip(fqdn(host)).await {
                Ok(lookup) => {
                    let ips: Vec<IpAddr> = lookup.iter().collect();
                    if ips.is_empty() {
                        Err(DnsError::NoRecords(host.to_owned()))
                    } else {
                        Ok(ips)
                    }
                }
                Err(e) => Err(map_err(host, &e)),
            }
        })
    }
}

/// A fixed map of names, for tests and local runs: MX records per domain and addresses per
/// host. Names are compared case-insensitively without a trailing dot; anything not in the map
/// does not exist.
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    mx: HashMap<String, Vec<MxRecord>>,
    hosts: HashMap<String, Vec<IpAddr>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl StaticResolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an MX record `domain MX preference exchange`.
    pub fn with_mx(mut self, domain: &str, preference: u16, exchange: &str) -> Self {
        self.mx.entry(key(domain)).or_default().push(MxRecord {
            preference,
            exchange: exchange.to_owned(),
        });
        self
    }

    /// Adds an address record for `host`.
    pub fn with_host(mut self, host: &str, ip: IpAddr) -> Self {
        self.hosts.entry(key(host)).or_default().push(ip);
        self
    }
}

impl MxResolver for StaticResolver {
    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<Vec<MxRecord>, DnsError>> {
        let k = key(domain);
        let result = match (self.mx.get(&k), self.hosts.contains_key(&k)) {
            (Some(records), _) => Ok(records.clone()),
            (None, true) => Ok(vec![]),
            (None, false) => Err(DnsError::NoSuchDomain(domain.to_owned())),
        };
        Box::pin(std::future::ready(result))
    }

    fn ips<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, DnsError>> {
        let result = if let Ok(ip) = host.parse::<IpAddr>() {
            Ok(vec![ip])
        } else {
            self.hosts
                .get(&key(host))
                .cloned()
                .ok_or_else(|| DnsError::NoSuchDomain(host.to_owned()))
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn mx(preference: u16, exchange: &str) -> MxRecord {
        MxRecord {
            preference,
            exchange: exchange.into(),
        }
    }

    #[test]
    fn mx_hosts_sorted_by_preference_and_normalised() {
        let plan = mx_hosts(
            "example.com",
            vec![
                mx(20, "MX2.example.com."),
                mx(10, "mx1.example.com."),
                mx(20, "mx3.example.com"),
                mx(30, "mx1.example.com"),
            ],
        );
        assert_eq!(
            plan,
            MxPlan::Hosts(vec![
                "mx1.example.com".into(),
                "mx2.example.com".into(),
                "mx3.example.com".into()
            ])
        );
    }

    #[test]
    fn implicit_mx_and_null_mx() {
        assert_eq!(
            mx_hosts("Example.COM.", vec![]),
            MxPlan::Hosts(vec!["example.com".into()])
        );
        assert_eq!(mx_hosts("example.com", vec![mx(0, ".")]), MxPlan::NullMx);
        assert_eq!(
            mx_hosts("example.com", vec![mx(0, "."), mx(10, "mx.example.com")]),
            MxPlan::Hosts(vec!["mx.example.com".into()])
        );
    }

    /// A UDP DNS server on 127.0.0.1 that records every name asked and answers only for
    /// `example.test` (MX to mx.example.test, which has 127.0.0.1); anything else is NXDOMAIN.
    async fn recording_dns_server() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
        use hickory_resolver::proto::rr::rdata::{A, MX};
        use hickory_resolver::proto::rr::{Name, Record, RecordType};

        let socket = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind dns");
        let addr = socket.local_addr().expect("addr");
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries.first().cloned() else {
                    continue;
                };
                let name = q.name().to_ascii().to_ascii_lowercase();
                log.lock().expect("log").push(name.clone());
                let mut resp = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
                resp.metadata.authoritative = true;
                resp.metadata.recursion_desired = query.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                resp.add_query(q.clone());
                match (name.as_str(), q.query_type()) {
                    ("example.test.", RecordType::MX) => {
                        let ex = Name::from_ascii("mx.example.test.").expect("name");
                        resp.add_answer(Record::from_rdata(q.name().clone(), 60, RData::MX(MX::new(10, ex))));
                    }
                    ("mx.example.test.", RecordType::A) => {
                        resp.add_answer(Record::from_rdata(
                            q.name().clone(),
                            60,
                            RData::A(A(Ipv4Addr::LOCALHOST)),
                        ));
                    }
                    ("example.test." | "mx.example.test.", _) => {}
                    _ => resp.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        (addr, asked)
    }

    /// Kubernetes pods resolve with `ndots:5` and several search domains: a relative name would
    /// first be tried under each of them (one wasted round trip per domain, per lookup, and a
    /// wrong answer if a search domain has a wildcard). Lookups must ask the absolute name only.
    #[tokio::test]
    async fn lookups_ask_absolute_names_and_never_walk_the_search_list() {
        use hickory_resolver::proto::rr::Name;
        let (dns, asked) = recording_dns_server().await;
        let mut opts = ResolverOpts::default();
        opts.ndots = 5;
        opts.attempts = 1;
        let search = vec![
            Name::from_ascii("ns.svc.cluster.local.").expect("name"),
            Name::from_ascii("cluster.local.").expect("name"),
        ];
        let r = HickoryResolver::with_server_and_search(dns, search, opts).expect("resolver");
        assert_eq!(r.mx("example.test").await, Ok(vec![mx(10, "mx.example.test.")]));
        assert_eq!(
            r.ips("mx.example.test").await,
            Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)])
        );
        let asked = asked.lock().expect("log").clone();
        assert!(
            asked.iter().all(|n| !n.contains("cluster.local")),
            "search domains were queried: {asked:?}"
        );
        assert!(asked.contains(&"example.test.".to_owned()), "{asked:?}");
    }

    #[tokio::test]
    async fn static_resolver_answers_from_its_map() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let r = StaticResolver::new()
            .with_mx("example.test", 10, "mx.example.test")
            .with_host("mx.example.test", lo)
            .with_host("plain.test", lo);
        assert_eq!(r.mx("EXAMPLE.test.").await, Ok(vec![mx(10, "mx.example.test")]));
        assert_eq!(r.mx("plain.test").await, Ok(vec![]));
        assert_eq!(r.mx("nope.test").await, Err(DnsError::NoSuchDomain("nope.test".into())));
        assert_eq!(r.ips("mx.example.test").await, Ok(vec![lo]));
        assert_eq!(r.ips("127.0.0.1").await, Ok(vec![lo]));
        assert!(matches!(r.ips("gone.test").await, Err(DnsError::NoSuchDomain(_))));
    }
}
