//! `cloudd dev`: the platform in one process on an embedded PostgreSQL, with a default tenant and a ready
//! `local` cloudctl remote.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{Context, bail};
use chrono::Duration;
use cloud_api::{AppState, issue_token};
use cloud_domain::api::{CreatedToken, QuotasPatch, Scope};
use cloud_embedded_pg::{EmbeddedPg, Options};
use cloud_store::{Store, StoreError};

use crate::config::Config;

/// The database `cloudd dev` keeps its state in, inside the embedded cluster.
const DEV_DATABASE: &str = "cloud";

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = cfg.for_dev(nix_is_root());
    let mut embedded = None;
    let dir = cfg.dev.data_dir.clone().unwrap_or_else(default_data_dir);
    let url = match &cfg.database_url {
        Some(url) => url.clone(),
        None => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating the data dir {}", dir.display()))?;
            let pg = EmbeddedPg::start(Options { data_dir: dir.join("postgres"), port: None, bin_dir: None })
                .await
                .context("starting the embedded PostgreSQL")?;
            create_database(&pg.url("postgres"), DEV_DATABASE).await?;
            let url = pg.url(DEV_DATABASE);
            embedded = Some(pg);
            url
        }
    };
    let result = serve_dev(&cfg, &url, dir).await;
    if let Some(pg) = embedded {
        pg.stop().await.context("stopping the embedded PostgreSQL")?;
    }
    result
}

async fn serve_dev(cfg: &Config, url: &str, data_dir: PathBuf) -> anyhow::Result<()> {
    let mut cfg = cfg.clone();
    let key_file = cfg.platform.secret_key_file.get_or_insert_with(|| data_dir.join("secret.key")).clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let key = cloud_certs::seal::SecretKey::load_or_create(&key_file)?;
    let cfg = &cfg;
    let store = crate::open_store(url, cfg).await?;
    let created = ensure_admin_token(&store, &key, &cfg.dev.tenant, 365, "cloudd dev: local cloudctl remote").await?;
    let dns = start_dns(cfg, store.clone()).await?;
    // Instances ask the private listener actually bound (the configuration may say port 0).
    let private_dns = dns.private_addrs().into_iter().find_map(|a| match a {
        std::net::SocketAddr::V4(a) => Some(a),
        std::net::SocketAddr::V6(_) => None,
    });
    let node = start_node(cfg, store.clone(), data_dir.join("node"), private_dns).await?;
    let (edge, ca_pem) = start_edge(cfg, store.clone()).await?;
    let ca_path = data_dir.join("ca.pem");
    std::fs::write(&ca_path, &ca_pem).with_context(|| format!("writing {}", ca_path.display()))?;
    let (certs, _) = start_certs(cfg, store.clone())?;
    let server = start_api(cfg, store).await?;
    let api_url = format!("http://{}", cfg.api.listen);
    let config_path = write_local_remote(&api_url, &created.jwt)?;
    println!("cloudd dev is up.");
    println!("  API:       {api_url}/v1   (docs: {api_url}/docs/)");
    println!("  tenant:    {} (admin token in {}, `cloudd token` prints it)", cfg.dev.tenant, config_path.display());
    println!("  try:       curl -H \"Authorization: Bearer $(cloudd token)\" {api_url}/v1/whoami");
    if let Some(a) = dns.public_addrs().first() {
        println!("  DNS:       {a}   (dig @{} -p {} <service fqdn>)", a.ip(), a.port());
    }
    println!("  edge:      https://{}  http://{}", edge.https_addr(), edge.http_addr());
    println!("  CA:        {}   (curl --cacert it https://<service fqdn>)", ca_path.display());
    println!("Ctrl-C stops it; the next start reuses the data.");
    wait_for_shutdown().await;
    tracing::info!("shutting down");
    server.stop(true).await;
    certs.abort();
    edge.shutdown().await;
    dns.shutdown().await;
    node.shutdown().await;
    Ok(())
}

