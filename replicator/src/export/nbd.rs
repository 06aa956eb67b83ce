//! The NBD protocol, server side: the fixed-newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`), the transmission request decoder,
//! and simple replies. Structured replies are declined (the protocol makes them optional).
//!
//! Written here rather than taken from a crate: the NBD crates serve requests one at a time
//! against a `Read + Write + Seek` backend, and the export needs each request decoded on its
//! own so that writes go to the engine and replies go out as they complete, out of order.
//!
//! Invariant: a request leaves `decode_request` only if its magic, command, flags, offset and
//! length are valid for this export (inside the image, at most `block_bytes_max` of data for a
//! read or write); anything else is an error that ends the connection, so no byte of a
//! malformed request reaches the image (property-tested below on arbitrary bytes).

use std::io::{Read, Write};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const REQUEST_BYTES: usize = 28;
pub const REPLY_BYTES: usize = 16;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FLAGS_KNOWN: u32 = 0b11;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags: has flags, FLUSH, FUA, TRIM, WRITE_ZEROES, and several connections may
/// be used together (a FLUSH covers every connection's completed writes: it flushes the device).
const TRANSMISSION_FLAGS: u16 = 1 | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 8);

/// Longest option payload accepted in the handshake (the protocol's longest string is 4096).
const OPTION_BYTES_MAX: u32 = 4096 + 64;
/// Options a client may send before transmission: a client looping forever is dropped.
const OPTIONS_MAX: u32 = 32;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAGS_KNOWN: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | (1 << 4);

/// NBD error numbers (the protocol's own, equal to Linux errno values).
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOTSUP: u32 = 95;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {found:#x} in {what}")]
    Magic { what: &'static str, found: u64 },
    #[error("client flags {0:#x} include unknown bits")]
    ClientFlags(u32),
    #[error("option {option} with {bytes} bytes of data, over the limit of {OPTION_BYTES_MAX}")]
    OptionTooLong { option: u32, bytes: u32 },
    #[error("more than {OPTIONS_MAX} options before transmission")]
    TooManyOptions,
    #[error("the client aborted the handshake")]
    Aborted,
    #[error("unknown command {0}")]
    Command(u16),
    #[error("command flags {0:#x} include unknown bits")]
    CommandFlags(u16),
    #[error("{command:?} of {len_bytes} bytes is over the export's maximum of {limit} bytes")]
    TooLong { command: Command, len_bytes: u32, limit: u32 },
    #[error(
        "{command:?} at offset {offset_bytes} length {len_bytes} is outside the {image_bytes}-byte export"
    )]
    OutOfRange { command: Command, offset_bytes: u64, len_bytes: u32, image_bytes: u64 },
}

/// What the export offers, fixed when it starts.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub image_bytes: u64,
    /// The device's logical block size: requests must be aligned to it.
    pub block_bytes_min: u32,
    /// Largest read or write.
    pub block_bytes_max: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
}

impl Command {
    fn from_u16(value: u16) -> Option<Self> {
        Some(match value {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disconnect,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            _ => return None,
        })
    }
}

/// A decoded transmission request (a write's data follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub flags: u16,
    pub cookie: u64,
    pub offset_bytes: u64,
    pub len_bytes: u32,
}

