//! Certificates for custom domains: what tenants upload (and, later, what ACME obtains), with keys sealed by the
//! caller. A domain has at most one valid certificate; storing a new one replaces it in one transaction.

use chrono::{DateTime, Utc};
use cloud_domain::api::{Certificate, EventAction};
use uuid::Uuid;

use crate::page::{self, Cursor, Table, Visible};
use crate::{Store, StoreError, record_event};

/// A checked certificate to store.
#[derive(Debug, Clone)]
pub struct NewCertificate {
    /// The custom domain it is served for.
    pub domain: String,
    /// The names it carries.
    pub names: Vec<String>,
    /// `upload` or `acme`.
    pub source: &'static str,
    /// The chain, leaf first.
    pub chain_pem: String,
    /// The private key, sealed with the platform secret key.
    pub key_sealed: Vec<u8>,
    /// Validity.
    pub not_before: DateTime<Utc>,
    /// End of validity.
    pub not_after: DateTime<Utc>,
}

/// A certificate as the edge serves it.
#[derive(Debug, Clone)]
pub struct ServedCertificate {
    /// The domain (SNI name) it is served for.
    pub domain: String,
    /// The chain, leaf first.
    pub chain_pem: String,
    /// The sealed private key.
    pub key_sealed: Vec<u8>,
}

type Row = (
    Uuid,
    String,
    Vec<String>,
    String,
    String,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
);

const SELECT: &str = "SELECT id, domain, names, source, state, state_reason, not_before, not_after, created_at
                      FROM certificates";
const CERTIFICATES: Table = Table { select: SELECT, alias: "" };

fn view((id, domain, names, source, state, state_reason, not_before, not_after, created_at): Row) -> Certificate {
    Certificate { id, domain, names, source, state, state_reason, not_before, not_after, created_at }
}

