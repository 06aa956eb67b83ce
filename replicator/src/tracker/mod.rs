//! The tracker: loads the kernel program (`replicator-ebpf`) onto the block-layer tracepoints for
//! one device, and hands userspace the extents that writes touched.
//!
//! Owns the program's links and maps, pinned in bpffs under `<bpffs_root>/<name>/`, and the
//! `mmap`ed ones. The maps (names in `replicator_common::layout`):
//! - INTENT, one bit per extent: set when a write is queued (before it can reach the device),
//!   and again when its completion is drained. This is the pinned write-intent log; the engine
//!   clears an extent from it only when the extent is clean everywhere and quiet (`logs`).
//! - COMPLETED, one bit per extent: set when a write has completed. `drain_completed` takes bits
//!   atomically (one swap per word), so an extent read after the drain holds data at least as
//!   new as every write whose completion set the bit; a write completing later sets it again.
//! - QUEUED, one bit per extent: set with INTENT when a write is queued and taken at every
//!   drain, so a write whose completion the kernel never traces is still reported (after
//!   `UNMATCHED_AFTER`: the safety net in `match_completions`).
//! - QUEUED_SUM and COMPLETED_SUM: two-level summaries of those two, so a drain costs what
//!   changed rather than the size of the device (`shared::Summarized`).
//! - WRITTEN0 and WRITTEN1, EPOCH, ACTIVE: the epochs of consistent cuts (`epochs.rs`).
//! - WIDE, a ring buffer of ranges too wide to mark inline; FLAGS (lost ranges, the exempt
//!   writer); COUNTERS (per CPU); META (the configuration the maps were made for, checked when
//!   a pinned tracker is resumed).
//!
//! Invariant: every mark the kernel program sets is either still in the pinned map or has been
//! returned by `drain_completed`. The links and maps are pinned, so the program keeps marking
//! while the replicator is down (crash, upgrade); a restart reopens the same maps and finds every
//! bit. Only `stop` (a clean stop) unpins, which detaches the program and frees the maps.

mod btf;
mod epochs;
mod layout;
mod misses;
mod shared;

use std::fs;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::programs::ProgramFd;
use aya::programs::links::{FdLink, PinnedLink};
use aya::{Ebpf, EbpfLoader};
use bitvec::prelude::*;
use replicator_common::{
    COUNTERS_LEN, Counter, ExtentGeometry, ExtentSpan, FLAG_COMPLETED_LOST, FLAG_INTENT_LOST,
    FLAGS_WORD_EXEMPT_TGID, FLAGS_WORD_LOST, FLAGS_WORDS, GLOBAL_CONFIG, MAP_ACTIVE, MAP_COMPLETED,
    MAP_COMPLETED_SUMMARY, MAP_COUNTERS, MAP_EPOCH, MAP_FLAGS, MAP_INTENT, MAP_META, MAP_QUEUED,
    MAP_QUEUED_SUMMARY, MAP_WIDE, MAP_WRITTEN, MarkKind, TrackerConfig, WideRange, summary_map_words,
};

pub use btf::{Btf, BtfError};
pub use epochs::{ACTIVE_WAIT_MAX, Epochs};
pub use layout::{LayoutError, kernel_layout};
pub use shared::{SharedBitmap, Summarized, Sweep};

use crate::device::{BlockDevice, DeviceError};
use crate::extent_set::{ExtentSet, Runs};
use crate::sysfs::{self, MountError};

/// Where trackers pin their maps and links, one directory per tracker name.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/replicator";

/// The kernel program, built by `build.rs` and embedded so the binary runs from anywhere.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/replicator-ebpf"));

/// The programs and the BTF-typed raw tracepoints (`tp_btf`) they attach to, in attach order.
const PROGRAMS: [(&str, &str); 3] = [
    ("replicator_bio_queue", "block_bio_queue"),
    ("replicator_rq_complete", "block_rq_complete"),
    ("replicator_bio_complete", "block_bio_complete"),
];

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{device}: extent size {extent_bytes} bytes is not a power of two from 4 KiB to 64 MiB")]
    ExtentSize { device: PathBuf, extent_bytes: u64 },
    #[error(
        "{device}: {extents} extents of {extent_bytes} bytes need more map entries than a BPF array holds"
    )]
    TooManyExtents { device: PathBuf, extents: u64, extent_bytes: u64 },
    #[error(
        "tracker state pinned at {pin_dir} was made for another device or extent size \
         ({found}); now asked for {wanted}. Its marks belong to that configuration: replicate them \
         first, or discard them with `replicator untrack --name {name}`"
    )]
    StalePins { pin_dir: PathBuf, name: String, found: String, wanted: String },
    #[error("{device}: {what}: {source}")]
    Ebpf { device: PathBuf, what: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Name(#[from] crate::model::NameError),
    #[error(
        "tracker {name:?} ({pin_dir}) is in use by another process (a running primary, or \
         `replicator track`): two processes draining one tracker take each other's marks; stop that \
         one first"
    )]
    InUse { name: String, pin_dir: PathBuf },
    #[error(
        "{device}: a zoned disk ({model}): zone appends land where the write pointer is, not where the \
         write says, and zone resets carry no length, so the tracker cannot mark them"
    )]
    Zoned { device: PathBuf, model: String },
}

