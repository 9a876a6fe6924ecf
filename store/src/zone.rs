//! What the authoritative DNS serves, read in one consistent snapshot: service FQDNs and verified domains,
//! tenants' networks, instances' private IPs and ACME challenge records.
//!
//! The DNS role loads everything once ([`Store::zone_data`]) and then only what changed ([`Store::zone_changes`]):
//! the tenants, services, instances and challenge names touched by the events after the version it holds, re-read
//! in the same snapshot as those events, so the cost of a change is proportional to the change, not to the
//! platform. The version returned with the data is the newest change it includes, so the zone serial can be
//! derived from it.

use std::net::IpAddr;

use cloud_domain::api::EventAction;
use ipnet::Ipv4Net;
use sha2::Digest;
use uuid::Uuid;

use crate::{Store, StoreError, record_event};

/// More events than this since the version held and the DNS loads everything instead: past some point one
/// full read is cheaper than many small ones, and a patch that large is not a small change anyway.
const MAX_EVENTS_PER_CHANGE: i64 = 10_000;

/// Everything the DNS role serves, as of `version`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZoneData {
    /// The newest change-feed version the data includes.
    pub version: i64,
    /// Every tenant and its private network.
    pub tenants: Vec<ZoneTenant>,
    /// Every service, with its verified domains.
    pub services: Vec<ZoneService>,
    /// Every instance that has not been deleted.
    pub instances: Vec<ZoneInstance>,
    /// ACME challenge records: (name, TXT value).
    pub acme_challenges: Vec<(String, String)>,
}

/// What changed after a version: the touched resources as they are now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneChanges {
    /// Too much changed, or the history cannot be followed (the database went back in time): load everything.
    Reload(ZoneData),
    /// The touched resources as of the patch's version.
    Patch(ZonePatch),
}

/// The resources touched by the events after a version, read in the same snapshot as the events. Every touched
/// resource is either present (as it is now) or gone; untouched ones are unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZonePatch {
    /// The newest change-feed version the patch includes (events of resources the DNS ignores move it too).
    pub version: i64,
    /// Touched tenants that exist.
    pub tenants: Vec<ZoneTenant>,
    /// Touched tenants that no longer exist.
    pub gone_tenants: Vec<Uuid>,
    /// Touched services that exist, with their verified domains.
    pub services: Vec<ZoneService>,
    /// Touched services that no longer exist.
    pub gone_services: Vec<Uuid>,
    /// Touched instances that exist and are not deleted.
    pub instances: Vec<ZoneInstance>,
    /// Touched instances that no longer exist (or are deleted).
    pub gone_instances: Vec<Uuid>,
    /// Every touched challenge name with all the values it has now (none when the last one was withdrawn).
    pub acme_challenges: Vec<(String, Vec<String>)>,
}

/// A tenant as the private zone needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneTenant {
    /// Tenant id.
    pub id: Uuid,
    /// Tenant name, the label of `<instance>.<tenant>.internal`.
    pub name: String,
    /// The tenant's private network: a source address inside it identifies the tenant.
    pub network: Ipv4Net,
}

/// A service as the zones need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneService {
    /// Service id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Service name, the label of `<service>.internal`.
    pub name: String,
    /// Public FQDN, without the trailing dot.
    pub fqdn: String,
    /// Its verified domains, by name.
    pub domains: Vec<ZoneDomain>,
}

/// A verified domain of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneDomain {
    /// The domain, without the trailing dot.
    pub name: String,
    /// A custom domain is a zone of its own, served when its owner delegates it to us; a platform subdomain
    /// (`false`) is a name inside the public zone.
    pub custom: bool,
}

/// An instance as the private zone needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneInstance {
    /// Instance id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Instance name.
    pub name: String,
    /// Its service, if any.
    pub service_id: Option<Uuid>,
    /// Private IP.
    pub private_ip: IpAddr,
    /// Observed running: only those are listed under `<service>.internal`.
    pub running: bool,
}

/// Which rows a read covers: all of them (a full load) or the touched ones (a patch). Two statements rather
/// than one with `$1 IS NULL OR id = ANY($1)`, so a cached generic plan can never turn a patch into a full scan.
#[derive(Clone, Copy)]
enum Rows<'a> {
    All,
    Only(&'a [Uuid]),
}

/// Runs a read, binding the ids as `$1` for [`Rows::Only`].
async fn fetch<T>(tx: &mut sqlx::PgConnection, sql: &'static str, rows: Rows<'_>) -> Result<Vec<T>, StoreError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let query = sqlx::query_as(sql);
    let query = match rows {
        Rows::All => query,
        Rows::Only(ids) => query.bind(ids),
    };
    Ok(query.fetch_all(tx).await?)
}

