//! `cloudd api`: the tenant API on its listener, which also serves its own `/healthz`, `/readyz` and `/metrics`;
//! and the admin token `cloudd bootstrap` and `cloudd dev` issue.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::Context;
use cloud_api::{AppState, issue_token};
use cloud_domain::api::{CreatedToken, QuotasPatch, Scope};
use cloud_store::{Store, StoreError};

use crate::config::Config;
use crate::ops::Probe;

/// The API serving.
pub struct Api {
    handle: actix_web::dev::ServerHandle,
    /// Ends drains, moves rollouts on, autoscales (acting only while it leads; see `cloud_api::controller`).
    controller: tokio::task::JoinHandle<()>,
    /// Its TLS (which keeps a platform certificate valid), `None` for plain HTTP.
    pub tls: Option<cloud_api::tls::ServedTls>,
    /// Where clients reach it.
    pub urls: Vec<String>,
}

impl super::Role for Api {
    const NAME: &'static str = "api";

    async fn start(cfg: &Config, store: Store) -> anyhow::Result<Self> {
        let config = cfg.api_config()?;
        let key = config.secret_key.clone().context(
            "the API needs the platform secret key (platform.secret_key_file): it seals the token signing key",
        )?;
        let tls = cloud_api::tls::prepare(&config, &store, &key).await.context("preparing the API's TLS")?;
        let urls = cloud_api::tls::public_urls(&config);
        let controller_store = store.clone();
        let mut state = AppState::new(store, config).await.context("preparing the API")?;
        state.join =
            cloud_api::JoinSettings { urls: urls.clone(), fingerprint: tls.as_ref().and_then(|t| t.pin.clone()) };
        let listener =
            TcpListener::bind(cfg.api.listen).with_context(|| format!("binding the API to {}", cfg.api.listen))?;
        let server_config = tls.as_ref().map(|t| t.server_config.clone());
        let server = cloud_api::serve(actix_web::web::Data::new(state), listener, server_config)?;
        let handle = server.handle();
        tokio::spawn(server);
        let controller = tokio::spawn(cloud_api::controller::run(controller_store));
        tracing::info!(listen = %cfg.api.listen, tls = ?cfg.api.tls, "API serving");
        Ok(Self { handle, controller, tls, urls })
    }

    fn ops(&self, _: &Config) -> Option<(SocketAddr, Arc<dyn Probe>)> {
        None
    }

    async fn shutdown(self) {
        self.controller.abort();
        self.handle.stop(true).await;
    }
}

/// `cloudd bootstrap`: creates the tenant if needed and prints an admin token for it.
pub async fn bootstrap(cfg: &Config, tenant: &str, days: i64) -> anyhow::Result<()> {
    let key = cfg.secret_key()?.context(
        "cloudd bootstrap needs the platform secret key (platform.secret_key_file): it seals the token signing key",
    )?;
    let store = super::connect(cfg).await?;
    let created = ensure_admin_token(&store, &key, tenant, days, "cloudd bootstrap").await?;
    println!("{}", created.jwt);
    Ok(())
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
    issue_token(store, &signer, tenant.id, &scopes, chrono::Duration::days(days), why)
        .await
        .map_err(|e| anyhow::anyhow!("issuing a token: {e}"))
}
