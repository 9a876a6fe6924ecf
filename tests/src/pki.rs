//! Certificates for tests: a CA of the test's own and leaves it signs, as a tenant's certificate authority
//! would issue them.

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};
use time::{Duration, OffsetDateTime};

/// A certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, to trust.
    pub pem: String,
}

impl TestCa {
    /// A new CA named `cn`.
    pub fn new(cn: &str) -> Self {
        let key = KeyPair::generate().expect("a key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name = dn(cn);
        let cert = p.self_signed(&key).expect("self-signed");
        Self { pem: cert.pem(), issuer: Issuer::new(p, key) }
    }

    /// A leaf for `sans` (SAN only), valid from `from_days` to `to_days` around now: (chain PEM with this CA, key PEM).
    pub fn leaf(&self, sans: &[&str], from_days: i64, to_days: i64) -> (String, String) {
        let key = KeyPair::generate().expect("a key");
        let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        // A leaf must not carry its CA's name, or clients take it for self-signed.
        p.distinguished_name = DistinguishedName::new();
        let now = OffsetDateTime::now_utc();
        p.not_before = now + Duration::days(from_days);
        p.not_after = now + Duration::days(to_days);
        let cert = p.signed_by(&key, &self.issuer).expect("signed");
        (format!("{}{}", cert.pem(), self.pem), key.serialize_pem())
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}
