//! The learning-update protocol (CryoFlux's loop): a workload reports each update it made (a
//! task: its name, the holdout loss before and after, the hashes of the model before and after);
//! nbt accepts it when the loss dropped by more than `--accept-min-delta`, charges it the joules
//! spent since the previous report, and writes a receipt for it.
//!
//! A workload under `nbt run` reports by appending one JSON object per line to the file named in
//! `$NBT_REPORT`:
//!
//! ```text
//! {"task_name":"epoch-3","base_loss":0.412,"new_loss":0.398,"adapter_hash":"sha256:…","base_model_hash":"sha256:…"}
//! ```
//!
//! `task_id` is optional (nbt numbers the run's tasks `RUN/N` otherwise); unknown fields are
//! refused, with the line, so that a misspelt field is not silently dropped.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::receipt::{Kind, Receipt, Writer};
use crate::telemetry::energy::Energy;

/// CryoFlux's threshold: an update is accepted when the holdout loss drops by more than this.
pub const DEFAULT_ACCEPT_MIN_DELTA: f64 = 0.002;

/// The environment variable naming the file a workload reports its tasks to.
pub const REPORT_ENV: &str = "NBT_REPORT";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskReport {
    pub task_name: String,
    #[serde(default)]
    pub task_id: Option<String>,
    pub base_loss: f64,
    pub new_loss: f64,
    #[serde(default)]
    pub adapter_hash: Option<String>,
    #[serde(default)]
    pub base_model_hash: Option<String>,
}

impl TaskReport {
    /// Reads one report, naming what is wrong with it.
    pub fn parse(text: &str) -> Result<TaskReport, String> {
        let report: TaskReport = serde_json::from_str(text).map_err(|e| {
            format!(
                "{e} (a report is one JSON object: task_name, base_loss, new_loss required; \
                 task_id, adapter_hash, base_model_hash optional)"
            )
        })?;
        if report.task_name.trim().is_empty() {
            return Err("task_name is empty".into());
        }
        for (name, loss) in [
            ("base_loss", report.base_loss),
            ("new_loss", report.new_loss),
        ] {
            if !loss.is_finite() {
                return Err(format!("{name} is {loss}, not a finite number"));
            }
        }
        // Each finite, their difference can still overflow (1e308 and -1e308): the delta would be
        // infinite, accepted whatever the threshold, and written as null in the receipt.
        if !(report.base_loss - report.new_loss).is_finite() {
            return Err("base_loss - new_loss is not a finite number".into());
        }
        Ok(report)
    }

    /// delta = base_loss − new_loss; accepted iff delta > `min_delta`.
    pub fn decide(&self, min_delta: f64) -> (f64, bool) {
        let delta = self.base_loss - self.new_loss;
        (delta, delta > min_delta)
    }

    /// The receipt of this task. `energy` is what the run spent since its previous report.
    pub fn receipt(
        &self,
        min_delta: f64,
        energy: Energy,
        template: &Receipt,
        task_number: usize,
    ) -> Receipt {
        let (delta, accepted) = self.decide(min_delta);
        let joules = energy.total();
        Receipt {
            kind: Kind::Task,
            timestamp: crate::receipt::body::now_rfc3339(),
            task_id: Some(self.task_id.clone().unwrap_or_else(|| {
                format!(
                    "{}/{task_number}",
                    template.run.as_deref().unwrap_or("task")
                )
            })),
            task_name: Some(self.task_name.clone()),
            joules_spent: joules,
            base_loss: Some(self.base_loss),
            new_loss: Some(self.new_loss),
            delta: Some(delta),
            accepted: Some(accepted),
            adapter_hash: self.adapter_hash.clone(),
            base_model_hash: self.base_model_hash.clone(),
            accept_min_delta: Some(min_delta),
            delta_per_kilojoule: joules.filter(|j| *j > 0.0).map(|j| delta / (j / 1000.0)),
            energy,
            ..template.clone()
        }
    }
}

/// How a reported task was judged, for the run's summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskOutcome {
    /// The task's receipt, when it was written.
    pub receipt: Option<i64>,
    pub task_name: String,
    pub delta: f64,
    pub accepted: bool,
    pub joules: Option<f64>,
}

/// A report line nbt could not use, kept for the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusedReport {
    pub line: usize,
    pub why: String,
}

/// Judges a run's reports as they come and writes their receipts.
pub struct Judge {
    pub min_delta: f64,
    /// The run's fields every task receipt repeats (run, command, constraints, host).
    pub template: Receipt,
    pub tasks: Vec<TaskOutcome>,
    pub refused: Vec<RefusedReport>,
    /// Receipts that could not be written.
    pub errors: Vec<String>,
}

