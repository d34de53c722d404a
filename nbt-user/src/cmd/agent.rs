//! `nbt agent`: its options checked, then the agent served until a signal ends it.

use std::time::Duration;

use super::args::AgentArgs;
use crate::agent::{default_token_path, AgentOptions};
use crate::error::UsageError;
use crate::telemetry::counters::AttributeBy;
use crate::telemetry::energy::CpuModel;

/// `nbt agent [options]`; `signals` are the ones nbt blocked at start.
pub fn agent(args: AgentArgs, signals: &libc::sigset_t) -> i32 {
    let options = match check(args) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("nbt agent: {err}");
            return 2;
        }
    };
    // The agent runs until stopped: Ctrl-C and SIGTERM end it as they end any server
    // (nbt blocked them at start for the runs' own signal handling).
    // SAFETY: pthread_sigmask on the set block_signals built, before any thread starts.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, signals, std::ptr::null_mut());
    }
    match crate::agent::serve(options) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("nbt agent: {err:#}");
            1
        }
    }
}

/// The options, checked: a bad one is a usage error.
fn check(args: AgentArgs) -> Result<AgentOptions, UsageError> {
    let usage = |flag: &str, value: &str, problem: String, accepted: &'static str| UsageError {
        flag: flag.into(),
        value: value.into(),
        problem,
        accepted,
    };
    let listen = args.listen.parse().map_err(|_| {
        usage(
            "--listen",
            &args.listen,
            "not an address and port".into(),
            "an address and port: 127.0.0.1:8787, [::1]:8787",
        )
    })?;
    let interval = crate::units::parse_duration("--interval", &args.interval)?;
    if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
        return Err(usage(
            "--interval",
            &args.interval,
            "out of range".into(),
            "a duration from 100ms to 1h",
        ));
    }
    let mut model = CpuModel::for_this_host();
    if let Some(tdp) = args.cpu_tdp {
        if !(tdp.is_finite() && tdp > 0.0) {
            return Err(usage(
                "--cpu-tdp",
                &tdp.to_string(),
                "not a power above 0".into(),
                "watts above 0, for the whole node",
            ));
        }
        model.tdp_watts = tdp;
        model.idle_watts = tdp * crate::telemetry::energy::MODEL_IDLE_SHARE;
    }
    if let Some(idle) = args.cpu_idle {
        if !(idle.is_finite() && idle >= 0.0 && idle < model.tdp_watts) {
            return Err(usage(
                "--cpu-idle",
                &idle.to_string(),
                format!("not below the TDP ({} W)", model.tdp_watts),
                "watts from 0 to below the TDP, for the whole node",
            ));
        }
        model.idle_watts = idle;
    }
    if args.attribute_by == AttributeBy::Cycles {
        if let Some(why) = crate::telemetry::counters::pmu_missing() {
            return Err(usage(
                "--attribute-by",
                "cycles",
                why,
                "auto or cpu-time here (no cycle counter could be opened)",
            ));
        }
    }
    let max_connections = crate::units::parse_count("--max-connections", &args.max_connections)?;
    if max_connections > 65536 {
        return Err(usage(
            "--max-connections",
            &args.max_connections,
            "above 65536".into(),
            "a whole number from 1 to 65536 (default 256)",
        ));
    }
    let timeout = |flag: &str, text: &str| {
        let value = crate::units::parse_duration(flag, text)?;
        if value < Duration::from_millis(100) || value > Duration::from_secs(600) {
            return Err(usage(
                flag,
                text,
                "out of range".into(),
                "a duration from 100ms to 10m",
            ));
        }
        Ok(value)
    };
    let header_timeout = timeout("--header-timeout", &args.header_timeout)?;
    let request_timeout = timeout("--request-timeout", &args.request_timeout)?;
    Ok(AgentOptions {
        listen,
        token_file: args.token_file.unwrap_or_else(default_token_path),
        interval,
        model,
        attribute_by: args.attribute_by,
        private_metrics: args.private_metrics,
        max_connections: max_connections as usize,
        header_timeout,
        request_timeout,
    })
}
