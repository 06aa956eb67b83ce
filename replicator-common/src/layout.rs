//! The tracker's maps and the configuration the kernel program reads from `.rodata`.
//!
//! Bitmap maps are BPF arrays of `u64` words created with `BPF_F_MMAPABLE`, so userspace maps
//! them and drains a word with one atomic swap, no syscall. Bit `b` of word `w` is extent
//! `w * 64 + b`, relative to the start of the tracked device (partition start included).

use crate::extent::ExtentGeometry;

/// `BPF_F_MMAPABLE` from the kernel's uapi: the array can be `mmap`ed by userspace.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Bits in one bitmap word.
pub const WORD_BITS: u64 = 64;

/// Map names, as they appear in the object file and as pin file names in bpffs.
pub const MAP_INTENT: &str = "INTENT";
pub const MAP_COMPLETED: &str = "COMPLETED";
pub const MAP_WIDE: &str = "WIDE";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_FLAGS: &str = "FLAGS";
pub const MAP_META: &str = "META";

/// Bits of the single `FLAGS` word (mmapable, so userspace takes it with one swap): the program
/// sets one when a wide range of that kind did not fit in the ring buffer, and userspace then
/// marks the whole device in that bitmap.
pub const FLAG_INTENT_LOST: u64 = 1 << 0;
pub const FLAG_COMPLETED_LOST: u64 = 1 << 1;

/// Name of the `.rodata` global holding [`TrackerConfig`].
pub const GLOBAL_CONFIG: &str = "CONFIG";

/// The most bitmap words one tracepoint event sets inline. A wider range (a large discard or
/// write-zeroes) goes to the `WIDE` ring buffer instead, so the verifier can walk the program's
/// loop (it walks every iteration: 512 iterations went past its million-instruction limit).
/// 16 words cover 4 MiB at the smallest extent (4 KiB) and 64 MiB at the default 64 KiB, more
/// than a read-write bio usually carries.
pub const EVENT_WORDS_MAX: u32 = 16;

/// Size of the `WIDE` ring buffer. Each record is a [`WideRange`] (24 bytes plus an 8-byte
/// header). When it is full the program sets [`Counter::WideLost`], and userspace then treats the
/// whole device as dirty: a lost range never becomes a missed extent.
pub const WIDE_RING_BYTES: u32 = 256 * 1024;

/// Which of the two bitmaps a mark goes to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkKind {
    /// Set when a write-like bio is queued, before it reaches the device.
    Intent = 0,
    /// Set when a write-like request or bio has completed on the device.
    Completed = 1,
}

/// A range too wide to set inline, handed to userspace through the `WIDE` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WideRange {
    /// [`MarkKind`] as u32.
    pub kind: u32,
    pub _pad: u32,
    pub first_extent: u64,
    pub last_extent: u64,
}

/// Per-CPU counters, indexes into the `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Tracepoint events for the target disk (any direction).
    EventsSeen = 0,
    /// Write-like events that fell in the tracked range.
    WriteEvents = 1,
    /// Extents marked in the intent bitmap (counted per event, so re-marking counts again).
    IntentExtentsMarked = 2,
    /// Extents marked in the completed bitmap.
    CompletedExtentsMarked = 3,
    /// Ranges handed to userspace through the `WIDE` ring buffer.
    WideRanges = 4,
    /// Wide ranges that did not fit in the ring buffer: userspace must treat everything as dirty.
    WideLost = 5,
}

/// Number of per-CPU counters.
pub const COUNTERS_LEN: u32 = 6;

/// Where one tracepoint keeps the fields the program reads, taken from the tracepoint's `format`
/// file at load time (offsets differ between tracepoints and may change between kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldOffsets {
    pub dev: u32,
    pub sector: u32,
    pub nr_sector: u32,
    pub rwbs: u32,
}

/// The configuration the program reads from `.rodata`; set by userspace before load, so the
/// verifier sees constants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerConfig {
    /// The whole disk in the kernel's internal `dev_t` encoding (`major << 20 | minor`), which is
    /// what block tracepoints report, also for writes to a partition.
    pub disk_dev: u32,
    pub _pad: u32,
    pub geometry: ExtentGeometry,
    /// Words in each bitmap map.
    pub bitmap_words: u32,
    pub _pad2: u32,
    /// `block_bio_queue`: intent marks, for every device.
    pub bio_queue: FieldOffsets,
    /// `block_rq_complete`: completion marks for blk-mq devices.
    pub rq_complete: FieldOffsets,
    /// `block_bio_complete`: completion marks for bio-based devices.
    pub bio_complete: FieldOffsets,
}

impl FieldOffsets {
    pub const EMPTY: Self = Self { dev: 0, sector: 0, nr_sector: 0, rwbs: 0 };
}

impl TrackerConfig {
    /// The value compiled into the object; userspace always overrides it before load.
    pub const EMPTY: Self = Self {
        disk_dev: 0,
        _pad: 0,
        geometry: ExtentGeometry { start_sector: 0, nr_sectors: 0, extent_shift: 0, _pad: 0 },
        bitmap_words: 0,
        _pad2: 0,
        bio_queue: FieldOffsets::EMPTY,
        rq_complete: FieldOffsets::EMPTY,
        bio_complete: FieldOffsets::EMPTY,
    };
}

/// Kernel `dev_t` encoding used inside the kernel and by block tracepoints.
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Whether a tracepoint's `rwbs` string describes an operation that can change data.
///
/// The kernel writes the operation first (`W`, `D`, `DE`, `F`, `R`, `N` for write-zeroes and
/// anything else) after an optional `F` for a preflush, then flag letters (`F`, `A`, `S`, `M`),
/// none of which is `R`. So everything that is not a read may write: when unsure, mark. A flush
/// carries no sectors and is filtered by its zero length before this is asked.
#[inline(always)]
pub fn rwbs_may_write(rwbs: &[u8; 8]) -> bool {
    // Unrolled for the verifier: no iterator, no early return into a loop.
    let r = b'R';
    !(rwbs[0] == r || rwbs[1] == r)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], only integer fields and explicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::TrackerConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WideRange {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rwbs_classifies_reads_and_writes() {
        let pad = |s: &[u8]| {
            let mut a = [0u8; 8];
            a[..s.len()].copy_from_slice(s);
            a
        };
        for w in [&b"W"[..], b"WS", b"FWS", b"WFS", b"D", b"DE", b"N", b"NS", b"WM"] {
            assert!(rwbs_may_write(&pad(w)), "{:?}", core::str::from_utf8(w));
        }
        for r in [&b"R"[..], b"RA", b"RS", b"RM", b"FR"] {
            assert!(!rwbs_may_write(&pad(r)), "{:?}", core::str::from_utf8(r));
        }
    }

    #[test]
    fn kernel_dev_matches_tracepoint_encoding() {
        assert_eq!(kernel_dev(7, 0), 0x70_0000);
        assert_eq!(kernel_dev(253, 1), (253 << 20) | 1);
    }
}
