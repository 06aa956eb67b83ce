//! The wire protocol between a primary and its secondaries: framing, messages, and the
//! decoders that stand between the network and the secondary's image.
//!
//! A frame is a fixed 32-byte header and a payload:
//!
//! ```text
//! 0   magic          u32  "RPLW"
//! 4   version        u16  VERSION
//! 6   kind           u16  MessageKind
//! 8   payload_bytes  u32  <= Limits::payload_bytes_max
//! 12  crc32c         u32  over the header (this field zero) and the payload
//! 16  sequence       u64  per connection and direction, increasing (gaps allowed: the
//!                         primary numbers extent frames once for all its secondaries)
//! 24  flags          u8   FLAG_CLIENT_WAITS, FLAG_IN_ORDER (see each), else zero
//! 25  cut            7 bytes (u56): on ExtentData, BlockData and Zeroes, the consistent cut
//!                         the frame belongs to (`secondary::journal`); zero on the others
//! ```
//!
//! All integers are little-endian. Invariant: nothing from the network reaches the image
//! unless its frame decoded cleanly: right magic, a version we speak, a known kind, a length
//! under the limit, a matching checksum, and for extent data an offset and length that are
//! extent-aligned and inside the image. Every other input is an error (the connection is then
//! closed); no decoder panics (property-tested below on arbitrary bytes).

use crate::envelope::Reader;

pub const MAGIC: u32 = u32::from_le_bytes(*b"RPLW");
/// The alignment of `BlockData` and `Zeroes`: the smallest logical block a Linux device has.
pub const SECTOR_BYTES: u64 = 512;
/// 2: the mirror database changes in two steps (`MirrorDbPrepare`, `MirrorDbCommit`).
/// 3: the header's flags byte (`FLAG_CLIENT_WAITS`).
/// 4: an `Error` frame's code is an `ErrorCode` (split brain, refusal, write and read failures
///    have codes of their own; an unknown code is malformed).
/// 5: consistent cuts: data frames carry their cut in the header (and `FLAG_IN_ORDER`); the
///    primary sends `Commit`, the secondary answers the handshake with `CutState`.
pub const VERSION: u16 = 5;
/// On a `BlockData` frame: a client's synchronous write through the export waits for this
/// frame's ack. A secondary busy-polls while such frames flow (`--poll-us`, by default).
pub const FLAG_CLIENT_WAITS: u8 = 1;
/// On a `BlockData` or `Zeroes` frame: a client's write through the export that the secondary
/// may apply right after the cut it last applied, in the order sent (nothing it depends on is
/// missing there; see `primary::cuts`).
pub const FLAG_IN_ORDER: u8 = 2;
/// The largest cut a header carries (56 bits).
pub const CUT_MAX: u64 = (1 << 56) - 1;
pub const HEADER_BYTES: usize = 32;
/// Bytes of a handshake nonce and of an HMAC-SHA256 proof.
pub const NONCE_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;
/// Longest error message carried in an `Error` frame.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;
/// Most extents one verify request covers, and bytes of one extent's hash (XXH3-128).
pub const VERIFY_EXTENTS_MAX: u32 = 256;
pub const VERIFY_HASH_BYTES: usize = 16;
/// The largest `MirrorDb` payload: the database envelope's header and its largest body.
pub const MIRROR_DB_BYTES_MAX: usize = 24 + 64 * 1024;
/// Most runs in one `DivergentRuns` frame.
pub const DIVERGENT_RUNS_MAX: usize = 256;
/// Bytes of a `ConsistencyPoint` payload.
pub const POINT_PAYLOAD_BYTES: usize = 16;
/// Bytes of a `Commit` and of a `CutState` payload.
pub const COMMIT_PAYLOAD_BYTES: usize = 16;
pub const CUT_STATE_PAYLOAD_BYTES: usize = 32;
/// `CutState` flags: the image is a consistent cut now.
pub const CUT_STATE_CONSISTENT: u64 = 1;
/// Bytes of a `VerifyHashes` payload before its hashes.
pub const VERIFY_FIXED_BYTES: usize = 16;
/// The largest `VerifyHashes` payload.
pub const VERIFY_HASHES_BYTES_MAX: usize =
    VERIFY_FIXED_BYTES + VERIFY_EXTENTS_MAX as usize * VERIFY_HASH_BYTES;

/// Why a peer ends a session or refuses a handshake, in its `Error` frame. Decisions are made
/// on the code; the message is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The `Hello`'s parameters differ from the secondary's (image size, mirror, extent size).
    Parameters = 1,
    /// A proof of the shared key is wrong.
    Authentication = 2,
    /// A malformed frame, or one the receiver does not accept.
    Protocol = 3,
    /// Both sides wrote as primary while apart: nothing is overwritten until `resolve`.
    SplitBrain = 4,
    /// The secondary refuses the primary's mirror database: another mirror, a stale primary,
    /// two primaries at one generation, or a commit it never prepared.
    Refused = 5,
    /// A write to the secondary's image failed: nothing of the frame is acknowledged.
    WriteFailed = 6,
    /// A read of the secondary's image (for a verify) failed.
    ReadFailed = 7,
    /// The secondary could not store its state (a mirror database, a consistency point).
    StateFailed = 8,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::Parameters => "parameters",
            Self::Authentication => "authentication",
            Self::Protocol => "protocol",
            Self::SplitBrain => "split brain",
            Self::Refused => "refused",
            Self::WriteFailed => "write failed",
            Self::ReadFailed => "read failed",
            Self::StateFailed => "state not stored",
        };
        write!(f, "{name} ({})", *self as u32)
    }
}