/// How to attach a tracker.
#[derive(Clone, Debug)]
pub struct TrackerOptions {
    /// Name of the pin directory; defaults to the device's file name (`loop0p2`).
    pub name: Option<String>,
    pub extent_bytes: u64,
    pub bpffs_root: PathBuf,
    /// How often a drain takes every word, not only those the summaries name (see
    /// `SWEEP_INTERVAL`, the default). `None`, for tests: never, so the summaries alone must
    /// find every mark.
    pub sweep_interval: Option<std::time::Duration>,
    /// Hold the tracker alone (the default): another attach of the same name, or `untrack`,
    /// is refused while this one lives, since two drains would take each other's marks.
    /// `false` only for fault injection in tests, which steal marks on purpose.
    pub exclusive: bool,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        Self {
            name: None,
            extent_bytes: replicator_common::extent::EXTENT_BYTES_DEFAULT,
            bpffs_root: PathBuf::from(BPFFS_ROOT),
            sweep_interval: Some(SWEEP_INTERVAL),
            exclusive: true,
        }
    }
}

/// Sums of the kernel program's per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerCounters {
    pub events_seen: u64,
    pub write_events: u64,
    pub intent_extents_marked: u64,
    pub completed_extents_marked: u64,
    pub wide_ranges: u64,
    pub wide_lost: u64,
    /// Program runs the kernel skipped (see `misses.rs`); each increase marked the device.
    pub recursion_misses: u64,
    /// Queued writes whose completion was not traced within `UNMATCHED_AFTER`, reported as
    /// completed anyway.
    pub unmatched_writes: u64,
}

/// How long a queued write may wait for its traced completion before it is reported anyway.
pub const UNMATCHED_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a drain reads the programs' recursion misses (a syscall per program); every
/// checkpoint reads them too.
const MISSES_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a sweep of every word of the queued and completed maps takes, spread over the
/// drains (each takes its share, besides the words the summaries name): the safety net for a
/// summary bit seen before its word's bits (a weakly ordered CPU) and for bits set before the
/// summaries existed. Well under `UNMATCHED_AFTER`, so such a completion is late by this much
/// at most and never taken for a lost one.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The most words of each map a sweep takes per second: a 1 TiB device (64 KiB extents) in
/// `SWEEP_INTERVAL`, about 0.3% of a core for both maps. A larger device sweeps more slowly
/// rather than costing more; a completion its sweep finds late (only on a weakly ordered CPU)
/// is then at worst reported as unmatched and shipped once more.
const SWEEP_WORDS_PER_S: f64 = 2_621_440.0;

pub struct Tracker {
    device: BlockDevice,
    geometry: ExtentGeometry,
    name: String,
    pin_dir: PathBuf,
    /// True when pinned state from an earlier run was found and reused.
    resumed: bool,
    intent: SharedBitmap,
    queued: Summarized,
    /// Queued extents whose completion has not been drained, and those already awaiting when
    /// `awaiting_since` began (see `match_completions`).
    awaiting: ExtentSet,
    awaiting_before: ExtentSet,
    awaiting_since: std::time::Instant,
    unmatched_writes: u64,
    completed: Summarized,
    /// When the last drain swept its share (see `SWEEP_INTERVAL`); `None`: the next drain
    /// sweeps every word.
    swept: Option<std::time::Instant>,
    sweep_interval: Option<std::time::Duration>,
    flags: SharedBitmap,
    wide: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    epochs: Epochs,
    /// What `drain_completed` hands out; allocated once, one bit per extent.
    drained: ExtentSet,
    /// Our programs, to read their recursion misses.
    programs: Vec<ProgramFd>,
    /// The sum of their recursion misses when last checked.
    recursion_misses: u64,
    /// Set once reading them failed (said once in the log).
    misses_unreadable: bool,
    /// When the programs' recursion misses were last read.
    misses_checked: std::time::Instant,
    /// The exclusive lock on the pin directory (`TrackerOptions::exclusive`), held while this
    /// tracker lives.
    lock: Option<nix::fcntl::Flock<fs::File>>,
}

impl Tracker {
    /// Attaches a tracker to `device` with the default options and `extent_bytes`.
    pub fn attach(device: &Path, extent_bytes: u64) -> Result<Self, TrackerError> {
        Self::attach_with(device, &TrackerOptions { extent_bytes, ..TrackerOptions::default() })
    }

