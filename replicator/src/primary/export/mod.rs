//! The engine's side of the NBD export: a client's write, TRIM or WRITE_ZEROES is applied to
//! the primary device through the engine's ring and, under the sync write policy, sent at the
//! same time to every secondary that is connected and not fractured (both updates in parallel); the client's reply waits for the primary's completion and every such
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

//!
//! The files: this one holds the export's state; `requests.rs` takes a request through the
//! primary's device and the secondaries to its reply; `clients.rs` reads the clients'
//! connections and decodes their requests.

mod clients;
mod requests;

use std::fs::File;
use std::fs::OpenOptions;
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::Arc;
use std::time::Instant;

use bitvec::prelude::*;

use super::peer::InFlight;
use crate::export::nbd::Command;
use crate::export::{CONNECTIONS_MAX, EngineSide, Export, ExportRequest, Replier};
use crate::model::SECONDARIES_MAX;
use crate::wire;

use clients::NbdConn;
pub use requests::Io;

/// Bytes of an encoded `Zeroes` frame.
const ZEROES_FRAME_BYTES: usize = wire::HEADER_BYTES + 24;

/// The export as the engine holds it.
pub struct ExportState {
    _export: Export,
    side: EngineSide,
    /// The clients past their handshake (at most `CONNECTIONS_MAX`).
    conns: Vec<Option<NbdConn>>,
    conn_generation: u32,
    /// Where the next look for a decoded request starts, so no client starves the others.
    next_conn: usize,
    /// The primary device opened for writing (`O_DIRECT`).
    device: File,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    /// The eventfd counter a `Wake` op reads into; fixed address while the op is in flight.
    wake_counter: Box<u64>,
    wake_armed: bool,
    /// Extents with an export op's primary part in flight.
    busy: BitVec<u64, Lsb0>,
    /// Extents the tracker must not report: `busy`, and those completed since the last drain.
    mask: BitVec<u64, Lsb0>,
    /// The extents of the ops completed since the last drain (where `mask` and `busy` differ),
    /// at most `slots.len()`; past that, the next drain copies all of `busy`.
    completed_since_drain: Vec<Range<u64>>,
    completed_overflow: bool,
    /// Extents whose background read was in flight when an export op on them started.
    stale: BitVec<u64, Lsb0>,
    /// When the last "too few images" refusal was logged (one line per second at most).
    refused_logged: Option<Instant>,
    /// When the engine last took a client's request (the engine busy-polls while they flow,
    /// under the sync policy).
    last_request_at: Option<Instant>,
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
    fn new(export: Export, side: EngineSide, device: File, extents: usize, slots_max: usize) -> Self {
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
    pub fn drained(&mut self) {
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
    pub fn credit_acks(
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
    pub fn dirty_into(&self, out: &mut BitVec<u64, Lsb0>) {
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

    pub fn idle(&self) -> bool {
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

    pub fn wake_fd(&self) -> i32 {
        use std::os::fd::AsFd as _;
        self.side.wake.as_fd().as_raw_fd()
    }

    /// The bytes a send of slot `slot`'s frame starts from.
    pub fn frame_ptr(&self, slot: u32, sent: usize) -> *const u8 {
        let data = self.slots[slot as usize].as_ref().expect("a queued frame's slot is in use");
        match &data.request.buffer {
            // SAFETY: the frame's header and offset sit right before the data, in the prefix page.
            Some(buffer) => unsafe { buffer.data_ptr().sub(wire::EXTENT_PREFIX_BYTES).add(sent) },
            None => data.zeroes_frame[sent..].as_ptr(),
        }
    }

    /// What the tracker's drain must not report (see `drain`).
    pub fn mask(&self) -> &BitVec<u64, Lsb0> {
        &self.mask
    }

    /// Whether an export op's primary part on `extent` is in flight (no read may start there).
    pub fn busy(&self, extent: usize) -> bool {
        self.busy[extent]
    }

    /// Whether an export op started on `run` while its read was in flight; clears the mark.
    pub fn take_stale(&mut self, run: &Range<u64>) -> bool {
        let stale = &mut self.stale[run.start as usize..run.end as usize];
        let any = stale.any();
        stale.fill(false);
        any
    }

    /// Whether a client's request was taken less than `POLL_ACTIVE_WITHIN_US` ago (the engine
    /// busy-polls while they flow, under the sync policy).
    pub fn requests_flowing(&self) -> bool {
        crate::poll::within_poll_window(self.last_request_at)
    }

    /// A send job of slot `slot` is done (sent, or dropped with its connection).
    pub fn send_done(&mut self, slot: u32) {
        let data = self.slots[slot as usize].as_mut().expect("slot in use");
        assert!(data.sends > 0, "export slot {slot}: more sends done than queued");
        data.sends -= 1;
        self.release_slot(slot);
    }

    /// Frees slot `slot` once it is replied to and no send reads its buffer any more.
    fn release_slot(&mut self, slot: u32) {
        let data = self.slots[slot as usize].as_ref().expect("slot in use");
        if !data.replied || data.sends > 0 {
            return;
        }
        let data = self.slots[slot as usize].take().expect("slot in use");
        if let Some(buffer) = data.request.buffer {
            data.request.reply.give_back(buffer);
        }
        self.free_slots.push(slot);
    }

    /// Completes a `Wake` op still in the ring, for a stop.
    pub fn wake(&self) {
        let _ = self.side.wake.write(1);
    }
}

/// Slots for export requests in the engine: a write holds a buffer, flushes and TRIMs none.
pub fn slots_max(config: &crate::export::ExportConfig) -> usize {
    usize::from(config.buffers) * 2
}

/// Starts the NBD export of `device` (a mirror's name, if it has one, is the export's), and
/// opens the device for the export's writes: exclusively, so nothing mounts it while clients
/// write through us.
pub fn start(
    export_config: &crate::export::ExportConfig,
    path: &std::path::Path,
    name: String,
    device: &crate::device::BlockDevice,
    extents: usize,
) -> Result<ExportState, String> {
    let write_fd = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_EXCL)
        .open(path)
        .map_err(|e| {
            format!(
                "opening {} exclusively for the export's writes (is it mounted or open elsewhere?): {e}",
                path.display()
            )
        })?;
    let info = crate::export::ExportInfo {
        name,
        image_bytes: device.size_bytes(),
        block_bytes_min: u32::try_from(device.logical_block_bytes).unwrap_or(4096).max(512),
        block_bytes_max: export_config.block_bytes_max,
    };
    let (export, side) = Export::start(export_config, path, info).map_err(|e| e.to_string())?;
    Ok(ExportState::new(export, side, write_fd, extents, slots_max(export_config)))
}
