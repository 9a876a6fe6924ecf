//! `cloudctl token`: API tokens.

use anyhow::Context;
use clap::Subcommand;
use cloud_domain::api::{CreateJoinToken, CreateToken, CreatedJoinToken, CreatedToken, JoinTokenInfo, Scope, Token};

use crate::client::{Client, seg};
use crate::output::{self, Format};

/// `cloudctl token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token and print its JWT once; or, with --join, a one-time join token for `cloudctl remote add`.
    #[command(
        after_help = "Examples:\n  cloudctl token create --scope read --description ci\n  cloudctl token create --join --expires 30m --description alice\n  cloudctl remote add prod <the join token>   (on the teammate's machine)"
    )]
    Create {
        /// Scopes (repeatable): read, write, admin. Default read and write.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// For another tenant (admin).
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime of the token in days.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Print a join token: the API's URLs, the certificate to pin and a one-time secret that `cloudctl remote
        /// add NAME TOKEN` exchanges for a token (of --days lifetime) without any prompt.
        #[arg(long)]
        join: bool,
        /// How long the join token may wait to be used: 90s, 30m, 1h, 7d (at most 30 days).
        #[arg(long, default_value = "1h", requires = "join", value_parser = parse_duration)]
        expires: u64,
    },
    /// List tokens, or with --join the join tokens (pending, used, revoked or expired).
    #[command(after_help = "Examples:\n  cloudctl token list\n  cloudctl token list --join", visible_alias = "ls")]
    List {
        /// The join tokens.
        #[arg(long)]
        join: bool,
    },
    /// Revoke a token, or with --join an unused join token.
    #[command(
        after_help = "Examples:\n  cloudctl token revoke 0b6f3c2e-5d6a-4d1e-9f0a-2b7c8d9e0f1a\n  cloudctl token revoke --join 5c1d9a0e-3b2f-4e6d-8a7c-1f0e9d8c7b6a"
    )]
    Revoke {
        /// Token (or join token) id.
        id: String,
        /// It is a join token.
        #[arg(long)]
        join: bool,
    },
}

/// Seconds from `90s`, `30m`, `1h`, `7d` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<u64, String> {
    let (number, unit) = text.find(|c: char| !c.is_ascii_digit()).map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number.parse().map_err(|_| format!("\"{text}\" is not a duration like 90s, 30m, 1h or 7d"))?;
    let per = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("\"{text}\": the unit must be s, m, h or d")),
    };
    n.checked_mul(per).ok_or_else(|| format!("\"{text}\" is too long"))
}

pub(crate) async fn run(c: &Client, cmd: &TokenCmd, out: Format) -> anyhow::Result<()> {
    let name_of = |t: &Token| t.id.to_string();
    match cmd {
        TokenCmd::Create { scopes, tenant, days, description, join, expires } => {
            let scopes = scopes
                .iter()
                .map(|s| Scope::parse(s).with_context(|| format!("--scope {s}: use read, write or admin")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if *join {
                let body = CreateJoinToken {
                    tenant: tenant.clone(),
                    scopes: if scopes.is_empty() { None } else { Some(scopes) },
                    expires_in_seconds: Some(*expires),
                    token_expires_in_seconds: Some(days * 86400),
                    description: description.clone(),
                };
                let created: CreatedJoinToken = c.post("/v1/join-tokens", &body).await?;
                match out {
                    Format::Table | Format::Name => println!("{}", created.join_token),
                    Format::Json => println!("{}", serde_json::to_string_pretty(&created)?),
                    Format::Yaml => print!("{}", output::yaml(&created)?),
                    Format::Value(path) => output::values(&[&created], path)?,
                }
                if matches!(out, Format::Table) && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    let until = created.info.expires_at.format("%Y-%m-%d %H:%M UTC");
                    eprintln!("works once, until {until}: cloudctl remote add NAME <token>");
                }
                return Ok(());
            }
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
        TokenCmd::List { join: false } => crate::list(c, "/v1/tokens", false, out, output::tokens, name_of).await?,
        TokenCmd::List { join: true } => {
            let name_of = |t: &JoinTokenInfo| t.id.to_string();
            crate::list(c, "/v1/join-tokens", false, out, output::join_tokens, name_of).await?
        }
        TokenCmd::Revoke { id, join: false } => {
            c.delete(&format!("/v1/tokens/{}", seg(id))).await?;
            eprintln!("revoked token {id}");
        }
        TokenCmd::Revoke { id, join: true } => {
            c.delete(&format!("/v1/join-tokens/{}", seg(id))).await?;
            eprintln!("revoked join token {id}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_read_as_seconds_and_bad_ones_say_why() {
        for (text, want) in [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604_800)] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "h", "1w", "1.5h", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
