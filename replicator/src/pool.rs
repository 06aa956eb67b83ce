//! A fixed pool of page-aligned buffers, allocated once at start-up and registered with an
//! io_uring (so reads, writes and zero-copy sends use them without per-I/O page pinning).
//!
//! Each buffer is a 4 KiB prefix page followed by `data_bytes_max` of data. The data starts on
//! a page boundary, as O_DIRECT needs; a frame's header and extent offset are written at the end
//! of the prefix so header + offset + data are contiguous and go out in one send.
//!
//! The mapping is aligned to 2 MiB and asked for transparent huge pages, so a buffer's data
//! is physically contiguous in chunks far above a device's segment size: a 1 MiB read or
//! write of 4 KiB pages is 256 segments, over the 128 a loop device (and many disks) takes in
//! one request, and the block layer splits it, which a non-blocking io_uring submission
//! cannot do; the kernel then hands every such I/O to a worker thread (a context switch each,
//! 2-3% of the CPU while shipping at full speed here). Huge pages are a hint: without them the
//! pool works as before.
//!
//! Ownership: a buffer is either free (in the free list) or owned by exactly one in-flight
//! operation chain, identified by its index. `take` hands ownership out, `give_back` returns
//! it; the pool asserts that a buffer is never returned twice. The mapping lives as long as the
//! pool, which must outlive the ring's use of it (the engine drops the ring first).

use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous, munmap};

pub const PREFIX_BYTES: usize = 4096;
/// A transparent huge page on x86-64 and arm64 with 4 KiB pages: the pool's alignment.
const HUGE_PAGE_BYTES: usize = 2 << 20;

pub struct BufferPool {
    mapping: HugeMapping,
    buffer_bytes: usize,
    data_bytes_max: usize,
    count: usize,
    free: Vec<u16>,
    is_free: Vec<bool>,
}

// SAFETY: the pool owns its mapping; access goes through &mut self or raw pointers handed to the
// kernel under the ownership rule above.
unsafe impl Send for BufferPool {}

