//! The swarm file (`nbt swarm FILE.toml`, docs/swarm.md): its nodes, their links and the swarm's
//! timeline, read strictly (an unknown key is refused) and checked before anything is made.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::PlanError;
use crate::units;

/// The most nodes a swarm takes: each node gives each peer a link of its own, and a run takes
/// at most [`crate::plan::link::MAX_LINKS`] links.
pub const MAX_NODES: usize = 32;
/// A swarm file is read whole; at most this many bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// The most events a timeline holds.
pub const MAX_EVENTS: usize = 10_000;
/// Where node addresses come from unless the file says: TEST-NET-2 (RFC 5737), routed nowhere.
pub const DEFAULT_SUBNET: &str = "198.51.100.0/24";

/// The actions a timeline event takes, with the fields each reads.
pub const ACTIONS: &[(&str, &[&str])] = &[
    ("kill", &["node", "restart-after"]),
    ("restart", &["node"]),
    ("freeze", &["node", "for"]),
    ("thaw", &["node"]),
    ("partition", &["nodes"]),
    ("heal", &[]),
    ("degrade", &["from", "to", "rate", "loss", "oneway"]),
    ("spend", &["node", "amount"]),
    (
        "fault",
        &[
            "node",
            "kind",
            "duration",
            "cpus",
            "direction",
            "loss",
            "memory",
            "amount",
            "rate",
        ],
    ),
];

/// A TOML string, integer or float, as text (`cpus = 0.5` and `cpus = "0.5"` are the same).
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        F(f64),
    }
    Ok(Option::<Scalar>::deserialize(d)?.map(|s| match s {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::F(f) => f.to_string(),
    }))
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmFile {
    /// The swarm's name (default: the file's name without `.toml`).
    pub name: Option<String>,
    /// Where the nodes' addresses come from: an IPv4 prefix of at least 2 host addresses per
    /// node (default 198.51.100.0/24).
    pub subnet: Option<String>,
    /// `mesh` (default: every node reaches every other) or `links` (only the pairs a `[[link]]`
    /// names; every other pair loses every packet).
    pub topology: Option<String>,
    /// The swarm ends when this node's run ends (the others are stopped as at Ctrl-C), rather
    /// than when every node's has.
    pub until: Option<String>,
    #[serde(default)]
    pub node: Vec<NodeSpec>,
    #[serde(default)]
    pub link: Vec<LinkSpec>,
    #[serde(default)]
    pub event: Vec<EventSpec>,
}

/// One node: its command and the limits of its `nbt run`, named as the flags without `--`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeSpec {
    pub name: String,
    pub command: Vec<String>,
    /// Environment variables added to the node's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub profile: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub memory: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub swap: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub cpus: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub pids: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub egress_rate: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub ingress_rate: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub burst: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub loss: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub latency: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub jitter: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub balance: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub price_egress: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub price_call: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub price_hour: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub call_gap: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub gate: Option<String>,
    pub schedule: Option<String>,
}

/// A link between two nodes: its limits apply to what `from` sends to `to`, and (unless
/// `oneway`) to what `to` sends to `from`, each at its sender.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LinkSpec {
    pub from: String,
    pub to: String,
    #[serde(default, deserialize_with = "text")]
    pub rate: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub loss: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub latency: Option<String>,
    #[serde(default)]
    pub oneway: bool,
}

/// One timeline event: `at`, an `action` and the fields that action reads ([`ACTIONS`]).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EventSpec {
    pub at: String,
    pub action: String,
    pub node: Option<String>,
    pub nodes: Option<Vec<String>>,
    pub from: Option<String>,
    pub to: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub restart_after: Option<String>,
    #[serde(rename = "for", default, deserialize_with = "text")]
    pub for_: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub rate: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub loss: Option<String>,
    pub oneway: Option<bool>,
    #[serde(default, deserialize_with = "text")]
    pub amount: Option<String>,
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub duration: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub cpus: Option<String>,
    pub direction: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub memory: Option<String>,
}

