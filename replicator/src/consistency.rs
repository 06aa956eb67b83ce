//! Consistency points: what a secondary records when the primary tells it that its image is
//! consistent as of a point (every extent written before it acknowledged, with the primary's
//! filesystem frozen or its application quiesced): `STATE_DIR/consistency-point`.
//!
//! The record is a body in the common envelope (`envelope`, magic "RPLCONS", version 2):
//!
//! ```text
//! 0   generation        u64     the mirror's generation
//! 8   point_unix_ms     u64     when the primary took the point
//! 16  image_bytes       u64
//! 24  recorded_unix_ms  u64     when this secondary made it durable
//! ```
//!
//! Version 1 (before the envelope: magic, version, a checksum at 12 over the record, then the
//! same four fields) is still read, never written. Owns the record's format; it is replaced
//! atomically (`envelope::replace_file`).

use crate::envelope::{self, Reader};

pub const POINT_FILE: &str = "consistency-point";
const RECORD_BYTES: usize = 32;
pub const POINT_KIND: envelope::Kind =
    envelope::Kind { magic: *b"RPLCONS\0", version: 2, oldest_version: 2, body_bytes_max: RECORD_BYTES };

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConsistencyRecord {
    pub generation: u64,
    pub point_unix_ms: u64,
    pub image_bytes: u64,
    pub recorded_unix_ms: u64,
}

impl ConsistencyRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = [0u8; RECORD_BYTES];
        for (i, field) in [self.generation, self.point_unix_ms, self.image_bytes, self.recorded_unix_ms]
            .into_iter()
            .enumerate()
        {
            body[8 * i..8 * i + 8].copy_from_slice(&field.to_le_bytes());
        }
        envelope::seal(&POINT_KIND, &body)
    }

    /// Decodes a record; any malformed input is a reason, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let body = match envelope::peek_version(&POINT_KIND, bytes) {
            Some(1) => legacy_body(bytes)?,
            _ => envelope::open(&POINT_KIND, bytes).map_err(|e| e.to_string())?.1,
        };
        if body.len() != RECORD_BYTES {
            return Err(format!("a record of {} bytes, expected {RECORD_BYTES}", body.len()));
        }
        let mut fields = Reader::new(body);
        let mut next = || fields.u64().map_err(|e| e.to_string());
        Ok(Self {
            generation: next()?,
            point_unix_ms: next()?,
            image_bytes: next()?,
            recorded_unix_ms: next()?,
        })
    }

    /// The record in `state_dir`, if any; a damaged one is reported as an error.
    pub fn load(state_dir: &std::path::Path) -> Result<Option<Self>, String> {
        let path = state_dir.join(POINT_FILE);
        let Some(bytes) = envelope::read_file(state_dir, POINT_FILE).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        Self::decode(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A version 1 record's fields: 48 bytes, the checksum at 12 over the record with it zero.
fn legacy_body(bytes: &[u8]) -> Result<&[u8], String> {
    const LEGACY_BYTES: usize = 16 + RECORD_BYTES;
    if bytes.len() != LEGACY_BYTES {
        return Err(format!("{} bytes, a version 1 record has {LEGACY_BYTES}", bytes.len()));
    }
    let stored = Reader::new(&bytes[12..]).u32().map_err(|e| e.to_string())?;
    let computed =
        crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&bytes[..12]), &[0; 4]), &bytes[16..]);
    if computed != stored {
        return Err(format!("checksum {stored:#010x}, computed {computed:#010x}"));
    }
    Ok(&bytes[16..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version 1 record, as the build before the envelope wrote it, is still read.
    #[test]
    fn version_1_records_are_read() {
        let record =
            ConsistencyRecord { generation: 3, point_unix_ms: 5, image_bytes: 7, recorded_unix_ms: 9 };
        let mut v1 = [0u8; 48];
        v1[..8].copy_from_slice(&POINT_KIND.magic);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1[16..].copy_from_slice(envelope::open(&POINT_KIND, &record.encode()).expect("sealed").1);
        let crc = crc32c::crc32c(&v1);
        v1[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(ConsistencyRecord::decode(&v1), Ok(record));
        v1[40] ^= 1;
        assert!(ConsistencyRecord::decode(&v1).is_err());
    }

    proptest! {
        #[test]
        fn round_trip_and_any_flip_is_caught(g in any::<u64>(), p in any::<u64>(), i in any::<u64>(), r in any::<u64>(), flip in any::<prop::sample::Index>()) {
            let record = ConsistencyRecord { generation: g, point_unix_ms: p, image_bytes: i, recorded_unix_ms: r };
            let mut bytes = record.encode();
            prop_assert_eq!(ConsistencyRecord::decode(&bytes), Ok(record));
            let flip = flip.index(bytes.len() * 8);
            bytes[flip / 8] ^= 1 << (flip % 8);
            prop_assert!(ConsistencyRecord::decode(&bytes).is_err());
        }

        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..80), version in 0u32..4) {
            if bytes.len() >= 12 {
                bytes[..8].copy_from_slice(&POINT_KIND.magic);
                bytes[8..12].copy_from_slice(&version.to_le_bytes());
            }
            let _ = ConsistencyRecord::decode(&bytes);
        }
    }
}
