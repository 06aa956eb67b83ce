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
use replicator_common::{ExtentSpan, WORD_BITS};

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

    /// Atomically takes every set bit, ORing it into `out` (bit `i` of word `w` is extent
    /// `w * 64 + i`, as in the kernel). Returns how many words had bits.
    pub fn take_into(&self, out: &mut BitVec<u64, Lsb0>) -> usize {
        let out = out.as_raw_mut_slice();
        assert!(out.len() >= self.words);
        let mut taken_words = 0;
        for (word, out_word) in self.words().iter().zip(out.iter_mut()) {
            // A relaxed load first: most words are zero and need no read-modify-write.
            if word.load(Ordering::Relaxed) != 0 {
                *out_word |= word.swap(0, Ordering::AcqRel);
                taken_words += 1;
            }
        }
        taken_words
    }

    /// Like `take_into`, and ORs every taken word into `also` right after taking it: the
    /// tracker re-marks drained extents in the intent map, so an extent whose intent mark was
    /// cleared while a write to it was in flight is back in the pinned intent log as soon as
    /// that write's completion is drained.
    pub fn take_into_marking(&self, out: &mut BitVec<u64, Lsb0>, also: &SharedBitmap) -> usize {
        let out = out.as_raw_mut_slice();
        assert!(out.len() >= self.words && also.words >= self.words);
        let mut taken_words = 0;
        for ((word, also_word), out_word) in self.words().iter().zip(also.words()).zip(out.iter_mut()) {
            if word.load(Ordering::Relaxed) != 0 {
                let taken = word.swap(0, Ordering::AcqRel);
                also_word.fetch_or(taken, Ordering::AcqRel);
                *out_word |= taken;
                taken_words += 1;
            }
        }
        taken_words
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

/// The runs of set bits of a bitmap, as half-open extent ranges, in ascending order.
pub struct Runs<'a> {
    bits: &'a BitSlice<u64, Lsb0>,
    position: usize,
}

impl<'a> Runs<'a> {
    pub fn new(bits: &'a BitSlice<u64, Lsb0>) -> Self {
        Self { bits, position: 0 }
    }
}

impl Iterator for Runs<'_> {
    type Item = std::ops::Range<u64>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.bits[self.position..];
        let start = self.position + rest.first_one()?;
        let len = self.bits[start..].first_zero().unwrap_or(self.bits.len() - start);
        self.position = start + len;
        Some(start as u64..(start + len) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn runs_cover_exactly_the_set_bits(bits in proptest::collection::vec(any::<bool>(), 0..700)) {
            let bv: BitVec<u64, Lsb0> = bits.iter().copied().collect();
            let mut seen = bitvec![u64, Lsb0; 0; bits.len()];
            let mut last_end = None;
            for run in Runs::new(&bv) {
                prop_assert!(run.start < run.end);
                if let Some(end) = last_end { prop_assert!(run.start > end, "runs are maximal and ordered"); }
                last_end = Some(run.end);
                seen[run.start as usize..run.end as usize].fill(true);
            }
            prop_assert_eq!(seen, bv);
        }
    }
}
