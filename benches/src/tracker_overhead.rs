//! tracker-overhead: fio 4 KiB random writes on a loop device over /dev/shm, with the tracker
//! detached (baseline) and attached (draining every 10 ms, as a primary would), alternating
//! rounds. Queue depth 32 is the target; queue depth 1 shows the per-write cost without
//! queueing noise. Reports IOPS and latency percentiles, and the ratios.

use std::time::Duration;

use anyhow::Context as _;
use replicator::testbed::{LoopDevice, run_command};
use replicator::{Tracker, TrackerOptions};

use crate::fio::{self, FioResult};

const DEVICE_BYTES: u64 = 1 << 30;
const IODEPTHS: [u32; 2] = [32, 1];
const DRAIN_INTERVAL_MS: u64 = 10;

pub fn run(round_seconds: u32, rounds: u32) -> anyhow::Result<(serde_json::Value, String)> {
    let device = LoopDevice::create("bench", DEVICE_BYTES)?;
    // Fill once so that no round pays for tmpfs allocating pages.
    let dev = device.path.to_str().context("device path")?;
    run_command("dd", &["if=/dev/zero", &format!("of={dev}"), "bs=1M", "oflag=direct", "status=none"])
        .or_else(|e| if e.to_string().contains("No space left") { Ok(String::new()) } else { Err(e) })?;
    let mut json = serde_json::Map::new();
    let mut md = format!(
        "### tracker-overhead\n\nfio randwrite 4 KiB, O_DIRECT, io_uring, latency from submission (fio's `lat`); loop device over /dev/shm (1 GiB); \
         64 KiB extents; median of {rounds} alternating rounds of {round_seconds} s per side.\n\n\
         | iodepth | tracker | IOPS | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|---|---|\n"
    );
    for iodepth in IODEPTHS {
        let mut detached = Vec::new();
        let mut attached = Vec::new();
        for round in 0..rounds {
            eprintln!("tracker-overhead: iodepth {iodepth}, round {}/{rounds}", round + 1);
            detached.push(fio::finish(fio::start_randwrite(&device.path, iodepth, round_seconds)?)?);
            attached.push(run_attached(&device, iodepth, round_seconds)?);
        }
        let (base, with) = (median(&detached), median(&attached));
        json.insert(
            format!("iodepth_{iodepth}"),
            serde_json::json!({
                "detached": detached, "attached": attached,
                "median_detached": base, "median_attached": with,
                "iops_ratio": with.iops / base.iops,
                "p99_added_us": with.p99_us - base.p99_us,
            }),
        );
        md.push_str(&format!(
            "| {iodepth} | detached | {:.0} | {:.1} | {:.1} | {:.1} |\n\
             | {iodepth} | attached | {:.0} | {:.1} | {:.1} | {:.1} |\n\
             | {iodepth} | ratio (delta µs) | {:.3}x | {:.2}x ({:+.1}) | {:.2}x ({:+.1}) | {:.2}x ({:+.1}) |\n",
            base.iops,
            base.p50_us,
            base.p99_us,
            base.p999_us,
            with.iops,
            with.p50_us,
            with.p99_us,
            with.p999_us,
            with.iops / base.iops,
            with.p50_us / base.p50_us,
            with.p50_us - base.p50_us,
            with.p99_us / base.p99_us,
            with.p99_us - base.p99_us,
            with.p999_us / base.p999_us,
            with.p999_us - base.p999_us,
        ));
    }
    let costs = program_costs(&device, round_seconds)?;
    md.push_str(
        "\nPer-event cost of each program (kernel `bpf_stats`, iodepth 32, a separate round: \
                 enabling the stats adds two clock reads per event, so this is an upper bound):\n\n\
                 | program | events | ns/event |\n|---|---|---|\n",
    );
    for cost in &costs {
        md.push_str(&format!("| {} | {} | {:.0} |\n", cost.program, cost.events, cost.ns_per_event));
    }
    json.insert("program_costs".into(), serde_json::to_value(&costs)?);
    md.push('\n');
    Ok((serde_json::Value::Object(json), md))
}

fn run_attached(device: &LoopDevice, iodepth: u32, round_seconds: u32) -> anyhow::Result<FioResult> {
    let options =
        TrackerOptions { name: Some(format!("bench-{}", std::process::id())), ..Default::default() };
    let mut tracker = Tracker::attach_with(&device.path, &options)?;
    let mut child = fio::start_randwrite(&device.path, iodepth, round_seconds)?;
    let mut drained_runs = 0u64;
    while child.try_wait()?.is_none() {
        drained_runs += tracker.drain_completed().count() as u64;
        std::thread::sleep(Duration::from_millis(DRAIN_INTERVAL_MS));
    }
    let result = fio::finish(child);
    let counters = tracker.counters();
    tracker.stop()?;
    eprintln!("tracker-overhead: attached round drained {drained_runs} runs; {counters:?}");
    result
}

/// The round with the median IOPS (its latencies go with it).
fn median(results: &[FioResult]) -> FioResult {
    let mut sorted = results.to_vec();
    sorted.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    sorted[sorted.len() / 2]
}

#[derive(Debug, serde::Serialize)]
struct ProgramCost {
    program: String,
    events: u64,
    ns_per_event: f64,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Runs one attached round with the kernel's BPF run-time statistics on, and reads each of the
/// tracker's programs' run time per event from `bpftool prog show --json`.
fn program_costs(device: &LoopDevice, round_seconds: u32) -> anyhow::Result<Vec<ProgramCost>> {
    std::fs::write(BPF_STATS, "1").with_context(|| format!("enabling {BPF_STATS}"))?;
    let result = (|| {
        let options =
            TrackerOptions { name: Some(format!("bench-cost-{}", std::process::id())), ..Default::default() };
        let mut tracker = Tracker::attach_with(&device.path, &options)?;
        let child = fio::start_randwrite(&device.path, 32, round_seconds)?;
        let fio_result = fio::finish(child);
        let listing =
            run_command("bpftool", &["prog", "show", "--json"]).context("bpftool (package bpftool)");
        let _ = tracker.drain_completed().count();
        tracker.stop()?;
        fio_result?;
        parse_costs(&listing?)
    })();
    std::fs::write(BPF_STATS, "0").with_context(|| format!("disabling {BPF_STATS}"))?;
    result
}

fn parse_costs(json: &str) -> anyhow::Result<Vec<ProgramCost>> {
    let programs: serde_json::Value = serde_json::from_str(json).context("parsing bpftool's JSON")?;
    let costs = programs
        .as_array()
        .context("bpftool printed no list")?
        .iter()
        .filter_map(|p| {
            let program = p["name"].as_str()?.to_owned();
            let events = p["run_cnt"].as_u64()?;
            let run_ns = p["run_time_ns"].as_u64()?;
            (program.starts_with("replicator_") && events > 0).then(|| ProgramCost {
                program,
                events,
                ns_per_event: run_ns as f64 / events as f64,
            })
        })
        .collect();
    Ok(costs)
}
