//! The read stage: picks the next run of extents some secondary needs, reads it from the
//! primary device with O_DIRECT into a pool buffer, and once the read is done queues the frame
//! to every secondary it was read for.
//!
//! Owns the primary device (read side), the cursor, and the reads in flight (by buffer).
//! Invariants:
//! - an extent is never read again while a read of it is in flight (`reading`): frames are
//!   queued when their read completes, so two reads in flight together could queue the older
//!   data last;
//! - a read's bytes are counted in its targets' backlog from the moment it is scheduled, so
//!   reads in flight count against the backlog limit too;
//! - a target that disconnected meanwhile, every target of a failed read, and every target of
//!   a read an export write overtook get the run back in their pending extents.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::time::Instant;

use bitvec::prelude::*;
use io_uring::{opcode, types};

use super::buffers::Buffers;
use super::cuts::{Cuts, FrameCut};
use super::export::ExportState;
use super::peer::{InFlight, Peer, SendJob};
use super::peers::Peers;
use super::{Clock, Op};
use crate::model::SECONDARIES_MAX;
use crate::tracker::Tracker;
use crate::uring::Ring;
use crate::wire;

/// A read in flight, kept by its buffer.
#[derive(Debug)]
struct Read {
    run: Range<u64>,
    /// Per secondary slot: the connection generation it is read for.
    targets: [Option<u32>; SECONDARIES_MAX],
    /// Per target: when the oldest write the run carries for it was drained (ms on the
    /// engine's clock), 0 unknown.
    written_at_ms: [u32; SECONDARIES_MAX],
    /// The tracker's epoch when the read was issued (`cuts::Cuts::classify`).
    epoch: u64,
}

/// How much each secondary is fed.
#[derive(Clone, Copy, Debug)]
pub struct Feed {
    pub backlog_bytes_max: u64,
    /// Frames queued per connection at most.
    pub queue_max: usize,
}

pub struct Source {
    device: File,
    path: std::path::PathBuf,
    device_bytes: u64,
    extent_bytes: u64,
    run_bytes_max: u64,
    /// Where the next look for a run starts (wrapping), so every extent's turn comes.
    cursor: usize,
    /// Extents with a read in flight.
    reading: BitVec<u64, Lsb0>,
    /// The reads in flight, indexed by the buffer each reads into.
    reads: Vec<Option<Read>>,
}

impl Source {
    pub fn new(
        device: File,
        path: std::path::PathBuf,
        device_bytes: u64,
        extent_bytes: u64,
        run_bytes_max: usize,
        buffers: u16,
    ) -> Self {
        assert!((run_bytes_max as u64).is_multiple_of(extent_bytes) && run_bytes_max > 0);
        let extents = device_bytes.div_ceil(extent_bytes) as usize;
        Self {
            device,
            path,
            device_bytes,
            extent_bytes,
            run_bytes_max: run_bytes_max as u64,
            cursor: 0,
            reading: bitvec![u64, Lsb0; 0; extents],
            reads: (0..buffers).map(|_| None).collect(),
        }
    }

