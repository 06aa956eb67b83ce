//! resync: a 2 GiB image with 0.1%, 1% and 10% of its extents rewritten while its secondary is
//! fractured; time from `restore` to SYNCHRONIZED and the bytes shipped, against, in the same
//! run and over the same veth path, a full copy (`dd | nc`, what operators script today) and
//! `rsync --inplace --no-whole-file` of the image file. Also the replicator's own initial full
//! sync, and a verify (both sides hash every extent) with 1% differing.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use replicator::testbed::{Lab, Process, run_command, write_direct};

const DEVICE_BYTES: u64 = 2 << 30;
const EXTENT_BYTES: u64 = 64 << 10;
const MIB: f64 = 1024.0 * 1024.0;
const FRACTIONS: [f64; 3] = [0.001, 0.01, 0.1];
const PRIMARY_ARGS: &[&str] = &["--sync-rate", "0", "--checkpoint-ms", "200"];

#[derive(Debug, serde::Serialize)]
struct Round {
    fraction: f64,
    extents_written: u64,
    dirty_bytes: u64,
    resync_seconds: f64,
    resync_bytes: u64,
    rsync_seconds: f64,
    rsync_wire_bytes: u64,
    full_copy_seconds: f64,
    full_copy_bytes: u64,
    rsync_over_resync: f64,
    full_copy_over_resync: f64,
}

#[derive(Debug, serde::Serialize)]
struct Verify {
    differing_extents: u64,
    seconds: f64,
    shipped_bytes: u64,
    full_copy_over_verify: f64,
}

/// A 2 GiB mirror with one secondary, initially synchronized; returns the lab and the
/// seconds its initial full sync took.
fn mirror_lab(binary: &Path, label: &str) -> anyhow::Result<(Lab, f64)> {
    let mut lab = Lab::new(binary, label, 1, DEVICE_BYTES)?;
    crate::fio::sequential_write(&lab.primary_device.path, "2g")?;
    prefill(&lab.secondary_devices[0].path)?;
    lab.start_secondary(0, &[])?;
    let started = Instant::now();
    lab.start_primary(PRIMARY_ARGS)?;
    synchronized(&lab)?;
    let initial_sync_seconds = started.elapsed().as_secs_f64();
    eprintln!("{label}: initial full sync {initial_sync_seconds:.2} s");
    Ok((lab, initial_sync_seconds))
}

pub fn run(binary: &Path) -> anyhow::Result<(serde_json::Value, String)> {
    let (lab, initial_sync_seconds) = mirror_lab(binary, "resync")?;
    let mut rng = Rng(0x5eed);
    let mut rounds = Vec::new();
    for fraction in FRACTIONS {
        eprintln!("resync: {:.1}% of the extents rewritten during a fracture", fraction * 100.0);
        let (full_copy_seconds, full_copy_bytes) = full_copy(&lab)?;
        rounds.push(round(&lab, fraction, &mut rng, full_copy_seconds, full_copy_bytes)?);
    }
    ensure_equal(&lab, "resync")?;
    Ok((
        serde_json::json!({ "initial_full_sync_seconds": initial_sync_seconds, "rounds": rounds }),
        markdown(initial_sync_seconds, &rounds),
    ))
}

/// verify: a 2 GiB image with 1% of its extents changed behind the replicator's back; time and
/// bytes on the wire for a verify, against a full copy over the same path in the same run.
pub fn run_verify(binary: &Path) -> anyhow::Result<(serde_json::Value, String)> {
    let (lab, _) = mirror_lab(binary, "verify")?;
    let (full_copy_seconds, full_copy_bytes) = full_copy(&lab)?;
    let verify = verify(&lab, &mut Rng(0xfeed), full_copy_seconds)?;
    ensure_equal(&lab, "verify")?;
    let md = format!(
        "### verify\n\n2 GiB image, 64 KiB extents, {} extents (1%) changed on the secondary behind the replicator's \
         back; `replicator verify` hashes every extent on both sides (XXH3-128) and ships the differing ones. \
         Baseline: a full copy (`dd | nc`) over the same path in the same run.\n\n\
         | | seconds | MiB on the wire | full copy / this |\n|---|---|---|---|\n\
         | verify | {:.2} | {:.1} | {:.1}x |\n| full copy | {:.2} | {:.0} | 1x |\n\n",
        verify.differing_extents,
        verify.seconds,
        verify.shipped_bytes as f64 / MIB,
        verify.full_copy_over_verify,
        full_copy_seconds,
        full_copy_bytes as f64 / MIB,
    );
    Ok((serde_json::json!({ "verify": verify, "full_copy_seconds": full_copy_seconds }), md))
}

