//! Host networking for instances, as root: a bridge per tenant holding the tenant network's gateway address,
//! a network namespace per instance with a veth into that bridge, and nftables rules that keep tenants apart
//! and keep instances away from the host's own ports. Links, addresses and routes are set over netlink, rule
//! sets with `nft -f` (atomic); the kernel keeps all of it, so a restarted agent finds it by name.
//!
//! Namespaces are made and entered by threads of their own, never by forking: this is a multi-threaded tokio
//! process, whose forked child may only exec. A netlink socket stays bound to the namespace it was made in, so
//! one made by a thread inside an instance's namespace configures that namespace from anywhere.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Stdio;

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use nix::mount::{MntFlags, MsFlags};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::process::Command;
use uuid::Uuid;

/// A network operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A command failed.
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// A command could not be run at all.
    #[error("cannot run `{program}` (install nftables)")]
    Missing {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A kernel setting could not be written.
    #[error("cannot write {knob}")]
    Sysctl {
        /// The file under /proc/sys.
        knob: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a netlink request (a link, an address or a route).
    #[error("cannot {action}")]
    Netlink {
        /// What was asked, as `ip` would say it.
        action: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A network namespace could not be made, entered or removed, or a netlink socket opened.
    #[error("cannot {action}")]
    Namespace {
        /// What was tried.
        action: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Prefix of every bridge we create; the nftables rules match it.
const BRIDGE_PREFIX: &str = "cb-";

/// Runs a command with `input` on its standard input, failing with its output.
async fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<(), NetError> {
    use tokio::io::AsyncWriteExt;
    let missing = |source| NetError::Missing { program: program.into(), source };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(missing)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).await.map_err(missing)?;
    }
    let out = child.wait_with_output().await.map_err(missing)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command: format!("{program} {} <<< {input:?}", args.join(" ")),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn short(id: Uuid) -> String {
    id.simple().to_string()[..12].to_owned()
}

/// The bridge of a tenant (`cb-<12 hex of the tenant id>`, 15 characters, the kernel's limit).
pub fn bridge_name(tenant: Uuid) -> String {
    format!("{BRIDGE_PREFIX}{}", short(tenant))
}

/// The network namespaces of one node's instances: names carry the node so agents sharing a host leave each
/// other alone.
#[derive(Debug, Clone)]
pub struct Networks {
    prefix: String,
    /// Where instances' DNS queries to their gateway are forwarded, if anywhere.
    dns: Option<SocketAddrV4>,
    /// Whether tenant networks span hosts through the overlay: bridges then answer ARP for remote instances.
    overlay: bool,
}

impl Networks {
    /// The networks of a node's instances.
    pub fn new(node: Uuid) -> Self {
        Self { prefix: format!("cloud-{}-", &node.simple().to_string()[..8]), dns: None, overlay: false }
    }

    /// The same, forwarding instances' DNS queries (to their gateway, port 53) to `dns`.
    pub fn with_dns(mut self, dns: Option<SocketAddrV4>) -> Self {
        self.dns = dns;
        self
    }

    /// The same, with tenant networks spanning hosts through the overlay ([`OVERLAY_DEVICE`]).
    pub fn with_overlay(mut self, overlay: bool) -> Self {
        self.overlay = overlay;
        self
    }

    /// The namespace of an instance.
    pub fn netns(&self, instance: Uuid) -> String {
        format!("{}{}", self.prefix, instance.simple())
    }

    /// Path of an instance's namespace, for setns(2).
    pub fn netns_path(&self, instance: Uuid) -> String {
        format!("/run/netns/{}", self.netns(instance))
    }

    /// The instances whose namespaces exist on this host for this node.
    pub fn existing(&self) -> Vec<Uuid> {
        let Ok(dir) = std::fs::read_dir("/run/netns") else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(&self.prefix).and_then(|id| Uuid::parse_str(id).ok()))
            .collect()
    }

    /// Creates the namespace of an instance with `eth0` at `ip` in the tenant network, its default route via
    /// the tenant bridge's gateway. Idempotent: an existing namespace is rebuilt.
    pub async fn create(&self, instance: Uuid, tenant: Uuid, network: Ipv4Net, ip: Ipv4Addr) -> Result<(), NetError> {
        if Path::new(&self.netns_path(instance)).exists() {
            self.destroy(instance).await?;
        }
        let localnet = self.dns.is_some_and(|d| d.ip().is_loopback());
        let bridge = ensure_bridge(tenant, network, localnet, self.overlay).await?;
        self.plug(instance, &bridge, network, ip).await
    }

    /// Makes the instance's namespace and plugs it into `bridge`; on failure removes what it made.
    async fn plug(&self, instance: Uuid, bridge: &str, network: Ipv4Net, ip: Ipv4Addr) -> Result<(), NetError> {
        let path = self.netns_path(instance);
        let host = format!("cv{}", short(instance));
        let links = connect()?;
        // A leftover host end from a crash would make the veth's creation fail.
        if Path::new(&format!("/sys/class/net/{host}")).exists() {
            let _ = delete_link(&links, &host).await;
        }
        add_netns(&path).await?;
        let plugged = async {
            // The peer is created in the namespace as eth0: moving a device between namespaces waits for an RCU
            // grace period, some 20 ms, more than the rest takes.
            let netns = File::open(&path).map_err(namespace(format!("open {path}")))?;
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name("eth0")
                .address(mac_for(ip).to_vec())
                .setns_by_fd(netns.as_raw_fd())
                .build();
            let veth = LinkVeth::new(&host, "eth0").set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).build();
            links.link().add(veth).execute().await.map_err(netlink(format!("add veth {host} (eth0 in {path})")))?;
            drop(netns);
            let (index, bridge_index) = (ifindex(&host)?, ifindex(bridge)?);
            let attach = LinkUnspec::new_with_index(index).controller(bridge_index).up().build();
            links.link().set(attach).execute().await.map_err(netlink(format!("attach {host} to {bridge}")))?;

            let inside = connect_in(&path).await?;
            let eth0 = index_in(&inside, "eth0").await?;
            let mut add = inside.address().add(eth0, IpAddr::V4(ip), network.prefix_len());
            // As `ip addr add` without `brd`: no broadcast address.
            add.message_mut().attributes.retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
            let addr = format!("{ip}/{}", network.prefix_len());
            add.execute().await.map_err(netlink(format!("add {addr} to eth0 in {path}")))?;
            for name in ["eth0", "lo"] {
                let up = LinkUnspec::new_with_index(index_in(&inside, name).await?).up().build();
                inside.link().set(up).execute().await.map_err(netlink(format!("set {name} up in {path}")))?;
            }
            let gateway = cloud_domain::ipam::gateway(network);
            let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).protocol(RouteProtocol::Boot).build();
            inside
                .route()
                .add(route)
                .execute()
                .await
                .map_err(netlink(format!("add default via {gateway} in {path}")))?;
            allow_low_ports(path.clone()).await
        };
        if let Err(e) = plugged.await {
            let _ = self.destroy(instance).await;
            return Err(e);
        }
        Ok(())
    }

    /// Deletes the veth pair, kills whatever still runs in the namespace and deletes the namespace.
    pub async fn destroy(&self, instance: Uuid) -> Result<(), NetError> {
        let path = self.netns_path(instance);
        if !Path::new(&path).exists() {
            return Ok(());
        }
        // The pair goes first, at once: left to the namespace's end, the kernel removes it later, from a work
        // queue, after the last process inside has exited, and a new instance could meet the old host end.
        if let Ok(links) = connect() {
            let _ = delete_link(&links, &format!("cv{}", short(instance))).await;
        }
        for pid in pids_in(&path) {
            crate::process::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        delete_netns(&path).await
    }
}

/// A netlink connection in the agent's own namespace, served by a task that ends with the last handle.
fn connect() -> Result<Handle, NetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(namespace("open a netlink socket".into()))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A netlink connection inside the namespace at `path`: its socket is opened by a thread that entered the
/// namespace, and stays bound to it.
async fn connect_in(path: &str) -> Result<Handle, NetError> {
    let runtime = tokio::runtime::Handle::current();
    let opened = in_netns(path, move || {
        // The socket registers with this runtime's reactor.
        let _runtime = runtime.enter();
        let (connection, handle, _) = rtnetlink::new_connection()?;
        Ok((connection, handle))
    });
    let (connection, handle) = opened.await.map_err(namespace(format!("open a netlink socket in {path}")))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Runs `f` on a thread of its own inside the namespace at `path`; the thread ends with `f`, never serving
/// anything else.
async fn in_netns<T: Send + 'static>(path: &str, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    let file = File::open(path)?;
    tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            enter_netns(&file)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread panicked")))
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Where named namespaces are mounted, as `ip netns` keeps them.
const NETNS_DIR: &str = "/run/netns";

/// `ip netns add`: a new network namespace kept alive by a bind mount at `path`, made by a thread that unshares
/// into it (only that thread moves) and then ends.
async fn add_netns(path: &str) -> Result<(), NetError> {
    let owned = path.to_owned();
    let added = tokio::task::spawn_blocking(move || {
        share_netns_dir()?;
        File::options().write(true).create_new(true).mode(0o000).open(&owned)?;
        let target = owned.clone();
        let mounted = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                target.as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread panicked")));
        if mounted.is_err() {
            let _ = std::fs::remove_file(&owned);
        }
        mounted
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)));
    added.map_err(namespace(format!("add network namespace {path}")))
}

/// Makes /run/netns a shared mount, as `ip netns add` does: a namespace's mount then reaches the mount
/// namespaces made after it (the sandboxes') and its unmount leaves them too, so a deleted namespace is not kept
/// alive by a copy.
fn share_netns_dir() -> io::Result<()> {
    std::fs::create_dir_all(NETNS_DIR)?;
    let shared =
        || nix::mount::mount(None::<&str>, NETNS_DIR, Some("none"), MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: make it one.
        Err(nix::errno::Errno::EINVAL) => {
            nix::mount::mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            Ok(shared()?)
        }
        Err(e) => Err(e.into()),
    }
}

/// `ip netns del`: unmounts and removes the namespace's file; the namespace goes with its last user.
async fn delete_netns(path: &str) -> Result<(), NetError> {
    let owned = path.to_owned();
    let deleted = tokio::task::spawn_blocking(move || {
        match nix::mount::umount2(owned.as_str(), MntFlags::MNT_DETACH) {
            // Not mounted (any more): what an agent killed in a mount namespace of its own leaves is the file.
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(e.into()),
        }
        std::fs::remove_file(&owned)
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)));
    deleted.map_err(namespace(format!("delete network namespace {path}")))
}

