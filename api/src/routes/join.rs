//! Join tokens: created, listed and revoked by a tenant's token; exchanged, once, by whoever holds one, with no
//! other credential. The exchange is rate limited per source address, so guessing secrets (2^256 of them) is not
//! only hopeless but slow.

use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use chrono::{Duration, Utc};
use cloud_domain::api::{
    CreateJoinToken, CreatedJoinToken, CreatedToken, ErrorCode, JoinRequest, JoinTokenInfo, Page, Problem, Scope,
};
use cloud_domain::join::{JoinToken, new_secret, secret_hash};
use cloud_store::JoinGrant;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::validate::ListQuery;
use crate::{AppState, Auth};

/// How long a join token waits to be used by default.
const DEFAULT_WAIT: u64 = 3600;
/// Lifetime of the token a join yields by default.
const DEFAULT_LIFETIME: u64 = 30 * 24 * 3600;

/// Create a one-time join token. Its secret is in the response only; `cloudctl remote add NAME TOKEN` uses it.
#[utoipa::path(tag = "tokens", security(("bearer" = [])), request_body = CreateJoinToken, responses(
    (status = 201, description = "Created; `join_token` is what to hand over", body = CreatedJoinToken),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/join-tokens")]
pub(crate) async fn create_join_token(
    state: web::Data<AppState>,
    auth: Auth,
    body: crate::json::Json<CreateJoinToken>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    let body = body.into_inner();
    let tenant = super::tokens::tenant_for(&state, &auth, body.tenant.as_deref()).await?;
    let scopes = super::tokens::grantable(&auth, body.scopes)?;
    if body.description.chars().count() > 256 {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "description must be at most 256 characters"));
    }
    // The body's bounds were checked as it was read.
    let wait = body.expires_in_seconds.unwrap_or(DEFAULT_WAIT);
    let lifetime = body.token_expires_in_seconds.unwrap_or(DEFAULT_LIFETIME);
    let secret = new_secret();
    let grant = JoinGrant {
        tenant,
        scopes,
        token_lifetime: Duration::seconds(lifetime as i64),
        expires_at: Utc::now() + Duration::seconds(wait as i64),
        description: body.description,
    };
    let info = state.store.create_join_token(&grant, &secret_hash(&secret)).await?;
    let settings = &state.join;
    let token = JoinToken {
        urls: settings.urls.clone(),
        fingerprint: settings.fingerprint.clone(),
        secret,
        expires_at: info.expires_at,
    };
    Ok(HttpResponse::Created().json(CreatedJoinToken { join_token: token.encode(), info }))
}

/// List the tenant's join tokens (without their secrets), used and expired ones too.
#[utoipa::path(tag = "tokens", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, description = "A page of join tokens", body = Page<JoinTokenInfo>),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/join-tokens")]
pub(crate) async fn list_join_tokens(
    state: web::Data<AppState>,
    auth: Auth,
    query: web::Query<ListQuery>,
) -> ApiResult<web::Json<Page<JoinTokenInfo>>> {
    auth.require(Scope::Read)?;
    let (cursor, limit) = query.parse()?;
    let (items, next) = state.store.list_join_tokens(auth.tenant, cursor, limit).await?;
    Ok(web::Json(super::page(items, next)))
}

/// Revoke one of the tenant's unused join tokens: it cannot be exchanged from now on.
#[utoipa::path(tag = "tokens", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Join token id")),
    responses(
        (status = 200, description = "The revoked join token", body = JoinTokenInfo),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/join-tokens/{id}")]
pub(crate) async fn revoke_join_token(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<JoinTokenInfo>> {
    auth.require(Scope::Write)?;
    let id = Uuid::parse_str(&path).map_err(|_| {
        ApiError::new(ErrorCode::NotFound, format!("join token \"{path}\" not found (join token ids are UUIDs)"))
    })?;
    Ok(web::Json(state.store.revoke_join_token(auth.tenant, id).await?))
}

/// Exchange a join token's secret for an API token, once. Needs no bearer token; rate limited per source address.
#[utoipa::path(tag = "tokens", request_body = JoinRequest, responses(
    (status = 201, description = "The token the join token granted; `jwt` is the bearer token", body = CreatedToken),
    (status = "4XX", description = "Problem: the join token is unknown, used, expired, revoked or its tenant deleted, \
        or too many attempts (429 with `Retry-After`)", body = Problem, content_type = "application/problem+json"),
))]
#[post("/join")]
pub(crate) async fn join(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: crate::json::Json<JoinRequest>,
) -> ApiResult<HttpResponse> {
    if let Some(source) = req.peer_addr().map(|a| a.ip())
        && let Err(wait) = state.join_limiter.admit(source)
    {
        let seconds = wait.as_secs().max(1);
        let mut e = ApiError::new(
            ErrorCode::TooManyRequests,
            format!("too many join attempts from {source}; retry in {seconds} s"),
        );
        e.headers.push((actix_web::http::header::RETRY_AFTER, seconds.into()));
        return Err(e);
    }
    let secret = body.into_inner().secret;
    if secret.is_empty() || secret.len() > 256 {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "secret must be 1 to 256 characters"));
    }
    let (token, tenant) = state.store.redeem_join_token(&secret_hash(&secret)).await?;
    tracing::info!(token = %token.id, tenant = %token.tenant, "a join token was exchanged for a token");
    let jwt = crate::auth::sign_record(&state.signer, tenant, &token);
    Ok(HttpResponse::Created().json(CreatedToken { token, jwt }))
}