fn markdown(initial_sync_seconds: f64, rounds: &[Round]) -> String {
    let mut md = format!(
        "### resync\n\n2 GiB image, 64 KiB extents, one secondary over veth; extents rewritten on the primary while \
         the secondary is fractured (`replicator fracture`), then `replicator restore`: time until SYNCHRONIZED \
         (from the primary's own timestamps) and bytes shipped. Baselines over the same path in the same run: \
         a full copy with `dd | nc` and `rsync --inplace --no-whole-file` of the image file to a copy of the \
         secondary's image taken at the fracture. The replicator's initial full sync of the image took \
         {initial_sync_seconds:.2} s.\n\n\
         | rewritten | dirty MiB | resync s | resync MiB | rsync s | rsync MiB on wire | full copy s | full copy MiB | rsync / resync | full copy / resync | resync MiB / full copy MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in rounds {
        md.push_str(&format!(
            "| {:.1}% | {:.1} | {:.3} | {:.1} | {:.2} | {:.1} | {:.2} | {:.0} | {:.0}x | {:.0}x | {:.4} |\n",
            r.fraction * 100.0,
            r.dirty_bytes as f64 / MIB,
            r.resync_seconds,
            r.resync_bytes as f64 / MIB,
            r.rsync_seconds,
            r.rsync_wire_bytes as f64 / MIB,
            r.full_copy_seconds,
            r.full_copy_bytes as f64 / MIB,
            r.rsync_over_resync,
            r.full_copy_over_resync,
            r.resync_bytes as f64 / r.full_copy_bytes as f64,
        ));
    }
    md.push('\n');
    md
}

fn round(
    lab: &Lab,
    fraction: f64,
    rng: &mut Rng,
    full_copy_seconds: f64,
    full_copy_bytes: u64,
) -> anyhow::Result<Round> {
    lab.operate(&["fracture", "s0"])?;
    wait_for(lab, "the fracture", |s| s["secondaries"][0]["state"] == "UNSYNCHRONIZED")?;
    // The rsync destination: the secondary's image as it is now, at the fracture.
    let target_dir = lab.dir.join("rsync");
    std::fs::create_dir_all(&target_dir)?;
    let target = target_dir.join("image");
    std::fs::copy(lab.secondary_devices[0].backing_file(), &target).context("copying the rsync target")?;
    let extents = DEVICE_BYTES / EXTENT_BYTES;
    let count = ((extents as f64 * fraction) as u64).max(1);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.below(extents));
    }
    for &extent in &chosen {
        write_direct(
            &lab.primary_device.path,
            extent * EXTENT_BYTES,
            EXTENT_BYTES as usize,
            (rng.below(255) + 1) as u8,
        )?;
    }
    let before = lab.status().context("status")?;
    let resync_before = peer_u64(&before, "resync_bytes");
    std::thread::sleep(Duration::from_millis(500));
    let restored_at_ms = replicator::logs::unix_ms_now();
    lab.operate(&["restore", "s0"])?;
    let status = synchronized(lab)?;
    let resync_seconds =
        (peer_u64(&status, "synchronized_at_unix_ms").saturating_sub(restored_at_ms)) as f64 / 1000.0;
    let resync_bytes = peer_u64(&status, "resync_bytes") - resync_before;
    let (rsync_seconds, rsync_wire_bytes) = rsync(lab, &target_dir)?;
    let _ = std::fs::remove_file(&target);
    let resync_floor = resync_seconds.max(0.001);
    Ok(Round {
        fraction,
        extents_written: count,
        dirty_bytes: count * EXTENT_BYTES,
        resync_seconds,
        resync_bytes,
        rsync_seconds,
        rsync_wire_bytes,
        full_copy_seconds,
        full_copy_bytes,
        rsync_over_resync: rsync_seconds / resync_floor,
        full_copy_over_resync: full_copy_seconds / resync_floor,
    })
}

