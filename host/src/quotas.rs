//! Quotas per team, enforced when a sandbox is made: how many live sandboxes (running or
//! paused) the team may hold, the longest timeout and the largest memory limit one may have.
//! A team without a quota is held only by the server's own maxima.

use serde::{Deserialize, Serialize};
use soulbox_runtime::{Store, StoreError};

/// The store's tree of quotas, by team.
const QUOTAS: &str = "quotas";

/// A team's quota; absent fields are not limited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Live sandboxes (running or paused) at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_live_sandboxes: Option<u32>,
    /// The longest timeout of a sandbox, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout_secs: Option<u64>,
    /// The largest memory limit of a sandbox, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
}

/// The quotas of a server's teams.
#[derive(Debug)]
pub struct Quotas {
    store: Store,
}

impl Quotas {
    /// The quotas kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The quota of `team` (none set: no limit).
    pub fn get(&self, team: &str) -> Result<Quota, StoreError> {
        Ok(self.store.get(QUOTAS, team)?.unwrap_or_default())
    }

    /// Sets the quota of `team`.
    pub fn set(&self, team: &str, quota: &Quota) -> Result<(), StoreError> {
        self.store.put(QUOTAS, team, quota)
    }
}
