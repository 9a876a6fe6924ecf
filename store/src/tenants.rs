//! Tenants, their private networks and quotas.

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, Quotas, QuotasPatch, Tenant, Usage};
use cloud_domain::ipam;
use ipnet::Ipv4Net;
use uuid::Uuid;

use crate::page::{self, Cursor, RowLock, Table, Visible};
use crate::{Store, StoreError, bigint_column, int_column, record_event, violated_constraint};

#[derive(sqlx::FromRow)]
struct TenantRow {
    id: Uuid,
    name: String,
    network: String,
    max_services: i32,
    max_instances: i32,
    max_memory_mb: i64,
    max_images: i32,
    max_domains: i32,
    created_at: DateTime<Utc>,
    services: i64,
    instances: i64,
    memory_mb: i64,
    images: i64,
    domains: i64,
}

const SELECT_TENANT: &str = "SELECT t.id, t.name, t.network::text AS network, t.max_services, t.max_instances,
        t.max_memory_mb, t.max_images, t.max_domains, t.created_at,
        (SELECT count(*) FROM services s WHERE s.tenant_id = t.id) AS services,
        (SELECT count(*) FROM instances i WHERE i.tenant_id = t.id) AS instances,
        (SELECT coalesce(sum(i.memory_mb), 0)::bigint FROM instances i WHERE i.tenant_id = t.id) AS memory_mb,
        (SELECT count(*) FROM images m WHERE m.tenant_id = t.id) AS images,
        (SELECT count(*) FROM domains d
         WHERE d.tenant_id = t.id AND (d.verified_at IS NOT NULL OR d.expires_at > now())) AS domains
    FROM tenants t";
const TENANTS: Table = Table { select: SELECT_TENANT, alias: "t." };

impl From<TenantRow> for Tenant {
    fn from(r: TenantRow) -> Self {
        Tenant {
            id: r.id,
            name: r.name,
            network: r.network,
            quotas: Quotas {
                max_services: r.max_services as u32,
                max_instances: r.max_instances as u32,
                max_memory_mb: r.max_memory_mb as u64,
                max_images: r.max_images as u32,
                max_domains: r.max_domains as u32,
            },
            usage: Usage {
                services: r.services as u32,
                instances: r.instances as u32,
                memory_mb: r.memory_mb as u64,
                images: r.images as u32,
                domains: r.domains as u32,
            },
            created_at: r.created_at,
        }
    }
}

