//! Resource limits of a sandbox and of one execution.
//!
//! Every limit has a named default and a named maximum. A request may lower any limit freely and
//! raise it up to the maximum; [`Limits::validate`] refuses anything beyond, naming the limit.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Memory an execution may use when the request does not say: 512 MiB, E2B's default.
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// The most memory an execution may ask for: 4 GiB, a wasm32 linear memory's whole range.
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// The least memory an execution may ask for; below this no interpreter starts.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// Wall-clock time an execution may take when the request does not say.
pub const DEFAULT_WALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wall-clock time an execution may ask for: one hour.
pub const MAX_WALL_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Bytes of standard output kept per execution by default; the rest is cut with a marker.
pub const DEFAULT_STDOUT_BYTES: u64 = 1 << 20;
/// Bytes of standard error kept per execution by default.
pub const DEFAULT_STDERR_BYTES: u64 = 1 << 20;
/// The most output per stream an execution may ask to keep.
pub const MAX_OUTPUT_BYTES: u64 = 64 << 20;

/// The largest source code accepted in one execution request: 1 MiB.
pub const MAX_CODE_BYTES: usize = 1 << 20;

/// Limits applied to one execution. Every field has a default, so a request can name only the
/// ones it wants to change. Unknown fields are refused rather than ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory the guest may use, in bytes (linear memory in WASM, the cgroup in native).
    pub memory_bytes: u64,
    /// Wall-clock time from start to end, in milliseconds.
    #[serde(rename = "timeout_ms", with = "duration_ms")]
    pub wall_timeout: Duration,
    /// Standard output kept, in bytes; output beyond it ends the execution.
    pub stdout_bytes: u64,
    /// Standard error kept, in bytes; output beyond it ends the execution.
    pub stderr_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            wall_timeout: DEFAULT_WALL_TIMEOUT,
            stdout_bytes: DEFAULT_STDOUT_BYTES,
            stderr_bytes: DEFAULT_STDERR_BYTES,
        }
    }
}

/// A limit outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit `{name}` is {value}, outside the allowed range {min}..={max}")]
pub struct LimitsError {
    /// The limit's field name as it appears in requests.
    pub name: &'static str,
    /// The value asked for.
    pub value: u64,
    /// The smallest allowed value.
    pub min: u64,
    /// The largest allowed value.
    pub max: u64,
}

impl Limits {
    /// Checks every limit against its range.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let timeout_ms = u64::try_from(self.wall_timeout.as_millis()).unwrap_or(u64::MAX);
        let max_timeout_ms = u64::try_from(MAX_WALL_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        let checks = [
            ("memory_bytes", self.memory_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES),
            ("timeout_ms", timeout_ms, 1, max_timeout_ms),
            ("stdout_bytes", self.stdout_bytes, 0, MAX_OUTPUT_BYTES),
            ("stderr_bytes", self.stderr_bytes, 0, MAX_OUTPUT_BYTES),
        ];
        for (name, value, min, max) in checks {
            if value < min || value > max {
                return Err(LimitsError { name, value, min, max });
            }
        }
        Ok(())
    }

    /// The output cap of one stream.
    pub fn output_cap(&self, stream: OutputStream) -> u64 {
        match stream {
            OutputStream::Stdout => self.stdout_bytes,
            OutputStream::Stderr => self.stderr_bytes,
        }
    }
}

/// One of the two output streams of an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl std::fmt::Display for OutputStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        })
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Limits::default().validate(), Ok(()));
    }

    #[test]
    fn partial_json_keeps_other_defaults() {
        let limits: Limits = serde_json::from_str(r#"{"timeout_ms": 250}"#).expect("valid json");
        assert_eq!(limits.wall_timeout, Duration::from_millis(250));
        assert_eq!(limits.memory_bytes, DEFAULT_MEMORY_BYTES);
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = serde_json::from_str::<Limits>(r#"{"memory": 1}"#).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `memory`"), "{err}");
    }

    #[test]
    fn memory_above_maximum_is_refused() {
        let limits = Limits { memory_bytes: MAX_MEMORY_BYTES + 1, ..Limits::default() };
        let err = limits.validate().expect_err("too much memory");
        assert_eq!(err.name, "memory_bytes");
    }

    #[test]
    fn zero_timeout_is_refused() {
        let limits = Limits { wall_timeout: Duration::ZERO, ..Limits::default() };
        assert_eq!(limits.validate().map_err(|e| e.name), Err("timeout_ms"));
    }
}
