//! `nbt run`: plan → cgroups → BPF → child → wait → summary → remove everything.

pub(crate) mod run_receipt;
pub(crate) mod sampling;
pub(crate) mod summary;
pub(crate) mod wake;
pub(crate) mod zone;

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use aya::Ebpf;

use crate::enforce::account::Traffic;
use crate::enforce::cgroup::{CgroupStats, Layout, Placement, RunCgroup, CONTROLLERS};
use crate::enforce::edt::Latency;
use crate::enforce::hwcaps::watch::{gpu_memory_env, GpuMemoryReport, Watch};
use crate::enforce::ledger::LedgerSummary;
use crate::enforce::shaper::{NetLimits, ShapedTraffic};
use crate::enforce::target::Restored;
use crate::enforce::{account, edt, gate, shaper};
use crate::plan::link::Link;
use crate::plan::target::Target;
use crate::plan::Plan;
use crate::run::sampling::{Sampler, Sources};
use crate::run::summary::{AttachReport, HardwareReport, LinkReport, RunSummary};
use crate::run::wake::{Earliest, ReportWatch, SAMPLE_INTERVAL};
use crate::state::{self, RecordGuard, RunRecord};
use crate::sys::loader;
use crate::sys::pin::Pins;
use crate::sys::supervise::{self, SpawnError};
use crate::sys::user::Identity;
use crate::telemetry::energy::{self, Energy};
use crate::telemetry::series::SeriesRef;
use crate::{learning, receipt, schedule};

/// How often the gate's host names are resolved again while a run lives.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);

/// A restarted workload counts as recovered when it reports progress, or stays up this long.
pub const RECOVERED_AFTER: Duration = Duration::from_secs(10);

fn lifecycle_event(
    started: Instant,
    kind: schedule::Origin,
    what: String,
    error: Option<String>,
) -> schedule::apply::Event {
    schedule::apply::Event {
        t: started.elapsed().as_secs_f64(),
        kind,
        source: "workload".into(),
        what,
        error,
        counters: schedule::apply::Counters::default(),
        during: None,
    }
}

fn describe_exit(exit: &supervise::Exit) -> String {
    match (&exit.code, &exit.signal) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by {signal}"),
        (None, None) => format!("status {}", exit.status),
    }
}

/// Where each controller lives, for the summary: "hybrid (memory, cpu, pids in v1)".
fn describe_layout(layout: &Layout) -> String {
    let v1: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| layout.placement(c) == Some(Placement::V1))
        .collect();
    if v1.is_empty() {
        layout.mode().to_string()
    } else {
        format!("{} ({} in v1)", layout.mode(), v1.join(", "))
    }
}

