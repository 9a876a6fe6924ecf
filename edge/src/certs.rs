//! Certificates chosen per SNI from memory: rustls asks synchronously during the handshake, so the edge keeps
//! every served certificate parsed and ready, and swaps the whole set when the certificate store changes.
//!
//! An SNI no certificate covers fails the handshake: the edge never presents a certificate for a name it was not
//! asked for, so a stranger's name never gets another tenant's certificate.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
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
    Pem(#[source] std::io::Error),
    /// The key type is not supported.
    #[error("unsupported private key")]
    Key(#[source] rustls::Error),
}

impl ServedCert {
    /// Parses a PEM chain (leaf first) and a PEM private key.
    pub fn from_pem(names: Vec<String>, chain_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let chain =
            rustls_pemfile::certs(&mut chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(CertError::Pem)?;
        if chain.is_empty() {
            return Err(CertError::NoCertificate);
        }
        let key =
            rustls_pemfile::private_key(&mut key_pem.as_bytes()).map_err(CertError::Pem)?.ok_or(CertError::NoKey)?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertError::Key)?;
        Ok(Self {
            names: names.into_iter().map(|n| n.trim_end_matches('.').to_ascii_lowercase()).collect(),
            key: Arc::new(CertifiedKey::new(chain, signing)),
        })
    }
}

/// The served certificates by name, swapped whole.
#[derive(Default)]
pub struct CertStore {
    by_name: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").field("names", &self.by_name.load().len()).finish()
    }
}

impl CertStore {
    /// Replaces the served set. Earlier entries win for a name both cover (pass the newest first).
    pub fn replace(&self, certs: Vec<ServedCert>) {
        let mut by_name = HashMap::new();
        for c in certs {
            for n in c.names {
                by_name.entry(n).or_insert_with(|| c.key.clone());
            }
        }
        self.by_name.store(Arc::new(by_name));
    }

    /// The certificate for a name: exact, then the wildcard one label up.
    pub fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let map = self.by_name.load();
        if let Some(k) = map.get(&name) {
            return Some(k.clone());
        }
        let (_, parent) = name.split_once('.')?;
        map.get(&format!("*.{parent}")).cloned()
    }

    /// How many names are covered.
    pub fn len(&self) -> usize {
        self.by_name.load().len()
    }

    /// Whether no name is covered.
    pub fn is_empty(&self) -> bool {
        self.by_name.load().is_empty()
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
