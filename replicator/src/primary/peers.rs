//! The secondaries as the engine holds them: a slot each (`Peer`), the connector threads that
//! reach them, the frame sequence they share, the connections being torn down, and why a
//! connection ends (`Disconnect`).
//!
//! Owns the slots (at most `SECONDARIES_MAX`; a removed secondary's slot is reused with a new
//! generation) and the retired connections. Invariants:
//! - every extent a secondary has not acknowledged since it was last written on the primary is
//!   in its `pending` set, in a read targeting it, or in its connection's `inflight`; a
//!   disconnect moves `inflight` back into `pending`, so nothing is lost when a link drops;
//! - a dropped connection whose receive or send is still in the ring is kept (`Retired`), with
//!   its buffers, until those ops complete: at most one per slot (a connection made while one
//!   is being torn down is closed, and the connector tries again);
//! - frames are numbered once for all secondaries (`next_sequence`), increasing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use super::buffers::Buffers;
use super::connector::{self, ConnectFailure};
use super::export::ExportState;
use super::peer::{Conn, Peer, PeerStats, SendJob};
use super::resync::PeerLog;
use crate::auth::{Key, Params};
use crate::extent_set::ExtentSet;
use crate::model::SECONDARIES_MAX;
use crate::wire::{ErrorCode, MessageKind, WireError};

/// A secondary whose oldest sent frame has waited this many timeouts for its acknowledgement
/// is cut off (and fractured): its disk write hangs while its session still answers
/// keepalives, and a sync export write would wait for it forever (DRBD's ko-count). Well above
/// a slow link's queueing, where an ack also waits for the socket buffer and qdisc ahead.
pub const ACK_TIMEOUTS_MAX: u32 = 4;

/// Why the engine drops a connection to a secondary. Decisions are made on the variant; the
/// text (`Display`) is what the log and `status` say.
#[derive(Debug, thiserror::Error)]
pub enum Disconnect {
    #[error("no ack or keepalive for {timeout_ms} ms")]
    Silent { timeout_ms: u64 },
    #[error("a frame sent {waited_ms} ms ago is still not acknowledged (the secondary's write hangs?)")]
    AckOverdue { waited_ms: u128 },
    #[error("send failed: {0}")]
    SendFailed(std::io::Error),
    #[error("receive failed: {0}")]
    RecvFailed(std::io::Error),
    #[error("secondary closed the connection")]
    Closed,
    #[error("malformed frame from secondary: {0}")]
    Malformed(#[from] WireError),
    #[error("secondary sent {0:?}, which a primary does not accept")]
    Unexpected(MessageKind),
    #[error("divergent extents {first}..{end} past the image's last extent")]
    DivergentPastImage { first: u64, end: u64 },
    #[error("unexpected verify reply for {count} extents from extent {first_extent}")]
    VerifyReply { first_extent: u64, count: usize },
    #[error("secondary reported error {code}: {message}")]
    Reported { code: ErrorCode, message: String },
    #[error("fractured by the administrator")]
    AdminFracture,
    #[error("the mirror was deactivated")]
    Deactivated,
    #[error("removed from the mirror")]
    Removed,
    #[error("did not store the mirror database change in time")]
    DbNotStored,
}

impl Disconnect {
    /// The secondary refused this primary because both wrote as primary while apart.
    pub fn split_brain(&self) -> bool {
        matches!(self, Self::Reported { code: ErrorCode::SplitBrain, .. })
    }

