//! `--link` and the profile's `[[link]]` tables: limits of their own for some destinations
//! (per-destination links). A run's own network flags are its link 0, for every destination
//! that no link names; each link is a set of destinations (addresses, prefixes, host names) with
//! the same network settings as the run, named as the flags without `--`.
//!
//! A link's limits replace the run's for its destinations: what a link does not set is
//! unlimited on it. A packet's link is that of the longest prefix that holds its remote address.

use std::net::IpAddr;

use serde::Serialize;

use super::{Pending, Profile, Sources};
use crate::enforce::edt::Latency;
use crate::enforce::gate::{self, Rule};
use crate::enforce::shaper::{Direction, NetLimits};
use crate::error::PlanError;

/// The settings a link takes: the network flags of `nbt run`, without `--`. The first six are
/// those `nbt set --link` changes live (`cmd::live::LIVE_LINK_KEYS`).
pub const LINK_KEYS: [&str; 16] = [
    "egress-rate",
    "ingress-rate",
    "burst",
    "loss",
    "loss-model",
    "loss-direction",
    "loss-correlation",
    "latency",
    "jitter",
    "jitter-correlation",
    "duplicate",
    "corrupt",
    "reorder",
    "reorder-correlation",
    "reorder-gap",
    "impair-direction",
];

/// The most links a run takes besides its own (`nbt_common::shaper::MAX_LINKS` - 1).
pub const MAX_LINKS: usize = nbt_common::shaper::MAX_LINKS as usize - 1;
/// The most prefixes in all links together (the size of the kernel's trie).
pub const MAX_PREFIXES: usize = 4096;

pub const LINK_FORMS: &str = "to=DEST[,to=DEST...],KEY=VALUE[,KEY=VALUE...]: DEST an IPv4 or \
     IPv6 address, a CIDR (10.0.0.0/8, 2001:db8::/32) or a host name; KEY one of egress-rate, \
     ingress-rate, burst, loss, loss-model, loss-direction, loss-correlation, latency, jitter, \
     jitter-correlation, duplicate, corrupt, reorder, reorder-correlation, reorder-gap, \
     impair-direction (the flags of nbt run, without --)";

/// One link: its destinations and their limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Link {
    /// The destinations as given.
    pub to: Vec<String>,
    /// What they are in the kernel's trie: an address and a prefix length each (host names
    /// resolved when the run starts; a name that moves later keeps its first addresses).
    pub prefixes: Vec<(IpAddr, u8)>,
    pub net: NetLimits,
    /// Added delay of packets to these destinations (fq + EDT).
    pub latency: Option<Latency>,
    /// duplicate, corrupt or reorder was given: the tc program goes on.
    pub tc_impairments: bool,
    /// Where duplicate and corrupt apply (`impair-direction`).
    pub impair_direction: crate::enforce::shaper::Directions,
}

impl Link {
    /// "to 10.0.0.0/8, db: egress 100mbit (burst 1.2MB), latency 5 ms ± 0 ms".
    pub fn describe(&self) -> String {
        let mut parts = network_limits(&self.net, self.latency.as_ref());
        if parts.is_empty() {
            parts.push("unlimited".into());
        }
        format!("to {}: {}", self.to.join(", "), parts.join(", "))
    }
}

/// Each network limit in force, described: "egress 10mbit (burst 96 KiB)", "latency 5 ms ± 0 ms".
pub fn network_limits(net: &NetLimits, latency: Option<&Latency>) -> Vec<String> {
    let mut parts = Vec::new();
    for (name, limits, direction) in [
        ("egress", &net.egress, Direction::Egress),
        ("ingress", &net.ingress, Direction::Ingress),
    ] {
        if !limits.is_unlimited() {
            parts.push(format!("{name} {}", limits.describe(direction)));
        }
    }
    if let Some(l) = latency {
        parts.push(format!(
            "latency {} ms ± {} ms",
            l.latency_ns as f64 / 1e6,
            l.jitter_ns as f64 / 1e6
        ));
    }
    parts
}

