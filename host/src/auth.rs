//! API keys, teams and roles.
//!
//! A key has E2B's form, `e2b_` and 40 hex digits, so the SDKs send it unchanged as
//! `X-API-KEY` (the native API also takes `Authorization: Bearer <key>`). It is kept only as a
//! salted SHA-256 hash in the store, under its id (the first 12 hex digits, which `list` shows);
//! a presented key is hashed and compared in constant time, and an unknown id costs the same
//! work as a known one. A key belongs to a team and has a role: viewers read, members create
//! and run, admins also manage the team's keys. A team's key never sees another team's
//! sandboxes: they answer 404, as missing ones do.
//!
//! At the start of `soulbox serve`, `SOULBOX_ADMIN_KEY` (when set) is registered as an admin
//! key of the default team; otherwise, when the store holds no key, one is made and printed
//! once. Repeated failures from one address are answered 429 for a while.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soulbox_runtime::{Store, StoreError};
use subtle::ConstantTimeEq;

/// The team of keys made without one, and of the bootstrap key.
pub const DEFAULT_TEAM: &str = "default";

/// The store's tree of keys.
const KEYS: &str = "api_keys";

/// How many hex digits of a key name it (its id).
const KEY_ID_DIGITS: usize = 12;

/// Hex digits after `e2b_` in a key.
const KEY_SECRET_DIGITS: usize = 40;

/// Failed attempts allowed from one address per [`FAILURE_WINDOW`].
const MAX_FAILURES: u32 = 20;
/// The window failures are counted in, and how long an address is then refused.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads sandboxes.
    Viewer,
    /// Creates, runs, pauses and kills sandboxes.
    Member,
    /// Also manages the team's keys.
    Admin,
}

impl Role {
    /// The role called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "viewer" => Some(Self::Viewer),
            "member" => Some(Self::Member),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// Who made a request: the key's id, team and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id.
    pub key_id: String,
    /// Its team.
    pub team: String,
    /// Its role.
    pub role: Role,
}

/// A key as stored: never the key itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    id: String,
    team: String,
    role: Role,
    name: String,
    /// Hex.
    salt: String,
    /// Hex of SHA-256(salt, key).
    hash: String,
    created_at_ms: u64,
    revoked: bool,
}

/// A key as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Its id (the first digits of the key).
    pub id: String,
    /// Its team.
    pub team: String,
    /// Its role.
    pub role: Role,
    /// Its name, for people.
    pub name: String,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Whether it was revoked.
    pub revoked: bool,
}

impl From<&KeyRecord> for KeyInfo {
    fn from(record: &KeyRecord) -> Self {
        Self {
            id: record.id.clone(),
            team: record.team.clone(),
            role: record.role,
            name: record.name.clone(),
            created_at_ms: record.created_at_ms,
            revoked: record.revoked,
        }
    }
}

/// Why a key was not accepted or a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No key was given.
    #[error("an API key is required: send it as X-API-KEY (or Authorization: Bearer)")]
    Missing,
    /// The key is malformed, unknown or revoked (deliberately not said which).
    #[error("the API key is not valid")]
    Invalid,
    /// Too many failures from this address.
    #[error("too many failed attempts from this address; retry in {} s", FAILURE_WINDOW.as_secs())]
    RateLimited,
    /// A key given to register has not E2B's form.
    #[error("a key has the form e2b_ followed by {KEY_SECRET_DIGITS} lower-case hex digits")]
    Malformed,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The keys of a server.
