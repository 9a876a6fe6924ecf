//! The edge role: terminates TLS, routes by host name (or raw TCP port) to the service's running instances on
//! their private IPs, and balances among them.
//!
//! Boundaries: PostgreSQL is the only source of routes. The edge loads one consistent route table at start, then
//! applies only what each change-feed move touched ([`cloud_store::Store::route_changes`]), swapping whole
//! immutable tables so a request sees one table from start to end; a periodic full reload is the safety net.
//! When PostgreSQL is unreachable the last table keeps serving and `/readyz` and the metrics say so.
//! Certificates come from a [`CertStore`] the caller keeps current; the edge only reads it during handshakes.
//!
//! pingora does the HTTP work (HTTP/1.1 and HTTP/2, upstream pools, upgrades) behind our own accept loops, which
//! open and close service ports at runtime. Tenant isolation: a request reaches only the instances of the service
//! its host (or SNI, or dedicated TCP port) names, retries stay inside that service, and an unknown name gets an
//! answer from the edge itself (404, or a refused handshake when no certificate covers it).

mod access_log;
mod certs;
mod cores;
mod http;
mod metrics;
pub mod proxy_protocol;
mod server;
mod stream;
mod table;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use cloud_domain::ports::Handler;
use cloud_store::{ChangeFeed, RouteChanges, Store, StoreError};
use prometheus::{Encoder, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::access_log::AccessWriter;
pub use crate::access_log::{AccessLog, LogTarget};
pub use crate::certs::{CertError, CertStore, ServedCert};
use crate::cores::Cores;
use crate::metrics::Metrics;
use crate::server::{Kind, PortListeners, bind_reuseport};
pub use crate::table::{RouteTable, Service as RoutedService};

/// How the edge listens and behaves: the `[edge]` section of `cloudd`'s configuration file, durations in keys
/// named `<field>_seconds`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// Where https (public port 443) is served; port 0 picks one (the handle tells which).
    pub https_listen: SocketAddr,
    /// Where plain http (public port 80) is served.
    pub http_listen: SocketAddr,
    /// The address service-declared ports (tls, tcp) open on, each on its own public port number.
    pub ports_ip: IpAddr,
    /// Connecting to an instance fails after this long (and another instance is tried).
    #[serde(rename = "connect_timeout_seconds", with = "cloud_domain::duration::seconds")]
    pub connect_timeout: Duration,
    /// Idle upstream keep-alive connections are closed after this long.
    #[serde(rename = "upstream_idle_timeout_seconds", with = "cloud_domain::duration::seconds")]
    pub upstream_idle_timeout: Duration,
    /// A TLS handshake must complete within this long.
    #[serde(rename = "handshake_timeout_seconds", with = "cloud_domain::duration::seconds")]
    pub handshake_timeout: Duration,
    /// An instance that failed a connect or a health check is avoided for this long.
    #[serde(rename = "health_window_seconds", with = "cloud_domain::duration::seconds")]
    pub health_window: Duration,
    /// How often every instance's port is checked.
    #[serde(rename = "health_interval_seconds", with = "cloud_domain::duration::seconds")]
    pub health_interval: Duration,
    /// On shutdown, open connections get this long to finish.
    #[serde(rename = "grace_period_seconds", with = "cloud_domain::duration::seconds")]
    pub grace_period: Duration,
    /// Full reload interval even when the change feed is quiet.
    #[serde(rename = "resync_interval_seconds", with = "cloud_domain::duration::seconds")]
    pub resync_interval: Duration,
    /// Delay before retrying after the database failed.
    #[serde(rename = "retry_interval_seconds", with = "cloud_domain::duration::seconds")]
    pub retry_interval: Duration,
    /// How long a request to a service scaled to zero waits for an instance to start.
    #[serde(rename = "wake_timeout_seconds", with = "cloud_domain::duration::seconds")]
    pub wake_timeout: Duration,
    /// How often the edge tells PostgreSQL the version it routes by and its requests in flight per instance
    /// (what ends drains and drives autoscale).
    #[serde(rename = "load_report_interval_seconds", with = "cloud_domain::duration::seconds")]
    pub load_report_interval: Duration,
    /// Opens the keys of tenants' certificates stored in the database; without it only the certificates given
    /// through the [`CertStore`] are served. Not a setting: the caller opens the key file.
    #[serde(skip)]
    pub secret_key: Option<Arc<cloud_certs::seal::SecretKey>>,
    /// Threads serving connections, each with its own runtime, listening sockets and upstream pools (0: one per
    /// core).
    pub threads: usize,
    /// Idle keep-alive connections to instances kept per thread and public port.
    pub upstream_pool_size: usize,
    /// Where the access log goes and in which format.
    pub access_log: AccessLog,
    /// Where the process running the edge serves its `/healthz`, `/readyz` and `/metrics` (see
    /// [`EdgeHandle::metrics_text`]).
    pub ops_listen: SocketAddr,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            https_listen: SocketAddr::from(([0, 0, 0, 0], 443)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 80)),
            ports_ip: IpAddr::from([0, 0, 0, 0]),
            connect_timeout: Duration::from_secs(2),
            upstream_idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            health_window: Duration::from_secs(5),
            health_interval: Duration::from_secs(2),
            grace_period: Duration::from_secs(5),
            resync_interval: Duration::from_secs(60),
            retry_interval: Duration::from_secs(1),
            wake_timeout: Duration::from_secs(30),
            load_report_interval: Duration::from_secs(1),
            secret_key: None,
            threads: 0,
            upstream_pool_size: 1024,
            access_log: AccessLog::default(),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9156)),
        }
    }
}

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The first route table could not be loaded: with nothing to route, starting would only answer 404s.
    #[error("cannot load the route table from the database")]
    InitialLoad {
        /// The store error.
        #[source]
        source: StoreError,
    },
    /// The threads serving connections could not be started.
    #[error("cannot start the edge's threads")]
    Threads {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The access log file could not be opened.
    #[error("cannot open the access log")]
    AccessLog {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics registry refused a metric (a programming error, reported rather than panicking).
    #[error("cannot register the edge's metrics")]
    Metrics {
        /// The registry error.
        #[source]
        source: prometheus::Error,
    },
}

/// State every connection reads.
pub(crate) struct Shared {
    pub(crate) table: ArcSwap<RouteTable>,
    /// Notified after every table swap (requests waiting for a woken service).
    pub(crate) swapped: tokio::sync::Notify,
    pub(crate) store: Store,
    pub(crate) certs: Arc<CertStore>,
    pub(crate) metrics: Metrics,
    pub(crate) access_log: AccessWriter,
    pub(crate) config: EdgeConfig,
    /// Open downstream connections on every core, for the graceful shutdown.
    pub(crate) open: AtomicUsize,
    /// The runtime that started the edge, where database work runs (see [`cores`]).
    control: tokio::runtime::Handle,
    /// This edge in its load reports.
    pub(crate) edge_id: Uuid,
    /// Backends no longer routed to that still have requests or connections in flight (a draining instance's),
    /// kept until those end so that the load reports count them.
    pub(crate) retired: std::sync::Mutex<Vec<Arc<table::Backend>>>,
}

impl Shared {
    /// Runs database work on the runtime that started the edge and waits for it; `None` if that runtime is gone.
    pub(crate) async fn on_control<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        self.control.spawn(work).await.ok()
    }
}

