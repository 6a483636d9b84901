#!/usr/bin/env python3
"""Offline checks of mailroute's packaging, run by scripts/check-packaging.sh.

Owns: linting and rendering the Helm chart (Helm's own Go engine through helm-python-sdk),
validating every rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate),
cross-reference checks between rendered objects (selectors, ports, Secrets, scale targets,
security contexts), the CRDs (copied into the chart's files/crds/, which its templates/crds.yaml
serves, and deploy/base/crds by --update-deploy; valid for Kubernetes) and their rendering,
examples/ against the CRDs' openAPIV3Schema, deploy/ against the
chart, the operator RBAC parity, the values documentation, and the Dockerfile pins.
Must not: contact a cluster or the network (everything here is offline and deterministic).

Usage: check_packaging.py [--update-deploy]
  --update-deploy  rewrite the generated files under deploy/ from the chart and copy crds/ to the
                   chart's files/crds/ and deploy/base/crds/, then check.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import helm_python as helm
import jsonpatch
import jsonschema
import kubernetes_validate
import yaml

from release_chart import app_version, release_chart

ROOT = Path(__file__).resolve().parent.parent
# The source tree's chart; its values.yaml, schema and files are read from here.
SOURCE_CHART = ROOT / "charts" / "mailroute"
CHART = SOURCE_CHART
# What is rendered: the chart as the release workflow publishes it (scripts/release_chart.py),
# whose default images exist. main() points CHART there; check_images() checks the source tree's.
DEPLOY = ROOT / "deploy"
RELEASE = "mailroute"
NAMESPACE = "mailroute"
# Oldest supported (Chart.yaml kubeVersion) and newest schema the validator ships.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
# Kinds from CRDs that kubernetes-validate has no schema for; checked structurally below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("cert-manager.io/v1", "Certificate"),
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"}
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Contract of the relay's queue (the lead's queue uses exactly these names).
READY_STREAM = "{mailroute}:ready"
CONSUMER_GROUP = "relays"
GENERATED_HEADER = (
    "# Generated from charts/mailroute with deploy/chart-values.yaml by\n"
    "# `scripts/check-packaging.sh --update-deploy`. Do not edit: change the chart instead.\n"
)

failures: list[str] = []
notes: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"  FAIL {msg}")


def ok(msg: str) -> None:
    print(f"  ok   {msg}")


def note(msg: str) -> None:
    notes.append(msg)
    print(f"  note {msg}")


def kn(o: dict) -> str:
    md = o.get("metadata", {})
    ns = md.get("namespace")
    return f"{o.get('kind')}/{ns + '/' if ns else ''}{md.get('name')}"


def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# ---------------------------------------------------------------------------------------------
# Helm


def load_values(path: Path | None) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path else {}


def lint(values: dict, label: str) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    for m in problems:
        fail(f"helm lint [{label}]: {m.get('path')}: {m.get('error')}")
    for e in report.get("errors") or []:
        fail(f"helm lint [{label}]: {e}")
    infos = [m.get("error") for m in report.get("messages", []) if m.get("severity", 0) < 2]
    if not problems and not report.get("errors"):
        ok(f"helm lint --strict [{label}]" + (f" (info: {'; '.join(infos)})" if infos else ""))


def render(values: dict, release: str = RELEASE, chart_dir: Path | None = None) -> tuple[list[dict], str]:
    """Renders like `helm template mailroute charts/mailroute -n mailroute`: objects and NOTES."""
    with helm.Chart.load(str(chart_dir or CHART)) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    objs: list[dict] = []
    notes_txt = ""
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            notes_txt = out[path]
            continue
        for doc in load_yaml_docs(out[path]):
            doc.setdefault("metadata", {})
            objs.append(doc)
    return objs, notes_txt


def render_fails(values: dict, chart_dir: Path | None = None) -> str | None:
    """The error message when rendering (schema validation included) fails, else None."""
    try:
        render(values, chart_dir=chart_dir)
    except helm.HelmError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------
# Object validation


def validate_k8s(objs: list[dict], label: str) -> None:
    counted = 0
    skipped: dict[str, int] = {}
    for o in objs:
        key = (o.get("apiVersion"), o.get("kind"))
        if key in CRD_KINDS:
            skipped[o["kind"]] = skipped.get(o["kind"], 0) + 1
            continue
        for v in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(o, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                fail(f"[{label}] {kn(o)} invalid for Kubernetes {v} at {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                fail(f"[{label}] {kn(o)}: no Kubernetes {v} schema for {key}")
        counted += 1
    ok(f"[{label}] {counted} objects valid against Kubernetes {' and '.join(KUBE_VERSIONS)} schemas (strict)")
    if skipped:
        note(
            f"[{label}] CRD-typed objects not schema-validated (no schema offline), checked structurally: "
            + ", ".join(f"{k} x{n}" for k, n in sorted(skipped.items()))
        )


def pod_spec(o: dict) -> dict | None:
    if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return o["spec"]["template"]["spec"]
    return None


def pod_labels(o: dict) -> dict:
    return o["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_references(objs: list[dict], values: dict, label: str) -> None:
    """Semantic cross-checks that schemas cannot express."""
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    workloads = [o for o in objs if pod_spec(o) is not None]
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    fleet = values.get("fleet", {}).get("name", "mailroute")
    # Objects that exist outside the chart: written by the operator, or given by the user.
    external = {("ConfigMap", f"{fleet}-config"), ("Secret", f"{fleet}-secrets")}
    relay = values.get("relay", {})
    for secret in (
        relay.get("adminToken", {}).get("existingSecret"),
        values.get("redis", {}).get("auth", {}).get("existingSecret"),
        values.get("externalRedis", {}).get("existingSecret"),
        relay.get("tls", {}).get("secretName") if not relay.get("tls", {}).get("certManager", {}).get("enabled") else None,
    ):
        if secret:
            external.add(("Secret", secret))
    for c in by_kind.get("Certificate", []):
        external.add(("Secret", c["spec"]["secretName"]))
    if relay.get("tls", {}).get("enabled") and not relay.get("tls", {}).get("secretName"):
        external.add(("Secret", f"{RELEASE}-relay-tls"))
    problems_before = len(failures)

    def ref(kind: str, name: str, where: str) -> None:
        if (kind, name) not in names and (kind, name) not in external:
            fail(f"[{label}] {where} refers to {kind} {name}, which is neither rendered nor an expected external object")

    for w in workloads:
        spec = pod_spec(w)
        where = kn(w)
        if not selects(w["spec"]["selector"]["matchLabels"], pod_labels(w)):
            fail(f"[{label}] {where}: selector does not match its pod labels")
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", sa) not in names and sa != "default":
            fail(f"[{label}] {where}: ServiceAccount {sa} not rendered")
        psc = spec.get("securityContext", {})
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                ref("ConfigMap", vol["configMap"]["name"], where)
            if "secret" in vol:
                ref("Secret", vol["secret"]["secretName"], where)
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                fail(f"[{label}] {cw}: runAsNonRoot not set")
            if sc.get("readOnlyRootFilesystem") is not True:
                fail(f"[{label}] {cw}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(f"[{label}] {cw}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                fail(f"[{label}] {cw}: capabilities do not drop ALL")
            if not c.get("resources", {}).get("requests"):
                fail(f"[{label}] {cw}: no resource requests")
            if "livenessProbe" not in c or "readinessProbe" not in c:
                fail(f"[{label}] {cw}: liveness or readiness probe missing")
            if "@sha256:" not in c["image"] and ":" not in c["image"].rsplit("/", 1)[-1]:
                fail(f"[{label}] {cw}: image {c['image']} has neither tag nor digest")
            port_names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                p = c.get(probe, {})
                for kind in ("httpGet", "tcpSocket"):
                    if kind in p and isinstance(p[kind]["port"], str) and p[kind]["port"] not in port_names:
                        fail(f"[{label}] {cw}: {probe} uses unknown port {p[kind]['port']}")
            for env in c.get("env", []):
                src = env.get("valueFrom", {})
                if "secretKeyRef" in src:
                    ref("Secret", src["secretKeyRef"]["name"], cw)
                if "configMapKeyRef" in src:
                    ref("ConfigMap", src["configMapKeyRef"]["name"], cw)
            for mount in c.get("volumeMounts", []):
                vols = {v["name"] for v in spec.get("volumes", [])}
                claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
                if mount["name"] not in vols | claims:
                    fail(f"[{label}] {cw}: mounts unknown volume {mount['name']}")

    for svc in by_kind.get("Service", []):
        sel = svc["spec"].get("selector", {})
        targets = [w for w in workloads if selects(sel, pod_labels(w))]
        if not targets:
            fail(f"[{label}] {kn(svc)}: selector matches no workload")
            continue
        ports = {p.get("name") for w in targets for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in ports:
                fail(f"[{label}] {kn(svc)}: targetPort {p['targetPort']} is not a container port of its pods")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for o in by_kind.get(kind, []):
            sel = o["spec"].get("selector", o["spec"].get("podSelector", {})).get("matchLabels", {})
            if not any(selects(sel, pod_labels(w)) for w in workloads):
                fail(f"[{label}] {kn(o)}: selector matches no workload")
    for np in by_kind.get("NetworkPolicy", []):
        sel = np["spec"]["podSelector"]["matchLabels"]
        ports = {p.get("name") for w in workloads if selects(sel, pod_labels(w)) for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        for rule in np["spec"].get("ingress", []):
            if "from" in rule and not rule["from"]:
                fail(f"[{label}] {kn(np)}: an empty `from` admits every source")
            for p in rule.get("ports", []):
                if isinstance(p.get("port"), str) and p["port"] not in ports:
                    fail(f"[{label}] {kn(np)}: port {p['port']} is not a container port of the selected pods")
    for o in by_kind.get("HorizontalPodAutoscaler", []) + by_kind.get("ScaledObject", []):
        t = o["spec"]["scaleTargetRef"]
        ref(t.get("kind", "Deployment"), t["name"], kn(o))
    if by_kind.get("HorizontalPodAutoscaler") and by_kind.get("ScaledObject"):
        fail(f"[{label}] both an HPA and a KEDA ScaledObject are rendered: they would fight over replicas")
    for so in by_kind.get("ScaledObject", []):
        streams = [t for t in so["spec"]["triggers"] if t["type"] in ("redis-streams", "redis-cluster-streams")]
        if not streams:
            fail(f"[{label}] {kn(so)}: no redis-streams or redis-cluster-streams trigger")
        for t in streams:
            md = t["metadata"]
            if md.get("stream") != READY_STREAM or md.get("consumerGroup") != CONSUMER_GROUP:
                fail(f"[{label}] {kn(so)}: stream/group {md.get('stream')}/{md.get('consumerGroup')} differ from the queue's {READY_STREAM}/{CONSUMER_GROUP}")
            if "lagCount" not in md:
                fail(f"[{label}] {kn(so)}: the redis-streams trigger does not scale on the consumer-group lag")
            if "authenticationRef" in t:
                ref("TriggerAuthentication", t["authenticationRef"]["name"], kn(so))
            if t["type"] == "redis-streams" and not re.fullmatch(r"[^:/]+:\d+", md.get("address", "")):
                fail(f"[{label}] {kn(so)}: address {md.get('address')!r} is not host:port")
            if t["type"] == "redis-cluster-streams" and not re.fullmatch(r"[^:/,\s]+:\d+(, [^:/,\s]+:\d+)*", md.get("addresses", "")):
                fail(f"[{label}] {kn(so)}: addresses {md.get('addresses')!r} is not a list of host:port")
    for ta in by_kind.get("TriggerAuthentication", []):
        for r in ta["spec"].get("secretTargetRef", []):
            ref("Secret", r["name"], kn(ta))
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        svcs = [s for s in by_kind.get("Service", []) if selects(sel, s["metadata"].get("labels", {}))]
        if len(svcs) != 1:
            fail(f"[{label}] {kn(sm)}: selects {len(svcs)} Services, expected exactly one")
        for ep in sm["spec"]["endpoints"]:
            if svcs and ep["port"] not in {p["name"] for p in svcs[0]["spec"]["ports"]}:
                fail(f"[{label}] {kn(sm)}: endpoint port {ep['port']} not on Service {svcs[0]['metadata']['name']}")
    for pr in by_kind.get("PrometheusRule", []):
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                if not r.get("alert") or not r.get("expr") or "severity" not in r.get("labels", {}):
                    fail(f"[{label}] {kn(pr)}: rule {r.get('alert')} lacks alert, expr or severity")
    for cm in by_kind.get("ConfigMap", []):
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for key, text in cm.get("data", {}).items():
                try:
                    d = json.loads(text)
                except json.JSONDecodeError as e:
                    fail(f"[{label}] {kn(cm)}: {key} is not JSON: {e}")
                    continue
                if not d.get("uid") or not d.get("panels"):
                    fail(f"[{label}] {kn(cm)}: {key} is not a Grafana dashboard")
    relay_dep = [w for w in workloads if w["metadata"]["name"].endswith("-relay")]
    for d in relay_dep:
        spec = pod_spec(d)
        c = spec["containers"][0]
        sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
        drain = next((a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--drain-timeout=")), None)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if sleep is None or drain is None:
            fail(f"[{label}] {kn(d)}: no native preStop sleep or no --drain-timeout")
        elif sleep + int(drain.rstrip("s")) >= grace:
            fail(f"[{label}] {kn(d)}: preStop {sleep}s + drain {drain} do not fit in the {grace}s grace period")
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        if not any(k.startswith("checksum/") for k in annotations):
            fail(f"[{label}] {kn(d)}: no checksum annotation")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        for flag in ("--config=", "--secrets="):
            arg = next((a for a in c["args"] if a.startswith(flag)), None)
            if not arg or str(Path(arg.split("=", 1)[1]).parent) not in mounts:
                fail(f"[{label}] {kn(d)}: {flag} does not point into a mounted volume")
    if len(failures) == problems_before:
        ok(f"[{label}] references, selectors, ports, security contexts, probes, drain and scaling consistent")


def operator_args(objs: list[dict]) -> list[str]:
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator"))
    return pod_spec(dep)["containers"][0]["args"]


def check_production(default: list[dict], binaries: dict[str, str]) -> None:
    """What a production install needs beyond valid objects (issue: production install review)."""
    before = len(failures)
    # Node drains: unready pods (Redis outage) must stay evictable.
    for values in (None, {"operator": {"replicas": 2}}):
        objs = default if values is None else render(values)[0]
        for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
            if pdb["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
                fail(f"{kn(pdb)}: unhealthyPodEvictionPolicy is not AlwaysAllow (blocks drains while Redis is down)")
    # HPA -> KEDA: KEDA's webhook refuses a ScaledObject whose Deployment has an HPA unless it may adopt it.
    keda, _ = render({"autoscaling": {"enabled": True, "keda": {"enabled": True}}})
    for so in (o for o in keda if o["kind"] == "ScaledObject"):
        if so["metadata"].get("annotations", {}).get("scaledobject.keda.sh/transfer-hpa-ownership") != "true":
            fail(f"{kn(so)}: no transfer-hpa-ownership annotation; switching from the HPA is refused")
        hpa_name = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"]
        chart_hpa = [o["metadata"]["name"] for o in render({"autoscaling": {"enabled": True}})[0] if o["kind"] == "HorizontalPodAutoscaler"]
        if chart_hpa != [hpa_name]:
            fail(f"{kn(so)}: KEDA's HPA {hpa_name} is not the chart's HPA {chart_hpa}: ownership cannot transfer")
    # Redis: maxmemory below the container limit, noeviction.
    for values, want in ((None, 1024**3 * 70 // 100), ({"redis": {"resources": {"limits": {"memory": "4G"}}}}, 4 * 10**9 * 70 // 100),
                         ({"redis": {"maxmemoryPercent": 50, "resources": {"limits": {"memory": "512Mi"}}}}, 256 * 1024**2),
                         ({"redis": {"maxmemory": "2gb"}}, "2gb")):
        objs = default if values is None else render(values)[0]
        conf = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-redis"))["data"]["redis.conf"]
        got = re.findall(r"^maxmemory (\S+)$", conf, re.M)
        if got != [str(want)] or "maxmemory-policy noeviction" not in conf:
            fail(f"redis.conf for {values}: maxmemory {got}, want [{want}] with noeviction")
    # Redis admits the relays (and KEDA), not the operator, which uses Redis only to publish the
    # pod identity map (podIdentities.enabled): then it is admitted, gets the relays' Redis URL
    # (password from the Secret, never in the spec), may list and watch Pods, and the relays read it.
    def admits_operator(objs: list[dict]) -> bool:
        np = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-redis"))
        return any(peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "operator"
                   for rule in np["spec"]["ingress"] for peer in rule.get("from", []))

    def operator_env(objs: list[dict]) -> dict:
        dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator"))
        return {e["name"]: e for e in pod_spec(dep)["containers"][0].get("env", [])}

    def relay_args(objs: list[dict]) -> list[str]:
        dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-relay"))
        return pod_spec(dep)["containers"][0]["args"]

    if admits_operator(default):
        fail("the Redis NetworkPolicy admits the operator, which without podIdentities never uses Redis")
    if "MAILROUTE_REDIS_URL" in operator_env(default) or ("", "pods", "*", "watch") in rbac_rules(default)["ClusterRole"]:
        fail("without podIdentities the operator still gets the Redis URL or Pod access")
    for values in ({"podIdentities": {"enabled": True}},
                   {"podIdentities": {"enabled": True}, "operator": {"watchNamespaces": ["team-a"]}}):
        objs, _ = render(values)
        if not admits_operator(objs):
            fail(f"{values}: the Redis NetworkPolicy does not admit the operator, which publishes the pod identity map")
        env = operator_env(objs)
        url = env.get("MAILROUTE_REDIS_URL", {}).get("value", "")
        if "$(REDIS_PASSWORD)@" not in url or "secretKeyRef" not in env.get("REDIS_PASSWORD", {}).get("valueFrom", {}):
            fail(f"{values}: the operator's Redis URL {url!r} does not take the password from the Redis Secret")
        scope = "Role" if "operator" in values else "ClusterRole"
        if not {("", "pods", "*", "list"), ("", "pods", "*", "watch")} <= rbac_rules(objs)[scope]:
            fail(f"{values}: the operator may not list and watch Pods ({scope})")
        if "--pod-identities" not in relay_args(objs):
            fail(f"{values}: the relays do not read the pod identity map (--pod-identities)")
    # The operator owns its outputs (uninstall removes them) and may read its Deployment for that.
    args = operator_args(default)
    op_name = next(o["metadata"]["name"] for o in default if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator"))
    if f"--owner-deployment={op_name}" not in args:
        fail(f"the operator is not passed --owner-deployment={op_name}: its ConfigMap and Secret outlive `helm uninstall`")
    if ("apps", "deployments", "*", "get") not in rbac_rules(default)["Role"]:
        fail("the operator's Role lacks get on deployments, which --owner-deployment reads")
    # Without an admin token the operator must start (usage is optional): no --relay-admin-url.
    no_token, _ = render({"relay": {"adminToken": {"create": False, "existingSecret": ""}}})
    if any(a.startswith("--relay-admin-url") for a in operator_args(no_token)):
        fail("with the admin token off the operator still gets --relay-admin-url (and exits without a token)")
    if not any(a.startswith("--relay-admin-url") for a in args):
        fail("with the admin token on the operator gets no --relay-admin-url (no quota usage)")
    # watchNamespaces: Roles in those namespaces only, no cluster-wide Secret access; the one
    # cluster-wide grant left is reading namespaces' labels (allowedNamespaces selectors), and
    # not even that when every namespace is a platform namespace (tenancy.platformNamespaces: ["*"]).
    namespaces_only = [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]
    for values, allowed in (({"operator": {"watchNamespaces": ["team-a", "team-b"]}}, {"-namespaces"}),
                            ({"operator": {"watchNamespaces": ["team-a"]}, "tenancy": {"platformNamespaces": ["*"]}}, set())):
        scoped, _ = render(values)
        cluster_roles = [o for o in scoped if o["kind"] in ("ClusterRole", "ClusterRoleBinding") and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "operator"]
        extra = [o for o in cluster_roles if not any(o["metadata"]["name"].endswith(a) for a in allowed)
                 or (o["kind"] == "ClusterRole" and o["rules"] != namespaces_only)]
        if extra:
            fail(f"with {values} the operator still gets {[kn(o) for o in extra]}")
    scoped, _ = render({"operator": {"watchNamespaces": ["team-a", "team-b"]}})
    for ns in ("team-a", "team-b"):
        roles = [o for o in scoped if o["kind"] == "Role" and o["metadata"].get("namespace") == ns]
        rules = rbac_rules(roles)["Role"]
        if ("", "secrets", "*", "get") not in rules or ("mailroute.io", "smtproutes", "*", "watch") not in rules:
            fail(f"with watchNamespaces, namespace {ns} has no Role to read its routes and Secrets: {sorted(rules)}")
        if not any(o["kind"] == "RoleBinding" and o["metadata"].get("namespace") == ns for o in scoped):
            fail(f"with watchNamespaces, namespace {ns} has no RoleBinding")
    # IPv6-only and dual-stack clusters: listeners on [::] (accepted by the binaries), Redis on both.
    for family in ("IPv6", "DualStack"):
        objs, _ = render({"ipFamily": family, "relay": {"tls": {"enabled": True, "secretName": "tls"}}})
        relay = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-relay"))
        listens = [a for a in pod_spec(relay)["containers"][0]["args"] if a.startswith("--") and "-listen=" in a]
        if len(listens) != 4 or not all(a.split("=", 1)[1].startswith("[::]:") for a in listens):
            fail(f"ipFamily={family}: relay listeners {listens}, want all four on [::]")
        if not any(a.startswith("--health-listen=[::]:") for a in operator_args(objs)):
            fail(f"ipFamily={family}: the operator's health listener is not on [::]")
        if binaries:
            problems, _ = cli_problems(objs, binaries)
            for p in problems:
                fail(f"ipFamily={family}: {p}")
    conf = next(o for o in default if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-redis"))["data"]["redis.conf"]
    if "bind * -::*" not in conf:
        fail("Redis binds IPv4 only (want `bind * -::*`)")

    # Names: Helm allows 53-character release names; Services are DNS-1035 labels (63).
    long_release = "r" * 53
    objs, _ = render({"autoscaling": {"enabled": True}, "operator": {"replicas": 2}}, release=long_release)
    seen: set[tuple] = set()
    for o in objs:
        name = o["metadata"]["name"]
        key = (o["kind"], o["metadata"].get("namespace"), name)
        if key in seen:
            fail(f"with a 53-character release name, two {o['kind']} objects are both named {name!r}")
        seen.add(key)
        # A StatefulSet's pods carry controller-revision-hash=<name>-<10-character hash>, a label value.
        limit = {"Service": 63, "Deployment": 63, "StatefulSet": 52}.get(o["kind"], 253)
        if len(name) > limit or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
            fail(f"with a 53-character release name, {o['kind']} {name!r} ({len(name)} characters) is not a valid name")
        if o["kind"] == "Service" and not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
            fail(f"with a 53-character release name, Service {name!r} is not a DNS-1035 label")
    if len(failures) == before:
        ok("production: IPv6 listeners, PDB eviction policy, KEDA adoption, Redis maxmemory, Redis peers (operator only with podIdentities), output ownership, optional admin token, namespaced RBAC, 53-character release names")


def cli_problems(objs: list[dict], binaries: dict[str, str]) -> tuple[list[str], list[str]]:
    """Whether the real binaries accept the flags the chart passes: clap parses (and checks the
    values of) every argument before `--help`, which is appended so nothing starts. Returns the
    problems and the containers checked."""
    problems, checked = [], []
    for w in (o for o in objs if o["kind"] == "Deployment"):
        c = pod_spec(w)["containers"][0]
        binary = binaries.get(c["name"])
        if not binary:
            continue
        # Kubernetes expands $(VAR) from the container env; any string stands in for it here.
        args = [re.sub(r"\$\((\w+)\)", r"\1-value", a) for a in c.get("args", [])]
        r = subprocess.run([binary, *args, "--help"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        if r.returncode != 0:
            problems.append(f"{kn(w)}: mailroute-{c['name']} rejects the chart's arguments: {r.stderr.strip().splitlines()[0]}")
            continue
        for a in args:
            flag, _, value = a.partition("=")
            if flag == "--relay-cidrs":
                for cidr in value.split(","):
                    try:
                        ipaddress.ip_network(cidr, strict=False)
                    except ValueError:
                        problems.append(f"{kn(w)}: --relay-cidrs entry {cidr!r} is not a network")
            if flag.endswith("-listen") and value:
                host, _, port = value.rpartition(":")
                try:
                    ipaddress.ip_address(host.strip("[]"))
                    assert 0 < int(port) < 65536
                except (ValueError, AssertionError):
                    problems.append(f"{kn(w)}: {flag} {value!r} is not an IP:port socket address")
        checked.append(c["name"])
    return problems, checked


def check_open_relay() -> None:
    """An outside-facing Service must not make outside clients look like relayCidrs; the PROXY
    protocol is passed to the relays; port 25 has an ingress rule of its own."""
    before = len(failures)

    def relay_args(objs: list[dict]) -> list[str]:
        dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-relay"))
        return pod_spec(dep)["containers"][0]["args"]

    for kind in ("LoadBalancer", "NodePort"):
        for policy in ("", "Cluster"):
            values = {"relay": {"service": {"type": kind, "externalTrafficPolicy": policy}}}
            err = render_fails(values)
            if err is None or "open relay" not in err:
                fail(f"the chart accepts a {kind} Service with externalTrafficPolicy {policy or 'default'} and relayCidrs: {err}")
    safe = {
        "Local": {"relay": {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}}},
        "PROXY protocol": {"relay": {"service": {"type": "LoadBalancer"}, "proxyProtocol": {"enabled": True, "trustedCidrs": ["10.1.0.0/16"]}}},
        "no relayCidrs": {"relay": {"service": {"type": "NodePort"}, "relayCidrs": []}},
    }
    for what, values in safe.items():
        err = render_fails(values)
        if err is not None:
            fail(f"the chart refuses a LoadBalancer/NodePort with {what}: {err.strip().splitlines()[-1]}")
    objs, _ = render(safe["PROXY protocol"])
    if "--proxy-protocol-from=10.1.0.0/16" not in relay_args(objs):
        fail(f"relay.proxyProtocol does not reach the relays: {relay_args(objs)}")
    if any(a.startswith("--proxy-protocol-from") for a in relay_args(render({})[0])):
        fail("the relays expect a PROXY header by default")
    if render_fails({"relay": {"proxyProtocol": {"enabled": True}}}) is None:
        fail("the chart accepts relay.proxyProtocol without trustedCidrs (anyone's header would be believed)")
    # Port 25 and 587/465 are separate rules: outside submitters are not let onto port 25.
    objs, _ = render({"relay": {"tls": {"enabled": True}}, "networkPolicy": {"submission": {"allowedCidrs": ["203.0.113.0/24"]}}})
    np = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-relay"))
    for rule in np["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        cidrs = {p["ipBlock"]["cidr"] for p in rule.get("from", []) if "ipBlock" in p}
        if "smtp" in ports and (ports - {"smtp"} or "203.0.113.0/24" in cidrs):
            fail(f"{kn(np)}: port 25 shares a rule with {ports - {'smtp'}} or admits the submitters' range: {rule}")
        if "submission" in ports and "203.0.113.0/24" not in cidrs:
            fail(f"{kn(np)}: networkPolicy.submission.allowedCidrs does not reach 587/465: {rule}")
    # The service proxy's addresses reach the relays' admin port, and nothing else.
    objs, _ = render({"networkPolicy": {"admin": {"allowedCidrs": ["192.0.2.10/32"]}}})
    for np in (o for o in objs if o["kind"] == "NetworkPolicy"):
        for rule in np["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            cidrs = {p["ipBlock"]["cidr"] for p in rule.get("from", []) if "ipBlock" in p}
            relay_admin = np["metadata"]["name"].endswith("-relay") and ports == {"admin"}
            if relay_admin != ("192.0.2.10/32" in cidrs):
                fail(f"{kn(np)}: networkPolicy.admin.allowedCidrs must reach the relays' admin port only: {rule}")
    if len(failures) == before:
        ok("open relay by configuration refused (LoadBalancer/NodePort without Local or PROXY protocol); PROXY protocol passed; port 25 rule apart; admin.allowedCidrs on the relays' admin port only")


def check_tenant_admin_access(default: list[dict]) -> None:
    """Tenants' admin API access (relay.adminApi.kubernetesAuth): off by default with no token
    mounted; on, the relays get the flag, their token, system:auth-delegator, and ClusterRoles
    aggregated into view (get/list) and edit (delete messages)."""
    before = len(failures)

    def relay(objs: list[dict]) -> dict:
        dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-relay"))
        return pod_spec(dep)

    def relay_cluster_rbac(objs: list[dict]) -> list[dict]:
        return [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")
                and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "relay"]

    spec = relay(default)
    if spec.get("automountServiceAccountToken") is not False:
        fail("by default the relays mount a ServiceAccount token (they call no API)")
    if any(a.startswith("--admin-kubernetes") for a in spec["containers"][0]["args"]):
        fail("by default the relays accept Kubernetes tokens")
    if relay_cluster_rbac(default):
        fail(f"by default the relays get cluster RBAC: {[kn(o) for o in relay_cluster_rbac(default)]}")
    sa_objs = [o for o in default if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == spec["serviceAccountName"]]
    if not sa_objs or sa_objs[0].get("automountServiceAccountToken") is not False:
        fail("the relays' ServiceAccount does not default to automountServiceAccountToken: false")

    on, _ = render({"relay": {"adminApi": {"kubernetesAuth": {"enabled": True, "cacheTtl": "30s"}}}})
    spec = relay(on)
    if spec.get("automountServiceAccountToken") is not True:
        fail("with kubernetesAuth the relays do not mount their token (TokenReview needs it)")
    args = spec["containers"][0]["args"]
    for want in ("--admin-kubernetes-auth", "--admin-kubernetes-cache-ttl=30s", "--admin-kubernetes-deny-ttl=10s"):
        if want not in args:
            fail(f"with kubernetesAuth the relays lack {want}: {args}")
    rbac = relay_cluster_rbac(on)
    bindings = [o for o in rbac if o["kind"] == "ClusterRoleBinding"]
    if [(b["roleRef"]["name"], b["subjects"]) for b in bindings] != [
            ("system:auth-delegator", [{"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": NAMESPACE}])]:
        fail(f"with kubernetesAuth the relays' ServiceAccount is not bound to system:auth-delegator alone: {bindings}")
    roles = {o["metadata"]["name"].rsplit("-", 1)[-1]: o for o in rbac if o["kind"] == "ClusterRole"}
    want_rules = {
        "view": ("aggregate-to-view", {("mailroute.io", r, "*", v) for r in ("deliveryevents", "messages", "quotausages", "suppressions") for v in ("get", "list")}),
        "edit": ("aggregate-to-edit", {("mailroute.io", "messages", "*", v) for v in ("delete", "update")}
                 | {("mailroute.io", "suppressions", "*", v) for v in ("create", "delete")}),
    }
    if set(roles) != set(want_rules):
        fail(f"with kubernetesAuth the tenant ClusterRoles are {sorted(roles)}, want view and edit")
    for suffix, (label, rules) in want_rules.items():
        role = roles.get(suffix)
        if role is None:
            continue
        if role["metadata"]["labels"].get(f"rbac.authorization.k8s.io/{label}") != "true":
            fail(f"{kn(role)} lacks the label rbac.authorization.k8s.io/{label}: \"true\"")
        if rbac_rules([role])["ClusterRole"] != rules:
            fail(f"{kn(role)} grants {sorted(rbac_rules([role])['ClusterRole'])}, want {sorted(rules)}")
    no_aggregation, _ = render({"relay": {"adminApi": {"kubernetesAuth": {"enabled": True, "aggregateToDefaultRoles": False}}}})
    if any(o["kind"] == "ClusterRole" for o in relay_cluster_rbac(no_aggregation)):
        fail("aggregateToDefaultRoles: false still renders the tenant ClusterRoles")
    if len(failures) == before:
        ok("tenant admin API: no token mounted by default; with kubernetesAuth the flag, the token, system:auth-delegator, ClusterRoles aggregated into view and edit")


def check_cli(objs: list[dict], label: str, binaries: dict[str, str]) -> None:
    problems, checked = cli_problems(objs, binaries)
    for p in problems:
        fail(f"[{label}] {p}")
    if checked and not problems:
        ok(f"[{label}] the chart's flags are accepted by mailroute-{' and mailroute-'.join(checked)}")


# ---------------------------------------------------------------------------------------------
# Images, the release workflow, `helm test`, GitOps


def workload_images(objs: list[dict]) -> dict[str, str]:
    """Container name -> image of the operator and relay Deployments."""
    return {c["name"]: c["image"] for o in objs if o["kind"] == "Deployment" for c in pod_spec(o)["containers"]}


def check_images(published: Path, registry: str) -> None:
    """The source tree's chart refuses its default (unpublished) images with build-and-push
    instructions and accepts images the user names; the published chart uses the appVersion tag
    in the release workflow's registry."""
    before = len(failures)
    version = app_version(SOURCE_CHART)
    err = render_fails({}, chart_dir=SOURCE_CHART)
    wanted = [
        "unpublished images",
        f"{registry}/mailroute-relay:{version}",
        f"oci://{registry}/charts/mailroute",
        "docker buildx build --platform linux/amd64,linux/arm64 --target relay -t <registry>/mailroute-relay:<tag> --push .",
        "docker buildx build --platform linux/amd64,linux/arm64 --target operator -t <registry>/mailroute-operator:<tag> --push .",
        "--set image.registry=<registry> --set image.tag=<tag>",
    ]
    if err is None:
        fail("the source tree's chart renders its default images, which may not exist (ImagePullBackOff): it must refuse them")
    elif missing := [w for w in wanted if w not in err]:
        fail(f"the source tree's chart refuses its default images without saying {missing}: {err}")
    # Naming one component's image is not enough while the other still uses the default.
    digest = "sha256:" + "ab" * 32
    for named, other in (("relay", "operator"), ("operator", "relay")):
        if render_fails({named: {"image": {"digest": digest}}}, chart_dir=SOURCE_CHART) is None:
            fail(f"the source tree's chart renders the default {other} image when only the {named} image is named")
    user_sets = (
        ({"image": {"registry": "registry.example/team/", "tag": "dev"}},
         {"relay": "registry.example/team/mailroute-relay:dev", "operator": "registry.example/team/mailroute-operator:dev"}),
        ({"relay": {"image": {"digest": digest}}, "operator": {"image": {"tag": "op-1"}}},
         {"relay": f"{registry}/mailroute-relay@{digest}", "operator": f"{registry}/mailroute-operator:op-1"}),
        ({"relay": {"image": {"tag": "r-1"}}, "operator": {"enabled": False}},
         {"relay": f"{registry}/mailroute-relay:r-1"}),
    )
    for values, want in user_sets:
        try:
            got = workload_images(render(values, chart_dir=SOURCE_CHART)[0])
        except helm.HelmError as e:
            fail(f"the source tree's chart refuses user-named images {values}: {e}")
            continue
        if got != want:
            fail(f"user-named images {values}: rendered {got}, want {want}")
    got = workload_images(render({}, chart_dir=published)[0])
    want = {"relay": f"{registry}/mailroute-relay:{version}", "operator": f"{registry}/mailroute-operator:{version}"}
    if got != want:
        fail(f"the published chart's default images are {got}, want {want}")
    # The release marker is the only thing the release changes besides the registry.
    other = Path(tempfile.mkdtemp(prefix="mailroute-release-chart-"))
    try:
        forked = release_chart(SOURCE_CHART, other, "ghcr.io/some-fork")
        got = workload_images(render({}, chart_dir=forked)[0])
        if got.get("relay") != f"ghcr.io/some-fork/mailroute-relay:{version}":
            fail(f"a chart released for ghcr.io/some-fork names {got}")
    finally:
        shutil.rmtree(other)
    if len(failures) == before:
        ok(f"images: the source tree's chart refuses its unpublished defaults with build-and-push instructions, accepts user-named images; the published chart pulls {want['relay']}")


