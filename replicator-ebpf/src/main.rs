//! The tracker's kernel half: programs on the block layer's raw tracepoints that mark, one bit
//! per extent, what writes to the tracked device touch.
//!
//! Which tracepoints, and why:
//! - **Intent** marks come from `block_bio_queue`. It fires in `submit_bio_noacct_nocheck()` for
//!   every bio on every kind of device (blk-mq and bio-based alike), once per bio, before the bio
//!   reaches the driver and after partition remapping. So a bit is set before any byte of the
//!   write can reach the device, and the sector is absolute on the whole disk.
//! - **Completed** marks come from `block_rq_complete` for blk-mq devices (loop, virtio, nvme):
//!   it fires from `blk_update_request()` with the bytes just completed, once the device is done,
//!   so data read afterwards is at least that new. On blk-mq devices `block_bio_complete` does not
//!   help: the request path clears the bio's trace-completion flag (and advances the bio's
//!   iterator). Bio-based devices (zram, and stacking drivers) have no requests; for them
//!   `block_bio_complete` fires from `bio_endio()` with the bio's range intact. We attach both
//!   completion tracepoints and mark whatever either reports: a device produces one of them, and
//!   a mark set twice is still one bit.
//!
//! Raw tracepoints, not the classic ones: a classic tracepoint formats a trace record (fields,
//! `rwbs` string, `comm`) before the program runs, which cost 7% of IOPS at queue depth 32 on a
//! loop device even with an empty program. A raw tracepoint hands over the `struct bio *` or
//! `struct request *` itself, and the program reads the few members it needs at offsets that
//! userspace took from the kernel's BTF.
//!
//! What is marked: every event on the target disk whose operation is not a read and whose length
//! is not zero (writes, discards, secure erase, write-zeroes, anything unknown). Failed writes
//! too: a failed write may still have changed some of its sectors. Passthrough commands (SG_IO,
//! NVMe passthrough) carry no block-layer sector and are not tracked.
//!
//! Intent marks of writers other than the exempt one also go to the open epoch's bitmap
//! (`WRITTEN[EPOCH & 1]`), between an increment and a decrement of this CPU's `ACTIVE` counter,
//! so that userspace, having started a new epoch, can wait until no mark of the old one is
//! still to come (see `replicator_common::layout::MAP_WRITTEN`).
//!
//! Invariant: for every write-like range on the tracked device, each extent it touches has its
//! bit set in the bitmap, or the range has gone to the `WIDE` ring buffer, or a `FLAGS` bit tells
//! userspace to treat everything as dirty. Nothing is ever dropped silently.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

use aya_ebpf::{
    Global,
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, map},
    maps::{Array, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use replicator_common::{
    BIO_COMPLETE_ARG_BIO, BIO_QUEUE_ARG_BIO, BPF_F_MMAPABLE, COUNTERS_LEN, Counter, EPOCH_WORD_ANY,
    EPOCH_WORD_EPOCH, EPOCH_WORDS, EVENT_WORDS_MAX, ExtentSpan, FLAG_COMPLETED_LOST, FLAG_INTENT_LOST,
    FLAGS_WORD_EXEMPT_TGID, FLAGS_WORD_LOST, FLAGS_WORDS, MarkKind, RQ_COMPLETE_ARG_NR_BYTES,
    RQ_COMPLETE_ARG_RQ, SECTOR_BYTES, TrackerConfig, WIDE_RING_BYTES, WORD_BITS, WideRange, summary_words,
};

/// Set by userspace before load (`EbpfLoader::override_global`); read-only to the verifier.
#[unsafe(no_mangle)]
static CONFIG: Global<TrackerConfig> = Global::new(TrackerConfig::EMPTY);

/// One bit per extent, set when a write is queued. Sized by userspace at load time.
#[map]
static INTENT: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// One bit per extent, set with INTENT when a write is queued; taken by userspace at every drain
/// and matched against completions. Sized by userspace at load time.
#[map]
static QUEUED: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// One bit per extent, set when a write has completed. Sized by userspace at load time.
#[map]
static COMPLETED: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// One bit per word of QUEUED (of COMPLETED), set after a bit in that word. Sized by userspace.
#[map]
static QUEUED_SUM: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);
#[map]
static COMPLETED_SUM: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// Ranges wider than `EVENT_WORDS_MAX` words, for userspace to merge.
#[map]
static WIDE: RingBuf = RingBuf::pinned(WIDE_RING_BYTES, 0);