/// What a run holds: a command nbt starts (`nbt run`), or a workload that already runs
/// (`nbt attach`).
#[derive(Clone, Copy)]
pub enum Workload<'a> {
    Command(&'a [OsString]),
    Attach(&'a Target),
}

/// An outcome of `nbt run` that is not the workload's own exit.
pub enum RunError {
    Spawn(SpawnError),
    Nbt(anyhow::Error),
    /// A signal stopped nbt before the workload started; everything made was removed.
    Stopped(libc::c_int),
}

/// Stops setting up when SIGINT, SIGTERM, SIGHUP or SIGQUIT arrived meanwhile.
fn unless_stopped() -> Result<(), RunError> {
    match supervise::take_pending_stop() {
        Some(signal) => Err(RunError::Stopped(signal)),
        None => Ok(()),
    }
}

impl From<anyhow::Error> for RunError {
    fn from(e: anyhow::Error) -> Self {
        RunError::Nbt(e)
    }
}

/// Runs `command` under `plan`. `signals` comes from [`supervise::block_signals`], called before
/// any thread was started. Returns the summary; everything the run made is gone when it returns.
///
/// The guards are locals of this function or fields of `Books`, `Armed` and `Running`, whose
/// fields are declared in the order they drop: what was made last goes first, however it ends.
pub fn execute(
    plan: &Plan,
    user: &Identity,
    workload: Workload,
    signals: &libc::sigset_t,
    extra_env: &[(&str, String)],
) -> Result<RunSummary, RunError> {
    unless_stopped()?;
    let layout = Layout::detect()?;
    let name = state::new_run_name()?;
    let record = first_record(plan, workload, &layout, &name)?;
    let state_dir = state::state_dir();
    let _record = RecordGuard::new(record.write(&state_dir)?, &record);

    // Opened first: a store or key that cannot be written stops the run before anything ran.
    let mut books = Books::open(plan, user, &state_dir, &name, &record.command)?;
    crate::sys::phase::mark("books_opened");
    unless_stopped()?;
    // Dropped in reverse order: the BPF links go first, then the cgroups (see `Armed`).
    let mut armed = Armed::attach(plan, &layout, &name, &record, workload)?;
    let record = armed.record(record)?;
    record.write(&state_dir)?;
    crate::sys::phase::mark("armed");
    // An attachment holds its target from here: a signal now stays queued and detaches it
    // (summary and receipt, everything put back), as it does once the wait has begun.
    let attached = matches!(workload, Workload::Attach(_));
    if !attached {
        unless_stopped()?;
    }

    let mut env = workload_env(&name, &books.reports, extra_env);
    // Last before the workload: the originals are on disk before anything changes, and the
    // guard puts them back however this function ends (errors and panics included).
    let mut hardware = state::hwcaps::hold(&plan.hwcaps, &state_dir, &name)?;
    let gpu_memory = gpu_memory(plan, &mut env)?;
    // The last moment a signal stops nbt: from the spawn on, it is the workload's.
    if !attached {
        unless_stopped()?;
    }
    let mut running = Running::start(plan, user, workload, &env, &armed, &record, gpu_memory)?;
    crate::sys::phase::mark("started");
    let exit = supervise_loop(
        plan,
        workload,
        signals,
        &env,
        &mut books,
        &mut armed,
        &mut running,
    );

    crate::sys::phase::mark("supervised");
    let mut ended = measure(
        &state_dir,
        &name,
        plan,
        exit,
        &mut books,
        &mut armed,
        &mut running,
    )?;
    let series = ended.series.take();
    crate::sys::phase::mark("measured");
    // The cgroups go first (their processes killed), then the programs; the rest of `armed`
    // (the fq guard) stays until the receipt is written.
    let (hardware, restored) = take_down(&mut armed.cgroup, &mut armed.pins, &mut hardware)?;
    if let Some(guard) = armed.latency.as_mut() {
        guard.drain(longest_delay(plan, &ended));
    }
    crate::sys::phase::mark("taken_down");
    let attached = record.attached.as_ref().map(|held| AttachReport {
        kind: held.kind.clone(),
        target: held.target.clone(),
        cgroup: held.cgroups.v2.clone(),
        ended: running.detached.clone().unwrap_or_default(),
        moved_back: held.moved,
        restored,
    });
    let mut summary = summarize(
        plan,
        &layout,
        record,
        ended,
        hardware,
        &mut books.judge,
        running,
    );
    summary.attached = attached;
    summary.series = series.as_ref().map(|(_, reference)| reference.clone());
    // Last of all, so that the receipt holds everything the run measured.
    write_receipt(&mut summary, &mut books, series.as_ref());
    crate::sys::phase::mark("receipt_written");
    Ok(summary)
}

/// The run's record as written before anything is made: no maps yet, no start time.
fn first_record(plan: &Plan, workload: Workload, layout: &Layout, name: &str) -> Result<RunRecord> {
    let (command, attached) = match workload {
        Workload::Command(command) => (
            command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            None,
        ),
        Workload::Attach(target) => (
            vec![
                "nbt".to_string(),
                "attach".to_string(),
                format!("--{}", target.kind),
                target.given.clone(),
            ],
            Some(state::Attached {
                kind: target.kind.to_string(),
                target: target.described.clone(),
                cgroups: target.cgroups.clone(),
                // Read before anything changes, and on disk before the first write.
                originals: match target.pid {
                    Some(_) => Vec::new(),
                    None => crate::enforce::cgroup::snapshot(layout, &target.cgroups),
                },
                moved: target.pid.is_some(),
            }),
        ),
    };
    let adopted = attached.as_ref().is_some_and(|a| !a.moved);
    Ok(RunRecord {
        name: name.to_string(),
        label: plan.name.clone(),
        supervisor_pid: std::process::id() as i32,
        supervisor_start_time: crate::sys::proc::process_start_time(std::process::id() as i32)
            .context("reading nbt's own start time from /proc")?,
        cgroups: match adopted {
            true => Vec::new(),
            false => layout.run_dirs(name)?,
        },
        command,
        net: plan.net,
        maps: None,
        ledger: None,
        edt_map: None,
        latency: plan.latency,
        links: plan.links.iter().map(|l| l.describe()).collect(),
        link_settings: plan
            .links
            .iter()
            .map(|l| state::LinkSetting {
                to: l.to.clone(),
                net: l.net,
                latency: l.latency,
            })
            .collect(),
        pins: None,
        qdiscs: None,
        started_unix: 0.0,
        impair_direction: plan.impair_direction,
        attached,
        zone: None,
    })
}

/// The receipt store, the workload's report file and the judge of its reports.
///
/// Fields drop in declaration order, the reverse of the order they are made in (as the locals
/// they replace did): the report file (removed on drop) first, the receipt writer last.
struct Books {
    /// The workload's report file, and the one the agent appends to (`/v1/report`).
    reports: learning::ReportFile,
    agent_reports: learning::ReportFile,
    judge: learning::Judge,
    receipts: receipt::Writer,
}

impl Books {
    fn open(
        plan: &Plan,
        user: &Identity,
        state_dir: &Path,
        name: &str,
        command: &[String],
    ) -> Result<Books> {
        let receipts = receipt::Writer::open(&plan.receipts)?;
        let reports = learning::ReportFile::for_workload(name, user.uid, user.gid)?;
        let agent_reports =
            learning::ReportFile::create(state::RunFiles::of(state_dir, name).reports)?;
        let mut template =
            receipt::Receipt::new(receipt::Kind::Task, receipts.key_id().to_string());
        template.run = Some(name.to_string());
        template.command = command.to_vec();
        template.constraints = run_receipt::constraints(
            &plan.profile,
            &plan.limits,
            &plan.net,
            plan.latency.as_ref(),
        );
        let judge = learning::Judge::new(plan.accept_min_delta, template);
        Ok(Books {
            reports,
            agent_reports,
            judge,
            receipts,
        })
    }
}

impl Books {
    /// The reports completed since the last call, the workload's first.
    fn new_reports(&mut self, at_end: bool) -> Vec<(usize, Result<learning::TaskReport, String>)> {
        let mut batch = self.reports.read_new(at_end);
        batch.extend(self.agent_reports.read_new(at_end));
        batch
    }
}

/// What is attached to the run's cgroup.
///
/// Fields drop in declaration order: the gate's log, the fq guard, the cgroups (their processes
/// killed), then the pinned links, so that no process of the run is left without its programs.
struct Armed {
    blocked: Option<gate::BlockedLog>,
    teardowns: Option<gate::Teardowns>,
    ledger: Option<gate::LedgerIds>,
    /// When the run ends normally, dropped after the programs (see `take_down`): fq goes back to
    /// the kernel's default on every interface.
    latency: Option<edt::LatencyGuard>,
    cgroup: RunCgroup,
    pins: Pins,
    ebpf: Ebpf,
}

/// Whether the run's interfaces get the tc programs. A target in another network namespace
/// (refused by `nbt attach` when it needs them for more) never sends by nbt's interfaces, so the
/// programs there could not take its lost segments: its egress loss stays at the cgroup.
fn takes_tc(plan: &Plan, workload: &Workload) -> bool {
    let elsewhere = matches!(workload, Workload::Attach(target) if target.other_netns());
    plan.needs_tc_beyond_loss() || (plan.needs_tc() && !elsewhere)
}

impl Armed {
    fn attach(
        plan: &Plan,
        layout: &Layout,
        name: &str,
        record: &RunRecord,
        workload: Workload,
    ) -> Result<Armed> {
        let mut pins = Pins::create(name)?;
        let mut cgroup = match &record.attached {
            Some(held) if !held.moved => RunCgroup::adopt(
                layout,
                name,
                &held.cgroups,
                held.originals.clone(),
                &plan.limits,
            )?,
            _ => RunCgroup::create(layout, name, &plan.limits)?,
        };
        let mut unused = vec![loader::SCHED_MAPS];
        if plan.prices.is_none() {
            unused.push(loader::GATE_MAPS);
        }
        if !plan.needs_ingress_tc() {
            unused.push(loader::RUN_SOCKETS_MAPS);
        }
        let tc = takes_tc(plan, &workload);
        if !tc {
            unused.push(loader::WIRE_LOSS_MAPS);
        }
        let mut ebpf = loader::load(&unused)?;
        crate::sys::phase::mark("loaded");
        account::attach(&mut ebpf, &cgroup.v2, &mut pins)?;
        // Always attached, unlimited when no limit is set, so that `nbt set` can add one later.
        shaper::attach(&mut ebpf, &cgroup.v2, &plan.net, &mut pins)?;
        let links: Vec<shaper::LinkLimits> = plan
            .links
            .iter()
            .map(|l| shaper::LinkLimits {
                prefixes: &l.prefixes,
                net: &l.net,
            })
            .collect();
        shaper::write_links(&mut ebpf, &links)?;
        let latency = match tc {
            true => {
                let links: Vec<Option<&Latency>> =
                    plan.links.iter().map(|l| l.latency.as_ref()).collect();
                Some(edt::attach(
                    &mut ebpf,
                    &cgroup.v2,
                    &edt::TcNeeds {
                        latency: plan.latency.as_ref(),
                        links: &links,
                        egress: plan.needs_egress_tc(),
                        ingress_impair: plan.needs_ingress_impair(),
                        queue: plan.ingress_queue,
                    },
                )?)
            }
            false => None,
        };
        let ledger = match &plan.prices {
            Some(prices) => Some(gate::attach(
                &mut ebpf, &cgroup.v2, prices, &plan.gate, &mut pins,
            )?),
            None => None,
        };
        let (blocked, teardowns) = match ledger {
            Some(_) => (
                Some(gate::BlockedLog::open(&mut ebpf)?),
                Some(gate::Teardowns::start(&mut ebpf)?),
            ),
            None => (None, None),
        };
        // Last, once every program holds the cgroup: the process it takes in is never there
        // without them.
        if let (Workload::Attach(target), Some(held)) = (workload, &record.attached) {
            if let Some(pid) = target.pid {
                cgroup.take_in(pid, held.cgroups.clone(), layout)?;
            }
        }
        Ok(Armed {
            blocked,
            teardowns,
            ledger,
            latency,
            cgroup,
            pins,
            ebpf,
        })
    }

    /// `record` with the maps `nbt set` and `nbt cleanup` need, and the start time.
    fn record(&self, record: RunRecord) -> Result<RunRecord> {
        Ok(RunRecord {
            maps: Some(shaper::map_ids(&self.ebpf)?),
            edt_map: match self.latency {
                Some(_) => Some(edt::map_id(&self.ebpf)?),
                None => None,
            },
            ledger: self.ledger,
            pins: Some(self.pins.dir().to_path_buf()),
            qdiscs: self.latency.as_ref().map(|guard| guard.qdiscs.clone()),
            started_unix: crate::sys::proc::now_unix(),
            ..record
        })
    }
}

/// The workload's environment: the run's name, where to report, and what the caller adds.
fn workload_env<'a>(
    name: &str,
    reports: &learning::ReportFile,
    extra_env: &[(&'a str, String)],
) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("NBT_RUN", name.to_string()),
        (
            learning::REPORT_ENV,
            reports.path().to_string_lossy().into_owned(),
        ),
    ];
    env.extend(extra_env.iter().cloned());
    env
}

