//! `nbt attach` (a running workload under a run's limits) and `nbt detach` (its end).

use std::time::{Duration, Instant};

use super::args::{AttachArgs, TargetArgs};
use super::run::{execute_and_print, out_of, plan_of};
use super::{privileged, usage_or_failure, EXIT_NBT_FAILED};
use crate::plan::target::TargetSpec;
use crate::run::Workload;
use crate::state::{resolve_run, state_dir, RunRecord};
use crate::sys::user::Identity;

fn spec_of(target: &TargetArgs) -> TargetSpec {
    match (&target.pid, &target.cgroup, &target.container, &target.unit) {
        (Some(pid), ..) => TargetSpec::Pid(pid.clone()),
        (_, Some(path), ..) => TargetSpec::Cgroup(path.clone()),
        (_, _, Some(name), _) => TargetSpec::Container(name.clone()),
        (_, _, _, Some(unit)) => TargetSpec::Unit(unit.clone()),
        // clap's group requires exactly one.
        (None, None, None, None) => unreachable!("clap requires one target"),
    }
}

pub fn attach(args: AttachArgs, signals: &libc::sigset_t) -> i32 {
    let mut plan = match plan_of(&args.options, None) {
        Ok(plan) => plan,
        Err(status) => return status,
    };
    if plan.hwcaps.gpu.memory_bytes.is_some() {
        eprintln!(
            "nbt: --gpu-memory is not for nbt attach: it sets the allocator's environment, which \
             a running process read when it started"
        );
        return 2;
    }
    if let Err(status) = privileged() {
        return status;
    }
    let target = match spec_of(&args.target).resolve() {
        Ok(target) => target,
        Err(err) => {
            eprintln!("nbt: {err:#}");
            return usage_or_failure(&err);
        }
    };
    if target.other_netns() {
        plan.police_ingress_unless_asked(&format!(
            "the queue takes packets from the interfaces of nbt's network namespace, and {} \
             lives in another",
            target.described
        ));
    }
    if target.other_netns() && plan.needs_tc_beyond_loss() {
        eprintln!(
            "nbt: {} lives in another network namespace; nbt adds delay (--latency, --jitter, \
             --reorder, ingress impairments, --ingress-queue) on the interfaces of its own, so it \
             cannot delay this target's packets. Rates, loss, duplicate, corrupt and the gate \
             work there.",
            target.described
        );
        return 2;
    }
    // Who the target runs as is its own affair; the summary names no user for an attachment.
    let user = match Identity::parse("0") {
        Ok(user) => user,
        Err(err) => {
            eprintln!("nbt: {err}");
            return EXIT_NBT_FAILED;
        }
    };
    eprintln!(
        "nbt: attaching to {} (cgroup {}); Ctrl-C or `nbt detach` ends it",
        target.described,
        target.cgroups.v2.display()
    );
    let workload = Workload::Attach(&target);
    let summary =
        match execute_and_print(&plan, &user, workload, signals, &[], out_of(&args.options)) {
            Ok(summary) => summary,
            Err(status) => return status,
        };
    if let Some(err) = &summary.receipt_error {
        eprintln!("nbt: the attachment's receipts were not all written: {err}");
        return EXIT_NBT_FAILED;
    }
    let failed = summary
        .attached
        .as_ref()
        .and_then(|a| a.restored.as_ref())
        .is_some_and(|r| !r.errors.is_empty());
    i32::from(failed)
}

/// How long `nbt detach` waits for the attachment to put everything back.
const DETACH_WAIT: Duration = Duration::from_secs(60);

pub fn detach(given: &str) -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    let dir = state_dir();
    let found = resolve_run(&dir, given).and_then(|name| RunRecord::find_live(&dir, &name));
    let (path, record) = match found {
        Ok(found) => found,
        Err(err) => {
            eprintln!("nbt detach: {err:#}");
            return usage_or_failure(&err);
        }
    };
    if record.attached.is_none() {
        eprintln!(
            "nbt detach: {} is a run nbt started ({}), not an attachment: it ends with its \
             workload, or with Ctrl-C to its nbt (pid {})",
            record.name,
            record.command.join(" "),
            record.supervisor_pid
        );
        return 2;
    }
    // SAFETY: kill(2) of the live nbt that holds the attachment (its start time was checked).
    if unsafe { libc::kill(record.supervisor_pid, libc::SIGTERM) } != 0 {
        eprintln!(
            "nbt detach: signalling nbt (pid {}): {}",
            record.supervisor_pid,
            std::io::Error::last_os_error()
        );
        return 1;
    }
    let deadline = Instant::now() + DETACH_WAIT;
    while path.exists() && record.supervisor_alive() {
        if Instant::now() > deadline {
            eprintln!(
                "nbt detach: {} still holds {} after {} s",
                record.name,
                record.attached.as_ref().map_or("", |a| a.target.as_str()),
                DETACH_WAIT.as_secs()
            );
            return 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "nbt detach: {} detached from {}",
        record.name,
        record.attached.as_ref().map_or("", |a| a.target.as_str())
    );
    0
}
