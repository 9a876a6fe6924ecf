//! What the authoritative DNS serves, read in one consistent snapshot: service FQDNs, verified platform
//! subdomains, tenants' networks, instances' private IPs and ACME challenge records.
//!
//! The DNS role keeps the result in memory and reloads it when the change feed moves; the version returned with
//! the data is the newest change the data includes, so the zone serial can be derived from it.

use std::net::IpAddr;

use cloud_domain::api::EventAction;
use ipnet::Ipv4Net;
use sha2::Digest;
use uuid::Uuid;

use crate::{Store, StoreError, record_event};

/// Everything the DNS role serves, as of `version`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZoneData {
    /// The newest change-feed version the data includes.
    pub version: i64,
    /// Every tenant and its private network.
    pub tenants: Vec<ZoneTenant>,
    /// Every service.
    pub services: Vec<ZoneService>,
    /// Verified platform subdomains (custom = false), inside the public zone.
    pub domains: Vec<String>,
    /// Verified custom domains: each is a zone of its own, served when its owner delegates it to us.
    pub custom_domains: Vec<String>,
    /// Every instance that has not been deleted.
    pub instances: Vec<ZoneInstance>,
    /// ACME challenge records: (name, TXT value).
    pub acme_challenges: Vec<(String, String)>,
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
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Service name, the label of `<service>.internal`.
    pub name: String,
    /// Public FQDN, without the trailing dot.
    pub fqdn: String,
}

/// An instance as the private zone needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneInstance {
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Instance name.
    pub name: String,
    /// Its service's name, if any.
    pub service: Option<String>,
    /// Private IP.
    pub private_ip: IpAddr,
    /// Observed running: only those are listed under `<service>.internal`.
    pub running: bool,
}

impl Store {
    /// Loads everything the DNS serves from one repeatable-read snapshot.
    pub async fn zone_data(&self) -> Result<ZoneData, StoreError> {
        let (mut tx, version) = self.begin_snapshot().await?;
        let tenants: Vec<(Uuid, String, String)> =
            sqlx::query_as("SELECT id, name, network::text FROM tenants ORDER BY id").fetch_all(&mut *tx).await?;
        let services: Vec<(Uuid, String, String)> =
            sqlx::query_as("SELECT tenant_id, name, fqdn FROM services ORDER BY fqdn").fetch_all(&mut *tx).await?;
        let domains: Vec<(String, bool)> =
            sqlx::query_as("SELECT name, custom FROM domains WHERE verified_at IS NOT NULL ORDER BY name")
                .fetch_all(&mut *tx)
                .await?;
        let (custom, platform): (Vec<_>, Vec<_>) = domains.into_iter().partition(|(_, custom)| *custom);
        let instances: Vec<(Uuid, String, Option<String>, IpAddr, String)> = sqlx::query_as(
            "SELECT i.tenant_id, i.name, s.name, i.private_ip, i.state FROM instances i
             LEFT JOIN services s ON s.id = i.service_id
             WHERE i.state <> 'deleted' ORDER BY i.tenant_id, i.name",
        )
        .fetch_all(&mut *tx)
        .await?;
        let acme_challenges: Vec<(String, String)> =
            sqlx::query_as("SELECT name, value FROM acme_challenges ORDER BY name, value").fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(ZoneData {
            version,
            tenants: tenants
                .into_iter()
                .filter_map(|(id, name, network)| match network.parse() {
                    Ok(network) => Some(ZoneTenant { id, name, network }),
                    // The column is an IPv4 cidr by construction; a row we cannot read is skipped, not fatal.
                    Err(_) => {
                        tracing::warn!(tenant = %id, network, "zone data: unreadable tenant network skipped");
                        None
                    }
                })
                .collect(),
            services: services
                .into_iter()
                .map(|(tenant_id, name, fqdn)| ZoneService { tenant_id, name, fqdn })
                .collect(),
            domains: platform.into_iter().map(|(d, _)| d).collect(),
            custom_domains: custom.into_iter().map(|(d, _)| d).collect(),
            instances: instances
                .into_iter()
                .map(|(tenant_id, name, service, private_ip, state)| ZoneInstance {
                    tenant_id,
                    name,
                    service,
                    private_ip,
                    running: state == "running",
                })
                .collect(),
            acme_challenges,
        })
    }

    /// Publishes an ACME dns-01 TXT record (`name` is the full `_acme-challenge.<domain>`, no trailing dot).
    /// Publishing the same pair twice is a no-op.
    pub async fn put_acme_challenge(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.change_acme_challenge(name, value, true).await
    }

    /// Withdraws an ACME dns-01 TXT record; withdrawing an absent record is a no-op.
    pub async fn remove_acme_challenge(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.change_acme_challenge(name, value, false).await
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