/// One word of `FLAG_*` bits; see `replicator_common::layout`.
#[map]
static FLAGS: Array<u64> = Array::pinned(FLAGS_WORDS, BPF_F_MMAPABLE);

/// The configuration the pinned maps were made for, written by userspace so that a restart can
/// tell whether the marks it finds belong to the same device and extent size. Unused here.
#[map]
static META: Array<TrackerConfig> = Array::pinned(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);

/// The epoch bitmaps, by the epoch's parity; sized by userspace at load time.
#[map]
static WRITTEN0: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);
#[map]
static WRITTEN1: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// The current epoch, written by userspace; and which epoch bitmaps have a mark.
#[map]
static EPOCH: Array<u64> = Array::pinned(EPOCH_WORDS, BPF_F_MMAPABLE);

/// Programs between their read of `EPOCH` and their last epoch mark, on this CPU.
#[map]
static ACTIVE: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

#[btf_tracepoint(function = "block_bio_queue")]
pub fn replicator_bio_queue(ctx: BtfTracePointContext) -> i32 {
    let config = CONFIG.load();
    let bio: u64 = ctx.arg(BIO_QUEUE_ARG_BIO);
    match try_mark_bio(&config, bio, MarkKind::Intent) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[btf_tracepoint(function = "block_rq_complete")]
pub fn replicator_rq_complete(ctx: BtfTracePointContext) -> i32 {
    let config = CONFIG.load();
    let rq: u64 = ctx.arg(RQ_COMPLETE_ARG_RQ);
    let nr_bytes: u64 = ctx.arg(RQ_COMPLETE_ARG_NR_BYTES);
    match try_mark_request(&config, rq, nr_bytes as u32) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[btf_tracepoint(function = "block_bio_complete")]
pub fn replicator_bio_complete(ctx: BtfTracePointContext) -> i32 {
    let config = CONFIG.load();
    let bio: u64 = ctx.arg(BIO_COMPLETE_ARG_BIO);
    match try_mark_bio(&config, bio, MarkKind::Completed) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Reads a `T` at `base + offset` in kernel memory. `base` is a BTF-typed pointer (a
/// tracepoint argument or a pointer member read from one), so this is a plain load: the verifier
/// checks it against the kernel's struct layout (the offset is a `.rodata` constant), and the JIT
/// makes it fault-safe. That costs a few nanoseconds where `bpf_probe_read_kernel` cost tens.
#[inline(always)]
fn read<T: Copy>(base: u64, offset: u32) -> Result<T, i32> {
    // SAFETY: see above; a faulting load reads zero instead of oopsing.
    Ok(unsafe { core::ptr::read_volatile((base as *const u8).add(offset as usize).cast::<T>()) })
}

/// Whether `disk` (a `struct gendisk *`) is the tracked device's disk.
#[inline(always)]
fn is_target_disk(config: &TrackerConfig, disk: u64) -> Result<bool, i32> {
    if disk == 0 {
        return Ok(false);
    }
    let major: u32 = read(disk, config.layout.disk_major)?;
    if major != config.disk_major {
        return Ok(false);
    }
    let minor: u32 = read(disk, config.layout.disk_first_minor)?;
    Ok(minor == config.disk_minor)
}

#[inline(always)]
fn try_mark_bio(config: &TrackerConfig, bio: u64, kind: MarkKind) -> Result<(), i32> {
    let layout = &config.layout;
    let bdev: u64 = read(bio, layout.bio_bdev)?;
    if bdev == 0 {
        return Ok(());
    }
    let disk: u64 = read(bdev, layout.bdev_disk)?;
    if !is_target_disk(config, disk)? {
        return Ok(());
    }
    count(Counter::EventsSeen, 1);
    let opf: u32 = read(bio, layout.bio_opf)?;
    if !layout.op_may_write(opf) {
        return Ok(());
    }
    let sector: u64 = read(bio, layout.bio_sector)?;
    let size_bytes: u32 = read(bio, layout.bio_size)?;
    let kind = if kind == MarkKind::Intent && submitted_by_exempt() { MarkKind::IntentOnly } else { kind };
    mark_sectors(config, kind, sector, size_bytes);
    Ok(())
}

/// Whether the bio being queued comes from the process userspace exempted (the replicator's NBD
/// export, which ships its own writes). `block_bio_queue` runs in the submitter's context: the
/// writing thread itself, or an io_uring worker of the same thread group.
#[inline(always)]
fn submitted_by_exempt() -> bool {
    let exempt = FLAGS.get(FLAGS_WORD_EXEMPT_TGID).copied().unwrap_or(0);
    exempt != 0 && bpf_get_current_pid_tgid() >> 32 == exempt
}

#[inline(always)]
fn try_mark_request(config: &TrackerConfig, rq: u64, nr_bytes: u32) -> Result<(), i32> {
    let layout = &config.layout;
    let queue: u64 = read(rq, layout.rq_queue)?;
    if queue == 0 {
        return Ok(());
    }
    let disk: u64 = read(queue, layout.queue_disk)?;
    if !is_target_disk(config, disk)? {
        return Ok(());
    }
    count(Counter::EventsSeen, 1);
    let opf: u32 = read(rq, layout.rq_cmd_flags)?;
    if !layout.op_may_write(opf) {
        return Ok(());
    }
    let sector: u64 = read(rq, layout.rq_sector)?;
    mark_sectors(config, MarkKind::Completed, sector, nr_bytes);
    Ok(())
}

#[inline(always)]
fn mark_sectors(config: &TrackerConfig, kind: MarkKind, sector: u64, size_bytes: u32) {
    let nr_sectors = u64::from(size_bytes).div_ceil(SECTOR_BYTES);
    if let Some(span) = config.geometry.span(sector, nr_sectors) {
        count(Counter::WriteEvents, 1);
        mark(config, kind, span);
    }
}

#[inline(always)]
fn mark(config: &TrackerConfig, kind: MarkKind, span: ExtentSpan) {
    let words = span.last_word() - span.first_word() + 1;
    let epoch = if kind == MarkKind::Intent { Some(enter_epoch()) } else { None };
    if words > u64::from(EVENT_WORDS_MAX) {
        mark_wide(kind, span, epoch.unwrap_or(0));
        if epoch.is_some() {
            leave_epoch();
        }
        return;
    }
    let written = match epoch {
        Some(epoch) if epoch & 1 == 1 => Some(&WRITTEN1),
        Some(_) => Some(&WRITTEN0),
        None => None,
    };
    if let Some(epoch) = epoch {
        set_bits(&EPOCH, u64::from(EPOCH_WORD_ANY), 1 << (epoch & 1));
    }
    let bitmap = match kind {
        MarkKind::Intent | MarkKind::IntentOnly => &INTENT,
        MarkKind::Completed => &COMPLETED,
    };
    let first_word = span.first_word();
    for i in 0..EVENT_WORDS_MAX {
        let word = first_word + u64::from(i);
        if word > span.last_word() {
            break;
        }
        // The span is clipped to the device, so the word is inside the map; a lookup that still
        // fails would mean a map sized wrongly by userspace, which checks the size at attach.
        let mask = span.word_mask(word);
        if kind == MarkKind::Intent {
            set_bits(&QUEUED, word, mask);
            mark_summary(&QUEUED_SUM, config.bitmap_words, word);
        }
        if let Some(written) = written {
            set_bits(written, word, mask);
        }
        set_bits(bitmap, word, mask);
        if kind == MarkKind::Completed {
            mark_summary(&COMPLETED_SUM, config.bitmap_words, word);
        }
    }
    if epoch.is_some() {
        leave_epoch();
    }
    let counter = match kind {
        MarkKind::Intent | MarkKind::IntentOnly => Counter::IntentExtentsMarked,
        MarkKind::Completed => Counter::CompletedExtentsMarked,
    };
    count(counter, span.count());
}

/// Counts this program in `ACTIVE`, then reads the epoch its marks go to. In that order: a
/// userspace that starts a new epoch and then sees every `ACTIVE` at 0 knows every program that
/// read the old epoch is done (the locked add orders the load after it).
#[inline(always)]
fn enter_epoch() -> u64 {
    if let Some(ptr) = ACTIVE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run; atomic, as a
        // nested program on this CPU may count itself meanwhile.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(ptr, 1) };
    }
    match EPOCH.get_ptr(EPOCH_WORD_EPOCH) {
        // SAFETY: the array's value, valid for the program's run; userspace stores it whole.
        Some(ptr) => unsafe { core::ptr::read_volatile(ptr) },
        None => 0,
    }
}

#[inline(always)]
fn leave_epoch() {
    if let Some(ptr) = ACTIVE.get_ptr_mut(0) {
        // SAFETY: as in `enter_epoch`; adding all ones subtracts one.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(ptr, u64::MAX) };
    }
}

/// After bits in word `word` of a bitmap of `bitmap_words` words: sets its bit in the first
/// summary level, then the summary word's bit in the level above. Each level after the one
/// below, so a bit userspace sees names words whose bits it then finds (on x86 the locked ORs
/// order them; elsewhere userspace's sweep of every word is the safety net, see
/// `MAP_QUEUED_SUMMARY`). The top bit is tested (and set if clear) even when the first-level
/// bit was set already: that bit may belong to a program interrupted before its own top bit,
/// and this program's mark must be reachable from the top when it returns.
#[inline(always)]
fn mark_summary(summary: &Array<u64>, bitmap_words: u32, word: u64) {
    let summary_word = word / WORD_BITS;
    set_bits(summary, summary_word, 1 << (word % WORD_BITS));
    let top_word = u64::from(summary_words(bitmap_words)) + summary_word / WORD_BITS;
    set_bits(summary, top_word, 1 << (summary_word % WORD_BITS));
}

/// ORs `mask` into word `word` of `bitmap`.
#[inline(always)]
fn set_bits(bitmap: &Array<u64>, word: u64, mask: u64) {
    // Userspace sized the maps for the device and checks the size at attach, so the lookup
    // finds the word; one that failed would mean a map sized wrongly.
    if let Some(ptr) = bitmap.get_ptr_mut(word as u32) {
        // Test before set: a hot extent's bits are usually set already, and a plain load keeps
        // the cache line shared where a locked OR would take it from the other CPU. Skipping is
        // exact: OR-ing bits that are set changes nothing, whatever userspace does to the word
        // before or after this load.
        // SAFETY: `ptr` points into the array map's value, valid for the program's run.
        unsafe {
            if core::ptr::read_volatile(ptr) & mask != mask {
                atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, mask);
            }
        }
    }
}

#[inline(always)]
fn mark_wide(kind: MarkKind, span: ExtentSpan, epoch: u64) {
    match WIDE.reserve::<WideRange>(0) {
        Some(mut entry) => {
            entry.write(WideRange {
                kind: kind as u32,
                epoch: epoch as u32,
                first_extent: span.first,
                last_extent: span.last,
            });
            entry.submit(0);
            count(Counter::WideRanges, 1);
        }
        None => {
            let lost = match kind {
                MarkKind::Intent | MarkKind::IntentOnly => FLAG_INTENT_LOST,
                MarkKind::Completed => FLAG_COMPLETED_LOST,
            };
            if let Some(ptr) = FLAGS.get_ptr_mut(FLAGS_WORD_LOST) {
                // SAFETY: as in `mark`.
                unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, lost) };
            }
            count(Counter::WideLost, 1);
        }
    }
}

#[inline(always)]
fn count(counter: Counter, n: u64) {
    if let Some(ptr) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU; a nested program on the same CPU may race the add,
        // which can lose a count but never a mark.
        unsafe { *ptr += n };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
