//! `cloudd node`: a node agent running the instances scheduled on this machine.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use anyhow::Context;
use cloud_runtime::NodeHandle;
use cloud_store::Store;

use crate::config::Config;
use crate::ops::Probe;

/// The node agent running.
pub struct Node(pub NodeHandle);

impl Node {
    /// Starts the agent following the change feed; `dns` is the private DNS for instances unless `node.dns` names
    /// one.
    pub async fn start_with_dns(cfg: &Config, store: Store, dns: Option<SocketAddrV4>) -> anyhow::Result<Self> {
        let feed = cloud_store::ChangeFeed::start(store.clone()).await?;
        let mut node_cfg = cfg.node.clone();
        node_cfg.dns = node_cfg.dns.or(dns);
        node_cfg.secret_key = cfg.secret_key()?.map(Arc::new);
        let node = cloud_runtime::start(store, feed, node_cfg).await.context("starting the node agent")?;
        Ok(Self(node))
    }
}

impl super::Role for Node {
    const NAME: &'static str = "node";

    async fn start(cfg: &Config, store: Store) -> anyhow::Result<Self> {
        Self::start_with_dns(cfg, store, None).await
    }

    fn ops(&self, cfg: &Config) -> Option<(SocketAddr, Arc<dyn Probe>)> {
        Some((cfg.node.ops_listen, Arc::new(self.0.probe())))
    }

    async fn shutdown(self) {
        self.0.shutdown().await;
    }
}
