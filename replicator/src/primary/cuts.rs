//! Consistent cuts on the tracker path: the engine's half. (The kernel's is `tracker/epochs.rs`,
//! the secondary's `secondary/journal`.)
//!
//! The guarantee: a secondary's image is, at every instant, a crash-consistent image of the
//! primary: the result of a set of the primary's writes that holds every write that completed
//! before any write in the set was submitted. Here that set is "every write queued before the
//! start of epoch `c`" (cut `c`), give or take writes still in flight at that moment (a crash
//! could equally have kept or lost those), across the whole device.
//!
//! The mechanism, per secondary `s` and the open epoch `e` (started by `flip`):
//! - at the flip, `need[s]` is what `s` lacks for cut `e`: its pending extents (their writes
//!   completed, drained right after the flip) and the extents of its reads in flight (read
//!   before the flip, they may predate a write completed since);
//! - a read issued in epoch `e` that completes with none of its extents written in epoch `e`
//!   (`Tracker::written_in_epoch`) holds them as they were at the flip: its frame is tagged `e`
//!   and takes its run out of `need`. Any other read's frame (spanning a flip, or overtaken by
//!   a write) is tagged with the epoch after the one it was issued in: a later cut's, applied
//!   only once a frame valid at that cut followed it. A read overtaken by a write to an extent
//!   `s` needs dooms cut `e` for `s`: nothing can hold that extent as it was any more;
//! - once `need[s]` is empty (and every frame tagged `e` was queued before), a `Commit(e)` frame
//!   is queued: the secondary applies every frame up to cut `e` atomically (its journal);
//! - the next flip comes `interval` after the last once every keeping-up secondary has
//!   committed; as soon as every one that has not is doomed and has nothing left to read in
//!   this epoch but extents written since the flip (stalled); or after `interval_max`
//!   regardless. A flip keeps what was satisfied and not written since, so each epoch needs
//!   what was written during the one before: under continuous writes the epochs shorten until
//!   one completes without a needed extent being rewritten;
//! - a secondary is sent a commit at most once per `interval` (each costs it two syncs).
//!
//! The bound this gives: a secondary keeping up holds a cut at most `interval` plus the time
//! to read, ship and journal one interval's writes old. Writes that rewrite an extent faster
//! than it can be read after a flip (one extent hammered at device speed) can doom every cut
//! for as long as they last: the status shows the age of each secondary's last cut.
//!
//! Writes through the export (the exempt writer's) are not in epochs: the export ships each in
//! order. Their frames are tagged with the cut after the open epoch, and flagged in order when
//! nothing the write may depend on is missing on the secondary (`export_tag`).
//!
//! Owns the per-secondary cut state; the epochs themselves are the tracker's.

use std::time::{Duration, Instant};

use super::peer::{InFlight, SendJob};
use super::peers::Peers;
use super::read::Source;
use crate::extent_set::ExtentSet;
use crate::model::SECONDARIES_MAX;
use crate::tracker::Tracker;
use crate::wire;

/// The default least time between two cuts.
pub const CUT_INTERVAL_MS_DEFAULT: u64 = 100;
/// How many intervals a flip waits at most for a secondary still completing its cut.
const INTERVALS_MAX: u32 = 10;
/// The least time between two flips: what a flip costs (a syscall per CPU, the bitmap of the
/// epoch emptied) stays a small share of a turn even when every epoch is doomed.
const FLIP_GAP_MIN: Duration = Duration::from_millis(1);

/// Where secondary `s` stands with the open cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Commit {
    /// Extents still needed (or no connection).
    Open,
    /// Cut `cut` can no longer be had: an extent it needs was written since the flip.
    Doomed,
    /// `Commit` of the open cut is queued, not acknowledged yet.
    Queued,
    /// Acknowledged: the secondary's image is the open cut.
    Done,
}

struct PeerCut {
    /// The connection `need` and `commit` are for (`None` after a flip, until the drain).
    generation: Option<u32>,
    need: ExtentSet,
    commit: Commit,
    /// The one `Commit` frame not acknowledged yet on this connection (it may be of a cut
    /// before the open one): another is queued only once it is (one frame buffer each).
    outstanding: Option<Outstanding>,
    /// When the last commit was queued to it (commits at most once per `interval`).
    committed_at: Option<Instant>,
    /// What was queued on its connection: see `Covered`.
    covered: Covered,
}

