//! The secondary: receives extents from an authenticated primary, writes them durably with
//! io_uring, and acknowledges each frame once its write has completed with `RWF_DSYNC`.
//!
//! Owns the secondary image (opened `O_EXCL | O_DIRECT`, so nothing mounts or writes it behind
//! our back), the listening socket, and per session a ring and a buffer pool sized at start-up.
//! One session writes at a time; a newly authenticated primary supersedes the current session
//! (a primary that reconnects after a link failure must not wait for our timeout).
//! Invariants:
//! - nothing is written before the primary has proved the key and every byte of the frame has
//!   passed the decoder (checksum, extent alignment, inside the image);
//! - a frame is acknowledged only after its write returned the full length with `RWF_DSYNC`; a
//!   failed write is reported with an `Error` frame and the session ends, never acknowledged;
//! - two writes to overlapping ranges are never in flight together, so a newer copy of an
//!   extent can never be overtaken by an older one.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

use crate::auth::{self, Expected, Key};
use crate::consistency::{self, ConsistencyRecord};
use crate::device::BlockDevice;
use crate::failback;
use crate::metrics::SecondaryMetrics;
use crate::mirror::MirrorDb;
use crate::pool::BufferPool;
use crate::read_ahead::ReadAhead;
use crate::wire::{self, ErrorCode, Limits, Message};

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
    pub poll: crate::pool::PollSetting,
    /// The congestion control of each primary's connection (the acks flow on it).
    pub tcp_congestion: crate::link::Congestion,
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
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("primary closed the connection")]
    Closed,
    #[error("no frame from the primary for {0} ms")]
    Timeout(u64),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Wire(#[from] wire::WireError),
    #[error("primary sent {0:?}, which a secondary does not accept")]
    Unexpected(wire::MessageKind),
    #[error("primary reported: {0}")]
    PrimaryError(String),
    #[error("write of {len} bytes at offset {offset} on {device} failed: {error}")]
    Write { device: String, offset: u64, len: usize, error: std::io::Error },
    #[error("read of {len} bytes at offset {offset} on {device} for a verify failed: {error}")]
    Read { device: String, offset: u64, len: usize, error: std::io::Error },
    #[error(transparent)]
    Refused(#[from] failback::Refusal),
    #[error("storing this member's state: {0}")]
    State(String),
    #[error("stopping")]
    Stop,
}

impl SessionEnd {
    /// The code the primary is told in an `Error` frame, for the ends it must hear about (a
    /// closed link or a stop it finds out by itself).
    fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Write { .. } => Some(ErrorCode::WriteFailed),
            Self::Read { .. } => Some(ErrorCode::ReadFailed),
            Self::Refused(refusal) => Some(refusal.code()),
            Self::State(_) => Some(ErrorCode::StateFailed),
            Self::Wire(_) | Self::Unexpected(_) => Some(ErrorCode::Protocol),
            Self::Closed | Self::Timeout(_) | Self::Io(_) | Self::PrimaryError(_) | Self::Stop => None,
        }
    }
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

