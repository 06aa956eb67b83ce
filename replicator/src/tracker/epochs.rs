//! Epochs: the kernel half of consistent cuts on the tracker path.
//!
//! The tracker observes writes; it cannot hold one. What it can give is a moment that splits
//! every write into "queued before" and "queued after": the start of an epoch. Userspace owns
//! the epoch number (`EPOCH`, one word); the kernel program, for every write other than the
//! exempt writer's, counts itself in this CPU's `ACTIVE`, reads `EPOCH`, sets the extents' bits
//! in `WRITTEN[epoch & 1]` (and bit `epoch & 1` of `EPOCH`'s second word: "anything at all"),
//! and uncounts itself. Starting epoch `e + 1` ([`Epochs::flip`]):
//! 1. clear `WRITTEN[(e + 1) & 1]` and its "anything" bit (epoch `e - 1`'s marks: every
//!    program that read `e - 1` finished before epoch `e` began, so none still writes there);
//! 2. store `e + 1` in `EPOCH` (a locked exchange: a full barrier);
//! 3. wait until every CPU's `ACTIVE` is 0.
//!
//! From then on, every write queued later is marked in `WRITTEN[(e + 1) & 1]`: its program
//! either read `e + 1`, or had counted itself before our store and so was waited for (the
//! program's locked add comes before its load of `EPOCH`, our store before our loads of
//! `ACTIVE`: one of the two sees the other). A write whose program ran before the wait ended
//! counts as queued before the flip.
//!
//! What the engine asks of an epoch is whether a run was written in it ([`Epochs::written`]):
//! a read of the run that started after the flip and saw no such write holds the run as it was
//! at the flip, give or take writes that were in flight across it (which a crash could equally
//! have kept or lost). Marks that may be missing (a lost wide range, a skipped program run)
//! make every extent count as written in the open epoch ([`Epochs::mark_all`]).
//!
//! Owns the mappings of `WRITTEN0`, `WRITTEN1` and `EPOCH`, and the `ACTIVE` map. The epoch
//! lives in the pinned map, so it survives a restart of the replicator; after a reboot it
//! starts again at 0 and the engine raises it past what the secondaries have seen
//! ([`Epochs::raise_to`]).

use aya::maps::{MapData, PerCpuArray};
use replicator_common::{EPOCH_WORD_ANY, EPOCH_WORD_EPOCH, ExtentSpan};

use super::shared::SharedBitmap;

/// How long a flip waits for programs of the old epoch to finish before it gives up and counts
/// every extent as written in the new one. A program's window is a few map updates with
/// preemption off: microseconds. Only a kernel that never ran the decrement (a bug) gets here.
pub const ACTIVE_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Epochs {
    written: [SharedBitmap; 2],
    epoch_word: SharedBitmap,
    active: PerCpuArray<MapData, u64>,
    /// The open epoch (what `EPOCH` holds).
    epoch: u64,
    extent_count: u64,
    /// Flips whose wait gave up (see `ACTIVE_WAIT_MAX`).
    pub wait_timeouts: u64,
}

impl Epochs {
    pub fn new(
        written: [SharedBitmap; 2],
        epoch_word: SharedBitmap,
        active: PerCpuArray<MapData, u64>,
        extent_count: u64,
    ) -> Self {
        let epoch = epoch_word.words()[EPOCH_WORD_EPOCH as usize].load(std::sync::atomic::Ordering::Acquire);
        let epochs = Self { written, epoch_word, active, epoch, extent_count, wait_timeouts: 0 };
        // The next epoch's bitmap may hold a previous run's marks (it crashed between steps 1
        // and 2): clear it, as a flip would.
        epochs.clear(epoch + 1);
        epochs
    }

    /// The open epoch.
    pub fn current(&self) -> u64 {
        self.epoch
    }

    /// Starts the next epoch and returns it; see the module header for the steps and why they
    /// suffice.
    pub fn flip(&mut self) -> u64 {
        let next = self.epoch + 1;
        self.start(next);
        next
    }

