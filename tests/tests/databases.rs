//! Real databases on ext4 on the primary, its host lost at random moments (its link down and
//! `replicator primary` SIGKILLed together) while they commit, over a fast link and over one
//! slower than the writes (`tc tbf`: the secondary falls behind and catches up);
//! then the secondary is promoted and used as a failover host would use it. Each round checks:
//! the filesystem passes `e2fsck -fn` once its journal is replayed; PostgreSQL starts, pgbench's
//! balance invariant holds (accounts = tellers = branches = history), `pg_amcheck
//! --heapallindexed` and `pg_checksums --check` find nothing; sqlite in WAL mode says `ok` to
//! `PRAGMA integrity_check` and holds a prefix of the committed rows. Where no consistent image
//! can be had, promote must refuse and say why (the round then says so).

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replicator_tests::*;

const DEVICE_BYTES: u64 = 512 * MIB;
const PRIMARY_ARGS: &[&str] =
    &["--sync-rate", "0", "--checkpoint-ms", "200", "--timeout-ms", "2000", "--cut-interval-ms", "100"];

fn run(lab: &Lab, args: &[&str]) -> String {
    run_command(lab.binary.to_str().expect("utf-8"), args)
        .unwrap_or_else(|e| panic!("replicator {args:?}: {e}\n{}", lab.logs()))
}

fn wait_for(lab: &Lab, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while lab.status().is_none_or(|s| !check(&s)) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}\n{}",
            lab.status(),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A mirror of a device holding a fresh ext4, its secondary in sync and holding cuts.
fn mirrored_ext4(label: &str) -> (Lab, usize, usize) {
    require_root();
    let mut lab = Lab::new(&replicator_bin(), label, 1, DEVICE_BYTES).expect("lab");
    run_command("mkfs.ext4", &["-q", "-F", lab.primary_device.path.to_str().expect("utf-8")])
        .expect("mkfs.ext4");
    let s0 = lab.start_secondary(0, &["--journal-bytes", "256MiB"]).expect("s0");
    let (device, state) =
        (lab.primary_device.path.display().to_string(), lab.state_dir("p").display().to_string());
    run(&lab, &["create", "db", "--device", &device, "--state-dir", &state, "--image-name", "p"]);
    let primary = lab.start_primary_from_db(PRIMARY_ARGS).expect("primary");
    wait_for(&lab, "the mirror ACTIVE", |s| s["mirror"]["state"] == "ACTIVE");
    lab.operate(&["add-secondary", &format!("s0={}", lab.secondary_addrs[0])]).expect("add-secondary");
    lab.wait_synchronized(Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_for(&lab, "s0 holding a consistent cut", |s| s["secondaries"][0]["cut_consistent"] == true);
    (lab, primary, s0)
}

/// Waits until the secondary holds everything written so far, as a cut; then limits the link
/// to `slow` (a `tc tbf` rate, slower than the writes to come), if given.
fn caught_up_then_maybe_slow(lab: &Lab, slow: Option<&str>) {
    lab.wait_in_sync(Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as u64;
    wait_for(lab, "a cut after the set-up", |s| {
        s["secondaries"][0]["cut_unix_ms"].as_u64().is_some_and(|at| at > now_ms)
    });
    if let Some(rate) = slow {
        let link = lab.primary_ifs[0].clone();
        let tbf = ["rate", rate, "burst", "64kb", "latency", "500ms"];
        let mut args =
            vec!["netns", "exec", &lab.primary_ns.name, "tc", "qdisc", "add", "dev", &link, "root", "tbf"];
        args.extend(tbf);
        run_command("ip", &args).expect("tc tbf (package iproute2)");
    }
}

/// The primary's host lost: link down and SIGKILL together, and its application (`writer`)
/// with it; returns when.
fn lose_primary(lab: &mut Lab, primary: usize, writer: &mut Child) -> Instant {
    lab.primary_ns.run(&["link", "set", &lab.primary_ifs[0], "down"]).expect("link down");
    lab.processes[primary].kill();
    let lost_at = Instant::now();
    let _ = writer.kill();
    let _ = writer.wait();
    lost_at
}

/// s0 stopped and promoted: what promote said, or why it refused.
fn promote(lab: &mut Lab, s0: usize) -> Result<String, String> {
    assert!(lab.processes[s0].stop(), "s0 stops cleanly");
    let ip = lab.secondary_addrs[0].ip().to_string();
    let old = format!("{}.1:7788", ip.rsplit_once('.').expect("IPv4").0);
    let (device, state) =
        (lab.secondary_devices[0].path.display().to_string(), lab.state_dir("s0").display().to_string());
    run_command(
        lab.binary.to_str().expect("utf-8"),
        &["promote", "--device", &device, "--state-dir", &state, "--old-primary-address", &old],
    )
    .map_err(|e| e.to_string())
}

/// Replays the ext4 journal of the promoted image (a mount and an unmount, as a failover host's
/// first mount would), then `e2fsck -fn` must find it clean; returns it mounted again.
fn checked_mount(device: &Path, what: &str) -> Mount {
    drop(Mount::new(device, "rw"));
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(device).output().expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{what}: e2fsck -fn on the promoted image: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    Mount::new(device, "rw")
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL (package postgresql) under /usr/lib/postgresql")
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions.last().expect("a PostgreSQL version").join("bin").join(name)
}

/// Runs a PostgreSQL program as the `postgres` user; its output, or why it failed.
fn as_postgres(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_bin(program))
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(format!("{program} {args:?}: {text}")) }
}

