//! `nbt report RUN [-o FILE]`: the run's report (`report`) written as one HTML file, its path
//! printed.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::args::ReportArgs;
use super::receipts;
use crate::receipt::store::Store;
use crate::report::{self, Input, Verification};

/// Writes the report of run `id` from the store at `store_path` to `output` (default:
/// `RUN.html` in the current directory); returns the file's absolute path.
pub fn write(
    store_path: &Path,
    id: &str,
    output: Option<&Path>,
    pubkey: Option<&Path>,
) -> Result<PathBuf> {
    let store = Store::open_existing(store_path)?;
    let (row, body, series) = receipts::run_series(&store, id)?;
    let verification = match receipts::public_key(pubkey) {
        Err(err) => Verification::NotRun(format!("{err:#}")),
        Ok(public) => match receipts::check(store_path, &store, &public) {
            Ok(what) => Verification::Passed(what),
            Err(failure) => Verification::Failed(failure.to_string()),
        },
    };
    let html = report::render(&Input {
        row: &row,
        body: &body,
        series: &series,
        verification,
    })?;
    let path = match output {
        Some(path) => path.to_path_buf(),
        None => PathBuf::from(format!(
            "{}.html",
            row.run.as_deref().unwrap_or(&series.run)
        )),
    };
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
    // Printed absolute, to be opened from anywhere.
    Ok(std::path::absolute(&path).unwrap_or(path))
}

pub fn command(args: ReportArgs) -> i32 {
    let store = args
        .receipts
        .clone()
        .unwrap_or_else(crate::receipt::store::default_path);
    match write(
        &store,
        &args.run,
        args.output.as_deref(),
        args.pubkey.as_deref(),
    ) {
        Ok(path) => {
            println!("{}", path.display());
            0
        }
        Err(err) => {
            eprintln!("nbt report: {err:#}");
            1
        }
    }
}
