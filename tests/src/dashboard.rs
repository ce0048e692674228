//! The Grafana dashboard in `deploy/grafana/baton.json`: its queries and the metric names they
//! read, to hold them against what the agents really export.
//!
//! The names are found the way PromQL reads them, without a full parser: string literals, label
//! matchers (`{…}`), ranges (`[…]`) and Grafana's variables are taken out; of the identifiers
//! left, a function (followed by `(`), an aggregation operator, a keyword, a number and the label names of
//! `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` are not metrics; the rest are. A
//! histogram's `_bucket`, `_sum` and `_count` count as the histogram.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

/// Where the dashboard is.
pub fn path() -> PathBuf {
    crate::repo_root().join("deploy/grafana/baton.json")
}

/// The dashboard, parsed.
pub fn load() -> Result<Value> {
    let path = path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every PromQL query of a dashboard: each `expr` of its panels (rows' panels too) and the
/// query of each query variable (`label_values(METRIC, label)` gives `METRIC`).
pub fn queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(panels) = dashboard.get("panels") {
        exprs(panels, &mut out);
    }
    let variables = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for v in variables {
        if v.get("type").and_then(Value::as_str) != Some("query") {
            continue;
        }
        let query = v.get("query").and_then(|q| {
            q.as_str()
                .or_else(|| q.get("query").and_then(Value::as_str))
        });
        if let Some(q) = query {
            out.push(label_values_metric(q).unwrap_or(q).to_owned());
        }
    }
    out
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// `label_values(SELECTOR, label)` → `SELECTOR`.
fn label_values_metric(q: &str) -> Option<&str> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    Some(inner.rsplit_once(',').map_or(inner, |(m, _)| m).trim())
}

const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
];

/// Aggregation operators, which may come before their `by (…)` instead of their `(`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords whose parenthesis holds label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names `expr` reads, histograms' series by the histogram's name.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let text = strip(expr);
    let chars: Vec<char> = text.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut label_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration: 0.99, 1e3, 5m.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = chars.get(j) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) && call {
                // Skip its parenthesis of label names.
                label_list = true;
            }
            let word_is = |list: &[&str]| list.contains(&word.as_str());
            if !call && !word_is(KEYWORDS) && !word_is(AGGREGATIONS) {
                names.insert(family(&word).to_owned());
            }
            continue;
        }
        if c == '(' && label_list {
            label_list = false;
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
        }
        i += 1;
    }
    names
}

/// A series' name as its metric's: a histogram's `_bucket`, `_sum` and `_count` as the histogram.
pub fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// `expr` without its strings, label matchers, ranges and Grafana variables.
fn strip(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut chars = expr.chars().peekable();
    let mut depth_braces = 0usize;
    let mut depth_brackets = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                // A string: to its closing quote, past escapes.
                while let Some(d) = chars.next() {
                    if d == '\\' && c != '`' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
                out.push(' ');
            }
            '{' => depth_braces += 1,
            '}' => depth_braces = depth_braces.saturating_sub(1),
            '[' => depth_brackets += 1,
            ']' => depth_brackets = depth_brackets.saturating_sub(1),
            '$' => {
                // $name, ${name}, ${name:format}
                if chars.peek() == Some(&'{') {
                    for d in chars.by_ref() {
                        if d == '}' {
                            break;
                        }
                    }
                } else {
                    while chars
                        .peek()
                        .is_some_and(|d| d.is_ascii_alphanumeric() || *d == '_')
                    {
                        chars.next();
                    }
                }
                out.push(' ');
            }
            _ if depth_braces > 0 || depth_brackets > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

/// The metric names in an agent's exposition: the names of its samples (so a metric with no
/// series is not there), histograms' by the histogram's name.
pub fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| family(n).to_owned())
        .collect()
}

/// Which agent exports the metrics a query reads: the notifier's are its own
/// (`baton_notification…`); every other query is the metrics agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exporter {
    Metrics,
    Notifier,
}

pub fn exporter_of(expr: &str) -> Exporter {
    let names = metric_names(expr);
    if !names.is_empty() && names.iter().all(|n| n.starts_with("baton_notification")) {
        Exporter::Notifier
    } else {
        Exporter::Metrics
    }
}

