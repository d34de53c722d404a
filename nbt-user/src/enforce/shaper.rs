//! `net`: in-kernel shaping of a run's traffic: rate, burst and loss per direction, enforced by
//! the cgroup_skb programs of `nbt-ebpf/src/shaper.rs` on the run's cgroup. Only the run's own
//! sockets are shaped; every other process on the machine is untouched.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, SockOps};
use aya::Ebpf;
use nbt_common::account::{EGRESS, INGRESS};
use nbt_common::shaper::{
    entry, ipv4_mapped, LinkAddress, ShaperConfig, ShaperStats, IPV4_MAPPED_PREFIX, LINK_OF_MAP,
    LOSS_GILBERT_ELLIOTT, LOSS_NONE, LOSS_UNIFORM, PROBABILITY_ONE, SHAPER_CONFIG_MAP,
    SHAPER_STATS_MAP,
};
use serde::{Deserialize, Serialize};

use crate::error::{PlanError, UsageError};
use crate::sys::loader;
use crate::sys::pin::Pins;
use crate::units::{self, format_rate, format_size};

/// The largest IP packet a usual link carries; the floor for rates and bursts.
pub const MTU: u64 = 1500;

/// The highest rate nbt shapes to: 100gbit. The `pace` program (nbt-ebpf/src/shaper/pacing.rs)
/// multiplies the rate in bytes per second by the smoothed RTT in microseconds, which the kernel
/// keeps in a u32 eighths of a microsecond (so under 2^29): 1.25e10 x 2^29 < 6.8e18 fits in a
/// u64, where a rate of 1tbit would not. BPF has no u128: the bound is kept here.
pub const MAX_RATE_BITS_PER_SEC: u64 = 100_000_000_000;

/// The deepest bucket: 16 GiB. `pace` multiplies the rate by the depth in ns of the rate, which
/// is at most burst x 1e9: 2^34 x 1e9 < 1.72e19 fits in a u64.
pub const MAX_BURST_BYTES: u64 = 1 << 34;

/// The deepest bucket in time: an hour of the rate. `pace` multiplies the depth in ns by 10^6
/// (parts per million): 3.6e12 x 1e6 = 3.6e18 fits in a u64. [`DirectionLimits::config`] clamps
/// to both bounds whatever the caller checked, so that the kernel never sees more.
pub const MAX_BURST_NS: u64 = 3_600 * 1_000_000_000;

/// How a direction loses packets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "model", rename_all = "kebab-case")]
pub enum Loss {
    #[default]
    None,
    /// Each packet lost independently with this probability.
    Uniform { probability: f64 },
    /// netem's `gemodel p r 1-h 1-k`: per-packet move probabilities and the loss probability
    /// in each state.
    GilbertElliott {
        good_to_bad: f64,
        bad_to_good: f64,
        loss_bad: f64,
        loss_good: f64,
    },
}

impl Loss {
    /// Uniform loss; none at all for a probability of 0 (`nbt set RUN --loss 0` removes loss).
    pub fn uniform(probability: f64) -> Loss {
        if probability == 0.0 {
            Loss::None
        } else {
            Loss::Uniform { probability }
        }
    }

