//! `nbt receipts list | show ID | verify [--pubkey FILE] | export --format jsonl|in-toto | pubkey
//! | series RUN [--format csv|json]`.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use crate::receipt::export::{self, short};
use crate::receipt::key::{self, NodeKey};
use crate::receipt::store::{Row, Store};
use crate::receipt::verify;
use crate::telemetry::series::Series;

use super::args::{ReceiptsAction, ReceiptsArgs};

/// One line per receipt: number, time, kind, run, task, outcome, joules, hash.
pub fn list(path: &Path, json: bool, run: Option<&str>) -> Result<i32> {
    let store = Store::open_existing(path)?;
    let mut rows = store.rows()?;
    if let Some(run) = run {
        // A name given with --name stands for every run that had it.
        let named: std::collections::BTreeSet<String> = rows
            .iter()
            .filter(|r| summary_name(r).as_deref() == Some(run))
            .filter_map(|r| r.run.clone())
            .collect();
        rows.retain(|r| {
            r.run
                .as_deref()
                .is_some_and(|n| n == run || named.contains(n))
        });
    }
    if json {
        for row in &rows {
            println!("{}", export::jsonl_line(row)?);
        }
        return Ok(0);
    }
    if rows.is_empty() {
        eprintln!("no receipts yet in {}", path.display());
        return Ok(0);
    }
    println!(
        "{:>5}  {:<24}  {:<5}  {:<20}  {:<14}  {:>10}  {:>10}  HASH",
        "SEQ", "TIME", "KIND", "RUN", "TASK", "OUTCOME", "JOULES"
    );
    for row in &rows {
        let body: Value = serde_json::from_str(&row.body).unwrap_or(Value::Null);
        let outcome = match (
            body.get("accepted").and_then(Value::as_bool),
            body.get("exit_status").and_then(Value::as_i64),
        ) {
            (Some(true), _) => "accepted".to_string(),
            (Some(false), _) => "rejected".to_string(),
            (None, Some(status)) => format!("exit {status}"),
            (None, None) => "-".into(),
        };
        let joules = body
            .get("joules_spent")
            .and_then(Value::as_f64)
            .map(|j| format!("{j:.1}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:>5}  {:<24}  {:<5}  {:<20}  {:<14}  {:>10}  {:>10}  {}",
            row.seq,
            row.timestamp,
            row.kind,
            row.run.as_deref().unwrap_or("-"),
            row.task_name.as_deref().unwrap_or("-"),
            outcome,
            joules,
            short(&row.receipt_hash)
        );
    }
    Ok(0)
}

/// The name a run receipt's run was given with `--name`.
fn summary_name(row: &Row) -> Option<String> {
    let body: Value = serde_json::from_str(&row.body).ok()?;
    Some(body.pointer("/summary/name")?.as_str()?.to_string())
}

/// A receipt by number, or by a prefix (8 hex digits or more) of its hash.
fn find<'a>(rows: &'a [Row], id: &str) -> Result<&'a Row> {
    let id = id.trim();
    if let Ok(seq) = id.parse::<i64>() {
        return rows
            .iter()
            .find(|r| r.seq == seq)
            .with_context(|| format!("no receipt {seq} (the store holds {})", span(rows)));
    }
    let prefix = id.to_ascii_lowercase();
    if prefix.len() < 8 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("ID '{id}': give a receipt number (as `nbt receipts list` shows) or 8 or more hex digits of its hash");
    }
    let found: Vec<&Row> = rows
        .iter()
        .filter(|r| r.receipt_hash.starts_with(&prefix))
        .collect();
    match found.as_slice() {
        [row] => Ok(row),
        [] => bail!("no receipt's hash starts with {prefix}"),
        many => bail!(
            "{} receipts' hashes start with {prefix}: give more digits",
            many.len()
        ),
    }
}

fn span(rows: &[Row]) -> String {
    match (rows.first(), rows.last()) {
        (Some(a), Some(b)) => format!("receipts {} to {}", a.seq, b.seq),
        _ => "no receipts".into(),
    }
}

pub fn show(path: &Path, id: &str) -> Result<i32> {
    let store = Store::open_existing(path)?;
    let rows = store.rows()?;
    let row = find(&rows, id)?;
    let body: Value = serde_json::from_str(&row.body)
        .with_context(|| format!("receipt {}: the body is not JSON", row.seq))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "seq": row.seq,
            "receipt_hash": row.receipt_hash,
            "signature": row.signature,
            "key_id": row.key_id,
            "receipt": body,
        }))?
    );
    Ok(0)
}

/// The key to verify with: the one given, else this node's own.
pub fn public_key(pubkey: Option<&Path>) -> Result<VerifyingKey> {
    match pubkey {
        Some(file) => key::read_public(file),
        None => {
            let own = key::default_key_path();
            if !own.exists() {
                bail!(
                    "no --pubkey FILE given and no node key at {} to verify with",
                    own.display()
                );
            }
            Ok(NodeKey::load(&own)?.public())
        }
    }
}