/// The dashboard's queries of one exporter.
pub fn queries_of(dashboard: &Value, exporter: Exporter) -> Vec<String> {
    queries(dashboard)
        .into_iter()
        .filter(|q| exporter_of(q) == exporter)
        .collect()
}

/// Each (metric, query) of the dashboard's queries of `exporter` whose metric is not in
/// `exported`.
pub fn missing(
    dashboard: &Value,
    exporter: Exporter,
    exported: &BTreeSet<String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for q in queries_of(dashboard, exporter) {
        for name in metric_names(&q) {
            if !exported.contains(&name) {
                out.push((name, q.clone()));
            }
        }
    }
    out
}

/// A query with Grafana's variables given values, for Prometheus to run.
pub fn with_variables(expr: &str, values: &[(&str, &str)]) -> String {
    let mut out = expr.to_owned();
    // Longest names first, so `$__rate_interval` is not cut at `$__rate`.
    let mut values = values.to_vec();
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in values {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn metric_names_leave_out_functions_keywords_labels_and_variables() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.9, sum by (le, strategy) (rate(baton_step_duration_seconds_bucket{env=~"$env",outcome="ready"}[$window])))"#
            ),
            ["baton_step_duration_seconds"]
        );
        assert_eq!(
            names(
                r#"sum(rate(a_sum{x="}"}[5m])) / sum(rate(a_count[5m])) > bool 0.5 or on (env) group_left (app) b_total offset 1d"#
            ),
            ["a", "b_total"]
        );
        assert_eq!(
            names("max without(instance) (up) * 1e3 + sum(x)by(le)"),
            ["up", "x"]
        );
        assert_eq!(
            names(r#"sum by (reason) (increase(baton_dead_letters_total[${__range}]))"#),
            ["baton_dead_letters_total"]
        );
    }

    #[test]
    fn every_query_of_a_dashboard_is_read_and_an_unknown_name_is_reported() {
        let dashboard = serde_json::json!({
            "panels": [
                { "type": "row", "panels": [ { "targets": [ { "expr": "sum(baton_up)" } ] } ] },
                { "targets": [ { "expr": "rate(baton_bogus_total[5m])" } ] }
            ],
            "templating": { "list": [
                { "type": "datasource", "query": "prometheus" },
                { "type": "query", "query": { "query": "label_values(baton_releases_total{env=~\"$env\"}, app)" } },
                { "type": "custom", "query": "1h,1d" }
            ] }
        });
        assert_eq!(
            queries(&dashboard),
            [
                "sum(baton_up)",
                "rate(baton_bogus_total[5m])",
                "baton_releases_total{env=~\"$env\"}"
            ]
        );
        let exported = exported_names(
            "# TYPE baton_up gauge\nbaton_up{agent=\"metrics\"} 1.0\n# TYPE baton_releases counter\nbaton_releases_total{env=\"a\"} 1\n# TYPE baton_bogus counter\n# EOF\n",
        );
        assert_eq!(
            missing(&dashboard, Exporter::Metrics, &exported),
            [(
                "baton_bogus_total".to_owned(),
                "rate(baton_bogus_total[5m])".to_owned()
            )],
            "declared without a series is not exported"
        );
        assert!(missing(&dashboard, Exporter::Notifier, &exported).is_empty());
        assert_eq!(
            exporter_of("max(baton_notifications_pending)"),
            Exporter::Notifier
        );
        assert_eq!(
            exporter_of("baton_notifications_pending / baton_up"),
            Exporter::Metrics,
            "a query mixing both is checked against the metrics agent"
        );
    }

    #[test]
    fn variables_get_their_values_longest_name_first() {
        assert_eq!(
            with_variables(
                "rate(x{env=~\"$env\"}[$__rate_interval]) + rate(y[${window}])",
                &[
                    ("env", ".*"),
                    ("__rate", "BAD"),
                    ("__rate_interval", "1m"),
                    ("window", "1h")
                ]
            ),
            "rate(x{env=~\".*\"}[1m]) + rate(y[1h])"
        );
    }
}
