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
#          (comma list of direct,nginx,naive,flush; default all).
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
SCENARIOS="direct,nginx,naive,flush"
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
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
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
cat >"$SCRATCH/h.py" <<'PY'
import json, os, re, statistics, sys, time

CLK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def cpu_totals():
    with open("/proc/stat") as f:
        vals = list(map(int, f.readline().split()[1:]))
    # Time of processes (user, nice, system); irq/softirq are left out, since
    # loopback TCP work of the benchmark itself is accounted there.
    total = sum(vals[:8])
    return vals[0] + vals[1] + vals[2], total


def procs():
    """pid -> [start time, ppid, own CPU ticks, CPU ticks of reaped children, name]."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            r = s.rfind(")")
            comm = s[s.find("(") + 1 : r]
            fl = s[r + 2 :].split()
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = ""
            out[d] = [int(fl[19]), fl[1], int(fl[11]) + int(fl[12]), int(fl[13]) + int(fl[14]), (cmd or comm)[:120]]
        except (OSError, IndexError, ValueError):
            pass
    return out


def snap(path):
    with open(path, "w") as f:
        json.dump({"t": time.monotonic(), "cpu": cpu_totals(), "procs": procs()}, f)


def diff(before, after, root_pid, ours_re):
    """CPU of the benchmark's processes and of everything else over a window.

    A process's share is its own CPU time plus that of the children it reaped
    in the window, so short-lived processes (compilers, test binaries, the
    load generator, pgbench's backends reaped by the postmaster) count for
    their parent. Ours: the script and its descendants, and PostgreSQL
    processes matching `ours_re` (the postmaster reaps every backend, so
    other users' finished backends count as ours: a small underestimate).
    """
    b = json.load(open(before))
    a = json.load(open(after))
    el = max(a["t"] - b["t"], 1e-3)
    ours = {root_pid}
    parents = {pid: v[1] for pid, v in a["procs"].items()}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                changed = True
    rx = re.compile(ours_re)
    ours_t = others_t = 0
    top = {}
    for pid, (start, _ppid, ticks, cticks, name) in a["procs"].items():
        prev = b["procs"].get(pid)
        if prev and prev[0] == start:
            d = ticks - prev[2] + cticks - prev[3]
        else:
            d = ticks + cticks
        if pid in ours or rx.search(name):
            ours_t += d
        else:
            others_t += d
            top[name] = top.get(name, 0) + d
    pct = lambda t: 100.0 * t / CLK / el
    busy = 100.0 * NCPU * (a["cpu"][0] - b["cpu"][0]) / max(1, a["cpu"][1] - b["cpu"][1])
    tops = sorted(top.items(), key=lambda kv: -kv[1])[:3]
    print(json.dumps({
        "wall_s": round(el, 2),
        "busy_pct": round(busy, 1),
        "ours_pct": round(pct(ours_t), 1),
        "others_pct": round(pct(others_t), 1),
        "others_top": "; ".join(f"{n[:60]} {pct(t):.0f}%" for n, t in tops if pct(t) >= 2),
    }))


def idle(below, max_wait):
    t0 = time.time()
    ok = 0
    prev = cpu_totals()
    busy = 0.0
    while time.time() - t0 < max_wait:
        time.sleep(0.5)
        cur = cpu_totals()
        busy = 100.0 * NCPU * (cur[0] - prev[0]) / max(1, cur[1] - prev[1])
        prev = cur
        ok = ok + 1 if busy < below else 0
        if ok >= 2:
            break
    print(f"{time.time() - t0:.1f} {busy:.0f}")


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse(kind, path):
    text = open(path, errors="replace").read()
    out = {}
    if kind in ("loadgen", "json"):
        lines = [l for l in text.splitlines() if l.startswith("{")]
        if not lines:
            raise SystemExit(f"no JSON line in {path}")
        out = json.loads(lines[-1])
        if kind == "loadgen":
            out["rate"] = out["ips"]
    elif kind == "pgbench":
        m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", text)
        if not m:
            raise SystemExit(f"no tps in {path}")
        out["rate"] = float(m.group(1))
        m = re.search(r"latency average = ([\d.]+) ms", text)
        out["lat_avg_ms"] = float(m.group(1)) if m else None
        m = re.search(r"number of failed transactions: (\d+)", text)
        out["failed"] = int(m.group(1)) if m else 0
        m = re.search(r"number of transactions actually processed: (\d+)", text)
        out["requests"] = int(m.group(1)) if m else None
    elif kind == "redis":
        row = [l for l in text.splitlines() if l.startswith('"INCR"')]
        if not row:
            raise SystemExit(f"no INCR row in {path}")
        f = [x.strip('"') for x in row[-1].split(",")]
        out["rate"] = float(f[1])
        if len(f) >= 8:
            out["p50_ms"] = float(f[4])
            out["p99_ms"] = float(f[6])
            out["max_ms"] = float(f[7])
    elif kind == "wrk":
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        if not m:
            raise SystemExit(f"no Requests/sec in {path}")
        out["rate"] = float(m.group(1))
        for q, key in (("50", "p50_ms"), ("99", "p99_ms")):
            m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
            if m:
                out[key] = float(m.group(1)) * UNITS[m.group(2)]
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        out["non2xx"] = int(m.group(1)) if m else 0
    elif kind == "psql":
        times = re.findall(r"Time: ([\d.]+) ms", text)
        if not times:
            raise SystemExit(f"no Time: line in {path}")
        out["ms"] = float(times[-1])
    return out


def record(kind, out_path, cpu_path, extra_path, fields):
    rec = {}
    for kv in fields:
        k, v = kv.split("=", 1)
        try:
            rec[k] = json.loads(v)
        except ValueError:
            rec[k] = v
    rec.update(parse(kind, out_path))
    rec.update(json.load(open(cpu_path)))
    if extra_path and os.path.exists(extra_path) and os.path.getsize(extra_path) > 0:
        rec.update(json.load(open(extra_path)))
    if kind == "psql" and "keys" in rec:
        rec["rate"] = rec["keys"] / (rec["ms"] / 1000.0)
    print(json.dumps(rec))


def gensql(keys, prefix, table, path):
    names = sorted(f"{prefix}k{i}" for i in range(keys))
    with open(path, "w") as f:
        f.write("\\timing on\n")
        f.write(f"INSERT INTO {table} (key, value, created_at, updated_at) "
                "SELECT k, v, now(), now() FROM unnest('{")
        f.write(",".join(names))
        f.write("}'::text[], '{")
        f.write(",".join("1" for _ in names))
        f.write(f"}}'::bigint[]) AS t(k, v) ON CONFLICT (key) DO UPDATE "
                f"SET value = {table}.value + excluded.value, updated_at = excluded.updated_at;\n")


def median_of(recs, key):
    vals = [r[key] for r in recs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def select(results, scenario, config, attempts_ok=True):
    return [r for r in results if r.get("scenario") == scenario and r.get("config") == config]


def fmt(v, nd=0):
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:,.{nd}f}"
    return str(v)


def render(results_path, meta_path, out_path, quick):
    results = [json.loads(l) for l in open(results_path) if l.strip()]
    meta = {}
    for line in open(meta_path):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            meta.setdefault(k, []).append(v)
    m1 = lambda k: (meta.get(k) or ["?"])[0]
    configs = []
    for r in results:
        key = (r["scenario"], r["config"])
        if key not in configs:
            configs.append(key)

    def med(sc, cfg, key="rate"):
        return median_of(select(results, sc, cfg), key)

    rows = []
    for sc, cfg in configs:
        rs = select(results, sc, cfg)
        rates = [r["rate"] for r in rs if r.get("rate") is not None]
        unit = rs[0].get("unit", "req/s")
        notes = []
        if any("commits" in r for r in rs):
            cps = [r["commits"] / r["load_s"] for r in rs if r.get("load_s")]
            fl = [r["flushes"] / r["load_s"] for r in rs if r.get("load_s") and r.get("flushes") is not None]
            av = sum(r.get("autovac", 0) for r in rs)
            notes.append(f"commits/s {fmt(statistics.median(cps), 2)}" + (f" (flushes/s {fmt(statistics.median(fl), 2)})" if fl else "")
                         + (f", {av} autovacuum/analyze runs in the windows" if av else ""))
        if any(isinstance(r.get("verify"), dict) for r in rs):
            v = [r["verify"] for r in rs if isinstance(r.get("verify"), dict)]
            okc = sum(1 for x in v if x.get("status") == "ok")
            notes.append(f"verify {okc}/{len(v)} exact ({sum(x.get('keys', 0) for x in v):,} keys)")
        if any("rss_full_mb" in r for r in rs):
            notes.append(f"RSS {fmt(median_of(rs, 'rss_idle_mb'))} MB idle → {fmt(median_of(rs, 'rss_full_mb'))} MB with {fmt(median_of(rs, 'pending'))} pending, {fmt(median_of(rs, 'bytes_per_key'))} B/key")
        if any("statements" in r for r in rs):
            notes.append(f"{fmt(median_of(rs, 'keys'))} keys, {fmt(median_of(rs, 'statements'))} statements, {fmt(median_of(rs, 'seconds'), 2)} s")
        if any(r.get("kind") == "psql" for r in rs):
            notes.append(f"{fmt(median_of(rs, 'keys'))} keys, {fmt(median_of(rs, 'ms') / 1000.0, 2)} s")
        if any(r.get("rate_target") for r in rs):
            notes.append(f"open loop at {fmt(median_of(rs, 'rate_target'))} req/s")
        bad = sum((r.get("non2xx") or 0) + (r.get("errors_total") or 0) + (r.get("failed") or 0) for r in rs)
        if bad:
            notes.append(f"{bad:,} non-2xx/errors")
        others = max((r.get("others_pct") or 0) for r in rs)
        rows.append([
            sc, cfg, str(len(rs)),
            fmt(statistics.median(rates)) if rates else "–",
            (f"{fmt(min(rates))}–{fmt(max(rates))}" if rates else "–"),
            unit,
            fmt(median_of(rs, "p50_ms"), 2),
            fmt(median_of(rs, "p99_ms"), 2),
            f"{others:.0f}%",
            "; ".join(notes),
        ])

    targets = []

    def ratio(name, num, den, target, sense=">="):
        if num is None or den is None or den == 0:
            targets.append([name, fmt(num), fmt(den), "–", f"{sense} {target}", "n/a"])
            return
        r = num / den
        ok = r >= target if sense == ">=" else r <= target
        targets.append([name, fmt(num), fmt(den), f"{r:.2f}×", f"{sense} {target}×", "PASS" if ok else "FAIL"])

    def absolute(name, value, limit, unit, sense="<=", nd=2):
        if value is None:
            targets.append([name, "–", "", "", f"{sense} {limit} {unit}", "n/a"])
            return
        ok = value <= limit if sense == "<=" else value >= limit
        targets.append([name, f"{fmt(value, nd)} {unit}", "", "", f"{sense} {limit} {unit}", "PASS" if ok else "FAIL"])

    if med("direct", "service_hot") is not None:
        for k in ("hot", "zipf"):
            s = med("direct", f"service_{k}")
            ratio(f"direct {k}: service / poem floor", s, med("direct", "floor"), 0.85)
            ratio(f"direct {k}: service / bare hyper", s, med("direct", "bare"), 0.7)
            ratio(f"direct {k}: service / redis INCR -P1 -c64", s, med("direct", "redis_incr_P1"), 1.0)
        for cfg in ("service_hot", "service_zipf", "half_service_hot", "half_service_zipf"):
            rs = select(results, "direct", cfg)
            cps = [(r["commits"] - r.get("autovac", 0)) / r["load_s"] for r in rs if r.get("load_s") and "commits" in r]
            if cps:
                bound = 1.0 / 1.0 + 1.0  # one batch per flush / 1 s interval + 1
                absolute(f"commits/s during {cfg} ({fmt(med('direct', cfg))} req/s; worst run, autovacuum excluded)", max(cps), bound, "/s")
        for k in ("hot", "zipf"):
            absolute(f"p99 at half max rate, {k} keys (open loop)", med("direct", f"half_service_{k}", "p99_ms"), 5, "ms")
        ratio("batched 100/request, hot: service / redis INCR -P16", med("direct", "batch100_service_hot"), med("direct", "redis_incr_P16"), 0.5)
        ratio("batched 100/request, uniform 100k: service / redis INCR -P16 -r 100000", med("direct", "batch100_service_uniform"), med("direct", "redis_incr_P16_r100k"), 0.5)
    if med("nginx", "nginx_service") is not None:
        ratio("through nginx: 2 services / 2 floors", med("nginx", "nginx_service"), med("nginx", "nginx_floor"), 0.85)
    if med("naive", "service_hot_verify") is not None:
        ratio("hot key: service / pgbench naive upsert", med("naive", "service_hot_verify"), med("naive", "pgbench_hot"), 20)
        ratio("100k uniform keys: service / pgbench naive upsert", med("naive", "service_uniform_verify"), med("naive", "pgbench_uniform"), 3)
        v = [r.get("verify") for r in results if r.get("scenario") == "naive" and isinstance(r.get("verify"), dict)]
        okc = sum(1 for x in v if x.get("status") == "ok")
        targets.append(["totals exact (--verify, every service run)", f"{okc}/{len(v)} runs", "", "", "all", "PASS" if v and okc == len(v) else "FAIL"])
    if med("flush", "service_flush") is not None:
        ratio("flush: service keys/s / raw unnest keys/s", med("flush", "service_flush"), med("flush", "raw_unnest"), 0.9)
        rs = select(results, "flush", "service_flush")
        proj = median_of(rs, "rss_1m_mb")
        absolute("RSS with 1,000,000 pending keys" + (" (projected from the quick run)" if quick else ""), proj, 400, "MB", nd=0)

    def table(header, body):
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
        return "\n".join(lines)

    results_tbl = table(["scenario", "config", "runs", "median", "min–max", "unit", "p50 ms", "p99 ms", "others max", "notes"], rows)
    targets_tbl = table(["target", "measured", "comparator", "ratio", "target", "result"], targets)
    print(results_tbl)
    print()
    print(targets_tbl)
    passed = sum(1 for t in targets if t[-1] == "PASS")
    failed = sum(1 for t in targets if t[-1] == "FAIL")

    cmds = []
    seen = set()
    for r in results:
        key = (r["scenario"], r["config"])
        if key in seen or not r.get("cmd"):
            continue
        seen.add(key)
        cmds.append(f"# {r['scenario']} / {r['config']}\n{r['cmd']}")
    servers = "\n".join(meta.get("server", []))
    md = f"""# Benchmarks

Generated by `scripts/bench.sh{' --quick' if quick else ''}` on {m1('date')} ({m1('duration')} s for the whole run),
git `{m1('git')}`. Every comparator ran in the same run as the service, in interleaved rounds;
the numbers are medians over the rounds (min–max shown). **{passed} targets PASS, {failed} FAIL.**

## Machine and versions

| what | value |
|---|---|
| service binary | {m1('service')} |
| CPU | {m1('cpu')} × {m1('nproc')} (nproc) |
| memory | {m1('mem')} |
| kernel / OS | {m1('kernel')} / Debian {m1('debian')} |
| Rust | {m1('rustc')} (release: thin LTO, codegen-units=1) |
| crates (Cargo.lock) | {m1('crates')} |
| PostgreSQL | {m1('postgres')} ({m1('pgconf')}) |
| nginx / Redis / pgbench | {m1('nginx')} / {m1('redis')} / {m1('pgbench')} |
| nginx config | {m1('nginx_conf')}; worker_processes 2 |
| load at start | {m1('loadavg')} |

How to read it:

* Load generator and servers share the {m1('nproc')} cores. `loadgen` (bench/src/bin/loadgen.rs) is one
  thread, {m1('conns')} keep-alive connections, closed loop unless stated; HTTP rows are `req/s` of answers 2xx
  (increments/s for the batched rows). Each load ran {m1('warm')} s unrecorded, then {m1('dur')} s measured.
* **The service ran with `TOKIO_WORKER_THREADS={m1('svc_workers')}`** (its `#[tokio::main]` runtime honours it; it has no
  worker-thread flag), like the 1-worker ceilings (`WORKERS=1`). Its flusher's `spawn_blocking` drain and the
  database driver are extra threads the ceilings do not have. `service_hot_w2` is the service with the default
  runtime (one worker per core), for reference.
* Every process started by the script ran at nice {m1('nice')} (PostgreSQL kept its own priority).
  `others max` is the largest CPU share (% of one core) used during a measurement by processes that were not
  part of the benchmark (other users of this shared machine): per process, its own CPU time plus that of the
  children it reaped during the measurement, for every process that is not the script, one of its descendants
  or PostgreSQL's (`/proc/PID/stat`). Measurements above {m1('others_max')}% were repeated (at most
  twice each, at most 24 repeats per run) and the cleanest attempt kept. Run-to-run spread on this VM is ±10–20% even when idle.
* commits/s come from `pg_stat_database.xact_commit` of the service's own database, from just before the load
  to 2.5 s after it, divided by the load's wall time (so the tail flush is included: conservative).

## Results

{results_tbl}

## Targets

{targets_tbl}

## Commands

Servers (ports are picked free at each run; `$SCRATCH` is the run's temporary directory):

```sh
{servers}
```

Measurements (round 1 of each; the other rounds are identical):

```sh
{chr(10).join(cmds)}
```
"""
    notes_path = os.environ.get("BENCH_NOTES")
    if notes_path and os.path.exists(notes_path):
        md += "\n" + open(notes_path).read()
    with open(out_path, "w") as f:
        f.write(md)


def show(line):
    r = json.loads(line)
    rate = r.get("rate") or 0
    extra = ""
    if r.get("p99_ms") is not None:
        extra += f"  p99 {r['p99_ms']:.2f} ms"
    if "commits" in r and r.get("load_s"):
        extra += f"  commits/s {r['commits'] / r['load_s']:.2f}"
    if isinstance(r.get("verify"), dict):
        extra += f"  verify {r['verify']['status']}"
    print(f"  {r['scenario']:7} {r['config']:26} r{r['round']}  {rate:>12,.0f} {r.get('unit', 'req/s'):9}{extra}  others {r['others_pct']:.0f}%")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "snap":
        snap(sys.argv[2])
    elif cmd == "diff":
        diff(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    elif cmd == "idle":
        idle(float(sys.argv[2]), float(sys.argv[3]))
    elif cmd == "record":
        record(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    elif cmd == "gensql":
        gensql(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    elif cmd == "get":  # get FILE KEY: a field of the last JSON line
        lines = [l for l in open(sys.argv[2]) if l.startswith("{")]
        v = json.loads(lines[-1]).get(sys.argv[3]) if lines else None
        print("" if v is None else v)
    elif cmd == "median":  # median RESULTS SCENARIO CONFIG KEY
        rs = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
        v = median_of([r for r in rs if r.get("scenario") == sys.argv[3] and r.get("config") == sys.argv[4]], sys.argv[5])
        print("" if v is None else v)
    elif cmd == "show":
        show(sys.argv[2])
    elif cmd == "render":
        render(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1")
    else:
        raise SystemExit(f"unknown helper command {cmd}")
PY
py() { python3 "$SCRATCH/h.py" "$@"; }

# ---------------------------------------------------------------------------
# Tools and builds.
for tool in python3 psql pgbench curl redis-server redis-benchmark nginx wrk envsubst; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] \
    || die "$tool is missing (apt-get install -y postgresql-client postgresql-contrib redis-server nginx-light wrk gettext-base curl python3)"
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
  echo "nginx=$("$NGINX" -v 2>&1 | sed 's/nginx version: //')"
  echo "redis=Redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
  echo "pgbench=$(pgbench --version | awk '{print $3}')"
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
start_redis() {
  REDIS_PORT=$(free_port)
  mkdir -p "$SCRATCH/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$SCRATCH/redis" --logfile "$SCRATCH/redis/redis.log" >/dev/null 2>&1 &
  PID[redis]=$!
  STARTED+=("${PID[redis]}")
  note_server "redis-server --port $REDIS_PORT --bind 127.0.0.1 --save \"\" --appendonly no   # own instance, not the shared :6379"
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
  cmdtxt=$(printf '%q ' "$@" | sed "s#$SCRATCH#\$SCRATCH#g; s#$ROOT/##g; s#$TOKEN#\$TOKEN#g; s#with_commits [^ ]* [^ ]* -- ##")
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
# Report.
echo "duration=$(( $(date +%s) - T_START ))" >>"$META"
log "== results"
# bench/PROFILE.md (profile findings and micro-benchmarks, written by hand) is
# appended to the report when present.
BENCH_NOTES="${BENCH_NOTES:-$ROOT/bench/PROFILE.md}" py render "$RESULTS" "$META" "$OUT" "$QUICK"
cp "$RESULTS" "$SCRATCH/../incbench-last-results.jsonl" 2>/dev/null || true
log "wrote $OUT ($(( $(date +%s) - T_START )) s); raw results: /tmp/incbench-last-results.jsonl"
