#!/usr/bin/env bash
# Several instances behind a real nginx, with one of them restarted during the
# load. The result is checked against PostgreSQL key by key.
#
#   1. nginx (installed with apt-get if missing), PostgreSQL (started if
#      down), a new database (dropped at exit)
#   2. three instances of the release binary on free loopback ports, each with
#      its own spill file and instance id, flushing every 200ms
#   3. nginx with its own prefix, pid and logs in a temporary directory, on a
#      free loopback port. Its config is rendered from
#      nginx/increment.conf.template (the file docker-compose uses), with the
#      three instances as static upstreams.
#   4. checks through the proxy: /readyz, /docs, /openapi.json, /metrics
#      (refused at the edge), X-Request-Id, 413 over 64k
#   5. bench's loadgen sends REQUESTS increments (default 200,000) through
#      nginx on CONCURRENCY keep-alive connections (default 64): zipf over
#      10,000 keys (a few hot, a long cold tail), random positive and
#      negative values
#   6. about half way through, instance 2 gets SIGTERM and must exit 0 with
#      everything written. A few seconds later it starts again on the same
#      port. The load holds at 75% until it is back, so the restarted
#      instance is sure to get traffic.
#   7. each instance's share of the 202s, from its /metrics; each must be
#      above zero
#   8. loadgen --verify: every key in PostgreSQL must equal the sum of the
#      increments answered 202 (waiting for the flushes); then everything
#      gets SIGTERM, each instance must exit 0 and leave no spill file, and
#      the stored total must not have moved
#
# A request that nginx answers 502/504, or whose connection breaks after it
# was sent, is "ambiguous": the instance may or may not have applied it. nginx
# never resends a POST once sent (proxy_next_upstream error timeout, without
# non_idempotent), so each one is applied at most once. loadgen records its
# key and value and accepts a key only if its stored value is the sum of its
# 202s plus some subset of its ambiguous values; it fails if there are more
# than CONCURRENCY ambiguous requests, and on any other status
# (--expect-accepted).
#
# Run from anywhere: scripts/e2e-scale.sh
# Environment:
#   INCREMENT_BIN    use this binary instead of `cargo build --release`
#   LOADGEN_BIN      use this loadgen instead of building bench's
#   REQUESTS         increments to send (default 200000)
#   CONCURRENCY      keep-alive connections (default 64)
#   E2E_SEED         seed for keys and values (default: random, printed)
#   E2E_TIME_LIMIT   seconds allowed after the build (default 420)
#   BUILD_TIMEOUT    seconds allowed for the release build (default 3600)
#   PGHOST PGPORT PGUSER   the PostgreSQL server (default 127.0.0.1 5432 postgres)
#   E2E_KEEP_TMP=1   keep the temporary directory (logs, rendered config)
# Only loopback addresses are used. Every process started here is stopped on
# exit.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }
die() { printf '\ne2e-scale: FAILED: %s\n' "$*" >&2; exit 1; }

REQUESTS=${REQUESTS:-200000}
CONCURRENCY=${CONCURRENCY:-64}
E2E_TIME_LIMIT=${E2E_TIME_LIMIT:-420}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-3600}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
export PGHOST PGPORT PGUSER
SEED=${E2E_SEED:-$(( (RANDOM << 15) | RANDOM ))}
RESTARTED=2        # the instance stopped and started again during the load
RESTART_PAUSE=3    # seconds between its exit and its new start

for n in REQUESTS CONCURRENCY E2E_TIME_LIMIT SEED; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || die "$n must be a whole number"
done
[ "$REQUESTS" -ge 1000 ] || die "REQUESTS must be at least 1000"

tmp=$(mktemp -d -t e2e-scale.XXXXXX)
# nginx workers run as an unprivileged user when started by root; they must
# reach the temp paths below.
chmod 755 "$tmp"
declare -a inst_pid=("" "" "" "")
declare -a inst_port=("" "" "" "")
nginx_pid=""
load_pid=""
child_pid=""
watchdog_pid=""
db=""
db_created=0
policy_rc_created=0
failures=()

