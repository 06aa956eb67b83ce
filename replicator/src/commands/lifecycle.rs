//! A mirror's life on a member's host, outside a running primary: `create` (its database comes
//! into being on the primary's host before anything runs), `destroy` (it goes when nothing of
//! it is left: a mirror is destroyed only once it has no secondaries, so each one's image and
//! state stay accounted for), `promote` (a secondary becomes the primary at a new generation)
//! and `resolve` (after a split brain, the member whose writes are discarded says so).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::commands::operate::STATE_DIR_DEFAULT;
use crate::device::BlockDevice;
use crate::mirror::{Designator, ImageRecord, MirrorDb};
use crate::model::{
    ActivationPolicy, ExtentBytes, ImageState, MirrorState, NameOf, RecoveryPolicy, SECONDARIES_MAX,
    WritePolicy, check_name,
};
use crate::primary::PrimaryConfig;
use crate::secondary::journal::CutState;

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
    #[arg(long, default_value = "64KiB")]
    pub extent_size: ExtentBytes,
    /// Images (the primary counts) that must be SYNCHRONIZED, else the mirror needs attention.
    #[arg(long, default_value_t = 1)]
    pub minimum_images: u32,
    /// Secondaries that may be missing (unreachable, fractured) before the mirror needs
    /// attention [default: no limit].
    #[arg(long, default_value_t = SECONDARIES_MAX as u32)]
    pub maximum_missing_images: u32,
    /// What leaves ATTENTION once its cause is gone: automatic, or manual (`activate`).
    #[arg(long, value_enum, default_value = "automatic")]
    pub activation_policy: ActivationPolicy,
    /// For writes through the NBD export (`primary --export`): sync acknowledges a write once
    /// every SYNCHRONIZED secondary has it durably; async once the primary has it.
    #[arg(long, value_enum, default_value = "async")]
    pub write_policy: WritePolicy,
    /// Unacknowledged bytes allowed per secondary.
    #[arg(long, default_value = "64MiB", value_parser = crate::units::parse_bytes)]
    pub write_backlog: u64,
    /// Relative resync priority, 1 (lowest) to 10.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8)
        .range(i64::from(*crate::mirror::SYNC_PRIORITY.start())..=i64::from(*crate::mirror::SYNC_PRIORITY.end())))]
    pub sync_priority: u8,
}

/// This host's short name, if it is a valid image name; else "primary".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|h| h.trim().split('.').next().map(str::to_owned))
        .filter(|h| check_name(NameOf::Image, h).is_ok())
        .unwrap_or_else(|| "primary".into())
}

