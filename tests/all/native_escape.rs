//! Escape attempts from inside the native tier, one vector per test. Each probe is a small
//! program run first natively on the host (the test runs as root, without seccomp: the call
//! reaches the kernel, the file is there, the attack works) and then, unchanged, inside a
//! sandbox, where it must be refused. A native half that this host cannot show (no module
//! support in the kernel, no DNS) says so loudly and the sandbox half still runs.
//!
//! Python's `ctypes` makes one raw syscall and prints the errno's name: `EPERM` inside is the
//! seccomp filter's answer, whatever the kernel would have said. Where there is no native run
//! to make (one sandbox against another, the posture read from outside), the positive control
//! is the other side: sandbox A sees its own sleep, shm file and IPC objects; this test
//! process has no seccomp filter and full capabilities.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use soulbox_native::{SANDBOX_UID, SANDBOX_UID_BASE};
use soulbox_runtime::{Dispatcher, ExecOutput, Limits, Sandbox, Termination};
use soulbox_tests::{command, native_backend, native_sandbox, run, shell};

/// The Python inside a sandbox is the host's `/usr/bin/python3`; the native runs use it too.
const HOST_PYTHON: &str = "/usr/bin/python3";

/// Helpers every probe starts with: `sc(nr, *args)` makes one raw syscall and answers `OK` or
/// the errno's name, `attempt(f)` does the same for a Python call, `say` prints `key=value`.
/// `SANDBOX` is true when the probe's first argument is `sandbox` (probes that would touch the
/// host natively, like attaching to the test process, run only then).
const PRELUDE: &str = r#"
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
SANDBOX = len(sys.argv) > 1 and sys.argv[1] == 'sandbox'
ARGS = sys.argv[2:]
def name(n):
    return errno.errorcode.get(n, str(n))
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return 'OK' if r != -1 else name(ctypes.get_errno())
def attempt(f):
    try:
        f()
        return 'OK'
    except OSError as e:
        return name(e.errno)
def say(key, value):
    print(key + '=' + str(value), flush=True)
"#;

/// The `key=value` lines a probe printed.
type Answers = BTreeMap<String, String>;

fn parse(stdout: &str) -> Answers {
    stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn answer<'a>(answers: &'a Answers, key: &str) -> &'a str {
    answers.get(key).map(String::as_str).unwrap_or_else(|| panic!("no `{key}` in {answers:?}"))
}

/// Runs `argv` on the host and returns its standard output; it must succeed.
fn host(argv: &[&str]) -> String {
    let output = Command::new(argv[0]).args(&argv[1..]).output().expect("the host command runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{argv:?} failed natively: {stdout}{stderr}");
    stdout
}

/// Runs the probe natively, prefixed by `wrapper` (e.g. `unshare --mount`), with `args`.
fn host_probe(wrapper: &[&str], probe: &str, args: &[&str]) -> Answers {
    let program = format!("{PRELUDE}{probe}");
    let mut argv: Vec<&str> = wrapper.to_vec();
    argv.extend([HOST_PYTHON, "-c", &program, "host"]);
    argv.extend(args);
    parse(&host(&argv))
}

/// Runs `request` in the sandbox; it must exit 0. Returns its standard output.
async fn in_sandbox(
    dispatcher: &Dispatcher,
    sandbox: &Arc<Sandbox>,
    request: soulbox_runtime::ExecRequest,
) -> String {
    let output = run(dispatcher, sandbox, request).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    output.stdout
}

/// Runs the probe in the sandbox with `args`.
async fn sandbox_probe(
    dispatcher: &Dispatcher,
    sandbox: &Arc<Sandbox>,
    probe: &str,
    args: &[&str],
) -> Answers {
    let program = format!("{PRELUDE}{probe}");
    let mut argv = vec!["python3", "-c", &program, "sandbox"];
    argv.extend(args);
    parse(&in_sandbox(dispatcher, sandbox, command(&argv)).await)
}

/// Runs a request that may fail in the sandbox and returns its whole output.
async fn sandbox_output(
    dispatcher: &Dispatcher,
    sandbox: &Arc<Sandbox>,
    request: soulbox_runtime::ExecRequest,
) -> ExecOutput {
    let output = run(dispatcher, sandbox, request).await;
    assert!(output.failure.is_none(), "SoulBox failed: {output:?}");
    output
}

/// Says loudly that the native half of a probe cannot be shown on this host.
fn skip_native_half(test: &str, why: &str) {
    eprintln!("SKIPPED (native half of {test}): {why}; the sandbox half still runs");
}

/// Natively, no call of the probe was refused by a filter: each reached the kernel.
fn assert_reached_the_kernel(native: &Answers) {
    for (key, value) in native {
        assert_ne!(value, "EPERM", "{key} natively: {native:?}");
    }
}

