//! The plan of a run: every limit parsed and checked once, from a profile and the flags, before
//! anything on the machine is touched. What nbt cannot enforce yet is listed, never dropped.

pub mod link;
pub mod probe;
pub mod target;

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::enforce::cgroup::Limits;
use crate::enforce::edt::Latency;
use crate::enforce::gate::{self, Rule};
use crate::enforce::ledger::{self, Prices};
use crate::enforce::shaper::{self, Loss, NetLimits};
use crate::error::PlanError;
use crate::units;

/// The seed's numbers, those of the Negative-Balance Training scripts nbt grew from (6 GB memory,
/// 500 MB swap, 512 kbit, 5% loss, 100 ms, 75 W, 1200 MHz, 2.0 GHz with turbo off).
pub const NBT_PROFILE: &str = r#"
description = "Negative-Balance Training: the seed's scarcity"
memory = "6G"
swap = "500M"
egress-rate = "512kbit"
ingress-rate = "512kbit"
loss = "5%"
latency = "100ms"
gpu-power-limit = 75
gpu-clock = 1200
cpu-max-freq = "2.0GHz"
no-turbo = true
"#;

/// The names `--profile` takes besides a file path.
pub const BUILT_IN_PROFILES: [&str; 2] = ["nbt", "none"];

/// A profile file: the same settings as the flags of `nbt run`, named as the flags without `--`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    pub description: Option<String>,
    pub memory: Option<toml::Value>,
    pub swap: Option<toml::Value>,
    pub cpus: Option<toml::Value>,
    pub pids: Option<toml::Value>,
    pub egress_rate: Option<toml::Value>,
    pub ingress_rate: Option<toml::Value>,
    pub ingress_queue: Option<toml::Value>,
    pub burst: Option<toml::Value>,
    pub loss: Option<toml::Value>,
    pub loss_model: Option<toml::Value>,
    pub loss_direction: Option<toml::Value>,
    pub latency: Option<toml::Value>,
    pub jitter: Option<toml::Value>,
    pub loss_correlation: Option<toml::Value>,
    pub jitter_correlation: Option<toml::Value>,
    pub duplicate: Option<toml::Value>,
    pub corrupt: Option<toml::Value>,
    pub reorder: Option<toml::Value>,
    pub reorder_correlation: Option<toml::Value>,
    pub reorder_gap: Option<toml::Value>,
    pub impair_direction: Option<toml::Value>,
    /// `[[link]]` tables: destinations with limits of their own (`link`).
    pub link: Option<toml::Value>,
    pub balance: Option<toml::Value>,
    pub price_egress: Option<toml::Value>,
    pub price_call: Option<toml::Value>,
    pub call_gap: Option<toml::Value>,
    pub price_kwh: Option<toml::Value>,
    pub price_hour: Option<toml::Value>,
    pub gate: Option<toml::Value>,
    pub gpu_power_limit: Option<toml::Value>,
    pub gpu_clock: Option<toml::Value>,
    pub cpu_max_freq: Option<toml::Value>,
    pub no_turbo: Option<toml::Value>,
    pub schedule: Option<toml::Value>,
    pub accept_min_delta: Option<toml::Value>,
}

/// Settings of the command line and profiles that this version of nbt does not enforce yet, with
/// the capability each belongs to. Asking for one is refused, never silently dropped.
pub const NOT_YET: [(&str, &str); 1] =
    [("price-kwh", "energy telemetry (it charges measured joules)")];

/// Values given on the command line; `None` where the flag was not given.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub profile: Option<String>,
    pub memory: Option<String>,
    pub swap: Option<String>,
    pub cpus: Option<String>,
    pub pids: Option<String>,
    pub egress_rate: Option<String>,
    pub ingress_rate: Option<String>,
    /// `--ingress-queue`: auto, true or false (the flag alone: true).
    pub ingress_queue: Option<String>,
    pub burst: Option<String>,
    pub loss: Option<String>,
    pub loss_model: Option<String>,
    pub loss_direction: Option<String>,
    pub latency: Option<String>,
    pub jitter: Option<String>,
    pub loss_correlation: Option<String>,
    pub jitter_correlation: Option<String>,
    pub duplicate: Option<String>,
    pub corrupt: Option<String>,
    pub reorder: Option<String>,
    pub reorder_correlation: Option<String>,
    pub reorder_gap: Option<String>,
    pub impair_direction: Option<String>,
    /// `--link`, each as given.
    pub links: Vec<String>,
    pub balance: Option<String>,
    pub price_egress: Option<String>,
    pub price_call: Option<String>,
    pub call_gap: Option<String>,
    pub price_hour: Option<String>,
    pub gate: Option<String>,
    pub receipts: Option<std::path::PathBuf>,
    pub accept_min_delta: Option<String>,
    pub schedule: Option<String>,
    pub restart: Option<String>,
    /// Flags of capabilities not built yet, by name (without `--`), with their values.
    pub not_yet: Vec<(String, String)>,
    pub cpu_max_freq: Option<String>,
    pub no_turbo: bool,
    pub gpu_power_limit: Option<String>,
    pub gpu_clock: Option<String>,
    pub gpu_mem_clock: Option<String>,
    pub gpu_memory: Option<String>,
    pub gpus: Option<String>,
}

/// A setting that was asked for but is not enforced by this version, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pending {
    pub setting: String,
    pub value: String,
    pub origin: String,
    pub capability: String,
}

/// What --ingress-queue came to for a run.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IngressQueue {
    /// Arriving packets queue at the ingress rates.
    pub queued: bool,
    /// Asked for (`true`), not left to `auto`.
    pub asked: bool,
    /// Under `auto` with an ingress rate: what the kernel lacks for the queue.
    pub policed_because: Option<String>,
}

impl fmt::Display for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({}; needs {})",
            self.setting, self.value, self.origin, self.capability
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub profile: String,
    pub limits: Limits,
    pub net: NetLimits,
    /// Added delay of the run's outgoing packets (EDT + fq); `None`: none.
    pub latency: Option<Latency>,
    /// --duplicate, --corrupt or --reorder was given (0% included): the tc program goes on the
    /// interfaces, so that `nbt set` and the schedule can change them.
    pub tc_impairments: bool,
    /// Where --duplicate and --corrupt apply (`--impair-direction`).
    pub impair_direction: shaper::Directions,
    /// Arriving packets wait in a queue at the ingress rates instead of being dropped beyond
    /// them (`--ingress-queue`; an ifb device with fq, `enforce::edt`).
    #[serde(default)]
    pub ingress_queue: bool,
    /// `--ingress-queue` was given as true (or the profile's `ingress-queue = true`), not left to
    /// `auto`: only a queue asked for refuses to run without it.
    #[serde(skip)]
    pub ingress_queue_asked: bool,
    /// Why an ingress rate is policed rather than queued under `auto`: what the kernel lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_policed_because: Option<String>,
    /// Destinations with limits of their own (`--link`, `[[link]]`).
    pub links: Vec<link::Link>,
    /// The balance and its prices; `None`: no balance, no gate.
    pub prices: Option<Prices>,
    pub gate: Vec<Rule>,
    /// Asked for, not enforced: `nbt run` refuses a plan that has any.
    pub pending: Vec<Pending>,
    /// The receipt store the run appends to.
    pub receipts: std::path::PathBuf,
    /// A reported learning update is accepted when its loss drops by more than this.
    pub accept_min_delta: f64,
    /// Changes and faults over the run's time (`--schedule FILE`).
    pub schedule: Option<crate::schedule::Schedule>,
    /// How many times a failed workload is started again (`--restart on-failure[:N]`).
    pub restart_max: u32,
    /// The name given with `--name`, unique among live runs.
    pub name: Option<String>,
    /// How often the run's time series is sampled (`--series-interval`).
    pub series_interval: std::time::Duration,
    /// Whether a live status line is kept on stderr (a terminal, and no `--quiet`).
    #[serde(skip)]
    pub status_line: bool,
    /// Machine-wide hardware caps, restored when the run ends (the summary reports what was
    /// set and restored).
    #[serde(skip)]
    pub hwcaps: crate::enforce::hwcaps::HwRequest,
}

