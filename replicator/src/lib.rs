//! replicator: a Linux block-device replicator that needs no kernel module.
//!
//! The modules in data-path order: the tracker (the kernel marks written extents) -> the logs
//! (the write-intent and fracture logs) -> the primary's engine (drain, read, send, acks,
//! checkpoints) -> the wire protocol and its authentication -> the secondary (receive, write
//! durably, acknowledge). Then the mirror's vocabulary and database, and what they stand on.

pub mod tracker;
pub mod logs;
pub mod primary;
pub mod export;
pub mod wire;
pub mod auth;
pub mod link;
pub mod secondary;

pub mod model;
pub mod mirror;
pub mod failback;
pub mod consistency;
pub mod control;
pub mod metrics;

pub mod envelope;
pub mod uring;
pub mod poll;
pub mod pool;
pub mod read_ahead;
pub mod extent_set;
pub mod device;
pub mod sysfs;
pub mod units;
pub mod commands;
pub mod testbed;

pub use tracker::{Tracker, TrackerCounters, TrackerError, TrackerOptions};
