//! The mirror as the seed defines it, on the real kernel: a mirror made with `create`, its
//! database on every member, secondaries added and removed at run time, the mirror's states
//! and the operations that move them, each refusal the seed asks for.

use std::time::{Duration, Instant};

use replicator::mirror::MirrorDb;
use replicator::model::ImageState;
use replicator::testbed::Process;
use replicator_tests::*;

const DEVICE_BYTES: u64 = 128 * MIB;

fn lab(label: &str, secondaries: usize) -> Lab {
    require_root();
    Lab::new(&replicator_bin(), label, secondaries, DEVICE_BYTES).expect("lab")
}

fn ok(lab: &Lab, args: &[&str]) -> String {
    lab.operate(args).unwrap_or_else(|e| panic!("replicator {args:?}: {e}\n{}", lab.logs()))
}

fn refused(lab: &Lab, args: &[&str], because: &str) {
    let error = lab.operate(args).expect_err(&format!("replicator {args:?} must be refused")).to_string();
    assert!(error.contains(because), "replicator {args:?} refused, but not because {because:?}: {error}");
    eprintln!("refused as it should be: replicator {args:?}: {error}");
}

fn until(lab: &Lab, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = lab.status()
            && check(&status)
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nstatus: {:?}\n{}",
            lab.status(),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mirror_state(status: &serde_json::Value) -> &str {
    status["mirror"]["state"].as_str().unwrap_or("")
}

fn create(lab: &Lab, extra: &[&str]) {
    let device = lab.primary_device.path.to_str().unwrap().to_owned();
    let state = lab.state_dir("p").to_str().unwrap().to_owned();
    let mut args = vec!["create", "vol1", "--device", &device, "--state-dir", &state, "--image-name", "p"];
    args.extend_from_slice(extra);
    run_command(lab.binary.to_str().unwrap(), &args).unwrap_or_else(|e| panic!("create: {e}"));
}

fn db(lab: &Lab, member: &str) -> MirrorDb {
    MirrorDb::load(&lab.state_dir(member)).expect("a readable database").expect("a database")
}

/// The `status` table a person reads.
fn status_table(lab: &Lab) -> String {
    let table = lab.operate_text(&["status"]).unwrap_or_else(|e| panic!("status: {e}\n{}", lab.logs()));
    eprintln!("{table}");
    table
}

/// Every field of `status --json` (the top level, the mirror, its images, the secondaries) is
/// named in the schema paragraph of the operator's guide: the schema is stable, so it is
/// written down.
fn every_status_field_is_documented(lab: &Lab) {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operating.md"))
        .expect("docs/operating.md");
    let start = guide.find("**`status --json`**").expect("the schema paragraph");
    let schema = &guide[start..start + guide[start..].find("\n\n").expect("its end")];
    let status: serde_json::Value = serde_json::from_str(&ok(lab, &["status"])).expect("JSON");
    let objects = [&status, &status["mirror"], &status["mirror"]["images"][0], &status["secondaries"][0]];
    for object in objects {
        for key in object.as_object().expect("an object").keys() {
            let named = schema.contains(&format!("`{key}`")) || schema.contains(&format!("`{key}[]`"));
            assert!(named, "status --json field {key:?} is not in docs/operating.md's schema");
        }
    }
}

/// With the socket opened to everyone by hand, a user other than root (nobody, through
/// `setpriv`) is still refused: the primary checks the caller's uid on each connection.
fn another_user_is_refused_whatever_the_mode(lab: &Lab, socket: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&lab.binary)
        .args(["status", "--state-dir"])
        .arg(lab.state_dir("p"))
        .output()
        .expect("setpriv (package util-linux)");
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "uid 65534 was answered: {}", String::from_utf8_lossy(&output.stdout));
    assert!(stderr.contains("uid 65534 may not operate"), "refused, but not by the uid check: {stderr}");
}

/// `promote` of s1 as the primary's database records it while s1 is gone (UNSYNCHRONIZED),
/// on a copy of that database: refused, saying why.
fn promote_of_an_unsynchronized_image_is_refused(lab: &Lab) {
    until(lab, "s1 UNSYNCHRONIZED in the database", |_| {
        db(lab, "p").images.iter().any(|i| i.name == "s1" && i.state == ImageState::Unsynchronized)
    });
    let scratch = lab.dir.join("promote-s1");
    std::fs::create_dir_all(&scratch).expect("scratch state directory");
    db(lab, "p").store(&scratch).expect("a copy of the database");
    let refused = run_command(
        lab.binary.to_str().unwrap(),
        &[
            "promote",
            "--device",
            lab.secondary_devices[1].path.to_str().unwrap(),
            "--state-dir",
            scratch.to_str().unwrap(),
            "--image",
            "s1",
            "--old-primary-address",
            "10.0.0.1:7788",
        ],
    );
    let error = refused.expect_err("promote of an UNSYNCHRONIZED image is refused").to_string();
    assert!(error.contains("Unsynchronized") && error.contains("no copy of the primary"), "{error}");
}