/// `ip netns pids`: the processes whose network namespace is the one at `path`.
fn pids_in(path: &str) -> Vec<i32> {
    let Ok(ns) = std::fs::metadata(path) else { return Vec::new() };
    let Ok(proc) = std::fs::read_dir("/proc") else { return Vec::new() };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == (ns.dev(), ns.ino()))
        })
        .collect()
}

/// The index of a link of the agent's namespace.
fn ifindex(name: &str) -> Result<u32, NetError> {
    let path = format!("/sys/class/net/{name}/ifindex");
    let index = std::fs::read_to_string(&path).map_err(namespace(format!("read {path}")))?;
    index.trim().parse().map_err(|_| NetError::Namespace {
        action: format!("read {path}"),
        source: io::Error::new(io::ErrorKind::InvalidData, index.trim().to_owned()),
    })
}

/// The index of a link in the namespace `handle` is bound to.
async fn index_in(handle: &Handle, name: &str) -> Result<u32, NetError> {
    let action = || format!("find link {name}");
    let link = handle.link().get().match_name(name.to_owned()).execute().try_next().await.map_err(netlink(action()))?;
    link.map(|l| l.header.index).ok_or_else(|| NetError::Namespace {
        action: action(),
        source: io::Error::new(io::ErrorKind::NotFound, "no such link"),
    })
}

