//! `latency`: `--latency` and `--jitter` through earliest departure time: the fq qdisc at the
//! root of every interface of nbt's network namespace but loopback, and the `delay_egress` tc
//! program that sets the departure time of the run's packets (`nbt-ebpf/src/edt.rs`); with
//! `--impair-direction ingress` or `both`, or `--ingress-queue`, the `receive_ingress` program
//! beside it. `--ingress-queue` adds an ifb device with fq and `queue_ingress`
//! (`nbt-ebpf/src/edt/queue.rs`). All are taken off when the run ends: the programs with their
//! links, fq and the ifb by [`LatencyGuard`].

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{Array, MapData};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions};
use aya::programs::{Link as _, SchedClassifier, TcAttachType};
use aya::Ebpf;
use nbt_common::edt::{EdtConfig, EdtRun, EDT_CONFIG_MAP, EDT_RUN_MAP};
use serde::{Deserialize, Serialize};

use crate::enforce::clsact;
use crate::enforce::shaper::probability;
use crate::error::PlanError;
use crate::sys::netns::{self, NetnsId, Reached};
use crate::sys::{loader, netlink};

/// fq drops packets scheduled further ahead than its horizon (10 s by default). Every path that
/// sets a delay (`nbt run`, `nbt set`, a schedule's latency step) checks latency plus jitter
/// against it with [`Latency::checked`]; `delay_egress` relies on jitter <= 10 s (its draw
/// multiplies a u32 by 2 x jitter + 1 < 2^35, split so that no product passes 2^64).
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// How long past the run's longest delay [`LatencyGuard::drain`] waits before fq comes off: fq's
/// watchdog timer fires late on a busy or emulated machine.
const DRAIN_MARGIN: Duration = Duration::from_millis(200);

/// fq's limits, in packets, per flow and in all (its defaults: 100 and 10,000). Held packets
/// belong to no socket (`nbt-ebpf/src/edt.rs`), so the sender's buffer no longer bounds them:
/// a flow holds its rate times the delay, 417 packets of 1,500 bytes at 100mbit with 50 ms
/// added. Beyond the limits fq drops, as netem does beyond its own (1,000 packets in all).
const FQ_LIMITS: [(u16, u32); 2] = [
    (netlink::TCA_FQ_FLOW_PLIMIT, 10_000),
    (netlink::TCA_FQ_PLIMIT, 100_000),
];

/// The longest time any of `latencies` holds a packet: its latency plus its jitter.
pub fn longest<'a>(latencies: impl IntoIterator<Item = &'a Latency>) -> Duration {
    let nanos = latencies
        .into_iter()
        .map(|l| l.latency_ns.saturating_add(l.jitter_ns))
        .max();
    Duration::from_nanos(nanos.unwrap_or(0))
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub latency_ns: u64,
    pub jitter_ns: u64,
    /// netem's delay correlation (a fraction): each jitter draw leans on the last by this much.
    #[serde(default)]
    pub correlation: f64,
}

impl Latency {
    /// `latency` and `jitter` when their sum is within [`MAX_DELAY`] (no overflow on the way);
    /// else the refusal. `given`: the (name, text) of the latency and of the jitter, each when it
    /// was given: the refusal names the latency when it alone is too long, else the jitter.
    pub fn checked(
        latency: Duration,
        jitter: Duration,
        given: [Option<(&str, &str)>; 2],
    ) -> Result<Latency, PlanError> {
        match latency.checked_add(jitter) {
            Some(total) if total <= MAX_DELAY => Ok(Latency {
                // Both at most 10 s: 10^10 ns.
                latency_ns: latency.as_nanos() as u64,
                jitter_ns: jitter.as_nanos() as u64,
                correlation: 0.0,
            }),
            _ => {
                let [latency_given, jitter_given] = given;
                let (name, text) = if latency > MAX_DELAY {
                    latency_given.or(jitter_given)
                } else {
                    jitter_given.or(latency_given)
                }
                .unwrap_or(("--latency", ""));
                Err(PlanError(format!(
                    "invalid value '{text}' for {name}: latency plus jitter above 10 s, the fq \
                     qdisc's horizon (it drops packets scheduled later)"
                )))
            }
        }
    }
}