/// With `--gpu-memory`: adds the allocator settings to `env`, and what the summary reports.
fn gpu_memory(plan: &Plan, env: &mut Vec<(&str, String)>) -> Result<Option<GpuMemoryReport>> {
    Ok(match &plan.hwcaps.gpu.memory_bytes {
        Some(cap) => {
            let totals = plan.hwcaps.gpu.memory_totals().map_err(|e| anyhow!(e.0))?;
            let caller_set = std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_some();
            let set = gpu_memory_env(cap.value, &totals, caller_set);
            env.extend(set.iter().cloned());
            Some(GpuMemoryReport {
                cap_bytes: cap.value,
                env: set.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                exceeded: None,
            })
        }
        None => None,
    })
}

/// The workload while it runs, and what watches it.
///
/// Fields drop in declaration order, the reverse of the order they were made in: the schedule's
/// controls (and any balloon) before the sensors' watch.
struct Running {
    lifecycle: Vec<schedule::apply::Event>,
    /// Since when the restarted workload runs, and how many updates had come before.
    recovering: Option<(Instant, usize)>,
    restarts: u32,
    timeline: schedule::apply::Runner,
    controls: schedule::apply::Controls,
    next_resolve: Instant,
    pid: i32,
    /// How an attachment ended (`nbt attach`).
    detached: Option<String>,
    user: Identity,
    started: Instant,
    /// Taken at the end for the last sample.
    sampler: Option<Sampler>,
    meter: energy::RunMeter,
    watch: Watch,
}

