//! `replicator demo` (what `cargo xtask run` runs with no arguments), in two parts:
//! 1. the tracker alone: a loop device over a file in /dev/shm, a short write workload with
//!    O_DIRECT and a discard, and the extents the kernel reported, checked against what was
//!    written;
//! 2. a live mirror: a primary and two secondaries on loop devices, each in its own network
//!    namespace over veth, a fio workload on the primary with live progress, and a final hash
//!    comparison of the three images.

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
    track_demo()?;
    println!();
    mirror_demo()
}

fn track_demo() -> anyhow::Result<()> {
    println!("replicator demo, part 1: tracking writes to a loop device with eBPF, no kernel module");
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

const MIRROR_DEVICE_BYTES: u64 = 256 << 20;
const WORKLOAD_SECONDS: u32 = 6;

fn mirror_demo() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};

    use crate::testbed::Lab;

    println!("replicator demo, part 2: a primary and two secondaries, each in its own network namespace");
    let binary = std::env::current_exe().context("locating the replicator binary")?;
    let mut lab =
        Lab::new(&binary, "demo", 2, MIRROR_DEVICE_BYTES).context("setting up namespaces and devices")?;
    for (i, addr) in lab.secondary_addrs.iter().enumerate() {
        println!(
            "  secondary s{i}  {} in netns {}, listening on {addr}",
            lab.secondary_devices[i].path.display(),
            lab.secondary_ns[i].name
        );
    }
    println!("  primary       {} in netns {}", lab.primary_device.path.display(), lab.primary_ns.name);
    lab.start_secondary(0, &[])?;
    lab.start_secondary(1, &[])?;
    lab.start_primary(&[])?;
    println!("initial sync of {} to both secondaries...", format_bytes(MIRROR_DEVICE_BYTES));
    let started = Instant::now();
    lab.wait_in_sync(Duration::from_secs(60)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    println!("  in sync after {:.1} s", started.elapsed().as_secs_f64());

    println!(
        "fio: {WORKLOAD_SECONDS} s of random writes, 4 KiB to 1 MiB, on the primary while it replicates"
    );
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=demo",
            "--rw=randwrite",
            "--bsrange=4k-1m",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=8",
        ])
        .arg(format!("--runtime={WORKLOAD_SECONDS}"))
        .args(["--time_based", "--output-format=terse"])
        .arg(format!("--filename={}", lab.primary_device.path.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting fio (cargo xtask setup installs it)")?;
    while fio.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(1000));
        print_progress(&lab);
    }
    anyhow::ensure!(fio.wait()?.success(), "fio failed");
    let status =
        lab.wait_in_sync(Duration::from_secs(60)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    print_progress(&lab);
    let hashes = lab.hashes()?;
    println!("sha256 primary {}", hashes[0]);
    for (i, hash) in hashes[1..].iter().enumerate() {
        println!("sha256 s{i}      {hash}");
    }
    anyhow::ensure!(hashes.iter().all(|h| *h == hashes[0]), "the images differ\n{}", lab.logs());
    let shipped: u64 = status["secondaries"][0]["shipped_bytes"].as_u64().unwrap_or(0);
    println!(
        "ok: the three images are identical ({} shipped to each secondary, initial sync included)",
        format_bytes(shipped)
    );
    fracture_demo(&lab)?;
    sync_export_demo(&mut lab)
}

