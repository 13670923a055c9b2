//! Prometheus metrics, served at `GET /metrics` (text format; a `read`
//! token, like the rest of the API: Prometheus sends it with
//! `authorization: {credentials_file: ...}` in the scrape config).
//!
//! - `edgefleet_devices{state="online"|"offline"}`: read from the store at
//!   each scrape;
//! - `edgefleet_mqtt_messages_received_total{kind}` and
//!   `edgefleet_mqtt_messages_published_total{kind}`;
//! - `edgefleet_mqtt_messages_rejected_total{kind}`: device messages
//!   refused, by reason (`unsigned`, `untrusted_key`, `bad_signature`,
//!   `payload`, `device_mismatch`, ...);
//! - `edgefleet_ingest_records_total{result="new"|"duplicate"}`,
//!   `edgefleet_ingest_lag_seconds` (device timestamp to stored; device
//!   clocks may be off, so negative lags count as 0) and
//!   `edgefleet_ingest_batch_seconds` (one store transaction);
//! - `edgefleet_http_request_duration_seconds{method, route, status}`,
//!   by route template (`/api/v1/devices/{id}`), not by raw path;
//! - `edgefleet_broker_clients` and
//!   `edgefleet_broker_messages_total{what="received"|"delivered"|"dropped"}`:
//!   the embedded broker's connected clients and messages (dropped: a
//!   session's queue was full), read at each scrape;
//! - `edgefleet_root_expires_seconds`: when the current root document
//!   expires (Unix seconds); alert well before it, devices accept no
//!   desired state after it.
//! - `edgefleet_model_drift_psi{model, version, scope, class}`: drift
//!   scores (largest feature PSI against the version's reference,
//!   [`crate::drift`]), read at each scrape: `scope="fleet"` and
//!   `scope="class"` (one per hardware class) over the last five minutes
//!   of intervals, `scope="device_max"` the worst device's latest
//!   interval. Per-device series are left out on purpose: one series per
//!   device and model version would grow with the fleet; the API has
//!   them (`GET /api/v1/models/{name}/drift`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestResult {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub model: String,
    pub version: u64,
    pub scope: &'static str,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn http_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The server's metrics; cheap to clone (shared counters).
#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    pub devices: Family<State, Gauge>,
    pub received: Family<Kind, Counter>,
    pub published: Family<Kind, Counter>,
    pub rejected: Family<Kind, Counter>,
    pub ingest_records: Family<IngestResult, Counter>,
    pub ingest_lag: Histogram,
    pub ingest_batch: Histogram,
    pub http: HistogramFamily<HttpLabels>,
    pub root_expires: Gauge,
    pub broker_clients: Gauge,
    pub broker_messages: Family<What, Counter>,
    pub drift_psi: Family<DriftLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct What {
    pub what: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edgefleet");
        let devices = Family::<State, Gauge>::default();
        registry.register(
            "devices",
            "Devices known to the fleet, by state",
            devices.clone(),
        );
        let received = Family::<Kind, Counter>::default();
        registry.register(
            "mqtt_messages_received",
            "MQTT messages received from devices, by kind (dropped: malformed or mismatched)",
            received.clone(),
        );
        let published = Family::<Kind, Counter>::default();
        registry.register(
            "mqtt_messages_published",
            "MQTT messages published by the server, by kind",
            published.clone(),
        );
        let rejected = Family::<Kind, Counter>::default();
        registry.register(
            "mqtt_messages_rejected",
            "Device messages refused before storing, by reason (unsigned, untrusted_key, bad_signature, payload, ...)",
            rejected.clone(),
        );
        let ingest_records = Family::<IngestResult, Counter>::default();
        registry.register(
            "ingest_records",
            "Telemetry and result records stored (new) or recognised as redelivered (duplicate)",
            ingest_records.clone(),
        );
        // 10 ms .. ~5.8 days
        let ingest_lag = Histogram::new(exponential_buckets(0.01, 4.0, 14));
        registry.register(
            "ingest_lag_seconds",
            "From a record's device timestamp to its storage",
            ingest_lag.clone(),
        );
        let ingest_batch = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "ingest_batch_seconds",
            "Time to store one batch of device messages",
            ingest_batch.clone(),
        );
        let http: HistogramFamily<HttpLabels> = Family::new_with_constructor(http_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP API latency by method, route template and status",
            http.clone(),
        );
        let root_expires = Gauge::default();
        registry.register(
            "root_expires_seconds",
            "When the fleet's current root document expires, in Unix seconds",
            root_expires.clone(),
        );
        let broker_clients = Gauge::default();
        registry.register(
            "broker_clients",
            "Clients connected to the embedded MQTT broker",
            broker_clients.clone(),
        );
        let broker_messages = Family::<What, Counter>::default();
        registry.register(
            "broker_messages",
            "Messages the embedded broker received, delivered, and dropped because a session's queue was full",
            broker_messages.clone(),
        );
        let drift_psi = Family::<DriftLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "model_drift_psi",
            "Drift score (largest feature PSI against the version's reference): fleet and per hardware class over the last five minutes, device_max the worst device's latest interval",
            drift_psi.clone(),
        );
        Self {
            registry: std::sync::Arc::new(registry),
            devices,
            received,
            published,
            rejected,
            ingest_records,
            ingest_lag,
            ingest_batch,
            http,
            root_expires,
            broker_clients,
            broker_messages,
            drift_psi,
        }
    }
}

