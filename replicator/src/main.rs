//! The `replicator` command: argument parsing, logging and exit codes; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use replicator::commands::{self, track::TrackArgs};
use replicator::units::parse_bytes;

/// Block-device replication with eBPF change tracking; no kernel module.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the extents written to a device as writes complete (like blktrace, at extent grain).
    ///
    /// Attaches the eBPF tracker to DEVICE (a whole disk or a partition) and prints each run of
    /// written extents. The tracker's maps and links are pinned under /sys/fs/bpf/replicator/NAME,
    /// so writes made while no `track` runs (after a crash or kill) are printed by the next run.
    /// SIGINT/SIGTERM stop cleanly: a last drain, then the pins are removed (unless
    /// --keep-pinned).
    Track {
        /// Block device to track, e.g. /dev/loop0 or /dev/nvme0n1p2.
        #[arg(long)]
        device: PathBuf,
        /// Extent size: a power of two from 4KiB to 64MiB. One bit tracks one extent.
        #[arg(long, default_value = "64KiB", value_parser = parse_bytes)]
        extent_size: u64,
        /// Name of the pin directory under /sys/fs/bpf/replicator (default: the device's name).
        #[arg(long)]
        name: Option<String>,
        /// How often to drain the completed-write bitmap, in milliseconds.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        interval_ms: u64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// On a clean stop, leave the tracker pinned and marking.
        #[arg(long)]
        keep_pinned: bool,
    },
    /// Remove a tracker's pinned maps and links: the program detaches and its marks are dropped.
    Untrack {
        /// Name given to `track --name` (default there: the device's name).
        #[arg(long)]
        name: String,
    },
    /// Run the built-in demo: a loop device in /dev/shm, a write workload, the extents reported.
    Demo,
    /// Replicate DEVICE to one or more secondaries (runs in the foreground).
    ///
    /// Attaches the tracker, then ships every extent written to DEVICE to each secondary over
    /// TCP (io_uring, zero-copy send). At start every extent is shipped once, since the
    /// secondaries' contents are unknown, unless --skip-initial-sync. A secondary that cannot be
    /// reached is retried every second at most; the extents it misses are kept and shipped when
    /// it returns. Progress is written to STATE_DIR/status.json. SIGINT/SIGTERM stop cleanly.
    Primary(replicator::commands::replicate::PrimaryArgs),
    /// Hold a secondary image and write what an authenticated primary sends (foreground).
    ///
    /// Opens DEVICE exclusively (nothing can mount or write it meanwhile), listens on ADDR:PORT,
    /// and after a mutual key check writes each extent with RWF_DSYNC before acknowledging it.
    /// A primary that reconnects supersedes its previous session.
    Secondary(replicator::commands::replicate::SecondaryArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("replicator: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Track { device, extent_size, name, interval_ms, json, keep_pinned } => {
            let stop = commands::stop_flag()?;
            let args = TrackArgs { device, extent_bytes: extent_size, name, interval_ms, json, keep_pinned };
            commands::track::run(&args, &stop)
        }
        Command::Untrack { name } => {
            let pin_dir = PathBuf::from(replicator::tracker::BPFFS_ROOT).join(&name);
            replicator::tracker::unpin(&pin_dir)?;
            eprintln!("untrack: removed {}", pin_dir.display());
            Ok(())
        }
        Command::Demo => commands::demo::run(),
        Command::Primary(args) => commands::replicate::run_primary(args, &*commands::stop_flag()?),
        Command::Secondary(args) => commands::replicate::run_secondary(args, &*commands::stop_flag()?),
    }
}
