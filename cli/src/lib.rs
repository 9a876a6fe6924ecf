//! `cloudctl`, the platform's command-line client: remotes as LXD has them, services and deploys as Unikraft's
//! `kraft cloud` has them, output formats as kubectl has them.
//!
//! It talks only to the public API (see [`client::ENDPOINTS`]) and shares its request and response types with the
//! server through `cloud-domain`.

pub mod client;
pub mod config;
pub mod deploy;
pub mod image;
pub mod output;
pub mod pin;
pub mod progress;
pub mod stream;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use cloud_domain::api::{
    CreateInstance, CreateService, CreateTenant, CreateToken, CreatedToken, DomainState, Image, Instance, LogLine,
    QuotasPatch, Scope, Service, Tenant, Token, UpdateService, UpdateTenant, WhoAmI,
};
use cloud_domain::state::RestartPolicy;

use crate::client::{Client, seg};
use crate::config::{Config, Remote};
use crate::output::{Format, print};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "cloudctl",
    version,
    about = "Manage services, instances and images on the cloud platform",
    after_help = "Examples:\n  cloudctl service create my-service 443:8080\n  cloudctl deploy --service my-service --image hello\n  cloudctl deploy ./app -p 443:8080\n  cloudctl deploy --image 127.0.0.1:5000/web:v1 -p 443:80\n  cloudctl image push ./app.oci.tar --name app\n  cloudctl instance list -o json"
)]
pub struct Cli {
    /// Remote to talk to (default: the configured default remote).
    #[arg(long, global = true, env = "CLOUD_REMOTE")]
    pub remote: Option<String>,
    /// Output format of read commands: table, json, yaml, name, or value=PATH for one field (e.g. value=fqdn).
    #[arg(long, short, global = true, default_value = "table", value_name = "FORMAT")]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage remotes (API endpoints and their tokens).
    #[command(subcommand)]
    Remote(RemoteCmd),
    /// Manage services: public names with port mappings.
    #[command(subcommand, visible_alias = "svc")]
    Service(ServiceCmd),
    /// Deploy instances: of an image, of a directory or archive (pushed first), or of a registry reference
    /// (pulled first).
    #[command(
        after_help = "Examples:\n  cloudctl deploy --service my-service --image hello\n  cloudctl deploy -p 443:8080 --image hello\n  cloudctl deploy ./app -p 443:8080 -e MODE=prod -R 3 --restart on-failure\n  cloudctl deploy ./app.oci.tar -p 443:8080\n  cloudctl deploy --image 127.0.0.1:5000/team/web:v1 -p 443:80\n  cloudctl deploy --image ghcr.io/org/app:1.2 --image-name app --internal-port 3000 -p 443:3000"
    )]
    Deploy(DeployArgs),
    /// Manage instances.
    #[command(subcommand, visible_alias = "inst")]
    Instance(InstanceCmd),
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage tenants and quotas (admin).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Show the current remote, tenant and token.
    #[command(after_help = "Example:\n  cloudctl whoami -o json")]
    Whoami,
    /// Print the platform CA certificate (PEM), or install it in the system's trust store.
    #[command(
        after_help = "The platform CA signs the certificates of service FQDNs on platforms without a public CA (cloudd dev,\nself-hosted). Examples:\n  cloudctl ca > ca.pem && curl --cacert ca.pem https://my-service-ab12cd34.dev.cloud.localhost\n  sudo cloudctl ca --install"
    )]
    Ca {
        /// Install it as /usr/local/share/ca-certificates/cloud-<remote>.crt and run update-ca-certificates
        /// (Debian and Ubuntu; needs root).
        #[arg(long)]
        install: bool,
    },
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  cloudctl completion bash > /etc/bash_completion.d/cloudctl")]
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `cloudctl remote ...`
#[derive(Debug, Subcommand)]
pub enum RemoteCmd {
    /// Add a remote.
    #[command(
        after_help = "Examples:\n  cloudctl remote add prod https://api.example.com --token eyJ...\n  cloudctl remote add lab https://10.0.0.5:7300 --token eyJ... --accept-certificate"
    )]
    Add {
        /// Remote name.
        name: String,
        /// API URL (http:// or https://).
        url: String,
        /// Bearer token.
        #[arg(long)]
        token: Option<String>,
        /// PEM file of a CA to trust for this remote.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Trust the https remote's certificate as presented now (pinning its fingerprint) without asking.
        #[arg(long)]
        accept_certificate: bool,
    },
    /// List remotes.
    #[command(after_help = "Example:\n  cloudctl remote list", visible_alias = "ls")]
    List,
    /// Make a remote the default.
    #[command(after_help = "Example:\n  cloudctl remote switch local")]
    Switch {
        /// Remote name.
        name: String,
    },
    /// Remove a remote.
    #[command(after_help = "Example:\n  cloudctl remote remove prod", visible_alias = "rm")]
    Remove {
        /// Remote name.
        name: String,
    },
}

