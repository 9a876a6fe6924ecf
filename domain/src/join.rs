//! Join tokens, as LXD's trust tokens: one string that tells a new client where the API is, which certificate to
//! trust there and a one-time secret to exchange for a bearer token. The server keeps only the secret's hash; the
//! rest of the token is for the client, which checks the certificate before it sends the secret anywhere.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a join token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// The API's URLs, tried in order.
    pub urls: Vec<String>,
    /// The certificate to pin (`SHA256:AB:..`): the platform CA's, or the API's own; `None` when a public CA vouches
    /// for the API (its TLS is a proxy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The one-time secret.
    pub secret: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinTokenError {
    /// Not base64url, or not the JSON a join token holds.
    #[error("this is not a join token (`cloudctl token create --join` prints one)")]
    Malformed,
    /// It names no URL, or a URL that is not http(s).
    #[error("the join token names no usable API URL")]
    NoUrl,
    /// Its expiry has passed.
    #[error("the join token expired at {0}; ask for a new one")]
    Expired(DateTime<Utc>),
}

impl JoinToken {
    /// The printable token.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("a join token serializes"))
    }

    /// Reads a token, refusing one that expired before `now`.
    pub fn decode(text: &str, now: DateTime<Utc>) -> Result<Self, JoinTokenError> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim().trim_end_matches('=')).map_err(|_| JoinTokenError::Malformed)?;
        let token: Self = serde_json::from_slice(&bytes).map_err(|_| JoinTokenError::Malformed)?;
        if token.secret.is_empty() {
            return Err(JoinTokenError::Malformed);
        }
        if !token.urls.iter().any(|u| u.starts_with("https://") || u.starts_with("http://")) {
            return Err(JoinTokenError::NoUrl);
        }
        if token.expires_at <= now {
            return Err(JoinTokenError::Expired(token.expires_at));
        }
        Ok(token)
    }
}

/// Why a join token's secret was not exchanged. Every reason is told to whoever holds the secret: it is theirs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinRefusal {
    /// No join token has this secret.
    #[error("this join token is not valid here (mistyped, forged, or from another platform)")]
    Unknown,
    /// It was exchanged already.
    #[error("this join token was used at {0}; each works once: ask for a new one")]
    Used(DateTime<Utc>),
    /// Its time ran out.
    #[error("this join token expired at {0}; ask for a new one")]
    Expired(DateTime<Utc>),
    /// It was revoked.
    #[error("this join token was revoked at {0}")]
    Revoked(DateTime<Utc>),
    /// Its tenant is gone.
    #[error("the tenant \"{0}\" this join token was for was deleted")]
    TenantDeleted(String),
}

/// A new one-time secret: 32 random bytes, base64url.
pub fn new_secret() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// What the server stores of a secret.
pub fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// `SHA256:AB:CD:...` of a DER certificate, as clients show and pin it.
pub fn fingerprint(der: &[u8]) -> String {
    let hex: Vec<String> = Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            urls: vec!["https://127.0.0.1:7300".into()],
            fingerprint: Some(fingerprint(b"cert")),
            secret: new_secret(),
            expires_at: Utc::now() + chrono::Duration::hours(1),
        }
    }

    #[test]
    fn a_token_round_trips_and_bad_ones_say_why() {
        let t = token();
        assert_eq!(JoinToken::decode(&t.encode(), Utc::now()).unwrap(), t);
        assert_eq!(JoinToken::decode(&format!("  {}\n", t.encode()), Utc::now()).unwrap(), t);
        let later = t.expires_at + chrono::Duration::seconds(1);
        assert_eq!(JoinToken::decode(&t.encode(), later), Err(JoinTokenError::Expired(t.expires_at)));
        for bad in ["", "not base64!", "eyJ0eXAiOiJKV1QifQ", &URL_SAFE_NO_PAD.encode("{\"urls\":[]}")] {
            assert_eq!(JoinToken::decode(bad, Utc::now()), Err(JoinTokenError::Malformed), "{bad}");
        }
        let no_url = JoinToken { urls: vec!["ftp://x".into()], ..token() };
        assert_eq!(JoinToken::decode(&no_url.encode(), Utc::now()), Err(JoinTokenError::NoUrl));
        assert_ne!(new_secret(), new_secret());
        assert_eq!(secret_hash("a"), secret_hash("a"));
        assert!(fingerprint(b"x").starts_with("SHA256:") && fingerprint(b"x").len() == 7 + 32 * 3 - 1);
    }
}
