//! This host's part of the overlay between hosts (cloud-overlay): the key made at start and announced at
//! registration, the tunnel device, and the peers, followed from PostgreSQL: every other live host with the
//! private IPs of the instances it holds. A host that stops heartbeating leaves every peer's overlay once it is
//! out of the live window; an instance's address is routed to its host from when it is placed until it ends.

use std::net::Ipv4Addr;
use std::time::Duration;

use cloud_overlay::{Config, Key, Overlay, Peer, Stats};
use cloud_store::{Store, StoreError};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::metrics::NodeMetrics;
use crate::net::OVERLAY_DEVICE;

/// The overlay of this host and the peers it was last given.
pub(crate) struct HostOverlay {
    overlay: Overlay,
    applied: Mutex<Option<Vec<Peer>>>,
    metrics: NodeMetrics,
    /// The counts the metrics have reached.
    exported: std::sync::Mutex<Stats>,
}

impl std::fmt::Debug for HostOverlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostOverlay").field("overlay", &self.overlay).finish_non_exhaustive()
    }
}

impl HostOverlay {
    /// Brings the device up with this host's overlay address and the tunnels' socket on its underlay address.
    pub async fn start(
        underlay: Ipv4Addr,
        address: Ipv4Addr,
        key: Key,
        metrics: NodeMetrics,
    ) -> Result<Self, cloud_overlay::OverlayError> {
        let config = Config { device: OVERLAY_DEVICE.into(), underlay, port: cloud_overlay::PORT, address };
        let overlay = Overlay::start(&config, key).await?;
        Ok(Self { overlay, applied: Mutex::new(None), metrics, exported: Default::default() })
    }

    /// Reads the live peers and applies them when they changed; brings the metrics up to date.
    pub async fn follow(&self, store: &Store, me: Uuid, live: Duration) -> Result<(), FollowError> {
        self.export();
        let peers: Vec<Peer> = store
            .overlay_peers(me, live)
            .await?
            .into_iter()
            .map(|p| Peer {
                name: p.name,
                public_key: p.public_key,
                underlay: p.underlay_address,
                addresses: std::iter::once(p.overlay_address).chain(p.instance_ips).collect(),
            })
            .collect();
        let mut applied = self.applied.lock().await;
        if applied.as_ref() == Some(&peers) {
            return Ok(());
        }
        self.overlay.set_peers(&peers).await?;
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        if applied.as_ref().is_none_or(|a| a.iter().map(|p| p.name.as_str()).ne(names.iter().copied())) {
            tracing::info!(peers = ?names, "overlay peers");
        }
        self.metrics.overlay_peers.set(peers.len() as i64);
        *applied = Some(peers);
        Ok(())
    }

    /// Brings the packet counters up to the overlay's counts.
    fn export(&self) {
        let now = self.overlay.stats();
        let mut seen = self.exported.lock().expect("exported counts");
        for (outcome, was, is) in [
            ("sent", seen.sent, now.sent),
            ("received", seen.received, now.received),
            ("no_peer", seen.no_peer, now.no_peer),
            ("unauthenticated", seen.unauthenticated, now.unauthenticated),
            ("spoofed", seen.spoofed, now.spoofed),
        ] {
            self.metrics.overlay_packets.with_label_values(&[outcome]).inc_by(is.saturating_sub(was));
        }
        *seen = now;
    }
}

/// Why the peers could not be followed this time.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FollowError {
    /// PostgreSQL did not say who they are.
    #[error("reading the overlay's peers")]
    Store(#[from] StoreError),
    /// The kernel refused a route.
    #[error("applying the overlay's peers")]
    Overlay(#[from] cloud_overlay::OverlayError),
}
