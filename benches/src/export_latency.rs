//! export-latency: 4 KiB random writes through the NBD export (fio's nbd engine, over the
//! export's unix socket) at queue depth 1 and 32, under the async and the sync write policy,
//! with one secondary over veth. Baseline, in the same run: the same fio job on the raw
//! primary device (io_uring, O_DIRECT) with no replicator running, and the network round trip
//! over the same veth, measured two ways: ICMP ping (answered by the far kernel) and a TCP
//! exchange between two processes of a sync write's sizes (`round_trip`), which is the round
//! trip a replicating process pays. Goal: sync p99 within 2x of (primary write p99 + one round
//! trip); the table gives the ratio against each. A peer, in the same run: qemu-nbd serving the
//! same device to the same fio job, with no replication (what NBD costs alone). And the sync
//! export again on a 1 TiB device (sparse files; fio writes its first 256 MiB), in the same
//! rounds: the engine's work per loop turn must not grow with the size of the device. And the
//! sync export with busy-polling off (`--poll-us 0`): by default the primary and the secondary
//! spin for their next completion while sync writes through the export flow. And the sync
//! export with the host's TCP congestion control on its link (`--tcp-congestion system`)
//! instead of the replicator's default.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use replicator::testbed::{Lab, run_command};

use crate::fio::FioResult;

const DEVICE_BYTES: u64 = 256 << 20;
const LARGE_DEVICE_BYTES: u64 = 1 << 40;
/// What fio writes (`--size`), on either device.
const FIO_BYTES: u64 = 256 << 20;
const ROUND_SECONDS: u32 = 5;
/// Rounds of every path; the table gives the median of each figure.
const ROUNDS: usize = 3;
const DEPTHS: [u32; 2] = [1, 32];
/// The row without busy-polling, on the primary and the secondary (the other rows poll as by
/// default: only the sync export's, while its writes flow).
const POLL: [&str; 2] = ["--poll-us", "0"];
const POLL_LABEL: &str = "export sync, --poll-us 0";
/// The row with the host's TCP congestion control on the link, on both ends, instead of the
/// replicator's default (`replicator::link`).
const SYSTEM_CONGESTION: [&str; 2] = ["--tcp-congestion", replicator::link::CONGESTION_SYSTEM];
const SYSTEM_CONGESTION_LABEL: &str = "export sync, --tcp-congestion system";
/// The host's default congestion control, which a new namespace starts with.
const HOST_CONGESTION_PATH: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

#[derive(Debug, serde::Serialize)]
struct Row {
    policy: &'static str,
    iodepth: u32,
    result: FioResult,
}