/// `cloudctl service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service. The first argument is its name unless it is a port spec.
    #[command(
        after_help = "Examples:\n  cloudctl service create my-service 443:8080\n  cloudctl service create 443:8080 8443:9000/tls --domain shop --domain www.example.com.\n\nPort specs: PUBLIC[:DEST][/HANDLER[+HANDLER]]; handlers tls, http, redirect, tcp, and the option proxy."
    )]
    Create {
        /// [NAME] PORTSPEC...
        #[arg(value_name = "NAME|PORTSPEC")]
        args: Vec<String>,
        /// Service name (instead of the first argument).
        #[arg(long, short)]
        name: Option<String>,
        #[command(flatten)]
        opts: ServiceOpts,
    },
    /// List services.
    #[command(after_help = "Example:\n  cloudctl service list -o json", visible_alias = "ls")]
    List {
        /// Re-render whenever something changes.
        #[arg(long, short)]
        watch: bool,
    },
    /// Show a service.
    #[command(after_help = "Example:\n  cloudctl service get my-service -o yaml")]
    Get {
        /// Name or id.
        name: String,
    },
    /// Change a service's ports, limits or domains.
    #[command(
        after_help = "Example:\n  cloudctl service update my-service -p 443:8080 --hard-limit 100 --domain www.example.com."
    )]
    Update {
        /// Name or id.
        name: String,
        /// Replace the port specs.
        #[arg(long = "port", short = 'p')]
        ports: Vec<String>,
        #[command(flatten)]
        opts: ServiceOpts,
    },
    /// Check a custom domain's ownership record now (the platform also checks pending domains periodically).
    #[command(
        after_help = "Example:\n  cloudctl service verify my-service www.example.com\n\nThe domain is routed, and gets certificates, once TXT _cloud-challenge.<domain> holds the token\n`cloudctl service get` shows."
    )]
    Verify {
        /// Service name or id.
        name: String,
        /// The custom domain.
        domain: String,
    },
    /// Delete a service.
    #[command(after_help = "Example:\n  cloudctl service delete my-service --force", visible_alias = "rm")]
    Delete {
        /// Name or id.
        name: String,
        /// Also delete its instances.
        #[arg(long)]
        force: bool,
    },
}

/// Options shared by create and update.
#[derive(Debug, Args)]
pub struct ServiceOpts {
    /// Extra name: `shop` for shop.<region>.<base>, or a custom domain with a trailing dot (repeatable).
    #[arg(long = "domain")]
    domains: Vec<String>,
    /// In-flight requests per instance above which others are preferred.
    #[arg(long)]
    soft_limit: Option<u32>,
    /// In-flight requests per instance above which requests are refused.
    #[arg(long)]
    hard_limit: Option<u32>,
    /// Stop the instances after SECONDS without a request; the next request starts them (0: never).
    #[arg(long, value_name = "SECONDS")]
    scale_to_zero: Option<u32>,
}

/// `cloudctl deploy ...`
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Directory (with manifest.json at its root, or an OCI image layout) or image archive (OCI or docker) to
    /// push as an image.
    path: Option<PathBuf>,
    /// Attach to this service.
    #[arg(long, short, conflicts_with = "ports")]
    service: Option<String>,
    /// Create an ephemeral service with these port specs, deleted with its last instance.
    #[arg(long = "port", short = 'p')]
    ports: Vec<String>,
    /// Image to run: a name, or a registry reference (host[:port]/repository[:tag]) to pull first. With PATH:
    /// the name to push it as (default the file's or directory's name).
    #[arg(long, short)]
    image: Option<String>,
    /// Name to store a pulled image under (default: the repository's last component).
    #[arg(long, conflicts_with = "path")]
    image_name: Option<String>,
    /// The port the instances listen on (their PORT; default the image's exposed port).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    internal_port: Option<u16>,
    /// Instance name.
    #[arg(long, short)]
    name: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Number of instances.
    #[arg(long = "replicas", short = 'R', default_value_t = 1)]
    replicas: u32,
    /// Restart policy.
    #[arg(long, default_value = "never", value_parser = parse_restart)]
    restart: RestartPolicy,
    /// Memory limit per instance, MiB.
    #[arg(long, short)]
    memory: Option<u32>,
    /// Create the instances stopped.
    #[arg(long)]
    no_start: bool,
    /// After they run, stream the first instance's logs.
    #[arg(long, short)]
    follow: bool,
    /// Seconds to wait for the instances to run.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    s.parse()
}

