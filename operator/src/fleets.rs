//! Which SmtpRoutes and SenderQuotas this operator governs when several releases share a
//! cluster: the fleet label, the claim on unlabelled objects, and the refusal of objects another
//! mailroute operator also governs (overlapping scopes). Pure functions over object metadata;
//! no I/O and no clock.
//!
//! Each operator writes statuses under its own field manager,
//! `mailroute-operator.<operator namespace>.<fleet>`, so an object's managedFields name every
//! operator that governs it. An entry stays while its operator owns a field of the status; an
//! operator that stops governing an object releases its fields (see [`Verdict::Ignore`]).
//!
//! A rival is another operator's entry written within `window` (about two resyncs: a live
//! operator governing the object has written by then), or one the object's standing
//! `FleetConflict` condition already names. The second rule keeps a conflict standing although
//! nobody writes (a no-op apply does not refresh an entry's time); the first lets the entries of
//! an uninstalled release expire on objects that are not in conflict.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use mailroute_api::status::{Condition, ConditionStatus, condition_type};

/// Label naming the fleet an object belongs to (the same label marks the fleet's outputs).
pub use crate::plan::FLEET_LABEL;
/// Prefix of every per-operator status field manager.
pub const MANAGER_PREFIX: &str = "mailroute-operator.";
/// `Accepted` reason of an object two operators govern.
pub const FLEET_CONFLICT: &str = "FleetConflict";

/// This operator as a governor of objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The operator's namespace.
    pub namespace: String,
    /// Its fleet name.
    pub fleet: String,
    /// Whether it governs objects without the fleet label.
    pub claim_unlabelled: bool,
}

/// What to do with one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Compile it and write its status.
    Govern,
    /// Not ours: leave it out; `release` when our manager still owns status fields (apply an
    /// empty status to give them up, so the governing operator does not see us as a rival).
    Ignore { release: bool },
    /// Another operator governs it too: leave it out and report the conflict; `operators` is
    /// every governing operator's manager name, sorted (the same list for each of them).
    Conflict { operators: Vec<String> },
}

impl Identity {
    /// The field manager of this operator's status writes.
    pub fn field_manager(&self) -> String {
        format!("{MANAGER_PREFIX}{}.{}", self.namespace, self.fleet)
    }

    /// Whether the labels put the object in this operator's scope.
    pub fn claims(&self, meta: &ObjectMeta) -> bool {
        match meta.labels.as_ref().and_then(|l| l.get(FLEET_LABEL)) {
            Some(f) => *f == self.fleet,
            None => self.claim_unlabelled,
        }
    }

    /// The verdict for one object from its labels and managedFields; `standing` is the message
    /// of its `Accepted=False FleetConflict` condition, if it has one.
    pub fn judge(&self, meta: &ObjectMeta, standing: Option<&str>, now: Timestamp, window: Duration) -> Verdict {
        let own = self.field_manager();
        let entries: Vec<(&str, Option<Timestamp>)> = meta
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| m.subresource.as_deref() == Some("status") && m.fields_v1.is_some())
            .filter_map(|m| Some((m.manager.as_deref()?, m.time.as_ref().map(|t| t.0))))
            .collect();
        if !self.claims(meta) {
            return Verdict::Ignore {
                release: entries.iter().any(|(m, _)| *m == own),
            };
        }
        let label = meta.labels.as_ref().and_then(|l| l.get(FLEET_LABEL));
        let recent =
            |t: Option<Timestamp>| t.is_some_and(|t| now.duration_since(t).unsigned_abs() <= window || t > now);
        let mut operators: Vec<String> = entries
            .into_iter()
            .filter(|(m, _)| *m != own)
            .filter(|(m, t)| {
                recent(*t) || standing.is_some_and(|s| s.contains(&format!("{m},")) || s.contains(&format!("{m})")))
            })
            .filter_map(|(m, _)| {
                let (_, fleet) = m.strip_prefix(MANAGER_PREFIX)?.split_once('.')?;
                // A labelled object belongs to one fleet: another fleet's entry is a leftover
                // from before the label, which that operator releases.
                label.is_none_or(|l| l == fleet).then(|| m.to_string())
            })
            .collect();
        if operators.is_empty() {
            return Verdict::Govern;
        }
        operators.push(own);
        operators.sort();
        operators.dedup();
        Verdict::Conflict { operators }
    }
}

/// Whether the status has fields owned by the operator's pre-fleet field manager
/// (`mailroute-operator`), which an upgraded operator takes over and then releases, so no field
/// it stops writing lingers under the old name.
pub fn has_legacy_status_owner(meta: &ObjectMeta) -> bool {
    meta.managed_fields.iter().flatten().any(|m| {
        m.subresource.as_deref() == Some("status")
            && m.fields_v1.is_some()
            && m.manager.as_deref() == Some(crate::plan::FIELD_MANAGER)
    })
}

