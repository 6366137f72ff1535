#!/usr/bin/env bash
# Checks the Prometheus alerting rules in alerts/:
#
#   1. promtool check config prometheus.yml: valid, and its rule_files
#      (alerts/*.rules.yml, relative to it) resolve to the rules
#   2. promtool check rules alerts/*.rules.yml
#   3. promtool test rules alerts/*.rules.test.yml: the unit tests
#   4. every alert: a severity label; summary, description and runbook_url
#      annotations; its runbook_url section in docs/runbooks.md; at least one
#      test where it fires and one where it stays silent; and each of those
#      tests fails when the rule is broken (the alert made never to fire,
#      or to fire always), so no test passes by naming the wrong alert or
#      evaluating where the series are empty
#
# Metric names and job="increment" selectors are checked against the
# service's declarations by `cargo test --test shipped`.
#
# Run from anywhere: scripts/check-alerts.sh. Installs promtool (the Debian
# package prometheus) and PyYAML when missing. About 10 s.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\ncheck-alerts: FAILED: %s\n' "$*" >&2; exit 1; }

tmp=$(mktemp -d -t check-alerts.XXXXXX)
child_pid=""
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop "$child_pid" "current step"
  rm -rf "$tmp"
  exit "$rc"
}
on_exit_run_cleanup

step "tools: promtool, python3 with PyYAML"
command -v python3 >/dev/null || die "python3 is required"
if ! command -v promtool >/dev/null; then
  echo "installing the Debian package prometheus (for promtool)"
  export DEBIAN_FRONTEND=noninteractive
  if ! run timeout 900 apt-get install -y --no-install-recommends prometheus; then
    run timeout 300 apt-get update
    run timeout 900 apt-get install -y --no-install-recommends prometheus
  fi
  command -v promtool >/dev/null || die "promtool is still missing after installing prometheus"
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  run timeout 300 python3 -m pip install --quiet PyYAML
fi
promtool --version 2>&1 | head -n 1

