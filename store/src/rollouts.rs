//! Rollouts: a service's instances replaced by new ones a few at a time, each new one running before an old one
//! drains (see [`crate::drain`]). The tenant's request is recorded ([`Store::create_rollout`]); the platform's
//! controller moves every rollout under way one step at a time ([`Store::step_rollouts`]), so that a client may
//! watch, leave and come back, and a failed new instance stops the rollout with the old ones still serving.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, InstanceSummary, Rollout};
use cloud_domain::state::{InstanceState, RestartPolicy, RolloutState, RolloutStrategy};
use uuid::Uuid;

use crate::drain::DrainThen;
use crate::instances::InstanceSpec;
use crate::page::{self, RowLock, Table, Visible};
use crate::{Store, StoreError, record_event};

/// A rollout to start, validated.
#[derive(Debug, Clone, Default)]
pub struct NewRollout {
    /// Image name or id; `None`: the image of the service's newest instance.
    pub image: Option<String>,
    /// What happens to the old instances.
    pub strategy: RolloutStrategy,
    /// New instances wanted; `None`: as many as run now, at least 1.
    pub replicas: Option<u32>,
    /// New instances ahead of the old ones' removal.
    pub max_surge: Option<u32>,
    /// Seconds a new instance gets to become ready.
    pub ready_timeout_seconds: Option<u32>,
    /// Environment; `None`: the newest instance's.
    pub env: Option<BTreeMap<String, String>>,
    /// Arguments; `None`: the newest instance's.
    pub args: Option<Vec<String>>,
}

#[derive(sqlx::FromRow)]
struct RolloutRow {
    id: Uuid,
    service_id: Uuid,
    service_name: String,
    image_id: Uuid,
    image_name: String,
    image_digest: String,
    strategy: String,
    state: String,
    state_reason: Option<String>,
    replicas: i32,
    max_surge: i32,
    ready_timeout: i32,
    args: Vec<String>,
    env: sqlx::types::Json<BTreeMap<String, String>>,
    memory_mb: i32,
    port: i32,
    restart_policy: String,
    old_instances: Vec<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

const SELECT_ROLLOUT: &str = "SELECT r.id, r.service_id, s.name AS service_name, r.image_id,
        m.name AS image_name, r.image_digest, r.strategy, r.state, r.state_reason, r.replicas, r.max_surge,
        r.ready_timeout, r.args, r.env, r.memory_mb, r.port, r.restart_policy, r.old_instances, r.created_at,
        r.updated_at, r.finished_at
    FROM rollouts r JOIN services s ON s.id = r.service_id JOIN images m ON m.id = r.image_id";

/// A rollout read whole.
struct Loaded {
    view: Rollout,
    row: RolloutRow,
    old: Vec<Member>,
    new: Vec<Member>,
}

/// An instance as a rollout sees it: id, name, state, private IP, created at, state reason, still serving
/// (not draining or asked to stop).
type Member = (Uuid, String, String, IpAddr, DateTime<Utc>, Option<String>, bool);

async fn members(
    conn: &mut sqlx::PgConnection,
    where_: &str,
    bind: impl AsRef<[Uuid]>,
) -> Result<Vec<Member>, StoreError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, name, state, private_ip, created_at, state_reason,
                drain_then IS NULL AND desired_state = 'running' AS serving
         FROM instances WHERE {where_} ORDER BY created_at, id"
    )))
    .bind(bind.as_ref())
    .fetch_all(&mut *conn)
    .await?)
}

fn summary(m: &Member) -> InstanceSummary {
    InstanceSummary {
        id: m.0,
        name: m.1.clone(),
        state: m.2.parse().unwrap_or(InstanceState::Pending),
        private_ip: m.3,
    }
}

fn is_running(m: &Member) -> bool {
    m.2 == "running"
}

impl Store {
    /// A rollout as shown, with its row and its old and new instances as they are now.
    async fn rollout_view(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<Loaded, StoreError> {
        let row: RolloutRow = sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_ROLLOUT} WHERE r.id = $1")))
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
        let old = members(conn, "id = ANY($1)", &row.old_instances).await?;
        let new = members(conn, "rollout_id = ANY($1)", [row.id]).await?;
        let view = Rollout {
            id: row.id,
            service: row.service_name.clone(),
            image: row.image_name.clone(),
            image_digest: row.image_digest.clone(),
            strategy: row.strategy.parse().unwrap_or_default(),
            state: row.state.parse().unwrap_or(RolloutState::Running),
            state_reason: row.state_reason.clone(),
            replicas: row.replicas as u32,
            max_surge: row.max_surge as u32,
            ready_timeout_seconds: row.ready_timeout as u32,
            old_remaining: old.iter().filter(|m| m.6).count() as u32,
            new_ready: new.iter().filter(|m| is_running(m)).count() as u32,
            old_instances: old.iter().map(summary).collect(),
            new_instances: new.iter().map(summary).collect(),
            created_at: row.created_at,
            updated_at: row.updated_at,
            finished_at: row.finished_at,
        };
        Ok(Loaded { view, row, old, new })
    }

