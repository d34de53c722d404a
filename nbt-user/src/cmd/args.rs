//! The command line's grammar: every subcommand, flag and help text (clap). Values stay text
//! here; `plan` parses them, so that flags and profile files share one parser and one kind of
//! error.

use std::ffi::OsString;

use clap::{Args, Parser, Subcommand};

use crate::plan::Flags;

/// The values of the direction flags, for help and completion (`plan` parses them).
const DIRECTIONS: &[&str] = &["egress", "ingress", "both"];
/// The kinds of `nbt fault`.
const FAULTS: &[&str] = &[
    "brownout",
    "network-drop",
    "loss-burst",
    "memory-squeeze",
    "memory-leak",
    "balance-shock",
];

/// A value parser that takes any text (`plan` parses it, with errors that name the flag) and
/// offers `values` to shell completion, for flags whose values are words.
fn hinted(values: &'static [&'static str]) -> Hinted {
    Hinted(values)
}

#[derive(Clone)]
struct Hinted(&'static [&'static str]);

impl clap::builder::TypedValueParser for Hinted {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        clap::builder::StringValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            self.0.iter().map(|v| clap::builder::PossibleValue::new(*v)),
        ))
    }
}

const AFTER_HELP: &str = "\
Units: sizes 512M, 6G (powers of 1024; 500MB = 500*10^6 bytes); CPUs as a decimal (0.5);
rates 512kbit, 10mbit (bits/s) or 64KB/s (bytes/s; `kbps` is refused as ambiguous); loss 5% or
0.05; amounts 0.25 (at most 6 decimals).
Exit status: the command's own, or 128+N when signal N killed it; 2 for a usage error;
125 when nbt itself failed (before the command ran, or writing its receipts); 126 command not executable; 127 not found.";

const ATTACH_AFTER_HELP: &str = "\
Examples:
  nbt attach --container web --memory 256M --egress-rate 10mbit
  nbt attach --pid 4242 --cpus 0.5 --name trainer      (then: nbt set trainer --cpus 1)
  nbt attach --cgroup /system.slice/job.service --profile nbt
What goes back at the end: the target's limit files (memory.max, cpu.max, pids.max, ... as they
were), nbt's programs detached; --pid moves its process back to its own cgroups. Nothing of the
target is killed. Not for a target: --restart and --user (nbt does not start it), --gpu-memory
(it reads its environment at start), and a delay (--latency, --jitter, --reorder) on a target in
another network namespace.
Exit status: 0 when everything went back, 1 when something could not; 2 for a usage error;
125 when nbt itself failed.";

