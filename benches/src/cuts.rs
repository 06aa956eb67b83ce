//! cuts: what consistent cuts cost and what they give, against the same mirror without them
//! (`--cut-interval-ms 0`), in the same run.
//!
//! - the application's write latency: fio 64 KiB random writes (iodepth 4) at half the rate
//!   the mirror sustains, with no cuts, cuts every 1 s and every 100 ms, the configurations alternating
//!   over rounds; p99 of each round, median and spread over the rounds;
//! - the recovery point: how old the secondary's last cut is, sampled every 20 ms from the
//!   primary's status (`cut_age_ms`: what the secondary would hold if the primary were lost at
//!   that instant), at 25, 50 and 90% of the sustained rate, cuts every 100 ms;
//! - the secondary's write amplification: bytes it wrote (journal and image) per byte it
//!   received, from its metrics; and the rate the mirror sustains with and without cuts.

use std::path::Path;
use std::time::{Duration, Instant};

use replicator::testbed::{Lab, run_command};

const DEVICE_BYTES: u64 = 1 << 30;
const ROUND_SECONDS: u32 = 8;
const ROUNDS: usize = 3;
const INTERVALS_MS: [u64; 3] = [0, 1000, 100];
const LOADS: [f64; 3] = [0.25, 0.5, 0.9];
const MIB: f64 = 1024.0 * 1024.0;
const METRICS_PORT: u16 = 9190;

#[derive(Debug, serde::Serialize)]
struct Latency {
    interval_ms: u64,
    /// fio's write p99 of each round, µs.
    p99_us: Vec<f64>,
    p99_median_us: f64,
    /// The median p99 over the median p99 without cuts.
    ratio_to_no_cuts: f64,
}

#[derive(Debug, serde::Serialize)]
struct RecoveryPoint {
    load: f64,
    rate_mib_per_s: f64,
    samples: usize,
    cut_age_p50_ms: f64,
    cut_age_p99_ms: f64,
    cut_age_max_ms: f64,
}

pub fn run(binary: &Path) -> anyhow::Result<(serde_json::Value, String)> {
    let mut lab = Lab::new(binary, "cuts", 1, DEVICE_BYTES)?;
    for device in [&lab.primary_device, &lab.secondary_devices[0]] {
        let of = format!("of={}", device.path.display());
        run_command("dd", &["if=/dev/zero", &of, "bs=1M", "oflag=direct", "status=none", "count=1024"])?;
    }
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    lab.start_secondary(0, &["--metrics", &metrics])?;
    let mut primary = start(&mut lab, None, 0)?;
    let max_without = sustained_mib_per_s(&lab)?;
    lab.processes[primary].stop();
    primary = start(&mut lab, None, 100)?;
    let max_with = sustained_mib_per_s(&lab)?;
    eprintln!(
        "cuts: the mirror sustains {max_without:.0} MiB/s without cuts, {max_with:.0} with cuts every 100 ms"
    );
    let before = secondary_bytes(&lab)?;
    let latencies = latencies(&mut lab, &mut primary, max_without)?;
    let points = recovery_points(&mut lab, &mut primary, max_with)?;
    let after = secondary_bytes(&lab)?;
    let received = after.written - before.written;
    let amplification = (received + after.applied - before.applied) as f64 / (received.max(1)) as f64;
    let hashes = lab.hashes()?;
    anyhow::ensure!(hashes.iter().all(|h| *h == hashes[0]), "images differ after the cuts benchmark");
    let md = report(&latencies, &points, (max_without, max_with), amplification);
    let json = serde_json::json!({
        "max_mib_per_s_without_cuts": max_without,
        "max_mib_per_s_with_cuts": max_with,
        "throughput_ratio": max_with / max_without,
        "latency": latencies,
        "recovery_point": points,
        "secondary_bytes_written_per_byte_received": amplification,
    });
    Ok((json, md))
}

/// (Re)starts the primary with cuts every `interval_ms` (0: none) and waits until in sync.
fn start(lab: &mut Lab, previous: Option<usize>, interval_ms: u64) -> anyhow::Result<usize> {
    if let Some(previous) = previous {
        lab.processes[previous].stop();
    }
    let interval = interval_ms.to_string();
    let primary =
        lab.start_primary(&["--skip-initial-sync", "--sync-rate", "0", "--cut-interval-ms", &interval])?;
    synchronized(lab)?;
    Ok(primary)
}

/// A 512 MiB sequential write, timed until the secondary has acknowledged it.
fn sustained_mib_per_s(lab: &Lab) -> anyhow::Result<f64> {
    let started = Instant::now();
    crate::fio::sequential_write(&lab.primary_device.path, "512m")?;
    synchronized(lab)?;
    Ok(512.0 / (started.elapsed().as_secs_f64() - 0.6).max(0.1))
}

