//! Changes of the mirror an operator asks for: add or remove a secondary, activate or
//! deactivate the mirror, change a setting; and the two steps every change of the database
//! takes (prepare everywhere reachable, store here, commit everywhere reachable, take effect).
//!
//! Owns the one change in progress (`PendingChange`, held by `Membership`). Invariant: a change
//! takes effect on the primary only once every reachable secondary stored it; one the primary
//! cannot store is undone before any secondary stored it.

use std::net::SocketAddr;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::connector;
use super::membership::{Answer, Membership, Report, Teardown, queue_db_frame};
use super::peers::{Disconnect, Peers};
use super::resync::{PeerLog, Throttle};
use super::status::image_state;
use crate::control::Reply;
use crate::extent_set::ExtentSet;
use crate::logs;
use crate::mirror::{Designator, ImageRecord, MirrorDb};
use crate::model::{
    ActivationPolicy, ImageState, MirrorState, NameOf, RecoveryPolicy, SECONDARIES_MAX, WritePolicy,
    check_name,
};
use crate::wire;

/// How long a change waits for secondaries (and a new one's first contact).
const CHANGE_TIMEOUT_MS: u64 = 10_000;

/// What a change does on the primary once every reachable secondary has the new database.
#[derive(Debug)]
enum Effect {
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

pub struct PendingChange {
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
    pub committing: bool,
}

impl PendingChange {
    /// Where its answer goes, once it ends.
    pub fn into_reply(self) -> Sender<Reply> {
        self.reply
    }

