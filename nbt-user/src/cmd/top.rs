//! `nbt top`: the live runs in a terminal (ratatui on crossterm), read again once a second. A
//! row per run; Enter shows one run's charts and events. Keys change a run the way `nbt set`,
//! `nbt balance` and `nbt fault` do, through the same functions (`cmd::live`); what they did,
//! or why they failed, shows in the status bar. The terminal is put back on `q`, on a stopping
//! signal and on a panic.

mod view;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, IsTerminal as _};
use std::os::fd::FromRawFd as _;
use std::os::unix::thread::JoinHandleExt as _;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::widgets::TableState;

use super::args::{FaultArgs, NetArgs};
use super::live::{add_balance, inject_fault, set_network};
use super::privileged;
use crate::enforce::ledger::parse_amount;
use crate::state::live::{self, LiveEvent, LiveRun};
use crate::sys::supervise;
use crate::telemetry::series::Series;

/// How often the runs are read again.
const REFRESH: Duration = Duration::from_secs(1);

/// The longest wait for a key, so that a stopping signal is seen soon.
const KEY_WAIT: Duration = Duration::from_millis(250);

/// `nbt top`.
pub fn top() -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        eprintln!(
            "nbt top: stdin and stdout must be a terminal (`nbt ps --json` lists the live runs \
             for scripts)"
        );
        return 1;
    }
    // Before any thread: the faults' threads inherit it blocked, and wait for it to end early.
    let end_fault = block_end_fault();
    let stderr = Stderr::capture();
    let mut terminal = ratatui::init();
    // ratatui's hook puts the terminal back; stderr comes back first, so its message is seen.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        Stderr::restore();
        hook(info);
    }));
    let mut app = App::new(stderr.as_ref().map(|s| s.lines.clone()), end_fault);
    let looped = app.run(&mut terminal);
    ratatui::restore();
    Stderr::restore();
    // Faults still running end now, what they changed put back.
    for line in app.end_faults() {
        eprintln!("nbt top: {line}");
    }
    match looped {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("nbt top: {err:#}");
            1
        }
    }
}

/// Waits up to `timeout` for input on the terminal (stdin, where crossterm reads it); fails once
/// the terminal is gone. Asked here before crossterm reads: its reader would spin on the end of
/// file a closed terminal gives.
fn terminal_input(timeout: Duration) -> Result<bool> {
    let mut fd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll(2) on one pollfd of ours.
    if unsafe { libc::poll(&mut fd, 1, millis) } < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err.into());
    }
    if fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        anyhow::bail!("the terminal is gone");
    }
    Ok(fd.revents & libc::POLLIN != 0)
}

/// Blocks SIGUSR1 in this thread (and so in every thread it starts): a fault's thread waits for
/// it, the way `nbt fault` waits for Ctrl-C, to end the fault early. Returns the set.
fn block_end_fault() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Where stderr went before `nbt top` took it (-1: not taken).
static SAVED_STDERR: AtomicI32 = AtomicI32::new(-1);

/// Stderr while the terminal shows the runs: a pipe whose lines (warnings of the layers below)
/// go to the status bar instead of over the screen.
struct Stderr {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Stderr {
    fn capture() -> Option<Stderr> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors; dup and dup2 on descriptors this process owns.
        let read = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return None;
            }
            let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
            if saved < 0 || libc::dup2(fds[1], 2) < 0 {
                libc::close(fds[0]);
                libc::close(fds[1]);
                return None;
            }
            libc::close(fds[1]);
            SAVED_STDERR.store(saved, Ordering::SeqCst);
            // SAFETY: the read end is ours alone from here.
            std::fs::File::from_raw_fd(fds[0])
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(read).lines() {
                let Ok(line) = line else { break };
                let mut lines = sink.lock().unwrap_or_else(|p| p.into_inner());
                lines.push(line);
            }
        });
        Some(Stderr { lines })
    }

    /// Stderr back where it was (once; a second call does nothing).
    fn restore() {
        let saved = SAVED_STDERR.swap(-1, Ordering::SeqCst);
        if saved >= 0 {
            // SAFETY: dup2 and close of the descriptor saved by `capture`.
            unsafe {
                libc::dup2(saved, 2);
                libc::close(saved);
            }
        }
    }
}

/// What a prompt asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    EgressRate,
    IngressRate,
    /// Any of `nbt set`'s flags.
    Set,
    TopUp,
    Fault,
}

impl Ask {
    fn label(self) -> &'static str {
        match self {
            Ask::EgressRate => "egress rate (10mbit, 64KB/s)",
            Ask::IngressRate => "ingress rate (10mbit, 64KB/s)",
            Ask::Set => "nbt set flags (--loss 1% --latency 20ms)",
            Ask::TopUp => "add to the balance (2.50)",
            Ask::Fault => "fault: KIND [DURATION] [--flags] (brownout 5s)",
        }
    }
}

