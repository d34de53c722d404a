//! `cargo xtask fuzz`: each cargo-fuzz target of `fuzz/` run for a while under libFuzzer, with
//! its executions, coverage and crashes (docs/fuzzing.md).
//!
//! The corpus of a target is `fuzz/corpus/TARGET` (its committed `seed-*` inputs and what the
//! fuzzer kept), its dictionary `fuzz/dict/TARGET.dict` (keys, units and numbers it is made of),
//! what crashed it `fuzz/artifacts/TARGET/`, and the fuzzer's whole output of the last run
//! `fuzz/artifacts/TARGET.log`.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::{output, NIGHTLY};

/// The cargo-fuzz installed when none is: the version the targets were last run with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// A single input taking longer than this (seconds) is reported as a timeout: every parser
/// fuzzed here reads a few KiB in microseconds.
const UNIT_TIMEOUT_S: u64 = 10;

/// What one target's run did, read from libFuzzer's output.
#[derive(Debug, Default, PartialEq)]
struct Figures {
    execs: Option<u64>,
    cov: Option<u64>,
    /// Crashes, timeouts and out-of-memory inputs.
    crashes: u64,
}

/// The number after `key` (`cov:`) in `line`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The figures of a libFuzzer run from its output: the executions from its final statistics
/// (else its last status line), the coverage from its last status line; crashes from fork
/// mode's `oom/timeout/crash: A/B/C` counts, or the crash reports of a plain run.
fn figures(log: &str) -> Figures {
    let mut figures = Figures::default();
    // A plain run stops at its first crash.
    let mut plain_crashes = 0;
    let mut fork_crashes = None;
    for line in log.lines() {
        if line.starts_with('#') && line.contains("cov: ") {
            figures.execs = number_after(line, "#").or(figures.execs);
            figures.cov = number_after(line, "cov:").or(figures.cov);
            if let Some(at) = line.find("oom/timeout/crash:") {
                let counts = line[at + "oom/timeout/crash:".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("");
                fork_crashes = Some(
                    counts
                        .split('/')
                        .filter_map(|n| n.parse::<u64>().ok())
                        .sum(),
                );
            }
        } else if line.starts_with("stat::number_of_executed_units:") {
            figures.execs = number_after(line, "units:");
        } else if line.starts_with("==") && line.contains("ERROR: libFuzzer:")
            || line.starts_with("==") && line.contains("ERROR: AddressSanitizer")
        {
            plain_crashes = 1;
        }
    }
    figures.crashes = fork_crashes.unwrap_or(plain_crashes);
    figures
}

/// The fuzz targets: the files of `fuzz/fuzz_targets`.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    Ok(names)
}

fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// cargo-fuzz, installed when missing.
fn install_cargo_fuzz() -> Result<()> {
    if output("cargo", &["fuzz", "--version"]).is_some() {
        return Ok(());
    }
    eprintln!(
        "xtask fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (runs the fuzz targets under \
         libFuzzer; a few minutes)"
    );
    crate::check(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
}

/// Runs `target` for `seconds` and returns its figures. `keep_going`: libFuzzer's fork mode,
/// which goes on past crashes, timeouts and OOMs (each is counted and saved), so that a target
/// with a known crash still gets its whole time.
fn run_target(root: &Path, target: &str, seconds: u64, keep_going: bool) -> Result<Figures> {
    let fuzz_dir = root.join("fuzz");
    let artifacts = fuzz_dir.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("making {}", artifacts.display()))?;
    let before = files_in(&artifacts);
    let mut args: Vec<String> = [
        &format!("+{NIGHTLY}"),
        "fuzz",
        "run",
        "--fuzz-dir",
        "fuzz",
        target,
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("-max_total_time={seconds}"));
    args.push(format!("-timeout={UNIT_TIMEOUT_S}"));
    args.push("-print_final_stats=1".into());
    let dict = fuzz_dir.join("dict").join(format!("{target}.dict"));
    if dict.exists() {
        args.push(format!("-dict={}", dict.display()));
    }
    if keep_going {
        args.extend(
            [
                "-fork=1",
                "-ignore_crashes=1",
                "-ignore_timeouts=1",
                "-ignore_ooms=1",
            ]
            .map(String::from),
        );
    }
    eprintln!(
        "xtask fuzz: {target} for {seconds} s: cargo {}",
        args.join(" ")
    );
    // Through rustup's `cargo` proxy, which reads `+nightly`; not $CARGO, the stable toolchain's.
    let mut child = Command::new("cargo")
        .args(&args)
        .current_dir(root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo fuzz")?;
    // libFuzzer writes to stderr, cargo-fuzz's summary of a crash to stdout: both shown as they
    // come, and kept.
    let stdout = child.stdout.take().expect("piped stdout");
    let echo = std::thread::spawn(move || {
        let mut kept = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            kept.push_str(&line);
            kept.push('\n');
        }
        kept
    });
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().expect("piped stderr"))
        .lines()
        .map_while(Result::ok)
    {
        eprintln!("{line}");
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    log.push_str(&echo.join().unwrap_or_default());
    let log_path = fuzz_dir.join("artifacts").join(format!("{target}.log"));
    std::fs::write(&log_path, &log).with_context(|| format!("writing {}", log_path.display()))?;
    let mut figures = figures(&log);
    let new: Vec<PathBuf> = files_in(&artifacts).difference(&before).cloned().collect();
    if figures.execs.is_none() && !status.success() {
        bail!(
            "cargo fuzz run {target} failed before fuzzing (see {})",
            log_path.display()
        );
    }
    // A crash libFuzzer reported but left no input of (or the reverse) still counts.
    figures.crashes = figures.crashes.max(new.len() as u64);
    if !keep_going && !status.success() {
        figures.crashes = figures.crashes.max(1);
    }
    for path in &new {
        eprintln!("xtask fuzz: {target}: saved {}", path.display());
    }
    Ok(figures)
}

