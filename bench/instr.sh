#!/usr/bin/env bash
# Instructions the relay spends per delivered message, counted by callgrind: repeatable on a
# busy machine where wall-clock rows are not (and where perf has no hardware counters, as in
# VMs). Starts Redis (AOF, appendfsync always), bench-sink and the relay the way bench-run does
# (bench/src/harness.rs: `run --queue … --smtp-listen … --routes <sink route> --workers 64`),
# the relay under `valgrind --tool=callgrind`; sends a warm-up batch, zeroes the counters, sends
# N messages of SIZE bytes (one recipient, 32 sessions), waits until the sink has them all,
# dumps the counters and prints `instructions/msg`. The dump stays in OUT for
# `callgrind_annotate OUT/callgrind.out.1`.
#
# Usage: bench/instr.sh RELAY_BIN [N=2000] [OUT=/tmp/instr-<bin name>] [SIZE=10240]
# NATIVE=1 runs the relay without valgrind and prints its user and system CPU per message instead
# (from /proc/PID/stat; wall-clock noise applies, but it shows the kernel's share, which
# callgrind does not count).
# CALLGRIND_ARGS adds valgrind options (e.g. --separate-callers4=__memcpy_avx_unaligned_erms).
# Needs the release harness binaries (bench-sink, bench-loadgen) in $BENCH_BIN (default
# target/release), redis-server, valgrind and curl.
set -euo pipefail

relay=$(realpath "$1")
n=${2:-2000}
out=${3:-/tmp/instr-$(basename "$relay")}
size=${4:-10240}
bin=${BENCH_BIN:-target/release}
warm=200

rm -rf "$out" && mkdir -p "$out"
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_redis "$out"

"$bin/bench-sink" >"$out/sink.txt" 2>&1 &
pids+=($!)
wait_for 30 grep -q LISTENING "$out/sink.txt"
sink_smtp=$(sed -n 's/.*smtp=\([^ ]*\).*/\1/p' "$out/sink.txt")
sink_http=$(sed -n 's/.*http=\([^ ]*\).*/\1/p' "$out/sink.txt")
cat >"$out/routes.yaml" <<EOF
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata:
  name: bench-sink
  namespace: bench
spec:
  host: "${sink_smtp%:*}"
  port: ${sink_smtp##*:}
  tls:
    mode: none
  match:
    recipientDomains: ["*"]
  priority: 10
EOF

smtp_port=$(free_port)
admin_port=$(free_port)
runner=(valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$out/callgrind.out")
if [ -n "${NATIVE:-}" ]; then runner=(); fi
"${runner[@]}" "$relay" run --queue "redis://127.0.0.1:$rport/0" --smtp-listen "127.0.0.1:$smtp_port" \
  --submission-listen "" --smtps-listen "" --admin-listen "127.0.0.1:$admin_port" \
  --routes "$out/routes.yaml" --workers 64 --hostname relay.bench.example >"$out/relay.log" 2>&1 &
relay_pid=$!
pids+=($relay_pid)
ready() {
  kill -0 "$relay_pid" 2>/dev/null || { tail -5 "$out/relay.log" >&2; exit 1; }
  curl -sf "http://127.0.0.1:$admin_port/readyz" -o /dev/null
}
wait_for 300 ready

delivered() { curl -sf "http://$sink_http/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])'; }
has() { [ "$(delivered)" -ge "$1" ]; }
load() {
  "$bin/bench-loadgen" --target "127.0.0.1:$smtp_port" --messages "$1" --size "$size" --sessions 32 \
    --timeout 300 --json >>"$out/loadgen.json"
}

load "$warm"
wait_for 600 has "$warm"
cpu() { awk '{print $14, $15}' "/proc/$relay_pid/stat"; } # utime stime, in clock ticks
if [ -n "${NATIVE:-}" ]; then before=$(cpu); else callgrind_control -z "$relay_pid" >/dev/null; fi
start=$(date +%s.%N)
load "$n"
wait_for 1200 has $((warm + n))
if [ -n "${NATIVE:-}" ]; then after=$(cpu); else callgrind_control -d "$relay_pid" >/dev/null; fi
secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
kill "$relay_pid"
wait "$relay_pid" 2>/dev/null || true

if [ -n "${NATIVE:-}" ]; then
  python3 - "$before" "$after" "$n" "$(getconf CLK_TCK)" "$relay" "$secs" <<'PY'
import sys
b, a, n, hz = sys.argv[1].split(), sys.argv[2].split(), int(sys.argv[3]), int(sys.argv[4])
user, sys_ = [(int(a[i]) - int(b[i])) * 1000 / hz / n for i in (0, 1)]
print(f"relay={sys.argv[5]} messages={n} cpu_ms/msg user={user:.3f} system={sys_:.3f} total={user + sys_:.3f} wall={sys.argv[6]}s")
PY
  exit 0
fi

dump=$(ls "$out"/callgrind.out.* | sort -t. -k3 -n | head -1)
total=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$dump")
echo "relay=$relay messages=$n size=$size instructions=$total instructions/msg=$((total / n)) wall=${secs}s dump=$dump"
