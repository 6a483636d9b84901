//! The compiled relay configuration: the one document every relay pod reads (`RelayConfig`, in a
//! ConfigMap) and its sensitive half (`RelaySecrets`, in a Secret, never a ConfigMap). Produced only
//! by `compile`; relays never see the custom resources themselves. No I/O here.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pattern::DomainPattern;
use crate::quota::{AppliesTo, CountBy, OnExceeded};
use crate::route::{AssertionAlgorithm, AuthMechanism, Backoff, OAuth2Grant, TlsMode};

/// Format version of `RelayConfig`; relays refuse a document with a version they do not know.
/// Version 2 added tenancy (`Authority`): a relay that ignored it would let a tenant's route
/// capture other namespaces' mail, so relays before it must refuse such a document.
pub const CONFIG_VERSION: u32 = 2;
/// The oldest version relays still read: a version 1 document has no tenancy fields, and
/// their defaults make every route and quota a platform one governing everyone, as it was.
pub const MIN_CONFIG_VERSION: u32 = 1;
/// Key of the relay configuration in its ConfigMap.
pub const CONFIG_KEY: &str = "relay.json";
/// Key of the relay secrets in their Secret.
pub const SECRETS_KEY: &str = "secrets.json";

/// Everything a relay needs to route and limit mail, except secrets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayConfig {
    pub version: u32,
    /// Routes in the order they are considered: priority, then id.
    pub routes: Vec<CompiledRoute>,
    /// Quotas sorted by id.
    pub quotas: Vec<CompiledQuota>,
}

impl RelayConfig {
    /// A configuration with no routes and no quotas.
    pub fn empty() -> Self {
        Self {
            version: CONFIG_VERSION,
            routes: vec![],
            quotas: vec![],
        }
    }

    /// The canonical serialisation: same config, same bytes.
    pub fn to_canonical_json(&self) -> String {
        // Serialising plain structs, vectors and BTreeMaps cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Short content hash identifying this generation of the configuration.
    pub fn content_hash(&self) -> String {
        short_hash(self.to_canonical_json().as_bytes())
    }
}

/// First 16 hex digits of SHA-256.
pub fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// One route, with presets and defaults resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompiledRoute {
    /// `namespace/name` of the SmtpRoute.
    pub id: String,
    /// Whose mail it serves, by the sender's namespace.
    #[serde(flatten)]
    pub authority: Authority,
    pub priority: i32,
    pub target: Target,
    /// Never empty; `*` when the route did not say.
    #[schemars(with = "Vec<String>")]
    pub recipient_domains: Vec<DomainPattern>,
    pub senders: CompiledSenderMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_override: Option<String>,
    pub limits: RouteLimits,
    pub retry: RetryConfig,
    /// DKIM signing; the key is in `RelaySecrets::dkim_keys` under the route id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim: Option<DkimConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_recipient: Option<String>,
    /// SMTP session timeouts; omitted from the JSON when they are the defaults.
    #[serde(default, skip_serializing_if = "SessionTimeouts::is_default")]
    pub timeouts: SessionTimeouts,
    /// `spec.suspended`: the route's mail is held (not attempted) until the spec says otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
}

impl CompiledRoute {
    /// Whether this route serves mail from `sender` (envelope, may be empty for bounces),
    /// authenticated as `auth_user`, to a recipient in `rcpt_domain`.
    pub fn serves(&self, sender: &str, auth_user: Option<&str>, rcpt_domain: &str) -> bool {
        self.recipient_domains.iter().any(|p| p.matches(rcpt_domain)) && self.senders.matches(sender, auth_user)
    }

    /// The most specific of this route's domain patterns matching `rcpt_domain`.
    pub fn domain_specificity(&self, rcpt_domain: &str) -> Option<usize> {
        self.recipient_domains
            .iter()
            .filter(|p| p.matches(rcpt_domain))
            .map(|p| p.specificity())
            .max()
    }
}

