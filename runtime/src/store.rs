//! What SoulBox keeps across restarts, in sled: one tree per kind of record, each value a
//! JSON document. Every write is flushed before it returns, so a record survives even a
//! `kill -9` of the server right after the call.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Failure to read or write the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption, the store is open in another process).
    #[error("the store at {path}: {message}")]
    Sled {
        /// The store's directory.
        path: PathBuf,
        /// What sled said.
        message: String,
    },
    /// A record does not decode (written by an incompatible version).
    #[error("a record in the store does not decode: {0}")]
    Decode(String),
}

/// The store: a sled database in its own directory.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| StoreError::Sled { path: dir.to_owned(), message: e.to_string() })?;
        Ok(Self { path: dir.to_owned(), db })
    }

    fn error(&self, e: &sled::Error) -> StoreError {
        StoreError::Sled { path: self.path.clone(), message: e.to_string() }
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(name).map_err(|e| self.error(&e))
    }

    /// Writes `value` under `key` in `tree`, durably.
    pub fn put<T: Serialize>(&self, tree: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Decode(e.to_string()))?;
        let tree = self.tree(tree)?;
        tree.insert(key.as_bytes(), bytes).map_err(|e| self.error(&e))?;
        tree.flush().map_err(|e| self.error(&e))?;
        Ok(())
    }

    /// The value under `key` in `tree`, if any.
    pub fn get<T: DeserializeOwned>(&self, tree: &str, key: &str) -> Result<Option<T>, StoreError> {
        let value = self.tree(tree)?.get(key.as_bytes()).map_err(|e| self.error(&e))?;
        value
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Decode(e.to_string()))
            })
            .transpose()
    }

    /// Removes `key` from `tree`, durably; whether it was there.
    pub fn remove(&self, tree: &str, key: &str) -> Result<bool, StoreError> {
        let tree = self.tree(tree)?;
        let removed = tree.remove(key.as_bytes()).map_err(|e| self.error(&e))?;
        tree.flush().map_err(|e| self.error(&e))?;
        Ok(removed.is_some())
    }

    /// The values of `tree` with keys from `start` (inclusive) to `end` (exclusive), in key
    /// order, at most `limit` of them.
    pub fn range<T: DeserializeOwned>(
        &self,
        tree: &str,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        self.tree(tree)?
            .range(start.as_bytes()..end.as_bytes())
            .values()
            .take(limit)
            .map(|value| {
                let value = value.map_err(|e| self.error(&e))?;
                serde_json::from_slice(&value).map_err(|e| StoreError::Decode(e.to_string()))
            })
            .collect()
    }

    /// Every value of `tree`, in key order.
    pub fn all<T: DeserializeOwned>(&self, tree: &str) -> Result<Vec<T>, StoreError> {
        self.tree(tree)?
            .iter()
            .values()
            .map(|value| {
                let value = value.map_err(|e| self.error(&e))?;
                serde_json::from_slice(&value).map_err(|e| StoreError::Decode(e.to_string()))
            })
            .collect()
    }
}