impl ErrorCode {
    fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            1 => Self::Parameters,
            2 => Self::Authentication,
            3 => Self::Protocol,
            4 => Self::SplitBrain,
            5 => Self::Refused,
            6 => Self::WriteFailed,
            7 => Self::ReadFailed,
            8 => Self::StateFailed,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MessageKind {
    Hello = 1,
    Welcome = 2,
    Proof = 3,
    ExtentData = 4,
    Ack = 5,
    Keepalive = 6,
    Error = 7,
    VerifyRequest = 8,
    VerifyHashes = 9,
    ConsistencyPoint = 10,
    MirrorDb = 11,
    DivergentRuns = 12,
    BlockData = 13,
    Zeroes = 14,
    MirrorDbPrepare = 15,
    MirrorDbCommit = 16,
    Commit = 17,
    CutState = 18,
}

impl MessageKind {
    fn from_u16(value: u16) -> Option<Self> {
        Some(match value {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Proof,
            4 => Self::ExtentData,
            5 => Self::Ack,
            6 => Self::Keepalive,
            7 => Self::Error,
            8 => Self::VerifyRequest,
            9 => Self::VerifyHashes,
            10 => Self::ConsistencyPoint,
            11 => Self::MirrorDb,
            12 => Self::DivergentRuns,
            13 => Self::BlockData,
            14 => Self::Zeroes,
            15 => Self::MirrorDbPrepare,
            16 => Self::MirrorDbCommit,
            17 => Self::Commit,
            18 => Self::CutState,
            _ => return None,
        })
    }
}

/// What a connection accepts, fixed when it is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub image_bytes: u64,
    pub extent_bytes: u64,
    /// The largest payload accepted: the largest coalesced extent run plus its offset field.
    pub payload_bytes_max: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("protocol version {found}, this build speaks {VERSION}")]
    Version { found: u16 },
    #[error("unknown message kind {found}")]
    UnknownKind { found: u16 },
    #[error("payload of {found} bytes is over the limit of {limit}")]
    TooLong { found: u32, limit: u32 },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("header flags {found:#04x} on a {kind:?} frame")]
    Flags { kind: MessageKind, found: u8 },
    #[error("a cut ({found}) on a {kind:?} frame")]
    Cut { kind: MessageKind, found: u64 },
    #[error("checksum mismatch: frame says {expected:#010x}, computed {computed:#010x}")]
    Checksum { expected: u32, computed: u32 },
    #[error("{kind:?} payload of {found} bytes, expected {expected}")]
    PayloadSize { kind: MessageKind, found: usize, expected: &'static str },
    #[error(
        "extent data at offset {offset_bytes} length {len_bytes} is not inside the {image_bytes}-byte image"
    )]
    OutOfImage { offset_bytes: u64, len_bytes: u64, image_bytes: u64 },
    #[error(
        "extent data at offset {offset_bytes} length {len_bytes} is not aligned to {extent_bytes}-byte extents"
    )]
    Unaligned { offset_bytes: u64, len_bytes: u64, extent_bytes: u64 },
    #[error("ack range {first}..={last} is empty or reversed")]
    AckRange { first: u64, last: u64 },
    #[error("error message is not UTF-8")]
    ErrorText,
    #[error("unknown error code {found}")]
    ErrorCode { found: u32 },
    #[error(
        "verify of {count} extents from extent {first_extent}: empty, over {VERIFY_EXTENTS_MAX}, or past the image"
    )]
    VerifyRange { first_extent: u64, count: u32 },
}

/// A decoded header; the payload is not checked yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: MessageKind,
    pub payload_bytes: u32,
    pub crc32c: u32,
    pub sequence: u64,
    /// `FLAG_*` bits: `FLAG_CLIENT_WAITS` on `BlockData`, `FLAG_IN_ORDER` on `BlockData` and
    /// `Zeroes`.
    pub flags: u8,
    /// The cut a data frame belongs to (`ExtentData`, `BlockData`, `Zeroes`), else 0.
    pub cut: u64,
}

/// The header fields of a data frame beyond its kind and sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tag {
    pub flags: u8,
    pub cut: u64,
}

impl MessageKind {
    /// The `FLAG_*` bits a frame of this kind may carry.
    fn flags_allowed(self) -> u8 {
        match self {
            Self::BlockData => FLAG_CLIENT_WAITS | FLAG_IN_ORDER,
            Self::Zeroes => FLAG_IN_ORDER,
            _ => 0,
        }
    }

    /// Whether a frame of this kind carries a cut.
    fn has_cut(self) -> bool {
        matches!(self, Self::ExtentData | Self::BlockData | Self::Zeroes)
    }
}

/// A decoded message, borrowing its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Primary to secondary, first: what it replicates, and a challenge.
    Hello {
        mirror_id: u64,
        image_bytes: u64,
        extent_bytes: u64,
        nonce: [u8; NONCE_BYTES],
    },
    /// Secondary to primary: its proof of the key over the primary's challenge, and its own.
    Welcome {
        nonce: [u8; NONCE_BYTES],
        proof: [u8; PROOF_BYTES],
    },
    /// Primary to secondary: its proof of the key over the secondary's challenge.
    Proof {
        proof: [u8; PROOF_BYTES],
    },
    /// Data of a run of whole extents (the last may be short at the end of the image).
    ExtentData {
        offset_bytes: u64,
        data: &'a [u8],
    },
    /// Primary to secondary: a client's write through the NBD export, passed on as written:
    /// sector-aligned rather than extent-aligned (the same layout as `ExtentData`).
    BlockData {
        offset_bytes: u64,
        data: &'a [u8],
    },
    /// Primary to secondary: a client's TRIM (`unmap`) or WRITE_ZEROES through the export; the
    /// range reads as zeroes afterwards on every image. Sector-aligned, inside the image.
    Zeroes {
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    },
    /// Secondary to primary: extent frames with these sequences are durable.
    Ack {
        first_sequence: u64,
        last_sequence: u64,
    },
    Keepalive,
    Error {
        code: ErrorCode,
        message: &'a str,
    },
    /// Primary to secondary: hash extents `first_extent..first_extent + count` once every
    /// extent frame sent before this one is durable, and reply with `VerifyHashes`.
    VerifyRequest {
        first_extent: u64,
        count: u32,
    },
    /// Secondary to primary: XXH3-128 of each requested extent, `VERIFY_HASH_BYTES` each.
    VerifyHashes {
        first_extent: u64,
        hashes: &'a [u8],
    },
    /// Primary to secondary, sent when every extent written before the point is acknowledged:
    /// the image is consistent as of this point; record it durably, then ack this frame.
    ConsistencyPoint {
        generation: u64,
        point_unix_ms: u64,
    },
    /// Primary to secondary: the mirror database (its file envelope, `mirror::MirrorDb`), to
    /// store durably before acknowledging this frame.
    MirrorDb {
        envelope: &'a [u8],
    },
    /// Primary to secondary, the first step of a change of the mirror (`set`, `add-secondary`,
    /// ...): a database to check and hold, not to store yet; acknowledged once held.
    MirrorDbPrepare {
        envelope: &'a [u8],
    },
    /// Primary to secondary, the second step: store the held database of this revision
    /// durably, then acknowledge. The change takes effect on the primary once every reachable
    /// secondary has acknowledged this.
    MirrorDbCommit {
        revision: u64,
    },
    /// Primary to secondary: every frame of cut `cut` (taken at `cut_unix_ms` on the primary's
    /// clock) has been sent before this one; apply them atomically, durably, then ack this frame.
    Commit {
        cut: u64,
        cut_unix_ms: u64,
    },
    /// Secondary to primary, right after the handshake: the cut its image holds, and the
    /// highest cut of a frame it keeps staged (the primary's cuts continue past both).
    CutState {
        committed_cut: u64,
        committed_unix_ms: u64,
        staged_cut_max: u64,
        /// `CUT_STATE_*` bits.
        flags: u64,
    },
    /// Secondary (a former primary, failing back) to primary: runs of extents it wrote that
    /// the new primary may not have; each run is two u64, first and end (exclusive) extent.
    DivergentRuns {
        runs: &'a [u8],
    },
}

