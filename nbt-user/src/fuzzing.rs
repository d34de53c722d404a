//! Entry points for the fuzz targets of `fuzz/` (docs/fuzzing.md): one function per target, each
//! feeding one input to the parsers it names and checking what their results promise. A panic
//! here is a finding. Not part of nbt's interface: the crate's other modules keep their
//! visibility, and only these thin wrappers reach their `pub(crate)` parsers.
//!
//! Nothing here touches the machine except `profile`, which writes its input to a file in the
//! temporary directory, because `Plan::build` reads profiles from files, and removes it after.

use serde_json::Value;

use crate::agent::Bucket;
use crate::enforce::{gate, ledger, shaper};
use crate::learning::TaskReport;
use crate::plan::{Flags, Plan, Profile};
use crate::receipt::canonical;
use crate::schedule::parse::Initial;
use crate::units;

/// Every unit parser (sizes, rates, percentages, durations, cores, counts, amounts, prices,
/// loss models, gate destinations) on `text`, and what each accepted value promises.
pub fn units(text: &str) {
    const FLAG: &str = "--fuzz";
    if let Ok(bytes) = units::parse_size(FLAG, text) {
        let _ = units::format_size(bytes);
    }
    if let Ok(rate) = units::parse_rate(FLAG, text) {
        let printed = units::format_rate(rate);
        // Exact in a double, the printed rate reads back to itself.
        if rate <= 1 << 53 {
            assert_eq!(
                units::parse_rate(FLAG, &printed).ok(),
                Some(rate),
                "{printed}"
            );
        }
        let _ = shaper::check_rate(FLAG, text, rate);
    }
    if let Ok(fraction) = units::parse_percent(FLAG, text) {
        assert!((0.0..=1.0).contains(&fraction), "{text} -> {fraction}");
    }
    let _ = units::parse_duration(FLAG, text);
    if let Ok(millicores) = units::parse_cpus(FLAG, text) {
        assert!(millicores > 0, "{text}");
    }
    if let Ok(count) = units::parse_count(FLAG, text) {
        assert!(count > 0, "{text}");
    }
    if let Ok(micro) = ledger::parse_amount(FLAG, text) {
        assert!((0..=ledger::MAX_AMOUNT_MICRO).contains(&micro), "{text}");
        let printed = ledger::format_amount(micro);
        assert_eq!(
            ledger::parse_amount(FLAG, &printed).ok(),
            Some(micro),
            "{printed}"
        );
    }
    let _ = ledger::parse_price_per_gb(FLAG, text);
    if let Ok(Some(loss)) = shaper::parse_loss_model(FLAG, text) {
        let _ = loss.mean();
    }
    let _ = gate::parse_rules(FLAG, text);
}

/// A profile file: parsed, then built into a plan as `nbt run --profile FILE` builds it.
///
/// Before the build, `schedule` (a path the build would read) is taken out, and so is a `gate`
/// naming a host (the build resolves host names): the schedule parser has its own target, and
/// the gate's parser is in `units`.
pub fn profile(text: &str) {
    if Profile::parse(text, "fuzz").is_err() {
        return;
    }
    let Ok(mut table) = toml::from_str::<toml::Table>(text) else {
        return;
    };
    table.remove("schedule");
    if table.get("gate").is_some_and(names_a_host) {
        table.remove("gate");
    }
    let Ok(text) = toml::to_string(&table) else {
        return;
    };
    let path = std::env::temp_dir().join(format!("nbt-fuzz-profile-{}.toml", std::process::id()));
    if std::fs::write(&path, text).is_err() {
        return;
    }
    let flags = Flags {
        profile: Some(path.to_string_lossy().into_owned()),
        receipts: Some("/nonexistent/nbt-fuzz-receipts.db".into()),
        ..Flags::default()
    };
    let built = Plan::build(&flags);
    let _ = std::fs::remove_file(&path);
    if let Ok(plan) = built {
        // What `nbt run --json` and the summary print of it.
        let _ = serde_json::to_value(&plan);
        let _ = plan.schedule_start();
    }
}

