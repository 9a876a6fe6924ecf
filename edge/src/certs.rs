//! Certificates chosen per SNI from memory: rustls asks synchronously during the handshake, so the edge keeps
//! every served certificate parsed and ready, and swaps the whole set when the certificate store changes.
//!
//! An SNI no certificate covers fails the handshake: the edge never presents a certificate for a name it was not
//! asked for, so a stranger's name never gets another tenant's certificate.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A certificate to serve and the names it covers (`*.zone` for a wildcard).
#[derive(Clone)]
pub struct ServedCert {
    /// Names covered, lower case.
    pub names: Vec<String>,
    /// Parsed chain and key.
    pub key: Arc<CertifiedKey>,
}

impl fmt::Debug for ServedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServedCert").field("names", &self.names).finish_non_exhaustive()
    }
}

/// Why a certificate could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The chain has no certificate.
    #[error("the certificate chain holds no certificate")]
    NoCertificate,
    /// The key PEM holds no private key.
    #[error("no private key in the key PEM")]
    NoKey,
    /// The PEM could not be read.
    #[error("unreadable PEM")]
    Pem(#[source] rustls::pki_types::pem::Error),
    /// The key type is not supported.
    #[error("unsupported private key")]
    Key(#[source] rustls::Error),
}

impl ServedCert {
    /// Parses a PEM chain (leaf first) and a PEM private key.
    pub fn from_pem(names: Vec<String>, chain_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(CertError::Pem)?;
        if chain.is_empty() {
            return Err(CertError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
            pem::Error::NoItemsFound => CertError::NoKey,
            e => CertError::Pem(e),
        })?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertError::Key)?;
        Ok(Self {
            names: names.into_iter().map(|n| n.trim_end_matches('.').to_ascii_lowercase()).collect(),
            key: Arc::new(CertifiedKey::new(chain, signing)),
        })
    }
}

/// The served certificates by name, in two sets swapped whole: the platform's (its wildcard) and the tenants'
/// (certificates of verified custom domains, from the database).
#[derive(Default)]
pub struct CertStore {
    by_name: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    tenants: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").field("names", &self.by_name.load().len()).finish()
    }
}

impl CertStore {
    /// Replaces the platform's set. Earlier entries win for a name both cover (pass the newest first).
    pub fn replace(&self, certs: Vec<ServedCert>) {
        self.by_name.store(Arc::new(index(certs)));
    }

    /// Replaces the tenants' set.
    pub fn replace_tenants(&self, certs: Vec<ServedCert>) {
        self.tenants.store(Arc::new(index(certs)));
    }

    /// The certificate for a name: exact, then the wildcard one label up; the platform's before the tenants'.
    pub fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let (platform, tenants) = (self.by_name.load(), self.tenants.load());
        if let Some(k) = platform.get(&name).or_else(|| tenants.get(&name)) {
            return Some(k.clone());
        }
        let (_, parent) = name.split_once('.')?;
        let wildcard = format!("*.{parent}");
        platform.get(&wildcard).or_else(|| tenants.get(&wildcard)).cloned()
    }

    /// How many names are covered.
    pub fn len(&self) -> usize {
        self.by_name.load().len() + self.tenants.load().len()
    }

    /// Whether no name is covered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn index(certs: Vec<ServedCert>) -> HashMap<String, Arc<CertifiedKey>> {
    let mut by_name = HashMap::new();
    for c in certs {
        for n in c.names {
            by_name.entry(n).or_insert_with(|| c.key.clone());
        }
    }
    by_name
}

/// Loads the tenants' certificates (keys opened with the platform secret key), each served for exactly the
/// domain it was stored for, never for the other names it carries.
pub(crate) async fn load_tenant_certs(
    store: &cloud_store::Store,
    key: &cloud_certs::seal::SecretKey,
    certs: &CertStore,
) -> Result<usize, cloud_store::StoreError> {
    let mut served = Vec::new();
    for c in store.served_certificates().await? {
        let opened = key.open(&c.key_sealed).map_err(|e| e.to_string()).and_then(|k| {
            let pem = String::from_utf8(k).map_err(|e| e.to_string())?;
            ServedCert::from_pem(vec![c.domain.clone()], &c.chain_pem, &pem).map_err(|e| e.to_string())
        });
        match opened {
            Ok(s) => served.push(s),
            Err(e) => tracing::error!(domain = %c.domain, error = %e, "cannot serve a stored certificate"),
        }
    }
    let n = served.len();
    certs.replace_tenants(served);
    Ok(n)
}

/// Keeps the tenants' certificates current: a reload after every committed change that touches certificates or
/// services (a domain removed stops being served), and every `resync` as a safety net. Failed loads keep the
/// last set.
pub(crate) async fn follow_tenant_certs(
    store: cloud_store::Store,
    feed: cloud_store::ChangeFeed,
    key: Arc<cloud_certs::seal::SecretKey>,
    certs: Arc<CertStore>,
    resync: std::time::Duration,
) {
    let mut versions = feed.subscribe();
    let mut seen = *versions.borrow_and_update();
    loop {
        if let Err(e) = load_tenant_certs(&store, &key, &certs).await {
            tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot load certificates; serving the last set");
        }
        loop {
            let changed = tokio::time::timeout(resync, versions.changed()).await;
            if matches!(changed, Ok(Err(_))) {
                return;
            }
            let Ok(_) = changed else { break };
            let latest = *versions.borrow_and_update();
            match store.events_since(None, seen, 1000).await {
                Ok(events) => {
                    let relevant = events.len() == 1000
                        || events.iter().any(|e| matches!(e.resource_type.as_str(), "certificate" | "service"));
                    seen = events.last().map_or(latest, |e| e.version);
                    if relevant {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    }
}

/// The rustls view of the store.
#[derive(Debug)]
pub struct Resolver(pub Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.lookup(hello.server_name()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pem_chain_and_key_parse_and_what_is_missing_is_named() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap().self_signed(&key).unwrap();
        let (chain, key) = (cert.pem(), key.serialize_pem());
        let served = ServedCert::from_pem(vec!["A.Example.".into()], &chain, &key).unwrap();
        assert_eq!(served.names, ["a.example"]);
        assert_eq!(served.key.cert.len(), 1);
        assert!(matches!(ServedCert::from_pem(vec![], "", &key), Err(CertError::NoCertificate)));
        assert!(matches!(ServedCert::from_pem(vec![], &chain, &chain), Err(CertError::NoKey)));
        let cut = &chain[..chain.len() / 2];
        assert!(matches!(ServedCert::from_pem(vec![], cut, &key), Err(CertError::Pem(_))));
    }
}
