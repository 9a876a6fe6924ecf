//! Prometheus metrics of the edge, per service (labelled by FQDN, which is unique platform-wide).

use std::sync::OnceLock;

use crate::server::Kind;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The edge's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Requests answered, by service and status class (`2xx`..`5xx`).
    pub requests: IntCounterVec,
    /// Request latency from the first byte read to the last written, by service.
    pub latency: HistogramVec,
    /// Open downstream connections, by listener kind (http, tls, tcp).
    pub connections: IntGaugeVec,
    /// Failures reaching instances, by service and kind (connect, proxy, no_backend, overloaded).
    pub upstream_errors: IntCounterVec,
    /// Raw TCP and TLS connections forwarded, by service.
    pub l4_connections: IntCounterVec,
    /// Change-feed version of the route table in use.
    pub table_version: IntGauge,
    /// Services in the route table.
    pub table_services: IntGauge,
    /// 1 while the last attempt to follow the database failed (serving the last table).
    pub table_stale: IntGauge,
    /// Names covered by served certificates.
    pub certificates: IntGauge,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// `connections` of each listener kind, looked up once, in [`Kind::ALL`] order.
    open: [IntGauge; 3],
}

/// The status classes `edge_requests_total` counts.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// One service's request counters and latency histogram, looked up by label once instead of per request. A class
/// counter is created at its first request, so a service shows only the classes it answered.
#[derive(Debug)]
pub(crate) struct ServiceMetrics {
    requests: IntCounterVec,
    fqdn: String,
    by_class: [OnceLock<IntCounter>; 6],
    pub(crate) latency: Histogram,
}

impl ServiceMetrics {
    pub(crate) fn new(all: &Metrics, fqdn: &str) -> Self {
        Self {
            requests: all.requests.clone(),
            fqdn: fqdn.to_owned(),
            by_class: Default::default(),
            latency: all.latency.with_label_values(&[fqdn]),
        }
    }

    /// The request counter of a response status (0: none was written).
    pub(crate) fn requests(&self, status: u16) -> &IntCounter {
        let i = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => 5,
        };
        self.by_class[i].get_or_init(|| self.requests.with_label_values(&[&self.fqdn, CLASSES[i]]))
    }
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let connections = IntGaugeVec::new(
            Opts::new("edge_open_connections", "Open downstream connections, by listener kind"),
            &["kind"],
        )?;
        let m = Self {
            open: Kind::ALL.map(|k| connections.with_label_values(&[k.label()])),
            connections,
            requests: IntCounterVec::new(
                Opts::new("edge_requests_total", "HTTP requests answered, by service and status class"),
                &["service", "class"],
            )?,
            latency: HistogramVec::new(
                HistogramOpts::new("edge_request_duration_seconds", "HTTP request latency at the edge, by service")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
                &["service"],
            )?,
            upstream_errors: IntCounterVec::new(
                Opts::new("edge_upstream_errors_total", "Failures reaching instances, by service and kind"),
                &["service", "kind"],
            )?,
            l4_connections: IntCounterVec::new(
                Opts::new("edge_l4_connections_total", "Raw TCP and TLS connections forwarded, by service"),
                &["service"],
            )?,
            table_version: IntGauge::new("edge_route_table_version", "Change-feed version of the route table")?,
            table_services: IntGauge::new("edge_route_table_services", "Services in the route table")?,
            table_stale: IntGauge::new(
                "edge_route_table_stale",
                "1 while the database cannot be followed and the last table is served",
            )?,
            certificates: IntGauge::new("edge_certificate_names", "Names covered by served certificates")?,
            access_log_dropped: IntCounter::new(
                "edge_access_log_dropped_lines_total",
                "Access log lines dropped because the writer fell behind",
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.latency.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.upstream_errors.clone()))?;
        registry.register(Box::new(m.l4_connections.clone()))?;
        registry.register(Box::new(m.table_version.clone()))?;
        registry.register(Box::new(m.table_services.clone()))?;
        registry.register(Box::new(m.table_stale.clone()))?;
        registry.register(Box::new(m.certificates.clone()))?;
        registry.register(Box::new(m.access_log_dropped.clone()))?;
        Ok(m)
    }

    /// The open-connections gauge of a listener kind.
    pub(crate) fn connections(&self, kind: Kind) -> &IntGauge {
        &self.open[kind as usize]
    }
}
