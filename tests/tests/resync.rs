//! The persistent fracture log under injected faults, on the real kernel: a primary and
//! secondaries on loop devices, each secondary in its own network namespace over veth.
//!
//! Each case writes on the primary, injects a fault, keeps writing, heals, waits for every
//! secondary to be SYNCHRONIZED, then checks (a) the images hash equal and (b) the bytes the
//! resync shipped are at most twice the bytes of the extents written during the fault (the
//! writes of the batch just before the fault count as during it: they may be in flight when
//! it strikes). No full copy.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use replicator_tests::*;

const DEVICE_BYTES: u64 = 256 * MIB;
const EXTENT_BYTES: u64 = 64 * KIB;
/// Fast checkpoints and fault detection, so that each case takes seconds.
const PRIMARY_ARGS: &[&str] = &["--checkpoint-ms", "200", "--timeout-ms", "2000", "--sync-rate", "0"];
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);

fn lab(label: &str, secondaries: usize, device_bytes: u64) -> Lab {
    require_root();
    Lab::new(&replicator_bin(), label, secondaries, device_bytes)
        .expect("setting up namespaces, veths and loop devices")
}

/// Random whole-extent writes on the primary, remembering which extents they touched.
struct Workload {
    rng: Rng,
    extents: u64,
}

impl Workload {
    fn new(seed: u64, device_bytes: u64) -> Self {
        Self { rng: Rng::new(seed), extents: device_bytes / EXTENT_BYTES }
    }

    fn write(&mut self, device: &Path, count: usize) -> BTreeSet<u64> {
        let mut touched = BTreeSet::new();
        for _ in 0..count {
            let extent = self.rng.below(self.extents);
            let fill = (self.rng.below(255) + 1) as u8;
            write_direct(device, extent * EXTENT_BYTES, EXTENT_BYTES as usize, fill)
                .expect("writing the primary");
            touched.insert(extent);
        }
        touched
    }
}

fn synchronized(lab: &Lab) -> serde_json::Value {
    lab.wait_synchronized(SYNC_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()))
}

/// A lab with one secondary and the primary (started with `primary_args`), 100 extents
/// written and SYNCHRONIZED: where most cases start.
struct Mirrored {
    lab: Lab,
    workload: Workload,
    /// The primary's device.
    device: PathBuf,
    /// Indexes in `lab.processes`.
    secondary: usize,
    primary: usize,
    /// The secondary's resync bytes once SYNCHRONIZED (its initial full sync).
    before: u64,
}

fn mirrored(label: &str, seed: u64, primary_args: &[&str]) -> Mirrored {
    let mut lab = lab(label, 1, DEVICE_BYTES);
    let mut workload = Workload::new(seed, DEVICE_BYTES);
    let secondary = lab.start_secondary(0, &[]).expect("secondary");
    let primary = lab.start_primary(primary_args).expect("primary");
    let device = lab.primary_device.path.clone();
    workload.write(&device, 100);
    let before = resync_bytes(&synchronized(&lab), 0);
    Mirrored { lab, workload, device, secondary, primary, before }
}

fn resync_bytes(status: &serde_json::Value, peer: usize) -> u64 {
    status["secondaries"][peer]["resync_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no resync_bytes: {status}"))
}

