//! The metrics as an operator's Prometheus sees them: the real Prometheus server (Debian
//! package `prometheus`) scrapes a running primary and secondary; its HTTP query API must show
//! the shipped-bytes counter rising and the secondary's state; `promtool check metrics` passes
//! on our output; every query of `docs/grafana-dashboard.json` runs.

use std::time::{Duration, Instant};

use replicator::testbed::Process;
use replicator_tests::*;

const DEVICE_BYTES: u64 = 128 * MIB;

/// The value of an instant query's first sample, if any.
fn query(lab: &Lab, expr: &str) -> Option<f64> {
    let encoded: String = expr
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let body =
        try_http_get(&lab.primary_ns.name, "127.0.0.1:9090", &format!("/api/v1/query?query={encoded}"))
            .ok()?;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(json["status"], "success", "{json}");
    json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn until(lab: &Lab, what: &str, expr: &str, check: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = query(lab, expr)
            && check(value)
        {
            return value;
        }
        assert!(Instant::now() < deadline, "Prometheus never showed {what} ({expr})\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_real_prometheus_scrapes_primary_and_secondary() {
    require_root();
    let mut lab = Lab::new(&replicator_bin(), "prom", 1, DEVICE_BYTES).expect("lab");
    lab.start_secondary(0, &["--metrics", "0.0.0.0:9101"]).expect("secondary");
    lab.start_primary(&["--metrics", "127.0.0.1:9100", "--sync-rate", "0"]).expect("primary");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    let secondary_metrics = format!("{}:9101", lab.secondary_addrs[0].ip());
    let config = lab.dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: primary\n    static_configs:\n      - targets: ['127.0.0.1:9100']\n  - job_name: secondary\n    static_configs:\n      - targets: ['{secondary_metrics}']\n"
        ),
    )
    .expect("prometheus.yml");
    let mut command = lab.primary_ns.command(std::path::Path::new("prometheus"));
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", lab.dir.join("tsdb").display()))
        .arg("--web.listen-address=127.0.0.1:9090");
    lab.processes.push(
        Process::spawn("prometheus", command, lab.dir.join("prometheus.log"))
            .expect("prometheus (package prometheus)"),
    );

    // Two scrapes of each target.
    until(&lab, "two scrapes of the primary", "count_over_time(up{job=\"primary\"}[1m])", |n| n >= 2.0);
    until(&lab, "two scrapes of the secondary", "count_over_time(up{job=\"secondary\"}[1m])", |n| n >= 2.0);
    let before = until(&lab, "the shipped bytes", "sum(replicator_shipped_bytes_total)", |v| v > 0.0);
    for i in 0..100u64 {
        write_direct(&lab.primary_device.path, i * 5 * 65536, 65536, 0x77).expect("write");
    }
    let after =
        until(&lab, "the shipped bytes rising", "sum(replicator_shipped_bytes_total)", |v| v > before);
    eprintln!("Prometheus saw replicator_shipped_bytes_total go from {before} to {after}");
    until(
        &lab,
        "the secondary's state",
        "replicator_image_state{secondary=\"s0\",state=\"SYNCHRONIZED\"}",
        |v| v == 1.0,
    );
    until(
        &lab,
        "s0's transition to SYNCHRONIZED counted",
        "replicator_image_state_transitions_total{secondary=\"s0\",state=\"SYNCHRONIZED\"}",
        |v| v >= 1.0,
    );
    until(&lab, "the secondary's writes", "replicator_written_bytes_total", |v| v > 0.0);
    until(&lab, "a lag histogram", "replicator_replication_lag_seconds_count", |v| v > 0.0);
    // Its buckets are cumulative once: +Inf holds every sample, no more, and the p99 falls in
    // a finite bucket (the lag of a few 64 KiB writes on an idle mirror is milliseconds).
    until(
        &lab,
        "the lag histogram's +Inf bucket equal to its count",
        "sum(replicator_replication_lag_seconds_bucket{le=\"+Inf\"}) - sum(replicator_replication_lag_seconds_count)",
        |v| v == 0.0,
    );
    until(
        &lab,
        "a lag p99 under a second",
        "histogram_quantile(0.99, sum by (le) (replicator_replication_lag_seconds_bucket))",
        |v| v < 1.0,
    );

    // Every query of the Grafana dashboard runs against this Prometheus.
    let dashboard = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard).expect("docs/grafana-dashboard.json"))
            .expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    for target in panels.iter().flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default()) {
        let expr = target["expr"].as_str().expect("expr").replace("$mirror", ".*");
        let _ = query(&lab, &expr);
    }
    until(&lab, "the dashboard's throughput panel", "sum(rate(replicator_shipped_bytes_total[1m]))", |v| {
        v > 0.0
    });

    // promtool's lint on what we serve.
    for (netns, addr) in [
        (lab.primary_ns.name.clone(), "127.0.0.1:9100".to_owned()),
        (lab.primary_ns.name.clone(), secondary_metrics),
    ] {
        let text = http_get(&netns, &addr, "/metrics");
        let path = lab.dir.join("metrics.txt");
        std::fs::write(&path, &text).expect("metrics copy");
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", path.display()))
            .output()
            .expect("promtool (package prometheus)");
        assert!(
            output.status.success(),
            "promtool check metrics on {addr}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // And the mirror it watched ends identical.
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashing the images");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}
