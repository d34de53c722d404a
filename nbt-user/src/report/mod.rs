//! A run's report: one self-contained HTML page (inline CSS and SVG, no script, nothing
//! fetched) with every measured series against its limit, the run's events, its learning
//! updates, and its receipt's hashes with the store's verification.
//!
//! Everything here is built from what the store holds: the run receipt (its summary) and the
//! time series its hash covers. Every text that came from outside nbt (the command line, event
//! texts, task names, errors) is escaped.

pub mod chart;
pub mod lines;

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

use crate::receipt::store::Row;
use crate::telemetry::series::Series;

/// What verifying the store said.
#[derive(Debug, Clone, PartialEq)]
pub enum Verification {
    /// Every receipt and series checks: what was checked.
    Passed(String),
    /// The first thing that did not check, and why.
    Failed(String),
    /// Why it could not be checked (no key to check with, say).
    NotRun(String),
}

/// What a report is made from.
pub struct Input<'a> {
    /// The run's receipt, as stored.
    pub row: &'a Row,
    /// Its body, parsed.
    pub body: &'a Value,
    /// The run's time series, already checked against the hash in `body`.
    pub series: &'a Series,
    pub verification: Verification,
}

/// `text` safe inside HTML elements and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1320px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .hash { font-family: monospace; font-size: 12px; word-break: break-all; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { border: 1px solid #e4e4e4; }
.pass { background: #e6f4ea; border: 1px solid #2c9a2c; padding: 8px 12px; }
.fail { background: #fdecea; border: 1px solid #d62728; padding: 8px 12px; }
.muted { color: #666; font-size: 13px; }
";

fn str_at<'v>(value: &'v Value, pointer: &str) -> Option<&'v str> {
    value.pointer(pointer).and_then(Value::as_str)
}

fn f64_at(value: &Value, pointer: &str) -> Option<f64> {
    value.pointer(pointer).and_then(Value::as_f64)
}

/// A JSON scalar as a table shows it.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The leaves of a JSON object that are set (not null, not empty), by their dotted path.
fn leaves(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Null => {}
        Value::Object(map) => {
            for (key, v) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(&path, v, out);
            }
        }
        Value::Array(items) if items.is_empty() => {}
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => out.push((
            prefix.to_string(),
            items.iter().map(scalar).collect::<Vec<_>>().join(", "),
        )),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                leaves(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => out.push((prefix.to_string(), scalar(other))),
    }
}

/// A two-column table of (name, value) pairs, both escaped.
fn pairs_table(pairs: &[(String, String)]) -> String {
    let mut out = String::from("<table>\n");
    for (name, value) in pairs {
        let _ = writeln!(
            out,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(name),
            escape(value)
        );
    }
    out.push_str("</table>\n");
    out
}

