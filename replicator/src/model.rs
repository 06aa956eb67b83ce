//! The vocabulary of a mirror, with no I/O: the states of a mirror and of its images, the
//! policies an operator sets, the limits every member agrees on, and the two values whose rules
//! are written once, here: an extent size and a name.
//!
//! Everything else uses these (the mirror database, failback, the secondary, the engine, the
//! CLI, the log files); this module uses none of them, so no lower layer depends on the
//! primary's engine.

/// Most secondaries one mirror has (and one primary ships to).
pub const SECONDARIES_MAX: usize = 8;
/// Images of a mirror: its primary and its secondaries.
pub const IMAGES_MAX: usize = 1 + SECONDARIES_MAX;
/// Longest name of a mirror, an image or a tracker, in bytes: a name becomes a file name
/// (`fracture-<name>.log`) and a bpffs directory, and travels in the mirror database.
pub const NAME_BYTES_MAX: usize = 64;

/// A secondary image's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ImageState {
    /// Connected, not fractured: it receives every write as it happens.
    Synchronized,
    /// Connected and copying what its fracture log, a full sync or a verify says it lacks.
    Synchronizing,
    /// Not connected, and its image is as of the last consistency point it recorded: no write
    /// reached it since.
    Consistent,
    /// Not connected (fractured, unreachable) with writes since its last consistency point,
    /// or never copied yet.
    Unsynchronized,
}

impl ImageState {
    /// The name operators see in logs, status and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Synchronized => "SYNCHRONIZED",
            Self::Synchronizing => "SYNCHRONIZING",
            Self::Consistent => "CONSISTENT",
            Self::Unsynchronized => "UNSYNCHRONIZED",
        }
    }
}

/// A mirror's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MirrorState {
    /// Replicating to its secondaries.
    Active,
    /// Deactivated by the administrator: writes are tracked in the fracture logs, not shipped.
    Inactive,
    /// Needs the administrator: too few images, too many missing (or a split brain).
    Attention,
}

impl MirrorState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Inactive => "INACTIVE",
            Self::Attention => "ATTENTION",
        }
    }
}

/// What brings a fractured secondary back: a reconnect (automatic) or `restore` (manual).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryPolicy {
    Automatic,
    Manual,
}

/// What brings a mirror out of ATTENTION once its cause has gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationPolicy {
    /// The mirror leaves ATTENTION by itself once the cause has gone.
    Automatic,
    /// The mirror stays in ATTENTION until `replicator activate`.
    Manual,
}

/// When a write through the export completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WritePolicy {
    /// Once the primary has it; it is shipped behind, as the tracker path ships an
    /// application's writes.
    Async,
    /// Once the primary and every SYNCHRONIZED secondary have it durably.
    Sync,
}

/// The grain of tracking and shipping: a power of two from `MIN` to `MAX` bytes, the same on
/// every member of a mirror. Made only by [`ExtentBytes::new`], which holds the one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ExtentBytes(u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("extent size {0} bytes is not a power of two from 4 KiB to 64 MiB")]
pub struct ExtentBytesError(pub u64);

impl ExtentBytes {
    pub const MIN: u64 = 1 << replicator_common::extent::EXTENT_BYTES_SHIFT_MIN;
    pub const MAX: u64 = 1 << replicator_common::extent::EXTENT_BYTES_SHIFT_MAX;
    pub const DEFAULT: Self = Self(replicator_common::extent::EXTENT_BYTES_DEFAULT);

    pub fn new(bytes: u64) -> Result<Self, ExtentBytesError> {
        if replicator_common::extent::extent_bytes_valid(bytes) {
            Ok(Self(bytes))
        } else {
            Err(ExtentBytesError(bytes))
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// Extents of an image of `image_bytes` (the last may be short).
    pub fn extents_of(self, image_bytes: u64) -> u64 {
        image_bytes.div_ceil(self.0)
    }
}

impl TryFrom<u64> for ExtentBytes {
    type Error = ExtentBytesError;

    fn try_from(bytes: u64) -> Result<Self, Self::Error> {
        Self::new(bytes)
    }
}

impl From<ExtentBytes> for u64 {
    fn from(extent: ExtentBytes) -> u64 {
        extent.0
    }
}

impl std::fmt::Display for ExtentBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for ExtentBytes {
    type Err = String;

    /// As operators type sizes (`64KiB`, `65536`), then the rule.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::new(crate::units::parse_bytes(text)?).map_err(|e| e.to_string())
    }
}

/// What a name names, for the error that refuses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameOf {
    Mirror,
    Image,
    Secondary,
    Tracker,
}

impl std::fmt::Display for NameOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mirror => "a mirror name",
            Self::Image => "an image name",
            Self::Secondary => "a secondary name",
            Self::Tracker => "a tracker name",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name:?}: {of} is 1 to {NAME_BYTES_MAX} letters, digits, '-' and '_'")]
pub struct NameError {
    pub of: NameOf,
    pub name: String,
}

/// The one rule for names: 1 to `NAME_BYTES_MAX` ASCII letters, digits, '-' and '_' (a name
/// becomes a file name and a bpffs directory: no '/', no '.', nothing a shell quotes).
pub fn check_name(of: NameOf, name: &str) -> Result<(), NameError> {
    let valid = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid { Ok(()) } else { Err(NameError { of, name: name.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_sizes_follow_one_rule() {
        for bytes in [4096, 65536, 64 << 20] {
            assert_eq!(ExtentBytes::new(bytes).map(ExtentBytes::get), Ok(bytes));
        }
        for bytes in [0, 512, 2048, 3 * 4096, 128 << 20, u64::MAX] {
            assert_eq!(ExtentBytes::new(bytes), Err(ExtentBytesError(bytes)));
        }
        assert_eq!("64KiB".parse::<ExtentBytes>(), Ok(ExtentBytes::DEFAULT));
        assert!("3k".parse::<ExtentBytes>().is_err());
        let json = serde_json::to_string(&ExtentBytes::DEFAULT).expect("serializes");
        assert_eq!(json, "65536");
        assert!(serde_json::from_str::<ExtentBytes>("512").is_err());
    }

    #[test]
    fn names_follow_one_rule() {
        assert!(check_name(NameOf::Secondary, "b-1_x").is_ok());
        assert!(check_name(NameOf::Secondary, &"a".repeat(NAME_BYTES_MAX)).is_ok());
        for bad in ["", "../etc", "a.b", "a b", "é", &"a".repeat(NAME_BYTES_MAX + 1)] {
            let error = check_name(NameOf::Mirror, bad).expect_err(bad);
            assert!(error.to_string().contains("a mirror name"), "{error}");
        }
    }

    #[test]
    fn state_names_match_their_serialized_form() {
        for state in [
            ImageState::Synchronized,
            ImageState::Synchronizing,
            ImageState::Consistent,
            ImageState::Unsynchronized,
        ] {
            assert_eq!(serde_json::to_value(state).expect("serializes"), state.as_str());
        }
        for state in [MirrorState::Active, MirrorState::Inactive, MirrorState::Attention] {
            assert_eq!(serde_json::to_value(state).expect("serializes"), state.as_str());
        }
    }
}
