//! A request through the export, from its start to its reply: the primary's part (a write,
//! flush, TRIM or WRITE_ZEROES on the device, in the engine's ring) and the secondaries' part
//! (its frame to every target), then the reply once both are done (see the module header of
//! `export` for who the targets are under each write policy).

use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::{ExportState, Slot, ZEROES_FRAME_BYTES};
use crate::export::ExportRequest;
use crate::export::nbd::{self, Command};
use crate::logs::IntentQuiet;
use crate::model::{SECONDARIES_MAX, WritePolicy};
use crate::primary::peer::{InFlight, SendJob};
use crate::primary::peers::Peers;
use crate::primary::read::Source;
use crate::primary::{Clock, Op};
use crate::uring::Ring;
use crate::wire;

/// The engine's parts a request touches besides the export.
pub struct Io<'a> {
    pub ring: &'a mut Ring<Op>,
    pub peers: &'a mut Peers,
    pub source: &'a Source,
    pub quiet: &'a mut IntentQuiet,
    pub clock: &'a Clock,
    pub write_policy: WritePolicy,
    pub minimum_images: u32,
    pub backlog_bytes_max: u64,
    pub metrics: &'a crate::metrics::PrimaryMetrics,
    pub cuts: &'a mut crate::primary::cuts::Cuts,
    pub tracker: &'a mut crate::tracker::Tracker,
}

impl ExportState {
    /// Keeps a `Wake` op on the export's eventfd in the ring, so a request wakes the engine.
    pub fn arm_wake(&mut self, ring: &mut Ring<Op>, stopping: bool) {
        if self.wake_armed || stopping {
            return;
        }
        self.wake_armed = true;
        let entry =
            opcode::Read::new(types::Fd(self.wake_fd()), (&mut *self.wake_counter as *mut u64).cast(), 8)
                .build();
        // SAFETY: the counter is boxed in the export, which outlives the ring's ops (a stop
        // completes this op with a last wake before the export goes).
        unsafe { ring.push(Op::Wake, entry) };
    }

    pub fn woken(&mut self) {
        self.wake_armed = false;
    }

    /// Starts the requests the export's clients sent, while slots last.
    pub fn take_requests(&mut self, io: &mut Io) {
        while !self.free_slots.is_empty() {
            let Some(request) = self.next_request() else { return };
            self.last_request_at = Some(Instant::now());
            self.start(io, request);
        }
    }

