//! Prometheus metrics, built with `prometheus-client` and served on `/metrics` by a thread of
//! their own (`tiny_http`), so a slow scrape never touches the data path.
//!
//! The data path owns nothing here but cloned handles (atomic counters and gauges) that it
//! updates as it goes; the registry is only read by the scrape thread.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Seconds as a counter (`f64` in an atomic `u64`).
pub type SecondsCounter = Counter<f64, std::sync::atomic::AtomicU64>;
pub type SecondsGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The help text of `replicator_busy_poll_seconds`, on the primary and the secondary.
const BUSY_POLL_HELP: &str = "Wall-clock seconds spent in busy-poll windows waiting for completions (--poll-us); the CPU is yielded to other threads meanwhile";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecondaryLabel {
    pub secondary: String,
}

/// A state-set member: one gauge per state, 1 for the current one.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageStateLabel {
    pub secondary: String,
    pub state: String,
}

/// A latency histogram recorded with `hdrhistogram` (microseconds, 3 significant digits) and
/// exported as a Prometheus histogram with buckets from 100 µs to 10 s. The engine records into
/// a histogram of its own and merges it in here now and then (`merge_from`), so the data path
/// takes this lock a few times a second, never per event.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    inner: Arc<std::sync::Mutex<hdrhistogram::Histogram<u64>>>,
}

/// Bucket bounds in seconds: 1-2.5-5 steps from 10 µs (an ack round trip on a fast link is
/// tens of microseconds) to 10 s.
const LATENCY_BUCKETS_S: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram for recording microseconds, 1 µs to an hour.
pub fn new_latency_recorder() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { inner: Arc::new(std::sync::Mutex::new(new_latency_recorder())) }
    }
}

impl LatencyHistogram {
    /// Adds what `local` recorded, and empties it.
    pub fn merge_from(&self, local: &mut hdrhistogram::Histogram<u64>) {
        if local.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().expect("histogram lock");
        // Values are clamped to the recorder's bounds, so the add cannot fail.
        let _ = inner.add(&*local);
        local.reset();
    }
}

