//! Reading a schedule file: TOML into checked, expanded [`Action`]s, every error with its line.

use std::collections::HashMap;
use std::mem::{discriminant, Discriminant};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Action, Change, Origin, Schedule};
use crate::enforce::edt::Latency;
use crate::enforce::shaper::Loss;
use crate::units;

/// The most actions a schedule expands to, steps, generator ticks and fault starts and ends all
/// counted. A run holds the expanded schedule in memory and applies its actions one by one:
/// 100,000 is a change every 36 ms for an hour, or every 5 s for almost a week. Without a cap, 100 bytes (a generator every 1 ms until 1000 h, or a fault
/// count of 10^12) asked for billions of actions: nbt used all memory and aborted. Each table is
/// counted before it is expanded.
pub const MAX_ACTIONS: usize = 100_000;

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
    /// The run's jitter: a latency step plus it must stay within 10 s.
    pub jitter_ns: u64,
    /// Outgoing packets' duplicate, corrupt and reorder fractions.
    pub duplicate: f64,
    pub corrupt: f64,
    pub reorder: f64,
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
    pids: Option<toml::Value>,
    egress_rate: Option<toml::Value>,
    ingress_rate: Option<toml::Value>,
    loss: Option<toml::Value>,
    loss_direction: Option<String>,
    latency: Option<toml::Value>,
    duplicate: Option<toml::Value>,
    corrupt: Option<toml::Value>,
    reorder: Option<toml::Value>,
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
    parse_as(source, Naming::File, text_in, initial)
}

/// Parses and checks a schedule built from a command's flags (`nbt fault`, `nbt set`): its
/// messages name the flags (`--memory`, the fault's `DURATION`), with no file or line.
pub fn parse_flags(
    command: &str,
    text_in: &str,
    initial: &Initial,
) -> Result<Schedule, ScheduleError> {
    parse_as(command, Naming::Flags, text_in, initial)
}

/// Whose words a schedule's messages use: the file's keys or the command's flags.
#[derive(Clone, Copy)]
enum Naming {
    File,
    Flags,
}

fn parse_as(
    source: &str,
    naming: Naming,
    text_in: &str,
    initial: &Initial,
) -> Result<Schedule, ScheduleError> {
    let file: File = toml::from_str(text_in).map_err(|e| {
        let what = e.to_string().trim_end().replace('\n', " ");
        match naming {
            Naming::File => ScheduleError(format!("--schedule {source}: {what}")),
            Naming::Flags => ScheduleError(what),
        }
    })?;
    let reader = Reader {
        source,
        naming,
        line_starts: line_starts(text_in),
        initial,
    };
    let seed = file.seed.unwrap_or(0);
    let mut timeline = Timeline::default();
    for step in &file.step {
        reader.step(step, &mut timeline)?;
    }
    for (index, generator) in file.generator.iter().enumerate() {
        reader.generator(seed, index, generator, &mut timeline)?;
    }
    // Faults last: their end puts back what steps and generators had set by their start.
    let before = History::of(&timeline.actions);
    for fault in &file.fault {
        reader.fault(fault, &before, &mut timeline)?;
    }
    reader.check_overlaps(timeline.claims)?;
    let mut actions = timeline.actions;
    // Stable: at one time, steps before fault ends before fault starts, in file order.
    actions.sort_by_key(|a| a.at_ms);
    Ok(Schedule { seed, actions })
}

/// That `source` changes `limit` from `from` to `to` (ms), for the overlap check.
struct Claim {
    limit: &'static str,
    from: u64,
    to: u64,
    source: String,
}

/// What the tables read so far add up to: the actions, and who touches which limit when.
#[derive(Default)]
struct Timeline {
    actions: Vec<Action>,
    claims: Vec<Claim>,
}

impl Timeline {
    /// Whether `n` more actions keep the schedule within [`MAX_ACTIONS`].
    fn has_room_for(&self, n: u64) -> bool {
        (self.actions.len() as u64).saturating_add(n) <= MAX_ACTIONS as u64
    }

    fn claim(&mut self, limit: &'static str, from: u64, to: u64, source: &str) {
        self.claims.push(Claim {
            limit,
            from,
            to,
            source: source.to_string(),
        });
    }

    fn push(&mut self, at_ms: u64, changes: Vec<Change>, origin: Origin, source: String) {
        self.actions.push(Action {
            at_ms,
            changes,
            origin,
            source,
        });
    }
}

/// What reading any table needs: the file's name and where its lines start (for messages and
/// their lines) and the state the run starts with.
struct Reader<'a> {
    source: &'a str,
    naming: Naming,
    line_starts: Vec<usize>,
    initial: &'a Initial,
}

/// The byte offset at which each line of `text` starts, in one pass: looking a table's line up
/// is then a binary search. Counting the newlines before each table instead made a schedule of
/// 100,000 steps take minutes (quadratic).
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

