//! Live runs, seen and changed from another process (`nbt ps`, `nbt set`, `nbt balance`) or from
//! the run's own schedule. A run's record names its BPF maps by kernel id; a change writes the
//! maps the programs read per packet, so it applies at once and nothing is reattached.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::enforce::edt::{self, Latency, MAX_DELAY};
use crate::enforce::shaper::{self, Directions, NetLimits, ShapedTraffic};
use crate::error::PlanError;
use crate::state::{state_dir, RecordsLock, RunFiles, RunRecord};
use crate::sys::private::{self, WideMode};
use crate::telemetry::series::Series;

#[derive(Debug, Serialize)]
pub struct LiveRun {
    pub run: String,
    /// Its nbt died: the run's processes still run under its pinned programs and cgroups, with
    /// nothing watching them, until `nbt cleanup` removes them.
    pub orphan: bool,
    pub nbt_pid: i32,
    /// "run" (a command nbt started), "attachment" (`nbt attach`) or "zone" (`nbt zone`).
    pub kind: &'static str,
    /// An attachment's target ("container web (3f2a1b2c3d4e)") and its cgroup.
    pub target: Option<String>,
    pub cgroup: Option<std::path::PathBuf>,
    pub command: Vec<String>,
    /// The name given with `--name`.
    pub name: Option<String>,
    pub seconds: f64,
    pub net_limits: NetLimits,
    pub shaped: Option<ShapedTraffic>,
    /// The balance now, in micro-units, for runs with one.
    pub balance_micro: Option<i64>,
    /// Each `--link`: its destinations and limits, and what its shaper passed and dropped.
    pub links: Vec<LiveLink>,
    /// The last sample of its time series, by column (`telemetry::series::COLUMNS`), the
    /// figures measured only.
    pub latest: Option<std::collections::BTreeMap<String, f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LiveLink {
    pub link: String,
    pub shaped: Option<ShapedTraffic>,
}

/// Every live run, with its current limits and counters.
pub fn live_runs() -> Vec<LiveRun> {
    runs(false)
}

/// Every run whose record is there: the live ones, and with `orphans` those whose nbt died.
pub fn runs(orphans: bool) -> Vec<LiveRun> {
    RunRecord::read_all(&state_dir())
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .filter_map(|record| {
            let orphan = !record.supervisor_alive();
            (orphans || !orphan).then(|| describe(record, orphan))
        })
        .collect()
}

/// The names of the runs whose nbt died and whose record is still there.
pub fn orphan_names() -> Vec<String> {
    RunRecord::read_all(&state_dir())
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .filter(|record| !record.supervisor_alive())
        .map(|record| record.name)
        .collect()
}

fn describe(record: RunRecord, orphan: bool) -> LiveRun {
    let latest = read_series(&record.name).and_then(|series| {
        let row = series.rows.last()?;
        Some(
            series
                .columns
                .iter()
                .zip(row)
                .filter_map(|(name, value)| Some((name.clone(), (*value)?)))
                .collect(),
        )
    });
    LiveRun {
        latest,
        balance_micro: record.ledger.as_ref().and_then(|ids| {
            let (credit, time, kernel) = crate::enforce::gate::read_ledger(ids).ok()?;
            Some(
                crate::enforce::gate::balance_pico(credit, time, &kernel)
                    / crate::enforce::ledger::PICO_PER_MICRO,
            )
        }),
        shaped: record
            .maps
            .as_ref()
            .and_then(|ids| shaper::read_by_id(ids).ok()),
        links: record
            .links
            .iter()
            .enumerate()
            .map(|(i, link)| LiveLink {
                link: link.clone(),
                shaped: record
                    .maps
                    .as_ref()
                    .and_then(|ids| shaper::read_link_by_id(ids, i as u32 + 1).ok()),
            })
            .collect(),
        seconds: if record.started_unix > 0.0 {
            crate::sys::proc::now_unix() - record.started_unix
        } else {
            0.0
        },
        kind: match (&record.attached, &record.zone) {
            (Some(_), _) => "attachment",
            (None, Some(_)) => "zone",
            (None, None) => "run",
        },
        target: record.attached.as_ref().map(|a| a.target.clone()),
        cgroup: record.attached.as_ref().map(|a| a.cgroups.v2.clone()),
        run: record.name,
        name: record.label,
        orphan,
        nbt_pid: record.supervisor_pid,
        command: record.command,
        net_limits: record.net,
    }
}

/// A live run's network limits and added delay: what `nbt set` and a schedule change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetSetting {
    pub net: NetLimits,
    pub latency: Option<Latency>,
    /// Where duplicate and corrupt apply, fixed when the run started: a change of them goes
    /// there.
    pub impair_direction: Directions,
}

