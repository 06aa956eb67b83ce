//! `replicator track`: prints the extents written to a device as they complete, like `blktrace`
//! at extent grain. Also the way to see the tracker survive a restart: marks made while no
//! `track` runs are printed by the next one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;

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
    if tracker.resumed() {
        eprintln!(
            "track: resumed pinned state at {}: extents written while no tracker ran follow",
            tracker.pin_dir().display()
        );
    }
    let mut stdout = std::io::stdout().lock();
    loop {
        // Read the flag before draining, so the drain after a signal is the last one: it also
        // reports queued writes whose completion was never traced.
        let stopping = stop.load(Ordering::Relaxed);
        print_drain(&mut tracker, args.json, stopping, &mut stdout)?;
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

fn print_drain(
    tracker: &mut Tracker,
    json: bool,
    last: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let geometry = *tracker.geometry();
    let mut wrote = false;
    let runs = if last { tracker.drain_unmatched() } else { tracker.drain_completed() };
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
        wrote = true;
    }
    if wrote {
        out.flush()?;
    }
    Ok(())
}
