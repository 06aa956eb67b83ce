//! The journal file's layout: two superblock slots, then a ring of records.
//!
//! ```text
//! 0       superblock slot 0   4 KiB: an envelope (`SUPERBLOCK_KIND`), zero-padded
//! 4096    superblock slot 1   the same; the valid one of higher generation is current
//! 8192    records             a ring of `capacity` bytes; each record 8-byte aligned:
//!
//!   0   magic      u32   "RPJR"
//!   4   version    u8    RECORD_VERSION
//!   5   kind       u8    Data 1, Zeroes 2, Commit 3, Wrap 4
//!   6   flags      u16   FLAG_UNMAP (Zeroes), FLAG_IN_ORDER and FLAG_CLIENT (Data, Zeroes)
//!   8   len        u32   payload bytes (Data only)
//!   12  crc32c     u32   over the header with this field zero, then the payload
//!   16  seq        u64   one more than the record before it in the ring
//!   24  tag        u64   Data, Zeroes: the cut the frame belongs to; Commit: the cut
//!   32  offset     u64   Data, Zeroes: byte offset on the image
//!   40  aux        u64   Zeroes: length in bytes; Commit: the cut's time (Unix ms)
//!   48  payload
//! ```
//!
//! A Wrap record says the next record is at the start of the ring. The ring is read from the
//! superblock's head, record after record while each checks out and its `seq` is the next one:
//! the first that does not (a torn or never-written record, or one of an earlier lap) ends it.
//!
//! Written by hand, as the envelope is: fixed little-endian fields read with the one bounded
//! `envelope::Reader`.

use crate::envelope::{self, Reader};

pub const SUPERBLOCK_SLOT_BYTES: u64 = 4096;
/// Where the ring starts in the file.
pub const RING_START: u64 = 2 * SUPERBLOCK_SLOT_BYTES;
pub const RECORD_HEADER_BYTES: usize = 48;
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"RPJR");
pub const RECORD_VERSION: u8 = 1;
/// Records start at multiples of this.
pub const RECORD_ALIGN: u64 = 8;

pub const FLAG_UNMAP: u16 = 1;
/// A client's write through the export that the primary sent in order (see `wire`).
pub const FLAG_IN_ORDER: u16 = 2;
/// A client's write through the export (`BlockData`, `Zeroes`): under the sync policy the
/// client was told it is on every image once this record was durable.
pub const FLAG_CLIENT: u16 = 4;
const FLAGS_KNOWN: u16 = FLAG_UNMAP | FLAG_IN_ORDER | FLAG_CLIENT;

pub const SUPERBLOCK_KIND: envelope::Kind =
    envelope::Kind { magic: *b"RPLJRNL\0", version: 1, oldest_version: 1, body_bytes_max: 64 };
const SUPERBLOCK_BODY_BYTES: usize = 64;
const _: () = assert!(envelope::HEADER_BYTES + SUPERBLOCK_BODY_BYTES <= SUPERBLOCK_SLOT_BYTES as usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Data = 1,
    Zeroes = 2,
    Commit = 3,
    Wrap = 4,
}

impl RecordKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Data,
            2 => Self::Zeroes,
            3 => Self::Commit,
            4 => Self::Wrap,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u16,
    pub len: u32,
    pub seq: u64,
    pub tag: u64,
    pub offset: u64,
    pub aux: u64,
}

impl RecordHeader {
    /// Bytes the record takes in the ring, padding included.
    pub fn ring_bytes(&self) -> u64 {
        record_ring_bytes(self.len)
    }
}

pub fn record_ring_bytes(payload_bytes: u32) -> u64 {
    (RECORD_HEADER_BYTES as u64 + u64::from(payload_bytes)).next_multiple_of(RECORD_ALIGN)
}

/// Why bytes in the ring are not a record (the end of the readable journal).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no record magic")]
    Magic,
    #[error("record version {0}")]
    Version(u8),
    #[error("record kind {0}")]
    Kind(u8),
    #[error("record flags {0:#06x}")]
    Flags(u16),
    #[error("record of {len} payload bytes: over {limit}")]
    TooLong { len: u32, limit: u32 },
    #[error("record checksum")]
    Checksum,
}

