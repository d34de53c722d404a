//! Reading a schedule file: TOML into checked, expanded [`Action`]s, every error with its line.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Action, Change, Origin, Schedule};
use crate::enforce::shaper::Loss;
use crate::units;

/// What the run starts with: where a fault ends, the limit goes back to this (or to the last
/// step before the fault).
#[derive(Debug, Clone, Default)]
pub struct Initial {
    pub memory: Option<u64>,
    pub cpus: Option<u64>,
    pub egress_rate: Option<u64>,
    pub ingress_rate: Option<u64>,
    pub egress_loss: Loss,
    pub ingress_loss: Loss,
    /// Latency changes need fq, which only a run started with `--latency` has.
    pub latency_ns: Option<u64>,
    pub has_balance: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError(pub String);

impl std::fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScheduleError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    step: Vec<Spanned<StepToml>>,
    #[serde(default)]
    generator: Vec<Spanned<GeneratorToml>>,
    #[serde(default)]
    fault: Vec<Spanned<FaultToml>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StepToml {
    at: toml::Value,
    memory: Option<toml::Value>,
    swap: Option<toml::Value>,
    cpus: Option<toml::Value>,
    egress_rate: Option<toml::Value>,
    ingress_rate: Option<toml::Value>,
    loss: Option<toml::Value>,
    loss_direction: Option<String>,
    latency: Option<toml::Value>,
    balance_add: Option<toml::Value>,
    balance_charge: Option<toml::Value>,
    price_call: Option<toml::Value>,
    price_egress: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct GeneratorToml {
    limit: String,
    kind: String,
    every: toml::Value,
    #[serde(default)]
    from: Option<toml::Value>,
    until: toml::Value,
    min: toml::Value,
    max: toml::Value,
    /// random-walk: the largest move per interval, as a fraction of max − min (default 0.2).
    step: Option<f64>,
    /// periodic: the period of the sine.
    period: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FaultToml {
    kind: String,
    start: toml::Value,
    duration: Option<toml::Value>,
    repeat: Option<toml::Value>,
    count: Option<u64>,
    /// brownout: drop the CPU quota to this instead of freezing.
    cpus: Option<toml::Value>,
    /// network-drop, loss-burst: egress, ingress or both.
    direction: Option<String>,
    /// loss-burst: the loss during the burst.
    loss: Option<toml::Value>,
    /// memory-squeeze: the memory the run is squeezed to.
    memory: Option<toml::Value>,
    /// balance-shock: the charge.
    amount: Option<toml::Value>,
    /// memory-leak: how fast the balloon grows, a size per second (`10M` or `10M/s`).
    rate: Option<toml::Value>,
}

fn text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Parses and checks the schedule `source` (for messages: the file's name) for a run that starts
/// with `initial`.
pub fn parse(source: &str, text_in: &str, initial: &Initial) -> Result<Schedule, ScheduleError> {
    let file: File = toml::from_str(text_in).map_err(|e| {
        ScheduleError(format!(
            "--schedule {source}: {}",
            e.to_string().trim_end().replace('\n', " ")
        ))
    })?;
    let line_of = |offset: usize| text_in[..offset.min(text_in.len())].matches('\n').count() + 1;
    let err = |line: usize, what: String| {
        ScheduleError(format!("--schedule {source}, line {line}: {what}"))
    };
    let duration =
        |line: usize, key: &str, value: &toml::Value| -> Result<Duration, ScheduleError> {
            units::parse_duration(key, &text(value)).map_err(|e| err(line, e.to_string()))
        };
    let seed = file.seed.unwrap_or(0);
    let mut actions: Vec<Action> = Vec::new();
    // Who touches which limit when, for the conflict check: (limit, from, to, source).
    let mut claims: Vec<(&'static str, u64, u64, String)> = Vec::new();

    for step in &file.step {
        let line = line_of(step.span().start);
        let s = step.get_ref();
        let at = duration(line, "at", &s.at)?.as_millis() as u64;
        let mut changes = Vec::new();
        if let Some(v) = &s.memory {
            changes.push(Change::Memory {
                bytes: Some(
                    units::parse_size("memory", &text(v)).map_err(|e| err(line, e.to_string()))?,
                ),
            });
        }
        if let Some(v) = &s.swap {
            changes.push(Change::Swap {
                bytes: Some(
                    units::parse_size("swap", &text(v)).map_err(|e| err(line, e.to_string()))?,
                ),
            });
        }
        if let Some(v) = &s.cpus {
            changes.push(Change::Cpus {
                millicores: Some(
                    units::parse_cpus("cpus", &text(v)).map_err(|e| err(line, e.to_string()))?,
                ),
            });
        }
        for (key, value, egress) in [
            ("egress-rate", &s.egress_rate, true),
            ("ingress-rate", &s.ingress_rate, false),
        ] {
            if let Some(v) = value {
                let rate =
                    units::parse_rate(key, &text(v)).map_err(|e| err(line, e.to_string()))?;
                crate::enforce::shaper::check_rate(key, &text(v), rate)
                    .map_err(|e| err(line, e.to_string()))?;
                changes.push(if egress {
                    Change::EgressRate {
                        bits_per_sec: Some(rate),
                    }
                } else {
                    Change::IngressRate {
                        bits_per_sec: Some(rate),
                    }
                });
            }
        }
        if let Some(v) = &s.loss {
            let loss = Loss::uniform(
                units::parse_percent("loss", &text(v)).map_err(|e| err(line, e.to_string()))?,
            );
            changes.extend(loss_changes(
                line,
                s.loss_direction.as_deref(),
                "egress",
                loss,
                &err,
            )?);
        } else if s.loss_direction.is_some() {
            return Err(err(
                line,
                "loss-direction says where `loss` applies: the step has no loss".into(),
            ));
        }
        if let Some(v) = &s.latency {
            if initial.latency_ns.is_none() {
                return Err(err(line, "a latency step needs the run started with --latency (0ms will do), which puts fq on its interfaces".into()));
            }
            changes.push(Change::Latency {
                ns: duration(line, "latency", v)?.as_nanos() as u64,
            });
        }
        for (key, value, sign) in [
            ("balance-add", &s.balance_add, 1),
            ("balance-charge", &s.balance_charge, -1),
        ] {
            if let Some(v) = value {
                if !initial.has_balance {
                    return Err(err(
                        line,
                        format!("{key} needs the run started with --balance"),
                    ));
                }
                let micro = crate::enforce::ledger::parse_amount(key, &text(v))
                    .map_err(|e| err(line, e.to_string()))?;
                changes.push(Change::Balance {
                    micro: sign * micro,
                });
            }
        }
        for (key, value) in [
            ("price-call", &s.price_call),
            ("price-egress", &s.price_egress),
        ] {
            if let Some(v) = value {
                if !initial.has_balance {
                    return Err(err(
                        line,
                        format!("{key} needs the run started with --balance"),
                    ));
                }
                changes.push(if key == "price-call" {
                    Change::PriceCall {
                        micro: crate::enforce::ledger::parse_amount(key, &text(v))
                            .map_err(|e| err(line, e.to_string()))?,
                    }
                } else {
                    Change::PriceEgress {
                        pico_per_byte: crate::enforce::ledger::parse_price_per_gb(key, &text(v))
                            .map_err(|e| err(line, e.to_string()))?,
                    }
                });
            }
        }
        if changes.is_empty() {
            return Err(err(line, "this step changes nothing: give memory, swap, cpus, egress-rate, ingress-rate, loss, latency, balance-add, balance-charge, price-call or price-egress".into()));
        }
        let source = format!("step (line {line})");
        for change in &changes {
            claims.push((change.limit(), at, at, source.clone()));
        }
        actions.push(Action {
            at_ms: at,
            changes,
            origin: Origin::Step,
            source,
        });
    }

    for (index, generator) in file.generator.iter().enumerate() {
        let line = line_of(generator.span().start);
        let g = generator.get_ref();
        let every = duration(line, "every", &g.every)?.as_millis() as u64;
        if every == 0 {
            return Err(err(line, "every must be longer than 0".into()));
        }
        let from = match &g.from {
            Some(v) => duration(line, "from", v)?.as_millis() as u64,
            None => 0,
        };
        let until = duration(line, "until", &g.until)?.as_millis() as u64;
        if until <= from {
            return Err(err(
                line,
                format!("until ({until} ms) must come after from ({from} ms)"),
            ));
        }
        // The bounds in the limit's own unit, as numbers.
        let bound = |key: &str, v: &toml::Value| -> Result<f64, ScheduleError> {
            let t = text(v);
            let r = match g.limit.as_str() {
                "egress-rate" | "ingress-rate" => units::parse_rate(key, &t).map(|x| x as f64),
                "cpus" => units::parse_cpus(key, &t).map(|x| x as f64),
                "loss" => units::parse_percent(key, &t),
                other => {
                    return Err(err(line, format!("limit '{other}': a generator drives egress-rate, ingress-rate, cpus or loss")))
                }
            };
            r.map_err(|e| err(line, e.to_string()))
        };
        let (min, max) = (bound("min", &g.min)?, bound("max", &g.max)?);
        if min > max {
            return Err(err(line, "min is above max".into()));
        }
        let mut rng = SplitMix(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut value = (min + max) / 2.0;
        let period_ms = match (g.kind.as_str(), &g.period) {
            ("periodic", Some(p)) => duration(line, "period", p)?.as_millis() as f64,
            ("periodic", None) => {
                return Err(err(line, "a periodic generator needs period".into()))
            }
            ("random-walk", Some(_)) => {
                return Err(err(line, "period is for kind = \"periodic\"".into()))
            }
            ("random-walk", None) => 0.0,
            (other, _) => {
                return Err(err(
                    line,
                    format!("kind '{other}': accepted: random-walk, periodic"),
                ))
            }
        };
        let step = g.step.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&step) {
            return Err(err(
                line,
                format!("step {step}: a fraction of max - min, 0 to 1"),
            ));
        }
        let source = format!("generator {} (line {line})", g.limit);
        claims.push((limit_name(&g.limit), from, until, source.clone()));
        let mut t = from;
        while t <= until {
            value = if period_ms > 0.0 {
                let phase = (t - from) as f64 / period_ms * std::f64::consts::TAU;
                (min + max) / 2.0 + (max - min) / 2.0 * phase.sin()
            } else {
                (value + (rng.unit() * 2.0 - 1.0) * step * (max - min)).clamp(min, max)
            };
            let change = match g.limit.as_str() {
                "egress-rate" => Change::EgressRate {
                    bits_per_sec: Some(value.round() as u64),
                },
                "ingress-rate" => Change::IngressRate {
                    bits_per_sec: Some(value.round() as u64),
                },
                "cpus" => Change::Cpus {
                    millicores: Some(value.round().max(1.0) as u64),
                },
                _ => Change::EgressLoss {
                    loss: Loss::uniform((value * 1e6).round() / 1e6),
                },
            };
            actions.push(Action {
                at_ms: t,
                changes: vec![change],
                origin: Origin::Generator,
                source: source.clone(),
            });
            t += every;
        }
    }

    // Faults last: their end puts back what steps and generators had set by their start.
    let mut before = actions.clone();
    before.sort_by_key(|a| a.at_ms);
    for fault in &file.fault {
        let line = line_of(fault.span().start);
        let f = fault.get_ref();
        let start = duration(line, "start", &f.start)?.as_millis() as u64;
        let length = match &f.duration {
            Some(v) => Some(duration(line, "duration", v)?.as_millis() as u64),
            None => None,
        };
        let count = f.count.unwrap_or(1);
        let repeat = match &f.repeat {
            Some(v) => duration(line, "repeat", v)?.as_millis() as u64,
            None if count > 1 => {
                return Err(err(
                    line,
                    "count needs repeat, the time between the fault's starts".into(),
                ))
            }
            None => 0,
        };
        if count == 0 {
            return Err(err(line, "count must be at least 1".into()));
        }
        if let (Some(length), true) = (length, repeat > 0) {
            if repeat <= length {
                return Err(err(line, format!("repeat ({repeat} ms) must be longer than duration ({length} ms): the fault would overlap itself")));
            }
        }
        let unused = |key: &str, given: bool| -> Result<(), ScheduleError> {
            if given {
                Err(err(
                    line,
                    format!("{key} does not apply to a {} fault", f.kind),
                ))
            } else {
                Ok(())
            }
        };
        let need_duration =
            || length.ok_or_else(|| err(line, format!("a {} fault needs duration", f.kind)));
        // The fault's change and, for the end, the limits it touches.
        let (on, instant): (Vec<Change>, bool) = match f.kind.as_str() {
            "brownout" => {
                unused("direction", f.direction.is_some())?;
                unused("rate", f.rate.is_some())?;
                unused("loss", f.loss.is_some())?;
                unused("memory", f.memory.is_some())?;
                unused("amount", f.amount.is_some())?;
                need_duration()?;
                match &f.cpus {
                    Some(v) => (vec![Change::Cpus { millicores: Some(units::parse_cpus("cpus", &text(v)).map_err(|e| err(line, e.to_string()))?) }], false),
                    None => (vec![Change::Freeze { frozen: true }], false),
                }
            }
            "network-drop" | "loss-burst" => {
                unused("cpus", f.cpus.is_some())?;
                unused("rate", f.rate.is_some())?;
                unused("memory", f.memory.is_some())?;
                unused("amount", f.amount.is_some())?;
                need_duration()?;
                let (loss, default_direction) = if f.kind == "network-drop" {
                    unused("loss", f.loss.is_some())?;
                    (Loss::uniform(1.0), "both")
                } else {
                    let v = f.loss.as_ref().ok_or_else(|| err(line, "a loss-burst fault needs loss".into()))?;
                    (Loss::uniform(units::parse_percent("loss", &text(v)).map_err(|e| err(line, e.to_string()))?), "egress")
                };
                (loss_changes(line, f.direction.as_deref(), default_direction, loss, &err)?, false)
            }
            "memory-squeeze" => {
                unused("cpus", f.cpus.is_some())?;
                unused("rate", f.rate.is_some())?;
                unused("direction", f.direction.is_some())?;
                unused("loss", f.loss.is_some())?;
                unused("amount", f.amount.is_some())?;
                need_duration()?;
                let v = f.memory.as_ref().ok_or_else(|| err(line, "a memory-squeeze fault needs memory, the size to squeeze the run to".into()))?;
                let bytes = units::parse_size("memory", &text(v)).map_err(|e| err(line, e.to_string()))?;
                (vec![Change::MemoryHigh { bytes: Some(bytes) }], false)
            }
            "balance-shock" => {
                unused("cpus", f.cpus.is_some())?;
                unused("rate", f.rate.is_some())?;
                unused("direction", f.direction.is_some())?;
                unused("loss", f.loss.is_some())?;
                unused("memory", f.memory.is_some())?;
                unused("duration", f.duration.is_some())?;
                if !initial.has_balance {
                    return Err(err(line, "a balance-shock needs the run started with --balance".into()));
                }
                let v = f.amount.as_ref().ok_or_else(|| err(line, "a balance-shock fault needs amount, the charge".into()))?;
                let micro = crate::enforce::ledger::parse_amount("amount", &text(v)).map_err(|e| err(line, e.to_string()))?;
                (vec![Change::Balance { micro: -micro }], true)
            }
            "memory-leak" => {
                unused("cpus", f.cpus.is_some())?;
                unused("direction", f.direction.is_some())?;
                unused("loss", f.loss.is_some())?;
                unused("memory", f.memory.is_some())?;
                unused("amount", f.amount.is_some())?;
                need_duration()?;
                let v = f.rate.as_ref().ok_or_else(|| err(line, "a memory-leak fault needs rate, the balloon's growth per second (10M)".into()))?;
                let t = text(v);
                let bytes = units::parse_size("rate", t.trim().trim_end_matches("/s")).map_err(|e| err(line, e.to_string()))?;
                if bytes == 0 {
                    return Err(err(line, "rate must be above 0".into()));
                }
                (vec![Change::Leak { bytes_per_sec: Some(bytes) }], false)
            }
            other => return Err(err(line, format!("kind '{other}': accepted: brownout, network-drop, loss-burst, memory-squeeze, memory-leak, balance-shock"))),
        };
        for n in 0..count {
            let at = start + n * repeat;
            let name = format!("{} #{} (line {line})", f.kind, n + 1);
            if instant {
                actions.push(Action {
                    at_ms: at,
                    changes: on.clone(),
                    origin: Origin::Fault,
                    source: name,
                });
                continue;
            }
            let end = at + length.unwrap_or(0);
            for change in &on {
                claims.push((change.limit(), at, end, name.clone()));
            }
            let off: Vec<Change> = on
                .iter()
                .map(|c| restore(c, &before, at, initial))
                .collect();
            actions.push(Action {
                at_ms: at,
                changes: on.clone(),
                origin: Origin::FaultStart,
                source: name.clone(),
            });
            actions.push(Action {
                at_ms: end,
                changes: off,
                origin: Origin::FaultEnd,
                source: name,
            });
        }
    }

    // Two changes of one limit at overlapping times would undo each other: refused.
    claims.retain(|c| c.0 != "balance");
    claims.sort_by_key(|c| (c.0, c.1));
    for pair in claims.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.0 == b.0 && b.1 <= a.2 {
            return Err(ScheduleError(format!(
                "--schedule {source}: {} and {} both set {} at {:.1} s: they overlap; move one",
                a.3,
                b.3,
                a.0,
                b.1 as f64 / 1000.0
            )));
        }
    }
    // Stable: at one time, steps before fault ends before fault starts, in file order.
    actions.sort_by_key(|a| a.at_ms);
    Ok(Schedule { seed, actions })
}

/// The limit name a generator's `limit` claims.
fn limit_name(limit: &str) -> &'static str {
    match limit {
        "egress-rate" => "egress-rate",
        "ingress-rate" => "ingress-rate",
        "cpus" => "cpus",
        _ => "egress loss",
    }
}

fn loss_changes(
    line: usize,
    direction: Option<&str>,
    default: &str,
    loss: Loss,
    err: &impl Fn(usize, String) -> ScheduleError,
) -> Result<Vec<Change>, ScheduleError> {
    Ok(match direction.unwrap_or(default) {
        "egress" => vec![Change::EgressLoss { loss }],
        "ingress" => vec![Change::IngressLoss { loss }],
        "both" => vec![Change::EgressLoss { loss }, Change::IngressLoss { loss }],
        other => {
            return Err(err(
                line,
                format!("direction '{other}': accepted: egress, ingress, both"),
            ))
        }
    })
}

/// What puts `change`'s limit back after a fault starting at `at`: the last value steps and
/// generators set before then, else the run's initial one.
fn restore(change: &Change, before: &[Action], at: u64, initial: &Initial) -> Change {
    // `before` is in time order: the last match is the value in force at `at`.
    let last = before
        .iter()
        .rev()
        .filter(|a| a.at_ms <= at)
        .flat_map(|a| a.changes.iter())
        .find(|c| std::mem::discriminant(*c) == std::mem::discriminant(change))
        .cloned();
    match change {
        Change::Freeze { .. } => Change::Freeze { frozen: false },
        Change::Leak { .. } => Change::Leak {
            bytes_per_sec: None,
        },
        Change::MemoryHigh { .. } => {
            // Lifted back to the memory limit in force (a memory step sets that one).
            let memory = before
                .iter()
                .rev()
                .filter(|a| a.at_ms <= at)
                .flat_map(|a| a.changes.iter())
                .find_map(|c| match c {
                    Change::Memory { bytes } => Some(*bytes),
                    _ => None,
                })
                .unwrap_or(initial.memory);
            Change::MemoryHigh { bytes: memory }
        }
        _ => last.unwrap_or_else(|| match change {
            Change::Cpus { .. } => Change::Cpus {
                millicores: initial.cpus,
            },
            Change::EgressLoss { .. } => Change::EgressLoss {
                loss: initial.egress_loss,
            },
            Change::IngressLoss { .. } => Change::IngressLoss {
                loss: initial.ingress_loss,
            },
            Change::EgressRate { .. } => Change::EgressRate {
                bits_per_sec: initial.egress_rate,
            },
            Change::IngressRate { .. } => Change::IngressRate {
                bits_per_sec: initial.ingress_rate,
            },
            Change::Memory { .. } => Change::Memory {
                bytes: initial.memory,
            },
            Change::Latency { .. } => Change::Latency {
                ns: initial.latency_ns.unwrap_or(0),
            },
            other => other.clone(),
        }),
    }
}

/// SplitMix64: a seeded, portable generator (the same seed gives the same walk anywhere).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn initial() -> Initial {
        Initial {
            egress_rate: Some(1_000_000),
            has_balance: true,
            ..Initial::default()
        }
    }

    #[test]
    fn steps_faults_and_their_restores_in_time_order() {
        let s = parse(
            "t.toml",
            r#"
[[step]]
at = "5s"
egress-rate = "500kbit"

[[fault]]
kind = "network-drop"
start = "8s"
duration = "2s"
direction = "egress"

[[fault]]
kind = "brownout"
start = "1s"
duration = "500ms"
repeat = "3s"
count = 2

[[fault]]
kind = "balance-shock"
start = "2s"
amount = "0.5"
"#,
            &initial(),
        )
        .unwrap();
        let timeline: Vec<(u64, String)> = s
            .actions
            .iter()
            .map(|a| {
                (
                    a.at_ms,
                    a.changes
                        .iter()
                        .map(Change::describe)
                        .collect::<Vec<_>>()
                        .join("+"),
                )
            })
            .collect();
        assert_eq!(
            timeline,
            [
                (1000, "frozen".to_string()),
                (1500, "thawed".into()),
                (2000, "balance -0.5".into()),
                (4000, "frozen".into()),
                (4500, "thawed".into()),
                (5000, "egress rate 500kbit".into()),
                (8000, "egress loss 100.0%".into()),
                (10000, "egress loss 0.0%".into()),
            ]
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_timeline_and_another_seed_another() {
        let file = |seed: u64| {
            format!(
                "seed = {seed}\n[[generator]]\nlimit = \"egress-rate\"\nkind = \"random-walk\"\nevery = \"1s\"\nuntil = \"30s\"\nmin = \"128kbit\"\nmax = \"1mbit\"\n"
            )
        };
        let a = parse("t", &file(7), &initial()).unwrap();
        let b = parse("t", &file(7), &initial()).unwrap();
        let c = parse("t", &file(8), &initial()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.actions.len(), 31);
        assert_ne!(a.actions, c.actions);
        for action in &a.actions {
            let Change::EgressRate {
                bits_per_sec: Some(rate),
            } = action.changes[0]
            else {
                panic!("{action:?}")
            };
            assert!((128_000..=1_000_000).contains(&rate), "{rate}");
        }
        let periodic = parse(
            "t",
            "[[generator]]\nlimit = \"cpus\"\nkind = \"periodic\"\nperiod = \"8s\"\nevery = \"2s\"\nuntil = \"8s\"\nmin = 0.5\nmax = 1.5\n",
            &initial(),
        )
        .unwrap();
        let cpus: Vec<Option<u64>> = periodic
            .actions
            .iter()
            .map(|a| match a.changes[0] {
                Change::Cpus { millicores } => millicores,
                _ => None,
            })
            .collect();
        assert_eq!(
            cpus,
            [Some(1000), Some(1500), Some(1000), Some(500), Some(1000)]
        );
    }

    #[test]
    fn a_fault_ends_with_the_value_the_last_step_set() {
        let s = parse(
            "t",
            "[[step]]\nat = \"1s\"\ncpus = 1.5\n[[fault]]\nkind = \"brownout\"\nstart = \"3s\"\nduration = \"1s\"\ncpus = 0.1\n",
            &initial(),
        )
        .unwrap();
        assert_eq!(
            s.actions[2].changes,
            [Change::Cpus {
                millicores: Some(1500)
            }]
        );
    }

    #[test]
    fn bad_schedules_are_refused_with_their_line() {
        let refuse = |text: &str| parse("s.toml", text, &initial()).unwrap_err().0;
        let e = refuse("[[step]]\nat = \"1s\"\negress-rat = \"1mbit\"\n");
        assert!(
            e.contains("line 3") && e.contains("unknown field `egress-rat`"),
            "{e}"
        );
        let e = refuse("[[step]]\nat = \"1s\"\ncpus = 1\n\n[[fault]]\nkind = \"brownout\"\nstart = \"2s\"\nduration = \"-1s\"\n");
        assert!(e.contains("line 5") && e.contains("duration"), "{e}");
        let e = refuse("[[step]]\nat = \"2s\"\negress-rate = \"1mbit\"\n[[step]]\nat = \"2s\"\negress-rate = \"2mbit\"\n");
        assert!(
            e.contains("step (line 1) and step (line 4) both set egress-rate at 2.0 s"),
            "{e}"
        );
        let e = refuse("[[fault]]\nkind = \"loss-burst\"\nstart = \"1s\"\nduration = \"5s\"\nloss = \"20%\"\n[[step]]\nat = \"3s\"\nloss = \"1%\"\n");
        assert!(e.contains("overlap"), "{e}");
        let e = refuse("[[fault]]\nkind = \"quake\"\nstart = \"1s\"\n");
        assert!(e.contains("line 1") && e.contains("kind 'quake'"), "{e}");
        let e = refuse("[[fault]]\nkind = \"brownout\"\nstart = \"1s\"\nduration = \"2s\"\nrepeat = \"1s\"\ncount = 3\n");
        assert!(e.contains("overlap itself"), "{e}");
        let e = refuse("[[step]]\nat = \"1s\"\nlatency = \"50ms\"\n");
        assert!(e.contains("--latency"), "{e}");
    }
}
