//! A set of extents that a loop turn can afford to ask about on a large device.
//!
//! Owns one bit per extent and a summary bit per 64-extent word of them. The engine asks its
//! sets "anything pending?", "the next pending extent from here?" and "which runs?" on every
//! turn of its loop; on a 1 TiB device at 64 KiB extents a plain bitmap is 2 MiB, and a few
//! whole passes per turn cost milliseconds. With the summary the first costs nothing (a count),
//! and the others skip empty words 64 at a time (32 KiB of summary at 1 TiB).
//!
//! Invariants (checked by `check` in the property test below, and asserted where cheap):
//! - summary bit `w` is set exactly when word `w` of the extent bits is not zero;
//! - `ones` is the number of extent bits set.
//!
//! Written by hand over `bitvec`: bitvec has no hierarchical bitmap, and the crates that do
//! (e.g. `hibitset`) are sized for entity ids, without the range fills and run iteration a
//! block device needs.

use std::ops::Range;

use bitvec::prelude::*;

const WORD_BITS: usize = 64;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentSet {
    bits: BitVec<u64, Lsb0>,
    /// One bit per word of `bits`: set when that word has a bit set.
    summary: BitVec<u64, Lsb0>,
    ones: usize,
}

impl ExtentSet {
    /// An empty set over `extents` extents.
    pub fn new(extents: usize) -> Self {
        Self {
            bits: bitvec![u64, Lsb0; 0; extents],
            summary: bitvec![u64, Lsb0; 0; extents.div_ceil(WORD_BITS)],
            ones: 0,
        }
    }

    /// The set holding exactly the bits of `bits`.
    pub fn from_bits(bits: &BitSlice<u64, Lsb0>) -> Self {
        let mut set = Self::new(bits.len());
        set.union_bits(bits);
        set
    }

