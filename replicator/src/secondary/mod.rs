//! The secondary: receives extents from an authenticated primary, writes them durably with
//! io_uring (to the image, or staged in the journal until their cut is committed), and
//! acknowledges each frame once its write has completed with `RWF_DSYNC`.
//!
//! The files: this one accepts connections, authenticates them and lets one session at a time
//! write the image (the newest authenticated primary supersedes the current session: a primary
//! that reconnects after a link failure must not wait for our timeout); `session.rs` is a
//! session's data path (receive -> decode -> route -> durable write -> ack); `frames.rs` its
//! other frames (keepalives, verify, commits, consistency points, zeroes, the mirror
//! database); `journal/` the redo journal that moves the image from cut to cut atomically.
//!
//! Owns the secondary image (opened `O_EXCL | O_DIRECT`, so nothing mounts or writes it behind
//! our back), the journal (opened, and the image brought to its last committed cut, before
//! anything listens) and the listening socket. Invariants:
//! - nothing is written before the primary has proved the key and every byte of the frame has
//!   passed the decoder (checksum, extent alignment, inside the image);
//! - one session writes at a time, and the next starts only once the last one's writes have
//!   completed (two writes of one extent in flight together could land in either order);
//! - at most `CONNECTIONS_MAX` connections are served at once, each on a thread of its own.

mod applier;
mod frames;
pub mod journal;
mod session;

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::auth::{self, Expected, Key, Params};
use crate::consistency::ConsistencyRecord;
use crate::device::BlockDevice;
use crate::metrics::SecondaryMetrics;
use crate::mirror::MirrorDb;
use crate::wire::Limits;
use session::{Session, SessionEnd};

/// Settings of a secondary, fixed at start-up.
#[derive(Clone, Debug)]
pub struct SecondaryConfig {
    pub device: PathBuf,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Checked against the primary's Hello when given.
    pub mirror_id: Option<u64>,
    pub extent_bytes: Option<crate::model::ExtentBytes>,
    /// Writes in flight at once (and buffers in the pool).
    pub queue_depth: u16,
    /// Largest extent run in one frame.
    pub frame_data_bytes_max: usize,
    /// A session with no frame from the primary for this long is over.
    pub timeout_ms: u64,
    /// How long a session spins for its next completion before it sleeps.
    pub poll: crate::poll::PollSetting,
    /// The congestion control of each primary's connection (the acks flow on it).
    pub tcp_congestion: crate::link::Congestion,
    /// Bytes of the journal's ring (`journal::JOURNAL_BYTES_DEFAULT`).
    pub journal_bytes: u64,
}

impl SecondaryConfig {
    pub const QUEUE_DEPTH_DEFAULT: u16 = 32;
    pub const FRAME_DATA_BYTES_MAX_DEFAULT: usize = 1 << 20;
    pub const TIMEOUT_MS_DEFAULT: u64 = 5000;
}

#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("opening {path} exclusively: {source} (is it mounted or open elsewhere?)")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    #[error("opening the journal {path}: {source}")]
    Journal { path: PathBuf, source: journal::JournalError },
}

/// How often the listener is polled for a connection (and the stop flag checked).
const ACCEPT_POLL_MS: u64 = 5;
/// Connections served at once, each on a thread of its own: the session, a primary that
/// reconnects before it timed out, and a few handshakes. Past it a connection is closed at
/// once, so a flood of connections costs at most this many threads, each for at most the
/// handshake's deadline (`--timeout-ms`) unless it authenticates.
const CONNECTIONS_MAX: usize = 8;

/// One place among the `CONNECTIONS_MAX`, given back when its thread ends, however it ends.
struct ConnectionPlace<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for ConnectionPlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What every connection's thread shares.
struct Shared<'a> {
    key: &'a Key,
    expected: Expected,
    config: &'a SecondaryConfig,
    sessions: &'a SessionSlot,
    stop: &'a AtomicBool,
    stats: &'a SecondaryMetrics,
}

