//! The write-intent log and the per-secondary fracture logs: their rules and their files.
//!
//! - The write-intent log is the tracker's pinned intent map (it survives a process crash) and
//!   its checkpoint `intent.log` (it survives a host crash, up to the last checkpoint). An extent
//!   leaves it lazily: only after it has been clean on every unfractured secondary for
//!   `INTENT_QUIET_CHECKPOINTS` checkpoints in a row (`IntentQuiet`).
//! - A fracture log `fracture-<name>.log` holds the extents one fractured secondary has not
//!   acknowledged, with its resync state (full sync, verify, administrator fracture).
//!
//! Owns the file format and its atomic replacement. Invariant: a file is replaced only by
//! write-to-temp + fsync + rename + fsync of the directory, so a crash or torn write leaves the
//! old file or the new one, never a mix; and a file that fails any check (magic, version,
//! checksum, geometry, mirror, secondary) is an error, never an empty log.
//!
//! ```text
//! 0    magic              8 bytes "RPLLOG\0\0"
//! 8    version            u32     LOG_VERSION
//! 12   kind               u32     1 intent, 2 fracture
//! 16   flags              u32     FLAG_*
//! 20   crc32c             u32     over the whole file with this field zero
//! 24   mirror_id          u64
//! 32   secondary_id       u64     0 for the intent log
//! 40   generation         u64     the mirror's generation
//! 48   sequence           u64     checkpoint number, increasing
//! 56   extent_bytes       u64
//! 64   image_bytes        u64
//! 72   resync_bytes_done  u64
//! 80   verify_next_extent u64
//! 88   saved_unix_ms      u64
//! 96   resync_rate        u64     bytes per second the resync last ran at (version 2 on)
//! 104  bitmap             ceil(extents / 64) little-endian u64 words; no bit past the last
//!                         extent is set
//! ```
//!
//! Version 1 files (a 96-byte header, no resync rate) are still read, with a rate of 0.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use bitvec::prelude::*;
use sha2::Digest as _;

pub const LOG_MAGIC: [u8; 8] = *b"RPLLOG\0\0";
pub const LOG_VERSION: u32 = 2;
pub const LOG_HEADER_BYTES: usize = 104;
/// The header of a version 1 file, which had no resync rate.
const LOG_HEADER_BYTES_V1: usize = 96;
pub const INTENT_LOG_FILE: &str = "intent.log";

/// Checkpoints an extent must stay clean before it leaves the write-intent log.
pub const INTENT_QUIET_CHECKPOINTS: usize = 3;