/// On one connection: the highest cut of a data frame not sent in order, and of a commit.
/// While the first is at most the second, every such frame is applied by the time a frame
/// queued now arrives, so a client's write through the export may be applied in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Covered {
    generation: u32,
    frame_cut_max: u64,
    commit_cut_max: u64,
}

impl PeerCut {
    fn covered(&mut self, generation: u32) -> &mut Covered {
        if self.covered.generation != generation {
            self.covered = Covered { generation, ..Covered::default() };
        }
        &mut self.covered
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Outstanding {
    generation: u32,
    sequence: u64,
    cut: u64,
    cut_unix_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    Aside,
    Open,
    Doomed,
    Committed,
}

/// A frame's place among the cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameCut {
    /// The cut it belongs to (its header's cut).
    pub cut: u64,
    /// It holds its run as of the open cut's flip.
    pub satisfies: bool,
}

pub struct Cuts {
    interval: Duration,
    interval_max: Duration,
    flipped_at: Instant,
    flipped_unix_ms: u64,
    peers: Vec<PeerCut>,
    pub flips: u64,
    pub doomed: u64,
    /// Scratch for `after_drain`: extents of writes queued before the flip, not seen complete.
    unmatched: ExtentSet,
    enabled: bool,
}

impl Cuts {
    /// `interval_ms` 0: no cuts at all (the comparison the benchmarks make): no flips, no
    /// commits; every secondary applies frames as they come and is no consistent copy.
    pub fn new(extents: usize, interval_ms: u64) -> Self {
        let interval = Duration::from_millis(interval_ms.max(1));
        let peers = (0..SECONDARIES_MAX)
            .map(|_| PeerCut {
                generation: None,
                need: ExtentSet::new(extents),
                commit: Commit::Open,
                outstanding: None,
                committed_at: None,
                covered: Covered::default(),
            })
            .collect();
        Self {
            interval,
            interval_max: interval * INTERVALS_MAX,
            flipped_at: Instant::now(),
            flipped_unix_ms: crate::logs::unix_ms_now(),
            peers,
            flips: 0,
            doomed: 0,
            unmatched: ExtentSet::new(extents),
            enabled: interval_ms > 0,
        }
    }

    /// Whether cuts are taken at all (`--cut-interval-ms` not 0).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// When the open epoch began (Unix ms): the time of the cut it leads to.
    pub fn open_cut_unix_ms(&self) -> u64 {
        self.flipped_unix_ms
    }

    /// Starts the next epoch if it is time (see the module header). Call before the drain, so
    /// every write completed before the flip is pending when `need` is taken (`after_drain`).
    pub fn flip_if_due(&mut self, tracker: &mut Tracker, peers: &Peers, source: &Source) -> bool {
        let elapsed = self.flipped_at.elapsed();
        if !self.enabled || elapsed < FLIP_GAP_MIN {
            return false;
        }
        let (mut all_committed, mut any_stalled, mut blocking) = (true, false, false);
        for index in 0..peers.len() {
            match self.standing(index, peers) {
                Standing::Aside | Standing::Committed => {}
                Standing::Open => (all_committed, blocking) = (false, true),
                Standing::Doomed if stalled(index, tracker, peers, source) => {
                    (all_committed, any_stalled) = (false, true);
                }
                Standing::Doomed => (all_committed, blocking) = (false, true),
            }
        }
        let due = (all_committed && elapsed >= self.interval)
            || (any_stalled && !blocking)
            || elapsed >= self.interval_max;
        if due {
            self.flip(tracker);
        }
        due
    }

    /// Where secondary `index` stands with the open cut. One not connected, behind its
    /// backlog or catching up from its fracture log stands aside: it does not hold everyone's
    /// cuts back, and converges over the epochs the others' make.
    fn standing(&self, index: usize, peers: &Peers) -> Standing {
        let peer = peers.get(index);
        let state = &self.peers[index];
        if peer.conn.is_none() || peer.log.fractured() || state.generation != Some(peer.generation) {
            return Standing::Aside;
        }
        match state.commit {
            Commit::Open => Standing::Open,
            Commit::Doomed => Standing::Doomed,
            Commit::Queued | Commit::Done => Standing::Committed,
        }
    }

