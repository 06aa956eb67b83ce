//! A session: the one connection that writes the image, from an authenticated primary. Its
//! path, in order: receive (into a read-ahead buffer, or straight into a pool buffer for an
//! extent's data) -> decode (every byte checked before anything is written) -> route (to the
//! image, or staged in the journal until its cut is committed: `journal::Journal::route`) ->
//! durable write (io_uring, `RWF_DSYNC`) -> ack (buffered, one send per reap). The other frames
//! (keepalives, verify requests, commits, consistency points, zeroes, the mirror database) are
//! in `frames.rs`.
//!
//! Owns the session's ring and buffer pool (sized at start-up: `queue_depth` writes and one
//! receive), the frame being received, and the journal while the session runs. Invariants:
//! - a frame is acknowledged only after its write returned the full length with `RWF_DSYNC`; a
//!   failed write ends the session with an `Error` frame, never an ack;
//! - a staged frame is acknowledged only once every journal record before it is durable too
//!   (`journal_acks`): reading the journal back stops at the first record that is not;
//! - two writes to overlapping ranges of the image are never in flight together, so a newer
//!   copy of an extent can never be overtaken by an older one;
//! - a buffer is owned by the frame being received into it, then by its write (`writes`), and
//!   goes back to the pool at the write's completion.

use std::fs::File;
use std::io::Write as _;
use std::net::TcpStream;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::SecondaryConfig;
use super::journal::{self, FrameInfo, Journal, Route, format::RecordKind};
use crate::failback;
use crate::metrics::SecondaryMetrics;
use crate::pool::BufferPool;
use crate::read_ahead::ReadAhead;
use crate::uring::{Completion, Ring};
use crate::wire::{self, ErrorCode, Limits, Message};

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionEnd {
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
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("storing this member's state: {0}")]
    State(String),
    #[error("stopping")]
    Stop,
}

impl SessionEnd {
    /// The code the primary is told in an `Error` frame, for the ends it must hear about (a
    /// closed link or a stop it finds out by itself).
    pub(super) fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Write { .. } => Some(ErrorCode::WriteFailed),
            Self::Read { .. } => Some(ErrorCode::ReadFailed),
            Self::Refused(refusal) => Some(refusal.code()),
            Self::State(_) => Some(ErrorCode::StateFailed),
            Self::Journal(journal::JournalError::Image { .. }) => Some(ErrorCode::WriteFailed),
            Self::Journal(journal::JournalError::Journal { .. }) => Some(ErrorCode::StateFailed),
            Self::Wire(_) | Self::Unexpected(_) => Some(ErrorCode::Protocol),
            Self::Closed | Self::Timeout(_) | Self::Io(_) | Self::PrimaryError(_) | Self::Stop => None,
        }
    }
}

/// An operation in the session's ring.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// The receive in flight (`Session::recv_in_flight` says into what).
    Recv,
    /// The write of the frame received into `buffer` (`Session::writes`).
    Write { buffer: u16 },
}

/// How long a wait for a completion lasts before the session checks its timeout and stops.
const WAIT_NS: u32 = 100_000_000;

/// The longest non-extent payload a primary sends: a mirror database.
const SMALL_PAYLOAD_BYTES_MAX: usize = wire::MIRROR_DB_BYTES_MAX;
const _: () = assert!(SMALL_PAYLOAD_BYTES_MAX >= 4 + wire::ERROR_MESSAGE_BYTES_MAX);