impl Judge {
    pub fn new(min_delta: f64, template: Receipt) -> Judge {
        Judge {
            min_delta,
            template,
            tasks: Vec::new(),
            refused: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Judges `batch`, charging its tasks `energy()` (what was spent since the previous batch):
    /// reports read together (within one 100 ms read) share it equally, which the note says.
    pub fn take(
        &mut self,
        batch: Vec<(usize, Result<TaskReport, String>)>,
        writer: &mut Writer,
        energy: impl FnOnce() -> Energy,
    ) {
        let mut reports = Vec::new();
        for (line, report) in batch {
            match report {
                Ok(report) => reports.push(report),
                Err(why) => {
                    eprintln!("nbt: ${REPORT_ENV} line {line} refused: {why}");
                    self.refused.push(RefusedReport { line, why });
                }
            }
        }
        if reports.is_empty() {
            return;
        }
        let spent = energy();
        let share = reports.len();
        for report in reports {
            let mut energy = spent.clone();
            if share > 1 {
                for j in &mut energy.joules {
                    j.joules /= share as f64;
                }
                energy.note = Some(format!(
                    "{}; shared equally by {share} updates reported within one read of $NBT_REPORT",
                    energy.note.unwrap_or_default()
                ));
            }
            let mut receipt =
                report.receipt(self.min_delta, energy, &self.template, self.tasks.len() + 1);
            let seq = match writer.write(&mut receipt) {
                Ok(written) => Some(written.seq),
                Err(err) => {
                    let err = format!("task {}: {err:#}", report.task_name);
                    eprintln!("nbt: receipt not written: {err}");
                    self.errors.push(err);
                    None
                }
            };
            self.tasks.push(TaskOutcome {
                receipt: seq,
                task_name: report.task_name,
                delta: receipt.delta.unwrap_or_default(),
                accepted: receipt.accepted.unwrap_or_default(),
                joules: receipt.joules_spent,
            });
        }
    }
}

/// The file a run's workload appends its reports to, read as it grows.
pub struct ReportFile {
    path: PathBuf,
    offset: u64,
    pending: Vec<u8>,
    line: usize,
}

impl ReportFile {
    /// Makes an empty report file for run `name` in `dir` (beside the run's record).
    pub fn create(path: PathBuf) -> Result<ReportFile> {
        fs::File::create(&path)
            .with_context(|| format!("making the report file {}", path.display()))?;
        Ok(ReportFile {
            path,
            offset: 0,
            pending: Vec::new(),
            line: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete lines appended since the last call, parsed, with their line numbers;
    /// `at_end`: the run is over, so a last line without its newline counts too.
    pub fn read_new(&mut self, at_end: bool) -> Vec<(usize, Result<TaskReport, String>)> {
        if let Ok(mut file) = fs::File::open(&self.path) {
            if file.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut fresh = Vec::new();
                if let Ok(n) = file.read_to_end(&mut fresh) {
                    self.offset += n as u64;
                    self.pending.extend_from_slice(&fresh);
                }
            }
        }
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.take_line(&line[..line.len() - 1], &mut out);
        }
        if at_end && !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.take_line(&line, &mut out);
        }
        out
    }

    fn take_line(&mut self, bytes: &[u8], out: &mut Vec<(usize, Result<TaskReport, String>)>) {
        self.line += 1;
        let text = String::from_utf8_lossy(bytes);
        if text.trim().is_empty() {
            return;
        }
        out.push((self.line, TaskReport::parse(text.trim())));
    }
}

impl Drop for ReportFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// For workloads written in Rust (nbt's own trainer): appends `report` to `$NBT_REPORT` when nbt
/// set it; does nothing otherwise.
pub fn report_task(report: &TaskReport) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os(REPORT_ENV) else {
        return Ok(false);
    };
    let mut line = serde_json::to_string(report).map_err(std::io::Error::other)?;
    line.push('\n');
    // One write of a whole line, so that nbt never reads half of it as a line.
    fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(line.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_only_above_the_threshold() {
        let report = |base: f64, new: f64| TaskReport {
            task_name: "t".into(),
            task_id: None,
            base_loss: base,
            new_loss: new,
            adapter_hash: None,
            base_model_hash: None,
        };
        assert_eq!(report(0.5, 0.4).decide(0.002), (0.09999999999999998, true));
        assert!(!report(0.5, 0.499).decide(DEFAULT_ACCEPT_MIN_DELTA).1);
        assert!(!report(0.5, 0.502).decide(DEFAULT_ACCEPT_MIN_DELTA).1);
        // Exactly the threshold is not more than it.
        assert!(!report(0.25, 0.125).decide(0.125).1);
    }

    #[test]
    fn bad_reports_name_the_problem() {
        let err = TaskReport::parse(r#"{"task_name":"a","base_loss":1,"new_loss":0.5,"loss":2}"#)
            .unwrap_err();
        assert!(err.contains("unknown field `loss`"), "{err}");
        let err = TaskReport::parse(r#"{"task_name":"a","base_loss":1}"#).unwrap_err();
        assert!(err.contains("missing field `new_loss`"), "{err}");
        let err = TaskReport::parse(r#"{"task_name":" ","base_loss":1,"new_loss":1}"#).unwrap_err();
        assert!(err.contains("task_name is empty"), "{err}");
    }

    #[test]
    fn lines_read_as_they_are_completed() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = ReportFile::create(dir.path().join("nbt-x.reports")).unwrap();
        let append = |text: &str| {
            fs::OpenOptions::new()
                .append(true)
                .open(dir.path().join("nbt-x.reports"))
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        };
        append("{\"task_name\":\"a\",\"base_loss\":1,\"new_loss\":0.5}\n{\"task_na");
        let first = file.read_new(false);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].1.as_ref().unwrap().task_name, "a");
        append("me\":\"b\",\"base_loss\":1,\"new_loss\":0.9}\n\nnot json\n{\"task_name\":\"c\",\"base_loss\":1,\"new_loss\":1}");
        let rest = file.read_new(false);
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].1.as_ref().unwrap().task_name, "b");
        assert_eq!(rest[1].0, 4);
        assert!(rest[1].1.is_err());
        let last = file.read_new(true);
        assert_eq!(last[0].1.as_ref().unwrap().task_name, "c");
        let path = file.path().to_path_buf();
        drop(file);
        assert!(!path.exists());
    }
}
