//! Test 5: zram, a bio-based device: no requests, so completions come from `block_bio_complete`.

use replicator_tests::*;

#[test]
fn zram_writes_and_discards_are_exact() {
    require_root();
    let device = ZramDevice::create(128 * MIB).expect("creating a zram device");
    let mut recorder = Recorder::attach(&device.path, 64 * KIB, "zram");
    recorder.reset();
    let mut written = Written::new(recorder.geometry());
    let mut rng = Rng::new(0x2a4);
    for i in 0..300u64 {
        // zram's logical block is 4 KiB: O_DIRECT writes are multiples of it.
        let len = 4096 * (1 + rng.below(if i % 15 == 0 { 512 } else { 8 }));
        let offset = 4096 * rng.below((128 * MIB - len) / 4096);
        write_direct(&device.path, offset, len as usize, (i % 200 + 3) as u8)
            .expect("O_DIRECT write to zram");
        written.bytes(offset, len);
        if i % 30 == 0 {
            recorder.drain();
        }
    }
    let dev = device.path.to_str().expect("utf-8");
    run_command("blkdiscard", &["-o", &(100 * MIB).to_string(), "-l", &(2 * MIB).to_string(), dev])
        .expect("blkdiscard");
    written.bytes(100 * MIB, 2 * MIB);
    recorder.drain();
    assert_exact("zram (bio-based)", &written.extents, &recorder.marked, 1.0);
    let counters = recorder.tracker().counters();
    assert!(
        counters.completed_extents_marked > 0,
        "completions on zram come from block_bio_complete: {counters:?}"
    );
}