/// How often a run samples its time series unless `--series-interval` says otherwise.
pub const DEFAULT_SERIES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Smallest memory limit accepted: below it no process can even be exec'd reliably.
pub const MIN_MEMORY: u64 = 1 << 20;

pub use crate::enforce::cgroup::MAX_PIDS;

/// The largest profile file: a profile is a few lines, and the file is read whole.
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// The largest schedule file: room for a schedule at its cap of actions written one step each
/// (`schedule::parse::MAX_ACTIONS`: 100,000 steps of 25 to 40 bytes), read and parsed whole.
pub const MAX_SCHEDULE_BYTES: u64 = 4 << 20;

/// Reads the file at `path` whole, refusing one above `limit` bytes: at most `limit + 1` bytes
/// are read, whatever its metadata says (a pipe, or a file that grows, has no size to trust).
/// `what`: the flag or key, for the message.
pub fn read_bounded(path: &str, limit: u64, what: &str) -> Result<String, PlanError> {
    use std::io::Read as _;
    let reading = |e: std::io::Error| PlanError(format!("{what}: reading '{path}': {e}"));
    let file = std::fs::File::open(path).map_err(reading)?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(reading)?;
    if bytes.len() as u64 > limit {
        let limit_text = format!("{limit} bytes ({})", units::format_size(limit));
        let size = std::fs::metadata(path)
            .ok()
            .filter(|m| m.is_file() && m.len() > limit);
        return Err(PlanError(match size {
            Some(m) => format!(
                "{what}: '{path}' is {} bytes, above the limit of {limit_text} for this file",
                m.len()
            ),
            None => format!("{what}: '{path}' is more than {limit_text}, the limit for this file"),
        }));
    }
    String::from_utf8(bytes)
        .map_err(|e| PlanError(format!("{what}: reading '{path}': not UTF-8 text ({e})")))
}

/// A TOML value as the text a flag would carry: strings as they are, numbers and booleans printed.
fn value_text(key: &str, origin: &str, value: &toml::Value) -> Result<String, PlanError> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| value_text(key, origin, v))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(",")),
        _ => Err(PlanError(format!(
            "{origin}: '{key}' must be a string or a number, not a {}",
            value.type_str()
        ))),
    }
}

impl Profile {
    /// Reads a profile by name (`nbt`, `none`) or from a TOML file.
    pub fn load(name_or_path: &str) -> Result<(String, Profile), PlanError> {
        match name_or_path {
            "none" => Ok(("none".into(), Profile::default())),
            "nbt" => Ok((
                "nbt".into(),
                Self::parse(NBT_PROFILE, "built-in profile nbt")?,
            )),
            path => {
                let file = Path::new(path);
                if !file.exists() {
                    return Err(PlanError(format!(
                        "--profile: '{path}' is neither a built-in profile ({}) nor an existing file",
                        BUILT_IN_PROFILES.join(", ")
                    )));
                }
                let text = read_bounded(path, MAX_PROFILE_BYTES, "--profile")?;
                Ok((
                    path.to_string(),
                    Self::parse(&text, &format!("profile {path}"))?,
                ))
            }
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Profile, PlanError> {
        toml::from_str(text).map_err(|e| {
            PlanError(format!(
                "{origin}: {}",
                e.to_string().trim_end().replace('\n', " ")
            ))
        })
    }

    /// The settings of capabilities not built yet, in NOT_YET order.
    fn not_yet(&self) -> Vec<(&'static str, &toml::Value)> {
        let fields: [(&str, &Option<toml::Value>); 1] = [("price-kwh", &self.price_kwh)];
        let set: Vec<_> = fields
            .into_iter()
            .filter_map(|(key, value)| Some((key, value.as_ref()?)))
            .collect();
        set
    }
}

fn capability_of(setting: &str) -> &'static str {
    NOT_YET
        .iter()
        .find(|(name, _)| *name == setting)
        .map(|(_, capability)| *capability)
        .unwrap_or("the learning-update protocol")
}

/// Where a plan's settings come from: the flags, else the profile, named by `origin`.
struct Sources<'a> {
    flags: &'a Flags,
    profile: &'a Profile,
    /// "built-in profile nbt", "profile FILE".
    origin: String,
}

