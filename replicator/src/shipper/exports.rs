//! The engine's side of the NBD export: a client's write, TRIM or WRITE_ZEROES is applied to
//! the primary device through the engine's ring and, under the sync write policy, sent at the
//! same time to every secondary that is connected and not fractured (the seed's Figure 8: both
//! updates in parallel); the client's reply waits for the primary's completion and every such
//! secondary's acknowledgement (durable: secondaries write with `RWF_DSYNC`). Under the async
//! policy the same frames go out, but only to secondaries whose backlog has room (the mirror's
//! write backlog size), and the reply follows the primary's completion; a secondary without
//! room gets the extents in its pending bitmap and is shipped them behind, as the tracker path
//! ships an application's writes.
//!
//! Owns the export's request slots (at most `slots_max`, the bound on requests in the engine)
//! and, per slot, the client's buffer until the primary write and every send of a frame from it
//! have completed. Invariants:
//! - every extent an export op touches is in the intent log (the kernel program marks it) and
//!   counts as dirty for every secondary until the op's reply (`dirty_into`);
//! - a secondary that does not get the frame (fractured, disconnected, not connected) has the
//!   extents in its pending bitmap before the op is submitted, so its fracture log holds them;
//! - no background read of an extent overlaps an export op on it in time: a read in flight when
//!   the op starts is discarded (`stale`) and the extent read again, and no read starts while
//!   the op's primary part is in flight (`busy`); otherwise an older copy could reach a
//!   secondary after the client's data;
//! - the tracker does not report the export's own writes (`mask`), so each crosses the wire
//!   once.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitvec::prelude::*;
use io_uring::{opcode, types};

use super::export_conns::NbdConn;
use super::peer::{InFlight, SendJob};
use super::{Engine, Op, ShipperError};
use crate::export::nbd::{self, Command};
use crate::export::{CONNECTIONS_MAX, EngineSide, Export, ExportRequest, Replier};
use crate::model::SECONDARIES_MAX;
use crate::model::WritePolicy;
use crate::wire;

/// Bytes of an encoded `Zeroes` frame.
const ZEROES_FRAME_BYTES: usize = wire::HEADER_BYTES + 24;

/// The export as the engine holds it.
pub(super) struct ExportState {
    pub(super) _export: Export,
    pub(super) side: EngineSide,
    /// The clients past their handshake (at most `CONNECTIONS_MAX`).
    pub(super) conns: Vec<Option<NbdConn>>,
    pub(super) conn_generation: u32,
    /// Where the next look for a decoded request starts, so no client starves the others.
    next_conn: usize,
    /// The primary device opened for writing (`O_DIRECT`).
    device: File,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    /// The eventfd counter a `Wake` op reads into; fixed address while the op is in flight.
    wake_counter: Box<u64>,
    pub(super) wake_armed: bool,
    /// Extents with an export op's primary part in flight.
    pub(super) busy: BitVec<u64, Lsb0>,
    /// Extents the tracker must not report: `busy`, and those completed since the last drain.
    pub(super) mask: BitVec<u64, Lsb0>,
    /// The extents of the ops completed since the last drain (where `mask` and `busy` differ),
    /// at most `slots.len()`; past that, the next drain copies all of `busy`.
    completed_since_drain: Vec<Range<u64>>,
    completed_overflow: bool,
    /// Extents whose background read was in flight when an export op on them started.
    pub(super) stale: BitVec<u64, Lsb0>,
    /// When the last "too few images" refusal was logged (one line per second at most).
    refused_logged: Option<Instant>,
    /// When the engine last took a client's request (the engine busy-polls while they flow,
    /// under the sync policy).
    pub(super) last_request_at: Option<Instant>,
    /// The connections given replies this turn (`Replier::reply_batched`), each once: flushed
    /// at the end of `advance_exports`, one send per connection.
    batched: Vec<Arc<Replier>>,
}

