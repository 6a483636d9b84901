//! Which pacing limits apply to one delivery (a route and a recipient domain), including the
//! built-in defaults for strict mobile carriers, and under which shared keys they are counted.
//! Pure; no I/O.

use mailroute_api::config::{CompiledRoute, Target};
use mailroute_api::pattern::DomainPattern;

use super::gcra::Gcra;

/// Mobile carrier domains that filter bursts (the reference list); MX delivery to them is paced
/// by [`CARRIER_LIMITS`] unless the route has a `perDestination` entry matching them.
pub const CARRIER_DOMAINS: [&str; 5] = [
    "docomo.ne.jp",
    "ezweb.ne.jp",
    "au.com",
    "softbank.ne.jp",
    "i.softbank.jp",
];

/// Built-in limits per carrier domain, deliberately conservative: one message a second spread
/// evenly (no bursts), two concurrent connections across all pods, ten messages per connection.
/// A day's campaign of 50,000 messages to one carrier then takes about 14 hours; senders with an
/// agreement with the carrier raise them with `perDestination`.
pub const CARRIER_LIMITS: DestinationValues = DestinationValues {
    messages_per_minute: Some(60),
    max_connections: Some(2),
    messages_per_connection: Some(10),
};

/// Route's `recipientsPerDay` is counted over a rolling 24 hours (hourly buckets, 25 of them:
/// a recipient counts for 24 to 25 hours), which also never exceeds a calendar-day limit.
pub const DAILY_BUCKET_MS: i64 = 3_600_000;
pub const DAILY_SPAN: i64 = 25;

/// Limits towards one destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestinationValues {
    pub messages_per_minute: Option<u32>,
    pub max_connections: Option<u32>,
    pub messages_per_connection: Option<u32>,
}

/// Where destination limits came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationSource {
    /// The route's `perDestination`.
    Route,
    /// [`CARRIER_LIMITS`].
    CarrierDefault,
    /// No destination limits.
    None,
}

/// Everything pacing needs for one (route, recipient domain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shaping {
    pub route_id: String,
    /// Lower-cased, without a trailing dot.
    pub domain: String,
    pub mx: bool,
    pub route_rate: Option<Gcra>,
    pub route_recipients_per_day: Option<u32>,
    pub route_max_connections: Option<u32>,
    pub destination: DestinationValues,
    pub destination_source: DestinationSource,
}

impl Shaping {
    /// Resolves the limits of `route` for recipients in `rcpt_domain`.
    pub fn resolve(route: &CompiledRoute, rcpt_domain: &str) -> Self {
        let domain = rcpt_domain.trim_end_matches('.').to_ascii_lowercase();
        let mx = matches!(route.target, Target::Mx);
        let l = &route.limits;
        let (destination, destination_source) = match l.destination(&domain) {
            Some(d) => (
                DestinationValues {
                    messages_per_minute: d.messages_per_minute,
                    max_connections: d.max_connections,
                    messages_per_connection: d.messages_per_connection,
                },
                DestinationSource::Route,
            ),
            None if mx && is_carrier(&domain) => (CARRIER_LIMITS, DestinationSource::CarrierDefault),
            None => (DestinationValues::default(), DestinationSource::None),
        };
        Shaping {
            route_id: route.id.clone(),
            domain,
            mx,
            route_rate: l.messages_per_minute.map(Gcra::per_minute),
            route_recipients_per_day: l.recipients_per_day,
            route_max_connections: l.max_connections,
            destination,
            destination_source,
        }
    }

