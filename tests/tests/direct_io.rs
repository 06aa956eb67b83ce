//! Test 1: O_DIRECT writes of 512 B, 4 KiB, unaligned to extents and of several MiB, including
//! ranges that cross extent boundaries; every written extent marked, almost nothing else.

use replicator_tests::*;

fn direct_writes(extent_bytes: u64) {
    require_root();
    let device = LoopDevice::create("direct", 256 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, extent_bytes, "direct");
    recorder.reset();
    let mut written = Written::new(recorder.geometry());
    let writes: [(u64, u64); 9] = [
        (0, 512),                                                       // one sector at the start
        (extent_bytes - 512, 1024),                                     // straddles the first boundary
        (7 * MIB + 4 * KIB, 4 * KIB),                                   // 4 KiB inside an extent
        (33 * MIB + 3 * 512, 5 * 512),                                  // odd sectors, unaligned to extents
        (64 * MIB - 8 * KIB, 24 * KIB), // crosses a 64 KiB and a 1 MiB boundary
        (100 * MIB, 4 * MIB),           // multi-megabyte, aligned
        (150 * MIB + 512, 9 * MIB + 3 * 512), // multi-megabyte, unaligned both ends
        (200 * MIB + extent_bytes.min(MIB) / 2, extent_bytes.min(MIB)), // one extent over two
        (256 * MIB - 512, 512),         // the last sector
    ];
    for (offset, len) in writes {
        write_direct(&device.path, offset, len as usize, 0x5a).expect("O_DIRECT write");
        written.bytes(offset, len);
        recorder.drain();
    }
    recorder.drain();
    assert_exact(&format!("O_DIRECT, {extent_bytes} B extents"), &written.extents, &recorder.marked, 1.0);
    // The intent bitmap was set at queue time and is never drained: it holds the same extents.
    let intent = recorder.tracker().intent_snapshot();
    assert_exact(&format!("intent, {extent_bytes} B extents"), &written.extents, &intent, 1.0);
    let counters = recorder.tracker().counters();
    assert!(counters.write_events >= writes.len() as u64, "{counters:?}");
    assert_eq!(counters.wide_lost, 0);
}

#[test]
fn direct_writes_64k_extents() {
    direct_writes(64 * KIB);
}

#[test]
fn direct_writes_4k_extents() {
    direct_writes(4 * KIB);
}

#[test]
fn direct_writes_64m_extents() {
    direct_writes(64 * MIB);
}

/// Random O_DIRECT writes, checked against the ground truth of a byte comparison.
#[test]
fn random_direct_writes_match_byte_diff() {
    require_root();
    let device = LoopDevice::create("random", 128 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, 16 * KIB, "random");
    recorder.reset();
    let before = read_image(&device.path);
    let mut rng = Rng::new(0x5eed_0001);
    let mut written = Written::new(recorder.geometry());
    for i in 0..400u64 {
        let len = 512 * (1 + rng.below(if i % 10 == 0 { 4096 } else { 64 }));
        let offset = 512 * rng.below((128 * MIB - len) / 512);
        write_direct(&device.path, offset, len as usize, (i % 250 + 1) as u8).expect("O_DIRECT write");
        written.bytes(offset, len);
        if i % 37 == 0 {
            recorder.drain();
        }
    }
    recorder.drain();
    let after = read_image(&device.path);
    let differing = differing_extents(&recorder.geometry(), &before, &after);
    assert_exact("random writes vs what was written", &written.extents, &recorder.marked, 1.0);
    assert_exact("random writes vs byte diff", &differing, &recorder.marked, 1.0);
}

/// On a 64 GiB device (a sparse file in /dev/shm), with the periodic sweep of every word turned
/// off, the maps' two-level summaries alone lead each drain to the writes: at the edges of
/// bitmap words, of summary words and of top-level words, at the last extent, and a range wider
/// than the program marks inline (it goes through the WIDE ring buffer) across a top-level edge.
#[test]
fn summaries_alone_find_writes_anywhere_on_a_large_device() {
    const DEVICE_BYTES: u64 = 64 << 30;
    const EXTENT_BYTES: u64 = 64 * KIB;
    require_root();
    let device = LoopDevice::create("summaries", DEVICE_BYTES).expect("creating a loop device");
    let options = TrackerOptions { extent_bytes: EXTENT_BYTES, sweep_interval: None, ..Default::default() };
    let mut recorder = Recorder::attach_with(&device.path, options, "summaries");
    recorder.reset();
    let mut written = Written::new(recorder.geometry());
    // Bitmap words hold 64 extents, summary words 64 words, top words 64 summary words.
    let per_top_word = 64 * 64 * 64;
    let last = DEVICE_BYTES / EXTENT_BYTES - 1;
    let extents = [0, 63, 64, 4095, 4096, per_top_word - 1, per_top_word, 3 * per_top_word + 777, last];
    for extent in extents {
        let offset = extent * EXTENT_BYTES + 4 * KIB;
        write_direct(&device.path, offset, 4096, 0x5a).expect("O_DIRECT write");
        written.bytes(offset, 4096);
        let drained = recorder.drain();
        assert!(drained.contains(&extent), "extent {extent} written, drained {drained:?}");
    }
    let wide_offset = 2 * per_top_word * EXTENT_BYTES - 40 * MIB;
    write_direct(&device.path, wide_offset, (80 * MIB) as usize, 0xa5).expect("O_DIRECT write");
    written.bytes(wide_offset, 80 * MIB);
    recorder.drain();
    assert_exact("summaries alone, 64 GiB", &written.extents, &recorder.marked, 1.0);
    let counters = recorder.tracker().counters();
    assert_eq!(counters.wide_lost, 0);
    assert_eq!(counters.unmatched_writes, 0, "every queued write's completion was found");
}