/// A table's values, each checked and in its unit, or an error with the table's line.
impl Reader<'_> {
    /// The line (from 1) of byte `offset`: how many lines start at or before it.
    fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|start| *start <= offset)
    }

    /// Refuses a table at `line` that expands to `n` actions (`what`) past [`MAX_ACTIONS`].
    fn reserve(
        &self,
        line: usize,
        timeline: &Timeline,
        n: u64,
        what: &str,
    ) -> Result<(), ScheduleError> {
        if timeline.has_room_for(n) {
            return Ok(());
        }
        Err(self.err(
            line,
            format!(
                "{what} adds {n} actions to the {} before it: more than {MAX_ACTIONS}, the most \
                 a schedule expands to",
                timeline.actions.len()
            ),
        ))
    }

    fn err(&self, line: usize, what: String) -> ScheduleError {
        match self.naming {
            Naming::File => {
                ScheduleError(format!("--schedule {}, line {line}: {what}", self.source))
            }
            Naming::Flags => ScheduleError(what),
        }
    }

    /// `key` as the user wrote it: the file's key, or the flag it came from.
    fn name(&self, key: &str) -> String {
        match (self.naming, key) {
            (Naming::File, _) => key.to_string(),
            (Naming::Flags, "duration") => "DURATION".to_string(),
            (Naming::Flags, _) => format!("--{key}"),
        }
    }

    /// `result`, with its error put at `line`.
    fn at_line<T, E: std::fmt::Display>(
        &self,
        line: usize,
        result: Result<T, E>,
    ) -> Result<T, ScheduleError> {
        result.map_err(|e| self.err(line, e.to_string()))
    }

    fn duration(
        &self,
        line: usize,
        key: &str,
        value: &toml::Value,
    ) -> Result<Duration, ScheduleError> {
        self.at_line(line, units::parse_duration(&self.name(key), &text(value)))
    }

    /// A duration in whole milliseconds.
    fn millis(&self, line: usize, key: &str, value: &toml::Value) -> Result<u64, ScheduleError> {
        Ok(self.duration(line, key, value)?.as_millis() as u64)
    }

    fn size(&self, line: usize, key: &str, value: &toml::Value) -> Result<u64, ScheduleError> {
        self.at_line(line, units::parse_size(&self.name(key), &text(value)))
    }

    fn cpus(&self, line: usize, key: &str, value: &toml::Value) -> Result<u64, ScheduleError> {
        self.at_line(line, units::parse_cpus(&self.name(key), &text(value)))
    }

    fn percent(&self, line: usize, key: &str, value: &toml::Value) -> Result<f64, ScheduleError> {
        self.at_line(line, units::parse_percent(&self.name(key), &text(value)))
    }

    /// A rate the shaper can keep to.
    fn rate(&self, line: usize, key: &str, value: &toml::Value) -> Result<u64, ScheduleError> {
        let key = &self.name(key);
        let rate = self.at_line(line, units::parse_rate(key, &text(value)))?;
        self.at_line(
            line,
            crate::enforce::shaper::check_rate(key, &text(value), rate),
        )?;
        Ok(rate)
    }

    fn amount(&self, line: usize, key: &str, value: &toml::Value) -> Result<i64, ScheduleError> {
        self.at_line(
            line,
            crate::enforce::ledger::parse_amount(&self.name(key), &text(value)),
        )
    }

    /// Refuses `key` for a run started without a balance.
    fn need_balance(&self, line: usize, key: &str) -> Result<(), ScheduleError> {
        if self.initial.has_balance {
            Ok(())
        } else {
            Err(self.err(line, format!("{key} needs the run started with --balance")))
        }
    }

    /// `loss` on the interfaces `direction` names (`default` when none).
    fn loss_changes(
        &self,
        line: usize,
        direction: Option<&str>,
        default: &str,
        loss: Loss,
    ) -> Result<Vec<Change>, ScheduleError> {
        Ok(match direction.unwrap_or(default) {
            "egress" => vec![Change::EgressLoss { loss }],
            "ingress" => vec![Change::IngressLoss { loss }],
            "both" => vec![Change::EgressLoss { loss }, Change::IngressLoss { loss }],
            other => {
                return Err(self.err(
                    line,
                    format!(
                        "invalid value '{other}' for {}: accepted: egress, ingress, both",
                        self.name("direction")
                    ),
                ))
            }
        })
    }

    /// Two changes of one limit at overlapping times would undo each other: refused.
    fn check_overlaps(&self, mut claims: Vec<Claim>) -> Result<(), ScheduleError> {
        claims.retain(|c| c.limit != "balance");
        claims.sort_by_key(|c| (c.limit, c.from));
        for pair in claims.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.limit == b.limit && b.from <= a.to {
                return Err(ScheduleError(format!(
                    "--schedule {}: {} and {} both set {} at {:.1} s: they overlap; move one",
                    self.source,
                    a.source,
                    b.source,
                    a.limit,
                    b.from as f64 / 1000.0
                )));
            }
        }
        Ok(())
    }
}

