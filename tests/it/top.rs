//! `nbt top` in a terminal of fixed size (a tmux server of the test's own): a real run's row,
//! its charts and events, and keys that top up its balance, change its rate and inject a fault,
//! each seen through `nbt ps --json` as `nbt balance`, `nbt set` and `nbt fault` would make it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbt_integration_tests::{live_runs, nbt_bin, nbt_command, NoLeftovers};
use serde_json::Value;

/// How long anything the test waits for may take, with a CPU kept busy.
const DEADLINE: Duration = Duration::from_secs(30);

/// A tmux server on a socket of the test's own, with one session running `command`; killed on
/// drop, with what runs in it.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!("nbt-test-top-{}", std::process::id()),
        };
        let mut start = tmux.command();
        // The server's environment is the session's: nbt's, as every test's nbt gets it.
        let nbt = nbt_command();
        for (key, value) in nbt.get_envs() {
            match value {
                Some(value) => start.env(key, value),
                None => start.env_remove(key),
            };
        }
        let status = start
            .args(["new-session", "-d", "-s", "top", "-x", "160", "-y", "48"])
            .arg(command)
            .status()
            .expect("running tmux (`cargo xtask setup` installs it)");
        assert!(status.success(), "tmux new-session failed: {status}");
        tmux
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket]);
        command
    }

    /// The screen as text.
    fn screen(&self) -> String {
        let output = self
            .command()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Keys by name (`Enter`, `Escape`, `Down`) or single characters.
    fn keys(&self, keys: &[&str]) {
        let status = self
            .command()
            .args(["send-keys", "-t", "top"])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// `text` typed as it is.
    fn type_text(&self, text: &str) {
        let status = self
            .command()
            .args(["send-keys", "-t", "top", "-l", text])
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// The screen once `shows` holds for it; a failure with the screen after [`DEADLINE`].
    fn wait_for(&self, what: &str, shows: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if shows(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "nbt top did not show {what} within {DEADLINE:?}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .command()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// An `nbt run` in the background, stopped (SIGTERM, passed on to its workload) on drop.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child, not yet waited for.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// The live run named `name`, as `nbt ps --json` lists it.
fn live(name: &str) -> Option<Value> {
    live_runs().into_iter().find(|r| r["run"] == name)
}

/// Polls `nbt ps --json` until the run `name` satisfies `holds`.
fn wait_for_ps(name: &str, what: &str, holds: impl Fn(&Value) -> bool) {
    let start = Instant::now();
    loop {
        let run = live(name);
        if run.as_ref().is_some_and(&holds) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "nbt ps --json did not show {what} within {DEADLINE:?}: {run:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn top_shows_a_run_and_its_keys_change_it_as_the_commands_do() {
    let _guard = NoLeftovers::new();
    // A command no other run has, to tell this run from others on the machine.
    let seconds = format!("60.{}", std::process::id());
    // A step of its own schedule, for the run's events as they come.
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("schedule.toml");
    std::fs::write(&schedule, "[[step]]\nat = \"1s\"\nprice-call = \"0.02\"\n").unwrap();
    let run = Background(
        nbt_command()
            .args(["run", "--egress-rate", "10mbit", "--balance", "5"])
            .args(["--price-call", "0.01", "--schedule"])
            .arg(&schedule)
            .args(["--", "sleep", &seconds])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nbt run"),
    );
    let start = Instant::now();
    let name = loop {
        let found = live_runs()
            .into_iter()
            .find(|r| r["command"][1] == seconds.as_str() && r["seconds"].as_f64() > Some(0.0));
        if let Some(found) = found {
            break found["run"].as_str().unwrap().to_string();
        }
        assert!(start.elapsed() < DEADLINE, "the run did not start");
        std::thread::sleep(Duration::from_millis(100));
    };

    let top = Tmux::start(&format!(
        "{} top; echo nbt-top-exited-$?; sleep 60",
        nbt_bin().display()
    ));
    top.wait_for("the run's row", |s| {
        s.lines()
            .any(|l| l.contains(&name) && l.contains(&format!("sleep {seconds}")))
    });

    // Other runs may be listed too: down the rows until the charts are this run's.
    let mut tries = 0;
    loop {
        top.keys(&["Enter"]);
        let screen = top.wait_for("a run's charts", |s| s.contains("events ("));
        if screen.lines().next().is_some_and(|l| l.contains(&name)) {
            break;
        }
        tries += 1;
        assert!(
            tries < 20,
            "no row opened this run's charts; the screen:\n{screen}"
        );
        top.keys(&["Escape"]);
        top.wait_for("the rows again", |s| s.contains("nbt top:"));
        top.keys(&["Down"]);
    }
    for title in [
        "egress rate vs limit",
        "ingress rate vs limit",
        "memory vs cap",
        "CPU cores",
        "balance",
        "pressure (PSI stall",
        "power (d joules / dt)",
        "events (",
    ] {
        top.wait_for(title, |s| s.contains(title));
    }
    top.wait_for("the egress limit in its chart", |s| {
        s.contains("limit 10.0mbit")
    });
    top.wait_for("the schedule's step in the run's events", |s| {
        s.contains("step (line 1): price per call 0.02")
    });

    // b: top up by 3, as `nbt balance RUN add 3`.
    top.keys(&["b"]);
    top.wait_for("the top-up prompt", |s| s.contains("add to the balance"));
    top.type_text("3");
    top.keys(&["Enter"]);
    wait_for_ps(&name, "the balance topped up to 8", |r| {
        r["balance_micro"] == 8_000_000
    });
    top.wait_for("the top-up's result", |s| s.contains("balance now 8"));

    // r: the egress rate, as `nbt set RUN --egress-rate 5mbit`.
    top.keys(&["r"]);
    top.wait_for("the rate prompt", |s| s.contains("egress rate (10mbit"));
    top.type_text("5mbit");
    top.keys(&["Enter"]);
    wait_for_ps(&name, "the egress rate at 5mbit", |r| {
        r["net_limits"]["egress"]["rate_bits_per_sec"] == 5_000_000
    });
    top.wait_for("the new limit in the chart", |s| {
        s.contains("limit 5.0mbit")
    });

    // A bad value is said in the status bar; nbt top goes on.
    top.keys(&["r"]);
    top.type_text("fast");
    top.keys(&["Enter"]);
    top.wait_for("the error in the status bar", |s| {
        s.contains("invalid value 'fast' for --egress-rate")
    });
    assert_eq!(
        live(&name).unwrap()["net_limits"]["egress"]["rate_bits_per_sec"],
        5_000_000
    );

    // f: a fault, as `nbt fault RUN balance-shock --amount 1`; its events show as they come.
    top.keys(&["f"]);
    top.type_text("balance-shock --amount 1");
    top.keys(&["Enter"]);
    wait_for_ps(&name, "the balance shocked to 7", |r| {
        r["balance_micro"] == 7_000_000
    });
    top.wait_for("the fault in the run's events", |s| {
        s.contains("nbt fault balance-shock: balance -1")
    });

    // q: the terminal back as it was (the shell's line is on the normal screen), status 0.
    top.keys(&["q"]);
    top.wait_for("nbt top's exit", |s| s.contains("nbt-top-exited-0"));
    drop(top);
    drop(run);
}