/// A client request in the engine.
struct Slot {
    request: ExportRequest,
    extents: Range<u64>,
    /// The primary part's result, once it completed.
    primary: Option<i32>,
    /// TRIM: the hole punch was refused, the range is being zeroed instead.
    zeroing_fallback: bool,
    /// TRIM or WRITE_ZEROES with FUA: the range is zeroed, the flush that makes it durable is
    /// in flight.
    flushing: bool,
    /// Per secondary sent the frame: the connection and the frame's sequence, until acked or
    /// the connection drops.
    awaiting: [Option<(u32, u64)>; SECONDARIES_MAX],
    acked: u32,
    /// Send jobs queued or in flight that read this slot's buffer or frame.
    sends: u32,
    /// Sync policy: the reply waits for the secondaries' acks; async: for the primary only.
    sync: bool,
    replied: bool,
    zeroes_frame: Box<[u8; ZEROES_FRAME_BYTES]>,
}

impl ExportState {
    pub(super) fn new(
        export: Export,
        side: EngineSide,
        device: File,
        extents: usize,
        slots_max: usize,
    ) -> Self {
        Self {
            _export: export,
            side,
            conns: (0..CONNECTIONS_MAX).map(|_| None).collect(),
            conn_generation: 0,
            next_conn: 0,
            device,
            slots: (0..slots_max).map(|_| None).collect(),
            free_slots: (0..slots_max as u32).rev().collect(),
            wake_counter: Box::new(0),
            wake_armed: false,
            busy: bitvec![u64, Lsb0; 0; extents],
            mask: bitvec![u64, Lsb0; 0; extents],
            completed_since_drain: Vec::with_capacity(slots_max),
            completed_overflow: false,
            stale: bitvec![u64, Lsb0; 0; extents],
            refused_logged: None,
            last_request_at: None,
            batched: Vec::with_capacity(CONNECTIONS_MAX),
        }
    }

    /// After a tracker drain: what the next one must filter is what is still being written.
    /// Only the ranges of ops completed since are copied: `mask` equals `busy` elsewhere, and
    /// a whole-bitmap copy at every drain would cost a 2 MiB pass per loop turn on a 1 TiB image.
    pub(super) fn drained(&mut self) {
        if self.completed_overflow {
            self.mask.copy_from_bitslice(&self.busy);
            self.completed_overflow = false;
        } else {
            for range in &self.completed_since_drain {
                let run = range.start as usize..range.end as usize;
                self.mask[run.clone()].copy_from_bitslice(&self.busy[run]);
            }
        }
        self.completed_since_drain.clear();
    }

    /// Op `extents` finished its primary part: `busy` drops them unless another op in flight
    /// still writes there, and the next drain stops masking them.
    fn primary_done(&mut self, extents: Range<u64>) {
        let run = extents.start as usize..extents.end as usize;
        self.busy[run.clone()].fill(false);
        for slot in self.slots.iter().flatten().filter(|s| s.primary.is_none()) {
            let (start, end) = (slot.extents.start.max(extents.start), slot.extents.end.min(extents.end));
            if start < end {
                self.busy[start as usize..end as usize].fill(true);
            }
        }
        if self.completed_since_drain.len() < self.completed_since_drain.capacity() {
            self.completed_since_drain.push(extents);
        } else {
            self.completed_overflow = true;
        }
    }

    /// Counts secondary `peer` (connection `generation`) for every op whose frame it has
    /// acknowledged (the sequence is no longer in `inflight`): every turn (`advance_exports`),
    /// and at its disconnect, so acks that came with the failure still count.
    pub(super) fn credit_acks(
        &mut self,
        peer: usize,
        generation: u32,
        inflight: &std::collections::BTreeMap<u64, InFlight>,
    ) {
        for data in self.slots.iter_mut().flatten().filter(|d| !d.replied) {
            if let Some((awaited, sequence)) = data.awaiting[peer]
                && awaited == generation
                && !inflight.contains_key(&sequence)
            {
                data.awaiting[peer] = None;
                data.acked += 1;
            }
        }
    }

