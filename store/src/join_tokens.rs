//! Join tokens: one-time secrets exchanged for an API token. The store keeps the secret's hash only; the exchange
//! checks the join token and records the new token in one transaction, so a secret yields one token at most even
//! when two clients race with it.

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, JoinTokenInfo, JoinTokenState, Scope, Token};
use cloud_domain::join::JoinRefusal;
use uuid::Uuid;

use crate::page::{self, Cursor, Table, Visible};
use crate::{Store, StoreError, record_event};

#[derive(sqlx::FromRow)]
struct JoinTokenRow {
    id: Uuid,
    tenant_id: Option<Uuid>,
    tenant_name: String,
    scopes: Vec<String>,
    token_lifetime_seconds: i64,
    description: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    used_at: Option<DateTime<Utc>>,
    token_id: Option<Uuid>,
    revoked_at: Option<DateTime<Utc>>,
}

impl JoinTokenRow {
    fn info(&self, now: DateTime<Utc>) -> JoinTokenInfo {
        let state = match (self.used_at, self.revoked_at) {
            (Some(_), _) => JoinTokenState::Used,
            (None, Some(_)) => JoinTokenState::Revoked,
            (None, None) if self.expires_at <= now => JoinTokenState::Expired,
            (None, None) => JoinTokenState::Pending,
        };
        JoinTokenInfo {
            id: self.id,
            tenant: self.tenant_name.clone(),
            scopes: self.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
            description: self.description.clone(),
            state,
            created_at: self.created_at,
            expires_at: self.expires_at,
            used_at: self.used_at,
            token_id: self.token_id,
            revoked_at: self.revoked_at,
        }
    }
}

const SELECT_JOIN_TOKEN: &str = "SELECT j.id, j.tenant_id, j.tenant_name, j.scopes, j.token_lifetime_seconds,
        j.description, j.created_at, j.expires_at, j.used_at, j.token_id, j.revoked_at FROM join_tokens j";
const JOIN_TOKENS: Table = Table { select: SELECT_JOIN_TOKEN, alias: "j." };

/// What a new join token grants.
#[derive(Debug, Clone)]
pub struct JoinGrant {
    /// Tenant of the token it yields.
    pub tenant: Uuid,
    /// Scopes of the token it yields.
    pub scopes: Vec<Scope>,
    /// Lifetime of the token it yields.
    pub token_lifetime: chrono::Duration,
    /// Until when it may be used.
    pub expires_at: DateTime<Utc>,
    /// Free text.
    pub description: String,
}

