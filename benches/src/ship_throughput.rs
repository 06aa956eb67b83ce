//! ship-throughput: a sequential 2 GiB rewrite of the primary, shipped over veth between network
//! namespaces to one and to two secondaries, with zero-copy and with plain sends; the baseline
//! is iperf3 on the same veth path, in the same run. Reports MiB/s, the ratio to iperf3, and
//! the primary's CPU seconds per GiB shipped.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use replicator::testbed::{Lab, run_command};

const DEVICE_BYTES: u64 = 2 << 30;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, serde::Serialize)]
struct Run {
    secondaries: usize,
    zero_copy: bool,
    shipped_bytes_per_secondary: u64,
    seconds: f64,
    mib_per_s: f64,
    ratio_to_iperf3: f64,
    primary_cpu_seconds_per_gib: f64,
}

pub fn run(binary: &Path) -> anyhow::Result<(serde_json::Value, String)> {
    let iperf3_mib_per_s = iperf3_baseline(binary)?;
    let mut runs = Vec::new();
    for (secondaries, zero_copy) in [(1, true), (1, false), (2, true), (2, false)] {
        eprintln!("ship-throughput: {secondaries} secondaries, zero copy {zero_copy}");
        let mut run = ship(binary, secondaries, zero_copy)?;
        run.ratio_to_iperf3 = run.mib_per_s / iperf3_mib_per_s;
        runs.push(run);
    }
    let mut md = format!(
        "### ship-throughput\n\nSequential 2 GiB rewrite of the primary (fio, 1 MiB O_DIRECT writes), shipped over veth \
         between network namespaces; time from the first write to every secondary acknowledging. \
         iperf3 on the same path: {iperf3_mib_per_s:.0} MiB/s.\n\n\
         | secondaries | send | MiB/s | of iperf3 | primary CPU s/GiB |\n|---|---|---|---|---|\n"
    );
    for r in &runs {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} |\n",
            r.secondaries,
            if r.zero_copy { "zero-copy" } else { "plain" },
            r.mib_per_s,
            r.ratio_to_iperf3,
            r.primary_cpu_seconds_per_gib
        ));
    }
    md.push('\n');
    Ok((serde_json::json!({ "iperf3_mib_per_s": iperf3_mib_per_s, "runs": runs }), md))
}

/// iperf3 from the primary's namespace to a secondary's, over the same kind of veth link.
fn iperf3_baseline(binary: &Path) -> anyhow::Result<f64> {
    let lab = Lab::new(binary, "iperf", 1, 1 << 20)?;
    let mut server = lab.secondary_ns[0].command(Path::new("iperf3"));
    server.args(["-s", "-1"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut server = server.spawn().context("starting iperf3 (package iperf3)")?;
    std::thread::sleep(Duration::from_millis(500));
    let addr = lab.secondary_addrs[0].ip().to_string();
    let output = lab.primary_ns.command(Path::new("iperf3")).args(["-c", &addr, "-t", "5", "-J"]).output()?;
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).context("parsing iperf3's JSON")?;
    let bits =
        json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 reported no throughput")?;
    Ok(bits / 8.0 / MIB)
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat format")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks / hz)
}

fn ship(binary: &Path, secondaries: usize, zero_copy: bool) -> anyhow::Result<Run> {
    let mut lab = Lab::new(binary, "ship", secondaries, DEVICE_BYTES)?;
    // Fill every image with zeros first, so no side pays for tmpfs allocating pages (that alone
    // caps a fresh loop device near 650 MiB/s here) and the images start identical.
    for device in std::iter::once(&lab.primary_device).chain(&lab.secondary_devices) {
        let of = format!("of={}", device.path.display());
        run_command("dd", &["if=/dev/zero", &of, "bs=1M", "oflag=direct", "status=none"])
            .or_else(|e| if e.to_string().contains("No space left") { Ok(String::new()) } else { Err(e) })?;
    }
    for i in 0..secondaries {
        lab.start_secondary(i, &[])?;
    }
    let mut args = vec!["--skip-initial-sync"];
    if !zero_copy {
        args.push("--no-zero-copy");
    }
    let primary = lab.start_primary(&args)?;
    lab.wait_in_sync(Duration::from_secs(30)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    let pid = lab.processes[primary].child.id();
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    crate::fio::sequential_write(&lab.primary_device.path, "2g")?;
    let status =
        lab.wait_in_sync(Duration::from_secs(120)).map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    // wait_in_sync holds for a settle period after the last ack; take it off.
    let seconds = started.elapsed().as_secs_f64() - 0.6;
    let cpu = cpu_seconds(pid)? - cpu_before;
    let shipped = status["secondaries"][0]["shipped_bytes"].as_u64().unwrap_or(0);
    let hashes = lab.hashes()?;
    anyhow::ensure!(hashes.iter().all(|h| *h == hashes[0]), "images differ after the benchmark");
    Ok(Run {
        secondaries,
        zero_copy,
        shipped_bytes_per_secondary: shipped,
        seconds,
        mib_per_s: shipped as f64 / MIB / seconds,
        ratio_to_iperf3: 0.0,
        primary_cpu_seconds_per_gib: cpu / (shipped as f64 * secondaries as f64 / (1u64 << 30) as f64),
    })
}
