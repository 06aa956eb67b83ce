//! lag: replication lag (from a write's completion on the primary to the secondary's durable
//! acknowledgement) under a steady fio load at 25%, 50% and 90% of
//! the maximum rate this mirror sustains, measured first in the same run. Baseline: the
//! application's own write latency (fio's p99) in the same rounds.

use std::path::Path;
use std::time::{Duration, Instant};

use replicator::testbed::{Lab, run_command};

const DEVICE_BYTES: u64 = 1 << 30;
const ROUND_SECONDS: u32 = 10;
const LOADS: [f64; 3] = [0.25, 0.5, 0.9];
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, serde::Serialize)]
struct Level {
    load: f64,
    rate_mib_per_s: f64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_p999_ms: f64,
    write_p99_ms: f64,
    lag_p99_over_write_p99: f64,
}

pub fn run(binary: &Path) -> anyhow::Result<(serde_json::Value, String)> {
    let mut lab = Lab::new(binary, "lag", 1, DEVICE_BYTES)?;
    for device in [&lab.primary_device, &lab.secondary_devices[0]] {
        let of = format!("of={}", device.path.display());
        run_command("dd", &["if=/dev/zero", &of, "bs=1M", "oflag=direct", "status=none", "count=1024"])?;
    }
    lab.start_secondary(0, &[])?;
    let args = ["--skip-initial-sync", "--sync-rate", "0"];
    let mut primary = lab.start_primary(&args)?;
    synchronized(&lab)?;
    // The maximum: a 512 MiB sequential write, timed until the secondary has acknowledged it.
    let started = Instant::now();
    crate::fio::sequential_write(&lab.primary_device.path, "512m")?;
    synchronized(&lab)?;
    let max_mib_per_s = 512.0 / (started.elapsed().as_secs_f64() - 0.6);
    eprintln!("lag: the mirror sustains {max_mib_per_s:.0} MiB/s");
    let mut levels = Vec::new();
    for load in LOADS {
        // A fresh primary per level, so its lag histogram holds this level only.
        lab.processes[primary].stop();
        primary = lab.start_primary(&args)?;
        synchronized(&lab)?;
        let rate = (max_mib_per_s * load * MIB) as u64;
        eprintln!(
            "lag: {:.0}% load, {:.0} MiB/s of 64 KiB random writes for {ROUND_SECONDS} s",
            load * 100.0,
            rate as f64 / MIB
        );
        let fio = crate::fio::finish(crate::fio::start_rated_randwrite(
            &lab.primary_device.path,
            rate,
            ROUND_SECONDS,
        )?)?;
        let status = synchronized(&lab)?;
        let peer = &status["secondaries"][0];
        let ms = |field: &str| peer[field].as_f64().unwrap_or(0.0);
        let write_p99_ms = fio.p99_us / 1000.0;
        levels.push(Level {
            load,
            rate_mib_per_s: rate as f64 / MIB,
            lag_p50_ms: ms("lag_p50_ms"),
            lag_p99_ms: ms("lag_p99_ms"),
            lag_p999_ms: ms("lag_p999_ms"),
            write_p99_ms,
            lag_p99_over_write_p99: ms("lag_p99_ms") / write_p99_ms.max(0.001),
        });
    }
    let hashes = lab.hashes()?;
    anyhow::ensure!(hashes.iter().all(|h| *h == hashes[0]), "images differ after the lag benchmark");
    let mut md = format!(
        "### lag\n\nOne secondary over veth, 1 GiB image; the mirror sustained {max_mib_per_s:.0} MiB/s (512 MiB sequential \
         write, until acknowledged). fio 64 KiB random writes, O_DIRECT, iodepth 4, {ROUND_SECONDS} s per level; lag \
         from the primary's histogram (write completion to durable acknowledgement); baseline: fio's own write \
         latency p99 in the same round.\n\n\
         | load | MiB/s | lag p50 ms | lag p99 ms | lag p99.9 ms | write p99 ms | lag p99 / write p99 |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for l in &levels {
        md.push_str(&format!(
            "| {:.0}% | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |\n",
            l.load * 100.0,
            l.rate_mib_per_s,
            l.lag_p50_ms,
            l.lag_p99_ms,
            l.lag_p999_ms,
            l.write_p99_ms,
            l.lag_p99_over_write_p99
        ));
    }
    md.push('\n');
    Ok((serde_json::json!({ "max_mib_per_s": max_mib_per_s, "levels": levels }), md))
}

fn synchronized(lab: &Lab) -> anyhow::Result<serde_json::Value> {
    lab.wait_synchronized(Duration::from_secs(120)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))
}