/// `ip link del <name>` in the agent's namespace.
async fn delete_link(links: &Handle, name: &str) -> Result<(), NetError> {
    let index = ifindex(name)?;
    links.link().del(index).execute().await.map_err(netlink(format!("delete link {name}")))
}

fn netlink(action: String) -> impl FnOnce(rtnetlink::Error) -> NetError {
    move |source| NetError::Netlink { action, source }
}

fn namespace(action: String) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Namespace { action, source }
}

/// Lets any process of the namespace listen on ports below 1024. The namespace is the instance's alone, and
/// its sandbox's root, root of its own user namespace only, would otherwise need a capability over the host's
/// (which owns the network namespace) to listen on port 80 as images expect to.
async fn allow_low_ports(netns: String) -> Result<(), NetError> {
    let knob = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
    // Only a thread's own /proc/sys/net is its namespace's.
    let written = in_netns(&netns, move || std::fs::write(knob, "0")).await;
    written.map_err(|source| NetError::Sysctl { knob: format!("{knob} in {netns}"), source })
}

/// Moves the calling thread (only it) into the network namespace `file` names.
fn enter_netns(file: &std::fs::File) -> std::io::Result<()> {
    Ok(nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?)
}

/// The instance's MAC address, derived from its IP. A reused IP then keeps its MAC, so the host's neighbour
/// entry for it (which outlives the old veth on the bridge) stays right instead of sending the new instance's
/// traffic to a vanished interface until the entry goes stale, half a minute or more.
fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0xcb, a, b, c, d]
}