    /// The secondary's disk write failed.
    pub fn write_failed(&self) -> bool {
        matches!(self, Self::Reported { code: ErrorCode::WriteFailed, .. })
    }
}

/// A dropped connection whose receive or send is still in the ring.
struct Retired {
    peer: usize,
    generation: u32,
    conn: Conn,
    /// Export slots whose frames its sendmsg in the ring still reads.
    sending_slots: Vec<u32>,
}

/// What the connectors reported since the last look.
pub enum Arrival {
    /// Slot `peer` has a new connection.
    Connected(usize),
    /// Slot `peer`'s connector failed (said once per distinct failure).
    Failed(usize, ConnectFailure),
}

/// What every connector is started with.
pub struct Reach {
    pub key: Arc<Key>,
    pub params: Params,
    pub timeout_ms: u64,
    pub retry_max_ms: u64,
    pub zero_copy: bool,
    pub congestion: crate::link::Congestion,
}

pub struct Peers {
    slots: Vec<Peer>,
    next_sequence: u64,
    reach: Reach,
    arrivals: Receiver<connector::Event>,
    arrivals_tx: Sender<connector::Event>,
    stop_connectors: Arc<AtomicBool>,
    /// Identifies connector threads, so a removed secondary's late connection is dropped.
    next_connector: u32,
    retired: Vec<Retired>,
    /// Per slot: zero-copy sends whose notification is outstanding, of any of its connections
    /// (at most `NOTIFICATIONS_PER_SECONDARY_MAX`, see `send`).
    notifications: [usize; SECONDARIES_MAX],
    /// A secondary that refused us because both sides wrote as primary while apart.
    split_brain: Option<(usize, String)>,
    metrics: Arc<crate::metrics::PrimaryMetrics>,
}

impl Peers {
    pub fn new(reach: Reach, metrics: Arc<crate::metrics::PrimaryMetrics>) -> Self {
        let (arrivals_tx, arrivals) = mpsc::channel();
        Self {
            slots: Vec::with_capacity(SECONDARIES_MAX),
            // Sequences 0 and 1 are the handshake's.
            next_sequence: 2,
            reach,
            arrivals,
            arrivals_tx,
            stop_connectors: Arc::new(AtomicBool::new(false)),
            next_connector: 0,
            retired: Vec::with_capacity(SECONDARIES_MAX),
            notifications: [0; SECONDARIES_MAX],
            split_brain: None,
            metrics,
        }
    }

    /// Peers over `slots` made by hand, with no connector threads (for tests).
    #[cfg(test)]
    pub fn with_slots(reach: Reach, metrics: Arc<crate::metrics::PrimaryMetrics>, slots: Vec<Peer>) -> Self {
        let mut peers = Self::new(reach, metrics);
        peers.slots = slots;
        peers
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, index: usize) -> &Peer {
        &self.slots[index]
    }

    pub fn get_mut(&mut self, index: usize) -> &mut Peer {
        &mut self.slots[index]
    }

    /// Every slot, removed ones included (their index is their identity).
    pub fn iter(&self) -> std::slice::Iter<'_, Peer> {
        self.slots.iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Peer> {
        self.slots.iter_mut()
    }

    /// The slots of the secondaries in the mirror (not removed).
    pub fn members(&self) -> impl Iterator<Item = (usize, &Peer)> {
        self.slots.iter().enumerate().filter(|(_, p)| !p.removed)
    }

    /// The next frame sequence, shared by every connection.
    pub fn next_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        sequence
    }

    pub fn notifications(&self, index: usize) -> usize {
        self.notifications[index]
    }

    pub fn notification_started(&mut self, index: usize) {
        self.notifications[index] += 1;
        assert!(self.notifications[index] <= super::config::NOTIFICATIONS_PER_SECONDARY_MAX);
    }

    pub fn notification_done(&mut self, index: usize) {
        self.notifications[index] = self.notifications[index].checked_sub(1).expect("a notification started");
    }

    pub fn split_brain(&self) -> Option<&(usize, String)> {
        self.split_brain.as_ref()
    }

    pub fn clear_split_brain(&mut self) {
        self.split_brain = None;
    }

    /// The slot of secondary `name`, or an error naming the secondaries there are.
    pub fn index_of(&self, name: &str) -> Result<usize, String> {
        self.members().find(|(_, p)| p.name == name).map(|(i, _)| i).ok_or_else(|| {
            let names: Vec<&str> = self.members().map(|(_, p)| p.name.as_str()).collect();
            format!("no secondary named {name:?}; this primary has {}", names.join(", "))
        })
    }

