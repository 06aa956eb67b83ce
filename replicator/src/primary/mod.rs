//! The primary's engine: one thread, one io_uring, and the data path as stages, in order:
//!
//! 1. `drain`: the extents whose writes completed, from the tracker, become pending for every
//!    secondary (and dirty in the intent log's quiet clock);
//! 2. `read`: runs of pending extents are read from the primary device (O_DIRECT, registered
//!    buffers) and, once read, their frame is queued to every secondary they were read for;
//! 3. `send`: each connection sends the frame at its queue's front (zero-copy for extent data);
//! 4. `recv`: each connection's acks arrive: the frames are durable on the secondary, their
//!    extents leave its backlog (and, once quiet, the intent log);
//! 5. `checkpoint`: fracture logs are persisted as secondaries fracture, and the write-intent
//!    log is checkpointed every `checkpoint_ms`.
//!
//! Beside the data path: `verify` (hash both sides, ship what differs), `points` (consistency
//! points), the NBD `export` (client writes through the ring, shipped as they happen),
//! `membership` and `changes` (the mirror database), `operate` (operator requests), `status`.
//!
//! Each part owns its state (the ring and its ops, the buffers, the read side, the secondaries,
//! the logs, ...) and each stage is a function over the parts it needs; `turn` calls them in
//! the order above, except that the stages that wait on the kernel (a read's, a send's, a
//! receive's completion) are started in order and finished together, when `wait_and_reap`
//! hands each completion to the stage whose op it is. Limits, all set at start-up: `buffers` (reads and unsent frames),
//! `run_bytes_max` (largest read and frame), `backlog_bytes_max` (unacknowledged bytes per
//! secondary), `SECONDARIES_MAX`, and the ring's slots (`config::RingBudget`).

mod buffers;
mod changes;
mod checkpoint;
pub mod config;
mod connector;
mod cuts;
mod drain;
mod export;
mod membership;
mod operate;
mod peer;
mod peers;
mod points;
mod read;
mod recover;
mod recv;
mod resync;
mod send;
pub mod status;
#[cfg(test)]
mod testing;
mod verify;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bitvec::prelude::*;

pub use config::PrimaryConfig;
pub use cuts::CUT_INTERVAL_MS_DEFAULT;
pub use peer::PeerStats;
pub use status::PeerStatus;

use buffers::Buffers;
use checkpoint::{Checkpointer, Secondaries};
use cuts::Cuts;
use export::ExportState;
use membership::{Membership, Teardown};
use peers::{Arrival, Peers};
use points::Points;
use read::{Feed, Source};
use recover::PeerDefaults;
use resync::Throttle;

use crate::auth::{Key, Params};
use crate::control::{self, Call};
use crate::envelope::StateDir;
use crate::logs::LogKind;
use crate::metrics::PrimaryMetrics;
use crate::tracker::{Tracker, TrackerOptions};
use crate::uring::{Completion, Ring};

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error(transparent)]
    Tracker(#[from] crate::tracker::TrackerError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Control(#[from] control::ControlError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PrimaryError {
    let what = what.into();
    move |source| PrimaryError::Io { what, source }
}

/// An operation in the ring; `user_data` is its slot. Each names the part that owns what the
/// kernel uses until its last completion.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// A read into pool buffer `buffer` (`read::Source` keeps what it is for).
    Read { buffer: u16 },
    /// A send on a secondary's connection; a zero-copy one holds a reference to its buffer
    /// until its notification (`notification`: its first completion came).
    Send { peer: usize, generation: u32, zero_copy_buffer: Option<u16>, notification: bool },
    /// A receive into a secondary connection's buffer.
    Recv { peer: usize, generation: u32 },
    /// The primary's part of an NBD export request (a write, flush, TRIM or WRITE_ZEROES).
    Export { slot: u32 },
    /// A read of the export's eventfd: completes when a client connects or a buffer the
    /// export waits for comes back.
    Wake,
    /// A receive from an export client's socket (`direct`: into the arriving write's buffer).
    ExportRecv { conn: u16, generation: u32, direct: bool },
    /// The primary's side of a verify batch: the extents read to be hashed.
    VerifyRead { peer: usize, generation: u32, buffer: u16, first_extent: u64, count: u32 },
}