/// The header's bytes, its checksum over `payload` filled in.
pub fn encode_header(header: &RecordHeader, payload: &[u8]) -> [u8; RECORD_HEADER_BYTES] {
    assert_eq!(header.len as usize, payload.len(), "the header says the payload's length");
    let mut bytes = [0u8; RECORD_HEADER_BYTES];
    bytes[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    bytes[4] = RECORD_VERSION;
    bytes[5] = header.kind as u8;
    bytes[6..8].copy_from_slice(&header.flags.to_le_bytes());
    bytes[8..12].copy_from_slice(&header.len.to_le_bytes());
    bytes[16..24].copy_from_slice(&header.seq.to_le_bytes());
    bytes[24..32].copy_from_slice(&header.tag.to_le_bytes());
    bytes[32..40].copy_from_slice(&header.offset.to_le_bytes());
    bytes[40..48].copy_from_slice(&header.aux.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes), payload);
    bytes[12..16].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Decodes a header's fields (not its checksum: that needs the payload, see `check`).
/// `payload_bytes_max`: the longest payload this journal holds.
pub fn decode_header(
    bytes: &[u8; RECORD_HEADER_BYTES],
    payload_bytes_max: u32,
) -> Result<RecordHeader, RecordError> {
    let mut reader = Reader::new(bytes);
    let mut field = || reader.u64().expect("a header holds six u64");
    let (word0, word1, seq, tag, offset, aux) = (field(), field(), field(), field(), field(), field());
    if word0 as u32 != RECORD_MAGIC {
        return Err(RecordError::Magic);
    }
    let version = (word0 >> 32) as u8;
    if version != RECORD_VERSION {
        return Err(RecordError::Version(version));
    }
    let kind = (word0 >> 40) as u8;
    let kind = RecordKind::from_u8(kind).ok_or(RecordError::Kind(kind))?;
    let flags = (word0 >> 48) as u16;
    let allowed = match kind {
        RecordKind::Data => FLAG_IN_ORDER | FLAG_CLIENT,
        RecordKind::Zeroes => FLAGS_KNOWN,
        RecordKind::Commit | RecordKind::Wrap => 0,
    };
    if flags & !allowed != 0 {
        return Err(RecordError::Flags(flags));
    }
    let len = word1 as u32;
    let limit = if kind == RecordKind::Data { payload_bytes_max } else { 0 };
    if len > limit {
        return Err(RecordError::TooLong { len, limit });
    }
    Ok(RecordHeader { kind, flags, len, seq, tag, offset, aux })
}

/// Whether `payload` is the one the header's checksum was computed over.
pub fn check(bytes: &[u8; RECORD_HEADER_BYTES], payload: &[u8]) -> Result<(), RecordError> {
    let stored = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let mut zeroed = *bytes;
    zeroed[12..16].fill(0);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&zeroed), payload);
    if crc == stored { Ok(()) } else { Err(RecordError::Checksum) }
}

/// What the superblock keeps: where the ring's unapplied records begin, and the image's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Superblock {
    /// Higher wins between the two slots.
    pub generation: u64,
    pub capacity: u64,
    /// Ring offset (from `RING_START`) and sequence of the first record still to read.
    pub head: u64,
    pub head_seq: u64,
    /// The last cut applied to the image (0: none yet), and its time.
    pub committed_cut: u64,
    pub committed_unix_ms: u64,
    /// The image is not a cut of the primary until a cut at or past this one is applied;
    /// 0: it is one now. `u64::MAX`: it never was (a first sync in progress).
    pub inconsistent_until: u64,
    /// When a session with the primary last ended (Unix ms, 0 never), and when one began.
    pub session_ended_unix_ms: u64,
}

pub fn encode_superblock(superblock: &Superblock) -> Vec<u8> {
    let mut body = Vec::with_capacity(SUPERBLOCK_BODY_BYTES);
    for field in [
        superblock.generation,
        superblock.capacity,
        superblock.head,
        superblock.head_seq,
        superblock.committed_cut,
        superblock.committed_unix_ms,
        superblock.inconsistent_until,
        superblock.session_ended_unix_ms,
    ] {
        body.extend_from_slice(&field.to_le_bytes());
    }
    let mut slot = envelope::seal(&SUPERBLOCK_KIND, &body);
    slot.resize(SUPERBLOCK_SLOT_BYTES as usize, 0);
    slot
}

