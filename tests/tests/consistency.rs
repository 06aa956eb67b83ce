//! Consistency points on the real kernel: ext4 on the primary, frozen with `--freeze` while
//! the point is taken; a copy of the secondary image taken right after must be a clean
//! filesystem holding every file written before the call.

use std::time::Duration;

use replicator::consistency::ConsistencyRecord;
use replicator_tests::*;

const DEVICE_BYTES: u64 = 256 * MIB;

#[test]
fn consistency_point_with_freeze_gives_a_clean_filesystem_on_the_secondary() {
    require_root();
    let mut lab = Lab::new(&replicator_bin(), "point", 1, DEVICE_BYTES).expect("lab");
    lab.start_secondary(0, &[]).expect("secondary");
    lab.start_primary(&["--sync-rate", "0"]).expect("primary");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    let primary = lab.primary_device.path.clone();
    run_command("mkfs.ext4", &["-q", "-F", primary.to_str().unwrap()])
        .expect("mkfs.ext4 (package e2fsprogs)");
    let mut mount = Mount::new(&primary, "rw");
    let mut rng = Rng::new(11);
    let mut files = Vec::new();
    for i in 0..40 {
        let len = 4096 + rng.below(300_000) as usize;
        let content: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
        let name = format!("file-{i}");
        std::fs::write(mount.dir.join(&name), &content).expect("writing a file");
        files.push((name, content));
    }
    // No sync: freezing the filesystem flushes it.
    let state = lab.state_dir("p");
    let answer = run_command(
        replicator_bin().to_str().unwrap(),
        &[
            "checkpoint",
            "--freeze",
            mount.dir.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--json",
        ],
    )
    .unwrap_or_else(|e| panic!("checkpoint: {e}\n{}", lab.logs()));
    eprintln!("checkpoint answered {answer}");
    // Thawed: the filesystem takes writes again.
    std::fs::write(mount.dir.join("after"), b"written after the point").expect("the filesystem is thawed");

    // A copy of the secondary image taken right after the point.
    let copy = lab.dir.join("secondary-copy.img");
    let mut bytes = Vec::with_capacity(DEVICE_BYTES as usize);
    read_device_direct(&lab.secondary_devices[0].path, |chunk| bytes.extend_from_slice(chunk))
        .expect("reading s0");
    std::fs::write(&copy, &bytes).expect("writing the copy");
    drop(bytes);
    let fsck = std::process::Command::new("e2fsck").args(["-fn"]).arg(&copy).output().expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the secondary's copy: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        lab.logs()
    );
    let copy_device = LoopDevice::over_file(copy).expect("loop over the copy");
    let copy_mount = Mount::new(&copy_device.path, "ro,noload");
    for (name, content) in &files {
        let found =
            std::fs::read(copy_mount.dir.join(name)).unwrap_or_else(|e| panic!("{name} on the copy: {e}"));
        assert!(found == *content, "{name} differs on the secondary's copy");
    }

    let record = ConsistencyRecord::load(&lab.state_dir("s0"))
        .expect("a readable record")
        .expect("the secondary recorded the point");
    let status = lab.status().expect("status");
    assert_eq!(
        status["secondaries"][0]["consistency_point_unix_ms"].as_u64(),
        Some(record.point_unix_ms),
        "{status}"
    );
    assert_eq!(record.image_bytes, DEVICE_BYTES);
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("checkpoint --json answers JSON");
    assert_eq!(answer["generation"].as_u64(), Some(record.generation), "{answer}");
    assert_eq!(status["mirror"]["generation"].as_u64().unwrap_or(1), record.generation, "{status}");

    // The application quiesced by hand (here: frozen), a point, then the secondary cut off
    // before any write: it is CONSISTENT, not merely UNSYNCHRONIZED.
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    run_command("fsfreeze", &["--freeze", mount.dir.to_str().unwrap()]).expect("freeze");
    let point = lab.operate(&["checkpoint"]);
    let fracture = lab.operate(&["fracture", "s0"]);
    run_command("fsfreeze", &["--unfreeze", mount.dir.to_str().unwrap()]).expect("thaw");
    point.unwrap_or_else(|e| panic!("checkpoint: {e}\n{}", lab.logs()));
    fracture.expect("fracture");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.status().is_none_or(|s| s["secondaries"][0]["state"] != "CONSISTENT") {
        assert!(std::time::Instant::now() < deadline, "s0 is not CONSISTENT: {:?}", lab.status());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Refused without a SYNCHRONIZED secondary, and the filesystem is thawed after the refusal.
    let refused = run_command(
        replicator_bin().to_str().unwrap(),
        &["checkpoint", "--freeze", mount.dir.to_str().unwrap(), "--state-dir", state.to_str().unwrap()],
    );
    let error = refused.expect_err("no SYNCHRONIZED secondary: refused").to_string();
    assert!(error.contains("no SYNCHRONIZED secondary"), "{error}");
    std::fs::write(mount.dir.join("after-refusal"), b"thawed").expect("thawed after a refusal");
    // Unmounted (everything on the device) and restored, the secondary catches up with what
    // was written since the point.
    mount.unmount();
    lab.operate(&["restore", "s0"]).expect("restore");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashing the images");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}
