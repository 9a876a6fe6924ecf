//! Instances: desired state recorded for the tenant, private IPs from the tenant's network, ephemeral services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use chrono::{DateTime, Utc};
use cloud_domain::api::{CreatedInstances, EventAction, Instance, ServiceRef};
use cloud_domain::ports::PortMapping;
use cloud_domain::state::{self, DesiredState, InstanceState, RestartPolicy};
use cloud_domain::{generate, ipam};
use uuid::Uuid;

use crate::page::{self, Cursor, RowLock, Table, Visible};
use crate::{NewService, Store, StoreError, record_event, violated_constraint};

/// Validated instances to create.
#[derive(Debug, Clone)]
pub struct NewInstances {
    /// Image name or id.
    pub image: String,
    /// Validated name; with several replicas it gets `-1`, `-2`, ... suffixes.
    pub name: Option<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Attach to this service (name or id).
    pub service: Option<String>,
    /// Or create an ephemeral service with these mappings.
    pub ports: Option<Vec<PortMapping>>,
    /// How many.
    pub replicas: u32,
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// Memory limit, MiB.
    pub memory_mb: u32,
    /// The port the instances listen on; `None`: the image's.
    pub port: Option<u16>,
    /// Start at once.
    pub start: bool,
}

/// What instances are made of, resolved: the image by id and digest, the service by id.
#[derive(Debug, Clone)]
pub(crate) struct InstanceSpec {
    pub(crate) image_id: Uuid,
    pub(crate) image_name: String,
    pub(crate) digest: String,
    pub(crate) service_id: Option<Uuid>,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) memory_mb: u32,
    pub(crate) restart_policy: RestartPolicy,
    pub(crate) port: i32,
    pub(crate) start: bool,
    pub(crate) rollout_id: Option<Uuid>,
}

#[derive(sqlx::FromRow)]
struct InstanceRow {
    id: Uuid,
    name: String,
    image_name: String,
    image_digest: String,
    service_id: Option<Uuid>,
    service_name: Option<String>,
    service_fqdn: Option<String>,
    desired_state: String,
    state: String,
    state_reason: Option<String>,
    private_ip: IpAddr,
    tenant_name: String,
    node_name: Option<String>,
    port: i32,
    args: Vec<String>,
    env: sqlx::types::Json<BTreeMap<String, String>>,
    memory_mb: i32,
    restart_policy: String,
    restart_count: i32,
    exit_code: Option<i32>,
    boot_time_us: Option<i64>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    stopped_at: Option<DateTime<Utc>>,
}

const SELECT_INSTANCE: &str = "SELECT i.id, i.name, m.name AS image_name, i.image_digest, i.service_id,
        s.name AS service_name, s.fqdn AS service_fqdn, i.desired_state, i.state, i.state_reason, i.private_ip,
        t.name AS tenant_name, n.name AS node_name, i.port, i.args, i.env, i.memory_mb, i.restart_policy,
        i.restart_count, i.exit_code, i.boot_time_us, i.created_at, i.updated_at, i.started_at, i.stopped_at
    FROM instances i
    JOIN images m ON m.id = i.image_id
    JOIN tenants t ON t.id = i.tenant_id
    LEFT JOIN services s ON s.id = i.service_id
    LEFT JOIN nodes n ON n.id = i.node_id";
const INSTANCES: Table = Table { select: SELECT_INSTANCE, alias: "i." };

impl From<InstanceRow> for Instance {
    fn from(r: InstanceRow) -> Self {
        let service = match (r.service_id, r.service_name, r.service_fqdn) {
            (Some(id), Some(name), Some(fqdn)) => Some(ServiceRef { id, name, fqdn }),
            _ => None,
        };
        Instance {
            private_fqdn: format!("{}.internal", r.name),
            tenant_private_fqdn: format!("{}.{}.internal", r.name, r.tenant_name),
            id: r.id,
            name: r.name,
            image: r.image_name,
            image_digest: r.image_digest,
            service,
            desired_state: r.desired_state.parse().unwrap_or(DesiredState::Stopped),
            state: r.state.parse().unwrap_or(InstanceState::Pending),
            state_reason: r.state_reason,
            private_ip: r.private_ip,
            node: r.node_name,
            port: r.port as u16,
            args: r.args,
            env: r.env.0,
            memory_mb: r.memory_mb as u32,
            restart_policy: r.restart_policy.parse().unwrap_or_default(),
            restart_count: r.restart_count as u32,
            exit_code: r.exit_code,
            boot_time_us: r.boot_time_us.map(|v| v as u64),
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            stopped_at: r.stopped_at,
        }
    }
}

