//! The secondary's redo journal: how the image moves from one consistent cut of the primary to
//! the next atomically.
//!
//! The guarantee, at every instant (after any crash of this host or process, any cut link):
//! - **J1** every frame acknowledged to the primary is durable, in the journal or on the image;
//! - **J2** opening the journal ([`Journal::open`]) leaves the image at exactly a committed
//!   cut no older than the last one acknowledged (every frame of a cut up to it applied, in the
//!   order the primary sent them, and none of a later cut), unless the superblock says the
//!   image is not consistent (`inconsistent_until`): a first sync, or a catch-up larger than the
//!   journal. Which cut the superblock names may lag by `LAZY_SUPERBLOCK_MS` behind cuts that
//!   applied nothing (the same bytes);
//! - **J3** opening is idempotent: a crash while opening, then opening again, ends the same.
//!
//! The mechanism. Frames carry the cut they belong to (their tag). A frame is written to the
//! image at once only where that keeps the image a cut ([`Journal::route`]): its tag is at or
//! below the last applied cut, or it is a client's write the primary sent in order with nothing
//! staged before it, or the image is not consistent anyway. Every other frame is staged: written
//! to the ring with its header, durable, then acknowledged. A Commit frame appends a Commit
//! record (durable, then acknowledged), then applies the staged frames of cuts up to it in
//! ring order, syncs the image, and advances the superblock past them ([`Journal::commit`]).
//! Opening reads the ring from the superblock's head and applies what a durable Commit record
//! covers that the superblock does not yet say is applied (re-applying a frame writes the same
//! bytes again, so a crash while applying is harmless).
//!
//! The ring is bounded (`capacity`, the `--journal-bytes` option). When a frame does not fit and
//! no commit can free space, the staged frames are applied in place after the superblock has
//! recorded that the image is inconsistent until a later cut ([`Journal::overflow`]): a
//! catch-up larger than the journal does not stall replication, and says what it cost.
//!
//! Owns the journal file and the superblock. The image is the session's; the journal writes it
//! only inside `open`, `commit` and `overflow`, with no write of the session in flight.

pub mod format;
#[cfg(test)]
mod model;

use std::collections::{BTreeMap, VecDeque};

use format::{
    FLAG_UNMAP, RECORD_HEADER_BYTES, RING_START, RecordHeader, RecordKind, SUPERBLOCK_SLOT_BYTES, Superblock,
};

pub const JOURNAL_FILE: &str = "journal";
/// The default ring size: room for the frames of a few seconds of a busy link, and a resync of
/// up to about this much that keeps the image consistent throughout.
pub const JOURNAL_BYTES_DEFAULT: u64 = 1 << 30;
/// How stale the superblock's record of the committed cut may get when cuts apply nothing.
const LAZY_SUPERBLOCK_MS: u128 = 1000;
/// The smallest ring accepted: a few of the largest frames.
pub const JOURNAL_BYTES_MIN: u64 = 16 << 20;
/// The grain of the index of staged frames (which image ranges have one): coarser only makes
/// a frame that shares a grain with a staged one wait for its commit too.
pub const INDEX_GRAIN_BYTES: u64 = 64 << 10;

/// Reads and writes of a file or device at byte offsets (the journal file, the image); tests
/// put a simulated disk behind it, which loses what was not synced when it "crashes".
pub trait Storage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn sync(&self) -> std::io::Result<()>;
    /// Makes the range read as zeroes (a TRIM when `unmap`), durably only after `sync`.
    fn zero(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()>;
}

impl Storage for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.sync_data()
    }

    fn zero(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        zero_range(self, offset, len, unmap)
    }
}

