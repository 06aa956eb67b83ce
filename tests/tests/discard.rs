//! Test 3: discard (`blkdiscard`), write-zeroes (`blkdiscard -z`) and `fallocate --punch-hole`
//! on a mounted filesystem: anything that can change data is marked.

use replicator_tests::*;

fn blkdiscard(device: &std::path::Path, args: &[&str], offset: u64, len: u64) {
    let (offset, len) = (offset.to_string(), len.to_string());
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-o", &offset, "-l", &len, device.to_str().expect("utf-8")]);
    run_command("blkdiscard", &all).expect("blkdiscard");
}

#[test]
fn discard_and_write_zeroes_are_marked() {
    require_root();
    let device = LoopDevice::create("discard", 256 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, 64 * KIB, "discard");
    recorder.reset();
    let mut written = Written::new(recorder.geometry());
    for (args, offset, len) in [
        (&[][..], 8 * MIB, MIB),
        (&[][..], 20 * MIB + 4 * KIB, 3 * MIB + 8 * KIB),
        (&["-z"][..], 40 * MIB, 64 * KIB),
        (&["-z"][..], 60 * MIB + 12 * KIB, 2 * MIB),
    ] {
        blkdiscard(&device.path, args, offset, len);
        written.bytes(offset, len);
        recorder.drain();
    }
    assert_exact("blkdiscard and blkdiscard -z", &written.extents, &recorder.marked, 1.0);
}

/// A discard wider than the program sets inline goes through the WIDE ring buffer.
#[test]
fn whole_device_discard_with_small_extents() {
    require_root();
    let device = LoopDevice::create("widediscard", 512 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, 4 * KIB, "widediscard");
    recorder.reset();
    let mut written = Written::new(recorder.geometry());
    run_command("blkdiscard", &[device.path.to_str().expect("utf-8")]).expect("blkdiscard");
    written.bytes(0, 512 * MIB);
    recorder.drain();
    assert_exact("whole-device discard, 4 KiB extents", &written.extents, &recorder.marked, 1.0);
    let counters = recorder.tracker().counters();
    eprintln!("{counters:?}");
    assert!(
        counters.wide_ranges > 0,
        "a 512 MiB discard at 4 KiB extents must take the wide path: {counters:?}"
    );
}

#[test]
fn punch_hole_on_mounted_filesystem_is_marked() {
    require_root();
    let device = LoopDevice::create("punch", 256 * MIB).expect("creating a loop device");
    let dev = device.path.to_str().expect("utf-8");
    run_command("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        .expect("mkfs.ext4");
    let mut mount = Mount::new(&device.path, "discard");
    let file = mount.dir.join("data");
    std::fs::write(&file, vec![0xc3u8; 32 * MIB as usize]).expect("writing a file");
    run_command("sync", &[]).expect("sync");

    let mut recorder = Recorder::attach(&device.path, 64 * KIB, "punch");
    recorder.reset();
    let before = read_image(&device.path);
    let file_str = file.to_str().expect("utf-8");
    for (offset, len) in [(MIB, 2 * MIB), (10 * MIB + 4 * KIB, 4 * MIB), (30 * MIB, 64 * KIB)] {
        let (o, l) = (offset.to_string(), len.to_string());
        run_command("fallocate", &["--punch-hole", "--offset", &o, "--length", &l, file_str])
            .expect("fallocate --punch-hole");
    }
    run_command("sync", &[]).expect("sync");
    mount.unmount();
    recorder.drain();
    let after = read_image(&device.path);
    let differing = differing_extents(&recorder.geometry(), &before, &after);
    // With -o discard the punched blocks are discarded on the device, so their bytes change.
    assert!(differing.count_ones() >= 32, "the punched ranges changed {} extents", differing.count_ones());
    assert_exact("punch-hole on ext4 -o discard vs byte diff", &differing, &recorder.marked, 25.0);
}
