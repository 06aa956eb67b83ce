//! A tracker bitmap as userspace sees it: the BPF array map's words, `mmap`ed shared with the
//! kernel program, no copy and no syscall per access.
//!
//! Owns the mapping (unmapped on drop). Invariant: userspace only ever changes a word with an
//! atomic read-modify-write (`swap`, `fetch_or`), because the program sets bits in the same words
//! at any moment; a plain store could erase a bit the program just set.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use bitvec::prelude::*;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use replicator_common::{ExtentSpan, WORD_BITS, summary_map_words, summary_words};

use crate::extent_set::ExtentSet;

pub struct SharedBitmap {
    base: NonNull<AtomicU64>,
    words: usize,
    mapped_bytes: NonZeroUsize,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for SharedBitmap {}
// SAFETY: as above.
unsafe impl Sync for SharedBitmap {}

impl SharedBitmap {
    /// Maps the first `words` words of the mmapable array map behind `fd`.
    pub fn map(fd: BorrowedFd<'_>, words: usize) -> nix::Result<Self> {
        assert!(words > 0, "a tracker bitmap has at least one word");
        let page_bytes = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as usize);
        let bytes = (words * size_of::<u64>()).next_multiple_of(page_bytes);
        let mapped_bytes = NonZeroUsize::new(bytes).expect("words > 0");
        // SAFETY: a fresh shared mapping of the map's value area; the kernel keeps the pages
        // alive while mapped, even after the map's fd is closed.
        let base = unsafe {
            mmap(
                None,
                mapped_bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )?
        };
        Ok(Self { base: base.cast(), words, mapped_bytes })
    }

    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: `base` maps at least `words` u64s for the lifetime of `self`, aligned to a page.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.words) }
    }

    /// Clears the bits set in `bits` (one atomic AND per word that has any).
    pub fn clear_bits(&self, bits: &BitSlice<u64, Lsb0>) {
        for (word, clear) in self.words().iter().zip(bits.chunks(64)) {
            let mask = clear.load_le::<u64>();
            if mask != 0 {
                word.fetch_and(!mask, Ordering::AcqRel);
            }
        }
    }

    /// Sets the bits set in `bits`.
    pub fn set_bits(&self, bits: &BitSlice<u64, Lsb0>) {
        for (word, set) in self.words().iter().zip(bits.chunks(64)) {
            let mask = set.load_le::<u64>();
            if mask != 0 {
                word.fetch_or(mask, Ordering::AcqRel);
            }
        }
    }

    /// Copies the bits without clearing them.
    pub fn copy_into(&self, out: &mut BitVec<u64, Lsb0>) {
        let out = out.as_raw_mut_slice();
        assert!(out.len() >= self.words);
        for (word, out_word) in self.words().iter().zip(out.iter_mut()) {
            *out_word |= word.load(Ordering::Acquire);
        }
    }

    /// Sets the bits of `span`, as the kernel program would.
    pub fn set_span(&self, span: ExtentSpan) {
        assert!(span.last_word() < self.words as u64, "span {span:?} beyond the bitmap");
        for word in span.first_word()..=span.last_word() {
            self.words()[word as usize].fetch_or(span.word_mask(word), Ordering::AcqRel);
        }
    }

    /// Clears the bits of `span` (one atomic AND per word it covers).
    pub fn clear_span(&self, span: ExtentSpan) {
        assert!(span.last_word() < self.words as u64, "span {span:?} beyond the bitmap");
        for word in span.first_word()..=span.last_word() {
            self.words()[word as usize].fetch_and(!span.word_mask(word), Ordering::AcqRel);
        }
    }

    /// Sets the bits of every extent on the device (`extent_count` bits).
    pub fn set_all(&self, extent_count: u64) {
        assert!(extent_count.div_ceil(WORD_BITS) <= self.words as u64);
        if extent_count > 0 {
            self.set_span(ExtentSpan { first: 0, last: extent_count - 1 });
        }
    }
}

impl Drop for SharedBitmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no reference into it outlives `self`.
        if let Err(err) = unsafe { munmap(self.base.cast(), self.mapped_bytes.get()) } {
            tracing::warn!(%err, "munmap of a tracker bitmap failed");
        }
    }
}

/// A kernel bitmap and its two-level summary map (see `replicator_common::MAP_QUEUED_SUMMARY`):
/// the first `first_words` words of `summary` name bitmap words, the rest name summary words.
pub struct Summarized {
    pub bits: SharedBitmap,
    summary: SharedBitmap,
    first_words: usize,
    /// The next word a partial sweep takes (see `Sweep::Words`).
    sweep_next: usize,
}

/// What a take sweeps besides the words the summaries name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    Nothing,
    /// The next this many words, round robin, so that sweeps spread over drains cover every
    /// word without a pause as long as a whole pass.
    Words(usize),
    /// Every word (and the summaries are cleared).
    All,
}

impl Summarized {
    pub fn new(bits: SharedBitmap, summary: SharedBitmap) -> Self {
        let bitmap_words = u32::try_from(bits.words).expect("map sizes are u32");
        let first_words = summary_words(bitmap_words) as usize;
        assert_eq!(summary.words, summary_map_words(bitmap_words) as usize, "summary map size");
        Self { bits, summary, first_words, sweep_next: 0 }
    }

