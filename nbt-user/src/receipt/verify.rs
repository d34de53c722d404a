//! Checking a store with nothing but its rows and a public key: every body is canonical, every
//! hash is the sha256 of its body, every body links to the hash before it, every signature is the
//! key's, the copied columns match their bodies, and the signed head names the last receipt.
//! Editing, removing, inserting or reordering receipts breaks at least one of these.

use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::Value;

use super::body::{FORMAT, GENESIS};
use super::canonical;
use super::key::{key_id, unhex};
use super::store::{head_message, sha256_hex, Head, Row};

/// The first thing wrong with a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The receipt it concerns (its position in the chain), or `None` for the store as a whole.
    pub seq: Option<i64>,
    pub why: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "receipt {seq}: {}", self.why),
            None => f.write_str(&self.why),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub receipts: usize,
    pub last_hash: Option<String>,
}

fn signature_ok(key: &VerifyingKey, message: &[u8], hex_sig: &str) -> bool {
    let Some(bytes) = unhex(hex_sig) else {
        return false;
    };
    let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else {
        return false;
    };
    key.verify_strict(message, &Signature::from_bytes(&bytes))
        .is_ok()
}

/// Checks one row against the one before it; `prev_hash` is the previous receipt's hash.
fn check_row(
    row: &Row,
    expected_seq: i64,
    prev_hash: &str,
    key: &VerifyingKey,
) -> Result<(), String> {
    if row.seq != expected_seq {
        return Err(if row.seq > expected_seq {
            format!(
                "the chain jumps from receipt {} to {}: receipt {expected_seq} was removed",
                expected_seq - 1,
                row.seq
            )
        } else {
            format!("out of order: expected receipt {expected_seq}")
        });
    }
    let body: Value = serde_json::from_str(&row.body)
        .map_err(|e| format!("the body is not JSON ({e}): it was altered"))?;
    match canonical::encode(&body) {
        Ok(text) if text == row.body => {}
        _ => return Err("the body is not in the canonical encoding: it was altered".into()),
    }
    let actual = sha256_hex(row.body.as_bytes());
    if actual != row.receipt_hash {
        return Err(format!(
            "its hash {} is not the sha256 of its body ({actual}): the body or the hash was altered",
            row.receipt_hash
        ));
    }
    if !signature_ok(key, row.body.as_bytes(), &row.signature) {
        return Err(format!(
            "the signature is not {}'s over this body: forged, altered, or signed by another key",
            key_id(key)
        ));
    }
    let field = |name: &str| body.get(name).cloned().unwrap_or(Value::Null);
    if field("format") != FORMAT {
        return Err(format!("its format is {}, not {FORMAT}", field("format")));
    }
    if field("seq") != row.seq {
        return Err(format!(
            "its body says it is receipt {}, but it is stored as receipt {}: receipts were reordered or inserted",
            field("seq"),
            row.seq
        ));
    }
    if field("prev_hash") != prev_hash {
        return Err(format!(
            "it links to {} but receipt {} has hash {prev_hash}: a receipt before it was removed, inserted, reordered or altered",
            field("prev_hash"),
            row.seq - 1
        ));
    }
    let columns: [(&str, Value); 5] = [
        ("kind", Value::from(row.kind.clone())),
        ("timestamp", Value::from(row.timestamp.clone())),
        (
            "run",
            row.run.clone().map(Value::from).unwrap_or(Value::Null),
        ),
        (
            "task_name",
            row.task_name
                .clone()
                .map(Value::from)
                .unwrap_or(Value::Null),
        ),
        ("key_id", Value::from(row.key_id.clone())),
    ];
    for (name, column) in columns {
        if field(name) != column {
            return Err(format!(
                "its {name} column says {column} but its signed body says {}: the column was altered",
                field(name)
            ));
        }
    }
    Ok(())
}

/// Verifies `rows` (in stored order) and `head` with `key`.
pub fn verify(rows: &[Row], head: Option<&Head>, key: &VerifyingKey) -> Result<Verified, Failure> {
    let mut prev_hash = GENESIS.to_string();
    for (i, row) in rows.iter().enumerate() {
        check_row(row, i as i64 + 1, &prev_hash, key).map_err(|why| Failure {
            seq: Some(row.seq),
            why,
        })?;
        prev_hash = row.receipt_hash.clone();
    }
    let last = rows.last();
    match (head, last) {
        (None, None) => {}
        (None, Some(last)) => {
            return Err(Failure {
                seq: Some(last.seq),
                why: "the store has no signed head: it was removed".into(),
            })
        }
        (Some(head), _) => {
            if !signature_ok(
                key,
                head_message(head.seq, &head.receipt_hash).as_bytes(),
                &head.signature,
            ) {
                return Err(Failure {
                    seq: None,
                    why: format!(
                        "the head's signature (naming receipt {}) is not {}'s: the head was altered",
                        head.seq,
                        key_id(key)
                    ),
                });
            }
            let (last_seq, last_hash) = last
                .map(|r| (r.seq, r.receipt_hash.as_str()))
                .unwrap_or((0, GENESIS));
            if head.seq != last_seq || head.receipt_hash != last_hash {
                return Err(Failure {
                    seq: Some(head.seq.max(last_seq)),
                    why: if head.seq > last_seq {
                        format!(
                            "the signed head names receipt {} ({}), but the store ends at receipt {last_seq}: receipts were removed from the end",
                            head.seq, head.receipt_hash
                        )
                    } else {
                        format!(
                            "the store ends at receipt {last_seq} but the signed head names receipt {} ({}): receipts were added without the key",
                            head.seq, head.receipt_hash
                        )
                    },
                });
            }
        }
    }
    Ok(Verified {
        receipts: rows.len(),
        last_hash: last.map(|r| r.receipt_hash.clone()),
    })
}
/// Checks the stored time series against the run receipts that hold their hashes (in the
/// summary's `series.sha256`): each stored series is named by a receipt and has its hash, and
/// each series a receipt names is stored. Call it after [`verify`] passed. Returns how many
/// series were checked.
pub fn verify_series(rows: &[Row], series: &[(String, String)]) -> Result<usize, Failure> {
    let mut named = std::collections::BTreeMap::new();
    for row in rows.iter().filter(|r| r.kind == "run") {
        let Ok(body) = serde_json::from_str::<Value>(&row.body) else {
            continue;
        };
        if let (Some(run), Some(hash)) = (
            row.run.as_deref(),
            body.pointer("/summary/series/sha256")
                .and_then(Value::as_str),
        ) {
            named.insert(run.to_string(), (row.seq, hash.to_string()));
        }
    }
    for (run, body) in series {
        let Some((seq, expected)) = named.remove(run) else {
            return Err(Failure {
                seq: None,
                why: format!(
                    "a time series of run {run} is stored, but no run receipt names it: it was inserted"
                ),
            });
        };
        let actual = sha256_hex(body.as_bytes());
        if actual != expected {
            return Err(Failure {
                seq: Some(seq),
                why: format!(
                    "the time series of run {run} has sha256 {actual}, but its receipt says {expected}: the series was altered"
                ),
            });
        }
    }
    if let Some((run, (seq, _))) = named.into_iter().next() {
        return Err(Failure {
            seq: Some(seq),
            why: format!(
                "the receipt names a time series of run {run}, which is not stored: it was removed"
            ),
        });
    }
    Ok(series.len())
}
