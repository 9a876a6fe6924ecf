//! The tenant API: HTTP in, store operations out.
//!
//! A request goes through authentication ([`auth::Auth`]), validation with the domain rules (`validate`), one
//! store transaction, and back as JSON; any failure is an [`error::ApiError`] rendered as problem+json in one
//! place. Routes are annotated for utoipa, so the OpenAPI document ([`openapi`]) is generated from the code that
//! serves it and checked in under `openapi/`.

pub mod auth;
pub mod controller;
mod document;
pub mod error;
mod idempotency;
mod json;
mod methods;
mod metrics;
mod rate_limit;
mod readiness;
mod routes;
mod sse;
pub mod tls;
mod validate;

use std::net::TcpListener;

use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use cloud_domain::api::ErrorCode;
use cloud_store::{ChangeFeed, LogFeed, Store};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_actix_web::AppExt;
use utoipa_swagger_ui::SwaggerUi;

pub use auth::{Auth, StartError, TokenSigner, issue_token};
pub use error::{ApiError, ApiResult};
pub use metrics::Metrics;

/// Limits and knobs of the API: the `[api]` section of `cloudd`'s configuration file.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the process serving the API listens.
    pub listen: std::net::SocketAddr,
    /// How the API is served: over TLS with a certificate of the platform CA, over TLS with the configured
    /// certificate, or as plain HTTP for a TLS proxy in front.
    pub tls: tls::TlsMode,
    /// Names (DNS names or IP addresses) the platform CA's certificate is for, besides `localhost`, the loopback
    /// addresses, the listen address and the hosts of `public_urls`.
    pub tls_names: Vec<String>,
    /// PEM certificate chain (leaf first) served with `tls = "files"`.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<std::path::PathBuf>,
    /// The API's URLs as clients reach it, written into join tokens; empty: the listen address's.
    pub public_urls: Vec<String>,
    /// PostgreSQL connections the process opens (its pool's size).
    pub max_connections: u32,
    /// Largest JSON body accepted.
    pub max_json_bytes: usize,
    /// Largest image upload accepted, and the most an image (uploaded or pulled) may store.
    pub max_image_bytes: usize,
    /// The most an image's layers may unpack to.
    pub max_image_unpacked_bytes: u64,
    /// The most entries (files, directories, links) an image's layers may hold together.
    pub max_image_entries: u64,
    /// Registries (`host[:port]`) pulled from over plain http; every other registry must speak https.
    pub insecure_registries: Vec<String>,
    /// Registries (`host[:port]`) pulled from over https although on loopback, private or link-local addresses.
    pub private_registries: Vec<String>,
    /// Recursive resolver for custom domains' ownership records; `None`: /etc/resolv.conf's first nameserver.
    /// A platform setting (`platform.resolver`), given by the caller.
    #[serde(skip)]
    pub resolver: Option<std::net::SocketAddr>,
    /// The platform secret key (`platform.secret_key_file`), required: it seals the token signing key, uploaded
    /// certificates' keys and stored idempotent responses. `None` only so that the limits have a default; the
    /// caller opens the key file.
    #[serde(skip)]
    pub secret_key: Option<std::sync::Arc<cloud_certs::seal::SecretKey>>,
    /// How long an event stream stays silent before a keepalive comment: shorter than proxies' idle timeouts.
    #[serde(rename = "stream_keepalive_seconds", with = "cloud_domain::duration::seconds")]
    pub stream_keepalive: std::time::Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        let image = cloud_oci::Limits::default();
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7300)),
            tls: tls::TlsMode::Platform,
            tls_names: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            public_urls: Vec::new(),
            max_connections: 20,
            max_json_bytes: 256 * 1024,
            max_image_bytes: image.max_stored_bytes as usize,
            max_image_unpacked_bytes: image.max_unpacked_bytes,
            max_image_entries: image.max_entries,
            insecure_registries: Vec::new(),
            private_registries: Vec::new(),
            resolver: None,
            secret_key: None,
            stream_keepalive: std::time::Duration::from_secs(15),
        }
    }
}

