//! Promote and failback, and split brain, on the real kernel: a mirror made with `create`, its
//! secondary promoted when the primary is gone, the old primary brought back as a secondary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use replicator::mirror::MirrorDb;
use replicator::testbed::Process;
use replicator_tests::*;

const DEVICE_BYTES: u64 = 128 * MIB;
const EXTENT_BYTES: u64 = 64 * KIB;
const FAST: &[&str] = &["--sync-rate", "0", "--checkpoint-ms", "200", "--timeout-ms", "2000"];

fn lab(label: &str) -> Lab {
    require_root();
    Lab::new(&replicator_bin(), label, 1, DEVICE_BYTES).expect("lab")
}

fn run(lab: &Lab, args: &[&str]) -> String {
    run_command(lab.binary.to_str().unwrap(), args)
        .unwrap_or_else(|e| panic!("replicator {args:?}: {e}\n{}", lab.logs()))
}

fn status_at(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("status.json")).ok()?).ok()
}

fn until(lab: &Lab, dir: &Path, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = status_at(dir)
            && check(&status)
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nstatus: {:?}\n{}",
            status_at(dir),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_extents(device: &Path, first: u64, count: u64, fill: u8) -> u64 {
    for i in 0..count {
        write_direct(device, (first + i * 3) * EXTENT_BYTES, EXTENT_BYTES as usize, fill).expect("write");
    }
    count
}

/// A mirror vol1 with primary p and secondary s0, in sync.
fn mirror(lab: &mut Lab) -> (usize, usize) {
    let s0 = lab.start_secondary(0, &[]).expect("s0");
    let (device, state) =
        (lab.primary_device.path.display().to_string(), lab.state_dir("p").display().to_string());
    run(lab, &["create", "vol1", "--device", &device, "--state-dir", &state, "--image-name", "p"]);
    let primary = lab.start_primary_from_db(FAST).expect("primary");
    until(lab, &lab.state_dir("p"), "the primary", |s| s["mirror"]["state"] == "ACTIVE");
    lab.operate(&["add-secondary", &format!("s0={}", lab.secondary_addrs[0])]).expect("add-secondary");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    (primary, s0)
}

/// The address the old primary listens on as a secondary: its end of the veth.
fn old_primary_address(lab: &Lab) -> String {
    let ip = lab.secondary_addrs[0].ip().to_string();
    format!("{}.1:7788", ip.rsplit_once('.').expect("an IPv4 address").0)
}

/// `replicator promote` for s0, naming the old primary's address.
fn promote_args(lab: &Lab) -> Vec<String> {
    let device = lab.secondary_devices[0].path.display().to_string();
    let state = lab.state_dir("s0").display().to_string();
    [
        "promote",
        "--device",
        &device,
        "--state-dir",
        &state,
        "--old-primary-address",
        &old_primary_address(lab),
    ]
    .map(str::to_owned)
    .to_vec()
}

fn promote_s0(lab: &mut Lab, s0: usize) -> PathBuf {
    assert!(lab.processes[s0].stop(), "s0 stops cleanly");
    let args = promote_args(lab);
    run(lab, &args.iter().map(String::as_str).collect::<Vec<_>>());
    lab.state_dir("s0")
}

fn start_new_primary(lab: &mut Lab, state: &Path) {
    let mut command = lab.secondary_ns[0].command(&lab.binary);
    command.arg("primary").arg("--key-file").arg(&lab.key_file).arg("--state-dir").arg(state).args(FAST);
    lab.processes.push(
        Process::spawn("new primary (s0)", command, lab.dir.join("s0-primary.log")).expect("new primary"),
    );
}

fn start_old_primary_as_secondary(lab: &mut Lab) -> usize {
    let mut command = lab.primary_ns.command(&lab.binary);
    command.arg("secondary").arg("--device").arg(&lab.primary_device.path).args(["--listen", "0.0.0.0:7788"]);
    command.arg("--key-file").arg(&lab.key_file).arg("--state-dir").arg(lab.state_dir("p"));
    let log = lab.dir.join(format!("p-secondary-{}.log", lab.processes.len()));
    lab.processes.push(Process::spawn("old primary as secondary", command, log).expect("old primary"));
    lab.processes.len() - 1
}

fn p_record(status: &serde_json::Value) -> &serde_json::Value {
    status["secondaries"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "p"))
        .unwrap_or(&serde_json::Value::Null)
}

