//! Custom domains waiting for their ownership proof, and recording that proof. The check itself (a DNS lookup)
//! belongs to the certificate role; this module only reads and writes the state.

use uuid::Uuid;

use crate::{Store, StoreError, as_uuid, record_event};
use cloud_domain::api::EventAction;

/// A custom domain not verified yet, with what proves its ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDomain {
    /// The domain's record id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant_id: Uuid,
    /// The service it is attached to.
    pub service_id: Uuid,
    /// The domain, e.g. `www.example.com` or `*.example.com`.
    pub name: String,
    /// The secret the owner publishes.
    pub token: String,
    /// Whether it is verified already.
    pub verified: bool,
}

impl PendingDomain {
    /// The TXT record that proves ownership: `_cloud-challenge.<domain>` (a wildcard's base name).
    pub fn txt_name(&self) -> String {
        txt_name(&self.name)
    }

    /// The value that record must hold.
    pub fn txt_value(&self) -> String {
        txt_value(&self.token)
    }
}

/// The TXT record name that proves ownership of `domain`.
pub fn txt_name(domain: &str) -> String {
    format!("_cloud-challenge.{}", domain.trim_start_matches("*."))
}

/// The TXT value that proves ownership, for a domain's token.
pub fn txt_value(token: &str) -> String {
    format!("cloud-verify={token}")
}

type Row = (Uuid, Uuid, Uuid, String, String, bool);

fn pending((id, tenant_id, service_id, name, token, verified): Row) -> PendingDomain {
    PendingDomain { id, tenant_id, service_id, name, token, verified }
}

impl Store {
    /// Unverified custom domains, oldest first, at most `limit`.
    pub async fn unverified_domains(&self, limit: i64) -> Result<Vec<PendingDomain>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, tenant_id, service_id, name, verification_token, false FROM domains
             WHERE custom AND verified_at IS NULL ORDER BY created_at, id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(pending).collect())
    }

    /// A custom domain of a tenant's service (by name or id), verified or not; another tenant's is not found.
    pub async fn service_domain(&self, tenant: Uuid, service: &str, domain: &str) -> Result<PendingDomain, StoreError> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let row: Option<Row> = sqlx::query_as(
            "SELECT d.id, d.tenant_id, d.service_id, d.name, d.verification_token, d.verified_at IS NOT NULL
             FROM domains d JOIN services s ON s.id = d.service_id AND s.tenant_id = d.tenant_id
             WHERE d.tenant_id = $1 AND (s.name = $2 OR s.id = $3) AND d.name = $4 AND d.custom",
        )
        .bind(tenant)
        .bind(service)
        .bind(as_uuid(service))
        .bind(&domain)
        .fetch_optional(&self.pool)
        .await?;
        row.map(pending)
            .ok_or_else(|| StoreError::NotFound { kind: "domain", key: format!("{domain} (of service {service})") })
    }

    /// A custom domain of any of the tenant's services; another tenant's is not found.
    pub async fn tenant_domain(&self, tenant: Uuid, domain: &str) -> Result<PendingDomain, StoreError> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, tenant_id, service_id, name, verification_token, verified_at IS NOT NULL FROM domains
             WHERE tenant_id = $1 AND name = $2 AND custom",
        )
        .bind(tenant)
        .bind(&domain)
        .fetch_optional(&self.pool)
        .await?;
        row.map(pending).ok_or_else(|| StoreError::NotFound {
            kind: "domain",
            key: format!("{domain} (no service of this tenant has it as a custom domain)"),
        })
    }

    /// Records that a domain's ownership was proven. The service changes (the edge starts routing the domain,
    /// the DNS serves it), so it is an event like any update. Idempotent.
    pub async fn mark_domain_verified(&self, domain: Uuid) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(Uuid, Uuid)> = sqlx::query_as(
            "UPDATE domains SET verified_at = now() WHERE id = $1 AND verified_at IS NULL
             RETURNING tenant_id, service_id",
        )
        .bind(domain)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((tenant, service)) = row {
            let view = self.service_in(&mut tx, tenant, service).await?;
            record_event(&mut tx, Some(tenant), "service", service, EventAction::Updated, &view).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
