//! The primary's engine: drains written extents from the tracker, reads them from the primary
//! device with O_DIRECT into registered buffers, and ships them to every connected secondary
//! with `IORING_OP_SEND_ZC`, all on one io_uring driven by one thread.
//!
//! Owns the ring, the buffer pool, the primary device, and the per-secondary state (`peer`).
//! Buffer ownership, in order: free in the pool -> a `Read` op -> after the read, one reference
//! per target secondary's queued `SendJob` plus one per send op whose zero-copy notification is
//! outstanding -> back to the pool when the count reaches zero. A zero-copy send releases its
//! buffer only on its notification CQE, never on its first CQE.
//!
//! Ordering: frames for one extent reach a secondary in the order their reads were issued, so
//! the newest data always lands last. Frames are queued when their read completes, so an extent
//! is never read again while a read of it is in flight (`reading`).
//!
//! Limits, all set at start-up: `buffers` (reads and unsent frames), `run_bytes_max` (largest
//! coalesced read and frame), `backlog_bytes_max` (unacknowledged bytes per secondary; past it a
//! secondary is not fed and its extents stay in its pending bitmap), `SECONDARIES_MAX`.

mod connector;
mod export_conns;
mod exports;
mod membership;
mod peer;
mod resync;

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use bitvec::prelude::*;
use io_uring::{IoUring, cqueue, opcode, squeue, types};

pub use peer::PeerStats;
use peer::{Conn, InFlight, Peer, SendJob};
use resync::{PeerLog, Throttle, VerifyBatch};

use crate::auth::{Key, Params};
use crate::control::{self, Call, Request};
use crate::extent_set::ExtentSet;
use crate::logs::{self, IntentQuiet, LogHeader, LogIdentity, LogKind};
use crate::metrics::PrimaryMetrics;
use crate::pool::BufferPool;
use crate::tracker::{Tracker, TrackerOptions};
use crate::wire::{self, Limits};

use crate::model::{ImageState, RecoveryPolicy, SECONDARIES_MAX};

/// `IORING_SEND_ZC_REPORT_USAGE` and `IORING_NOTIF_USAGE_ZC_COPIED` from the kernel's uapi
/// (`io_uring.h`); the io-uring crate keeps its `sys` module private.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const NOTIF_USAGE_ZC_COPIED: i32 = 1 << 31;

#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub device: PathBuf,
    pub secondaries: Vec<(String, SocketAddr)>,
    pub state_dir: PathBuf,
    pub tracker_name: Option<String>,
    pub mirror_id: u64,
    pub extent_bytes: crate::model::ExtentBytes,
    pub run_bytes_max: usize,
    pub buffers: u16,
    pub backlog_bytes_max: u64,
    pub timeout_ms: u64,
    pub keepalive_ms: u64,
    pub retry_max_ms: u64,
    /// Ship every extent once to a secondary that has no fracture log yet (safe default: its
    /// contents are unknown).
    pub initial_sync: bool,
    pub zero_copy: bool,
    /// How often the intent and fracture logs are checkpointed.
    pub checkpoint_ms: u64,
    /// Resync rate limit per secondary, bytes per second; 0 is unlimited.
    pub sync_rate_bytes_per_s: u64,
    pub recovery_policy: RecoveryPolicy,
    /// The mirror database, when the mirror was made with `replicator create`.
    pub mirror: Option<crate::mirror::MirrorDb>,
    /// Serve the device over NBD; writes through it follow the write policy.
    pub export: Option<crate::export::ExportConfig>,
    /// For a mirror given on the command line (a database has its own): whether export writes
    /// wait for the secondaries (sync) or are shipped behind (async).
    pub write_policy: crate::model::WritePolicy,
    /// For a mirror given on the command line: images (the primary counts) a sync write must
    /// reach before it succeeds.
    pub minimum_images: u32,
    /// How long the engine spins for its next completion before it sleeps.
    pub poll: crate::pool::PollSetting,
    /// The congestion control of the connections to the secondaries.
    pub tcp_congestion: crate::link::Congestion,
}

impl ShipperConfig {
    pub const RUN_BYTES_MAX_DEFAULT: usize = 1 << 20;
    pub const BUFFERS_DEFAULT: u16 = 32;
    pub const BACKLOG_BYTES_MAX_DEFAULT: u64 = 64 << 20;
    pub const TIMEOUT_MS_DEFAULT: u64 = 5000;
    pub const KEEPALIVE_MS_DEFAULT: u64 = 1000;
    pub const RETRY_MAX_MS_DEFAULT: u64 = 1000;
    pub const CHECKPOINT_MS_DEFAULT: u64 = 1000;
    pub const SYNC_RATE_BYTES_PER_S_DEFAULT: u64 = 100 << 20;
}

#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    #[error(transparent)]
    Tracker(#[from] crate::tracker::TrackerError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Log(#[from] logs::LogError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShipperError {
    let what = what.into();
    move |source| ShipperError::Io { what, source }
}

/// An operation in the ring; `user_data` is its index in `Engine::ops`.
#[derive(Debug)]
enum Op {
    Read {
        buffer: u16,
        run: Range<u64>,
        targets: [Option<u32>; SECONDARIES_MAX],
        /// Per target: when the oldest write the run carries for it was drained (ms since
        /// `started`), 0 unknown.
        written_at_ms: [u32; SECONDARIES_MAX],
    },
    Send {
        peer: usize,
        generation: u32,
        buffer: Option<u16>,
        notif_pending: bool,
    },
    Recv {
        peer: usize,
        generation: u32,
    },
    /// The primary's part of an NBD export request (a write, flush, TRIM or WRITE_ZEROES).
    Export {
        slot: u32,
    },
    /// A read of the export's eventfd: completes when a client connects or a buffer the
    /// export waits for comes back.
    Wake,
    /// A recv from an export client's socket (`direct`: into the arriving write's buffer).
    ExportRecv {
        conn: u16,
        generation: u32,
        direct: bool,
    },
    /// The primary's side of a verify batch: the extents read to be hashed.
    VerifyRead {
        peer: usize,
        generation: u32,
        buffer: u16,
        first_extent: u64,
        count: u32,
    },
}

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

pub struct Engine {
    // Field order matters: the ring is dropped before the pool it has registered.
    ring: IoUring,
    pool: BufferPool,
    poll: crate::pool::PollWindow,
    buffer_refs: Vec<u16>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    device: File,
    device_bytes: u64,
    tracker: Tracker,
    peers: Vec<Peer>,
    connected: Receiver<connector::Event>,
    connected_tx: mpsc::Sender<connector::Event>,
    key: Arc<Key>,
    params: Params,
    /// Identifies connector threads, so a removed secondary's late connection is dropped.
    next_connector: u32,
    config: ShipperConfig,
    limits: Limits,
    cursor: u64,
    /// Extents with a read in flight. Frames are queued when their read completes, so two
    /// reads of one extent in flight together could queue the older data last; an extent is
    /// therefore never read again before its last read completed.
    reading: BitVec<u64, Lsb0>,
    /// Completions copied out of the ring; reused, capacity = op slots.
    completions: Vec<(u64, i32, u32)>,
    next_sequence: u64,
    reads_in_flight: usize,
    stop_connectors: Arc<AtomicBool>,
    last_status: Instant,
    metrics: Arc<PrimaryMetrics>,
    control: Receiver<Call>,
    _control_server: control::ControlServer,
    /// The lazy clearing of the write-intent log, and its checkpoint state.
    quiet: IntentQuiet,
    last_checkpoint: Instant,
    checkpoint_sequence: u64,
    persisted_intent: Option<BitVec<u64, Lsb0>>,
    /// Scratch bitmaps for checkpoints, sized once (one bit per extent).
    scratch_dirty: BitVec<u64, Lsb0>,
    scratch_intent: BitVec<u64, Lsb0>,
    scratch_clearable: BitVec<u64, Lsb0>,
    /// Consistency points waiting for their secondaries, at most `POINTS_MAX`.
    points: Vec<PendingPoint>,
    /// The mirror database (a mirror made with `create`); none for a mirror given on the
    /// command line.
    mirror: Option<crate::mirror::MirrorDb>,
    /// The change of the mirror database in progress, if any.
    change: Option<membership::PendingChange>,
    /// A secondary that refused us because both sides wrote as primary while apart.
    split_brain: Option<(usize, String)>,
    /// Checkpoint durations in µs, merged into the exported histogram at each status tick.
    checkpoint_us: hdrhistogram::Histogram<u64>,
    /// Tracker counters already exported: events seen, write events.
    tracker_seen: (u64, u64),
    /// The time base of the peers' drain stamps (`Peer::written_at_ms`).
    started: Instant,
    unmatched_seen: u64,
    /// The NBD export, when serving one.
    export: Option<exports::ExportState>,
    /// Connections dropped while an op of theirs was in the ring, kept until it completes.
    retired: Vec<Retired>,
}

/// A dropped connection whose receive or send is still in the ring.
struct Retired {
    peer: usize,
    generation: u32,
    conn: Conn,
    /// Export slots whose frames its sendmsg in the ring still reads.
    sending_slots: Vec<u32>,
}

/// Most consistency points waiting at once: one, so a connection has one point frame queued.
const POINTS_MAX: usize = 1;
/// How often the status file, the gauges and the histograms are refreshed.
const STATUS_INTERVAL_MS: u64 = 200;
/// A secondary whose oldest sent frame has waited this many timeouts for its acknowledgement
/// is cut off (and fractured): its disk write hangs while its session still answers
/// keepalives, and a sync export write would wait for it forever (DRBD's ko-count). Well above
/// a slow link's queueing, where an ack also waits for the socket buffer and qdisc ahead.
const ACK_TIMEOUTS_MAX: u32 = 4;

/// A consistency point waiting for its secondaries.
struct PendingPoint {
    reply: std::sync::mpsc::Sender<control::Reply>,
    deadline: Instant,
    /// When the first point frame was queued (the point's time), 0 before.
    point_unix_ms: u64,
    targets: [Option<PointTarget>; SECONDARIES_MAX],
}

#[derive(Clone, Copy, Debug)]
struct PointTarget {
    /// The connection it must be recorded over.
    generation: u32,
    /// The point frame's sequence, once queued.
    sequence: Option<u64>,
}

