//! Bearer JWT authentication. A token's JWT is only a signed pointer to its database record (its id, with the
//! tenant and expiry as a cross-check); the record says what it grants (tenant, scopes, expiry) and whether it is
//! revoked. Every request checks the signature, then the record ([`authenticate`]), so a JWT signed with more
//! scopes than its record grants gets no more than the record.
//!
//! The HS256 signing key is shared by all API replicas through `platform_secrets`, sealed with the platform
//! secret key: a copy of the database alone cannot sign a token.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use chrono::{DateTime, Duration, Utc};
use cloud_certs::seal::{SealError, SecretKey};
use cloud_domain::api::{CreatedToken, ErrorCode, Scope};
use cloud_store::{Store, StoreError};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// The claims inside our JWTs. No scopes: they come from the token's record. (Tokens issued by earlier versions
/// carry a `scopes` claim, which is ignored.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Tenant id; must match the record's.
    pub sub: Uuid,
    /// Token id: the key of its database record.
    pub jti: Uuid,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expiry (seconds since the epoch); the record's expiry is checked too.
    pub exp: i64,
}

/// Why the API's state, the token signing key first, cannot be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// No platform secret key was configured.
    #[error(
        "the API needs the platform secret key (platform.secret_key_file): it seals the token signing key and \
         certificate keys in the database"
    )]
    NoSecretKey,
    /// The database failed (reading or storing the signing key, or starting to follow the change feed).
    #[error("the database failed while the API was starting")]
    Store(#[from] StoreError),
    /// The stored signing key does not open with the configured secret key.
    #[error(
        "the token signing key in the database cannot be opened with this platform secret key \
         (platform.secret_key_file must be the same file on every API replica)"
    )]
    Open(#[source] SealError),
    /// A new signing key could not be made or sealed.
    #[error("cannot make a token signing key")]
    Seal(#[source] SealError),
}

/// Signs and verifies tokens with the platform's HS256 key (shared by all API replicas through the database).
#[derive(Clone)]
pub struct TokenSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

/// Name of the signing key in `platform_secrets`, sealed with the platform secret key.
const SIGNING_KEY: &str = "jwt-hs256-sealed";

/// Where earlier versions kept the signing key in clear; sealed under [`SIGNING_KEY`] at the first start.
const SIGNING_KEY_CLEAR: &str = "jwt-hs256";

impl TokenSigner {
    /// A signer over a secret key.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub", "jti"]);
        Self { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation }
    }

    /// The signer over the platform's key, sealed with `secret` in the database; the first caller creates it.
    pub async fn load(store: &Store, secret: &SecretKey) -> Result<Self, StartError> {
        // A key left in clear by an earlier version is kept, so the tokens it signed stay valid, and sealed now.
        let clear = store.stored_platform_secret(SIGNING_KEY_CLEAR).await?;
        let fresh = match &clear {
            Some(key) => key.clone(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let stored = store.platform_secret_or(SIGNING_KEY, secret.seal(&fresh).map_err(StartError::Seal)?).await?;
        let key = secret.open(&stored).map_err(StartError::Open)?;
        if let Some(clear) = clear {
            if clear != key {
                // An API of the earlier version started after the upgrade and made itself a new key: the
                // tokens it issued are refused by every other replica.
                tracing::warn!("a clear token signing key differing from the sealed one was found and deleted");
            }
            store.delete_platform_secret(SIGNING_KEY_CLEAR).await?;
            tracing::info!("the token signing key left in clear by an earlier version is now sealed");
        }
        Ok(Self::new(&key))
    }

    /// Signs a claim set ([`Claims`] for the tokens we issue).
    pub fn sign(&self, claims: &impl Serialize) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding).expect("HS256 signing cannot fail")
    }

    /// Verifies signature and expiry.
    pub fn verify(&self, jwt: &str) -> ApiResult<Claims> {
        jsonwebtoken::decode::<Claims>(jwt, &self.decoding, &self.validation).map(|d| d.claims).map_err(|e| {
            match e.kind() {
                ErrorKind::ExpiredSignature => ApiError::new(ErrorCode::TokenExpired, "the token has expired"),
                _ => ApiError::new(ErrorCode::InvalidToken, "the token is malformed or its signature does not verify"),
            }
        })
    }
}