/// Serves primaries until `stop` is set: one authenticated session at a time; a connection
/// that fails the handshake is logged with its address and dropped.
pub fn serve(
    config: &SecondaryConfig,
    key: Arc<Key>,
    stop: &AtomicBool,
    stats: &SecondaryMetrics,
) -> Result<(), SecondaryError> {
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
    let listener = TcpListener::bind(config.listen)
        .map_err(|source| SecondaryError::Listen { addr: config.listen, source })?;
    // Inherited by every connection accepted from it, from the handshake on.
    config.tcp_congestion.apply(&listener, &format!("the listening socket {}", config.listen))?;
    listener
        .set_nonblocking(true)
        .map_err(|source| SecondaryError::Listen { addr: config.listen, source })?;
    // A secondary that holds a mirror's database serves that mirror only.
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
    let sessions = SessionSlot::default();
    let connections = std::sync::atomic::AtomicUsize::new(0);
    let mut refused_logged: Option<Instant> = None;
    std::thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                    continue;
                }
                Err(e) => {
                    // Out of descriptors, say: no busy loop while it lasts.
                    tracing::warn!(error = %e, "accept failed");
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
            let (key, image, sessions) = (Arc::clone(&key), &image, &sessions);
            scope.spawn(move || {
                let _place = place;
                handle_connection(stream, peer, &key, &expected, config, image, sessions, stop, stats)
            });
        }
    });
    tracing::info!("secondary stopped");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn handle_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    key: &Key,
    expected: &Expected,
    config: &SecondaryConfig,
    image: &File,
    sessions: &SessionSlot,
    stop: &AtomicBool,
    stats: &SecondaryMetrics,
) {
    // Acks and verify replies are small and latency-bound: no Nagle delay.
    let setup = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        tracing::warn!(%peer, error = %e, "setting up a connection failed");
        return;
    }
    // The whole handshake within the timeout, however the peer's bytes trickle in; then each
    // blocking read or write of the session gets the timeout.
    let handshake =
        auth::secondary_handshake(&mut auth::Deadline::new(&stream, config.timeout_ms), key, expected);
    let timeout = Some(Duration::from_millis(config.timeout_ms));
    let session_timeouts = stream.set_read_timeout(timeout).and_then(|()| stream.set_write_timeout(timeout));
    if let Err(e) = session_timeouts {
        tracing::warn!(%peer, error = %e, "setting up a connection failed");
        return;
    }
    let params = match handshake {
        Ok(params) => params,
        Err(e) => {
            stats.refused_connections.inc();
            tracing::warn!(%peer, error = %e, "refused a connection: handshake failed");
            return;
        }
    };
    let superseded = Arc::new(AtomicBool::new(false));
    // A session that panicked (a bug) poisons these locks, and with them the image: exit, so
    // that a supervisor restarts the secondary cleanly, rather than serve nothing forever.
    fn poisoned<T>(_: std::sync::PoisonError<T>) -> T {
        tracing::error!("a previous session panicked while it held the image: exiting");
        std::process::exit(70)
    }
    if let Some(previous) = sessions.current.lock().unwrap_or_else(poisoned).replace(Arc::clone(&superseded))
    {
        // The primary reconnected (its old link is dead but our side has not timed out yet):
        // the newest authenticated session wins, after the old one has finished its writes.
        tracing::info!(%peer, "primary reconnected: ending the previous session");
        previous.store(true, Ordering::Relaxed);
    }
    // The previous session ends once its writes are done (`Session::finish`); meanwhile a
    // newer connection, or a stop, makes this one give up, so at most one waits.
    let _image = loop {
        match sessions.image.try_lock() {
            Ok(image) => break image,
            Err(std::sync::TryLockError::Poisoned(error)) => break poisoned(error),
            Err(std::sync::TryLockError::WouldBlock) => {
                if superseded.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
            }
        }
    };
    if superseded.load(Ordering::Relaxed) {
        return;
    }
    stats.sessions.inc();
    stats.primary_connected.set(1);
    let tcp_congestion =
        crate::link::connection_congestion(&stream, &config.tcp_congestion, &peer.to_string());
    tracing::info!(%peer, mirror_id = params.mirror_id, extent_bytes = params.extent_bytes, tcp_congestion, "primary connected");
    let limits = Limits {
        image_bytes: expected.image_bytes,
        extent_bytes: params.extent_bytes,
        payload_bytes_max: (config.frame_data_bytes_max + 8) as u32,
    };
    let device = config.device.display().to_string();
    let mut session = match Session::new(config, limits, image, &device) {
        Ok(session) => session,
        Err(e) => {
            tracing::error!(%peer, error = %e, "cannot set up a session");
            return;
        }
    };
    let end = session.run(&mut stream, [stop, &superseded], stats);
    stats.primary_connected.set(0);
    if matches!(end, Err(SessionEnd::Write { .. })) {
        stats.write_errors.inc();
    }
    if let Err(error) = &end {
        match error.code() {
            Some(code) => {
                tracing::error!(%peer, %error, "session ended");
                let message = error.to_string();
                let _ = wire::write_frame(&mut stream, &Message::Error { code, message: &message }, 2);
            }
            None => tracing::info!(%peer, reason = %error, "session ended"),
        }
    }
    session.finish(&stream, stop);
}

/// The one session allowed to write the image: `image` is held while a session runs; `current`
/// is the flag that asks the running session to end when a newer one authenticates.
#[derive(Default)]
struct SessionSlot {
    image: Mutex<()>,
    current: Mutex<Option<Arc<AtomicBool>>>,
}

const OP_RECV: u64 = u64::MAX;
/// The most of a TRIM or WRITE_ZEROES zeroed in one call (see `Session::zero_range`): a quarter
/// of a second on a disk that zeroes at 16 MiB/s, a millisecond where the device discards.
const ZEROES_CHUNK_BYTES: u64 = 4 << 20;
/// While a TRIM or WRITE_ZEROES is zeroed, the least time between two keepalives.
const ZEROES_KEEPALIVE_MS: u64 = 100;

/// The longest non-extent payload a primary sends (an `Error` frame).
/// The longest non-extent payload a primary sends: a mirror database.
const SMALL_PAYLOAD_BYTES_MAX: usize = wire::MIRROR_DB_BYTES_MAX;
const _: () = assert!(SMALL_PAYLOAD_BYTES_MAX >= 4 + wire::ERROR_MESSAGE_BYTES_MAX);

/// One write in flight: which buffer, where, and which frame to acknowledge.
#[derive(Clone, Copy, Debug)]
struct Write {
    buffer: u16,
    offset_bytes: u64,
    len_bytes: usize,
    sequence: u64,
}

/// The frame part being filled (from the read-ahead buffer, or by a direct recv): a header, then
/// its payload, an extent's into a registered pool buffer, which is what is written.
#[derive(Clone, Copy, Debug)]
enum Receiving {
    Header,
    /// An extent frame's offset and data, into `buffer` just before and at its data area.
    Extent {
        header: wire::Header,
        buffer: u16,
    },
    /// Any other frame's payload, into `small`.
    Small {
        header: wire::Header,
    },
}