/// Creates the tenant's bridge with the gateway address if it does not exist yet. `localnet` lets packets from
/// the bridge be routed to a loopback address: the DNS forward rewrites queries to a listener on 127.0.0.1, which
/// the kernel otherwise drops as martians (the input chain still drops everything else from the bridge).
/// `overlay` makes the bridge answer ARP for the tenant's instances on other hosts (routed into the overlay as
/// /32s): an instance takes every address of its network as on its link.
pub async fn ensure_bridge(tenant: Uuid, network: Ipv4Net, localnet: bool, overlay: bool) -> Result<String, NetError> {
    let bridge = bridge_name(tenant);
    if !Path::new(&format!("/sys/class/net/{bridge}")).exists() {
        let links = connect()?;
        // Networks are disjoint between tenants, so another bridge of ours holding this gateway is a leftover
        // (of a deleted tenant, or of a database this host served before): it must not shadow this tenant.
        for stale in links_with_address_in(&links, network).await {
            if stale.starts_with(BRIDGE_PREFIX) && stale != bridge {
                tracing::warn!(bridge = stale, %network, "removing a stale bridge holding this tenant's network");
                delete_bridge(&stale).await;
            }
        }
        match links.link().add(LinkBridge::new(&bridge).build()).execute().await {
            Ok(()) => {}
            // Another agent on this host made it meanwhile.
            Err(_) if Path::new(&format!("/sys/class/net/{bridge}")).exists() => {}
            Err(e) => return Err(netlink(format!("add bridge {bridge}"))(e)),
        }
        let index = ifindex(&bridge)?;
        let gateway = cloud_domain::ipam::gateway(network);
        let mut add = links.address().add(index, IpAddr::V4(gateway), network.prefix_len());
        add.message_mut().attributes.retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
        // Already there when another agent made the bridge meanwhile.
        let _ = add.execute().await;
        let up = LinkUnspec::new_with_index(index).up().build();
        links.link().set(up).execute().await.map_err(netlink(format!("set {bridge} up")))?;
        nft(&format!(
            "add element inet cloud intra {}\nadd element inet cloud nets {}\n",
            intra_element(&bridge),
            nets_element(&bridge, network)
        ))
        .await?;
    }
    for (knob, on) in [("route_localnet", localnet), ("proxy_arp", overlay)] {
        if on {
            let knob = format!("/proc/sys/net/ipv4/conf/{bridge}/{knob}");
            std::fs::write(&knob, "1").map_err(|source| NetError::Sysctl { knob, source })?;
        }
    }
    Ok(bridge)
}

