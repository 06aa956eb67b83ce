//! The mirror database: what a mirror is (name, id, generation, extent size, policies) and
//! which images it has, kept in `STATE_DIR/mirror.db` on every member; and the mirror's state
//! (ACTIVE, INACTIVE, ATTENTION) with the rules that move it.
//!
//! The file is a JSON body in the common envelope (`envelope`, magic "RPLMDB", version 1), so
//! an operator can read it with `replicator status --json` and a damaged file is refused, never
//! half-read. The same envelope travels in `MirrorDb` frames.
//!
//! Owns the format and the state rules. Invariant: the file is replaced atomically
//! (`envelope::replace_file`), and every change made at the primary carries a higher `revision`; a
//! secondary never replaces its copy with a lower revision or another mirror's.

use std::net::SocketAddr;
use std::path::Path;

use crate::envelope;

use crate::model::{
    ActivationPolicy, ExtentBytes, IMAGES_MAX, ImageState, MirrorState, NameOf, RecoveryPolicy, WritePolicy,
    check_name,
};

pub const DB_FILE: &str = "mirror.db";
/// Largest body accepted (from disk or from the wire): 8 images take well under this.
pub const DB_BODY_BYTES_MAX: usize = 64 * 1024;
pub const DB_KIND: envelope::Kind = envelope::Kind {
    magic: *b"RPLMDB\0\0",
    version: 1,
    oldest_version: 1,
    body_bytes_max: DB_BODY_BYTES_MAX,
};
/// What `create` accepts and the decoder checks: minimum images (the primary alone, up to
/// every image) and sync priority. (The extent size is an `ExtentBytes`, checked as it is read.)
pub const MINIMUM_IMAGES: std::ops::RangeInclusive<u32> = 1..=crate::model::IMAGES_MAX as u32;
pub const SYNC_PRIORITY: std::ops::RangeInclusive<u8> = 1..=10;
const _: () = assert!(envelope::HEADER_BYTES + DB_BODY_BYTES_MAX == crate::wire::MIRROR_DB_BYTES_MAX);

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Designator {
    Primary,
    Secondary,
}

/// One image of the mirror.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub name: String,
    pub designator: Designator,
    /// Where a secondary listens; none for the primary.
    pub address: Option<SocketAddr>,
    /// The device on its host, when known.
    pub device: Option<String>,
    pub state: ImageState,
    /// False while the primary cannot reach it: it gets the current database when it returns.
    pub reachable: bool,
    /// The mirror generation this image last took part in (a secondary whose generation is
    /// behind the mirror's missed a promote, and may hold writes nobody else has).
    pub generation: u64,
    pub sync_rate_bytes_per_s: u64,
    pub resync_bytes_done: u64,
    pub recovery_policy: RecoveryPolicy,
}

/// The mirror database.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorDb {
    pub name: String,
    pub id: u64,
    /// Bumped by every change; a copy with a lower revision is older.
    pub revision: u64,
    pub state: MirrorState,
    /// Why the mirror is in its state (for ATTENTION: what to fix).
    pub state_cause: String,
    pub generation: u64,
    pub extent_bytes: ExtentBytes,
    pub image_bytes: u64,
    /// Bytes of one fracture log's bitmap.
    pub fracture_log_bytes: u64,
    /// Images (the primary included) that must be SYNCHRONIZED or CONSISTENT.
    pub minimum_images: u32,
    /// Secondaries that may be unreachable or fractured before the mirror needs attention.
    pub maximum_missing_images: u32,
    /// Relative resync priority (1 lowest .. 10 highest); informational until sync scheduling
    /// across mirrors exists.
    pub sync_priority: u8,
    pub write_policy: WritePolicy,
    /// Unacknowledged bytes allowed per secondary.
    pub write_backlog_bytes: u64,
    pub activation_policy: ActivationPolicy,
    pub images: Vec<ImageRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{path}: {reason}")]
    Damaged { path: String, reason: String },
    #[error(transparent)]
    File(#[from] envelope::FileError),
}

impl MirrorDb {
    pub fn primary(&self) -> Option<&ImageRecord> {
        self.images.iter().find(|i| i.designator == Designator::Primary)
    }

    pub fn secondaries(&self) -> impl Iterator<Item = &ImageRecord> {
        self.images.iter().filter(|i| i.designator == Designator::Secondary)
    }

    pub fn image_mut(&mut self, name: &str) -> Option<&mut ImageRecord> {
        self.images.iter_mut().find(|i| i.name == name)
    }

