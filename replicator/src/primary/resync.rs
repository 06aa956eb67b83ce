//! What the primary keeps per secondary beyond the connection: its fracture-log state (why it
//! is fractured, whether it needs a full sync or a verify, resync progress), the resync rate
//! throttle, and the verify pass in progress.
//!
//! Invariant: a secondary whose `flags` are zero is SYNCHRONIZED or merely lagging while
//! connected, and every extent it lacks is in the write-intent log; a secondary with any flag
//! set has every extent it lacks in its own fracture log (persisted at each checkpoint and at
//! once when it is fractured), so the intent log may forget those extents.

use std::time::Instant;

use bitvec::prelude::*;

use crate::extent_set::ExtentSet;
use crate::logs::{FLAG_ADMIN_FRACTURED, FLAG_FRACTURED, FLAG_FULL_SYNC, FLAG_VERIFY};
use crate::model::RecoveryPolicy;
use crate::wire::{VERIFY_EXTENTS_MAX, VERIFY_HASH_BYTES};

/// A token bucket over resync bytes; `rate_bytes_per_s == 0` is unlimited.
#[derive(Debug)]
pub struct Throttle {
    pub rate_bytes_per_s: u64,
    tokens_bytes: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(rate_bytes_per_s: u64) -> Self {
        Self { rate_bytes_per_s, tokens_bytes: 0.0, last: Instant::now() }
    }

    /// Adds the tokens earned since the last refill, up to one burst (a tenth of a second of
    /// rate, and at least `burst_bytes_min`).
    pub fn refill(&mut self, burst_bytes_min: u64) {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate_bytes_per_s as f64;
        self.last = now;
        let burst = (self.rate_bytes_per_s / 10).max(burst_bytes_min) as f64;
        self.tokens_bytes = (self.tokens_bytes + earned).min(burst);
    }

    pub fn allows(&self) -> bool {
        self.rate_bytes_per_s == 0 || self.tokens_bytes > 0.0
    }

    pub fn take(&mut self, bytes: u64) {
        if self.rate_bytes_per_s != 0 {
            self.tokens_bytes -= bytes as f64;
        }
    }
}

/// A verify batch in flight: the primary's hashes (after its read) and the secondary's (after
/// its reply) are compared once both are in.
#[derive(Debug)]
pub struct VerifyBatch {
    pub first_extent: u64,
    pub count: u32,
    pub local_ready: bool,
    pub remote_ready: bool,
    /// The primary's read failed: every extent of the batch is shipped.
    pub local_failed: bool,
}

/// A verify pass over the whole image, one batch at a time.
#[derive(Debug)]
pub struct Verify {
    pub next_extent: u64,
    pub batch: Option<VerifyBatch>,
    pub differing_extents: u64,
    pub started: Instant,
    /// Hashes of the batch, preallocated: the primary's and the secondary's.
    pub local: Box<[u128]>,
    pub remote: Box<[u128]>,
}

impl Verify {
    pub fn new(next_extent: u64) -> Self {
        let hashes = || vec![0u128; VERIFY_EXTENTS_MAX as usize].into_boxed_slice();
        Self {
            next_extent,
            batch: None,
            differing_extents: 0,
            started: Instant::now(),
            local: hashes(),
            remote: hashes(),
        }
    }

    /// Stores a secondary's reply; an unexpected one (no batch asked from `first_extent`, or
    /// not of its length) is a protocol error, returned as the reply's extent count.
    pub fn take_reply(&mut self, first_extent: u64, hashes: &[u8]) -> Result<(), usize> {
        let count = hashes.len() / VERIFY_HASH_BYTES;
        let batch = self
            .batch
            .as_mut()
            .filter(|b| b.first_extent == first_extent && b.count as usize == count && !b.remote_ready)
            .ok_or(count)?;
        for (slot, hash) in self.remote.iter_mut().zip(hashes.chunks_exact(VERIFY_HASH_BYTES)) {
            *slot = u128::from_le_bytes(hash.try_into().expect("16 bytes"));
        }
        batch.remote_ready = true;
        Ok(())
    }

    /// Once both sides' hashes are in: marks the differing extents in `pending`, advances, and
    /// returns how many differed.
    pub fn compare(&mut self, pending: &mut ExtentSet) -> Option<u64> {
        let batch = self.batch.as_ref().filter(|b| b.local_ready && b.remote_ready)?;
        let count = batch.count as usize;
        let mut differing = 0;
        for i in 0..count {
            if batch.local_failed || self.local[i] != self.remote[i] {
                pending.set(batch.first_extent as usize + i, true);
                differing += 1;
            }
        }
        self.next_extent = batch.first_extent + batch.count as u64;
        self.differing_extents += differing;
        self.batch = None;
        Some(differing)
    }
}

