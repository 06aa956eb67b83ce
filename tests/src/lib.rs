//! Support for the kernel tests: root check, a tracker that records every extent it drains, the
//! ground truth of what a test wrote, and the exactness check every test ends with.
//!
//! The tests need root and a kernel with BPF tracepoints, loop and zram. They fail, loudly and
//! with the reason, when they cannot set up: a CI run that cannot run them must not pass.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use bitvec::prelude::*;
pub use replicator::{Tracker, TrackerOptions};
use replicator_common::ExtentGeometry;

pub use replicator::testbed::{
    Lab, LoopDevice, ZramDevice, hash_device, read_device_direct, read_range_direct, run_command,
    write_direct,
};

/// The `replicator` binary under test; `cargo xtask test` sets REPLICATOR_BIN.
pub fn replicator_bin() -> std::path::PathBuf {
    let bin = std::env::var_os("REPLICATOR_BIN")
        .expect("REPLICATOR_BIN must name the replicator binary (`cargo xtask test` sets it)");
    let bin = std::path::PathBuf::from(bin);
    assert!(bin.exists(), "REPLICATOR_BIN={} does not exist", bin.display());
    bin
}

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Panics unless we are root: these tests drive the real kernel.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel tests need root (eBPF, loop devices, zram, mount); run `sudo cargo xtask test`"
    );
}

static NEXT_TRACKER: AtomicU32 = AtomicU32::new(0);

/// A unique pin-directory name for one test's tracker.
pub fn tracker_name(test: &str) -> String {
    format!("test-{test}-{}-{}", std::process::id(), NEXT_TRACKER.fetch_add(1, Ordering::Relaxed))
}

/// A tracker that remembers every extent it has drained, and unpins itself on drop.
pub struct Recorder {
    pub tracker: Option<Tracker>,
    pub marked: BitVec<u64, Lsb0>,
}

impl Recorder {
    pub fn attach(device: &Path, extent_bytes: u64, test: &str) -> Self {
        Self::attach_with(device, TrackerOptions { extent_bytes, ..Default::default() }, test)
    }

    /// `attach` with options (the name is the test's own).
    pub fn attach_with(device: &Path, options: TrackerOptions, test: &str) -> Self {
        require_root();
        let options = TrackerOptions { name: Some(tracker_name(test)), ..options };
        let tracker = Tracker::attach_with(device, &options)
            .unwrap_or_else(|e| panic!("attaching the tracker to {}: {e}", device.display()));
        let marked = bitvec![u64, Lsb0; 0; tracker.geometry().extent_count() as usize];
        Self { tracker: Some(tracker), marked }
    }

    pub fn tracker(&mut self) -> &mut Tracker {
        self.tracker.as_mut().expect("tracker present until drop")
    }

    pub fn geometry(&self) -> ExtentGeometry {
        *self.tracker.as_ref().expect("tracker present").geometry()
    }

    /// Drains and records; returns the extents of this drain.
    pub fn drain(&mut self) -> BTreeSet<u64> {
        let mut this_drain = BTreeSet::new();
        let runs: Vec<_> = self.tracker().drain_completed().collect();
        for run in runs {
            self.marked[run.start as usize..run.end as usize].fill(true);
            this_drain.extend(run);
        }
        this_drain
    }

    /// The last drain, once nothing writes any more: also reports the queued writes whose
    /// completion the kernel never traced (the engine's safety net, `Tracker::drain_unmatched`:
    /// on a loop device about 1 in 10 000 small O_DIRECT writes has none). Returns how many
    /// extents only the safety net reported.
    pub fn drain_last(&mut self) -> u64 {
        self.drain();
        let before = self.tracker().counters().unmatched_writes;
        let runs: Vec<_> = self.tracker().drain_unmatched().collect();
        for run in runs {
            self.marked[run.start as usize..run.end as usize].fill(true);
        }
        self.tracker().counters().unmatched_writes - before
    }

    /// Forgets what was drained so far (marks made by setup, such as mkfs).
    pub fn reset(&mut self) {
        self.drain();
        self.marked.fill(false);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(tracker) = self.tracker.take()
            && let Err(e) = tracker.stop()
        {
            eprintln!("unpinning a test tracker: {e}");
        }
    }
}