impl Message<'_> {
    pub fn kind(&self) -> MessageKind {
        match self {
            Self::Hello { .. } => MessageKind::Hello,
            Self::Welcome { .. } => MessageKind::Welcome,
            Self::Proof { .. } => MessageKind::Proof,
            Self::ExtentData { .. } => MessageKind::ExtentData,
            Self::Ack { .. } => MessageKind::Ack,
            Self::Keepalive => MessageKind::Keepalive,
            Self::Error { .. } => MessageKind::Error,
            Self::VerifyRequest { .. } => MessageKind::VerifyRequest,
            Self::VerifyHashes { .. } => MessageKind::VerifyHashes,
            Self::ConsistencyPoint { .. } => MessageKind::ConsistencyPoint,
            Self::MirrorDb { .. } => MessageKind::MirrorDb,
            Self::MirrorDbPrepare { .. } => MessageKind::MirrorDbPrepare,
            Self::MirrorDbCommit { .. } => MessageKind::MirrorDbCommit,
            Self::DivergentRuns { .. } => MessageKind::DivergentRuns,
            Self::Commit { .. } => MessageKind::Commit,
            Self::CutState { .. } => MessageKind::CutState,
            Self::BlockData { .. } => MessageKind::BlockData,
            Self::Zeroes { .. } => MessageKind::Zeroes,
        }
    }
}

/// Checks the fixed part of a header. The checksum is checked by [`decode_payload`].
pub fn decode_header(bytes: &[u8; HEADER_BYTES], limits: &Limits) -> Result<Header, WireError> {
    let mut fields = Reader::new(bytes);
    let mut next = || fields.u64().expect("a header holds four u64");
    let (word0, word1, sequence, word3) = (next(), next(), next(), next());
    let magic = word0 as u32;
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let version = (word0 >> 32) as u16;
    if version != VERSION {
        return Err(WireError::Version { found: version });
    }
    let kind = (word0 >> 48) as u16;
    let kind = MessageKind::from_u16(kind).ok_or(WireError::UnknownKind { found: kind })?;
    let payload_bytes = word1 as u32;
    if payload_bytes > limits.payload_bytes_max {
        return Err(WireError::TooLong { found: payload_bytes, limit: limits.payload_bytes_max });
    }
    let flags = word3 as u8;
    if flags & !kind.flags_allowed() != 0 {
        return Err(WireError::Flags { kind, found: flags });
    }
    let cut = word3 >> 8;
    if cut != 0 && !kind.has_cut() {
        return Err(WireError::Cut { kind, found: cut });
    }
    Ok(Header { kind, payload_bytes, crc32c: (word1 >> 32) as u32, sequence, flags, cut })
}

/// The frame checksum: crc32c over the header with its checksum field zero, then the payload.
pub fn frame_crc32c(header: &[u8; HEADER_BYTES], payload: &[u8]) -> u32 {
    let mut zeroed = *header;
    zeroed[12..16].fill(0);
    crc32c::crc32c_append(crc32c::crc32c(&zeroed), payload)
}

/// Bytes before an extent's data in its frame: the header and the extent offset.
pub const EXTENT_PREFIX_BYTES: usize = HEADER_BYTES + 8;

/// The header and offset of an extent-data frame, to send right before `data` (the primary
/// writes them just before the data in the same buffer, so the frame goes out in one send).
pub fn encode_extent_prefix(
    sequence: u64,
    offset_bytes: u64,
    data: &[u8],
    cut: u64,
) -> [u8; EXTENT_PREFIX_BYTES] {
    encode_data_prefix(MessageKind::ExtentData, sequence, offset_bytes, data, Tag { flags: 0, cut })
}

/// As [`encode_extent_prefix`], for `ExtentData` or `BlockData` (which may carry `flags`).
pub fn encode_data_prefix(
    kind: MessageKind,
    sequence: u64,
    offset_bytes: u64,
    data: &[u8],
    tag: Tag,
) -> [u8; EXTENT_PREFIX_BYTES] {
    assert!(matches!(kind, MessageKind::ExtentData | MessageKind::BlockData));
    let offset = offset_bytes.to_le_bytes();
    let header = encode_tagged_header(kind, sequence, tag, &[&offset, data]);
    let mut prefix = [0u8; EXTENT_PREFIX_BYTES];
    prefix[..HEADER_BYTES].copy_from_slice(&header);
    prefix[HEADER_BYTES..].copy_from_slice(&offset);
    prefix
}

/// Parses one whole frame from the front of `bytes`, if it is all there: `Ok(None)` asks for
/// more bytes. A bad header is reported as soon as the header is in, without waiting for the
/// payload it announces.
pub fn parse_frame<'a>(
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<Option<(usize, u64, Message<'a>)>, WireError> {
    let Some(header_bytes) = bytes.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let header = decode_header(header_bytes, limits)?;
    let frame_bytes = HEADER_BYTES + header.payload_bytes as usize;
    let Some(payload) = bytes.get(HEADER_BYTES..frame_bytes) else {
        return Ok(None);
    };
    let message = decode_payload(header_bytes, &header, payload, limits)?;
    Ok(Some((frame_bytes, header.sequence, message)))
}