    fn start(&mut self, io: &mut Io, mut request: ExportRequest) {
        if request.command == Command::Flush {
            let entry = opcode::Fsync::new(types::Fd(self.device.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            self.push(io.ring, request, 0..0, entry, None, false);
            return;
        }
        let extent_bytes = io.source.extent_bytes();
        let end_bytes = request.offset_bytes + u64::from(request.len_bytes);
        let extents = request.offset_bytes / extent_bytes..end_bytes.div_ceil(extent_bytes);
        let sync = io.write_policy == WritePolicy::Sync;
        let targets = targets(io, &request, sync);
        let images = 1 + targets.iter().filter(|&&t| t).count() as u32;
        if sync && images < io.minimum_images {
            self.refuse(io, request, images);
            return;
        }
        self.note_extents(io, &extents, &(request.offset_bytes..end_bytes), &targets);
        let entry = self.primary_entry(&request);
        let sequence = io.peers.next_sequence();
        let tag = io.cuts.export_tag(&targets, io.tracker, io.peers, io.source);
        let (frame_bytes, zeroes_frame) = encode_frame(&mut request, sequence, sync, tag);
        let slot = self.push(io.ring, request, extents.clone(), entry, zeroes_frame, sync);
        for i in (0..SECONDARIES_MAX).filter(|&i| targets[i]) {
            self.queue_frame(io.peers, i, slot, sequence, frame_bytes, &extents);
        }
    }

    /// The primary's part of a write, TRIM or WRITE_ZEROES.
    fn primary_entry(&self, request: &ExportRequest) -> io_uring::squeue::Entry {
        let fd = types::Fd(self.device.as_raw_fd());
        match request.command {
            Command::Write => {
                let buffer = request.buffer.as_ref().expect("a write carries its data");
                let flags = if request.fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, buffer.data_ptr(), request.len_bytes)
                    .offset(request.offset_bytes)
                    .rw_flags(flags)
                    .build()
            }
            Command::Trim | Command::WriteZeroes => zero_entry(fd, request, request.command == Command::Trim),
            other => {
                unreachable!("the export hands the engine writes, flushes, trims and zeroes, not {other:?}")
            }
        }
    }

    /// Marks an op's extents before it is submitted: in the intent log's quiet clock, pending
    /// for every secondary that does not get the frame, busy (no background read starts),
    /// stale where a background read is in flight, and masked from the tracker.
    fn note_extents(
        &mut self,
        io: &mut Io,
        extents: &Range<u64>,
        bytes: &Range<u64>,
        targets: &[bool; SECONDARIES_MAX],
    ) {
        let run = extents.start as usize..extents.end as usize;
        let now_ms = io.clock.now_ms();
        io.quiet.note_dirty_run(run.clone());
        // Two overlapping ops in flight may reach the primary in one order and a secondary
        // (which applies frames in sequence) in the other: every secondary then gets the
        // extents again, read once both are on the primary (`busy` holds the read back).
        let overlapping = self.overlaps_in_flight(bytes);
        if overlapping {
            tracing::debug!(
                offset = bytes.start,
                end = bytes.end,
                "export: overlapping writes in flight; the extents are shipped again"
            );
        }
        for (i, peer) in io.peers.iter_mut().enumerate() {
            if peer.removed || (targets[i] && !overlapping) {
                continue;
            }
            peer.pending_write(run.clone(), now_ms);
        }
        self.busy[run.clone()].fill(true);
        self.mask[run.clone()].fill(true);
        for e in run {
            if io.source.reading(e) {
                self.stale.set(e, true);
            }
        }
    }

    /// Fails a sync write at once, before it touches any image: too few images would have it.
    fn refuse(&mut self, io: &Io, request: ExportRequest, images: u32) {
        let minimum = io.minimum_images;
        if self.refused_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            tracing::error!(
                offset = request.offset_bytes,
                len = request.len_bytes,
                images,
                minimum,
                "export: write refused with EIO: only {images} images can take it, the mirror's minimum is {minimum}; \
                 the mirror needs attention"
            );
            self.refused_logged = Some(Instant::now());
        }
        io.metrics.export_errors.inc();
        request.reply.reply(request.cookie, nbd::EIO);
        if let Some(buffer) = request.buffer {
            request.reply.give_back(buffer);
        }
    }

    /// Puts an op's primary part in the ring; returns its slot.
    fn push(
        &mut self,
        ring: &mut Ring<Op>,
        request: ExportRequest,
        extents: Range<u64>,
        entry: io_uring::squeue::Entry,
        zeroes_frame: Option<[u8; ZEROES_FRAME_BYTES]>,
        sync: bool,
    ) -> u32 {
        let slot = self.free_slots.pop().expect("take_requests checked a free slot");
        assert!(self.slots[slot as usize].is_none());
        self.slots[slot as usize] = Some(Slot {
            request,
            extents,
            primary: None,
            zeroing_fallback: false,
            flushing: false,
            awaiting: [None; SECONDARIES_MAX],
            acked: 0,
            sends: 0,
            sync,
            replied: false,
            zeroes_frame: Box::new(zeroes_frame.unwrap_or([0; ZEROES_FRAME_BYTES])),
        });
        // SAFETY: the request's buffer is the slot's until the slot is released, after this
        // op's completion.
        unsafe { ring.push(Op::Export { slot }, entry) };
        slot
    }

    /// Queues slot `slot`'s frame to secondary `index` and waits for its ack.
    fn queue_frame(
        &mut self,
        peers: &mut Peers,
        index: usize,
        slot: u32,
        sequence: u64,
        frame_bytes: usize,
        extents: &Range<u64>,
    ) {
        let data = self.slots[slot as usize].as_mut().expect("slot in use");
        let bytes =
            if data.request.command == Command::Write { u64::from(data.request.len_bytes) } else { 0 };
        let peer = peers.get_mut(index);
        let conn = peer.conn.as_mut().expect("sync targets are connected");
        conn.queue.push_back(SendJob::Export { slot, frame_bytes, sent: 0, sequence });
        let now = Instant::now();
        conn.inflight.insert(
            sequence,
            InFlight { run: extents.clone(), bytes, queued_at: now, written_at: now, sent_at: None },
        );
        conn.backlog_bytes += bytes;
        peer.frame_queued();
        data.awaiting[index] = Some((peer.generation, sequence));
        data.sends += 1;
    }