impl EventSpec {
    /// The fields given besides `at` and `action`, by their names in the file.
    fn given(&self) -> Vec<&'static str> {
        [
            ("node", self.node.is_some()),
            ("nodes", self.nodes.is_some()),
            ("from", self.from.is_some()),
            ("to", self.to.is_some()),
            ("restart-after", self.restart_after.is_some()),
            ("for", self.for_.is_some()),
            ("rate", self.rate.is_some()),
            ("loss", self.loss.is_some()),
            ("oneway", self.oneway.is_some()),
            ("amount", self.amount.is_some()),
            ("kind", self.kind.is_some()),
            ("duration", self.duration.is_some()),
            ("cpus", self.cpus.is_some()),
            ("direction", self.direction.is_some()),
            ("memory", self.memory.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

/// A node as the swarm runs it: its spec, its address, its run's name (`SWARM.NODE`), and the
/// `nbt run` flags its limits and links make.
#[derive(Debug, Clone)]
pub struct Node {
    pub spec: NodeSpec,
    pub addr: Ipv4Addr,
    pub label: String,
    /// The `nbt run` arguments before `--`: the node's limits and one `--link` per peer.
    pub run_args: Vec<String>,
    /// Each peer's `--link` destination, by node index (`None`: this node).
    pub link_to: Vec<Option<String>>,
}

/// An event checked: when, and what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub at: Duration,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    Kill {
        node: usize,
        restart_after: Option<Duration>,
    },
    Restart {
        node: usize,
    },
    Freeze {
        node: usize,
        for_: Option<String>,
    },
    Thaw {
        node: usize,
    },
    Partition {
        nodes: Vec<usize>,
    },
    Heal,
    Degrade {
        from: usize,
        to: usize,
        /// `--link` settings: `egress-rate=...`, `loss=...`.
        settings: Vec<String>,
        oneway: bool,
    },
    Spend {
        node: usize,
        amount: String,
    },
    Fault {
        node: usize,
        /// `nbt fault` arguments after the run: KIND [DURATION] [--OPTION VALUE...].
        args: Vec<String>,
    },
}

/// The swarm, checked.
#[derive(Debug, Clone)]
pub struct Swarm {
    pub name: String,
    pub subnet: (Ipv4Addr, u8),
    pub nodes: Vec<Node>,
    pub events: Vec<Event>,
    /// The node whose end ends the swarm (`until`).
    pub until: Option<usize>,
    /// The file as read, for the swarm's receipt.
    pub file: serde_json::Value,
}

fn refuse(text: String) -> PlanError {
    PlanError(text)
}

/// A name of a swarm or a node: a letter, then letters, digits, `_` or `-`; at most 24 (the
/// run's name is `SWARM.NODE`, and the namespaces' `nbt-swarm-SWARM-NODE`).
fn check_name(what: &str, name: &str) -> Result<(), PlanError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(refuse(format!(
            "invalid value '{name}' for {what}: accepted: a letter, then letters, digits, '_' \
             or '-', at most 24 characters"
        )))
    }
}

/// Reads and checks a swarm file. `default_name` is used when the file has no `name`.
pub fn parse(text: &str, default_name: &str) -> Result<Swarm, PlanError> {
    let file: SwarmFile = toml::from_str(text)
        .map_err(|e| refuse(format!("swarm file: {}", e.to_string().trim())))?;
    check(file, default_name)
}

