//! `cloudctl token`: API tokens.

use anyhow::Context;
use clap::Subcommand;
use cloud_domain::api::{CreateToken, CreatedToken, Scope, Token};

use crate::client::{Client, seg};
use crate::output::{self, Format};

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

pub(crate) async fn run(c: &Client, cmd: &TokenCmd, out: Format) -> anyhow::Result<()> {
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
                Format::Yaml => print!("{}", output::yaml(&created)?),
                Format::Value(path) => output::values(&[&created], path)?,
            }
        }
        TokenCmd::List => crate::list(c, "/v1/tokens", false, out, output::tokens, name_of).await?,
        TokenCmd::Revoke { id } => {
            c.delete(&format!("/v1/tokens/{}", seg(id))).await?;
            eprintln!("revoked token {id}");
        }
    }
    Ok(())
}
