# Shared by the scripts in this folder: `source "$(dirname "$0")/lib.sh"`.
# Callers set `child_pid=""` before using `run`, and define `die MESSAGE`
# (used by `wait_http`).

# Runs a long step in the background and waits for it, so that a signal is
# handled at once (bash defers traps while a foreground command runs) and the
# step can be stopped with the rest (it is `$child_pid` meanwhile).
run() {
  "$@" &
  child_pid=$!
  local rc=0
  wait "$child_pid" || rc=$?
  child_pid=""
  return "$rc"
}

# stop PID NAME [SIGNAL]: the signal (TERM by default), up to 20 s, then SIGKILL.
stop() {
  local pid=$1 name=$2 sig=${3:-TERM}
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -"$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$(basename "$0" .sh): $name (pid $pid) did not stop; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# A TCP port free on loopback right now, for servers that cannot bind port 0
# and say which port they got (nginx, Prometheus, the bench ceilings); another
# process may still take it before they bind. `increment` needs none: start it
# with `--listen 127.0.0.1:0` and read its address with `listening_addr`.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# listening_addr LOG PID SECONDS: the address `increment` logged ("listening",
# text or JSON format, at info level for api::startup) in LOG; calls the
# caller's `die` when PID exits first or SECONDS pass.
listening_addr() {
  local log=$1 pid=$2 seconds=$3 addr
  local deadline=$(( $(date +%s) + seconds ))
  while :; do
    addr=$(sed -E 's/\x1b\[[0-9;]*m//g' "$log" 2>/dev/null | grep 'listening' \
      | sed -nE 's/.*"?addr"?[=:]"?([0-9.]+:[0-9]+).*/\1/p' | head -n 1)
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    kill -0 "$pid" 2>/dev/null || die "pid $pid exited before listening (see $log)"
    [ "$(date +%s)" -lt "$deadline" ] || die "pid $pid did not listen within ${seconds}s (see $log)"
    sleep 0.1
  done
}

# find_loadgen: sets `loadgen` to bench's load generator: $LOADGEN_BIN when
# set, else a release build of it. Callers define `step` and `die` (and may
# set BUILD_TIMEOUT).
find_loadgen() {
  if [ -n "${LOADGEN_BIN:-}" ]; then
    loadgen=$LOADGEN_BIN
  else
    step "cargo build --release -p bench --bin loadgen"
    run timeout "${BUILD_TIMEOUT:-3600}" cargo build --release -p bench --bin loadgen
    loadgen=target/release/loadgen
  fi
  [ -x "$loadgen" ] || die "loadgen $loadgen is not an executable"
  loadgen=$(realpath "$loadgen")
}

# wait_http URL SECONDS PID NAME: until URL answers 2xx; calls the caller's
# `die` when PID exits first or SECONDS pass.
wait_http() {
  local url=$1 seconds=$2 pid=$3 name=$4
  local deadline=$(( $(date +%s) + seconds ))
  until curl -fsS --max-time 2 -o /dev/null "$url" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || die "$name exited before answering $url"
    [ "$(date +%s)" -lt "$deadline" ] || die "$name did not answer $url within ${seconds}s"
    sleep 0.2
  done
}

# on_exit_run_cleanup: the caller's `cleanup` on exit, and an exit (so that it
# runs) on SIGINT and SIGTERM, with the shell's usual statuses.
on_exit_run_cleanup() {
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# remove_tmp NAME KEEP: removes `$tmp`, unless KEEP is 1 (then says where it is).
remove_tmp() {
  if [ "${2:-0}" = 1 ]; then
    echo "$1: kept $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}

# start_watchdog NAME SECONDS: SIGTERM to this script after SECONDS, so that
# the whole run is bounded (its pid is `$watchdog_pid`; stop it in cleanup).
start_watchdog() {
  local name=$1 limit=$2
  (
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$limit" & sleeper=$!
    wait "$sleeper"
    echo "$name: time limit of ${limit}s reached; stopping" >&2
    kill -TERM $$ 2>/dev/null
  ) &
  watchdog_pid=$!
}
