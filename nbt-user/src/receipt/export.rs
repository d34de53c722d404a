//! Receipts for other tools: JSON Lines, or in-toto Statements v1 in DSSE envelopes.

use anyhow::{Context as _, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use super::key::{key_id, NodeKey};
use super::store::Row;

/// One line per receipt: the body as an object (its RFC 8785 form is what was hashed and signed),
/// with its number, hash and signature.
pub fn jsonl_line(row: &Row) -> Result<String> {
    let body: Value = serde_json::from_str(&row.body)
        .with_context(|| format!("receipt {}: the body is not JSON", row.seq))?;
    Ok(json!({
        "seq": row.seq,
        "receipt_hash": row.receipt_hash,
        "signature": row.signature,
        "key_id": row.key_id,
        "receipt": body,
    })
    .to_string())
}

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "urn:nbt:receipt:v1";
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// DSSE's pre-authentication encoding: what an envelope's signature covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A model hash as an in-toto digest set: `sha256:HEX`, `sha512:HEX`, or bare 64 hex digits.
fn digest_set(hash: &str) -> Option<Value> {
    let (algorithm, digest) = match hash.split_once(':') {
        Some((algorithm, digest)) => (algorithm.to_ascii_lowercase(), digest),
        None if hash.len() == 64 => ("sha256".to_string(), hash),
        None => return None,
    };
    let hexadecimal = !digest.is_empty() && digest.chars().all(|c| c.is_ascii_hexdigit());
    hexadecimal.then(|| json!({ algorithm: digest.to_ascii_lowercase() }))
}

/// The statement of one receipt: the model hashes it names are its subjects (the receipt itself
/// when it names none), the receipt with its hash and signature the predicate.
pub fn statement(row: &Row) -> Result<Value> {
    let body: Value = serde_json::from_str(&row.body)
        .with_context(|| format!("receipt {}: the body is not JSON", row.seq))?;
    let mut subjects = Vec::new();
    for (field, name) in [
        ("adapter_hash", "adapter"),
        ("base_model_hash", "base_model"),
    ] {
        if let Some(digest) = body.get(field).and_then(Value::as_str).and_then(digest_set) {
            subjects.push(json!({ "name": name, "digest": digest }));
        }
    }
    if subjects.is_empty() {
        subjects.push(json!({
            "name": format!("nbt-receipt-{}", row.seq),
            "digest": { "sha256": row.receipt_hash },
        }));
    }
    Ok(json!({
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "receipt": body,
            "receipt_hash": row.receipt_hash,
            "signature": row.signature,
            "key_id": row.key_id,
        },
    }))
}

/// The statement in a DSSE envelope signed by the node's key.
pub fn dsse_envelope(row: &Row, key: &NodeKey) -> Result<Value> {
    let payload = statement(row)?.to_string().into_bytes();
    let b64 = base64::engine::general_purpose::STANDARD;
    let signature = key.sign(&pae(PAYLOAD_TYPE, &payload));
    Ok(json!({
        "payloadType": PAYLOAD_TYPE,
        "payload": b64.encode(&payload),
        "signatures": [{ "keyid": key_id(&key.public()), "sig": b64.encode(signature) }],
    }))
}

/// For messages: a short form of a hash.
pub fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_as_the_dsse_spec_writes_it() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn digests_from_model_hashes() {
        let h = "ab".repeat(32);
        assert_eq!(digest_set(&h), Some(json!({"sha256": h})));
        assert_eq!(
            digest_set(&format!("SHA256:{h}")),
            Some(json!({"sha256": h}))
        );
        assert_eq!(digest_set("v1.2"), None);
        assert_eq!(digest_set("sha256:xyz"), None);
    }
}