/// `[[step]]` tables: changes at one moment.
impl Reader<'_> {
    fn step(&self, step: &Spanned<StepToml>, timeline: &mut Timeline) -> Result<(), ScheduleError> {
        let line = self.line_of(step.span().start);
        self.reserve(line, timeline, 1, "this step")?;
        let s = step.get_ref();
        let at = self.millis(line, "at", &s.at)?;
        let mut changes = Vec::new();
        self.resource_changes(line, s, &mut changes)?;
        self.network_changes(line, s, &mut changes)?;
        self.ledger_changes(line, s, &mut changes)?;
        if changes.is_empty() {
            return Err(self.err(line, "this step changes nothing: give memory, swap, cpus, pids, egress-rate, ingress-rate, loss, latency, duplicate, corrupt, reorder, balance-add, balance-charge, price-call or price-egress".into()));
        }
        let source = format!("step (line {line})");
        for change in &changes {
            timeline.claim(change.limit(), at, at, &source);
        }
        timeline.push(at, changes, Origin::Step, source);
        Ok(())
    }

    /// memory, swap, cpus and pids.
    fn resource_changes(
        &self,
        line: usize,
        s: &StepToml,
        changes: &mut Vec<Change>,
    ) -> Result<(), ScheduleError> {
        if let Some(v) = &s.memory {
            changes.push(Change::Memory {
                bytes: Some(self.size(line, "memory", v)?),
            });
        }
        if let Some(v) = &s.swap {
            changes.push(Change::Swap {
                bytes: Some(self.size(line, "swap", v)?),
            });
        }
        if let Some(v) = &s.cpus {
            changes.push(Change::Cpus {
                millicores: Some(self.cpus(line, "cpus", v)?),
            });
        }
        if let Some(v) = &s.pids {
            let count = self.at_line(line, units::parse_count(&self.name("pids"), &text(v)))?;
            if count == 0 || count > crate::enforce::cgroup::MAX_PIDS {
                return Err(self.err(
                    line,
                    format!(
                        "invalid value '{}' for {}: accepted: 1 to {}",
                        text(v),
                        self.name("pids"),
                        crate::enforce::cgroup::MAX_PIDS
                    ),
                ));
            }
            changes.push(Change::Pids { count: Some(count) });
        }
        Ok(())
    }

    /// egress-rate, ingress-rate, loss (with loss-direction) and latency.
    fn network_changes(
        &self,
        line: usize,
        s: &StepToml,
        changes: &mut Vec<Change>,
    ) -> Result<(), ScheduleError> {
        if let Some(v) = &s.egress_rate {
            changes.push(Change::EgressRate {
                bits_per_sec: Some(self.rate(line, "egress-rate", v)?),
            });
        }
        if let Some(v) = &s.ingress_rate {
            changes.push(Change::IngressRate {
                bits_per_sec: Some(self.rate(line, "ingress-rate", v)?),
            });
        }
        if let Some(v) = &s.loss {
            let loss = Loss::uniform(self.percent(line, "loss", v)?);
            changes.extend(self.loss_changes(line, s.loss_direction.as_deref(), "egress", loss)?);
        } else if s.loss_direction.is_some() {
            return Err(self.err(
                line,
                "loss-direction says where `loss` applies: the step has no loss".into(),
            ));
        }
        if let Some(v) = &s.latency {
            if self.initial.latency_ns.is_none() {
                return Err(self.err(line, "a latency step needs the run started with --latency (0ms will do), which puts fq on its interfaces".into()));
            }
            let jitter = Duration::from_nanos(self.initial.jitter_ns);
            let value = text(v);
            let given = [Some(("latency", value.as_str())), None];
            let latency = Latency::checked(self.duration(line, "latency", v)?, jitter, given);
            changes.push(Change::Latency {
                ns: self.at_line(line, latency)?.latency_ns,
            });
        }
        if let Some(v) = &s.duplicate {
            changes.push(Change::Duplicate {
                fraction: self.percent(line, "duplicate", v)?,
            });
        }
        if let Some(v) = &s.corrupt {
            changes.push(Change::Corrupt {
                fraction: self.percent(line, "corrupt", v)?,
            });
        }
        if let Some(v) = &s.reorder {
            if self.initial.latency_ns.is_none_or(|ns| ns == 0) {
                return Err(self.err(line, "a reorder step sends packets ahead of the added delay: it needs the run started with --latency".into()));
            }
            changes.push(Change::Reorder {
                fraction: self.percent(line, "reorder", v)?,
            });
        }
        Ok(())
    }

    /// balance-add, balance-charge, price-call and price-egress: runs with a balance only.
    fn ledger_changes(
        &self,
        line: usize,
        s: &StepToml,
        changes: &mut Vec<Change>,
    ) -> Result<(), ScheduleError> {
        for (key, value, sign) in [
            ("balance-add", &s.balance_add, 1),
            ("balance-charge", &s.balance_charge, -1),
        ] {
            if let Some(v) = value {
                self.need_balance(line, key)?;
                changes.push(Change::Balance {
                    micro: sign * self.amount(line, key, v)?,
                });
            }
        }
        if let Some(v) = &s.price_call {
            self.need_balance(line, "price-call")?;
            changes.push(Change::PriceCall {
                micro: self.amount(line, "price-call", v)?,
            });
        }
        if let Some(v) = &s.price_egress {
            self.need_balance(line, "price-egress")?;
            changes.push(Change::PriceEgress {
                pico_per_byte: self.at_line(
                    line,
                    crate::enforce::ledger::parse_price_per_gb("price-egress", &text(v)),
                )?,
            });
        }
        Ok(())
    }
}

