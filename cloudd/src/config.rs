//! `cloudd` configuration: one TOML file, every key optional with a default, environment overrides on top.
//! The environment is read through a function, so tests never mutate the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The whole configuration. See `docs/configuration.md` for every key.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PostgreSQL URL; without it `cloudd dev` runs an embedded cluster (other roles require it).
    pub database_url: Option<String>,
    /// Seconds an operation waits for PostgreSQL before it fails (the API answers 503 `database_unavailable`,
    /// the node agent and the certificate manager retry). Default 5.
    pub database_timeout_seconds: Option<u64>,
    /// Whether a role applies pending migrations when it starts; otherwise it refuses a schema that is behind and
    /// `cloudd migrate` applies them. Default false; `cloudd dev` always migrates its database.
    pub migrate_on_start: bool,
    /// API role settings.
    pub api: ApiSection,
    /// Names and address pools of the platform.
    pub platform: PlatformSection,
    /// `cloudd dev` settings.
    pub dev: DevSection,
    /// Node agent settings.
    pub node: NodeSection,
    /// DNS settings.
    pub dns: DnsSection,
    /// Edge settings.
    pub edge: EdgeSection,
    /// Certificate manager settings.
    pub certs: CertsSection,
}

/// `[certs]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertsSection {
    /// ACME directory URL (e.g. `https://acme-v02.api.letsencrypt.org/directory`, or staging). Default none: only
    /// custom domains' ownership is checked, no certificates are ordered.
    pub acme_directory: Option<String>,
    /// Contact URLs of the ACME account (`mailto:ops@example.com`).
    pub acme_contact: Vec<String>,
    /// PEM file of the CA that signs the ACME server's own certificate, when no public one does (a test CA such
    /// as pebble). Default: the system's roots.
    pub acme_root_file: Option<PathBuf>,
    /// `http-01` (answered by the edges on port 80) or `dns-01` (answered by our DNS). Wildcard domains always
    /// use dns-01. Default `http-01`.
    pub challenge: Option<String>,
    /// Renew this many days before a certificate ends. Default 30.
    pub renew_before_days: Option<u64>,
    /// Seconds between passes (ownership checks and due orders). Default 30.
    pub interval_seconds: Option<u64>,
    /// Our DNS servers (`ip:port`): a dns-01 answer goes to the CA once each of them serves it. Default none (a
    /// 2 s wait).
    pub dns_servers: Vec<SocketAddr>,
    /// `/healthz`, `/readyz` and `/metrics` of `cloudd certs`. Default `127.0.0.1:9157`.
    pub ops_listen: SocketAddr,
}

/// `[edge]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeSection {
    /// https (public port 443). Default `0.0.0.0:443`; `cloudd dev`: `127.0.0.1:443` when it may bind ports below 1024 (root), else `127.0.0.1:8443`.
    pub https_listen: Option<SocketAddr>,
    /// http (public port 80). Default `0.0.0.0:80`; `cloudd dev`: `127.0.0.1:80` when it may bind ports below 1024 (root), else `127.0.0.1:8080`.
    pub http_listen: Option<SocketAddr>,
    /// Address the ports services declare (tls, tcp) open on. Default `0.0.0.0`; `cloudd dev`: `127.0.0.1`.
    pub ports_ip: Option<std::net::IpAddr>,
    /// Seconds open connections get to finish at shutdown. Default 5.
    pub grace_period_seconds: Option<u64>,
    /// Threads serving connections, each with its own runtime, listening sockets and upstream pools. Default one
    /// per core.
    pub threads: Option<usize>,
    /// Idle keep-alive connections to instances kept per thread and public port. Default 1024.
    pub upstream_pool_size: Option<usize>,
    /// Where the access log goes: `stderr` (default, beside the other logs), `off`, or a file path to append to.
    pub access_log: Option<String>,
    /// `/healthz`, `/readyz` and `/metrics` of `cloudd edge`. Default `127.0.0.1:9156`.
    pub ops_listen: SocketAddr,
}

/// `[dns]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    /// Public listeners (UDP and TCP). Default `0.0.0.0:53`; `cloudd dev`: `127.0.0.1:5353`.
    pub listen: Option<Vec<SocketAddr>>,
    /// Private listeners answering the `internal` zone per tenant. Default none; `cloudd dev`: `127.0.0.1:5354`.
    pub private_listen: Option<Vec<SocketAddr>>,
    /// Addresses service FQDNs resolve to: the region's edges. Default `127.0.0.1`.
    pub edge_addresses: Option<Vec<std::net::IpAddr>>,
    /// `/healthz`, `/readyz` and `/metrics` of `cloudd dns`. Default `127.0.0.1:9153`.
    pub ops_listen: SocketAddr,
}

