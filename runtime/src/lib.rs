//! The node agent: registers the node, heartbeats, schedules pending instances onto live nodes, and reconciles
//! the instances assigned to it, desired state against observed, reporting what it observes.
//!
//! As root, each instance is a sandbox ([`cloud_sandbox`]): its image's layers under a private writable layer,
//! its own user namespace on a host id range no other instance holds, its own pid, mount, ipc and uts
//! namespaces, limits on memory, processes and CPU, and its own network namespace with a veth into its tenant's
//! bridge. State lives in PostgreSQL and in the kernel (namespaces and bridges by name); the agent itself keeps
//! nothing that a restart would lose: sandboxes end with the agent, and a restarted agent removes what they and
//! their namespaces left and starts again what should run. Without root (loopback mode) instances are host
//! processes with no isolation.

mod exec;
mod hosts;
mod images;
mod logs;
mod metrics;
mod net;
mod process;
mod reports;
mod retry;
mod supervise;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloud_domain::state::{DesiredState, InstanceState};
use cloud_store::{Assignment, ChangeFeed, NodeRegistration, Store, StoreError};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use logs::LogLimits;
pub use net::NetError;

/// The network namespace an instance runs in on a node (`ip netns exec <name> ...` enters it).
pub fn netns_name(node: Uuid, instance: Uuid) -> String {
    net::Networks::new(node).netns(instance)
}

/// The sandbox (runc container, cgroup `cloud-sandbox/<id>`) an instance runs in on a node: named after both,
/// so that agents sharing a host never touch each other's, even for one instance moved between them.
pub fn sandbox_id(node: Uuid, instance: Uuid) -> String {
    format!("{}{}", &node.simple().to_string()[..8], instance.simple())
}

/// How a node agent runs: the `[node]` section of `cloudd`'s configuration file, durations in keys named
/// `<field>_seconds`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique node name (default: the host name).
    pub name: String,
    /// Address other roles reach the node's instances through (informational for now).
    pub address: String,
    /// This host's address on the network between hosts, where its peers' overlay tunnels end. None: the node
    /// runs no overlay (one host).
    pub underlay_address: Option<Ipv4Addr>,
    /// Memory the node offers to instances, MiB.
    pub memory_mb: u64,
    /// Where unpacked images and sandboxes live.
    pub state_dir: PathBuf,
    /// How instances are kept apart: not a setting, it follows from the agent's privileges.
    #[serde(skip)]
    pub isolation: Isolation,
    /// The OCI runtime (runc) sandboxes run through.
    pub runc: PathBuf,
    /// Where sandboxes' host id ranges are handed out: one directory shared by every agent of a host.
    pub ids_dir: PathBuf,
    /// The static busybox that the base layer of directory bundles is built from.
    pub busybox: PathBuf,
    /// Processes and threads an instance may have.
    pub pids_limit: i64,
    /// CPU time an instance may use, in thousandths of a core (none: no limit; `0` in a file).
    #[serde(with = "zero_is_none")]
    pub cpu_millicores: Option<u64>,
    /// How long a started instance has to accept connections on its port.
    #[serde(rename = "ready_timeout_seconds", with = "cloud_domain::duration::seconds")]
    pub ready_timeout: Duration,
    /// How long a stopping instance has between SIGTERM and SIGKILL.
    #[serde(rename = "stop_grace_seconds", with = "cloud_domain::duration::seconds")]
    pub stop_grace: Duration,
    /// Heartbeat period.
    #[serde(rename = "heartbeat_seconds", with = "cloud_domain::duration::seconds")]
    pub heartbeat: Duration,
    /// A node is live (schedulable) if it heartbeated within this window.
    #[serde(rename = "live_window_seconds", with = "cloud_domain::duration::seconds")]
    pub live_window: Duration,
    /// A node silent for this long is lost: its instances are rescheduled.
    #[serde(rename = "lost_after_seconds", with = "cloud_domain::duration::seconds")]
    pub lost_after: Duration,
    /// First restart delay; doubles up to `max_backoff`.
    #[serde(rename = "min_backoff_seconds", with = "cloud_domain::duration::seconds")]
    pub min_backoff: Duration,
    /// Longest restart delay.
    #[serde(rename = "max_backoff_seconds", with = "cloud_domain::duration::seconds")]
    pub max_backoff: Duration,
    /// The private DNS listener on this host (a `cloudd dns` private listener). When set, namespaced instances
    /// get `/etc/resolv.conf` naming their gateway, and queries to the gateway's port 53 are forwarded there.
    pub dns: Option<SocketAddrV4>,
    /// How much output each instance may send to the database (docs/configuration.md, "Instance logs"); fixed
    /// for now, not in the file.
    #[serde(skip)]
    pub logs: LogLimits,
    /// Where the process running the agent serves its `/healthz`, `/readyz` and `/metrics` (see
    /// [`NodeHandle::metrics_text`]).
    pub ops_listen: std::net::SocketAddr,
    /// Where the agent takes the API's `instance exec` connections (each must present a session the API recorded
    /// in PostgreSQL); port 0 takes any free port, and the node records the one it got. Reachable by the API
    /// only: across hosts, the underlay address. `None` (in code only): exec is off on this node.
    pub exec_listen: Option<std::net::SocketAddr>,
    /// The platform secret key (`platform.secret_key_file`), given by the caller: with it the exec listener speaks
    /// TLS with a certificate of the platform CA, which the API checks; without it, plain WebSocket.
    #[serde(skip)]
    pub secret_key: Option<std::sync::Arc<cloud_certs::seal::SecretKey>>,
}