fn parse_subnet(text: &str) -> Result<(Ipv4Addr, u8), PlanError> {
    let bad = |problem: &str| {
        refuse(format!(
            "invalid value '{text}' for subnet: {problem}; accepted: an IPv4 prefix such as \
             10.99.0.0/24, /8 to /29"
        ))
    };
    let (addr, len) = text.split_once('/').ok_or_else(|| bad("no /LENGTH"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
    let len: u8 = len.parse().map_err(|_| bad("not a prefix length"))?;
    if !(8..=29).contains(&len) {
        return Err(bad("prefix length out of range"));
    }
    let mask = u32::MAX << (32 - len);
    Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
}

fn check(file: SwarmFile, default_name: &str) -> Result<Swarm, PlanError> {
    let as_json = serde_json::to_value(&file).unwrap_or_default();
    let name = file
        .name
        .clone()
        .unwrap_or_else(|| default_name.to_string());
    check_name("name", &name)?;
    let subnet = parse_subnet(file.subnet.as_deref().unwrap_or(DEFAULT_SUBNET))?;
    let mesh = match file.topology.as_deref().unwrap_or("mesh") {
        "mesh" => true,
        "links" => false,
        other => {
            return Err(refuse(format!(
                "invalid value '{other}' for topology: accepted: mesh (every node reaches every \
                 other), links (only the pairs a [[link]] names)"
            )))
        }
    };
    if file.node.is_empty() {
        return Err(refuse(
            "swarm file: no [[node]]; a swarm needs at least one node (name, command)".into(),
        ));
    }
    if file.node.len() > MAX_NODES {
        return Err(refuse(format!(
            "swarm file: {} nodes; a swarm takes at most {MAX_NODES}",
            file.node.len()
        )));
    }
    let hosts = (1u64 << (32 - subnet.1)) - 2;
    if hosts < file.node.len() as u64 {
        return Err(refuse(format!(
            "invalid value '{}/{}' for subnet: {hosts} addresses for {} nodes",
            subnet.0,
            subnet.1,
            file.node.len()
        )));
    }
    let names: Vec<&str> = file.node.iter().map(|n| n.name.as_str()).collect();
    for (i, spec) in file.node.iter().enumerate() {
        check_name(&format!("name of [[node]] {}", i + 1), &spec.name)?;
        if names[..i].contains(&spec.name.as_str()) {
            return Err(refuse(format!(
                "[[node]] {}: the name '{}' is given twice; each node's name is its own",
                i + 1,
                spec.name
            )));
        }
        if spec.command.is_empty() || spec.command[0].is_empty() {
            return Err(refuse(format!(
                "node '{}': command is empty; accepted: an array of strings, the program first \
                 (command = [\"sh\", \"-c\", \"...\"])",
                spec.name
            )));
        }
        if let Some(key) = spec.env.keys().find(|k| k.starts_with("NBT_")) {
            return Err(refuse(format!(
                "node '{}': env '{key}': NBT_ variables are nbt's own",
                spec.name
            )));
        }
    }
    let index = |field: &str, where_: &str, name: &str| {
        names.iter().position(|n| *n == name).ok_or_else(|| {
            refuse(format!(
                "{where_}: invalid value '{name}' for {field}: no such node; accepted: {}",
                names.join(", ")
            ))
        })
    };
    // Each direction's settings, by (sender, receiver).
    let mut pairs: BTreeMap<(usize, usize), Vec<(&str, String)>> = BTreeMap::new();
    for (i, link) in file.link.iter().enumerate() {
        let where_ = format!("[[link]] {}", i + 1);
        let (a, b) = (
            index("from", &where_, &link.from)?,
            index("to", &where_, &link.to)?,
        );
        if a == b {
            return Err(refuse(format!(
                "{where_}: from and to are both '{}'; a link joins two nodes",
                link.from
            )));
        }
        let mut settings = Vec::new();
        for (key, value) in [
            ("egress-rate", &link.rate),
            ("loss", &link.loss),
            ("latency", &link.latency),
        ] {
            if let Some(v) = value {
                settings.push((key, v.clone()));
            }
        }
        let directions = if link.oneway {
            vec![(a, b)]
        } else {
            vec![(a, b), (b, a)]
        };
        for pair in directions {
            if pairs.insert(pair, settings.clone()).is_some() {
                return Err(refuse(format!(
                    "{where_}: the link from '{}' to '{}' is given twice",
                    names[pair.0], names[pair.1]
                )));
            }
        }
    }
    let base = u32::from(subnet.0);
    let addrs: Vec<Ipv4Addr> = (0..file.node.len())
        .map(|i| Ipv4Addr::from(base + 1 + i as u32))
        .collect();
    let mut nodes = Vec::new();
    for (i, spec) in file.node.iter().enumerate() {
        let own: Vec<(&str, &Option<String>)> = vec![
            ("egress-rate", &spec.egress_rate),
            ("ingress-rate", &spec.ingress_rate),
            ("burst", &spec.burst),
            ("loss", &spec.loss),
            ("latency", &spec.latency),
            ("jitter", &spec.jitter),
        ];
        let mut run_args = Vec::new();
        for (key, value) in own.iter().copied().chain([
            ("memory", &spec.memory),
            ("swap", &spec.swap),
            ("cpus", &spec.cpus),
            ("pids", &spec.pids),
            ("balance", &spec.balance),
            ("price-egress", &spec.price_egress),
            ("price-call", &spec.price_call),
            ("price-hour", &spec.price_hour),
            ("call-gap", &spec.call_gap),
            ("gate", &spec.gate),
            ("profile", &spec.profile),
            ("schedule", &spec.schedule),
        ]) {
            if let Some(v) = value {
                run_args.push(format!("--{key}"));
                run_args.push(v.clone());
            }
        }
        let mut link_to = vec![None; file.node.len()];
        for (j, addr) in addrs.iter().enumerate() {
            if j == i {
                continue;
            }
            // The node's own network limits hold on each peer link (each its own bucket),
            // replaced by what a [[link]] sets; a pair outside `links` topology loses all.
            let mut settings: BTreeMap<&str, String> = own
                .iter()
                .filter_map(|(k, v)| Some((*k, (*v).clone()?)))
                .collect();
            match pairs.get(&(i, j)) {
                Some(given) => settings.extend(given.iter().cloned()),
                None if !mesh => {
                    settings.insert("loss", "100%".into());
                }
                None => {}
            }
            if settings.is_empty() {
                // Every peer has a link from the start, so that its limits can change live.
                settings.insert("loss", "0%".into());
            }
            let mut flag = format!("to={addr}");
            for (k, v) in &settings {
                flag.push_str(&format!(",{k}={v}"));
            }
            run_args.push("--link".into());
            run_args.push(flag);
            link_to[j] = Some(addr.to_string());
        }
        let label = format!("{name}.{}", spec.name);
        nodes.push(Node {
            spec: spec.clone(),
            addr: addrs[i],
            label,
            run_args,
            link_to,
        });
    }
    if file.event.len() > MAX_EVENTS {
        return Err(refuse(format!(
            "swarm file: {} events; a timeline takes at most {MAX_EVENTS}",
            file.event.len()
        )));
    }
    let mut events = Vec::new();
    for (i, spec) in file.event.iter().enumerate() {
        events.push(check_event(i, spec, &index)?);
    }
    // In time order; events at the same time in the file's order.
    events.sort_by_key(|e| e.at);
    let until = file
        .until
        .as_deref()
        .map(|name| index("until", "swarm file", name))
        .transpose()?;
    Ok(Swarm {
        name,
        subnet,
        nodes,
        events,
        until,
        file: as_json,
    })
}

fn check_event(
    i: usize,
    spec: &EventSpec,
    index: &dyn Fn(&str, &str, &str) -> Result<usize, PlanError>,
) -> Result<Event, PlanError> {
    let where_ = format!("[[event]] {}", i + 1);
    let at = units::parse_duration("at", &spec.at).map_err(|e| refuse(format!("{where_}: {e}")))?;
    let Some((_, fields)) = ACTIONS.iter().find(|(name, _)| *name == spec.action) else {
        return Err(refuse(format!(
            "{where_}: invalid value '{}' for action: accepted: {}",
            spec.action,
            ACTIONS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    if let Some(extra) = spec.given().into_iter().find(|g| !fields.contains(g)) {
        return Err(refuse(format!(
            "{where_}: '{extra}' is not a field of a {} event; it takes {}",
            spec.action,
            if fields.is_empty() {
                "none but at and action".to_string()
            } else {
                fields.join(", ")
            }
        )));
    }
    let need = |field: &str, value: &Option<String>| {
        value
            .clone()
            .ok_or_else(|| refuse(format!("{where_}: a {} event needs '{field}'", spec.action)))
    };
    let node = || index("node", &where_, &need("node", &spec.node)?);
    let duration = |field: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|t| units::parse_duration(field, t).map_err(|e| refuse(format!("{where_}: {e}"))))
            .transpose()
    };
    let action = match spec.action.as_str() {
        "kill" => Action::Kill {
            node: node()?,
            restart_after: duration("restart-after", &spec.restart_after)?,
        },
        "restart" => Action::Restart { node: node()? },
        "freeze" => {
            duration("for", &spec.for_)?;
            Action::Freeze {
                node: node()?,
                for_: spec.for_.clone(),
            }
        }
        "thaw" => Action::Thaw { node: node()? },
        "partition" => {
            let names = spec.nodes.clone().unwrap_or_default();
            if names.is_empty() {
                return Err(refuse(format!(
                    "{where_}: a partition event needs 'nodes', the nodes cut off from the rest \
                     (nodes = [\"n1\", \"n2\"])"
                )));
            }
            let mut nodes = Vec::new();
            for name in &names {
                let n = index("nodes", &where_, name)?;
                if !nodes.contains(&n) {
                    nodes.push(n);
                }
            }
            Action::Partition { nodes }
        }
        "heal" => Action::Heal,
        "degrade" => {
            let from = index("from", &where_, &need("from", &spec.from)?)?;
            let to = index("to", &where_, &need("to", &spec.to)?)?;
            if from == to {
                return Err(refuse(format!(
                    "{where_}: from and to are the same node; a link joins two"
                )));
            }
            let mut settings = Vec::new();
            if let Some(rate) = &spec.rate {
                let bits = units::parse_rate("rate", rate)
                    .map_err(|e| refuse(format!("{where_}: {e}")))?;
                crate::enforce::shaper::check_rate("rate", rate, bits)
                    .map_err(|e| refuse(format!("{where_}: {e}")))?;
                settings.push(format!("egress-rate={rate}"));
            }
            if let Some(loss) = &spec.loss {
                let p = units::parse_percent("loss", loss)
                    .map_err(|e| refuse(format!("{where_}: {e}")))?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(refuse(format!(
                        "{where_}: invalid value '{loss}' for loss: accepted: 0% to 100%"
                    )));
                }
                settings.push(format!("loss={loss}"));
            }
            if settings.is_empty() {
                return Err(refuse(format!(
                    "{where_}: a degrade event needs 'rate' or 'loss' (or both)"
                )));
            }
            Action::Degrade {
                from,
                to,
                settings,
                oneway: spec.oneway.unwrap_or(false),
            }
        }
        "spend" => {
            let amount = need("amount", &spec.amount)?;
            crate::enforce::ledger::parse_amount("amount", &amount)
                .map_err(|e| refuse(format!("{where_}: {e}")))?;
            Action::Spend {
                node: node()?,
                amount,
            }
        }
        "fault" => {
            let kind = need("kind", &spec.kind)?;
            let mut args = vec![kind];
            if let Some(d) = &spec.duration {
                args.push(d.clone());
            }
            for (flag, value) in [
                ("--cpus", &spec.cpus),
                ("--direction", &spec.direction),
                ("--loss", &spec.loss),
                ("--memory", &spec.memory),
                ("--amount", &spec.amount),
                ("--rate", &spec.rate),
            ] {
                if let Some(v) = value {
                    args.push(flag.into());
                    args.push(v.clone());
                }
            }
            Action::Fault {
                node: node()?,
                args,
            }
        }
        _ => unreachable!("every action of ACTIONS is matched"),
    };
    Ok(Event { at, action })
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = r#"
        name = "t"
        [[node]]
        name = "a"
        command = ["true"]
        egress-rate = "10mbit"
        [[node]]
        name = "b"
        command = ["true"]
        cpus = 0.5
        [[node]]
        name = "c"
        command = ["true"]
        [[link]]
        from = "a"
        to = "b"
        rate = "2mbit"
        [[event]]
        at = "2s"
        action = "kill"
        node = "b"
        restart-after = "1s"
        [[event]]
        at = "1s"
        action = "partition"
        nodes = ["c"]
    "#;

    #[test]
    fn a_mesh_gives_every_node_a_link_to_each_peer() {
        let swarm = parse(THREE, "x").unwrap();
        assert_eq!(swarm.name, "t");
        let a = &swarm.nodes[0];
        assert_eq!(a.addr, Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(a.label, "t.a");
        let links: Vec<&String> = a
            .run_args
            .iter()
            .skip_while(|x| *x != "--link")
            .filter(|x| x.starts_with("to="))
            .collect();
        // a -> b: the [[link]]'s rate replaces a's own; a -> c: a's own rate.
        assert_eq!(links[0], "to=198.51.100.2,egress-rate=2mbit");
        assert_eq!(links[1], "to=198.51.100.3,egress-rate=10mbit");
        // c has no limits: its links hold a zero loss, so that they exist and can change.
        assert!(swarm.nodes[2]
            .run_args
            .contains(&"to=198.51.100.1,loss=0%".to_string()));
        assert!(swarm.nodes[1].run_args.contains(&"0.5".to_string()));
        // Events in time order.
        assert_eq!(swarm.events[0].action, Action::Partition { nodes: vec![2] });
        assert_eq!(
            swarm.events[1].action,
            Action::Kill {
                node: 1,
                restart_after: Some(Duration::from_secs(1))
            }
        );
    }

    #[test]
    fn bad_input_names_the_field_and_the_accepted_values() {
        let err = |text: &str| parse(text, "x").unwrap_err().0;
        let node = "[[node]]\nname = \"a\"\ncommand = [\"true\"]\n";
        assert!(err(&format!("{node}colour = 1\n")).contains("unknown field `colour`"));
        let e = err(&format!(
            "{node}[[event]]\nat = \"1s\"\naction = \"explode\"\n"
        ));
        assert!(
            e.contains("'explode' for action") && e.contains("kill, restart"),
            "{e}"
        );
        let e = err(&format!(
            "{node}[[event]]\nat = \"1s\"\naction = \"kill\"\nnode = \"zz\"\n"
        ));
        assert!(
            e.contains("'zz' for node") && e.contains("accepted: a"),
            "{e}"
        );
        let e = err(&format!(
            "{node}[[event]]\nat = \"1s\"\naction = \"heal\"\nnode = \"a\"\n"
        ));
        assert!(e.contains("'node' is not a field of a heal event"), "{e}");
        let e = err(&format!(
            "{node}[[event]]\nat = \"soon\"\naction = \"heal\"\n"
        ));
        assert!(e.contains("[[event]] 1") && e.contains("'soon'"), "{e}");
        assert!(err("topology = \"ring\"\n").contains("'ring' for topology"));
        assert!(err(&format!("{node}{node}")).contains("given twice"));
        assert!(err("[[node]]\nname = \"1a\"\ncommand = [\"x\"]\n").contains("'1a'"));
        assert!(err("").contains("no [[node]]"));
    }

    #[test]
    fn until_and_degrade_are_checked() {
        let two = "[[node]]\nname = \"a\"\ncommand = [\"x\"]\n[[node]]\nname = \"b\"\ncommand = [\"x\"]\n";
        let swarm = parse(&format!("until = \"b\"\n{two}"), "x").unwrap();
        assert_eq!(swarm.until, Some(1));
        let err = parse(&format!("until = \"c\"\n{two}"), "x").unwrap_err().0;
        assert!(err.contains("'c' for until"), "{err}");
        let degrade = |extra: &str| {
            parse(
                &format!(
                    "{two}[[event]]\nat = \"1s\"\naction = \"degrade\"\nfrom = \"a\"\nto = \"b\"\n{extra}"
                ),
                "x",
            )
        };
        assert!(degrade("")
            .unwrap_err()
            .0
            .contains("needs 'rate' or 'loss'"));
        assert!(degrade("loss = \"150%\"\n").is_err());
        assert!(degrade("rate = \"10kbps\"\n").is_err());
        let ok = degrade("rate = \"1mbit\"\nloss = \"5%\"\noneway = true\n").unwrap();
        assert_eq!(
            ok.events[0].action,
            Action::Degrade {
                from: 0,
                to: 1,
                settings: vec!["egress-rate=1mbit".into(), "loss=5%".into()],
                oneway: true
            }
        );
    }

    #[test]
    fn links_topology_loses_every_packet_between_unlinked_pairs() {
        let text = r#"
            topology = "links"
            [[node]]
            name = "a"
            command = ["true"]
            [[node]]
            name = "b"
            command = ["true"]
            [[node]]
            name = "c"
            command = ["true"]
            [[link]]
            from = "a"
            to = "b"
            loss = "1%"
        "#;
        let swarm = parse(text, "x").unwrap();
        let a = &swarm.nodes[0].run_args;
        assert!(a.contains(&"to=198.51.100.2,loss=1%".to_string()), "{a:?}");
        assert!(
            a.contains(&"to=198.51.100.3,loss=100%".to_string()),
            "{a:?}"
        );
    }
}