/// A running edge.
pub struct EdgeHandle {
    shared: Arc<Shared>,
    registry: Registry,
    https_addr: SocketAddr,
    http_addr: SocketAddr,
    cores: Arc<Cores>,
    ports: Arc<std::sync::Mutex<PortListeners>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What an operations endpoint reports of a running edge: [`EdgeHandle::probe`].
#[derive(Clone)]
pub struct EdgeProbe {
    shared: Arc<Shared>,
    registry: Registry,
}

impl std::fmt::Debug for EdgeProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeProbe").finish_non_exhaustive()
    }
}

impl EdgeProbe {
    /// True while the route table is stale (the database cannot be followed).
    pub fn is_stale(&self) -> bool {
        self.shared.metrics.table_stale.get() != 0
    }

    /// Prometheus text exposition of the edge's metrics.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.certificates.set(self.shared.certs.len() as i64);
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl std::fmt::Debug for EdgeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHandle").field("https", &self.https_addr).field("http", &self.http_addr).finish()
    }
}

impl EdgeHandle {
    /// Where https is served.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// Where plain http is served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The change-feed version of the table in use.
    pub fn table_version(&self) -> i64 {
        self.shared.table.load().version
    }

    /// The table in use.
    pub fn table(&self) -> Arc<RouteTable> {
        self.shared.table.load_full()
    }

