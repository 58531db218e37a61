//! Builds the kernel object (ebpf/kernel, `bpfel-unknown-none`) with the nightly toolchain and
//! bpf-linker, and leaves it at `$OUT_DIR/fqdnwall-bpf.o` for `include_bytes!`.
//!
//! The kernel crate is not a workspace member: the workspace builds on stable, the BPF target
//! needs nightly (`-Z build-std=core`). A missing prerequisite stops the build with the
//! command that installs it. `FQDNWALL_BPF_OBJECT=/path/to/object` uses a prebuilt object.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SETUP: &str = "scripts/setup-ebpf.sh";

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("{msg}");
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let out = out_dir.join("fqdnwall-bpf.o");
    println!("cargo:rerun-if-env-changed=FQDNWALL_BPF_OBJECT");
    for p in [
        "kernel/src",
        "kernel/Cargo.toml",
        "kernel/Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", manifest_dir.join(p).display());
    }

    if let Some(prebuilt) = env::var_os("FQDNWALL_BPF_OBJECT") {
        if let Err(e) = std::fs::copy(&prebuilt, &out) {
            fail(&format!(
                "FQDNWALL_BPF_OBJECT={}: cannot copy the prebuilt kernel object: {e}",
                Path::new(&prebuilt).display()
            ));
        }
        return;
    }

    check_prerequisites();

    let kernel_dir = manifest_dir.join("kernel");
    let target_dir = out_dir.join("kernel-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(kernel_dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    // The outer cargo (stable, maybe clippy) must not leak into the nightly build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_BUILD_TARGET",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run `rustup run nightly cargo`: {e}")));
    if !status.success() {
        fail(&format!(
            "building the kernel programs (ebpf/kernel) failed ({status}); \
             if a prerequisite is missing, run {SETUP}"
        ));
    }
    let built = target_dir.join("bpfel-unknown-none/release/fqdnwall-bpf");
    if let Err(e) = std::fs::copy(&built, &out) {
        fail(&format!(
            "kernel object {} missing after the build: {e}",
            built.display()
        ));
    }
}

fn check_prerequisites() {
    let rustup = Command::new("rustup").arg("--version").output();
    if !matches!(rustup, Ok(ref o) if o.status.success()) {
        fail(&format!(
            "the eBPF programs need rustup with a nightly toolchain; install rustup \
             (https://rustup.rs), then run {SETUP}"
        ));
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output();
    match components {
        Ok(o) if o.status.success() => {
            if !String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
            {
                fail(&format!(
                    "the nightly toolchain lacks rust-src (needed to build `core` for BPF): \
                     run `rustup component add rust-src --toolchain nightly` or {SETUP}"
                ));
            }
        }
        _ => fail(&format!(
            "no nightly toolchain: run `rustup toolchain install nightly` and \
             `rustup component add rust-src --toolchain nightly`, or {SETUP}"
        )),
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    match linker {
        Ok(o) if o.status.success() => {}
        _ => fail(&format!(
            "bpf-linker not found on PATH: run `cargo install --locked bpf-linker@0.10.0` \
             (newer releases need a newer LLVM than the nightly ships) or {SETUP}"
        )),
    }
}
