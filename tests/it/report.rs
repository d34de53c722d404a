//! `nbt report`: a real run's report (a memory cap, a rate limit stepped up by a schedule,
//! traffic through it) rendered by headless Chromium: the page loads without a console message,
//! its charts are in the DOM with their lines, user text stays text, and it screenshots.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nbt_integration_tests::{nbt, nbt_command, run_testbin, NoLeftovers, Run};

/// Headless Chromium, or a failure naming what installs it: never a silent skip.
fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser"] {
        if let Some(path) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        }) {
            return path;
        }
    }
    panic!(
        "chromium is missing: the report tests render the HTML in headless Chromium; \
         `cargo xtask setup` installs it (Debian's `chromium` package)"
    );
}

/// Chromium run headless on a file, with a profile of its own (none shared between runs), under
/// a time limit.
fn chromium_on(html: &Path, profile: &Path, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("120")
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("running chromium");
    assert_eq!(
        out.status.code(),
        Some(0),
        "chromium failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The page's DOM after loading, and what Chromium logged while loading it.
fn dom_and_log(html: &Path, scratch: &Path) -> (String, String) {
    let out = chromium_on(
        html,
        &scratch.join("profile-dom"),
        &["--enable-logging=stderr", "--v=0", "--dump-dom"],
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Console messages (a script's error, a resource that failed to load) in Chromium's log.
fn console_messages(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught") || l.contains("net::ERR_"))
        .collect()
}

/// A screenshot of the page; checks it is a PNG of the window's size with something in it.
fn screenshot(html: &Path, scratch: &Path, png: &Path) {
    chromium_on(
        html,
        &scratch.join("profile-shot"),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1340,2400",
        ],
    );
    let mut bytes = Vec::new();
    std::fs::File::open(png)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()))
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((be32(16), be32(20)), (1340, 2400), "the PNG's size");
    // A blank page of that size compresses to a few KiB; charts and tables do not.
    assert!(
        bytes.len() > 60_000,
        "a near-empty screenshot: {} bytes",
        bytes.len()
    );
}

/// The points of each `<polyline>` inside the chart `title`'s element of the DOM.
fn chart_lines(dom: &str, title: &str) -> Vec<usize> {
    let start = dom
        .find(&format!("data-chart=\"{title}\""))
        .unwrap_or_else(|| panic!("no chart {title:?} in the DOM"));
    let chart = &dom[start..];
    let chart = &chart[..chart.find("</svg>").expect("the chart's </svg>")];
    chart
        .split("<polyline")
        .skip(1)
        .map(|p| {
            p.split("points=\"")
                .nth(1)
                .and_then(|p| p.split('"').next())
                .unwrap_or("")
                .split_whitespace()
                .count()
        })
        .collect()
}

#[test]
fn a_runs_report_renders_in_chromium_with_its_charts_events_and_receipt() {
    chromium();
    let guard = NoLeftovers::new();
    let scratch = tempfile::tempdir().unwrap();
    let schedule = guard.home().join("step.toml");
    std::fs::write(
        &schedule,
        "[[step]]\nat = \"1s\"\negress-rate = \"16mbit\"\n",
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut sink = Vec::new();
        stream.read_to_end(&mut sink).expect("read");
        sink.len()
    });
    // Memory taken, then 3 MB sent: 1 s at 8mbit (1 MB/s), the rest at 16mbit. The last word
    // of the command line is HTML, which the report must show as text.
    let testbin = nbt_integration_tests::testbin();
    let script = format!(
        "\"$0\" alloc 24 && \"$0\" sleep 1 && \"$0\" tcp-send {addr} 3000000; \
         : '<b>bold</b> & <script>alert(1)</script>'"
    );
    let run: Run = nbt(&[
        "run",
        "--json",
        "--memory",
        "64M",
        "--egress-rate",
        "8mbit",
        "--series-interval",
        "100ms",
        "--schedule",
        schedule.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
        testbin.to_str().unwrap(),
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert_eq!(receiver.join().unwrap(), 3_000_000);
    let name = run.summary_str("/run");

    // The default file: RUN.html in the current directory, its path printed.
    let out = nbt_command()
        .args(["report", &name])
        .current_dir(scratch.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = scratch.path().join(format!("{name}.html"));
    assert_eq!(stdout.trim(), html.to_str().unwrap());
    let text = std::fs::read_to_string(&html).unwrap();
    // Self-contained: nothing to fetch, no script; the only URL is SVG's namespace.
    for fetch in [
        "<script", "<link", "<img", " src=\"", " href=\"", "url(", "@import",
    ] {
        assert!(!text.contains(fetch), "{fetch} in the report");
    }
    assert_eq!(
        text.matches("http").count(),
        text.matches("http://www.w3.org/2000/svg").count()
    );

    let (dom, log) = dom_and_log(&html, scratch.path());
    let console = console_messages(&log);
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(
        dom.contains(&format!("<h1>nbt report: {name}</h1>")),
        "{dom}"
    );
    // The command's HTML is text, not elements.
    assert!(dom.contains("&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!dom.contains("<b>bold") && !dom.contains("<script"));
    // The verification passed, with the receipt's hashes beside it.
    assert!(dom.contains("PASS: "), "{dom}");
    assert!(dom.contains("chain intact"));
    let receipt_hash = run.summary_str("/receipt/receipt_hash");
    assert!(dom.contains(&receipt_hash), "no {receipt_hash}");
    assert!(dom.contains(&run.summary_str("/series/sha256")));
    // A chart per measured series; the measured lines have a point per sample (about 30).
    let charts = dom.matches("<div class=\"chart\"").count();
    assert!(charts >= 5, "{charts} charts");
    assert!(dom.matches("<svg").count() >= charts);
    for title in ["Memory", "CPU", "Egress rate", "Ingress rate"] {
        let lines = chart_lines(&dom, title);
        assert!(lines.iter().any(|&n| n >= 15), "{title}: {lines:?}");
    }
    // The step: in the event table, and a numbered marker on the charts.
    assert!(
        dom.contains("<td>step</td><td>step (line 1)</td><td>egress rate 16mbit</td>"),
        "{dom}"
    );
    assert!(
        dom.contains("swap_limit_bytes"),
        "the settings not in force"
    );
    screenshot(&html, scratch.path(), &scratch.path().join("report.png"));

    // -o FILE, and a run named by its receipt number.
    let seq = run.u64("/receipt/seq").to_string();
    let other = scratch.path().join("by-seq.html");
    let out = nbt_command()
        .args(["report", &seq, "-o", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(std::fs::read_to_string(&other).unwrap().contains(&name));
    guard.assert_clean();
}

#[test]
fn a_report_shows_a_failed_verification_with_its_reason() {
    let guard = NoLeftovers::new();
    let scratch = tempfile::tempdir().unwrap();
    let run = run_testbin(&["--series-interval", "100ms"], &["sleep", "1"]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let name = run.summary_str("/run");
    // Someone else's key: every signature fails to check.
    let other_key = scratch.path().join("other.key");
    let pem = nbt_command()
        .env("NBT_KEY", &other_key)
        .args(["receipts", "pubkey"])
        .output()
        .unwrap();
    let pubkey = scratch.path().join("other.pub");
    std::fs::write(&pubkey, &pem.stdout).unwrap();
    let html = scratch.path().join("r.html");
    let out = nbt_command()
        .args(["report", &name, "-o", html.to_str().unwrap(), "--pubkey"])
        .arg(&pubkey)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(
        text.contains("class=\"fail\" id=\"verification\">FAIL: receipt 1:"),
        "{text}"
    );
    assert!(!text.contains("PASS"));
    // A run the store does not have: an error, no file.
    let out = nbt_command()
        .args(["report", "nbt-0000000000000000", "-o"])
        .arg(scratch.path().join("none.html"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run receipt of nbt-0000000000000000"));
    assert!(!scratch.path().join("none.html").exists());
    guard.assert_clean();
}
