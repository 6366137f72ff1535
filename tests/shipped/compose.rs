//! `docker-compose.yml`: what its schema cannot check, on the defaults (the
//! file as a user gets it, `${VAR:-default}` taken as its default).
//! `scripts/validate-compose.sh` checks the schema and runs the real Compose
//! CLI; this is the logic.

use std::{collections::BTreeSet, path::Path, time::Duration};

use serde_yaml::Value;

/// The service takes this off its stop grace period to get its shutdown
/// timeout, and refuses a shutdown timeout above the grace period less this.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// The files a service reads its secrets from: `VARIABLE_FILE` set to
/// `/run/secrets/NAME`, NAME among the service's secrets and a top-level
/// secret with a `file`. Returns (variable, the file's path from the root).
fn secret_files(
    compose: &Value,
    service: &Value,
    variables: &[&str],
) -> Result<Vec<(String, String)>, String> {
    let env = environment(service);
    let granted: BTreeSet<&str> = service
        .get("secrets")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().or_else(|| text(s, "source")))
        .collect();
    let mut files = Vec::new();
    for variable in variables {
        if env_value(&env, variable).is_some() {
            return Err(format!(
                "{variable} is set as a plain value; use {variable}_FILE and a secret"
            ));
        }
        let file_variable = format!("{variable}_FILE");
        let Some(path) = env_value(&env, &file_variable) else {
            return Err(format!("{file_variable} is not set"));
        };
        let Some(name) = path.strip_prefix("/run/secrets/") else {
            return Err(format!(
                "{file_variable} ({path}) is not under /run/secrets"
            ));
        };
        if !granted.contains(name) {
            return Err(format!(
                "{file_variable}: the service is not given the secret {name}"
            ));
        }
        let Some(file) = text(&compose["secrets"][name], "file") else {
            return Err(format!(
                "{file_variable}: the secret {name} is not a top-level secret from a file"
            ));
        };
        files.push(((*variable).to_owned(), file.to_owned()));
    }
    Ok(files)
}

