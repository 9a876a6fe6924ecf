//! Bearer JWT authentication. A token is a signed claim set (tenant, scopes, expiry, id); its database record
//! makes it revocable. Every request checks the signature, then the record.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use chrono::{DateTime, Duration, Utc};
use cloud_domain::api::{CreatedToken, ErrorCode, Scope};
use cloud_store::Store;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// The claims inside our JWTs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Tenant id.
    pub sub: Uuid,
    /// Token id; the key of its database record.
    pub jti: Uuid,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
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

/// Name of the signing key in `platform_secrets`.
const SIGNING_KEY: &str = "jwt-hs256";

impl TokenSigner {
    /// A signer over a secret key.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub", "jti"]);
        Self { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation }
    }

    /// The signer over the platform's key, creating the key on first use.
    pub async fn from_store(store: &Store) -> Result<Self, cloud_store::StoreError> {
        Ok(Self::new(&store.platform_secret(SIGNING_KEY, 32).await?))
    }

    /// Signs claims.
    pub fn sign(&self, claims: &Claims) -> String {
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
    let jwt = signer.sign(&Claims {
        sub: tenant,
        jti: token.id,
        scopes: token.scopes.clone(),
        iat: now.timestamp(),
        exp: expires_at.timestamp(),
    });
    Ok(CreatedToken { token, jwt })
}

/// The authenticated caller. Extracting it rejects missing, invalid, expired and revoked tokens.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The caller's tenant.
    pub tenant: Uuid,
    /// The token in use.
    pub token_id: Uuid,
    /// Its scopes.
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

impl FromRequest for Auth {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let claims = bearer(req).and_then(|jwt| match &state {
            Some(s) => s.signer.verify(jwt),
            None => Err(ApiError::internal(&std::io::Error::other("AppState missing"))),
        });
        Box::pin(async move {
            let claims = claims?;
            let state = state.expect("checked above");
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
            Ok(Auth { tenant: claims.sub, token_id: claims.jti, scopes: claims.scopes, expires_at: record.expires_at })
        })
    }
}
