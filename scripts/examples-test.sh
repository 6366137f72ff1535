#!/usr/bin/env bash
# The client examples (examples/python, examples/javascript) against a live
# instance; every outcome is checked in PostgreSQL. Run by CI.
#
#   1. a fresh database (dropped at exit); instance A (flush every 200ms,
#      admin token, so a check can flush on demand) and instance B, which
#      holds one pending key at most and flushes every 2 s, so a second key
#      is refused with 503 + Retry-After until the next flush
#   2. two fault proxies in front of A (scripts/fault_proxy.py), which tell
#      requests apart by path and body, not by their Idempotency-Key: one
#      forwards each request's first attempt but hangs up before the answer,
#      one answers each request's first two attempts with 502 itself
#   3. for each example:
#      a. plain: 30 single increments over 3 keys and 250 in batches of 100,
#         flushed, exact totals; 6 singles with wait=true: every request
#         answered 200, exact totals without a flush
#      b. lost answers: singles (wait=true) and batches through the
#         hanging-up proxy: every request sent twice with one key, every
#         first attempt taken by A (202/200), each increment stored once
#         (a client retrying without its key, or with a new one, would have
#         doubled the totals), A counted the repeats
#      c. Retry-After: 3 keys to B; the client waits at least Retry-After
#         after a 503 pending-limit and each increment lands once
#      d. 502 without Retry-After: retried with backoff, stored once
#      e. a 4xx: one attempt, exit 1, the problem type and detail shown
#      f. nothing listening: gives up after --max-attempts, exit 1
#
# Increment i of a demo run goes to <prefix>:<i % keys> with value i + 1
# (examples/README.md); the expected totals are computed here from that.
#
# Run from anywhere: scripts/examples-test.sh
# Environment:
#   INCREMENT_BIN          the service binary (default /tmp/increment-head, else
#                          target/release/increment)
#   EXAMPLES_TIME_LIMIT    seconds for the whole run (default 300)
#   PGHOST PGPORT PGUSER   the PostgreSQL server (default 127.0.0.1 5432 postgres)
#   EXAMPLES_KEEP_TMP=1    keep the temporary directory (logs)
# Only loopback addresses are used. Every process started here is stopped on
# exit.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nexamples-test: FAILED: %s\n' "$*" >&2; exit 1; }
failures=()
fail() {  # a failed check: reported in the summary, the run goes on
  printf '  FAILED: %s\n' "$*" >&2
  failures+=("$*")
}
ok() { printf '  ok: %s\n' "$*"; }
started=$(date +%s)

EXAMPLES_TIME_LIMIT=${EXAMPLES_TIME_LIMIT:-300}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
export PGHOST PGPORT PGUSER PGCONNECT_TIMEOUT=5
[[ "$EXAMPLES_TIME_LIMIT" =~ ^[0-9]+$ ]] || die "EXAMPLES_TIME_LIMIT must be a whole number"
ADMIN_TOKEN="examples-test-admin-token-$$"
B_FLUSH_SECONDS=2       # instance B's flush interval: its Retry-After
CLIENT_TIMEOUT=120      # seconds any one client run may take

# `run` (long steps in the background, so signals are handled at once),
# `stop PID NAME`, `free_port`, `listening_addr LOG PID SECONDS`.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tmp=$(mktemp -d -t examples-test.XXXXXX)
declare -A pids=()    # name -> pid of a service instance or proxy
declare -A addrs=()   # name -> host:port it listens on
child_pid=""
watchdog_pid=""
db=""
db_created=0