impl Metrics {
    pub fn received(&self, kind: &'static str) {
        self.received.get_or_create(&Kind { kind }).inc();
    }

    pub fn rejected(&self, kind: &'static str) {
        self.rejected.get_or_create(&Kind { kind }).inc();
    }

    pub fn published(&self, kind: &'static str) {
        self.published.get_or_create(&Kind { kind }).inc();
    }

    /// Records a stored batch: how many of `total` records were new, how
    /// long it took, and each record's lag from its device timestamp.
    pub fn ingested(
        &self,
        total: usize,
        new: usize,
        seconds: f64,
        lags: impl Iterator<Item = f64>,
    ) {
        self.ingest_records
            .get_or_create(&IngestResult { result: "new" })
            .inc_by(new as u64);
        self.ingest_records
            .get_or_create(&IngestResult {
                result: "duplicate",
            })
            .inc_by(total.saturating_sub(new) as u64);
        self.ingest_batch.observe(seconds);
        for lag in lags {
            self.ingest_lag.observe(lag.max(0.0));
        }
    }

    pub fn set_devices(&self, online: usize, offline: usize) {
        self.devices
            .get_or_create(&State { state: "online" })
            .set(online as i64);
        self.devices
            .get_or_create(&State { state: "offline" })
            .set(offline as i64);
    }

    /// Replaces the drift gauges (a version no longer scored loses its
    /// series).
    pub fn set_drift(&self, gauges: &[crate::drift::view::Gauge]) {
        self.drift_psi.clear();
        for (model, version, scope, class, psi) in gauges {
            self.drift_psi
                .get_or_create(&DriftLabels {
                    model: model.clone(),
                    version: *version,
                    scope,
                    class: class.clone().unwrap_or_default(),
                })
                .set(*psi);
        }
    }

    /// Records when the current root document expires.
    pub fn set_root_expires(&self, expires: u64) {
        self.root_expires
            .set(i64::try_from(expires).unwrap_or(i64::MAX));
    }

    /// Copies the embedded broker's counters (they only grow).
    pub fn set_broker(&self, stats: crate::broker::Stats, clients: usize) {
        self.broker_clients.set(clients as i64);
        for (what, value) in [
            ("received", stats.received),
            ("delivered", stats.delivered),
            ("dropped", stats.dropped),
        ] {
            let counter = self.broker_messages.get_or_create(&What { what });
            counter.inc_by(value.saturating_sub(counter.get()));
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_every_family_with_its_values() {
        let m = Metrics::default();
        m.received("telemetry");
        m.received("telemetry");
        m.published("desired");
        m.ingested(5, 3, 0.002, [1.5, -3.0].into_iter());
        m.set_devices(2, 1);
        m.set_root_expires(1_900_000_000);
        let stats = crate::broker::Stats {
            received: 7,
            delivered: 5,
            dropped: 1,
        };
        m.set_broker(stats, 3);
        m.set_broker(stats, 3);
        m.http
            .get_or_create(&HttpLabels {
                method: "GET".into(),
                route: "/api/v1/devices".into(),
                status: 200,
            })
            .observe(0.001);
        let text = m.encode();
        for line in [
            "edgefleet_mqtt_messages_received_total{kind=\"telemetry\"} 2",
            "edgefleet_mqtt_messages_published_total{kind=\"desired\"} 1",
            "edgefleet_ingest_records_total{result=\"new\"} 3",
            "edgefleet_ingest_records_total{result=\"duplicate\"} 2",
            "edgefleet_ingest_lag_seconds_count 2",
            "edgefleet_devices{state=\"online\"} 2",
            "edgefleet_root_expires_seconds 1900000000",
            "edgefleet_broker_clients 3",
            "edgefleet_broker_messages_total{what=\"received\"} 7",
            "edgefleet_broker_messages_total{what=\"dropped\"} 1",
            "edgefleet_http_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/devices\",status=\"200\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // A negative lag (device clock ahead) lands in the lowest bucket.
        assert!(
            text.contains("edgefleet_ingest_lag_seconds_bucket{le=\"0.01\"} 1"),
            "{text}"
        );
    }
}