/// Whether a profile's `gate` (a string, or an array joined with commas as a flag carries it)
/// names a host, which building the plan would look up.
fn names_a_host(value: &toml::Value) -> bool {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(","),
        _ => return false,
    };
    text.split(',').any(|part| {
        matches!(
            gate::parse_rule("--gate", part),
            Ok(gate::Rule::Host { .. })
        )
    })
}

/// A schedule file, for a run started with no limits and for one started with every limit (so
/// that latency and balance changes are accepted).
pub fn schedule(text: &str) {
    let full = Initial {
        memory: Some(1 << 30),
        cpus: Some(2000),
        egress_rate: Some(10_000_000),
        ingress_rate: Some(10_000_000),
        egress_loss: shaper::Loss::uniform(0.01),
        ingress_loss: shaper::Loss::uniform(0.0),
        latency_ns: Some(1_000_000),
        jitter_ns: 0,
        duplicate: 0.01,
        corrupt: 0.0,
        reorder: 0.0,
        has_balance: true,
    };
    for initial in [Initial::default(), full] {
        if let Ok(schedule) = crate::schedule::parse("fuzz.toml", text, &initial) {
            assert!(
                schedule
                    .actions
                    .windows(2)
                    .all(|w| w[0].at_ms <= w[1].at_ms),
                "actions out of order"
            );
            let _ = schedule.span_ms();
            for action in &schedule.actions {
                for change in &action.changes {
                    let _ = change.describe();
                }
            }
        }
    }
}

/// One line of `$NBT_REPORT`, as the run reads it.
pub fn report(text: &str) {
    if let Ok(report) = TaskReport::parse(text) {
        check_report(&report);
    }
}

/// What an accepted report promises: it writes back as one line that reads back the same, and
/// its judgement is a number.
fn check_report(report: &TaskReport) {
    let line = serde_json::to_string(report).expect("a report serializes");
    assert!(!line.contains('\n'), "{line}");
    assert_eq!(TaskReport::parse(&line).as_ref(), Ok(report), "{line}");
    let (delta, _) = report.decide(crate::learning::DEFAULT_ACCEPT_MIN_DELTA);
    assert!(delta.is_finite(), "delta {delta} of {line}");
}

/// A request body of the agent's `POST /v1/take` (`take`) or `POST /v1/report`.
///
/// The handlers are `pub(super)` in `agent::api`; this repeats their checks of the body, in their
/// order (agent/api.rs: `object`, then `take`'s or `report`'s fields), up to where they touch
/// the bucket or a live run. A change to those checks belongs here too.
pub fn agent_body(take: bool, body: &str) {
    // api::object
    let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(body) else {
        return;
    };
    if take {
        // api::take
        if fields.keys().any(|k| k != "joules") {
            return;
        }
        let Some(joules) = fields.get("joules").and_then(Value::as_f64) else {
            return;
        };
        if !(joules.is_finite() && joules > 0.0) {
            return;
        }
        let mut bucket = Bucket {
            joules: 1000.0,
            deposited: 1000.0,
            ..Bucket::default()
        };
        let _ = bucket.take(joules);
        assert!(bucket.joules >= 0.0, "the bucket went below 0");
        assert!(bucket.taken <= bucket.deposited, "took more than deposited");
    } else {
        // api::report
        let Some(Value::String(_run)) = fields.remove("run") else {
            return;
        };
        let task = Value::Object(fields).to_string();
        if let Ok(report) = TaskReport::parse(&task) {
            // Appended to the run's report file as one line, which the run reads back.
            assert!(!task.contains('\n'), "{task}");
            assert_eq!(TaskReport::parse(&task).as_ref(), Ok(&report));
            check_report(&report);
        }
    }
}

