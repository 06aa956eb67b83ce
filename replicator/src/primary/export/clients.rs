//! The export's client connections in the engine: each connection's socket is read by a recv
//! op in the engine's ring, and its requests are decoded here, so a client's write reaches the
//! ring without a hop through another thread (one wake-up less on the sync write's path).
//!
//! Owns, per connection, a read-ahead buffer (the recv op writes into it; its address is fixed
//! while the op is in flight) and the write whose data is still arriving (`Partial`: its export
//! buffer, which the recv op may fill directly). Invariants:
//! - at most one recv op per connection, and a connection is dropped only when none is in flight;
//!   the arriving write's buffer goes back to the free list only when no recv fills it;
//! - a request leaves here whole: a write with all its data, in the order the client sent it;
//! - a connection that breaks the protocol is shut down at once and nothing of the broken
//!   request reaches an image; after `NBD_CMD_DISC`, the requests before it still complete, and
//!   so do the whole requests a client sent before it closed its end (a half-close).

use std::collections::VecDeque;
use std::sync::Arc;

use io_uring::{opcode, types};

use super::ExportState;
use crate::export::nbd::{self, Command};
use crate::export::{Connection, ExportBuffer, ExportInfo, ExportRequest, Replier, Stream};
use crate::primary::Op;
use crate::read_ahead::ReadAhead;
use crate::uring::Ring;

/// Decoded requests a connection may have waiting for an engine slot.
const READY_MAX: usize = 64;

/// A client connection as the engine holds it.
pub struct NbdConn {
    stream: Stream,
    reply: Arc<Replier>,
    client: String,
    /// Bumped on every new connection in this place, so a stale completion is recognised.
    pub generation: u32,
    /// The bytes received and not decoded yet.
    ahead: ReadAhead,
    /// A write's header decoded, waiting for a buffer.
    waiting: Option<nbd::Request>,
    /// A write whose data is arriving.
    partial: Option<Partial>,
    /// Decoded requests waiting for an engine slot, in the client's order.
    pub ready: VecDeque<ExportRequest>,
    recv_in_flight: bool,
    /// The client closed its end (or its socket failed): no more recv ops; what is read ahead
    /// is still decoded.
    read_closed: bool,
    /// No more requests are decoded: the client disconnected or broke the protocol, or it
    /// closed its end and nothing whole is left.
    closing: bool,
}

struct Partial {
    request: nbd::Request,
    buffer: ExportBuffer,
    filled: usize,
}

impl NbdConn {
    pub fn new(connection: Connection, generation: u32) -> Self {
        Self {
            stream: connection.stream,
            reply: connection.reply,
            client: connection.client,
            generation,
            ahead: ReadAhead::default(),
            waiting: None,
            partial: None,
            ready: VecDeque::with_capacity(READY_MAX),
            recv_in_flight: false,
            read_closed: false,
            closing: false,
        }
    }

    /// Whether the engine may drop the connection: closing, no recv in flight, nothing waiting.
    pub fn finished(&self) -> bool {
        self.closing && !self.recv_in_flight && self.ready.is_empty()
    }

    /// Stops reading at once (a protocol error, or the engine stopping): the client sees the
    /// socket close, and the recv in flight completes.
    pub fn abort(&mut self) {
        self.closing = true;
        self.stream.shutdown();
        for request in self.ready.drain(..) {
            if let Some(buffer) = request.buffer {
                request.reply.give_back(buffer);
            }
        }
        if !self.recv_in_flight {
            // Else the recv may be filling the arriving write's buffer: released when it completes.
            self.release_partial();
        }
    }

    fn release_partial(&mut self) {
        if let Some(partial) = self.partial.take() {
            self.reply.give_back(partial.buffer);
        }
        self.waiting = None;
    }