/// Makes `len_bytes` at `offset_bytes` of a block device read as zeroes (durable only after a
/// `sync_data`): a TRIM (`unmap`) punches a hole (the device may unmap it), falling back to
/// writing zeroes where the device cannot; WRITE_ZEROES writes zeroes (the kernel falls back to
/// zero pages itself). The primary does the same, so every image reads the same bytes afterwards.
pub fn zero_range(
    device: &std::fs::File,
    offset_bytes: u64,
    len_bytes: u64,
    unmap: bool,
) -> std::io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let (offset, len) = (offset_bytes as libc::off_t, len_bytes as libc::off_t);
    let zero = || fallocate(device, FallocateFlags::FALLOC_FL_ZERO_RANGE, offset, len);
    let done = if unmap {
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(device, punch, offset, len) {
            Err(nix::errno::Errno::EOPNOTSUPP) => zero(),
            other => other,
        }
    } else {
        zero()
    };
    done.map_err(std::io::Error::from)
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {what}: {source}")]
    Journal { what: &'static str, source: std::io::Error },
    #[error("{what} of the image at offset {offset} failed: {source}")]
    Image { what: &'static str, offset: u64, source: std::io::Error },
}

fn journal_error(what: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
    move |source| JournalError::Journal { what, source }
}

/// A frame staged in the ring, not applied yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staged {
    pub seq: u64,
    pub kind: RecordKind,
    pub flags: u16,
    pub tag: u64,
    pub image_offset: u64,
    /// Bytes on the image (a Data record's payload, a Zeroes record's `aux`).
    pub image_len: u64,
    /// Ring offset of the record.
    pub ring_at: u64,
    /// Handed to an applier with its cut's `ApplyJob`, not applied yet.
    pub applying: bool,
}

/// A committed cut's frames to write to the image, in ring order (`Journal::commit_record`).
/// The frames stay staged (for routing and verify's overlay) until `Journal::applied`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyJob {
    pub cut: u64,
    pub unix_ms: u64,
    pub frames: Vec<Staged>,
}

impl ApplyJob {
    pub fn bytes(&self) -> u64 {
        self.frames.iter().map(|s| s.image_len).sum()
    }
}

impl FrameInfo {
    /// The flags of its journal record (a Zeroes record adds `FLAG_UNMAP` for a TRIM).
    pub fn record_flags(&self) -> u16 {
        let in_order = if self.in_order { format::FLAG_IN_ORDER } else { 0 };
        in_order | if self.client { format::FLAG_CLIENT } else { 0 }
    }
}

impl Staged {
    fn payload_file_offset(&self) -> u64 {
        RING_START + self.ring_at + RECORD_HEADER_BYTES as u64
    }
}

/// A frame as the journal routes it.
#[derive(Clone, Copy, Debug)]
pub struct FrameInfo {
    pub tag: u64,
    pub in_order: bool,
    /// A client's write through the export (`format::FLAG_CLIENT`).
    pub client: bool,
    pub image_offset: u64,
    pub image_len: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Written to the image at once: the image stays a cut (or is not one anyway).
    InPlace,
    /// Staged in the ring until its cut is committed.
    Stage,
}

/// Where a record goes in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub seq: u64,
    pub ring_at: u64,
    /// Byte offset in the journal file.
    pub file_offset: u64,
}

/// What the image holds, for status and `promote`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CutState {
    pub committed_cut: u64,
    pub committed_unix_ms: u64,
    pub consistent: bool,
    /// Frames staged beyond the committed cut (lost if this image is promoted now).
    pub staged_frames: u64,
    pub staged_bytes: u64,
    /// The highest cut a staged frame belongs to (0: none).
    pub staged_tag_max: u64,
    /// Staged frames that are clients' writes through the export (acknowledged to the client
    /// under the sync policy): lost if this image is promoted now.
    pub staged_client_frames: u64,
    pub session_ended_unix_ms: u64,
}

pub struct Journal<F: Storage> {
    file: F,
    superblock: Superblock,
    payload_bytes_max: u32,
    extent_bytes: u64,
    /// The append point: ring offset and the next record's sequence.
    tail: u64,
    next_seq: u64,
    staged: VecDeque<Staged>,
    /// Per image extent, how many staged records touch it.
    staged_extents: BTreeMap<u64, u32>,
    staged_bytes: u64,
    /// A write to the journal failed: what it holds and what this says it holds may differ.
    poisoned: bool,
    /// When the superblock was last written (see `commit_nothing`).
    superblock_written_at: Option<std::time::Instant>,
}