    /// Adds a secondary (at start, or `add-secondary`): a slot (a removed one is reused, with
    /// a new generation), and a connector thread of its own.
    pub fn add(
        &mut self,
        name: &str,
        addr: SocketAddr,
        pending: ExtentSet,
        log: PeerLog,
    ) -> Result<usize, String> {
        let index = match self.slots.iter().position(|p| p.removed) {
            Some(index) => index,
            None if self.slots.len() < SECONDARIES_MAX => self.slots.len(),
            None => return Err(format!("{SECONDARIES_MAX} secondaries already; remove one first")),
        };
        let (want_tx, want_rx) = mpsc::channel();
        self.next_connector += 1;
        let connector_config = connector::ConnectorConfig {
            metrics: self.metrics.peer(name),
            peer: index,
            connector: self.next_connector,
            name: name.to_owned(),
            addr,
            key: Arc::clone(&self.reach.key),
            params: self.reach.params,
            timeout_ms: self.reach.timeout_ms,
            retry_max_ms: self.reach.retry_max_ms,
            congestion: self.reach.congestion.clone(),
        };
        let (tx, stop) = (self.arrivals_tx.clone(), Arc::clone(&self.stop_connectors));
        std::thread::Builder::new()
            .name(format!("connect-{name}"))
            .spawn(move || connector::run(connector_config, want_rx, tx, stop))
            .map_err(|e| format!("starting a connector thread: {e}"))?;
        if !log.held {
            want_tx.send(connector::Want::Now).expect("connector is running");
        }
        let generation = self.slots.get(index).map_or(0, |p| p.generation + 1);
        let extents = pending.len();
        let peer = Peer::new(
            name,
            addr,
            pending,
            log,
            generation,
            self.next_connector,
            want_tx,
            self.reach.zero_copy,
            self.metrics.peer(name),
            extents,
        );
        if index == self.slots.len() {
            self.slots.push(peer);
        } else {
            self.slots[index] = peer;
        }
        Ok(index)
    }

    /// Takes the connections the connectors made and their failures.
    pub fn arrivals(&mut self) -> Vec<Arrival> {
        let mut arrivals = Vec::new();
        while let Ok(event) = self.arrivals.try_recv() {
            match event {
                connector::Event::Connected(connected) => {
                    let index = connected.peer;
                    if self.take_connection(connected) {
                        arrivals.push(Arrival::Connected(index));
                    }
                }
                connector::Event::Failed { peer, connector, error } => {
                    let slot = &mut self.slots[peer];
                    if !slot.removed && slot.connector == connector {
                        slot.last_error = error.to_string();
                        arrivals.push(Arrival::Failed(peer, error));
                    }
                }
            }
        }
        arrivals
    }

    /// A connector's connection becomes its slot's, unless the slot no longer wants one.
    fn take_connection(&mut self, connected: connector::Connected) -> bool {
        let index = connected.peer;
        let retiring = self.retired.iter().any(|r| r.peer == index);
        let peer = &mut self.slots[index];
        if peer.removed || peer.connector != connected.connector {
            return false; // a connector of a removed secondary, finishing
        }
        if peer.conn.is_some() || peer.log.held || retiring {
            // A second connection for a want already met (a restore while the connector was
            // retrying), one made while the secondary is fractured and held (its restore asks
            // for a new one), or one made before the last one's ops left the ring (asked again).
            let _ = connected.stream.shutdown(std::net::Shutdown::Both);
            if retiring && let Some(want) = &peer.want_connection {
                let _ = want.send(connector::Want::Reconnect);
            }
            return false;
        }
        peer.conn = Some(Conn::new(connected.stream));
        peer.cut = connected.cut;
        peer.stats.connects += 1;
        peer.metrics.connects.inc();
        peer.metrics.connected.set(1);
        peer.last_error.clear();
        self.next_sequence = self.next_sequence.max(connected.next_sequence);
        true
    }

    /// Queues keepalives on idle connections, and drops those that have gone quiet or whose
    /// oldest frame waits too long for its ack.
    pub fn tick(
        &mut self,
        timeout_ms: u64,
        keepalive_ms: u64,
        buffers: &mut Buffers,
        mut export: Option<&mut ExportState>,
    ) {
        let (timeout, keepalive) = (Duration::from_millis(timeout_ms), Duration::from_millis(keepalive_ms));
        for index in 0..self.slots.len() {
            let Some(conn) = self.slots[index].conn.as_mut() else { continue };
            let reason = if conn.last_heard.elapsed() > timeout {
                Some(Disconnect::Silent { timeout_ms })
            } else {
                conn.oldest_sent_wait()
                    .filter(|&waited| waited > timeout * ACK_TIMEOUTS_MAX)
                    .map(|waited| Disconnect::AckOverdue { waited_ms: waited.as_millis() })
            };
            match reason {
                Some(reason) => self.disconnect(index, reason, buffers, export.as_deref_mut()),
                None if conn.queue.is_empty() && conn.last_sent.elapsed() > keepalive => {
                    conn.queue.push_back(SendJob::Keepalive { sent: 0 });
                }
                None => {}
            }
        }
    }