/// Waits until the old primary is SYNCHRONIZED with the new one (state dir `promoted`), then
/// checks the two images hash equal.
fn old_primary_synchronized(lab: &Lab, promoted: &Path, what: &str) -> serde_json::Value {
    let status = until(lab, promoted, "the old primary SYNCHRONIZED with the new one", |s| {
        p_record(s)["state"] == "SYNCHRONIZED"
            && p_record(s)["in_sync"] == true
            && s["mirror"]["state"] == "ACTIVE"
    });
    let (a, b) = (
        hash_device(&lab.primary_device.path).unwrap(),
        hash_device(&lab.secondary_devices[0].path).unwrap(),
    );
    assert_eq!(a, b, "{what}\n{}", lab.logs());
    status
}

/// 4. Promote and failback: write on the primary, cut it off (some writes never reach the
///    secondary), promote the secondary, write there, bring the old primary back: it ends as
///    a secondary with identical bytes, having received only what differs.
#[test]
fn promote_and_failback_without_a_full_copy() {
    let mut lab = lab("failback");
    let (primary, s0) = mirror(&mut lab);
    write_extents(&lab.primary_device.path, 0, 100, 0x11);
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let s0_knows = || {
        MirrorDb::load(&lab.state_dir("s0")).ok().flatten().is_some_and(|db| {
            db.images.iter().any(|i| i.name == "s0" && i.state == replicator::model::ImageState::Synchronized)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s0_knows() {
        assert!(Instant::now() < deadline, "s0 never learned it is SYNCHRONIZED\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500)); // past the intent log's quiet window
    // The link goes, the primary writes a little more and dies before it notices: those
    // writes are in its intent log only.
    let link = lab.primary_ifs[0].clone();
    lab.primary_ns.run(&["link", "set", &link, "down"]).expect("link down");
    let lost = write_extents(&lab.primary_device.path, 1000, 20, 0x22);
    lab.processes[primary].kill();
    let promoted = promote_s0(&mut lab, s0);
    let refused = run_command(
        lab.binary.to_str().unwrap(),
        &[
            "promote",
            "--device",
            lab.secondary_devices[0].path.to_str().unwrap(),
            "--state-dir",
            promoted.to_str().unwrap(),
            "--old-primary-address",
            &old_primary_address(&lab),
        ],
    );
    assert!(refused.is_err(), "a second promote is refused (s0 is no secondary any more)");
    let written = write_extents(&lab.secondary_devices[0].path, 1500, 50, 0x33);
    lab.primary_ns.run(&["link", "set", &link, "up"]).expect("link up");
    start_new_primary(&mut lab, &promoted);
    start_old_primary_as_secondary(&mut lab);
    let status = old_primary_synchronized(&lab, &promoted, "the old primary holds the new primary's bytes");
    let shipped = p_record(&status)["shipped_bytes"].as_u64().unwrap_or(0);
    let bound = 2 * (lost + written) * EXTENT_BYTES;
    eprintln!("failback shipped {} KiB for {} extents written on both sides", shipped / KIB, lost + written);
    assert!(
        shipped > 0 && shipped <= bound,
        "failback shipped {shipped} bytes, bound {bound}\n{}",
        lab.logs()
    );
    assert_eq!(status["mirror"]["generation"], 2, "{status}");
    let logs = lab.logs();
    assert!(logs.contains("failing back"), "{logs}");
    // A consistency point taken by the new primary is recorded at its generation.
    run(&lab, &["checkpoint", "--state-dir", promoted.to_str().unwrap()]);
    let record = replicator::consistency::ConsistencyRecord::load(&lab.state_dir("p"))
        .expect("a readable record")
        .expect("the old primary, now a secondary, recorded the point");
    assert_eq!(record.generation, 2, "{record:?}");
}

/// Extents each side writes while apart in the split-brain tests.
const APART_OLD_PRIMARY: u64 = 40;
const APART_PROMOTED: u64 = 30;

/// Both sides written while apart: the old primary `p` fractures `s0` and writes on, `s0` is
/// promoted and written too. The promoted side meets the old primary (started as a secondary)
/// and must go to ATTENTION naming both generations, with nothing overwritten. Returns the
/// promoted state directory, the hash of the old primary's image when it stopped, and the
/// indexes of the new primary and of the old primary's secondary process.
fn split_brain(lab: &mut Lab) -> (PathBuf, String, usize, usize) {
    let (primary, s0) = mirror(lab);
    std::thread::sleep(Duration::from_millis(1500));
    let link = lab.primary_ifs[0].clone();
    lab.primary_ns.run(&["link", "set", &link, "down"]).expect("link down");
    write_extents(&lab.primary_device.path, 0, APART_OLD_PRIMARY / 2, 0x44);
    until(lab, &lab.state_dir("p"), "the old primary to fracture s0", |s| {
        s["secondaries"][0]["fractured"] == true
    });
    write_extents(&lab.primary_device.path, 100, APART_OLD_PRIMARY / 2, 0x45);
    std::thread::sleep(Duration::from_millis(500));
    let promoted = promote_s0(lab, s0);
    write_extents(&lab.secondary_devices[0].path, 200, APART_PROMOTED, 0x55);
    start_new_primary(lab, &promoted);
    let new_primary = lab.processes.len() - 1;
    assert!(lab.processes[primary].stop(), "the old primary stops cleanly\n{}", lab.logs());
    let before = hash_device(&lab.primary_device.path).unwrap();
    let old = start_old_primary_as_secondary(lab);
    lab.primary_ns.run(&["link", "set", &link, "up"]).expect("link up");
    let status = until(lab, &promoted, "ATTENTION for the split brain", |s| {
        s["mirror"]["state"] == "ATTENTION"
            && s["mirror"]["state_cause"].as_str().unwrap_or("").contains("split brain")
    });
    let cause = status["mirror"]["state_cause"].as_str().unwrap_or("").to_owned();
    eprintln!("split brain reported: {cause}");
    assert!(
        cause.contains("generation 1") && cause.contains("generation 2"),
        "both generations named: {cause}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        hash_device(&lab.primary_device.path).unwrap(),
        before,
        "nothing was overwritten on the old primary"
    );
    (promoted, before, new_primary, old)
}

/// At most twice the extents written on both sides while apart: the union of both sides'
/// logs, never a full copy.
fn assert_split_resync_bounded(lab: &Lab, shipped: u64) {
    let bound = 2 * (APART_OLD_PRIMARY + APART_PROMOTED) * EXTENT_BYTES;
    eprintln!("split-brain resync shipped {} KiB, bound {} KiB", shipped / KIB, bound / KIB);
    assert!(shipped > 0 && shipped <= bound, "resync shipped {shipped} bytes, bound {bound}\n{}", lab.logs());
}

/// 5. Split brain: both sides written while apart. The mirror goes to ATTENTION and nothing
///    is overwritten until `resolve --keep`; kept here: the promoted side. The old primary's
///    writes are discarded and the images end identical.
#[test]
fn split_brain_needs_resolve_and_overwrites_nothing_before() {
    let mut lab = lab("split");
    let (promoted, _, _, old) = split_brain(&mut lab);
    assert!(lab.processes[old].stop());
    let refused = run_command(
        lab.binary.to_str().unwrap(),
        &["resolve", "--keep", "p", "--state-dir", lab.state_dir("p").to_str().unwrap()],
    );
    assert!(refused.is_err(), "resolve --keep p on p's own side is refused");
    run(&lab, &["resolve", "--keep", "s0", "--state-dir", lab.state_dir("p").to_str().unwrap()]);
    start_old_primary_as_secondary(&mut lab);
    let status = old_primary_synchronized(&lab, &promoted, "after resolve the images are identical");
    assert_split_resync_bounded(&lab, p_record(&status)["shipped_bytes"].as_u64().unwrap_or(0));
}

/// 5b. The same split brain resolved the other way: the old primary (generation 1) is kept,
///     the promoted side (generation 2) stops, becomes its secondary again, and is resynced
///     with the union of both sides' logs; the old primary's image is untouched.
#[test]
fn split_brain_resolved_for_the_old_primary() {
    let mut lab = lab("splitold");
    let (promoted, before, new_primary, old) = split_brain(&mut lab);
    assert!(lab.processes[old].stop());
    let state = promoted.to_str().unwrap();
    let running =
        run_command(lab.binary.to_str().unwrap(), &["resolve", "--keep", "p", "--state-dir", state]);
    let error = running.expect_err("resolve while the promoted primary runs is refused").to_string();
    assert!(error.contains("stop its primary"), "{error}");
    assert!(lab.processes[new_primary].stop(), "the promoted primary stops cleanly\n{}", lab.logs());
    let own_side =
        run_command(lab.binary.to_str().unwrap(), &["resolve", "--keep", "s0", "--state-dir", state]);
    assert!(own_side.is_err(), "resolve --keep s0 on s0's own side is refused");
    run(&lab, &["resolve", "--keep", "p", "--state-dir", state]);
    lab.start_secondary(0, &[]).expect("s0 as a secondary again");
    lab.start_primary_from_db(FAST).expect("the old primary again");
    let status =
        lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashes");
    assert_eq!(hashes[0], before, "the kept side's image is untouched");
    assert_eq!(hashes[0], hashes[1], "after resolve the images are identical\n{}", lab.logs());
    assert_split_resync_bounded(&lab, status["secondaries"][0]["shipped_bytes"].as_u64().unwrap_or(0));
    assert_eq!(status["mirror"]["generation"], 1, "{status}");
}

/// Waits until s0's own database says it is SYNCHRONIZING (a resync is under way there).
fn s0_synchronizing(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let s0_knows = || {
        MirrorDb::load(&lab.state_dir("s0")).ok().flatten().is_some_and(|db| {
            db.images
                .iter()
                .any(|i| i.name == "s0" && i.state == replicator::model::ImageState::Synchronizing)
        })
    };
    while !s0_knows() {
        assert!(Instant::now() < deadline, "s0 never learned it is SYNCHRONIZING\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The primary lost in the middle of a resync (here a whole `sync`, throttled): the secondary
/// is at its last cut, which its journal kept while the copy came in, and promote gives that.
#[test]
fn promote_during_a_resync_gives_the_last_cut() {
    let mut lab = lab("midsync");
    let (_, s0) = mirror(&mut lab);
    write_extents(&lab.primary_device.path, 10, 20, 0x3c);
    lab.wait_synchronized(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    until(&lab, &lab.state_dir("p"), "s0 holding a cut with those writes", |s| {
        s["secondaries"][0]["cut_consistent"] == true && s["secondaries"][0]["in_sync"] == true
    });
    std::thread::sleep(Duration::from_millis(500)); // a cut after the writes
    lab.operate(&["set", "sync-rate=4MiB", "--secondary", "s0"]).expect("set");
    lab.operate(&["sync", "s0"]).expect("sync");
    s0_synchronizing(&lab);
    std::thread::sleep(Duration::from_millis(1500)); // some of the copy staged in s0's journal
    assert!(lab.processes[s0].stop());
    let said = run(&lab, &promote_args(&lab).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(said.contains("of later cuts had arrived and are discarded"), "{said}");
    let (primary, promoted) = (
        hash_device(&lab.primary_device.path).unwrap(),
        hash_device(&lab.secondary_devices[0].path).unwrap(),
    );
    assert_eq!(primary, promoted, "the promoted image is the last cut (nothing was written since)\n{said}");
}

/// A catch-up larger than the journal is applied in place (replication does not stall): the
/// image is no cut until it completes, and promote refuses meanwhile, saying why.
#[test]
fn promote_is_refused_while_a_catch_up_larger_than_the_journal_runs() {
    let mut lab = lab("nopromote");
    let s0 = lab.start_secondary(0, &["--journal-bytes", "16MiB"]).expect("s0");
    let (device, state) =
        (lab.primary_device.path.display().to_string(), lab.state_dir("p").display().to_string());
    run(&lab, &["create", "vol1", "--device", &device, "--state-dir", &state, "--image-name", "p"]);
    lab.start_primary_from_db(FAST).expect("primary");
    until(&lab, &lab.state_dir("p"), "the primary", |s| s["mirror"]["state"] == "ACTIVE");
    lab.operate(&["add-secondary", &format!("s0={}", lab.secondary_addrs[0])]).expect("add-secondary");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    until(&lab, &lab.state_dir("p"), "s0 consistent", |s| s["secondaries"][0]["cut_consistent"] == true);
    lab.operate(&["set", "sync-rate=16MiB", "--secondary", "s0"]).expect("set");
    lab.operate(&["sync", "s0"]).expect("sync");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.logs().contains("journal full with no cut to commit") {
        assert!(Instant::now() < deadline, "s0's journal never overflowed\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lab.processes[s0].stop());
    let args = promote_args(&lab);
    let refused =
        run_command(lab.binary.to_str().unwrap(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    let error = refused.expect_err("promote of an image that is no cut is refused").to_string();
    assert!(error.contains("not a consistent cut") && error.contains("--force"), "{error}");
}

/// The stale secondary: s0 is killed, the primary goes on writing (the sync policy with
/// minimum images 1 acknowledges them to clients), then the primary is lost. s0 cannot know
/// what it missed: promote refuses, naming the writes it may lack; `--force` promotes.
#[test]
fn promote_of_a_stale_secondary_is_refused_under_the_sync_policy() {
    let mut lab = lab("stale");
    let s0 = lab.start_secondary(0, &[]).expect("s0");
    let (device, state) =
        (lab.primary_device.path.display().to_string(), lab.state_dir("p").display().to_string());
    run(
        &lab,
        &[
            "create",
            "vol1",
            "--device",
            &device,
            "--state-dir",
            &state,
            "--image-name",
            "p",
            "--write-policy",
            "sync",
        ],
    );
    let primary = lab.start_primary_from_db(FAST).expect("primary");
    until(&lab, &lab.state_dir("p"), "the primary", |s| s["mirror"]["state"] == "ACTIVE");
    lab.operate(&["add-secondary", &format!("s0={}", lab.secondary_addrs[0])]).expect("add-secondary");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    until(&lab, &lab.state_dir("p"), "s0 consistent", |s| s["secondaries"][0]["cut_consistent"] == true);
    lab.processes[s0].kill();
    write_extents(&lab.primary_device.path, 0, 128, 0x77); // 8 MiB s0 never sees
    until(&lab, &lab.state_dir("p"), "s0 outdated", |s| s["secondaries"][0]["outdated"] == true);
    lab.processes[primary].kill();
    let args = promote_args(&lab);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let error =
        run_command(lab.binary.to_str().unwrap(), &argv).expect_err("a stale promote is refused").to_string();
    assert!(
        error.contains("may have acknowledged writes this image lacks") && error.contains("--force"),
        "{error}"
    );
    let mut forced = argv.clone();
    forced.push("--force");
    let said = run(&lab, &forced);
    assert!(said.contains("promoting anyway (--force)") && said.contains("is now the primary"), "{said}");
}