/// In the sandbox, all `count` calls of the probe were refused with EPERM.
fn assert_all_refused(inside: &Answers, count: usize) {
    assert_eq!(inside.len(), count, "{inside:?}");
    for (key, value) in inside {
        assert_eq!(value, "EPERM", "{key} in the sandbox: {inside:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Syscalls the seccomp filter denies.

#[tokio::test]
async fn escape_mount() {
    const PROBE: &str = r#"
target = ARGS[0]
os.makedirs(target, exist_ok=True)
say('mount_tmpfs', sc(165, b'none', target.encode(), b'tmpfs', 0, None))
say('umount', sc(166, target.encode(), 0))
say('mount_null', sc(165, None, None, None, 0, None))
if SANDBOX:
    say('mount_proc', sc(165, b'proc', b'/tmp', b'proc', 0, None))
    say('umount_home', sc(166, b'/home/user', 2))
    say('pivot_root', sc(155, b'/tmp', b'/tmp'))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    // Natively, in a throwaway mount namespace: the mount and the unmount succeed.
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let target = scratch.path().join("mnt");
    let target = target.to_str().expect("a UTF-8 path");
    let native = host_probe(&["unshare", "--mount", "--propagation", "private"], PROBE, &[target]);
    assert_eq!(answer(&native, "mount_tmpfs"), "OK", "{native:?}");
    assert_eq!(answer(&native, "umount"), "OK", "{native:?}");
    assert_eq!(answer(&native, "mount_null"), "EFAULT", "the kernel checks it: {native:?}");

    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &["/tmp/mnt"]).await;
    for key in ["mount_tmpfs", "umount", "mount_null", "mount_proc", "umount_home", "pivot_root"] {
        assert_eq!(answer(&inside, key), "EPERM", "{key}: {inside:?}");
    }
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_ptrace_parent() {
    const PROBE: &str = r#"
def reap(pid):
    while True:
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return
child = os.fork()
if child == 0:
    os.execvp('sleep', ['sleep', '30'])
say('attach_child', sc(101, 16, child, None, None))
os.kill(child, 9)
reap(child)
if SANDBOX:
    say('attach_parent', sc(101, 16, os.getppid(), None, None))
    say('attach_init', sc(101, 16, 1, None, None))
    say('seize_init', sc(101, 0x4206, 1, None, None))
    say('traceme', sc(101, 0, 0, None, None))
    say('vm_readv_init', sc(310, 1, None, 0, None, 0, 0))
    say('init_mem', attempt(lambda: open('/proc/1/mem', 'rb').read(1)))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    // Natively (on a child of its own, never the test process): the attach succeeds.
    let native = host_probe(&[], PROBE, &[]);
    assert_eq!(answer(&native, "attach_child"), "OK", "{native:?}");

    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &[]).await;
    for key in
        ["attach_child", "attach_parent", "attach_init", "seize_init", "traceme", "vm_readv_init"]
    {
        assert_eq!(answer(&inside, key), "EPERM", "{key}: {inside:?}");
    }
    assert_ne!(answer(&inside, "init_mem"), "OK", "init's memory is readable: {inside:?}");
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_unshare_and_setns() {
    const PROBE: &str = r#"
def clone(flags):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(56), ctypes.c_long(flags), None, None, None, None)
    if r == 0:
        os._exit(0)
    if r == -1:
        return name(ctypes.get_errno())
    os.waitpid(r, 0)
    return 'OK'
fd = os.open('/proc/self/ns/net', os.O_RDONLY)
say('setns_net', sc(308, fd, 0))
say('setns_any', sc(308, fd, 0x40000000))
say('clone_newuser', clone(0x10000000 | 17))
say('clone_newns', clone(0x00020000 | 17))
say('clone_newpid', clone(0x20000000 | 17))
say('unshare_mount', sc(272, 0x00020000))
say('unshare_user', sc(272, 0x10000000))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    // Natively each call succeeds, and changes only the probe's own process (or its child).
    let native = host_probe(&[], PROBE, &[]);
    for (key, value) in &native {
        assert_eq!(value, "OK", "{key} natively: {native:?}");
    }
    assert_eq!(native.len(), 7, "{native:?}");

    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &[]).await;
    assert_all_refused(&inside, 7);
    // The command-line tool fails the same way.
    let output = sandbox_output(&dispatcher, &sandbox, command(&["unshare", "-r", "id"])).await;
    assert_ne!(output.exit_code, Some(0), "{output:?}");
    assert!(!output.stdout.contains("uid=0"), "{output:?}");
    dispatcher.close(&sandbox).await;
}

/// Natively the kernel answers these with anything but EPERM (EFAULT, EBADF, ENOENT; ENOSYS
/// on a kernel built without module support); inside, the filter answers EPERM before the
/// kernel looks.
#[tokio::test]
async fn escape_load_kernel_module() {
    const PROBE: &str = r#"
say('init_module', sc(175, None, 0, b''))
say('finit_module', sc(313, -1, b'', 0))
say('delete_module', sc(176, b'soulbox_no_such_module', 0))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = host_probe(&[], PROBE, &[]);
    assert_reached_the_kernel(&native);
    if native.values().all(|v| v == "ENOSYS") {
        skip_native_half(
            "escape_load_kernel_module",
            "this kernel has no module support (ENOSYS), so loading cannot be shown to work",
        );
    }
    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &[]).await;
    assert_all_refused(&inside, 3);
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_kexec_load() {
    // Harmless natively: more segments than KEXEC_SEGMENT_MAX (EINVAL), a bad descriptor
    // (EBADF); never zero segments, which would unload a loaded kernel.
    const PROBE: &str = r#"
say('kexec_load', sc(246, 0, 1000, None, 0))
say('kexec_file_load', sc(320, -1, -1, 0, None, 0))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = host_probe(&[], PROBE, &[]);
    assert_reached_the_kernel(&native);
    if native.values().all(|v| v == "ENOSYS") {
        skip_native_half(
            "escape_kexec_load",
            "this kernel has no kexec support (ENOSYS), so loading cannot be shown to work",
        );
    }
    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &[]).await;
    assert_all_refused(&inside, 2);
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_bpf() {
    // An unknown command: the kernel answers EINVAL, having checked nothing else.
    const PROBE: &str = r#"
say('bpf_unknown', sc(321, 999, None, 0))
say('bpf_map_create', sc(321, 0, None, 0))
say('perf_event_open', sc(298, None, 0, -1, -1, 0))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = host_probe(&[], PROBE, &[]);
    assert_eq!(answer(&native, "bpf_unknown"), "EINVAL", "{native:?}");
    assert_reached_the_kernel(&native);
    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &[]).await;
    assert_all_refused(&inside, 3);
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_keyring() {
    // KEYCTL_GET_KEYRING_ID of the session keyring, without creating it: a read.
    const PROBE: &str = r#"
say('keyctl', sc(250, 0, -3, 0, 0, 0))
say('add_key', sc(248, b'user', b'soulbox-probe', None, 0, -3) if SANDBOX else 'not run natively')
say('request_key', sc(249, b'user', b'soulbox-no-such-key', None, 0))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let native = host_probe(&[], PROBE, &[]);
    assert_ne!(answer(&native, "keyctl"), "EPERM", "{native:?}");
    assert_ne!(answer(&native, "request_key"), "EPERM", "{native:?}");
    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &[]).await;
    for key in ["keyctl", "add_key", "request_key"] {
        assert_eq!(answer(&inside, key), "EPERM", "{key}: {inside:?}");
    }
    dispatcher.close(&sandbox).await;
}

