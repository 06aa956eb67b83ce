//! The write-intent log and the per-secondary fracture logs: their rules and their files.
//!
//! - The write-intent log is the tracker's pinned intent map (it survives a process crash) and
//!   its checkpoint `intent.log` (it survives a host crash, up to the last checkpoint). An extent
//!   leaves it lazily: only after it has been clean on every unfractured secondary for
//!   `INTENT_QUIET_CHECKPOINTS` checkpoints in a row (`IntentQuiet`).
//! - A fracture log `fracture-<name>.log` holds the extents one fractured secondary has not
//!   acknowledged, with its resync state (full sync, verify, administrator fracture).
//!
//! Owns the log format. Invariant: a log is replaced atomically (`envelope::replace_file`), so
//! a crash leaves the old file or the new one; and a file that fails any check (envelope,
//! fields, geometry, mirror, secondary) is an error, never an empty log.
//!
//! A log is a body in the common envelope (`envelope`, magic "RPLLOG", version 3):
//!
//! ```text
//! 0    kind               u32     1 intent, 2 fracture
//! 4    flags              u32     FLAG_*
//! 8    mirror_id          u64
//! 16   secondary_id       u64     0 for the intent log
//! 24   generation         u64     the mirror's generation
//! 32   sequence           u64     checkpoint number, increasing
//! 40   extent_bytes       u64
//! 48   image_bytes        u64
//! 56   resync_bytes_done  u64
//! 64   verify_next_extent u64
//! 72   saved_unix_ms      u64
//! 80   resync_rate        u64     bytes per second the resync last ran at
//! 88   bitmap             ceil(extents / 64) little-endian u64 words; no bit past the last
//!                         extent is set
//! ```
//!
//! Versions 1 and 2 (before the envelope: the same fields after a 24-byte header of their
//! own, version 1 without the resync rate) are still read, never written.

use std::path::{Path, PathBuf};

use bitvec::prelude::*;
use sha2::Digest as _;

use crate::envelope;

