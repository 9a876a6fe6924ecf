//! Nodes: registration and heartbeats, scheduling instances onto live nodes, what each node must run, what it
//! observed, and instance logs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, LogLine};
use cloud_domain::ipam;
use cloud_domain::placement::{Node, Pending, place, waiting_reason};
use cloud_domain::state::{DesiredState, InstanceState, RestartPolicy};
use ipnet::Ipv4Net;
use uuid::Uuid;

use crate::page::{self, RowLock, Table, Visible};
use crate::{Store, StoreError, record_event};

/// Advisory lock key serialising scheduling passes platform-wide.
pub(crate) const SCHEDULER_LOCK: i64 = 7_265_748;

/// Advisory lock key serialising registrations of overlay nodes: who holds an underlay address and which overlay
/// addresses are free are read and changed in one step.
const HOSTS_LOCK: i64 = 7_265_749;

/// Advisory lock key (session-level) the one acting controller holds (see `Store::lead`). Every key of ours is in
/// this list or in the migrations (7_265_746, the events' numbering; `TCP_PORT_LOCK` 7_265_747 in services.rs).
pub(crate) const CONTROLLER_LOCK: i64 = 7_265_750;

/// Instance states in which an instance holds its private IP on its node: assigned and not ended. A pending one is
/// about to start there, so peers route to it before it answers rather than after.
const HOLDING_STATES: [&str; 5] = ["pending", "starting", "running", "draining", "stopping"];

/// Log lines kept per instance; older ones are dropped as new ones arrive.
pub const LOG_LINES_KEPT: i64 = 2000;

/// Bytes of log text kept per instance; older lines are dropped as new ones arrive. With node agents cutting lines
/// at 16 KiB, this is also the most a read of an instance's log returns.
pub const LOG_BYTES_KEPT: i64 = 1 << 20;

/// An instance assigned to a node, with everything the node needs to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Instance id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// The tenant's private network.
    pub network: Ipv4Net,
    /// Instance name.
    pub name: String,
    /// Its service's name, if any.
    pub service: Option<String>,
    /// Bundle digest to run.
    pub image_digest: String,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Memory limit, MiB.
    pub memory_mb: u32,
    /// The port it listens on (its `PORT`, and where readiness is checked): the image's unless the instance was
    /// created with another.
    pub port: u16,
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// What the tenant wants.
    pub desired: DesiredState,
    /// What was last observed.
    pub state: InstanceState,
    /// Private IP.
    pub private_ip: Ipv4Addr,
    /// Restarts so far.
    pub restart_count: u32,
}

/// What a node observed of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Observed state.
    pub state: InstanceState,
    /// Why (failures, restarts).
    pub reason: Option<String>,
    /// Exit code of the last run.
    pub exit_code: Option<i32>,
    /// Start-to-ready time of the last start.
    pub boot_time_us: Option<u64>,
    /// Restarts so far.
    pub restart_count: u32,
}

#[derive(sqlx::FromRow)]
struct AssignmentRow {
    id: Uuid,
    tenant_id: Uuid,
    network: String,
    name: String,
    service: Option<String>,
    image_digest: String,
    args: Vec<String>,
    env: sqlx::types::Json<BTreeMap<String, String>>,
    memory_mb: i32,
    port: i32,
    restart_policy: String,
    desired_state: String,
    state: String,
    private_ip: IpAddr,
    restart_count: i32,
}

/// What a node announces when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRegistration<'a> {
    /// Unique node name: a node registering under a name already known takes that node's place.
    pub name: &'a str,
    /// Informational address (`node.address`).
    pub address: &'a str,
    /// Memory offered to instances, MiB.
    pub memory_mb: u64,
    /// Where its peers' tunnels end; `None` for a node that runs no overlay.
    pub underlay_address: Option<Ipv4Addr>,
    /// The public part of the overlay key pair it made at this start; `None` while it runs no overlay.
    pub public_key: Option<[u8; 32]>,
}

/// What the platform recorded of a registered node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The node's id.
    pub id: Uuid,
    /// Its overlay address, when it announced an underlay address.
    pub overlay_address: Option<Ipv4Addr>,
}

