//! The mirror database at run time: adding and removing secondaries, activating and
//! deactivating the mirror, and settings. A change goes in two steps: every reachable
//! secondary checks and holds the new database (`MirrorDbPrepare`, acknowledged), the primary
//! stores it, every reachable secondary stores it (`MirrorDbCommit`, acknowledged once
//! durable), and only then does it take effect on the primary. A change the primary cannot
//! store is refused before any secondary stored it. A secondary that cannot be reached is
//! marked unreachable and gets the current database when it connects again (seed 0095).
//!
//! Owns the one change in progress. Invariant: at most one change at a time, and at most one
//! database frame queued per connection (`Conn::db_sequence`).

use std::net::SocketAddr;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::peer::{InFlight, SendJob};
use super::resync::{PeerLog, Throttle};
use super::{Engine, connector, image_state};
use crate::control::Reply;
use crate::extent_set::ExtentSet;
use crate::logs;
use crate::mirror::{Designator, ImageRecord, MirrorDb};
use crate::model::{
    ActivationPolicy, ImageState, MirrorState, NameOf, RecoveryPolicy, SECONDARIES_MAX, check_name,
};
use crate::wire;

/// How long a change waits for secondaries (and a new one's first contact).
const CHANGE_TIMEOUT_MS: u64 = 10_000;

/// What a change does on the primary once every reachable secondary has the new database.
#[derive(Debug)]
pub(super) enum Effect {
    /// A secondary was added (already running; it must make first contact).
    Added {
        index: usize,
    },
    Remove {
        index: usize,
        force: bool,
    },
    Activate,
    Deactivate,
    Set {
        index: Option<usize>,
        setting: Setting,
    },
}

pub(super) struct PendingChange {
    reply: Sender<Reply>,
    deadline: Instant,
    db: MirrorDb,
    /// `db` encoded once, for every secondary's frame.
    envelope: Vec<u8>,
    effect: Effect,
    /// Per secondary: the database frame's sequence once queued; `Some(None)` = to send.
    targets: [Option<Option<u64>>; SECONDARIES_MAX],
    generations: [u32; SECONDARIES_MAX],
    /// Every target holds `db` and the primary stored it: the commit frames are going out.
    committing: bool,
}

impl PendingChange {
    /// Stored on the primary, its commit frames going out.
    pub(super) fn committing(&self) -> bool {
        self.committing
    }
}

impl Engine {
    /// Queues the current mirror database to every secondary in `indexes` (just connected,
    /// or its state changed), encoded once.
    pub(super) fn send_mirror_db(&mut self, indexes: impl IntoIterator<Item = usize>) {
        let Some(envelope) = self.mirror.as_ref().map(MirrorDb::encode) else { return };
        for index in indexes {
            let queued =
                self.queue_db_frame(index, &wire::Message::MirrorDb { envelope: &envelope }).is_some();
            if let Some(conn) = self.peers[index].conn.as_mut() {
                conn.db_stale = !queued;
            }
        }
    }

    /// Sends the current database to every secondary that missed an update because its
    /// previous database frame was in flight, once that frame is acknowledged. Without it, a
    /// secondary could keep an older copy (say, its image SYNCHRONIZED when it has fallen
    /// behind since) until the next change, and `promote` trusts that copy.
    pub(super) fn resend_stale_dbs(&mut self) {
        if self.change.is_some() {
            return; // the change sends its own database to every secondary
        }
        for index in 0..self.peers.len() {
            let stale = self.peers[index].conn.as_ref().is_some_and(|c| c.db_stale && !c.db_in_flight());
            if stale {
                self.send_mirror_db([index]);
            }
        }
    }

    /// Queues a database frame; returns its sequence, or none if one is still in flight.
    fn queue_db_frame(&mut self, index: usize, message: &wire::Message) -> Option<u64> {
        let sequence = self.next_sequence;
        let conn = self.peers[index].conn.as_mut()?;
        if conn.db_in_flight() {
            return None;
        }
        self.next_sequence += 1;
        let mut frame = Vec::new();
        wire::encode(message, sequence, &mut frame);
        conn.db_frame = frame;
        conn.queue.push_back(SendJob::Db { sent: 0 });
        conn.inflight.insert(sequence, InFlight::control());
        conn.db_sequence = Some(sequence);
        Some(sequence)
    }

