//! What a primary is started with, its defaults and the rules they keep, and the ring budget
//! they give.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::model::{ExtentBytes, RecoveryPolicy, SECONDARIES_MAX, WritePolicy};

#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    pub device: PathBuf,
    pub secondaries: Vec<(String, SocketAddr)>,
    pub state_dir: PathBuf,
    pub tracker_name: Option<String>,
    pub mirror_id: u64,
    pub extent_bytes: ExtentBytes,
    /// The largest coalesced read, and so the largest extent frame.
    pub run_bytes_max: usize,
    /// Pool buffers: reads in flight and frames not yet sent.
    pub buffers: u16,
    /// Unacknowledged bytes per secondary; past it a secondary is not fed and its extents stay
    /// in its pending bitmap.
    pub backlog_bytes_max: u64,
    pub timeout_ms: u64,
    pub keepalive_ms: u64,
    pub retry_max_ms: u64,
    /// Ship every extent once to a secondary that has no fracture log yet (safe default: its
    /// contents are unknown).
    pub initial_sync: bool,
    pub zero_copy: bool,
    /// How often the intent and fracture logs are checkpointed.
    pub checkpoint_ms: u64,
    /// The least time between two consistent cuts (`cuts.rs`).
    pub cut_interval_ms: u64,
    /// Resync rate limit per secondary, bytes per second; 0 is unlimited.
    pub sync_rate_bytes_per_s: u64,
    pub recovery_policy: RecoveryPolicy,
    /// The mirror database, when the mirror was made with `replicator create`.
    pub mirror: Option<crate::mirror::MirrorDb>,
    /// Serve the device over NBD; writes through it follow the write policy.
    pub export: Option<crate::export::ExportConfig>,
    /// For a mirror given on the command line (a database has its own): whether export writes
    /// wait for the secondaries (sync) or are shipped behind (async).
    pub write_policy: WritePolicy,
    /// For a mirror given on the command line: images (the primary counts) a sync write must
    /// reach before it succeeds.
    pub minimum_images: u32,
    /// How long the engine spins for its next completion before it sleeps.
    pub poll: crate::poll::PollSetting,
    /// The congestion control of the connections to the secondaries.
    pub tcp_congestion: crate::link::Congestion,
}

impl PrimaryConfig {
    pub const RUN_BYTES_MAX_DEFAULT: usize = 1 << 20;
    pub const BUFFERS_DEFAULT: u16 = 32;
    pub const BACKLOG_BYTES_MAX_DEFAULT: u64 = 64 << 20;
    pub const TIMEOUT_MS_DEFAULT: u64 = 5000;
    pub const KEEPALIVE_MS_DEFAULT: u64 = 1000;
    pub const RETRY_MAX_MS_DEFAULT: u64 = 1000;
    pub const CHECKPOINT_MS_DEFAULT: u64 = 1000;
    pub const SYNC_RATE_BYTES_PER_S_DEFAULT: u64 = 100 << 20;

    /// Secondary slots: a mirror from a database may grow to `SECONDARIES_MAX` at run time.
    pub fn peer_slots(&self) -> usize {
        if self.mirror.is_some() { SECONDARIES_MAX } else { self.secondaries.len() }
    }

    /// The rules a configuration keeps; a violation is the operator's to fix, said in full.
    pub fn validate(&self, image_bytes: u64) -> Result<(), String> {
        if (self.secondaries.is_empty() && self.mirror.is_none()) || self.secondaries.len() > SECONDARIES_MAX
        {
            return Err(format!(
                "{} secondaries; between 1 and {SECONDARIES_MAX} are supported",
                self.secondaries.len()
            ));
        }
        if let Some(twice) =
            crate::mirror::first_duplicate(self.secondaries.iter().map(|(name, _)| name.as_str()))
        {
            // They would share one fracture log.
            return Err(format!("two secondaries named {twice:?}"));
        }
        let extent_bytes = self.extent_bytes.get();
        if self.run_bytes_max == 0 || !(self.run_bytes_max as u64).is_multiple_of(extent_bytes) {
            return Err(format!(
                "run size {} is not a multiple of the extent size {extent_bytes}",
                self.run_bytes_max
            ));
        }
        if self.backlog_bytes_max < self.run_bytes_max as u64 {
            return Err(format!(
                "backlog {} bytes is smaller than one run of {} bytes",
                self.backlog_bytes_max, self.run_bytes_max
            ));
        }
        let bitmap_bytes = self.extent_bytes.extents_of(image_bytes).div_ceil(8);
        if bitmap_bytes > crate::logs::BITMAP_BYTES_MAX {
            return Err(format!(
                "{} bytes of {extent_bytes}-byte extents need a {bitmap_bytes}-byte bitmap, over the logs' \
                 {}; use larger extents",
                image_bytes,
                crate::logs::BITMAP_BYTES_MAX
            ));
        }
        Ok(())
    }
}

