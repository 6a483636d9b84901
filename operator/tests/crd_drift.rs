//! `crds/` and its copies (the chart's `files/crds/`, served by its templates/crds.yaml, and
//! `deploy/base/crds/`) must equal what the types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["crds", "charts/mailroute/files/crds", "deploy/base/crds"] {
        let dir = root.join(dir);
        for (file, yaml) in mailroute_operator::crdgen::crds().unwrap() {
            let path = dir.join(file);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == yaml,
                "{} is out of date: run `cargo run -p mailroute-operator -- crd --out crds` and \
                 `scripts/check-packaging.sh --update-deploy` (copies crds/ into the chart and deploy/)",
                path.display()
            );
        }
    }
}

#[test]
fn crds_carry_cel_rules_and_printer_columns() {
    let all: String = mailroute_operator::crdgen::crds()
        .unwrap()
        .into_iter()
        .map(|(_, y)| y)
        .collect();
    for needle in [
        "x-kubernetes-validations",
        "exactly one delivery mode",
        "port must be between 1 and 65535",
        "recipientDomains entries must be",
        "set exactly one of authUser, fromAddress, fromDomain, sourceCidrs",
        "jsonPath: .spec.priority",
        "jsonPath: .status.usage.month.used",
        "Username and password not accepted",
    ] {
        assert!(all.contains(needle), "CRDs lack {needle:?}");
    }
}
