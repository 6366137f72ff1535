//! The bundled dashboard names only series the service exports, every
//! selector of a service metric is filtered by the `$job` and `$instance`
//! variables, and every Prometheus query goes through the `$datasource`
//! variable (so the dashboard imports into any Grafana). The alerting rules
//! (`alerts/*.rules.yml`) name only exported series, each selected by
//! `job="increment"`.

use std::collections::BTreeSet;

use api::metrics::Metrics;
use serde_json::Value;

/// Every PromQL expression of the dashboard: panel targets (rows included)
/// and query variables, with where each comes from.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let reference = target["refId"].as_str().unwrap_or("?");
                    out.push((format!("{title} [{reference}]"), expr.to_owned()));
                }
            }
            walk(panel["panels"].as_array().map_or(&[], Vec::as_slice), out);
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"].as_array().map_or(&[], Vec::as_slice),
        &mut out,
    );
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        // A datasource variable's query is a datasource type, not PromQL.
        if variable["type"] != "query" {
            continue;
        }
        let query = &variable["query"];
        let query = query["query"].as_str().or(query.as_str());
        if let Some(query) = query {
            let name = variable["name"].as_str().unwrap_or("?");
            out.push((format!("${name}"), query.to_owned()));
        }
    }
    out
}

/// `expr` with every string literal blanked (same length, so positions
/// agree): names inside strings are not metric names.
fn without_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                out.extend(std::iter::repeat_n(' ', c.len_utf8()));
            }
            None => {
                if matches!(c, '"' | '\'' | '`') {
                    quote = Some(c);
                    out.push(' ');
                } else {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Series Prometheus makes itself for every scrape target.
const SYNTHETIC: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// The metric names in `expr` that are the service's (prefix `increment_`
/// or `process_`) or Prometheus's per target, with the byte offset just past
/// each.
fn metric_names(expr: &str) -> Vec<(String, usize)> {
    let masked = without_strings(expr);
    let bytes = masked.as_bytes();
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if is_name(bytes[i]) && (i == 0 || !is_name(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_name(bytes[i]) {
                i += 1;
            }
            let word = &masked[start..i];
            if word.starts_with("increment_")
                || word.starts_with("process_")
                || SYNTHETIC.contains(&word)
            {
                names.push((word.to_owned(), i));
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The label matchers right after offset `at` (`{...}`), if any.
fn matchers_after(expr: &str, at: usize) -> Option<&str> {
    let rest = expr[at..].trim_start();
    let body = rest.strip_prefix('{')?;
    let masked = without_strings(body);
    let end = masked.find('}')?;
    Some(&body[..end])
}

fn dashboard() -> Value {
    serde_json::from_str(&crate::read("dashboards/increment.json")).expect("the dashboard is JSON")
}

#[test]
fn the_dashboard_uses_only_exported_series() {
    let exported: BTreeSet<String> = Metrics::exported_series().into_iter().collect();
    assert!(
        exported.contains("increment_http_requests_total"),
        "{exported:?}"
    );
    assert!(exported.contains("increment_flush_duration_seconds_bucket"));
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    let expressions = expressions(&dashboard());
    assert!(expressions.len() > 20, "{} expressions", expressions.len());
    for (place, expr) in &expressions {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "{place}: names no service metric: {expr}"
        );
        for (name, _) in names {
            if !exported.contains(&name) && !SYNTHETIC.contains(&name.as_str()) {
                unknown.push(format!("{place}: {name}"));
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "not exported by the service: {unknown:#?}"
    );
    println!("{} series used, all exported", used.len());
}

/// Whether the selector of the metric ending at `end` in `expr` has
/// `matcher` among its label matchers (spaces ignored).
fn has_matcher(expr: &str, end: usize, matcher: &str) -> bool {
    matchers_after(expr, end).is_some_and(|m| {
        let m = m.replace(' ', "");
        m.split(',').any(|one| one == matcher)
    })
}

#[test]
fn every_service_selector_is_filtered_by_job_and_instance() {
    let mut unfiltered = Vec::new();
    for (place, expr) in expressions(&dashboard()) {
        // `$job` lists the jobs and `$instance` the instances of `$job`:
        // their own queries are not filtered by themselves.
        let wanted: &[&str] = match place.as_str() {
            "$job" => &[],
            "$instance" | "$route" => &[r#"job="$job""#],
            _ => &[r#"job="$job""#, r#"instance=~"$instance""#],
        };
        for (name, end) in metric_names(&expr) {
            for matcher in wanted {
                if !has_matcher(&expr, end, matcher) {
                    unfiltered.push(format!("{place}: {name} without {matcher} in {expr}"));
                }
            }
        }
    }
    assert!(unfiltered.is_empty(), "{unfiltered:#?}");
}

/// Every `datasource` reference in `value` (panels, targets, variables),
/// with where it is.
fn datasource_refs(value: &Value, at: &str, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let here = format!("{at}.{key}");
                if key == "datasource" && inner.is_object() {
                    out.push((here.clone(), inner.clone()));
                }
                datasource_refs(inner, &here, out);
            }
        }
        Value::Array(items) => {
            for (i, inner) in items.iter().enumerate() {
                datasource_refs(inner, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn prometheus_queries_go_through_the_datasource_and_job_variables() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("the dashboard has template variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let job = variable("job");
    assert_eq!(job["type"], "query");
    assert_eq!(job["query"], "label_values(increment_build_info, job)");
    assert_eq!(job["current"]["value"], "increment", "the default job");
    assert_ne!(job["multi"], true, "job=\"$job\" takes one value");
    let instance = variable("instance");
    assert_eq!(instance["multi"], true);
    assert_eq!(instance["includeAll"], true);

    let mut refs = Vec::new();
    datasource_refs(&dashboard, "", &mut refs);
    assert!(refs.len() > 40, "{} datasource references", refs.len());
    let hard_coded: Vec<_> = refs
        .iter()
        .filter(|(_, ds)| ds["type"] == "prometheus" && ds["uid"] != "${datasource}")
        .collect();
    assert!(
        hard_coded.is_empty(),
        "Prometheus datasources not through ${{datasource}}: {hard_coded:#?}"
    );
    let text = crate::read("dashboards/increment.json");
    assert!(
        !text.contains(r#"job=\"increment\""#),
        "a hard-coded job=\"increment\" is left"
    );
}

/// Every alerting rule's expression, with its alert's name.
fn alert_expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = crate::root().join("alerts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable directory entry").path())
        .filter(|path| path.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no alerts/*.rules.yml");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a readable rules file");
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("the rules are YAML");
        for group in doc["groups"].as_sequence().expect("rule groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                let name = rule["alert"].as_str().or(rule["record"].as_str());
                let expr = rule["expr"].as_str();
                out.push((
                    name.expect("a rule names its alert").to_owned(),
                    expr.expect("a rule has an expression").to_owned(),
                ));
            }
        }
    }
    out
}

#[test]
fn the_alerts_name_only_exported_series_of_the_increment_job() {
    let exported: BTreeSet<String> = Metrics::exported_series().into_iter().collect();
    let rules = alert_expressions();
    assert!(rules.len() >= 10, "{} rules", rules.len());
    let mut wrong = Vec::new();
    for (alert, expr) in &rules {
        let names = metric_names(expr);
        if names.is_empty() {
            wrong.push(format!("{alert}: names no service metric"));
        }
        for (name, end) in names {
            if !exported.contains(&name) && !SYNTHETIC.contains(&name.as_str()) {
                wrong.push(format!("{alert}: {name} is not exported"));
            }
            if !has_matcher(expr, end, r#"job="increment""#) {
                wrong.push(format!("{alert}: {name} without job=\"increment\""));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    println!("{} alerting rules checked", rules.len());
}

#[test]
fn the_extraction_sees_names_not_strings() {
    let expr = r#"sum by (reason) (rate(increment_increments_rejected_total{instance=~"$instance", reason!="increment_fake"}[5m])) / on() group_left process_open_fds"#;
    let names: Vec<String> = metric_names(expr).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["increment_increments_rejected_total", "process_open_fds"]
    );
    let (_, end) = metric_names(expr)[0].clone();
    assert_eq!(
        matchers_after(expr, end),
        Some(r#"instance=~"$instance", reason!="increment_fake""#)
    );
    assert_eq!(matchers_after("x", 1), None);
}