/// Changes a live run's network setting from another process or from the run's schedule:
/// `change` gets the setting in force, read from the run's record (`nbt set` or the schedule may
/// have changed it since the run started), and edits it. The new limits go into the run's maps,
/// which the programs read per packet, so they apply at once; then into its record, so that
/// `nbt ps` shows them and the next change starts from them. A delay cannot be given to a run
/// started without one: fq is not on its interfaces.
///
/// The whole change, from reading the record to writing it back, holds the records' lock: two
/// changes at once (`nbt set` and a schedule's step) are made one after the other, the second
/// starting from the first's result, and the maps and the record agree after both.
pub fn change_network(
    run: &str,
    change: impl FnOnce(&mut NetSetting) -> Result<()>,
) -> Result<NetSetting> {
    let dir = state_dir();
    let run = &super::resolve_run(&dir, run)?;
    // Checked before the lock (a bad name, no such run), read again under it.
    RunRecord::find_live(&dir, run)?;
    let _lock = RecordsLock::take(&dir)?;
    let (_, record) = RunRecord::find_live(&dir, run)?;
    let Some(ids) = record.maps else {
        bail!("run '{run}' has not loaded its BPF programs yet; try again in a moment");
    };
    let before = NetSetting {
        net: record.net,
        latency: record.latency,
        impair_direction: record.impair_direction,
    };
    let mut next = before;
    change(&mut next)?;
    if next.latency != before.latency {
        let (Some(map), Some(_), Some(latency)) = (record.edt_map, before.latency, next.latency)
        else {
            bail!(
                "run '{run}' was started without --latency, so fq is not on its interfaces; \
                 start it with --latency (0ms will do) to change the delay while it runs"
            );
        };
        if latency.latency_ns + latency.jitter_ns > MAX_DELAY.as_nanos() as u64 {
            bail!(PlanError(
                "--latency plus --jitter above 10 s, the fq qdisc's horizon".into()
            ));
        }
        edt::set_by_id(map, &latency)?;
    }
    if next.impair_direction != before.impair_direction {
        bail!(PlanError(
            "--impair-direction is fixed when a run starts (its tc programs are put on then)"
                .into()
        ));
    }
    let ingress_tc = record.edt_map.is_some() && record.impair_direction.ingress();
    if next.net.ingress.impair.needs_tc() && !ingress_tc {
        bail!(
            "run '{run}' was started without --impair-direction ingress (or both) and \
             --duplicate or --corrupt, so its arriving packets pass no tc program of nbt's; \
             start it with --impair-direction ingress --duplicate 0% to change them while it runs"
        );
    }
    if next.net.egress.impair.needs_tc() && record.edt_map.is_none() {
        bail!(
            "run '{run}' was started without --latency, --duplicate, --corrupt or --reorder, so \
             its outgoing packets pass no tc program of nbt's; start it with --duplicate 0% to \
             change them while it runs"
        );
    }
    if next.net.egress.impair.reorder > 0.0 && next.latency.is_none_or(|l| l.latency_ns == 0) {
        bail!(PlanError(
            "--reorder sends some packets ahead of the added delay: it needs --latency".into()
        ));
    }
    if next.net != before.net {
        shaper::write_limits_by_id(&ids, &next.net)?;
    }
    RunRecord {
        net: next.net,
        latency: next.latency,
        ..record
    }
    .write_locked(&dir)?;
    Ok(next)
}

