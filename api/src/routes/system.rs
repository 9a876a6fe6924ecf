//! Health, readiness, metrics and the caller's identity.

use actix_web::{HttpResponse, get, web};
use cloud_domain::api::{ErrorCode, Problem, WhoAmI};

use crate::error::{ApiError, ApiResult};
use crate::{AppState, Auth};

/// Liveness: the process serves requests.
#[utoipa::path(tag = "system", responses((status = 200, description = "The process is alive", body = String)))]
#[get("/healthz")]
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Readiness: the database answers within half a second.
///
/// Answers within a second whatever PostgreSQL does: a load balancer never waits on a frozen database.
#[utoipa::path(tag = "system", responses(
    (status = 200, description = "Ready to serve", body = String),
    (status = 503, description = "The database did not answer within half a second", body = Problem,
        content_type = "application/problem+json",
        headers(("Retry-After" = u32, description = "Seconds to wait before asking again"))),
))]
#[get("/readyz")]
pub(crate) async fn readyz(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    if crate::readiness::check(&state.store, &state.metrics.database_up).await {
        Ok(HttpResponse::Ok().content_type("text/plain").body("ready\n"))
    } else {
        Err(ApiError::database_unavailable())
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(tag = "system", responses((status = 200, description = "Metrics", body = String)))]
#[get("/metrics")]
pub(crate) async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

/// The platform CA certificate (PEM): what clients trust to verify `https://<fqdn>` on a platform serving
/// certificates from its own CA (`cloudd dev`, self-hosted). Public, like any CA certificate.
#[utoipa::path(tag = "system", responses(
    (status = 200, description = "The CA certificate", body = String, content_type = "application/x-pem-file"),
    (status = 503, description = "The database is unreachable", body = Problem, content_type = "application/problem+json"),
))]
#[get("/ca.pem")]
pub(crate) async fn ca_pem(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let pem = platform_ca(&state).await?;
    Ok(HttpResponse::Ok().content_type("application/x-pem-file").body(pem.to_owned()))
}

/// The platform CA's certificate, read once (and made, if nobody has yet: the API holds the platform secret key).
pub(crate) async fn platform_ca(state: &AppState) -> ApiResult<&str> {
    let pem = state
        .ca_pem
        .get_or_try_init(|| async {
            let logged = |e: cloud_certs::CertsError| match e {
                cloud_certs::CertsError::Store(e) if e.is_unavailable() => ApiError::from(e),
                e => {
                    tracing::error!(error = %cloud_domain::error_chain(&e), "cannot read the platform CA");
                    ApiError::new(ErrorCode::Unavailable, "the platform CA cannot be read now")
                }
            };
            if let Some(pem) = cloud_certs::PlatformCa::stored_certificate(&state.store).await.map_err(logged)? {
                return Ok(pem);
            }
            let ca = cloud_certs::PlatformCa::load_or_create(&state.store, &state.secret_key).await.map_err(logged)?;
            Ok::<_, ApiError>(ca.cert_pem().to_owned())
        })
        .await?;
    Ok(pem)
}

/// The caller's tenant and token.
#[utoipa::path(tag = "tokens", security(("bearer" = [])), responses(
    (status = 200, description = "The caller", body = WhoAmI),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/whoami")]
pub(crate) async fn whoami(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<WhoAmI>> {
    let tenant = state.store.tenant(&auth.tenant.to_string()).await?;
    Ok(web::Json(WhoAmI { tenant, token_id: auth.token_id, scopes: auth.scopes, expires_at: auth.expires_at }))
}