    /// Takes each image's run-time record (state, reachability, generation, progress) from
    /// `current`, for the images both hold: a change made from an older copy keeps them.
    pub fn take_image_states(&mut self, current: &MirrorDb) {
        for image in &mut self.images {
            if let Some(now) = current.images.iter().find(|i| i.name == image.name) {
                image.state = now.state;
                image.reachable = now.reachable;
                image.generation = now.generation;
                image.resync_bytes_done = now.resync_bytes_done;
            }
        }
    }

    /// The state the rules give, and why: INACTIVE stays until `activate`; too few images or
    /// too many missing is ATTENTION; under the manual activation policy ATTENTION stays until
    /// `activate` even once the cause is gone.
    pub fn evaluate(&self) -> (MirrorState, String) {
        if self.state == MirrorState::Inactive {
            return (MirrorState::Inactive, "deactivated by the administrator".into());
        }
        let usable =
            1 + self.secondaries().filter(|i| i.reachable && i.state == ImageState::Synchronized).count();
        let missing =
            self.secondaries().filter(|i| !i.reachable || i.state == ImageState::Unsynchronized).count();
        let cause = if (usable as u32) < self.minimum_images {
            Some(format!(
                "{usable} of the minimum {} images are SYNCHRONIZED (the primary counts as one)",
                self.minimum_images
            ))
        } else if missing as u32 > self.maximum_missing_images {
            Some(format!(
                "{missing} secondaries are missing, over the maximum of {}",
                self.maximum_missing_images
            ))
        } else {
            None
        };
        match cause {
            Some(cause) => (MirrorState::Attention, cause),
            None if self.state == MirrorState::Attention
                && self.activation_policy == ActivationPolicy::Manual =>
            {
                (
                    MirrorState::Attention,
                    "the cause is gone; activation policy manual: run `replicator activate`".into(),
                )
            }
            None => (MirrorState::Active, String::new()),
        }
    }

    /// Encodes the database in its envelope.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("the database serializes");
        envelope::seal(&DB_KIND, &body)
    }

    /// Decodes an envelope: any malformed input is a reason, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (_, body) = envelope::open(&DB_KIND, bytes).map_err(|e| e.to_string())?;
        let db: Self = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
        db.check()?;
        Ok(db)
    }

    /// The rules every database keeps, from disk or from the wire (the extent size is checked
    /// as the body is read): one primary at most, valid names (they become file names), one
    /// name per image (it names the image's fracture log), an address for every secondary (one
    /// without would get nothing, yet count in the mirror's states), and the ranges `create`
    /// and `set` allow (0 minimum images would never need attention).
    pub fn check(&self) -> Result<(), String> {
        if self.images.iter().filter(|i| i.designator == Designator::Primary).count() > 1 {
            return Err("inconsistent: two primaries".into());
        }
        check_name(NameOf::Mirror, &self.name).map_err(|e| e.to_string())?;
        for image in &self.images {
            check_name(NameOf::Image, &image.name).map_err(|e| e.to_string())?;
        }
        if self.images.len() > IMAGES_MAX || self.image_bytes == 0 {
            return Err(format!("{} images of {} bytes", self.images.len(), self.image_bytes));
        }
        if !MINIMUM_IMAGES.contains(&self.minimum_images) || !SYNC_PRIORITY.contains(&self.sync_priority) {
            return Err(format!(
                "out of range: minimum images {}, sync priority {}",
                self.minimum_images, self.sync_priority
            ));
        }
        if let Some(twice) = first_duplicate(self.images.iter().map(|i| i.name.as_str())) {
            return Err(format!("two images named {twice:?}"));
        }
        if let Some(image) = self.secondaries().find(|i| i.address.is_none()) {
            return Err(format!("secondary {:?} has no address", image.name));
        }
        Ok(())
    }

    pub fn load(state_dir: &Path) -> Result<Option<Self>, DbError> {
        let Some(bytes) = envelope::read_file(state_dir, DB_FILE)? else { return Ok(None) };
        let damaged =
            |reason| DbError::Damaged { path: state_dir.join(DB_FILE).display().to_string(), reason };
        Self::decode(&bytes).map(Some).map_err(damaged)
    }

    pub fn store(&self, state_dir: &Path) -> Result<(), DbError> {
        Ok(crate::envelope::replace_file(state_dir, DB_FILE, &self.encode())?)
    }
}

/// A fresh mirror id: random, never 0.
pub fn new_mirror_id() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the kernel's random source");
    u64::from_le_bytes(bytes).max(1)
}

