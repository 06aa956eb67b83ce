//! Mutual authentication of a primary and a secondary with a shared key: HMAC-SHA256
//! challenge-response in each direction, before any data is accepted.
//!
//! ```text
//! primary   -> Hello   { mirror_id, image_bytes, extent_bytes, nonce_p }
//! secondary -> Welcome { nonce_s, proof_s = HMAC(key, "secondary" | nonce_p | nonce_s | params) }
//!              (or Error naming both values when the parameters differ)
//! primary   -> Proof   { proof_p = HMAC(key, "primary" | nonce_s | nonce_p) }
//! ```
//!
//! Each side proves knowledge of the key over a fresh nonce chosen by the other, so a recorded
//! session cannot be replayed; the role labels keep one side's proof from being reflected back as
//! the other's. Invariant: `secondary_handshake` returns `Ok` only after the primary's proof has
//! verified, so a peer without the key never reaches the code that writes the image.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{self, ErrorCode, FrameError, Limits, Message, NONCE_BYTES, PROOF_BYTES};

/// Shortest key accepted from a key file.
pub const KEY_BYTES_MIN: usize = 16;
/// Longest key file read.
pub const KEY_FILE_BYTES_MAX: u64 = 4096;

/// A stream whose reads and writes share one deadline: each waits at most the time left, so a
/// peer that sends a byte at a time cannot stretch a handshake past `limit_ms` (a timeout per
/// read would let it hold the connection, and its thread, for as long as it likes). Leaves
/// the stream's timeouts set; its owner sets them again for what follows.
pub struct Deadline<'a> {
    stream: &'a std::net::TcpStream,
    deadline: std::time::Instant,
    limit_ms: u64,
}

impl<'a> Deadline<'a> {
    pub fn new(stream: &'a std::net::TcpStream, limit_ms: u64) -> Self {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(limit_ms);
        Self { stream, deadline, limit_ms }
    }

    fn expired(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("handshake not done within {} ms", self.limit_ms),
        )
    }

    fn left(&self) -> std::io::Result<std::time::Duration> {
        let left = self.deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(self.expired());
        }
        Ok(left)
    }

    /// A socket timeout (EAGAIN) is the deadline passing: said so, with the limit.
    fn named<T>(&self, result: std::io::Result<T>) -> std::io::Result<T> {
        result.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => self.expired(),
            _ => e,
        })
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        self.named(stream.read(buf))
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        self.named(stream.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(()) // a TcpStream has nothing buffered
    }
}

/// Limits for handshake frames: no extent data is accepted before the handshake is done.
const HANDSHAKE_LIMITS: Limits = Limits { image_bytes: 0, extent_bytes: 1, payload_bytes_max: 4 + 1024 };

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("key file {path}: {source}")]
    KeyFile { path: PathBuf, source: std::io::Error },
    #[error("key file {path}: {problem}")]
    KeyFileContent { path: PathBuf, problem: String },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer sent {got:?} during the handshake, expected {expected}")]
    Unexpected { got: wire::MessageKind, expected: &'static str },
    #[error("peer failed authentication: its proof of the shared key is wrong")]
    BadProof,
    #[error("peer refused the handshake: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("parameters differ: {0}")]
    Parameters(String),
}

/// The shared key. Never printed.
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Reads a key file: at least 16 bytes after trimming whitespace, and not readable by group
    /// or others (as ssh insists for private keys).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        use std::os::unix::fs::PermissionsExt as _;
        let io = |source| AuthError::KeyFile { path: path.into(), source };
        let content = |problem: String| AuthError::KeyFileContent { path: path.into(), problem };
        let metadata = std::fs::metadata(path).map_err(io)?;
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(content(format!("mode {:o} lets others read it; chmod 600 it", mode & 0o777)));
        }
        if metadata.len() > KEY_FILE_BYTES_MAX {
            return Err(content(format!("{} bytes, more than {KEY_FILE_BYTES_MAX}", metadata.len())));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let key = bytes.trim_ascii();
        if key.len() < KEY_BYTES_MIN {
            return Err(content(format!("{} bytes of key, at least {KEY_BYTES_MIN} needed", key.len())));
        }
        Ok(Self(key.to_vec()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        assert!(bytes.len() >= KEY_BYTES_MIN, "keys are at least {KEY_BYTES_MIN} bytes");
        Self(bytes.to_vec())
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(label);
        for part in parts {
            mac.update(part);
        }
        mac
    }
}

/// What a primary replicates, as it announces it in `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub mirror_id: u64,
    pub image_bytes: u64,
    pub extent_bytes: u64,
}

/// What a secondary checks a primary's `Hello` against: its own image size always; mirror id
/// and extent size when it has been told them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub image_bytes: u64,
    pub mirror_id: Option<u64>,
    pub extent_bytes: Option<crate::model::ExtentBytes>,
}

