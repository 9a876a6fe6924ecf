//! The authoritative DNS role: the public zone `<region>.<base_domain>` (service FQDNs and platform subdomains to
//! the edge addresses, ACME challenge TXT records) and the private zone `internal` (instances and services by
//! name, each tenant seeing only its own).
//!
//! Boundaries: PostgreSQL is the only source of names. The role loads one consistent snapshot of everything it
//! serves ([`cloud_store::Store::zone_data`]) and answers every query from that in-memory value. When the change
//! feed moves it reads only what the new events touched ([`cloud_store::Store::zone_changes`]) and patches a copy
//! of the snapshot, sharing everything untouched with it, so a change costs in proportion to the change rather
//! than to the platform; the copy is swapped in whole, so a query sees one version from start to end. A full
//! load happens at start, when the store finds too much changed, and on the periodic resync that is the safety
//! net. When PostgreSQL is unreachable the last snapshot keeps being served.
//!
//! The private zone is answered only on the private listeners, and only to a source address inside some tenant's
//! network; the tenant is known from that address (networks are disjoint), so tenant B cannot resolve tenant A's
//! names and gets the NXDOMAIN it would get for a name that does not exist. The public listeners refuse the
//! private zone like any other name that is not ours. hickory-server does the wire work; [`handler`] decides.

mod handler;
mod metrics;
mod rate_limit;
mod sharded;
mod snapshot;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use cloud_store::{ChangeFeed, Store, StoreError, ZoneChanges};
use hickory_proto::rr::Name;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::handler::QueryHandler;
use crate::metrics::Metrics;
pub use crate::rate_limit::RateLimit;
use crate::rate_limit::RateLimiter;
use crate::snapshot::{Listener, Snapshot, ZoneParams};

/// How the DNS role listens and what it answers beyond what PostgreSQL holds: the `[dns]` section of `cloudd`'s
/// configuration file, durations in keys named `<field>_seconds`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Internet-facing addresses, each served over UDP and TCP on the same port (port 0 picks one; the handle
    /// tells which). Public zone only.
    #[serde(rename = "listen")]
    pub public_listen: Vec<SocketAddr>,
    /// Addresses on the tenants' private networks (UDP and TCP): both zones, the private one per tenant.
    pub private_listen: Vec<SocketAddr>,
    /// A/AAAA answers for service FQDNs and platform subdomains: the edge of this region.
    pub edge_addresses: Vec<IpAddr>,
    /// NS names of the public zone, fully qualified or relative to it; empty means `ns1.<zone>`.
    pub ns_names: Vec<String>,
    /// A/AAAA records for the NS names that lie inside the public zone (glue); empty publishes none.
    pub ns_addresses: Vec<IpAddr>,
    /// TTL of service FQDN and platform-domain records.
    #[serde(rename = "service_ttl_seconds", with = "cloud_domain::duration::seconds")]
    pub service_ttl: Duration,
    /// TTL of private instance and service records: short, instances come and go.
    #[serde(rename = "instance_ttl_seconds", with = "cloud_domain::duration::seconds")]
    pub instance_ttl: Duration,
    /// TTL of ACME challenge TXT records.
    #[serde(rename = "challenge_ttl_seconds", with = "cloud_domain::duration::seconds")]
    pub challenge_ttl: Duration,
    /// TTL of the SOA and NS records at the zone apexes.
    #[serde(rename = "apex_ttl_seconds", with = "cloud_domain::duration::seconds")]
    pub apex_ttl: Duration,
    /// TTL of negative answers (NXDOMAIN, NODATA): the SOA minimum and the SOA's TTL in the authority section.
    #[serde(rename = "negative_ttl_seconds", with = "cloud_domain::duration::seconds")]
    pub negative_ttl: Duration,
    /// Largest UDP response we send, whatever the client's EDNS buffer says (RFC 9715 suggests 1232).
    pub max_udp_payload: u16,
    /// Full reload interval even when the change feed is quiet: the safety net for a missed notification.
    #[serde(rename = "resync_interval_seconds", with = "cloud_domain::duration::seconds")]
    pub resync_interval: Duration,
    /// Delay before retrying a failed snapshot load.
    #[serde(rename = "retry_interval_seconds", with = "cloud_domain::duration::seconds")]
    pub retry_interval: Duration,
    /// Idle TCP connections are closed after this long.
    #[serde(rename = "tcp_idle_timeout_seconds", with = "cloud_domain::duration::seconds")]
    pub tcp_idle_timeout: Duration,
    /// Per-source response-rate limit on the public UDP listeners; `None` disables it (`"off"` in a file).
    #[serde(with = "rate_limit::setting")]
    pub rate_limit: Option<RateLimit>,
    /// Where the process running the DNS serves its `/healthz`, `/readyz` and `/metrics` (see
    /// [`DnsHandle::metrics_text`]).
    pub ops_listen: SocketAddr,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            public_listen: vec![SocketAddr::from(([0, 0, 0, 0], 53))],
            private_listen: Vec::new(),
            edge_addresses: vec![IpAddr::from([127, 0, 0, 1])],
            ns_names: Vec::new(),
            ns_addresses: Vec::new(),
            service_ttl: Duration::from_secs(60),
            instance_ttl: Duration::from_secs(5),
            challenge_ttl: Duration::from_secs(5),
            apex_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(10),
            max_udp_payload: 1232,
            resync_interval: Duration::from_secs(60),
            retry_interval: Duration::from_secs(1),
            tcp_idle_timeout: Duration::from_secs(10),
            rate_limit: Some(RateLimit::default()),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9153)),
        }
    }
}