impl Running {
    /// Starts the watch, the meter and the workload.
    fn start(
        plan: &Plan,
        user: &Identity,
        workload: Workload,
        env: &[(&str, String)],
        armed: &Armed,
        record: &RunRecord,
        gpu_memory: Option<GpuMemoryReport>,
    ) -> Result<Running, RunError> {
        let watch = Watch::start(
            &crate::enforce::hwcaps::sysfs_root(),
            plan.hwcaps.gpu.chosen(),
            gpu_memory,
        );
        // Read before the spawn: a short workload can be done before the next line runs, and a
        // meter started after it would see none of its CPU time.
        let meter = energy::RunMeter::start(armed.cgroup.cpu_seconds());
        let started = Instant::now();
        let pid = match workload {
            Workload::Command(command) => {
                supervise::spawn(command, &armed.cgroup.procs_files(), env, user)
                    .map_err(RunError::Spawn)?
            }
            Workload::Attach(target) => target.pid.unwrap_or(0),
        };
        let next_resolve = Instant::now() + RESOLVE_INTERVAL;
        let controls = schedule::apply::Controls {
            edt_map: record.edt_map,
            ledger: record.ledger,
            run: record.name.clone(),
            memory: plan.limits.memory_bytes,
            balloon: None,
            gate_config: match armed.ledger {
                Some(_) => Some(gate::config_map_id(&armed.ebpf)?),
                None => None,
            },
        };
        let timeline = schedule::apply::Runner::new(
            plan.schedule.as_ref().map_or(&[][..], |s| &s.actions[..]),
        );
        let sampler = Sampler::new(
            &state::state_dir(),
            &record.name,
            plan.series_interval,
            plan.net,
            plan.latency,
        );
        Ok(Running {
            lifecycle: Vec::new(),
            recovering: None,
            restarts: 0,
            timeline,
            controls,
            next_resolve,
            pid,
            detached: None,
            user: user.clone(),
            started,
            sampler: Some(sampler),
            meter,
            watch,
        })
    }
}

