//! Certificates for custom domains: uploads (checked, keys sealed) and their listing.

use actix_web::{HttpResponse, delete, get, post, web};
use cloud_certs::upload::{UploadError, check_upload};
use cloud_domain::api::{Certificate, ErrorCode, Page, Problem, Scope, UploadCertificate};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::validate::ListQuery;
use crate::{AppState, Auth};

/// Upload a certificate for a verified custom domain. It is checked first (the key is the certificate's, the
/// chain is signed in order and current, its names cover the domain); only then does it replace the domain's
/// current certificate, so the old one stays in service until the new one is valid. The edge serves it without
/// restart. The key is stored sealed and never returned.
#[utoipa::path(tag = "certificates", security(("bearer" = [])), request_body = UploadCertificate,
    responses(
        (status = 201, description = "Stored and served", body = Certificate),
        (status = 400, description = "Not PEM of the expected kind (`invalid_certificate`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`certificate_key_mismatch`, `certificate_chain_invalid`, `certificate_name_mismatch` or `domain_not_verified`", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/certificates")]
pub(crate) async fn upload_certificate(
    state: web::Data<AppState>,
    auth: Auth,
    body: crate::json::Json<UploadCertificate>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    let body = body.into_inner();
    let domain = state.store.tenant_domain(auth.tenant, &body.domain).await?;
    if !domain.verified {
        return Err(ApiError::new(
            ErrorCode::DomainNotVerified,
            format!(
                "{} is not verified yet: publish TXT {} = \"{}\" and verify it before uploading its certificate",
                domain.name,
                domain.txt_name(),
                domain.txt_value()
            ),
        ));
    }
    let secret = state.secret_key.clone();
    let name = domain.name.clone();
    let (chain_pem, key_pem) = (body.chain_pem, body.key_pem);
    let checked = web::block(move || {
        let checked = check_upload(&chain_pem, &key_pem, &name, time::OffsetDateTime::now_utc())?;
        let sealed = secret.seal(key_pem.as_bytes()).map_err(|e| UploadError::Unreadable(e.to_string()))?;
        Ok::<_, UploadError>((checked, chain_pem, sealed))
    })
    .await
    .map_err(|e| ApiError::internal(&e))?;
    let (checked, chain_pem, key_sealed) = checked?;
    let to_utc = |t: time::OffsetDateTime| {
        chrono::DateTime::from_timestamp(t.unix_timestamp(), 0).unwrap_or(chrono::DateTime::UNIX_EPOCH)
    };
    let cert = state
        .store
        .put_certificate(
            auth.tenant,
            cloud_store::NewCertificate {
                domain: domain.name,
                names: checked.names,
                source: "upload",
                chain_pem,
                key_sealed,
                not_before: to_utc(checked.not_before),
                not_after: to_utc(checked.not_after),
            },
        )
        .await?;
    Ok(HttpResponse::Created().json(cert))
}

/// List the tenant's certificates.
#[utoipa::path(tag = "certificates", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, description = "A page of certificates", body = Page<Certificate>),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/certificates")]
pub(crate) async fn list_certificates(
    state: web::Data<AppState>,
    auth: Auth,
    query: web::Query<ListQuery>,
) -> ApiResult<web::Json<Page<Certificate>>> {
    auth.require(Scope::Read)?;
    let (cursor, limit) = query.parse()?;
    let (items, next) = state.store.list_certificates(auth.tenant, cursor, limit).await?;
    Ok(web::Json(super::page(items, next)))
}

/// Get a certificate.
#[utoipa::path(tag = "certificates", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Certificate id")),
    responses(
        (status = 200, description = "The certificate", body = Certificate),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/certificates/{id}")]
pub(crate) async fn get_certificate(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<Uuid>,
) -> ApiResult<web::Json<Certificate>> {
    auth.require(Scope::Read)?;
    Ok(web::Json(state.store.certificate(auth.tenant, path.into_inner()).await?))
}

/// Delete a certificate: the edge stops serving it.
#[utoipa::path(tag = "certificates", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Certificate id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/certificates/{id}")]
pub(crate) async fn delete_certificate(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<Uuid>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    state.store.delete_certificate(auth.tenant, path.into_inner()).await?;
    Ok(HttpResponse::NoContent().finish())
}