    /// Drops slot `index`'s connection: everything sent and not acknowledged, or still queued,
    /// goes back to its pending extents, it is fractured, and its connector is asked for a new
    /// connection (unless it is held for `restore`).
    pub fn disconnect(
        &mut self,
        index: usize,
        reason: Disconnect,
        buffers: &mut Buffers,
        export: Option<&mut ExportState>,
    ) {
        let peer = &mut self.slots[index];
        let Some(mut conn) = peer.conn.take() else { return };
        let generation = peer.generation;
        tracing::warn!(secondary = %peer.name, addr = %peer.addr, %reason, unacked_frames = conn.inflight.len(), "secondary disconnected");
        if let Some(verify) = peer.log.verify.as_mut() {
            // Asked again after the reconnect; a read still in flight is recognised as stale.
            verify.batch = None;
        }
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        for inflight in conn.inflight.values() {
            peer.pending.insert_range(inflight.run.start as usize..inflight.run.end as usize);
        }
        peer.generation += 1;
        peer.stats.disconnects += 1;
        peer.metrics.disconnects.inc();
        peer.metrics.connected.set(0);
        peer.in_sync = false;
        let sending_slots = drop_queue(&mut conn, buffers, index, generation, export);
        if conn.recv_in_flight || conn.sending {
            // Its receive buffer and frames stay allocated until those ops complete: the kernel
            // may still copy into them (with DEFER_TASKRUN, even after the shutdown above).
            assert!(
                self.retired.iter().all(|r| r.peer != index),
                "one connection of a slot being torn down at a time"
            );
            self.retired.push(Retired { peer: index, generation, conn, sending_slots });
        }
        self.fracture(index, &reason.to_string());
        let peer = &mut self.slots[index];
        peer.last_error = reason.to_string();
        if reason.write_failed() {
            peer.metrics.write_errors.inc();
        }
        if reason.split_brain() && self.split_brain.is_none() {
            tracing::error!(secondary = %peer.name, %reason, "SPLIT BRAIN: nothing is overwritten; the mirror needs attention");
            self.split_brain = Some((index, reason.to_string()));
        }
        if !peer.log.held
            && let Some(want) = &peer.want_connection
        {
            let _ = want.send(connector::Want::Reconnect);
        }
    }

    /// Marks slot `index` fractured: from now on its missed extents live in its fracture log,
    /// which is persisted before this loop turn ends.
    pub fn fracture(&mut self, index: usize, reason: &str) {
        let peer = &mut self.slots[index];
        if !peer.log.fractured_by_failure() {
            tracing::warn!(secondary = %peer.name, %reason, "secondary fractured: the extents it misses are kept in its fracture log");
            peer.metrics.fractures.inc();
        }
        peer.log.fracture();
    }

    /// A receive (`recv`) or send of a dropped connection completed; the connection is freed
    /// once neither is in the ring any more.
    pub fn retired_op_done(
        &mut self,
        peer: usize,
        generation: u32,
        recv: bool,
        export: Option<&mut ExportState>,
    ) {
        let Some(at) = self.retired.iter().position(|r| r.peer == peer && r.generation == generation) else {
            return;
        };
        let retired = &mut self.retired[at];
        if recv {
            retired.conn.recv_in_flight = false;
        } else {
            retired.conn.sending = false;
            let slots = std::mem::take(&mut retired.sending_slots);
            if let Some(export) = export {
                for slot in slots {
                    export.send_done(slot);
                }
            }
        }
        let conn = &self.retired[at].conn;
        if !conn.recv_in_flight && !conn.sending {
            self.retired.swap_remove(at);
        }
    }

    /// Takes slot `index` out: disconnected, its connector ended, its slot free for reuse, its
    /// fracture log removed.
    pub fn remove(
        &mut self,
        index: usize,
        state_dir: &std::path::Path,
        buffers: &mut Buffers,
        export: Option<&mut ExportState>,
    ) {
        self.slots[index].log.held = true;
        self.disconnect(index, Disconnect::Removed, buffers, export);
        let peer = &mut self.slots[index];
        peer.removed = true;
        peer.draining = false;
        peer.want_connection = None;
        peer.pending.clear();
        peer.log.flags = 0;
        peer.log.verify = None;
        peer.metrics.connected.set(0);
        if let Err(error) = crate::envelope::remove_file(state_dir, &peer.log.file_name) {
            tracing::warn!(secondary = %peer.name, %error, "removing its fracture log failed");
        }
        tracing::info!(secondary = %peer.name, "secondary removed");
    }

