//! The bundled dashboard names only series the service exports, and every
//! selector of a service metric is filtered by the `$instance` variable.

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

#[test]
fn every_service_selector_is_filtered_by_instance() {
    let mut unfiltered = Vec::new();
    for (place, expr) in expressions(&dashboard()) {
        if place.starts_with('$') {
            continue; // the variables' own queries list the instances
        }
        for (name, end) in metric_names(&expr) {
            let filtered = matchers_after(&expr, end)
                .is_some_and(|m| m.replace(' ', "").contains(r#"instance=~"$instance""#));
            if !filtered {
                unfiltered.push(format!("{place}: {name} in {expr}"));
            }
        }
    }
    assert!(
        unfiltered.is_empty(),
        "without instance=~\"$instance\": {unfiltered:#?}"
    );
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