    /// Whether the database could not be followed at the last attempt (the last table is being served).
    pub fn is_stale(&self) -> bool {
        self.probe().is_stale()
    }

    /// Service ports open now: (port, "tls" | "tcp").
    pub async fn open_ports(&self) -> Vec<(u16, &'static str)> {
        let mut ports: Vec<_> = self
            .ports
            .lock()
            .expect("ports lock")
            .open_ports()
            .into_iter()
            .map(|(p, k)| (p, if k == Kind::Tcp { "tcp" } else { "tls" }))
            .collect();
        ports.sort();
        ports
    }

    /// Prometheus text exposition of the edge's metrics.
    pub fn metrics_text(&self) -> String {
        self.probe().metrics_text()
    }

    /// What an operations endpoint reports, held apart from the edge so that it drains whenever it is told to.
    pub fn probe(&self) -> EdgeProbe {
        EdgeProbe { shared: self.shared.clone(), registry: self.registry.clone() }
    }

    /// Stops accepting, lets open connections finish within the grace period, then stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.cores.drain();
        let deadline = Instant::now() + self.shared.config.grace_period;
        while self.shared.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in &self.tasks {
            t.abort();
        }
        if let Err(e) = self.shared.store.remove_edge(self.shared.edge_id).await {
            tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot withdraw the edge's load report");
        }
        self.cores.exit().await;
    }
}

/// Starts the edge: loads the route table, binds the listeners and follows the change feed.
pub async fn start(
    store: Store,
    feed: ChangeFeed,
    certs: Arc<CertStore>,
    config: EdgeConfig,
) -> Result<EdgeHandle, EdgeError> {
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).map_err(|source| EdgeError::Metrics { source })?;
    let access_log = AccessWriter::start(&config.access_log, metrics.access_log_dropped.clone())
        .map_err(|source| EdgeError::AccessLog { source })?;
    let data = store.route_data().await.map_err(|source| EdgeError::InitialLoad { source })?;
    let table = RouteTable::load(data, None);
    metrics.table_version.set(table.version);
    metrics.table_services.set(table.len() as i64);
    let shared = Arc::new(Shared {
        table: ArcSwap::from_pointee(table),
        swapped: tokio::sync::Notify::new(),
        store: store.clone(),
        certs,
        metrics,
        access_log,
        config: config.clone(),
        open: AtomicUsize::new(0),
        control: tokio::runtime::Handle::current(),
        edge_id: Uuid::new_v4(),
        retired: std::sync::Mutex::new(Vec::new()),
    });

    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let bind = |addr: SocketAddr| bind_reuseport(addr, threads).map_err(|source| EdgeError::Bind { addr, source });
    let https = bind(config.https_listen)?;
    let http = bind(config.http_listen)?;
    let https_addr = https[0].local_addr().map_err(|source| EdgeError::Bind { addr: config.https_listen, source })?;
    let http_addr = http[0].local_addr().map_err(|source| EdgeError::Bind { addr: config.http_listen, source })?;

    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    if let Some(key) = &config.secret_key {
        // The first set is loaded before the first connection is accepted.
        if let Err(e) = certs::load_tenant_certs(&store, key, &shared.certs).await {
            tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot load certificates yet");
        }
        let follow_certs = certs::follow_tenant_certs(
            store.clone(),
            feed.clone(),
            key.clone(),
            shared.certs.clone(),
            config.resync_interval,
        );
        tasks.push(tokio::spawn(follow_certs));
    }
    let cores = Arc::new(Cores::start(&shared, threads).map_err(|source| EdgeError::Threads { source })?);
    cores.listen(443, Kind::Tls, https);
    cores.listen(80, Kind::Http, http);
    let ports = PortListeners::new(shared.clone(), cores.clone(), config.ports_ip, vec![https_addr, http_addr]);
    let ports = Arc::new(std::sync::Mutex::new(ports));
    ports.lock().expect("ports lock").reconcile();
    tasks.extend([
        tokio::spawn(follow(store, feed, shared.clone(), ports.clone(), stopped.clone())),
        tokio::spawn(check_health(shared.clone(), stopped.clone())),
        tokio::spawn(stop_idle(shared.clone(), stopped.clone())),
        tokio::spawn(report_load(shared.clone(), stopped)),
    ]);
    tracing::info!(https = %https_addr, http = %http_addr, threads, services = shared.table.load().len(), "edge serving");
    Ok(EdgeHandle { shared, registry, https_addr, http_addr, cores, ports, stop, tasks })
}

