//! replicator: a Linux block-device replicator that needs no kernel module.
//!
//! The data path, top to bottom (modules in that order as they land):
//! tracker (the kernel marks written extents) -> intent log -> shipper -> wire -> secondary
//! writer -> ack -> logs cleared.

pub mod auth;
pub mod device;
pub mod pool;
pub mod secondary;
pub mod shipper;
pub mod sysfs;
pub mod tracker;
pub mod wire;

pub mod commands;
pub mod testbed;
pub mod units;

pub use tracker::{Tracker, TrackerCounters, TrackerError, TrackerOptions};
