//! `baton history` and `baton metrics`: queries answered by the metrics agent over NATS.
//!
//! Both ask the metrics agent (`baton.v1.api.releases.list`, `baton.v1.api.metrics.report`)
//! and wait at most [`ANSWER_TIMEOUT`]. `--output json` prints the agent's answer as it is;
//! text is a table or a report with units.

use std::time::Duration;

use crate::Output;
use anyhow::{anyhow, bail, Context};
use baton_core::bus::NatsArgs;
use baton_core::names::validate_dns_label;

use serde_json::Value;

/// How long the CLI waits for the metrics agent.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest window the agent accepts (366 days).
const MAX_WINDOW_SECONDS: u64 = 366 * 86_400;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// Only this app
    #[arg(long)]
    pub app: Option<String>,
    /// Only this environment
    #[arg(long)]
    pub env: Option<String>,
    /// At most this many releases (1 to 1000), newest first
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// Only this environment
    #[arg(long)]
    pub env: Option<String>,
    /// Only this app
    #[arg(long)]
    pub app: Option<String>,
    /// The window, e.g. 30d, 12h, 90m, 45s (at most 366d)
    #[arg(long, default_value = "30d")]
    pub window: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn history(nats: &NatsArgs, args: HistoryArgs) -> anyhow::Result<()> {
    check_filter(args.env.as_deref(), args.app.as_deref())?;
    if args.limit == 0 || args.limit > MAX_LIMIT {
        bail!("--limit: {} is outside 1..={MAX_LIMIT}", args.limit);
    }
    let request =
        serde_json::json!({"env": args.env, "app": args.app, "limit": args.limit}).to_string();
    let (raw, answer) = ask(nats, "releases.list", &request).await?;
    match args.output {
        Output::Json => println!("{raw}"),
        Output::Text => {
            let releases = answer
                .as_array()
                .context("the metrics agent's answer is not a list of releases")?;
            print!("{}", history_table(releases));
        }
    }
    Ok(())
}

pub async fn metrics(nats: &NatsArgs, args: MetricsArgs) -> anyhow::Result<()> {
    let window_seconds = parse_window(&args.window).map_err(|e| anyhow!("--window: {e}"))?;
    check_filter(args.env.as_deref(), args.app.as_deref())?;
    let request =
        serde_json::json!({"window_seconds": window_seconds, "env": args.env, "app": args.app})
            .to_string();
    let (raw, answer) = ask(nats, "metrics.report", &request).await?;
    match args.output {
        Output::Json => println!("{raw}"),
        Output::Text => print!("{}", report_text(&args.window, &answer)),
    }
    Ok(())
}

fn check_filter(env: Option<&str>, app: Option<&str>) -> anyhow::Result<()> {
    if let Some(env) = env {
        validate_dns_label("environment name", env).map_err(|e| anyhow!("--env: {e}"))?;
    }
    if let Some(app) = app {
        validate_dns_label("app name", app).map_err(|e| anyhow!("--app: {e}"))?;
    }
    Ok(())
}

/// `30d`, `12h`, `90m`, `45s` as seconds.
pub fn parse_window(text: &str) -> Result<u64, String> {
    let usage = || {
        format!("{text:?} is not a window; write a whole number and a unit: 30d, 12h, 90m or 45s")
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(usage)?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(usage());
    }
    let unit_seconds: u64 = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(usage()),
    };
    let seconds = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_seconds))
        .filter(|&s| s <= MAX_WINDOW_SECONDS)
        .ok_or_else(|| format!("{text:?} is longer than the longest window, 366d"))?;
    if seconds == 0 {
        return Err(format!("{text:?} is empty; the window must be at least 1s"));
    }
    Ok(seconds)
}

/// Asks the metrics agent; its `{"error": …}` answer becomes an error. Returns the answer as
/// sent and as read.
async fn ask(nats: &NatsArgs, query: &str, request: &str) -> anyhow::Result<(String, Value)> {
    let bus = crate::connect(nats).await?;
    let subject = baton_core::subject::api(query);
    let reply = tokio::time::timeout(
        ANSWER_TIMEOUT,
        bus.client()
            .request(subject.clone(), request.to_owned().into_bytes().into()),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "the metrics agent did not answer on {subject} within {}s",
            ANSWER_TIMEOUT.as_secs()
        )
    })?
    .map_err(|e| {
        if e.kind() == async_nats::RequestErrorKind::NoResponders {
            anyhow!("the metrics agent is not running (no answer on {subject})")
        } else {
            anyhow!("asking the metrics agent on {subject}: {e}")
        }
    })?;
    let raw = String::from_utf8(reply.payload.to_vec())
        .map_err(|_| anyhow!("the metrics agent's answer on {subject} is not UTF-8 text"))?;
    let answer: Value = serde_json::from_str(&raw)
        .map_err(|e| anyhow!("the metrics agent's answer on {subject} is not JSON: {e}"))?;
    if let Some(error) = answer.get("error").and_then(Value::as_str) {
        bail!("the metrics agent refused the request: {error}");
    }
    Ok((raw, answer))
}