impl Store {
    /// Loads everything the DNS serves from one repeatable-read snapshot.
    pub async fn zone_data(&self) -> Result<ZoneData, StoreError> {
        let (mut tx, version) = self.begin_snapshot().await?;
        let data = read_all(&mut tx, version).await?;
        tx.commit().await?;
        Ok(data)
    }

    /// The resources touched by the events after `since`, read in the same snapshot as the events; everything
    /// when too many events passed or the database holds less history than `since` (restored from a backup).
    pub async fn zone_changes(&self, since: i64) -> Result<ZoneChanges, StoreError> {
        let (mut tx, version) = self.begin_snapshot().await?;
        // Only the challenge name is needed from payloads: instance payloads are large and many.
        let events: Vec<(String, Uuid, Option<String>)> = sqlx::query_as(
            "SELECT resource_type, resource_id, payload->>'name' FROM events WHERE version > $1 AND version <= $2
             ORDER BY version LIMIT $3",
        )
        .bind(since)
        .bind(version)
        .bind(MAX_EVENTS_PER_CHANGE + 1)
        .fetch_all(&mut *tx)
        .await?;
        let mut reload = version < since || events.len() as i64 > MAX_EVENTS_PER_CHANGE;
        let (mut tenants, mut services, mut instances, mut challenges) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (kind, id, name) in events {
            match kind.as_str() {
                "tenant" => tenants.push(id),
                // Domains are verified and changed through their service, whose event covers them.
                "service" => services.push(id),
                "instance" => instances.push(id),
                "acme_challenge" => match name {
                    Some(name) => challenges.push(name),
                    None => reload = true,
                },
                // Images, tokens and the like are not in any zone. A new kind of resource that is must be added
                // here; until it is, the periodic full resync is what serves it.
                _ => {}
            }
        }
        if reload {
            let data = read_all(&mut tx, version).await?;
            tx.commit().await?;
            return Ok(ZoneChanges::Reload(data));
        }
        for ids in [&mut tenants, &mut services, &mut instances] {
            ids.sort_unstable();
            ids.dedup();
        }
        challenges.sort_unstable();
        challenges.dedup();
        let mut patch = ZonePatch { version, ..ZonePatch::default() };
        if !tenants.is_empty() {
            patch.tenants = read_tenants(&mut tx, Rows::Only(&tenants)).await?;
            patch.gone_tenants = gone(&tenants, patch.tenants.iter().map(|t| t.id));
        }
        if !services.is_empty() {
            patch.services = read_services(&mut tx, Rows::Only(&services)).await?;
            patch.gone_services = gone(&services, patch.services.iter().map(|s| s.id));
        }
        if !instances.is_empty() {
            patch.instances = read_instances(&mut tx, Rows::Only(&instances)).await?;
            patch.gone_instances = gone(&instances, patch.instances.iter().map(|i| i.id));
        }
        if !challenges.is_empty() {
            let values: Vec<(String, String)> =
                sqlx::query_as("SELECT name, value FROM acme_challenges WHERE name = ANY($1) ORDER BY name, value")
                    .bind(&challenges)
                    .fetch_all(&mut *tx)
                    .await?;
            let mut by_name: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
            for (name, value) in values {
                by_name.entry(name).or_default().push(value);
            }
            patch.acme_challenges = challenges
                .into_iter()
                .map(|name| {
                    let values = by_name.remove(&name).unwrap_or_default();
                    (name, values)
                })
                .collect();
        }
        tx.commit().await?;
        Ok(ZoneChanges::Patch(patch))
    }

    /// Publishes an ACME dns-01 TXT record (`name` is the full `_acme-challenge.<domain>`, no trailing dot).
    /// Publishing the same pair twice is a no-op.
    pub async fn put_acme_challenge(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.bounded(async { self.change_acme_challenge(name, value, true).await }).await
    }

    /// Withdraws an ACME dns-01 TXT record; withdrawing an absent record is a no-op.
    pub async fn remove_acme_challenge(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.bounded(async { self.change_acme_challenge(name, value, false).await }).await
    }

