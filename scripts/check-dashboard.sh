#!/usr/bin/env bash
# Checks the Grafana dashboards and prometheus.yml against the real service:
#
#   1. promtool check config prometheus.yml (its alerting rules included)
#   2. dashboard structure: types, titles, Prometheus queries through the
#      $datasource variable (other datasources provisioned), the $job and
#      $instance variables, an expression per target (metric names and the
#      $job/$instance filters are Rust tests: tests/shipped, run by
#      `cargo test`)
#   3. starts the release binary (SQLite, 200ms flushes, a 50-key cache with a
#      1s TTL so entries get evicted) and a Prometheus on loopback scraping it
#      every second, with a config derived from prometheus.yml (the same job
#      name and alerting rules)
#   4. bench's loadgen sends valid increments for a while, and a curl loop
#      beside it requests the service refuses (422, 415, 413)
#   5. every expression, with the Grafana variables substituted ($job and
#      $instance from their own queries), must be valid and return data
#      through Prometheus's HTTP API
#   6. every alerting rule evaluated without error, every metric it reads
#      present, and none pending or firing on this healthy instance (their
#      unit tests, where each fires: scripts/check-alerts.sh)
#
# Run from anywhere: scripts/check-dashboard.sh
# Environment:
#   INCREMENT_BIN      use this binary instead of `cargo build --release`
#   LOADGEN_BIN        use this loadgen instead of building bench's
#   LOAD_SECONDS       how long to send increments (default 20)
#   BUILD_TIMEOUT      seconds allowed for the release build (default 3600)
# Every step is bounded in time; the service and Prometheus are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }
die() { printf '\ncheck-dashboard: FAILED: %s\n' "$*" >&2; exit 1; }

LOAD_SECONDS=${LOAD_SECONDS:-20}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-3600}
RATE_INTERVAL=15s   # window substituted for $__rate_interval; < LOAD_SECONDS
# Expressions are evaluated 1 s before the end of the load, so gauges show the
# service under load and every rate window lies inside it.

[[ "$LOAD_SECONDS" =~ ^[0-9]+$ ]] && [ "$LOAD_SECONDS" -ge 17 ] && [ "$LOAD_SECONDS" -le 300 ] \
  || die "LOAD_SECONDS must be a whole number of seconds from 17 to 300 (rate windows are $RATE_INTERVAL)"

tmp=$(mktemp -d -t check-dashboard.XXXXXX)
app_pid=""
prom_pid=""
child_pid=""

# `run` (long steps in the background, so signals are handled at once),
# `stop PID NAME [SIGNAL]`, `free_port`, `wait_http URL SECONDS PID NAME`.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop "$child_pid" "current step"
  stop "$app_pid" increment
  stop "$prom_pid" prometheus
  if [ "$rc" -ne 0 ]; then
    for log in "$tmp/increment.log" "$tmp/prometheus.log"; do
      if [ -s "$log" ]; then
        printf '\n--- last lines of %s ---\n' "$(basename "$log")" >&2
        tail -n 20 "$log" >&2 || true
      fi
    done
  fi
  rm -rf "$tmp"
  exit "$rc"
}
on_exit_run_cleanup

step "tools: prometheus, promtool, python3 with PyYAML"
command -v python3 >/dev/null || die "python3 is required"
command -v curl >/dev/null || die "curl is required"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing the Debian package prometheus"
  export DEBIAN_FRONTEND=noninteractive
  if ! run timeout 900 apt-get install -y --no-install-recommends prometheus; then
    run timeout 300 apt-get update
    run timeout 900 apt-get install -y --no-install-recommends prometheus
  fi
  # The package may start its own service on :9090; ours below uses another
  # port and its own storage, so that one is left alone.
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  run timeout 300 python3 -m pip install --quiet PyYAML
fi
prometheus --version 2>&1 | head -n 1
python3 --version

step "promtool check config prometheus.yml"
timeout 60 promtool check config prometheus.yml

step "checker self-test and dashboard structure"
timeout 60 python3 scripts/check_dashboard.py selftest
timeout 60 python3 scripts/check_dashboard.py static

if [ -n "${INCREMENT_BIN:-}" ]; then
  bin=$INCREMENT_BIN
  [ -x "$bin" ] || die "INCREMENT_BIN=$bin is not an executable"
else
  step "cargo build --release --bin increment"
  run timeout "$BUILD_TIMEOUT" cargo build --release --bin increment
  bin=target/release/increment
fi
find_loadgen
run_started=$(date +%s)