    /// Stops every connector and shuts every connection (the engine is stopping).
    pub fn shut_down(&mut self) {
        self.stop_connectors.store(true, Ordering::Relaxed);
        for conn in self.slots.iter().filter_map(|p| p.conn.as_ref()) {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The stats of every member, for tests and status.
    pub fn stats(&self) -> impl Iterator<Item = (&str, PeerStats)> {
        self.members().map(|(_, p)| (p.name.as_str(), p.stats))
    }
}

/// Empties a dropped connection's queue: extent frames release their buffers; export frames
/// are done with their slots, except those in the sendmsg still in the ring, whose slots (and
/// buffers) are returned to be released when it completes. Acks that came in the same receive
/// as the failure still count for the export.
fn drop_queue(
    conn: &mut Conn,
    buffers: &mut Buffers,
    index: usize,
    generation: u32,
    mut export: Option<&mut ExportState>,
) -> Vec<u32> {
    if let Some(export) = export.as_deref_mut() {
        export.credit_acks(index, generation, &conn.inflight);
    }
    let mut in_send = if conn.sending { conn.export_sending } else { 0 };
    let mut sending_slots = Vec::new();
    for job in std::mem::take(&mut conn.queue) {
        match job {
            SendJob::Extent { buffer, .. } => buffers.release(buffer),
            SendJob::Export { slot, .. } if in_send > 0 => {
                in_send -= 1;
                sending_slots.push(slot);
            }
            SendJob::Export { slot, .. } => {
                export.as_deref_mut().expect("an export frame's export").send_done(slot)
            }
            _ => {}
        }
    }
    sending_slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::peer::InFlight;
    use crate::primary::testing;

    /// A disconnect puts every extent sent and not acknowledged, or queued, back in pending,
    /// gives back the buffers of the queued frames, fractures the secondary and records why.
    #[test]
    fn a_disconnect_loses_nothing_and_fractures() {
        let (mut peers, _far) = testing::peers(1, &[0]);
        let mut buffers = testing::buffers();
        let buffer = buffers.take().expect("a buffer");
        buffers.share(buffer, 1);
        let conn = peers.get_mut(0).conn.as_mut().expect("connected");
        let now = std::time::Instant::now();
        conn.inflight
            .insert(7, InFlight { run: 2..4, bytes: 8192, queued_at: now, written_at: now, sent_at: None });
        conn.queue.push_back(SendJob::Extent { buffer, frame_bytes: 8192 + 40, sent: 0, sequence: 7 });
        let reason = Disconnect::Reported { code: ErrorCode::WriteFailed, message: "EIO".into() };
        peers.disconnect(0, reason, &mut buffers, None);
        let peer = peers.get(0);
        assert!(peer.conn.is_none() && peer.generation == 1);
        assert_eq!(peer.pending.bits().iter_ones().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(buffers.free_count(), usize::from(testing::BUFFERS), "the queued frame's buffer is back");
        assert!(peer.log.fractured_by_failure() && peer.log.persist_now);
        assert!(peer.last_error.contains("EIO"), "{}", peer.last_error);
        assert!(peers.split_brain().is_none());
    }

    /// Split brain is decided on the secondary's code.
    #[test]
    fn a_split_brain_is_recorded_once_from_its_code() {
        let (mut peers, _far) = testing::peers(2, &[0, 1]);
        let mut buffers = testing::buffers();
        let reason = |code| Disconnect::Reported { code, message: "split brain: apart".into() };
        peers.disconnect(0, reason(ErrorCode::Refused), &mut buffers, None);
        assert!(peers.split_brain().is_none(), "a refusal is no split brain, whatever it says");
        peers.disconnect(1, reason(ErrorCode::SplitBrain), &mut buffers, None);
        assert_eq!(peers.split_brain().map(|(index, _)| *index), Some(1));
    }

    /// A silent connection is dropped at the timeout; an idle one gets a keepalive.
    #[test]
    fn silence_ends_a_connection_and_idleness_sends_a_keepalive() {
        let (mut peers, _far) = testing::peers(2, &[0, 1]);
        let mut buffers = testing::buffers();
        let long_ago = std::time::Instant::now() - Duration::from_secs(10);
        peers.get_mut(0).conn.as_mut().expect("connected").last_heard = long_ago;
        peers.get_mut(1).conn.as_mut().expect("connected").last_sent = long_ago;
        peers.tick(5000, 1000, &mut buffers, None);
        assert!(peers.get(0).conn.is_none(), "silent for twice the timeout");
        assert!(peers.get(0).last_error.contains("no ack or keepalive"), "{}", peers.get(0).last_error);
        let queue = &peers.get(1).conn.as_ref().expect("still connected").queue;
        assert!(matches!(queue.front(), Some(SendJob::Keepalive { sent: 0 })));
    }
}
