#!/usr/bin/env python3
"""Checks the Grafana dashboards against a live `increment` and Prometheus.

Used by scripts/check-dashboard.sh; each subcommand is one step:

  selftest          the PromQL tokenizer and the panel walker on known inputs
  static            dashboard structure; Prometheus queries through the
                    $datasource variable (importable into any Grafana), other
                    datasources provisioned; the $job and $instance variables
  render-config     the local Prometheus config derived from prometheus.yml
                    (its alerting rules included)
  wait-target       until Prometheus scrapes the service successfully
  check             static checks and every expression evaluated through
                    Prometheus's HTTP API, with the variables substituted
                    ($job and $instance from their own queries; metric names
                    and $job/$instance filters are Rust tests:
                    `cargo test --test shipped`)
  rules             every alerting rule loaded and evaluated without error,
                    and none pending or firing on the healthy instance

Only the standard library and PyYAML.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import yaml

# --------------------------------------------------------------------------
# PromQL tokenizer and metric-name extraction
# --------------------------------------------------------------------------

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh",
    "atan", "atanh", "avg_over_time", "ceil", "changes", "clamp", "clamp_max",
    "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv",
    "double_exponential_smoothing", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "hour", "idelta", "increase", "info", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month",
    "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad",
    "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort",
    "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh",
    "time", "timestamp", "vector", "year",
    # only after `@`
    "start", "end",
}
# Followed by a parenthesised list of label names (group_left/right may
# also stand alone).
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OTHER_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

_DURATION = r"(?:\d+(?:ms|s|m|h|d|w|y))+"
_NUMBER = r"(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>""" + _DURATION + r""")(?![A-Za-z0-9_.])
  | (?P<number>""" + _NUMBER + r""")(?![A-Za-z_:])
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],@:])
    """,
    re.VERBOSE,
)


class PromQLError(Exception):
    pass


@dataclass
class Token:
    kind: str
    value: str
    pos: int