fn assert_images_equal(lab: &Lab) {
    let hashes = lab.hashes().expect("hashing the images");
    eprintln!("image hashes: {hashes:?}");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// The resync shipped at most twice the extents written during the fault, and at least one.
fn assert_resync_bounded(lab: &Lab, resynced_bytes: u64, during_fault: &BTreeSet<u64>) {
    let fault_bytes = during_fault.len() as u64 * EXTENT_BYTES;
    eprintln!(
        "resync shipped {} KiB for {} extents ({} KiB) written during the fault",
        resynced_bytes / KIB,
        during_fault.len(),
        fault_bytes / KIB
    );
    assert!(resynced_bytes > 0, "nothing was resynced\n{}", lab.logs());
    assert!(
        resynced_bytes <= 2 * fault_bytes,
        "resync shipped {resynced_bytes} bytes for {fault_bytes} bytes written during the fault\n{}",
        lab.logs()
    );
}

fn until(what: &str, lab: &Lab, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
    loop {
        if let Some(status) = lab.status()
            && check(&status)
        {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fractured(lab: &Lab, peer: usize) -> serde_json::Value {
    until("the secondary to be fractured", lab, |s| s["secondaries"][peer]["fractured"] == true)
}

/// Waits for the checkpoints after the last write to pass the intent log's quiet window.
fn quiet_intent_log() {
    std::thread::sleep(Duration::from_millis(1500));
}

/// 1. Kill -9 the secondary in the middle of writes; restart it.
#[test]
fn secondary_killed_and_restarted() {
    let Mirrored { mut lab, mut workload, device, secondary, before, .. } =
        mirrored("r-kill-s", 1, PRIMARY_ARGS);
    let mut during = workload.write(&device, 20);
    lab.processes[secondary].kill();
    during.extend(workload.write(&device, 100));
    fractured(&lab, 0);
    during.extend(workload.write(&device, 100));
    lab.start_secondary(0, &[]).expect("secondary again");
    let after = resync_bytes(&synchronized(&lab), 0);
    assert_images_equal(&lab);
    assert_resync_bounded(&lab, after - before, &during);
}

/// 2. The link goes down for 10 s (`ip link set ... down`), then up.
#[test]
fn link_down_for_ten_seconds() {
    let Mirrored { lab, mut workload, device, before, .. } = mirrored("r-link", 2, PRIMARY_ARGS);
    let link = lab.primary_ifs[0].clone();
    let mut during = workload.write(&device, 20);
    lab.primary_ns.run(&["link", "set", &link, "down"]).expect("link down");
    let down_at = std::time::Instant::now();
    during.extend(workload.write(&device, 150));
    fractured(&lab, 0);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed()));
    lab.primary_ns.run(&["link", "set", &link, "up"]).expect("link up");
    let after = resync_bytes(&synchronized(&lab), 0);
    assert_images_equal(&lab);
    assert_resync_bounded(&lab, after - before, &during);
}

/// 3. Kill -9 the primary while a secondary is fractured; restart it: the fracture log and the
///    pinned maps bring it back without a full copy, writes made while no primary ran included.
#[test]
fn primary_killed_while_a_secondary_is_fractured() {
    let Mirrored { mut lab, mut workload, device, secondary, primary, .. } =
        mirrored("r-kill-p", 3, PRIMARY_ARGS);
    quiet_intent_log();
    lab.processes[secondary].kill();
    let mut during = workload.write(&device, 100);
    fractured(&lab, 0);
    during.extend(workload.write(&device, 100));
    std::thread::sleep(Duration::from_millis(500));
    lab.processes[primary].kill();
    // No primary runs: only the pinned tracker sees these.
    during.extend(workload.write(&device, 100));
    lab.start_primary(PRIMARY_ARGS).expect("primary again");
    lab.start_secondary(0, &[]).expect("secondary again");
    let status = synchronized(&lab);
    assert_images_equal(&lab);
    assert_resync_bounded(&lab, resync_bytes(&status, 0), &during);
    assert!(lab.logs().contains("resumed the pinned tracker"), "{}", lab.logs());
}

/// 4. A simulated host crash of the primary: kill -9 and remove the pinned maps (as a reboot
///    would), write more (nothing tracks it), restart: the persisted logs and a verify of every
///    secondary bring it back; the verify ships only the extents that differ.
#[test]
fn host_crash_of_the_primary() {
    let Mirrored { mut lab, mut workload, device, primary, .. } = mirrored("r-host", 4, PRIMARY_ARGS);
    quiet_intent_log();
    let mut during = workload.write(&device, 50);
    lab.processes[primary].kill();
    lab.untrack_primary();
    during.extend(workload.write(&device, 50));
    lab.start_primary(PRIMARY_ARGS).expect("primary after the crash");
    let status = synchronized(&lab);
    assert_images_equal(&lab);
    assert_resync_bounded(&lab, resync_bytes(&status, 0), &during);
    let logs = lab.logs();
    assert!(logs.contains("every secondary will be verified") && logs.contains("verify finished"), "{logs}");
}

/// 4b. A host crash during a full sync: the extents it had copied are written while nothing
///     tracks them. The restarted primary cannot tell which changed, so the full sync starts
///     again from the first extent (resuming where it stopped would leave them different).
#[test]
fn host_crash_during_a_full_sync() {
    let mut lab = lab("r-hostfull", 1, DEVICE_BYTES);
    lab.start_secondary(0, &[]).expect("secondary");
    let slow = ["--checkpoint-ms", "200", "--timeout-ms", "2000", "--sync-rate", "32MiB"];
    let primary = lab.start_primary(&slow).expect("primary");
    let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
    while lab.status().map_or(0, |s| s["secondaries"][0]["resync_bytes_done"].as_u64().unwrap_or(0))
        < 32 * MIB
    {
        assert!(std::time::Instant::now() < deadline, "the full sync made no progress\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500)); // a checkpoint of its progress
    lab.processes[primary].kill();
    lab.untrack_primary();
    // The first 4 MiB, copied already, change with nothing tracking them.
    write_direct(&lab.primary_device.path, 0, 4 * MIB as usize, 0x5a).expect("writing the primary");
    lab.start_primary(PRIMARY_ARGS).expect("primary after the crash");
    synchronized(&lab);
    assert_images_equal(&lab);
    assert!(lab.logs().contains("a full sync was under way"), "{}", lab.logs());
}

/// 5. A fracture log truncated, and one with a flipped byte: each is reported, never trusted
///    as empty; that secondary is verified and ends equal, without a full copy.
#[test]
fn damaged_fracture_logs_fall_back_to_verify() {
    let mut lab = lab("r-damage", 2, DEVICE_BYTES);
    let mut workload = Workload::new(5, DEVICE_BYTES);
    let s0 = lab.start_secondary(0, &[]).expect("secondary 0");
    let s1 = lab.start_secondary(1, &[]).expect("secondary 1");
    let primary = lab.start_primary(PRIMARY_ARGS).expect("primary");
    let device = lab.primary_device.path.clone();
    workload.write(&device, 100);
    synchronized(&lab);
    quiet_intent_log();
    lab.processes[s0].kill();
    lab.processes[s1].kill();
    let during = workload.write(&device, 100);
    fractured(&lab, 0);
    fractured(&lab, 1);
    quiet_intent_log();
    assert!(lab.processes[primary].stop(), "the primary stops cleanly\n{}", lab.logs());
    let state = lab.state_dir("p");
    let truncated = state.join("fracture-s0.log");
    let bytes = std::fs::read(&truncated).expect("s0's fracture log exists");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("truncating");
    let flipped = state.join("fracture-s1.log");
    let mut bytes = std::fs::read(&flipped).expect("s1's fracture log exists");
    let at = bytes.len() - 1;
    bytes[at] ^= 0x10;
    std::fs::write(&flipped, &bytes).expect("flipping a byte");
    lab.start_primary(PRIMARY_ARGS).expect("primary again");
    lab.start_secondary(0, &[]).expect("secondary 0 again");
    lab.start_secondary(1, &[]).expect("secondary 1 again");
    let status = synchronized(&lab);
    assert_images_equal(&lab);
    let logs = lab.logs();
    for name in ["fracture-s0.log", "fracture-s1.log"] {
        assert!(logs.contains(&format!("{name}: damaged log")), "{name} reported as damaged\n{logs}");
    }
    for peer in 0..2 {
        assert_resync_bounded(&lab, resync_bytes(&status, peer), &during);
    }
}

/// 6. Administrator fracture and restore while writes continue; the fractured image does not
///    change until restore.
#[test]
fn administrator_fracture_and_restore() {
    let Mirrored { lab, mut workload, device, before, .. } = mirrored("r-admin", 6, PRIMARY_ARGS);
    let mut during = workload.write(&device, 20);
    lab.operate(&["fracture", "s0"]).unwrap_or_else(|e| panic!("fracture: {e}\n{}", lab.logs()));
    let status = fractured(&lab, 0);
    assert_eq!(status["secondaries"][0]["state"], "UNSYNCHRONIZED", "{status}");
    let frozen = hash_device(&lab.secondary_devices[0].path).expect("hashing s0");
    during.extend(workload.write(&device, 200));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        hash_device(&lab.secondary_devices[0].path).expect("hashing s0"),
        frozen,
        "nothing reaches a fractured secondary"
    );
    assert!(lab.operate(&["fracture", "s0"]).is_err(), "fracturing twice is refused");
    lab.operate(&["restore", "s0"]).unwrap_or_else(|e| panic!("restore: {e}\n{}", lab.logs()));
    let after = resync_bytes(&synchronized(&lab), 0);
    assert_images_equal(&lab);
    assert_resync_bounded(&lab, after - before, &during);
}

/// 7. Two secondaries, one fractured and one healthy: the healthy one never falls behind.
#[test]
fn healthy_secondary_keeps_up_while_another_is_fractured() {
    let mut lab = lab("r-two", 2, DEVICE_BYTES);
    let mut workload = Workload::new(7, DEVICE_BYTES);
    let s0 = lab.start_secondary(0, &[]).expect("secondary 0");
    lab.start_secondary(1, &[]).expect("secondary 1");
    lab.start_primary(PRIMARY_ARGS).expect("primary");
    let device = lab.primary_device.path.clone();
    workload.write(&device, 100);
    let before = resync_bytes(&synchronized(&lab), 0);
    let mut during = workload.write(&device, 20);
    lab.processes[s0].kill();
    fractured(&lab, 0);
    for _ in 0..5 {
        during.extend(workload.write(&device, 60));
        let status = until("the healthy secondary to catch up", &lab, |s| {
            s["secondaries"][1]["in_sync"] == true && s["secondaries"][1]["out_of_sync_bytes"] == 0
        });
        assert_eq!(status["secondaries"][1]["state"], "SYNCHRONIZED", "{status}");
        assert_eq!(status["secondaries"][1]["fractured"], false, "{status}");
        assert_eq!(status["secondaries"][0]["fractured"], true, "{status}");
    }
    let s1_resync = resync_bytes(&lab.status().expect("status"), 1);
    lab.start_secondary(0, &[]).expect("secondary 0 again");
    let status = synchronized(&lab);
    assert_images_equal(&lab);
    assert_resync_bounded(&lab, resync_bytes(&status, 0) - before, &during);
    assert_eq!(resync_bytes(&status, 1), s1_resync, "the healthy secondary needed no resync");
}

/// 8. A secondary whose device returns write errors (a loop device over a file on a tmpfs that
///    fills up): the primary fractures it, keeps its log, and resyncs it when space is freed.
///    The frames staged in its journal (on another disk) were acknowledged and stay there: the
///    commit that failed to apply them applies them once space is freed, so the resync may ship
///    nothing; it ships at most twice what was written.
#[test]
fn secondary_write_errors_fracture_until_space_is_freed() {
    const SMALL_BYTES: u64 = 64 * MIB;
    let mut lab = lab("r-enospc", 1, SMALL_BYTES);
    let mut workload = Workload::new(8, SMALL_BYTES);
    let tmpfs = lab.dir.join("tmpfs");
    std::fs::create_dir_all(&tmpfs).expect("tmpfs mount point");
    let mount = TmpfsMount::new(&tmpfs, SMALL_BYTES + 8 * MIB);
    let backing = tmpfs.join("s0.img");
    std::fs::File::create(&backing).and_then(|f| f.set_len(SMALL_BYTES)).expect("backing file");
    lab.secondary_devices[0] = LoopDevice::over_file(backing.clone()).expect("loop over tmpfs");
    lab.start_secondary(0, &[]).expect("secondary");
    lab.start_primary(PRIMARY_ARGS).expect("primary");
    let device = lab.primary_device.path.clone();
    let before = resync_bytes(&synchronized(&lab), 0);
    // The initial sync allocated the whole image; hole-punch the first 8 MiB (zero on both
    // sides), then fill the tmpfs so that rewriting those extents finds no space.
    run_command(
        "fallocate",
        &["--punch-hole", "--offset", "0", "--length", "8MiB", backing.to_str().unwrap()],
    )
    .expect("fallocate (package util-linux)");
    let filler = mount.fill();
    let mut during = BTreeSet::new();
    for extent in 0..(8 * MIB / EXTENT_BYTES) {
        write_direct(&device, extent * EXTENT_BYTES, EXTENT_BYTES as usize, 0x5a)
            .expect("writing the primary");
        during.insert(extent);
    }
    during.extend(workload.write(&device, 20));
    fractured(&lab, 0);
    std::thread::sleep(Duration::from_secs(2));
    let logs = lab.logs();
    assert!(
        logs.contains("write of") && logs.contains("failed"),
        "the secondary reports the write error\n{logs}"
    );
    // Until space is freed every retry ships some extents that fail again; what counts is
    // what the resync ships once it can succeed.
    let retried = resync_bytes(&lab.status().expect("status"), 0) - before;
    std::fs::remove_file(&filler).expect("freeing space");
    let freed_at = resync_bytes(&lab.status().expect("status"), 0);
    let after = resync_bytes(&synchronized(&lab), 0);
    assert_images_equal(&lab);
    eprintln!("{} KiB shipped in failed retries before space was freed", retried / KIB);
    let fault_bytes = during.len() as u64 * EXTENT_BYTES;
    eprintln!(
        "resync shipped {} KiB once space was freed, for {} KiB written",
        (after - freed_at) / KIB,
        fault_bytes / KIB
    );
    assert!(after - freed_at <= 2 * fault_bytes, "resync shipped {} bytes\n{}", after - freed_at, lab.logs());
}

/// A tmpfs of a given size, unmounted on drop.
struct TmpfsMount {
    path: std::path::PathBuf,
}

impl TmpfsMount {
    fn new(path: &Path, size_bytes: u64) -> Self {
        let options = format!("size={size_bytes}");
        run_command("mount", &["-t", "tmpfs", "-o", &options, "tmpfs", path.to_str().unwrap()])
            .expect("mounting a tmpfs");
        Self { path: path.into() }
    }

    /// Fills the rest of the tmpfs; returns the filler file.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0xffu8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = run_command("umount", &["--lazy", self.path.to_str().unwrap()]);
    }
}

/// A write whose completion the kernel never traced (seen, rarely, in the wild) is shipped
/// anyway once it has waited a checkpoint interval: here the test steals completions from the
/// pinned map before the primary drains them.
#[test]
fn a_write_whose_completion_is_lost_is_shipped_anyway() {
    let mut lab = lab("r-unmatched", 1, DEVICE_BYTES);
    lab.start_secondary(0, &[]).expect("secondary");
    lab.start_primary(PRIMARY_ARGS).expect("primary");
    synchronized(&lab);
    let device = lab.primary_device.path.clone();
    let name = device.file_name().expect("a device name").to_string_lossy().into_owned();
    let options = replicator::TrackerOptions {
        name: Some(name),
        extent_bytes: EXTENT_BYTES,
        exclusive: false,
        ..Default::default()
    };
    let mut thief =
        replicator::Tracker::attach_with(&device, &options).expect("the primary's pinned tracker");
    let mut rng = Rng::new(42);
    let mut stolen = BTreeSet::new();
    let mut attempts = 0;
    while stolen.len() < 10 && attempts < 10_000 {
        attempts += 1;
        let extent = rng.below(DEVICE_BYTES / EXTENT_BYTES);
        write_direct(&device, extent * EXTENT_BYTES, EXTENT_BYTES as usize, (rng.below(255) + 1) as u8)
            .expect("write");
        for run in thief.steal_completions() {
            stolen.extend(run);
        }
    }
    drop(thief);
    eprintln!("stole {} completions in {attempts} writes", stolen.len());
    assert!(!stolen.is_empty(), "no completion could be stolen from the primary's drain");
    synchronized(&lab);
    assert_images_equal(&lab);
    assert!(lab.logs().contains("no traced completion"), "{}", lab.logs());
}

/// 9. A secondary down when the primary starts (its log clean), while writes come: when it
///    connects it lacks them, so it is SYNCHRONIZING, never SYNCHRONIZED, until they are shipped
///    (its link slowed with tbf, so the catch-up spans several status updates).
#[test]
fn a_secondary_down_at_start_up_catches_up_before_it_is_synchronized() {
    let mut lab = lab("r-late", 1, DEVICE_BYTES);
    let mut workload = Workload::new(9, DEVICE_BYTES);
    let s0 = lab.start_secondary(0, &[]).expect("secondary");
    let primary = lab.start_primary(PRIMARY_ARGS).expect("primary");
    let device = lab.primary_device.path.clone();
    workload.write(&device, 20);
    synchronized(&lab);
    assert!(lab.processes[primary].stop(), "the primary stops cleanly\n{}", lab.logs());
    assert!(lab.processes[s0].stop(), "the secondary stops cleanly\n{}", lab.logs());
    lab.start_primary(PRIMARY_ARGS).expect("primary again, s0 still down");
    let during = workload.write(&device, 150);
    std::thread::sleep(Duration::from_millis(500)); // drained into s0's pending extents
    let slow_if = lab.primary_ifs[0].clone();
    let ns = lab.primary_ns.name.clone();
    let tbf = ["rate", "24mbit", "burst", "64kb", "latency", "3000ms"];
    let add = ["-n", &ns, "qdisc", "add", "dev", &slow_if, "root", "tbf"];
    run_command("tc", &add.into_iter().chain(tbf).collect::<Vec<_>>()).expect("tc qdisc add tbf");
    lab.start_secondary(0, &[]).expect("secondary again");
    let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
    let mut seen_behind = 0;
    loop {
        assert!(std::time::Instant::now() < deadline, "s0 did not catch up\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
        let Some(status) = lab.status() else { continue };
        let s0 = &status["secondaries"][0];
        let behind = s0["out_of_sync_bytes"].as_u64().unwrap_or(0) > 0;
        if s0["connected"] == true && behind {
            seen_behind += 1;
            assert_ne!(s0["state"], "SYNCHRONIZED", "s0 reported SYNCHRONIZED while it lacks writes: {s0}");
        }
        if s0["connected"] == true && !behind && s0["state"] == "SYNCHRONIZED" {
            break;
        }
    }
    assert!(seen_behind > 0, "the catch-up was never seen in progress; slow the link further");
    run_command("tc", &["-n", &ns, "qdisc", "del", "dev", &slow_if, "root"]).expect("tc qdisc del");
    let status = synchronized(&lab);
    assert_images_equal(&lab);
    assert_resync_bounded(&lab, resync_bytes(&status, 0), &during);
}

/// A resync cut short by a kill -9 of the primary resumes where it stopped: the extents it
/// had copied (up to its last checkpoint) are not copied again.
#[test]
fn a_resync_interrupted_by_a_primary_crash_resumes_where_it_stopped() {
    let Mirrored { mut lab, mut workload, device, primary, .. } = mirrored("r-resume", 9, PRIMARY_ARGS);
    quiet_intent_log();
    lab.operate(&["fracture", "s0"]).unwrap_or_else(|e| panic!("fracture: {e}\n{}", lab.logs()));
    let base = resync_bytes(&fractured(&lab, 0), 0); // the initial full sync's
    let during = workload.write(&device, 1500);
    let during_bytes = during.len() as u64 * EXTENT_BYTES;
    lab.operate(&["set", "sync-rate=16MiB", "--secondary", "s0"]).expect("set");
    lab.operate(&["restore", "s0"]).unwrap_or_else(|e| panic!("restore: {e}\n{}", lab.logs()));
    let status = until("a third of the resync done", &lab, |s| {
        s["secondaries"][0]["resync_bytes_done"].as_u64().unwrap_or(0) >= during_bytes / 3
    });
    assert_eq!(status["secondaries"][0]["state"], "SYNCHRONIZING", "{status}");
    std::thread::sleep(Duration::from_millis(500)); // a checkpoint of its progress
    let shipped_before = resync_bytes(&lab.status().expect("status"), 0) - base;
    lab.processes[primary].kill();
    // The progress is on disk: bytes done, the extents left (the bitmap), and the rate the
    // time left is estimated from.
    let file = lab.state_dir("p").join(replicator::logs::fracture_log_file("s0"));
    let (header, left) =
        replicator::logs::decode(&std::fs::read(&file).expect("the fracture log")).expect("sound");
    eprintln!(
        "persisted: {} KiB done, {} extents left, {} KiB/s",
        header.resync_bytes_done / KIB,
        left.count_ones(),
        header.resync_rate_bytes_per_s / KIB
    );
    assert!(header.resync_bytes_done > 0 && left.any(), "{header:?}");
    assert!(header.resync_rate_bytes_per_s > 0, "the rate is persisted: {header:?}");
    lab.start_primary(PRIMARY_ARGS).expect("primary again");
    let shipped_after = resync_bytes(&synchronized(&lab), 0);
    assert_images_equal(&lab);
    eprintln!(
        "resync of {} KiB: {} KiB before the kill, {} KiB after the restart",
        during_bytes / KIB,
        shipped_before / KIB,
        shipped_after / KIB
    );
    assert!(
        shipped_after + during_bytes / 4 <= during_bytes,
        "the restarted primary copied {shipped_after} of {during_bytes} bytes: it started over\n{}",
        lab.logs()
    );
    // Copied twice at most: what was acknowledged after the last checkpoint of the progress
    // (200 ms at 16 MiB/s, and the extents in flight).
    assert!(
        shipped_before + shipped_after <= during_bytes + 8 * MIB,
        "{shipped_before} + {shipped_after} bytes for {during_bytes}\n{}",
        lab.logs()
    );
}

/// Under the manual recovery policy a secondary that returns after a failure stays fractured,
/// untouched, until `restore`; then only what it missed is copied.
#[test]
fn manual_recovery_policy_waits_for_restore() {
    let args: Vec<&str> = PRIMARY_ARGS.iter().copied().chain(["--recovery-policy", "manual"]).collect();
    let Mirrored { mut lab, mut workload, device, secondary, before, .. } = mirrored("r-manual", 10, &args);
    let mut during = workload.write(&device, 20);
    lab.processes[secondary].kill();
    during.extend(workload.write(&device, 100));
    fractured(&lab, 0);
    let frozen = hash_device(&lab.secondary_devices[0].path).expect("hashing s0");
    lab.start_secondary(0, &[]).expect("secondary again");
    std::thread::sleep(Duration::from_secs(3));
    let status = lab.status().expect("status");
    assert_eq!(status["secondaries"][0]["fractured"], true, "it waits for restore: {status}");
    assert_eq!(status["secondaries"][0]["connected"], false, "{status}");
    assert_eq!(hash_device(&lab.secondary_devices[0].path).expect("hashing s0"), frozen, "untouched");
    lab.operate(&["restore", "s0"]).unwrap_or_else(|e| panic!("restore: {e}\n{}", lab.logs()));
    let after = resync_bytes(&synchronized(&lab), 0);
    assert_images_equal(&lab);
    assert_resync_bounded(&lab, after - before, &during);
}
