//! Receipts: every run and every reported learning update ends in one, signed by the node's key
//! and chained by hash to the one before, so that a third party holding the store and the public
//! key can check that none was altered, removed, inserted or reordered (docs/receipts.md).

pub(crate) mod body;
pub(crate) mod canonical;
pub(crate) mod export;
pub(crate) mod key;
pub(crate) mod store;
pub(crate) mod verify;

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

pub use body::{Kind, Receipt};
use key::NodeKey;
use store::Store;

/// Where a receipt went, for the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Written {
    pub seq: i64,
    pub receipt_hash: String,
    pub store: PathBuf,
    pub key_id: String,
}

/// The store and the key a run writes its receipts with, opened before the workload starts so
/// that a store or key problem stops the run before anything ran.
pub struct Writer {
    store: Store,
    key: NodeKey,
    key_id: String,
}

impl Writer {
    pub fn open(store: &Path) -> Result<Writer> {
        let key = NodeKey::load_or_create(&key::default_key_path())?;
        let key_id = key::key_id(&key.public());
        Ok(Writer {
            store: Store::open(store)?,
            key,
            key_id,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn write(&mut self, receipt: &mut Receipt) -> Result<Written> {
        self.write_with_series(receipt, None)
    }

    /// Writes a run's receipt and, in the same transaction, its time series (`(run, body)`).
    pub fn write_with_series(
        &mut self,
        receipt: &mut Receipt,
        series: Option<(&str, &str)>,
    ) -> Result<Written> {
        receipt.key_id = self.key_id.clone();
        let (seq, receipt_hash) = self.store.append(&self.key, receipt, series)?;
        Ok(Written {
            seq,
            receipt_hash,
            store: self.store.path().to_path_buf(),
            key_id: self.key_id.clone(),
        })
    }
}