/// Every receipt of the store at `path` and every series checked with `public`: what verified,
/// as one line, or the first thing that did not.
pub fn check(path: &Path, store: &Store, public: &VerifyingKey) -> Result<String, verify::Failure> {
    let rows = store.rows().map_err(|e| verify::Failure {
        seq: None,
        why: format!("the receipts table cannot be read as receipts: {e:#}"),
    })?;
    let head = store.head().map_err(|e| verify::Failure {
        seq: None,
        why: format!("the head cannot be read: {e:#}"),
    })?;
    let ok = verify::verify(&rows, head.as_ref(), public)?;
    let series = store.series().map_err(|e| verify::Failure {
        seq: None,
        why: format!("the series table cannot be read: {e:#}"),
    })?;
    let series = verify::verify_series(&rows, &series)?;
    Ok(format!(
        "{} receipts in {}, chain intact, every hash and signature checks with {}{}; {series} time series match their receipts",
        ok.receipts,
        path.display(),
        key::key_id(public),
        ok.last_hash
            .map(|h| format!("; last hash {h}"))
            .unwrap_or_default()
    ))
}

/// Exit status 0 when everything checks, 1 otherwise (naming the first bad receipt and why).
pub fn verify(path: &Path, pubkey: Option<&Path>) -> Result<i32> {
    let public = public_key(pubkey)?;
    let store = Store::open_existing(path)?;
    match check(path, &store, &public) {
        Ok(what) => {
            println!("verified: {what}");
            Ok(0)
        }
        Err(failure) => {
            println!("FAILED: {failure}");
            Ok(1)
        }
    }
}

pub fn export(path: &Path, format: &str) -> Result<i32> {
    let store = Store::open_existing(path)?;
    let rows = store.rows()?;
    match format {
        "jsonl" => {
            for row in &rows {
                println!("{}", export::jsonl_line(row)?);
            }
        }
        "in-toto" => {
            let key = NodeKey::load(&key::default_key_path())
                .context("the in-toto export is signed with the node's key")?;
            for row in &rows {
                println!("{}", export::dsse_envelope(row, &key)?);
            }
        }
        other => bail!("--format '{other}': accepted: jsonl, in-toto"),
    }
    Ok(0)
}

/// A run's receipt and its stored time series, checked against the hash the receipt holds.
pub fn run_series(store: &Store, id: &str) -> Result<(Row, Value, Series)> {
    let rows = store.rows()?;
    let row = if id.starts_with("nbt-") {
        rows.iter()
            .rev()
            .find(|r| r.kind == "run" && r.run.as_deref() == Some(id))
            .with_context(|| format!("no run receipt of {id} in {}", store.path().display()))?
    } else if crate::state::valid_label(id).is_ok() {
        // The last run given this name.
        rows.iter()
            .rev()
            .find(|r| r.kind == "run" && summary_name(r) == Some(id.to_string()))
            .with_context(|| {
                format!(
                    "no run named {id} has a receipt in {}",
                    store.path().display()
                )
            })?
    } else {
        find(&rows, id)?
    };
    let run = row.run.clone().unwrap_or_default();
    if row.kind != "run" {
        bail!(
            "receipt {} is a {} receipt; a run's series is named by its run ({run}) or its run receipt",
            row.seq,
            row.kind
        );
    }
    let body: Value = serde_json::from_str(&row.body)
        .with_context(|| format!("receipt {}: the body is not JSON", row.seq))?;
    let Some(expected) = body
        .pointer("/summary/series/sha256")
        .and_then(Value::as_str)
    else {
        bail!(
            "run {run} (receipt {}) has no time series: it ran under an nbt that recorded none",
            row.seq
        );
    };
    let text = store
        .series_of(&run)?
        .with_context(|| format!("the time series of run {run} is missing from the store"))?;
    let actual = crate::receipt::store::sha256_hex(text.as_bytes());
    if actual != expected {
        bail!("the time series of run {run} has sha256 {actual}, but its receipt {} says {expected}: it was altered", row.seq);
    }
    let series = Series::decode(&text)
        .with_context(|| format!("the time series of run {run} cannot be read"))?;
    Ok((row.clone(), body, series))
}

pub fn series(path: &Path, id: &str, format: &str) -> Result<i32> {
    let store = Store::open_existing(path)?;
    let (row, body, series) = run_series(&store, id)?;
    let text = match format {
        "csv" => series.to_csv(),
        _ => {
            serde_json::to_string_pretty(&serde_json::json!({
                "run": series.run,
                "receipt": { "seq": row.seq, "receipt_hash": row.receipt_hash },
                "series": series,
                "events": body.pointer("/summary/events").cloned().unwrap_or(Value::Null),
            }))? + "\n"
        }
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(0),
    }
}

pub fn pubkey() -> Result<i32> {
    let key = NodeKey::load_or_create(&key::default_key_path())?;
    print!("{}", key::public_pem(&key.public()));
    Ok(0)
}

pub fn command(args: ReceiptsArgs) -> i32 {
    let path = args
        .receipts
        .clone()
        .unwrap_or_else(crate::receipt::store::default_path);
    let result = match &args.action {
        ReceiptsAction::List { json, run } => list(&path, *json, run.as_deref()),
        ReceiptsAction::Show { id } => show(&path, id),
        ReceiptsAction::Verify { pubkey } => verify(&path, pubkey.as_deref()),
        ReceiptsAction::Export { format } => export(&path, format),
        ReceiptsAction::Pubkey => pubkey(),
        ReceiptsAction::Series { run, format } => series(&path, run, format),
    };
    result.unwrap_or_else(|err| {
        eprintln!("nbt receipts: {err:#}");
        1
    })
}
