//! The seccomp-bpf policy of native sandboxes, as checked-in data.
//!
//! `policy/seccomp-x86_64.json` is in seccompiler's JSON format: a `deny` filter answering
//! EPERM (Docker's default deny list, `clone` with any namespace flag, `personality` beyond the
//! personas Docker allows) and an `enosys` filter answering ENOSYS to `clone3`, whose flags a
//! filter cannot read, so libc falls back to the filtered `clone`. Each compiled filter also
//! refuses any architecture but the host's (so `int 0x80`, the i386 ABI, is refused); a third,
//! small filter refuses the x32 ABI, whose syscall numbers carry bit 30 and so would match no
//! rule of the others.

use std::collections::HashMap;
use std::io::Cursor;

use seccompiler::{BpfProgram, TargetArch, sock_filter};

/// The policy for x86_64 hosts.
const X86_64_POLICY: &str = include_str!("../policy/seccomp-x86_64.json");

/// The order filters are installed in; every filter sees every syscall, and the kernel takes
/// the strictest answer.
const FILTER_ORDER: [&str; 2] = ["deny", "enosys"];

/// Bit 30 of a syscall number marks the x32 ABI on x86_64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Failure to build the seccomp filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The policy does not compile (an unknown syscall name, a malformed rule).
    #[error("compiling the seccomp policy: {0}")]
    Compile(String),
    /// The policy lacks a filter the sandbox installs.
    #[error("the seccomp policy has no `{0}` filter")]
    MissingFilter(&'static str),
    /// The host's architecture has no policy.
    #[error("no seccomp policy for the {0} architecture; native sandboxes are refused")]
    UnsupportedArch(&'static str),
}

/// The compiled filters, in installation order.
#[derive(Debug, Clone)]
pub struct SeccompFilters {
    programs: Vec<BpfProgram>,
}

impl SeccompFilters {
    /// Compiles the checked-in policy for the host's architecture.
    pub fn for_host() -> Result<Self, SeccompError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(SeccompError::UnsupportedArch(std::env::consts::ARCH));
        }
        Self::compile(X86_64_POLICY, TargetArch::x86_64)
    }

    fn compile(policy: &str, arch: TargetArch) -> Result<Self, SeccompError> {
        let mut compiled: HashMap<String, BpfProgram> =
            seccompiler::compile_from_json(Cursor::new(policy.as_bytes()), arch)
                .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let mut programs = Vec::with_capacity(FILTER_ORDER.len() + 1);
        programs.push(refuse_x32());
        for name in FILTER_ORDER {
            programs.push(compiled.remove(name).ok_or(SeccompError::MissingFilter(name))?);
        }
        if let Some(extra) = compiled.keys().next() {
            return Err(SeccompError::Compile(format!("filter `{extra}` is never installed")));
        }
        Ok(Self { programs })
    }

    /// The programs, in the order they are installed.
    pub fn programs(&self) -> &[BpfProgram] {
        &self.programs
    }
}

/// `ld [nr]; jset #X32_BIT, deny; ret allow; deny: ret ERRNO(EPERM)` (the architecture is
/// checked by the other filters).
fn refuse_x32() -> BpfProgram {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JMP_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_DATA_NR_OFFSET: u32 = 0;
    let eperm = u32::try_from(libc::EPERM).unwrap_or(1);
    vec![
        sock_filter { code: LD_W_ABS, jt: 0, jf: 0, k: SECCOMP_DATA_NR_OFFSET },
        sock_filter { code: JMP_JSET_K, jt: 1, jf: 0, k: X32_SYSCALL_BIT },
        sock_filter { code: RET_K, jt: 0, jf: 0, k: SECCOMP_RET_ALLOW },
        sock_filter { code: RET_K, jt: 0, jf: 0, k: SECCOMP_RET_ERRNO | eperm },
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn host_policy_compiles_into_every_filter() {
        let filters = SeccompFilters::for_host().expect("the checked-in policy compiles");
        assert_eq!(filters.programs().len(), 3);
        assert!(filters.programs().iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn policy_has_no_redundant_rules() {
        let policy: serde_json::Value = serde_json::from_str(X86_64_POLICY).expect("json");
        let mut seen = BTreeSet::new();
        for name in FILTER_ORDER {
            for rule in policy[name]["filter"].as_array().expect("a filter list") {
                // A syscall may repeat only with different argument conditions.
                let key = (rule["syscall"].to_string(), rule["args"].to_string());
                assert!(seen.insert(key.clone()), "rule {key:?} appears twice");
                let unconditional =
                    (rule["syscall"].to_string(), serde_json::Value::Null.to_string());
                if rule.get("args").is_some() {
                    assert!(
                        !seen.contains(&unconditional),
                        "{key:?} is shadowed by an unconditional rule"
                    );
                }
            }
        }
    }

    #[test]
    fn policy_covers_dockers_default_deny_list() {
        let policy: serde_json::Value = serde_json::from_str(X86_64_POLICY).expect("json");
        let denied: BTreeSet<&str> = policy["deny"]["filter"]
            .as_array()
            .expect("rules")
            .iter()
            .filter_map(|r| r["syscall"].as_str())
            .collect();
        for syscall in [
            "mount",
            "umount2",
            "pivot_root",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
            "unshare",
            "setns",
            "clone",
            "userfaultfd",
            "io_uring_setup",
            "open_by_handle_at",
            "reboot",
            "swapon",
            "swapoff",
            "personality",
            "acct",
            "settimeofday",
        ] {
            assert!(denied.contains(syscall), "{syscall} is not denied");
        }
    }

    #[test]
    fn unknown_syscall_names_are_refused() {
        let policy = r#"{"deny": {"mismatch_action": "allow", "match_action": {"errno": 1},
                          "filter": [{"syscall": "no_such_call"}]}}"#;
        let error = SeccompFilters::compile(policy, TargetArch::x86_64).expect_err("refused");
        assert!(error.to_string().contains("no_such_call"), "{error}");
    }
}
