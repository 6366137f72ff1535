#!/usr/bin/env bash
# Measures increment against its ceilings in one run, side by side, and writes
# BENCHMARKS.md (machine, versions, exact commands, one table, ratios vs
# targets with PASS/FAIL).
#
#   scripts/bench.sh              full run (~12-15 min on 2 cores)
#   scripts/bench.sh --quick      smoke run (~2 min: 1 round, 3 s loads, 100k-key flush)
#
# Options: --rounds N, --duration SECS (per measurement), --out FILE,
#          --skip-build (use target/release as it is), --scenarios LIST
#          (comma list of direct,nginx,naive,flush,journal,keyed,keys; default all).
# Env: INCREMENT_BIN (a prebuilt service binary), PG (base URL, default
#      postgres://postgres@127.0.0.1:5432), KEEP_SCRATCH=1.
#
# Everything is on loopback. Servers, nginx and redis are started here, on
# free ports, and stopped by PID on exit; the databases created here
# (incbench_*) are dropped on exit. Every command is bounded by `timeout`.
#
# Scenarios (each with its comparators in the same rounds, interleaved):
#   direct  service (hot, zipf) vs bare hyper vs poem floor vs redis INCR -P1;
#           PostgreSQL commits/s during the service runs; then open-loop p99
#           at half the measured maximum; then batched ingestion (100 items)
#           vs redis INCR -P16
#   nginx   nginx (nginx/increment.conf.template) in front of 2 services vs
#           the same nginx config in front of 2 floors
#   naive   pgbench, one upsert per increment (hot key, 100k uniform keys) vs
#           the service with exact-total verification
#   flush   one flush of 1M pending keys (POST /admin/flush) vs one raw unnest
#           upsert of the same keys with psql; resident memory with 1M pending keys
#   journal the same binary with --journal-url (own nats-server with JetStream)
#           vs without it (write-behind), hot and 100k uniform keys, vs Redis
#           INCR with appendonly yes + appendfsync everysec; open-loop p99 at
#           half the journal maximum; journal messages/s, requests per message,
#           stream bytes per increment and database commits/s during each run
#   keyed   requests with a unique Idempotency-Key each vs plain ones, same
#           service (and one with --idempotency-lookup false), hot and 100k
#           uniform keys, exact totals checked (--verify)
#   keys    many distinct keys (issue 16): hot, zipf and 100k uniform keys vs
#           the poem floor on the same keys, uniform also with the flush
#           deferred (the intake alone); open-loop p99 at half each maximum vs
#           the floor at the same rate; 1M uniform keys: rate and RSS per
#           pending key
#
# Noise: before each measurement the script waits (at most 15 s) for the
# machine to be idle; during it, it records the CPU used by processes that are
# not part of the benchmark ("others", % of one core); a measurement with
# others > 25% is repeated once and the cleaner attempt is kept.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=0
ROUNDS=3
DUR=8
WARM=2
OUT="$ROOT/BENCHMARKS.md"
BUILD=1
SCENARIOS="direct,nginx,naive,flush,journal,keyed,keys"
ROUNDS_SET=0
DUR_SET=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --rounds) ROUNDS=$2; ROUNDS_SET=1; shift ;;
    --duration) DUR=$2; DUR_SET=1; shift ;;
    --out) OUT=$2; shift ;;
    --skip-build) BUILD=0 ;;
    --scenarios) SCENARIOS=$2; shift ;;
    -h|--help) sed -n '2,48p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
FLUSH_KEYS=1000000
FLUSH_ROUNDS=2
HALF_ROUNDS=2
if [ "$QUICK" = 1 ]; then
  [ "$ROUNDS_SET" = 1 ] || ROUNDS=1
  [ "$DUR_SET" = 1 ] || DUR=3
  WARM=1
  FLUSH_KEYS=100000
  FLUSH_ROUNDS=1
  HALF_ROUNDS=1
  RETRIES_LEFT=3
  IDLE_WAIT=5
