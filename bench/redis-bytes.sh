#!/usr/bin/env bash
# Where Redis' bytes per queued message go: starts Redis (AOF, appendfsync always, as the bench's
# backlog phase) and the relay with `--workers 0` (nothing is delivered), queues N messages of
# SIZE bytes (one recipient, 32 sessions), then accounts `used_memory` by part: the message
# records (MEMORY USAGE of sampled `msg:` keys with SAMPLES 0, their fields, encodings and value
# lengths), the ready stream, the delivery log stream, the other keys, and what is left
# (allocator rounding of the keyspace's own tables, client buffers).
#
# Usage: bench/redis-bytes.sh RELAY_BIN [N=20000] [SIZE=4096] [OUT=/tmp/redis-bytes-<bin name>]
# Needs the release harness binaries (bench-loadgen) in $BENCH_BIN (default target/release),
# redis-server, redis-cli, curl and python3.
set -euo pipefail

relay=$(realpath "$1")
n=${2:-20000}
size=${3:-4096}
out=${4:-/tmp/redis-bytes-$(basename "$relay")}
bin=${BENCH_BIN:-target/release}

rm -rf "$out" && mkdir -p "$out"
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_redis "$out"
rc() { redis-cli -p "$rport" "$@"; }

cat >"$out/routes.yaml" <<EOF
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata:
  name: bench-sink
  namespace: bench
spec:
  host: "127.0.0.1"
  port: 9
  tls:
    mode: none
  match:
    recipientDomains: ["*"]
  priority: 10
EOF

smtp_port=$(free_port)
admin_port=$(free_port)
"$relay" run --queue "redis://127.0.0.1:$rport/0" --smtp-listen "127.0.0.1:$smtp_port" \
  --submission-listen "" --smtps-listen "" --admin-listen "127.0.0.1:$admin_port" \
  --routes "$out/routes.yaml" --workers 0 --hostname relay.bench.example >"$out/relay.log" 2>&1 &
relay_pid=$!
pids+=($relay_pid)
ready() {
  kill -0 "$relay_pid" 2>/dev/null || { tail -5 "$out/relay.log" >&2; exit 1; }
  curl -sf "http://127.0.0.1:$admin_port/readyz" -o /dev/null
}
wait_for 30 ready

mem() { rc INFO memory | sed -n "s/^$1:\([0-9]*\).*/\1/p"; }
before=$(mem used_memory)
"$bin/bench-loadgen" --target "127.0.0.1:$smtp_port" --messages "$n" --size "$size" --sessions 32 \
  >"$out/load.txt" 2>&1
after=$(mem used_memory)
rc INFO memory >"$out/info-memory.txt"
rc INFO keyspace >"$out/info-keyspace.txt"

python3 - "$rport" "$n" "$size" "$before" "$after" "$out" <<'PY'
import subprocess, sys, random
port, n, size, before, after, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
def rc(*a):
    return subprocess.run(["redis-cli", "-p", port, "--no-raw", *a], capture_output=True, text=True, check=True).stdout.strip()
def raw(*a):
    return subprocess.run(["redis-cli", "-p", port, "--raw", *a], capture_output=True, text=True, check=True).stdout
def usage(k):
    v = raw("MEMORY", "USAGE", k, "SAMPLES", "0").strip()
    return int(v) if v else 0
keys = raw("--scan").split()
msgs = [k for k in keys if ":msg:" in k]
other = [k for k in keys if ":msg:" not in k]
accepted = len(msgs)
random.seed(1)
sample = random.sample(msgs, min(200, len(msgs)))
per_msg = sum(usage(k) for k in sample) / len(sample)
k = sample[0]
fields = raw("HKEYS", k).split()
enc = raw("OBJECT", "ENCODING", k).strip()
lens = {f: int(raw("HSTRLEN", k, f).strip()) for f in fields}
delta = after - before
lines = []
p = lines.append
p(f"messages queued: {accepted} (sent {n}) of {size} bytes; used_memory {before} -> {after}: {delta / accepted:.0f} B/msg")
p(f"sample key {k}: encoding {enc}; fields (value length): " + ", ".join(f"{f}={l}" for f, l in lens.items()))
p(f"{'part':40} {'bytes/msg':>10}")
p(f"{'message record (MEMORY USAGE, mean of ' + str(len(sample)) + ')':40} {per_msg:10.0f}")
total_other = 0
for key in sorted(other):
    u = usage(key)
    total_other += u
    t = raw("TYPE", key).strip()
    ln = ""
    if t == "stream": ln = raw("XLEN", key).strip()
    elif t == "zset": ln = raw("ZCARD", key).strip()
    elif t == "hash": ln = raw("HLEN", key).strip()
    p(f"{key + ' (' + t + ', ' + (ln or '-') + ')':40} {u / accepted:10.1f}")
rest = delta - per_msg * accepted - total_other
p(f"{'rest (dict tables, allocator, buffers)':40} {rest / accepted:10.1f}")
p(f"{'total (used_memory delta)':40} {delta / accepted:10.0f}")
open(out + "/breakdown.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
grep -E "^(allocator_allocated|allocator_active|allocator_resident|used_memory_dataset|used_memory_overhead|mem_fragmentation_ratio|allocator_frag_ratio):" \
  "$out/info-memory.txt"