/// The ring from `superblock.head` as read when opening: records in order, and the last
/// Commit's cut and time (0 if none).
struct Scanned {
    staged: Vec<Staged>,
    commit: Option<(u64, u64)>,
    tail: u64,
    next_seq: u64,
}

/// Ring bytes kept free for a Commit record, and the Wrap record and waste before it: a frame
/// may fill the ring, but a commit, which is what frees it, always fits.
const COMMIT_RESERVE_BYTES: u64 = 4 * RECORD_HEADER_BYTES as u64;

/// The shape of a journal: its ring, the frames it takes, the image it applies to.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub capacity: u64,
    pub payload_bytes_max: u32,
    pub extent_bytes: u64,
    pub image_bytes: u64,
}

impl<F: Storage> Journal<F> {
    /// Opens the journal in `file` (a new one if it holds none), and brings `image` to the last
    /// cut a durable Commit record names (J2). `buffer`: scratch for applying, aligned for the
    /// image's O_DIRECT writes. A ring made with another capacity keeps it until it is empty.
    pub fn open(
        file: F,
        geometry: Geometry,
        image: &impl Storage,
        buffer: &mut [u8],
    ) -> Result<Self, JournalError> {
        assert!(geometry.capacity >= 4 * format::record_ring_bytes(geometry.payload_bytes_max));
        let found = read_superblock(&file)?;
        let superblock = found.unwrap_or(Superblock {
            capacity: geometry.capacity,
            head_seq: 1,
            inconsistent_until: u64::MAX,
            ..Superblock::default()
        });
        let scanned = scan(&file, &superblock, &geometry)?;
        let mut journal = Self {
            file,
            superblock,
            payload_bytes_max: geometry.payload_bytes_max,
            extent_bytes: geometry.extent_bytes,
            tail: scanned.tail,
            next_seq: scanned.next_seq,
            staged: VecDeque::new(),
            staged_extents: BTreeMap::new(),
            staged_bytes: 0,
            poisoned: false,
            superblock_written_at: None,
        };
        if found.is_none() {
            journal.write_superblock()?;
        }
        // Staged records of a cut the superblock says is applied were applied with it.
        for staged in scanned.staged.into_iter().filter(|s| s.tag > superblock.committed_cut) {
            journal.push_staged(staged);
        }
        if let Some((cut, unix_ms)) = scanned.commit.filter(|&(cut, _)| cut > superblock.committed_cut) {
            tracing::info!(cut, "applying a cut committed before the last stop");
            let frames = journal.staged.iter().filter(|s| s.tag <= cut).copied().collect();
            let job = ApplyJob { cut, unix_ms, frames };
            apply_job(&journal.file, &job, image, buffer)?;
            journal.applied(&job)?;
        }
        if journal.superblock.capacity != geometry.capacity && journal.staged.is_empty() {
            journal.reset(geometry.capacity)?;
        }
        Ok(journal)
    }

    /// Where a frame goes: see the module header and the rules in order below.
    pub fn route(&self, frame: &FrameInfo) -> Route {
        let sb = &self.superblock;
        let consistent = sb.inconsistent_until == 0;
        if sb.inconsistent_until == u64::MAX || frame.tag <= sb.committed_cut {
            // Never a cut yet: nothing to keep. Or a frame of an applied cut: the image stays it.
            return Route::InPlace;
        }
        if self.overlaps_staged(frame.image_offset, frame.image_len) {
            return Route::Stage;
        }
        let next = sb.committed_cut + 1;
        // The primary flags a client's write in order when every frame it sent before is
        // applied by the time this one arrives: nothing is staged here then.
        let in_order_now = frame.in_order && self.staged.is_empty();
        if (consistent && in_order_now) || (!consistent && frame.tag <= next) {
            // A client's write in order right after the cut, or, on an image that is no cut
            // until `inconsistent_until` (>= next) anyway, a frame of the next cut.
            return Route::InPlace;
        }
        Route::Stage
    }