    /// This change adds secondary slot `index`.
    pub fn adds(&self, index: usize) -> bool {
        matches!(self.effect, Effect::Added { index: i } if i == index)
    }
}

fn no_database() -> String {
    "this primary was started with --secondary options, not from a mirror database; \
     `replicator create` makes one"
        .to_owned()
}

impl Membership {
    pub fn add_secondary(
        &mut self,
        peers: &mut Peers,
        extents: usize,
        (name, addr, synchronized): (&str, SocketAddr, bool),
        reply: Sender<Reply>,
        teardown: &mut Teardown,
    ) -> Option<Answer> {
        let db = match self.db.as_ref().ok_or_else(no_database).and_then(|db| self.may_add(db, peers, name)) {
            Ok(db) => db,
            Err(error) => return Answer::refuse(reply, error),
        };
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
            sync_rate_bytes_per_s: self.defaults.sync_rate_bytes_per_s,
            resync_bytes_done: 0,
            recovery_policy: self.defaults.recovery_policy,
        });
        let mut log = PeerLog::new(name, self.defaults.sync_rate_bytes_per_s, self.defaults.recovery_policy);
        let mut pending = ExtentSet::new(extents);
        if !synchronized {
            log.flags = logs::FLAG_FULL_SYNC;
            log.fall_behind();
            log.throttled = true;
            pending.insert_all();
        }
        let index = match peers.add(name, addr, pending, log) {
            Ok(index) => index,
            Err(error) => return Answer::refuse(reply, error),
        };
        tracing::info!(secondary = %name, %addr, synchronized, "adding a secondary: waiting for its first contact");
        self.start_change(db, Effect::Added { index }, reply, peers, teardown)
    }

    /// `db` may take secondary `name`: a valid, new name, and room for it.
    fn may_add<'a>(&self, db: &'a MirrorDb, peers: &Peers, name: &str) -> Result<&'a MirrorDb, String> {
        check_name(NameOf::Secondary, name).map_err(|e| e.to_string())?;
        if db.images.iter().any(|i| i.name == name) {
            return Err(format!("mirror {:?} already has an image named {name}", db.name));
        }
        // Not in the database yet but being added (waiting for its first contact): a second
        // slot of that name would share, and on its refusal delete, the first one's log.
        if peers.members().any(|(_, p)| p.name == name) {
            return Err(format!("{name} is being added already; see `status`"));
        }
        if db.secondaries().count() >= SECONDARIES_MAX {
            return Err(format!("mirror {:?} has {SECONDARIES_MAX} secondaries, the most it can", db.name));
        }
        Ok(db)
    }

    pub fn remove_secondary(
        &mut self,
        peers: &mut Peers,
        name: &str,
        force: bool,
        reply: Sender<Reply>,
        teardown: &mut Teardown,
    ) -> Option<Answer> {
        let outcome = (|| {
            let db = self.db.as_ref().ok_or_else(no_database)?;
            let index = peers.index_of(name)?;
            if !force && image_state(peers.get(index)) == ImageState::Synchronizing {
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
                peers.get_mut(index).draining = true;
                self.start_change(db, Effect::Remove { index, force }, reply, peers, teardown)
            }
            Err(error) => Answer::refuse(reply, error),
        }
    }

    pub fn set_activation(
        &mut self,
        peers: &mut Peers,
        activate: bool,
        force: bool,
        reply: Sender<Reply>,
        teardown: &mut Teardown,
    ) -> Option<Answer> {
        let outcome = (|| {
            let db = self.db.as_ref().ok_or_else(no_database)?;
            if activate && db.state == MirrorState::Active {
                return Err(format!("mirror {:?} is already ACTIVE", db.name));
            }
            if !activate && db.state == MirrorState::Inactive {
                return Err(format!("mirror {:?} is already INACTIVE", db.name));
            }
            let synchronizing: Vec<&str> = peers
                .members()
                .filter(|(_, p)| image_state(p) == ImageState::Synchronizing)
                .map(|(_, p)| p.name.as_str())
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
                self.start_change(db, effect, reply, peers, teardown)
            }
            Err(error) => Answer::refuse(reply, error),
        }
    }

    /// `set`: with a mirror database the change goes through it; without, it applies at once.
    pub fn set(
        &mut self,
        peers: &mut Peers,
        index: Option<usize>,
        (key, value): (&str, &str),
        reply: Sender<Reply>,
        teardown: &mut Teardown,
    ) -> Option<Answer> {
        let setting = match Setting::parse(key, value) {
            Ok(setting) => setting,
            Err(error) => return Answer::refuse(reply, error),
        };
        let Some(db) = self.db.as_ref() else {
            let outcome = self.apply_setting(peers, index, setting).map(|()| Report::Status);
            return Some(Answer { reply, outcome });
        };
        if let Setting::MinimumImages(n) = setting {
            let images = 1 + db.secondaries().count() as u32;
            if n == 0 || n > images {
                let error = format!(
                    "minimum-images {n}: the mirror has {images} images (the primary and {} secondaries), so \
                     1 to {images}; more would fail every sync write with EIO",
                    images - 1
                );
                return Answer::refuse(reply, error);
            }
        }
        let mut db = db.clone();
        db.revision += 1;
        let names: Vec<String> = match index {
            Some(i) => vec![peers.get(i).name.clone()],
            None => peers.members().map(|(_, p)| p.name.clone()).collect(),
        };
        setting.record(&mut db, &names);
        self.start_change(db, Effect::Set { index, setting }, reply, peers, teardown)
    }

    /// Applies a setting to the engine: per-secondary settings drive the throttle and the
    /// recovery policy; mirror-wide ones live in the database only.
    fn apply_setting(
        &mut self,
        peers: &mut Peers,
        index: Option<usize>,
        setting: Setting,
    ) -> Result<(), String> {
        let targets = peers.iter_mut().enumerate().filter(|(i, _)| index.is_none_or(|index| index == *i));
        match setting {
            Setting::SyncRate(rate) => {
                for (_, peer) in targets {
                    peer.log.throttle = Throttle::new(rate);
                    peer.metrics.sync_rate_limit_bytes.set(rate.min(i64::MAX as u64) as i64);
                }
            }
            Setting::RecoveryPolicy(policy) => {
                for (_, peer) in targets {
                    peer.log.recovery = policy;
                }
            }
            Setting::MinimumImages(_)
            | Setting::MaximumMissingImages(_)
            | Setting::ActivationPolicy(_)
            | Setting::WritePolicy(_) => {
                if self.db.is_none() {
                    return Err(no_database());
                }
            }
        }
        Ok(())
    }

    fn start_change(
        &mut self,
        db: MirrorDb,
        effect: Effect,
        reply: Sender<Reply>,
        peers: &mut Peers,
        teardown: &mut Teardown,
    ) -> Option<Answer> {
        if self.change.is_some() {
            if let Effect::Added { index } = effect {
                teardown.remove(peers, index);
            }
            return Answer::refuse(reply, "another change of the mirror is in progress; try again".into());
        }
        let mut targets = [None; SECONDARIES_MAX];
        let mut generations = [0; SECONDARIES_MAX];
        for (i, peer) in peers.iter().enumerate() {
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
        None
    }
}

impl Membership {
    /// Moves the change in progress on: prepared on every reachable secondary, stored here,
    /// committed on every reachable secondary, applied (one that does not answer in time is
    /// disconnected: it gets the database on return).
    pub fn advance_change(&mut self, peers: &mut Peers, teardown: &mut Teardown) -> Option<Answer> {
        let mut change = self.change.take()?;
        let timed_out = Instant::now() > change.deadline;
        if let Effect::Added { index } = change.effect
            && !change.committing
        {
            let peer = peers.get(index);
            match (&peer.conn, change.targets[index]) {
                (Some(_), None) => {
                    change.targets[index] = Some(None);
                    change.generations[index] = peer.generation;
                }
                (Some(_), Some(_)) => {}
                (None, _) if timed_out => {
                    let error = format!(
                        "cannot reach {} at {}: {}; start its secondary first",
                        peer.name,
                        peer.addr,
                        if peer.last_error.is_empty() { "no answer" } else { &peer.last_error }
                    );
                    teardown.remove(peers, index);
                    return Answer::refuse(change.reply, error);
                }
                (None, _) => {
                    self.change = Some(change);
                    return None;
                }
            }
        }
        let waiting = self.step(&mut change, peers, teardown, timed_out);
        if waiting {
            self.change = Some(change);
            return None;
        }
        if change.committing {
            return self.apply_change(change, peers, teardown);
        }
        if let Err(error) = change.db.store(&self.state_dir) {
            // Refused before any secondary stored it: they hold it until the next database.
            undo(&change.effect, peers, teardown);
            return Answer::refuse(change.reply, format!("saving the mirror database: {error}"));
        }
        change.committing = true;
        change.deadline = Instant::now() + Duration::from_millis(CHANGE_TIMEOUT_MS);
        for target in change.targets.iter_mut().filter(|t| t.is_some()) {
            *target = Some(None);
        }
        self.change = Some(change);
        self.advance_change(peers, teardown)
    }

    /// Sends the change's frame (prepare, or commit) to each target that lacks it, and checks
    /// for their acks; a target that does not ack in time is disconnected. Returns whether the
    /// change still waits for a target (or a graceful removal for its frames to drain).
    fn step(
        &self,
        change: &mut PendingChange,
        peers: &mut Peers,
        teardown: &mut Teardown,
        timed_out: bool,
    ) -> bool {
        let mut waiting = false;
        for index in 0..peers.len() {
            let Some(target) = change.targets[index] else { continue };
            let peer = peers.get(index);
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
                None => {
                    if let Some(sequence) = queue_db_frame(peers, index, &message) {
                        change.targets[index] = Some(Some(sequence));
                    }
                    waiting = true;
                }
                Some(sequence) => {
                    let acked = !peer.conn.as_ref().is_some_and(|c| c.inflight.contains_key(&sequence));
                    if !acked && timed_out {
                        teardown.disconnect(peers, index, Disconnect::DbNotStored);
                        change.targets[index] = None;
                    } else if !acked {
                        waiting = true;
                    }
                }
            }
        }
        if let Effect::Remove { index, force: false } = change.effect
            && peers.get(index).conn.as_ref().is_some_and(|c| !c.inflight.is_empty() || !c.queue.is_empty())
            && !timed_out
        {
            waiting = true;
        }
        waiting
    }

    fn apply_change(
        &mut self,
        change: PendingChange,
        peers: &mut Peers,
        teardown: &mut Teardown,
    ) -> Option<Answer> {
        let PendingChange { reply, mut db, effect, targets, .. } = change;
        tracing::info!(mirror = %db.name, revision = db.revision, ?effect, "mirror database change takes effect");
        // What the images did meanwhile (kept in memory, not stored, while committing): the
        // file holds the change as stored before its commit, so it is written again only if
        // an image's state moved since.
        let stored = db.clone();
        if let Some(current) = &self.db {
            db.take_image_states(current);
        }
        if db != stored
            && let Err(error) = db.store(&self.state_dir)
        {
            tracing::error!(%error, "saving the mirror database failed");
            self.metrics.log_write_errors.inc();
        }
        self.db = Some(db);
        // Connected now but not committed (it connected, or reconnected, meanwhile): it was
        // sent the database before this one.
        let missed: Vec<usize> = peers
            .members()
            .filter(|(i, p)| targets[*i].is_none() && p.conn.is_some())
            .map(|(i, _)| i)
            .collect();
        self.send_db(peers, missed);
        let outcome = match effect {
            Effect::Added { .. } => Ok(()),
            Effect::Remove { index, .. } => {
                teardown.remove(peers, index);
                Ok(())
            }
            Effect::Deactivate => {
                // Their fracture logs are persisted before the answer (`persist_now`).
                for index in 0..peers.len() {
                    if peers.get(index).removed {
                        continue;
                    }
                    peers.get_mut(index).log.admin_fracture();
                    teardown.disconnect(peers, index, Disconnect::Deactivated);
                }
                Ok(())
            }
            Effect::Activate => {
                for peer in peers.iter_mut().filter(|p| !p.removed && p.log.held) {
                    peer.log.restore();
                    if let Some(want) = &peer.want_connection {
                        let _ = want.send(connector::Want::Now);
                    }
                }
                Ok(())
            }
            Effect::Set { index, setting } => self.apply_setting(peers, index, setting),
        };
        Some(Answer { reply, outcome: outcome.map(|()| Report::Status) })
    }
}

