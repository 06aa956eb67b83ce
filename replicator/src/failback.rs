//! A secondary meeting a primary's mirror database: store it, or see that this member was the
//! primary before (failback: hand back the extents it wrote that the new primary may lack), or
//! refuse it (another mirror, a stale primary, a split brain).
//!
//! Owns the decision and the former primary's logs in the state directory. Invariant: a former
//! primary's logs (its intent log, its fracture logs, and its pinned tracker's marks, merged
//! into the intent log) stay until the new primary reports this image SYNCHRONIZED; until then
//! every connection hands the divergent extents back again, so a crash of either side loses
//! none of them.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use bitvec::prelude::*;

use crate::envelope;
use crate::logs::{self, LogHeader, LogIdentity, LogKind};
use crate::mirror::MirrorDb;
use crate::model::ImageState;

/// Written by `replicator resolve --keep NAME` on the member whose writes are discarded;
/// removed once this member stored the kept primary's database (it is honoured once).
pub const RESOLVED_FILE: &str = "resolved-keep";
/// This member's image name, as the primary's database knows it.
pub const IMAGE_NAME_FILE: &str = "image-name";

/// The two name files: a name (`model::check_name`) in the common envelope.
const IMAGE_NAME_KIND: envelope::Kind = name_kind(*b"RPLNAME\0");
const RESOLVED_KIND: envelope::Kind = name_kind(*b"RPLKEEP\0");

/// This member's image name, as the primary's database knows it, if it has heard it.
pub fn image_name(state_dir: &Path) -> Result<Option<String>, String> {
    load_name(state_dir, IMAGE_NAME_FILE, &IMAGE_NAME_KIND)
}

pub fn store_image_name(state_dir: &Path, name: &str) -> Result<(), String> {
    store_name(state_dir, IMAGE_NAME_FILE, &IMAGE_NAME_KIND, name)
}

/// The image `resolve --keep` named here, if any.
pub fn resolved_keep(state_dir: &Path) -> Result<Option<String>, String> {
    load_name(state_dir, RESOLVED_FILE, &RESOLVED_KIND)
}

pub fn store_resolved_keep(state_dir: &Path, name: &str) -> Result<(), String> {
    store_name(state_dir, RESOLVED_FILE, &RESOLVED_KIND, name)
}

const fn name_kind(magic: [u8; 8]) -> envelope::Kind {
    envelope::Kind { magic, version: 1, oldest_version: 1, body_bytes_max: crate::model::NAME_BYTES_MAX }
}

/// Stores `name` in `file` (`IMAGE_NAME_FILE` or `RESOLVED_FILE`, with its kind) durably.
fn store_name(state_dir: &Path, file: &str, kind: &envelope::Kind, name: &str) -> Result<(), String> {
    crate::model::check_name(crate::model::NameOf::Image, name).map_err(|e| e.to_string())?;
    envelope::replace_file(state_dir, file, &envelope::seal(kind, name.as_bytes())).map_err(|e| e.to_string())
}

/// The name in `file`, if there is one. A file without the envelope (written before it) is
/// read as the plain name it held.
fn load_name(state_dir: &Path, file: &str, kind: &envelope::Kind) -> Result<Option<String>, String> {
    let Some(bytes) = envelope::read_file(state_dir, file).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let damaged = |reason: String| format!("{}: {reason}", state_dir.join(file).display());
    let name = match envelope::peek_version(kind, &bytes) {
        Some(_) => envelope::open(kind, &bytes).map_err(|e| damaged(e.to_string()))?.1,
        None => bytes.trim_ascii(),
    };
    let name = std::str::from_utf8(name).map_err(|e| damaged(e.to_string()))?;
    crate::model::check_name(crate::model::NameOf::Image, name).map_err(|e| damaged(e.to_string()))?;
    Ok(Some(name.to_owned()))
}

/// What to do with an incoming database.
#[derive(Debug)]
pub struct Reconciled {
    pub db: MirrorDb,
    /// Extents this member wrote as a primary that the new primary may lack.
    pub divergent: Vec<Range<u64>>,
    /// This image is SYNCHRONIZED in the incoming database: a former primary's logs may go.
    pub synchronized_here: bool,
    pub image_name: Option<String>,
}

/// Why a secondary refuses a primary's database; its `code` goes back in the `Error` frame.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The database does not decode.
    #[error("mirror database: {0}")]
    Damaged(String),
    /// Another mirror, a stale primary, two primaries at one generation.
    #[error("{0}")]
    Refused(String),
    /// Both sides wrote as primary while apart.
    #[error("split brain: {0}")]
    SplitBrain(String),
    /// This member's own state (its database, its logs, its tracker) cannot be read.
    #[error("{0}")]
    State(String),
}

impl Refusal {
    pub fn code(&self) -> crate::wire::ErrorCode {
        use crate::wire::ErrorCode;
        match self {
            Self::Damaged(_) => ErrorCode::Protocol,
            Self::Refused(_) => ErrorCode::Refused,
            Self::SplitBrain(_) => ErrorCode::SplitBrain,
            Self::State(_) => ErrorCode::StateFailed,
        }
    }
}