/// A name that `names` holds more than once (image names name fracture logs: one each).
pub(crate) fn first_duplicate<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    names.windows(2).find(|pair| pair[0] == pair[1]).map(|pair| pair[0])
}

/// A mirror of two images (primary "a", secondary "b"), for tests.
#[cfg(test)]
pub(crate) fn sample_db() -> MirrorDb {
    MirrorDb {
        name: "vol1".into(),
        id: 42,
        revision: 3,
        state: MirrorState::Active,
        state_cause: String::new(),
        generation: 1,
        extent_bytes: ExtentBytes::DEFAULT,
        image_bytes: 1 << 30,
        fracture_log_bytes: 2048,
        minimum_images: 2,
        maximum_missing_images: 0,
        sync_priority: 5,
        write_policy: WritePolicy::Async,
        write_backlog_bytes: 64 << 20,
        activation_policy: ActivationPolicy::Automatic,
        images: vec![
            ImageRecord {
                name: "a".into(),
                designator: Designator::Primary,
                address: None,
                device: Some("/dev/vdb".into()),
                state: ImageState::Synchronized,
                reachable: true,
                generation: 1,
                sync_rate_bytes_per_s: 0,
                resync_bytes_done: 0,
                recovery_policy: RecoveryPolicy::Automatic,
            },
            ImageRecord {
                name: "b".into(),
                designator: Designator::Secondary,
                address: Some("10.0.0.2:7788".parse().unwrap()),
                device: None,
                state: ImageState::Synchronized,
                reachable: true,
                generation: 1,
                sync_rate_bytes_per_s: 100 << 20,
                resync_bytes_done: 0,
                recovery_policy: RecoveryPolicy::Manual,
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn db() -> MirrorDb {
        sample_db()
    }

    /// An envelope around `body`, with the checksum right.
    fn seal(body: &[u8]) -> Vec<u8> {
        envelope::seal(&DB_KIND, body)
    }

    fn arbitrary_image() -> impl Strategy<Value = ImageRecord> {
        (
            prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("c-1".to_owned()), "[a-z/._]{0,6}"],
            any::<bool>(),
            proptest::option::of((any::<[u8; 4]>(), any::<u16>())),
            prop_oneof![
                Just(ImageState::Synchronized),
                Just(ImageState::Synchronizing),
                Just(ImageState::Consistent),
                Just(ImageState::Unsynchronized)
            ],
            any::<(bool, u64, u64, u64, bool)>(),
        )
            .prop_map(
                |(name, primary, address, state, (reachable, generation, rate, done, manual))| ImageRecord {
                    name,
                    designator: if primary { Designator::Primary } else { Designator::Secondary },
                    address: address.map(|(ip, port)| SocketAddr::from((ip, port))),
                    device: primary.then(|| "/dev/vdb".to_owned()),
                    state,
                    reachable,
                    generation,
                    sync_rate_bytes_per_s: rate,
                    resync_bytes_done: done,
                    recovery_policy: if manual { RecoveryPolicy::Manual } else { RecoveryPolicy::Automatic },
                },
            )
    }

    fn arbitrary_db() -> impl Strategy<Value = MirrorDb> {
        (
            prop_oneof![Just("vol1".to_owned()), "[a-z0-9 ./]{0,8}"],
            any::<(u64, u64, u64)>(),
            (12u32..=26).prop_map(|shift| ExtentBytes::new(1 << shift).expect("in range")),
            prop_oneof![Just(1u64 << 30), any::<u64>()],
            (0u32..12, any::<u32>(), 0u8..12),
            any::<(bool, u64, bool, u8)>(),
            proptest::collection::vec(arbitrary_image(), 0..10),
        )
            .prop_map(
                |(
                    name,
                    (id, revision, generation),
                    extent_bytes,
                    image_bytes,
                    (minimum, missing, priority),
                    rest,
                    images,
                )| {
                    let (sync, backlog, manual, state) = rest;
                    MirrorDb {
                        name,
                        id,
                        revision,
                        state: [MirrorState::Active, MirrorState::Inactive, MirrorState::Attention]
                            [state as usize % 3],
                        state_cause: "because".into(),
                        generation,
                        extent_bytes,
                        image_bytes,
                        fracture_log_bytes: image_bytes / extent_bytes.get() / 8,
                        minimum_images: minimum,
                        maximum_missing_images: missing,
                        sync_priority: priority,
                        write_policy: if sync { WritePolicy::Sync } else { WritePolicy::Async },
                        write_backlog_bytes: backlog,
                        activation_policy: if manual {
                            ActivationPolicy::Manual
                        } else {
                            ActivationPolicy::Automatic
                        },
                        images,
                    }
                },
            )
    }

    #[test]
    fn two_images_of_one_name_or_a_secondary_without_an_address_are_refused() {
        let mut twice = db();
        twice.images[1].name = "a".into();
        assert!(MirrorDb::decode(&twice.encode()).unwrap_err().contains("two images named"));
        let mut unreachable = db();
        unreachable.images[1].address = None;
        assert!(MirrorDb::decode(&unreachable.encode()).unwrap_err().contains("has no address"));
    }

    /// The extent size is checked as the body is read: a sealed body with one outside the rule
    /// is refused.
    #[test]
    fn an_extent_size_outside_the_rule_is_refused() {
        for extent_bytes in [0u64, 512, 3 * 4096, 128 << 20] {
            let mut body = serde_json::to_value(db()).expect("serializes");
            body["extent_bytes"] = extent_bytes.into();
            let refused = MirrorDb::decode(&seal(&serde_json::to_vec(&body).expect("serializes")));
            assert!(refused.expect_err("refused").contains("extent size"), "{extent_bytes}");
        }
    }

    #[test]
    fn names_that_would_escape_the_state_directory_are_refused() {
        let mut bad = db();
        bad.images[1].name = "../etc".into();
        assert!(MirrorDb::decode(&bad.encode()).is_err());
    }

    #[test]
    fn states_follow_the_rules() {
        let mut db = db();
        assert_eq!(db.evaluate().0, MirrorState::Active);
        db.images[1].reachable = false;
        let (state, cause) = db.evaluate();
        assert_eq!(state, MirrorState::Attention);
        assert!(cause.contains("minimum 2"), "{cause}");
        db.state = MirrorState::Attention;
        db.images[1].reachable = true;
        assert_eq!(db.evaluate().0, MirrorState::Active, "automatic activation");
        db.activation_policy = ActivationPolicy::Manual;
        assert_eq!(db.evaluate().0, MirrorState::Attention, "manual activation waits");
        db.state = MirrorState::Inactive;
        assert_eq!(db.evaluate().0, MirrorState::Inactive);
    }

    proptest! {
        #[test]
        fn round_trip_and_any_flip_is_caught(flip in any::<prop::sample::Index>(), bit in 0u8..8) {
            let db = db();
            let mut bytes = db.encode();
            prop_assert_eq!(MirrorDb::decode(&bytes), Ok(db));
            let at = flip.index(bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(MirrorDb::decode(&bytes).is_err());
        }

        /// Any database the types can hold: one `decode` accepts comes back equal, and it
        /// accepts exactly those that keep the rules (names, one primary, addresses, ranges).
        #[test]
        fn arbitrary_databases_round_trip_or_are_refused_for_a_reason(db in arbitrary_db()) {
            let valid_name = |n: &str| {
                !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            };
            let names: std::collections::BTreeSet<&str> = db.images.iter().map(|i| i.name.as_str()).collect();
            let valid = valid_name(&db.name)
                && db.images.iter().all(|i| valid_name(&i.name))
                && names.len() == db.images.len()
                && db.images.iter().filter(|i| i.designator == Designator::Primary).count() <= 1
                && db.secondaries().all(|i| i.address.is_some())
                && (1..=9).contains(&db.minimum_images)
                && (1..=10).contains(&db.sync_priority)
                && db.images.len() <= 9
                && db.image_bytes > 0;
            match MirrorDb::decode(&db.encode()) {
                Ok(decoded) => {
                    prop_assert!(valid, "accepted a database that breaks a rule: {db:?}");
                    prop_assert_eq!(decoded, db);
                }
                Err(reason) => prop_assert!(!valid, "refused a valid database ({reason}): {db:?}"),
            }
        }

        /// A body changed byte by byte and sealed again with a right checksum reaches the JSON
        /// decoder and the rules behind it: never a panic.
        #[test]
        fn sealed_damaged_bodies_never_panic(db in arbitrary_db(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut body = serde_json::to_vec(&db).expect("serializes");
            let at = at.index(body.len());
            body[at] = byte;
            let _ = MirrorDb::decode(&seal(&body));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), fix in any::<bool>()) {
            let mut bytes = bytes;
            if fix && bytes.len() >= envelope::HEADER_BYTES {
                bytes[..8].copy_from_slice(&DB_KIND.magic);
                bytes[8..12].copy_from_slice(&DB_KIND.version.to_le_bytes());
            }
            let _ = MirrorDb::decode(&bytes);
        }
    }
}
