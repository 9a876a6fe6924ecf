//! `cloudctl secret`: environment variables of the tenant's instances (or of one service's) whose values are
//! sealed by the platform and never shown again, as `fly secrets` has them.

use anyhow::{Context, bail};
use clap::Subcommand;
use cloud_domain::api::{CreateRollout, Secret, Service, SetSecret};

use crate::client::{Client, seg};
use crate::output::{self, Format};

/// `cloudctl secret ...`
#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Set secrets (a new version of those that exist); instances get them at their next start.
    #[command(
        after_help = "Examples:\n  cloudctl secret set DATABASE_URL=postgres://... API_KEY=abc\n  cloudctl secret set --service web SESSION_KEY=xyz --restart\n  cloudctl secret set --file TLS_KEY=\"$(cat key.pem)\""
    )]
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Only for this service's instances.
        #[arg(long)]
        service: Option<String>,
        /// Give them as files, `/run/secrets/KEY` (read-only, the instance user's alone, in memory), instead of
        /// environment variables.
        #[arg(long)]
        file: bool,
        /// Then restart the instances that see the secrets (the service's, or every service's for a tenant
        /// secret) one at a time, as `service restart` does, so that they get the new values.
        #[arg(long)]
        restart: bool,
    },
    /// List secrets: names, services and versions, never values.
    #[command(after_help = "Example:\n  cloudctl secret list", visible_alias = "ls")]
    List,
    /// Delete a secret; instances started from now on go without it.
    #[command(after_help = "Example:\n  cloudctl secret delete API_KEY", visible_alias = "rm")]
    Delete {
        /// The secret's name.
        name: String,
        /// The service whose secret it is.
        #[arg(long)]
        service: Option<String>,
    },
}

pub(crate) async fn run(c: &Client, cmd: &SecretCmd, out: Format) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Set { pairs, service, file, restart } => {
            let mut parsed = Vec::new();
            for pair in pairs {
                let Some((name, value)) = pair.split_once('=') else {
                    bail!("\"{pair}\" is not KEY=VALUE");
                };
                parsed.push((name, value));
            }
            for (name, value) in parsed {
                let body = SetSecret { value: value.to_owned(), service: service.clone(), file: *file };
                let req = c.request(reqwest::Method::PUT, &format!("/v1/secrets/{}", seg(name))).json(&body);
                let secret: Secret = c.send(req).await?.json().await.context("reading the secret")?;
                eprintln!("set secret {} (version {})", secret.name, secret.version);
            }
            if *restart {
                let services: Vec<String> = match service {
                    Some(s) => vec![s.clone()],
                    None => {
                        let all: Vec<Service> = c.list_all("/v1/services").await?;
                        all.into_iter().filter(|s| !s.instances.is_empty()).map(|s| s.name).collect()
                    }
                };
                for s in services {
                    super::rollout::roll_out(c, &s, &CreateRollout::default()).await?;
                }
            }
        }
        SecretCmd::List => {
            let name_of = |s: &Secret| s.name.clone();
            crate::list(c, "/v1/secrets", false, out, output::secrets, name_of).await?;
        }
        SecretCmd::Delete { name, service } => {
            let mut path = format!("/v1/secrets/{}", seg(name));
            if let Some(s) = service {
                path.push_str(&format!("?service={}", seg(s)));
            }
            c.delete(&path).await?;
            eprintln!("deleted secret {name}");
        }
    }
    Ok(())
}