#[derive(Debug)]
pub struct Keys {
    store: Store,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(digits: usize) -> String {
    let mut text = String::new();
    while text.len() < digits {
        text.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    text.truncate(digits);
    text
}

fn digest(salt: &str, key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(salt.as_bytes());
    hasher.update(key.as_bytes());
    hex(&hasher.finalize())
}

/// The id of a well-formed key.
fn key_id(key: &str) -> Option<&str> {
    let secret = key.strip_prefix("e2b_")?;
    let well_formed = secret.len() == KEY_SECRET_DIGITS
        && secret.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then(|| &secret[..KEY_ID_DIGITS])
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl Keys {
    /// The keys kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store, failures: Mutex::default() }
    }

    fn record(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.store.get(KEYS, id)
    }

    /// Makes a key; returns it (the only time it is seen) and what is kept of it.
    pub fn create(
        &self,
        team: &str,
        role: Role,
        name: &str,
    ) -> Result<(String, KeyInfo), AuthError> {
        loop {
            let key = format!("e2b_{}", random_hex(KEY_SECRET_DIGITS));
            let Some(id) = key_id(&key) else { continue };
            if self.record(id)?.is_some() {
                continue; // an id taken already: draw again
            }
            let info = self.store_key(&key, team, role, name)?;
            return Ok((key, info));
        }
    }

    /// Registers a key given from outside (`SOULBOX_ADMIN_KEY`); an already registered key is
    /// left as it is.
    pub fn register(
        &self,
        key: &str,
        team: &str,
        role: Role,
        name: &str,
    ) -> Result<KeyInfo, AuthError> {
        let id = key_id(key).ok_or(AuthError::Malformed)?;
        if let Some(record) = self.record(id)? {
            return Ok(KeyInfo::from(&record));
        }
        self.store_key(key, team, role, name)
    }

    fn store_key(
        &self,
        key: &str,
        team: &str,
        role: Role,
        name: &str,
    ) -> Result<KeyInfo, AuthError> {
        let id = key_id(key).ok_or(AuthError::Malformed)?;
        let salt = random_hex(32);
        let record = KeyRecord {
            id: id.to_owned(),
            team: team.to_owned(),
            role,
            name: name.to_owned(),
            hash: digest(&salt, key),
            salt,
            created_at_ms: now_ms(),
            revoked: false,
        };
        self.store.put(KEYS, id, &record)?;
        Ok(KeyInfo::from(&record))
    }

    /// Whether no key was ever made.
    pub fn is_empty(&self) -> Result<bool, AuthError> {
        Ok(self.store.all::<KeyRecord>(KEYS)?.is_empty())
    }

    /// The keys of `team`.
    pub fn list(&self, team: &str) -> Result<Vec<KeyInfo>, AuthError> {
        let records = self.store.all::<KeyRecord>(KEYS)?;
        Ok(records.iter().filter(|r| r.team == team).map(KeyInfo::from).collect())
    }

    /// Revokes key `id` of `team`; whether there was one.
    pub fn revoke(&self, id: &str, team: &str) -> Result<bool, AuthError> {
        let Some(mut record) = self.record(id)?.filter(|r| r.team == team) else {
            return Ok(false);
        };
        record.revoked = true;
        self.store.put(KEYS, id, &record)?;
        Ok(true)
    }

    /// Who `key` is, from `source`: the same work for every kind of wrong key.
    pub fn verify(
        &self,
        key: Option<&str>,
        source: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        self.check_source(source)?;
        let result = match key {
            None => Err(AuthError::Missing),
            Some(key) => self.check(key),
        };
        if result.is_err() {
            self.count_failure(source);
        }
        result
    }

    /// Refuses an address that failed too often lately.
    pub fn check_source(&self, source: Option<IpAddr>) -> Result<(), AuthError> {
        match source {
            Some(source) if self.refused(source) => Err(AuthError::RateLimited),
            _ => Ok(()),
        }
    }

    /// Who key `id` is, unless it is unknown or revoked (for signatures and tokens made with
    /// it, which stop working with it).
    pub fn principal(&self, id: &str) -> Option<Principal> {
        let record = self.record(id).ok()??;
        (!record.revoked).then_some(Principal {
            key_id: record.id,
            team: record.team,
            role: record.role,
        })
    }

    fn check(&self, key: &str) -> Result<Principal, AuthError> {
        let record = key_id(key).map(|id| self.record(id)).transpose()?.flatten();
        // An unknown or malformed key is hashed against a stand-in, so that it takes as long.
        let (salt, expected) = match &record {
            Some(record) => (record.salt.as_str(), record.hash.as_str()),
            None => ("0", "0"),
        };
        let matches: bool = digest(salt, key).as_bytes().ct_eq(expected.as_bytes()).into();
        match record {
            Some(record) if matches && !record.revoked => {
                Ok(Principal { key_id: record.id, team: record.team, role: record.role })
            }
            _ => Err(AuthError::Invalid),
        }
    }

    fn refused(&self, source: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        failures.get(&source).is_some_and(|(since, count)| {
            since.elapsed() < FAILURE_WINDOW && *count >= MAX_FAILURES
        })
    }

    /// Counts a failed attempt from `source`.
    pub fn count_failure(&self, source: Option<IpAddr>) {
        let Some(source) = source else { return };
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget addresses whose window has passed, so the table stays small.
        failures.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        let entry = failures.entry(source).or_insert((Instant::now(), 0));
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (Keys, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("a directory");
        let store = Store::open(dir.path()).expect("a store");
        (Keys::new(store), dir)
    }

    #[test]
    fn a_made_key_verifies_and_is_stored_only_hashed() {
        let (keys, dir) = keys();
        let (key, info) = keys.create("t", Role::Member, "ci").expect("a key");
        assert!(key_id(&key).is_some(), "{key}");
        let principal = keys.verify(Some(&key), None).expect("valid");
        assert_eq!((principal.team.as_str(), principal.role), ("t", Role::Member));
        assert_eq!(principal.key_id, info.id);
        drop(keys);
        let mut stored = Vec::new();
        for entry in walk(dir.path()) {
            stored.extend(std::fs::read(entry).unwrap_or_default());
        }
        let secret = &key[4..];
        assert!(
            !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the key is on disk"
        );
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).expect("a directory").flatten() {
            let path = entry.path();
            if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
        }
        files
    }

    #[test]
    fn wrong_malformed_missing_and_revoked_keys_are_refused() {
        let (keys, _dir) = keys();
        let (key, info) = keys.create("t", Role::Admin, "").expect("a key");
        let mut wrong = key.clone();
        wrong.replace_range(20..21, if &key[20..21] == "a" { "b" } else { "a" });
        for bad in [Some(wrong.as_str()), Some("e2b_123"), Some("nope"), None] {
            assert!(keys.verify(bad, None).is_err(), "{bad:?}");
        }
        assert!(!keys.revoke(&info.id, "other team").expect("revoke"), "another team's key");
        assert!(keys.revoke(&info.id, "t").expect("revoke"));
        assert!(matches!(keys.verify(Some(&key), None), Err(AuthError::Invalid)));
    }

    #[test]
    fn failures_from_one_address_are_rate_limited() {
        let (keys, _dir) = keys();
        let (key, _) = keys.create("t", Role::Viewer, "").expect("a key");
        let source: IpAddr = "192.0.2.1".parse().expect("an address");
        for _ in 0..MAX_FAILURES {
            assert!(matches!(keys.verify(Some("nope"), Some(source)), Err(AuthError::Invalid)));
        }
        assert!(matches!(keys.verify(Some(&key), Some(source)), Err(AuthError::RateLimited)));
        let other: IpAddr = "192.0.2.2".parse().expect("an address");
        assert!(keys.verify(Some(&key), Some(other)).is_ok(), "another address is not affected");
    }
}