/// One write in flight: which buffer, where, and which frame to acknowledge.
#[derive(Clone, Copy, Debug)]
pub(super) struct Write {
    buffer: u16,
    offset_bytes: u64,
    len_bytes: usize,
    sequence: u64,
    /// A staged frame's journal record (its sequence in the journal), else a write to the image.
    journal_seq: Option<u64>,
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

pub(super) struct Session<'a> {
    ring: Ring<Op>,
    pub(super) pool: BufferPool,
    pub(super) poll: crate::poll::PollWindow,
    pub(super) limits: Limits,
    pub(super) image: &'a File,
    pub(super) journal: &'a mut Journal<File>,
    stats: &'a SecondaryMetrics,
    /// Applies committed cuts beside the session (`applier.rs`).
    applier: super::applier::Applier,
    /// Scratch for applying the journal to the image (commits, overflows, verify overlays).
    pub(super) apply: BufferPool,
    /// Staged frames being written to the journal, by journal sequence: the frame to
    /// acknowledge and whether its record is durable. Acked in journal order (see the header).
    journal_acks: std::collections::BTreeMap<u64, (u64, bool)>,
    pub(super) device: &'a str,
    pub(super) state_dir: &'a std::path::Path,
    pub(super) device_path: &'a std::path::Path,
    pub(super) timeout_ms: u64,
    pub(super) header_bytes: [u8; wire::HEADER_BYTES],
    pub(super) small: Box<[u8; SMALL_PAYLOAD_BYTES_MAX]>,
    receiving: Receiving,
    /// Bytes of the part `receiving` names that are filled already.
    pub(super) filled: usize,
    /// What the socket gave and no part has taken yet: the small frames of synchronous writes
    /// (a header and 4 KiB, say), which arrive a few dozen at a time at queue depth 32, cost one
    /// recv together rather than two each.
    pub(super) ahead: ReadAhead,
    /// The recv in flight, if any: into the read-ahead buffer, or straight into the part.
    recv_in_flight: Option<RecvKind>,
    /// A received extent that waits for an overlapping write to finish (or a header that waits
    /// for a free buffer): nothing more is received meanwhile.
    pub(super) waiting: Option<Waiting>,
    /// Indexed by buffer: the write that owns it.
    writes: Vec<Option<Write>>,
    pub(super) next_ack_sequence: u64,
    /// Acks of completed writes not sent yet, and the scratch frame they are encoded in.
    pub(super) acks: Vec<u8>,
    pub(super) ack_frame: Vec<u8>,
    /// The database of a change in progress: checked and held since its prepare frame, stored
    /// when its commit frame comes, dropped if another database arrives first.
    pub(super) prepared: Option<failback::Reconciled>,
    /// When the last frame a client waits on came (`FLAG_CLIENT_WAITS`): the session
    /// busy-polls while they flow (`PollSetting::Auto`).
    pub(super) client_waits_at: Option<Instant>,
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
pub(super) enum Waiting {
    Buffer(wire::Header),
    Overlap(Write),
    /// A frame to stage with the journal full: once no write is in flight, the journal
    /// overflows (`Journal::overflow`) and the frame is routed again.
    Room(Write, FrameInfo),
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
        tag: wire::Tag,
    },
    /// A commit of a cut: applied and acknowledged once every write before it completed.
    Commit {
        cut: u64,
        cut_unix_ms: u64,
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
    pub(super) fn new(
        config: &'a SecondaryConfig,
        limits: Limits,
        (image, journal): (&'a File, &'a mut Journal<File>),
        device: &'a str,
        stats: &'a SecondaryMetrics,
    ) -> std::io::Result<Self> {
        let depth = config.queue_depth;
        // A write per pool buffer, and the receive.
        let ring = Ring::new(usize::from(depth) + 1)?;
        let pool =
            BufferPool::new(usize::from(depth), config.frame_data_bytes_max).map_err(std::io::Error::from)?;
        // SAFETY: the pool outlives the ring: `ring` is declared before `pool` in Session and so
        // is dropped first.
        unsafe { ring.register_buffers(&pool)? };
        let apply = BufferPool::new(1, config.frame_data_bytes_max).map_err(std::io::Error::from)?;
        let applier = super::applier::Applier::start(journal.file(), image, config.frame_data_bytes_max)?;
        Ok(Self {
            ring,
            pool,
            poll: crate::poll::PollWindow::new(config.poll),
            limits,
            image,
            journal,
            stats,
            applier,
            apply,
            journal_acks: std::collections::BTreeMap::new(),
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
            // The secondary's Welcome (0) and CutState (1) came before.
            next_ack_sequence: 2,
            acks: Vec::with_capacity(usize::from(depth) * (wire::HEADER_BYTES + 16)),
            ack_frame: Vec::with_capacity(wire::HEADER_BYTES + 16),
            prepared: None,
            client_waits_at: None,
        })
    }

    pub(super) fn run(
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
            self.take_applied(stream)?;
            self.retry_waiting(stream)?;
            if self.recv_in_flight.is_none() && self.waiting.is_none() && self.use_ahead(stream)? {
                // Frames read ahead earlier, held back by a write, count as heard now.
                last_frame = Instant::now();
            }
            if self.recv_in_flight.is_none() && self.waiting.is_none() {
                self.submit_recv(stream)?;
            }
            self.flush_acks(stream)?;
            let client_waits = crate::poll::within_poll_window(self.client_waits_at);
            let spun_s = self.ring.wait(&mut self.poll, client_waits, WAIT_NS)?;
            if spun_s > 0.0 {
                stats.busy_poll_seconds.inc_by(spun_s);
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
        unsafe { self.ring.push(Op::Recv, recv.build()) };
        self.recv_in_flight = Some(kind);
        Ok(())
    }

    /// Handles completions; returns whether bytes arrived.
    fn reap(&mut self, stream: &mut TcpStream, stats: &SecondaryMetrics) -> Result<bool, SessionEnd> {
        let completions = self.ring.reap();
        let outcome = self.handle_completions(&completions, stream, stats);
        self.ring.give_back(completions);
        outcome
    }

    fn handle_completions(
        &mut self,
        completions: &[Completion],
        stream: &mut TcpStream,
        stats: &SecondaryMetrics,
    ) -> Result<bool, SessionEnd> {
        let mut received = false;
        for (at, completion) in completions.iter().enumerate() {
            let op = self.ring.take(completion.slot);
            match self.handle_completion(op, completion.result, stream, stats) {
                Ok(true) => received = true,
                Ok(false) => {}
                Err(end) => {
                    // The rest of the batch is off the ring already: its ops are done, so their
                    // buffers go back (`finish` waits only for ops still in the kernel).
                    for rest in &completions[at + 1..] {
                        let op = self.ring.take(rest.slot);
                        self.forget(op);
                    }
                    return Err(end);
                }
            }
        }
        Ok(received)
    }

    /// An op of an ending session has completed: its buffer goes back, nothing is acknowledged.
    fn forget(&mut self, op: Op) {
        match op {
            Op::Recv => self.recv_in_flight = None,
            Op::Write { buffer } => {
                if let Some(write) = self.writes[usize::from(buffer)].take() {
                    self.pool.give_back(write.buffer);
                }
            }
        }
    }

    /// One completion; returns whether bytes arrived.
    fn handle_completion(
        &mut self,
        op: Op,
        result: i32,
        stream: &mut TcpStream,
        stats: &SecondaryMetrics,
    ) -> Result<bool, SessionEnd> {
        if let Op::Write { buffer } = op {
            self.complete_write(buffer, result, stats)?;
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
                let write =
                    Write { buffer, offset_bytes, len_bytes, sequence: header.sequence, journal_seq: None };
                let info = FrameInfo {
                    tag: header.cut,
                    in_order: header.flags & wire::FLAG_IN_ORDER != 0,
                    client: header.kind == wire::MessageKind::BlockData,
                    image_offset: offset_bytes,
                    image_len: len_bytes as u64,
                };
                self.place(write, info)
            }
            Receiving::Small { header } => {
                self.receiving = Receiving::Header;
                self.ahead.payload_taken(header.payload_bytes as usize);
                self.small_frame(header, stream)
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
            | wire::MessageKind::Commit
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
    pub(super) fn retry_waiting(&mut self, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        match self.waiting {
            Some(Waiting::Buffer(header)) if self.pool.free_count() > 0 => {
                self.waiting = None;
                self.start_payload(header, stream)
            }
            Some(Waiting::Overlap(write)) if !self.overlaps(&write) => {
                self.waiting = None;
                self.submit_write(write)
            }
            Some(Waiting::Room(write, info)) if self.quiet() => {
                // The cuts applied meanwhile may have made room; else the ring overflows.
                self.waiting = None;
                if !self.journal.has_room(write.len_bytes as u32) {
                    self.overflow()?;
                }
                self.place(write, info)
            }
            Some(Waiting::Commit { cut, cut_unix_ms, sequence })
                if self.writes.iter().all(Option::is_none) =>
            {
                self.waiting = None;
                self.commit((cut, cut_unix_ms), sequence, stream)
            }
            Some(Waiting::Verify { first_extent, count }) if self.writes.iter().all(Option::is_none) => {
                self.waiting = None;
                self.answer_verify(first_extent, count, stream)
            }
            // A point is recorded once the image holds everything before it: applied too.
            Some(Waiting::Point { generation, point_unix_ms, sequence }) if self.quiet() => {
                self.waiting = None;
                self.record_point(generation, point_unix_ms, sequence, stream)
            }
            Some(Waiting::Zeroes { offset_bytes, len_bytes, unmap, sequence, tag })
                if self.writes.iter().all(Option::is_none) =>
            {
                self.waiting = None;
                self.apply_zeroes(offset_bytes..offset_bytes + len_bytes, (unmap, tag), sequence, stream)
            }
            _ => Ok(()),
        }
    }

    /// The session ends: writing `len` bytes at `offset` of the image failed.
    pub(super) fn write_failed(&self, offset: u64, len: usize, error: std::io::Error) -> SessionEnd {
        SessionEnd::Write { device: self.device.into(), offset, len, error }
    }

    /// Sends the buffered acks; before the session waits, and before any other frame.
    pub(super) fn flush_acks(&mut self, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        if !self.acks.is_empty() {
            stream.write_all(&self.acks)?;
            self.acks.clear();
        }
        Ok(())
    }

    /// Tells the primary why the session ends (best effort: the link may be what failed).
    pub(super) fn report(&mut self, stream: &mut TcpStream, code: ErrorCode, message: &str) {
        let _ = wire::write_frame(stream, &Message::Error { code, message }, self.next_ack_sequence);
    }

    /// Sends `message` now, after the buffered acks (frames to the primary keep the order of
    /// what they report), numbered in this direction's sequence.
    pub(super) fn send_frame(&mut self, stream: &mut TcpStream, message: &Message) -> Result<(), SessionEnd> {
        self.flush_acks(stream)?;
        wire::write_frame(stream, message, self.next_ack_sequence)?;
        self.next_ack_sequence += 1;
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
        let expected = write.len_bytes
            + if write.journal_seq.is_some() { journal::format::RECORD_HEADER_BYTES } else { 0 };
        if result < 0 || result as usize != expected {
            let error = if result < 0 {
                std::io::Error::from_raw_os_error(-result)
            } else {
                std::io::Error::other(format!("short write of {result} bytes"))
            };
            if write.journal_seq.is_none() {
                return Err(self.write_failed(write.offset_bytes, write.len_bytes, error));
            }
            self.journal.poison();
            return Err(
                journal::JournalError::Journal { what: "write of a staged frame", source: error }.into()
            );
        }
        stats.written_bytes.inc_by(write.len_bytes as u64);
        let Some(journal_seq) = write.journal_seq else {
            self.buffer_ack(write.sequence, stats);
            return Ok(());
        };
        stats.staged_bytes.inc_by(write.len_bytes as u64);
        self.journal_acks.get_mut(&journal_seq).expect("a staged write is awaited").1 = true;
        while let Some(entry) = self.journal_acks.first_entry() {
            if !entry.get().1 {
                break;
            }
            let (frame_sequence, _) = entry.remove();
            self.buffer_ack(frame_sequence, stats);
        }
        Ok(())
    }

    /// Buffers the ack of frame `sequence`: the acks of the writes one reap completes go out
    /// in one send.
    fn buffer_ack(&mut self, sequence: u64, stats: &SecondaryMetrics) {
        stats.acked_frames.inc();
        let ack = Message::Ack { first_sequence: sequence, last_sequence: sequence };
        wire::encode(&ack, self.next_ack_sequence, &mut self.ack_frame);
        self.acks.extend_from_slice(&self.ack_frame);
        self.next_ack_sequence += 1;
    }

    /// No write in flight, and no cut being applied.
    fn quiet(&self) -> bool {
        self.writes.iter().all(Option::is_none) && self.applier.idle()
    }

    /// Whether `write` (to the image) overlaps a write to the image in flight (a newer copy
    /// must not be overtaken). Journal records go to places of their own.
    fn overlaps(&self, write: &Write) -> bool {
        let (start, end) = (write.offset_bytes, write.offset_bytes + write.len_bytes as u64);
        self.writes
            .iter()
            .flatten()
            .filter(|w| w.journal_seq.is_none())
            .any(|w| start < w.offset_bytes + w.len_bytes as u64 && w.offset_bytes < end)
    }

    /// A decoded data frame: written to the image, or staged in the journal (see `route`).
    fn place(&mut self, write: Write, info: FrameInfo) -> Result<(), SessionEnd> {
        if self.journal.route(&info) == Route::InPlace {
            if self.overlaps(&write) {
                self.waiting = Some(Waiting::Overlap(write));
                return Ok(());
            }
            return self.submit_write(write);
        }
        match self.journal.stage(RecordKind::Data, info.record_flags(), &info, write.len_bytes as u32)? {
            Some(placement) => {
                self.submit_journal_write(write, &placement, &info);
                Ok(())
            }
            None => {
                self.waiting = Some(Waiting::Room(write, info));
                Ok(())
            }
        }
    }

    /// Writes a staged frame's record: its header, in the buffer's prefix right before the
    /// data, and the data, in one write at the record's place in the journal.
    fn submit_journal_write(&mut self, write: Write, placement: &journal::Placement, info: &FrameInfo) {
        let header =
            self.journal.data_record_header(placement, info, self.pool.data(write.buffer, write.len_bytes));
        self.pool.prefix_tail_mut(write.buffer, header.len()).copy_from_slice(&header);
        let len = header.len() + write.len_bytes;
        // SAFETY: the prefix's tail and the data are one region of the buffer (see `pool`).
        let start = unsafe { self.pool.data_ptr(write.buffer).sub(header.len()) };
        let entry = opcode::WriteFixed::new(
            types::Fd(self.journal.file().as_raw_fd()),
            start,
            len as u32,
            write.buffer,
        )
        .offset(placement.file_offset)
        .rw_flags(libc::RWF_DSYNC)
        .build();
        assert!(self.writes[usize::from(write.buffer)].is_none());
        // SAFETY: the buffer is owned by this write (recorded in `writes`) until its completion.
        unsafe { self.ring.push(Op::Write { buffer: write.buffer }, entry) };
        self.writes[usize::from(write.buffer)] = Some(Write { journal_seq: Some(placement.seq), ..write });
        self.journal_acks.insert(placement.seq, (write.sequence, false));
    }

    /// The journal is full with no write in flight: it applies its frames in place.
    pub(super) fn overflow(&mut self) -> Result<(), SessionEnd> {
        let stats = self.stats;
        let buffer = self.apply.take().expect("the apply buffer is free between uses");
        let len = self.apply.data_bytes_max();
        let outcome = self.journal.overflow(self.image, self.apply.data_mut(buffer, len));
        self.apply.give_back(buffer);
        stats.applied_bytes.inc_by(outcome?);
        stats.journal_overflows.inc();
        super::note_cut(stats, &self.journal.cut_state());
        Ok(())
    }

    /// Every write before the Commit frame has completed: the cut is committed (durable) and
    /// applied, then the frame acknowledged.
    pub(super) fn commit(
        &mut self,
        (cut, cut_unix_ms): (u64, u64),
        sequence: u64,
        stream: &mut TcpStream,
    ) -> Result<(), SessionEnd> {
        assert!(self.journal_acks.is_empty(), "every staged frame before the commit is durable");
        let job = self.journal.commit_record(cut, cut_unix_ms)?;
        tracing::debug!(device = self.device, cut, "cut committed");
        self.send_frame(stream, &Message::Ack { first_sequence: sequence, last_sequence: sequence })?;
        match job {
            // The Commit record is durable: acknowledged, and applied by the applier.
            Some(job) => {
                self.applier.hand(job);
                Ok(())
            }
            // Nothing to apply: the image is this cut now.
            None => self.tell_cut(stream),
        }
    }

    /// Tells the primary the cut the image holds (`CutState`), and the metrics.
    fn tell_cut(&mut self, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        let state = self.journal.cut_state();
        super::note_cut(self.stats, &state);
        let message = Message::CutState {
            committed_cut: state.committed_cut,
            committed_unix_ms: state.committed_unix_ms,
            staged_cut_max: state.staged_tag_max,
            flags: if state.consistent { wire::CUT_STATE_CONSISTENT } else { 0 },
        };
        self.send_frame(stream, &message)
    }

    /// Takes what the applier reports: a cut applied moves the journal on and is told to the
    /// primary (`CutState`); a failed one ends the session (its frames stay staged).
    pub(super) fn take_applied(&mut self, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        while let Some((job, outcome)) = self.applier.take_done() {
            self.applied(&job, outcome)?;
            self.tell_cut(stream)?;
        }
        Ok(())
    }

    /// One job's outcome into the journal.
    fn applied(
        &mut self,
        job: &journal::ApplyJob,
        outcome: Result<(), journal::JournalError>,
    ) -> Result<(), SessionEnd> {
        if let Err(error) = outcome {
            self.journal.apply_failed(job);
            return Err(error.into());
        }
        self.journal.applied(job)?;
        self.stats.applied_bytes.inc_by(job.bytes());
        Ok(())
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
        .build();
        // SAFETY: the buffer is owned by this write (recorded in `writes`) until its completion.
        unsafe { self.ring.push(Op::Write { buffer: write.buffer }, entry) };
        self.writes[usize::from(write.buffer)] = Some(write);
        Ok(())
    }

    /// Ends the session's use of its buffers: shuts the socket so a receive in flight
    /// completes, and reaps until no operation holds a buffer, before the ring and the pool are
    /// dropped. Writes that still complete are not acknowledged. There is no deadline for the
    /// writes: the next session may write the same extents only once these are done (two writes
    /// of one extent in flight together may land in either order, and the older data could
    /// land last); a device that never completes them keeps the image locked, and says so.
    pub(super) fn finish(&mut self, stream: &TcpStream, stop: &AtomicBool) {
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
            let _ = self.ring.wait(
                &mut crate::poll::PollWindow::new(crate::poll::PollSetting::Fixed(0)),
                false,
                WAIT_NS,
            );
            let completions = self.ring.reap();
            for completion in &completions {
                let op = self.ring.take(completion.slot);
                self.forget(op);
            }
            self.ring.give_back(completions);
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
        // The cuts being applied finish too, and the journal hears how (a failed one's frames
        // stay staged for the next session's commits).
        for (job, outcome) in self.applier.stop() {
            if let Err(error) = self.applied(&job, outcome) {
                tracing::error!(device = self.device, %error, "applying a committed cut failed; it is applied again later");
            }
        }
    }

    fn wait_for_writes(
        &mut self,
        stream: &mut TcpStream,
        stats: &SecondaryMetrics,
    ) -> Result<(), SessionEnd> {
        while self.writes.iter().any(Option::is_some) {
            self.ring.submit_and_wait()?;
            self.reap(stream, stats)?;
        }
        self.flush_acks(stream)?;
        let _ = stream.flush();
        Ok(())
    }
}