pub fn fuzz(root: &Path, seconds: u64, only: Option<&str>, keep_going: bool) -> Result<ExitCode> {
    let fuzz_dir = root.join("fuzz");
    let all = targets(&fuzz_dir)?;
    let chosen: Vec<String> = match only {
        Some(name) if all.iter().any(|t| t == name) => vec![name.to_string()],
        Some(name) => bail!("no fuzz target '{name}'; the targets: {}", all.join(", ")),
        None => all,
    };
    install_cargo_fuzz()?;
    let mut results = Vec::new();
    for target in &chosen {
        results.push((target, run_target(root, target, seconds, keep_going)?));
    }
    let show = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
    eprintln!("\nxtask fuzz: {seconds} s per target");
    eprintln!(
        "{:<12} {:>14} {:>8} {:>8}",
        "target", "executions", "cov", "crashes"
    );
    for (target, f) in &results {
        eprintln!(
            "{:<12} {:>14} {:>8} {:>8}",
            target,
            show(f.execs),
            show(f.cov),
            f.crashes
        );
    }
    if results.iter().any(|(_, f)| f.crashes > 0) {
        eprintln!("xtask fuzz: crashes found: their inputs are in fuzz/artifacts/TARGET/ (docs/fuzzing.md)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_a_plain_run() {
        let log = "INFO: Seed: 1\n\
            #2\tINITED cov: 120 ft: 130 corp: 10/200b exec/s: 0 rss: 40Mb\n\
            #4096\tpulse  cov: 410 ft: 900 corp: 50/1Kb lim: 40 exec/s: 2048 rss: 50Mb\n\
            #90000\tDONE   cov: 433 ft: 1000 corp: 60/2Kb lim: 80 exec/s: 3000 rss: 60Mb\n\
            Done 90000 runs in 31 second(s)\n\
            stat::number_of_executed_units: 90001\n";
        assert_eq!(
            figures(log),
            Figures {
                execs: Some(90001),
                cov: Some(433),
                crashes: 0
            }
        );
    }

    #[test]
    fn figures_of_a_crash() {
        let log = "#512\tNEW    cov: 50 ft: 60 corp: 5/50b lim: 4 exec/s: 0 rss: 30Mb\n\
            thread '<unnamed>' panicked at nbt-user/src/x.rs:1:1:\n\
            ==1234== ERROR: libFuzzer: deadly signal\n\
            stat::number_of_executed_units: 600\n";
        assert_eq!(
            figures(log),
            Figures {
                execs: Some(600),
                cov: Some(50),
                crashes: 1
            }
        );
    }

    #[test]
    fn figures_of_a_fork_run() {
        let log = "INFO: -fork=1: fuzzing in separate process(s)\n\
            #1000: cov: 300 ft: 400 corp: 20 exec/s: 500 oom/timeout/crash: 0/0/0 time: 3s job: 1 dft_time: 0\n\
            ==99== ERROR: libFuzzer: deadly signal\n\
            #50000: cov: 350 ft: 420 corp: 25 exec/s: 900 oom/timeout/crash: 1/0/2 time: 60s job: 9 dft_time: 0\n\
            INFO: exiting: 0 time: 61s\n";
        assert_eq!(
            figures(log),
            Figures {
                execs: Some(50000),
                cov: Some(350),
                crashes: 3
            }
        );
    }
}
