//! What the edge routes, read in one consistent snapshot: each service's public names, port mappings, limits
//! and running instances.
//!
//! The edge loads everything once ([`Store::route_data`]) and then only what changed ([`Store::route_changes`]):
//! the services touched by the events after the version it holds, re-read in the same snapshot as those events,
//! so the cost of a change is proportional to the change, not to the platform.

use std::net::IpAddr;

use cloud_domain::ports::PortMapping;
use uuid::Uuid;

use cloud_domain::api::EventAction;

use crate::services::parse_handler;
use crate::{Store, StoreError, record_event};

/// More events than this since the version held and the edge reloads everything instead.
const MAX_EVENTS_PER_CHANGE: i64 = 10_000;

/// Every routable service, as of `version`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteData {
    /// The newest change-feed version the data includes.
    pub version: i64,
    /// Every service.
    pub services: Vec<ServiceRoute>,
}

/// What changed after a version: the services touched, as they are now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChanges {
    /// Too much changed (or something that affects every service): load everything again.
    Reload(RouteData),
    /// The touched services as of `version`.
    Services {
        /// The newest change-feed version the changes include.
        version: i64,
        /// Touched services that exist, as they are now.
        present: Vec<ServiceRoute>,
        /// Touched services that no longer exist.
        gone: Vec<Uuid>,
    },
}

/// A service as the edge needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// Service id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Service name (for logs and metrics).
    pub name: String,
    /// Public FQDN, without the trailing dot.
    pub fqdn: String,
    /// Verified extra domains routed to the service.
    pub domains: Vec<String>,
    /// Public port mappings.
    pub ports: Vec<PortMapping>,
    /// Per-instance soft limit on in-flight requests or connections.
    pub soft_limit: Option<u32>,
    /// Per-instance hard limit.
    pub hard_limit: Option<u32>,
    /// Idle seconds before the instances are stopped; a request then wakes them.
    pub scale_to_zero_after: Option<u32>,
    /// Instances observed running, by name.
    pub backends: Vec<RouteBackend>,
    /// Instances wanted running that are not yet (pending or starting): requests may wait for them.
    pub starting: u32,
}

/// A running instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteBackend {
    /// Instance id.
    pub id: Uuid,
    /// Instance name.
    pub name: String,
    /// Private IP.
    pub private_ip: IpAddr,
}

impl Store {
    /// Loads every service the edge routes from one repeatable-read snapshot.
    pub async fn route_data(&self) -> Result<RouteData, StoreError> {
        let (mut tx, version) = self.begin_snapshot().await?;
        let services = read_services(&mut tx, None).await?;
        tx.commit().await?;
        Ok(RouteData { version, services })
    }

    /// The services touched by the events after `since`, read in the same snapshot as the events.
    pub async fn route_changes(&self, since: i64) -> Result<RouteChanges, StoreError> {
        let (mut tx, version) = self.begin_snapshot().await?;
        let events: Vec<(String, Uuid, serde_json::Value)> = sqlx::query_as(
            "SELECT resource_type, resource_id, payload FROM events WHERE version > $1 AND version <= $2
             ORDER BY version LIMIT $3",
        )
        .bind(since)
        .bind(version)
        .bind(MAX_EVENTS_PER_CHANGE + 1)
        .fetch_all(&mut *tx)
        .await?;
        let mut touched: Vec<Uuid> = Vec::new();
        let mut reload = events.len() as i64 > MAX_EVENTS_PER_CHANGE;
        for (kind, id, payload) in &events {
            match kind.as_str() {
                "service" => touched.push(*id),
                "instance" => {
                    if let Some(s) = payload.pointer("/service/id").and_then(|v| v.as_str()) {
                        match s.parse() {
                            Ok(s) => touched.push(s),
                            Err(_) => reload = true,
                        }
                    }
                }
                // A deleted tenant takes its services with it without an event per service.
                "tenant" => reload = true,
                _ => {}
            }
        }
        if reload {
            let services = read_services(&mut tx, None).await?;
            tx.commit().await?;
            return Ok(RouteChanges::Reload(RouteData { version, services }));
        }
        touched.sort_unstable();
        touched.dedup();
        let present = if touched.is_empty() { Vec::new() } else { read_services(&mut tx, Some(&touched)).await? };
        tx.commit().await?;
        let gone = touched.into_iter().filter(|id| !present.iter().any(|s| s.id == *id)).collect();
        Ok(RouteChanges::Services { version, present, gone })
    }
}

