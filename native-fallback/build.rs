//! Builds `soulbox-init`, the sandbox's PID 1, so that the library can embed it and run it
//! from a sealed memfd: the binary a sandbox runs is then never a file the guest could reach,
//! and the host never executes anything the guest could have written.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=init/src");
    println!("cargo::rerun-if-changed=init/Cargo.toml");
    println!("cargo::rerun-if-changed=src/protocol.rs");
    println!("cargo::rerun-if-changed=src/sys/init.rs");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let cargo = env::var_os("CARGO").expect("cargo sets CARGO");
    let target_dir = out_dir.join("init-target");
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "--release", "--package", "soulbox-init", "--target", &target])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false");
    // The outer build's settings (a clippy wrapper, coverage flags, its target dir) are not
    // for this one.
    for variable in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        command.env_remove(variable);
    }
    let status = command.status().expect("running cargo to build soulbox-init");
    assert!(status.success(), "building soulbox-init failed: {status}");
    let binary = target_dir.join(&target).join("release").join("soulbox-init");
    println!("cargo::rustc-env=SOULBOX_INIT_BINARY={}", binary.display());
}
