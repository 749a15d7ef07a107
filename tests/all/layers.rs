//! Image layers unpacked (`native-fallback/src/layers.rs`): what a layer holds lands in the
//! layer's directory with safe modes, whiteouts become overlayfs whiteouts, and a hostile
//! archive (`..`, absolute paths, symlinks pointing out, device nodes, bad hard links) never
//! writes outside it.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use soulbox_native::layers::{LayerError, UnpackedLayer, unpack};

/// A tarball being built.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    /// An entry named `name` (set raw, so that names a careful writer refuses get in too).
    fn entry(
        mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        link: &str,
        data: &[u8],
    ) -> Self {
        let mut header = tar::Header::new_gnu();
        let raw = &mut header.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        if !link.is_empty() {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        self.0.append(&header, data).expect("appended");
        self
    }

    fn file(self, name: &str, mode: u32, data: &[u8]) -> Self {
        self.entry(name, tar::EntryType::Regular, mode, "", data)
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().expect("a tarball")
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn a_layer_unpacks_with_safe_modes_links_and_the_sandboxes_ids() {
    let layer = Layer::new()
        .entry("usr/bin/", tar::EntryType::Directory, 0o755, "", b"")
        .file("usr/bin/tool", 0o4755, b"#!/bin/sh\necho hi\n")
        .entry("usr/bin/tool2", tar::EntryType::Link, 0o755, "usr/bin/tool", b"")
        .entry("bin", tar::EntryType::Symlink, 0o777, "usr/bin", b"")
        .entry("usr/bin/sh", tar::EntryType::Symlink, 0o777, "/bin/dash", b"")
        .file("/etc/hostname", 0o644, b"sandbox\n")
        .bytes();
    let dir = tempfile::tempdir().expect("tempdir");
    let unpacked = unpack(layer.as_slice(), dir.path()).expect("unpacked");
    assert_eq!(
        unpacked,
        UnpackedLayer { files: 2, bytes: 26, links_and_dirs: 4, whiteouts: 0, skipped: 0 }
    );
    let tool = dir.path().join("usr/bin/tool");
    assert_eq!(std::fs::read_to_string(&tool).expect("tool"), "#!/bin/sh\necho hi\n");
    let mode = std::fs::metadata(&tool).expect("meta").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755, "no setuid bit");
    let ino = |p: &str| std::fs::metadata(dir.path().join(p)).expect(p).ino();
    assert_eq!(ino("usr/bin/tool2"), ino("usr/bin/tool"), "a hard link");
    assert_eq!(
        std::fs::read_link(dir.path().join("bin")).expect("a symlink"),
        Path::new("usr/bin")
    );
    // An absolute link (as real images have) is kept as it is: it is resolved in the sandbox.
    assert_eq!(
        std::fs::read_link(dir.path().join("usr/bin/sh")).expect("a symlink"),
        Path::new("/bin/dash")
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("etc/hostname")).expect("inside"),
        "sandbox\n"
    );
    if is_root() {
        let owner = std::fs::metadata(&tool).expect("meta").uid();
        assert_eq!(owner, soulbox_native::SANDBOX_UID_BASE, "the sandbox's root owns it");
        // A directory the archive did not list is made for the sandbox's root too (one the
        // sandbox cannot map would deny even its root).
        let implicit = std::fs::metadata(dir.path().join("etc")).expect("etc");
        assert_eq!(implicit.uid(), soulbox_native::SANDBOX_UID_BASE);
        assert_eq!(implicit.permissions().mode() & 0o7777, 0o755);
    }
}

#[test]
fn whiteouts_become_overlayfs_whiteouts() {
    let layer = Layer::new()
        .entry("etc/", tar::EntryType::Directory, 0o755, "", b"")
        .file("etc/.wh.motd", 0o644, b"")
        .entry("var/cache/", tar::EntryType::Directory, 0o755, "", b"")
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .bytes();
    let dir = tempfile::tempdir().expect("tempdir");
    let unpacked = unpack(layer.as_slice(), dir.path()).expect("unpacked");
    assert_eq!(unpacked.whiteouts, 2);
    if !is_root() {
        eprintln!("SKIPPED (in part): overlayfs whiteouts need root; the markers are kept");
        assert!(dir.path().join("etc/.wh.motd").exists());
        return;
    }
    let motd = std::fs::symlink_metadata(dir.path().join("etc/motd")).expect("a whiteout");
    assert!(motd.file_type().is_char_device() && motd.rdev() == 0, "{motd:?}");
    assert!(!dir.path().join("etc/.wh.motd").exists());
    let opaque = xattr::get(dir.path().join("var/cache"), "trusted.overlay.opaque");
    assert_eq!(opaque.expect("xattr"), Some(b"y".to_vec()));
}