impl Default for NodeConfig {
    /// Named after the host, its state in `/var/lib/cloudd/node`.
    fn default() -> Self {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "node".into());
        Self::new(name, "/var/lib/cloudd/node".into())
    }
}

/// `cpu_millicores` as a file writes it: `0` for no limit.
mod zero_is_none {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.unwrap_or(0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Some(u64::deserialize(d)?).filter(|&m| m > 0))
    }
}

impl NodeConfig {
    /// Defaults for a node storing its state in `state_dir`.
    pub fn new(name: String, state_dir: PathBuf) -> Self {
        Self {
            name,
            address: "127.0.0.1".into(),
            underlay_address: None,
            memory_mb: total_memory_mb() * 4 / 5,
            state_dir,
            isolation: if current_uid() == 0 { Isolation::Namespaces } else { Isolation::Rootless },
            runc: "runc".into(),
            ids_dir: cloud_sandbox::ids::DEFAULT_DIR.into(),
            busybox: "/bin/busybox".into(),
            pids_limit: DEFAULT_PIDS_LIMIT,
            cpu_millicores: Some(DEFAULT_CPU_MILLICORES),
            ready_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            live_window: Duration::from_secs(10),
            lost_after: Duration::from_secs(15),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            dns: None,
            logs: LogLimits::default(),
            ops_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9154)),
            exec_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            secret_key: None,
        }
    }
}

/// Processes and threads per instance unless configured otherwise: plenty for a server, few enough that a fork
/// bomb stays inside its instance.
pub const DEFAULT_PIDS_LIMIT: i64 = 512;
/// CPU per instance unless configured otherwise: one core, so one busy instance never takes a whole node.
pub const DEFAULT_CPU_MILLICORES: u64 = 1000;

fn total_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(4096, |kb| kb / 1024)
}

/// How a node runs its instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// As root: a sandbox and a network namespace per instance, a bridge per tenant, nftables between tenants
    /// and the host.
    Namespaces,
    /// Without root, where the kernel lets users make user namespaces: each instance a rootless sandbox (its
    /// own pid, mount, ipc, uts and user namespaces on a read-only copy of its image, the seccomp filter, the
    /// reduced capabilities, `no_new_privs`), in the host's network bound to its private IP, which must be a
    /// loopback address (a tenant pool inside 127.0.0.0/8). Every sandbox is the agent's uid outside, and none
    /// has memory, process or CPU limits (cgroups are root's to hand out).
    Rootless,
    /// Without root and without user namespaces (or runc): instances run as host processes of the agent's user
    /// in the host's network, each bound to its private IP, which must be a loopback address. No isolation is
    /// claimed.
    Loopback,
}

