//! Services.

use actix_web::{HttpResponse, delete, get, patch, post, web};
use cloud_domain::api::{CreateService, ErrorCode, Page, Problem, Scope, Service, UpdateService};
use cloud_domain::domains::resolve_domains;
use cloud_domain::names::{NameKind, validate_name};
use cloud_domain::ports::expand_inputs;
use cloud_domain::service::check_limits;
use cloud_store::{NewService, ServiceChange};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};
use crate::validate::ListQuery;
use crate::{AppState, Auth};

/// Create a service with a generated FQDN `<name>-<8 random>.<region>.<base_domain>`.
#[utoipa::path(tag = "services", security(("bearer" = [])), request_body = CreateService, responses(
    (status = 201, description = "Created", body = Service),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/services")]
pub(crate) async fn create_service(
    state: web::Data<AppState>,
    auth: Auth,
    body: crate::json::Json<CreateService>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    let body = body.into_inner();
    let settings = state.store.settings();
    if let Some(name) = &body.name {
        validate_name(NameKind::Service, name)?;
    }
    let ports = expand_inputs(&body.ports, &settings.port_policy())?;
    check_limits(body.soft_limit, body.hard_limit)?;
    let domains = resolve_domains(&body.domains, &settings.zone(), &settings.base_domain)?;
    let new = NewService {
        name: body.name,
        ports,
        soft_limit: body.soft_limit,
        hard_limit: body.hard_limit,
        scale_to_zero_after: body.scale_to_zero_after,
        domains,
        persistent: true,
    };
    let service = state.store.create_service(auth.tenant, new).await?;
    Ok(HttpResponse::Created().json(service))
}

/// List the tenant's services, oldest first.
#[utoipa::path(tag = "services", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, description = "A page of services", body = Page<Service>),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/services")]
pub(crate) async fn list_services(
    state: web::Data<AppState>,
    auth: Auth,
    query: web::Query<ListQuery>,
) -> ApiResult<web::Json<Page<Service>>> {
    auth.require(Scope::Read)?;
    let (cursor, limit) = query.parse()?;
    let (items, next) = state.store.list_services(auth.tenant, cursor, limit).await?;
    Ok(web::Json(super::page(items, next)))
}

/// Get a service by name or id.
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(("service" = String, Path, description = "Service name or id")),
    responses(
        (status = 200, description = "The service", body = Service),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/services/{service}")]
pub(crate) async fn get_service(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Service>> {
    auth.require(Scope::Read)?;
    Ok(web::Json(state.store.service(auth.tenant, &path).await?))
}

/// Check a custom domain's ownership record now. The platform routes a custom domain, and orders certificates
/// for it, only once its TXT record `_cloud-challenge.<domain>` holds `cloud-verify=<token>` (the service shows
/// both under `domains[].verification`); the certificate role also checks pending domains periodically. Several
/// tenants may claim one name: the first to verify gets it, and the others' claims become `taken`.
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(
        ("service" = String, Path, description = "Service name or id"),
        ("domain" = String, Path, description = "The custom domain, e.g. www.example.com"),
    ),
    responses(
        (status = 200, description = "The domain is verified; the service as it is now", body = Service),
        (status = 409, description = "Another tenant verified this name first (`domain_taken`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The ownership record is missing or wrong, or the claim expired (`domain_not_verified`): the detail names the record, the value expected and what was found", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The resolver could not be asked", body = Problem, content_type = "application/problem+json"),
))]
#[post("/services/{service}/domains/{domain}/verify")]
pub(crate) async fn verify_domain(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<(String, String)>,
) -> ApiResult<web::Json<Service>> {
    use cloud_certs::ownership::OwnershipError;
    auth.require(Scope::Write)?;
    let (service, domain) = path.into_inner();
    let pending = state.store.service_domain(auth.tenant, &service, &domain).await?;
    match state.ownership.verify(&state.store, &pending).await {
        Ok(()) => {}
        Err(e @ OwnershipError::Missing { .. }) => {
            return Err(ApiError::new(ErrorCode::DomainNotVerified, format!("{} is not verified: {e}", pending.name)));
        }
        Err(OwnershipError::Store(e)) => return Err(e.into()),
        Err(e) => return Err(ApiError::new(ErrorCode::Unavailable, e.to_string())),
    }
    Ok(web::Json(state.store.service(auth.tenant, &pending.service_id.to_string()).await?))
}

/// Change a service's ports, limits or domains.
#[utoipa::path(tag = "services", security(("bearer" = [])), request_body = UpdateService,
    params(("service" = String, Path, description = "Service name or id")),
    responses(
        (status = 200, description = "The changed service", body = Service),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[patch("/services/{service}")]
pub(crate) async fn update_service(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    body: crate::json::Json<UpdateService>,
) -> ApiResult<web::Json<Service>> {
    auth.require(Scope::Write)?;
    let body = body.into_inner();
    let settings = state.store.settings();
    let ports = body.ports.as_deref().map(|p| expand_inputs(p, &settings.port_policy())).transpose()?;
    // Limits given together must agree here; the store checks one given alone against the one it keeps.
    check_limits(body.soft_limit.flatten(), body.hard_limit.flatten())?;
    let zone = settings.zone();
    let domains = body.domains.as_deref().map(|d| resolve_domains(d, &zone, &settings.base_domain)).transpose()?;
    let change = ServiceChange {
        ports,
        soft_limit: body.soft_limit,
        hard_limit: body.hard_limit,
        scale_to_zero_after: body.scale_to_zero_after,
        domains,
    };
    Ok(web::Json(state.store.update_service(auth.tenant, &path, change).await?))
}

/// Options of a service deletion.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeleteQuery {
    /// Also delete the service's instances.
    #[serde(default)]
    force: bool,
}

/// Delete a service. A persistent service with instances is refused unless `force=true`.
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(("service" = String, Path, description = "Service name or id"), DeleteQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/services/{service}")]
pub(crate) async fn delete_service(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    query: web::Query<DeleteQuery>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    state.store.delete_service(auth.tenant, &path, query.force).await?;
    Ok(HttpResponse::NoContent().finish())
}
