//! The pod-IP identity map, computed: which namespace and ServiceAccount each pod IP stands for,
//! as a pure function of the pods the operator has seen and the time. `podpublish` feeds it
//! from a Pod watch and writes the result to Redis for the relays; this module does no I/O.
//!
//! An IP is published only while exactly one live pod owns it. A pod that is finished
//! (Succeeded/Failed), gone, without an IP, or past the end of its deletion grace period gives
//! its IP up at once: the network plugin may already have handed it to another pod, and an IP
//! must never be attributed to its old owner. An IP claimed by two live pods (the old one
//! terminating while its successor already reports the same address) is published as
//! ambiguous, which the relays treat as unattributed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use mailroute_api::podmap::{Entry, canonical, field};

/// What the map needs of one Pod (the rest of the object is not kept in memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub namespace: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// `metadata.deletionTimestamp`: the end of the grace period of a terminating pod.
    pub deleting_at: Option<Timestamp>,
}

/// The facts of a pod that may own an IP, or `None` when it cannot.
pub fn facts(pod: &Pod) -> Option<PodFacts> {
    let uid = pod.metadata.uid.clone()?;
    let namespace = pod.metadata.namespace.clone()?;
    let spec = pod.spec.as_ref()?;
    // A hostNetwork pod reports its node's IP: every other hostNetwork pod on that node and the
    // node itself send from it too, so it identifies nobody and is never published.
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    // A finished pod's sandbox is gone and its IP free for reuse.
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: BTreeSet<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse::<IpAddr>().ok())
        .map(canonical)
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok()) {
        ips.insert(canonical(ip));
    }
    if ips.is_empty() {
        return None;
    }
    Some(PodFacts {
        uid,
        namespace,
        // The API server's default when the spec names none.
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        ips: ips.into_iter().collect(),
        deleting_at: pod.metadata.deletion_timestamp.as_ref().map(|t| t.0),
    })
}

/// The published map: hash field (canonical IP) → entry, ordered so that equal maps compare
/// equal and diffs are deterministic.
pub type IdentityMap = BTreeMap<String, Entry>;

/// The map for `pods` at `now`.
pub fn identity_map<'a>(pods: impl IntoIterator<Item = &'a PodFacts>, now: Timestamp) -> IdentityMap {
    let mut claims: BTreeMap<IpAddr, Vec<&PodFacts>> = BTreeMap::new();
    for pod in pods {
        // Past its grace period the kubelet kills the pod and the IP may be reused before the
        // Pod object is gone.
        if pod.deleting_at.is_some_and(|t| t <= now) {
            continue;
        }
        for ip in &pod.ips {
            let owners = claims.entry(*ip).or_default();
            if !owners.iter().any(|o| o.uid == pod.uid) {
                owners.push(pod);
            }
        }
    }
    claims
        .into_iter()
        .map(|(ip, owners)| {
            let entry = match owners.as_slice() {
                [one] => Entry::Pod {
                    namespace: one.namespace.clone(),
                    service_account: one.service_account.clone(),
                    pod_uid: one.uid.clone(),
                },
                many => Entry::Ambiguous {
                    pods: u32::try_from(many.len()).unwrap_or(u32::MAX),
                },
            };
            (field(ip), entry)
        })
        .collect()
}

/// When `identity_map` next changes by itself: the earliest grace-period end still ahead.
pub fn next_expiry<'a>(pods: impl IntoIterator<Item = &'a PodFacts>, now: Timestamp) -> Option<Timestamp> {
    pods.into_iter()
        .filter_map(|p| p.deleting_at)
        .filter(|t| *t > now)
        .min()
}