/// The engine's clock: drain stamps are ms since it started, in a u32 (49 days; they clamp).
pub struct Clock {
    started: Instant,
}

impl Clock {
    pub fn now_ms(&self) -> u32 {
        (self.started.elapsed().as_millis() as u64).clamp(1, u64::from(u32::MAX)) as u32
    }

    pub fn at(&self, ms: u32) -> Instant {
        self.started + Duration::from_millis(u64::from(ms))
    }
}

/// The settings the engine's turns read.
struct Settings {
    state_dir: std::path::PathBuf,
    device: std::path::PathBuf,
    mirror_id: u64,
    feed: Feed,
    timeout_ms: u64,
    keepalive_ms: u64,
    export_target: Option<String>,
}

pub struct Engine {
    // Field order matters: the ring is dropped before the buffers and the export it uses.
    ring: Ring<Op>,
    buffers: Buffers,
    export: Option<ExportState>,
    poll: crate::poll::PollWindow,
    source: Source,
    tracker: Tracker,
    peers: Peers,
    logs: Checkpointer<StateDir>,
    membership: Membership,
    points: Points,
    cuts: Cuts,
    control: Receiver<Call>,
    _control_server: control::ControlServer,
    status: status::Status,
    settings: Settings,
    metrics: Arc<PrimaryMetrics>,
    clock: Clock,
}

impl Engine {
    pub fn new(
        config: PrimaryConfig,
        key: Arc<Key>,
        metrics: Arc<PrimaryMetrics>,
    ) -> Result<Self, PrimaryError> {
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
        let image_bytes = tracker.geometry().device_bytes();
        config.validate(image_bytes).map_err(PrimaryError::Config)?;
        let source = open_source(&config, image_bytes)?;
        let export = start_export(&config, &mut tracker, source.extents())?;
        let buffers = Buffers::new(config.buffers, config.run_bytes_max)
            .map_err(|e| io_error("allocating the buffer pool")(e.into()))?;
        let ring =
            Ring::new(config::RingBudget::of(&config).slots()).map_err(io_error("creating the io_uring"))?;
        // SAFETY: the buffers outlive the ring (field order of `Engine`).
        unsafe { ring.register_buffers(buffers.pool()) }.map_err(io_error("registering buffers"))?;
        let logs = Checkpointer::new(
            StateDir(config.state_dir.clone()),
            config.mirror_id,
            config.extent_bytes,
            image_bytes,
            Duration::from_millis(config.checkpoint_ms),
            Arc::clone(&metrics),
        );
        let mut peers = Peers::new(reach(&config, key, image_bytes), Arc::clone(&metrics));
        let membership = Membership::new(
            config.mirror.clone(),
            config.state_dir.clone(),
            config.write_policy,
            config.minimum_images,
            defaults(&config),
            Arc::clone(&metrics),
        );
        add_secondaries(&config, &mut tracker, &logs, &membership, &mut peers)?;
        let source_extents = source.extents();
        Ok(Self {
            ring,
            buffers,
            export,
            poll: crate::poll::PollWindow::new(config.poll),
            source,
            tracker,
            peers,
            logs,
            membership,
            points: Points::default(),
            cuts: Cuts::new(source_extents, config.cut_interval_ms),
            control,
            _control_server: control_server,
            status: status::Status::default(),
            settings: settings(&config),
            metrics,
            clock: Clock { started: Instant::now() },
        })
    }

