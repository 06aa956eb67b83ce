//! The NBD export: serves the primary's device to NBD clients (QEMU, qemu-io, libnbd, fio's
//! nbd engine, the kernel's nbd-client). Writes, flushes, TRIMs and WRITE_ZEROES go to the
//! engine, which writes the primary and, under the sync write policy, every SYNCHRONIZED
//! secondary before the client gets its reply. Reads are served here, from the primary image.
//!
//! Threads: an acceptor; per connection one thread, which runs the handshake, hands the
//! connection to the engine and then becomes its replier. The engine receives and decodes the
//! requests in its own ring (`primary::export::clients`), so a write reaches the ring without a
//! thread hop. Replies go out each whole: the engine gathers the replies without data that one
//! turn completes (`reply_batched`, in slot order) and writes them to the socket in one send
//! itself when nothing is queued before them (a part the socket does not take goes to the
//! replier thread); a reply outside a turn (a refused or malformed request) is written at once
//! the same way (`reply`); everything else, and every read (served from the primary image),
//! goes through the replier thread.
//!
//! Buffers: `buffers` of `block_bytes_max` each (plus a prefix page for the wire frame's
//! header, as in `pool`), mapped at start and shared by all connections through the free list,
//! at most `CONNECTION_BUFFERS_MAX` held by one connection. Ownership: free list -> for a write,
//! the engine (receives the data into it, and returns it once the primary write and every send
//! of a frame from it have completed); for a read, the replier thread (reads into it, returns
//! it after sending). The free list bounds the requests in flight.

pub mod nbd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::eventfd::EventFd;

use crate::pool::{HugeMapping, PREFIX_BYTES};
pub use nbd::{Command, ExportInfo};

/// Buffers (and so requests with data in flight) of one export, by default.
pub const BUFFERS_DEFAULT: u16 = 48;
/// Most buffers one connection holds at once: a client that stops reading its replies keeps
/// at most these, and the other clients go on with the rest.
pub const CONNECTION_BUFFERS_MAX: usize = 32;
/// The largest read or write a client may send, by default (advertised at `NBD_OPT_GO`).
pub const BLOCK_BYTES_MAX_DEFAULT: u32 = 1 << 20;
/// Most client connections at once.
pub const CONNECTIONS_MAX: usize = 16;
/// Replies (reads included) queued for one connection's replier thread before the engine stops
/// decoding that connection's requests: a client that floods reads, or stops reading its
/// replies, costs bounded memory.
pub const REPLIES_QUEUED_MAX: usize = 2 * CONNECTION_BUFFERS_MAX;
/// Replies to one connection that the engine gathers in one turn and sends together
/// (`Replier::reply_batched`, `Replier::flush_batch`): at queue depth 32 a turn completes
/// several writes, and one send wakes the client once instead of once per reply.
pub const REPLY_BATCH_MAX: usize = CONNECTION_BUFFERS_MAX;
/// How often the acceptor checks the stop flag.
const ACCEPT_POLL_MS: u64 = 50;
/// A client that has not finished its handshake this long after connecting is dropped, so idle
/// sockets (a port scan, a stuck client) cannot hold every connection place.
const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// TCP keepalive on clients past their handshake: probes after this much silence, this often,
/// this many times, so the place of a client whose host died is freed within about a minute.
const KEEPALIVE_IDLE_S: u32 = 30;
const KEEPALIVE_INTERVAL_S: u32 = 5;
const KEEPALIVE_PROBES: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export {target}: {what}: {source}")]
    Io { target: String, what: String, source: std::io::Error },
    #[error("--export {0:?}: expected nbd:ADDR:PORT or nbd+unix:PATH")]
    Target(String),
}

/// Where the export listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ExportTarget {
    type Err = ExportError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("nbd+unix:") {
            if path.is_empty() {
                return Err(ExportError::Target(text.into()));
            }
            return Ok(Self::Unix(path.into()));
        }
        let addr = text.strip_prefix("nbd:").ok_or_else(|| ExportError::Target(text.into()))?;
        addr.parse().map(Self::Tcp).map_err(|_| ExportError::Target(text.into()))
    }
}