/// The qdiscs a run put on interfaces: fq at the root and clsact; and its tc filters where the
/// clsact qdisc was someone else's (taking our clsact off takes our filter with it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qdiscs {
    pub fq: Vec<(u32, String)>,
    /// nbt's clsact qdiscs the run used (added, or found added by another run; `clsact.rs`).
    pub clsact: Vec<(u32, String)>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// `filters` holds every filter of the run. Records of older runs list only those on
    /// others' clsact qdiscs, and their own clsact qdiscs come off whatever is left on them.
    #[serde(default)]
    pub every_filter: bool,
    /// The network namespace of the interfaces; records of older runs have none (taken as the
    /// namespace nbt runs in).
    #[serde(default)]
    pub netns: Option<NetnsId>,
    /// The ifb device of the run's ingress queue (`--ingress-queue`), deleted with its qdiscs
    /// and program when the run ends.
    #[serde(default)]
    pub queue: Option<(u32, String)>,
}

/// A tc filter of `delay_egress` on an interface's egress (or of `receive_ingress` on its
/// ingress), as netlink names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub ifindex: u32,
    pub interface: String,
    pub priority: u16,
    pub handle: u32,
    /// On the interface's ingress (`receive_ingress`); records of older runs have none.
    #[serde(default)]
    pub ingress: bool,
}

impl Filter {
    fn attach_type(&self) -> (TcAttachType, &'static str) {
        match self.ingress {
            true => (TcAttachType::Ingress, "receive_ingress"),
            false => (TcAttachType::Egress, "delay_egress"),
        }
    }
}

impl Qdiscs {
    /// Runs `remove` (`Qdiscs::remove`, `Qdiscs::remove_when_sent`) on those still there, in
    /// their network namespace, from whichever namespace nbt runs in: `nbt cleanup` or `nbt zone
    /// remove` in another namespace must not take qdiscs off its own interfaces of the same
    /// index and name (a host's `eth0` is as likely index 2 as a container's).
    pub fn remove_in_their_netns(
        &self,
        remove: impl FnOnce(&Qdiscs) -> Vec<String>,
    ) -> Result<Reached<Vec<String>>> {
        let Some(id) = self.netns else {
            return Ok(Reached::Ran(remove(&self.still_there())));
        };
        let reached = netns::within(id, || remove(&self.still_there())).with_context(|| {
            format!(
                "entering the run's network namespace (net:[{}]) to take its qdiscs off",
                id.ino
            )
        })?;
        if let Reached::Gone = reached {
            let _lock = clsact::lock()?;
            for (ifindex, name) in &self.clsact {
                clsact::forget_in(id, *ifindex, name);
            }
        }
        Ok(reached)
    }

    /// Those whose interface still has the same index and name: an interface removed since
    /// took its qdiscs with it, and its index may now be another's (the marks of its clsact
    /// qdiscs are forgotten).
    pub fn still_there(&self) -> Qdiscs {
        // Loopback too: the ingress queue takes arriving packets from it.
        let mut current = netlink::interfaces();
        current.extend(netlink::loopback());
        let keep = |list: &Vec<(u32, String)>| -> Vec<(u32, String)> {
            list.iter()
                .filter(|i| current.contains(i))
                .cloned()
                .collect()
        };
        for (ifindex, name) in &self.clsact {
            if !current.contains(&(*ifindex, name.clone())) {
                clsact::forget(*ifindex, name);
            }
        }
        Qdiscs {
            every_filter: self.every_filter,
            netns: self.netns,
            queue: self
                .queue
                .clone()
                .filter(|(ifindex, name)| netlink::index_of(name) == Some(*ifindex)),
            fq: keep(&self.fq),
            clsact: keep(&self.clsact),
            filters: self
                .filters
                .iter()
                .filter(|f| current.contains(&(f.ifindex, f.interface.clone())))
                .cloned()
                .collect(),
        }
    }