/// `cloudctl instance ...`
#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// List instances.
    #[command(after_help = "Example:\n  cloudctl instance list --watch", visible_alias = "ls")]
    List {
        /// Re-render whenever something changes.
        #[arg(long, short)]
        watch: bool,
    },
    /// Show an instance.
    #[command(after_help = "Example:\n  cloudctl instance get web-1 -o json")]
    Get {
        /// Name or id.
        name: String,
    },
    /// Delete an instance (its ephemeral service goes with the last one).
    #[command(after_help = "Example:\n  cloudctl instance delete hello-x1y2z", visible_alias = "rm")]
    Delete {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Start a stopped instance.
    #[command(after_help = "Example:\n  cloudctl instance start web-1")]
    Start {
        /// Name or id.
        name: String,
    },
    /// Stop an instance.
    #[command(after_help = "Example:\n  cloudctl instance stop web-1")]
    Stop {
        /// Name or id.
        name: String,
    },
    /// Show an instance's output.
    #[command(after_help = "Example:\n  cloudctl instance logs web-1 -f")]
    Logs {
        /// Name or id.
        name: String,
        /// Keep streaming new lines.
        #[arg(long, short)]
        follow: bool,
        /// Lines to show.
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
}

/// `cloudctl image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List images.
    #[command(after_help = "Example:\n  cloudctl image list -o name", visible_alias = "ls")]
    List,
    /// Show an image.
    #[command(after_help = "Example:\n  cloudctl image get hello")]
    Get {
        /// Name or id.
        name: String,
    },
    /// Push an image: a directory (with manifest.json at its root, or an OCI image layout), an OCI archive or a
    /// docker archive, gzipped or not.
    #[command(
        after_help = "Examples:\n  cloudctl image push ./app --name app\n  skopeo copy docker://nginx:1.27 oci-archive:nginx.tar && cloudctl image push nginx.tar\n  docker save app:v1 | gzip > app.tar.gz && cloudctl image push app.tar.gz"
    )]
    Push {
        /// Directory or archive file.
        path: PathBuf,
        /// Image name (default: the directory's name, or the file's up to its first '.').
        #[arg(long, short)]
        name: Option<String>,
    },
    /// Have the platform pull an image from a registry.
    #[command(
        after_help = "Examples:\n  cloudctl image pull 127.0.0.1:5000/team/web:v1\n  cloudctl image pull ghcr.io/org/app@sha256:... --name app\n\nThe platform pulls over https; a plain-http registry must be in the platform's api.insecure_registries."
    )]
    Pull {
        /// `[host[:port]/]repository[:tag][@sha256:...]`; no host means Docker Hub.
        reference: String,
        /// Image name (default: the repository's last component).
        #[arg(long, short)]
        name: Option<String>,
    },
    /// Delete an image.
    #[command(after_help = "Example:\n  cloudctl image delete app", visible_alias = "rm")]
    Delete {
        /// Name or id.
        name: String,
    },
}

/// `cloudctl tenant ...`
#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// List tenants.
    #[command(after_help = "Example:\n  cloudctl tenant list", visible_alias = "ls")]
    List,
    /// Show a tenant.
    #[command(after_help = "Example:\n  cloudctl tenant get acme")]
    Get {
        /// Name or id.
        name: String,
    },
    /// Create a tenant.
    #[command(after_help = "Example:\n  cloudctl tenant create acme --max-instances 50")]
    Create {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        quotas: QuotaOpts,
    },
    /// Change a tenant's quotas.
    #[command(after_help = "Example:\n  cloudctl tenant update acme --max-memory-mb 8192")]
    Update {
        /// Name or id.
        name: String,
        #[command(flatten)]
        quotas: QuotaOpts,
    },
    /// Delete an empty tenant.
    #[command(after_help = "Example:\n  cloudctl tenant delete acme", visible_alias = "rm")]
    Delete {
        /// Name or id.
        name: String,
    },
}

/// Quota flags.
#[derive(Debug, Args)]
pub struct QuotaOpts {
    /// Services at once.
    #[arg(long)]
    max_services: Option<u32>,
    /// Instances at once.
    #[arg(long)]
    max_instances: Option<u32>,
    /// Memory of all instances, MiB.
    #[arg(long)]
    max_memory_mb: Option<u64>,
    /// Images at once.
    #[arg(long)]
    max_images: Option<u32>,
    /// Extra domains over all services at once.
    #[arg(long)]
    max_domains: Option<u32>,
}

impl QuotaOpts {
    fn patch(&self) -> QuotasPatch {
        QuotasPatch {
            max_services: self.max_services,
            max_instances: self.max_instances,
            max_memory_mb: self.max_memory_mb,
            max_images: self.max_images,
            max_domains: self.max_domains,
        }
    }
}

