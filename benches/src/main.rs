//! The benchmark harness, run by `cargo xtask bench [SCENARIO...]`. Each scenario measures its
//! baseline in the same run, alternating rounds so drift in the machine hits both sides alike,
//! and reports ratios. Results go to `bench/results/<date>.json` and `<date>.md`.

mod export_latency;
mod fio;
mod lag;
mod report;
mod resync;
mod round_trip;
mod ship_throughput;
mod tracker_overhead;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "replicator benchmarks; each scenario runs with its baseline")]
struct Args {
    /// Scenarios to run (default: all). Known: tracker-overhead, ship-throughput, resync, lag,
    /// verify, export-latency.
    scenarios: Vec<String>,
    /// Seconds per fio round.
    #[arg(long, default_value_t = 8)]
    round_seconds: u32,
    /// Rounds per side (baseline and measured alternate).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Where results are written.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

const SCENARIOS: [&str; 6] =
    ["tracker-overhead", "ship-throughput", "resync", "lag", "verify", "export-latency"];

fn main() -> anyhow::Result<()> {
    if let Some(outcome) = round_trip::dispatch(&std::env::args().collect::<Vec<_>>()) {
        return outcome;
    }
    let args = Args::parse();
    let scenarios: Vec<String> =
        if args.scenarios.is_empty() { SCENARIOS.map(String::from).to_vec() } else { args.scenarios.clone() };
    // Check up front what a later scenario needs, rather than fail after minutes of measuring.
    for scenario in &scenarios {
        anyhow::ensure!(
            SCENARIOS.contains(&scenario.as_str()),
            "unknown scenario {scenario:?}; known: {}",
            SCENARIOS.join(", ")
        );
    }
    let binary =
        if scenarios.iter().any(|s| s != "tracker-overhead") { Some(replicator_binary()?) } else { None };
    let mut results = serde_json::Map::new();
    let mut sections = std::collections::BTreeMap::new();
    for scenario in &scenarios {
        let (json, md) = match scenario.as_str() {
            "tracker-overhead" => tracker_overhead::run(args.round_seconds, args.rounds)?,
            "ship-throughput" => ship_throughput::run(binary.as_deref().expect("resolved above"))?,
            "resync" => resync::run(binary.as_deref().expect("resolved above"))?,
            "lag" => lag::run(binary.as_deref().expect("resolved above"))?,
            "verify" => resync::run_verify(binary.as_deref().expect("resolved above"))?,
            "export-latency" => export_latency::run(binary.as_deref().expect("resolved above"))?,
            other => bail!("unknown scenario {other:?}; known: {}", SCENARIOS.join(", ")),
        };
        results.insert(scenario.clone(), json);
        sections.insert(scenario.clone(), md);
    }
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
    let date = replicator_date();
    let json_path = args.out_dir.join(format!("{date}.json"));
    let md_path = args.out_dir.join(format!("{date}.md"));
    // A run of some scenarios keeps the other scenarios' results of the same day.
    report::merge_earlier(&json_path, &md_path, &mut results, &mut sections)?;
    let mut markdown: String =
        SCENARIOS.iter().filter_map(|s| sections.get(*s)).map(String::as_str).collect();
    if let Some(resync) = results.get("resync") {
        let plot = args.out_dir.join(format!("{date}-resync.svg"));
        report::plot_resync(resync, &plot)?;
        markdown.push_str(&format!("Plot: `{}`.\n", plot.display()));
        if SCENARIOS.iter().all(|s| sections.contains_key(*s)) {
            report::update_readme(
                std::path::Path::new("README.md"),
                &markdown,
                &date,
                &plot.display().to_string(),
            )?;
            println!("README.md: Performance section regenerated");
        }
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    std::fs::write(&md_path, &markdown)?;
    println!("{markdown}");
    println!("results: {} and {}", json_path.display(), md_path.display());
    Ok(())
}

/// The median of `values` (the upper middle of an even count): each figure a scenario reports
/// over rounds.
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    assert!(!values.is_empty(), "a median of no rounds");
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The replicator binary the multi-process scenarios start (`cargo xtask bench` sets it).
fn replicator_binary() -> anyhow::Result<PathBuf> {
    let binary = std::env::var_os("REPLICATOR_BIN")
        .map(PathBuf::from)
        .context("REPLICATOR_BIN is not set; run `cargo xtask bench`")?;
    anyhow::ensure!(binary.exists(), "REPLICATOR_BIN={} does not exist", binary.display());
    Ok(binary)
}

/// Today's date as YYYY-MM-DD, from `date` (no time crate needed for a file name).
fn replicator_date() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "undated".into())
}
