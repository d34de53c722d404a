//! `gate`: the destinations whose calls the balance pays for, the programs that enforce it
//! (`nbt-ebpf/src/gate.rs`), the teardown of refused connections (`teardown.rs`), and the log
//! of what was charged and refused (`log.rs`).

mod log;
mod teardown;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, Map, MapData};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::Ebpf;
use nbt_common::gate::{
    GateConfig, KernelLedger, V4Key, V6Key, CREDIT, GATE_CONFIG_MAP, GATE_V4_MAP, GATE_V6_MAP,
    KERNEL_LEDGER_MAP, TIME_DEBIT, USER_LEDGER_MAP,
};
use serde::{Deserialize, Serialize};

pub use self::log::{BlockedLog, TornDown};
pub use self::teardown::{path as teardown_path, Teardowns};
use crate::enforce::ledger::{self, LedgerSummary, Prices, PICO_PER_MICRO};
use crate::error::{PlanError, UsageError};
use crate::sys::loader;
use crate::sys::pin::Pins;

pub const GATE_FORMS: &str = "all (every destination but loopback), host[:port], IPv4 or IPv6 \
     address, CIDR (10.0.0.0/8, 2001:db8::/32), CIDR:port (10.0.0.0/8:443), [IPv6]:port or \
     [IPv6/len]:port; several separated by commas; ports 1 to 65535";

/// One `--gate` destination as given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    All,
    Net {
        addr: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
    Host {
        name: String,
        port: Option<u16>,
    },
}

fn usage(flag: &str, text: &str, problem: impl Into<String>) -> UsageError {
    UsageError {
        flag: flag.into(),
        value: text.into(),
        problem: problem.into(),
        accepted: GATE_FORMS,
    }
}

fn parse_port(flag: &str, text: &str, port: &str) -> Result<u16, UsageError> {
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(usage(
            flag,
            text,
            format!("port '{port}' is not in 1..65535"),
        )),
        Ok(p) => Ok(p),
    }
}

fn parse_net(flag: &str, text: &str, net: &str, port: Option<u16>) -> Result<Rule, UsageError> {
    let (addr, prefix) = match net.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (net, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| usage(flag, text, format!("'{addr}' is not an IP address")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(len) => match len.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => {
                return Err(usage(
                    flag,
                    text,
                    format!("prefix length '{len}' is not in 0..{max}"),
                ))
            }
        },
    };
    Ok(Rule::Net { addr, prefix, port })
}

/// Parses one destination of `--gate`.
pub fn parse_rule(flag: &str, text: &str) -> Result<Rule, UsageError> {
    let text = text.trim();
    if text == "all" {
        return Ok(Rule::All);
    }
    if text.is_empty() {
        return Err(usage(flag, text, "an empty destination"));
    }
    // [IPv6]:port or [IPv6/len]:port
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| usage(flag, text, "no closing ]"))?;
        let port = match after {
            "" => None,
            p => Some(parse_port(
                flag,
                text,
                p.strip_prefix(':')
                    .ok_or_else(|| usage(flag, text, "expected :port after ]"))?,
            )?),
        };
        return parse_net(flag, text, inside, port);
    }
    // A bare IPv6 address or network: more than one ':'.
    if text.matches(':').count() > 1 {
        return parse_net(flag, text, text, None);
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(flag, text, port)?)),
        None => (text, None),
    };
    // Digits and dots only is an IPv4 address, even a malformed one, never a host name.
    let looks_v4 = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if host.contains('/') || looks_v4 || host.parse::<IpAddr>().is_ok() {
        return parse_net(flag, text, host, port);
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(usage(
            flag,
            text,
            format!("'{host}' is neither an address nor a host name"),
        ));
    }
    Ok(Rule::Host {
        name: host.to_string(),
        port,
    })
}

pub fn parse_rules(flag: &str, text: &str) -> Result<Vec<Rule>, UsageError> {
    text.split(',').map(|part| parse_rule(flag, part)).collect()
}

