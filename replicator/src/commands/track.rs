//! `replicator track`: prints the extents written to a device as they complete, like `blktrace`
//! at extent grain. Also the way to see the tracker survive a restart: marks made while no
//! `track` runs are printed by the next one.
//!
//! At least once: an extent leaves the tracker's write-intent map only once its line is written
//! and flushed. A `track` killed between taking marks from the kernel and printing them (kill -9
//! in the middle of a drain) leaves them there, and the next `track` prints the intent map first:
//! a consumer may see an extent twice after an unclean stop, never miss one.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;

use crate::extent_set::ExtentSet;
use crate::tracker::{Tracker, TrackerOptions};
use crate::units::format_bytes;

pub struct TrackArgs {
    pub device: PathBuf,
    pub extent_bytes: u64,
    pub name: Option<String>,
    pub interval_ms: u64,
    pub json: bool,
    pub keep_pinned: bool,
}

pub fn run(args: &TrackArgs, stop: &AtomicBool) -> anyhow::Result<()> {
    let options =
        TrackerOptions { name: args.name.clone(), extent_bytes: args.extent_bytes, ..Default::default() };
    let mut tracker = Tracker::attach_with(&args.device, &options)
        .with_context(|| format!("attaching the tracker to {}", args.device.display()))?;
    let mut stdout = std::io::stdout().lock();
    // Reused every drain: the runs to print.
    let mut runs: Vec<Range<u64>> = Vec::new();
    if tracker.resumed() {
        eprintln!(
            "track: resumed pinned state at {}: extents written while no tracker ran, and those the \
             last one may not have printed, follow",
            tracker.pin_dir().display()
        );
        runs.extend(ExtentSet::from_bits(&tracker.intent_snapshot()).runs());
        print_runs(&mut tracker, &runs, args.json, &mut stdout)?;
    }
    loop {
        // Read the flag before draining, so the drain after a signal is the last one: it also
        // reports queued writes whose completion was never traced.
        let stopping = stop.load(Ordering::Relaxed);
        runs.clear();
        runs.extend(if stopping { tracker.drain_unmatched() } else { tracker.drain_completed() });
        print_runs(&mut tracker, &runs, args.json, &mut stdout)?;
        if stopping {
            break;
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    let counters = tracker.counters();
    eprintln!("track: {counters:?}");
    if args.keep_pinned {
        eprintln!("track: leaving {} pinned; marks keep accumulating", tracker.pin_dir().display());
    } else {
        tracker.stop().context("unpinning the tracker")?;
    }
    Ok(())
}

/// Prints `runs` and flushes them; then, handed to the consumer, they leave the intent map.
fn print_runs(
    tracker: &mut Tracker,
    runs: &[Range<u64>],
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let geometry = *tracker.geometry();
    for run in runs {
        let (offset_bytes, _) = geometry.extent_byte_range(run.start);
        let (last_offset, last_len) = geometry.extent_byte_range(run.end - 1);
        let len_bytes = last_offset + last_len - offset_bytes;
        if json {
            writeln!(
                out,
                "{{\"first_extent\":{},\"end_extent\":{},\"offset_bytes\":{offset_bytes},\"len_bytes\":{len_bytes}}}",
                run.start, run.end
            )?;
        } else {
            writeln!(
                out,
                "extents {:>8}..{:<8} offset {:>10} length {}",
                run.start,
                run.end,
                format_bytes(offset_bytes),
                format_bytes(len_bytes)
            )?;
        }
    }
    out.flush()?;
    for run in runs {
        tracker.clear_intent_run(run.clone());
    }
    Ok(())
}