psql_admin() { psql -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$watchdog_pid" ]; then
    kill -TERM "$watchdog_pid" 2>/dev/null
    wait "$watchdog_pid" 2>/dev/null
  fi
  stop "$child_pid" "current step"
  for name in "${!pids[@]}"; do stop "${pids[$name]}" "$name"; done
  if [ "$db_created" = 1 ]; then
    psql_admin "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
      && echo "dropped database $db" \
      || echo "examples-test: could not drop database $db" >&2
  fi
  if [ "$rc" -ne 0 ]; then
    for log in "$tmp"/*.log; do
      if [ -s "$log" ]; then
        printf '\n--- last lines of %s ---\n' "${log#"$tmp"/}" >&2
        tail -n 15 "$log" >&2
      fi
    done
  fi
  remove_tmp examples-test "${EXAMPLES_KEEP_TMP:-0}"
  exit "$rc"
}
on_exit_run_cleanup

# ---------------------------------------------------------------------------
step "tools: python3, node 20+, psql, curl"
for tool in python3 node psql pg_isready curl; do
  command -v "$tool" >/dev/null || die "$tool is required (not found on PATH)"
done
python3 --version
node_version=$(node --version)
[ "$(sed -E 's/^v([0-9]+).*/\1/' <<<"$node_version")" -ge 20 ] \
  || die "node 20 or later is required (global fetch), found $node_version"
echo "node $node_version"

if [ -n "${INCREMENT_BIN:-}" ]; then
  bin=$INCREMENT_BIN
elif [ -x /tmp/increment-head ]; then
  bin=/tmp/increment-head
else
  bin=target/release/increment
fi
[ -x "$bin" ] || die "no service binary at $bin (set INCREMENT_BIN)"
bin=$(realpath "$bin")
echo "service binary $bin"

step "PostgreSQL on $PGHOST:$PGPORT"
pg_isready -h "$PGHOST" -p "$PGPORT" || die "PostgreSQL does not answer on $PGHOST:$PGPORT"
db="examples_$$"
psql_admin "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
psql_admin "CREATE DATABASE \"$db\""
db_created=1
db_url="postgres://$PGUSER@$PGHOST:$PGPORT/$db"
echo "database $db (dropped at exit)"

# From here on the whole run is bounded.
start_watchdog examples-test "$EXAMPLES_TIME_LIMIT"

# ---------------------------------------------------------------------------
start_instance() {  # start_instance NAME FLAGS...: the service on a free loopback port
  local name=$1; shift
  mkdir -p "$tmp/$name"
  (
    # Only the flags below: nothing from the caller's INCREMENT_*/DATABASE_URL.
    for var in $(compgen -e | grep -E '^(INCREMENT_|OTEL_|DATABASE_URL)' || true); do unset "$var"; done
    cd "$tmp/$name"
    export RUST_LOG="info,api::startup=info"   # the "listening" line
    exec "$bin" --listen 127.0.0.1:0 --database-url "$db_url" \
      --admin-token "$ADMIN_TOKEN" --spill-path "$tmp/$name/spill.jsonl" \
      --instance-id "examples-$name" "$@"
  ) >"$tmp/$name.log" 2>&1 &
  pids[$name]=$!
  addrs[$name]=$(listening_addr "$tmp/$name.log" "${pids[$name]}" 60)
  wait_http "http://${addrs[$name]}/readyz" 60 "${pids[$name]}" "$name"
  echo "$name ready on ${addrs[$name]} (pid ${pids[$name]}): $*"
}

start_proxy() {  # start_proxy NAME UPSTREAM FLAGS...
  local name=$1 upstream=$2; shift 2
  python3 -u scripts/fault_proxy.py --upstream "$upstream" "$@" >"$tmp/$name.log" 2>&1 &
  pids[$name]=$!
  local deadline=$(( $(date +%s) + 15 ))
  until grep -q '^listening ' "$tmp/$name.log" 2>/dev/null; do
    kill -0 "${pids[$name]}" 2>/dev/null || die "$name exited before listening (see $tmp/$name.log)"
    [ "$(date +%s)" -lt "$deadline" ] || die "$name did not listen within 15s"
    sleep 0.1
  done
  addrs[$name]=$(sed -n 's/^listening //p' "$tmp/$name.log" | head -n 1)
  echo "$name on ${addrs[$name]} -> $upstream: $*"
}

flush() {  # flush INSTANCE: POST /admin/flush; everything taken before is committed after
  curl -fsS --max-time 30 -X POST -H "Authorization: Bearer $ADMIN_TOKEN" \
    -o /dev/null "http://${addrs[$1]}/admin/flush" || die "POST /admin/flush on $1 failed"
}

expected_totals() {  # expected_totals PREFIX KEYS COUNT: "key|total" lines, in key order
  python3 - "$@" <<'EOF'
import sys
prefix, keys, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
totals = {}
for i in range(count):
    key = f"{prefix}:{i % keys}"
    totals[key] = totals.get(key, 0) + i + 1
for key in sorted(totals):
    print(f"{key}|{totals[key]}")
EOF
}

stored_totals() {  # stored_totals PREFIX: "key|value" lines from counters
  # From stdin: psql substitutes :'prefix' (quoted safely) only there, not in -c.
  psql -d "$db" -v ON_ERROR_STOP=1 -qAt -v prefix="$1:" \
    <<<"select key, value from counters where starts_with(key, :'prefix') order by key collate \"C\""
}

check_totals() {  # check_totals LABEL PREFIX KEYS COUNT
  local label=$1 prefix=$2 keys=$3 count=$4 expected stored
  expected=$(expected_totals "$prefix" "$keys" "$count")
  stored=$(stored_totals "$prefix")
  if [ "$stored" = "$expected" ]; then
    ok "$label: database totals exact ($(tr '\n' ' ' <<<"$stored"| sed 's/ $//'))"
  else
    fail "$label: database totals differ; expected [$(tr '\n' ' ' <<<"$expected")] stored [$(tr '\n' ' ' <<<"$stored")]"
  fi
}

check_json() {  # check_json LABEL JSON PYTHON-EXPRESSION-OVER-d: asserts the expression
  local label=$1 json=$2 expression=$3
  if python3 -c 'import json, sys; d = json.loads(sys.argv[1]); sys.exit(0 if eval("(" + sys.argv[2] + ")") else 1)' \
      "$json" "$expression" 2>/dev/null; then
    ok "$label"
  else
    fail "$label [$expression] in $json"
  fi
}

metric() {  # metric INSTANCE SERIES: the value of one exact series in /metrics (0 if absent)
  curl -fsS --max-time 5 "http://${addrs[$1]}/metrics" \
    | awk -v series="$2" '$1 == series { value = $2 } END { print value + 0 }'
}

proxy_stats() { curl -fsS --max-time 5 "http://${addrs[$1]}/__proxy/stats"; }

# run_client LANG LABEL ARGS...: the demo of LANG; sets client_rc, client_out
# (its JSON summary), client_err (its stderr, printed indented) and
# client_wall (seconds, measured here).
run_client() {
  local lang=$1 label=$2; shift 2
  local -a command
  case $lang in
    python) command=(python3 examples/python/increment_client.py) ;;
    javascript) command=(node examples/javascript/increment-client.mjs) ;;
    *) die "unknown example $lang" ;;
  esac
  local out="$tmp/client.out" err="$tmp/client.err" t0 t1
  echo "  $lang $label: ${command[*]##*/} $*"
  t0=$(date +%s%N)
  client_rc=0
  run timeout "$CLIENT_TIMEOUT" "${command[@]}" "$@" >"$out" 2>"$err" || client_rc=$?
  t1=$(date +%s%N)
  client_wall=$(python3 -c "print(round(($t1 - $t0) / 1e9, 3))")
  client_out=$(tail -n 1 "$out")
  [ -n "$client_out" ] || client_out='{}'
  client_err=$(cat "$err")
  sed 's/^/    | /' "$err" | head -n 20
  echo "    summary: $client_out (wall ${client_wall}s, exit $client_rc)"
  [ "$client_rc" != 124 ] || fail "$lang $label: did not finish within ${CLIENT_TIMEOUT}s"
}

