//! Prometheus metrics of one DNS server, in its own registry so that servers in one process (tests, `cloudd dev`)
//! never mix their counts.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The metrics of one server.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    registry: Registry,
    pub queries: IntCounterVec,
    pub latency: HistogramVec,
    pub rate_limited: IntCounterVec,
    pub loads: IntCounterVec,
    pub build_seconds: Histogram,
    pub patches: IntCounterVec,
    pub patch_seconds: Histogram,
    pub serial: IntGauge,
    pub records: IntGauge,
    pub stale: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let queries = IntCounterVec::new(
            Opts::new("dns_queries_total", "Queries answered, by listener, query type and response code."),
            &["listener", "qtype", "rcode"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("dns_query_duration_seconds", "Time from a decoded query to its response sent.")
                .buckets(vec![0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05]),
            &["listener"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new("dns_rate_limited_total", "UDP responses over the per-source rate, by what was done instead."),
            &["action"],
        )?;
        let loads = IntCounterVec::new(
            Opts::new("dns_snapshot_loads_total", "Full zone snapshot loads from PostgreSQL, by result."),
            &["result"],
        )?;
        let build_seconds = Histogram::with_opts(
            HistogramOpts::new("dns_snapshot_load_seconds", "Time to load and build a whole zone snapshot.")
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
        )?;
        let patches = IntCounterVec::new(
            Opts::new(
                "dns_snapshot_patches_total",
                "Change-feed moves applied to the snapshot incrementally (only the touched names), by result.",
            ),
            &["result"],
        )?;
        let patch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "dns_snapshot_patch_seconds",
                "Time to read the changes after the served version and patch the snapshot with them.",
            )
            .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
        )?;
        let serial = IntGauge::new("dns_zone_serial", "The change-feed version (SOA serial) being served.")?;
        let records = IntGauge::new("dns_zone_records", "Records in the snapshot being served, all views.")?;
        let stale = IntGauge::new(
            "dns_snapshot_stale",
            "1 while the last snapshot load or patch failed and an older snapshot is served (PostgreSQL unreachable).",
        )?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(loads.clone()))?;
        registry.register(Box::new(build_seconds.clone()))?;
        registry.register(Box::new(patches.clone()))?;
        registry.register(Box::new(patch_seconds.clone()))?;
        registry.register(Box::new(serial.clone()))?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(stale.clone()))?;
        Ok(Self {
            registry,
            queries,
            latency,
            rate_limited,
            loads,
            build_seconds,
            patches,
            patch_seconds,
            serial,
            records,
            stale,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "dns: encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A bounded label for a query type: attackers choose types freely, and each label value is a new time series.
pub(crate) fn qtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::ANY => "ANY",
        RecordType::CNAME => "CNAME",
        RecordType::HTTPS => "HTTPS",
        RecordType::MX => "MX",
        RecordType::NS => "NS",
        RecordType::PTR => "PTR",
        RecordType::SOA => "SOA",
        RecordType::SRV => "SRV",
        RecordType::SVCB => "SVCB",
        RecordType::TXT => "TXT",
        RecordType::CAA => "CAA",
        RecordType::AXFR | RecordType::IXFR => "XFR",
        _ => "other",
    }
}

pub(crate) fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}
