//! Prometheus metrics of a node agent, in its own registry (several agents may share a process in tests).

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// The agent's metrics.
#[derive(Debug, Clone)]
pub(crate) struct NodeMetrics {
    registry: Registry,
    /// Instance runs started.
    pub starts: IntCounter,
    /// Runs that ended, by outcome (`failed`, `stopped`, `restarted`).
    pub ends: IntCounterVec,
    /// Start-to-ready times.
    pub boot: Histogram,
    /// Instances running now.
    pub running: IntGauge,
    /// 1 when the last heartbeat reached PostgreSQL.
    pub heartbeat_ok: IntGauge,
    /// Bytes of instance output dropped, by reason (`rate`, `queue_full`).
    pub log_dropped_bytes: IntCounterVec,
    /// Observations of instances waiting to be written to PostgreSQL.
    pub reports_pending: IntGauge,
    /// Overlay packets, by what became of them (`sent`, `received`, `no_peer`, `unauthenticated`, `spoofed`).
    pub overlay_packets: IntCounterVec,
    /// Hosts this host's overlay tunnels to.
    pub overlay_peers: IntGauge,
}

impl NodeMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let starts = IntCounter::new("cloud_node_instance_starts_total", "Instance runs started").expect("valid");
        let ends = IntCounterVec::new(
            Opts::new("cloud_node_instance_ends_total", "Instance runs that ended, by outcome"),
            &["outcome"],
        )
        .expect("valid");
        let boot = Histogram::with_opts(
            HistogramOpts::new("cloud_node_boot_seconds", "Start to ready (port accepting) of instance runs")
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("valid");
        let running = IntGauge::new("cloud_node_instances_running", "Instances running on this node").expect("valid");
        let heartbeat_ok =
            IntGauge::new("cloud_node_heartbeat_ok", "1 when the last heartbeat reached PostgreSQL").expect("valid");
        let log_dropped_bytes = IntCounterVec::new(
            Opts::new("cloud_node_log_dropped_bytes_total", "Bytes of instance output dropped, by reason"),
            &["reason"],
        )
        .expect("valid");
        let reports_pending = IntGauge::new(
            "cloud_node_reports_pending",
            "Observations of instances not yet written to PostgreSQL (retried while it does not answer)",
        )
        .expect("valid");
        let overlay_packets = IntCounterVec::new(
            Opts::new(
                "cloud_node_overlay_packets_total",
                "Packets of the overlay between hosts, by outcome: sent, received, dropped for no_peer, \
                 unauthenticated (no peer's key, replayed, stale) or spoofed (a source the sending host does not hold)",
            ),
            &["outcome"],
        )
        .expect("valid");
        let overlay_peers =
            IntGauge::new("cloud_node_overlay_peers", "Hosts this host's overlay tunnels to").expect("valid");
        for c in [
            Box::new(starts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ends.clone()),
            Box::new(boot.clone()),
            Box::new(running.clone()),
            Box::new(heartbeat_ok.clone()),
            Box::new(log_dropped_bytes.clone()),
            Box::new(reports_pending.clone()),
            Box::new(overlay_packets.clone()),
            Box::new(overlay_peers.clone()),
        ] {
            registry.register(c).expect("unique names");
        }
        Self {
            registry,
            starts,
            ends,
            boot,
            running,
            heartbeat_ok,
            log_dropped_bytes,
            reports_pending,
            overlay_packets,
            overlay_peers,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encoding to memory");
        String::from_utf8(out).unwrap_or_default()
    }
}