/// A generator's checked settings: when it ticks, between which bounds (in the limit's own
/// unit, as numbers), and how it moves.
struct Wave {
    every: u64,
    from: u64,
    until: u64,
    min: f64,
    max: f64,
    /// The sine's period (periodic), or 0 (random walk).
    period_ms: f64,
    /// random-walk: the largest move per interval, as a fraction of max − min.
    step: f64,
}

impl Wave {
    /// The value at each tick from `from` to `until`, with its time.
    fn values(&self, mut rng: SplitMix) -> Vec<(u64, f64)> {
        let (min, max) = (self.min, self.max);
        let mut value = (min + max) / 2.0;
        let mut values = Vec::new();
        let mut t = self.from;
        while t <= self.until {
            value = if self.period_ms > 0.0 {
                let phase = (t - self.from) as f64 / self.period_ms * std::f64::consts::TAU;
                (min + max) / 2.0 + (max - min) / 2.0 * phase.sin()
            } else {
                (value + (rng.unit() * 2.0 - 1.0) * self.step * (max - min)).clamp(min, max)
            };
            values.push((t, value));
            t += self.every;
        }
        values
    }
}

/// `[[generator]]` tables: a limit driven along a random walk or a sine.
impl Reader<'_> {
    fn generator(
        &self,
        seed: u64,
        index: usize,
        generator: &Spanned<GeneratorToml>,
        timeline: &mut Timeline,
    ) -> Result<(), ScheduleError> {
        let line = self.line_of(generator.span().start);
        let g = generator.get_ref();
        let wave = self.wave(line, g)?;
        // Counted before a single tick is made: `until` > `from`, `every` > 0.
        let ticks = (wave.until - wave.from) / wave.every + 1;
        self.reserve(line, timeline, ticks, "this generator")?;
        let rng = SplitMix(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let source = format!("generator {} (line {line})", g.limit);
        timeline.claim(limit_name(&g.limit), wave.from, wave.until, &source);
        for (t, value) in wave.values(rng) {
            let change = generated_change(&g.limit, value);
            timeline.push(t, vec![change], Origin::Generator, source.clone());
        }
        Ok(())
    }

    /// Checks a generator's settings, in the order they are refused in.
    fn wave(&self, line: usize, g: &GeneratorToml) -> Result<Wave, ScheduleError> {
        let every = self.millis(line, "every", &g.every)?;
        if every == 0 {
            return Err(self.err(line, "every must be longer than 0".into()));
        }
        let from = match &g.from {
            Some(v) => self.millis(line, "from", v)?,
            None => 0,
        };
        let until = self.millis(line, "until", &g.until)?;
        if until <= from {
            return Err(self.err(
                line,
                format!("until ({until} ms) must come after from ({from} ms)"),
            ));
        }
        let min = self.bound(line, &g.limit, "min", &g.min)?;
        let max = self.bound(line, &g.limit, "max", &g.max)?;
        if min > max {
            return Err(self.err(line, "min is above max".into()));
        }
        let period_ms = self.period_ms(line, g)?;
        let step = g.step.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&step) {
            return Err(self.err(
                line,
                format!("step {step}: a fraction of max - min, 0 to 1"),
            ));
        }
        Ok(Wave {
            every,
            from,
            until,
            min,
            max,
            period_ms,
            step,
        })
    }

    /// A generator's min or max in its limit's own unit, as a number.
    fn bound(
        &self,
        line: usize,
        limit: &str,
        key: &str,
        value: &toml::Value,
    ) -> Result<f64, ScheduleError> {
        let t = text(value);
        let r = match limit {
            "egress-rate" | "ingress-rate" => units::parse_rate(key, &t).and_then(|x| {
                crate::enforce::shaper::check_rate(key, &t, x)?;
                Ok(x as f64)
            }),
            "cpus" => units::parse_cpus(key, &t).map(|x| x as f64),
            "loss" => units::parse_percent(key, &t),
            other => {
                let what = format!(
                    "limit '{other}': a generator drives egress-rate, ingress-rate, cpus or loss"
                );
                return Err(self.err(line, what));
            }
        };
        self.at_line(line, r)
    }

    /// The sine's period for kind = "periodic", 0 for kind = "random-walk".
    fn period_ms(&self, line: usize, g: &GeneratorToml) -> Result<f64, ScheduleError> {
        Ok(match (g.kind.as_str(), &g.period) {
            ("periodic", Some(p)) => self.duration(line, "period", p)?.as_millis() as f64,
            ("periodic", None) => {
                return Err(self.err(line, "a periodic generator needs period".into()))
            }
            ("random-walk", Some(_)) => {
                return Err(self.err(line, "period is for kind = \"periodic\"".into()))
            }
            ("random-walk", None) => 0.0,
            (other, _) => {
                return Err(self.err(
                    line,
                    format!("kind '{other}': accepted: random-walk, periodic"),
                ))
            }
        })
    }
}