shopt -s nullglob
rules=(alerts/*.rules.yml)
tests=(alerts/*.rules.test.yml)
shopt -u nullglob
[ "${#rules[@]}" -gt 0 ] || die "no alerts/*.rules.yml"
[ "${#tests[@]}" -gt 0 ] || die "no alerts/*.rules.test.yml"

step "promtool check config prometheus.yml (its rule_files must resolve)"
timeout 60 promtool check config prometheus.yml | tee "$tmp/config.out"
for file in "${rules[@]}"; do
  grep -qF "Checking $file" "$tmp/config.out" \
    || die "prometheus.yml's rule_files do not load $file"
done

step "promtool check rules ${rules[*]}"
timeout 60 promtool check rules "${rules[@]}"

step "promtool test rules ${tests[*]}"
timeout 120 promtool test rules "${tests[@]}"

step "every alert: annotations, runbook section, a firing and a silent test, each catching a broken rule"
timeout 300 python3 - "$tmp" "${rules[@]}" -- "${tests[@]}" <<'PY'
import copy
import os
import re
import subprocess
import sys

import yaml

work = sys.argv[1]
split = sys.argv.index("--")
rule_paths, test_paths = sys.argv[2:split], sys.argv[split + 1:]
RUNBOOK = "docs/runbooks.md"
# Expressions for the mutants: one that never returns a sample, one that
# always does (with `for` dropped, it fires at the first evaluation).
NEVER, ALWAYS = "vector(1) < 0", "vector(1)"

errors = []
rules = {}  # alert -> (rules file, rule)
for path in rule_paths:
    with open(path) as f:
        doc = yaml.safe_load(f)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                if rule["alert"] in rules:
                    errors.append(f"{rule['alert']}: defined twice")
                rules[rule["alert"]] = (path, rule)

with open(RUNBOOK) as f:
    headings = {m.group(1) for m in re.finditer(r"^##+\s+(\S+)\s*$", f.read(), re.M)}
for name, (_, rule) in rules.items():
    annotations = rule.get("annotations") or {}
    for key in ("summary", "description", "runbook_url"):
        if not str(annotations.get(key, "")).strip():
            errors.append(f"{name}: no {key} annotation")
    if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
        errors.append(f"{name}: severity label must be critical, warning or info")
    # Relative as shipped; a deployment may prefix its repository's address.
    want = f"{RUNBOOK}#{name.lower()}"
    if not str(annotations.get("runbook_url", "")).endswith(want):
        errors.append(f"{name}: runbook_url {annotations.get('runbook_url')!r} does not end in {want!r}")
    if name not in headings:
        errors.append(f"{name}: no section '## {name}' in {RUNBOOK}")

# Which test groups show each alert firing, and which show it silent.
groups = []  # (test file, group)
for path in test_paths:
    with open(path) as f:
        doc = yaml.safe_load(f)
    for group in doc["tests"]:
        groups.append((path, doc, group))
# A group shows an alert firing when one of its evaluations expects it (the
# others may expect it still pending); silent when none does.
firing = {name: [] for name in rules}
silent = {name: [] for name in rules}
for path, _, group in groups:
    expects = {}
    for case in group.get("alert_rule_test") or []:
        name = case["alertname"]
        if name not in rules:
            errors.append(f"{path}: {group.get('name', '?')}: tests unknown alert {name}")
            continue
        expects[name] = expects.get(name, False) or bool(case.get("exp_alerts"))
    for name, fires in expects.items():
        (firing if fires else silent)[name].append(group)


def run_mutant(name, expr, keep):
    """promtool on the groups `keep` with alert `name`'s expression replaced;
    True when the tests fail (they caught the broken rule)."""
    rules_file, _ = rules[name]
    with open(rules_file) as f:
        doc = yaml.safe_load(f)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                rule["expr"] = expr
                rule.pop("for", None)
    out_rules = os.path.join(work, os.path.basename(rules_file))
    with open(out_rules, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    test_doc = {k: v for k, v in groups[0][1].items() if k != "tests"}
    test_doc["rule_files"] = [os.path.basename(rules_file)]
    test_doc["tests"] = []
    for group in keep:
        g = copy.deepcopy(group)
        g["alert_rule_test"] = [c for c in g.get("alert_rule_test") or [] if c["alertname"] == name]
        g.pop("promql_expr_test", None)
        test_doc["tests"].append(g)
    out_tests = os.path.join(work, "mutant.test.yml")
    with open(out_tests, "w") as f:
        yaml.safe_dump(test_doc, f, sort_keys=False)
    result = subprocess.run(["promtool", "test", "rules", out_tests],
                            capture_output=True, text=True, timeout=60)
    return result.returncode != 0


print(f"{len(rules)} alerts, {len(groups)} test groups")
for name, (_, rule) in rules.items():
    severity = (rule.get("labels") or {}).get("severity", "?")
    print(f"\n  {name} ({severity}, for {rule.get('for', '0s')})")
    for group in firing[name]:
        print(f"    fires:  {group.get('name', '?')}")
    for group in silent[name]:
        print(f"    silent: {group.get('name', '?')}")
    if not firing[name]:
        errors.append(f"{name}: no test where it fires")
    if not silent[name]:
        errors.append(f"{name}: no test where it stays silent")
    if firing[name]:
        caught = run_mutant(name, NEVER, firing[name])
        print(f"    {'ok' if caught else 'FAIL'}: the firing tests fail when it never fires")
        if not caught:
            errors.append(f"{name}: its firing tests pass with an alert that never fires")
    if silent[name]:
        caught = all(run_mutant(name, ALWAYS, [group]) for group in silent[name])
        print(f"    {'ok' if caught else 'FAIL'}: each silent test fails when it always fires")
        if not caught:
            errors.append(f"{name}: a silent test passes with an alert that always fires")

print()
for e in errors:
    print(f"  FAIL {e}")
print(f"alerts: {len(rules)} checked, {sum(map(len, firing.values()))} firing and "
      f"{sum(map(len, silent.values()))} silent test groups, {len(errors)} error(s)")
sys.exit(1 if errors else 0)
PY

printf '\ncheck-alerts: PASSED\n'