/// Whose mail a compiled route or quota governs, by the sender's namespace. The operator
/// resolved every namespace selector: relays compare names, they never see labels. The
/// defaults (all fields absent, as in version 1 documents) are a platform object governing
/// everyone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Authority {
    /// The object's namespace; empty in version 1 documents.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// A tenant's object (not in a platform namespace): it governs its own namespace only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tenant: bool,
    /// A platform route that wins over the tenants' own routes (routes only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enforced: bool,
    /// The senders' namespaces governed, sorted; absent: every namespace and unattributed mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
}

impl Authority {
    /// Whether this object governs mail from a sender in `namespace` (`None`: unattributed,
    /// which only objects governing every namespace do).
    pub fn governs(&self, namespace: Option<&str>) -> bool {
        match (&self.namespaces, namespace) {
            (None, _) => true,
            (Some(list), Some(n)) => list.iter().any(|l| l == n),
            (Some(_), None) => false,
        }
    }

    /// The precedence class of a route for a sender: enforced platform routes (0), then the
    /// tenant's own (1), then the other platform routes (2).
    pub fn class(&self) -> u8 {
        match (self.tenant, self.enforced) {
            (false, true) => 0,
            (true, _) => 1,
            (false, false) => 2,
        }
    }

    /// Whether two objects can govern the same mail in the same class.
    pub fn overlaps(&self, other: &Self) -> bool {
        if self.tenant != other.tenant || self.class() != other.class() {
            return false;
        }
        match (&self.namespaces, &other.namespaces) {
            (None, _) | (_, None) => true,
            (Some(a), Some(b)) => a.iter().any(|n| b.contains(n)),
        }
    }
}

/// Where a route sends mail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Target {
    /// An upstream smarthost.
    Smarthost(Upstream),
    /// The recipient domain's MX hosts, opportunistic STARTTLS.
    Mx,
}

/// Connection settings of an upstream smarthost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub verify_tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// AUTH mechanism; the credentials are in `RelaySecrets::upstream_credentials` under the route
    /// id, or for XOAUTH2 with tokens the relay fetches, the client in `upstream_oauth2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMechanism>,
    /// Whether `RelaySecrets::upstream_ca` holds an extra CA bundle for this route.
    #[serde(default)]
    pub custom_ca: bool,
    /// SHA-256 fingerprints (64 lower-case hex digits) of the only certificates accepted from
    /// this upstream; empty = no pinning. From `tls.pinnedSha256` and `tls.pinnedCertSecretRef`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned_sha256: Vec<String>,
}

/// Sender selectors of a route; empty means any sender.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompiledSenderMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub from_domains: Vec<DomainPattern>,
    /// Lower-cased.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_addresses: Vec<String>,
}

impl CompiledSenderMatch {
    pub fn is_any(&self) -> bool {
        self.auth_users.is_empty() && self.from_domains.is_empty() && self.from_addresses.is_empty()
    }

    pub fn matches(&self, sender: &str, auth_user: Option<&str>) -> bool {
        if self.is_any() {
            return true;
        }
        if let Some(u) = auth_user
            && self.auth_users.iter().any(|a| a == u)
        {
            return true;
        }
        let sender_lc = sender.to_ascii_lowercase();
        if self.from_addresses.contains(&sender_lc) {
            return true;
        }
        match crate::pattern::domain_of(&sender_lc) {
            Some(d) => self.from_domains.iter().any(|p| p.matches(&d)),
            None => false,
        }
    }
}

/// A route's upstream limits (pacing, not failing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_per_day: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_connection: Option<u32>,
    /// Limits per recipient domain, in the route's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_destination: Vec<DestinationLimits>,
}

impl RouteLimits {
    /// The entry of `per_destination` whose most specific pattern matching `rcpt_domain` is the
    /// most specific of all entries; on a tie the earlier entry wins.
    pub fn destination(&self, rcpt_domain: &str) -> Option<&DestinationLimits> {
        let mut best: Option<(usize, &DestinationLimits)> = None;
        for d in &self.per_destination {
            if let Some(s) = d.specificity(rcpt_domain)
                && best.is_none_or(|(b, _)| s > b)
            {
                best = Some((s, d));
            }
        }
        best.map(|(_, d)| d)
    }
}

