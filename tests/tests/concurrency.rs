//! Tests 6 and 8: concurrent writers on both cores lose no marks, and a drain racing a writer
//! that hammers one extent never hides that extent's last write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use replicator_tests::*;

#[test]
fn concurrent_writers_lose_no_marks() {
    require_root();
    let device = LoopDevice::create("concurrent", 256 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, 64 * KIB, "concurrent");
    recorder.reset();
    let written = Arc::new(Mutex::new(Written::new(recorder.geometry())));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (path, written) = (device.path.clone(), Arc::clone(&written));
            std::thread::spawn(move || {
                let mut rng = Rng::new(0xc0c0 + w);
                for _ in 0..3000 {
                    let len = 4096 * (1 + rng.below(4));
                    let offset = 4096 * rng.below((256 * MIB - len) / 4096);
                    write_direct(&path, offset, len as usize, w as u8 + 1).expect("O_DIRECT write");
                    written.lock().expect("written lock").bytes(offset, len);
                }
            })
        })
        .collect();
    let mut drains = 0u64;
    while !writers.iter().all(|w| w.is_finished()) {
        recorder.drain();
        drains += 1;
    }
    for writer in writers {
        writer.join().expect("writer thread");
    }
    let untraced = recorder.drain_last();
    eprintln!("{drains} drains raced the writers; {untraced} completions untraced (the safety net's)");
    let written = written.lock().expect("written lock");
    assert_exact("two concurrent writers", &written.extents, &recorder.marked, 1.0);
}

#[test]
fn drain_racing_a_hot_extent_reports_the_last_write() {
    require_root();
    const EXTENT: u64 = 77;
    let device = LoopDevice::create("hot", 64 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, 64 * KIB, "hot");
    recorder.reset();
    let stop = Arc::new(AtomicBool::new(false));
    // When the writer submitted its last write. The kernel traces that write's completion
    // before pwrite returns, so a drain may legitimately report it while the writer is still
    // inside the syscall: the drain that counts is one that started after the submission.
    let last_submitted = Arc::new(Mutex::new(None::<Instant>));
    let writer = {
        let (path, stop, last) = (device.path.clone(), Arc::clone(&stop), Arc::clone(&last_submitted));
        std::thread::spawn(move || {
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                *last.lock().expect("lock") = Some(Instant::now());
                write_direct(&path, EXTENT * 64 * KIB + (writes % 16) * 4096, 4096, writes as u8)
                    .expect("write");
                writes += 1;
            }
            writes
        })
    };
    // Each drain: when it started, and whether it reported the hot extent.
    let mut drains: Vec<(Instant, bool)> = Vec::new();
    let deadline = Instant::now() + std::time::Duration::from_millis(1500);
    while Instant::now() < deadline {
        let started = Instant::now();
        let extents = recorder.drain();
        assert!(extents.iter().all(|&e| e == EXTENT), "only the hot extent is written: {extents:?}");
        drains.push((started, extents.contains(&EXTENT)));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer thread");
    let started = Instant::now();
    let extents = recorder.drain();
    drains.push((started, extents.contains(&EXTENT)));

    let last = last_submitted.lock().expect("lock").expect("the writer wrote");
    // Writes are serial, so every earlier write completed before `last`; a drain started after
    // it that reports the extent reports the last write (or an earlier one it also covers).
    let reported_after_last = drains.iter().any(|&(started, hit)| started >= last && hit);
    let hits = drains.iter().filter(|d| d.1).count();
    eprintln!("{writes} writes, {} drains, {hits} reported the extent", drains.len());
    assert!(writes > 100 && hits > 1, "the race did not happen: {writes} writes, {hits} hits");
    assert!(reported_after_last, "no drain started after the last write's submission reported its extent");
}