/// Waits for the workload, doing what is due meanwhile (see [`wake`]), and starts it again while
/// the plan allows. Returns how the last one ended.
fn supervise_loop(
    plan: &Plan,
    workload: Workload,
    signals: &libc::sigset_t,
    env: &[(&str, String)],
    books: &mut Books,
    armed: &mut Armed,
    running: &mut Running,
) -> supervise::Exit {
    // `None`: the report files are read at every [`SAMPLE_INTERVAL`].
    let reports = ReportWatch::new(&[books.reports.path(), books.agent_reports.path()]);
    let mut duties = Duties {
        sampled: armed.cgroup.needs_sampling(),
        watched: reports.is_some(),
        more_reports: false,
    };
    let command = match workload {
        Workload::Command(command) => command,
        Workload::Attach(_) => {
            let wake = reports.as_ref().map(ReportWatch::fd);
            let events = armed.cgroup.v2.join("cgroup.events");
            let detached = supervise::wait_detached(&events, signals, wake, |reported| {
                if let (true, Some(reports)) = (reported, &reports) {
                    reports.drain();
                }
                on_wake(plan, books, armed, running, &mut duties, reported)
            });
            if plan.status_line {
                eprint!("\r\x1b[2K");
            }
            return detach_exit(running, detached);
        }
    };
    loop {
        let wake = reports.as_ref().map(ReportWatch::fd);
        let exit = supervise::wait(running.pid, signals, wake, |reported| {
            if let (true, Some(reports)) = (reported, &reports) {
                reports.drain();
            }
            on_wake(plan, books, armed, running, &mut duties, reported)
        });
        if plan.status_line {
            eprint!("\r\x1b[2K");
        }
        if plan.restart_max == 0 {
            return exit;
        }
        if !restarted(plan, command, env, &books.judge, armed, running, &exit) {
            return exit;
        }
    }
}

/// An attachment's end as the summary's exit: status 0, and how it ended in `running.detached`
/// and the event log.
fn detach_exit(running: &mut Running, detached: supervise::Detached) -> supervise::Exit {
    let (how, forwarded_signals) = match detached {
        supervise::Detached::Signal(signal) => {
            let name = supervise::signal_name(signal);
            (format!("detached by {name}"), vec![name])
        }
        supervise::Detached::Emptied => ("the target ended".to_string(), Vec::new()),
    };
    running.lifecycle.push(lifecycle_event(
        running.started,
        schedule::Origin::Exit,
        how.clone(),
        None,
    ));
    running.detached = Some(how);
    supervise::Exit {
        status: 0,
        code: None,
        signal: None,
        core_dumped: false,
        forwarded_signals,
    }
}

/// What the supervisor keeps between its wakes.
struct Duties {
    /// Whether peaks the kernel does not keep are sampled (see [`RunCgroup::needs_sampling`]).
    sampled: bool,
    /// Whether a write to the report files wakes the supervisor (see [`ReportWatch`]).
    watched: bool,
    /// The last read found reports: more may be waiting (one chunk is read per wake).
    more_reports: bool,
}

