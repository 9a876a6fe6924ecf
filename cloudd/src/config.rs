//! `cloudd` configuration: one TOML file, every key optional with a default, environment overrides on top.
//! Each role's section is that role's own configuration type (`cloud_edge::EdgeConfig` is `[edge]`, ...), so every
//! setting a role has is a key; what is `cloudd`'s alone (`[platform]`, `[dev]`, the database) is here.
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
    /// The API.
    pub api: cloud_api::ApiConfig,
    /// Names and address pools of the platform.
    pub platform: PlatformSection,
    /// `cloudd dev` settings.
    pub dev: DevSection,
    /// The node agent.
    pub node: cloud_runtime::NodeConfig,
    /// The DNS.
    pub dns: cloud_dns::DnsConfig,
    /// The edge.
    pub edge: cloud_edge::EdgeConfig,
    /// The certificate manager.
    pub certs: cloud_certs::manager::ManagerConfig,
    /// The keys the file and the environment set, so that `cloudd dev`'s own defaults yield to them.
    #[serde(skip)]
    given: toml::Table,
}

/// Variables not named `CLOUD_<SECTION>_<KEY>` (`CLOUD_<KEY>` at the top), as they were before every key had one.
const ENV_NAMES: &[(&str, &str)] = &[
    ("database_url", "DATABASE_URL"),
    ("platform.region", "CLOUD_REGION"),
    ("platform.base_domain", "CLOUD_BASE_DOMAIN"),
    ("platform.tenant_pool", "CLOUD_TENANT_POOL"),
    ("platform.resolver", "CLOUD_RESOLVER"),
    ("platform.secret_key_file", "CLOUD_SECRET_KEY_FILE"),
    ("dev.data_dir", "CLOUD_DATA_DIR"),
];

/// The environment variable that overrides `key` (`edge.http_listen`: `CLOUD_EDGE_HTTP_LISTEN`).
pub fn env_name(key: &str) -> String {
    match ENV_NAMES.iter().find(|(k, _)| *k == key) {
        Some((_, var)) => (*var).to_owned(),
        None => format!("CLOUD_{}", key.replace('.', "_").to_ascii_uppercase()),
    }
}

/// Every key (`section.key`, or `key` at the top) with its default, whose JSON type says how an environment
/// value is read.
fn keys() -> Vec<(String, serde_json::Value)> {
    let defaults = serde_json::to_value(Config::default()).expect("the configuration serializes");
    let mut out = Vec::new();
    for (k, v) in defaults.as_object().expect("a table") {
        match v.as_object() {
            Some(section) => out.extend(section.iter().map(|(f, v)| (format!("{k}.{f}"), v.clone()))),
            None => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// An environment value as the key's type wants it: a string key takes it as is, a list takes `a,b` (or a TOML
/// array), anything else a TOML value (`5`, `true`, `{ burst = 10 }`), else the text.
fn env_value(default: &serde_json::Value, raw: &str) -> toml::Value {
    let literal = |raw: &str| {
        toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
    };
    match default {
        serde_json::Value::String(_) => toml::Value::String(raw.to_owned()),
        serde_json::Value::Array(_) if !raw.trim_start().starts_with('[') => {
            toml::Value::Array(raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(literal).collect())
        }
        _ => literal(raw),
    }
}

/// Sets `section.key` (or `key`) in a table.
fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        Some((section, field)) => {
            let section = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = section {
                t.insert(field.to_owned(), value);
            }
        }
        None => {
            table.insert(key.to_owned(), value);
        }
    }
}

/// A range of ports, written `LOW-HIGH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    /// First port of the range.
    pub low: u16,
    /// Last port of the range.
    pub high: u16,
}

