//! `replicator demo` (what `cargo xtask run` runs with no arguments): a loop device over a file in
//! /dev/shm, the tracker attached, a short write workload with O_DIRECT and a discard, and the
//! extents the kernel reported, checked against what was written.

use std::collections::BTreeSet;

use anyhow::Context as _;

use crate::testbed::{LoopDevice, run_command, write_direct};
use crate::tracker::{Tracker, TrackerOptions};
use crate::units::format_bytes;

const DEVICE_BYTES: u64 = 256 << 20;
const EXTENT_BYTES: u64 = 64 << 10;
const MIB: u64 = 1 << 20;

/// (offset, length, what) of each write the demo makes.
const WORKLOAD: [(u64, u64, &str); 5] = [
    (0, 4096, "4 KiB at the start"),
    (10 * MIB, MIB, "1 MiB, extent aligned"),
    (100 * MIB + 512, 512, "512 B inside an extent"),
    (50 * MIB - 100 * 1024, 300 * 1024, "300 KiB across extent boundaries"),
    (200 * MIB, 3 * MIB + 4096, "3 MiB + 4 KiB, multi-extent"),
];
const DISCARD: (u64, u64) = (128 * MIB, 8 * MIB);

pub fn run() -> anyhow::Result<()> {
    println!("replicator demo: tracking writes to a loop device with eBPF, no kernel module");
    let device = LoopDevice::create("demo", DEVICE_BYTES).context("creating the demo loop device")?;
    println!(
        "  device   {} over {} ({})",
        device.path.display(),
        device.backing_file().display(),
        format_bytes(DEVICE_BYTES)
    );
    let name = format!("demo-{}", std::process::id());
    let options = TrackerOptions { name: Some(name), extent_bytes: EXTENT_BYTES, ..Default::default() };
    let mut tracker = Tracker::attach_with(&device.path, &options).context("attaching the tracker")?;
    println!(
        "  tracker  pinned at {}, {} extents of {}",
        tracker.pin_dir().display(),
        tracker.geometry().extent_count(),
        format_bytes(EXTENT_BYTES)
    );
    let _ = tracker.drain_completed().count();

    let mut expected = BTreeSet::new();
    for (offset, len, what) in WORKLOAD {
        write_direct(&device.path, offset, len as usize, 0xa5)?;
        println!("  write    {:>10} at {:>10}  {what}", format_bytes(len), format_bytes(offset));
        expected.extend(offset / EXTENT_BYTES..(offset + len).div_ceil(EXTENT_BYTES));
    }
    let path = device.path.to_string_lossy().into_owned();
    run_command("blkdiscard", &["-o", &DISCARD.0.to_string(), "-l", &DISCARD.1.to_string(), &path])?;
    println!("  discard  {:>10} at {:>10}", format_bytes(DISCARD.1), format_bytes(DISCARD.0));
    expected.extend(DISCARD.0 / EXTENT_BYTES..(DISCARD.0 + DISCARD.1) / EXTENT_BYTES);

    println!("dirty extents reported by the kernel:");
    let mut reported = BTreeSet::new();
    for run in tracker.drain_completed() {
        println!(
            "  extents {:>5}..{:<5} bytes {:>10} + {}",
            run.start,
            run.end,
            format_bytes(run.start * EXTENT_BYTES),
            format_bytes((run.end - run.start) * EXTENT_BYTES)
        );
        reported.extend(run);
    }
    let missed: Vec<_> = expected.difference(&reported).collect();
    let spurious = reported.difference(&expected).count();
    println!(
        "written extents {}, reported {}, missed {}, spurious {}",
        expected.len(),
        reported.len(),
        missed.len(),
        spurious
    );
    println!("kernel counters: {:?}", tracker.counters());
    tracker.stop()?;
    anyhow::ensure!(missed.is_empty(), "the tracker missed extents {missed:?}");
    println!("ok: every written extent was reported");
    Ok(())
}
