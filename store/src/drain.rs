//! Draining: an instance being stopped or deleted stays up until no edge routes new requests to it and those in
//! flight have finished (or the platform's drain timeout has passed), then it stops or goes.
//!
//! Edges report every second or so the change-feed version they route by and their in-flight count per
//! instance ([`Store::report_edge`]). A drain records the newest version when it is first looked at; it ends once
//! every live edge holds that version (so routes around the instance) and counts nothing in flight for it
//! ([`Store::finish_drains`], run by the platform's controller).

use std::time::Duration;

use cloud_domain::api::{EventAction, Instance};
use uuid::Uuid;

use crate::{Store, StoreError, record_event};

/// What follows a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DrainThen {
    /// The instance stops (and stays, stopped).
    Stop,
    /// The instance is deleted.
    Delete,
}

impl DrainThen {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Delete => "delete",
        }
    }
}

impl Store {
    /// Starts draining a running instance inside the caller's transaction; a drain already under way is only
    /// turned into a deletion when `then` asks for one. Returns the instance as it now is.
    pub(crate) async fn drain_in(
        &self,
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
        id: Uuid,
        then: DrainThen,
    ) -> Result<Instance, StoreError> {
        sqlx::query(
            "UPDATE instances SET
                 drain_then = CASE WHEN drain_then = 'delete' THEN 'delete' ELSE $2 END,
                 drain_deadline = coalesce(drain_deadline, now() + $3),
                 state = 'draining', desired_state = 'stopped', idle_stopped = false, updated_at = now(),
                 state_reason = CASE WHEN $2 = 'delete' OR drain_then = 'delete'
                     THEN 'draining before deletion' ELSE 'draining before stopping' END
             WHERE id = $1",
        )
        .bind(id)
        .bind(then.as_str())
        .bind(self.settings.drain_timeout)
        .execute(&mut *conn)
        .await?;
        let view = Self::instance_view(&mut *conn, id).await?;
        record_event(&mut *conn, Some(tenant), "instance", id, EventAction::Updated, &view).await?;
        Ok(view)
    }

    /// Ends the drains that are over: the instance stops (the node agent then stops it) or is deleted (with its
    /// ephemeral service when it was the last). An edge not heard from within `edge_live` does not hold a drain
    /// up. Returns how many ended. Safe to run from several places: each instance is rechecked under its lock.
    pub async fn finish_drains(&self, edge_live: Duration) -> Result<usize, StoreError> {
        self.bounded(async {
            // The version edges must reach: at least that of the event that started the drain.
            sqlx::query(
                "UPDATE instances SET drain_version = (SELECT coalesce(max(version), 0) FROM events)
                 WHERE drain_then IS NOT NULL AND drain_version IS NULL",
            )
            .execute(&self.pool)
            .await?;
            sqlx::query("DELETE FROM edges WHERE reported_at < now() - interval '1 hour'").execute(&self.pool).await?;
            let over: Vec<(Uuid, Uuid, Option<Uuid>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT i.id, i.tenant_id, i.service_id FROM instances i WHERE {DRAIN_OVER}"
            )))
            .bind(edge_live)
            .fetch_all(&self.pool)
            .await?;
            let mut ended = 0;
            for (id, tenant, service) in over {
                let mut tx = self.pool.begin().await?;
                // The service first, as deletions of its instances lock it (see `delete_instance`).
                if let Some(service) = service {
                    sqlx::query("SELECT 1 FROM services WHERE id = $1 FOR UPDATE")
                        .bind(service)
                        .execute(&mut *tx)
                        .await?;
                }
                let still: Option<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT i.drain_then, i.state FROM instances i WHERE i.id = $2 AND {DRAIN_OVER} FOR UPDATE"
                )))
                .bind(edge_live)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((then, state)) = still else { continue };
                if then == "delete" {
                    self.delete_instances_in(&mut tx, tenant, &[id]).await?;
                    if let Some(service) = service {
                        self.reap_ephemeral(&mut tx, tenant, service).await?;
                    }
                } else {
                    sqlx::query(
                        "UPDATE instances SET drain_then = NULL, drain_deadline = NULL, drain_version = NULL,
                             state = CASE WHEN state = 'draining' THEN 'stopping' ELSE state END,
                             state_reason = CASE WHEN state = 'draining' THEN NULL ELSE state_reason END,
                             updated_at = now()
                         WHERE id = $1",
                    )
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    if state == "draining" {
                        let view = Self::instance_view(&mut tx, id).await?;
                        record_event(&mut tx, Some(tenant), "instance", id, EventAction::Updated, &view).await?;
                    }
                }
                tx.commit().await?;
                ended += 1;
            }
            Ok(ended)
        })
        .await
    }

    /// An edge's report: the version it routes by and its in-flight count per instance (only those above 0).
    pub async fn report_edge(
        &self,
        edge: Uuid,
        name: &str,
        version: i64,
        in_flight: &[(Uuid, u32)],
    ) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO edges (id, name, version) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET version = $3, reported_at = now()",
            )
            .bind(edge)
            .bind(name)
            .bind(version)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM edge_load WHERE edge_id = $1").bind(edge).execute(&mut *tx).await?;
            if !in_flight.is_empty() {
                let ids: Vec<Uuid> = in_flight.iter().map(|l| l.0).collect();
                let counts: Vec<i32> = in_flight.iter().map(|l| l.1.min(i32::MAX as u32) as i32).collect();
                sqlx::query(
                    "INSERT INTO edge_load (edge_id, instance_id, in_flight)
                     SELECT $1, * FROM unnest($2::uuid[], $3::int[]) ON CONFLICT DO NOTHING",
                )
                .bind(edge)
                .bind(&ids)
                .bind(&counts)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// An edge that stops: it holds no drain up any more.
    pub async fn remove_edge(&self, edge: Uuid) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("DELETE FROM edges WHERE id = $1").bind(edge).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }
}

/// A drain is over (for instance `i`, with `$1` the edges' live window): the instance no longer runs, the
/// deadline passed, or every live edge routes around it and has nothing in flight for it.
const DRAIN_OVER: &str = "i.drain_then IS NOT NULL AND i.drain_version IS NOT NULL AND (
    i.state <> 'draining' OR i.drain_deadline < now() OR NOT EXISTS (
        SELECT 1 FROM edges e WHERE e.reported_at > now() - $1::interval AND (
            e.version < i.drain_version
            OR EXISTS (SELECT 1 FROM edge_load l WHERE l.edge_id = e.id AND l.instance_id = i.id))))";