impl TryFrom<String> for PortRange {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| 0 < *a && a <= b)
            .map(|(low, high)| Self { low, high })
            .ok_or_else(|| {
                format!("{text:?} is not a port range: write LOW-HIGH with 0 < LOW <= HIGH, e.g. 30000-32767")
            })
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> Self {
        format!("{}-{}", r.low, r.high)
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
    /// Pool hosts' overlay addresses come from (one per node that runs the overlay).
    pub host_pool: Ipv4Net,
    /// Range of public ports for raw TCP services, `LOW-HIGH`.
    pub tcp_ports: PortRange,
    /// Recursive resolver (`ip:port`) that custom domains' ownership records are looked up through.
    /// Default: the first nameserver of /etc/resolv.conf.
    pub resolver: Option<SocketAddr>,
    /// Days an unverified custom-domain claim lasts before it lapses and is removed (1 to 365).
    pub domain_claim_days: u32,
    /// Seconds an instance being stopped or deleted gets to finish the requests in flight after the edges stop
    /// sending it new ones (1 to 3600).
    pub drain_timeout_seconds: u32,
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
            host_pool: s.host_pool,
            tcp_ports: PortRange { low: *s.tcp_ports.start(), high: *s.tcp_ports.end() },
            resolver: None,
            domain_claim_days: (s.domain_claim_ttl.as_secs() / 86400) as u32,
            drain_timeout_seconds: s.drain_timeout.as_secs() as u32,
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
    /// Reads the file (when given) and applies the environment overrides: each key's variable (see
    /// [`env_name`]), an empty one being ignored.
    pub fn load(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut given = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let table: toml::Table =
                    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                // Parsed as the configuration too, so that an error names its line.
                toml::from_str::<Config>(&text).with_context(|| format!("parsing {}", path.display()))?;
                table
            }
            None => toml::Table::new(),
        };
        for (key, default) in keys() {
            let var = env_name(&key);
            if let Some(raw) = env(&var).filter(|v| !v.is_empty()) {
                set(&mut given, &key, env_value(&default, &raw));
                Config::deserialize(toml::Value::Table(given.clone())).with_context(|| format!("{var}={raw}"))?;
            }
        }
        let mut cfg = Config::deserialize(toml::Value::Table(given.clone()))?;
        cfg.given = given;
        cfg.check()?;
        Ok(cfg)
    }

    /// Whether the file or the environment set `key` (`section.key`).
    pub fn is_set(&self, key: &str) -> bool {
        match key.split_once('.') {
            Some((section, field)) => self.given.get(section).and_then(|s| s.get(field)).is_some(),
            None => self.given.contains_key(key),
        }
    }

    /// What serde cannot say about single values.
    fn check(&mut self) -> anyhow::Result<()> {
        self.store_settings()?;
        if self.node.pids_limit < 1 {
            bail!("node.pids_limit = {}: an instance needs at least one process", self.node.pids_limit);
        }
        self.certs.interval = self.certs.interval.max(std::time::Duration::from_secs(1));
        self.check_registries()
    }

    /// The store's settings, checked.
    pub fn store_settings(&self) -> anyhow::Result<cloud_store::Settings> {
        let p = &self.platform;
        let tenant_pool = p.tenant_pool.unwrap_or(cloud_store::Settings::default().tenant_pool);
        if p.tenant_prefix < tenant_pool.prefix_len() || p.tenant_prefix > 30 {
            bail!(
                "platform.tenant_prefix = {} must be between the pool's prefix ({}) and 30",
                p.tenant_prefix,
                tenant_pool.prefix_len()
            );
        }
        if p.host_pool.prefix_len() > 30 {
            bail!("platform.host_pool = {} holds no host addresses; use a /30 or larger", p.host_pool);
        }
        if p.host_pool.contains(&tenant_pool.network()) || tenant_pool.contains(&p.host_pool.network()) {
            bail!("platform.host_pool = {} overlaps platform.tenant_pool = {tenant_pool}", p.host_pool);
        }
        if p.region.contains('.') || cloud_domain::names::validate_domain_name(&format!("{}.x", p.region)).is_err() {
            bail!("platform.region = {:?} must be one DNS label", p.region);
        }
        cloud_domain::names::validate_domain_name(&p.base_domain)
            .with_context(|| format!("platform.base_domain = {:?} must be a domain name", p.base_domain))?;
        if !(1..=365).contains(&p.domain_claim_days) {
            bail!("platform.domain_claim_days = {} must be between 1 and 365", p.domain_claim_days);
        }
        if !(1..=3600).contains(&p.drain_timeout_seconds) {
            bail!("platform.drain_timeout_seconds = {} must be between 1 and 3600", p.drain_timeout_seconds);
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
            host_pool: p.host_pool,
            tcp_ports: p.tcp_ports.low..=p.tcp_ports.high,
            ip_hold: cloud_store::Settings::default().ip_hold,
            domain_claim_ttl: std::time::Duration::from_secs(u64::from(p.domain_claim_days) * 86400),
            drain_timeout: std::time::Duration::from_secs(u64::from(p.drain_timeout_seconds)),
            database_timeout,
        })
    }

    /// `cloudd dev` defaults, where the file and the environment say nothing: DNS on unprivileged loopback
    /// ports, the edge on loopback; as a normal user its node runs in loopback mode, so private IPs come from
    /// 127.0.0.0/8.
    pub fn for_dev(mut self, root: bool) -> Self {
        if !root && self.platform.tenant_pool.is_none() {
            self.platform.tenant_pool = Some("127.96.0.0/12".parse().expect("literal"));
        }
        if !self.is_set("dns.listen") {
            self.dns.public_listen = vec![SocketAddr::from(([127, 0, 0, 1], 5353))];
        }
        if !self.is_set("dns.private_listen") {
            self.dns.private_listen = vec![SocketAddr::from(([127, 0, 0, 1], 5354))];
        }
        // Ports below 1024 need root (or CAP_NET_BIND_SERVICE, or a lowered
        // net.ipv4.ip_unprivileged_port_start, as in containers): otherwise the edge takes the documented fallbacks.
        let (https, http) = if root || (can_bind(443) && can_bind(80)) { (443, 80) } else { (8443, 8080) };
        if !self.is_set("edge.https_listen") {
            self.edge.https_listen = SocketAddr::from(([127, 0, 0, 1], https));
        }
        if !self.is_set("edge.http_listen") {
            self.edge.http_listen = SocketAddr::from(([127, 0, 0, 1], http));
        }
        if !self.is_set("edge.ports_ip") {
            self.edge.ports_ip = std::net::IpAddr::from([127, 0, 0, 1]);
        }
        self
    }

    /// The API's settings with the platform's resolver and secret key.
    pub fn api_config(&self) -> anyhow::Result<cloud_api::ApiConfig> {
        self.check_registries()?;
        Ok(cloud_api::ApiConfig {
            resolver: self.platform.resolver,
            secret_key: self.secret_key()?.map(std::sync::Arc::new),
            ..self.api.clone()
        })
    }

    fn check_registries(&self) -> anyhow::Result<()> {
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
        Ok(())
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

    /// The sample with its commented-out keys (`# key = value`) set.
    fn uncommented(sample: &str) -> String {
        let lines: Vec<&str> = sample
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
        lines.join("\n")
    }

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
        let err = Config::load(None, |k| (k == "CLOUD_PLATFORM_TCP_PORTS").then(|| "9-1".to_owned())).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("CLOUD_PLATFORM_TCP_PORTS=9-1") && err.contains("\"9-1\" is not a port range"), "{err}");
        let err = toml::from_str::<Config>("[platform]\ntcp_ports = \"9-1\"").unwrap_err().to_string();
        assert!(err.contains("tcp_ports") && err.contains("LOW-HIGH"), "{err}");
        let err = toml::from_str::<Config>("[certs]\nchallenge = \"tls-alpn-01\"").unwrap_err().to_string();
        assert!(err.contains("\"tls-alpn-01\" is not a challenge"), "{err}");
        let err = Config::load(None, |k| (k == "CLOUD_NODE_PIDS_LIMIT").then(|| "0".to_owned())).unwrap_err();
        assert!(err.to_string().contains("node.pids_limit = 0"), "{err}");
        let off = Config::load(None, |k| (k == "CLOUD_DNS_RATE_LIMIT").then(|| "off".to_owned())).unwrap();
        assert_eq!(off.dns.rate_limit, None);
        let err = toml::from_str::<Config>("[edge]\naccess_log = \"\"").unwrap_err().to_string();
        assert!(err.contains("say stderr, off or a file path"), "{err}");
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
        let uncommented = uncommented(&sample);
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
            let row = format!("| `{key}` | `{}`", env_name(key));
            assert!(reference.contains(&row), "docs/configuration.md has no row for {key} naming its variable");
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
        for section in ["edge", "dns", "node", "certs"] {
            let err = toml::from_str::<Config>(&format!("[{section}]\nbogus = 1")).unwrap_err();
            assert!(err.to_string().contains("bogus"), "{section}: {err}");
        }
    }

    /// The sample's value of every key, given as its environment variable alone, comes out as the key's value.
    #[test]
    fn every_key_can_be_set_from_the_environment() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sample = std::fs::read_to_string(root.join("docs/cloudd.example.toml")).unwrap();
        let sample: toml::Table = toml::from_str(&uncommented(&sample)).expect("the sample, uncommented, parses");
        let sample = serde_json::to_value(sample).unwrap();
        fn text(v: &serde_json::Value) -> String {
            match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) if a.is_empty() => "[]".into(),
                serde_json::Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
                serde_json::Value::Object(_) => toml::Value::try_from(v).unwrap().to_string(),
                other => other.to_string(),
            }
        }
        for (key, _) in keys() {
            let want = key.split('.').fold(&sample, |v, k| &v[k]);
            assert!(!want.is_null(), "the sample has no value for {key}");
            let var = env_name(&key);
            let cfg = Config::load(None, |k| (k == var).then(|| text(want)))
                .unwrap_or_else(|e| panic!("{var}={}: {e:#}", text(want)));
            assert!(cfg.is_set(&key), "{var} did not set {key}");
            let got = serde_json::to_value(&cfg).unwrap();
            assert_eq!(key.split('.').fold(&got, |v, k| &v[k]), want, "{var}");
        }
    }

    #[test]
    fn dev_defaults_yield_to_the_file_and_the_environment() {
        let env = |k: &str| (k == "CLOUD_DNS_LISTEN").then(|| "127.0.0.1:0".to_owned());
        let cfg = Config::load(None, env).unwrap().for_dev(false);
        assert_eq!(cfg.dns.public_listen, vec![SocketAddr::from(([127, 0, 0, 1], 0))]);
        assert_eq!(cfg.dns.private_listen, vec![SocketAddr::from(([127, 0, 0, 1], 5354))]);
        assert_eq!(cfg.edge.ports_ip, std::net::IpAddr::from([127, 0, 0, 1]));
        assert_eq!(cfg.platform.tenant_pool, Some("127.96.0.0/12".parse().unwrap()));
    }
}
