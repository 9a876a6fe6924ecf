//! Images: uploads (OCI image archives, docker archives, directory bundles), pulls from registries, and exports
//! in the form uploads take.

use actix_web::body::SizedStream;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use cloud_domain::api::{ErrorCode, Image, ImageArchive, ImageManifest, Page, Problem, PullImage, Scope};
use cloud_domain::names::{NameKind, validate_name};
use cloud_oci::export::LayoutArchive;
use cloud_oci::{Compression, Digest, Limits, Reference, TargetPlatform};
use cloud_store::{BundleError, Store, StoreError};
use futures_util::{StreamExt, TryStreamExt, stream};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};
use crate::validate::ListQuery;
use crate::{AppState, Auth};

/// Where an upload goes.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct UploadQuery {
    /// Image name; required for an upload (a pull names the image in its body). Storing an existing name
    /// replaces its image; instances keep the one they were created with.
    name: Option<String>,
}

/// The content types an upload may be sent with. The content decides what it is, so any of them fits any
/// format; `application/octet-stream` is the one generic clients use.
const UPLOAD_TYPES: [&str; 5] = [
    "application/octet-stream",
    "application/x-tar",
    "application/vnd.oci.image.layout.v1+tar",
    "application/gzip",
    "application/x-gzip",
];

/// Store an image: upload one (`?name=N`, the archive as the body) or pull one from a registry (a JSON body).
///
/// An upload is an OCI image layout in a tar (`skopeo copy ... oci-archive:`, `podman save --format
/// oci-archive`), a `docker save` archive, either plain or gzipped, or a directory bundle (a tar.gz with
/// `manifest.json` at its root); the content decides which. A pull fetches `reference` from its registry,
/// over https unless the registry is one of the platform's insecure registries. Either way every blob is
/// verified by digest and every layer walked before anything is stored, and a refused image stores nothing.
#[utoipa::path(tag = "images", security(("bearer" = [])), params(UploadQuery),
    request_body(
        description = "An image archive or bundle (with `?name=`), or a pull request (JSON).",
        content(
            (ImageArchive = "application/octet-stream"),
            (ImageArchive = "application/x-tar"),
            (ImageArchive = "application/vnd.oci.image.layout.v1+tar"),
            (ImageArchive = "application/gzip"),
            (PullImage = "application/json"),
        )
    ),
    responses(
        (status = 201, description = "Stored", body = Image),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/images")]
pub(crate) async fn create_image(
    state: web::Data<AppState>,
    auth: Auth,
    req: HttpRequest,
    query: web::Query<UploadQuery>,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ct = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let image = if ct == "application/json" {
        let body = read_body(payload, state.config.max_json_bytes, "api.max_json_bytes").await?;
        let pull: PullImage = crate::json::parse(&body)?;
        if let Some(name) = query.name.as_deref().filter(|n| *n != pull.name) {
            return Err(ApiError::new(
                ErrorCode::NamesConflict,
                format!("the query names the image {name:?} and the body {:?}: give one name", pull.name),
            ));
        }
        validate_name(NameKind::Image, &pull.name)?;
        let reference = Reference::parse(&pull.reference)?;
        let image = state.registries.pull(&reference).await?;
        state.store.put_oci_image(auth.tenant, &pull.name, &image, &reference.to_string()).await?
    } else if UPLOAD_TYPES.contains(&ct.as_str()) {
        let Some(name) = query.name.as_deref() else {
            return Err(ApiError::new(
                ErrorCode::InvalidQuery,
                "an upload needs its image name: POST /v1/images?name=N",
            ));
        };
        validate_name(NameKind::Image, name)?;
        let body = read_body(payload, state.config.max_image_bytes, "api.max_image_bytes").await?;
        let limits = state.config.image_limits();
        // Reading verifies every blob and walks every layer: seconds for a large image, off the async workers.
        match web::block(move || read_upload(body, &limits)).await.map_err(|e| ApiError::internal(&e))?? {
            Upload::Oci(image) => state.store.put_oci_image(auth.tenant, name, &image, "upload").await?,
            Upload::Bundle(manifest, bytes) => state.store.put_image(auth.tenant, name, &manifest, &bytes).await?,
        }
    } else {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("'{ct}' is neither an image upload ({}) nor a pull (application/json)", UPLOAD_TYPES.join(", ")),
        ));
    };
    Ok(HttpResponse::Created().json(image))
}

/// Reads the whole body, refusing it once it passes `limit` bytes (the configuration key `key`).
async fn read_body(mut payload: web::Payload, limit: usize, key: &str) -> ApiResult<web::Bytes> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body exceeds the limit of {limit} bytes ({key})"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// What an upload turned out to be.
enum Upload {
    Oci(Box<cloud_oci::Image>),
    Bundle(ImageManifest, web::Bytes),
}

