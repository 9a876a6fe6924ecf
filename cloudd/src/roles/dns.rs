//! `cloudd dns`: the authoritative DNS following the change feed.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use cloud_dns::DnsHandle;
use cloud_store::Store;

use crate::config::Config;
use crate::ops::Probe;

/// The DNS serving.
pub struct Dns(pub DnsHandle);

impl super::Role for Dns {
    const NAME: &'static str = "dns";

    async fn start(cfg: &Config, store: Store) -> anyhow::Result<Self> {
        let feed = cloud_store::ChangeFeed::start(store.clone()).await?;
        let dns = cloud_dns::start(store, feed, cfg.dns.clone()).await.context("starting the DNS")?;
        tracing::info!(public = ?dns.public_addrs(), private = ?dns.private_addrs(), "DNS serving");
        Ok(Self(dns))
    }

    fn ops(&self, cfg: &Config) -> Option<(SocketAddr, Arc<dyn Probe>)> {
        Some((cfg.dns.ops_listen, Arc::new(self.0.probe())))
    }

    async fn shutdown(self) {
        self.0.shutdown().await;
    }
}