/// Limits towards some recipient domains; each matching domain has its own budget.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationLimits {
    #[schemars(with = "Vec<String>")]
    pub domains: Vec<DomainPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_connection: Option<u32>,
}

impl DestinationLimits {
    /// Specificity of the most specific of `domains` matching `rcpt_domain`.
    pub fn specificity(&self, rcpt_domain: &str) -> Option<usize> {
        self.domains
            .iter()
            .filter(|p| p.matches(rcpt_domain))
            .map(|p| p.specificity())
            .max()
    }
}

/// Retry schedule, in seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    pub interval_secs: u64,
    pub lifetime_secs: u64,
    pub backoff: Backoff,
    pub max_interval_secs: u64,
}

impl Default for RetryConfig {
    /// Every minute for 30 minutes from acceptance, as hosted relays do.
    fn default() -> Self {
        Self {
            interval_secs: 60,
            lifetime_secs: 30 * 60,
            backoff: Backoff::Fixed,
            max_interval_secs: 30 * 60,
        }
    }
}

/// How long an outbound SMTP session waits for the upstream at each step, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionTimeouts {
    pub connect_ms: u64,
    /// Greeting, EHLO, STARTTLS and its handshake, AUTH.
    pub greeting_ms: u64,
    /// MAIL FROM, RSET, QUIT.
    pub mail_ms: u64,
    pub rcpt_ms: u64,
    /// The reply to DATA.
    pub data_init_ms: u64,
    /// Writing the content.
    pub data_transfer_ms: u64,
    /// The reply to the content's final dot.
    pub data_done_ms: u64,
}

impl Default for SessionTimeouts {
    /// Postfix's `smtp_*_timeout` defaults: the one place they are defined.
    fn default() -> Self {
        Self {
            connect_ms: 30_000,
            greeting_ms: 300_000,
            mail_ms: 300_000,
            rcpt_ms: 300_000,
            data_init_ms: 120_000,
            data_transfer_ms: 180_000,
            data_done_ms: 600_000,
        }
    }
}

impl SessionTimeouts {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// DKIM signing parameters (the key is secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimConfig {
    pub domain: String,
    pub selector: String,
}

/// One quota, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompiledQuota {
    /// `namespace/name` of the SenderQuota.
    pub id: String,
    /// Whose mail it governs, by the sender's namespace.
    #[serde(flatten)]
    pub authority: Authority,
    pub selector: QuotaSelector,
    /// Sorted from the shortest period to the longest.
    pub limits: Vec<PeriodLimit>,
    pub count_by: CountBy,
    pub applies_to: AppliesTo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk_header: Option<String>,
    pub on_exceeded: OnExceeded,
    /// IANA time zone name for day and month boundaries.
    pub time_zone: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub allowed_from_domains: Vec<DomainPattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub denied_from_domains: Vec<DomainPattern>,
}

/// Who a quota applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", tag = "kind", content = "value")]
pub enum QuotaSelector {
    AuthUser(String),
    /// Lower-cased.
    FromAddress(String),
    #[schemars(with = "String")]
    FromDomain(DomainPattern),
    #[schemars(with = "Vec<String>")]
    SourceCidrs(Vec<IpNet>),
    /// `scope: Namespace`: all mail of each governed namespace, counted per namespace (its
    /// own counters for each), beside the sender's own quota.
    Namespace,
}

impl QuotaSelector {
    /// For display and status: `authUser:shop-42`.
    pub fn describe(&self) -> String {
        match self {
            Self::AuthUser(u) => format!("authUser:{u}"),
            Self::FromAddress(a) => format!("fromAddress:{a}"),
            Self::FromDomain(d) => format!("fromDomain:{d}"),
            Self::SourceCidrs(c) => {
                format!(
                    "sourceCidrs:{}",
                    c.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
                )
            }
            Self::Namespace => "namespace".into(),
        }
    }
}

