//! The logs stage: fracture logs persisted as secondaries fracture, and periodic checkpoints of
//! the write-intent log.
//!
//! Owns the checkpoint state: the intent log's quiet clock (`IntentQuiet`), the intent log as
//! last persisted, the scratch bitmaps (sized once), and the state files. It sees the tracker
//! through `IntentMap` and the secondaries through `Secondaries`, so the same code runs in the
//! engine and, without a kernel, under the model in `checkpoint_model.rs`.
//!
//! The rule: an extent leaves the intent log only once every secondary that may lack it has it
//! in a fracture log on disk, or has acknowledged it and it stayed quiet for
//! `INTENT_QUIET_CHECKPOINTS` checkpoints in a row. So a checkpoint persists the fractured
//! secondaries' logs first, counts every other secondary's unacknowledged extents as dirty,
//! keeps writes queued and not yet drained as completed, and only then clears what is quiet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitvec::prelude::*;

use super::resync::PeerLog;
use crate::envelope::StateFiles;
use crate::logs::{self, IntentQuiet, LogHeader, LogIdentity, LogKind};
use crate::model::ExtentBytes;

/// The write-intent log as the tracker keeps it (pinned in bpffs).
pub trait IntentMap {
    /// Copies the intent bitmap into `out` (cleared first).
    fn intent_into(&mut self, out: &mut BitVec<u64, Lsb0>);
    /// Removes extents from it.
    fn clear_intent(&mut self, extents: &BitSlice<u64, Lsb0>);
    /// Notes as dirty the extents of writes queued whose completion has not been drained: a
    /// write queued long after its extent's intent bit was set must keep it.
    fn note_awaiting(&self, quiet: &mut IntentQuiet);
}

impl IntentMap for crate::tracker::Tracker {
    fn intent_into(&mut self, out: &mut BitVec<u64, Lsb0>) {
        crate::tracker::Tracker::intent_into(self, out);
    }

    fn clear_intent(&mut self, extents: &BitSlice<u64, Lsb0>) {
        crate::tracker::Tracker::clear_intent(self, extents);
    }

    fn note_awaiting(&self, quiet: &mut IntentQuiet) {
        // A write whose completion the kernel did not trace is reported after UNMATCHED_AFTER;
        // until then its extent stays here, or a crash would leave it in no log.
        for run in self.awaiting_runs() {
            quiet.note_dirty_run(run.start as usize..run.end as usize);
        }
    }
}

/// The secondaries as a checkpoint sees them.
pub trait Secondaries {
    /// Slots, removed ones included.
    fn slots(&self) -> usize;
    /// The slot holds a secondary of the mirror.
    fn member(&self, index: usize) -> bool;
    /// Every extent the secondary may lack, into `out` (cleared first, one bit per extent).
    fn dirty_into(&self, index: usize, out: &mut BitVec<u64, Lsb0>);
    fn log(&mut self, index: usize) -> &mut PeerLog;
    /// The extents its fracture log on disk now holds (for its gauge).
    fn logged(&mut self, _index: usize, _extents: usize) {}
}

pub struct Checkpointer<F> {
    files: F,
    mirror_id: u64,
    extent_bytes: ExtentBytes,
    image_bytes: u64,
    /// The lazy clearing of the write-intent log.
    pub quiet: IntentQuiet,
    interval: Duration,
    last: Instant,
    sequence: u64,
    /// The intent log as it is on disk, if the last write succeeded.
    persisted_intent: Option<BitVec<u64, Lsb0>>,
    /// Scratch bitmaps, one bit per extent, sized once.
    scratch_dirty: BitVec<u64, Lsb0>,
    scratch_intent: BitVec<u64, Lsb0>,
    scratch_clearable: BitVec<u64, Lsb0>,
    /// Checkpoint durations in µs, merged into the exported histogram with the status.
    pub durations_us: hdrhistogram::Histogram<u64>,
    metrics: Arc<crate::metrics::PrimaryMetrics>,
}