fail() {  # a failed check: reported in the summary, the run goes on
  printf 'e2e-scale: FAILED: %s\n' "$*" >&2
  failures+=("$*")
}

psql_admin() { psql -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }

# `run` (long steps in the background, so signals are handled at once),
# `stop PID NAME [SIGNAL]`, `free_port`, `wait_http URL SECONDS PID NAME`.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$watchdog_pid" ]; then
    kill -TERM "$watchdog_pid" 2>/dev/null || true
    wait "$watchdog_pid" 2>/dev/null || true
  fi
  stop "$child_pid" "current step"
  stop "$load_pid" "load"
  stop "$nginx_pid" nginx QUIT
  for i in 1 2 3; do stop "${inst_pid[$i]}" "instance $i"; done
  if [ "$policy_rc_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  if [ "$db_created" = 1 ]; then
    psql_admin "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
      || echo "e2e-scale: could not drop database $db" >&2
  fi
  if [ "$rc" -ne 0 ]; then
    for log in "$tmp"/i*/increment.log "$tmp/nginx/error.log" "$tmp/nginx/stderr.log"; do
      if [ -s "$log" ]; then
        printf '\n--- last lines of %s ---\n' "${log#"$tmp"/}" >&2
        tail -n 15 "$log" >&2 || true
      fi
    done
  fi
  remove_tmp e2e-scale "${E2E_KEEP_TMP:-0}"
  exit "$rc"
}
on_exit_run_cleanup