/// `cloudctl token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token; prints the JWT once.
    #[command(after_help = "Example:\n  cloudctl token create --scope read --description ci")]
    Create {
        /// Scopes (repeatable): read, write, admin. Default read and write.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// For another tenant (admin).
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime in days.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens.
    #[command(after_help = "Example:\n  cloudctl token list", visible_alias = "ls")]
    List,
    /// Revoke a token.
    #[command(after_help = "Example:\n  cloudctl token revoke 0b6f3c2e-5d6a-4d1e-9f0a-2b7c8d9e0f1a")]
    Revoke {
        /// Token id.
        id: String,
    },
}

/// Runs the command line; errors go to stderr with a non-zero exit.
pub fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(cli, &|k| std::env::var(k).ok())) {
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            msg.push_str(&format!(": {cause}"));
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn connect(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Client> {
    let path = config::path(env);
    let cfg = Config::load(&path)?;
    let (name, remote) = cfg.resolve(cli.remote.as_deref(), env)?;
    Client::new(&name, &remote)
}

/// Puts the platform CA where Debian's `update-ca-certificates` picks it up, and runs it.
fn install_ca(remote: &str, pem: &str) -> anyhow::Result<()> {
    let dir = std::path::Path::new("/usr/local/share/ca-certificates");
    if !dir.is_dir() {
        bail!(
            "{} does not exist: install the CA by hand (cloudctl ca > ca.pem) with your system's tool",
            dir.display()
        );
    }
    let file = dir.join(format!("cloud-{remote}.crt"));
    std::fs::write(&file, pem).with_context(|| {
        format!(
            "cannot write {} (run as root: sudo cloudctl ca --install, or save it: cloudctl ca > ca.pem)",
            file.display()
        )
    })?;
    let status = std::process::Command::new("update-ca-certificates")
        .stdout(std::process::Stdio::null())
        .status()
        .context("running update-ca-certificates")?;
    if !status.success() {
        bail!("update-ca-certificates failed ({status})");
    }
    eprintln!("installed {}; curl and other OpenSSL clients now trust remote {remote}'s services", file.display());
    Ok(())
}

/// Whether a positional argument of `service create` is a port spec rather than a name.
fn looks_like_port_spec(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_digit())
}

async fn run(cli: Cli, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let out = cli.output;
    match &cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "cloudctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Remote(cmd) => remote(cmd, out, env).await,
        Command::Whoami => {
            let c = connect(&cli, env)?;
            let me: WhoAmI = c.get("/v1/whoami").await?;
            match out {
                Format::Json => println!("{}", serde_json::to_string_pretty(&me)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&me)?),
                Format::Name => println!("{}", me.tenant.name),
                Format::Value(path) => output::values(&[&me], path)?,
                Format::Table => {
                    let scopes: Vec<&str> = me.scopes.iter().map(|s| s.as_str()).collect();
                    println!("tenant: {}  network: {}", me.tenant.name, me.tenant.network);
                    println!("token:  {}  scopes: {}  expires: {}", me.token_id, scopes.join(","), me.expires_at);
                }
            }
            Ok(())
        }
        Command::Ca { install } => {
            let c = connect(&cli, env)?;
            let pem = c.send(c.request(reqwest::Method::GET, "/v1/ca.pem")).await?.text().await?;
            if !pem.starts_with("-----BEGIN CERTIFICATE-----") {
                bail!("{} did not answer with a PEM certificate", c.base());
            }
            if *install {
                install_ca(c.name(), &pem)?;
            } else {
                print!("{pem}");
            }
            Ok(())
        }
        Command::Service(cmd) => service(&connect(&cli, env)?, cmd, out).await,
        Command::Deploy(args) => deploy(&connect(&cli, env)?, args, out).await,
        Command::Instance(cmd) => instance(&connect(&cli, env)?, cmd, out).await,
        Command::Image(cmd) => image(&connect(&cli, env)?, cmd, out).await,
        Command::Tenant(cmd) => tenant(&connect(&cli, env)?, cmd, out).await,
        Command::Token(cmd) => token(&connect(&cli, env)?, cmd, out).await,
    }
}

