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

/// Words of the first summary level for a bitmap of `bitmap_words` words.
pub const fn summary_words(bitmap_words: u32) -> u32 {
    bitmap_words.div_ceil(WORD_BITS as u32)
}

/// Words of a summary map (both levels) for a bitmap of `bitmap_words` words.
pub const fn summary_map_words(bitmap_words: u32) -> u32 {
    let first = summary_words(bitmap_words);
    first + first.div_ceil(WORD_BITS as u32)
}

/// Map names, as they appear in the object file and as pin file names in bpffs.
pub const MAP_INTENT: &str = "INTENT";
pub const MAP_COMPLETED: &str = "COMPLETED";
/// Set with intent when a write is queued, and taken by userspace every drain: each queued
/// extent must see its completion drained soon after, or userspace ships it anyway (a
/// completion the kernel did not trace must not become a lost write).
pub const MAP_QUEUED: &str = "QUEUED";
/// Summaries of `QUEUED` and `COMPLETED`, two levels in one map: in the first
/// `summary_words(bitmap_words)` words, bit `s` of word `v` stands for word `v * 64 + s` of the
/// bitmap; in the words after them, bit `t` of word `u` stands for summary word `u * 64 + t`.
/// The program sets a bit before the summary bits above it (each only when clear: a hot
/// extent's summaries cost two plain loads), so userspace takes only the words the top level
/// names: a drain costs what changed, not the size of the device (64 top words at 1 TiB).
/// Userspace still sweeps every word, spread over its drains, which finds bits set before the
/// summaries existed (maps pinned by an older program) and any whose summary bit a weakly
/// ordered CPU made visible first.
pub const MAP_QUEUED_SUMMARY: &str = "QUEUED_SUM";
pub const MAP_COMPLETED_SUMMARY: &str = "COMPLETED_SUM";
pub const MAP_WIDE: &str = "WIDE";
/// The epoch bitmaps of consistent cuts: one bit per extent, set when a write (not the exempt
/// writer's) is queued during an epoch of that parity (`EPOCH`'s low bit). Userspace takes the
/// closed epoch's bitmap when it starts the next one: what was written before the cut; and
/// tests the open epoch's: what was written since.
pub const MAP_WRITTEN: [&str; 2] = ["WRITTEN0", "WRITTEN1"];
/// Two words: the current epoch, written by userspace only (see `MAP_WRITTEN`); and bit
/// `epoch & 1` set with any mark in that epoch's bitmap, so "anything written this epoch?" is
/// one load.
pub const MAP_EPOCH: &str = "EPOCH";
pub const EPOCH_WORDS: u32 = 2;
pub const EPOCH_WORD_EPOCH: u32 = 0;
pub const EPOCH_WORD_ANY: u32 = 1;
/// Per CPU, one counter: programs between reading `EPOCH` and their last epoch mark. Userspace,
/// having started a new epoch, waits until every CPU's is 0: from then on no mark of the old
/// epoch is still to come, and its bitmap is complete.
pub const MAP_ACTIVE: &str = "ACTIVE";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_FLAGS: &str = "FLAGS";
pub const MAP_META: &str = "META";

/// Words of the `FLAGS` map (mmapable, so userspace reads and takes them with one atomic each).
pub const FLAGS_WORDS: u32 = 2;
/// Word 0 holds lost-range bits: the program sets one when a wide range of that kind did not fit
/// in the ring buffer, and userspace then marks the whole device in that bitmap.
pub const FLAGS_WORD_LOST: u32 = 0;
/// Word 1 holds the thread-group id of a process whose writes need no shipping (0 for none):
/// the NBD export writes the primary device and ships those writes itself, so the program marks
/// them in INTENT (the crash-safety log) but not in QUEUED. Written only by userspace.
pub const FLAGS_WORD_EXEMPT_TGID: u32 = 1;
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
    /// An intent mark for a write whose shipping its writer takes care of (the exempt process,
    /// see [`FLAGS_WORD_EXEMPT_TGID`]): set in INTENT, not in QUEUED.
    IntentOnly = 2,
}

/// A range too wide to set inline, handed to userspace through the `WIDE` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WideRange {
    /// [`MarkKind`] as u32.
    pub kind: u32,
    /// For an intent range: the low 32 bits of the epoch it was queued in (`MAP_EPOCH`).
    pub epoch: u32,
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