struct Session<'a> {
    ring: IoUring,
    pool: BufferPool,
    poll: crate::pool::PollWindow,
    limits: Limits,
    image: &'a File,
    device: &'a str,
    state_dir: &'a std::path::Path,
    device_path: &'a std::path::Path,
    timeout_ms: u64,
    header_bytes: [u8; wire::HEADER_BYTES],
    small: Box<[u8; SMALL_PAYLOAD_BYTES_MAX]>,
    receiving: Receiving,
    /// Bytes of the part `receiving` names that are filled already.
    filled: usize,
    /// What the socket gave and no part has taken yet: the small frames of synchronous writes
    /// (a header and 4 KiB, say), which arrive a few dozen at a time at queue depth 32, cost one
    /// recv together rather than two each.
    ahead: ReadAhead,
    /// The recv in flight, if any: into the read-ahead buffer, or straight into the part.
    recv_in_flight: Option<RecvKind>,
    /// A received extent that waits for an overlapping write to finish (or a header that waits
    /// for a free buffer): nothing more is received meanwhile.
    waiting: Option<Waiting>,
    /// Indexed by buffer: the write that owns it.
    writes: Vec<Option<Write>>,
    /// Completions copied out of the ring; reused, capacity = queue depth + 1.
    completions: Vec<(u64, i32)>,
    next_ack_sequence: u64,
    /// Acks of completed writes not sent yet, and the scratch frame they are encoded in.
    acks: Vec<u8>,
    ack_frame: Vec<u8>,
    /// The database of a change in progress: checked and held since its prepare frame, stored
    /// when its commit frame comes, dropped if another database arrives first.
    prepared: Option<failback::Reconciled>,
    /// When the last frame a client waits on came (`FLAG_CLIENT_WAITS`): the session
    /// busy-polls while they flow (`PollSetting::Auto`).
    client_waits_at: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvKind {
    Ahead,
    /// MSG_WAITALL for the rest of the part.
    Direct {
        len: usize,
    },
}

#[derive(Clone, Copy, Debug)]
enum Waiting {
    Buffer(wire::Header),
    Overlap(Write),
    /// A verify request: answered once every write before it has completed.
    Verify {
        first_extent: u64,
        count: u32,
    },
    /// A client's TRIM or WRITE_ZEROES through the primary's export: applied and acknowledged
    /// once every write before it has completed.
    Zeroes {
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
        sequence: u64,
    },
    /// A consistency point: recorded and acknowledged once every write before it completed.
    Point {
        generation: u64,
        point_unix_ms: u64,
        sequence: u64,
    },
}

impl<'a> Session<'a> {
    fn new(
        config: &'a SecondaryConfig,
        limits: Limits,
        image: &'a File,
        device: &'a str,
    ) -> std::io::Result<Self> {
        let depth = config.queue_depth;
        let ring = crate::pool::new_ring(u32::from(depth).next_power_of_two() * 2)?;
        let pool =
            BufferPool::new(usize::from(depth), config.frame_data_bytes_max).map_err(std::io::Error::from)?;
        // SAFETY: the pool outlives the ring: `ring` is declared before `pool` in Session and so
        // is dropped first.
        unsafe { ring.submitter().register_buffers(&pool.iovecs())? };
        Ok(Self {
            ring,
            pool,
            poll: crate::pool::PollWindow::new(config.poll),
            limits,
            image,
            device,
            state_dir: &config.state_dir,
            device_path: &config.device,
            timeout_ms: config.timeout_ms,
            header_bytes: [0; wire::HEADER_BYTES],
            small: Box::new([0; SMALL_PAYLOAD_BYTES_MAX]),
            receiving: Receiving::Header,
            filled: 0,
            ahead: ReadAhead::default(),
            recv_in_flight: None,
            waiting: None,
            writes: vec![None; usize::from(depth)],
            completions: Vec::with_capacity(usize::from(depth) + 1),
            next_ack_sequence: 0,
            acks: Vec::with_capacity(usize::from(depth) * (wire::HEADER_BYTES + 16)),
            ack_frame: Vec::with_capacity(wire::HEADER_BYTES + 16),
            prepared: None,
            client_waits_at: None,
        })
    }