/// A PostgreSQL cluster on `dir` listening on a unix socket in `socket_dir` only.
struct Postgres {
    data: PathBuf,
    socket_dir: PathBuf,
}

impl Postgres {
    fn start(data: &Path, socket_dir: &Path) -> Result<Self, String> {
        let options = format!("-k {} -c listen_addresses='' -p 5432", socket_dir.display());
        let log = data
            .parent()
            .expect("a parent")
            .join(format!("{}.log", socket_dir.display().to_string().replace('/', "_")));
        let log = log.to_str().expect("utf-8").to_owned();
        as_postgres(
            "pg_ctl",
            &["-D", data.to_str().expect("utf-8"), "-o", &options, "-l", &log, "-w", "-t", "60", "start"],
        )
        .map_err(|e| format!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()))?;
        Ok(Self { data: data.into(), socket_dir: socket_dir.into() })
    }

    fn sql(&self, query: &str) -> Result<String, String> {
        let host = self.socket_dir.to_str().expect("utf-8");
        as_postgres("psql", &["-h", host, "-U", "postgres", "-d", "postgres", "-At", "-c", query])
    }

    fn stop(&self, mode: &str) {
        let _ = as_postgres("pg_ctl", &["-D", self.data.to_str().expect("utf-8"), "-m", mode, "-w", "stop"]);
    }
}

fn socket_dir(label: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/replicator-pg-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a socket directory");
    run_command("chown", &["postgres:postgres", dir.to_str().expect("utf-8")]).expect("chown");
    dir
}