impl std::fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "nbd:{addr}"),
            Self::Unix(path) => write!(f, "nbd+unix:{}", path.display()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub target: ExportTarget,
    pub buffers: u16,
    pub block_bytes_max: u32,
}

/// One page-aligned buffer: a prefix page, then `data_bytes_max` of data (O_DIRECT needs the
/// alignment; a wire frame's header goes at the end of the prefix, right before the data).
/// The buffers of an export are parts of one mapping on huge pages, so a client's 1 MiB write
/// reaches the primary device in one request (see `pool`'s header); each buffer keeps the
/// mapping alive.
pub struct ExportBuffer {
    base: NonNull<u8>,
    data_bytes_max: usize,
    _mapping: Arc<HugeMapping>,
}

// SAFETY: each buffer is its own part of the mapping; it is moved between threads, never
// shared.
unsafe impl Send for ExportBuffer {}

impl ExportBuffer {
    /// `count` buffers of `data_bytes_max` (a multiple of 4 KiB) each, in one mapping.
    fn new_set(count: usize, data_bytes_max: usize) -> nix::Result<Vec<Self>> {
        assert!(count > 0 && data_bytes_max > 0 && data_bytes_max.is_multiple_of(PREFIX_BYTES));
        let buffer_bytes = PREFIX_BYTES + data_bytes_max;
        let mapping = Arc::new(HugeMapping::new(buffer_bytes * count)?);
        let buffers = (0..count)
            .map(|i| {
                // SAFETY: buffer `i` is inside the mapping, which is at least `count` buffers.
                let base = unsafe { mapping.base().add(i * buffer_bytes) };
                Self { base, data_bytes_max, _mapping: Arc::clone(&mapping) }
            })
            .collect();
        Ok(buffers)
    }

    pub fn data_ptr(&self) -> *mut u8 {
        // SAFETY: the data area follows the prefix page inside the mapping.
        unsafe { self.base.as_ptr().add(PREFIX_BYTES) }
    }

    pub fn data(&self, len: usize) -> &[u8] {
        assert!(len <= self.data_bytes_max);
        // SAFETY: in bounds; owned (no I/O writes into it while borrowed: the owner submits).
        unsafe { std::slice::from_raw_parts(self.data_ptr(), len) }
    }

    pub fn data_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.data_bytes_max);
        // SAFETY: as above, exclusive through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(), len) }
    }

    /// The last `len` bytes of the prefix page, for a frame header and offset.
    pub fn prefix_tail_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= PREFIX_BYTES);
        // SAFETY: inside the prefix page; exclusive through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr().sub(len), len) }
    }
}

/// A request for the engine: a write (with its data), a flush, a TRIM or a WRITE_ZEROES.
pub struct ExportRequest {
    pub command: Command,
    pub fua: bool,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    pub cookie: u64,
    /// A write's data, `len_bytes` of it.
    pub buffer: Option<ExportBuffer>,
    /// Where the reply goes.
    pub reply: Arc<Replier>,
}

/// The export's buffers not in use, shared by the engine (which takes them for writes) and the
/// connections' replier threads (which take them for reads). `wanted` is set by the engine
/// when a connection waits for a buffer: the next one given back wakes it.
pub struct FreeList {
    buffers: Mutex<Vec<ExportBuffer>>,
    wanted: AtomicBool,
    wake: Arc<EventFd>,
}

impl FreeList {
    pub fn take(&self) -> Option<ExportBuffer> {
        self.buffers.lock().expect("free list lock").pop()
    }

    fn give(&self, buffer: ExportBuffer) {
        self.buffers.lock().expect("free list lock").push(buffer);
        if self.wanted.swap(false, Ordering::AcqRel) {
            let _ = self.wake.write(1);
        }
    }

    /// The engine waits for a buffer: the next one given back writes the wake eventfd.
    pub fn want(&self) {
        self.wanted.store(true, Ordering::Release);
    }
}

