//! A typed op slab over an io_uring: every operation in the ring is an `Op` value in a slot
//! whose index is the entry's `user_data`, and the value owns (or names the owner of) every
//! buffer the kernel uses until the op's last completion.
//!
//! Owns the ring and the slab, sized together at creation from the caller's budget: the sum of
//! named reserves, each bounded by the resource that limits it (a buffer, a connection, an
//! export slot). Invariant: a push always finds a free slot and room in the submission queue;
//! running out is a bug in the budget, reported as such (a panic naming the slot count), never
//! an error the operator could fix.

use io_uring::{IoUring, cqueue, squeue, types};

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

/// A completion copied out of the ring: the slot of its op, its result and flags.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub slot: u32,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// More completions of this op follow (a zero-copy send's notification).
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// This is a zero-copy send's notification.
    pub fn notification(&self) -> bool {
        cqueue::notif(self.flags)
    }
}

/// The ring and its slab of ops.
pub struct Ring<Op> {
    ring: IoUring,
    ops: Vec<Option<Op>>,
    free: Vec<u32>,
    /// Completions copied out of the ring; reused, capacity two per slot (a zero-copy send
    /// posts two).
    completions: Vec<Completion>,
}

impl<Op> Ring<Op> {
    /// A ring with `slots` op slots (the caller's budget) and a submission queue as large.
    pub fn new(slots: usize) -> std::io::Result<Self> {
        assert!(slots > 0 && slots <= u32::MAX as usize / 2, "a ring of {slots} slots");
        let ring = new_ring((slots as u32).next_power_of_two())?;
        Ok(Self {
            ring,
            ops: (0..slots).map(|_| None).collect(),
            free: (0..slots as u32).rev().collect(),
            completions: Vec::with_capacity(2 * slots),
        })
    }

    /// Registers the pool's buffers for fixed reads, writes and zero-copy sends.
    ///
    /// # Safety
    /// The pool must outlive every op that uses its buffers: its owner drops the ring first.
    pub unsafe fn register_buffers(&self, pool: &crate::pool::BufferPool) -> std::io::Result<()> {
        // SAFETY: the caller keeps the pool alive while the ring is.
        unsafe { self.ring.submitter().register_buffers(&pool.iovecs()) }
    }

    pub fn slots(&self) -> usize {
        self.ops.len()
    }

    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// No op is in the ring.
    pub fn idle(&self) -> bool {
        self.free.len() == self.ops.len()
    }

    /// Puts `op` in the ring with `entry`.
    ///
    /// # Safety
    /// Every buffer `entry` points at must stay valid and untouched by anyone else until the
    /// op's last completion: owned by `op`, or by a part of the caller that `op` names.
    pub unsafe fn push(&mut self, op: Op, entry: squeue::Entry) {
        let slots = self.ops.len();
        let slot = self
            .free
            .pop()
            .unwrap_or_else(|| panic!("all {slots} ring slots in use: the ring budget is wrong"));
        assert!(self.ops[slot as usize].is_none(), "slot {slot} free and in use");
        self.ops[slot as usize] = Some(op);
        let entry = entry.user_data(u64::from(slot));
        // SAFETY: as the caller promises.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // The queue holds as many entries as there are slots, and a slot is taken per
            // entry: it is full only of entries not submitted yet.
            self.ring.submit().unwrap_or_else(|e| panic!("submitting a full submission queue: {e}"));
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }.unwrap_or_else(|_| {
                panic!("the submission queue is full after a submit: the ring budget is wrong")
            });
        }
    }

    /// The op of a completed slot; the slot is free again.
    pub fn take(&mut self, slot: u32) -> Op {
        let op =
            self.ops[slot as usize].take().unwrap_or_else(|| panic!("a completion for free slot {slot}"));
        self.free.push(slot);
        op
    }

    /// The op of a slot in use, for a completion after which it stays (a zero-copy send
    /// waiting for its notification).
    pub fn op_mut(&mut self, slot: u32) -> &mut Op {
        self.ops[slot as usize].as_mut().unwrap_or_else(|| panic!("a completion for free slot {slot}"))
    }

    /// The ops in the ring.
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.ops.iter().flatten()
    }

    /// Submits what is queued, spins per `poll` (when `client_waits` may make it worth it),
    /// then waits up to `wait_ns` for a completion. Returns the seconds spun.
    pub fn wait(
        &mut self,
        poll: &mut crate::poll::PollWindow,
        client_waits: bool,
        wait_ns: u32,
    ) -> std::io::Result<f64> {
        let spun_s = poll.spin(&mut self.ring, client_waits)?;
        let wait = types::Timespec::new().nsec(wait_ns);
        let args = types::SubmitArgs::new().timespec(&wait);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(spun_s),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => Ok(spun_s),
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued and waits for at least one completion.
    pub fn submit_and_wait(&mut self) -> std::io::Result<()> {
        self.ring.submit_and_wait(1).map(drop)
    }

    /// Takes the completions out of the ring. Handling them pushes new entries, so they are
    /// copied out first, into a vector reused from call to call (hand it back with
    /// `give_back`): the hot path does not allocate.
    pub fn reap(&mut self) -> Vec<Completion> {
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(self.ring.completion().map(|c| Completion {
            slot: c.user_data() as u32,
            result: c.result(),
            flags: c.flags(),
        }));
        completions
    }

    pub fn give_back(&mut self, mut completions: Vec<Completion>) {
        completions.clear();
        self.completions = completions;
    }
}
