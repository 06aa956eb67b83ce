//! Test 2: buffered writes with fsync, and a real filesystem (ext4: mkfs, mount, write and
//! delete files, sync, unmount). Ground truth for the filesystem is a byte comparison: every
//! extent whose bytes differ between the images before and after must be marked.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;

use replicator_tests::*;

#[test]
fn buffered_writes_with_fsync() {
    require_root();
    let device = LoopDevice::create("buffered", 128 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, 64 * KIB, "buffered");
    recorder.reset();
    let mut written = Written::new(recorder.geometry());
    let file = OpenOptions::new().write(true).open(&device.path).expect("opening the loop device");
    let mut rng = Rng::new(0xb0ff_e4ed);
    for i in 0..200u64 {
        let len = 1 + rng.below(if i % 20 == 0 { 2 * MIB } else { 20 * KIB });
        let offset = rng.below(128 * MIB - len);
        file.write_all_at(&vec![(i % 200 + 7) as u8; len as usize], offset).expect("buffered write");
        // Writeback is by page: a write of a few bytes rewrites its whole page.
        let page_start = offset / 4096 * 4096;
        let page_end = (offset + len).div_ceil(4096) * 4096;
        written.bytes(page_start, page_end - page_start);
        if i % 25 == 24 {
            file.sync_all().expect("fsync");
            recorder.drain();
        }
    }
    file.sync_all().expect("fsync");
    recorder.drain();
    assert_exact("buffered writes + fsync", &written.extents, &recorder.marked, 1.0);
}

#[test]
fn ext4_workload_marks_every_changed_extent() {
    require_root();
    let device = LoopDevice::create("ext4", 256 * MIB).expect("creating a loop device");
    let dev = device.path.to_str().expect("utf-8");
    // No lazy init: the kernel would otherwise zero inode tables in the background after mount.
    run_command("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev])
        .expect("mkfs.ext4 (package e2fsprogs)");
    let mut recorder = Recorder::attach(&device.path, 64 * KIB, "ext4");
    recorder.reset();
    let before = read_image(&device.path);

    let mut mount = Mount::new(&device.path, "rw");
    let mut rng = Rng::new(0xe474);
    for i in 0..60u64 {
        let path = mount.dir.join(format!("file-{i}"));
        let mut file = std::fs::File::create(&path).expect("creating a file");
        let len = 1 + rng.below(if i % 10 == 0 { 8 * MIB } else { 200 * KIB });
        file.write_all(&vec![(i + 1) as u8; len as usize]).expect("writing a file");
        if i % 3 == 0 {
            file.sync_all().expect("fsync");
        }
    }
    for i in (0..60).step_by(4) {
        std::fs::remove_file(mount.dir.join(format!("file-{i}"))).expect("deleting a file");
    }
    std::fs::create_dir(mount.dir.join("dir")).expect("mkdir");
    run_command("sync", &[]).expect("sync");
    recorder.drain();
    mount.unmount();
    recorder.drain();

    let after = read_image(&device.path);
    let differing = differing_extents(&recorder.geometry(), &before, &after);
    // Spurious here means "written with the bytes that were already there" (a superblock or
    // bitmap rewritten unchanged): legitimate writes, so the bound is loose.
    assert_exact("ext4 workload vs byte diff", &differing, &recorder.marked, 25.0);
}
