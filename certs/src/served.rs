//! A server's one certificate, replaced in place when it is renewed: what the API and the node agents' exec
//! listeners serve, whatever name (or none) a client asks for.

use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::PlatformCa;
use crate::wildcard::WildcardError;

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServedError {
    /// No certificate in the chain's PEM.
    #[error("no certificate in PEM")]
    NoCertificate,
    /// No private key in the key's PEM.
    #[error("no private key in PEM")]
    NoKey,
    /// The key is of a type rustls cannot sign with, or is not the certificate's.
    #[error("the private key cannot be used")]
    Key(#[source] rustls::Error),
}

/// The certificate served now.
#[derive(Debug, Default)]
pub struct CurrentCert(RwLock<Option<Arc<CertifiedKey>>>);

impl CurrentCert {
    /// Serves `key` from now on.
    pub fn set(&self, key: CertifiedKey) {
        if let Ok(mut current) = self.0.write() {
            *current = Some(Arc::new(key));
        }
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().and_then(|k| k.clone())
    }
}

/// A PEM chain (leaf first) and its PEM private key, ready to serve.
pub fn certified(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, ServedError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem).collect::<Result<_, _>>().map_err(|_| ServedError::NoCertificate)?;
    if chain.is_empty() {
        return Err(ServedError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| ServedError::NoKey)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(ServedError::Key)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(ServedError::Key)?;
    Ok(certified)
}

/// A TLS server configuration serving `current`.
pub fn server_config(current: Arc<CurrentCert>) -> rustls::ServerConfig {
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(current)
}

/// A certificate of the platform CA for `names` (DNS names or IP addresses), issued now and renewed before it ends
/// by the returned task (aborted by the caller).
pub fn platform_certificate(
    ca: PlatformCa,
    names: Vec<String>,
) -> Result<(Arc<CurrentCert>, tokio::task::JoinHandle<()>), WildcardError> {
    let current = Arc::new(CurrentCert::default());
    let renewed = current.clone();
    let renewal = crate::wildcard::serve_and_renew_names(ca, names, move |issued| {
        renewed.set(certified(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())?);
        Ok(())
    })?;
    Ok((current, renewal))
}