    pub fn attach_with(path: &Path, options: &TrackerOptions) -> Result<Self, TrackerError> {
        let (device, config) = tracker_config(path, options)?;
        let geometry = config.geometry;
        sysfs::ensure_bpffs()?;
        let name = options.name.clone().unwrap_or_else(|| default_name(path));
        let pin_dir = pin_dir_of(&options.bpffs_root, &name)?;
        let resumed = check_pinned_meta(&pin_dir, &name, &config)?;
        fs::create_dir_all(&pin_dir).map_err(|source| TrackerError::Io { path: pin_dir.clone(), source })?;
        let lock = if options.exclusive { Some(lock_pin_dir(&pin_dir, &name)?) } else { None };
        let mut ebpf = load(&pin_dir, &config).map_err(ebpf_error(path, "loading the kernel program"))?;
        write_meta(&mut ebpf, &config).map_err(ebpf_error(path, "writing META"))?;
        let btf = aya::Btf::from_sys_fs().map_err(|e| ebpf_error(path, "reading kernel BTF")(e.into()))?;
        // Marks the previous run's programs may have skipped, read before they are replaced.
        let missed_before = if resumed { pinned_recursion_misses(&pin_dir) } else { 0 };
        let mut programs = Vec::new();
        for (program, tracepoint) in PROGRAMS {
            programs.push(
                attach_pinned(&mut ebpf, &btf, program, tracepoint, &pin_dir)
                    .map_err(ebpf_error(path, tracepoint))?,
            );
        }
        let maps = Maps::take(&mut ebpf, config.bitmap_words, geometry.extent_count(), path)?;
        tracing::info!(
            device = %path.display(), pin_dir = %pin_dir.display(), resumed,
            extent_bytes = geometry.extent_bytes(), extents = geometry.extent_count(),
            start_sector = device.start_sector, "tracker attached"
        );
        // `ebpf` drops here: the links and maps live on through their pins and our fds.
        if missed_before > 0 {
            tracing::warn!(
                missed_before,
                "the previous tracker's programs skipped runs: marking every extent"
            );
            maps.intent.set_all(geometry.extent_count());
            maps.completed.set_all(geometry.extent_count());
        }
        let tracker =
            Self::from_parts(device, geometry, (name, pin_dir, resumed), maps, programs, options, lock);
        if tracker.lock.is_some() {
            // An exempt process of a run that crashed stays in the pinned flags: its pid may be
            // another process's now. The process that exports sets its own again.
            tracker.exempt_writes_of(0);
        }
        Ok(tracker)
    }

    fn from_parts(
        device: BlockDevice,
        geometry: ExtentGeometry,
        (name, pin_dir, resumed): (String, PathBuf, bool),
        maps: Maps,
        programs: Vec<ProgramFd>,
        options: &TrackerOptions,
        lock: Option<nix::fcntl::Flock<fs::File>>,
    ) -> Self {
        let extents = geometry.extent_count() as usize;
        Self {
            device,
            geometry,
            name,
            pin_dir,
            resumed,
            intent: maps.intent,
            completed: maps.completed,
            queued: maps.queued,
            awaiting: ExtentSet::new(extents),
            awaiting_before: ExtentSet::new(extents),
            awaiting_since: std::time::Instant::now(),
            unmatched_writes: 0,
            swept: None,
            sweep_interval: options.sweep_interval,
            flags: maps.flags,
            wide: maps.wide,
            counters: maps.counters,
            epochs: maps.epochs,
            drained: ExtentSet::new(extents),
            programs,
            recursion_misses: 0,
            misses_unreadable: false,
            misses_checked: std::time::Instant::now(),
            lock,
        }
    }

    pub fn device(&self) -> &BlockDevice {
        &self.device
    }

    pub fn geometry(&self) -> &ExtentGeometry {
        &self.geometry
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether this attach found pinned state from an earlier run (and so kept its marks).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Atomically takes the completed marks and returns them as ascending, maximal runs of
    /// extents. Each extent is returned once per drain however many writes completed on it.
    /// Costs what was marked since the last drain, not the size of the device (the maps'
    /// summaries), plus the drain's share of a sweep of every word each `SWEEP_INTERVAL`.
    pub fn drain_completed(&mut self) -> Runs<'_> {
        self.take_marks();
        self.match_completions(None);
        self.drained.runs()
    }

