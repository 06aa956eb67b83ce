//! Consistency points: what a secondary records when the primary tells it that its image is
//! consistent as of a point (every extent written before it acknowledged, with the primary's
//! filesystem frozen or its application quiesced): `STATE_DIR/consistency-point`.
//!
//! ```text
//! 0   magic             8 bytes "RPLCONS\0"
//! 8   version           u32     POINT_VERSION
//! 12  crc32c            u32     over the record with this field zero
//! 16  generation        u64     the mirror's generation
//! 24  point_unix_ms     u64     when the primary took the point
//! 32  image_bytes       u64
//! 40  recorded_unix_ms  u64     when this secondary made it durable
//! ```
//!
//! Owns the record's format; it is replaced atomically (`logs::replace_file`).

pub const POINT_FILE: &str = "consistency-point";
pub const POINT_MAGIC: [u8; 8] = *b"RPLCONS\0";
pub const POINT_VERSION: u32 = 1;
pub const POINT_BYTES: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConsistencyRecord {
    pub generation: u64,
    pub point_unix_ms: u64,
    pub image_bytes: u64,
    pub recorded_unix_ms: u64,
}

impl ConsistencyRecord {
    pub fn encode(&self) -> [u8; POINT_BYTES] {
        let mut out = [0u8; POINT_BYTES];
        out[..8].copy_from_slice(&POINT_MAGIC);
        out[8..12].copy_from_slice(&POINT_VERSION.to_le_bytes());
        for (i, field) in [self.generation, self.point_unix_ms, self.image_bytes, self.recorded_unix_ms]
            .into_iter()
            .enumerate()
        {
            out[16 + 8 * i..24 + 8 * i].copy_from_slice(&field.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a record; any malformed input is a reason, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let bytes: &[u8; POINT_BYTES] =
            bytes.try_into().map_err(|_| format!("{} bytes, a record has {POINT_BYTES}", bytes.len()))?;
        if bytes[..8] != POINT_MAGIC {
            return Err("bad magic".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if u32_at(8) != POINT_VERSION {
            return Err(format!("version {}, this build reads {POINT_VERSION}", u32_at(8)));
        }
        let mut zeroed = *bytes;
        zeroed[12..16].fill(0);
        let computed = crc32c::crc32c(&zeroed);
        if computed != u32_at(12) {
            return Err(format!("checksum {:#010x}, computed {computed:#010x}", u32_at(12)));
        }
        Ok(Self {
            generation: u64_at(16),
            point_unix_ms: u64_at(24),
            image_bytes: u64_at(32),
            recorded_unix_ms: u64_at(40),
        })
    }

    /// The record in `state_dir`, if any; a damaged one is reported as an error.
    pub fn load(state_dir: &std::path::Path) -> Result<Option<Self>, String> {
        let path = state_dir.join(POINT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Self::decode(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip_and_any_flip_is_caught(g in any::<u64>(), p in any::<u64>(), i in any::<u64>(), r in any::<u64>(), flip in 0usize..POINT_BYTES * 8) {
            let record = ConsistencyRecord { generation: g, point_unix_ms: p, image_bytes: i, recorded_unix_ms: r };
            let mut bytes = record.encode();
            prop_assert_eq!(ConsistencyRecord::decode(&bytes), Ok(record));
            bytes[flip / 8] ^= 1 << (flip % 8);
            prop_assert!(ConsistencyRecord::decode(&bytes).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = ConsistencyRecord::decode(&bytes);
        }
    }
}
