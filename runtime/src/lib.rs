//! The node agent: registers the node, heartbeats, schedules pending instances onto live nodes, and reconciles
//! the instances assigned to it, desired state against observed, reporting what it observes.
//!
//! Each instance runs in its own network namespace with a veth into its tenant's bridge, as an unprivileged
//! account, in a memory cgroup where one is available. State lives in PostgreSQL and in the kernel (namespaces
//! and bridges by name); the agent itself keeps nothing that a restart would lose: a restarted agent deletes the
//! namespaces it finds and starts again what should run. It needs root.

mod images;
mod logs;
mod metrics;
mod net;
mod process;
mod supervise;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloud_domain::state::{DesiredState, InstanceState};
use cloud_store::{Assignment, ChangeFeed, Store, StoreError};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use logs::LogLimits;
pub use net::NetError;

/// The network namespace an instance runs in on a node (`ip netns exec <name> ...` enters it).
pub fn netns_name(node: Uuid, instance: Uuid) -> String {
    net::Sandboxes::new(node).netns(instance)
}

/// How a node agent runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unique node name (default: the host name).
    pub name: String,
    /// Address other roles reach the node's instances through (informational for now).
    pub address: String,
    /// Memory the node offers to instances, MiB.
    pub memory_mb: u64,
    /// Where unpacked images live.
    pub state_dir: PathBuf,
    /// The `cloudd` executable, run for images whose command is `cloudd` (the built-in `hello`).
    pub self_exe: PathBuf,
    /// Account instances run as (default `nobody`).
    pub user: (u32, u32),
    /// How instances are kept apart.
    pub isolation: Isolation,
    /// How long a started instance has to accept connections on its port.
    pub ready_timeout: Duration,
    /// How long a stopping instance has between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// A node is live (schedulable) if it heartbeated within this window.
    pub live_window: Duration,
    /// A node silent for this long is lost: its instances are rescheduled.
    pub lost_after: Duration,
    /// First restart delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest restart delay.
    pub max_backoff: Duration,
    /// The private DNS listener on this host (a `cloudd dns` private listener). When set, namespaced instances
    /// get `/etc/resolv.conf` naming their gateway, and queries to the gateway's port 53 are forwarded there.
    pub dns: Option<SocketAddrV4>,
    /// How much output each instance may send to the database (docs/configuration.md, "Instance logs").
    pub logs: LogLimits,
}

impl NodeConfig {
    /// Defaults for a node storing its state in `state_dir`.
    pub fn new(name: String, state_dir: PathBuf, self_exe: PathBuf) -> Self {
        Self {
            name,
            address: "127.0.0.1".into(),
            memory_mb: total_memory_mb() * 4 / 5,
            state_dir,
            self_exe,
            user: (65534, 65534),
            isolation: if current_uid() == 0 { Isolation::Namespaces } else { Isolation::Loopback },
            ready_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            live_window: Duration::from_secs(10),
            lost_after: Duration::from_secs(15),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            dns: None,
            logs: LogLimits::default(),
        }
    }
}

fn total_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(4096, |kb| kb / 1024)
}

/// How a node runs its instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// As root: a network namespace per instance, a bridge per tenant, nftables between tenants and the host.
    Namespaces,
    /// Without root: instances run as the agent's user in the host's network, each bound to its private IP,
    /// which must be a loopback address (a tenant pool inside 127.0.0.0/8). No isolation is claimed.
    Loopback,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The agent needs root for namespaces, bridges and nftables.
    #[error("namespace isolation needs root (network namespaces, bridges, nftables); run as root or in loopback mode")]
    NotRoot,
    /// The database failed.
    #[error("database")]
    Store(#[from] StoreError),
    /// Host networking failed.
    #[error("host networking")]
    Net(#[from] NetError),
}

/// What the agent shares with its supervisors.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Store,
    pub config: NodeConfig,
    pub node: Uuid,
    pub sandboxes: net::Sandboxes,
    pub images: images::ImageCache,
    pub logs: logs::LogQueue,
    pub metrics: metrics::NodeMetrics,
    /// Since when heartbeats have reached PostgreSQL without a failure (`None` while they fail).
    pub in_contact_since: std::sync::Mutex<Option<std::time::Instant>>,
}

