#!/usr/bin/env bash
# Licences, bans and sources of every dependency (deny.toml), with cargo-deny; installs cargo-deny
# 0.20.2 from crates.io first when it is missing (`--install`; a few minutes of compiling).
#
# `advisories` (RustSec) is left out unless DENY_ADVISORIES=1: cargo-deny fetches the advisory
# database from GitHub, and no package registry serves it, so it fails where only the registries
# can be reached. Run it where GitHub is reachable: DENY_ADVISORIES=1 ./scripts/deny.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deny --version >/dev/null 2>&1; then
  if [ "${1:-}" != "--install" ]; then
    echo "cargo-deny is not installed: run $0 --install" >&2
    exit 1
  fi
  nice -n 10 cargo install --locked cargo-deny@0.20.2
fi
checks=(licenses bans sources)
if [ "${DENY_ADVISORIES:-}" = 1 ]; then checks+=(advisories); fi
cargo deny --locked check --hide-inclusion-graph "${checks[@]}"