/// Serves primaries until `stop` is set: one authenticated session at a time; a connection
/// that fails the handshake is logged with its address and dropped.
pub fn serve(
    config: &SecondaryConfig,
    key: Arc<Key>,
    stop: &AtomicBool,
    stats: &SecondaryMetrics,
) -> Result<(), SecondaryError> {
    let (image, expected) = open_image(config)?;
    let journal = open_journal(config, &image, expected.image_bytes)?;
    let listener = listen(config)?;
    let sessions = SessionSlot::new(ImageAndJournal { image, journal });
    let shared = Shared { key: &key, expected, config, sessions: &sessions, stop, stats };
    let connections = AtomicUsize::new(0);
    let mut refused_logged: Option<Instant> = None;
    std::thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Nothing to accept, or out of descriptors, say: no busy loop while it lasts.
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, "accept failed");
                    }
                    std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                    continue;
                }
            };
            if connections.load(Ordering::Acquire) >= CONNECTIONS_MAX {
                stats.refused_connections.inc();
                if refused_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(%peer, limit = CONNECTIONS_MAX, "refused a connection: {CONNECTIONS_MAX} are open already");
                    refused_logged = Some(Instant::now());
                }
                continue; // dropped: closed
            }
            connections.fetch_add(1, Ordering::AcqRel);
            let place = ConnectionPlace(&connections);
            let shared = &shared;
            scope.spawn(move || {
                let _place = place;
                handle_connection(stream, peer, shared)
            });
        }
    });
    tracing::info!("secondary stopped");
    Ok(())
}

/// Opens the image exclusively and says what a primary's `Hello` must match: the image's size
/// always, and the mirror and extent size this member was told or keeps in its database (a
/// secondary that holds a mirror's database serves that mirror only).
fn open_image(config: &SecondaryConfig) -> Result<(File, Expected), SecondaryError> {
    let device = BlockDevice::resolve(&config.device)?;
    crate::envelope::create_state_dir(&config.state_dir).map_err(|source| SecondaryError::Io {
        what: format!("creating {}", config.state_dir.display()),
        source,
    })?;
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_DIRECT)
        .open(&config.device)
        .map_err(|source| SecondaryError::Open { path: config.device.clone(), source })?;
    let stored = MirrorDb::load(&config.state_dir).map_err(|e| SecondaryError::Io {
        what: "reading the mirror database".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let expected = Expected {
        image_bytes: device.size_bytes(),
        mirror_id: config.mirror_id.or(stored.as_ref().map(|db| db.id)),
        extent_bytes: config.extent_bytes.or(stored.as_ref().map(|db| db.extent_bytes)),
    };
    if let Some(db) = &stored {
        tracing::info!(mirror = %db.name, id = db.id, revision = db.revision, "member of a mirror (database in the state directory)");
    }
    tracing::info!(device = %config.device.display(), listen = %config.listen, image_bytes = expected.image_bytes, "secondary ready");
    match ConsistencyRecord::load(&config.state_dir) {
        Ok(Some(point)) => tracing::info!(
            generation = point.generation,
            point_unix_ms = point.point_unix_ms,
            "last consistency point recorded here"
        ),
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "the consistency point record is damaged; ignoring it"),
    }
    Ok((image, expected))
}

