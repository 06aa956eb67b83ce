//! The kernel layout the program needs (member offsets, the request-operation encoding, raw
//! tracepoint argument positions), read from the running kernel's BTF and checked.
//!
//! Invariant: a layout is returned only if every member exists with the size the program reads
//! and every raw tracepoint takes its arguments where the program expects them; otherwise
//! loading stops with an error naming what differs, rather than marking the wrong extents.

use replicator_common::{
    BIO_COMPLETE_ARG_BIO, BIO_QUEUE_ARG_BIO, KernelLayout, RQ_COMPLETE_ARG_NR_BYTES, RQ_COMPLETE_ARG_RQ,
};

use super::btf::{Btf, BtfError};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("kernel BTF: {what} is {found} bytes; the tracker reads {expected}")]
    Size { what: String, found: u32, expected: u32 },
    #[error(
        "kernel BTF: raw tracepoint {tracepoint} takes ({found}); the tracker expects {expected} at argument {index}"
    )]
    Argument { tracepoint: &'static str, found: String, expected: &'static str, index: usize },
    #[error("kernel BTF: {what} = {value} is out of range")]
    Value { what: &'static str, value: i64 },
}

/// Reads the layout from `/sys/kernel/btf/vmlinux`.
pub fn kernel_layout() -> Result<KernelLayout, LayoutError> {
    layout_from(&Btf::from_sys_fs()?)
}

pub fn layout_from(btf: &Btf) -> Result<KernelLayout, LayoutError> {
    check_arguments(btf)?;
    let member = |container: &str, path: &[&str], size: u32| -> Result<u32, LayoutError> {
        let found = btf.member(container, path)?;
        if found.size_bytes != size {
            let what = format!("struct {container}.{}", path.join("."));
            return Err(LayoutError::Size { what, found: found.size_bytes, expected: size });
        }
        Ok(found.offset_bytes)
    };
    // REQ_OP_MASK is a macro; the first request flag bit is REQ_OP_BITS, and it is in an enum.
    let op_bits = btf.enum_value("req_flag_bits", "__REQ_FAILFAST_DEV")?;
    if !(1..=31).contains(&op_bits) {
        return Err(LayoutError::Value { what: "__REQ_FAILFAST_DEV", value: op_bits });
    }
    let op_read = btf.enum_value("req_op", "REQ_OP_READ")?;
    let op_read =
        u32::try_from(op_read).map_err(|_| LayoutError::Value { what: "REQ_OP_READ", value: op_read })?;
    Ok(KernelLayout {
        bio_bdev: member("bio", &["bi_bdev"], 8)?,
        bio_opf: member("bio", &["bi_opf"], 4)?,
        bio_sector: member("bio", &["bi_iter", "bi_sector"], 8)?,
        bio_size: member("bio", &["bi_iter", "bi_size"], 4)?,
        bdev_disk: member("block_device", &["bd_disk"], 8)?,
        disk_major: member("gendisk", &["major"], 4)?,
        disk_first_minor: member("gendisk", &["first_minor"], 4)?,
        rq_queue: member("request", &["q"], 8)?,
        rq_sector: member("request", &["__sector"], 8)?,
        rq_cmd_flags: member("request", &["cmd_flags"], 4)?,
        queue_disk: member("request_queue", &["disk"], 8)?,
        op_mask: (1u32 << op_bits) - 1,
        op_read,
        _pad: 0,
    })
}

/// The programs read their arguments at compile-time positions; the kernel's `btf_trace_*`
/// typedefs (`void (*)(void *__data, <TP_PROTO>)`) must agree.
fn check_arguments(btf: &Btf) -> Result<(), LayoutError> {
    let expect = [
        ("block_bio_queue", BIO_QUEUE_ARG_BIO, "struct bio"),
        ("block_rq_complete", RQ_COMPLETE_ARG_RQ, "struct request"),
        ("block_rq_complete", RQ_COMPLETE_ARG_NR_BYTES, "u32"),
        ("block_bio_complete", BIO_COMPLETE_ARG_BIO, "struct bio"),
    ];
    for (tracepoint, index, expected) in expect {
        let params = btf.typedef_params(&format!("btf_trace_{tracepoint}"))?;
        // params[0] is the tracepoint's private `void *__data`.
        if params.get(index + 1).map(String::as_str) != Some(expected) {
            let found = params.get(1..).unwrap_or_default().join(", ");
            return Err(LayoutError::Argument { tracepoint, found, expected, index });
        }
    }
    Ok(())
}