impl Sources<'_> {
    /// The text of a setting and the name to report it by: the flag, or the profile key.
    fn pick(
        &self,
        flag: &Option<String>,
        key: &str,
        value: &Option<toml::Value>,
    ) -> Result<Option<(String, String)>, PlanError> {
        let origin = &self.origin;
        match (flag, value) {
            (Some(text), _) => Ok(Some((text.clone(), format!("--{key}")))),
            (None, Some(v)) => Ok(Some((
                value_text(key, origin, v)?,
                format!("{key} ({origin})"),
            ))),
            (None, None) => Ok(None),
        }
    }

    /// --memory, --swap, --cpus, --pids.
    fn limits(&self) -> Result<Limits, PlanError> {
        let (flags, profile) = (self.flags, self.profile);
        let mut limits = Limits::default();
        if let Some((text, name)) = self.pick(&flags.memory, "memory", &profile.memory)? {
            let bytes = units::parse_size(&name, &text)?;
            if bytes < MIN_MEMORY {
                return Err(PlanError(format!(
                    "invalid value '{text}' for {name}: below the smallest limit nbt accepts, 1M"
                )));
            }
            limits.memory_bytes = Some(bytes);
        }
        if let Some((text, name)) = self.pick(&flags.swap, "swap", &profile.swap)? {
            limits.swap_bytes = Some(units::parse_size(&name, &text)?);
        }
        if let Some((text, name)) = self.pick(&flags.cpus, "cpus", &profile.cpus)? {
            limits.cpu_millicores = Some(units::parse_cpus(&name, &text)?);
        }
        if let Some((text, name)) = self.pick(&flags.pids, "pids", &profile.pids)? {
            let pids = units::parse_count(&name, &text)?;
            if pids > MAX_PIDS {
                return Err(PlanError(format!(
                    "invalid value '{text}' for {name}: above {MAX_PIDS}, the most processes \
                     the kernel allows (PID_MAX_LIMIT)"
                )));
            }
            limits.pids = Some(pids);
        }
        Ok(limits)
    }

    /// The rates, their burst, and the loss with where it applies.
    fn network(&self) -> Result<NetLimits, PlanError> {
        let (flags, profile) = (self.flags, self.profile);
        let mut net = NetLimits::default();
        for (flag, key, value, direction) in [
            (
                &flags.egress_rate,
                "egress-rate",
                &profile.egress_rate,
                &mut net.egress,
            ),
            (
                &flags.ingress_rate,
                "ingress-rate",
                &profile.ingress_rate,
                &mut net.ingress,
            ),
        ] {
            if let Some((text, name)) = self.pick(flag, key, value)? {
                let rate = units::parse_rate(&name, &text)?;
                shaper::check_rate(&name, &text, rate)?;
                direction.rate_bits_per_sec = Some(rate);
            }
        }
        if let Some((text, name)) = self.pick(&flags.burst, "burst", &profile.burst)? {
            let bytes = units::parse_size(&name, &text)?;
            shaper::check_burst(&name, &text, bytes)?;
            if net.egress.rate_bits_per_sec.is_none() && net.ingress.rate_bits_per_sec.is_none() {
                return Err(PlanError(format!("{name} sets the depth of a rate limit: it needs --egress-rate or --ingress-rate")));
            }
            net.egress.burst_bytes = Some(bytes);
            net.ingress.burst_bytes = Some(bytes);
            shaper::check_buckets(&name, &text, &net)?;
        }
        let loss = self.loss()?;
        self.loss_direction(&mut net, loss)?;
        Ok(net)
    }

    /// --loss and --loss-model: the loss of each packet, if any.
    fn loss(&self) -> Result<Option<Loss>, PlanError> {
        let (flags, profile) = (self.flags, self.profile);
        let loss = self.pick(&flags.loss, "loss", &profile.loss)?;
        let model = self.pick(&flags.loss_model, "loss-model", &profile.loss_model)?;
        let loss = match (loss, model) {
            (loss, None) => loss
                .map(|(text, name)| units::parse_percent(&name, &text))
                .transpose()?
                .map(Loss::uniform),
            (loss, Some((text, name))) => match (shaper::parse_loss_model(&name, &text)?, loss) {
                (None, Some((text, name))) => Some(Loss::uniform(units::parse_percent(&name, &text)?)),
                (None, None) => {
                    return Err(PlanError(format!("{name} uniform needs --loss PERCENT, the probability of each packet's loss")))
                }
                (Some(gemodel), None) => Some(gemodel),
                (Some(_), Some((_, loss_name))) => {
                    return Err(PlanError(format!(
                        "{loss_name} and {name} gemodel:... both set a loss: gemodel's loss is given by its parameters (1-H in the bad state, 1-K in the good one); drop {loss_name}"
                    )))
                }
            },
        };
        Ok(loss)
    }

    /// --loss-direction: puts `loss` on the directions it names.
    fn loss_direction(&self, net: &mut NetLimits, loss: Option<Loss>) -> Result<(), PlanError> {
        let direction = self.pick(
            &self.flags.loss_direction,
            "loss-direction",
            &self.profile.loss_direction,
        )?;
        if let Some(loss) = loss {
            let (egress, ingress) = match direction.as_ref().map(|(t, n)| (t.trim(), n)) {
                None | Some(("egress", _)) => (true, false),
                Some(("ingress", _)) => (false, true),
                Some(("both", _)) => (true, true),
                Some((text, name)) => {
                    return Err(PlanError(format!(
                        "invalid value '{text}' for {name}: accepted: egress (the default, as netem on an interface), ingress, both"
                    )))
                }
            };
            if egress {
                net.egress.loss = loss;
            }
            if ingress {
                net.ingress.loss = loss;
            }
        } else if let Some((_, name)) = direction {
            return Err(PlanError(format!(
                "{name} says where --loss applies: it needs --loss or --loss-model"
            )));
        }
        Ok(())
    }

    /// --latency and --jitter. Without the fq qdisc, the latency goes to `pending` instead.
    fn latency(&self, pending: &mut Vec<Pending>) -> Result<Option<Latency>, PlanError> {
        let (flags, profile, origin) = (self.flags, self.profile, &self.origin);
        let latency = self.pick(&flags.latency, "latency", &profile.latency)?;
        let jitter = self.pick(&flags.jitter, "jitter", &profile.jitter)?;
        let latency = match (latency, jitter) {
            (None, None) => None,
            (None, Some((_, name))) => {
                return Err(PlanError(format!(
                    "{name} spreads an added delay: it needs --latency"
                )))
            }
            (Some((text, name)), jitter) => {
                let latency = units::parse_duration(&name, &text)?;
                let jitter_value = match &jitter {
                    Some((text, name)) => units::parse_duration(name, text)?,
                    None => std::time::Duration::ZERO,
                };
                let given = [
                    Some((name.as_str(), text.as_str())),
                    jitter
                        .as_ref()
                        .map(|(text, name)| (name.as_str(), text.as_str())),
                ];
                let checked = Latency::checked(latency, jitter_value, given)?;
                if probe::fq_missing().is_some() {
                    // Named, not enforced: `nbt run` refuses it naming the missing qdisc.
                    pending.push(Pending {
                        setting: name.trim_end_matches(&format!(" ({origin})")).to_string(),
                        value: text.clone(),
                        origin: if name.starts_with("--") {
                            "flag".into()
                        } else {
                            origin.clone()
                        },
                        capability: "the fq qdisc, which this kernel lacks (nbt probe)".into(),
                    });
                    None
                } else {
                    Some(checked)
                }
            }
        };
        Ok(latency)
    }

    /// --ingress-queue: whether arriving packets queue at the ingress rates. `auto` (the default)
    /// queues them where the run has an ingress rate (its own or a link's) and the kernel has the
    /// fq qdisc and the ifb device, and polices them elsewhere. `true` needs both: without an
    /// ingress rate it is an error, without fq it goes to `pending`, as a latency does.
    fn ingress_queue(
        &self,
        net: &NetLimits,
        links: &[link::Link],
        pending: &mut Vec<Pending>,
    ) -> Result<IngressQueue, PlanError> {
        let picked = self.pick(
            &self.flags.ingress_queue,
            "ingress-queue",
            &self.profile.ingress_queue,
        )?;
        let (text, name) = picked.unwrap_or_else(|| ("auto".into(), "--ingress-queue".into()));
        let asked = match text.trim() {
            "true" => true,
            "auto" => false,
            "false" => return Ok(IngressQueue::default()),
            _ => {
                return Err(PlanError(format!(
                    "invalid value '{text}' for {name}: accepted: auto, true, false"
                )))
            }
        };
        let rated = |net: &NetLimits| net.ingress.rate_bits_per_sec.is_some();
        if !rated(net) && !links.iter().any(|l| rated(&l.net)) {
            if !asked {
                return Ok(IngressQueue::default());
            }
            return Err(PlanError(format!(
                "{name} queues arriving packets at the ingress rate: it needs --ingress-rate (or a \
                 --link with ingress-rate)"
            )));
        }
        let missing = probe::ingress_queue_missing();
        match (missing, asked) {
            (None, _) => Ok(IngressQueue {
                queued: true,
                asked,
                policed_because: None,
            }),
            (Some(why), false) => Ok(IngressQueue {
                policed_because: Some(format!("the queue needs {why}")),
                ..IngressQueue::default()
            }),
            (Some(why), true) => {
                // Named, not enforced: `nbt run` refuses it naming what is missing.
                let origin = &self.origin;
                pending.push(Pending {
                    setting: name.trim_end_matches(&format!(" ({origin})")).to_string(),
                    value: text,
                    origin: match name.starts_with("--") {
                        true => "flag".into(),
                        false => origin.clone(),
                    },
                    capability: format!("{why} (nbt probe)"),
                });
                Ok(IngressQueue {
                    asked,
                    ..IngressQueue::default()
                })
            }
        }
    }

    /// netem's other impairments: --duplicate and --corrupt on the directions
    /// --impair-direction names, --reorder (with its correlation and gap) on outgoing packets,
    /// --loss-correlation with the uniform loss, and --jitter-correlation with the jitter. True
    /// when one of the first three was given; and the directions of the first two.
    fn impairments(
        &self,
        net: &mut NetLimits,
        latency: Option<&mut Latency>,
    ) -> Result<(bool, shaper::Directions), PlanError> {
        let (flags, profile) = (self.flags, self.profile);
        let percent = |flag: &Option<String>, key: &str, value: &Option<toml::Value>| {
            self.pick(flag, key, value)?
                .map(|(text, name)| {
                    units::parse_percent(&name, &text)
                        .map(|p| (p, name))
                        .map_err(PlanError::from)
                })
                .transpose()
        };
        let direction = self.pick(
            &flags.impair_direction,
            "impair-direction",
            &profile.impair_direction,
        )?;
        let directions = match &direction {
            Some((text, name)) => shaper::Directions::parse(name, text)?,
            None => shaper::Directions::Egress,
        };
        let duplicate = percent(&flags.duplicate, "duplicate", &profile.duplicate)?;
        let corrupt = percent(&flags.corrupt, "corrupt", &profile.corrupt)?;
        let reorder = percent(&flags.reorder, "reorder", &profile.reorder)?;
        if let (Some((_, name)), Some((text, direction_name))) = (&reorder, &direction) {
            if directions.ingress() {
                return Err(PlanError(format!(
                    "invalid value '{text}' for {direction_name} with {name}: reorder sends \
                     some packets ahead of the added delay, and nbt adds no delay to arriving \
                     packets; accepted with --reorder: egress (reorder applies to outgoing \
                     packets only)"
                )));
            }
        }
        if let (Some((_, name)), None, None) = (&direction, &duplicate, &corrupt) {
            return Err(PlanError(format!(
                "{name} says where --duplicate and --corrupt apply: it needs one of them (0% \
                 will do, for nbt set or a schedule to change it later)"
            )));
        }
        for impair in net.impair_mut(directions) {
            if let Some((p, _)) = duplicate {
                impair.duplicate = p;
            }
            if let Some((p, _)) = corrupt {
                impair.corrupt = p;
            }
        }
        let mut tc = duplicate.is_some() || corrupt.is_some();
        let impair = &mut net.egress.impair;
        if let Some((p, _)) = reorder {
            impair.reorder = p;
            tc = true;
        }
        let reorder_given = flags.reorder.is_some() || profile.reorder.is_some();
        if let Some((p, name)) = percent(
            &flags.reorder_correlation,
            "reorder-correlation",
            &profile.reorder_correlation,
        )? {
            if !reorder_given {
                return Err(PlanError(format!(
                    "{name} correlates --reorder's draws: it needs --reorder"
                )));
            }
            impair.reorder_correlation = p;
        }
        if let Some((text, name)) =
            self.pick(&flags.reorder_gap, "reorder-gap", &profile.reorder_gap)?
        {
            if !reorder_given {
                return Err(PlanError(format!(
                    "{name} spaces --reorder's packets: it needs --reorder"
                )));
            }
            impair.reorder_gap = shaper::parse_reorder_gap(&name, &text)?;
        }
        if reorder_given && latency.as_ref().is_none_or(|l| l.latency_ns == 0) {
            return Err(PlanError(
                "--reorder sends some packets ahead of the added delay, as netem's reorder: it needs --latency (and the fq qdisc)".into(),
            ));
        }
        if let Some((p, name)) = percent(
            &flags.loss_correlation,
            "loss-correlation",
            &profile.loss_correlation,
        )? {
            if !net.correlate_loss(p) {
                return Err(PlanError(format!(
                    "{name} correlates the uniform loss's draws: it needs --loss (gemodel has its own bursts)"
                )));
            }
        }
        if let Some((p, name)) = percent(
            &flags.jitter_correlation,
            "jitter-correlation",
            &profile.jitter_correlation,
        )? {
            match latency {
                Some(latency) if latency.jitter_ns > 0 => latency.correlation = p,
                _ => {
                    return Err(PlanError(format!(
                        "{name} correlates the jitter's draws: it needs --jitter"
                    )))
                }
            }
        }
        Ok((tc, directions))
    }

    /// --link, else the profile's `[[link]]` tables: the flags replace the profile's links.
    fn links(&self, pending: &mut Vec<Pending>) -> Result<Vec<link::Link>, PlanError> {
        let links = if !self.flags.links.is_empty() {
            self.flags
                .links
                .iter()
                .map(|text| link::parse_flag(text, pending))
                .collect::<Result<Vec<_>, _>>()?
        } else if let Some(value) = &self.profile.link {
            link::parse_profile(value, &self.origin, pending)?
        } else {
            Vec::new()
        };
        link::check_all(&links)?;
        Ok(links)
    }

    /// --balance, the prices and --gate: the ledger's prices and the gate's rules.
    fn ledger(&self) -> Result<(Option<Prices>, Vec<Rule>), PlanError> {
        let (flags, profile) = (self.flags, self.profile);
        let balance = self.pick(&flags.balance, "balance", &profile.balance)?;
        let price_call = self.pick(&flags.price_call, "price-call", &profile.price_call)?;
        let call_gap = self.pick(&flags.call_gap, "call-gap", &profile.call_gap)?;
        let price_egress = self.pick(&flags.price_egress, "price-egress", &profile.price_egress)?;
        let price_hour = self.pick(&flags.price_hour, "price-hour", &profile.price_hour)?;
        let gate_text = self.pick(&flags.gate, "gate", &profile.gate)?;
        let (prices, gate) = match balance {
            None => {
                let needs = [
                    &price_call,
                    &call_gap,
                    &price_egress,
                    &price_hour,
                    &gate_text,
                ];
                if let Some((_, name)) = needs.into_iter().flatten().next() {
                    return Err(PlanError(format!(
                        "{name} needs --balance: prices and the gate act on a balance"
                    )));
                }
                (None, Vec::new())
            }
            Some((text, name)) => {
                let mut prices = Prices {
                    balance_micro: ledger::parse_amount(&name, &text)?,
                    ..Prices::default()
                };
                if let Some((text, name)) = price_call {
                    prices.call_micro = ledger::parse_amount(&name, &text)?;
                }
                if let Some((text, name)) = call_gap {
                    prices.call_gap_ns = ledger::parse_call_gap(&name, &text)?;
                }
                if let Some((text, name)) = price_egress {
                    prices.egress_pico_per_byte = ledger::parse_price_per_gb(&name, &text)?;
                }
                if let Some((text, name)) = price_hour {
                    prices.hour_micro = ledger::parse_amount(&name, &text)?;
                }
                // With a balance and no --gate, every destination but loopback is gated.
                let gate = match gate_text {
                    None => vec![Rule::All],
                    Some((text, name)) => {
                        let rules = gate::parse_rules(&name, &text)?;
                        gate::check_resolvable(&name, &rules)?;
                        rules
                    }
                };
                (Some(prices), gate)
            }
        };
        Ok((prices, gate))
    }

    /// Settings of capabilities not built yet, flags first, onto `pending`.
    fn not_yet(&self, pending: &mut Vec<Pending>) -> Result<(), PlanError> {
        let (flags, profile, origin) = (self.flags, self.profile, &self.origin);
        for (key, value) in &flags.not_yet {
            pending.push(Pending {
                setting: format!("--{key}"),
                value: value.clone(),
                origin: "flag".into(),
                capability: format!("{}, not implemented yet", capability_of(key)),
            });
        }
        for (key, value) in profile.not_yet() {
            if flags.not_yet.iter().any(|(flag, _)| flag == key) {
                continue;
            }
            pending.push(Pending {
                setting: key.to_string(),
                value: value_text(key, origin, value)?,
                origin: origin.clone(),
                capability: format!("{}, not implemented yet", capability_of(key)),
            });
        }
        Ok(())
    }

    /// --accept-min-delta: the drop of the holdout loss that accepts a learning update.
    fn accept_min_delta(&self) -> Result<f64, PlanError> {
        let accept_min_delta = match self.pick(
            &self.flags.accept_min_delta,
            "accept-min-delta",
            &self.profile.accept_min_delta,
        )? {
            None => crate::learning::DEFAULT_ACCEPT_MIN_DELTA,
            Some((text, name)) => match text.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => x,
                _ => {
                    return Err(PlanError(format!(
                        "invalid value '{text}' for {name}: a decimal number, the smallest drop \
                         of the holdout loss that accepts an update (e.g. 0.002)"
                    )))
                }
            },
        };
        Ok(accept_min_delta)
    }

    /// The machine-wide hardware caps: CPU frequency and turbo, GPU power, clocks and memory.
    fn hardware(&self) -> Result<crate::enforce::hwcaps::HwRequest, PlanError> {
        let (flags, profile) = (self.flags, self.profile);
        let no_turbo_flag = flags.no_turbo.then(|| "true".to_string());
        crate::enforce::hwcaps::HwTexts {
            cpu_max_freq: self.pick(&flags.cpu_max_freq, "cpu-max-freq", &profile.cpu_max_freq)?,
            no_turbo: self.pick(&no_turbo_flag, "no-turbo", &profile.no_turbo)?,
            gpu_power_limit: self.pick(
                &flags.gpu_power_limit,
                "gpu-power-limit",
                &profile.gpu_power_limit,
            )?,
            gpu_clock: self.pick(&flags.gpu_clock, "gpu-clock", &profile.gpu_clock)?,
            gpu_mem_clock: self.pick(&flags.gpu_mem_clock, "gpu-mem-clock", &None)?,
            gpu_memory: self.pick(&flags.gpu_memory, "gpu-memory", &None)?,
            gpus: self.pick(&flags.gpus, "gpus", &None)?,
        }
        .parse()
    }

    /// --schedule FILE, read and parsed against what `plan` starts from.
    fn schedule(&self, plan: &Plan) -> Result<Option<crate::schedule::Schedule>, PlanError> {
        let Some((path, name)) =
            self.pick(&self.flags.schedule, "schedule", &self.profile.schedule)?
        else {
            return Ok(None);
        };
        let text = read_bounded(&path, MAX_SCHEDULE_BYTES, &name)?;
        Ok(Some(
            crate::schedule::parse(&path, &text, &plan.schedule_start())
                .map_err(|e| PlanError(e.to_string()))?,
        ))
    }
}

