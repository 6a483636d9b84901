//! The one CRD drift check: `crds/` and its copies (the chart's `files/crds/`, served by its
//! templates/crds.yaml, and `deploy/base/crds/`) hold exactly what the types generate, file for
//! file; the chart has no `crds/` directory. (scripts/test.sh runs it with the rest of the suite.)

use std::path::Path;

/// Regenerates every copy.
const FIX: &str = "cargo run -p mailroute-operator -- crd --out crds && scripts/check-packaging.sh --update-deploy (copies crds/ into the chart and deploy/)";

#[test]
fn committed_crds_match_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Helm installs a chart's crds/ once and never upgrades it: the chart serves them as templates.
    assert!(
        !root.join("charts/mailroute/crds").exists(),
        "charts/mailroute/crds/ is never upgraded by helm: the CRDs live in files/crds/"
    );
    let generated = mailroute_operator::crdgen::crds().unwrap();
    let mut names: Vec<String> = generated.iter().map(|(f, _)| f.to_string()).collect();
    names.sort();
    for dir in ["crds", "charts/mailroute/files/crds", "deploy/base/crds"] {
        let mut present: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        present.sort();
        assert_eq!(present, names, "{dir} holds other files than the generated CRDs: {FIX}");
        for (file, yaml) in &generated {
            let path = root.join(dir).join(file);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(committed == *yaml, "{dir}/{file} is out of date: {FIX}");
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