/// First contact with an https remote: nothing to pin when a public root vouches for its certificate; otherwise
/// show the fingerprint and pin it once the user accepts (a prompt on a terminal, or `--accept-certificate`).
async fn first_contact(url: &str, accept: bool) -> anyhow::Result<Option<String>> {
    let healthz = format!("{}/healthz", url.trim_end_matches('/'));
    if reqwest::Client::new().get(&healthz).send().await.is_ok() {
        return Ok(None);
    }
    let recorder = pin::Pinned::new(None);
    let probe = reqwest::Client::builder().use_preconfigured_tls(recorder.client_config()).build()?;
    let reached = probe.get(&healthz).send().await;
    let Some(seen) = recorder.seen() else {
        let why = reached.err().map(|e| e.to_string()).unwrap_or_default();
        bail!("cannot reach {url} to check its certificate: {why}");
    };
    if accept {
        return Ok(Some(seen));
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("The certificate of {url} is not signed by a known authority.\nFingerprint: {seen}\nTrust it? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim().eq_ignore_ascii_case("y") {
            return Ok(Some(seen));
        }
        bail!("not added: the certificate of {url} was not accepted");
    }
    bail!(
        "the certificate of {url} is not signed by a known authority (fingerprint {seen}); check it and pass --accept-certificate to pin it, or --ca FILE"
    )
}

async fn remote(cmd: &RemoteCmd, out: Format, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let path = config::path(env);
    let mut cfg = Config::load(&path)?;
    match cmd {
        RemoteCmd::Add { name, url, token, ca, accept_certificate } => {
            reqwest::Url::parse(url)
                .with_context(|| format!("\"{url}\" is not a URL (e.g. https://api.example.com)"))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("\"{url}\": the URL must start with http:// or https://");
            }
            if cfg.remotes.contains_key(name) {
                bail!("remote \"{name}\" exists already; remove it first (cloudctl remote remove {name})");
            }
            let fingerprint = match (url.starts_with("https://"), ca) {
                (true, None) => first_contact(url, *accept_certificate).await?,
                _ => None,
            };
            cfg.add(name, Remote { url: url.clone(), token: token.clone(), ca: ca.clone(), fingerprint })?;
            cfg.save(&path)?;
            eprintln!("added remote {name} ({url})");
        }
        RemoteCmd::List => {
            let rows: Vec<(String, Remote)> = cfg.remotes.clone().into_iter().collect();
            match out {
                Format::Json => println!("{}", serde_json::to_string_pretty(&cfg.remotes_public())?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&cfg.remotes_public())?),
                Format::Name => rows.iter().for_each(|(n, _)| println!("{n}")),
                Format::Value(path) => output::values(&[cfg.remotes_public()], path)?,
                Format::Table => {
                    let table = output::Table {
                        headers: vec!["NAME", "URL", "DEFAULT", "TOKEN"],
                        rows: rows
                            .iter()
                            .map(|(n, r)| {
                                vec![
                                    n.clone(),
                                    r.url.clone(),
                                    (cfg.default_remote.as_deref() == Some(n)).to_string(),
                                    if r.token.is_some() { "yes".into() } else { "no".into() },
                                ]
                            })
                            .collect(),
                    };
                    print!("{}", table.render(output::terminal_width()));
                }
            }
        }
        RemoteCmd::Switch { name } => {
            cfg.switch(name)?;
            cfg.save(&path)?;
            eprintln!("default remote is now {name}");
        }
        RemoteCmd::Remove { name } => {
            cfg.remove(name)?;
            cfg.save(&path)?;
            eprintln!("removed remote {name}");
        }
    }
    Ok(())
}

impl Config {
    /// Remotes without their tokens, for printing.
    fn remotes_public(&self) -> BTreeMap<String, serde_json::Value> {
        self.remotes
            .iter()
            .map(|(n, r)| {
                let v = serde_json::json!({
                    "url": r.url,
                    "default": self.default_remote.as_deref() == Some(n.as_str()),
                    "has_token": r.token.is_some(),
                });
                (n.clone(), v)
            })
            .collect()
    }
}

fn name_of_service(s: &Service) -> String {
    s.name.clone()
}

fn name_of_instance(i: &Instance) -> String {
    i.name.clone()
}

/// Renders once following the changes, then again after each burst of changes until interrupted. Changes made
/// while reconnecting are replayed by the stream, so none is missed.
async fn watch_loop<F, Fut>(c: &Client, render: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    // Events arriving while a render runs make one more render, not one each.
    let changed = tokio::sync::Notify::new();
    let mut opened = false;
    let follow = stream::follow(c, "/v1/events", |message| {
        // The first render waits for the stream: a change made before it is in the render, one after it comes.
        if matches!(message, stream::Message::Event { .. }) || !std::mem::replace(&mut opened, true) {
            changed.notify_one();
        }
        Ok(())
    });
    tokio::select! {
        r = follow => r,
        r = redraw(&changed, &render) => r,
    }
}

/// Renders whenever `changed` is notified, with a separation from the previous render.
async fn redraw<F, Fut>(changed: &tokio::sync::Notify, render: &F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    changed.notified().await;
    render().await?;
    loop {
        changed.notified().await;
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            print!("\x1b[2J\x1b[H");
        } else {
            println!();
        }
        render().await?;
    }
}