/// Whenever something is due (see [`wake`]): samples, watches the sensors, applies the
/// schedule, judges new reports and keeps the gate up to date. `reported`: a report file was
/// written to. Returns when it is next due (`None`: only when a report comes).
fn on_wake(
    plan: &Plan,
    books: &mut Books,
    armed: &mut Armed,
    running: &mut Running,
    duties: &mut Duties,
    reported: bool,
) -> Option<Instant> {
    if duties.sampled {
        armed.cgroup.sample();
    }
    let run_pids = || armed.cgroup.pids().into_iter().map(|p| p as u32).collect();
    if let Some(why) = running.watch.tick(run_pids) {
        for pid in armed.cgroup.pids() {
            // SAFETY: kill(2) with a pid of the run's own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        running.lifecycle.push(lifecycle_event(
            running.started,
            schedule::Origin::Stop,
            format!("nbt stopped the workload: {why}"),
            None,
        ));
    }
    let elapsed_ms = running.started.elapsed().as_millis() as u64;
    if running.timeline.due(elapsed_ms) {
        let shaped = shaper::read(&armed.ebpf).ok();
        let counters = schedule::apply::Counters::of(&armed.cgroup.stats(), shaped.as_ref())
            .with_ledger(armed.ledger.as_ref());
        running
            .timeline
            .run_due(elapsed_ms, &mut running.controls, &armed.cgroup, counters);
    }
    if reported || duties.more_reports || !duties.watched {
        let batch = books.new_reports(false);
        duties.more_reports = !batch.is_empty();
        if !batch.is_empty() {
            let cpu = armed.cgroup.cpu_seconds();
            books
                .judge
                .take(batch, &mut books.receipts, || running.meter.since_last(cpu));
        }
    }
    note_recovery(&books.judge, running);
    if let Some(sampler) = running.sampler.as_mut() {
        let sources = sources(plan, armed, &running.meter, &running.watch, running.started);
        let events = [&running.timeline.events[..], &running.lifecycle[..]];
        if let (Some(line), true) = (sampler.tick(sources, events), plan.status_line) {
            // One line, rewritten in place: carriage return, then erase the line.
            eprint!("\r\x1b[2K{line}");
        }
    }
    if let Some(log) = armed.blocked.as_mut() {
        log.drain();
    }
    if let (Some(ids), Some(prices)) = (&armed.ledger, &plan.prices) {
        if prices.hour_micro > 0 {
            let _ = gate::charge_time(
                ids,
                prices.hour_micro,
                running.started.elapsed().as_secs_f64(),
            );
        }
        // Host names may move: add the addresses they have now (never removing old ones).
        if Instant::now() >= running.next_resolve {
            resolve_gate_again(plan, armed, running);
        }
    }

    let mut next = Earliest::default();
    let every_sample =
        duties.sampled || armed.ledger.is_some() || duties.more_reports || !duties.watched;
    next.at(every_sample.then(|| Instant::now() + SAMPLE_INTERVAL));
    next.at(running
        .timeline
        .next_at_ms()
        .map(|ms| running.started + Duration::from_millis(ms)));
    next.at(running.watch.next_due());
    next.at(running.recovering.map(|(since, _)| since + RECOVERED_AFTER));
    next.at(running.sampler.as_ref().map(Sampler::next_due));
    next.get()
}

/// What a sample of the run reads now.
fn sources<'a>(
    plan: &Plan,
    armed: &'a mut Armed,
    meter: &'a energy::RunMeter,
    watch: &Watch,
    started: Instant,
) -> Sources<'a> {
    Sources {
        cgroup: &mut armed.cgroup,
        ebpf: &armed.ebpf,
        ledger: armed.ledger.as_ref(),
        meter,
        sensors: watch.latest(),
        elapsed: started.elapsed(),
        links: plan.links.len() as u32,
    }
}

/// Adds the addresses the gated hosts have now. A name that does not resolve keeps its old
/// addresses; more addresses than the gate holds close it to every destination.
fn resolve_gate_again(plan: &Plan, armed: &mut Armed, running: &mut Running) {
    running.next_resolve = Instant::now() + RESOLVE_INTERVAL;
    let Err(err) = gate::install_rules(&mut armed.ebpf, &plan.gate) else {
        return;
    };
    if err.downcast_ref::<gate::GateFull>().is_none() {
        return;
    }
    let what = match gate::gate_everything(&mut armed.ebpf) {
        Ok(()) => format!("{err:#}: every destination is gated from now on"),
        Err(closing) => format!("{err:#}; gating every destination failed too: {closing:#}"),
    };
    eprintln!("nbt: {what}");
    running.lifecycle.push(lifecycle_event(
        running.started,
        schedule::Origin::Gate,
        what,
        None,
    ));
}

/// A restarted workload that reported progress, or stayed up long enough, has recovered.
fn note_recovery(judge: &learning::Judge, running: &mut Running) {
    let restarts = running.restarts;
    if let Some((since, tasks)) = running.recovering {
        let reported = judge.tasks.len() > tasks;
        if reported || since.elapsed() >= RECOVERED_AFTER {
            running.lifecycle.push(lifecycle_event(
                running.started,
                schedule::Origin::Recovered,
                format!(
                    "recovered {:.2} s after restart {restarts}: {}",
                    since.elapsed().as_secs_f64(),
                    if reported {
                        "it reported progress".to_string()
                    } else {
                        format!("it stayed up {} s", RECOVERED_AFTER.as_secs())
                    }
                ),
                None,
            ));
            running.recovering = None;
        }
    }
}