def tokenize(expr: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if not m:
            raise PromQLError(f"cannot tokenize at offset {pos}: {expr[pos:pos + 20]!r}")
        kind = m.lastgroup
        if kind not in ("ws", "comment"):
            tokens.append(Token(kind, m.group(), pos))
        pos = m.end()
    return tokens


def _matching(tokens: list[Token], i: int, open_: str, close: str) -> int:
    """Index of the token closing the bracket opened at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j].kind == "op":
            if tokens[j].value == open_:
                depth += 1
            elif tokens[j].value == close:
                depth -= 1
                if depth == 0:
                    return j
    raise PromQLError(f"unbalanced {open_!r} at offset {tokens[i].pos}")


def _unquote(s: str) -> str:
    if s.startswith("`"):
        return s[1:-1]
    return bytes(s[1:-1], "utf-8").decode("unicode_escape")


@dataclass
class Selector:
    """One vector selector: its metric name and its label matchers."""

    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a PromQL expression.

    Function and aggregation names, keywords, label names (in matchers and in
    by/without/on/ignoring/group_* lists), strings, numbers and durations are
    dropped; what remains are metric names, each with its matchers.
    """
    tokens = tokenize(expr)
    for open_, close in (("(", ")"), ("{", "}"), ("[", "]")):
        depth = 0
        for t in tokens:
            if t.kind == "op" and t.value == open_:
                depth += 1
            elif t.kind == "op" and t.value == close:
                depth -= 1
                if depth < 0:
                    raise PromQLError(f"unexpected {close!r} at offset {t.pos}")
        if depth:
            raise PromQLError(f"unbalanced {open_!r}")

    def matchers_at(i: int) -> tuple[list[tuple[str, str, str]], int]:
        end = _matching(tokens, i, "{", "}")
        inner = tokens[i + 1:end]
        out = []
        k = 0
        while k < len(inner):
            if inner[k].kind == "op" and inner[k].value == ",":
                k += 1
                continue
            if (k + 2 < len(inner) and inner[k].kind in ("ident", "string")
                    and inner[k + 1].kind == "op" and inner[k + 1].value in ("=", "!=", "=~", "!~")
                    and inner[k + 2].kind == "string"):
                label = inner[k].value if inner[k].kind == "ident" else _unquote(inner[k].value)
                out.append((label, inner[k + 1].value, _unquote(inner[k + 2].value)))
                k += 3
                continue
            raise PromQLError(f"bad label matcher at offset {inner[k].pos}")
        return out, end + 1

    found: list[Selector] = []
    i = 0
    n = len(tokens)
    while i < n:
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < n else None
        if t.kind == "op" and t.value == "{":
            # A selector without a metric name: {__name__="x", ...}
            matchers, i = matchers_at(i)
            names = [v for (label, op, v) in matchers if label == "__name__" and op == "="]
            if not names:
                raise PromQLError("selector without a metric name (no __name__ matcher)")
            found.append(Selector(names[0], [m for m in matchers if m[0] != "__name__"]))
            continue
        if t.kind == "op" and t.value == "[":
            i = _matching(tokens, i, "[", "]") + 1  # range or subquery
            continue
        if t.kind != "ident":
            i += 1
            continue
        low = t.value.lower()
        is_call = nxt is not None and nxt.kind == "op" and nxt.value == "("
        if low in LABEL_LIST_KEYWORDS:
            i = _matching(tokens, i + 1, "(", ")") + 1 if is_call else i + 1
            continue
        if low in OTHER_KEYWORDS:
            i += 1
            continue
        if low in AGGREGATIONS and (is_call or (nxt is not None and nxt.kind == "ident"
                                                and nxt.value.lower() in ("by", "without"))):
            i += 1
            continue
        if is_call:
            if t.value not in FUNCTIONS:
                raise PromQLError(f"unknown function {t.value!r}")
            i += 1
            continue
        sel = Selector(t.value)
        i += 1
        if i < n and tokens[i].kind == "op" and tokens[i].value == "{":
            sel.matchers, i = matchers_at(i)
        found.append(sel)
    return found


def metric_names(expr: str) -> list[str]:
    names: list[str] = []
    for s in selectors(expr):
        if s.name not in names:
            names.append(s.name)
    return names


# --------------------------------------------------------------------------
# Grafana variables
# --------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)(?::[\w]+)?\]\]")


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise PromQLError(f"unknown Grafana variable ${name}")
        return values[name]

    return _VAR_RE.sub(repl, expr)


def builtin_values(rate_interval: str) -> dict[str, str]:
    return {
        "__rate_interval": rate_interval,
        "__interval": "5s",
        "__interval_ms": "5000",
        "__range": "1m",
        "__range_s": "60",
        "__range_ms": "60000",
    }


# --------------------------------------------------------------------------
# Dashboard structure
# --------------------------------------------------------------------------


def walk_panels(panels: list[dict], path: str = "") -> list[tuple[str, dict]]:
    """Every panel, including those nested in (collapsed) rows."""
    out = []
    for n, p in enumerate(panels or []):
        where = f"{path}panels[{n}]"
        out.append((where, p))
        if p.get("panels"):
            out.extend(walk_panels(p["panels"], f"{where}."))
    return out


@dataclass
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str


@dataclass
class StaticResult:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)
    variables: list[tuple[str, dict]] = field(default_factory=list)  # (dashboard, variable)
    panel_count: int = 0


def load_datasources(path: str) -> dict[str, str]:
    """uid -> type from a Grafana datasource provisioning file."""
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    out = {}
    if not doc.get("datasources"):
        raise ValueError(f"{path}: no datasources")
    for ds in doc["datasources"]:
        for key in ("name", "type", "uid", "url"):
            if not ds.get(key):
                raise ValueError(f"{path}: datasource {ds!r} has no {key}")
        if ds["uid"] in out:
            raise ValueError(f"{path}: duplicate datasource uid {ds['uid']!r}")
        out[ds["uid"]] = ds["type"]
    return out


