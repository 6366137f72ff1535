#!/usr/bin/env bash
# Soak test (not in CI): mixed load at half of the measured capacity for
# SOAK_DURATION (default 10m) against the release binary on PostgreSQL;
# samples resident memory every 10 s and checks it stays flat after warm-up;
# verifies the database totals at the end.
#
#   scripts/soak.sh                  # 10 minutes
#   SOAK_DURATION=2m scripts/soak.sh # shorter
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "soak: $*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
source scripts/lib.sh   # listening_addr, wait_http

duration=${SOAK_DURATION:-10m}
warmup_samples=${SOAK_WARMUP_SAMPLES:-6}   # first 60 s are warm-up
work=$(mktemp -d)
db="soak_$$"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

pg_isready -h 127.0.0.1 -p 5432 -q || pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db"
url="postgres://postgres@127.0.0.1:5432/$db"
cargo build --release --bin increment -p bench --bins >/dev/null 2>&1 || cargo build --release --bin increment -p bench --bins
bin=target/release
token="soak-admin-token-$$-0000"
RUST_LOG="${RUST_LOG:-info},api::startup=info" \
  "$bin/increment" --listen 127.0.0.1:0 --database-url "$url" --spill-path "$work/spill.jsonl" \
  --admin-token "$token" >"$work/server.log" 2>&1 &
server=$!; pids+=("$server")
addr=$(listening_addr "$work/server.log" "$server" 30)
port=${addr##*:}
wait_http "http://$addr/readyz" 30 "$server" increment

echo "== capacity: closed loop, 64 connections, zipf keys, 10 s"
max=$("$bin/loadgen" --url "http://127.0.0.1:$port" -c 64 -d 10s --keys zipf:100000 --json 2>/dev/null \
  | python3 -c 'import json,sys; print(int(json.loads(sys.stdin.read().strip().splitlines()[-1])["rps"]))')
rate=$((max / 2))
echo "max ≈ $max req/s → soak at $rate req/s for $duration (90 % single increments, 10 % batches of 10)"

sample_rss() {
  while kill -0 "$server" 2>/dev/null; do
    awk '/VmRSS/ {print $2}' "/proc/$server/status" >>"$work/rss.kb"
    sleep 10
  done
}
sample_rss & pids+=("$!")

"$bin/loadgen" --url "http://127.0.0.1:$port" -c 32 --rate $((rate * 9 / 10)) -d "$duration" \
  --keys zipf:100000 --verify "$url" --admin-token "$token" >"$work/single.txt" 2>&1 &
single=$!
"$bin/loadgen" --url "http://127.0.0.1:$port" -c 4 --rate $((rate / 100 + 1)) -d "$duration" \
  --batch 10 --keys uniform:1000000 --verify "$url" --admin-token "$token" >"$work/batch.txt" 2>&1 &
batch=$!
status=0
wait "$single" || status=1
wait "$batch" || status=1
echo "== single increments"; tail -n 12 "$work/single.txt"
echo "== batches"; tail -n 12 "$work/batch.txt"

python3 - "$work/rss.kb" "$warmup_samples" <<'PY' || status=1
import sys
samples = [int(x) for x in open(sys.argv[1]).read().split()]
warm = int(sys.argv[2])
after = samples[warm:] or samples
base, peak, last = after[0], max(after), after[-1]
growth = (peak - base) / base
print(f"resident memory: start {samples[0]/1024:.1f} MiB, after warm-up {base/1024:.1f} MiB, "
      f"peak {peak/1024:.1f} MiB, end {last/1024:.1f} MiB ({len(samples)} samples, growth after warm-up {growth:+.1%})")
sys.exit(0 if growth < 0.25 else 1)
PY
[ "$status" = 0 ] && echo "soak: PASSED" || echo "soak: FAILED"
exit "$status"
