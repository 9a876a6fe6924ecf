//! The one place where errors become HTTP: every failure is an [`ApiError`] with a stable [`ErrorCode`], rendered
//! as an RFC 9457 problem document. Internal causes are logged with their whole chain and never sent to clients.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use cloud_certs::upload::UploadError;
use cloud_domain::api::{ErrorCode, Problem};
use cloud_domain::domains::DomainError;
use cloud_domain::names::NameError;
use cloud_domain::ports::PortSpecError;
use cloud_domain::service::LimitsError;
use cloud_oci::OciError;
use cloud_store::{BundleError, StoreError};

/// A failed request: what the client is told, and (for server faults) what the log gets.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: ErrorCode,
    /// The message for the client.
    pub detail: String,
    /// Extra response headers (e.g. `Allow`, `WWW-Authenticate`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with the usual status of its code.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self { status: status_of(code), code, detail: detail.into(), headers: Vec::new() }
    }

    /// A server-side fault: the cause is logged, the client gets a generic message.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %chain(cause), "internal error");
        Self::new(ErrorCode::InternalError, "an internal error occurred; the server log has the details")
    }

    /// PostgreSQL did not answer (in time): the one answer of every request that needs it then, whatever the
    /// request, so clients see one code and one `Retry-After` for an outage.
    pub fn database_unavailable() -> Self {
        Self::new(ErrorCode::DatabaseUnavailable, "the database did not answer in time; retry shortly")
            .with_header(header::RETRY_AFTER, RETRY_AFTER_SECONDS)
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    /// The problem document.
    pub fn problem(&self) -> Problem {
        Problem {
            type_uri: format!("urn:cloud:error:{}", self.code.as_str()),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code,
        }
    }
}

/// What `Retry-After` says when the database did not answer: about the interval of the readiness probe that
/// notices it is back, so that a retry does not land before anyone could know.
const RETRY_AFTER_SECONDS: &str = "2";