/// Resolves once shutdown is signalled (or the signal is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here, inside this function.
    let _ = stop.wait_for(|s| *s).await.is_ok();
}

/// Keeps the route table current: the touched services on every feed move, everything on the resync interval,
/// retries while the database is unreachable (serving the last table meanwhile).
async fn follow(
    store: Store,
    feed: ChangeFeed,
    shared: Arc<Shared>,
    ports: Arc<std::sync::Mutex<PortListeners>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut moved = feed.subscribe();
    let mut last_full = Instant::now();
    let mut retrying = false;
    loop {
        let resync_in = shared.config.resync_interval.saturating_sub(last_full.elapsed());
        tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            r = moved.changed(), if !retrying => if r.is_err() { return },
            _ = tokio::time::sleep(shared.config.retry_interval), if retrying => {}
            _ = tokio::time::sleep(resync_in) => {}
        }
        let full = last_full.elapsed() >= shared.config.resync_interval;
        let current = shared.table.load_full();
        let next = if full {
            store.route_data().await.map(|d| RouteTable::load(d, Some(&current)))
        } else {
            store.route_changes(current.version).await.map(|c| match c {
                RouteChanges::Reload(d) => RouteTable::load(d, Some(&current)),
                RouteChanges::Services { version, present, gone } => current.apply(version, present, &gone),
            })
        };
        match next {
            Ok(table) => {
                if full {
                    last_full = Instant::now();
                }
                retrying = false;
                shared.metrics.table_stale.set(0);
                let changed = table.version != current.version || full;
                shared.metrics.table_version.set(table.version);
                shared.metrics.table_services.set(table.len() as i64);
                retire(&shared, &current, &table);
                shared.table.store(Arc::new(table));
                shared.swapped.notify_waiters();
                if changed {
                    ports.lock().expect("ports lock").reconcile();
                }
            }
            Err(e) => {
                if !retrying {
                    tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot follow the database; serving the last route table");
                }
                retrying = true;
                shared.metrics.table_stale.set(1);
            }
        }
    }
}

/// Keeps the backends `next` drops that still have something in flight, for the load reports.
fn retire(shared: &Shared, current: &RouteTable, next: &RouteTable) {
    let mut retired = shared.retired.lock().expect("retired lock");
    retired.retain(|b| b.in_flight() > 0);
    retired.extend(current.dropped_backends(next).filter(|b| b.in_flight() > 0).cloned());
}

/// Reports to PostgreSQL, every `load_report_interval`, the version routed by and what is in flight per instance.
async fn report_load(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "edge".into(), |h| h.trim().to_owned());
    let mut failing = false;
    loop {
        tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            _ = tokio::time::sleep(shared.config.load_report_interval) => {}
        }
        let table = shared.table.load_full();
        let mut load: std::collections::HashMap<Uuid, u32> = std::collections::HashMap::new();
        for (_, b) in table.backends() {
            if b.in_flight() > 0 {
                *load.entry(b.id).or_default() += b.in_flight();
            }
        }
        {
            let mut retired = shared.retired.lock().expect("retired lock");
            retired.retain(|b| b.in_flight() > 0);
            for b in retired.iter() {
                *load.entry(b.id).or_default() += b.in_flight();
            }
        }
        let load: Vec<(Uuid, u32)> = load.into_iter().collect();
        match shared.store.report_edge(shared.edge_id, &name, table.version, &load).await {
            Ok(()) if std::mem::take(&mut failing) => tracing::info!("load reports reach PostgreSQL again"),
            Ok(()) => {}
            Err(e) if !std::mem::replace(&mut failing, true) => {
                tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot report the edge's load");
            }
            Err(_) => {}
        }
    }
}