/// A quota period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Minute,
    Hour,
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "month",
        }
    }
}

/// At most `max` per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeriodLimit {
    pub period: Period,
    pub max: u64,
}

/// The sensitive half of the configuration. Never logged: `Debug` prints key names only.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelaySecrets {
    /// Upstream AUTH credentials by route id.
    #[serde(default)]
    pub upstream_credentials: BTreeMap<String, Credentials>,
    /// Extra CA bundles (PEM) by route id.
    #[serde(default)]
    pub upstream_ca: BTreeMap<String, String>,
    /// DKIM private keys (PEM) by route id.
    #[serde(default)]
    pub dkim_keys: BTreeMap<String, String>,
    /// Inbound SMTP AUTH users by user name.
    #[serde(default)]
    pub inbound_users: BTreeMap<String, InboundUser>,
    /// OAuth2 clients for upstream XOAUTH2 by route id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream_oauth2: BTreeMap<String, OAuth2Credentials>,
}

impl fmt::Debug for RelaySecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelaySecrets")
            .field(
                "upstream_credentials",
                &self.upstream_credentials.keys().collect::<Vec<_>>(),
            )
            .field("upstream_ca", &self.upstream_ca.keys().collect::<Vec<_>>())
            .field("dkim_keys", &self.dkim_keys.keys().collect::<Vec<_>>())
            .field("inbound_users", &self.inbound_users.keys().collect::<Vec<_>>())
            .field("upstream_oauth2", &self.upstream_oauth2.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RelaySecrets {
    pub fn to_canonical_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// A user name and password (or OAuth2 token for XOAUTH2). `Debug` hides the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What a relay needs to get OAuth2 access tokens for a route: the token endpoint, the scope, the
/// SMTP user, and the grant's own values. `Debug` shows the grant and the user only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Credentials {
    pub grant: OAuth2Grant,
    /// The token endpoint (holds the tenant for Entra ID).
    pub token_url: String,
    pub scope: String,
    /// The mailbox sent as; for a service account, the user impersonated.
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// PEM of the client certificate, for a client assertion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// PEM of the certificate's private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion_algorithm: Option<AssertionAlgorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// The Google service account's JSON key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_key: Option<String>,
}

impl fmt::Debug for OAuth2Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Credentials")
            .field("grant", &self.grant)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// An inbound SMTP AUTH user: an Argon2id PHC hash, the quota it belongs to and the namespace
/// of that quota, which is the namespace of the user's mail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboundUser {
    pub password_hash: String,
    pub quota: String,
    /// Absent in secrets compiled before tenancy: the namespace part of `quota` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl InboundUser {
    /// The namespace the user's mail belongs to.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace
            .as_deref()
            .or_else(|| self.quota.split_once('/').map(|(ns, _)| ns))
            .filter(|ns| !ns.is_empty())
    }
}

/// Checks a password against an `InboundUser` hash (constant-time inside argon2).
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut s = RelaySecrets::default();
        s.upstream_credentials.insert(
            "ns/r".into(),
            Credentials {
                username: "u".into(),
                password: "hunter2".into(),
            },
        );
        s.dkim_keys
            .insert("ns/r".into(), "-----BEGIN PRIVATE KEY-----xyz".into());
        let dbg = format!("{s:?} {:?}", s.upstream_credentials["ns/r"]);
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("BEGIN PRIVATE"), "{dbg}");
        assert!(dbg.contains("ns/r"));
    }

    #[test]
    fn sender_match_rules() {
        let m = CompiledSenderMatch {
            auth_users: vec!["shop".into()],
            from_domains: vec![DomainPattern::parse("*.example.com").unwrap()],
            from_addresses: vec!["ceo@corp.test".into()],
        };
        assert!(m.matches("x@y.z", Some("shop")));
        assert!(m.matches("a@mail.example.com", None));
        assert!(m.matches("CEO@corp.test", None));
        assert!(!m.matches("a@example.com", None));
        assert!(!m.matches("", None));
        assert!(CompiledSenderMatch::default().matches("", None));
    }
}
