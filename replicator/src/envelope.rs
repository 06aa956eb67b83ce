//! The one envelope of every state file the project writes (the write-intent and fracture logs,
//! the mirror database, the consistency point, this member's image name and a split-brain
//! resolution), its atomic replacement, and the one reader of little-endian fields that every
//! decoder of disk and network input uses.
//!
//! ```text
//! 0   magic       8 bytes  names the file's kind
//! 8   version     u32      of the body's layout, per kind
//! 12  crc32c      u32      over the whole file with this field zero
//! 16  body_bytes  u32      <= the kind's limit; the file is exactly header + body
//! 20  reserved    u32      zero
//! 24  body
//! ```
//!
//! Invariants: a file is replaced only by write-to-temp + fsync + rename + fsync of the
//! directory, so a crash or a torn write leaves the old file or the new one, never a mix; and
//! `open` hands a body on only when every header field checks out, so a decoder never sees a
//! damaged or truncated body. (`status.json` is not state: a report for tools, replaced every
//! 200 ms by a plain rename and never read back, so it is not enveloped.)
//!
//! Written by hand: the header is five fields and the reader a bounds-checked cursor; the
//! crates that do this (`zerocopy`, `bytes`) either need the layout as `#[repr(C)]` structs
//! with no per-field error, or panic on a short read.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

pub const HEADER_BYTES: usize = 24;

/// What one kind of file is: its magic, the body versions this build reads, the one it
/// writes, and its largest body.
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    pub magic: [u8; 8],
    pub version: u32,
    /// The oldest enveloped version still read (a kind's versions before it, if any, predate
    /// the envelope and are read by the kind's own legacy decoder).
    pub oldest_version: u32,
    pub body_bytes_max: usize,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("{found} bytes, shorter than the {HEADER_BYTES}-byte header")]
    Short { found: usize },
    #[error("bad magic")]
    Magic,
    #[error("version {found}, this build reads {oldest} to {newest}")]
    Version { found: u32, oldest: u32, newest: u32 },
    #[error("body of {body_bytes} bytes in a file of {file_bytes} (at most {max} bytes of body)")]
    Length { body_bytes: usize, file_bytes: usize, max: usize },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("checksum {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
}

/// The file's version, if it starts with `kind`'s magic: how a kind with pre-envelope versions
/// tells which decoder to use (version 1 and 2 logs kept their version at the same offset).
pub fn peek_version(kind: &Kind, bytes: &[u8]) -> Option<u32> {
    let mut reader = Reader::new(bytes);
    (reader.array::<8>().ok()? == kind.magic).then(|| reader.u32().ok()).flatten()
}

/// `body` in `kind`'s envelope, at the version it writes.
pub fn seal(kind: &Kind, body: &[u8]) -> Vec<u8> {
    assert!(body.len() <= kind.body_bytes_max, "a body of {} bytes", body.len());
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&kind.magic);
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks `bytes` as a file of `kind` and returns its version and body.
pub fn open<'a>(kind: &Kind, bytes: &'a [u8]) -> Result<(u32, &'a [u8]), EnvelopeError> {
    let mut header = Reader::new(bytes);
    let (Ok(magic), Ok(version), Ok(stored), Ok(body_bytes), Ok(reserved)) =
        (header.array::<8>(), header.u32(), header.u32(), header.u32(), header.u32())
    else {
        return Err(EnvelopeError::Short { found: bytes.len() });
    };
    if magic != kind.magic {
        return Err(EnvelopeError::Magic);
    }
    if !(kind.oldest_version..=kind.version).contains(&version) {
        return Err(EnvelopeError::Version {
            found: version,
            oldest: kind.oldest_version,
            newest: kind.version,
        });
    }
    let body_bytes = body_bytes as usize;
    if body_bytes > kind.body_bytes_max || bytes.len() != HEADER_BYTES + body_bytes {
        return Err(EnvelopeError::Length { body_bytes, file_bytes: bytes.len(), max: kind.body_bytes_max });
    }
    if reserved != 0 {
        return Err(EnvelopeError::Reserved);
    }
    let computed =
        crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&bytes[..12]), &[0; 4]), &bytes[16..]);
    if computed != stored {
        return Err(EnvelopeError::Checksum { stored, computed });
    }
    Ok((version, &bytes[HEADER_BYTES..]))
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + use<> {
    let path = path.to_path_buf();
    move |source| FileError::Io { path, source }
}