/// A generator's change of `limit` to `value` (in the limit's unit).
fn generated_change(limit: &str, value: f64) -> Change {
    match limit {
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
    }
}

/// When a fault strikes: its first start, its length (none for an instant one), and how many
/// times, how far apart (ms).
struct Timing {
    start: u64,
    length: Option<u64>,
    count: u64,
    repeat: u64,
}

/// `[[fault]]` tables: a change for a while (or at one moment), once or repeated.
impl Reader<'_> {
    /// Reads a fault; `before` (in time order) holds the steps' and generators' actions, whose
    /// values the fault's end puts back.
    fn fault(
        &self,
        fault: &Spanned<FaultToml>,
        before: &History,
        timeline: &mut Timeline,
    ) -> Result<(), ScheduleError> {
        let line = self.line_of(fault.span().start);
        let f = fault.get_ref();
        let timing = self.timing(line, f)?;
        let table = FaultTable {
            reader: self,
            line,
            f,
            length: timing.length,
        };
        let (on, instant) = table.changes()?;
        // A start, and an end unless instant, each time: counted before any is made.
        let per_strike = if instant { 1 } else { 2 };
        let what = format!("this fault (count {})", timing.count);
        self.reserve(
            line,
            timeline,
            timing.count.saturating_mul(per_strike),
            &what,
        )?;
        table.emit(&timing, &on, instant, before, timeline);
        Ok(())
    }

    fn timing(&self, line: usize, f: &FaultToml) -> Result<Timing, ScheduleError> {
        let start = self.millis(line, "start", &f.start)?;
        let length = match &f.duration {
            Some(v) => Some(self.millis(line, "duration", v)?),
            None => None,
        };
        let count = f.count.unwrap_or(1);
        let repeat = match &f.repeat {
            Some(v) => self.millis(line, "repeat", v)?,
            None if count > 1 => {
                return Err(self.err(
                    line,
                    "count needs repeat, the time between the fault's starts".into(),
                ))
            }
            None => 0,
        };
        if count == 0 {
            return Err(self.err(line, "count must be at least 1".into()));
        }
        if count > MAX_ACTIONS as u64 {
            return Err(self.err(
                line,
                format!("count {count}: a schedule expands to at most {MAX_ACTIONS} actions"),
            ));
        }
        if let (Some(length), true) = (length, repeat > 0) {
            if repeat <= length {
                return Err(self.err(line, format!("repeat ({repeat} ms) must be longer than duration ({length} ms): the fault would overlap itself")));
            }
        }
        Ok(Timing {
            start,
            length,
            count,
            repeat,
        })
    }
}

/// One fault table being read: its line, its keys and its duration, if it has one.
struct FaultTable<'a> {
    reader: &'a Reader<'a>,
    line: usize,
    f: &'a FaultToml,
    length: Option<u64>,
}