/// The write p99 of rated random writes, the configurations alternating over `ROUNDS` rounds.
fn latencies(lab: &mut Lab, primary: &mut usize, max_mib_per_s: f64) -> anyhow::Result<Vec<Latency>> {
    let rate = (max_mib_per_s * 0.5 * MIB) as u64;
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); INTERVALS_MS.len()];
    for round in 0..ROUNDS {
        for (i, &interval_ms) in INTERVALS_MS.iter().enumerate() {
            *primary = start(lab, Some(*primary), interval_ms)?;
            eprintln!("cuts: round {round}, cuts every {interval_ms} ms, {:.0} MiB/s", rate as f64 / MIB);
            let fio = crate::fio::finish(crate::fio::start_rated_randwrite(
                &lab.primary_device.path,
                rate,
                ROUND_SECONDS,
            )?)?;
            p99s[i].push(fio.p99_us);
        }
    }
    let baseline = crate::median(p99s[0].iter().copied());
    Ok(INTERVALS_MS
        .iter()
        .zip(p99s)
        .map(|(&interval_ms, p99_us)| {
            let p99_median_us = crate::median(p99_us.iter().copied());
            Latency { interval_ms, p99_us, p99_median_us, ratio_to_no_cuts: p99_median_us / baseline }
        })
        .collect())
}

/// The age of the secondary's last cut, sampled through rated random writes at each load.
fn recovery_points(
    lab: &mut Lab,
    primary: &mut usize,
    max_mib_per_s: f64,
) -> anyhow::Result<Vec<RecoveryPoint>> {
    let mut points = Vec::new();
    for load in LOADS {
        *primary = start(lab, Some(*primary), 100)?;
        let rate = (max_mib_per_s * load * MIB) as u64;
        eprintln!("cuts: recovery point at {:.0}% load, {:.0} MiB/s", load * 100.0, rate as f64 / MIB);
        let fio = crate::fio::start_rated_randwrite(&lab.primary_device.path, rate, ROUND_SECONDS)?;
        let mut ages = Vec::new();
        let until = Instant::now() + Duration::from_secs(u64::from(ROUND_SECONDS));
        std::thread::sleep(Duration::from_secs(1)); // past the ramp
        while Instant::now() < until {
            if let Some(age) = lab.status().and_then(|s| s["secondaries"][0]["cut_age_ms"].as_f64()) {
                ages.push(age);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        crate::fio::finish(fio)?;
        anyhow::ensure!(!ages.is_empty(), "no status sampled at {load} load");
        ages.sort_by(f64::total_cmp);
        let at = |q: f64| ages[((ages.len() - 1) as f64 * q).round() as usize];
        points.push(RecoveryPoint {
            load,
            rate_mib_per_s: rate as f64 / MIB,
            samples: ages.len(),
            cut_age_p50_ms: at(0.5),
            cut_age_p99_ms: at(0.99),
            cut_age_max_ms: at(1.0),
        });
    }
    Ok(points)
}

struct SecondaryBytes {
    written: u64,
    applied: u64,
}

/// The secondary's byte counters, from its metrics (inside its namespace).
fn secondary_bytes(lab: &Lab) -> anyhow::Result<SecondaryBytes> {
    let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
    let text = run_command("ip", &["netns", "exec", &lab.secondary_ns[0].name, "curl", "-s", &url])?;
    let value = |name: &str| {
        text.lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Ok(SecondaryBytes {
        written: value("replicator_written_bytes_total"),
        applied: value("replicator_applied_bytes_total"),
    })
}

fn report(
    latencies: &[Latency],
    points: &[RecoveryPoint],
    (without, with): (f64, f64),
    amplification: f64,
) -> String {
    let mut md = format!(
        "### cuts\n\nOne secondary over veth, 1 GiB image, 64 KiB extents. Write latency: fio 64 KiB random writes \
         (O_DIRECT, iodepth 4) at half the rate the mirror sustains, {ROUNDS} rounds of {ROUND_SECONDS} s per \
         configuration, alternating; baseline: the same mirror with no cuts (`--cut-interval-ms 0`).\n\n\
         | cuts every | write p99 µs, median (rounds) | over no cuts |\n|---|---|---|\n"
    );
    for l in latencies {
        let rounds: Vec<String> = l.p99_us.iter().map(|p| format!("{p:.0}")).collect();
        let every = if l.interval_ms == 0 { "no cuts".to_owned() } else { format!("{} ms", l.interval_ms) };
        md.push_str(&format!(
            "| {every} | {:.0} ({}) | {:.3} |\n",
            l.p99_median_us,
            rounds.join(", "),
            l.ratio_to_no_cuts
        ));
    }
    md.push_str(
        "\nRecovery point: the age of the secondary's last cut (what it would hold if the primary were lost at that \
         instant), sampled every 20 ms from the primary's status, cuts every 100 ms.\n\n\
         | load | MiB/s | samples | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n",
    );
    for p in points {
        md.push_str(&format!(
            "| {:.0}% | {:.0} | {} | {:.0} | {:.0} | {:.0} |\n",
            p.load * 100.0,
            p.rate_mib_per_s,
            p.samples,
            p.cut_age_p50_ms,
            p.cut_age_p99_ms,
            p.cut_age_max_ms
        ));
    }
    md.push_str(&format!(
        "\nSustained rate (512 MiB sequential, until acknowledged): {without:.0} MiB/s without cuts, {with:.0} MiB/s \
         with cuts every 100 ms ({:.2}x). The secondary wrote {amplification:.2} bytes (journal and image) per byte \
         it received over the whole scenario.\n\n",
        with / without
    ));
    md
}

fn synchronized(lab: &Lab) -> anyhow::Result<serde_json::Value> {
    lab.wait_synchronized(Duration::from_secs(120)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))
}
