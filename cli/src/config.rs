//! Remotes, as LXD has them: named API endpoints with their tokens, one of them the default, in
//! `$XDG_CONFIG_HOME/cloudctl/config.toml` (mode 0600: it holds tokens). `cloudd dev` writes the `local` remote.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// One API endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remote {
    /// Base URL of the API, e.g. `http://127.0.0.1:7300`.
    pub url: String,
    /// Bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PEM file of a CA to trust for this remote, besides the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The pinned certificate (`SHA256:..`) of a remote no CA vouches for, accepted at `remote add`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// The configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The remote used without `--remote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_remote: Option<String>,
    /// Remotes by name.
    #[serde(default)]
    pub remotes: BTreeMap<String, Remote>,
}

/// Where the configuration lives.
pub fn path(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    match env("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("cloudctl/config.toml"),
        None => PathBuf::from(env("HOME").unwrap_or_else(|| "/".into())).join(".config/cloudctl/config.toml"),
    }
}

impl Config {
    /// Reads the file; a missing file is an empty configuration.
    pub fn load(path: &PathBuf) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file atomically with mode 0600.
    pub fn save(&self, path: &PathBuf) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(toml::to_string(self)?.as_bytes())?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Adds a remote; the first one becomes the default.
    pub fn add(&mut self, name: &str, remote: Remote) -> anyhow::Result<()> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("remote name \"{name}\" must be letters, digits, '-' or '_'");
        }
        if self.remotes.contains_key(name) {
            bail!("remote \"{name}\" exists already; remove it first (cloudctl remote remove {name})");
        }
        self.remotes.insert(name.to_owned(), remote);
        if self.default_remote.is_none() {
            self.default_remote = Some(name.to_owned());
        }
        Ok(())
    }

    /// Makes a remote the default.
    pub fn switch(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.remotes.contains_key(name) {
            bail!("no remote \"{name}\" (cloudctl remote list shows them)");
        }
        self.default_remote = Some(name.to_owned());
        Ok(())
    }

    /// Removes a remote.
    pub fn remove(&mut self, name: &str) -> anyhow::Result<()> {
        if self.remotes.remove(name).is_none() {
            bail!("no remote \"{name}\" (cloudctl remote list shows them)");
        }
        if self.default_remote.as_deref() == Some(name) {
            self.default_remote = None;
        }
        Ok(())
    }

    /// The remote to use: `--remote`, else the default; `CLOUD_API_URL` and `CLOUD_TOKEN` override its fields
    /// (and make a remote of their own when none is configured).
    pub fn resolve(
        &self,
        chosen: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<(String, Remote)> {
        let url = env("CLOUD_API_URL").filter(|v| !v.is_empty());
        let token = env("CLOUD_TOKEN").filter(|v| !v.is_empty());
        let named = match chosen.or(self.default_remote.as_deref()) {
            Some(name) => match self.remotes.get(name) {
                Some(r) => Some((name.to_owned(), r.clone())),
                None => bail!("no remote \"{name}\" (cloudctl remote list shows them)"),
            },
            None => None,
        };
        let (name, mut remote) = match (named, &url) {
            (Some(n), _) => n,
            (None, Some(u)) => ("env".to_owned(), Remote { url: u.clone(), token: None, ca: None, fingerprint: None }),
            (None, None) => bail!(
                "no remote configured: run `cloudd dev` (it adds `local`), or `cloudctl remote add NAME URL --token T`, or set CLOUD_API_URL"
            ),
        };
        if let Some(u) = url {
            remote.url = u;
        }
        if token.is_some() {
            remote.token = token;
        }
        Ok((name, remote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(url: &str) -> Remote {
        Remote { url: url.into(), token: Some("t".into()), ca: None, fingerprint: None }
    }

    #[test]
    fn remotes_add_switch_remove_and_resolve() {
        let none = |_: &str| None;
        let mut c = Config::default();
        assert!(c.resolve(None, &none).unwrap_err().to_string().contains("cloudd dev"));
        c.add("local", remote("http://a")).unwrap();
        c.add("prod", remote("https://b")).unwrap();
        assert_eq!(c.default_remote.as_deref(), Some("local"), "the first remote is the default");
        assert!(c.add("prod", remote("x")).unwrap_err().to_string().contains("exists already"));
        assert!(c.add("bad name", remote("x")).is_err());
        c.switch("prod").unwrap();
        assert_eq!(c.resolve(None, &none).unwrap().1.url, "https://b");
        assert_eq!(c.resolve(Some("local"), &none).unwrap().1.url, "http://a");
        let env = |k: &str| (k == "CLOUD_TOKEN").then(|| "override".to_owned());
        assert_eq!(c.resolve(None, &env).unwrap().1.token.as_deref(), Some("override"));
        assert!(c.switch("nope").is_err());
        c.remove("prod").unwrap();
        assert_eq!(c.default_remote, None);
        let env = |k: &str| (k == "CLOUD_API_URL").then(|| "http://env".to_owned());
        let want = Remote { url: "http://env".into(), token: None, ca: None, fingerprint: None };
        assert_eq!(c.resolve(None, &env).unwrap(), ("env".into(), want));
    }

    #[test]
    fn the_file_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cloudctl/config.toml");
        let mut c = Config::default();
        c.add("local", remote("http://a")).unwrap();
        c.save(&p).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