impl ApiConfig {
    /// What an image may make the API read and store.
    pub fn image_limits(&self) -> cloud_oci::Limits {
        cloud_oci::Limits {
            max_stored_bytes: self.max_image_bytes as u64,
            max_unpacked_bytes: self.max_image_unpacked_bytes,
            max_entries: self.max_image_entries,
            ..cloud_oci::Limits::default()
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The platform state.
    pub store: Store,
    /// Token signing and verification.
    pub signer: TokenSigner,
    /// The platform secret key, from the configuration.
    pub secret_key: std::sync::Arc<cloud_certs::seal::SecretKey>,
    /// The newest committed change, for event streams.
    pub feed: ChangeFeed,
    /// New log lines, for log streams.
    pub logs: LogFeed,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Limits.
    pub config: ApiConfig,
    /// The platform CA certificate, read once.
    pub ca_pem: tokio::sync::OnceCell<String>,
    /// Checks custom domains' ownership records.
    pub ownership: cloud_certs::ownership::OwnershipChecker,
    /// Pulls images from registries.
    pub registries: cloud_oci::registry::Registries,
    /// What join tokens tell clients: where the API is and what to pin. Set by whoever serves the API over TLS.
    pub join: JoinSettings,
    /// Bounds join attempts per source address.
    pub join_limiter: rate_limit::RateLimiter,
    /// Keeps `cloud_api_database_up` current.
    _probe: readiness::DatabaseProbe,
}

/// What a join token says besides its secret.
#[derive(Debug, Clone, Default)]
pub struct JoinSettings {
    /// The API's URLs as clients reach it.
    pub urls: Vec<String>,
    /// The certificate fingerprint clients pin: the platform CA's, or the configured certificate's; `None` for plain
    /// HTTP behind a proxy, whose certificate a public CA vouches for.
    pub fingerprint: Option<String>,
}

impl AppState {
    /// Loads the signing key (sealing one left in clear by an earlier version) and starts following the change
    /// feed and the log notifications. Fails without the platform secret key.
    pub async fn new(store: Store, config: ApiConfig) -> Result<Self, StartError> {
        let secret_key = config.secret_key.clone().ok_or(StartError::NoSecretKey)?;
        let metrics = Metrics::new();
        Ok(Self {
            signer: TokenSigner::load(&store, &secret_key).await?,
            secret_key,
            feed: ChangeFeed::start(store.clone()).await?,
            _probe: readiness::DatabaseProbe::start(store.clone(), metrics.database_up.clone()),
            logs: LogFeed::start(store.clone()).await?,
            metrics,
            store,
            ca_pem: tokio::sync::OnceCell::new(),
            ownership: cloud_certs::ownership::OwnershipChecker::new(config.resolver),
            registries: cloud_oci::registry::Registries::new(
                cloud_oci::registry::RegistryAccess {
                    insecure: config.insecure_registries.clone(),
                    private: config.private_registries.clone(),
                },
                config.image_limits(),
            ),
            join: JoinSettings { urls: tls::public_urls(&config), fingerprint: None },
            // Ten attempts at once, then one every six seconds, per source address.
            join_limiter: rate_limit::RateLimiter::new(10, std::time::Duration::from_secs(6)),
            config,
        })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cloud platform API",
        description = "Tenants create services (public FQDNs with port mappings) and instances (private IPs and \
                       FQDNs). Errors are RFC 9457 problem documents whose `code` is one of `ErrorCode`.",
        version = "1"
    ),
    components(schemas(cloud_domain::api::ErrorCode, cloud_domain::api::Problem)),
    modifiers(&BearerAuth),
    tags(
        (name = "tenants", description = "Tenants and quotas (admin scope)."),
        (name = "tokens", description = "API tokens: JWTs that can be revoked."),
        (name = "services", description = "Public names with port mappings."),
        (name = "instances", description = "Running copies of images with private IPs."),
        (name = "images", description = "OCI images (uploaded archives or pulled from registries) and directory bundles."),
        (name = "certificates", description = "Certificates for custom domains."),
        (name = "secrets", description = "Environment variables whose values are sealed and never shown again."),
        (name = "events", description = "The tenant's change stream."),
        (name = "system", description = "Health, readiness and metrics.")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The OpenAPI document, generated from the routes, for a platform with the default settings (what
/// `scripts/openapi` checks in).
pub fn openapi() -> serde_json::Value {
    openapi_for(&cloud_store::Settings::default())
}

/// The OpenAPI document of a platform with these settings (its raw TCP port range and domains).
pub fn openapi_for(settings: &cloud_store::Settings) -> serde_json::Value {
    let doc = App::new().into_utoipa_app().openapi(ApiDoc::openapi()).configure(routes::configure).split_for_parts().1;
    let mut doc = serde_json::to_value(doc).expect("the document serializes");
    document::finish(&mut doc, settings);
    doc
}

/// Starts serving on a bound listener, over TLS when given its settings (HTTP/2 and HTTP/1.1 by ALPN), else plain
/// HTTP. The returned server runs until stopped or dropped.
pub fn serve(
    state: web::Data<AppState>,
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
) -> std::io::Result<actix_web::dev::Server> {
    // Bodies read whole (by the idempotency layer) may be image bundles.
    let body_limit = state.config.max_image_bytes;
    let doc = openapi_for(state.store.settings());
    let routes = web::Data::new(methods::RouteTable::new(&doc));
    let server = HttpServer::new(move || {
        let (app, _) =
            App::new()
                .into_utoipa_app()
                .openapi(ApiDoc::openapi())
                .app_data(state.clone())
                .app_data(routes.clone())
                .app_data(web::PayloadConfig::new(body_limit))
                .app_data(web::QueryConfig::default().error_handler(|e, _| {
                    ApiError::new(ErrorCode::InvalidQuery, format!("invalid query string: {e}")).into()
                }))
                .app_data(web::PathConfig::default().error_handler(|e, _| {
                    ApiError::new(ErrorCode::InvalidRequest, format!("invalid path: {e}")).into()
                }))
                .configure(routes::configure)
                .split_for_parts();
        app.wrap(from_fn(idempotency::middleware))
            .wrap(from_fn(metrics::middleware))
            .service(SwaggerUi::new("/docs/{_:.*}").external_url_unchecked("/openapi.json", doc.clone()))
            .route("/docs", web::get().to(|| async { web::Redirect::to("/docs/").permanent() }))
            .default_service(web::to(methods::unrouted))
    })
    .workers(2)
    .shutdown_timeout(5);
    let server = match tls {
        Some(config) => server.listen_rustls_0_23(listener, config)?,
        None => server.listen(listener)?,
    };
    Ok(server.run())
}