    /// The primary part of slot `slot` completed with `result`.
    pub fn complete(
        &mut self,
        ring: &mut Ring<Op>,
        peers: &mut Peers,
        slot: u32,
        result: i32,
        device: &std::path::Path,
    ) {
        let fd = types::Fd(self.device.as_raw_fd());
        let data = self.slots[slot as usize].as_mut().expect("slot in use");
        let trim = data.request.command == Command::Trim;
        if trim && result == -libc::EOPNOTSUPP && !data.zeroing_fallback {
            // The device cannot punch holes: zero the range instead (the secondaries do the same).
            data.zeroing_fallback = true;
            let entry = zero_entry(fd, &data.request, false);
            // SAFETY: as in `push`.
            unsafe { ring.push(Op::Export { slot }, entry) };
            return;
        }
        let zeroing = matches!(data.request.command, Command::Trim | Command::WriteZeroes);
        if zeroing && data.request.fua && result == 0 && !data.flushing {
            // FUA: durable before the reply, as a write's RWF_DSYNC makes it.
            data.flushing = true;
            let entry = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build();
            // SAFETY: as in `push`.
            unsafe { ring.push(Op::Export { slot }, entry) };
            return;
        }
        let expected = match data.request.command {
            Command::Write => i64::from(data.request.len_bytes),
            _ => 0,
        };
        data.primary = Some(result);
        if i64::from(result) != expected {
            let error = if result < 0 {
                std::io::Error::from_raw_os_error(-result).to_string()
            } else {
                format!("short write of {result} bytes")
            };
            tracing::error!(
                device = %device.display(),
                command = ?data.request.command,
                offset = data.request.offset_bytes,
                len = data.request.len_bytes,
                %error,
                "export: the primary's part failed; the client gets EIO"
            );
            // The primary may hold some of the new bytes: every secondary gets the extents again.
            let run = data.extents.start as usize..data.extents.end as usize;
            for peer in peers.iter_mut().filter(|p| !p.removed) {
                peer.pending.insert_range(run.clone());
            }
        }
        let extents = data.extents.clone();
        self.primary_done(extents);
    }

    /// Replies to every export op whose images have all answered: acked, or dropped by a
    /// disconnect (its extents then went to that secondary's fracture log).
    pub fn advance(&mut self, peers: &Peers, minimum: u32, metrics: &crate::metrics::PrimaryMetrics) {
        // Acks are counted as they come, before the primary's part is done too: a secondary
        // that acknowledges and then drops out still holds the write.
        for (i, peer) in peers.iter().enumerate() {
            if let Some(conn) = &peer.conn {
                self.credit_acks(i, peer.generation, &conn.inflight);
            }
        }
        for slot in 0..self.slots.len() as u32 {
            let Some(data) = self.slots[slot as usize].as_mut() else { continue };
            if data.replied {
                continue;
            }
            let primary_done = data.primary.is_some();
            if !data.sync {
                if primary_done {
                    self.reply(slot, minimum, metrics);
                }
                continue;
            }
            // What is still awaited after `credit_acks` is unacknowledged: it holds the reply
            // while its connection lives, and is dropped with it.
            let mut done = primary_done;
            for (i, awaiting) in data.awaiting.iter_mut().enumerate() {
                let Some((generation, _)) = *awaiting else { continue };
                let peer = peers.get(i);
                if peer.generation == generation && peer.conn.is_some() {
                    done = false;
                } else {
                    *awaiting = None;
                }
            }
            if done {
                self.reply(slot, minimum, metrics);
            }
        }
        for replier in self.batched.drain(..) {
            replier.flush_batch();
        }
    }