/// `[node]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Unique node name. Default: the host name.
    pub name: Option<String>,
    /// Where the node keeps unpacked images. Default: `/var/lib/cloudd/node` (`<dev.data_dir>/node` in dev).
    pub state_dir: Option<PathBuf>,
    /// Memory offered to instances, MiB. Default: 80% of the machine's.
    pub memory_mb: Option<u64>,
    /// `/healthz`, `/readyz` and `/metrics` of `cloudd node`. Default `127.0.0.1:9154`.
    pub ops_listen: SocketAddr,
    /// The private DNS listener on this host (IPv4) that instances' queries to their gateway are forwarded to;
    /// instances then get a resolv.conf naming their gateway. Default none (instances see the host's
    /// resolv.conf); `cloudd dev`: its own private listener.
    pub dns: Option<std::net::SocketAddrV4>,
    /// The OCI runtime sandboxes run through. Default `runc` (from PATH).
    pub runc: Option<PathBuf>,
    /// Where sandboxes' host uid/gid ranges are held, shared by every node agent of the host. Default
    /// `/run/cloud/ids`.
    pub ids_dir: Option<PathBuf>,
    /// The static busybox directory bundles' base layer is built from. Default `/bin/busybox`.
    pub busybox: Option<PathBuf>,
    /// Processes and threads per instance. Default 512.
    pub pids_limit: Option<i64>,
    /// CPU per instance, in thousandths of a core; 0 for no limit. Default 1000.
    pub cpu_millicores: Option<u64>,
}

impl Default for CertsSection {
    fn default() -> Self {
        Self {
            acme_directory: None,
            acme_contact: Vec::new(),
            acme_root_file: None,
            challenge: None,
            renew_before_days: None,
            interval_seconds: None,
            dns_servers: Vec::new(),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9157)),
        }
    }
}

impl Default for EdgeSection {
    fn default() -> Self {
        Self {
            https_listen: None,
            http_listen: None,
            ports_ip: None,
            grace_period_seconds: None,
            threads: None,
            upstream_pool_size: None,
            access_log: None,
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9156)),
        }
    }
}

impl Default for DnsSection {
    fn default() -> Self {
        Self {
            listen: None,
            private_listen: None,
            edge_addresses: None,
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9153)),
        }
    }
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            name: None,
            state_dir: None,
            memory_mb: None,
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9154)),
            dns: None,
            runc: None,
            ids_dir: None,
            busybox: None,
            pids_limit: None,
            cpu_millicores: None,
        }
    }
}

/// Where a node agent keeps its state unless `node.state_dir` says otherwise (`cloudd dev`: `<data_dir>/node`).
pub const DEFAULT_NODE_STATE_DIR: &str = "/var/lib/cloudd/node";

/// `[api]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Address the API listens on.
    pub listen: SocketAddr,
    /// Largest JSON request body, in bytes.
    pub max_json_bytes: usize,
    /// Largest image upload, in bytes; also the most an image (uploaded or pulled) may store.
    pub max_image_bytes: usize,
    /// The most an image's layers may unpack to, in bytes.
    pub max_image_unpacked_bytes: u64,
    /// The most entries (files, directories, links) an image's layers may hold together.
    pub max_image_entries: u64,
    /// Registries (`host[:port]`) the API may pull from over plain http. Default none: https only.
    pub insecure_registries: Vec<String>,
    /// Registries (`host[:port]`) the API may pull from over https although they are on loopback, private or
    /// link-local addresses. Default none: public addresses only.
    pub private_registries: Vec<String>,
    /// Database connections per API process.
    pub max_connections: u32,
}

impl Default for ApiSection {
    fn default() -> Self {
        let d = cloud_api::ApiConfig::default();
        Self {
            listen: "127.0.0.1:7300".parse().expect("literal"),
            max_json_bytes: d.max_json_bytes,
            max_image_bytes: d.max_image_bytes,
            max_image_unpacked_bytes: d.max_image_unpacked_bytes,
            max_image_entries: d.max_image_entries,
            insecure_registries: d.insecure_registries,
            private_registries: d.private_registries,
            max_connections: 20,
        }
    }
}