/// The status each code is answered with.
pub fn status_of(code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match code {
        InvalidJson
        | InvalidQuery
        | InvalidRequest
        | InvalidName
        | ReservedName
        | InvalidDomain
        | TooManyDomains
        | InvalidPortSpec
        | InvalidCursor
        | InvalidImage
        | ImageDigestMismatch
        | InvalidImageReference
        | InvalidCertificate => StatusCode::BAD_REQUEST,
        MissingToken
        | InvalidToken
        | TokenExpired
        | TokenRevoked
        | JoinTokenInvalid
        | JoinTokenUsed
        | JoinTokenExpired
        | JoinTokenRevoked
        | JoinTokenTenantDeleted => StatusCode::UNAUTHORIZED,
        TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        // The platform's policy forbids the registry: no request changes that, only its configuration.
        InsufficientScope | QuotaExceeded | InsecureRegistry | RegistryNotAllowed | RegistryDenied => {
            StatusCode::FORBIDDEN
        }
        NotFound | RouteNotFound | ImageNotFound => StatusCode::NOT_FOUND,
        MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        AlreadyExists
        | DomainTaken
        | PortConflict
        | ServiceHasInstances
        | ImageInUse
        | InvalidStateTransition
        | IdempotencyKeyInProgress
        | TenantNotEmpty
        | LimitsConflict
        | NamesConflict
        | NodeUnavailable
        | RolloutInProgress => StatusCode::CONFLICT,
        PayloadTooLarge | ImageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        IdempotencyKeyReused
        | DomainNotVerified
        | CertificateKeyMismatch
        | CertificateChainInvalid
        | CertificateNameMismatch
        | ImagePlatform
        | UnsupportedImage => StatusCode::UNPROCESSABLE_ENTITY,
        // The registry the client named failed, not the client's request nor this server: a retry may succeed.
        RegistryUnavailable => StatusCode::FAILED_DEPENDENCY,
        CapacityExhausted | Unavailable | DatabaseUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The whole chain of an error, for logs.
pub use cloud_domain::error_chain as chain;

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.detail)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status);
        res.content_type("application/problem+json");
        for (name, value) in &self.headers {
            res.insert_header((name.clone(), value.clone()));
        }
        res.json(self.problem())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use ErrorCode as C;
        let detail = e.to_string();
        match e {
            StoreError::NotFound { .. } => Self::new(C::NotFound, detail),
            StoreError::AlreadyExists { .. } => Self::new(C::AlreadyExists, detail),
            StoreError::DomainTaken { .. } => Self::new(C::DomainTaken, detail),
            StoreError::ClaimExpired { .. } => Self::new(C::DomainNotVerified, detail),
            StoreError::PortTaken { .. } => Self::new(C::PortConflict, detail),
            StoreError::ServiceHasInstances { .. } => Self::new(C::ServiceHasInstances, detail),
            StoreError::ImageInUse { .. } => Self::new(C::ImageInUse, detail),
            StoreError::TenantNotEmpty { .. } => Self::new(C::TenantNotEmpty, detail),
            StoreError::QuotaExceeded { .. } => Self::new(C::QuotaExceeded, detail),
            StoreError::CapacityExhausted { .. } => Self::new(C::CapacityExhausted, detail),
            StoreError::State(_) => Self::new(C::InvalidStateTransition, detail),
            StoreError::NodeUnavailable { .. } => Self::new(C::NodeUnavailable, detail),
            StoreError::RolloutInProgress { .. } => Self::new(C::RolloutInProgress, detail),
            StoreError::NotRunning { .. } => Self::new(C::InvalidStateTransition, detail),
            StoreError::Invalid(_) => Self::new(C::InvalidRequest, detail),
            StoreError::Limits(e) => e.into(),
            StoreError::InvalidImage(_) => Self::new(C::InvalidImage, detail),
            StoreError::JoinRefused(refusal) => {
                use cloud_domain::join::JoinRefusal as R;
                let code = match refusal {
                    R::Unknown => C::JoinTokenInvalid,
                    R::Used(_) => C::JoinTokenUsed,
                    R::Expired(_) => C::JoinTokenExpired,
                    R::Revoked(_) => C::JoinTokenRevoked,
                    R::TenantDeleted(_) => C::JoinTokenTenantDeleted,
                    _ => C::JoinTokenInvalid,
                };
                Self::new(code, detail)
            }
            ref e if e.is_unavailable() => {
                tracing::warn!(error = %chain(e), "database unavailable");
                Self::database_unavailable()
            }
            other => Self::internal(&other),
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        let code = match e {
            NameError::Reserved { .. } => ErrorCode::ReservedName,
            NameError::Domain { .. } => ErrorCode::InvalidDomain,
            _ => ErrorCode::InvalidName,
        };
        Self::new(code, e.to_string())
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Name(e) => e.into(),
            DomainError::TooMany { .. } => Self::new(ErrorCode::TooManyDomains, e.to_string()),
            _ => Self::new(ErrorCode::InvalidDomain, e.to_string()),
        }
    }
}

impl From<LimitsError> for ApiError {
    fn from(e: LimitsError) -> Self {
        let code = match e {
            LimitsError::SoftAboveHard { .. } => ErrorCode::LimitsConflict,
            _ => ErrorCode::InvalidRequest,
        };
        Self::new(code, e.to_string())
    }
}

impl From<PortSpecError> for ApiError {
    fn from(e: PortSpecError) -> Self {
        // Each spec is valid (the document says which are); two of them claim one port.
        let code = match e {
            PortSpecError::Conflict { .. } => ErrorCode::PortConflict,
            _ => ErrorCode::InvalidPortSpec,
        };
        Self::new(code, e.to_string())
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        let code = match &e {
            UploadError::KeyMismatch => ErrorCode::CertificateKeyMismatch,
            UploadError::NotCurrent { .. } | UploadError::ChainBroken { .. } => ErrorCode::CertificateChainInvalid,
            UploadError::NameMismatch { .. } => ErrorCode::CertificateNameMismatch,
            _ => ErrorCode::InvalidCertificate,
        };
        Self::new(code, e.to_string())
    }
}