    pub fn len(&self) -> usize {
        self.bits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// Extents in the set.
    pub fn count(&self) -> usize {
        self.ones
    }

    pub fn any(&self) -> bool {
        self.ones > 0
    }

    pub fn not_any(&self) -> bool {
        self.ones == 0
    }

    pub fn contains(&self, extent: usize) -> bool {
        self.bits[extent]
    }

    /// The extent bits, read-only (to persist, compare or copy them).
    pub fn bits(&self) -> &BitSlice<u64, Lsb0> {
        &self.bits
    }

    /// Whether any extent of `range` is in the set.
    pub fn any_in(&self, range: Range<usize>) -> bool {
        self.ones > 0 && self.bits[range].any()
    }

    pub fn insert_range(&mut self, range: Range<usize>) {
        self.fill_range(range, true);
    }

    pub fn remove_range(&mut self, range: Range<usize>) {
        self.fill_range(range, false);
    }

    pub fn set(&mut self, extent: usize, value: bool) {
        self.fill_range(extent..extent + 1, value);
    }

    fn fill_range(&mut self, range: Range<usize>, value: bool) {
        if range.is_empty() {
            return;
        }
        let slice = &mut self.bits[range.clone()];
        let before = slice.count_ones();
        slice.fill(value);
        let after = if value { range.len() } else { 0 };
        self.ones = self.ones + after - before;
        for word in range.start / WORD_BITS..=(range.end - 1) / WORD_BITS {
            self.refresh_summary(word);
        }
    }

    fn refresh_summary(&mut self, word: usize) {
        let nonzero = self.bits.as_raw_slice()[word] != 0;
        self.summary.set(word, nonzero);
    }

    /// Every extent in the set.
    pub fn insert_all(&mut self) {
        let len = self.len();
        self.fill_range(0..len, true);
    }

    /// Empties the set, touching only the words that hold something.
    pub fn clear(&mut self) {
        if self.ones == 0 {
            return;
        }
        let (bits, summary) = (self.bits.as_raw_mut_slice(), self.summary.as_raw_mut_slice());
        for (group, summary_word) in summary.iter_mut().enumerate() {
            let mut nonzero = std::mem::take(summary_word);
            while nonzero != 0 {
                bits[group * WORD_BITS + nonzero.trailing_zeros() as usize] = 0;
                nonzero &= nonzero - 1;
            }
        }
        self.ones = 0;
    }

    /// Adds every extent set in `bits` (as long as the set).
    pub fn union_bits(&mut self, bits: &BitSlice<u64, Lsb0>) {
        assert_eq!(bits.len(), self.len(), "one bit per extent");
        *self.bits |= bits;
        self.rebuild_summary();
    }

    /// Adds the set bits of `word` to word `index` (bit `i` is extent `index * 64 + i`).
    pub fn union_word(&mut self, index: usize, word: u64) {
        let old = self.bits.as_raw_slice()[index];
        let new = old | word;
        if new != old {
            assert!(
                index * WORD_BITS + (WORD_BITS - new.leading_zeros() as usize) <= self.len(),
                "bits beyond the set's last extent"
            );
            self.bits.as_raw_mut_slice()[index] = new;
            self.ones += (new.count_ones() - old.count_ones()) as usize;
            self.summary.set(index, true);
        }
    }

    /// Keeps only the bits of word `index` that are set in `mask`; returns what it removed.
    pub fn retain_word(&mut self, index: usize, mask: u64) -> u64 {
        let old = self.bits.as_raw_slice()[index];
        let removed = old & !mask;
        if removed != 0 {
            self.bits.as_raw_mut_slice()[index] = old & mask;
            self.ones -= removed.count_ones() as usize;
            self.refresh_summary(index);
        }
        removed
    }

    /// Word `index` of the extent bits.
    pub fn word(&self, index: usize) -> u64 {
        self.bits.as_raw_slice()[index]
    }

    /// The words that hold something, ascending, with their bits.
    pub fn nonzero_words(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.summary.iter_ones().map(|word| (word, self.word(word)))
    }

    /// Keeps, of each word that holds something, the bits set in `keep(index, bits)`.
    pub fn retain_words(&mut self, mut keep: impl FnMut(usize, u64) -> u64) {
        if self.ones == 0 {
            return;
        }
        for group in 0..self.summary.as_raw_slice().len() {
            // A copy of the summary word: `retain_word` may clear its bits as we go.
            let mut named = self.summary.as_raw_slice()[group];
            while named != 0 {
                let word = group * WORD_BITS + named.trailing_zeros() as usize;
                named &= named - 1;
                let mask = keep(word, self.word(word));
                self.retain_word(word, mask);
            }
        }
    }

    /// Adds every extent of `other` (as long as the set), touching only its words that hold
    /// something.
    pub fn union(&mut self, other: &ExtentSet) {
        assert_eq!(other.len(), self.len(), "one bit per extent");
        for (word, bits) in other.nonzero_words() {
            self.union_word(word, bits);
        }
    }

    fn rebuild_summary(&mut self) {
        self.ones = self.bits.count_ones();
        for (word, bits) in self.bits.as_raw_slice().iter().enumerate() {
            self.summary.set(word, *bits != 0);
        }
    }

    /// The first extent in the set at or after `from`.
    pub fn first_from(&self, from: usize) -> Option<usize> {
        if self.ones == 0 || from >= self.len() {
            return None;
        }
        let word = from / WORD_BITS;
        let here = self.bits.as_raw_slice()[word] >> (from % WORD_BITS);
        if here != 0 {
            return Some(from + here.trailing_zeros() as usize);
        }
        let next_word = word + 1 + self.summary[word + 1..].first_one()?;
        Some(next_word * WORD_BITS + self.bits.as_raw_slice()[next_word].trailing_zeros() as usize)
    }

    /// The maximal runs of extents in the set, ascending, as half-open ranges.
    pub fn runs(&self) -> Runs<'_> {
        Runs { set: self, position: 0 }
    }