/// Checks the checksum and decodes the payload of a frame whose header decoded as `header`.
pub fn decode_payload<'a>(
    header_bytes: &[u8; HEADER_BYTES],
    header: &Header,
    payload: &'a [u8],
    limits: &Limits,
) -> Result<Message<'a>, WireError> {
    assert_eq!(payload.len(), header.payload_bytes as usize, "caller reads exactly payload_bytes");
    let computed = frame_crc32c(header_bytes, payload);
    if computed != header.crc32c {
        return Err(WireError::Checksum { expected: header.crc32c, computed });
    }
    let kind = header.kind;
    match kind {
        MessageKind::Hello | MessageKind::Welcome | MessageKind::Proof => decode_handshake(kind, payload),
        MessageKind::ExtentData => decode_extent_data(payload, limits),
        MessageKind::BlockData => match decode_extent_data(payload, &limits.by_sector())? {
            Message::ExtentData { offset_bytes, data } => Ok(Message::BlockData { offset_bytes, data }),
            _ => unreachable!("decode_extent_data decodes ExtentData"),
        },
        MessageKind::Error => decode_error(payload),
        MessageKind::DivergentRuns => decode_divergent_runs(payload),
        MessageKind::MirrorDb | MessageKind::MirrorDbPrepare => decode_mirror_db(kind, payload),
        MessageKind::VerifyHashes => decode_verify_hashes(payload),
        _ => decode_fixed(kind, payload, limits),
    }
}

/// A payload read field by field, which must be used up exactly.
struct Fields<'a> {
    kind: MessageKind,
    reader: Reader<'a>,
    expected: &'static str,
}

impl<'a> Fields<'a> {
    /// `payload` of a `kind` frame whose layout is `expected` bytes long.
    fn new(kind: MessageKind, payload: &'a [u8], expected: &'static str) -> Self {
        Self { kind, reader: Reader::new(payload), expected }
    }

    fn wrong_size(&self) -> WireError {
        WireError::PayloadSize { kind: self.kind, found: self.reader.input_len(), expected: self.expected }
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.reader.u64().map_err(|_| self.wrong_size())
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.reader.u32().map_err(|_| self.wrong_size())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.reader.array().map_err(|_| self.wrong_size())
    }

    /// Everything was read: a longer payload is the wrong size too.
    fn end(&self) -> Result<(), WireError> {
        if self.reader.remaining() == 0 { Ok(()) } else { Err(self.wrong_size()) }
    }
}

fn decode_handshake(kind: MessageKind, payload: &[u8]) -> Result<Message<'_>, WireError> {
    let message = match kind {
        MessageKind::Hello => {
            let mut f = Fields::new(kind, payload, "56");
            let (mirror_id, image_bytes, extent_bytes) = (f.u64()?, f.u64()?, f.u64()?);
            let message = Message::Hello { mirror_id, image_bytes, extent_bytes, nonce: f.array()? };
            f.end()?;
            message
        }
        MessageKind::Welcome => {
            let mut f = Fields::new(kind, payload, "64");
            let message = Message::Welcome { nonce: f.array()?, proof: f.array()? };
            f.end()?;
            message
        }
        _ => {
            let mut f = Fields::new(kind, payload, "32");
            let message = Message::Proof { proof: f.array()? };
            f.end()?;
            message
        }
    };
    Ok(message)
}

/// The payloads of a fixed layout that need no more than their fields and the limits.
fn decode_fixed<'a>(kind: MessageKind, payload: &'a [u8], limits: &Limits) -> Result<Message<'a>, WireError> {
    let expected = match kind {
        MessageKind::Zeroes => "24",
        MessageKind::CutState => "32",
        MessageKind::Ack
        | MessageKind::VerifyRequest
        | MessageKind::ConsistencyPoint
        | MessageKind::Commit => "16",
        MessageKind::MirrorDbCommit => "8",
        _ => "0",
    };
    let mut f = Fields::new(kind, payload, expected);
    let message = match kind {
        MessageKind::Zeroes => {
            let (offset_bytes, len_bytes, flags) = (f.u64()?, f.u64()?, f.u64()?);
            if flags > 1 {
                return Err(WireError::Reserved);
            }
            check_block_range(offset_bytes, len_bytes, limits)?;
            Message::Zeroes { offset_bytes, len_bytes, unmap: flags == 1 }
        }
        MessageKind::Ack => {
            let (first, last) = (f.u64()?, f.u64()?);
            if first > last {
                return Err(WireError::AckRange { first, last });
            }
            Message::Ack { first_sequence: first, last_sequence: last }
        }
        MessageKind::VerifyRequest => {
            let (first_extent, count, reserved) = (f.u64()?, f.u32()?, f.u32()?);
            check_verify_range(first_extent, count, limits)?;
            if reserved != 0 {
                return Err(WireError::Reserved);
            }
            Message::VerifyRequest { first_extent, count }
        }
        MessageKind::ConsistencyPoint => {
            Message::ConsistencyPoint { generation: f.u64()?, point_unix_ms: f.u64()? }
        }
        MessageKind::MirrorDbCommit => Message::MirrorDbCommit { revision: f.u64()? },
        MessageKind::Commit => {
            let (cut, cut_unix_ms) = (f.u64()?, f.u64()?);
            if cut == 0 || cut > CUT_MAX {
                return Err(WireError::Cut { kind, found: cut });
            }
            Message::Commit { cut, cut_unix_ms }
        }
        MessageKind::CutState => {
            let (committed_cut, committed_unix_ms, staged_cut_max, flags) =
                (f.u64()?, f.u64()?, f.u64()?, f.u64()?);
            if committed_cut > CUT_MAX || staged_cut_max > CUT_MAX {
                return Err(WireError::Cut { kind, found: committed_cut.max(staged_cut_max) });
            }
            if flags & !CUT_STATE_CONSISTENT != 0 {
                return Err(WireError::Reserved);
            }
            Message::CutState { committed_cut, committed_unix_ms, staged_cut_max, flags }
        }
        MessageKind::Keepalive => Message::Keepalive,
        other => unreachable!("{other:?} has a decoder of its own"),
    };
    f.end()?;
    Ok(message)
}