pub fn reconcile(
    state_dir: &Path,
    device: &Path,
    envelope: &[u8],
    local_addr: Option<SocketAddr>,
) -> Result<Reconciled, Refusal> {
    let db = MirrorDb::decode(envelope).map_err(Refusal::Damaged)?;
    let own = MirrorDb::load(state_dir).map_err(|e| Refusal::State(e.to_string()))?;
    let record = db.secondaries().find(|i| i.address.is_some_and(|a| Some(a) == local_addr));
    let image_name = record.map(|r| r.name.clone());
    let synchronized_here = record.is_some_and(|r| r.state == ImageState::Synchronized);
    let divergent = match own {
        Some(own) => divergent_from(state_dir, device, &own, &db)?,
        None => Vec::new(),
    };
    Ok(Reconciled { db, divergent, synchronized_here, image_name })
}

/// Checks an incoming database `db` against this member's `own`, and returns the extents to
/// hand back to its primary (this member wrote them as a primary, or followed a side that a
/// resolve discarded).
fn divergent_from(
    state_dir: &Path,
    device: &Path,
    own: &MirrorDb,
    db: &MirrorDb,
) -> Result<Vec<Range<u64>>, Refusal> {
    if own.id != db.id {
        return Err(Refusal::Refused(format!(
            "mirror database of mirror {:?} (id {:#x}), but this image belongs to {:?} (id {:#x})",
            db.name, db.id, own.name, own.id
        )));
    }
    let incoming_primary = db.primary().map_or("?", |p| p.name.as_str());
    let own_primary = own.primary().map_or("?", |p| p.name.as_str());
    let resolved = resolved_keep(state_dir).map_err(Refusal::State)?;
    // `resolve --keep` named the incoming primary here: its database wins even when older
    // (the old primary kept against the promoted side).
    let kept = resolved.as_deref() == Some(incoming_primary);
    if db.generation < own.generation && !kept {
        return Err(Refusal::Refused(format!(
            "stale primary {incoming_primary}: generation {} is older than this image's {} (primary {own_primary})",
            db.generation, own.generation
        )));
    }
    let was_primary_here = state_dir.join(logs::INTENT_LOG_FILE).exists();
    // The stored database names this member its primary: it was promoted (or made the
    // mirror) and has not followed anyone since. A former primary that follows a new one
    // keeps its logs until it is SYNCHRONIZED, but a third primary at the new primary's
    // generation is refused like on any secondary.
    let own_name = image_name(state_dir).map_err(Refusal::State)?;
    let primary_in_own_db = was_primary_here && own_name.as_deref().is_none_or(|name| name == own_primary);
    if db.generation == own.generation && own_primary != incoming_primary && !primary_in_own_db {
        return Err(Refusal::Refused(format!(
            "two primaries at generation {}: this image follows {own_primary}, {incoming_primary} claims it too",
            db.generation
        )));
    }
    if was_primary_here && own_primary != incoming_primary {
        let apart = wrote_without(state_dir, own, incoming_primary);
        if apart > 0 && !kept {
            return Err(Refusal::SplitBrain(format!(
                "this image was primary {own_primary} at generation {} and wrote {apart} extents while \
                 {incoming_primary} was away; {incoming_primary} is primary at generation {}. Nothing is \
                 overwritten: on the member whose writes are to be discarded run `replicator resolve --keep NAME`",
                own.generation, db.generation
            )));
        }
        return former_primary_extents(state_dir, device, own).map_err(Refusal::State);
    }
    if kept && db.generation < own.generation {
        // A member that followed the side now discarded: what it took from that side is in
        // no log here, so every extent is handed back (a full copy from the kept side).
        tracing::warn!(
            kept = %incoming_primary,
            discarded = %own_primary,
            "resolved for an older primary: this image followed the discarded side, so it is copied whole"
        );
        return Ok(std::iter::once(0..own.extent_bytes.extents_of(own.image_bytes)).collect());
    }
    Ok(Vec::new())
}

/// Extents in this former primary's fracture log for `peer`: written while `peer` was away.
fn wrote_without(state_dir: &Path, own: &MirrorDb, peer: &str) -> usize {
    let identity = LogIdentity {
        kind: LogKind::Fracture,
        mirror_id: own.id,
        secondary_id: logs::secondary_id(peer),
        extent_bytes: own.extent_bytes,
        image_bytes: own.image_bytes,
    };
    match logs::load(state_dir, &logs::fracture_log_file(peer), &identity) {
        Ok(Some((_, bits))) => bits.count_ones(),
        Ok(None) => 0,
        // A damaged log cannot tell: count it as writes apart, a person decides.
        Err(_) => 1,
    }
}