    /// Makes room for a record with `payload_bytes` of payload and registers it as staged (the
    /// caller writes it at the placement, durably, before acknowledging it). `None`: the ring
    /// is full until the next commit (or an `overflow`).
    pub fn stage(
        &mut self,
        kind: RecordKind,
        flags: u16,
        frame: &FrameInfo,
        payload_bytes: u32,
    ) -> Result<Option<Placement>, JournalError> {
        assert!(matches!(kind, RecordKind::Data | RecordKind::Zeroes));
        assert!(frame.tag > self.superblock.committed_cut, "staged frames are of cuts not applied yet");
        let Some(placement) = self.place(payload_bytes, COMMIT_RESERVE_BYTES)? else { return Ok(None) };
        self.push_staged(Staged {
            seq: placement.seq,
            kind,
            flags,
            tag: frame.tag,
            image_offset: frame.image_offset,
            image_len: frame.image_len,
            ring_at: placement.ring_at,
            applying: false,
        });
        Ok(Some(placement))
    }

    /// The header of a staged Data record at `placement`, over `payload` (the frame's data):
    /// the caller writes it and the payload back to back at `placement.file_offset`.
    pub fn data_record_header(
        &self,
        placement: &Placement,
        frame: &FrameInfo,
        payload: &[u8],
    ) -> [u8; RECORD_HEADER_BYTES] {
        assert!(payload.len() <= self.payload_bytes_max as usize && payload.len() as u64 == frame.image_len);
        let header = RecordHeader {
            kind: RecordKind::Data,
            flags: frame.record_flags(),
            len: payload.len() as u32,
            seq: placement.seq,
            tag: frame.tag,
            offset: frame.image_offset,
            aux: 0,
        };
        format::encode_header(&header, payload)
    }

    /// Writes a staged Zeroes record (no payload) durably: rare, so synchronously.
    pub fn write_zeroes_record(
        &mut self,
        placement: &Placement,
        frame: &FrameInfo,
        unmap: bool,
    ) -> Result<(), JournalError> {
        let header = RecordHeader {
            kind: RecordKind::Zeroes,
            flags: frame.record_flags() | if unmap { FLAG_UNMAP } else { 0 },
            len: 0,
            seq: placement.seq,
            tag: frame.tag,
            offset: frame.image_offset,
            aux: frame.image_len,
        };
        self.write_file(&format::encode_header(&header, &[]), placement.file_offset)?;
        self.sync_file()
    }

    /// Commits cut `cut` (taken at `unix_ms` on the primary) and applies it to `image` before
    /// returning (`commit_record`, `apply_job`, `applied`). Returns the bytes applied.
    pub fn commit(
        &mut self,
        cut: u64,
        unix_ms: u64,
        image: &impl Storage,
        buffer: &mut [u8],
    ) -> Result<u64, JournalError> {
        let Some(job) = self.commit_record(cut, unix_ms)? else { return Ok(0) };
        apply_job(&self.file, &job, image, buffer)?;
        self.applied(&job)?;
        Ok(job.bytes())
    }

    /// Commits cut `cut` (taken at `unix_ms` on the primary): a durable Commit record (J1
    /// holds from here for the Commit frame's ack), and the job that applies the staged frames
    /// of cuts up to it that no earlier job holds, in ring order. `None`: nothing to apply
    /// (then nothing is written but, now and then, the superblock). Every staged record must
    /// be written already.
    pub fn commit_record(&mut self, cut: u64, unix_ms: u64) -> Result<Option<ApplyJob>, JournalError> {
        if cut <= self.superblock.committed_cut {
            return Ok(None); // a repeated or stale commit: that cut is applied already
        }
        if self.staged.iter().all(|s| s.tag > cut) {
            // Nothing to apply: the image is this cut already. Recorded lazily (a crash
            // before the next record reports an older cut of the same bytes).
            self.commit_nothing(cut, unix_ms)?;
            return Ok(None);
        }
        let placement = self.place(0, 0)?.expect("COMMIT_RESERVE_BYTES keeps room for a commit");
        let header = RecordHeader {
            kind: RecordKind::Commit,
            flags: 0,
            len: 0,
            seq: placement.seq,
            tag: cut,
            offset: 0,
            aux: unix_ms,
        };
        self.write_file(&format::encode_header(&header, &[]), placement.file_offset)?;
        self.sync_file()?;
        let mut frames = Vec::new();
        for staged in self.staged.iter_mut().filter(|s| s.tag <= cut && !s.applying) {
            staged.applying = true;
            frames.push(*staged);
        }
        Ok(Some(ApplyJob { cut, unix_ms, frames }))
    }

