//! Test 7: `kill -9` the replicator while writes go on, restart it, and every extent written
//! while it was down is still marked: the maps and links are pinned in bpffs, so the kernel
//! program never stopped marking.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use replicator_tests::*;

const EXTENT_BYTES: u64 = 64 * KIB;
const DEVICE_BYTES: u64 = 1024 * MIB;

/// A running `replicator track --json`, with a thread collecting the extents it prints.
struct TrackProcess {
    child: Child,
    reader: Option<JoinHandle<BTreeSet<u64>>>,
    /// For a process whose output nobody reads until it stops (`start_unread`): opens the gate.
    gate: Option<std::sync::mpsc::Sender<()>>,
}

impl TrackProcess {
    fn start(device: &Path, name: &str) -> Self {
        Self::spawn(device, name, None)
    }

    /// A `track` whose output is read only once it has stopped: once the pipe is full, it
    /// blocks in the middle of a drain, with marks taken from the kernel and not yet printed.
    fn start_unread(device: &Path, name: &str) -> Self {
        let (gate, opened) = std::sync::mpsc::channel();
        let mut process = Self::spawn(device, name, Some(opened));
        process.gate = Some(gate);
        process
    }

    fn spawn(device: &Path, name: &str, gated: Option<std::sync::mpsc::Receiver<()>>) -> Self {
        let mut child = Command::new(replicator_bin())
            .args(["track", "--json", "--interval-ms", "10", "--name", name, "--device"])
            .arg(device)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting replicator track");
        let stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            if let Some(opened) = gated {
                let _ = opened.recv();
            }
            let mut extents = BTreeSet::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.expect("reading track output");
                let run: serde_json::Value = serde_json::from_str(&line).expect("track prints JSON lines");
                let first = run["first_extent"].as_u64().expect("first_extent");
                let end = run["end_extent"].as_u64().expect("end_extent");
                extents.extend(first..end);
            }
            extents
        });
        Self { child, reader: Some(reader), gate: None }
    }

    /// Stops the process with `signal` and returns what it printed.
    fn stop(mut self, signal: Signal) -> (BTreeSet<u64>, std::process::ExitStatus) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signalling replicator track");
        let status = self.child.wait().expect("waiting for replicator track");
        if let Some(gate) = self.gate.take() {
            let _ = gate.send(());
        }
        (self.reader.take().expect("stopped once").join().expect("reader thread"), status)
    }
}

impl Drop for TrackProcess {
    /// A test that fails leaves no tracker running.
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if let Some(gate) = self.gate.take() {
                let _ = gate.send(());
            }
        }
    }
}