/// Decodes a superblock slot (its envelope, then the body); `None` if it is not a valid one.
pub fn decode_superblock(slot: &[u8]) -> Option<Superblock> {
    let body_bytes = u32::from_le_bytes(slot.get(16..20)?.try_into().ok()?) as usize;
    let sealed = slot.get(..envelope::HEADER_BYTES.checked_add(body_bytes)?)?;
    let (_, body) = envelope::open(&SUPERBLOCK_KIND, sealed).ok()?;
    if body.len() != SUPERBLOCK_BODY_BYTES {
        return None;
    }
    let mut reader = Reader::new(body);
    let mut field = || reader.u64().ok();
    Some(Superblock {
        generation: field()?,
        capacity: field()?,
        head: field()?,
        head_seq: field()?,
        committed_cut: field()?,
        committed_unix_ms: field()?,
        inconsistent_until: field()?,
        session_ended_unix_ms: field()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: RecordKind, len: u32) -> RecordHeader {
        RecordHeader { kind, flags: 0, len, seq: 7, tag: 9, offset: 4096, aux: 0 }
    }

    #[test]
    fn a_record_round_trips_and_a_changed_byte_is_caught() {
        let payload = vec![0x5a; 512];
        let bytes = encode_header(&header(RecordKind::Data, 512), &payload);
        let decoded = decode_header(&bytes, 1 << 20).expect("decodes");
        assert_eq!(decoded, header(RecordKind::Data, 512));
        check(&bytes, &payload).expect("checksum");
        let mut changed = payload.clone();
        changed[100] ^= 1;
        assert_eq!(check(&bytes, &changed), Err(RecordError::Checksum));
        assert_eq!(decoded.ring_bytes(), 560);
    }

    #[test]
    fn payloads_only_on_data_and_within_the_limit() {
        let bytes = encode_header(&header(RecordKind::Data, 4096), &[0; 4096]);
        assert_eq!(decode_header(&bytes, 2048), Err(RecordError::TooLong { len: 4096, limit: 2048 }));
        let mut commit = encode_header(&header(RecordKind::Commit, 0), &[]);
        commit[8] = 1; // a commit claiming a payload
        assert_eq!(decode_header(&commit, 1 << 20), Err(RecordError::TooLong { len: 1, limit: 0 }));
    }

    #[test]
    fn superblock_slots_round_trip_and_damage_is_refused() {
        let superblock = Superblock {
            generation: 3,
            capacity: 1 << 20,
            head: 4096,
            head_seq: 12,
            committed_cut: 40,
            committed_unix_ms: 1_700_000_000_000,
            inconsistent_until: 0,
            session_ended_unix_ms: 5,
        };
        let slot = encode_superblock(&superblock);
        assert_eq!(slot.len(), SUPERBLOCK_SLOT_BYTES as usize);
        assert_eq!(decode_superblock(&slot), Some(superblock));
        let mut torn = slot.clone();
        torn[30] ^= 0xff;
        assert_eq!(decode_superblock(&torn), None);
        assert_eq!(decode_superblock(&[0; 4096]), None);
    }

    proptest! {
        /// Whatever the bytes, decoding answers (no panic), and only checked records pass.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), RECORD_HEADER_BYTES..600)) {
            let head: &[u8; RECORD_HEADER_BYTES] = bytes[..RECORD_HEADER_BYTES].try_into().unwrap();
            if let Ok(header) = decode_header(head, 512) {
                let payload = &bytes[RECORD_HEADER_BYTES..];
                let payload = &payload[..payload.len().min(header.len as usize)];
                let _ = check(head, payload);
            }
            let _ = decode_superblock(&bytes);
        }

        /// A valid record with one byte changed anywhere is never taken for a valid record.
        #[test]
        fn any_flipped_byte_is_caught(at in 0usize..(RECORD_HEADER_BYTES + 64), bit in 0u8..8) {
            let payload = [0x33u8; 64];
            let mut record = encode_header(&header(RecordKind::Data, 64), &payload).to_vec();
            record.extend_from_slice(&payload);
            record[at] ^= 1 << bit;
            let head: &[u8; RECORD_HEADER_BYTES] = record[..RECORD_HEADER_BYTES].try_into().unwrap();
            let valid = decode_header(head, 1 << 20)
                .ok()
                .filter(|h| h.len == 64)
                .and_then(|_| check(head, &record[RECORD_HEADER_BYTES..]).ok());
            prop_assert!(valid.is_none());
        }
    }
}