    /// Decodes what has arrived into `ready`, until the bytes, the buffers or the room run out.
    /// Once the client has closed its end and the bytes run out, the connection is closing: a
    /// write missing its data, or a request cut short, never completes.
    fn pump(&mut self, info: &ExportInfo) {
        self.decode(info);
        let needs_bytes = match &self.partial {
            Some(partial) => partial.filled < partial.request.len_bytes as usize,
            None => self.waiting.is_none() && self.ahead.unread().len() < nbd::REQUEST_BYTES,
        };
        if self.read_closed && needs_bytes && !self.closing {
            if !self.ahead.is_empty() || self.partial.is_some() {
                tracing::warn!(client = %self.client, "export: the client closed its end in the middle of a request");
            }
            self.closing = true;
            self.release_partial();
        }
    }

    fn decode(&mut self, info: &ExportInfo) {
        loop {
            if self.closing {
                return;
            }
            if let Some(partial) = self.partial.as_mut() {
                let len = partial.request.len_bytes as usize;
                partial.filled += self.ahead.copy_into(&mut partial.buffer.data_mut(len)[partial.filled..]);
                if partial.filled < len {
                    return;
                }
                let Partial { request, buffer, .. } = self.partial.take().expect("checked above");
                self.ahead.payload_taken(len);
                if request.aligned(info.block_bytes_min) {
                    self.ready.push_back(self.engine_request(&request, Some(buffer)));
                } else {
                    self.reply.give_back(buffer);
                    self.reply.reply(request.cookie, nbd::EINVAL);
                }
                continue;
            }
            if let Some(request) = self.waiting.take() {
                match self.reply.take_buffer() {
                    Some(buffer) => self.partial = Some(Partial { request, buffer, filled: 0 }),
                    None => {
                        self.waiting = Some(request);
                        return;
                    }
                }
                continue;
            }
            if self.ready.len() >= READY_MAX
                || self.ahead.unread().len() < nbd::REQUEST_BYTES
                || self.reply.backlogged()
            {
                return;
            }
            let header: &[u8; nbd::REQUEST_BYTES] =
                self.ahead.unread()[..nbd::REQUEST_BYTES].try_into().expect("sliced to size");
            let decoded = nbd::decode_request(header, info);
            self.ahead.consume(nbd::REQUEST_BYTES);
            match decoded {
                Ok(request) => self.dispatch(request, info),
                Err(error) => {
                    tracing::warn!(client = %self.client, reason = %error, "export: client disconnected for a protocol error");
                    self.abort();
                }
            }
        }
    }

    /// One decoded request: answered here, queued for the engine, or waiting for its data.
    fn dispatch(&mut self, request: nbd::Request, info: &ExportInfo) {
        let aligned = request.aligned(info.block_bytes_min);
        if request.command != Command::Write {
            self.ahead.payload_taken(0);
        }
        match request.command {
            Command::Disconnect => {
                // The requests before it complete and are answered; then the socket closes.
                // Shutting the read side ends the recv in flight (a client may wait for the
                // close without closing its end).
                self.closing = true;
                self.release_partial();
                self.stream.shutdown_read();
            }
            Command::Read if aligned => {
                self.reply.read(request.cookie, request.offset_bytes, request.len_bytes)
            }
            Command::Read => self.reply.reply(request.cookie, nbd::EINVAL),
            Command::Write if request.len_bytes == 0 => self.reply.reply(request.cookie, 0),
            Command::Write => self.waiting = Some(request),
            Command::Cache => self.reply.reply(request.cookie, 0),
            Command::Flush | Command::Trim | Command::WriteZeroes => {
                if !aligned || (request.command != Command::Flush && request.len_bytes == 0) {
                    self.reply.reply(request.cookie, if aligned { 0 } else { nbd::EINVAL });
                } else {
                    self.ready.push_back(self.engine_request(&request, None));
                }
            }
        }
    }

    fn engine_request(&self, request: &nbd::Request, buffer: Option<ExportBuffer>) -> ExportRequest {
        ExportRequest {
            command: request.command,
            fua: request.fua(),
            offset_bytes: request.offset_bytes,
            len_bytes: request.len_bytes,
            cookie: request.cookie,
            buffer,
            reply: Arc::clone(&self.reply),
        }
    }