/// What a supervisor should do with its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Want {
    Run(Box<Assignment>),
    Stop,
    /// Deleted, or the agent is shutting down: stop and clean up without reporting.
    Remove,
}

/// A running agent.
#[derive(Debug)]
pub struct NodeHandle {
    /// The node's id.
    pub node: Uuid,
    metrics: metrics::NodeMetrics,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl NodeHandle {
    /// Prometheus text exposition of the agent's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// True while heartbeats reach PostgreSQL.
    pub fn is_healthy(&self) -> bool {
        self.metrics.heartbeat_ok.get() == 1
    }

    /// Stops every instance, cleans up the host, hands the node's instances back for rescheduling and stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops the agent abruptly, as a crash would: instance processes die with it, namespaces stay behind.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Registers the node and starts the agent.
pub async fn start(store: Store, feed: ChangeFeed, config: NodeConfig) -> Result<NodeHandle, NodeError> {
    if config.isolation == Isolation::Namespaces && current_uid() != 0 {
        return Err(NodeError::NotRoot);
    }
    let node = store.register_node(&config.name, &config.address, config.memory_mb).await?;
    let sandboxes = net::Sandboxes::new(node).with_dns(config.dns);
    if config.isolation == Isolation::Namespaces {
        net::install_firewall(config.dns).await?;
        // Whatever a previous run of this node left behind: its processes died with it; clean their namespaces.
        for leftover in sandboxes.existing() {
            tracing::info!(instance = %leftover, "removing a namespace left by a previous run");
            let _ = sandboxes.destroy(leftover).await;
            let cgroup = leftover.simple().to_string();
            let _ = tokio::task::spawn_blocking(move || process::MemoryCgroup::remove_named(&cgroup)).await;
        }
        net::remove_idle_bridges().await;
    }
    // Bundles unpacked by earlier versions (under `images/`) kept their setuid bits and modes: unpacked again.
    let old_images = config.state_dir.join("images");
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(old_images)).await;
    let (logs_tx, logs_rx) = logs::LogQueue::new(logs::QUEUE_BYTES);
    let shared = Arc::new(Shared {
        images: images::ImageCache::new(config.state_dir.join("bundles")),
        store: store.clone(),
        config,
        node,
        sandboxes,
        logs: logs_tx,
        metrics: metrics::NodeMetrics::new(),
        // Registration just reached the database.
        in_contact_since: std::sync::Mutex::new(Some(std::time::Instant::now())),
    });
    tracing::info!(%node, name = %shared.config.name, "node agent up");
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = shared.metrics.clone();
    let task = tokio::spawn(run(shared, feed, stop_rx, logs_rx));
    Ok(NodeHandle { node, metrics, stop: stop_tx, task })
}

#[allow(unsafe_code)]
fn current_uid() -> u32 {
    // SAFETY: getuid(2) touches no memory.
    unsafe { libc::getuid() }
}

struct Supervisor {
    want: watch::Sender<Want>,
    task: tokio::task::AbortHandle,
}

async fn run(
    shared: Arc<Shared>,
    feed: ChangeFeed,
    mut stop: watch::Receiver<bool>,
    logs_rx: mpsc::UnboundedReceiver<logs::Queued>,
) {
    let shipper = tokio::spawn(ship_logs(shared.store.clone(), logs_rx));
    let mut changes = feed.subscribe();
    // Owned here, so that aborting the agent aborts every supervisor, whose child processes then die.
    let mut tasks = tokio::task::JoinSet::new();
    let mut supervisors: HashMap<Uuid, Supervisor> = HashMap::new();
    let heartbeat = {
        let shared = shared.clone();
        tasks.spawn(async move {
            loop {
                let result = shared.store.heartbeat(shared.node).await;
                shared.metrics.heartbeat_ok.set(result.is_ok() as i64);
                {
                    let mut since = shared.in_contact_since.lock().expect("contact lock");
                    match result {
                        Ok(()) => *since = Some(since.unwrap_or_else(std::time::Instant::now)),
                        Err(e) => {
                            *since = None;
                            tracing::warn!(error = %e, "heartbeat failed");
                        }
                    }
                }
                tokio::time::sleep(shared.config.heartbeat).await;
            }
        })
    };
    loop {
        while tasks.try_join_next().is_some() {}
        supervisors.retain(|_, s| !s.task.is_finished());
        if let Err(e) = reconcile(&shared, &mut supervisors, &mut tasks).await {
            tracing::warn!(error = %e, "reconcile failed; retrying");
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(shared.config.heartbeat) => {}
        }
    }
    tracing::info!("node agent stopping");
    heartbeat.abort();
    for s in supervisors.values() {
        let _ = s.want.send(Want::Remove);
    }
    while tasks.join_next().await.is_some() {}
    if shared.config.isolation == Isolation::Namespaces {
        net::remove_idle_bridges().await;
    }
    if let Err(e) = shared.store.release_node(shared.node).await {
        tracing::warn!(error = %e, "could not hand instances back for rescheduling");
    }
    drop(shared);
    let _ = shipper.await;
}

async fn reconcile(
    shared: &Arc<Shared>,
    supervisors: &mut HashMap<Uuid, Supervisor>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), StoreError> {
    let store = &shared.store;
    // A node is judged lost by its silence only once this agent has itself been heard for that long: after an
    // outage of PostgreSQL (or of this agent's link to it) every node is silent, and none is lost for it.
    let heard_for = shared.in_contact_since.lock().expect("contact lock").map(|t| t.elapsed());
    if heard_for.is_some_and(|d| d >= shared.config.lost_after) {
        store.reap_lost_nodes(shared.config.lost_after).await?;
    }
    store.schedule_pending(shared.config.live_window).await?;
    let assigned = store.assignments(shared.node).await?;
    let mut seen = std::collections::HashSet::new();
    for a in assigned {
        seen.insert(a.id);
        let want = match a.desired {
            DesiredState::Running => Want::Run(Box::new(a.clone())),
            DesiredState::Stopped => Want::Stop,
        };
        match supervisors.get(&a.id) {
            Some(s) => {
                s.want.send_if_modified(|w| {
                    let changed = *w != want;
                    *w = want.clone();
                    changed
                });
            }
            None => {
                let active =
                    matches!(a.state, InstanceState::Starting | InstanceState::Running | InstanceState::Stopping);
                if a.desired == DesiredState::Running || active {
                    let (tx, rx) = watch::channel(want);
                    let task = tasks.spawn(supervise::supervise(shared.clone(), a.clone(), rx));
                    supervisors.insert(a.id, Supervisor { want: tx, task });
                }
            }
        }
    }
    for (id, s) in supervisors.iter() {
        if !seen.contains(id) {
            let _ = s.want.send(Want::Remove);
        }
    }
    Ok(())
}

/// Batches output lines into the database, a few times a second. What waits here is bounded by the queue's
/// room ([`logs::QUEUE_BYTES`]), released only once stored; each instance's share of it is bounded by its rate.
async fn ship_logs(store: Store, mut rx: mpsc::UnboundedReceiver<logs::Queued>) {
    let mut batch: HashMap<Uuid, Vec<logs::Queued>> = HashMap::new();
    loop {
        let Some(first) = rx.recv().await else { break };
        batch.entry(first.entry.instance).or_default().push(first);
        let deadline = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                e = rx.recv() => match e {
                    Some(e) => batch.entry(e.entry.instance).or_default().push(e),
                    None => break,
                },
            }
        }
        for (id, queued) in batch.drain() {
            let (lines, room): (Vec<(DateTime<Utc>, &str, String)>, Vec<_>) =
                queued.into_iter().map(|q| ((q.entry.at, q.entry.stream, q.entry.line), q.room)).unzip();
            if let Err(e) = store.append_logs(id, &lines).await {
                tracing::warn!(error = %e, instance = %id, "could not store log lines");
            }
            drop(room);
        }
    }
}