    /// Atomically takes the set bits of the words the summary names and of those `sweep`
    /// adds, ORing them into `out` and, if given, into `also` right after taking them (the
    /// tracker re-marks drained completions in the intent map). Top down: a summary word is
    /// taken before the words it names, so a bit set after its word was taken has its summary
    /// bits set again. Bits past the set's last extent are dropped (the program never sets them).
    pub fn take_into(&mut self, out: &mut ExtentSet, also: Option<&SharedBitmap>, sweep: Sweep) {
        let all = sweep == Sweep::All;
        let (first, top) = self.summary.words().split_at(self.first_words);
        for (top_index, top_word) in top.iter().enumerate() {
            let mut named = take(top_word);
            if all {
                named = u64::MAX;
            }
            for_each_bit(named, top_index, first.len(), |summary_index| {
                let mut named = take(&first[summary_index]);
                if all {
                    named = u64::MAX;
                }
                for_each_bit(named, summary_index, self.bits.words, |word| self.take_word(word, out, also));
            });
        }
        if let Sweep::Words(count) = sweep {
            for _ in 0..count.min(self.bits.words) {
                self.take_word(self.sweep_next, out, also);
                self.sweep_next = (self.sweep_next + 1) % self.bits.words;
            }
        }
    }

    fn take_word(&self, word: usize, out: &mut ExtentSet, also: Option<&SharedBitmap>) {
        let taken = take(&self.bits.words()[word]);
        if taken == 0 {
            return;
        }
        if let Some(also) = also {
            also.words()[word].fetch_or(taken, Ordering::AcqRel);
        }
        let valid_bits = out.len().saturating_sub(word * 64).min(64);
        let valid_mask = if valid_bits == 64 { u64::MAX } else { (1u64 << valid_bits) - 1 };
        out.union_word(word, taken & valid_mask);
    }

    /// Sets the bits of `span` and the summary bits above them, as the program does.
    pub fn set_span(&self, span: ExtentSpan) {
        self.bits.set_span(span);
        let first = ExtentSpan { first: span.first_word(), last: span.last_word() };
        self.summary.set_span(first);
        // The top level's bits, as bit positions in the summary map: after its first level.
        let top = self.first_words as u64 * WORD_BITS;
        self.summary.set_span(ExtentSpan { first: top + first.first_word(), last: top + first.last_word() });
    }

    /// Sets every extent's bit (`extent_count` bits) and the summary bits above them.
    pub fn set_all(&self, extent_count: u64) {
        if extent_count > 0 {
            self.set_span(ExtentSpan { first: 0, last: extent_count - 1 });
        }
    }
}

/// Atomically takes a word's bits (a relaxed load first: most words are zero and need no
/// read-modify-write).
fn take(word: &AtomicU64) -> u64 {
    if word.load(Ordering::Relaxed) == 0 { 0 } else { word.swap(0, Ordering::AcqRel) }
}

/// Calls `each` with `group * 64 + bit` for every set bit of `bits` under `limit`.
fn for_each_bit(mut bits: u64, group: usize, limit: usize, mut each: impl FnMut(usize)) {
    while bits != 0 {
        let index = group * WORD_BITS as usize + bits.trailing_zeros() as usize;
        bits &= bits - 1;
        if index >= limit {
            break;
        }
        each(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::fd::AsFd as _;

    /// A bitmap of `words` words in an anonymous shared mapping, standing in for a map's.
    fn anonymous(words: usize) -> SharedBitmap {
        let fd = nix::sys::memfd::memfd_create("bitmap", nix::sys::memfd::MFdFlags::empty()).expect("memfd");
        nix::unistd::ftruncate(&fd, (words * 8).next_multiple_of(4096) as i64).expect("ftruncate");
        SharedBitmap::map(fd.as_fd(), words).expect("mmap")
    }

    proptest! {
        /// Spans set the way the program sets them are all found by takes that follow only the
        /// summaries, whatever their size and place, and a take leaves nothing behind.
        #[test]
        fn summaries_lead_to_every_span(
            (extents, spans) in (1u64..300_000).prop_flat_map(|extents| (
                Just(extents),
                proptest::collection::vec((0..extents, 0..extents), 1..6),
            ))
        ) {
            let words = extents.div_ceil(WORD_BITS) as usize;
            let mut map = Summarized::new(anonymous(words), anonymous(summary_map_words(words as u32) as usize));
            let mut expected = ExtentSet::new(extents as usize);
            for (a, b) in spans {
                let span = ExtentSpan { first: a.min(b), last: a.max(b) };
                map.set_span(span);
                expected.insert_range(span.first as usize..span.last as usize + 1);
            }
            let mut taken = ExtentSet::new(extents as usize);
            map.take_into(&mut taken, None, Sweep::Nothing);
            prop_assert_eq!(taken.bits(), expected.bits());
            let mut again = ExtentSet::new(extents as usize);
            map.take_into(&mut again, None, Sweep::All);
            prop_assert!(again.not_any(), "the take left bits behind");
        }

        /// Bits set with no summary bit above them (an older program's) are found by partial
        /// sweeps within one pass of `words / chunk` takes.
        #[test]
        fn partial_sweeps_find_unsummarized_bits(
            (extents, set, chunk) in (1u64..20_000).prop_flat_map(|extents| (
                Just(extents),
                proptest::collection::vec(0..extents, 1..20),
                1usize..50,
            ))
        ) {
            let words = extents.div_ceil(WORD_BITS) as usize;
            let mut map = Summarized::new(anonymous(words), anonymous(summary_map_words(words as u32) as usize));
            let mut expected = ExtentSet::new(extents as usize);
            for &extent in &set {
                map.bits.set_span(ExtentSpan { first: extent, last: extent });
                expected.set(extent as usize, true);
            }
            let mut taken = ExtentSet::new(extents as usize);
            for _ in 0..words.div_ceil(chunk) {
                map.take_into(&mut taken, None, Sweep::Words(chunk));
            }
            prop_assert_eq!(taken.bits(), expected.bits());
        }
    }
}
