//! Compiles the platform's own programs (`programs/*.rs`): the sandbox's first process and the `hello` image's
//! server. Standard library only, linked statically, so each runs in any root filesystem, with nothing of the host
//! it was built on.

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: [&str; 2] = ["init", "hello"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    for name in PROGRAMS {
        let source = format!("programs/{name}.rs");
        println!("cargo:rerun-if-changed={source}");
        let status = Command::new(&rustc)
            .args(["--edition", "2024", "--crate-name", name, "--crate-type", "bin"])
            .args(["-C", "opt-level=2", "-C", "panic=abort", "-C", "strip=symbols", "-C", "target-feature=+crt-static"])
            .arg("-o")
            .arg(out.join(name))
            .arg(&source)
            .status()
            .expect("running rustc");
        assert!(status.success(), "compiling {source}");
    }
}