/// A request arrived for a service: for one that scales to zero, restart its idle clock in the database, at
/// most once a second per service and edge.
pub(crate) fn touch(shared: &Arc<Shared>, service: &table::Service) {
    if service.scale_to_zero_after.is_none() || !service.touch_due() {
        return;
    }
    let (store, id) = (shared.store.clone(), service.id);
    shared.control.spawn(async move {
        if let Err(e) = store.touch_service(id).await {
            tracing::debug!(service = %id, error = %e, "cannot record the last request");
        }
    });
}

/// For a service with no instance to take a request: wakes it if it scales to zero, and waits (up to the wake
/// timeout) until one of its instances runs, as when a deploy's instances are still starting; the request then
/// goes there rather than failing. `None`: nothing to wait for, or it did not start in time.
pub(crate) async fn wake(
    shared: &Arc<Shared>,
    service: &table::Service,
) -> Option<(Arc<table::Service>, table::InFlight)> {
    let started = Instant::now();
    if service.scale_to_zero_after.is_some() {
        let (store, id) = (shared.store.clone(), service.id);
        match shared.on_control(async move { store.wake_service(id).await }).await? {
            Ok(n) => tracing::info!(service = %service.fqdn, instances = n, "waking a service scaled to zero"),
            Err(e) => {
                let error = cloud_domain::error_chain(&e);
                tracing::warn!(service = %service.fqdn, error = %error, "cannot wake the service");
                return None;
            }
        }
    } else if service.starting == 0 {
        return None;
    }
    let deadline = tokio::time::Instant::now() + shared.config.wake_timeout;
    loop {
        let swapped = shared.swapped.notified();
        let table = shared.table.load();
        let s = table.service(service.id)?;
        if let table::Pick::Backend(g) = s.pick(&[]) {
            tracing::info!(service = %service.fqdn, ms = started.elapsed().as_millis() as u64, "an instance is up");
            return Some((s.clone(), g));
        }
        // The instances it waited for failed or went away: nothing is coming.
        if s.starting == 0 && s.scale_to_zero_after.is_none() {
            return None;
        }
        drop(table);
        if tokio::time::timeout_at(deadline, swapped).await.is_err() {
            return None;
        }
    }
}

/// Scale to zero: stops the instances of services idle past their time. Every edge runs it; the database
/// makes it happen once.
async fn stop_idle(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !shared.table.load().any_scale_to_zero() {
            continue;
        }
        match shared.store.stop_idle_instances().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(instances = n, "scaled idle services to zero"),
            Err(e) => tracing::debug!(error = %e, "cannot check for idle services"),
        }
    }
}

/// Active health checks: every instance's first served port must accept a connection; a failure marks it down
/// for the health window, a success marks it up again. Checks run concurrently, a bounded number at a time.
async fn check_health(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    const CONCURRENT: usize = 64;
    loop {
        tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            _ = tokio::time::sleep(shared.config.health_interval) => {}
        }
        let table = shared.table.load_full();
        let targets: Vec<_> = table
            .backends()
            .filter_map(|(s, b)| {
                let port = s.ports.iter().find(|p| !p.handlers.contains(&Handler::Redirect))?.destination_port;
                Some((b.clone(), SocketAddr::new(b.ip, port)))
            })
            .collect();
        for chunk in targets.chunks(CONCURRENT) {
            let mut set = tokio::task::JoinSet::new();
            for (backend, addr) in chunk.iter().cloned() {
                let timeout = shared.config.connect_timeout;
                let window = shared.config.health_window;
                set.spawn(async move {
                    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                        Ok(Ok(_)) => backend.mark_up(),
                        _ => backend.mark_down(window),
                    }
                });
            }
            while set.join_next().await.is_some() {}
        }
    }
}
