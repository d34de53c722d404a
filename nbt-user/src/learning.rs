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

/// The longest report line: a report is a few hundred bytes. A longer line is refused, naming
/// its number and this limit, and skipped up to its newline without being held: 500 MB without
/// a newline took nbt to 765 MB of memory.
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// The most one read of the report file takes in; the run reads it as it is written (and again
/// 100 ms after a read that found reports), and takes every complete line of what it read.
pub const READ_CHUNK_BYTES: u64 = 1 << 20;

/// The most of a report file nbt reads in a run: some 50,000 reports, each a receipt. Past it
/// nbt reads no more, and says so once.
pub const MAX_REPORT_BYTES: u64 = 16 << 20;

/// The refusals one read lists; the rest of that read's are one entry that counts them. 16 MiB
/// of one-character lines are 8 million refusals, each a message: listed one by one they took
/// nbt to 18 GB of memory and wrote 3 GB to stderr.
pub const MAX_REFUSED_PER_READ: usize = 10;

/// The refusals a run lists (in its summary and on stderr); after them, one entry says that
/// more were refused.
pub const MAX_REFUSED_LISTED: usize = 100;

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

/// Lists a refused line on stderr and in `refused`, up to [`MAX_REFUSED_LISTED`]; then one entry
/// says more were refused from `line` on, and later ones are dropped.
fn list_refusal(refused: &mut Vec<RefusedReport>, line: usize, why: String) {
    let listed = refused.len();
    if listed > MAX_REFUSED_LISTED {
        return;
    }
    let why = if listed < MAX_REFUSED_LISTED {
        why
    } else {
        format!(
            "more lines were refused from this one on; only the first {MAX_REFUSED_LISTED} \
             refusals are listed"
        )
    };
    eprintln!("nbt: ${REPORT_ENV} line {line} refused: {why}");
    refused.push(RefusedReport { line, why });
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
    /// reports read together (in one read) share it equally, which the note says.
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
                Err(why) => list_refusal(&mut self.refused, line, why),
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

/// A file reports are appended to, read as it grows: the workload's own, or the one the agent
/// appends to for a run. nbt reads it through the descriptor it made it with, never through its
/// path again, so a file put in its place later is never read.
pub struct ReportFile {
    path: PathBuf,
    /// The workload's private directory, removed with the file.
    dir: Option<PathBuf>,
    file: fs::File,
    offset: u64,
    pending: Vec<u8>,
    line: usize,
}

impl ReportFile {
    /// Makes an empty report file at `path`, which must not exist (0600, root's: the agent's,
    /// beside the run's record).
    pub fn create(path: PathBuf) -> Result<ReportFile> {
        let file = create_new(&path)?;
        Ok(ReportFile {
            path,
            dir: None,
            file,
            offset: 0,
            pending: Vec::new(),
            line: 0,
        })
    }

    /// The workload's report file: `reports` in a directory of the run's own in the temporary
    /// directory, both made by nbt and then given to `uid`:`gid` (the state directory is
    /// root's alone).
    pub fn for_workload(run: &str, uid: u32, gid: u32) -> Result<ReportFile> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = workload_dir(run);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("making the workload's directory {}", dir.display()))?;
        let mut reports = ReportFile::create(dir.join("reports"))?;
        reports.dir = Some(dir.clone());
        std::os::unix::fs::fchown(&reports.file, Some(uid), Some(gid))
            .and_then(|()| std::os::unix::fs::chown(&dir, Some(uid), Some(gid)))
            .with_context(|| format!("giving {} to uid {uid}", dir.display()))?;
        Ok(reports)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete lines appended since the last call, parsed, with their line numbers;
    /// `at_end`: the run is over, so everything left is read (a chunk at a time) and a last
    /// line without its newline counts too.
    ///
    /// Memory stays bounded whatever the workload writes: a read takes at most
    /// [`READ_CHUNK_BYTES`], a line past [`MAX_LINE_BYTES`] is not kept (`pending` then holds
    /// `MAX_LINE_BYTES + 1` bytes, which marks the rest of the line as skipped), and nothing
    /// past [`MAX_REPORT_BYTES`] is read (`offset` one past it marks that as said).
    pub fn read_new(&mut self, at_end: bool) -> Batch {
        let mut out = Reading::default();
        while self.read_chunk(&mut out) && at_end {}
        if at_end && !self.pending.is_empty() {
            self.end_line(&mut out);
        }
        out.finish()
    }

    /// Reads the next chunk of the file and takes its lines; true when it read a whole chunk
    /// (more may follow).
    fn read_chunk(&mut self, out: &mut Reading) -> bool {
        let Ok(mut file) = self.file.try_clone() else {
            return false;
        };
        let room = MAX_REPORT_BYTES.saturating_sub(self.offset);
        if room == 0 {
            self.refuse_the_rest(&file, out);
            return false;
        }
        let want = READ_CHUNK_BYTES.min(room);
        let mut fresh = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err()
            || file.take(want).read_to_end(&mut fresh).is_err()
        {
            return false;
        }
        self.offset += fresh.len() as u64;
        self.take_lines(&fresh, out);
        fresh.len() as u64 == want
    }

    /// Once the file has grown past [`MAX_REPORT_BYTES`]: refuses the rest, once.
    fn refuse_the_rest(&mut self, file: &fs::File, out: &mut Reading) {
        let size = file.metadata().map_or(0, |m| m.len());
        if self.offset == MAX_REPORT_BYTES && size > MAX_REPORT_BYTES {
            self.offset += 1;
            let why = format!(
                "the report file is {size} bytes, above the limit of {MAX_REPORT_BYTES} bytes \
                 (16 MiB) nbt reads in a run: this line and everything after it are not read"
            );
            out.push(self.line + 1, Err(why));
        }
    }

    /// Splits `fresh` at its newlines: the first part ends the pending line, the last starts
    /// the next one.
    fn take_lines(&mut self, mut fresh: &[u8], out: &mut Reading) {
        while let Some(end) = fresh.iter().position(|b| *b == b'\n') {
            self.extend_line(&fresh[..end], out);
            self.end_line(out);
            fresh = &fresh[end + 1..];
        }
        self.extend_line(fresh, out);
    }

    /// Adds `bytes` to the pending line, refusing the line once it passes [`MAX_LINE_BYTES`].
    fn extend_line(&mut self, bytes: &[u8], out: &mut Reading) {
        if self.pending.len() > MAX_LINE_BYTES {
            return;
        }
        if self.pending.len() + bytes.len() <= MAX_LINE_BYTES {
            self.pending.extend_from_slice(bytes);
            return;
        }
        let why = format!(
            "longer than {MAX_LINE_BYTES} bytes (64 KiB), the limit of a report line; skipped \
             up to its newline"
        );
        out.push(self.line + 1, Err(why));
        // The marker of a line being skipped: longer than any line kept.
        self.pending.clear();
        self.pending.resize(MAX_LINE_BYTES + 1, 0);
    }

    /// The pending line is complete: taken, or dropped when it was refused as too long.
    fn end_line(&mut self, out: &mut Reading) {
        if self.pending.len() > MAX_LINE_BYTES {
            self.line += 1;
            self.pending.clear();
            return;
        }
        let line = std::mem::take(&mut self.pending);
        self.take_line(&line, out);
    }

    fn take_line(&mut self, bytes: &[u8], out: &mut Reading) {
        self.line += 1;
        let text = String::from_utf8_lossy(bytes);
        if text.trim().is_empty() {
            return;
        }
        out.push(self.line, TaskReport::parse(text.trim()));
    }
}