// ---------------------------------------------------------------------------------------------
// Kernel interfaces: /proc/sys, cgroups, devices.

#[tokio::test]
async fn escape_write_proc_sys() {
    const PROBE: &str = r#"
def write(path, data):
    with open(path, 'w') as f:
        f.write(data)
say('hostname', attempt(lambda: write('/proc/sys/kernel/hostname', 'soulbox-probe')))
say('hostname_now', open('/proc/sys/kernel/hostname').read().strip())
if SANDBOX:
    for path in ARGS:
        say(path, attempt(lambda: os.close(os.open(path, os.O_WRONLY))))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    // Natively, in a throwaway UTS namespace: the write takes.
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("host name");
    let native = host_probe(&["unshare", "--uts"], PROBE, &[]);
    assert_eq!(answer(&native, "hostname"), "OK", "{native:?}");
    assert_eq!(answer(&native, "hostname_now"), "soulbox-probe", "{native:?}");
    let after = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("host name");
    assert_eq!(after, host_name, "the native probe stayed in its own UTS namespace");

    // Other tunables, opened for writing only; those this kernel has.
    let tunables: Vec<&str> = [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/vm/drop_caches",
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sysrq-trigger",
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect();
    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &tunables).await;
    assert_eq!(answer(&inside, "hostname"), "EROFS", "{inside:?}");
    assert_eq!(answer(&inside, "hostname_now"), "sandbox", "{inside:?}");
    for (key, value) in inside.iter().filter(|(k, _)| k.starts_with("/proc")) {
        assert!(["EROFS", "EACCES", "EPERM"].contains(&value.as_str()), "{key}: {inside:?}");
    }
    assert_eq!(inside.len(), 2 + tunables.len(), "{inside:?}");
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_write_cgroup_files() {
    // Opens for writing only (no byte is written).
    const PROBE: &str = r#"
say('sys', attempt(lambda: os.listdir('/sys')))
for path in ARGS:
    say(path, attempt(lambda: os.close(os.open(path, os.O_WRONLY))))
if SANDBOX:
    say('cgroup', ';'.join(open('/proc/self/cgroup').read().split()))
    say('cgroup_mounts', sum(' - cgroup' in l for l in open('/proc/self/mountinfo')))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let candidates = [
        "/sys/fs/cgroup/cgroup.procs",
        "/sys/fs/cgroup/pids/cgroup.procs",
        "/sys/fs/cgroup/memory/cgroup.procs",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/cpu/cgroup.procs",
        "/sys/fs/cgroup/cgroup.subtree_control",
    ];
    let paths: Vec<&str> = candidates.into_iter().filter(|p| Path::new(p).exists()).collect();
    assert!(!paths.is_empty(), "the host has no cgroup files where expected");
    let native = host_probe(&[], PROBE, &paths);
    assert_eq!(answer(&native, "sys"), "OK", "{native:?}");
    for path in &paths {
        assert_eq!(answer(&native, path), "OK", "{path} natively: {native:?}");
    }

    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &paths).await;
    assert_eq!(answer(&inside, "sys"), "ENOENT", "there is a /sys: {inside:?}");
    for path in &paths {
        assert_eq!(answer(&inside, path), "ENOENT", "{path}: {inside:?}");
    }
    assert_eq!(answer(&inside, "cgroup_mounts"), "0", "{inside:?}");
    // The cgroup namespace is rooted at the sandbox's own group.
    for line in answer(&inside, "cgroup").split(';') {
        assert!(line.ends_with(":/"), "a group outside the namespace's root: {inside:?}");
    }
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_mknod_char_device() {
    const PROBE: &str = r#"
import stat
for i, directory in enumerate(ARGS):
    say('char_' + str(i), attempt(lambda: os.mknod(directory + '/mem', stat.S_IFCHR | 0o600, os.makedev(1, 1))))
    say('block_' + str(i), attempt(lambda: os.mknod(directory + '/disk', stat.S_IFBLK | 0o600, os.makedev(8, 0))))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let scratch_path = scratch.path().to_str().expect("a UTF-8 path");
    let native = host_probe(&[], PROBE, &[scratch_path]);
    assert_eq!(answer(&native, "char_0"), "OK", "{native:?}");
    assert_eq!(answer(&native, "block_0"), "OK", "{native:?}");
    drop(scratch);

    let directories = ["/tmp", "/home/user", "/dev/shm"];
    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &directories).await;
    assert_all_refused(&inside, 6);
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_raw_devices() {
    // Every device node reachable under /dev, and an open of the raw ones.
    const PROBE: &str = r#"
import stat
found = []
for root, dirs, files in os.walk('/dev'):
    for entry in dirs + files:
        path = os.path.join(root, entry)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            found.append('b:' + path)
        elif stat.S_ISCHR(st.st_mode):
            found.append('c:%d,%d:%s' % (os.major(st.st_rdev), os.minor(st.st_rdev), path))
say('devices', ' '.join(sorted(found)))
for path in ARGS:
    say(path, attempt(lambda: os.close(os.open(path, os.O_RDONLY))))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let raw = [
        "/dev/sda",
        "/dev/vda",
        "/dev/nvme0n1",
        "/dev/mem",
        "/dev/kmem",
        "/dev/port",
        "/dev/kmsg",
        "/dev/loop0",
        "/dev/fuse",
        "/dev/net/tun",
    ];
    let native = host_probe(&[], PROBE, &raw);
    let native_devices = answer(&native, "devices");
    if native_devices.contains("b:") {
        assert!(
            raw.iter().any(|path| answer(&native, path) == "OK"),
            "no raw device opens natively: {native:?}"
        );
    } else {
        skip_native_half("escape_raw_devices", "this host has no block device to open");
    }

    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &raw).await;
    let devices = answer(&inside, "devices");
    assert!(!devices.contains("b:"), "a block device in the sandbox: {devices}");
    // null, zero, full, random, urandom, tty, ptmx, and the sandbox's own ptys.
    let allowed = ["c:1,3:", "c:1,5:", "c:1,7:", "c:1,8:", "c:1,9:", "c:5,0:", "c:5,2:"];
    for device in devices.split(' ') {
        let pty = device.starts_with("c:136,") && device.contains(":/dev/pts/");
        assert!(
            pty || allowed.iter().any(|a| device.starts_with(a)),
            "device {device} is not on the allow-list: {devices}"
        );
    }
    assert!(devices.contains("c:1,3:/dev/null"), "{devices}");
    for path in &raw {
        assert_eq!(answer(&inside, path), "ENOENT", "{path}: {inside:?}");
    }
    dispatcher.close(&sandbox).await;
}