    fn run(
        &mut self,
        stream: &mut TcpStream,
        stops: [&AtomicBool; 2],
        stats: &SecondaryMetrics,
    ) -> Result<(), SessionEnd> {
        let mut last_frame = Instant::now();
        loop {
            if stops.iter().any(|s| s.load(Ordering::Relaxed)) {
                self.wait_for_writes(stream, stats)?;
                return Err(SessionEnd::Stop);
            }
            self.retry_waiting(stream)?;
            if self.recv_in_flight.is_none() && self.waiting.is_none() && self.use_ahead(stream)? {
                // Frames read ahead earlier, held back by a write, count as heard now.
                last_frame = Instant::now();
            }
            if self.recv_in_flight.is_none() && self.waiting.is_none() {
                self.submit_recv(stream)?;
            }
            self.flush_acks(stream)?;
            let client_waits = crate::pool::within_poll_window(self.client_waits_at);
            let spun_s = self.poll.spin(&mut self.ring, client_waits).map_err(SessionEnd::Io)?;
            if spun_s > 0.0 {
                stats.busy_poll_seconds.inc_by(spun_s);
            }
            let wait = types::Timespec::new().nsec(100_000_000);
            let args = types::SubmitArgs::new().timespec(&wait);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(SessionEnd::Io(e)),
            }
            if self.reap(stream, stats)? {
                last_frame = Instant::now();
            }
            if last_frame.elapsed() > Duration::from_millis(self.timeout_ms) {
                return Err(SessionEnd::Timeout(self.timeout_ms));
            }
        }
    }

    /// Where the current receive goes and how many bytes it waits for (MSG_WAITALL).
    fn recv_target(&mut self) -> (*mut u8, usize) {
        match self.receiving {
            Receiving::Header => (self.header_bytes.as_mut_ptr(), wire::HEADER_BYTES),
            Receiving::Extent { header, buffer } => {
                let len = header.payload_bytes as usize;
                (self.pool.prefix_tail_mut(buffer, 8).as_mut_ptr(), len)
            }
            Receiving::Small { header } => (self.small.as_mut_ptr(), header.payload_bytes as usize),
        }
    }

    /// Fills the current part from the read-ahead buffer, and handles each part completed,
    /// until the buffer is used up or a frame waits (for a buffer, a write, ...). Returns
    /// whether a part was completed.
    fn use_ahead(&mut self, stream: &mut TcpStream) -> Result<bool, SessionEnd> {
        let mut completed = false;
        while self.waiting.is_none() && !self.ahead.is_empty() {
            let (target, len) = self.recv_target();
            // SAFETY: `target..target + len` is the current part (see `recv_target`), owned by
            // the session, with no recv in flight into it; `filled <= len`.
            let rest = unsafe { std::slice::from_raw_parts_mut(target.add(self.filled), len - self.filled) };
            self.filled += self.ahead.copy_into(rest);
            if self.filled == len {
                self.filled = 0;
                completed = true;
                self.received(stream)?;
            }
        }
        Ok(completed)
    }

    /// Receives the rest of the current part straight into it when it is a long payload and
    /// nothing is read ahead, else whatever the socket has into the read-ahead buffer.
    fn submit_recv(&mut self, stream: &TcpStream) -> Result<(), SessionEnd> {
        assert!(self.ahead.is_empty(), "the read-ahead is used up before a recv");
        let (target, len) = self.recv_target();
        let rest = len - self.filled;
        let (kind, recv) = if self.ahead.direct(rest) {
            // SAFETY: as in `use_ahead`.
            let at = unsafe { target.add(self.filled) };
            let recv =
                opcode::Recv::new(types::Fd(stream.as_raw_fd()), at, rest as u32).flags(libc::MSG_WAITALL);
            (RecvKind::Direct { len: rest }, recv)
        } else {
            let room = match self.receiving {
                Receiving::Header => self.ahead.header_room(rest),
                Receiving::Extent { .. } | Receiving::Small { .. } => self.ahead.recv_room(),
            };
            let (at, room) = room.expect("an empty read-ahead buffer has room");
            (RecvKind::Ahead, opcode::Recv::new(types::Fd(stream.as_raw_fd()), at, room))
        };
        // SAFETY: the target (the read-ahead buffer, or the part: header array, small buffer,
        // or a pool buffer taken for this frame) is owned by the session and not touched until
        // this recv completes.
        unsafe { self.ring.submission().push(&recv.build().user_data(OP_RECV)) }
            .map_err(|_| std::io::Error::other("ring full"))?;
        self.recv_in_flight = Some(kind);
        Ok(())
    }

    /// Handles completions; returns whether bytes arrived.
    fn reap(&mut self, stream: &mut TcpStream, stats: &SecondaryMetrics) -> Result<bool, SessionEnd> {
        // Copied out first (handling one submits more), into a vector reused across calls.
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let outcome = self.handle_completions(&completions, stream, stats);
        completions.clear();
        self.completions = completions;
        outcome
    }

    fn handle_completions(
        &mut self,
        completions: &[(u64, i32)],
        stream: &mut TcpStream,
        stats: &SecondaryMetrics,
    ) -> Result<bool, SessionEnd> {
        let mut received = false;
        for (at, &(user_data, result)) in completions.iter().enumerate() {
            let handled = self.handle_completion(user_data, result, stream, stats);
            match handled {
                Ok(true) => received = true,
                Ok(false) => {}
                Err(end) => {
                    // The rest of the batch is off the ring already: its ops are done, so their
                    // buffers go back (`finish` waits only for ops still in the kernel).
                    for &(user_data, _) in &completions[at + 1..] {
                        self.forget(user_data);
                    }
                    return Err(end);
                }
            }
        }
        Ok(received)
    }

    /// An op of an ending session has completed: its buffer goes back, nothing is acknowledged.
    fn forget(&mut self, user_data: u64) {
        if user_data == OP_RECV {
            self.recv_in_flight = None;
        } else if let Some(write) = self.writes[user_data as usize].take() {
            self.pool.give_back(write.buffer);
        }
    }

    /// One completion; returns whether bytes arrived.
    fn handle_completion(
        &mut self,
        user_data: u64,
        result: i32,
        stream: &mut TcpStream,
        stats: &SecondaryMetrics,
    ) -> Result<bool, SessionEnd> {
        if user_data != OP_RECV {
            self.complete_write(user_data as u16, result, stats)?;
            return Ok(false);
        }
        let kind = self.recv_in_flight.take().expect("a recv completion for the recv in flight");
        match (result, kind) {
            (0, _) => Err(SessionEnd::Closed),
            (r, _) if r < 0 => Err(SessionEnd::Io(std::io::Error::from_raw_os_error(-r))),
            (r, RecvKind::Direct { len }) if r as usize != len => Err(SessionEnd::Closed),
            (_, RecvKind::Direct { .. }) => {
                self.filled = 0;
                self.received(stream)?;
                Ok(true)
            }
            (r, RecvKind::Ahead) => {
                self.ahead.received(r as usize);
                self.use_ahead(stream)?;
                Ok(true)
            }
        }
    }

    /// A whole header or payload has arrived: decide what comes next.
    fn received(&mut self, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        match self.receiving {
            Receiving::Header => {
                let header = wire::decode_header(&self.header_bytes, &self.limits)?;
                if header.flags & wire::FLAG_CLIENT_WAITS != 0 {
                    self.client_waits_at = Some(Instant::now());
                }
                self.start_payload(header, stream)
            }
            Receiving::Extent { header, buffer } => {
                let len = header.payload_bytes as usize;
                // SAFETY: the 8 offset bytes before the data area and the data are one region
                // of this buffer, just filled by the recv.
                let payload = unsafe { std::slice::from_raw_parts(self.pool.data_ptr(buffer).sub(8), len) };
                let decoded = wire::decode_payload(&self.header_bytes, &header, payload, &self.limits);
                let (offset_bytes, len_bytes) = match decoded {
                    Ok(
                        Message::ExtentData { offset_bytes, data }
                        | Message::BlockData { offset_bytes, data },
                    ) => (offset_bytes, data.len()),
                    Ok(other) => {
                        unreachable!("a data header decodes to data, not {:?}", other.kind())
                    }
                    Err(e) => {
                        self.pool.give_back(buffer);
                        return Err(e.into());
                    }
                };
                self.receiving = Receiving::Header;
                self.ahead.payload_taken(len);
                let write = Write { buffer, offset_bytes, len_bytes, sequence: header.sequence };
                if self.overlaps(&write) {
                    self.waiting = Some(Waiting::Overlap(write));
                    Ok(())
                } else {
                    self.submit_write(write)
                }
            }
            Receiving::Small { header } => {
                self.receiving = Receiving::Header;
                self.ahead.payload_taken(header.payload_bytes as usize);
                let payload = &self.small[..header.payload_bytes as usize];
                match wire::decode_payload(&self.header_bytes, &header, payload, &self.limits)? {
                    Message::Keepalive => {
                        self.flush_acks(stream)?;
                        wire::write_frame(stream, &Message::Keepalive, self.next_ack_sequence)?;
                        self.next_ack_sequence += 1;
                        Ok(())
                    }
                    Message::Error { message, .. } => Err(SessionEnd::PrimaryError(message.into())),
                    Message::VerifyRequest { first_extent, count } => {
                        self.waiting = Some(Waiting::Verify { first_extent, count });
                        self.retry_waiting(stream)
                    }
                    Message::MirrorDb { envelope } => {
                        self.prepared = None;
                        let envelope = envelope.to_vec(); // a control frame: copied out of `small`
                        let reconciled = self.reconcile_db(&envelope, stream)?;
                        store_mirror_db(self.state_dir, &reconciled)?;
                        self.ack_control(header.sequence, stream)
                    }
                    Message::MirrorDbPrepare { envelope } => {
                        let envelope = envelope.to_vec();
                        self.prepared = Some(self.reconcile_db(&envelope, stream)?);
                        self.ack_control(header.sequence, stream)
                    }
                    Message::MirrorDbCommit { revision } => {
                        let prepared = self.prepared.take().filter(|p| p.db.revision == revision).ok_or_else(|| {
                            failback::Refusal::Refused(format!(
                                "commit of mirror database revision {revision}, which was not prepared here"
                            ))
                        })?;
                        store_mirror_db(self.state_dir, &prepared)?;
                        self.ack_control(header.sequence, stream)
                    }
                    Message::ConsistencyPoint { generation, point_unix_ms } => {
                        let sequence = header.sequence;
                        self.waiting = Some(Waiting::Point { generation, point_unix_ms, sequence });
                        self.retry_waiting(stream)
                    }
                    Message::Zeroes { offset_bytes, len_bytes, unmap } => {
                        let sequence = header.sequence;
                        self.waiting = Some(Waiting::Zeroes { offset_bytes, len_bytes, unmap, sequence });
                        self.retry_waiting(stream)
                    }
                    other => Err(SessionEnd::Unexpected(other.kind())),
                }
            }
        }
    }

    fn start_payload(&mut self, header: wire::Header, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        match header.kind {
            wire::MessageKind::ExtentData | wire::MessageKind::BlockData => {
                if (header.payload_bytes as usize) <= 8 {
                    return Err(wire::WireError::PayloadSize {
                        kind: header.kind,
                        found: header.payload_bytes as usize,
                        expected: "> 8",
                    }
                    .into());
                }
                match self.pool.take() {
                    Some(buffer) => self.receiving = Receiving::Extent { header, buffer },
                    None => self.waiting = Some(Waiting::Buffer(header)),
                }
                Ok(())
            }
            wire::MessageKind::Keepalive
            | wire::MessageKind::Error
            | wire::MessageKind::VerifyRequest
            | wire::MessageKind::ConsistencyPoint
            | wire::MessageKind::Zeroes
            | wire::MessageKind::MirrorDb
            | wire::MessageKind::MirrorDbPrepare
            | wire::MessageKind::MirrorDbCommit => {
                if header.payload_bytes as usize > SMALL_PAYLOAD_BYTES_MAX {
                    return Err(wire::WireError::TooLong {
                        found: header.payload_bytes,
                        limit: SMALL_PAYLOAD_BYTES_MAX as u32,
                    }
                    .into());
                }
                self.receiving = Receiving::Small { header };
                if header.payload_bytes == 0 {
                    // Nothing to receive: handle it now.
                    return self.received(stream);
                }
                Ok(())
            }
            other => Err(SessionEnd::Unexpected(other)),
        }
    }

    /// Resumes a frame that waited for a buffer or for an overlapping write.
    fn retry_waiting(&mut self, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        match self.waiting {
            Some(Waiting::Buffer(header)) if self.pool.free_count() > 0 => {
                self.waiting = None;
                self.start_payload(header, stream)
            }
            Some(Waiting::Overlap(write)) if !self.overlaps(&write) => {
                self.waiting = None;
                self.submit_write(write)
            }
            Some(Waiting::Verify { first_extent, count }) if self.writes.iter().all(Option::is_none) => {
                self.waiting = None;
                self.answer_verify(first_extent, count, stream)
            }
            Some(Waiting::Point { generation, point_unix_ms, sequence })
                if self.writes.iter().all(Option::is_none) =>
            {
                self.waiting = None;
                self.record_point(generation, point_unix_ms, sequence, stream)
            }
            Some(Waiting::Zeroes { offset_bytes, len_bytes, unmap, sequence })
                if self.writes.iter().all(Option::is_none) =>
            {
                self.waiting = None;
                // The writes before it are durable: their acks go out before a long zeroing.
                self.flush_acks(stream)?;
                self.zero_range(offset_bytes, len_bytes, unmap, stream)?;
                let ack = Message::Ack { first_sequence: sequence, last_sequence: sequence };
                self.flush_acks(stream)?;
                wire::write_frame(stream, &ack, self.next_ack_sequence)?;
                self.next_ack_sequence += 1;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Zeroes `len_bytes` at `offset_bytes` (a TRIM when `unmap`) durably, `ZEROES_CHUNK_BYTES`
    /// at a time. Nothing is received meanwhile, so after each chunk that ends
    /// `ZEROES_KEEPALIVE_MS` or more after the last keepalive the session sends one (it does not
    /// know the primary's timeout): a device without discard zeroes at disk speed, and a 4 GiB
    /// TRIM must not look like a dead link. (The primary's ack deadline, four timeouts for the
    /// whole range, still cuts off a device that makes no progress.)
    fn zero_range(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
        stream: &mut TcpStream,
    ) -> Result<(), SessionEnd> {
        let keepalive_after = Duration::from_millis(ZEROES_KEEPALIVE_MS);
        let mut last_keepalive = Instant::now();
        let end_bytes = offset_bytes + len_bytes;
        let mut at_bytes = offset_bytes;
        while at_bytes < end_bytes {
            let chunk_bytes = (end_bytes - at_bytes).min(ZEROES_CHUNK_BYTES);
            zero_range(self.image, at_bytes, chunk_bytes, unmap)
                .map_err(|error| self.write_failed(at_bytes, chunk_bytes as usize, error))?;
            at_bytes += chunk_bytes;
            if at_bytes < end_bytes && last_keepalive.elapsed() > keepalive_after {
                wire::write_frame(stream, &Message::Keepalive, self.next_ack_sequence)?;
                self.next_ack_sequence += 1;
                last_keepalive = Instant::now();
            }
        }
        self.image.sync_data().map_err(|error| self.write_failed(offset_bytes, len_bytes as usize, error))
    }

    /// The session ends: writing `len` bytes at `offset` of the image failed.
    fn write_failed(&self, offset: u64, len: usize, error: std::io::Error) -> SessionEnd {
        SessionEnd::Write { device: self.device.into(), offset, len, error }
    }

    /// Hashes extents `first_extent..first_extent + count` as they are on the image (every
    /// write before the request has completed) and replies with their XXH3-128 hashes. Reads
    /// through a pool buffer with O_DIRECT, a buffer at a time; no write is in flight meanwhile.
    fn answer_verify(
        &mut self,
        first_extent: u64,
        count: u32,
        stream: &mut TcpStream,
    ) -> Result<(), SessionEnd> {
        use std::os::unix::fs::FileExt as _;
        let extent_bytes = self.limits.extent_bytes;
        let buffer = self.pool.take().expect("no write in flight, so every buffer is free");
        let chunk_bytes_max = (self.pool.data_bytes_max() as u64).min(extent_bytes);
        let mut hashes = [0u8; wire::VERIFY_EXTENTS_MAX as usize * wire::VERIFY_HASH_BYTES];
        let mut outcome = Ok(());
        'extents: for i in 0..u64::from(count) {
            let extent_start = (first_extent + i) * extent_bytes;
            let extent_end = (extent_start + extent_bytes).min(self.limits.image_bytes);
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            let mut offset = extent_start;
            while offset < extent_end {
                let len = (extent_end - offset).min(chunk_bytes_max) as usize;
                let chunk = self.pool.data_mut(buffer, len);
                match self.image.read_exact_at(chunk, offset) {
                    Ok(()) => hasher.update(chunk),
                    Err(error) => {
                        outcome = Err(SessionEnd::Read { device: self.device.into(), offset, len, error });
                        break 'extents;
                    }
                }
                offset += len as u64;
            }
            let at = i as usize * wire::VERIFY_HASH_BYTES;
            hashes[at..at + wire::VERIFY_HASH_BYTES].copy_from_slice(&hasher.digest128().to_le_bytes());
        }
        self.pool.give_back(buffer);
        outcome?;
        let hashes = &hashes[..count as usize * wire::VERIFY_HASH_BYTES];
        self.flush_acks(stream)?;
        wire::write_frame(stream, &Message::VerifyHashes { first_extent, hashes }, self.next_ack_sequence)?;
        self.next_ack_sequence += 1;
        Ok(())
    }

    /// Every write before the point has completed (and was durable when it did): records the
    /// point durably, then acknowledges its frame.
    fn record_point(
        &mut self,
        generation: u64,
        point_unix_ms: u64,
        sequence: u64,
        stream: &mut TcpStream,
    ) -> Result<(), SessionEnd> {
        let record = ConsistencyRecord {
            generation,
            point_unix_ms,
            image_bytes: self.limits.image_bytes,
            recorded_unix_ms: crate::logs::unix_ms_now(),
        };
        crate::envelope::replace_file(self.state_dir, consistency::POINT_FILE, &record.encode())
            .map_err(|e| SessionEnd::State(e.to_string()))?;
        tracing::info!(device = self.device, generation, point_unix_ms, "image CONSISTENT as of this point");
        let ack = Message::Ack { first_sequence: sequence, last_sequence: sequence };
        self.flush_acks(stream)?;
        wire::write_frame(stream, &ack, self.next_ack_sequence)?;
        self.next_ack_sequence += 1;
        Ok(())
    }

    /// Checks a database the primary sent against this member's (`failback::reconcile`), and
    /// hands a former primary's divergent extents back before anything else.
    fn reconcile_db(
        &mut self,
        envelope: &[u8],
        stream: &mut TcpStream,
    ) -> Result<failback::Reconciled, SessionEnd> {
        let local = stream.local_addr().ok();
        let reconciled = failback::reconcile(self.state_dir, self.device_path, envelope, local)?;
        self.flush_acks(stream)?;
        self.next_ack_sequence = send_divergent(stream, &reconciled.divergent, self.next_ack_sequence)?;
        Ok(reconciled)
    }

    /// Acknowledges a control frame (database, commit) at once, after the acks before it.
    fn ack_control(&mut self, sequence: u64, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        let ack = Message::Ack { first_sequence: sequence, last_sequence: sequence };
        self.flush_acks(stream)?;
        wire::write_frame(stream, &ack, self.next_ack_sequence)?;
        self.next_ack_sequence += 1;
        Ok(())
    }

    /// Sends the buffered acks; before the session waits, and before any other frame.
    fn flush_acks(&mut self, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        if !self.acks.is_empty() {
            stream.write_all(&self.acks)?;
            self.acks.clear();
        }
        Ok(())
    }

    fn complete_write(
        &mut self,
        buffer: u16,
        result: i32,
        stats: &SecondaryMetrics,
    ) -> Result<(), SessionEnd> {
        let write = self.writes[usize::from(buffer)].take().expect("a completion for a write in flight");
        self.pool.give_back(buffer);
        if result < 0 || result as usize != write.len_bytes {
            let error = if result < 0 {
                std::io::Error::from_raw_os_error(-result)
            } else {
                std::io::Error::other(format!("short write of {result} bytes"))
            };
            return Err(self.write_failed(write.offset_bytes, write.len_bytes, error));
        }
        stats.written_bytes.inc_by(write.len_bytes as u64);
        stats.acked_frames.inc();
        // Buffered: the acks of the writes one reap completes go out in one send.
        let ack = Message::Ack { first_sequence: write.sequence, last_sequence: write.sequence };
        wire::encode(&ack, self.next_ack_sequence, &mut self.ack_frame);
        self.acks.extend_from_slice(&self.ack_frame);
        self.next_ack_sequence += 1;
        Ok(())
    }

    /// Whether `write` overlaps a write in flight (a newer copy must not be overtaken).
    fn overlaps(&self, write: &Write) -> bool {
        let (start, end) = (write.offset_bytes, write.offset_bytes + write.len_bytes as u64);
        self.writes
            .iter()
            .flatten()
            .any(|w| start < w.offset_bytes + w.len_bytes as u64 && w.offset_bytes < end)
    }

    fn submit_write(&mut self, write: Write) -> Result<(), SessionEnd> {
        assert!(self.writes[usize::from(write.buffer)].is_none());
        assert!(!self.overlaps(&write), "overlapping writes are never in flight together");
        let entry = opcode::WriteFixed::new(
            types::Fd(self.image.as_raw_fd()),
            self.pool.data_ptr(write.buffer),
            write.len_bytes as u32,
            write.buffer,
        )
        .offset(write.offset_bytes)
        .rw_flags(libc::RWF_DSYNC)
        .build()
        .user_data(u64::from(write.buffer));
        // SAFETY: the buffer is owned by this write (recorded in `writes`) until its completion.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| std::io::Error::other("ring full"))?;
        self.writes[usize::from(write.buffer)] = Some(write);
        Ok(())
    }

    /// Ends the session's use of its buffers: shuts the socket so a receive in flight
    /// completes, and reaps until no operation holds a buffer, before the ring and the pool are
    /// dropped. Writes that still complete are not acknowledged. There is no deadline for the
    /// writes: the next session may write the same extents only once these are done (two writes
    /// of one extent in flight together may land in either order, and the older data could
    /// land last); a device that never completes them keeps the image locked, and says so.
    fn finish(&mut self, stream: &TcpStream, stop: &AtomicBool) {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let started = Instant::now();
        let mut warned_at = started;
        while self.recv_in_flight.is_some() || self.writes.iter().any(Option::is_some) {
            if stop.load(Ordering::Relaxed) && started.elapsed() > Duration::from_millis(self.timeout_ms) {
                // Stopping, and the device still holds writes: the process exits (the kernel
                // finishes or fails them); no new session starts here.
                tracing::error!(device = self.device, "stopping with writes still in the device");
                return;
            }
            let wait = types::Timespec::new().nsec(100_000_000);
            let _ = self.ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&wait));
            let completions: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for user_data in completions {
                self.forget(user_data);
            }
            if warned_at.elapsed() > Duration::from_millis(self.timeout_ms) {
                warned_at = Instant::now();
                let writes = self.writes.iter().flatten().count();
                tracing::warn!(
                    device = self.device,
                    writes,
                    "writes of an ended session still in flight: no new session writes the image until they complete"
                );
            }
        }
    }

    fn wait_for_writes(
        &mut self,
        stream: &mut TcpStream,
        stats: &SecondaryMetrics,
    ) -> Result<(), SessionEnd> {
        while self.writes.iter().any(Option::is_some) {
            self.ring.submit_and_wait(1)?;
            self.reap(stream, stats)?;
        }
        self.flush_acks(stream)?;
        let _ = stream.flush();
        Ok(())
    }
}

