//! The receipt store: one SQLite file (WAL, synchronous=FULL), one transaction per receipt.
//!
//! `receipts` holds each receipt's canonical body with its hash and signature; a few fields are
//! copied into columns for listing, and `verify` checks they match the body. `head` holds the last
//! receipt's number and hash, signed, so that removing receipts from the end shows too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use sha2::{Digest as _, Sha256};

use super::body::{Receipt, GENESIS};
use super::canonical;
use super::key::{hex, home, NodeKey};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    run TEXT,
    task_name TEXT,
    body TEXT NOT NULL,
    receipt_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    key_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    receipt_hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    run TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
";

/// The value of `meta.format` in a store this version writes.
const STORE_FORMAT: &str = "nbt.receipts/v1";

/// The store's file: `NBT_RECEIPTS`, else `receipts.db` in nbt's home (`/var/lib/nbt`).
pub fn default_path() -> PathBuf {
    std::env::var_os("NBT_RECEIPTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join("receipts.db"))
}

/// One stored receipt, as the table holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub seq: i64,
    pub kind: String,
    pub timestamp: String,
    pub run: Option<String>,
    pub task_name: Option<String>,
    pub body: String,
    pub receipt_hash: String,
    pub signature: String,
    pub key_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub seq: i64,
    pub receipt_hash: String,
    pub signature: String,
}

/// What the head's signature covers.
pub fn head_message(seq: i64, receipt_hash: &str) -> String {
    format!("nbt.receipts-head/v1 {seq} {receipt_hash}")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SQLite's file beside the database: `receipts.db-wal`, `receipts.db-shm`.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Puts the store in WAL mode. Turning a new store to WAL takes an exclusive lock without
/// waiting in SQLite's busy handler, so two runs making the store at once would see "database is
/// locked": the change is tried again, for as long as the busy timeout.
fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            done => return done,
        }
    }
}