impl Store {
    /// Creates a tenant with its own private network carved from the platform pool.
    pub async fn create_tenant(&self, name: &str, quotas: QuotasPatch) -> Result<Tenant, StoreError> {
        self.bounded(async {
            let q = quotas.apply(Quotas::default());
            // Two replicas may pick the same free subnet; the exclusion constraint refuses the loser, which retries.
            for _ in 0..8 {
                let used: Vec<(String,)> =
                    sqlx::query_as("SELECT network::text FROM tenants").fetch_all(&self.pool).await?;
                let used: Vec<Ipv4Net> = used.iter().filter_map(|(n,)| n.parse().ok()).collect();
                let Some(network) =
                    ipam::next_free_subnet(self.settings.tenant_pool, self.settings.tenant_prefix, &used)
                else {
                    return Err(StoreError::CapacityExhausted { what: "tenant networks" });
                };
                let id = Uuid::new_v4();
                let mut tx = self.pool.begin().await?;
                let inserted = sqlx::query(
                    "INSERT INTO tenants (id, name, network, max_services, max_instances, max_memory_mb, max_images,
                                      max_domains)
                 VALUES ($1, $2, $3::cidr, $4, $5, $6, $7, $8)",
                )
                .bind(id)
                .bind(name)
                .bind(network.to_string())
                .bind(int_column("quotas.max_services", q.max_services)?)
                .bind(int_column("quotas.max_instances", q.max_instances)?)
                .bind(bigint_column("quotas.max_memory_mb", q.max_memory_mb)?)
                .bind(int_column("quotas.max_images", q.max_images)?)
                .bind(int_column("quotas.max_domains", q.max_domains)?)
                .execute(&mut *tx)
                .await;
                match inserted {
                    Ok(_) => {}
                    Err(e) => match violated_constraint(&e).as_deref() {
                        Some("tenants_name_key") => {
                            return Err(StoreError::AlreadyExists { kind: "tenant", name: name.to_owned() });
                        }
                        Some("tenants_network_disjoint") => continue,
                        _ => return Err(e.into()),
                    },
                }
                let tenant = Self::tenant_in(&mut tx, id).await?;
                record_event(&mut tx, Some(id), "tenant", id, EventAction::Created, &tenant).await?;
                tx.commit().await?;
                return Ok(tenant);
            }
            Err(StoreError::CapacityExhausted { what: "tenant networks (too much contention)" })
        })
        .await
    }

    async fn tenant_in(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<Tenant, StoreError> {
        let row: TenantRow = sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_TENANT} WHERE t.id = $1")))
            .bind(id)
            .fetch_one(conn)
            .await?;
        Ok(row.into())
    }

    /// A tenant by name or id.
    pub async fn tenant(&self, key: &str) -> Result<Tenant, StoreError> {
        self.bounded(async {
            let row: Option<TenantRow> = page::find(&self.pool, TENANTS, Visible::All, key, RowLock::None).await?;
            row.map(Tenant::from).ok_or_else(|| StoreError::NotFound { kind: "tenant", key: key.to_owned() })
        })
        .await
    }

    /// A page of tenants in creation order.
    pub async fn list_tenants(
        &self,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Tenant>, Option<Cursor>), StoreError> {
        self.bounded(async {
            let key = |r: &TenantRow| Cursor { created_at: r.created_at, id: r.id };
            let (rows, next) = page::list(&self.pool, TENANTS, Visible::All, cursor, limit, key).await?;
            Ok((rows.into_iter().map(Tenant::from).collect(), next))
        })
        .await
    }

    /// Changes a tenant's quotas. Lowering a quota below current use is allowed: it only blocks new resources.
    pub async fn update_tenant(&self, key: &str, quotas: QuotasPatch) -> Result<Tenant, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let current = self.tenant(key).await?;
            let q = quotas.apply(current.quotas);
            sqlx::query(
                "UPDATE tenants SET max_services = $2, max_instances = $3, max_memory_mb = $4, max_images = $5,
                 max_domains = $6, updated_at = now() WHERE id = $1",
            )
            .bind(current.id)
            .bind(int_column("quotas.max_services", q.max_services)?)
            .bind(int_column("quotas.max_instances", q.max_instances)?)
            .bind(bigint_column("quotas.max_memory_mb", q.max_memory_mb)?)
            .bind(int_column("quotas.max_images", q.max_images)?)
            .bind(int_column("quotas.max_domains", q.max_domains)?)
            .execute(&mut *tx)
            .await?;
            let tenant = Self::tenant_in(&mut tx, current.id).await?;
            record_event(&mut tx, Some(tenant.id), "tenant", tenant.id, EventAction::Updated, &tenant).await?;
            tx.commit().await?;
            Ok(tenant)
        })
        .await
    }

    /// Deletes an empty tenant and its tokens.
    pub async fn delete_tenant(&self, key: &str) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let tenant = self.tenant(key).await?;
            sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE").bind(tenant.id).execute(&mut *tx).await?;
            let tenant = Self::tenant_in(&mut tx, tenant.id).await?;
            let u = tenant.usage;
            let mut left = Vec::new();
            for (n, what) in [(u.services, "service(s)"), (u.instances, "instance(s)"), (u.images, "image(s)")] {
                if n > 0 {
                    left.push(format!("{n} {what}"));
                }
            }
            if !left.is_empty() {
                return Err(StoreError::TenantNotEmpty { name: tenant.name, what: left.join(", ") });
            }
            sqlx::query("DELETE FROM tenants WHERE id = $1").bind(tenant.id).execute(&mut *tx).await?;
            record_event(&mut tx, Some(tenant.id), "tenant", tenant.id, EventAction::Deleted, &tenant).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Locks the tenant row for the rest of the transaction and returns its quotas and network. Creations that
    /// count against quotas or allocate addresses take this lock, so concurrent requests cannot both pass a check
    /// that only one of them may.
    pub(crate) async fn lock_tenant(
        conn: &mut sqlx::PgConnection,
        tenant: Uuid,
    ) -> Result<(Quotas, Ipv4Net, String), StoreError> {
        let row: Option<(i32, i32, i64, i32, i32, String, String)> = sqlx::query_as(
            "SELECT max_services, max_instances, max_memory_mb, max_images, max_domains, network::text, name
             FROM tenants WHERE id = $1 FOR UPDATE",
        )
        .bind(tenant)
        .fetch_optional(conn)
        .await?;
        let (s, i, m, im, d, net, name) =
            row.ok_or_else(|| StoreError::NotFound { kind: "tenant", key: tenant.to_string() })?;
        let network = net.parse().map_err(|_| StoreError::Invalid(format!("tenant network {net} is not IPv4")))?;
        let quotas = Quotas {
            max_services: s as u32,
            max_instances: i as u32,
            max_memory_mb: m as u64,
            max_images: im as u32,
            max_domains: d as u32,
        };
        Ok((quotas, network, name))
    }
}
