//! Start-up: what the write-intent log and each secondary's fracture log say may differ.
//!
//! A process restart loses nothing: the tracker's pinned maps hold every write since the last
//! run's checkpoint. A host restart loses the pinned maps: the last checkpoint is read, and the
//! writes after it are unknown, so every secondary is verified. A damaged log is never taken
//! for an empty one: its secondary is verified.

use bitvec::prelude::*;

use super::resync::PeerLog;
use crate::envelope::StateFiles;
use crate::extent_set::ExtentSet;
use crate::logs::{self, LogIdentity, LogKind};
use crate::model::RecoveryPolicy;
use crate::tracker::Tracker;

/// What start-up recovered of the write-intent log.
pub struct Recovered {
    /// Extents that may differ on any secondary.
    pub intent: BitVec<u64, Lsb0>,
    /// Writes may have been missed (host restart, damaged checkpoint): verify every secondary.
    pub verify_all: bool,
}

/// What a secondary's recovery follows.
#[derive(Clone, Copy, Debug)]
pub struct PeerDefaults {
    pub sync_rate_bytes_per_s: u64,
    pub recovery_policy: RecoveryPolicy,
    /// A secondary with no fracture log yet gets a full sync.
    pub initial_sync: bool,
}

/// Whether the state files hold logs from an earlier run.
fn logs_exist(state_dir: &std::path::Path) -> bool {
    std::fs::read_dir(state_dir).is_ok_and(|entries| {
        entries.flatten().any(|e| logs::is_primary_log(&e.file_name().to_string_lossy()))
    })
}

/// Rebuilds the write-intent log: the pinned map when the tracker resumed (a process restart
/// loses nothing), else the last checkpoint, whose gap is closed by verifying every secondary.
pub fn recover_intent(
    state_dir: &std::path::Path,
    files: &impl StateFiles,
    identity: &LogIdentity,
    tracker: &mut Tracker,
) -> Recovered {
    let state_existed = logs_exist(state_dir);
    let (mut intent, checkpoint_trusted) =
        load_intent(files, identity, tracker.geometry().extent_count() as usize);
    let checkpoint_trusted = checkpoint_trusted.unwrap_or(!state_existed);
    let verify_all = if tracker.resumed() {
        let mut pinned = BitVec::new();
        tracker.intent_into(&mut pinned);
        tracing::info!(
            intent_extents = pinned.count_ones(),
            "resumed the pinned tracker: its write-intent log is complete"
        );
        *intent |= pinned.as_bitslice();
        false
    } else if state_existed {
        tracing::warn!(
            "no pinned tracker but logs in the state directory: the host restarted or the tracker was \
             removed, so writes after the last checkpoint are unknown; every secondary will be verified"
        );
        true
    } else {
        !checkpoint_trusted
    };
    tracker.mark_intent(&intent);
    Recovered { intent, verify_all: verify_all || (!checkpoint_trusted && !tracker.resumed()) }
}

/// The intent log's last checkpoint, and whether it can be trusted (none: there is no file).
fn load_intent(
    files: &impl StateFiles,
    identity: &LogIdentity,
    extents: usize,
) -> (BitVec<u64, Lsb0>, Option<bool>) {
    let mut intent = bitvec![u64, Lsb0; 0; extents];
    match logs::load_from(files, logs::INTENT_LOG_FILE, identity) {
        Ok(Some((_, bits))) => {
            *intent |= bits.as_bitslice();
            (intent, Some(true))
        }
        Ok(None) => (intent, None),
        Err(error) => {
            tracing::error!(%error, "the write-intent log checkpoint cannot be trusted");
            (intent, Some(false))
        }
    }
}

/// A secondary's pending extents and log state at start-up: its fracture log plus the intent
/// log; a full sync when it has none; a verify when its log (or the intent log) is not trusted.
pub fn recover_peer(
    files: &impl StateFiles,
    identity: &LogIdentity,
    name: &str,
    recovered: &Recovered,
    defaults: PeerDefaults,
) -> (ExtentSet, PeerLog) {
    let mut log = PeerLog::new(name, defaults.sync_rate_bytes_per_s, defaults.recovery_policy);
    let identity = LogIdentity { kind: LogKind::Fracture, secondary_id: log.secondary_id, ..*identity };
    let mut pending = ExtentSet::from_bits(&recovered.intent);
    match logs::load_from(files, &log.file_name, &identity) {
        Ok(Some((header, bits))) => {
            pending.union_bits(&bits);
            log.flags = header.flags;
            log.resync_bytes_done = header.resync_bytes_done;
            log.resync_rate_bytes_per_s = header.resync_rate_bytes_per_s as f64;
            if header.flags & logs::FLAG_VERIFY != 0 {
                log.start_verify(header.verify_next_extent);
            }
            tracing::info!(secondary = %name, fracture_log_extents = bits.count_ones(), flags = header.flags, "recovered the fracture log");
        }
        Ok(None) if defaults.initial_sync => {
            pending.insert_all();
            log.flags = logs::FLAG_FULL_SYNC;
            tracing::info!(secondary = %name, "no fracture log yet: a full sync");
        }
        Ok(None) => {}
        Err(error) => {
            tracing::error!(secondary = %name, %error, "the fracture log cannot be trusted: this secondary will be verified");
            log.start_verify(0);
        }
    }
    if recovered.verify_all {
        // Writes after the last checkpoint are unknown, and may have hit extents a full sync or
        // a verify under way had passed already (its log holds only what lies ahead of it).
        if log.full_sync() {
            tracing::warn!(secondary = %name, "a full sync was under way: it starts again from the first extent");
            pending.insert_all();
        } else {
            log.start_verify(0);
        }
    }
    log.held = log.admin_fractured()
        || (defaults.recovery_policy == RecoveryPolicy::Manual && log.flags & logs::FLAG_FRACTURED != 0);
    log.throttled = log.fractured();
    (pending, log)
}
