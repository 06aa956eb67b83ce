//! Extent arithmetic: from a sector range on the whole disk to the extents of the tracked device.
//!
//! The tracked device may be a partition: block tracepoints report the whole disk and absolute
//! sectors, so a range is first clipped to `[start_sector, start_sector + nr_sectors)` and then
//! made relative. Extent `e` covers device sectors `[e << extent_shift, (e + 1) << extent_shift)`,
//! the last extent possibly short. Invariant: a sector range that touches a byte of extent `e`
//! yields a span containing `e`, and no span reaches past the device's last extent.

use crate::layout::WORD_BITS;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_BYTES: u64 = 1 << SECTOR_SHIFT;

/// Smallest and largest extent sizes, as log2 of bytes (4 KiB and 64 MiB).
pub const EXTENT_BYTES_SHIFT_MIN: u32 = 12;
pub const EXTENT_BYTES_SHIFT_MAX: u32 = 26;
/// The default extent size, 64 KiB.
pub const EXTENT_BYTES_DEFAULT: u64 = 64 * 1024;

/// The one rule for an extent size: a power of two from 4 KiB to 64 MiB (userspace wraps it in
/// `replicator::model::ExtentBytes`).
pub const fn extent_bytes_valid(extent_bytes: u64) -> bool {
    extent_bytes.is_power_of_two()
        && extent_bytes.trailing_zeros() >= EXTENT_BYTES_SHIFT_MIN
        && extent_bytes.trailing_zeros() <= EXTENT_BYTES_SHIFT_MAX
}

/// The tracked device as the kernel program sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtentGeometry {
    /// First sector of the tracked device on its disk (0 for a whole disk).
    pub start_sector: u64,
    /// Length of the tracked device in sectors.
    pub nr_sectors: u64,
    /// log2 of sectors per extent.
    pub extent_shift: u32,
    pub _pad: u32,
}

/// An inclusive run of extents, `first <= last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentSpan {
    pub first: u64,
    pub last: u64,
}

impl ExtentSpan {
    pub fn count(&self) -> u64 {
        self.last - self.first + 1
    }

    pub fn first_word(&self) -> u64 {
        self.first / WORD_BITS
    }

    pub fn last_word(&self) -> u64 {
        self.last / WORD_BITS
    }

    /// The bits of bitmap word `word` that this span covers (0 when it covers none).
    #[inline(always)]
    pub fn word_mask(&self, word: u64) -> u64 {
        let word_first = word * WORD_BITS;
        let word_last = word_first + WORD_BITS - 1;
        if self.last < word_first || self.first > word_last {
            return 0;
        }
        let lo = self.first.saturating_sub(word_first);
        let hi = if self.last < word_last { self.last - word_first } else { WORD_BITS - 1 };
        // Bits lo..=hi. `u64::MAX >> (63 - (hi - lo))` has hi - lo + 1 low bits set.
        (u64::MAX >> (WORD_BITS - 1 - (hi - lo))) << lo
    }
}

impl ExtentGeometry {
    /// `None` when `extent_bytes` is not a power of two between 4 KiB and 64 MiB.
    pub fn new(start_sector: u64, nr_sectors: u64, extent_bytes: u64) -> Option<Self> {
        if !extent_bytes_valid(extent_bytes) {
            return None;
        }
        let shift_bytes = extent_bytes.trailing_zeros();
        if nr_sectors == 0 || start_sector.checked_add(nr_sectors).is_none() {
            return None;
        }
        Some(Self { start_sector, nr_sectors, extent_shift: shift_bytes - SECTOR_SHIFT, _pad: 0 })
    }

    pub fn extent_sectors(&self) -> u64 {
        1 << self.extent_shift
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_sectors() * SECTOR_BYTES
    }

    pub fn device_bytes(&self) -> u64 {
        self.nr_sectors * SECTOR_BYTES
    }

    /// Extents on the device; the last may be shorter than `extent_bytes`.
    pub fn extent_count(&self) -> u64 {
        self.nr_sectors.div_ceil(self.extent_sectors())
    }

    /// Bitmap words needed to hold one bit per extent.
    pub fn bitmap_words(&self) -> u64 {
        self.extent_count().div_ceil(WORD_BITS)
    }

    /// The extents touched by `nr_sectors` sectors from absolute disk sector `sector`, clipped to
    /// the tracked device; `None` when the range is empty or lies outside it.
    #[inline(always)]
    pub fn span(&self, sector: u64, nr_sectors: u64) -> Option<ExtentSpan> {
        if nr_sectors == 0 {
            return None;
        }
        let device_end = self.start_sector + self.nr_sectors;
        let end = sector.saturating_add(nr_sectors);
        if end <= self.start_sector || sector >= device_end {
            return None;
        }
        let first_sector = if sector > self.start_sector { sector } else { self.start_sector };
        let last_sector = if end < device_end { end } else { device_end } - 1;
        Some(ExtentSpan {
            first: (first_sector - self.start_sector) >> self.extent_shift,
            last: (last_sector - self.start_sector) >> self.extent_shift,
        })
    }