/// A command line as one line a shell would take back, for reading (not for running).
fn command_line(body: &Value) -> String {
    let words: Vec<String> = body
        .get("command")
        .and_then(Value::as_array)
        .map(|words| words.iter().map(scalar).collect())
        .unwrap_or_default();
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One learning update from the summary's `tasks`.
struct Update {
    name: String,
    delta: f64,
    joules: Option<f64>,
    per_kilojoule: Option<f64>,
    accepted: bool,
    receipt: Option<i64>,
}

fn updates(summary: &Value) -> Vec<Update> {
    let Some(tasks) = summary.get("tasks").and_then(Value::as_array) else {
        return Vec::new();
    };
    tasks
        .iter()
        .map(|t| {
            let delta = t.get("delta").and_then(Value::as_f64).unwrap_or(f64::NAN);
            let joules = t.get("joules").and_then(Value::as_f64);
            Update {
                name: t.get("task_name").map(scalar).unwrap_or_else(|| "-".into()),
                delta,
                joules,
                // As the task's receipt has it (learning.rs): Δ per kilojoule spent.
                per_kilojoule: joules.filter(|j| *j > 0.0).map(|j| delta / (j / 1000.0)),
                accepted: t.get("accepted").and_then(Value::as_bool).unwrap_or(false),
                receipt: t.get("receipt").and_then(Value::as_i64),
            }
        })
        .collect()
}

fn number(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// The page.
pub fn render(input: &Input) -> Result<String> {
    let body = input.body;
    let summary = body.get("summary").cloned().unwrap_or(Value::Null);
    let run = input
        .row
        .run
        .clone()
        .unwrap_or_else(|| input.series.run.clone());
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>nbt report: {run}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>nbt report: {run}</h1>\n",
        run = escape(&run)
    );

    // What ran, where, how it ended.
    let mut about = vec![
        ("command".to_string(), command_line(body)),
        ("receipt time".to_string(), input.row.timestamp.clone()),
    ];
    for (name, pointer) in [
        ("user", "/summary/user/name"),
        ("profile", "/summary/profile"),
        ("killed by", "/summary/exit/signal"),
        ("host", "/host/hostname"),
        ("kernel", "/host/kernel"),
        ("cgroups", "/summary/cgroup_mode"),
    ] {
        if let Some(v) = body.pointer(pointer).filter(|v| !v.is_null()) {
            about.push((name.to_string(), scalar(v)));
        }
    }
    if let Some(status) = body.get("exit_status").and_then(Value::as_i64) {
        about.push(("exit status".into(), status.to_string()));
    }
    if let Some(wall) = f64_at(body, "/summary/wall_seconds") {
        about.push(("wall time".into(), format!("{wall:.1} s")));
    }
    if let Some(joules) = body.get("joules_spent").and_then(Value::as_f64) {
        about.push(("energy".into(), format!("{joules:.1} J")));
    }
    html.push_str(&pairs_table(&about));

    // The receipt and the verification.
    html.push_str("<h2>Receipt and verification</h2>\n");
    let (class, verdict) = match &input.verification {
        Verification::Passed(what) => ("pass", format!("PASS: {what}")),
        Verification::Failed(why) => ("fail", format!("FAIL: {why}")),
        Verification::NotRun(why) => ("fail", format!("NOT VERIFIED: {why}")),
    };
    let _ = writeln!(
        html,
        "<p class=\"{class}\" id=\"verification\">{}</p>",
        escape(&verdict)
    );
    let series_ref = summary.get("series").cloned().unwrap_or(Value::Null);
    let mut hashes = vec![
        ("receipt seq".to_string(), input.row.seq.to_string()),
        ("receipt hash".to_string(), input.row.receipt_hash.clone()),
        (
            "previous hash".to_string(),
            str_at(body, "/prev_hash").unwrap_or("-").to_string(),
        ),
        ("key id".to_string(), input.row.key_id.clone()),
        ("signature".to_string(), input.row.signature.clone()),
        (
            "series sha256".to_string(),
            str_at(&series_ref, "/sha256").unwrap_or("-").to_string(),
        ),
    ];
    hashes.push((
        "series".to_string(),
        format!(
            "{} rows, one per {} s (sampled every {} s); its hash was checked against the receipt's",
            input.series.rows.len(),
            input.series.interval_seconds,
            input.series.sampled_every_seconds
        ),
    ));
    html.push_str(&pairs_table(&hashes));

    // The limits in force at the end.
    html.push_str("<h2>Limits in force at the end</h2>\n");
    let mut limits = Vec::new();
    leaves(
        "",
        body.get("constraints").unwrap_or(&Value::Null),
        &mut limits,
    );
    // Settings at their neutral value (no loss, no duplicates...) say nothing.
    let all = limits.len();
    limits.retain(|(_, v)| !matches!(v.as_str(), "0" | "false" | "none"));
    html.push_str(&pairs_table(&limits));
    if limits.len() < all {
        let _ = writeln!(
            html,
            "<p class=\"muted\">{} settings at zero or none are left out.</p>",
            all - limits.len()
        );
    }

    // The events, numbered as on the charts.
    let events: Vec<&Value> = summary
        .get("events")
        .and_then(Value::as_array)
        .map(|e| e.iter().collect())
        .unwrap_or_default();
    let markers: Vec<(f64, usize)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.get("t").and_then(Value::as_f64).map(|t| (t, i + 1)))
        .collect();

    // The charts.
    html.push_str("<h2>Time series</h2>\n");
    let charts = lines::charts(input.series, &markers);
    let _ = writeln!(
        html,
        "<p class=\"muted\">Measured values are solid lines; limits in force are dashed red; \
         the numbered grey lines are the events below. Rates are the change between samples.</p>"
    );
    html.push_str("<div class=\"charts\">\n");
    for chart in &charts.charts {
        let _ = writeln!(
            html,
            "<div class=\"chart\" data-chart=\"{}\">{}</div>",
            escape(&chart.title),
            chart::time_chart(chart)?
        );
    }
    html.push_str("</div>\n");
    if charts.charts.is_empty() {
        html.push_str("<p>The series has no measured values to draw.</p>\n");
    }
    let mut left_out = Vec::new();
    if !charts.zero_throughout.is_empty() {
        left_out.push((
            "measured, zero throughout (not drawn)".to_string(),
            charts.zero_throughout.join(", "),
        ));
    }
    if !charts.not_measured.is_empty() {
        left_out.push((
            "not measured on this run".to_string(),
            charts.not_measured.join(", "),
        ));
    }
    if !charts.not_set.is_empty() {
        left_out.push((
            "no limit or impairment set".to_string(),
            charts.not_set.join(", "),
        ));
    }
    if !left_out.is_empty() {
        html.push_str(&pairs_table(&left_out));
    }

    // The event table.
    html.push_str("<h2>Events</h2>\n");
    if events.is_empty() {
        html.push_str("<p class=\"muted\">No events: no schedule, no fault, no restart.</p>\n");
    } else {
        html.push_str(
            "<table id=\"events\">\n<tr><th>#</th><th>t (s)</th><th>kind</th><th>source</th>\
             <th>what</th><th>error</th></tr>\n",
        );
        for (i, e) in events.iter().enumerate() {
            let _ = writeln!(
                html,
                "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td></tr>",
                i + 1,
                number(e.get("t").and_then(Value::as_f64), 3),
                escape(&e.get("kind").map(scalar).unwrap_or_default()),
                escape(&e.get("source").map(scalar).unwrap_or_default()),
                escape(&e.get("what").map(scalar).unwrap_or_default()),
                escape(&e.get("error").map(scalar).unwrap_or_default()),
            );
        }
        html.push_str("</table>\n");
    }

    // The learning updates.
    html.push_str("<h2>Learning updates</h2>\n");
    let updates = updates(&summary);
    if updates.is_empty() {
        html.push_str("<p class=\"muted\">The workload reported no learning updates.</p>\n");
    } else {
        let accepted = updates.iter().filter(|u| u.accepted).count();
        let _ = writeln!(
            html,
            "<p>{} updates reported, {accepted} accepted. Δ is the drop in holdout loss \
             (positive: the update helped).</p>",
            updates.len()
        );
        html.push_str(
            "<table id=\"updates\">\n<tr><th>#</th><th>task</th><th>Δ</th><th>joules</th>\
             <th>Δ per kJ</th><th>accepted</th><th>receipt</th></tr>\n",
        );
        for (i, u) in updates.iter().enumerate() {
            let _ = writeln!(
                html,
                "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
                i + 1,
                escape(&u.name),
                number(Some(u.delta), 6),
                number(u.joules, 2),
                number(u.per_kilojoule, 6),
                if u.accepted { "yes" } else { "no" },
                u.receipt.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            );
        }
        html.push_str("</table>\n<div class=\"charts\">\n");
        let deltas: Vec<(f64, bool)> = updates
            .iter()
            .map(|u| (if u.delta.is_finite() { u.delta } else { 0.0 }, u.accepted))
            .collect();
        let _ = writeln!(
            html,
            "<div class=\"chart\" data-chart=\"updates-delta\">{}</div>",
            chart::update_bars("Δ holdout loss per update", "Δ", &deltas)?
        );
        if updates.iter().any(|u| u.per_kilojoule.is_some()) {
            let per_kj: Vec<(f64, bool)> = updates
                .iter()
                .map(|u| (u.per_kilojoule.unwrap_or(0.0), u.accepted))
                .collect();
            let _ = writeln!(
                html,
                "<div class=\"chart\" data-chart=\"updates-per-kj\">{}</div>",
                chart::update_bars("Δ per kilojoule", "Δ per kJ", &per_kj)?
            );
        }
        html.push_str("</div>\n");
    }
    let _ = writeln!(
        html,
        "<p class=\"muted\">Written by nbt {} from the receipt store; this page fetches nothing.</p>\n</body>\n</html>",
        env!("CARGO_PKG_VERSION")
    );
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::series::Sample;

    fn row() -> Row {
        Row {
            seq: 7,
            kind: "run".into(),
            timestamp: "2026-12-03T10:00:00.000Z".into(),
            run: Some("nbt-test".into()),
            task_name: None,
            body: String::new(),
            receipt_hash: "ab".repeat(32),
            signature: "cd".repeat(64),
            key_id: "ed25519:ef".into(),
        }
    }

    #[test]
    fn the_page_escapes_what_came_from_outside_and_fetches_nothing() {
        let mut series = Series::new("nbt-test", 1.0);
        for i in 1..=4u64 {
            series.push(&Sample {
                t_seconds: i as f64,
                memory_bytes: Some(i << 20),
                ..Sample::default()
            });
        }
        let body = serde_json::json!({
            "command": ["sh", "-c", "echo '<script>alert(1)</script>' & x"],
            "summary": {
                "events": [{"t": 1.5, "kind": "step", "source": "line 2 <b>", "what": "rate \"x\" & <i>y</i>", "error": null}],
                "tasks": [
                    {"task_name": "<img src=x>", "delta": 0.01, "joules": 500.0, "accepted": true, "receipt": 3},
                    {"task_name": "t2", "delta": -0.001, "joules": null, "accepted": false, "receipt": 4}
                ],
                "series": {"sha256": "00ff", "rows": 4, "interval_seconds": 1.0}
            }
        });
        let html = render(&Input {
            row: &row(),
            body: &body,
            series: &series,
            verification: Verification::Failed("receipt 3: <bad> hash".into()),
        })
        .unwrap();
        for raw in ["<script", "<img", "<b>", "<i>y", "<bad>"] {
            assert!(!html.contains(raw), "{raw} unescaped");
        }
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("rate &quot;x&quot; &amp; &lt;i&gt;y&lt;/i&gt;"));
        assert!(html.contains("FAIL: receipt 3: &lt;bad&gt; hash"));
        // Nothing to fetch: no scripts, links, images, or URLs but the SVG namespace.
        for fetch in ["<link", "<img", " src=\"", " href=\"", "@import", "url("] {
            assert!(!html.contains(fetch), "{fetch}");
        }
        let urls = html.matches("http").count();
        assert_eq!(urls, html.matches("http://www.w3.org/2000/svg").count());
        // The memory chart, the two update charts; Δ/kJ = 0.01 / 0.5 kJ.
        assert_eq!(html.matches("<svg").count(), 3);
        assert!(html.contains("0.020000"));
        assert!(html.contains("<td>no</td>"));
        assert!(html.contains("00ff"));
    }
}