/// Why the DNS role could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// A listen address could not be bound.
    #[error("cannot listen for DNS on {addr} ({protocol})")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        protocol: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The first snapshot could not be loaded: with nothing to serve yet, starting would only answer SERVFAIL.
    #[error("cannot load the zones from the database")]
    InitialLoad {
        /// The store error.
        #[source]
        source: StoreError,
    },
    /// A configured or derived name is not a valid DNS name.
    #[error("invalid DNS name \"{name}\" in the configuration")]
    InvalidName {
        /// The name.
        name: String,
        /// The parse error.
        #[source]
        source: hickory_proto::ProtoError,
    },
    /// The configuration contradicts itself.
    #[error("invalid DNS configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The metrics registry refused a metric (a programming error, reported rather than panicking).
    #[error("cannot register DNS metrics")]
    Metrics {
        /// The registry error.
        #[source]
        source: prometheus::Error,
    },
}

/// A running DNS server: its addresses, metrics and shutdown.
pub struct DnsHandle {
    public_addrs: Vec<SocketAddr>,
    private_addrs: Vec<SocketAddr>,
    servers: Vec<Server<QueryHandler>>,
    zones: Arc<ArcSwap<Snapshot>>,
    metrics: Metrics,
    stop: watch::Sender<bool>,
    served: watch::Sender<i64>,
    loader: JoinHandle<()>,
}

/// What an operations endpoint reports of a running DNS: [`DnsHandle::probe`].
#[derive(Debug, Clone)]
pub struct DnsProbe {
    metrics: Metrics,
}

impl DnsProbe {
    /// Prometheus text exposition of the server's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.text()
    }

    /// True while the last load failed and an older snapshot is served.
    pub fn is_stale(&self) -> bool {
        self.metrics.stale.get() != 0
    }
}

impl std::fmt::Debug for DnsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsHandle")
            .field("public_addrs", &self.public_addrs)
            .field("private_addrs", &self.private_addrs)
            .field("serial", &self.serial())
            .finish_non_exhaustive()
    }
}

impl DnsHandle {
    /// The bound public addresses (UDP and TCP share each), in the order configured.
    pub fn public_addrs(&self) -> Vec<SocketAddr> {
        self.public_addrs.clone()
    }

    /// The bound private addresses (UDP and TCP share each), in the order configured.
    pub fn private_addrs(&self) -> Vec<SocketAddr> {
        self.private_addrs.clone()
    }

    /// The change-feed version being served, which is also the SOA serial (modulo 2^32).
    pub fn serial(&self) -> i64 {
        self.zones.load().version
    }

    /// A receiver that sees the served version each time a new snapshot is swapped in. Lets callers (tests,
    /// readiness checks) wait for a change to be served instead of sleeping.
    pub fn served_versions(&self) -> watch::Receiver<i64> {
        self.served.subscribe()
    }

    /// Waits until a snapshot including `version` is served.
    pub async fn wait_for_version(&self, version: i64) {
        let mut served = self.served_versions();
        // The sender lives in the handle, so the channel cannot close while we borrow the handle.
        let _ = served.wait_for(|v| *v >= version).await;
    }

