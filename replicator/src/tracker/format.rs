//! Tracepoint field offsets, read from `/sys/kernel/tracing/events/<category>/<name>/format`.
//!
//! Offsets differ between tracepoints and can change between kernels, so nothing is hard-coded:
//! each field the kernel program reads is looked up here, and its size checked, before load.

use std::path::{Path, PathBuf};

use replicator_common::FieldOffsets;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no field {field:?}")]
    MissingField { path: PathBuf, field: &'static str },
    #[error("{path}: field {field:?} is {size} bytes, expected {expected}")]
    FieldSize { path: PathBuf, field: &'static str, size: u32, expected: &'static str },
}

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// Parses the `field:` lines of a format file; lines that do not parse are skipped (the format
/// also holds `print fmt:` and comments).
pub fn parse_fields(text: &str) -> Vec<Field> {
    text.lines().filter_map(parse_field_line).collect()
}

fn parse_field_line(line: &str) -> Option<Field> {
    // "\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;"
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.trim().split(';') {
        let part = part.trim();
        if let Some(rest) = part.strip_prefix("field:") {
            decl = Some(rest);
        } else if let Some(rest) = part.strip_prefix("offset:") {
            offset = rest.parse().ok();
        } else if let Some(rest) = part.strip_prefix("size:") {
            size = rest.parse().ok();
        }
    }
    let last = decl?.split_whitespace().last()?;
    let name = last.split('[').next()?.to_owned();
    Some(Field { name, offset: offset?, size: size? })
}

/// Offsets of `dev`, `sector`, `nr_sector` and `rwbs` in one block tracepoint.
pub fn block_field_offsets(tracefs: &Path, tracepoint: &str) -> Result<FieldOffsets, FormatError> {
    let path = tracefs.join("events/block").join(tracepoint).join("format");
    let text =
        std::fs::read_to_string(&path).map_err(|source| FormatError::Read { path: path.clone(), source })?;
    offsets_from_fields(&path, &parse_fields(&text))
}

pub fn offsets_from_fields(path: &Path, fields: &[Field]) -> Result<FieldOffsets, FormatError> {
    let find = |field: &'static str, size_ok: fn(u32) -> bool, expected: &'static str| {
        let f = fields
            .iter()
            .find(|f| f.name == field)
            .ok_or_else(|| FormatError::MissingField { path: path.into(), field })?;
        if !size_ok(f.size) {
            return Err(FormatError::FieldSize { path: path.into(), field, size: f.size, expected });
        }
        Ok(f.offset)
    };
    Ok(FieldOffsets {
        dev: find("dev", |s| s == 4, "4")?,
        sector: find("sector", |s| s == 8, "8")?,
        nr_sector: find("nr_sector", |s| s == 4, "4")?,
        rwbs: find("rwbs", |s| s >= 8, "at least 8")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RQ_COMPLETE: &str = "name: block_rq_complete
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u\", ...
";

    #[test]
    fn parses_a_real_format_file() {
        let fields = parse_fields(RQ_COMPLETE);
        let offsets = offsets_from_fields(Path::new("rq_complete"), &fields).unwrap();
        assert_eq!(offsets, FieldOffsets { dev: 8, sector: 16, nr_sector: 24, rwbs: 34 });
        assert!(fields.iter().any(|f| f.name == "cmd" && f.offset == 44));
    }

    #[test]
    fn rejects_a_field_of_the_wrong_size() {
        let text =
            RQ_COMPLETE.replace("sector_t sector;\toffset:16;\tsize:8", "u32 sector;\toffset:16;\tsize:4");
        let err = offsets_from_fields(Path::new("x"), &parse_fields(&text)).unwrap_err();
        assert!(err.to_string().contains("\"sector\" is 4 bytes"), "{err}");
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(text in ".{0,400}") {
            let _ = offsets_from_fields(Path::new("x"), &parse_fields(&text));
        }
    }
}