def check_providers(path: str) -> list[str]:
    """Errors in a Grafana dashboard provider provisioning file."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: {e}"]
    errors = []
    providers = doc.get("providers") or []
    if doc.get("apiVersion") != 1:
        errors.append(f"{path}: apiVersion is not 1")
    files = [p for p in providers if p.get("type", "file") == "file"]
    if not files:
        errors.append(f"{path}: no file provider")
    for p in files:
        where = (p.get("options") or {}).get("path", "")
        if not p.get("name") or not where.startswith("/"):
            errors.append(f"{path}: provider {p.get('name')!r} needs a name and an absolute options.path")
    return errors


def static_check(dashboard_paths: list[str], datasources: dict[str, str], rate_interval: str) -> StaticResult:
    r = StaticResult()
    if not dashboard_paths:
        r.errors.append("no dashboards found")
    for dpath in dashboard_paths:
        try:
            with open(dpath) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            r.errors.append(f"{dpath}: not readable JSON: {e}")
            continue
        for key in ("uid", "title", "schemaVersion", "panels"):
            if key not in d:
                r.errors.append(f"{dpath}: no {key!r}")
        variables = {v.get("name"): v for v in (d.get("templating") or {}).get("list") or []}
        # A datasource variable stands for any datasource of its type: the
        # uid "${name}" is as good as a provisioned one, and Prometheus
        # queries must use it, so the dashboard imports into any Grafana.
        chosen_ds = {}
        for name, v in variables.items():
            if v.get("type") == "datasource":
                chosen_ds[f"${{{name}}}"] = chosen_ds[f"${name}"] = v.get("query")
        if "prometheus" not in chosen_ds.values():
            r.errors.append(f"{dpath}: no datasource variable of type prometheus (query \"prometheus\")")
        dashboard_ds = {**datasources, **chosen_ds}
        known_vars = dict(builtin_values(rate_interval))
        for name, v in variables.items():
            known_vars[name] = "<var>"
            ds = v.get("datasource")
            if v.get("type") == "query":
                if not isinstance(ds, dict) or ds.get("uid") not in dashboard_ds:
                    r.errors.append(f"{dpath}: variable ${name}: datasource {ds!r} is neither a datasource variable nor provisioned")
                elif dashboard_ds[ds["uid"]] == "prometheus" and ds["uid"] not in chosen_ds:
                    r.errors.append(f"{dpath}: variable ${name}: hard-coded Prometheus datasource {ds['uid']!r}; use ${{datasource}}")
                r.variables.append((dpath, v))
        job = variables.get("job")
        if not job or job.get("type") != "query":
            r.errors.append(f"{dpath}: no query variable 'job'")
        else:
            q = job.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if not (q and "label_values(" in q and "job" in q):
                r.errors.append(f"{dpath}: $job is not a label_values(..., job) query: {q!r}")
            if job.get("multi") or job.get("includeAll"):
                r.errors.append(f"{dpath}: $job must take one value (job=\"$job\")")
        inst = variables.get("instance")
        if not inst:
            r.errors.append(f"{dpath}: no template variable 'instance'")
        else:
            q = inst.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if not (q and "label_values(" in q and "instance" in q):
                r.errors.append(f"{dpath}: $instance is not a label_values(..., instance) query: {q!r}")
            if not (inst.get("multi") and inst.get("includeAll")):
                r.errors.append(f"{dpath}: $instance must be multi-value and include All")

        seen_ids: dict[int, str] = {}
        for where, p in walk_panels(d.get("panels") or []):
            r.panel_count += 1
            title = p.get("title")
            label = f"{dpath}: {where} {title!r}"
            ptype = p.get("type")
            if not ptype:
                r.errors.append(f"{label}: no type")
            if not title:
                r.errors.append(f"{label}: no title")
            if "id" in p:
                if p["id"] in seen_ids:
                    r.errors.append(f"{label}: id {p['id']} already used by {seen_ids[p['id']]}")
                seen_ids[p["id"]] = where
            if "gridPos" not in p:
                r.warnings.append(f"{label}: no gridPos")
            targets = p.get("targets") or []
            ds = p.get("datasource")
            panel_ds_type = None
            if ds is None:
                if targets or ptype not in ("text", "row"):
                    r.errors.append(f"{label}: no datasource")
            elif not isinstance(ds, dict):
                r.errors.append(f"{label}: datasource {ds!r} is not a {{type, uid}} object")
            elif ds.get("uid") == "-- Mixed --":
                panel_ds_type = "mixed"
            elif ds.get("uid") not in dashboard_ds:
                r.errors.append(f"{label}: datasource uid {ds.get('uid')!r} is neither a datasource variable "
                                f"{sorted(chosen_ds)} nor provisioned {sorted(datasources)}")
            else:
                panel_ds_type = dashboard_ds[ds["uid"]]
                if panel_ds_type == "prometheus" and ds["uid"] not in chosen_ds:
                    r.errors.append(f"{label}: hard-coded Prometheus datasource {ds['uid']!r}; use ${{datasource}}")
                if ds.get("type") and ds["type"] != panel_ds_type:
                    r.errors.append(f"{label}: datasource type {ds['type']!r} but uid {ds['uid']!r} is a {panel_ds_type}")
            if ptype == "row" and targets:
                r.errors.append(f"{label}: a row with targets")
            for t in targets:
                ref = t.get("refId") or "?"
                tds = t.get("datasource") or ds
                tlabel = f"{label} [{ref}]"
                if not t.get("refId"):
                    r.errors.append(f"{tlabel}: target without refId")
                if not isinstance(tds, dict) or tds.get("uid") not in dashboard_ds:
                    r.errors.append(f"{tlabel}: target datasource {tds!r} is neither a datasource variable nor provisioned")
                    continue
                tds_type = dashboard_ds[tds["uid"]]
                if tds_type == "prometheus" and tds["uid"] not in chosen_ds:
                    r.errors.append(f"{tlabel}: hard-coded Prometheus datasource {tds['uid']!r}; use ${{datasource}}")
                if panel_ds_type not in (None, "mixed") and tds_type != panel_ds_type:
                    r.errors.append(f"{tlabel}: target datasource {tds['uid']!r} differs from the panel's")
                if tds_type == "prometheus":
                    expr = (t.get("expr") or "").strip()
                    if not expr:
                        r.errors.append(f"{tlabel}: prometheus target without an expression")
                        continue
                    r.queries.append(Query(dpath, title or where, ref, expr))
                    try:
                        # $instance stays inside its string; the rest must be known.
                        text = substitute(expr, {**known_vars, **{k: f"${k}" for k in variables}})
                        sels = selectors(text)
                    except PromQLError as e:
                        r.errors.append(f"{tlabel}: {e}: {expr}")
                        continue
                    # Names and $instance filters: `cargo test --test shipped`.
                    if not sels:
                        r.errors.append(f"{tlabel}: no metric in {expr}")
                elif tds_type == "tempo":
                    if not (t.get("query") or "").strip():
                        r.errors.append(f"{tlabel}: tempo target without a query")
                else:
                    r.errors.append(f"{tlabel}: no check for datasource type {tds_type!r}")
        for link in d.get("links") or []:
            if not link.get("title") or not (link.get("url") or link.get("type") == "dashboards"):
                r.errors.append(f"{dpath}: dashboard link {link!r} has no title or url")
    return r


# --------------------------------------------------------------------------
# Prometheus config rendering
# --------------------------------------------------------------------------


def render_config(source: str, out: str, job: str, target: str, self_target: str, interval: str) -> None:
    with open(source) as f:
        cfg = yaml.safe_load(f)
    jobs = cfg.get("scrape_configs") or []
    ours = [j for j in jobs if j.get("job_name") == job]
    if len(ours) != 1:
        raise SystemExit(f"{source}: expected exactly one scrape job {job!r}, found {len(ours)}")
    scrape = ours[0]
    if not scrape.get("dns_sd_configs"):
        raise SystemExit(f"{source}: job {job!r} has no dns_sd_configs (replica discovery)")
    sd_keys = [k for k in scrape if k.endswith("_sd_configs") or k == "static_configs"]
    for k in sd_keys:
        del scrape[k]
    scrape["static_configs"] = [{"targets": [target]}]
    scrape.setdefault("metrics_path", "/metrics")
    for k in ("scrape_interval", "scrape_timeout"):
        scrape.pop(k, None)
    glob_cfg = cfg.setdefault("global", {})
    glob_cfg["scrape_interval"] = interval
    glob_cfg["evaluation_interval"] = interval
    glob_cfg.pop("scrape_timeout", None)  # defaults to min(10s, scrape_interval)
    others = [j for j in jobs if j is not scrape]
    for j in others:
        # Other jobs (Prometheus itself) are pointed at our own Prometheus:
        # their process_* series then exist too and a dashboard expression
        # without job="..." would pick them up, which `check` catches.
        for k in [k for k in j if k.endswith("_sd_configs") or k == "static_configs"]:
            del j[k]
        j["static_configs"] = [{"targets": [self_target]}]
        for k in ("scrape_interval", "scrape_timeout"):
            j.pop(k, None)
    cfg.pop("remote_write", None)
    cfg.pop("alerting", None)
    # The rule files stay, made absolute: they are relative to the source.
    base = os.path.dirname(os.path.abspath(source))
    cfg["rule_files"] = [os.path.join(base, pattern) for pattern in cfg.get("rule_files") or []]
    with open(out, "w") as f:
        f.write(f"# Rendered from {source} by scripts/check_dashboard.py render-config.\n")
        yaml.safe_dump(cfg, f, sort_keys=False)


# --------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------


def http_get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def prom_query(base: str, query: str, at: float | None) -> dict:
    params = {"query": query}
    if at is not None:
        params["time"] = f"{at:.3f}"
    url = f"{base}/api/v1/query?{urllib.parse.urlencode(params)}"
    try:
        return http_get_json(url)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except Exception:  # noqa: BLE001
            return {"status": "error", "error": f"HTTP {e.code}"}


def wait_target(prom: str, job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            targets = http_get_json(f"{prom}/api/v1/targets?state=active", timeout=2)["data"]["activeTargets"]
            mine = [t for t in targets if t["labels"].get("job") == job]
            if mine and all(t["health"] == "up" for t in mine):
                print(f"prometheus scrapes {', '.join(t['scrapeUrl'] for t in mine)}: up")
                return
            last = "; ".join(f"{t['scrapeUrl']} {t['health']} {t.get('lastError', '')}" for t in mine) or "no target yet"
        except (OSError, KeyError, ValueError) as e:
            last = str(e)
        time.sleep(0.5)
    raise SystemExit(f"prometheus did not scrape job {job!r} within {timeout}s: {last}")


def rules_check(prom: str, job: str, timeout: float) -> int:
    """Every alerting rule loaded, evaluated without error and inactive, and
    every metric it reads present for `job`.

    The service is healthy under the check's load, so an alert that is
    pending or firing there would page on a healthy service; and an alert
    reading a series the service does not export could never fire.
    """
    deadline = time.monotonic() + timeout
    while True:
        groups = http_get_json(f"{prom}/api/v1/rules?type=alert", timeout=5)["data"]["groups"]
        rules = [(g["file"], r) for g in groups for r in g["rules"]]
        unevaluated = [r["name"] for _, r in rules if r.get("health") == "unknown"]
        if rules and not unevaluated:
            break
        if time.monotonic() >= deadline:
            print(f"  FAIL alerting rules not evaluated within {timeout}s: {unevaluated or 'none loaded'}")
            return 1
        time.sleep(0.5)
    failures = 0
    present: dict[str, bool] = {}
    print(f"\n== alerting rules: {len(rules)} from {sorted({os.path.basename(f) for f, _ in rules})}; "
          f"inputs: the metrics each reads, present for job={job!r}")
    for _, r in rules:
        problems = []
        if r.get("health") != "ok":
            problems.append(f"health {r.get('health')} {r.get('lastError', '')}".rstrip())
        if r.get("state") != "inactive":
            problems.append(f"{r.get('state')} on a healthy instance")
        names = sorted({sel.name for sel in selectors(r["query"])})
        for name in names:
            if name not in present:
                resp = prom_query(prom, f'group({name}{{job="{job}"}})', None)
                present[name] = bool(resp.get("status") == "success" and resp["data"]["result"])
        missing = [n for n in names if not present[n]]
        if missing:
            problems.append(f"no data for {', '.join(missing)}: it could never fire")
        failures += bool(problems)
        detail = "  <- " + "; ".join(problems) if problems else ""
        print(f"  {'FAIL' if problems else 'OK  '} {r['name']}: {r.get('state')}, evaluated in "
              f"{float(r.get('evaluationTime', 0)) * 1000:.2f} ms, inputs {', '.join(names)}{detail}")
    print(f"rules: {len(rules)} alerting rules, {len(present)} metrics read, "
          f"{sum(not v for v in present.values())} without data, {failures} failure(s)")
    return 1 if failures else 0


# --------------------------------------------------------------------------
# The live check
# --------------------------------------------------------------------------


def label_values_query(q: str) -> tuple[str, str | None]:
    """label_values(selector, label) -> (PromQL, label); label_values(label) -> (label, None)."""
    m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", q)
    if m:
        return f"group by ({m.group(2)}) ({m.group(1)})", m.group(2)
    m = re.fullmatch(r"\s*label_values\(\s*(\w+)\s*\)\s*", q)
    if m:
        return m.group(1), None
    raise PromQLError(f"unsupported variable query {q!r}")


def series_summary(data: dict) -> tuple[int, list[dict], int, list[float]]:
    """Series count, their labels, how many are NaN/Inf, the finite values."""
    rtype = data.get("resultType")
    result = data.get("result")
    if rtype == "vector":
        raw = [s["value"][1] for s in result]
    elif rtype == "matrix":
        raw = [(s.get("values") or [[0, "NaN"]])[-1][1] for s in result]
    elif rtype == "scalar":
        raw = [result[1]]
    else:
        return 0, [], 0, []
    values = [float(v) for v in raw]
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    metrics = [s.get("metric", {}) for s in result] if rtype in ("vector", "matrix") else []
    return len(values), metrics, len(values) - len(finite), finite


def fmt(v: float) -> str:
    if v == 0 or 0.01 <= abs(v) < 100000:
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{v:.2e}"


def live_check(args: argparse.Namespace) -> int:
    datasources = load_datasources(args.datasources)
    paths = sorted(p for pattern in args.dashboards for p in glob.glob(pattern))
    st = static_check(paths, datasources, args.rate_interval)
    st.errors.extend(check_providers(args.providers))
    failures = list(st.errors)
    at = args.time

    print(f"\n== structure: {len(paths)} dashboard(s), {st.panel_count} panels, "
          f"{len(st.queries)} PromQL expressions, {len(st.errors)} error(s)")
    for w in st.warnings:
        print(f"  WARN {w}")
    for e in st.errors:
        print(f"  FAIL {e}")

    # Which series exist is checked against the service's declarations by
    # `cargo test --test shipped`; here every expression must return data.

    # Every expression is run twice: with each multi-value variable at All
    # (allValue, or the alternation Grafana builds), and with each at one
    # value. A single-value variable ($job) has one value in both.
    def regex_value(value: str) -> str:
        # As Grafana's Prometheus datasource does: regex-escaped, then
        # escaped again for the double-quoted PromQL string.
        return re.escape(value).replace("\\", "\\\\")

    def plain_value(value: str) -> str:
        # A single value goes in as it is, escaped for the PromQL string.
        return value.replace("\\", "\\\\").replace('"', '\\"')

    def multi(v: dict) -> bool:
        return bool(v.get("multi") or v.get("includeAll"))

    def all_value(v: dict, values: list[str]) -> str:
        if v.get("allValue"):
            return v["allValue"]
        return "(" + "|".join(regex_value(x) for x in values) + ")"

    def one_value(v: dict, values: list[str]) -> str:
        """The variable's saved selection if it is one live value, else its first value."""
        values = values or [""]
        current = (v.get("current") or {}).get("value")
        current = current if isinstance(current, list) else [current]
        if len(current) == 1 and current[0] in values:
            return current[0]
        return values[0]

    # Template variables, in the dashboard's order: a query may use the
    # variables before it ($instance lists the instances of $job).
    var_values: dict[str, list[str]] = {}
    ones: dict[str, str] = {}
    variants = {"all": builtin_values(args.rate_interval), "one": builtin_values(args.rate_interval)}
    print("\n== template variables")
    for dpath, v in st.variables:
        name = v.get("name")
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        try:
            promql, label = label_values_query(substitute(q, variants["all"]))
        except PromQLError as e:
            failures.append(f"{dpath}: ${name}: {e}")
            print(f"  FAIL ${name}: {e}")
            continue
        resp = prom_query(args.prometheus, promql, at)
        values = sorted({s["metric"].get(label or "__name__", "") for s in (resp.get("data") or {}).get("result", [])} - {""}) \
            if resp.get("status") == "success" else []
        ok = resp.get("status") == "success" and values
        ones[name] = one_value(v, values)
        if not multi(v) and ok and ones[name] != (v.get("current") or {}).get("value"):
            ok = False
            resp["error"] = f"its default {(v.get('current') or {}).get('value')!r} is not among them"
        print(f"  {'OK  ' if ok else 'FAIL'} ${name} = {values}  ({promql})")
        if not ok:
            failures.append(f"{dpath}: ${name}: {q} gives no usable values ({resp.get('error', 'empty')})")
        var_values[name] = values
        if multi(v):
            variants["all"][name] = all_value(v, values)
            variants["one"][name] = regex_value(ones[name])
        else:
            variants["all"][name] = variants["one"][name] = plain_value(ones[name])
    instances = set(var_values.get("instance") or [])
    print(f"\n== expressions at {at:.0f} ($__rate_interval={args.rate_interval})")
    print(f"   columns: series with every variable at All / series with "
          f"{', '.join(f'${n}={v}' for n, v in ones.items())}; value range with All")
    rows = []
    for q in st.queries:
        statuses = []
        counts = []
        notes = []
        shown = ""
        for variant, values in variants.items():
            try:
                text = substitute(q.expr, values)
            except PromQLError as e:
                statuses.append(f"invalid: {e}")
                counts.append(0)
                continue
            resp = prom_query(args.prometheus, text, at)
            if resp.get("status") != "success":
                statuses.append(f"invalid: {resp.get('errorType', '')} {resp.get('error', '')}".strip())
                counts.append(0)
                continue
            n, metrics, nans, finite = series_summary(resp["data"])
            counts.append(n)
            if variant == "all" and finite:
                lo, hi = min(finite), max(finite)
                shown = fmt(hi) if lo == hi else f"{fmt(lo)}..{fmt(hi)}"
            if n == 0:
                statuses.append("no data")
                continue
            strays = sorted({m["instance"] for m in metrics if "instance" in m} - instances)
            if strays:
                statuses.append(f"series from outside the {sorted(instances)} instances: {strays}")
                continue
            if nans:
                notes.append(f"{variant}: {nans} NaN/Inf")
            statuses.append("ok")
        ok = all(s == "ok" for s in statuses)
        status = "OK  " if ok else "FAIL"
        detail = "" if ok else "  <- " + "; ".join(f"{v}: {s}" for v, s in zip(variants, statuses) if s != "ok")
        if notes:
            detail += "  (" + ", ".join(notes) + ")"
        rows.append(ok)
        print(f"  {status} {counts[0]:3d} / {counts[1]:3d}  {shown:>17}  {q.panel} [{q.ref}]: {q.expr}{detail}")
        if not ok:
            failures.append(f"{q.panel} [{q.ref}]: {detail.strip(' <-')}")

    print(f"\n== summary: {len(rows)} expressions, {sum(rows)} returned data, {len(rows) - sum(rows)} failed; "
          f"{st.panel_count} panels; {len(failures)} failure(s)")
    for f in failures:
        print(f"  FAIL {f}")
    return 1 if failures else 0