    fn flip(&mut self, tracker: &mut Tracker) {
        tracker.flip_epoch();
        self.flipped_at = Instant::now();
        self.flipped_unix_ms = crate::logs::unix_ms_now();
        self.flips += 1;
        for state in &mut self.peers {
            state.generation = None; // taken again after the drain
        }
    }

    /// A secondary connected, its image at `cut` with frames staged up to `staged_cut_max`:
    /// cuts continue past both (after a reboot the tracker's epochs begin again at 0).
    pub fn connected(&mut self, tracker: &mut Tracker, committed_cut: u64, staged_cut_max: u64) {
        let floor = committed_cut.max(staged_cut_max);
        if tracker.epoch() <= floor {
            tracker.raise_epoch(floor);
            self.flipped_at = Instant::now();
            self.flipped_unix_ms = crate::logs::unix_ms_now();
            self.flips += 1;
            for state in &mut self.peers {
                state.generation = None;
            }
        }
    }

    /// After the drain: every connected secondary without a state for the open epoch (a flip,
    /// a new connection) needs what it has pending and what is being read for it.
    ///
    /// So do the extents of writes queued before the flip whose completion the tracker has not
    /// seen (`Tracker::awaiting`): in flight across the flip (either way will do), or completed
    /// without a traced completion (about 1 in 10 000 small writes on a loop device: the
    /// tracker reports those only after `UNMATCHED_AFTER`, too late for this cut). They become
    /// pending too, so they are read.
    pub fn after_drain(&mut self, tracker: &Tracker, peers: &mut Peers, source: &Source) {
        let fresh = |index: usize, state: &PeerCut| {
            let peer = peers.get(index);
            peer.conn.is_some() && state.generation != Some(peer.generation)
        };
        if !(0..peers.len()).any(|i| fresh(i, &self.peers[i])) {
            return;
        }
        unmatched_before_flip(tracker, &mut self.unmatched);
        for (index, state) in self.peers.iter_mut().enumerate().take(peers.len()) {
            let peer = peers.get_mut(index);
            if peer.conn.is_none() {
                state.generation = None;
                continue;
            }
            if state.generation == Some(peer.generation) {
                continue;
            }
            state.generation = Some(peer.generation);
            peer.pending.union(&self.unmatched);
            state.need.clear();
            state.need.union(&peer.pending);
            source.reading_for_into(index, &mut state.need);
            state.commit = Commit::Open;
        }
    }

    /// A read of `run` issued in epoch `issued` has completed: where its frame belongs.
    pub fn classify(tracker: &mut Tracker, issued: u64, run: std::ops::Range<u64>) -> FrameCut {
        let epoch = tracker.epoch();
        if issued == epoch && !tracker.written_in_epoch(run) {
            FrameCut { cut: epoch, satisfies: true }
        } else {
            FrameCut { cut: issued + 1, satisfies: false }
        }
    }

    /// Secondary `index` (connection `generation`) gets a frame of `run` placed by `frame`.
    pub fn frame_queued(
        &mut self,
        index: usize,
        generation: u32,
        run: &std::ops::Range<u64>,
        frame: FrameCut,
    ) {
        let state = &mut self.peers[index];
        let covered = state.covered(generation);
        covered.frame_cut_max = covered.frame_cut_max.max(frame.cut);
        if state.generation != Some(generation) {
            return;
        }
        let extents = run.start as usize..run.end as usize;
        if frame.satisfies {
            state.need.remove_range(extents);
        } else if state.commit == Commit::Open && state.need.any_in(extents) {
            state.commit = Commit::Doomed;
            self.doomed += 1;
        }
    }

    /// Notes the commits acknowledged, and queues `Commit` to every secondary whose open cut
    /// is complete.
    pub fn advance(&mut self, epoch: u64, peers: &mut Peers) {
        if !self.enabled {
            return;
        }
        let cut_unix_ms = self.flipped_unix_ms;
        for index in 0..peers.len() {
            let state = &mut self.peers[index];
            let peer = peers.get_mut(index);
            let generation = peer.generation;
            let Some(conn) = peer.conn.as_ref() else {
                state.outstanding = None;
                continue;
            };
            if let Some(outstanding) = state.outstanding {
                if outstanding.generation != generation {
                    state.outstanding = None;
                } else if !conn.inflight.contains_key(&outstanding.sequence) {
                    state.outstanding = None;
                    peer.cut.committed_cut = outstanding.cut;
                    peer.cut.committed_unix_ms = outstanding.cut_unix_ms;
                    if outstanding.cut == epoch && state.commit == Commit::Queued {
                        state.commit = Commit::Done;
                    }
                }
            }
            let ready = state.generation == Some(generation) && state.commit == Commit::Open;
            let spaced = state.committed_at.is_none_or(|at| at.elapsed() >= self.interval);
            if ready && spaced && state.need.not_any() && state.outstanding.is_none() {
                let sequence = queue_commit(peers, index, epoch, cut_unix_ms);
                let covered = state.covered(generation);
                covered.commit_cut_max = covered.commit_cut_max.max(epoch);
                state.commit = Commit::Queued;
                state.outstanding = Some(Outstanding { generation, sequence, cut: epoch, cut_unix_ms });
                state.committed_at = Some(Instant::now());
            }
        }
    }