/// One `--link` flag: `to=...,key=value,...`.
pub fn parse_flag(text: &str, pending: &mut Vec<Pending>) -> Result<Link, PlanError> {
    let origin = format!("--link {text}");
    let mut to = Vec::new();
    let mut table = toml::Table::new();
    for part in text.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(refusal(
                "--link",
                text,
                &format!("'{part}' is not KEY=VALUE"),
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if key == "to" {
            to.push(value.to_string());
        } else if table
            .insert(key.to_string(), toml::Value::String(value.into()))
            .is_some()
        {
            return Err(refusal("--link", text, &format!("'{key}' is given twice")));
        }
    }
    build(to, table, &origin, pending)
}

/// The profile's `link` array of tables.
pub fn parse_profile(
    value: &toml::Value,
    origin: &str,
    pending: &mut Vec<Pending>,
) -> Result<Vec<Link>, PlanError> {
    let Some(tables) = value.as_array() else {
        return Err(PlanError(format!(
            "{origin}: 'link' must be an array of tables ([[link]]), not a {}",
            value.type_str()
        )));
    };
    let mut links = Vec::new();
    for (i, table) in tables.iter().enumerate() {
        let where_ = format!("[[link]] {} of {origin}", i + 1);
        let Some(table) = table.as_table() else {
            return Err(PlanError(format!("{where_}: not a table")));
        };
        let mut table = table.clone();
        let to = match table.remove("to") {
            Some(toml::Value::String(one)) => vec![one],
            Some(toml::Value::Array(many)) => many
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        PlanError(format!(
                            "{where_}: 'to' must hold strings, not a {}",
                            v.type_str()
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(PlanError(format!(
                    "{where_}: 'to' must be a string or an array of strings, not a {}",
                    other.type_str()
                )))
            }
            None => Vec::new(),
        };
        links.push(build(to, table, &where_, pending)?);
    }
    Ok(links)
}

fn refusal(flag: &str, text: &str, problem: &str) -> PlanError {
    PlanError(format!(
        "invalid value '{text}' for {flag}: {problem}; accepted: {LINK_FORMS}"
    ))
}

/// A link from its destinations and its settings, each checked as the run's own would be.
fn build(
    to: Vec<String>,
    table: toml::Table,
    origin: &str,
    pending: &mut Vec<Pending>,
) -> Result<Link, PlanError> {
    if to.is_empty() {
        return Err(PlanError(format!(
            "{origin}: a link needs at least one destination (to=...); accepted: {LINK_FORMS}"
        )));
    }
    if let Some(key) = table.keys().find(|k| !LINK_KEYS.contains(&k.as_str())) {
        return Err(PlanError(format!(
            "{origin}: '{key}' is not a setting of a link; accepted: {}",
            LINK_KEYS.join(", ")
        )));
    }
    if table.is_empty() {
        return Err(PlanError(format!(
            "{origin}: a link without a setting would be unlimited; give it at least one of {}",
            LINK_KEYS.join(", ")
        )));
    }
    let mut prefixes = Vec::new();
    for dest in &to {
        prefixes.extend(destination(origin, dest)?);
    }
    let profile: Profile = toml::Value::Table(table)
        .try_into()
        .map_err(|e| PlanError(format!("{origin}: {e}")))?;
    let flags = super::Flags::default();
    let sources = Sources {
        flags: &flags,
        profile: &profile,
        origin: origin.to_string(),
    };
    let mut net = sources.network()?;
    let mut latency = sources.latency(pending)?;
    let (tc_impairments, impair_direction) = sources.impairments(&mut net, latency.as_mut())?;
    Ok(Link {
        to,
        prefixes,
        net,
        latency,
        tc_impairments,
        impair_direction,
    })
}

/// One destination as prefixes: an address or CIDR as it is; a host name as each of its
/// addresses now. Ports and `all` are refused: a link is by address.
fn destination(origin: &str, dest: &str) -> Result<Vec<(IpAddr, u8)>, PlanError> {
    let flag = format!("to ({origin})");
    match gate::parse_rule(&flag, dest)? {
        Rule::All => Err(PlanError(format!(
            "{flag}: 'all' is every destination: that is the run's own link (its flags), not a --link of its own"
        ))),
        Rule::Net { port: Some(_), .. } | Rule::Host { port: Some(_), .. } => Err(PlanError(
            format!("{flag}: '{dest}': a link is by address, without a port"),
        )),
        Rule::Net { addr, prefix, .. } => Ok(vec![(addr, prefix)]),
        Rule::Host { name, .. } => gate::resolve(&name)
            .map(|ips| {
                ips.into_iter()
                    .map(|ip| (ip, if ip.is_ipv4() { 32 } else { 128 }))
                    .collect()
            })
            .map_err(|problem| PlanError(format!("{flag}: {problem}"))),
    }
}

/// Checks the links together: how many, and that no prefix is in two of them.
pub fn check_all(links: &[Link]) -> Result<(), PlanError> {
    if links.len() > MAX_LINKS {
        return Err(PlanError(format!(
            "--link: {} links; a run takes at most {MAX_LINKS} besides its own",
            links.len()
        )));
    }
    let total: usize = links.iter().map(|l| l.prefixes.len()).sum();
    if total > MAX_PREFIXES {
        return Err(PlanError(format!(
            "--link: {total} destinations in all; the kernel's table holds {MAX_PREFIXES}"
        )));
    }
    let mut seen: Vec<((IpAddr, u8), usize)> = Vec::new();
    for (i, link) in links.iter().enumerate() {
        for prefix in &link.prefixes {
            let masked = masked(*prefix);
            if let Some((_, other)) = seen.iter().find(|(p, j)| *p == masked && *j != i) {
                return Err(PlanError(format!(
                    "--link: {}/{} is a destination of two links ({} and {}): each address \
                     belongs to one link (a longer prefix may sit inside a shorter one)",
                    masked.0,
                    masked.1,
                    links[*other].to.join(","),
                    link.to.join(",")
                )));
            }
            seen.push((masked, i));
        }
    }
    Ok(())
}

/// The prefix with the bits past its length cleared, as the trie keeps it.
pub fn masked((addr, len): (IpAddr, u8)) -> (IpAddr, u8) {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            (IpAddr::V4((bits & mask).into()), len)
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            (IpAddr::V6((bits & mask).into()), len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(text: &str) -> Result<Link, PlanError> {
        parse_flag(text, &mut Vec::new())
    }

    #[test]
    fn a_flag_takes_destinations_and_the_run_flags_names() {
        let l = link("to=10.0.0.0/8,to=fd00::1,egress-rate=100mbit,loss=5%").unwrap();
        assert_eq!(l.to, ["10.0.0.0/8", "fd00::1"]);
        assert_eq!(
            l.prefixes,
            [
                ("10.0.0.0".parse().unwrap(), 8),
                ("fd00::1".parse().unwrap(), 128)
            ]
        );
        assert_eq!(l.net.egress.rate_bits_per_sec, Some(100_000_000));
        assert_eq!(l.net.ingress.rate_bits_per_sec, None);
        assert_eq!(
            l.net.egress.loss,
            crate::enforce::shaper::Loss::Uniform { probability: 0.05 }
        );
        assert!(l
            .describe()
            .starts_with("to 10.0.0.0/8, fd00::1: egress 100mbit"));
    }

    #[test]
    fn a_link_takes_its_own_impair_direction() {
        use crate::enforce::shaper::Directions;
        let l = link("to=10.0.0.0/8,duplicate=2%,impair-direction=ingress").unwrap();
        assert_eq!(l.impair_direction, Directions::Ingress);
        assert_eq!(l.net.ingress.impair.duplicate, 0.02);
        assert_eq!(l.net.egress.impair.duplicate, 0.0);
        assert!(l.tc_impairments);
        let err = link("to=10.0.0.0/8,impair-direction=up,corrupt=1%").unwrap_err();
        assert!(
            err.0.contains("invalid value 'up' for impair-direction"),
            "{err}"
        );
    }

    #[test]
    fn bad_links_are_refused_with_the_key_and_the_forms() {
        for (text, says) in [
            ("egress-rate=1mbit", "at least one destination"),
            ("to=10.0.0.1", "without a setting"),
            (
                "to=10.0.0.1,memory=1G",
                "'memory' is not a setting of a link",
            ),
            ("to=10.0.0.1,egress-rate", "'egress-rate' is not KEY=VALUE"),
            ("to=10.0.0.1,loss=1%,loss=2%", "'loss' is given twice"),
            ("to=all,loss=1%", "the run's own link"),
            ("to=10.0.0.1:443,loss=1%", "without a port"),
            ("to=10.0.0.0/33,loss=1%", "prefix length '33'"),
            (
                "to=10.0.0.1,egress-rate=fast",
                "egress-rate (--link to=10.0.0.1,egress-rate=fast)",
            ),
            ("to=10.0.0.1,jitter=5ms", "it needs --latency"),
        ] {
            let err = link(text).unwrap_err().0;
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn a_prefix_in_two_links_is_refused_a_nested_one_is_not() {
        let a = link("to=10.1.0.0/16,egress-rate=1mbit").unwrap();
        let nested = link("to=10.1.2.0/24,egress-rate=2mbit").unwrap();
        assert!(check_all(&[a.clone(), nested]).is_ok());
        let again = link("to=10.1.255.255/16,loss=1%").unwrap();
        let err = check_all(&[a, again]).unwrap_err().0;
        assert!(
            err.contains("10.1.0.0/16 is a destination of two links"),
            "{err}"
        );
    }

    #[test]
    fn a_profile_table_takes_a_list_or_one_destination() {
        let value: toml::Value = toml::from_str::<toml::Table>(
            "[[link]]\nto = [\"10.0.0.0/8\", \"192.0.2.7\"]\negress-rate = \"100mbit\"\n\
             [[link]]\nto = \"198.51.100.0/24\"\nloss = \"5%\"\nlatency = \"100ms\"\n",
        )
        .unwrap()["link"]
            .clone();
        let links = parse_profile(&value, "profile p", &mut Vec::new());
        // The latency needs fq, which this host may lack: then it is pending, not an error.
        let links = links.unwrap();
        assert_eq!(links.len(), 2);
        assert_eq!(links[0].prefixes.len(), 2);
        assert_eq!(links[1].to, ["198.51.100.0/24"]);
        let bad: toml::Value = toml::from_str::<toml::Table>("[[link]]\nto = 5\nloss = \"1%\"\n")
            .unwrap()["link"]
            .clone();
        let err = parse_profile(&bad, "profile p", &mut Vec::new())
            .unwrap_err()
            .0;
        assert!(
            err.contains("[[link]] 1 of profile p: 'to' must be"),
            "{err}"
        );
    }
}