    /// The recv op to post, if the connection wants bytes and has room for them: into the
    /// arriving write's buffer when nothing is read ahead and much of it is missing, else into
    /// the read-ahead buffer (none when that is full of requests waiting for buffers or slots).
    fn next_recv(&mut self) -> Option<(*mut u8, u32, bool)> {
        if self.closing || self.read_closed || self.recv_in_flight {
            return None;
        }
        if let Some(partial) = self.partial.as_mut() {
            let missing = partial.request.len_bytes as usize - partial.filled;
            if self.ahead.direct(missing) {
                // SAFETY: inside the buffer's data area (filled < len <= data_bytes_max).
                let at = unsafe { partial.buffer.data_ptr().add(partial.filled) };
                return Some((at, missing as u32, true));
            }
            if missing > 0 && partial.request.len_bytes as usize >= crate::read_ahead::DIRECT_RECV_BYTES_MIN {
                // The tail of a long write that came in pieces: no further, or the recv takes
                // the next write's header and much of its data, to be copied again.
                let (at, room) = self.ahead.room_at_most(missing)?;
                return Some((at, room, false));
            }
        }
        let unread = self.ahead.unread().len();
        let (at, room) = if self.partial.is_none() && self.waiting.is_none() && unread < nbd::REQUEST_BYTES {
            self.ahead.header_room(nbd::REQUEST_BYTES - unread)?
        } else {
            self.ahead.recv_room()?
        };
        Some((at, room, false))
    }
}

impl ExportState {
    /// Takes new connections, decodes what each has received, and keeps a recv op in flight
    /// on every connection that wants bytes; drops the finished ones.
    pub fn pump_connections(&mut self, ring: &mut Ring<Op>, stopping: bool) {
        while let Ok(connection) = self.side.connections.try_recv() {
            if stopping {
                connection.stream.shutdown();
                continue;
            }
            match self.conns.iter().position(Option::is_none) {
                Some(at) => {
                    self.conn_generation += 1;
                    self.conns[at] = Some(NbdConn::new(connection, self.conn_generation));
                }
                None => connection.stream.shutdown(), // the acceptor bounds them; not reached
            }
        }
        let mut wants_buffer = false;
        for index in 0..self.conns.len() {
            let Some(conn) = self.conns[index].as_mut() else { continue };
            if stopping && !conn.closing {
                conn.abort();
            }
            conn.pump(&self.side.info);
            wants_buffer |= conn.waiting.is_some();
            if conn.finished() {
                self.conns[index] = None;
                continue;
            }
            let Some((at, len, direct)) = conn.next_recv() else { continue };
            conn.recv_in_flight = true;
            let (fd, generation) = (conn.stream.fd(), conn.generation);
            let entry = opcode::Recv::new(types::Fd(fd), at, len).build();
            // SAFETY: the target is the connection's read-ahead buffer or its arriving write's
            // buffer, neither moved nor released while the recv is in flight (a connection is
            // dropped only once no recv of it is).
            unsafe { ring.push(Op::ExportRecv { conn: index as u16, generation, direct }, entry) };
        }
        if wants_buffer {
            self.side.free.want();
        }
    }

    /// A connection's recv op completed: `result` bytes arrived (0: the client closed).
    pub fn complete_recv(&mut self, conn: u16, generation: u32, direct: bool, result: i32) {
        let Some(connection) = self.conns[usize::from(conn)].as_mut().filter(|c| c.generation == generation)
        else {
            unreachable!("a connection is dropped only when no recv op is in flight");
        };
        connection.recv_in_flight = false;
        if result <= 0 {
            if result < 0 && !connection.closing {
                let error = std::io::Error::from_raw_os_error(-result);
                tracing::warn!(client = %connection.client, %error, "export: receiving from the client failed");
            }
            // Requests already decoded, and those whole in the read-ahead, still complete
            // (`pump`); a write missing its data never does.
            connection.read_closed = true;
            if connection.closing {
                connection.release_partial(); // aborted while this recv was in flight
            }
            return;
        }
        let bytes = result as usize;
        if direct {
            let partial = connection.partial.as_mut().expect("a direct recv fills the arriving write");
            partial.filled += bytes;
            assert!(partial.filled <= partial.request.len_bytes as usize);
        } else {
            connection.ahead.received(bytes);
        }
        if connection.closing {
            connection.release_partial(); // aborted while this recv was in flight
        }
    }
}