/// Starts the DNS following the change feed.
pub async fn start_dns(cfg: &Config, store: Store) -> anyhow::Result<cloud_dns::DnsHandle> {
    let feed = cloud_store::ChangeFeed::start(store.clone()).await?;
    let dns = cloud_dns::start(store, feed, cfg.dns_config()).await.context("starting the DNS")?;
    tracing::info!(public = ?dns.public_addrs(), private = ?dns.private_addrs(), "DNS serving");
    Ok(dns)
}

/// Starts the edge following the change feed, serving the platform wildcard from the platform CA (kept valid by
/// a background task). Returns the CA too, for those who must trust it.
pub async fn start_edge(cfg: &Config, store: Store) -> anyhow::Result<(cloud_edge::EdgeHandle, String)> {
    let mut config = cfg.edge_config()?;
    config.access_log.json = std::env::var("CLOUD_LOG_FORMAT").is_ok_and(|v| v == "json");
    let key = config.secret_key.clone().context(
        "the edge needs the platform secret key (platform.secret_key_file): it seals the platform CA's key and \
         tenants' certificate keys",
    )?;
    let ca = cloud_certs::PlatformCa::load_or_create(&store, &key).await.context("loading the platform CA")?;
    let ca_pem = ca.cert_pem().to_owned();
    let certs = std::sync::Arc::new(cloud_edge::CertStore::default());
    let zone = store.settings().zone();
    let not_after = serve_wildcard(&ca, &zone, &certs)?;
    tokio::spawn(renew_wildcard(ca, zone, certs.clone(), not_after));
    let feed = cloud_store::ChangeFeed::start(store.clone()).await?;
    let edge = cloud_edge::start(store, feed, certs, config).await.context("starting the edge")?;
    Ok((edge, ca_pem))
}

/// Validity of the platform wildcard, and how long before its end it is replaced.
const WILDCARD_VALIDITY: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);
const WILDCARD_RENEW_BEFORE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

fn serve_wildcard(
    ca: &cloud_certs::PlatformCa,
    zone: &str,
    certs: &cloud_edge::CertStore,
) -> anyhow::Result<time::OffsetDateTime> {
    let issued = ca.issue_wildcard(zone, WILDCARD_VALIDITY)?;
    let served = cloud_edge::ServedCert::from_pem(
        vec![format!("*.{zone}"), zone.to_owned()],
        &issued.chain_pem,
        &issued.key_pem,
    )?;
    certs.replace(vec![served]);
    tracing::info!(zone, not_after = %issued.not_after, "serving the platform wildcard certificate");
    Ok(issued.not_after)
}

/// Replaces the wildcard before it expires; retries hourly on failure.
async fn renew_wildcard(
    ca: cloud_certs::PlatformCa,
    zone: String,
    certs: std::sync::Arc<cloud_edge::CertStore>,
    mut not_after: time::OffsetDateTime,
) {
    loop {
        let renew_at = not_after - WILDCARD_RENEW_BEFORE;
        let wait = (renew_at - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        tokio::time::sleep(wait.try_into().unwrap_or(std::time::Duration::ZERO).max(std::time::Duration::from_secs(1)))
            .await;
        match serve_wildcard(&ca, &zone, &certs) {
            Ok(t) => not_after = t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the platform wildcard; retrying in an hour");
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            }
        }
    }
}

/// Starts the certificate manager (ownership checks, ACME orders and renewals when an ACME directory is
/// configured); returns its task and its probe.
pub fn start_certs(
    cfg: &Config,
    store: Store,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, cloud_certs::manager::ManagerProbe)> {
    let key = cfg.secret_key()?.context(
        "the certificate manager needs the platform secret key (platform.secret_key_file): it seals certificate keys",
    )?;
    let checker = cloud_certs::ownership::OwnershipChecker::new(cfg.platform.resolver);
    let manager =
        cloud_certs::manager::CertManager::new(store, std::sync::Arc::new(key), checker, cfg.manager_config()?);
    let probe = manager.probe();
    Ok((tokio::spawn(manager.run()), probe))
}