/// One PostgreSQL round: pgbench on the primary, the host lost after `run_ms`, then the
/// promoted image started as a failover host would and checked.
fn pg_round(index: u64, slow: Option<&str>, run_ms: u64) {
    let label = format!("pg{index}");
    let (mut lab, primary, s0) = mirrored_ext4(&label);
    let mut mount = Mount::new(&lab.primary_device.path, "rw");
    let data = mount.dir.join("pg");
    std::fs::create_dir_all(&data).expect("the data directory");
    run_command("chown", &["-R", "postgres:postgres", mount.dir.to_str().expect("utf-8")]).expect("chown");
    as_postgres(
        "initdb",
        &["-D", data.to_str().expect("utf-8"), "--data-checksums", "-A", "trust", "-U", "postgres"],
    )
    .expect("initdb");
    let sockets = socket_dir(&label);
    let pg = Postgres::start(&data, &sockets).expect("PostgreSQL on the primary");
    let host = sockets.to_str().expect("utf-8").to_owned();
    as_postgres("pgbench", &["-h", &host, "-U", "postgres", "-i", "-s", "4", "-q", "postgres"])
        .expect("pgbench -i");
    as_postgres("psql", &["-h", &host, "-U", "postgres", "-c", "checkpoint", "postgres"])
        .expect("a checkpoint");
    // pgbench's 4 clients write about 1 MB/s here: 8 Mbit/s is about as fast, less is slower.
    caught_up_then_maybe_slow(&lab, slow);
    let mut bench = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_bin("pgbench"))
        .args(["-h", &host, "-U", "postgres", "-c", "4", "-T", "120", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench");
    std::thread::sleep(Duration::from_millis(run_ms));
    lose_primary(&mut lab, primary, &mut bench);
    let promoted = promote(&mut lab, s0);
    pg.stop("immediate");
    mount.unmount();
    let said = match promoted {
        Ok(said) => said,
        Err(refusal) => {
            assert!(
                refusal.contains("not a consistent cut"),
                "{label}: promote failed: {refusal}\n{}",
                lab.logs()
            );
            eprintln!("{label}: promote refused, saying why: {refusal}");
            return;
        }
    };
    eprintln!(
        "{label} ({} link, {run_ms} ms of pgbench): {}",
        slow.unwrap_or("fast"),
        said.lines().next().unwrap_or("")
    );
    check_postgres(&lab.secondary_devices[0].path, &label);
}

/// The promoted image, as a failover host would use it: ext4 clean, PostgreSQL starts, and the
/// data is sound.
fn check_postgres(device: &Path, label: &str) {
    let mut mount = checked_mount(device, label);
    let data = mount.dir.join("pg");
    // The primary's postmaster.pid names a process of the lost host; here that PID may be
    // anyone's (or a zombie of the primary's postmaster), which would keep PostgreSQL from
    // starting. A failover host has no such process.
    let _ = std::fs::remove_file(data.join("postmaster.pid"));
    let sockets = socket_dir(&format!("{label}-promoted"));
    let pg = Postgres::start(&data, &sockets)
        .unwrap_or_else(|e| panic!("{label}: PostgreSQL does not start on the promoted image: {e}"));
    let sums = pg
        .sql("select (select sum(abalance) from pgbench_accounts), (select sum(tbalance) from pgbench_tellers), \
              (select sum(bbalance) from pgbench_branches), (select coalesce(sum(delta), 0) from pgbench_history)")
        .expect("the balance sums");
    let sums: Vec<&str> = sums.trim().split('|').collect();
    assert!(
        sums.len() == 4 && sums.iter().all(|s| *s == sums[0]),
        "{label}: pgbench's invariant broken: {sums:?}"
    );
    let host = sockets.to_str().expect("utf-8");
    as_postgres("pg_amcheck", &["-h", host, "-U", "postgres", "--install-missing", "--heapallindexed", "-a"])
        .unwrap_or_else(|e| panic!("{label}: pg_amcheck: {e}"));
    pg.stop("fast");
    as_postgres("pg_checksums", &["--check", "-D", data.to_str().expect("utf-8")])
        .unwrap_or_else(|e| panic!("{label}: pg_checksums: {e}"));
    eprintln!("{label}: promoted image sound (balances {}, pg_amcheck and pg_checksums clean)", sums[0]);
    mount.unmount();
}

const SQLITE_WRITER: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("create table if not exists t(id integer primary key, pad blob)")
i = 0
while True:
    i += 1
    db.execute("begin")
    db.execute("insert into t values(?, ?)", (i, bytes([i % 251]) * 3000))
    db.execute("commit")
    print(i, flush=True)
"#;

/// The rows a promoted sqlite file holds, after `PRAGMA integrity_check` said ok: how many,
/// and the highest id. A cut from before the table existed holds none.
fn sqlite_rows(file: &Path, label: &str) -> (u64, u64) {
    const CHECK: &str = "import sqlite3,sys\nd=sqlite3.connect(sys.argv[1])\nprint(d.execute('pragma integrity_check').fetchone()[0])\n\
        t=d.execute(\"select count(*) from sqlite_master where name='t'\").fetchone()[0]\n\
        print(*(d.execute('select count(*), coalesce(max(id),0) from t').fetchone() if t else (0, 0)))";
    let check = Command::new("python3").args(["-c", CHECK]).arg(file).output().expect("python3");
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    let mut lines = out.lines();
    let integrity = lines.next();
    assert_eq!(
        integrity,
        Some("ok"),
        "{label}: integrity_check: {out}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let counts: Vec<u64> =
        lines.next().unwrap_or("").split_whitespace().filter_map(|n| n.parse().ok()).collect();
    assert!(counts.len() == 2, "{label}: no row count: {out}{}", String::from_utf8_lossy(&check.stderr));
    (counts[0], counts[1])
}

/// One sqlite round: committed inserts (WAL, synchronous=FULL) until the host is lost.
fn sqlite_round(index: u64, slow: bool, run_ms: u64) {
    let label = format!("sq{index}");
    let (mut lab, primary, s0) = mirrored_ext4(&label);
    let mut mount = Mount::new(&lab.primary_device.path, "rw");
    let file = mount.dir.join("rows.db");
    caught_up_then_maybe_slow(&lab, slow.then_some("8mbit"));
    let mut writer: Child = Command::new("python3")
        .args(["-c", SQLITE_WRITER])
        .arg(&file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with sqlite3");
    let stdout = writer.stdout.take().expect("piped");
    let committed = std::thread::spawn(move || {
        let lines = std::io::BufReader::new(stdout).lines();
        lines.map_while(Result::ok).map(|_| Instant::now()).collect::<Vec<Instant>>()
    });
    std::thread::sleep(Duration::from_millis(run_ms));
    let lost_at = lose_primary(&mut lab, primary, &mut writer);
    let promoted = promote(&mut lab, s0);
    let committed = committed.join().expect("the reader");
    mount.unmount();
    let said = promoted.unwrap_or_else(|e| panic!("{label}: promote: {e}\n{}", lab.logs()));
    eprintln!("{label}: {}", said.lines().next().unwrap_or(""));
    let mut mount = checked_mount(&lab.secondary_devices[0].path, &label);
    let (count, max) = sqlite_rows(&mount.dir.join("rows.db"), &label);
    assert_eq!(count, max, "{label}: the rows are no prefix ({count} rows, the highest id {max})");
    // The recovery point is stated for a secondary that keeps up: over the slow link it falls
    // behind and holds an older cut (still a sound database).
    let due = committed.iter().filter(|&&at| at + Duration::from_secs(3) <= lost_at).count() as u64;
    assert!(
        slow || max >= due,
        "{label}: {max} rows on the promoted image, {due} committed 3 s before the loss"
    );
    let behind =
        committed.get(max as usize).map_or(Duration::ZERO, |&at| lost_at.saturating_duration_since(at));
    eprintln!(
        "{label}: {max} of {} committed rows on the promoted image ({behind:?} behind the loss), integrity ok",
        committed.len()
    );
    mount.unmount();
}

#[test]
fn sqlite_in_wal_mode_survives_the_loss_of_the_primary() {
    for (index, slow) in [(0, false), (1, true), (2, false), (3, true)] {
        sqlite_round(index, slow, 1500 + index * 700);
    }
}

#[test]
fn postgresql_survives_the_loss_of_the_primary() {
    for (index, slow) in [(0, Some("2mbit")), (1, None), (2, Some("8mbit")), (3, Some("4mbit"))] {
        pg_round(index, slow, 2000 + index * 900);
    }
}