    /// The Prometheus text exposition of this server's metrics.
    pub fn metrics_text(&self) -> String {
        self.probe().metrics_text()
    }

    /// True while the last load failed and an older snapshot is served.
    pub fn is_stale(&self) -> bool {
        self.probe().is_stale()
    }

    /// What an operations endpoint reports, held apart from the server so that it stops whenever it is told to.
    pub fn probe(&self) -> DnsProbe {
        DnsProbe { metrics: self.metrics.clone() }
    }

    /// Stops listening, waits for in-flight queries, and stops following the change feed.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for server in &mut self.servers {
            if let Err(e) = server.shutdown_gracefully().await {
                tracing::warn!(error = %e, "dns: a listener ended with an error");
            }
        }
        let _ = (&mut self.loader).await;
    }
}

/// Binds UDP and TCP on the same address; with port 0, TCP takes the port UDP got, so a client retrying a
/// truncated answer over TCP finds us on the same port.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), DnsError> {
    let attempts = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await.map_err(|source| DnsError::Bind { addr, protocol: "udp", source })?;
        let bound = udp.local_addr().map_err(|source| DnsError::Bind { addr, protocol: "udp", source })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            // The port UDP got may be taken for TCP; try another one.
            Err(e) => last = Some(e),
        }
    }
    let source = last.unwrap_or_else(|| std::io::Error::other("no attempt made"));
    Err(DnsError::Bind { addr, protocol: "tcp", source })
}

