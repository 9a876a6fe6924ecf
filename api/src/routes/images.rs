//! Images: uploads of tar.gz bundles.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use cloud_domain::api::{ErrorCode, Image, Page, Problem, Scope};
use cloud_domain::names::NameKind;
use futures_util::StreamExt;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};
use crate::validate::{self, ListQuery};
use crate::{AppState, Auth};

/// Where an upload goes.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct UploadQuery {
    /// Image name; pushing an existing name replaces its bundle.
    name: String,
}

/// Upload an image bundle: a tar.gz of a directory with `manifest.json` (`{"command": [...], "port": N}`) at
/// its root.
#[utoipa::path(tag = "images", security(("bearer" = [])), params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/gzip", description = "The bundle"),
    responses(
        (status = 201, description = "Stored", body = Image),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/images")]
pub(crate) async fn upload_image(
    state: web::Data<AppState>,
    auth: Auth,
    req: HttpRequest,
    query: web::Query<UploadQuery>,
    mut payload: web::Payload,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    validate::name(NameKind::Image, &query.name)?;
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ct = ct.split(';').next().unwrap_or("").trim();
    if !matches!(ct, "application/gzip" | "application/x-gzip" | "application/octet-stream") {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("an image upload is a tar.gz with 'Content-Type: application/gzip', not '{ct}'"),
        ));
    }
    let limit = state.config.max_image_bytes;
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(ErrorCode::PayloadTooLarge, format!("the bundle exceeds {limit} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    // Unpacking checks run off the async workers: a large bundle takes a while to inflate.
    let bytes = web::Bytes::from(body);
    let checked = bytes.clone();
    let (manifest, _) =
        web::block(move || cloud_store::parse_bundle(&checked)).await.map_err(|e| ApiError::internal(&e))??;
    let image = state.store.put_image(auth.tenant, &query.name, &manifest, &bytes).await?;
    Ok(HttpResponse::Created().json(image))
}

/// List the images the tenant can use: built-in ones and its own.
#[utoipa::path(tag = "images", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, description = "A page of images", body = Page<Image>),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/images")]
pub(crate) async fn list_images(
    state: web::Data<AppState>,
    auth: Auth,
    query: web::Query<ListQuery>,
) -> ApiResult<web::Json<Page<Image>>> {
    auth.require(Scope::Read)?;
    let (cursor, limit) = query.parse()?;
    let (items, next) = state.store.list_images(auth.tenant, cursor, limit).await?;
    Ok(web::Json(super::page(items, next)))
}

/// Get an image by name or id.
#[utoipa::path(tag = "images", security(("bearer" = [])),
    params(("image" = String, Path, description = "Image name or id")),
    responses(
        (status = 200, description = "The image", body = Image),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/images/{image}")]
pub(crate) async fn get_image(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Image>> {
    auth.require(Scope::Read)?;
    Ok(web::Json(state.store.image(auth.tenant, &path).await?))
}

/// Delete one of the tenant's images; refused while instances use it.
#[utoipa::path(tag = "images", security(("bearer" = [])),
    params(("image" = String, Path, description = "Image name or id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/images/{image}")]
pub(crate) async fn delete_image(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    state.store.delete_image(auth.tenant, &path).await?;
    Ok(HttpResponse::NoContent().finish())
}