/// `[platform]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformSection {
    /// Region label in service FQDNs.
    pub region: String,
    /// Base domain of service FQDNs (`<name>-<8>.<region>.<base_domain>`).
    pub base_domain: String,
    /// Pool that tenants' private networks are carved from. Default `10.96.0.0/12`; `cloudd dev` without root
    /// defaults to `127.96.0.0/12`, as its node runs instances on loopback addresses.
    pub tenant_pool: Option<Ipv4Net>,
    /// Prefix length of each tenant's network.
    pub tenant_prefix: u8,
    /// Range of public ports for raw TCP services, `LOW-HIGH`.
    pub tcp_ports: String,
    /// Recursive resolver (`ip:port`) that custom domains' ownership records are looked up through.
    /// Default: the first nameserver of /etc/resolv.conf.
    pub resolver: Option<SocketAddr>,
    /// Days an unverified custom-domain claim lasts before it lapses and is removed (1 to 365).
    pub domain_claim_days: u32,
    /// File holding the platform secret key (64 hex digits) that seals the token signing key and certificate
    /// keys in the database. The same file on every API, edge and certificate manager; required by them. Default
    /// none; `cloudd dev`: `<data_dir>/secret.key`, created on first start.
    pub secret_key_file: Option<PathBuf>,
}

impl Default for PlatformSection {
    fn default() -> Self {
        let s = cloud_store::Settings::default();
        Self {
            region: s.region,
            base_domain: s.base_domain,
            tenant_pool: None,
            tenant_prefix: s.tenant_prefix,
            tcp_ports: format!("{}-{}", s.tcp_ports.start(), s.tcp_ports.end()),
            resolver: None,
            domain_claim_days: (s.domain_claim_ttl.as_secs() / 86400) as u32,
            secret_key_file: None,
        }
    }
}

/// `[dev]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevSection {
    /// Where the embedded PostgreSQL cluster lives. Default: `/var/lib/cloudd` as root, else
    /// `$XDG_DATA_HOME/cloudd` (`~/.local/share/cloudd`).
    pub data_dir: Option<PathBuf>,
    /// Name of the tenant `cloudd dev` creates and logs cloudctl into.
    pub tenant: String,
}

impl Default for DevSection {
    fn default() -> Self {
        Self { data_dir: None, tenant: "default".into() }
    }
}