    /// Extents every export op not yet replied to touches (dirty for every secondary).
    pub(super) fn dirty_into(&self, out: &mut BitVec<u64, Lsb0>) {
        for slot in self.slots.iter().flatten().filter(|s| !s.replied) {
            out[slot.extents.start as usize..slot.extents.end as usize].fill(true);
        }
    }

    /// Whether an op whose primary part is in flight writes any of `bytes`.
    fn overlaps_in_flight(&self, bytes: &Range<u64>) -> bool {
        self.slots
            .iter()
            .flatten()
            .filter(|s| s.primary.is_none() && s.request.command != Command::Flush)
            .any(|s| {
                let start = s.request.offset_bytes;
                start < bytes.end && bytes.start < start + u64::from(s.request.len_bytes)
            })
    }

    pub(super) fn idle(&self) -> bool {
        self.free_slots.len() == self.slots.len()
    }

    /// The next decoded request, taking the connections in turn.
    fn next_request(&mut self) -> Option<ExportRequest> {
        for turn in 0..self.conns.len() {
            let at = (self.next_conn + turn) % self.conns.len();
            if let Some(request) = self.conns[at].as_mut().and_then(|c| c.ready.pop_front()) {
                self.next_conn = (at + 1) % self.conns.len();
                return Some(request);
            }
        }
        None
    }

    pub(super) fn wake_fd(&self) -> i32 {
        use std::os::fd::AsFd as _;
        self.side.wake.as_fd().as_raw_fd()
    }

    /// The bytes a send of slot `slot`'s frame starts from.
    pub(super) fn frame_ptr(&self, slot: u32, sent: usize) -> *const u8 {
        let data = self.slots[slot as usize].as_ref().expect("a queued frame's slot is in use");
        match &data.request.buffer {
            // SAFETY: the frame's header and offset sit right before the data, in the prefix page.
            Some(buffer) => unsafe { buffer.data_ptr().sub(wire::EXTENT_PREFIX_BYTES).add(sent) },
            None => data.zeroes_frame[sent..].as_ptr(),
        }
    }

    /// Completes a `Wake` op still in the ring, for a stop.
    pub(super) fn wake(&self) {
        let _ = self.side.wake.write(1);
    }
}

impl Engine {
    pub(super) fn write_policy(&self) -> WritePolicy {
        self.mirror.as_ref().map_or(self.config.write_policy, |db| db.write_policy)
    }

    fn minimum_images(&self) -> u32 {
        self.mirror.as_ref().map_or(self.config.minimum_images, |db| db.minimum_images)
    }

    /// Whether secondary `index` gets an export op's frame under the sync policy.
    fn sync_target(&self, index: usize) -> bool {
        let peer = &self.peers[index];
        peer.conn.is_some() && !peer.removed && !peer.draining && !peer.log.fractured()
    }

    /// Whether secondary `index` may take `bytes` more unacknowledged bytes now.
    fn backlog_room(&self, index: usize, bytes: u64) -> bool {
        self.peers[index]
            .conn
            .as_ref()
            .is_some_and(|c| c.backlog_bytes + bytes <= self.config.backlog_bytes_max)
    }

    /// Keeps a `Wake` op on the export's eventfd in the ring, so a request wakes the engine.
    pub(super) fn arm_export_wake(&mut self, stopping: bool) -> Result<(), ShipperError> {
        let Some(export) = self.export.as_mut() else { return Ok(()) };
        if export.wake_armed || stopping || self.free_ops.is_empty() {
            return Ok(());
        }
        export.wake_armed = true;
        let entry =
            opcode::Read::new(types::Fd(export.wake_fd()), (&mut *export.wake_counter as *mut u64).cast(), 8)
                .build();
        self.push_op(Op::Wake, entry)
    }

