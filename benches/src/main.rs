//! The benchmark harness, run by `cargo xtask bench [SCENARIO...]`. Each scenario measures its
//! baseline in the same run, alternating rounds so drift in the machine hits both sides alike,
//! and reports ratios. Results go to `bench/results/<date>.json` and `<date>.md`.

mod cuts;
mod export_latency;
mod fio;
mod goals;
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
    /// verify, export-latency, cuts.
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

/// The document whose generated section a run with every scenario's results rewrites,
/// relative to the workspace root (`cargo xtask bench` runs the harness there).
const BENCHMARKS_DOC: &str = "docs/benchmarks.md";

const SCENARIOS: [&str; 7] =
    ["tracker-overhead", "ship-throughput", "resync", "lag", "verify", "export-latency", "cuts"];

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
    let run_started = std::time::Instant::now();
    let commit = git_commit();
    for scenario in &scenarios {
        let started = std::time::Instant::now();
        let measured_at = now_utc();
        let (mut json, mut md) = match scenario.as_str() {
            "tracker-overhead" => tracker_overhead::run(args.round_seconds, args.rounds)?,
            "ship-throughput" => ship_throughput::run(binary.as_deref().expect("resolved above"))?,
            "resync" => resync::run(binary.as_deref().expect("resolved above"))?,
            "lag" => lag::run(binary.as_deref().expect("resolved above"))?,
            "verify" => resync::run_verify(binary.as_deref().expect("resolved above"))?,
            "export-latency" => export_latency::run(binary.as_deref().expect("resolved above"))?,
            "cuts" => cuts::run(binary.as_deref().expect("resolved above"))?,
            other => bail!("unknown scenario {other:?}; known: {}", SCENARIOS.join(", ")),
        };
        // Stamped, so that a table kept from an earlier run of the day says so.
        let seconds = started.elapsed().as_secs();
        if let Some(object) = json.as_object_mut() {
            object.insert("measured_at".into(), measured_at.clone().into());
            object.insert("commit".into(), commit.clone().into());
            object.insert("seconds".into(), seconds.into());
        }
        md.push_str(&format!("_Measured {measured_at} at commit {commit}, in {seconds} s._\n\n"));
        results.insert(scenario.clone(), json);
        sections.insert(scenario.clone(), md);
    }
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
    let date = replicator_date();
    let json_path = args.out_dir.join(format!("{date}.json"));
    let md_path = args.out_dir.join(format!("{date}.md"));
    // A run of some scenarios keeps the other scenarios' results of the same day.
    report::merge_earlier(&json_path, &md_path, &mut results, &mut sections)?;
    let run_seconds = run_started.elapsed().as_secs();
    println!("{} scenarios measured in {run_seconds} s", scenarios.len());
    let mut markdown = goals::table(&results);
    if scenarios.len() == SCENARIOS.len() {
        markdown.push_str(&format!(
            "All {} scenarios ran in this run, in {} min {} s.\n\n",
            SCENARIOS.len(),
            run_seconds / 60,
            run_seconds % 60
        ));
    }
    markdown.extend(SCENARIOS.iter().filter_map(|s| sections.get(*s)).map(String::as_str));
    // The results first: a plot that fails must not lose minutes of measuring.
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    let mut plots = Vec::new();
    type Plot = fn(&serde_json::Value, &std::path::Path) -> anyhow::Result<()>;
    let drawn: [(&str, &str, Plot); 2] = [
        ("resync", "resync time against the dirty fraction", report::plot_resync),
        ("lag", "replication lag against the load", report::plot_lag),
    ];
    for (scenario, title, draw) in drawn {
        let Some(result) = results.get(scenario) else { continue };
        let plot = args.out_dir.join(format!("{date}-{scenario}.svg"));
        match draw(result, &plot) {
            Ok(()) => plots.push((title, plot)),
            Err(error) => eprintln!("warning: plotting {}: {error:#}", plot.display()),
        }
    }
    for (_, plot) in &plots {
        markdown.push_str(&format!("Plot: `{}`.\n", plot.display()));
    }
    if SCENARIOS.iter().all(|s| sections.contains_key(*s)) {
        let doc = std::path::Path::new(BENCHMARKS_DOC);
        report::update_benchmarks_doc(doc, &markdown, &date, &plots)?;
        println!("{BENCHMARKS_DOC}: generated section regenerated");
    }
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
    command_line("date", &["+%Y-%m-%d"]).unwrap_or_else(|| "undated".into())
}

/// "2026-11-26 19:40 UTC", for the stamp under each scenario.
fn now_utc() -> String {
    command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "at an unknown time".into())
}

/// The commit measured (with `+` if the tree had changes), or "unknown" outside a checkout.
fn git_commit() -> String {
    let commit = command_line("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = command_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_some();
    if dirty { format!("{commit}+") } else { commit }
}

/// The first line a command prints, if it ran and printed one.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).lines().next()?.trim().to_owned();
    (output.status.success() && !text.is_empty()).then_some(text)
}