    async fn change_acme_challenge(&self, name: &str, value: &str, put: bool) -> Result<(), StoreError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 || value.is_empty() || value.len() > 255 {
            return Err(StoreError::Invalid(format!("invalid ACME challenge record \"{name}\"")));
        }
        let mut tx = self.pool.begin().await?;
        let changed = if put {
            sqlx::query("INSERT INTO acme_challenges (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        } else {
            sqlx::query("DELETE FROM acme_challenges WHERE name = $1 AND value = $2")
        }
        .bind(&name)
        .bind(value)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if changed {
            // The change feed is how DNS replicas learn about the record; the id is derived from the pair so a
            // put and its removal are the same resource.
            let digest = sha2::Sha256::digest(format!("{name} {value}").as_bytes());
            let mut id = [0u8; 16];
            id.copy_from_slice(&digest[..16]);
            let id = Uuid::from_bytes(id);
            let action = if put { EventAction::Created } else { EventAction::Deleted };
            let payload = serde_json::json!({ "name": name, "value": value });
            record_event(&mut tx, None, "acme_challenge", id, action, &payload).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The ids of `touched` that are not in `present` (`touched` is sorted).
fn gone(touched: &[Uuid], present: impl Iterator<Item = Uuid>) -> Vec<Uuid> {
    let present: std::collections::HashSet<Uuid> = present.collect();
    touched.iter().filter(|id| !present.contains(id)).copied().collect()
}

async fn read_all(tx: &mut sqlx::PgConnection, version: i64) -> Result<ZoneData, StoreError> {
    let tenants = read_tenants(tx, Rows::All).await?;
    let services = read_services(tx, Rows::All).await?;
    let instances = read_instances(tx, Rows::All).await?;
    let acme_challenges: Vec<(String, String)> =
        sqlx::query_as("SELECT name, value FROM acme_challenges ORDER BY name, value").fetch_all(&mut *tx).await?;
    Ok(ZoneData { version, tenants, services, instances, acme_challenges })
}

async fn read_tenants(tx: &mut sqlx::PgConnection, rows: Rows<'_>) -> Result<Vec<ZoneTenant>, StoreError> {
    let sql = match rows {
        Rows::All => "SELECT id, name, network::text FROM tenants ORDER BY id",
        Rows::Only(_) => "SELECT id, name, network::text FROM tenants WHERE id = ANY($1) ORDER BY id",
    };
    let found: Vec<(Uuid, String, String)> = fetch(tx, sql, rows).await?;
    Ok(found
        .into_iter()
        .filter_map(|(id, name, network)| match network.parse() {
            Ok(network) => Some(ZoneTenant { id, name, network }),
            // The column is an IPv4 cidr by construction; a row we cannot read is skipped, not fatal.
            Err(_) => {
                tracing::warn!(tenant = %id, network, "zone data: unreadable tenant network skipped");
                None
            }
        })
        .collect())
}

async fn read_services(tx: &mut sqlx::PgConnection, rows: Rows<'_>) -> Result<Vec<ZoneService>, StoreError> {
    let (services_sql, domains_sql) = match rows {
        Rows::All => (
            "SELECT id, tenant_id, name, fqdn FROM services ORDER BY id",
            "SELECT service_id, name, custom FROM domains WHERE verified_at IS NOT NULL ORDER BY service_id, name",
        ),
        Rows::Only(_) => (
            "SELECT id, tenant_id, name, fqdn FROM services WHERE id = ANY($1) ORDER BY id",
            "SELECT service_id, name, custom FROM domains WHERE verified_at IS NOT NULL AND service_id = ANY($1)
             ORDER BY service_id, name",
        ),
    };
    let found: Vec<(Uuid, Uuid, String, String)> = fetch(tx, services_sql, rows).await?;
    let domains: Vec<(Uuid, String, bool)> = fetch(tx, domains_sql, rows).await?;
    let mut services: Vec<ZoneService> = found
        .into_iter()
        .map(|(id, tenant_id, name, fqdn)| ZoneService { id, tenant_id, name, fqdn, domains: Vec::new() })
        .collect();
    // Both lists are ordered by service id: attach by binary search.
    for (service_id, name, custom) in domains {
        if let Ok(i) = services.binary_search_by(|s| s.id.cmp(&service_id)) {
            services[i].domains.push(ZoneDomain { name, custom });
        }
    }
    Ok(services)
}

async fn read_instances(tx: &mut sqlx::PgConnection, rows: Rows<'_>) -> Result<Vec<ZoneInstance>, StoreError> {
    let sql = match rows {
        Rows::All => {
            "SELECT id, tenant_id, name, service_id, private_ip, state FROM instances WHERE state <> 'deleted'
             ORDER BY tenant_id, name"
        }
        Rows::Only(_) => {
            "SELECT id, tenant_id, name, service_id, private_ip, state FROM instances
             WHERE id = ANY($1) AND state <> 'deleted' ORDER BY tenant_id, name"
        }
    };
    let found: Vec<(Uuid, Uuid, String, Option<Uuid>, IpAddr, String)> = fetch(tx, sql, rows).await?;
    Ok(found
        .into_iter()
        .map(|(id, tenant_id, name, service_id, private_ip, state)| ZoneInstance {
            id,
            tenant_id,
            name,
            service_id,
            private_ip,
            running: state == "running",
        })
        .collect())
}
