#!/usr/bin/env python3
"""Helpers of scripts/bench.sh: CPU snapshots of the machine and of the
benchmark's processes, parsers of each load tool's output, the result
records, and the BENCHMARKS.md report. Tested by
scripts/test_bench_helpers.py (`python3 -m unittest discover -s scripts`).

Usage: bench_helpers.py COMMAND ARGS... (see the bottom of this file).
"""
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
        if any(r.get("journal_messages") for r in rs):
            notes.append(f"journal {fmt(median_of(rs, 'journal_msgs_per_s'))} messages/s, "
                         f"{fmt(median_of(rs, 'requests_per_message'), 1)} requests/message"
                         + (f", stream {fmt(median_of(rs, 'stream_bytes_per_message'))} B/message = "
                            f"{fmt(median_of(rs, 'stream_bytes_per_increment'), 1)} B/increment"
                            if median_of(rs, "stream_bytes_per_message") else ""))
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

    def ratio(name, num, den, target, sense=">=", nd=0):
        if num is None or den is None or den == 0:
            targets.append([name, fmt(num, nd), fmt(den, nd), "–", f"{sense} {target}", "n/a"])
            return
        r = num / den
        ok = r >= target if sense == ">=" else r <= target
        targets.append([name, fmt(num, nd), fmt(den, nd), f"{r:.2f}×", f"{sense} {target}×", "PASS" if ok else "FAIL"])

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

    if med("journal", "journal_hot") is not None:
        for k, redis in (("hot", "redis_aof_everysec"), ("uniform", "redis_aof_everysec_r100k")):
            j = med("journal", f"journal_{k}")
            ratio(f"journal {k}: journal / write-behind (same binary)", j, med("journal", f"write_behind_{k}"), 0.5)
            ratio(f"journal {k}: journal / redis INCR appendfsync everysec (stretch)", j, med("journal", redis), 1.0)
        for k in ("hot", "uniform"):
            absolute(f"journal p99 at half the journal max rate, {k} keys (open loop)", med("journal", f"half_journal_{k}", "p99_ms"), 10, "ms")
        for cfg in ("journal_hot", "journal_uniform", "half_journal_hot", "half_journal_uniform"):
            rs = select(results, "journal", cfg)
            # Over the whole window (the load and its 2.5 s tail): one flush
            # per 1 s interval plus one writer-lease renewal every 2 s = 1.5/s.
            cps = [(r["commits"] - r.get("autovac", 0)) / (r["load_s"] + 2.5) for r in rs if r.get("load_s") and "commits" in r]
            if cps:
                absolute(f"commits/s during {cfg} ({fmt(med('journal', cfg))} req/s; over load + 2.5 s tail, worst run, autovacuum excluded)", max(cps), 2.0, "/s")

    if med("keys", "service_uniform") is not None:
        # Issue 16: each distribution against the floor on the same keys.
        ratio("keys, 100k uniform, flush deferred (intake alone): service / poem floor", med("keys", "service_uniform_deferred"), med("keys", "floor_uniform"), 0.85)
        ratio("keys, 100k uniform, default 1 s flush: service / poem floor", med("keys", "service_uniform"), med("keys", "floor_uniform"), 0.75)
        ratio("keys, zipf over 100k: service / poem floor", med("keys", "service_zipf"), med("keys", "floor_zipf"), 0.85)
        ratio("keys, hot: service / poem floor", med("keys", "service_hot"), med("keys", "floor_hot"), 0.85)
        for k in ("hot", "zipf", "uniform"):
            ratio(f"keys, p99 at half the maximum, {k}: service / floor at the same rate (open loop)",
                  med("keys", f"half_service_{k}", "p99_ms"), med("keys", f"half_floor_{k}", "p99_ms"), 1.5, "<=", nd=2)
        rs = select(results, "keys", "service_uniform_1m")
        if rs:
            absolute(f"keys, 1M uniform: memory per pending key ({fmt(median_of(rs, 'rate'))} req/s, {fmt(median_of(rs, 'pending'))} keys pending)",
                     median_of(rs, "bytes_per_key"), 300, "B/key", nd=0)

    if med("keyed", "keyed_hot") is not None:
        for k in ("hot", "uniform"):
            ratio(f"Idempotency-Key, {k}: keyed / plain requests (same service)", med("keyed", f"keyed_{k}"), med("keyed", f"plain_{k}"), 0.5)
            if med("keyed", f"keyed_nolookup_{k}") is not None:
                ratio(f"Idempotency-Key, {k}, --idempotency-lookup false: keyed / plain requests", med("keyed", f"keyed_nolookup_{k}"), med("keyed", f"plain_{k}"), 0.5)
        v = [r.get("verify") for r in results if r.get("scenario") == "keyed" and isinstance(r.get("verify"), dict)]
        okc = sum(1 for x in v if x.get("status") == "ok")
        targets.append(["keyed totals exact (--verify, every run)", f"{okc}/{len(v)} runs", "", "", "all", "PASS" if v and okc == len(v) else "FAIL"])

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