    #[cfg(test)]
    fn check(&self) {
        assert_eq!(self.ones, self.bits.count_ones(), "count");
        for (word, bits) in self.bits.as_raw_slice().iter().enumerate() {
            assert_eq!(self.summary[word], *bits != 0, "summary of word {word}");
        }
    }
}

pub struct Runs<'a> {
    set: &'a ExtentSet,
    position: usize,
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.set.first_from(self.position)?;
        let len = self.set.bits[start..].first_zero().unwrap_or(self.set.len() - start);
        self.position = start + len;
        Some(start as u64..(start + len) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Change {
        Insert(Range<usize>),
        Remove(Range<usize>),
        UnionWord(usize, u64),
        RetainWord(usize, u64),
        /// `retain_words` keeping `seed` rotated by the word's index in each word.
        RetainWords(u64),
        Clear,
    }

    fn change(len: usize) -> impl Strategy<Value = Change> {
        let range = (0..len, 0..len).prop_map(|(a, b)| a.min(b)..a.max(b));
        let words = len.div_ceil(WORD_BITS);
        prop_oneof![
            4 => range.clone().prop_map(Change::Insert),
            4 => range.prop_map(Change::Remove),
            2 => (0..words, any::<u64>()).prop_map(move |(w, bits)| {
                let valid = len - w * WORD_BITS;
                Change::UnionWord(w, if valid >= WORD_BITS { bits } else { bits & ((1 << valid) - 1) })
            }),
            2 => (0..words, any::<u64>()).prop_map(|(w, mask)| Change::RetainWord(w, mask)),
            1 => any::<u64>().prop_map(Change::RetainWords),
            1 => Just(Change::Clear),
        ]
    }

    proptest! {
        /// Any sequence of changes leaves the set equal to a plain bitmap changed the same way,
        /// with its summary and count exact; `first_from` and `runs` agree with the plain one.
        #[test]
        fn behaves_as_a_plain_bitmap(
            (len, changes, probes) in (1usize..400).prop_flat_map(|len| (
                Just(len),
                proptest::collection::vec(change(len), 0..40),
                proptest::collection::vec(0..len, 0..10),
            ))
        ) {
            let mut set = ExtentSet::new(len);
            let mut plain = bitvec![u64, Lsb0; 0; len];
            for change in changes {
                match change {
                    Change::Insert(r) => { set.insert_range(r.clone()); plain[r].fill(true); }
                    Change::Remove(r) => { set.remove_range(r.clone()); plain[r].fill(false); }
                    Change::UnionWord(w, bits) => { set.union_word(w, bits); plain.as_raw_mut_slice()[w] |= bits; }
                    Change::RetainWord(w, mask) => {
                        let removed = set.retain_word(w, mask);
                        prop_assert_eq!(removed, plain.as_raw_slice()[w] & !mask);
                        plain.as_raw_mut_slice()[w] &= mask;
                    }
                    Change::RetainWords(seed) => {
                        set.retain_words(|w, _| seed.rotate_left(w as u32));
                        for (w, bits) in plain.as_raw_mut_slice().iter_mut().enumerate() {
                            *bits &= seed.rotate_left(w as u32);
                        }
                    }
                    Change::Clear => { set.clear(); plain.fill(false); }
                }
                set.check();
                prop_assert_eq!(set.bits(), plain.as_bitslice());
            }
            for from in probes {
                prop_assert_eq!(set.first_from(from), plain[from..].first_one().map(|o| from + o));
            }
            let runs: Vec<_> = set.runs().collect();
            let mut plain_runs: Vec<Range<u64>> = Vec::new();
            for extent in plain.iter_ones() {
                match plain_runs.last_mut() {
                    Some(run) if run.end == extent as u64 => run.end += 1,
                    _ => plain_runs.push(extent as u64..extent as u64 + 1),
                }
            }
            prop_assert_eq!(runs, plain_runs);
            prop_assert_eq!(&ExtentSet::from_bits(&plain), &set);
            let mut copy = ExtentSet::new(len);
            copy.union(&set);
            prop_assert_eq!(copy, set);
        }
    }
}