/// A connection's write side: the replies, each written whole, never interleaved.
pub struct Replier {
    side: Arc<WriteSide>,
    /// To the replier thread, which ends when the last `Replier` is dropped.
    queue: Sender<Reply>,
    free: Arc<FreeList>,
    /// Replies without data gathered by the engine this turn, not sent yet (cookie, error): at
    /// most `REPLY_BATCH_MAX`. Only the engine's thread touches it, so the lock is never
    /// contended; it is empty again after every `flush_batch`.
    batch: Mutex<Vec<(u64, u32)>>,
}

/// What the replier thread shares with the engine's direct writes.
struct WriteSide {
    /// Held while a reply is written.
    writer: Mutex<Writer>,
    /// Replies queued and not yet written (decremented under `writer`): a direct write happens
    /// only when it is zero, so a queued reply is never overtaken or interleaved.
    queued: std::sync::atomic::AtomicUsize,
    /// Export buffers this connection holds (at most `CONNECTION_BUFFERS_MAX`).
    held: std::sync::atomic::AtomicUsize,
    /// The engine stopped decoding this connection's requests (`REPLIES_QUEUED_MAX`): the
    /// replier thread wakes it once the queue is half empty.
    wanted: AtomicBool,
}

impl Replier {
    /// Whether the replier thread has `REPLIES_QUEUED_MAX` replies queued; if so, it wakes the
    /// engine once it has written half of them.
    pub fn backlogged(&self) -> bool {
        if self.side.queued.load(Ordering::Acquire) < REPLIES_QUEUED_MAX {
            return false;
        }
        self.side.wanted.store(true, Ordering::Release);
        // Checked again: the replier thread may have drained the queue in between.
        self.side.queued.load(Ordering::Acquire) >= REPLIES_QUEUED_MAX / 2
    }

    /// Sends a reply without data, as a batch of one: at once if the socket takes all 16 bytes
    /// without blocking and nothing is queued, else through the replier thread.
    pub fn reply(&self, cookie: u64, error: u32) {
        let mut batch = self.batch.lock().expect("reply batch lock");
        assert!(batch.is_empty(), "a reply outside a turn's batch");
        batch.push((cookie, error));
        self.send_batch(&mut batch);
    }

    /// Adds a reply without data to this turn's batch; returns whether the batch was empty, so
    /// the caller knows to `flush_batch` this connection before its turn ends. A full batch is
    /// sent at once.
    pub fn reply_batched(&self, cookie: u64, error: u32) -> bool {
        let mut batch = self.batch.lock().expect("reply batch lock");
        let first = batch.is_empty();
        if batch.len() == REPLY_BATCH_MAX {
            self.send_batch(&mut batch);
        }
        batch.push((cookie, error));
        first
    }

    /// Sends the replies batched this turn: in one send when the socket takes them without
    /// blocking and nothing is queued, else through the replier thread, in order.
    pub fn flush_batch(&self) {
        let mut batch = self.batch.lock().expect("reply batch lock");
        self.send_batch(&mut batch);
    }

    fn send_batch(&self, batch: &mut Vec<(u64, u32)>) {
        if batch.is_empty() {
            return;
        }
        assert!(batch.len() <= REPLY_BATCH_MAX);
        if let Ok(mut writer) = self.side.writer.try_lock()
            && self.side.queued.load(Ordering::Acquire) == 0
        {
            // Encoded only to be sent here: queued replies are encoded by the replier thread.
            let mut bytes = [0u8; REPLY_BATCH_MAX * nbd::REPLY_BYTES];
            for (at, &(cookie, error)) in batch.iter().enumerate() {
                bytes[at * nbd::REPLY_BYTES..][..nbd::REPLY_BYTES]
                    .copy_from_slice(&nbd::encode_reply(cookie, error));
            }
            let len = batch.len() * nbd::REPLY_BYTES;
            match writer.stream.send_nonblocking(&bytes[..len]) {
                Ok(n) if n == len => {
                    batch.clear();
                    return;
                }
                Ok(0) | Err(_) => {}
                Ok(n) => {
                    // The socket took part of it. The rest is kept under the lock, and the
                    // replier thread writes it before anything else, queued before or after.
                    assert!(writer.tail.is_empty(), "no tail is left while nothing is queued");
                    writer.tail.extend_from_slice(&bytes[n..len]);
                    #[cfg(test)]
                    tests::PARTIAL_BATCHES.fetch_add(1, Ordering::Relaxed);
                    batch.clear();
                    self.enqueue(Reply::Tail);
                    return;
                }
            }
        }
        for (cookie, error) in batch.drain(..) {
            self.enqueue(Reply::Done { cookie, error });
        }
    }