    /// `job`'s frames are on the image, synced: they leave the staged frames, the superblock's
    /// head moves past them, and the image is cut `job.cut` (J2). Jobs are applied in order.
    pub fn applied(&mut self, job: &ApplyJob) -> Result<(), JournalError> {
        let done: std::collections::HashSet<u64> = job.frames.iter().map(|s| s.seq).collect();
        let left: Vec<Staged> = self.staged.iter().filter(|s| !done.contains(&s.seq)).copied().collect();
        self.clear_staged();
        for staged in left {
            self.push_staged(staged);
        }
        let sb = &mut self.superblock;
        sb.committed_cut = sb.committed_cut.max(job.cut);
        sb.committed_unix_ms = sb.committed_unix_ms.max(job.unix_ms);
        sb.inconsistent_until = until_after(sb.inconsistent_until, job.cut);
        let (head, head_seq) = self.staged.front().map_or((self.tail, self.next_seq), |s| (s.ring_at, s.seq));
        sb.head = head;
        sb.head_seq = head_seq;
        self.write_superblock()
    }

    /// `job` could not be applied (an image write failed): its frames are handed to the next
    /// commit's job again.
    pub fn apply_failed(&mut self, job: &ApplyJob) {
        let failed: std::collections::HashSet<u64> = job.frames.iter().map(|s| s.seq).collect();
        for staged in self.staged.iter_mut().filter(|s| failed.contains(&s.seq)) {
            staged.applying = false;
        }
    }

    /// Whether a job handed out is not applied yet.
    pub fn applying(&self) -> bool {
        self.staged.iter().any(|s| s.applying)
    }

    /// Commits a cut that applies nothing; the superblock is written when what it says of the
    /// image changes (consistent again), or at most every `LAZY_SUPERBLOCK_MS`.
    fn commit_nothing(&mut self, cut: u64, unix_ms: u64) -> Result<(), JournalError> {
        let sb = &mut self.superblock;
        let until = sb.inconsistent_until;
        sb.committed_cut = cut;
        sb.committed_unix_ms = unix_ms;
        sb.inconsistent_until = until_after(until, cut);
        let due = self.superblock_written_at.is_none_or(|at| at.elapsed().as_millis() >= LAZY_SUPERBLOCK_MS);
        if self.superblock.inconsistent_until != until || due {
            self.write_superblock()?;
        }
        Ok(())
    }

    /// The ring is full and no commit can free it: records that the image is no cut until the
    /// last staged frame's cut is applied, then applies every staged frame in place. Returns the
    /// bytes applied.
    pub fn overflow(&mut self, image: &impl Storage, buffer: &mut [u8]) -> Result<u64, JournalError> {
        assert!(!self.applying(), "no job is out when the ring overflows");
        let sb = &mut self.superblock;
        let tag_max = self.staged.iter().map(|s| s.tag).max().unwrap_or(0);
        let until = tag_max.max(sb.committed_cut + 1);
        sb.inconsistent_until =
            if sb.inconsistent_until == 0 { until } else { sb.inconsistent_until.max(until) };
        tracing::warn!(
            staged_bytes = self.staged_bytes,
            until_cut = sb.inconsistent_until,
            "journal full with no cut to commit: applying its frames in place; the image is not consistent until that cut"
        );
        self.write_superblock()?; // before the first byte lands out of order
        let all = ApplyJob { cut: 0, unix_ms: 0, frames: self.staged.iter().copied().collect() };
        apply_job(&self.file, &all, image, buffer)?;
        let applied = self.staged_bytes;
        self.clear_staged();
        self.superblock.head = self.tail;
        self.superblock.head_seq = self.next_seq;
        self.write_superblock()?;
        Ok(applied)
    }

