//! The API's own TLS: a certificate of the platform CA for the API's names (kept valid in the background), the
//! operator's certificate and key, or a certificate from the ACME CA that the certificate manager orders for the
//! API's DNS names (followed from PostgreSQL); and what clients pin, which join tokens carry.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use cloud_certs::PlatformCa;
use cloud_certs::seal::SecretKey;
use cloud_certs::served::{CurrentCert, ServedError, server_config};
use cloud_store::Store;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;

use crate::ApiConfig;

/// How the API is served (`api.tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS with a certificate of the platform CA for the API's names, renewed before it ends.
    #[default]
    Platform,
    /// TLS with `api.tls_cert_file` and `api.tls_key_file`.
    Files,
    /// TLS with a certificate of the ACME CA for the API's DNS names, which the certificate manager (`[certs]`)
    /// orders with dns-01 answered by our DNS; a certificate of the platform CA until it has one.
    Acme,
    /// Plain HTTP: a TLS-terminating proxy is in front.
    Off,
}

/// Why the API cannot serve TLS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The platform CA could not be loaded.
    #[error("cannot load the platform CA for the API's certificate")]
    Ca(#[source] cloud_certs::CertsError),
    /// The platform CA could not issue or the API could not take the certificate.
    #[error("cannot issue the API's certificate")]
    Issue(#[source] cloud_certs::wildcard::WildcardError),
    /// `tls = "files"` without both files.
    #[error("api.tls = \"files\" needs api.tls_cert_file and api.tls_key_file")]
    MissingFiles,
    /// A configured file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path} holds no {what} in PEM")]
    Pem {
        /// The file.
        path: String,
        /// What it should hold.
        what: &'static str,
    },
    /// The key is of a type rustls cannot sign with, or does not match.
    #[error("the API's private key cannot be used")]
    Key(#[source] rustls::Error),
    /// `tls = "acme"` without a DNS name to order a certificate for.
    #[error(
        "api.tls = \"acme\" needs a DNS name in api.tls_names or api.public_urls (an ACME CA certifies no IP address)"
    )]
    NoAcmeName,
    /// The database failed.
    #[error("cannot record or read the API's certificate")]
    Store(#[from] cloud_store::StoreError),
    /// A stored certificate's key does not open with the configured secret key.
    #[error("the API's stored certificate key cannot be opened with this secret key")]
    Seal(#[from] cloud_certs::seal::SealError),
}

/// The TLS the API serves.
pub struct ServedTls {
    /// For the listener.
    pub server_config: rustls::ServerConfig,
    /// What clients pin: the platform CA's fingerprint, or the configured leaf's; `None` for an ACME certificate,
    /// which clients check against the public roots.
    pub pin: Option<String>,
    /// Keeps a platform certificate valid; aborted when dropped.
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for ServedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedTls").field("pin", &self.pin).finish_non_exhaustive()
    }
}

impl Drop for ServedTls {
    fn drop(&mut self) {
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
    }
}

/// A certificate and key as served, the files' trouble named by `path`.
fn certified(chain_pem: &[u8], key_pem: &[u8], path: &str) -> Result<CertifiedKey, TlsError> {
    cloud_certs::served::certified(chain_pem, key_pem).map_err(|e| match e {
        ServedError::NoKey => TlsError::Pem { path: path.into(), what: "key" },
        ServedError::Key(e) => TlsError::Key(e),
        _ => TlsError::Pem { path: path.into(), what: "certificate" },
    })
}

/// The names a platform certificate of the API covers: localhost and the loopback addresses, the listen
/// address unless it is a wildcard, the hosts of the public URLs, and the configured names.
pub fn api_names(config: &ApiConfig) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !config.listen.ip().is_unspecified() {
        names.push(config.listen.ip().to_string());
    }
    for url in &config.public_urls {
        if let Some(host) = url.split("://").nth(1).and_then(|rest| rest.split(['/', '?']).next()) {
            let host = match host.strip_prefix('[') {
                // An IPv6 address, with or without a port.
                Some(v6) => v6.split(']').next().unwrap_or(v6).to_owned(),
                None => host.rsplit_once(':').map_or(host, |(h, _)| h).to_owned(),
            };
            names.push(host);
        }
    }
    names.extend(config.tls_names.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.parse::<IpAddr>().map(|ip| ip.to_string()).unwrap_or_else(|_| n.to_lowercase())));
    names
}

/// The URLs join tokens name: the configured ones, else the listen address's (loopback for a wildcard).
pub fn public_urls(config: &ApiConfig) -> Vec<String> {
    if !config.public_urls.is_empty() {
        return config.public_urls.iter().map(|u| u.trim_end_matches('/').to_owned()).collect();
    }
    let scheme = if config.tls == TlsMode::Off { "http" } else { "https" };
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { IpAddr::from([127, 0, 0, 1]) } else { IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]) });
    }
    vec![format!("{scheme}://{addr}")]
}