/// Opens the journal in the state directory (preallocated to its size, so a full disk shows
/// here and not in the middle of a cut), and brings the image to its last committed cut.
fn open_journal(
    config: &SecondaryConfig,
    image: &File,
    image_bytes: u64,
) -> Result<journal::Journal<File>, SecondaryError> {
    let path = config.state_dir.join(journal::JOURNAL_FILE);
    let io =
        |source: std::io::Error| SecondaryError::Io { what: format!("opening {}", path.display()), source };
    let file =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    let bytes = journal::format::RING_START + config.journal_bytes;
    nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, bytes as libc::off_t)
        .map_err(|e| io(e.into()))?;
    let geometry = journal::Geometry {
        capacity: config.journal_bytes,
        payload_bytes_max: config.frame_data_bytes_max as u32,
        extent_bytes: journal::INDEX_GRAIN_BYTES,
        image_bytes,
    };
    let mut scratch =
        crate::pool::BufferPool::new(1, config.frame_data_bytes_max).map_err(|e| io(e.into()))?;
    let buffer = scratch.take().expect("one buffer");
    let journal =
        journal::Journal::open(file, geometry, image, scratch.data_mut(buffer, config.frame_data_bytes_max))
            .map_err(|source| SecondaryError::Journal { path: path.clone(), source })?;
    let state = journal.cut_state();
    tracing::info!(
        committed_cut = state.committed_cut,
        committed_unix_ms = state.committed_unix_ms,
        consistent = state.consistent,
        staged_frames = state.staged_frames,
        journal_bytes = config.journal_bytes,
        "journal open"
    );
    Ok(journal)
}

/// The listening socket, non-blocking, with the link's congestion control (inherited by every
/// connection accepted from it, from the handshake on).
fn listen(config: &SecondaryConfig) -> Result<TcpListener, SecondaryError> {
    let listen_error = |source| SecondaryError::Listen { addr: config.listen, source };
    let listener = TcpListener::bind(config.listen).map_err(listen_error)?;
    config.tcp_congestion.apply(&listener, &format!("the listening socket {}", config.listen))?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    Ok(listener)
}

fn handle_connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let Some(params) = authenticate(&stream, peer, shared) else { return };
    let superseded = Arc::new(AtomicBool::new(false));
    let Some(mut held) = shared.sessions.take(&superseded, shared.stop, peer) else { return };
    let ImageAndJournal { image, journal } = &mut *held;
    let stats = shared.stats;
    if let Err(error) = send_cut_state(&mut stream, journal, stats) {
        tracing::warn!(%peer, %error, "telling the primary this image's cut failed");
        return;
    }
    stats.sessions.inc();
    stats.primary_connected.set(1);
    let tcp_congestion =
        crate::link::connection_congestion(&stream, &shared.config.tcp_congestion, &peer.to_string());
    tracing::info!(%peer, mirror_id = params.mirror_id, extent_bytes = params.extent_bytes, tcp_congestion, "primary connected");
    let limits = Limits {
        image_bytes: shared.expected.image_bytes,
        extent_bytes: params.extent_bytes,
        payload_bytes_max: (shared.config.frame_data_bytes_max + 8) as u32,
    };
    let device = shared.config.device.display().to_string();
    let mut session = match Session::new(shared.config, limits, (image, journal), &device, stats) {
        Ok(session) => session,
        Err(e) => {
            tracing::error!(%peer, error = %e, "cannot set up a session");
            return;
        }
    };
    let end = session.run(&mut stream, [shared.stop, &superseded], stats);
    stats.primary_connected.set(0);
    if let Err(error) = &end {
        if matches!(error, SessionEnd::Write { .. }) {
            stats.write_errors.inc();
        }
        match error.code() {
            Some(code) => {
                tracing::error!(%peer, %error, "session ended");
                session.report(&mut stream, code, &error.to_string());
            }
            None => tracing::info!(%peer, reason = %error, "session ended"),
        }
    }
    session.finish(&stream, shared.stop);
    drop(session);
    if journal.poisoned() {
        // What the journal holds and what it believes it holds may differ now: only a restart
        // (which reads it back) can tell. Exit, so that a supervisor restarts us.
        tracing::error!(state_dir = %shared.config.state_dir.display(), "a journal write failed: exiting");
        std::process::exit(74);
    }
    if let Err(error) = journal.session_ended(crate::logs::unix_ms_now()) {
        tracing::error!(%error, "recording the end of the session in the journal");
    }
}