/// --restart: how many times a failed workload is started again.
fn restart_max(flags: &Flags) -> Result<u32, PlanError> {
    let restart_max = match flags.restart.as_deref().map(str::trim) {
        None | Some("no") => 0,
        Some("on-failure") => 3,
        Some(text) => match text.strip_prefix("on-failure:").map(str::parse::<u32>) {
            Some(Ok(n)) if n >= 1 => n,
            _ => {
                return Err(PlanError(format!(
                    "invalid value '{text}' for --restart: accepted: no (the default), \
                     on-failure (up to 3 restarts), on-failure:N (N >= 1)"
                )))
            }
        },
    };
    Ok(restart_max)
}

impl Plan {
    /// Whether the run's interfaces get the tc program: for the delay, for netem's other
    /// impairments, or to take the TCP segments lost on egress (nbt-ebpf/src/edt.rs).
    pub fn needs_tc(&self) -> bool {
        let loses = |net: &NetLimits| !matches!(net.egress.loss, Loss::None);
        self.needs_tc_beyond_loss() || loses(&self.net) || self.links.iter().any(|l| loses(&l.net))
    }

    /// Whether the run needs the tc programs for more than taking its lost TCP segments (which a
    /// namespace with loopback alone does without): a delay, netem's other impairments, or the
    /// ingress queue.
    /// Turns an ingress queue that `auto` chose into the policer, for `why` (a target whose
    /// interfaces nbt cannot reach). One asked for stays: the caller refuses it.
    pub fn police_ingress_unless_asked(&mut self, why: &str) {
        if !self.ingress_queue || self.ingress_queue_asked {
            return;
        }
        self.ingress_queue = false;
        self.ingress_policed_because = Some(why.to_string());
        for ingress in std::iter::once(&mut self.net.ingress)
            .chain(self.links.iter_mut().map(|l| &mut l.net.ingress))
        {
            ingress.queued = false;
        }
    }

