//! Certificate pinning for remotes whose certificate no public root vouches for (a self-hosted platform), as
//! LXD does it: on first contact show the certificate's SHA-256 fingerprint and trust it only when the user says
//! so; afterwards accept exactly that certificate. A pin may also be the platform CA that the server presents
//! with its certificate (what `cloudd dev` and join tokens pin): then the server's certificate must be signed by
//! it and name the host, so the API can renew its certificate without breaking its clients.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub use cloud_domain::join::fingerprint;

/// Accepts the one certificate whose fingerprint is pinned (signatures are still checked), or, with no pin,
/// any certificate, recording what it saw: the first-contact probe.
#[derive(Debug)]
pub struct Pinned {
    pin: Option<String>,
    seen: Mutex<Option<String>>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    /// A verifier for a pin, or a recorder when `pin` is `None`.
    pub fn new(pin: Option<String>) -> Arc<Self> {
        Arc::new(Self { pin, seen: Mutex::new(None), provider: Arc::new(rustls::crypto::ring::default_provider()) })
    }

    /// The fingerprint of the certificate the server presented.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().ok().and_then(|s| s.clone())
    }

    /// A TLS client configuration using this verifier.
    pub fn client_config(self: &Arc<Self>) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(got.clone());
        }
        let Some(pin) = &self.pin else { return Ok(ServerCertVerified::assertion()) };
        if *pin == got {
            return Ok(ServerCertVerified::assertion());
        }
        if let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == *pin) {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.clone().into_owned())?;
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("the pinned CA {pin} is unusable: {e}")))?;
            return verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        let issuers: Vec<String> = intermediates.iter().map(|c| fingerprint(c)).collect();
        let presented = match issuers.is_empty() {
            true => got,
            false => format!("{got} (with {})", issuers.join(", ")),
        };
        Err(rustls::Error::General(format!(
            "the server's certificate {presented} is not the pinned {pin}: it changed, or this is not the same server"
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