/// The addresses a host name has now (A and AAAA), or why there are none.
pub fn resolve(name: &str) -> Result<Vec<IpAddr>, String> {
    match (name, 0).to_socket_addrs() {
        Ok(addrs) => {
            let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            ips.sort();
            ips.dedup();
            if ips.is_empty() {
                Err(format!("'{name}' has no address"))
            } else {
                Ok(ips)
            }
        }
        Err(err) => Err(format!("cannot resolve '{name}': {err}")),
    }
}

/// Checks that every host name resolves now; a gate on a name nobody can reach is a typo.
pub fn check_resolvable(flag: &str, rules: &[Rule]) -> Result<(), UsageError> {
    for rule in rules {
        if let Rule::Host { name, .. } = rule {
            resolve(name).map_err(|problem| usage(flag, name, problem))?;
        }
    }
    Ok(())
}

fn v4_key(addr: Ipv4Addr, prefix: u8, port: Option<u16>) -> Key<V4Key> {
    Key::new(
        16 + u32::from(prefix),
        V4Key {
            port: port.unwrap_or(0).to_be_bytes(),
            addr: addr.octets(),
        },
    )
}

fn v6_key(addr: Ipv6Addr, prefix: u8, port: Option<u16>) -> Key<V6Key> {
    Key::new(
        16 + u32::from(prefix),
        V6Key {
            port: port.unwrap_or(0).to_be_bytes(),
            addr: addr.octets(),
        },
    )
}

/// Writes the rules into the tries (host names resolved now). Returns whether `all` was asked.
/// All or nothing: when the addresses not gated yet would not all fit in a trie, nothing is
/// added and the error says so; an address is never left ungated quietly.
pub fn install_rules(ebpf: &mut Ebpf, rules: &[Rule]) -> Result<bool> {
    let mut all = false;
    let mut nets: Vec<(IpAddr, u8, Option<u16>)> = Vec::new();
    for rule in rules {
        match rule {
            Rule::All => all = true,
            Rule::Net { addr, prefix, port } => nets.push((*addr, *prefix, *port)),
            Rule::Host { name, port } => {
                for ip in resolve(name).map_err(|e| anyhow!("--gate: {e}"))? {
                    nets.push((ip, if ip.is_ipv4() { 32 } else { 128 }, *port));
                }
            }
        }
    }
    let mut v4_keys = Vec::new();
    let mut v6_keys = Vec::new();
    for (addr, prefix, port) in &nets {
        match addr {
            IpAddr::V4(a) => v4_keys.push(v4_key(*a, *prefix, *port)),
            // An IPv4-mapped IPv6 network is the IPv4 network it carries.
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(a) if *prefix >= 96 => v4_keys.push(v4_key(a, prefix - 96, *port)),
                Some(_) => {}
                None => v6_keys.push(v6_key(*a, *prefix, *port)),
            },
        }
    }
    // Both checked before either is written.
    let v4_missing = missing(ebpf, GATE_V4_MAP, v4_keys, "IPv4")?;
    let v6_missing = missing(ebpf, GATE_V6_MAP, v6_keys, "IPv6")?;
    insert(ebpf, GATE_V4_MAP, v4_missing)?;
    insert(ebpf, GATE_V6_MAP, v6_missing)?;
    Ok(all)
}

/// More addresses to gate than a trie holds.
#[derive(Debug)]
pub struct GateFull(String);

impl std::fmt::Display for GateFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GateFull {}

/// The keys of `keys` no entry of the trie `name` covers yet; an error when they would not fit.
fn missing<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    keys: Vec<Key<K>>,
    family: &str,
) -> Result<Vec<Key<K>>> {
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| anyhow!("{name} missing"))?;
    let capacity = match &map {
        Map::LpmTrie(data) => data.info()?.max_entries() as usize,
        _ => return Err(anyhow!("{name} is not an LPM trie")),
    };
    let trie: LpmTrie<&mut MapData, K, u32> = LpmTrie::try_from(map)?;
    let missing: Vec<Key<K>> = keys
        .into_iter()
        .filter(|key| trie.get(key, 0).is_err())
        .collect();
    let present = trie.keys().count();
    if present + missing.len() > capacity {
        return Err(GateFull(format!(
            "--gate: {} more {family} networks to gate ({present} already), more than the \
             gate holds ({capacity}); nbt refuses rather than leave an address ungated \
             (gate a network, e.g. 203.0.113.0/24, instead of its addresses)",
            missing.len()
        ))
        .into());
    }
    Ok(missing)
}

