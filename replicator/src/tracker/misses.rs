//! Recursion misses: the kernel does not run a tracing program on a CPU where the same program
//! is already running (an interrupt completing a request while the program handles another),
//! and counts the skipped run in the program's `recursion_misses`. A skipped run is a mark
//! that was never set, so the tracker watches this counter and, when it moves, marks the whole
//! device: a full resync instead of a silently missing extent.
//!
//! aya 0.14 does not expose the counter, so this asks the kernel directly (`bpf(2)`,
//! `BPF_OBJ_GET_INFO_BY_FD`) with aya-obj's generated `bpf_prog_info`.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use aya_obj::generated::{bpf_cmd, bpf_prog_info};

/// The `info` member of `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `recursion_misses` of the program behind `fd`.
pub fn recursion_misses(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    // SAFETY: bpf_prog_info is plain data; all zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<bpf_prog_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` and `info` outlive the call; the kernel writes at most `info_len` bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            size_of::<InfoByFd>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}