async fn service(c: &Client, cmd: &ServiceCmd, out: Format) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create { args, name, opts } => {
            let mut args = args.clone();
            let name = match name {
                Some(n) => Some(n.clone()),
                None if args.first().is_some_and(|a| !looks_like_port_spec(a)) => Some(args.remove(0)),
                None => None,
            };
            if let Some(n) = &name {
                cloud_domain::names::validate_name(cloud_domain::names::NameKind::Service, n)?;
            }
            let body = CreateService {
                name,
                ports: deploy::port_inputs(&args)?,
                soft_limit: opts.soft_limit,
                hard_limit: opts.hard_limit,
                scale_to_zero_after: opts.scale_to_zero.filter(|s| *s > 0),
                domains: opts.domains.clone(),
            };
            let s: Service = c.post("/v1/services", &body).await?;
            if out == Format::Table {
                println!("created service {} {}", s.name, s.fqdn);
                for p in &s.ports {
                    println!("  {p}");
                }
                print!("{}", domain_notes(&s));
            } else {
                print(out, &[s], output::services, name_of_service, true)?;
            }
        }
        ServiceCmd::List { watch } => {
            let render = || async {
                let items: Vec<Service> = c.list_all("/v1/services").await?;
                print(out, &items, output::services, name_of_service, false)?;
                Ok(())
            };
            if *watch {
                watch_loop(c, render).await?;
            } else {
                render().await?;
            }
        }
        ServiceCmd::Get { name } => {
            let s: Service = c.get(&format!("/v1/services/{}", seg(name))).await?;
            let notes = domain_notes(&s);
            print(out, &[s], output::services, name_of_service, true)?;
            if out == Format::Table {
                print!("{notes}");
            }
        }
        ServiceCmd::Update { name, ports, opts } => {
            let body = UpdateService {
                ports: if ports.is_empty() { None } else { Some(deploy::port_inputs(ports)?) },
                soft_limit: opts.soft_limit.map(Some),
                hard_limit: opts.hard_limit.map(Some),
                scale_to_zero_after: opts.scale_to_zero.map(|s| (s > 0).then_some(s)),
                domains: if opts.domains.is_empty() { None } else { Some(opts.domains.clone()) },
            };
            let s: Service = c.patch(&format!("/v1/services/{}", seg(name)), &body).await?;
            let notes = domain_notes(&s);
            print(out, &[s], output::services, name_of_service, true)?;
            if out == Format::Table {
                print!("{notes}");
            }
        }
        ServiceCmd::Verify { name, domain } => {
            let path = format!("/v1/services/{}/domains/{}/verify", seg(name), seg(domain.trim_end_matches('.')));
            let s: Service = c.post(&path, &serde_json::json!({})).await?;
            match out {
                Format::Table => println!(
                    "domain {} verified: routed to service {} ({})",
                    domain.trim_end_matches('.'),
                    s.name,
                    s.fqdn
                ),
                _ => print(out, &[s], output::services, name_of_service, true)?,
            }
        }
        ServiceCmd::Delete { name, force } => {
            let q = if *force { "?force=true" } else { "" };
            c.delete(&format!("/v1/services/{}{q}", seg(name))).await?;
            eprintln!("deleted service {name}");
        }
    }
    Ok(())
}

/// The state of a service's extra domains, and for each unverified one exactly which records to create.
fn domain_notes(s: &Service) -> String {
    let mut text = String::new();
    for d in &s.domains {
        let expires = d.expires_at.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_default();
        match (d.state, &d.verification) {
            (DomainState::Verified, _) => text.push_str(&format!("  domain {}: verified\n", d.name)),
            (DomainState::Pending, Some(v)) => text.push_str(&format!(
                "  domain {name}: unverified (the claim lapses {expires}); create these records at its DNS provider:\n    {txt} TXT \"{value}\"   (proves ownership)\n    {name} CNAME {target}   (routes it here; an apex takes A/AAAA records of the edge instead)\n  then: cloudctl service verify {service} {name}\n",
                name = d.name,
                txt = v.txt_name,
                value = v.txt_value,
                target = v.cname_target,
                service = s.name,
            )),
            (DomainState::Taken, _) => text.push_str(&format!(
                "  domain {}: taken: another tenant verified it first; this claim is not routed (it lapses {expires})\n",
                d.name
            )),
            (DomainState::Expired | DomainState::Pending, _) => text.push_str(&format!(
                "  domain {}: expired {expires} before it was verified; list it again to claim it anew\n",
                d.name
            )),
        }
    }
    text
}

fn parse_env(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("-e {p}: write KEY=VALUE"),
        })
        .collect()
}

