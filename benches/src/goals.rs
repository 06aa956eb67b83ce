//! The goals the issues set, checked against a run's results: one table, generated, so that a
//! figure that misses its goal is listed as missed rather than left for a reader to work out.

use serde_json::Value;

/// One goal: what it asks, what was measured (the figure, and how it reads), and whether it
/// was met.
struct Goal {
    what: &'static str,
    value: f64,
    measured: String,
    met: bool,
}

/// The goals a scenario's results are checked against.
type GoalsOf = fn(&Value) -> Vec<Goal>;

/// The markdown table of every goal whose scenario has results.
pub fn table(results: &serde_json::Map<String, Value>) -> String {
    let scenarios: [(&str, GoalsOf); 5] = [
        ("tracker-overhead", tracker_overhead),
        ("ship-throughput", ship_throughput),
        ("resync", resync),
        ("export-latency", export_latency),
        ("cuts", cuts),
    ];
    let mut goals = Vec::new();
    for (name, check) in scenarios {
        let Some(result) = results.get(name) else { continue };
        // When: a table kept from an earlier run of the day says so.
        let when = result["measured_at"].as_str().map_or("an earlier run".to_owned(), str::to_owned);
        // A figure an older result does not have is left out, not reported as missed.
        for mut goal in check(result).into_iter().filter(|g| !g.value.is_nan()) {
            goal.measured = format!("{} ({when})", goal.measured);
            goals.push(goal);
        }
    }
    let mut out = String::from(
        "### goals\n\nThe goals of the issues, against the tables below (generated; a miss is a miss, whatever \
         the noise of the machine):\n\n| goal | measured | |\n|---|---|---|\n",
    );
    for goal in goals {
        let verdict = if goal.met { "met" } else { "**missed**" };
        out.push_str(&format!("| {} | {} | {verdict} |\n", goal.what, goal.measured));
    }
    out.push('\n');
    out
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

fn tracker_overhead(r: &Value) -> Vec<Goal> {
    let qd32 = &r["iodepth_32"];
    vec![
        Goal {
            what: "tracker: under 2% of IOPS lost, iodepth 32",
            value: f(&qd32["iops_ratio"]),
            measured: format!("{:.3}x IOPS", f(&qd32["iops_ratio"])),
            met: f(&qd32["iops_ratio"]) >= 0.98,
        },
        Goal {
            what: "tracker: p99 latency up by under 2 µs, iodepth 32",
            value: f(&qd32["p99_added_us"]),
            measured: format!("{:+.1} µs", f(&qd32["p99_added_us"])),
            met: f(&qd32["p99_added_us"]) < 2.0,
        },
    ]
}

fn ship_throughput(r: &Value) -> Vec<Goal> {
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let best = |secondaries: u64, field: &str| {
        runs.iter()
            .filter(|run| run["secondaries"] == secondaries)
            .map(|run| f(&run[field]))
            .fold(f64::NAN, f64::max)
    };
    [
        (1, "alone_ratio_to_iperf3", "alone"),
        (1, "ratio_to_iperf3", "live, fio beside it"),
        (2, "alone_ratio_to_iperf3", "alone"),
    ]
    .into_iter()
    .map(|(secondaries, field, how)| {
        let ratio = best(secondaries, field);
        Goal {
            what: if secondaries == 1 {
                "shipping: at least 0.85 of iperf3 on the same path, one secondary"
            } else {
                "shipping: at least 0.85 of iperf3 (one stream to each), two secondaries"
            },
            value: ratio,
            measured: format!("{ratio:.2} ({how})"),
            met: ratio >= 0.85,
        }
    })
    .collect()
}

fn resync(r: &Value) -> Vec<Goal> {
    let rounds = r["rounds"].as_array().cloned().unwrap_or_default();
    let at =
        |fraction: f64| rounds.iter().find(|round| (f(&round["fraction"]) - fraction).abs() < 1e-9).cloned();
    let mut goals = Vec::new();
    if let Some(one) = at(0.01) {
        goals.push(Goal {
            what: "resync at 1% dirty: at least 20x faster than rsync",
            value: f(&one["rsync_over_resync"]),
            measured: format!("{:.0}x", f(&one["rsync_over_resync"])),
            met: f(&one["rsync_over_resync"]) >= 20.0,
        });
        goals.push(Goal {
            what: "resync at 1% dirty: at least 50x faster than a full copy",
            value: f(&one["full_copy_over_resync"]),
            measured: format!("{:.0}x", f(&one["full_copy_over_resync"])),
            met: f(&one["full_copy_over_resync"]) >= 50.0,
        });
        if let Some(ten) = at(0.1) {
            // Proportional: ten times the bytes take about ten times as long (within 2x).
            let growth = f(&ten["resync_seconds"]) / f(&one["resync_seconds"]);
            goals.push(Goal {
                what: "resync time proportional to dirty bytes (10x the bytes: 5x to 20x the time)",
                value: growth,
                measured: format!("{growth:.1}x the time for 10x the bytes"),
                met: (5.0..=20.0).contains(&growth),
            });
        }
    }
    goals
}

fn cuts(r: &Value) -> Vec<Goal> {
    let latency = r["latency"].as_array().cloned().unwrap_or_default();
    let every_second =
        latency.iter().find(|l| l["interval_ms"] == 1000).map_or(f64::NAN, |l| f(&l["ratio_to_no_cuts"]));
    let points = r["recovery_point"].as_array().cloned().unwrap_or_default();
    let half = points
        .iter()
        .find(|p| (f(&p["load"]) - 0.5).abs() < 1e-9)
        .map_or(f64::NAN, |p| f(&p["cut_age_p99_ms"]));
    vec![
        Goal {
            what: "cuts every 1 s: application write p99 within 5% of no cuts",
            value: every_second,
            measured: format!("{every_second:.3}x"),
            met: every_second <= 1.05,
        },
        Goal {
            what: "cuts every 100 ms: recovery point p99 under 1 s at 50% load",
            value: half,
            measured: format!("{half:.0} ms"),
            met: half < 1000.0,
        },
    ]
}

fn export_latency(r: &Value) -> Vec<Goal> {
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    rows.iter()
        .filter(|row| row["row"]["policy"] == "export sync")
        .flat_map(|row| {
            let depth = row["row"]["iodepth"].as_u64().unwrap_or(0);
            [("ping", "p99_over_raw_p99_plus_rtt"), ("a TCP exchange's p99", "p99_over_raw_p99_plus_tcp_p99")]
                .map(|(trip, field)| Goal {
                    what: "export, sync policy: p99 within 2x (raw p99 + round trip)",
                    value: f(&row[field]),
                    measured: format!("{:.2}x at iodepth {depth}, round trip by {trip}", f(&row[field])),
                    met: f(&row[field]) <= 2.0,
                })
        })
        .collect()
}
