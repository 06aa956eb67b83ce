//! The verify stage: a pass over the whole image, one batch at a time per secondary: the
//! request goes down the connection (behind the frames already queued, so the secondary hashes
//! what it has once they are durable) while the primary reads the same extents and hashes them;
//! once both hashes are in, the extents that differ become pending and are shipped.
//!
//! Owns nothing of its own: the pass's state is the secondary's (`resync::Verify`, persisted
//! with its fracture log so a restart resumes it). Invariant: one batch per secondary at a
//! time; a batch whose connection dropped is asked again (`Verify::batch` is cleared at the
//! disconnect, and a read of the old batch is recognised by the generation and dropped).

use std::ops::Range;

use super::Op;
use super::buffers::Buffers;
use super::peer::SendJob;
use super::peers::Peers;
use super::read::Source;
use super::resync::VerifyBatch;
use crate::uring::Ring;
use crate::wire;

/// Starts the next batch of every verifying, connected secondary, while buffers last; a pass
/// that reached the image's end is finished.
pub fn schedule(
    ring: &mut Ring<Op>,
    buffers: &mut Buffers,
    source: &Source,
    peers: &mut Peers,
    queue_max: usize,
) {
    let extents = source.extents() as u64;
    let batch_max =
        (source.run_bytes_max() / source.extent_bytes()).min(u64::from(wire::VERIFY_EXTENTS_MAX)).max(1);
    for (index, peer) in peers.iter_mut().enumerate() {
        let Some(verify) = peer.log.verify.as_mut() else { continue };
        if verify.batch.is_some() {
            continue;
        }
        if verify.next_extent >= extents {
            tracing::info!(
                secondary = %peer.name,
                differing_extents = verify.differing_extents,
                seconds = verify.started.elapsed().as_secs_f64(),
                "verify finished"
            );
            peer.log.finish_verify();
            continue;
        }
        let Some(conn) = peer.conn.as_mut() else { continue };
        if buffers.free_count() == 0 || !peer.log.throttle.allows() || conn.queue.len() >= queue_max {
            continue;
        }
        let first_extent = verify.next_extent;
        let count = batch_max.min(extents - first_extent) as u32;
        verify.batch = Some(VerifyBatch {
            first_extent,
            count,
            local_ready: false,
            remote_ready: false,
            local_failed: false,
        });
        conn.queue.push_back(SendJob::VerifyRequest { first_extent, count, sent: 0 });
        peer.log.throttle.take(u64::from(count) * source.extent_bytes());
        let buffer = buffers.take().expect("checked a free buffer");
        let entry =
            source.read_entry(buffers.pool(), buffer, &(first_extent..first_extent + u64::from(count)));
        let op = Op::VerifyRead { peer: index, generation: peer.generation, buffer, first_extent, count };
        // SAFETY: the buffer is the op's alone until its completion gives it back.
        unsafe { ring.push(op, entry) };
    }
}

/// A verify read: of `run` into `buffer`, for connection `generation` of slot `peer`.
pub struct BatchRead {
    pub peer: usize,
    pub generation: u32,
    pub buffer: u16,
    pub run: Range<u64>,
}

/// The primary's side of a verify batch has been read: hash it, and compare if the
/// secondary's hashes are in.
pub fn complete_read(
    read: BatchRead,
    result: i32,
    buffers: &mut Buffers,
    source: &Source,
    peers: &mut Peers,
) {
    let BatchRead { peer: index, generation, buffer, run } = read;
    let (offset, len) = source.run_bytes(&run);
    let extent_bytes = source.extent_bytes() as usize;
    let peer = peers.get_mut(index);
    let current = peer.generation == generation;
    if let Some(verify) = peer.log.verify.as_mut().filter(|_| current)
        && let Some(batch) = verify.batch.as_mut().filter(|b| b.first_extent == run.start)
    {
        if i64::from(result) == len as i64 {
            let data = buffers.pool().data(buffer, len);
            for (slot, extent) in verify.local.iter_mut().zip(data.chunks(extent_bytes)) {
                *slot = xxhash_rust::xxh3::xxh3_128(extent);
            }
        } else {
            tracing::error!(device = %source.path().display(), offset, len, result, "verify read from the primary failed; those extents will be shipped");
            batch.local_failed = true;
        }
        batch.local_ready = true;
    }
    buffers.give_back(buffer);
    compare(peers, index);
}

/// Once both sides of slot `index`'s batch are in, the differing extents become pending.
pub fn compare(peers: &mut Peers, index: usize) {
    let peer = peers.get_mut(index);
    let Some(verify) = peer.log.verify.as_mut() else { return };
    if let Some(differing) = verify.compare(&mut peer.pending)
        && differing > 0
    {
        peer.metrics.verify_differing_extents.inc_by(differing);
    }
}
