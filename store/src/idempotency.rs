//! `Idempotency-Key` records: the first completed response to a (tenant, key) is replayed to retries.

use uuid::Uuid;

use crate::{Store, StoreError};

/// What to do with a request carrying an Idempotency-Key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// First use of the key: run the request, then finish or abandon the record.
    Proceed,
    /// The key was used for this same request: answer with the stored response.
    Replay {
        /// Stored status code.
        status: u16,
        /// Stored content type.
        content_type: String,
        /// Stored body.
        body: Vec<u8>,
    },
    /// The first request with this key is still running.
    InProgress,
    /// The key was used for a different request.
    Mismatch,
}

/// Keys are kept this long, as Stripe does.
const RETENTION: &str = "24 hours";

impl Store {
    /// Claims a key for a request identified by `request_hash` (method, path and body).
    pub async fn idempotency_begin(
        &self,
        tenant: Uuid,
        key: &str,
        request_hash: &str,
    ) -> Result<IdempotencyBegin, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND created_at < now() - interval '{RETENTION}'"
        )))
        .bind(tenant)
        .bind(key)
        .execute(&self.pool)
        .await?;
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, key, request_hash) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, key) DO NOTHING",
        )
        .bind(tenant)
        .bind(key)
        .bind(request_hash)
        .execute(&self.pool)
        .await?;
        if claimed.rows_affected() == 1 {
            return Ok(IdempotencyBegin::Proceed);
        }
        let row: Option<(String, Option<i32>, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT request_hash, status, content_type, body FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            // Abandoned between our insert and select: let the caller retry the request.
            None => IdempotencyBegin::InProgress,
            Some((hash, _, _, _)) if hash != request_hash => IdempotencyBegin::Mismatch,
            Some((_, Some(status), content_type, body)) => IdempotencyBegin::Replay {
                status: status as u16,
                content_type: content_type.unwrap_or_default(),
                body: body.unwrap_or_default(),
            },
            Some(_) => IdempotencyBegin::InProgress,
        })
    }

    /// Stores the response for a claimed key.
    pub async fn idempotency_finish(
        &self,
        tenant: Uuid,
        key: &str,
        status: u16,
        content_type: &str,
        body: &[u8],
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency_keys SET status = $3, content_type = $4, body = $5 WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant)
        .bind(key)
        .bind(status as i32)
        .bind(content_type)
        .bind(body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Releases a claimed key without a stored response (the request failed on our side), so a retry runs.
    pub async fn idempotency_abandon(&self, tenant: Uuid, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND status IS NULL")
            .bind(tenant)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