/// `ip -4 addr show to <network>`: the links of the agent's namespace holding an IPv4 address inside `network`.
async fn links_with_address_in(links: &Handle, network: Ipv4Net) -> Vec<String> {
    let inside = link_addresses(links).await.into_iter().filter(|(_, a)| network.trunc().contains(&a.addr()));
    inside.map(|(name, _)| name).collect()
}

/// The networks our bridges hold (their gateway's address and prefix), by bridge.
async fn bridge_networks(links: &Handle) -> Vec<(String, Ipv4Net)> {
    let ours = link_addresses(links).await.into_iter().filter(|(name, _)| name.starts_with(BRIDGE_PREFIX));
    ours.map(|(name, address)| (name, address.trunc())).collect()
}

/// `ip -4 addr`: every IPv4 address of the agent's namespace with its prefix, by link name.
async fn link_addresses(links: &Handle) -> Vec<(String, Ipv4Net)> {
    let addresses: Vec<_> = links.address().get().execute().try_collect().await.unwrap_or_default();
    let mut found = Vec::new();
    for address in addresses {
        let ip = address.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let Some(net) = ip.and_then(|ip| Ipv4Net::new(ip, address.header.prefix_len).ok()) else { continue };
        let link = links.link().get().match_index(address.header.index).execute().try_next().await;
        let name = link.ok().flatten().and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            })
        });
        found.extend(name.map(|name| (name, net)));
    }
    found
}

/// Deletes the tenant's bridge when no port is attached any more (its last instance on this host is gone).
pub async fn remove_idle_bridge(tenant: Uuid) {
    let name = bridge_name(tenant);
    let ports = std::fs::read_dir(format!("/sys/class/net/{name}/brif")).map(|d| d.count()).unwrap_or(1);
    if ports == 0 {
        delete_bridge(&name).await;
    }
}

async fn delete_bridge(name: &str) {
    let mut script = format!("delete element inet cloud intra {}\n", intra_element(name));
    if let Ok(links) = connect() {
        for (_, network) in bridge_networks(&links).await.into_iter().filter(|(b, _)| b == name) {
            script.push_str(&format!("delete element inet cloud nets {}\n", nets_element(name, network)));
        }
        let _ = delete_link(&links, name).await;
    }
    let _ = nft(&script).await;
}

/// Deletes every bridge of ours without ports: what a crashed agent left behind.
pub async fn remove_idle_bridges() {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(BRIDGE_PREFIX) {
            continue;
        }
        let ports = std::fs::read_dir(format!("/sys/class/net/{name}/brif")).map(|d| d.count()).unwrap_or(0);
        if ports == 0 {
            delete_bridge(&name).await;
        }
    }
}