// ---------------------------------------------------------------------------------------------
// Privilege.

#[tokio::test]
async fn escape_setuid_binary() {
    const SOURCE: &str = "#include <stdio.h>\n#include <unistd.h>\n#include <sys/prctl.h>\n\
        int main(void) {\n  printf(\"uid=%d euid=%d nnp=%d\\n\", (int)getuid(), (int)geteuid(),\n\
        prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));\n  return 0;\n}\n";
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    // Natively: a setuid-root program run by uid 1000 has euid 0.
    let scratch = tempfile::tempdir().expect("a scratch directory");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let source = scratch.path().join("suid-probe.c");
    let binary = scratch.path().join("suid-probe");
    std::fs::write(&source, SOURCE).expect("write the source");
    host(&["gcc", "-o", binary.to_str().expect("UTF-8"), source.to_str().expect("UTF-8")]);
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    let native = host(&[
        "setpriv",
        "--reuid=1000",
        "--regid=1000",
        "--clear-groups",
        binary.to_str().expect("UTF-8"),
    ]);
    assert_eq!(native.trim(), "uid=1000 euid=0 nnp=0", "the setuid bit works natively");

    // In the sandbox: the same binary, setuid and owned on disk by the server (root) and by
    // the host uid that is the sandbox's root.
    let workspace = sandbox.workspace();
    let by_server = workspace.join("suid-probe");
    let by_sandbox_root = workspace.join("suid-probe-ns-root");
    for copy in [&by_server, &by_sandbox_root] {
        std::fs::copy(&binary, copy).expect("copy the probe");
    }
    std::os::unix::fs::chown(&by_sandbox_root, Some(SANDBOX_UID_BASE), Some(SANDBOX_UID_BASE))
        .expect("chown");
    for copy in [&by_server, &by_sandbox_root] {
        std::fs::set_permissions(copy, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    }
    for program in ["/home/user/suid-probe", "/home/user/suid-probe-ns-root"] {
        let stdout = in_sandbox(&dispatcher, &sandbox, command(&[program])).await;
        assert_eq!(stdout.trim(), "uid=1000 euid=1000 nnp=1", "{program}");
    }
    // The host's own setuid-root `su` does not make anyone root either.
    let su = sandbox_output(&dispatcher, &sandbox, command(&["su", "root", "-c", "id"])).await;
    assert_ne!(su.exit_code, Some(0), "{su:?}");
    assert!(!su.stdout.contains("uid=0"), "{su:?}");
    let id =
        in_sandbox(&dispatcher, &sandbox, shell("id -u; id -G; grep NoNewPrivs /proc/self/status"))
            .await;
    assert_eq!(id, "1000\n1000\nNoNewPrivs:\t1\n", "{id}");
    dispatcher.close(&sandbox).await;
}

// ---------------------------------------------------------------------------------------------
// The file system.

/// Reads a file or lists a directory, answering `OK:<first bytes>` or the errno.
const READ_PROBE: &str = r#"
def read(path):
    if os.path.isdir(path):
        return 'OK:' + ','.join(sorted(os.listdir(path)))
    with open(path, 'rb') as f:
        return 'OK:' + f.read(64).decode('utf-8', 'replace').replace('\n', ' ')
def answer(path):
    try:
        return read(path)
    except OSError as e:
        return name(e.errno)
for path in ARGS:
    say(path, answer(path))
"#;

#[tokio::test]
async fn escape_read_host_files() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let repo =
        std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).expect("the repository");
    let repo_manifest = repo.join("Cargo.toml");
    let paths = [
        "/etc/shadow",
        "/etc/machine-id",
        "/root",
        repo.to_str().expect("UTF-8"),
        repo_manifest.to_str().expect("UTF-8"),
        "/proc/1/root/etc/shadow",
    ];
    let native = host_probe(&[], READ_PROBE, &paths[..5]);
    for path in ["/etc/shadow", "/root", paths[3], paths[4]] {
        assert!(answer(&native, path).starts_with("OK:"), "{path} natively: {native:?}");
    }
    let shadow = answer(&native, "/etc/shadow").to_owned();

    let inside = sandbox_probe(&dispatcher, &sandbox, READ_PROBE, &paths).await;
    for path in paths {
        assert!(!answer(&inside, path).starts_with("OK"), "{path} is readable: {inside:?}");
    }
    assert!(!inside.values().any(|v| v == &shadow), "{inside:?}");
    let etc = in_sandbox(&dispatcher, &sandbox, command(&["cat", "/etc/hostname"])).await;
    assert_eq!(etc, "sandbox\n", "the sandbox has its own /etc");
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_symlink_out_of_the_root() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let repo =
        std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).expect("the repository");
    // Links planted from the host side, as an upload or the WASM tier could leave them.
    let workspace = sandbox.workspace();
    let links = [
        ("shadow-link", "/etc/shadow".to_owned()),
        ("repo-link", repo.join("Cargo.toml").to_str().expect("UTF-8").to_owned()),
        ("dotdot-link", format!("{}etc/shadow", "../".repeat(24))),
        ("root-link", "/".to_owned()),
    ];
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, workspace.join(name)).expect("plant a link");
    }
    let host_paths: Vec<String> = links
        .iter()
        .map(|(name, _)| workspace.join(name).to_str().expect("UTF-8").to_owned())
        .collect();
    let host_args: Vec<&str> = host_paths.iter().map(String::as_str).collect();
    let native = host_probe(&[], READ_PROBE, &host_args);
    for path in &host_args {
        assert!(answer(&native, path).starts_with("OK:"), "{path} natively: {native:?}");
    }
    assert!(answer(&native, host_args[3]).contains("work"), "{native:?}");

    let sandbox_paths = links.map(|(name, _)| format!("/home/user/{name}"));
    let args: Vec<&str> = sandbox_paths.iter().map(String::as_str).collect();
    let inside = sandbox_probe(&dispatcher, &sandbox, READ_PROBE, &args).await;
    for path in &args[..3] {
        assert_eq!(answer(&inside, path), "ENOENT", "{path}: {inside:?}");
    }
    // `/` through the link is the sandbox's own root.
    let root = answer(&inside, args[3]);
    assert!(root.contains("home") && !root.contains("work") && !root.contains("sys"), "{root}");
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_dotdot_out_of_the_workspace() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let up = "../".repeat(24);
    let workspace = sandbox.workspace().to_str().expect("UTF-8").to_owned();
    let native_paths = [format!("{workspace}/{up}etc/shadow"), format!("{workspace}/{up}")];
    let args: Vec<&str> = native_paths.iter().map(String::as_str).collect();
    let native = host_probe(&[], READ_PROBE, &args);
    assert!(answer(&native, args[0]).starts_with("OK:"), "{native:?}");
    assert!(answer(&native, args[1]).contains("work"), "the host's root: {native:?}");

    let inside_paths = [
        format!("/home/user/{up}etc/shadow"),
        format!("{up}etc/shadow"),
        format!("/home/user/{up}{}", &workspace[1..]),
        format!("/home/user/{up}"),
    ];
    let args: Vec<&str> = inside_paths.iter().map(String::as_str).collect();
    let inside = sandbox_probe(&dispatcher, &sandbox, READ_PROBE, &args).await;
    assert_eq!(answer(&inside, args[0]), "ENOENT", "{inside:?}");
    assert_eq!(answer(&inside, args[1]), "ENOENT", "relative to /home/user: {inside:?}");
    assert_eq!(answer(&inside, args[2]), "ENOENT", "the host workspace path: {inside:?}");
    let root = answer(&inside, args[3]);
    assert!(root.contains("home") && !root.contains("work"), "{root}");
    dispatcher.close(&sandbox).await;
}

