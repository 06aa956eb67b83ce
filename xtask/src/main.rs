//! `cargo xtask`: setup, build, run, test and bench, so that the README's two commands
//! (`cargo xtask run`, `cargo xtask test`) are all a fresh Linux host needs.

mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark the replicator")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, nightly rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object and the `replicator` binary (release; the object is embedded).
    Build,
    /// Build and run `replicator ARGS`; with no ARGS, the built-in demo.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then every test: unit, property and the root-only kernel tests.
    Test {
        /// Extra arguments for the kernel tests' harness (a test name filter, --nocapture).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then run benchmark scenarios (all when none is named).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        scenarios: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    let root = workspace_root();
    match task {
        Task::Setup => setup::run(),
        Task::Build => build(&root).map(|_| ()),
        Task::Run { args } => {
            setup::run()?;
            let binary = build(&root)?;
            let args = if args.is_empty() { vec!["demo".to_owned()] } else { args };
            require_root("replicator needs root to load eBPF programs and create devices")?;
            status(Command::new(binary).args(&args), "replicator")
        }
        Task::Test { args } => {
            setup::run()?;
            test(&root, &args)
        }
        Task::Bench { scenarios } => {
            setup::run()?;
            require_root("the benchmarks create loop devices and load eBPF programs")?;
            let binary = build(&root)?;
            status(
                cargo(&root)
                    .env("REPLICATOR_BIN", &binary)
                    .args(["run", "--release", "--package", "replicator-benches", "--"])
                    .args(&scenarios),
                "benchmarks",
            )
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root);
    command
}

fn status(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn require_root(why: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}

/// Builds the release binary and returns its path.
fn build(root: &Path) -> anyhow::Result<PathBuf> {
    status(cargo(root).args(["build", "--release", "--package", "replicator"]), "cargo build")?;
    Ok(root.join("target/release/replicator"))
}

fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    println!("xtask test: unit and property tests");
    status(
        cargo(root).args([
            "test",
            "--workspace",
            "--exclude",
            "replicator-tests",
            "--exclude",
            "replicator-ebpf",
        ]),
        "unit tests",
    )?;
    require_root("the kernel tests load eBPF programs and create loop and zram devices")?;
    let binary = build(root)?;
    println!("xtask test: kernel tests (root, real block devices)");
    status(
        cargo(root)
            .env("REPLICATOR_BIN", &binary)
            .args(["test", "--package", "replicator-tests", "--", "--test-threads=1"])
            .args(args),
        "kernel tests",
    )
}