impl LatencyHistogram {
    /// The value at `quantile` (0..=1) of everything recorded, in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        let inner = self.inner.lock().expect("histogram lock");
        if inner.is_empty() { 0.0 } else { inner.value_at_quantile(quantile) as f64 / 1000.0 }
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = self.inner.lock().expect("histogram lock");
        let count = inner.len();
        let sum_s = inner.mean() * count as f64 / 1e6;
        // The encoder takes each bucket's own count and writes the running sums itself (the
        // cumulative `le` series); so each bucket gets what lies between its bound and the one
        // below, and +Inf the rest, which makes +Inf equal `_count`.
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_BUCKETS_S.len() + 1);
        let mut below = 0;
        for bound_s in LATENCY_BUCKETS_S {
            let up_to = inner.count_between(0, (bound_s * 1e6) as u64);
            buckets.push((bound_s, up_to - below));
            below = up_to;
        }
        buckets.push((f64::MAX, count - below));
        encoder.encode_histogram::<NoLabelSet>(sum_s, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The primary's metrics, per secondary.
#[derive(Default)]
pub struct PrimaryMetrics {
    pub shipped_bytes: Family<SecondaryLabel, Counter>,
    pub shipped_extents: Family<SecondaryLabel, Counter>,
    pub resync_bytes: Family<SecondaryLabel, Counter>,
    pub connected: Family<SecondaryLabel, Gauge>,
    pub out_of_sync_bytes: Family<SecondaryLabel, Gauge>,
    pub zero_copy_sends: Family<SecondaryLabel, Counter>,
    pub copied_sends: Family<SecondaryLabel, Counter>,
    pub connects: Family<SecondaryLabel, Counter>,
    pub disconnects: Family<SecondaryLabel, Counter>,
    pub fracture_log_extents: Family<SecondaryLabel, Gauge>,
    pub fractures: Family<SecondaryLabel, Counter>,
    pub verify_differing_extents: Family<SecondaryLabel, Counter>,
    pub sync_rate_limit_bytes: Family<SecondaryLabel, Gauge>,
    pub intent_log_extents: Gauge,
    pub checkpoints: Counter,
    pub log_write_errors: Counter,
    pub mirror_state: Family<StateLabel, Gauge>,
    pub mirror_transitions: Family<StateLabel, Counter>,
    pub image_state: Family<ImageStateLabel, Gauge>,
    pub image_transitions: Family<ImageStateLabel, Counter>,
    pub lag: Family<SecondaryLabel, LatencyHistogram>,
    pub ack_rtt: Family<SecondaryLabel, LatencyHistogram>,
    pub checkpoint_duration: LatencyHistogram,
    pub connection_attempts: Family<SecondaryLabel, Counter>,
    pub auth_failures: Family<SecondaryLabel, Counter>,
    pub write_errors: Family<SecondaryLabel, Counter>,
    pub tracker_events: Counter,
    pub tracker_write_events: Counter,
    pub unmatched_writes: Counter,
    pub export_bytes: Counter,
    pub export_errors: Counter,
    pub busy_poll_seconds: SecondsCounter,
}

/// Handles for one secondary, cloned out of the families once so the data path does no lookup.
#[derive(Clone)]
pub struct PeerMetrics {
    pub shipped_bytes: Counter,
    pub shipped_extents: Counter,
    pub resync_bytes: Counter,
    pub connected: Gauge,
    pub out_of_sync_bytes: Gauge,
    pub zero_copy_sends: Counter,
    pub copied_sends: Counter,
    pub connects: Counter,
    pub disconnects: Counter,
    pub fracture_log_extents: Gauge,
    pub fractures: Counter,
    pub verify_differing_extents: Counter,
    pub sync_rate_limit_bytes: Gauge,
    pub lag: LatencyHistogram,
    pub ack_rtt: LatencyHistogram,
    pub connection_attempts: Counter,
    pub auth_failures: Counter,
    pub write_errors: Counter,
}

impl PrimaryMetrics {
    pub fn register(&self, registry: &mut Registry) {
        self.register_secondaries(registry);
        self.register_connections(registry);
        self.register_states(registry);
        self.register_engine(registry);
    }

    /// Per secondary: what was shipped, its resync, its lag.
    fn register_secondaries(&self, r: &mut Registry) {
        r.register(
            "replicator_shipped_bytes",
            "Bytes of extent data shipped to a secondary",
            self.shipped_bytes.clone(),
        );
        r.register(
            "replicator_shipped_extents",
            "Extents shipped to a secondary",
            self.shipped_extents.clone(),
        );
        r.register(
            "replicator_resync_bytes",
            "Bytes shipped to a secondary while it was catching up (initial sync, after a reconnect)",
            self.resync_bytes.clone(),
        );
        r.register(
            "replicator_out_of_sync_bytes",
            "Bytes of the extents a secondary has not acknowledged; 0 exactly when it is in sync",
            self.out_of_sync_bytes.clone(),
        );
        r.register("replicator_zero_copy_sends", "Zero-copy sends submitted", self.zero_copy_sends.clone());
        r.register(
            "replicator_zero_copy_copied_sends",
            "Zero-copy sends the kernel reported it copied anyway",
            self.copied_sends.clone(),
        );
        r.register(
            "replicator_verify_differing_extents",
            "Extents a verify found different on a secondary (shipped again)",
            self.verify_differing_extents.clone(),
        );
        r.register(
            "replicator_sync_rate_limit_bytes_per_second",
            "Resync rate limit per secondary, in bytes per second (0: unlimited)",
            self.sync_rate_limit_bytes.clone(),
        );
        r.register(
            "replicator_replication_lag_seconds",
            "From a write's completion on the primary (its drain from the tracker) to the secondary's \
             acknowledgement that it is durable",
            self.lag.clone(),
        );
        r.register(
            "replicator_ack_round_trip_seconds",
            "From a frame fully sent to its acknowledgement",
            self.ack_rtt.clone(),
        );
    }

    /// Per secondary: its connection, attempts, refusals and errors.
    fn register_connections(&self, r: &mut Registry) {
        r.register(
            "replicator_secondary_connected",
            "1 when the secondary is connected and authenticated",
            self.connected.clone(),
        );
        r.register(
            "replicator_secondary_connects",
            "Connections established to a secondary",
            self.connects.clone(),
        );
        r.register(
            "replicator_secondary_disconnects",
            "Connections to a secondary lost",
            self.disconnects.clone(),
        );
        r.register(
            "replicator_connection_attempts",
            "Connection attempts to a secondary",
            self.connection_attempts.clone(),
        );
        r.register(
            "replicator_authentication_failures",
            "Handshakes with a secondary that failed (key, mirror, image size)",
            self.auth_failures.clone(),
        );
        r.register(
            "replicator_secondary_write_errors",
            "Write errors a secondary reported",
            self.write_errors.clone(),
        );
    }

    /// The mirror's and images' states, and the logs that keep them.
    fn register_states(&self, r: &mut Registry) {
        r.register(
            "replicator_fracture_log_extents",
            "Extents in a fractured secondary's fracture log (what its resync will copy)",
            self.fracture_log_extents.clone(),
        );
        r.register("replicator_fractures", "Times a secondary was fractured", self.fractures.clone());
        r.register(
            "replicator_intent_log_extents",
            "Extents in the write-intent log",
            self.intent_log_extents.clone(),
        );
        r.register("replicator_checkpoints", "Log checkpoints written", self.checkpoints.clone());
        r.register(
            "replicator_mirror_state",
            "The mirror's state (ACTIVE, INACTIVE, ATTENTION): 1 for the current one",
            self.mirror_state.clone(),
        );
        r.register(
            "replicator_mirror_state_transitions",
            "Transitions of the mirror into each state",
            self.mirror_transitions.clone(),
        );
        r.register(
            "replicator_image_state",
            "Each secondary image's state (SYNCHRONIZED, SYNCHRONIZING, CONSISTENT, UNSYNCHRONIZED): 1 for the current one",
            self.image_state.clone(),
        );
        r.register(
            "replicator_checkpoint_duration_seconds",
            "Time to checkpoint the intent and fracture logs",
            self.checkpoint_duration.clone(),
        );
        r.register(
            "replicator_image_state_transitions",
            "Transitions of each secondary image into each state",
            self.image_transitions.clone(),
        );
        r.register(
            "replicator_log_write_errors",
            "Intent or fracture log writes that failed",
            self.log_write_errors.clone(),
        );
    }

    /// The tracker, the export and the engine's loop.
    fn register_engine(&self, r: &mut Registry) {
        r.register(
            "replicator_tracker_events",
            "Block-layer events the tracker saw",
            self.tracker_events.clone(),
        );
        r.register(
            "replicator_tracker_unmatched_writes",
            "Queued writes whose completion was not traced within a checkpoint interval (shipped anyway)",
            self.unmatched_writes.clone(),
        );
        r.register(
            "replicator_export_written_bytes",
            "Bytes NBD clients wrote through the export and got a successful reply for",
            self.export_bytes.clone(),
        );
        r.register(
            "replicator_export_errors",
            "Export writes, TRIMs, zeroes and flushes that failed back to the client with EIO",
            self.export_errors.clone(),
        );
        r.register("replicator_busy_poll_seconds", BUSY_POLL_HELP, self.busy_poll_seconds.clone());
        r.register(
            "replicator_tracker_write_events",
            "Writes (and discards) the tracker marked",
            self.tracker_write_events.clone(),
        );
    }

    /// Sets the state-set gauges of the mirror to `state`.
    pub fn set_mirror_state(&self, state: &str) {
        for s in ["ACTIVE", "INACTIVE", "ATTENTION"] {
            self.mirror_state.get_or_create(&StateLabel { state: s.into() }).set(i64::from(s == state));
        }
    }

    /// Sets the state-set gauges of `secondary` to `state`.
    pub fn set_image_state(&self, secondary: &str, state: &str) {
        for s in ["SYNCHRONIZED", "SYNCHRONIZING", "CONSISTENT", "UNSYNCHRONIZED"] {
            let label = ImageStateLabel { secondary: secondary.into(), state: s.into() };
            self.image_state.get_or_create(&label).set(i64::from(s == state));
        }
    }

    pub fn peer(&self, secondary: &str) -> PeerMetrics {
        let label = SecondaryLabel { secondary: secondary.into() };
        PeerMetrics {
            shipped_bytes: self.shipped_bytes.get_or_create(&label).clone(),
            shipped_extents: self.shipped_extents.get_or_create(&label).clone(),
            resync_bytes: self.resync_bytes.get_or_create(&label).clone(),
            connected: self.connected.get_or_create(&label).clone(),
            out_of_sync_bytes: self.out_of_sync_bytes.get_or_create(&label).clone(),
            zero_copy_sends: self.zero_copy_sends.get_or_create(&label).clone(),
            copied_sends: self.copied_sends.get_or_create(&label).clone(),
            connects: self.connects.get_or_create(&label).clone(),
            disconnects: self.disconnects.get_or_create(&label).clone(),
            fracture_log_extents: self.fracture_log_extents.get_or_create(&label).clone(),
            fractures: self.fractures.get_or_create(&label).clone(),
            verify_differing_extents: self.verify_differing_extents.get_or_create(&label).clone(),
            sync_rate_limit_bytes: self.sync_rate_limit_bytes.get_or_create(&label).clone(),
            lag: self.lag.get_or_create(&label).clone(),
            ack_rtt: self.ack_rtt.get_or_create(&label).clone(),
            connection_attempts: self.connection_attempts.get_or_create(&label).clone(),
            auth_failures: self.auth_failures.get_or_create(&label).clone(),
            write_errors: self.write_errors.get_or_create(&label).clone(),
        }
    }
}

/// The secondary's metrics.
#[derive(Default)]
pub struct SecondaryMetrics {
    pub written_bytes: Counter,
    pub acked_frames: Counter,
    pub sessions: Counter,
    pub refused_connections: Counter,
    pub write_errors: Counter,
    pub primary_connected: Gauge,
    pub busy_poll_seconds: SecondsCounter,
    pub staged_bytes: Counter,
    pub applied_bytes: Counter,
    pub journal_overflows: Counter,
    pub committed_cut: Gauge,
    pub committed_cut_timestamp: SecondsGauge,
    pub image_consistent: Gauge,
}

impl SecondaryMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "replicator_written_bytes",
            "Bytes written durably to the secondary image",
            self.written_bytes.clone(),
        );
        registry.register(
            "replicator_acked_frames",
            "Extent frames acknowledged to the primary",
            self.acked_frames.clone(),
        );
        registry.register("replicator_sessions", "Authenticated primary sessions", self.sessions.clone());
        registry.register(
            "replicator_refused_connections",
            "Connections refused (authentication, parameters, malformed handshake)",
            self.refused_connections.clone(),
        );
        registry.register(
            "replicator_write_errors",
            "Writes to the secondary image that failed",
            self.write_errors.clone(),
        );
        registry.register(
            "replicator_primary_connected",
            "1 while a primary session is active",
            self.primary_connected.clone(),
        );
        registry.register("replicator_busy_poll_seconds", BUSY_POLL_HELP, self.busy_poll_seconds.clone());
        self.register_cuts(registry);
    }

    fn register_cuts(&self, registry: &mut Registry) {
        registry.register(
            "replicator_staged_bytes",
            "Bytes of frames staged in the journal until their cut is committed",
            self.staged_bytes.clone(),
        );
        registry.register(
            "replicator_applied_bytes",
            "Bytes applied from the journal to the image when their cut was committed",
            self.applied_bytes.clone(),
        );
        registry.register(
            "replicator_journal_overflows",
            "Times the journal filled with no cut to commit and was applied in place (the image not consistent until a later cut)",
            self.journal_overflows.clone(),
        );
        registry.register(
            "replicator_committed_cut",
            "The last cut applied to the image",
            self.committed_cut.clone(),
        );
        registry.register(
            "replicator_committed_cut_timestamp_seconds",
            "When the primary took the last cut applied to the image (Unix time)",
            self.committed_cut_timestamp.clone(),
        );
        registry.register(
            "replicator_image_consistent",
            "1 while the image is a consistent cut of the primary",
            self.image_consistent.clone(),
        );
    }
}

