//! The NBD export and the sync write policy, on the real kernel: qemu-io writes through the
//! export on the primary's network namespace, secondaries in their own namespaces over veth.
//! Each test ends with the images hashed equal and the bytes on the wire counted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use replicator_tests::*;

const DEVICE_BYTES: u64 = 64 * MIB;
const FAST: &[&str] =
    &["--sync-rate", "0", "--checkpoint-ms", "200", "--timeout-ms", "2000", "--skip-initial-sync"];

fn socket(lab: &Lab) -> PathBuf {
    lab.dir.join("nbd.sock")
}

/// `qemu-io` against the export with `commands` (each a `-c` argument); returns its output.
fn qemu_io(lab: &Lab, commands: &[String]) -> Result<String, String> {
    let uri = format!("nbd+unix:///?socket={}", socket(lab).display());
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    for command in commands {
        args.extend(["-c".to_owned(), command.clone()]);
    }
    args.push(uri);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_command("qemu-io", &args).map_err(|e| e.to_string())
}

fn wait_for_socket(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket(lab).exists() {
        assert!(Instant::now() < deadline, "the export did not start\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn shipped_bytes(lab: &Lab) -> Vec<u64> {
    let status = lab.status().expect("status");
    status["secondaries"]
        .as_array()
        .expect("secondaries")
        .iter()
        .map(|p| p["shipped_bytes"].as_u64().unwrap_or(0))
        .collect()
}

/// Test 1: every write, 512 B to 4 MiB, is on every secondary when qemu-io gets its reply,
/// reads back through the export, and crosses the wire exactly once.
#[test]
fn sync_writes_are_on_every_secondary_when_acknowledged() {
    require_root();
    let mut lab = Lab::new(&replicator_bin(), "nbdsync", 2, DEVICE_BYTES).expect("lab");
    lab.start_secondary(0, &[]).expect("s0");
    lab.start_secondary(1, &[]).expect("s1");
    let export = format!("nbd+unix:{}", socket(&lab).display());
    let mut args = vec!["--export", &export, "--write-policy", "sync", "--minimum-images", "3"];
    args.extend(FAST);
    lab.start_primary(&args).expect("primary");
    lab.wait_synchronized(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_for_socket(&lab);
    let before = shipped_bytes(&lab);

    let mut written = 0u64;
    let sizes = [512u64, 4096, 12 * 1024, 64 * KIB, 192 * KIB, MIB, 4 * MIB];
    for (i, &len) in sizes.iter().enumerate() {
        let offset = 3 * MIB * i as u64 + 512 * (i as u64 * 7 % 64);
        let pattern = 0x11 * (i as u8 + 1);
        qemu_io(&lab, &[format!("write -P {pattern:#x} {offset} {len}")])
            .unwrap_or_else(|e| panic!("qemu-io write: {e}\n{}", lab.logs()));
        // Acknowledged: each secondary holds the bytes now, with no catch-up in between.
        for (s, device) in lab.secondary_devices.iter().enumerate() {
            let start = offset / 512 * 512;
            let bytes = read_range_direct(&device.path, start, len as usize).expect("reading a secondary");
            assert!(
                bytes.iter().all(|&b| b == pattern),
                "secondary s{s} lacks the {len}-byte write at {offset} when it was acknowledged\n{}",
                lab.logs()
            );
        }
        let out = qemu_io(&lab, &[format!("read -P {pattern:#x} {offset} {len}")])
            .unwrap_or_else(|e| panic!("qemu-io read: {e}\n{}", lab.logs()));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        written += len;
    }
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    std::thread::sleep(Duration::from_millis(1500)); // a few drains and checkpoints
    let after = shipped_bytes(&lab);
    for (s, (before, after)) in before.iter().zip(&after).enumerate() {
        assert_eq!(
            after - before,
            written,
            "secondary s{s}: each export write must cross the wire exactly once\n{}",
            lab.logs()
        );
    }
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
    eprintln!(
        "{written} bytes written through the export, {written} shipped to each secondary; images equal"
    );
}