/// Notes how the workload ended and, when it failed and restarts are left, starts it again.
/// Returns whether a new workload runs.
fn restarted(
    plan: &Plan,
    command: &[OsString],
    env: &[(&str, String)],
    judge: &learning::Judge,
    armed: &mut Armed,
    running: &mut Running,
    exit: &supervise::Exit,
) -> bool {
    let counters = schedule::apply::Counters::of(
        &armed.cgroup.stats(),
        shaper::read(&armed.ebpf).ok().as_ref(),
    )
    .with_ledger(armed.ledger.as_ref());
    let mut ended = lifecycle_event(
        running.started,
        schedule::Origin::Exit,
        format!("the workload ended: {}", describe_exit(exit)),
        None,
    );
    ended.counters = counters;
    running.lifecycle.push(ended);
    // A stop the user asked for (a signal nbt passed on) is not a failure to repair.
    let failed = exit.status != 0 && exit.forwarded_signals.is_empty();
    if !failed || running.restarts >= plan.restart_max {
        return false;
    }
    running.restarts += 1;
    let restarts = running.restarts;
    match supervise::spawn(command, &armed.cgroup.procs_files(), env, &running.user) {
        Ok(next) => {
            running.pid = next;
            running.lifecycle.push(lifecycle_event(
                running.started,
                schedule::Origin::Restart,
                format!("restart {restarts} of at most {}", plan.restart_max),
                None,
            ));
            running.recovering = Some((Instant::now(), judge.tasks.len()));
            true
        }
        Err(err) => {
            running.lifecycle.push(lifecycle_event(
                running.started,
                schedule::Origin::Restart,
                format!("restart {restarts}"),
                Some(err.to_string()),
            ));
            false
        }
    }
}

/// What the run measured once the workload was gone, read before anything is taken down.
struct Ended {
    exit: supervise::Exit,
    wall_seconds: f64,
    energy: Energy,
    ledger: Option<LedgerSummary>,
    stats: CgroupStats,
    events: Vec<schedule::apply::Event>,
    network: Traffic,
    shaped: ShapedTraffic,
    /// What each `--link` passed and dropped, in the plan's order.
    links: Vec<ShapedTraffic>,
    /// Each `--link`'s limits at the end (`nbt set --link` may change them), in the plan's order.
    link_nets: Vec<NetLimits>,
    net: NetLimits,
    latency: Option<Latency>,
    /// The time series (as stored) and what the receipt says of it.
    series: Option<(String, SeriesRef)>,
}

/// Judges the last reports and reads what the run measured, in the order the summary needs.
fn measure(
    state_dir: &Path,
    name: &str,
    plan: &Plan,
    exit: supervise::Exit,
    books: &mut Books,
    armed: &mut Armed,
    running: &mut Running,
) -> Result<Ended> {
    let wall_seconds = running.started.elapsed().as_secs_f64();
    let cpu = armed.cgroup.cpu_seconds();
    let last = books.new_reports(true);
    books
        .judge
        .take(last, &mut books.receipts, || running.meter.since_last(cpu));
    let energy = running.meter.total(cpu);
    let ledger = settle_ledger(plan, armed, wall_seconds)?;
    let series = running.sampler.take().map(|sampler| {
        let (series, reference) = sampler.finish(sources(
            plan,
            armed,
            &running.meter,
            &running.watch,
            running.started,
        ));
        (series.encode(), reference)
    });

    let stats = armed.cgroup.stats();
    let events = collect_events(state_dir, name, running, wall_seconds, &stats);
    let network = account::read(&armed.ebpf).context("reading the byte counters")?;
    let shaped = shaper::read(&armed.ebpf).context("reading the shaper's counters")?;
    let links = (1..=plan.links.len() as u32)
        .map(|link| shaper::read_link(&armed.ebpf, link))
        .collect::<Result<Vec<_>>>()
        .context("reading the links' counters")?;
    // `nbt set` may have changed the limits during the run: report the last ones.
    let (net, latency, link_nets) = RunRecord::find_live(state_dir, name)
        .map(|(_, r)| {
            let link_nets = r.link_settings.iter().map(|l| l.net).collect();
            (r.net, r.latency, link_nets)
        })
        .unwrap_or((plan.net, plan.latency, Vec::new()));
    let link_nets = match link_nets.len() == plan.links.len() {
        true => link_nets,
        false => plan.links.iter().map(|l| l.net).collect(),
    };
    Ok(Ended {
        exit,
        wall_seconds,
        energy,
        ledger,
        stats,
        events,
        network,
        shaped,
        links,
        link_nets,
        net,
        latency,
        series,
    })
}