/// A verify after extents changed behind the replicator's back (written while the primary was
/// stopped and its tracker removed, as after a host crash).
fn verify(lab: &Lab, rng: &mut Rng, full_copy_seconds: f64) -> anyhow::Result<Verify> {
    let extents = DEVICE_BYTES / EXTENT_BYTES;
    lab.operate(&["fracture", "s0"])?;
    wait_for(lab, "the fracture", |s| s["secondaries"][0]["state"] == "UNSYNCHRONIZED")?;
    // Change 1% of the secondary's extents directly: nothing tracks these writes.
    let count = extents / 100;
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.below(extents));
    }
    let secondary_file = lab.secondary_devices[0].backing_file().to_path_buf();
    {
        use std::os::unix::fs::FileExt as _;
        let file = std::fs::OpenOptions::new().write(true).open(&secondary_file)?;
        let junk = vec![0xa5u8; EXTENT_BYTES as usize];
        for &extent in &chosen {
            file.write_all_at(&junk, extent * EXTENT_BYTES)?;
        }
        file.sync_all()?;
    }
    lab.operate(&["restore", "s0"])?;
    synchronized(lab)?;
    let before = lab.status().context("status")?;
    let shipped_before = peer_u64(&before, "resync_bytes");
    let started_ms = replicator::logs::unix_ms_now();
    lab.operate(&["verify", "s0"])?;
    let status = synchronized(lab)?;
    let seconds = (peer_u64(&status, "synchronized_at_unix_ms").saturating_sub(started_ms)) as f64 / 1000.0;
    Ok(Verify {
        differing_extents: count,
        seconds,
        shipped_bytes: peer_u64(&status, "resync_bytes") - shipped_before,
        full_copy_over_verify: full_copy_seconds / seconds.max(0.001),
    })
}

/// `dd | nc` of the primary device to a file on the secondary's side, over the same veth path.
fn full_copy(lab: &Lab) -> anyhow::Result<(f64, u64)> {
    // Into a file whose pages exist already, as the secondary's image does: first-touch page
    // allocation in this VM would otherwise dominate.
    let sink = lab.dir.join("full-copy.img");
    if std::fs::metadata(&sink).map_or(true, |m| m.len() != DEVICE_BYTES) {
        prefill(&sink)?;
    }
    let port = "7799";
    let mut listener = lab.secondary_ns[0].command(Path::new("sh"));
    listener
        .args(["-c", &format!("nc -l -p {port} | dd of={} bs=1M conv=notrunc status=none", sink.display())]);
    let mut listener = Process::spawn("nc listener", listener, lab.dir.join("nc.log"))?;
    std::thread::sleep(Duration::from_millis(300));
    let addr = lab.secondary_addrs[0].ip().to_string();
    let started = Instant::now();
    let output = lab
        .primary_ns
        .command(Path::new("sh"))
        .args([
            "-c",
            &format!(
                "dd if={} bs=1M iflag=direct status=none | nc -N {addr} {port}",
                lab.primary_device.path.display()
            ),
        ])
        .stdout(Stdio::null())
        .output()
        .context("dd | nc (package netcat-openbsd)")?;
    anyhow::ensure!(output.status.success(), "dd | nc failed: {}", String::from_utf8_lossy(&output.stderr));
    let _ = listener.child.wait();
    let seconds = started.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&sink).map(|m| m.len()).unwrap_or(0);
    anyhow::ensure!(bytes == DEVICE_BYTES, "the full copy moved {bytes} bytes, not {DEVICE_BYTES}");
    Ok((seconds, bytes))
}