async fn deploy(c: &Client, args: &DeployArgs, out: Format) -> anyhow::Result<()> {
    let env = parse_env(&args.env)?;
    let ports = if args.ports.is_empty() { None } else { Some(deploy::port_inputs(&args.ports)?) };
    if let Some(n) = &args.name {
        cloud_domain::names::validate_name(cloud_domain::names::NameKind::Instance, n)?;
    }
    let image = match (&args.path, &args.image) {
        (Some(path), image) => {
            let name = match image {
                Some(i) => i.clone(),
                None => image::name_from_path(path)?,
            };
            let upload = image::load(path)?;
            eprintln!(
                "pushing {} ({}, {}) as image {name}",
                path.display(),
                upload.kind,
                progress::size(upload.body.len() as u64)
            );
            image::push(c, &name, upload).await?.name
        }
        (None, Some(reference)) if image::is_reference(reference) => {
            let name = match &args.image_name {
                Some(n) => n.clone(),
                None => image::name_from_reference(reference)?,
            };
            eprintln!("pulling {reference} as image {name}");
            image::pull(c, &name, reference).await?.name
        }
        (None, Some(_)) if args.image_name.is_some() => {
            bail!("--image-name names a pulled image: give --image a registry reference (host[:port]/repository[:tag])")
        }
        (None, Some(image)) => image.clone(),
        (None, None) => bail!(
            "nothing to deploy: give a directory or archive (cloudctl deploy ./app), --image NAME or --image REGISTRY/REPO:TAG"
        ),
    };
    let req = CreateInstance {
        image,
        name: args.name.clone(),
        env,
        args: Vec::new(),
        service: args.service.clone(),
        ports,
        replicas: args.replicas,
        restart_policy: args.restart,
        memory_mb: args.memory,
        port: args.internal_port,
        start: !args.no_start,
    };
    let created = deploy::create_and_wait(c, req, Duration::from_secs(args.timeout)).await?;
    match out {
        Format::Table => print!("{}", deploy::summary(&created)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&created)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(&created)?),
        Format::Name => created.instances.iter().for_each(|i| println!("{}", i.name)),
        Format::Value(path) => output::values(&[&created], path)?,
    }
    if args.follow
        && let Some(first) = created.instances.first()
    {
        logs(c, &first.name, true, 100).await?;
    }
    Ok(())
}

async fn logs(c: &Client, name: &str, follow: bool, tail: u32) -> anyhow::Result<()> {
    let path = format!("/v1/instances/{}/logs?limit={tail}", seg(name));
    if !follow {
        let lines: Vec<LogLine> = c.get(&path).await?;
        lines.iter().for_each(print_log);
        return Ok(());
    }
    stream::follow(c, &format!("{path}&follow=true"), |message| {
        if let stream::Message::Event { data, .. } = message {
            let line: LogLine = serde_json::from_str(&data)
                .with_context(|| format!("remote \"{}\" sent a log line that is not a LogLine", c.name()))?;
            print_log(&line);
        }
        Ok(())
    })
    .await?;
    eprintln!("instance {name} was deleted: its log ends");
    Ok(())
}

fn print_log(l: &LogLine) {
    let mark = match l.stream.as_str() {
        "stderr" => "err",
        "system" => "sys",
        _ => "out",
    };
    println!("{} {mark} {}", l.at.format("%H:%M:%S%.3f"), l.line);
}

async fn instance(c: &Client, cmd: &InstanceCmd, out: Format) -> anyhow::Result<()> {
    match cmd {
        InstanceCmd::List { watch } => {
            let render = || async {
                let items: Vec<Instance> = c.list_all("/v1/instances").await?;
                print(out, &items, output::instances, name_of_instance, false)?;
                Ok(())
            };
            if *watch {
                watch_loop(c, render).await?;
            } else {
                render().await?;
            }
        }
        InstanceCmd::Get { name } => {
            let i: Instance = c.get(&format!("/v1/instances/{}", seg(name))).await?;
            print(out, &[i], output::instances, name_of_instance, true)?;
        }
        InstanceCmd::Delete { names } => {
            for name in names {
                let path = format!("/v1/instances/{}", seg(name));
                let before: Instance = c.get(&path).await?;
                c.delete(&path).await?;
                // An ephemeral service goes in the same transaction as its last instance: say so.
                let service_went = match &before.service {
                    Some(s) => c
                        .request(reqwest::Method::GET, &format!("/v1/services/{}", s.id))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND)
                        .then(|| s.name.clone()),
                    None => None,
                };
                match service_went {
                    Some(service) => eprintln!("deleted instance {name} and its ephemeral service {service}"),
                    None => eprintln!("deleted instance {name}"),
                }
            }
        }
        InstanceCmd::Start { name } | InstanceCmd::Stop { name } => {
            let verb = if matches!(cmd, InstanceCmd::Start { .. }) { "start" } else { "stop" };
            let i: Instance = c.post(&format!("/v1/instances/{}/{verb}", seg(name)), &serde_json::json!({})).await?;
            print(out, &[i], output::instances, name_of_instance, true)?;
        }
        InstanceCmd::Logs { name, follow, tail } => logs(c, name, *follow, *tail).await?,
    }
    Ok(())
}

