#!/usr/bin/env python3
"""Per-instance shares for scripts/e2e-scale.sh (Python 3 standard library
only). The load itself and the exact-total check are bench's `loadgen`
(`--verify`, with its accounting of ambiguous answers).

Subcommands:

  count202  prints an instance's increment_http_requests_total for
            route="/increment", status="202" (read from its /metrics).
  shares    prints each instance's share of the 202s, from its /metrics and
            from nginx's access log, and fails if one of them served none.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import urllib.request


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
