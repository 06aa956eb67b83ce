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
use crate::device::BlockDevice;
use crate::metrics::SecondaryMetrics;
use crate::pool::BufferPool;
use crate::wire::{self, Limits, Message};

/// Settings of a secondary, fixed at start-up.
#[derive(Clone, Debug)]
pub struct SecondaryConfig {
    pub device: PathBuf,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Checked against the primary's Hello when given.
    pub mirror_id: Option<u64>,
    pub extent_bytes: Option<u64>,
    /// Writes in flight at once (and buffers in the pool).
    pub queue_depth: u16,
    /// Largest extent run in one frame.
    pub frame_data_bytes_max: usize,
    /// A session with no frame from the primary for this long is over.
    pub timeout_ms: u64,
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
    #[error("stopping")]
    Stop,
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
    std::fs::create_dir_all(&config.state_dir).map_err(|source| SecondaryError::Io {
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
    listener
        .set_nonblocking(true)
        .map_err(|source| SecondaryError::Listen { addr: config.listen, source })?;
    let expected = Expected {
        image_bytes: device.size_bytes(),
        mirror_id: config.mirror_id,
        extent_bytes: config.extent_bytes,
    };
    tracing::info!(device = %config.device.display(), listen = %config.listen, image_bytes = expected.image_bytes, "secondary ready");
    let sessions = SessionSlot::default();
    std::thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let (key, image, sessions) = (Arc::clone(&key), &image, &sessions);
            scope.spawn(move || {
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
    let timeout = Some(Duration::from_millis(config.timeout_ms));
    let setup = stream.set_nonblocking(false).and_then(|()| stream.set_read_timeout(timeout));
    if let Err(e) = setup.and_then(|()| stream.set_write_timeout(timeout)) {
        tracing::warn!(%peer, error = %e, "setting up a connection failed");
        return;
    }
    let params = match auth::secondary_handshake(&mut stream, key, expected) {
        Ok(params) => params,
        Err(e) => {
            stats.refused_connections.inc();
            tracing::warn!(%peer, error = %e, "refused a connection: handshake failed");
            return;
        }
    };
    let superseded = Arc::new(AtomicBool::new(false));
    if let Some(previous) = sessions.current.lock().expect("session slot").replace(Arc::clone(&superseded)) {
        // The primary reconnected (its old link is dead but our side has not timed out yet):
        // the newest authenticated session wins, after the old one has finished its writes.
        tracing::info!(%peer, "primary reconnected: ending the previous session");
        previous.store(true, Ordering::Relaxed);
    }
    let _image = sessions.image.lock().expect("image lock");
    if superseded.load(Ordering::Relaxed) {
        return;
    }
    stats.sessions.inc();
    stats.primary_connected.set(1);
    tracing::info!(%peer, mirror_id = params.mirror_id, extent_bytes = params.extent_bytes, "primary connected");
    let limits = Limits {
        image_bytes: expected.image_bytes,
        extent_bytes: params.extent_bytes,
        payload_bytes_max: (config.frame_data_bytes_max + 8) as u32,
    };
    let device = config.device.display().to_string();
    let end = Session::new(config, limits, image, &device)
        .map_err(SessionEnd::Io)
        .and_then(|mut session| session.run(&mut stream, [stop, &superseded], stats));
    stats.primary_connected.set(0);
    if matches!(end, Err(SessionEnd::Write { .. })) {
        stats.write_errors.inc();
    }
    match end {
        Err(SessionEnd::Write { .. }) | Err(SessionEnd::Wire(_)) | Err(SessionEnd::Unexpected(_)) => {
            let error = end.err().map(|e| e.to_string()).unwrap_or_default();
            tracing::error!(%peer, %error, "session ended");
            let _ = wire::write_frame(
                &mut stream,
                &Message::Error { code: auth::ERROR_PROTOCOL, message: &error },
                2,
            );
        }
        Err(e) => tracing::info!(%peer, reason = %e, "session ended"),
        Ok(()) => {}
    }
}

/// The one session allowed to write the image: `image` is held while a session runs; `current`
/// is the flag that asks the running session to end when a newer one authenticates.
#[derive(Default)]
struct SessionSlot {
    image: Mutex<()>,
    current: Mutex<Option<Arc<AtomicBool>>>,
}

const OP_RECV: u64 = u64::MAX;

/// One write in flight: which buffer, where, and which frame to acknowledge.
#[derive(Clone, Copy, Debug)]
struct Write {
    buffer: u16,
    offset_bytes: u64,
    len_bytes: usize,
    sequence: u64,
}

struct Session<'a> {
    ring: IoUring,
    pool: BufferPool,
    limits: Limits,
    image: &'a File,
    device: &'a str,
    timeout_ms: u64,
    /// Bytes received and not yet parsed: `stream[stream_start..stream_len]`. A recv in flight
    /// owns `stream[stream_len..]`; the parsed prefix is reclaimed only when none is.
    stream: Vec<u8>,
    stream_start: usize,
    stream_len: usize,
    recv_in_flight: bool,
    /// Indexed by buffer: the write that owns it.
    writes: Vec<Option<Write>>,
    next_ack_sequence: u64,
}

impl<'a> Session<'a> {
    fn new(
        config: &SecondaryConfig,
        limits: Limits,
        image: &'a File,
        device: &'a str,
    ) -> std::io::Result<Self> {
        let depth = config.queue_depth;
        let ring = IoUring::new(u32::from(depth).next_power_of_two() * 2)?;
        let pool =
            BufferPool::new(usize::from(depth), config.frame_data_bytes_max).map_err(std::io::Error::from)?;
        // SAFETY: the pool outlives the ring: `ring` is declared before `pool` in Session and so
        // is dropped first.
        unsafe { ring.submitter().register_buffers(&pool.iovecs())? };
        let frame_bytes_max = wire::HEADER_BYTES + limits.payload_bytes_max as usize;
        Ok(Self {
            ring,
            pool,
            limits,
            image,
            device,
            timeout_ms: config.timeout_ms,
            stream: vec![0; 2 * frame_bytes_max],
            stream_start: 0,
            stream_len: 0,
            recv_in_flight: false,
            writes: vec![None; usize::from(depth)],
            next_ack_sequence: 0,
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
            if self.parse_frames(stream)? {
                last_frame = Instant::now();
            }
            if !self.recv_in_flight {
                self.compact();
                if self.stream_len < self.stream.len() {
                    self.submit_recv(stream)?;
                }
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

    /// Moves the unparsed bytes to the front. Only while no recv is in flight.
    fn compact(&mut self) {
        assert!(!self.recv_in_flight);
        if self.stream_start > 0 {
            self.stream.copy_within(self.stream_start..self.stream_len, 0);
            self.stream_len -= self.stream_start;
            self.stream_start = 0;
        }
    }

    fn submit_recv(&mut self, stream: &TcpStream) -> Result<(), SessionEnd> {
        let free = &mut self.stream[self.stream_len..];
        let recv = opcode::Recv::new(types::Fd(stream.as_raw_fd()), free.as_mut_ptr(), free.len() as u32)
            .build()
            .user_data(OP_RECV);
        // SAFETY: `self.stream` is never resized, and `stream[stream_len..]` is not touched
        // while the recv is in flight (parsing reads below `stream_len`; `compact` asserts).
        unsafe { self.ring.submission().push(&recv) }.map_err(|_| std::io::Error::other("ring full"))?;
        self.recv_in_flight = true;
        Ok(())
    }

    /// Handles completions; returns whether bytes arrived.
    fn reap(&mut self, stream: &mut TcpStream, stats: &SecondaryMetrics) -> Result<bool, SessionEnd> {
        let mut received = false;
        let completions: Vec<(u64, i32)> =
            self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (user_data, result) in completions {
            if user_data == OP_RECV {
                self.recv_in_flight = false;
                match result {
                    0 => return Err(SessionEnd::Closed),
                    r if r < 0 => return Err(SessionEnd::Io(std::io::Error::from_raw_os_error(-r))),
                    r => {
                        self.stream_len += r as usize;
                        received = true;
                    }
                }
            } else {
                self.complete_write(user_data as u16, result, stream, stats)?;
            }
        }
        Ok(received)
    }

    fn complete_write(
        &mut self,
        buffer: u16,
        result: i32,
        stream: &mut TcpStream,
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
            return Err(SessionEnd::Write {
                device: self.device.into(),
                offset: write.offset_bytes,
                len: write.len_bytes,
                error,
            });
        }
        stats.written_bytes.inc_by(write.len_bytes as u64);
        stats.acked_frames.inc();
        let ack = Message::Ack { first_sequence: write.sequence, last_sequence: write.sequence };
        wire::write_frame(stream, &ack, self.next_ack_sequence)?;
        self.next_ack_sequence += 1;
        Ok(())
    }

    /// Parses whole frames from the stream buffer and starts their writes; stops at a partial
    /// frame, or when the next write must wait (no buffer, or it overlaps a write in flight).
    /// Returns whether a frame was consumed.
    fn parse_frames(&mut self, stream: &mut TcpStream) -> Result<bool, SessionEnd> {
        let mut any = false;
        loop {
            let consumed = self.stream_start;
            let bytes = &self.stream[consumed..self.stream_len];
            let Some((used, sequence, message)) = wire::parse_frame(bytes, &self.limits)? else {
                break;
            };
            match message {
                Message::ExtentData { offset_bytes, data } => {
                    let len_bytes = data.len();
                    if !self.can_start(offset_bytes, len_bytes) {
                        break;
                    }
                    let buffer = self.pool.take().expect("can_start checked a free buffer");
                    // Copy out of the stream buffer into an aligned, registered buffer for O_DIRECT.
                    let data_start = consumed + wire::EXTENT_PREFIX_BYTES;
                    let (source, pool) = (&self.stream[data_start..data_start + len_bytes], &mut self.pool);
                    pool.data_mut(buffer, len_bytes).copy_from_slice(source);
                    self.submit_write(Write { buffer, offset_bytes, len_bytes, sequence })?;
                }
                Message::Keepalive => wire::write_frame(stream, &Message::Keepalive, self.next_ack_sequence)
                    .map(|()| self.next_ack_sequence += 1)?,
                Message::Error { message, .. } => return Err(SessionEnd::PrimaryError(message.into())),
                other => return Err(SessionEnd::Unexpected(other.kind())),
            }
            self.stream_start += used;
            any = true;
        }
        Ok(any)
    }

    fn can_start(&self, offset_bytes: u64, len_bytes: usize) -> bool {
        let end = offset_bytes + len_bytes as u64;
        self.pool.free_count() > 0
            && self
                .writes
                .iter()
                .flatten()
                .all(|w| end <= w.offset_bytes || offset_bytes >= w.offset_bytes + w.len_bytes as u64)
    }

    fn submit_write(&mut self, write: Write) -> Result<(), SessionEnd> {
        assert!(self.writes[usize::from(write.buffer)].is_none());
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

    fn wait_for_writes(
        &mut self,
        stream: &mut TcpStream,
        stats: &SecondaryMetrics,
    ) -> Result<(), SessionEnd> {
        while self.writes.iter().any(Option::is_some) {
            self.ring.submit_and_wait(1)?;
            self.reap(stream, stats)?;
        }
        let _ = stream.flush();
        Ok(())
    }
}
