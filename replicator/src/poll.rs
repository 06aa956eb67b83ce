//! Busy-polling before a thread blocks on its io_uring (`--poll-us`): the window a thread
//! spins in for its next completion, yielding the CPU meanwhile, and when it does.
//!
//! Owns no state beyond when its thread last went to wait. Invariant: a thread spins only
//! while its loop turns faster than `POLL_ACTIVE_WITHIN_US`, so a mirror with no writes
//! flowing never spins, and never longer than its window.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::new_ring;

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