/// What a test wrote, as extents of the tracked device.
pub struct Written {
    geometry: ExtentGeometry,
    pub extents: BitVec<u64, Lsb0>,
}

impl Written {
    pub fn new(geometry: ExtentGeometry) -> Self {
        Self { geometry, extents: bitvec![u64, Lsb0; 0; geometry.extent_count() as usize] }
    }

    /// Records that bytes `[offset, offset + len)` of the device were written.
    pub fn bytes(&mut self, offset_bytes: u64, len_bytes: u64) {
        let span = self.geometry.span_of_bytes(offset_bytes, len_bytes).expect("write inside the device");
        self.extents[span.first as usize..=span.last as usize].fill(true);
    }
}

/// The exactness check: every written extent is marked, and marks outside the written set are
/// fewer than `spurious_max_percent` of all marks. Returns (written, marked, spurious).
pub fn assert_exact(
    what: &str,
    written: &BitSlice<u64, Lsb0>,
    marked: &BitSlice<u64, Lsb0>,
    spurious_max_percent: f64,
) -> (usize, usize, usize) {
    assert_eq!(written.len(), marked.len());
    let missed: Vec<usize> = written.iter_ones().filter(|&e| !marked[e]).collect();
    let spurious = marked.iter_ones().filter(|&e| !written[e]).count();
    let (n_written, n_marked) = (written.count_ones(), marked.count_ones());
    eprintln!(
        "{what}: written {n_written} extents, marked {n_marked}, missed {}, spurious {spurious}",
        missed.len()
    );
    assert!(n_written > 0, "{what}: the test wrote nothing");
    assert!(
        missed.is_empty(),
        "{what}: {} written extents were not marked, first {:?}",
        missed.len(),
        &missed[..missed.len().min(16)]
    );
    let percent = 100.0 * spurious as f64 / n_marked as f64;
    assert!(
        percent < spurious_max_percent,
        "{what}: {spurious} of {n_marked} marks ({percent:.2}%) are outside the written set"
    );
    (n_written, n_marked, spurious)
}

/// The whole device, read with O_DIRECT.
pub fn read_image(device: &Path) -> Vec<u8> {
    let mut image = Vec::new();
    read_device_direct(device, |chunk| image.extend_from_slice(chunk))
        .unwrap_or_else(|e| panic!("reading {}: {e}", device.display()));
    image
}

/// The extents whose bytes differ between two images of the device.
pub fn differing_extents(geometry: &ExtentGeometry, before: &[u8], after: &[u8]) -> BitVec<u64, Lsb0> {
    assert_eq!(before.len(), after.len());
    let extent_bytes = geometry.extent_bytes() as usize;
    before.chunks(extent_bytes).zip(after.chunks(extent_bytes)).map(|(a, b)| a != b).collect()
}

/// A deterministic xorshift generator, so a failing test can be rerun with the same writes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A mount that unmounts (lazily, if busy) on drop.
pub struct Mount {
    pub dir: std::path::PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(device: &Path, options: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "replicator-mnt-{}-{}",
            std::process::id(),
            NEXT_TRACKER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating a mount point");
        let (dev, mnt) = (device.to_str().expect("utf-8"), dir.to_str().expect("utf-8"));
        run_command("mount", &["-o", options, dev, mnt]).expect("mounting the test filesystem");
        Self { dir, mounted: true }
    }

    pub fn unmount(&mut self) {
        run_command("umount", &[self.dir.to_str().expect("utf-8")]).expect("unmounting the test filesystem");
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run_command("umount", &["-l", self.dir.to_str().unwrap_or_default()]);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs `f` on a thread that has entered network namespace `netns`.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the namespace");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// An HTTP/1.0 GET of `path` at `addr` from inside `netns`; returns the body (panics unless 200).
pub fn http_get(netns: &str, addr: &str, path: &str) -> String {
    try_http_get(netns, addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// Like `http_get`, with the failure as an error (a server that is still starting).
pub fn try_http_get(netns: &str, addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let (addr, path) = (addr.to_owned(), path.to_owned());
    in_netns(netns, move || {
        let mut stream =
            std::net::TcpStream::connect(&addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
        if !(response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")) {
            return Err(response);
        }
        Ok(response.split_once("\r\n\r\n").map_or(response.clone(), |(_, body)| body.to_owned()))
    })
}