pub fn create(args: &CreateArgs) -> anyhow::Result<()> {
    check_name(NameOf::Mirror, &args.name)?;
    if let Some(db) = MirrorDb::load(&args.state_dir)? {
        anyhow::bail!(
            "{}: mirror {:?} already exists there; `replicator destroy` it first, or use another state directory",
            args.state_dir.display(),
            db.name
        );
    }
    anyhow::ensure!(
        crate::mirror::MINIMUM_IMAGES.contains(&args.minimum_images),
        "minimum images {} must be 1 (the primary alone) to {}",
        args.minimum_images,
        1 + SECONDARIES_MAX
    );
    let device = BlockDevice::resolve(&args.device)?;
    let image_bytes = device.size_bytes();
    let image_name = args.image_name.clone().unwrap_or_else(host_name);
    check_name(NameOf::Image, &image_name)?;
    let db = MirrorDb {
        name: args.name.clone(),
        id: crate::mirror::new_mirror_id(),
        revision: 1,
        state: MirrorState::Active,
        state_cause: String::new(),
        generation: 1,
        extent_bytes: args.extent_size,
        image_bytes,
        fracture_log_bytes: args.extent_size.extents_of(image_bytes).div_ceil(8),
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
            sync_rate_bytes_per_s: PrimaryConfig::SYNC_RATE_BYTES_PER_S_DEFAULT,
            resync_bytes_done: 0,
            recovery_policy: RecoveryPolicy::Automatic,
        }],
    };
    crate::envelope::create_state_dir(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    db.store(&args.state_dir)?;
    // A name this directory kept from a mirror it followed before is not this image's.
    crate::envelope::remove_file(&args.state_dir, crate::failback::IMAGE_NAME_FILE)?;
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
    ensure_primary_stopped(state_dir, &db.name)?;
    let secondaries: Vec<&str> = db.secondaries().map(|i| i.name.as_str()).collect();
    anyhow::ensure!(
        secondaries.is_empty(),
        "mirror {:?} still has secondaries {}; remove them first with `replicator remove-secondary`",
        db.name,
        secondaries.join(", ")
    );
    for entry in std::fs::read_dir(state_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = crate::logs::is_primary_log(&name) || name == "status.json";
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
    crate::envelope::remove_file(state_dir, crate::mirror::DB_FILE)?;
    crate::envelope::remove_file(state_dir, crate::failback::IMAGE_NAME_FILE)?;
    println!("destroyed mirror {} (id {:#018x})", db.name, db.id);
    Ok(())
}

/// Refuses unless nothing listens on `state_dir`'s control socket: a primary that is there but
/// does not answer (busy, hung, or not ours to ask) must not have its logs changed under it.
fn ensure_primary_stopped(state_dir: &std::path::Path, mirror: &str) -> anyhow::Result<()> {
    match crate::control::call(state_dir, &crate::control::Request::Status) {
        Err(crate::control::ControlError::NotRunning { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            Ok(())
        }
        Ok(_) => anyhow::bail!("mirror {mirror:?} is running here: stop its primary (SIGTERM) first"),
        Err(error) => anyhow::bail!(
            "cannot tell whether mirror {mirror:?}'s primary is running here ({error}); stop it (SIGTERM) and try again"
        ),
    }
}

#[derive(clap::Args, Debug)]
pub struct PromoteArgs {
    /// This secondary's device (its secondary process must be stopped).
    #[arg(long)]
    pub device: PathBuf,
    /// This member's state directory, holding the mirror database its primary sent.
    #[arg(long, default_value = STATE_DIR_DEFAULT)]
    pub state_dir: PathBuf,
    /// Where the old primary will listen once it comes back as a secondary (ADDR:PORT): the
    /// new primary resyncs it from there, copying only what differs.
    #[arg(long)]
    pub old_primary_address: std::net::SocketAddr,
    /// This image's name in the mirror [default: as the primary last named it].
    #[arg(long)]
    pub image: Option<String>,
    /// Promote even where the image may lack writes clients were told are on every image
    /// (the sync write policy), or is not a consistent cut at all: only when you know the old
    /// primary stopped before this member's session with it ended, or accept the loss.
    #[arg(long)]
    pub force: bool,
}

/// `promote`, on a secondary whose primary is gone: it becomes the primary with a new
/// generation, and its tracker starts marking at once.
pub fn promote(args: &PromoteArgs) -> anyhow::Result<()> {
    let state_dir = &args.state_dir;
    let db = MirrorDb::load(state_dir)?.ok_or_else(|| {
        anyhow::anyhow!("{}: no mirror database: this member never heard from a primary", state_dir.display())
    })?;
    let name = promotable(args, &db)?;
    let cut = last_cut(args, &db)?;
    judge_cut(args, &db, &name, cut.as_ref())?;
    // What was staged after the cut is not this mirror's any more: the old primary comes back
    // verified (`write_primary_logs`), which finds whatever those frames had changed there.
    crate::envelope::remove_file(&args.state_dir, crate::secondary::journal::JOURNAL_FILE)?;
    let old_primary = db.primary().map(|p| p.name.clone()).unwrap_or_default();
    let new = promoted(&db, &name, args);
    write_primary_logs(state_dir, &new)?;
    // Track from this moment: the tracker stays pinned until the primary takes it over.
    let options =
        crate::tracker::TrackerOptions { extent_bytes: db.extent_bytes.get(), ..Default::default() };
    drop(crate::tracker::Tracker::attach_with(&args.device, &options)?);
    new.store(state_dir)?;
    crate::failback::store_image_name(state_dir, &name).map_err(anyhow::Error::msg)?;
    println!(
        "{name} is now the primary of mirror {} at generation {} (was {old_primary}); writes to {} are tracked \
         from now on.\nStart it:  replicator primary --state-dir {} --key-file KEY\nBring {old_primary} back as a \
         secondary listening on {}; it gets only what differs.",
        new.name,
        new.generation,
        args.device.display(),
        state_dir.display(),
        args.old_primary_address
    );
    Ok(())
}

/// This member's image name, once it is known that it may be promoted: a secondary of the
/// mirror whose image is a copy of the primary at some point in time, on a device of the
/// mirror's size that nothing holds open.
fn promotable(args: &PromoteArgs, db: &MirrorDb) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = match &args.image {
        Some(name) => name.clone(),
        None => crate::failback::image_name(&args.state_dir)
            .map_err(anyhow::Error::msg)?
            .ok_or_else(|| anyhow::anyhow!("which image is this? give --image NAME"))?,
    };
    db.secondaries()
        .find(|i| i.name == name)
        .ok_or_else(|| anyhow::anyhow!("mirror {:?} has no secondary named {name}", db.name))?;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&args.device).with_context(
        || format!("{} is in use: stop this member's secondary first", args.device.display()),
    )?;
    let device = BlockDevice::resolve(&args.device)?;
    anyhow::ensure!(
        device.size_bytes() == db.image_bytes,
        "{} holds {} bytes, the mirror's images {}",
        args.device.display(),
        device.size_bytes(),
        db.image_bytes
    );
    Ok(name)
}