step "increment on a free port (SQLite in $tmp)"
bin=$(realpath "$bin")
(
  # Only the flags below: no INCREMENT_*/OTEL_*/DATABASE_URL from the caller,
  # and the working directory (where relative paths such as the spill file
  # land) is the temporary one.
  for var in $(compgen -e | grep -E '^(INCREMENT_|OTEL_|DATABASE_URL$)' || true); do unset "$var"; done
  export INCREMENT_SPILL_PATH="$tmp/spill.jsonl"
  cd "$tmp"
  export RUST_LOG="${RUST_LOG:-info},api::startup=info"   # the "listening" line
  exec "$bin" \
    --listen 127.0.0.1:0 \
    --database-url "sqlite://$tmp/increment.db?mode=rwc" \
    --flush-interval 200ms \
    --cache-capacity 50 \
    --cache-ttl 1s \
    --shutdown-timeout 10s
) >"$tmp/increment.log" 2>&1 &
app_pid=$!
app=$(listening_addr "$tmp/increment.log" "$app_pid" 30)
wait_http "http://$app/readyz" 30 "$app_pid" increment
echo "increment ready on $app (pid $app_pid)"
prom=127.0.0.1:$(free_port)

step "prometheus on $prom scraping $app every 1s (config derived from prometheus.yml)"
python3 scripts/check_dashboard.py render-config --source prometheus.yml --out "$tmp/prometheus.yml" \
  --job increment --target "$app" --self-target "$prom" --interval 1s
cat "$tmp/prometheus.yml"
timeout 60 promtool check config "$tmp/prometheus.yml"
prometheus \
  --config.file="$tmp/prometheus.yml" \
  --storage.tsdb.path="$tmp/data" \
  --web.listen-address="$prom" \
  --log.level=warn \
  >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!
wait_http "http://$prom/-/ready" 60 "$prom_pid" prometheus
run timeout 60 python3 scripts/check_dashboard.py wait-target --prometheus "http://$prom" --job increment --timeout 30

step "load: ${LOAD_SECONDS}s of increments (valid, 422, 415, a few 413) over many keys"
# Valid increments from loadgen (open loop), and beside it a few requests
# the service refuses, so the rejection panels have data too.
timeout $(( LOAD_SECONDS + 60 )) "$loadgen" --url "http://$app" -c 2 --rate 200 \
  -d "${LOAD_SECONDS}s" --keys uniform:2000 --values 1..=5 --key-prefix load: \
  >"$tmp/loadgen.json" 2>"$tmp/loadgen.log" &
loadgen_pid=$!
big=$(python3 -c 'print("{\"key\":\"big\",\"value\":1,\"pad\":\"" + "x" * 81920 + "\"}")')
refused=0
load_deadline=$(( $(date +%s) + LOAD_SECONDS ))
while [ "$(date +%s)" -lt "$load_deadline" ]; do
  curl -s -o /dev/null --max-time 2 -H 'content-type: application/json' -d '{"key":"load:x","value":"1"}' "http://$app/increment" || true
  curl -s -o /dev/null --max-time 2 -H 'content-type: text/plain' -d '{"key":"load:x","value":1}' "http://$app/increment" || true
  curl -s -o /dev/null --max-time 2 "http://$app/healthz" || true
  if [ $(( refused % 20 )) -eq 0 ]; then
    curl -s -o /dev/null --max-time 2 -H 'content-type: application/json' --data-binary "$big" "http://$app/increment" || true
  fi
  refused=$(( refused + 1 ))
  sleep 0.1
done
wait "$loadgen_pid" || die "loadgen failed (see $tmp/loadgen.log)"
grep -E '^(requests|status|errors)' "$tmp/loadgen.log"
echo "beside it: $(( refused * 2 )) refused increments (422, 415), $(( (refused + 19) / 20 )) of 80 KiB (413), $refused GET /healthz"
load_end=$(date +%s)
sleep 2   # two more scrapes, so the last samples include the end of the load
kill -0 "$app_pid" 2>/dev/null || die "increment exited during the load"

step "dashboard expressions against Prometheus"
check_rc=0
run timeout 180 python3 scripts/check_dashboard.py check \
  --prometheus "http://$prom" \
  --rate-interval "$RATE_INTERVAL" \
  --time "$(( load_end - 1 ))" || check_rc=$?

step "alerting rules against Prometheus"
rules_rc=0
run timeout 60 python3 scripts/check_dashboard.py rules --prometheus "http://$prom" --job increment --timeout 30 || rules_rc=$?

now=$(date +%s)
if [ "$check_rc" -ne 0 ]; then
  die "dashboard check failed (exit $check_rc) after $(( now - started ))s"
fi
if [ "$rules_rc" -ne 0 ]; then
  die "alerting rules check failed (exit $rules_rc) after $(( now - started ))s"
fi
printf '\ncheck-dashboard: PASSED in %ss (%ss after the build)\n' "$(( now - started ))" "$(( now - run_started ))"