    pub fn extents(&self) -> usize {
        self.reading.len()
    }

    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    pub fn run_bytes_max(&self) -> u64 {
        self.run_bytes_max
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Whether a read of `extent` is in flight.
    pub fn reading(&self, extent: usize) -> bool {
        self.reading[extent]
    }

    pub fn reads_in_flight(&self) -> usize {
        self.reads.iter().flatten().count()
    }

    /// Whether a read in flight will queue a frame for secondary slot `index`.
    pub fn reads_for(&self, index: usize) -> bool {
        self.reads.iter().flatten().any(|read| read.targets[index].is_some())
    }

    /// Marks the runs of the reads in flight for secondary slot `index` in `out`.
    pub fn dirty_into(&self, index: usize, out: &mut BitVec<u64, Lsb0>) {
        for read in self.reads.iter().flatten().filter(|read| read.targets[index].is_some()) {
            out[read.run.start as usize..read.run.end as usize].fill(true);
        }
    }

    /// As `dirty_into`, into an extent set.
    pub fn reading_for_into(&self, index: usize, out: &mut crate::extent_set::ExtentSet) {
        for read in self.reads.iter().flatten().filter(|read| read.targets[index].is_some()) {
            out.insert_range(read.run.start as usize..read.run.end as usize);
        }
    }

    /// The byte offset and length of extents `run` (the image's last extent may be short).
    pub fn run_bytes(&self, run: &Range<u64>) -> (u64, usize) {
        let offset = run.start * self.extent_bytes;
        let end = (run.end * self.extent_bytes).min(self.device_bytes);
        (offset, (end - offset) as usize)
    }

    /// An O_DIRECT read of extents `run` into pool buffer `buffer` (a fixed buffer).
    pub fn read_entry(
        &self,
        pool: &crate::pool::BufferPool,
        buffer: u16,
        run: &Range<u64>,
    ) -> io_uring::squeue::Entry {
        let (offset, len) = self.run_bytes(run);
        assert!(len <= pool.data_bytes_max(), "a run fits in one buffer");
        opcode::ReadFixed::new(types::Fd(self.device.as_raw_fd()), pool.data_ptr(buffer), len as u32, buffer)
            .offset(offset)
            .build()
    }
}

/// Reads the next runs of extents some eligible secondary needs, while buffers last.
pub fn schedule(
    ring: &mut Ring<Op>,
    buffers: &mut Buffers,
    source: &mut Source,
    peers: &mut Peers,
    (export, epoch): (Option<&ExportState>, u64),
    feed: Feed,
) {
    for peer in peers.iter_mut() {
        peer.log.throttle.refill(source.run_bytes_max);
    }
    while buffers.free_count() > 0 {
        let eligible = eligible_peers(peers, feed, source.run_bytes_max);
        let Some(run) = next_run(source, peers, &eligible, export) else { return };
        let (_, len) = source.run_bytes(&run);
        let mut targets = [None; SECONDARIES_MAX];
        for &i in &eligible {
            let peer = peers.get_mut(i);
            let extents = run.start as usize..run.end as usize;
            if peer.pending.any_in(extents.clone()) {
                peer.pending.remove_range(extents);
                targets[i] = Some(peer.generation);
                if peer.log.throttled {
                    peer.log.throttle.take(len as u64);
                }
                let conn = peer.conn.as_mut().expect("eligible peers are connected");
                conn.backlog_bytes += len as u64;
                assert!(conn.backlog_bytes <= feed.backlog_bytes_max, "backlog limit");
            }
        }
        submit(ring, buffers, source, peers, (run, epoch), targets);
    }
}

/// The secondary slots that can take a frame now (a fixed array, no allocation); one whose
/// backlog is over its limit with extents pending falls behind (fractured: its missed extents
/// go to its fracture log).
fn eligible_peers(
    peers: &mut Peers,
    feed: Feed,
    run_bytes_max: u64,
) -> arrayvec::ArrayVec<usize, SECONDARIES_MAX> {
    let mut eligible = arrayvec::ArrayVec::new();
    for (i, peer) in peers.iter_mut().enumerate() {
        if peer.draining {
            continue;
        }
        if peer.eligible(feed.backlog_bytes_max, run_bytes_max, feed.queue_max) {
            if !peer.log.throttled || peer.log.throttle.allows() {
                eligible.push(i);
            }
        } else if over_backlog(peer, feed.backlog_bytes_max, run_bytes_max) {
            tracing::info!(secondary = %peer.name, "secondary behind: backlog over its limit; its missed extents go to its fracture log");
            peer.metrics.fractures.inc();
            peer.log.fall_behind();
        }
    }
    eligible
}

/// Connected, not fractured yet, extents pending and no room for another run.
fn over_backlog(peer: &Peer, backlog_bytes_max: u64, run_bytes_max: u64) -> bool {
    !peer.log.fractured()
        && peer.conn.as_ref().is_some_and(|c| c.backlog_bytes + run_bytes_max > backlog_bytes_max)
        && peer.pending.any()
}

/// The next run (from the cursor, wrapping) of extents pending for any of `eligible`, at most
/// `run_bytes_max` long, leaving out extents with a read in flight (its next read must be
/// queued after that one) or an export write in flight.
fn next_run(
    source: &mut Source,
    peers: &Peers,
    eligible: &[usize],
    export: Option<&ExportState>,
) -> Option<Range<u64>> {
    let extents = source.extents();
    let busy = |e: usize| source.reading[e] || export.is_some_and(|x| x.busy(e));
    let first_from =
        |from: usize| eligible.iter().filter_map(|&i| peers.get(i).pending.first_from(from)).min();
    let mut start = None;
    'passes: for pass_from in [source.cursor, 0] {
        let mut from = pass_from;
        while let Some(candidate) = first_from(from) {
            if !busy(candidate) {
                start = Some(candidate);
                break 'passes;
            }
            from = candidate + 1;
        }
    }
    let start = start?;
    let run_extents_max = (source.run_bytes_max / source.extent_bytes) as usize;
    let mut end = start + 1;
    while end < extents
        && end - start < run_extents_max
        && !busy(end)
        && eligible.iter().any(|&i| peers.get(i).pending.contains(end))
    {
        end += 1;
    }
    source.cursor = end % extents;
    Some(start as u64..end as u64)
}