/// Starts a node agent following the change feed; `dns` is the private DNS for instances unless `node.dns` names one.
pub async fn start_node(
    cfg: &Config,
    store: Store,
    state_dir: PathBuf,
    dns: Option<std::net::SocketAddrV4>,
) -> anyhow::Result<cloud_runtime::NodeHandle> {
    let feed = cloud_store::ChangeFeed::start(store.clone()).await?;
    let mut node_cfg = cfg.node_config(state_dir)?;
    node_cfg.dns = node_cfg.dns.or(dns);
    let node = cloud_runtime::start(store, feed, node_cfg).await.context("starting the node agent")?;
    Ok(node)
}

/// Starts the API on the configured address.
pub async fn start_api(cfg: &Config, store: Store) -> anyhow::Result<actix_web::dev::ServerHandle> {
    let state = AppState::new(store, cfg.api_config()?).await.context("preparing the API")?;
    let listener =
        TcpListener::bind(cfg.api.listen).with_context(|| format!("binding the API to {}", cfg.api.listen))?;
    let server = cloud_api::serve(actix_web::web::Data::new(state), listener)?;
    let handle = server.handle();
    tokio::spawn(server);
    tracing::info!(listen = %cfg.api.listen, "API serving");
    Ok(handle)
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn wait_for_shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Creates the tenant when missing and issues an admin token for it, signed with the platform's key (sealed with
/// `key`).
pub async fn ensure_admin_token(
    store: &Store,
    key: &cloud_certs::seal::SecretKey,
    tenant: &str,
    days: i64,
    why: &str,
) -> anyhow::Result<CreatedToken> {
    cloud_domain::names::validate_name(cloud_domain::names::NameKind::Tenant, tenant)?;
    let tenant = match store.tenant(tenant).await {
        Ok(t) => t,
        Err(StoreError::NotFound { .. }) => store.create_tenant(tenant, QuotasPatch::default()).await?,
        Err(e) => return Err(e.into()),
    };
    let signer = cloud_api::TokenSigner::load(store, key).await?;
    let scopes = [Scope::Read, Scope::Write, Scope::Admin];
    issue_token(store, &signer, tenant.id, &scopes, Duration::days(days), why)
        .await
        .map_err(|e| anyhow::anyhow!("issuing a token: {e}"))
}

async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let pool = cloud_store::connect(admin_url, 1).await.context("connecting to the embedded PostgreSQL")?;
    let (exists,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&pool)
        .await?;
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&pool).await?;
    }
    pool.close().await;
    Ok(())
}

/// Root runs the cluster in a system location its unprivileged PostgreSQL account can reach; a user in their
/// XDG data directory.
fn default_data_dir() -> PathBuf {
    if nix_is_root() {
        return PathBuf::from("/var/lib/cloudd");
    }
    match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("cloudd"),
        None => home().join(".local/share/cloudd"),
    }
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

/// Registers (or refreshes) the `local` remote in cloudctl's configuration, through cloudctl's own config module
/// so both read and write one format; other remotes stay, and `local` becomes the default when none is set.
fn write_local_remote(url: &str, token: &str) -> anyhow::Result<PathBuf> {
    let path = cloudctl::config::path(&|k| std::env::var(k).ok());
    let mut cfg = cloudctl::config::Config::load(&path)?;
    cfg.remotes.insert(
        "local".into(),
        cloudctl::config::Remote { url: url.into(), token: Some(token.into()), ca: None, fingerprint: None },
    );
    cfg.default_remote.get_or_insert_with(|| "local".into());
    cfg.save(&path)?;
    Ok(path)
}

/// The token of the `local` remote.
pub fn local_token() -> anyhow::Result<String> {
    let path = cloudctl::config::path(&|k| std::env::var(k).ok());
    let cfg = cloudctl::config::Config::load(&path)?;
    match cfg.remotes.get("local").and_then(|r| r.token.clone()) {
        Some(token) => Ok(token),
        None => bail!("{} has no `local` remote with a token; run `cloudd dev` first (as this user)", path.display()),
    }
}