    pub fn needs_tc_beyond_loss(&self) -> bool {
        self.needs_egress_tc() || self.needs_ingress_tc()
    }

    /// Whether `delay_egress` must act on the interfaces: a delay, or netem's impairments of
    /// outgoing packets.
    pub fn needs_egress_tc(&self) -> bool {
        let egress = |tc: bool, directions: shaper::Directions, net: &NetLimits| {
            (tc && directions.egress()) || net.egress.impair.needs_tc()
        };
        self.latency.is_some()
            || egress(self.tc_impairments, self.impair_direction, &self.net)
            || self.links.iter().any(|l| {
                l.latency.is_some() || egress(l.tc_impairments, l.impair_direction, &l.net)
            })
    }

    /// Whether the run's interfaces get the tc ingress program: duplicate or corrupt on arriving
    /// packets, or the ingress queue.
    pub fn needs_ingress_tc(&self) -> bool {
        self.needs_ingress_impair() || self.ingress_queue
    }

    /// Whether the run duplicates or corrupts arriving packets, on its own link or on one of its
    /// `--link`s.
    pub fn needs_ingress_impair(&self) -> bool {
        let ingress = |tc: bool, directions: shaper::Directions, net: &NetLimits| {
            (tc && directions.ingress()) || net.ingress.impair.needs_tc()
        };
        ingress(self.tc_impairments, self.impair_direction, &self.net)
            || self
                .links
                .iter()
                .any(|l| ingress(l.tc_impairments, l.impair_direction, &l.net))
    }

    /// Builds the plan: the profile first, each flag given overriding its setting. The groups are
    /// read in this order, each setting checked as it is read: the first error is the first met.
    pub fn build(flags: &Flags) -> Result<Plan, PlanError> {
        let (profile_name, profile) = Profile::load(flags.profile.as_deref().unwrap_or("none"))?;
        let origin = if profile_name == "nbt" || profile_name == "none" {
            format!("built-in profile {profile_name}")
        } else {
            format!("profile {profile_name}")
        };
        let sources = Sources {
            flags,
            profile: &profile,
            origin,
        };

        let limits = sources.limits()?;
        let mut net = sources.network()?;
        let mut pending = Vec::new();
        let mut latency = sources.latency(&mut pending)?;
        let (tc_impairments, impair_direction) = sources.impairments(&mut net, latency.as_mut())?;
        let links = sources.links(&mut pending)?;
        let queue = sources.ingress_queue(&net, &links, &mut pending)?;
        let mut links = links;
        for ingress in
            std::iter::once(&mut net.ingress).chain(links.iter_mut().map(|l| &mut l.net.ingress))
        {
            ingress.queued = queue.queued;
        }
        let (prices, gate) = sources.ledger()?;
        sources.not_yet(&mut pending)?;
        let accept_min_delta = sources.accept_min_delta()?;
        let hwcaps = sources.hardware()?;
        let mut plan = Plan {
            hwcaps,
            profile: profile_name,
            limits,
            net,
            latency,
            tc_impairments,
            impair_direction,
            ingress_queue: queue.queued,
            ingress_queue_asked: queue.asked,
            ingress_policed_because: queue.policed_because,
            links,
            prices,
            gate,
            pending,
            schedule: None,
            restart_max: 0,
            name: None,
            series_interval: DEFAULT_SERIES_INTERVAL,
            status_line: false,
            receipts: flags
                .receipts
                .clone()
                .unwrap_or_else(crate::receipt::store::default_path),
            accept_min_delta,
        };
        plan.schedule = sources.schedule(&plan)?;
        // A schedule that duplicates, corrupts or reorders needs the tc program from the start.
        plan.tc_impairments |= plan.schedule.as_ref().is_some_and(|s| {
            s.actions.iter().flat_map(|a| &a.changes).any(|c| {
                matches!(
                    c,
                    crate::schedule::Change::Duplicate { .. }
                        | crate::schedule::Change::Corrupt { .. }
                        | crate::schedule::Change::Reorder { .. }
                )
            })
        });
        plan.restart_max = restart_max(flags)?;
        Ok(plan)
    }