impl Store {
    pub(crate) async fn instance_view(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<Instance, StoreError> {
        let row: InstanceRow = sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_INSTANCE} WHERE i.id = $1")))
            .bind(id)
            .fetch_one(conn)
            .await?;
        Ok(row.into())
    }

    /// What a copy of the service's newest serving instance (wanted running, not draining) is made of: the
    /// template of autoscale's additions and of what a rollout is not given.
    pub(crate) async fn newest_serving(
        conn: &mut sqlx::PgConnection,
        service: Uuid,
    ) -> Result<Option<InstanceSpec>, StoreError> {
        type Row = (Uuid, String, String, Vec<String>, sqlx::types::Json<BTreeMap<String, String>>, i32, i32, String);
        let row: Option<Row> = sqlx::query_as(
            "SELECT i.image_id, m.name, i.image_digest, i.args, i.env, i.memory_mb, i.port, i.restart_policy
             FROM instances i JOIN images m ON m.id = i.image_id
             WHERE i.service_id = $1 AND i.drain_then IS NULL AND i.desired_state = 'running'
             ORDER BY i.created_at DESC, i.id DESC LIMIT 1",
        )
        .bind(service)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(row.map(|(image_id, image_name, digest, args, env, memory_mb, port, restart_policy)| InstanceSpec {
            image_id,
            image_name,
            digest,
            service_id: Some(service),
            args,
            env: env.0,
            memory_mb: memory_mb as u32,
            restart_policy: restart_policy.parse().unwrap_or_default(),
            port,
            start: true,
            rollout_id: None,
        }))
    }

