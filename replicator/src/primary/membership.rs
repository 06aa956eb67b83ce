//! The mirror database at run time: adding and removing secondaries, activating and
//! deactivating the mirror, settings, and the mirror's and images' states. A change goes in two
//! steps: every reachable secondary checks and holds the new database (`MirrorDbPrepare`,
//! acknowledged), the primary stores it, every reachable secondary stores it (`MirrorDbCommit`,
//! acknowledged once durable), and only then does it take effect on the primary. A change the
//! primary cannot store is refused before any secondary stored it. A secondary that cannot be
//! reached is marked unreachable and gets the current database when it connects again.
//!
//! Owns the database (none for a mirror given on the command line) and the one change in
//! progress. Invariants: at most one change at a time, and at most one database frame queued
//! per connection (`Conn::db_sequence`); every secondary learns its own image state (what
//! `promote` checks) as it changes.

use std::path::PathBuf;
use std::sync::mpsc::Sender;

use super::buffers::Buffers;
use super::connector::ConnectFailure;
use super::export::ExportState;
use super::peer::{InFlight, SendJob};
use super::peers::{Disconnect, Peers};
use super::recover::PeerDefaults;
use super::status::image_state;
use crate::control::Reply;
use crate::mirror::{ImageRecord, MirrorDb};
use crate::model::{ImageState, MirrorState, WritePolicy};
use crate::wire;

/// An operator's request is answered: with a report of the engine's state when it succeeded.
pub struct Answer {
    pub reply: Sender<Reply>,
    pub outcome: Result<Report, String>,
}

/// Which report a successful request is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// The whole status (`status`, the mirror's changes).
    Status,
    /// The secondaries' status (the per-secondary operations).
    Secondaries,
}

impl Answer {
    pub(super) fn refuse(reply: Sender<Reply>, error: String) -> Option<Self> {
        Some(Self { reply, outcome: Err(error) })
    }
}

/// What dropping or taking out a secondary touches besides the secondaries.
pub struct Teardown<'a> {
    pub buffers: &'a mut Buffers,
    pub export: Option<&'a mut ExportState>,
    pub state_dir: &'a std::path::Path,
}

impl Teardown<'_> {
    pub fn disconnect(&mut self, peers: &mut Peers, index: usize, reason: Disconnect) {
        peers.disconnect(index, reason, self.buffers, self.export.as_deref_mut());
    }

    pub fn remove(&mut self, peers: &mut Peers, index: usize) {
        peers.remove(index, self.state_dir, self.buffers, self.export.as_deref_mut());
    }
}

pub struct Membership {
    pub(super) db: Option<MirrorDb>,
    pub(super) change: Option<super::changes::PendingChange>,
    pub(super) state_dir: PathBuf,
    /// For a mirror given on the command line (a database keeps its own).
    write_policy: WritePolicy,
    minimum_images: u32,
    /// What a secondary added at run time starts with.
    pub(super) defaults: PeerDefaults,
    pub(super) metrics: std::sync::Arc<crate::metrics::PrimaryMetrics>,
}

impl Membership {
    pub fn new(
        db: Option<MirrorDb>,
        state_dir: PathBuf,
        write_policy: WritePolicy,
        minimum_images: u32,
        defaults: PeerDefaults,
        metrics: std::sync::Arc<crate::metrics::PrimaryMetrics>,
    ) -> Self {
        if let Some(db) = &db {
            tracing::info!(mirror = %db.name, id = db.id, generation = db.generation, state = ?db.state, "mirror database loaded");
            metrics.set_mirror_state(db.state.as_str());
        }
        Self { db, change: None, state_dir, write_policy, minimum_images, defaults, metrics }
    }

    pub fn db(&self) -> Option<&MirrorDb> {
        self.db.as_ref()
    }

    /// The mirror's generation (1 for a mirror given on the command line).
    pub fn generation(&self) -> u64 {
        self.db.as_ref().map_or(1, |db| db.generation)
    }

    pub fn write_policy(&self) -> WritePolicy {
        self.db.as_ref().map_or(self.write_policy, |db| db.write_policy)
    }

    pub fn minimum_images(&self) -> u32 {
        self.db.as_ref().map_or(self.minimum_images, |db| db.minimum_images)
    }

    /// The per-secondary settings of `name` in the database, if it has a record.
    pub fn record(&self, name: &str) -> Option<&ImageRecord> {
        self.db.as_ref().and_then(|db| db.images.iter().find(|i| i.name == name))
    }

    /// Queues the current mirror database to every secondary in `indexes` (just connected,
    /// or its state changed), encoded once.
    pub fn send_db(&self, peers: &mut Peers, indexes: impl IntoIterator<Item = usize>) {
        let Some(envelope) = self.db.as_ref().map(MirrorDb::encode) else { return };
        for index in indexes {
            let queued =
                queue_db_frame(peers, index, &wire::Message::MirrorDb { envelope: &envelope }).is_some();
            if let Some(conn) = peers.get_mut(index).conn.as_mut() {
                conn.db_stale = !queued;
            }
        }
    }

