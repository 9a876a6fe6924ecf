//! Content addresses: `sha256:<64 hex digits>`, the only algorithm images use in practice.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::OciError;

/// A sha256 content digest in its canonical text form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl TryFrom<String> for Digest {
    type Error = OciError;

    fn try_from(s: String) -> Result<Self, OciError> {
        Self::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`; anything else (another algorithm, uppercase, a path) is refused, so a
    /// digest can name a file or a URL path safely.
    pub fn parse(text: &str) -> Result<Self, OciError> {
        let hex = text.strip_prefix("sha256:").ok_or_else(|| OciError::Corrupt {
            what: "digest".into(),
            reason: format!("{text:?} is not a sha256 digest"),
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(OciError::Corrupt { what: "digest".into(), reason: format!("{text:?} is not 64 hex digits") });
        }
        Ok(Self(text.to_owned()))
    }

    /// The digest of some bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The digest a hasher has accumulated.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Fails unless `bytes` have this digest; `what` names them in the error.
    pub fn verify(&self, what: &str, bytes: &[u8]) -> Result<(), OciError> {
        let actual = Self::of(bytes);
        if &actual == self {
            Ok(())
        } else {
            Err(OciError::DigestMismatch { what: what.into(), expected: self.0.clone(), actual: actual.0 })
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_sha256_digests_parse() {
        let d = Digest::of(b"abc");
        assert_eq!(d.as_str(), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
        assert_eq!(d.hex().len(), 64);
        for bad in [
            "",
            "sha256:",
            "sha512:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "sha256:../../../../etc/passwd00000000000000000000000000000000000000000",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
        assert!(d.verify("blob", b"abc").is_ok());
        let e = d.verify("blob", b"abd").unwrap_err().to_string();
        assert!(e.contains("blob") && e.contains(d.as_str()), "{e}");
    }
}