/// Writes zeros over a file or device of DEVICE_BYTES, so its pages are allocated.
fn prefill(path: &Path) -> anyhow::Result<()> {
    let of = format!("of={}", path.display());
    let count = format!("count={}", DEVICE_BYTES >> 20);
    run_command("dd", &["if=/dev/zero", &of, "bs=1M", &count, "conv=notrunc", "status=none"])?;
    Ok(())
}

/// `rsync --inplace --no-whole-file` of the primary's image file to `target_dir/image` served by
/// an rsync daemon in the secondary's namespace; returns the time and the bytes on the wire.
fn rsync(lab: &Lab, target_dir: &Path) -> anyhow::Result<(f64, u64)> {
    let config = lab.dir.join("rsyncd.conf");
    std::fs::write(
        &config,
        format!(
            "port = 8873\nuse chroot = no\n[m]\npath = {}\nread only = no\nuid = root\ngid = root\n",
            target_dir.display()
        ),
    )?;
    let mut daemon = lab.secondary_ns[0].command(Path::new("rsync"));
    daemon.args(["--daemon", "--no-detach", &format!("--config={}", config.display())]);
    let mut daemon = Process::spawn("rsync daemon", daemon, lab.dir.join("rsyncd.log"))?;
    std::thread::sleep(Duration::from_millis(300));
    let addr = lab.secondary_addrs[0].ip().to_string();
    let source = lab.primary_device.backing_file().display().to_string();
    let started = Instant::now();
    let output = lab
        .primary_ns
        .command(Path::new("rsync"))
        // --ignore-times: the sizes match, so rsync's quick check would skip the file.
        .args([
            "--inplace",
            "--no-whole-file",
            "--ignore-times",
            "--stats",
            &source,
            &format!("rsync://{addr}:8873/m/image"),
        ])
        .output()
        .context("rsync (package rsync)")?;
    let seconds = started.elapsed().as_secs_f64();
    daemon.stop();
    anyhow::ensure!(output.status.success(), "rsync failed: {}", String::from_utf8_lossy(&output.stderr));
    let stats = String::from_utf8_lossy(&output.stdout);
    let number = |label: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .map(|rest| rest.split_whitespace().next().unwrap_or("0").replace(',', ""))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok((seconds, number("Total bytes sent:") + number("Total bytes received:")))
}

/// Fails unless the images are equal, naming the first extents that differ.
fn ensure_equal(lab: &Lab, scenario: &str) -> anyhow::Result<()> {
    let hashes = lab.hashes()?;
    if hashes.iter().all(|h| *h == hashes[0]) {
        return Ok(());
    }
    let mut primary = Vec::new();
    replicator::testbed::read_device_direct(&lab.primary_device.path, |c| primary.extend_from_slice(c))?;
    let mut secondary = Vec::new();
    replicator::testbed::read_device_direct(&lab.secondary_devices[0].path, |c| {
        secondary.extend_from_slice(c)
    })?;
    let differing: Vec<usize> = primary
        .chunks(EXTENT_BYTES as usize)
        .zip(secondary.chunks(EXTENT_BYTES as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    let status = lab.status().map(|s| s.to_string()).unwrap_or_default();
    anyhow::bail!(
        "images differ after the {scenario} benchmark: {} extents, first {:?}\nstatus: {status}\n{}",
        differing.len(),
        &differing[..differing.len().min(20)],
        lab.logs()
    )
}

fn synchronized(lab: &Lab) -> anyhow::Result<serde_json::Value> {
    lab.wait_synchronized(Duration::from_secs(300)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))
}

fn wait_for(lab: &Lab, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if lab.status().is_some_and(|s| check(&s)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("timed out waiting for {what}\n{}", lab.logs())
}

fn peer_u64(status: &serde_json::Value, field: &str) -> u64 {
    status["secondaries"][0][field].as_u64().unwrap_or(0)
}

/// xorshift64*, enough to pick extents.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}