    /// What a schedule for this plan starts from: where a fault ends, its limit goes back to the
    /// last step before it, else to this.
    pub fn schedule_start(&self) -> crate::schedule::parse::Initial {
        crate::schedule::parse::Initial {
            memory: self.limits.memory_bytes,
            cpus: self.limits.cpu_millicores,
            egress_rate: self.net.egress.rate_bits_per_sec,
            ingress_rate: self.net.ingress.rate_bits_per_sec,
            egress_loss: self.net.egress.loss,
            ingress_loss: self.net.ingress.loss,
            latency_ns: self.latency.map(|l| l.latency_ns),
            jitter_ns: self.latency.map_or(0, |l| l.jitter_ns),
            duplicate: self.net.impair_of(self.impair_direction).duplicate,
            corrupt: self.net.impair_of(self.impair_direction).corrupt,
            reorder: self.net.egress.impair.reorder,
            has_balance: self.prices.is_some(),
        }
    }

    /// The refusal `nbt run` gives for a plan with pending settings.
    /// Also refuses hardware caps this machine cannot apply (missing hardware, out of range).
    pub fn refuse_pending(&self) -> Result<(), PlanError> {
        if self.pending.is_empty() {
            return self.hwcaps.check();
        }
        // Latency needs a qdisc some kernels lack: name it, it is the first thing to fix.
        if let Some(latency) = self.pending.iter().find(|p| {
            ["latency", "jitter", "ingress-queue"]
                .iter()
                .any(|s| p.setting.ends_with(s))
        }) {
            if let Some(missing) = probe::fq_missing() {
                return Err(PlanError(format!(
                    "refusing to run: {} {} ({}) needs the fq qdisc (sch_fq) for earliest-departure-time pacing, \
                     and {missing}; see `nbt probe`",
                    latency.setting, latency.value, latency.origin
                )));
            }
            if let Some(missing) = probe::ifb_missing() {
                return Err(PlanError(format!(
                    "refusing to run: {} {} ({}) needs the ifb network device to hold arriving \
                     packets, and {missing}; see `nbt probe`; --ingress-queue=false polices them \
                     instead",
                    latency.setting, latency.value, latency.origin
                )));
            }
        }
        let list: Vec<String> = self.pending.iter().map(ToString::to_string).collect();
        if list.is_empty() {
            return self.hwcaps.check();
        }
        Err(PlanError(format!(
            "refusing to run: this version of nbt cannot enforce {}. Remove {} (a profile's \
             limits can be overridden by flags; `--profile none` starts from no limits)",
            list.join("; "),
            if self.pending.len() == 1 {
                "it"
            } else {
                "them"
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Flags {
        Flags::default()
    }

    #[test]
    fn built_in_nbt_profile_holds_the_seed_numbers() {
        let plan = Plan::build(&Flags {
            profile: Some("nbt".into()),
            ..flags()
        })
        .unwrap();
        assert_eq!(plan.limits.memory_bytes, Some(6 << 30));
        assert_eq!(plan.limits.swap_bytes, Some(500 << 20));
        let pending: Vec<(&str, &str)> = plan
            .pending
            .iter()
            .map(|p| (p.setting.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(plan.net.egress.rate_bits_per_sec, Some(512_000));
        assert_eq!(plan.net.ingress.rate_bits_per_sec, Some(512_000));
        assert_eq!(plan.net.egress.loss, Loss::Uniform { probability: 0.05 });
        assert_eq!(plan.net.ingress.loss, Loss::None);
        // Latency is enforced where the kernel has fq, else named as not enforced.
        let fq = probe::fq_missing().is_none();
        let mut expected_pending = vec![("latency", "100ms")];
        if fq {
            expected_pending.remove(0);
            assert_eq!(plan.latency.unwrap().latency_ns, 100_000_000);
        }
        assert_eq!(pending, expected_pending);
        assert_eq!(plan.hwcaps.cpu_max_freq.as_ref().unwrap().value, 2_000_000);
        assert_eq!(plan.hwcaps.gpu.power_limit_w.as_ref().unwrap().value, 75.0);
        assert_eq!(plan.hwcaps.gpu.clock_mhz.as_ref().unwrap().value, 1200);
        assert!(plan.hwcaps.no_turbo.as_ref().unwrap().value);
        let refusal = plan.refuse_pending().unwrap_err().to_string();
        let expected = if !fq {
            "latency 100ms (built-in profile nbt) needs the fq qdisc"
        } else {
            "cannot enforce "
        };
        assert!(refusal.contains(expected), "{refusal}");
    }

    #[test]
    fn flags_override_the_profile() {
        let plan = Plan::build(&Flags {
            profile: Some("nbt".into()),
            memory: Some("128M".into()),
            ..flags()
        })
        .unwrap();
        assert_eq!(plan.limits.memory_bytes, Some(128 << 20));
        assert_eq!(plan.limits.swap_bytes, Some(500 << 20));
    }

    #[test]
    fn no_profile_no_limits() {
        let plan = Plan::build(&flags()).unwrap();
        assert_eq!(plan.limits, Limits::default());
        assert!(plan.pending.is_empty());
        assert!(plan.refuse_pending().is_ok());
    }

    #[test]
    fn bad_values_name_the_flag_or_the_profile_key() {
        let err = Plan::build(&Flags {
            memory: Some("6X".into()),
            ..flags()
        })
        .unwrap_err();
        assert!(
            err.0.starts_with("invalid value '6X' for --memory"),
            "{err}"
        );
        let err = Plan::build(&Flags {
            memory: Some("512K".into()),
            ..flags()
        })
        .unwrap_err();
        assert!(err.0.contains("below the smallest limit"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "cpus = \"lots\"\n").unwrap();
        let err = Plan::build(&Flags {
            profile: Some(file.display().to_string()),
            ..flags()
        })
        .unwrap_err();
        assert!(err.0.contains("for cpus (profile "), "{err}");
    }

    #[test]
    fn profile_files_take_numbers_and_refuse_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "memory = \"256M\"\ncpus = 0.5\npids = 64\n").unwrap();
        let plan = Plan::build(&Flags {
            profile: Some(file.display().to_string()),
            ..flags()
        })
        .unwrap();
        assert_eq!(plan.limits.memory_bytes, Some(256 << 20));
        assert_eq!(plan.limits.cpu_millicores, Some(500));
        assert_eq!(plan.limits.pids, Some(64));

        std::fs::write(&file, "memroy = \"256M\"\n").unwrap();
        let err = Plan::build(&Flags {
            profile: Some(file.display().to_string()),
            ..flags()
        })
        .unwrap_err();
        assert!(err.0.contains("unknown field `memroy`"), "{err}");
    }

    #[test]
    fn network_flags() {
        let plan = Plan::build(&Flags {
            egress_rate: Some("10mbit".into()),
            burst: Some("64K".into()),
            loss: Some("1%".into()),
            loss_direction: Some("both".into()),
            ..flags()
        })
        .unwrap();
        assert_eq!(plan.net.egress.rate_bits_per_sec, Some(10_000_000));
        assert_eq!(plan.net.egress.burst_bytes, Some(64 << 10));
        assert_eq!(plan.net.ingress.loss, Loss::Uniform { probability: 0.01 });
        let gemodel = Plan::build(&Flags {
            loss_model: Some("gemodel:1%,25%".into()),
            ..flags()
        })
        .unwrap();
        assert!(matches!(
            gemodel.net.egress.loss,
            Loss::GilbertElliott { .. }
        ));
        for (f, expected) in [
            (
                Flags {
                    egress_rate: Some("8kbit".into()),
                    ..flags()
                },
                "below one 1500-byte packet per second",
            ),
            (
                Flags {
                    egress_rate: Some("512kbps".into()),
                    ..flags()
                },
                "ambiguous",
            ),
            (
                Flags {
                    egress_rate: Some("1mbit".into()),
                    burst: Some("1K".into()),
                    ..flags()
                },
                "smaller than one 1500-byte packet",
            ),
            (
                Flags {
                    burst: Some("64K".into()),
                    ..flags()
                },
                "needs --egress-rate or --ingress-rate",
            ),
            (
                Flags {
                    loss: Some("150%".into()),
                    ..flags()
                },
                "above 100%",
            ),
            (
                Flags {
                    loss: Some("1%".into()),
                    loss_model: Some("gemodel:1%".into()),
                    ..flags()
                },
                "both set a loss",
            ),
            (
                Flags {
                    loss_model: Some("uniform".into()),
                    ..flags()
                },
                "needs --loss PERCENT",
            ),
            (
                Flags {
                    loss: Some("1%".into()),
                    loss_direction: Some("up".into()),
                    ..flags()
                },
                "invalid value 'up' for --loss-direction",
            ),
            (
                Flags {
                    loss_direction: Some("both".into()),
                    ..flags()
                },
                "needs --loss or --loss-model",
            ),
        ] {
            let err = Plan::build(&f).unwrap_err();
            assert!(err.0.contains(expected), "{f:?}: {err}");
        }
    }

    #[test]
    fn ingress_queue_needs_an_ingress_rate_and_the_fq_qdisc() {
        let err = Plan::build(&Flags {
            ingress_queue: Some("true".into()),
            egress_rate: Some("10mbit".into()),
            ..flags()
        })
        .unwrap_err();
        assert!(
            err.0.contains("--ingress-queue queues arriving packets at the ingress rate: it needs --ingress-rate"),
            "{err}"
        );
        // A link's ingress rate is enough; a profile's key is read as the flag.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "ingress-queue = true\n[[link]]\nto = \"10.0.0.0/8\"\ningress-rate = \"512kbit\"\n",
        )
        .unwrap();
        let plan = Plan::build(&Flags {
            profile: Some(path.to_str().unwrap().into()),
            ..flags()
        })
        .unwrap();
        match probe::fq_missing() {
            // This kernel cannot: named, for `nbt run` to refuse.
            Some(_) => {
                assert!(!plan.ingress_queue);
                assert!(plan
                    .pending
                    .iter()
                    .any(|p| p.setting == "ingress-queue" && p.capability.contains("fq qdisc")));
                let err = plan.refuse_pending().unwrap_err();
                assert!(err.0.contains("ingress-queue true"), "{err}");
                assert!(err.0.contains("needs the fq qdisc (sch_fq)"), "{err}");
            }
            None => {
                assert!(plan.ingress_queue && plan.needs_ingress_tc());
                assert!(plan.links[0].net.ingress.queued);
                assert!(plan.links[0]
                    .describe()
                    .contains("512kbit (queued, at most"));
            }
        }
        std::fs::write(
            &path,
            "ingress-rate = \"1mbit\"\ningress-queue = \"maybe\"\n",
        )
        .unwrap();
        let err = Plan::build(&Flags {
            profile: Some(path.to_str().unwrap().into()),
            ..flags()
        })
        .unwrap_err();
        assert!(
            err.0
                .contains("invalid value 'maybe' for ingress-queue (profile ")
                && err.0.contains("accepted: auto, true, false"),
            "{err}"
        );
        // false is no queue, and needs no rate.
        std::fs::write(&path, "ingress-queue = false\n").unwrap();
        let plan = Plan::build(&Flags {
            profile: Some(path.to_str().unwrap().into()),
            ..flags()
        })
        .unwrap();
        assert!(!plan.ingress_queue && plan.pending.is_empty());
    }

    #[test]
    fn an_ingress_rate_queues_where_the_kernel_can_and_is_policed_where_not() {
        let with = |queue: Option<&str>| {
            Plan::build(&Flags {
                ingress_rate: Some("10mbit".into()),
                ingress_queue: queue.map(Into::into),
                ..flags()
            })
            .unwrap()
        };
        // No ingress rate: no queue, nothing to say, whatever the kernel.
        let plan = Plan::build(&Flags {
            egress_rate: Some("10mbit".into()),
            ..flags()
        })
        .unwrap();
        assert!(!plan.ingress_queue && plan.ingress_policed_because.is_none());
        let auto = with(None);
        assert_eq!(auto.ingress_queue, with(Some("auto")).ingress_queue);
        assert!(!auto.ingress_queue_asked && auto.pending.is_empty());
        let missing = probe::fq_missing().or_else(probe::ifb_missing);
        match missing {
            Some(why) => {
                // This host: policed, and the plan says what the kernel lacks.
                assert!(!auto.ingress_queue && !auto.net.ingress.queued);
                let because = auto.ingress_policed_because.as_deref().unwrap();
                assert!(because.starts_with("the queue needs the "), "{because}");
                assert!(because.ends_with(&why), "{because}");
                let limits = link::network_limits(&auto.net, None).join(", ");
                assert!(
                    limits.starts_with("ingress 10mbit (policed, burst"),
                    "{limits}"
                );
            }
            None => {
                assert!(auto.ingress_queue && auto.net.ingress.queued);
                assert!(auto.ingress_policed_because.is_none());
            }
        }
        // false polices, with nothing to say; true asks.
        let off = with(Some("false"));
        assert!(!off.ingress_queue && off.ingress_policed_because.is_none());
        assert!(with(Some("true")).ingress_queue_asked);
        // An attachment to another namespace turns an automatic queue into the policer.
        let mut auto = with(None);
        auto.police_ingress_unless_asked("pid 1 lives in another network namespace");
        assert!(!auto.ingress_queue && !auto.needs_ingress_tc());
        assert!(!auto.net.ingress.queued);
    }

    #[test]
    fn impair_direction_puts_duplicate_and_corrupt_where_it_says() {
        use shaper::Directions;
        let with = |direction: Option<&str>| Flags {
            duplicate: Some("10%".into()),
            corrupt: Some("1%".into()),
            impair_direction: direction.map(Into::into),
            ..flags()
        };
        for (direction, egress, ingress) in [
            (None, true, false),
            (Some("egress"), true, false),
            (Some("ingress"), false, true),
            (Some(" both "), true, true),
        ] {
            let plan = Plan::build(&with(direction)).unwrap();
            let expected = |on: bool| if on { (0.10, 0.01) } else { (0.0, 0.0) };
            for (impair, on) in [
                (plan.net.egress.impair, egress),
                (plan.net.ingress.impair, ingress),
            ] {
                assert_eq!(
                    (impair.duplicate, impair.corrupt),
                    expected(on),
                    "{direction:?}"
                );
            }
            assert_eq!(plan.impair_direction.egress(), egress);
            assert_eq!(plan.impair_direction.ingress(), ingress);
            assert_eq!(plan.needs_ingress_tc(), ingress, "{direction:?}");
            assert!(plan.needs_tc());
            // A schedule's and a fault's duplicate start from where the run puts it.
            assert_eq!(plan.schedule_start().duplicate, 0.10);
        }
        // 0% still puts the ingress program on, for nbt set and schedules.
        let zero = Plan::build(&Flags {
            duplicate: Some("0%".into()),
            impair_direction: Some("ingress".into()),
            ..flags()
        })
        .unwrap();
        assert_eq!(zero.impair_direction, Directions::Ingress);
        assert!(zero.needs_ingress_tc());
        // The default puts nothing on arriving packets.
        assert!(!Plan::build(&with(None)).unwrap().needs_ingress_tc());
        // A profile key as the flag.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "corrupt = \"1%\"\nimpair-direction = \"both\"\n").unwrap();
        let plan = Plan::build(&Flags {
            profile: Some(path.to_str().unwrap().into()),
            ..flags()
        })
        .unwrap();
        assert_eq!(plan.impair_direction, Directions::Both);
        assert_eq!(plan.net.ingress.impair.corrupt, 0.01);

        for (f, expected) in [
            (
                with(Some("up")),
                "invalid value 'up' for --impair-direction: accepted: egress (the default, as \
                 netem on an interface), ingress (packets arriving for the run's sockets), both",
            ),
            (
                Flags {
                    impair_direction: Some("ingress".into()),
                    ..flags()
                },
                "--impair-direction says where --duplicate and --corrupt apply: it needs one of them",
            ),
            (
                Flags {
                    impair_direction: Some("ingress".into()),
                    reorder: Some("5%".into()),
                    duplicate: Some("1%".into()),
                    ..flags()
                },
                "invalid value 'ingress' for --impair-direction with --reorder: reorder sends some \
                 packets ahead of the added delay, and nbt adds no delay to arriving packets; \
                 accepted with --reorder: egress",
            ),
            (
                Flags {
                    impair_direction: Some("both".into()),
                    reorder: Some("5%".into()),
                    ..flags()
                },
                "invalid value 'both' for --impair-direction with --reorder",
            ),
        ] {
            let err = Plan::build(&f).unwrap_err();
            assert!(err.0.contains(expected), "{f:?}: {err}");
        }
    }

    #[test]
    fn balance_prices_and_gate() {
        let plan = Plan::build(&Flags {
            balance: Some("0.5".into()),
            price_call: Some("0.01".into()),
            price_egress: Some("0.09/GB".into()),
            ..flags()
        })
        .unwrap();
        let prices = plan.prices.unwrap();
        assert_eq!(prices.balance_micro, 500_000);
        assert_eq!(prices.call_micro, 10_000);
        assert_eq!(prices.egress_pico_per_byte, 90);
        assert_eq!(plan.gate, vec![Rule::All]);
        for (f, expected) in [
            (
                Flags {
                    gate: Some("all".into()),
                    ..flags()
                },
                "--gate needs --balance",
            ),
            (
                Flags {
                    price_call: Some("1".into()),
                    ..flags()
                },
                "--price-call needs --balance",
            ),
            (
                Flags {
                    balance: Some("-1".into()),
                    ..flags()
                },
                "negative amounts are not accepted",
            ),
            (
                Flags {
                    balance: Some("1".into()),
                    price_call: Some("-0.5".into()),
                    ..flags()
                },
                "for --price-call: negative",
            ),
            (
                Flags {
                    balance: Some("1".into()),
                    gate: Some("10.0.0.0/40".into()),
                    ..flags()
                },
                "prefix length '40'",
            ),
            (
                Flags {
                    balance: Some("1".into()),
                    gate: Some("nowhere.invalid:443".into()),
                    ..flags()
                },
                "cannot resolve 'nowhere.invalid'",
            ),
        ] {
            let err = Plan::build(&f).unwrap_err();
            assert!(err.0.contains(expected), "{f:?}: {err}");
        }
    }

    #[test]
    fn unknown_profile_names_the_choices() {
        let err = Plan::build(&Flags {
            profile: Some("nbtt".into()),
            ..flags()
        })
        .unwrap_err();
        assert!(
            err.0.contains("neither a built-in profile (nbt, none)"),
            "{err}"
        );
    }

    #[test]
    fn flags_of_later_capabilities_are_refused_not_dropped() {
        let plan = Plan::build(&Flags {
            not_yet: vec![("price-kwh".into(), "0.3".into())],
            ..flags()
        })
        .unwrap();
        let err = plan.refuse_pending().unwrap_err();
        assert!(
            err.0
                .contains("--price-kwh 0.3 (flag; needs energy telemetry"),
            "{err}"
        );
    }

    #[test]
    fn files_are_read_up_to_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        let path_text = path.to_str().unwrap();
        std::fs::write(&path, "#".repeat(1000)).unwrap();
        assert_eq!(
            read_bounded(path_text, 1000, "--schedule").unwrap().len(),
            1000
        );
        let err = read_bounded(path_text, 999, "--schedule").unwrap_err().0;
        assert_eq!(
            err,
            format!("--schedule: '{path_text}' is 1000 bytes, above the limit of 999 bytes (999 B) for this file")
        );
        // A profile one byte over its limit: refused, naming it.
        std::fs::write(&path, "#".repeat(MAX_PROFILE_BYTES as usize + 1)).unwrap();
        let err = Profile::load(path_text).unwrap_err().0;
        assert!(
            err.contains("is 1048577 bytes, above the limit of 1048576 bytes (1.0 MiB)"),
            "{err}"
        );
        // A device or a pipe has no size: at most limit + 1 bytes are read all the same.
        let err = read_bounded("/dev/zero", 4096, "--profile").unwrap_err().0;
        assert!(
            err.contains("'/dev/zero' is more than 4096 bytes (4.0 KiB), the limit"),
            "{err}"
        );
    }

    #[test]
    fn arithmetic_bounds_of_the_limits() {
        let build = |f: Flags| Plan::build(&f).map_err(|e| e.0);
        let pids = |n: u64| Flags {
            pids: Some(n.to_string()),
            ..flags()
        };
        assert_eq!(build(pids(MAX_PIDS)).unwrap().limits.pids, Some(MAX_PIDS));
        let err = build(pids(MAX_PIDS + 1)).unwrap_err();
        assert!(err.contains("above 4194304, the most processes"), "{err}");
        let burst = |burst: &str| Flags {
            egress_rate: Some("12kbit".into()),
            burst: Some(burst.into()),
            ..flags()
        };
        assert!(build(burst("5400000B")).is_ok());
        let err = build(burst("5400001B")).unwrap_err();
        assert!(err.contains("invalid value '5400001B' for --burst: a bucket of 5.1 MiB is more than an hour at 12kbit"), "{err}");
        let latency = |latency: &str, jitter: &str| Flags {
            latency: Some(latency.into()),
            jitter: Some(jitter.into()),
            ..flags()
        };
        // Refused before fq is looked for, on every kernel.
        for (l, j) in [
            ("5s", "5001ms"),
            ("10000000000000000000s", "10000000000000000000s"),
        ] {
            let err = build(latency(l, j)).unwrap_err();
            assert!(
                err.contains("for --jitter") || err.contains("for --latency"),
                "{err}"
            );
        }
        let err = build(latency("5s", "5001ms")).unwrap_err();
        assert!(err.contains("latency plus jitter above 10 s"), "{err}");
    }
}
