//! Certificates of the platform's own servers from the ACME CA: wanted by a server (its names), ordered by the
//! certificate manager, followed by the server. See `migrations/0025_platform_certificates.sql`.

use chrono::{DateTime, Utc};
use cloud_domain::api::EventAction;
use uuid::Uuid;

use crate::{Store, StoreError, record_event};

/// A platform certificate the manager should order: none yet, names changed, or its end near.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuePlatformCertificate {
    /// Its purpose (`api`).
    pub name: String,
    /// The names it must cover, the first one the subject.
    pub names: Vec<String>,
}

/// A stored platform certificate.
#[derive(Clone)]
pub struct PlatformCertificate {
    /// The names it was issued for.
    pub names: Vec<String>,
    /// Leaf first.
    pub chain_pem: String,
    /// Its key, sealed with the platform secret key.
    pub key_sealed: Vec<u8>,
    /// End of validity.
    pub not_after: DateTime<Utc>,
    /// When it was stored.
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for PlatformCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformCertificate").field("names", &self.names).field("not_after", &self.not_after).finish()
    }
}

/// Events carry the names and dates, never the key.
#[derive(serde::Serialize)]
struct Changed<'a> {
    name: &'a str,
    names: &'a [String],
    not_after: Option<DateTime<Utc>>,
}

/// Platform certificates are not any tenant's and have no id: their events carry a fixed one per purpose.
fn event_id(name: &str) -> Uuid {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    Uuid::from_u64_pair(0x706c_6174_666f_726d, hash)
}

impl Store {
    /// Records the names the `name` certificate must cover (kept when unchanged).
    pub async fn want_platform_certificate(&self, name: &str, names: &[String]) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query(
                "INSERT INTO platform_certificates (name, names) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET names = $2, last_attempt_at = NULL, last_error = NULL
                 WHERE platform_certificates.names IS DISTINCT FROM $2",
            )
            .bind(name)
            .bind(names)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// The platform certificates to order: without one, for other names than wanted, or ending within
    /// `renew_before`; one whose last order failed less than `retry_after` ago waits.
    pub async fn platform_certificates_due(
        &self,
        renew_before: std::time::Duration,
        retry_after: std::time::Duration,
    ) -> Result<Vec<DuePlatformCertificate>, StoreError> {
        self.bounded(async {
            let interval = |d: std::time::Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
                "SELECT name, names FROM platform_certificates
                 WHERE (chain_pem IS NULL OR issued_names IS DISTINCT FROM names OR not_after < now() + $1)
                   AND (last_attempt_at IS NULL OR last_error IS NULL OR last_attempt_at < now() - $2)
                 ORDER BY name",
            )
            .bind(interval(renew_before))
            .bind(interval(retry_after))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.into_iter().map(|(name, names)| DuePlatformCertificate { name, names }).collect())
        })
        .await
    }

    /// Stores an issued platform certificate, with an event its server follows.
    pub async fn put_platform_certificate(
        &self,
        name: &str,
        names: &[String],
        chain_pem: &str,
        key_sealed: &[u8],
        not_after: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "UPDATE platform_certificates SET issued_names = $2, chain_pem = $3, key_sealed = $4, not_after = $5,
                     last_error = NULL, last_attempt_at = now(), updated_at = now()
                 WHERE name = $1",
            )
            .bind(name)
            .bind(names)
            .bind(chain_pem)
            .bind(key_sealed)
            .bind(not_after)
            .execute(&mut *tx)
            .await?;
            let changed = Changed { name, names, not_after: Some(not_after) };
            record_event(&mut tx, None, "platform_certificate", event_id(name), EventAction::Updated, &changed).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Records why the last order failed; the certificate it has, if any, stays.
    pub async fn record_platform_certificate_error(&self, name: &str, reason: &str) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("UPDATE platform_certificates SET last_error = $2, last_attempt_at = now() WHERE name = $1")
                .bind(name)
                .bind(reason)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// The stored `name` certificate, if one was issued, and the last order's error.
    pub async fn platform_certificate(
        &self,
        name: &str,
    ) -> Result<(Option<PlatformCertificate>, Option<String>), StoreError> {
        self.bounded(async {
            type Row = (
                Option<Vec<String>>,
                Option<String>,
                Option<Vec<u8>>,
                Option<DateTime<Utc>>,
                DateTime<Utc>,
                Option<String>,
            );
            let row: Option<Row> = sqlx::query_as(
                "SELECT issued_names, chain_pem, key_sealed, not_after, updated_at, last_error
                 FROM platform_certificates WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
            let Some((names, chain, key, not_after, updated_at, error)) = row else { return Ok((None, None)) };
            let certificate = match (names, chain, key, not_after) {
                (Some(names), Some(chain_pem), Some(key_sealed), Some(not_after)) => {
                    Some(PlatformCertificate { names, chain_pem, key_sealed, not_after, updated_at })
                }
                _ => None,
            };
            Ok((certificate, error))
        })
        .await
    }
}