/// The `Accepted` condition every operator in `operators` writes on a contested object (the same
/// text from each, so their writes agree).
pub fn conflict_condition(
    operators: &[String],
    previous: &[Condition],
    generation: Option<i64>,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Condition {
    let message = format!(
        "governed by more than one mailroute operator ({}), so none compiles it; label it \
         `{FLEET_LABEL}: <fleet>` for one fleet, or give the releases disjoint watchNamespaces, or \
         set fleet.claimUnlabelled=false on all but one",
        operators.join(", ")
    );
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == condition_type::ACCEPTED && c.status == ConditionStatus::False)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: condition_type::ACCEPTED,
        status: ConditionStatus::False,
        reason: FLEET_CONFLICT.to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};
    use std::collections::BTreeMap;

    fn me(fleet: &str, claim: bool) -> Identity {
        Identity {
            namespace: "mail-prod".into(),
            fleet: fleet.into(),
            claim_unlabelled: claim,
        }
    }

    fn meta(label: Option<&str>, status_managers: &[&str]) -> ObjectMeta {
        ObjectMeta {
            labels: label.map(|l| BTreeMap::from([(FLEET_LABEL.to_string(), l.to_string())])),
            managed_fields: Some(
                status_managers
                    .iter()
                    .map(|m| ManagedFieldsEntry {
                        manager: Some(m.to_string()),
                        operation: Some("Apply".into()),
                        subresource: Some("status".into()),
                        fields_v1: Some(FieldsV1(serde_json::json!({"f:status": {}}))),
                        time: Some(Time(written())),
                        ..Default::default()
                    })
                    .chain(std::iter::once(ManagedFieldsEntry {
                        // The user's spec write never counts.
                        manager: Some("mailroute-operator.mail-staging.staging".into()),
                        operation: Some("Apply".into()),
                        subresource: None,
                        fields_v1: Some(FieldsV1(serde_json::json!({"f:spec": {}}))),
                        ..Default::default()
                    }))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    const STAGING: &str = "mailroute-operator.mail-staging.staging";
    const WINDOW: Duration = Duration::from_secs(120);

    fn written() -> Timestamp {
        Timestamp::from_second(1_000_000).unwrap()
    }

    /// Judged 10 s after the entries were written, no standing conflict.
    fn judge(id: &Identity, meta: &ObjectMeta) -> Verdict {
        id.judge(meta, None, written() + Duration::from_secs(10), WINDOW)
    }

    #[test]
    fn the_label_and_the_claim_decide_the_scope() {
        assert_eq!(judge(&me("prod", true), &meta(Some("prod"), &[])), Verdict::Govern);
        assert_eq!(judge(&me("prod", true), &meta(None, &[])), Verdict::Govern);
        assert_eq!(
            judge(&me("prod", false), &meta(None, &[])),
            Verdict::Ignore { release: false }
        );
        assert_eq!(
            judge(&me("prod", true), &meta(Some("staging"), &[])),
            Verdict::Ignore { release: false }
        );
        // Ours before the label moved it: give the status fields up.
        assert_eq!(
            judge(
                &me("prod", true),
                &meta(Some("staging"), &["mailroute-operator.mail-prod.prod"])
            ),
            Verdict::Ignore { release: true }
        );
    }

    #[test]
    fn two_operators_claiming_one_object_both_refuse_it_with_the_same_list() {
        let prod = me("prod", true);
        let staging = Identity {
            namespace: "mail-staging".into(),
            fleet: "staging".into(),
            claim_unlabelled: true,
        };
        let both = ["mailroute-operator.mail-prod.prod", STAGING];
        let object = meta(None, &both);
        let want = Verdict::Conflict {
            operators: vec!["mailroute-operator.mail-prod.prod".into(), STAGING.into()],
        };
        assert_eq!(judge(&prod, &object), want);
        assert_eq!(judge(&staging, &object), want);
        // Seen before our own first write, too.
        assert_eq!(judge(&prod, &meta(None, &[STAGING])), want);
    }

    #[test]
    fn a_label_resolves_it_and_others_are_no_rivals() {
        let prod = me("prod", true);
        // Staging's leftover entry on an object labelled for prod is not a claim.
        assert_eq!(judge(&prod, &meta(Some("prod"), &[STAGING])), Verdict::Govern);
        // The same fleet name in another namespace is a real overlap, label or not.
        let twin = "mailroute-operator.mail-other.prod";
        assert!(matches!(
            judge(&prod, &meta(Some("prod"), &[twin])),
            Verdict::Conflict { .. }
        ));
        // The pre-fleet manager, a user's status edit and other controllers are no rivals.
        assert_eq!(
            judge(
                &prod,
                &meta(None, &["mailroute-operator", "kubectl-edit", "someone.else.x"])
            ),
            Verdict::Govern
        );
    }

    #[test]
    fn an_old_entry_is_a_rival_only_while_the_standing_conflict_names_it() {
        let prod = me("prod", true);
        let object = meta(None, &[STAGING]);
        let later = written() + Duration::from_secs(3600);
        // An uninstalled release's leftover: expired.
        assert_eq!(prod.judge(&object, None, later, WINDOW), Verdict::Govern);
        // Two idle operators in a standing conflict: it stands.
        let ops = vec!["mailroute-operator.mail-prod.prod".to_string(), STAGING.to_string()];
        let now = Time(later);
        let standing = conflict_condition(&ops, &[], None, &now).message;
        assert_eq!(
            prod.judge(&object, Some(&standing), later, WINDOW),
            Verdict::Conflict { operators: ops.clone() }
        );
        // A name that only starts like the rival's is not it.
        let other = conflict_condition(&[format!("{STAGING}2")], &[], None, &now).message;
        assert_eq!(prod.judge(&object, Some(&other), later, WINDOW), Verdict::Govern);
    }

    #[test]
    fn the_pre_fleet_manager_is_found_on_the_status_only() {
        assert!(has_legacy_status_owner(&meta(None, &["mailroute-operator"])));
        assert!(!has_legacy_status_owner(&meta(
            None,
            &[STAGING, "mailroute-operator.a.b"]
        )));
    }

    #[test]
    fn the_conflict_condition_is_the_same_from_each_side_and_keeps_its_time() {
        let ops = vec!["a".to_string(), "b".to_string()];
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let t2 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let first = conflict_condition(&ops, &[], Some(3), &t1);
        assert_eq!(first.reason, FLEET_CONFLICT);
        assert!(first.message.contains("(a, b)") && first.message.contains(FLEET_LABEL));
        assert_eq!(
            conflict_condition(&ops, std::slice::from_ref(&first), Some(3), &t2),
            first
        );
    }
}