    /// Starts an epoch past `floor` (a secondary has seen epochs up to it: after a reboot the
    /// pinned number began again at 0), if the open one is not past it already.
    pub fn raise_to(&mut self, floor: u64) {
        if self.epoch > floor {
            return;
        }
        // The bitmaps alternate by parity: the new epoch's must not be the open one's.
        let next = if (floor + 1) & 1 == self.epoch & 1 { floor + 2 } else { floor + 1 };
        self.start(next);
    }

    fn start(&mut self, next: u64) {
        assert!(next > self.epoch && next & 1 != self.epoch & 1, "epoch {next} after {}", self.epoch);
        self.clear(next);
        self.epoch_word.words()[EPOCH_WORD_EPOCH as usize].swap(next, std::sync::atomic::Ordering::SeqCst);
        self.epoch = next;
        if !self.wait_for_programs() {
            self.wait_timeouts += 1;
            tracing::warn!(
                epoch = next,
                "tracker programs of the previous epoch still counted after {ACTIVE_WAIT_MAX:?}: \
                 every extent counts as written in the new one"
            );
            self.mark_all();
        }
    }

    /// Waits until no CPU has a program between its read of `EPOCH` and its last mark.
    fn wait_for_programs(&self) -> bool {
        let started = std::time::Instant::now();
        loop {
            match self.active.get(&0, 0) {
                Ok(values) if values.iter().all(|&v| v == 0) => return true,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "reading the tracker's ACTIVE map failed");
                    return false;
                }
            }
            if started.elapsed() > ACTIVE_WAIT_MAX {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// Whether any extent of `span` was marked written in the open epoch.
    pub fn written(&self, span: ExtentSpan) -> bool {
        let bitmap = &self.written[(self.epoch & 1) as usize];
        (span.first_word()..=span.last_word()).any(|word| {
            bitmap.words()[word as usize].load(std::sync::atomic::Ordering::Acquire) & span.word_mask(word)
                != 0
        })
    }

    /// The open epoch's marks in word `word` of its bitmap (extents `64 * word..`).
    pub fn written_word(&self, word: usize) -> u64 {
        self.written[(self.epoch & 1) as usize].words()[word].load(std::sync::atomic::Ordering::Acquire)
    }

    /// Epoch `epoch`'s marks in word `word`, for the open epoch or the one before it (whose
    /// bitmap is emptied only when the next epoch starts); 0 for any other.
    pub fn written_word_of(&self, epoch: u64, word: usize) -> u64 {
        if epoch != self.epoch && epoch + 1 != self.epoch {
            return 0;
        }
        self.written[(epoch & 1) as usize].words()[word].load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether any extent was marked written in the open epoch: one load.
    pub fn any_written(&self) -> bool {
        let bits =
            self.epoch_word.words()[EPOCH_WORD_ANY as usize].load(std::sync::atomic::Ordering::Acquire);
        bits & 1 << (self.epoch & 1) != 0
    }

    /// A wide range the program queued in epoch `epoch_low` (the low 32 bits of its epoch):
    /// marked as it would have marked it inline. One of an epoch already closed is not needed
    /// any more (nothing asks about a closed epoch).
    pub fn mark_wide(&self, epoch_low: u32, span: ExtentSpan) {
        if epoch_low == self.epoch as u32 {
            self.written[(self.epoch & 1) as usize].set_span(span);
            self.note_any();
        }
    }

    /// Every extent counts as written in the open epoch: marks may have been lost.
    pub fn mark_all(&self) {
        self.written[(self.epoch & 1) as usize].set_all(self.extent_count);
        self.note_any();
    }

    fn note_any(&self) {
        let bit = 1 << (self.epoch & 1);
        self.epoch_word.words()[EPOCH_WORD_ANY as usize].fetch_or(bit, std::sync::atomic::Ordering::AcqRel);
    }

    /// Empties the bitmap epoch `epoch` will use.
    fn clear(&self, epoch: u64) {
        for word in self.written[(epoch & 1) as usize].words() {
            word.store(0, std::sync::atomic::Ordering::Release);
        }
        let bit = 1 << (epoch & 1);
        self.epoch_word.words()[EPOCH_WORD_ANY as usize].fetch_and(!bit, std::sync::atomic::Ordering::AcqRel);
    }
}
