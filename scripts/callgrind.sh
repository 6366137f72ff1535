#!/usr/bin/env bash
# Instructions per accepted increment, counted by valgrind's callgrind over a
# fixed request stream: repeatable on this noisy machine where wall-clock
# rates are not (issue 16). For each binary and key distribution: start the
# service under callgrind (one worker thread, its own PostgreSQL database),
# send WARM requests, zero the counters, send N requests with a fixed seed,
# dump, and divide the instructions of every thread of the service by N.
#
#   scripts/callgrind.sh BIN [BIN...]
#
# Env: KEYS (space-separated loadgen distributions, default
#      "hot zipf:100000:1.1 uniform:100000"), N (default 40000), WARM
#      (default 20000), CONNS (default 16), BATCH (items per request, default 0),
#      FLAGS (extra service flags; default "--flush-interval 1h --cache-ttl 1h":
#      intake only, no flush and no expiry during the count, since callgrind's
#      slowdown would otherwise change what expires), LOADGEN_FLAGS (extra
#      loadgen flags, e.g. --idempotency-keys), PG, TOP (functions listed
#      per run, default 0), OUT (keep the callgrind files in this folder).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 1 ] || { sed -n '2,18p' "$0"; exit 2; }
KEYS=${KEYS:-"hot zipf:100000:1.1 uniform:100000"}
N=${N:-40000}; WARM=${WARM:-20000}; CONNS=${CONNS:-16}; BATCH=${BATCH:-0}
FLAGS=${FLAGS:-"--flush-interval 1h --cache-ttl 1h"}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
TOP=${TOP:-0}
LOADGEN=$ROOT/target/release/loadgen
[ -x "$LOADGEN" ] || { echo "callgrind.sh: build first: cargo build --release -p bench --bins" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed (apt-get install -y valgrind)" >&2; exit 2; }

SCRATCH=$(mktemp -d)
PID=""; DB=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "$DB" ] && psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; cp "$SCRATCH"/callgrind.* "$OUT"/ 2>/dev/null || true; fi
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"   # listening_addr
die() { echo "callgrind.sh: $*" >&2; exit 1; }

load() { # ADDR KEYS COUNT
  "$LOADGEN" --url "http://$1" -c "$CONNS" --keys "$2" --batch "$BATCH" --values 1..=9 \
    --key-prefix cg --seed 7 -n "$3" --timeout 120s --expect-accepted --json ${LOADGEN_FLAGS:-} 2>/dev/null
}

printf '%-28s %-22s %14s %14s\n' binary keys instructions per_increment
run_index=0
for bin in "$@"; do
  bin=$(realpath "$bin")
  for keys in $KEYS; do
    run_index=$((run_index + 1))
    DB="inccg_$$_$run_index"
    psql -q "$PG/postgres" -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
    out="$SCRATCH/callgrind.$run_index"
    # shellcheck disable=SC2086  # FLAGS is a list of words
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn,api::startup=info valgrind --tool=callgrind \
      --callgrind-out-file="$out.%p" --dump-instr=no --collect-atstart=yes \
      "$bin" --listen 127.0.0.1:0 --database-url "$PG/$DB" --spill-path "$SCRATCH/spill.$run_index.jsonl" \
      $FLAGS >"$SCRATCH/service.$run_index.log" 2>&1 &
    PID=$!
    addr=$(listening_addr "$SCRATCH/service.$run_index.log" "$PID" 180)
    load "$addr" "$keys" "$WARM" >/dev/null || die "warm-up load failed ($bin, $keys)"
    callgrind_control -z "$PID" >/dev/null
    load "$addr" "$keys" "$N" >"$SCRATCH/load.json" || die "load failed ($bin, $keys)"
    callgrind_control -d "$PID" >/dev/null
    kill -KILL "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
    psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    DB=""
    # The dump after zeroing: the highest-numbered part file of this run.
    dump=$(ls -1v "$out".*.[0-9]* 2>/dev/null | tail -n 1)
    [ -n "$dump" ] || die "no callgrind dump for $bin, $keys"
    total=$(sed -n 's/^summary: //p; s/^totals: //p' "$dump" | head -n 1 | awk '{print $1}')
    [ -n "$total" ] || die "no totals in $dump"
    increments=$((N * (BATCH > 0 ? BATCH : 1)))
    printf '%-28s %-22s %14s %14.0f\n' "$(basename "$(dirname "$bin")")/$(basename "$bin")" \
      "$keys" "$total" "$(echo "$total / $increments" | bc -l)"
    if [ "$TOP" -gt 0 ]; then
      callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | sed -n '/^Ir/,$p' | sed -n "2,$((TOP + 2))p"
    fi
  done
done