impl Store {
    /// Notes that a service was just asked for (its scale-to-zero idle time starts over). No change-feed event:
    /// this follows traffic, not the tenant's intent, and edges throttle it.
    pub async fn touch_service(&self, id: Uuid) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("UPDATE services SET last_request_at = now() WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// Starts again the instances of a service that were stopped for idleness; how many were.
    pub async fn wake_service(&self, id: Uuid) -> Result<usize, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("UPDATE services SET last_request_at = now() WHERE id = $1").bind(id).execute(&mut *tx).await?;
            let woken: Vec<(Uuid, Uuid)> = sqlx::query_as(
                "UPDATE instances SET desired_state = 'running', idle_stopped = false, updated_at = now(),
                 state = CASE WHEN state IN ('stopped', 'failed') THEN 'pending' ELSE state END,
                 state_reason = 'woken by a request'
             WHERE service_id = $1 AND idle_stopped RETURNING id, tenant_id",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            for (instance, tenant) in &woken {
                let view = Self::instance_view(&mut tx, *instance).await?;
                record_event(&mut tx, Some(*tenant), "instance", *instance, EventAction::Updated, &view).await?;
            }
            tx.commit().await?;
            Ok(woken.len())
        })
        .await
    }

    /// Stops the running instances of scale-to-zero services that had no request for their idle time (counted
    /// from the last request or the instance's start, whichever is later); how many. Safe to run from every
    /// edge at once: the rows are locked and a stopped instance no longer matches.
    pub async fn stop_idle_instances(&self) -> Result<usize, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let stopped: Vec<(Uuid, Uuid)> = sqlx::query_as(
                "UPDATE instances i SET desired_state = 'stopped', idle_stopped = true, updated_at = now(),
                 state = CASE WHEN i.state = 'running' THEN 'stopping' ELSE i.state END,
                 state_reason = 'no request for ' || s.scale_to_zero_after || 's: scaled to zero'
             FROM services s
             WHERE i.service_id = s.id AND s.scale_to_zero_after IS NOT NULL
               AND i.desired_state = 'running' AND i.state = 'running'
               AND greatest(coalesce(s.last_request_at, '-infinity'), coalesce(i.started_at, i.created_at))
                   < now() - make_interval(secs => s.scale_to_zero_after)
             RETURNING i.id, i.tenant_id",
            )
            .fetch_all(&mut *tx)
            .await?;
            for (instance, tenant) in &stopped {
                let view = Self::instance_view(&mut tx, *instance).await?;
                record_event(&mut tx, Some(*tenant), "instance", *instance, EventAction::Updated, &view).await?;
            }
            tx.commit().await?;
            Ok(stopped.len())
        })
        .await
    }
}

/// Reads services (all, or those in `only`) with their ports, verified domains and running instances.
async fn read_services(tx: &mut sqlx::PgConnection, only: Option<&[Uuid]>) -> Result<Vec<ServiceRoute>, StoreError> {
    let only: Option<Vec<Uuid>> = only.map(|o| o.to_vec());
    let rows: Vec<(Uuid, Uuid, String, String, Option<i32>, Option<i32>, Option<i32>)> = sqlx::query_as(
        "SELECT id, tenant_id, name, fqdn, soft_limit, hard_limit, scale_to_zero_after FROM services
         WHERE $1::uuid[] IS NULL OR id = ANY($1) ORDER BY id",
    )
    .bind(&only)
    .fetch_all(&mut *tx)
    .await?;
    let ports: Vec<(Uuid, i32, i32, Vec<String>, bool)> = sqlx::query_as(
        "SELECT service_id, port, destination_port, handlers, proxy FROM service_ports
         WHERE $1::uuid[] IS NULL OR service_id = ANY($1) ORDER BY service_id, port",
    )
    .bind(&only)
    .fetch_all(&mut *tx)
    .await?;
    let domains: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT service_id, name FROM domains WHERE verified_at IS NOT NULL
         AND ($1::uuid[] IS NULL OR service_id = ANY($1)) ORDER BY service_id, name",
    )
    .bind(&only)
    .fetch_all(&mut *tx)
    .await?;
    let backends: Vec<(Uuid, Uuid, String, IpAddr)> = sqlx::query_as(
        "SELECT service_id, id, name, private_ip FROM instances WHERE state = 'running' AND service_id IS NOT NULL
         AND ($1::uuid[] IS NULL OR service_id = ANY($1)) ORDER BY service_id, name",
    )
    .bind(&only)
    .fetch_all(&mut *tx)
    .await?;
    let starting: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT service_id, count(*) FROM instances
         WHERE desired_state = 'running' AND state IN ('pending', 'starting') AND service_id IS NOT NULL
           AND ($1::uuid[] IS NULL OR service_id = ANY($1)) GROUP BY service_id",
    )
    .bind(&only)
    .fetch_all(&mut *tx)
    .await?;

    let mut services: Vec<ServiceRoute> = rows
        .into_iter()
        .map(|(id, tenant_id, name, fqdn, soft, hard, idle)| ServiceRoute {
            id,
            tenant_id,
            name,
            fqdn,
            domains: Vec::new(),
            ports: Vec::new(),
            soft_limit: soft.map(|v| v as u32),
            hard_limit: hard.map(|v| v as u32),
            scale_to_zero_after: idle.map(|v| v as u32),
            backends: Vec::new(),
            starting: 0,
        })
        .collect();
    // Every list is ordered by service id, as are the services: attach by binary search.
    let find = |services: &mut [ServiceRoute], id: Uuid| -> Option<usize> {
        services.binary_search_by(|s| s.id.cmp(&id)).ok()
    };
    for (sid, port, dest, handlers, proxy) in ports {
        if let Some(i) = find(&mut services, sid) {
            let mut handlers: Vec<_> = handlers.iter().filter_map(|h| parse_handler(h)).collect();
            handlers.sort();
            services[i].ports.push(PortMapping { port: port as u16, destination_port: dest as u16, handlers, proxy });
        }
    }
    for (sid, name) in domains {
        if let Some(i) = find(&mut services, sid) {
            services[i].domains.push(name);
        }
    }
    for (sid, id, name, private_ip) in backends {
        if let Some(i) = find(&mut services, sid) {
            services[i].backends.push(RouteBackend { id, name, private_ip });
        }
    }
    for (sid, n) in starting {
        if let Some(i) = find(&mut services, sid) {
            services[i].starting = n as u32;
        }
    }
    Ok(services)
}