# --------------------------------------------------------------------------
# Self-test
# --------------------------------------------------------------------------


def selftest() -> int:
    cases = {
        'sum by (instance, le) (rate(a_bucket{job="x", instance=~"$i"}[5m]))': ["a_bucket"],
        'histogram_quantile(0.99, sum(rate(b_bucket[1m])) by (le))': ["b_bucket"],
        'time() - max by (instance) (c_ts{instance=~".*"})': ["c_ts"],
        'sum(rate(d_sum[1m])) / on (instance) group_left (version) sum(rate(d_count[1m]))': ["d_sum", "d_count"],
        'rate(e[5m:30s]) offset 1h30m > bool 0 unless on() f': ["e", "f"],
        '{__name__="g", job="x"} + ignoring(job) h:rule:rate5m @ start()': ["g", "h:rule:rate5m"],
        'label_replace(up, "dst", "$1", "instance", "(.*):.*") and Inf': ["up"],
        'count_values("version", i_build_info) or vector(1e3) * 0x1f - NaN': ["i_build_info"],
        'SUM without (by) (j) % 2 ^ -1': ["j"],
    }
    bad = ["sum(rate(x[1m])", "rate(x[1m]))", "foo(x)", 'x{job=}', "{job=\"a\"}", "x{a=~\"b\"", "1 $ 2"]
    failures = 0
    for expr, want in cases.items():
        got = metric_names(expr)
        if got != want:
            print(f"selftest: {expr!r}: got {got}, want {want}")
            failures += 1
    for expr in bad:
        try:
            metric_names(expr)
            print(f"selftest: {expr!r} accepted, should be rejected")
            failures += 1
        except PromQLError:
            pass
    sel = selectors('rate(x{instance=~"$instance", job="a"}[1m])')[0]
    if sel.matchers != [("instance", "=~", "$instance"), ("job", "=", "a")]:
        print(f"selftest: matchers {sel.matchers}")
        failures += 1
    nested = [{"type": "row", "title": "r", "panels": [{"type": "stat", "title": "inner"}]}, {"type": "text", "title": "t"}]
    if [p["title"] for _, p in walk_panels(nested)] != ["r", "inner", "t"]:
        print("selftest: nested panels not walked")
        failures += 1
    if substitute("rate(x{i=~\"${instance:regex}\"}[$__rate_interval])", {"instance": ".*", "__rate_interval": "15s"}) \
            != 'rate(x{i=~".*"}[15s])':
        print("selftest: substitution")
        failures += 1
    if substitute('x{job="$job", instance=~"$instance"}', {"job": "increment", "instance": "(a|b)"}) \
            != 'x{job="increment", instance=~"(a|b)"}':
        print("selftest: substitution of $job")
        failures += 1
    try:
        substitute('x{job="$jobs"}', {"job": "increment"})
        print("selftest: an unknown variable was substituted")
        failures += 1
    except PromQLError:
        pass
    print(f"selftest: {len(cases) + len(bad) + 5} cases, {failures} failure(s)")
    return 1 if failures else 0


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("selftest")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dashboards", nargs="+", default=["dashboards/*.json"])
        p.add_argument("--datasources", default="dashboards/provisioning/datasources/datasources.yml")
        p.add_argument("--providers", default="dashboards/provisioning/dashboards/dashboards.yml")
        p.add_argument("--rate-interval", default="15s")

    p = sub.add_parser("static")
    common(p)
    p = sub.add_parser("render-config")
    p.add_argument("--source", default="prometheus.yml")
    p.add_argument("--out", required=True)
    p.add_argument("--job", default="increment")
    p.add_argument("--target", required=True)
    p.add_argument("--self-target", required=True)
    p.add_argument("--interval", default="1s")
    p = sub.add_parser("wait-target")
    p.add_argument("--prometheus", required=True)
    p.add_argument("--job", default="increment")
    p.add_argument("--timeout", type=float, default=30)
    p = sub.add_parser("rules")
    p.add_argument("--prometheus", required=True)
    p.add_argument("--job", default="increment")
    p.add_argument("--timeout", type=float, default=30)
    p = sub.add_parser("check")
    common(p)
    p.add_argument("--prometheus", required=True)
    p.add_argument("--time", type=float, default=None, help="evaluation time (unix seconds); default now")
    args = ap.parse_args()

    if args.cmd == "selftest":
        return selftest()
    if args.cmd == "static":
        st = static_check(sorted(p for pat in args.dashboards for p in glob.glob(pat)),
                          load_datasources(args.datasources), args.rate_interval)
        st.errors.extend(check_providers(args.providers))
        for w in st.warnings:
            print(f"  WARN {w}")
        for e in st.errors:
            print(f"  FAIL {e}")
        print(f"static: {st.panel_count} panels, {len(st.queries)} PromQL expressions, {len(st.errors)} error(s)")
        return 1 if st.errors else 0
    if args.cmd == "render-config":
        render_config(args.source, args.out, args.job, args.target, args.self_target, args.interval)
        return 0
    if args.cmd == "wait-target":
        wait_target(args.prometheus, args.job, args.timeout)
        return 0
    if args.cmd == "rules":
        return rules_check(args.prometheus, args.job, args.timeout)
    if args.cmd == "check":
        if args.time is None:
            args.time = time.time()
        return live_check(args)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"check_dashboard: FAIL: {e}", file=sys.stderr)
        sys.exit(1)