    /// Starts a rollout of a service. Nothing changes when it is refused: an unknown image, a service without
    /// instances and no image given, a rollout already under way, instances beyond the tenant's quotas.
    pub async fn create_rollout(&self, tenant: Uuid, service: &str, new: NewRollout) -> Result<Rollout, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let (quotas, _, _) = Self::lock_tenant(&mut tx, tenant).await?;
            let (service_id, service_name, _) = Self::service_id(&mut tx, tenant, service, RowLock::Update).await?;
            let under_way: Option<(Uuid,)> =
                sqlx::query_as("SELECT id FROM rollouts WHERE service_id = $1 AND state = 'running'")
                    .bind(service_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some((rollout,)) = under_way {
                return Err(StoreError::RolloutInProgress { service: service_name, rollout });
            }
            // The newest instance serving is the template of what is not given.
            let template = Self::newest_serving(&mut tx, service_id).await?;
            let (image_id, digest, port) = match (&new.image, &template) {
                (Some(key), _) => {
                    let images = Table { select: "SELECT id, digest, port FROM images", alias: "" };
                    let found: Option<(Uuid, String, i32)> =
                        page::find(&mut *tx, images, Visible::TenantOrBuiltin(tenant), key, RowLock::None).await?;
                    found.ok_or_else(|| StoreError::NotFound { kind: "image", key: key.clone() })?
                }
                (None, Some(t)) => (t.image_id, t.digest.clone(), t.port),
                (None, None) => {
                    return Err(StoreError::State(cloud_domain::state::StateError::NotAllowed(format!(
                        "service {service_name} runs no instance to take the image from: give an image"
                    ))));
                }
            };
            let old: Vec<(Uuid,)> = sqlx::query_as(
                "SELECT id FROM instances WHERE service_id = $1 AND drain_then IS NULL AND desired_state = 'running'
                 ORDER BY created_at, id",
            )
            .bind(service_id)
            .fetch_all(&mut *tx)
            .await?;
            let old: Vec<Uuid> = old.into_iter().map(|(id,)| id).collect();
            let replicas = new.replicas.unwrap_or((old.len() as u32).max(1));
            let max_surge = new.max_surge.unwrap_or(1);
            let memory_mb = template.as_ref().map_or(128, |t| t.memory_mb);
            let first_batch = if new.strategy == RolloutStrategy::Keep { replicas } else { replicas.min(max_surge) };
            Self::check_instance_quotas(&mut tx, tenant, &quotas, first_batch, memory_mb).await?;
            let env = new.env.or_else(|| template.as_ref().map(|t| t.env.clone())).unwrap_or_default();
            let args = new.args.or_else(|| template.as_ref().map(|t| t.args.clone())).unwrap_or_default();
            let restart_policy = template.as_ref().map_or(RestartPolicy::Never, |t| t.restart_policy);
            let id = Uuid::new_v4();
            sqlx::query(
                "INSERT INTO rollouts (id, tenant_id, service_id, image_id, image_digest, strategy, state, state_reason,
                     replicas, max_surge, ready_timeout, args, env, memory_mb, port, restart_policy, old_instances)
                 VALUES ($1, $2, $3, $4, $5, $6, 'running', 'starting', $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(id)
            .bind(tenant)
            .bind(service_id)
            .bind(image_id)
            .bind(&digest)
            .bind(new.strategy.as_str())
            .bind(replicas as i32)
            .bind(max_surge as i32)
            .bind(new.ready_timeout_seconds.unwrap_or(120) as i32)
            .bind(&args)
            .bind(sqlx::types::Json(&env))
            .bind(memory_mb as i32)
            .bind(port)
            .bind(restart_policy.as_str())
            .bind(&old)
            .execute(&mut *tx)
            .await?;
            let view = Self::rollout_view(&mut tx, id).await?.view;
            record_event(&mut tx, Some(tenant), "rollout", id, EventAction::Created, &view).await?;
            tx.commit().await?;
            Ok(view)
        })
        .await
    }

    /// A rollout of a service of the tenant.
    pub async fn rollout(&self, tenant: Uuid, service: &str, id: Uuid) -> Result<Rollout, StoreError> {
        self.bounded(async {
            let mut conn = self.pool.acquire().await?;
            let (service_id, _, _) = Self::service_id(&mut conn, tenant, service, RowLock::None).await?;
            let found: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM rollouts WHERE id = $1 AND service_id = $2")
                .bind(id)
                .bind(service_id)
                .fetch_optional(&mut *conn)
                .await?;
            let (id,) = found.ok_or_else(|| StoreError::NotFound { kind: "rollout", key: id.to_string() })?;
            Ok(Self::rollout_view(&mut conn, id).await?.view)
        })
        .await
    }

    /// A service's rollouts, newest first, at most `limit`.
    pub async fn list_rollouts(&self, tenant: Uuid, service: &str, limit: usize) -> Result<Vec<Rollout>, StoreError> {
        self.bounded(async {
            let mut conn = self.pool.acquire().await?;
            let (service_id, _, _) = Self::service_id(&mut conn, tenant, service, RowLock::None).await?;
            let ids: Vec<(Uuid,)> = sqlx::query_as(
                "SELECT id FROM rollouts WHERE service_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
            )
            .bind(service_id)
            .bind(limit as i64)
            .fetch_all(&mut *conn)
            .await?;
            let mut out = Vec::with_capacity(ids.len());
            for (id,) in ids {
                out.push(Self::rollout_view(&mut conn, id).await?.view);
            }
            Ok(out)
        })
        .await
    }

    /// Cancels a rollout under way: the new instances that do not run yet go, every other instance stays as it
    /// is (those draining finish draining). Refused for a rollout that has ended.
    pub async fn cancel_rollout(&self, tenant: Uuid, service: &str, id: Uuid) -> Result<Rollout, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            // The tenant first, as the controller's steps take it.
            Self::lock_tenant(&mut tx, tenant).await?;
            let (service_id, _, _) = Self::service_id(&mut tx, tenant, service, RowLock::None).await?;
            let found: Option<(String,)> =
                sqlx::query_as("SELECT state FROM rollouts WHERE id = $1 AND service_id = $2 FOR UPDATE")
                    .bind(id)
                    .bind(service_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let (state,) = found.ok_or_else(|| StoreError::NotFound { kind: "rollout", key: id.to_string() })?;
            if state != "running" {
                return Err(StoreError::State(cloud_domain::state::StateError::NotAllowed(format!(
                    "rollout {id} is {state}: only a running one can be cancelled"
                ))));
            }
            let Loaded { old, new, .. } = Self::rollout_view(&mut tx, id).await?;
            let unready: Vec<Uuid> = new.iter().filter(|m| !is_running(m)).map(|m| m.0).collect();
            self.delete_instances_in(&mut tx, tenant, &unready).await?;
            let serving = old.iter().filter(|m| m.6).count() + new.iter().filter(|m| is_running(m)).count();
            let reason = format!("cancelled; {serving} instance(s) keep serving");
            self.finish_rollout(tx, tenant, id, RolloutState::Cancelled, &reason).await?;
            self.rollout(tenant, service, id).await
        })
        .await
    }

    /// Moves every rollout under way one step: fails it when a new instance failed or was not ready in time
    /// (removing the new instances that do not run), drains old instances that running new ones replace,
    /// starts new ones within the surge, and ends it when done. Returns how many changed.
    pub async fn step_rollouts(&self) -> Result<usize, StoreError> {
        self.bounded(async {
            let running: Vec<(Uuid, Uuid)> =
                sqlx::query_as("SELECT id, tenant_id FROM rollouts WHERE state = 'running' ORDER BY created_at")
                    .fetch_all(&self.pool)
                    .await?;
            let mut changed = 0;
            for (id, tenant) in running {
                if self.step_rollout(id, tenant).await? {
                    changed += 1;
                }
            }
            Ok(changed)
        })
        .await
    }

    async fn step_rollout(&self, id: Uuid, tenant: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The tenant first, as instance creation takes it (quotas, private IPs).
        let (quotas, network, _) = Self::lock_tenant(&mut tx, tenant).await?;
        let locked: Option<(String,)> = sqlx::query_as("SELECT state FROM rollouts WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if locked.is_none_or(|(s,)| s != "running") {
            return Ok(false);
        }
        let Loaded { row, old, new, .. } = Self::rollout_view(&mut tx, id).await?;
        let strategy: RolloutStrategy = row.strategy.parse().unwrap_or_default();
        let ready_timeout = chrono::Duration::seconds(i64::from(row.ready_timeout));
        let now = Utc::now();

        // A new instance that failed, stopped or did not become ready in time fails the rollout.
        let broken = new.iter().find_map(|m| match m.2.as_str() {
            "failed" | "stopped" => Some(format!(
                "new instance {} {}{}",
                m.1,
                m.2,
                m.5.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            )),
            "running" | "draining" | "stopping" => None,
            _ if now - m.4 > ready_timeout => {
                Some(format!("new instance {} did not become ready within {}s", m.1, row.ready_timeout))
            }
            _ => None,
        });
        if let Some(reason) = broken {
            let unready: Vec<Uuid> = new.iter().filter(|m| !is_running(m)).map(|m| m.0).collect();
            self.delete_instances_in(&mut tx, tenant, &unready).await?;
            let serving = old.iter().filter(|m| m.6).count() + new.iter().filter(|m| is_running(m)).count();
            let reason = format!("{reason}; {serving} instance(s) keep serving");
            return self.finish_rollout(tx, tenant, id, RolloutState::Failed, &reason).await.map(|_| true);
        }

        let new_ready = new.iter().filter(|m| is_running(m)).count();
        let mut old_serving: Vec<&Member> = old.iter().filter(|m| m.6).collect();
        let replicas = row.replicas as usize;
        let mut acted = false;

        if strategy != RolloutStrategy::Keep {
            // Each running new instance lets one old instance go, oldest first.
            while !old_serving.is_empty() && old_serving.len() + new_ready > replicas {
                let m = old_serving.remove(0);
                let then = if strategy == RolloutStrategy::Stop { DrainThen::Stop } else { DrainThen::Delete };
                if is_running(m) {
                    self.drain_in(&mut tx, tenant, m.0, then).await?;
                } else if then == DrainThen::Delete {
                    self.delete_instances_in(&mut tx, tenant, &[m.0]).await?;
                } else {
                    self.stop_unserved_in(&mut tx, tenant, m.0).await?;
                }
                acted = true;
            }
        }
        let room = match strategy {
            RolloutStrategy::Keep => replicas,
            _ => (replicas + row.max_surge as usize).saturating_sub(old_serving.len()),
        };
        let wanted = replicas.saturating_sub(new.len()).min(room.saturating_sub(new.len()));
        if wanted > 0 {
            if let Err(e) =
                Self::check_instance_quotas(&mut tx, tenant, &quotas, wanted as u32, row.memory_mb as u32).await
            {
                let reason = format!("{e}; the instances that were healthy keep serving");
                return self.finish_rollout(tx, tenant, id, RolloutState::Failed, &reason).await.map(|_| true);
            }
            let spec = InstanceSpec {
                image_id: row.image_id,
                image_name: row.image_name.clone(),
                digest: row.image_digest.clone(),
                service_id: Some(row.service_id),
                args: row.args.clone(),
                env: row.env.0.clone(),
                memory_mb: row.memory_mb as u32,
                restart_policy: row.restart_policy.parse().unwrap_or(RestartPolicy::Never),
                port: row.port,
                start: true,
                rollout_id: Some(id),
            };
            self.insert_instances_in(&mut tx, tenant, network, &spec, vec![None; wanted]).await?;
            acted = true;
        }
        if new_ready >= replicas && old_serving.is_empty() {
            return self.finish_rollout(tx, tenant, id, RolloutState::Succeeded, "").await.map(|_| true);
        }
        let reason =
            format!("{new_ready} of {replicas} new instance(s) running, {} old instance(s) serving", old_serving.len());
        if acted || row.state_reason.as_deref() != Some(reason.as_str()) {
            sqlx::query("UPDATE rollouts SET state_reason = $2, updated_at = now() WHERE id = $1")
                .bind(id)
                .bind(&reason)
                .execute(&mut *tx)
                .await?;
            let view = Self::rollout_view(&mut tx, id).await?.view;
            record_event(&mut tx, Some(tenant), "rollout", id, EventAction::Updated, &view).await?;
            tx.commit().await?;
            return Ok(true);
        }
        tx.commit().await?;
        Ok(false)
    }

    async fn finish_rollout(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        tenant: Uuid,
        id: Uuid,
        state: RolloutState,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE rollouts SET state = $2, state_reason = nullif($3, ''), updated_at = now(), finished_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        let view = Self::rollout_view(&mut tx, id).await?.view;
        record_event(&mut tx, Some(tenant), "rollout", id, EventAction::Updated, &view).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stops an instance that serves nothing yet (pending or starting) inside the caller's transaction.
    async fn stop_unserved_in(&self, conn: &mut sqlx::PgConnection, tenant: Uuid, id: Uuid) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE instances SET desired_state = 'stopped', updated_at = now(),
                 state = CASE WHEN state = 'pending' THEN 'stopped' WHEN state = 'starting' THEN 'stopping' ELSE state END
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?;
        let view = Self::instance_view(&mut *conn, id).await?;
        record_event(&mut *conn, Some(tenant), "instance", id, EventAction::Updated, &view).await?;
        Ok(())
    }
}
