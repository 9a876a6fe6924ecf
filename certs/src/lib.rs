//! Certificates: the platform CA, which signs the wildcard `*.<region>.<base_domain>` the edge serves in dev and
//! self-hosted mode ([`wildcard`] keeps it valid).
//!
//! Also the ownership check of custom domains ([`ownership`]): the platform routes and certifies a custom domain
//! only once its owner published the TXT token.
//!
//! Uploaded certificates are checked by [`upload`] and stored with sealed keys ([`seal`]); ACME orders ([`acme`])
//! answer http-01 or dns-01 through a responder the edge or our DNS provides.
//!
//! The CA is created once per platform and kept in PostgreSQL's `platform_secrets`, its key sealed with the
//! platform secret key; every replica that asks gets the same CA (the first to store one wins a race). Leaves are
//! issued in memory by whoever serves them, so there is nothing to distribute: every edge issues its own wildcard
//! under the shared CA.

pub mod acme;
pub mod manager;
pub mod ownership;
pub mod seal;
pub mod served;
pub mod upload;
pub mod wildcard;

use std::time::Duration;

use base64::Engine as _;
use cloud_store::{Store, StoreError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

/// Name of the CA in `platform_secrets`: its certificate PEM, then its private key sealed with the platform
/// secret key (base64 between `SEALED PRIVATE KEY` markers). One value, so racing replicas agree on both.
const CA_SECRET: &str = "platform_ca_sealed";

/// Where earlier versions kept the CA with its key in clear; moved to [`CA_SECRET`] at the first load.
const CA_SECRET_CLEAR: &str = "platform_ca";

const SEALED_BEGIN: &str = "-----BEGIN SEALED PRIVATE KEY-----\n";
const SEALED_END: &str = "\n-----END SEALED PRIVATE KEY-----\n";

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
    /// The CA's key does not open with the configured secret key.
    #[error("the platform CA's key cannot be opened with this secret key")]
    Seal(#[from] seal::SealError),
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

/// Certificate PEM and key PEM from their concatenation.
fn split_clear(text: &str) -> Result<(&str, &str), CertsError> {
    let split = text.find("-----BEGIN PRIVATE KEY-----").ok_or(CertsError::Corrupt)?;
    Ok(text.split_at(split))
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
    /// The platform's CA, created by the first caller; its key is sealed with `key` in the database.
    pub async fn load_or_create(store: &Store, key: &seal::SecretKey) -> Result<Self, CertsError> {
        // A CA stored in clear by an earlier version is kept (clients trust it) and sealed now.
        let clear = store.stored_platform_secret(CA_SECRET_CLEAR).await?;
        let plain = match &clear {
            Some(old) => String::from_utf8(old.clone()).map_err(|_| CertsError::Corrupt)?,
            None => Self::generate()?,
        };
        let (cert_pem, key_pem) = split_clear(&plain)?;
        let fresh = format!(
            "{cert_pem}{SEALED_BEGIN}{}{SEALED_END}",
            base64::engine::general_purpose::STANDARD.encode(key.seal(key_pem.as_bytes())?)
        );
        let stored = store.platform_secret_or(CA_SECRET, fresh.into_bytes()).await?;
        if clear.is_some() {
            store.delete_platform_secret(CA_SECRET_CLEAR).await?;
        }
        let text = String::from_utf8(stored).map_err(|_| CertsError::Corrupt)?;
        let (cert_pem, sealed) = text.split_once(SEALED_BEGIN).ok_or(CertsError::Corrupt)?;
        let sealed = sealed.strip_suffix(SEALED_END).ok_or(CertsError::Corrupt)?;
        let sealed = base64::engine::general_purpose::STANDARD.decode(sealed).map_err(|_| CertsError::Corrupt)?;
        let key_pem = String::from_utf8(key.open(&sealed)?).map_err(|_| CertsError::Corrupt)?;
        Self::from_pem(cert_pem, &key_pem)
    }

    /// The CA certificate alone, for those who publish it without holding the key; `None` before the first
    /// [`load_or_create`](Self::load_or_create).
    pub async fn stored_certificate(store: &Store) -> Result<Option<String>, CertsError> {
        for name in [CA_SECRET, CA_SECRET_CLEAR] {
            if let Some(v) = store.stored_platform_secret(name).await? {
                let text = String::from_utf8(v).map_err(|_| CertsError::Corrupt)?;
                let end = text.find("-----END CERTIFICATE-----").ok_or(CertsError::Corrupt)?;
                return Ok(Some(format!("{}-----END CERTIFICATE-----\n", &text[..end])));
            }
        }
        Ok(None)
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

    fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertsError> {
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

    fn key() -> seal::SecretKey {
        seal::SecretKey::from_bytes(&[3; 32])
    }

    #[tokio::test]
    async fn the_ca_key_is_sealed_at_rest_and_opens_only_with_the_platform_key() {
        let store = cloud_tests::fresh_store().await;
        assert_eq!(PlatformCa::stored_certificate(&store).await.unwrap(), None);
        let ca = PlatformCa::load_or_create(&store, &key()).await.unwrap();
        let stored = store.stored_platform_secret(CA_SECRET).await.unwrap().unwrap();
        let text = String::from_utf8(stored).unwrap();
        assert!(!text.contains("PRIVATE KEY-----\nM"), "no key in clear: {text}");
        assert!(text.contains("BEGIN SEALED PRIVATE KEY"));
        assert_eq!(PlatformCa::stored_certificate(&store).await.unwrap().as_deref(), Some(ca.cert_pem()));
        let e = PlatformCa::load_or_create(&store, &seal::SecretKey::from_bytes(&[4; 32])).await.unwrap_err();
        assert!(matches!(e, CertsError::Seal(_)), "{e}");
    }

    #[tokio::test]
    async fn a_ca_stored_in_clear_by_an_earlier_version_is_kept_and_sealed() {
        let store = cloud_tests::fresh_store().await;
        let clear = PlatformCa::generate().unwrap();
        store.platform_secret_or(CA_SECRET_CLEAR, clear.clone().into_bytes()).await.unwrap();
        let (cert_pem, _) = split_clear(&clear).unwrap();
        assert_eq!(PlatformCa::stored_certificate(&store).await.unwrap().as_deref(), Some(cert_pem));
        let ca = PlatformCa::load_or_create(&store, &key()).await.unwrap();
        assert_eq!(ca.cert_pem(), cert_pem, "the same CA: clients keep trusting it");
        assert_eq!(store.stored_platform_secret(CA_SECRET_CLEAR).await.unwrap(), None, "no clear copy left");
        assert_eq!(PlatformCa::load_or_create(&store, &key()).await.unwrap().cert_pem(), cert_pem);
    }

    /// Several replicas starting at once.
    async fn futures(store: &Store) -> Vec<PlatformCa> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let store = store.clone();
            set.spawn(async move { PlatformCa::load_or_create(&store, &key()).await.unwrap() });
        }
        let mut cas = Vec::new();
        while let Some(ca) = set.join_next().await {
            cas.push(ca.unwrap());
        }
        cas
    }
}