    /// Messages per connection: the stricter of the route's and the destination's.
    pub fn messages_per_connection(&self, route: &CompiledRoute) -> Option<u32> {
        match (
            route.limits.messages_per_connection,
            self.destination.messages_per_connection,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn destination_rate(&self) -> Option<Gcra> {
        self.destination.messages_per_minute.map(Gcra::per_minute)
    }

    /// Destination counters: for MX delivery shared by every MX route (the destination sees
    /// one sender, our egress), for a smarthost per route (the smarthost relays for us).
    pub fn destination_scope(&self) -> String {
        if self.mx {
            format!("mx:{}", self.domain)
        } else {
            format!("route:{}:{}", self.route_id, self.domain)
        }
    }

    /// Back-off after rate-limit replies: a smarthost throttles the whole route, an MX only
    /// its own domain.
    pub fn backoff_scope(&self) -> String {
        if self.mx {
            format!("mx:{}", self.domain)
        } else {
            format!("route:{}", self.route_id)
        }
    }
}

/// Whether `domain` is one of [`CARRIER_DOMAINS`].
pub fn is_carrier(domain: &str) -> bool {
    CARRIER_DOMAINS
        .iter()
        .any(|c| DomainPattern::Exact((*c).to_string()).matches(domain))
}

#[cfg(test)]
pub(crate) mod tests {
    use mailroute_api::config::{DestinationLimits, RetryConfig, RouteLimits};
    use mailroute_api::route::TlsMode;

    use super::*;

    pub(crate) fn route(id: &str, mx: bool, limits: RouteLimits) -> CompiledRoute {
        CompiledRoute {
            id: id.into(),
            authority: Default::default(),
            priority: 100,
            target: if mx {
                Target::Mx
            } else {
                Target::Smarthost(mailroute_api::config::Upstream {
                    host: "smtp.example.net".into(),
                    port: 587,
                    tls: TlsMode::Starttls,
                    verify_tls: true,
                    server_name: None,
                    auth: None,
                    custom_ca: false,
                    pinned_sha256: Vec::new(),
                })
            },
            recipient_domains: vec![DomainPattern::Any],
            senders: Default::default(),
            from_override: None,
            limits,
            retry: RetryConfig::default(),
            dkim: None,
            test_recipient: None,
            timeouts: Default::default(),
            suspended: false,
        }
    }

    #[test]
    fn carriers_get_defaults_only_on_mx_routes_without_an_entry() {
        let mx = route("mail/mx", true, RouteLimits::default());
        let s = Shaping::resolve(&mx, "DoCoMo.ne.jp.");
        assert_eq!(s.domain, "docomo.ne.jp");
        assert_eq!(s.destination, CARRIER_LIMITS);
        assert_eq!(s.destination_source, DestinationSource::CarrierDefault);
        assert_eq!(s.destination_rate(), Some(Gcra::per_minute(60)));
        assert_eq!(s.messages_per_connection(&mx), Some(10));
        assert_eq!(s.destination_scope(), "mx:docomo.ne.jp");
        assert_eq!(s.backoff_scope(), "mx:docomo.ne.jp");
        for d in CARRIER_DOMAINS {
            assert!(is_carrier(d));
        }
        assert!(!is_carrier("x.docomo.ne.jp"));

        let other = Shaping::resolve(&mx, "example.com");
        assert_eq!(other.destination_source, DestinationSource::None);
        assert_eq!(other.destination_rate(), None);

        let smarthost = route("mail/o365", false, RouteLimits::default());
        let s = Shaping::resolve(&smarthost, "docomo.ne.jp");
        assert_eq!(s.destination_source, DestinationSource::None);
        assert_eq!(s.backoff_scope(), "route:mail/o365");
        assert_eq!(s.destination_scope(), "route:mail/o365:docomo.ne.jp");
    }

    #[test]
    fn route_entries_override_and_can_lift_the_defaults() {
        let limits = RouteLimits {
            messages_per_minute: Some(600),
            recipients_per_day: Some(10_000),
            max_connections: Some(20),
            messages_per_connection: Some(5),
            per_destination: vec![
                DestinationLimits {
                    domains: vec![DomainPattern::parse("docomo.ne.jp").unwrap()],
                    messages_per_minute: Some(20),
                    max_connections: Some(1),
                    messages_per_connection: Some(50),
                },
                // Lifts the defaults for softbank.ne.jp.
                DestinationLimits {
                    domains: vec![DomainPattern::parse("softbank.ne.jp").unwrap()],
                    ..Default::default()
                },
            ],
        };
        let mx = route("mail/mx", true, limits);
        let s = Shaping::resolve(&mx, "docomo.ne.jp");
        assert_eq!(s.destination_source, DestinationSource::Route);
        assert_eq!(s.destination.messages_per_minute, Some(20));
        assert_eq!(s.messages_per_connection(&mx), Some(5), "the stricter wins");
        assert_eq!(s.route_rate, Some(Gcra::per_minute(600)));
        assert_eq!(
            (s.route_recipients_per_day, s.route_max_connections),
            (Some(10_000), Some(20))
        );
        let s = Shaping::resolve(&mx, "softbank.ne.jp");
        assert_eq!(s.destination, DestinationValues::default());
        assert_eq!(s.destination_source, DestinationSource::Route);
        // Not listed: carrier default again.
        assert_eq!(Shaping::resolve(&mx, "au.com").destination, CARRIER_LIMITS);
    }
}