// ---------------------------------------------------------------------------------------------
// What a process inherits.

#[tokio::test]
async fn escape_leaked_fds() {
    // The descriptors open in the probe (the one listdir used is closed by then).
    const PROBE: &str = r#"
live = []
for fd in sorted(int(f) for f in os.listdir('/proc/self/fd')):
    try:
        os.fstat(fd)
        live.append(fd)
    except OSError:
        pass
say('fds', ','.join(map(str, live)))
say('targets', ' '.join(str(fd) + '->' + os.readlink('/proc/self/fd/' + str(fd)) for fd in live))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    // Natively, a descriptor left open by the parent shows up: the probe sees leaks.
    let program = format!("{PRELUDE}{PROBE}");
    let native = parse(&host(&[
        "bash",
        "-c",
        "exec 9</dev/null; exec \"$0\" -c \"$1\" host",
        HOST_PYTHON,
        &program,
    ]));
    let fds = answer(&native, "fds");
    assert!(fds.starts_with("0,1,2,") && fds.contains(",9"), "the probe sees leaks: {native:?}");

    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &[]).await;
    assert_eq!(answer(&inside, "fds"), "0,1,2", "{inside:?}");
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_environment_leak() {
    /// What the sandbox may set (the native tier's allow-list).
    const ALLOWED: [&str; 6] = ["PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR"];
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let ours: BTreeMap<String, String> = std::env::vars().collect();
    let native = host(&["env"]);
    for key in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME"] {
        if ours.contains_key(key) {
            assert!(native.contains(&format!("{key}=")), "a native child inherits {key}");
        } else {
            skip_native_half("escape_environment_leak", &format!("{key} is not set here"));
        }
    }
    let env = in_sandbox(&dispatcher, &sandbox, command(&["env"])).await;
    let inside: BTreeMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
    for key in inside.keys() {
        assert!(ALLOWED.contains(key), "{key} is not on the allow-list: {env}");
    }
    for (key, value) in &ours {
        if ALLOWED.contains(&key.as_str()) {
            continue;
        }
        assert!(!inside.contains_key(key.as_str()), "{key} leaked: {env}");
        // Nor under another name (unless an allowed variable has that value on its own).
        let legitimate = inside.values().any(|v| v == value);
        if value.len() > 3 && !legitimate {
            assert!(!env.contains(&format!("={value}\n")), "{key}'s value leaked: {env}");
        }
    }
    assert_eq!(inside.get("HOME"), Some(&"/home/user"), "{env}");
    // Init was started with an empty environment, and its own is not the guest's to read.
    const INIT_ENVIRON: &str = r#"
try:
    say('environ', 'OK:' + str(len(open('/proc/1/environ', 'rb').read())))
