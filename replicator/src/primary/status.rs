//! What the engine reports: each secondary's status (`status`, `status.json`, the control
//! socket), its image state and the transitions between them, and the gauges and histograms
//! refreshed every `STATUS_INTERVAL_MS`.
//!
//! Owns the status clock and the counters already exported. Invariant: a secondary is
//! `in_sync` exactly when it has acknowledged every write drained so far and nothing is pending,
//! queued, being read for it, or queued in the kernel and not yet drained; a fractured secondary
//! becomes SYNCHRONIZED (its fracture log emptied) only then.

use std::time::{Duration, Instant};

use super::peer::{Peer, PeerStats};
use super::peers::Peers;
use super::read::Source;
use crate::extent_set::ExtentSet;
use crate::model::{ImageState, RecoveryPolicy};

/// How often the status file, the gauges and the histograms are refreshed.
pub const STATUS_INTERVAL_MS: u64 = 200;

/// What the status file reports per secondary.
#[derive(Debug, serde::Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub addr: String,
    pub connected: bool,
    pub in_sync: bool,
    pub pending_extents: usize,
    pub inflight_frames: usize,
    pub backlog_bytes: u64,
    pub zero_copy: bool,
    pub state: ImageState,
    pub fractured: bool,
    pub admin_fractured: bool,
    pub full_sync: bool,
    pub verifying: bool,
    pub verify_next_extent: u64,
    pub verify_differing_extents: u64,
    pub recovery_policy: RecoveryPolicy,
    pub sync_rate_bytes_per_s: u64,
    pub resync_bytes_done: u64,
    pub out_of_sync_bytes: u64,
    /// Resync time left at the current rate, when resyncing.
    pub resync_eta_seconds: Option<f64>,
    /// The last consistency point this secondary recorded (Unix ms), 0 if none yet.
    pub consistency_point_unix_ms: u64,
    /// The last consistent cut its image holds (0: none known), when the primary took it
    /// (Unix ms), and how old that is now (ms); whether its image is known to be consistent.
    pub cut: u64,
    pub cut_unix_ms: u64,
    pub cut_age_ms: u64,
    pub cut_consistent: bool,
    /// Its image may lack writes the primary acknowledged or completed since its last cut, and
    /// nothing is shipping them: not connected, or fractured (behind, catching up).
    pub outdated: bool,
    /// Why it last disconnected or failed to connect ("" when all is well).
    pub last_error: String,
    /// Replication lag: how long its oldest unacknowledged extent frame has waited, in ms.
    pub lag_ms: u64,
    /// Replication lag percentiles since start (read to acknowledgement), in ms.
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_p999_ms: f64,
    /// Wall-clock time (Unix ms) of the last transition to SYNCHRONIZED, and of the last fracture.
    pub synchronized_at_unix_ms: u64,
    pub fractured_at_unix_ms: u64,
    #[serde(flatten)]
    pub stats: PeerStats,
}

/// A secondary's image state, as reported.
pub fn image_state(peer: &Peer) -> ImageState {
    match (&peer.conn, peer.log.fractured()) {
        (None, _) if peer.consistency_point_unix_ms > 0 && !peer.written_since_point => {
            ImageState::Consistent
        }
        (None, _) => ImageState::Unsynchronized,
        (Some(_), false) => ImageState::Synchronized,
        (Some(_), true) => ImageState::Synchronizing,
    }
}

/// Why `peer` is now in `state`, for the transition's log line.
fn transition_cause(peer: &Peer, state: ImageState) -> &str {
    match state {
        _ if !peer.last_error.is_empty() => peer.last_error.as_str(),
        ImageState::Synchronized => "caught up: nothing pending, everything acknowledged",
        ImageState::Synchronizing if peer.log.verify.is_some() => "connected: verifying",
        ImageState::Synchronizing => "connected: catching up on what it lacks",
        ImageState::Unsynchronized | ImageState::Consistent => "not connected",
    }
}

/// Bytes of the extents a secondary may lack: pending, sent and not acknowledged, and during
/// a verify every extent not compared yet (the verify exists because any of them may differ).
/// 0 exactly when it is in sync.
pub fn out_of_sync_bytes(peer: &Peer, extent_bytes: u64, device_bytes: u64) -> u64 {
    let backlog = peer.conn.as_ref().map_or(0, |c| c.backlog_bytes);
    let verify_next_extent = peer.log.verify.as_ref().map(|verify| verify.next_extent);
    lacking_bytes(&peer.pending, verify_next_extent, extent_bytes, device_bytes) + backlog
}

/// Bytes of the `pending` extents and, during a verify at `verify_next_extent`, of every extent
/// from there on; a pending extent not compared yet counts once.
fn lacking_bytes(
    pending: &ExtentSet,
    verify_next_extent: Option<u64>,
    extent_bytes: u64,
    device_bytes: u64,
) -> u64 {
    let Some(next_extent) = verify_next_extent else {
        return pending.count() as u64 * extent_bytes;
    };
    let from = usize::try_from(next_extent).unwrap_or(usize::MAX).min(pending.len());
    let pending_before = pending.bits()[..from].count_ones() as u64;
    pending_before * extent_bytes + device_bytes.saturating_sub(next_extent.saturating_mul(extent_bytes))
}

