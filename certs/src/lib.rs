//! Certificates: the platform CA, which signs the wildcard `*.<region>.<base_domain>` the edge serves in dev and
//! self-hosted mode.
//!
//! Also the ownership check of custom domains ([`ownership`]): the platform routes and certifies a custom domain
//! only once its owner published the TXT token.
//!
//! The pieces of the certificate role for custom domains: keys sealed with the platform key ([`seal`]), checks of
//! uploaded certificates ([`upload`]) and ACME orders ([`acme`]: http-01 or dns-01 through a responder the edge or
//! our DNS provides).
//!
//! Boundaries: the certificate role proper (certificates stored per domain, ordering and renewal driven from the
//! database) is still to come (issue 7). The CA is created once per
//! platform and kept in PostgreSQL's `platform_secrets` like the API's token signing key; every replica that asks
//! gets the same CA (the first to store one wins a race). Leaves are issued in memory by whoever serves them, so
//! there is nothing to distribute: every edge issues its own wildcard under the shared CA.

pub mod acme;
pub mod ownership;
pub mod seal;
pub mod upload;

use std::time::Duration;

use cloud_store::{Store, StoreError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

/// Name of the CA (certificate and key PEM, concatenated) in `platform_secrets`.
const CA_SECRET: &str = "platform_ca";

/// Lifetime of the CA certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// The database failed.
    #[error("cannot read or store the platform CA")]
    Store(#[from] StoreError),
    /// Generating or signing failed.
    #[error("cannot make a certificate")]
    Generate(#[from] rcgen::Error),
    /// The stored CA is not a certificate and key in PEM.
    #[error("the stored platform CA is unreadable")]
    Corrupt,
}

/// The platform's certificate authority.
pub struct PlatformCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for PlatformCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformCa").finish_non_exhaustive()
    }
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Issued {
    /// The leaf, then its issuers (the platform CA, or the ACME CA's intermediates).
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cloud platform");
    dn.push(DnType::CommonName, cn);
    dn
}

impl PlatformCa {
    /// The platform's CA, created by the first caller.
    pub async fn load_or_create(store: &Store) -> Result<Self, CertsError> {
        let fresh = Self::generate()?;
        let stored = store.platform_secret_or(CA_SECRET, fresh.into_bytes()).await?;
        let text = String::from_utf8(stored).map_err(|_| CertsError::Corrupt)?;
        Self::from_pem(&text)
    }

    /// A new CA as certificate PEM followed by key PEM.
    fn generate() -> Result<String, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        // A leaf must not look like its CA (same distinguished name): clients would take it as self-signed.
        params.distinguished_name = dn("cloud platform CA");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
    }

    fn from_pem(text: &str) -> Result<Self, CertsError> {
        let split = text.find("-----BEGIN PRIVATE KEY-----").ok_or(CertsError::Corrupt)?;
        let (cert_pem, key_pem) = text.split_at(split);
        let key = KeyPair::from_pem(key_pem).map_err(|_| CertsError::Corrupt)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|_| CertsError::Corrupt)?;
        Ok(Self { cert_pem: cert_pem.to_owned(), issuer })
    }

    /// The CA certificate in PEM: what clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names, wildcards allowed), valid for `validity` from now.
    pub fn issue(&self, names: &[String], validity: Duration) -> Result<Issued, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = dn(names.first().map_or("server", String::as_str));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        // A little slack for clocks behind ours.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + validity;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            not_after: params.not_after,
        })
    }

    /// The wildcard of a zone plus the zone's own name: what the edge serves for every service FQDN.
    pub fn issue_wildcard(&self, zone: &str, validity: Duration) -> Result<Issued, CertsError> {
        self.issue(&[format!("*.{zone}"), zone.to_owned()], validity)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[tokio::test]
    async fn every_replica_gets_the_one_ca_and_its_wildcard_verifies_with_openssl() {
        let store = cloud_tests::fresh_store().await;
        let cas = futures(&store).await;
        assert!(cas.windows(2).all(|w| w[0].cert_pem() == w[1].cert_pem()), "one CA for all replicas");
        let ca = &cas[0];
        let leaf = ca.issue_wildcard("dev.cloud.localhost", Duration::from_secs(3600)).unwrap();
        assert!(leaf.not_after > OffsetDateTime::now_utc());

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("chain.pem"), &leaf.chain_pem).unwrap();
        let out = Command::new("openssl")
            .args(["verify", "-CAfile", "ca.pem", "-verify_hostname", "web-1234abcd.dev.cloud.localhost", "chain.pem"])
            .current_dir(dir.path())
            .output()
            .expect("openssl (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A name outside the zone is not covered.
        let out = Command::new("openssl")
            .args(["verify", "-CAfile", "ca.pem", "-verify_hostname", "www.example.com", "chain.pem"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
    }

    /// Several replicas starting at once.
    async fn futures(store: &Store) -> Vec<PlatformCa> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let store = store.clone();
            set.spawn(async move { PlatformCa::load_or_create(&store).await.unwrap() });
        }
        let mut cas = Vec::new();
        while let Some(ca) = set.join_next().await {
            cas.push(ca.unwrap());
        }
        cas
    }
}
