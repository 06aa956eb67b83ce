//! What the primary keeps per secondary: the extents it still needs (`pending`, the in-memory
//! form of its fracture log), and while connected, the ordered send queue, the frames sent and
//! not yet acknowledged, and the bytes of acks and keepalives received and not yet parsed.
//!
//! Invariant: every extent a secondary has not acknowledged since it was last written on the
//! primary is in `pending`, or in a read whose targets include this peer, or in `inflight`.
//! A disconnect moves `inflight` back into `pending`, so nothing is lost when a link drops.

use std::collections::{BTreeMap, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::mpsc::Sender;
use std::time::Instant;

use crate::extent_set::ExtentSet;
use crate::wire;

/// Most export frames one sendmsg carries.
pub const EXPORT_IOVECS_MAX: usize = 16;

/// Bytes of the receive buffer for acks and keepalives.
pub const RECV_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PeerStats {
    pub shipped_bytes: u64,
    pub shipped_extents: u64,
    pub acked_frames: u64,
    pub zero_copy_sends: u64,
    /// Zero-copy sends the kernel reported it copied anyway (`IORING_NOTIF_USAGE_ZC_COPIED`).
    pub copied_sends: u64,
    pub plain_sends: u64,
    /// Bytes shipped while the secondary was fractured (resync, full sync, verify repairs).
    pub resync_bytes: u64,
    pub connects: u64,
    pub disconnects: u64,
}

/// A frame queued or being sent on a connection, in stream order.
#[derive(Debug)]
pub enum SendJob {
    /// An extent frame from a pool buffer: `frame_bytes` from the buffer's frame start.
    Extent { buffer: u16, frame_bytes: usize, sent: usize, sequence: u64 },
    /// A keepalive, from the connection's own keepalive buffer.
    Keepalive { sent: usize },
    /// A verify request, encoded into the connection's `verify_frame` when its send starts.
    VerifyRequest { first_extent: u64, count: u32, sent: usize },
    /// A consistency point, encoded into the connection's `point_frame` when queued.
    Point { sent: usize },
    /// A commit of a cut, encoded into the connection's `commit_frame` when queued.
    Commit { sent: usize },
    /// The mirror database, from the connection's `db_frame`.
    Db { sent: usize },
    /// A client's write (or TRIM / WRITE_ZEROES) through the NBD export, from its export slot.
    Export { slot: u32, frame_bytes: usize, sent: usize, sequence: u64 },
}

#[derive(Debug)]
pub struct InFlight {
    pub run: Range<u64>,
    pub bytes: u64,
    /// When its frame was queued (its data read).
    pub queued_at: Instant,
    /// When the oldest write it carries completed (was drained from the tracker).
    pub written_at: Instant,
    /// When its frame was fully sent.
    pub sent_at: Option<Instant>,
}

impl InFlight {
    /// A frame without extent data (a database, a consistency point), tracked until its ack.
    pub fn control() -> Self {
        let now = Instant::now();
        Self { run: 0..0, bytes: 0, queued_at: now, written_at: now, sent_at: None }
    }
}

/// Latencies recorded on the engine's thread, merged into the exported histograms now and then.
pub struct Latency {
    /// From a write's completion (its drain) to its acknowledgement, in µs.
    pub lag_us: hdrhistogram::Histogram<u64>,
    /// From a frame fully sent to its acknowledgement, in µs.
    pub rtt_us: hdrhistogram::Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            lag_us: crate::metrics::new_latency_recorder(),
            rtt_us: crate::metrics::new_latency_recorder(),
        }
    }
}