    /// `drain_completed` for a tracker whose own process writes the device too (the NBD
    /// export): completions on the extents in `exempt` are not reported unless another process
    /// queued a write there, since the exempt writer ships its writes itself. `exempt` must
    /// hold every extent the exempt process wrote since the last drain or is writing now.
    ///
    /// Queued marks are taken again after the completions: a write queued after the first
    /// take whose completion is in this drain has its queued bit set by then, so it is never
    /// mistaken for an exempt write.
    pub fn drain_completed_except(&mut self, exempt: &BitVec<u64, Lsb0>) -> Runs<'_> {
        assert_eq!(exempt.len(), self.drained.len(), "one exempt bit per extent");
        self.take_marks();
        let (exempt_words, awaiting) = (exempt.as_raw_slice(), &self.awaiting);
        self.drained.retain_words(|word, _| !(exempt_words[word] & !awaiting.word(word)));
        self.match_completions(Some(exempt));
        self.drained.runs()
    }

    /// Empties `drained` and takes the completed marks into it. Queued marks are taken first
    /// (a completion is never taken before its queueing) and again after the completions: a
    /// write queued after the first take whose completion is in this drain has its queued bit
    /// set by then, and is matched now (otherwise it would wait for a second completion and be
    /// reported again a second later).
    fn take_marks(&mut self) {
        self.pump_wide_ranges();
        let sweep = self.sweep_share();
        self.queued.take_into(&mut self.awaiting, None, sweep);
        self.drained.clear();
        self.completed.take_into(&mut self.drained, Some(&self.intent), sweep);
        // The first queued take swept this drain's share already.
        self.queued.take_into(&mut self.awaiting, None, Sweep::Nothing);
    }

    /// This drain's share of the sweep: the words in proportion to the time since the last
    /// drain, so a whole pass takes `SWEEP_INTERVAL` (longer on a device past 1 TiB, see
    /// `SWEEP_WORDS_PER_S`) and no drain pauses for all of it (at 1 TiB a whole pass is 2 x
    /// 2 MiB of loads, a third of a millisecond).
    fn sweep_share(&mut self) -> Sweep {
        let Some(interval) = self.sweep_interval else { return Sweep::Nothing };
        let words = self.queued.bits.words().len();
        let pass_s = interval.as_secs_f64().max(words as f64 / SWEEP_WORDS_PER_S);
        let now = std::time::Instant::now();
        let share = self.swept.map_or(1.0, |at| (now - at).as_secs_f64() / pass_s);
        self.swept = Some(now);
        if share >= 1.0 { Sweep::All } else { Sweep::Words((share * words as f64).ceil() as usize) }
    }

    /// Exempts the writes of thread group `tgid` (0: none) from shipping: the kernel program
    /// marks them in the intent log only. See `drain_completed_except`.
    pub fn exempt_writes_of(&self, tgid: u32) {
        self.flags.words()[FLAGS_WORD_EXEMPT_TGID as usize]
            .store(u64::from(tgid), std::sync::atomic::Ordering::Release);
    }

    /// Fault injection for tests: takes completion marks and nothing else, so that to the
    /// process draining this tracker for real those completions look untraced.
    pub fn steal_completions(&mut self) -> Runs<'_> {
        self.drained.clear();
        self.completed.take_into(&mut self.drained, None, Sweep::All);
        self.drained.runs()
    }

    /// Whether some queued write has not had its completion drained yet.
    pub fn awaiting_completion(&self) -> bool {
        self.awaiting.any()
    }

    /// The extents of queued writes whose completion has not been drained yet, as runs.
    pub fn awaiting_runs(&self) -> crate::extent_set::Runs<'_> {
        self.awaiting.runs()
    }

    /// Reports every queued write whose completion has not been drained as completed: for a
    /// last drain, when nothing is being written any more.
    pub fn drain_unmatched(&mut self) -> Runs<'_> {
        self.check_recursion_misses();
        self.pump_wide_ranges();
        self.swept = Some(std::time::Instant::now());
        self.queued.take_into(&mut self.awaiting, None, Sweep::All);
        self.drained.clear();
        self.completed.take_into(&mut self.drained, Some(&self.intent), Sweep::All);
        let count = self.awaiting.count() as u64;
        if count > 0 {
            tracing::warn!(
                extents = count,
                "queued writes without a traced completion at the last drain: reporting them"
            );
            self.unmatched_writes += count;
        }
        self.drained.union(&self.awaiting);
        self.awaiting.clear();
        self.drained.runs()
    }

    /// The completion safety net: what was queued is remembered until its completion is
    /// drained; what waited a whole `UNMATCHED_AFTER` is reported as completed anyway. The
    /// kernel does not always trace a completion: on a loop device, 64 KiB O_DIRECT writes one
    /// at a time lost 0 to 2 in 20 000, and the kernel's own `block_rq_complete` and
    /// `block_io_done` events (perf) lacked the same requests, though each write had returned;
    /// 1.3 million writes at queue depth 32 lost none (2026-11-27, Linux 6.18). A completion
    /// that still comes reports the extent again. Word at a time, over the words that hold
    /// something.
    ///
    /// A completion on an extent in `keep` does not match a queued write there: it may be the
    /// exempt writer's (see `drain_completed_except`), so the queued write waits for its own.
    fn match_completions(&mut self, keep: Option<&BitVec<u64, Lsb0>>) {
        let keep = keep.map(|k| k.as_raw_slice());
        let drained = &self.drained;
        self.awaiting.retain_words(|word, _| !(drained.word(word) & !keep.map_or(0, |k| k[word])));
        if self.awaiting_since.elapsed() < UNMATCHED_AFTER {
            return;
        }
        let mut unmatched = 0;
        let (before, drained) = (&self.awaiting_before, &mut self.drained);
        self.awaiting.retain_words(|word, bits| {
            let stale = bits & before.word(word);
            drained.union_word(word, stale);
            unmatched += u64::from(stale.count_ones());
            !stale
        });
        self.awaiting_before.clear();
        self.awaiting_before.union(&self.awaiting);
        if unmatched > 0 {
            tracing::warn!(
                extents = unmatched,
                "writes with no traced completion after {UNMATCHED_AFTER:?}: reporting them as completed"
            );
            self.unmatched_writes += unmatched;
        }
        self.awaiting_since = std::time::Instant::now();
    }

    /// Copies the intent bitmap into `out` (which it clears first), leaving the map unchanged.
    pub fn intent_into(&mut self, out: &mut BitVec<u64, Lsb0>) {
        self.check_recursion_misses();
        self.pump_wide_ranges();
        out.clear();
        out.resize(self.geometry.extent_count() as usize, false);
        self.intent.copy_into(out);
    }

    /// Removes extents from the write-intent log: only extents that every unfractured
    /// secondary holds and that stayed quiet (see `logs::IntentQuiet`).
    pub fn clear_intent(&mut self, extents: &BitSlice<u64, Lsb0>) {
        self.intent.clear_bits(extents);
    }

    /// Removes the extents `run` (non-empty) from the write-intent log; the words it covers
    /// only, for a caller that clears what it has just handed on (`track`).
    pub fn clear_intent_run(&mut self, run: std::ops::Range<u64>) {
        assert!(!run.is_empty() && run.end <= self.geometry.extent_count(), "run {run:?}");
        self.intent.clear_span(ExtentSpan { first: run.start, last: run.end - 1 });
    }

    /// Adds extents to the write-intent log (recovered from its checkpoint after a host crash).
    pub fn mark_intent(&mut self, extents: &BitSlice<u64, Lsb0>) {
        self.intent.set_bits(extents);
    }

    /// A copy of the intent bitmap (one bit per extent), leaving it unchanged.
    pub fn intent_snapshot(&mut self) -> BitVec<u64, Lsb0> {
        self.pump_wide_ranges();
        let mut snapshot = bitvec![u64, Lsb0; 0; self.geometry.extent_count() as usize];
        self.intent.copy_into(&mut snapshot);
        snapshot
    }

    /// The open epoch of consistent cuts (see `epochs.rs`).
    pub fn epoch(&self) -> u64 {
        self.epochs.current()
    }

    /// Starts the next epoch; returns it. Wide ranges of the closing epoch are taken first, so
    /// none is left to be taken for the new one.
    pub fn flip_epoch(&mut self) -> u64 {
        self.pump_wide_ranges();
        self.epochs.flip()
    }

    /// Starts an epoch past `floor` unless the open one is past it already.
    pub fn raise_epoch(&mut self, floor: u64) {
        self.pump_wide_ranges();
        self.epochs.raise_to(floor);
    }

    /// Whether a write (not the exempt writer's) to an extent of `run` (non-empty) was queued
    /// in the open epoch, as far as the marks say now.
    pub fn written_in_epoch(&mut self, run: std::ops::Range<u64>) -> bool {
        assert!(!run.is_empty() && run.end <= self.geometry.extent_count(), "run {run:?}");
        self.pump_wide_ranges();
        self.epochs.written(ExtentSpan { first: run.start, last: run.end - 1 })
    }

    /// The open epoch's marks of extents `64 * word..64 * word + 64`, as a word (wide ranges
    /// are in it once a drain or a `written_in_epoch*` took them).
    pub fn written_in_epoch_word(&self, word: usize) -> u64 {
        self.epochs.written_word(word)
    }

    /// As `written_in_epoch_word`, for epoch `epoch`: the open one or the one before it.
    pub fn written_word_of(&self, epoch: u64, word: usize) -> u64 {
        self.epochs.written_word_of(epoch, word)
    }

    /// The extents of queued writes whose completion has not been drained yet.
    pub fn awaiting(&self) -> &ExtentSet {
        &self.awaiting
    }

    /// Whether any write (not the exempt writer's) was queued in the open epoch: one load.
    pub fn written_in_epoch_any(&mut self) -> bool {
        self.pump_wide_ranges();
        self.epochs.any_written()
    }

    /// Flips whose wait for the previous epoch's programs gave up (`ACTIVE_WAIT_MAX`).
    pub fn epoch_wait_timeouts(&self) -> u64 {
        self.epochs.wait_timeouts
    }

    pub fn counters(&self) -> TrackerCounters {
        let sum = |c: Counter| self.counters.get(&(c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
        debug_assert_eq!(COUNTERS_LEN, 6);
        TrackerCounters {
            events_seen: sum(Counter::EventsSeen),
            write_events: sum(Counter::WriteEvents),
            intent_extents_marked: sum(Counter::IntentExtentsMarked),
            completed_extents_marked: sum(Counter::CompletedExtentsMarked),
            wide_ranges: sum(Counter::WideRanges),
            wide_lost: sum(Counter::WideLost),
            recursion_misses: self.recursion_misses,
            unmatched_writes: self.unmatched_writes,
        }
    }

    /// A clean stop: unpins the links and maps, so the program detaches when this tracker is
    /// dropped and the marks are gone. Only call it once nothing still needs them.
    pub fn stop(self) -> Result<(), TrackerError> {
        unpin(&self.pin_dir)?;
        tracing::info!(pin_dir = %self.pin_dir.display(), "tracker stopped and unpinned");
        Ok(())
    }

    /// Moves wide ranges from the ring buffer into the shared bitmaps, and honours the flags the
    /// program sets when a wide range did not fit: then the whole device is marked.
    fn pump_wide_ranges(&mut self) {
        while let Some(item) = self.wide.next() {
            let Some(range) = parse_wide_range(&item) else {
                tracing::error!(len = item.len(), "malformed WIDE record: marking the whole device");
                self.intent.set_all(self.geometry.extent_count());
                self.completed.set_all(self.geometry.extent_count());
                self.epochs.mark_all();
                continue;
            };
            let span = ExtentSpan { first: range.first_extent, last: range.last_extent };
            let extents = self.geometry.extent_count();
            assert!(
                span.first <= span.last && span.last < extents,
                "WIDE range {span:?} beyond {extents} extents"
            );
            match range.kind {
                k if k == MarkKind::Intent as u32 => {
                    self.intent.set_span(span);
                    self.queued.set_span(span);
                    self.epochs.mark_wide(range.epoch, span);
                }
                k if k == MarkKind::IntentOnly as u32 => self.intent.set_span(span),
                _ => self.completed.set_span(span),
            }
        }
        // A syscall per program: at most every MISSES_CHECK_INTERVAL while draining, and at every
        // checkpoint (`intent_into`), before any extent may leave the intent log.
        if self.misses_checked.elapsed() >= MISSES_CHECK_INTERVAL {
            self.check_recursion_misses();
        }
        let lost = self.flags.words()[FLAGS_WORD_LOST as usize].swap(0, std::sync::atomic::Ordering::AcqRel);
        if lost & FLAG_INTENT_LOST != 0 {
            tracing::warn!("WIDE ring buffer overflowed: marking every extent in the intent log");
            self.intent.set_all(self.geometry.extent_count());
            self.queued.set_all(self.geometry.extent_count());
            self.epochs.mark_all();
        }
        if lost & FLAG_COMPLETED_LOST != 0 {
            tracing::warn!("WIDE ring buffer overflowed: marking every extent as written");
            self.completed.set_all(self.geometry.extent_count());
        }
    }
}

impl Tracker {
    /// Marks the whole device if the kernel skipped a run of one of our programs since the
    /// last check (a mark that may never have been set).
    fn check_recursion_misses(&mut self) {
        use std::os::fd::AsFd as _;
        self.misses_checked = std::time::Instant::now();
        let mut total = 0;
        for program in &self.programs {
            match misses::recursion_misses(program.as_fd()) {
                Ok(misses) => total += misses,
                Err(error) => {
                    if !self.misses_unreadable {
                        tracing::warn!(%error, "cannot read the tracker programs' recursion misses");
                        self.misses_unreadable = true;
                    }
                }
            }
        }
        if total > self.recursion_misses {
            tracing::warn!(
                skipped = total - self.recursion_misses,
                "the kernel skipped tracker runs (nested on one CPU): marking every extent"
            );
            self.intent.set_all(self.geometry.extent_count());
            self.completed.set_all(self.geometry.extent_count());
            self.epochs.mark_all();
            self.recursion_misses = total;
        }
    }
}

/// The recursion misses of the programs behind a pin directory's links (a previous run's).
/// An unreadable one counts as a miss: better a full resync than a hidden gap.
fn pinned_recursion_misses(pin_dir: &Path) -> u64 {
    use std::os::fd::AsFd as _;
    let mut total = 0;
    for (_, tracepoint) in PROGRAMS {
        let path = pin_dir.join(format!("link_{tracepoint}"));
        if !path.exists() {
            continue;
        }
        let misses = (|| -> Option<u64> {
            let link = FdLink::from(PinnedLink::from_pin(&path).ok()?);
            let program_id = link.info().ok()?.program_id();
            let program = aya::programs::loaded_programs().flatten().find(|p| p.id() == program_id)?;
            misses::recursion_misses(program.fd().ok()?.as_fd()).ok()
        })();
        total += misses.unwrap_or(1);
    }
    total
}

/// Where tracker `name` pins its maps and links under `bpffs_root`; the name must be a plain
/// file name (it becomes a directory that `untrack` removes).
pub fn pin_dir_of(bpffs_root: &Path, name: &str) -> Result<PathBuf, TrackerError> {
    crate::model::check_name(crate::model::NameOf::Tracker, name)?;
    Ok(bpffs_root.join(name))
}

/// Takes the exclusive lock on a tracker's pin directory (flock: released when the process
/// ends, however it ends).
fn lock_pin_dir(pin_dir: &Path, name: &str) -> Result<nix::fcntl::Flock<fs::File>, TrackerError> {
    use nix::fcntl::{Flock, FlockArg};
    let dir = fs::File::open(pin_dir).map_err(|source| TrackerError::Io { path: pin_dir.into(), source })?;
    Flock::lock(dir, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        nix::errno::Errno::EWOULDBLOCK => {
            TrackerError::InUse { name: name.to_owned(), pin_dir: pin_dir.into() }
        }
        other => TrackerError::Io { path: pin_dir.into(), source: other.into() },
    })
}

