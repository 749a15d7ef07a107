//! How much memory the host (or the cgroup the server runs in) has left: what admission
//! control and the pools of prepared sandboxes look at before they take more.

/// The host's memory, in bytes (0 when `/proc/meminfo` cannot be read).
pub fn total_bytes() -> u64 {
    meminfo_field("MemTotal:").unwrap_or(0)
}

/// The memory the server may still take, in bytes: the host's available memory
/// (`MemAvailable`), or what the server's own cgroup (v2, or v1's memory controller) still
/// allows, whichever is less.
pub fn available_bytes() -> u64 {
    let host = meminfo_field("MemAvailable:").unwrap_or(u64::MAX);
    host.min(cgroup_headroom_bytes().unwrap_or(u64::MAX))
}

fn meminfo_field(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// What the server's cgroup still allows, if it sets a memory limit.
fn cgroup_headroom_bytes() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |path: String| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (limit, used) = if controllers.is_empty() {
            // cgroup v2 ("max" does not parse: no limit).
            let dir = format!("/sys/fs/cgroup{path}");
            (read(format!("{dir}/memory.max"))?, read(format!("{dir}/memory.current"))?)
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            (
                read(format!("{dir}/memory.limit_in_bytes"))?,
                read(format!("{dir}/memory.usage_in_bytes"))?,
            )
        } else {
            return None;
        };
        Some(limit.saturating_sub(used))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_has_memory_and_some_is_available() {
        let (total, available) = (super::total_bytes(), super::available_bytes());
        assert!(total > 0 && available > 0, "total {total}, available {available}");
        assert!(available <= total, "available {available} of {total}");
    }
}