impl Config {
    /// Reads the file (when given) and applies the environment overrides.
    pub fn load(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut cfg: Config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = env("DATABASE_URL").filter(|v| !v.is_empty()) {
            cfg.database_url = Some(v);
        }
        if let Some(v) = env("CLOUD_API_LISTEN") {
            cfg.api.listen = v.parse().with_context(|| format!("CLOUD_API_LISTEN={v} is not an address:port"))?;
        }
        if let Some(v) = env("CLOUD_REGION") {
            cfg.platform.region = v;
        }
        if let Some(v) = env("CLOUD_BASE_DOMAIN") {
            cfg.platform.base_domain = v;
        }
        for (key, field) in [
            ("CLOUD_DNS_OPS_LISTEN", &mut cfg.dns.ops_listen),
            ("CLOUD_EDGE_OPS_LISTEN", &mut cfg.edge.ops_listen),
            ("CLOUD_NODE_OPS_LISTEN", &mut cfg.node.ops_listen),
            ("CLOUD_CERTS_OPS_LISTEN", &mut cfg.certs.ops_listen),
        ] {
            if let Some(v) = env(key) {
                *field = v.parse().with_context(|| format!("{key}={v} is not an address:port"))?;
            }
        }
        if let Some(v) = env("CLOUD_MIGRATE_ON_START") {
            cfg.migrate_on_start =
                v.parse().with_context(|| format!("CLOUD_MIGRATE_ON_START={v} is not true or false"))?;
        }
        for (key, field) in
            [("CLOUD_DNS_LISTEN", &mut cfg.dns.listen), ("CLOUD_DNS_PRIVATE_LISTEN", &mut cfg.dns.private_listen)]
        {
            if let Some(v) = env(key) {
                let addrs = v.split(',').map(|a| a.trim().parse()).collect::<Result<Vec<SocketAddr>, _>>();
                *field = Some(addrs.with_context(|| format!("{key}={v} is not a list of address:port"))?);
            }
        }
        for (key, field) in [
            ("CLOUD_EDGE_HTTPS_LISTEN", &mut cfg.edge.https_listen),
            ("CLOUD_EDGE_HTTP_LISTEN", &mut cfg.edge.http_listen),
            ("CLOUD_RESOLVER", &mut cfg.platform.resolver),
        ] {
            if let Some(v) = env(key) {
                *field = Some(v.parse().with_context(|| format!("{key}={v} is not an address:port"))?);
            }
        }
        if let Some(v) = env("CLOUD_SECRET_KEY_FILE") {
            cfg.platform.secret_key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("CLOUD_TENANT_POOL") {
            cfg.platform.tenant_pool =
                Some(v.parse().with_context(|| format!("CLOUD_TENANT_POOL={v} is not an IPv4 network"))?);
        }
        if let Some(v) = env("CLOUD_DATA_DIR") {
            cfg.dev.data_dir = Some(v.into());
        }
        cfg.store_settings()?;
        Ok(cfg)
    }

    /// The store's settings, checked.
    pub fn store_settings(&self) -> anyhow::Result<cloud_store::Settings> {
        let p = &self.platform;
        let (lo, hi) = p
            .tcp_ports
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| 0 < *a && a <= b)
            .with_context(|| format!("platform.tcp_ports = {:?} must be LOW-HIGH, e.g. 30000-32767", p.tcp_ports))?;
        let tenant_pool = p.tenant_pool.unwrap_or(cloud_store::Settings::default().tenant_pool);
        if p.tenant_prefix < tenant_pool.prefix_len() || p.tenant_prefix > 30 {
            bail!(
                "platform.tenant_prefix = {} must be between the pool's prefix ({}) and 30",
                p.tenant_prefix,
                tenant_pool.prefix_len()
            );
        }
        if p.region.contains('.') || cloud_domain::names::validate_domain_name(&format!("{}.x", p.region)).is_err() {
            bail!("platform.region = {:?} must be one DNS label", p.region);
        }
        cloud_domain::names::validate_domain_name(&p.base_domain)
            .with_context(|| format!("platform.base_domain = {:?} must be a domain name", p.base_domain))?;
        if !(1..=365).contains(&p.domain_claim_days) {
            bail!("platform.domain_claim_days = {} must be between 1 and 365", p.domain_claim_days);
        }
        let database_timeout = match self.database_timeout_seconds {
            None => cloud_store::DEFAULT_DATABASE_TIMEOUT,
            Some(0) => bail!("database_timeout_seconds = 0: an operation needs at least a second"),
            Some(s) => std::time::Duration::from_secs(s),
        };
        Ok(cloud_store::Settings {
            region: p.region.clone(),
            base_domain: p.base_domain.clone(),
            tenant_pool,
            tenant_prefix: p.tenant_prefix,
            tcp_ports: lo..=hi,
            ip_hold: cloud_store::Settings::default().ip_hold,
            domain_claim_ttl: std::time::Duration::from_secs(u64::from(p.domain_claim_days) * 86400),
            database_timeout,
        })
    }

    /// `cloudd dev` defaults: DNS on unprivileged loopback ports; as a normal user its node runs in loopback
    /// mode, so private IPs come from 127.0.0.0/8 unless the configuration names a pool.
    pub fn for_dev(mut self, root: bool) -> Self {
        if !root && self.platform.tenant_pool.is_none() {
            self.platform.tenant_pool = Some("127.96.0.0/12".parse().expect("literal"));
        }
        self.dns.listen.get_or_insert_with(|| vec!["127.0.0.1:5353".parse().expect("literal")]);
        self.dns.private_listen.get_or_insert_with(|| vec!["127.0.0.1:5354".parse().expect("literal")]);
        // Ports below 1024 need root (or CAP_NET_BIND_SERVICE, or a lowered
        // net.ipv4.ip_unprivileged_port_start, as in containers): otherwise the edge takes the documented fallbacks.
        let (https, http) = if root || (can_bind(443) && can_bind(80)) { (443, 80) } else { (8443, 8080) };
        self.edge.https_listen.get_or_insert(SocketAddr::from(([127, 0, 0, 1], https)));
        self.edge.http_listen.get_or_insert(SocketAddr::from(([127, 0, 0, 1], http)));
        self.edge.ports_ip.get_or_insert(std::net::IpAddr::from([127, 0, 0, 1]));
        self
    }

