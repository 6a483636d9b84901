//! The `SmtpRoute` custom resource: where mail leaves the cluster. Types and schema only; what a
//! route means at run time is decided by `compile`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::provider::Provider;
use crate::status::{Condition, ConnectionTest};
use crate::tenancy::AllowedNamespaces;

/// Where and how mail matching this route is delivered.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroute.io",
    version = "v1alpha1",
    kind = "SmtpRoute",
    namespaced,
    status = "SmtpRouteStatus",
    shortname = "smtpr",
    category = "mailroute",
    doc = "An outbound mail route: an upstream smarthost (or direct MX delivery), the senders and recipient domains it serves, its priority and the upstream's limits.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider"),
    printcolumn(name = "Host", type_ = "string", json_path = ".status.host"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".status.port"),
    printcolumn(name = "Domains", type_ = "string", json_path = ".spec.match.recipientDomains"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspended"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Verified",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Verified\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    cel
)]
#[x_kube(
    validation = Rule::new("self.delivery == 'mx' ? (!has(self.host) && !has(self.provider) && !has(self.auth)) : (has(self.host) || (has(self.provider) && self.provider != 'custom'))")
        .message("exactly one delivery mode: `delivery: mx` takes no host, provider or auth; `delivery: smarthost` needs a host or a provider preset other than custom")
        .field_path(".delivery"),
    validation = Rule::new("!has(self.region) || (has(self.provider) && self.provider == 'ses')").message("region is only used with provider: ses")
)]
#[serde(rename_all = "camelCase")]
pub struct SmtpRouteSpec {
    /// A provider preset that fills in host, port, TLS mode and the provider's known limits
    /// (for example `office365`: smtp.office365.com:587, STARTTLS, 30 messages a minute and 10,000
    /// recipients a day). Fields set on the route override the preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,

    /// AWS region for `provider: ses` (default `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,

    /// Upstream smarthost host name. Required for `delivery: smarthost` without a preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Bounded so the API server can bound its CEL rule's cost.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$')").message("host must be a DNS name or an IP address"))]
    pub host: Option<String>,

    /// Upstream port. Default: the preset's, else 25 for `tls: none`, 587 for `starttls`, 465 for `implicit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: Option<i32>,

    /// Transport security towards the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// SMTP AUTH towards the upstream, with credentials from a Secret in the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,

    /// `smarthost` (default): hand mail to the upstream host. `mx`: deliver directly to each
    /// recipient domain's MX hosts, with opportunistic STARTTLS.
    #[serde(default)]
    pub delivery: DeliveryMode,

    /// Which mail this route serves. Omitted: every sender, every recipient domain.
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,

    /// Lower is tried first. When a route fails with a connection error or a temporary reply,
    /// the next matching route (higher number) is tried.
    #[serde(default = "default_priority")]
    pub priority: i32,

    /// Replaces the envelope sender and the `From:` header of mail leaving through this route
    /// (some upstreams only accept their own mailbox as sender). Omitted: the original is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254))]
    #[x_kube(validation = Rule::new("self.matches('^[^@\\\\s<>]+@[A-Za-z0-9.-]+\\\\.[A-Za-z0-9-]+$')").message("fromOverride must be an e-mail address"))]
    pub from_override: Option<String>,

    /// The upstream's own limits. Mail is paced to stay within them, never failed for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<UpstreamLimits>,

    /// Retry schedule for temporary failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,

    /// DKIM signing of mail leaving through this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim: Option<DkimSpec>,

    /// How long to wait for the upstream at each step of an SMTP session, as durations (`30s`,
    /// `5m`) from one second to one hour; a step that takes longer fails the attempt as a
    /// temporary error. Omitted fields keep Postfix's defaults (`smtp_*_timeout`). With
    /// PIPELINING the replies to MAIL, RCPT and DATA are awaited together, within the longest
    /// of the three.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,

    /// If set, the operator's connection test also sends a real test message to this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_recipient: Option<String>,

    /// Whose mail this route serves, by the sender's namespace. Only routes in a platform
    /// namespace may serve other namespaces (default there: all); a route in a tenant's
    /// namespace serves that namespace's mail only, whatever is set here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,

    /// A platform route that wins over the tenants' own routes: when an enforced route
    /// matches, only enforced routes are tried (a compliance or DKIM-signing route tenants
    /// cannot bypass). Ignored, with a warning, on a route in a tenant's namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enforced: bool,
    /// Pauses the route: mail it would carry is held in the queue (not attempted, not expiring)
    /// up to the relays' maximum hold time, and released when this is unset again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
}

fn default_priority() -> i32 {
    100
}

/// How mail leaves through a route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Relay through the upstream host.
    #[default]
    Smarthost,
    /// Deliver directly to the recipient domain's MX hosts.
    Mx,
}