    /// Starts the requests the export's clients sent, while slots and ring entries last.
    pub(super) fn take_export_requests(&mut self) -> Result<(), ShipperError> {
        loop {
            let Some(export) = self.export.as_mut() else { return Ok(()) };
            if export.free_slots.is_empty() || self.free_ops.len() <= 1 + self.peers.len() * 3 {
                return Ok(());
            }
            let Some(request) = export.next_request() else { return Ok(()) };
            export.last_request_at = Some(Instant::now());
            self.start_export(request)?;
        }
    }

    fn start_export(&mut self, mut request: ExportRequest) -> Result<(), ShipperError> {
        if request.command == Command::Flush {
            let export = self.export.as_mut().expect("export requests come from an export");
            let entry = opcode::Fsync::new(types::Fd(export.device.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            return self.push_export(request, 0..0, entry, None, false).map(|_| ());
        }
        let extent_bytes = self.config.extent_bytes.get();
        let end_bytes = request.offset_bytes + u64::from(request.len_bytes);
        let extents = request.offset_bytes / extent_bytes..end_bytes.div_ceil(extent_bytes);
        let sync = self.write_policy() == WritePolicy::Sync;
        let frame_bytes = if request.command == Command::Write { u64::from(request.len_bytes) } else { 0 };
        let mut targets = [false; SECONDARIES_MAX];
        for (i, target) in targets.iter_mut().enumerate().take(self.peers.len()) {
            // Async: only while the secondary's backlog has room (the write backlog size);
            // past it the extents wait in its pending bitmap, and the client never does.
            *target = self.sync_target(i) && (sync || self.backlog_room(i, frame_bytes));
        }
        let images = 1 + targets.iter().filter(|&&t| t).count() as u32;
        if sync && images < self.minimum_images() {
            self.refuse_export(request, images);
            return Ok(());
        }
        let bytes = request.offset_bytes..end_bytes;
        self.note_export_extents(&extents, &bytes, &targets);
        let export = self.export.as_mut().expect("export requests come from an export");
        let fd = types::Fd(export.device.as_raw_fd());
        let entry = match request.command {
            Command::Write => {
                let buffer = request.buffer.as_ref().expect("a write carries its data");
                let flags = if request.fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, buffer.data_ptr(), request.len_bytes)
                    .offset(request.offset_bytes)
                    .rw_flags(flags)
                    .build()
            }
            Command::Trim | Command::WriteZeroes => {
                zero_entry(fd, &request, request.command == Command::Trim)
            }
            other => {
                unreachable!("the export hands the engine writes, flushes, trims and zeroes, not {other:?}")
            }
        };
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let (frame_bytes, zeroes_frame) = encode_frame(&mut request, sequence, sync);
        let slot = self.push_export(request, extents.clone(), entry, zeroes_frame, sync)?;
        for i in (0..self.peers.len()).filter(|&i| targets[i]) {
            self.queue_export_frame(i, slot, sequence, frame_bytes, &extents);
        }
        Ok(())
    }

    /// Marks an export op's extents before it is submitted: in the intent log's quiet clock,
    /// pending for every secondary that does not get the frame, busy (no background read
    /// starts), stale where a background read is in flight, and masked from the tracker.
    fn note_export_extents(
        &mut self,
        extents: &Range<u64>,
        bytes: &Range<u64>,
        targets: &[bool; SECONDARIES_MAX],
    ) {
        let run = extents.start as usize..extents.end as usize;
        let now_ms = (self.started.elapsed().as_millis() as u64).clamp(1, u64::from(u32::MAX)) as u32;
        self.quiet.note_dirty_run(run.clone());
        // Two overlapping ops in flight may reach the primary in one order and a secondary (which
        // applies frames in sequence) in the other: every secondary then gets the extents again,
        // read once both are on the primary (`busy` holds the read back until then).
        let overlapping = self.export.as_ref().expect("an export").overlaps_in_flight(bytes);
        if overlapping {
            tracing::debug!(
                offset = bytes.start,
                end = bytes.end,
                "export: overlapping writes in flight; the extents are shipped again"
            );
        }
        for (i, peer) in self.peers.iter_mut().enumerate() {
            if peer.removed || (targets[i] && !overlapping) {
                continue;
            }
            peer.pending_write(run.clone(), now_ms);
        }
        let export = self.export.as_mut().expect("an export");
        export.busy[run.clone()].fill(true);
        export.mask[run.clone()].fill(true);
        for e in run {
            if self.reading[e] {
                export.stale.set(e, true);
            }
        }
    }

    /// Fails a sync write at once, before it touches any image: too few images would have it.
    fn refuse_export(&mut self, request: ExportRequest, images: u32) {
        let minimum = self.minimum_images();
        let export = self.export.as_mut().expect("an export");
        if export.refused_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            tracing::error!(
                offset = request.offset_bytes,
                len = request.len_bytes,
                images,
                minimum,
                "export: write refused with EIO: only {images} images can take it, the mirror's minimum is {minimum}; \
                 the mirror needs attention"
            );
            export.refused_logged = Some(Instant::now());
        }
        self.metrics.export_errors.inc();
        request.reply.reply(request.cookie, nbd::EIO);
        if let Some(buffer) = request.buffer {
            request.reply.give_back(buffer);
        }
    }

