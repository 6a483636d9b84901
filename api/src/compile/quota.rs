//! SenderQuota: the sender selector, the limits, the time zone, the from-domain lists and the
//! inbound user whose password hash goes to `RelaySecrets` (the password itself goes nowhere).
//! Two quotas for the same selector governing the same namespaces in the same class, or two
//! defining the same user, are a conflict. Namespace quotas (`scope: Namespace`) never conflict:
//! every one governing a namespace counts.

use std::collections::BTreeMap;

use ipnet::IpNet;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::secrets::secret_value;
use super::{Diagnostic, Diags, ObjectKind, ObjectRef, ObjectSummary, Reason, SecretStore, Tenancy};
use crate::config::{CompiledQuota, InboundUser, Period, PeriodLimit, QuotaSelector};
use crate::pattern::{DomainPattern, split_address};
use crate::quota::{QuotaLimits, SenderQuota, SenderQuotaSpec, SenderSelector};
use crate::route::CredentialsSecretRef;
use crate::tenancy::QuotaScope;

/// Compiles the quotas in (namespace, name) order; returns those kept and the inbound users by name.
pub(super) fn compile_quotas(
    quotas: &[SenderQuota],
    secrets: &SecretStore,
    tenancy: &Tenancy,
    diagnostics: &mut Vec<Diagnostic>,
    summaries: &mut BTreeMap<ObjectRef, ObjectSummary>,
) -> (Vec<CompiledQuota>, BTreeMap<String, InboundUser>) {
    let mut quotas: Vec<&SenderQuota> = quotas.iter().collect();
    quotas.sort_by_key(|q| (q.namespace().unwrap_or_default(), q.name_any()));
    let mut compiled_quotas: Vec<CompiledQuota> = Vec::new();
    let mut users: BTreeMap<String, (ObjectRef, InboundUser)> = BTreeMap::new();
    for q in quotas {
        let object = ObjectRef {
            kind: ObjectKind::SenderQuota,
            namespace: q.namespace().unwrap_or_else(|| "default".into()),
            name: q.name_any(),
        };
        let mut d = Diags {
            object: &object,
            out: diagnostics,
            errors: 0,
        };
        let compiled = compile_quota(&object, &q.spec, secrets, tenancy, &mut d);
        summaries.insert(
            object.clone(),
            ObjectSummary {
                sender: compiled.as_ref().map(|(c, _)| c.selector.describe()),
                limits: compiled.as_ref().map(|(c, _)| describe_limits(c)),
                ..Default::default()
            },
        );
        let Some((mut c, user)) = compiled else { continue };
        if d.errors > 0 {
            continue;
        }
        if let Some(other) = compiled_quotas.iter().find(|o| {
            o.selector == c.selector && c.selector != QuotaSelector::Namespace && o.authority.overlaps(&c.authority)
        }) {
            let message = format!("quota {} already applies to {}", other.id, c.selector.describe());
            d.error(Reason::Conflict, "spec.sender", message);
            continue;
        }
        if let Some((name, hash)) = user {
            if let Some((owner, _)) = users.get(&name) {
                let message = format!("inbound user `{name}` is already defined by SenderQuota {}", owner.id());
                d.error(Reason::Conflict, "spec.credentialsSecretRef", message);
                continue;
            }
            users.insert(
                name,
                (
                    object.clone(),
                    InboundUser {
                        password_hash: hash,
                        quota: c.id.clone(),
                        namespace: Some(object.namespace.clone()),
                    },
                ),
            );
        }
        c.limits.sort_by_key(|l| l.period);
        compiled_quotas.push(c);
    }
    let users = users.into_iter().map(|(k, (_, u))| (k, u)).collect();
    (compiled_quotas, users)
}

/// One quota and its inbound user (name, password hash); `None` when it cannot be compiled at all.
fn compile_quota(
    object: &ObjectRef,
    spec: &SenderQuotaSpec,
    secrets: &SecretStore,
    tenancy: &Tenancy,
    d: &mut Diags<'_>,
) -> Option<(CompiledQuota, Option<(String, String)>)> {
    let authority = tenancy.authority(&object.namespace, spec.allowed_namespaces.as_ref(), false, d);
    let selector = match (spec.scope, &spec.sender) {
        (QuotaScope::Sender, Some(s)) => selector(s, d)?,
        (QuotaScope::Namespace, None) => QuotaSelector::Namespace,
        (QuotaScope::Sender, None) => {
            d.error(Reason::InvalidSpec, "spec.sender", "scope: Sender needs a sender");
            return None;
        }
        (QuotaScope::Namespace, Some(_)) => {
            d.error(
                Reason::InvalidSpec,
                "spec.sender",
                "scope: Namespace counts every sender of a namespace and takes no sender",
            );
            return None;
        }
    };
    let limits = period_limits(&spec.limits, d);
    let time_zone = spec.time_zone.clone().unwrap_or_else(|| "UTC".into());
    if time_zone.parse::<chrono_tz::Tz>().is_err() {
        d.error(
            Reason::InvalidSpec,
            "spec.timeZone",
            format!("`{time_zone}` is not an IANA time zone such as Asia/Tokyo"),
        );
    }
    let allowed_from_domains = domain_list(&spec.allowed_from_domains, "spec.allowedFromDomains", d);
    let denied_from_domains = domain_list(&spec.denied_from_domains, "spec.deniedFromDomains", d);
    let user = match &spec.credentials_secret_ref {
        None => None,
        Some(r) => inbound_user(object, r, &selector, secrets, d),
    };
    Some((
        CompiledQuota {
            id: object.id(),
            authority,
            selector,
            limits,
            count_by: spec.count_by,
            applies_to: spec.applies_to,
            bulk_header: spec.bulk_header.clone(),
            on_exceeded: spec.on_exceeded,
            time_zone,
            allowed_from_domains,
            denied_from_domains,
        },
        user,
    ))
}