/// `replicator untrack NAME`: removes the pins of tracker `name` under `BPFFS_ROOT`, unless a
/// process holds it (a running primary would lose its marks). Returns the directory removed.
pub fn untrack(name: &str) -> Result<PathBuf, TrackerError> {
    let pin_dir = pin_dir_of(Path::new(BPFFS_ROOT), name)?;
    if !pin_dir.exists() {
        return Ok(pin_dir);
    }
    let _lock = lock_pin_dir(&pin_dir, name)?;
    unpin(&pin_dir)?;
    Ok(pin_dir)
}

/// Removes a tracker's pins: the program detaches once no process holds its links, and the
/// marks are discarded.
pub fn unpin(pin_dir: &Path) -> Result<(), TrackerError> {
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TrackerError::Io { path: pin_dir.into(), source }),
    }
}

fn default_name(device: &Path) -> String {
    device.file_name().map_or_else(|| "device".into(), |n| n.to_string_lossy().into_owned())
}

fn parse_wide_range(bytes: &[u8]) -> Option<WideRange> {
    let bytes: &[u8; size_of::<WideRange>()] = bytes.get(..size_of::<WideRange>())?.try_into().ok()?;
    let word = |i: usize| u64::from_ne_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    Some(WideRange {
        kind: u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes")),
        epoch: u32::from_ne_bytes(bytes[4..8].try_into().expect("4 bytes")),
        first_extent: word(8),
        last_extent: word(16),
    })
}