fn submit(
    ring: &mut Ring<Op>,
    buffers: &mut Buffers,
    source: &mut Source,
    peers: &mut Peers,
    (run, epoch): (Range<u64>, u64),
    targets: [Option<u32>; SECONDARIES_MAX],
) {
    let reading = &mut source.reading[run.start as usize..run.end as usize];
    assert!(reading.not_any(), "two reads of one extent in flight could queue its frames out of order");
    reading.fill(true);
    let buffer = buffers.take().expect("schedule checked a free buffer");
    let entry = source.read_entry(buffers.pool(), buffer, &run);
    let written_at_ms = take_written_at(peers, &run, &targets);
    let slot = &mut source.reads[usize::from(buffer)];
    assert!(slot.is_none(), "buffer {buffer} read into twice");
    *slot = Some(Read { run, targets, written_at_ms, epoch });
    // SAFETY: the buffer is the read's (`reads`) until its completion.
    unsafe { ring.push(Op::Read { buffer }, entry) };
}

/// Per target, the oldest drain stamp of the words `run` covers; a target's words with nothing
/// pending for it any more are unstamped (their writes are all being shipped).
fn take_written_at(
    peers: &mut Peers,
    run: &Range<u64>,
    targets: &[Option<u32>; SECONDARIES_MAX],
) -> [u32; SECONDARIES_MAX] {
    let words = run.start as usize / 64..=(run.end as usize - 1) / 64;
    let mut oldest = [0; SECONDARIES_MAX];
    for (i, peer) in peers.iter_mut().enumerate().filter(|(i, _)| targets[*i].is_some()) {
        oldest[i] = peer.written_at_ms[words.clone()].iter().copied().filter(|&t| t > 0).min().unwrap_or(0);
        for word in words.clone() {
            if peer.pending.word(word) == 0 {
                peer.written_at_ms[word] = 0;
            }
        }
    }
    oldest
}

/// What a read's completion places its frame with: the cuts, and the tracker they ask.
pub struct Placing<'a> {
    pub cuts: &'a mut Cuts,
    pub tracker: &'a mut Tracker,
}