/// Transport security towards the upstream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// `none`, `starttls` (required: fail if the upstream does not offer it) or `implicit` (TLS from
    /// the first byte, usually port 465). Default: the preset's, else `starttls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TlsMode>,
    /// Verify the upstream's certificate chain and host name (default true). Turn off only for
    /// test upstreams with self-signed certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    /// Name to verify the certificate against, if it differs from `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Extra trusted CA bundle (PEM) from a Secret in the route's namespace. For an upstream
    /// whose certificate is issued by a private CA. Not for a self-signed certificate that is
    /// its own CA (what `openssl req -x509` makes): TLS refuses a CA certificate as the server's
    /// own; pin it instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Pin the upstream's certificate: the PEM of the certificate itself from a Secret in the
    /// route's namespace (several certificates in the PEM: any of them, e.g. during a
    /// rotation). Only exactly this certificate is accepted, whatever its issuer, names, dates
    /// or CA flag; use it for self-signed upstreams. Replaces chain verification, so it cannot
    /// be combined with `caSecretRef` or `verify: false`. Renewing the upstream's certificate
    /// needs the Secret updated at the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_cert_secret_ref: Option<SecretKeyRef>,
    /// Pin the upstream's certificate by its SHA-256 fingerprint, 64 hex digits with or without
    /// colons (`openssl x509 -noout -fingerprint -sha256 -in cert.pem`), as Postfix's
    /// `smtp_tls_fingerprint_digest = sha256`. Any listed fingerprint is accepted. Same effect as
    /// `pinnedCertSecretRef`, without a Secret; use it when you have the fingerprint rather than
    /// the certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned_sha256: Vec<String>,
}

/// TLS mode of an SMTP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text. Only for upstreams inside a trusted network.
    None,
    /// STARTTLS after EHLO; the connection fails if the upstream does not offer it.
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Implicit,
}

/// SMTP AUTH settings: a user name and password (or a static XOAUTH2 token) from `secretRef`, or
/// OAuth2 access tokens the relays fetch and refresh themselves (`oauth2`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.oauth2)").message("auth takes exactly one of secretRef and oauth2"))]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// SASL mechanism with `secretRef`: `plain` (default), `login` or `xoauth2` (the password key
    /// then holds the OAuth2 access token). With `oauth2` it is always XOAUTH2.
    #[serde(default)]
    pub mechanism: AuthMechanism,
    /// The Secret holding a user name and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<CredentialsSecretRef>,
    /// OAuth2: the relays get access tokens from the provider's token endpoint and refresh them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Spec>,
}

impl AuthSpec {
    /// The Secret the credentials come from.
    pub fn secret_name(&self) -> Option<&str> {
        match (&self.secret_ref, &self.oauth2) {
            (Some(r), _) => Some(&r.name),
            (None, Some(o)) => Some(&o.secret_ref.name),
            (None, None) => None,
        }
    }
}

/// OAuth2 for upstream AUTH. Every value comes from the Secret `secretRef`, under the keys named
/// there; the SMTP user (`user` key) is the mailbox to send as.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.grant != 'clientCredentials' || !has(self.provider) || self.provider == 'microsoft'").message("clientCredentials is Microsoft Entra ID's grant (provider: microsoft)").field_path(".provider"),
    validation = Rule::new("self.grant != 'serviceAccount' || !has(self.provider) || self.provider == 'google'").message("serviceAccount is Google's grant (provider: google)").field_path(".provider"),
    validation = Rule::new("self.grant != 'refreshToken' || has(self.provider) || has(self.tokenUrl)").message("refreshToken needs a provider (google or microsoft) or a tokenUrl").field_path(".provider"),
    validation = Rule::new("!has(self.clientAuth) || self.grant == 'clientCredentials'").message("clientAuth is for the clientCredentials grant").field_path(".clientAuth"),
    validation = Rule::new("!has(self.assertionAlgorithm) || (has(self.clientAuth) && self.clientAuth == 'certificate')").message("assertionAlgorithm is for clientAuth: certificate").field_path(".assertionAlgorithm")
)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Spec {
    /// `clientCredentials` (Microsoft Entra ID app: keys `tenant`, `client-id`, and
    /// `client-secret` or `tls.crt` + `tls.key`; the app needs `SMTP.SendAsApp`),
    /// `refreshToken` (Google or Microsoft delegated: `client-id`, `refresh-token`,
    /// `client-secret` when the client has one, `tenant` for Microsoft, default `common`),
    /// `serviceAccount` (Google Workspace domain-wide delegation: `service-account.json`; `user`
    /// is the user impersonated).
    pub grant: OAuth2Grant,
    /// Whose token endpoint and default scope: `microsoft`
    /// (`https://outlook.office365.com/.default`) or `google` (`https://mail.google.com/`).
    /// Default: `microsoft` for clientCredentials, `google` for serviceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<OAuth2Provider>,
    /// clientCredentials: `secret` (default) or `certificate` (a JWT client assertion signed with
    /// the certificate's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
    /// The client assertion's signature: `RS256` (default) or `PS256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion_algorithm: Option<AssertionAlgorithm>,
    /// Overrides the provider's scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub scope: Option<String>,
    /// Overrides the provider's token endpoint (another cloud, a test endpoint); https only.
    /// With it, clientCredentials needs no `tenant` key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("tokenUrl must be an https URL"))]
    pub token_url: Option<String>,
    /// The Secret holding the values, and the key of each (defaults shown).
    pub secret_ref: OAuth2SecretRef,
}