#[derive(Debug, Parser)]
#[command(
    name = "nbt",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("NBT_GIT_COMMIT"), ")"),
    about = "Run a workload under deliberately imposed scarcity, enforced in the kernel, and measure what it cost",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run COMMAND under scarcity, print a summary
    #[command(after_help = AFTER_HELP)]
    Run(Box<RunArgs>),
    /// The built-in scenario: nbt's training workload under the `nbt` profile
    Demo(DemoArgs),
    /// List what this kernel and machine support, feature by feature
    Probe {
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// List live runs with their network limits and counters
    Ps {
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// The live runs in this terminal, read again every second: a row per run, a run's charts
    /// and events (Enter), keys to change its rates (r, i, s), top up its balance (b) and
    /// inject a fault (f); q quits
    Top,
    /// Change a live run's network limits; the next packet sees them
    // The options fixed when a run starts stay out of its help (given, they are refused).
    #[command(mut_arg("ingress_queue", |arg| arg.hide(true)))]
    Set {
        /// The run's name, as `nbt ps` shows it (nbt-...), or the name given with --name
        run: String,
        #[command(flatten)]
        limits: Box<LimitArgs>,
        #[command(flatten)]
        net: Box<NetArgs>,
    },
    /// Top up a live run's balance: `nbt balance RUN add AMOUNT`; the gate reopens at once
    Balance {
        /// The run's name, as `nbt ps` shows it
        run: String,
        #[command(subcommand)]
        action: BalanceAction,
    },
    /// Inject a fault into a live run now: `nbt fault RUN brownout 5s`; what was in force comes
    /// back when it ends (or on Ctrl-C)
    Fault {
        /// The run's name, as `nbt ps` shows it
        run: String,
        #[command(flatten)]
        fault: FaultArgs,
    },
    /// The memory-leak fault's balloon, started by nbt inside a run: allocates and touches
    /// BYTES_PER_SEC every second until killed
    #[command(hide = true)]
    Balloon { bytes_per_sec: u64 },
    /// The joule agent: the joule bucket (/v1/sample, /v1/take), learning updates of live runs
    /// (/v1/report), and /metrics for Prometheus, over HTTP
    Agent(AgentArgs),
    /// The receipts of runs and learning updates: list, show, verify, export, the public key
    Receipts(ReceiptsArgs),
    /// Write a run's report: one self-contained HTML file (charts of every measured series
    /// against its limit, the events, the learning updates, the receipt and its verification)
    Report(ReportArgs),
    /// Put a running workload under scarcity: a process (--pid), a cgroup, a Docker container
    /// or a systemd unit, with the limits of `nbt run`; until Ctrl-C, `nbt detach` or the
    /// target's end, when everything changed goes back as it was and a receipt is written
    #[command(after_help = ATTACH_AFTER_HELP)]
    Attach(Box<AttachArgs>),
    /// Swarms: run a mesh of nodes, each an `nbt run` in a network namespace of its own with
    /// its own limits, links and timeline of failures (`nbt swarm FILE.toml`); `nbt swarm ps`,
    /// `set` and `fault` act on a live one (docs/swarm.md)
    #[command(after_help = SWARM_AFTER_HELP, args_conflicts_with_subcommands = true)]
    Swarm(SwarmArgs),
    /// Zones: cgroups with nbt's limits, programs and hardware caps that outlive nbt (the seed's
    /// apply and remove): apply, exec, attach, ls, remove
    #[command(subcommand)]
    Zone(ZoneAction),
    /// End an attachment (`nbt attach`): its limits go back, its receipt is written
    Detach {
        /// The attachment's name, as `nbt ps` shows it (nbt-...), or the name given with --name
        run: String,
    },
    /// Print the shell completion script for SHELL: `nbt completions bash >
    /// /etc/bash_completion.d/nbt` (the Debian package installs them)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a man page per subcommand (nbt.1, nbt-run.1, ...) into DIR (for packaging)
    #[command(hide = true)]
    Manpages { dir: std::path::PathBuf },
    /// Remove what crashed runs left behind (cgroups, processes), and only that
    Cleanup {
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
    },
}

pub const SWARM_AFTER_HELP: &str = "\
The file (TOML; every key checked, an unknown one refused):
  name = \"demo\"                 # default: the file's name
  subnet = \"198.51.100.0/24\"    # node addresses: .1, .2, ... in file order
  topology = \"mesh\"             # or \"links\": only the pairs a [[link]] names
  until = \"n1\"                  # optional: the swarm ends when n1's run ends
  [[node]]
  name = \"n1\"
  command = [\"sh\", \"-c\", \"...\"]
  memory = \"256M\"               # and the other limits of nbt run, named as its flags:
  cpus = 0.5                    # swap, pids, egress-rate, ingress-rate, burst, loss, latency,
  balance = \"5\"                 # jitter, price-*, call-gap, gate, profile, schedule; env, user
  [[link]]
  from = \"n1\"
  to = \"n2\"
  rate = \"2mbit\"                # and loss, latency; both ways unless oneway = true
  [[event]]
  at = \"5s\"
  action = \"kill\"
  node = \"n2\"
  restart-after = \"3s\"
  (actions: kill [restart-after], restart, freeze [for], thaw, partition nodes = [...], heal,
   degrade from to rate/loss [oneway], spend node amount, fault node kind [duration ...])

Each node sees NBT_SWARM, NBT_SWARM_NODE, NBT_SWARM_ADDR, NBT_SWARM_INDEX and
NBT_SWARM_PEERS (name=addr,name=addr,...) in its environment.";

/// `nbt swarm FILE.toml`, or one of its subcommands.
#[derive(Debug, Args)]
pub struct SwarmArgs {
    #[command(subcommand)]
    pub action: Option<SwarmAction>,
    /// The swarm file (TOML)
    #[arg(value_name = "FILE.toml")]
    pub file: Option<std::path::PathBuf>,
    /// The summary as one JSON object on stdout (the nodes' output goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// Stop every node after this long (100ms, 30s, 5m), as Ctrl-C would, but exiting 0
    #[arg(long, value_name = "DURATION")]
    pub stop_after: Option<String>,
    /// The receipt store of every node and of the swarm (default: $NBT_RECEIPTS, else
    /// /var/lib/nbt/receipts.db)
    #[arg(long, value_name = "PATH")]
    pub receipts: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SwarmAction {
    /// List live swarms: their nodes, addresses and runs
    Ps {
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// Change a live node's limits as `nbt set` does; in `--link to=PEER,...` a peer may be
    /// named by its node name
    #[command(allow_hyphen_values = true)]
    Set {
        swarm: String,
        node: String,
        /// The flags of `nbt set` (--egress-rate 1mbit, --link to=n2,loss=5%, ...)
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        flags: Vec<String>,
    },
    /// Inject a fault into a live node as `nbt fault` does (brownout 5s, balance-shock
    /// --amount 3, ...)
    Fault {
        swarm: String,
        node: String,
        /// The fault's kind and arguments, as `nbt fault RUN` takes them
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "KIND [ARGS]"
        )]
        args: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct ReceiptsArgs {
    /// The receipt store (default: $NBT_RECEIPTS, else /var/lib/nbt/receipts.db)
    #[arg(long, value_name = "PATH", global = true)]
    pub receipts: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub action: ReceiptsAction,
}

#[derive(Debug, Subcommand)]
pub enum ReceiptsAction {
    /// One line per receipt: number, time, kind, run, task, outcome, joules, hash
    List {
        /// One JSON object per line (as `export --format jsonl`)
        #[arg(long)]
        json: bool,
        /// Only the receipts of this run (nbt-...)
        #[arg(long, value_name = "RUN")]
        run: Option<String>,
    },
    /// One receipt in full, by number or by 8+ hex digits of its hash
    Show { id: String },
    /// Check every hash, link and signature; exit status 1 naming the first bad receipt
    Verify {
        /// The public key to check with (PEM, as `nbt receipts pubkey` writes it; default: this
        /// node's own key, $NBT_KEY or /var/lib/nbt/node.key)
        #[arg(long, value_name = "FILE")]
        pubkey: Option<std::path::PathBuf>,
    },
    /// Every receipt on stdout: `jsonl` (one per line) or `in-toto` (a Statement v1 per line,
    /// in a DSSE envelope signed by this node's key; model hashes as subjects)
    Export {
        #[arg(long, value_name = "FORMAT", value_parser = ["jsonl", "in-toto"])]
        format: String,
    },
    /// This node's public key (SPKI PEM), made with the key at first use
    Pubkey,
    /// A run's time series (one row per sample: memory, CPU, pressure, packets, limits,
    /// balance, energy, sensors), checked against the hash its receipt holds
    Series {
        /// The run (nbt-...), or its run receipt's number or 8+ hex digits of its hash
        run: String,
        /// `csv` (a header, then one line per sample) or `json` (the series with the run's
        /// events and receipt)
        #[arg(long, value_name = "FORMAT", value_parser = ["csv", "json"], default_value = "csv")]
        format: String,
    },
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run (nbt-...), or its run receipt's number or 8+ hex digits of its hash
    pub run: String,
    /// The HTML file to write (default: RUN.html in the current directory)
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
    /// The receipt store (default: $NBT_RECEIPTS, else /var/lib/nbt/receipts.db)
    #[arg(long, value_name = "PATH")]
    pub receipts: Option<std::path::PathBuf>,
    /// The public key the store is verified with (default: this node's own key)
    #[arg(long, value_name = "FILE")]
    pub pubkey: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BalanceAction {
    /// Add AMOUNT to the balance
    Add { amount: String },
}

#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Memory limit (e.g. 6G, 512M); the workload is OOM-killed beyond it
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub memory: Option<String>,
    /// Swap the workload may use beyond --memory (0: none)
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub swap: Option<String>,
    /// CPU time as a number of cores (0.5 = half of one core), enforced by CFS quota
    #[arg(long, value_name = "CORES", allow_negative_numbers = true)]
    pub cpus: Option<String>,
    /// Most processes and threads the workload may have at once
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub pids: Option<String>,
}

/// Flags of nbt's command-line contract whose capability is not built yet. They are parsed so that
/// asking for one gets a clear refusal rather than "unexpected argument"; hidden from --help
/// until they work.
#[derive(Debug, Args)]
pub struct NotYetArgs {
    #[arg(long, hide = true)]
    pub price_kwh: Option<String>,
}

impl NotYetArgs {
    pub fn given(&self) -> Vec<(String, String)> {
        self.price_kwh
            .iter()
            .map(|v| ("price-kwh".to_string(), v.clone()))
            .collect()
    }
}

/// Machine-wide hardware caps: applied before the workload starts, put back when the run ends
/// whatever way it ends (after a crash or power loss: `nbt cleanup`). A cap another live run
/// holds is refused.
#[derive(Debug, Args)]
pub struct HwArgs {
    /// Cap every CPU's frequency (cpufreq scaling_max_freq): 2.0GHz, 2000MHz
    #[arg(long, value_name = "FREQ")]
    pub cpu_max_freq: Option<String>,
    /// Turn CPU turbo off (intel_pstate no_turbo, else cpufreq boost)
    #[arg(long)]
    pub no_turbo: bool,
    /// GPU power limit in watts (NVML), within the range the GPU reports
    #[arg(long, value_name = "WATTS")]
    pub gpu_power_limit: Option<String>,
    /// Lock the GPU graphics clock at MHZ (NVML); unlocked after the run
    #[arg(long, value_name = "MHZ")]
    pub gpu_clock: Option<String>,
    /// Lock the GPU memory clock at MHZ (NVML, Ampere and newer); unlocked after the run
    #[arg(long, value_name = "MHZ")]
    pub gpu_mem_clock: Option<String>,
    /// GPU memory the run's processes may hold on each GPU: 8G. NVML cannot cap a process's
    /// memory, so nbt watches it (NVML's per-process figures, every 0.5 s) and stops the run
    /// when it is over, and sets for the workload what the CUDA stack honours by itself:
    /// CUDA_MPS_PINNED_DEVICE_MEM_LIMIT (enforced by the driver, only under MPS),
    /// PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:F (PyTorch's allocator; not set when
    /// you set PYTORCH_CUDA_ALLOC_CONF yourself, even empty, as older PyTorch rejects the key),
    /// XLA_PYTHON_CLIENT_MEM_FRACTION (JAX), NBT_GPU_MEMORY_BYTES and NBT_GPU_MEMORY_FRACTION
    #[arg(long, value_name = "SIZE", verbatim_doc_comment)]
    pub gpu_memory: Option<String>,
    /// The GPUs the GPU caps apply to: all (default) or indices, 0,1
    #[arg(long, value_name = "0,1|all")]
    pub gpus: Option<String>,
}

impl HwArgs {
    pub fn add_to(&self, flags: &mut Flags) {
        flags.cpu_max_freq = self.cpu_max_freq.clone();
        flags.no_turbo = self.no_turbo;
        flags.gpu_power_limit = self.gpu_power_limit.clone();
        flags.gpu_clock = self.gpu_clock.clone();
        flags.gpu_mem_clock = self.gpu_mem_clock.clone();
        flags.gpu_memory = self.gpu_memory.clone();
        flags.gpus = self.gpus.clone();
    }
}

/// Network limits, enforced on the run's own sockets only.
#[derive(Debug, Default, Args)]
pub struct NetArgs {
    /// Outgoing bandwidth of the run: bits/s as tc writes them (512kbit, 10mbit) or bytes/s (64KB/s)
    #[arg(long, value_name = "RATE", allow_negative_numbers = true)]
    pub egress_rate: Option<String>,
    /// Incoming bandwidth of the run (packets over it wait in a queue, or are dropped on
    /// arrival where the kernel has no queue for them: see --ingress-queue)
    #[arg(long, value_name = "RATE", allow_negative_numbers = true)]
    pub ingress_rate: Option<String>,
    /// Whether arriving packets beyond the ingress rate wait in a queue, as at a bottleneck link
    /// (a TCP sender then sees delay, not loss; BBR holds the rate), or are dropped (policed).
    /// auto (the default): queued where the kernel has the fq qdisc and the ifb device, policed
    /// elsewhere; true (the flag alone): queued, refused without them; false: policed. The
    /// queue holds --burst. Fixed for the run
    #[arg(
        long,
        value_name = "auto|true|false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub ingress_queue: Option<String>,
    /// Bucket depth of the rate limits (default: egress 40 ms at the rate, ingress 250 ms; at least 96 KiB)
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub burst: Option<String>,
    /// Packet loss probability (5% or 0.05), each packet independently
    #[arg(long, value_name = "PCT", allow_negative_numbers = true)]
    pub loss: Option<String>,
    /// `uniform` (with --loss) or bursty loss `gemodel:P[,R[,1-H[,1-K]]]`, as netem's gemodel
    #[arg(long, value_name = "MODEL", value_parser = hinted(&["uniform", "gemodel:"]))]
    pub loss_model: Option<String>,
    /// Where loss applies: egress (default, as netem on an interface), ingress, both. A TCP
    /// segment lost on egress is lost on the wire (its sender retransmits it), except over
    /// loopback, where it is sent again at once (docs/running.md)
    #[arg(long, value_name = "DIR", value_parser = hinted(DIRECTIONS))]
    pub loss_direction: Option<String>,
    /// Added delay of the run's outgoing packets (100ms), by earliest departure time: needs the
    /// fq qdisc, which nbt puts at the root of the namespace's interfaces for the run
    #[arg(long, value_name = "DURATION")]
    pub latency: Option<String>,
    /// Spread of the added delay: uniform in latency ± jitter
    #[arg(long, value_name = "DURATION")]
    pub jitter: Option<String>,
    /// How much each jitter draw leans on the last (netem's delay correlation): 25%
    #[arg(long, value_name = "PCT")]
    pub jitter_correlation: Option<String>,
    /// How much each loss draw leans on the last (netem's loss correlation; uniform --loss)
    #[arg(long, value_name = "PCT")]
    pub loss_correlation: Option<String>,
    /// Outgoing packets sent twice: 1% (netem's duplicate; --impair-direction for arriving ones)
    #[arg(long, value_name = "PCT")]
    pub duplicate: Option<String>,
    /// Outgoing packets with one random bit flipped, so that the receiver's checksum fails:
    /// 0.1% (netem's corrupt; --impair-direction for arriving ones)
    #[arg(long, value_name = "PCT")]
    pub corrupt: Option<String>,
    /// Where --duplicate and --corrupt apply: egress (default, as netem on an interface),
    /// ingress (packets arriving for the run's sockets), both. Fixed for the run: nbt set
    /// changes them where the run started them
    #[arg(long, value_name = "DIR", value_parser = hinted(DIRECTIONS))]
    pub impair_direction: Option<String>,
    /// Outgoing packets sent at once, ahead of the added delay: 25% (netem's reorder; needs
    /// --latency)
    #[arg(long, value_name = "PCT")]
    pub reorder: Option<String>,
    /// How much each reorder draw leans on the last (netem's reorder correlation)
    #[arg(long, value_name = "PCT")]
    pub reorder_correlation: Option<String>,
    /// Only every Nth packet may be reordered (netem's gap) [default: 1]
    #[arg(long, value_name = "N")]
    pub reorder_gap: Option<String>,
    /// A link of its own for some destinations, repeatable: to=DEST[,to=DEST...] then the
    /// network flags above without --, as KEY=VALUE. Its limits replace the run's for those
    /// destinations (what it does not set is unlimited there):
    /// --link to=10.0.0.0/8,egress-rate=100mbit --link to=api.example.com,egress-rate=512kbit,loss=5%
    #[arg(long, value_name = "to=DEST,KEY=VALUE,...")]
    pub link: Vec<String>,
}

/// The simulated balance and the destinations it pays for.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// Starting balance (0.50, 5). Each call to a gated destination (a new connection, a new
    /// request on an open one, a datagram) is charged in the kernel and passes only when the
    /// balance covers it: a new connection then gets EPERM, a request on an open one has its
    /// connection torn down
    #[arg(long, value_name = "AMOUNT", allow_negative_numbers = true)]
    pub balance: Option<String>,
    /// Charged per byte sent to gated destinations, in the kernel (0.09/GB)
    #[arg(long, value_name = "AMOUNT/GB", allow_negative_numbers = true)]
    pub price_egress: Option<String>,
    /// Charged per call to a gated destination, in the kernel: a new connection, a new request
    /// on an open TCP connection (payload sent after a reply, or after --call-gap idle), a
    /// datagram
    #[arg(long, value_name = "AMOUNT", allow_negative_numbers = true)]
    pub price_call: Option<String>,
    /// Payload sent on a TCP connection idle this long (all it sent acknowledged, nothing
    /// received) is a new call [default: 1s]
    #[arg(long, value_name = "DURATION")]
    pub call_gap: Option<String>,
    /// Charged per hour of wall time, by nbt
    #[arg(long, value_name = "AMOUNT", allow_negative_numbers = true)]
    pub price_hour: Option<String>,
    /// Destinations the balance pays for: all (default with --balance: all but loopback),
    /// host[:port], CIDR[:port], [IPv6]:port; comma-separated
    #[arg(long, value_name = "DEST[,DEST...]")]
    pub gate: Option<String>,
}

impl LedgerArgs {
    pub fn add_to(&self, flags: &mut Flags) {
        flags.balance = self.balance.clone();
        flags.price_egress = self.price_egress.clone();
        flags.price_call = self.price_call.clone();
        flags.call_gap = self.call_gap.clone();
        flags.price_hour = self.price_hour.clone();
        flags.gate = self.gate.clone();
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub options: RunOptions,
    /// Start the workload again when it fails (exits non-zero or is killed, not when you stop
    /// it): `no` (default), `on-failure` (up to 3 times), `on-failure:N`; each restart and the
    /// time to recover (a progress report, or 10 s up) go into the event log
    #[arg(long, value_name = "POLICY", value_parser = hinted(&["no", "on-failure", "on-failure:"]))]
    pub restart: Option<String>,
    /// Run the workload as USER (name or uid), with GROUP as its group: by default the user who
    /// invoked sudo; `root` only when named, since a root workload can undo its own limits
    #[arg(long, value_name = "USER[:GROUP]", env = "NBT_USER")]
    pub user: Option<String>,
    /// The workload and its arguments, after `--`
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
pub enum ZoneAction {
    /// Make zone NAME with these limits and leave it in force: its programs are pinned, it
    /// survives nbt, `nbt cleanup` leaves it alone; `nbt set NAME` changes it
    Apply {
        /// The zone's name: a letter, then letters, digits, '.', '_' or '-'
        #[arg(value_name = "NAME")]
        zone: String,
        #[command(flatten)]
        options: Box<RunOptions>,
    },
    /// Run COMMAND inside zone NAME (as `nbt run` would, as USER), and exit with its status
    Exec {
        name: String,
        /// Run the command as USER (name or uid): by default the user who invoked sudo
        #[arg(long, value_name = "USER[:GROUP]", env = "NBT_USER")]
        user: Option<String>,
        #[arg(required = true, last = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Move a running process into zone NAME; it goes back to its own cgroups when the zone is
    /// removed
    Attach {
        name: String,
        #[arg(long, value_name = "PID")]
        pid: String,
    },
    /// List the zones
    Ls {
        /// One JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// Remove zone NAME: processes moved in go home, those started in it are killed, the
    /// programs, cgroups, qdiscs and hardware caps go back; its receipt is written
    Remove {
        name: String,
        /// Print the zone's summary as one JSON object on stdout
        #[arg(long)]
        json: bool,
    },
}

/// What `nbt attach` holds: exactly one of these.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// A process, and whatever it starts from now on: moved into a cgroup of nbt's own, and back
    /// to its own at the end
    #[arg(long, value_name = "PID")]
    pub pid: Option<String>,
    /// A cgroup and every process in it: /docker/ID as /proc/PID/cgroup names it, or its
    /// directory (/sys/fs/cgroup/...)
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// A running Docker container, by name or id, asked of the engine ($DOCKER_HOST, else
    /// /var/run/docker.sock)
    #[arg(long, value_name = "NAME|ID")]
    pub container: Option<String>,
    /// A running systemd unit (systemd must be PID 1)
    #[arg(long, value_name = "NAME")]
    pub unit: Option<String>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub options: RunOptions,
}

/// What `nbt run` and `nbt attach` share: the limits, the gate, the schedule, the receipts and
/// the output.
#[derive(Debug, Args)]
pub struct RunOptions {
    /// Starting limits: `nbt` (the seed's numbers), `none` (the default), or a TOML file whose
    /// keys are these flags' names; flags override it
    #[arg(long, value_name = "NAME|FILE")]
    pub profile: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub net: NetArgs,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    #[command(flatten)]
    pub hw: HwArgs,
    #[command(flatten)]
    pub not_yet: NotYetArgs,
    #[command(flatten)]
    pub receipt: ReceiptArgs,
    /// Limits that change during the run, and injected faults: a TOML file of steps,
    /// generators and faults (docs/schedules.md); checked before the run starts
    #[arg(long, value_name = "FILE")]
    pub schedule: Option<String>,
    /// Print the summary as one JSON object on stdout (human text always goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// A name for the run, unique among live runs, accepted wherever its nbt-... name is (nbt
    /// set, balance, fault, top; receipts and report after it ended)
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Write the JSON summary (as --json prints it) to FILE, apart from the workload's stdout
    #[arg(long, value_name = "FILE")]
    pub summary_file: Option<std::path::PathBuf>,
    /// No live status line on stderr (there is one only when stderr is a terminal)
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// How often the run's time series is sampled (memory, CPU, pressure, packets, limits,
    /// balance, energy): 100ms to 1h, default 1s; `nbt receipts series RUN` prints it
    #[arg(long, value_name = "DURATION")]
    pub series_interval: Option<String>,
}

/// Where the run's receipts go and how its learning updates are judged.
#[derive(Debug, Args)]
pub struct ReceiptArgs {
    /// The receipt store this run appends to (default: $NBT_RECEIPTS, else
    /// /var/lib/nbt/receipts.db); signed with the node key ($NBT_KEY, else /var/lib/nbt/node.key)
    #[arg(long, value_name = "PATH")]
    pub receipts: Option<std::path::PathBuf>,
    /// Accept a learning update the workload reports (through $NBT_REPORT) only if its holdout
    /// loss drops by more than X (default 0.002, CryoFlux's)
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub accept_min_delta: Option<String>,
}

impl ReceiptArgs {
    pub fn add_to(&self, flags: &mut Flags) {
        flags.receipts = self.receipts.clone();
        flags.accept_min_delta = self.accept_min_delta.clone();
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub receipt: ReceiptArgs,
    /// Training samples, fetched over the run's network limits (default 12000: 1.5 MiB;
    /// memory and download grow with it: samples x 33 x 4 bytes)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub samples: Option<String>,
    /// Training epochs
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub epochs: Option<String>,
    /// Run the trainer as USER (name or uid), with GROUP as its group: by default the user who
    /// invoked sudo, else `nobody`
    #[arg(long, value_name = "USER[:GROUP]", env = "NBT_USER")]
    pub user: Option<String>,
    /// Print the summary as one JSON object on stdout
    #[arg(long)]
    pub json: bool,
    /// The model trained by a swarm instead (docs/swarm.md): a parameter server and 3 workers,
    /// each an `nbt run` in a namespace of its own, twice: as they are, then losing a worker and
    /// a link; prints the time each took to reach the target loss and their ratio (takes
    /// --receipts, --user and --json; not the limits, which are the swarm's own)
    #[arg(long, conflicts_with_all = ["samples", "epochs", "memory", "swap", "cpus", "pids"])]
    pub swarm: bool,
}

impl LimitArgs {
    pub fn flags(&self, profile: Option<String>, not_yet: Vec<(String, String)>) -> Flags {
        Flags {
            profile,
            memory: self.memory.clone(),
            swap: self.swap.clone(),
            cpus: self.cpus.clone(),
            pids: self.pids.clone(),
            not_yet,
            ..Flags::default()
        }
    }
}

impl NetArgs {
    pub fn add_to(&self, flags: &mut Flags) {
        flags.egress_rate = self.egress_rate.clone();
        flags.ingress_rate = self.ingress_rate.clone();
        flags.ingress_queue = self.ingress_queue.clone();
        flags.burst = self.burst.clone();
        flags.loss = self.loss.clone();
        flags.loss_model = self.loss_model.clone();
        flags.loss_direction = self.loss_direction.clone();
        flags.latency = self.latency.clone();
        flags.jitter = self.jitter.clone();
        flags.jitter_correlation = self.jitter_correlation.clone();
        flags.loss_correlation = self.loss_correlation.clone();
        flags.duplicate = self.duplicate.clone();
        flags.corrupt = self.corrupt.clone();
        flags.reorder = self.reorder.clone();
        flags.reorder_correlation = self.reorder_correlation.clone();
        flags.reorder_gap = self.reorder_gap.clone();
        flags.impair_direction = self.impair_direction.clone();
        flags.links = self.link.clone();
    }
}

/// `nbt agent`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Where to listen (loopback unless you say otherwise)
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8787")]
    pub listen: String,
    /// The bearer token every endpoint but /healthz and /metrics needs (default:
    /// $NBT_HOME/agent.token, made with mode 0600 at first start; one given must be 0600, root's,
    /// not a link)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Ask the token of /metrics too (a Prometheus then sends it: `authorization` in its
    /// scrape config)
    #[arg(long)]
    pub private_metrics: bool,
    /// Connections open at once; one beyond is closed at once, unanswered
    #[arg(long, value_name = "N", default_value = "256")]
    pub max_connections: String,
    /// How long a request's head may take to arrive (and an idle connection may stay open); for
    /// tests
    #[arg(long, value_name = "DURATION", default_value = "10s", hide = true)]
    pub header_timeout: String,
    /// How long a request may take once its head is read, its body included; for tests
    #[arg(long, value_name = "DURATION", default_value = "30s", hide = true)]
    pub request_timeout: String,
    /// How often power is sampled and attributed to processes
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub interval: String,
    /// The model's CPU power at full load, whole node, watts (used only where no meter exists;
    /// default 10 W per logical CPU)
    #[arg(long, value_name = "WATTS")]
    pub cpu_tdp: Option<f64>,
    /// The model's CPU power when idle, whole node, watts (default 30% of --cpu-tdp)
    #[arg(long, value_name = "WATTS")]
    pub cpu_idle: Option<f64>,
    /// What active CPU energy is split by among processes
    #[arg(long, value_enum, value_name = "RATIO", default_value = "auto")]
    pub attribute_by: crate::telemetry::counters::AttributeBy,
}

/// The options of `nbt fault`, as text (the schedule parser checks them).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct FaultArgs {
    /// brownout, network-drop, loss-burst, memory-squeeze, memory-leak, balance-shock
    #[arg(value_parser = hinted(FAULTS))]
    pub kind: String,
    /// How long it lasts (not for balance-shock)
    pub duration: Option<String>,
    /// brownout: drop the CPU quota to this many cores instead of freezing the run
    #[arg(long, value_name = "CORES")]
    pub cpus: Option<String>,
    /// network-drop, loss-burst: egress, ingress or both
    #[arg(long, value_name = "DIR")]
    pub direction: Option<String>,
    /// loss-burst: the loss while it lasts (30%)
    #[arg(long, value_name = "PCT")]
    pub loss: Option<String>,
    /// memory-squeeze: the memory the run is squeezed to (64M)
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// balance-shock: the charge
    #[arg(long, value_name = "AMOUNT")]
    pub amount: Option<String>,
    /// memory-leak: how fast the balloon grows (10M, a size per second)
    #[arg(long, value_name = "SIZE/s")]
    pub rate: Option<String>,
}

impl FaultArgs {
    /// The fault as one `[[fault]]` of a schedule, starting at once.
    pub fn as_schedule(&self) -> String {
        let quoted = |value: &str| toml::Value::String(value.to_string()).to_string();
        let mut text = format!("[[fault]]\nkind = {}\nstart = \"0s\"\n", quoted(&self.kind));
        for (key, value) in [
            ("duration", &self.duration),
            ("cpus", &self.cpus),
            ("direction", &self.direction),
            ("loss", &self.loss),
            ("memory", &self.memory),
            ("amount", &self.amount),
            ("rate", &self.rate),
        ] {
            if let Some(value) = value {
                text.push_str(&format!("{key} = {}\n", quoted(value)));
            }
        }
        text
    }
}