/// Returns whether pinned state exists; fails if it was made for another configuration.
fn check_pinned_meta(pin_dir: &Path, name: &str, wanted: &TrackerConfig) -> Result<bool, TrackerError> {
    let meta_path = pin_dir.join(MAP_META);
    if !meta_path.exists() {
        return Ok(false);
    }
    let read = || -> Result<TrackerConfig, Box<dyn std::error::Error + Send + Sync>> {
        let map = aya::maps::Map::Array(MapData::from_pin(&meta_path)?);
        let array: Array<_, TrackerConfig> = Array::try_from(map)?;
        Ok(array.get(&0, 0)?)
    };
    let found = read().map_err(|source| TrackerError::Ebpf {
        device: meta_path.clone(),
        what: "reading the pinned META map".into(),
        source,
    })?;
    let same = (found.disk_major, found.disk_minor) == (wanted.disk_major, wanted.disk_minor)
        && found.geometry == wanted.geometry
        && found.bitmap_words == wanted.bitmap_words;
    if !same {
        let describe = |c: &TrackerConfig| {
            format!(
                "disk {}:{} sectors {}+{} extent {} bytes",
                c.disk_major,
                c.disk_minor,
                c.geometry.start_sector,
                c.geometry.nr_sectors,
                c.geometry.extent_bytes()
            )
        };
        return Err(TrackerError::StalePins {
            pin_dir: pin_dir.into(),
            name: name.into(),
            found: describe(&found),
            wanted: describe(wanted),
        });
    }
    Ok(true)
}

