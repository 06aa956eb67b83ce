//! `replicator create` and `replicator destroy`: a mirror's database comes into being on its
//! primary's host before anything runs, and goes when nothing of it is left (seed 0108: only
//! without secondaries).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::commands::operate::STATE_DIR_DEFAULT;
use crate::device::BlockDevice;
use crate::mirror::{ActivationPolicy, Designator, ImageRecord, MirrorDb, MirrorState, WritePolicy};
use crate::shipper::{ImageState, PEERS_MAX, RecoveryPolicy, ShipperConfig};

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The mirror's name (letters, digits, '-', '_').
    pub name: String,
    /// The primary image: the block device to replicate.
    #[arg(long)]
    pub device: PathBuf,
    /// This member's state directory; the database is STATE_DIR/mirror.db.
    #[arg(long, default_value = STATE_DIR_DEFAULT)]
    pub state_dir: PathBuf,
    /// The primary image's name in the mirror [default: this host's short name].
    #[arg(long)]
    pub image_name: Option<String>,
    /// Tracking and shipping grain, a power of two from 4KiB to 64MiB.
    #[arg(long, default_value = "64KiB", value_parser = crate::units::parse_bytes)]
    pub extent_size: u64,
    /// Images (the primary counts) that must be SYNCHRONIZED, else the mirror needs attention.
    #[arg(long, default_value_t = 1)]
    pub minimum_images: u32,
    /// Secondaries that may be missing (unreachable, fractured) before the mirror needs
    /// attention [default: no limit].
    #[arg(long, default_value_t = PEERS_MAX as u32)]
    pub maximum_missing_images: u32,
    /// What leaves ATTENTION once its cause is gone: automatic, or manual (`activate`).
    #[arg(long, value_enum, default_value = "automatic")]
    pub activation_policy: ActivationPolicy,
    /// async (the tracker path). sync needs the NBD export, not built yet.
    #[arg(long, value_enum, default_value = "async")]
    pub write_policy: WritePolicy,
    /// Unacknowledged bytes allowed per secondary.
    #[arg(long, default_value = "64MiB", value_parser = crate::units::parse_bytes)]
    pub write_backlog: u64,
    /// Relative resync priority, 1 (lowest) to 10.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=10))]
    pub sync_priority: u8,
}

pub fn create(args: &CreateArgs) -> anyhow::Result<()> {
    let valid_name =
        |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    anyhow::ensure!(
        valid_name(&args.name),
        "{:?}: a mirror's name is letters, digits, '-' and '_'",
        args.name
    );
    if let Some(db) = MirrorDb::load(&args.state_dir)? {
        anyhow::bail!(
            "{}: mirror {:?} already exists there; `replicator destroy` it first, or use another state directory",
            args.state_dir.display(),
            db.name
        );
    }
    anyhow::ensure!(
        args.write_policy == WritePolicy::Async,
        "write policy sync needs the NBD export, which is not built yet; use async"
    );
    anyhow::ensure!(
        args.extent_size.is_power_of_two() && (4096..=64 << 20).contains(&args.extent_size),
        "extent size {} is not a power of two from 4KiB to 64MiB",
        args.extent_size
    );
    anyhow::ensure!(
        (1..=1 + PEERS_MAX as u32).contains(&args.minimum_images),
        "minimum images {} must be 1 (the primary alone) to {}",
        args.minimum_images,
        1 + PEERS_MAX
    );
    let device = BlockDevice::resolve(&args.device)?;
    let image_bytes = device.size_bytes();
    let image_name = match &args.image_name {
        Some(name) => name.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .and_then(|h| h.trim().split('.').next().map(str::to_owned))
            .filter(|h| valid_name(h))
            .unwrap_or_else(|| "primary".into()),
    };
    anyhow::ensure!(
        valid_name(&image_name),
        "{image_name:?}: an image's name is letters, digits, '-' and '_'"
    );
    let db = MirrorDb {
        name: args.name.clone(),
        id: crate::mirror::new_mirror_id(),
        revision: 1,
        state: MirrorState::Active,
        state_cause: String::new(),
        generation: 1,
        extent_bytes: args.extent_size,
        image_bytes,
        fracture_log_bytes: image_bytes.div_ceil(args.extent_size).div_ceil(8),
        minimum_images: args.minimum_images,
        maximum_missing_images: args.maximum_missing_images,
        sync_priority: args.sync_priority,
        write_policy: args.write_policy,
        write_backlog_bytes: args.write_backlog,
        activation_policy: args.activation_policy,
        images: vec![ImageRecord {
            name: image_name,
            designator: Designator::Primary,
            address: None,
            device: Some(args.device.display().to_string()),
            state: ImageState::Synchronized,
            reachable: true,
            generation: 1,
            sync_rate_bytes_per_s: ShipperConfig::SYNC_RATE_BYTES_PER_S_DEFAULT,
            resync_bytes_done: 0,
            recovery_policy: RecoveryPolicy::Automatic,
        }],
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    db.store(&args.state_dir)?;
    println!(
        "created mirror {} (id {:#018x}) with primary image {} on {} ({} bytes); start it with\n  \
         replicator primary --state-dir {} --key-file KEY\nthen add secondaries with `replicator add-secondary`",
        db.name,
        db.id,
        db.images[0].name,
        args.device.display(),
        image_bytes,
        args.state_dir.display()
    );
    Ok(())
}

/// `destroy`: only with no secondaries left and no primary running; removes the database, the
/// logs, and the primary's pinned tracker.
pub fn destroy(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let db = MirrorDb::load(state_dir)?.ok_or_else(|| {
        anyhow::anyhow!("{}: no mirror database here; nothing to destroy", state_dir.display())
    })?;
    anyhow::ensure!(
        crate::control::call(state_dir, &crate::control::Request::Status).is_err(),
        "mirror {:?} is running: stop its primary (SIGTERM) first",
        db.name
    );
    let secondaries: Vec<&str> = db.secondaries().map(|i| i.name.as_str()).collect();
    anyhow::ensure!(
        secondaries.is_empty(),
        "mirror {:?} still has secondaries {}; remove them first with `replicator remove-secondary`",
        db.name,
        secondaries.join(", ")
    );
    for entry in std::fs::read_dir(state_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name == crate::logs::INTENT_LOG_FILE
            || name == "status.json"
            || (name.starts_with("fracture-") && name.ends_with(".log"));
        if ours {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    if let Some(device) = db.primary().and_then(|p| p.device.as_deref()) {
        let name = std::path::Path::new(device).file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name {
            crate::tracker::unpin(&std::path::Path::new(crate::tracker::BPFFS_ROOT).join(name))?;
        }
    }
    crate::logs::remove_file(state_dir, crate::mirror::DB_FILE)?;
    println!("destroyed mirror {} (id {:#018x})", db.name, db.id);
    Ok(())
}
