//! Runs fio with JSON output and extracts what the scenarios report.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

/// Latency percentiles over the whole of each I/O, submission included (fio's `lat`), not only
/// from submission to completion (`clat`): on Linux 6.18 a loop device may complete a write
/// inside the submitting call, where `clat` sees almost nothing of it (p50 0.3 µs), and the
/// tracker's program runs at submission too. Every parsed job passes this.
pub const LATENCY_PERCENTILES: &str = "--lat_percentiles=1";

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct FioResult {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// Writes the first `size` of `device` sequentially: 1 MiB O_DIRECT writes, 8 in flight.
pub fn sequential_write(device: &Path, size: &str) -> anyhow::Result<()> {
    let status = Command::new("fio")
        .args([
            "--name=sequential",
            "--rw=write",
            "--bs=1m",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=8",
        ])
        .arg(format!("--size={size}"))
        .arg(format!("--filename={}", device.display()))
        .stdout(Stdio::null())
        .status()
        .context("running fio (package fio)")?;
    anyhow::ensure!(status.success(), "fio failed on {}", device.display());
    Ok(())
}

/// Starts fio: 4 KiB random writes, O_DIRECT, io_uring, `iodepth` in flight, for `seconds`.
pub fn start_randwrite(device: &Path, iodepth: u32, seconds: u32) -> anyhow::Result<Child> {
    Command::new("fio")
        .args(["--name=randwrite", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=io_uring"])
        .arg(LATENCY_PERCENTILES)
        .arg(format!("--iodepth={iodepth}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--time_based", "--ramp_time=1", "--randrepeat=1", "--output-format=json"])
        .arg(format!("--filename={}", device.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting fio (package fio)")
}

/// Starts fio: 64 KiB random writes at `rate_bytes_per_s`, O_DIRECT, io_uring, for `seconds`.
pub fn start_rated_randwrite(device: &Path, rate_bytes_per_s: u64, seconds: u32) -> anyhow::Result<Child> {
    Command::new("fio")
        .args([
            "--name=rated",
            "--rw=randwrite",
            "--bs=64k",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=4",
        ])
        .arg(LATENCY_PERCENTILES)
        .arg(format!("--rate={rate_bytes_per_s}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--time_based", "--randrepeat=1", "--output-format=json"])
        .arg(format!("--filename={}", device.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting fio (package fio)")
}

pub fn finish(child: Child) -> anyhow::Result<FioResult> {
    let output = child.wait_with_output().context("waiting for fio")?;
    if !output.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

fn parse(json: &str) -> anyhow::Result<FioResult> {
    // fio may print warnings before the JSON object.
    let start = json.find('{').context("fio printed no JSON")?;
    let value: serde_json::Value = serde_json::from_str(&json[start..]).context("parsing fio's JSON")?;
    let write = &value["jobs"][0]["write"];
    let percentile = |p: &str| write["lat_ns"]["percentile"][p].as_f64().map(|ns| ns / 1000.0);
    Ok(FioResult {
        iops: write["iops"].as_f64().context("fio JSON has no write iops")?,
        p50_us: percentile("50.000000").context("no lat p50 (run fio with --lat_percentiles=1)")?,
        p99_us: percentile("99.000000").context("no p99")?,
        p999_us: percentile("99.900000").context("no p99.9")?,
    })
}