/// Everything this member may have written as primary that others may lack: its intent log,
/// its fracture logs, and its pinned tracker's marks (merged into the intent log, then the
/// tracker is removed so it stops marking this image's resync writes).
fn former_primary_extents(
    state_dir: &Path,
    device: &Path,
    own: &MirrorDb,
) -> Result<Vec<Range<u64>>, String> {
    let extents = own.extent_bytes.extents_of(own.image_bytes) as usize;
    let mut union = bitvec![u64, Lsb0; 0; extents];
    let identity = |kind, secondary_id| LogIdentity {
        kind,
        mirror_id: own.id,
        secondary_id,
        extent_bytes: own.extent_bytes,
        image_bytes: own.image_bytes,
    };
    match logs::load(state_dir, logs::INTENT_LOG_FILE, &identity(LogKind::Intent, 0)) {
        Ok(Some((_, bits))) => *union |= bits.as_bitslice(),
        Ok(None) => {}
        Err(error) => {
            tracing::error!(%error, "the former primary's intent log is damaged: handing back every extent");
            union.fill(true);
        }
    }
    for image in own.images.iter() {
        let name = logs::fracture_log_file(&image.name);
        match logs::load(state_dir, &name, &identity(LogKind::Fracture, logs::secondary_id(&image.name))) {
            Ok(Some((_, bits))) => *union |= bits.as_bitslice(),
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "a fracture log of the former primary is damaged: handing back every extent");
                union.fill(true);
            }
        }
    }
    if let Some(name) = device.file_name() {
        let pin_dir = Path::new(crate::tracker::BPFFS_ROOT).join(name);
        if pin_dir.exists() {
            let options = crate::tracker::TrackerOptions {
                name: Some(name.to_string_lossy().into_owned()),
                extent_bytes: own.extent_bytes.get(),
                ..Default::default()
            };
            let mut tracker =
                crate::tracker::Tracker::attach_with(device, &options).map_err(|e| e.to_string())?;
            let mut pinned = BitVec::new();
            tracker.intent_into(&mut pinned);
            for run in tracker.drain_completed() {
                pinned[run.start as usize..run.end as usize].fill(true);
            }
            *union |= pinned.as_bitslice();
            // Kept in the intent log from here on, so the tracker can go.
            let header = LogHeader::new(&identity(LogKind::Intent, 0), own.generation);
            crate::envelope::replace_file(state_dir, logs::INTENT_LOG_FILE, &logs::encode(&header, &union))
                .map_err(|e| e.to_string())?;
            tracker.stop().map_err(|e| e.to_string())?;
        }
    }
    Ok(crate::extent_set::ExtentSet::from_bits(&union).runs().collect())
}

/// The former primary is SYNCHRONIZED with the new one: its logs are no longer needed.
pub fn forget_former_primary(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let former = logs::is_primary_log(&name) || name == RESOLVED_FILE || name == "status.json";
        if former && let Err(error) = crate::envelope::remove_file(state_dir, &name) {
            tracing::warn!(%error, "removing a former primary's log failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that followed the promoted side (b, generation 2), never a primary itself,
    /// told to keep the old primary (a, generation 1): it takes a's database and hands back
    /// every extent, since what it took from b is in no log here. Without the resolve, a is a
    /// stale primary.
    #[test]
    fn a_follower_of_the_discarded_side_is_copied_whole() {
        let dir = std::env::temp_dir().join(format!("replicator-failback-follower-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let incoming = crate::mirror::sample_db(); // a primary at generation 1
        let mut own = incoming.clone();
        own.generation = 2;
        own.images[0].designator = crate::mirror::Designator::Secondary;
        own.images[0].address = Some("10.0.0.1:7788".parse().expect("address"));
        own.images[1].designator = crate::mirror::Designator::Primary;
        own.images[1].address = None;
        own.store(&dir).expect("storing");
        let stale = reconcile(&dir, Path::new("/dev/null"), &incoming.encode(), None);
        let stale = stale.expect_err("a stale primary");
        assert!(
            matches!(stale, Refusal::Refused(_)) && stale.to_string().contains("stale primary"),
            "{stale}"
        );
        std::fs::write(dir.join(RESOLVED_FILE), "a")
            .expect("resolve --keep a, as a plain file of before the envelope");
        let kept = reconcile(&dir, Path::new("/dev/null"), &incoming.encode(), None);
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
        let kept = kept.expect("accepted once resolved");
        assert_eq!(kept.db.generation, 1);
        assert_eq!(kept.divergent, vec![0..(1u64 << 30) / 65536], "every extent handed back");
    }

    /// A former primary that follows the new primary (b, generation 2) still has its intent log;
    /// a third member (c) claiming generation 2 too is refused, not taken for b's failback.
    #[test]
    fn a_second_primary_at_the_followed_generation_is_refused() {
        let dir = std::env::temp_dir().join(format!("replicator-failback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut own = crate::mirror::sample_db();
        own.generation = 2;
        own.images[0].name = "b".into();
        own.images[1].name = "a".into();
        own.store(&dir).expect("storing");
        std::fs::write(dir.join(IMAGE_NAME_FILE), "a").expect("image name");
        std::fs::write(dir.join(logs::INTENT_LOG_FILE), b"kept until SYNCHRONIZED").expect("intent log");
        let mut incoming = own.clone();
        incoming.images[0].name = "c".into();
        let refused = reconcile(&dir, Path::new("/dev/null"), &incoming.encode(), None);
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
        let message = refused.expect_err("a second primary at generation 2").to_string();
        assert!(message.contains("two primaries at generation 2"), "{message}");
    }
}