    /// The edge role's settings.
    pub fn edge_config(&self) -> anyhow::Result<cloud_edge::EdgeConfig> {
        let mut c =
            cloud_edge::EdgeConfig { secret_key: self.secret_key()?.map(std::sync::Arc::new), ..Default::default() };
        let e = &self.edge;
        if let Some(a) = e.https_listen {
            c.https_listen = a;
        }
        if let Some(a) = e.http_listen {
            c.http_listen = a;
        }
        if let Some(ip) = e.ports_ip {
            c.ports_ip = ip;
        }
        if let Some(g) = e.grace_period_seconds {
            c.grace_period = std::time::Duration::from_secs(g);
        }
        if let Some(n) = e.threads {
            c.threads = n;
        }
        if let Some(n) = e.upstream_pool_size {
            c.upstream_pool_size = n;
        }
        c.access_log.target = match e.access_log.as_deref() {
            None | Some("stderr") => cloud_edge::LogTarget::Stderr,
            Some("off") => cloud_edge::LogTarget::Off,
            Some("") => bail!("edge.access_log is empty: say stderr, off or a file path"),
            Some(path) => cloud_edge::LogTarget::File(path.into()),
        };
        Ok(c)
    }

    /// The DNS role's settings.
    pub fn dns_config(&self) -> cloud_dns::DnsConfig {
        let mut c = cloud_dns::DnsConfig::default();
        if let Some(l) = &self.dns.listen {
            c.public_listen = l.clone();
        }
        if let Some(l) = &self.dns.private_listen {
            c.private_listen = l.clone();
        }
        if let Some(e) = &self.dns.edge_addresses {
            c.edge_addresses = e.clone();
        }
        c
    }

    /// The node agent's settings.
    pub fn node_config(&self) -> anyhow::Result<cloud_runtime::NodeConfig> {
        let name = match &self.node.name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "node".into()),
        };
        let n = &self.node;
        let mut cfg =
            cloud_runtime::NodeConfig::new(name, n.state_dir.clone().unwrap_or_else(|| DEFAULT_NODE_STATE_DIR.into()));
        if let Some(m) = n.memory_mb {
            cfg.memory_mb = m;
        }
        cfg.dns = n.dns;
        if let Some(runc) = &n.runc {
            cfg.runc = runc.clone();
        }
        if let Some(dir) = &n.ids_dir {
            cfg.ids_dir = dir.clone();
        }
        if let Some(busybox) = &n.busybox {
            cfg.busybox = busybox.clone();
        }
        if let Some(pids) = n.pids_limit {
            if pids < 1 {
                bail!("node.pids_limit = {pids}: an instance needs at least one process");
            }
            cfg.pids_limit = pids;
        }
        if let Some(m) = n.cpu_millicores {
            cfg.cpu_millicores = (m > 0).then_some(m);
        }
        Ok(cfg)
    }

    /// The API's limits.
    pub fn api_config(&self) -> anyhow::Result<cloud_api::ApiConfig> {
        for (key, hosts) in [
            ("insecure_registries", &self.api.insecure_registries),
            ("private_registries", &self.api.private_registries),
        ] {
            for host in hosts {
                // A registry is what a reference names before its first '/'.
                let named = cloud_oci::Reference::parse(&format!("{host}/x")).ok().map(|r| r.registry);
                if named.as_deref() != Some(host.as_str()) {
                    bail!("api.{key}: {host:?} must be host[:port] of a registry, e.g. \"127.0.0.1:5000\"");
                }
            }
        }
        Ok(cloud_api::ApiConfig {
            max_json_bytes: self.api.max_json_bytes,
            max_image_bytes: self.api.max_image_bytes,
            max_image_unpacked_bytes: self.api.max_image_unpacked_bytes,
            max_image_entries: self.api.max_image_entries,
            insecure_registries: self.api.insecure_registries.clone(),
            private_registries: self.api.private_registries.clone(),
            resolver: self.platform.resolver,
            secret_key: self.secret_key()?.map(std::sync::Arc::new),
            ..cloud_api::ApiConfig::default()
        })
    }

    /// The certificate manager's settings.
    pub fn manager_config(&self) -> anyhow::Result<cloud_certs::manager::ManagerConfig> {
        let c = &self.certs;
        let mut m = cloud_certs::manager::ManagerConfig::default();
        if let Some(url) = &c.acme_directory {
            let mut acme = cloud_certs::acme::AcmeConfig::new(url.clone());
            acme.contact = c.acme_contact.clone();
            if let Some(file) = &c.acme_root_file {
                acme.root_pem = Some(
                    std::fs::read_to_string(file)
                        .with_context(|| format!("certs.acme_root_file {}", file.display()))?,
                );
            }
            m.acme = Some(acme);
        }
        m.challenge = match c.challenge.as_deref() {
            None | Some("http-01") => cloud_certs::acme::ChallengeKind::Http01,
            Some("dns-01") => cloud_certs::acme::ChallengeKind::Dns01,
            Some(other) => bail!("certs.challenge = {other:?}: use \"http-01\" or \"dns-01\""),
        };
        if let Some(d) = c.renew_before_days {
            m.renew_before = std::time::Duration::from_secs(d * 86400);
        }
        if let Some(s) = c.interval_seconds {
            m.interval = std::time::Duration::from_secs(s.max(1));
        }
        m.dns_servers = c.dns_servers.clone();
        Ok(m)
    }

    /// The platform secret key, when a file is configured.
    pub fn secret_key(&self) -> anyhow::Result<Option<cloud_certs::seal::SecretKey>> {
        Ok(self.platform.secret_key_file.as_deref().map(cloud_certs::seal::SecretKey::from_file).transpose()?)
    }
}