fn ttl(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn zone_params(store: &Store, config: &DnsConfig) -> Result<ZoneParams, DnsError> {
    let public_apex = store.settings().zone().trim_end_matches('.').to_ascii_lowercase();
    let apex = Name::from_ascii(format!("{public_apex}."))
        .map_err(|source| DnsError::InvalidName { name: public_apex.clone(), source })?;
    let ns_names = if config.ns_names.is_empty() { vec!["ns1".to_owned()] } else { config.ns_names.clone() };
    let ns_names = ns_names
        .iter()
        .map(|n| {
            let parsed = Name::from_ascii(n).map_err(|source| DnsError::InvalidName { name: n.clone(), source })?;
            if parsed.is_fqdn() {
                Ok(parsed)
            } else {
                parsed.append_domain(&apex).map_err(|source| DnsError::InvalidName { name: n.clone(), source })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if config.public_listen.is_empty() && config.private_listen.is_empty() {
        return Err(DnsError::InvalidConfig { reason: "no listen address".into() });
    }
    Ok(ZoneParams {
        public_apex,
        ns_names,
        ns_addresses: config.ns_addresses.clone(),
        edge_addresses: config.edge_addresses.clone(),
        service_ttl: ttl(config.service_ttl),
        instance_ttl: ttl(config.instance_ttl),
        challenge_ttl: ttl(config.challenge_ttl),
        apex_ttl: ttl(config.apex_ttl),
        negative_ttl: ttl(config.negative_ttl),
    })
}

/// Loads the zones, binds every listener and serves until [`DnsHandle::shutdown`].
///
/// Fails when the first snapshot cannot be loaded or an address cannot be bound; afterwards database outages
/// only make the served data stale.
pub async fn start(store: Store, feed: ChangeFeed, config: DnsConfig) -> Result<DnsHandle, DnsError> {
    let params = zone_params(&store, &config)?;
    let metrics = Metrics::new().map_err(|source| DnsError::Metrics { source })?;
    let started = Instant::now();
    let data = store.zone_data().await.map_err(|source| DnsError::InitialLoad { source })?;
    let snapshot = Snapshot::build(data, &params);
    record_update(&metrics, Update::Full, &snapshot, started);
    tracing::info!(version = snapshot.version, records = snapshot.record_count(), "dns: zones loaded");
    let zones = Arc::new(ArcSwap::from_pointee(snapshot));
    let rate_limiter = config.rate_limit.map(|l| Arc::new(RateLimiter::new(l)));

    let mut servers = Vec::new();
    let mut bound = [Vec::new(), Vec::new()];
    for (listener, addrs) in [(Listener::Public, &config.public_listen), (Listener::Private, &config.private_listen)] {
        if addrs.is_empty() {
            continue;
        }
        let mut server = Server::new(QueryHandler {
            listener,
            zones: zones.clone(),
            metrics: metrics.clone(),
            rate_limiter: if listener == Listener::Public { rate_limiter.clone() } else { None },
            max_udp_payload: config.max_udp_payload,
        });
        for addr in addrs {
            let (udp, tcp, local) = bind_pair(*addr).await?;
            server.register_socket(udp);
            // Responses queued per TCP connection before the connection applies backpressure.
            server.register_listener(tcp, config.tcp_idle_timeout, 64);
            bound[listener as usize].push(local);
            tracing::info!(listener = listener.as_str(), addr = %local, "dns: listening (udp, tcp)");
        }
        servers.push(server);
    }
    let [public_addrs, private_addrs] = bound;
    let (stop, stopped) = watch::channel(false);
    let served = watch::Sender::new(zones.load().version);
    let loader = tokio::spawn(follow(
        store,
        feed,
        Arc::new(params),
        config,
        Published { zones: zones.clone(), served: served.clone(), metrics: metrics.clone() },
        stopped,
    ));
    Ok(DnsHandle { public_addrs, private_addrs, servers, zones, metrics, stop, served, loader })
}

/// How the served snapshot was brought up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Update {
    /// Everything loaded and built again.
    Full,
    /// Only the changes after the served version read and applied.
    Patch,
}

impl Update {
    fn counter(self, metrics: &Metrics) -> &prometheus::IntCounterVec {
        match self {
            Self::Full => &metrics.loads,
            Self::Patch => &metrics.patches,
        }
    }
}

fn record_update(metrics: &Metrics, update: Update, snapshot: &Snapshot, started: Instant) {
    update.counter(metrics).with_label_values(&["ok"]).inc();
    let seconds = started.elapsed().as_secs_f64();
    match update {
        Update::Full => metrics.build_seconds.observe(seconds),
        Update::Patch => metrics.patch_seconds.observe(seconds),
    }
    metrics.serial.set(snapshot.version);
    metrics.records.set(i64::try_from(snapshot.record_count()).unwrap_or(i64::MAX));
    metrics.stale.set(0);
}

/// Why bringing the snapshot up to date failed; the served snapshot stays in place either way.
#[derive(Debug, thiserror::Error)]
enum UpdateError {
    /// PostgreSQL could not be read.
    #[error("cannot read the zones from the database")]
    Store(#[source] StoreError),
    /// Building or patching panicked: a bug, reported rather than taking the loader down.
    #[error("building the zones panicked")]
    Panicked(#[source] tokio::task::JoinError),
}

/// Where the loader publishes snapshots.
struct Published {
    zones: Arc<ArcSwap<Snapshot>>,
    served: watch::Sender<i64>,
    metrics: Metrics,
}

/// Everything loaded and built again. Building is CPU work proportional to the platform (seconds per 100k
/// names in a debug build) and runs off the runtime's workers, which keep answering queries meanwhile.
async fn load_full(store: Store, params: Arc<ZoneParams>) -> Result<Snapshot, UpdateError> {
    let data = store.zone_data().await.map_err(UpdateError::Store)?;
    tokio::task::spawn_blocking(move || Snapshot::build(data, &params)).await.map_err(UpdateError::Panicked)
}

/// `snapshot` brought up to the newest version by the changes after its own; everything again when the store
/// says that is cheaper. A patch is proportional to the change and also runs off the runtime's workers.
async fn catch_up(
    store: &Store,
    params: &Arc<ZoneParams>,
    snapshot: Arc<Snapshot>,
) -> Result<(Snapshot, Update), UpdateError> {
    let changes = store.zone_changes(snapshot.version).await.map_err(UpdateError::Store)?;
    let params = params.clone();
    tokio::task::spawn_blocking(move || match changes {
        ZoneChanges::Reload(data) => (Snapshot::build(data, &params), Update::Full),
        ZoneChanges::Patch(patch) => (snapshot.patch(patch), Update::Patch),
    })
    .await
    .map_err(UpdateError::Panicked)
}

/// What woke the loader up.
enum Wake {
    /// The feed moved, or a failed patch is due for another try.
    Changes,
    /// A full resync is due (its interval passed, or the last one failed `retry_interval` ago).
    ResyncDue,
    /// The full resync running beside the patches finished.
    ResyncDone(Box<Result<Snapshot, UpdateError>>),
}

/// The full resync in flight, if any; pending forever when there is none.
async fn resync_done(task: &mut Option<JoinHandle<Result<Snapshot, UpdateError>>>) -> Result<Snapshot, UpdateError> {
    match task {
        Some(task) => task.await.map_err(UpdateError::Panicked)?,
        None => std::future::pending().await,
    }
}

/// Follows the change feed: when it passes the served version, reads only the changes after that version and
/// patches the snapshot with them (a full load inline when the store says there are too many). Every
/// `resync_interval` a full load runs beside the patches, so they keep flowing during its seconds of work; when
/// it is done it is caught up with the patches applied meanwhile and swapped in. A failed update leaves the
/// served snapshot in place and is retried, as the same kind of update, once `retry_interval` has passed.
async fn follow(
    store: Store,
    feed: ChangeFeed,
    params: Arc<ZoneParams>,
    config: DnsConfig,
    published: Published,
    mut stopped: watch::Receiver<bool>,
) {
    let Published { zones, served, metrics } = published;
    let publish = |snapshot: Snapshot, update: Update, started: Instant| {
        record_update(&metrics, update, &snapshot, started);
        tracing::debug!(
            version = snapshot.version,
            records = snapshot.record_count(),
            full = update == Update::Full,
            micros = started.elapsed().as_micros() as u64,
            "dns: zones updated"
        );
        let version = snapshot.version;
        zones.store(Arc::new(snapshot));
        served.send_replace(version);
    };
    let failed = |update: Update, e: &UpdateError| {
        update.counter(&metrics).with_label_values(&["error"]).inc();
        metrics.stale.set(1);
        tracing::warn!(
            error = e as &dyn std::error::Error,
            served_version = zones.load().version,
            full = update == Update::Full,
            "dns: cannot update the zones; serving the last snapshot"
        );
    };
    let mut latest = feed.subscribe();
    // A change committed between the initial load and this subscription is already marked seen; look once.
    latest.mark_changed();
    let mut feed_open = true;
    let period = config.resync_interval.max(Duration::from_millis(100));
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut resync_retry_at: Option<tokio::time::Instant> = None;
    let mut resync_task: Option<JoinHandle<Result<Snapshot, UpdateError>>> = None;
    let mut resync_started = Instant::now();
    loop {
        let resyncing = resync_task.is_some();
        let wake = tokio::select! {
            _ = stopped.changed() => break,
            changed = latest.changed(), if feed_open => {
                if changed.is_err() {
                    // The feed's task is gone (its process is shutting down); the resync tick still reloads.
                    feed_open = false;
                }
                Wake::Changes
            }
            _ = sleep_until(retry_at), if retry_at.is_some() => Wake::Changes,
            _ = resync.tick(), if !resyncing => Wake::ResyncDue,
            _ = sleep_until(resync_retry_at), if !resyncing && resync_retry_at.is_some() => Wake::ResyncDue,
            done = resync_done(&mut resync_task) => Wake::ResyncDone(Box::new(done)),
        };
        match wake {
            Wake::ResyncDue => {
                resync_retry_at = None;
                resync_started = Instant::now();
                resync_task = Some(tokio::spawn(load_full(store.clone(), params.clone())));
            }
            Wake::ResyncDone(done) => {
                resync_task = None;
                let current = zones.load_full();
                let done = match *done {
                    // Patches moved on while it was built: it must not take the served version back.
                    Ok(built) if built.version < current.version => {
                        catch_up(&store, &params, Arc::new(built)).await.map(|(snapshot, _)| snapshot)
                    }
                    other => other,
                };
                match done {
                    Ok(snapshot) => {
                        publish(snapshot, Update::Full, resync_started);
                        retry_at = None;
                    }
                    Err(e) => {
                        failed(Update::Full, &e);
                        resync_retry_at = Some(tokio::time::Instant::now() + config.retry_interval);
                    }
                }
            }
            Wake::Changes => {
                let target = *latest.borrow_and_update();
                let current = zones.load_full();
                if retry_at.is_none() && target <= current.version {
                    continue;
                }
                let started = Instant::now();
                match catch_up(&store, &params, current).await {
                    Ok((snapshot, update)) => {
                        publish(snapshot, update, started);
                        retry_at = None;
                    }
                    Err(e) => {
                        failed(Update::Patch, &e);
                        retry_at = Some(tokio::time::Instant::now() + config.retry_interval);
                    }
                }
            }
        }
    }
    if let Some(task) = resync_task {
        task.abort();
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
