//! The NBD export: serves the primary's device to NBD clients (QEMU, qemu-io, libnbd, fio's
//! nbd engine, the kernel's nbd-client). Writes, flushes, TRIMs and WRITE_ZEROES go to the
//! engine, which writes the primary and, under the sync write policy, every SYNCHRONIZED
//! secondary before the client gets its reply. Reads are served here, from the primary image.
//!
//! Threads: an acceptor; per connection a reader (decodes requests, receives a write's data
//! into an export buffer, hands the request to the engine, serves reads) and a replier thread.
//! Replies go out as they complete, in completion order, each whole: the engine writes a
//! write's 16-byte reply itself when the socket takes it at once and nothing is queued before
//! it (a thread hop less on the latency path); everything else goes through the replier thread.
//!
//! Buffers: `buffers` of `block_bytes_max` each (plus a prefix page for the wire frame's
//! header, as in `pool`), mapped at start and shared by all connections through a bounded free
//! list, at most `CONNECTION_BUFFERS_MAX` held by one connection. Ownership: free list -> a
//! reader (fills it) -> for a read, the replier, which returns it after sending; for a write,
//! the engine, which returns it once the primary write and every send of a frame from it have
//! completed. The free list bounds the requests in flight.

pub mod nbd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::eventfd::EventFd;
use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};

use crate::pool::PREFIX_BYTES;
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
/// Bytes a connection's reader takes from the socket at once.
const READ_AHEAD_BYTES: usize = 256 * 1024;
/// How often the acceptor checks the stop flag.
const ACCEPT_POLL_MS: u64 = 50;

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
pub struct ExportBuffer {
    base: NonNull<u8>,
    data_bytes_max: usize,
}

// SAFETY: the buffer owns its mapping; it is moved between threads, never shared.
unsafe impl Send for ExportBuffer {}