/// The fracture-log state of one secondary.
#[derive(Debug)]
pub struct PeerLog {
    pub file_name: String,
    pub secondary_id: u64,
    /// `logs::FLAG_*`.
    pub flags: u32,
    pub resync_bytes_done: u64,
    pub verify: Option<Verify>,
    /// The flags and extents last persisted, so an unchanged log is not rewritten.
    pub persisted: Option<(u32, u64, BitVec<u64, Lsb0>)>,
    /// Persist at the end of this loop turn (it was just fractured).
    pub persist_now: bool,
    pub throttle: Throttle,
    pub recovery: RecoveryPolicy,
    /// Not reconnected until `restore`: fractured by the administrator, or fractured by a
    /// failure under the manual recovery policy.
    pub held: bool,
    /// Its shipping counts against the sync rate: it is resyncing after a failure, a full
    /// sync or a verify. A secondary merely behind its backlog limit is not throttled.
    pub throttled: bool,
    pub synchronized_at_unix_ms: u64,
    pub fractured_at_unix_ms: u64,
    /// The resync's rate, bytes per second, smoothed over the last few samples (`sample_rate`):
    /// what the time left is estimated from. Persisted with the progress (bytes done, extents
    /// left) in the fracture log, so a restarted primary estimates at once.
    pub resync_rate_bytes_per_s: f64,
    /// When the rate was last sampled, and the bytes done then.
    rate_sampled: Option<(Instant, u64)>,
}

/// How often the resync rate is sampled, and the weight of the rate so far in each sample.
const RATE_SAMPLE_MS: u64 = 1000;
const RATE_WEIGHT_OLD: f64 = 0.5;

impl PeerLog {
    /// The log state of secondary `name` before anything is known about it: not fractured,
    /// nothing persisted yet (so it is written at the end of the first loop turn).
    pub fn new(name: &str, sync_rate_bytes_per_s: u64, recovery: RecoveryPolicy) -> Self {
        Self {
            file_name: crate::logs::fracture_log_file(name),
            secondary_id: crate::logs::secondary_id(name),
            flags: 0,
            resync_bytes_done: 0,
            verify: None,
            persisted: None,
            persist_now: true,
            throttle: Throttle::new(sync_rate_bytes_per_s),
            recovery,
            held: false,
            throttled: false,
            synchronized_at_unix_ms: 0,
            fractured_at_unix_ms: 0,
            resync_rate_bytes_per_s: 0.0,
            rate_sampled: None,
        }
    }

    pub fn fractured(&self) -> bool {
        self.flags != 0
    }

    /// Fractured by a failure, by its backlog or by the administrator since it was last
    /// SYNCHRONIZED (a full sync or a verify alone set other flags).
    pub fn fractured_by_failure(&self) -> bool {
        self.flags & FLAG_FRACTURED != 0
    }

    pub fn admin_fractured(&self) -> bool {
        self.flags & FLAG_ADMIN_FRACTURED != 0
    }

    /// Marks it fractured (by a failure); under the manual policy it then waits for `restore`.
    pub fn fracture(&mut self) {
        self.fall_behind();
        self.throttled = true;
        if self.recovery == RecoveryPolicy::Manual {
            self.held = true;
        }
    }

    /// Marks it fractured because its backlog is over the limit: its missed extents go to its
    /// fracture log, it is fed again as its acks come in, at full speed.
    pub fn fall_behind(&mut self) {
        if self.flags & FLAG_FRACTURED == 0 {
            self.fractured_at_unix_ms = crate::logs::unix_ms_now();
        }
        self.flags |= FLAG_FRACTURED;
        self.persist_now = true;
    }

    /// Samples the resync's rate once every `RATE_SAMPLE_MS` while it copies (`connected`, and
    /// not verifying: a verify compares far more than it copies): an exponentially weighted
    /// average, so a burst at the start (the throttle's first bucket) fades within seconds.
    /// While it does not copy the rate is kept (it is persisted with the progress, and a
    /// restarted primary starts from it), and sampling starts afresh when it copies again.
    pub fn sample_rate(&mut self, now: Instant, connected: bool) {
        if !self.fractured() {
            self.resync_rate_bytes_per_s = 0.0;
            self.rate_sampled = None;
            return;
        }
        if !connected || self.verify.is_some() {
            self.rate_sampled = None;
            return;
        }
        let Some((at, bytes_then)) = self.rate_sampled else {
            self.rate_sampled = Some((now, self.resync_bytes_done));
            return;
        };
        let elapsed_s = now.saturating_duration_since(at).as_secs_f64();
        if elapsed_s * 1000.0 < RATE_SAMPLE_MS as f64 {
            return;
        }
        let sample = self.resync_bytes_done.saturating_sub(bytes_then) as f64 / elapsed_s;
        self.resync_rate_bytes_per_s = if self.resync_rate_bytes_per_s == 0.0 {
            sample
        } else {
            RATE_WEIGHT_OLD * self.resync_rate_bytes_per_s + (1.0 - RATE_WEIGHT_OLD) * sample
        };
        self.rate_sampled = Some((now, self.resync_bytes_done));
    }

