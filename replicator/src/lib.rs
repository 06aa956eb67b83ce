//! replicator: a Linux block-device replicator that needs no kernel module.
//!
//! The modules in data-path order: the tracker (the kernel marks written extents) -> the
//! shipper (the primary's io_uring engine: read, send, track acks) -> the wire protocol and its
//! authentication -> the secondary writer (write durably, acknowledge). Then what they stand on.

pub mod model;
pub mod envelope;
pub mod device;
pub mod tracker;
pub mod logs;
pub mod shipper;
pub mod export;
pub mod pool;
pub mod read_ahead;
pub mod wire;
pub mod auth;
pub mod link;
pub mod secondary;
pub mod metrics;
pub mod control;
pub mod consistency;
pub mod mirror;
pub mod failback;

pub mod extent_set;
pub mod sysfs;
pub mod units;
pub mod commands;
pub mod testbed;

pub use tracker::{Tracker, TrackerCounters, TrackerError, TrackerOptions};
