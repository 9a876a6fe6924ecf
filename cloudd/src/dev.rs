//! `cloudd dev`: the platform in one process on an embedded PostgreSQL, with a default tenant and a ready
//! `local` cloudctl remote.

use std::path::PathBuf;

use anyhow::{Context, bail};
use cloud_embedded_pg::{EmbeddedPg, Options};

use crate::config::Config;
use crate::roles::api::{Api, ensure_admin_token};
use crate::roles::{self, Role, certs::Certs, dns::Dns, edge::Edge, node::Node};

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
    if !cfg.is_set("node.state_dir") {
        cfg.node.state_dir = data_dir.join("node");
    }
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let key = cloud_certs::seal::SecretKey::load_or_create(&key_file)?;
    let cfg = &cfg;
    // It owns its database, so it keeps it current.
    let store = roles::open_store(url, cfg, true).await?;
    let created = ensure_admin_token(&store, &key, &cfg.dev.tenant, 365, "cloudd dev: local cloudctl remote").await?;
    let dns = Dns::start(cfg, store.clone()).await?;
    // Instances ask the private listener actually bound (the configuration may say port 0).
    let private_dns = dns.0.private_addrs().into_iter().find_map(|a| match a {
        std::net::SocketAddr::V4(a) => Some(a),
        std::net::SocketAddr::V6(_) => None,
    });
    let node = Node::start_with_dns(cfg, store.clone(), private_dns).await?;
    let edge = Edge::start(cfg, store.clone()).await?;
    let ca_path = data_dir.join("ca.pem");
    std::fs::write(&ca_path, &edge.ca_pem).with_context(|| format!("writing {}", ca_path.display()))?;
    let certs = Certs::start(cfg, store.clone()).await?;
    let api = Api::start(cfg, store).await?;
    let api_url = api.urls.first().cloned().context("the API has no URL")?;
    let pin = api.tls.as_ref().and_then(|t| t.pin.clone());
    let config_path = write_local_remote(&api_url, &created.jwt, pin)?;
    println!("cloudd dev is up.");
    println!("  API:       {api_url}/v1   (docs: {api_url}/docs/)");
    println!("  tenant:    {} (admin token in {}, `cloudd token` prints it)", cfg.dev.tenant, config_path.display());
    let cacert = if cfg.api.tls == cloud_api::tls::TlsMode::Platform {
        format!("--cacert {} ", ca_path.display())
    } else {
        String::new()
    };
    println!("  try:       curl {cacert}-H \"Authorization: Bearer $(cloudd token)\" {api_url}/v1/whoami");
    if let Some(a) = dns.0.public_addrs().first() {
        println!("  DNS:       {a}   (dig @{} -p {} <service fqdn>)", a.ip(), a.port());
    }
    println!("  edge:      https://{}  http://{}", edge.handle.https_addr(), edge.handle.http_addr());
    println!("  CA:        {}   (curl --cacert it https://<service fqdn>)", ca_path.display());
    println!("Ctrl-C stops it; the next start reuses the data.");
    roles::wait_for_shutdown().await;
    tracing::info!("shutting down");
    api.shutdown().await;
    certs.shutdown().await;
    edge.shutdown().await;
    dns.shutdown().await;
    node.shutdown().await;
    Ok(())
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
/// so both read and write one format; other remotes stay, and `local` becomes the default when none is set. An
/// https API is pinned to the platform CA that signs its certificate.
fn write_local_remote(url: &str, token: &str, fingerprint: Option<String>) -> anyhow::Result<PathBuf> {
    let path = cloudctl::config::path(&|k| std::env::var(k).ok());
    let mut cfg = cloudctl::config::Config::load(&path)?;
    cfg.remotes.insert(
        "local".into(),
        cloudctl::config::Remote { url: url.into(), token: Some(token.into()), ca: None, fingerprint },
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
