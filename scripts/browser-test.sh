#!/usr/bin/env bash
# Real-browser test of the Swagger UI at /docs, run by .ci/run.
#
# Starts the release binary on a free loopback port against a fresh PostgreSQL
# database, then drives headless Chromium (Debian's /usr/bin/chromium through
# playwright-core; no browser is downloaded) with every non-loopback request
# blocked: the page must render, list the operations, POST /increment via
# "Try it out" (202), the flush must store the value in the database, and
# GET /counters/{key} via "Try it out" must show it (200).
#
# Environment:
#   INCREMENT_BIN        use this binary instead of building target/release/increment
#   BROWSER_TEST_TIMEOUT seconds allowed for the Node test (default 180)
#   PGHOST/PGPORT/PGUSER PostgreSQL to use (default 127.0.0.1 / 5432 / postgres)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'browser-test: %s\n' "$*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # listening_addr, wait_http
started=$(date +%s)

export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
export PGCONNECT_TIMEOUT=5
browser_dir=scripts/browser
chromium_bin=/usr/bin/chromium
test_timeout="${BROWSER_TEST_TIMEOUT:-180}"

work=$(mktemp -d "${TMPDIR:-/tmp}/increment-browser-test.XXXXXX")
server_log="$work/server.log"
db_name=""
db_created=0
server_pid=""
child_pid="" # the running `timeout` (cargo or node): leader of its own process group

psql_admin() { psql -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }

stop_pid() { # pid [process group]: TERM, wait up to 10 s, then KILL
  local pid=$1 target=$1
  [ -n "${2:-}" ] && target="-$1"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "$target" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL -- "$target" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [ -n "$child_pid" ] && stop_pid "$child_pid" group
  if [ -n "$server_pid" ]; then
    stop_pid "$server_pid"
    wait "$server_pid" 2>/dev/null
  fi
  if [ "$rc" -ne 0 ] && [ -s "$server_log" ]; then
    printf '\n--- last lines of the server log (%s) ---\n' "$server_log" >&2
    tail -n 40 "$server_log" >&2
  fi
  if [ "$db_created" = 1 ]; then
    psql_admin "DROP DATABASE IF EXISTS \"$db_name\" WITH (FORCE)" \
      && echo "dropped database $db_name" \
      || echo "browser-test: could not drop database $db_name" >&2
  fi
  if [ "$rc" -eq 0 ]; then rm -rf "$work"; else echo "browser-test: FAILED (exit $rc); logs kept in $work" >&2; fi
  exit "$rc"
}
on_exit_run_cleanup

# --- Chromium -----------------------------------------------------------------
step "Chromium ($chromium_bin)"
if [ ! -x "$chromium_bin" ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
  echo "installing the Debian packages chromium and chromium-driver"
  if ! DEBIAN_FRONTEND=noninteractive timeout 900 $sudo apt-get install -y chromium chromium-driver; then
    timeout 300 $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive timeout 900 $sudo apt-get install -y chromium chromium-driver
  fi
fi
[ -x "$chromium_bin" ] || die "$chromium_bin is missing"
timeout 30 "$chromium_bin" --version 2>/dev/null || die "$chromium_bin --version failed"

# --- playwright-core ----------------------------------------------------------
step "npm dependencies in $browser_dir (playwright-core only; no browser download)"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ -f "$browser_dir/package-lock.json" ]; then
  (cd "$browser_dir" && timeout 300 npm ci --prefer-offline --no-audit --no-fund)
else
  (cd "$browser_dir" && timeout 300 npm install --prefer-offline --no-audit --no-fund)
fi
echo "playwright-core $(cd "$browser_dir" && node -p "require('playwright-core/package.json').version")"

# --- PostgreSQL ---------------------------------------------------------------
step "PostgreSQL on $PGHOST:$PGPORT"
if ! pg_isready -h "$PGHOST" -p "$PGPORT" -q; then
  cluster_version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "starting cluster $cluster_version/main"
  timeout 60 pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start
  for _ in $(seq 1 30); do pg_isready -h "$PGHOST" -p "$PGPORT" -q && break; sleep 1; done
fi
pg_isready -h "$PGHOST" -p "$PGPORT" || die "PostgreSQL is not accepting connections"

# --- the binary ---------------------------------------------------------------
if [ -n "${INCREMENT_BIN:-}" ]; then
  step "binary: INCREMENT_BIN=$INCREMENT_BIN"
  bin=$INCREMENT_BIN
else
  step "cargo build --release --bin increment"
  # In the background so that a signal to this script ends the build right away.
  timeout 3600 cargo build --release --bin increment &
  child_pid=$!
  wait "$child_pid"
  child_pid=""
  bin="${CARGO_TARGET_DIR:-target}/release/increment"
fi
[ -x "$bin" ] || die "not an executable: $bin"

# --- a fresh database ---------------------------------------------------------
step "fresh PostgreSQL database"
db_name="browser_test_$(date +%s)_$$_${RANDOM}"
psql_admin "CREATE DATABASE \"$db_name\""
db_created=1
echo "created database $db_name (dropped at exit)"

# --- start the service --------------------------------------------------------
step "start increment on a free loopback port, wait for /readyz"
database_url="postgres://$PGUSER@$PGHOST:$PGPORT/$db_name"
# Port 0: the service binds a free port itself and logs it.
RUST_LOG="${RUST_LOG:-info},api::startup=info" \
  "$bin" --listen 127.0.0.1:0 --database-url "$database_url" --flush-interval 200ms \
  --spill-path "$work/spill.jsonl" >>"$server_log" 2>&1 &
server_pid=$!
addr=$(listening_addr "$server_log" "$server_pid" 60)
base_url="http://$addr"
wait_http "$base_url/readyz" 60 "$server_pid" increment
echo "ready: $base_url (pid $server_pid, flush interval 200ms, database $db_name)"

# --- the browser test ---------------------------------------------------------
step "Swagger UI in headless Chromium ($base_url/docs, every non-loopback request blocked)"
key_file="$work/key"
# `timeout` leads its own process group (with node), so cleanup can end all of it; node's
# watchdog (TEST_TIMEOUT_MS) fires first so that it can screenshot and close Chromium itself.
BASE_URL="$base_url" DB_NAME="$db_name" KEY_FILE="$key_file" CHROMIUM="$chromium_bin" \
  TEST_TIMEOUT_MS=$(( test_timeout > 30 ? (test_timeout - 15) * 1000 : test_timeout * 500 )) \
  timeout -k 10 "$test_timeout" node "$browser_dir/swagger.test.mjs" &
child_pid=$!
node_rc=0
wait "$child_pid" || node_rc=$?
child_pid=""
[ "$node_rc" -eq 0 ] || die "the Swagger UI test failed (exit $node_rc)"

# --- the database, once more from here ----------------------------------------
step "database check"
key=$(cat "$key_file")
[[ "$key" =~ ^browser:[a-z0-9-]+$ ]] || die "unexpected key from the test: '$key'"
stored=$(psql -d "$db_name" -v ON_ERROR_STOP=1 -Atc "select value from counters where key = '$key'")
echo "psql -d $db_name: select value from counters where key = '$key' → $stored"
[ "$stored" = 7 ] || die "expected 7 in counters.value for $key, got '$stored'"

step "browser test passed in $(( $(date +%s) - started )) s"