impl Drop for ReportFile {
    fn drop(&mut self) {
        match &self.dir {
            // Whatever the workload left in its directory goes too (remove_dir_all does not
            // follow symbolic links).
            Some(dir) => {
                let _ = fs::remove_dir_all(dir);
            }
            None => {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// The directory of the run's own the workload reports into (`/tmp/RUN`).
pub fn workload_dir(run: &str) -> PathBuf {
    std::env::temp_dir().join(run)
}

/// A new file, opened for reading: refused if anything (a link included) is at `path`.
fn create_new(path: &Path) -> Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("making the report file {}", path.display()))
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

/// Report lines as read, with their line numbers: each parsed, or why it was refused.
pub type Batch = Vec<(usize, Result<TaskReport, String>)>;

/// One `read_new`'s lines: its refusals past [`MAX_REFUSED_PER_READ`] are counted, not kept.
#[derive(Default)]
struct Reading {
    batch: Batch,
    refused: usize,
    /// The refusals not kept, and the line of the first of them.
    unlisted: usize,
    first_unlisted: usize,
}

impl Reading {
    fn push(&mut self, line: usize, report: Result<TaskReport, String>) {
        if report.is_err() {
            self.refused += 1;
            if self.refused > MAX_REFUSED_PER_READ {
                if self.unlisted == 0 {
                    self.first_unlisted = line;
                }
                self.unlisted += 1;
                return;
            }
        }
        self.batch.push((line, report));
    }

    fn finish(mut self) -> Batch {
        if self.unlisted > 0 {
            let why = format!(
                "{} lines refused from this one on in one read, not listed one by one",
                self.unlisted
            );
            self.batch.push((self.first_unlisted, Err(why)));
        }
        self.batch
    }
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

    /// A report line of exactly `len` bytes (without its newline), named `name`.
    fn line_of_length(name: &str, len: usize) -> String {
        let bare = format!("{{\"task_name\":\"{name}\",\"base_loss\":1,\"new_loss\":0.5}}");
        let pad = len - bare.len();
        format!(
            "{{\"task_name\":\"{name}{}\",\"base_loss\":1,\"new_loss\":0.5}}",
            "x".repeat(pad)
        )
    }

    fn appender(path: PathBuf) -> impl Fn(&[u8]) {
        move |bytes: &[u8]| {
            fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap()
                .write_all(bytes)
                .unwrap();
        }
    }

    #[test]
    fn a_line_longer_than_the_limit_is_refused_and_skipped_without_being_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbt-x.reports");
        let mut file = ReportFile::create(path.clone()).unwrap();
        let append = appender(path);
        // Exactly the limit: read.
        append(format!("{}\n", line_of_length("a", MAX_LINE_BYTES)).as_bytes());
        let read = file.read_new(false);
        assert_eq!(read.len(), 1);
        assert!(read[0].1.as_ref().unwrap().task_name.starts_with("ax"));
        // One byte more: refused with its line number, once, however many reads it spans.
        append(line_of_length("b", MAX_LINE_BYTES + 1).as_bytes());
        let refused = file.read_new(false);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, 2);
        let why = refused[0].1.as_ref().unwrap_err();
        assert!(why.contains("longer than 65536 bytes"), "{why}");
        let chunk = vec![b'y'; READ_CHUNK_BYTES as usize];
        for _ in 0..3 {
            append(&chunk);
            assert!(file.read_new(false).is_empty());
            assert!(file.pending.len() <= MAX_LINE_BYTES + 1);
        }
        // Its newline ends the skip; the next line is read, numbered after it.
        append(format!("\n{}\n", line_of_length("c", 100)).as_bytes());
        let after = file.read_new(false);
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].0, 3);
        assert!(after[0].1.as_ref().unwrap().task_name.starts_with("cx"));
        // A long last line without its newline: refused at the end too, not held.
        append(&chunk);
        let last = file.read_new(true);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].0, 4);
        assert!(file.pending.is_empty());
    }

    #[test]
    fn refusals_are_counted_past_ten_a_read_and_a_hundred_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbt-x.reports");
        let mut file = ReportFile::create(path.clone()).unwrap();
        let append = appender(path);
        append(format!("{}\n", "x\n".repeat(1000)).as_bytes());
        let read = file.read_new(false);
        assert_eq!(read.len(), MAX_REFUSED_PER_READ + 1);
        let (line, last) = read.last().unwrap();
        assert_eq!(*line, MAX_REFUSED_PER_READ + 1);
        let why = last.as_ref().unwrap_err();
        assert!(
            why.starts_with("990 lines refused from this one on"),
            "{why}"
        );
        let mut refused = Vec::new();
        for line in 1..=1000 {
            list_refusal(&mut refused, line, "bad".into());
        }
        assert_eq!(refused.len(), MAX_REFUSED_LISTED + 1);
        assert_eq!(refused[MAX_REFUSED_LISTED].line, MAX_REFUSED_LISTED + 1);
        assert!(refused[MAX_REFUSED_LISTED]
            .why
            .starts_with("more lines were refused"));
    }

    #[test]
    fn reads_are_bounded_and_the_end_reads_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbt-x.reports");
        let mut file = ReportFile::create(path.clone()).unwrap();
        let append = appender(path);
        // 3,000 lines of 1,000 bytes: about 2.9 chunks.
        let line = format!("{}\n", line_of_length("t", 999));
        append(line.repeat(3000).as_bytes());
        let first = file.read_new(false);
        assert_eq!(first.len(), READ_CHUNK_BYTES as usize / 1000);
        assert_eq!(file.offset, READ_CHUNK_BYTES);
        let rest = file.read_new(true);
        assert_eq!(first.len() + rest.len(), 3000);
        assert!(rest.iter().all(|(_, r)| r.is_ok()));
        assert_eq!(rest.last().unwrap().0, 3000);
    }

    #[test]
    fn nothing_past_the_file_limit_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbt-x.reports");
        let mut file = ReportFile::create(path.clone()).unwrap();
        let append = appender(path);
        // Lines of 1,024 bytes up to exactly the limit: all read.
        let line = format!("{}\n", line_of_length("t", 1023));
        let lines = (MAX_REPORT_BYTES / 1024) as usize;
        append(line.repeat(lines).as_bytes());
        let read = file.read_new(true);
        assert_eq!(read.len(), lines);
        assert!(read.iter().all(|(_, r)| r.is_ok()));
        // One byte more: refused once, naming the line it stopped at, and never read.
        append(b"{");
        let refused = file.read_new(false);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, lines + 1);
        let why = refused[0].1.as_ref().unwrap_err();
        assert!(why.contains("above the limit of 16777216 bytes"), "{why}");
        append(line.as_bytes());
        assert!(file.read_new(false).is_empty());
        assert!(file.read_new(true).is_empty());
    }
}