    /// Byte offset and length of extent `extent` on the tracked device (the last one may be short).
    pub fn extent_byte_range(&self, extent: u64) -> (u64, u64) {
        debug_assert!(extent < self.extent_count());
        let offset = extent * self.extent_bytes();
        let len = core::cmp::min(self.extent_bytes(), self.device_bytes() - offset);
        (offset, len)
    }

    /// The extents covering device bytes `[offset_bytes, offset_bytes + len_bytes)`.
    pub fn span_of_bytes(&self, offset_bytes: u64, len_bytes: u64) -> Option<ExtentSpan> {
        let first_sector = offset_bytes / SECTOR_BYTES;
        let end_sector = (offset_bytes + len_bytes).div_ceil(SECTOR_BYTES);
        self.span(self.start_sector + first_sector, end_sector - first_sector)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;

    fn geometry() -> impl Strategy<Value = ExtentGeometry> {
        (0u64..1 << 30, 1u64..1 << 24, 12u32..=26).prop_map(|(start, len, shift)| {
            ExtentGeometry::new(start, len, 1 << shift).expect("valid geometry")
        })
    }

    #[test]
    fn rejects_bad_extent_sizes() {
        assert!(ExtentGeometry::new(0, 8, 4096).is_some());
        assert!(ExtentGeometry::new(0, 8, 64 << 20).is_some());
        assert!(ExtentGeometry::new(0, 8, 2048).is_none());
        assert!(ExtentGeometry::new(0, 8, 128 << 20).is_none());
        assert!(ExtentGeometry::new(0, 8, 65536 + 4096).is_none());
        assert!(ExtentGeometry::new(0, 0, 65536).is_none());
    }

    #[test]
    fn partition_offsets_are_relative() {
        // A partition at sector 2048 (1 MiB), 64 KiB extents (128 sectors).
        let g = ExtentGeometry::new(2048, 4096, 65536).unwrap();
        assert_eq!(g.span(2048, 1), Some(ExtentSpan { first: 0, last: 0 }));
        assert_eq!(g.span(2048 + 127, 2), Some(ExtentSpan { first: 0, last: 1 }));
        assert_eq!(g.span(0, 2048), None, "the sibling before must not mark");
        assert_eq!(g.span(2048 + 4096, 8), None, "the sibling after must not mark");
        assert_eq!(g.span(2040, 16), Some(ExtentSpan { first: 0, last: 0 }), "clipped at start");
        assert_eq!(g.span(u64::MAX, 0), None, "a flush carries no sectors");
        assert_eq!(g.span(u64::MAX - 1, 8), None);
    }

    proptest! {
        /// Every sector of the range that lies on the device falls in the span, and the span
        /// reaches no extent that the range does not touch.
        #[test]
        fn span_is_exact(g in geometry(), off in 0u64..1 << 31, len in 0u64..1 << 16) {
            let sector = g.start_sector.saturating_sub(1 << 10) + off;
            let span = g.span(sector, len);
            let dev_end = g.start_sector + g.nr_sectors;
            let lo = sector.max(g.start_sector);
            let hi = (sector + len).min(dev_end);
            if lo >= hi {
                prop_assert!(span.is_none());
            } else {
                let span = span.expect("overlapping range has a span");
                prop_assert_eq!(span.first, (lo - g.start_sector) >> g.extent_shift);
                prop_assert_eq!(span.last, (hi - 1 - g.start_sector) >> g.extent_shift);
                prop_assert!(span.last < g.extent_count());
            }
        }

        /// The word masks of a span set exactly the span's bits, and nothing in other words.
        #[test]
        fn word_masks_cover_span(first in 0u64..4096, count in 1u64..1024) {
            let span = ExtentSpan { first, last: first + count - 1 };
            let mut total = 0u64;
            for word in span.first_word().saturating_sub(1)..=span.last_word() + 1 {
                let mask = span.word_mask(word);
                total += u64::from(mask.count_ones());
                for bit in 0..64 {
                    let extent = word * 64 + bit;
                    let inside = extent >= span.first && extent <= span.last;
                    prop_assert_eq!(mask >> bit & 1 == 1, inside);
                }
            }
            prop_assert_eq!(total, span.count());
        }

        /// Byte ranges map to the extents that hold their bytes.
        #[test]
        fn byte_ranges_round_trip(g in geometry(), extent_frac in 0.0f64..1.0) {
            let extent = ((g.extent_count() - 1) as f64 * extent_frac) as u64;
            let (offset, len) = g.extent_byte_range(extent);
            prop_assert!(len > 0 && len <= g.extent_bytes());
            prop_assert_eq!(g.span_of_bytes(offset, len), Some(ExtentSpan { first: extent, last: extent }));
            prop_assert_eq!(g.bitmap_words(), g.extent_count().div_ceil(64));
        }
    }
}
