//! `docker-compose.yml`: what its schema cannot check, on the defaults (the
//! file as a user gets it, `${VAR:-default}` taken as its default).
//! `scripts/validate-compose.sh` checks the schema and runs the real Compose
//! CLI; this is the logic.

use std::{collections::BTreeSet, path::Path, time::Duration};

use serde_yaml::Value;

/// `text` with `${VAR:-default}` / `${VAR-default}` replaced by the default,
/// `${VAR}` and `$VAR` by nothing, and `$$` by `$`.
fn interpolate(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("a closed ${...}");
            let inner = &braced[..end];
            if let Some((_, default)) = inner.split_once(":-").or_else(|| inner.split_once('-')) {
                out.push_str(default);
            }
            rest = &braced[end + 1..];
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            rest = &after[end..];
        }
    }
    out.push_str(rest);
    out
}

/// Every string in `value`, interpolated.
fn interpolated(value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(interpolate(&s)),
        Value::Sequence(items) => Value::Sequence(items.into_iter().map(interpolated).collect()),
        Value::Mapping(map) => {
            Value::Mapping(map.into_iter().map(|(k, v)| (k, interpolated(v))).collect())
        }
        other => other,
    }
}

/// A Compose duration (`1m30s`, `20s`, `500ms`).
fn duration(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut chars = text.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let mut unit = String::from(c);
        while let Some(&next) = chars.peek() {
            if next.is_ascii_alphabetic() {
                unit.push(next);
                chars.next();
            } else {
                break;
            }
        }
        let n: f64 = number
            .parse()
            .unwrap_or_else(|_| panic!("a number in {text:?}"));
        number.clear();
        let seconds = match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" => 1e-6,
            "ns" => 1e-9,
            other => panic!("unit {other:?} in {text:?}"),
        };
        total += Duration::from_secs_f64(n * seconds);
    }
    assert!(number.is_empty(), "a number without a unit in {text:?}");
    total
}

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// A service's environment as (name, value), from a map or a `NAME=value` list.
fn environment(service: &Value) -> Vec<(String, String)> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .filter_map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                Some((k.as_str()?.to_owned(), value))
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (item.to_owned(), String::new()),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn env_value<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// (source, target) of each volume of a service, short or long syntax.
fn volumes(service: &Value) -> Vec<(String, String)> {
    service
        .get("volumes")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|volume| match volume {
            Value::String(short) => {
                let mut parts = short.splitn(3, ':');
                Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
            }
            long => Some((
                text(long, "source")?.to_owned(),
                text(long, "target")?.to_owned(),
            )),
        })
        .collect()
}

/// What is wrong with `compose` (interpolated), its relative paths taken
/// from `root`, given nginx's config `template`.
fn problems(compose: &Value, root: &Path, template: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(services) = compose.get("services").and_then(Value::as_mapping) else {
        return vec!["no services".to_owned()];
    };
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    let service = |name: &str| services.get(name);
    for (name, spec) in services {
        let name = name.as_str().unwrap_or("?");
        if let Some(Value::Mapping(deps)) = spec.get("depends_on") {
            for (dep, condition) in deps {
                let dep = dep.as_str().unwrap_or("?");
                if !names.contains(dep) {
                    problems.push(format!("{name} depends on {dep}, which is not a service"));
                } else if text(condition, "condition") == Some("service_healthy")
                    && service(dep).and_then(|d| d.get("healthcheck")).is_none()
                {
                    problems.push(format!(
                        "{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                    ));
                }
            }
        }
        for (source, _) in volumes(spec) {
            if (source.starts_with('.') || source.starts_with('/')) && !root.join(&source).exists()
            {
                problems.push(format!("{name}: bind-mount source {source} does not exist"));
            }
        }
        if let Some(build) = spec.get("build") {
            let context = root.join(text(build, "context").or(build.as_str()).unwrap_or("."));
            let dockerfile = context.join(text(build, "dockerfile").unwrap_or("Dockerfile"));
            if !context.is_dir() || !dockerfile.is_file() {
                problems.push(format!(
                    "{name}: build context or {} is missing",
                    dockerfile.display()
                ));
            }
        }
    }

    match service("increment") {
        None => problems.push("no service `increment`".to_owned()),
        Some(increment) => {
            if increment.get("ports").is_some() {
                problems.push(
                    "increment publishes host ports; `--scale increment=N` would collide"
                        .to_owned(),
                );
            }
            if increment.get("container_name").is_some() {
                problems.push("increment has a container_name; it could not be scaled".to_owned());
            }
            let env = environment(increment);
            let timeout = duration(env_value(&env, "INCREMENT_SHUTDOWN_TIMEOUT").unwrap_or("30s"));
            let grace = duration(text(increment, "stop_grace_period").unwrap_or("10s"));
            if grace <= timeout {
                problems.push(format!(
                    "increment: stop_grace_period ({grace:?}) must be longer than \
                     INCREMENT_SHUTDOWN_TIMEOUT ({timeout:?}), or Docker kills it mid-flush"
                ));
            }
            let journal = env_value(&env, "INCREMENT_JOURNAL_URL").unwrap_or("");
            if names.contains("nats") && !journal.contains("//nats:") {
                problems.push(
                    "increment's INCREMENT_JOURNAL_URL does not point at the nats service"
                        .to_owned(),
                );
            }
            if journal.contains("//nats:")
                && text(&increment["depends_on"]["nats"], "condition") != Some("service_healthy")
            {
                problems.push(
                    "increment does not wait for the journal (nats) to be healthy".to_owned(),
                );
            }
            if names.contains("db")
                && !env_value(&env, "DATABASE_URL")
                    .unwrap_or("")
                    .contains("@db:")
            {
                problems
                    .push("increment's DATABASE_URL does not point at the db service".to_owned());
            }
        }
    }

    if let Some(nats) = service("nats") {
        let command: Vec<&str> = nats
            .get("command")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let store = command
            .iter()
            .position(|arg| *arg == "-sd")
            .and_then(|at| command.get(at + 1));
        if !command.contains(&"-js") {
            problems.push("nats runs without JetStream (-js)".to_owned());
        }
        match store {
            Some(store) if volumes(nats).iter().any(|(source, target)| target == store && !source.starts_with('.')) => {}
            _ => problems.push(
                "nats keeps its JetStream store (-sd) outside a named volume: a new container would lose acknowledged increments"
                    .to_owned(),
            ),
        }
    }

    match service("nginx") {
        None => problems.push("no service `nginx`".to_owned()),
        Some(nginx) => {
            let env = environment(nginx);
            let wanted = placeholders(template);
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|w| env_value(&env, w).is_none())
                .collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "nginx's environment lacks the template placeholders {missing:?}"
                ));
            }
            // The image renders only variables matching this filter; ours is a prefix.
            match env_value(&env, "NGINX_ENVSUBST_FILTER").and_then(|f| f.strip_prefix('^')) {
                Some(prefix)
                    if !prefix.is_empty() && wanted.iter().all(|w| w.starts_with(prefix)) => {}
                _ => problems.push(
                    "NGINX_ENVSUBST_FILTER is not a prefix (^NAME) selecting every placeholder"
                        .to_owned(),
                ),
            }
            if !volumes(nginx)
                .iter()
                .any(|(_, target)| target == "/etc/nginx/templates")
            {
                problems
                    .push("nginx does not mount the templates at /etc/nginx/templates".to_owned());
            }
            let upstream = env_value(&env, "INCREMENT_UPSTREAM_SERVERS").unwrap_or("");
            let resolver = env_value(&env, "INCREMENT_PROXY_RESOLVER").unwrap_or("");
            if !upstream.contains("resolve") || !resolver.contains("resolver") {
                problems.push(
                    "nginx's upstream does not re-resolve the replicas (resolve + resolver)"
                        .to_owned(),
                );
            }
        }
    }
    problems
}