    /// Takes them off again (the kernel's default root qdisc comes back); what failed.
    pub fn remove(&self) -> Vec<String> {
        let mut errors = self.remove_filters();
        errors.extend(self.remove_fq());
        errors.extend(self.remove_clsact());
        errors.extend(self.remove_queue());
        errors
    }

    /// As [`Qdiscs::remove`], but lets the packets fq holds leave first: taking fq off drops
    /// them, and a datagram sent in a run's last `latency` is still held when the run ends. It
    /// waits `longest` (the longest delay a packet was given) and a margin for the timer.
    /// Our clsact qdiscs stay until fq is gone: taking any clsact qdisc off resets every qdisc
    /// of its interface (`qdisc_graft` deactivates the device), fq's held packets with it.
    pub fn remove_when_sent(&self, longest: Duration) -> Vec<String> {
        let mut errors = self.remove_filters();
        // A fixed wait, not fq's qlen polled over netlink: on Debian's 5.10, reading it (a get
        // or a dump) while fq held packets at 100mbit + 50 ms locked a CPU up in the kernel for
        // 22 s in the VM tests.
        if !self.fq.is_empty() {
            std::thread::sleep(longest + DRAIN_MARGIN);
        }
        errors.extend(self.remove_fq());
        errors.extend(self.remove_clsact());
        errors.extend(self.remove_queue());
        errors
    }

    /// Deletes the ingress queue's device, with what it holds: the packets still queued for the
    /// run, which has ended.
    fn remove_queue(&self) -> Vec<String> {
        let Some((ifindex, name)) = &self.queue else {
            return Vec::new();
        };
        match netlink::delete_link(*ifindex) {
            Ok(()) => Vec::new(),
            Err(err) if err.raw_os_error() == Some(libc::ENODEV) => Vec::new(),
            Err(err) => vec![format!("deleting the ingress queue device {name}: {err}")],
        }
    }

    /// Takes the run's tc programs off.
    fn remove_filters(&self) -> Vec<String> {
        let _lock = match clsact::lock() {
            Ok(lock) => lock,
            Err(err) => return vec![format!("{err:#}")],
        };
        let mut errors = Vec::new();
        for filter in &self.filters {
            let (attach_type, program) = filter.attach_type();
            let detached = SchedClassifierLink::attached(
                &filter.interface,
                attach_type,
                filter.priority,
                filter.handle.into(),
                None,
            )
            .map_err(anyhow::Error::from)
            .and_then(|link| link.detach().map_err(anyhow::Error::from));
            if let Err(err) = detached {
                errors.push(format!(
                    "taking BPF program {program} off {}: {err}",
                    filter.interface
                ));
            }
        }
        errors
    }

    fn remove_fq(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for (ifindex, name) in &self.fq {
            if let Err(err) = netlink::delete_root(*ifindex) {
                errors.push(format!("taking fq off {name}: {err}"));
            }
        }
        errors
    }

    /// Takes nbt's clsact qdiscs off where no other run has programs on them.
    fn remove_clsact(&self) -> Vec<String> {
        let _lock = match clsact::lock() {
            Ok(lock) => lock,
            Err(err) => return vec![format!("{err:#}")],
        };
        let mut errors = Vec::new();
        for (ifindex, name) in &self.clsact {
            let removed = match self.every_filter {
                true => clsact::remove_if_unused(*ifindex, name),
                false => clsact::remove(*ifindex),
            };
            if let Err(err) = removed {
                errors.push(format!("taking the clsact qdisc off {name}: {err}"));
            }
        }
        errors
    }
}

/// Puts fq back to the kernel's default on drop, on every interface it was put on, and takes
/// the program off.
pub struct LatencyGuard {
    pub qdiscs: Qdiscs,
    /// Detached when dropped (after `Drop::drop` took off the qdiscs and the filters).
    links: Vec<SchedClassifierLink>,
}