#[test]
fn a_hostile_layer_writes_nothing_outside_its_directory() {
    let outside = tempfile::tempdir().expect("tempdir");
    let target = outside.path().display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let into = dir.path().join("layer");
    let refused = |layer: Vec<u8>| unpack(layer.as_slice(), &into);

    let escape = Layer::new().file("../escaped", 0o644, b"x").bytes();
    assert!(matches!(refused(escape), Err(LayerError::Escapes(_))));
    assert!(!dir.path().join("escaped").exists());

    let through_symlink = Layer::new()
        .entry("out", tar::EntryType::Symlink, 0o777, &target, b"")
        .file("out/pwned", 0o644, b"x")
        .bytes();
    assert!(matches!(refused(through_symlink), Err(LayerError::Write { .. })));
    let through_relative = Layer::new()
        .entry("up", tar::EntryType::Symlink, 0o777, "../..", b"")
        .file("up/pwned", 0o644, b"x")
        .bytes();
    assert!(matches!(refused(through_relative), Err(LayerError::Write { .. })));
    assert!(!outside.path().join("pwned").exists(), "nothing through a symlink");
    assert!(!dir.path().join("pwned").exists());

    let bad_links = [
        Layer::new().entry("l", tar::EntryType::Link, 0o644, "../../etc/passwd", b"").bytes(),
        Layer::new().entry("l", tar::EntryType::Link, 0o644, "not/there", b"").bytes(),
    ];
    for layer in bad_links {
        let error = refused(layer).expect_err("a bad hard link");
        assert!(matches!(error, LayerError::Escapes(_) | LayerError::BadLink { .. }), "{error}");
    }

    let devices = Layer::new()
        .entry("dev/sda", tar::EntryType::Block, 0o660, "", b"")
        .entry("dev/mem", tar::EntryType::Char, 0o660, "", b"")
        .entry("fifo", tar::EntryType::Fifo, 0o644, "", b"")
        .bytes();
    let unpacked = refused(devices).expect("unpacked, without them");
    assert_eq!(unpacked.skipped, 3);
    assert!(!into.join("dev/sda").exists() && !into.join("dev/mem").exists());

    let garbage = b"this is not a tarball at all, and not gzip either".repeat(20);
    assert!(matches!(refused(garbage), Err(LayerError::Archive(_))));
}

#[test]
fn a_gzipped_layer_unpacks_the_same() {
    let tarball = Layer::new().file("hello.txt", 0o644, b"hello").bytes();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&tarball).expect("compressed");
    let gzipped = gzip.finish().expect("compressed");
    let dir = tempfile::tempdir().expect("tempdir");
    let unpacked = unpack(gzipped.as_slice(), dir.path()).expect("unpacked");
    assert_eq!((unpacked.files, unpacked.bytes), (1, 5));
    assert_eq!(std::fs::read_to_string(dir.path().join("hello.txt")).expect("file"), "hello");
}

#[test]
fn unpacked_layers_stack_in_overlayfs_with_their_whiteouts() {
    if !is_root() || !Path::new("/usr/bin/unshare").exists() {
        eprintln!("SKIPPED: mounting overlayfs needs root and unshare (util-linux)");
        return;
    }
    let lower = Layer::new()
        .file("gone.txt", 0o644, b"deleted above")
        .file("kept.txt", 0o644, b"kept")
        .file("cache/old", 0o644, b"hidden by an opaque directory above")
        .bytes();
    let upper = Layer::new()
        .file(".wh.gone.txt", 0o644, b"")
        .entry("cache/", tar::EntryType::Directory, 0o755, "", b"")
        .file("cache/.wh..wh..opq", 0o644, b"")
        .file("cache/new", 0o644, b"new")
        .bytes();
    let dir = tempfile::tempdir().expect("tempdir");
    let (lower_dir, upper_dir, merged) =
        (dir.path().join("lower"), dir.path().join("upper"), dir.path().join("merged"));
    unpack(lower.as_slice(), &lower_dir).expect("the lower layer");
    unpack(upper.as_slice(), &upper_dir).expect("the upper layer");
    std::fs::create_dir(&merged).expect("a mount point");
    // In a mount namespace of its own, so that nothing stays mounted on the host.
    let script = format!(
        "mount -t overlay overlay -o lowerdir={}:{} {} && cd {} && find . -type f | sort",
        upper_dir.display(),
        lower_dir.display(),
        merged.display(),
        merged.display()
    );
    let output = std::process::Command::new("/usr/bin/unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .expect("unshare runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "./cache/new\n./kept.txt\n", "{stderr}");
}
