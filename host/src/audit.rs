//! The audit log: one record per state-changing call to the control plane or the native API,
//! and per refused attempt (a missing or wrong key, a role too low, another team's sandbox):
//! who (the key's id and team), what (method and path), the outcome (status), when and from
//! where. Records are appended to the store, ordered by time; the API only reads them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use soulbox_runtime::{Store, StoreError};

use crate::auth::now_ms;

/// The store's tree of audit records.
const AUDIT: &str = "audit";

/// The most records one query returns.
pub const MAX_AUDIT_PAGE: usize = 10_000;

/// One audited call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The key's id (`-` when no valid key was shown).
    pub key_id: String,
    /// The key's team (`-` when no valid key was shown).
    pub team: String,
    /// The method and path called.
    pub action: String,
    /// The answer's status.
    pub status: u16,
    /// The client's address.
    pub source: String,
}

/// The audit log of a server.
#[derive(Debug)]
pub struct AuditLog {
    store: Store,
    sequence: AtomicU64,
}

/// A record's key: its time then a sequence number, so that keys sort by time.
fn key(at_ms: u64, sequence: u64) -> String {
    format!("{at_ms:020}-{sequence:020}")
}

impl AuditLog {
    /// The log kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store, sequence: AtomicU64::new(0) }
    }

    /// Appends a record (made now).
    pub fn append(
        &self,
        key_id: &str,
        team: &str,
        action: String,
        status: u16,
        source: String,
    ) -> Result<(), StoreError> {
        let at_ms = now_ms();
        let record = AuditRecord {
            at_ms,
            key_id: key_id.to_owned(),
            team: team.to_owned(),
            action,
            status,
            source,
        };
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.store.put(AUDIT, &key(at_ms, sequence), &record)
    }

    /// The records from `since_ms` until `until_ms`, of `team` (all teams when `None`), oldest
    /// first, at most `limit` (up to [`MAX_AUDIT_PAGE`]).
    pub fn query(
        &self,
        since_ms: u64,
        until_ms: u64,
        team: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = limit.clamp(1, MAX_AUDIT_PAGE);
        let records: Vec<AuditRecord> =
            self.store.range(AUDIT, &key(since_ms, 0), &key(until_ms, 0), usize::MAX)?;
        Ok(records
            .into_iter()
            .filter(|r| team.is_none_or(|team| r.team == team))
            .take(limit)
            .collect())
    }
}