    /// Sends the current database to every secondary that missed an update because its
    /// previous database frame was in flight, once that frame is acknowledged. Without it, a
    /// secondary could keep an older copy (say, its image SYNCHRONIZED when it has fallen
    /// behind since) until the next change, and `promote` trusts that copy.
    pub fn resend_stale(&self, peers: &mut Peers) {
        if self.change.is_some() {
            return; // the change sends its own database to every secondary
        }
        for index in 0..peers.len() {
            if peers.get(index).conn.as_ref().is_some_and(|c| c.db_stale && !c.db_in_flight()) {
                self.send_db(peers, [index]);
            }
        }
    }

    /// A connector reports a failure: a secondary being added that refuses us (its handshake
    /// failed) ends the add.
    pub fn connect_failed(
        &mut self,
        index: usize,
        error: &ConnectFailure,
        peers: &mut Peers,
        teardown: &mut Teardown,
    ) -> Option<Answer> {
        let joining = self.change.as_ref().is_some_and(|c| c.adds(index));
        let committing = self.change.as_ref().is_some_and(|c| c.committing);
        if !joining || committing || !matches!(error, ConnectFailure::Handshake(_)) {
            return None;
        }
        let change = self.change.take().expect("checked");
        let name = peers.get(index).name.clone();
        teardown.remove(peers, index);
        Answer::refuse(change.into_reply(), format!("{name} refused the mirror: {error}"))
    }
}

/// Queues a database frame to slot `index`; returns its sequence, or none if one is still in
/// flight (or it is not connected).
pub(super) fn queue_db_frame(peers: &mut Peers, index: usize, message: &wire::Message) -> Option<u64> {
    if peers.get(index).conn.as_ref().is_none_or(|c| c.db_in_flight()) {
        return None;
    }
    let sequence = peers.next_sequence();
    let conn = peers.get_mut(index).conn.as_mut().expect("checked");
    let mut frame = Vec::new();
    wire::encode(message, sequence, &mut frame);
    conn.db_frame = frame;
    conn.queue.push_back(SendJob::Db { sent: 0 });
    conn.inflight.insert(sequence, InFlight::control());
    conn.db_sequence = Some(sequence);
    Some(sequence)
}

impl Membership {
    /// Brings the mirror database up to date with the images' states and applies the state
    /// rules; a transition is logged with its cause, counted, and the database saved and sent
    /// to every connected secondary.
    pub fn refresh(&mut self, peers: &mut Peers) {
        let Some(mut db) = self.db.take() else { return };
        let mut changed = record_images(&mut db, peers);
        if let Some(&(index, _)) = peers.split_brain() {
            let peer = peers.get(index);
            let accepted = peer.conn.as_ref().is_some_and(|c| c.db_sequence.is_some() && !c.db_in_flight());
            if accepted || peer.removed {
                tracing::info!(secondary = %peer.name, "split brain resolved: the secondary took this primary's database");
                peers.clear_split_brain();
            }
        }
        let (state, cause) = match peers.split_brain() {
            Some((_, reason)) => (MirrorState::Attention, reason.clone()),
            None => db.evaluate(),
        };
        if state != db.state || cause != db.state_cause {
            if state != db.state {
                if state == MirrorState::Attention {
                    tracing::warn!(mirror = %db.name, from = ?db.state, to = ?state, %cause, "mirror state changed");
                } else {
                    tracing::info!(mirror = %db.name, from = ?db.state, to = ?state, %cause, "mirror state changed");
                }
                let label = crate::metrics::StateLabel { state: state.as_str().into() };
                self.metrics.mirror_transitions.get_or_create(&label).inc();
                self.metrics.set_mirror_state(state.as_str());
            }
            db.state = state;
            db.state_cause = cause;
            changed = true;
        }
        // While a change commits, the primary's file holds the change's revision: the image
        // states go into it when the change takes effect, not over it now.
        let committing = self.change.as_ref().is_some_and(|c| c.committing);
        if changed
            && !committing
            && let Err(error) = db.store(&self.state_dir)
        {
            tracing::error!(%error, "saving the mirror database failed");
            self.metrics.log_write_errors.inc();
        }
        self.db = Some(db);
        if changed && self.change.is_none() {
            // Secondaries learn their own state (what `promote` checks) as it changes.
            let connected: Vec<usize> =
                peers.members().filter(|(_, p)| p.conn.is_some()).map(|(i, _)| i).collect();
            self.send_db(peers, connected);
        }
    }
}

/// Each image's record takes its secondary's state and reachability; returns whether any moved.
fn record_images(db: &mut MirrorDb, peers: &Peers) -> bool {
    let mut changed = false;
    let generation = db.generation;
    for (_, peer) in peers.members() {
        let Some(record) = db.image_mut(&peer.name) else { continue };
        let (state, reachable) = (image_state(peer), peer.conn.is_some());
        if record.state != state || record.reachable != reachable {
            record.state = state;
            record.reachable = reachable;
            record.resync_bytes_done = peer.log.resync_bytes_done;
            if state == ImageState::Synchronized {
                record.generation = generation;
            }
            changed = true;
        }
    }
    changed
}