impl FaultTable<'_> {
    fn err(&self, what: String) -> ScheduleError {
        self.reader.err(self.line, what)
    }

    /// Refuses `key`, when `given`, as foreign to this kind of fault.
    fn unused(&self, key: &str, given: bool) -> Result<(), ScheduleError> {
        if given {
            Err(self.err(format!(
                "{} does not apply to a {} fault",
                self.reader.name(key),
                self.f.kind
            )))
        } else {
            Ok(())
        }
    }

    fn need_duration(&self) -> Result<u64, ScheduleError> {
        self.length.ok_or_else(|| {
            self.err(format!(
                "a {} fault needs {}",
                self.f.kind,
                self.reader.name("duration")
            ))
        })
    }

    /// The fault's change and whether it is instant (no end to put back).
    fn changes(&self) -> Result<(Vec<Change>, bool), ScheduleError> {
        Ok(match self.f.kind.as_str() {
            "brownout" => (self.brownout()?, false),
            "network-drop" | "loss-burst" => (self.network()?, false),
            "memory-squeeze" => (self.memory_squeeze()?, false),
            "balance-shock" => (self.balance_shock()?, true),
            "memory-leak" => (self.memory_leak()?, false),
            other => {
                return Err(self.err(format!(
                    "kind '{other}': accepted: brownout, network-drop, loss-burst, \
                     memory-squeeze, memory-leak, balance-shock"
                )))
            }
        })
    }

    fn brownout(&self) -> Result<Vec<Change>, ScheduleError> {
        let f = self.f;
        self.unused("direction", f.direction.is_some())?;
        self.unused("rate", f.rate.is_some())?;
        self.unused("loss", f.loss.is_some())?;
        self.unused("memory", f.memory.is_some())?;
        self.unused("amount", f.amount.is_some())?;
        self.need_duration()?;
        Ok(match &f.cpus {
            Some(v) => vec![Change::Cpus {
                millicores: Some(self.reader.cpus(self.line, "cpus", v)?),
            }],
            None => vec![Change::Freeze { frozen: true }],
        })
    }

    /// network-drop (all packets lost) and loss-burst (some).
    fn network(&self) -> Result<Vec<Change>, ScheduleError> {
        let f = self.f;
        self.unused("cpus", f.cpus.is_some())?;
        self.unused("rate", f.rate.is_some())?;
        self.unused("memory", f.memory.is_some())?;
        self.unused("amount", f.amount.is_some())?;
        self.need_duration()?;
        let (loss, default_direction) = if f.kind == "network-drop" {
            self.unused("loss", f.loss.is_some())?;
            (Loss::uniform(1.0), "both")
        } else {
            let v = f.loss.as_ref().ok_or_else(|| {
                self.err(format!(
                    "a loss-burst fault needs {}",
                    self.reader.name("loss")
                ))
            })?;
            (
                Loss::uniform(self.reader.percent(self.line, "loss", v)?),
                "egress",
            )
        };
        self.reader
            .loss_changes(self.line, f.direction.as_deref(), default_direction, loss)
    }

    fn memory_squeeze(&self) -> Result<Vec<Change>, ScheduleError> {
        let f = self.f;
        self.unused("cpus", f.cpus.is_some())?;
        self.unused("rate", f.rate.is_some())?;
        self.unused("direction", f.direction.is_some())?;
        self.unused("loss", f.loss.is_some())?;
        self.unused("amount", f.amount.is_some())?;
        self.need_duration()?;
        let v = f.memory.as_ref().ok_or_else(|| {
            self.err(format!(
                "a memory-squeeze fault needs {}, the size to squeeze the run to",
                self.reader.name("memory")
            ))
        })?;
        let bytes = self.reader.size(self.line, "memory", v)?;
        Ok(vec![Change::MemoryHigh { bytes: Some(bytes) }])
    }

    fn balance_shock(&self) -> Result<Vec<Change>, ScheduleError> {
        let f = self.f;
        self.unused("cpus", f.cpus.is_some())?;
        self.unused("rate", f.rate.is_some())?;
        self.unused("direction", f.direction.is_some())?;
        self.unused("loss", f.loss.is_some())?;
        self.unused("memory", f.memory.is_some())?;
        self.unused("duration", f.duration.is_some())?;
        if !self.reader.initial.has_balance {
            return Err(self.err("a balance-shock needs the run started with --balance".into()));
        }
        let v = f.amount.as_ref().ok_or_else(|| {
            self.err(format!(
                "a balance-shock fault needs {}, the charge",
                self.reader.name("amount")
            ))
        })?;
        let micro = self.reader.amount(self.line, "amount", v)?;
        Ok(vec![Change::Balance { micro: -micro }])
    }

    fn memory_leak(&self) -> Result<Vec<Change>, ScheduleError> {
        let f = self.f;
        self.unused("cpus", f.cpus.is_some())?;
        self.unused("direction", f.direction.is_some())?;
        self.unused("loss", f.loss.is_some())?;
        self.unused("memory", f.memory.is_some())?;
        self.unused("amount", f.amount.is_some())?;
        self.need_duration()?;
        let v = f.rate.as_ref().ok_or_else(|| {
            self.err(format!(
                "a memory-leak fault needs {}, the balloon's growth per second (10M)",
                self.reader.name("rate")
            ))
        })?;
        let t = text(v);
        let bytes = self.reader.at_line(
            self.line,
            units::parse_size(&self.reader.name("rate"), t.trim().trim_end_matches("/s")),
        )?;
        if bytes == 0 {
            return Err(self.err(format!("{} must be above 0", self.reader.name("rate"))));
        }
        Ok(vec![Change::Leak {
            bytes_per_sec: Some(bytes),
        }])
    }

    /// The fault's actions, each time it strikes: `on` at its start and, unless `instant`,
    /// what `before` had in force then at its end.
    fn emit(
        &self,
        timing: &Timing,
        on: &[Change],
        instant: bool,
        before: &History,
        timeline: &mut Timeline,
    ) {
        let (f, line, initial) = (self.f, self.line, self.reader.initial);
        for n in 0..timing.count {
            // At most a year plus 100,000 years in ms: far inside a u64 (units::MAX_DURATION).
            let at = timing.start + n * timing.repeat;
            let name = format!("{} #{} (line {line})", f.kind, n + 1);
            if instant {
                timeline.push(at, on.to_vec(), Origin::Fault, name);
                continue;
            }
            let end = at + timing.length.unwrap_or(0);
            for change in on {
                timeline.claim(change.limit(), at, end, &name);
            }
            let off: Vec<Change> = on.iter().map(|c| restore(c, before, at, initial)).collect();
            timeline.push(at, on.to_vec(), Origin::FaultStart, name.clone());
            timeline.push(end, off, Origin::FaultEnd, name);
        }
    }
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

