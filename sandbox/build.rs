//! Compiles the sandbox's first process (`init/main.rs`): standard library only, linked statically, so it runs
//! in whatever image a sandbox holds.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let source = "init/main.rs";
    println!("cargo:rerun-if-changed={source}");
    let status = Command::new(rustc)
        .args(["--edition", "2024", "--crate-name", "init", "--crate-type", "bin"])
        .args(["-C", "opt-level=2", "-C", "panic=abort", "-C", "strip=symbols", "-C", "target-feature=+crt-static"])
        .arg("-o")
        .arg(out.join("init"))
        .arg(source)
        .status()
        .expect("running rustc");
    assert!(status.success(), "compiling {source}");
}