/// A read completed with `result`: its frame (tagged with its cut) is queued to every target
/// still connected with the connection it was read for; everyone else gets the run back.
pub fn complete(
    buffer: u16,
    result: i32,
    buffers: &mut Buffers,
    source: &mut Source,
    peers: &mut Peers,
    (export, placing): (Option<&mut ExportState>, Option<Placing<'_>>),
    clock: &Clock,
) {
    let read = source.reads[usize::from(buffer)].take().expect("a completion for a read in flight");
    source.reading[read.run.start as usize..read.run.end as usize].fill(false);
    let (offset, len) = source.run_bytes(&read.run);
    let mut live = [false; SECONDARIES_MAX];
    for (i, peer) in peers.iter().enumerate() {
        live[i] = read.targets[i].is_some_and(|g| g == peer.generation && peer.conn.is_some());
    }
    // Targets that disconnected meanwhile get the run back; so do all on a failed read, and
    // on a read an export write overtook (its data may be older than the client's).
    let read_ok = i64::from(result) == len as i64;
    let usable = read_ok && !export.is_some_and(|e| e.take_stale(&read.run));
    for (i, peer) in peers.iter_mut().enumerate() {
        if read.targets[i].is_some() && (!usable || !live[i]) && !peer.removed {
            peer.pending.insert_range(read.run.start as usize..read.run.end as usize);
        }
        if !usable && live[i] {
            peer.conn.as_mut().expect("live targets are connected").backlog_bytes -= len as u64;
        }
    }
    if !read_ok {
        tracing::error!(device = %source.path.display(), offset, len, result, "read from the primary failed; will retry");
    }
    let live_count = live.iter().filter(|&&l| l).count() as u16;
    if !usable || live_count == 0 {
        buffers.give_back(buffer);
        return;
    }
    let mut placing = placing;
    // No tracker (unit tests of the read stage alone): untagged frames.
    let cut = match placing.as_mut() {
        Some(p) => Cuts::classify(p.tracker, read.epoch, read.run.clone()),
        None => FrameCut { cut: 0, satisfies: false },
    };
    let sequence = peers.next_sequence();
    let prefix = wire::encode_extent_prefix(sequence, offset, buffers.pool().data(buffer, len), cut.cut);
    buffers.pool_mut().prefix_tail_mut(buffer, wire::EXTENT_PREFIX_BYTES).copy_from_slice(&prefix);
    buffers.share(buffer, live_count);
    let frame =
        QueuedFrame { buffer, frame_bytes: wire::EXTENT_PREFIX_BYTES + len, sequence, run: &read.run, len };
    let now = Instant::now();
    for i in (0..SECONDARIES_MAX).filter(|&i| live[i]) {
        let written_at = match read.written_at_ms[i] {
            0 => now,
            ms => clock.at(ms),
        };
        frame.queue_to(peers.get_mut(i), now, written_at);
        if let Some(p) = placing.as_mut() {
            p.cuts.frame_queued(i, peers.get(i).generation, &read.run, cut);
        }
    }
}

/// An extent frame read into `buffer`, to queue to its targets.
struct QueuedFrame<'a> {
    buffer: u16,
    frame_bytes: usize,
    sequence: u64,
    run: &'a Range<u64>,
    len: usize,
}

