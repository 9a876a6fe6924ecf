//! `cloudctl`, the platform's command-line client: remotes as LXD has them, services and deploys as Unikraft's
//! `kraft cloud` has them, output formats as kubectl has them.
//!
//! It talks only to the public API (see [`client::ENDPOINTS`]) and shares its request and response types with the
//! server through `cloud-domain`.

pub mod client;
pub mod commands;
pub mod config;
pub mod deploy;
pub mod image;
pub mod output;
pub mod pin;
pub mod progress;
pub mod stream;
pub mod target;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::client::Client;
use crate::config::Config;
use crate::output::Format;

// The subcommands stay reachable at the crate root, where they were before they moved into `commands`.
pub use crate::commands::deploy::DeployArgs;
pub use crate::commands::image::ImageCmd;
pub use crate::commands::instance::InstanceCmd;
pub use crate::commands::remote::RemoteCmd;
pub use crate::commands::service::{ServiceCmd, ServiceOpts};
pub use crate::commands::tenant::{QuotaOpts, TenantCmd};
pub use crate::commands::token::TokenCmd;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "cloudctl",
    version,
    about = "Manage services, instances and images on the cloud platform",
    after_help = "Examples:\n  cloudctl service create my-service 443:8080\n  cloudctl deploy --service my-service --image hello\n  cloudctl deploy ./app -p 443:8080\n  cloudctl deploy --image 127.0.0.1:5000/web:v1 -p 443:80\n  cloudctl image push ./app.oci.tar --name app\n  cloudctl instance list -o json\n  cloudctl service get prod:my-service\n  cloudctl instance copy local:web prod:\n\nA name can carry its remote, as with lxc: prod:my-service, or prod: alone for a list."
)]
pub struct Cli {
    /// Remote to talk to (default: the names' REMOTE: prefix, which also overrides CLOUD_REMOTE, else the configured
    /// default remote).
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
        after_help = "Examples:\n  cloudctl deploy --service my-service --image hello\n  cloudctl deploy -p 443:8080 --image hello\n  cloudctl deploy ./app -p 443:8080 -e MODE=prod -R 3 --restart on-failure\n  cloudctl deploy ./app.oci.tar -p 443:8080\n  cloudctl deploy --image 127.0.0.1:5000/team/web:v1 -p 443:80\n  cloudctl deploy --image ghcr.io/org/app:1.2 --image-name app --internal-port 3000 -p 443:3000\n  cloudctl deploy --service prod:my-service --image hello"
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
    /// Manage secrets: environment variables whose values are never shown again.
    #[command(subcommand)]
    Secret(crate::commands::secret::SecretCmd),
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

/// Runs the command line; errors go to stderr with a non-zero exit.
pub fn main() {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    let remote_typed = matches.value_source("remote") == Some(ValueSource::CommandLine);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(cli, remote_typed, &|k| std::env::var(k).ok())) {
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            msg.push_str(&format!(": {cause}"));
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn connect(chosen: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Client> {
    let path = config::path(env);
    let cfg = Config::load(&path)?;
    let (name, remote) = cfg.resolve(chosen, env)?;
    Client::new(&name, &remote)
}

/// Runs a parsed command line; `remote_typed` says whether `--remote` was on it rather than from CLOUD_REMOTE.
async fn run(mut cli: Cli, remote_typed: bool, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let out = cli.output;
    // A typed --remote and a REMOTE: prefix must agree; CLOUD_REMOTE is a default, which a prefix overrides.
    let (typed, ambient) = if remote_typed { (cli.remote.as_deref(), None) } else { (None, cli.remote.as_deref()) };
    let remote = target::choose_remote(&mut cli.command, typed, ambient)?;
    let connect = || connect(remote.as_deref(), env);
    match &cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "cloudctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Remote(cmd) => commands::remote::run(cmd, out, env).await,
        Command::Whoami => commands::whoami::run(&connect()?, out).await,
        Command::Ca { install } => commands::ca::run(&connect()?, *install).await,
        Command::Service(cmd) => commands::service::run(&connect()?, cmd, out).await,
        Command::Deploy(args) => commands::deploy::run(&connect()?, args, out).await,
        // A copy's names are on two remotes: it connects to each (the chosen remote is the default for both).
        Command::Instance(InstanceCmd::Copy(args)) => commands::copy::run(args, remote.as_deref(), out, env).await,
        Command::Instance(cmd) => commands::instance::run(&connect()?, cmd, out).await,
        Command::Image(cmd) => commands::image::run(&connect()?, cmd, out).await,
        Command::Tenant(cmd) => commands::tenant::run(&connect()?, cmd, out).await,
        Command::Token(cmd) => commands::token::run(&connect()?, cmd, out).await,
        Command::Secret(cmd) => commands::secret::run(&connect()?, cmd, out).await,
    }
}

/// Prints every item of a list endpoint, once or (`watch`) again after each burst of changes.
async fn list<T: serde::de::DeserializeOwned + serde::Serialize>(
    c: &Client,
    path: &str,
    watch: bool,
    out: Format,
    table: fn(&[T]) -> output::Table,
    name: fn(&T) -> String,
) -> anyhow::Result<()> {
    let render = || async {
        let items: Vec<T> = c.list_all(path).await?;
        output::print(out, &items, table, name, false)
    };
    if watch { watch_loop(c, render).await } else { render().await }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::deploy::parse_env;
    use crate::commands::service::looks_like_port_spec;

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
