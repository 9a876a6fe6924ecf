//! `Idempotency-Key` records: the first completed response to a (token, key) is replayed to that token's retries.
//!
//! Keyed by token, not tenant: another token of the tenant (with other scopes) never gets the response. The body
//! is stored as the caller gives it; the API seals it, since responses may hold secrets (a created token's JWT).

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
        /// Stored body, as given to [`Store::idempotency_finish`].
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
    /// Claims a key of a token for a request identified by `request_hash` (method, path and body).
    pub async fn idempotency_begin(
        &self,
        token: Uuid,
        key: &str,
        request_hash: &str,
    ) -> Result<IdempotencyBegin, StoreError> {
        self.bounded(async {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM idempotency_requests WHERE token_id = $1 AND key = $2
             AND created_at < now() - interval '{RETENTION}'"
            )))
            .bind(token)
            .bind(key)
            .execute(&self.pool)
            .await?;
            let claimed = sqlx::query(
                "INSERT INTO idempotency_requests (token_id, key, request_hash) VALUES ($1, $2, $3)
             ON CONFLICT (token_id, key) DO NOTHING",
            )
            .bind(token)
            .bind(key)
            .bind(request_hash)
            .execute(&self.pool)
            .await?;
            if claimed.rows_affected() == 1 {
                return Ok(IdempotencyBegin::Proceed);
            }
            let row: Option<(String, Option<i32>, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT request_hash, status, content_type, body_sealed FROM idempotency_requests
             WHERE token_id = $1 AND key = $2",
            )
            .bind(token)
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
        })
        .await
    }

    /// Stores the response for a claimed key.
    pub async fn idempotency_finish(
        &self,
        token: Uuid,
        key: &str,
        status: u16,
        content_type: &str,
        body: &[u8],
    ) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query(
                "UPDATE idempotency_requests SET status = $3, content_type = $4, body_sealed = $5
             WHERE token_id = $1 AND key = $2",
            )
            .bind(token)
            .bind(key)
            .bind(status as i32)
            .bind(content_type)
            .bind(body)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// Releases a claimed key without a stored response (the request failed on our side), so a retry runs.
    pub async fn idempotency_abandon(&self, token: Uuid, key: &str) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("DELETE FROM idempotency_requests WHERE token_id = $1 AND key = $2 AND status IS NULL")
                .bind(token)
                .bind(key)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }
}