/// Brings the image to the last cut its journal committed (a crash may have left one half
/// applied) and returns what the image holds; `None` for a member that kept no journal (it
/// ran a version before consistent cuts).
fn last_cut(args: &PromoteArgs, db: &MirrorDb) -> anyhow::Result<Option<CutState>> {
    use crate::secondary::journal::{self, Geometry, Journal};
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = args.state_dir.join(journal::JOURNAL_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_DIRECT)
        .open(&args.device)
        .with_context(|| format!("opening {}", args.device.display()))?;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
    let payload_bytes_max = crate::secondary::SecondaryConfig::FRAME_DATA_BYTES_MAX_DEFAULT;
    let geometry = Geometry {
        capacity: file.metadata()?.len().saturating_sub(journal::format::RING_START),
        payload_bytes_max: payload_bytes_max as u32,
        extent_bytes: journal::INDEX_GRAIN_BYTES,
        image_bytes: db.image_bytes,
    };
    let mut scratch = crate::pool::BufferPool::new(1, payload_bytes_max)?;
    let buffer = scratch.take().expect("one buffer");
    let journal = Journal::open(file, geometry, &image, scratch.data_mut(buffer, payload_bytes_max))
        .with_context(|| {
            format!("bringing {} to its last cut from {}", args.device.display(), path.display())
        })?;
    Ok(Some(journal.cut_state()))
}

/// Says what the image holds and what it may lack, and refuses (unless `--force`) where the
/// image is no consistent cut, or where clients may have been told of writes it lacks.
fn judge_cut(args: &PromoteArgs, db: &MirrorDb, name: &str, cut: Option<&CutState>) -> anyhow::Result<()> {
    let Some(cut) = cut else {
        let record = db.secondaries().find(|i| i.name == name).expect("promotable checked it");
        let state = record.state;
        anyhow::ensure!(
            args.force || matches!(state, ImageState::Synchronized | ImageState::Consistent),
            "{name} is {state:?} and kept no journal: its image may be no copy of the primary at any point in \
             time; bring the primary back and let it finish (or promote with --force)"
        );
        println!(
            "{name} kept no journal (a version before consistent cuts): which moment its image holds is unknown"
        );
        return Ok(());
    };
    println!("{}", describe_cut(name, cut, crate::logs::unix_ms_now()));
    let refusals = refusals(db, name, cut);
    if refusals.is_empty() {
        return Ok(());
    }
    if args.force {
        for refusal in &refusals {
            println!("promoting anyway (--force): {refusal}");
        }
        return Ok(());
    }
    anyhow::bail!(
        "not promoting {name}:\n- {}\nPromote with --force if that is acceptable.",
        refusals.join("\n- ")
    )
}

fn describe_cut(name: &str, cut: &CutState, now_ms: u64) -> String {
    let ago = |ms: u64| format!("{:.1} s ago", now_ms.saturating_sub(ms) as f64 / 1000.0);
    let mut text = if cut.committed_cut == 0 {
        format!("{name}'s image holds no cut of the primary yet")
    } else {
        format!(
            "{name}'s image is cut {} of the primary, taken at {} ms after the epoch ({})",
            cut.committed_cut,
            cut.committed_unix_ms,
            ago(cut.committed_unix_ms)
        )
    };
    if cut.session_ended_unix_ms > 0 {
        text += &format!("; its last session with the primary ended {}", ago(cut.session_ended_unix_ms));
    }
    text += ". Writes on the primary after that cut are not on it";
    if cut.staged_frames > 0 {
        text += &format!(
            " ({} frames, {} bytes, of later cuts had arrived and are discarded)",
            cut.staged_frames, cut.staged_bytes
        );
    }
    text + "."
}

