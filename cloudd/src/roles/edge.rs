//! `cloudd edge`: TLS termination, routing by name and balancing to instances, serving the platform wildcard
//! from the platform CA.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use cloud_edge::{CertStore, EdgeHandle, ServedCert};
use cloud_store::Store;

use crate::config::Config;
use crate::ops::Probe;

/// The edge serving.
pub struct Edge {
    pub handle: EdgeHandle,
    /// The platform CA's certificate, for those who must trust it.
    pub ca_pem: String,
    /// Keeps the platform wildcard valid.
    renewal: tokio::task::JoinHandle<()>,
}

impl super::Role for Edge {
    const NAME: &'static str = "edge";

    /// Starts the edge following the change feed, serving the platform wildcard (kept valid by a background task).
    async fn start(cfg: &Config, store: Store) -> anyhow::Result<Self> {
        let mut config = cfg.edge.clone();
        config.secret_key = cfg.secret_key()?.map(Arc::new);
        config.access_log.json = std::env::var("CLOUD_LOG_FORMAT").is_ok_and(|v| v == "json");
        let key = config.secret_key.clone().context(
            "the edge needs the platform secret key (platform.secret_key_file): it seals the platform CA's key and \
             tenants' certificate keys",
        )?;
        let ca = cloud_certs::PlatformCa::load_or_create(&store, &key).await.context("loading the platform CA")?;
        let ca_pem = ca.cert_pem().to_owned();
        let certs = Arc::new(CertStore::default());
        let zone = store.settings().zone();
        let served = certs.clone();
        let names = vec![format!("*.{zone}"), zone.clone()];
        let renewal = cloud_certs::wildcard::serve_and_renew(ca, zone, move |issued| {
            served.replace(vec![ServedCert::from_pem(names.clone(), &issued.chain_pem, &issued.key_pem)?]);
            Ok(())
        })?;
        let feed = cloud_store::ChangeFeed::start(store.clone()).await?;
        let edge = cloud_edge::start(store, feed, certs, config).await.context("starting the edge")?;
        Ok(Self { handle: edge, ca_pem, renewal })
    }

    fn ops(&self, cfg: &Config) -> Option<(SocketAddr, Arc<dyn Probe>)> {
        Some((cfg.edge.ops_listen, Arc::new(self.handle.probe())))
    }

    async fn shutdown(self) {
        self.renewal.abort();
        self.handle.shutdown().await;
    }
}