impl LatencyGuard {
    /// Takes the programs and qdiscs off, fq once it has sent what it holds
    /// ([`Qdiscs::remove_when_sent`]); dropping the guard after does nothing more.
    pub fn drain(&mut self, longest: Duration) {
        // First nothing new is delayed: the programs come off, our clsact qdiscs stay.
        for link in self.links.drain(..) {
            if let Err(err) = link.detach() {
                eprintln!("nbt: taking a BPF program off an interface: {err}");
            }
        }
        self.qdiscs.filters.clear();
        for err in self.qdiscs.remove_when_sent(longest) {
            eprintln!("nbt: {err}");
        }
        self.qdiscs = Qdiscs::default();
    }

    /// Leaves the qdiscs and the filters on the interfaces, for a zone that outlives this
    /// process (`nbt zone remove` takes them off, from its record).
    pub fn keep(mut self) {
        self.qdiscs = Qdiscs::default();
        // A netlink tc filter outlives its link's descriptor; only the link's Drop detaches it.
        std::mem::forget(std::mem::take(&mut self.links));
    }
}

impl Drop for LatencyGuard {
    fn drop(&mut self) {
        for err in self.qdiscs.remove() {
            eprintln!("nbt: {err}");
        }
    }
}

/// Depth of a cgroup v2 directory below the hierarchy's root (the root is level 0).
fn cgroup_level(cgroup_dir: &Path) -> Result<u32> {
    let mut level = 0;
    let mut dir = cgroup_dir;
    while let Some(parent) = dir.parent() {
        if !parent.join("cgroup.controllers").exists() {
            break;
        }
        level += 1;
        dir = parent;
    }
    Ok(level)
}

/// What a run needs of the tc programs (from `Plan`).
pub struct TcNeeds<'a> {
    /// The run's own delay, and each `--link`'s.
    pub latency: Option<&'a Latency>,
    pub links: &'a [Option<&'a Latency>],
    /// A delay or netem's impairments of outgoing packets: `delay_egress` must act on the
    /// interfaces (else it is there only to take the segments the egress loss model lost).
    pub egress: bool,
    /// Duplicate or corrupt of arriving packets.
    pub ingress_impair: bool,
    /// The ingress queue (`--ingress-queue`).
    pub queue: bool,
}