def check_release_workflow(actionlint: str | None) -> None:
    """.github/workflows/release.yml publishes what the chart's defaults name."""
    before = len(failures)
    if actionlint:
        workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
        r = subprocess.run([actionlint, "-no-color", *workflows], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            fail("actionlint .github/workflows:\n" + (r.stdout + r.stderr).strip())
        else:
            ok(f"actionlint: {len(workflows)} workflow files")
    else:
        note("actionlint not given (--actionlint): the workflow files were not linted")
    path = ROOT / ".github" / "workflows" / "release.yml"
    if not path.exists():
        fail(".github/workflows/release.yml is missing: nothing publishes the chart's default images")
        return
    wf = yaml.safe_load(path.read_text())
    # PyYAML reads the key `on` as True.
    on = wf.get("on", wf.get(True, {}))
    if not (isinstance(on, dict) and "tags" in (on.get("push") or {})):
        fail("release.yml does not run on pushed tags")
    values = yaml.safe_load((SOURCE_CHART / "values.yaml").read_text())
    steps = [st for job in wf["jobs"].values() for st in job.get("steps", [])]
    builds = {st["with"]["target"]: st["with"] for st in steps if str(st.get("uses", "")).startswith("docker/build-push-action@")}
    for comp in ("relay", "operator"):
        w = builds.get(comp)
        repo = values[comp]["image"]["repository"]
        if not w:
            fail(f"release.yml builds no `{comp}` image")
            continue
        if set(str(w.get("platforms", "")).split(",")) != {"linux/amd64", "linux/arm64"}:
            fail(f"release.yml builds the {comp} image for {w.get('platforms')}, want linux/amd64,linux/arm64")
        if w.get("push") is not True or not str(w.get("tags", "")).endswith(f"/{repo}:${{{{ env.VERSION }}}}"):
            fail(f"release.yml pushes the {comp} image as {w.get('tags')!r}, not <registry>/{repo}:<appVersion>")
    text = path.read_text()
    for what, needle in (
        ("derives the registry and version with scripts/release_chart.py", "python3 scripts/release_chart.py"),
        ("signs the images", 'cosign sign --yes "$REGISTRY/mailroute-relay@'),
        ("pushes the chart as OCI", 'helm push "$RUNNER_TEMP"/dist/mailroute-'),
        ("signs the chart", 'cosign sign --yes "$REGISTRY/charts/mailroute@'),
    ):
        if needle not in text:
            fail(f"release.yml no longer {what}")
    jobs = wf["jobs"]
    if "images" not in jobs.get("chart", {}).get("needs", []):
        fail("release.yml may push the chart before its images exist (the chart job does not need the images job)")
    for name, job in jobs.items():
        if "cosign sign" in yaml.safe_dump(job) and job.get("permissions", {}).get("id-token") != "write":
            fail(f"release.yml job {name} signs without id-token: write (keyless signing needs the OIDC token)")
    if len(failures) == before:
        ok("release.yml: on tags, relay and operator images for linux/amd64 and linux/arm64 named as the chart names them, signed, then the chart pushed (OCI) and signed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pod_script(pod: dict, busybox: str, env: dict[str, str], tmp: str) -> subprocess.CompletedProcess:
    """Runs the test Pod's script with busybox sh (the image's shell, nc and wget) on this host."""
    c = pod["spec"]["containers"][0]
    pod_env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    pod_env.update(env, TMPDIR=tmp, PATH=f"{Path(busybox).parent}:/usr/bin:/bin")
    # Every applet through busybox, as in the Alpine image.
    bindir = Path(tmp) / "bin"
    bindir.mkdir(exist_ok=True)
    for applet in ("nc", "wget", "mkfifo", "date", "sh", "cat"):
        (bindir / applet).unlink(missing_ok=True)
        (bindir / applet).symlink_to(busybox)
    pod_env["PATH"] = str(bindir)
    return subprocess.run([busybox, "sh", "-c", c["args"][0]], env=pod_env, capture_output=True, text=True, timeout=90)


def run_helm_test_script(default: list[dict], with_message: list[dict], relay_bin: str) -> None:
    """The test Pod's script against the real relay binary (in-memory queue, no network: DNS goes
    to a closed local port), with and without a message, and against a server that refuses."""
    busybox = shutil.which("busybox")
    if not busybox:
        note("no busybox: the helm test script was not run against the relay")
        return
    pods = [next(o for o in objs if o["kind"] == "Pod") for objs in (default, with_message)]
    smtp, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "relay.log", "w")
        relay = subprocess.Popen(
            [relay_bin, "run", f"--smtp-listen=127.0.0.1:{smtp}", f"--admin-listen=127.0.0.1:{admin}",
             f"--dns-server=127.0.0.1:{free_port()}", "--no-log-stdout", "--relay-cidrs=127.0.0.0/8"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline or relay.poll() is not None:
                        fail(f"the relay binary did not become ready for the helm test script: {(Path(tmp) / 'relay.log').read_text()[-2000:]}")
                        return
                    time.sleep(0.2)
            env = {"ADMIN_URL": f"http://127.0.0.1:{admin}/readyz", "RELAY_HOST": "127.0.0.1", "RELAY_PORT": str(smtp)}
            for pod, what in zip(pods, ("EHLO", "one message")):
                work = Path(tmp) / what.replace(" ", "-")
                work.mkdir()
                r = run_pod_script(pod, busybox, env, str(work))
                if r.returncode != 0 or "ok: relay ready" not in r.stdout:
                    fail(f"the helm test script ({what}) fails against the real relay: {r.stdout[-1500:]} {r.stderr[-1500:]}")
                elif what == "one message" and not re.search(r"^S: 250 .*", r.stdout.split("C: .", 1)[-1], re.M):
                    fail(f"the helm test script sent no message: {r.stdout[-1500:]}")
        finally:
            relay.terminate()
            relay.wait(timeout=60)
            log.close()
        # The script must be able to fail: a server that refuses the session.
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)

            def refuse() -> None:
                conn, _ = srv.accept()
                with conn:
                    conn.sendall(b"554 5.3.2 not accepting mail\r\n")
            t = threading.Thread(target=refuse, daemon=True)
            t.start()
            work = Path(tmp) / "refused"
            work.mkdir()
            # /readyz of a dead port fails first; point it at a live one to reach the SMTP part.
            with http_ok_server() as ok_url:
                r = run_pod_script(pods[0], busybox, {"ADMIN_URL": ok_url, "RELAY_HOST": "127.0.0.1", "RELAY_PORT": str(srv.getsockname()[1])}, str(work))
            if r.returncode == 0 or "expected 220" not in r.stderr:
                fail(f"the helm test script passes against a server that answers 554: {r.stdout} {r.stderr}")
        work = Path(tmp) / "unready"
        work.mkdir()
        r = run_pod_script(pods[0], busybox, {"ADMIN_URL": f"http://127.0.0.1:{free_port()}/readyz", "RELAY_HOST": "127.0.0.1", "RELAY_PORT": "1"}, str(work))
        if r.returncode == 0:
            fail("the helm test script passes when /readyz does not answer")


class http_ok_server:
    """A local HTTP server answering 200 (a ready /readyz) while the block runs."""

    def __enter__(self) -> str:
        import http.server

        class Ok(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ready")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/readyz"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def check_helm_test(default: list[dict], binaries: dict[str, str]) -> None:
    """`helm test` has a Pod that asks /readyz through the admin Service and speaks SMTP to the
    relay Service, admitted by the NetworkPolicies."""
    before = len(failures)
    tests = [o for o in default if o["kind"] == "Pod" and o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    if len(tests) != 1:
        fail(f"`helm test` has {len(tests)} test Pods, want 1")
        return
    pod = tests[0]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    services = {o["metadata"]["name"]: o for o in default if o["kind"] == "Service"}
    relay_dep = next(o for o in default if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-relay"))
    relay_svc = services.get(env.get("RELAY_HOST"))
    if not relay_svc or not selects(relay_svc["spec"]["selector"], pod_labels(relay_dep)):
        fail(f"the test Pod talks SMTP to {env.get('RELAY_HOST')!r}, which is not the relay Service")
    elif str(relay_svc["spec"]["ports"][0]["port"]) != env.get("RELAY_PORT") or relay_svc["spec"]["ports"][0]["name"] != "smtp":
        fail(f"the test Pod uses port {env.get('RELAY_PORT')}, not the relay Service's smtp port")
    m = re.fullmatch(r"http://([^:/]+):(\d+)(/\S*)", env.get("ADMIN_URL") or "")
    readiness = pod_spec(relay_dep)["containers"][0]["readinessProbe"]["httpGet"]["path"]
    admin_svc = services.get(m.group(1)) if m else None
    if not m or not admin_svc or not selects(admin_svc["spec"]["selector"], pod_labels(relay_dep)) or m.group(3) != readiness \
            or int(m.group(2)) not in {p["port"] for p in admin_svc["spec"]["ports"]}:
        fail(f"the test Pod asks {env.get('ADMIN_URL')!r}, not the relays' {readiness} through the admin Service")
    script = "\n".join(c.get("command", []) + c.get("args", []))
    for needle in ('wget -q -O - "$ADMIN_URL"', 'nc "$RELAY_HOST" "$RELAY_PORT"', "reply 220", 'send "EHLO $HELO"', "reply 250", 'send "QUIT"', "reply 221"):
        if needle not in script:
            fail(f"the test Pod's script lacks {needle!r}")
    if pod["spec"].get("restartPolicy") != "Never" or not pod["spec"].get("activeDeadlineSeconds"):
        fail("the test Pod must not restart and must have a deadline (activeDeadlineSeconds)")
    sc = c.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False or not pod["spec"].get("securityContext", {}).get("runAsNonRoot"):
        fail("the test Pod runs with a writable root, privilege escalation or as root")
    if "/tmp" not in {m["mountPath"] for m in c.get("volumeMounts", [])}:
        fail("the test Pod makes its FIFOs in /tmp, which is not a writable volume")
    # The NetworkPolicies admit it: SMTP as a pod of the namespace, admin by its labels.
    nps = {o["metadata"]["name"]: o for o in default if o["kind"] == "NetworkPolicy"}
    relay_np = next((o for o in nps.values() if selects(o["spec"]["podSelector"]["matchLabels"], pod_labels(relay_dep))), None)
    if relay_np:
        labels = pod["metadata"].get("labels", {})
        for port in ("smtp", "admin"):
            rules = [r for r in relay_np["spec"].get("ingress", []) if any(p.get("port") == port for p in r.get("ports", []))]
            if not any("namespaceSelector" not in peer and "ipBlock" not in peer and selects(peer.get("podSelector", {}).get("matchLabels", {}), labels)
                       for r in rules for peer in r.get("from", [])):
                fail(f"the relay NetworkPolicy does not admit the test Pod to the {port} port")
    _, notes_txt = render({})
    if f"helm test {RELEASE} -n {NAMESPACE}" not in notes_txt:
        fail("NOTES.txt does not tell to run `helm test`")
    # Also when the namespace's other pods may not send mail.
    closed, _ = render({"networkPolicy": {"smtp": {"allowSameNamespace": False}}})
    np = next(o for o in closed if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == relay_np["metadata"]["name"]) if relay_np else None
    smtp_peers = [peer for r in (np or {}).get("spec", {}).get("ingress", []) if any(p.get("port") == "smtp" for p in r.get("ports", [])) for peer in r.get("from", [])]
    if np and [peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") for peer in smtp_peers] != ["helm-test"]:
        fail(f"with allowSameNamespace=false the relay NetworkPolicy's SMTP peers are {smtp_peers}, want only the test Pod")
    # With a recipient it sends one message; a recipient without a sender is refused.
    objs, _ = render({"tests": {"recipient": "postmaster@example.net", "sender": "helm-test@example.org"}})
    pod = next(o for o in objs if o["kind"] == "Pod")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    if env.get("RECIPIENT") != "postmaster@example.net" or 'send "DATA"' not in "\n".join(pod["spec"]["containers"][0]["args"]):
        fail("tests.recipient does not make the test Pod send a message")
    if render_fails({"tests": {"recipient": "postmaster@example.net"}}) is None:
        fail("tests.recipient without tests.sender is accepted")
    if any(o["kind"] == "Pod" for o in render({"tests": {"enabled": False}})[0]):
        fail("tests.enabled=false still renders the test Pod")
    if binaries.get("relay"):
        run_helm_test_script(default, objs, binaries["relay"])
    if len(failures) == before:
        ran = " (script run with busybox against the relay binary, and refused by a 554 server)" if binaries.get("relay") and shutil.which("busybox") else ""
        ok("helm test: a Pod asks the relays' /readyz through the admin Service, then EHLO (and with tests.recipient one message) through the relay Service; the NetworkPolicies admit it" + ran)


GITOPS_VALUES = {
    "relay": {"adminToken": {"existingSecret": "mailroute-admin-token", "key": "token"}, "tls": {"enabled": True, "secretName": "mailroute-relay-tls"}},
    "redis": {"auth": {"existingSecret": "mailroute-redis", "passwordKey": "redis-password"}},
}


def check_gitops() -> None:
    """GitOps (Argo CD, Flux: `helm template` on every sync): with the Secrets created outside the
    chart (SealedSecrets, ExternalSecrets) nothing secret is templated, every reference uses them,
    and two renders are identical; with generated Secrets they are not (why existingSecret)."""
    before = len(failures)
    first, _ = render(GITOPS_VALUES)
    second, _ = render(GITOPS_VALUES)
    secrets = [kn(o) for o in first if o["kind"] == "Secret"]
    if secrets:
        fail(f"with existingSecret values the chart still templates {secrets}")
    if first != second:
        fail("with existingSecret values two renders differ: a GitOps controller would roll the pods on every sync")
    refs: dict[str, set] = {}
    for o in first:
        spec = pod_spec(o) or (o["spec"] if o["kind"] == "Pod" else None)
        for c in (spec or {}).get("containers", []):
            for e in c.get("env", []):
                r = e.get("valueFrom", {}).get("secretKeyRef")
                if r:
                    refs.setdefault(r["name"], set()).add((kn(o), r["key"]))
        for v in (spec or {}).get("volumes", []):
            if "secret" in v:
                refs.setdefault(v["secret"]["secretName"], set()).add((kn(o), "(volume)"))
    for o in first:
        for r in o.get("spec", {}).get("secretTargetRef", []) if o["kind"] == "TriggerAuthentication" else []:
            refs.setdefault(r["name"], set()).add((kn(o), r["key"]))
    relay = f"Deployment/{NAMESPACE}/{RELEASE}-relay"
    redis = f"StatefulSet/{NAMESPACE}/{RELEASE}-redis"
    want = {
        "mailroute-admin-token": {(relay, "token"), (f"Deployment/{NAMESPACE}/{RELEASE}-operator", "token")},
        "mailroute-redis": {(relay, "redis-password"), (redis, "redis-password")},
        "mailroute-relay-tls": {(relay, "(volume)")},
    }
    for name, uses in want.items():
        if not uses <= refs.get(name, set()):
            fail(f"GitOps: Secret {name} is not used as {sorted(uses - refs.get(name, set()))} (uses {sorted(refs.get(name, set()))})")
    fleet = "mailroute-secrets"  # written by the operator: SMTP passwords and DKIM keys of the routes
    unexpected = set(refs) - set(want) - {fleet}
    if unexpected:
        fail(f"GitOps: the chart refers to Secrets {sorted(unexpected)} that nobody creates")
    # Without existingSecret the chart generates random values: renders differ (the reason above).
    a, _ = render({})
    b, _ = render({})
    if a == b:
        fail("two default renders are identical: the generated-secret check above proves nothing")
    readme = (SOURCE_CHART / "README.md").read_text()
    section = readme.split("### GitOps", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0] if "### GitOps" in readme else ""
    for needle in ("relay.adminToken.existingSecret", "redis.auth.existingSecret", "relay.tls.secretName", "SealedSecret", "ExternalSecret", "DKIM"):
        if needle not in section:
            fail(f"the chart README has no GitOps section naming {needle}")
    if len(failures) == before:
        ok("GitOps: with existingSecret for the admin token, Redis password and TLS, no Secret is templated, every reference uses them, and renders are reproducible")


# ---------------------------------------------------------------------------------------------
# CRDs and examples


def check_crds(update: bool) -> None:
    """crds/ (the operator's `crd` output) is the one source: the chart serves copies of it as
    templates (files/crds/, so that `helm upgrade` updates them) and deploy/base applies copies.
    --update-deploy writes the copies; that they are current (and that the chart has no crds/,
    which helm never upgrades) is operator/tests/crd_drift.rs's job, the one CRD drift check."""
    src = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    if update:
        for copy_dir in (SOURCE_CHART / "files" / "crds", DEPLOY / "base" / "crds"):
            copy_dir.mkdir(parents=True, exist_ok=True)
            for stale in copy_dir.glob("*.yaml"):
                if stale.name not in src:
                    stale.unlink()
            for name, data in src.items():
                (copy_dir / name).write_bytes(data)
            ok(f"{copy_dir.relative_to(ROOT)} written from crds/")
    for p in sorted((ROOT / "crds").glob("*.yaml")):
        for crd in load_yaml_docs(p.read_text()):
            for v in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(crd, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    fail(f"{p.name}: CRD invalid for Kubernetes {v}: {e.message}")
    ok("CRDs valid as apiextensions.k8s.io/v1 objects")


def check_crd_templates(default_objs: list[dict]) -> None:
    """The chart renders crds/ unchanged but for labels and, with crds.keep, the keep policy."""
    src = {crd["metadata"]["name"]: crd for p in sorted((ROOT / "crds").glob("*.yaml")) for crd in load_yaml_docs(p.read_text())}
    cases = {
        "default": (default_objs, True),
        "crds.keep=false": (render({"crds": {"keep": False}})[0], False),
    }
    for label, (objs, keep) in cases.items():
        rendered = {o["metadata"]["name"]: o for o in objs if o["kind"] == "CustomResourceDefinition"}
        if set(rendered) != set(src):
            fail(f"[{label}] the chart renders CRDs {sorted(rendered)}, crds/ has {sorted(src)}")
            continue
        for name, crd in rendered.items():
            if crd["spec"] != src[name]["spec"]:
                fail(f"[{label}] the chart's {name} differs from crds/")
            policy = crd["metadata"].get("annotations", {}).get("helm.sh/resource-policy")
            if policy != ("keep" if keep else None):
                fail(f"[{label}] {name} has helm.sh/resource-policy {policy!r}")
        ok(f"[{label}] the chart renders the CRDs of crds/ as templates" + (" with helm.sh/resource-policy: keep" if keep else ", uninstall deletes them"))
    if any(o["kind"] == "CustomResourceDefinition" for o in render({"crds": {"enabled": False}})[0]):
        fail("[crds.enabled=false] the chart still renders CRDs")
    else:
        ok("[crds.enabled=false] no CRDs rendered")


def openapi_to_jsonschema(s):
    """Kubernetes structural schema -> JSON Schema with the API server's semantics: nullable,
    int-or-string, and unknown fields rejected (the server would silently prune them)."""
    if isinstance(s, list):
        return [openapi_to_jsonschema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: openapi_to_jsonschema(v) for k, v in s.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    is_object = s.get("type") == "object"
    if is_object and "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    validators = {}
    for p in sorted((ROOT / "crds").glob("*.yaml")):
        for crd in load_yaml_docs(p.read_text()):
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schema = openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
                props = schema.setdefault("properties", {})
                props["apiVersion"] = {"type": "string"}
                props["kind"] = {"type": "string"}
                props["metadata"] = {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
                }
                schema["required"] = sorted(set(schema.get("required", [])) | {"spec"})
                jsonschema.Draft7Validator.check_schema(schema)
                validators[(f"{group}/{v['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def check_examples() -> None:
    validators = crd_validators()
    crs = 0
    for p in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in load_yaml_docs(p.read_text()):
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in validators:
                errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(e.path))
                for e in errors:
                    fail(f"examples/{p.name}: {kn(doc)} at {'/'.join(map(str, e.path)) or '(root)'}: {e.message}")
                crs += 1
            else:
                for v in KUBE_VERSIONS:
                    try:
                        kubernetes_validate.validate(doc, v, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        fail(f"examples/{p.name}: {kn(doc)} invalid for Kubernetes {v}: {e.message}")
    ok(f"examples/: {crs} custom resources valid against the CRDs' openAPIV3Schema, other objects against Kubernetes")
    # The schema must be able to fail: a field the API server would prune and a wrong type.
    route = validators[("mailroute.io/v1alpha1", "SmtpRoute")]
    bad = {"apiVersion": "mailroute.io/v1alpha1", "kind": "SmtpRoute", "metadata": {"name": "x"},
           "spec": {"host": "smtp.example.net", "port": "twenty-five", "priorty": 1}}
    found = {e.validator for e in route.iter_errors(bad)}
    if not {"additionalProperties", "type"} <= found:
        fail(f"CRD schema validation does not reject unknown fields and wrong types (got {found})")
    else:
        ok("CRD schema validation rejects unknown fields and wrong types")
    note("CEL rules (x-kubernetes-validations) in the CRDs are not evaluated offline; tests/tests/k8s_crds.rs runs examples/broken/ against real kube-apiservers")


# ---------------------------------------------------------------------------------------------
# deploy/: the chart rendered for kubectl/kustomize users


def deploy_values() -> dict:
    return load_values(DEPLOY / "chart-values.yaml")


def split_for_deploy(objs: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(base objects, monitoring objects, operator RBAC objects) of a render."""
    base, monitoring, rbac = [], [], []
    for o in objs:
        component = o["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if o["kind"] in MONITORING_KINDS or component == "monitoring":
            monitoring.append(o)
        elif o["kind"] in RBAC_KINDS and component == "operator":
            rbac.append(o)
        else:
            base.append(o)
    return base, monitoring, rbac


def dump_objects(objs: list[dict]) -> str:
    return GENERATED_HEADER + "".join(
        "---\n" + yaml.safe_dump(o, sort_keys=False, default_flow_style=False, width=120) for o in objs
    )


def sort_key(o: dict):
    return (o.get("kind"), o["metadata"].get("namespace", ""), o["metadata"].get("name"))


def rbac_rules(objs: list[dict]) -> dict[str, set]:
    """Rules of ClusterRoles and Roles as comparable sets, per scope."""
    out: dict[str, set] = {"ClusterRole": set(), "Role": set()}
    for o in objs:
        if o["kind"] in out:
            for r in o.get("rules", []):
                for g in r.get("apiGroups", [""]):
                    for res in r.get("resources", []):
                        for verb in r.get("verbs", []):
                            for name in r.get("resourceNames", ["*"]):
                                out[o["kind"]].add((g, res, name, verb))
    return out


def check_deploy(update: bool) -> None:
    values = deploy_values()
    objs, _ = render(values)
    base, monitoring, chart_rbac = split_for_deploy(objs)
    targets = {DEPLOY / "base" / "mailroute.yaml": base, DEPLOY / "monitoring" / "monitoring.yaml": monitoring}
    for path, expected in targets.items():
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump_objects(expected))
        if not path.exists():
            fail(f"{path.relative_to(ROOT)} missing (run scripts/check-packaging.sh --update-deploy)")
            continue
        committed = load_yaml_docs(path.read_text())
        if sorted(committed, key=sort_key) != sorted(expected, key=sort_key):
            have = {kn(o) for o in committed}
            want = {kn(o) for o in expected}
            detail = f" (missing {sorted(want - have)}, extra {sorted(have - want)})" if have != want else " (object contents differ)"
            fail(f"{path.relative_to(ROOT)} differs from the chart render{detail}: run scripts/check-packaging.sh --update-deploy")
        else:
            ok(f"{path.relative_to(ROOT)} equals `helm template` with deploy/chart-values.yaml ({len(expected)} objects)")

    # The kustomize base uses the operator helper's RBAC file; the chart must grant the same.
    rbac_file = DEPLOY / "base" / "operator-rbac.yaml"
    if not rbac_file.exists():
        fail("deploy/base/operator-rbac.yaml is missing (it is written with the operator)")
        return
    file_objs = load_yaml_docs(rbac_file.read_text())
    file_rules, chart_rules = rbac_rules(file_objs), rbac_rules(chart_rbac)
    for scope in ("ClusterRole", "Role"):
        if file_rules[scope] != chart_rules[scope]:
            fail(
                f"operator {scope} rules differ between deploy/base/operator-rbac.yaml and the chart: "
                f"only in the file {sorted(file_rules[scope] - chart_rules[scope])}, "
                f"only in the chart {sorted(chart_rules[scope] - file_rules[scope])}"
            )
        else:
            ok(f"operator {scope} rules identical in deploy/base/operator-rbac.yaml and the chart")
    deployed_sas = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in base if o["kind"] == "ServiceAccount"}
    roles = {(o["kind"], o["metadata"]["name"]) for o in file_objs if o["kind"] in ("ClusterRole", "Role")}
    for b in (o for o in file_objs if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if (b["roleRef"]["kind"], b["roleRef"]["name"]) not in roles:
            fail(f"deploy/base/operator-rbac.yaml: {kn(b)} refers to {b['roleRef']['kind']} {b['roleRef']['name']}, not in the file")
        for s in b.get("subjects", []):
            if s["kind"] == "ServiceAccount" and (s.get("namespace", b["metadata"].get("namespace")), s["name"]) not in deployed_sas:
                fail(f"deploy/base/operator-rbac.yaml: {kn(b)} binds ServiceAccount {s.get('namespace')}/{s['name']}, which the base does not deploy")
    for o in file_objs:
        validate_k8s_quiet(o, "deploy/base/operator-rbac.yaml")


def validate_k8s_quiet(o: dict, where: str) -> None:
    for v in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(o, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{where}: {kn(o)} invalid for Kubernetes {v}: {e.message}")


# A small, strict subset of `kustomize build`: enough for deploy/, and it refuses anything else
# rather than guessing. (No kustomize binary is available from the package registries here.)
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "images", "patches", "labels", "commonAnnotations"}


def kustomize_build(directory: Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZE_FIELDS
    if unknown:
        raise ValueError(f"{directory.relative_to(ROOT)}/kustomization.yaml uses {sorted(unknown)}, which this check does not implement")
    objs: list[dict] = []
    for r in k.get("resources", []):
        p = (directory / r).resolve()
        if p.is_dir():
            objs += kustomize_build(p)
        elif p.exists():
            objs += load_yaml_docs(p.read_text())
        else:
            raise ValueError(f"{directory.relative_to(ROOT)}: resource {r} does not exist")
    objs = copy.deepcopy(objs)
    for img in k.get("images", []):
        hits = 0
        for o in objs:
            spec = pod_spec(o)
            for c in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
                name = re.split(r"[@]", c["image"])[0]
                name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
                if name == img["name"]:
                    new = img.get("newName", name)
                    if "digest" in img:
                        c["image"] = f"{new}@{img['digest']}"
                    else:
                        c["image"] = f"{new}:{img['newTag']}" if "newTag" in img else new
                    hits += 1
        if not hits:
            raise ValueError(f"{directory.relative_to(ROOT)}: image {img['name']} matches no container")
    for lab in k.get("labels", []):
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(lab["pairs"])
            if lab.get("includeTemplates") and pod_spec(o) is not None:
                o["spec"]["template"]["metadata"].setdefault("labels", {}).update(lab["pairs"])
    for o in objs:
        if k.get("commonAnnotations"):
            o["metadata"].setdefault("annotations", {}).update(k["commonAnnotations"])
    for patch in k.get("patches", []):
        t = patch["target"]
        ops = yaml.safe_load(patch["patch"]) if "patch" in patch else yaml.safe_load((directory / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise ValueError(f"{directory.relative_to(ROOT)}: only JSON6902 patches (lists of operations) are supported")
        matched = [o for o in objs if o["kind"] == t["kind"] and o["metadata"]["name"] == t["name"]]
        if not matched:
            raise ValueError(f"{directory.relative_to(ROOT)}: patch target {t} matches no object")
        for o in matched:
            patched = jsonpatch.apply_patch(o, ops)
            o.clear()
            o.update(patched)
    return objs


def check_kustomize() -> None:
    for d in (DEPLOY / "base", DEPLOY / "monitoring", DEPLOY / "overlays" / "example"):
        label = str(d.relative_to(ROOT))
        try:
            objs = kustomize_build(d)
        except (ValueError, jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError) as e:
            fail(f"kustomize build {label}: {e}")
            continue
        seen = set()
        for o in objs:
            if kn(o) in seen:
                fail(f"kustomize build {label}: {kn(o)} appears twice")
            seen.add(kn(o))
        validate_k8s(objs, f"kustomize {label}")
        # deploy/monitoring refers to the base's Services; the overlay holds both.
        if d.name != "monitoring":
            check_references(objs, deploy_values(), f"kustomize {label}")


# ---------------------------------------------------------------------------------------------
# values.yaml documentation, Dockerfile


def check_values_documented() -> None:
    lines = (SOURCE_CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(- )?([A-Za-z_][\w.-]*):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        prev = lines[j].strip() if j >= 0 else ""
        if prev.startswith("- "):
            prev = prev[2:].lstrip()
        if not prev.startswith("#"):
            undocumented.append(f"line {i + 1}: {m.group(2)}")
    if undocumented:
        fail("values.yaml fields without a comment: " + ", ".join(undocumented))
    else:
        ok("every values.yaml field has a comment")


def check_dockerfile(hadolint: str | None) -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M | re.I)
    stages = {alias for _, alias in froms if alias}
    for image, _ in froms:
        if image in stages:
            continue
        if not re.search(r"@sha256:[a-f0-9]{64}$", image):
            fail(f"Dockerfile: base image {image} is not pinned by digest")
    for target in ("relay", "operator"):
        if target not in stages:
            fail(f"Dockerfile: no `{target}` target")
    # Multi-platform builds (release.yml: linux/amd64,linux/arm64) compile on the builder's own
    # platform and cross-compile; only the runtime stages are per target platform.
    platforms = {alias: platform for platform, alias in re.findall(r"^FROM\s+--platform=(\S+)\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I)}
    if platforms != {"build": "$BUILDPLATFORM"}:
        fail(f"Dockerfile: only the build stage may (and must) run on --platform=$BUILDPLATFORM, got {platforms}")
    if "TARGETARCH" not in text or "aarch64-unknown-linux-gnu" not in text:
        fail("Dockerfile: the build stage does not cross-compile for $TARGETARCH (linux/arm64)")
    # cargo needs every workspace member's manifest in the build context.
    members = re.search(r"^members\s*=\s*\[(.*?)\]", (ROOT / "Cargo.toml").read_text(), flags=re.M | re.S)
    copied = set(re.findall(r"^COPY\s+(\S+)\s+\./\1\s*$", text, flags=re.M))
    missing = [m for m in re.findall(r'"([^"]+)"', members.group(1) if members else "") if m not in copied]
    if missing:
        fail("Dockerfile: the build stage does not copy the workspace members " + ", ".join(missing))
    else:
        ok("Dockerfile copies every workspace member")
    # Final stages copy exactly one file, the binary, and run as a numeric non-root user.
    blocks = re.split(r"^FROM ", text, flags=re.M)[1:]
    runtime_user = None
    for block in blocks:
        head = block.splitlines()[0]
        alias = head.split()[-1] if " AS " in head.upper() else None
        user = re.findall(r"^USER\s+(\S+)", block, flags=re.M)
        if alias == "runtime" and user:
            runtime_user = user[-1]
        if alias in ("relay", "operator"):
            copies = re.findall(r"^COPY\s+(.*)$", block, flags=re.M)
            binary = f"mailroute-{alias}"
            if len(copies) != 1 or "--from=build" not in copies[0] or not copies[0].rstrip().endswith(f"/usr/local/bin/{binary}"):
                fail(f"Dockerfile target {alias}: must copy only the {binary} binary from the build stage, got {copies}")
            if "RUN " in block:
                fail(f"Dockerfile target {alias}: runs commands in the runtime image")
            if f'ENTRYPOINT ["/usr/local/bin/{binary}"]' not in block:
                fail(f"Dockerfile target {alias}: ENTRYPOINT is not the binary")
    if not runtime_user or not re.fullmatch(r"[1-9]\d*:[1-9]\d*", runtime_user):
        fail(f"Dockerfile: runtime stage user {runtime_user!r} is not a numeric non-root UID:GID")
    check_build_context(blocks)
    if hadolint:
        r = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
        if r.returncode != 0:
            fail("hadolint Dockerfile:\n" + (r.stdout + r.stderr).strip())
        else:
            ok("hadolint Dockerfile")
    ok("Dockerfile: digests pinned, targets relay and operator, build stage on $BUILDPLATFORM cross-compiling, binary-only runtime stages, numeric non-root user")


def check_build_context(blocks: list[str]) -> None:
    """The build stage's COPY set is a complete, --locked workspace with both binaries: copy
    exactly those paths (minus .dockerignore's target/) and ask cargo, offline."""
    build = next((b for b in blocks if b.splitlines()[0].split()[-1] == "build"), None)
    if build is None:
        fail("Dockerfile: no `build` stage")
        return
    sources = []
    for args in re.findall(r"^COPY\s+(.*)$", build, flags=re.M):
        parts = [p for p in args.split() if not p.startswith("--")]
        sources += parts[:-1]
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            path = ROOT / src
            if not path.exists():
                fail(f"Dockerfile copies {src}, which does not exist")
                return
            dest = Path(tmp) / src
            if path.is_dir():
                shutil.copytree(path, dest, ignore=shutil.ignore_patterns("target", "results"))
            else:
                shutil.copy2(path, dest)
        r = subprocess.run(
            ["cargo", "metadata", "--locked", "--offline", "--no-deps", "--format-version", "1"],
            cwd=tmp, capture_output=True, text=True,
        )
    if r.returncode != 0:
        fail("the Dockerfile's build context is not a complete locked workspace: " + r.stderr.strip().splitlines()[-1])
        return
    bins = {
        (p["name"], t["name"])
        for p in json.loads(r.stdout)["packages"]
        for t in p["targets"]
        if "bin" in t["kind"]
    }
    for pkg in ("mailroute-relay", "mailroute-operator"):
        if (pkg, pkg) not in bins:
            fail(f"Dockerfile: package {pkg} has no `{pkg}` binary to copy into the image")
    if all(f"package {pkg} has no" not in f for f in failures for pkg in ("mailroute-relay", "mailroute-operator")):
        ok(f"Dockerfile build context ({', '.join(sources)}) is a complete locked workspace with both binaries")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--update-deploy", action="store_true")
    ap.add_argument("--hadolint")
    ap.add_argument("--actionlint", help="actionlint binary to lint .github/workflows with")
    ap.add_argument("--relay-bin", help="mailroute-relay binary to check the chart's flags with")
    ap.add_argument("--operator-bin", help="mailroute-operator binary to check the chart's flags with")
    args = ap.parse_args()
    binaries = {k: v for k, v in (("relay", args.relay_bin), ("operator", args.operator_bin)) if v}

    # Everything below renders the chart as the release workflow publishes it (its default images
    # exist); check_images() covers the difference to the source tree's chart.
    global CHART
    registry = yaml.safe_load((SOURCE_CHART / "values.yaml").read_text())["image"]["registry"]
    published_dir = Path(tempfile.mkdtemp(prefix="mailroute-published-chart-"))
    CHART = release_chart(SOURCE_CHART, published_dir, registry)

    print(f"== chart (helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__})")
    check_values_documented()
    value_sets = {"default": None, **{p.name: p for p in sorted((SOURCE_CHART / "ci").glob("*.yaml"))}}
    rendered: dict[str, list[dict]] = {}
    for label, path in value_sets.items():
        values = load_values(path)
        lint(values, label)
        try:
            objs, notes_txt = render(values)
        except helm.HelmError as e:
            fail(f"helm template [{label}]: {e}")
            continue
        if "swaks" not in notes_txt or "dashboard" not in notes_txt:
            fail(f"[{label}] NOTES.txt does not explain the first message (swaks) and the dashboard")
        kinds = sorted({o["kind"] for o in objs})
        ok(f"helm template [{label}]: {len(objs)} objects ({', '.join(kinds)})")
        rendered[label] = objs
        validate_k8s(objs, label)
        check_references(objs, values, label)
        check_cli(objs, label, binaries)
    if not binaries:
        note("no binaries given (--relay-bin/--operator-bin): the chart's flags were not checked against the CLIs")
    keda = rendered.get("keda-external-redis-tls-values.yaml", [])
    for kind in ("ScaledObject", "TriggerAuthentication", "Certificate", "ServiceMonitor", "PrometheusRule"):
        if not any(o["kind"] == kind for o in keda):
            fail(f"[keda-external-redis-tls-values.yaml] renders no {kind}")
    cluster = rendered.get("keda-external-redis-cluster-values.yaml", [])
    if not any(t["type"] == "redis-cluster-streams" for o in cluster if o["kind"] == "ScaledObject" for t in o["spec"]["triggers"]):
        fail("[keda-external-redis-cluster-values.yaml] renders no redis-cluster-streams trigger")
    queue_urls = [e.get("value") for o in cluster if o["kind"] == "Deployment" for c in pod_spec(o)["containers"] for e in c.get("env", []) if e["name"] == "MAILROUTE_QUEUE"]
    if queue_urls != ["rediss+cluster://mailroute:$(REDIS_PASSWORD)@redis-0.example.internal:6380,redis-1.example.internal:6380"]:
        fail(f"[keda-external-redis-cluster-values.yaml] relay queue URL {queue_urls}")
    if any(o["kind"] == "StatefulSet" for o in keda):
        fail("[keda-external-redis-tls-values.yaml] renders the in-cluster Redis although externalRedis is used")

    check_production(rendered.get("default", []), binaries)
    check_open_relay()
    check_tenant_admin_access(rendered.get("default", []))

    print("== images, release workflow, helm test, GitOps")
    check_images(CHART, registry)
    check_release_workflow(args.actionlint)
    check_helm_test(rendered.get("default", []), binaries)
    check_gitops()

    print("== values the chart must refuse")
    refusals = {
        "writable root filesystem": {"containerSecurityContext": {"readOnlyRootFilesystem": False}},
        "misspelt field": {"relay": {"replica": 3}},
        "password in externalRedis.url": {"redis": {"enabled": False}, "externalRedis": {"url": "redis://:pw@redis:6379/0"}},
        "external Redis without URL": {"redis": {"enabled": False}},
        "password in a cluster URL": {"redis": {"enabled": False}, "externalRedis": {"url": "redis+cluster://app:pw@a:6379,b:6379"}},
        "cluster URL without ports": {"redis": {"enabled": False}, "externalRedis": {"url": "redis+cluster://a,b"}},
        "drain longer than the grace period": {"relay": {"shutdown": {"preStopSleepSeconds": 30, "drainTimeoutSeconds": 150, "terminationGracePeriodSeconds": 180}}},
        "a preStop sleep of 0 (API servers before 1.33 refuse it)": {"relay": {"shutdown": {"preStopSleepSeconds": 0}}},
        "two operators without leader election": {"operator": {"replicas": 2, "leaderElection": {"enabled": False}}},
        "minReplicas above maxReplicas": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}},
        "ServiceMonitor behind a NetworkPolicy that admits no Prometheus": {"metrics": {"serviceMonitor": {"enabled": True}}},
        "Redis without a memory limit or maxmemory": {"redis": {"resources": {"limits": {"memory": None}}}},
        "an unreadable Redis memory limit": {"redis": {"resources": {"limits": {"memory": "lots"}}}},
    }
    for what, values in refusals.items():
        err = render_fails(values)
        if err is None:
            fail(f"the chart accepts {what}")
        else:
            ok(f"refuses {what}: {err.strip().splitlines()[-1][:140]}")

    if binaries:
        # The flag check itself must be able to fail.
        objs, _ = render({"relay": {"extraArgs": ["--no-such-flag"]}, "operator": {"extraArgs": ["--leader-elect"]}})
        problems, _ = cli_problems(objs, binaries)
        if len(problems) != len(binaries):
            fail(f"the flag check caught {len(problems)} of {len(binaries)} bad arguments: {problems}")
        else:
            ok("the flag check rejects an unknown relay flag and a valueless --leader-elect")

    print("== CRDs and examples")
    check_crds(args.update_deploy)
    check_crd_templates(rendered.get("default", []))
    check_examples()

    print("== deploy/ (plain manifests)")
    check_deploy(args.update_deploy)
    check_kustomize()

    print("== Dockerfile")
    check_dockerfile(args.hadolint)

    shutil.rmtree(published_dir)
    print()
    if failures:
        print(f"packaging checks: {len(failures)} failed")
        return 1
    print(f"packaging checks: all passed ({len(notes)} notes above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