impl Engine {
    pub fn new(
        config: ShipperConfig,
        key: Arc<Key>,
        metrics: Arc<PrimaryMetrics>,
    ) -> Result<Self, ShipperError> {
        validate(&config)?;
        crate::envelope::create_state_dir(&config.state_dir)
            .map_err(io_error(format!("creating {}", config.state_dir.display())))?;
        // First, so that a second primary on the same state directory stops here.
        let (control_server, control) = control::serve(&config.state_dir)?;
        let options = TrackerOptions {
            name: config.tracker_name.clone(),
            extent_bytes: config.extent_bytes.get(),
            ..TrackerOptions::default()
        };
        let mut tracker = Tracker::attach_with(&config.device, &options)?;
        let geometry = *tracker.geometry();
        let device = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&config.device)
            .map_err(io_error(format!("opening {} with O_DIRECT", config.device.display())))?;
        let export = match &config.export {
            Some(export_config) => Some(start_export(&config, export_config, tracker.device())?),
            None => None,
        };
        let buffers = config.buffers;
        let pool = BufferPool::new(usize::from(buffers), config.run_bytes_max)
            .map_err(|e| io_error("allocating the buffer pool")(e.into()))?;
        // A mirror from a database may grow to SECONDARIES_MAX secondaries at run time.
        let peer_slots = if config.mirror.is_some() { SECONDARIES_MAX } else { config.secondaries.len() };
        let export_slots = config.export.as_ref().map_or(0, export_slots_max);
        // An export has a Wake op and a recv op per client connection besides its requests.
        let export_ops =
            config.export.as_ref().map_or(0, |_| export_slots + 1 + crate::export::CONNECTIONS_MAX);
        let op_slots = usize::from(buffers) * (peer_slots + 1) + 3 * peer_slots + 8 + export_ops;
        let ring = crate::pool::new_ring((op_slots as u32).next_power_of_two())
            .map_err(io_error("creating the io_uring"))?;
        // SAFETY: the pool outlives the ring (field order above).
        unsafe { ring.submitter().register_buffers(&pool.iovecs()) }
            .map_err(io_error("registering buffers"))?;

