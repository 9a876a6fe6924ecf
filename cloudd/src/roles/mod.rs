//! The platform's roles as `cloudd` runs them: each file starts its role, says what its operations endpoint
//! reports and shuts it down; [`run`] drives any of them as a process of its own (`cloudd edge`, ...), and
//! `cloudd dev` starts them all in one.

pub mod api;
pub mod certs;
pub mod dns;
pub mod edge;
pub mod node;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use cloud_store::Store;

use crate::config::Config;
use crate::ops::Probe;

/// A role run as its own process.
pub trait Role: Sized + Send + 'static {
    /// Its subcommand, for the log.
    const NAME: &'static str;
    /// Starts it on the store.
    fn start(cfg: &Config, store: Store) -> impl Future<Output = anyhow::Result<Self>> + Send;
    /// Where its operations endpoint listens and what it reports; `None` for a role that serves its own
    /// (the API, on its listener).
    fn ops(&self, cfg: &Config) -> Option<(SocketAddr, Arc<dyn Probe>)>;
    /// Stops it, letting what is in flight finish.
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}

/// Runs one role until SIGTERM or Ctrl-C: connects, starts it, serves its operations endpoint, then stops both.
pub async fn run<R: Role>(cfg: Config) -> anyhow::Result<()> {
    tracing::info!(role = R::NAME, "connecting to PostgreSQL");
    let store = connect(&cfg).await?;
    tracing::info!(role = R::NAME, "connected, the schema is current; starting");
    let role = R::start(&cfg, store).await?;
    tracing::info!(role = R::NAME, "started");
    let ops = role.ops(&cfg).map(|(listen, probe)| crate::ops::serve(listen, probe)).transpose()?;
    wait_for_shutdown().await;
    if let Some(ops) = ops {
        ops.stop(true).await;
    }
    role.shutdown().await;
    Ok(())
}

/// Connects to the configured database; applies pending migrations only when `migrate` (or
/// `migrate_on_start`) says so, else refuses a schema that is behind.
pub async fn connect_for(cfg: &Config, migrate: bool) -> anyhow::Result<Store> {
    let Some(url) = &cfg.database_url else {
        bail!("DATABASE_URL (or database_url in the config file) is required for this role; `cloudd dev` embeds one")
    };
    open_store(url, cfg, migrate).await
}

/// [`connect_for`] as the configuration says: migrating only with `migrate_on_start`.
pub async fn connect(cfg: &Config) -> anyhow::Result<Store> {
    connect_for(cfg, cfg.migrate_on_start).await
}

/// Opens the store on a URL; see [`connect_for`].
pub async fn open_store(url: &str, cfg: &Config, migrate: bool) -> anyhow::Result<Store> {
    let settings = cfg.store_settings()?;
    let pool = cloud_store::connect_with_timeout(url, cfg.api.max_connections, settings.database_timeout)
        .await
        .context("connecting to PostgreSQL (is DATABASE_URL right and the server up?)")?;
    let store = Store::new(pool, settings);
    if migrate {
        store.migrate().await.context("applying migrations")?;
    } else {
        let pending = store.pending_migrations().await.context("reading the schema's version")?;
        if !pending.is_empty() {
            bail!(
                "the database schema is behind this cloudd: migrations {pending:?} are not applied; run `cloudd \
                 migrate` first (or set migrate_on_start = true)"
            );
        }
    }
    Ok(store)
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn wait_for_shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
