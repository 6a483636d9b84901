//! Status conditions in the Kubernetes convention: merging freshly computed conditions into the
//! previous ones (keeping `lastTransitionTime` while the status stays the same) and finding the
//! transitions that deserve an Event. Pure functions; no I/O, no clock (the caller passes `now`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mailroute_api::status::{Condition, ConditionType, condition_type};

/// `True`, `False` or `Unknown`: the API's type, under the name the planner has always used.
pub use mailroute_api::status::ConditionStatus as Status;

/// A condition as the planner wants it, before the bookkeeping fields are filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: ConditionType,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(type_: ConditionType, status: Status, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Builds the new condition list: one entry per desired condition, in the desired order, followed
/// by conditions of other types written by someone else (kept untouched). `lastTransitionTime`
/// is carried over when the status did not change, so an unchanged object gets a byte-identical
/// status and no write.
pub fn merge(previous: &[Condition], desired: &[Desired], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    let mut out: Vec<Condition> = desired
        .iter()
        .map(|d| {
            let before = previous.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match before {
                Some(b) if b.status == d.status => b.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: d.type_.clone(),
                status: d.status,
                reason: d.reason.clone(),
                message: d.message.clone(),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect();
    out.extend(
        previous
            .iter()
            .filter(|c| !desired.iter().any(|d| d.type_ == c.type_))
            .cloned(),
    );
    out
}

/// A condition whose status or reason changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The status before, `None` when the condition is new.
    pub from: Option<Status>,
    pub to: Condition,
}

impl Transition {
    /// Transitions to `False` are warnings; everything else is normal. `UsageReported=False` is a
    /// setting (no admin token), not a fault. `AuthDeprecated` warns when it turns `True`.
    pub fn is_warning(&self) -> bool {
        if self.to.type_ == condition_type::AUTH_DEPRECATED {
            return self.to.status == Status::True;
        }
        self.to.status == Status::False && self.to.type_ != condition_type::USAGE_REPORTED
    }
}

/// Conditions of `next` that are new or changed status or reason compared with `previous`.
/// A message-only change (e.g. a new config hash) is not a transition.
pub fn transitions(previous: &[Condition], next: &[Condition]) -> Vec<Transition> {
    next.iter()
        .filter_map(|n| {
            let before = previous.iter().find(|p| p.type_ == n.type_);
            match before {
                Some(b) if b.status == n.status && b.reason == n.reason => None,
                _ => Some(Transition {
                    from: before.map(|b| b.status),
                    to: n.clone(),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn cond(type_: &str, status: Status, reason: &str, t: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: String::new(),
            last_transition_time: time(t),
            observed_generation: Some(1),
        }
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let prev = vec![cond("Ready", Status::True, "InConfig", "2024-01-01T00:00:00Z")];
        let desired = [Desired::new(ConditionType::Ready, Status::True, "InConfig", "hash b")];
        let next = merge(&prev, &desired, Some(2), &time("2024-02-02T00:00:00Z"));
        assert_eq!(next[0].last_transition_time, time("2024-01-01T00:00:00Z"));
        assert_eq!(next[0].observed_generation, Some(2));
        assert_eq!(next[0].message, "hash b");
        assert!(
            transitions(&prev, &next).is_empty(),
            "a message change is no transition"
        );
    }

    #[test]
    fn a_status_change_sets_the_time_and_is_a_warning_transition() {
        let prev = vec![cond("Ready", Status::True, "InConfig", "2024-01-01T00:00:00Z")];
        let desired = [Desired::new(
            ConditionType::Ready,
            Status::False,
            "SecretNotFound",
            "gone",
        )];
        let next = merge(&prev, &desired, Some(1), &time("2024-02-02T00:00:00Z"));
        assert_eq!(next[0].last_transition_time, time("2024-02-02T00:00:00Z"));
        let t = transitions(&prev, &next);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].from, Some(Status::True));
        assert!(t[0].is_warning());
    }

    #[test]
    fn a_reason_change_with_the_same_status_is_a_transition_but_keeps_the_time() {
        let prev = vec![cond("Ready", Status::False, "SecretNotFound", "2024-01-01T00:00:00Z")];
        let desired = [Desired::new(
            ConditionType::Ready,
            Status::False,
            "InvalidSpec",
            "bad port",
        )];
        let next = merge(&prev, &desired, Some(1), &time("2024-02-02T00:00:00Z"));
        assert_eq!(next[0].last_transition_time, time("2024-01-01T00:00:00Z"));
        assert_eq!(transitions(&prev, &next).len(), 1);
    }

    #[test]
    fn new_conditions_are_transitions_and_foreign_conditions_are_kept() {
        let prev = vec![cond("Custom", Status::True, "Other", "2023-01-01T00:00:00Z")];
        let desired = [
            Desired::new(ConditionType::Accepted, Status::True, "Valid", ""),
            Desired::new(ConditionType::Ready, Status::Unknown, "Pending", ""),
        ];
        let next = merge(&prev, &desired, None, &time("2024-02-02T00:00:00Z"));
        let types: Vec<_> = next.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Accepted", "Ready", "Custom"]);
        let t = transitions(&prev, &next);
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| t.from.is_none() && !t.is_warning()));
    }
}