/// Every member's status.
pub fn statuses(peers: &Peers, source: &Source) -> Vec<PeerStatus> {
    peers.members().map(|(_, p)| peer_status(p, source.extent_bytes(), source.device_bytes())).collect()
}

fn peer_status(p: &Peer, extent_bytes: u64, device_bytes: u64) -> PeerStatus {
    let out_of_sync_bytes = out_of_sync_bytes(p, extent_bytes, device_bytes);
    PeerStatus {
        name: p.name.clone(),
        addr: p.addr.to_string(),
        connected: p.conn.is_some(),
        in_sync: p.in_sync,
        pending_extents: p.pending.count(),
        inflight_frames: p.conn.as_ref().map_or(0, |c| c.inflight.len()),
        backlog_bytes: p.conn.as_ref().map_or(0, |c| c.backlog_bytes),
        zero_copy: p.zero_copy,
        state: image_state(p),
        fractured: p.log.fractured(),
        admin_fractured: p.log.admin_fractured(),
        full_sync: p.log.full_sync(),
        verifying: p.log.verify.is_some(),
        verify_next_extent: p.log.verify.as_ref().map_or(0, |v| v.next_extent),
        verify_differing_extents: p.log.verify.as_ref().map_or(0, |v| v.differing_extents),
        recovery_policy: p.log.recovery,
        sync_rate_bytes_per_s: p.log.throttle.rate_bytes_per_s,
        resync_bytes_done: p.log.resync_bytes_done,
        out_of_sync_bytes,
        resync_eta_seconds: p.log.eta_seconds(out_of_sync_bytes),
        consistency_point_unix_ms: p.consistency_point_unix_ms,
        cut: p.cut.committed_cut,
        cut_unix_ms: p.cut.committed_unix_ms,
        cut_age_ms: match p.cut.committed_unix_ms {
            0 => 0,
            at => crate::logs::unix_ms_now().saturating_sub(at),
        },
        cut_consistent: p.cut.consistent,
        outdated: p.conn.is_none() || p.log.fractured(),
        synchronized_at_unix_ms: p.log.synchronized_at_unix_ms,
        fractured_at_unix_ms: p.log.fractured_at_unix_ms,
        last_error: p.last_error.clone(),
        lag_p50_ms: p.metrics.lag.quantile_ms(0.5),
        lag_p99_ms: p.metrics.lag.quantile_ms(0.99),
        lag_p999_ms: p.metrics.lag.quantile_ms(0.999),
        lag_ms: p.conn.as_ref().map_or(0, |c| {
            c.inflight
                .values()
                .filter(|f| f.bytes > 0)
                .map(|f| f.queued_at.elapsed().as_millis() as u64)
                .max()
                .unwrap_or(0)
        }),
        stats: p.stats,
    }
}

/// Each secondary's `in_sync`, every turn (O(1) each: the tracker says whether a write is
/// queued and not yet drained as completed); a fractured one that is in sync, not held by the
/// administrator and not verifying becomes SYNCHRONIZED.
pub fn update_in_sync(peers: &mut Peers, source: &Source, awaiting_completion: bool) {
    for (index, peer) in peers.iter_mut().enumerate() {
        let in_sync = peer.conn.as_ref().is_some_and(|c| c.inflight.is_empty() && c.queue.is_empty())
            && !awaiting_completion
            && peer.pending.not_any()
            && !source.reads_for(index);
        if in_sync != peer.in_sync {
            tracing::debug!(secondary = %peer.name, in_sync, "secondary caught up or fell behind");
            peer.in_sync = in_sync;
        }
        if in_sync
            && !peer.removed
            && peer.log.fractured()
            && !peer.log.admin_fractured()
            && peer.log.verify.is_none()
        {
            tracing::info!(
                secondary = %peer.name,
                resync_bytes = peer.log.resync_bytes_done,
                "secondary SYNCHRONIZED: its fracture log is empty and acknowledged"
            );
            peer.log.synchronized();
        }
    }
}

/// Logs and counts each member's image state transitions.
pub fn report_transitions(peers: &mut Peers, metrics: &crate::metrics::PrimaryMetrics) {
    for peer in peers.iter_mut().filter(|p| !p.removed) {
        let state = image_state(peer);
        if peer.reported_state == Some(state) {
            continue;
        }
        let cause = transition_cause(peer, state);
        tracing::info!(secondary = %peer.name, from = ?peer.reported_state, to = ?state, %cause, "image state changed");
        let label =
            crate::metrics::ImageStateLabel { secondary: peer.name.clone(), state: state.as_str().into() };
        metrics.image_transitions.get_or_create(&label).inc();
        metrics.set_image_state(&peer.name, state.as_str());
        peer.reported_state = Some(state);
    }
}

/// The status clock and what was exported of the tracker's counters.
pub struct Status {
    last: Instant,
    /// Tracker counters already exported: events seen, write events, unmatched writes.
    tracker_seen: (u64, u64, u64),
}

