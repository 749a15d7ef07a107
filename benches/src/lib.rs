//! Helpers for SoulBox's benchmarks: percentiles and the process's resident memory.

use std::time::Duration;

/// The `p`-th percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted[index]
}

/// This process's resident set size in bytes, from `/proc/self/status`.
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Formats a duration in milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// The resident set size in bytes of process `pid`, from `/proc/<pid>/status`; `None` when it
/// cannot be read (the process is gone, or this is not Linux).
pub fn resident_bytes_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// The resident set size in bytes of `soulbox serve` with process id `pid` and of its WASM
/// workers (its children running `soulbox wasm-worker`), where its WASM kernels live; `None`
/// when the server's cannot be read.
pub fn server_resident_bytes(pid: u32) -> Option<u64> {
    let server = resident_bytes_of(pid)?;
    let workers: u64 =
        soulbox_tests::wasm_worker_pids(pid).into_iter().filter_map(resident_bytes_of).sum();
    Some(server + workers)
}

/// A duration in milliseconds, as a float (for JSON reports).
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A byte count in mebibytes, as a float (for reports).
pub fn mebibytes(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}