/// `spec.sender`: exactly one selector.
fn selector(s: &SenderSelector, d: &mut Diags<'_>) -> Option<QuotaSelector> {
    let set = [
        s.auth_user.is_some(),
        s.from_address.is_some(),
        s.from_domain.is_some(),
        !s.source_cidrs.is_empty(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        d.error(
            Reason::InvalidSpec,
            "spec.sender",
            "set exactly one of authUser, fromAddress, fromDomain, sourceCidrs",
        );
        return None;
    }
    let selector = if let Some(u) = &s.auth_user {
        if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
            d.error(
                Reason::InvalidSpec,
                "spec.sender.authUser",
                "authUser must be a non-empty name without spaces",
            );
        }
        QuotaSelector::AuthUser(u.clone())
    } else if let Some(a) = &s.from_address {
        if let Err(e) = split_address(a) {
            d.error(Reason::InvalidSpec, "spec.sender.fromAddress", e.to_string());
        }
        QuotaSelector::FromAddress(a.to_ascii_lowercase())
    } else if let Some(dom) = &s.from_domain {
        match DomainPattern::parse(dom) {
            Ok(p) => QuotaSelector::FromDomain(p),
            Err(e) => {
                d.error(Reason::InvalidSpec, "spec.sender.fromDomain", e.to_string());
                return None;
            }
        }
    } else {
        let mut nets = Vec::new();
        for (i, c) in s.source_cidrs.iter().enumerate() {
            match c.parse::<IpNet>() {
                Ok(n) => nets.push(n.trunc()),
                Err(_) => d.error(
                    Reason::InvalidSpec,
                    &format!("spec.sender.sourceCidrs[{i}]"),
                    format!("`{c}` is not a CIDR such as 10.0.0.0/8"),
                ),
            }
        }
        nets.sort();
        nets.dedup();
        QuotaSelector::SourceCidrs(nets)
    };
    Some(selector)
}

/// `spec.limits`, one entry per period set.
fn period_limits(l: &QuotaLimits, d: &mut Diags<'_>) -> Vec<PeriodLimit> {
    let mut limits = Vec::new();
    for (period, field, v) in [
        (Period::Minute, "perMinute", l.per_minute),
        (Period::Hour, "perHour", l.per_hour),
        (Period::Day, "perDay", l.per_day),
        (Period::Month, "perMonth", l.per_month),
    ] {
        match v.map(u64::try_from) {
            None => {}
            Some(Ok(max)) => limits.push(PeriodLimit { period, max }),
            Some(Err(_)) => d.error(
                Reason::InvalidSpec,
                &format!("spec.limits.{field}"),
                format!("{field} must not be negative"),
            ),
        }
    }
    limits
}

/// A list of domain patterns, sorted and without duplicates.
fn domain_list(list: &[String], field: &str, d: &mut Diags<'_>) -> Vec<DomainPattern> {
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        match DomainPattern::parse(p) {
            Ok(p) => out.push(p),
            Err(e) => d.error(Reason::InvalidSpec, &format!("{field}[{i}]"), e.to_string()),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `spec.credentialsSecretRef`: the inbound user's name and password hash.
fn inbound_user(
    object: &ObjectRef,
    r: &CredentialsSecretRef,
    selector: &QuotaSelector,
    secrets: &SecretStore,
    d: &mut Diags<'_>,
) -> Option<(String, String)> {
    let field = "spec.credentialsSecretRef";
    let ns = object.namespace.as_str();
    let name = secret_value(secrets, ns, &r.name, &r.username_key, field, d);
    let pass = secret_value(secrets, ns, &r.name, &r.password_key, field, d);
    let (name, pass) = (name?, pass?);
    if let QuotaSelector::AuthUser(u) = selector
        && u != &name
    {
        d.error(
            Reason::InvalidSpec,
            field,
            format!("the Secret's user name `{name}` differs from sender.authUser `{u}`"),
        );
    }
    let hash = hash_password(&object.id(), &name, &pass);
    Some((name, hash))
}

/// Argon2id with a salt derived from the quota and user, so the same input compiles to the same
/// bytes (the operator must not rewrite the Secret on every reconcile).
pub fn hash_password(quota_id: &str, user: &str, password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let digest = Sha256::digest(format!("mailroute-inbound\0{quota_id}\0{user}").as_bytes());
    let Ok(salt) = SaltString::encode_b64(&digest[..16]) else {
        return String::new();
    };
    match argon2::Argon2::default().hash_password(password.as_bytes(), &salt) {
        Ok(h) => h.to_string(),
        Err(_) => String::new(),
    }
}

fn describe_limits(q: &CompiledQuota) -> String {
    let mut parts: Vec<String> = q
        .limits
        .iter()
        .map(|l| format!("{}/{}", l.max, l.period.as_str()))
        .collect();
    if parts.is_empty() {
        parts.push("unlimited".into());
    }
    let mut s = parts.join(", ");
    if q.count_by == crate::quota::CountBy::Recipients {
        s.push_str(" recipients");
    }
    if q.applies_to == crate::quota::AppliesTo::Bulk {
        s.push_str(" bulk");
    }
    s
}
