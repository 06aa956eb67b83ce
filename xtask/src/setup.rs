//! `cargo xtask setup`: installs what the build and the tests need, only what is missing.
//! A second run installs nothing and says so.
//!
//! bpf-linker links the eBPF crate's LLVM bitcode, so its LLVM must be the very LLVM of the
//! nightly rustc that wrote the bitcode (LLVM 22's reader refuses LLVM 23's bitcode with
//! "Invalid record"). A distribution's LLVM package follows its own release schedule, not
//! nightly's, so bpf-linker is linked instead against the shared libLLVM that the nightly
//! toolchain ships in its sysroot: it matches by construction. The library's file name (its
//! soname, `libLLVM.so.23.1-rust-1.101.0-nightly`) changes with every nightly, and the old file
//! goes with the old toolchain, so bpf-linker is rebuilt by the first setup after a nightly
//! update (until then the eBPF build fails to start bpf-linker: run `cargo xtask setup`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Debian packages: the tools the kernel tests and benchmarks drive.
const PACKAGES: [&str; 17] = [
    "fio",
    "e2fsprogs",
    "fdisk",
    "util-linux",
    "kmod",
    "iproute2",
    // sysctl: the export test sets a namespace's default TCP congestion control.
    "procps",
    "bpftool",
    "iperf3",
    "rsync",
    "netcat-openbsd",
    "prometheus",
    // qemu-io drives the NBD export in the tests; ping measures the round trip in its benchmark.
    "qemu-utils",
    "iputils-ping",
    // The crash tests with real databases: PostgreSQL (pgbench, pg_amcheck, pg_checksums) and
    // sqlite through python3's module; curl reads a secondary's metrics in a benchmark.
    "postgresql",
    "python3",
    "curl",
];

const NIGHTLY: &str = "nightly";

/// The bpf-linker release installed; it supports LLVM 21, 22 and 23 (cargo features `llvm-N`).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_MAJORS: [u32; 3] = [21, 22, 23];

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
    let llvm = NightlyLlvm::find()?;
    if !bpf_linker_uses(&llvm) {
        install_bpf_linker(&llvm)?;
        done.push(format!("installed bpf-linker against the nightly's LLVM {}", llvm.major));
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

/// The shared libLLVM of the nightly toolchain, and its major version (`rustc -vV`).
struct NightlyLlvm {
    major: u32,
    /// `<sysroot>/lib/libLLVM.so.<version>-rust-<rustc version>`: also its soname.
    library: PathBuf,
}

impl NightlyLlvm {
    fn find() -> anyhow::Result<Self> {
        let version = command_stdout(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
        let major = llvm_major(&version)
            .with_context(|| format!("no LLVM version in `rustc +{NIGHTLY} -vV`:\n{version}"))?;
        if !BPF_LINKER_LLVM_MAJORS.contains(&major) {
            bail!(
                "the {NIGHTLY} toolchain uses LLVM {major}; bpf-linker {BPF_LINKER_VERSION} supports LLVM \
                 {BPF_LINKER_LLVM_MAJORS:?} only"
            );
        }
        let sysroot =
            command_stdout(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
        let lib = Path::new(sysroot.trim()).join("lib");
        let libraries: Vec<PathBuf> = std::fs::read_dir(&lib)
            .with_context(|| format!("reading {}", lib.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so.")))
            .collect();
        let [library] = <[PathBuf; 1]>::try_from(libraries).map_err(|found| {
            anyhow::anyhow!(
                "expected one shared libLLVM (libLLVM.so.*) in {}, found {found:?}",
                lib.display()
            )
        })?;
        Ok(Self { major, library })
    }

    fn soname(&self) -> String {
        self.library.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// The major version in the `LLVM version: 23.1.4` line of `rustc -vV`.
fn llvm_major(rustc_version: &str) -> Option<u32> {
    let version = rustc_version.lines().find_map(|l| l.strip_prefix("LLVM version: "))?;
    version.split('.').next()?.trim().parse().ok()
}

/// Where bpf-linker is installed and where it finds libLLVM: `$CARGO_HOME` (default `~/.cargo`).
fn cargo_home() -> anyhow::Result<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")
}

/// Whether the bpf-linker that cargo installed runs and loads exactly `llvm`'s library.
fn bpf_linker_uses(llvm: &NightlyLlvm) -> bool {
    let Ok(home) = cargo_home() else { return false };
    let binary = home.join("bin/bpf-linker");
    let runs = Command::new(&binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    runs && command_stdout(Command::new("ldd").arg(&binary)).is_ok_and(|libs| libs.contains(&llvm.soname()))
}

/// Builds bpf-linker linked dynamically against `llvm`: its build script links `-lLLVM` from
/// `$LLVM_PREFIX/lib` and sets that directory as the binary's rpath, so the prefix holds two
/// links to the toolchain's library, by the link-time name and by the soname. One prefix per
/// soname: a new `LLVM_PREFIX` makes cargo run the build script again even where it reuses a
/// target directory (`CARGO_TARGET_DIR`), and the working linker's prefix stays until the new
/// one is installed and checked; then the other prefixes (of removed toolchains) go.
fn install_bpf_linker(llvm: &NightlyLlvm) -> anyhow::Result<()> {
    let prefixes = cargo_home()?.join("bpf-linker-llvm");
    let prefix = prefixes.join(llvm.soname());
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so".to_string(), llvm.soname()] {
        let link = lib.join(&name);
        if std::fs::read_link(&link).is_ok_and(|target| target == llvm.library) {
            continue;
        }
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm.library, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm.library.display()))?;
    }
    run_checked(
        Command::new("cargo").env("LLVM_PREFIX", &prefix).args([
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{}", llvm.major),
        ]),
        "cargo install bpf-linker",
    )?;
    if !bpf_linker_uses(llvm) {
        bail!(
            "{} was installed but does not load {} (see `ldd` on it); is CARGO_INSTALL_ROOT set?",
            cargo_home()?.join("bin/bpf-linker").display(),
            llvm.soname()
        );
    }
    for entry in std::fs::read_dir(&prefixes).with_context(|| format!("reading {}", prefixes.display()))? {
        let old = entry.with_context(|| format!("reading {}", prefixes.display()))?.path();
        if old != prefix {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    Ok(())
}

fn command_stdout(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output().with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run_checked(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn the_llvm_major_version_comes_from_rustc_vv() {
        let nightly = "rustc 1.101.0-nightly (92b5b8c87 2026-10-29)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.101.0-nightly\nLLVM version: 23.1.4\n";
        assert_eq!(llvm_major(nightly), Some(23));
        assert_eq!(llvm_major("LLVM version: 22.1.8"), Some(22));
        assert_eq!(llvm_major("rustc 1.95.0\nrelease: 1.95.0\n"), None);
        assert_eq!(llvm_major("LLVM version: x.1"), None);
    }
}