    /// Runs until `stop` is set, then drains what is in flight (up to the timeout) and stops.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), PrimaryError> {
        let mut stopping_since = None;
        loop {
            if stop.load(Ordering::Relaxed) && stopping_since.is_none() {
                tracing::info!("stopping: finishing in-flight reads, sends and acks");
                stopping_since = Some(Instant::now());
            }
            self.accept_connections();
            self.handle_control();
            self.turn(stopping_since.is_some())?;
            if let Some(since) = stopping_since
                && (self.quiescent() || since.elapsed() > Duration::from_millis(self.settings.timeout_ms))
            {
                break;
            }
        }
        self.shutdown()
    }

    /// One turn of the data path, in order (see the module header).
    fn turn(&mut self, stopping: bool) -> Result<(), PrimaryError> {
        if !stopping {
            self.cuts.flip_if_due(&mut self.tracker, &self.peers, &self.source);
        }
        self.drain();
        self.cuts.after_drain(&self.tracker, &mut self.peers, &self.source);
        if let Some(export) = self.export.as_mut() {
            export.arm_wake(&mut self.ring, stopping);
            export.pump_connections(&mut self.ring, stopping);
        }
        if !stopping {
            self.take_export_requests();
            read::schedule(
                &mut self.ring,
                &mut self.buffers,
                &mut self.source,
                &mut self.peers,
                (self.export.as_ref(), self.tracker.epoch()),
                self.settings.feed,
            );
            verify::schedule(
                &mut self.ring,
                &mut self.buffers,
                &self.source,
                &mut self.peers,
                self.settings.feed.queue_max,
            );
        }
        let (timeout_ms, keepalive_ms) = (self.settings.timeout_ms, self.settings.keepalive_ms);
        self.peers.tick(timeout_ms, keepalive_ms, &mut self.buffers, self.export.as_mut());
        recv::post(&mut self.ring, &mut self.peers);
        send::start(&mut self.ring, &mut self.buffers, &mut self.peers, self.export.as_ref());
        self.wait_and_reap()?;
        // A secondary fractured this turn has its fracture log on disk before any sync write
        // it missed is acknowledged to a client.
        self.persist_fracture_logs();
        if let Some(export) = self.export.as_mut() {
            export.advance(&self.peers, self.membership.minimum_images(), &self.metrics);
        }
        self.cuts.advance(self.tracker.epoch(), &mut self.peers);
        self.update_status();
        self.persist_fracture_logs();
        self.points.advance(&mut self.peers, self.membership.generation());
        self.advance_change();
        if self.logs.due() {
            self.checkpoint();
        }
        Ok(())
    }

    /// Takes the connections the connectors made: each gets the mirror database first; a
    /// failure may end an `add-secondary` (the new secondary refused us).
    fn accept_connections(&mut self) {
        for arrival in self.peers.arrivals() {
            match arrival {
                Arrival::Connected(index) => {
                    let cut = self.peers.get(index).cut;
                    self.cuts.connected(&mut self.tracker, cut.committed_cut, cut.staged_cut_max);
                    self.membership.send_db(&mut self.peers, [index]);
                }
                Arrival::Failed(index, error) => {
                    let mut teardown = Teardown {
                        buffers: &mut self.buffers,
                        export: self.export.as_mut(),
                        state_dir: &self.settings.state_dir,
                    };
                    if let Some(answer) =
                        self.membership.connect_failed(index, &error, &mut self.peers, &mut teardown)
                    {
                        self.answer(answer);
                    }
                }
            }
        }
    }

    fn drain(&mut self) {
        drain::drain(
            &mut self.tracker,
            self.export.as_mut(),
            &mut self.logs.quiet,
            &mut self.peers,
            &self.clock,
        );
    }

    fn take_export_requests(&mut self) {
        let Some(export) = self.export.as_mut() else { return };
        let mut io = export::Io {
            ring: &mut self.ring,
            peers: &mut self.peers,
            source: &self.source,
            quiet: &mut self.logs.quiet,
            clock: &self.clock,
            write_policy: self.membership.write_policy(),
            minimum_images: self.membership.minimum_images(),
            backlog_bytes_max: self.settings.feed.backlog_bytes_max,
            metrics: &self.metrics,
            cuts: &mut self.cuts,
            tracker: &mut self.tracker,
        };
        export.take_requests(&mut io);
    }

    fn advance_change(&mut self) {
        let mut teardown = Teardown {
            buffers: &mut self.buffers,
            export: self.export.as_mut(),
            state_dir: &self.settings.state_dir,
        };
        if let Some(answer) = self.membership.advance_change(&mut self.peers, &mut teardown) {
            self.answer(answer);
        }
    }

    /// Waits for completions (spinning first while a client's sync writes flow) and handles
    /// them.
    fn wait_and_reap(&mut self) -> Result<(), PrimaryError> {
        // The policy first: the clock is read only for a sync export.
        let client_waits = self.membership.write_policy() == crate::model::WritePolicy::Sync
            && self.export.as_ref().is_some_and(ExportState::requests_flowing);
        let spun_s = self
            .ring
            .wait(&mut self.poll, client_waits, 2_000_000)
            .map_err(io_error("waiting on the io_uring"))?;
        if spun_s > 0.0 {
            self.metrics.busy_poll_seconds.inc_by(spun_s);
        }
        let completions = self.ring.reap();
        for &completion in &completions {
            self.complete(completion);
        }
        self.ring.give_back(completions);
        Ok(())
    }

    /// Hands a completion to the stage whose op it is.
    fn complete(&mut self, completion: Completion) {
        let Completion { slot, result, .. } = completion;
        if let Op::Send { .. } = *self.ring.op_mut(slot) {
            send::complete(
                &mut self.ring,
                completion,
                &mut self.buffers,
                &mut self.peers,
                self.export.as_mut(),
                self.source.extent_bytes(),
            );
            return;
        }
        match self.ring.take(slot) {
            Op::Read { buffer } => read::complete(
                buffer,
                result,
                &mut self.buffers,
                &mut self.source,
                &mut self.peers,
                (
                    self.export.as_mut(),
                    Some(read::Placing { cuts: &mut self.cuts, tracker: &mut self.tracker }),
                ),
                &self.clock,
            ),
            Op::Send { .. } => unreachable!("handled above"),
            Op::Recv { peer, generation } => {
                let exports = self.export.as_mut();
                let Some(received) =
                    recv::complete(peer, generation, result, &mut self.peers, &mut self.buffers, exports)
                else {
                    return;
                };
                if let Some(cut) = received.cut {
                    self.peers.get_mut(peer).cut = cut;
                }
                if received.divergent_extents > 0 {
                    tracing::warn!(
                        secondary = %self.peers.get(peer).name,
                        extents = received.divergent_extents,
                        "former primary failing back: the extents it wrote that this primary may lack are shipped back"
                    );
                    self.peers.fracture(peer, "failing back from primary");
                }
                verify::compare(&mut self.peers, peer);
            }
            Op::Export { slot } => {
                let export = self.export.as_mut().expect("export ops come from an export");
                export.complete(&mut self.ring, &mut self.peers, slot, result, &self.settings.device);
            }
            Op::Wake => self.export.as_mut().expect("an export's wake").woken(),
            Op::ExportRecv { conn, generation, direct } => {
                self.export
                    .as_mut()
                    .expect("an export's recv")
                    .complete_recv(conn, generation, direct, result);
            }
            Op::VerifyRead { peer, generation, buffer, first_extent, count } => {
                let run = first_extent..first_extent + u64::from(count);
                let read = verify::BatchRead { peer, generation, buffer, run };
                verify::complete_read(read, result, &mut self.buffers, &self.source, &mut self.peers);
            }
        }
    }

    /// Persists the fracture logs of the secondaries fractured (or restored) since.
    fn persist_fracture_logs(&mut self) {
        let generation = self.membership.generation();
        let mut view = View { peers: &mut self.peers, source: &self.source, export: self.export.as_ref() };
        self.logs.persist_changed(&mut view, generation);
    }

    /// A checkpoint of the logs, after a drain so the intent log is as fresh as it can be.
    fn checkpoint(&mut self) {
        self.drain();
        let generation = self.membership.generation();
        let mut view = View { peers: &mut self.peers, source: &self.source, export: self.export.as_ref() };
        self.logs.checkpoint(&mut self.tracker, &mut view, generation);
    }

    /// Nothing in flight and nothing pending for any connected secondary.
    fn quiescent(&self) -> bool {
        self.source.reads_in_flight() == 0
            && self.export.as_ref().is_none_or(ExportState::idle)
            && self.peers.iter().all(|p| {
                p.conn.as_ref().is_none_or(|c| c.inflight.is_empty() && c.queue.is_empty() && !c.sending)
                    && (p.conn.is_none() || p.pending.not_any())
            })
    }

    fn update_status(&mut self) {
        status::update_in_sync(&mut self.peers, &self.source, self.tracker.awaiting_completion());
        self.membership.resend_stale(&mut self.peers);
        if !self.status.due() {
            return;
        }
        self.status.sample(&mut self.peers, &self.source, self.tracker.counters(), &self.metrics);
        self.metrics.checkpoint_duration.merge_from(&mut self.logs.durations_us);
        status::report_transitions(&mut self.peers, &self.metrics);
        self.membership.refresh(&mut self.peers);
        status::write_file(&self.settings.state_dir, &self.status_json());
    }

    fn status_json(&self) -> serde_json::Value {
        serde_json::json!({
            "device": self.settings.device.display().to_string(),
            "mirror_id": self.settings.mirror_id,
            "extent_bytes": self.source.extent_bytes(),
            "image_bytes": self.source.device_bytes(),
            "intent_log_extents": self.logs.intent_extents(),
            "mirror": self.membership.db(),
            "secondaries": status::statuses(&self.peers, &self.source),
            "export": self.settings.export_target,
            "write_policy": self.membership.write_policy(),
            "tracker": self.tracker.counters(),
        })
    }

    fn shutdown(mut self) -> Result<(), PrimaryError> {
        if let Some(export) = &self.export {
            // Its Wake op completes; requests not taken yet fail back to their clients.
            export.wake();
            self.tracker.exempt_writes_of(0);
        }
        if let Some(export) = self.export.as_mut() {
            // Every export connection stops reading, so its recv op completes.
            export.pump_connections(&mut self.ring, true);
        }
        // The last checkpoint, while the connections are still up: a secondary in sync now is
        // recorded as such.
        self.persist_fracture_logs();
        self.checkpoint();
        self.peers.shut_down();
        // Reap until every op is done, so no buffer is in the kernel's hands when they go.
        let deadline = Instant::now() + Duration::from_millis(self.settings.timeout_ms);
        while !self.ring.idle() && Instant::now() < deadline {
            self.wait_and_reap()?;
        }
        let Engine { ring, buffers, export, tracker, .. } = self;
        drop(ring);
        drop(buffers);
        drop(export);
        // The tracker stays pinned and marking: writes made while no primary runs are found by
        // the next one. `replicator untrack` removes it.
        tracing::info!(pin_dir = %tracker.pin_dir().display(), "primary stopped; the tracker stays attached");
        drop(tracker);
        Ok(())
    }
}

