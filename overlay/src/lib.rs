//! The encrypted overlay between hosts: how a tenant's private network spans machines.
//!
//! Each host runs one TUN device (`co0` by default) holding its overlay address, and one UDP socket on its
//! underlay address. The kernel routes every remote private IP (an instance on another host) and every other
//! host's overlay address into the device as a /32; this crate seals each packet with WireGuard's protocol
//! (boringtun's `noise`, the userspace implementation: our machines lack the kernel module) for the peer that
//! holds that address, and sends it over UDP. What arrives is opened, and written to the device only when its
//! source is an address the sending peer holds: WireGuard's cryptokey routing, so a host can speak only for its
//! own instances, and nobody without a peer's key can speak at all.
//!
//! What this crate does not do: decide who the peers are (the node agent reads them from PostgreSQL and calls
//! [`Overlay::set_peers`]), or filter between tenants (the agent's nftables rules do, as on one host).

mod tun;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// The UDP port tunnels end on, on every host (WireGuard's usual one).
pub const PORT: u16 = 51820;
/// The overlay device's MTU: a 1,500-byte underlay less the IPv4, UDP and WireGuard headers (20 + 8 + 32), less
/// 20 more as WireGuard leaves for an IPv6 underlay. TCP through the overlay is clamped to it by the agent.
pub const MTU: u32 = 1420;
/// The largest packet the device hands over, with room for WireGuard's overhead when sealed.
const BUFFER: usize = 65_536 + 64;
/// How often each tunnel's timers (handshake retries, rekeys, keepalives) are run, as boringtun asks.
const TIMER_TICK: Duration = Duration::from_millis(250);

/// This host's overlay key pair, made at every start and never written anywhere; its public half is what peers
/// are told.
pub struct Key(StaticSecret);

impl Key {
    /// A new random key pair.
    pub fn generate() -> Self {
        Self(StaticSecret::from(rand::random::<[u8; 32]>()))
    }

    /// The public half.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Key").field(&"<secret>").finish()
    }
}

/// Another host, as the overlay tunnels to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its node name, for logs.
    pub name: String,
    /// The public half of its current key.
    pub public_key: [u8; 32],
    /// Where its tunnels end ([`PORT`] on this address).
    pub underlay: Ipv4Addr,
    /// What it may send from and what is routed to it: its overlay address and its instances' private IPs.
    pub addresses: Vec<Ipv4Addr>,
}

/// Where this host's overlay lives.
#[derive(Debug, Clone)]
pub struct Config {
    /// The TUN device's name.
    pub device: String,
    /// This host's underlay address; tunnels end on it at `port`.
    pub underlay: Ipv4Addr,
    /// The UDP port ([`PORT`] in production; peers are reached on the same).
    pub port: u16,
    /// This host's overlay address, held by the device: the source of what the host itself (an edge) sends
    /// into the overlay.
    pub address: Ipv4Addr,
}

