//! A swarm's network: a namespace per node and a hub namespace holding a Linux bridge, each
//! node joined to it by a veth pair (the node's end is its `eth0`). All of it lives in
//! namespaces of nbt's own, named `nbt-swarm-SWARM-hub` and `nbt-swarm-SWARM-NODE` (so that
//! `nbt cleanup` and a person can find them); nothing is made in the host's namespace.
//!
//! A partition moves the hub ends of the cut-off nodes to a second bridge: they still reach
//! each other, and nothing else, whatever their sockets do; healing moves them back. This
//! is done in the hub rather than by the nodes' shapers so that it holds for every packet
//! (ARP too) and needs nothing from the nodes' runs.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// The prefix of every namespace a swarm makes.
pub const NETNS_PREFIX: &str = "nbt-swarm-";

/// The namespace of a swarm's hub.
pub fn hub_name(swarm: &str) -> String {
    format!("{NETNS_PREFIX}{swarm}-hub")
}

/// The namespace of one node.
pub fn node_netns(swarm: &str, node: &str) -> String {
    format!("{NETNS_PREFIX}{swarm}-{node}")
}

/// Runs `ip ARGS`; its error output in the error.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2), which nbt swarm needs")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The swarm's namespaces, removed on drop (deleting a node's namespace deletes its veth
/// pair; deleting the hub deletes the bridges).
pub struct SwarmNet {
    pub hub: String,
    pub nodes: Vec<String>,
    made: Vec<String>,
}

impl SwarmNet {
    /// Makes the hub and one namespace per node (`names`, `addrs`: in the same order). A
    /// namespace of that name already there means the swarm runs already (or a dead one left
    /// it: `nbt cleanup`), and is refused.
    pub fn create(swarm: &str, names: &[String], addrs: &[Ipv4Addr], prefix: u8) -> Result<Self> {
        let hub = hub_name(swarm);
        let nodes: Vec<String> = names.iter().map(|n| node_netns(swarm, n)).collect();
        for ns in std::iter::once(&hub).chain(&nodes) {
            if std::path::Path::new("/run/netns").join(ns).exists() {
                bail!(
                    "network namespace {ns} exists already: swarm '{swarm}' is running, or a \
                     swarm whose nbt died left it (`nbt cleanup` removes it)"
                );
            }
        }
        let mut net = SwarmNet {
            hub: hub.clone(),
            nodes: nodes.clone(),
            made: Vec::new(),
        };
        ip(&["netns", "add", &hub])?;
        net.made.push(hub.clone());
        for bridge in ["br0", "br1"] {
            ip(&["-n", &hub, "link", "add", bridge, "type", "bridge"])?;
            ip(&["-n", &hub, "link", "set", bridge, "up"])?;
        }
        for (i, ns) in nodes.iter().enumerate() {
            ip(&["netns", "add", ns])?;
            net.made.push(ns.clone());
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/{prefix}", addrs[i]),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The namespace file of node `i`, to setns(2) into.
    pub fn open(&self, i: usize) -> Result<std::fs::File> {
        let path = std::path::Path::new("/run/netns").join(&self.nodes[i]);
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Cuts `side` off from the rest: their hub ports go to the second bridge.
    pub fn partition(&self, side: &[usize]) -> Result<()> {
        self.heal()?;
        side.iter().try_for_each(|&i| self.plug(i, "br1"))
    }

    /// Every port back on the first bridge.
    pub fn heal(&self) -> Result<()> {
        (0..self.nodes.len()).try_for_each(|i| self.plug(i, "br0"))
    }

    /// Node `i`'s hub port onto `bridge`.
    fn plug(&self, i: usize, bridge: &str) -> Result<()> {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("p{i}"),
            "master",
            bridge,
        ])
    }

    /// Removes every namespace made; what could not be removed, in the error.
    pub fn remove(&mut self) -> Result<()> {
        let mut failed = Vec::new();
        for ns in self.made.drain(..).rev() {
            if let Err(err) = ip(&["netns", "del", &ns]) {
                failed.push(format!("{err:#}"));
            }
        }
        if !failed.is_empty() {
            bail!("removing the swarm's namespaces: {}", failed.join("; "));
        }
        Ok(())
    }
}

impl Drop for SwarmNet {
    fn drop(&mut self) {
        if let Err(err) = self.remove() {
            eprintln!("nbt swarm: {err:#}");
        }
    }
}

/// The namespaces of swarms (`nbt-swarm-*`) under /run/netns, for `nbt cleanup`.
pub fn swarm_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect()
}