fn decode_error(payload: &[u8]) -> Result<Message<'_>, WireError> {
    let mut f = Fields::new(MessageKind::Error, payload, "4..=1028");
    let code = f.u32()?;
    let text = f.reader.rest();
    if text.len() > ERROR_MESSAGE_BYTES_MAX {
        return Err(WireError::PayloadSize {
            kind: MessageKind::Error,
            found: payload.len(),
            expected: f.expected,
        });
    }
    let code = ErrorCode::from_u32(code).ok_or(WireError::ErrorCode { found: code })?;
    let message = std::str::from_utf8(text).map_err(|_| WireError::ErrorText)?;
    Ok(Message::Error { code, message })
}

fn decode_divergent_runs(payload: &[u8]) -> Result<Message<'_>, WireError> {
    let wrong = |expected| WireError::PayloadSize {
        kind: MessageKind::DivergentRuns,
        found: payload.len(),
        expected,
    };
    let runs = payload.len() / 16;
    if payload.is_empty() || !payload.len().is_multiple_of(16) || runs > DIVERGENT_RUNS_MAX {
        return Err(wrong("16..=4096, whole runs"));
    }
    let mut reader = Reader::new(payload);
    for _ in 0..runs {
        let (first, end) = (reader.u64().expect("whole runs"), reader.u64().expect("whole runs"));
        if first >= end {
            return Err(wrong("runs with first < end"));
        }
    }
    Ok(Message::DivergentRuns { runs: payload })
}

fn decode_mirror_db(kind: MessageKind, payload: &[u8]) -> Result<Message<'_>, WireError> {
    if payload.is_empty() || payload.len() > MIRROR_DB_BYTES_MAX {
        return Err(WireError::PayloadSize { kind, found: payload.len(), expected: "1..=65560" });
    }
    Ok(if kind == MessageKind::MirrorDb {
        Message::MirrorDb { envelope: payload }
    } else {
        Message::MirrorDbPrepare { envelope: payload }
    })
}

fn decode_verify_hashes(payload: &[u8]) -> Result<Message<'_>, WireError> {
    let mut f = Fields::new(MessageKind::VerifyHashes, payload, ">= 16");
    let (first_extent, count, reserved) = (f.u64()?, f.u32()?, f.u32()?);
    if reserved != 0 {
        return Err(WireError::Reserved);
    }
    let hashes = f.reader.rest();
    if count == 0 || count > VERIFY_EXTENTS_MAX || hashes.len() != count as usize * VERIFY_HASH_BYTES {
        return Err(WireError::VerifyRange { first_extent, count });
    }
    Ok(Message::VerifyHashes { first_extent, hashes })
}

/// A verify range is 1..=VERIFY_EXTENTS_MAX extents inside the image.
fn check_verify_range(first_extent: u64, count: u32, limits: &Limits) -> Result<(), WireError> {
    let extents = limits.image_bytes.div_ceil(limits.extent_bytes);
    let inside = first_extent.checked_add(u64::from(count)).is_some_and(|end| end <= extents);
    if count == 0 || count > VERIFY_EXTENTS_MAX || !inside {
        return Err(WireError::VerifyRange { first_extent, count });
    }
    Ok(())
}

/// A block range is non-empty, sector-aligned and inside the image.
fn check_block_range(offset_bytes: u64, len_bytes: u64, limits: &Limits) -> Result<(), WireError> {
    let end = offset_bytes.checked_add(len_bytes);
    if len_bytes == 0 || end.is_none_or(|end| end > limits.image_bytes) {
        return Err(WireError::OutOfImage { offset_bytes, len_bytes, image_bytes: limits.image_bytes });
    }
    if !offset_bytes.is_multiple_of(SECTOR_BYTES) || !len_bytes.is_multiple_of(SECTOR_BYTES) {
        return Err(WireError::Unaligned { offset_bytes, len_bytes, extent_bytes: SECTOR_BYTES });
    }
    Ok(())
}

impl Limits {
    /// The same limits with sectors in place of extents, for data that need not cover whole
    /// extents (`BlockData`).
    fn by_sector(&self) -> Self {
        Self { extent_bytes: SECTOR_BYTES, ..*self }
    }
}

fn decode_extent_data<'a>(payload: &'a [u8], limits: &Limits) -> Result<Message<'a>, WireError> {
    if payload.len() <= 8 {
        return Err(WireError::PayloadSize {
            kind: MessageKind::ExtentData,
            found: payload.len(),
            expected: "> 8",
        });
    }
    let mut reader = Reader::new(payload);
    let offset_bytes = reader.u64().expect("more than 8 bytes");
    let data = reader.rest();
    let len_bytes = data.len() as u64;
    let end = offset_bytes.checked_add(len_bytes);
    if end.is_none_or(|end| end > limits.image_bytes) {
        return Err(WireError::OutOfImage { offset_bytes, len_bytes, image_bytes: limits.image_bytes });
    }
    // Whole extents, except that the image's last extent may be short.
    let ends_at_image_end = end == Some(limits.image_bytes);
    if !offset_bytes.is_multiple_of(limits.extent_bytes)
        || (!len_bytes.is_multiple_of(limits.extent_bytes) && !ends_at_image_end)
    {
        return Err(WireError::Unaligned { offset_bytes, len_bytes, extent_bytes: limits.extent_bytes });
    }
    Ok(Message::ExtentData { offset_bytes, data })
}

/// Writes a frame header for `kind` and `payload` (the payload may be sent from elsewhere, as
/// zero-copy sends do; only its bytes enter the checksum).
pub fn encode_header(kind: MessageKind, sequence: u64, payload: &[&[u8]]) -> [u8; HEADER_BYTES] {
    encode_tagged_header(kind, sequence, Tag::default(), payload)
}