/// A secret file's content as the service reads it (trailing newline trimmed).
fn read_secret(root: &Path, file: &str) -> Result<String, String> {
    std::fs::read_to_string(root.join(file))
        .map(|content| content.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|e| format!("the secret file {file}: {e}"))
}

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
        let limits = &spec["deploy"]["resources"]["limits"];
        if limits.get("cpus").is_none() || limits.get("memory").is_none() {
            problems.push(format!(
                "{name} has no CPU and memory limits (deploy.resources.limits)"
            ));
        }
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
            // Docker's SIGTERM-to-SIGKILL time, and what the service is told it is.
            let grace = duration(text(increment, "stop_grace_period").unwrap_or("10s"));
            match env_value(&env, "INCREMENT_STOP_GRACE_PERIOD").map(duration) {
                None => problems.push(
                    "increment: INCREMENT_STOP_GRACE_PERIOD is not set, so the shutdown timeout is not derived from stop_grace_period"
                        .to_owned(),
                ),
                Some(told) if told != grace => problems.push(format!(
                    "increment: stop_grace_period ({grace:?}) is not the INCREMENT_STOP_GRACE_PERIOD the service is told ({told:?})"
                )),
                Some(_) => {}
            }
            if let Some(timeout) = env_value(&env, "INCREMENT_SHUTDOWN_TIMEOUT").map(duration)
                && timeout + SHUTDOWN_MARGIN > grace
            {
                problems.push(format!(
                    "increment: INCREMENT_SHUTDOWN_TIMEOUT ({timeout:?}) is above stop_grace_period \
                     ({grace:?}) less {SHUTDOWN_MARGIN:?}: the service refuses to start"
                ));
            }
            // The service wants at least a second of shutdown after the margin.
            if grace < SHUTDOWN_MARGIN + Duration::from_secs(1) {
                problems.push(format!(
                    "increment: stop_grace_period ({grace:?}) is under 6s: the service refuses a grace period that leaves less than 1s after the {SHUTDOWN_MARGIN:?} margin"
                ));
            }
            // Spill files on a named volume that every replica mounts, so a
            // replacement replays what a stopped replica left.
            let named: BTreeSet<&str> = compose
                .get("volumes")
                .and_then(Value::as_mapping)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.as_str())
                .collect();
            match env_value(&env, "INCREMENT_SPILL_DIR") {
                None => problems.push("increment: INCREMENT_SPILL_DIR is not set (spill files would stay in the container)".to_owned()),
                Some(dir) => {
                    if !volumes(increment)
                        .iter()
                        .any(|(source, target)| target == dir && named.contains(source.as_str()))
                    {
                        problems.push(format!(
                            "increment: the spill dir {dir} is not on a named volume shared by the replicas"
                        ));
                    }
                }
            }
            if env_value(&env, "INCREMENT_SPILL_PATH").is_some() {
                problems.push("increment: INCREMENT_SPILL_PATH is one file per container; use INCREMENT_SPILL_DIR".to_owned());
            }
            // Secrets as files, and the database URL agreeing with the
            // database's own user, password and name.
            let db_password = service("db").map(|db| {
                let files = secret_files(compose, db, &["POSTGRES_PASSWORD"])?;
                read_secret(root, &files[0].1)
            });
            if let Some(Err(problem)) = &db_password {
                problems.push(format!("db: {problem}"));
            }
            let secrets = secret_files(
                compose,
                increment,
                &["DATABASE_URL", "INCREMENT_ADMIN_TOKEN"],
            )
            .and_then(|files| {
                Ok((
                    read_secret(root, &files[0].1)?,
                    read_secret(root, &files[1].1)?,
                ))
            });
            match secrets {
                Err(problem) => problems.push(format!("increment: {problem}")),
                Ok((url, token)) => {
                    if token.len() < 16 {
                        problems.push(
                            "increment: the admin token is shorter than 16 characters".to_owned(),
                        );
                    }
                    if let (Some(db), Some(Ok(password))) = (service("db"), &db_password) {
                        let db_env = environment(db);
                        let expected = format!(
                            "postgres://{}:{password}@db:5432/{}",
                            env_value(&db_env, "POSTGRES_USER").unwrap_or("postgres"),
                            env_value(&db_env, "POSTGRES_DB").unwrap_or("postgres"),
                        );
                        if url != expected {
                            problems.push(
                                "increment's database-url does not point at the db service with its user, password and database"
                                    .to_owned(),
                            );
                        }
                    }
                }
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
    let cases: [(&str, &Edit); 18] = [
        ("stop_grace_period", &|c| {
            c["services"]["increment"]["stop_grace_period"] = "5s".into()
        }),
        ("is under 6s", &|c| {
            c["services"]["increment"]["stop_grace_period"] = "5s".into();
            c["services"]["increment"]["environment"]["INCREMENT_STOP_GRACE_PERIOD"] = "5s".into();
        }),
        ("INCREMENT_STOP_GRACE_PERIOD is not set", &|c| {
            let env = c["services"]["increment"]["environment"]
                .as_mapping_mut()
                .unwrap();
            env.remove("INCREMENT_STOP_GRACE_PERIOD");
        }),
        ("refuses to start", &|c| {
            c["services"]["increment"]["environment"]["INCREMENT_SHUTDOWN_TIMEOUT"] = "26s".into()
        }),
        ("not on a named volume", &|c| {
            c["services"]["increment"]["volumes"] =
                serde_yaml::from_str("[\"/tmp/spill:/var/lib/increment/spill\"]").unwrap();
        }),
        ("one file per container", &|c| {
            c["services"]["increment"]["environment"]["INCREMENT_SPILL_PATH"] =
                "/var/lib/increment/spill.jsonl".into()
        }),
        ("tempo has no CPU and memory limits", &|c| {
            c["services"]["tempo"]["deploy"]["resources"]["limits"] =
                serde_yaml::from_str("{memory: 1g}").unwrap();
        }),
        ("DATABASE_URL is set as a plain value", &|c| {
            c["services"]["increment"]["environment"]["DATABASE_URL"] =
                "postgres://increment:increment@db:5432/increment".into()
        }),
        ("POSTGRES_PASSWORD is set as a plain value", &|c| {
            c["services"]["db"]["environment"]["POSTGRES_PASSWORD"] = "increment".into()
        }),
        ("not given the secret admin-token", &|c| {
            c["services"]["increment"]["secrets"] = serde_yaml::from_str("[database-url]").unwrap();
        }),
        ("with its user, password and database", &|c| {
            c["services"]["db"]["environment"]["POSTGRES_DB"] = "other".into()
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

/// `stop_grace_period` and the service's `INCREMENT_STOP_GRACE_PERIOD` are
/// one expression (a YAML alias), so setting the variable moves both.
#[test]
fn the_grace_period_is_written_once() {
    let raw: Value = serde_yaml::from_str(&crate::read("docker-compose.yml")).expect("valid YAML");
    let increment = &raw["services"]["increment"];
    let docker = text(increment, "stop_grace_period");
    let told = text(&increment["environment"], "INCREMENT_STOP_GRACE_PERIOD");
    assert_eq!(docker, told);
    assert!(
        docker.is_some_and(|d| d.starts_with("${INCREMENT_STOP_GRACE_PERIOD:-")),
        "{docker:?}"
    );
    let source = crate::read("docker-compose.yml");
    assert_eq!(
        source.matches("${INCREMENT_STOP_GRACE_PERIOD").count(),
        1,
        "the default is written once"
    );
}

#[test]
fn interpolation_and_durations_follow_compose() {
    assert_eq!(interpolate("${A:-1s}/${B-x}/${C}/$$D/$E."), "1s/x//$D/.");
    assert_eq!(duration("1m30s"), Duration::from_secs(90));
    assert_eq!(duration("500ms"), Duration::from_millis(500));
}

/// `.env.example` lists every variable the compose file reads.
#[test]
fn env_example_lists_every_variable() {
    let compose = crate::read("docker-compose.yml");
    let example = crate::read(".env.example");
    let listed: BTreeSet<&str> = example
        .lines()
        .filter_map(|line| line.trim_start_matches('#').split_once('='))
        .map(|(name, _)| name)
        .collect();
    let read: BTreeSet<&str> = compose
        .match_indices("${")
        // `$${NAME}` is the container's own variable, not the compose file's.
        .filter(|(at, _)| !compose[..*at].ends_with('$'))
        .filter_map(|(at, _)| {
            let rest = &compose[at + 2..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            Some(&rest[..end])
        })
        .collect();
    let missing: Vec<&&str> = read.difference(&listed).collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
}
