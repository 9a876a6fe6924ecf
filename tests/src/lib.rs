//! The test harness: real PostgreSQL, real servers on port 0, no shared state between tests.
//!
//! Each test gets a fresh database on one server per test binary: the server named by `DATABASE_URL` (any
//! database on it; the harness creates new ones beside it; tests that count statements need it to load
//! `pg_stat_statements`), or else a private cluster started from the system's PostgreSQL binaries that dies with
//! the test process.

pub mod hosts;
pub mod pebble;
pub mod pki;
pub mod registry;
pub mod relay;
pub mod txt_server;

use std::net::TcpListener;
use std::sync::Arc;

use cloud_api::{ApiConfig, AppState, TokenSigner, issue_token};
use cloud_certs::seal::SecretKey;
use cloud_domain::api::{CreatedToken, QuotasPatch, Scope, Tenant};
use cloud_embedded_pg::{EmbeddedPg, Options};
use cloud_store::{Settings, Store};
use tokio::sync::OnceCell;

/// Where test databases are created.
enum Server {
    External(String),
    Embedded(EmbeddedPg),
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
                return Server::External(url);
            }
            remove_stale_clusters();
            let dir = std::env::temp_dir().join(format!("cloud-tests-pg-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let pg = EmbeddedPg::start_ephemeral(Options { data_dir: dir, port: None, bin_dir: None })
                .await
                .expect("starting an embedded PostgreSQL for the tests");
            Server::Embedded(pg)
        })
        .await
}

/// Removes the clusters of earlier test processes: the static cluster of a test binary is never dropped, so its
/// server dies with the process but its data directory stays.
fn remove_stale_clusters() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("cloud-tests-pg-").and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Replaces the database name of a PostgreSQL URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database() -> String {
    let admin = match server().await {
        Server::External(url) => url.clone(),
        Server::Embedded(pg) => pg.url("postgres"),
    };
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let pool = cloud_store::connect(&admin, 1).await.expect("connecting to the test server");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await.expect("CREATE DATABASE");
    pool.close().await;
    with_database(&admin, &name)
}

/// A migrated store on a fresh database.
pub async fn fresh_store() -> Store {
    fresh_store_with(Settings::default()).await
}

/// A migrated store on a fresh database, with the given settings.
pub async fn fresh_store_with(settings: Settings) -> Store {
    let url = fresh_database().await;
    let pool = cloud_store::connect(&url, 10).await.expect("connecting to the test database");
    let store = Store::new(pool, settings);
    store.migrate().await.expect("migrations");
    store
}

/// Inserts the services `s1` to `s<count>` of `tenant` straight into the table, behind the API's and the change
/// feed's back, for scale tests and benchmarks that do not measure the API's cost per request: `s<i>` gets the FQDN
/// `s<i>-<fqdn_suffix>` and no ports.
pub async fn insert_services(store: &Store, tenant: uuid::Uuid, count: i64, fqdn_suffix: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO services (id, tenant_id, name, fqdn)
         SELECT gen_random_uuid(), $1, 's' || i, 's' || i || '-' || $2 FROM generate_series(1, $3) AS i",
    )
    .bind(tenant)
    .bind(fqdn_suffix)
    .bind(count)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// A field of `/proc/<pid>/status` that is given in kB (`VmRSS`, `VmHWM`), in KiB; `None` when the process or the
/// field is not there.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.split_whitespace().next()?.parse().ok()
}

/// A running API on port 0 over a fresh database, with one tenant and its admin token.
pub struct TestApi {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The store behind the API.
    pub store: Store,
    /// The first tenant (`acme`).
    pub tenant: Tenant,
    /// An admin token of `acme`.
    pub token: String,
    /// The platform secret key the API was given.
    pub secret_key: Arc<SecretKey>,
    /// Signs tokens with the platform's key, as the API does.
    pub signer: TokenSigner,
    config: ApiConfig,
    handle: actix_web::dev::ServerHandle,
    controller: Option<Controller>,
}

/// The platform's controller, stopped with its [`TestApi`].
struct Controller(tokio::task::JoinHandle<()>);

impl Drop for Controller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TestApi {
    /// Starts the API with default limits.
    pub async fn start() -> Self {
        Self::start_with(ApiConfig::default()).await
    }

    /// Starts the API with the given limits (and a fresh platform secret key unless they name one).
    pub async fn start_with(config: ApiConfig) -> Self {
        Self::start_with_settings(Settings::default(), config).await
    }

    /// Starts the API with the given platform settings and limits.
    pub async fn start_with_settings(settings: Settings, config: ApiConfig) -> Self {
        Self::start_on(fresh_store_with(settings).await, config).await
    }

    /// Starts the API over an existing store, as a new replica or a new version would.
    pub async fn start_on(store: Store, mut config: ApiConfig) -> Self {
        let secret_key = config.secret_key.get_or_insert_with(|| Arc::new(random_secret_key())).clone();
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding port 0");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        let (signer, handle) = serve(&store, &config, listener).await;
        let admin = [Scope::Read, Scope::Write, Scope::Admin];
        let (tenant, created) = tenant_with_token(&store, &signer, "acme", &admin).await;
        Self { base, store, tenant, token: created.jwt, secret_key, signer, config, handle, controller: None }
    }