        let params = Params {
            mirror_id: config.mirror_id,
            image_bytes: geometry.device_bytes(),
            extent_bytes: config.extent_bytes.get(),
        };
        let recovered = recover_intent(&config, &mut tracker)?;
        let stop_connectors = Arc::new(AtomicBool::new(false));
        let (connected_tx, connected) = mpsc::channel();
        // What a secondary may send: acks, keepalives, verify hashes, errors with their message.
        let limits = Limits {
            image_bytes: 0,
            extent_bytes: 1,
            payload_bytes_max: (4 + wire::ERROR_MESSAGE_BYTES_MAX).max(wire::VERIFY_HASHES_BYTES_MAX) as u32,
        };
        let ops = (0..op_slots).map(|_| None).collect();
        let extents = geometry.extent_count() as usize;
        let mirror = config.mirror.clone();
        let mut engine = Self {
            ring,
            poll: crate::pool::PollWindow::new(config.poll),
            pool,
            buffer_refs: vec![0; usize::from(buffers)],
            ops,
            free_ops: (0..op_slots).rev().collect(),
            device,
            device_bytes: geometry.device_bytes(),
            tracker,
            peers: Vec::with_capacity(SECONDARIES_MAX),
            connected,
            connected_tx,
            key,
            params,
            next_connector: 0,
            config,
            limits,
            cursor: 0,
            reading: bitvec![u64, Lsb0; 0; extents],
            completions: Vec::with_capacity(op_slots),
            next_sequence: 2,
            reads_in_flight: 0,
            stop_connectors,
            last_status: Instant::now(),
            metrics,
            control,
            _control_server: control_server,
            quiet: IntentQuiet::new(extents),
            last_checkpoint: Instant::now(),
            checkpoint_sequence: 0,
            persisted_intent: None,
            scratch_dirty: bitvec![u64, Lsb0; 0; extents],
            scratch_intent: bitvec![u64, Lsb0; 0; extents],
            scratch_clearable: bitvec![u64, Lsb0; 0; extents],
            points: Vec::with_capacity(POINTS_MAX),
            mirror: None,
            change: None,
            split_brain: None,
            checkpoint_us: crate::metrics::new_latency_recorder(),
            tracker_seen: (0, 0),
            started: Instant::now(),
            unmatched_seen: 0,
            retired: Vec::with_capacity(peer_slots),
            export: export.map(|(export, side, device)| {
                exports::ExportState::new(export, side, device, extents, export_slots)
            }),
        };
        if engine.export.is_some() {
            // The export ships its own writes; the tracker marks them in the intent log only.
            engine.tracker.exempt_writes_of(std::process::id());
        }
        if let Some(db) = mirror {
            tracing::info!(mirror = %db.name, id = db.id, generation = db.generation, state = ?db.state, "mirror database loaded");
            engine.metrics.set_mirror_state(db.state.as_str());
            engine.mirror = Some(db);
        }
        for (name, addr) in engine.config.secondaries.clone() {
            let (pending, mut log) = recover_peer(&engine.config, &name, &recovered, engine.device_bytes);
            if let Some(record) =
                engine.mirror.as_ref().and_then(|db| db.images.iter().find(|i| i.name == name))
            {
                log.throttle = Throttle::new(record.sync_rate_bytes_per_s);
                log.recovery = record.recovery_policy;
            }
            engine.add_peer(&name, addr, pending, log)?;
        }
        Ok(engine)
    }

    /// Adds a secondary (at start, or `add-secondary`): a slot (a removed one is reused, with a
    /// new generation), and a connector thread of its own.
    fn add_peer(
        &mut self,
        name: &str,
        addr: SocketAddr,
        pending: ExtentSet,
        log: PeerLog,
    ) -> Result<usize, ShipperError> {
        let index = match self.peers.iter().position(|p| p.removed) {
            Some(index) => index,
            None if self.peers.len() < SECONDARIES_MAX => self.peers.len(),
            None => {
                return Err(ShipperError::Config(format!(
                    "{SECONDARIES_MAX} secondaries already; remove one first"
                )));
            }
        };
        let (want_tx, want_rx) = mpsc::channel();
        self.next_connector += 1;
        let connector_config = connector::ConnectorConfig {
            metrics: self.metrics.peer(name),
            peer: index,
            connector: self.next_connector,
            name: name.to_owned(),
            addr,
            key: Arc::clone(&self.key),
            params: self.params,
            timeout_ms: self.config.timeout_ms,
            retry_max_ms: self.config.retry_max_ms,
            congestion: self.config.tcp_congestion.clone(),
        };
        let (tx, stop) = (self.connected_tx.clone(), Arc::clone(&self.stop_connectors));
        std::thread::Builder::new()
            .name(format!("connect-{name}"))
            .spawn(move || connector::run(connector_config, want_rx, tx, stop))
            .map_err(io_error("starting a connector thread"))?;
        if !log.held {
            want_tx.send(connector::Want::Now).expect("connector is running");
        }
        let metrics = self.metrics.peer(name);
        metrics.sync_rate_limit_bytes.set(log.throttle.rate_bytes_per_s.min(i64::MAX as u64) as i64);
        let peer = Peer {
            name: name.to_owned(),
            addr,
            pending,
            conn: None,
            generation: self.peers.get(index).map_or(0, |p| p.generation + 1),
            connector: self.next_connector,
            want_connection: Some(want_tx),
            zero_copy: self.config.zero_copy,
            zero_copy_probe: peer::ZeroCopyProbe::default(),
            stats: PeerStats::default(),
            metrics,
            in_sync: false,
            log,
            consistency_point_unix_ms: 0,
            written_since_point: false,
            written_since_point_frame: false,
            removed: false,
            reported_state: None,
            written_at_ms: vec![0; self.reading.len().div_ceil(64)],
            latency: peer::Latency::default(),
            draining: false,
            last_error: String::new(),
        };
        if index == self.peers.len() {
            self.peers.push(peer);
        } else {
            self.peers[index] = peer;
        }
        Ok(index)
    }

    /// Runs until `stop` is set, then drains what is in flight (up to the timeout) and stops.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), ShipperError> {
        let mut stopping_since = None;
        loop {
            if stop.load(Ordering::Relaxed) && stopping_since.is_none() {
                tracing::info!("stopping: finishing in-flight reads, sends and acks");
                stopping_since = Some(Instant::now());
            }
            self.accept_connections();
            self.handle_control();
            self.drain_tracker();
            self.arm_export_wake(stopping_since.is_some())?;
            self.pump_export_connections(stopping_since.is_some())?;
            if stopping_since.is_none() {
                self.take_export_requests()?;
                self.schedule_reads()?;
                self.schedule_verify()?;
            }
            self.tick_peers();
            self.start_sends()?;
            self.wait_and_reap()?;
            // A secondary fractured this turn has its fracture log on disk before any sync
            // write it missed is acknowledged to a client.
            self.persist_fracture_logs();
            self.advance_exports();
            self.update_status();
            self.persist_fracture_logs();
            self.advance_points();
            self.advance_change();
            if self.last_checkpoint.elapsed() >= Duration::from_millis(self.config.checkpoint_ms) {
                self.checkpoint();
            }
            if let Some(since) = stopping_since
                && (self.quiescent() || since.elapsed() > Duration::from_millis(self.config.timeout_ms))
            {
                break;
            }
        }
        self.shutdown()
    }

    fn accept_connections(&mut self) {
        while let Ok(event) = self.connected.try_recv() {
            match event {
                connector::Event::Connected(connected) => {
                    let peer = &mut self.peers[connected.peer];
                    if peer.removed || peer.connector != connected.connector {
                        continue; // a connector of a removed secondary, finishing
                    }
                    if peer.conn.is_some() || peer.log.held {
                        // A second connection for a want already met (a restore while the
                        // connector was retrying), or one made while the secondary is fractured
                        // and held (its restore asks for a new one): closed unused.
                        let _ = connected.stream.shutdown(std::net::Shutdown::Both);
                        continue;
                    }
                    peer.conn = Some(Conn::new(connected.stream));
                    peer.stats.connects += 1;
                    peer.metrics.connects.inc();
                    peer.metrics.connected.set(1);
                    peer.last_error.clear();
                    self.next_sequence = self.next_sequence.max(connected.next_sequence);
                    // Every secondary that connects gets the current mirror database first.
                    self.send_mirror_db([connected.peer]);
                }
                connector::Event::Failed { peer, connector, error } => {
                    let slot = &mut self.peers[peer];
                    if !slot.removed && slot.connector == connector {
                        slot.last_error = error.clone();
                        self.connect_failed(peer, &error);
                    }
                }
            }
        }
    }

    fn drain_tracker(&mut self) {
        let now_ms = (self.started.elapsed().as_millis() as u64).clamp(1, u64::from(u32::MAX)) as u32;
        let runs = match self.export.as_mut() {
            Some(export) => {
                let runs = self.tracker.drain_completed_except(&export.mask);
                export.drained();
                runs
            }
            None => self.tracker.drain_completed(),
        };
        for run in runs {
            let run = run.start as usize..run.end as usize;
            self.quiet.note_dirty_run(run.clone());
            // A removed secondary's slot gets nothing: its pending set would keep the extents
            // dirty, and the intent log from ever clearing them.
            for peer in self.peers.iter_mut().filter(|p| !p.removed) {
                peer.pending_write(run.clone(), now_ms);
            }
        }
    }

    fn free_slots(&self) -> usize {
        self.free_ops.len()
    }

    fn push_op(&mut self, op: Op, entry: squeue::Entry) -> Result<(), ShipperError> {
        let slot = self.free_ops.pop().expect("op slots are sized with the ring; callers check free_slots");
        assert!(self.ops[slot].is_none());
        self.ops[slot] = Some(op);
        let entry = entry.user_data(slot as u64);
        // SAFETY: every buffer an entry points at is owned by its op (see the module header)
        // until the op's last completion.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit().map_err(io_error("submitting to the io_uring"))?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| ShipperError::Config("ring full".into()))?;
        }
        Ok(())
    }

    /// Reads the next runs of extents some eligible secondary needs, while buffers last.
    fn schedule_reads(&mut self) -> Result<(), ShipperError> {
        let queue_max = usize::from(self.config.buffers);
        let run_bytes_max = self.config.run_bytes_max as u64;
        for peer in &mut self.peers {
            peer.log.throttle.refill(run_bytes_max);
        }
        while self.pool.free_count() > 0 && self.free_slots() > 1 + self.peers.len() * 3 {
            // Indexes of the peers that can take a frame now; a fixed array, no allocation.
            let mut eligible_at = [0usize; SECONDARIES_MAX];
            let mut eligible_count = 0;
            for i in 0..self.peers.len() {
                let peer = &self.peers[i];
                if peer.draining {
                    continue;
                }
                if peer.eligible(self.config.backlog_bytes_max, run_bytes_max, queue_max) {
                    if !peer.log.throttled || peer.log.throttle.allows() {
                        eligible_at[eligible_count] = i;
                        eligible_count += 1;
                    }
                } else if !peer.log.fractured()
                    && peer
                        .conn
                        .as_ref()
                        .is_some_and(|c| c.backlog_bytes + run_bytes_max > self.config.backlog_bytes_max)
                    && peer.pending.any()
                {
                    let peer = &mut self.peers[i];
                    tracing::info!(secondary = %peer.name, "secondary behind: backlog over its limit; its missed extents go to its fracture log");
                    peer.metrics.fractures.inc();
                    peer.log.fall_behind();
                }
            }
            let eligible = &eligible_at[..eligible_count];
            let Some(run) = self.next_run(eligible) else {
                return Ok(());
            };
            let (_, len) = self.run_bytes(&run);
            let mut targets = [None; SECONDARIES_MAX];
            for &i in eligible {
                let peer = &mut self.peers[i];
                let extents = run.start as usize..run.end as usize;
                if peer.pending.any_in(extents.clone()) {
                    peer.pending.remove_range(extents);
                    targets[i] = Some(peer.generation);
                    if peer.log.throttled {
                        peer.log.throttle.take(len as u64);
                    }
                    // Reserved now, so reads in flight count against the backlog limit too.
                    let conn = peer.conn.as_mut().expect("eligible peers are connected");
                    conn.backlog_bytes += len as u64;
                    assert!(conn.backlog_bytes <= self.config.backlog_bytes_max, "backlog limit");
                }
            }
            self.submit_read(run, targets)?;
        }
        Ok(())
    }

    /// The next run (from the cursor, wrapping) of extents pending for any of `eligible`, at
    /// most `run_bytes_max` long.
    fn next_run(&mut self, eligible: &[usize]) -> Option<Range<u64>> {
        let extents = self.peers.first()?.pending.len();
        let first_from = |from: usize, peers: &[Peer]| {
            eligible.iter().filter_map(|&i| peers[i].pending.first_from(from)).min()
        };
        // An extent with a read in flight waits: its next read must be queued after that one.
        let mut start = None;
        for pass_from in [self.cursor as usize, 0] {
            let mut from = pass_from;
            while let Some(candidate) = first_from(from, &self.peers) {
                if !self.reading[candidate] && !self.export_busy(candidate) {
                    start = Some(candidate);
                    break;
                }
                from = candidate + 1;
            }
            if start.is_some() {
                break;
            }
        }
        let start = start?;
        let run_extents_max = (self.config.run_bytes_max as u64 / self.config.extent_bytes.get()) as usize;
        let mut end = start + 1;
        while end < extents
            && end - start < run_extents_max
            && !self.reading[end]
            && !self.export_busy(end)
            && eligible.iter().any(|&i| self.peers[i].pending.contains(end))
        {
            end += 1;
        }
        self.cursor = end as u64 % extents as u64;
        Some(start as u64..end as u64)
    }

    fn run_bytes(&self, run: &Range<u64>) -> (u64, usize) {
        let offset = run.start * self.config.extent_bytes.get();
        let end = (run.end * self.config.extent_bytes.get()).min(self.device_bytes);
        (offset, (end - offset) as usize)
    }

    fn submit_read(
        &mut self,
        run: Range<u64>,
        targets: [Option<u32>; SECONDARIES_MAX],
    ) -> Result<(), ShipperError> {
        let reading = &mut self.reading[run.start as usize..run.end as usize];
        assert!(reading.not_any(), "two reads of one extent in flight could queue its frames out of order");
        reading.fill(true);
        let buffer = self.pool.take().expect("schedule_reads checked a free buffer");
        let entry = self.read_entry(buffer, &run);
        self.reads_in_flight += 1;
        let written_at_ms = self.take_written_at(&run, &targets);
        self.push_op(Op::Read { buffer, run, targets, written_at_ms }, entry)
    }

    /// Per target, the oldest drain stamp of the words `run` covers; a target's words with
    /// nothing pending for it any more are unstamped (their writes are all being shipped).
    fn take_written_at(
        &mut self,
        run: &Range<u64>,
        targets: &[Option<u32>; SECONDARIES_MAX],
    ) -> [u32; SECONDARIES_MAX] {
        let words = run.start as usize / 64..=(run.end as usize - 1) / 64;
        let mut oldest = [0; SECONDARIES_MAX];
        for (i, peer) in self.peers.iter_mut().enumerate().filter(|(i, _)| targets[*i].is_some()) {
            oldest[i] =
                peer.written_at_ms[words.clone()].iter().copied().filter(|&t| t > 0).min().unwrap_or(0);
            for word in words.clone() {
                if peer.pending.word(word) == 0 {
                    peer.written_at_ms[word] = 0;
                }
            }
        }
        oldest
    }

    /// An O_DIRECT read of extents `run` of the primary device into pool buffer `buffer`.
    fn read_entry(&self, buffer: u16, run: &Range<u64>) -> squeue::Entry {
        let (offset, len) = self.run_bytes(run);
        assert!(len <= self.pool.data_bytes_max(), "a run fits in one buffer");
        opcode::ReadFixed::new(
            types::Fd(self.device.as_raw_fd()),
            self.pool.data_ptr(buffer),
            len as u32,
            buffer,
        )
        .offset(offset)
        .build()
    }

    /// Sends keepalives on idle connections, and drops those that have gone quiet.
    fn tick_peers(&mut self) {
        let (timeout, keepalive) =
            (Duration::from_millis(self.config.timeout_ms), Duration::from_millis(self.config.keepalive_ms));
        for index in 0..self.peers.len() {
            let Some(conn) = self.peers[index].conn.as_mut() else { continue };
            if conn.last_heard.elapsed() > timeout {
                let reason = format!("no ack or keepalive for {} ms", self.config.timeout_ms);
                self.disconnect(index, &reason);
                continue;
            }
            if let Some(waited) = conn.oldest_sent_wait()
                && waited > timeout * ACK_TIMEOUTS_MAX
            {
                let reason = format!(
                    "a frame sent {} ms ago is still not acknowledged (the secondary's write hangs?)",
                    waited.as_millis()
                );
                self.disconnect(index, &reason);
                continue;
            }
            if conn.queue.is_empty() && conn.last_sent.elapsed() > keepalive {
                conn.queue.push_back(SendJob::Keepalive { sent: 0 });
            }
        }
    }

    /// Starts a send on every connection with queued frames and no send in flight.
    fn start_sends(&mut self) -> Result<(), ShipperError> {
        for index in 0..self.peers.len() {
            let generation = self.peers[index].generation;
            let zero_copy = self.peers[index].zero_copy;
            let Some(conn) = self.peers[index].conn.as_mut() else { continue };
            if !conn.recv_in_flight {
                conn.compact_recv();
                let free = &mut conn.recv[conn.recv_len..];
                let entry = opcode::Recv::new(
                    types::Fd(conn.stream.as_raw_fd()),
                    free.as_mut_ptr(),
                    free.len() as u32,
                )
                .build();
                conn.recv_in_flight = true;
                self.push_op(Op::Recv { peer: index, generation }, entry)?;
            }
            let conn = self.peers[index].conn.as_mut().expect("still connected");
            if conn.sending || self.free_ops.is_empty() {
                continue;
            }
            let fd = types::Fd(conn.stream.as_raw_fd());
            let (entry, buffer) = match conn.queue.front() {
                None => continue,
                Some(SendJob::VerifyRequest { first_extent, count, sent }) => {
                    if *sent == 0 {
                        let mut payload = [0u8; wire::VERIFY_FIXED_BYTES];
                        payload[..8].copy_from_slice(&first_extent.to_le_bytes());
                        payload[8..12].copy_from_slice(&count.to_le_bytes());
                        let header = wire::encode_header(
                            wire::MessageKind::VerifyRequest,
                            self.next_sequence,
                            &[&payload],
                        );
                        conn.verify_frame[..wire::HEADER_BYTES].copy_from_slice(&header);
                        conn.verify_frame[wire::HEADER_BYTES..].copy_from_slice(&payload);
                        self.next_sequence += 1;
                    }
                    let bytes = &conn.verify_frame[*sent..];
                    (opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32).build(), None)
                }
                Some(SendJob::Db { sent }) => {
                    let bytes = &conn.db_frame[*sent..];
                    (opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32).build(), None)
                }
                Some(SendJob::Point { sent }) => {
                    let bytes = &conn.point_frame[*sent..];
                    (opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32).build(), None)
                }
                Some(SendJob::Keepalive { sent }) => {
                    if *sent == 0 {
                        *conn.keepalive =
                            wire::encode_header(wire::MessageKind::Keepalive, self.next_sequence, &[]);
                        self.next_sequence += 1;
                    }
                    let bytes = &conn.keepalive[*sent..];
                    (opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32).build(), None)
                }
                Some(SendJob::Export { .. }) => {
                    // The export frames at the front, up to EXPORT_IOVECS_MAX, in one plain
                    // sendmsg: they are mostly a few KiB, where a copy costs less than a zero-copy
                    // send's page pinning and notification, and one syscall less per frame.
                    let export = self.export.as_ref().expect("an export frame's export");
                    let mut count = 0;
                    for job in conn.queue.iter().take(peer::EXPORT_IOVECS_MAX) {
                        let &SendJob::Export { slot, frame_bytes, sent, .. } = job else { break };
                        conn.export_iovecs[count] = libc::iovec {
                            iov_base: export.frame_ptr(slot, sent).cast_mut().cast(),
                            iov_len: frame_bytes - sent,
                        };
                        count += 1;
                    }
                    // SAFETY: a zeroed msghdr is valid; it points at the connection's iovecs,
                    // which stay put (boxed) and unchanged until this send completes.
                    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                    msg.msg_iov = conn.export_iovecs.as_mut_ptr();
                    msg.msg_iovlen = count;
                    *conn.export_msg = msg;
                    conn.export_sending = count;
                    (opcode::SendMsg::new(fd, &*conn.export_msg).build(), None)
                }
                Some(SendJob::Extent { buffer, frame_bytes, sent, .. }) => {
                    // SAFETY: the frame starts EXTENT_PREFIX_BYTES before the data, in the prefix.
                    let start =
                        unsafe { self.pool.data_ptr(*buffer).sub(wire::EXTENT_PREFIX_BYTES).add(*sent) };
                    let len = (*frame_bytes - *sent) as u32;
                    let entry = if zero_copy {
                        opcode::SendZc::new(fd, start, len)
                            .buf_index(Some(*buffer))
                            .zc_flags(SEND_ZC_REPORT_USAGE)
                            .build()
                    } else {
                        opcode::Send::new(fd, start, len).build()
                    };
                    (entry, Some(*buffer))
                }
            };
            conn.sending = true;
            conn.last_sent = Instant::now();
            let zc = zero_copy && buffer.is_some();
            if let Some(buffer) = buffer
                && zc
            {
                // The send op's own reference, dropped on its notification.
                self.buffer_refs[usize::from(buffer)] += 1;
            }
            self.push_op(
                Op::Send { peer: index, generation, buffer: buffer.filter(|_| zc), notif_pending: false },
                entry,
            )?;
        }
        Ok(())
    }

    fn wait_and_reap(&mut self) -> Result<(), ShipperError> {
        // The policy first: the clock is read only for a sync export.
        let client_waits = self.write_policy() == crate::model::WritePolicy::Sync
            && self.export.as_ref().is_some_and(|e| crate::pool::within_poll_window(e.last_request_at));
        let spun_s =
            self.poll.spin(&mut self.ring, client_waits).map_err(io_error("polling the io_uring"))?;
        if spun_s > 0.0 {
            self.metrics.busy_poll_seconds.inc_by(spun_s);
        }
        let wait = types::Timespec::new().nsec(2_000_000);
        let args = types::SubmitArgs::new().timespec(&wait);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => return Err(io_error("waiting on the io_uring")(e)),
        }
        // Copied out first (handling a completion pushes new entries), into a vector reused
        // across calls and sized with the ring, so the hot path does not allocate.
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        let mut result = Ok(());
        for &(user_data, res, flags) in &completions {
            result = self.complete(user_data as usize, res, flags);
            if result.is_err() {
                break;
            }
        }
        completions.clear();
        self.completions = completions;
        result
    }

    fn complete(&mut self, slot: usize, result: i32, flags: u32) -> Result<(), ShipperError> {
        let op = self.ops[slot].take().expect("a completion for an op in flight");
        match op {
            Op::Read { buffer, run, targets, written_at_ms } => {
                self.free_op(slot);
                self.reads_in_flight -= 1;
                self.complete_read(buffer, run, targets, written_at_ms, result)
            }
            Op::Send { peer, generation, buffer, notif_pending: true } => {
                assert!(
                    cqueue::notif(flags),
                    "the second completion of a zero-copy send is its notification"
                );
                self.free_op(slot);
                let copied = result & NOTIF_USAGE_ZC_COPIED != 0;
                let target = &mut self.peers[peer];
                if copied && target.generation == generation {
                    target.stats.copied_sends += 1;
                    target.metrics.copied_sends.inc();
                }
                if target.generation == generation && target.zero_copy_probe.copied_throughout(copied) {
                    tracing::info!(
                        secondary = %target.name,
                        sends = peer::ZERO_COPY_PROBE_SENDS,
                        "the kernel copied every zero-copy send to this secondary (veth, loopback, or a NIC \
                         without scatter-gather); using plain sends"
                    );
                    target.zero_copy = false;
                }
                self.release_buffer(buffer.expect("zero-copy sends carry a buffer"));
                Ok(())
            }
            Op::Send { peer, generation, buffer, notif_pending: false } => {
                if buffer.is_some() && cqueue::more(flags) {
                    self.ops[slot] = Some(Op::Send { peer, generation, buffer, notif_pending: true });
                } else {
                    self.free_op(slot);
                    if let Some(buffer) = buffer {
                        self.release_buffer(buffer);
                    }
                }
                self.complete_send(peer, generation, buffer.is_some(), result);
                Ok(())
            }
            Op::Recv { peer, generation } => {
                self.free_op(slot);
                self.complete_recv(peer, generation, result);
                Ok(())
            }
            Op::Export { slot: export_slot } => {
                self.free_op(slot);
                self.complete_export(export_slot, result)
            }
            Op::Wake => {
                self.free_op(slot);
                if let Some(export) = self.export.as_mut() {
                    export.wake_armed = false;
                }
                Ok(())
            }
            Op::ExportRecv { conn, generation, direct } => {
                self.free_op(slot);
                self.complete_export_recv(conn, generation, direct, result);
                Ok(())
            }
            Op::VerifyRead { peer, generation, buffer, first_extent, count } => {
                self.free_op(slot);
                self.complete_verify_read(
                    peer,
                    generation,
                    buffer,
                    first_extent..first_extent + u64::from(count),
                    result,
                );
                Ok(())
            }
        }
    }

    fn free_op(&mut self, slot: usize) {
        self.free_ops.push(slot);
    }

    fn release_buffer(&mut self, buffer: u16) {
        let refs = &mut self.buffer_refs[usize::from(buffer)];
        assert!(*refs > 0, "buffer {buffer} released more often than referenced");
        *refs -= 1;
        if *refs == 0 {
            self.pool.give_back(buffer);
        }
    }

    fn complete_read(
        &mut self,
        buffer: u16,
        run: Range<u64>,
        targets: [Option<u32>; SECONDARIES_MAX],
        written_at_ms: [u32; SECONDARIES_MAX],
        result: i32,
    ) -> Result<(), ShipperError> {
        self.reading[run.start as usize..run.end as usize].fill(false);
        let (offset, len) = self.run_bytes(&run);
        let mut live = [false; SECONDARIES_MAX];
        for (i, peer) in self.peers.iter().enumerate() {
            live[i] = targets[i].is_some_and(|g| g == peer.generation && peer.conn.is_some());
        }
        let live_count = live.iter().filter(|&&l| l).count();
        // Targets that disconnected meanwhile get the run back; so do all on a failed read, and
        // on a read an export write overtook (its data may be older than the client's).
        let read_ok = result as i64 == len as i64;
        let usable = read_ok && !self.take_stale(&run);
        for (i, peer) in self.peers.iter_mut().enumerate() {
            if targets[i].is_some() && (!usable || !live[i]) && !peer.removed {
                peer.pending.insert_range(run.start as usize..run.end as usize);
            }
            if !usable && live[i] {
                peer.conn.as_mut().expect("live targets are connected").backlog_bytes -= len as u64;
            }
        }
        if !usable {
            if !read_ok {
                tracing::error!(device = %self.config.device.display(), offset, len, result, "read from the primary failed; will retry");
            }
            self.pool.give_back(buffer);
            return Ok(());
        }
        if live_count == 0 {
            self.pool.give_back(buffer);
            return Ok(());
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let prefix = wire::encode_extent_prefix(sequence, offset, self.pool.data(buffer, len));
        self.pool.prefix_tail_mut(buffer, wire::EXTENT_PREFIX_BYTES).copy_from_slice(&prefix);
        let frame_bytes = wire::EXTENT_PREFIX_BYTES + len;
        assert_eq!(self.buffer_refs[usize::from(buffer)], 0);
        self.buffer_refs[usize::from(buffer)] = live_count as u16;
        let now = Instant::now();
        let started = self.started;
        let written_at = |i: usize| match written_at_ms[i] {
            0 => now,
            ms => started + Duration::from_millis(u64::from(ms)),
        };
        for i in (0..self.peers.len()).filter(|&i| live[i]) {
            let conn = self.peers[i].conn.as_mut().expect("live targets are connected");
            conn.queue.push_back(SendJob::Extent { buffer, frame_bytes, sent: 0, sequence });
            // The bytes were reserved in the backlog when the read was scheduled.
            conn.inflight.insert(
                sequence,
                InFlight {
                    run: run.clone(),
                    bytes: len as u64,
                    queued_at: now,
                    written_at: written_at(i),
                    sent_at: None,
                },
            );
            self.peers[i].frame_queued();
        }
        Ok(())
    }

    fn complete_send(&mut self, index: usize, generation: u32, zero_copy: bool, result: i32) {
        let peer = &mut self.peers[index];
        if peer.generation != generation {
            self.retired_op_done(index, generation, false);
            return;
        }
        if zero_copy && (result == -libc::EOPNOTSUPP || result == -libc::EINVAL) {
            tracing::warn!(secondary = %peer.name, "zero-copy send not supported on this socket; using plain send");
            peer.zero_copy = false;
            peer.conn.as_mut().expect("same generation is connected").sending = false;
            return;
        }
        if result < 0 {
            // This send is over: the dropped connection waits for nothing but its receive.
            peer.conn.as_mut().expect("same generation is connected").sending = false;
            let reason = format!("send failed: {}", std::io::Error::from_raw_os_error(-result));
            self.disconnect(index, &reason);
            return;
        }
        let conn = peer.conn.as_mut().expect("same generation is connected");
        conn.sending = false;
        if matches!(conn.queue.front(), Some(SendJob::Export { .. })) {
            peer.stats.plain_sends += 1;
            self.complete_export_sends(index, result as usize);
            return;
        }
        let job = conn.queue.front_mut().expect("a send completes the front job");
        let finished = match job {
            SendJob::Keepalive { sent } => {
                *sent += result as usize;
                *sent == wire::HEADER_BYTES
            }
            SendJob::VerifyRequest { sent, .. } => {
                *sent += result as usize;
                *sent == wire::HEADER_BYTES + wire::VERIFY_FIXED_BYTES
            }
            SendJob::Db { sent } => {
                *sent += result as usize;
                *sent == conn.db_frame.len()
            }
            SendJob::Point { sent } => {
                *sent += result as usize;
                *sent == wire::HEADER_BYTES + wire::POINT_PAYLOAD_BYTES
            }
            SendJob::Extent { frame_bytes, sent, .. } => {
                *sent += result as usize;
                *sent == *frame_bytes
            }
            SendJob::Export { .. } => unreachable!("export sends complete in complete_export_sends"),
        };
        if zero_copy {
            peer.stats.zero_copy_sends += 1;
            peer.metrics.zero_copy_sends.inc();
        } else {
            peer.stats.plain_sends += 1;
        }
        if finished {
            let job = conn.queue.pop_front().expect("front job");
            if let SendJob::Extent { buffer, frame_bytes, sequence, .. } = job {
                if let Some(frame) = conn.inflight.get_mut(&sequence) {
                    frame.sent_at = Some(Instant::now());
                }
                let bytes = (frame_bytes - wire::EXTENT_PREFIX_BYTES) as u64;
                let extents = bytes.div_ceil(self.config.extent_bytes.get());
                peer.stats.shipped_bytes += bytes;
                peer.stats.shipped_extents += extents;
                peer.metrics.shipped_bytes.inc_by(bytes);
                peer.metrics.shipped_extents.inc_by(extents);
                if peer.log.fractured() {
                    peer.stats.resync_bytes += bytes;
                    peer.log.resync_bytes_done += bytes;
                    peer.metrics.resync_bytes.inc_by(bytes);
                }
                self.release_buffer(buffer);
            }
        }
    }

    /// A sendmsg of the export frames at the queue's front sent `sent_bytes`: the frames it
    /// finished leave the queue (their slots learn it), a partly sent one stays at the front.
    fn complete_export_sends(&mut self, index: usize, mut sent_bytes: usize) {
        let mut finished = [0u32; peer::EXPORT_IOVECS_MAX];
        let mut finished_count = 0;
        let peer = &mut self.peers[index];
        let conn = peer.conn.as_mut().expect("a send completed on this connection");
        conn.export_sending = 0;
        while sent_bytes > 0 {
            let Some(SendJob::Export { frame_bytes, sent, .. }) = conn.queue.front_mut() else {
                unreachable!("a sendmsg of export frames sent more than those frames")
            };
            let take = sent_bytes.min(*frame_bytes - *sent);
            *sent += take;
            sent_bytes -= take;
            if *sent < *frame_bytes {
                break;
            }
            let Some(SendJob::Export { slot, sequence, .. }) = conn.queue.pop_front() else { unreachable!() };
            if let Some(frame) = conn.inflight.get_mut(&sequence) {
                frame.sent_at = Some(Instant::now());
                peer.stats.shipped_bytes += frame.bytes;
                peer.metrics.shipped_bytes.inc_by(frame.bytes);
            }
            finished[finished_count] = slot;
            finished_count += 1;
        }
        for &slot in &finished[..finished_count] {
            self.export_send_done(slot);
        }
    }

    fn complete_recv(&mut self, index: usize, generation: u32, result: i32) {
        let peer = &mut self.peers[index];
        if peer.generation != generation {
            self.retired_op_done(index, generation, true);
            return;
        }
        let conn = peer.conn.as_mut().expect("same generation is connected");
        conn.recv_in_flight = false;
        if result <= 0 {
            let reason = if result == 0 {
                "secondary closed the connection".to_owned()
            } else {
                format!("receive failed: {}", std::io::Error::from_raw_os_error(-result))
            };
            self.disconnect(index, &reason);
            return;
        }
        conn.recv_len += result as usize;
        conn.last_heard = Instant::now();
        let received = conn.parse_received(
            &self.limits,
            &mut peer.stats,
            peer.log.verify.as_mut(),
            &mut peer.pending,
            &mut peer.latency,
        );
        let received = match received {
            Ok(received) => received,
            Err(reason) => {
                self.disconnect(index, &reason);
                return;
            }
        };
        if received.divergent_extents > 0 {
            tracing::warn!(
                secondary = %peer.name,
                extents = received.divergent_extents,
                "former primary failing back: the extents it wrote that this primary may lack are shipped back"
            );
            self.fracture(index, "failing back from primary");
        }
        self.compare_verify(index);
    }

    /// Drops a connection: everything sent and not acknowledged, or still queued, goes back to
    /// the peer's pending extents, and its connector is asked for a new connection.
    fn disconnect(&mut self, index: usize, reason: &str) {
        let peer = &mut self.peers[index];
        let Some(mut conn) = peer.conn.take() else { return };
        let generation = peer.generation;
        tracing::warn!(secondary = %peer.name, addr = %peer.addr, %reason, unacked_frames = conn.inflight.len(), "secondary disconnected");
        if let Some(export) = self.export.as_mut() {
            // Acks that came in the same recv or batch as the failure still count.
            export.credit_acks(index, generation, &conn.inflight);
        }
        let peer = &mut self.peers[index];
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
        // Export frames in the sendmsg still in the ring keep their slots (and buffers) until it
        // completes; the rest are done now.
        let mut in_send = if conn.sending { conn.export_sending } else { 0 };
        let mut sending_slots = Vec::new();
        for job in std::mem::take(&mut conn.queue) {
            match job {
                SendJob::Extent { buffer, .. } => self.release_buffer(buffer),
                SendJob::Export { slot, .. } if in_send > 0 => {
                    in_send -= 1;
                    sending_slots.push(slot);
                }
                SendJob::Export { slot, .. } => self.export_send_done(slot),
                _ => {}
            }
        }
        if conn.recv_in_flight || conn.sending {
            // Its receive buffer and frames stay allocated until those ops complete: the kernel
            // may still copy into them (with DEFER_TASKRUN, even after the shutdown above).
            self.retired.push(Retired { peer: index, generation, conn, sending_slots });
        }
        self.fracture(index, reason);
        self.peers[index].last_error = reason.to_owned();
        if reason.contains("write of") {
            self.peers[index].metrics.write_errors.inc();
        }
        if reason.contains("split brain") && self.split_brain.is_none() {
            tracing::error!(secondary = %self.peers[index].name, %reason, "SPLIT BRAIN: nothing is overwritten; the mirror needs attention");
            self.split_brain = Some((index, reason.to_owned()));
        }
        if !self.peers[index].log.held
            && let Some(want) = &self.peers[index].want_connection
        {
            let _ = want.send(connector::Want::Reconnect);
        }
    }

    /// A receive (`recv`) or send of a dropped connection completed; the connection is freed
    /// once neither is in the ring any more.
    fn retired_op_done(&mut self, peer: usize, generation: u32, recv: bool) {
        let Some(at) = self.retired.iter().position(|r| r.peer == peer && r.generation == generation) else {
            return;
        };
        let retired = &mut self.retired[at];
        if recv {
            retired.conn.recv_in_flight = false;
        } else {
            retired.conn.sending = false;
            for slot in std::mem::take(&mut retired.sending_slots) {
                self.export_send_done(slot);
            }
        }
        let conn = &self.retired[at].conn;
        if !conn.recv_in_flight && !conn.sending {
            self.retired.swap_remove(at);
        }
    }

    /// Marks a secondary fractured: from now on its missed extents live in its fracture log,
    /// which is persisted before this loop turn ends.
    fn fracture(&mut self, index: usize, reason: &str) {
        let peer = &mut self.peers[index];
        if peer.log.flags & logs::FLAG_FRACTURED == 0 {
            tracing::warn!(secondary = %peer.name, %reason, "secondary fractured: the extents it misses are kept in its fracture log");
            peer.metrics.fractures.inc();
        }
        peer.log.fracture();
    }

    /// Nothing in flight and nothing pending for any connected secondary.
    fn quiescent(&self) -> bool {
        self.reads_in_flight == 0
            && self.export.as_ref().is_none_or(|e| e.idle())
            && self.peers.iter().all(|p| {
                p.conn.as_ref().is_none_or(|c| c.inflight.is_empty() && c.queue.is_empty() && !c.sending)
                    && (p.conn.is_none() || p.pending.not_any())
            })
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .filter(|p| !p.removed)
            .map(|p| (p, out_of_sync_bytes(p, self.config.extent_bytes.get(), self.device_bytes)))
            .map(|(p, out_of_sync_bytes)| PeerStatus {
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
            })
            .collect()
    }

    fn status_json(&mut self) -> serde_json::Value {
        serde_json::json!({
            "device": self.config.device.display().to_string(),
            "mirror_id": self.config.mirror_id,
            "extent_bytes": self.config.extent_bytes.get(),
            "image_bytes": self.device_bytes,
            "intent_log_extents": self.persisted_intent.as_ref().map_or(0, |i| i.count_ones()),
            "mirror": self.mirror,
            "secondaries": self.status(),
            "export": self.config.export.as_ref().map(|e| e.target.to_string()),
            "write_policy": self.write_policy(),
            "tracker": self.tracker.counters(),
        })
    }

    /// Brings the mirror database up to date with the images' states and applies the state
    /// rules; a transition is logged with its cause, counted, and the database saved.
    fn refresh_mirror(&mut self) {
        for peer in self.peers.iter_mut().filter(|p| !p.removed) {
            let state = image_state(peer);
            if peer.reported_state != Some(state) {
                let cause = transition_cause(peer, state);
                tracing::info!(secondary = %peer.name, from = ?peer.reported_state, to = ?state, %cause, "image state changed");
                let label = crate::metrics::ImageStateLabel {
                    secondary: peer.name.clone(),
                    state: state.as_str().into(),
                };
                self.metrics.image_transitions.get_or_create(&label).inc();
                self.metrics.set_image_state(&peer.name, state.as_str());
                peer.reported_state = Some(state);
            }
        }
        let Some(mut db) = self.mirror.take() else { return };
        let mut changed = false;
        let generation = db.generation;
        for peer in self.peers.iter().filter(|p| !p.removed) {
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
        if let Some((index, _)) = &self.split_brain {
            let peer = &self.peers[*index];
            let accepted = peer.conn.as_ref().is_some_and(|c| c.db_sequence.is_some() && !c.db_in_flight());
            if accepted || peer.removed {
                tracing::info!(secondary = %peer.name, "split brain resolved: the secondary took this primary's database");
                self.split_brain = None;
            }
        }
        let (state, cause) = match &self.split_brain {
            Some((_, reason)) => (crate::model::MirrorState::Attention, reason.clone()),
            None => db.evaluate(),
        };
        if state != db.state || cause != db.state_cause {
            if state != db.state {
                if state == crate::model::MirrorState::Attention {
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
        // states go into it when the change takes effect (`apply_change`), not over it now.
        let committing = self.change.as_ref().is_some_and(|c| c.committing());
        if changed
            && !committing
            && let Err(error) = db.store(&self.config.state_dir)
        {
            tracing::error!(%error, "saving the mirror database failed");
            self.metrics.log_write_errors.inc();
        }
        self.mirror = Some(db);
        if changed && self.change.is_none() {
            // Secondaries learn their own state (what `promote` checks) as it changes.
            let connected: Vec<usize> = (0..self.peers.len())
                .filter(|&i| !self.peers[i].removed && self.peers[i].conn.is_some())
                .collect();
            self.send_mirror_db(connected);
        }
    }

    fn update_status(&mut self) {
        for index in 0..self.peers.len() {
            let peer = &self.peers[index];
            let in_sync = peer.conn.as_ref().is_some_and(|c| c.inflight.is_empty() && c.queue.is_empty())
                // A write queued and not yet drained as completed (O(1), fresh every turn).
                && !self.tracker.awaiting_completion()
                && peer.pending.not_any()
                && !self.reads_target(index);
            let peer = &mut self.peers[index];
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
        self.resend_stale_dbs();
        if self.last_status.elapsed() < Duration::from_millis(STATUS_INTERVAL_MS) {
            return;
        }
        let now = Instant::now();
        self.last_status = now;
        for peer in &mut self.peers {
            // Every status interval, not every turn: a sample spans RATE_SAMPLE_MS anyway.
            let connected = peer.conn.is_some();
            peer.log.sample_rate(now, connected);
            let bytes = out_of_sync_bytes(peer, self.config.extent_bytes.get(), self.device_bytes);
            peer.metrics.out_of_sync_bytes.set(bytes.min(i64::MAX as u64) as i64);
            peer.metrics.lag.merge_from(&mut peer.latency.lag_us);
            peer.metrics.ack_rtt.merge_from(&mut peer.latency.rtt_us);
        }
        self.metrics.checkpoint_duration.merge_from(&mut self.checkpoint_us);
        let counters = self.tracker.counters();
        self.metrics.tracker_events.inc_by(counters.events_seen.saturating_sub(self.tracker_seen.0));
        self.metrics.tracker_write_events.inc_by(counters.write_events.saturating_sub(self.tracker_seen.1));
        self.tracker_seen = (counters.events_seen, counters.write_events);
        self.metrics.unmatched_writes.inc_by(counters.unmatched_writes.saturating_sub(self.unmatched_seen));
        self.unmatched_seen = counters.unmatched_writes;
        self.refresh_mirror();
        let status = self.status_json();
        let path = self.config.state_dir.join("status.json");
        let temp = self.config.state_dir.join("status.json.tmp");
        let written = std::fs::write(&temp, status.to_string()).and_then(|()| std::fs::rename(&temp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "writing the status file failed");
        }
    }

    fn shutdown(mut self) -> Result<(), ShipperError> {
        self.stop_connectors.store(true, Ordering::Relaxed);
        if let Some(export) = &self.export {
            // Its Wake op completes; requests not taken yet fail back to their clients.
            export.wake();
            self.tracker.exempt_writes_of(0);
        }
        // Every export connection stops reading, so its recv op completes.
        self.pump_export_connections(true)?;
        // The last checkpoint, while the connections are still up: a secondary in sync now is
        // recorded as such.
        self.persist_fracture_logs();
        self.checkpoint();
        for index in 0..self.peers.len() {
            if let Some(conn) = self.peers[index].conn.as_ref() {
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        // Reap until every op is done, so no buffer is in the kernel's hands when the pool goes.
        let deadline = Instant::now() + Duration::from_millis(self.config.timeout_ms);
        while self.free_ops.len() < self.ops.len() && Instant::now() < deadline {
            self.wait_and_reap()?;
        }
        let Engine { ring, pool, tracker, export, .. } = self;
        drop(ring);
        drop(pool);
        drop(export);
        // The tracker stays pinned and marking: writes made while no primary runs are found by
        // the next one. `replicator untrack` removes it.
        tracing::info!(pin_dir = %tracker.pin_dir().display(), "primary stopped; the tracker stays attached");
        drop(tracker);
        Ok(())
    }
}

/// The logs: checkpoints, fracture-log persistence, verify, and operator requests.
impl Engine {
    /// Whether an export op's primary part on `extent` is in flight (no read may start there).
    fn export_busy(&self, extent: usize) -> bool {
        self.export.as_ref().is_some_and(|e| e.busy[extent])
    }

    /// Whether an export op started on `run` while its read was in flight; clears the mark.
    fn take_stale(&mut self, run: &Range<u64>) -> bool {
        let Some(export) = self.export.as_mut() else { return false };
        let stale = &mut export.stale[run.start as usize..run.end as usize];
        let any = stale.any();
        stale.fill(false);
        any
    }

    /// Whether a read in flight will queue a frame for peer `index`.
    fn reads_target(&self, index: usize) -> bool {
        self.reads_in_flight > 0
            && self
                .ops
                .iter()
                .flatten()
                .any(|op| matches!(op, Op::Read { targets, .. } if targets[index].is_some()))
    }

    /// Every extent peer `index` may lack: pending, being read for it, or sent and unacked.
    fn dirty_into(&self, index: usize, out: &mut BitVec<u64, Lsb0>) {
        let peer = &self.peers[index];
        out.clear();
        out.extend_from_bitslice(peer.pending.bits());
        if let Some(conn) = &peer.conn {
            for frame in conn.inflight.values() {
                out[frame.run.start as usize..frame.run.end as usize].fill(true);
            }
        }
        for op in self.ops.iter().flatten() {
            if let Op::Read { run, targets, .. } = op
                && targets[index].is_some()
            {
                out[run.start as usize..run.end as usize].fill(true);
            }
        }
        if let Some(export) = &self.export {
            export.dirty_into(out);
        }
    }

    /// What this mirror's logs are checked against when read back.
    fn log_identity(&self, kind: LogKind, secondary_id: u64) -> LogIdentity {
        LogIdentity {
            kind,
            mirror_id: self.config.mirror_id,
            secondary_id,
            extent_bytes: self.config.extent_bytes,
            image_bytes: self.device_bytes,
        }
    }

    /// The mirror's generation (1 for a mirror given on the command line).
    fn generation(&self) -> u64 {
        self.mirror.as_ref().map_or(1, |db| db.generation)
    }

    /// Persists the fracture logs of the secondaries fractured (or restored) this turn.
    fn persist_fracture_logs(&mut self) {
        for index in 0..self.peers.len() {
            if self.peers[index].log.persist_now && !self.peers[index].removed {
                self.persist_peer(index);
            }
        }
    }

    /// Writes peer `index`'s fracture log if it changed: its dirty extents while fractured, an
    /// empty log otherwise (the intent log covers an unfractured secondary). Returns whether
    /// the file on disk now holds them.
    fn persist_peer(&mut self, index: usize) -> bool {
        let mut dirty = std::mem::take(&mut self.scratch_dirty);
        if self.peers[index].log.fractured() {
            self.dirty_into(index, &mut dirty);
        } else {
            dirty.clear();
            dirty.resize(self.reading.len(), false);
        }
        let identity = self.log_identity(LogKind::Fracture, self.peers[index].log.secondary_id);
        let generation = self.generation();
        let peer = &mut self.peers[index];
        peer.log.persist_now = false;
        peer.metrics.fracture_log_extents.set(dirty.count_ones() as i64);
        let verify_next_extent = peer.log.verify.as_ref().map_or(0, |v| v.next_extent);
        let unchanged = peer.log.persisted.as_ref().is_some_and(|(flags, next, bits)| {
            *flags == peer.log.flags && *next == verify_next_extent && *bits == dirty
        });
        let mut on_disk = true;
        if !unchanged {
            let header = LogHeader {
                flags: peer.log.flags,
                sequence: self.checkpoint_sequence,
                resync_bytes_done: peer.log.resync_bytes_done,
                verify_next_extent,
                resync_rate_bytes_per_s: peer.log.resync_rate_bytes_per_s as u64,
                ..LogHeader::new(&identity, generation)
            };
            let bytes = logs::encode(&header, &dirty);
            match crate::envelope::replace_file(&self.config.state_dir, &peer.log.file_name, &bytes) {
                Ok(()) => peer.log.persisted = Some((peer.log.flags, verify_next_extent, dirty.clone())),
                Err(error) => {
                    tracing::error!(secondary = %peer.name, %error, "persisting the fracture log failed; its extents stay in the intent log");
                    self.metrics.log_write_errors.inc();
                    peer.log.persisted = None;
                    on_disk = false;
                }
            }
        }
        self.scratch_dirty = dirty;
        on_disk
    }

    /// A checkpoint: fracture logs of fractured secondaries first, then the extents that have
    /// been clean on every other secondary for a while leave the intent log, which is saved.
    /// The order matters: an extent leaves the intent log only once every secondary that may
    /// lack it has it in a fracture log on disk.
    fn checkpoint(&mut self) {
        let started = Instant::now();
        self.last_checkpoint = started;
        self.checkpoint_sequence += 1;
        self.drain_tracker();
        let mut dirty = BitVec::new();
        for index in 0..self.peers.len() {
            if self.peers[index].removed {
                continue;
            }
            let persisted = self.peers[index].log.fractured() && self.persist_peer(index);
            if !persisted {
                self.dirty_into(index, &mut dirty);
                self.quiet.note_dirty(&dirty);
            }
        }
        // A write queued and not yet completed (or whose completion the kernel did not trace,
        // reported after UNMATCHED_AFTER) keeps its extent in the intent log, even when the
        // extent's intent bit was set long before: clearing it now would leave that write in no
        // log if the replicator died before shipping it.
        for run in self.tracker.awaiting_runs() {
            self.quiet.note_dirty_run(run.start as usize..run.end as usize);
        }
        let mut intent = std::mem::take(&mut self.scratch_intent);
        let mut clearable = std::mem::take(&mut self.scratch_clearable);
        self.tracker.intent_into(&mut intent);
        self.quiet.end_interval(&mut intent, self.persisted_intent.as_ref(), &mut clearable);
        self.tracker.clear_intent(&clearable);
        if self.persisted_intent.as_ref() != Some(&intent) {
            let identity = self.log_identity(LogKind::Intent, 0);
            let header = LogHeader {
                sequence: self.checkpoint_sequence,
                ..LogHeader::new(&identity, self.generation())
            };
            let bytes = logs::encode(&header, &intent);
            match crate::envelope::replace_file(&self.config.state_dir, logs::INTENT_LOG_FILE, &bytes) {
                Ok(()) => self.persisted_intent = Some(intent.clone()),
                Err(error) => {
                    tracing::error!(%error, "persisting the write-intent log failed");
                    self.metrics.log_write_errors.inc();
                    self.persisted_intent = None;
                }
            }
        }
        self.metrics.intent_log_extents.set(intent.count_ones() as i64);
        self.metrics.checkpoints.inc();
        self.scratch_intent = intent;
        self.scratch_clearable = clearable;
        let elapsed_us = started.elapsed().as_micros().clamp(1, 3_600_000_000) as u64;
        let _ = self.checkpoint_us.record(elapsed_us);
        tracing::trace!(elapsed_us, "checkpoint");
    }

    /// Starts the next verify batch of every verifying, connected secondary: the request goes
    /// down its connection (behind the frames already queued) while the primary reads the same
    /// extents to hash them.
    fn schedule_verify(&mut self) -> Result<(), ShipperError> {
        let extents = self.reading.len() as u64;
        let batch_max = (self.config.run_bytes_max as u64 / self.config.extent_bytes.get())
            .min(u64::from(wire::VERIFY_EXTENTS_MAX))
            .max(1);
        let peer_count = self.peers.len();
        for index in 0..peer_count {
            let peer = &mut self.peers[index];
            let Some(verify) = peer.log.verify.as_mut() else { continue };
            if verify.batch.is_some() {
                continue;
            }
            if verify.next_extent >= extents {
                tracing::info!(
                    secondary = %peer.name,
                    differing_extents = verify.differing_extents,
                    seconds = verify.started.elapsed().as_secs_f64(),
                    "verify finished"
                );
                peer.log.verify = None;
                peer.log.flags &= !logs::FLAG_VERIFY;
                peer.log.persist_now = true;
                continue;
            }
            let Some(conn) = peer.conn.as_mut() else { continue };
            if self.pool.free_count() == 0
                || self.free_ops.len() < 2 + peer_count
                || !peer.log.throttle.allows()
                || conn.queue.len() >= usize::from(self.config.buffers)
            {
                continue;
            }
            let first_extent = verify.next_extent;
            let count = batch_max.min(extents - first_extent) as u32;
            verify.batch = Some(VerifyBatch {
                first_extent,
                count,
                local_ready: false,
                remote_ready: false,
                local_failed: false,
            });
            conn.queue.push_back(SendJob::VerifyRequest { first_extent, count, sent: 0 });
            peer.log.throttle.take(u64::from(count) * self.config.extent_bytes.get());
            let generation = peer.generation;
            let buffer = self.pool.take().expect("checked a free buffer");
            let entry = self.read_entry(buffer, &(first_extent..first_extent + u64::from(count)));
            self.push_op(Op::VerifyRead { peer: index, generation, buffer, first_extent, count }, entry)?;
        }
        Ok(())
    }

    /// The primary's side of a verify batch has been read: hash it.
    fn complete_verify_read(
        &mut self,
        index: usize,
        generation: u32,
        buffer: u16,
        run: Range<u64>,
        result: i32,
    ) {
        let (offset, len) = self.run_bytes(&run);
        let extent_bytes = self.config.extent_bytes.get() as usize;
        let peer = &mut self.peers[index];
        let current = peer.generation == generation;
        if let Some(verify) = peer.log.verify.as_mut().filter(|_| current)
            && let Some(batch) = verify.batch.as_mut().filter(|b| b.first_extent == run.start)
        {
            if result as i64 == len as i64 {
                let data = self.pool.data(buffer, len);
                for (slot, extent) in verify.local.iter_mut().zip(data.chunks(extent_bytes)) {
                    *slot = xxhash_rust::xxh3::xxh3_128(extent);
                }
            } else {
                tracing::error!(device = %self.config.device.display(), offset, len, result, "verify read from the primary failed; those extents will be shipped");
                batch.local_failed = true;
            }
            batch.local_ready = true;
        }
        self.pool.give_back(buffer);
        self.compare_verify(index);
    }

    /// Once both sides of a verify batch are in, the differing extents become pending.
    fn compare_verify(&mut self, index: usize) {
        let peer = &mut self.peers[index];
        let Some(verify) = peer.log.verify.as_mut() else { return };
        if let Some(differing) = verify.compare(&mut peer.pending)
            && differing > 0
        {
            peer.metrics.verify_differing_extents.inc_by(differing);
        }
    }

    fn handle_control(&mut self) {
        while let Ok(call) = self.control.try_recv() {
            tracing::info!(request = ?call.request, "operator request");
            match call.request {
                Request::ConsistencyPoint { timeout_ms } => {
                    self.start_point(timeout_ms, call.reply);
                    continue;
                }
                Request::AddSecondary { name, address, synchronized } => {
                    self.add_secondary(&name, address, synchronized, call.reply);
                    continue;
                }
                Request::RemoveSecondary { name, force } => {
                    self.remove_secondary(&name, force, call.reply);
                    continue;
                }
                Request::Activate => {
                    self.set_activation(true, false, call.reply);
                    continue;
                }
                Request::Deactivate { force } => {
                    self.set_activation(false, force, call.reply);
                    continue;
                }
                Request::Set { secondary, key, value } => {
                    match secondary.as_deref().map(|s| self.peer_index(s)).transpose() {
                        Ok(index) => self.set_setting(index, &key, &value, call.reply),
                        Err(error) => {
                            let _ = call.reply.send(Err(error));
                        }
                    }
                    continue;
                }
                _ => {}
            }
            let reply = self.apply(call.request);
            if let Err(error) = &reply {
                tracing::warn!(%error, "operator request refused");
            }
            let _ = call.reply.send(reply);
        }
    }

    fn peer_index(&self, name: &str) -> Result<usize, String> {
        self.peers.iter().position(|p| p.name == name && !p.removed).ok_or_else(|| {
            let names: Vec<&str> =
                self.peers.iter().filter(|p| !p.removed).map(|p| p.name.as_str()).collect();
            format!("no secondary named {name:?}; this primary has {}", names.join(", "))
        })
    }

    fn apply(&mut self, request: Request) -> control::Reply {
        let index = match &request {
            Request::Status
            | Request::Set { .. }
            | Request::ConsistencyPoint { .. }
            | Request::AddSecondary { .. }
            | Request::RemoveSecondary { .. }
            | Request::Activate
            | Request::Deactivate { .. } => None,
            Request::Fracture { secondary }
            | Request::Restore { secondary }
            | Request::Verify { secondary }
            | Request::Sync { secondary } => Some(self.peer_index(secondary)?),
        };
        match request {
            Request::Status => return Ok(self.status_json()),
            Request::Fracture { secondary } => {
                let i = index.expect("named");
                if self.peers[i].log.admin_fractured() {
                    return Err(format!(
                        "{secondary} is already fractured; `restore {secondary}` brings it back"
                    ));
                }
                tracing::warn!(%secondary, "fractured by the administrator: the extents it misses are kept in its fracture log until restore");
                self.peers[i].metrics.fractures.inc();
                self.peers[i].log.admin_fracture();
                self.disconnect(i, "fractured by the administrator");
                self.persist_peer(i);
            }
            Request::Restore { secondary } => {
                let i = index.expect("named");
                let peer = &mut self.peers[i];
                if !peer.log.held {
                    return Err(format!("{secondary} is not fractured and held; nothing to restore"));
                }
                peer.log.restore();
                if peer.conn.is_none()
                    && let Some(want) = &peer.want_connection
                {
                    let _ = want.send(connector::Want::Now);
                }
                self.persist_peer(i);
            }
            Request::Verify { secondary } => {
                let i = index.expect("named");
                let log = &mut self.peers[i].log;
                if log.full_sync() {
                    return Err(format!("{secondary} is in a full sync; a verify would not shorten it"));
                }
                if log.verify.is_some() {
                    return Err(format!("{secondary} is already being verified"));
                }
                log.start_verify(0);
                self.persist_peer(i);
            }
            Request::Sync { secondary: _ } => {
                let i = index.expect("named");
                let peer = &mut self.peers[i];
                peer.pending.insert_all();
                peer.log.fall_behind();
                peer.log.verify = None;
                peer.log.flags = (peer.log.flags & !logs::FLAG_VERIFY) | logs::FLAG_FULL_SYNC;
                peer.log.throttled = true;
                peer.log.persist_now = true;
                self.persist_peer(i);
            }
            Request::Set { .. }
            | Request::ConsistencyPoint { .. }
            | Request::AddSecondary { .. }
            | Request::RemoveSecondary { .. }
            | Request::Activate
            | Request::Deactivate { .. } => unreachable!("handled in handle_control"),
        }
        Ok(serde_json::to_value(self.status()).expect("status serializes"))
    }

    /// A consistency point: its targets are the secondaries SYNCHRONIZED now, or when there is
    /// none, the connected ones catching up (a burst of writes put them behind their backlog
    /// limit a moment ago: with the application quiesced they catch up, and the point is
    /// recorded once they have everything, as on a SYNCHRONIZED one). It is answered by
    /// `advance_points` once each target has recorded it, or fails (at the timeout).
    fn start_point(&mut self, timeout_ms: u64, reply: std::sync::mpsc::Sender<control::Reply>) {
        let mut targets = [None; SECONDARIES_MAX];
        for state in [ImageState::Synchronized, ImageState::Synchronizing] {
            for (i, peer) in self.peers.iter().enumerate() {
                if image_state(peer) == state && peer.conn.is_some() && !peer.removed {
                    targets[i] = Some(PointTarget { generation: peer.generation, sequence: None });
                }
            }
            if targets.iter().any(Option::is_some) {
                break;
            }
        }
        let refusal = if targets.iter().all(Option::is_none) {
            Some("no SYNCHRONIZED secondary (nor a connected one catching up) to record a consistency point on".to_owned())
        } else if self.points.len() >= POINTS_MAX {
            Some("a consistency point is already being taken; try again when it finishes".to_owned())
        } else {
            None
        };
        if let Some(refusal) = refusal {
            let _ = reply.send(Err(refusal));
            return;
        }
        let timeout = Duration::from_millis(timeout_ms.min(control::CONSISTENCY_TIMEOUT_MS_MAX));
        self.points.push(PendingPoint {
            reply,
            deadline: Instant::now() + timeout,
            point_unix_ms: 0,
            targets,
        });
    }

    /// Moves every waiting consistency point on: once a target has acknowledged everything
    /// (it is in sync), the point frame is queued to it; once every target acknowledged its
    /// point frame (recorded durably), the operator gets the answer.
    fn advance_points(&mut self) {
        let mut index = 0;
        while index < self.points.len() {
            match self.advance_point(index) {
                None => index += 1,
                Some(answer) => {
                    let point = self.points.swap_remove(index);
                    if let Err(error) = &answer {
                        tracing::warn!(%error, "consistency point failed");
                    }
                    let _ = point.reply.send(answer);
                }
            }
        }
    }

    fn advance_point(&mut self, index: usize) -> Option<control::Reply> {
        let now_ms = logs::unix_ms_now();
        let mirror_generation = self.generation();
        let mut done = true;
        for peer_index in 0..self.peers.len() {
            let Some(target) = self.points[index].targets[peer_index] else { continue };
            let peer = &mut self.peers[peer_index];
            let Some(conn) = peer.conn.as_mut().filter(|_| peer.generation == target.generation) else {
                return Some(Err(format!("secondary {} disconnected before recording the point", peer.name)));
            };
            match target.sequence {
                None if peer.in_sync => {
                    if self.points[index].point_unix_ms == 0 {
                        self.points[index].point_unix_ms = now_ms;
                    }
                    let point_unix_ms = self.points[index].point_unix_ms;
                    let sequence = self.next_sequence;
                    self.next_sequence += 1;
                    let mut payload = [0u8; 16];
                    payload[..8].copy_from_slice(&mirror_generation.to_le_bytes());
                    payload[8..].copy_from_slice(&point_unix_ms.to_le_bytes());
                    let header =
                        wire::encode_header(wire::MessageKind::ConsistencyPoint, sequence, &[&payload]);
                    conn.point_frame[..wire::HEADER_BYTES].copy_from_slice(&header);
                    conn.point_frame[wire::HEADER_BYTES..].copy_from_slice(&payload);
                    conn.queue.push_back(SendJob::Point { sent: 0 });
                    conn.inflight.insert(sequence, InFlight::control());
                    peer.written_since_point_frame = false;
                    self.points[index].targets[peer_index] =
                        Some(PointTarget { generation: target.generation, sequence: Some(sequence) });
                    done = false;
                }
                None => done = false,
                Some(sequence) if conn.inflight.contains_key(&sequence) => done = false,
                Some(_) => {
                    peer.consistency_point_unix_ms = self.points[index].point_unix_ms;
                    // Frames queued behind the point frame are after the point.
                    peer.written_since_point = peer.written_since_point_frame;
                }
            }
        }
        let point = &self.points[index];
        if done {
            let names: Vec<&str> = (0..self.peers.len())
                .filter(|&i| point.targets[i].is_some())
                .map(|i| self.peers[i].name.as_str())
                .collect();
            tracing::info!(point_unix_ms = point.point_unix_ms, secondaries = ?names, "consistency point recorded");
            return Some(Ok(serde_json::json!({
                "point_unix_ms": point.point_unix_ms,
                "generation": mirror_generation,
                "secondaries": names,
            })));
        }
        (Instant::now() > point.deadline).then(|| {
            Err("timed out: writes kept coming; freeze the filesystem (--freeze) or quiesce the application".to_owned())
        })
    }
}

/// A secondary's image state, as reported.
fn image_state(peer: &Peer) -> ImageState {
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
fn out_of_sync_bytes(peer: &Peer, extent_bytes: u64, device_bytes: u64) -> u64 {
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

/// Slots for export requests in the engine: a write holds a buffer, flushes and TRIMs none.
fn export_slots_max(config: &crate::export::ExportConfig) -> usize {
    usize::from(config.buffers) * 2
}

/// Starts the NBD export of `config.device`, and opens the device for the export's writes:
/// exclusively, so that nothing mounts it while clients write through us.
fn start_export(
    config: &ShipperConfig,
    export_config: &crate::export::ExportConfig,
    device: &crate::device::BlockDevice,
) -> Result<(crate::export::Export, crate::export::EngineSide, File), ShipperError> {
    let write_fd = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_EXCL)
        .open(&config.device)
        .map_err(io_error(format!(
            "opening {} exclusively for the export's writes (is it mounted or open elsewhere?)",
            config.device.display()
        )))?;
    let info = crate::export::ExportInfo {
        name: config.mirror.as_ref().map_or_else(String::new, |db| db.name.clone()),
        image_bytes: device.size_bytes(),
        block_bytes_min: u32::try_from(device.logical_block_bytes).unwrap_or(4096).max(512),
        block_bytes_max: export_config.block_bytes_max,
    };
    let (export, side) = crate::export::Export::start(export_config, &config.device, info)
        .map_err(|e| ShipperError::Config(e.to_string()))?;
    Ok((export, side, write_fd))
}

fn validate(config: &ShipperConfig) -> Result<(), ShipperError> {
    let fail = |m: String| Err(ShipperError::Config(m));
    if (config.secondaries.is_empty() && config.mirror.is_none())
        || config.secondaries.len() > SECONDARIES_MAX
    {
        return fail(format!(
            "{} secondaries; between 1 and {SECONDARIES_MAX} are supported",
            config.secondaries.len()
        ));
    }
    if let Some(twice) =
        crate::mirror::first_duplicate(config.secondaries.iter().map(|(name, _)| name.as_str()))
    {
        // They would share one fracture log.
        return fail(format!("two secondaries named {twice:?}"));
    }
    if !config.run_bytes_max.is_multiple_of(config.extent_bytes.get() as usize) || config.run_bytes_max == 0 {
        return fail(format!(
            "run size {} is not a multiple of the extent size {}",
            config.run_bytes_max,
            config.extent_bytes.get()
        ));
    }
    if config.backlog_bytes_max < config.run_bytes_max as u64 {
        return fail(format!(
            "backlog {} bytes is smaller than one run of {} bytes",
            config.backlog_bytes_max, config.run_bytes_max
        ));
    }
    Ok(())
}

/// What start-up recovered of the write-intent log.
struct Recovered {
    /// Extents that may differ on any secondary.
    intent: BitVec<u64, Lsb0>,
    /// Writes may have been missed (host restart, damaged checkpoint): verify every secondary.
    verify_all: bool,
}

/// Whether the state directory holds logs from an earlier run.
fn logs_exist(state_dir: &std::path::Path) -> bool {
    std::fs::read_dir(state_dir).is_ok_and(|entries| {
        entries.flatten().any(|e| logs::is_primary_log(&e.file_name().to_string_lossy()))
    })
}

/// Rebuilds the write-intent log: the pinned map when the tracker resumed (a process restart
/// loses nothing), else the last checkpoint, whose gap is closed by verifying every secondary.
fn recover_intent(config: &ShipperConfig, tracker: &mut Tracker) -> Result<Recovered, ShipperError> {
    let extents = tracker.geometry().extent_count() as usize;
    let state_existed = logs_exist(&config.state_dir);
    let identity = LogIdentity {
        kind: LogKind::Intent,
        mirror_id: config.mirror_id,
        secondary_id: 0,
        extent_bytes: config.extent_bytes,
        image_bytes: tracker.geometry().device_bytes(),
    };
    let mut intent = bitvec![u64, Lsb0; 0; extents];
    let checkpoint_trusted = match logs::load(&config.state_dir, logs::INTENT_LOG_FILE, &identity) {
        Ok(Some((_, bits))) => {
            *intent |= bits.as_bitslice();
            true
        }
        Ok(None) => !state_existed,
        Err(error) => {
            tracing::error!(%error, "the write-intent log checkpoint cannot be trusted");
            false
        }
    };
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
    Ok(Recovered { intent, verify_all: verify_all || (!checkpoint_trusted && !tracker.resumed()) })
}

/// A secondary's pending extents and log state at start-up: its fracture log plus the intent
/// log; a full sync when it has none; a verify when its log (or the intent log) is not trusted.
fn recover_peer(
    config: &ShipperConfig,
    name: &str,
    recovered: &Recovered,
    image_bytes: u64,
) -> (ExtentSet, PeerLog) {
    let secondary_id = logs::secondary_id(name);
    let file_name = logs::fracture_log_file(name);
    let identity = LogIdentity {
        kind: LogKind::Fracture,
        mirror_id: config.mirror_id,
        secondary_id,
        extent_bytes: config.extent_bytes,
        image_bytes,
    };
    let loaded = logs::load(&config.state_dir, &file_name, &identity);
    let mut log = PeerLog::new(name, config.sync_rate_bytes_per_s, config.recovery_policy);
    let mut pending = ExtentSet::from_bits(&recovered.intent);
    match loaded {
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
        Ok(None) if config.initial_sync => {
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
        || (config.recovery_policy == RecoveryPolicy::Manual && log.flags & logs::FLAG_FRACTURED != 0);
    log.throttled = log.fractured();
    (pending, log)
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
}
