//! What the gate charged and refused, as nbt tells it: a line on stderr the first time each
//! destination is refused (from the kernel's events, which carry the caller's pid), and the
//! calls charged and refused per destination (from the kernel's counts).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use crate::enforce::ledger::{format_amount, DestinationCalls, PICO_PER_MICRO};
use anyhow::{anyhow, Result};
use aya::maps::perf::{PerfEvent, PerfEventArray, PerfEventArrayBuffer};
use aya::maps::{HashMap, MapData};
use aya::Ebpf;
use nbt_common::gate::{
    BlockedEvent, DestCounts, DestKey, BLOCKED_CONNECT, BLOCKED_EGRESS, BLOCKED_REQUEST,
    GATE_BY_DEST_MAP, GATE_EVENTS_MAP,
};

/// Connections torn down, per destination ("addr:port").
pub type TornDown = BTreeMap<String, u64>;

/// What the kernel counted past the destinations it keeps one by one.
const OTHER_DESTINATIONS: &str = "other destinations";

/// Reads refusal events from every CPU's perf buffer and logs each kind of refusal of each
/// destination once.
pub struct BlockedLog {
    buffers: Vec<PerfEventArrayBuffer<MapData>>,
    logged: BTreeSet<(String, u32)>,
}

/// An address as the kernel's structs hold it: `family` 4 in the first 4 bytes, else IPv6.
pub(super) fn ip(family: u32, bytes: [u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

/// "addr:port", "[addr]:port" for IPv6: how the summary names a destination.
pub(super) fn destination_text(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

impl BlockedLog {
    pub fn open(ebpf: &mut Ebpf) -> Result<BlockedLog> {
        let map = ebpf
            .take_map(GATE_EVENTS_MAP)
            .ok_or_else(|| anyhow!("{GATE_EVENTS_MAP} missing"))?;
        let mut events = PerfEventArray::try_from(map)?;
        let cpus = aya::util::online_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let buffers = cpus
            .into_iter()
            .map(|cpu| events.open(cpu, None))
            .collect::<Result<_, _>>()?;
        Ok(BlockedLog {
            buffers,
            logged: BTreeSet::new(),
        })
    }

    /// Takes what the kernel reported since the last call.
    pub fn drain(&mut self) {
        let mut new = Vec::new();
        for buffer in &mut self.buffers {
            buffer.for_each(|event| {
                if let PerfEvent::Sample { head, tail } = event {
                    let mut bytes = head.to_vec();
                    bytes.extend_from_slice(tail);
                    if bytes.len() >= size_of::<BlockedEvent>() {
                        // SAFETY: the kernel wrote a BlockedEvent, a plain #[repr(C)] value.
                        new.push(unsafe {
                            std::ptr::read_unaligned(bytes.as_ptr().cast::<BlockedEvent>())
                        });
                    }
                }
            });
        }
        for event in new {
            let dest = destination_text(ip(event.family, event.addr), event.port as u16);
            if !self.logged.insert((dest.clone(), event.kind)) {
                continue;
            }
            let what = match event.kind {
                BLOCKED_CONNECT => "connect to",
                BLOCKED_EGRESS => "packet to",
                BLOCKED_REQUEST => "request (its connection is torn down) to",
                _ => "datagram to",
            };
            let comm = String::from_utf8_lossy(&event.comm);
            let who = if event.pid == 0 {
                String::new()
            } else {
                format!(" by pid {} ({})", event.pid, comm.trim_end_matches('\0'))
            };
            eprintln!(
                "nbt: balance {}: refused {what} {dest}{who}; more of these are counted, not logged",
                format_amount(event.balance_pico / PICO_PER_MICRO)
            );
        }
    }
}

/// Adds the "other destinations" entry, which the kernel counts into once the map is full.
pub fn add_other_destinations(ebpf: &mut Ebpf) -> Result<()> {
    let mut map: HashMap<&mut MapData, DestKey, DestCounts> = HashMap::try_from(
        ebpf.map_mut(GATE_BY_DEST_MAP)
            .ok_or_else(|| anyhow!("{GATE_BY_DEST_MAP} missing"))?,
    )?;
    map.insert(DestKey::default(), DestCounts::default(), 0)?;
    Ok(())
}

/// Calls charged, refused and torn down per destination.
pub fn destinations(
    ebpf: &Ebpf,
    torn_down: &TornDown,
) -> Result<BTreeMap<String, DestinationCalls>> {
    let map: HashMap<&MapData, DestKey, DestCounts> = HashMap::try_from(
        ebpf.map(GATE_BY_DEST_MAP)
            .ok_or_else(|| anyhow!("{GATE_BY_DEST_MAP} missing"))?,
    )?;
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (key, counts) = entry?;
        if counts == DestCounts::default() {
            continue;
        }
        let name = match key.family {
            4 | 6 => destination_text(ip(key.family, key.addr), key.port as u16),
            _ => OTHER_DESTINATIONS.to_string(),
        };
        out.insert(
            name,
            DestinationCalls {
                charged: counts.calls,
                refused: counts.refused,
                torn_down: 0,
            },
        );
    }
    for (name, count) in torn_down {
        out.entry(name.clone()).or_default().torn_down = *count;
    }
    Ok(out)
}