/// The device `path` resolves to and the configuration its program is loaded with: a zoned
/// disk is refused, and the extent size and the bitmap's size are checked.
fn tracker_config(
    path: &Path,
    options: &TrackerOptions,
) -> Result<(BlockDevice, TrackerConfig), TrackerError> {
    let device = BlockDevice::resolve(path)?;
    if device.zoned != "none" {
        return Err(TrackerError::Zoned { device: path.into(), model: device.zoned.clone() });
    }
    let geometry = ExtentGeometry::new(device.start_sector, device.nr_sectors, options.extent_bytes)
        .ok_or(TrackerError::ExtentSize { device: path.into(), extent_bytes: options.extent_bytes })?;
    let bitmap_words = u32::try_from(geometry.bitmap_words()).map_err(|_| TrackerError::TooManyExtents {
        device: path.into(),
        extents: geometry.extent_count(),
        extent_bytes: options.extent_bytes,
    })?;
    let config = TrackerConfig {
        disk_major: device.disk_major,
        disk_minor: device.disk_minor,
        geometry,
        bitmap_words,
        layout: kernel_layout()?,
        ..TrackerConfig::EMPTY
    };
    Ok((device, config))
}

/// An error of the eBPF side for `device`, while doing `what`.
fn ebpf_error(device: &Path, what: &str) -> impl FnOnce(BoxError) -> TrackerError + use<> {
    let (device, what) = (device.to_path_buf(), what.to_owned());
    move |source: BoxError| TrackerError::Ebpf { device, what, source }
}

/// Loads the kernel program with its maps sized for `config` and pinned in `pin_dir` (an
/// earlier run's pinned maps are reused).
fn load(pin_dir: &Path, config: &TrackerConfig) -> Result<Ebpf, BoxError> {
    let words = config.bitmap_words;
    Ok(EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .override_global(GLOBAL_CONFIG, config, true)
        .map_max_entries(MAP_INTENT, words)
        .map_max_entries(MAP_COMPLETED, words)
        .map_max_entries(MAP_QUEUED, words)
        .map_max_entries(MAP_QUEUED_SUMMARY, summary_map_words(words))
        .map_max_entries(MAP_COMPLETED_SUMMARY, summary_map_words(words))
        .map_max_entries(MAP_WRITTEN[0], words)
        .map_max_entries(MAP_WRITTEN[1], words)
        .load(EBPF_OBJECT)?)
}