/// Makes `len_bytes` at `offset_bytes` of a block device read as zeroes (durable only after a
/// `sync_data`): a TRIM (`unmap`) punches a hole (the device may unmap it), falling back to
/// writing zeroes where the device cannot; WRITE_ZEROES writes zeroes (the kernel falls back to
/// zero pages itself). The primary does the same, so every image reads the same bytes afterwards.
fn zero_range(device: &File, offset_bytes: u64, len_bytes: u64, unmap: bool) -> std::io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let (offset, len) = (offset_bytes as libc::off_t, len_bytes as libc::off_t);
    let zero = || fallocate(device, FallocateFlags::FALLOC_FL_ZERO_RANGE, offset, len);
    let done = if unmap {
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(device, punch, offset, len) {
            Err(nix::errno::Errno::EOPNOTSUPP) => zero(),
            other => other,
        }
    } else {
        zero()
    };
    done.map_err(std::io::Error::from)
}

/// Stores the mirror database the primary sent (reconciled with this member's), durably.
fn store_mirror_db(state_dir: &std::path::Path, reconciled: &failback::Reconciled) -> Result<(), SessionEnd> {
    let db = &reconciled.db;
    let io = SessionEnd::State;
    db.store(state_dir).map_err(|e| io(e.to_string()))?;
    if let Some(name) = &reconciled.image_name {
        failback::store_name(state_dir, failback::IMAGE_NAME_FILE, &failback::IMAGE_NAME_KIND, name)
            .map_err(io)?;
    }
    // A resolve is honoured once: this member follows the kept primary from here on.
    crate::envelope::remove_file(state_dir, failback::RESOLVED_FILE).map_err(|e| io(e.to_string()))?;
    if reconciled.synchronized_here && state_dir.join(crate::logs::INTENT_LOG_FILE).exists() {
        tracing::info!(
            "SYNCHRONIZED with the new primary: forgetting this member's logs from when it was primary"
        );
        failback::forget_former_primary(state_dir);
    }
    tracing::debug!(mirror = %db.name, revision = db.revision, state = ?db.state, "mirror database stored");
    Ok(())
}

/// Hands a former primary's divergent extents to the new primary, `DIVERGENT_RUNS_MAX` runs
/// a frame; returns the next sequence.
fn send_divergent(
    stream: &mut TcpStream,
    runs: &[std::ops::Range<u64>],
    mut sequence: u64,
) -> Result<u64, SessionEnd> {
    if !runs.is_empty() {
        let extents: u64 = runs.iter().map(|r| r.end - r.start).sum();
        tracing::warn!(extents, "failing back: this member was primary; handing back the extents it wrote");
    }
    let mut payload = Vec::with_capacity(wire::DIVERGENT_RUNS_MAX * 16);
    for chunk in runs.chunks(wire::DIVERGENT_RUNS_MAX) {
        payload.clear();
        for run in chunk {
            payload.extend_from_slice(&run.start.to_le_bytes());
            payload.extend_from_slice(&run.end.to_le_bytes());
        }
        wire::write_frame(stream, &Message::DivergentRuns { runs: &payload }, sequence)?;
        sequence += 1;
    }
    Ok(sequence)
}