/// Replaces `dir/name` with `bytes` atomically: temp file, fsync, rename, fsync of `dir`.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), FileError> {
    let path = dir.join(name);
    let temp = dir.join(format!("{name}.tmp"));
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(true).open(&temp).map_err(io_at(&temp))?;
    file.write_all(bytes).map_err(io_at(&temp))?;
    file.sync_all().map_err(io_at(&temp))?;
    drop(file);
    std::fs::rename(&temp, &path).map_err(io_at(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

/// The bytes of `dir/name`, or none when there is no such file.
pub fn read_file(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, FileError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FileError::Io { path, source }),
    }
}

/// Removes `dir/name` durably, if it exists.
pub fn remove_file(dir: &Path, name: &str) -> Result<(), FileError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FileError::Io { path, source }),
    }
}

/// Where a member's state files live: the state directory, or memory in tests. The narrow
/// interface through which the logs are written lets the checkpoint rules run without a disk,
/// and lets tests fail a write on purpose.
pub trait StateFiles {
    /// How `name` is named in messages.
    fn path(&self, name: &str) -> PathBuf;
    /// Replaces `name` with `bytes` atomically and durably.
    fn replace(&mut self, name: &str, bytes: &[u8]) -> Result<(), FileError>;
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, FileError>;
    fn remove(&mut self, name: &str) -> Result<(), FileError>;
}

/// The state directory on disk.
#[derive(Clone, Debug)]
pub struct StateDir(pub PathBuf);

impl StateFiles for StateDir {
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn replace(&mut self, name: &str, bytes: &[u8]) -> Result<(), FileError> {
        replace_file(&self.0, name, bytes)
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, FileError> {
        read_file(&self.0, name)
    }

    fn remove(&mut self, name: &str) -> Result<(), FileError> {
        remove_file(&self.0, name)
    }
}

/// State files in memory, for tests: writes of the files whose names start with `failing`
/// fail, as on a full disk (`Some("")`: every write).
#[cfg(test)]
#[derive(Clone, Debug, Default)]
pub struct MemoryFiles {
    pub files: std::collections::BTreeMap<String, Vec<u8>>,
    pub failing: Option<&'static str>,
}

#[cfg(test)]
impl StateFiles for MemoryFiles {
    fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(name)
    }

