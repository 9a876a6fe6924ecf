//! Services: public names, port mappings, limits and extra domains.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use cloud_domain::api::{Domain, DomainState, DomainVerification, EventAction, InstanceSummary, Service};
use cloud_domain::generate;
use cloud_domain::ports::{self, Handler, PortMapping};
use cloud_domain::service::check_limits;
use cloud_domain::state::InstanceState;
use uuid::Uuid;

use crate::page::{self, Cursor, RowLock, Table, Visible};
use crate::{Store, StoreError, int_column, record_event, violated_constraint};

/// A validated service to create.
#[derive(Debug, Clone)]
pub struct NewService {
    /// Validated name; `None` generates `<adjective>-<noun>`.
    pub name: Option<String>,
    /// Expanded, validated port mappings (a tcp port 0 is allocated here).
    pub ports: Vec<PortMapping>,
    /// Soft limit per instance.
    pub soft_limit: Option<u32>,
    /// Hard limit per instance.
    pub hard_limit: Option<u32>,
    /// Idle seconds before the instances are stopped (scale to zero).
    pub scale_to_zero_after: Option<u32>,
    /// Extra domains: (fully qualified name, custom).
    pub domains: Vec<(String, bool)>,
    /// False for ephemeral services.
    pub persistent: bool,
}

impl NewService {
    /// A persistent service with no ports, limits or domains; callers set what they need on top.
    pub fn named(name: impl Into<String>) -> Self {
        NewService {
            name: Some(name.into()),
            ports: vec![],
            soft_limit: None,
            hard_limit: None,
            scale_to_zero_after: None,
            domains: vec![],
            persistent: true,
        }
    }
}

/// A validated change to a service; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ServiceChange {
    /// New port mappings.
    pub ports: Option<Vec<PortMapping>>,
    /// New soft limit (`Some(None)` clears it).
    pub soft_limit: Option<Option<u32>>,
    /// New hard limit (`Some(None)` clears it).
    pub hard_limit: Option<Option<u32>>,
    /// New scale-to-zero idle time (`Some(None)` turns it off).
    pub scale_to_zero_after: Option<Option<u32>>,
    /// New extra domains.
    pub domains: Option<Vec<(String, bool)>>,
}

