# Shared by the scripts in this folder: `source "$(dirname "$0")/lib.sh"`.
# Callers set `child_pid=""` before using `run`.

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
