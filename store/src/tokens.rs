//! API token records. The JWT itself is never stored: it only names its record, which holds what the token
//! grants (tenant, scopes, expiry) and its revocation. A record's grant never changes once issued (a trigger
//! refuses it): only `revoked_at` is ever updated.

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, Scope, Token};
use uuid::Uuid;

use crate::page::{self, Cursor, Table, Visible};
use crate::{Store, StoreError, record_event};

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: Uuid,
    tenant: String,
    scopes: Vec<String>,
    description: String,
    expires_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

impl From<TokenRow> for Token {
    fn from(r: TokenRow) -> Self {
        Token {
            id: r.id,
            tenant: r.tenant,
            scopes: r.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
            description: r.description,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            created_at: r.created_at,
        }
    }
}

/// What authentication needs to know about a token id.
#[derive(Debug, Clone)]
pub struct TokenStatus {
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Expiry as recorded.
    pub expires_at: DateTime<Utc>,
    /// Set when revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

const SELECT_TOKEN: &str = "SELECT k.id, t.name AS tenant, k.scopes, k.description, k.expires_at, k.revoked_at,
        k.created_at FROM tokens k JOIN tenants t ON t.id = k.tenant_id";
const TOKENS: Table = Table { select: SELECT_TOKEN, alias: "k." };

impl Store {
    /// Records a new token for a tenant.
    pub async fn create_token(
        &self,
        tenant: Uuid,
        scopes: &[Scope],
        expires_at: DateTime<Utc>,
        description: &str,
    ) -> Result<Token, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let token = Self::create_token_in(&mut tx, tenant, scopes, expires_at, description).await?;
            tx.commit().await?;
            Ok(token)
        })
        .await
    }

    /// Records a new token inside a transaction, with its event.
    pub(crate) async fn create_token_in(
        tx: &mut sqlx::PgConnection,
        tenant: Uuid,
        scopes: &[Scope],
        expires_at: DateTime<Utc>,
        description: &str,
    ) -> Result<Token, StoreError> {
        let id = Uuid::new_v4();
        let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        sqlx::query("INSERT INTO tokens (id, tenant_id, scopes, expires_at, description) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(tenant)
            .bind(&scopes)
            .bind(expires_at)
            .bind(description)
            .execute(&mut *tx)
            .await?;
        let token = Self::token_in(&mut *tx, id).await?;
        record_event(&mut *tx, Some(tenant), "token", id, EventAction::Created, &token).await?;
        Ok(token)
    }

    async fn token_in(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<Token, StoreError> {
        let row: TokenRow = sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_TOKEN} WHERE k.id = $1")))
            .bind(id)
            .fetch_one(conn)
            .await?;
        Ok(row.into())
    }

    /// The grant and state of a token, for authentication.
    pub async fn token_status(&self, id: Uuid) -> Result<Option<TokenStatus>, StoreError> {
        self.bounded(async {
            let row: Option<(Uuid, Vec<String>, DateTime<Utc>, Option<DateTime<Utc>>)> =
                sqlx::query_as("SELECT tenant_id, scopes, expires_at, revoked_at FROM tokens WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            Ok(row.map(|(tenant_id, scopes, expires_at, revoked_at)| TokenStatus {
                tenant_id,
                scopes: scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                expires_at,
                revoked_at,
            }))
        })
        .await
    }

    /// A page of a tenant's tokens.
    pub async fn list_tokens(
        &self,
        tenant: Uuid,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Token>, Option<Cursor>), StoreError> {
        self.bounded(async {
            let key = |r: &TokenRow| Cursor { created_at: r.created_at, id: r.id };
            let (rows, next) = page::list(&self.pool, TOKENS, Visible::Tenant(tenant), cursor, limit, key).await?;
            Ok((rows.into_iter().map(Token::from).collect(), next))
        })
        .await
    }

    /// Revokes a token of the tenant (idempotent: revoking twice keeps the first time).
    pub async fn revoke_token(&self, tenant: Uuid, id: Uuid) -> Result<Token, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 AND tenant_id = $2",
            )
            .bind(id)
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::NotFound { kind: "token", key: id.to_string() });
            }
            let token = Self::token_in(&mut tx, id).await?;
            record_event(&mut tx, Some(tenant), "token", id, EventAction::Updated, &token).await?;
            tx.commit().await?;
            Ok(token)
        })
        .await
    }
}