/// A line being typed for a run.
struct Prompt {
    ask: Ask,
    run: String,
    text: String,
}

/// A fault injected from `nbt top`, running in its own thread until it is put back.
struct Fault {
    run: String,
    kind: String,
    thread: JoinHandle<Result<(Vec<String>, bool)>>,
}

/// Per second figures of a run, from the last two samples seen.
#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    cpu_cores: Option<f64>,
    egress_bits: Option<f64>,
    ingress_bits: Option<f64>,
    watts: Option<f64>,
}

impl Rates {
    /// The rates between two samples (`latest` of `nbt ps`), `None` when they are the same one.
    fn between(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Option<Rates> {
        let span = after.get("t_seconds")? - before.get("t_seconds")?;
        if span <= 0.0 {
            return None;
        }
        let rate = |column: &str, scale: f64| {
            Some((after.get(column)? - before.get(column)?).max(0.0) * scale / span)
        };
        Some(Rates {
            cpu_cores: rate("cpu_seconds", 1.0),
            egress_bits: rate("egress_passed_bytes", 8.0),
            ingress_bits: rate("ingress_passed_bytes", 8.0),
            watts: rate("joules", 1.0),
        })
    }
}

/// What the detail of a run shows besides its row: its recent samples and its events.
struct Detail {
    series: Option<Series>,
    events: Vec<LiveEvent>,
}

impl Detail {
    fn read(run: &str) -> Detail {
        Detail {
            series: live::read_series(run),
            events: live::read_events(run),
        }
    }
}

/// The status bar's message.
#[derive(Debug, Clone, Default)]
struct Status {
    text: String,
    error: bool,
}

/// What `nbt top` shows and holds.
struct App {
    runs: Vec<LiveRun>,
    /// The last sample seen of each run, and the rates up to it.
    previous: HashMap<String, BTreeMap<String, f64>>,
    rates: HashMap<String, Rates>,
    table: TableState,
    /// The run shown in detail (Enter), and its live file as last read.
    detail: Option<String>,
    live: Option<Detail>,
    prompt: Option<Prompt>,
    status: Status,
    faults: Vec<Fault>,
    stderr: Option<Arc<Mutex<Vec<String>>>>,
    end_fault: libc::sigset_t,
}

/// What a key asks of the loop.
#[derive(PartialEq, Eq)]
enum Next {
    Stay,
    Quit,
}

impl App {
    fn new(stderr: Option<Arc<Mutex<Vec<String>>>>, end_fault: libc::sigset_t) -> App {
        App {
            runs: Vec::new(),
            previous: HashMap::new(),
            rates: HashMap::new(),
            table: TableState::default().with_selected(Some(0)),
            detail: None,
            live: None,
            prompt: None,
            status: Status {
                text: "Enter: a run's charts; r/i: egress/ingress rate; b: top up; f: fault".into(),
                error: false,
            },
            faults: Vec::new(),
            stderr,
            end_fault,
        }
    }

    /// Reads, draws and takes keys until `q` or a stopping signal.
    fn run(&mut self, terminal: &mut ratatui::DefaultTerminal) -> Result<()> {
        let mut next_refresh = Instant::now();
        let mut dirty = true;
        loop {
            if Instant::now() >= next_refresh {
                self.refresh();
                next_refresh = Instant::now() + REFRESH;
                dirty = true;
            }
            dirty |= self.reap_faults() | self.take_stderr();
            if dirty {
                terminal.draw(|frame| view::draw(frame, self))?;
                dirty = false;
            }
            if let Some(signal) = supervise::take_pending_stop() {
                self.status = Status {
                    text: format!("{} received", supervise::signal_name(signal)),
                    error: false,
                };
                return Ok(());
            }
            let wait = next_refresh
                .saturating_duration_since(Instant::now())
                .min(KEY_WAIT);
            if !terminal_input(wait)? {
                continue;
            }
            // Every event the input made, none waited for.
            while event::poll(Duration::ZERO)? {
                match event::read()? {
                    Event::Key(key) if key.kind != KeyEventKind::Release => {
                        dirty = true;
                        if self.key(key) == Next::Quit {
                            return Ok(());
                        }
                    }
                    Event::Resize(..) => dirty = true,
                    _ => {}
                }
            }
        }
    }