/// Changes the limits of some of a live run's `--link`s (`nbt set --link`): `change` gets each
/// link's setting in force and edits their limits; the changed ones go into the run's maps (the
/// programs read them per packet) and into its record, described by `describe`. The links
/// themselves (their destinations, their number, their delay) stay as the run started them:
/// their prefixes are in the kernel's trie, and their delay in the tc programs' map.
pub fn change_links(
    run: &str,
    change: impl FnOnce(&mut [super::LinkSetting]) -> Result<()>,
    describe: impl Fn(&super::LinkSetting) -> String,
) -> Result<Vec<super::LinkSetting>> {
    let dir = state_dir();
    let run = &super::resolve_run(&dir, run)?;
    RunRecord::find_live(&dir, run)?;
    let _lock = RecordsLock::take(&dir)?;
    let (_, mut record) = RunRecord::find_live(&dir, run)?;
    let Some(ids) = record.maps else {
        bail!("run '{run}' has not loaded its BPF programs yet; try again in a moment");
    };
    if record.link_settings.len() != record.links.len() {
        bail!(
            "run '{run}' was started by an nbt that does not record its links' limits; its \
             links cannot be changed while it runs"
        );
    }
    let before = record.link_settings.clone();
    change(&mut record.link_settings)?;
    for (i, (now, was)) in record.link_settings.iter().zip(&before).enumerate() {
        if now.to != was.to || now.latency != was.latency {
            bail!("a link's destinations and delay are fixed when the run starts");
        }
        if now.net != was.net {
            shaper::write_link_limits_by_id(&ids, i as u32 + 1, &now.net)?;
            record.links[i] = describe(now);
        }
    }
    let settings = record.link_settings.clone();
    record.write_locked(&dir)?;
    Ok(settings)
}

/// `nbt balance RUN add AMOUNT`: returns the balance after the top-up, in micro-units. The
/// credit is read and written back from user space, so two top-ups at once hold the records'
/// lock, one after the other (the kernel never writes the credit).
pub fn top_up(run: &str, micro: i64) -> Result<i64> {
    let dir = state_dir();
    let run = &super::resolve_run(&dir, run)?;
    // Checked before the lock (a bad name, no such run), read again under it.
    RunRecord::find_live(&dir, run)?;
    let _lock = RecordsLock::take(&dir)?;
    let (_, record) = RunRecord::find_live(&dir, run)?;
    let Some(ids) = record.ledger else {
        bail!("run '{run}' has no balance (it was started without --balance)");
    };
    crate::enforce::gate::top_up(&ids, micro)
}

/// How many of its last rows a live run's series file holds at least (5 minutes at 1 s).
pub const LIVE_ROWS: usize = 300;

/// A live run's recent samples on disk: a first line with the series' header (its columns,
/// interval; no rows), then one JSON row per line. A sample appends one line (one write, no
/// sync: this is a view, the receipt store keeps the series); every [`LIVE_ROWS`] lines the file
/// is rewritten with the last [`LIVE_ROWS`] rows, so it stays small. Removed when dropped, at
/// the run's end.
pub struct LiveSeries {
    path: std::path::PathBuf,
    header: String,
    recent: std::collections::VecDeque<String>,
    file: Option<std::fs::File>,
    appended: usize,
}

impl LiveSeries {
    /// `header`: the run's series before its first row.
    pub fn new(dir: &std::path::Path, header: &Series) -> LiveSeries {
        LiveSeries {
            path: RunFiles::of(dir, &header.run).series,
            header: header.tail(0).encode(),
            recent: std::collections::VecDeque::with_capacity(LIVE_ROWS + 1),
            file: None,
            appended: 0,
        }
    }

    /// Adds one sample's row.
    pub fn push(&mut self, row: &crate::telemetry::series::Row) -> Result<()> {
        use std::io::Write as _;
        let line = serde_json::to_string(row)? + "\n";
        self.recent.push_back(line.clone());
        if self.recent.len() > LIVE_ROWS {
            self.recent.pop_front();
        }
        match self.file.as_mut() {
            Some(file) if self.appended < LIVE_ROWS => {
                file.write_all(line.as_bytes())?;
                self.appended += 1;
            }
            _ => {
                let mut text = self.header.clone() + "\n";
                text.extend(self.recent.iter().map(String::as_str));
                private::replace_private(&self.path, text.as_bytes())?;
                self.file = Some(private::open_append(&self.path, "a run's live series")?);
                self.appended = 0;
            }
        }
        Ok(())
    }
}