/// The secondaries as the checkpoint sees them: a secondary may lack what is pending for it,
/// sent and not acknowledged, being read for it, or written by an export op not yet replied.
struct View<'a> {
    peers: &'a mut Peers,
    source: &'a Source,
    export: Option<&'a ExportState>,
}

impl Secondaries for View<'_> {
    fn slots(&self) -> usize {
        self.peers.len()
    }

    fn member(&self, index: usize) -> bool {
        !self.peers.get(index).removed
    }

    fn dirty_into(&self, index: usize, out: &mut BitVec<u64, Lsb0>) {
        let peer = self.peers.get(index);
        out.clear();
        out.extend_from_bitslice(peer.pending.bits());
        if let Some(conn) = &peer.conn {
            for frame in conn.inflight.values() {
                out[frame.run.start as usize..frame.run.end as usize].fill(true);
            }
        }
        self.source.dirty_into(index, out);
        if let Some(export) = self.export {
            export.dirty_into(out);
        }
    }

    fn log(&mut self, index: usize) -> &mut resync::PeerLog {
        &mut self.peers.get_mut(index).log
    }

    fn logged(&mut self, index: usize, extents: usize) {
        self.peers.get(index).metrics.fracture_log_extents.set(extents as i64);
    }
}

/// The NBD export, if the configuration asks for one: the tracker then leaves this process's
/// writes to it (the export ships them itself; the tracker marks them in the intent log only).
fn start_export(
    config: &PrimaryConfig,
    tracker: &mut Tracker,
    extents: usize,
) -> Result<Option<ExportState>, PrimaryError> {
    let Some(export_config) = &config.export else { return Ok(None) };
    let name = config.mirror.as_ref().map_or_else(String::new, |db| db.name.clone());
    let state = export::start(export_config, &config.device, name, tracker.device(), extents)
        .map_err(PrimaryError::Config)?;
    tracker.exempt_writes_of(std::process::id());
    Ok(Some(state))
}