pub fn run(binary: &Path) -> anyhow::Result<(serde_json::Value, String)> {
    let mut lab = Lab::new(binary, "exportlat", 1, DEVICE_BYTES)?;
    let rtt_ms = ping_ms(&lab)?;
    // Each figure is the median over ROUNDS rounds. The baselines' rounds come first, before
    // the replicator's tracker is attached (it stays attached between the primary's runs).
    let mut rounds: Vec<Row> = Vec::new();
    let mut tcp_rounds = Vec::new();
    for _ in 0..ROUNDS {
        for iodepth in DEPTHS {
            let fio = crate::fio::finish(crate::fio::start_randwrite(
                &lab.primary_device.path,
                iodepth,
                ROUND_SECONDS,
            )?)?;
            rounds.push(Row { policy: "raw device", iodepth, result: fio });
        }
        rounds.extend(qemu_nbd_rows(&lab.primary_device.path, &lab.dir)?);
        tcp_rounds.push(crate::round_trip::measure(&lab)?);
    }
    let mut secondary = lab.start_secondary(0, &[])?;
    let mut large = Lab::new(binary, "exportbig", 1, LARGE_DEVICE_BYTES)?;
    // fio's range holds zeros on both large images before the rounds, as the small lab's
    // images hold data (the baselines wrote it, the initial copy shipped it): otherwise the
    // large lab alone would pay for tmpfs allocating pages on its first writes.
    for device in [&large.primary_device, &large.secondary_devices[0]] {
        let of = format!("of={}", device.path.display());
        let count = format!("count={}", FIO_BYTES >> 20);
        run_command("dd", &["if=/dev/zero", &of, "bs=1M", &count, "oflag=direct", "status=none"])?;
    }
    large.start_secondary(0, &[])?;
    for _ in 0..ROUNDS {
        // Both large images are zero: no initial sync needed.
        rounds.extend(export_rows(
            &mut large,
            "export sync, 1 TiB device",
            "sync",
            &["--skip-initial-sync"],
        )?);
        // The first start copies the whole image (the baselines wrote it); later ones only what
        // the other policy's round left behind, if anything.
        rounds.extend(export_rows(&mut lab, "export async", "async", &[])?);
        rounds.extend(export_rows(&mut lab, "export sync", "sync", &[])?);
        for (label, extra) in [(POLL_LABEL, &POLL), (SYSTEM_CONGESTION_LABEL, &SYSTEM_CONGESTION)] {
            secondary = restart_secondary(&mut lab, secondary, extra)?;
            rounds.extend(export_rows(&mut lab, label, "sync", extra)?);
            secondary = restart_secondary(&mut lab, secondary, &[])?;
        }
    }
    let rows = medians(&rounds);
    let tcp = crate::round_trip::RoundTrip {
        p50_us: crate::median(tcp_rounds.iter().map(|r| r.p50_us)),
        p99_us: crate::median(tcp_rounds.iter().map(|r| r.p99_us)),
    };
    let hashes = lab.hashes()?;
    anyhow::ensure!(hashes.iter().all(|h| *h == hashes[0]), "images differ after the export benchmark");
    // The large images: the range fio wrote (the rest was never written on either).
    let read = |device: &Path| replicator::testbed::read_range_direct(device, 0, FIO_BYTES as usize);
    anyhow::ensure!(
        read(&large.primary_device.path)? == read(&large.secondary_devices[0].path)?,
        "the 1 TiB images differ in the range fio wrote"
    );

    let raw_p99 = |depth: u32| {
        rows.iter().find(|r| r.policy == "raw device" && r.iodepth == depth).map_or(0.0, |r| r.result.p99_us)
    };
    let link_cc = replicator::link::CONGESTION_DEFAULT;
    let host_cc = std::fs::read_to_string(HOST_CONGESTION_PATH)
        .map_or_else(|e| format!("unknown: {HOST_CONGESTION_PATH}: {e}"), |s| s.trim().to_owned());
    let mut md = format!(
        "### export-latency\n\n4 KiB random writes, {ROUNDS} rounds of {ROUND_SECONDS} s per path, medians: fio's nbd engine through the export's unix \
         socket, one secondary over veth; baseline: the same job with io_uring on the raw primary device, no \
         replicator running; and qemu-nbd serving the same device to the same job, without replication. \
         The network round trip, two ways: ping {ping_us:.0} µs (average; the far kernel \
         answers), and a TCP exchange between two processes, 4 KiB out and 16 bytes back, as a sync write's frame \
         and ack: p50 {tcp_p50:.0} µs, p99 {tcp_p99:.0} µs. Goal: sync p99 <= 2 x (raw p99 + round trip). \
         `export sync, 1 TiB device`: the same sync export on a 1 TiB device (sparse; fio's 256 MiB range \
         zeroed on both images first, as the small lab's images are written before its rounds), in the same \
         rounds, against the same baseline: the engine's work per write does not grow with the device. \
         `export sync` runs as by default: the primary and the secondary spin up to 200 µs for their next \
         completion (yielding the CPU) while sync writes flow; `{POLL_LABEL}`: the same with busy-polling off. \
         The link, and the TCP exchange, use the replicator's default congestion control ({link_cc}); \
         `{SYSTEM_CONGESTION_LABEL}`: the sync export with the host's ({host_cc}) on both ends. \
         Latencies are fio's `lat`, the whole write from its submission.\n\n\
         | path | iodepth | IOPS | p50 µs | p99 µs | p99.9 µs | p99 / (raw p99 + TCP p99) | p99 / (raw p99 + ping) |\n\
         |---|---|---|---|---|---|---|---|\n",
        ping_us = rtt_ms * 1000.0,
        tcp_p50 = tcp.p50_us,
        tcp_p99 = tcp.p99_us,
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let over_ping = r.result.p99_us / (raw_p99(r.iodepth) + rtt_ms * 1000.0).max(1.0);
        let over_tcp = r.result.p99_us / (raw_p99(r.iodepth) + tcp.p99_us).max(1.0);
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |\n",
            r.policy,
            r.iodepth,
            r.result.iops,
            r.result.p50_us,
            r.result.p99_us,
            r.result.p999_us,
            over_tcp,
            over_ping
        ));
        json_rows.push(serde_json::json!({
            "row": r,
            "p99_over_raw_p99_plus_tcp_p99": over_tcp,
            "p99_over_raw_p99_plus_rtt": over_ping,
        }));
    }
    md.push('\n');
    Ok((
        serde_json::json!({ "rtt_ms": rtt_ms, "tcp_round_trip": tcp, "rows": json_rows, "rounds": rounds }),
        md,
    ))
}

