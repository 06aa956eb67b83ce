//! The epochs of consistent cuts, on the real kernel: a write is marked in the epoch it was
//! queued in and in no other; the exempt writer's writes are not marked (the export ships its
//! own in order); discards are marked too; a raised epoch keeps alternating the bitmaps.
//! `wide_ranges_are_marked_in_their_epoch` takes the WIDE ring's path (4 KiB extents).

use replicator_tests::*;

const EXTENT: u64 = 64 * KIB;

fn dd_direct(device: &std::path::Path, extent: u64, count_4k: u64) {
    let dev = device.to_str().expect("utf-8 path");
    run_command(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={dev}"),
            "bs=4096",
            &format!("count={count_4k}"),
            &format!("seek={}", extent * EXTENT / 4096),
            "oflag=direct",
            "status=none",
        ],
    )
    .expect("dd from a child process");
}

fn blkdiscard(device: &std::path::Path, offset: u64, len: u64) {
    let dev = device.to_str().expect("utf-8 path");
    run_command("blkdiscard", &["-o", &offset.to_string(), "-l", &len.to_string(), dev]).expect("blkdiscard");
}

#[test]
fn writes_are_marked_in_the_epoch_they_were_queued_in() {
    require_root();
    let device = LoopDevice::create("epochs", 64 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, EXTENT, "epochs");
    recorder.reset();
    let tracker = recorder.tracker();
    let first = tracker.flip_epoch();
    assert!(!tracker.written_in_epoch(0..1024), "a fresh epoch has no writes");

    dd_direct(&device.path, 7, 1);
    assert!(tracker.written_in_epoch(7..8), "a write of this epoch is marked in it");
    assert!(!tracker.written_in_epoch(0..7) && !tracker.written_in_epoch(8..1024), "only its extent");

    let second = tracker.flip_epoch();
    assert_eq!(second, first + 1);
    assert!(!tracker.written_in_epoch(0..1024), "the previous epoch's write is not in the new one");

    // Two epochs on, the bitmap of the first is reused: it must have been emptied.
    dd_direct(&device.path, 9, 1);
    let third = tracker.flip_epoch();
    assert_eq!(third & 1, first & 1);
    assert!(!tracker.written_in_epoch(0..1024), "the reused bitmap starts empty");

    // A discard of 640 extents (10 words of marks, past EVENT_WORDS_MAX when the extents are
    // 4 KiB; here a whole range the program hands over through WIDE either way).
    blkdiscard(&device.path, 100 * EXTENT, 640 * EXTENT);
    assert!(tracker.written_in_epoch(100..101) && tracker.written_in_epoch(739..740), "a discard");
    assert!(!tracker.written_in_epoch(740..1024) && !tracker.written_in_epoch(12..100));

    // The exempt writer's writes are not marked in epochs.
    tracker.flip_epoch();
    tracker.exempt_writes_of(std::process::id());
    write_direct(&device.path, 3 * EXTENT, 4096, 0xa5).expect("O_DIRECT write");
    assert!(!tracker.written_in_epoch(0..1024), "the exempt writer's write is not an epoch's");
    tracker.exempt_writes_of(0);

    // Raising past a floor keeps the parity alternating, and marks go to the raised epoch.
    let before = tracker.epoch();
    tracker.raise_epoch(before + 10);
    assert!(tracker.epoch() > before + 10 && (tracker.epoch() & 1) != (before & 1));
    tracker.raise_epoch(5);
    assert!(tracker.epoch() > before + 10, "a lower floor leaves the epoch alone");
    dd_direct(&device.path, 11, 1);
    assert!(tracker.written_in_epoch(11..12));
    assert_eq!(tracker.epoch_wait_timeouts(), 0);
}

#[test]
fn wide_ranges_are_marked_in_their_epoch() {
    require_root();
    let device = LoopDevice::create("epochs-wide", 64 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, 4 * KIB, "epochs-wide");
    recorder.reset();
    let tracker = recorder.tracker();
    tracker.flip_epoch();
    let wide_before = tracker.counters().wide_ranges;
    // 8192 extents of 4 KiB: 128 words of marks, past EVENT_WORDS_MAX.
    blkdiscard(&device.path, 4096 * 4 * KIB, 8192 * 4 * KIB);
    assert!(tracker.counters().wide_ranges > wide_before, "the discard took the WIDE path");
    assert!(tracker.written_in_epoch(4096..4097) && tracker.written_in_epoch(12287..12288));
    assert!(!tracker.written_in_epoch(0..4096) && !tracker.written_in_epoch(12288..16384));
    tracker.flip_epoch();
    assert!(!tracker.written_in_epoch(0..16384), "a wide range marks its own epoch only");
}