/// As [`encode_header`], with the header's flags and cut.
fn encode_tagged_header(kind: MessageKind, sequence: u64, tag: Tag, payload: &[&[u8]]) -> [u8; HEADER_BYTES] {
    assert!(tag.flags & !kind.flags_allowed() == 0, "flags {:#04x} on {kind:?}", tag.flags);
    assert!(tag.cut <= CUT_MAX && (tag.cut == 0 || kind.has_cut()), "cut {} on {kind:?}", tag.cut);
    let payload_bytes: usize = payload.iter().map(|p| p.len()).sum();
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    header[8..12].copy_from_slice(&u32::try_from(payload_bytes).expect("payload under 4 GiB").to_le_bytes());
    header[16..24].copy_from_slice(&sequence.to_le_bytes());
    header[24..32].copy_from_slice(&(u64::from(tag.flags) | tag.cut << 8).to_le_bytes());
    let crc = payload.iter().fold(crc32c::crc32c(&header), |crc, part| crc32c::crc32c_append(crc, part));
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Encodes a whole message into `out` (cleared first). For extent data the payload is the
/// offset followed by the data; a sender that wants zero copy encodes the header with
/// [`encode_header`] over `[offset, data]` instead.
pub fn encode(message: &Message<'_>, sequence: u64, out: &mut Vec<u8>) {
    encode_tagged(message, sequence, Tag::default(), out);
}

/// As [`encode`], with a data frame's flags and cut in its header.
pub fn encode_tagged(message: &Message<'_>, sequence: u64, tag: Tag, out: &mut Vec<u8>) {
    let mut fixed = [0u8; 24 + NONCE_BYTES + PROOF_BYTES];
    let parts = payload_parts(message, &mut fixed);
    out.clear();
    out.extend_from_slice(&encode_tagged_header(message.kind(), sequence, tag, &parts));
    out.extend_from_slice(parts[0]);
    out.extend_from_slice(parts[1]);
}

/// A message's payload as its fixed fields (written into `fixed`) and its variable part.
fn payload_parts<'a>(
    message: &'a Message<'_>,
    fixed: &'a mut [u8; 24 + NONCE_BYTES + PROOF_BYTES],
) -> [&'a [u8]; 2] {
    let words = put_words;
    let used = match message {
        Message::Hello { mirror_id, image_bytes, extent_bytes, nonce } => {
            words(fixed, &[*mirror_id, *image_bytes, *extent_bytes]);
            fixed[24..24 + NONCE_BYTES].copy_from_slice(nonce);
            24 + NONCE_BYTES
        }
        Message::Welcome { nonce, proof } => {
            fixed[..NONCE_BYTES].copy_from_slice(nonce);
            fixed[NONCE_BYTES..NONCE_BYTES + PROOF_BYTES].copy_from_slice(proof);
            NONCE_BYTES + PROOF_BYTES
        }
        Message::Proof { proof } => {
            fixed[..PROOF_BYTES].copy_from_slice(proof);
            PROOF_BYTES
        }
        Message::Zeroes { offset_bytes, len_bytes, unmap } => {
            words(fixed, &[*offset_bytes, *len_bytes, u64::from(*unmap)])
        }
        Message::Ack { first_sequence: a, last_sequence: b }
        | Message::ConsistencyPoint { generation: a, point_unix_ms: b }
        | Message::Commit { cut: a, cut_unix_ms: b } => words(fixed, &[*a, *b]),
        Message::MirrorDbCommit { revision } => words(fixed, &[*revision]),
        Message::CutState { committed_cut, committed_unix_ms, staged_cut_max, flags } => {
            words(fixed, &[*committed_cut, *committed_unix_ms, *staged_cut_max, *flags])
        }
        // The count is a u32 followed by a reserved u32, zero: one little-endian u64.
        Message::VerifyRequest { first_extent, count } => words(fixed, &[*first_extent, u64::from(*count)]),
        Message::VerifyHashes { first_extent, hashes } => {
            words(fixed, &[*first_extent, (hashes.len() / VERIFY_HASH_BYTES) as u64])
        }
        Message::Error { code, .. } => {
            fixed[..4].copy_from_slice(&(*code as u32).to_le_bytes());
            4
        }
        Message::ExtentData { offset_bytes, .. } | Message::BlockData { offset_bytes, .. } => {
            words(fixed, &[*offset_bytes])
        }
        Message::Keepalive
        | Message::MirrorDb { .. }
        | Message::MirrorDbPrepare { .. }
        | Message::DivergentRuns { .. } => 0,
    };
    let variable: &[u8] = match message {
        Message::ExtentData { data, .. } | Message::BlockData { data, .. } => data,
        Message::Error { message, .. } => truncate_utf8(message, ERROR_MESSAGE_BYTES_MAX).as_bytes(),
        Message::MirrorDb { envelope } | Message::MirrorDbPrepare { envelope } => envelope,
        Message::DivergentRuns { runs } => runs,
        Message::VerifyHashes { hashes, .. } => hashes,
        _ => &[],
    };
    [&fixed[..used], variable]
}