/// Creates a token record and its JWT.
pub async fn issue_token(
    store: &Store,
    signer: &TokenSigner,
    tenant: Uuid,
    scopes: &[Scope],
    lifetime: Duration,
    description: &str,
) -> ApiResult<CreatedToken> {
    let now = Utc::now();
    // Whole seconds, as in the JWT, so the record and the claim agree.
    let expires_at = DateTime::from_timestamp((now + lifetime).timestamp(), 0).unwrap_or(now + lifetime);
    let token = store.create_token(tenant, scopes, expires_at, description).await?;
    let jwt = signer.sign(&Claims { sub: tenant, jti: token.id, iat: now.timestamp(), exp: expires_at.timestamp() });
    Ok(CreatedToken { token, jwt })
}

/// The JWT of a token record made elsewhere (a join token's exchange), valid as long as the record says.
pub fn sign_record(signer: &TokenSigner, tenant: Uuid, token: &cloud_domain::api::Token) -> String {
    signer.sign(&Claims { sub: tenant, jti: token.id, iat: Utc::now().timestamp(), exp: token.expires_at.timestamp() })
}

/// The authenticated caller, as its token's record says. Extracting it rejects missing, invalid, expired and revoked
/// tokens.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The caller's tenant.
    pub tenant: Uuid,
    /// The token in use.
    pub token_id: Uuid,
    /// Its scopes, from its record.
    pub scopes: Vec<Scope>,
    /// Its expiry.
    pub expires_at: DateTime<Utc>,
}

impl Auth {
    /// Fails unless the token holds `scope` (admin implies every scope).
    pub fn require(&self, scope: Scope) -> ApiResult<()> {
        if self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::InsufficientScope,
                format!("this operation needs the '{}' scope; the token has {:?}", scope.as_str(), self.scope_names()),
            ))
        }
    }

    fn scope_names(&self) -> Vec<&'static str> {
        self.scopes.iter().map(|s| s.as_str()).collect()
    }

    /// True with the admin scope.
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }
}

/// The bearer token of a request, if any.
pub(crate) fn bearer(req: &HttpRequest) -> ApiResult<&str> {
    let value = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::new(ErrorCode::MissingToken, "no bearer token: send 'Authorization: Bearer <token>'")
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    })?;
    let value = value.to_str().unwrap_or_default();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidToken, "the Authorization header must be 'Bearer <token>'")
            .with_header(header::WWW_AUTHENTICATE, "Bearer"));
    }
    Ok(token.trim())
}

/// Authenticates a bearer JWT completely: signature, then the record (known, same tenant, not revoked, not
/// expired). The one check behind the [`Auth`] extractor and idempotent replays.
pub(crate) async fn authenticate(state: &AppState, jwt: &str) -> ApiResult<Auth> {
    let claims = state.signer.verify(jwt)?;
    let Some(record) = state.store.token_status(claims.jti).await? else {
        return Err(ApiError::new(ErrorCode::InvalidToken, "the token is not known to this platform"));
    };
    if record.tenant_id != claims.sub {
        return Err(ApiError::new(ErrorCode::InvalidToken, "the token does not match its record"));
    }
    if record.revoked_at.is_some() {
        return Err(ApiError::new(ErrorCode::TokenRevoked, "the token has been revoked"));
    }
    if record.expires_at <= Utc::now() {
        return Err(ApiError::new(ErrorCode::TokenExpired, "the token has expired"));
    }
    Ok(Auth { tenant: record.tenant_id, token_id: claims.jti, scopes: record.scopes, expires_at: record.expires_at })
}

impl FromRequest for Auth {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let jwt = bearer(req).map(str::to_owned);
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::internal(&std::io::Error::other("AppState missing")))?;
            authenticate(&state, &jwt?).await
        })
    }
}