    /// A connector reports a failure: a secondary being added that refuses us ends the add.
    pub(super) fn connect_failed(&mut self, index: usize, error: &str) {
        let joining = self
            .change
            .as_ref()
            .is_some_and(|c| matches!(c.effect, Effect::Added { index: i } if i == index));
        let committing = self.change.as_ref().is_some_and(|c| c.committing);
        if joining && !committing && error.contains("handshake") {
            let change = self.change.take().expect("checked");
            let name = self.peers[index].name.clone();
            self.remove_peer(index);
            let _ = change.reply.send(Err(format!("{name} refused the mirror: {error}")));
        }
    }

    pub(super) fn add_secondary(
        &mut self,
        name: &str,
        addr: SocketAddr,
        synchronized: bool,
        reply: Sender<Reply>,
    ) {
        let outcome = (|| {
            let db = self.mirror.as_ref().ok_or_else(no_database)?;
            check_name(NameOf::Secondary, name).map_err(|e| e.to_string())?;
            if db.images.iter().any(|i| i.name == name) {
                return Err(format!("mirror {:?} already has an image named {name}", db.name));
            }
            // Not in the database yet but being added (waiting for its first contact): a second
            // slot of that name would share, and on its refusal delete, the first one's log.
            if self.peers.iter().any(|p| !p.removed && p.name == name) {
                return Err(format!("{name} is being added already; see `status`"));
            }
            if db.secondaries().count() >= SECONDARIES_MAX {
                return Err(format!(
                    "mirror {:?} has {SECONDARIES_MAX} secondaries, the most it can",
                    db.name
                ));
            }
            let mut db = db.clone();
            db.revision += 1;
            db.images.push(ImageRecord {
                name: name.to_owned(),
                designator: Designator::Secondary,
                address: Some(addr),
                device: None,
                state: ImageState::Unsynchronized,
                reachable: false,
                generation: if synchronized { db.generation } else { 0 },
                sync_rate_bytes_per_s: self.config.sync_rate_bytes_per_s,
                resync_bytes_done: 0,
                recovery_policy: self.config.recovery_policy,
            });
            let extents = self.reading.len();
            let mut log = PeerLog::new(name, self.config.sync_rate_bytes_per_s, self.config.recovery_policy);
            let mut pending = ExtentSet::new(extents);
            if !synchronized {
                log.flags = logs::FLAG_FULL_SYNC;
                log.fall_behind();
                log.throttled = true;
                pending.insert_all();
            }
            let index = self.add_peer(name, addr, pending, log).map_err(|e| e.to_string())?;
            Ok((db, index))
        })();
        match outcome {
            Ok((db, index)) => {
                tracing::info!(secondary = %name, %addr, synchronized, "adding a secondary: waiting for its first contact");
                self.start_change(db, Effect::Added { index }, reply);
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    pub(super) fn remove_secondary(&mut self, name: &str, force: bool, reply: Sender<Reply>) {
        let outcome = (|| {
            let db = self.mirror.as_ref().ok_or_else(no_database)?;
            let index = self.peer_index(name)?;
            if !force && image_state(&self.peers[index]) == ImageState::Synchronizing {
                return Err(format!(
                    "{name} is SYNCHRONIZING: removing it now stops its resync; wait, or use --force"
                ));
            }
            let mut db = db.clone();
            db.revision += 1;
            db.images.retain(|i| i.name != name);
            Ok((db, index))
        })();
        match outcome {
            Ok((db, index)) => {
                // Graceful: no new data; what is in flight finishes before it goes.
                self.peers[index].draining = true;
                self.start_change(db, Effect::Remove { index, force }, reply);
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    pub(super) fn set_activation(&mut self, activate: bool, force: bool, reply: Sender<Reply>) {
        let outcome = (|| {
            let db = self.mirror.as_ref().ok_or_else(no_database)?;
            if activate && db.state == MirrorState::Active {
                return Err(format!("mirror {:?} is already ACTIVE", db.name));
            }
            if !activate && db.state == MirrorState::Inactive {
                return Err(format!("mirror {:?} is already INACTIVE", db.name));
            }
            let synchronizing: Vec<&str> = self
                .peers
                .iter()
                .filter(|p| !p.removed && image_state(p) == ImageState::Synchronizing)
                .map(|p| p.name.as_str())
                .collect();
            if !activate && !force && !synchronizing.is_empty() {
                return Err(format!(
                    "{} SYNCHRONIZING: deactivating stops the resync; wait, or use --force",
                    synchronizing.join(", ")
                ));
            }
            let mut db = db.clone();
            db.revision += 1;
            db.state = if activate { MirrorState::Active } else { MirrorState::Inactive };
            db.state_cause = if activate { String::new() } else { "deactivated by the administrator".into() };
            Ok(db)
        })();
        match outcome {
            Ok(db) => {
                let effect = if activate { Effect::Activate } else { Effect::Deactivate };
                self.start_change(db, effect, reply);
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// `set`: with a mirror database the change goes through it; without, it applies at once.
    pub(super) fn set_setting(&mut self, index: Option<usize>, key: &str, value: &str, reply: Sender<Reply>) {
        let setting = match Setting::parse(key, value) {
            Ok(setting) => setting,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let Some(db) = self.mirror.as_ref() else {
            let answer = self.apply_setting(index, setting).map(|()| self.status_json());
            let _ = reply.send(answer);
            return;
        };
        if let Setting::MinimumImages(n) = setting {
            let images = 1 + db.secondaries().count() as u32;
            if n == 0 || n > images {
                let _ = reply.send(Err(format!(
                    "minimum-images {n}: the mirror has {images} images (the primary and {} secondaries), so \
                     1 to {images}; more would fail every sync write with EIO",
                    images - 1
                )));
                return;
            }
        }
        let mut db = db.clone();
        db.revision += 1;
        let names: Vec<String> = match index {
            Some(i) => vec![self.peers[i].name.clone()],
            None => self.peers.iter().filter(|p| !p.removed).map(|p| p.name.clone()).collect(),
        };
        setting.record(&mut db, &names);
        self.start_change(db, Effect::Set { index, setting }, reply);
    }

    /// Applies a setting to the engine: per-secondary settings drive the throttle and the
    /// recovery policy; mirror-wide ones live in the database only.
    pub(super) fn apply_setting(&mut self, index: Option<usize>, setting: Setting) -> Result<(), String> {
        let range = index.map_or(0..self.peers.len(), |i| i..i + 1);
        match setting {
            Setting::SyncRate(rate) => {
                for peer in &mut self.peers[range] {
                    peer.log.throttle = Throttle::new(rate);
                    peer.metrics.sync_rate_limit_bytes.set(rate.min(i64::MAX as u64) as i64);
                }
            }
            Setting::RecoveryPolicy(policy) => {
                for peer in &mut self.peers[range] {
                    peer.log.recovery = policy;
                }
            }
            Setting::MinimumImages(_)
            | Setting::MaximumMissingImages(_)
            | Setting::ActivationPolicy(_)
            | Setting::WritePolicy(_) => {
                if self.mirror.is_none() {
                    return Err(no_database());
                }
            }
        }
        Ok(())
    }

    fn start_change(&mut self, db: MirrorDb, effect: Effect, reply: Sender<Reply>) {
        if self.change.is_some() {
            if let Effect::Added { index } = effect {
                self.remove_peer(index);
            }
            let _ = reply.send(Err("another change of the mirror is in progress; try again".into()));
            return;
        }
        let mut targets = [None; SECONDARIES_MAX];
        let mut generations = [0; SECONDARIES_MAX];
        for (i, peer) in self.peers.iter().enumerate() {
            generations[i] = peer.generation;
            if !peer.removed && peer.conn.is_some() {
                targets[i] = Some(None);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(CHANGE_TIMEOUT_MS);
        let envelope = db.encode();
        self.change = Some(PendingChange {
            reply,
            deadline,
            db,
            envelope,
            effect,
            targets,
            generations,
            committing: false,
        });
    }

    /// Moves the change in progress on: prepared on every reachable secondary, stored here,
    /// committed on every reachable secondary, applied (one that does not answer in time is
    /// disconnected: it gets the database on return).
    pub(super) fn advance_change(&mut self) {
        let Some(mut change) = self.change.take() else { return };
        let timed_out = Instant::now() > change.deadline;
        if let Effect::Added { index } = change.effect {
            let peer = &self.peers[index];
            if change.committing {
                // Prepared and stored everywhere reachable: nothing more to wait for here.
            } else if peer.conn.is_some() && change.targets[index].is_none() {
                change.targets[index] = Some(None);
                change.generations[index] = peer.generation;
            } else if peer.conn.is_none() && timed_out {
                let error = format!(
                    "cannot reach {} at {}: {}; start its secondary first",
                    peer.name,
                    peer.addr,
                    if peer.last_error.is_empty() { "no answer" } else { &peer.last_error }
                );
                self.remove_peer(index);
                let _ = change.reply.send(Err(error));
                return;
            } else if peer.conn.is_none() {
                self.change = Some(change);
                return;
            }
        }
        let mut waiting = false;
        for index in 0..self.peers.len() {
            let Some(target) = change.targets[index] else { continue };
            let peer = &self.peers[index];
            if peer.conn.is_none() || peer.generation != change.generations[index] {
                change.targets[index] = None; // unreachable now: it gets the database on return
                continue;
            }
            let message = if change.committing {
                wire::Message::MirrorDbCommit { revision: change.db.revision }
            } else {
                wire::Message::MirrorDbPrepare { envelope: &change.envelope }
            };
            match target {
                None => match self.queue_db_frame(index, &message) {
                    Some(sequence) => {
                        change.targets[index] = Some(Some(sequence));
                        waiting = true;
                    }
                    None => waiting = true,
                },
                Some(sequence) => {
                    let acked =
                        !self.peers[index].conn.as_ref().is_some_and(|c| c.inflight.contains_key(&sequence));
                    if !acked && timed_out {
                        self.disconnect(index, "did not store the mirror database change in time");
                        change.targets[index] = None;
                    } else if !acked {
                        waiting = true;
                    }
                }
            }
        }
        if let Effect::Remove { index, force: false } = change.effect
            && self.peers[index].conn.as_ref().is_some_and(|c| !c.inflight.is_empty() || !c.queue.is_empty())
            && !timed_out
        {
            waiting = true;
        }
        if waiting {
            self.change = Some(change);
            return;
        }
        if change.committing {
            self.apply_change(change);
            return;
        }
        if let Err(error) = change.db.store(&self.config.state_dir) {
            // Refused before any secondary stored it: they hold it until the next database.
            self.undo_change(&change.effect);
            let _ = change.reply.send(Err(format!("saving the mirror database: {error}")));
            return;
        }
        change.committing = true;
        change.deadline = Instant::now() + Duration::from_millis(CHANGE_TIMEOUT_MS);
        for target in change.targets.iter_mut().filter(|t| t.is_some()) {
            *target = Some(None);
        }
        self.change = Some(change);
        self.advance_change();
    }

    /// Undoes what was done when a change started that does not happen.
    fn undo_change(&mut self, effect: &Effect) {
        match *effect {
            Effect::Added { index } => self.remove_peer(index),
            Effect::Remove { index, .. } => self.peers[index].draining = false,
            Effect::Activate | Effect::Deactivate | Effect::Set { .. } => {}
        }
    }

    fn apply_change(&mut self, change: PendingChange) {
        let PendingChange { reply, mut db, effect, targets, .. } = change;
        tracing::info!(mirror = %db.name, revision = db.revision, ?effect, "mirror database change takes effect");
        // What the images did meanwhile (kept in memory, not stored, while committing): the
        // file holds the change as stored before its commit, so it is written again only if
        // an image's state moved since.
        let stored = db.clone();
        if let Some(current) = &self.mirror {
            db.take_image_states(current);
        }
        if db != stored
            && let Err(error) = db.store(&self.config.state_dir)
        {
            tracing::error!(%error, "saving the mirror database failed");
            self.metrics.log_write_errors.inc();
        }
        self.mirror = Some(db);
        // Connected now but not committed (it connected, or reconnected, meanwhile): it was
        // sent the database before this one.
        let missed: Vec<usize> = (0..self.peers.len())
            .filter(|&i| targets[i].is_none() && !self.peers[i].removed && self.peers[i].conn.is_some())
            .collect();
        self.send_mirror_db(missed);
        let outcome = match effect {
            Effect::Added { .. } => Ok(()),
            Effect::Remove { index, .. } => {
                self.remove_peer(index);
                Ok(())
            }
            Effect::Deactivate => {
                for index in 0..self.peers.len() {
                    if !self.peers[index].removed {
                        self.peers[index].log.admin_fracture();
                        self.disconnect(index, "the mirror was deactivated");
                        self.persist_peer(index);
                    }
                }
                Ok(())
            }
            Effect::Activate => {
                for peer in self.peers.iter_mut().filter(|p| !p.removed && p.log.held) {
                    peer.log.restore();
                    if let Some(want) = &peer.want_connection {
                        let _ = want.send(connector::Want::Now);
                    }
                }
                Ok(())
            }
            Effect::Set { index, setting } => self.apply_setting(index, setting),
        };
        let answer = outcome.map(|()| self.status_json());
        let _ = reply.send(answer);
    }

    /// Takes a secondary out: disconnected, its connector ended, its slot free for reuse.
    fn remove_peer(&mut self, index: usize) {
        self.peers[index].log.held = true;
        self.disconnect(index, "removed from the mirror");
        let peer = &mut self.peers[index];
        peer.removed = true;
        peer.draining = false;
        peer.want_connection = None;
        peer.pending.clear();
        peer.log.flags = 0;
        peer.log.verify = None;
        peer.metrics.connected.set(0);
        if let Err(error) = crate::envelope::remove_file(&self.config.state_dir, &peer.log.file_name) {
            tracing::warn!(secondary = %peer.name, %error, "removing its fracture log failed");
        }
        tracing::info!(secondary = %peer.name, "secondary removed");
    }
}

fn no_database() -> String {
    "this primary was started with --secondary options, not from a mirror database; \
     `replicator create` makes one"
        .to_owned()
}

/// A setting `replicator set KEY=VALUE` changes, parsed once.
#[derive(Clone, Copy, Debug)]
pub(super) enum Setting {
    /// Per secondary: resync bytes per second, 0 unlimited.
    SyncRate(u64),
    RecoveryPolicy(RecoveryPolicy),
    MinimumImages(u32),
    MaximumMissingImages(u32),
    ActivationPolicy(ActivationPolicy),
    WritePolicy(crate::model::WritePolicy),
}

impl Setting {
    pub(super) fn parse(key: &str, value: &str) -> Result<Self, String> {
        let policy = |what: &str| match value {
            "automatic" => Ok(true),
            "manual" => Ok(false),
            other => Err(format!("{what} {other:?}: automatic or manual")),
        };
        Ok(match key {
            "sync-rate" => Self::SyncRate(crate::units::parse_bytes(value).map_err(|e| {
                format!("sync-rate {value:?}: {e}; bytes per second, e.g. 200MiB, 0 for unlimited")
            })?),
            "recovery-policy" => Self::RecoveryPolicy(if policy(key)? {
                RecoveryPolicy::Automatic
            } else {
                RecoveryPolicy::Manual
            }),
            "minimum-images" => {
                Self::MinimumImages(value.parse().map_err(|e| format!("minimum-images {value:?}: {e}"))?)
            }
            "maximum-missing-images" => Self::MaximumMissingImages(
                value.parse().map_err(|e| format!("maximum-missing-images {value:?}: {e}"))?,
            ),
            "activation-policy" => Self::ActivationPolicy(if policy(key)? {
                ActivationPolicy::Automatic
            } else {
                ActivationPolicy::Manual
            }),
            "write-policy" => Self::WritePolicy(match value {
                "sync" => crate::model::WritePolicy::Sync,
                "async" => crate::model::WritePolicy::Async,
                other => return Err(format!("write-policy {other:?}: sync or async")),
            }),
            other => {
                return Err(format!(
                    "unknown setting {other:?}; settable: sync-rate, recovery-policy, minimum-images, \
                     maximum-missing-images, activation-policy, write-policy"
                ));
            }
        })
    }

    /// Writes the setting into `db`, for the secondaries `names` where it is per secondary.
    fn record(self, db: &mut MirrorDb, names: &[String]) {
        for name in names {
            let Some(record) = db.image_mut(name) else { continue };
            match self {
                Self::SyncRate(rate) => record.sync_rate_bytes_per_s = rate,
                Self::RecoveryPolicy(policy) => record.recovery_policy = policy,
                _ => {}
            }
        }
        match self {
            Self::MinimumImages(n) => db.minimum_images = n,
            Self::MaximumMissingImages(n) => db.maximum_missing_images = n,
            Self::ActivationPolicy(policy) => db.activation_policy = policy,
            Self::WritePolicy(policy) => db.write_policy = policy,
            Self::SyncRate(_) | Self::RecoveryPolicy(_) => {}
        }
    }
}