    /// Has the replier thread read `len_bytes` at `offset_bytes` from the primary and send it.
    pub fn read(&self, cookie: u64, offset_bytes: u64, len_bytes: u32) {
        // Batches live only inside the engine's `advance_exports`, which flushes them: a read
        // (decoded outside it) finds none open, and cannot overtake a batched reply.
        assert!(self.batch.lock().expect("reply batch lock").is_empty(), "a read outside a turn's batch");
        self.enqueue(Reply::Read { cookie, offset_bytes, len_bytes });
    }

    /// A free buffer for this connection, if it holds less than its share and one is free.
    pub fn take_buffer(&self) -> Option<ExportBuffer> {
        self.side.take_buffer(&self.free)
    }

    /// Returns a buffer this connection held to the export's free list.
    pub fn give_back(&self, buffer: ExportBuffer) {
        self.side.give_back(buffer, &self.free);
    }

    /// Never blocks: a slow client holds up its replier thread only.
    fn enqueue(&self, reply: Reply) {
        self.side.queued.fetch_add(1, Ordering::AcqRel);
        if self.queue.send(reply).is_err() {
            self.side.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl WriteSide {
    /// A buffer from `free` for this connection, if it holds less than its share and one is
    /// free. The engine (writes) and the replier thread (reads) both take through here.
    fn take_buffer(&self, free: &FreeList) -> Option<ExportBuffer> {
        if self.held.load(Ordering::Acquire) >= CONNECTION_BUFFERS_MAX {
            return None;
        }
        let buffer = free.take()?;
        self.held.fetch_add(1, Ordering::AcqRel);
        Some(buffer)
    }

    fn give_back(&self, buffer: ExportBuffer, free: &FreeList) {
        self.held.fetch_sub(1, Ordering::AcqRel);
        free.give(buffer);
    }
}

struct Writer {
    stream: Stream,
    /// The unsent rest of replies the engine wrote in part: it goes out before anything else.
    /// Empty unless a `Reply::Tail` is queued; at most `REPLY_BATCH_MAX` replies' bytes.
    tail: Vec<u8>,
}

/// What the replier thread sends.
enum Reply {
    Done {
        cookie: u64,
        error: u32,
    },
    /// A read: served from the primary image by the replier thread.
    Read {
        cookie: u64,
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// Wakes the replier thread for the rest of a reply the engine began (`Writer::tail`).
    Tail,
}

/// A client past its handshake, handed to the engine, which receives and decodes its requests.
pub struct Connection {
    pub stream: Stream,
    pub reply: Arc<Replier>,
    pub client: String,
}

/// The engine's end of an export: new connections arrive on `connections`; `wake` is
/// signalled after each (and when a buffer comes back that the engine waits for), so the
/// engine's ring wakes up.
pub struct EngineSide {
    pub connections: Receiver<Connection>,
    pub wake: Arc<EventFd>,
    pub free: Arc<FreeList>,
    pub info: ExportInfo,
}

/// A running export: its acceptor thread and connections, stopped on drop.
pub struct Export {
    stop: Arc<AtomicBool>,
    /// Every open connection, by id, so that a stop can shut them down.
    streams: Arc<Mutex<Vec<(u64, Stream)>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
    target: ExportTarget,
}

/// Everything a connection's thread shares.
#[derive(Clone)]
struct Shared {
    info: ExportInfo,
    device: Arc<std::fs::File>,
    connections: SyncSender<Connection>,
    wake: Arc<EventFd>,
    free: Arc<FreeList>,
    stop: Arc<AtomicBool>,
    /// Every open connection, by id, so that a stop can shut them down.
    streams: Arc<Mutex<Vec<(u64, Stream)>>>,
}

/// A client connection, TCP or unix.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self) {
        self.shutdown_side(std::net::Shutdown::Both);
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(timeout),
            Self::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    /// TCP keepalive (`KEEPALIVE_*`); nothing for a unix socket, whose peer's death the kernel
    /// reports at once.
    fn set_keepalive(&self) -> nix::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        let Self::Tcp(s) = self else { return Ok(()) };
        setsockopt(s, sockopt::KeepAlive, &true)?;
        setsockopt(s, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_S)?;
        setsockopt(s, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_S)?;
        setsockopt(s, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)
    }

    /// Stops receiving only: a recv in flight completes, replies still go out.
    pub fn shutdown_read(&self) {
        self.shutdown_side(std::net::Shutdown::Read);
    }

    fn shutdown_side(&self, how: std::net::Shutdown) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        };
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd as _;
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }

    /// One `send` with `MSG_DONTWAIT`: never blocks, may take part of `bytes`.
    fn send_nonblocking(&self, bytes: &[u8]) -> std::io::Result<usize> {
        // SAFETY: a valid socket and a readable buffer of bytes.len() bytes.
        let sent = unsafe {
            libc::send(self.fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if sent < 0 { Err(std::io::Error::last_os_error()) } else { Ok(sent as usize) }
    }

    fn peer(&self) -> String {
        match self {
            Self::Tcp(s) => s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            Self::Unix(_) => "unix socket".into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Export {
    /// Listens on `config.target` and serves `device` (opened here for O_DIRECT reads);
    /// returns the running export and the engine's end of it.
    pub fn start(
        config: &ExportConfig,
        device: &std::path::Path,
        info: ExportInfo,
    ) -> Result<(Self, EngineSide), ExportError> {
        let target = config.target.to_string();
        let io = |what: &str| {
            let (target, what) = (target.clone(), what.to_owned());
            move |source| ExportError::Io { target, what, source }
        };
        let listener = match &config.target {
            ExportTarget::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr).map_err(io("listening"))?),
            ExportTarget::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt as _;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
                }
                let listener = UnixListener::bind(path).map_err(io("listening"))?;
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io("restricting the socket to its owner"))?;
                Listener::Unix(listener)
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
        .map_err(io("setting the listener non-blocking"))?;
        let device = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(device)
            .map_err(io(&format!("opening {} for reads", device.display())))?;
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
                .map_err(|e| io("creating an eventfd")(e.into()))?,
        );
        let buffers = ExportBuffer::new_set(usize::from(config.buffers), config.block_bytes_max as usize)
            .map_err(|e| io("allocating buffers")(e.into()))?;
        let free = Arc::new(FreeList {
            buffers: Mutex::new(buffers),
            wanted: AtomicBool::new(false),
            wake: Arc::clone(&wake),
        });
        let (connections_tx, connections) = std::sync::mpsc::sync_channel(CONNECTIONS_MAX);
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            info: info.clone(),
            device: Arc::new(device),
            connections: connections_tx,
            wake: Arc::clone(&wake),
            free: Arc::clone(&free),
            stop: Arc::clone(&stop),
            streams: Arc::clone(&streams),
        };
        let acceptor = std::thread::Builder::new()
            .name("export-accept".into())
            .spawn(move || accept(listener, shared))
            .map_err(io("starting the acceptor"))?;
        tracing::info!(export = %config.target, "NBD export listening");
        let export = Self { stop, streams, acceptor: Some(acceptor), target: config.target.clone() };
        Ok((export, EngineSide { connections, wake, free, info }))
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (_, stream) in self.streams.lock().expect("streams lock").drain(..) {
            stream.shutdown();
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        if let ExportTarget::Unix(path) = &self.target {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn accept(listener: Listener, shared: Shared) {
    let mut id = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        id += 1;
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                s.set_nonblocking(false).map(|()| Stream::Tcp(s))
            }),
            Listener::Unix(l) => l.accept().map(|(s, _)| s.set_nonblocking(false).map(|()| Stream::Unix(s))),
        };
        let stream = match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::warn!(%error, "export: setting up a connection failed");
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "export: accept failed");
                std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                continue;
            }
        };
        let peer = stream.peer();
        {
            let mut streams = shared.streams.lock().expect("streams lock");
            if streams.len() >= CONNECTIONS_MAX {
                tracing::warn!(client = %peer, "export: {CONNECTIONS_MAX} clients already; refusing another");
                continue;
            }
            match stream.try_clone() {
                Ok(clone) => streams.push((id, clone)),
                Err(error) => {
                    tracing::warn!(client = %peer, %error, "export: cloning the connection failed");
                    continue;
                }
            }
        }
        let shared = shared.clone();
        let spawned = std::thread::Builder::new().name("export-conn".into()).spawn(move || {
            serve_connection(stream, &peer, &shared);
            shared.streams.lock().expect("streams lock").retain(|(i, _)| *i != id);
        });
        if let Err(error) = spawned {
            tracing::warn!(%error, "export: starting a connection thread failed");
        }
    }
}