/// At most `max` characters of `text`, with an ellipsis when cut (`baton status ID` has it all).
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// Seconds as `1d 2h`, `3h 4m`, `5m 6s`, `7s` or `0.25s`.
fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    if seconds < 10.0 && seconds.fract() != 0.0 {
        return format!("{}s", (seconds * 100.0).round() / 100.0);
    }
    let s = seconds.round() as u64;
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "n/a (nothing ended)".into())
}

fn count(v: &Value, field: &str) -> u64 {
    v.get(field).and_then(Value::as_u64).unwrap_or(0)
}

/// `mean 5m 20s, median 5m 0s (3 <what>)` or `n/a (no <what>)`.
fn stats(v: &Value, what: &str) -> String {
    let n = count(v, "count");
    match (
        v.get("mean_seconds").and_then(Value::as_f64),
        v.get("median_seconds").and_then(Value::as_f64),
    ) {
        (Some(mean), Some(median)) if n > 0 => format!(
            "mean {}, median {} ({n} {what})",
            duration(mean),
            duration(median)
        ),
        _ => format!("n/a (no {what})"),
    }
}

fn report_text(window: &str, r: &Value) -> String {
    let scope = match (
        r.get("env").and_then(Value::as_str),
        r.get("app").and_then(Value::as_str),
    ) {
        (Some(e), Some(a)) => format!("{a} in {e}"),
        (Some(e), None) => format!("every app in {e}"),
        (None, Some(a)) => format!("{a} in every environment"),
        (None, None) => "every app and environment".into(),
    };
    let text = |f: &str| r.get(f).and_then(Value::as_str).unwrap_or("?").to_owned();
    let releases = &r["releases"];
    let manual = &r["manual_rollbacks"];
    let frequency = &r["deployment_frequency"];
    let restore = &r["time_to_restore"];
    let mut out = format!(
        "Delivery metrics for {scope}, last {window} ({} to {})\n",
        text("from"),
        text("to")
    );
    let mut line = |name: &str, value: String| out.push_str(&format!("  {name:<24}{value}\n"));
    line(
        "releases ended",
        format!(
            "{} ({} succeeded, {} failed, {} rolled back); {} in flight",
            count(releases, "ended"),
            count(releases, "succeeded"),
            count(releases, "failed"),
            count(releases, "rolled_back"),
            count(releases, "in_flight"),
        ),
    );
    line(
        "manual rollbacks",
        format!(
            "{} completed, {} failed",
            count(manual, "completed"),
            count(manual, "failed")
        ),
    );
    line(
        "deployment frequency",
        format!(
            "{:.2} per day ({} deployments)",
            frequency["per_day"].as_f64().unwrap_or(0.0),
            count(frequency, "deployments")
        ),
    );
    line(
        "lead time for changes",
        stats(&r["lead_time"], "releases with a commit time"),
    );
    line("change failure rate", percent(&r["change_failure_rate"]));
    let unrestored = count(restore, "unrestored");
    let mut ttr = stats(restore, "restores");
    if unrestored > 0 {
        ttr.push_str(&format!("; {unrestored} failure(s) not restored yet"));
    }
    line("time to restore", ttr);
    line("success rate", percent(&r["success_rate"]));
    line("rollback rate", percent(&r["rollback_rate"]));
    line(
        "deployment time",
        stats(&r["deployment_time"], "succeeded releases"),
    );
    out
}