    fn reply(&mut self, slot: u32, minimum: u32, metrics: &crate::metrics::PrimaryMetrics) {
        let data = self.slots[slot as usize].as_mut().expect("slot in use");
        let sync = data.sync;
        let expected =
            if data.request.command == Command::Write { i64::from(data.request.len_bytes) } else { 0 };
        let primary_ok = data.primary.is_some_and(|r| i64::from(r) == expected);
        let images = 1 + data.acked;
        let is_flush = data.request.command == Command::Flush;
        let error = if !primary_ok {
            nbd::EIO
        } else if sync && !is_flush && images < minimum {
            tracing::error!(
                offset = data.request.offset_bytes,
                len = data.request.len_bytes,
                images,
                minimum,
                "export: write failed with EIO: a secondary dropped out and only {images} images have it, \
                 the mirror's minimum is {minimum}; the mirror needs attention"
            );
            nbd::EIO
        } else {
            0
        };
        if error != 0 {
            metrics.export_errors.inc();
        } else if data.request.command == Command::Write {
            metrics.export_bytes.inc_by(u64::from(data.request.len_bytes));
        }
        if data.request.reply.reply_batched(data.request.cookie, error) {
            self.batched.push(Arc::clone(&data.request.reply));
        }
        data.replied = true;
        self.release_slot(slot);
    }
}

/// Which secondaries get an op's frame: connected, in the mirror, not being removed, not
/// fractured; under the async policy only while their backlog has room (the write backlog
/// size), past which the extents wait in their pending bitmap and the client never does.
fn targets(io: &Io, request: &ExportRequest, sync: bool) -> [bool; SECONDARIES_MAX] {
    let frame_bytes = if request.command == Command::Write { u64::from(request.len_bytes) } else { 0 };
    let mut targets = [false; SECONDARIES_MAX];
    for (i, peer) in io.peers.iter().enumerate() {
        let target = peer.conn.is_some() && !peer.removed && !peer.draining && !peer.log.fractured();
        let room = peer.conn.as_ref().is_some_and(|c| c.backlog_bytes + frame_bytes <= io.backlog_bytes_max);
        targets[i] = target && (sync || room);
    }
    targets
}

/// A TRIM (`unmap`: punch a hole, the device may unmap it) or a WRITE_ZEROES of the request's
/// range; both leave the range reading as zeroes, on every image.
fn zero_entry(fd: types::Fd, request: &ExportRequest, unmap: bool) -> io_uring::squeue::Entry {
    let mode = if unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE
    };
    opcode::Fallocate::new(fd, u64::from(request.len_bytes)).offset(request.offset_bytes).mode(mode).build()
}

/// Encodes the wire frame of an op for the secondaries: a write's header and offset go into its
/// buffer's prefix, right before the data (flagged `FLAG_CLIENT_WAITS` under the `sync` policy);
/// a TRIM's or WRITE_ZEROES' whole frame is returned. Returns the frame's length too.
fn encode_frame(
    request: &mut ExportRequest,
    sequence: u64,
    sync: bool,
    tag: wire::Tag,
) -> (usize, Option<[u8; ZEROES_FRAME_BYTES]>) {
    match request.buffer.as_mut() {
        Some(buffer) => {
            let len = request.len_bytes as usize;
            let flags = if sync { wire::FLAG_CLIENT_WAITS } else { 0 } | tag.flags;
            let prefix = wire::encode_data_prefix(
                wire::MessageKind::BlockData,
                sequence,
                request.offset_bytes,
                buffer.data(len),
                wire::Tag { flags, cut: tag.cut },
            );
            buffer.prefix_tail_mut(wire::EXTENT_PREFIX_BYTES).copy_from_slice(&prefix);
            (wire::EXTENT_PREFIX_BYTES + len, None)
        }
        None => {
            let message = wire::Message::Zeroes {
                offset_bytes: request.offset_bytes,
                len_bytes: u64::from(request.len_bytes),
                unmap: request.command == Command::Trim,
            };
            let mut frame = Vec::with_capacity(ZEROES_FRAME_BYTES);
            wire::encode_tagged(&message, sequence, tag, &mut frame);
            let frame = frame.try_into().expect("a Zeroes frame is ZEROES_FRAME_BYTES long");
            (ZEROES_FRAME_BYTES, Some(frame))
        }
    }
}