    /// Reads the runs again, and the live file of the one shown in detail.
    fn refresh(&mut self) {
        self.runs = live::runs(true);
        for run in &self.runs {
            let Some(latest) = &run.latest else { continue };
            if let Some(rates) = self
                .previous
                .get(&run.run)
                .and_then(|before| Rates::between(before, latest))
            {
                self.rates.insert(run.run.clone(), rates);
            }
            self.previous.insert(run.run.clone(), latest.clone());
        }
        let names: Vec<&str> = self.runs.iter().map(|r| r.run.as_str()).collect();
        self.previous
            .retain(|name, _| names.contains(&name.as_str()));
        self.rates.retain(|name, _| names.contains(&name.as_str()));
        let selected = self.table.selected().unwrap_or(0);
        self.table
            .select(Some(selected.min(self.runs.len().saturating_sub(1))));
        if let Some(name) = &self.detail {
            if names.contains(&name.as_str()) {
                self.live = Some(Detail::read(name));
            } else {
                self.status = Status {
                    text: format!("{name} has ended"),
                    error: false,
                };
                self.detail = None;
                self.live = None;
            }
        }
    }

    /// The run the keys act on: the one shown in detail, else the selected row.
    fn current(&self) -> Option<&LiveRun> {
        match &self.detail {
            Some(name) => self.runs.iter().find(|r| &r.run == name),
            None => self.runs.get(self.table.selected()?),
        }
    }

    fn key(&mut self, key: KeyEvent) -> Next {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Next::Quit;
        }
        if let Some(prompt) = self.prompt.as_mut() {
            match key.code {
                KeyCode::Esc => self.prompt = None,
                KeyCode::Enter => {
                    if let Some(prompt) = self.prompt.take() {
                        self.submit(prompt);
                    }
                }
                KeyCode::Backspace => {
                    prompt.text.pop();
                }
                KeyCode::Char(c) => prompt.text.push(c),
                _ => {}
            }
            return Next::Stay;
        }
        let ask = match key.code {
            KeyCode::Char('q') => return Next::Quit,
            KeyCode::Esc if self.detail.is_none() => return Next::Quit,
            KeyCode::Esc | KeyCode::Backspace | KeyCode::Left => {
                self.detail = None;
                self.live = None;
                return Next::Stay;
            }
            KeyCode::Up | KeyCode::Char('k') if self.detail.is_none() => {
                self.table.select_previous();
                return Next::Stay;
            }
            KeyCode::Down | KeyCode::Char('j') if self.detail.is_none() => {
                let last = self.runs.len().saturating_sub(1);
                let next = self.table.selected().map_or(0, |i| (i + 1).min(last));
                self.table.select(Some(next));
                return Next::Stay;
            }
            KeyCode::Enter | KeyCode::Right if self.detail.is_none() => {
                if let Some(run) = self.current() {
                    let name = run.run.clone();
                    self.live = Some(Detail::read(&name));
                    self.detail = Some(name);
                }
                return Next::Stay;
            }
            KeyCode::Char('r') => Ask::EgressRate,
            KeyCode::Char('i') => Ask::IngressRate,
            KeyCode::Char('s') => Ask::Set,
            KeyCode::Char('b') => Ask::TopUp,
            KeyCode::Char('f') => Ask::Fault,
            _ => return Next::Stay,
        };
        match self.current() {
            Some(run) => {
                self.prompt = Some(Prompt {
                    ask,
                    run: run.run.clone(),
                    text: String::new(),
                })
            }
            None => {
                self.status = Status {
                    text: "no run to change".into(),
                    error: true,
                }
            }
        }
        Next::Stay
    }

    /// Does what a prompt asked, through the functions of `nbt set`, `nbt balance` and
    /// `nbt fault`.
    fn submit(&mut self, prompt: Prompt) {
        let Prompt { ask, run, text } = prompt;
        let text = text.trim();
        let done = match ask {
            Ask::EgressRate => set_flags(&run, &["--egress-rate", text]),
            Ask::IngressRate => set_flags(&run, &["--ingress-rate", text]),
            Ask::Set => set_flags(&run, &text.split_whitespace().collect::<Vec<_>>()),
            Ask::TopUp => parse_amount("the amount", text)
                .map_err(anyhow::Error::from)
                .and_then(|micro| add_balance(&run, micro)),
            Ask::Fault => self.start_fault(&run, text),
        };
        self.status = match done {
            Ok(text) => Status { text, error: false },
            Err(err) => Status {
                text: format!("{err:#}"),
                error: true,
            },
        };
        // What changed shows at once, not at the next second.
        self.refresh();
    }

    /// Starts a fault in its own thread (it lasts until it is put back).
    fn start_fault(&mut self, run: &str, text: &str) -> Result<String> {
        let words = text.split_whitespace();
        let fault = FaultLine::try_parse_from(std::iter::once("fault").chain(words))
            .map_err(clap_error)?
            .fault;
        let kind = fault.kind.clone();
        let end = self.end_fault;
        let name = run.to_string();
        let thread = std::thread::spawn(move || inject_fault(&name, &fault, &end));
        self.faults.push(Fault {
            run: run.into(),
            kind: kind.clone(),
            thread,
        });
        Ok(format!("{run}: fault {kind} started"))
    }