    fn replace(&mut self, name: &str, bytes: &[u8]) -> Result<(), FileError> {
        if self.failing.is_some_and(|prefix| name.starts_with(prefix)) {
            let source = std::io::Error::from_raw_os_error(libc::ENOSPC);
            return Err(FileError::Io { path: PathBuf::from(name), source });
        }
        self.files.insert(name.to_owned(), bytes.to_vec());
        Ok(())
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, FileError> {
        Ok(self.files.get(name).cloned())
    }

    fn remove(&mut self, name: &str) -> Result<(), FileError> {
        self.files.remove(name);
        Ok(())
    }
}

/// Creates the state directory (and its parents) durably: each directory made is fsynced
/// into its parent, so a power loss right after the first run cannot take away the directory
/// and the files written in it.
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

/// A field ran past the end of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{wanted} bytes wanted at offset {at} of {len}")]
pub struct ShortRead {
    pub at: usize,
    pub wanted: usize,
    pub len: usize,
}

/// Reads little-endian fields from the front of a byte slice; every read is checked, so no
/// input, however short or long, makes a decoder panic.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// The next `len` bytes.
    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], ShortRead> {
        let short = ShortRead { at: self.at, wanted: len, len: self.bytes.len() };
        let end = self.at.checked_add(len).ok_or(short)?;
        let taken = self.bytes.get(self.at..end).ok_or(short)?;
        self.at = end;
        Ok(taken)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], ShortRead> {
        Ok(self.bytes(N)?.try_into().expect("N bytes taken"))
    }

    pub fn u16(&mut self) -> Result<u16, ShortRead> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, ShortRead> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, ShortRead> {
        self.array().map(u64::from_le_bytes)
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.at..];
        self.at = self.bytes.len();
        rest
    }

    /// The whole input's length, read or not.
    pub fn input_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIND: Kind = Kind { magic: *b"RPLTEST\0", version: 3, oldest_version: 2, body_bytes_max: 64 };

    #[test]
    fn a_sealed_body_opens_and_every_header_field_is_checked() {
        let sealed = seal(&KIND, b"body");
        assert_eq!(open(&KIND, &sealed), Ok((3, &b"body"[..])));
        assert_eq!(peek_version(&KIND, &sealed), Some(3));
        let with = |at: usize, value: &[u8]| {
            let mut bytes = sealed.clone();
            bytes[at..at + value.len()].copy_from_slice(value);
            open(&KIND, &bytes).map(|(version, body)| (version, body.to_vec()))
        };
        assert_eq!(with(12, &sealed[12..16]), Ok((3, b"body".to_vec())), "unchanged");
        assert_eq!(with(0, b"X"), Err(EnvelopeError::Magic));
        assert!(matches!(with(8, &4u32.to_le_bytes()), Err(EnvelopeError::Version { found: 4, .. })));
        assert!(matches!(with(8, &1u32.to_le_bytes()), Err(EnvelopeError::Version { found: 1, .. })));
        assert!(matches!(with(16, &5u32.to_le_bytes()), Err(EnvelopeError::Length { .. })));
        assert_eq!(with(20, &[1]), Err(EnvelopeError::Reserved));
        assert!(matches!(with(24, b"B"), Err(EnvelopeError::Checksum { .. })));
        assert_eq!(open(&KIND, &sealed[..10]), Err(EnvelopeError::Short { found: 10 }));
        let too_long = Kind { body_bytes_max: 3, ..KIND };
        assert!(matches!(open(&too_long, &sealed), Err(EnvelopeError::Length { .. })));
    }

    #[test]
    fn the_reader_refuses_to_read_past_the_end() {
        let mut reader = Reader::new(&[1, 0, 2, 0, 0, 0, 9]);
        assert_eq!(reader.u16(), Ok(1));
        assert_eq!(reader.u32(), Ok(2));
        assert_eq!(reader.u16(), Err(ShortRead { at: 6, wanted: 2, len: 7 }));
        assert_eq!(reader.bytes(usize::MAX), Err(ShortRead { at: 6, wanted: usize::MAX, len: 7 }));
        assert_eq!(reader.rest(), [9]);
        assert_eq!(reader.remaining(), 0);
    }

    #[test]
    fn files_are_replaced_read_and_removed() {
        let dir = std::env::temp_dir().join(format!("replicator-envelope-{}", std::process::id()));
        create_state_dir(&dir.join("a/b")).expect("created with its parents");
        let dir = dir.join("a/b");
        assert!(read_file(&dir, "f").expect("readable").is_none());
        replace_file(&dir, "f", b"one").expect("written");
        replace_file(&dir, "f", b"two").expect("replaced");
        assert_eq!(read_file(&dir, "f").expect("readable").as_deref(), Some(&b"two"[..]));
        remove_file(&dir, "f").expect("removed");
        remove_file(&dir, "f").expect("removing a missing file is fine");
        let names: Vec<_> = std::fs::read_dir(&dir).expect("listed").flatten().collect();
        assert!(names.is_empty(), "no temp file left: {names:?}");
        std::fs::remove_dir_all(dir.parent().and_then(Path::parent).expect("the root")).expect("cleanup");
    }

    proptest! {
        /// Any flipped bit or cut is refused, and arbitrary bytes (with the magic or not) are a
        /// reason, never a panic.
        #[test]
        fn damage_is_always_caught(body in proptest::collection::vec(any::<u8>(), 0..64), flip in any::<prop::sample::Index>(), bit in 0u8..8, cut in any::<prop::sample::Index>()) {
            let sealed = seal(&KIND, &body);
            let mut flipped = sealed.clone();
            flipped[flip.index(sealed.len())] ^= 1 << bit;
            prop_assert!(open(&KIND, &flipped).is_err());
            prop_assert!(open(&KIND, &sealed[..cut.index(sealed.len())]).is_err());
        }

        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..100), magic in any::<bool>()) {
            if magic && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&KIND.magic);
            }
            let _ = open(&KIND, &bytes);
            let _ = peek_version(&KIND, &bytes);
        }
    }
}