    /// Seconds left to resync `left_bytes` at the sampled (or persisted) rate; none before the
    /// first sample and during a verify.
    pub fn eta_seconds(&self, left_bytes: u64) -> Option<f64> {
        let rate = self.resync_rate_bytes_per_s;
        (self.fractured() && self.verify.is_none() && rate > 0.0).then(|| left_bytes as f64 / rate)
    }

    /// Back in sync: nothing to resync, no throttle.
    pub fn synchronized(&mut self) {
        self.synchronized_at_unix_ms = crate::logs::unix_ms_now();
        self.flags = 0;
        self.resync_bytes_done = 0;
        self.persist_now = true;
        self.throttled = false;
    }

    pub fn admin_fracture(&mut self) {
        self.fall_behind();
        self.flags |= FLAG_ADMIN_FRACTURED;
        self.persist_now = true;
        self.held = true;
        self.throttled = true;
    }

    pub fn restore(&mut self) {
        self.flags &= !FLAG_ADMIN_FRACTURED;
        self.persist_now = true;
        self.held = false;
    }

    pub fn start_verify(&mut self, from_extent: u64) {
        self.fall_behind();
        self.flags |= FLAG_VERIFY;
        self.throttled = true;
        self.persist_now = true;
        self.verify = Some(Verify::new(from_extent));
    }

    /// The verify pass reached the image's end: what it found differing is pending.
    pub fn finish_verify(&mut self) {
        self.verify = None;
        self.flags &= !FLAG_VERIFY;
        self.persist_now = true;
    }

    pub fn full_sync(&self) -> bool {
        self.flags & FLAG_FULL_SYNC != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A burst at the start fades: after a few seconds at 1 MiB/s the time left is what
    /// 1 MiB/s gives, not what the burst suggested.
    #[test]
    fn time_left_follows_the_recent_rate() {
        let mut log = PeerLog::new("b", 1 << 20, RecoveryPolicy::Automatic);
        let start = Instant::now();
        log.fall_behind();
        log.sample_rate(start, true);
        assert_eq!(log.eta_seconds(1 << 30), None, "no rate before the first sample");
        log.resync_bytes_done = 10 << 20; // the first second: a 10 MiB burst
        log.sample_rate(start + Duration::from_secs(1), true);
        for second in 2..=10u64 {
            log.resync_bytes_done += 1 << 20;
            log.sample_rate(start + Duration::from_secs(second), true);
        }
        let eta = log.eta_seconds(100 << 20).expect("a rate");
        assert!((95.0..=110.0).contains(&eta), "100 MiB at about 1 MiB/s: {eta} s");
        log.synchronized();
        log.sample_rate(start + Duration::from_secs(11), true);
        assert_eq!(log.eta_seconds(1), None, "nothing to resync");
    }

    #[test]
    fn verify_marks_exactly_the_differing_extents() {
        let mut verify = Verify::new(4);
        verify.batch = Some(VerifyBatch {
            first_extent: 4,
            count: 3,
            local_ready: true,
            remote_ready: false,
            local_failed: false,
        });
        verify.local[..3].copy_from_slice(&[1, 2, 3]);
        let reply: Vec<u8> = [1u128, 9, 3].iter().flat_map(|h| h.to_le_bytes()).collect();
        assert!(verify.take_reply(5, &reply).is_err(), "wrong batch");
        verify.take_reply(4, &reply).expect("the batch asked for");
        let mut pending = ExtentSet::new(8);
        assert_eq!(verify.compare(&mut pending), Some(1));
        assert_eq!(pending.bits().iter_ones().collect::<Vec<_>>(), [5]);
        assert_eq!(verify.next_extent, 7);
        assert!(verify.take_reply(4, &reply).is_err(), "no batch outstanding");
    }

    #[test]
    fn throttle_limits_to_its_rate() {
        let mut throttle = Throttle::new(1_000_000);
        assert!(!throttle.allows(), "starts empty");
        std::thread::sleep(std::time::Duration::from_millis(20));
        throttle.refill(0);
        assert!(throttle.allows());
        throttle.take(1_000_000);
        assert!(!throttle.allows());
        assert!(Throttle::new(0).allows(), "0 is unlimited");
    }
}