    /// Refuses `replicas` more instances of `memory_mb` each beyond the tenant's quotas.
    pub(crate) async fn check_instance_quotas(
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
        quotas: &cloud_domain::api::Quotas,
        replicas: u32,
        memory_mb: u32,
    ) -> Result<(), StoreError> {
        let (count, memory): (i64, i64) =
            sqlx::query_as("SELECT count(*), coalesce(sum(memory_mb), 0)::bigint FROM instances WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_one(&mut *conn)
                .await?;
        let replicas = i64::from(replicas);
        if count + replicas > quotas.max_instances as i64 {
            return Err(StoreError::QuotaExceeded {
                detail: format!(
                    "max_instances is {} and the tenant has {count}; {replicas} more do not fit",
                    quotas.max_instances
                ),
            });
        }
        let wanted = replicas * i64::from(memory_mb);
        if memory + wanted > quotas.max_memory_mb as i64 {
            return Err(StoreError::QuotaExceeded {
                detail: format!(
                    "max_memory_mb is {} and the tenant uses {memory}; {wanted} more do not fit",
                    quotas.max_memory_mb
                ),
            });
        }
        Ok(())
    }

    /// Inserts one instance per entry of `names` (a generated name for `None`) with private IPs from the
    /// tenant's `network`, inside the caller's transaction (which holds the tenant's lock), recording their events.
    pub(crate) async fn insert_instances_in(
        &self,
        tx: &mut sqlx::PgConnection,
        tenant: Uuid,
        network: ipnet::Ipv4Net,
        spec: &InstanceSpec,
        names: Vec<Option<String>>,
    ) -> Result<Vec<Instance>, StoreError> {
        sqlx::query("DELETE FROM released_private_ips WHERE tenant_id = $1 AND released_at < now() - $2")
            .bind(tenant)
            .bind(self.settings.ip_hold)
            .execute(&mut *tx)
            .await?;
        let used: Vec<(IpAddr,)> = sqlx::query_as(
            "SELECT private_ip FROM instances WHERE tenant_id = $1 UNION ALL
             SELECT ip FROM released_private_ips WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?;
        let mut used: BTreeSet<Ipv4Addr> = used
            .into_iter()
            .filter_map(|(ip,)| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect();

        let (last,): (Option<IpAddr>,) = sqlx::query_as("SELECT last_private_ip FROM tenants WHERE id = $1")
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
        let mut cursor = match last {
            Some(IpAddr::V4(v4)) => Some(v4),
            _ => None,
        };

        let (desired, state) = if spec.start {
            (DesiredState::Running, InstanceState::Pending)
        } else {
            (DesiredState::Stopped, InstanceState::Stopped)
        };
        let mut created = Vec::new();
        for name in names {
            let ip = ipam::next_free_host(network, &used, cursor)
                .ok_or(StoreError::CapacityExhausted { what: "private IPs in the tenant network" })?;
            used.insert(ip);
            cursor = Some(ip);
            let id = Uuid::new_v4();
            let mut attempt = 0;
            loop {
                attempt += 1;
                let chosen =
                    name.clone().unwrap_or_else(|| generate::instance_name(&spec.image_name, &mut rand::rng()));
                sqlx::query("SAVEPOINT insert_instance").execute(&mut *tx).await?;
                let res = sqlx::query(
                    "INSERT INTO instances (id, tenant_id, service_id, image_id, image_digest, name, args, env,
                         memory_mb, restart_policy, desired_state, state, private_ip, port, rollout_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                )
                .bind(id)
                .bind(tenant)
                .bind(spec.service_id)
                .bind(spec.image_id)
                .bind(&spec.digest)
                .bind(&chosen)
                .bind(&spec.args)
                .bind(sqlx::types::Json(&spec.env))
                .bind(spec.memory_mb as i32)
                .bind(spec.restart_policy.as_str())
                .bind(desired.as_str())
                .bind(state.as_str())
                .bind(IpAddr::V4(ip))
                .bind(spec.port)
                .bind(spec.rollout_id)
                .execute(&mut *tx)
                .await;
                match res {
                    Ok(_) => break,
                    Err(e) if violated_constraint(&e).as_deref() == Some("instances_tenant_id_name_key") => {
                        sqlx::query("ROLLBACK TO SAVEPOINT insert_instance").execute(&mut *tx).await?;
                        if name.is_some() {
                            return Err(StoreError::AlreadyExists { kind: "instance", name: chosen });
                        }
                        if attempt >= 8 {
                            return Err(StoreError::CapacityExhausted { what: "generated instance names" });
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let view = Self::instance_view(&mut *tx, id).await?;
            record_event(&mut *tx, Some(tenant), "instance", id, EventAction::Created, &view).await?;
            created.push(view);
        }
        sqlx::query("UPDATE tenants SET last_private_ip = $2 WHERE id = $1")
            .bind(tenant)
            .bind(cursor.map(IpAddr::V4))
            .execute(&mut *tx)
            .await?;
        Ok(created)
    }

    /// Creates instances (and an ephemeral service when ports are given) in one transaction.
    pub async fn create_instances(&self, tenant: Uuid, new: NewInstances) -> Result<CreatedInstances, StoreError> {
        self.bounded(async {
            if new.service.is_some() && new.ports.is_some() {
                return Err(StoreError::Invalid(
                    "give either a service to attach to or ports for a new ephemeral service, not both".into(),
                ));
            }
            let mut tx = self.pool.begin().await?;
            let (quotas, network, _) = Self::lock_tenant(&mut tx, tenant).await?;

            let images = Table { select: "SELECT id, name, digest, port FROM images", alias: "" };
            let visible = Visible::TenantOrBuiltin(tenant);
            let image: Option<(Uuid, String, String, i32)> =
                page::find(&mut *tx, images, visible, &new.image, RowLock::None).await?;
            let (image_id, image_name, digest, image_port) =
                image.ok_or_else(|| StoreError::NotFound { kind: "image", key: new.image.clone() })?;
            let port = new.port.map_or(image_port, i32::from);

            let mut names = Vec::new();
            for i in 1..=new.replicas {
                names.push(match (&new.name, new.replicas) {
                    (Some(n), 1) => Some(n.clone()),
                    (Some(n), _) => Some(format!("{n}-{i}")),
                    (None, _) => None,
                });
            }
            // Quotas first: nothing (an ephemeral service included) is made for instances that do not fit.
            Self::check_instance_quotas(&mut tx, tenant, &quotas, new.replicas, new.memory_mb).await?;

            let service_id = match (&new.service, &new.ports) {
                (Some(key), _) => Some(Self::service_id(&mut tx, tenant, key, RowLock::Share).await?.0),
                (None, Some(ports)) => {
                    // The ephemeral service is named after its first instance when that name is free.
                    let first =
                        names[0].clone().unwrap_or_else(|| generate::instance_name(&image_name, &mut rand::rng()));
                    names[0] = Some(first.clone());
                    let mut spec = NewService {
                        name: Some(first),
                        ports: ports.clone(),
                        soft_limit: None,
                        scale_to_zero_after: None,
                        hard_limit: None,
                        domains: Vec::new(),
                        persistent: false,
                    };
                    let id = match self.insert_service(&mut tx, tenant, spec.clone()).await {
                        Err(StoreError::AlreadyExists { .. }) => {
                            spec.name = None;
                            self.insert_service(&mut tx, tenant, spec).await?
                        }
                        other => other?,
                    };
                    let view = self.service_in(&mut tx, tenant, id).await?;
                    record_event(&mut tx, Some(tenant), "service", id, EventAction::Created, &view).await?;
                    Some(id)
                }
                (None, None) => None,
            };

            let spec = InstanceSpec {
                image_id,
                image_name: image_name.clone(),
                digest: digest.clone(),
                service_id,
                args: new.args.clone(),
                env: new.env.clone(),
                memory_mb: new.memory_mb,
                restart_policy: new.restart_policy,
                port,
                start: new.start,
                rollout_id: None,
            };
            let created = self.insert_instances_in(&mut tx, tenant, network, &spec, names).await?;
            let service = match service_id {
                Some(id) => {
                    let view = self.service_in(&mut tx, tenant, id).await?;
                    if new.service.is_some() {
                        record_event(&mut tx, Some(tenant), "service", id, EventAction::Updated, &view).await?;
                    }
                    Some(view)
                }
                None => None,
            };
            tx.commit().await?;
            Ok(CreatedInstances { instances: created, service })
        })
        .await
    }

    /// An instance of the tenant by name or id.
    pub async fn instance(&self, tenant: Uuid, key: &str) -> Result<Instance, StoreError> {
        self.bounded(async {
            let row: Option<InstanceRow> =
                page::find(&self.pool, INSTANCES, Visible::Tenant(tenant), key, RowLock::None).await?;
            row.map(Instance::from).ok_or_else(|| StoreError::NotFound { kind: "instance", key: key.to_owned() })
        })
        .await
    }

    /// A page of the tenant's instances in creation order.
    pub async fn list_instances(
        &self,
        tenant: Uuid,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Instance>, Option<Cursor>), StoreError> {
        self.bounded(async {
            let key = |r: &InstanceRow| Cursor { created_at: r.created_at, id: r.id };
            let (rows, next) = page::list(&self.pool, INSTANCES, Visible::Tenant(tenant), cursor, limit, key).await?;
            Ok((rows.into_iter().map(Instance::from).collect(), next))
        })
        .await
    }

    /// Deletes an instance; an ephemeral service left without instances goes in the same transaction. A running
    /// instance drains first and is returned (it goes once the drain ends); `None` when it went at once.
    pub async fn delete_instance(&self, tenant: Uuid, key: &str) -> Result<Option<Instance>, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let instances = Table { select: "SELECT id, service_id FROM instances", alias: "" };
            let found: Option<(Uuid, Option<Uuid>)> =
                page::find(&mut *tx, instances, Visible::Tenant(tenant), key, RowLock::None).await?;
            let (id, service) = found.ok_or_else(|| StoreError::NotFound { kind: "instance", key: key.to_owned() })?;
            if let Some(service) = service {
                // Serialises with other deletions of the service's instances, so exactly one of two concurrent
                // deletions of the last instances sees none left.
                sqlx::query("SELECT 1 FROM services WHERE id = $1 FOR UPDATE").bind(service).execute(&mut *tx).await?;
            }
            let (state,): (String,) = sqlx::query_as("SELECT state FROM instances WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            if matches!(state.parse(), Ok(InstanceState::Running | InstanceState::Draining)) {
                let view = self.drain_in(&mut tx, tenant, id, crate::drain::DrainThen::Delete).await?;
                tx.commit().await?;
                return Ok(Some(view));
            }
            self.delete_instances_in(&mut tx, tenant, &[id]).await?;
            if let Some(service) = service {
                self.reap_ephemeral(&mut tx, tenant, service).await?;
            }
            tx.commit().await?;
            Ok(None)
        })
        .await
    }

    /// Deletes instances inside the caller's transaction and records their events.
    pub(crate) async fn delete_instances_in(
        &self,
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
        ids: &[Uuid],
    ) -> Result<(), StoreError> {
        for id in ids {
            let Ok(view) = Self::instance_view(conn, *id).await else {
                continue;
            };
            let deleted: Option<(IpAddr,)> =
                sqlx::query_as("DELETE FROM instances WHERE id = $1 AND tenant_id = $2 RETURNING private_ip")
                    .bind(id)
                    .bind(tenant)
                    .fetch_optional(&mut *conn)
                    .await?;
            if let Some((ip,)) = deleted {
                // Held before reuse: see `ip_hold` in the settings.
                sqlx::query(
                    "INSERT INTO released_private_ips (tenant_id, ip) VALUES ($1, $2)
                     ON CONFLICT (tenant_id, ip) DO UPDATE SET released_at = now()",
                )
                .bind(tenant)
                .bind(ip)
                .execute(&mut *conn)
                .await?;
                record_event(conn, Some(tenant), "instance", *id, EventAction::Deleted, &view).await?;
            }
        }
        Ok(())
    }

    /// Asks for an instance to run (from stopped or failed).
    pub async fn start_instance(&self, tenant: Uuid, key: &str) -> Result<Instance, StoreError> {
        self.bounded(async { self.transition(tenant, key, state::start).await }).await
    }

    /// Asks for an instance to stop.
    pub async fn stop_instance(&self, tenant: Uuid, key: &str) -> Result<Instance, StoreError> {
        self.bounded(async { self.transition(tenant, key, state::stop).await }).await
    }

    /// Moves an instance to the node named `node`, which must have heartbeated within `live` and have the memory
    /// for it. One that runs is handed over: its node stops it, then the new node starts it (see `report`); one
    /// that does not run is reassigned at once. Name, private IP, service and configuration stay.
    pub async fn move_instance(
        &self,
        tenant: Uuid,
        key: &str,
        node: &str,
        live: std::time::Duration,
    ) -> Result<Instance, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            // Placement and moves see one another's decisions.
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(crate::nodes::SCHEDULER_LOCK)
                .execute(&mut *tx)
                .await?;
            let instances = Table { select: "SELECT id, state, node_id, memory_mb, move_to FROM instances", alias: "" };
            let found: Option<(Uuid, String, Option<Uuid>, i32, Option<Uuid>)> =
                page::find(&mut *tx, instances, Visible::Tenant(tenant), key, RowLock::Update).await?;
            let (id, current, on, memory, move_to) =
                found.ok_or_else(|| StoreError::NotFound { kind: "instance", key: key.to_owned() })?;
            let target: Option<(Uuid, bool, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT n.id, n.heartbeat_at > now() - interval '{}',
                        n.memory_mb - coalesce(sum(i.memory_mb), 0)::bigint
                 FROM nodes n LEFT JOIN instances i ON i.node_id = n.id AND i.id <> $2
                 WHERE n.name = $1 GROUP BY n.id",
                crate::nodes::interval(live)
            )))
            .bind(node)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            let (target, alive, free) =
                target.ok_or_else(|| StoreError::NotFound { kind: "node", key: node.to_owned() })?;
            let unavailable = |why: String| StoreError::NodeUnavailable { node: node.to_owned(), why };
            if !alive {
                return Err(unavailable("it has not been heard from lately (down or gone)".into()));
            }
            if free < i64::from(memory) {
                return Err(unavailable(format!("it has {free} MiB free and the instance needs {memory} MiB")));
            }
            // Already there: nothing to do, or a move away to call off (before its node has stopped it).
            if on == Some(target) {
                if move_to.is_none() {
                    return Self::instance_view(&mut tx, id).await;
                }
                sqlx::query(
                    "UPDATE instances SET move_to = NULL, state_reason = NULL, updated_at = now() WHERE id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                return Self::commit_updated(tx, tenant, id).await;
            }
            let current: InstanceState = current.parse().unwrap_or(InstanceState::Pending);
            let runs = on.is_some()
                && matches!(
                    current,
                    InstanceState::Starting
                        | InstanceState::Running
                        | InstanceState::Draining
                        | InstanceState::Stopping
                );
            // A running one is handed over by its node (move_to); any other is reassigned now.
            let reason = if runs { format!("moving to node {node}") } else { format!("moved to node {node}") };
            sqlx::query(
                "UPDATE instances SET move_to = CASE WHEN $4 THEN $2 END,
                     node_id = CASE WHEN $4 THEN node_id ELSE $2 END,
                     state = CASE WHEN NOT $4 AND desired_state = 'running' THEN 'pending' ELSE state END,
                     state_reason = $3, updated_at = now()
                 WHERE id = $1",
            )
            .bind(id)
            .bind(target)
            .bind(reason)
            .bind(runs)
            .execute(&mut *tx)
            .await?;
            Self::commit_updated(tx, tenant, id).await
        })
        .await
    }