/// The `${NAME}` placeholders of an nginx template.
fn placeholders(template: &str) -> BTreeSet<String> {
    template
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_owned)
        .collect()
}

fn shipped() -> Value {
    let raw: Value = serde_yaml::from_str(&crate::read("docker-compose.yml")).expect("valid YAML");
    interpolated(raw)
}

#[test]
fn the_compose_file_holds_what_its_schema_cannot_check() {
    let template = crate::read("nginx/increment.conf.template");
    let found = problems(&shipped(), &crate::root(), &template);
    assert!(found.is_empty(), "{found:#?}");
}

/// A change to a copy of the compose file.
type Edit = dyn Fn(&mut Value);

/// Broken copies are caught, so a check that passes everything cannot hide.
#[test]
fn broken_copies_are_refused() {
    let template = crate::read("nginx/increment.conf.template");
    let root = crate::root();
    let broken = |edit: &Edit| {
        let mut compose = shipped();
        edit(&mut compose);
        problems(&compose, &root, &template)
    };
    let cases: [(&str, &Edit); 8] = [
        ("stop_grace_period", &|c| {
            c["services"]["increment"]["stop_grace_period"] = "5s".into()
        }),
        ("host ports", &|c| {
            c["services"]["increment"]["ports"] = serde_yaml::from_str("[\"4000:4000\"]").unwrap()
        }),
        ("not a service", &|c| {
            c["services"]["nginx"]["depends_on"]["nowhere"] =
                serde_yaml::from_str("{condition: service_started}").unwrap();
        }),
        ("placeholders", &|c| {
            let env = c["services"]["nginx"]["environment"]
                .as_mapping_mut()
                .unwrap();
            env.remove("INCREMENT_PROXY_LISTEN");
        }),
        ("JetStream store", &|c| {
            c["services"]["nats"]["volumes"] = serde_yaml::from_str("[]").unwrap();
        }),
        ("INCREMENT_JOURNAL_URL", &|c| {
            c["services"]["increment"]["environment"]["INCREMENT_JOURNAL_URL"] = "".into()
        }),
        ("wait for the journal", &|c| {
            let deps = c["services"]["increment"]["depends_on"]
                .as_mapping_mut()
                .unwrap();
            deps.remove("nats");
        }),
        ("bind-mount source", &|c| {
            c["services"]["nginx"]["volumes"] =
                serde_yaml::from_str("[\"./no-such-dir:/etc/nginx/templates:ro\"]").unwrap();
        }),
    ];
    for (expected, edit) in cases {
        let found = broken(edit);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "{expected}: {found:#?}"
        );
    }
}

#[test]
fn interpolation_and_durations_follow_compose() {
    assert_eq!(interpolate("${A:-1s}/${B-x}/${C}/$$D/$E."), "1s/x//$D/.");
    assert_eq!(duration("1m30s"), Duration::from_secs(90));
    assert_eq!(duration("500ms"), Duration::from_millis(500));
}
