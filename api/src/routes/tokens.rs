//! API tokens.

use actix_web::{HttpResponse, delete, get, post, web};
use chrono::Duration;
use cloud_domain::api::{CreateToken, CreatedToken, ErrorCode, Page, Problem, Scope, Token};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::validate::ListQuery;
use crate::{AppState, Auth, issue_token};

const DEFAULT_LIFETIME: u64 = 30 * 24 * 3600;

/// Create a token. The JWT is in the response only.
#[utoipa::path(tag = "tokens", security(("bearer" = [])), request_body = CreateToken, responses(
    (status = 201, description = "Created; `jwt` is the bearer token", body = CreatedToken),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/tokens")]
pub(crate) async fn create_token(
    state: web::Data<AppState>,
    auth: Auth,
    body: crate::json::Json<CreateToken>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    let body = body.into_inner();
    let tenant = tenant_for(&state, &auth, body.tenant.as_deref()).await?;
    let scopes = grantable(&auth, body.scopes)?;
    // The body's bounds (60 s to 10 years) were checked as it was read.
    let lifetime = body.expires_in_seconds.unwrap_or(DEFAULT_LIFETIME);
    if body.description.chars().count() > 256 {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "description must be at most 256 characters"));
    }
    let created = issue_token(
        &state.store,
        &state.signer,
        tenant,
        &scopes,
        Duration::seconds(lifetime as i64),
        &body.description,
    )
    .await?;
    Ok(HttpResponse::Created().json(created))
}

/// The tenant a new token is for: the caller's, or (admins only) the one named; another tenant is not found.
pub(super) async fn tenant_for(state: &AppState, auth: &Auth, named: Option<&str>) -> ApiResult<Uuid> {
    let Some(key) = named else { return Ok(auth.tenant) };
    let t = state.store.tenant(key).await?;
    if t.id != auth.tenant && !auth.is_admin() {
        return Err(cloud_store::StoreError::NotFound { kind: "tenant", key: key.to_owned() }.into());
    }
    Ok(t.id)
}

/// The scopes asked for (default read and write), each one the caller holds (admins hold all).
pub(super) fn grantable(auth: &Auth, asked: Option<Vec<Scope>>) -> ApiResult<Vec<Scope>> {
    let mut scopes = asked.unwrap_or_else(|| vec![Scope::Read, Scope::Write]);
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "scopes must name at least one of read, write, admin"));
    }
    if let Some(s) = scopes.iter().find(|s| !auth.is_admin() && !auth.scopes.contains(s)) {
        return Err(ApiError::new(
            ErrorCode::InsufficientScope,
            format!("cannot grant the '{}' scope: the calling token does not hold it", s.as_str()),
        ));
    }
    Ok(scopes)
}

/// List the tenant's tokens (without their secrets).
#[utoipa::path(tag = "tokens", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, description = "A page of tokens", body = Page<Token>),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/tokens")]
pub(crate) async fn list_tokens(
    state: web::Data<AppState>,
    auth: Auth,
    query: web::Query<ListQuery>,
) -> ApiResult<web::Json<Page<Token>>> {
    auth.require(Scope::Read)?;
    let (cursor, limit) = query.parse()?;
    let (items, next) = state.store.list_tokens(auth.tenant, cursor, limit).await?;
    Ok(web::Json(super::page(items, next)))
}

/// Revoke one of the tenant's tokens. Requests with it fail from now on.
#[utoipa::path(tag = "tokens", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Token id")),
    responses(
        (status = 200, description = "The revoked token", body = Token),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/tokens/{id}")]
pub(crate) async fn revoke_token(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Token>> {
    auth.require(Scope::Write)?;
    let id = Uuid::parse_str(&path)
        .map_err(|_| ApiError::new(ErrorCode::NotFound, format!("token \"{path}\" not found (token ids are UUIDs)")))?;
    Ok(web::Json(state.store.revoke_token(auth.tenant, id).await?))
}