    /// Says a write of a staged record failed (the session wrote it): see `poisoned`.
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    /// A write to the journal failed: it must be read back (the process restarted) before
    /// anything else is staged or committed.
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Records that a session with the primary ended now (or, when opening, by now at latest).
    pub fn session_ended(&mut self, unix_ms: u64) -> Result<(), JournalError> {
        self.superblock.session_ended_unix_ms = unix_ms;
        self.write_superblock()
    }

    /// The journal file (the session writes staged records into it with io_uring).
    pub fn file(&self) -> &F {
        &self.file
    }

    pub fn cut_state(&self) -> CutState {
        let sb = &self.superblock;
        CutState {
            committed_cut: sb.committed_cut,
            committed_unix_ms: sb.committed_unix_ms,
            consistent: sb.inconsistent_until == 0,
            staged_frames: self.staged.len() as u64,
            staged_bytes: self.staged_bytes,
            staged_tag_max: self.staged.iter().map(|s| s.tag).max().unwrap_or(0),
            staged_client_frames: self.staged.iter().filter(|s| s.flags & format::FLAG_CLIENT != 0).count()
                as u64,
            session_ended_unix_ms: sb.session_ended_unix_ms,
        }
    }

    /// The cut after which the image is consistent again (0: it is; `u64::MAX`: never was).
    pub fn inconsistent_until(&self) -> u64 {
        self.superblock.inconsistent_until
    }

    pub fn staged(&self) -> impl Iterator<Item = &Staged> {
        self.staged.iter()
    }

    /// Lays the staged frames that touch `image_offset..+buf.len()` over `buf` (which holds
    /// the image's bytes there), in ring order: what the image will hold once they are applied.
    pub fn overlay(&self, image_offset: u64, buf: &mut [u8]) -> Result<(), JournalError> {
        let end = image_offset + buf.len() as u64;
        if !self.overlaps_staged(image_offset, buf.len() as u64) {
            return Ok(());
        }
        for staged in
            self.staged.iter().filter(|s| s.image_offset < end && image_offset < s.image_offset + s.image_len)
        {
            let from = staged.image_offset.max(image_offset);
            let to = (staged.image_offset + staged.image_len).min(end);
            let out = &mut buf[(from - image_offset) as usize..(to - image_offset) as usize];
            match staged.kind {
                RecordKind::Data => {
                    let at = staged.payload_file_offset() + (from - staged.image_offset);
                    self.file.read_at(out, at).map_err(journal_error("read"))?;
                }
                _ => out.fill(0),
            }
        }
        Ok(())
    }
}

impl<F: Storage> Journal<F> {
    /// The next record's place for `payload_bytes`, keeping `reserve` bytes free after it. A
    /// record never ends closer to the ring's end than a header, so a Wrap record always fits
    /// there (written here, durably); the waste counts against the free space.
    fn place(&mut self, payload_bytes: u32, reserve: u64) -> Result<Option<Placement>, JournalError> {
        let Some(wraps) = self.room_for(payload_bytes, reserve) else { return Ok(None) };
        let size = format::record_ring_bytes(payload_bytes);
        if wraps {
            let wrap = RecordHeader {
                kind: RecordKind::Wrap,
                flags: 0,
                len: 0,
                seq: self.next_seq,
                tag: 0,
                offset: 0,
                aux: 0,
            };
            self.write_file(&format::encode_header(&wrap, &[]), RING_START + self.tail)?;
            self.sync_file()?;
            self.next_seq += 1;
            self.tail = 0;
        }
        let placement =
            Placement { seq: self.next_seq, ring_at: self.tail, file_offset: RING_START + self.tail };
        self.next_seq += 1;
        self.tail += size;
        Ok(Some(placement))
    }

    /// Whether a staged record of `payload_bytes` would fit now (`stage` would place it).
    pub fn has_room(&self, payload_bytes: u32) -> bool {
        self.room_for(payload_bytes, COMMIT_RESERVE_BYTES).is_some()
    }

