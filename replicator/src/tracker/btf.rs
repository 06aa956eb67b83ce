//! Just enough of a BTF reader to find, in the running kernel's `/sys/kernel/btf/vmlinux`, the
//! offsets of the struct members the kernel program reads (`bio`, `request`, `block_device`,
//! `gendisk`, `request_queue`), two enum values, and the argument lists of raw tracepoints.
//!
//! Written by hand because no permissively licensed, maintained crate exposes member offsets:
//! aya-obj parses BTF but keeps its types crate-private, btf-rs is LGPL. BTF is a flat array of
//! fixed-layout records (see the kernel's Documentation/bpf/btf.rst), so the reader is small.
//! Invariant: every read is bounds-checked; malformed input is an error, never a panic.

use std::path::Path;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const HEADER_BYTES: usize = 24;
const TYPE_BYTES: usize = 12;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source} (is the kernel built with CONFIG_DEBUG_INFO_BTF?)")]
    Read { path: String, source: std::io::Error },
    #[error("BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("BTF has no {kind} named {name:?}")]
    NotFound { kind: &'static str, name: String },
    #[error("BTF: {container} has no member {member:?}")]
    NoMember { container: String, member: String },
    #[error("BTF: {container}.{member} is a bitfield")]
    Bitfield { container: String, member: String },
}

/// One type record: the common header and where its kind-specific data starts.
#[derive(Clone, Copy, Debug)]
struct TypeRecord {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    extra: usize,
}

impl TypeRecord {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }

    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

/// A member found by [`Btf::member`]: byte offset from the start of the outer struct, and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub offset_bytes: u32,
    pub size_bytes: u32,
    type_id: u32,
}

pub struct Btf {
    bytes: Vec<u8>,
    strings: std::ops::Range<usize>,
    /// Index `i` is type id `i + 1` (id 0 is void).
    types: Vec<TypeRecord>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let bytes = std::fs::read(path)
            .map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Self::parse(bytes)
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Self, BtfError> {
        let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let header = |i: usize| read_u32(&bytes, 4 + 4 * i).ok_or(BtfError::Malformed("short header"));
        let (header_len, type_off, type_len, str_off, str_len) = (
            header(0)? as usize,
            header(1)? as usize,
            header(2)? as usize,
            header(3)? as usize,
            header(4)? as usize,
        );
        if header_len < HEADER_BYTES {
            return Err(BtfError::Malformed("header too short"));
        }
        let section = |off: usize, len: usize| {
            let start = header_len.checked_add(off)?;
            let end = start.checked_add(len)?;
            (end <= bytes.len()).then_some(start..end)
        };
        let type_section =
            section(type_off, type_len).ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = section(str_off, str_len).ok_or(BtfError::Malformed("string section out of bounds"))?;
        let types = parse_types(&bytes, type_section)?;
        Ok(Self { bytes, strings, types })
    }

    fn record(&self, id: u32) -> Result<&TypeRecord, BtfError> {
        let index = (id as usize).checked_sub(1).ok_or(BtfError::Malformed("reference to void"))?;
        self.types.get(index).ok_or(BtfError::Malformed("type id out of range"))
    }

    fn name(&self, offset: u32) -> Result<&str, BtfError> {
        let start = self.strings.start + offset as usize;
        let tail =
            self.bytes.get(start..self.strings.end).ok_or(BtfError::Malformed("name offset out of range"))?;
        let len = tail.iter().position(|&b| b == 0).ok_or(BtfError::Malformed("unterminated name"))?;
        std::str::from_utf8(&tail[..len]).map_err(|_| BtfError::Malformed("name is not UTF-8"))
    }

    fn u32_at(&self, at: usize) -> Result<u32, BtfError> {
        read_u32(&self.bytes, at).ok_or(BtfError::Malformed("record out of bounds"))
    }

    /// The id of the first type of `kind` named `name` (for structs, the first with members: a
    /// forward declaration has none).
    fn find(&self, kind: u32, name: &str) -> Result<u32, BtfError> {
        for (index, record) in self.types.iter().enumerate() {
            let complete = kind != KIND_STRUCT || record.vlen() > 0;
            if record.kind() == kind && complete && self.name(record.name_off)? == name {
                return Ok(index as u32 + 1);
            }
        }
        let kind_name = match kind {
            KIND_STRUCT => "struct",
            KIND_ENUM => "enum",
            _ => "typedef",
        };
        Err(BtfError::NotFound { kind: kind_name, name: name.into() })
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..32 {
            let record = self.record(id)?;
            match record.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = record.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::Malformed("typedef chain too long"))
    }

    fn size_of(&self, id: u32) -> Result<u32, BtfError> {
        let id = self.resolve(id)?;
        let record = self.record(id)?;
        match record.kind() {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => Ok(record.size_or_type),
            KIND_PTR => Ok(8),
            KIND_ARRAY => {
                let element = self.u32_at(record.extra)?;
                let count = self.u32_at(record.extra + 8)?;
                self.size_of(element)?.checked_mul(count).ok_or(BtfError::Malformed("array too large"))
            }
            _ => Err(BtfError::Malformed("size of a sizeless type")),
        }
    }

