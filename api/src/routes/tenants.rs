//! Tenants and quotas, for admins.

use actix_web::{HttpResponse, delete, get, patch, post, web};
use cloud_domain::api::{CreateTenant, Page, Problem, Scope, Tenant, UpdateTenant};
use cloud_domain::names::{NameKind, validate_name};

use crate::error::ApiResult;
use crate::validate::ListQuery;
use crate::{AppState, Auth};

/// Create a tenant with its own private network.
#[utoipa::path(tag = "tenants", security(("bearer" = [])), request_body = CreateTenant, responses(
    (status = 201, description = "Created", body = Tenant),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/tenants")]
pub(crate) async fn create_tenant(
    state: web::Data<AppState>,
    auth: Auth,
    body: crate::json::Json<CreateTenant>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Admin)?;
    validate_name(NameKind::Tenant, &body.name)?;
    let tenant = state.store.create_tenant(&body.name, body.quotas).await?;
    Ok(HttpResponse::Created().json(tenant))
}

/// List tenants.
#[utoipa::path(tag = "tenants", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, description = "A page of tenants", body = Page<Tenant>),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/tenants")]
pub(crate) async fn list_tenants(
    state: web::Data<AppState>,
    auth: Auth,
    query: web::Query<ListQuery>,
) -> ApiResult<web::Json<Page<Tenant>>> {
    auth.require(Scope::Admin)?;
    let (cursor, limit) = query.parse()?;
    let (items, next) = state.store.list_tenants(cursor, limit).await?;
    Ok(web::Json(super::page(items, next)))
}

/// Get a tenant by name or id (admins, or the tenant's own tokens).
#[utoipa::path(tag = "tenants", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "Tenant name or id")),
    responses(
        (status = 200, description = "The tenant", body = Tenant),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/tenants/{tenant}")]
pub(crate) async fn get_tenant(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Tenant>> {
    auth.require(Scope::Read)?;
    let tenant = state.store.tenant(&path).await?;
    if !auth.is_admin() && tenant.id != auth.tenant {
        // Another tenant's existence is not revealed.
        return Err(cloud_store::StoreError::NotFound { kind: "tenant", key: path.into_inner() }.into());
    }
    Ok(web::Json(tenant))
}

/// Change a tenant's quotas.
#[utoipa::path(tag = "tenants", security(("bearer" = [])), request_body = UpdateTenant,
    params(("tenant" = String, Path, description = "Tenant name or id")),
    responses(
        (status = 200, description = "The changed tenant", body = Tenant),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[patch("/tenants/{tenant}")]
pub(crate) async fn update_tenant(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    body: crate::json::Json<UpdateTenant>,
) -> ApiResult<web::Json<Tenant>> {
    auth.require(Scope::Admin)?;
    Ok(web::Json(state.store.update_tenant(&path, body.quotas).await?))
}

/// Delete a tenant that owns no services, instances or images.
#[utoipa::path(tag = "tenants", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "Tenant name or id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/tenants/{tenant}")]
pub(crate) async fn delete_tenant(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Admin)?;
    state.store.delete_tenant(&path).await?;
    Ok(HttpResponse::NoContent().finish())
}