    /// `Some(wraps)` if a record of `payload_bytes` fits with `reserve` bytes left after it:
    /// whether it goes to the ring's start (the rest of the ring's end wasted: a record never
    /// ends closer to the end than a header, so a Wrap record always fits there).
    fn room_for(&self, payload_bytes: u32, reserve: u64) -> Option<bool> {
        let capacity = self.superblock.capacity;
        let size = format::record_ring_bytes(payload_bytes);
        let wraps = self.tail + size + RECORD_HEADER_BYTES as u64 > capacity;
        let waste = if wraps { capacity - self.tail } else { 0 };
        (self.free_bytes() >= waste + size + reserve).then_some(wraps)
    }

    /// Ring bytes not holding a record still to read (from the head to the tail, wrapping).
    fn free_bytes(&self) -> u64 {
        let (head, capacity) = (self.superblock.head, self.superblock.capacity);
        let used = if self.tail >= head { self.tail - head } else { capacity - head + self.tail };
        capacity - used
    }

    fn extents_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.extent_bytes..(offset + len.max(1)).div_ceil(self.extent_bytes)
    }

    fn push_staged(&mut self, staged: Staged) {
        for extent in self.extents_of(staged.image_offset, staged.image_len) {
            *self.staged_extents.entry(extent).or_insert(0) += 1;
        }
        self.staged_bytes += staged.image_len;
        self.staged.push_back(staged);
    }

    fn clear_staged(&mut self) {
        self.staged.clear();
        self.staged_extents.clear();
        self.staged_bytes = 0;
    }

    fn overlaps_staged(&self, offset: u64, len: u64) -> bool {
        self.staged_extents.range(self.extents_of(offset, len)).next().is_some()
    }

    fn write_superblock(&mut self) -> Result<(), JournalError> {
        self.superblock.generation += 1;
        let slot = self.superblock.generation % 2;
        let bytes = format::encode_superblock(&self.superblock);
        self.write_file(&bytes, slot * SUPERBLOCK_SLOT_BYTES)?;
        self.sync_file()?;
        self.superblock_written_at = Some(std::time::Instant::now());
        Ok(())
    }

    fn write_file(&mut self, bytes: &[u8], at: u64) -> Result<(), JournalError> {
        let written = self.file.write_at(bytes, at);
        self.poisoned |= written.is_err();
        written.map_err(journal_error("write"))
    }

    fn sync_file(&mut self) -> Result<(), JournalError> {
        let synced = self.file.sync();
        self.poisoned |= synced.is_err();
        synced.map_err(journal_error("sync"))
    }

    /// An empty ring of `capacity` bytes (the option changed): the head and tail start over.
    fn reset(&mut self, capacity: u64) -> Result<(), JournalError> {
        assert!(self.staged.is_empty());
        tracing::info!(from = self.superblock.capacity, to = capacity, "journal ring resized");
        self.superblock.capacity = capacity;
        self.superblock.head = 0;
        self.superblock.head_seq = self.next_seq;
        self.tail = 0;
        self.write_superblock()
    }
}

/// What `inconsistent_until` becomes once cut `cut` is applied: a first sync's image is a cut
/// from the commit after its first (frames before that first may be of the next cut: see
/// `route`); an image inconsistent until a cut is consistent once that cut is applied.
fn until_after(until: u64, cut: u64) -> u64 {
    match until {
        u64::MAX => cut + 1,
        until if cut >= until => 0,
        until => until,
    }
}

/// Writes `job`'s frames from the journal `file` to `image`, `buffer` at a time, in order, then
/// syncs the image. Free of the journal's state: an applier thread runs it on its own handles.
pub fn apply_job(
    file: &impl Storage,
    job: &ApplyJob,
    image: &impl Storage,
    buffer: &mut [u8],
) -> Result<(), JournalError> {
    for staged in &job.frames {
        apply_frame(file, staged, image, buffer)?;
    }
    image.sync().map_err(|source| JournalError::Image { what: "sync", offset: 0, source })
}