impl Default for Status {
    fn default() -> Self {
        Self { last: Instant::now(), tracker_seen: (0, 0, 0) }
    }
}

impl Status {
    /// Whether a status interval has passed; if so the next one starts now.
    pub fn due(&mut self) -> bool {
        if self.last.elapsed() < Duration::from_millis(STATUS_INTERVAL_MS) {
            return false;
        }
        self.last = Instant::now();
        true
    }

    /// Every interval: the resync rates are sampled (a sample spans a second anyway), and the
    /// gauges and histograms take what the engine recorded since.
    pub fn sample(
        &mut self,
        peers: &mut Peers,
        source: &Source,
        counters: crate::tracker::TrackerCounters,
        metrics: &crate::metrics::PrimaryMetrics,
    ) {
        let now = Instant::now();
        for peer in peers.iter_mut() {
            let connected = peer.conn.is_some();
            peer.log.sample_rate(now, connected);
            let bytes = out_of_sync_bytes(peer, source.extent_bytes(), source.device_bytes());
            peer.metrics.out_of_sync_bytes.set(bytes.min(i64::MAX as u64) as i64);
            peer.metrics.lag.merge_from(&mut peer.latency.lag_us);
            peer.metrics.ack_rtt.merge_from(&mut peer.latency.rtt_us);
        }
        let (events, writes, unmatched) = self.tracker_seen;
        metrics.tracker_events.inc_by(counters.events_seen.saturating_sub(events));
        metrics.tracker_write_events.inc_by(counters.write_events.saturating_sub(writes));
        metrics.unmatched_writes.inc_by(counters.unmatched_writes.saturating_sub(unmatched));
        self.tracker_seen = (counters.events_seen, counters.write_events, counters.unmatched_writes);
    }
}

/// Replaces `STATE_DIR/status.json` (a report for tools: a rename, no fsync; see `envelope`).
pub fn write_file(state_dir: &std::path::Path, status: &serde_json::Value) {
    let path = state_dir.join("status.json");
    let temp = state_dir.join("status.json.tmp");
    let written = std::fs::write(&temp, status.to_string()).and_then(|()| std::fs::rename(&temp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "writing the status file failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_extent_not_verified_yet_counts_once() {
        let extent_bytes = 65536;
        let mut pending = ExtentSet::new(100);
        pending.insert_range(10..12);
        pending.insert_range(50..53);
        let device_bytes = 100 * extent_bytes;
        assert_eq!(lacking_bytes(&pending, None, extent_bytes, device_bytes), 5 * extent_bytes);
        // Verified up to extent 40: 10 and 11 are pending behind it, 40..100 not compared yet
        // (50..53 among them, counted once).
        assert_eq!(lacking_bytes(&pending, Some(40), extent_bytes, device_bytes), (2 + 60) * extent_bytes);
        assert_eq!(lacking_bytes(&pending, Some(0), extent_bytes, device_bytes), device_bytes);
        assert_eq!(lacking_bytes(&pending, Some(100), extent_bytes, device_bytes), 5 * extent_bytes);
    }

    fn connected(state: &str) -> crate::primary::peers::Peers {
        let (mut peers, far) = crate::primary::testing::peers(1, &[0]);
        std::mem::forget(far); // the connection stays up for the test's length
        match state {
            "fractured" => peers.get_mut(0).log.fracture(),
            "disconnected" => peers.get_mut(0).conn = None,
            _ => {}
        }
        peers
    }

    #[test]
    fn image_states_follow_connection_fracture_and_points() {
        assert_eq!(image_state(connected("").get(0)), ImageState::Synchronized);
        assert_eq!(image_state(connected("fractured").get(0)), ImageState::Synchronizing);
        let mut peers = connected("disconnected");
        assert_eq!(image_state(peers.get(0)), ImageState::Unsynchronized);
        peers.get_mut(0).consistency_point_unix_ms = 1;
        assert_eq!(image_state(peers.get(0)), ImageState::Consistent, "nothing written since its point");
        peers.get_mut(0).written_since_point = true;
        assert_eq!(image_state(peers.get(0)), ImageState::Unsynchronized);
    }

    /// A fractured secondary becomes SYNCHRONIZED (its fracture log emptied) only once nothing
    /// is pending, queued, in flight, being read for it, or written and not yet drained.
    #[test]
    fn a_fractured_secondary_is_synchronized_only_when_nothing_is_left() {
        let mut peers = connected("fractured");
        let source = crate::primary::testing::source();
        peers.get_mut(0).pending.insert_range(3..4);
        update_in_sync(&mut peers, &source, false);
        assert!(!peers.get(0).in_sync && peers.get(0).log.fractured());
        peers.get_mut(0).pending.clear();
        update_in_sync(&mut peers, &source, true);
        assert!(!peers.get(0).in_sync, "a write queued and not drained may be for it");
        update_in_sync(&mut peers, &source, false);
        assert!(peers.get(0).in_sync && !peers.get(0).log.fractured(), "SYNCHRONIZED");
    }
}