pub struct Conn {
    pub stream: TcpStream,
    pub queue: VecDeque<SendJob>,
    /// A send op for the queue's front is in the ring.
    pub sending: bool,
    /// Extent frames queued or sent, not yet acknowledged, by sequence.
    pub inflight: BTreeMap<u64, InFlight>,
    pub backlog_bytes: u64,
    pub recv: Box<[u8]>,
    pub recv_start: usize,
    pub recv_len: usize,
    pub recv_in_flight: bool,
    /// The keepalive frame being sent; fixed address while a send of it is in flight.
    pub keepalive: Box<[u8; wire::HEADER_BYTES]>,
    /// The verify request being sent (one batch per secondary at a time).
    pub verify_frame: Box<[u8; wire::HEADER_BYTES + wire::VERIFY_FIXED_BYTES]>,
    /// The mirror-database frame queued, and its sequence (one at a time per connection).
    pub db_frame: Vec<u8>,
    pub db_sequence: Option<u64>,
    /// A database update was not queued because the previous frame was still in flight: the
    /// current database goes out once that one is acknowledged (`resend_stale_dbs`).
    pub db_stale: bool,
    /// The consistency-point frame queued (one point at a time per connection).
    pub point_frame: Box<[u8; wire::HEADER_BYTES + wire::POINT_PAYLOAD_BYTES]>,
    /// The commit frame queued (one unacknowledged commit at a time per connection).
    pub commit_frame: Box<[u8; wire::HEADER_BYTES + wire::COMMIT_PAYLOAD_BYTES]>,
    pub last_heard: Instant,
    pub last_sent: Instant,
    /// The iovecs and header of the export frames' sendmsg in flight (fixed addresses), and how
    /// many export frames from the queue's front it carries.
    pub export_sending: usize,
    pub export_iovecs: Box<[libc::iovec; EXPORT_IOVECS_MAX]>,
    pub export_msg: Box<libc::msghdr>,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            queue: VecDeque::new(),
            sending: false,
            inflight: BTreeMap::new(),
            backlog_bytes: 0,
            recv: vec![0u8; RECV_BYTES].into_boxed_slice(),
            recv_start: 0,
            recv_len: 0,
            recv_in_flight: false,
            keepalive: Box::new([0u8; wire::HEADER_BYTES]),
            verify_frame: Box::new([0u8; wire::HEADER_BYTES + wire::VERIFY_FIXED_BYTES]),
            point_frame: Box::new([0u8; wire::HEADER_BYTES + wire::POINT_PAYLOAD_BYTES]),
            commit_frame: Box::new([0u8; wire::HEADER_BYTES + wire::COMMIT_PAYLOAD_BYTES]),
            db_frame: Vec::new(),
            db_sequence: None,
            db_stale: false,
            last_heard: Instant::now(),
            last_sent: Instant::now(),
            export_sending: 0,
            export_iovecs: Box::new(
                [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; EXPORT_IOVECS_MAX],
            ),
            // SAFETY: a zeroed msghdr is a valid empty one.
            export_msg: Box::new(unsafe { std::mem::zeroed() }),
        }
    }

    /// Reclaims parsed bytes; only while no recv is in flight.
    pub fn compact_recv(&mut self) {
        assert!(!self.recv_in_flight);
        self.recv.copy_within(self.recv_start..self.recv_len, 0);
        self.recv_len -= self.recv_start;
        self.recv_start = 0;
    }

    /// Whether the last database frame queued is still unacknowledged.
    pub fn db_in_flight(&self) -> bool {
        self.db_sequence.is_some_and(|s| self.inflight.contains_key(&s))
    }

    /// How long the oldest data frame has waited for its acknowledgement since it was sent in
    /// full; none while it is still being sent. Data frames go out in sequence order, so that
    /// is the first one in `inflight` (control frames, with no extents, are passed over): O(1)
    /// per call, on every loop turn.
    pub fn oldest_sent_wait(&self) -> Option<std::time::Duration> {
        let oldest = self.inflight.values().find(|frame| !frame.run.is_empty())?;
        oldest.sent_at.map(|sent_at| sent_at.elapsed())
    }
}

pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
    /// Extents this secondary still needs.
    pub pending: ExtentSet,
    pub conn: Option<Conn>,
    /// Bumped at each disconnect; completions of older connections are recognised by it.
    pub generation: u32,
    /// Its connector thread; none once removed (the connector then ends).
    pub want_connection: Option<Sender<super::connector::Want>>,
    pub connector: u32,
    /// Removed from the mirror: a slot waiting for reuse, with nothing pending.
    pub removed: bool,
    /// Being removed gracefully: fed nothing new while what is in flight finishes.
    pub draining: bool,
    pub latency: Latency,
    /// Per 64-extent word: when its oldest write not yet read for this secondary was drained,
    /// in ms since the engine started (0: none). Replication lag is measured from here.
    pub written_at_ms: Vec<u32>,
    /// The image state last logged and exported.
    pub reported_state: Option<crate::model::ImageState>,
    /// Why it last disconnected or failed to connect.
    pub last_error: String,
    /// Zero-copy sends are tried (`--zero-copy`, the default) and the kernel has not been
    /// found copying them anyway (see `ZeroCopyProbe`).
    pub zero_copy: bool,
    pub zero_copy_probe: ZeroCopyProbe,
    pub stats: PeerStats,
    pub metrics: crate::metrics::PeerMetrics,
    pub in_sync: bool,
    /// The last consistency point it recorded (Unix ms), 0 if none.
    pub consistency_point_unix_ms: u64,
    /// An extent frame was queued to it after that point.
    pub written_since_point: bool,
    /// An extent frame was queued to it after the last consistency-point frame (which becomes
    /// `written_since_point` when that point is acknowledged).
    pub written_since_point_frame: bool,
    /// Its fracture-log state, throttle and verify pass.
    pub log: super::resync::PeerLog,
    /// The cut its image held when it last connected (its `CutState`), then as its commits
    /// are acknowledged.
    pub cut: crate::auth::SecondaryCut,
}

/// Zero-copy sends that the kernel copies anyway (a veth or loopback path, a NIC without
/// scatter-gather) cost a notification completion each on top of the copy. The first
/// `ZERO_COPY_PROBE_SENDS` notifications to a secondary decide: if the kernel copied every one,
/// that secondary gets plain sends from then on.
#[derive(Debug, Default)]
pub struct ZeroCopyProbe {
    pub notifications: u32,
    pub copied: u32,
}