impl Store {
    /// Records a join token by the hash of its secret.
    pub async fn create_join_token(&self, grant: &JoinGrant, secret_hash: &[u8]) -> Result<JoinTokenInfo, StoreError> {
        self.bounded(async {
            let id = Uuid::new_v4();
            let scopes: Vec<&str> = grant.scopes.iter().map(|s| s.as_str()).collect();
            let mut tx = self.pool.begin().await?;
            // The tenant's name is copied, to name it once the tenant is deleted.
            let inserted = sqlx::query(
                "INSERT INTO join_tokens (id, tenant_id, tenant_name, secret_hash, scopes, token_lifetime_seconds,
                        description, expires_at)
                 SELECT $1, t.id, t.name, $3, $4, $5, $6, $7 FROM tenants t WHERE t.id = $2",
            )
            .bind(id)
            .bind(grant.tenant)
            .bind(secret_hash)
            .bind(&scopes)
            .bind(grant.token_lifetime.num_seconds())
            .bind(&grant.description)
            .bind(grant.expires_at)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Err(StoreError::NotFound { kind: "tenant", key: grant.tenant.to_string() });
            }
            let row: JoinTokenRow = sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_JOIN_TOKEN} WHERE j.id = $1")))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            let info = row.info(Utc::now());
            record_event(&mut tx, Some(grant.tenant), "join_token", id, EventAction::Created, &info).await?;
            tx.commit().await?;
            Ok(info)
        })
        .await
    }

    /// A page of the join tokens a tenant's tokens would be made for.
    pub async fn list_join_tokens(
        &self,
        tenant: Uuid,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<JoinTokenInfo>, Option<Cursor>), StoreError> {
        self.bounded(async {
            let key = |r: &JoinTokenRow| Cursor { created_at: r.created_at, id: r.id };
            let (rows, next) = page::list(&self.pool, JOIN_TOKENS, Visible::Tenant(tenant), cursor, limit, key).await?;
            let now = Utc::now();
            Ok((rows.iter().map(|r| r.info(now)).collect(), next))
        })
        .await
    }

    /// Revokes a tenant's unused join token (revoking twice keeps the first time; a used one cannot be revoked:
    /// revoke the token it yielded instead).
    pub async fn revoke_join_token(&self, tenant: Uuid, id: Uuid) -> Result<JoinTokenInfo, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let row: Option<JoinTokenRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{SELECT_JOIN_TOKEN} WHERE j.id = $1 AND j.tenant_id = $2 FOR UPDATE"
            )))
            .bind(id)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(mut row) = row else {
                return Err(StoreError::NotFound { kind: "join token", key: id.to_string() });
            };
            if let Some(at) = row.used_at {
                return Err(StoreError::Invalid(format!(
                    "join token {id} was used at {at}: revoke the token it yielded ({}) instead",
                    row.token_id.map(|t| t.to_string()).unwrap_or_default()
                )));
            }
            if row.revoked_at.is_none() {
                let (at,): (DateTime<Utc>,) =
                    sqlx::query_as("UPDATE join_tokens SET revoked_at = now() WHERE id = $1 RETURNING revoked_at")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?;
                row.revoked_at = Some(at);
            }
            let info = row.info(Utc::now());
            record_event(&mut tx, Some(tenant), "join_token", id, EventAction::Updated, &info).await?;
            tx.commit().await?;
            Ok(info)
        })
        .await
    }

    /// Exchanges a join token's secret (by its hash) for a new token record, once: the join token is marked used
    /// in the same transaction. Returns the token and its tenant's id.
    pub async fn redeem_join_token(&self, secret_hash: &[u8]) -> Result<(Token, Uuid), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let row: Option<JoinTokenRow> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_JOIN_TOKEN} WHERE j.secret_hash = $1 FOR UPDATE")))
                    .bind(secret_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
            let now = Utc::now();
            let row = row.ok_or(JoinRefusal::Unknown)?;
            if let Some(at) = row.used_at {
                return Err(JoinRefusal::Used(at).into());
            }
            if let Some(at) = row.revoked_at {
                return Err(JoinRefusal::Revoked(at).into());
            }
            if row.expires_at <= now {
                return Err(JoinRefusal::Expired(row.expires_at).into());
            }
            let tenant = row.tenant_id.ok_or_else(|| JoinRefusal::TenantDeleted(row.tenant_name.clone()))?;
            let scopes: Vec<Scope> = row.scopes.iter().filter_map(|s| Scope::parse(s)).collect();
            // Whole seconds, as in the JWT, so the record and the claim agree.
            let end = now + chrono::Duration::seconds(row.token_lifetime_seconds);
            let expires_at = DateTime::from_timestamp(end.timestamp(), 0).unwrap_or(end);
            let description = match row.description.is_empty() {
                true => format!("joined with join token {}", row.id),
                false => row.description.clone(),
            };
            let token = Self::create_token_in(&mut tx, tenant, &scopes, expires_at, &description).await?;
            sqlx::query("UPDATE join_tokens SET used_at = now(), token_id = $2 WHERE id = $1")
                .bind(row.id)
                .bind(token.id)
                .execute(&mut *tx)
                .await?;
            let info = JoinTokenRow { used_at: Some(now), token_id: Some(token.id), ..row }.info(now);
            record_event(&mut tx, Some(tenant), "join_token", info.id, EventAction::Updated, &info).await?;
            tx.commit().await?;
            Ok((token, tenant))
        })
        .await
    }
}
