//! Bundles the web terminal's browser side into the binary: xterm.js and its fit addon, at
//! the versions `web/package-lock.json` pins (with their integrity hashes), installed by
//! `npm ci` into `OUT_DIR` and embedded by `src/terminal.rs`. Nothing is fetched at run time.
//! npm's cache serves rebuilds; a machine without npm gets an error saying what to install.

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGE_FILES: [&str; 3] = ["package.json", "package-lock.json", ".npmrc"];

/// The files embedded, from the installed packages: (source, name in `OUT_DIR/web`).
const BUNDLED: [(&str, &str); 3] = [
    ("node_modules/@xterm/xterm/lib/xterm.js", "xterm.js"),
    ("node_modules/@xterm/xterm/css/xterm.css", "xterm.css"),
    ("node_modules/@xterm/addon-fit/lib/addon-fit.js", "addon-fit.js"),
];

fn main() {
    let source = Path::new("web");
    for file in PACKAGE_FILES {
        println!("cargo:rerun-if-changed=web/{file}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("web");
    std::fs::create_dir_all(&out).expect("OUT_DIR is writable");
    for file in PACKAGE_FILES {
        std::fs::copy(source.join(file), out.join(file))
            .unwrap_or_else(|e| panic!("copying web/{file}: {e}"));
    }
    let installed = Command::new("npm")
        .args(["ci", "--ignore-scripts", "--prefer-offline", "--no-audit", "--no-fund"])
        .current_dir(&out)
        .status();
    match installed {
        Ok(status) if status.success() => {}
        Ok(status) => panic!(
            "`npm ci` for the web terminal's xterm.js failed ({status}) in {}; \
             npm needs its registry (or its cache) at build time",
            out.display()
        ),
        Err(e) => panic!(
            "the web terminal bundles xterm.js from npm at build time, and npm could not run \
             ({e}): install Node.js and npm (`apt-get install npm`)"
        ),
    }
    for (from, to) in BUNDLED {
        std::fs::copy(out.join(from), out.join(to))
            .unwrap_or_else(|e| panic!("{from} is missing after `npm ci`: {e}"));
    }
}