/// The OAuth2 grant the relays use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OAuth2Grant {
    ClientCredentials,
    RefreshToken,
    ServiceAccount,
}

/// Whose token endpoint and scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OAuth2Provider {
    Microsoft,
    Google,
}

/// How an Entra ID client proves itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Secret,
    Certificate,
}

/// The signature algorithm of a client assertion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AssertionAlgorithm {
    #[default]
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "PS256")]
    Ps256,
}

/// The Secret holding an OAuth2 client's values; each key has a default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2SecretRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The SMTP user: the mailbox sent as (and the user impersonated by a service account).
    #[serde(default = "oauth2_keys::user")]
    pub user_key: String,
    /// The Entra ID tenant (id or domain).
    #[serde(default = "oauth2_keys::tenant")]
    pub tenant_key: String,
    #[serde(default = "oauth2_keys::client_id")]
    pub client_id_key: String,
    #[serde(default = "oauth2_keys::client_secret")]
    pub client_secret_key: String,
    /// The client certificate (PEM), for `clientAuth: certificate`.
    #[serde(default = "oauth2_keys::certificate")]
    pub certificate_key: String,
    /// The certificate's RSA private key (PEM).
    #[serde(default = "oauth2_keys::private_key")]
    pub private_key_key: String,
    #[serde(default = "oauth2_keys::refresh_token")]
    pub refresh_token_key: String,
    /// The Google service account's JSON key file.
    #[serde(default = "oauth2_keys::service_account")]
    pub service_account_key: String,
}

/// Default keys of an OAuth2 Secret.
pub mod oauth2_keys {
    pub fn user() -> String {
        "user".into()
    }
    pub fn tenant() -> String {
        "tenant".into()
    }
    pub fn client_id() -> String {
        "client-id".into()
    }
    pub fn client_secret() -> String {
        "client-secret".into()
    }
    pub fn certificate() -> String {
        "tls.crt".into()
    }
    pub fn private_key() -> String {
        "tls.key".into()
    }
    pub fn refresh_token() -> String {
        "refresh-token".into()
    }
    pub fn service_account() -> String {
        "service-account.json".into()
    }
}

/// A SASL mechanism for upstream AUTH.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMechanism {
    #[default]
    Plain,
    Login,
    Xoauth2,
}

/// A Secret in the same namespace holding a user name and a password.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key holding the user name (default `username`).
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key holding the password or token (default `password`).
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// One key of a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// Which mail a route serves. An empty list means "any".
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Recipient domains: `*` (all), `docomo.ne.jp` (exactly), `*.example.com` (every subdomain).
    /// Default `["*"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // Bounded so the API server can bound its CEL rule's cost (a domain is at most 253
    // characters, plus `*.`).
    #[schemars(length(max = 256), inner(length(max = 255)))]
    #[x_kube(validation = Rule::new("self.all(d, d == '*' || d.matches('^(\\\\*\\\\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\\\.)+[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$'))").message("recipientDomains entries must be `*`, `example.com` or `*.example.com`"))]
    pub recipient_domains: Vec<String>,
    /// Senders this route serves. Omitted: every sender.
    #[serde(default, skip_serializing_if = "SenderMatch::is_empty")]
    pub senders: SenderMatch,
}

/// Sender selectors of a route; a message matches when any listed selector matches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SenderMatch {
    /// SMTP AUTH user names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth_users: Vec<String>,
    /// Envelope sender domains (`example.com` or `*.example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_domains: Vec<String>,
    /// Exact envelope sender addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_addresses: Vec<String>,
}

impl SenderMatch {
    pub fn is_empty(&self) -> bool {
        self.auth_users.is_empty() && self.from_domains.is_empty() && self.from_addresses.is_empty()
    }
}