impl<F: StateFiles> Checkpointer<F> {
    pub fn new(
        files: F,
        mirror_id: u64,
        extent_bytes: ExtentBytes,
        image_bytes: u64,
        interval: Duration,
        metrics: Arc<crate::metrics::PrimaryMetrics>,
    ) -> Self {
        let extents = extent_bytes.extents_of(image_bytes) as usize;
        let bits = || bitvec![u64, Lsb0; 0; extents];
        Self {
            files,
            mirror_id,
            extent_bytes,
            image_bytes,
            quiet: IntentQuiet::new(extents),
            interval,
            last: Instant::now(),
            sequence: 0,
            persisted_intent: None,
            scratch_dirty: bits(),
            scratch_intent: bits(),
            scratch_clearable: bits(),
            durations_us: crate::metrics::new_latency_recorder(),
            metrics,
        }
    }

    pub fn files(&self) -> &F {
        &self.files
    }

    /// What this mirror's logs are checked against when read back.
    pub fn identity(&self, kind: LogKind, secondary_id: u64) -> LogIdentity {
        LogIdentity {
            kind,
            mirror_id: self.mirror_id,
            secondary_id,
            extent_bytes: self.extent_bytes,
            image_bytes: self.image_bytes,
        }
    }

    /// Extents in the intent log as last persisted (none known: 0).
    pub fn intent_extents(&self) -> usize {
        self.persisted_intent.as_ref().map_or(0, |i| i.count_ones())
    }

    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.interval
    }

    /// Persists the fracture logs of the secondaries fractured (or restored) this turn.
    pub fn persist_changed(&mut self, secondaries: &mut impl Secondaries, generation: u64) {
        for index in 0..secondaries.slots() {
            if secondaries.member(index) && secondaries.log(index).persist_now {
                self.persist_fracture_log(secondaries, index, generation);
            }
        }
    }

    /// Writes secondary `index`'s fracture log if it changed: its dirty extents while
    /// fractured, an empty log otherwise (the intent log covers an unfractured secondary).
    /// Returns whether the file on disk now holds them.
    pub fn persist_fracture_log(
        &mut self,
        secondaries: &mut impl Secondaries,
        index: usize,
        generation: u64,
    ) -> bool {
        let mut dirty = std::mem::take(&mut self.scratch_dirty);
        if secondaries.log(index).fractured() {
            secondaries.dirty_into(index, &mut dirty);
        } else {
            dirty.clear();
            dirty.resize(self.scratch_intent.len(), false);
        }
        secondaries.logged(index, dirty.count_ones());
        let log = secondaries.log(index);
        log.persist_now = false;
        let verify_next_extent = log.verify.as_ref().map_or(0, |v| v.next_extent);
        let unchanged = log.persisted.as_ref().is_some_and(|(flags, next, bits)| {
            *flags == log.flags && *next == verify_next_extent && *bits == dirty
        });
        let mut on_disk = true;
        if !unchanged {
            let header = LogHeader {
                flags: log.flags,
                sequence: self.sequence,
                resync_bytes_done: log.resync_bytes_done,
                verify_next_extent,
                resync_rate_bytes_per_s: log.resync_rate_bytes_per_s as u64,
                ..LogHeader::new(&self.identity(LogKind::Fracture, log.secondary_id), generation)
            };
            match self.files.replace(&log.file_name, &logs::encode(&header, &dirty)) {
                Ok(()) => log.persisted = Some((log.flags, verify_next_extent, dirty.clone())),
                Err(error) => {
                    tracing::error!(file = %log.file_name, %error, "persisting a fracture log failed; its extents stay in the intent log");
                    self.metrics.log_write_errors.inc();
                    log.persisted = None;
                    on_disk = false;
                }
            }
        }
        self.scratch_dirty = dirty;
        on_disk
    }

    /// A checkpoint (the caller drained the tracker first): the fractured secondaries' logs,
    /// then the extents quiet on every other secondary leave the intent log, which is saved.
    pub fn checkpoint(
        &mut self,
        intent_map: &mut impl IntentMap,
        secondaries: &mut impl Secondaries,
        generation: u64,
    ) {
        let started = Instant::now();
        self.last = started;
        self.sequence += 1;
        for index in 0..secondaries.slots() {
            if !secondaries.member(index) {
                continue;
            }
            let persisted = secondaries.log(index).fractured()
                && self.persist_fracture_log(secondaries, index, generation);
            if !persisted {
                let mut dirty = std::mem::take(&mut self.scratch_dirty);
                secondaries.dirty_into(index, &mut dirty);
                self.quiet.note_dirty(&dirty);
                self.scratch_dirty = dirty;
            }
        }
        intent_map.note_awaiting(&mut self.quiet);
        let mut intent = std::mem::take(&mut self.scratch_intent);
        let mut clearable = std::mem::take(&mut self.scratch_clearable);
        intent_map.intent_into(&mut intent);
        self.quiet.end_interval(&mut intent, self.persisted_intent.as_ref(), &mut clearable);
        intent_map.clear_intent(&clearable);
        if self.persisted_intent.as_ref() != Some(&intent) {
            self.persist_intent(&intent, generation);
        }
        self.metrics.intent_log_extents.set(intent.count_ones() as i64);
        self.metrics.checkpoints.inc();
        self.scratch_intent = intent;
        self.scratch_clearable = clearable;
        let elapsed_us = started.elapsed().as_micros().clamp(1, 3_600_000_000) as u64;
        let _ = self.durations_us.record(elapsed_us);
        tracing::trace!(elapsed_us, "checkpoint");
    }

    fn persist_intent(&mut self, intent: &BitVec<u64, Lsb0>, generation: u64) {
        let header = LogHeader {
            sequence: self.sequence,
            ..LogHeader::new(&self.identity(LogKind::Intent, 0), generation)
        };
        match self.files.replace(logs::INTENT_LOG_FILE, &logs::encode(&header, intent)) {
            Ok(()) => self.persisted_intent = Some(intent.clone()),
            Err(error) => {
                tracing::error!(%error, "persisting the write-intent log failed");
                self.metrics.log_write_errors.inc();
                self.persisted_intent = None;
            }
        }
    }
}