/// Ops one connection to a secondary has in the ring at most, zero-copy notifications apart:
/// its receive and its send.
pub const OPS_PER_CONNECTION: usize = 2;
/// Zero-copy sends to one secondary whose notification is outstanding; past it the next send
/// waits. (A partial send leaves its frame at the queue's front and sends the rest from the
/// same buffer, so the pool's size alone does not bound them.)
pub const NOTIFICATIONS_PER_SECONDARY_MAX: usize = 32;

/// The ring's slots, as named reserves each bounded by the resource that limits it, so that a
/// push never finds the ring full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingBudget {
    /// Reads and verify reads: each holds a pool buffer.
    pub reads: usize,
    /// Per secondary slot: the live connection's receive and send, those of one connection
    /// being torn down (`peers::Retired`, at most one per slot), and its outstanding zero-copy
    /// notifications.
    pub per_secondary: usize,
    pub secondaries: usize,
    /// The export: one op per request slot (a request's steps run one after another), the
    /// wake-up read, and one receive per client connection.
    pub export: usize,
}

impl RingBudget {
    pub fn of(config: &PrimaryConfig) -> Self {
        let export = config
            .export
            .as_ref()
            .map_or(0, |e| crate::primary::export::slots_max(e) + 1 + crate::export::CONNECTIONS_MAX);
        Self {
            reads: usize::from(config.buffers),
            per_secondary: 2 * OPS_PER_CONNECTION + NOTIFICATIONS_PER_SECONDARY_MAX,
            secondaries: config.peer_slots(),
            export,
        }
    }

    pub fn slots(&self) -> usize {
        self.reads + self.per_secondary * self.secondaries + self.export
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PrimaryConfig {
        PrimaryConfig {
            device: "/dev/null".into(),
            secondaries: vec![("b".into(), "127.0.0.1:7788".parse().expect("an address"))],
            state_dir: "/nonexistent".into(),
            tracker_name: None,
            mirror_id: 1,
            extent_bytes: ExtentBytes::DEFAULT,
            run_bytes_max: PrimaryConfig::RUN_BYTES_MAX_DEFAULT,
            buffers: PrimaryConfig::BUFFERS_DEFAULT,
            backlog_bytes_max: PrimaryConfig::BACKLOG_BYTES_MAX_DEFAULT,
            timeout_ms: 5000,
            keepalive_ms: 1000,
            retry_max_ms: 1000,
            initial_sync: true,
            zero_copy: true,
            checkpoint_ms: 1000,
            cut_interval_ms: 100,
            sync_rate_bytes_per_s: 0,
            recovery_policy: RecoveryPolicy::Automatic,
            mirror: None,
            export: None,
            write_policy: WritePolicy::Async,
            minimum_images: 1,
            poll: crate::poll::PollSetting::Auto,
            tcp_congestion: crate::link::Congestion::resolve(Some("system")).expect("the host's"),
        }
    }

    #[test]
    fn the_ring_budget_is_the_sum_of_its_reserves() {
        let budget = RingBudget::of(&config());
        assert_eq!(budget.reads, 32);
        assert_eq!(budget.per_secondary, 4 + NOTIFICATIONS_PER_SECONDARY_MAX);
        assert_eq!(budget.secondaries, 1, "a mirror from the command line has its secondaries only");
        assert_eq!(budget.slots(), 32 + 36);
        let with_db = PrimaryConfig { mirror: Some(crate::mirror::sample_db()), ..config() };
        assert_eq!(RingBudget::of(&with_db).secondaries, SECONDARIES_MAX, "a database's mirror may grow");
    }

    #[test]
    fn a_configuration_that_breaks_a_rule_is_refused_saying_which() {
        assert_eq!(config().validate(1 << 30), Ok(()));
        let twice = PrimaryConfig { secondaries: vec![config().secondaries[0].clone(); 2], ..config() };
        assert!(twice.validate(1 << 30).unwrap_err().contains("two secondaries named"));
        let ragged = PrimaryConfig { run_bytes_max: 65536 + 4096, ..config() };
        assert!(ragged.validate(1 << 30).unwrap_err().contains("not a multiple of the extent size"));
        let small = PrimaryConfig { backlog_bytes_max: 4096, ..config() };
        assert!(small.validate(1 << 30).unwrap_err().contains("smaller than one run"));
        let none = PrimaryConfig { secondaries: Vec::new(), ..config() };
        assert!(none.validate(1 << 30).unwrap_err().contains("between 1 and"));
        let tiny_extents = PrimaryConfig { extent_bytes: ExtentBytes::new(4096).expect("4 KiB"), ..config() };
        assert!(tiny_extents.validate(1 << 50).unwrap_err().contains("use larger extents"), "a 1 PiB image");
    }
}
