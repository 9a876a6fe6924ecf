//! Autoscale: per service, between min and max instances, aiming at a number of requests in flight per instance
//! as the edges report them ([`crate::drain`] keeps those reports). What to do is decided by the platform's
//! controller ([`cloud_domain::autoscale`]); this module reads the inputs and carries the decision out: new
//! instances are copies of the service's newest one, surplus ones drain and go, newest first.

use std::time::Duration;

use cloud_domain::api::{Autoscale, EventAction, Service};
use uuid::Uuid;

use crate::drain::DrainThen;
use crate::page::RowLock;
use crate::{Store, StoreError, record_event};

/// What the controller knows of an autoscaled service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoscaleInput {
    /// The service.
    pub service: Uuid,
    /// Its tenant.
    pub tenant: Uuid,
    /// Its policy.
    pub policy: Autoscale,
    /// Instances running (serving).
    pub running: u32,
    /// Instances wanted running that do not run yet.
    pub starting: u32,
    /// Requests in flight on its instances, summed over the live edges.
    pub in_flight: u64,
    /// Seconds since its instances were last added or removed by autoscale (`None`: never).
    pub since_last_change: Option<u64>,
    /// A rollout is under way (autoscale waits for it).
    pub rolling_out: bool,
}

impl Store {
    /// Sets (or with `None` removes) a service's autoscale policy.
    pub async fn set_autoscale(
        &self,
        tenant: Uuid,
        service: &str,
        policy: Option<Autoscale>,
    ) -> Result<Service, StoreError> {
        self.bounded(async {
            if let Some(p) = policy
                && p.min > p.max
            {
                return Err(StoreError::Invalid(format!("autoscale min {} is above max {}", p.min, p.max)));
            }
            let mut tx = self.pool.begin().await?;
            let (id, _, _) = Self::service_id(&mut tx, tenant, service, RowLock::Update).await?;
            sqlx::query(
                "UPDATE services SET autoscale_min = $2, autoscale_max = $3, autoscale_target = $4,
                     autoscale_cooldown = $5, updated_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(policy.map(|p| p.min as i32))
            .bind(policy.map(|p| p.max as i32))
            .bind(policy.map(|p| p.target_in_flight as i32))
            .bind(policy.map(|p| p.cooldown_seconds as i32))
            .execute(&mut *tx)
            .await?;
            let view = self.service_in(&mut tx, tenant, id).await?;
            record_event(&mut tx, Some(tenant), "service", id, EventAction::Updated, &view).await?;
            tx.commit().await?;
            Ok(view)
        })
        .await
    }

    /// Every autoscaled service with its instances and load; edges not heard from within `edge_live` do not count.
    pub async fn autoscale_inputs(&self, edge_live: Duration) -> Result<Vec<AutoscaleInput>, StoreError> {
        self.bounded(async {
            type Row = (Uuid, Uuid, i32, i32, i32, i32, i64, i64, i64, Option<f64>, bool);
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT s.id, s.tenant_id, s.autoscale_min, s.autoscale_max, s.autoscale_target, s.autoscale_cooldown,
                    (SELECT count(*) FROM instances i WHERE i.service_id = s.id AND i.state = 'running'),
                    (SELECT count(*) FROM instances i WHERE i.service_id = s.id AND i.desired_state = 'running'
                        AND i.state IN ('pending', 'starting')),
                    (SELECT coalesce(sum(l.in_flight), 0)::bigint FROM edge_load l
                        JOIN instances i ON i.id = l.instance_id JOIN edges e ON e.id = l.edge_id
                        WHERE i.service_id = s.id AND i.state = 'running' AND e.reported_at > now() - $1::interval),
                    extract(epoch FROM now() - s.last_scaled_at)::float8,
                    EXISTS (SELECT 1 FROM rollouts r WHERE r.service_id = s.id AND r.state = 'running')
                 FROM services s WHERE s.autoscale_min IS NOT NULL ORDER BY s.id",
            )
            .bind(edge_live)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(service, tenant, min, max, target, cooldown, running, starting, in_flight, since, rolling)| {
                    AutoscaleInput {
                        service,
                        tenant,
                        policy: Autoscale {
                            min: min as u32,
                            max: max as u32,
                            target_in_flight: target as u32,
                            cooldown_seconds: cooldown as u32,
                        },
                        running: running as u32,
                        starting: starting as u32,
                        in_flight: in_flight.max(0) as u64,
                        since_last_change: since.map(|s| s.max(0.0) as u64),
                        rolling_out: rolling,
                    }
                })
                .collect())
        })
        .await
    }

    /// Adds `count` copies of the service's newest serving instance. Returns how many were added (none when the
    /// service has no instance to copy).
    pub async fn scale_up(&self, tenant: Uuid, service: Uuid, count: u32) -> Result<u32, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let (quotas, network, _) = Self::lock_tenant(&mut tx, tenant).await?;
            let Some(spec) = Self::newest_serving(&mut tx, service).await? else { return Ok(0) };
            Self::check_instance_quotas(&mut tx, tenant, &quotas, count, spec.memory_mb).await?;
            self.insert_instances_in(&mut tx, tenant, network, &spec, vec![None; count as usize]).await?;
            self.note_scaled(&mut tx, tenant, service).await?;
            tx.commit().await?;
            Ok(count)
        })
        .await
    }

    /// Drains away the `count` newest running instances of the service; how many.
    pub async fn scale_down(&self, tenant: Uuid, service: Uuid, count: u32) -> Result<u32, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT 1 FROM services WHERE id = $1 FOR UPDATE").bind(service).execute(&mut *tx).await?;
            let ids: Vec<(Uuid,)> = sqlx::query_as(
                "SELECT id FROM instances WHERE service_id = $1 AND state = 'running' AND drain_then IS NULL
                 ORDER BY created_at DESC, id DESC LIMIT $2 FOR UPDATE",
            )
            .bind(service)
            .bind(i64::from(count))
            .fetch_all(&mut *tx)
            .await?;
            for (id,) in &ids {
                self.drain_in(&mut tx, tenant, *id, DrainThen::Delete).await?;
            }
            self.note_scaled(&mut tx, tenant, service).await?;
            tx.commit().await?;
            Ok(ids.len() as u32)
        })
        .await
    }

    async fn note_scaled(&self, conn: &mut sqlx::PgConnection, tenant: Uuid, service: Uuid) -> Result<(), StoreError> {
        sqlx::query("UPDATE services SET last_scaled_at = now() WHERE id = $1")
            .bind(service)
            .execute(&mut *conn)
            .await?;
        let view = self.service_in(conn, tenant, service).await?;
        record_event(conn, Some(tenant), "service", service, EventAction::Updated, &view).await?;
        Ok(())
    }

    /// Whether this process may act as the platform's one controller: takes (or confirms it holds) a session
    /// lock on a connection of its own. When the connection breaks the lock goes with it and another replica
    /// takes over.
    pub async fn lead(&self, held: &mut Option<sqlx::PgConnection>) -> bool {
        let attempt = async {
            match held {
                Some(conn) => sqlx::query("SELECT 1").execute(&mut *conn).await.map(|_| true),
                None => {
                    let mut conn = self.pool.acquire().await?.detach();
                    let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                        .bind(crate::nodes::CONTROLLER_LOCK)
                        .fetch_one(&mut conn)
                        .await?;
                    if got {
                        *held = Some(conn);
                    }
                    Ok(got)
                }
            }
        };
        match tokio::time::timeout(self.settings.database_timeout, attempt).await {
            Ok(Ok(true)) => true,
            _ => {
                *held = None;
                false
            }
        }
    }
}