except OSError as e:
    say('environ', name(e.errno))
"#;
    let init = sandbox_probe(&dispatcher, &sandbox, INIT_ENVIRON, &[]).await;
    let environ = answer(&init, "environ");
    assert!(environ == "OK:0" || !environ.starts_with("OK"), "init's environment: {init:?}");
    dispatcher.close(&sandbox).await;
}

// ---------------------------------------------------------------------------------------------
// The network.

const CONNECT_PROBE: &str = r#"
def tcp(host, port):
    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((host, int(port)))
    s.close()
def udp(host, port):
    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b'\0' * 12, (host, int(port)))
    s.close()
def unix(name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect('\0' + name)
    s.close()
for arg in ARGS:
    kind, rest = arg.split(':', 1)
    if kind == 'unix':
        say(arg, attempt(lambda: unix(rest)))
    else:
        host, port = rest.rsplit(':', 1)
        say(arg, attempt(lambda: (tcp if kind == 'tcp' else udp)(host.strip('[]'), port)))
if SANDBOX:
    say('interfaces', ','.join(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))
"#;

#[tokio::test]
async fn escape_connect_to_host_loopback() {
    use std::os::linux::net::SocketAddrExt;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a local listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("address").port();
    let abstract_name = format!("soulbox-escape-probe-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
        .expect("an abstract address");
    let unix_listener =
        std::os::unix::net::UnixListener::bind_addr(&address).expect("an abstract listener");
    unix_listener.set_nonblocking(true).expect("nonblocking");
    let tcp = format!("tcp:127.0.0.1:{port}");
    let unix = format!("unix:{abstract_name}");

    let native = host_probe(&[], CONNECT_PROBE, &[&tcp, &unix]);
    assert_eq!(answer(&native, &tcp), "OK", "{native:?}");
    assert_eq!(answer(&native, &unix), "OK", "{native:?}");
    // Take the native connections off the backlog, so what follows sees only the sandbox's.
    listener.accept().expect("the native connection");
    unix_listener.accept().expect("the native connection");

    let inside = sandbox_probe(&dispatcher, &sandbox, CONNECT_PROBE, &[&tcp, &unix]).await;
    assert_eq!(answer(&inside, &tcp), "ECONNREFUSED", "{inside:?}");
    assert_eq!(answer(&inside, &unix), "ECONNREFUSED", "{inside:?}");
    assert_eq!(answer(&inside, "interfaces"), "lo", "{inside:?}");
    assert!(listener.accept().is_err(), "the sandbox reached the host's loopback");
    assert!(unix_listener.accept().is_err(), "the sandbox reached the host's abstract socket");
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_internet_tcp_and_udp() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let tcp = "tcp:1.1.1.1:53";
    let udp = "udp:1.1.1.1:53";
    let native = host_probe(&[], CONNECT_PROBE, &[tcp, udp]);
    if answer(&native, tcp) == "OK" {
        assert_eq!(answer(&native, udp), "OK", "{native:?}");
    } else {
        skip_native_half("escape_internet_tcp_and_udp", "this host cannot reach 1.1.1.1");
    }
    let targets = [tcp, udp, "tcp:[2606:4700:4700::1111]:53", "udp:[2606:4700:4700::1111]:53"];
    let inside = sandbox_probe(&dispatcher, &sandbox, CONNECT_PROBE, &targets).await;
    for target in targets {
        assert_eq!(answer(&inside, target), "ENETUNREACH", "{target}: {inside:?}");
    }
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_dns_resolution() {
    const PROBE: &str = r#"
def resolve(host):
    try:
        return 'OK:' + socket.getaddrinfo(host, 80)[0][4][0]
    except socket.gaierror as e:
        return 'gaierror:' + str(e.errno)
for host in ARGS:
    say(host, resolve(host))
say('resolv.conf', attempt(lambda: open('/etc/resolv.conf').read()))
"#;
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let names = ["example.com", "one.one.one.one", "localhost"];
    let native = host_probe(&[], PROBE, &names);
    if !answer(&native, "example.com").starts_with("OK:")
        && !answer(&native, "one.one.one.one").starts_with("OK:")
    {
        skip_native_half("escape_dns_resolution", "this host cannot resolve names either");
    }
    let inside = sandbox_probe(&dispatcher, &sandbox, PROBE, &names).await;
    assert!(answer(&inside, "example.com").starts_with("gaierror"), "{inside:?}");
    assert!(answer(&inside, "one.one.one.one").starts_with("gaierror"), "{inside:?}");
    // The resolver itself works (the probe is not broken): /etc/hosts answers.
    let localhost = answer(&inside, "localhost");
    assert!(["OK:127.0.0.1", "OK:::1"].contains(&localhost), "{inside:?}");
    assert_eq!(answer(&inside, "resolv.conf"), "ENOENT", "{inside:?}");
    dispatcher.close(&sandbox).await;
}

// ---------------------------------------------------------------------------------------------
// One sandbox against another.

/// `(pid, command)` of every process `ps` sees.
fn processes(ps: &str) -> Vec<(u32, String)> {
    ps.lines()
        .filter_map(|line| {
            let (pid, comm) = line.trim().split_once(' ')?;
            Some((pid.parse().ok()?, comm.trim().to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn escape_see_other_sandbox_processes() {
    let Some((dispatcher, a, _dir_a)) = native_sandbox().await else { return };
    let Some((_, b, _dir_b)) = native_sandbox().await else { return };
    in_sandbox(&dispatcher, &a, shell("sleep 30 >/dev/null 2>&1 &")).await;
    let ps = ["ps", "-eo", "pid=,comm="];
    let in_a = processes(&in_sandbox(&dispatcher, &a, command(&ps)).await);
    assert!(in_a.iter().any(|(_, c)| c == "sleep"), "A sees its own sleep: {in_a:?}");

    let in_b = processes(&in_sandbox(&dispatcher, &b, command(&ps)).await);
    assert!(!in_b.iter().any(|(_, c)| c == "sleep"), "B sees A's sleep: {in_b:?}");
    // Only B's init and the `ps` itself.
    assert_eq!(in_b.len(), 2, "{in_b:?}");
    assert_eq!(in_b[0].0, 1, "{in_b:?}");
    const PIDS: &str = r#"
say('pids', ' '.join(sorted(p for p in os.listdir('/proc') if p.isdigit())))
say('self', os.getpid())
"#;
    let pids = sandbox_probe(&dispatcher, &b, PIDS, &[]).await;
    let expected = format!("1 {}", answer(&pids, "self"));
    assert_eq!(answer(&pids, "pids"), expected, "B's /proc lists others: {pids:?}");
    // Nor can B reach A's init by its host pid.
    let backend = native_backend().expect("the native tier");
    let a_native = backend.sandbox(&a, &Limits::default()).await.expect("A's native sandbox");
    let a_init = a_native.init_pid().as_raw().to_string();
    drop(a_native);
    let kill = sandbox_output(&dispatcher, &b, shell(&format!("kill -0 {a_init}"))).await;
    assert_ne!(kill.exit_code, Some(0), "B signalled A's init: {kill:?}");
    dispatcher.close(&a).await;
    dispatcher.close(&b).await;
}

#[tokio::test]
async fn escape_see_other_sandbox_files() {
    let Some((dispatcher, a, _dir_a)) = native_sandbox().await else { return };
    let Some((_, b, _dir_b)) = native_sandbox().await else { return };
    let files = ["/home/user/a-secret", "/tmp/a-secret", "/dev/shm/a-secret"];
    let write = files.map(|f| format!("echo secret > {f}")).join(" && ");
    in_sandbox(&dispatcher, &a, shell(&write)).await;
    let mut args: Vec<&str> = files.to_vec();
    let a_workspace = a.workspace().to_str().expect("UTF-8").to_owned();
    args.push(&a_workspace);
    let in_a = sandbox_probe(&dispatcher, &a, READ_PROBE, &files).await;
    for file in files {
        assert_eq!(answer(&in_a, file), "OK:secret ", "A reads its own {file}: {in_a:?}");
    }
    let in_b = sandbox_probe(&dispatcher, &b, READ_PROBE, &args).await;
    for path in &args {
        assert_eq!(answer(&in_b, path), "ENOENT", "{path} from B: {in_b:?}");
    }
    let listing = in_sandbox(&dispatcher, &b, shell("ls -A /home/user /tmp /dev/shm")).await;
    assert!(!listing.contains("a-secret"), "{listing}");
    dispatcher.close(&a).await;
    dispatcher.close(&b).await;
}

/// The keys of the System V objects `ipcs` lists.
fn ipc_keys(ipcs: &str) -> BTreeSet<String> {
    ipcs.lines()
        .filter(|l| l.starts_with("0x"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn escape_see_other_sandbox_ipc() {
    let Some((dispatcher, a, _dir_a)) = native_sandbox().await else { return };
    let Some((_, b, _dir_b)) = native_sandbox().await else { return };
    in_sandbox(&dispatcher, &a, shell("ipcmk -M 1024 && ipcmk -Q && ipcmk -S 1")).await;
    let in_a = ipc_keys(&in_sandbox(&dispatcher, &a, command(&["ipcs"])).await);
    assert_eq!(in_a.len(), 3, "A sees its own segment, queue and semaphores: {in_a:?}");
    let in_b = ipc_keys(&in_sandbox(&dispatcher, &b, command(&["ipcs"])).await);
    assert!(in_b.is_empty(), "B sees System V objects: {in_b:?}");
    let on_host = ipc_keys(&host(&["ipcs"]));
    assert!(in_a.is_disjoint(&on_host), "A's objects are the host's: {in_a:?} {on_host:?}");
    dispatcher.close(&a).await;
    dispatcher.close(&b).await;
}

// ---------------------------------------------------------------------------------------------
// The posture, seen from outside.

/// The fields of `/proc/<pid>/status`.
fn status(pid: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// Docker's default capability set, as `/proc/<pid>/status` prints it: the most the
/// sandbox's root (init, and processes started as `root`) holds, in its own user namespace.
const ROOT_CAPABILITIES: &str = "00000000a80425fb";
const NO_CAPABILITIES: &str = "0000000000000000";

/// Who a confined process is.
#[derive(Debug, Clone, Copy)]
enum Confined {
    /// Init: the sandbox's root, with the root's capabilities.
    Init,
    /// A process of the sandbox user: no capability at all.
    User,
}

/// Asserts the confinement every sandbox process has.
fn assert_confined(pid: &str, who: Confined) {
    let fields = status(pid);
    let field = |k: &str| fields.get(k).map(String::as_str).unwrap_or("absent");
    assert_eq!(field("Seccomp"), "2", "{who:?}: {fields:?}");
    assert_eq!(field("NoNewPrivs"), "1", "{who:?}: {fields:?}");
    let (uid, held) = match who {
        Confined::Init => (SANDBOX_UID_BASE, ROOT_CAPABILITIES),
        Confined::User => (SANDBOX_UID_BASE + SANDBOX_UID, NO_CAPABILITIES),
    };
    for (cap, expected) in [
        ("CapInh", NO_CAPABILITIES),
        ("CapAmb", NO_CAPABILITIES),
        ("CapPrm", held),
        ("CapEff", held),
        ("CapBnd", ROOT_CAPABILITIES),
    ] {
        assert_eq!(field(cap), expected, "{who:?} {cap}: {fields:?}");
    }
    let uid = uid.to_string();
    let ids = [uid.as_str(); 4].join("\t");
    assert_eq!(field("Uid"), ids, "{who:?}: {fields:?}");
    assert_eq!(field("Gid"), ids, "{who:?}: {fields:?}");
    assert_eq!(field("Groups"), "", "{who:?}: {fields:?}");
    for ns in ["user", "pid", "mnt", "net", "uts", "ipc", "cgroup"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("a namespace");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("a namespace");
        assert_ne!(theirs, ours, "{who:?} shares the host's {ns} namespace");
    }
}

/// What each of a process's descriptors refers to, by number.
fn descriptors(pid: &str) -> BTreeMap<u32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .filter_map(|entry| {
            let entry = entry.expect("a descriptor entry");
            let number = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            Some((number, target.display().to_string()))
        })
        .collect()
}

#[tokio::test]
async fn escape_posture_of_init_from_outside() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    // The check can fail: this test process has none of it.
    let ours = status("self");
    assert_eq!(ours.get("Seccomp").map(String::as_str), Some("0"), "{ours:?}");
    assert_ne!(ours.get("CapEff").map(String::as_str), Some("0000000000000000"), "{ours:?}");

    let backend = native_backend().expect("the native tier");
    let native = backend.sandbox(&sandbox, &Limits::default()).await.expect("a native sandbox");
    let init = native.init_pid().as_raw().to_string();
    drop(native);
    assert_confined(&init, Confined::Init);
    let fields = status(&init);
    let nspid = fields.get("NSpid").map(String::as_str).unwrap_or("absent");
    assert_eq!(nspid, format!("{init}\t1"), "init is pid 1 of its namespace: {fields:?}");
    // Init is the sandbox's root: a process of the sandbox user can neither signal it nor
    // read its memory.
    let probe = "kill -KILL 1 2>&1; echo kill=$?; cat /proc/1/environ 2>&1; echo read=$?";
    let answer = in_sandbox(&dispatcher, &sandbox, shell(probe)).await;
    assert!(answer.contains("kill=1") && answer.contains("read=1"), "{answer}");
    assert!(answer.contains("Operation not permitted"), "{answer}");
    let native = backend.sandbox(&sandbox, &Limits::default()).await.expect("a native sandbox");
    assert!(native.is_alive(), "init survived: {answer}");
    drop(native);
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_posture_of_a_child_from_outside() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    in_sandbox(&dispatcher, &sandbox, shell("sleep 30 >/dev/null 2>&1 </dev/null &")).await;
    let backend = native_backend().expect("the native tier");
    let native = backend.sandbox(&sandbox, &Limits::default()).await.expect("a native sandbox");
    let init = native.init_pid().as_raw().to_string();
    drop(native);
    // The orphaned sleep is reparented to init.
    let children = format!("/proc/{init}/task/{init}/children");
    let mut sleeper = None;
    for _ in 0..100 {
        let listed = std::fs::read_to_string(&children).expect("init's children");
        sleeper = listed.split_whitespace().map(str::to_owned).find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        if sleeper.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sleeper = sleeper.expect("the sleep among init's children");
    assert_confined(&sleeper, Confined::User);
    for ns in ["user", "pid", "mnt", "net", "uts", "ipc", "cgroup"] {
        let child = std::fs::read_link(format!("/proc/{sleeper}/ns/{ns}")).expect("namespace");
        let of_init = std::fs::read_link(format!("/proc/{init}/ns/{ns}")).expect("namespace");
        assert_eq!(child, of_init, "the process left init's {ns} namespace");
    }
    // While `sleep` is still starting, the dynamic loader holds the libraries it maps open
    // for a moment (its own descriptors, not inherited ones): look until only what it was
    // given is left, for up to 2 s. A leaked descriptor stays, and fails below.
    let mut fds = descriptors(&sleeper);
    for _ in 0..200 {
        if fds.len() <= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        fds = descriptors(&sleeper);
    }
    let numbers: Vec<u32> = fds.keys().copied().collect();
    let init_fds = descriptors(&init);
    assert_eq!(
        numbers,
        [0, 1, 2],
        "descriptors beyond 0-2 leaked: {fds:?} (init holds {init_fds:?})"
    );
    dispatcher.close(&sandbox).await;
}

#[tokio::test]
async fn escape_overwrite_the_init_binary() {
    let Some((dispatcher, sandbox, _dir)) = native_sandbox().await else { return };
    let backend = native_backend().expect("the native tier");
    let native = backend.sandbox(&sandbox, &Limits::default()).await.expect("a native sandbox");
    let init = native.init_pid();
    drop(native);
    // Init runs from a sealed memfd, not from a file of the host.
    let exe = std::fs::read_link(format!("/proc/{init}/exe")).expect("init's exe");
    assert!(exe.display().to_string().starts_with("/memfd:soulbox-init"), "{}", exe.display());
    // Natively, root can open an ordinary running binary's file for writing once it is not
    // being executed; a copy shows the probe works.
    let copy = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::copy("/usr/bin/true", copy.path()).expect("a copy of true");
    assert!(std::fs::OpenOptions::new().write(true).open(copy.path()).is_ok());
    // Even root on the host cannot write the sealed image through /proc/<init>/exe.
    let from_host = std::fs::OpenOptions::new().write(true).open(format!("/proc/{init}/exe"));
    let errno = from_host.expect_err("the image is sealed").raw_os_error();
    const EPERM: i32 = 1;
    const EACCES: i32 = 13;
    const ETXTBSY: i32 = 26;
    assert!(errno.is_some_and(|e| [EPERM, EACCES, ETXTBSY].contains(&e)), "{errno:?}");
    // And from inside, the guest cannot even reach it.
    let probe = "import os\ntry:\n    open('/proc/1/exe', 'r+b')\n    print('OPENED')\nexcept OSError as e:\n    print(e.errno)";
    let output = run(&dispatcher, &sandbox, command(&["python3", "-c", probe])).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
    assert_ne!(output.stdout.trim(), "OPENED", "{output:?}");
    dispatcher.close(&sandbox).await;
}
