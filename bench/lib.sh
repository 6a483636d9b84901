# Shared by bench/instr.sh and bench/redis-bytes.sh (sourced): children stopped on exit, free
# loopback ports, bounded polling, and the Redis both measure against (AOF, appendfsync always,
# the chart's rewrite threshold). `start_redis DIR` sets $rport.
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS CMD...: polls CMD every 0.2 s
  local until=$((SECONDS + $1)); shift
  until "$@"; do
    if ((SECONDS > until)); then echo "timed out waiting for: $*" >&2; return 1; fi
    sleep 0.2
  done
}

start_redis() {
  rport=$(free_port)
  mkdir -p "$1/redis"
  redis-server --port "$rport" --bind 127.0.0.1 --dir "$1/redis" --save "" --appendonly yes \
    --appendfsync always --auto-aof-rewrite-min-size 1gb >"$1/redis.log" 2>&1 &
  pids+=($!)
  wait_for 30 redis-cli -p "$rport" ping >/dev/null
}
