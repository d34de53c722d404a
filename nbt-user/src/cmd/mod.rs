//! The command line: the only code that reads argv, writes to stdout and picks nbt's exit status.
//! One file per group of subcommands; `args` is the grammar they share.

pub(crate) mod agent;
pub(crate) mod args;
pub(crate) mod attach;
pub(crate) mod demo;
pub(crate) mod live;
pub(crate) mod receipts;
pub(crate) mod report;
pub(crate) mod run;
pub(crate) mod swarm;
pub(crate) mod top;
pub(crate) mod zone;

use clap::Parser;

use crate::sys::supervise;
use args::{BalanceAction, Cli, Command};

/// The status nbt exits with when it failed itself: before the command ran, or writing its
/// receipts (as env(1) and timeout(1) use it).
pub const EXIT_NBT_FAILED: i32 = 125;

/// Parses the command line and runs it; returns the exit status.
pub fn main() -> i32 {
    crate::sys::phase::mark("main");
    // Before any thread exists, so that no thread can take a signal meant for the workload.
    let signals = supervise::block_signals();
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Cleanup { .. }
            | Command::Ps { .. }
            | Command::Top
            | Command::Balloon { .. }
            | Command::Completions { .. }
            | Command::Manpages { .. }
    ) {
        warn_of_orphans();
    }
    match cli.command {
        Command::Run(args) => run::run_command(*args, &signals),
        Command::Demo(args) => demo::demo(args, &signals),
        Command::Probe { json } => probe(json),
        Command::Ps { json } => live::ps(json),
        Command::Top => top::top(),
        Command::Set { run, limits, net } => live::set(&run, &limits, &net, &signals),
        Command::Balance {
            run,
            action: BalanceAction::Add { amount },
        } => live::top_up(&run, &amount),
        Command::Receipts(args) => receipts::command(args),
        Command::Agent(args) => agent::agent(args, &signals),
        Command::Balloon { bytes_per_sec } => crate::schedule::fault::balloon(bytes_per_sec),
        Command::Fault { run, fault } => live::fault(&run, &fault, &signals),
        Command::Report(args) => report::command(args),
        Command::Attach(args) => attach::attach(*args, &signals),
        Command::Detach { run } => attach::detach(&run),
        Command::Zone(action) => zone::zone(action, &signals),
        Command::Swarm(args) => swarm::command(args),
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "nbt", &mut std::io::stdout());
            0
        }
        Command::Manpages { dir } => manpages(&dir),
        Command::Cleanup { dry_run } => cleanup(dry_run),
    }
}

/// Once per command, while runs whose nbt died are left: their workloads still run, under the
/// limits their pinned programs and cgroups hold, with nothing watching them.
fn warn_of_orphans() {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return; // the state directory is root's alone
    }
    let orphans = crate::state::live::orphan_names();
    if !orphans.is_empty() {
        eprintln!(
            "nbt: warning: {} run(s) whose nbt died are still in force: {} (`nbt ps` shows them, \
             `nbt cleanup` removes them)",
            orphans.len(),
            orphans.join(", ")
        );
    }
}

/// `nbt manpages DIR`: nbt.1 and one page per subcommand, nested ones too (nbt-receipts-list.1).
fn manpages(dir: &std::path::Path) -> i32 {
    fn write(dir: &std::path::Path, cmd: clap::Command, name: &str) -> std::io::Result<usize> {
        let cmd = cmd.name(name.to_string());
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
        let mut written = 1;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            written += write(dir, sub.clone(), &format!("{name}-{}", sub.get_name()))?;
        }
        Ok(written)
    }
    let mut cli = <Cli as clap::CommandFactory>::command();
    cli.build();
    match std::fs::create_dir_all(dir).and_then(|()| write(dir, cli, "nbt")) {
        Ok(count) => {
            eprintln!("nbt manpages: {count} pages in {}", dir.display());
            0
        }
        Err(err) => {
            eprintln!("nbt manpages: {}: {err}", dir.display());
            1
        }
    }
}

/// `nbt probe [--json]`.
fn probe(json: bool) -> i32 {
    let features = crate::plan::probe::probe();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&features).expect("features serialize")
        );
        return 0;
    }
    let mut group = "";
    for f in &features {
        if f.group != group {
            group = f.group;
            println!("{group}:");
        }
        let mark = if f.available { "yes" } else { "no " };
        println!("  {mark}  {:<38} {}", f.name, f.detail);
    }
    0
}

/// `nbt cleanup [--dry-run]`.
fn cleanup(dry_run: bool) -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    // The namespaces and records of swarms whose nbt died (their nodes' runs are runs).
    let (lines, swarms_ok) = crate::swarm::record::cleanup(dry_run);
    for line in lines {
        eprintln!("nbt cleanup: {line}");
    }
    match crate::state::cleanup::cleanup(dry_run) {
        Ok(true) if swarms_ok => 0,
        Ok(true) => 1,
        Ok(false) => 1,
        Err(err) => {
            eprintln!("nbt cleanup: {err:#}");
            1
        }
    }
}

/// Refuses to go on without the privileges cgroups and BPF need, naming the missing one; the
/// status to exit with then.
pub fn privileged() -> Result<(), i32> {
    require_privileges().map_err(|err| {
        eprintln!("nbt: {err:#}");
        EXIT_NBT_FAILED
    })
}

fn require_privileges() -> anyhow::Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_SYS_ADMIN) != 0 {
        return Ok(());
    }
    anyhow::bail!(
        "nbt must run as root: making cgroups and loading BPF programs need CAP_SYS_ADMIN \
         (and CAP_BPF, CAP_NET_ADMIN); run it with sudo"
    )
}

/// clap's error on one line, without its "error: " (for a parse nbt does itself, of a line
/// typed in `nbt top` or of a swarm node's flags).
pub fn clap_line(err: &clap::Error) -> String {
    let text = err.to_string();
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("bad input")
        .trim_start_matches("error: ")
        .to_string()
}

/// Exit status 2 for a usage error (a bad value), else 1.
pub fn usage_or_failure(err: &anyhow::Error) -> i32 {
    if err.downcast_ref::<crate::error::PlanError>().is_some() {
        2
    } else {
        1
    }
}
