//! Rollouts and autoscale: how a service's instances are replaced and how many there are. The API records what
//! the tenant asks for; the platform's controller ([`crate::controller`]) carries it out step by step.

use actix_web::{HttpResponse, delete, get, post, put, web};
use cloud_domain::api::{Autoscale, CreateRollout, ErrorCode, Problem, Rollout, Scope, Service};
use cloud_store::NewRollout;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::{AppState, Auth};

/// Start a rollout: new instances for the service (another image, environment or arguments, or the same for a
/// rolling restart), started a few at a time; each old instance drains and goes (`replace`) or stops (`stop`)
/// once a new one runs, or stays (`keep`). A new instance that fails or is not ready in time ends the rollout
/// with the instances that were healthy still serving.
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(("service" = String, Path, description = "Service name or id")),
    request_body = CreateRollout,
    responses(
        (status = 201, description = "The rollout, under way", body = Rollout),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/services/{service}/rollouts")]
pub(crate) async fn create_rollout(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    body: crate::json::Json<CreateRollout>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    let body = body.into_inner();
    super::instances::check_env_args(&body.env.clone().unwrap_or_default(), body.args.as_deref().unwrap_or_default())?;
    let new = NewRollout {
        image: body.image,
        strategy: body.strategy,
        replicas: body.replicas,
        max_surge: body.max_surge,
        ready_timeout_seconds: body.ready_timeout_seconds,
        env: body.env,
        args: body.args,
    };
    let rollout = state.store.create_rollout(auth.tenant, &path, new).await?;
    Ok(HttpResponse::Created().json(rollout))
}

/// A service's rollouts, newest first (the last 20).
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(("service" = String, Path, description = "Service name or id")),
    responses(
        (status = 200, description = "The service's latest rollouts, newest first", body = Vec<Rollout>),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/services/{service}/rollouts")]
pub(crate) async fn list_rollouts(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Vec<Rollout>>> {
    auth.require(Scope::Read)?;
    Ok(web::Json(state.store.list_rollouts(auth.tenant, &path, 20).await?))
}

/// A rollout: its state, and the old and new instances as they are now.
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(
        ("service" = String, Path, description = "Service name or id"),
        ("rollout" = Uuid, Path, description = "Rollout id"),
    ),
    responses(
        (status = 200, description = "The rollout", body = Rollout),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/services/{service}/rollouts/{rollout}")]
pub(crate) async fn get_rollout(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<(String, Uuid)>,
) -> ApiResult<web::Json<Rollout>> {
    auth.require(Scope::Read)?;
    let (service, id) = path.into_inner();
    Ok(web::Json(state.store.rollout(auth.tenant, &service, id).await?))
}

/// Cancel a rollout under way: its new instances that do not run yet go; every other instance stays as it is.
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(
        ("service" = String, Path, description = "Service name or id"),
        ("rollout" = Uuid, Path, description = "Rollout id"),
    ),
    responses(
        (status = 200, description = "The rollout, cancelled", body = Rollout),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/services/{service}/rollouts/{rollout}/cancel")]
pub(crate) async fn cancel_rollout(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<(String, Uuid)>,
) -> ApiResult<web::Json<Rollout>> {
    auth.require(Scope::Write)?;
    let (service, id) = path.into_inner();
    Ok(web::Json(state.store.cancel_rollout(auth.tenant, &service, id).await?))
}

/// Set the service's autoscale policy: instances are added while the requests in flight per instance stay above
/// the target, and drained away after the cooldown when below, between min and max. New instances copy the
/// service's newest one.
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(("service" = String, Path, description = "Service name or id")),
    request_body = Autoscale,
    responses(
        (status = 200, description = "The service with its policy", body = Service),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[put("/services/{service}/autoscale")]
pub(crate) async fn set_autoscale(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    body: crate::json::Json<Autoscale>,
) -> ApiResult<web::Json<Service>> {
    auth.require(Scope::Write)?;
    let policy = body.into_inner();
    if policy.min > policy.max {
        // Each valid alone: together they conflict, as a service's soft and hard limits may.
        return Err(ApiError::new(
            ErrorCode::LimitsConflict,
            format!("autoscale min {} is above max {}", policy.min, policy.max),
        ));
    }
    Ok(web::Json(state.store.set_autoscale(auth.tenant, &path, Some(policy)).await?))
}

/// Stop autoscaling the service: its instances stay as they are.
#[utoipa::path(tag = "services", security(("bearer" = [])),
    params(("service" = String, Path, description = "Service name or id")),
    responses(
        (status = 200, description = "The service, without a policy", body = Service),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/services/{service}/autoscale")]
pub(crate) async fn delete_autoscale(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Service>> {
    auth.require(Scope::Write)?;
    Ok(web::Json(state.store.set_autoscale(auth.tenant, &path, None).await?))
}