fn apply_frame(
    file: &impl Storage,
    staged: &Staged,
    image: &impl Storage,
    buffer: &mut [u8],
) -> Result<(), JournalError> {
    let image_error = |what, offset| move |source| JournalError::Image { what, offset, source };
    if staged.kind == RecordKind::Zeroes {
        let unmap = staged.flags & FLAG_UNMAP != 0;
        return image
            .zero(staged.image_offset, staged.image_len, unmap)
            .map_err(image_error("zeroing", staged.image_offset));
    }
    let mut done = 0;
    while done < staged.image_len {
        let len = (staged.image_len - done).min(buffer.len() as u64) as usize;
        let chunk = &mut buffer[..len];
        file.read_at(chunk, staged.payload_file_offset() + done).map_err(journal_error("read"))?;
        let at = staged.image_offset + done;
        image.write_at(chunk, at).map_err(image_error("write", at))?;
        done += len as u64;
    }
    Ok(())
}

/// The valid superblock slot of the higher generation, if any.
fn read_superblock(file: &impl Storage) -> Result<Option<Superblock>, JournalError> {
    let mut best: Option<Superblock> = None;
    let mut slot = vec![0u8; SUPERBLOCK_SLOT_BYTES as usize];
    for index in 0..2 {
        match file.read_at(&mut slot, index * SUPERBLOCK_SLOT_BYTES) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => continue,
            Err(error) => return Err(journal_error("superblock read")(error)),
        }
        if let Some(found) = format::decode_superblock(&slot)
            && best.is_none_or(|b| found.generation > b.generation)
        {
            best = Some(found);
        }
    }
    Ok(best)
}

/// Reads the ring from the superblock's head while records check out (see `format`).
fn scan(file: &impl Storage, superblock: &Superblock, geometry: &Geometry) -> Result<Scanned, JournalError> {
    let capacity = superblock.capacity;
    let (mut at, mut seq) = (superblock.head, superblock.head_seq);
    let mut scanned = Scanned { staged: Vec::new(), commit: None, tail: at, next_seq: seq };
    let mut payload = vec![0u8; geometry.payload_bytes_max as usize];
    let mut read_bytes = 0u64;
    while at + RECORD_HEADER_BYTES as u64 <= capacity && read_bytes <= capacity {
        let Some(header) = read_record(file, (at, seq), capacity, geometry, &mut payload)? else { break };
        read_bytes += header.ring_bytes();
        match header.kind {
            RecordKind::Wrap => at = 0,
            RecordKind::Commit => {
                scanned.commit = Some((header.tag, header.aux));
                at += header.ring_bytes();
            }
            RecordKind::Data | RecordKind::Zeroes => {
                let image_len =
                    if header.kind == RecordKind::Data { u64::from(header.len) } else { header.aux };
                scanned.staged.push(Staged {
                    seq,
                    kind: header.kind,
                    flags: header.flags,
                    tag: header.tag,
                    image_offset: header.offset,
                    image_len,
                    ring_at: at,
                    applying: false,
                });
                at += header.ring_bytes();
            }
        }
        seq += 1;
        (scanned.tail, scanned.next_seq) = (at, seq);
    }
    Ok(scanned)
}

/// The record at ring offset `at` if it is the one of sequence `seq` and checks out whole.
fn read_record(
    file: &impl Storage,
    (at, seq): (u64, u64),
    capacity: u64,
    geometry: &Geometry,
    payload: &mut [u8],
) -> Result<Option<RecordHeader>, JournalError> {
    let mut bytes = [0u8; RECORD_HEADER_BYTES];
    match file.read_at(&mut bytes, RING_START + at) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(journal_error("read")(error)),
    }
    let Ok(header) = format::decode_header(&bytes, geometry.payload_bytes_max) else { return Ok(None) };
    let fits = at + header.ring_bytes() <= capacity;
    let on_image = header.kind == RecordKind::Commit
        || header.kind == RecordKind::Wrap
        || header
            .offset
            .checked_add(u64::from(header.len).max(header.aux))
            .is_some_and(|end| end <= geometry.image_bytes);
    if header.seq != seq || !fits || !on_image {
        return Ok(None);
    }
    let payload = &mut payload[..header.len as usize];
    match file.read_at(payload, RING_START + at + RECORD_HEADER_BYTES as u64) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(journal_error("read")(error)),
    }
    Ok(format::check(&bytes, payload).ok().map(|()| header))
}