/// The TLS the configuration asks for; `None` for plain HTTP.
pub async fn prepare(config: &ApiConfig, store: &Store, key: &Arc<SecretKey>) -> Result<Option<ServedTls>, TlsError> {
    match config.tls {
        TlsMode::Off => Ok(None),
        TlsMode::Files => {
            let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
                return Err(TlsError::MissingFiles);
            };
            let read =
                |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.display().to_string(), source });
            let certified = certified(&read(cert)?, &read(key)?, &cert.display().to_string())?;
            let pin = cloud_domain::join::fingerprint(&certified.cert[0]);
            let current = Arc::new(CurrentCert::default());
            current.set(certified);
            Ok(Some(ServedTls { server_config: server_config(current), pin: Some(pin), renewal: None }))
        }
        TlsMode::Platform => {
            let ca = PlatformCa::load_or_create(store, key).await.map_err(TlsError::Ca)?;
            let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
                .map_err(|_| TlsError::Pem { path: "the platform CA".into(), what: "certificate" })?;
            let pin = cloud_domain::join::fingerprint(&ca_der);
            let (current, renewal) =
                cloud_certs::served::platform_certificate(ca, api_names(config)).map_err(TlsError::Issue)?;
            Ok(Some(ServedTls { server_config: server_config(current), pin: Some(pin), renewal: Some(renewal) }))
        }
        TlsMode::Acme => {
            let names = acme_names(config);
            if names.is_empty() {
                return Err(TlsError::NoAcmeName);
            }
            store.want_platform_certificate(API_CERTIFICATE, &names).await?;
            // Serving at once, with the platform CA's certificate until the manager has the ACME one.
            let ca = PlatformCa::load_or_create(store, key).await.map_err(TlsError::Ca)?;
            let current = Arc::new(CurrentCert::default());
            let bridge = ca.issue(&api_names(config), cloud_certs::wildcard::VALIDITY).map_err(TlsError::Ca)?;
            current.set(certified(bridge.chain_pem.as_bytes(), bridge.key_pem.as_bytes(), "issued")?);
            let mut served = None;
            follow_acme(store, key, &current, &mut served).await?;
            let feed = cloud_store::ChangeFeed::start(store.clone()).await?;
            let (store, key, follower) = (store.clone(), key.clone(), current.clone());
            let renewal = tokio::spawn(async move {
                let mut changes = feed.subscribe();
                loop {
                    // The manager's store of a new certificate is an event; the clock is the safety net.
                    let _ = tokio::time::timeout(ACME_RECHECK, changes.changed()).await;
                    if let Err(e) = follow_acme(&store, &key, &follower, &mut served).await {
                        tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot load the API's ACME certificate");
                    }
                }
            });
            Ok(Some(ServedTls { server_config: server_config(current), pin: None, renewal: Some(renewal) }))
        }
    }
}

/// The purpose the API's ACME certificate is stored under.
const API_CERTIFICATE: &str = "api";

/// How often the API looks for a new ACME certificate besides the change feed's events.
const ACME_RECHECK: std::time::Duration = std::time::Duration::from_secs(300);

/// The DNS names an ACME certificate of the API is for: the configured names and the public URLs' hosts,
/// without IP addresses and `localhost`.
pub fn acme_names(config: &ApiConfig) -> Vec<String> {
    let local = ["localhost", "127.0.0.1", "::1"];
    api_names(config)
        .into_iter()
        .filter(|n| n.parse::<IpAddr>().is_err() && !local.contains(&n.as_str()))
        .map(|n| n.trim_end_matches('.').to_lowercase())
        .collect()
}

/// Serves the stored ACME certificate if it is newer than the one served (`served`: its store time).
async fn follow_acme(
    store: &Store,
    key: &SecretKey,
    current: &CurrentCert,
    served: &mut Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(), TlsError> {
    let (stored, error) = store.platform_certificate(API_CERTIFICATE).await?;
    let Some(stored) = stored.filter(|c| Some(c.updated_at) != *served) else {
        if let Some(error) = error.filter(|_| served.is_none()) {
            tracing::warn!(%error, "no ACME certificate for the API yet: serving the platform CA's");
        }
        return Ok(());
    };
    let key_pem = key.open(&stored.key_sealed)?;
    current.set(certified(stored.chain_pem.as_bytes(), &key_pem, "the stored ACME certificate")?);
    *served = Some(stored.updated_at);
    tracing::info!(names = ?stored.names, not_after = %stored.not_after, "serving the API's ACME certificate");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_covers_loopback_the_listen_address_and_the_public_urls() {
        let config = ApiConfig {
            listen: "10.0.0.5:7300".parse().unwrap(),
            public_urls: vec![
                "https://api.example.com:7300/".into(),
                "https://[fd00::1]:7300".into(),
                "https://[fd00::2]".into(),
            ],
            tls_names: vec!["API.example.com".into(), "cloud.internal".into()],
            ..ApiConfig::default()
        };
        assert_eq!(
            api_names(&config),
            ["localhost", "127.0.0.1", "::1", "10.0.0.5", "api.example.com", "fd00::1", "fd00::2", "cloud.internal"]
        );
        assert_eq!(
            public_urls(&config),
            ["https://api.example.com:7300", "https://[fd00::1]:7300", "https://[fd00::2]"]
        );
        let wildcard = ApiConfig { listen: "0.0.0.0:7300".parse().unwrap(), ..ApiConfig::default() };
        assert_eq!(api_names(&wildcard), ["localhost", "127.0.0.1", "::1"]);
        assert_eq!(public_urls(&wildcard), ["https://127.0.0.1:7300"]);
        let plain = ApiConfig { tls: TlsMode::Off, ..ApiConfig::default() };
        assert_eq!(public_urls(&plain), ["http://127.0.0.1:7300"]);
    }
}