/// The nftables rules: instances may not reach the host (new connections in from a tenant bridge are dropped,
/// replies to the host's own connections pass), and nothing is routed to or from a tenant bridge, so tenants
/// cannot reach each other. Traffic inside one bridge (one tenant) is switched and allowed; where br_netfilter
/// shows switched packets to the forward hook as bridge-to-same-bridge, the `intra` set lets them through.
///
/// With a DNS forward, queries to port 53 of any of the host's addresses (the gateway, for an instance) are
/// rewritten to the private DNS listener, the one host service instances may reach. The source address is kept:
/// it is how the DNS knows the asker's tenant.
///
/// With the overlay (`hosts`, the hosts' overlay addresses), a tenant's bridge also reaches the tenant's network
/// on other hosts through [`OVERLAY_DEVICE`] and is reached from it, the other hosts (their edges) reach
/// instances, and nothing else crosses: the `nets` set pairs each bridge with its tenant's network. The overlay
/// itself vouches for source addresses (a host only sends from what it holds). TCP through it is clamped to its
/// MTU, so that large responses neither stall nor wait for path MTU discovery.
fn rules(dns: Option<SocketAddrV4>, hosts: Option<Ipv4Net>) -> String {
    let (nat, allow) = match dns {
        Some(dns) => (
            format!(
                r#"
    chain dns_forward {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "cb-*" fib daddr type local meta l4proto {{ udp, tcp }} th dport 53 dnat ip to {dns}
    }}"#
            ),
            format!(
                "\n        iifname \"cb-*\" ct status dnat ip daddr {} meta l4proto {{ udp, tcp }} th dport {} accept",
                dns.ip(),
                dns.port()
            ),
        ),
        None => (String::new(), String::new()),
    };
    let (overlay_in, overlay_forward, overlay_drop) = match hosts {
        Some(hosts) => (
            format!(
                r#"
        iifname "{OVERLAY_DEVICE}" ct state established,related accept
        iifname "{OVERLAY_DEVICE}" drop"#
            ),
            format!(
                r#"
        oifname "{OVERLAY_DEVICE}" tcp flags syn tcp option maxseg size set rt mtu
        iifname "{OVERLAY_DEVICE}" tcp flags syn tcp option maxseg size set {mss}
        iifname "cb-*" oifname "{OVERLAY_DEVICE}" iifname . ip daddr @nets accept
        iifname "{OVERLAY_DEVICE}" oifname "cb-*" oifname . ip saddr @nets accept
        iifname "{OVERLAY_DEVICE}" oifname "cb-*" ip saddr {hosts} accept
        iifname "cb-*" oifname "{OVERLAY_DEVICE}" ct state established,related accept"#,
                mss = cloud_overlay::MTU - 40,
            ),
            format!(
                r#"
        iifname "{OVERLAY_DEVICE}" drop
        oifname "{OVERLAY_DEVICE}" drop"#
            ),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    format!(
        r#"
table inet cloud {{
    set intra {{
        type ifname . ifname
    }}
    set nets {{
        type ifname . ipv4_addr
        flags interval
    }}{nat}
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "cb-*" ct state established,related accept{allow}
        iifname "cb-*" drop{overlay_in}
    }}
    chain forward {{
        type filter hook forward priority -10; policy accept;
        iifname . oifname @intra accept{overlay_forward}
        iifname "cb-*" drop
        oifname "cb-*" drop{overlay_drop}
    }}
}}
"#
    )
}

/// What an instance finds in `/etc/resolv.conf` when the node forwards DNS: its gateway, and `internal` as the
/// search domain so `<instance>` alone resolves like `<instance>.internal`.
pub fn resolv_conf(network: Ipv4Net) -> String {
    format!(
        "# written by the cloudd node agent: the platform's private DNS, through this instance's gateway\n\
         nameserver {}\nsearch internal\noptions timeout:2 attempts:2\n",
        cloud_domain::ipam::gateway(network)
    )
}

async fn nft(script: &str) -> Result<(), NetError> {
    run_with_input("nft", &["-f", "-"], script).await
}

fn intra_element(bridge: &str) -> String {
    format!("{{ \"{bridge}\" . \"{bridge}\" }}")
}

fn nets_element(bridge: &str, network: Ipv4Net) -> String {
    format!("{{ \"{bridge}\" . {} }}", network.trunc())
}

/// The TUN device of the overlay between hosts (cloud-overlay), when the node runs one.
pub const OVERLAY_DEVICE: &str = "co0";

