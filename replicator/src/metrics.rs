//! Prometheus metrics, built with `prometheus-client` and served on `/metrics` by a thread of
//! their own (`tiny_http`), so a slow scrape never touches the data path.
//!
//! The data path owns nothing here but cloned handles (atomic counters and gauges) that it
//! updates as it goes; the registry is only read by the scrape thread.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
}

impl PrimaryMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
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
            "replicator_secondary_connected",
            "1 when the secondary is connected and authenticated",
            self.connected.clone(),
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
            "replicator_fracture_log_extents",
            "Extents in a fractured secondary's fracture log (what its resync will copy)",
            self.fracture_log_extents.clone(),
        );
        r.register("replicator_fractures", "Times a secondary was fractured", self.fractures.clone());
        r.register(
            "replicator_verify_differing_extents",
            "Extents a verify found different on a secondary (shipped again)",
            self.verify_differing_extents.clone(),
        );
        r.register(
            "replicator_sync_rate_limit_bytes",
            "Resync rate limit per secondary, in bytes per second (0: unlimited)",
            self.sync_rate_limit_bytes.clone(),
        );
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
    }
}

/// Serves `registry` on `http://ADDR/metrics` from a thread of its own.
pub fn serve(addr: SocketAddr, registry: Registry) -> std::io::Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| std::io::Error::other(format!("metrics on {addr}: {e}")))?;
    let registry = Arc::new(registry);
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for request in server.incoming_requests() {
            let response = if request.url() == "/metrics" {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => tiny_http::Response::from_string(body).with_header(
                        "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
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