/// The second half of the handshake, once this session holds the image: the cut the image
/// holds and the highest cut of a frame staged here, so the primary's cuts continue past both.
fn send_cut_state(
    stream: &mut TcpStream,
    journal: &journal::Journal<File>,
    stats: &SecondaryMetrics,
) -> std::io::Result<()> {
    let state = journal.cut_state();
    note_cut(stats, &state);
    let message = crate::wire::Message::CutState {
        committed_cut: state.committed_cut,
        committed_unix_ms: state.committed_unix_ms,
        staged_cut_max: state.staged_tag_max,
        flags: if state.consistent { crate::wire::CUT_STATE_CONSISTENT } else { 0 },
    };
    crate::wire::write_frame(stream, &message, 1)
}

/// The image's cut in the metrics.
pub(crate) fn note_cut(stats: &SecondaryMetrics, state: &journal::CutState) {
    stats.committed_cut.set(state.committed_cut as i64);
    stats.committed_cut_timestamp.set(state.committed_unix_ms as f64 / 1000.0);
    stats.image_consistent.set(i64::from(state.consistent));
}

/// The handshake, within one deadline however the peer's bytes trickle in; then each blocking
/// read or write of the session gets the timeout. Returns what the primary replicates, once it
/// has proved the key.
fn authenticate(stream: &TcpStream, peer: SocketAddr, shared: &Shared) -> Option<Params> {
    // Acks and verify replies are small and latency-bound: no Nagle delay.
    let setup = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        tracing::warn!(%peer, error = %e, "setting up a connection failed");
        return None;
    }
    let timeout_ms = shared.config.timeout_ms;
    let handshake =
        auth::secondary_handshake(&mut auth::Deadline::new(stream, timeout_ms), shared.key, &shared.expected);
    let timeout = Some(Duration::from_millis(timeout_ms));
    if let Err(e) = stream.set_read_timeout(timeout).and_then(|()| stream.set_write_timeout(timeout)) {
        tracing::warn!(%peer, error = %e, "setting up a connection failed");
        return None;
    }
    match handshake {
        Ok(params) => Some(params),
        Err(e) => {
            shared.stats.refused_connections.inc();
            tracing::warn!(%peer, error = %e, "refused a connection: handshake failed");
            None
        }
    }
}

/// What a session writes: the image, and the journal of the cuts it moves through.
struct ImageAndJournal {
    image: File,
    journal: journal::Journal<File>,
}

/// The one session allowed to write the image: `image` is held while a session runs; `current`
/// is the flag that asks the running session to end when a newer one authenticates.
struct SessionSlot {
    image: Mutex<ImageAndJournal>,
    current: Mutex<Option<Arc<AtomicBool>>>,
}

impl SessionSlot {
    fn new(held: ImageAndJournal) -> Self {
        Self { image: Mutex::new(held), current: Mutex::new(None) }
    }

    /// Makes the session of `superseded` the current one (asking the previous to end), and
    /// waits for the image: the previous session ends once its writes are done
    /// (`Session::finish`); meanwhile a newer connection, or a stop, makes this one give up, so
    /// at most one waits.
    fn take(
        &self,
        superseded: &Arc<AtomicBool>,
        stop: &AtomicBool,
        peer: SocketAddr,
    ) -> Option<MutexGuard<'_, ImageAndJournal>> {
        if let Some(previous) = self.current.lock().unwrap_or_else(poisoned).replace(Arc::clone(superseded)) {
            // The primary reconnected (its old link is dead but our side has not timed out
            // yet): the newest authenticated session wins, after the old one's writes are done.
            tracing::info!(%peer, "primary reconnected: ending the previous session");
            previous.store(true, Ordering::Relaxed);
        }
        let image = loop {
            match self.image.try_lock() {
                Ok(image) => break image,
                Err(std::sync::TryLockError::Poisoned(error)) => break poisoned(error),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if superseded.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                }
            }
        };
        (!superseded.load(Ordering::Relaxed)).then_some(image)
    }
}

/// A session that panicked (a bug) poisons the slot's locks, and with them the image: exit, so
/// that a supervisor restarts the secondary cleanly, rather than serve nothing forever.
fn poisoned<T>(_: std::sync::PoisonError<T>) -> T {
    tracing::error!("a previous session panicked while it held the image: exiting");
    std::process::exit(70)
}