    /// Reports the faults that have ended; whether any had.
    fn reap_faults(&mut self) -> bool {
        let (ended, running): (Vec<Fault>, Vec<Fault>) = std::mem::take(&mut self.faults)
            .into_iter()
            .partition(|f| f.thread.is_finished());
        self.faults = running;
        let any = !ended.is_empty();
        for fault in ended {
            self.status = fault_status(fault);
        }
        any
    }

    /// Ends the faults still running (what they changed put back), waits for them; a line
    /// for each of their events.
    fn end_faults(&mut self) -> Vec<String> {
        for fault in &self.faults {
            // SAFETY: pthread_kill of a thread this process started and has not joined; the
            // signal is blocked there and taken by its sigtimedwait.
            unsafe { libc::pthread_kill(fault.thread.as_pthread_t(), libc::SIGUSR1) };
        }
        std::mem::take(&mut self.faults)
            .into_iter()
            .map(|f| fault_status(f).text)
            .collect()
    }

    /// New lines on stderr into the status bar; whether there were any.
    fn take_stderr(&mut self) -> bool {
        let Some(lines) = &self.stderr else {
            return false;
        };
        let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
        let Some(last) = lines.last() else {
            return false;
        };
        self.status = Status {
            text: last.clone(),
            error: true,
        };
        lines.clear();
        true
    }
}

/// A fault's end, for the status bar.
fn fault_status(fault: Fault) -> Status {
    let what = format!("{}: fault {}", fault.run, fault.kind);
    match fault.thread.join() {
        Ok(Ok((lines, failed))) => Status {
            text: format!("{what} ended: {}", lines.join("; ")),
            error: failed,
        },
        Ok(Err(err)) => Status {
            text: format!("{what}: {err:#}"),
            error: true,
        },
        Err(_) => Status {
            text: format!("{what}: its thread panicked"),
            error: true,
        },
    }
}

/// `nbt set`'s flags, as typed at the prompt.
#[derive(Parser)]
#[command(name = "nbt set", no_binary_name = true)]
struct SetLine {
    #[command(flatten)]
    net: NetArgs,
}

/// `nbt fault`'s arguments, as typed at the prompt.
#[derive(Parser)]
#[command(name = "nbt fault")]
struct FaultLine {
    #[command(flatten)]
    fault: FaultArgs,
}

/// `nbt set RUN FLAGS`, as `nbt set` does it.
fn set_flags(run: &str, flags: &[&str]) -> Result<String> {
    let net = SetLine::try_parse_from(flags).map_err(clap_error)?.net;
    set_network(run, &net)
}

/// clap's error, on one line.
fn clap_error(err: clap::Error) -> anyhow::Error {
    anyhow::anyhow!(crate::error::PlanError(super::clap_line(&err)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_two_samples_and_none_from_one_seen_twice() {
        let sample = |t: f64, cpu: f64, out: f64, joules: f64| {
            BTreeMap::from([
                ("t_seconds".to_string(), t),
                ("cpu_seconds".to_string(), cpu),
                ("egress_passed_bytes".to_string(), out),
                ("joules".to_string(), joules),
            ])
        };
        let before = sample(10.0, 1.0, 1000.0, 50.0);
        let after = sample(12.0, 2.0, 251_000.0, 70.0);
        let rates = Rates::between(&before, &after).unwrap();
        assert_eq!(rates.cpu_cores, Some(0.5));
        assert_eq!(rates.egress_bits, Some(1_000_000.0));
        assert_eq!(rates.ingress_bits, None);
        assert_eq!(rates.watts, Some(10.0));
        assert!(Rates::between(&after, &after).is_none());
    }

    #[test]
    fn the_prompts_parse_as_nbt_set_and_nbt_fault_do() {
        let net = SetLine::try_parse_from(["--egress-rate", "5mbit", "--loss", "1%"])
            .unwrap()
            .net;
        assert_eq!(net.egress_rate.as_deref(), Some("5mbit"));
        assert_eq!(net.loss.as_deref(), Some("1%"));
        let err = clap_error(SetLine::try_parse_from(["--egress"]).err().unwrap());
        assert!(err.to_string().contains("--egress"), "{err}");
        let fault = FaultLine::try_parse_from(["fault", "brownout", "5s", "--cpus", "0.5"])
            .unwrap()
            .fault;
        assert_eq!(fault.kind, "brownout");
        assert_eq!(fault.duration.as_deref(), Some("5s"));
        assert_eq!(fault.cpus.as_deref(), Some("0.5"));
    }
}