/// For runs with a balance: charges the run's time and reads the ledger's end.
fn settle_ledger(
    plan: &Plan,
    armed: &mut Armed,
    wall_seconds: f64,
) -> Result<Option<LedgerSummary>> {
    Ok(match (&armed.ledger, &plan.prices) {
        (Some(ids), Some(prices)) => {
            if prices.hour_micro > 0 {
                gate::charge_time(ids, prices.hour_micro, wall_seconds)?;
            }
            if let Some(log) = armed.blocked.as_mut() {
                log.drain();
            }
            let torn_down = armed
                .teardowns
                .take()
                .map(gate::Teardowns::finish)
                .unwrap_or_default();
            Some(gate::summarize(ids, prices, &armed.ebpf, &torn_down)?)
        }
        _ => None,
    })
}

/// The schedule's events, the workload's and those injected from outside, in time order.
fn collect_events(
    state_dir: &Path,
    name: &str,
    running: &mut Running,
    wall_seconds: f64,
    stats: &CgroupStats,
) -> Vec<schedule::apply::Event> {
    let mut events = std::mem::take(&mut running.timeline.events);
    events.extend(std::mem::take(&mut running.lifecycle));
    // Faults injected from outside (`nbt fault`), in time order with the schedule's.
    events.extend(schedule::fault::take_outside_events(state_dir, name));
    events.sort_by(|a, b| a.t.total_cmp(&b.t));
    if running.timeline.not_reached() > 0 {
        events.push(schedule::apply::Event {
            t: wall_seconds,
            kind: schedule::Origin::Step,
            source: "schedule".into(),
            what: format!(
                "{} scheduled changes not reached: the workload ended first",
                running.timeline.not_reached()
            ),
            error: None,
            counters: schedule::apply::Counters::of(stats, None),
            during: None,
        });
    }
    events
}

/// Removes the cgroups (killing what is left in them), detaches the programs and puts the
/// hardware caps back, in that order.
fn take_down(
    cgroup: &mut RunCgroup,
    pins: &mut Pins,
    hardware: &mut Option<state::hwcaps::Held>,
) -> Result<(Option<HardwareReport>, Option<Restored>)> {
    let restored = cgroup.remove()?;
    pins.remove()?;
    let hardware = hardware.as_mut().map(|applied| {
        let restore_errors = applied.restore();
        HardwareReport {
            set: applied.set.clone(),
            original: applied.originals(),
            restored: restore_errors.is_empty(),
            restore_errors,
        }
    });
    Ok((hardware, restored))
}

/// The longest time a packet of the run may be held: at the start and at the end (`nbt set`
/// and schedules change it), of the run and of each `--link`.
fn longest_delay(plan: &Plan, ended: &Ended) -> Duration {
    edt::longest(
        plan.latency
            .iter()
            .chain(ended.latency.iter())
            .chain(plan.links.iter().filter_map(|l| l.latency.as_ref())),
    )
}

/// The run's summary, without its receipt yet.
fn summarize(
    plan: &Plan,
    layout: &Layout,
    record: RunRecord,
    ended: Ended,
    hardware: Option<HardwareReport>,
    judge: &mut learning::Judge,
    running: Running,
) -> RunSummary {
    let Running { watch, user, .. } = running;
    RunSummary {
        run: record.name,
        name: record.label,
        command: record.command,
        user,
        profile: plan.profile.clone(),
        limits: plan.limits.clone(),
        cgroup_mode: describe_layout(layout),
        exit: ended.exit,
        wall_seconds: ended.wall_seconds,
        cgroup: ended.stats,
        network: Some(ended.network),
        net_limits: ended.net,
        shaped: Some(ended.shaped),
        links: plan
            .links
            .iter()
            .cloned()
            .zip(ended.links)
            .zip(ended.link_nets)
            .map(|((link, shaped), net)| LinkReport {
                link: Link { net, ..link },
                shaped,
            })
            .collect(),
        ledger: ended.ledger,
        latency: ended.latency,
        energy: ended.energy,
        events: ended.events,
        series: None,
        tasks: std::mem::take(&mut judge.tasks),
        refused_reports: std::mem::take(&mut judge.refused),
        receipt: None,
        receipt_error: None,
        hardware,
        sensors: watch.finish(),
        attached: None,
        zone: None,
    }
}

/// Writes the run's receipt, with its time series beside it, and notes in the summary where it
/// went, or why receipts are missing.
fn write_receipt(
    summary: &mut RunSummary,
    books: &mut Books,
    series: Option<&(String, SeriesRef)>,
) {
    let mut run_receipt = run_receipt::of_run(summary, summary.energy.clone(), String::new());
    let series = series.map(|(text, _)| (summary.run.as_str(), text.as_str()));
    match books.receipts.write_with_series(&mut run_receipt, series) {
        Ok(written) => summary.receipt = Some(written),
        Err(err) => books
            .judge
            .errors
            .push(format!("the run's receipt: {err:#}")),
    }
    if !books.judge.errors.is_empty() {
        summary.receipt_error = Some(books.judge.errors.join("; "));
    }
}