    /// Runs the platform's controller beside the API, as `cloudd api` does (drains end, rollouts and autoscale
    /// move on). Tests that step those by hand leave it off.
    pub fn start_controller(&mut self) {
        self.controller = Some(Controller(tokio::spawn(cloud_api::controller::run(self.store.clone()))));
    }

    /// Stops the API, cutting its connections, and starts it again on the same address over the same database,
    /// as a restart (or an upgrade) does.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Stops the API, cutting its connections.
    pub async fn stop(&mut self) {
        self.handle.stop(false).await;
    }

    /// Starts a stopped API again on the same address over the same database.
    pub async fn start_again(&mut self) {
        let addr = self.base.trim_start_matches("http://");
        // The old listener is closed when its server has stopped; the address is free again soon after.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let listener = loop {
            match TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("binding {addr} again: {e}"),
            }
        };
        let (signer, handle) = serve(&self.store, &self.config, listener).await;
        (self.signer, self.handle) = (signer, handle);
    }

    /// A new tenant and a token with the given scopes.
    pub async fn tenant(&self, name: &str, scopes: &[Scope]) -> (Tenant, String) {
        let (t, c) = tenant_with_token(&self.store, &self.signer, name, scopes).await;
        (t, c.jwt)
    }

    /// A new token of an existing tenant, issued as the API does.
    pub async fn issue_token(&self, tenant: &Tenant, scopes: &[Scope]) -> CreatedToken {
        issue_token(&self.store, &self.signer, tenant.id, scopes, chrono::Duration::days(1), "test")
            .await
            .expect("token")
    }

    /// The URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Uploads an image made of `files` (one must be `manifest.json`) under `name`, as `token`'s tenant.
    pub async fn upload_image(&self, token: &str, name: &str, files: &[(&str, &str)]) {
        let res = reqwest::Client::new()
            .post(self.url(&format!("/v1/images?name={name}")))
            .bearer_auth(token)
            .header("content-type", "application/gzip")
            .body(bundle(files))
            .send()
            .await
            .expect("uploading an image");
        let status = res.status();
        assert_eq!(status, 201, "uploading {name}: {}", res.text().await.unwrap_or_default());
    }
}

/// Serves the API over `store`'s database on `listener`, with a pool of its own as the API's process has: its
/// workers run on runtimes of their own, and a connection one of them opened is dead once the API stops, so the
/// test's pool must not hold one.
async fn serve(
    store: &Store,
    config: &ApiConfig,
    listener: TcpListener,
) -> (TokenSigner, actix_web::dev::ServerHandle) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(store.pool().options().get_max_connections())
        .connect_with((*store.pool().connect_options()).clone())
        .await
        .expect("connecting the API to the test database");
    let own = Store::new(pool, store.settings().clone());
    let state = AppState::new(own, config.clone()).await.expect("API state");
    let signer = state.signer.clone();
    let server = cloud_api::serve(actix_web::web::Data::new(state), listener, None).expect("serving");
    let handle = server.handle();
    tokio::spawn(server);
    (signer, handle)
}

/// An image bundle: `files` (path, content), executable, packed as tar.gz.
pub fn bundle(files: &[(&str, &str)]) -> Vec<u8> {
    use std::io::Write;
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        tar.append_data(&mut h, path, data.as_bytes()).expect("packing");
    }
    let mut gz = tar.into_inner().expect("packing");
    gz.flush().expect("packing");
    gz.finish().expect("packing")
}

impl Drop for TestApi {
    fn drop(&mut self) {
        // Stop accepting; the workers end with the test's runtime.
        drop(self.handle.stop(false));
    }
}

/// A fresh platform secret key (from two random UUIDs).
pub fn random_secret_key() -> SecretKey {
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(a.as_bytes());
    bytes[16..].copy_from_slice(b.as_bytes());
    SecretKey::from_bytes(&bytes)
}

/// Creates a tenant and issues it a token.
async fn tenant_with_token(
    store: &Store,
    signer: &TokenSigner,
    name: &str,
    scopes: &[Scope],
) -> (Tenant, CreatedToken) {
    let tenant = store.create_tenant(name, QuotasPatch::default()).await.expect("tenant");
    let created =
        issue_token(store, signer, tenant.id, scopes, chrono::Duration::days(1), "test").await.expect("token");
    (tenant, created)
}

#[cfg(test)]
mod tests {
    use super::{proc_status_kib, with_database};

    #[test]
    fn database_names_are_replaced_in_urls() {
        assert_eq!(with_database("postgres://u:p@h:5/postgres", "x"), "postgres://u:p@h:5/x");
        assert_eq!(with_database("postgres://u:p@h:5", "x"), "postgres://u:p@h:5/x");
        assert_eq!(with_database("postgres://h/db?sslmode=disable", "x"), "postgres://h/x?sslmode=disable");
    }

    #[test]
    fn status_fields_are_read_whole_by_name() {
        let me = std::process::id();
        assert!(proc_status_kib(me, "VmRSS").is_some_and(|kib| kib > 0));
        assert_eq!(proc_status_kib(me, "VmRS"), None, "a prefix of a field's name is not the field");
        assert_eq!(proc_status_kib(me, "NoSuchField"), None);
    }
}