/// Stops `lab`'s secondary (process `index`) and starts it again with `extra`; returns the new
/// process index.
fn restart_secondary(lab: &mut Lab, index: usize, extra: &[&str]) -> anyhow::Result<usize> {
    lab.processes[index].stop();
    Ok(lab.start_secondary(0, extra)?)
}

/// One round through the export of `lab`'s primary under write `policy`: the primary started
/// with `extra`, in sync, then fio at every depth, then in sync again before it stops.
fn export_rows(lab: &mut Lab, label: &'static str, policy: &str, extra: &[&str]) -> anyhow::Result<Vec<Row>> {
    let socket = lab.dir.join("nbd.sock");
    let export = format!("nbd+unix:{}", socket.display());
    let mut args = vec!["--sync-rate", "0", "--export", &export, "--write-policy", policy];
    args.extend_from_slice(extra);
    let primary = lab.start_primary(&args)?;
    lab.wait_synchronized(std::time::Duration::from_secs(60))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    let mut rows = Vec::new();
    for iodepth in DEPTHS {
        let fio = nbd_randwrite(&socket, iodepth, ROUND_SECONDS)
            .with_context(|| format!("fio through the export ({label})\n{}", lab.logs()))?;
        rows.push(Row { policy: label, iodepth, result: fio });
    }
    lab.wait_in_sync(std::time::Duration::from_secs(120))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    lab.processes[primary].stop();
    Ok(rows)
}

/// The peer without replication: qemu-nbd serving the primary device (O_DIRECT, Linux AIO)
/// over a unix socket to the same fio job. What the NBD client and a mature server cost alone.
fn qemu_nbd_rows(device: &Path, dir: &Path) -> anyhow::Result<Vec<Row>> {
    let socket = dir.join("qemu-nbd.sock");
    let mut server = Command::new("qemu-nbd")
        .args(["--persistent", "--format=raw", "--cache=none", "--aio=native", "--socket"])
        .arg(&socket)
        .arg(device)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-nbd (package qemu-utils)")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        if std::time::Instant::now() > deadline || server.try_wait().ok().flatten().is_some() {
            let _ = server.kill();
            let output = server.wait_with_output().context("qemu-nbd")?;
            anyhow::bail!("qemu-nbd did not start: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let rows = DEPTHS
        .iter()
        .map(|&iodepth| {
            let result = nbd_randwrite(&socket, iodepth, ROUND_SECONDS).context("fio through qemu-nbd")?;
            Ok(Row { policy: "qemu-nbd (no replication)", iodepth, result })
        })
        .collect();
    let _ = server.kill();
    let _ = server.wait();
    rows
}

/// Per path and depth, the median of each figure over the rounds.
fn medians(rounds: &[Row]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for r in rounds {
        if rows.iter().any(|row| row.policy == r.policy && row.iodepth == r.iodepth) {
            continue;
        }
        let same: Vec<&FioResult> = rounds
            .iter()
            .filter(|o| o.policy == r.policy && o.iodepth == r.iodepth)
            .map(|o| &o.result)
            .collect();
        let median = |f: fn(&FioResult) -> f64| crate::median(same.iter().map(|r| f(r)));
        let result = FioResult {
            iops: median(|r| r.iops),
            p50_us: median(|r| r.p50_us),
            p99_us: median(|r| r.p99_us),
            p999_us: median(|r| r.p999_us),
        };
        rows.push(Row { policy: r.policy, iodepth: r.iodepth, result });
    }
    rows
}

/// fio's nbd engine (libnbd): 4 KiB random writes through the export at `iodepth`.
fn nbd_randwrite(socket: &Path, iodepth: u32, seconds: u32) -> anyhow::Result<FioResult> {
    let child = Command::new("fio")
        .args(["--name=export", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"])
        .arg(crate::fio::LATENCY_PERCENTILES)
        .arg(format!("--size={FIO_BYTES}"))
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