fi
RETRIES_LEFT=${RETRIES_LEFT:-24}   # repeats of noisy measurements over the whole run (bounds the run time)
IDLE_WAIT=${IDLE_WAIT:-15}         # seconds to wait at most for an idle machine before each measurement
NAIVE_ROUNDS=$(( ROUNDS < 2 ? ROUNDS : 2 ))
NGINX_ROUNDS=$ROUNDS
BATCH_ROUNDS=$(( ROUNDS < 2 ? ROUNDS : 2 ))
CONNS=64
ZIPF="zipf:100000:1.1"
SVC_WORKERS=1        # TOKIO_WORKER_THREADS for the service, as the anchors' 1-worker servers
OTHERS_MAX=25        # % of one core used by unrelated processes before a retry
PG=${PG:-postgres://postgres@127.0.0.1:5432}
# PostgreSQL processes counted as part of the benchmark: backends of the
# incbench_* databases and the cluster's own background processes.
OURS_RE='postgres: [^:]*: (postgres incbench_|autovacuum worker incbench_|checkpointer|background writer|walwriter|autovacuum launcher|logical replication launcher)|/usr/lib/postgresql/[0-9]+/bin/postgres'
# Everything started here runs at nice -10, ahead of other users' compilers
# and tests on a shared machine (PostgreSQL itself keeps its priority).
NICE=${BENCH_NICE:--10}
renice -n "$NICE" -p $$ >/dev/null 2>&1 || NICE=0
TOKEN="bench-admin-token-$RANDOM$RANDOM"
has() { case ",$SCENARIOS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

SCRATCH=$(mktemp -d /tmp/incbench.XXXXXX)
RESULTS="$SCRATCH/results.jsonl"
META="$SCRATCH/meta.txt"
: >"$RESULTS"
: >"$META"
declare -a STARTED=()   # PIDs started here, stopped on exit
declare -a DBS=()       # databases created here, dropped on exit
declare -A PID=()
declare -A PORT=()
T_START=$(date +%s)

log() { printf '[%4ds] %s\n' "$(( $(date +%s) - T_START ))" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now() { date +%s.%N; }
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"   # free_port, listening_addr (its wait_http is replaced below)

stop_pid() { # pid [signal]
  local pid=$1 sig=${2:-TERM} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid db
  trap - EXIT INT TERM
  for pid in "${STARTED[@]}"; do stop_pid "$pid" TERM; done
  for db in "${DBS[@]}"; do
    timeout 30 psql "$PG/postgres" -XAtqc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  if [ "${KEEP_SCRATCH:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "bench.sh: scratch files kept in $SCRATCH" >&2
  else
    rm -rf "$SCRATCH"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# Python helper: CPU snapshots, idle wait, output parsing, the report.
py() { python3 "$ROOT/scripts/bench_helpers.py" "$@"; }

# ---------------------------------------------------------------------------
# Tools and builds.
tools=(python3 psql curl bc)
has direct && tools+=(redis-server redis-benchmark wrk)
has nginx && tools+=(nginx envsubst)
has naive && tools+=(pgbench)
has journal && tools+=(redis-server redis-benchmark nats-server)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] \
    || die "$tool is missing (apt-get install -y postgresql-client postgresql-contrib redis-server nginx-light wrk gettext-base curl python3 bc nats-server)"
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if ! timeout 5 psql "$PG/postgres" -XAtqc 'select 1' >/dev/null 2>&1; then
  log "PostgreSQL is not answering; starting the cluster"
  cluster_version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$cluster_version" ] || die "no PostgreSQL cluster in /etc/postgresql"
  pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start || true
  for _ in $(seq 1 30); do timeout 5 psql "$PG/postgres" -XAtqc 'select 1' >/dev/null 2>&1 && break; sleep 1; done
  timeout 5 psql "$PG/postgres" -XAtqc 'select 1' >/dev/null || die "PostgreSQL at $PG is not reachable"
fi

if [ "$BUILD" = 1 ]; then
  log "building: cargo build --release -p bench --bins; cargo build --release --bin increment"
  timeout 1800 cargo build --release -p bench --bins >&2
  [ -n "${INCREMENT_BIN:-}" ] || timeout 1800 cargo build --release --bin increment >&2
fi
INCREMENT=${INCREMENT_BIN:-$ROOT/target/release/increment}
LOADGEN=$ROOT/target/release/loadgen
CEILING=$ROOT/target/release/ceiling
for b in "$INCREMENT" "$LOADGEN" "$CEILING"; do [ -x "$b" ] || die "$b is missing (run without --skip-build)"; done

# ---------------------------------------------------------------------------
# Machine facts for the report.
crate_version() { awk -v n="$1" '$0=="name = \""n"\""{getline; gsub(/version = |"/,""); print; exit}' "$ROOT/Cargo.lock"; }
{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  if [ -n "${INCREMENT_BIN:-}" ]; then
    echo "git=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (bench tools); service: see below"
    echo "service=${INCREMENT_BIN_NOTE:-$INCREMENT_BIN (INCREMENT_BIN)}"
  else
    echo "git=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$( [ -n "$(git -C "$ROOT" status --porcelain -- api src migration entity 2>/dev/null)" ] && echo ' + uncommitted changes in api/ src/ (built as found in the work tree)')"
    echo "service=target/release/increment, built from the work tree"
  fi
  echo "nproc=$(nproc)"
  echo "cpu=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
  echo "mem=$(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel=$(uname -r)"
  echo "debian=$(cat /etc/debian_version 2>/dev/null || echo '?')"
  echo "rustc=$(rustc -V 2>/dev/null || echo '?')"
  echo "crates=hyper $(crate_version hyper), poem $(crate_version poem), poem-openapi $(crate_version poem-openapi), tokio $(crate_version tokio), moka $(crate_version moka), sea-orm $(crate_version sea-orm), sqlx $(crate_version sqlx), serde_json $(crate_version serde_json)"
  echo "postgres=PostgreSQL $(psql "$PG/postgres" -XAtqc 'show server_version')"
  echo "pgconf=shared_buffers $(psql "$PG/postgres" -XAtqc 'show shared_buffers'), synchronous_commit $(psql "$PG/postgres" -XAtqc 'show synchronous_commit'), fsync $(psql "$PG/postgres" -XAtqc 'show fsync')"
  echo "nginx=$("$NGINX" -v 2>&1 | sed 's/nginx version: //' || echo '-')"
  echo "redis=Redis $(redis-server --version 2>/dev/null | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
  echo "pgbench=$(pgbench --version 2>/dev/null | awk '{print $3}')"
  echo "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "conns=$CONNS"
  echo "warm=$WARM"
  echo "dur=$DUR"
  echo "svc_workers=$SVC_WORKERS"
  echo "others_max=$OTHERS_MAX"
  echo "nice=$NICE"
} >>"$META"

# ---------------------------------------------------------------------------
# Helpers: databases, servers (ports: scripts/lib.sh).

create_db() {
  local db=$1
  timeout 60 psql "$PG/postgres" -XAtqc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
  timeout 60 psql "$PG/postgres" -XAtqc "CREATE DATABASE $db" >/dev/null
  case " ${DBS[*]} " in *" $db "*) ;; *) DBS+=("$db") ;; esac
}

wait_http() { # url pid what [any: any HTTP answer will do]
  local url=$1 pid=$2 what=$3 any=${4:-} i code
  for i in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || die "$what exited during start (see $SCRATCH/$what.log)"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
    case "$code" in 2*) return 0 ;; 000) ;; *) [ -n "$any" ] && return 0 ;; esac
    sleep 0.1
  done
  die "$what did not answer $url within 30 s"
}

note_server() { echo "server=$*" | sed "s#$SCRATCH#\$SCRATCH#g; s#$ROOT/##g" >>"$META"; }