/// Why the overlay could not start or change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OverlayError {
    /// The TUN device could not be made.
    #[error("cannot create the TUN device {device} (needs /dev/net/tun and CAP_NET_ADMIN)")]
    Device {
        /// Its name.
        device: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tunnels' UDP socket could not be bound.
    #[error("cannot bind the overlay's UDP socket on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a link, address or route change.
    #[error("cannot {action}")]
    Netlink {
        /// What was attempted.
        action: String,
        /// The cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// Something else of the host's could not be read or written.
    #[error("cannot {action}")]
    Host {
        /// What was attempted.
        action: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Packet counts since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Packets sealed and sent to a peer.
    pub sent: u64,
    /// Packets opened and handed to the kernel.
    pub received: u64,
    /// Packets routed into the device for an address no peer holds (any more).
    pub no_peer: u64,
    /// Datagrams that did not open: from no peer's underlay address, forged, replayed or under a stale key.
    pub unauthenticated: u64,
    /// Opened packets whose source the sending peer does not hold: a host speaking for another's address.
    pub spoofed: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    no_peer: AtomicU64,
    unauthenticated: AtomicU64,
    spoofed: AtomicU64,
}

/// One peer's tunnel. Kept across [`Overlay::set_peers`] while its key and underlay address stay the same, so
/// a change of its addresses does not cost a handshake.
struct Tunnel {
    name: String,
    public_key: [u8; 32],
    endpoint: SocketAddr,
    noise: Mutex<Tunn>,
}

/// Who holds what, swapped whole on every change.
#[derive(Default)]
struct Table {
    by_underlay: HashMap<Ipv4Addr, Arc<Tunnel>>,
    by_address: HashMap<Ipv4Addr, Arc<Tunnel>>,
}

struct Shared {
    key: StaticSecret,
    device: tun::Device,
    socket: UdpSocket,
    /// The port peers' tunnels end on: ours ([`Config::port`]).
    port: u16,
    table: RwLock<Arc<Table>>,
    counters: Counters,
}

/// The running overlay of this host. Dropping it closes the device, which the kernel then deletes with its
/// routes.
pub struct Overlay {
    shared: Arc<Shared>,
    links: Handle,
    index: u32,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("index", &self.index).finish_non_exhaustive()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Overlay {
    /// Makes the device (address, MTU, up), binds the UDP socket and starts moving packets; no peers yet.
    /// Turns on IPv4 forwarding: packets from the overlay are forwarded to the tenants' bridges.
    pub async fn start(config: &Config, key: Key) -> Result<Self, OverlayError> {
        let device = tun::Device::create(&config.device)
            .map_err(|source| OverlayError::Device { device: config.device.clone(), source })?;
        let bind = SocketAddr::from((config.underlay, config.port));
        let socket = UdpSocket::bind(bind).await.map_err(|source| OverlayError::Bind { address: bind, source })?;
        let (connection, links, _) = rtnetlink::new_connection()
            .map_err(|source| OverlayError::Host { action: "open a netlink socket".into(), source })?;
        tokio::spawn(connection);
        let index = ifindex(&links, &config.device).await?;
        let name = &config.device;
        links
            .address()
            .add(index, IpAddr::V4(config.address), 32)
            .execute()
            .await
            .map_err(netlink(format!("add {}/32 to {name}", config.address)))?;
        links
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(MTU).up().build())
            .execute()
            .await
            .map_err(netlink(format!("set {name} up with MTU {MTU}")))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|source| OverlayError::Host { action: "turn on IPv4 forwarding".into(), source })?;
        let shared = Arc::new(Shared {
            key: key.0,
            device,
            socket,
            port: config.port,
            table: Default::default(),
            counters: Default::default(),
        });
        let tasks = vec![
            tokio::spawn(seal_loop(shared.clone())),
            tokio::spawn(open_loop(shared.clone())),
            tokio::spawn(timer_loop(shared.clone())),
        ];
        tracing::info!(device = name, address = %config.address, underlay = %bind, "overlay up");
        Ok(Self { shared, links, index, tasks })
    }

    /// Makes `peers` the whole set of peers: tunnels to new ones, routes to what each holds, and nothing any
    /// more to what no peer holds. An address claimed by two peers goes to neither (the store never does that;
    /// a stale view of a moving address must not split traffic).
    pub async fn set_peers(&self, peers: &[Peer]) -> Result<(), OverlayError> {
        let old = self.shared.table.read().expect("overlay table").clone();
        let mut table = Table::default();
        let mut claimed: HashMap<Ipv4Addr, usize> = HashMap::new();
        for peer in peers {
            for a in peer.addresses.iter().collect::<HashSet<_>>() {
                *claimed.entry(*a).or_default() += 1;
            }
        }
        for peer in peers {
            let tunnel = match old.by_underlay.get(&peer.underlay) {
                Some(t) if t.public_key == peer.public_key && t.name == peer.name => t.clone(),
                _ => Arc::new(self.tunnel(peer)),
            };
            table.by_underlay.insert(peer.underlay, tunnel.clone());
            for a in &peer.addresses {
                if claimed[a] == 1 {
                    table.by_address.insert(*a, tunnel.clone());
                } else {
                    tracing::warn!(address = %a, peer = peer.name, "an address claimed by two peers is routed to neither");
                }
            }
        }
        let gone: Vec<Ipv4Addr> =
            old.by_address.keys().filter(|a| !table.by_address.contains_key(a)).copied().collect();
        let new: Vec<Ipv4Addr> = table.by_address.keys().filter(|a| !old.by_address.contains_key(a)).copied().collect();
        // Stop sending to what went before its route goes; route what came after it has a tunnel.
        *self.shared.table.write().expect("overlay table") = Arc::new(table);
        for a in gone {
            let route = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(a, 32).output_interface(self.index);
            if let Err(e) = self.links.route().del(route.build()).execute().await {
                tracing::warn!(address = %a, error = %e, "cannot delete the overlay route");
            }
        }
        for a in new {
            let route = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(a, 32).output_interface(self.index);
            self.links
                .route()
                .add(route.build())
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("route {a}/32 into the overlay")))?;
        }
        Ok(())
    }

    /// Stops moving packets and closes the device, which the kernel deletes with its routes before this returns.
    pub async fn shutdown(mut self) {
        for task in std::mem::take(&mut self.tasks) {
            task.abort();
            let _ = task.await;
        }
    }

    /// Packet counts since start.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            sent: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            no_peer: c.no_peer.load(Ordering::Relaxed),
            unauthenticated: c.unauthenticated.load(Ordering::Relaxed),
            spoofed: c.spoofed.load(Ordering::Relaxed),
        }
    }

    fn tunnel(&self, peer: &Peer) -> Tunnel {
        // Each tunnel's handshakes carry an index of its own; boringtun keeps the low 8 bits for sessions.
        static NEXT_INDEX: AtomicU32 = AtomicU32::new(1);
        let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let noise = Tunn::new(self.shared.key.clone(), PublicKey::from(peer.public_key), None, None, index, None);
        Tunnel {
            name: peer.name.clone(),
            public_key: peer.public_key,
            endpoint: SocketAddr::V4(SocketAddrV4::new(peer.underlay, self.shared.port)),
            noise: Mutex::new(noise),
        }
    }
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table.read().expect("overlay table").clone()
    }
}

