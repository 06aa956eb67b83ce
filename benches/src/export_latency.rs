//! export-latency: 4 KiB random writes through the NBD export (fio's nbd engine, over the
//! export's unix socket) at queue depth 1 and 32, under the async and the sync write policy,
//! with one secondary over veth. Baseline, in the same run: the same fio job on the raw
//! primary device (io_uring, O_DIRECT) with no replicator running, and the network round trip
//! (ping over the same veth). Goal: sync p99 within 2x of (primary write p99 + one round trip).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use replicator::testbed::{Lab, run_command};

use crate::fio::FioResult;

const DEVICE_BYTES: u64 = 256 << 20;
const ROUND_SECONDS: u32 = 8;
const DEPTHS: [u32; 2] = [1, 32];

#[derive(Debug, serde::Serialize)]
struct Row {
    policy: &'static str,
    iodepth: u32,
    result: FioResult,
}

pub fn run(binary: &Path) -> anyhow::Result<(serde_json::Value, String)> {
    let mut lab = Lab::new(binary, "exportlat", 1, DEVICE_BYTES)?;
    let mut rows = Vec::new();
    for iodepth in DEPTHS {
        let fio = crate::fio::finish(crate::fio::start_randwrite(
            &lab.primary_device.path,
            iodepth,
            ROUND_SECONDS,
        )?)?;
        rows.push(Row { policy: "raw device", iodepth, result: fio });
    }
    let rtt_ms = ping_ms(&lab)?;
    lab.start_secondary(0, &[])?;
    let socket = lab.dir.join("nbd.sock");
    let export = format!("nbd+unix:{}", socket.display());
    for policy in ["async", "sync"] {
        let args = ["--skip-initial-sync", "--sync-rate", "0", "--export", &export, "--write-policy", policy];
        let primary = lab.start_primary(&args)?;
        lab.wait_synchronized(std::time::Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
        for iodepth in DEPTHS {
            let fio = nbd_randwrite(&socket, iodepth, ROUND_SECONDS)
                .with_context(|| format!("fio through the export\n{}", lab.logs()))?;
            rows.push(Row {
                policy: if policy == "sync" { "export sync" } else { "export async" },
                iodepth,
                result: fio,
            });
        }
        lab.wait_in_sync(std::time::Duration::from_secs(120))
            .map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
        lab.processes[primary].stop();
    }
    let hashes = lab.hashes()?;
    anyhow::ensure!(hashes.iter().all(|h| *h == hashes[0]), "images differ after the export benchmark");

    let raw_p99 = |depth: u32| {
        rows.iter().find(|r| r.policy == "raw device" && r.iodepth == depth).map_or(0.0, |r| r.result.p99_us)
    };
    let mut md = format!(
        "### export-latency\n\n4 KiB random writes for {ROUND_SECONDS} s: fio's nbd engine through the export's unix \
         socket, one secondary over veth (ping round trip {rtt_ms:.3} ms); baseline: the same job with io_uring on the \
         raw primary device, no replicator running. Goal: sync p99 <= 2 x (raw p99 + round trip).\n\n\
         | path | iodepth | IOPS | p50 µs | p99 µs | p99.9 µs | p99 / (raw p99 + RTT) |\n|---|---|---|---|---|---|---|\n"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let budget_us = raw_p99(r.iodepth) + rtt_ms * 1000.0;
        let ratio = r.result.p99_us / budget_us.max(1.0);
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |\n",
            r.policy, r.iodepth, r.result.iops, r.result.p50_us, r.result.p99_us, r.result.p999_us, ratio
        ));
        json_rows.push(serde_json::json!({ "row": r, "p99_over_raw_p99_plus_rtt": ratio }));
    }
    md.push('\n');
    Ok((serde_json::json!({ "rtt_ms": rtt_ms, "rows": json_rows }), md))
}

/// fio's nbd engine (libnbd): 4 KiB random writes through the export at `iodepth`.
fn nbd_randwrite(socket: &Path, iodepth: u32, seconds: u32) -> anyhow::Result<FioResult> {
    let child = Command::new("fio")
        .args(["--name=export", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=256m"])
        .arg(format!("--uri=nbd+unix:///?socket={}", socket.display()))
        .arg(format!("--iodepth={iodepth}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--time_based", "--ramp_time=1", "--randrepeat=1", "--output-format=json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting fio with the nbd engine (package fio, built with libnbd)")?;
    crate::fio::finish(child)
}

/// The average round trip of 200 pings from the primary's namespace to the secondary.
fn ping_ms(lab: &Lab) -> anyhow::Result<f64> {
    let target = lab.secondary_addrs[0].ip().to_string();
    let out = run_command(
        "ip",
        &["netns", "exec", &lab.primary_ns.name, "ping", "-q", "-c", "200", "-i", "0.005", &target],
    )?;
    // rtt min/avg/max/mdev = 0.021/0.034/0.090/0.010 ms
    let stats = out.lines().find(|l| l.contains("min/avg/max")).context("ping printed no summary")?;
    let numbers = stats.split('=').nth(1).context("ping summary")?.trim();
    numbers.split('/').nth(1).context("ping average")?.parse().context("ping average")
}