impl Expected {
    /// Describes how the offered parameters differ, naming both values.
    fn mismatch(&self, offered: &Params) -> Option<String> {
        let mut differences = Vec::new();
        if self.mirror_id.is_some_and(|id| id != offered.mirror_id) {
            differences.push(format!(
                "mirror id: here {:#x}, peer {:#x}",
                self.mirror_id.unwrap_or(0),
                offered.mirror_id
            ));
        }
        if self.image_bytes != offered.image_bytes {
            differences.push(format!(
                "image size: here {} bytes, peer {} bytes",
                self.image_bytes, offered.image_bytes
            ));
        }
        if self.extent_bytes.is_some_and(|e| e.get() != offered.extent_bytes) {
            let here = self.extent_bytes.map_or(0, crate::model::ExtentBytes::get);
            differences.push(format!("extent size: here {here} bytes, peer {} bytes", offered.extent_bytes));
        }
        // Every extent size a primary can use; anything else (0 included) would break the
        // session's arithmetic.
        if let Err(error) = crate::model::ExtentBytes::new(offered.extent_bytes) {
            differences.push(format!("extent size: peer {} bytes: {error}", offered.extent_bytes));
        }
        (!differences.is_empty()).then(|| differences.join("; "))
    }
}

impl Params {
    fn bytes(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.mirror_id.to_le_bytes());
        out[8..16].copy_from_slice(&self.image_bytes.to_le_bytes());
        out[16..].copy_from_slice(&self.extent_bytes.to_le_bytes());
        out
    }
}

pub fn nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).expect("the kernel's random source");
    nonce
}

fn secondary_mac(key: &Key, nonce_p: &[u8], nonce_s: &[u8], params: &Params) -> Hmac<Sha256> {
    key.mac(b"replicator/1 secondary", &[nonce_p, nonce_s, &params.bytes()])
}

fn primary_mac(key: &Key, nonce_s: &[u8], nonce_p: &[u8]) -> Hmac<Sha256> {
    key.mac(b"replicator/1 primary", &[nonce_s, nonce_p])
}

fn proof(mac: Hmac<Sha256>) -> [u8; PROOF_BYTES] {
    mac.finalize().into_bytes().into()
}

/// The primary's side. Returns the next sequence number to use on this connection.
pub fn primary_handshake(
    stream: &mut (impl Read + Write),
    key: &Key,
    params: &Params,
) -> Result<u64, AuthError> {
    let nonce_p = nonce();
    let hello = Message::Hello {
        mirror_id: params.mirror_id,
        image_bytes: params.image_bytes,
        extent_bytes: params.extent_bytes,
        nonce: nonce_p,
    };
    wire::write_frame(stream, &hello, 0).map_err(FrameError::from)?;
    let mut buffer = Vec::new();
    let (_, reply) = wire::read_frame(stream, &HANDSHAKE_LIMITS, &mut buffer)?;
    let (nonce_s, proof_s) = match reply {
        Message::Welcome { nonce, proof } => (nonce, proof),
        Message::Error { code, message } => {
            return Err(AuthError::Refused { code, message: message.to_owned() });
        }
        other => return Err(AuthError::Unexpected { got: other.kind(), expected: "Welcome" }),
    };
    if secondary_mac(key, &nonce_p, &nonce_s, params).verify_slice(&proof_s).is_err() {
        let refusal = Message::Error { code: ErrorCode::Authentication, message: "authentication failed" };
        let _ = wire::write_frame(stream, &refusal, 1);
        return Err(AuthError::BadProof);
    }
    let proof_p = proof(primary_mac(key, &nonce_s, &nonce_p));
    wire::write_frame(stream, &Message::Proof { proof: proof_p }, 1).map_err(FrameError::from)?;
    Ok(2)
}

/// What a secondary says of its image right after the handshake (its `CutState` frame).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SecondaryCut {
    pub committed_cut: u64,
    pub committed_unix_ms: u64,
    pub staged_cut_max: u64,
    pub consistent: bool,
}

/// The primary's last step of a connection: the secondary's `CutState` (sent once it holds its
/// image, so it may come after a previous session's writes have finished there).
pub fn primary_read_cut_state(stream: &mut impl Read) -> Result<SecondaryCut, AuthError> {
    let mut buffer = Vec::new();
    let (_, reply) = wire::read_frame(stream, &HANDSHAKE_LIMITS, &mut buffer)?;
    match reply {
        Message::CutState { committed_cut, committed_unix_ms, staged_cut_max, flags } => Ok(SecondaryCut {
            committed_cut,
            committed_unix_ms,
            staged_cut_max,
            consistent: flags & wire::CUT_STATE_CONSISTENT != 0,
        }),
        Message::Error { code, message } => Err(AuthError::Refused { code, message: message.to_owned() }),
        other => Err(AuthError::Unexpected { got: other.kind(), expected: "CutState" }),
    }
}

