//! The frames of a session besides extent data: keepalives, verify requests (hash what the
//! image will hold: the image with the staged frames laid over it), commits of cuts,
//! consistency points (record that the image is consistent), TRIM and WRITE_ZEROES (routed
//! like data), and the mirror database in its two steps (hold, then store), with a former
//! primary's divergent extents handed back first.
//!
//! Invariants: a verify, a commit, a point or a zeroing waits until every write before it has
//! completed
//! (`Waiting`), so it sees or follows exactly the frames before it; an answer (hashes, an ack)
//! goes out after the acks of the writes before it (`Session::send_frame`).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::journal::{self, FrameInfo, Route, format::RecordKind};
use super::session::{Session, SessionEnd, Waiting};
use crate::consistency::{self, ConsistencyRecord};
use crate::failback;
use crate::wire::{self, Message};

/// The most of a TRIM or WRITE_ZEROES zeroed in one call (see `Session::zero_range`): a quarter
/// of a second on a disk that zeroes at 16 MiB/s, a millisecond where the device discards.
const ZEROES_CHUNK_BYTES: u64 = 4 << 20;
/// While a TRIM or WRITE_ZEROES is zeroed, the least time between two keepalives.
const ZEROES_KEEPALIVE_MS: u64 = 100;

impl Session<'_> {
    /// A whole frame other than extent data has arrived (`header`, its payload in `small`).
    pub(super) fn small_frame(
        &mut self,
        header: wire::Header,
        stream: &mut TcpStream,
    ) -> Result<(), SessionEnd> {
        let payload = &self.small[..header.payload_bytes as usize];
        match wire::decode_payload(&self.header_bytes, &header, payload, &self.limits)? {
            Message::Keepalive => self.send_frame(stream, &Message::Keepalive),
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
                self.ack(header.sequence, stream)
            }
            Message::MirrorDbPrepare { envelope } => {
                let envelope = envelope.to_vec();
                self.prepared = Some(self.reconcile_db(&envelope, stream)?);
                self.ack(header.sequence, stream)
            }
            Message::MirrorDbCommit { revision } => {
                let prepared =
                    self.prepared.take().filter(|p| p.db.revision == revision).ok_or_else(|| {
                        failback::Refusal::Refused(format!(
                            "commit of mirror database revision {revision}, which was not prepared here"
                        ))
                    })?;
                store_mirror_db(self.state_dir, &prepared)?;
                self.ack(header.sequence, stream)
            }
            Message::ConsistencyPoint { generation, point_unix_ms } => {
                let sequence = header.sequence;
                self.waiting = Some(Waiting::Point { generation, point_unix_ms, sequence });
                self.retry_waiting(stream)
            }
            Message::Zeroes { offset_bytes, len_bytes, unmap } => {
                let (sequence, tag) = (header.sequence, wire::Tag { flags: header.flags, cut: header.cut });
                self.waiting = Some(Waiting::Zeroes { offset_bytes, len_bytes, unmap, sequence, tag });
                self.retry_waiting(stream)
            }
            Message::Commit { cut, cut_unix_ms } => {
                self.waiting = Some(Waiting::Commit { cut, cut_unix_ms, sequence: header.sequence });
                self.retry_waiting(stream)
            }
            other => Err(SessionEnd::Unexpected(other.kind())),
        }
    }

    /// Acknowledges frame `sequence` now, after the acks before it.
    fn ack(&mut self, sequence: u64, stream: &mut TcpStream) -> Result<(), SessionEnd> {
        self.send_frame(stream, &Message::Ack { first_sequence: sequence, last_sequence: sequence })
    }

    /// A TRIM (`unmap`) or WRITE_ZEROES of `range`, every write before it durable, routed like
    /// data: staged as a journal record, or applied in place (its acks go out before a long
    /// zeroing, then the range is zeroed durably); then the frame is acknowledged.
    pub(super) fn apply_zeroes(
        &mut self,
        range: std::ops::Range<u64>,
        (unmap, tag): (bool, wire::Tag),
        sequence: u64,
        stream: &mut TcpStream,
    ) -> Result<(), SessionEnd> {
        let info = FrameInfo {
            tag: tag.cut,
            in_order: tag.flags & wire::FLAG_IN_ORDER != 0,
            client: true,
            image_offset: range.start,
            image_len: range.end - range.start,
        };
        loop {
            if self.journal.route(&info) == Route::InPlace {
                self.flush_acks(stream)?;
                self.zero_range(range.start, range.end - range.start, unmap, stream)?;
                break;
            }
            let flags = info.record_flags() | if unmap { journal::format::FLAG_UNMAP } else { 0 };
            match self.journal.stage(RecordKind::Zeroes, flags, &info, 0)? {
                Some(placement) => {
                    self.journal.write_zeroes_record(&placement, &info, unmap)?;
                    break;
                }
                // No write is in flight (the zeroing waited for them): make room, route again.
                None => self.overflow()?,
            }
        }
        self.ack(sequence, stream)
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
            journal::zero_range(self.image, at_bytes, chunk_bytes, unmap)
                .map_err(|error| self.write_failed(at_bytes, chunk_bytes as usize, error))?;
            at_bytes += chunk_bytes;
            if at_bytes < end_bytes && last_keepalive.elapsed() > keepalive_after {
                self.send_frame(stream, &Message::Keepalive)?;
                last_keepalive = Instant::now();
            }
        }
        self.image.sync_data().map_err(|error| self.write_failed(offset_bytes, len_bytes as usize, error))
    }

    /// Hashes extents `first_extent..first_extent + count` as they will be once the frames
    /// received so far are applied (every write before the request has completed; the staged
    /// frames laid over the image) and replies with their XXH3-128 hashes. Reads through a pool
    /// buffer with O_DIRECT, a buffer at a time; no write is in flight meanwhile.
    pub(super) fn answer_verify(
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
                    Ok(()) => {
                        if let Err(error) = self.journal.overlay(offset, chunk) {
                            outcome = Err(error.into());
                            break 'extents;
                        }
                        hasher.update(chunk);
                    }
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
        self.send_frame(stream, &Message::VerifyHashes { first_extent, hashes })
    }

    /// Every write before the point has completed (and was durable when it did): records the
    /// point durably, then acknowledges its frame.
    pub(super) fn record_point(
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
        self.ack(sequence, stream)
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
        self.send_divergent(stream, &reconciled.divergent)?;
        Ok(reconciled)
    }

    /// Hands a former primary's divergent extents to the new primary, `DIVERGENT_RUNS_MAX`
    /// runs a frame.
    fn send_divergent(
        &mut self,
        stream: &mut TcpStream,
        runs: &[std::ops::Range<u64>],
    ) -> Result<(), SessionEnd> {
        if !runs.is_empty() {
            let extents: u64 = runs.iter().map(|r| r.end - r.start).sum();
            tracing::warn!(
                extents,
                "failing back: this member was primary; handing back the extents it wrote"
            );
        }
        let mut payload = Vec::with_capacity(wire::DIVERGENT_RUNS_MAX * 16);
        for chunk in runs.chunks(wire::DIVERGENT_RUNS_MAX) {
            payload.clear();
            for run in chunk {
                payload.extend_from_slice(&run.start.to_le_bytes());
                payload.extend_from_slice(&run.end.to_le_bytes());
            }
            self.send_frame(stream, &Message::DivergentRuns { runs: &payload })?;
        }
        Ok(())
    }
}

/// Stores the mirror database the primary sent (reconciled with this member's), durably.
fn store_mirror_db(state_dir: &std::path::Path, reconciled: &failback::Reconciled) -> Result<(), SessionEnd> {
    let db = &reconciled.db;
    let io = SessionEnd::State;
    db.store(state_dir).map_err(|e| io(e.to_string()))?;
    if let Some(name) = &reconciled.image_name {
        failback::store_image_name(state_dir, name).map_err(io)?;
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
