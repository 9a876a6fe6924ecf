//! `cloudd`: one binary for every role of the platform, and `cloudd dev` for all of them in one process on an
//! embedded PostgreSQL.

mod config;
mod dev;
mod ops;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use cloud_store::Store;

use crate::config::Config;

/// The edge allocates per request through pingora; see docs/edge.md for what this allocator saves there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cloudd", version, about = "The cloud platform daemon: one subcommand per role")]
struct Cli {
    /// TOML configuration file (see docs/configuration.md); environment variables override it.
    #[arg(long, short, global = true, env = "CLOUD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process, on an embedded PostgreSQL unless DATABASE_URL is set.
    Dev,
    /// Run the tenant API (needs DATABASE_URL and platform.secret_key_file).
    Api,
    /// Apply database migrations and exit (needs DATABASE_URL).
    Migrate,
    /// Create a tenant if it does not exist and print an admin token for it (needs DATABASE_URL and
    /// platform.secret_key_file).
    Bootstrap {
        /// Tenant name.
        #[arg(long, default_value = "admin")]
        tenant: String,
        /// Token lifetime in days.
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
    /// Print the token of cloudctl's `local` remote, as written by `cloudd dev`.
    Token,
    /// Print the OpenAPI document of the API (what `scripts/openapi` checks in).
    Openapi,
    /// Run the edge: TLS termination, routing by name and balancing to instances (needs DATABASE_URL).
    Edge,
    /// Run the authoritative DNS for service names and private instance names (needs DATABASE_URL).
    Dns,
    /// Run a node agent: runs the instances scheduled on this machine (needs DATABASE_URL; root for full
    /// isolation).
    Node,
    /// Run the certificate manager: verifies custom domains, orders and renews ACME certificates (needs
    /// DATABASE_URL and platform.secret_key_file).
    Certs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let load = || Config::load(cli.config.as_deref(), |k| std::env::var(k).ok());
    match cli.command {
        Command::Dev => dev::run(load()?).await,
        Command::Api => run_api(load()?).await,
        Command::Migrate => {
            let cfg = load()?;
            connect(&cfg).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Bootstrap { tenant, days } => {
            let cfg = load()?;
            let key = cfg.secret_key()?.context(
                "cloudd bootstrap needs the platform secret key (platform.secret_key_file): it seals the token \
                 signing key",
            )?;
            let store = connect(&cfg).await?;
            let created = dev::ensure_admin_token(&store, &key, &tenant, days, "cloudd bootstrap").await?;
            println!("{}", created.jwt);
            Ok(())
        }
        Command::Token => {
            println!("{}", dev::local_token()?);
            Ok(())
        }
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&cloud_api::openapi())?);
            Ok(())
        }
        Command::Edge => {
            let cfg = load()?;
            let store = connect(&cfg).await?;
            let edge = std::sync::Arc::new(dev::start_edge(&cfg, store).await?.0);
            let listen = cfg.edge.ops_listen.unwrap_or_else(|| "127.0.0.1:9156".parse().expect("literal"));
            let ops = ops::serve(listen, edge.clone())?;
            dev::wait_for_shutdown().await;
            ops.stop(true).await;
            if let Ok(edge) = std::sync::Arc::try_unwrap(edge) {
                edge.shutdown().await;
            }
            Ok(())
        }
        Command::Dns => {
            let cfg = load()?;
            let store = connect(&cfg).await?;
            let dns = std::sync::Arc::new(dev::start_dns(&cfg, store).await?);
            let listen = cfg.dns.ops_listen.unwrap_or_else(|| "127.0.0.1:9153".parse().expect("literal"));
            let ops = ops::serve(listen, dns.clone())?;
            dev::wait_for_shutdown().await;
            ops.stop(true).await;
            if let Ok(dns) = std::sync::Arc::try_unwrap(dns) {
                dns.shutdown().await;
            }
            Ok(())
        }
        Command::Node => {
            let cfg = load()?;
            let store = connect(&cfg).await?;
            let node = std::sync::Arc::new(dev::start_node(&cfg, store, "/var/lib/cloudd/node".into(), None).await?);
            let listen = cfg.node.ops_listen.unwrap_or_else(|| "127.0.0.1:9154".parse().expect("literal"));
            let ops = ops::serve(listen, node.clone())?;
            dev::wait_for_shutdown().await;
            ops.stop(true).await;
            if let Ok(node) = std::sync::Arc::try_unwrap(node) {
                node.shutdown().await;
            }
            Ok(())
        }
        Command::Certs => {
            let cfg = load()?;
            let store = connect(&cfg).await?;
            let (task, probe) = dev::start_certs(&cfg, store)?;
            let listen = cfg.certs.ops_listen.unwrap_or_else(|| "127.0.0.1:9157".parse().expect("literal"));
            let ops = ops::serve(listen, std::sync::Arc::new(probe))?;
            dev::wait_for_shutdown().await;
            ops.stop(true).await;
            task.abort();
            Ok(())
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // hickory logs every request at info.
    let filter = EnvFilter::try_from_env("CLOUD_LOG").unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn"));
    let json = std::env::var("CLOUD_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Colours only for a terminal: instance output (e.g. the built-in hello's) ends up in log lines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Connects to the configured database and applies migrations.
async fn connect(cfg: &Config) -> anyhow::Result<Store> {
    let Some(url) = &cfg.database_url else {
        bail!("DATABASE_URL (or database_url in the config file) is required for this role; `cloudd dev` embeds one")
    };
    open_store(url, cfg).await
}

/// Opens the store on a URL and applies migrations.
pub(crate) async fn open_store(url: &str, cfg: &Config) -> anyhow::Result<Store> {
    let settings = cfg.store_settings()?;
    let pool = cloud_store::connect_with_timeout(url, cfg.api.max_connections, settings.database_timeout)
        .await
        .context("connecting to PostgreSQL (is DATABASE_URL right and the server up?)")?;
    let store = Store::new(pool, settings);
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

async fn run_api(cfg: Config) -> anyhow::Result<()> {
    let store = connect(&cfg).await?;
    let server = dev::start_api(&cfg, store).await?;
    dev::wait_for_shutdown().await;
    server.stop(true).await;
    Ok(())
}