/// Puts fq on every interface when there is a `latency`, and attaches `delay_egress` to each
/// (it also duplicates, corrupts and reorders, and takes the TCP segments the egress loss model
/// lost), and for arriving packets `receive_ingress` (duplicate, corrupt, the ingress queue).
/// With the queue, makes its ifb device with fq and `queue_ingress`. A tc filter outlives nbt by
/// itself, as the qdiscs and the device do; the guard lists them all for the run's record, so
/// that `nbt cleanup` can take them off. When the programs are there only to take lost
/// segments, a namespace with loopback alone goes without them (the cgroup program then drops
/// those segments itself, as before).
pub fn attach(ebpf: &mut Ebpf, cgroup_dir: &Path, needs: &TcNeeds) -> Result<LatencyGuard> {
    let delayed = needs.latency.is_some() || needs.links.iter().any(Option::is_some);
    let ingress = needs.ingress_impair || needs.queue;
    let mut run = EdtRun {
        // A cgroup v2 id is its directory's inode number.
        cgroup_id: std::fs::metadata(cgroup_dir)?.ino(),
        cgroup_level: cgroup_level(cgroup_dir)?,
        mark_sockets: u32::from(ingress),
        // Set once `delay_egress` is on every interface, below.
        wire_loss: 0,
        // Set once the queue is ready, below.
        queue_ifindex: 0,
        receive_buffer_max: receive_buffer_max(),
    };
    let map = ebpf
        .map_mut(EDT_RUN_MAP)
        .ok_or_else(|| anyhow!("{EDT_RUN_MAP} missing"))?;
    Array::<&mut MapData, EdtRun>::try_from(map)?.set(0, run, 0)?;
    let map = ebpf
        .map_mut(EDT_CONFIG_MAP)
        .ok_or_else(|| anyhow!("{EDT_CONFIG_MAP} missing"))?;
    let mut configs = Array::<&mut MapData, EdtConfig>::try_from(map)?;
    // Link 0 is the run's own; a `--link`'s delay is its own (none when it sets none).
    for (link, latency) in std::iter::once(needs.latency)
        .chain(needs.links.iter().copied())
        .enumerate()
    {
        if let Some(latency) = latency {
            configs.set(link as u32, config(latency), 0)?;
        }
    }

    let mut guard = LatencyGuard {
        qdiscs: Qdiscs {
            netns: Some(NetnsId::current().context("reading nbt's network namespace")?),
            ..Qdiscs::default()
        },
        links: Vec::new(),
    };
    let interfaces = netlink::interfaces();
    if interfaces.is_empty() {
        if needs.egress {
            bail!(
                "{}: this network namespace has no interface but loopback to act on",
                if delayed {
                    "--latency"
                } else {
                    "--duplicate, --corrupt and --reorder"
                }
            );
        }
        if needs.ingress_impair && !needs.queue {
            bail!(
                "--duplicate and --corrupt of arriving packets: this network namespace has no \
                 interface but loopback to act on"
            );
        }
        if !ingress {
            return Ok(guard);
        }
    }
    for (ifindex, name) in interfaces.iter().filter(|_| delayed) {
        match netlink::add_root(*ifindex, "fq", &FQ_LIMITS) {
            Ok(()) => guard.qdiscs.fq.push((*ifindex, name.clone())),
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => bail!(
                "--latency needs the fq qdisc at the root of {name}, which has a root qdisc of its \
                 own; nbt will not replace it (`tc qdisc show dev {name}`)"
            ),
            Err(err) => return Err(err).with_context(|| format!("putting the fq qdisc on {name}")),
        }
    }
    if needs.queue {
        run.queue_ifindex = add_queue(ebpf, &mut guard)?;
    }
    // The programs hang off a clsact qdisc, through netlink, on every kernel, tcx (Linux 6.6+)
    // included: a held packet leaves as a copy and its original is taken (`TC_ACT_STOLEN`,
    // nbt-ebpf/src/edt.rs), which tcx does not know (it passes such a packet on, as if the
    // program had not decided).
    // With the queue, arriving packets are taken from loopback too (a server on the same
    // machine), and only from interfaces with an Ethernet header (`receiving_interfaces`).
    let receiving = match needs.queue {
        true => netlink::receiving_interfaces(),
        false => interfaces.clone(),
    };
    let _lock = clsact::lock()?;
    guard.qdiscs.every_filter = true;
    let mut with_clsact = interfaces.clone();
    with_clsact.extend(
        receiving
            .iter()
            .filter(|i| !interfaces.contains(i))
            .cloned(),
    );
    for (ifindex, name) in &with_clsact {
        if clsact::add(*ifindex, name)? {
            guard.qdiscs.clsact.push((*ifindex, name.clone()));
        }
    }
    attach_everywhere(
        ebpf,
        "delay_egress",
        TcAttachType::Egress,
        &interfaces,
        &mut guard,
    )?;
    // The queue's filter first: each filter goes in front of those already there, and
    // `receive_ingress` impairs a packet before it is queued.
    if needs.queue {
        redirect_to_queue(ebpf, &receiving, run.queue_ifindex, &mut guard)?;
    }
    if needs.ingress_impair {
        attach_everywhere(
            ebpf,
            "receive_ingress",
            TcAttachType::Ingress,
            &receiving,
            &mut guard,
        )?;
    }
    run.wire_loss = 1;
    let map = ebpf
        .map_mut(EDT_RUN_MAP)
        .ok_or_else(|| anyhow!("{EDT_RUN_MAP} missing"))?;
    Array::<&mut MapData, EdtRun>::try_from(map)?.set(0, run, 0)?;
    Ok(guard)
}

