#!/usr/bin/env python3
"""Load and checks for scripts/e2e-scale.sh (Python 3 standard library only).

Subcommands:

  load      POST /increment many times over keep-alive HTTP/1.1 connections
            (asyncio, raw sockets). Hot and cold keys, random positive and
            negative values. Prints requests/s and status counts, and writes a
            JSON file with the expected sum of each key, counting only the
            requests answered 202.
  check     compares that JSON with the counters table (a CSV dump), key by
            key.
  count202  prints an instance's increment_http_requests_total for
            route="/increment", status="202" (read from its /metrics).
  shares    prints each instance's share of the 202s, from its /metrics and
            from nginx's access log, and fails if one of them served none.

Which outcomes count:
  202                 the increment was accepted. It goes into the expected
                      sums and must be in the database exactly once.
  other HTTP statuses the service or nginx refused the request, so nothing was
                      applied. None are expected: each one is reported and
                      fails `check`.
  ambiguous           502 or 504 from nginx, or the connection broke after the
                      request was sent, or no answer in time. The request
                      reached an instance that may or may not have applied it.
                      nginx never resends a POST once it has sent it
                      (proxy_next_upstream without non_idempotent), so it is
                      applied at most once. `check` records each one with its
                      key and value and accepts a key's stored value only if
                      it equals the 202 sum plus some subset of that key's
                      ambiguous values (usually none, or exactly one). There
                      must be at most --max-ambiguous of them. Only requests in
                      flight when an instance stops can become ambiguous, so
                      the bound is the number of connections.
  unsent              the connection to nginx could not be opened, so nothing
                      was sent. Reported as a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import json
import os
import random
import re
import sys
import time
import urllib.request


# --------------------------------------------------------------------------
# load


class LoadState:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.total = args.requests
        self.issued = 0
        self.done = 0
        self.rng = random.Random(args.seed)
        self.hot = [f"{args.key_prefix}:hot:{i}" for i in range(args.hot_keys)]
        self.cold = [f"{args.key_prefix}:cold:{i}" for i in range(args.cold_keys)]
        self.expected: dict[str, int] = collections.defaultdict(int)
        self.statuses: collections.Counter[str] = collections.Counter()
        self.ambiguous: list[tuple[str, int, str]] = []
        self.unsent = 0
        self.unsent_reasons: collections.Counter[str] = collections.Counter()
        self.connections_opened = 0
        self.gate_index = int(self.total * args.gate_at) if args.gate_file else self.total + 1
        self.gate_waited = 0.0
        self.gate_timed_out = False
        self.deadline = time.monotonic() + args.max_seconds
        self.stopped_by_deadline = False
        self.host_header = args.target.encode()

    def next_increment(self) -> tuple[str, int] | None:
        if self.issued >= self.total:
            return None
        if time.monotonic() > self.deadline:
            self.stopped_by_deadline = True
            return None
        self.issued += 1
        rng = self.rng
        if rng.random() < self.args.hot_share:
            key = self.hot[rng.randrange(len(self.hot))]
        else:
            key = self.cold[rng.randrange(len(self.cold))]
        value = rng.randint(1, self.args.max_value)
        if rng.random() < 0.5:
            value = -value
        return key, value

    def request_bytes(self, key: str, value: int) -> bytes:
        body = json.dumps({"key": key, "value": value}, separators=(",", ":")).encode()
        head = (
            b"POST /increment HTTP/1.1\r\nHost: " + self.host_header +
            b"\r\nContent-Type: application/json\r\nContent-Length: " +
            str(len(body)).encode() + b"\r\n\r\n"
        )
        return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Reads one response; returns (status, whether the server closes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ConnectionError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    length = 0
    chunked = False
    close = parts[0] == "HTTP/1.0"
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "connection":
            lowered = value.lower()
            if "close" in lowered:
                close = True
            elif "keep-alive" in lowered:
                close = False
    if chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


async def gate(state: LoadState) -> None:
    """Waits at the gate index until the gate file exists (or the timeout)."""
    args = state.args
    if os.path.exists(args.gate_file) or state.gate_timed_out:
        return
    started = time.monotonic()
    print(f"load: holding at {state.gate_index} requests until {args.gate_file} exists",
          flush=True)
    while not os.path.exists(args.gate_file):
        if time.monotonic() - started > args.gate_timeout:
            state.gate_timed_out = True
            print("load: gate timed out; going on", flush=True)
            break
        await asyncio.sleep(0.05)
    state.gate_waited = max(state.gate_waited, time.monotonic() - started)


async def worker(state: LoadState) -> None:
    args = state.args
    host, _, port = args.target.rpartition(":")
    reader = writer = None
    try:
        while True:
            if state.issued >= state.gate_index:
                await gate(state)
            increment = state.next_increment()
            if increment is None:
                return
            key, value = increment
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, int(port)), args.timeout)
                    state.connections_opened += 1
                except (OSError, asyncio.TimeoutError) as e:
                    state.unsent += 1
                    state.unsent_reasons[type(e).__name__] += 1
                    state.done += 1
                    await asyncio.sleep(0.05)
                    continue
            try:
                writer.write(state.request_bytes(key, value))
                status, close = await asyncio.wait_for(read_response(reader), args.timeout)
            except (OSError, EOFError, ConnectionError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError) as e:
                reason = "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
                state.ambiguous.append((key, value, reason))
                state.statuses[f"error:{reason}"] += 1
                state.done += 1
                writer.close()
                reader = writer = None
                continue
            state.done += 1
            state.statuses[str(status)] += 1
            if status == 202:
                state.expected[key] += value
            elif status in (502, 504):
                state.ambiguous.append((key, value, str(status)))
            if close:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def progress(state: LoadState, started: float) -> None:
    args = state.args
    last_print = started
    last_done = 0
    while True:
        await asyncio.sleep(0.25)
        now = time.monotonic()
        if args.progress_file:
            tmp = args.progress_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{state.done}\n")
            os.replace(tmp, args.progress_file)
        if now - last_print >= 5:
            rate = (state.done - last_done) / (now - last_print)
            print(f"load: {state.done}/{state.total} done, {rate:,.0f} req/s now, "
                  f"statuses {dict(sorted(state.statuses.items()))}", flush=True)
            last_print, last_done = now, state.done


async def run_load(args: argparse.Namespace) -> LoadState:
    state = LoadState(args)
    started = time.monotonic()
    reporter = asyncio.create_task(progress(state, started))
    await asyncio.gather(*(worker(state) for _ in range(args.concurrency)))
    reporter.cancel()
    state.seconds = time.monotonic() - started
    return state


def cmd_load(args: argparse.Namespace) -> int:
    if args.gate_file and os.path.exists(args.gate_file):
        os.remove(args.gate_file)
    print(f"load: {args.requests} POST /increment to {args.target} on {args.concurrency} "
          f"keep-alive connections; {args.hot_share:.0%} on {args.hot_keys} hot keys, the rest "
          f"over {args.cold_keys} cold keys; values +-1..{args.max_value}", flush=True)
    state = asyncio.run(run_load(args))
    if args.progress_file:
        with open(args.progress_file, "w") as f:
            f.write(f"{state.done}\n")
    ok_202 = state.statuses.get("202", 0)
    rate = state.done / state.seconds if state.seconds else 0.0
    result = {
        "target": args.target,
        "key_prefix": args.key_prefix,
        "requests_planned": state.total,
        "requests_done": state.done,
        "seconds": round(state.seconds, 3),
        "requests_per_second": round(rate, 1),
        "connections_opened": state.connections_opened,
        "statuses": dict(sorted(state.statuses.items())),
        "accepted_202": ok_202,
        "ambiguous": state.ambiguous,
        "unsent": state.unsent,
        "unsent_reasons": dict(state.unsent_reasons),
        "gate_waited_seconds": round(state.gate_waited, 3),
        "gate_timed_out": state.gate_timed_out,
        "stopped_by_deadline": state.stopped_by_deadline,
        "expected": dict(state.expected),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"load: {state.done} requests in {state.seconds:.1f}s = {rate:,.0f} requests/s; "
          f"{state.connections_opened} connections opened", flush=True)
    print(f"load: statuses {result['statuses']}; ambiguous {len(state.ambiguous)}; "
          f"unsent {state.unsent}", flush=True)
    if state.gate_waited:
        print(f"load: held {state.gate_waited:.1f}s at the gate", flush=True)
    return 0


# --------------------------------------------------------------------------
# check


def subset_sums(values: list[int], limit: int = 1 << 16) -> set[int] | None:
    """Every sum of a subset of values; None if there would be too many."""
    sums = {0}
    for v in values:
        sums |= {s + v for s in sums}
        if len(sums) > limit:
            return None
    return sums


def cmd_check(args: argparse.Namespace) -> int:
    with open(args.expected) as f:
        load = json.load(f)
    expected: dict[str, int] = load["expected"]
    prefix = load["key_prefix"] + ":"
    stored: dict[str, int] = {}
    with open(args.db_csv, newline="") as f:
        for row in csv.reader(f):
            if row:
                stored[row[0]] = int(row[1])
    ambiguous: dict[str, list[int]] = collections.defaultdict(list)
    for key, value, _reason in load["ambiguous"]:
        ambiguous[key].append(value)

    failures: list[str] = []
    foreign = [k for k in stored if not k.startswith(prefix)]
    if foreign:
        failures.append(f"{len(foreign)} keys in the database that the load never sent, "
                        f"e.g. {foreign[:3]}")

    mismatches: list[str] = []
    applied_ambiguous = 0
    undecided = 0
    keys = set(expected) | set(stored) | set(ambiguous)
    for key in sorted(keys):
        want = expected.get(key, 0)
        got = stored.get(key, 0)
        diff = got - want
        maybe = ambiguous.get(key, [])
        if diff == 0:
            continue
        if maybe:
            sums = subset_sums(maybe)
            if sums is None:
                undecided += 1
                if min(0, sum(v for v in maybe if v < 0)) <= diff <= sum(v for v in maybe if v > 0):
                    continue
            elif diff in sums:
                applied_ambiguous += 1
                continue
        mismatches.append(f"{key}: stored {got}, expected {want} "
                          f"(difference {diff}; ambiguous values here: {maybe or 'none'})")

    statuses = load["statuses"]
    unexpected = {s: n for s, n in statuses.items()
                  if s != "202" and s not in ("502", "504") and not s.startswith("error:")}
    n_ambiguous = len(load["ambiguous"])
    exp_total = sum(expected.values())
    got_total = sum(stored.values())

    print("check: keys compared:         ", len(keys))
    print("check: keys with 202s:        ", len(expected))
    print("check: rows in counters:      ", len(stored))
    print("check: sum of 202 values:     ", exp_total)
    print("check: sum stored:            ", got_total)
    print("check: ambiguous requests:    ", n_ambiguous,
          f"(on {len(ambiguous)} keys; explained as applied on {applied_ambiguous} keys, "
          f"as not applied on the others)")
    if undecided:
        print(f"check: {undecided} keys had too many ambiguous values for an exact subset "
              "check; checked against the range instead")
    if load["requests_done"] != load["requests_planned"]:
        failures.append(f"the load finished {load['requests_done']} of "
                        f"{load['requests_planned']} requests")
    if load.get("stopped_by_deadline"):
        failures.append("the load hit its time limit")
    if load.get("gate_timed_out"):
        failures.append("the restarted instance was not back in time (gate timed out)")
    if unexpected:
        failures.append(f"unexpected statuses (not applied): {unexpected}")
    if load["unsent"]:
        failures.append(f"{load['unsent']} requests could not be sent to nginx "
                        f"({load['unsent_reasons']})")
    if n_ambiguous > args.max_ambiguous:
        failures.append(f"{n_ambiguous} ambiguous requests (502/504/broken connections), "
                        f"more than the bound {args.max_ambiguous}")
    if mismatches:
        failures.append(f"{len(mismatches)} keys differ from the sum of their 202s:\n    " +
                        "\n    ".join(mismatches[:20]))
    if args.rejected_rows:
        failures.append(f"{args.rejected_rows} rows in rejected_increments")
    for failure in failures:
        print("check: FAILED:", failure)
    if not failures:
        print(f"check: OK: every key's stored value equals the sum of its 202 increments "
              f"({len(expected)} keys, {load['accepted_202']} increments)")
    return 1 if failures else 0


# --------------------------------------------------------------------------
# metrics and shares

METRIC_LINE = re.compile(r'^increment_http_requests_total\{([^}]*)\}\s+(\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def count_202(metrics_url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if not m:
            continue
        labels = dict(LABEL.findall(m.group(1)))
        if labels.get("route") == "/increment" and labels.get("status") == "202":
            total += float(m.group(2))
    return int(total)


def cmd_count202(args: argparse.Namespace) -> int:
    print(count_202(args.url))
    return 0


def nginx_log_counts(path: str) -> collections.Counter[str]:
    """202s of POST /increment per instance address, from the access log."""
    counts: collections.Counter[str] = collections.Counter()
    fields = re.compile(r'(\w+)=("[^"]*"|\S+)')
    with open(path, errors="replace") as f:
        for line in f:
            kv = {k: v.strip('"') for k, v in fields.findall(line)}
            if kv.get("status") != "202" or not kv.get("req", "").startswith("POST /increment "):
                continue
            # After a retry: "a:1, b:2"; the last one answered.
            counts[kv.get("upstream", "-").split(",")[-1].strip()] += 1
    return counts


def cmd_shares(args: argparse.Namespace) -> int:
    log_counts = nginx_log_counts(args.access_log) if args.access_log else collections.Counter()
    rows = []
    for spec in args.instance:
        # NAME=HOST:PORT or NAME=HOST:PORT+EARLIER (202s of earlier incarnations)
        name, _, rest = spec.partition("=")
        addr, _, earlier = rest.partition("+")
        current = count_202(f"http://{addr}/metrics")
        rows.append((name, addr, current, int(earlier or 0)))
    total = sum(r[2] + r[3] for r in rows)
    print("shares: POST /increment answered 202, per instance")
    print(f"shares: {'instance':<10} {'address':<22} {'metrics':>9} {'earlier':>9} "
          f"{'total':>9} {'share':>7} {'nginx log':>10}")
    failures = []
    for name, addr, current, earlier in rows:
        share = (current + earlier) / total if total else 0.0
        logged = log_counts.get(addr, 0)
        print(f"shares: {name:<10} {addr:<22} {current:>9} {earlier:>9} {current + earlier:>9} "
              f"{share:>7.1%} {logged:>10}")
        if current <= 0:
            failures.append(f"{name} ({addr}) served no 202 since it (re)started")
        if args.access_log:
            # An instance that ran throughout answered exactly what nginx
            # logged for it. One that was restarted lost its earlier counter;
            # the snapshot taken before SIGTERM is a lower bound.
            if earlier == 0 and current != logged:
                failures.append(f"{name} ({addr}): /metrics says {current} 202s, "
                                f"nginx logged {logged}")
            if earlier and current + earlier > logged:
                failures.append(f"{name} ({addr}): /metrics says {current + earlier} 202s, "
                                f"more than nginx logged ({logged})")
    log_total = sum(log_counts.values())
    print(f"shares: total {total} from /metrics ('earlier' = snapshot of a stopped "
          f"incarnation just before SIGTERM, a lower bound); nginx log {log_total}; "
          f"client saw {args.client_202}")
    if args.access_log and args.client_202 and log_total != args.client_202:
        failures.append(f"nginx logged {log_total} 202s for POST /increment, "
                        f"the client counted {args.client_202}")
    for failure in failures:
        print("shares: FAILED:", failure)
    return 1 if failures else 0


# --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("load", help="send increments, write the expected sums")
    p.add_argument("--target", required=True, help="HOST:PORT of nginx")
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--hot-keys", type=int, default=10)
    p.add_argument("--cold-keys", type=int, default=10_000)
    p.add_argument("--hot-share", type=float, default=0.5)
    p.add_argument("--max-value", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--key-prefix", required=True)
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--progress-file", help="rewritten with the number of finished requests")
    p.add_argument("--gate-file", help="hold at --gate-at until this file exists")
    p.add_argument("--gate-at", type=float, default=0.75)
    p.add_argument("--gate-timeout", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("check", help="compare the expected sums with the database")
    p.add_argument("--expected", required=True)
    p.add_argument("--db-csv", required=True, help="key,value rows of the counters table")
    p.add_argument("--max-ambiguous", type=int, default=64)
    p.add_argument("--rejected-rows", type=int, default=0)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("count202", help="an instance's 202s for POST /increment")
    p.add_argument("--url", required=True, help="the instance's /metrics URL")
    p.set_defaults(func=cmd_count202)

    p = sub.add_parser("shares", help="per-instance shares; fail if one served none")
    p.add_argument("--instance", action="append", required=True,
                   help="NAME=HOST:PORT[+EARLIER]")
    p.add_argument("--access-log")
    p.add_argument("--client-202", type=int, default=0)
    p.set_defaults(func=cmd_shares)

    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