/// Undoes what was done when a change started that does not happen.
fn undo(effect: &Effect, peers: &mut Peers, teardown: &mut Teardown) {
    match *effect {
        Effect::Added { index } => teardown.remove(peers, index),
        Effect::Remove { index, .. } => peers.get_mut(index).draining = false,
        Effect::Activate | Effect::Deactivate | Effect::Set { .. } => {}
    }
}

/// A setting `replicator set KEY=VALUE` changes, parsed once.
#[derive(Clone, Copy, Debug)]
enum Setting {
    /// Per secondary: resync bytes per second, 0 unlimited.
    SyncRate(u64),
    RecoveryPolicy(RecoveryPolicy),
    MinimumImages(u32),
    MaximumMissingImages(u32),
    ActivationPolicy(ActivationPolicy),
    WritePolicy(WritePolicy),
}

impl Setting {
    fn parse(key: &str, value: &str) -> Result<Self, String> {
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
                "sync" => WritePolicy::Sync,
                "async" => WritePolicy::Async,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::recover::PeerDefaults;
    use crate::primary::testing;

    fn membership(db: Option<MirrorDb>) -> Membership {
        let defaults = PeerDefaults {
            sync_rate_bytes_per_s: 0,
            recovery_policy: RecoveryPolicy::Automatic,
            initial_sync: true,
        };
        Membership::new(db, "/nonexistent".into(), WritePolicy::Async, 1, defaults, testing::metrics())
    }

    fn refusal(answer: Option<Answer>) -> String {
        answer.expect("answered at once").outcome.expect_err("refused")
    }

    #[test]
    fn settings_parse_or_say_what_they_take() {
        assert!(matches!(Setting::parse("sync-rate", "200MiB"), Ok(Setting::SyncRate(209_715_200))));
        assert!(matches!(
            Setting::parse("write-policy", "sync"),
            Ok(Setting::WritePolicy(WritePolicy::Sync))
        ));
        assert!(Setting::parse("write-policy", "maybe").unwrap_err().contains("sync or async"));
        assert!(Setting::parse("recovery-policy", "later").unwrap_err().contains("automatic or manual"));
        assert!(Setting::parse("colour", "blue").unwrap_err().contains("settable:"));
    }

    /// Refusals come at once and change nothing: no database, a bad or taken name, too many
    /// images for minimum-images.
    #[test]
    fn changes_that_break_a_rule_are_refused_at_once() {
        let (mut peers, _far) = testing::peers(1, &[0]);
        let mut buffers = testing::buffers();
        let state_dir = std::path::Path::new("/nonexistent");
        let mut teardown = Teardown { buffers: &mut buffers, export: None, state_dir };
        let addr = "127.0.0.1:1".parse().expect("an address");
        let (reply, _) = std::sync::mpsc::channel();
        let without = refusal(membership(None).add_secondary(
            &mut peers,
            testing::EXTENTS,
            ("c", addr, false),
            reply,
            &mut teardown,
        ));
        assert!(without.contains("not from a mirror database"), "{without}");
        let mut with_db = membership(Some(crate::mirror::sample_db()));
        for (name, why) in [
            ("c/d", "a secondary name"),
            ("b", "already has an image named b"),
            (&*"x".repeat(65), "1 to 64"),
        ] {
            let (reply, _) = std::sync::mpsc::channel();
            let refused = refusal(with_db.add_secondary(
                &mut peers,
                testing::EXTENTS,
                (name, addr, false),
                reply,
                &mut teardown,
            ));
            assert!(refused.contains(why), "{name}: {refused}");
        }
        let (reply, _) = std::sync::mpsc::channel();
        let refused = refusal(with_db.set(&mut peers, None, ("minimum-images", "3"), reply, &mut teardown));
        assert!(refused.contains("1 to 2"), "{refused}");
        assert!(with_db.change.is_none() && peers.len() == 1, "nothing started");
    }
}