/// What rootless mode lacks, said once when such an agent starts.
const ROOTLESS_WARNING: &str = "rootless sandboxes (the agent is not root): each instance has its own pid, mount, \
    ipc, uts and user namespaces and a read-only image, but all run as this user in the host's network, without \
    memory, process or CPU limits; run the agent as root to isolate tenants from each other";

/// Whether this kernel lets an unprivileged user make user namespaces (rootless sandboxes need them).
fn user_namespaces_allowed() -> bool {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|v| v.trim().parse::<u64>().ok());
    read("/proc/sys/user/max_user_namespaces").is_none_or(|n| n > 0)
        && read("/proc/sys/kernel/unprivileged_userns_clone").is_none_or(|v| v == 1)
}

/// What loopback mode lacks, said once when such an agent starts.
const LOOPBACK_WARNING: &str = "loopback mode (the agent is not root): instances run as host processes of this user, \
    in the host's network, pid, mount, user, ipc and uts namespaces and filesystem, without memory, process or \
    CPU limits: nothing isolates them from each other, from other tenants or from the host";

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The agent needs root for namespaces, bridges and nftables.
    #[error("namespace isolation needs root (network namespaces, bridges, nftables); run as root or in loopback mode")]
    NotRoot,
    /// Another live node registered with this node's underlay address.
    #[error(
        "node.underlay_address = {address} is held by node \"{holder}\", which is live: set node.underlay_address \
         (CLOUD_NODE_UNDERLAY_ADDRESS) to this host's own address, or stop that node's agent"
    )]
    UnderlayAddressTaken {
        /// The address announced.
        address: Ipv4Addr,
        /// The live node holding it.
        holder: String,
    },
    /// An underlay address was set for a node that does not isolate instances in namespaces.
    #[error(
        "node.underlay_address needs namespace isolation (root): the overlay carries instances' private networks \
         between hosts; unset it for a single host"
    )]
    OverlayNeedsNamespaces,
    /// The overlay between hosts could not start.
    #[error("the overlay between hosts")]
    Overlay(#[from] cloud_overlay::OverlayError),
    /// The exec listener's certificate could not be made.
    #[error("cannot make the exec listener's certificate")]
    ExecCertificate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The exec listener could not be bound.
    #[error("cannot listen for exec connections on {listen}")]
    Exec {
        /// The configured address.
        listen: std::net::SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The database failed.
    #[error("database")]
    Store(#[from] StoreError),
    /// Host networking failed.
    #[error("host networking")]
    Net(#[from] NetError),
    /// The sandboxes could not be set up (runc missing) or what a previous run left could not be removed.
    #[error("sandboxes")]
    Sandbox(#[from] cloud_sandbox::SandboxError),
}

/// What the agent shares with its supervisors.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Store,
    pub config: NodeConfig,
    pub node: Uuid,
    pub networks: net::Networks,
    /// This host's part of the overlay between hosts, when it announced an underlay address.
    pub overlay: Option<Arc<hosts::HostOverlay>>,
    /// Namespace mode only.
    pub sandboxes: Option<cloud_sandbox::Sandboxes>,
    pub images: images::ImageCache,
    pub logs: logs::LogQueue,
    pub reports: reports::Reports,
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

/// What an operations endpoint reports of a running agent: held apart from the agent, so that the agent stops
/// whenever it is told to, whoever still holds this.
#[derive(Debug, Clone)]
pub struct NodeProbe {
    metrics: metrics::NodeMetrics,
}

impl NodeProbe {
    /// Prometheus text exposition of the agent's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// True while heartbeats reach PostgreSQL.
    pub fn is_healthy(&self) -> bool {
        self.metrics.heartbeat_ok.get() == 1
    }
}

impl NodeHandle {
    /// Prometheus text exposition of the agent's metrics.
    pub fn metrics_text(&self) -> String {
        self.probe().metrics_text()
    }

    /// True while heartbeats reach PostgreSQL.
    pub fn is_healthy(&self) -> bool {
        self.probe().is_healthy()
    }

    /// What an operations endpoint reports.
    pub fn probe(&self) -> NodeProbe {
        NodeProbe { metrics: self.metrics.clone() }
    }

    /// Stops every instance, cleans up the host, hands the node's instances back for rescheduling and stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops the agent abruptly, as a crash would: instances end with it; namespaces, mounts and cgroups stay
    /// behind for the next agent to remove.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Registers the node and starts the agent.
pub async fn start(store: Store, feed: ChangeFeed, config: NodeConfig) -> Result<NodeHandle, NodeError> {
    if config.isolation == Isolation::Namespaces && current_uid() != 0 {
        return Err(NodeError::NotRoot);
    }
    if config.underlay_address.is_some() && config.isolation != Isolation::Namespaces {
        return Err(NodeError::OverlayNeedsNamespaces);
    }
    // A key of this start's own: a stolen one is worth nothing after the next restart.
    let key = config.underlay_address.map(|_| cloud_overlay::Key::generate());
    let registration = NodeRegistration {
        name: &config.name,
        address: &config.address,
        memory_mb: config.memory_mb,
        underlay_address: config.underlay_address,
        public_key: key.as_ref().map(cloud_overlay::Key::public),
    };
    let registered = match store.register(&registration, config.live_window).await {
        Ok(registered) => registered,
        Err(StoreError::UnderlayAddressTaken { address, node }) => {
            return Err(NodeError::UnderlayAddressTaken { address, holder: node });
        }
        Err(e) => return Err(e.into()),
    };
    let node = registered.id;
    let metrics = metrics::NodeMetrics::new();
    let overlay = match (key, config.underlay_address, registered.overlay_address) {
        (Some(key), Some(underlay), Some(address)) => {
            Some(Arc::new(hosts::HostOverlay::start(underlay, address, key, metrics.clone()).await?))
        }
        _ => None,
    };
    let networks = net::Networks::new(node).with_dns(config.dns).with_overlay(overlay.is_some());
    let sandboxes = match config.isolation {
        Isolation::Namespaces => {
            let sandboxes = cloud_sandbox::Sandboxes::new(cloud_sandbox::SandboxConfig {
                dir: config.state_dir.join("sandboxes").join(node.simple().to_string()),
                ids: config.ids_dir.clone(),
                runc: config.runc.clone(),
            })
            .await?;
            net::install_firewall(config.dns, overlay.as_ref().map(|_| store.settings().host_pool)).await?;
            // Whatever a previous run of this node left behind: its sandboxes ended with it; remove their
            // mounts, writable layers, cgroups and runc's state, then their namespaces.
            let removed = sandboxes.remove_all().await?;
            if removed > 0 {
                tracing::info!(removed, "removed the sandboxes a previous run left");
            }
            for leftover in networks.existing() {
                tracing::info!(instance = %leftover, "removing a namespace left by a previous run");
                let _ = networks.destroy(leftover).await;
            }
            // And what nodes that shared this state directory and never came back left.
            for gone in sandboxes.remove_abandoned().await? {
                tracing::info!(node = %gone, "removed the sandboxes of a node whose agent is gone");
                let Ok(gone) = gone.parse::<Uuid>() else { continue };
                let theirs = net::Networks::new(gone);
                for leftover in theirs.existing() {
                    let _ = theirs.destroy(leftover).await;
                }
            }
            net::remove_idle_bridges().await;
            Some(sandboxes)
        }
        Isolation::Rootless if user_namespaces_allowed() => {
            let dir = config.state_dir.join("sandboxes").join(node.simple().to_string());
            match cloud_sandbox::Sandboxes::new(cloud_sandbox::SandboxConfig {
                dir,
                ids: config.ids_dir.clone(),
                runc: config.runc.clone(),
            })
            .await
            {
                Ok(sandboxes) => {
                    sandboxes.remove_all().await?;
                    sandboxes.remove_abandoned().await?;
                    tracing::warn!("{ROOTLESS_WARNING}");
                    Some(sandboxes)
                }
                Err(e) => {
                    tracing::warn!(error = %cloud_domain::error_chain(&e), "no rootless sandboxes");
                    tracing::warn!("{LOOPBACK_WARNING}");
                    None
                }
            }
        }
        Isolation::Rootless | Isolation::Loopback => {
            tracing::warn!("{LOOPBACK_WARNING}");
            None
        }
    };
    let layout = match &sandboxes {
        Some(s) if s.rootless() => images::Layout::Rooted,
        Some(_) => images::Layout::Stacked,
        None => images::Layout::Flat,
    };
    let images = images::ImageCache::new(config.state_dir.clone(), layout, config.busybox.clone());
    let state_dir = config.state_dir.clone();
    let _ = tokio::task::spawn_blocking(move || {
        images::remove_leftovers(&state_dir);
        remove_earlier_versions(&state_dir);
    })
    .await;
    let exec = match config.exec_listen {
        Some(listen) => {
            let listener =
                tokio::net::TcpListener::bind(listen).await.map_err(|source| NodeError::Exec { listen, source })?;
            let mut bound = listener.local_addr().map_err(|source| NodeError::Exec { listen, source })?;
            // A wildcard is not an address to reach: the underlay's, else loopback.
            if bound.ip().is_unspecified() {
                bound.set_ip(config.underlay_address.map_or(Ipv4Addr::LOCALHOST, |a| a).into());
            }
            let tls = match &config.secret_key {
                Some(key) => Some(exec::Tls::start(&store, key, bound.ip()).await?),
                None => None,
            };
            let url = format!("{}://{bound}", if tls.is_some() { "wss" } else { "ws" });
            store.set_exec_address(node, Some(&url)).await?;
            tracing::info!(%url, "taking exec connections");
            Some((listener, tls))
        }
        None => {
            store.set_exec_address(node, None).await?;
            None
        }
    };
    let (logs_tx, logs_rx) = logs::LogQueue::new(logs::QUEUE_BYTES);
    let (reports, reports_rx) = reports::Reports::new();
    let shared = Arc::new(Shared {
        images,
        store: store.clone(),
        config,
        node,
        networks,
        overlay,
        sandboxes,
        logs: logs_tx,
        reports,
        metrics,
        // Registration just reached the database.
        in_contact_since: std::sync::Mutex::new(Some(std::time::Instant::now())),
    });
    tracing::info!(%node, name = %shared.config.name, "node agent up");
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = shared.metrics.clone();
    let task = tokio::spawn(run(shared, feed, stop_rx, logs_rx, reports_rx, exec));
    Ok(NodeHandle { node, metrics, stop: stop_tx, task })
}

/// Removes what earlier versions of the agent kept and this one does not use: bundles unpacked with their
/// setuid bits (`images/`), bundles run from the host's userland (`bundles/`), and the empty memory cgroups of
/// instances that ran as host processes.
fn remove_earlier_versions(state_dir: &std::path::Path) {
    for old in ["images", "bundles"] {
        let _ = std::fs::remove_dir_all(state_dir.join(old));
    }
    for parent in ["/sys/fs/cgroup/cloud", "/sys/fs/cgroup/memory/cloud"] {
        if let Ok(dir) = std::fs::read_dir(parent) {
            // rmdir only removes empty cgroups: one still in use by an older agent on this host stays.
            dir.flatten().filter(|e| e.path().is_dir()).for_each(|e| drop(std::fs::remove_dir(e.path())));
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

struct Supervisor {
    want: watch::Sender<Want>,
    task: tokio::task::AbortHandle,
}

/// How long a stopping agent keeps trying to write the observations and log lines still queued.
const FLUSH_AT_STOP: Duration = Duration::from_secs(10);

/// Aborts a task when dropped: what the agent spawns ends with it, also when the agent is aborted.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(
    shared: Arc<Shared>,
    feed: ChangeFeed,
    mut stop: watch::Receiver<bool>,
    logs_rx: mpsc::UnboundedReceiver<logs::Queued>,
    reports_rx: mpsc::UnboundedReceiver<reports::Pending>,
    exec: Option<(tokio::net::TcpListener, Option<exec::Tls>)>,
) {
    let mut shipper = AbortOnDrop(tokio::spawn(ship_logs(shared.store.clone(), logs_rx)));
    let mut reports = AbortOnDrop(tokio::spawn(reports::write(
        shared.store.clone(),
        shared.node,
        reports_rx,
        shared.metrics.reports_pending.clone(),
    )));
    let mut changes = feed.subscribe();
    // Owned here, so that aborting the agent aborts every supervisor, whose child processes then die.
    let mut tasks = tokio::task::JoinSet::new();
    let mut supervisors: HashMap<Uuid, Supervisor> = HashMap::new();
    let exec = exec.map(|(listener, tls)| tasks.spawn(exec::serve(shared.clone(), listener, tls)));
    let heartbeat = {
        let shared = shared.clone();
        tasks.spawn(async move {
            // A heartbeat is only worth its moment: a failed one is not retried but followed by the next.
            let mut failing = false;
            loop {
                let result = shared.store.heartbeat(shared.node).await;
                shared.metrics.heartbeat_ok.set(result.is_ok() as i64);
                {
                    let mut since = shared.in_contact_since.lock().expect("contact lock");
                    match result {
                        Ok(()) => {
                            *since = Some(since.unwrap_or_else(std::time::Instant::now));
                            if std::mem::take(&mut failing) {
                                tracing::info!("heartbeats reach PostgreSQL again");
                            }
                        }
                        Err(e) => {
                            *since = None;
                            if !std::mem::replace(&mut failing, true) {
                                tracing::warn!(error = %cloud_domain::error_chain(&e), "heartbeat failed");
                            }
                        }
                    }
                }
                tokio::time::sleep(shared.config.heartbeat).await;
            }
        })
    };
    let peers = shared.overlay.clone().map(|overlay| {
        let (shared, mut changes) = (shared.clone(), feed.subscribe());
        tasks.spawn(async move {
            let mut failing = false;
            loop {
                let followed = overlay.follow(&shared.store, shared.node, shared.config.live_window).await;
                match followed {
                    Ok(()) if std::mem::take(&mut failing) => tracing::info!("following the overlay's peers again"),
                    Ok(()) => {}
                    Err(e) if !std::mem::replace(&mut failing, true) => {
                        tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot follow the overlay's peers");
                    }
                    Err(_) => {}
                }
                // Every change may move an address; the clock catches peers leaving the live window.
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(shared.config.heartbeat) => {}
                }
            }
        })
    });
    let mut backoff = retry::Backoff::default();
    loop {
        while tasks.try_join_next().is_some() {}
        supervisors.retain(|_, s| !s.task.is_finished());
        let wait = match reconcile(&shared, &mut supervisors, &mut tasks).await {
            Ok(()) => {
                if backoff.succeeded() {
                    tracing::info!("reconciling again");
                }
                shared.config.heartbeat
            }
            Err(e) => {
                if !backoff.failing() {
                    tracing::warn!(error = %cloud_domain::error_chain(&e), "reconcile failed; retrying");
                }
                backoff.after_failure().max(shared.config.heartbeat)
            }
        };
        tokio::select! {
            _ = stop.changed() => break,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!("node agent stopping");
    heartbeat.abort();
    // No new exec; those running end with their instances.
    if let Some(exec) = exec {
        exec.abort();
    }
    // Peers are no longer followed: routes stay as they are while the instances stop, and go with the overlay.
    if let Some(peers) = peers {
        peers.abort();
    }
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
    let flushed = async {
        let _ = (&mut reports.0).await;
        let _ = (&mut shipper.0).await;
    };
    if tokio::time::timeout(FLUSH_AT_STOP, flushed).await.is_err() {
        tracing::warn!("stopping with observations or log lines PostgreSQL did not take");
    }
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
                let active = matches!(
                    a.state,
                    InstanceState::Starting
                        | InstanceState::Running
                        | InstanceState::Draining
                        | InstanceState::Stopping
                );
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
    let mut backoff = retry::Backoff::default();
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
            // Held while PostgreSQL does not answer, with their room in the queue: what comes meanwhile is
            // dropped, counted and noted once the queue is full, as when the database falls behind.
            loop {
                match store.append_logs(id, &lines).await {
                    Ok(()) => {
                        if backoff.succeeded() {
                            tracing::info!("log lines reach PostgreSQL again");
                        }
                        break;
                    }
                    Err(e) if e.is_unavailable() => {
                        if !backoff.failing() {
                            tracing::warn!(
                                error = %cloud_domain::error_chain(&e),
                                "cannot store log lines; retrying until PostgreSQL answers"
                            );
                        }
                        tokio::time::sleep(backoff.after_failure()).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %cloud_domain::error_chain(&e), instance = %id, "log lines refused; dropped");
                        break;
                    }
                }
            }
            drop(room);
        }
    }
}