/// The maps userspace keeps, taken from the loaded object.
struct Maps {
    intent: SharedBitmap,
    completed: Summarized,
    queued: Summarized,
    flags: SharedBitmap,
    wide: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    epochs: Epochs,
}

impl Maps {
    fn take(
        ebpf: &mut Ebpf,
        bitmap_words: u32,
        extent_count: u64,
        path: &Path,
    ) -> Result<Self, TrackerError> {
        let intent = map_bitmap(ebpf, MAP_INTENT, bitmap_words).map_err(ebpf_error(path, MAP_INTENT))?;
        let mut summarized = |name: &str, summary_name: &str| -> Result<Summarized, TrackerError> {
            let bits = map_bitmap(ebpf, name, bitmap_words).map_err(ebpf_error(path, name))?;
            let summary = map_bitmap(ebpf, summary_name, summary_map_words(bitmap_words))
                .map_err(ebpf_error(path, summary_name))?;
            Ok(Summarized::new(bits, summary))
        };
        let completed = summarized(MAP_COMPLETED, MAP_COMPLETED_SUMMARY)?;
        let queued = summarized(MAP_QUEUED, MAP_QUEUED_SUMMARY)?;
        let flags = map_bitmap(ebpf, MAP_FLAGS, FLAGS_WORDS).map_err(ebpf_error(path, MAP_FLAGS))?;
        let wide = take_map(ebpf, MAP_WIDE)
            .and_then(|m| Ok(RingBuf::try_from(m)?))
            .map_err(ebpf_error(path, MAP_WIDE))?;
        let counters = take_map(ebpf, MAP_COUNTERS)
            .and_then(|m| Ok(PerCpuArray::try_from(m)?))
            .map_err(ebpf_error(path, MAP_COUNTERS))?;
        let epochs = take_epochs(ebpf, bitmap_words, extent_count, path)?;
        Ok(Self { intent, completed, queued, flags, wide, counters, epochs })
    }
}

fn take_epochs(
    ebpf: &mut Ebpf,
    bitmap_words: u32,
    extent_count: u64,
    path: &Path,
) -> Result<Epochs, TrackerError> {
    let bitmap = |ebpf: &mut Ebpf, name: &str, words: u32| {
        map_bitmap(ebpf, name, words).map_err(ebpf_error(path, name))
    };
    let written = [bitmap(ebpf, MAP_WRITTEN[0], bitmap_words)?, bitmap(ebpf, MAP_WRITTEN[1], bitmap_words)?];
    let epoch_word = bitmap(ebpf, MAP_EPOCH, replicator_common::EPOCH_WORDS)?;
    let active = take_map(ebpf, MAP_ACTIVE)
        .and_then(|m| Ok(PerCpuArray::try_from(m)?))
        .map_err(ebpf_error(path, MAP_ACTIVE))?;
    Ok(Epochs::new(written, epoch_word, active, extent_count))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, BoxError> {
    ebpf.take_map(name).ok_or_else(|| format!("map {name} missing from the object").into())
}

fn write_meta(ebpf: &mut Ebpf, config: &TrackerConfig) -> Result<(), BoxError> {
    let map = ebpf.map_mut(MAP_META).ok_or("map META missing from the object")?;
    let mut meta: Array<_, TrackerConfig> = Array::try_from(map)?;
    meta.set(0, config, 0)?;
    Ok(())
}

fn map_bitmap(ebpf: &mut Ebpf, name: &str, words: u32) -> Result<SharedBitmap, BoxError> {
    let map = ebpf.map(name).ok_or_else(|| format!("map {name} missing from the object"))?;
    let aya::maps::Map::Array(data) = map else {
        return Err(format!("map {name} is not an array").into());
    };
    let max_entries = data.info()?.max_entries();
    if max_entries != words {
        return Err(format!("pinned map {name} has {max_entries} words, expected {words}").into());
    }
    Ok(SharedBitmap::map(data.fd().as_fd(), words as usize)?)
}

/// Loads and attaches one program, pins its link as `link_<tracepoint>`. A link pinned by an
/// earlier run is replaced only after the new one is attached, so marking never pauses.
fn attach_pinned(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    program: &str,
    tracepoint: &str,
    pin_dir: &Path,
) -> Result<ProgramFd, BoxError> {
    let prog: &mut BtfTracePoint =
        ebpf.program_mut(program).ok_or_else(|| format!("program {program} missing"))?.try_into()?;
    prog.load(tracepoint, btf)?;
    let program_fd = prog.fd()?.try_clone()?;
    let link_id = prog.attach()?;
    let link: FdLink = prog.take_link(link_id)?.into();
    let pin_path = pin_dir.join(format!("link_{tracepoint}"));
    let staging = pin_dir.join(format!("link_{tracepoint}_new"));
    let _ = fs::remove_file(&staging);
    let pinned = link.pin(&staging)?;
    // Renaming over the old pin drops the old link's last reference: it detaches now, after the
    // new one is live.
    fs::rename(&staging, &pin_path)?;
    drop(pinned);
    Ok(program_fd)
}