fn insert<K: aya::Pod>(ebpf: &mut Ebpf, name: &str, keys: Vec<Key<K>>) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, K, u32> = LpmTrie::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| anyhow!("{name} missing"))?,
    )?;
    for key in &keys {
        trie.insert(key, 1, 0)?;
    }
    Ok(())
}

/// The gate's last resort when a re-resolved host has more addresses than the tries hold:
/// every destination is gated from now on (fail closed).
pub fn gate_everything(ebpf: &mut Ebpf) -> Result<()> {
    let mut config = Array::<&mut MapData, GateConfig>::try_from(
        ebpf.map_mut(GATE_CONFIG_MAP)
            .ok_or_else(|| anyhow!("{GATE_CONFIG_MAP} missing"))?,
    )?;
    let current = config.get(&0, 0)?;
    config.set(0, GateConfig { all: 1, ..current }, 0)?;
    Ok(())
}

/// Kernel ids of the ledger maps, for `nbt balance` and `nbt ps`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LedgerIds {
    pub user_ledger: u32,
    pub kernel_ledger: u32,
}

fn map_id(ebpf: &Ebpf, name: &str) -> Result<u32> {
    match ebpf.map(name) {
        Some(Map::Array(data)) => Ok(data.info()?.id()),
        _ => Err(anyhow!("BPF map {name} missing from nbt's object")),
    }
}