/// 1. The whole lifecycle from `create` to `destroy`, every refusal tried.
#[test]
fn lifecycle_from_create_to_destroy_with_every_refusal() {
    let mut lab = lab("life", 2);
    let s0 = lab.start_secondary(0, &[]).expect("s0");
    let _ = s0;
    let s1 = lab.start_secondary(1, &[]).expect("s1");
    create(&lab, &["--minimum-images", "1"]);
    let again = run_command(
        lab.binary.to_str().unwrap(),
        &[
            "create",
            "vol1",
            "--device",
            lab.primary_device.path.to_str().unwrap(),
            "--state-dir",
            lab.state_dir("p").to_str().unwrap(),
        ],
    );
    assert!(again.expect_err("a second create is refused").to_string().contains("already exists"));
    let primary = lab
        .start_primary_from_db(&["--sync-rate", "0", "--checkpoint-ms", "200", "--timeout-ms", "2000"])
        .expect("primary");
    until(&lab, "the primary's status", |s| mirror_state(s) == "ACTIVE");

    let (a0, a1) = (lab.secondary_addrs[0].to_string(), lab.secondary_addrs[1].to_string());
    ok(&lab, &["add-secondary", &format!("s0={a0}")]);
    refused(&lab, &["add-secondary", &format!("s0={a1}")], "already has an image named s0");
    ok(&lab, &["add-secondary", &format!("s1={a1}"), "--synchronized"]);
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let table = status_table(&lab);
    assert!(table.contains("mirror vol1") && table.contains("ACTIVE"), "{table}");
    for name in ["s0", "s1"] {
        assert!(table.lines().any(|l| l.starts_with(name) && l.contains(" SYNCHRONIZED ")), "{table}");
    }
    every_status_field_is_documented(&lab);
    let socket = lab.state_dir("p").join(replicator::control::SOCKET_FILE);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).expect("socket").permissions());
    assert_eq!(mode & 0o777, 0o600, "the control socket is root's only");
    another_user_is_refused_whatever_the_mode(&lab, &socket);
    // An image of another size is refused at its first contact, naming both sizes.
    let small = LoopDevice::create("life-small", DEVICE_BYTES / 2).expect("a smaller device");
    let mut command = lab.secondary_ns[1].command(&lab.binary);
    command.arg("secondary").arg("--device").arg(&small.path).args([
        "--listen",
        "0.0.0.0:7790",
        "--key-file",
    ]);
    command.arg(&lab.key_file).arg("--state-dir").arg(lab.dir.join("small"));
    lab.processes.push(
        Process::spawn("small secondary", command, lab.dir.join("small.log")).expect("small secondary"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let small_addr = format!("{}:7790", lab.secondary_addrs[1].ip());
    refused(&lab, &["add-secondary", &format!("small={small_addr}")], "image size");

    // `primary` on a secondary's state directory (which holds the database too) is refused.
    let wrong_host = run_command(
        lab.binary.to_str().unwrap(),
        &[
            "primary",
            "--key-file",
            lab.key_file.to_str().unwrap(),
            "--state-dir",
            lab.state_dir("s0").to_str().unwrap(),
        ],
    );
    let error = wrong_host.expect_err("primary on a secondary's state directory").to_string();
    assert!(error.contains("this is secondary s0"), "{error}");

    // Every member holds the database.
    let primary_db = db(&lab, "p");
    assert_eq!(primary_db.secondaries().count(), 2);
    for member in ["s0", "s1"] {
        let copy = until(&lab, "the database to reach the secondaries", |_| {
            MirrorDb::load(&lab.state_dir(member))
                .ok()
                .flatten()
                .is_some_and(|d| d.revision == db(&lab, "p").revision)
        });
        let _ = copy;
        assert_eq!(db(&lab, member).id, primary_db.id, "{member} holds this mirror's database");
    }

    // Refusals while a resync runs (a full sync of s0, slowed down).
    ok(&lab, &["set", "sync-rate=1MiB", "--secondary", "s0"]);
    ok(&lab, &["sync", "s0"]);
    until(&lab, "s0 SYNCHRONIZING", |s| s["secondaries"][0]["state"] == "SYNCHRONIZING");
    // Its line shows a progress bar, then (once the rate is sampled) the rate and time left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = status_table(&lab);
        let line = table.lines().find(|l| l.starts_with("s0")).unwrap_or("").to_owned();
        assert!(line.contains("SYNCHRONIZING") && line.contains("] "), "{table}");
        if line.contains("/s ") && line.contains(" s left") {
            break;
        }
        assert!(Instant::now() < deadline, "no rate and time left in s0's line: {table}");
        std::thread::sleep(Duration::from_millis(500));
    }
    refused(&lab, &["deactivate"], "SYNCHRONIZING");
    refused(&lab, &["remove-secondary", "s0"], "SYNCHRONIZING");
    ok(&lab, &["deactivate", "--force"]);
    until(&lab, "INACTIVE, forced during a resync", |s| mirror_state(s) == "INACTIVE");
    ok(&lab, &["activate"]);
    ok(&lab, &["set", "sync-rate=0", "--secondary", "s0"]);
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    until(&lab, "ACTIVE after the forced deactivation", |s| mirror_state(s) == "ACTIVE");
    // Refusals while running.
    let destroy = run_command(
        lab.binary.to_str().unwrap(),
        &["destroy", "--state-dir", lab.state_dir("p").to_str().unwrap()],
    );
    assert!(destroy.expect_err("destroy while running is refused").to_string().contains("running"));
    refused(&lab, &["activate"], "already ACTIVE");

    // INACTIVE keeps writes in the fracture logs; ACTIVE again resyncs them.
    let frozen = hash_device(&lab.secondary_devices[0].path).expect("hash");
    ok(&lab, &["deactivate"]);
    until(&lab, "INACTIVE", |s| mirror_state(s) == "INACTIVE");
    for i in 0..50u64 {
        write_direct(&lab.primary_device.path, i * 7 * 65536, 65536, 0x33).expect("write");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        hash_device(&lab.secondary_devices[0].path).expect("hash"),
        frozen,
        "nothing shipped while INACTIVE"
    );
    ok(&lab, &["activate"]);
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    until(&lab, "ACTIVE", |s| mirror_state(s) == "ACTIVE");
    let hashes = lab.hashes().expect("hashes");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());

    // `verify s0` finds an extent changed behind the replicator's back and ships only it.
    write_direct(&lab.secondary_devices[0].path, 5 * 65536, 65536, 0x99).expect("a write on s0");
    let before = lab.status().expect("status")["secondaries"][0]["resync_bytes"].as_u64().unwrap_or(0);
    ok(&lab, &["verify", "s0"]);
    let status = until(&lab, "the verify of s0 to ship the differing extent and finish", |s| {
        let p = &s["secondaries"][0];
        p["resync_bytes"].as_u64() > Some(before)
            && p["verifying"] == false
            && p["state"] == "SYNCHRONIZED"
            && p["in_sync"] == true
    });
    let shipped = status["secondaries"][0]["resync_bytes"].as_u64().unwrap_or(0) - before;
    assert!(shipped > 0 && shipped <= 2 * 65536, "verify shipped {shipped} bytes for one differing extent");
    let hashes = lab.hashes().expect("hashes");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ after verify: {hashes:?}\n{}", lab.logs());

    // Minimum images: 3 of 3 needed; losing s1 is ATTENTION; its return clears it (automatic).
    refused(&lab, &["set", "minimum-images=4"], "1 to 3");
    ok(&lab, &["set", "minimum-images=3"]);
    lab.processes[s1].kill();
    let status = until(&lab, "ATTENTION", |s| mirror_state(s) == "ATTENTION");
    assert!(status["mirror"]["state_cause"].as_str().unwrap_or("").contains("minimum 3"), "{status}");
    promote_of_an_unsynchronized_image_is_refused(&lab);
    let s1 = lab.start_secondary(1, &[]).expect("s1 again");
    until(&lab, "ACTIVE again", |s| mirror_state(s) == "ACTIVE");
    ok(&lab, &["set", "minimum-images=1"]);

    // Maximum missing images 0 under the manual activation policy: losing s1 is ATTENTION,
    // and it stays so after s1 is back, until `activate`.
    ok(&lab, &["set", "maximum-missing-images=0", "activation-policy=manual"]);
    lab.processes[s1].kill();
    let status = until(&lab, "ATTENTION, one missing", |s| mirror_state(s) == "ATTENTION");
    let cause = status["mirror"]["state_cause"].as_str().unwrap_or("");
    assert!(cause.contains("over the maximum of 0"), "{status}");
    lab.start_secondary(1, &[]).expect("s1 again");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let status = until(&lab, "the manual policy's cause", |s| {
        s["mirror"]["state_cause"].as_str().unwrap_or("").contains("activation policy manual")
    });
    assert_eq!(mirror_state(&status), "ATTENTION", "{status}");
    ok(&lab, &["activate"]);
    until(&lab, "ACTIVE after activate", |s| mirror_state(s) == "ACTIVE");
    ok(&lab, &["set", "maximum-missing-images=8", "activation-policy=automatic"]);

    // Destroy is refused while secondaries remain (the primary stopped for it, then back).
    assert!(lab.processes[primary].stop(), "the primary stops cleanly\n{}", lab.logs());
    let destroy = run_command(
        lab.binary.to_str().unwrap(),
        &["destroy", "--state-dir", lab.state_dir("p").to_str().unwrap()],
    );
    assert!(
        destroy
            .expect_err("destroy with secondaries is refused")
            .to_string()
            .contains("still has secondaries")
    );
    let primary = lab
        .start_primary_from_db(&["--sync-rate", "0", "--checkpoint-ms", "200", "--timeout-ms", "2000"])
        .expect("primary again");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    // Remove both; then destroy, once stopped.
    ok(&lab, &["remove-secondary", "s1"]);
    refused(&lab, &["remove-secondary", "s1"], "no secondary named \"s1\"");
    // A write after the removal leaves the intent log once s0 has it and it stays quiet: the
    // removed secondary's slot keeps nothing dirty.
    replicator::testbed::write_direct(&lab.primary_device.path, 0, 65536, 0x3c).expect("a write");
    until(&lab, "the write in the intent log", |s| s["intent_log_extents"].as_u64() > Some(0));
    until(&lab, "the intent log to empty with s1 removed", |s| s["intent_log_extents"] == 0);
    // s0 removed in the middle of a full sync: refused gracefully, done with --force.
    ok(&lab, &["set", "sync-rate=1MiB", "--secondary", "s0"]);
    ok(&lab, &["sync", "s0"]);
    until(&lab, "s0 SYNCHRONIZING again", |s| s["secondaries"][0]["state"] == "SYNCHRONIZING");
    refused(&lab, &["remove-secondary", "s0"], "SYNCHRONIZING");
    ok(&lab, &["remove-secondary", "s0", "--force"]);
    assert_eq!(db(&lab, "p").secondaries().count(), 0);
    assert!(lab.processes[primary].stop(), "the primary stops cleanly\n{}", lab.logs());
    run_command(
        lab.binary.to_str().unwrap(),
        &["destroy", "--state-dir", lab.state_dir("p").to_str().unwrap()],
    )
    .unwrap_or_else(|e| panic!("destroy: {e}"));
    assert!(MirrorDb::load(&lab.state_dir("p")).expect("readable").is_none(), "the database is gone");
}