impl BufferPool {
    /// Maps `count` buffers of `data_bytes_max` (a multiple of 4 KiB) each, plus their prefixes.
    pub fn new(count: usize, data_bytes_max: usize) -> nix::Result<Self> {
        assert!(count > 0 && count <= usize::from(u16::MAX), "pool of {count} buffers");
        assert!(data_bytes_max > 0 && data_bytes_max.is_multiple_of(PREFIX_BYTES));
        let buffer_bytes = PREFIX_BYTES + data_bytes_max;
        let mapping = HugeMapping::new(buffer_bytes * count)?;
        let free = (0..count as u16).rev().collect();
        Ok(Self { mapping, buffer_bytes, data_bytes_max, count, free, is_free: vec![true; count] })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn data_bytes_max(&self) -> usize {
        self.data_bytes_max
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn take(&mut self) -> Option<u16> {
        let index = self.free.pop()?;
        assert!(self.is_free[index as usize]);
        self.is_free[index as usize] = false;
        Some(index)
    }

    pub fn give_back(&mut self, index: u16) {
        assert!(!self.is_free[index as usize], "buffer {index} returned twice");
        self.is_free[index as usize] = true;
        self.free.push(index);
    }

    /// Start of buffer `index` (its prefix page).
    pub fn buffer_ptr(&self, index: u16) -> *mut u8 {
        assert!((index as usize) < self.count);
        // SAFETY: inside the mapping.
        unsafe { self.mapping.base().as_ptr().add(index as usize * self.buffer_bytes) }
    }

    /// Start of buffer `index`'s data area (page-aligned).
    pub fn data_ptr(&self, index: u16) -> *mut u8 {
        // SAFETY: the data area follows the prefix inside the same buffer.
        unsafe { self.buffer_ptr(index).add(PREFIX_BYTES) }
    }

    /// The data area of an owned buffer.
    pub fn data(&self, index: u16, len: usize) -> &[u8] {
        assert!(len <= self.data_bytes_max && !self.is_free[index as usize]);
        // SAFETY: in bounds; the caller owns the buffer and no kernel write to it is in flight.
        unsafe { std::slice::from_raw_parts(self.data_ptr(index), len) }
    }

    pub fn data_mut(&mut self, index: u16, len: usize) -> &mut [u8] {
        assert!(len <= self.data_bytes_max && !self.is_free[index as usize]);
        // SAFETY: as above, and &mut self makes it exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(index), len) }
    }

    /// The last `len` bytes of buffer `index`'s prefix, for a frame header and offset.
    pub fn prefix_tail_mut(&mut self, index: u16, len: usize) -> &mut [u8] {
        assert!(len <= PREFIX_BYTES && !self.is_free[index as usize]);
        // SAFETY: in bounds of the prefix page; exclusive through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(index).sub(len), len) }
    }

    /// The iovecs to register with `Submitter::register_buffers`, one per buffer.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count as u16)
            .map(|i| libc::iovec { iov_base: self.buffer_ptr(i).cast(), iov_len: self.buffer_bytes })
            .collect()
    }
}

/// A private anonymous mapping that starts on a huge-page boundary and is advised to use huge
/// pages (see the module header), unmapped on drop. Its owner hands out pointers into it and
/// keeps it alive while the kernel or another thread may use them.
pub struct HugeMapping {
    base: NonNull<u8>,
    /// A whole number of huge pages.
    bytes: usize,
}

// SAFETY: the mapping is plain memory owned by this value; who reads or writes which part of
// it is the business of its users (the pool's ownership rule, one export buffer per part).
unsafe impl Send for HugeMapping {}
unsafe impl Sync for HugeMapping {}

impl HugeMapping {
    /// Maps at least `bytes` (rounded up to whole huge pages). mmap itself only aligns to
    /// 4 KiB: this over-maps by one huge page and unmaps the slack on either side.
    pub fn new(bytes: usize) -> nix::Result<Self> {
        assert!(bytes > 0, "an empty mapping");
        let bytes = bytes.next_multiple_of(HUGE_PAGE_BYTES);
        let length = NonZeroUsize::new(bytes + HUGE_PAGE_BYTES).expect("non-zero mapping");
        // SAFETY: a fresh private anonymous mapping; its slack is unmapped below and the rest
        // is owned by the returned value until drop.
        let over: NonNull<u8> = unsafe {
            mmap_anonymous(None, length, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE)?
        }
        .cast();
        let head_bytes = (over.as_ptr() as usize).next_multiple_of(HUGE_PAGE_BYTES) - over.as_ptr() as usize;
        let tail_bytes = HUGE_PAGE_BYTES - head_bytes;
        // SAFETY: `base` and the slack on either side are inside the mapping just made; on a
        // failure (ENOMEM: too many mappings to split one more) what is left of it goes.
        let base = unsafe { over.add(head_bytes) };
        unsafe {
            if head_bytes > 0
                && let Err(error) = munmap(over.cast(), head_bytes)
            {
                let _ = munmap(over.cast(), bytes + HUGE_PAGE_BYTES);
                return Err(error);
            }
            if let Err(error) = munmap(base.add(bytes).cast(), tail_bytes) {
                let _ = munmap(base.cast(), bytes + tail_bytes);
                return Err(error);
            }
        }
        assert_eq!(base.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
        // SAFETY: advice over this mapping. A kernel without transparent huge pages says
        // EINVAL; the mapping then works with small pages.
        if let Err(error) = unsafe { madvise(base.cast(), bytes, MmapAdvise::MADV_HUGEPAGE) } {
            tracing::debug!(%error, "no transparent huge pages for a buffer mapping");
        }
        Ok(Self { base, bytes })
    }

    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for HugeMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; its users are gone (the ring that used a
        // pool is dropped before it; export buffers hold it through an Arc).
        let _ = unsafe { munmap(self.base.cast(), self.bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_owned_once() {
        let mut pool = BufferPool::new(4, 65536).expect("mmap");
        let a = pool.take().expect("a");
        let b = pool.take().expect("b");
        assert_ne!(a, b);
        assert_eq!(pool.buffer_ptr(0) as usize % HUGE_PAGE_BYTES, 0, "the mapping starts on a huge page");
        assert!(pool.mapping.bytes() >= 4 * (PREFIX_BYTES + 65536));
        assert!(pool.mapping.bytes().is_multiple_of(HUGE_PAGE_BYTES));
        assert_eq!(pool.data_ptr(a) as usize % 4096, 0);
        pool.data_mut(a, 4).copy_from_slice(b"abcd");
        pool.prefix_tail_mut(a, 40).fill(7);
        assert_eq!(pool.data(a, 4), b"abcd");
        pool.give_back(a);
        assert_eq!(pool.free_count(), 3);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.give_back(a)));
        assert!(result.is_err(), "a buffer returned twice is a bug");
    }
}
