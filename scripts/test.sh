#!/usr/bin/env bash
# Runs every check and test of the workspace on a fresh machine: installs what is missing
# (redis-server, swaks, postfix, the DKIM verifiers dkimpy and libopendkim), then fmt, clippy,
# and the whole test suite (the CRD drift check is operator/tests/crd_drift.rs).
# Tests start their own redis-server instances on 127.0.0.1 with free ports, and a real
# Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager; tests/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot build gains nothing from incremental state, which would double the disk it takes.
export CARGO_INCREMENTAL=0

apt_updated=""
need_apt() { # need_apt COMMAND PACKAGE
  if ! command -v "$1" >/dev/null 2>&1; then
    if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}
need_apt redis-server redis-server
# redis-cli builds the Redis Cluster of the cluster tests (redis-server pulls it in; be explicit).
need_apt redis-cli redis-tools
need_apt swaks swaks
# Postfix for the bench crate's reference test, which runs its own private instance; with
# "No configuration" the system instance has no main.cf and never starts.
command -v postfix >/dev/null 2>&1 || echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
need_apt postfix postfix
# The DKIM verifiers of relay/tests/dkim_interop.rs, which fails (never skips) without them:
# OpenDKIM's libopendkim (opendkim-tools pulls it in) and dkimpy with PyNaCl for Ed25519.
if ! python3 -c "import ctypes; ctypes.CDLL('libopendkim.so.11')" >/dev/null 2>&1; then
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq opendkim-tools >/dev/null
fi
python3 -c "import dkim, nacl" >/dev/null 2>&1 || python3 -m pip install --quiet "dkimpy[ed25519]==1.1.8" "PyNaCl==1.6.2"
# redis-server from apt starts a system instance; tests do not use it, so stop it if it runs.
if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== packaging checks (Helm chart, Kubernetes schemas, deploy/, Dockerfile)"
./scripts/check-packaging.sh
echo "== Kubernetes control plane (built once, then reused from the cache)"
./scripts/k8s-control-plane.sh build latest
# The oldest minor the chart claims (kubeVersion): only its kube-apiserver (tests/README.md).
./scripts/k8s-control-plane.sh build oldest
# The k8s tests run the operator, relay and CLI binaries themselves.
cargo build -q --locked -p mailroute-operator --bin mailroute-operator -p mailroute-relay --bin mailroute-relay -p mailroute-cli --bin mailroute
echo "== tests"
cargo test --workspace --locked
# Where the Kubernetes version decides (the API server's validation of CRDs and objects, helm's
# install and upgrade): the same suites against the oldest minor the chart claims.
echo "== Kubernetes $(./scripts/k8s-control-plane.sh version oldest): CRDs, examples, helm install/upgrade/uninstall"
MAILROUTE_K8S_VERSION=oldest cargo test --locked -p mailroute-tests --test k8s_crds --test k8s_helm --test k8s_helm_upgrade
