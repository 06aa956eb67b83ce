//! `cargo xtask setup`: installs what the build and the tests need, only what is missing.
//! A second run installs nothing and says so.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Debian packages: LLVM 22 for bpf-linker; the tools the kernel tests and benchmarks drive.
const PACKAGES: [&str; 14] = [
    "llvm-22-dev",
    "fio",
    "e2fsprogs",
    "fdisk",
    "util-linux",
    "kmod",
    "iproute2",
    "bpftool",
    "iperf3",
    "rsync",
    "netcat-openbsd",
    "prometheus",
    // qemu-io drives the NBD export in the tests; ping measures the round trip in its benchmark.
    "qemu-utils",
    "iputils-ping",
];

const NIGHTLY: &str = "nightly";

/// The bpf-linker release that builds against Debian's LLVM 22 (rustc's LLVM is 22 too).
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    let mut done = Vec::new();
    let missing: Vec<&str> = PACKAGES.into_iter().filter(|p| !package_installed(p)).collect();
    if !missing.is_empty() {
        install_packages(&missing)?;
        done.push(format!("installed {}", missing.join(" ")));
    }
    if !nightly_has_rust_src()? {
        run_checked(
            Command::new("rustup")
                .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
                .args(["--component", "rust-src"]),
            "rustup toolchain install nightly",
        )?;
        done.push("added rust-src to the nightly toolchain".into());
    }
    if !bpf_linker_installed() {
        run_checked(
            Command::new("cargo").env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
            "cargo install bpf-linker",
        )?;
        done.push("installed bpf-linker".into());
    }
    if done.is_empty() {
        println!("setup: nothing to do (packages, nightly rust-src and bpf-linker are installed)");
    } else {
        println!("setup: {}", done.join("; "));
    }
    Ok(())
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    println!("setup: installing {}", packages.join(" "));
    run_checked(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(packages),
        "apt-get install",
    )
}

fn nightly_has_rust_src() -> anyhow::Result<bool> {
    let output = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .stderr(Stdio::null())
        .output()
        .context("running rustup (is rustup installed?)")?;
    Ok(output.status.success()
        && String::from_utf8_lossy(&output.stdout).lines().any(|l| l.starts_with("rust-src")))
}

fn bpf_linker_installed() -> bool {
    let in_cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin/bpf-linker"));
    let candidates = [Some(PathBuf::from("bpf-linker")), in_cargo_home];
    candidates.into_iter().flatten().any(|bin| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn run_checked(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