/// Serves `registry` on `http://ADDR/metrics` from a thread of its own.
pub fn serve(addr: SocketAddr, registry: Registry) -> std::io::Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| std::io::Error::other(format!("metrics on {addr}: {e}")))?;
    let registry = Arc::new(registry);
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for request in server.incoming_requests() {
            let openmetrics = request.headers().iter().any(|h| {
                h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text")
            });
            let response = if request.url() == "/metrics" {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) if openmetrics => tiny_http::Response::from_string(body).with_header(
                        "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
                            .parse::<tiny_http::Header>()
                            .expect("a valid header"),
                    ),
                    Ok(()) => tiny_http::Response::from_string(text_format_0_0_4(&body)).with_header(
                        "Content-Type: text/plain; version=0.0.4; charset=utf-8"
                            .parse::<tiny_http::Header>()
                            .expect("a valid header"),
                    ),
                    Err(_) => tiny_http::Response::from_string("encoding failed").with_status_code(500),
                }
            } else {
                tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
            };
            let _ = request.respond(response);
        }
    })?;
    tracing::info!(%addr, "serving metrics on /metrics");
    Ok(())
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition, for clients that do not ask
/// for OpenMetrics (curl, `promtool check metrics`): the one difference in what we emit is that
/// 0.0.4 names a counter's HELP and TYPE after its `_total` sample, and has no `# EOF`.
/// `prometheus-client` encodes OpenMetrics only; this renames, it formats nothing.
pub fn text_format_0_0_4(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_after_their_total_sample_in_text_0_0_4() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\na_bytes_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            text_format_0_0_4(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    /// The `le` series of an encoded latency histogram, as (bound, cumulative count), and its
    /// `_count`.
    fn encoded_buckets(histogram: &LatencyHistogram) -> (Vec<(String, u64)>, u64) {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("lag_seconds", "Lag.", histogram.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoding");
        let value =
            |line: &str| line.rsplit_once(' ').and_then(|(_, v)| v.parse::<u64>().ok()).expect("a count");
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("lag_seconds_bucket"))
            .map(|l| (l.split('"').nth(1).expect("an le label").to_owned(), value(l)))
            .collect();
        let count = text.lines().find(|l| l.starts_with("lag_seconds_count")).map(value).expect("_count");
        (buckets, count)
    }

    #[test]
    fn latency_buckets_are_cumulative_once_and_end_at_the_count() {
        let histogram = LatencyHistogram::default();
        let mut local = new_latency_recorder();
        for micros in [50, 80, 300, 300, 700, 4_000, 20_000_000] {
            local.record(micros).expect("in bounds");
        }
        histogram.merge_from(&mut local);
        let (buckets, count) = encoded_buckets(&histogram);
        assert_eq!(count, 7);
        let at = |le: &str| buckets.iter().find(|(b, _)| b == le).map(|(_, n)| *n).expect("a bucket");
        assert_eq!((at("0.0001"), at("0.00025"), at("0.0005"), at("0.001")), (2, 2, 4, 5));
        assert_eq!((at("0.005"), at("10.0"), at("+Inf")), (6, 6, 7));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "not cumulative: {buckets:?}");
    }

    proptest::proptest! {
        #[test]
        fn latency_buckets_match_the_recorded_values(micros in proptest::collection::vec(1u64..30_000_000, 0..200)) {
            let histogram = LatencyHistogram::default();
            let mut local = new_latency_recorder();
            for &m in &micros {
                local.record(m).expect("in bounds");
            }
            histogram.merge_from(&mut local);
            let (buckets, count) = encoded_buckets(&histogram);
            proptest::prop_assert_eq!(count, micros.len() as u64);
            proptest::prop_assert_eq!(buckets.last().map(|b| b.1), Some(micros.len() as u64));
            for (le, n) in &buckets[..buckets.len() - 1] {
                let bound_us = (le.parse::<f64>().expect("a bound") * 1e6) as u64;
                // hdrhistogram keeps 3 significant digits: a value within 0.1% of a bound may
                // land on either side of it.
                let low = micros.iter().filter(|&&m| m * 1001 / 1000 <= bound_us).count() as u64;
                let high = micros.iter().filter(|&&m| m * 999 / 1000 <= bound_us).count() as u64;
                proptest::prop_assert!((low..=high).contains(n), "le {le}: {n} not in {low}..={high}");
            }
        }
    }
}