impl QueuedFrame<'_> {
    /// The frame goes to the back of `peer`'s queue and waits for its ack in `inflight` (its
    /// bytes were reserved in the backlog when the read was scheduled).
    fn queue_to(&self, peer: &mut Peer, now: Instant, written_at: Instant) {
        let conn = peer.conn.as_mut().expect("live targets are connected");
        conn.queue.push_back(SendJob::Extent {
            buffer: self.buffer,
            frame_bytes: self.frame_bytes,
            sent: 0,
            sequence: self.sequence,
        });
        conn.inflight.insert(
            self.sequence,
            InFlight {
                run: self.run.clone(),
                bytes: self.len as u64,
                queued_at: now,
                written_at,
                sent_at: None,
            },
        );
        peer.frame_queued();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::testing::{self, EXTENTS};

    fn feed() -> Feed {
        Feed { backlog_bytes_max: 64 * 4096, queue_max: 8 }
    }

    /// Runs start at the cursor, wrap, are at most `run_bytes_max` long, and leave out extents
    /// with a read in flight or an export write in flight.
    #[test]
    fn the_next_run_starts_at_the_cursor_and_skips_busy_extents() {
        let (mut peers, _far) = testing::peers(2, &[0, 1]);
        let mut source = testing::source();
        peers.get_mut(0).pending.insert_range(10..20);
        peers.get_mut(1).pending.insert_range(3..5);
        source.cursor = 8;
        assert_eq!(
            next_run(&mut source, &peers, &[0, 1], None),
            Some(10..14),
            "from the cursor, 4 extents at most"
        );
        assert_eq!(source.cursor, 14);
        source.reading[14..16].fill(true);
        assert_eq!(next_run(&mut source, &peers, &[0, 1], None), Some(16..20), "being read: skipped");
        source.cursor = 30;
        assert_eq!(next_run(&mut source, &peers, &[0, 1], None), Some(3..5), "wraps to the start");
        assert_eq!(next_run(&mut source, &peers, &[0], None), Some(10..14), "only what the eligible need");
        assert_eq!(next_run(&mut source, &peers, &[], None), None);
    }

    /// A read's bytes count in its targets' backlog from its scheduling; a secondary with no
    /// room for another run and extents pending falls behind (fractured, its extents go to its
    /// fracture log) instead of being fed.
    #[test]
    fn reads_reserve_backlog_and_a_full_backlog_falls_behind() {
        let (mut peers, _far) = testing::peers(1, &[0]);
        let (mut buffers, mut source) = (testing::buffers(), testing::source());
        let mut ring = testing::ring(&buffers);
        peers.get_mut(0).pending.insert_range(0..EXTENTS);
        let feed = Feed { backlog_bytes_max: 8 * 4096, queue_max: 8 };
        schedule(&mut ring, &mut buffers, &mut source, &mut peers, (None, 0), feed);
        assert_eq!(source.reads_in_flight(), 2, "two runs of 4 extents fill an 8-extent backlog");
        assert_eq!(peers.get(0).conn.as_ref().expect("connected").backlog_bytes, 8 * 4096);
        assert!(peers.get(0).log.fractured(), "behind its backlog with extents pending");
        assert!(!peers.get(0).pending.any_in(0..8) && peers.get(0).pending.any_in(8..EXTENTS));
        drain_ring(&mut ring, &mut buffers, &mut source, &mut peers);
    }

    /// A read that completes queues its frame to every target still on the connection it was
    /// read for, and gives the run back to the one that disconnected meanwhile.
    #[test]
    fn a_read_queues_its_frame_to_live_targets_and_returns_its_run_to_the_others() {
        let (mut peers, _far) = testing::peers(2, &[0, 1]);
        let (mut buffers, mut source) = (testing::buffers(), testing::source());
        let mut ring = testing::ring(&buffers);
        peers.get_mut(0).pending.insert_range(4..8);
        peers.get_mut(1).pending.insert_range(4..8);
        schedule(&mut ring, &mut buffers, &mut source, &mut peers, (None, 0), feed());
        assert_eq!(source.reads_in_flight(), 1);
        peers.get_mut(1).generation += 1; // s1's connection dropped while the read was in flight
        peers.get_mut(1).conn = None;
        drain_ring(&mut ring, &mut buffers, &mut source, &mut peers);
        let s0 = peers.get(0).conn.as_ref().expect("connected");
        assert_eq!(s0.queue.len(), 1, "s0 gets the frame");
        let runs: Vec<_> = s0.inflight.values().map(|f| (f.run.start, f.run.end)).collect();
        assert_eq!(runs, [(4, 8)]);
        assert!(peers.get(1).pending.any_in(4..8), "s1 gets the run back");
        assert_eq!(
            buffers.free_count(),
            usize::from(testing::BUFFERS) - 1,
            "s0's queued frame holds the buffer"
        );
    }

    /// A failed read (here: past the file's end) returns the run to every target, and its
    /// reserved backlog.
    #[test]
    fn a_failed_read_returns_its_run_and_its_backlog() {
        let (mut peers, _far) = testing::peers(1, &[0]);
        let mut buffers = testing::buffers();
        let mut ring = testing::ring(&buffers);
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut source = Source::new(
            file,
            "/dev/null".into(),
            EXTENTS as u64 * 4096,
            4096,
            testing::RUN_BYTES_MAX,
            testing::BUFFERS,
        );
        peers.get_mut(0).pending.insert_range(0..4);
        schedule(&mut ring, &mut buffers, &mut source, &mut peers, (None, 0), feed());
        drain_ring(&mut ring, &mut buffers, &mut source, &mut peers);
        assert!(peers.get(0).pending.any_in(0..4), "read again later");
        assert_eq!(peers.get(0).conn.as_ref().expect("connected").backlog_bytes, 0);
        assert_eq!(buffers.free_count(), usize::from(testing::BUFFERS));
        assert!(!source.reading(0), "nothing in flight");
    }

    /// Waits for and completes every read in the ring.
    fn drain_ring(ring: &mut Ring<Op>, buffers: &mut Buffers, source: &mut Source, peers: &mut Peers) {
        let clock = crate::primary::Clock { started: Instant::now() };
        while !ring.idle() {
            ring.submit_and_wait().expect("waiting");
            let completions = ring.reap();
            for completion in &completions {
                let Op::Read { buffer } = ring.take(completion.slot) else { unreachable!("only reads") };
                complete(buffer, completion.result, buffers, source, peers, (None, None), &clock);
            }
            ring.give_back(completions);
        }
    }
}
