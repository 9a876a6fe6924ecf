//! Nodes: registration and heartbeats, scheduling instances onto live nodes, what each node must run, what it
//! observed, and instance logs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, LogLine};
use cloud_domain::placement::{Node, Pending, place, waiting_reason};
use cloud_domain::state::{DesiredState, InstanceState, RestartPolicy};
use ipnet::Ipv4Net;
use uuid::Uuid;

use crate::page::{self, RowLock, Table, Visible};
use crate::{Store, StoreError, record_event};

/// Advisory lock key serialising scheduling passes platform-wide.
const SCHEDULER_LOCK: i64 = 7_265_748;

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

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

impl Store {
    /// Registers a node (or refreshes it, by name) and returns its id.
    pub async fn register_node(&self, name: &str, address: &str, memory_mb: u64) -> Result<Uuid, StoreError> {
        self.bounded(async {
            let (id,): (Uuid,) = sqlx::query_as(
                "INSERT INTO nodes (id, name, address, memory_mb) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET address = EXCLUDED.address, memory_mb = EXCLUDED.memory_mb,
                 heartbeat_at = now()
             RETURNING id",
            )
            .bind(Uuid::new_v4())
            .bind(name)
            .bind(address)
            .bind(memory_mb.min(i64::MAX as u64) as i64)
            .fetch_one(&self.pool)
            .await?;
            Ok(id)
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
                sqlx::query(
                    "UPDATE instances SET node_id = NULL, updated_at = now(), state_reason = $2,
                     state = CASE WHEN desired_state = 'running' THEN $3 ELSE 'stopped' END,
                     desired_state = CASE WHEN $3 = 'failed' THEN 'stopped' ELSE desired_state END
                 WHERE id = $1",
                )
                .bind(id)
                .bind(reason)
                .bind(state)
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
                "UPDATE instances SET node_id = NULL, updated_at = now(),
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
            // Not schedulable any more until it registers again.
            sqlx::query("UPDATE nodes SET heartbeat_at = 'epoch' WHERE id = $1").bind(node).execute(&mut *tx).await?;
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
                        i.args, i.env, i.memory_mb, i.port, i.restart_policy, i.desired_state, i.state, i.private_ip,
                        i.restart_count
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
            let updated: Option<(Uuid,)> = sqlx::query_as(
                "UPDATE instances SET state = $3, state_reason = $4, exit_code = $5,
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