/// The values steps and generators set, per kind of change, each list in time order (file order
/// at one time): what a fault's end puts back is a binary search, not a scan of every action
/// before it for every strike of every fault.
struct History {
    by_kind: HashMap<Discriminant<Change>, Vec<(u64, Change)>>,
}

impl History {
    fn of(actions: &[Action]) -> History {
        let mut by_kind: HashMap<_, Vec<(u64, Change)>> = HashMap::new();
        for action in actions {
            for change in &action.changes {
                by_kind
                    .entry(discriminant(change))
                    .or_default()
                    .push((action.at_ms, change.clone()));
            }
        }
        for list in by_kind.values_mut() {
            // Stable: at one time, the later in file order wins, as it does when applied.
            list.sort_by_key(|(at, _)| *at);
        }
        History { by_kind }
    }

    /// The last change of `like`'s kind at or before `at`.
    fn last(&self, like: &Change, at: u64) -> Option<&Change> {
        let list = self.by_kind.get(&discriminant(like))?;
        let n = list.partition_point(|(t, _)| *t <= at);
        n.checked_sub(1).map(|i| &list[i].1)
    }
}

/// What puts `change`'s limit back after a fault starting at `at`: the last value steps and
/// generators set before then, else the run's initial one.
fn restore(change: &Change, before: &History, at: u64, initial: &Initial) -> Change {
    match change {
        Change::Freeze { .. } => Change::Freeze { frozen: false },
        Change::Leak { .. } => Change::Leak {
            bytes_per_sec: None,
        },
        Change::MemoryHigh { .. } => {
            // Lifted back to the memory limit in force (a memory step sets that one).
            let memory = match before.last(&Change::Memory { bytes: None }, at) {
                Some(Change::Memory { bytes }) => *bytes,
                _ => initial.memory,
            };
            Change::MemoryHigh { bytes: memory }
        }
        _ => before
            .last(change, at)
            .cloned()
            .unwrap_or_else(|| initial_value(change, initial)),
    }
}