/// Device to network: seals each packet for the peer that holds its destination.
async fn seal_loop(shared: Arc<Shared>) {
    let (mut packet, mut sealed) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    loop {
        let n = match shared.device.recv(&mut packet).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "the overlay device failed; overlay traffic stops");
                return;
            }
        };
        let Some(dst) = ipv4_destination(&packet[..n]) else { continue };
        let Some(tunnel) = shared.table().by_address.get(&dst).cloned() else {
            shared.counters.no_peer.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let result = tunnel.noise.lock().expect("tunnel").encapsulate(&packet[..n], &mut sealed);
        match result {
            TunnResult::WriteToNetwork(datagram) => {
                let _ = shared.socket.send_to(datagram, tunnel.endpoint).await;
                shared.counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            TunnResult::Err(e) => tracing::debug!(peer = tunnel.name, error = ?e, "cannot seal"),
            _ => {}
        }
    }
}

/// Network to device: opens what a peer sealed, answers handshakes, and hands the kernel only packets whose
/// source the sender holds.
async fn open_loop(shared: Arc<Shared>) {
    let (mut datagram, mut opened) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    loop {
        let (n, from) = match shared.socket.recv_from(&mut datagram).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "overlay receive failed");
                continue;
            }
        };
        let table = shared.table();
        let tunnel = match from {
            SocketAddr::V4(v4) => table.by_underlay.get(v4.ip()).filter(|t| t.endpoint == from),
            SocketAddr::V6(_) => None,
        };
        let Some(tunnel) = tunnel else {
            shared.counters.unauthenticated.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let mut input = &datagram[..n];
        loop {
            let result = tunnel.noise.lock().expect("tunnel").decapsulate(Some(from.ip()), input, &mut opened);
            input = &[];
            match result {
                // A handshake answer or a packet that waited for the session: send it, then ask for more.
                TunnResult::WriteToNetwork(reply) => {
                    let _ = shared.socket.send_to(reply, tunnel.endpoint).await;
                }
                TunnResult::WriteToTunnelV4(packet, source) => {
                    let holds = table.by_address.get(&source).is_some_and(|t| Arc::ptr_eq(t, tunnel));
                    if holds {
                        shared.counters.received.fetch_add(1, Ordering::Relaxed);
                        let _ = shared.device.send(packet).await;
                    } else if !packet.is_empty() {
                        shared.counters.spoofed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = tunnel.name, %source, "dropped a packet from an address the peer does not hold");
                    }
                    break;
                }
                TunnResult::Err(e) => {
                    shared.counters.unauthenticated.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = tunnel.name, error = ?e, "dropped a datagram that did not open");
                    break;
                }
                TunnResult::Done | TunnResult::WriteToTunnelV6(..) => break,
            }
        }
    }
}

/// Handshake retries, rekeys and keepalives, for every tunnel.
async fn timer_loop(shared: Arc<Shared>) {
    let mut out = vec![0u8; BUFFER];
    let mut tick = tokio::time::interval(TIMER_TICK);
    loop {
        tick.tick().await;
        let table = shared.table();
        for tunnel in table.by_underlay.values() {
            let result = tunnel.noise.lock().expect("tunnel").update_timers(&mut out);
            if let TunnResult::WriteToNetwork(datagram) = result {
                let _ = shared.socket.send_to(datagram, tunnel.endpoint).await;
            }
        }
    }
}

/// The destination of an IPv4 packet.
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4).then(|| Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

/// The index of a link of the overlay's namespace (asked over netlink: /sys shows the namespace it was mounted
/// in).
async fn ifindex(links: &Handle, name: &str) -> Result<u32, OverlayError> {
    let found = links.link().get().match_name(name.to_owned()).execute().try_next().await;
    let link = found.map_err(netlink(format!("find link {name}")))?;
    link.map(|l| l.header.index).ok_or_else(|| OverlayError::Host {
        action: format!("find link {name}"),
        source: io::Error::new(io::ErrorKind::NotFound, "no such link"),
    })
}

fn netlink(action: String) -> impl FnOnce(rtnetlink::Error) -> OverlayError {
    move |source| OverlayError::Netlink { action, source }
}