/// How long a store waits for another nbt holding it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens the store at `path` to write to it, making it (and its directory) when absent.
    ///
    /// The store is private: its directory is made 0700 when nbt makes it (`$NBT_HOME` is
    /// checked and tightened), and the database is made empty with mode 0600 before SQLite
    /// opens it, since SQLite gives its `-wal` and `-shm` files the database's mode (and would
    /// make the database 0644 itself). A store an older nbt made 0644 is tightened, said once.
    pub fn open(path: &Path) -> Result<Store> {
        super::key::make_parent(path)
            .with_context(|| format!("making the receipts directory of {}", path.display()))?;
        if !crate::sys::private::create_empty(path)? {
            for file in [
                path.to_path_buf(),
                sidecar(path, "-wal"),
                sidecar(path, "-shm"),
            ] {
                crate::sys::private::tighten_file(&file, "the receipt store")?;
            }
        }
        Self::connect(path)
    }

    /// Opens a store that must already exist (to read or verify it); its files are not changed.
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.exists() {
            bail!(
                "no receipt store at {} (`nbt run` makes it; --receipts PATH or NBT_RECEIPTS names another)",
                path.display()
            );
        }
        Self::connect(path)
    }

    fn connect(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the receipt store {}", path.display()))?;
        Self::prepare(conn, path)
    }

    fn prepare(conn: Connection, path: &Path) -> Result<Store> {
        let context = || format!("preparing the receipt store {}", path.display());
        conn.busy_timeout(BUSY_TIMEOUT).with_context(context)?;
        // WAL: a reader never blocks the writer; FULL: a committed receipt survives power loss,
        // not only a killed process.
        set_wal(&conn).with_context(context)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .with_context(context)?;
        conn.execute_batch(SCHEMA).with_context(|| {
            format!(
                "{} is not an nbt receipt store (or is damaged)",
                path.display()
            )
        })?;
        let format: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .optional()
            .with_context(context)?;
        match format.as_deref() {
            Some(STORE_FORMAT) => {}
            None => {
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?1)",
                    [STORE_FORMAT],
                )
                .with_context(context)?;
            }
            Some(other) => bail!(
                "{} holds receipts of format {other}; this nbt reads {STORE_FORMAT}",
                path.display()
            ),
        }
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `receipt` as the next link of the chain (setting its `seq` and `prev_hash`),
    /// signed by `key`, in one transaction, with a run's time series (`(run, body)`; the receipt
    /// holds the body's hash) stored beside it. Returns its number and hash.
    pub fn append(
        &mut self,
        key: &NodeKey,
        receipt: &mut Receipt,
        series: Option<(&str, &str)>,
    ) -> Result<(i64, String)> {
        let path = self.path.display().to_string();
        // IMMEDIATE: take the write lock before reading the head, so two nbt processes appending
        // at once still make one chain.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .with_context(|| format!("locking the receipt store {path}"))?;
        let last: Option<(i64, String)> = tx
            .query_row("SELECT seq, receipt_hash FROM head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let (seq, prev_hash) = match last {
            Some((seq, hash)) => (seq + 1, hash),
            None => {
                let rows: i64 = tx.query_row("SELECT count(*) FROM receipts", [], |r| r.get(0))?;
                if rows > 0 {
                    bail!("the receipt store {path} has receipts but no head: it was altered; run `nbt receipts verify`");
                }
                (1, GENESIS.to_string())
            }
        };
        receipt.seq = seq as u64;
        receipt.prev_hash = prev_hash;
        let value = serde_json::to_value(&*receipt).context("encoding the receipt")?;
        let body = canonical::encode(&value).context("encoding the receipt canonically")?;
        let hash = sha256_hex(body.as_bytes());
        let signature = hex(&key.sign(body.as_bytes()));
        let head_signature = hex(&key.sign(head_message(seq, &hash).as_bytes()));
        tx.execute(
            "INSERT INTO receipts (seq, kind, timestamp, run, task_name, body, receipt_hash, signature, key_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                seq,
                receipt.kind.as_str(),
                receipt.timestamp,
                receipt.run,
                receipt.task_name,
                body,
                hash,
                signature,
                receipt.key_id
            ],
        )?;
        tx.execute(
            "INSERT INTO head (id, seq, receipt_hash, signature) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET seq = ?1, receipt_hash = ?2, signature = ?3",
            params![seq, hash, head_signature],
        )?;
        if let Some((run, body)) = series {
            tx.execute(
                "INSERT INTO series (run, body) VALUES (?1, ?2)",
                params![run, body],
            )
            .with_context(|| format!("storing the time series of run {run}"))?;
        }
        tx.commit()
            .with_context(|| format!("writing a receipt to {path}"))?;
        Ok((seq, hash))
    }

    pub fn rows(&self) -> Result<Vec<Row>> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, kind, timestamp, run, task_name, body, receipt_hash, signature, key_id
             FROM receipts ORDER BY seq",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Row {
                    seq: r.get(0)?,
                    kind: r.get(1)?,
                    timestamp: r.get(2)?,
                    run: r.get(3)?,
                    task_name: r.get(4)?,
                    body: r.get(5)?,
                    receipt_hash: r.get(6)?,
                    signature: r.get(7)?,
                    key_id: r.get(8)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<Row>>>()
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(rows)
    }

    /// Every stored time series: (run, body).
    pub fn series(&self) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT run, body FROM series ORDER BY run")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(rows)
    }

    /// The time series of `run`, when stored.
    pub fn series_of(&self, run: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT body FROM series WHERE run = ?1", [run], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn head(&self) -> Result<Option<Head>> {
        Ok(self
            .conn
            .query_row(
                "SELECT seq, receipt_hash, signature FROM head WHERE id = 1",
                [],
                |r| {
                    Ok(Head {
                        seq: r.get(0)?,
                        receipt_hash: r.get(1)?,
                        signature: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two `nbt run`s started together both open (and may both make) the store: each must get
    /// it, never "database is locked" (seen in CI: one of two runs started at once failed so).
    #[test]
    fn runs_opening_a_new_store_at_once_all_get_it() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("receipts.db");
            std::thread::scope(|scope| {
                let openers: Vec<_> = (0..8)
                    .map(|_| scope.spawn(|| Store::open(&path).map(|_| ())))
                    .collect();
                for opener in openers {
                    opener.join().unwrap().unwrap();
                }
            });
        }
    }
}
