//! `cloudctl remote`: the remotes in the configuration file, and pinning an https remote's certificate on first
//! contact.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::config::{self, Config, Remote};
use crate::output::{self, Format};
use crate::pin;

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

pub(crate) async fn run(cmd: &RemoteCmd, out: Format, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
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
                Format::Yaml => print!("{}", output::yaml(&cfg.remotes_public())?),
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