fn wait_for_links(pin_dir: &Path) {
    for _ in 0..500 {
        if pin_dir.join("link_block_rq_complete").exists() && pin_dir.join("link_block_bio_queue").exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("replicator track did not pin its links in {} within 5 s", pin_dir.display());
}

/// A loop device of `device_bytes`, a tracker name for this test, and its pin directory.
fn tracked_device(label: &str, device_bytes: u64) -> (LoopDevice, String, PathBuf) {
    let device = LoopDevice::create(label, device_bytes).expect("creating a loop device");
    let name = tracker_name(label);
    let pin_dir = PathBuf::from(replicator::tracker::BPFFS_ROOT).join(&name);
    (device, name, pin_dir)
}

const PHASE_RUNNING: u8 = 0;
const PHASE_DOWN: u8 = 1;

#[test]
fn kill_9_and_restart_keeps_every_mark() {
    require_root();
    let (device, name, pin_dir) = tracked_device("restart", DEVICE_BYTES);
    let first = TrackProcess::start(&device.path, &name);
    wait_for_links(&pin_dir);

    let phase = Arc::new(AtomicU8::new(PHASE_RUNNING));
    let stop = Arc::new(AtomicBool::new(false));
    // Every extent written, and those whose write started and completed while nothing ran.
    let written = Arc::new(Mutex::new((BTreeSet::new(), BTreeSet::new())));
    let writer = {
        let (path, phase, stop, written) =
            (device.path.clone(), Arc::clone(&phase), Arc::clone(&stop), Arc::clone(&written));
        std::thread::spawn(move || {
            let mut rng = Rng::new(0x4e57a47);
            while !stop.load(Ordering::Relaxed) {
                let extent = rng.below(DEVICE_BYTES / EXTENT_BYTES);
                let phase_before = phase.load(Ordering::SeqCst);
                write_direct(&path, extent * EXTENT_BYTES, 4096, 0x77).expect("O_DIRECT write");
                let phase_after = phase.load(Ordering::SeqCst);
                let mut sets = written.lock().expect("lock");
                sets.0.insert(extent);
                if phase_before == PHASE_DOWN && phase_after == PHASE_DOWN {
                    sets.1.insert(extent);
                }
                drop(sets);
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (first_reported, _) = first.stop(Signal::SIGKILL);
    phase.store(PHASE_DOWN, Ordering::SeqCst);
    assert!(pin_dir.join("INTENT").exists(), "kill -9 must leave the pins in place");
    std::thread::sleep(Duration::from_millis(400));
    phase.store(PHASE_RUNNING, Ordering::SeqCst);

    let second = TrackProcess::start(&device.path, &name);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    std::thread::sleep(Duration::from_millis(100));
    let (second_reported, status) = second.stop(Signal::SIGTERM);
    assert!(status.success(), "replicator track exited with {status} after SIGTERM");
    assert!(!pin_dir.exists(), "a clean stop removes {}", pin_dir.display());

    let (all_written, written_while_down) = std::mem::take(&mut *written.lock().expect("lock"));
    let reported: BTreeSet<u64> = first_reported.union(&second_reported).copied().collect();
    let missed: Vec<_> = all_written.difference(&reported).collect();
    let missed_down: Vec<_> = written_while_down.difference(&second_reported).collect();
    let spurious = reported.difference(&all_written).count();
    eprintln!(
        "written {} extents ({} while down); first run reported {}, second {}; missed {}, spurious {spurious}",
        all_written.len(),
        written_while_down.len(),
        first_reported.len(),
        second_reported.len(),
        missed.len()
    );
    assert!(written_while_down.len() > 50, "too few writes while the tracker was down");
    assert!(
        missed_down.is_empty(),
        "extents written while down were not reported after restart: {missed_down:?}"
    );
    assert!(missed.is_empty(), "written extents never reported: {missed:?}");
    assert!(spurious == 0, "{spurious} extents reported that were never written");
}

/// `kill -9` in the middle of a drain: the first `track`'s output is not read, so it blocks
/// writing its lines once the pipe is full, with every mark already taken from the kernel. The
/// lines it never wrote are printed by the next `track`, from the intent map (marks leave it
/// only once printed): at least once, nothing missed.
#[test]
fn kill_9_in_the_middle_of_a_drain_loses_no_mark() {
    require_root();
    let (device, name, pin_dir) = tracked_device("middrain", DEVICE_BYTES);
    let first = TrackProcess::start_unread(&device.path, &name);
    wait_for_links(&pin_dir);
    // Every other extent: a run, and a line of about 90 bytes, each; far more than a pipe holds.
    let written: BTreeSet<u64> = (0..DEVICE_BYTES / EXTENT_BYTES).step_by(2).take(4000).collect();
    for &extent in &written {
        write_direct(&device.path, extent * EXTENT_BYTES, 4096, 0x5a).expect("O_DIRECT write");
    }
    std::thread::sleep(Duration::from_millis(500)); // drained, and blocked on the full pipe
    let (first_reported, _) = first.stop(Signal::SIGKILL);
    assert!(
        first_reported.len() < written.len(),
        "the first track printed every extent ({}): the pipe did not fill, the test proves nothing",
        first_reported.len()
    );
    let second = TrackProcess::start(&device.path, &name);
    wait_for_links(&pin_dir);
    std::thread::sleep(Duration::from_millis(300));
    let (second_reported, status) = second.stop(Signal::SIGTERM);
    assert!(status.success(), "replicator track exited with {status} after SIGTERM");
    let reported: BTreeSet<u64> = first_reported.union(&second_reported).copied().collect();
    let missed: Vec<_> = written.difference(&reported).collect();
    eprintln!(
        "written {}; the killed track printed {}, the next {}; missed {}",
        written.len(),
        first_reported.len(),
        second_reported.len(),
        missed.len()
    );
    assert!(
        missed.is_empty(),
        "{} written extents never reported, e.g. {:?}",
        missed.len(),
        &missed[..missed.len().min(10)]
    );
    assert!(reported.is_subset(&written), "extents reported that were never written");
}

/// A tracker is held by one process: a second `replicator track` of the same name, and
/// `replicator untrack` of it, are refused while the first runs (two drains would take each
/// other's marks; untrack would throw them away); a name that is not a plain file name is
/// refused (it would have removed that path). Once the first stops, untrack succeeds.
#[test]
fn a_running_tracker_is_held_alone() {
    require_root();
    let (device, name, pin_dir) = tracked_device("held", 64 * MIB);
    let first = TrackProcess::start(&device.path, &name);
    wait_for_links(&pin_dir);
    let replicator = |args: &[&str]| {
        let output = Command::new(replicator_bin()).args(args).output().expect("running replicator");
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let device_arg = device.path.to_str().expect("a UTF-8 path");
    let (ok, stderr) = replicator(&["track", "--name", &name, "--device", device_arg]);
    assert!(!ok && stderr.contains("in use by another process"), "a second track ran: {stderr}");
    let (ok, stderr) = replicator(&["untrack", "--name", &name]);
    assert!(
        !ok && stderr.contains("in use by another process"),
        "untrack removed a running tracker: {stderr}"
    );
    assert!(pin_dir.join("INTENT").exists(), "the running tracker's pins are gone");
    for bad in ["..", "/var/lib/replicator", "a/b"] {
        let (ok, stderr) = replicator(&["untrack", "--name", bad]);
        assert!(!ok && stderr.contains("tracker name"), "untrack {bad:?} was not refused: {stderr}");
    }
    let (_, status) = first.stop(Signal::SIGTERM);
    assert!(status.success(), "replicator track exited with {status} after SIGTERM");
    let (ok, stderr) = replicator(&["untrack", "--name", &name]);
    assert!(ok, "untrack of a stopped tracker failed: {stderr}");
}