/// Whether this process may listen on a loopback port (probed by binding it for a moment).
fn can_bind(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_config_parses_with_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cloudd.example.toml");
        let cfg = Config::load(Some(&path), |_| None).unwrap();
        assert_eq!(cfg.platform.region, "dev");
        assert_eq!(cfg.api.listen.port(), 7300);
        assert_eq!(cfg.store_settings().unwrap().tcp_ports, 30000..=32767);
    }

    #[test]
    fn environment_overrides_the_file_and_bad_values_are_named() {
        let cfg = Config::load(None, |k| (k == "CLOUD_REGION").then(|| "fra".to_owned())).unwrap();
        assert_eq!(cfg.platform.region, "fra");
        let err = Config::load(None, |k| (k == "CLOUD_API_LISTEN").then(|| "nope".to_owned())).unwrap_err();
        assert!(err.to_string().contains("CLOUD_API_LISTEN=nope"), "{err}");
        let mut registries = Config::default();
        registries.api.insecure_registries = vec!["127.0.0.1:5000".into(), "localhost".into()];
        assert!(registries.api_config().is_ok());
        registries.api.insecure_registries.push("http://reg.example.com".into());
        let err = registries.api_config().unwrap_err().to_string();
        assert!(err.contains("api.insecure_registries: \"http://reg.example.com\""), "{err}");
        let mut bad = Config::default();
        bad.platform.tcp_ports = "9-1".into();
        assert!(bad.store_settings().unwrap_err().to_string().contains("platform.tcp_ports"));
        assert_eq!(Config::default().store_settings().unwrap().database_timeout, std::time::Duration::from_secs(5));
        let never = Config { database_timeout_seconds: Some(0), ..Config::default() };
        assert!(never.store_settings().unwrap_err().to_string().contains("database_timeout_seconds = 0"));
    }

    /// The sample lists every key (set, or commented out with an example value) and the reference documents
    /// each key and environment variable: a key added to the code without both fails here.
    #[test]
    fn every_key_and_variable_is_in_the_sample_and_the_reference() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sample = std::fs::read_to_string(root.join("docs/cloudd.example.toml")).unwrap();
        let reference = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
        let uncommented: Vec<&str> = sample
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')) =>
                {
                    rest
                }
                _ => l,
            })
            .collect();
        let uncommented = uncommented.join("\n");
        let from_sample: Config = toml::from_str(&uncommented).expect("the sample, uncommented, parses");
        let paths = |v: &serde_json::Value| -> Vec<String> {
            let mut out = Vec::new();
            for (k, v) in v.as_object().unwrap() {
                match v.as_object() {
                    Some(section) => out.extend(section.keys().map(|f| format!("{k}.{f}"))),
                    None => out.push(k.clone()),
                }
            }
            out.sort();
            out
        };
        let in_code = paths(&serde_json::to_value(Config::default()).unwrap());
        let sample_value: toml::Value = toml::from_str(&uncommented).unwrap();
        let in_sample = paths(&serde_json::to_value(sample_value).unwrap());
        assert_eq!(in_sample, in_code, "docs/cloudd.example.toml must list every key");
        assert_eq!(paths(&serde_json::to_value(from_sample).unwrap()), in_code);
        for key in &in_code {
            assert!(reference.contains(&format!("| `{key}` |")), "docs/configuration.md has no row for {key}");
        }
        let sources =
            [include_str!("config.rs"), include_str!("main.rs"), include_str!("dev.rs"), include_str!("roles/edge.rs")];
        for source in sources {
            for var in source
                .split('"')
                .filter(|s| s.starts_with("CLOUD_") && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
            {
                assert!(reference.contains(&format!("`{var}")), "docs/configuration.md does not mention {var}");
            }
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("[api]\nlisten_addr = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }
}