/// The primary device, opened for the engine's reads (O_DIRECT).
fn open_source(config: &PrimaryConfig, image_bytes: u64) -> Result<Source, PrimaryError> {
    let device = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&config.device)
        .map_err(io_error(format!("opening {} with O_DIRECT", config.device.display())))?;
    Ok(Source::new(
        device,
        config.device.clone(),
        image_bytes,
        config.extent_bytes.get(),
        config.run_bytes_max,
        config.buffers,
    ))
}

fn reach(config: &PrimaryConfig, key: Arc<Key>, image_bytes: u64) -> peers::Reach {
    peers::Reach {
        key,
        params: Params { mirror_id: config.mirror_id, image_bytes, extent_bytes: config.extent_bytes.get() },
        timeout_ms: config.timeout_ms,
        retry_max_ms: config.retry_max_ms,
        zero_copy: config.zero_copy,
        congestion: config.tcp_congestion.clone(),
    }
}

fn defaults(config: &PrimaryConfig) -> PeerDefaults {
    PeerDefaults {
        sync_rate_bytes_per_s: config.sync_rate_bytes_per_s,
        recovery_policy: config.recovery_policy,
        initial_sync: config.initial_sync,
    }
}

fn settings(config: &PrimaryConfig) -> Settings {
    Settings {
        state_dir: config.state_dir.clone(),
        device: config.device.clone(),
        mirror_id: config.mirror_id,
        feed: Feed { backlog_bytes_max: config.backlog_bytes_max, queue_max: usize::from(config.buffers) },
        timeout_ms: config.timeout_ms,
        keepalive_ms: config.keepalive_ms,
        export_target: config.export.as_ref().map(|e| e.target.to_string()),
    }
}

/// Recovers the logs and adds every secondary of the configuration (or of the database, whose
/// records carry each one's sync rate and recovery policy).
fn add_secondaries(
    config: &PrimaryConfig,
    tracker: &mut Tracker,
    logs: &Checkpointer<StateDir>,
    membership: &Membership,
    peers: &mut Peers,
) -> Result<(), PrimaryError> {
    let identity = logs.identity(LogKind::Intent, 0);
    let recovered = recover::recover_intent(&config.state_dir, logs.files(), &identity, tracker);
    for (name, addr) in &config.secondaries {
        let (pending, mut log) =
            recover::recover_peer(logs.files(), &identity, name, &recovered, defaults(config));
        if let Some(record) = membership.record(name) {
            log.throttle = Throttle::new(record.sync_rate_bytes_per_s);
            log.recovery = record.recovery_policy;
        }
        peers.add(name, *addr, pending, log).map_err(PrimaryError::Config)?;
    }
    Ok(())
}
