//! `cloudd certs`: the certificate manager (ownership checks, ACME orders and renewals when an ACME directory is
//! configured).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use cloud_certs::manager::{CertManager, ManagerProbe};
use cloud_store::Store;

use crate::config::Config;
use crate::ops::Probe;

/// The certificate manager running.
pub struct Certs {
    task: tokio::task::JoinHandle<()>,
    probe: Arc<ManagerProbe>,
}

impl super::Role for Certs {
    const NAME: &'static str = "certs";

    async fn start(cfg: &Config, store: Store) -> anyhow::Result<Self> {
        let key = cfg.secret_key()?.context(
            "the certificate manager needs the platform secret key (platform.secret_key_file): it seals certificate \
             keys",
        )?;
        let checker = cloud_certs::ownership::OwnershipChecker::new(cfg.platform.resolver);
        let root_file = cfg.certs.acme_root_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let config = cfg
            .certs
            .clone()
            .with_acme_from_file_keys()
            .with_context(|| format!("certs.acme_root_file {root_file}"))?;
        let manager = CertManager::new(store, Arc::new(key), checker, config);
        let probe = Arc::new(manager.probe());
        Ok(Self { task: tokio::spawn(manager.run()), probe })
    }

    fn ops(&self, cfg: &Config) -> Option<(SocketAddr, Arc<dyn Probe>)> {
        Some((cfg.certs.ops_listen, self.probe.clone()))
    }

    async fn shutdown(self) {
        self.task.abort();
    }
}
