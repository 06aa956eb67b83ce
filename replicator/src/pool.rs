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

/// A ring of `entries` for one thread: completions are run only when that thread waits
/// (`DEFER_TASKRUN`, `SINGLE_ISSUER`), which spares it the interrupts and wake-ups of task work
/// run at any moment (at queue depth 1 through the export, 15% off the latency here), and the
/// ring's flags say when such work is waiting (`TASKRUN_FLAG`, for `PollWindow`). Falls back to
/// a plain ring on a kernel without those flags (before 6.1). The creating thread must be the
/// only one that submits and waits.
pub fn new_ring(entries: u32) -> std::io::Result<io_uring::IoUring> {
    io_uring::IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| io_uring::IoUring::new(entries))
}

/// The longest `--poll-us` accepted.
pub const POLL_US_MAX: u64 = 1000;
/// The window without `--poll-us`, while a client waits on the writes that flow.
pub const POLL_US_AUTO: u64 = 200;
/// A thread spins only if it last went to wait less than this long ago: a mirror with no
/// writes flowing never spins. Also how recent a client's write must be for `PollSetting::Auto`.
pub const POLL_ACTIVE_WITHIN_US: u64 = 1000;

/// Whether `at` is less than `POLL_ACTIVE_WITHIN_US` ago.
pub fn within_poll_window(at: Option<std::time::Instant>) -> bool {
    at.is_some_and(|t| t.elapsed().as_micros() < u128::from(POLL_ACTIVE_WITHIN_US))
}

/// How a thread busy-polls (`--poll-us`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollSetting {
    /// `--poll-us` not given: `POLL_US_AUTO` while writes that a client waits on flow
    /// (synchronous writes through the export: every hop is in the client's latency), no spin
    /// otherwise (the tracker path and async writes gain nothing from it).
    Auto,
    /// `--poll-us N`: up to N µs while any writes flow; 0 never spins.
    Fixed(u64),
}

impl PollSetting {
    /// The window of one wait, `client_waits` saying whether a client's sync write is flowing.
    pub fn budget_us(self, client_waits: bool) -> u64 {
        match self {
            Self::Auto if client_waits => POLL_US_AUTO,
            Self::Auto => 0,
            Self::Fixed(budget_us) => budget_us,
        }
    }
}

/// Busy-polling before a thread blocks on its ring (`--poll-us`). A synchronous write takes
/// several hops between threads (client, engine, secondary, the devices' workers), and on a VM
/// each hop to an idle vCPU costs tens of µs of halting and waking it. With a window, a thread
/// that has submitted its work spins up to its window (`PollSetting::budget_us`) for the next completion before it
/// sleeps: lower latency at low queue depth, for up to a core of CPU while writes flow. By
/// default only while a client waits on them (`PollSetting::Auto`); it only spins while its
/// loop turns faster than `POLL_ACTIVE_WITHIN_US`.
///
/// Each pass of the spin yields the CPU (`sched_yield`): the threads a write waits for (the
/// loop device's worker, the client, the network's softirq) run at once on the spinning CPU
/// instead of waiting out the spinner's time slice, and the CPU still never halts while writes
/// flow. A bare spin made the tail worse than no spin at all on two vCPUs (sync export at
/// depth 1, p99 550-1500 µs against 400 without a window; 180-260 yielding).
#[derive(Debug)]
pub struct PollWindow {
    setting: PollSetting,
    last_wait: Option<std::time::Instant>,
}

impl PollWindow {
    pub fn new(setting: PollSetting) -> Self {
        if let PollSetting::Fixed(budget_us) = setting {
            assert!(budget_us <= POLL_US_MAX, "poll window {budget_us} µs over {POLL_US_MAX}");
        }
        Self { setting, last_wait: None }
    }

    /// Called just before the blocking wait: submits what is queued and spins, running the
    /// ring's deferred work when its flag says there is some, until a completion is ready or
    /// the budget is spent. The wait that follows then returns at once or blocks as before. A
    /// signal (EINTR) or a full completion queue (EBUSY) ends the spin, for that wait to meet.
    /// Returns the seconds spent in the spin loop, after the submit that starts it (for
    /// `replicator_busy_poll_seconds`): wall-clock time, yields to other threads included.
    pub fn spin(&mut self, ring: &mut io_uring::IoUring, client_waits: bool) -> std::io::Result<f64> {
        let budget_us = self.setting.budget_us(client_waits);
        if budget_us == 0 {
            self.last_wait = None;
            return Ok(0.0);
        }
        let mut spun_s = 0.0;
        let now = std::time::Instant::now();
        if within_poll_window(self.last_wait) {
            match Self::spin_until_completion(ring, now, budget_us) {
                Ok(seconds) => spun_s = seconds,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
        }
        self.last_wait = Some(std::time::Instant::now());
        Ok(spun_s)
    }

    fn spin_until_completion(
        ring: &mut io_uring::IoUring,
        start: std::time::Instant,
        budget_us: u64,
    ) -> std::io::Result<f64> {
        if !ring.completion().is_empty() {
            return Ok(0.0); // the wait that follows submits what is queued
        }
        ring.submit()?;
        let spin_start = std::time::Instant::now();
        while ring.completion().is_empty() && start.elapsed().as_micros() < u128::from(budget_us) {
            if ring.submission().taskrun() {
                // GETEVENTS without waiting: runs the deferred work, which posts completions.
                ring.submit()?;
            } else {
                // Never fails on Linux; a runnable thread on this CPU goes first.
                let _ = nix::sched::sched_yield();
            }
        }
        Ok(spin_start.elapsed().as_secs_f64())
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

    #[test]
    fn poll_setting_auto_spins_only_while_a_client_waits() {
        assert_eq!(PollSetting::Auto.budget_us(true), POLL_US_AUTO);
        assert_eq!(PollSetting::Auto.budget_us(false), 0);
        assert_eq!(PollSetting::Fixed(50).budget_us(false), 50);
        assert_eq!(PollSetting::Fixed(0).budget_us(true), 0, "--poll-us 0 never spins");
        assert!(!within_poll_window(None));
        assert!(within_poll_window(Some(std::time::Instant::now())));
    }

    /// A timer's completion is deferred work that only a GETEVENTS enter posts: a spin with
    /// room to wait for it (a budget far longer than any preemption) ends with it posted. The
    /// budget bounds the test, not the timing: without that enter the spin would run out the
    /// budget and find nothing, however the CPUs are loaded.
    #[test]
    fn poll_window_runs_deferred_work_that_arrives_while_it_spins() {
        const BUDGET_US: u64 = 10_000_000;
        let mut ring = new_ring(8).expect("io_uring");
        let timeout = io_uring::types::Timespec::new().nsec(1_000_000);
        let entry = io_uring::opcode::Timeout::new(&timeout).build().user_data(7);
        // SAFETY: `timeout` outlives the op, which completes before the ring is dropped.
        unsafe { ring.submission().push(&entry).expect("a free entry") };
        let spun_s =
            PollWindow::spin_until_completion(&mut ring, std::time::Instant::now(), BUDGET_US).expect("spin");
        assert!(spun_s < BUDGET_US as f64 / 1e6, "the spin ran out its budget");
        assert!(ring.completion().any(|done| done.user_data() == 7), "the timer's completion was posted");
    }
}