/// Limits the upstream enforces; mail is paced to stay within them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamLimits {
    /// Messages per minute (Office 365: 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("messagesPerMinute must be at least 1"))]
    pub messages_per_minute: Option<u32>,
    /// Recipients per day (Office 365: 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("recipientsPerDay must be at least 1"))]
    pub recipients_per_day: Option<u32>,
    /// Concurrent connections across all relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxConnections must be at least 1"))]
    pub max_connections: Option<u32>,
    /// Messages sent over one connection before it is closed and reopened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("messagesPerConnection must be at least 1"))]
    pub messages_per_connection: Option<u32>,
    /// Limits per recipient domain, applied on top of the route's own limits. Each domain gets
    /// its own budget (two domains in one entry do not share it). The most specific matching
    /// entry applies. With `delivery: mx`, mobile carrier domains (docomo.ne.jp, ezweb.ne.jp,
    /// au.com, softbank.ne.jp, i.softbank.jp) get built-in limits of 60 messages a minute,
    /// 2 connections and 10 messages per connection unless an entry here matches them (an entry
    /// with no limits set lifts them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub per_destination: Vec<DestinationLimitSpec>,
}

/// Limits towards some recipient domains, e.g. a strict mobile carrier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationLimitSpec {
    /// Recipient domains these limits apply to: `docomo.ne.jp` (exactly), `*.example.com` (every
    /// subdomain) or `*` (every domain, each with its own budget).
    // Bounded with perDestination so the API server's CEL cost budget holds (64 x 32 domains).
    #[schemars(length(max = 64), inner(length(max = 255)))]
    #[x_kube(
        validation = Rule::new("self.size() > 0").message("domains must not be empty"),
        validation = Rule::new("self.all(d, d == '*' || d.matches('^(\\\\*\\\\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\\\.)+[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$'))").message("domains entries must be `*`, `example.com` or `*.example.com`")
    )]
    pub domains: Vec<String>,
    /// Messages per minute to each of these domains, across all relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("messagesPerMinute must be at least 1"))]
    pub messages_per_minute: Option<u32>,
    /// Concurrent connections to each of these domains, across all relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxConnections must be at least 1"))]
    pub max_connections: Option<u32>,
    /// Messages sent over one connection to these domains before it is closed and reopened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("messagesPerConnection must be at least 1"))]
    pub messages_per_connection: Option<u32>,
}

/// Retry schedule for temporary failures (4xx replies, time-outs, connection errors).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Time between attempts, e.g. `1m` (default), `30s`, `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// How long after acceptance a message may keep being retried before it bounces as expired,
    /// e.g. `30m` (default), `4h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
    /// `fixed` (default) or `exponential` (the interval doubles after each attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Longest interval with exponential back-off (default `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<String>,
}

/// Waits for the upstream during one SMTP session, as durations (`30s`, `5m`), each at least one
/// second and at most one hour. A step that takes longer fails the attempt as a temporary
/// error (the message is retried on the route's schedule). With PIPELINING the replies to MAIL,
/// RCPT and DATA are awaited together, within the longest of the three.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// Opening the TCP connection (default `30s`, Postfix `smtp_connect_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    /// The server's greeting, and each of EHLO, STARTTLS with its TLS handshake, and AUTH
    /// (default `300s`, Postfix `smtp_helo_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greeting: Option<String>,
    /// The reply to MAIL FROM, also to RSET and QUIT (default `300s`, Postfix
    /// `smtp_mail_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mail: Option<String>,
    /// The reply to RCPT TO (default `300s`, Postfix `smtp_rcpt_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcpt: Option<String>,
    /// The reply to DATA (default `120s`, Postfix `smtp_data_init_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_init: Option<String>,
    /// Sending the message content (default `180s`, Postfix `smtp_data_xfer_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_transfer: Option<String>,
    /// The reply after the content's final dot (default `600s`, Postfix
    /// `smtp_data_done_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_done: Option<String>,
}

/// Retry back-off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    #[default]
    Fixed,
    Exponential,
}

/// DKIM signing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// Signing domain (`d=`).
    pub domain: String,
    /// Selector (`s=`); the public key is published at `SELECTOR._domainkey.DOMAIN`.
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*$')").message("selector must be a DNS label"))]
    pub selector: String,
    /// Secret holding the private key (PEM: RSA of 2048 to 4096 bits, or Ed25519; default key
    /// `private.key`). Another key is refused: the route is not used and its status says why.
    pub key_secret_ref: DkimKeyRef,
}

/// The Secret holding a DKIM private key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret (default `private.key`).
    #[serde(default = "default_dkim_key")]
    pub key: String,
}

fn default_dkim_key() -> String {
    "private.key".into()
}

/// Observed state of a route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmtpRouteStatus {
    /// `Accepted` (the spec compiled), `Ready` (in the live relay configuration) and `Verified`
    /// (the last connection test succeeded).
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Effective upstream host (after the preset), or `mx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Effective upstream port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// The last connection test towards the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_connection_test: Option<ConnectionTest>,
}
