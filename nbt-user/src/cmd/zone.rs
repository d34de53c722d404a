//! `nbt zone apply|exec|attach|ls|remove`.

use super::args::{RunOptions, ZoneAction};
use super::run::plan_of;
use super::{privileged, usage_or_failure, EXIT_NBT_FAILED};
use crate::enforce::cgroup::{Layout, RunCgroup};
use crate::run::zone;
use crate::sys::supervise;
use crate::sys::user::Identity;

pub fn zone(action: ZoneAction, signals: &libc::sigset_t) -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    match action {
        ZoneAction::Apply { zone, options } => apply(&zone, &options),
        ZoneAction::Exec {
            name,
            user,
            command,
        } => exec(&name, user.as_deref(), &command, signals),
        ZoneAction::Attach { name, pid } => attach(&name, &pid),
        ZoneAction::Ls { json } => ls(json),
        ZoneAction::Remove { name, json } => remove(&name, json),
    }
}

fn apply(name: &str, options: &RunOptions) -> i32 {
    if let Err(why) = crate::state::valid_label(name) {
        eprintln!("nbt zone apply: invalid value for NAME: {why}");
        return 2;
    }
    let refused = [
        (options.name.is_some(), "--name (the zone's name is NAME)"),
        (
            options.summary_file.is_some(),
            "--summary-file (`nbt zone remove --json` prints the summary)",
        ),
        (
            options.series_interval.is_some(),
            "--series-interval (no nbt samples a zone)",
        ),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        eprintln!("nbt zone apply: not for a zone: {flag}");
        return 2;
    }
    let plan = match plan_of(options, None) {
        Ok(plan) => plan,
        Err(status) => return status,
    };
    match zone::apply(&plan, name) {
        Ok(record) => {
            eprintln!(
                "nbt zone apply: zone {name} ({}) in force: cgroup {}; `nbt zone exec {name} -- \
                 CMD` runs a command in it, `nbt zone remove {name}` takes it off",
                record.name,
                record.cgroups[0].display()
            );
            if options.json {
                println!(
                    "{}",
                    serde_json::json!({"zone": name, "run": record.name, "cgroups": record.cgroups})
                );
            }
            0
        }
        Err(err) => {
            eprintln!("nbt zone apply: {err:#}");
            match usage_or_failure(&err) {
                2 => 2,
                _ => EXIT_NBT_FAILED,
            }
        }
    }
}

fn exec(
    name: &str,
    user: Option<&str>,
    command: &[std::ffi::OsString],
    signals: &libc::sigset_t,
) -> i32 {
    let record = match zone::find(name) {
        Ok(record) => record,
        Err(err) => {
            eprintln!("nbt zone exec: {err:#}");
            return 2;
        }
    };
    let user = match Identity::choose(user) {
        Ok(user) => user,
        Err(err) => {
            eprintln!("nbt zone exec: {err}");
            return 2;
        }
    };
    let cgroup = match Layout::detect().and_then(|l| RunCgroup::existing(&l, &record.name, None)) {
        Ok(cgroup) => cgroup,
        Err(err) => {
            eprintln!("nbt zone exec: {err:#}");
            return EXIT_NBT_FAILED;
        }
    };
    let env = [
        ("NBT_ZONE", name.to_string()),
        ("NBT_RUN", record.name.clone()),
    ];
    match supervise::spawn(command, &cgroup.procs_files(), &env, &user) {
        Ok(pid) => supervise::wait(pid, signals, None, |_| None).status,
        Err(err) => {
            eprintln!("nbt zone exec: {err}");
            err.exit_code()
        }
    }
}

fn attach(name: &str, pid: &str) -> i32 {
    let Some(pid) = pid.parse::<i32>().ok().filter(|p| *p > 1) else {
        eprintln!("nbt zone attach: invalid value '{pid}' for --pid: a process id above 1");
        return 2;
    };
    match zone::attach(name, pid) {
        Ok(()) => {
            eprintln!("nbt zone attach: process {pid} is in zone {name}");
            0
        }
        Err(err) => {
            eprintln!("nbt zone attach: {err:#}");
            usage_or_failure(&err)
        }
    }
}

fn ls(json: bool) -> i32 {
    let zones = zone::all();
    if json {
        let listed: Vec<serde_json::Value> = zones
            .iter()
            .map(|r| {
                serde_json::json!({
                    "zone": r.label,
                    "run": r.name,
                    "cgroups": r.cgroups,
                    "limits": r.zone.as_ref().map(|z| &z.limits),
                    "net_limits": r.net,
                    "hardware": r.zone.as_ref().map(|z| &z.hardware),
                    "processes": crate::enforce::cgroup::procs_of(&r.cgroups[0]).len(),
                    "seconds": crate::sys::proc::now_unix() - r.started_unix,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&listed).expect("zones serialize")
        );
        return 0;
    }
    if zones.is_empty() {
        eprintln!("nbt zone ls: no zones");
    }
    for r in &zones {
        println!(
            "{} ({})  {:.0} s  {} processes  cgroup {}",
            r.label.as_deref().unwrap_or("?"),
            r.name,
            crate::sys::proc::now_unix() - r.started_unix,
            crate::enforce::cgroup::procs_of(&r.cgroups[0]).len(),
            r.cgroups[0].display()
        );
    }
    0
}

fn remove(name: &str, json: bool) -> i32 {
    let record = match zone::find(name) {
        Ok(record) => record,
        Err(err) => {
            eprintln!("nbt zone remove: {err:#}");
            return 2;
        }
    };
    match zone::remove(record) {
        Ok(summary) => {
            eprint!("{}", summary.human());
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("summary serializes")
                );
            }
            let restored = summary.hardware.as_ref().is_none_or(|h| h.restored);
            match (&summary.receipt_error, restored) {
                (Some(err), _) => {
                    eprintln!("nbt zone remove: the zone's receipt was not written: {err}");
                    EXIT_NBT_FAILED
                }
                (None, false) => 1,
                (None, true) => 0,
            }
        }
        Err(err) => {
            eprintln!("nbt zone remove: {err:#}");
            1
        }
    }
}