impl From<BundleError> for ApiError {
    fn from(e: BundleError) -> Self {
        let code = match e {
            BundleError::TooLarge => ErrorCode::ImageTooLarge,
            _ => ErrorCode::InvalidImage,
        };
        Self::new(code, e.to_string())
    }
}

impl From<OciError> for ApiError {
    fn from(e: OciError) -> Self {
        use ErrorCode as C;
        let code = match &e {
            OciError::Corrupt { .. } | OciError::Missing { .. } | OciError::Unsafe { .. } => C::InvalidImage,
            OciError::DigestMismatch { .. } => C::ImageDigestMismatch,
            OciError::Platform { .. } => C::ImagePlatform,
            OciError::TooLarge { .. } => C::ImageTooLarge,
            OciError::Unsupported { .. } => C::UnsupportedImage,
            OciError::Reference { .. } => C::InvalidImageReference,
            OciError::InsecureRegistry { .. } => C::InsecureRegistry,
            OciError::RegistryNotAllowed { .. } => C::RegistryNotAllowed,
            OciError::RegistryDenied { .. } => C::RegistryDenied,
            OciError::NotFound { .. } => C::ImageNotFound,
            OciError::RegistryUnavailable { .. } => {
                tracing::warn!(error = %chain(&e), "registry unavailable");
                C::RegistryUnavailable
            }
            _ => return Self::internal(&e),
        };
        Self::new(code, e.to_string())
    }
}

/// Handlers' result type.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use cloud_domain::domains::resolve_domains;
    use cloud_domain::names::{NameKind, validate_name};
    use cloud_domain::service::check_limits;
    use cloud_store::Settings;

    use super::*;

    fn answer(e: impl Into<ApiError>) -> (u16, ErrorCode) {
        let e = e.into();
        (e.status.as_u16(), e.code)
    }

    #[test]
    fn domain_errors_map_by_variant() {
        let s = Settings::default();
        let domains = |inputs: &[&str]| {
            let inputs: Vec<String> = inputs.iter().map(|i| i.to_string()).collect();
            resolve_domains(&inputs, &s.zone(), &s.base_domain)
        };
        for bad in [
            "a.b.dev.cloud.localhost.",
            "dev.cloud.localhost.",
            "prod.cloud.localhost.",
            "*.cloud.localhost.",
            "cloud.localhost.",
            "www.example.com",
            "Shop",
            "-x.",
        ] {
            assert_eq!(answer(domains(&[bad]).unwrap_err()), (400, ErrorCode::InvalidDomain), "{bad}");
        }
        assert_eq!(answer(domains(&["www.dev.cloud.localhost."]).unwrap_err()), (400, ErrorCode::ReservedName));
        let many: Vec<String> = (0..51).map(|i| format!("d{i}.example.com.")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(answer(domains(&many).unwrap_err()), (400, ErrorCode::TooManyDomains));

        assert_eq!(answer(validate_name(NameKind::Service, "internal").unwrap_err()), (400, ErrorCode::ReservedName));
        assert_eq!(answer(validate_name(NameKind::Service, "Shop").unwrap_err()), (400, ErrorCode::InvalidName));

        let limits = ApiError::from(check_limits(Some(6), Some(5)).unwrap_err());
        assert_eq!((limits.status.as_u16(), limits.code), (409, ErrorCode::LimitsConflict));
        assert_eq!(limits.detail, "soft_limit 6 must not exceed hard_limit 5");
        let stored = ApiError::from(StoreError::from(check_limits(Some(6), Some(5)).unwrap_err()));
        assert_eq!((stored.code, stored.detail), (limits.code, limits.detail));
    }
}