impl Drop for LiveSeries {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The recent samples of the live run `run`, when it has written any (at most the last
/// [`LIVE_ROWS`]).
pub fn read_series(run: &str) -> Option<Series> {
    let path = RunFiles::of(&state_dir(), run).series;
    let bytes = private::read_private(&path, "a run's live series", WideMode::Refuse).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let mut lines = text.lines();
    let mut series = Series::decode(lines.next()?).ok()?;
    // A line being appended may be read half written: it does not parse and is left out.
    series.rows = lines.filter_map(|l| serde_json::from_str(l).ok()).collect();
    let keep = series.rows.len().saturating_sub(LIVE_ROWS);
    series.rows.drain(..keep);
    Some(series)
}

/// One event of a live run as `nbt top` shows it: a schedule's step or fault, a restart, nbt
/// stopping the workload, a fault of `nbt fault`. Read from the lines `schedule::apply::Event`
/// writes (its other fields passed over).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveEvent {
    /// Seconds after the workload started.
    pub t: f64,
    /// Where it came from: `schedule`, `nbt fault brownout`, ...
    pub source: String,
    pub what: String,
    /// Why the change could not be made, when it could not.
    pub error: Option<String>,
}

/// A live run's own events on disk (`RunFiles::live_events`), for `nbt top`: one JSON line per
/// event, appended when the supervisor sees new ones (a sample with none writes nothing).
/// Removed when dropped, at the run's end.
pub struct LiveEvents {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    /// How many of each list are on disk.
    written: [usize; 2],
}

impl LiveEvents {
    pub fn new(dir: &std::path::Path, run: &str) -> LiveEvents {
        LiveEvents {
            path: RunFiles::of(dir, run).live_events,
            file: None,
            written: [0; 2],
        }
    }

    /// Appends the events of `lists` not written yet (each list only grows; one that shrank,
    /// started again, is taken from its new length).
    pub fn append<T: Serialize>(&mut self, lists: [&[T]; 2]) -> Result<()> {
        use std::io::Write as _;
        let mut text = String::new();
        for (list, written) in lists.iter().zip(&mut self.written) {
            for event in list.get(*written..).unwrap_or_default() {
                text += &serde_json::to_string(event)?;
                text.push('\n');
            }
            *written = list.len();
        }
        if text.is_empty() {
            return Ok(());
        }
        match self.file.as_mut() {
            Some(file) => file.write_all(text.as_bytes())?,
            None => {
                private::replace_private(&self.path, text.as_bytes())?;
                self.file = Some(private::open_append(&self.path, "a run's live events")?);
            }
        }
        Ok(())
    }
}

impl Drop for LiveEvents {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The events so far of the live run `run`, in time order: its own (`LiveEvents`) and the
/// faults of `nbt fault` (`RunFiles::events`, each once it has ended).
pub fn read_events(run: &str) -> Vec<LiveEvent> {
    let files = RunFiles::of(&state_dir(), run);
    let own = private::read_private(&files.live_events, "a run's live events", WideMode::Refuse)
        .unwrap_or_default();
    let outside = std::fs::read(&files.events).unwrap_or_default();
    let mut events: Vec<LiveEvent> = [own, outside]
        .iter()
        .flat_map(|bytes| {
            String::from_utf8_lossy(bytes)
                .into_owned()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        // A line being appended may be read half written: it does not parse and is left out.
        .filter_map(|line| serde_json::from_str(&line).ok())
        .collect();
    events.sort_by(|a, b| a.t.total_cmp(&b.t));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_events_are_appended_once_each_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("runs")).unwrap();
        let event = |t: f64, what: &str| LiveEvent {
            t,
            source: "schedule".into(),
            what: what.into(),
            error: None,
        };
        let mut live = LiveEvents::new(dir.path(), "nbt-0123456789abcdef");
        let path = live.path.clone();
        live.append::<LiveEvent>([&[], &[]]).unwrap();
        assert!(!path.exists(), "nothing to write, no file");
        let steps = [event(1.0, "a"), event(3.0, "c")];
        let restarts = [event(2.0, "b")];
        live.append([&steps[..1], &restarts[..]]).unwrap();
        live.append([&steps[..], &restarts[..]]).unwrap();
        live.append([&steps[..], &restarts[..]]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let read: Vec<LiveEvent> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            read,
            vec![event(1.0, "a"), event(2.0, "b"), event(3.0, "c")]
        );
        drop(live);
        assert!(!path.exists());
    }
}
