//! The kernel layout the program reads comes from this kernel's BTF, and is consistent.

use replicator::tracker::{Btf, kernel_layout};

#[test]
fn layout_comes_from_this_kernels_btf() {
    let layout = kernel_layout().expect("reading the kernel layout from /sys/kernel/btf/vmlinux");
    let btf = Btf::from_sys_fs().expect("parsing vmlinux BTF");
    let iter = btf.member("bio", &["bi_iter"]).expect("bio.bi_iter");
    assert_eq!(layout.bio_sector, iter.offset_bytes, "bi_sector is the first member of bvec_iter");
    assert_eq!(layout.bio_size, iter.offset_bytes + 8, "bi_size follows bi_sector");
    assert_eq!(layout.disk_first_minor, layout.disk_major + 4, "gendisk: major, first_minor");
    assert_eq!(layout.op_read, 0, "REQ_OP_READ");
    assert_eq!(layout.op_mask, 0xff, "REQ_OP_BITS is 8 on Linux 6.x");
    assert!(btf.member("bio", &["no_such_member"]).is_err());
    assert!(btf.typedef_params("btf_trace_block_rq_complete").expect("params").len() == 4);
}