/// What turns `old` into `new`: fields to set and fields to delete.
pub fn diff(old: &IdentityMap, new: &IdentityMap) -> (Vec<(String, Entry)>, Vec<String>) {
    let set = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let delete = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    (set, delete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const NOW: &str = "2026-12-05T06:00:00Z";

    fn pod(ns: &str, uid: &str, ip: Option<&str>, extra: serde_json::Value) -> Pod {
        let mut v = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": uid, "namespace": ns, "uid": uid},
            "spec": {"containers": [{"name": "app", "image": "app"}], "serviceAccountName": "mailer"},
            "status": {"phase": "Running"},
        });
        if let Some(ip) = ip {
            v["status"]["podIP"] = ip.into();
            v["status"]["podIPs"] = serde_json::json!([{"ip": ip}]);
        }
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        match (base, patch) {
            (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    fn map(pods: &[Pod]) -> IdentityMap {
        let facts: Vec<PodFacts> = pods.iter().filter_map(facts).collect();
        identity_map(&facts, t(NOW))
    }

    fn owner(ns: &str, uid: &str) -> Entry {
        Entry::Pod {
            namespace: ns.into(),
            service_account: "mailer".into(),
            pod_uid: uid.into(),
        }
    }

    #[test]
    fn a_running_pod_publishes_its_namespace_and_service_account() {
        let m = map(&[pod("team-a", "a1", Some("10.0.0.5"), serde_json::json!({}))]);
        assert_eq!(m, IdentityMap::from([("10.0.0.5".into(), owner("team-a", "a1"))]));
    }

    #[test]
    fn dual_stack_pods_publish_every_ip_and_the_default_service_account_is_named() {
        let p = pod(
            "team-a",
            "a1",
            Some("10.0.0.5"),
            serde_json::json!({"spec": {"serviceAccountName": null},
                               "status": {"podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}}),
        );
        let m = map(&[p]);
        assert_eq!(m.len(), 2);
        let expected = Entry::Pod {
            namespace: "team-a".into(),
            service_account: "default".into(),
            pod_uid: "a1".into(),
        };
        assert_eq!(m.get("fd00::5"), Some(&expected));
        assert_eq!(m.get("10.0.0.5"), Some(&expected));
    }

    #[test]
    fn pods_without_ip_finished_pods_and_host_network_pods_are_not_published() {
        let m = map(&[
            pod(
                "team-a",
                "pending",
                None,
                serde_json::json!({"status": {"phase": "Pending"}}),
            ),
            pod(
                "team-a",
                "done",
                Some("10.0.0.6"),
                serde_json::json!({"status": {"phase": "Succeeded"}}),
            ),
            pod(
                "team-a",
                "crashed",
                Some("10.0.0.7"),
                serde_json::json!({"status": {"phase": "Failed"}}),
            ),
            // hostNetwork: the IP is the node's, shared by everything on that node.
            pod(
                "kube-system",
                "proxy",
                Some("192.168.1.10"),
                serde_json::json!({"spec": {"hostNetwork": true}}),
            ),
        ]);
        assert!(m.is_empty(), "{m:?}");
    }

    #[test]
    fn an_ip_reused_while_the_old_pod_terminates_is_ambiguous_then_belongs_to_the_new_pod() {
        let old = pod(
            "team-a",
            "old",
            Some("10.0.0.5"),
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-12-05T06:00:20Z"}}),
        );
        let new = pod("team-b", "new", Some("10.0.0.5"), serde_json::json!({}));
        // Both claim it: nobody is attributed.
        assert_eq!(
            map(&[old.clone(), new.clone()]).get("10.0.0.5"),
            Some(&Entry::Ambiguous { pods: 2 })
        );
        // The terminating pod alone keeps its IP during its grace period (it may still send).
        assert_eq!(
            map(std::slice::from_ref(&old)).get("10.0.0.5"),
            Some(&owner("team-a", "old"))
        );
        // Past the grace period its IP is given up even though the object still exists.
        let facts: Vec<PodFacts> = [old.clone(), new.clone()].iter().filter_map(facts).collect();
        let later = identity_map(&facts, t("2026-12-05T06:00:20Z"));
        assert_eq!(later.get("10.0.0.5"), Some(&owner("team-b", "new")));
        assert_eq!(next_expiry(&facts, t(NOW)), Some(t("2026-12-05T06:00:20Z")));
        assert_eq!(next_expiry(&facts, t("2026-12-05T06:00:20Z")), None);
        // The old pod deleted: the new one owns it; a finished old pod gives it up the same way.
        assert_eq!(
            map(std::slice::from_ref(&new)).get("10.0.0.5"),
            Some(&owner("team-b", "new"))
        );
        let finished = pod(
            "team-a",
            "old",
            Some("10.0.0.5"),
            serde_json::json!({"status": {"phase": "Succeeded"}}),
        );
        assert_eq!(map(&[finished, new]).get("10.0.0.5"), Some(&owner("team-b", "new")));
    }

    #[test]
    fn a_pod_whose_ip_goes_away_drops_its_entry() {
        let before = map(&[pod("team-a", "a1", Some("10.0.0.5"), serde_json::json!({}))]);
        let after = map(&[pod(
            "team-a",
            "a1",
            None,
            serde_json::json!({"status": {"podIP": null, "podIPs": []}}),
        )]);
        assert!(after.is_empty());
        let (set, delete) = diff(&before, &after);
        assert!(set.is_empty());
        assert_eq!(delete, vec!["10.0.0.5".to_string()]);
    }

    #[test]
    fn diff_sets_changed_and_new_fields_and_deletes_gone_ones() {
        let old = IdentityMap::from([
            ("10.0.0.1".into(), owner("team-a", "a")),
            ("10.0.0.2".into(), owner("team-a", "b")),
            ("10.0.0.3".into(), owner("team-a", "c")),
        ]);
        let new = IdentityMap::from([
            ("10.0.0.1".into(), owner("team-a", "a")),
            ("10.0.0.2".into(), owner("team-b", "x")),
            ("10.0.0.4".into(), owner("team-a", "d")),
        ]);
        let (set, delete) = diff(&old, &new);
        assert_eq!(
            set,
            vec![
                ("10.0.0.2".to_string(), owner("team-b", "x")),
                ("10.0.0.4".to_string(), owner("team-a", "d"))
            ]
        );
        assert_eq!(delete, vec!["10.0.0.3".to_string()]);
    }
}