# ---------------------------------------------------------------------------
step "tools: nginx, envsubst, psql, python3, curl"
command -v python3 >/dev/null || die "python3 is required"
command -v curl >/dev/null || die "curl is required"
command -v psql >/dev/null || die "psql is required"
need_apt=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v envsubst >/dev/null || need_apt+=(gettext-base)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing with apt-get: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The nginx package would start the system's own nginx on port 80; this
  # test needs only the binary, so no service is started during the install.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    policy_rc_created=1
  fi
  if ! run timeout 900 apt-get install -y --no-install-recommends "${need_apt[@]}"; then
    run timeout 300 apt-get update
    run timeout 900 apt-get install -y --no-install-recommends "${need_apt[@]}"
  fi
  if [ "$policy_rc_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; policy_rc_created=0; fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
"$NGINX" -v 2>&1
python3 --version

step "PostgreSQL on $PGHOST:$PGPORT"
if ! pg_isready -h "$PGHOST" -p "$PGPORT" -q; then
  cluster_version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start
  for _ in $(seq 1 30); do pg_isready -h "$PGHOST" -p "$PGPORT" -q && break; sleep 1; done
fi
pg_isready -h "$PGHOST" -p "$PGPORT"
db="increment_e2e_scale_$$_$(date +%s)"
psql_admin "CREATE DATABASE \"$db\""
db_created=1
db_url="postgres://$PGUSER@$PGHOST:$PGPORT/$db"
echo "database $db (dropped at exit)"

if [ -n "${INCREMENT_BIN:-}" ]; then
  bin=$INCREMENT_BIN
  [ -x "$bin" ] || die "INCREMENT_BIN=$bin is not an executable"
else
  step "cargo build --release --bin increment"
  run timeout "$BUILD_TIMEOUT" cargo build --release --bin increment
  bin=target/release/increment
fi
bin=$(realpath "$bin")
find_loadgen

# From here on the whole run is bounded.
run_started=$(date +%s)
start_watchdog e2e-scale "$E2E_TIME_LIMIT"

# ---------------------------------------------------------------------------
nginx_port=$(free_port)

start_instance() {  # start_instance I: instance I on its port (a free one the first time), log appended
  local i=$1
  mkdir -p "$tmp/i$i"
  (
    # Only the flags below: no INCREMENT_*/OTEL_*/DATABASE_URL from the
    # caller; relative paths land in the instance's own directory.
    for var in $(compgen -e | grep -E '^(INCREMENT_|OTEL_|DATABASE_URL$)' || true); do unset "$var"; done
    cd "$tmp/i$i"
    export RUST_LOG="${RUST_LOG:-info},api::startup=info"   # the "listening" line
    exec "$bin" \
      --listen "127.0.0.1:${inst_port[$i]:-0}" \
      --database-url "$db_url" \
      --flush-interval 200ms \
      --shutdown-timeout 20s \
      --spill-path "$tmp/i$i/spill.jsonl" \
      --instance-id "e2e-scale-$i"
  ) >>"$tmp/i$i/increment.log" 2>&1 &
  inst_pid[$i]=$!
}

step "three instances on free ports (started together: migrations under the advisory lock)"
for i in 1 2 3; do start_instance "$i"; done
for i in 1 2 3; do
  addr=$(listening_addr "$tmp/i$i/increment.log" "${inst_pid[$i]}" 60)
  inst_port[$i]=${addr##*:}
  wait_http "http://127.0.0.1:${inst_port[$i]}/readyz" 60 "${inst_pid[$i]}" "instance $i"
  echo "instance $i ready (pid ${inst_pid[$i]})"
done

# ---------------------------------------------------------------------------
step "nginx on 127.0.0.1:$nginx_port, config rendered from nginx/increment.conf.template"
template=nginx/increment.conf.template
placeholders='${INCREMENT_PROXY_LISTEN} ${INCREMENT_PROXY_RESOLVER} ${INCREMENT_UPSTREAM_SERVERS}'
# The template must use exactly these placeholders (compose sets the same).
found=$(grep -o '\${[A-Za-z_][A-Za-z0-9_]*}' "$template" | sort -u | tr '\n' ' ')
[ "$found" = "$(tr ' ' '\n' <<<"$placeholders" | sort -u | tr '\n' ' ')" ] \
  || die "$template has placeholders [$found], expected [$placeholders]"
mkdir -p "$tmp/nginx/conf.d" "$tmp/nginx/temp"
upstreams=""
for i in 1 2 3; do
  upstreams+="server 127.0.0.1:${inst_port[$i]} max_fails=1 fail_timeout=2s; "
done
INCREMENT_PROXY_LISTEN="127.0.0.1:$nginx_port" \
INCREMENT_PROXY_RESOLVER="" \
INCREMENT_UPSTREAM_SERVERS="$upstreams" \
  envsubst "$placeholders" <"$template" >"$tmp/nginx/conf.d/increment.conf"
if grep -q '\${INCREMENT_' "$tmp/nginx/conf.d/increment.conf"; then
  die "placeholders left in the rendered config"
fi
# The main file only places nginx in the temporary directory. What the proxy
# does is in the rendered template.
cat >"$tmp/nginx/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 2;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log notice;
events { worker_connections 4096; }
http {
    client_body_temp_path $tmp/nginx/temp/body;
    proxy_temp_path $tmp/nginx/temp/proxy;
    fastcgi_temp_path $tmp/nginx/temp/fastcgi;
    uwsgi_temp_path $tmp/nginx/temp/uwsgi;
    scgi_temp_path $tmp/nginx/temp/scgi;
    default_type application/octet-stream;
    include $tmp/nginx/conf.d/*.conf;
}
EOF
grep -nE '^\s*(listen|server 127)' "$tmp/nginx/conf.d/increment.conf" || true
nginx_args=(-p "$tmp/nginx/" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log")
timeout 30 "$NGINX" -t -q "${nginx_args[@]}" || die "nginx -t rejected the rendered config"
# access_log /dev/stdout: the access log is nginx's stdout, a file here.
"$NGINX" "${nginx_args[@]}" >"$tmp/nginx/access.log" 2>"$tmp/nginx/stderr.log" &
nginx_pid=$!
proxy="127.0.0.1:$nginx_port"
wait_http "http://$proxy/readyz" 30 "$nginx_pid" nginx
echo "nginx ready (pid $nginx_pid); /readyz answers through the proxy"

step "through the proxy: /docs, /openapi.json, /metrics refused, X-Request-Id, 413"
http_status() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@"; }
[ "$(http_status "http://$proxy/docs")" = 200 ] || fail "GET /docs through nginx is not 200"
[ "$(http_status "http://$proxy/openapi.json")" = 200 ] || fail "GET /openapi.json through nginx is not 200"
[ "$(http_status "http://$proxy/healthz")" = 200 ] || fail "GET /healthz through nginx is not 200"
[ "$(http_status "http://$proxy/metrics")" = 404 ] || fail "GET /metrics through nginx is not refused (404)"
[ "$(http_status "http://$proxy/counters/e2e-scale%2Fnever-written")" = 404 ] \
  || fail "GET /counters/{unknown key} through nginx is not 404"
rid=$(curl -s -D - -o /dev/null --max-time 5 -H 'X-Request-Id: e2e-scale-rid-1' "http://$proxy/healthz" \
  | tr -d '\r' | awk -F': ' 'tolower($1) == "x-request-id" { print $2 }')
[ "$rid" = e2e-scale-rid-1 ] || fail "X-Request-Id is not passed back (got '$rid')"
big=$(python3 -c 'print("{\"key\":\"big\",\"value\":1,\"pad\":\"" + "x" * 70000 + "\"}")')
[ "$(http_status -X POST -H 'content-type: application/json' --data-binary "$big" "http://$proxy/increment")" = 413 ] \
  || fail "a body over 64k is not refused with 413"
echo "proxy checks done"

# ---------------------------------------------------------------------------
key_prefix="e2e-scale-$$-$(date +%s)"
step "load: $REQUESTS increments through nginx on $CONCURRENCY connections (seed $SEED, keys $key_prefix:*)"
timeout 300 "$loadgen" \
  --url "http://$proxy" \
  --requests "$REQUESTS" \
  --connections "$CONCURRENCY" \
  --keys zipf:10000:1.1 \
  --seed "$SEED" \
  --key-prefix "$key_prefix:" \
  --timeout 30s \
  --progress-file "$tmp/progress" \
  --gate-file "$tmp/restarted" --gate-at 0.75 --gate-timeout 60s \
  --expect-accepted --max-ambiguous "$CONCURRENCY" \
  --verify "$db_url" --verify-timeout 60s \
  --json >"$tmp/load.json" 2>"$tmp/load.log" &
load_pid=$!

progress() { cat "$tmp/progress" 2>/dev/null || echo 0; }
half=$(( REQUESTS / 2 ))
until [ "$(progress)" -ge "$half" ]; do
  kill -0 "$load_pid" 2>/dev/null || die "the load exited before half way"
  sleep 0.1
done

r=$RESTARTED
earlier=$(python3 scripts/scale_shares.py count202 --url "http://127.0.0.1:${inst_port[$r]}/metrics")
echo "e2e-scale: $(progress) requests done; SIGTERM to instance $r (pid ${inst_pid[$r]}, $earlier 202s so far)"
t0=$(date +%s.%N)
kill -TERM "${inst_pid[$r]}"
stop_rc=0
for _ in $(seq 1 300); do kill -0 "${inst_pid[$r]}" 2>/dev/null || break; sleep 0.1; done
if kill -0 "${inst_pid[$r]}" 2>/dev/null; then
  fail "instance $r did not exit within 30s of SIGTERM"
  kill -KILL "${inst_pid[$r]}" 2>/dev/null || true
fi
wait "${inst_pid[$r]}" || stop_rc=$?
inst_pid[$r]=""
stop_seconds=$(python3 -c "import time; print(f'{time.time() - $t0:.2f}')")
if [ "$stop_rc" -eq 0 ]; then
  echo "e2e-scale: instance $r exited 0 ${stop_seconds}s after SIGTERM: $(grep -o 'shutdown complete[^"]*' "$tmp/i$r/increment.log" | tail -n 1)"
else
  fail "instance $r exited $stop_rc after SIGTERM (expected 0: everything written)"
fi
[ ! -s "$tmp/i$r/spill.jsonl" ] || fail "instance $r left a spill file: its final flush did not reach the database"
sleep "$RESTART_PAUSE"
echo "e2e-scale: $(progress) requests done; starting instance $r again on port ${inst_port[$r]}"
start_instance "$r"
wait_http "http://127.0.0.1:${inst_port[$r]}/readyz" 60 "${inst_pid[$r]}" "instance $r (restarted)"
touch "$tmp/restarted"
echo "e2e-scale: instance $r is back (pid ${inst_pid[$r]}); $(progress) requests done"

load_rc=0
wait "$load_pid" || load_rc=$?
load_pid=""
cat "$tmp/load.log"
[ "$load_rc" -eq 0 ] || fail "loadgen exited $load_rc (refused or too many ambiguous requests, or totals that do not match)"

# ---------------------------------------------------------------------------
step "shares: each instance's 202s for POST /increment (its /metrics) and nginx's access log"
client_202=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["statuses"].get("202", 0))' "$tmp/load.json")
shares_args=()
for i in 1 2 3; do
  spec="i$i=127.0.0.1:${inst_port[$i]}"
  [ "$i" != "$r" ] || spec+="+$earlier"
  shares_args+=(--instance "$spec")
done
shares_out=$(python3 scripts/scale_shares.py shares "${shares_args[@]}" \
  --access-log "$tmp/nginx/access.log" --client-202 "$client_202") || fail "an instance served no requests"
echo "$shares_out"

step "stop: nginx (SIGQUIT), then SIGTERM to every instance; each must exit 0"
stop "$nginx_pid" nginx QUIT
nginx_pid=""
for i in 1 2 3; do kill -TERM "${inst_pid[$i]}" 2>/dev/null || true; done
for i in 1 2 3; do
  rc=0
  for _ in $(seq 1 300); do kill -0 "${inst_pid[$i]}" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "${inst_pid[$i]}" 2>/dev/null; then
    fail "instance $i did not exit within 30s of SIGTERM"
    kill -KILL "${inst_pid[$i]}" 2>/dev/null || true
  fi
  wait "${inst_pid[$i]}" || rc=$?
  inst_pid[$i]=""
  if [ "$rc" -eq 0 ]; then echo "instance $i exited 0"; else fail "instance $i exited $rc after SIGTERM"; fi
  [ ! -s "$tmp/i$i/spill.jsonl" ] || fail "instance $i left a spill file"
done

step "totals again, after every instance stopped: nothing more written, nothing rejected"
rejected=$(psql -d "$db" -v ON_ERROR_STOP=1 -qAtc "SELECT count(*) FROM rejected_increments")
[ "$rejected" = 0 ] || fail "$rejected rows in rejected_increments"
# The sum over the run's keys must not have moved since loadgen's check.
after=$(psql -d "$db" -v ON_ERROR_STOP=1 -qAtc \
  "SELECT coalesce(sum(value), 0) FROM counters WHERE key LIKE '$key_prefix:%'")
verified=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["verify"]["stored_total"])' "$tmp/load.json")
[ "$after" = "$verified" ] || fail "the stored total moved from $verified to $after after the instances stopped"
echo "stored total $after, unchanged; rejected rows: $rejected"

# ---------------------------------------------------------------------------
now=$(date +%s)
summary=$(python3 - "$tmp/load.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
v = r["verify"] or {}
print(f"requests:     {r['requests']} in {r['duration_s']:.1f}s = {r['rps']:,.0f} requests/s through nginx")
print(f"statuses:     {r['statuses']}")
print(f"ambiguous:    {r['ambiguous']} (502/504/broken connection: maybe applied, each at most once)")
print(f"keys written: {v.get('keys')}, totals {v.get('status')} (sum {v.get('stored_total')})")
EOF
)
printf '\n==== e2e-scale summary ====\n'
echo "$summary"
echo "restart:      instance $r SIGTERM at half way -> exit $stop_rc in ${stop_seconds}s; back after ${RESTART_PAUSE}s pause"
grep '^shares: ' <<<"$shares_out" | sed 's/^shares: /shares:  /' || true
grep '^verify' "$tmp/load.log" || true
echo "time:         $(( now - started ))s in all, $(( now - run_started ))s after the build"
if [ "${#failures[@]}" -gt 0 ]; then
  printf '\ne2e-scale: FAILED (%d):\n' "${#failures[@]}"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
printf '\ne2e-scale: PASSED\n'