#[derive(sqlx::FromRow)]
struct ServiceRow {
    id: Uuid,
    name: String,
    fqdn: String,
    soft_limit: Option<i32>,
    hard_limit: Option<i32>,
    scale_to_zero_after: Option<i32>,
    persistent: bool,
    autoscale_min: Option<i32>,
    autoscale_max: Option<i32>,
    autoscale_target: Option<i32>,
    autoscale_cooldown: Option<i32>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// service, name, custom, token, verified, expires_at, expired, taken
type DomainRow = (Uuid, String, bool, String, bool, Option<DateTime<Utc>>, bool, bool);

const SELECT_SERVICE: &str = "SELECT id, name, fqdn, soft_limit, hard_limit, scale_to_zero_after, persistent,
    autoscale_min, autoscale_max, autoscale_target, autoscale_cooldown, created_at, updated_at FROM services";

/// Why a tenant cannot attach a name twice.
const OTHER_SERVICE: &str = "is already attached to another service of this tenant";

/// Why a platform subdomain is not free.
const ATTACHED: &str = "is already attached to a service";

/// Advisory lock key serialising raw TCP port allocation platform-wide.
const TCP_PORT_LOCK: i64 = 7_265_747;

impl Store {
    /// Creates a service in its own transaction.
    pub async fn create_service(&self, tenant: Uuid, new: NewService) -> Result<Service, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let (quotas, _, _) = Self::lock_tenant(&mut tx, tenant).await?;
            let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM services WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_one(&mut *tx)
                .await?;
            if count >= quotas.max_services as i64 {
                return Err(StoreError::QuotaExceeded {
                    detail: format!("max_services is {} and the tenant has {count}", quotas.max_services),
                });
            }
            let id = self.insert_service(&mut tx, tenant, new).await?;
            let service = self.service_in(&mut tx, tenant, id).await?;
            record_event(&mut tx, Some(tenant), "service", id, EventAction::Created, &service).await?;
            tx.commit().await?;
            Ok(service)
        })
        .await
    }

    /// Inserts a service inside the caller's transaction (which holds the tenant lock); returns its id.
    pub(crate) async fn insert_service(
        &self,
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
        new: NewService,
    ) -> Result<Uuid, StoreError> {
        let id = Uuid::new_v4();
        let generated = new.name.is_none();
        // A generated name or FQDN may collide; a few retries make that vanishingly unlikely to surface.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (name, fqdn) = {
                let mut rng = rand::rng();
                let name = new.name.clone().unwrap_or_else(|| generate::random_service_name(&mut rng));
                let fqdn = generate::service_fqdn(&name, &self.settings.region, &self.settings.base_domain, &mut rng);
                (name, fqdn)
            };
            sqlx::query("SAVEPOINT insert_service").execute(&mut *conn).await?;
            let res = sqlx::query(
                "INSERT INTO services (id, tenant_id, name, fqdn, soft_limit, hard_limit, persistent, scale_to_zero_after)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE NOT EXISTS (SELECT 1 FROM domains WHERE name = $4)",
            )
            .bind(id)
            .bind(tenant)
            .bind(&name)
            .bind(&fqdn)
            .bind(new.soft_limit.map(|v| int_column("soft_limit", v)).transpose()?)
            .bind(new.hard_limit.map(|v| int_column("hard_limit", v)).transpose()?)
            .bind(new.persistent)
            .bind(new.scale_to_zero_after.map(|v| int_column("scale_to_zero_after", v)).transpose()?)
            .execute(&mut *conn)
            .await;
            let retry = match res {
                Ok(r) => r.rows_affected() == 0,
                Err(e) => match violated_constraint(&e).as_deref() {
                    Some("services_tenant_id_name_key") | Some("services_fqdn_key") => true,
                    _ => return Err(e.into()),
                },
            };
            if !retry {
                break;
            }
            // Undo the failed insert only, so the caller's transaction stays usable (it may retry with another name).
            sqlx::query("ROLLBACK TO SAVEPOINT insert_service").execute(&mut *conn).await?;
            if !generated {
                let (taken,): (bool,) =
                    sqlx::query_as("SELECT EXISTS (SELECT 1 FROM services WHERE tenant_id = $1 AND name = $2)")
                        .bind(tenant)
                        .bind(&name)
                        .fetch_one(&mut *conn)
                        .await?;
                if taken {
                    return Err(StoreError::AlreadyExists { kind: "service", name });
                }
            }
            if attempt >= 8 {
                return Err(StoreError::CapacityExhausted { what: "generated service names" });
            }
        }
        self.insert_ports(conn, id, &new.ports, &[]).await?;
        self.insert_domains(conn, tenant, id, &new.domains).await?;
        Ok(id)
    }

    /// Inserts port mappings, allocating raw TCP public ports given as 0. `previous` lets a re-submitted
    /// `0:DEST/tcp` keep the port it was allocated before.
    async fn insert_ports(
        &self,
        conn: &mut sqlx::PgConnection,
        service: Uuid,
        mappings: &[PortMapping],
        previous: &[PortMapping],
    ) -> Result<(), StoreError> {
        let needs_tcp = mappings.iter().any(|m| m.handlers.contains(&Handler::Tcp));
        let mut used = BTreeSet::new();
        if needs_tcp {
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(TCP_PORT_LOCK).execute(&mut *conn).await?;
            let rows: Vec<(i32,)> = sqlx::query_as("SELECT port FROM service_ports WHERE tcp AND service_id <> $1")
                .bind(service)
                .fetch_all(&mut *conn)
                .await?;
            used.extend(rows.into_iter().map(|(p,)| p as u16));
        }
        // A port given explicitly is never allocated to a `0:DEST/tcp` listed before it.
        used.extend(mappings.iter().map(|m| m.port).filter(|p| *p != 0));
        let range = &self.settings.tcp_ports;
        for m in mappings {
            let mut port = m.port;
            if port == 0 {
                let kept = previous
                    .iter()
                    .find(|p| p.handlers == m.handlers && p.destination_port == m.destination_port)
                    .map(|p| p.port)
                    .filter(|p| !used.contains(p));
                port = match kept {
                    Some(p) => p,
                    None => ports::allocate_tcp_port(range, &used)
                        .ok_or(StoreError::CapacityExhausted { what: "tcp ports" })?,
                };
            }
            used.insert(port);
            let handlers: Vec<String> = m.handlers.iter().map(|h| h.to_string()).collect();
            let res = sqlx::query(
                "INSERT INTO service_ports (service_id, port, destination_port, handlers, proxy)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(service)
            .bind(port as i32)
            .bind(m.destination_port as i32)
            .bind(&handlers)
            .bind(m.proxy)
            .execute(&mut *conn)
            .await;
            if let Err(e) = res {
                return Err(match violated_constraint(&e).as_deref() {
                    Some("service_ports_tcp_unique") => StoreError::PortTaken { port },
                    _ => e.into(),
                });
            }
        }
        Ok(())
    }

    /// Attaches extra names to a service inside the caller's transaction, which holds the tenant lock (the
    /// quota check counts the tenant's names). A custom domain is claimed unverified, expiring after
    /// `domain_claim_ttl`; another tenant's unverified claim on the same name does not stand in the way, a
    /// verified one does.
    async fn insert_domains(
        &self,
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
        service: Uuid,
        domains: &[(String, bool)],
    ) -> Result<(), StoreError> {
        if domains.is_empty() {
            return Ok(());
        }
        let ttl = chrono::Duration::from_std(self.settings.domain_claim_ttl).unwrap_or(chrono::Duration::MAX);
        let names: Vec<&str> = domains.iter().map(|(n, _)| n.as_str()).collect();
        // The tenant's own lapsed claims on these names make way for the new ones.
        let lapsed: Vec<(Uuid,)> = sqlx::query_as(
            "DELETE FROM domains WHERE tenant_id = $1 AND name = ANY($2) AND verified_at IS NULL
                 AND expires_at <= now()
             RETURNING service_id",
        )
        .bind(tenant)
        .bind(&names)
        .fetch_all(&mut *conn)
        .await?;
        for (name, custom) in domains {
            let (fqdn, verified_tenant): (bool, Option<Uuid>) = sqlx::query_as(
                "SELECT EXISTS (SELECT 1 FROM services WHERE fqdn = $1),
                        (SELECT tenant_id FROM domains WHERE name = $1 AND verified_at IS NOT NULL)",
            )
            .bind(name)
            .fetch_one(&mut *conn)
            .await?;
            if fqdn {
                return Err(StoreError::DomainTaken { name: name.clone(), why: "is a service's name" });
            }
            // A name proven (or, for platform subdomains, taken) by another tenant is public already: its DNS
            // points here. Refusing the claim says so rather than recording one that can never verify.
            let why = match verified_tenant {
                Some(t) if t == tenant => Some(OTHER_SERVICE),
                Some(_) if *custom => Some(crate::domains::VERIFIED_ELSEWHERE),
                Some(_) => Some(ATTACHED),
                None => None,
            };
            if let Some(why) = why {
                return Err(StoreError::DomainTaken { name: name.clone(), why });
            }
            let token = generate::random_suffix(&mut rand::rng(), 32);
            let res = sqlx::query(
                "INSERT INTO domains (id, tenant_id, service_id, name, custom, verification_token, verified_at,
                                      expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $5 THEN NULL ELSE now() END,
                         CASE WHEN $5 THEN now() + $7 ELSE NULL END)",
            )
            .bind(Uuid::new_v4())
            .bind(tenant)
            .bind(service)
            .bind(name)
            .bind(custom)
            .bind(token)
            .bind(ttl)
            .execute(&mut *conn)
            .await;
            if let Err(e) = res {
                return Err(match violated_constraint(&e).as_deref() {
                    // A platform subdomain another tenant took an instant before.
                    Some("domains_verified_name") => StoreError::DomainTaken { name: name.clone(), why: ATTACHED },
                    Some("domains_tenant_name") => StoreError::DomainTaken { name: name.clone(), why: OTHER_SERVICE },
                    _ => e.into(),
                });
            }
        }
        let (count, max): (i64, i32) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM domains
                     WHERE tenant_id = $1 AND (verified_at IS NOT NULL OR expires_at > now())),
                    (SELECT max_domains FROM tenants WHERE id = $1)",
        )
        .bind(tenant)
        .fetch_one(&mut *conn)
        .await?;
        if count > max as i64 {
            return Err(StoreError::QuotaExceeded {
                detail: format!(
                    "max_domains is {max} and the tenant's services would have {count} domains ({} in this request)",
                    domains.len()
                ),
            });
        }
        let others: BTreeSet<Uuid> = lapsed.into_iter().map(|(s,)| s).filter(|s| *s != service).collect();
        for other in others {
            let view = self.service_in(conn, tenant, other).await?;
            record_event(conn, Some(tenant), "service", other, EventAction::Updated, &view).await?;
        }
        Ok(())
    }

    /// The full view of one service of the tenant.
    pub(crate) async fn service_in(
        &self,
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<Service, StoreError> {
        let row: ServiceRow =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_SERVICE} WHERE tenant_id = $1 AND id = $2")))
                .bind(tenant)
                .bind(id)
                .fetch_one(&mut *conn)
                .await?;
        let mut views = self.views(conn, vec![row]).await?;
        Ok(views.remove(0))
    }

    /// Builds full views of services with three batched queries, whatever the number of services.
    async fn views(&self, conn: &mut sqlx::PgConnection, rows: Vec<ServiceRow>) -> Result<Vec<Service>, StoreError> {
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let port_rows: Vec<(Uuid, i32, i32, Vec<String>, bool)> = sqlx::query_as(
            "SELECT service_id, port, destination_port, handlers, proxy FROM service_ports
             WHERE service_id = ANY($1) ORDER BY port",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
        let domain_rows: Vec<DomainRow> = sqlx::query_as(
            "SELECT d.service_id, d.name, d.custom, d.verification_token, d.verified_at IS NOT NULL, d.expires_at,
                    coalesce(d.expires_at <= now(), false),
                    d.verified_at IS NULL
                        AND EXISTS (SELECT 1 FROM domains v WHERE v.name = d.name AND v.verified_at IS NOT NULL)
             FROM domains d WHERE d.service_id = ANY($1) ORDER BY d.name",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
        let instance_rows: Vec<(Uuid, Uuid, String, String, IpAddr)> = sqlx::query_as(
            "SELECT service_id, id, name, state, private_ip FROM instances
             WHERE service_id = ANY($1) ORDER BY created_at, id",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;

        let mut by_id: HashMap<Uuid, Service> = HashMap::with_capacity(rows.len());
        for r in &rows {
            by_id.insert(
                r.id,
                Service {
                    id: r.id,
                    name: r.name.clone(),
                    fqdn: r.fqdn.clone(),
                    ports: Vec::new(),
                    soft_limit: r.soft_limit.map(|v| v as u32),
                    hard_limit: r.hard_limit.map(|v| v as u32),
                    scale_to_zero_after: r.scale_to_zero_after.map(|v| v as u32),
                    persistent: r.persistent,
                    autoscale: match (r.autoscale_min, r.autoscale_max, r.autoscale_target, r.autoscale_cooldown) {
                        (Some(min), Some(max), Some(target), Some(cooldown)) => Some(cloud_domain::api::Autoscale {
                            min: min as u32,
                            max: max as u32,
                            target_in_flight: target as u32,
                            cooldown_seconds: cooldown as u32,
                        }),
                        _ => None,
                    },
                    domains: Vec::new(),
                    instances: Vec::new(),
                    private_fqdn: format!("{}.internal", r.name),
                    created_at: r.created_at,
                    updated_at: r.updated_at,
                },
            );
        }
        for (sid, port, dest, handlers, proxy) in port_rows {
            if let Some(s) = by_id.get_mut(&sid) {
                let mut handlers: Vec<Handler> = handlers.iter().filter_map(|h| parse_handler(h)).collect();
                handlers.sort();
                s.ports.push(PortMapping { port: port as u16, destination_port: dest as u16, handlers, proxy });
            }
        }
        for (sid, name, custom, token, verified, expires_at, expired, taken) in domain_rows {
            if let Some(s) = by_id.get_mut(&sid) {
                let state = match (verified, expired, taken) {
                    (true, _, _) => DomainState::Verified,
                    (false, true, _) => DomainState::Expired,
                    (false, false, true) => DomainState::Taken,
                    (false, false, false) => DomainState::Pending,
                };
                let verification = (state == DomainState::Pending).then(|| DomainVerification {
                    txt_name: crate::domains::txt_name(&name),
                    txt_value: crate::domains::txt_value(&token),
                    cname_target: s.fqdn.clone(),
                });
                s.domains.push(Domain { name, custom, verified, state, expires_at, verification });
            }
        }
        for (sid, id, name, state, private_ip) in instance_rows {
            if let Some(s) = by_id.get_mut(&sid) {
                let state: InstanceState = state.parse().unwrap_or(InstanceState::Pending);
                s.instances.push(InstanceSummary { id, name, state, private_ip });
            }
        }
        Ok(rows.iter().filter_map(|r| by_id.remove(&r.id)).collect())
    }

    /// Resolves a service name or id of the tenant to (id, name, persistent), taking a row lock as asked.
    pub(crate) async fn service_id(
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
        key: &str,
        lock: RowLock,
    ) -> Result<(Uuid, String, bool), StoreError> {
        let services = Table { select: "SELECT id, name, persistent FROM services", alias: "" };
        let row: Option<(Uuid, String, bool)> = page::find(conn, services, Visible::Tenant(tenant), key, lock).await?;
        row.ok_or_else(|| StoreError::NotFound { kind: "service", key: key.to_owned() })
    }

    /// A service of the tenant by name or id.
    pub async fn service(&self, tenant: Uuid, key: &str) -> Result<Service, StoreError> {
        self.bounded(async {
            let mut conn = self.pool.acquire().await?;
            let (id, _, _) = Self::service_id(&mut conn, tenant, key, RowLock::None).await?;
            self.service_in(&mut conn, tenant, id).await
        })
        .await
    }

    /// A page of the tenant's services in creation order.
    pub async fn list_services(
        &self,
        tenant: Uuid,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Service>, Option<Cursor>), StoreError> {
        self.bounded(async {
            let mut conn = self.pool.acquire().await?;
            let services = Table { select: SELECT_SERVICE, alias: "" };
            let key = |r: &ServiceRow| Cursor { created_at: r.created_at, id: r.id };
            let (rows, next) = page::list(&mut *conn, services, Visible::Tenant(tenant), cursor, limit, key).await?;
            Ok((self.views(&mut conn, rows).await?, next))
        })
        .await
    }

    /// Changes a service.
    pub async fn update_service(&self, tenant: Uuid, key: &str, change: ServiceChange) -> Result<Service, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            if change.domains.is_some() {
                // The domain quota counts over the tenant's services; the tenant lock comes first, as in every
                // creation, so the two locks are always taken in one order.
                Self::lock_tenant(&mut tx, tenant).await?;
            }
            let (id, _, _) = Self::service_id(&mut tx, tenant, key, RowLock::Update).await?;
            let before = self.service_in(&mut tx, tenant, id).await?;
            let soft = change.soft_limit.unwrap_or(before.soft_limit);
            let hard = change.hard_limit.unwrap_or(before.hard_limit);
            check_limits(soft, hard)?;
            let idle = change.scale_to_zero_after.unwrap_or(before.scale_to_zero_after);
            sqlx::query(
                "UPDATE services SET soft_limit = $2, hard_limit = $3, scale_to_zero_after = $4, updated_at = now()
             WHERE id = $1",
            )
            .bind(id)
            .bind(soft.map(|v| int_column("soft_limit", v)).transpose()?)
            .bind(hard.map(|v| int_column("hard_limit", v)).transpose()?)
            .bind(idle.map(|v| int_column("scale_to_zero_after", v)).transpose()?)
            .execute(&mut *tx)
            .await?;
            if let Some(ports) = &change.ports {
                sqlx::query("DELETE FROM service_ports WHERE service_id = $1").bind(id).execute(&mut *tx).await?;
                self.insert_ports(&mut tx, id, ports, &before.ports).await?;
            }
            let mut released = Vec::new();
            if let Some(domains) = &change.domains {
                // Keep the records (verification state, token, expiry) of domains that stay; a lapsed claim listed
                // again is claimed anew.
                let keep: Vec<&str> = domains.iter().map(|(n, _)| n.as_str()).collect();
                let removed: Vec<(String, bool)> = sqlx::query_as(
                    "DELETE FROM domains WHERE service_id = $1
                     AND (NOT (name = ANY($2)) OR (verified_at IS NULL AND expires_at <= now()))
                 RETURNING name, verified_at IS NOT NULL",
                )
                .bind(id)
                .bind(&keep)
                .fetch_all(&mut *tx)
                .await?;
                released = removed.into_iter().filter(|(_, verified)| *verified).map(|(n, _)| n).collect();
                let existing: Vec<(String,)> = sqlx::query_as("SELECT name FROM domains WHERE service_id = $1")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
                let existing: BTreeSet<String> = existing.into_iter().map(|(n,)| n).collect();
                let new: Vec<(String, bool)> = domains.iter().filter(|(n, _)| !existing.contains(n)).cloned().collect();
                self.insert_domains(&mut tx, tenant, id, &new).await?;
            }
            let service = self.service_in(&mut tx, tenant, id).await?;
            record_event(&mut tx, Some(tenant), "service", id, EventAction::Updated, &service).await?;
            // Names this service let go are free for the tenants still claiming them.
            self.touch_claimants(&mut tx, &released, id).await?;
            tx.commit().await?;
            Ok(service)
        })
        .await
    }

    /// Deletes a service. With instances, a persistent service is refused unless `force`, which deletes them too.
    pub async fn delete_service(&self, tenant: Uuid, key: &str, force: bool) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let (id, name, _) = Self::service_id(&mut tx, tenant, key, RowLock::Update).await?;
            let service = self.service_in(&mut tx, tenant, id).await?;
            if !service.instances.is_empty() {
                if !force {
                    return Err(StoreError::ServiceHasInstances { name, count: service.instances.len() as i64 });
                }
                let ids: Vec<Uuid> = service.instances.iter().map(|i| i.id).collect();
                self.delete_instances_in(&mut tx, tenant, &ids).await?;
            }
            sqlx::query("DELETE FROM services WHERE id = $1").bind(id).execute(&mut *tx).await?;
            record_event(&mut tx, Some(tenant), "service", id, EventAction::Deleted, &service).await?;
            let released: Vec<String> =
                service.domains.iter().filter(|d| d.custom && d.verified).map(|d| d.name.clone()).collect();
            self.touch_claimants(&mut tx, &released, id).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Deletes the service inside the caller's transaction when it is ephemeral and has no instances left.
    pub(crate) async fn reap_ephemeral(
        &self,
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
        service: Uuid,
    ) -> Result<(), StoreError> {
        let row: Option<(bool, i64)> = sqlx::query_as(
            "SELECT s.persistent, (SELECT count(*) FROM instances i WHERE i.service_id = s.id)
             FROM services s WHERE s.id = $1 FOR UPDATE",
        )
        .bind(service)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((false, 0)) = row {
            let view = self.service_in(conn, tenant, service).await?;
            sqlx::query("DELETE FROM services WHERE id = $1").bind(service).execute(&mut *conn).await?;
            record_event(conn, Some(tenant), "service", service, EventAction::Deleted, &view).await?;
            let released: Vec<String> =
                view.domains.iter().filter(|d| d.custom && d.verified).map(|d| d.name.clone()).collect();
            self.touch_claimants(conn, &released, service).await?;
        }
        Ok(())
    }
}

pub(crate) fn parse_handler(s: &str) -> Option<Handler> {
    match s {
        "tls" => Some(Handler::Tls),
        "http" => Some(Handler::Http),
        "redirect" => Some(Handler::Redirect),
        "tcp" => Some(Handler::Tcp),
        _ => None,
    }
}
