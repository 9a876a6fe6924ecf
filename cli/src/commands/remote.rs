//! `cloudctl remote`: the remotes in the configuration file, and pinning an https remote's certificate on first
//! contact.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;

use cloud_domain::api::{CreatedToken, JoinRequest, Problem};
use cloud_domain::join::JoinToken;

use crate::config::{self, Config, Remote};
use crate::output::{self, Format};
use crate::pin;

/// `cloudctl remote ...`
#[derive(Debug, Subcommand)]
pub enum RemoteCmd {
    /// Add a remote: by URL (with --token), or by a join token, which needs nothing else and asks nothing.
    #[command(
        after_help = "Examples:\n  cloudctl remote add prod eyJ1cmxzIjpb...   (a join token from `cloudctl token create --join`)\n  cloudctl remote add prod https://api.example.com --token eyJ...\n  cloudctl remote add lab https://10.0.0.5:7300 --token eyJ... --accept-certificate"
    )]
    Add {
        /// Remote name.
        name: String,
        /// API URL (http:// or https://), or a join token.
        #[arg(value_name = "URL|JOIN_TOKEN")]
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

/// `remote add NAME JOIN_TOKEN`: checks the server's certificate against the token's pin before the secret leaves
/// this machine, exchanges the secret for a token, and returns the remote to store.
async fn join(name: &str, text: &str) -> anyhow::Result<Remote> {
    let token = JoinToken::decode(text, chrono::Utc::now())?;
    let mut failures = Vec::new();
    for url in token.urls.iter().filter(|u| u.starts_with("https://") || u.starts_with("http://")) {
        let mut builder = reqwest::Client::builder().user_agent(concat!("cloudctl/", env!("CARGO_PKG_VERSION")));
        if let Some(pin) = &token.fingerprint {
            builder = builder.use_preconfigured_tls(pin::Pinned::new(Some(pin.clone())).client_config());
        }
        let request = JoinRequest { secret: token.secret.clone() };
        let res =
            match builder.build()?.post(format!("{}/v1/join", url.trim_end_matches('/'))).json(&request).send().await {
                Ok(res) => res,
                Err(e) => {
                    failures.push(format!("{url}: {}", cloud_domain::error_chain(&e)));
                    continue;
                }
            };
        if !res.status().is_success() {
            let status = res.status();
            let text = res.text().await.unwrap_or_default();
            match serde_json::from_str::<Problem>(&text) {
                Ok(p) => bail!("{url} refused the join token: {} ({})", p.detail, p.code.as_str()),
                Err(_) => bail!("{url} answered {status} to the join: is it this platform's API?"),
            }
        }
        let created: CreatedToken = res.json().await.with_context(|| format!("{url} answered the join oddly"))?;
        eprintln!(
            "joined {url} as tenant {} (token {}, scopes {})",
            created.token.tenant,
            created.token.id,
            created.token.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
        );
        return Ok(Remote { url: url.clone(), token: Some(created.jwt), ca: None, fingerprint: token.fingerprint });
    }
    bail!("not added: no URL of the join token for \"{name}\" worked: {}", failures.join("; "))
}

pub(crate) async fn run(cmd: &RemoteCmd, out: Format, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let path = config::path(env);
    let mut cfg = Config::load(&path)?;
    match cmd {
        RemoteCmd::Add { name, url: text, token, ca, accept_certificate }
            if !text.starts_with("http://") && !text.starts_with("https://") && !text.contains("://") =>
        {
            if token.is_some() || ca.is_some() || *accept_certificate {
                bail!("a join token brings its own token and certificate: drop --token, --ca and --accept-certificate");
            }
            // Refused before the secret is spent.
            cfg.add(name, Remote { url: String::new(), token: None, ca: None, fingerprint: None })?;
            let remote = join(name, text).await?;
            let url = remote.url.clone();
            cfg.remotes.insert(name.clone(), remote);
            cfg.save(&path)?;
            eprintln!("added remote {name} ({url})");
        }
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
                        headers: vec!["NAME", "URL", "AUTH", "TRUST", "DEFAULT"],
                        rows: rows
                            .iter()
                            .map(|(n, r)| {
                                vec![
                                    n.clone(),
                                    r.url.clone(),
                                    auth(r).into(),
                                    trust(r),
                                    if cfg.default_remote.as_deref() == Some(n) { "yes".into() } else { "".into() },
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

/// How cloudctl authenticates to a remote.
fn auth(r: &Remote) -> &'static str {
    if r.token.is_some() { "token" } else { "none" }
}

/// What cloudctl trusts of a remote's certificate: a pinned fingerprint, a CA file, or the system's roots.
fn trust(r: &Remote) -> String {
    match (&r.fingerprint, &r.ca) {
        (Some(f), _) => f.clone(),
        (None, Some(ca)) => format!("ca {}", ca.display()),
        (None, None) if r.url.starts_with("https://") => "system roots".into(),
        (None, None) => "none (plain http)".into(),
    }
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
                    "auth": auth(r),
                    "has_token": r.token.is_some(),
                    "fingerprint": r.fingerprint,
                    "ca": r.ca,
                });
                (n.clone(), v)
            })
            .collect()
    }
}
