//! Receipts: written by real runs, checked by `nbt receipts verify`, attacked with plain SQL.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nbt_integration_tests::{nbt, nbt_command, nbt_with_env, NoLeftovers};
use rusqlite::{params, Connection};
use serde_json::Value;

/// A shell workload that reports one learning update per `(name, base, new)`.
fn reporting(tasks: &[(&str, f64, f64)]) -> String {
    let mut script = String::new();
    for (name, base, new) in tasks {
        script.push_str(&format!(
            "echo '{{\"task_name\":\"{name}\",\"base_loss\":{base},\"new_loss\":{new},\"adapter_hash\":\"sha256:{}\",\"base_model_hash\":\"sha256:{}\"}}' >> \"$NBT_REPORT\"\n",
            "ab".repeat(32),
            "cd".repeat(32)
        ));
    }
    script
}

fn run_sh(extra: &[&str], script: &str) -> nbt_integration_tests::Run {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    nbt(&args)
}

fn verify(store: &Path) -> (i32, String) {
    let out = nbt_command()
        .args(["receipts", "--receipts"])
        .arg(store)
        .arg("verify")
        .output()
        .expect("running nbt receipts verify");
    (
        out.status.code().expect("verify exited by a signal"),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The receipts as `nbt receipts list --json` gives them.
fn listed(store: &Path) -> Vec<Value> {
    let out = nbt_command()
        .args(["receipts", "--receipts"])
        .arg(store)
        .args(["list", "--json"])
        .output()
        .expect("running nbt receipts list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A store of 6 receipts (5 tasks and their run) made by a real run.
fn store_of_six(guard: &NoLeftovers) -> PathBuf {
    let run = run_sh(
        &[],
        &reporting(&[
            ("a", 0.7, 0.6),
            ("b", 0.6, 0.55),
            ("c", 0.55, 0.549),
            ("d", 0.549, 0.5),
            ("e", 0.5, 0.51),
        ]),
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let store = guard.home().join("receipts.db");
    assert_eq!(listed(&store).len(), 6);
    store
}

/// A copy of `store` with `edit` applied, as anyone holding the file could do it.
fn tampered(store: &Path, case: &str, edit: impl FnOnce(&Connection)) -> PathBuf {
    let copy = store.with_file_name(format!("tampered-{case}.db"));
    let _ = std::fs::remove_file(&copy);
    // VACUUM INTO: a consistent copy even while the WAL holds recent commits.
    Connection::open(store)
        .unwrap()
        .execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
        .unwrap();
    let conn = Connection::open(&copy).unwrap();
    edit(&conn);
    drop(conn);
    copy
}

/// `text` with the byte at `at` changed to another printable ASCII byte of the same kind
/// (a digit stays a digit, a hex letter a hex letter), so the edit is as small as possible.
fn flip_byte(text: &str, at: usize) -> String {
    let mut bytes = text.as_bytes().to_vec();
    bytes[at] = match bytes[at] {
        b'0'..=b'8' => bytes[at] + 1,
        b'9' => b'0',
        b'a'..=b'e' | b'A'..=b'Y' | b'g'..=b'y' => bytes[at] + 1,
        b'f' => b'a',
        b'z' | b'Z' => b'a',
        b'"' => b'\'',
        _ => b'x',
    };
    String::from_utf8(bytes).expect("ASCII edit of UTF-8 text")
}

fn assert_fails_naming(store: &Path, seq: i64, case: &str) {
    let (status, out) = verify(store);
    assert_eq!(status, 1, "{case}: verify passed a tampered store: {out}");
    assert!(
        out.contains(&format!("receipt {seq}")),
        "{case}: verify did not name receipt {seq}: {out}"
    );
}

#[test]
fn an_untouched_store_verifies_and_every_tampering_is_caught() {
    let guard = NoLeftovers::new();
    let store = store_of_six(&guard);
    let (status, out) = verify(&store);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("verified: 6 receipts"), "{out}");

    // One byte of each column of receipt 3.
    for column in [
        "kind",
        "timestamp",
        "run",
        "task_name",
        "body",
        "receipt_hash",
        "signature",
        "key_id",
    ] {
        let copy = tampered(&store, column, |c| {
            let value: String = c
                .query_row(
                    &format!("SELECT {column} FROM receipts WHERE seq = 3"),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let changed = flip_byte(&value, value.len() / 2);
            c.execute(
                &format!("UPDATE receipts SET {column} = ?1 WHERE seq = 3"),
                [changed],
            )
            .unwrap();
        });
        assert_fails_naming(&copy, 3, column);
    }
    let copy = tampered(&store, "seq", |c| {
        c.execute("UPDATE receipts SET seq = 7 WHERE seq = 3", [])
            .unwrap();
    });
    assert_fails_naming(&copy, 3, "seq");

    // One byte inside each field of receipt 3's signed body.
    let body: String = Connection::open(&store)
        .unwrap()
        .query_row("SELECT body FROM receipts WHERE seq = 3", [], |r| r.get(0))
        .unwrap();
    let fields: Vec<String> = serde_json::from_str::<serde_json::Map<String, Value>>(&body)
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(fields.len() >= 20, "{fields:?}");
    for field in &fields {
        let key_at = body.find(&format!("\"{field}\":")).unwrap();
        // The first byte of the value.
        let at = key_at + field.len() + 3;
        let copy = tampered(&store, &format!("body-{field}"), |c| {
            c.execute(
                "UPDATE receipts SET body = ?1 WHERE seq = 3",
                [flip_byte(&body, at)],
            )
            .unwrap();
        });
        assert_fails_naming(&copy, 3, &format!("body field {field}"));
    }

    // Removal: from the middle, the start and the end.
    for seq in [3, 1, 6] {
        let copy = tampered(&store, &format!("delete-{seq}"), |c| {
            c.execute("DELETE FROM receipts WHERE seq = ?1", [seq])
                .unwrap();
        });
        assert_fails_naming(&copy, seq, &format!("delete receipt {seq}"));
    }

    // Insertion: a copy of receipt 5 as a new receipt 4, the later ones moved up (as one who
    // wanted to slip in an extra update would have to).
    let copy = tampered(&store, "insert", |c| {
        for seq in (4..=6).rev() {
            c.execute("UPDATE receipts SET seq = seq + 1 WHERE seq = ?1", [seq])
                .unwrap();
        }
        c.execute(
            "INSERT INTO receipts (seq, kind, timestamp, run, task_name, body, receipt_hash, signature, key_id)
             SELECT 4, kind, timestamp, run, task_name, body, receipt_hash, signature, key_id FROM receipts WHERE seq = 6",
            [],
        )
        .unwrap();
    });
    assert_fails_naming(&copy, 4, "insert");
    // And at the end, a duplicate of the last receipt as receipt 7.
    let copy = tampered(&store, "append", |c| {
        c.execute(
            "INSERT INTO receipts (seq, kind, timestamp, run, task_name, body, receipt_hash, signature, key_id)
             SELECT 7, kind, timestamp, run, task_name, body, receipt_hash, signature, key_id FROM receipts WHERE seq = 6",
            params![],
        )
        .unwrap();
    });
    assert_fails_naming(&copy, 7, "append");

    // Reordering: receipts 2 and 3 swap places.
    let copy = tampered(&store, "swap", |c| {
        c.execute("UPDATE receipts SET seq = 100 WHERE seq = 2", [])
            .unwrap();
        c.execute("UPDATE receipts SET seq = 2 WHERE seq = 3", [])
            .unwrap();
        c.execute("UPDATE receipts SET seq = 3 WHERE seq = 100", [])
            .unwrap();
    });
    assert_fails_naming(&copy, 2, "swap");

    // The signed head: altered, or removed.
    let copy = tampered(&store, "head", |c| {
        c.execute("UPDATE head SET seq = 5", []).unwrap();
    });
    let (status, out) = verify(&copy);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("head"), "{out}");
    let copy = tampered(&store, "no-head", |c| {
        c.execute("DELETE FROM head", []).unwrap();
    });
    assert_fails_naming(&copy, 6, "head removed");

    // The original is still whole.
    assert_eq!(verify(&store).0, 0);
}

#[test]
fn another_key_does_not_verify_and_a_third_party_can_check_without_nbt() {
    let guard = NoLeftovers::new();
    let store = store_of_six(&guard);
    let pubkey = guard.home().join("node.pub");
    let out = nbt_command().args(["receipts", "pubkey"]).output().unwrap();
    assert!(out.status.success());
    std::fs::write(&pubkey, &out.stdout).unwrap();
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(guard.home().join("node.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    let check = |key: &Path| {
        nbt_command()
            .args(["receipts", "--receipts"])
            .arg(&store)
            .args(["verify", "--pubkey"])
            .arg(key)
            .output()
            .unwrap()
    };
    assert!(check(&pubkey).status.success());
    // Another node's key: a second NBT_KEY makes one.
    let other = guard.home().join("other.pub");
    let out = nbt_command()
        .env("NBT_KEY", guard.home().join("other.key"))
        .args(["receipts", "pubkey"])
        .output()
        .unwrap();
    std::fs::write(&other, &out.stdout).unwrap();
    let out = check(&other);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("receipt 1: the signature"), "{text}");

    // A third party: Python's sqlite3, hashlib and json (sorted keys, no spaces: RFC 8785 for
    // these values), and openssl for the ed25519 signatures. Nothing of nbt's.
    let dir = guard.home().join("third-party");
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        r#"
import sqlite3, hashlib, json, sys
db = sqlite3.connect("file:{store}?mode=ro", uri=True)
prev = "0" * 64
n = 0
for seq, body, h, sig in db.execute("SELECT seq, body, receipt_hash, signature FROM receipts ORDER BY seq"):
    obj = json.loads(body)
    assert json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == body, seq
    assert hashlib.sha256(body.encode()).hexdigest() == h, seq
    assert obj["prev_hash"] == prev and obj["seq"] == seq, seq
    open("{dir}/body%d" % seq, "wb").write(body.encode())
    open("{dir}/sig%d" % seq, "wb").write(bytes.fromhex(sig))
    prev = h
    n += 1
print(n)
"#,
        store = store.display(),
        dir = dir.display()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6");
    for seq in 1..=6 {
        let out = Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(&pubkey)
            .arg("-rawin")
            .arg("-in")
            .arg(dir.join(format!("body{seq}")))
            .arg("-sigfile")
            .arg(dir.join(format!("sig{seq}")))
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl refused receipt {seq}'s signature: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn updates_accepted_or_rejected_by_their_loss_drop() {
    let guard = NoLeftovers::new();
    let run = run_sh(
        &["--accept-min-delta", "0.05"],
        &format!(
            "{}echo '{{\"task_name\":\"typo\",\"base_loss\":1,\"new_los\":0.5}}' >> \"$NBT_REPORT\"\n",
            reporting(&[("big", 1.0, 0.9), ("small", 0.9, 0.86), ("worse", 0.86, 0.9)])
        ),
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let summary = run.summary.as_ref().unwrap();
    let tasks = summary["tasks"].as_array().unwrap();
    let outcome: Vec<(&str, bool)> = tasks
        .iter()
        .map(|t| {
            (
                t["task_name"].as_str().unwrap(),
                t["accepted"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(outcome, [("big", true), ("small", false), ("worse", false)]);
    let refused = summary["refused_reports"].as_array().unwrap();
    assert_eq!(refused.len(), 1);
    assert!(refused[0]["why"]
        .as_str()
        .unwrap()
        .contains("unknown field `new_los`"));
    assert!(run.stderr().contains("line 4 refused"), "{}", run.stderr());

    let receipts = listed(&guard.home().join("receipts.db"));
    assert_eq!(receipts.len(), 4);
    let small = &receipts[1]["receipt"];
    assert_eq!(small["kind"], "task");
    assert_eq!(small["task_name"], "small");
    assert_eq!(small["accepted"], false);
    assert_eq!(small["accept_min_delta"], 0.05);
    assert!(
        (small["delta"].as_f64().unwrap() - 0.04).abs() < 1e-9,
        "{small}"
    );
    assert_eq!(
        small["base_model_hash"],
        format!("sha256:{}", "cd".repeat(32))
    );
    // The joules are recorded for rejected updates too, with their source and its label.
    assert!(small["joules_spent"].as_f64().unwrap() >= 0.0, "{small}");
    let source = &small["energy"]["joules"][0];
    assert!(
        (source["source"] == "model" && source["label"] == "model")
            || (source["source"] == "rapl" && source["label"] == "measured"),
        "{small}"
    );
    let run_receipt = &receipts[3]["receipt"];
    assert_eq!(run_receipt["kind"], "run");
    assert_eq!(run_receipt["exit_status"], 0);
    assert_eq!(run_receipt["summary"]["tasks"].as_array().unwrap().len(), 3);
    assert_eq!(receipts[3]["seq"], 4);
    // The run's joules: what its tasks were charged, and what ran after the last report.
    let run_joules = run_receipt["joules_spent"].as_f64().unwrap();
    let task_joules: f64 = receipts[..3]
        .iter()
        .map(|r| r["receipt"]["joules_spent"].as_f64().unwrap())
        .sum();
    assert!(
        run_joules > 0.0 && run_joules >= task_joules - 1e-9,
        "{run_joules} < {task_joules}"
    );

    // A bad threshold is a usage error naming the flag.
    let bad = run_sh(&["--accept-min-delta", "much"], "true");
    assert_eq!(bad.status(), 2);
    assert!(
        bad.stderr().contains("--accept-min-delta"),
        "{}",
        bad.stderr()
    );
}

#[test]
fn a_store_that_cannot_be_written_stops_the_run_before_the_workload_starts() {
    let guard = NoLeftovers::new();
    let marker = guard.home().join("ran");
    let run = run_sh(
        &["--receipts", "/proc/nbt-cannot-be-here/receipts.db"],
        &format!("touch {}", marker.display()),
    );
    assert_eq!(run.status(), 125, "{}", run.stderr());
    assert!(
        run.stderr().contains("receipts directory"),
        "{}",
        run.stderr()
    );
    assert!(
        !marker.exists(),
        "the workload ran although no receipt could be written"
    );
}

/// SIGKILL nbt at random moments while its workload reports updates (each a receipt written in
/// its own transaction): the store must open and verify every time, and hold the receipts of
/// every run that completed.
#[test]
fn kill_9_while_writing_receipts_never_breaks_the_store() {
    let guard = NoLeftovers::new();
    let store = guard.home().join("receipts.db");
    let tasks: Vec<(String, f64, f64)> = (0..30)
        .map(|i| (format!("t{i}"), 1.0, 1.0 - i as f64 / 100.0))
        .collect();
    let borrowed: Vec<(&str, f64, f64)> =
        tasks.iter().map(|(n, b, e)| (n.as_str(), *b, *e)).collect();
    // The reports come 20 ms apart, so the receipts are written all through the run.
    let script = reporting(&borrowed).replace("\n", "\nsleep 0.02\n");

    // How long one run takes, to spread the kills over it.
    let started = Instant::now();
    let whole = run_sh(&[], &script);
    assert_eq!(whole.status(), 0, "{}", whole.stderr());
    let span = started.elapsed();
    let mut completed = vec![whole.u64("/receipt/seq")];
    let mut completed_runs = vec![whole.summary.as_ref().unwrap()["run"]
        .as_str()
        .unwrap()
        .to_string()];

    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}, one run takes {span:?}");
    // 30 kills (50 before: CI's 30 minutes grew tight); about 25 land mid-run.
    const RUNS: u32 = 30;
    let mut killed = 0;
    for _ in 0..RUNS {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Between 0 and 1.2 times a whole run: most kills land mid-run, some after the end.
        let delay = span.mul_f64((seed >> 33) as f64 / (1u64 << 31) as f64 * 1.2);
        let mut child = nbt_command()
            .args(["run", "--json", "--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        match out.status.code() {
            Some(0) => {
                let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
                completed.push(summary["receipt"]["seq"].as_u64().unwrap());
                completed_runs.push(summary["run"].as_str().unwrap().to_string());
            }
            _ => killed += 1,
        }
        // The killed nbt's workload goes on in its cgroup: nbt cleanup is the way to end it.
        let cleaned = nbt_command().arg("cleanup").output().unwrap();
        assert!(
            cleaned.status.success(),
            "{}",
            String::from_utf8_lossy(&cleaned.stderr)
        );
        let (status, out) = verify(&store);
        assert_eq!(status, 0, "after a kill {delay:?} into a run: {out}");
    }
    assert!(
        killed >= RUNS / 2,
        "only {killed} of {RUNS} runs were killed before their end"
    );
    let receipts = listed(&store);
    for (seq, run) in completed.iter().zip(&completed_runs) {
        let found = receipts
            .iter()
            .find(|r| r["seq"].as_u64() == Some(*seq))
            .unwrap_or_else(|| panic!("the receipt {seq} of the completed run {run} is missing"));
        assert_eq!(found["receipt"]["run"], run.as_str());
        assert_eq!(found["receipt"]["kind"], "run");
        let tasks = receipts
            .iter()
            .filter(|r| r["receipt"]["run"] == run.as_str() && r["receipt"]["kind"] == "task")
            .count();
        assert_eq!(tasks, 30, "run {run}");
    }
    eprintln!(
        "{killed} of {RUNS} runs killed; {} completed; {} receipts, all verified",
        completed.len() - 1,
        receipts.len()
    );
}

fn mode(path: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::symlink_metadata(path).unwrap().permissions())
        & 0o7777
}

#[test]
fn the_home_store_and_key_are_private_and_a_key_others_can_read_or_behind_a_link_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let guard = NoLeftovers::new();
    let home = guard.home();
    let (store, key) = (home.join("receipts.db"), home.join("node.key"));
    // A home as an older nbt made it: 0755.
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The workload sees the store's files while the run holds it open (-wal and -shm too): as
    // root (`--user root`), since nobody else may look into nbt's home.
    let script = format!(
        "stat -c '%a %n' {0} {0}-wal {0}-shm {1}",
        store.display(),
        key.display()
    );
    let run = nbt_with_env(
        &["run", "--json", "--", "sh", "-c", &script],
        &[("NBT_USER", "root")],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let seen: Vec<String> = run.stdout().lines().take(4).map(String::from).collect();
    eprintln!("made: {seen:?}");
    let modes: Vec<&str> = seen.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(modes, ["600", "600", "600", "600"], "{seen:?}");
    assert_eq!(mode(home), 0o700);
    assert!(
        run.stderr().contains("had mode 0755") && run.stderr().contains("made it 0700"),
        "{}",
        run.stderr()
    );

    // A store an older nbt made 0644: tightened, said once; its receipts still verify.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = run_sh(&[], "true");
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert!(
        run.stderr().contains("the receipt store") && run.stderr().contains("made it 0600"),
        "{}",
        run.stderr()
    );
    assert_eq!(mode(&store), 0o600);
    assert_eq!(verify(&store).0, 0);

    // A key others can read signs nothing: refused, naming the file, its mode and owner, before
    // the workload starts.
    let marker = home.join("ran");
    let touch = format!("touch {}", marker.display());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = run_sh(&[], &touch);
    eprintln!("0644 key: {}", run.stderr().trim());
    assert_eq!(run.status(), 125, "{}", run.stderr());
    assert!(
        run.stderr().contains(key.to_str().unwrap())
            && run.stderr().contains("mode 0644")
            && run.stderr().contains("owner uid 0")
            && run.stderr().contains("chmod 600"),
        "{}",
        run.stderr()
    );
    assert!(
        !marker.exists(),
        "the workload ran with a key others can read"
    );

    // A key behind a symbolic link (NBT_KEY names the link): refused, the link's target unread.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = home.join("link.key");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    let run = nbt_with_env(
        &["run", "--json", "--", "sh", "-c", &touch],
        &[("NBT_KEY", link.to_str().unwrap())],
    );
    eprintln!("linked key: {}", run.stderr().trim());
    assert_eq!(run.status(), 125, "{}", run.stderr());
    assert!(run.stderr().contains("symbolic link"), "{}", run.stderr());
    assert!(
        !marker.exists(),
        "the workload ran with a key behind a link"
    );
    guard.assert_clean();
}