async fn image(c: &Client, cmd: &ImageCmd, out: Format) -> anyhow::Result<()> {
    let name_of = |i: &Image| i.name.clone();
    match cmd {
        ImageCmd::List => {
            let items: Vec<Image> = c.list_all("/v1/images").await?;
            print(out, &items, output::images, name_of, false)?;
        }
        ImageCmd::Get { name } => {
            let i: Image = c.get(&format!("/v1/images/{}", seg(name))).await?;
            print(out, &[i], output::images, name_of, true)?;
        }
        ImageCmd::Push { path, name } => {
            let name = match name {
                Some(n) => n.clone(),
                None => image::name_from_path(path)?,
            };
            let i = image::push(c, &name, image::load(path)?).await?;
            print(out, &[i], output::images, name_of, true)?;
        }
        ImageCmd::Pull { reference, name } => {
            let name = match name {
                Some(n) => n.clone(),
                None => image::name_from_reference(reference)?,
            };
            let i = image::pull(c, &name, reference).await?;
            print(out, &[i], output::images, name_of, true)?;
        }
        ImageCmd::Delete { name } => {
            c.delete(&format!("/v1/images/{}", seg(name))).await?;
            eprintln!("deleted image {name}");
        }
    }
    Ok(())
}

async fn tenant(c: &Client, cmd: &TenantCmd, out: Format) -> anyhow::Result<()> {
    let name_of = |t: &Tenant| t.name.clone();
    match cmd {
        TenantCmd::List => {
            let items: Vec<Tenant> = c.list_all("/v1/tenants").await?;
            print(out, &items, output::tenants, name_of, false)?;
        }
        TenantCmd::Get { name } => {
            let t: Tenant = c.get(&format!("/v1/tenants/{}", seg(name))).await?;
            print(out, &[t], output::tenants, name_of, true)?;
        }
        TenantCmd::Create { name, quotas } => {
            let t: Tenant = c.post("/v1/tenants", &CreateTenant { name: name.clone(), quotas: quotas.patch() }).await?;
            print(out, &[t], output::tenants, name_of, true)?;
        }
        TenantCmd::Update { name, quotas } => {
            let t: Tenant =
                c.patch(&format!("/v1/tenants/{}", seg(name)), &UpdateTenant { quotas: quotas.patch() }).await?;
            print(out, &[t], output::tenants, name_of, true)?;
        }
        TenantCmd::Delete { name } => {
            c.delete(&format!("/v1/tenants/{}", seg(name))).await?;
            eprintln!("deleted tenant {name}");
        }
    }
    Ok(())
}

async fn token(c: &Client, cmd: &TokenCmd, out: Format) -> anyhow::Result<()> {
    let name_of = |t: &Token| t.id.to_string();
    match cmd {
        TokenCmd::Create { scopes, tenant, days, description } => {
            let scopes = scopes
                .iter()
                .map(|s| Scope::parse(s).with_context(|| format!("--scope {s}: use read, write or admin")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let body = CreateToken {
                tenant: tenant.clone(),
                scopes: if scopes.is_empty() { None } else { Some(scopes) },
                expires_in_seconds: Some(days * 86400),
                description: description.clone(),
            };
            let created: CreatedToken = c.post("/v1/tokens", &body).await?;
            match out {
                Format::Table | Format::Name => println!("{}", created.jwt),
                Format::Json => println!("{}", serde_json::to_string_pretty(&created)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&created)?),
                Format::Value(path) => output::values(&[&created], path)?,
            }
        }
        TokenCmd::List => {
            let items: Vec<Token> = c.list_all("/v1/tokens").await?;
            print(out, &items, output::tokens, name_of, false)?;
        }
        TokenCmd::Revoke { id } => {
            c.delete(&format!("/v1/tokens/{}", seg(id))).await?;
            eprintln!("revoked token {id}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn port_specs_and_names_are_told_apart() {
        assert!(looks_like_port_spec("443:8080"));
        assert!(!looks_like_port_spec("my-service"));
        assert_eq!(parse_env(&["A=1".into(), "B=x=y".into()]).unwrap()["B"], "x=y");
        assert!(parse_env(&["nope".into()]).unwrap_err().to_string().contains("KEY=VALUE"));
    }
}