/// Writes `values` as little-endian u64 from the start of `fixed`; returns the bytes written.
fn put_words(fixed: &mut [u8], values: &[u64]) -> usize {
    for (i, value) in values.iter().enumerate() {
        fixed[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    values.len() * 8
}

fn truncate_utf8(text: &str, bytes_max: usize) -> &str {
    let mut end = text.len().min(bytes_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits =
        Limits { image_bytes: (1 << 30) + 4096, extent_bytes: 65536, payload_bytes_max: 8 + (1 << 20) };

    fn decode(frame: &[u8]) -> Result<(u64, Message<'_>), WireError> {
        let header_bytes: &[u8; HEADER_BYTES] = frame[..HEADER_BYTES].try_into().expect("header");
        let header = decode_header(header_bytes, &LIMITS)?;
        let payload = frame.get(HEADER_BYTES..HEADER_BYTES + header.payload_bytes as usize).ok_or(
            WireError::PayloadSize {
                kind: header.kind,
                found: frame.len() - HEADER_BYTES,
                expected: "truncated",
            },
        )?;
        Ok((header.sequence, decode_payload(header_bytes, &header, payload, &LIMITS)?))
    }

    fn message() -> impl Strategy<Value = (u64, Vec<u8>, u8, [u8; 32], [u8; 32], String)> {
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 1..4),
            0u8..18,
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            ".{0,40}",
        )
    }

    fn build(kind: u8, n: u64, data: &[u8], a: [u8; 32], b: [u8; 32], text: &str) -> Message<'static> {
        let data: &'static [u8] =
            Box::leak(data.repeat(65536 / data.len() + 1)[..65536].to_vec().into_boxed_slice());
        let text: &'static str = Box::leak(text.to_owned().into_boxed_str());
        match kind {
            0 => Message::Hello { mirror_id: n, image_bytes: n / 3, extent_bytes: 65536, nonce: a },
            1 => Message::Welcome { nonce: a, proof: b },
            2 => Message::Proof { proof: b },
            3 => Message::ExtentData { offset_bytes: (n % 1024) * 65536, data },
            4 => Message::Ack { first_sequence: n / 2, last_sequence: n / 2 + n % 7 },
            5 => Message::Keepalive,
            6 => Message::VerifyRequest { first_extent: n % 1000, count: (n % 256) as u32 + 1 },
            7 => Message::VerifyHashes { first_extent: n, hashes: &data[..(n % 256 + 1) as usize * 16] },
            8 => Message::ConsistencyPoint { generation: n, point_unix_ms: n / 7 },
            9 => Message::MirrorDb { envelope: &data[..(n % 1000 + 1) as usize] },
            10 => {
                let runs: Vec<u8> = (0..(n % 256 + 1))
                    .flat_map(|i| [i * 10, i * 10 + 1 + n % 9].into_iter().flat_map(u64::to_le_bytes))
                    .collect();
                Message::DivergentRuns { runs: Box::leak(runs.into_boxed_slice()) }
            }
            11 => Message::BlockData {
                offset_bytes: (n % 4096) * 512,
                data: &data[..(n % 128 + 1) as usize * 512],
            },
            12 => Message::Zeroes {
                offset_bytes: (n % 4096) * 512,
                len_bytes: (n % 9999 + 1) * 512,
                unmap: n.is_multiple_of(2),
            },
            13 => Message::MirrorDbPrepare { envelope: &data[..(n % 1000 + 1) as usize] },
            14 => Message::MirrorDbCommit { revision: n },
            15 => Message::Commit { cut: n % CUT_MAX + 1, cut_unix_ms: n / 3 },
            16 => Message::CutState {
                committed_cut: n % CUT_MAX,
                committed_unix_ms: n / 5,
                staged_cut_max: n % 77,
                flags: n % 2,
            },
            _ => Message::Error {
                code: ErrorCode::from_u32((n % 8 + 1) as u32).expect("1..=8"),
                message: text,
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn every_message_round_trips((n, data, kind, a, b, text) in message(), sequence in any::<u64>()) {
            let message = build(kind, n, &data, a, b, &text);
            let mut frame = Vec::new();
            encode(&message, sequence, &mut frame);
            prop_assert_eq!(decode(&frame), Ok((sequence, message)));
        }

        /// Any single flipped bit is caught (by a field check or the checksum): never accepted.
        #[test]
        fn a_flipped_bit_is_never_accepted((n, data, kind, a, b, text) in message(), bit in any::<prop::sample::Index>()) {
            let message = build(kind, n, &data, a, b, &text);
            let mut frame = Vec::new();
            encode(&message, 7, &mut frame);
            let bit = bit.index(frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&frame).is_err());
        }

        /// Any kind with any payload, behind a sound header with the right checksum, reaches
        /// its payload decoder: an error or a message, never a panic.
        #[test]
        fn sealed_garbage_reaches_every_decoder_and_never_panics(
            kind in 1u16..=18,
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            sequence in any::<u64>(),
        ) {
            let kind = MessageKind::from_u16(kind).expect("every kind from 1 to 18");
            let mut frame = encode_header(kind, sequence, &[&payload]).to_vec();
            frame.extend_from_slice(&payload);
            let _ = decode(&frame);
        }

        /// Arbitrary bytes: an error or a message, never a panic.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), HEADER_BYTES..200), fix_magic in any::<bool>()) {
            let mut bytes = bytes;
            if fix_magic {
                bytes[0..4].copy_from_slice(&MAGIC.to_le_bytes());
                bytes[4..6].copy_from_slice(&VERSION.to_le_bytes());
            }
            let _ = decode(&bytes);
        }
    }

    /// An `Error` frame carries one of the known codes; any other is malformed.
    #[test]
    fn error_codes_are_known_or_refused() {
        let mut frame = Vec::new();
        encode(&Message::Error { code: ErrorCode::SplitBrain, message: "apart" }, 3, &mut frame);
        assert_eq!(decode(&frame), Ok((3, Message::Error { code: ErrorCode::SplitBrain, message: "apart" })));
        let payload = [9u8, 0, 0, 0];
        let mut unknown = encode_header(MessageKind::Error, 3, &[&payload]).to_vec();
        unknown.extend_from_slice(&payload);
        assert_eq!(decode(&unknown), Err(WireError::ErrorCode { found: 9 }));
    }

    #[test]
    fn extent_prefix_and_stream_parsing() {
        let data = vec![9u8; 65536];
        let mut stream = encode_extent_prefix(42, 131072, &data, 0).to_vec();
        stream.extend_from_slice(&data);
        let mut keepalive = Vec::new();
        encode(&Message::Keepalive, 43, &mut keepalive);
        stream.extend_from_slice(&keepalive);
        assert_eq!(parse_frame(&stream[..100], &LIMITS), Ok(None), "a partial frame asks for more");
        let (used, sequence, message) = parse_frame(&stream, &LIMITS).expect("valid").expect("whole");
        assert_eq!((used, sequence), (EXTENT_PREFIX_BYTES + 65536, 42));
        assert_eq!(message, Message::ExtentData { offset_bytes: 131072, data: &data });
        let (_, sequence, message) = parse_frame(&stream[used..], &LIMITS).expect("valid").expect("whole");
        assert_eq!((sequence, message), (43, Message::Keepalive));
        assert!(parse_frame(&[0u8; HEADER_BYTES], &LIMITS).is_err(), "bad header reported early");
    }

    #[test]
    fn the_client_waits_flag_rides_only_on_block_data() {
        let data = vec![3u8; 4096];
        let tag = Tag { flags: FLAG_CLIENT_WAITS, cut: 0 };
        let mut frame = encode_data_prefix(MessageKind::BlockData, 7, 8192, &data, tag).to_vec();
        frame.extend_from_slice(&data);
        let header = decode_header(frame.first_chunk().expect("a header"), &LIMITS).expect("valid");
        assert_eq!(header.flags, FLAG_CLIENT_WAITS);
        assert_eq!(
            decode(&frame),
            Ok((7, Message::BlockData { offset_bytes: 8192, data: &data })),
            "checksum covers it"
        );
        let mut unknown = frame.clone();
        unknown[24] = 4;
        assert_eq!(decode(&unknown), Err(WireError::Flags { kind: MessageKind::BlockData, found: 4 }));
        let mut extent = encode_extent_prefix(7, 0, &vec![0u8; 65536], 0).to_vec();
        extent[24] = FLAG_CLIENT_WAITS;
        let header = extent.first_chunk().expect("a header");
        assert_eq!(
            decode_header(header, &LIMITS),
            Err(WireError::Flags { kind: MessageKind::ExtentData, found: FLAG_CLIENT_WAITS })
        );
        let mut keepalive = Vec::new();
        encode(&Message::Keepalive, 1, &mut keepalive);
        keepalive[31] = 1;
        assert_eq!(
            decode(&keepalive),
            Err(WireError::Cut { kind: MessageKind::Keepalive, found: 1 << 48 }),
            "a cut only on data frames"
        );
    }

    #[test]
    fn data_frames_carry_their_cut_under_the_checksum() {
        let data = vec![5u8; 65536];
        let mut frame = encode_extent_prefix(9, 65536, &data, CUT_MAX).to_vec();
        frame.extend_from_slice(&data);
        let header = decode_header(frame.first_chunk().expect("a header"), &LIMITS).expect("valid");
        assert_eq!((header.cut, header.flags), (CUT_MAX, 0));
        assert!(decode(&frame).is_ok());
        frame[26] ^= 1;
        assert!(matches!(decode(&frame), Err(WireError::Checksum { .. })), "the cut is checksummed");
        let mut zeroes = Vec::new();
        let tag = Tag { flags: FLAG_IN_ORDER, cut: 12 };
        encode_tagged(
            &Message::Zeroes { offset_bytes: 0, len_bytes: 512, unmap: false },
            3,
            tag,
            &mut zeroes,
        );
        let header = decode_header(zeroes.first_chunk().expect("a header"), &LIMITS).expect("valid");
        assert_eq!((header.cut, header.flags), (12, FLAG_IN_ORDER));
        let mut commit = Vec::new();
        encode(&Message::Commit { cut: 0, cut_unix_ms: 1 }, 3, &mut commit);
        assert_eq!(
            decode(&commit),
            Err(WireError::Cut { kind: MessageKind::Commit, found: 0 }),
            "cuts start at 1"
        );
    }

    #[test]
    fn extent_data_must_be_aligned_and_inside_the_image() {
        let check = |offset_bytes: u64, len: usize| {
            let data = vec![0u8; len];
            let mut frame = Vec::new();
            encode(&Message::ExtentData { offset_bytes, data: &data }, 1, &mut frame);
            decode(&frame).map(|_| ())
        };
        assert_eq!(check(65536, 65536), Ok(()));
        assert!(matches!(check(4096, 65536), Err(WireError::Unaligned { .. })));
        assert!(matches!(check(65536, 4096), Err(WireError::Unaligned { .. })));
        assert!(matches!(check(1 << 30, 65536), Err(WireError::OutOfImage { .. })));
        assert_eq!(check(1 << 30, 4096), Ok(()), "the image's short last extent");
        assert!(matches!(check(u64::MAX - 4095, 4096), Err(WireError::OutOfImage { .. })));
        let mut frame = Vec::new();
        encode(&Message::ExtentData { offset_bytes: 0, data: &vec![0u8; 2 << 20] }, 1, &mut frame);
        assert!(matches!(decode(&frame), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn block_data_and_zeroes_must_be_sector_aligned_and_inside_the_image() {
        let mut frame = Vec::new();
        let data = vec![7u8; 512];
        encode(&Message::BlockData { offset_bytes: 1024, data: &data }, 1, &mut frame);
        assert!(decode(&frame).is_ok());
        encode(&Message::BlockData { offset_bytes: 1000, data: &data }, 1, &mut frame);
        assert_eq!(
            decode(&frame),
            Err(WireError::Unaligned { offset_bytes: 1000, len_bytes: 512, extent_bytes: SECTOR_BYTES })
        );
        encode(&Message::BlockData { offset_bytes: LIMITS.image_bytes, data: &data }, 1, &mut frame);
        assert!(matches!(decode(&frame), Err(WireError::OutOfImage { .. })));
        let zeroes = |offset_bytes, len_bytes| Message::Zeroes { offset_bytes, len_bytes, unmap: true };
        for (offset, len) in [(0, 0), (512, 100), (LIMITS.image_bytes - 512, 1024), (u64::MAX - 511, 1024)] {
            encode(&zeroes(offset, len), 1, &mut frame);
            assert!(decode(&frame).is_err(), "zeroes at {offset} length {len} accepted");
        }
        encode(&zeroes(LIMITS.image_bytes - 512, 512), 1, &mut frame);
        assert!(decode(&frame).is_ok());
    }

    #[test]
    fn verify_requests_stay_inside_the_image() {
        let check = |first_extent: u64, count: u32| {
            let mut frame = Vec::new();
            encode(&Message::VerifyRequest { first_extent, count }, 1, &mut frame);
            decode(&frame).map(|_| ())
        };
        let extents = LIMITS.image_bytes.div_ceil(LIMITS.extent_bytes);
        assert_eq!(check(extents - 1, 1), Ok(()));
        assert!(matches!(check(extents - 1, 2), Err(WireError::VerifyRange { .. })));
        assert!(matches!(check(0, 0), Err(WireError::VerifyRange { .. })));
        assert!(matches!(check(0, VERIFY_EXTENTS_MAX + 1), Err(WireError::VerifyRange { .. })));
        assert!(matches!(check(u64::MAX, 1), Err(WireError::VerifyRange { .. })));
    }
}

/// Errors of blocking frame I/O: the transport failed, or the peer sent a bad frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
}

/// Reads one frame into `buffer` (reused; grows at most to the payload limit) and decodes it.
/// For the handshake and control traffic; the data path decodes from its registered buffers.
pub fn read_frame<'b>(
    reader: &mut impl std::io::Read,
    limits: &Limits,
    buffer: &'b mut Vec<u8>,
) -> Result<(u64, Message<'b>), FrameError> {
    let mut header_bytes = [0u8; HEADER_BYTES];
    reader.read_exact(&mut header_bytes)?;
    let header = decode_header(&header_bytes, limits)?;
    buffer.resize(header.payload_bytes as usize, 0);
    reader.read_exact(buffer)?;
    Ok((header.sequence, decode_payload(&header_bytes, &header, buffer, limits)?))
}

/// Encodes and writes one frame.
pub fn write_frame(
    writer: &mut impl std::io::Write,
    message: &Message<'_>,
    sequence: u64,
) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + 64);
    encode(message, sequence, &mut frame);
    writer.write_all(&frame)
}