/// A connection's thread: the handshake, then the connection goes to the engine (which
/// receives and decodes its requests in its ring, a thread hop less for every write) and this
/// thread becomes its replier. The socket closes once the engine and every request in flight
/// have let go of the connection.
fn serve_connection(mut stream: Stream, peer: &str, shared: &Shared) {
    let handshake = stream
        .set_read_timeout(Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS)))
        .map_err(nbd::NbdError::from)
        .and_then(|()| nbd::handshake(&mut stream, &shared.info))
        .and_then(|()| stream.set_read_timeout(None).map_err(nbd::NbdError::from));
    if let Err(error) = handshake {
        let timed_out = matches!(&error, nbd::NbdError::Io(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        if timed_out {
            tracing::warn!(client = %peer, "export: client disconnected: no handshake within {HANDSHAKE_TIMEOUT_MS} ms");
        } else if !matches!(error, nbd::NbdError::Aborted) {
            tracing::warn!(client = %peer, reason = %error, "export: client disconnected during the handshake");
        }
        stream.shutdown();
        return;
    }
    let (Ok(writer), Ok(engine_stream)) = (stream.try_clone(), stream.try_clone()) else {
        tracing::warn!(client = %peer, "export: cloning the connection failed");
        stream.shutdown();
        return;
    };
    if let Err(error) = stream.set_keepalive() {
        tracing::warn!(client = %peer, %error, "export: setting TCP keepalive failed; a dead client's place is freed only when the engine stops");
    }
    tracing::info!(client = %peer, "export: client connected");
    let (side, reply, replies) = replier(writer, &shared.free);
    let connection = Connection { stream: engine_stream, reply, client: peer.to_owned() };
    // The engine is stopping when it no longer takes connections; the replier then ends at once.
    if shared.connections.send(connection).is_ok() {
        let _ = shared.wake.write(1);
    }
    send_replies(&side, replies, shared);
    tracing::info!(client = %peer, "export: client disconnected");
    stream.shutdown();
}

/// A connection's reply side: what the engine holds (`Replier`), what it shares with the
/// replier thread (`WriteSide`), and the replier thread's end of the queue.
fn replier(writer: Stream, free: &Arc<FreeList>) -> (Arc<WriteSide>, Arc<Replier>, Receiver<Reply>) {
    let (queue, replies) = std::sync::mpsc::channel();
    let side = Arc::new(WriteSide {
        writer: Mutex::new(Writer {
            stream: writer,
            tail: Vec::with_capacity(REPLY_BATCH_MAX * nbd::REPLY_BYTES),
        }),
        queued: std::sync::atomic::AtomicUsize::new(0),
        held: std::sync::atomic::AtomicUsize::new(0),
        wanted: AtomicBool::new(false),
    });
    let reply = Arc::new(Replier {
        side: Arc::clone(&side),
        queue,
        free: Arc::clone(free),
        batch: Mutex::new(Vec::with_capacity(REPLY_BATCH_MAX)),
    });
    (side, reply, replies)
}

/// The replier: writes the queued replies, blocking as a slow client needs, and serves reads
/// from the primary image (O_DIRECT pread). Ends when every holder of the connection's
/// `Replier` is gone.
fn send_replies(side: &WriteSide, replies: Receiver<Reply>, shared: &Shared) {
    let mut broken = false;
    for reply in replies {
        let read = match &reply {
            Reply::Read { cookie, offset_bytes, len_bytes } => {
                Some(read_block(side, shared, *offset_bytes, *len_bytes).map_err(|e| (*cookie, e)))
            }
            _ => None,
        };
        let mut writer = side.writer.lock().expect("replier lock");
        let Writer { stream, tail } = &mut *writer;
        let tail_sent = stream.write_all(tail);
        tail.clear();
        let sent = tail_sent.and_then(|()| match (&reply, &read) {
            (Reply::Done { cookie, error }, _) => stream.write_all(&nbd::encode_reply(*cookie, *error)),
            (Reply::Read { cookie, len_bytes, .. }, Some(Ok(buffer))) => stream
                .write_all(&nbd::encode_reply(*cookie, 0))
                .and_then(|()| stream.write_all(buffer.data(*len_bytes as usize))),
            (Reply::Read { .. }, Some(Err((cookie, error)))) => {
                stream.write_all(&nbd::encode_reply(*cookie, *error))
            }
            _ => Ok(()),
        });
        if sent.is_err() && !broken {
            // The client is gone; keep draining so buffers go back and nobody blocks.
            stream.shutdown();
            broken = true;
        }
        let queued = side.queued.fetch_sub(1, Ordering::AcqRel) - 1;
        drop(writer);
        if queued <= REPLIES_QUEUED_MAX / 2 && side.wanted.swap(false, Ordering::AcqRel) {
            let _ = shared.wake.write(1);
        }
        if let Some(Ok(buffer)) = read {
            side.give_back(buffer, &shared.free);
        }
    }
}

/// Reads a block from the primary image into a free buffer (waiting while the connection holds
/// its share or none is free); an I/O error is the client's `EIO`, not the end of the connection.
fn read_block(
    side: &WriteSide,
    shared: &Shared,
    offset_bytes: u64,
    len_bytes: u32,
) -> Result<ExportBuffer, u32> {
    let mut buffer = loop {
        if let Some(buffer) = side.take_buffer(&shared.free) {
            break buffer;
        }
        if shared.stop.load(Ordering::Relaxed) {
            return Err(nbd::EIO);
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let len = len_bytes as usize;
    match shared.device.read_exact_at(buffer.data_mut(len), offset_bytes) {
        Ok(()) => Ok(buffer),
        Err(error) => {
            tracing::error!(offset = offset_bytes, len, %error, "export: read from the primary failed");
            side.give_back(buffer, &shared.free);
            Err(nbd::EIO)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches the socket took only part of (`send_batch`'s tail path).
    pub(super) static PARTIAL_BATCHES: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn buffers_of_one_mapping_are_apart_and_outlive_each_other() {
        let mut buffers = ExportBuffer::new_set(3, 1 << 20).expect("mmap");
        for (i, buffer) in buffers.iter_mut().enumerate() {
            assert_eq!(buffer.data_ptr() as usize % 4096, 0);
            buffer.data_mut(1 << 20).fill(i as u8);
            buffer.prefix_tail_mut(64).fill(0xee);
        }
        let last = buffers.pop().expect("three");
        drop(buffers); // the mapping stays while a buffer holds it
        assert!(last.data(1 << 20).iter().all(|&b| b == 2));
    }

    /// Batches of replies sent by the engine while the client does not read, over TCP and a
    /// unix socket: the socket takes part of a batch (TCP; its tail goes through the replier
    /// thread), then nothing (whole batches are queued); every reply arrives once, whole, in the
    /// order the engine made them.
    #[test]
    fn batched_replies_arrive_whole_and_in_order_when_the_socket_is_full() {
        use nix::sys::socket::{setsockopt, sockopt};
        let (server, client) = UnixStream::pair().expect("socket pair");
        // The smallest buffers the kernel allows, so the socket fills within a few batches.
        setsockopt(&server, sockopt::SndBuf, &1).expect("SO_SNDBUF");
        replies_arrive_in_order(Stream::Unix(server), client);
        let listener = TcpListener::bind("127.0.0.1:0").expect("listening on loopback");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connecting");
        setsockopt(&client, sockopt::RcvBuf, &1).expect("SO_RCVBUF");
        let (server, _) = listener.accept().expect("accepting");
        setsockopt(&server, sockopt::SndBuf, &1).expect("SO_SNDBUF");
        let partial_before = PARTIAL_BATCHES.load(Ordering::Relaxed);
        replies_arrive_in_order(Stream::Tcp(server), client);
        assert!(
            PARTIAL_BATCHES.load(Ordering::Relaxed) > partial_before,
            "over TCP the socket took part of a batch at least once (its tail went to the replier thread)"
        );
    }

    fn replies_arrive_in_order(server: Stream, mut client: impl std::io::Read) {
        const REPLIES: u64 = 5000;
        let wake = Arc::new(EventFd::new().expect("eventfd"));
        let free = Arc::new(FreeList {
            buffers: Mutex::new(Vec::new()),
            wanted: AtomicBool::new(false),
            wake: Arc::clone(&wake),
        });
        let (connections, _engine) = std::sync::mpsc::sync_channel(1);
        let shared = Arc::new(Shared {
            info: ExportInfo {
                name: String::new(),
                image_bytes: 0,
                block_bytes_min: 512,
                block_bytes_max: 4096,
            },
            device: Arc::new(std::fs::File::open("/dev/null").expect("/dev/null")),
            connections,
            wake,
            free: Arc::clone(&free),
            stop: Arc::new(AtomicBool::new(false)),
            streams: Arc::new(Mutex::new(Vec::new())),
        });
        let (side, replier, replies) = replier(server, &free);
        let thread_shared = Arc::clone(&shared);
        let replier_thread = std::thread::spawn(move || send_replies(&side, replies, &thread_shared));
        let mut cookie = 0;
        let mut batch_len = 1;
        while cookie < REPLIES {
            for _ in 0..batch_len.min(REPLIES - cookie) {
                replier.reply_batched(cookie, (cookie % 7) as u32);
                cookie += 1;
            }
            replier.flush_batch();
            batch_len = batch_len % (REPLY_BATCH_MAX as u64 + 5) + 1; // past a full batch too
        }
        assert!(
            replier.side.queued.load(Ordering::Acquire) > 0,
            "the socket filled and replies were queued for the replier thread"
        );
        drop(replier); // the replier thread ends once the queue is written
        let mut bytes = Vec::new();
        client.read_to_end(&mut bytes).expect("reading the replies");
        replier_thread.join().expect("replier thread");
        assert_eq!(bytes.len() as u64, REPLIES * nbd::REPLY_BYTES as u64);
        for (n, reply) in bytes.chunks(nbd::REPLY_BYTES).enumerate() {
            assert_eq!(reply, nbd::encode_reply(n as u64, (n % 7) as u32), "reply {n}");
        }
    }

    #[test]
    fn export_targets() {
        assert_eq!(
            "nbd:127.0.0.1:10809".parse::<ExportTarget>().unwrap(),
            ExportTarget::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "nbd+unix:/run/r.sock".parse::<ExportTarget>().unwrap(),
            ExportTarget::Unix("/run/r.sock".into())
        );
        assert!("nbd+unix:".parse::<ExportTarget>().is_err());
        assert!("127.0.0.1:10809".parse::<ExportTarget>().is_err());
        assert!("nbd:host".parse::<ExportTarget>().is_err());
    }
}
