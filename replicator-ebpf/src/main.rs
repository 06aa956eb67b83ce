//! The tracker's kernel half: block-layer tracepoint programs that mark, one bit per extent, what
//! writes to the tracked device touch.
//!
//! Which tracepoints, and why:
//! - **Intent** marks come from `block_bio_queue`. It fires in `submit_bio_noacct_nocheck()` for
//!   every bio on every kind of device (blk-mq and bio-based alike), once per bio, before the bio
//!   reaches the driver and after partition remapping. So a bit is set before any byte of the
//!   write can reach the device, and the sector is absolute on the whole disk.
//! - **Completed** marks come from `block_rq_complete` for blk-mq devices (loop, virtio, nvme):
//!   it fires from `blk_update_request()` with the sectors just completed, once the device is
//!   done, so data read afterwards is at least that new. On blk-mq devices `block_bio_complete`
//!   does not help: the request path clears the bio's trace-completion flag (and has advanced the
//!   bio's iterator). Bio-based devices (zram, and stacking drivers) have no requests; for them
//!   `block_bio_complete` fires from `bio_endio()` with the bio's own range intact. We attach both
//!   completion tracepoints and mark whatever either reports: a device only ever produces one of
//!   them, and a mark set twice is still one bit.
//!
//! What is marked: every event for the target disk whose `rwbs` is not a read and whose length is
//! not zero (writes, discards, secure erase, write-zeroes `N`, and anything unknown). Failed
//! writes are marked too: a failed write may still have changed some of its sectors.
//!
//! Invariant: for every write-like range on the tracked device, each extent it touches has its
//! bit set in the bitmap, or the range has gone to the `WIDE` ring buffer, or `WideLost` counts
//! that userspace must treat everything as dirty. Nothing is ever dropped silently.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_or};

use aya_ebpf::{
    Global,
    macros::{map, tracepoint},
    maps::{Array, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use replicator_common::{
    BPF_F_MMAPABLE, COUNTERS_LEN, Counter, EVENT_WORDS_MAX, ExtentSpan, FLAG_COMPLETED_LOST,
    FLAG_INTENT_LOST, FieldOffsets, MarkKind, TrackerConfig, WIDE_RING_BYTES, WideRange, rwbs_may_write,
};

/// Set by userspace before load (`EbpfLoader::override_global`); read-only to the verifier.
#[unsafe(no_mangle)]
static CONFIG: Global<TrackerConfig> = Global::new(TrackerConfig::EMPTY);

/// One bit per extent, set when a write is queued. Sized by userspace at load time.
#[map]
static INTENT: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// One bit per extent, set when a write has completed. Sized by userspace at load time.
#[map]
static COMPLETED: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// Ranges wider than `EVENT_WORDS_MAX` words, for userspace to merge.
#[map]
static WIDE: RingBuf = RingBuf::pinned(WIDE_RING_BYTES, 0);

/// One word of `FLAG_*` bits; see `replicator_common::layout`.
#[map]
static FLAGS: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// The configuration the pinned maps were made for, written by userspace so that a restart can
/// tell whether the marks it finds belong to the same device and extent size. Unused here.
#[map]
static META: Array<TrackerConfig> = Array::pinned(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);

#[tracepoint]
pub fn replicator_bio_queue(ctx: TracePointContext) -> u32 {
    let config = CONFIG.load();
    match try_mark(&ctx, &config, &config.bio_queue, MarkKind::Intent) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[tracepoint]
pub fn replicator_rq_complete(ctx: TracePointContext) -> u32 {
    let config = CONFIG.load();
    match try_mark(&ctx, &config, &config.rq_complete, MarkKind::Completed) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[tracepoint]
pub fn replicator_bio_complete(ctx: TracePointContext) -> u32 {
    let config = CONFIG.load();
    match try_mark(&ctx, &config, &config.bio_complete, MarkKind::Completed) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[inline(always)]
fn try_mark(
    ctx: &TracePointContext,
    config: &TrackerConfig,
    offsets: &FieldOffsets,
    kind: MarkKind,
) -> Result<(), i32> {
    // SAFETY: the offsets and sizes come from this tracepoint's format file, checked at load.
    let dev: u32 = unsafe { ctx.read_at(offsets.dev as usize)? };
    if dev != config.disk_dev {
        return Ok(());
    }
    count(Counter::EventsSeen, 1);
    // SAFETY: as above.
    let (sector, nr_sector, rwbs) = unsafe {
        let sector: u64 = ctx.read_at(offsets.sector as usize)?;
        let nr_sector: u32 = ctx.read_at(offsets.nr_sector as usize)?;
        let rwbs: [u8; 8] = ctx.read_at(offsets.rwbs as usize)?;
        (sector, nr_sector, rwbs)
    };
    if !rwbs_may_write(&rwbs) {
        return Ok(());
    }
    let Some(span) = config.geometry.span(sector, u64::from(nr_sector)) else {
        return Ok(());
    };
    count(Counter::WriteEvents, 1);
    mark(kind, span);
    Ok(())
}

#[inline(always)]
fn mark(kind: MarkKind, span: ExtentSpan) {
    let words = span.last_word() - span.first_word() + 1;
    if words > u64::from(EVENT_WORDS_MAX) {
        mark_wide(kind, span);
        return;
    }
    let bitmap = match kind {
        MarkKind::Intent => &INTENT,
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
        if let Some(ptr) = bitmap.get_ptr_mut(word as u32) {
            // SAFETY: `ptr` points into the array map's value, valid for the program's run.
            unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, span.word_mask(word)) };
        }
    }
    let counter = match kind {
        MarkKind::Intent => Counter::IntentExtentsMarked,
        MarkKind::Completed => Counter::CompletedExtentsMarked,
    };
    count(counter, span.count());
}

#[inline(always)]
fn mark_wide(kind: MarkKind, span: ExtentSpan) {
    match WIDE.reserve::<WideRange>(0) {
        Some(mut entry) => {
            entry.write(WideRange {
                kind: kind as u32,
                _pad: 0,
                first_extent: span.first,
                last_extent: span.last,
            });
            entry.submit(0);
            count(Counter::WideRanges, 1);
        }
        None => {
            let lost = match kind {
                MarkKind::Intent => FLAG_INTENT_LOST,
                MarkKind::Completed => FLAG_COMPLETED_LOST,
            };
            if let Some(ptr) = FLAGS.get_ptr_mut(0) {
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