/// Argument positions in the raw tracepoints' `TP_PROTO`s, which the programs read directly
/// from their context (a context read needs a constant offset). Userspace checks them against
/// the kernel's BTF (`btf_trace_<name>` typedefs) before loading, and refuses a kernel where
/// they differ.
pub const BIO_QUEUE_ARG_BIO: usize = 0; // block_bio_queue(struct bio *bio)
pub const RQ_COMPLETE_ARG_RQ: usize = 0; // block_rq_complete(struct request *rq, blk_status_t error,
pub const RQ_COMPLETE_ARG_NR_BYTES: usize = 2; //                   unsigned int nr_bytes)
pub const BIO_COMPLETE_ARG_BIO: usize = 1; // block_bio_complete(struct request_queue *q, struct bio *bio)

/// Byte offsets of the kernel struct members the programs read, and the request-operation
/// encoding, taken from the running kernel's BTF at load time: nothing here is compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `struct bio`: `bi_bdev`, `bi_opf`, `bi_iter.bi_sector`, `bi_iter.bi_size`.
    pub bio_bdev: u32,
    pub bio_opf: u32,
    pub bio_sector: u32,
    pub bio_size: u32,
    /// `struct block_device`: `bd_disk`.
    pub bdev_disk: u32,
    /// `struct gendisk`: `major`, `first_minor`.
    pub disk_major: u32,
    pub disk_first_minor: u32,
    /// `struct request`: `q`, `__sector`, `cmd_flags`.
    pub rq_queue: u32,
    pub rq_sector: u32,
    pub rq_cmd_flags: u32,
    /// `struct request_queue`: `disk`.
    pub queue_disk: u32,
    /// `REQ_OP_MASK` and `REQ_OP_READ`: the operation is `opf & op_mask`.
    pub op_mask: u32,
    pub op_read: u32,
    pub _pad: u32,
}

impl KernelLayout {
    pub const EMPTY: Self = Self {
        bio_bdev: 0,
        bio_opf: 0,
        bio_sector: 0,
        bio_size: 0,
        bdev_disk: 0,
        disk_major: 0,
        disk_first_minor: 0,
        rq_queue: 0,
        rq_sector: 0,
        rq_cmd_flags: 0,
        queue_disk: 0,
        op_mask: 0,
        op_read: 0,
        _pad: 0,
    };

    /// Whether an operation can change data: anything that is not a read. Writes, discards,
    /// secure erase, write-zeroes and any operation we do not know are marked: a spurious bit
    /// costs a little copying, a missing one loses data. Flushes carry no sectors and are
    /// dropped by their zero length.
    #[inline(always)]
    pub fn op_may_write(&self, opf: u32) -> bool {
        opf & self.op_mask != self.op_read
    }
}

/// The configuration the program reads from `.rodata`; set by userspace before load, so the
/// verifier sees constants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerConfig {
    /// The whole disk holding the tracked device (for a partition, its disk): the program
    /// compares `gendisk.major` and `gendisk.first_minor`, since a write to the disk inside the
    /// partition's range changes the partition too.
    pub disk_major: u32,
    pub disk_minor: u32,
    pub geometry: ExtentGeometry,
    /// Words in each bitmap map.
    pub bitmap_words: u32,
    pub _pad: u32,
    pub layout: KernelLayout,
}

impl TrackerConfig {
    /// The value compiled into the object; userspace always overrides it before load.
    pub const EMPTY: Self = Self {
        disk_major: 0,
        disk_minor: 0,
        geometry: ExtentGeometry { start_sector: 0, nr_sectors: 0, extent_shift: 0, _pad: 0 },
        bitmap_words: 0,
        _pad: 0,
        layout: KernelLayout::EMPTY,
    };
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
    fn only_reads_are_not_marked() {
        // The encoding of Linux 6.x: REQ_OP_BITS = 8, READ 0, WRITE 1, FLUSH 2, DISCARD 3,
        // SECURE_ERASE 5, WRITE_ZEROES 9, DRV_IN 34, DRV_OUT 35; flags above bit 8.
        let layout = KernelLayout { op_mask: 0xff, op_read: 0, ..KernelLayout::EMPTY };
        for write_like in [1, 3, 5, 9, 35, 1 | 1 << 11, 9 | 1 << 17] {
            assert!(layout.op_may_write(write_like), "{write_like:#x}");
        }
        for read in [0, 1 << 11, 1 << 19] {
            assert!(!layout.op_may_write(read), "{read:#x}");
        }
    }
}