    /// The long-run fraction of packets lost.
    pub fn mean(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Uniform { probability } => probability,
            Loss::GilbertElliott {
                good_to_bad,
                bad_to_good,
                loss_bad,
                loss_good,
            } => {
                let total = good_to_bad + bad_to_good;
                if total == 0.0 {
                    return loss_good;
                }
                (bad_to_good * loss_good + good_to_bad * loss_bad) / total
            }
        }
    }

    fn describe(&self) -> String {
        match *self {
            Loss::None => "no loss".into(),
            Loss::Uniform { probability } => format!("{}% loss", probability * 100.0),
            Loss::GilbertElliott {
                good_to_bad,
                bad_to_good,
                loss_bad,
                loss_good,
            } => format!(
                "gemodel p={}% r={}% 1-h={}% 1-k={}% ({:.2}% loss on average)",
                good_to_bad * 100.0,
                bad_to_good * 100.0,
                loss_bad * 100.0,
                loss_good * 100.0,
                self.mean() * 100.0
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

/// The directions `--impair-direction` puts duplicate and corrupt on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Directions {
    /// Outgoing packets (the default, as netem on an interface).
    #[default]
    Egress,
    /// Packets arriving for the run's sockets.
    Ingress,
    Both,
}

pub const IMPAIR_DIRECTION_FORMS: &str =
    "egress (the default, as netem on an interface), ingress (packets arriving for the run's \
     sockets), both";

impl Directions {
    pub fn egress(self) -> bool {
        matches!(self, Directions::Egress | Directions::Both)
    }

    pub fn ingress(self) -> bool {
        matches!(self, Directions::Ingress | Directions::Both)
    }

    /// `--impair-direction DIR`.
    pub fn parse(flag: &str, text: &str) -> Result<Directions, PlanError> {
        match text.trim() {
            "egress" => Ok(Directions::Egress),
            "ingress" => Ok(Directions::Ingress),
            "both" => Ok(Directions::Both),
            _ => Err(PlanError(format!(
                "invalid value '{text}' for {flag}: accepted: {IMPAIR_DIRECTION_FORMS}"
            ))),
        }
    }
}

/// netem's impairments besides loss and delay, and its loss correlation. Probabilities are
/// fractions (0.01 is 1%).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Impairments {
    /// netem's `loss P CORRELATION` (uniform loss only).
    pub loss_correlation: f64,
    /// Each packet is sent twice with this probability.
    pub duplicate: f64,
    /// A random bit of each packet is flipped with this probability.
    pub corrupt: f64,
    /// Each packet (every `reorder_gap`th at most) skips the added delay with this probability.
    pub reorder: f64,
    pub reorder_correlation: f64,
    /// netem's gap: 0 or 1 for every packet.
    pub reorder_gap: u32,
}

impl Impairments {
    /// Whether it needs the tc program on the interfaces (all but the loss correlation).
    pub fn needs_tc(&self) -> bool {
        self.duplicate > 0.0 || self.corrupt > 0.0 || self.reorder > 0.0
    }

    fn describe(&self, parts: &mut Vec<String>) {
        let pct = |p: f64| format!("{}%", (p * 1e6).round() / 1e4);
        if self.duplicate > 0.0 {
            parts.push(format!("{} duplicated", pct(self.duplicate)));
        }
        if self.corrupt > 0.0 {
            parts.push(format!("{} corrupted", pct(self.corrupt)));
        }
        if self.reorder > 0.0 {
            let mut text = format!("{} reordered", pct(self.reorder));
            if self.reorder_correlation > 0.0 {
                text += &format!(" (correlation {})", pct(self.reorder_correlation));
            }
            if self.reorder_gap > 1 {
                text += &format!(" (gap {})", self.reorder_gap);
            }
            parts.push(text);
        }
    }
}

/// The limits of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct DirectionLimits {
    /// Bits per second of IP packets (headers included); `None`: no rate limit.
    pub rate_bits_per_sec: Option<u64>,
    /// Bucket depth in bytes; `None`: the default for the rate ([`default_burst`]).
    pub burst_bytes: Option<u64>,
    pub loss: Loss,
    /// Duplicate, corrupt (either direction: `--impair-direction`), reorder (egress only) and the
    /// loss correlation.
    #[serde(default)]
    pub impair: Impairments,
    /// Ingress only: packets beyond the rate wait in the run's ingress queue (`--ingress-queue`),
    /// which holds the burst, instead of being dropped. Left out of records when false, as
    /// records before it were.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
}

/// The smallest default bucket: one GSO super-packet (64 KiB of IP packet, plus the headers of
/// its segments on the wire) must fit, or a TCP flow that builds them, paced or not, has one
/// dropped on every large send and stalls until its retransmission timer fires.
pub const GSO_BURST: u64 = 96 << 10;

/// The default egress bucket: 40 ms at the rate, at least [`GSO_BURST`]. The run's own TCP
/// sockets are paced to the rate (`pacing`), which keeps the bucket about 60% full: what is left
/// above that (16 ms) is how long the sender may fall behind (a busy CPU, a late timer) before
/// tokens overflow and the rate is lost for good. On this 2-vCPU VM at 100mbit, a 10 ms bucket
/// kept 90% full overflowed in stalls of up to 7 ms and the flow reached 0.9989 of the limit;
/// 40 ms never overflowed in a 16 s trace and reached 1.00002 and 1.00003.
pub fn default_burst(rate_bits_per_sec: u64) -> u64 {
    (rate_bits_per_sec / 8 / 25).max(GSO_BURST)
}