/// Installs (or refreshes) the firewall rules, atomically: `nft -f` applies the whole script or nothing.
/// The rules are per host: the last agent to start on a host sets its DNS forward and its overlay's rules
/// (`hosts`: the hosts' overlay addresses).
pub async fn install_firewall(dns: Option<SocketAddrV4>, hosts: Option<Ipv4Net>) -> Result<(), NetError> {
    let mut script = format!("table inet cloud\ndelete table inet cloud\n{}", rules(dns, hosts));
    // Bridges that exist already (another agent's on this host) keep switching.
    for bridge in our_bridges() {
        script.push_str(&format!("add element inet cloud intra {}\n", intra_element(&bridge)));
    }
    if let Ok(links) = connect() {
        for (bridge, network) in bridge_networks(&links).await {
            script.push_str(&format!("add element inet cloud nets {}\n", nets_element(&bridge, network)));
        }
    }
    nft(&script).await
}

fn our_bridges() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.starts_with(BRIDGE_PREFIX))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn an_ip_always_gets_the_same_locally_administered_mac() {
        assert_eq!(mac_for("10.210.0.5".parse().unwrap()), [0x02, 0xcb, 0x0a, 0xd2, 0x00, 0x05]);
        assert_ne!(mac_for("10.210.0.5".parse().unwrap()), mac_for("10.210.0.6".parse().unwrap()));
    }

    /// Deletes a link when the test ends, however it ends.
    struct Remove(String);

    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("iproute2");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// What `ip` shows of an instance's namespace is what the agent made with `ip` before it spoke netlink.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plugged_namespace_has_eth0_with_its_address_mac_and_route_and_destroy_leaves_nothing() {
        if !nix::unistd::getuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let networks = Networks::new(Uuid::new_v4());
        let instance = Uuid::new_v4();
        // Not `cb-`: agents on this host remove idle bridges of theirs.
        let bridge = format!("tb-{}", &short(Uuid::new_v4())[..10]);
        let octet = instance.as_bytes()[0];
        let network: Ipv4Net = format!("10.251.{octet}.0/24").parse().unwrap();
        let links = connect().unwrap();
        links.link().add(LinkBridge::new(&bridge).build()).execute().await.unwrap();
        let _remove = Remove(bridge.clone());
        let up = LinkUnspec::new_with_index(ifindex(&bridge).unwrap()).up().build();
        links.link().set(up).execute().await.unwrap();

        let address: Ipv4Addr = format!("10.251.{octet}.5").parse().unwrap();
        networks.plug(instance, &bridge, network, address).await.unwrap();
        let ns = networks.netns(instance);
        let host = format!("cv{}", short(instance));
        assert!(ip(&["netns", "list"]).lines().any(|l| l.starts_with(&ns)), "{}", ip(&["netns", "list"]));
        let eth0 = ip(&["-n", &ns, "-o", "-4", "addr", "show", "dev", "eth0"]);
        assert!(eth0.contains(&format!("inet {address}/24 scope global eth0")), "{eth0}");
        assert!(!eth0.contains("brd"), "no broadcast address, as `ip addr add` without brd: {eth0}");
        let link = ip(&["-n", &ns, "-o", "link", "show", "eth0"]);
        assert!(link.contains(&format!("link/ether 02:cb:0a:fb:{octet:02x}:05")), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(ip(&["-n", &ns, "-o", "link", "show", "lo"]).contains(",UP"));
        assert_eq!(ip(&["-n", &ns, "route", "show", "default"]), format!("default via 10.251.{octet}.1 dev eth0"));
        let outside = ip(&["-o", "link", "show", &host]);
        assert!(outside.contains(&format!("master {bridge}")) && outside.contains(",UP"), "{outside}");
        let port_start = Command::new("ip")
            .args(["netns", "exec", &ns, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&port_start.stdout).trim(), "0");

        // A process left in the namespace is killed with it.
        let mut sleeper =
            std::process::Command::new("ip").args(["netns", "exec", &ns, "sleep", "600"]).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pids_in(&networks.netns_path(instance)).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the sleeper never entered the namespace");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        networks.destroy(instance).await.unwrap();
        assert!(!sleeper.wait().unwrap().success(), "killed");
        assert!(!Path::new(&networks.netns_path(instance)).exists());
        assert!(!Path::new(&format!("/sys/class/net/{host}")).exists());
        assert!(!ip(&["netns", "list"]).contains(&ns));
    }
}