/// 2. A database change made while a secondary is unreachable reaches it when it returns.
#[test]
fn database_change_reaches_a_secondary_when_it_returns() {
    let mut lab = lab("dbprop", 2);
    lab.start_secondary(0, &[]).expect("s0");
    let s1 = lab.start_secondary(1, &[]).expect("s1");
    create(&lab, &[]);
    lab.start_primary_from_db(&["--sync-rate", "0", "--timeout-ms", "2000"]).expect("primary");
    until(&lab, "the primary's status", |s| mirror_state(s) == "ACTIVE");
    ok(&lab, &["add-secondary", &format!("s0={}", lab.secondary_addrs[0]), "--synchronized"]);
    ok(&lab, &["add-secondary", &format!("s1={}", lab.secondary_addrs[1]), "--synchronized"]);
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let before = db(&lab, "s1").revision;
    lab.processes[s1].kill();
    until(&lab, "s1 unreachable", |s| s["secondaries"][1]["connected"] == false);
    ok(&lab, &["set", "sync-rate=50MiB", "--secondary", "s0"]);
    let revision = db(&lab, "p").revision;
    assert!(revision > before);
    assert_eq!(db(&lab, "s0").revision, revision, "the reachable secondary has the change");
    assert_eq!(db(&lab, "s1").revision, before, "the unreachable one does not, yet");
    assert!(!db(&lab, "p").images.iter().find(|i| i.name == "s1").expect("s1").reachable);
    lab.start_secondary(1, &[]).expect("s1 again");
    until(&lab, "s1 to receive the database", |_| db(&lab, "s1").revision == revision);
    let s0 = db(&lab, "s1").images.iter().find(|i| i.name == "s0").expect("s0 record").sync_rate_bytes_per_s;
    assert_eq!(s0, 50 << 20, "s1 holds the change made while it was away");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    // Its return changes its record two or three times within a few round trips (reachable,
    // SYNCHRONIZING, SYNCHRONIZED), faster than s1 stores and acknowledges each copy; the last
    // copy must reach it all the same, since `promote` on s1 trusts what it says.
    until(&lab, "s1's copy to say it is SYNCHRONIZED and reachable", |_| {
        db(&lab, "s1")
            .images
            .iter()
            .any(|i| i.name == "s1" && i.state == ImageState::Synchronized && i.reachable)
    });
    let hashes = lab.hashes().expect("hashing the images");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}