/// The secondary's side: checks the primary's parameters against `expected`, proves the key,
/// and returns them only once the primary has proved it too.
pub fn secondary_handshake(
    stream: &mut (impl Read + Write),
    key: &Key,
    expected: &Expected,
) -> Result<Params, AuthError> {
    let mut buffer = Vec::new();
    let (_, hello) = wire::read_frame(stream, &HANDSHAKE_LIMITS, &mut buffer)?;
    let Message::Hello { mirror_id, image_bytes, extent_bytes, nonce: nonce_p } = hello else {
        return Err(refuse(
            stream,
            ErrorCode::Protocol,
            AuthError::Unexpected { got: hello.kind(), expected: "Hello" },
        ));
    };
    let offered = Params { mirror_id, image_bytes, extent_bytes };
    if let Some(difference) = expected.mismatch(&offered) {
        return Err(refuse(stream, ErrorCode::Parameters, AuthError::Parameters(difference)));
    }
    let nonce_s = nonce();
    let proof_s = proof(secondary_mac(key, &nonce_p, &nonce_s, &offered));
    wire::write_frame(stream, &Message::Welcome { nonce: nonce_s, proof: proof_s }, 0)
        .map_err(FrameError::from)?;
    let (_, reply) = wire::read_frame(stream, &HANDSHAKE_LIMITS, &mut buffer)?;
    match reply {
        Message::Proof { proof } if primary_mac(key, &nonce_s, &nonce_p).verify_slice(&proof).is_ok() => {
            Ok(offered)
        }
        Message::Proof { .. } => Err(refuse(stream, ErrorCode::Authentication, AuthError::BadProof)),
        Message::Error { code, message } => Err(AuthError::Refused { code, message: message.to_owned() }),
        other => Err(refuse(
            stream,
            ErrorCode::Protocol,
            AuthError::Unexpected { got: other.kind(), expected: "Proof" },
        )),
    }
}

/// Tells the peer why it is refused (best effort) and returns the error for the local log.
fn refuse(stream: &mut impl Write, code: ErrorCode, error: AuthError) -> AuthError {
    let text = error.to_string();
    let _ = wire::write_frame(stream, &Message::Error { code, message: &text }, 1);
    error
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    const PARAMS: Params = Params { mirror_id: 0x51, image_bytes: 1 << 30, extent_bytes: 65536 };

    const EXPECTED: Expected = Expected { image_bytes: 1 << 30, mirror_id: Some(0x51), extent_bytes: None };

    fn run(
        primary_key: &'static [u8],
        secondary_key: &'static [u8],
        offered: Params,
    ) -> (Result<u64, AuthError>, Result<Params, AuthError>) {
        let (mut a, mut b) = UnixStream::pair().expect("socketpair");
        let secondary = std::thread::spawn(move || {
            secondary_handshake(&mut b, &Key::from_bytes(secondary_key), &EXPECTED)
        });
        let primary = primary_handshake(&mut a, &Key::from_bytes(primary_key), &offered);
        drop(a);
        (primary, secondary.join().expect("secondary thread"))
    }

    #[test]
    fn same_key_authenticates_both_ways() {
        let (primary, secondary) = run(b"0123456789abcdef", b"0123456789abcdef", PARAMS);
        assert_eq!(primary.expect("primary side"), 2);
        assert_eq!(secondary.expect("secondary side"), PARAMS);
    }

    #[test]
    fn wrong_key_is_refused_on_both_sides() {
        let (primary, secondary) = run(b"0123456789abcdef", b"fedcba9876543210", PARAMS);
        assert!(matches!(primary, Err(AuthError::BadProof)), "{primary:?}");
        assert!(secondary.is_err(), "the secondary must not accept a peer without the key");
    }

    #[test]
    fn wrong_image_size_is_refused_naming_both_values() {
        let offered = Params { image_bytes: 1 << 29, ..PARAMS };
        let (primary, secondary) = run(b"0123456789abcdef", b"0123456789abcdef", offered);
        let message = primary.expect_err("refused").to_string();
        assert!(message.contains("1073741824") && message.contains("536870912"), "{message}");
        assert!(matches!(secondary, Err(AuthError::Parameters(_))));
    }

    #[test]
    fn an_extent_size_no_primary_can_use_is_refused() {
        for extent_bytes in [0, 512, 3 * 4096, 128 << 20] {
            let offered = Params { extent_bytes, ..PARAMS };
            let (_, secondary) = run(b"0123456789abcdef", b"0123456789abcdef", offered);
            let message = secondary.expect_err("refused").to_string();
            assert!(message.contains(&format!("peer {extent_bytes} bytes")), "{message}");
        }
    }

    #[test]
    fn random_bytes_are_refused() {
        let (mut a, mut b) = UnixStream::pair().expect("socketpair");
        let secondary = std::thread::spawn(move || {
            secondary_handshake(&mut b, &Key::from_bytes(b"0123456789abcdef"), &EXPECTED)
        });
        a.write_all(&[0x42; 200]).expect("write");
        drop(a);
        let result = secondary.join().expect("secondary thread");
        assert!(
            matches!(result, Err(AuthError::Frame(FrameError::Wire(wire::WireError::BadMagic { .. })))),
            "{result:?}"
        );
    }

    #[test]
    fn key_files_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("replicator-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("key");
        std::fs::write(&path, "0123456789abcdef0123\n").expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(Key::from_file(&path).unwrap_err().to_string().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(Key::from_file(&path).is_ok());
        std::fs::write(&path, "short\n").expect("write key");
        assert!(Key::from_file(&path).unwrap_err().to_string().contains("at least 16"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