/// The logs' envelope: version 3 is the first in it (1 and 2 are read by `legacy`). The
/// body's limit is the envelope's (a u32 length): a bitmap of up to 4 GiB, 32 Gi extents.
pub const LOG_KIND: envelope::Kind = envelope::Kind {
    magic: *b"RPLLOG\0\0",
    version: 3,
    oldest_version: 3,
    body_bytes_max: u32::MAX as usize,
};
/// Bytes of the body before the bitmap: kind, flags and `LOG_U64_FIELDS` u64 fields.
const LOG_FIELDS_BYTES: usize = 8 + 8 * LOG_U64_FIELDS;
const LOG_U64_FIELDS: usize = 10;
/// The largest bitmap a log holds.
pub const BITMAP_BYTES_MAX: u64 = u32::MAX as u64 - LOG_FIELDS_BYTES as u64;
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

    /// The u64 fields in file order.
    fn u64_fields(&self) -> [u64; LOG_U64_FIELDS] {
        [
            self.mirror_id,
            self.secondary_id,
            self.generation,
            self.sequence,
            self.extent_bytes,
            self.image_bytes,
            self.resync_bytes_done,
            self.verify_next_extent,
            self.saved_unix_ms,
            self.resync_rate_bytes_per_s,
        ]
    }

    fn from_u64_fields(kind: LogKind, flags: u32, fields: [u64; LOG_U64_FIELDS]) -> Self {
        let [
            mirror_id,
            secondary_id,
            generation,
            sequence,
            extent_bytes,
            image_bytes,
            resync_bytes_done,
            verify_next_extent,
            saved_unix_ms,
            resync_rate_bytes_per_s,
        ] = fields;
        Self {
            kind,
            flags,
            mirror_id,
            secondary_id,
            generation,
            sequence,
            extent_bytes,
            image_bytes,
            resync_bytes_done,
            verify_next_extent,
            saved_unix_ms,
            resync_rate_bytes_per_s,
        }
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
    #[error(transparent)]
    File(#[from] envelope::FileError),
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

/// Encodes a log in its envelope (the current version); `bits` has exactly
/// `header.extent_count()` bits.
pub fn encode(header: &LogHeader, bits: &BitSlice<u64, Lsb0>) -> Vec<u8> {
    assert_eq!(bits.len() as u64, header.extent_count(), "bitmap length is the extent count");
    let words = bits.len().div_ceil(64);
    let mut body = Vec::with_capacity(LOG_FIELDS_BYTES + words * 8);
    body.extend_from_slice(&(header.kind as u32).to_le_bytes());
    body.extend_from_slice(&header.flags.to_le_bytes());
    for field in header.u64_fields() {
        body.extend_from_slice(&field.to_le_bytes());
    }
    assert_eq!(body.len(), LOG_FIELDS_BYTES);
    for chunk in bits.chunks(64) {
        body.extend_from_slice(&chunk.load_le::<u64>().to_le_bytes());
    }
    envelope::seal(&LOG_KIND, &body)
}

/// Decodes a log without trusting any byte of it: every malformed input is a reason string.
pub fn decode(bytes: &[u8]) -> Result<(LogHeader, BitVec<u64, Lsb0>), String> {
    let short = |e: envelope::ShortRead| format!("fields cut short: {e}");
    // The kind and flags, then the u64 fields and the bitmap.
    let (version, kind_and_flags, rest) = match envelope::peek_version(&LOG_KIND, bytes) {
        Some(version @ 1..=2) => legacy::open(bytes, version)?,
        _ => {
            let (version, body) = envelope::open(&LOG_KIND, bytes).map_err(|e| e.to_string())?;
            let mut body = envelope::Reader::new(body);
            (version, body.bytes(8).map_err(short)?, body.rest())
        }
    };
    let mut head = envelope::Reader::new(kind_and_flags);
    let kind = match head.u32().map_err(short)? {
        1 => LogKind::Intent,
        2 => LogKind::Fracture,
        other => return Err(format!("unknown kind {other}")),
    };
    let flags = head.u32().map_err(short)?;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let mut fields = envelope::Reader::new(rest);
    let mut u64s = [0u64; LOG_U64_FIELDS];
    // Version 1 had no resync rate (the last field), read as 0.
    let count = if version == 1 { LOG_U64_FIELDS - 1 } else { LOG_U64_FIELDS };
    for field in &mut u64s[..count] {
        *field = fields.u64().map_err(short)?;
    }
    let header = LogHeader::from_u64_fields(kind, flags, u64s);
    let bits = decode_bitmap(&header, fields.rest())?;
    Ok((header, bits))
}

/// The bitmap of a log whose header decoded as `header`: exactly its extents' words, no bit
/// set past the last extent, and a verify position inside the image.
fn decode_bitmap(header: &LogHeader, body: &[u8]) -> Result<BitVec<u64, Lsb0>, String> {
    crate::model::ExtentBytes::new(header.extent_bytes).map_err(|e| e.to_string())?;
    let extents = header.extent_count();
    let words = extents.div_ceil(64);
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
    Ok(bits)
}

/// Logs of versions 1 and 2, written before the envelope: magic, version, kind and flags,
/// the checksum at offset 20 over the whole file (no length), then the fields and the bitmap
/// as in the envelope's body. Read so that an upgraded primary keeps what its predecessor
/// logged; never written.
mod legacy {
    use super::envelope::Reader;

    const KIND_AT: usize = 12;
    const CRC_AT: usize = 20;
    const FIELDS_AT: usize = 24;
    /// A version 1 header had no resync rate.
    const HEADER_BYTES_V1: usize = 96;
    const HEADER_BYTES_V2: usize = 104;

    /// Checks a version 1 or 2 file; returns its kind and flags, and its fields and bitmap.
    pub(super) fn open(bytes: &[u8], version: u32) -> Result<(u32, &[u8], &[u8]), String> {
        let header_bytes = if version == 1 { HEADER_BYTES_V1 } else { HEADER_BYTES_V2 };
        if bytes.len() < header_bytes {
            return Err(format!("{} bytes, shorter than the {header_bytes}-byte header", bytes.len()));
        }
        let stored = Reader::new(&bytes[CRC_AT..]).u32().map_err(|e| e.to_string())?;
        let computed = crc32c::crc32c_append(crc32c::crc32c(&bytes[..CRC_AT]), &[0; 4]);
        let computed = crc32c::crc32c_append(computed, &bytes[FIELDS_AT..]);
        if stored != computed {
            return Err(format!("checksum {stored:#010x}, computed {computed:#010x}"));
        }
        Ok((version, &bytes[KIND_AT..CRC_AT], &bytes[FIELDS_AT..]))
    }
}

/// A log read back: its header and its bitmap (one bit per extent).
pub type Loaded = (LogHeader, BitVec<u64, Lsb0>);

/// Loads `dir/name`: `Ok(None)` when there is no such file, an error when it is damaged or
/// belongs to another mirror, secondary or geometry.
pub fn load(dir: &Path, name: &str, identity: &LogIdentity) -> Result<Option<Loaded>, LogError> {
    load_from(&envelope::StateDir(dir.to_path_buf()), name, identity)
}

/// As [`load`], from any state files.
pub fn load_from(
    files: &impl envelope::StateFiles,
    name: &str,
    identity: &LogIdentity,
) -> Result<Option<Loaded>, LogError> {
    let path = files.path(name);
    let Some(bytes) = files.read(name)? else { return Ok(None) };
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

    /// A file as the builds before the envelope wrote it: version 1 (no resync rate) or 2.
    fn legacy_file(header: &LogHeader, bits: &BitSlice<u64, Lsb0>, version: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&LOG_KIND.magic);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(header.kind as u32).to_le_bytes());
        out.extend_from_slice(&header.flags.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let fields = header.u64_fields();
        for field in &fields[..if version == 1 { LOG_U64_FIELDS - 1 } else { LOG_U64_FIELDS }] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        for chunk in bits.chunks(64) {
            out.extend_from_slice(&chunk.load_le::<u64>().to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Files of versions 1 (no resync rate, read as 0) and 2 are read; a flipped bit in one is
    /// caught by its own checksum.
    #[test]
    fn version_1_and_2_files_are_read() {
        let mut bits = bitvec![u64, Lsb0; 0; 100];
        bits.set(3, true);
        let header = header(100, FLAG_FRACTURED);
        let v1 = legacy_file(&header, &bits, 1);
        assert_eq!(decode(&v1), Ok((LogHeader { resync_rate_bytes_per_s: 0, ..header }, bits.clone())));
        let mut v2 = legacy_file(&header, &bits, 2);
        assert_eq!(decode(&v2), Ok((header, bits)));
        v2[30] ^= 4;
        assert!(decode(&v2).unwrap_err().contains("checksum"));
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

        /// Bodies of any bytes, sealed in a sound envelope, reach the field decoder: a reason
        /// or a log, never a panic; the same for files of the legacy versions with a right
        /// checksum.
        #[test]
        fn sealed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200), version in 1u32..=2) {
            let _ = decode(&envelope::seal(&LOG_KIND, &body));
            let mut legacy = body;
            legacy.resize(legacy.len().max(24), 0);
            legacy[..8].copy_from_slice(&LOG_KIND.magic);
            legacy[8..12].copy_from_slice(&version.to_le_bytes());
            legacy[20..24].fill(0);
            let crc = crc32c::crc32c(&legacy);
            legacy[20..24].copy_from_slice(&crc.to_le_bytes());
            let _ = decode(&legacy);
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
        envelope::replace_file(&dir, "f.log", &encode(&header, &bits)).unwrap();
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
