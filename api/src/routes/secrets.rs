//! Secrets: environment variables whose values are sealed with the platform secret key as they arrive and never
//! leave the API again (not in responses, events or logs); node agents open them when they start an instance.

use actix_web::{HttpResponse, delete, get, put, web};
use cloud_domain::api::{ErrorCode, Page, Problem, Scope, Secret, SetSecret};

use crate::error::{ApiError, ApiResult};
use crate::validate::ListQuery;
use crate::{AppState, Auth};

/// The longest value a secret may have, in characters (64 KiB of ASCII).
const MAX_VALUE_CHARS: usize = 64 * 1024;

/// A secret's name must be an environment variable's.
fn check_name(name: &str) -> ApiResult<()> {
    let mut chars = name.chars();
    let first = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first && name.len() <= 255 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::InvalidName,
        format!("secret name \"{name}\" must be an environment variable's: a letter or _, then letters, digits or _"),
    ))
}

/// Which service's secret.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SecretScope {
    /// The service (name or id) whose secret it is; none: the tenant's.
    service: Option<String>,
}

/// Set a secret (a new version if it exists). Its value is sealed now and never shown again.
#[utoipa::path(tag = "secrets", security(("bearer" = [])),
    params(("key" = String, Path, description = "The environment variable's name",
        pattern = "^[A-Za-z_][A-Za-z0-9_]{0,254}$")),
    request_body = SetSecret,
    responses(
        (status = 200, description = "The secret, without its value", body = Secret),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[put("/secrets/{key}")]
pub(crate) async fn set_secret(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    body: crate::json::Json<SetSecret>,
) -> ApiResult<web::Json<Secret>> {
    auth.require(Scope::Write)?;
    check_name(&path)?;
    let body = body.into_inner();
    if body.value.contains('\0') {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "a secret's value cannot hold NUL (environments cannot)"));
    }
    let chars = body.value.chars().count();
    if chars > MAX_VALUE_CHARS {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("a secret's value is at most 64 KiB ({MAX_VALUE_CHARS} characters), not {chars} characters"),
        ));
    }
    let sealed = state.secret_key.seal(body.value.as_bytes()).map_err(|e| {
        tracing::error!(error = %cloud_domain::error_chain(&e), "cannot seal a secret");
        ApiError::new(ErrorCode::InternalError, "the secret could not be sealed")
    })?;
    Ok(web::Json(state.store.set_secret(auth.tenant, &path, body.service.as_deref(), &sealed, body.file).await?))
}

/// List the tenant's secrets: names and versions, never values.
#[utoipa::path(tag = "secrets", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, description = "A page of secrets", body = Page<Secret>),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/secrets")]
pub(crate) async fn list_secrets(
    state: web::Data<AppState>,
    auth: Auth,
    query: web::Query<ListQuery>,
) -> ApiResult<web::Json<Page<Secret>>> {
    auth.require(Scope::Read)?;
    let (cursor, limit) = query.parse()?;
    let (items, next) = state.store.list_secrets(auth.tenant, cursor, limit).await?;
    Ok(web::Json(super::page(items, next)))
}

/// Delete a secret; instances started from now on go without it.
#[utoipa::path(tag = "secrets", security(("bearer" = [])),
    params(("key" = String, Path, description = "The environment variable's name",
        pattern = "^[A-Za-z_][A-Za-z0-9_]{0,254}$"), SecretScope),
    responses(
        (status = 204, description = "Deleted"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/secrets/{key}")]
pub(crate) async fn delete_secret(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    scope: web::Query<SecretScope>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    check_name(&path)?;
    state.store.delete_secret(auth.tenant, &path, scope.service.as_deref()).await?;
    Ok(HttpResponse::NoContent().finish())
}