impl Request {
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// Whether offset and length are multiples of the export's minimum block: a misaligned
    /// request gets `EINVAL` (the client was told the minimum at `NBD_OPT_GO`).
    pub fn aligned(&self, block_bytes_min: u32) -> bool {
        let min = u64::from(block_bytes_min);
        self.offset_bytes.is_multiple_of(min) && u64::from(self.len_bytes).is_multiple_of(min)
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes and checks one request header.
pub fn decode_request(bytes: &[u8; REQUEST_BYTES], info: &ExportInfo) -> Result<Request, NbdError> {
    let magic = be_u32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(NbdError::Magic { what: "request", found: u64::from(magic) });
    }
    let flags = be_u16(bytes, 4);
    let command = Command::from_u16(be_u16(bytes, 6)).ok_or(NbdError::Command(be_u16(bytes, 6)))?;
    if flags & !CMD_FLAGS_KNOWN != 0 {
        return Err(NbdError::CommandFlags(flags));
    }
    let request = Request {
        command,
        flags,
        cookie: be_u64(bytes, 8),
        offset_bytes: be_u64(bytes, 16),
        len_bytes: be_u32(bytes, 24),
    };
    let carries_data = matches!(command, Command::Read | Command::Write);
    if carries_data && request.len_bytes > info.block_bytes_max {
        return Err(NbdError::TooLong { command, len_bytes: request.len_bytes, limit: info.block_bytes_max });
    }
    let ranged = !matches!(command, Command::Disconnect | Command::Flush);
    let end = request.offset_bytes.checked_add(u64::from(request.len_bytes));
    if ranged && end.is_none_or(|end| end > info.image_bytes) {
        return Err(NbdError::OutOfRange {
            command,
            offset_bytes: request.offset_bytes,
            len_bytes: request.len_bytes,
            image_bytes: info.image_bytes,
        });
    }
    Ok(request)
}

/// A simple reply's header (a read's data follows it).
pub fn encode_reply(cookie: u64, error: u32) -> [u8; REPLY_BYTES] {
    let mut reply = [0u8; REPLY_BYTES];
    reply[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    reply[4..8].copy_from_slice(&error.to_be_bytes());
    reply[8..16].copy_from_slice(&cookie.to_be_bytes());
    reply
}

fn read_u32(stream: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(stream: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(stream: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut reply = Vec::with_capacity(20 + data.len());
    reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    reply.extend_from_slice(&option.to_be_bytes());
    reply.extend_from_slice(&kind.to_be_bytes());
    reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
    reply.extend_from_slice(data);
    stream.write_all(&reply)
}

/// The server's half of the handshake. Returns once the client has chosen the export and
/// transmission begins.
pub fn handshake(stream: &mut (impl Read + Write), info: &ExportInfo) -> Result<(), NbdError> {
    let no_zeroes = greet(stream)?;
    for _ in 0..OPTIONS_MAX {
        let (option, data) = read_option(stream)?;
        if answer_option(stream, info, option, &data, no_zeroes)? {
            return Ok(());
        }
    }
    Err(NbdError::TooManyOptions)
}

/// The fixed-newstyle greeting, and the client's flags: whether it skips the zeroes after an
/// `NBD_OPT_EXPORT_NAME` reply.
fn greet(stream: &mut (impl Read + Write)) -> Result<bool, NbdError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    let client_flags = read_u32(stream)?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(NbdError::ClientFlags(client_flags));
    }
    Ok(client_flags & u32::from(FLAG_NO_ZEROES) != 0)
}

/// One option the client sends: its code and data (at most `OPTION_BYTES_MAX`).
fn read_option(stream: &mut impl Read) -> Result<(u32, Vec<u8>), NbdError> {
    let magic = read_u64(stream)?;
    if magic != IHAVEOPT {
        return Err(NbdError::Magic { what: "option", found: magic });
    }
    let option = read_u32(stream)?;
    let bytes = read_u32(stream)?;
    if bytes > OPTION_BYTES_MAX {
        return Err(NbdError::OptionTooLong { option, bytes });
    }
    let mut data = vec![0u8; bytes as usize];
    stream.read_exact(&mut data)?;
    Ok((option, data))
}

/// Answers one option; returns whether transmission begins.
fn answer_option(
    stream: &mut impl Write,
    info: &ExportInfo,
    option: u32,
    data: &[u8],
    no_zeroes: bool,
) -> Result<bool, NbdError> {
    match option {
        OPT_EXPORT_NAME => {
            // No reply framing and no way to refuse: size, flags, padding, transmission.
            let mut reply = Vec::with_capacity(134);
            reply.extend_from_slice(&info.image_bytes.to_be_bytes());
            reply.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
            if !no_zeroes {
                reply.extend_from_slice(&[0u8; 124]);
            }
            stream.write_all(&reply)?;
            return Ok(true);
        }
        OPT_ABORT => {
            let _ = option_reply(stream, option, REP_ACK, &[]);
            return Err(NbdError::Aborted);
        }
        OPT_LIST if data.is_empty() => {
            let mut server = (info.name.len() as u32).to_be_bytes().to_vec();
            server.extend_from_slice(info.name.as_bytes());
            option_reply(stream, option, REP_SERVER, &server)?;
            option_reply(stream, option, REP_ACK, &[])?;
        }
        OPT_LIST => option_reply(stream, option, REP_ERR_INVALID, &[])?,
        OPT_INFO | OPT_GO => match parse_info_request(data) {
            None => option_reply(stream, option, REP_ERR_INVALID, &[])?,
            Some(name) if !name.is_empty() && name != info.name.as_bytes() => {
                option_reply(stream, option, REP_ERR_UNKNOWN, &[])?
            }
            Some(_) => {
                export_info(stream, info, option)?;
                return Ok(option == OPT_GO);
            }
        },
        _ => option_reply(stream, option, REP_ERR_UNSUP, &[])?,
    }
    Ok(false)
}

/// The export's size and flags, and its block sizes (sent whether asked or not, as the
/// protocol allows: requests must be aligned to the device's logical block and at most the
/// maximum long), then the ack.
fn export_info(stream: &mut impl Write, info: &ExportInfo, option: u32) -> std::io::Result<()> {
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&info.image_bytes.to_be_bytes());
    export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    option_reply(stream, option, REP_INFO, &export)?;
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    sizes.extend_from_slice(&info.block_bytes_min.to_be_bytes());
    sizes.extend_from_slice(&info.block_bytes_min.max(4096).to_be_bytes());
    sizes.extend_from_slice(&info.block_bytes_max.to_be_bytes());
    option_reply(stream, option, REP_INFO, &sizes)?;
    option_reply(stream, option, REP_ACK, &[])
}

/// The export name of an `NBD_OPT_INFO` / `NBD_OPT_GO` payload, if it is well formed: a name
/// length, the name, a count of information requests, and that many 16-bit requests.
fn parse_info_request(data: &[u8]) -> Option<&[u8]> {
    let name_bytes = be_u32(data.get(..4)?, 0) as usize;
    let name = data.get(4..4usize.checked_add(name_bytes)?)?;
    let rest = &data[4 + name_bytes..];
    let requests = usize::from(be_u16(rest.get(..2)?, 0));
    (rest.len() == 2 + 2 * requests).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const INFO_BYTES: u64 = 64 << 20;

    fn info() -> ExportInfo {
        ExportInfo {
            name: "m".into(),
            image_bytes: INFO_BYTES,
            block_bytes_min: 512,
            block_bytes_max: 1 << 20,
        }
    }

    fn request(command: u16, flags: u16, offset: u64, len: u32) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&command.to_be_bytes());
        b[8..16].copy_from_slice(&77u64.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn requests_are_checked_against_the_export() {
        let info = info();
        let ok = decode_request(&request(1, CMD_FLAG_FUA, 4096, 4096), &info).expect("a valid write");
        assert_eq!((ok.command, ok.fua(), ok.cookie), (Command::Write, true, 77));
        assert!(matches!(decode_request(&request(1, 0, 0, 2 << 20), &info), Err(NbdError::TooLong { .. })));
        assert!(matches!(
            decode_request(&request(0, 0, INFO_BYTES, 512), &info),
            Err(NbdError::OutOfRange { .. })
        ));
        assert!(matches!(
            decode_request(&request(4, 0, u64::MAX - 10, 512), &info),
            Err(NbdError::OutOfRange { .. })
        ));
        assert!(matches!(decode_request(&request(9, 0, 0, 512), &info), Err(NbdError::Command(9))));
        // A TRIM may be longer than the largest write; a flush carries no range.
        assert!(decode_request(&request(4, 0, 0, 32 << 20), &info).is_ok());
        assert!(decode_request(&request(3, 0, u64::MAX, 0), &info).is_ok());
        let mut bad = request(1, 0, 0, 512);
        bad[0] ^= 1;
        assert!(matches!(decode_request(&bad, &info), Err(NbdError::Magic { .. })));
        assert!(!decode_request(&request(1, 0, 100, 512), &info).expect("decodes").aligned(512));
    }

    #[test]
    fn handshake_go_then_transmission() {
        let (mut server, mut client) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let thread = std::thread::spawn(move || handshake(&mut server, &info()).map(|()| server));
        let mut greeting = [0u8; 18];
        client.read_exact(&mut greeting).expect("greeting");
        assert_eq!(be_u64(&greeting, 0), NBDMAGIC);
        client.write_all(&3u32.to_be_bytes()).expect("client flags");
        let mut go = IHAVEOPT.to_be_bytes().to_vec();
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&1u32.to_be_bytes());
        go.extend_from_slice(b"m");
        go.extend_from_slice(&0u16.to_be_bytes());
        client.write_all(&go).expect("GO");
        let mut replies = Vec::new();
        loop {
            let mut head = [0u8; 20];
            client.read_exact(&mut head).expect("option reply");
            let mut data = vec![0u8; be_u32(&head, 16) as usize];
            client.read_exact(&mut data).expect("option reply data");
            replies.push((be_u32(&head, 12), data));
            if be_u32(&head, 12) == REP_ACK {
                break;
            }
        }
        assert_eq!(replies.len(), 3, "export info, block sizes, ack");
        assert_eq!(be_u64(&replies[0].1, 2), INFO_BYTES);
        assert_eq!(be_u32(&replies[1].1, 10), 1 << 20);
        thread.join().expect("server thread").expect("handshake succeeds");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary request bytes: an error, or a request inside the export; never a panic.
        #[test]
        fn decoded_requests_stay_inside_the_export(bytes in any::<[u8; REQUEST_BYTES]>(), fix_magic in any::<bool>()) {
            let mut bytes = bytes;
            if fix_magic {
                bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            let info = info();
            if let Ok(r) = decode_request(&bytes, &info) {
                if matches!(r.command, Command::Read | Command::Write) {
                    prop_assert!(r.len_bytes <= info.block_bytes_max);
                }
                if !matches!(r.command, Command::Disconnect | Command::Flush) {
                    prop_assert!(r.offset_bytes + u64::from(r.len_bytes) <= info.image_bytes);
                }
            }
        }

        /// Arbitrary handshake bytes from a client: an error or a completed handshake.
        #[test]
        fn handshake_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut stream = Duplex { input: std::io::Cursor::new(bytes), output: Vec::new() };
            let _ = handshake(&mut stream, &info());
        }
    }

    struct Duplex {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