    /// Puts an export op's primary part in the ring; returns its slot.
    fn push_export(
        &mut self,
        request: ExportRequest,
        extents: Range<u64>,
        entry: io_uring::squeue::Entry,
        zeroes_frame: Option<[u8; ZEROES_FRAME_BYTES]>,
        sync: bool,
    ) -> Result<u32, ShipperError> {
        let export = self.export.as_mut().expect("an export");
        let slot = export.free_slots.pop().expect("take_export_requests checked a free slot");
        assert!(export.slots[slot as usize].is_none());
        export.slots[slot as usize] = Some(Slot {
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
        self.push_op(Op::Export { slot }, entry)?;
        Ok(slot)
    }

    /// Queues slot `slot`'s frame to secondary `index` and waits for its ack.
    fn queue_export_frame(
        &mut self,
        index: usize,
        slot: u32,
        sequence: u64,
        frame_bytes: usize,
        extents: &Range<u64>,
    ) {
        let export = self.export.as_mut().expect("an export");
        let data = export.slots[slot as usize].as_mut().expect("slot in use");
        let bytes =
            if data.request.command == Command::Write { u64::from(data.request.len_bytes) } else { 0 };
        let peer = &mut self.peers[index];
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

    /// A send job of slot `slot` is done (sent, or dropped with its connection).
    pub(super) fn export_send_done(&mut self, slot: u32) {
        let export = self.export.as_mut().expect("an export");
        let data = export.slots[slot as usize].as_mut().expect("slot in use");
        assert!(data.sends > 0, "export slot {slot}: more sends done than queued");
        data.sends -= 1;
        self.release_export_slot(slot);
    }

    /// The primary part of slot `slot` completed with `result`.
    pub(super) fn complete_export(&mut self, slot: u32, result: i32) -> Result<(), ShipperError> {
        let export = self.export.as_mut().expect("an export");
        let data = export.slots[slot as usize].as_mut().expect("slot in use");
        let trim = data.request.command == Command::Trim;
        if trim && result == -libc::EOPNOTSUPP && !data.zeroing_fallback {
            // The device cannot punch holes: zero the range instead (the secondaries do the same).
            data.zeroing_fallback = true;
            let entry = zero_entry(types::Fd(export.device.as_raw_fd()), &data.request, false);
            return self.push_op(Op::Export { slot }, entry);
        }
        let zeroing = matches!(data.request.command, Command::Trim | Command::WriteZeroes);
        if zeroing && data.request.fua && result == 0 && !data.flushing {
            // FUA: durable before the reply, as a write's RWF_DSYNC makes it.
            data.flushing = true;
            let entry = opcode::Fsync::new(types::Fd(export.device.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            return self.push_op(Op::Export { slot }, entry);
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
                device = %self.config.device.display(),
                command = ?data.request.command,
                offset = data.request.offset_bytes,
                len = data.request.len_bytes,
                %error,
                "export: the primary's part failed; the client gets EIO"
            );
            // The primary may hold some of the new bytes: every secondary gets the extents again.
            let run = data.extents.start as usize..data.extents.end as usize;
            for peer in self.peers.iter_mut().filter(|p| !p.removed) {
                peer.pending.insert_range(run.clone());
            }
        }
        let extents = data.extents.clone();
        self.export.as_mut().expect("an export").primary_done(extents);
        Ok(())
    }

    /// Replies to every export op whose images have all answered: acked, or dropped by a
    /// disconnect (its extents then went to that secondary's fracture log).
    pub(super) fn advance_exports(&mut self) {
        let minimum = self.minimum_images();
        let Some(export) = self.export.as_mut() else { return };
        // Acks are counted as they come, before the primary's part is done too: a secondary
        // that acknowledges and then drops out still holds the write.
        for (i, peer) in self.peers.iter().enumerate() {
            if let Some(conn) = &peer.conn {
                export.credit_acks(i, peer.generation, &conn.inflight);
            }
        }
        let slots = export.slots.len();
        for slot in 0..slots as u32 {
            let export = self.export.as_mut().expect("an export");
            let Some(data) = export.slots[slot as usize].as_mut() else { continue };
            if data.replied {
                continue;
            }
            let primary_done = data.primary.is_some();
            if !data.sync {
                if primary_done {
                    self.reply_export(slot, minimum);
                }
                continue;
            }
            // What is still awaited after `credit_acks` is unacknowledged: it holds the reply
            // while its connection lives, and is dropped with it.
            let mut done = primary_done;
            for (i, awaiting) in data.awaiting.iter_mut().enumerate() {
                let Some((generation, _)) = *awaiting else { continue };
                let peer = &self.peers[i];
                if peer.generation == generation && peer.conn.is_some() {
                    done = false;
                } else {
                    *awaiting = None;
                }
            }
            if done {
                self.reply_export(slot, minimum);
            }
        }
        let export = self.export.as_mut().expect("an export");
        for replier in export.batched.drain(..) {
            replier.flush_batch();
        }
    }

    fn reply_export(&mut self, slot: u32, minimum: u32) {
        let export = self.export.as_mut().expect("an export");
        let data = export.slots[slot as usize].as_mut().expect("slot in use");
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
            self.metrics.export_errors.inc();
        } else if data.request.command == Command::Write {
            self.metrics.export_bytes.inc_by(u64::from(data.request.len_bytes));
        }
        if data.request.reply.reply_batched(data.request.cookie, error) {
            export.batched.push(Arc::clone(&data.request.reply));
        }
        data.replied = true;
        self.release_export_slot(slot);
    }

    /// Frees slot `slot` once it is replied to and no send reads its buffer any more.
    fn release_export_slot(&mut self, slot: u32) {
        let export = self.export.as_mut().expect("an export");
        let data = export.slots[slot as usize].as_ref().expect("slot in use");
        if !data.replied || data.sends > 0 {
            return;
        }
        let data = export.slots[slot as usize].take().expect("slot in use");
        if let Some(buffer) = data.request.buffer {
            data.request.reply.give_back(buffer);
        }
        export.free_slots.push(slot);
    }
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
) -> (usize, Option<[u8; ZEROES_FRAME_BYTES]>) {
    match request.buffer.as_mut() {
        Some(buffer) => {
            let len = request.len_bytes as usize;
            let flags = if sync { wire::FLAG_CLIENT_WAITS } else { 0 };
            let prefix = wire::encode_data_prefix(
                wire::MessageKind::BlockData,
                sequence,
                request.offset_bytes,
                buffer.data(len),
                flags,
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
            wire::encode(&message, sequence, &mut frame);
            let frame = frame.try_into().expect("a Zeroes frame is ZEROES_FRAME_BYTES long");
            (ZEROES_FRAME_BYTES, Some(frame))
        }
    }
}