/// `net.core.rmem_max`, the largest receive buffer `SO_RCVBUF` grants; the kernel's default
/// (212,992 bytes) where this network namespace does not show it.
fn receive_buffer_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(212_992)
}

/// Makes the run's ingress queue: an ifb device (`nbt-q-PID`, or `nbt-q-PID-N` where a zone
/// made by an nbt of the same process id still has that name) with fq at its root, whose
/// horizon (10 s) bounds the queue, and `queue_ingress` on its egress; its index. Recorded in
/// the guard as soon as it exists, so that a failure after takes it away again.
fn add_queue(ebpf: &mut Ebpf, guard: &mut LatencyGuard) -> Result<u32> {
    let base = format!("{}{}", netlink::QUEUE_DEVICE_PREFIX, std::process::id());
    // At most 15 bytes (IFNAMSIZ): the prefix's 6, a process id's 7 and "-N".
    let mut names = std::iter::once(base.clone()).chain((1..10).map(|n| format!("{base}-{n}")));
    let (ifindex, name) = loop {
        let Some(name) = names.next() else {
            bail!(
                "the ingress queue: this network namespace already has interfaces named {base} \
                 and {base}-1 to -9 (left by killed runs? `nbt cleanup` takes them away)"
            );
        };
        match netlink::add_ifb(&name) {
            Ok(ifindex) => break (ifindex, name),
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => bail!(
                "the ingress queue needs the ifb network device (CONFIG_IFB), which this kernel \
                 lacks; --ingress-queue=false polices arriving packets instead"
            ),
            Err(err) => {
                return Err(err).with_context(|| format!("making the ingress queue device {name}"))
            }
        }
    };
    guard.qdiscs.queue = Some((ifindex, name.clone()));
    match netlink::add_root(ifindex, "fq", &FQ_LIMITS) {
        Ok(()) => {}
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
            bail!(
                "the ingress queue needs the fq qdisc (sch_fq), which this kernel lacks ({err}); \
                 --ingress-queue=false polices arriving packets instead"
            )
        }
        Err(err) => return Err(err).with_context(|| format!("putting the fq qdisc on {name}")),
    }
    aya::programs::tc::qdisc_add_clsact(&name)
        .map_err(|err| anyhow!("adding the clsact qdisc to {name}: {err}"))?;
    let program: &mut SchedClassifier = loader::program(ebpf, "queue_ingress")?;
    program
        .load()
        .context("the kernel refused to load BPF program queue_ingress")?;
    let link = program
        .attach_with_options(
            &name,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .with_context(|| format!("attaching BPF program queue_ingress to {name}"))?;
    // Goes with the device; kept only so that the guard detaches it first at the run's end.
    guard.links.push(program.take_link(link)?);
    Ok(ifindex)
}

/// Puts `queue_redirect` on the ingress of each of `interfaces` as a classic filter whose mirred
/// action redirects what it matches to the queue device `queue` (see
/// nbt-ebpf/src/edt/queue.rs for why not `bpf_redirect`). Each is recorded as the run's filter,
/// and held as a link, so that it comes off as `receive_ingress` does.
fn redirect_to_queue(
    ebpf: &mut Ebpf,
    interfaces: &[(u32, String)],
    queue: u32,
    guard: &mut LatencyGuard,
) -> Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let program: &mut SchedClassifier = loader::program(ebpf, "queue_redirect")?;
    program
        .load()
        .context("the kernel refused to load BPF program queue_redirect")?;
    let fd = program.fd()?.as_fd().as_raw_fd();
    for (ifindex, interface) in interfaces {
        let (priority, handle) =
            netlink::add_bpf_redirect_filter(*ifindex, fd, "queue_redirect", queue).with_context(
                || format!("putting BPF program queue_redirect on {interface}, with act_mirred"),
            )?;
        guard.qdiscs.filters.push(Filter {
            ifindex: *ifindex,
            interface: interface.clone(),
            priority,
            handle,
            ingress: true,
        });
        guard.links.push(SchedClassifierLink::attached(
            interface,
            TcAttachType::Ingress,
            priority,
            handle.into(),
            None,
        )?);
    }
    Ok(())
}

