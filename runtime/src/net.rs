//! Host networking for instances, as root: a bridge per tenant holding the tenant network's gateway address,
//! a network namespace per instance with a veth into that bridge, and nftables rules that keep tenants apart
//! and keep instances away from the host's own ports. Everything is done with `ip` and `nft`, whose state the
//! kernel keeps: a restarted agent finds it by name.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Stdio;

use ipnet::Ipv4Net;
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
    #[error("cannot run `{program}` (install iproute2 and nftables)")]
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
}

/// Prefix of every bridge we create; the nftables rules match it.
const BRIDGE_PREFIX: &str = "cb-";

/// Runs a command, failing with its output.
async fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| NetError::Missing { program: program.into(), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Command {
            command: format!("{program} {}", args.join(" ")),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

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
}

impl Networks {
    /// The networks of a node's instances.
    pub fn new(node: Uuid) -> Self {
        Self { prefix: format!("cloud-{}-", &node.simple().to_string()[..8]), dns: None }
    }

    /// The same, forwarding instances' DNS queries (to their gateway, port 53) to `dns`.
    pub fn with_dns(mut self, dns: Option<SocketAddrV4>) -> Self {
        self.dns = dns;
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
        let ns = self.netns(instance);
        if Path::new(&self.netns_path(instance)).exists() {
            self.destroy(instance).await?;
        }
        let bridge = ensure_bridge(tenant, network, self.dns.is_some_and(|d| d.ip().is_loopback())).await?;
        let host = format!("cv{}", short(instance));
        let addr = format!("{ip}/{}", network.prefix_len());
        let gateway = cloud_domain::ipam::gateway(network).to_string();
        // A leftover host end from a crash would make `add` fail.
        if Path::new(&format!("/sys/class/net/{host}")).exists() {
            let _ = run("ip", &["link", "del", &host]).await;
        }
        run("ip", &["netns", "add", &ns]).await?;
        // Two batches instead of one process per step: forking `ip` is most of a sandbox's set-up time. The
        // peer is created in the namespace as eth0: moving a device between namespaces waits for an RCU grace
        // period, some 20 ms, twice what the rest takes.
        let mac = mac_for(ip);
        let outside = format!(
            "link add {host} type veth peer name eth0 netns {ns} address {mac}\nlink set {host} master {bridge}\nlink set {host} up\n"
        );
        let inside =
            format!("addr add {addr} dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via {gateway}\n");
        for (args, script) in [(vec!["-batch", "-"], outside), (vec!["-n", ns.as_str(), "-batch", "-"], inside)] {
            if let Err(e) = run_with_input("ip", &args, &script).await {
                let _ = self.destroy(instance).await;
                return Err(e);
            }
        }
        if let Err(e) = allow_low_ports(self.netns_path(instance)).await {
            let _ = self.destroy(instance).await;
            return Err(e);
        }
        Ok(())
    }

    /// Kills whatever still runs in the namespace and deletes it (which deletes its veth pair too).
    pub async fn destroy(&self, instance: Uuid) -> Result<(), NetError> {
        let ns = self.netns(instance);
        if !Path::new(&self.netns_path(instance)).exists() {
            return Ok(());
        }
        if let Ok(pids) = run("ip", &["netns", "pids", &ns]).await {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                crate::process::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        run("ip", &["netns", "del", &ns]).await?;
        let _ = run("ip", &["link", "del", &format!("cv{}", short(instance))]).await;
        Ok(())
    }
}

/// Lets any process of the namespace listen on ports below 1024. The namespace is the instance's alone, and
/// its sandbox's root, root of its own user namespace only, would otherwise need a capability over the host's
/// (which owns the network namespace) to listen on port 80 as images expect to.
async fn allow_low_ports(netns: String) -> Result<(), NetError> {
    let knob = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
    let sysctl = |source| NetError::Sysctl { knob: format!("{knob} in {netns}"), source };
    let file = std::fs::File::open(&netns).map_err(sysctl)?;
    // A thread of its own enters the namespace (only a thread's own /proc/sys/net is the namespace's) and ends
    // there, never serving anything else.
    let written = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            enter_netns(&file)?;
            std::fs::write(knob, "0")
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the thread panicked")))
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    written.map_err(sysctl)
}

/// Moves the calling thread (only it) into the network namespace `file` names.
fn enter_netns(file: &std::fs::File) -> std::io::Result<()> {
    Ok(nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?)
}

/// The instance's MAC address, derived from its IP. A reused IP then keeps its MAC, so the host's neighbour
/// entry for it (which outlives the old veth on the bridge) stays right instead of sending the new instance's
/// traffic to a vanished interface until the entry goes stale, half a minute or more.
fn mac_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:cb:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Creates the tenant's bridge with the gateway address if it does not exist yet. `localnet` lets packets from
/// the bridge be routed to a loopback address: the DNS forward rewrites queries to a listener on 127.0.0.1, which
/// the kernel otherwise drops as martians (the input chain still drops everything else from the bridge).
pub async fn ensure_bridge(tenant: Uuid, network: Ipv4Net, localnet: bool) -> Result<String, NetError> {
    let bridge = bridge_name(tenant);
    if !Path::new(&format!("/sys/class/net/{bridge}")).exists() {
        let gateway = format!("{}/{}", cloud_domain::ipam::gateway(network), network.prefix_len());
        // Networks are disjoint between tenants, so another bridge of ours holding this gateway is a leftover
        // (of a deleted tenant, or of a database this host served before): it must not shadow this tenant.
        if let Ok(addrs) = run("ip", &["-o", "-4", "addr", "show", "to", &gateway]).await {
            for stale in addrs.lines().filter_map(|l| l.split_whitespace().nth(1)) {
                if stale.starts_with(BRIDGE_PREFIX) && stale != bridge {
                    tracing::warn!(bridge = stale, %network, "removing a stale bridge holding this tenant's network");
                    delete_bridge(stale).await;
                }
            }
        }
        match run("ip", &["link", "add", &bridge, "type", "bridge"]).await {
            Ok(_) => {}
            // Another agent on this host made it meanwhile.
            Err(_) if Path::new(&format!("/sys/class/net/{bridge}")).exists() => {}
            Err(e) => return Err(e),
        }
        let _ = run("ip", &["addr", "add", &gateway, "dev", &bridge]).await;
        run("ip", &["link", "set", &bridge, "up"]).await?;
        nft(&format!("add element inet cloud intra {}\n", intra_element(&bridge))).await?;
    }
    if localnet {
        let knob = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
        std::fs::write(&knob, "1").map_err(|source| NetError::Sysctl { knob, source })?;
    }
    Ok(bridge)
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
    let _ = run("ip", &["link", "del", name]).await;
    let _ = nft(&format!("delete element inet cloud intra {}\n", intra_element(name))).await;
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
fn rules(dns: Option<SocketAddrV4>) -> String {
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
    format!(
        r#"
table inet cloud {{
    set intra {{
        type ifname . ifname
    }}{nat}
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "cb-*" ct state established,related accept{allow}
        iifname "cb-*" drop
    }}
    chain forward {{
        type filter hook forward priority -10; policy accept;
        iifname . oifname @intra accept
        iifname "cb-*" drop
        oifname "cb-*" drop
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

/// Installs (or refreshes) the firewall rules, atomically: `nft -f` applies the whole script or nothing.
/// The rules are per host: the last agent to start on a host sets its DNS forward.
pub async fn install_firewall(dns: Option<SocketAddrV4>) -> Result<(), NetError> {
    let mut script = format!("table inet cloud\ndelete table inet cloud\n{}", rules(dns));
    // Bridges that exist already (another agent's on this host) keep switching.
    for bridge in our_bridges() {
        script.push_str(&format!("add element inet cloud intra {}\n", intra_element(&bridge)));
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
    #[test]
    fn an_ip_always_gets_the_same_locally_administered_mac() {
        assert_eq!(super::mac_for("10.210.0.5".parse().unwrap()), "02:cb:0a:d2:00:05");
        assert_ne!(super::mac_for("10.210.0.5".parse().unwrap()), super::mac_for("10.210.0.6".parse().unwrap()));
    }
}