/// Part 4: the primary restarted with an NBD export under the sync write policy; qemu-io
/// writes through it, every write on both secondaries when it is acknowledged; s1's link is
/// cut (writes go on, s1 is fractured) and restored (s1 resyncs from its fracture log).
fn sync_export_demo(lab: &mut crate::testbed::Lab) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};

    println!(
        "\nreplicator demo, part 4: writes through the NBD export, acknowledged once both secondaries have them"
    );
    let primary = lab.processes.iter().position(|p| p.name == "primary").context("the demo's primary")?;
    anyhow::ensure!(lab.processes[primary].stop(), "the primary did not stop cleanly\n{}", lab.logs());
    let socket = lab.dir.join("nbd.sock");
    let export = format!("nbd+unix:{}", socket.display());
    println!("$ replicator primary ... --export {export} --write-policy sync --timeout-ms 1000");
    lab.start_primary(&["--export", &export, "--write-policy", "sync", "--timeout-ms", "1000"])?;
    lab.wait_synchronized(Duration::from_secs(60)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the export did not start\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let qemu_io = |commands: &[String]| -> anyhow::Result<String> {
        let mut command = std::process::Command::new("qemu-io");
        command.args(["-f", "raw"]);
        for c in commands {
            command.arg("-c").arg(c);
        }
        let output = command
            .arg(format!("nbd+unix:///?socket={}", socket.display()))
            .output()
            .context("running qemu-io (cargo xtask setup installs qemu-utils)")?;
        anyhow::ensure!(output.status.success(), "qemu-io: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let writes = |first: u64, count: u64, pattern: u8| -> Vec<String> {
        (0..count).map(|i| format!("write -P {pattern:#x} {} 64k", (first + i * 5) * (64 << 10))).collect()
    };
    println!("$ qemu-io -c 'write -P 0x5e 0 64k' ...   (40 writes of 64 KiB)");
    qemu_io(&writes(0, 40, 0x5e))?;
    for (i, device) in lab.secondary_devices.iter().enumerate() {
        let bytes = crate::testbed::read_range_direct(&device.path, 39 * 5 * (64 << 10), 64 << 10)?;
        anyhow::ensure!(bytes.iter().all(|&b| b == 0x5e), "s{i} lacks the last acknowledged write");
        println!("  s{i} holds the last write the moment qemu-io returned");
    }
    println!("$ ip link set {} down   (s1 cut off)", lab.primary_ifs[1]);
    lab.primary_ns.run(&["link", "set", &lab.primary_ifs[1], "down"])?;
    let started = Instant::now();
    qemu_io(&writes(1000, 40, 0x6f))?;
    println!(
        "  40 more writes acknowledged in {:.1} s (the first waited for s1's timeout); s1 is fractured",
        started.elapsed().as_secs_f64()
    );
    let before = lab.status().map_or(0, |s| s["secondaries"][1]["resync_bytes"].as_u64().unwrap_or(0));
    println!("$ ip link set {} up     (s1 back)", lab.primary_ifs[1]);
    lab.primary_ns.run(&["link", "set", &lab.primary_ifs[1], "up"])?;
    let status =
        lab.wait_synchronized(Duration::from_secs(60)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    let resynced = status["secondaries"][1]["resync_bytes"].as_u64().unwrap_or(0) - before;
    let hashes = lab.hashes()?;
    for (name, hash) in ["primary", "s0     ", "s1     "].iter().zip(&hashes) {
        println!("sha256 {name} {hash}");
    }
    anyhow::ensure!(hashes.iter().all(|h| *h == hashes[0]), "the images differ\n{}", lab.logs());
    println!(
        "ok: s1 resynced {} for {} written while it was cut off (its fracture log, and the extents written \
         just before, still in the write-intent log); the three images are identical",
        format_bytes(resynced),
        format_bytes(40 << 16)
    );
    Ok(())
}

/// Part 3: fracture s1, write while it is fractured, restore it, and show that only the
/// extents written meanwhile are copied.
fn fracture_demo(lab: &crate::testbed::Lab) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};

    let operate = |args: &[&str]| lab.operate_text(args).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()));
    println!("\nreplicator demo, part 3: fracture s1, write, restore: only what changed is copied");
    println!("$ replicator fracture s1");
    operate(&["fracture", "s1"])?;
    let extent_bytes = 64 << 10;
    let extents = MIRROR_DEVICE_BYTES / extent_bytes;
    let written = 200;
    for i in 0..written {
        let extent = (i * 7919) % extents;
        crate::testbed::write_direct(
            &lab.primary_device.path,
            extent * extent_bytes,
            extent_bytes as usize,
            0xd5,
        )?;
    }
    println!(
        "wrote {written} extents of 64 KiB ({}) while s1 was fractured",
        format_bytes(written * extent_bytes)
    );
    std::thread::sleep(Duration::from_millis(500));
    println!("$ replicator status");
    print!("{}", indent(&operate(&["status"])?));
    let before = lab.status().map_or(0, |s| s["secondaries"][1]["resync_bytes"].as_u64().unwrap_or(0));
    println!("$ replicator set sync-rate=4MiB --secondary s1   # slow, to watch it");
    operate(&["set", "sync-rate=4MiB", "--secondary", "s1"])?;
    println!("$ replicator restore s1");
    let started = Instant::now();
    operate(&["restore", "s1"])?;
    std::thread::sleep(Duration::from_millis(1500)); // the rate is sampled once a second
    println!("$ replicator status   # s1 SYNCHRONIZING: progress, rate, time left");
    print!("{}", indent(&operate(&["status"])?));
    let status =
        lab.wait_synchronized(Duration::from_secs(60)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    let resynced = status["secondaries"][1]["resync_bytes"].as_u64().unwrap_or(0) - before;
    println!("$ replicator status");
    print!("{}", indent(&operate(&["status"])?));
    let hashes = lab.hashes()?;
    anyhow::ensure!(hashes.iter().all(|h| *h == hashes[0]), "the images differ\n{}", lab.logs());
    println!(
        "ok: s1 SYNCHRONIZED {:.1} s after restore, {} copied for {} written; the three images are identical",
        started.elapsed().as_secs_f64(),
        format_bytes(resynced),
        format_bytes(written * extent_bytes)
    );
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn print_progress(lab: &crate::testbed::Lab) {
    let Some(status) = lab.status() else { return };
    let Some(peers) = status["secondaries"].as_array() else { return };
    let line: Vec<String> = peers
        .iter()
        .map(|p| {
            format!(
                "{}: {} shipped, {} extents behind{}",
                p["name"].as_str().unwrap_or("?"),
                format_bytes(p["shipped_bytes"].as_u64().unwrap_or(0)),
                p["pending_extents"].as_u64().unwrap_or(0) + p["inflight_frames"].as_u64().unwrap_or(0),
                if p["in_sync"].as_bool() == Some(true) { ", in sync" } else { "" }
            )
        })
        .collect();
    println!("  {}", line.join(" | "));
}