impl Store {
    /// Stores a valid certificate for a domain the tenant verified, replacing the domain's current one (whoever
    /// held the name before).
    pub async fn put_certificate(&self, tenant: Uuid, new: NewCertificate) -> Result<Certificate, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            // The domain stays the tenant's until this commits: a claim that is not (or no longer) the tenant's
            // verified domain never gets a certificate stored.
            let owned: Option<(Uuid,)> = sqlx::query_as(
                "SELECT id FROM domains WHERE name = $1 AND tenant_id = $2 AND custom AND verified_at IS NOT NULL
             FOR SHARE",
            )
            .bind(&new.domain)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
            if owned.is_none() {
                return Err(StoreError::NotFound { kind: "verified custom domain", key: new.domain });
            }
            let replaced: Vec<(Uuid, Option<Uuid>)> = sqlx::query_as(
                "DELETE FROM certificates WHERE domain = $1 AND state IN ('valid', 'error', 'pending')
             RETURNING id, tenant_id",
            )
            .bind(&new.domain)
            .fetch_all(&mut *tx)
            .await?;
            let id = Uuid::new_v4();
            let row: Row = sqlx::query_as(
                "INSERT INTO certificates (id, tenant_id, domain, names, source, chain_pem, key_encrypted, state,
                                       not_before, not_after)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'valid', $8, $9)
             RETURNING id, domain, names, source, state, state_reason, not_before, not_after, created_at",
            )
            .bind(id)
            .bind(tenant)
            .bind(&new.domain)
            .bind(&new.names)
            .bind(new.source)
            .bind(&new.chain_pem)
            .bind(&new.key_sealed)
            .bind(new.not_before)
            .bind(new.not_after)
            .fetch_one(&mut *tx)
            .await?;
            let cert = view(row);
            for (old, holder) in replaced {
                record_event(
                    &mut tx,
                    holder,
                    "certificate",
                    old,
                    EventAction::Deleted,
                    &serde_json::json!({"id": old}),
                )
                .await?;
            }
            record_event(&mut tx, Some(tenant), "certificate", id, EventAction::Created, &cert).await?;
            tx.commit().await?;
            Ok(cert)
        })
        .await
    }

    /// The tenant's certificates, oldest first.
    pub async fn list_certificates(
        &self,
        tenant: Uuid,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Certificate>, Option<Cursor>), StoreError> {
        self.bounded(async {
            let key = |r: &Row| Cursor { created_at: r.8, id: r.0 };
            let (rows, next) =
                page::list(&self.pool, CERTIFICATES, Visible::Tenant(tenant), cursor, limit, key).await?;
            Ok((rows.into_iter().map(view).collect(), next))
        })
        .await
    }

    /// One of the tenant's certificates.
    pub async fn certificate(&self, tenant: Uuid, id: Uuid) -> Result<Certificate, StoreError> {
        self.bounded(async {
            let row: Option<Row> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT} WHERE tenant_id = $1 AND id = $2")))
                    .bind(tenant)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            row.map(view).ok_or_else(|| StoreError::NotFound { kind: "certificate", key: id.to_string() })
        })
        .await
    }

    /// Deletes one of the tenant's certificates (the edge stops serving it).
    pub async fn delete_certificate(&self, tenant: Uuid, id: Uuid) -> Result<(), StoreError> {
        self.bounded(async {
            let cert = self.certificate(tenant, id).await?;
            let mut tx = self.pool.begin().await?;
            sqlx::query("DELETE FROM certificates WHERE id = $1").bind(id).execute(&mut *tx).await?;
            record_event(&mut tx, Some(tenant), "certificate", id, EventAction::Deleted, &cert).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Every valid certificate whose domain is still a verified domain of a service of the same tenant: what the
    /// edge serves. A domain removed or moved to another tenant stops being served with it.
    pub async fn served_certificates(&self) -> Result<Vec<ServedCertificate>, StoreError> {
        let rows: Vec<(String, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT c.domain, c.chain_pem, c.key_encrypted FROM certificates c
             JOIN domains d ON d.name = c.domain AND d.tenant_id = c.tenant_id AND d.verified_at IS NOT NULL
             WHERE c.state = 'valid' ORDER BY c.domain",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(domain, chain, key)| Some(ServedCertificate { domain, chain_pem: chain?, key_sealed: key? }))
            .collect())
    }
}

impl Store {
    /// Publishes an ACME http-01 answer for `domain` (lowercase, no trailing dot).
    pub async fn put_acme_http_token(
        &self,
        domain: &str,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query(
                "INSERT INTO acme_http_tokens (token, domain, key_authorization) VALUES ($1, $2, $3)
             ON CONFLICT (token) DO UPDATE SET domain = $2, key_authorization = $3",
            )
            .bind(token)
            .bind(domain.trim_end_matches('.').to_ascii_lowercase())
            .bind(key_authorization)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// Withdraws an http-01 answer.
    pub async fn remove_acme_http_token(&self, token: &str) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("DELETE FROM acme_http_tokens WHERE token = $1").bind(token).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// The http-01 answer for `token` when it was published for `host`.
    pub async fn acme_http_answer(&self, host: &str, token: &str) -> Result<Option<String>, StoreError> {
        self.bounded(async {
            let row: Option<(String,)> =
                sqlx::query_as("SELECT key_authorization FROM acme_http_tokens WHERE token = $1 AND domain = $2")
                    .bind(token)
                    .bind(host)
                    .fetch_optional(&self.pool)
                    .await?;
            Ok(row.map(|(k,)| k))
        })
        .await
    }
}

/// A verified custom domain whose certificate the certificate manager should obtain or renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDomain {
    /// The domain.
    pub domain: String,
    /// Its tenant.
    pub tenant_id: Uuid,
    /// End of validity of its current ACME certificate, if any.
    pub not_after: Option<DateTime<Utc>>,
}

impl Store {
    /// Verified custom domains without a valid certificate, or whose ACME certificate ends within
    /// `renew_before`; domains with an uploaded valid certificate are the tenant's to renew, and domains whose
    /// last order failed less than `retry_after` ago wait.
    pub async fn acme_due(
        &self,
        renew_before: std::time::Duration,
        retry_after: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<DueDomain>, StoreError> {
        self.bounded(async {
            let interval = |d: std::time::Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            let rows: Vec<(String, Uuid, Option<DateTime<Utc>>)> = sqlx::query_as(
                "SELECT d.name, d.tenant_id,
                    (SELECT max(c.not_after) FROM certificates c
                     WHERE c.domain = d.name AND c.tenant_id = d.tenant_id AND c.state = 'valid')
             FROM domains d
             WHERE d.custom AND d.verified_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM certificates c WHERE c.domain = d.name AND c.tenant_id = d.tenant_id
                               AND c.state = 'valid' AND (c.source = 'upload' OR c.not_after > now() + $1))
               AND NOT EXISTS (SELECT 1 FROM certificates c WHERE c.domain = d.name AND c.state = 'error'
                               AND c.updated_at > now() - $2)
             ORDER BY d.verified_at, d.name LIMIT $3",
            )
            .bind(interval(renew_before))
            .bind(interval(retry_after))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(domain, tenant_id, not_after)| DueDomain { domain, tenant_id, not_after })
                .collect())
        })
        .await
    }

    /// Takes the order lease of `domain` for `holder` (for `ttl`), unless another holder has a live one.
    pub async fn take_acme_lease(
        &self,
        domain: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.bounded(async {
            let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
            let row: Option<(String,)> = sqlx::query_as(
                "INSERT INTO acme_orders (domain, holder, expires_at) VALUES ($1, $2, now() + $3)
             ON CONFLICT (domain) DO UPDATE SET holder = $2, expires_at = now() + $3
             WHERE acme_orders.expires_at < now() OR acme_orders.holder = $2
             RETURNING domain",
            )
            .bind(domain)
            .bind(holder)
            .bind(ttl)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.is_some())
        })
        .await
    }

    /// Gives the lease back.
    pub async fn release_acme_lease(&self, domain: &str, holder: &str) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("DELETE FROM acme_orders WHERE domain = $1 AND holder = $2")
                .bind(domain)
                .bind(holder)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// Records that an order for a tenant's domain is under way (shown as `pending` in its certificate list).
    pub async fn record_acme_pending(&self, tenant: Uuid, domain: &str) -> Result<(), StoreError> {
        self.bounded(async { self.record_acme_state(tenant, domain, "pending", None).await }).await
    }

    /// Records why the last order for a tenant's domain failed (shown in its certificate list; the domain waits
    /// before the next attempt). The valid certificate, if any, keeps being served.
    pub async fn record_acme_error(&self, tenant: Uuid, domain: &str, reason: &str) -> Result<(), StoreError> {
        self.bounded(async { self.record_acme_state(tenant, domain, "error", Some(reason)).await }).await
    }

    /// Replaces the domain's pending or error record.
    async fn record_acme_state(
        &self,
        tenant: Uuid,
        domain: &str,
        state: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM certificates WHERE domain = $1 AND state IN ('pending', 'error')")
            .bind(domain)
            .execute(&mut *tx)
            .await?;
        let id = Uuid::new_v4();
        let row: Row = sqlx::query_as(
            "INSERT INTO certificates (id, tenant_id, domain, source, state, state_reason)
             VALUES ($1, $2, $3, 'acme', $4, $5)
             RETURNING id, domain, names, source, state, state_reason, not_before, not_after, created_at",
        )
        .bind(id)
        .bind(tenant)
        .bind(domain)
        .bind(state)
        .bind(reason)
        .fetch_one(&mut *tx)
        .await?;
        record_event(&mut tx, Some(tenant), "certificate", id, EventAction::Created, &view(row)).await?;
        tx.commit().await?;
        Ok(())
    }
}