/// Tells the formats apart by content and reads the upload.
fn read_upload(body: web::Bytes, limits: &Limits) -> Result<Upload, ApiError> {
    let neither = || {
        ApiError::new(
            ErrorCode::InvalidImage,
            "the upload is neither an OCI image archive (a tar holding oci-layout and index.json), a docker archive \
             (docker save: a tar whose manifest.json lists images) nor a bundle (a tar.gz with manifest.json at its \
             root); each may be gzipped",
        )
    };
    let gzip = Compression::detect(&body) == Compression::Gzip;
    // Every tar these tools write carries the ustar magic (ustar, GNU and pax formats alike).
    let tar = body.get(257..262) == Some(b"ustar");
    if !gzip && !tar {
        return Err(neither());
    }
    if let Some(image) = cloud_oci::archive::read_if_image(body.clone(), limits, &TargetPlatform::host())? {
        return Ok(Upload::Oci(Box::new(image)));
    }
    if !gzip {
        return Err(neither());
    }
    match cloud_store::parse_bundle(&body) {
        Ok((manifest, _)) => Ok(Upload::Bundle(manifest, body)),
        Err(BundleError::MissingManifest) => Err(neither()),
        Err(e) => Err(e.into()),
    }
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

/// Which version of an image to export.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ArchiveQuery {
    /// A version other than the image's current one, by digest: one that the tenant's instances still run (a
    /// name pushed again leaves its instances on the version they were created with).
    #[param(pattern = "^sha256:[0-9a-f]{64}$")]
    digest: Option<String>,
}

/// Export an image as an archive that uploads back as the same image.
///
/// An OCI image answers as an OCI image layout in a tar (`application/x-tar`, what `skopeo copy ...
/// oci-archive:` writes) holding the manifest, config and layers exactly as stored; a directory bundle answers
/// as the bundle itself (`application/gzip`). Either, uploaded with `POST /v1/images?name=N` here or on another
/// platform, is the same image with the same digest. Built-in images export too. The archive is sent one blob
/// at a time, with its `Content-Length` known up front.
#[utoipa::path(tag = "images", security(("bearer" = [])),
    params(("image" = String, Path, description = "Image name or id"), ArchiveQuery),
    responses(
        (status = 200, description = "The image as an archive", content(
            (ImageArchive = "application/x-tar"),
            (ImageArchive = "application/gzip"),
        )),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/images/{image}/archive")]
pub(crate) async fn export_image(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    query: web::Query<ArchiveQuery>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Read)?;
    let image = state.store.image(auth.tenant, &path).await?;
    let digest = match &query.digest {
        Some(d) => {
            Digest::parse(d).map_err(|_| {
                ApiError::new(
                    ErrorCode::InvalidQuery,
                    format!("digest {d:?} is not sha256: and 64 lowercase hex digits"),
                )
            })?;
            state.store.check_image_version(auth.tenant, &image, d).await?;
            d.clone()
        }
        None => image.digest.clone(),
    };
    // A version is told apart by its content rather than by the image's `format`, which is the current version's.
    let first = web::Bytes::from(state.store.image_bundle(&digest).await?);
    if Compression::detect(&first) == Compression::Gzip {
        return Ok(HttpResponse::Ok()
            .content_type("application/gzip")
            .insert_header(attachment(&image.name, "tar.gz"))
            .body(first));
    }
    let layout = LayoutArchive::new(first, &image.name).map_err(|e| ApiError::internal(&e))?;
    let names: Vec<&str> = layout.blobs().iter().map(Digest::as_str).collect();
    let sizes = state.store.image_blob_sizes(&names).await?;
    let size = layout.size(sizes);
    let body = archive_stream(state.store.clone(), layout);
    Ok(HttpResponse::Ok()
        .content_type("application/x-tar")
        .insert_header(attachment(&image.name, "oci.tar"))
        .body(SizedStream::new(size, body)))
}

/// `Content-Disposition` naming the file as `cloudctl image push` would name the image back.
fn attachment(name: &str, extension: &str) -> (header::HeaderName, String) {
    (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}.{extension}\""))
}

/// The archive's bytes, each blob read from the store only when the client has taken the previous one. A blob
/// that cannot be read now (the database gone, the image deleted meanwhile) ends the body short of its
/// `Content-Length`, which the client sees as a failed transfer.
fn archive_stream(
    store: Store,
    layout: LayoutArchive,
) -> impl futures_util::Stream<Item = Result<web::Bytes, std::io::Error>> + 'static {
    type Part = Result<web::Bytes, StoreError>;
    let image = layout.digest().clone();
    let blobs = stream::iter(layout.blobs().to_vec()).then(move |digest| {
        let store = store.clone();
        async move {
            let data = store.image_bundle(digest.as_str()).await?;
            Ok::<_, StoreError>(stream::iter(LayoutArchive::entry(&digest, data.into()).map(Part::Ok)))
        }
    });
    stream::once(async move { Part::Ok(layout.head()) })
        .chain(blobs.try_flatten())
        .chain(stream::once(async { Part::Ok(LayoutArchive::tail()) }))
        .map_err(move |e| {
            tracing::error!(error = %crate::error::chain(&e), %image, "exporting an image: its archive ends short");
            std::io::Error::other("the image could not be read")
        })
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
