//! The subcommands behind `main.rs`: each takes parsed arguments and a stop flag (set by
//! SIGINT/SIGTERM) and runs in the foreground.

pub mod demo;
pub mod lifecycle;
pub mod operate;
pub mod replicate;
pub mod track;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// A flag set by SIGINT or SIGTERM, for loops that stop cleanly.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    Ok(stop)
}