/// The secondary needs a block-by-block copy of every extent in its log (added UNSYNCHRONIZED,
/// or never synchronized yet).
pub const FLAG_FULL_SYNC: u32 = 1 << 0;
/// The secondary needs a verify pass from `verify_next_extent` on.
pub const FLAG_VERIFY: u32 = 1 << 1;
/// Fractured by the administrator: it stays fractured until `restore`.
pub const FLAG_ADMIN_FRACTURED: u32 = 1 << 2;
/// Fractured (unreachable, failed, or over its backlog) since the last synchronized state.
pub const FLAG_FRACTURED: u32 = 1 << 3;
const FLAGS_KNOWN: u32 = FLAG_FULL_SYNC | FLAG_VERIFY | FLAG_ADMIN_FRACTURED | FLAG_FRACTURED;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LogKind {
    Intent = 1,
    Fracture = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHeader {
    pub kind: LogKind,
    pub flags: u32,
    pub mirror_id: u64,
    pub secondary_id: u64,
    pub generation: u64,
    pub sequence: u64,
    pub extent_bytes: u64,
    pub image_bytes: u64,
    pub resync_bytes_done: u64,
    pub verify_next_extent: u64,
    pub saved_unix_ms: u64,
    /// With the resync's progress (`resync_bytes_done`, the bitmap's extents left): the rate it
    /// last ran at, so the time left is known again at once after a restart.
    pub resync_rate_bytes_per_s: u64,
}

impl LogHeader {
    /// A header for `identity`'s log at `generation`, stamped now, with no flags, no resync
    /// progress and no verify position (set those fields after).
    pub fn new(identity: &LogIdentity, generation: u64) -> Self {
        Self {
            kind: identity.kind,
            flags: 0,
            mirror_id: identity.mirror_id,
            secondary_id: identity.secondary_id,
            generation,
            sequence: 0,
            extent_bytes: identity.extent_bytes.get(),
            image_bytes: identity.image_bytes,
            resync_bytes_done: 0,
            verify_next_extent: 0,
            saved_unix_ms: unix_ms_now(),
            resync_rate_bytes_per_s: 0,
        }
    }

    pub fn extent_count(&self) -> u64 {
        self.image_bytes.div_ceil(self.extent_bytes)
    }
}

/// What a loaded log must match: the running mirror and, for a fracture log, its secondary.
#[derive(Clone, Copy, Debug)]
pub struct LogIdentity {
    pub kind: LogKind,
    pub mirror_id: u64,
    pub secondary_id: u64,
    pub extent_bytes: crate::model::ExtentBytes,
    pub image_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: damaged log: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("{path}: log of another {what}: file has {found}, expected {expected}")]
    Mismatch { path: PathBuf, what: &'static str, found: u64, expected: u64 },
}

/// The id a fracture log carries for secondary `name`: the first 8 bytes of SHA-256(name).
pub fn secondary_id(name: &str) -> u64 {
    let digest = sha2::Sha256::digest(name.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

pub fn fracture_log_file(name: &str) -> String {
    format!("fracture-{name}.log")
}

/// Whether `file_name` is one of a primary's logs (the intent log or a fracture log).
pub fn is_primary_log(file_name: &str) -> bool {
    file_name == INTENT_LOG_FILE || (file_name.starts_with("fracture-") && file_name.ends_with(".log"))
}

/// Encodes a log; `bits` has exactly `header.extent_count()` bits.
pub fn encode(header: &LogHeader, bits: &BitSlice<u64, Lsb0>) -> Vec<u8> {
    assert_eq!(bits.len() as u64, header.extent_count(), "bitmap length is the extent count");
    let words = bits.len().div_ceil(64);
    let mut out = Vec::with_capacity(LOG_HEADER_BYTES + words * 8);
    out.extend_from_slice(&LOG_MAGIC);
    out.extend_from_slice(&LOG_VERSION.to_le_bytes());
    out.extend_from_slice(&(header.kind as u32).to_le_bytes());
    out.extend_from_slice(&header.flags.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for field in [
        header.mirror_id,
        header.secondary_id,
        header.generation,
        header.sequence,
        header.extent_bytes,
        header.image_bytes,
        header.resync_bytes_done,
        header.verify_next_extent,
        header.saved_unix_ms,
        header.resync_rate_bytes_per_s,
    ] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    assert_eq!(out.len(), LOG_HEADER_BYTES);
    for chunk in bits.chunks(64) {
        out.extend_from_slice(&chunk.load_le::<u64>().to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a log without trusting any byte of it: every malformed input is a reason string.
pub fn decode(bytes: &[u8]) -> Result<(LogHeader, BitVec<u64, Lsb0>), String> {
    if bytes.len() < LOG_HEADER_BYTES_V1 {
        return Err(format!("{} bytes, shorter than a header", bytes.len()));
    }
    if bytes[..8] != LOG_MAGIC {
        return Err("bad magic".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    let header_bytes = match version {
        1 => LOG_HEADER_BYTES_V1,
        LOG_VERSION => LOG_HEADER_BYTES,
        _ => return Err(format!("version {version}, this build reads 1 and {LOG_VERSION}")),
    };
    if bytes.len() < header_bytes {
        return Err(format!("{} bytes, shorter than the {header_bytes}-byte header", bytes.len()));
    }
    let stored_crc = u32_at(20);
    let computed_crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..20]), &[0; 4]);
    let computed_crc = crc32c::crc32c_append(computed_crc, &bytes[24..]);
    if stored_crc != computed_crc {
        return Err(format!("checksum {stored_crc:#010x}, computed {computed_crc:#010x}"));
    }
    let kind = match u32_at(12) {
        1 => LogKind::Intent,
        2 => LogKind::Fracture,
        other => return Err(format!("unknown kind {other}")),
    };
    let flags = u32_at(16);
    if flags & !FLAGS_KNOWN != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let header = LogHeader {
        kind,
        flags,
        mirror_id: u64_at(24),
        secondary_id: u64_at(32),
        generation: u64_at(40),
        sequence: u64_at(48),
        extent_bytes: u64_at(56),
        image_bytes: u64_at(64),
        resync_bytes_done: u64_at(72),
        verify_next_extent: u64_at(80),
        saved_unix_ms: u64_at(88),
        resync_rate_bytes_per_s: if version == 1 { 0 } else { u64_at(96) },
    };
    crate::model::ExtentBytes::new(header.extent_bytes).map_err(|e| e.to_string())?;
    let extents = header.extent_count();
    let words = extents.div_ceil(64);
    let body = &bytes[header_bytes..];
    if body.len() as u64 != words * 8 {
        return Err(format!("bitmap of {} bytes, expected {} for {extents} extents", body.len(), words * 8));
    }
    let mut bits: BitVec<u64, Lsb0> =
        body.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))).collect();
    if bits[extents as usize..].any() {
        return Err("bits set past the last extent".into());
    }
    bits.truncate(extents as usize);
    if header.verify_next_extent > extents {
        return Err(format!("verify position {} past the last extent", header.verify_next_extent));
    }
    Ok((header, bits))
}

/// Replaces `dir/name` with `bytes` atomically: temp file, fsync, rename, fsync of `dir`.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LogError> {
    let path = dir.join(name);
    let temp = dir.join(format!("{name}.tmp"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { path, source }
    };
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(true).open(&temp).map_err(io(&temp))?;
    file.write_all(bytes).map_err(io(&temp))?;
    file.sync_all().map_err(io(&temp))?;
    drop(file);
    std::fs::rename(&temp, &path).map_err(io(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Removes `dir/name` durably, if it exists.
/// Creates the state directory (and its parents) durably: each directory made is fsynced
/// into its parent, so a power loss right after the first run cannot take away the directory
/// and the logs written in it.
pub fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(path);
        at = path.parent();
    }
    std::fs::create_dir_all(dir)?;
    for made in missing.iter().rev() {
        let parent = made.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

pub fn remove_file(dir: &Path, name: &str) -> Result<(), LogError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => File::open(dir).and_then(|d| d.sync_all()).map_err(|source| LogError::Io { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LogError::Io { path, source }),
    }
}

/// A log read back: its header and its bitmap (one bit per extent).
pub type Loaded = (LogHeader, BitVec<u64, Lsb0>);

/// Loads `dir/name`: `Ok(None)` when there is no such file, an error when it is damaged or
/// belongs to another mirror, secondary or geometry.
pub fn load(dir: &Path, name: &str, identity: &LogIdentity) -> Result<Option<Loaded>, LogError> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LogError::Io { path, source }),
    };
    let (header, bits) = decode(&bytes).map_err(|reason| LogError::Damaged { path: path.clone(), reason })?;
    let checks = [
        ("log kind", header.kind as u64, identity.kind as u64),
        ("mirror id", header.mirror_id, identity.mirror_id),
        ("secondary id", header.secondary_id, identity.secondary_id),
        ("extent size", header.extent_bytes, identity.extent_bytes.get()),
        ("image size", header.image_bytes, identity.image_bytes),
    ];
    for (what, found, expected) in checks {
        if found != expected {
            return Err(LogError::Mismatch { path, what, found, expected });
        }
    }
    Ok(Some((header, bits)))
}

pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Which extents have been quiet long enough to leave the write-intent log: those not dirty
/// (written, or unacknowledged by an unfractured secondary) in any of the last
/// `INTENT_QUIET_CHECKPOINTS` checkpoint intervals.
pub struct IntentQuiet {
    /// One bitmap per recent interval; `recent[head]` is the interval being filled.
    recent: Vec<BitVec<u64, Lsb0>>,
    head: usize,
}

impl IntentQuiet {
    pub fn new(extents: usize) -> Self {
        Self { recent: vec![bitvec![u64, Lsb0; 0; extents]; INTENT_QUIET_CHECKPOINTS], head: 0 }
    }

    /// Marks extents dirty in the current interval.
    pub fn note_dirty(&mut self, dirty: &BitSlice<u64, Lsb0>) {
        *self.recent[self.head] |= dirty;
    }

    pub fn note_dirty_run(&mut self, run: std::ops::Range<usize>) {
        self.recent[self.head][run].fill(true);
    }

    /// Ends the current interval. Extents in `intent` but not in `previous` (the last
    /// interval's intent log: writes queued since, maybe not completed) count as dirty; the
    /// extents of `intent` not dirty in any recent interval go into `clearable` and out of
    /// `intent`. Word at a time: this runs over the whole bitmap at every checkpoint.
    pub fn end_interval(
        &mut self,
        intent: &mut BitVec<u64, Lsb0>,
        previous: Option<&BitVec<u64, Lsb0>>,
        clearable: &mut BitVec<u64, Lsb0>,
    ) {
        if let Some(previous) = previous {
            let current = &mut self.recent[self.head];
            for ((dirty, now), before) in
                current.as_raw_mut_slice().iter_mut().zip(intent.as_raw_slice()).zip(previous.as_raw_slice())
            {
                *dirty |= now & !before;
            }
        } else {
            *self.recent[self.head] |= intent.as_bitslice();
        }
        clearable.clear();
        clearable.extend_from_bitslice(intent);
        for interval in &self.recent {
            for (out, dirty) in clearable.as_raw_mut_slice().iter_mut().zip(interval.as_raw_slice()) {
                *out &= !dirty;
            }
        }
        for (kept, clear) in intent.as_raw_mut_slice().iter_mut().zip(clearable.as_raw_slice()) {
            *kept &= !clear;
        }
        self.head = (self.head + 1) % self.recent.len();
        self.recent[self.head].fill(false);
    }
}

#[cfg(test)]
#[path = "logs_model.rs"]
mod model;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(extents: u64, flags: u32) -> LogHeader {
        LogHeader {
            kind: LogKind::Fracture,
            flags,
            mirror_id: 7,
            secondary_id: secondary_id("b"),
            generation: 3,
            sequence: 99,
            extent_bytes: 65536,
            image_bytes: extents * 65536 - 512,
            resync_bytes_done: 12345,
            verify_next_extent: extents / 2,
            saved_unix_ms: 1,
            resync_rate_bytes_per_s: 200 << 20,
        }
    }

    /// A version 1 file (no resync rate in its 96-byte header) is read, with a rate of 0.
    #[test]
    fn version_1_files_are_read() {
        let mut bits = bitvec![u64, Lsb0; 0; 100];
        bits.set(3, true);
        let header = header(100, FLAG_FRACTURED);
        let v2 = encode(&header, &bits);
        let mut v1 = Vec::new();
        v1.extend_from_slice(&v2[..96]);
        v1.extend_from_slice(&v2[LOG_HEADER_BYTES..]);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1[20..24].fill(0);
        let crc = crc32c::crc32c(&v1);
        v1[20..24].copy_from_slice(&crc.to_le_bytes());
        let (read, read_bits) = decode(&v1).expect("a version 1 file");
        assert_eq!(read, LogHeader { resync_rate_bytes_per_s: 0, ..header });
        assert_eq!(read_bits, bits);
    }

    #[test]
    fn a_state_dir_and_its_missing_parents_are_created() {
        let root = std::env::temp_dir().join(format!("replicator-statedir-{}", std::process::id()));
        let dir = root.join("a/b/state");
        create_state_dir(&dir).expect("created");
        assert!(dir.is_dir());
        create_state_dir(&dir).expect("an existing directory is fine");
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    proptest! {
        #[test]
        fn round_trip(bits in proptest::collection::vec(any::<bool>(), 1..500), flags in 0u32..16) {
            let bits: BitVec<u64, Lsb0> = bits.into_iter().collect();
            let header = header(bits.len() as u64, flags);
            let bytes = encode(&header, &bits);
            let (decoded, decoded_bits) = decode(&bytes).expect("round trip");
            prop_assert_eq!(decoded, header);
            prop_assert_eq!(decoded_bits, bits);
        }

        #[test]
        fn any_flipped_bit_or_truncation_is_detected(
            bits in proptest::collection::vec(any::<bool>(), 1..300),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let bits: BitVec<u64, Lsb0> = bits.into_iter().collect();
            let bytes = encode(&header(bits.len() as u64, FLAG_FRACTURED), &bits);
            let mut flipped = bytes.clone();
            flipped[flip.index(bytes.len())] ^= 1 << bit;
            prop_assert!(decode(&flipped).is_err());
            let cut = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_headers_with_a_valid_checksum_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), LOG_HEADER_BYTES_V1..LOG_HEADER_BYTES + 64),
            version in 1u32..=LOG_VERSION,
        ) {
            bytes[..8].copy_from_slice(&LOG_MAGIC);
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            bytes[20..24].fill(0);
            let crc = crc32c::crc32c(&bytes);
            bytes[20..24].copy_from_slice(&crc.to_le_bytes());
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn replaced_files_load_and_damage_is_reported() {
        let dir = std::env::temp_dir().join(format!("replicator-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bits = bitvec![u64, Lsb0; 1, 0, 1, 1, 0];
        let header = header(5, FLAG_FRACTURED);
        let identity = LogIdentity {
            kind: LogKind::Fracture,
            mirror_id: 7,
            secondary_id: secondary_id("b"),
            extent_bytes: crate::model::ExtentBytes::DEFAULT,
            image_bytes: header.image_bytes,
        };
        assert!(load(&dir, "f.log", &identity).unwrap().is_none());
        replace_file(&dir, "f.log", &encode(&header, &bits)).unwrap();
        assert_eq!(load(&dir, "f.log", &identity).unwrap().unwrap().1, bits);
        let other = LogIdentity { secondary_id: secondary_id("c"), ..identity };
        assert!(matches!(load(&dir, "f.log", &other), Err(LogError::Mismatch { .. })));
        let bytes = std::fs::read(dir.join("f.log")).unwrap();
        std::fs::write(dir.join("f.log"), &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(load(&dir, "f.log", &identity), Err(LogError::Damaged { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn intent_extents_leave_after_quiet_checkpoints() {
        let mut quiet = IntentQuiet::new(8);
        let full = bitvec![u64, Lsb0; 1, 1, 0, 0, 0, 0, 0, 0];
        let mut clearable = BitVec::new();
        quiet.note_dirty_run(0..2);
        for _ in 0..INTENT_QUIET_CHECKPOINTS {
            let mut intent = full.clone();
            quiet.end_interval(&mut intent, Some(&full), &mut clearable);
            assert!(clearable.not_any(), "dirty within the window");
            assert_eq!(intent, full);
        }
        quiet.note_dirty_run(1..2);
        let mut intent = full.clone();
        quiet.end_interval(&mut intent, Some(&full), &mut clearable);
        assert_eq!(clearable, bitvec![u64, Lsb0; 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(intent, bitvec![u64, Lsb0; 0, 1, 0, 0, 0, 0, 0, 0]);
        // An extent new in the intent log (a write queued, not completed) stays.
        let mut intent = bitvec![u64, Lsb0; 0, 1, 1, 0, 0, 0, 0, 0];
        quiet.end_interval(&mut intent, Some(&bitvec![u64, Lsb0; 0, 1, 0, 0, 0, 0, 0, 0]), &mut clearable);
        assert!(!clearable[2] && intent[2]);
    }
}