/// Another live overlay node, as a node's overlay needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The node's id.
    pub node: Uuid,
    /// Its name.
    pub name: String,
    /// Where its tunnel ends.
    pub underlay_address: Ipv4Addr,
    /// Its overlay address.
    pub overlay_address: Ipv4Addr,
    /// The public key it registered at its last start.
    pub public_key: [u8; 32],
    /// The private IPs of the instances assigned to it that have not ended, in order.
    pub instance_ips: Vec<Ipv4Addr>,
}

/// A node's overlay identity as change-feed events carry it.
#[derive(serde::Serialize)]
struct NodeEvent<'a> {
    id: Uuid,
    name: &'a str,
    underlay_address: Option<Ipv4Addr>,
    overlay_address: Option<Ipv4Addr>,
    /// Hex.
    overlay_public_key: Option<String>,
}

#[derive(sqlx::FromRow)]
struct HostRow {
    id: Uuid,
    underlay_address: Option<IpAddr>,
    overlay_address: Option<IpAddr>,
    overlay_public_key: Option<Vec<u8>>,
}

#[derive(sqlx::FromRow)]
struct NamedHostRow {
    name: String,
    #[sqlx(flatten)]
    host: HostRow,
}

fn v4(ip: Option<IpAddr>) -> Option<Ipv4Addr> {
    match ip {
        Some(IpAddr::V4(ip)) => Some(ip),
        _ => None,
    }
}

pub(crate) fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

impl Store {
    /// Registers a node that runs no overlay (or refreshes it, by name) and returns its id.
    pub async fn register_node(&self, name: &str, address: &str, memory_mb: u64) -> Result<Uuid, StoreError> {
        let node = NodeRegistration { name, address, memory_mb, underlay_address: None, public_key: None };
        Ok(self.register(&node, Duration::ZERO).await?.id)
    }

