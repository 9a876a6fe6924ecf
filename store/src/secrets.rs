//! Secrets: environment variables whose values the store keeps sealed (the caller seals and opens them with the
//! platform secret key) and never hands to anyone but the node that starts an instance.

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, Secret};
use uuid::Uuid;

use crate::page::{self, Cursor, Table, Visible};
use crate::{Store, StoreError, record_event};

#[derive(sqlx::FromRow)]
struct SecretRow {
    id: Uuid,
    name: String,
    service: Option<String>,
    version: i32,
    as_file: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<SecretRow> for Secret {
    fn from(r: SecretRow) -> Self {
        Secret {
            name: r.name,
            service: r.service,
            version: r.version,
            file: r.as_file,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const SELECT_SECRET: &str = "SELECT x.id, x.name, s.name AS service, x.version, x.as_file, x.created_at, x.updated_at
        FROM secrets x LEFT JOIN services s ON s.id = x.service_id";
const SECRETS: Table = Table { select: SELECT_SECRET, alias: "x." };

impl Store {
    /// Sets a secret of the tenant (or of one of its services), sealed by the caller; a new version when it exists.
    pub async fn set_secret(
        &self,
        tenant: Uuid,
        name: &str,
        service: Option<&str>,
        value_sealed: &[u8],
        as_file: bool,
    ) -> Result<Secret, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let service_id = match service {
                Some(key) => Some(Self::service_id_in(&mut tx, tenant, key).await?),
                None => None,
            };
            let (id,): (Uuid,) = sqlx::query_as(
                "INSERT INTO secrets (id, tenant_id, service_id, name, value_sealed, as_file)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (tenant_id, service_id, name) DO UPDATE
                     SET value_sealed = $5, as_file = $6, version = secrets.version + 1, updated_at = now()
                 RETURNING id",
            )
            .bind(Uuid::new_v4())
            .bind(tenant)
            .bind(service_id)
            .bind(name)
            .bind(value_sealed)
            .bind(as_file)
            .fetch_one(&mut *tx)
            .await?;
            let row: SecretRow = sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_SECRET} WHERE x.id = $1")))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            let secret = Secret::from(row);
            record_event(&mut tx, Some(tenant), "secret", id, EventAction::Updated, &secret).await?;
            tx.commit().await?;
            Ok(secret)
        })
        .await
    }

    /// A page of the tenant's secrets, without their values.
    pub async fn list_secrets(
        &self,
        tenant: Uuid,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Secret>, Option<Cursor>), StoreError> {
        self.bounded(async {
            let key = |r: &SecretRow| Cursor { created_at: r.created_at, id: r.id };
            let (rows, next) = page::list(&self.pool, SECRETS, Visible::Tenant(tenant), cursor, limit, key).await?;
            Ok((rows.into_iter().map(Secret::from).collect(), next))
        })
        .await
    }

    /// Deletes a secret of the tenant (or of one of its services).
    pub async fn delete_secret(&self, tenant: Uuid, name: &str, service: Option<&str>) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let service_id = match service {
                Some(key) => Some(Self::service_id_in(&mut tx, tenant, key).await?),
                None => None,
            };
            let row: Option<SecretRow> = sqlx::query_as(
                "WITH gone AS (DELETE FROM secrets WHERE tenant_id = $1 AND name = $2
                     AND service_id IS NOT DISTINCT FROM $3 RETURNING *)
                 SELECT x.id, x.name, s.name AS service, x.version, x.as_file, x.created_at, x.updated_at
                 FROM gone x LEFT JOIN services s ON s.id = x.service_id",
            )
            .bind(tenant)
            .bind(name)
            .bind(service_id)
            .fetch_optional(&mut *tx)
            .await?;
            let row = row.ok_or_else(|| StoreError::NotFound { kind: "secret", key: name.to_owned() })?;
            let id = row.id;
            record_event(&mut tx, Some(tenant), "secret", id, EventAction::Deleted, &Secret::from(row)).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// The sealed secrets an instance gets, by name: its tenant's, then its service's over them; each with
    /// whether it is a file rather than an environment variable.
    pub async fn instance_secrets(&self, instance: Uuid) -> Result<Vec<(String, Vec<u8>, bool)>, StoreError> {
        self.bounded(async {
            let rows: Vec<(String, Vec<u8>, bool)> = sqlx::query_as(
                "SELECT x.name, x.value_sealed, x.as_file FROM secrets x JOIN instances i ON i.tenant_id = x.tenant_id
                 WHERE i.id = $1 AND (x.service_id IS NULL OR x.service_id = i.service_id)
                 ORDER BY x.service_id IS NOT NULL, x.name",
            )
            .bind(instance)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows)
        })
        .await
    }

    async fn service_id_in(conn: &mut sqlx::PgConnection, tenant: Uuid, key: &str) -> Result<Uuid, StoreError> {
        // PostgreSQL's text holds no NUL: no service is named with one.
        if key.contains('\0') {
            return Err(StoreError::NotFound { kind: "service", key: key.replace('\0', "\\0") });
        }
        let services = Table { select: "SELECT id FROM services", alias: "" };
        let found: Option<(Uuid,)> =
            page::find(conn, services, Visible::Tenant(tenant), key, page::RowLock::Share).await?;
        found.map(|(id,)| id).ok_or_else(|| StoreError::NotFound { kind: "service", key: key.to_owned() })
    }
}
