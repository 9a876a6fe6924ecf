//! Checks of a certificate a tenant uploads for one of its domains, before anything is stored: the chain parses,
//! each certificate is signed by the next and is current, the key is the leaf's, and the leaf's names cover the
//! domain. Pure functions over PEM text and a clock, so every rejection is unit-tested.

use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// Why an upload is refused. Each variant names what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum UploadError {
    /// The chain or key is not PEM of the expected kind.
    #[error("{0}")]
    Unreadable(String),
    /// The private key does not belong to the leaf certificate.
    #[error("the private key does not match the certificate (the first certificate of the chain must be the key's)")]
    KeyMismatch,
    /// A certificate of the chain is outside its validity period.
    #[error("certificate {position} of the chain ({subject}) is not valid now: valid from {not_before} to {not_after}")]
    NotCurrent {
        /// 1 for the leaf.
        position: usize,
        /// Its subject.
        subject: String,
        /// Start of validity.
        not_before: String,
        /// End of validity.
        not_after: String,
    },
    /// A certificate is not issued (named and signed) by the one after it.
    #[error("certificate {position} of the chain ({subject}) is not signed by the next one ({issuer}): {reason}")]
    ChainBroken {
        /// 1 for the leaf.
        position: usize,
        /// Its subject.
        subject: String,
        /// The next certificate's subject.
        issuer: String,
        /// Name or signature mismatch.
        reason: String,
    },
    /// The leaf's names do not cover the domain.
    #[error("the certificate's names ({names}) do not cover {domain}")]
    NameMismatch {
        /// The domain the upload is for.
        domain: String,
        /// The names the leaf carries.
        names: String,
    },
}

/// A checked upload.
#[derive(Debug, Clone)]
pub struct CheckedUpload {
    /// The names of the leaf (SAN DNS names, or the common name without SANs).
    pub names: Vec<String>,
    /// The leaf's validity.
    pub not_before: OffsetDateTime,
    /// The leaf's end of validity.
    pub not_after: OffsetDateTime,
}

/// Checks a chain (leaf first, then intermediates, optionally the root) and its key for `domain` at `now`.
pub fn check_upload(
    chain_pem: &str,
    key_pem: &str,
    domain: &str,
    now: OffsetDateTime,
) -> Result<CheckedUpload, UploadError> {
    let pems: Vec<Pem> = Pem::iter_from_buffer(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| UploadError::Unreadable(format!("chain_pem is not PEM: {e}")))?;
    if pems.is_empty() || pems.iter().any(|p| p.label != "CERTIFICATE") {
        return Err(UploadError::Unreadable(
            "chain_pem must hold one or more \"BEGIN CERTIFICATE\" blocks, the domain's certificate first".into(),
        ));
    }
    let certs: Vec<X509Certificate<'_>> = pems
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse_x509().map_err(|e| UploadError::Unreadable(format!("certificate {} of the chain: {e}", i + 1)))
        })
        .collect::<Result<_, _>>()?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|_| {
        UploadError::Unreadable(
            "key_pem must be an unencrypted PKCS#8 private key (\"BEGIN PRIVATE KEY\"; convert with \
             openssl pkcs8 -topk8 -nocrypt)"
                .into(),
        )
    })?;
    let leaf = &certs[0];
    if key.public_key_raw() != &*leaf.public_key().subject_public_key.data {
        return Err(UploadError::KeyMismatch);
    }
    let now_ts = now.unix_timestamp();
    for (i, c) in certs.iter().enumerate() {
        let v = c.validity();
        if now_ts < v.not_before.timestamp() || now_ts > v.not_after.timestamp() {
            return Err(UploadError::NotCurrent {
                position: i + 1,
                subject: c.subject().to_string(),
                not_before: v.not_before.to_string(),
                not_after: v.not_after.to_string(),
            });
        }
    }
    for (i, pair) in certs.windows(2).enumerate() {
        let (c, issuer) = (&pair[0], &pair[1]);
        let broken = |reason: &str| UploadError::ChainBroken {
            position: i + 1,
            subject: c.subject().to_string(),
            issuer: issuer.subject().to_string(),
            reason: reason.into(),
        };
        if c.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(broken("its issuer is another name"));
        }
        if c.verify_signature(Some(issuer.public_key())).is_err() {
            return Err(broken("the signature does not verify"));
        }
    }
    let names = leaf_names(leaf);
    if !covers(&names, domain) {
        return Err(UploadError::NameMismatch { domain: domain.into(), names: names.join(", ") });
    }
    let to_time = |t: i64| OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    Ok(CheckedUpload {
        names,
        not_before: to_time(leaf.validity().not_before.timestamp()),
        not_after: to_time(leaf.validity().not_after.timestamp()),
    })
}

/// SAN DNS names; the common names only when there is no SAN extension (as browsers used to, and RFC 6125
/// allows for certificates without SANs).
fn leaf_names(leaf: &X509Certificate<'_>) -> Vec<String> {
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        return san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect();
    }
    leaf.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(|s| s.to_ascii_lowercase()).collect()
}