expect_success() {  # expect_success LANG LABEL: exit 0 and a summary
  if [ "$client_rc" = 0 ] && [ -n "$client_out" ]; then
    ok "$1 $2: exit 0"
    return 0
  fi
  fail "$1 $2: exit $client_rc"
  client_out='{}'
  return 1
}

# ---------------------------------------------------------------------------
step "instances A (flush every 200ms) and B (--max-pending-keys 1, flush every ${B_FLUSH_SECONDS}s)"
start_instance A --flush-interval 200ms
start_instance B --flush-interval "${B_FLUSH_SECONDS}s" --max-pending-keys 1

step "fault proxies in front of A (scripts/fault_proxy.py)"
start_proxy hangup "${addrs[A]}" --drop-answers 1
start_proxy bad-gateway "${addrs[A]}" --answer-status 502 --answer-times 2

step "B refuses a second pending key with 503 + Retry-After (probe with curl)"
probe() {  # probe KEY: "status retry-after type" of one POST /increment to B
  curl -sS --max-time 10 -D "$tmp/probe.headers" -o "$tmp/probe.body" -w '%{http_code}' \
    -H 'Content-Type: application/json' -d "{\"key\":\"$1\",\"value\":1}" "http://${addrs[B]}/increment"
  printf ' %s ' "$(tr -d '\r' <"$tmp/probe.headers" | awk -F': ' 'tolower($1) == "retry-after" { print $2 }')"
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("type", ""))' "$tmp/probe.body" 2>/dev/null || echo
}
# B's own flush (every 2 s) may free the slot between the two requests; then
# the second key is taken, and the probe is tried again with other keys.
refused_key=""
for round in 1 2 3 4 5; do
  flush B
  read -r status _ _ <<<"$(probe "probe-$round:a")"
  [ "$status" = 202 ] || die "B: the first key was answered $status, not 202"
  read -r status retry_after problem_type <<<"$(probe "probe-$round:b")"
  if [ "$status" = 503 ]; then refused_key="probe-$round:b"; break; fi
  echo "  round $round: B flushed in between (second key answered $status); again"
