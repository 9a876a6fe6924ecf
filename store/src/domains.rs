//! Custom-domain claims waiting for their ownership proof, and recording that proof. The check itself (a DNS
//! lookup) belongs to the certificate role; this module only reads and writes the state.
//!
//! A claim holds nothing until proven: tenants may claim the same name, and the first proof wins (the unique index
//! `domains_verified_name` decides races). Unverified claims lapse at `expires_at` and are removed by the
//! verifier's passes.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use uuid::Uuid;

use crate::page;
use crate::{Store, StoreError, record_event, violated_constraint};
use cloud_domain::api::EventAction;

/// A custom domain claim, with what proves its ownership.
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
    /// When the claim lapses unless verified (none once verified).
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether it lapsed.
    pub expired: bool,
    /// Whether another tenant verified the name: this claim cannot be verified while that lasts.
    pub taken: bool,
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

    /// Why this claim cannot be verified whatever its TXT record holds: another tenant verified the name, or the
    /// claim lapsed. The store enforces both again when recording a proof.
    pub fn unverifiable(&self) -> Option<StoreError> {
        if self.verified {
            None
        } else if self.taken {
            Some(StoreError::DomainTaken { name: self.name.clone(), why: VERIFIED_ELSEWHERE })
        } else if self.expired {
            Some(StoreError::ClaimExpired { name: self.name.clone() })
        } else {
            None
        }
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

/// The columns of a [`PendingDomain`], from `domains d`.
const COLUMNS: &str = "d.id, d.tenant_id, d.service_id, d.name, d.verification_token, d.verified_at IS NOT NULL,
    d.expires_at, coalesce(d.expires_at <= now(), false),
    d.verified_at IS NULL AND EXISTS (SELECT 1 FROM domains v WHERE v.name = d.name AND v.verified_at IS NOT NULL)";

type Row = (Uuid, Uuid, Uuid, String, String, bool, Option<DateTime<Utc>>, bool, bool);

fn pending((id, tenant_id, service_id, name, token, verified, expires_at, expired, taken): Row) -> PendingDomain {
    PendingDomain { id, tenant_id, service_id, name, token, verified, expires_at, expired, taken }
}

/// Why another holder keeps a tenant from a name.
pub(crate) const VERIFIED_ELSEWHERE: &str = "is verified by another tenant";

impl Store {
    /// Takes the `limit` live, unverified, untaken claims checked least recently (a new claim counts as checked
    /// when it was made) and marks them checked now. The claims thus form one queue whatever their age or tenant:
    /// with N pending, each is checked within ceil(N / limit) calls, and replicas calling at once take different
    /// claims.
    pub async fn claims_to_check(&self, limit: i64) -> Result<Vec<PendingDomain>, StoreError> {
        self.bounded(async {
            let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "WITH due AS (
                 SELECT c.id FROM domains c
                 WHERE c.custom AND c.verified_at IS NULL AND c.expires_at > now()
                   AND NOT EXISTS (SELECT 1 FROM domains v WHERE v.name = c.name AND v.verified_at IS NOT NULL)
                 ORDER BY coalesce(c.checked_at, c.created_at), c.id LIMIT $1
                 FOR UPDATE OF c SKIP LOCKED)
             UPDATE domains d SET checked_at = now() FROM due WHERE d.id = due.id RETURNING {COLUMNS}"
            )))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            let mut claims: Vec<PendingDomain> = rows.into_iter().map(pending).collect();
            claims.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
            Ok(claims)
        })
        .await
    }

    /// Every unverified claim that has not lapsed (for operators and tests), by name.
    pub async fn pending_claims(&self) -> Result<Vec<PendingDomain>, StoreError> {
        self.bounded(async {
            let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM domains d WHERE d.custom AND d.verified_at IS NULL AND d.expires_at > now()
             ORDER BY d.name, d.id"
            )))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().map(pending).collect())
        })
        .await
    }

    /// Removes at most `limit` lapsed claims; their services change (as any update, an event each). Returns how
    /// many were removed.
    pub async fn remove_expired_claims(&self, limit: i64) -> Result<usize, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let removed: Vec<(Uuid, Uuid)> = sqlx::query_as(
                "DELETE FROM domains WHERE id IN (
                 SELECT id FROM domains WHERE verified_at IS NULL AND expires_at <= now()
                 ORDER BY expires_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING tenant_id, service_id",
            )
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            let services: BTreeSet<(Uuid, Uuid)> = removed.iter().copied().collect();
            for (tenant, service) in services {
                let view = self.service_in(&mut tx, tenant, service).await?;
                record_event(&mut tx, Some(tenant), "service", service, EventAction::Updated, &view).await?;
            }
            tx.commit().await?;
            if !removed.is_empty() {
                tracing::info!(count = removed.len(), "expired custom-domain claims removed");
            }
            Ok(removed.len())
        })
        .await
    }

    /// A custom domain of a tenant's service (by name or id), verified or not; another tenant's is not found.
    pub async fn service_domain(&self, tenant: Uuid, service: &str, domain: &str) -> Result<PendingDomain, StoreError> {
        self.bounded(async {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            let mut q = QueryBuilder::new(format!(
                "SELECT {COLUMNS} FROM domains d JOIN services s ON s.id = d.service_id AND s.tenant_id = d.tenant_id
             WHERE d.tenant_id = "
            ));
            q.push_bind(tenant).push(" AND ");
            page::push_name_or_id(&mut q, "s.", service);
            q.push(" AND d.name = ").push_bind(&domain).push(" AND d.custom");
            let row: Option<Row> = q.build_query_as().fetch_optional(&self.pool).await?;
            row.map(pending)
                .ok_or_else(|| StoreError::NotFound { kind: "domain", key: format!("{domain} (of service {service})") })
        })
        .await
    }

    /// A custom domain of any of the tenant's services; another tenant's is not found.
    pub async fn tenant_domain(&self, tenant: Uuid, domain: &str) -> Result<PendingDomain, StoreError> {
        self.bounded(async {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM domains d WHERE d.tenant_id = $1 AND d.name = $2 AND d.custom"
            )))
            .bind(tenant)
            .bind(&domain)
            .fetch_optional(&self.pool)
            .await?;
            row.map(pending).ok_or_else(|| StoreError::NotFound {
                kind: "domain",
                key: format!("{domain} (no service of this tenant has it as a custom domain)"),
            })
        })
        .await
    }

    /// Records that a claim's ownership was proven: its service changes (the edge starts routing the domain, the
    /// DNS serves it), and so do the services of other tenants claiming the same name (now `taken`), an event
    /// each. Idempotent for a verified claim. A lapsed claim is [`StoreError::ClaimExpired`]; a name another
    /// tenant verified first, even an instant before, is [`StoreError::DomainTaken`].
    pub async fn mark_domain_verified(&self, domain: Uuid) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let row: Option<(String, bool, bool)> = sqlx::query_as(
                "SELECT name, verified_at IS NOT NULL, coalesce(expires_at <= now(), false) FROM domains
             WHERE id = $1 FOR UPDATE",
            )
            .bind(domain)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((name, verified, expired)) = row else {
                return Err(StoreError::NotFound { kind: "domain", key: domain.to_string() });
            };
            if verified {
                return Ok(());
            }
            if expired {
                return Err(StoreError::ClaimExpired { name });
            }
            // Claims recorded before such names were refused stay unprovable.
            if cloud_domain::domains::is_platform_domain(&name, &self.settings.base_domain) {
                return Err(StoreError::Invalid(format!(
                    "domain \"{name}\" is inside the platform's own domain {}: it cannot be a custom domain",
                    self.settings.base_domain
                )));
            }
            let updated = sqlx::query_as::<_, (Uuid, Uuid)>(
            "UPDATE domains SET verified_at = now(), expires_at = NULL WHERE id = $1 RETURNING tenant_id, service_id",
        )
        .bind(domain)
        .fetch_one(&mut *tx)
        .await;
            let (tenant, service) = match updated {
                Ok(r) => r,
                Err(e) if violated_constraint(&e).as_deref() == Some("domains_verified_name") => {
                    return Err(StoreError::DomainTaken { name, why: VERIFIED_ELSEWHERE });
                }
                Err(e) => return Err(e.into()),
            };
            let view = self.service_in(&mut tx, tenant, service).await?;
            record_event(&mut tx, Some(tenant), "service", service, EventAction::Updated, &view).await?;
            self.touch_claimants(&mut tx, &[name], service).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Records an update of every service (but `except`) with an unverified claim on one of `names`: whether
    /// those claims are `taken` changed.
    pub(crate) async fn touch_claimants(
        &self,
        conn: &mut sqlx::PgConnection,
        names: &[String],
        except: Uuid,
    ) -> Result<(), StoreError> {
        if names.is_empty() {
            return Ok(());
        }
        let services: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT DISTINCT tenant_id, service_id FROM domains
             WHERE name = ANY($1) AND verified_at IS NULL AND service_id <> $2 ORDER BY tenant_id, service_id",
        )
        .bind(names)
        .bind(except)
        .fetch_all(&mut *conn)
        .await?;
        for (tenant, service) in services {
            let view = self.service_in(conn, tenant, service).await?;
            record_event(conn, Some(tenant), "service", service, EventAction::Updated, &view).await?;
        }
        Ok(())
    }
}