/// Loads the tc program `name` and attaches it to each interface, whose clsact qdisc `attach`
/// made sure of; records the filters put on a clsact qdisc that is not ours.
fn attach_everywhere(
    ebpf: &mut Ebpf,
    name: &str,
    attach_type: TcAttachType,
    interfaces: &[(u32, String)],
    guard: &mut LatencyGuard,
) -> Result<()> {
    let program: &mut SchedClassifier = loader::program(ebpf, name)?;
    program
        .load()
        .with_context(|| format!("the kernel refused to load BPF program {name}"))?;
    for (ifindex, interface) in interfaces {
        let link = program
            .attach_with_options(
                interface,
                attach_type,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .with_context(|| format!("attaching BPF program {name} to {interface}"))?;
        let link = program.take_link(link)?;
        guard.qdiscs.filters.push(Filter {
            ifindex: *ifindex,
            interface: interface.clone(),
            priority: link.priority()?,
            handle: link.handle()?.into(),
            ingress: attach_type == TcAttachType::Ingress,
        });
        guard.links.push(link);
    }
    Ok(())
}

/// The kernel id of the EDT configuration map, for `nbt set`.
pub fn map_id(ebpf: &Ebpf) -> Result<u32> {
    match ebpf.map(EDT_CONFIG_MAP) {
        Some(aya::maps::Map::Array(data)) => Ok(data.info()?.id()),
        _ => Err(anyhow!(
            "BPF map {EDT_CONFIG_MAP} missing from nbt's object"
        )),
    }
}

/// Changes a live run's own latency and jitter (not its links'): the next packet leaves with
/// the new delay.
pub fn set_by_id(map_id: u32, latency: &Latency) -> Result<()> {
    let data = MapData::from_id(map_id)
        .with_context(|| format!("opening BPF map id {map_id} of the run"))?;
    let mut map = aya::maps::Map::from_map_data(data)?;
    let mut configs: Array<&mut MapData, EdtConfig> = Array::try_from(&mut map)?;
    configs.set(0, config(latency), 0)?;
    Ok(())
}

/// The kernel's view of a delay.
fn config(latency: &Latency) -> EdtConfig {
    EdtConfig {
        latency_ns: latency.latency_ns,
        jitter_ns: latency.jitter_ns,
        jitter_correlation: probability(latency.correlation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_plus_jitter_at_most_ten_seconds() {
        let ms = Duration::from_millis;
        let both = [Some(("--latency", "7s")), Some(("--jitter", "3s"))];
        assert_eq!(
            Latency::checked(ms(7000), ms(3000), both),
            Ok(Latency {
                latency_ns: 7_000_000_000,
                jitter_ns: 3_000_000_000,
                correlation: 0.0
            })
        );
        let latency_only = [Some(("--latency", "10s")), None];
        assert!(Latency::checked(MAX_DELAY, Duration::ZERO, latency_only).is_ok());
        let err = Latency::checked(MAX_DELAY, Duration::from_nanos(1), both).unwrap_err();
        assert!(
            err.0
                .contains("invalid value '3s' for --jitter: latency plus jitter above 10 s"),
            "{err}"
        );
        // A latency too long by itself is named, whatever the jitter.
        let err = Latency::checked(ms(10_001), ms(1), both).unwrap_err();
        assert!(err.0.contains("invalid value '7s' for --latency"), "{err}");
        // `nbt set RUN --jitter`: the jitter given is named.
        let err = Latency::checked(ms(9000), ms(1001), [None, Some(("--jitter", "1001ms"))]);
        assert!(err.unwrap_err().0.contains("'1001ms' for --jitter"));
        // Sums that overflow a Duration are refused, not a panic.
        let huge = Duration::from_secs(u64::MAX);
        assert!(Latency::checked(huge, huge, both).is_err());
    }
}