/// Arbitrary JSON, canonically encoded: the same text every time, and the text read back encodes
/// to itself (what `nbt receipts verify` checks of every stored receipt). When `data` starts with
/// 8 bytes of a finite double, that double's ECMAScript form must read back to it.
pub fn canonical(data: &[u8]) {
    if let Some(bytes) = data.get(..8) {
        let x = f64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        if x.is_finite() {
            let text = canonical::ecmascript_number(x);
            assert_eq!(text.parse::<f64>().ok(), Some(x), "{x:e} -> {text}");
        }
    }
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let first = canonical::encode(&value);
    assert_eq!(first, canonical::encode(&value), "not deterministic");
    if let Ok(text) = first {
        let again: Value = serde_json::from_str(&text).expect("canonical text is JSON");
        assert_eq!(
            canonical::encode(&again).as_ref(),
            Ok(&text),
            "read back, {text} encodes differently"
        );
    }
}

/// Inputs that crashed a target, each fed again: none may panic (an error is the right answer).
/// The fuzzer found two (named by their artifact); the others were written by hand while
/// reading the parsers and crash the built targets too, before the parsers were bounded.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_double_beyond_2_53_reads_back() {
        // fuzz/ `canonical`, crash-1600262a7e733fd825a890bfc4e9831e57897f08: it encoded as
        // 8999999999100000000, which read back as an integer beyond 2^53 and was refused.
        canonical(b"8999999999099999999.99");
    }

    #[test]
    fn report_losses_whose_difference_overflows() {
        // Each loss finite, base_loss - new_loss infinite: refused now.
        let line = r#"{"task_name":"t","base_loss":1e308,"new_loss":-1e308}"#;
        report(line);
        assert!(TaskReport::parse(line).is_err());
        agent_body(
            false,
            r#"{"run":"nbt-1","task_name":"t","base_loss":1e308,"new_loss":-1e308}"#,
        );
    }

    #[test]
    fn profile_latency_plus_jitter_overflow() {
        profile("latency = \"10000000000000000000s\"\njitter = \"10000000000000000000s\"\n");
    }

    #[test]
    fn schedule_fault_repeat_overflow() {
        schedule(
            "[[fault]]\nkind = \"brownout\"\nstart = \"1s\"\nduration = \"1s\"\n\
             repeat = \"1000000000000000s\"\ncount = 100\n",
        );
    }

    #[test]
    fn schedule_fault_end_overflow() {
        schedule(
            "[[fault]]\nkind = \"brownout\"\nstart = \"18000000000000000s\"\n\
             duration = \"1000000000000000s\"\n",
        );
    }

    #[test]
    fn schedule_generator_tick_overflow() {
        schedule(
            "[[generator]]\nlimit = \"cpus\"\nkind = \"random-walk\"\n\
             every = \"10000000000000000s\"\nuntil = \"18000000000000000s\"\nmin = 1\nmax = 2\n",
        );
    }

    #[test]
    fn schedule_fault_count_unbounded() {
        schedule(
            "[[fault]]\nkind = \"brownout\"\nstart = \"1s\"\nduration = \"1ms\"\n\
             repeat = \"2ms\"\ncount = 100000000000\n",
        );
    }

    #[test]
    fn schedule_generator_ticks_unbounded() {
        // fuzz/ `schedule`, oom-89f438b4a61bf1a5be39cfce04b82d27b265306c (docs/schedules.md's
        // example, mutated): every = "1s" until "0666666660s"; Wave::values allocated 2 GiB.
        schedule(
            r##"seed = 3                      # generator' seecall, prprice-call (the!run needs --balance)

[[generator]]                 # a limit that wanTers between bounds
limit = "egress-rate"         # egress-rate,both ingres-sreta, cpus, loss
kind = "random-walk"          # each icpus          # each interval moves at most step x (max - min), seeded
every = "1s"
from = "0s"                   # optioB/snal6 default 0
until = "0666666660s"
min = "129kbit"
max = "2mbit"
step = 0.2                    # random-walk only, default 0.2
#              # ... ; times in all
"##,
        );
    }
}
