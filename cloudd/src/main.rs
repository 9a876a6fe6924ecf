//! `cloudd`: one binary for every role of the platform, and `cloudd dev` for all of them in one process on an
//! embedded PostgreSQL.

mod config;
mod dev;
mod ops;
mod roles;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::roles::{api::Api, certs::Certs, dns::Dns, edge::Edge, node::Node};

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
    ///
    /// With node.underlay_address set, the host joins the others through the encrypted overlay; stopping the
    /// agent leaves it (docs/operations.md, "Hosts join and leave").
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
        Command::Api => roles::run::<Api>(load()?).await,
        Command::Edge => roles::run::<Edge>(load()?).await,
        Command::Dns => roles::run::<Dns>(load()?).await,
        Command::Node => roles::run::<Node>(load()?).await,
        Command::Certs => roles::run::<Certs>(load()?).await,
        Command::Migrate => {
            roles::connect_for(&load()?, true).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Bootstrap { tenant, days } => roles::api::bootstrap(&load()?, &tenant, days).await,
        Command::Token => {
            println!("{}", dev::local_token()?);
            Ok(())
        }
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&cloud_api::openapi())?);
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