done
[ -n "$refused_key" ] || die "B never refused a second pending key in 5 rounds"
if [ "$problem_type" = /problems/pending-limit ] && [[ "$retry_after" =~ ^[0-9]+$ ]] && [ "$retry_after" -ge 1 ]; then
  ok "B: a second key is refused: 503 $problem_type, Retry-After: $retry_after"
else
  die "B: the refusal has Retry-After '$retry_after', type '$problem_type' (expected a number >= 1, /problems/pending-limit)"
fi
flush B
stored=$(psql -d "$db" -v ON_ERROR_STOP=1 -qAt -v key="$refused_key" <<<"select count(*) from counters where key = :'key'")
[ "$stored" = 0 ] && ok "B: the refused key $refused_key was not applied" \
  || fail "B: the refused key $refused_key is stored although it was answered 503"

# ---------------------------------------------------------------------------
for lang in python javascript; do
  step "$lang: plain run against A"
  prefix="$lang-plain"
  run_client "$lang" singles --url "http://${addrs[A]}" --prefix "$prefix" --keys 3 --count 30
  if expect_success "$lang" singles; then
    check_json "$lang singles: 30 requests, 30 attempts, no retry" "$client_out" \
      "d['requests'] == 30 and d['attempts'] == 30 and d['waits'] == []"
    flush A
    check_totals "$lang singles" "$prefix" 3 30
  fi

  prefix="$lang-batch"
  run_client "$lang" batches --url "http://${addrs[A]}" --prefix "$prefix" --keys 3 --count 250 --batch-size 100
  if expect_success "$lang" batches; then
    check_json "$lang batches: 3 requests carrying 250 increments, no retry" "$client_out" \
      "d['requests'] == 3 and d['increments'] == 250 and d['attempts'] == 3 and d['waits'] == []"
    flush A
    check_totals "$lang batches" "$prefix" 3 250
  fi

  prefix="$lang-wait"
  run_client "$lang" "singles, wait=true" --url "http://${addrs[A]}" --prefix "$prefix" --keys 2 --count 6 --wait
  if expect_success "$lang" "singles, wait=true"; then
    check_json "$lang wait=true: 6 requests, each answered 200 (committed)" "$client_out" \
      "d['requests'] == 6 and d['committed'] == 6 and d['attempts'] == 6"
    # No flush: 200 to wait=true means committed already.
    check_totals "$lang wait=true (no flush needed)" "$prefix" 2 6
  fi

  # -------------------------------------------------------------------------
  step "$lang: lost answers (the proxy hangs up after A took each first attempt)"
  prefix="$lang-lost"
  before_stats=$(proxy_stats hangup)
  before_repeats=$(metric A 'increment_idempotency_repeats_total{stage="memory"}')
  run_client "$lang" "singles, wait=true" --url "http://${addrs[hangup]}" --prefix "$prefix" --keys 3 --count 12 --wait
  if expect_success "$lang" "lost singles"; then
    check_json "$lang lost singles: 12 requests, each sent twice (backoff, no Retry-After), answered 200 on the retry" \
      "$client_out" \
      "d['requests'] == 12 and d['attempts'] == 24 and d['committed'] == 12
       and len(d['waits']) == 12 and not any(w['retry_after'] for w in d['waits'])"
    # No flush: the retries were answered 200, committed.
    check_totals "$lang lost singles (wait=true; each applied once, not twice)" "$prefix" 3 12
  fi
  prefix="$lang-lostbatch"
  run_client "$lang" batches --url "http://${addrs[hangup]}" --prefix "$prefix" --keys 4 --count 40 --batch-size 10
  if expect_success "$lang" "lost batches"; then
    check_json "$lang lost batches: 4 requests, each sent twice" "$client_out" \
      "d['requests'] == 4 and d['increments'] == 40 and d['attempts'] == 8 and len(d['waits']) == 4"
    flush A
    check_totals "$lang lost batches (each applied once)" "$prefix" 4 40
  fi
  after_stats=$(proxy_stats hangup)
  after_repeats=$(metric A 'increment_idempotency_repeats_total{stage="memory"}')
  check_json "$lang: the proxy hung up on 16 first attempts after A answered each (12 x 200, 4 x 202); every retry carried its request's one key" \
    "{\"before\": $before_stats, \"after\": $after_stats}" \
    "d['after']['dropped'] - d['before']['dropped'] == 16
     and d['after']['dropped_upstream_statuses'].get('200', 0) - d['before']['dropped_upstream_statuses'].get('200', 0) == 12
     and d['after']['dropped_upstream_statuses'].get('202', 0) - d['before']['dropped_upstream_statuses'].get('202', 0) == 4
     and d['after']['keyless_posts'] == d['before']['keyless_posts']
     and d['after']['requests_with_several_keys'] == d['before']['requests_with_several_keys']"
  repeats=$(( after_repeats - before_repeats ))
  if [ "$repeats" -eq 16 ]; then
    ok "$lang: A answered 16 retries as repeats of their key (increment_idempotency_repeats_total{stage=\"memory\"} +$repeats)"
  else
    fail "$lang: A counted $repeats repeats, expected 16"
  fi

  # -------------------------------------------------------------------------
  step "$lang: Retry-After (B refuses a second pending key with 503 until its flush)"
  prefix="$lang-retry-after"
  before_refused=$(metric B 'increment_increments_rejected_total{reason="unavailable"}')
  run_client "$lang" singles --url "http://${addrs[B]}" --prefix "$prefix" --keys 3 --count 3
  if expect_success "$lang" "Retry-After"; then
    check_json "$lang Retry-After: at least one wait of Retry-After ($retry_after s) or more, after a 503" "$client_out" \
      "d['requests'] == 3 and any(w['retry_after'] and w['seconds'] >= $retry_after and w['reason'] == 'HTTP 503' for w in d['waits'])
       and all(w['retry_after'] for w in d['waits']) and d['attempts'] == 3 + len(d['waits'])"
    waits=$(python3 -c 'import json, sys; print(len(json.loads(sys.argv[1])["waits"]))' "$client_out")
    if python3 -c "import sys; sys.exit(0 if $client_wall >= $waits * $retry_after else 1)"; then
      ok "$lang Retry-After: the run took ${client_wall}s, at least $waits x ${retry_after}s"
    else
      fail "$lang Retry-After: the run took ${client_wall}s, less than $waits x ${retry_after}s"
    fi
    refused=$(( $(metric B 'increment_increments_rejected_total{reason="unavailable"}') - before_refused ))
    if [ "$refused" -eq "$waits" ]; then
      ok "$lang Retry-After: B refused $refused increment(s) with pending_limit, one per wait"
    else
      fail "$lang Retry-After: B refused $refused increments with pending_limit, the client waited $waits times"
    fi
    flush B
    check_totals "$lang Retry-After (each applied once)" "$prefix" 3 3
  fi

  # -------------------------------------------------------------------------
  step "$lang: 502 without Retry-After (the proxy answers each request's first two attempts)"
  prefix="$lang-bad-gateway"
  run_client "$lang" batches --url "http://${addrs[bad-gateway]}" --prefix "$prefix" --keys 2 --count 20 --batch-size 10
  if expect_success "$lang" "502"; then
    check_json "$lang 502: 2 requests, 3 attempts each, 4 backoff waits (no Retry-After)" "$client_out" \
      "d['requests'] == 2 and d['attempts'] == 6 and len(d['waits']) == 4
       and all(not w['retry_after'] and w['reason'] == 'HTTP 502' and w['seconds'] > 0 for w in d['waits'])"
    flush A
    check_totals "$lang 502 (applied once)" "$prefix" 2 20
  fi

  # -------------------------------------------------------------------------
  step "$lang: a 4xx is final (a 300-character key: 422, one attempt)"
  long_prefix=$(python3 -c "import sys; print((sys.argv[1] + '-') * 60)" "$lang" | cut -c 1-300)
  before_422=$(metric A 'increment_increments_rejected_total{reason="invalid"}')
  run_client "$lang" "invalid key" --url "http://${addrs[A]}" --prefix "$long_prefix" --keys 1 --count 1
  if [ "$client_rc" = 1 ]; then ok "$lang 4xx: exit 1"; else fail "$lang 4xx: exit $client_rc, expected 1"; fi
  check_json "$lang 4xx: one attempt, status 422, type /problems/invalid-request, a detail, certainly not applied" \
    "$client_out" \
    "d['error']['status'] == 422 and d['error']['type'] == '/problems/invalid-request' and d['error']['detail']
     and d['error']['attempts'] == 1 and d['error']['maybe_applied'] is False and d['waits'] == []"
  if grep -q '^problem type: /problems/invalid-request$' <<<"$client_err" && grep -q '^problem detail: .' <<<"$client_err"; then
    ok "$lang 4xx: the problem type and detail are shown on stderr"
  else
    fail "$lang 4xx: stderr does not show the problem type and detail"
  fi
  after_422=$(metric A 'increment_increments_rejected_total{reason="invalid"}')
  [ $(( after_422 - before_422 )) -eq 1 ] && ok "$lang 4xx: A saw exactly one invalid request" \
    || fail "$lang 4xx: A counted $(( after_422 - before_422 )) invalid requests, expected 1"

  # -------------------------------------------------------------------------
  step "$lang: nothing listening: bounded retries, then exit 1"
  closed_port=$(free_port)
  run_client "$lang" "connection refused" --url "http://127.0.0.1:$closed_port" --prefix "$lang-refused" \
    --keys 1 --count 1 --max-attempts 3 --deadline 10
  if [ "$client_rc" = 1 ]; then ok "$lang refused: exit 1"; else fail "$lang refused: exit $client_rc, expected 1"; fi
  check_json "$lang refused: gave up after exactly 3 attempts, 2 backoff waits, reported as not applied (refused at connect)" \
    "$client_out" \
    "d['error']['attempts'] == 3 and d['error']['status'] is None and d['error']['maybe_applied'] is False
     and len(d['waits']) == 2"
  if python3 -c "import sys; sys.exit(0 if $client_wall < 10 else 1)"; then
    ok "$lang refused: gave up in ${client_wall}s (deadline 10s)"
  else
    fail "$lang refused: took ${client_wall}s, past its 10s deadline"
  fi
done

# ---------------------------------------------------------------------------
step "the whole database: exactly the counters of the runs above"
flush A
flush B
# Per example: 3 plain + 3 batch + 2 wait + 3 lost + 4 lost-batch +
# 3 Retry-After + 2 bad-gateway keys; the invalid and refused runs store
# nothing.
rows=$(psql -d "$db" -qAt -c "select count(*) from counters where key like 'python-%' or key like 'javascript-%'")
[ "$rows" = 40 ] && ok "40 counters from the examples, none from the refused or invalid runs" \
  || fail "$rows counters from the examples, expected 40"

step "summary ($(( $(date +%s) - started ))s)"
if [ "${#failures[@]}" -gt 0 ]; then
  printf 'examples-test: %d check(s) FAILED:\n' "${#failures[@]}" >&2
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "examples-test: all checks passed (python and javascript examples)"