/// `change`'s limit as the run started.
fn initial_value(change: &Change, initial: &Initial) -> Change {
    match change {
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
        Change::Duplicate { .. } => Change::Duplicate {
            fraction: initial.duplicate,
        },
        Change::Corrupt { .. } => Change::Corrupt {
            fraction: initial.corrupt,
        },
        Change::Reorder { .. } => Change::Reorder {
            fraction: initial.reorder,
        },
        Change::Latency { .. } => Change::Latency {
            ns: initial.latency_ns.unwrap_or(0),
        },
        other => other.clone(),
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

    fn generator_until(until: &str) -> String {
        format!(
            "seed = 1\n\n[[generator]]\nlimit = \"cpus\"\nkind = \"random-walk\"\nevery = \"1ms\"\n\
             until = \"{until}\"\nmin = 0.1\nmax = 1\n"
        )
    }

    #[test]
    fn a_generator_up_to_the_cap_of_actions() {
        // 0 ms to 99,999 ms every 1 ms: exactly 100,000 ticks.
        let s = parse("g.toml", &generator_until("99999ms"), &initial()).unwrap();
        assert_eq!(s.actions.len(), MAX_ACTIONS);
        let e = parse("g.toml", &generator_until("100s"), &initial())
            .unwrap_err()
            .0;
        assert!(
            e.contains("g.toml, line 3: this generator adds 100001 actions to the 0 before it: more than 100000"),
            "{e}"
        );
        // The 100-byte schedule that used all memory: refused before a tick is made.
        let e = parse("g.toml", &generator_until("1000h"), &initial())
            .unwrap_err()
            .0;
        assert!(e.contains("adds 3600000001 actions"), "{e}");
    }

    #[test]
    fn fault_counts_are_checked_before_expanding() {
        let fault = |count: u64, duration: &str| {
            format!("[[step]]\nat = \"0s\"\ncpus = 1\n[[fault]]\nkind = \"brownout\"\nstart = \"1s\"\n{duration}repeat = \"2ms\"\ncount = {count}\n")
        };
        let brownout = |count| fault(count, "duration = \"1ms\"\n");
        let e = parse("f", &brownout(1_000_000_000_000), &initial())
            .unwrap_err()
            .0;
        assert!(
            e.contains("line 4: count 1000000000000: a schedule expands to at most 100000"),
            "{e}"
        );
        // A start and an end each: 49,999 strikes and the step fit, 50,000 do not.
        let s = parse("f", &brownout(49_999), &initial()).unwrap();
        assert_eq!(s.actions.len(), MAX_ACTIONS - 1);
        let e = parse("f", &brownout(50_000), &initial()).unwrap_err().0;
        assert!(
            e.contains("line 4: this fault (count 50000) adds 100000 actions to the 1 before it"),
            "{e}"
        );
        // An instant fault is one action a strike.
        let shock = |count| {
            format!("[[step]]\nat = \"0s\"\ncpus = 1\n[[fault]]\nkind = \"balance-shock\"\nstart = \"1s\"\namount = \"1\"\nrepeat = \"1ms\"\ncount = {count}\n")
        };
        assert_eq!(
            parse("f", &shock(99_999), &initial())
                .unwrap()
                .actions
                .len(),
            MAX_ACTIONS
        );
        assert!(parse("f", &shock(100_000), &initial()).is_err());
    }

    fn steps(n: usize) -> String {
        (1..=n)
            .map(|i| format!("[[step]]\nat = \"{i}ms\"\ncpus = 1\n"))
            .collect()
    }

    #[test]
    fn steps_up_to_the_cap_each_with_its_line() {
        let s = parse("s", &steps(MAX_ACTIONS), &initial()).unwrap();
        assert_eq!(s.actions.len(), MAX_ACTIONS);
        assert_eq!(s.actions[MAX_ACTIONS - 1].source, "step (line 299998)");
        let e = parse("s", &steps(MAX_ACTIONS + 1), &initial())
            .unwrap_err()
            .0;
        assert!(
            e.contains("s, line 300001: this step adds 1 actions to the 100000 before it"),
            "{e}"
        );
    }

    /// The same bad fault read from a file names its keys and line; built from `nbt fault`'s
    /// arguments, it names the flags, with no file or line.
    #[test]
    fn a_fault_from_flags_names_the_flags() {
        let text =
            "[[fault]]\nkind = \"memory-leak\"\nstart = \"0s\"\nduration = \"1s\"\nrate = \"5\"\n";
        let file = parse("f.toml", text, &initial()).unwrap_err().0;
        assert!(
            file.starts_with("--schedule f.toml, line 1: invalid value '5' for rate:"),
            "{file}"
        );
        let flags = parse_flags("nbt fault", text, &initial()).unwrap_err().0;
        assert!(
            flags.starts_with("invalid value '5' for --rate:"),
            "{flags}"
        );
        let no_duration = "[[fault]]\nkind = \"brownout\"\nstart = \"0s\"\n";
        assert_eq!(
            parse_flags("nbt fault", no_duration, &initial())
                .unwrap_err()
                .0,
            "a brownout fault needs DURATION"
        );
    }

    #[test]
    fn lines_are_found_from_the_line_starts() {
        let starts = line_starts("a\nbc\n\nd");
        assert_eq!(starts, [0, 2, 5, 6]);
        let reader = Reader {
            source: "s",
            naming: Naming::File,
            line_starts: starts,
            initial: &initial(),
        };
        let lines: Vec<usize> = (0..8).map(|o| reader.line_of(o)).collect();
        assert_eq!(lines, [1, 1, 2, 2, 2, 3, 4, 4]);
    }

    #[test]
    fn a_fault_puts_back_the_value_in_force_at_its_start_among_many() {
        // Many generator ticks before a fault: its end restores the last tick at its start.
        let text = "[[generator]]\nlimit = \"cpus\"\nkind = \"periodic\"\nperiod = \"8s\"\nevery = \"2s\"\nuntil = \"8s\"\nmin = 0.5\nmax = 1.5\n[[fault]]\nkind = \"brownout\"\nstart = \"9s\"\nduration = \"1s\"\ncpus = 0.1\n[[fault]]\nkind = \"memory-squeeze\"\nstart = \"1s\"\nduration = \"1s\"\nmemory = \"64M\"\n";
        let s = parse(
            "t",
            text,
            &Initial {
                memory: Some(1 << 30),
                ..initial()
            },
        )
        .unwrap();
        let end = |at: u64| {
            s.actions
                .iter()
                .rev()
                .find(|a| a.at_ms == at)
                .unwrap()
                .changes
                .clone()
        };
        assert_eq!(
            end(10_000),
            [Change::Cpus {
                millicores: Some(1000)
            }]
        );
        assert_eq!(
            end(2_000)[0],
            Change::MemoryHigh {
                bytes: Some(1 << 30)
            }
        );
    }

    #[test]
    fn latency_steps_within_ten_seconds_with_the_jitter() {
        let with_latency = Initial {
            latency_ns: Some(0),
            jitter_ns: 2_000_000_000,
            ..initial()
        };
        let step = |latency: &str| format!("[[step]]\nat = \"1s\"\nlatency = \"{latency}\"\n");
        assert!(parse("l", &step("8s"), &with_latency).is_ok());
        let e = parse("l", &step("8001ms"), &with_latency).unwrap_err().0;
        assert!(
            e.contains(
                "line 1: invalid value '8001ms' for latency: latency plus jitter above 10 s"
            ),
            "{e}"
        );
        let e = parse("l", &step("10000000000000000000s"), &with_latency)
            .unwrap_err()
            .0;
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn generator_rates_are_checked_like_any_rate() {
        let text = |max: &str| {
            format!("[[generator]]\nlimit = \"egress-rate\"\nkind = \"random-walk\"\nevery = \"1s\"\nuntil = \"2s\"\nmin = \"1mbit\"\nmax = \"{max}\"\n")
        };
        assert!(parse("r", &text("100gbit"), &initial()).is_ok());
        let e = parse("r", &text("101gbit"), &initial()).unwrap_err().0;
        assert!(e.contains("above 100gbit"), "{e}");
    }
}