start_service() { # name db workers(empty: default) [flags...]
  local name=$1 db=$2 workers=$3; shift 3
  local port addr envs=(RUST_LOG=warn,api::startup=info)
  [ -n "$workers" ] && envs+=("TOKIO_WORKER_THREADS=$workers")
  local cmd=(env "${envs[@]}" "$INCREMENT" --listen 127.0.0.1:0 --database-url "$PG/$db"
    --spill-path "$SCRATCH/$name.spill.jsonl" --admin-token "$TOKEN" "$@")
  "${cmd[@]}" >"$SCRATCH/$name.log" 2>&1 &
  PID[$name]=$!
  STARTED+=("${PID[$name]}")
  addr=$(listening_addr "$SCRATCH/$name.log" "${PID[$name]}" 30)
  port=${addr##*:}
  PORT[$name]=$port
  note_server "${cmd[*]/$TOKEN/\$TOKEN}   # $name"
  wait_http "http://127.0.0.1:$port/readyz" "${PID[$name]}" "$name"
  log "$name: increment on :$port (pid ${PID[$name]}, db $db${workers:+, TOKIO_WORKER_THREADS=$workers})"
}

start_ceiling() { # name bare|floor
  local name=$1 kind=$2 port
  port=$(free_port)
  WORKERS=1 "$CEILING" "$kind" "$port" >"$SCRATCH/$name.log" 2>&1 &
  PID[$name]=$!
  PORT[$name]=$port
  STARTED+=("${PID[$name]}")
  note_server "WORKERS=1 target/release/ceiling $kind $port   # $name"
  wait_http "http://127.0.0.1:$port/" "${PID[$name]}" "$name" any
  log "$name: ceiling $kind on :$port (pid ${PID[$name]})"
}

stop_server() { # name
  local name=$1
  [ -n "${PID[$name]:-}" ] || return 0
  stop_pid "${PID[$name]}" TERM
  unset "PID[$name]"
}

REDIS_PORT=""
start_redis() { # [aof]: appendonly yes + appendfsync everysec (Redis's crash-safe setting)
  REDIS_PORT=$(free_port)
  local dir="$SCRATCH/redis$REDIS_PORT" persist=(--appendonly no)
  [ "${1:-}" = aof ] && persist=(--appendonly yes --appendfsync everysec)
  mkdir -p "$dir"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" "${persist[@]}" \
    --dir "$dir" --logfile "$dir/redis.log" >/dev/null 2>&1 &
  PID[redis]=$!
  STARTED+=("${PID[redis]}")
  note_server "redis-server --port $REDIS_PORT --bind 127.0.0.1 --save \"\" ${persist[*]}   # own instance, not the shared :6379"
  local i
  for i in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || die "redis did not start"
  log "redis on :$REDIS_PORT (pid ${PID[redis]})"
}

xact() { timeout 10 psql "$PG/postgres" -XAtqc "select xact_commit from pg_stat_database where datname = '$1'"; }
# autovacuum and autoanalyze runs on the database's tables (their transactions
# count in xact_commit too); this query is itself one commit in that database.
autovac() { timeout 10 psql "$PG/$1" -XAtqc "select coalesce(sum(autovacuum_count + autoanalyze_count), 0) from pg_stat_all_tables"; }
metric() { # port name: value of an unlabelled metric
  curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1==n{print $2; exit}'
}
rss_mb() { awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$1/status"; }

# with_commits DB PORT -- cmd...: runs cmd (stdout passes through) and writes
# the database's commits and the service's flushes over the run to $EXTRA.
with_commits() {
  local db=$1 port=$2; shift 3
  local c0 f0 t0 t1 c1 f1 a0 a1 rc=0
  a0=$(autovac "$db")
  sleep 0.5   # that query's own commit reaches the statistics before c0
  c0=$(xact "$db"); f0=$(metric "$port" increment_flush_keys_count); t0=$(now)
  "$@" || rc=$?
  t1=$(now)
  sleep 2.5
  c1=$(xact "$db"); f1=$(metric "$port" increment_flush_keys_count)
  a1=$(autovac "$db")
  printf '{"commits": %d, "flushes": %d, "autovac": %d, "load_s": %.3f}\n' "$(( c1 - c0 ))" \
    "$(( ${f1%.*} - ${f0%.*} ))" "$(( a1 - a0 ))" "$(echo "$t1 - $t0" | bc -l)" >"$EXTRA"
  return "$rc"
}

# measure SCENARIO CONFIG ROUND KIND [field=value...] -- command...
# Waits for an idle machine, runs the command bounded, records one JSON line
# (parsed output + CPU of other processes + fields) in $RESULTS.
EXTRA="$SCRATCH/extra.json"
measure() {
  local scen=$1 cfg=$2 round=$3 kind=$4; shift 4
  local fields=()
  while [ "$1" != "--" ]; do fields+=("$1"); shift; done
  shift
  local attempt rc out cpu best="" best_others=1000000 others cmdtxt
  cmdtxt=$(printf '%q ' "$@" | sed "s#$SCRATCH#\$SCRATCH#g; s#$ROOT/##g; s#$TOKEN#\$TOKEN#g; s#with_\(commits\|journal\|rss\) [^ ]* [^ ]* -- ##")
  for attempt in 1 2 3; do
    py idle 25 "$IDLE_WAIT" >/dev/null
    out="$SCRATCH/out.$scen.$cfg.$round.$attempt"
    rm -f "$EXTRA"
    py snap "$SCRATCH/snap.a"
    rc=0
    "$@" >"$out" 2>"$out.err" || rc=$?
    py snap "$SCRATCH/snap.b"
    cpu="$out.cpu"
    py diff "$SCRATCH/snap.a" "$SCRATCH/snap.b" "$$" "$OURS_RE" >"$cpu"
    if [ "$rc" != 0 ] && [ "$kind" != loadgen ]; then
      cat "$out.err" >&2
      die "$scen/$cfg round $round failed (exit $rc): $cmdtxt"
    fi
    if [ "$rc" != 0 ]; then
      log "WARNING: $scen/$cfg round $round: loadgen exit $rc (verification mismatch?)"
      tail -5 "$out.err" >&2
    fi
    local line
    line=$(py record "$kind" "$out" "$cpu" "$EXTRA" scenario="$scen" config="$cfg" round="$round" \
      attempt="$attempt" kind="$kind" exit="$rc" cmd="$cmdtxt" "${fields[@]}")
    others=$(python3 -c 'import json,sys; print(int(json.loads(sys.argv[1])["others_pct"]))' "$line")
    if [ "$others" -lt "$best_others" ]; then best=$line; best_others=$others; fi
    if [ "$others" -le "$OTHERS_MAX" ] || [ "$attempt" = 3 ] || [ "$RETRIES_LEFT" -le 0 ]; then break; fi
    RETRIES_LEFT=$(( RETRIES_LEFT - 1 ))
    log "  $scen/$cfg round $round: other processes used ${others}% of a core; repeating ($RETRIES_LEFT repeats left)"
  done
  echo "$best" >>"$RESULTS"
  py show "$best" >&2
}

lg() { timeout $(( WARM + DUR + 900 )) "$LOADGEN" --json -c "$CONNS" "$@"; }

# ---------------------------------------------------------------------------
# Scenario: direct (1, 5, 7, 8).
if has direct; then
  log "== direct: service vs bare hyper vs poem floor vs redis; commits/s; p99 at half rate; batched"
  create_db incbench_direct_hot
  create_db incbench_direct_zipf
  create_db incbench_direct_w2
  start_ceiling bare bare
  start_ceiling floor floor
  start_service svc_hot incbench_direct_hot "$SVC_WORKERS"
  start_service svc_zipf incbench_direct_zipf "$SVC_WORKERS"
  start_redis
  [ "$QUICK" = 1 ] || start_service svc_w2 incbench_direct_w2 ""
  cat >"$SCRATCH/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"key":"page:home","value":1}'
wrk.headers["Content-Type"] = "application/json"
EOF
  common=(--warmup "${WARM}s" -d "${DUR}s")
  for round in $(seq 1 "$ROUNDS"); do
    log "direct round $round/$ROUNDS"
    measure direct bare "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[bare]}" "${common[@]}" --keys hot
    measure direct floor "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[floor]}" "${common[@]}" --keys hot
    measure direct service_hot "$round" loadgen -- with_commits incbench_direct_hot "${PORT[svc_hot]}" -- \
      lg --url "http://127.0.0.1:${PORT[svc_hot]}" "${common[@]}" --keys hot
    measure direct service_zipf "$round" loadgen -- with_commits incbench_direct_zipf "${PORT[svc_zipf]}" -- \
      lg --url "http://127.0.0.1:${PORT[svc_zipf]}" "${common[@]}" --keys "$ZIPF"
    measure direct redis_incr_P1 "$round" redis -- timeout $(( DUR * 4 + 60 )) \
      redis-benchmark -p "$REDIS_PORT" -t incr -n $(( 55000 * DUR )) -c "$CONNS" -P 1 --csv
    if [ "$round" = 1 ] && [ "$QUICK" = 0 ]; then
      measure direct bare_wrk "$round" wrk -- timeout $(( WARM + DUR + 60 )) \
        wrk -t1 -c"$CONNS" -d"${DUR}s" --latency -s "$SCRATCH/post.lua" "http://127.0.0.1:${PORT[bare]}/increment"
      measure direct service_hot_w2 "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[svc_w2]}" "${common[@]}" --keys hot
    fi
  done
  [ "$QUICK" = 1 ] || stop_server svc_w2

  # 7 (and 5 at a lower rate): open loop at half the measured maximum.
  half_hot=$(py median "$RESULTS" direct service_hot rate | awk '{printf "%d", $1 / 2}')
  half_zipf=$(py median "$RESULTS" direct service_zipf rate | awk '{printf "%d", $1 / 2}')
  for round in $(seq 1 "$HALF_ROUNDS"); do
    log "direct: open loop at half the maximum ($half_hot / $half_zipf req/s), round $round/$HALF_ROUNDS"
    measure direct half_service_hot "$round" loadgen -- with_commits incbench_direct_hot "${PORT[svc_hot]}" -- \
      lg --url "http://127.0.0.1:${PORT[svc_hot]}" "${common[@]}" --keys hot --rate "$half_hot"
    measure direct half_service_zipf "$round" loadgen -- with_commits incbench_direct_zipf "${PORT[svc_zipf]}" -- \
      lg --url "http://127.0.0.1:${PORT[svc_zipf]}" "${common[@]}" --keys "$ZIPF" --rate "$half_zipf"
    measure direct half_floor "$round" loadgen -- \
      lg --url "http://127.0.0.1:${PORT[floor]}" "${common[@]}" --keys hot --rate "$half_hot"
  done

  # 8: batched ingestion vs pipelined redis.
  for round in $(seq 1 "$BATCH_ROUNDS"); do
    log "direct: batched ingestion (100 items/request) vs redis -P16, round $round/$BATCH_ROUNDS"
    measure direct batch100_service_hot "$round" loadgen unit='"incr/s"' -- \
      lg --url "http://127.0.0.1:${PORT[svc_hot]}" "${common[@]}" --batch 100 --keys hot
    measure direct redis_incr_P16 "$round" redis unit='"incr/s"' -- timeout $(( DUR * 4 + 60 )) \
      redis-benchmark -p "$REDIS_PORT" -t incr -n $(( 500000 * DUR )) -c "$CONNS" -P 16 --csv
    measure direct batch100_service_uniform "$round" loadgen unit='"incr/s"' -- \
      lg --url "http://127.0.0.1:${PORT[svc_zipf]}" "${common[@]}" --batch 100 --keys uniform:100000
    measure direct redis_incr_P16_r100k "$round" redis unit='"incr/s"' -- timeout $(( DUR * 4 + 60 )) \
      redis-benchmark -p "$REDIS_PORT" -t incr -n $(( 400000 * DUR )) -c "$CONNS" -P 16 -r 100000 --csv
    measure direct batch100_floor "$round" loadgen unit='"incr/s"' -- \
      lg --url "http://127.0.0.1:${PORT[floor]}" "${common[@]}" --batch 100 --keys uniform:100000
  done
  for s in bare floor svc_hot svc_zipf redis; do stop_server "$s"; done
fi

# ---------------------------------------------------------------------------
# Scenario: nginx (2).
start_nginx() { # name upstream-port... : renders nginx/increment.conf.template (or a fallback)
  local name=$1; shift
  local dir="$SCRATCH/$name" port upstreams="" p
  port=$(free_port)
  mkdir -p "$dir/conf.d" "$dir/temp"
  for p in "$@"; do upstreams+="server 127.0.0.1:$p; "; done
  if [ -f "$ROOT/nginx/increment.conf.template" ]; then
    INCREMENT_PROXY_LISTEN="127.0.0.1:$port" INCREMENT_PROXY_RESOLVER="" INCREMENT_UPSTREAM_SERVERS="$upstreams" \
      envsubst '${INCREMENT_PROXY_LISTEN} ${INCREMENT_PROXY_RESOLVER} ${INCREMENT_UPSTREAM_SERVERS}' \
      <"$ROOT/nginx/increment.conf.template" >"$dir/conf.d/increment.conf"
    NGINX_CONF_SOURCE="nginx/increment.conf.template (rendered with envsubst; its access_log goes to nginx's stdout, a file)"
  else
    cat >"$dir/conf.d/increment.conf" <<EOF
upstream increment { $upstreams keepalive 64; }
server {
    listen 127.0.0.1:$port;
    access_log off;
    location / { proxy_pass http://increment; proxy_http_version 1.1; proxy_set_header Connection ""; }
}
EOF
    NGINX_CONF_SOURCE="a minimal config written by bench.sh (upstream keepalive 64, access_log off)"
  fi
  cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    client_body_temp_path $dir/temp/body;
    proxy_temp_path $dir/temp/proxy;
    fastcgi_temp_path $dir/temp/fastcgi;
    uwsgi_temp_path $dir/temp/uwsgi;
    scgi_temp_path $dir/temp/scgi;
    default_type application/octet-stream;
    include $dir/conf.d/*.conf;
}
EOF
  timeout 30 "$NGINX" -t -q -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" || die "nginx -t rejected $dir/nginx.conf"
  "$NGINX" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/access.log" 2>"$dir/stderr.log" &
  PID[$name]=$!
  PORT[$name]=$port
  STARTED+=("${PID[$name]}")
  note_server "nginx -p \$SCRATCH/$name/ -c \$SCRATCH/$name/nginx.conf   # $name: worker_processes 2, upstream $upstreams"
  local i
  for i in $(seq 1 100); do curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$port/" && break; sleep 0.1; done
  log "$name: nginx on :$port -> $* (pid ${PID[$name]})"
}

if has nginx; then
  log "== nginx: 2 services vs 2 floors behind the same nginx config"
  create_db incbench_nginx
  start_service svc_a incbench_nginx "$SVC_WORKERS"
  start_service svc_b incbench_nginx "$SVC_WORKERS"
  start_ceiling floor_a floor
  start_ceiling floor_b floor
  start_nginx nginx_svc "${PORT[svc_a]}" "${PORT[svc_b]}"
  start_nginx nginx_floor "${PORT[floor_a]}" "${PORT[floor_b]}"
  echo "nginx_conf=$NGINX_CONF_SOURCE" >>"$META"
  for round in $(seq 1 "$NGINX_ROUNDS"); do
    log "nginx round $round/$NGINX_ROUNDS"
    measure nginx nginx_service "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[nginx_svc]}" --warmup "${WARM}s" -d "${DUR}s" --keys hot
    measure nginx nginx_floor "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[nginx_floor]}" --warmup "${WARM}s" -d "${DUR}s" --keys hot
  done
  for s in nginx_svc nginx_floor svc_a svc_b floor_a floor_b; do stop_server "$s"; done
fi

# ---------------------------------------------------------------------------
# Scenario: naive per-increment upserts with pgbench vs the service (3).
if has naive; then
  log "== naive: pgbench one upsert per increment vs the service with --verify"
  create_db incbench_naive
  create_db incbench_verify
  timeout 120 psql "$PG/incbench_naive" -Xq -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
CREATE TABLE counters (key varchar(255) PRIMARY KEY, value bigint NOT NULL,
                       created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
INSERT INTO counters SELECT 'k' || i, 0, now(), now() FROM generate_series(1, 100000) AS i;
INSERT INTO counters VALUES ('hot', 0, now(), now());
VACUUM ANALYZE counters;
CHECKPOINT;
SQL
  cat >"$SCRATCH/upsert_hot.sql" <<'SQL'
\set v random(-1000, 1000)
INSERT INTO counters (key, value, created_at, updated_at) VALUES ('hot', :v, now(), now()) ON CONFLICT (key) DO UPDATE SET value = counters.value + excluded.value, updated_at = excluded.updated_at;
SQL
  cat >"$SCRATCH/upsert_uniform.sql" <<'SQL'
\set k random(1, 100000)
\set v random(-1000, 1000)
INSERT INTO counters (key, value, created_at, updated_at) VALUES ('k' || :k, :v, now(), now()) ON CONFLICT (key) DO UPDATE SET value = counters.value + excluded.value, updated_at = excluded.updated_at;
SQL
  start_service svc_verify incbench_verify "$SVC_WORKERS"
  vurl="$PG/incbench_verify"
  for round in $(seq 1 "$NAIVE_ROUNDS"); do
    log "naive round $round/$NAIVE_ROUNDS"
    measure naive pgbench_hot "$round" pgbench unit='"upserts/s"' -- timeout $(( DUR + 60 )) \
      pgbench -n -M prepared -c 16 -j 2 -T "$DUR" -h 127.0.0.1 -U postgres -f "$SCRATCH/upsert_hot.sql" incbench_naive
    measure naive service_hot_verify "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[svc_verify]}" \
      --warmup "${WARM}s" -d "${DUR}s" --keys hot --verify "$vurl" --admin-token "$TOKEN"
    measure naive pgbench_uniform "$round" pgbench unit='"upserts/s"' -- timeout $(( DUR + 60 )) \
      pgbench -n -M prepared -c 16 -j 2 -T "$DUR" -h 127.0.0.1 -U postgres -f "$SCRATCH/upsert_uniform.sql" incbench_naive
    measure naive service_uniform_verify "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[svc_verify]}" \
      --warmup "${WARM}s" -d "${DUR}s" --keys uniform:100000 --verify "$vurl" --admin-token "$TOKEN"
  done
  stop_server svc_verify
fi

# ---------------------------------------------------------------------------
# Scenario: one flush of 1M pending keys vs a raw unnest upsert (4), RSS (6).
flush_run() { # name db round -> prints a JSON line
  local name=$1 db=$2 round=$3 port pid idle full after body t keys pending
  port=${PORT[$name]}
  pid=${PID[$name]}
  idle=$(rss_mb "$pid")
  timeout 600 "$LOADGEN" --url "http://127.0.0.1:$port" --batch 1000 --keys "seq:$FLUSH_KEYS" \
    --requests $(( FLUSH_KEYS / 1000 )) -c 4 --values 1 --key-prefix "f$round:" --json >"$SCRATCH/fill.$round.json" 2>"$SCRATCH/fill.$round.err"
  local accepted
  accepted=$(py get "$SCRATCH/fill.$round.json" increments)
  [ "$accepted" = "$FLUSH_KEYS" ] || die "fill accepted $accepted of $FLUSH_KEYS increments (see $SCRATCH/fill.$round.err)"
  sleep 1
  full=$(rss_mb "$pid")
  pending=$(metric "$port" increment_pending_keys)
  timeout 120 psql "$PG/$db" -XAtqc 'CHECKPOINT' >/dev/null
  body=$(curl -s --max-time 900 -X POST -H "Authorization: Bearer $TOKEN" \
    -w ' %{http_code} %{time_total}' "http://127.0.0.1:$port/admin/flush")
  t=${body##* }
  body=${body% *}
  local code=${body##* }
  body=${body% *}
  [ "$code" = 200 ] || die "admin flush answered $code: $body"
  after=$(rss_mb "$pid")
  keys=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["keys"])' "$body")
  python3 - "$body" "$t" "$idle" "$full" "$after" "$pending" "$FLUSH_KEYS" <<'PY'
import json, sys
body = json.loads(sys.argv[1]); t = float(sys.argv[2])
idle, full, after = map(float, sys.argv[3:6]); pending = int(float(sys.argv[6] or 0)); n = int(sys.argv[7])
per_key = (full - idle) * 1048576 / n
print(json.dumps({"rate": body["keys"] / t, "keys": body["keys"], "batches": body["batches"],
    "statements": body["statements"], "seconds": t, "rss_idle_mb": idle, "rss_full_mb": full,
    "rss_after_flush_mb": after, "pending": pending, "bytes_per_key": per_key,
    "rss_1m_mb": idle + per_key * 1_000_000 / 1048576, "unit": "keys/s"}))
PY
}

if has flush; then
  log "== flush: one flush of $FLUSH_KEYS pending keys vs one raw unnest upsert; RSS"
  for round in $(seq 1 "$FLUSH_ROUNDS"); do
    log "flush round $round/$FLUSH_ROUNDS"
    create_db incbench_flush
    start_service svc_flush incbench_flush "$SVC_WORKERS" --flush-interval 1h --cache-ttl 1h \
      --cache-capacity $(( FLUSH_KEYS * 2 )) --max-pending-keys $(( FLUSH_KEYS * 2 )) --max-body 1MiB
    measure flush service_flush "$round" json -- flush_run svc_flush incbench_flush "$round"
    stop_server svc_flush
    py gensql "$FLUSH_KEYS" "f$round:" raw_counters "$SCRATCH/raw.$round.sql"
    timeout 120 psql "$PG/incbench_flush" -Xq -v ON_ERROR_STOP=1 \
      -c 'DROP TABLE IF EXISTS raw_counters' -c 'CREATE TABLE raw_counters (LIKE counters INCLUDING ALL)' -c 'CHECKPOINT' >/dev/null 2>&1
    measure flush raw_unnest "$round" psql keys="$FLUSH_KEYS" unit='"keys/s"' -- \
      timeout 900 psql "$PG/incbench_flush" -X -v ON_ERROR_STOP=1 -f "$SCRATCH/raw.$round.sql"
    rm -f "$SCRATCH/raw.$round.sql"
  done
fi

# ---------------------------------------------------------------------------
# Scenario: journal mode vs write-behind vs crash-safe Redis (issue 13).
NATS_PORT=""
NATS_MON=""
start_nats() {
  local bin
  bin=$(command -v "${NATS_SERVER:-nats-server}" || true)
  [ -n "$bin" ] || die "nats-server is missing (apt-get install -y nats-server)"
  NATS_PORT=$(free_port)
  NATS_MON=$(free_port)
  mkdir -p "$SCRATCH/nats"
  "$bin" -js -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON" -sd "$SCRATCH/nats" >"$SCRATCH/nats.log" 2>&1 &
  PID[nats]=$!
  STARTED+=("${PID[nats]}")
  note_server "nats-server -js -a 127.0.0.1 -p $NATS_PORT -m $NATS_MON -sd \$SCRATCH/nats   # $("$bin" --version)"
  wait_http "http://127.0.0.1:$NATS_MON/healthz" "${PID[nats]}" nats
  log "nats-server on :$NATS_PORT (monitor :$NATS_MON, pid ${PID[nats]})"
}
# A counter of the service's metrics (labels included in the name), 0 if absent.
metric_or_0() { local v; v=$(metric "$1" "$2"); echo "${v:-0}"; }
stream_sample() { # -> "bytes messages" of the stream now (JetStream's own count)
  curl -s --max-time 5 "http://127.0.0.1:$NATS_MON/jsz?streams=true" | python3 -c '
import json, sys
d = json.load(sys.stdin)
for a in d.get("account_details") or []:
    for st in a.get("stream_detail") or []:
        if st.get("name") == "increments":
            s = st["state"]; print(s.get("bytes", 0), s.get("messages", 0)); sys.exit()
print(0, 0)'
}
# with_journal DB PORT -- cmd...: with_commits, plus the journal's messages
# and requests over the run and the stream's bytes per message mid-run.
with_journal() {
  local db=$1 port=$2; shift 3
  local m0 g0 m1 g1 rc=0 sample="$SCRATCH/stream.sample"
  m0=$(metric_or_0 "$port" 'increment_journal_messages_total{outcome="stored"}')
  g0=$(metric_or_0 "$port" increment_journal_group_requests_sum)
  : >"$sample"
  ( sleep $(( WARM + DUR / 2 )); stream_sample >"$sample" ) &
  local sampler=$!
  with_commits "$db" "$port" -- "$@" || rc=$?
  wait "$sampler" 2>/dev/null || true
  m1=$(metric_or_0 "$port" 'increment_journal_messages_total{outcome="stored"}')
  g1=$(metric_or_0 "$port" increment_journal_group_requests_sum)
  python3 - "$EXTRA" "$m0" "$m1" "$g0" "$g1" "$(cat "$sample")" <<'PY'
import json, sys
path = sys.argv[1]
m0, m1, g0, g1 = (float(x or 0) for x in sys.argv[2:6])
sample = (sys.argv[6] or "0 0").split()
rec = json.load(open(path))
msgs, reqs = m1 - m0, g1 - g0
rec.update({"journal_messages": msgs, "journal_requests": reqs,
            "journal_msgs_per_s": msgs / rec["load_s"] if rec.get("load_s") else None,
            "requests_per_message": reqs / msgs if msgs else None})
b, n = float(sample[0]), float(sample[1])
if n and msgs:
    rec["stream_bytes_per_message"] = b / n
    rec["stream_bytes_per_increment"] = b / n / (reqs / msgs)
json.dump(rec, open(path, "w"))
PY
  return "$rc"
}

if has journal; then
  log "== journal: --journal-url vs write-behind (same binary) vs redis INCR with appendfsync everysec"
  create_db incbench_journal_wb
  create_db incbench_journal
  start_nats
  start_service svc_wb incbench_journal_wb "$SVC_WORKERS"
  start_service svc_journal incbench_journal "$SVC_WORKERS" --journal-url "nats://127.0.0.1:$NATS_PORT"
  start_redis aof
  common=(--warmup "${WARM}s" -d "${DUR}s")
  for round in $(seq 1 "$ROUNDS"); do
    log "journal round $round/$ROUNDS"
    for keys in hot uniform:100000; do
      k=${keys%%:*}
      measure journal "write_behind_$k" "$round" loadgen -- with_commits incbench_journal_wb "${PORT[svc_wb]}" -- \
        lg --url "http://127.0.0.1:${PORT[svc_wb]}" "${common[@]}" --keys "$keys"
      measure journal "journal_$k" "$round" loadgen -- with_journal incbench_journal "${PORT[svc_journal]}" -- \
        lg --url "http://127.0.0.1:${PORT[svc_journal]}" "${common[@]}" --keys "$keys"
    done
    measure journal redis_aof_everysec "$round" redis -- timeout $(( DUR * 4 + 60 )) \
      redis-benchmark -p "$REDIS_PORT" -t incr -n $(( 55000 * DUR )) -c "$CONNS" -P 1 --csv
    measure journal redis_aof_everysec_r100k "$round" redis -- timeout $(( DUR * 4 + 60 )) \
      redis-benchmark -p "$REDIS_PORT" -t incr -n $(( 55000 * DUR )) -c "$CONNS" -P 1 -r 100000 --csv
  done
  stop_server redis
  stop_server svc_wb
  half_jhot=$(py median "$RESULTS" journal journal_hot rate | awk '{printf "%d", $1 / 2}')
  half_juni=$(py median "$RESULTS" journal journal_uniform rate | awk '{printf "%d", $1 / 2}')
  for round in $(seq 1 "$HALF_ROUNDS"); do
    log "journal: open loop at half the journal maximum ($half_jhot / $half_juni req/s), round $round/$HALF_ROUNDS"
    measure journal half_journal_hot "$round" loadgen -- with_journal incbench_journal "${PORT[svc_journal]}" -- \
      lg --url "http://127.0.0.1:${PORT[svc_journal]}" "${common[@]}" --keys hot --rate "$half_jhot"
    measure journal half_journal_uniform "$round" loadgen -- with_journal incbench_journal "${PORT[svc_journal]}" -- \
      lg --url "http://127.0.0.1:${PORT[svc_journal]}" "${common[@]}" --keys uniform:100000 --rate "$half_juni"
  done
  stop_server svc_journal
  stop_server nats
fi

# ---------------------------------------------------------------------------
# Scenario: requests with an Idempotency-Key vs plain ones (issue 14).
if has keyed; then
  log "== keyed: a unique Idempotency-Key per request vs plain requests, same service"
  create_db incbench_keyed
  create_db incbench_keyed_nl
  start_service svc_keyed incbench_keyed "$SVC_WORKERS"
  start_service svc_keyed_nl incbench_keyed_nl "$SVC_WORKERS" --idempotency-lookup false
  kurl="$PG/incbench_keyed"
  for round in $(seq 1 "$ROUNDS"); do
    log "keyed round $round/$ROUNDS"
    for keys in hot uniform:100000; do
      k=${keys%%:*}
      measure keyed "plain_$k" "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[svc_keyed]}" \
        --warmup "${WARM}s" -d "${DUR}s" --keys "$keys" --verify "$kurl" --admin-token "$TOKEN"
      measure keyed "keyed_$k" "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[svc_keyed]}" \
        --warmup "${WARM}s" -d "${DUR}s" --keys "$keys" --idempotency-keys --verify "$kurl" --admin-token "$TOKEN"
      measure keyed "keyed_nolookup_$k" "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[svc_keyed_nl]}" \
        --warmup "${WARM}s" -d "${DUR}s" --keys "$keys" --idempotency-keys --verify "$PG/incbench_keyed_nl" --admin-token "$TOKEN"
    done
  done
  stop_server svc_keyed
  stop_server svc_keyed_nl
fi

# ---------------------------------------------------------------------------
# Scenario: many distinct keys (issue 16).
# with_rss NAME IDLE_MB -- cmd...: the service's RSS after the run and its
# pending keys after it, with its RSS before any load (IDLE_MB: a repeated
# attempt runs on the same service, so both counts are cumulative), into
# $EXTRA (bytes per pending key).
with_rss() {
  local name=$1 idle=$2; shift 3
  local full pending rc=0
  "$@" || rc=$?
  full=$(rss_mb "${PID[$name]}")
  pending=$(metric "${PORT[$name]}" increment_pending_keys)
  python3 -c 'import json, sys
idle, full, pending = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3] or 0)
print(json.dumps({"rss_idle_mb": idle, "rss_full_mb": full, "pending": pending,
    "bytes_per_key": (full - idle) * 1048576 / pending if pending else None}))' "$idle" "$full" "$pending" >"$EXTRA"
  return "$rc"
}

if has keys; then
  log "== keys: hot, zipf and 100k uniform keys (flush on; uniform also with it deferred) vs the poem floor on the same keys; p99 at half each maximum vs the floor at that rate; 1M uniform keys"
  create_db incbench_keys_hot
  create_db incbench_keys_zipf
  create_db incbench_keys_uniform
  create_db incbench_keys_deferred
  start_ceiling kfloor floor
  start_service ksvc_hot incbench_keys_hot "$SVC_WORKERS"
  start_service ksvc_zipf incbench_keys_zipf "$SVC_WORKERS"
  start_service ksvc_uniform incbench_keys_uniform "$SVC_WORKERS"
  # Deferred past the whole scenario: the intake alone.
  start_service ksvc_deferred incbench_keys_deferred "$SVC_WORKERS" --flush-interval 1h
  common=(--warmup "${WARM}s" -d "${DUR}s")
  declare -A KSVC=([hot]=ksvc_hot [zipf]=ksvc_zipf [uniform]=ksvc_uniform)
  declare -A KDIST=([hot]=hot [zipf]="$ZIPF" [uniform]=uniform:100000)
  for round in $(seq 1 "$ROUNDS"); do
    log "keys round $round/$ROUNDS"
    for k in hot zipf uniform; do
      measure keys "floor_$k" "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[kfloor]}" "${common[@]}" --keys "${KDIST[$k]}"
      measure keys "service_$k" "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[${KSVC[$k]}]}" "${common[@]}" --keys "${KDIST[$k]}"
    done
    measure keys service_uniform_deferred "$round" loadgen -- \
      lg --url "http://127.0.0.1:${PORT[ksvc_deferred]}" "${common[@]}" --keys uniform:100000
  done
  stop_server ksvc_deferred
  declare -A KHALF=()
  for k in hot zipf uniform; do
    KHALF[$k]=$(py median "$RESULTS" keys "service_$k" rate | awk '{printf "%d", $1 / 2}')
  done
  for round in $(seq 1 "$HALF_ROUNDS"); do
    log "keys: open loop at half each maximum (hot ${KHALF[hot]}, zipf ${KHALF[zipf]}, uniform ${KHALF[uniform]} req/s), service and floor, round $round/$HALF_ROUNDS"
    for k in hot zipf uniform; do
      measure keys "half_service_$k" "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[${KSVC[$k]}]}" \
        "${common[@]}" --keys "${KDIST[$k]}" --rate "${KHALF[$k]}"
      measure keys "half_floor_$k" "$round" loadgen -- lg --url "http://127.0.0.1:${PORT[kfloor]}" \
        "${common[@]}" --keys "${KDIST[$k]}" --rate "${KHALF[$k]}"
    done
  done
  for s in kfloor ksvc_hot ksvc_zipf ksvc_uniform; do stop_server "$s"; done
  # 1M uniform keys, nothing flushed or expired during the run: the rate, and
  # the memory each pending key holds.
  create_db incbench_keys_1m
  start_service ksvc_1m incbench_keys_1m "$SVC_WORKERS" --flush-interval 1h --cache-ttl 1h \
    --cache-capacity 2000000 --max-pending-keys 2000000
  measure keys service_uniform_1m 1 loadgen -- with_rss ksvc_1m "$(rss_mb "${PID[ksvc_1m]}")" -- \
    lg --url "http://127.0.0.1:${PORT[ksvc_1m]}" "${common[@]}" --keys uniform:1000000
  stop_server ksvc_1m
fi

# ---------------------------------------------------------------------------
# Report.
echo "duration=$(( $(date +%s) - T_START ))" >>"$META"
log "== results"
# bench/PROFILE.md (profile findings and micro-benchmarks, written by hand) is
# appended to the report when present.
BENCH_NOTES="${BENCH_NOTES:-$ROOT/bench/PROFILE.md}" py render "$RESULTS" "$META" "$OUT" "$QUICK"
cp "$RESULTS" "$SCRATCH/../incbench-last-results.jsonl" 2>/dev/null || true
log "wrote $OUT ($(( $(date +%s) - T_START )) s); raw results: /tmp/incbench-last-results.jsonl"
