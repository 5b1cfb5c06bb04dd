//! Compiles the eBPF steering program (ebpf/steer.bpf.c) with clang and leaves the object in
//! OUT_DIR for `include_bytes!`. clang and libbpf's headers come from Debian's `clang` and
//! `libbpf-dev` packages; `cargo xtask test` and `cargo xtask demo` install them.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = ebpf.join("steer.bpf.c");
    let header = ebpf.join("steer.h");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-env-changed=CLANG");

    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => panic!("corral's eBPF build knows no multiarch include directory for {other}"),
    };
    if !PathBuf::from("/usr/include/bpf/bpf_helpers.h").exists() {
        panic!(
            "/usr/include/bpf/bpf_helpers.h is missing: install libbpf's headers \
             (`apt-get install libbpf-dev`; `cargo xtask test` does it for you)"
        );
    }
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let obj = out.join("steer.bpf.o");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg(format!("-I{}", ebpf.display()))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {clang} to build the eBPF program: {e}; install it with \
                 `apt-get install clang libbpf-dev` (`cargo xtask test` does it for you)"
            )
        });
    if !status.success() {
        panic!("{clang} failed to compile {} ({status})", src.display());
    }
}