    /// Registers a node (or refreshes it, by name). A node announcing an underlay address gets an overlay address
    /// from [`Settings::host_pool`](crate::Settings::host_pool), once: it keeps it across re-registrations while
    /// the address is in the pool. The key announced replaces the one stored, as agents make a fresh one at every
    /// start. An underlay address held by another node that heartbeated within `live` is refused with
    /// [`StoreError::UnderlayAddressTaken`], changing nothing; a dead holder loses it (and its key) to the newcomer.
    /// A change peers must follow is an event on the change feed (type `node`, no tenant).
    pub async fn register(&self, node: &NodeRegistration<'_>, live: Duration) -> Result<Registered, StoreError> {
        if let Some(underlay) = node.underlay_address {
            self.check_underlay(underlay)?;
        }
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(HOSTS_LOCK).execute(&mut *tx).await?;
            if let Some(underlay) = node.underlay_address {
                let holder: Option<(Uuid, String, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, name, heartbeat_at > now() - interval '{}' FROM nodes
                     WHERE underlay_address = $1 AND name <> $2 FOR UPDATE",
                    interval(live)
                )))
                .bind(IpAddr::V4(underlay))
                .bind(node.name)
                .fetch_optional(&mut *tx)
                .await?;
                match holder {
                    Some((_, holder, true)) => {
                        return Err(StoreError::UnderlayAddressTaken { address: underlay, node: holder });
                    }
                    Some((id, holder, false)) => {
                        tracing::info!(%underlay, dead = %holder, taken_by = node.name, "underlay address taken over");
                        let row: HostRow = sqlx::query_as(
                            "UPDATE nodes SET underlay_address = NULL, overlay_public_key = NULL WHERE id = $1
                             RETURNING id, underlay_address, overlay_address, overlay_public_key",
                        )
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?;
                        record_node_event(&mut tx, &holder, &row, EventAction::Updated).await?;
                    }
                    None => {}
                }
            }
            let before: Option<HostRow> = sqlx::query_as(
                "SELECT id, underlay_address, overlay_address, overlay_public_key FROM nodes WHERE name = $1
                 FOR UPDATE",
            )
            .bind(node.name)
            .fetch_optional(&mut *tx)
            .await?;
            let kept = before.as_ref().and_then(|b| v4(b.overlay_address));
            let overlay = match node.underlay_address {
                None => kept,
                Some(_) => match kept.filter(|ip| self.settings.host_pool.contains(ip)) {
                    Some(ip) => Some(ip),
                    None => Some(Self::free_overlay_address(&mut tx, self.settings.host_pool).await?),
                },
            };
            let after: HostRow = sqlx::query_as(
                "INSERT INTO nodes (id, name, address, memory_mb, underlay_address, overlay_address, overlay_public_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (name) DO UPDATE SET address = EXCLUDED.address, memory_mb = EXCLUDED.memory_mb,
                     heartbeat_at = now(), underlay_address = EXCLUDED.underlay_address,
                     overlay_address = EXCLUDED.overlay_address, overlay_public_key = EXCLUDED.overlay_public_key
                 RETURNING id, underlay_address, overlay_address, overlay_public_key",
            )
            .bind(Uuid::new_v4())
            .bind(node.name)
            .bind(node.address)
            .bind(node.memory_mb.min(i64::MAX as u64) as i64)
            .bind(node.underlay_address.map(IpAddr::V4))
            .bind(overlay.map(IpAddr::V4))
            .bind(node.public_key.map(|k| k.to_vec()))
            .fetch_one(&mut *tx)
            .await?;
            let same = |b: &HostRow| {
                (b.underlay_address, b.overlay_address, &b.overlay_public_key)
                    == (after.underlay_address, after.overlay_address, &after.overlay_public_key)
            };
            // Nodes without an overlay stay out of the feed, as they were before hosts had one.
            let action = match &before {
                None if after.underlay_address.is_some() => Some(EventAction::Created),
                Some(b) if !same(b) => Some(EventAction::Updated),
                _ => None,
            };
            if let Some(action) = action {
                record_node_event(&mut tx, node.name, &after, action).await?;
            }
            tx.commit().await?;
            Ok(Registered { id: after.id, overlay_address: v4(after.overlay_address) })
        })
        .await
    }

    /// Refuses underlay addresses no peer could tunnel to, or that would route the overlay into itself.
    fn check_underlay(&self, ip: Ipv4Addr) -> Result<(), StoreError> {
        let why = if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            Some("is not a host address")
        } else if self.settings.host_pool.contains(&ip) {
            Some("is inside platform.host_pool, the overlay's own addresses")
        } else if self.settings.tenant_pool.contains(&ip) {
            Some("is inside platform.tenant_pool, the instances' addresses")
        } else {
            None
        };
        match why {
            Some(why) => Err(StoreError::Invalid(format!("underlay address {ip} {why}"))),
            None => Ok(()),
        }
    }

    /// The lowest host-pool address no node holds. Nodes keep theirs while dead, so a node coming back gets the
    /// address its peers knew.
    async fn free_overlay_address(conn: &mut sqlx::PgConnection, pool: Ipv4Net) -> Result<Ipv4Addr, StoreError> {
        let used: Vec<(IpAddr,)> =
            sqlx::query_as("SELECT overlay_address FROM nodes WHERE overlay_address IS NOT NULL")
                .fetch_all(conn)
                .await?;
        let used = used.into_iter().filter_map(|(ip,)| v4(Some(ip))).collect();
        ipam::first_free_host(pool, &used).ok_or(StoreError::CapacityExhausted { what: "host overlay addresses" })
    }

    /// Every other overlay node that heartbeated within `live`, by name, with the private IPs of its instances
    /// that have not ended: what `me`'s overlay must tunnel and route to. Nodes without a key yet are left out.
    pub async fn overlay_peers(&self, me: Uuid, live: Duration) -> Result<Vec<Peer>, StoreError> {
        self.bounded(async {
            let rows: Vec<(Uuid, String, IpAddr, IpAddr, Vec<u8>, Vec<String>)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT n.id, n.name, n.underlay_address, n.overlay_address, n.overlay_public_key,
                        coalesce(array_agg(host(i.private_ip) ORDER BY i.private_ip)
                                 FILTER (WHERE i.id IS NOT NULL), '{{}}')
                 FROM nodes n LEFT JOIN instances i ON i.node_id = n.id AND i.state = ANY($2)
                 WHERE n.id <> $1 AND n.heartbeat_at > now() - interval '{}'
                   AND n.underlay_address IS NOT NULL AND n.overlay_address IS NOT NULL
                   AND n.overlay_public_key IS NOT NULL
                 GROUP BY n.id ORDER BY n.name",
                    interval(live)
                )))
                .bind(me)
                .bind(&HOLDING_STATES[..])
                .fetch_all(&self.pool)
                .await?;
            Ok(rows
                .into_iter()
                .filter_map(|(node, name, underlay, overlay, key, ips)| {
                    Some(Peer {
                        node,
                        name,
                        underlay_address: v4(Some(underlay))?,
                        overlay_address: v4(Some(overlay))?,
                        public_key: key.try_into().ok()?,
                        instance_ips: ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
                    })
                })
                .collect())
        })
        .await
    }

    /// Records that the node is alive.
    pub async fn heartbeat(&self, node: Uuid) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("UPDATE nodes SET heartbeat_at = now() WHERE id = $1").bind(node).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// Assigns unscheduled instances that want to run, oldest first, to live nodes by
    /// [`cloud_domain::placement::place`]. A node is live when it heartbeated within `live`. Returns how many were
    /// assigned.
    pub async fn schedule_pending(&self, live: Duration) -> Result<usize, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEDULER_LOCK).execute(&mut *tx).await?;
            let pending: Vec<(Uuid, Uuid, i32, Option<String>)> = sqlx::query_as(
                "SELECT id, tenant_id, memory_mb, state_reason FROM instances
             WHERE node_id IS NULL AND desired_state = 'running' ORDER BY created_at LIMIT 500",
            )
            .fetch_all(&mut *tx)
            .await?;
            if pending.is_empty() {
                return Ok(0);
            }
            let nodes: Vec<(Uuid, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT n.id, n.memory_mb - coalesce(sum(i.memory_mb), 0)::bigint
             FROM nodes n LEFT JOIN instances i ON i.node_id = n.id
             WHERE n.heartbeat_at > now() - interval '{}'
             GROUP BY n.id",
                interval(live)
            )))
            .fetch_all(&mut *tx)
            .await?;
            let nodes: Vec<Node> = nodes.into_iter().map(|(id, free_mb)| Node { id, free_mb }).collect();
            let queue: Vec<Pending> =
                pending.iter().map(|&(id, _, memory, _)| Pending { id, memory_mb: memory as u32 }).collect();
            let placed = place(&queue, &nodes);
            let mut assigned = 0;
            for ((id, tenant, memory, reason), node) in pending.into_iter().zip(placed) {
                let reason_now = node.is_none().then(|| waiting_reason(memory as u32));
                if node.is_none() && reason == reason_now {
                    continue;
                }
                sqlx::query("UPDATE instances SET node_id = $2, state_reason = $3, updated_at = now() WHERE id = $1")
                    .bind(id)
                    .bind(node)
                    .bind(&reason_now)
                    .execute(&mut *tx)
                    .await?;
                let view = Self::instance_view(&mut tx, id).await?;
                record_event(&mut tx, Some(tenant), "instance", id, EventAction::Updated, &view).await?;
                assigned += node.is_some() as usize;
            }
            tx.commit().await?;
            Ok(assigned)
        })
        .await
    }

    /// Takes instances away from nodes that have not heartbeated within `stale`: they are rescheduled, except
    /// those whose restart policy is `never`, which fail. Returns how many instances were affected.
    pub async fn reap_lost_nodes(&self, stale: Duration) -> Result<usize, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEDULER_LOCK).execute(&mut *tx).await?;
            let lost: Vec<(Uuid, Uuid, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT i.id, i.tenant_id, n.name, i.restart_policy FROM instances i JOIN nodes n ON n.id = i.node_id
             WHERE n.heartbeat_at < now() - interval '{}' FOR UPDATE OF i",
                interval(stale)
            )))
            .fetch_all(&mut *tx)
            .await?;
            for (id, tenant, node, policy) in &lost {
                let (state, reason) = if policy == "never" {
                    ("failed", format!("node {node} was lost; restart policy never"))
                } else {
                    ("pending", format!("node {node} was lost; rescheduling"))
                };
                // One that was moving goes where it was moving to (`move_to`), whatever its restart policy.
                sqlx::query(
                    "UPDATE instances SET node_id = move_to, updated_at = now(),
                     state_reason = CASE WHEN move_to IS NULL THEN $2 ELSE $4 END,
                     state = CASE WHEN desired_state <> 'running' THEN 'stopped' WHEN move_to IS NULL THEN $3
                                  ELSE 'pending' END,
                     desired_state = CASE WHEN $3 = 'failed' AND move_to IS NULL THEN 'stopped' ELSE desired_state END,
                     move_to = NULL
                 WHERE id = $1",
                )
                .bind(id)
                .bind(reason)
                .bind(state)
                .bind(format!("node {node} was lost while it was moving away"))
                .execute(&mut *tx)
                .await?;
                let view = Self::instance_view(&mut tx, *id).await?;
                record_event(&mut tx, Some(*tenant), "instance", *id, EventAction::Updated, &view).await?;
            }
            tx.commit().await?;
            Ok(lost.len())
        })
        .await
    }

    /// Hands a node's instances back for rescheduling (the node is shutting down cleanly).
    pub async fn release_node(&self, node: Uuid) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let released: Vec<(Uuid, Uuid)> = sqlx::query_as(
                "UPDATE instances SET node_id = move_to, move_to = NULL, updated_at = now(),
                 state = CASE WHEN desired_state = 'running' THEN 'pending' ELSE 'stopped' END,
                 state_reason = CASE WHEN desired_state = 'running' THEN 'its node shut down; rescheduling' END
             WHERE node_id = $1 RETURNING id, tenant_id",
            )
            .bind(node)
            .fetch_all(&mut *tx)
            .await?;
            for (id, tenant) in released {
                let view = Self::instance_view(&mut tx, id).await?;
                record_event(&mut tx, Some(tenant), "instance", id, EventAction::Updated, &view).await?;
            }
            // Not schedulable any more, nor anybody's peer, until it registers again.
            let left: Option<NamedHostRow> = sqlx::query_as(
                "UPDATE nodes SET heartbeat_at = 'epoch' WHERE id = $1
                 RETURNING name, id, underlay_address, overlay_address, overlay_public_key",
            )
            .bind(node)
            .fetch_optional(&mut *tx)
            .await?;
            // Peers drop it now rather than when its heartbeat would have lapsed.
            if let Some(left) = left.filter(|l| l.host.underlay_address.is_some()) {
                record_node_event(&mut tx, &left.name, &left.host, EventAction::Updated).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// The instances assigned to a node.
    pub async fn assignments(&self, node: Uuid) -> Result<Vec<Assignment>, StoreError> {
        self.bounded(async {
            let rows: Vec<AssignmentRow> = sqlx::query_as(
                "SELECT i.id, i.tenant_id, t.network::text AS network, i.name, s.name AS service, i.image_digest,
                        i.args, i.env, i.memory_mb, i.port, i.restart_policy,
                        -- Moving away: this node stops it, and the stop hands it over (see `report`).
                        -- Draining: it serves what is in flight until the drain ends (see `finish_drains`).
                        CASE WHEN i.state = 'draining' THEN 'running'
                             WHEN i.move_to IS NULL THEN i.desired_state ELSE 'stopped' END AS desired_state,
                        i.state, i.private_ip, i.restart_count
                 FROM instances i JOIN tenants t ON t.id = i.tenant_id LEFT JOIN services s ON s.id = i.service_id
                 WHERE i.node_id = $1 ORDER BY i.created_at",
            )
            .bind(node)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .into_iter()
                .filter_map(|r| {
                    let IpAddr::V4(private_ip) = r.private_ip else { return None };
                    Some(Assignment {
                        id: r.id,
                        tenant_id: r.tenant_id,
                        network: r.network.parse().ok()?,
                        name: r.name,
                        service: r.service,
                        image_digest: r.image_digest,
                        args: r.args,
                        env: r.env.0,
                        memory_mb: r.memory_mb as u32,
                        port: r.port as u16,
                        restart_policy: r.restart_policy.parse().unwrap_or_default(),
                        desired: r.desired_state.parse().unwrap_or(DesiredState::Stopped),
                        state: r.state.parse().unwrap_or(InstanceState::Pending),
                        private_ip,
                        restart_count: r.restart_count as u32,
                    })
                })
                .collect())
        })
        .await
    }

    /// Records what a node observed of one of its instances. Ignored when the instance is no longer the
    /// node's (deleted or rescheduled meanwhile).
    pub async fn report(&self, node: Uuid, id: Uuid, obs: &Observation) -> Result<bool, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            // The stop of a moving instance hands it to its new node, keeping what the tenant wants of it.
            if matches!(obs.state, InstanceState::Stopped | InstanceState::Failed) {
                let moved: Option<(Uuid,)> = sqlx::query_as(
                    "UPDATE instances i SET node_id = i.move_to, move_to = NULL, updated_at = now(),
                         state = CASE WHEN i.desired_state = 'running' THEN 'pending' ELSE 'stopped' END,
                         state_reason = 'moved from node ' || n.name, stopped_at = now()
                     FROM nodes n WHERE i.id = $1 AND i.node_id = $2 AND i.move_to IS NOT NULL AND n.id = $2
                     RETURNING i.tenant_id",
                )
                .bind(id)
                .bind(node)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((tenant,)) = moved {
                    let view = Self::instance_view(&mut tx, id).await?;
                    record_event(&mut tx, Some(tenant), "instance", id, EventAction::Updated, &view).await?;
                    tx.commit().await?;
                    return Ok(true);
                }
            }
            let updated: Option<(Uuid,)> = sqlx::query_as(
                "UPDATE instances SET
                     -- A draining instance stays so while it runs: the edges must not route to it again.
                     state = CASE WHEN state = 'draining' AND $3 IN ('starting', 'running') THEN state ELSE $3 END,
                     state_reason = CASE WHEN state = 'draining' AND $3 IN ('starting', 'running')
                         THEN state_reason ELSE $4 END,
                     exit_code = $5,
                     boot_time_us = coalesce($6, boot_time_us),
                     restart_count = $7, updated_at = now(),
                     started_at = CASE WHEN $3 = 'running' THEN now() ELSE started_at END,
                     stopped_at = CASE WHEN $3 IN ('stopped', 'failed') THEN now() ELSE stopped_at END,
                     -- A run that ended for good (per its restart policy) stays ended until the tenant starts it
                     -- again; otherwise the agent would start what its policy said not to restart.
                     desired_state = CASE WHEN $3 IN ('stopped', 'failed') THEN 'stopped' ELSE desired_state END
                 WHERE id = $1 AND node_id = $2
                   AND (state, coalesce(state_reason, ''), coalesce(exit_code, -1), restart_count)
                       IS DISTINCT FROM ($3, coalesce($4, ''), coalesce($5, -1), $7)
                 RETURNING tenant_id",
            )
            .bind(id)
            .bind(node)
            .bind(obs.state.as_str())
            .bind(&obs.reason)
            .bind(obs.exit_code)
            .bind(obs.boot_time_us.map(|v| v as i64))
            .bind(obs.restart_count as i32)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((tenant,)) = updated else { return Ok(false) };
            let view = Self::instance_view(&mut tx, id).await?;
            record_event(&mut tx, Some(tenant), "instance", id, EventAction::Updated, &view).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    /// Appends output lines of an instance, then drops its oldest lines beyond [`LOG_LINES_KEPT`] lines or
    /// [`LOG_BYTES_KEPT`] bytes, whichever comes first, in the same transaction: a reader never sees more.
    pub async fn append_logs(&self, id: Uuid, lines: &[(DateTime<Utc>, &str, String)]) -> Result<(), StoreError> {
        self.bounded(async {
            if lines.is_empty() {
                return Ok(());
            }
            let mut tx = self.pool.begin().await?;
            let (last,): (Option<i64>,) = sqlx::query_as("SELECT max(seq) FROM instance_logs WHERE instance_id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            let first = last.unwrap_or(0) + 1;
            let seqs: Vec<i64> = (first..first + lines.len() as i64).collect();
            let ats: Vec<DateTime<Utc>> = lines.iter().map(|l| l.0).collect();
            let streams: Vec<&str> = lines.iter().map(|l| l.1).collect();
            let texts: Vec<&str> = lines.iter().map(|l| l.2.as_str()).collect();
            let res = sqlx::query(
                "INSERT INTO instance_logs (instance_id, seq, at, stream, line)
             SELECT $1, * FROM unnest($2::bigint[], $3::timestamptz[], $4::text[], $5::text[])",
            )
            .bind(id)
            .bind(&seqs)
            .bind(&ats)
            .bind(&streams)
            .bind(&texts)
            .execute(&mut *tx)
            .await;
            match res {
                Ok(_) => {}
                // The instance was deleted meanwhile: its logs go with it.
                Err(e) if e.as_database_error().is_some_and(|d| d.code().as_deref() == Some("23503")) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            // Walks back from the newest line (the primary key's order) and deletes from the first line that no
            // longer fits; a line that alone exceeds the budget goes too. octet_length reads the stored size without
            // detoasting the text.
            sqlx::query(
                "DELETE FROM instance_logs WHERE instance_id = $1 AND seq <= (
                 SELECT coalesce(max(seq), -1) FROM (
                     SELECT seq, sum(octet_length(line)) OVER newest AS bytes, row_number() OVER newest AS lines
                     FROM instance_logs WHERE instance_id = $1
                     WINDOW newest AS (ORDER BY seq DESC ROWS UNBOUNDED PRECEDING)
                 ) kept WHERE bytes > $2 OR lines > $3)",
            )
            .bind(id)
            .bind(LOG_BYTES_KEPT)
            .bind(LOG_LINES_KEPT)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Log lines of a tenant's instance after `after` (oldest first), at most `limit`. With `after` = `None`,
    /// the last `limit` lines.
    pub async fn logs(
        &self,
        tenant: Uuid,
        key: &str,
        after: Option<i64>,
        limit: i64,
    ) -> Result<(Uuid, Vec<LogLine>), StoreError> {
        let id = self.instance_id(tenant, key).await?;
        let lines = match after {
            Some(after) => self.log_lines_after(id, after, limit).await?,
            None => {
                self.bounded(async {
                    let mut rows: Vec<(i64, DateTime<Utc>, String, String)> = sqlx::query_as(
                        "SELECT seq, at, stream, line FROM instance_logs WHERE instance_id = $1 ORDER BY seq DESC LIMIT $2",
                    )
                    .bind(id)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                    rows.reverse();
                    Ok(rows.into_iter().map(|(seq, at, stream, line)| LogLine { seq, at, stream, line }).collect())
                })
                .await?
            }
        };
        Ok((id, lines))
    }

    /// Log lines of an instance (by id, whoever its tenant) after `after`, oldest first, at most `limit`.
    pub async fn log_lines_after(&self, id: Uuid, after: i64, limit: i64) -> Result<Vec<LogLine>, StoreError> {
        self.bounded(async {
            let rows: Vec<(i64, DateTime<Utc>, String, String)> = sqlx::query_as(
                "SELECT seq, at, stream, line FROM instance_logs WHERE instance_id = $1 AND seq > $2
                 ORDER BY seq LIMIT $3",
            )
            .bind(id)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().map(|(seq, at, stream, line)| LogLine { seq, at, stream, line }).collect())
        })
        .await
    }

    /// The id of a tenant's instance, by name or id.
    pub async fn instance_id(&self, tenant: Uuid, key: &str) -> Result<Uuid, StoreError> {
        self.bounded(async {
            let instances = Table { select: "SELECT id FROM instances", alias: "" };
            let found: Option<(Uuid,)> =
                page::find(&self.pool, instances, Visible::Tenant(tenant), key, RowLock::None).await?;
            found.map(|(id,)| id).ok_or_else(|| StoreError::NotFound { kind: "instance", key: key.to_owned() })
        })
        .await
    }

    /// Which of these instances still exist.
    pub async fn existing_instances(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        self.bounded(async {
            let rows: Vec<(Uuid,)> =
                sqlx::query_as("SELECT id FROM instances WHERE id = ANY($1)").bind(ids).fetch_all(&self.pool).await?;
            Ok(rows.into_iter().map(|(id,)| id).collect())
        })
        .await
    }
}

async fn record_node_event(
    conn: &mut sqlx::PgConnection,
    name: &str,
    row: &HostRow,
    action: EventAction,
) -> Result<(), StoreError> {
    let event = NodeEvent {
        id: row.id,
        name,
        underlay_address: v4(row.underlay_address),
        overlay_address: v4(row.overlay_address),
        overlay_public_key: row.overlay_public_key.as_ref().map(hex::encode),
    };
    record_event(conn, None, "node", row.id, action, &event).await
}