/// Whether a certificate name list covers `domain`: the same name, or a wildcard for exactly one more label. A
/// wildcard domain is covered only by the same wildcard.
fn covers(names: &[String], domain: &str) -> bool {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    names.iter().any(|n| {
        let n = n.trim_end_matches('.');
        n == domain
            || (n.starts_with("*.")
                && !domain.starts_with("*.")
                && domain.split_once('.').is_some_and(|(label, parent)| !label.is_empty() && n[2..] == *parent))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn dn(cn: &str) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    }

    fn new_ca(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name = dn(cn);
        let cert = p.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(p, key) }
    }

    /// A leaf for `sans` (none: CN only) valid from `from` to `to` days from now, and its key.
    fn leaf(ca: &Ca, cn: &str, sans: &[&str], from: i64, to: i64) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = dn(cn);
        let now = OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(from);
        p.not_after = now + time::Duration::days(to);
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        (format!("{}{}", cert.pem(), ca.pem), key.serialize_pem())
    }

    fn check(chain: &str, key: &str, domain: &str) -> Result<CheckedUpload, UploadError> {
        check_upload(chain, key, domain, OffsetDateTime::now_utc())
    }

    #[test]
    fn san_only_cn_only_and_wildcards_are_accepted_for_the_names_they_cover() {
        let ca = new_ca("test CA");
        let (chain, key) = leaf(&ca, "", &["www.example.test", "api.example.test"], -1, 30);
        let ok = check(&chain, &key, "api.example.test").unwrap();
        assert_eq!(ok.names, ["www.example.test", "api.example.test"]);
        assert!(ok.not_after > OffsetDateTime::now_utc() + time::Duration::days(29));
        let (chain, key) = leaf(&ca, "legacy.example.test", &[], -1, 30);
        assert_eq!(check(&chain, &key, "legacy.example.test").unwrap().names, ["legacy.example.test"]);
        let (chain, key) = leaf(&ca, "wild", &["*.example.test"], -1, 30);
        check(&chain, &key, "shop.example.test").unwrap();
        check(&chain, &key, "*.example.test").unwrap();
        // A wildcard covers one label only, and not the apex.
        for domain in ["a.b.example.test", "example.test"] {
            assert!(matches!(check(&chain, &key, domain), Err(UploadError::NameMismatch { .. })), "{domain}");
        }
        // Just the leaf (no intermediates) is a valid chain too.
        let leaf_only = chain.split_inclusive("-----END CERTIFICATE-----\n").next().unwrap();
        check(leaf_only, &key, "shop.example.test").unwrap();
    }

    #[test]
    fn a_wrong_key_an_expired_or_future_chain_a_broken_chain_and_other_names_are_refused() {
        let ca = new_ca("test CA");
        let (chain, key) = leaf(&ca, "", &["www.example.test"], -1, 30);
        let (_, other_key) = leaf(&ca, "", &["www.example.test"], -1, 30);
        assert_eq!(check(&chain, &other_key, "www.example.test").unwrap_err(), UploadError::KeyMismatch);

        let (expired, key_e) = leaf(&ca, "", &["www.example.test"], -60, -1);
        let e = check(&expired, &key_e, "www.example.test").unwrap_err();
        assert!(matches!(e, UploadError::NotCurrent { position: 1, .. }), "{e}");
        let (future, key_f) = leaf(&ca, "", &["www.example.test"], 2, 30);
        assert!(matches!(check(&future, &key_f, "www.example.test"), Err(UploadError::NotCurrent { .. })));

        // The leaf followed by a CA that did not sign it.
        let stranger = new_ca("test CA");
        let wrong_chain = chain.replace(&ca.pem, &stranger.pem);
        let e = check(&wrong_chain, &key, "www.example.test").unwrap_err();
        assert!(
            matches!(&e, UploadError::ChainBroken { position: 1, reason, .. } if reason.contains("signature")),
            "{e}"
        );
        let named_otherwise = new_ca("another CA");
        let e = check(&chain.replace(&ca.pem, &named_otherwise.pem), &key, "www.example.test").unwrap_err();
        assert!(matches!(&e, UploadError::ChainBroken { reason, .. } if reason.contains("issuer")), "{e}");

        let e = check(&chain, &key, "shop.example.test").unwrap_err();
        assert_eq!(e.to_string(), "the certificate's names (www.example.test) do not cover shop.example.test");
    }

    #[test]
    fn unreadable_input_says_what_is_expected() {
        let ca = new_ca("test CA");
        let (chain, key) = leaf(&ca, "", &["www.example.test"], -1, 30);
        for (c, k, needle) in [
            ("", key.as_str(), "BEGIN CERTIFICATE"),
            ("not pem", key.as_str(), "BEGIN CERTIFICATE"),
            (key.as_str(), key.as_str(), "BEGIN CERTIFICATE"),
            (chain.as_str(), "", "PKCS#8"),
            (chain.as_str(), chain.as_str(), "PKCS#8"),
        ] {
            match check(c, k, "www.example.test") {
                Err(UploadError::Unreadable(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