    /// Records the instance's event and commits: what every change of one instance ends with.
    async fn commit_updated(
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<Instance, StoreError> {
        let view = Self::instance_view(&mut tx, id).await?;
        record_event(&mut tx, Some(tenant), "instance", id, EventAction::Updated, &view).await?;
        tx.commit().await?;
        Ok(view)
    }

    async fn transition(
        &self,
        tenant: Uuid,
        key: &str,
        rule: fn(InstanceState) -> Result<state::Transition, state::StateError>,
    ) -> Result<Instance, StoreError> {
        let mut tx = self.pool.begin().await?;
        let instances = Table { select: "SELECT id, state FROM instances", alias: "" };
        let found: Option<(Uuid, String)> =
            page::find(&mut *tx, instances, Visible::Tenant(tenant), key, RowLock::Update).await?;
        let (id, current) = found.ok_or_else(|| StoreError::NotFound { kind: "instance", key: key.to_owned() })?;
        let current: InstanceState = current.parse().unwrap_or(InstanceState::Pending);
        let next = rule(current)?;
        if next.state == InstanceState::Draining {
            let view = self.drain_in(&mut tx, tenant, id, crate::drain::DrainThen::Stop).await?;
            tx.commit().await?;
            return Ok(view);
        }
        sqlx::query(
            "UPDATE instances SET desired_state = $2, state = $3, state_reason = NULL, updated_at = now(), idle_stopped = false,
                 stopped_at = CASE WHEN $3 = 'stopped' THEN now() ELSE stopped_at END
             WHERE id = $1",
        )
        .bind(id)
        .bind(next.desired.as_str())
        .bind(next.state.as_str())
        .execute(&mut *tx)
        .await?;
        Self::commit_updated(tx, tenant, id).await
    }
}