    /// The tag of a client's write through the export going to `targets` now (one frame for
    /// all): the cut after the open epoch; in order when nothing the write may depend on is
    /// missing on any target by the time it arrives: every frame not sent in order is covered
    /// by a commit queued before it (`Covered`), nothing is pending or being read for it, and no
    /// write of another process was queued in this epoch or still awaits its completion.
    pub fn export_tag(
        &mut self,
        targets: &[bool; SECONDARIES_MAX],
        tracker: &mut Tracker,
        peers: &Peers,
        source: &Source,
    ) -> wire::Tag {
        let epoch = tracker.epoch();
        let chosen = (0..peers.len()).filter(|&i| targets[i]);
        let ready = |index: usize| {
            let (peer, covered) = (peers.get(index), &self.peers[index].covered);
            let covered =
                covered.generation != peer.generation || covered.frame_cut_max <= covered.commit_cut_max;
            covered && peer.pending.not_any() && !source.reads_for(index)
        };
        let in_order =
            chosen.clone().all(ready) && !tracker.awaiting_completion() && !tracker.written_in_epoch_any();
        if !in_order {
            for index in chosen {
                let covered = self.peers[index].covered(peers.get(index).generation);
                covered.frame_cut_max = covered.frame_cut_max.max(epoch + 1);
            }
        }
        wire::Tag { flags: if in_order { wire::FLAG_IN_ORDER } else { 0 }, cut: epoch + 1 }
    }

    /// For status: the open epoch's age, and whether secondary `index` has committed it.
    pub fn committed_open(&self, index: usize) -> bool {
        matches!(self.peers[index].commit, Commit::Done)
    }
}

/// Into `out`: the extents awaiting a traced completion whose write was queued before the
/// open epoch. One marked in the open epoch may be only a write queued after the flip (not the
/// cut's); it counts when the epoch before marked it too.
fn unmatched_before_flip(tracker: &Tracker, out: &mut ExtentSet) {
    out.clear();
    let epoch = tracker.epoch();
    for (word, bits) in tracker.awaiting().nonzero_words() {
        let now = tracker.written_in_epoch_word(word);
        let before = tracker.written_word_of(epoch.saturating_sub(1), word);
        out.union_word(word, bits & (!now | before));
    }
}

/// A doomed secondary has nothing left to gain in this epoch: no read in flight for it, and
/// every extent pending for it was written since the flip (a read would be overtaken).
fn stalled(index: usize, tracker: &Tracker, peers: &Peers, source: &Source) -> bool {
    if source.reads_for(index) {
        return false;
    }
    let pending = &peers.get(index).pending;
    pending.nonzero_words().all(|(word, bits)| bits & !tracker.written_in_epoch_word(word) == 0)
}

/// Queues `Commit(cut)` to slot `index` (one unacknowledged at a time: see `advance`) and tracks
/// it until its ack; returns its sequence.
fn queue_commit(peers: &mut Peers, index: usize, cut: u64, cut_unix_ms: u64) -> u64 {
    let sequence = peers.next_sequence();
    let conn = peers.get_mut(index).conn.as_mut().expect("a committing secondary is connected");
    let mut frame = Vec::with_capacity(conn.commit_frame.len());
    wire::encode(&wire::Message::Commit { cut, cut_unix_ms }, sequence, &mut frame);
    conn.commit_frame.copy_from_slice(&frame);
    conn.queue.push_back(SendJob::Commit { sent: 0 });
    conn.inflight.insert(sequence, InFlight::control());
    sequence
}