fn history_table(releases: &[Value]) -> String {
    if releases.is_empty() {
        return "no releases\n".into();
    }
    let field = |r: &Value, f: &str| r.get(f).and_then(Value::as_str).unwrap_or("-").to_owned();
    let header = [
        "RELEASE",
        "ENV",
        "APP",
        "STATUS",
        "IMAGE",
        "STRATEGY",
        "REQUESTED",
        "DURATION",
        "ACTOR",
        "FAILURE",
    ];
    let rows: Vec<[String; 10]> = releases
        .iter()
        .map(|r| {
            let mut status = field(r, "status").replace('_', " ");
            if let Some(step) = r.get("step").and_then(Value::as_u64) {
                status.push_str(&format!(" (step {step})"));
            }
            let image = if field(r, "kind") == "rollback" {
                "(manual rollback)".to_owned()
            } else {
                field(r, "image")
            };
            [
                field(r, "id"),
                field(r, "env"),
                field(r, "app"),
                status,
                image,
                field(r, "strategy").replace('_', "-"),
                field(r, "requested_at"),
                r.get("duration_seconds")
                    .and_then(Value::as_f64)
                    .map(duration)
                    .unwrap_or_else(|| "-".into()),
                field(r, "actor"),
                shorten(&field(r, "failure_reason"), 100),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push('\n');
    };
    push(header.to_vec());
    for row in &rows {
        push(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_parsed_or_refused_clearly() {
        let good = [
            ("30d", 2_592_000),
            ("12h", 43_200),
            ("90m", 5_400),
            ("45s", 45),
            ("366d", 31_622_400),
        ];
        for (text, seconds) in good {
            assert_eq!(parse_window(text), Ok(seconds), "{text}");
        }
        let bad = [
            ("", "is not a window"),
            ("30", "is not a window"),
            ("d", "is not a window"),
            ("30x", "is not a window"),
            ("1.5h", "is not a window"),
            ("-3d", "is not a window"),
            ("30 d", "is not a window"),
            ("0d", "must be at least 1s"),
            ("367d", "longer than the longest window"),
            ("99999999999999999999d", "longer than the longest window"),
        ];
        for (text, why) in bad {
            let err = parse_window(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn durations_read_with_units() {
        let table = [
            (0.25, "0.25s"),
            (7.0, "7s"),
            (320.0, "5m 20s"),
            (3_150.0, "52m 30s"),
            (86_420.0, "1d 0h"),
            (7_260.0, "2h 1m"),
            (-1.0, "-"),
        ];
        for (s, text) in table {
            assert_eq!(duration(s), text, "{s}");
        }
    }

    #[test]
    fn the_report_reads_as_text_with_units() {
        let r: Value = serde_json::from_str(
            r#"{
            "window_seconds": 2592000, "from": "A", "to": "B", "env": "prod", "app": null,
            "releases": {"ended": 6, "succeeded": 3, "failed": 2, "rolled_back": 1, "in_flight": 1},
            "manual_rollbacks": {"completed": 1, "failed": 0},
            "deployment_frequency": {"deployments": 3, "per_day": 0.1},
            "lead_time": {"count": 2, "mean_seconds": 3150.0, "median_seconds": 3150.0},
            "change_failure_rate": 0.5,
            "time_to_restore": {"count": 0, "mean_seconds": null, "median_seconds": null, "unrestored": 2},
            "success_rate": 0.5, "rollback_rate": null,
            "deployment_time": {"count": 3, "mean_seconds": 320.0, "median_seconds": 300.0}
        }"#,
        )
        .unwrap();
        let text = report_text("30d", &r);
        for expected in [
            "Delivery metrics for every app in prod, last 30d (A to B)",
            "6 (3 succeeded, 2 failed, 1 rolled back); 1 in flight",
            "0.10 per day (3 deployments)",
            "mean 52m 30s, median 52m 30s (2 releases with a commit time)",
            "change failure rate     50.0%",
            "n/a (no restores); 2 failure(s) not restored yet",
            "rollback rate           n/a (nothing ended)",
            "mean 5m 20s, median 5m 0s (3 succeeded releases)",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
    }

    #[test]
    fn the_history_is_a_table() {
        let rows: Value = serde_json::from_str(
            r#"[
            {"id": "r2", "env": "prod", "app": "web", "kind": "rollback", "status": "rolled_back",
             "actor": "bob", "requested_at": "T2", "duration_seconds": 50.0},
            {"id": "r1", "env": "prod", "app": "web", "kind": "release", "status": "deploying",
             "step": 2, "image": "web:v2", "strategy": "blue_green", "actor": "alice",
             "requested_at": "T1", "duration_seconds": null, "failure_reason": null}
        ]"#,
        )
        .unwrap();
        let rows = rows.as_array().unwrap();
        let text = history_table(rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("RELEASE  ENV   APP  STATUS"));
        assert!(lines[1].contains("rolled back") && lines[1].contains("(manual rollback)"));
        assert!(lines[2].contains("deploying (step 2)") && lines[2].contains("blue-green"));
        assert_eq!(history_table(&[]), "no releases\n");
    }
}