    /// Finds `path` (e.g. `["bi_iter", "bi_sector"]`) in struct `name`, looking through anonymous
    /// struct and union members as C does.
    pub fn member(&self, name: &str, path: &[&str]) -> Result<Member, BtfError> {
        let mut found = Member { offset_bytes: 0, size_bytes: 0, type_id: self.find(KIND_STRUCT, name)? };
        let mut container = name.to_owned();
        for &part in path {
            let inner = self
                .member_in(found.type_id, part)?
                .ok_or_else(|| BtfError::NoMember { container: container.clone(), member: part.into() })?;
            let bit_offset = inner.0;
            if bit_offset % 8 != 0 {
                return Err(BtfError::Bitfield { container, member: part.into() });
            }
            found = Member {
                offset_bytes: found.offset_bytes + bit_offset / 8,
                size_bytes: self.size_of(inner.1)?,
                type_id: inner.1,
            };
            container = format!("{container}.{part}");
        }
        Ok(found)
    }

    /// (bit offset, type id) of member `name` of the struct or union `id`, searching anonymous
    /// members too.
    fn member_in(&self, id: u32, name: &str) -> Result<Option<(u32, u32)>, BtfError> {
        let record = *self.record(self.resolve(id)?)?;
        if !matches!(record.kind(), KIND_STRUCT | KIND_UNION) {
            return Err(BtfError::Malformed("member lookup in a non-struct"));
        }
        for i in 0..record.vlen() {
            let at = record.extra + i * 12;
            let (name_off, type_id, offset) = (self.u32_at(at)?, self.u32_at(at + 4)?, self.u32_at(at + 8)?);
            let bit_offset = if record.kind_flag() { offset & 0xff_ffff } else { offset };
            if record.kind_flag() && offset >> 24 != 0 && self.name(name_off)? == name {
                return Err(BtfError::Bitfield {
                    container: self.name(record.name_off)?.into(),
                    member: name.into(),
                });
            }
            let member_name = self.name(name_off)?;
            if member_name == name {
                return Ok(Some((bit_offset, type_id)));
            }
            if member_name.is_empty()
                && let Some((inner_offset, inner_type)) = self.member_in(type_id, name)?
            {
                return Ok(Some((bit_offset + inner_offset, inner_type)));
            }
        }
        Ok(None)
    }

    /// The value of enumerator `variant` of enum `name`.
    pub fn enum_value(&self, name: &str, variant: &str) -> Result<i64, BtfError> {
        let record = *self.record(self.find(KIND_ENUM, name)?)?;
        for i in 0..record.vlen() {
            let at = record.extra + i * 8;
            if self.name(self.u32_at(at)?)? == variant {
                return Ok(i64::from(self.u32_at(at + 4)? as i32));
            }
        }
        Err(BtfError::NoMember { container: format!("enum {name}"), member: variant.into() })
    }

    /// Describes the parameters of the function-pointer typedef `name` (`btf_trace_<tp>` for a
    /// raw tracepoint): for each, the struct it points to (`"struct bio"`), or its size for a
    /// plain integer (`"u32"`), or `"?"`.
    pub fn typedef_params(&self, name: &str) -> Result<Vec<String>, BtfError> {
        let pointer = self.resolve(self.find(KIND_TYPEDEF, name)?)?;
        let pointer_record = self.record(pointer)?;
        let proto = self.resolve(pointer_record.size_or_type)?;
        let proto_record = *self.record(proto)?;
        if pointer_record.kind() != KIND_PTR || proto_record.kind() != KIND_FUNC_PROTO {
            return Err(BtfError::Malformed("tracepoint typedef is not a function pointer"));
        }
        (0..proto_record.vlen())
            .map(|i| self.describe(self.u32_at(proto_record.extra + i * 8 + 4)?))
            .collect()
    }

    fn describe(&self, id: u32) -> Result<String, BtfError> {
        if id == 0 {
            return Ok("?".into());
        }
        let record = *self.record(self.resolve(id)?)?;
        Ok(match record.kind() {
            KIND_PTR if record.size_or_type != 0 => {
                let pointee = *self.record(self.resolve(record.size_or_type)?)?;
                match pointee.kind() {
                    KIND_STRUCT => format!("struct {}", self.name(pointee.name_off)?),
                    _ => "?".into(),
                }
            }
            KIND_INT => format!("u{}", record.size_or_type * 8),
            _ => "?".into(),
        })
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn parse_types(bytes: &[u8], section: std::ops::Range<usize>) -> Result<Vec<TypeRecord>, BtfError> {
    let mut types = Vec::new();
    let mut at = section.start;
    while at < section.end {
        let field = |i: usize| read_u32(bytes, at + 4 * i).ok_or(BtfError::Malformed("truncated type"));
        let record = TypeRecord {
            name_off: field(0)?,
            info: field(1)?,
            size_or_type: field(2)?,
            extra: at + TYPE_BYTES,
        };
        let vlen = record.vlen();
        let extra_bytes = match record.kind() {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
            0..=19 => 0,
            _ => return Err(BtfError::Malformed("unknown type kind")),
        };
        at = record.extra + extra_bytes;
        if at > section.end {
            return Err(BtfError::Malformed("type runs past its section"));
        }
        types.push(record);
    }
    Ok(types)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Garbage is an error, never a panic.
        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
            if magic && bytes.len() >= 24 {
                bytes[0..2].copy_from_slice(&MAGIC.to_le_bytes());
                bytes[4..8].copy_from_slice(&24u32.to_le_bytes());
            }
            if let Ok(btf) = Btf::parse(bytes) {
                let _ = btf.member("bio", &["bi_iter", "bi_sector"]);
                let _ = btf.enum_value("req_op", "REQ_OP_READ");
                let _ = btf.typedef_params("btf_trace_block_bio_queue");
            }
        }
    }
}