/// Notifications a secondary's zero-copy sends are judged by.
pub const ZERO_COPY_PROBE_SENDS: u32 = 64;

impl ZeroCopyProbe {
    /// Counts a notification; true exactly once, when the probe ends with every send copied.
    pub fn copied_throughout(&mut self, copied: bool) -> bool {
        if self.notifications >= ZERO_COPY_PROBE_SENDS {
            return false;
        }
        self.notifications += 1;
        self.copied += u32::from(copied);
        self.notifications == ZERO_COPY_PROBE_SENDS && self.copied == self.notifications
    }
}

impl Peer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        addr: SocketAddr,
        pending: ExtentSet,
        log: super::resync::PeerLog,
        generation: u32,
        connector: u32,
        want_connection: Sender<super::connector::Want>,
        zero_copy: bool,
        metrics: crate::metrics::PeerMetrics,
        extents: usize,
    ) -> Self {
        metrics.sync_rate_limit_bytes.set(log.throttle.rate_bytes_per_s.min(i64::MAX as u64) as i64);
        Self {
            name: name.to_owned(),
            addr,
            pending,
            conn: None,
            generation,
            connector,
            want_connection: Some(want_connection),
            zero_copy,
            zero_copy_probe: ZeroCopyProbe::default(),
            stats: PeerStats::default(),
            metrics,
            in_sync: false,
            log,
            cut: crate::auth::SecondaryCut::default(),
            consistency_point_unix_ms: 0,
            written_since_point: false,
            written_since_point_frame: false,
            removed: false,
            reported_state: None,
            written_at_ms: vec![0; extents.div_ceil(64)],
            latency: Latency::default(),
            draining: false,
            last_error: String::new(),
        }
    }

    /// An extent frame of `bytes` of data was sent in full: counted as shipped, and as resync
    /// while it is fractured (resync, full sync, verify repairs).
    pub fn counts_shipped(&mut self, bytes: u64, extent_bytes: u64) {
        let extents = bytes.div_ceil(extent_bytes);
        self.stats.shipped_bytes += bytes;
        self.stats.shipped_extents += extents;
        self.metrics.shipped_bytes.inc_by(bytes);
        self.metrics.shipped_extents.inc_by(extents);
        if self.log.fractured() {
            self.stats.resync_bytes += bytes;
            self.log.resync_bytes_done += bytes;
            self.metrics.resync_bytes.inc_by(bytes);
        }
    }

    /// Extents `run` were written (drained or exported at `now_ms`, the lag's start stamp of
    /// their words unless an older write stamped them) and must be shipped to it. One that is
    /// not connected now (unreachable since start-up, or since it was added) is behind from
    /// here on: fractured, so it is SYNCHRONIZING, not SYNCHRONIZED, when it connects, until
    /// they are shipped. (One that disconnects is fractured then.)
    pub fn pending_write(&mut self, run: std::ops::Range<usize>, now_ms: u32) {
        for stamp in &mut self.written_at_ms[run.start / 64..=(run.end - 1) / 64] {
            if *stamp == 0 {
                *stamp = now_ms;
            }
        }
        self.pending.insert_range(run);
        if self.conn.is_none() && !self.log.fractured() {
            self.log.fall_behind();
        }
    }

    /// An extent frame was queued to it: written after its last consistency point, and after
    /// any point frame queued before it.
    pub fn frame_queued(&mut self) {
        self.written_since_point = true;
        self.written_since_point_frame = true;
    }

    /// Whether this peer can take another extent frame now.
    pub fn eligible(&self, backlog_bytes_max: u64, run_bytes_max: u64, queue_max: usize) -> bool {
        self.conn.as_ref().is_some_and(|c| {
            c.backlog_bytes + run_bytes_max <= backlog_bytes_max && c.queue.len() < queue_max
        })
    }
}

#[cfg(test)]
mod zero_copy_probe_tests {
    use super::{ZERO_COPY_PROBE_SENDS, ZeroCopyProbe};

    #[test]
    fn falls_back_only_when_every_probed_send_was_copied() {
        let mut all_copied = ZeroCopyProbe::default();
        let verdicts: Vec<bool> =
            (0..ZERO_COPY_PROBE_SENDS * 2).map(|_| all_copied.copied_throughout(true)).collect();
        assert_eq!(verdicts.iter().filter(|&&v| v).count(), 1, "one verdict, once");
        assert!(verdicts[ZERO_COPY_PROBE_SENDS as usize - 1]);

        let mut one_real = ZeroCopyProbe::default();
        let fell_back = (0..ZERO_COPY_PROBE_SENDS * 2).any(|i| one_real.copied_throughout(i != 7));
        assert!(!fell_back, "a single send the kernel did not copy keeps zero-copy");
    }
}