/// The default ingress bucket: 250 ms at the rate, at least [`GSO_BURST`]. Ingress can only be
/// policed: the remote sender is not ours to pace, and every drop is a loss it reacts to. With
/// GRO, one drop loses dozens of segments at once. Measured on a veth pair with a BBR sender,
/// a 10mbit limit delivered 0.99 of the rate with a 200 ms bucket, and 200mbit only 0.12 with a
/// 20 ms one but 0.95 with 320 ms: the bucket must hold a few hundred ms of the rate.
pub fn default_ingress_burst(rate_bits_per_sec: u64) -> u64 {
    (rate_bits_per_sec / 8 / 4).max(GSO_BURST)
}

impl DirectionLimits {
    pub fn is_unlimited(&self) -> bool {
        self.rate_bits_per_sec.is_none()
            && self.loss == Loss::None
            && self.impair == Impairments::default()
    }

    /// The bucket depth: the one given, or the direction's default for the rate.
    pub fn burst(&self, direction: Direction) -> Option<u64> {
        let default = match direction {
            Direction::Egress => default_burst,
            Direction::Ingress => default_ingress_burst,
        };
        self.rate_bits_per_sec
            .map(|rate| self.burst_bytes.unwrap_or_else(|| default(rate)))
    }

    /// The kernel's view of these limits.
    pub fn config(&self, direction: Direction) -> ShaperConfig {
        let mut config = ShaperConfig::default();
        if let (Some(rate), Some(burst)) = (self.rate_bits_per_sec, self.burst(direction)) {
            config.rate_bytes_per_sec = (rate.min(MAX_RATE_BITS_PER_SEC) / 8).max(1);
            config.burst_ns =
                burst_ns(config.rate_bytes_per_sec, burst.min(MAX_BURST_BYTES)).min(MAX_BURST_NS);
        }
        match self.loss {
            Loss::None => config.loss_model = LOSS_NONE,
            Loss::Uniform { probability: p } => {
                config.loss_model = LOSS_UNIFORM;
                config.loss_good = probability(p);
                config.loss_correlation = probability(self.impair.loss_correlation);
            }
            Loss::GilbertElliott {
                good_to_bad,
                bad_to_good,
                loss_bad,
                loss_good,
            } => {
                config.loss_model = LOSS_GILBERT_ELLIOTT;
                config.good_to_bad = probability(good_to_bad);
                config.bad_to_good = probability(bad_to_good);
                config.loss_bad = probability(loss_bad);
                config.loss_good = probability(loss_good);
            }
        }
        config.duplicate = probability(self.impair.duplicate);
        config.corrupt = probability(self.impair.corrupt);
        config.reorder = probability(self.impair.reorder);
        config.reorder_correlation = probability(self.impair.reorder_correlation);
        config.reorder_gap = u64::from(self.impair.reorder_gap);
        config
    }

