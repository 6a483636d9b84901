#!/usr/bin/env bash
# The whole benchmark in one command: builds the harness and the relay (release), installs
# Postfix, redis-server (and perf for --profile) when missing and the peer MTAs
# (bench/install-peers.sh, cached under ~/.cache), then runs bench-run, which writes
# bench/results/<date>-<host>[-quick].md and .json. Usage: bench/run.sh [--quick] [--profile]
# [--only ceiling,postfix,peers,relay,scaling,backlog,fsync,redisbase] [--peers exim,opensmtpd,haraka,maddy]
# [other bench-run flags, see --help].
# Must run as root: Postfix's master process requires it.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=""
need_apt() { # need_apt COMMAND PACKAGE
  if ! command -v "$1" >/dev/null 2>&1; then
    if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}
# "No configuration": the system Postfix gets no main.cf and never starts; the harness runs its
# own instance on a private port and directory.
command -v postfix >/dev/null 2>&1 || echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
need_apt postfix postfix
need_apt redis-server redis-server
case " $* " in *" --profile "*) need_apt perf linux-perf ;; esac
# The apt package may have started a system redis; the harness starts its own.
if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi

# Which steps run (all by default) and which peers, as bench-run will read them.
only="" peers="exim,opensmtpd,haraka,maddy" manifest=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --only) only="${args[$((i + 1))]:-}" ;;
    --only=*) only="${args[$i]#--only=}" ;;
    --peers) peers="${args[$((i + 1))]:-}" ;;
    --peers=*) peers="${args[$i]#--peers=}" ;;
    --peers-manifest) manifest="${args[$((i + 1))]:-}" ;;
    --peers-manifest=*) manifest="${args[$i]#--peers-manifest=}" ;;
  esac
done
wants() { [ -z "$only" ] || case ",$only," in *",$1,"*) true ;; *) false ;; esac; }

extra=()
if wants peers; then
  # A peer that fails to install is written to the manifest with the reason; its row says so.
  if [ -z "$manifest" ]; then
    manifest="$HOME/.cache/mailroute-bench/peers/manifest.tsv"
    extra=(--peers-manifest "$manifest")
  fi
  bench/install-peers.sh "$manifest" "$peers"
fi

cargo build --release --locked -p mailroute-bench --bins
if wants relay || wants scaling || wants backlog || wants profile || case " $* " in *" --profile "*) true ;; *) false ;; esac; then
  if ! cargo build --release --locked -p mailroute-relay --bin mailroute-relay; then
    echo "mailroute-relay does not build: the relay rows will be reported as not run" >&2
  fi
fi
exec target/release/bench-run "$@" "${extra[@]}"
