//! The `replicator` command: argument parsing, logging and exit codes; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use replicator::commands::operate::{self, Target};
use replicator::commands::{self, track::TrackArgs};
use replicator::control::Request;
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
    /// TCP (io_uring, zero-copy send). A secondary seen for the first time gets every extent
    /// (a full sync) unless --skip-initial-sync. A secondary that cannot be reached is
    /// fractured: the extents it misses are kept in its fracture log in STATE_DIR (persisted at
    /// once and at every checkpoint), and only those are copied when it returns. The
    /// write-intent log is the tracker's pinned map plus its checkpoint, so a restart after a
    /// crash copies only what may differ; after a host restart every secondary is verified
    /// (hashes compared, only differing extents shipped). SIGINT/SIGTERM stop cleanly and leave
    /// the tracker attached (`replicator untrack` removes it).
    Primary(replicator::commands::replicate::PrimaryArgs),
    /// Hold a secondary image and write what an authenticated primary sends (foreground).
    ///
    /// Opens DEVICE exclusively (nothing can mount or write it meanwhile), listens on ADDR:PORT,
    /// and after a mutual key check writes each extent with RWF_DSYNC before acknowledging it.
    /// A primary that reconnects supersedes its previous session.
    Secondary(replicator::commands::replicate::SecondaryArgs),
    /// Create a mirror: its database in STATE_DIR, with DEVICE as the primary image.
    ///
    /// Run once on the primary's host, before `replicator primary --state-dir STATE_DIR`;
    /// add secondaries to the running primary with `replicator add-secondary`.
    Create(replicator::commands::lifecycle::CreateArgs),
    /// Destroy a mirror: only once it has no secondaries and its primary is stopped. Removes
    /// the database, the logs and the pinned tracker.
    Destroy {
        #[arg(long, default_value = replicator::commands::operate::STATE_DIR_DEFAULT)]
        state_dir: PathBuf,
    },
    /// Add a secondary to a running mirror (made with `create`). The secondary must be
    /// running: its first contact checks the key, the mirror and the image size.
    AddSecondary {
        /// NAME=ADDR:PORT, as the secondary listens.
        secondary: String,
        /// Its image is known identical to the primary's (e.g. both freshly zeroed): no full
        /// sync. Otherwise it is UNSYNCHRONIZED and copied block by block.
        #[arg(long)]
        synchronized: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a secondary from a running mirror; what is in flight to it finishes first
    /// (refused while it is SYNCHRONIZING, unless --force).
    RemoveSecondary {
        secondary: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make the mirror ACTIVE again (after `deactivate`, or out of ATTENTION under the manual
    /// activation policy): its secondaries reconnect and resync from their fracture logs.
    Activate(Target),
    /// Make the mirror INACTIVE: writes are kept in each secondary's fracture log, not shipped
    /// (refused while a secondary is SYNCHRONIZING, unless --force).
    Deactivate {
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make this secondary the primary (its primary is gone): a new generation, tracking from
    /// now. Refused unless it is SYNCHRONIZED or CONSISTENT. Its secondary process must be
    /// stopped; start `replicator primary --state-dir` afterwards.
    Promote(replicator::commands::lifecycle::PromoteArgs),
    /// After a split brain (both sides wrote as primary while apart), on the member whose
    /// writes are to be discarded: KEEP's data wins; start this member as a secondary.
    Resolve {
        /// The image whose data is kept.
        #[arg(long)]
        keep: String,
        #[arg(long, default_value = replicator::commands::operate::STATE_DIR_DEFAULT)]
        state_dir: PathBuf,
    },
    /// Show each secondary of a running primary: state, out-of-sync bytes, resync progress.
    Status(Target),
    /// Stop replicating to a secondary; the extents it misses go to its fracture log until
    /// `restore`.
    Fracture {
        /// The secondary's name, as in --secondary NAME=ADDR:PORT.
        secondary: String,
        #[command(flatten)]
        target: Target,
    },
    /// Bring back a secondary fractured by `fracture` (or, under the manual recovery policy,
    /// by a failure): it reconnects and copies only the extents in its fracture log.
    Restore {
        secondary: String,
        #[command(flatten)]
        target: Target,
    },
    /// Compare a secondary with the primary extent by extent (both sides hash, XXH3-128) and
    /// ship only the extents that differ.
    Verify {
        secondary: String,
        #[command(flatten)]
        target: Target,
    },
    /// Copy every extent to a secondary again (a full sync).
    Sync {
        secondary: String,
        #[command(flatten)]
        target: Target,
    },
    /// Take a consistency point: wait until every SYNCHRONIZED secondary has every extent
    /// written so far, then have each record that its image is CONSISTENT as of now.
    ///
    /// Writes must pause meanwhile for the point to be consistent: --freeze freezes the
    /// filesystem at MOUNTPOINT on the primary (fsfreeze) and thaws it afterwards, always.
    /// Without it, quiesce the application first. Useful before a backup taken from a
    /// secondary.
    Checkpoint {
        /// Freeze this mounted filesystem (on the primary's device) while the point is taken.
        #[arg(long, value_name = "MOUNTPOINT")]
        freeze: Option<PathBuf>,
        /// Give up after this long (writes that never stop).
        #[arg(long, default_value_t = 20_000)]
        timeout_ms: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Change settings of a running primary: sync-rate=BYTES_PER_S (0: unlimited),
    /// recovery-policy=automatic|manual.
    Set {
        /// KEY=VALUE, e.g. sync-rate=200MiB.
        settings: Vec<String>,
        /// Only this secondary (default: all).
        #[arg(long)]
        secondary: Option<String>,
        #[command(flatten)]
        target: Target,
    },
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
            eprintln!("replicator: {}", error_text(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, joined by ": ", leaving out a cause whose text its own parent's
/// message already holds (the library's errors name their source in their own text).
fn error_text(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    let mut parent = text.clone();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !parent.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        parent = cause;
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Track { device, extent_size, name, interval_ms, json, keep_pinned } => {
            let stop = commands::stop_flag()?;
            let args = TrackArgs { device, extent_bytes: extent_size, name, interval_ms, json, keep_pinned };
            commands::track::run(&args, &stop)
        }
        Command::Untrack { name } => {
            let pin_dir = replicator::tracker::untrack(&name)?;
            eprintln!("untrack: removed {}", pin_dir.display());
            Ok(())
        }
        Command::Demo => commands::demo::run(),
        Command::Primary(args) => commands::replicate::run_primary(args, &*commands::stop_flag()?),
        Command::Secondary(args) => commands::replicate::run_secondary(args, &*commands::stop_flag()?),
        Command::Create(args) => replicator::commands::lifecycle::create(&args),
        Command::Destroy { state_dir } => replicator::commands::lifecycle::destroy(&state_dir),
        Command::Promote(args) => replicator::commands::lifecycle::promote(&args),
        Command::Resolve { keep, state_dir } => replicator::commands::lifecycle::resolve(&state_dir, &keep),
        Command::Status(target) => operate::run(&target, Request::Status),
        Command::AddSecondary { secondary, synchronized, target } => {
            let (name, address) = replicator::commands::replicate::parse_secondary(&secondary)
                .map_err(|e| anyhow::anyhow!("add-secondary {e}"))?;
            operate::run(&target, Request::AddSecondary { name, address, synchronized })
        }
        Command::RemoveSecondary { secondary, force, target } => {
            operate::run(&target, Request::RemoveSecondary { name: secondary, force })
        }
        Command::Activate(target) => operate::run(&target, Request::Activate),
        Command::Deactivate { force, target } => operate::run(&target, Request::Deactivate { force }),
        Command::Fracture { secondary, target } => operate::run(&target, Request::Fracture { secondary }),
        Command::Restore { secondary, target } => operate::run(&target, Request::Restore { secondary }),
        Command::Verify { secondary, target } => operate::run(&target, Request::Verify { secondary }),
        Command::Sync { secondary, target } => operate::run(&target, Request::Sync { secondary }),
        Command::Set { settings, secondary, target } => operate::set(&target, secondary, &settings),
        Command::Checkpoint { freeze, timeout_ms, target } => {
            operate::consistency_point(&target, freeze, timeout_ms)
        }
    }
}