    pub fn describe(&self, direction: Direction) -> String {
        let mut parts = Vec::new();
        if let (Some(rate), Some(burst)) = (self.rate_bits_per_sec, self.burst(direction)) {
            let depth = match (self.queued, direction) {
                (true, _) => "queued, at most",
                (false, Direction::Ingress) => "policed, burst",
                (false, Direction::Egress) => "burst",
            };
            parts.push(format!(
                "{} ({depth} {})",
                format_rate(rate),
                format_size(burst)
            ));
        }
        if self.loss != Loss::None {
            let mut loss = self.loss.describe();
            if self.impair.loss_correlation > 0.0 {
                loss += &format!(
                    " (correlation {}%)",
                    (self.impair.loss_correlation * 1e6).round() / 1e4
                );
            }
            parts.push(loss);
        }
        self.impair.describe(&mut parts);
        if parts.is_empty() {
            "unlimited".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A fraction as the programs draw against it, in units of 2^32 ([`PROBABILITY_ONE`]).
pub fn probability(p: f64) -> u64 {
    (p.clamp(0.0, 1.0) * PROBABILITY_ONE as f64).round() as u64
}

/// `--reorder-gap`: netem's gap, a whole number of packets, at least 1.
pub fn parse_reorder_gap(flag: &str, text: &str) -> Result<u32, PlanError> {
    match text.trim().parse::<u32>() {
        Ok(gap) if gap >= 1 => Ok(gap),
        _ => Err(PlanError(format!(
            "invalid value '{text}' for {flag}: accepted: a whole number of packets, 1 or more (netem's gap: every Nth packet may be reordered)"
        ))),
    }
}

/// The depth of a bucket of `burst` bytes in ns at `rate_bytes_per_sec`, computed in u128
/// (burst x 1e9 overflows a u64 above 18 GB); saturated to u64::MAX.
pub fn burst_ns(rate_bytes_per_sec: u64, burst: u64) -> u64 {
    let ns = u128::from(burst) * 1_000_000_000 / u128::from(rate_bytes_per_sec.max(1));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The network limits of a run.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct NetLimits {
    pub egress: DirectionLimits,
    pub ingress: DirectionLimits,
}

impl NetLimits {
    pub fn is_unlimited(&self) -> bool {
        self.egress.is_unlimited() && self.ingress.is_unlimited()
    }

    /// The impairments of the directions `directions` names, to change (duplicate, corrupt).
    pub fn impair_mut(&mut self, directions: Directions) -> impl Iterator<Item = &mut Impairments> {
        [
            directions.egress().then_some(&mut self.egress.impair),
            directions.ingress().then_some(&mut self.ingress.impair),
        ]
        .into_iter()
        .flatten()
    }

    /// The impairments in force where `directions` puts them: egress's, or ingress's for
    /// `ingress` alone.
    pub fn impair_of(&self, directions: Directions) -> &Impairments {
        match directions {
            Directions::Ingress => &self.ingress.impair,
            Directions::Egress | Directions::Both => &self.egress.impair,
        }
    }

    /// Gives the uniform loss of each direction that has one this correlation; false when
    /// neither has one (gemodel's bursts are its own).
    pub fn correlate_loss(&mut self, correlation: f64) -> bool {
        let mut uniform = false;
        for direction in [&mut self.egress, &mut self.ingress] {
            if let Loss::Uniform { .. } = direction.loss {
                direction.impair.loss_correlation = correlation;
                uniform = true;
            }
        }
        uniform
    }
}

pub const LOSS_MODEL_FORMS: &str =
    "uniform (with --loss), or gemodel:P[,R[,1-H[,1-K]]] as netem's \
     `loss gemodel`: P good-to-bad and R bad-to-good per packet, 1-H the loss in the bad state \
     (default 100%), 1-K in the good state (default 0%); each a percentage (1%) or a fraction";

/// Parses `--loss-model`: `uniform` gives `None` (the model of `--loss`), gemodel its parameters.
pub fn parse_loss_model(flag: &str, text: &str) -> Result<Option<Loss>, UsageError> {
    let text = text.trim();
    if text == "uniform" {
        return Ok(None);
    }
    let Some(params) = text.strip_prefix("gemodel:") else {
        return Err(UsageError {
            flag: flag.into(),
            value: text.into(),
            problem: "unknown loss model".into(),
            accepted: LOSS_MODEL_FORMS,
        });
    };
    let values: Vec<f64> = params
        .split(',')
        .map(|p| units::parse_percent(flag, p))
        .collect::<Result<_, _>>()
        .map_err(|e| UsageError {
            accepted: LOSS_MODEL_FORMS,
            ..e
        })?;
    if values.is_empty() || values.len() > 4 {
        return Err(UsageError {
            flag: flag.into(),
            value: text.into(),
            problem: format!("{} parameters; gemodel takes 1 to 4", values.len()),
            accepted: LOSS_MODEL_FORMS,
        });
    }
    let p = values[0];
    Ok(Some(Loss::GilbertElliott {
        good_to_bad: p,
        bad_to_good: values.get(1).copied().unwrap_or(1.0 - p),
        loss_bad: values.get(2).copied().unwrap_or(1.0),
        loss_good: values.get(3).copied().unwrap_or(0.0),
    }))
}

/// Checks a rate against the floor of one packet a second and [`MAX_RATE_BITS_PER_SEC`].
pub fn check_rate(flag: &str, text: &str, bits_per_sec: u64) -> Result<(), UsageError> {
    let problem = if bits_per_sec < MTU * 8 {
        format!("below one {MTU}-byte packet per second ({}bit)", MTU * 8)
    } else if bits_per_sec > MAX_RATE_BITS_PER_SEC {
        "above 100gbit, the highest rate nbt shapes to".into()
    } else {
        return Ok(());
    };
    Err(UsageError {
        flag: flag.into(),
        value: text.into(),
        problem,
        accepted: units::RATE_FORMS,
    })
}

/// Checks a burst against one packet and [`MAX_BURST_BYTES`].
pub fn check_burst(flag: &str, text: &str, bytes: u64) -> Result<(), UsageError> {
    let problem = if bytes < MTU {
        format!("smaller than one {MTU}-byte packet")
    } else if bytes > MAX_BURST_BYTES {
        "above 16G, the deepest bucket nbt takes".into()
    } else {
        return Ok(());
    };
    Err(UsageError {
        flag: flag.into(),
        value: text.into(),
        problem,
        accepted: units::SIZE_FORMS,
    })
}

pub const BUCKET_FORMS: &str =
    "a bucket (--burst) of at most 16G and at most an hour at its rate (5.4MB at 12kbit)";

/// Checks the bucket of each rate of `limits` against [`MAX_BURST_NS`]: `--burst` `text` at a
/// low rate can be hours of it.
pub fn check_buckets(flag: &str, text: &str, limits: &NetLimits) -> Result<(), UsageError> {
    for (limits, direction) in [
        (&limits.egress, Direction::Egress),
        (&limits.ingress, Direction::Ingress),
    ] {
        let (Some(rate), Some(burst)) = (limits.rate_bits_per_sec, limits.burst(direction)) else {
            continue;
        };
        if burst_ns((rate / 8).max(1), burst) > MAX_BURST_NS {
            return Err(UsageError {
                flag: flag.into(),
                value: text.into(),
                problem: format!(
                    "a bucket of {} is more than an hour at {}",
                    format_size(burst),
                    format_rate(rate)
                ),
                accepted: BUCKET_FORMS,
            });
        }
    }
    Ok(())
}

/// Attaches the shaping programs to `cgroup_dir` and writes `limits`.
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup_dir: &Path,
    limits: &NetLimits,
    pins: &mut Pins,
) -> Result<()> {
    write_limits_ebpf(ebpf, limits)?;
    let cgroup = loader::open_cgroup(cgroup_dir)?;
    loader::attach_cgroup_skb(
        ebpf,
        &cgroup,
        cgroup_dir,
        "shape_ingress",
        "shape_egress",
        pins,
    )?;
    let pace: &mut SockOps = loader::program(ebpf, "pace")?;
    pace.load()
        .context("the kernel refused to load BPF program pace (sock_ops)")?;
    let link = pace
        .attach(&cgroup, CgroupAttachMode::Single)
        .with_context(|| format!("attaching BPF program pace to {}", cgroup_dir.display()))?;
    pins.add("pace", pace.take_link(link)?)
}

/// Writes a link's limits (0: the run's own).
fn write_config(
    map: &mut Array<&mut MapData, ShaperConfig>,
    link: u32,
    limits: &NetLimits,
) -> Result<()> {
    map.set(
        entry(link, EGRESS),
        limits.egress.config(Direction::Egress),
        0,
    )?;
    map.set(
        entry(link, INGRESS),
        limits.ingress.config(Direction::Ingress),
        0,
    )?;
    Ok(())
}

/// A per-destination link as the kernel sees it: its prefixes and its limits.
pub struct LinkLimits<'a> {
    pub prefixes: &'a [(IpAddr, u8)],
    pub net: &'a NetLimits,
}

/// Gives each link (1 and up, in order) its limits and its prefixes in the trie that the
/// programs look a remote address up in.
pub fn write_links(ebpf: &mut Ebpf, links: &[LinkLimits]) -> Result<()> {
    {
        let map = ebpf
            .map_mut(SHAPER_CONFIG_MAP)
            .ok_or_else(|| anyhow!("BPF map {SHAPER_CONFIG_MAP} missing from nbt's object"))?;
        let mut config: Array<&mut MapData, ShaperConfig> = Array::try_from(map)?;
        for (i, link) in links.iter().enumerate() {
            write_config(&mut config, i as u32 + 1, link.net)?;
        }
    }
    let map = ebpf
        .map_mut(LINK_OF_MAP)
        .ok_or_else(|| anyhow!("BPF map {LINK_OF_MAP} missing from nbt's object"))?;
    let mut trie: LpmTrie<&mut MapData, LinkAddress, u32> = LpmTrie::try_from(map)?;
    for (i, link) in links.iter().enumerate() {
        for &(addr, len) in link.prefixes {
            let key = match addr {
                IpAddr::V4(v4) => Key::new(
                    u32::from(len) + IPV4_MAPPED_PREFIX,
                    ipv4_mapped(v4.octets()),
                ),
                IpAddr::V6(v6) => Key::new(u32::from(len), v6.octets()),
            };
            trie.insert(&key, i as u32 + 1, 0)
                .with_context(|| format!("adding {addr}/{len} to the links' table"))?;
        }
    }
    Ok(())
}

fn write_limits_ebpf(ebpf: &mut Ebpf, limits: &NetLimits) -> Result<()> {
    let map = ebpf
        .map_mut(SHAPER_CONFIG_MAP)
        .ok_or_else(|| anyhow!("BPF map {SHAPER_CONFIG_MAP} missing from nbt's object"))?;
    let mut config: Array<&mut MapData, ShaperConfig> = Array::try_from(map)?;
    write_config(&mut config, 0, limits)
}

/// The kernel ids of the shaper's maps, so that `nbt set` and `nbt ps` can reach a live run.
pub fn map_ids(ebpf: &Ebpf) -> Result<MapIds> {
    let id = |name: &str| -> Result<u32> {
        match ebpf.map(name) {
            Some(Map::Array(data)) | Some(Map::PerCpuArray(data)) => Ok(data.info()?.id()),
            _ => bail!("BPF map {name} missing from nbt's object"),
        }
    };
    Ok(MapIds {
        shaper_config: id(SHAPER_CONFIG_MAP)?,
        shaper_stats: id(SHAPER_STATS_MAP)?,
    })
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MapIds {
    pub shaper_config: u32,
    pub shaper_stats: u32,
}

/// Changes a live run's limits: the next packet sees them, nothing is reattached.
pub fn write_limits_by_id(ids: &MapIds, limits: &NetLimits) -> Result<()> {
    write_link_limits_by_id(ids, 0, limits)
}

/// Changes the limits of one link of a live run (0: its own, 1 and up: its `--link`s).
pub fn write_link_limits_by_id(ids: &MapIds, link: u32, limits: &NetLimits) -> Result<()> {
    let data = MapData::from_id(ids.shaper_config)
        .with_context(|| format!("opening BPF map id {} of the run", ids.shaper_config))?;
    let mut map = Map::from_map_data(data)?;
    let mut config: Array<&mut MapData, ShaperConfig> =
        Array::try_from(&mut map).with_context(|| {
            format!(
                "BPF map id {} is not the run's shaper configuration",
                ids.shaper_config
            )
        })?;
    write_config(&mut config, link, limits)
}

fn sum_stats(map: &PerCpuArray<&MapData, ShaperStats>, index: u32) -> Result<ShaperStats> {
    let mut total = ShaperStats::default();
    for per_cpu in map.get(&index, 0)?.iter() {
        total.add(per_cpu);
    }
    Ok(total)
}

fn traffic_from(map: &PerCpuArray<&MapData, ShaperStats>, link: u32) -> Result<ShapedTraffic> {
    Ok(ShapedTraffic {
        egress: sum_stats(map, entry(link, EGRESS))?,
        ingress: sum_stats(map, entry(link, INGRESS))?,
    })
}

/// The shaper's counters of a run loaded by this process: those of its own link (every
/// destination that no `--link` names).
pub fn read(ebpf: &Ebpf) -> Result<ShapedTraffic> {
    read_link(ebpf, 0)
}

/// The shaper's counters of one link of a run loaded by this process.
pub fn read_link(ebpf: &Ebpf, link: u32) -> Result<ShapedTraffic> {
    let map = ebpf
        .map(SHAPER_STATS_MAP)
        .ok_or_else(|| anyhow!("BPF map {SHAPER_STATS_MAP} missing from nbt's object"))?;
    traffic_from(&PerCpuArray::try_from(map)?, link)
}

/// The shaper's counters of a live run's own link, by map id.
pub fn read_by_id(ids: &MapIds) -> Result<ShapedTraffic> {
    read_link_by_id(ids, 0)
}

/// The shaper's counters of one link of a live run, by map id.
pub fn read_link_by_id(ids: &MapIds, link: u32) -> Result<ShapedTraffic> {
    let data = MapData::from_id(ids.shaper_stats)
        .with_context(|| format!("opening BPF map id {} of the run", ids.shaper_stats))?;
    let map = Map::from_map_data(data)?;
    let stats = PerCpuArray::try_from(&map).with_context(|| {
        format!(
            "BPF map id {} is not the run's shaper counters",
            ids.shaper_stats
        )
    })?;
    traffic_from(&stats, link)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ShapedTraffic {
    pub egress: ShaperStats,
    pub ingress: ShaperStats,
}

/// One direction's fate of packets over `seconds`, in words.
pub fn describe_traffic(traffic: &ShaperStats, seconds: f64) -> String {
    let mut text = format!(
        "passed {} packets, {} ({}/s average); dropped for rate {} packets, {}; lost {} packets, {}",
        traffic.passed_packets,
        format_size(traffic.passed_bytes),
        format_rate((traffic.passed_bytes as f64 * 8.0 / seconds.max(1e-9)) as u64),
        traffic.rate_dropped_packets,
        format_size(traffic.rate_dropped_bytes),
        traffic.loss_dropped_packets,
        format_size(traffic.loss_dropped_bytes),
    );
    // The ingress queue sends at the rate whenever it holds a packet: time it stood empty is
    // what the senders left unused, not a shortfall of the limit.
    if traffic.queue_idle_ns != 0 {
        text.push_str(&format!(
            "; queue empty {:.2} s between packets",
            traffic.queue_idle_ns as f64 / 1e9
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_s_idle_time_is_named_only_where_it_was_counted() {
        let mut traffic = ShaperStats {
            passed_packets: 10,
            passed_bytes: 15_000,
            ..Default::default()
        };
        assert!(!describe_traffic(&traffic, 1.0).contains("queue"));
        traffic.queue_idle_ns = 1_234_000_000;
        assert!(
            describe_traffic(&traffic, 1.0).ends_with("; queue empty 1.23 s between packets"),
            "{}",
            describe_traffic(&traffic, 1.0)
        );
    }

    #[test]
    fn gemodel_takes_netem_defaults() {
        let loss = parse_loss_model("--loss-model", "gemodel:1%")
            .unwrap()
            .unwrap();
        assert_eq!(
            loss,
            Loss::GilbertElliott {
                good_to_bad: 0.01,
                bad_to_good: 0.99,
                loss_bad: 1.0,
                loss_good: 0.0
            }
        );
        let loss = parse_loss_model("--loss-model", "gemodel:1%,25%,80%,0.1%")
            .unwrap()
            .unwrap();
        assert_eq!(
            loss,
            Loss::GilbertElliott {
                good_to_bad: 0.01,
                bad_to_good: 0.25,
                loss_bad: 0.8,
                loss_good: 0.001
            }
        );
        // Stationary bad share p/(p+r) = 1/26, times 80%, plus 25/26 of 0.1%.
        assert!((loss.mean() - (0.01 * 0.8 + 0.25 * 0.001) / 0.26).abs() < 1e-12);
        assert_eq!(parse_loss_model("--loss-model", "uniform").unwrap(), None);
    }

    #[test]
    fn bad_loss_models_are_refused() {
        for (text, problem) in [
            ("bursty", "unknown loss model"),
            ("gemodel:1%,2%,3%,4%,5%", "5 parameters"),
            ("gemodel:150%", "above 100%"),
            ("gemodel:", "not a percentage"),
        ] {
            let err = parse_loss_model("--loss-model", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
            assert!(err.to_string().contains("gemodel:P"), "{err}");
        }
    }

    #[test]
    fn kernel_config_in_bytes_and_nanoseconds() {
        let limits = DirectionLimits {
            rate_bits_per_sec: Some(512_000),
            burst_bytes: None,
            loss: Loss::Uniform { probability: 0.05 },
            ..Default::default()
        };
        let config = limits.config(Direction::Egress);
        assert_eq!(config.rate_bytes_per_sec, 64_000);
        // Default burst at 512kbit: one GSO super-packet (40 ms would be 2,560 bytes).
        assert_eq!(limits.burst(Direction::Egress), Some(GSO_BURST));
        // Ingress: 250 ms at 200mbit.
        let ingress = DirectionLimits {
            rate_bits_per_sec: Some(200_000_000),
            ..Default::default()
        };
        assert_eq!(ingress.burst(Direction::Ingress), Some(6_250_000));
        // The limits line says whether arriving packets queue or are dropped beyond the rate.
        assert_eq!(
            ingress.describe(Direction::Ingress),
            "200mbit (policed, burst 6.0 MiB)"
        );
        let queued = DirectionLimits {
            queued: true,
            ..ingress
        };
        assert_eq!(
            queued.describe(Direction::Ingress),
            "200mbit (queued, at most 6.0 MiB)"
        );
        assert_eq!(config.burst_ns, GSO_BURST * 1_000_000_000 / 64_000);
        assert_eq!(config.loss_model, LOSS_UNIFORM);
        assert_eq!(
            config.loss_good,
            (0.05 * PROBABILITY_ONE as f64).round() as u64
        );
        // 40 ms at 1gbit.
        assert_eq!(default_burst(1_000_000_000), 5_000_000);
        // 100% loss is every packet: the programs compare a u32 draw against 2^32.
        let all = DirectionLimits {
            loss: Loss::Uniform { probability: 1.0 },
            ..Default::default()
        };
        assert_eq!(all.config(Direction::Ingress).loss_good, PROBABILITY_ONE);
    }

    #[test]
    fn floors_of_one_packet() {
        assert!(check_rate("--egress-rate", "8kbit", 8_000)
            .unwrap_err()
            .problem
            .contains("below one 1500-byte packet"));
        assert!(check_rate("--egress-rate", "12kbit", 12_000).is_ok());
        assert!(check_burst("--burst", "1K", 1024)
            .unwrap_err()
            .problem
            .contains("smaller than one"));
    }

    #[test]
    fn ceilings_that_keep_the_kernel_products_in_a_u64() {
        assert!(check_rate("--egress-rate", "100gbit", MAX_RATE_BITS_PER_SEC).is_ok());
        let err = check_rate("--egress-rate", "x", MAX_RATE_BITS_PER_SEC + 1).unwrap_err();
        assert!(err.problem.contains("above 100gbit"), "{err}");
        assert!(check_burst("--burst", "16G", MAX_BURST_BYTES).is_ok());
        let err = check_burst("--burst", "x", MAX_BURST_BYTES + 1).unwrap_err();
        assert!(err.problem.contains("above 16G"), "{err}");
        // An hour of 12kbit (1,500 bytes a second) is 5,400,000 bytes: accepted, one more not.
        let at = |burst: u64| NetLimits {
            egress: DirectionLimits {
                rate_bits_per_sec: Some(12_000),
                burst_bytes: Some(burst),
                loss: Loss::None,
                ..Default::default()
            },
            ..NetLimits::default()
        };
        assert!(check_buckets("--burst", "x", &at(5_400_000)).is_ok());
        let err = check_buckets("--burst", "x", &at(5_400_001)).unwrap_err();
        assert!(
            err.problem.contains("is more than an hour at 12kbit"),
            "{err}"
        );
        // burst x 1e9 overflows a u64 above 18 GB: computed in u128.
        assert_eq!(burst_ns(1, 1 << 40), u64::MAX);
        assert_eq!(burst_ns(1_000_000_000, 1 << 40), 1_099_511_627_776);
        assert_eq!(burst_ns(1_000, 1 << 34), (1 << 34) * 1_000_000);
    }

    #[test]
    fn the_kernel_config_is_clamped_whatever_it_is_given() {
        // A rate or burst past the bounds never reaches the kernel: nbt set and a schedule
        // change a rate under a burst set before, and every path goes through config().
        let config = DirectionLimits {
            rate_bits_per_sec: Some(u64::MAX),
            burst_bytes: Some(u64::MAX),
            loss: Loss::None,
            ..Default::default()
        }
        .config(Direction::Egress);
        assert_eq!(config.rate_bytes_per_sec, MAX_RATE_BITS_PER_SEC / 8);
        assert_eq!(
            config.burst_ns,
            MAX_BURST_BYTES * 1_000_000_000 / (MAX_RATE_BITS_PER_SEC / 8)
        );
        let slow = DirectionLimits {
            rate_bits_per_sec: Some(12_000),
            burst_bytes: Some(MAX_BURST_BYTES),
            loss: Loss::None,
            ..Default::default()
        }
        .config(Direction::Egress);
        assert_eq!(slow.burst_ns, MAX_BURST_NS);
        // The products `pace` makes, with the largest values it can read.
        let srtt_us = u64::from(u32::MAX) >> 3;
        assert!(config.rate_bytes_per_sec.checked_mul(srtt_us).is_some());
        assert!(config
            .rate_bytes_per_sec
            .checked_mul(config.burst_ns)
            .is_some());
        assert!(slow.burst_ns.checked_mul(1_000_000).is_some());
    }
}