/// Configures the gate, writes the starting balance, and attaches the five gate programs.
/// Start [`Teardowns`] before the workload: refused connections go on its ring.
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup_dir: &Path,
    prices: &Prices,
    rules: &[Rule],
    pins: &mut Pins,
) -> Result<LedgerIds> {
    let all = install_rules(ebpf, rules)?;
    let config = GateConfig {
        enabled: 1,
        all: u32::from(all),
        price_call_pico: (prices.call_micro * PICO_PER_MICRO) as u64,
        price_egress_pico_per_byte: prices.egress_pico_per_byte,
        call_gap_ns: prices.call_gap_ns,
    };
    Array::<&mut MapData, GateConfig>::try_from(
        ebpf.map_mut(GATE_CONFIG_MAP)
            .ok_or_else(|| anyhow!("{GATE_CONFIG_MAP} missing"))?,
    )?
    .set(0, config, 0)?;
    let mut user: Array<&mut MapData, i64> = Array::try_from(
        ebpf.map_mut(USER_LEDGER_MAP)
            .ok_or_else(|| anyhow!("{USER_LEDGER_MAP} missing"))?,
    )?;
    user.set(CREDIT, prices.balance_micro * PICO_PER_MICRO, 0)?;
    user.set(TIME_DEBIT, 0, 0)?;
    log::add_other_destinations(ebpf)?;

    let cgroup = loader::open_cgroup(cgroup_dir)?;
    for name in [
        "gate_connect4",
        "gate_connect6",
        "gate_sendmsg4",
        "gate_sendmsg6",
    ] {
        let program: &mut CgroupSockAddr = loader::program(ebpf, name)?;
        program
            .load()
            .with_context(|| format!("the kernel refused to load BPF program {name}"))?;
        let link = program
            .attach(&cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching BPF program {name} to {}", cgroup_dir.display()))?;
        pins.add(name, program.take_link(link)?)?;
    }
    let egress: &mut aya::programs::CgroupSkb = loader::program(ebpf, "gate_egress")?;
    egress
        .load()
        .context("the kernel refused to load BPF program gate_egress")?;
    let link = egress
        .attach(
            &cgroup,
            aya::programs::CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .with_context(|| {
            format!(
                "attaching BPF program gate_egress to {}",
                cgroup_dir.display()
            )
        })?;
    pins.add("gate_egress", egress.take_link(link)?)?;
    Ok(LedgerIds {
        user_ledger: map_id(ebpf, USER_LEDGER_MAP)?,
        kernel_ledger: map_id(ebpf, KERNEL_LEDGER_MAP)?,
    })
}

fn open_array<V: aya::Pod>(id: u32) -> Result<Map> {
    let data =
        MapData::from_id(id).with_context(|| format!("opening BPF map id {id} of the run"))?;
    let _ = std::marker::PhantomData::<V>;
    Ok(Map::from_map_data(data)?)
}

/// The kernel id of the gate's configuration map (its prices), for a schedule's price steps.
pub fn config_map_id(ebpf: &Ebpf) -> Result<u32> {
    map_id(ebpf, GATE_CONFIG_MAP)
}

/// Changes a live run's prices per call and per byte; the next call or packet pays them.
pub fn set_prices_by_id(
    id: u32,
    call_micro: Option<i64>,
    egress_pico_per_byte: Option<u64>,
) -> Result<()> {
    let mut map = open_array::<GateConfig>(id)?;
    let mut config_map: Array<&mut MapData, GateConfig> = Array::try_from(&mut map)?;
    let mut config = config_map.get(&0, 0)?;
    if let Some(micro) = call_micro {
        config.price_call_pico = (micro * PICO_PER_MICRO) as u64;
    }
    if let Some(pico) = egress_pico_per_byte {
        config.price_egress_pico_per_byte = pico;
    }
    config_map.set(0, config, 0)?;
    Ok(())
}

/// Reads a run's ledger by map ids: (credit, time debit, kernel ledger), in pico-units.
pub fn read_ledger(ids: &LedgerIds) -> Result<(i64, i64, KernelLedger)> {
    let user_map = open_array::<i64>(ids.user_ledger)?;
    let user: Array<&MapData, i64> = Array::try_from(&user_map)?;
    let kernel_map = open_array::<KernelLedger>(ids.kernel_ledger)?;
    let kernel: Array<&MapData, KernelLedger> = Array::try_from(&kernel_map)?;
    Ok((
        user.get(&CREDIT, 0)?,
        user.get(&TIME_DEBIT, 0)?,
        kernel.get(&0, 0)?,
    ))
}

pub fn balance_pico(credit: i64, time_debit: i64, kernel: &KernelLedger) -> i64 {
    ledger::balance_pico(
        credit,
        time_debit,
        kernel.call_debit_pico,
        kernel.egress_debit_pico,
    )
}

/// `nbt balance RUN add AMOUNT`: raises the run's credit; the gate reopens with the next call.
/// A balance that would leave ±[`ledger::MAX_BALANCE_MICRO`] is refused (a [`PlanError`], exit
/// status 2), the credit unchanged.
pub fn top_up(ids: &LedgerIds, micro: i64) -> Result<i64> {
    let (credit, time, kernel) = read_ledger(ids)?;
    let next = ledger::credit_after(credit, balance_pico(credit, time, &kernel), micro)
        .map_err(|why| PlanError(format!("refused: {why}")))?;
    let mut user_map = open_array::<i64>(ids.user_ledger)?;
    let mut user: Array<&mut MapData, i64> = Array::try_from(&mut user_map)?;
    user.set(CREDIT, next, 0)?;
    let (credit, time, kernel) = read_ledger(ids)?;
    Ok(balance_pico(credit, time, &kernel) / PICO_PER_MICRO)
}

/// Charges wall time: the time debit is written whole each time (no drift, no race with the
/// kernel, which never writes it).
pub fn charge_time(ids: &LedgerIds, hour_micro: i64, seconds: f64) -> Result<()> {
    let debit = ledger::time_debit_pico(hour_micro, seconds);
    let mut user_map = open_array::<i64>(ids.user_ledger)?;
    let mut user: Array<&mut MapData, i64> = Array::try_from(&mut user_map)?;
    user.set(TIME_DEBIT, debit, 0)?;
    Ok(())
}

/// The run's ledger at the end.
pub fn summarize(
    ids: &LedgerIds,
    prices: &Prices,
    ebpf: &Ebpf,
    torn_down: &TornDown,
) -> Result<LedgerSummary> {
    let (credit, time, kernel) = read_ledger(ids)?;
    Ok(LedgerSummary {
        balance_start_micro: prices.balance_micro,
        balance_end_micro: balance_pico(credit, time, &kernel) / PICO_PER_MICRO,
        topped_up_micro: credit / PICO_PER_MICRO - prices.balance_micro,
        charged_calls_micro: kernel.call_debit_pico as i64 / PICO_PER_MICRO,
        charged_egress_micro: kernel.egress_debit_pico as i64 / PICO_PER_MICRO,
        charged_time_micro: time / PICO_PER_MICRO,
        calls: kernel.calls,
        requests: kernel.requests,
        egress_bytes: kernel.egress_bytes,
        blocked_calls: kernel.blocked_calls,
        refused_requests: kernel.refused_requests,
        connections_torn_down: torn_down.values().sum(),
        blocked_packets: kernel.blocked_packets,
        call_gap_ms: prices.call_gap_ns as f64 / 1e6,
        destinations: log::destinations(ebpf, torn_down)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_in_every_form() {
        let f = "--gate";
        assert_eq!(parse_rule(f, "all"), Ok(Rule::All));
        assert_eq!(
            parse_rule(f, "10.0.0.0/8:443"),
            Ok(Rule::Net {
                addr: "10.0.0.0".parse().unwrap(),
                prefix: 8,
                port: Some(443)
            })
        );
        assert_eq!(
            parse_rule(f, "127.0.0.1:8080"),
            Ok(Rule::Net {
                addr: "127.0.0.1".parse().unwrap(),
                prefix: 32,
                port: Some(8080)
            })
        );
        assert_eq!(
            parse_rule(f, "2001:db8::/32"),
            Ok(Rule::Net {
                addr: "2001:db8::".parse().unwrap(),
                prefix: 32,
                port: None
            })
        );
        assert_eq!(
            parse_rule(f, "[::1]:8080"),
            Ok(Rule::Net {
                addr: "::1".parse().unwrap(),
                prefix: 128,
                port: Some(8080)
            })
        );
        assert_eq!(
            parse_rule(f, "[2001:db8::/48]:443"),
            Ok(Rule::Net {
                addr: "2001:db8::".parse().unwrap(),
                prefix: 48,
                port: Some(443)
            })
        );
        assert_eq!(
            parse_rule(f, "api.example.com:443"),
            Ok(Rule::Host {
                name: "api.example.com".into(),
                port: Some(443)
            })
        );
        assert_eq!(parse_rules(f, "all,10.1.2.3").unwrap().len(), 2);
    }

    #[test]
    fn bad_destinations_name_the_problem() {
        for (text, problem) in [
            ("10.0.0.0/33", "prefix length '33'"),
            ("300.1.1.1", "'300.1.1.1' is not an IP address"),
            ("10.0.0.1:0", "port '0' is not in 1..65535"),
            ("10.0.0.1:70000", "port '70000'"),
            ("[::1", "no closing ]"),
            ("[::1]8080", "expected :port"),
            ("host name", "neither an address nor a host name"),
            ("", "an empty destination"),
            ("2001:db8::/200", "prefix length '200'"),
        ] {
            let err = parse_rule("--gate", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
        assert!(check_resolvable(
            "--gate",
            &[Rule::Host {
                name: "no-such-host.invalid".into(),
                port: None
            }]
        )
        .unwrap_err()
        .problem
        .contains("cannot resolve 'no-such-host.invalid'"));
        assert!(check_resolvable(
            "--gate",
            &[Rule::Host {
                name: "localhost".into(),
                port: None
            }]
        )
        .is_ok());
    }
}