/// Why `name` must not be promoted without `--force`; empty when it may.
fn refusals(db: &MirrorDb, name: &str, cut: &CutState) -> Vec<String> {
    let mut refusals = Vec::new();
    if !cut.consistent {
        refusals.push(format!(
            "{name}'s image is not a consistent cut of the primary: a first full sync, or a catch-up larger \
             than its journal, was in progress; it holds a mix of moments a crash of the primary never \
             could have left"
        ));
    }
    if db.write_policy == WritePolicy::Sync {
        if cut.staged_client_frames > 0 {
            refusals.push(format!(
                "{} writes through the export that clients were told are on every image (sync policy) arrived \
                 after cut {} and belong to no cut this image can be brought to",
                cut.staged_client_frames, cut.committed_cut
            ));
        }
        let images = db.images.len();
        if (db.minimum_images as usize) < images {
            refusals.push(format!(
                "the primary acknowledges sync writes once {} of the mirror's {images} images have them: after \
                 {name}'s session ended it may have acknowledged writes this image lacks",
                db.minimum_images
            ));
        }
    }
    refusals
}

/// The database with image `name` the primary at the next generation, the old primary a
/// secondary at `old_primary_address`, every secondary UNSYNCHRONIZED until it returns.
fn promoted(db: &MirrorDb, name: &str, args: &PromoteArgs) -> MirrorDb {
    let old_primary = db.primary().map(|p| p.name.clone()).unwrap_or_default();
    let mut new = db.clone();
    new.generation += 1;
    new.revision += 1;
    new.state = MirrorState::Active;
    new.state_cause = String::new();
    for image in &mut new.images {
        if image.name == name {
            image.designator = Designator::Primary;
            image.address = None;
            image.device = Some(args.device.display().to_string());
            image.state = ImageState::Synchronized;
            image.generation = new.generation;
        } else if image.name == old_primary {
            image.designator = Designator::Secondary;
            image.address = Some(args.old_primary_address);
            image.device = None;
            image.state = ImageState::Unsynchronized;
            image.reachable = false;
        } else {
            image.state = ImageState::Unsynchronized;
        }
    }
    new
}

/// Logs of a primary: the old primary lacks what is written from now on (tracked from here),
/// and may hold writes of its own that nothing here knows of (those after its last intent-log
/// checkpoint, if its host went down: no pinned tracker survives a reboot), so it is verified
/// too when it returns, besides the extents it hands back; the other secondaries followed the
/// old primary, so they are verified.
fn write_primary_logs(state_dir: &std::path::Path, new: &MirrorDb) -> anyhow::Result<()> {
    use crate::logs::{FLAG_FRACTURED, FLAG_VERIFY, LogHeader, LogIdentity, LogKind};
    let extents = new.extent_bytes.extents_of(new.image_bytes) as usize;
    let empty = bitvec::bitvec![u64, bitvec::order::Lsb0; 0; extents];
    let header = |kind, flags, secondary_id| {
        let identity = LogIdentity {
            kind,
            mirror_id: new.id,
            secondary_id,
            extent_bytes: new.extent_bytes,
            image_bytes: new.image_bytes,
        };
        LogHeader { flags, ..LogHeader::new(&identity, new.generation) }
    };
    for image in new.secondaries() {
        let header =
            header(LogKind::Fracture, FLAG_FRACTURED | FLAG_VERIFY, crate::logs::secondary_id(&image.name));
        let file = crate::logs::fracture_log_file(&image.name);
        crate::envelope::replace_file(state_dir, &file, &crate::logs::encode(&header, &empty))?;
    }
    let bytes = crate::logs::encode(&header(LogKind::Intent, 0, 0), &empty);
    crate::envelope::replace_file(state_dir, crate::logs::INTENT_LOG_FILE, &bytes)?;
    Ok(())
}

/// `resolve --keep NAME`, on the member whose writes since a split brain are discarded: the
/// old primary (keeping the promoted side) or the promoted one (keeping the old primary).
pub fn resolve(state_dir: &std::path::Path, keep: &str) -> anyhow::Result<()> {
    let db = MirrorDb::load(state_dir)?
        .ok_or_else(|| anyhow::anyhow!("{}: no mirror database here", state_dir.display()))?;
    anyhow::ensure!(
        db.primary().is_none_or(|p| p.name != keep),
        "this member is {keep}'s side: run `resolve --keep {keep}` on the other member, whose writes are discarded"
    );
    anyhow::ensure!(
        db.images.iter().any(|i| i.name == keep),
        "mirror {:?} has no image named {keep} (its images: {})",
        db.name,
        db.images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    ensure_primary_stopped(state_dir, &db.name)?;
    crate::failback::store_resolved_keep(state_dir, keep).map_err(anyhow::Error::msg)?;
    println!(
        "resolved in favour of {keep}: start this member as a secondary (and {keep} as the primary); the extents \
         written on either side since the split are copied over from {keep} (nothing else)"
    );
    Ok(())
}