impl ExportBuffer {
    fn new(data_bytes_max: usize) -> nix::Result<Self> {
        assert!(data_bytes_max > 0 && data_bytes_max.is_multiple_of(PREFIX_BYTES));
        let bytes = NonZeroUsize::new(PREFIX_BYTES + data_bytes_max).expect("non-zero");
        // SAFETY: a fresh private anonymous mapping, owned by this buffer until drop.
        let base = unsafe {
            mmap_anonymous(None, bytes, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE)?
        };
        Ok(Self { base: base.cast(), data_bytes_max })
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

impl Drop for ExportBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; no I/O uses it once its owner drops it.
        let _ = unsafe { munmap(self.base.cast(), PREFIX_BYTES + self.data_bytes_max) };
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

/// A connection's write side: the replies, each written whole, never interleaved.
pub struct Replier {
    side: Arc<WriteSide>,
    /// To the replier thread, which ends when the last `Replier` is dropped.
    queue: Sender<Reply>,
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
}

impl Replier {
    /// Sends a reply without data: at once if the socket takes all 16 bytes without blocking
    /// and nothing is queued, else through the replier thread.
    pub fn reply(&self, cookie: u64, error: u32) {
        let header = nbd::encode_reply(cookie, error);
        if let Ok(mut writer) = self.side.writer.try_lock()
            && self.side.queued.load(Ordering::Acquire) == 0
        {
            match writer.stream.send_nonblocking(&header) {
                Ok(n) if n == header.len() => return,
                Ok(0) | Err(_) => {}
                Ok(n) => {
                    // Rare: the socket took part of it. The rest is kept under the lock, and the
                    // replier thread writes it before anything else, queued before or after.
                    writer.tail = Some((header, n));
                    self.enqueue(Reply::Tail);
                    return;
                }
            }
        }
        self.enqueue(Reply::Done { cookie, error, data: None });
    }

    /// Returns a buffer this connection held to the export's free list.
    pub fn give_back(&self, buffer: ExportBuffer, free: &Sender<ExportBuffer>) {
        self.side.held.fetch_sub(1, Ordering::AcqRel);
        let _ = free.send(buffer);
    }

    /// A free buffer for this connection, waiting while it holds its share or none is free.
    fn take_buffer(&self, shared: &Shared) -> Result<ExportBuffer, ConnectionEnd> {
        while self.side.held.load(Ordering::Acquire) >= CONNECTION_BUFFERS_MAX {
            if shared.stop.load(Ordering::Relaxed) {
                return Err(ConnectionEnd::Stopping);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let buffer = take_buffer(shared)?;
        self.side.held.fetch_add(1, Ordering::AcqRel);
        Ok(buffer)
    }

    /// Never blocks: a slow client holds up its replier thread only.
    fn enqueue(&self, reply: Reply) {
        self.side.queued.fetch_add(1, Ordering::AcqRel);
        if self.queue.send(reply).is_err() {
            self.side.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

struct Writer {
    stream: Stream,
    /// The unsent rest of a reply the engine wrote in part: it goes out before anything else.
    tail: Option<([u8; nbd::REPLY_BYTES], usize)>,
}

/// A reply for the replier thread to send.
pub enum Reply {
    Done {
        cookie: u64,
        error: u32,
        /// A read's data: the buffer and how many bytes of it.
        data: Option<(ExportBuffer, usize)>,
    },
    /// Wakes the replier thread for the rest of a reply the engine began (`Writer::tail`).
    Tail,
}

/// The engine's end of an export: requests arrive on `requests`; `wake` is signalled after
/// each so the engine's ring wakes up; written buffers go back through `free`.
pub struct EngineSide {
    pub requests: Receiver<ExportRequest>,
    pub wake: Arc<EventFd>,
    pub free: Sender<ExportBuffer>,
}

/// A running export: its acceptor thread and connections, stopped on drop.
pub struct Export {
    stop: Arc<AtomicBool>,
    /// Every open connection, by id, so that a stop can shut them down.
    streams: Arc<Mutex<Vec<(u64, Stream)>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
    target: ExportTarget,
}

/// Everything a connection's threads share.
#[derive(Clone)]
struct Shared {
    info: ExportInfo,
    device: Arc<std::fs::File>,
    requests: SyncSender<ExportRequest>,
    wake: Arc<EventFd>,
    free_tx: Sender<ExportBuffer>,
    free_rx: Arc<Mutex<Receiver<ExportBuffer>>>,
    stop: Arc<AtomicBool>,
    /// Every open connection, by id, so that a stop can shut them down.
    streams: Arc<Mutex<Vec<(u64, Stream)>>>,
}

/// A client connection, TCP or unix.
enum Stream {
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

    fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// One `send` with `MSG_DONTWAIT`: never blocks, may take part of `bytes`.
    fn send_nonblocking(&self, bytes: &[u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        let fd = match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        };
        // SAFETY: a valid socket and a readable buffer of bytes.len() bytes.
        let sent = unsafe {
            libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
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
        let (free_tx, free_rx) = std::sync::mpsc::channel();
        for _ in 0..config.buffers {
            let buffer = ExportBuffer::new(config.block_bytes_max as usize)
                .map_err(|e| io("allocating buffers")(e.into()))?;
            free_tx.send(buffer).expect("receiver alive");
        }
        let (requests_tx, requests) = std::sync::mpsc::sync_channel(usize::from(config.buffers) * 2);
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
                .map_err(|e| io("creating an eventfd")(e.into()))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            info,
            device: Arc::new(device),
            requests: requests_tx,
            wake: Arc::clone(&wake),
            free_tx: free_tx.clone(),
            free_rx: Arc::new(Mutex::new(free_rx)),
            stop: Arc::clone(&stop),
            streams: Arc::clone(&streams),
        };
        let acceptor = std::thread::Builder::new()
            .name("export-accept".into())
            .spawn(move || accept(listener, shared))
            .map_err(io("starting the acceptor"))?;
        tracing::info!(export = %config.target, "NBD export listening");
        let export = Self { stop, streams, acceptor: Some(acceptor), target: config.target.clone() };
        Ok((export, EngineSide { requests, wake, free: free_tx }))
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

/// Why a connection ended, for its log line.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client disconnected")]
    Disconnect,
    #[error("the export is stopping")]
    Stopping,
}

fn serve_connection(mut stream: Stream, peer: &str, shared: &Shared) {
    let outcome = nbd::handshake(&mut stream, &shared.info).map_err(ConnectionEnd::from).and_then(|()| {
        tracing::info!(client = %peer, "export: client connected");
        let (queue, replies) = std::sync::mpsc::channel();
        let side = Arc::new(WriteSide {
            writer: Mutex::new(Writer { stream: stream.try_clone()?, tail: None }),
            queued: std::sync::atomic::AtomicUsize::new(0),
            held: std::sync::atomic::AtomicUsize::new(0),
        });
        let replier = Arc::new(Replier { side: Arc::clone(&side), queue });
        let free = shared.free_tx.clone();
        let thread = std::thread::Builder::new()
            .name("export-reply".into())
            .spawn(move || send_replies(&side, replies, free))?;
        let mut reader = std::io::BufReader::with_capacity(READ_AHEAD_BYTES, stream.try_clone()?);
        let outcome = read_requests(&mut reader, shared, &replier);
        if !matches!(outcome, Err(ConnectionEnd::Disconnect)) {
            // A broken client: stop at once. After NBD_CMD_DISC the requests in flight still
            // complete and their replies go out before the connection closes.
            stream.shutdown();
        }
        // The replier thread ends once the engine has dropped this connection's last request.
        drop(replier);
        let _ = thread.join();
        outcome
    });
    match outcome {
        Ok(()) | Err(ConnectionEnd::Disconnect) => {
            tracing::info!(client = %peer, "export: client disconnected")
        }
        Err(ConnectionEnd::Nbd(nbd::NbdError::Aborted)) => {}
        Err(end) => {
            tracing::warn!(client = %peer, reason = %end, "export: client disconnected for a protocol error")
        }
    }
    stream.shutdown();
}

/// The reader: decodes requests until the client disconnects or breaks the protocol. Reads
/// through a buffer, so that a client with many requests in flight costs fewer syscalls.
fn read_requests(
    stream: &mut std::io::BufReader<Stream>,
    shared: &Shared,
    reply: &Arc<Replier>,
) -> Result<(), ConnectionEnd> {
    loop {
        let mut header = [0u8; nbd::REQUEST_BYTES];
        stream.read_exact(&mut header)?;
        if shared.stop.load(Ordering::Relaxed) {
            return Err(ConnectionEnd::Stopping);
        }
        let request = nbd::decode_request(&header, &shared.info)?;
        let aligned = request.aligned(shared.info.block_bytes_min);
        match request.command {
            Command::Disconnect => return Err(ConnectionEnd::Disconnect),
            Command::Read => {
                let error = if aligned { 0 } else { nbd::EINVAL };
                let data = if error == 0 { Some(read_block(shared, &request, reply)?) } else { None };
                let (error, data) = match data {
                    Some(Ok(data)) => (0, Some(data)),
                    Some(Err(error)) => (error, None),
                    None => (error, None),
                };
                send_reply(reply, Reply::Done { cookie: request.cookie, error, data });
            }
            Command::Write if request.len_bytes == 0 => {
                send_reply(reply, Reply::Done { cookie: request.cookie, error: 0, data: None });
            }
            Command::Write => {
                let mut buffer = reply.take_buffer(shared)?;
                stream.read_exact(buffer.data_mut(request.len_bytes as usize))?;
                if !aligned {
                    reply.give_back(buffer, &shared.free_tx);
                    send_reply(reply, Reply::Done { cookie: request.cookie, error: nbd::EINVAL, data: None });
                    continue;
                }
                submit(shared, &request, Some(buffer), reply)?;
            }
            Command::Cache => send_reply(reply, Reply::Done { cookie: request.cookie, error: 0, data: None }),
            Command::Flush | Command::Trim | Command::WriteZeroes => {
                if !aligned || (request.command != Command::Flush && request.len_bytes == 0) {
                    let error = if aligned { 0 } else { nbd::EINVAL };
                    send_reply(reply, Reply::Done { cookie: request.cookie, error, data: None });
                    continue;
                }
                submit(shared, &request, None, reply)?;
            }
        }
    }
}

fn send_reply(reply: &Replier, message: Reply) {
    reply.enqueue(message);
}

/// A free buffer, waiting for one if all are in flight (the bound on requests in flight).
fn take_buffer(shared: &Shared) -> Result<ExportBuffer, ConnectionEnd> {
    let free = shared.free_rx.lock().expect("free list lock");
    loop {
        match free.recv_timeout(Duration::from_millis(ACCEPT_POLL_MS)) {
            Ok(buffer) => return Ok(buffer),
            Err(_) if shared.stop.load(Ordering::Relaxed) => return Err(ConnectionEnd::Stopping),
            Err(_) => {}
        }
    }
}

/// Serves a read from the primary image with an O_DIRECT pread; an I/O error is the client's
/// `EIO`, not the end of the connection.
fn read_block(
    shared: &Shared,
    request: &nbd::Request,
    reply: &Replier,
) -> Result<Result<(ExportBuffer, usize), u32>, ConnectionEnd> {
    let mut buffer = reply.take_buffer(shared)?;
    let len = request.len_bytes as usize;
    match shared.device.read_exact_at(buffer.data_mut(len), request.offset_bytes) {
        Ok(()) => Ok(Ok((buffer, len))),
        Err(error) => {
            tracing::error!(offset = request.offset_bytes, len, %error, "export: read from the primary failed");
            reply.give_back(buffer, &shared.free_tx);
            Ok(Err(nbd::EIO))
        }
    }
}

/// Hands a request to the engine and wakes it.
fn submit(
    shared: &Shared,
    request: &nbd::Request,
    buffer: Option<ExportBuffer>,
    reply: &Arc<Replier>,
) -> Result<(), ConnectionEnd> {
    let request = ExportRequest {
        command: request.command,
        fua: request.fua(),
        offset_bytes: request.offset_bytes,
        len_bytes: request.len_bytes,
        cookie: request.cookie,
        buffer,
        reply: Arc::clone(reply),
    };
    shared.requests.send(request).map_err(|_| ConnectionEnd::Stopping)?;
    shared.wake.write(1).map_err(|e| ConnectionEnd::Io(e.into()))?;
    Ok(())
}

/// The replier thread: writes the queued replies, blocking as a slow client needs. Read buffers
/// go back to the free list. Ends when every holder of the connection's `Replier` is gone.
fn send_replies(side: &WriteSide, replies: Receiver<Reply>, free: Sender<ExportBuffer>) {
    let mut broken = false;
    for reply in replies {
        let mut writer = side.writer.lock().expect("replier lock");
        let Writer { stream, tail } = &mut *writer;
        let tail_sent = match tail.take() {
            Some((bytes, from)) => stream.write_all(&bytes[from..]),
            None => Ok(()),
        };
        let sent = tail_sent.and_then(|()| match &reply {
            Reply::Done { cookie, error, data } => {
                let header = nbd::encode_reply(*cookie, *error);
                stream.write_all(&header).and_then(|()| match data {
                    Some((buffer, len)) => stream.write_all(buffer.data(*len)),
                    None => Ok(()),
                })
            }
            Reply::Tail => Ok(()),
        });
        if sent.is_err() && !broken {
            // The client is gone; keep draining so buffers go back and nobody blocks.
            stream.shutdown();
            broken = true;
        }
        side.queued.fetch_sub(1, Ordering::AcqRel);
        drop(writer);
        if let Reply::Done { data: Some((buffer, _)), .. } = reply {
            side.held.fetch_sub(1, Ordering::AcqRel);
            let _ = free.send(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