#[cfg(test)]
#[path = "checkpoint_model.rs"]
mod model;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::MemoryFiles;
    use crate::model::RecoveryPolicy;

    const EXTENTS: usize = 16;

    struct Intent(BitVec<u64, Lsb0>);

    impl IntentMap for Intent {
        fn intent_into(&mut self, out: &mut BitVec<u64, Lsb0>) {
            out.clear();
            out.extend_from_bitslice(&self.0);
        }

        fn clear_intent(&mut self, extents: &BitSlice<u64, Lsb0>) {
            for e in extents.iter_ones() {
                self.0.set(e, false);
            }
        }

        fn note_awaiting(&self, _quiet: &mut IntentQuiet) {}
    }

    /// One secondary, fractured, lacking extent 5.
    struct One(PeerLog);

    impl Secondaries for One {
        fn slots(&self) -> usize {
            1
        }

        fn member(&self, _index: usize) -> bool {
            true
        }

        fn dirty_into(&self, _index: usize, out: &mut BitVec<u64, Lsb0>) {
            *out = bitvec![u64, Lsb0; 0; EXTENTS];
            out.set(5, true);
        }

        fn log(&mut self, _index: usize) -> &mut PeerLog {
            &mut self.0
        }
    }

    /// A fractured secondary whose fracture log cannot be written (a full disk) keeps its
    /// extents in the intent log, checkpoint after checkpoint; once the log is written they
    /// may leave it.
    #[test]
    fn extents_of_a_fracture_log_not_on_disk_stay_in_the_intent_log() {
        let files = MemoryFiles { failing: Some("fracture-"), ..MemoryFiles::default() };
        let extent_bytes = ExtentBytes::new(4096).expect("4 KiB");
        let metrics = Arc::new(crate::metrics::PrimaryMetrics::default());
        let mut logs = Checkpointer::new(
            files,
            1,
            extent_bytes,
            EXTENTS as u64 * 4096,
            Duration::ZERO,
            Arc::clone(&metrics),
        );
        let mut intent = Intent(bitvec![u64, Lsb0; 1; EXTENTS]);
        let mut secondary = One(PeerLog::new("b", 0, RecoveryPolicy::Automatic));
        secondary.0.fracture();
        for _ in 0..=logs::INTENT_QUIET_CHECKPOINTS + 1 {
            logs.checkpoint(&mut intent, &mut secondary, 1);
        }
        assert!(intent.0[5], "its extent stays");
        assert!(!intent.0[4], "a quiet extent nobody lacks leaves");
        assert!(metrics.log_write_errors.get() > 0);
        logs.files.failing = None;
        for _ in 0..=logs::INTENT_QUIET_CHECKPOINTS + 1 {
            logs.checkpoint(&mut intent, &mut secondary, 1);
        }
        assert!(!intent.0[5], "in the fracture log on disk now");
        assert!(logs.files.files.contains_key("fracture-b.log"));
    }
}
