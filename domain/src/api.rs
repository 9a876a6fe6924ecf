//! The public API's request and response types, shared by the server and `cloudctl` so they cannot disagree.
//!
//! Field names follow the anchors where one exists (Unikraft Cloud's `port`, `destination_port`, `handlers`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::int;
use crate::ports::{PortMapping, PortSpec};
use crate::service;
use crate::state::{DesiredState, InstanceState, RestartPolicy, RolloutState, RolloutStrategy};

/// Stable, machine-readable error codes carried in every problem document's `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body is not valid JSON, has a wrong type, a missing or an unknown field.
    InvalidJson,
    /// A query parameter is malformed or out of range.
    InvalidQuery,
    /// A request value breaks a rule not covered by a more specific code.
    InvalidRequest,
    /// A resource name is not a valid DNS label.
    InvalidName,
    /// A resource name is reserved by the platform.
    ReservedName,
    /// A domain is not a valid domain name, or a custom domain lies inside the platform's own domain.
    InvalidDomain,
    /// A port spec does not parse or breaks a port rule.
    InvalidPortSpec,
    /// The raw TCP public port asked for belongs to another service, or two specs of one request claim one public
    /// port.
    PortConflict,
    /// A pagination cursor was not issued by this API.
    InvalidCursor,
    /// The request body exceeds the size limit.
    PayloadTooLarge,
    /// The request body has a content type this endpoint does not accept.
    UnsupportedMediaType,
    /// An image (uploaded or pulled) is malformed, truncated, incomplete, names no program to run, or holds an
    /// entry images may not carry.
    InvalidImage,
    /// A blob of the image does not have the digest it is referred to by.
    ImageDigestMismatch,
    /// The image is built for another OS or architecture than the platform runs.
    ImagePlatform,
    /// The image exceeds a limit: stored or unpacked size, entries, layers.
    ImageTooLarge,
    /// The image uses something the platform does not run: a media type, a foreign layer, a hash algorithm, an
    /// archive of several images.
    UnsupportedImage,
    /// An image reference does not parse as `[host[:port]/]repository[:tag][@sha256:...]`.
    InvalidImageReference,
    /// The registry speaks plain http and is not among the platform's insecure registries.
    InsecureRegistry,
    /// The registry is on a loopback, private or link-local address the platform is not configured to reach.
    RegistryNotAllowed,
    /// The registry refused access to the image (it answered 401 or 403 to an anonymous pull).
    RegistryDenied,
    /// The registry has no such repository, tag or digest.
    ImageNotFound,
    /// The registry could not be reached, or answered with an error or something unusable; a retry may succeed.
    RegistryUnavailable,
    /// No bearer token was sent.
    MissingToken,
    /// The bearer token is malformed or its signature does not verify.
    InvalidToken,
    /// The bearer token has expired.
    TokenExpired,
    /// The bearer token was revoked.
    TokenRevoked,
    /// The token lacks the scope this operation needs.
    InsufficientScope,
    /// The resource does not exist, or belongs to another tenant.
    NotFound,
    /// No route matches the request path.
    RouteNotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// A resource with this name already exists.
    AlreadyExists,
    /// A service's soft limit would exceed its hard limit, both given or one against the one it has. Each is
    /// valid alone (the document says which are): together they conflict.
    LimitsConflict,
    /// A pull names its image twice, in the query (`?name=`) and in the body, differently.
    NamesConflict,
    /// The domain is already attached to another service, or verified by another tenant.
    DomainTaken,
    /// A service lists more domains than one service may have.
    TooManyDomains,
    /// A persistent service still has instances; delete them first or force.
    ServiceHasInstances,
    /// The image is used by instances.
    ImageInUse,
    /// The instance cannot make this state change from its current state.
    InvalidStateTransition,
    /// The tenant's quota does not allow this.
    QuotaExceeded,
    /// The Idempotency-Key was used before with a different request.
    IdempotencyKeyReused,
    /// A request with this Idempotency-Key is still being processed.
    IdempotencyKeyInProgress,
    /// The platform ran out of a shared resource (tenant networks, private IPs, TCP ports).
    CapacityExhausted,
    /// The tenant still owns services, instances or images.
    TenantNotEmpty,
    /// A custom domain's ownership record (TXT `_cloud-challenge.<domain>`) is missing or holds another value.
    DomainNotVerified,
    /// An uploaded certificate or key is not PEM of the expected kind.
    InvalidCertificate,
    /// An uploaded key is not the certificate's.
    CertificateKeyMismatch,
    /// An uploaded chain is expired, not yet valid, or not signed in order.
    CertificateChainInvalid,
    /// An uploaded certificate's names do not cover the domain.
    CertificateNameMismatch,
    /// A join token's secret is not one this platform issued (mistyped, forged, or from another platform).
    JoinTokenInvalid,
    /// The join token was exchanged already: each works once.
    JoinTokenUsed,
    /// The join token's time ran out before it was used.
    JoinTokenExpired,
    /// The join token was revoked before it was used.
    JoinTokenRevoked,
    /// The join token's tenant was deleted.
    JoinTokenTenantDeleted,
    /// Too many requests from this source; the response says when to retry (`Retry-After`).
    TooManyRequests,
    /// The node an instance should move to is down or lacks the memory for it.
    NodeUnavailable,
    /// The service already has a rollout under way: wait for it to end.
    RolloutInProgress,
    /// The service is temporarily unavailable (e.g. the database is unreachable).
    Unavailable,
    /// PostgreSQL did not answer within the API's bound; the response says when to retry (`Retry-After`).
    DatabaseUnavailable,
    /// An unexpected server error; the server log has details.
    InternalError,
}

impl ErrorCode {
    /// The snake_case spelling used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidQuery => "invalid_query",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidName => "invalid_name",
            Self::ReservedName => "reserved_name",
            Self::InvalidDomain => "invalid_domain",
            Self::InvalidPortSpec => "invalid_port_spec",
            Self::PortConflict => "port_conflict",
            Self::InvalidCursor => "invalid_cursor",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidImage => "invalid_image",
            Self::ImageDigestMismatch => "image_digest_mismatch",
            Self::ImagePlatform => "image_platform",
            Self::ImageTooLarge => "image_too_large",
            Self::UnsupportedImage => "unsupported_image",
            Self::InvalidImageReference => "invalid_image_reference",
            Self::InsecureRegistry => "insecure_registry",
            Self::RegistryNotAllowed => "registry_not_allowed",
            Self::RegistryDenied => "registry_denied",
            Self::ImageNotFound => "image_not_found",
            Self::RegistryUnavailable => "registry_unavailable",
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::TokenExpired => "token_expired",
            Self::TokenRevoked => "token_revoked",
            Self::InsufficientScope => "insufficient_scope",
            Self::NotFound => "not_found",
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::AlreadyExists => "already_exists",
            Self::LimitsConflict => "limits_conflict",
            Self::NamesConflict => "names_conflict",
            Self::DomainTaken => "domain_taken",
            Self::TooManyDomains => "too_many_domains",
            Self::ServiceHasInstances => "service_has_instances",
            Self::ImageInUse => "image_in_use",
            Self::InvalidStateTransition => "invalid_state_transition",
            Self::QuotaExceeded => "quota_exceeded",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyKeyInProgress => "idempotency_key_in_progress",
            Self::CapacityExhausted => "capacity_exhausted",
            Self::TenantNotEmpty => "tenant_not_empty",
            Self::DomainNotVerified => "domain_not_verified",
            Self::InvalidCertificate => "invalid_certificate",
            Self::CertificateKeyMismatch => "certificate_key_mismatch",
            Self::CertificateChainInvalid => "certificate_chain_invalid",
            Self::CertificateNameMismatch => "certificate_name_mismatch",
            Self::JoinTokenInvalid => "join_token_invalid",
            Self::JoinTokenUsed => "join_token_used",
            Self::JoinTokenExpired => "join_token_expired",
            Self::JoinTokenRevoked => "join_token_revoked",
            Self::JoinTokenTenantDeleted => "join_token_tenant_deleted",
            Self::TooManyRequests => "too_many_requests",
            Self::NodeUnavailable => "node_unavailable",
            Self::RolloutInProgress => "rollout_in_progress",
            Self::Unavailable => "unavailable",
            Self::DatabaseUnavailable => "database_unavailable",
            Self::InternalError => "internal_error",
        }
    }
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type: `urn:cloud:error:<code>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// What went wrong with this request, naming the offending value.
    pub detail: String,
    /// The stable error code.
    pub code: ErrorCode,
}

/// A token scope. `read` lists and gets, `write` creates and changes, `admin` manages tenants and quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// List and get resources.
    Read,
    /// Create, change and delete resources.
    Write,
    /// Manage tenants, quotas and other tenants' tokens.
    Admin,
}

impl Scope {
    /// The lowercase spelling used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// A page of a list, in a stable order. Pass `next_cursor` as `cursor` to get the next page.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Absent on the last page.
    pub next_cursor: Option<String>,
}

/// A tenant's limits. Counts go to 2147483647 (a PostgreSQL `integer`), memory to 2^53 - 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Quotas {
    /// Services the tenant may have at once.
    #[schema(maximum = 2147483647)]
    pub max_services: u32,
    /// Instances the tenant may have at once.
    #[schema(maximum = 2147483647)]
    pub max_instances: u32,
    /// Sum of the memory of all the tenant's instances, in MiB.
    #[schema(maximum = 9007199254740991_u64)]
    pub max_memory_mb: u64,
    /// Images the tenant may have uploaded at once.
    #[schema(maximum = 2147483647)]
    pub max_images: u32,
    /// Extra names (custom domains and platform subdomains) over all the tenant's services at once; expired
    /// claims do not count.
    #[schema(maximum = 2147483647)]
    pub max_domains: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self { max_services: 100, max_instances: 200, max_memory_mb: 64 * 1024, max_images: 100, max_domains: 100 }
    }
}

/// A change to some quotas; absent fields stay as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotasPatch {
    /// Services the tenant may have at once.
    #[serde(default, deserialize_with = "int::optional::<_, _, 0, { int::MAX_I32 }>")]
    #[schema(maximum = 2147483647)]
    pub max_services: Option<u32>,
    /// Instances the tenant may have at once.
    #[serde(default, deserialize_with = "int::optional::<_, _, 0, { int::MAX_I32 }>")]
    #[schema(maximum = 2147483647)]
    pub max_instances: Option<u32>,
    /// Sum of the memory of all the tenant's instances, in MiB.
    #[serde(default, deserialize_with = "int::optional::<_, _, 0, { int::MAX_SAFE }>")]
    #[schema(maximum = 9007199254740991_u64)]
    pub max_memory_mb: Option<u64>,
    /// Images the tenant may have uploaded at once.
    #[serde(default, deserialize_with = "int::optional::<_, _, 0, { int::MAX_I32 }>")]
    #[schema(maximum = 2147483647)]
    pub max_images: Option<u32>,
    /// Extra names (custom domains and platform subdomains) over all the tenant's services at once.
    #[serde(default, deserialize_with = "int::optional::<_, _, 0, { int::MAX_I32 }>")]
    #[schema(maximum = 2147483647)]
    pub max_domains: Option<u32>,
}

impl QuotasPatch {
    /// The quotas after this change.
    pub fn apply(self, q: Quotas) -> Quotas {
        Quotas {
            max_services: self.max_services.unwrap_or(q.max_services),
            max_instances: self.max_instances.unwrap_or(q.max_instances),
            max_memory_mb: self.max_memory_mb.unwrap_or(q.max_memory_mb),
            max_images: self.max_images.unwrap_or(q.max_images),
            max_domains: self.max_domains.unwrap_or(q.max_domains),
        }
    }
}

/// What a tenant currently uses, against its quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Services now.
    pub services: u32,
    /// Instances now.
    pub instances: u32,
    /// Memory of all instances, in MiB.
    pub memory_mb: u64,
    /// Uploaded images now.
    pub images: u32,
    /// Extra names of the tenant's services now (expired claims excluded).
    pub domains: u32,
}

/// A tenant: an isolated owner of services, instances, images and a private network.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    /// Unique id.
    pub id: Uuid,
    /// Unique name, a DNS label (used in `<instance>.<tenant>.internal`).
    pub name: String,
    /// The tenant's private network; instances get addresses from it.
    #[schema(value_type = String, example = "10.96.0.0/22")]
    pub network: String,
    /// Limits.
    pub quotas: Quotas,
    /// Current use.
    pub usage: Usage,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Create a tenant (admin).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// Unique name, a DNS label.
    pub name: String,
    /// Quotas; defaults apply for absent fields.
    #[serde(default)]
    pub quotas: QuotasPatch,
}

/// Change a tenant (admin).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    /// New quotas; absent fields stay as they are.
    #[serde(default)]
    pub quotas: QuotasPatch,
}

/// An API token. The secret JWT is shown once, at creation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Token {
    /// Token id (the JWT's `jti`).
    pub id: Uuid,
    /// Owning tenant's name.
    pub tenant: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Free text to recognise the token.
    pub description: String,
    /// Expiry.
    pub expires_at: DateTime<Utc>,
    /// Set once revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Create a token for the caller's tenant, or (admin) for another tenant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Tenant name or id; only admins may name another tenant. Default: the caller's tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Scopes, at least one; only scopes the caller holds may be granted. Default: read and write.
    #[serde(default)]
    #[schema(min_items = 1)]
    pub scopes: Option<Vec<Scope>>,
    /// Lifetime in seconds (60 s to 10 years). Default: 30 days.
    #[serde(default, deserialize_with = "int::optional::<_, _, 60, 315_360_000>")]
    #[schema(minimum = 60, maximum = 315360000)]
    pub expires_in_seconds: Option<u64>,
    /// Free text to recognise the token, at most 256 characters.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub description: String,
}

/// A newly created token with its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The token's record.
    #[serde(flatten)]
    pub token: Token,
    /// The bearer JWT. It is not stored and cannot be shown again.
    pub jwt: String,
}

/// Create a one-time join token: a secret that `cloudctl remote add NAME TOKEN` exchanges once for an API token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// Tenant name or id of the token it yields; only admins may name another tenant. Default: the caller's.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Scopes of the token it yields, at least one, only ones the caller holds. Default: read and write.
    #[serde(default)]
    #[schema(min_items = 1)]
    pub scopes: Option<Vec<Scope>>,
    /// Seconds the join token may wait to be used (60 s to 30 days). Default: 1 hour.
    #[serde(default, deserialize_with = "int::optional::<_, _, 60, 2_592_000>")]
    #[schema(minimum = 60, maximum = 2592000)]
    pub expires_in_seconds: Option<u64>,
    /// Lifetime in seconds of the token it yields (60 s to 10 years). Default: 30 days.
    #[serde(default, deserialize_with = "int::optional::<_, _, 60, 315_360_000>")]
    #[schema(minimum = 60, maximum = 315360000)]
    pub token_expires_in_seconds: Option<u64>,
    /// Free text to recognise it (and the token it yields), at most 256 characters.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub description: String,
}

/// Where a join token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JoinTokenState {
    /// Waiting to be used.
    Pending,
    /// Exchanged for a token.
    Used,
    /// Revoked before use.
    Revoked,
    /// Not used in time.
    Expired,
}

/// A join token's record (its secret is never stored, only a hash of it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenInfo {
    /// Id, for revoking it.
    pub id: Uuid,
    /// Tenant of the token it yields.
    pub tenant: String,
    /// Scopes of the token it yields.
    pub scopes: Vec<Scope>,
    /// Free text.
    pub description: String,
    /// Where it stands.
    pub state: JoinTokenState,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it stops working if unused.
    pub expires_at: DateTime<Utc>,
    /// When it was exchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<DateTime<Utc>>,
    /// The token it was exchanged for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<Uuid>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new join token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedJoinToken {
    /// Its record.
    #[serde(flatten)]
    pub info: JoinTokenInfo,
    /// The join token to hand over: base64url of the API's URLs, the certificate to pin, the one-time secret and
    /// the expiry. It is not stored and cannot be shown again.
    pub join_token: String,
}

/// Exchange a join token's secret for an API token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The secret from the join token.
    #[schema(min_length = 1, max_length = 256)]
    pub secret: String,
}

/// Move an instance to another node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveInstance {
    /// The node's name (as instances show it in `node`).
    #[schema(min_length = 1, max_length = 253)]
    pub node: String,
}

/// Set a secret: an environment variable of the tenant's instances (or of one service's) whose value is sealed at
/// rest and never shown again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// The value, at most 65536 characters (64 KiB of ASCII), without NUL (an environment cannot hold one).
    #[schema(max_length = 65536, pattern = "^[^\\x00]*$")]
    pub value: String,
    /// Only for this service's instances (name or id); default: every instance of the tenant.
    #[serde(default)]
    pub service: Option<String>,
    /// Give it as the file `/run/secrets/<name>` (read-only, readable by the instance's user alone, in memory)
    /// instead of an environment variable.
    #[serde(default)]
    pub file: bool,
}

/// A secret as it is shown: its name and version, never its value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Secret {
    /// The environment variable's name.
    pub name: String,
    /// The service it is for; none: every instance of the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// 1 when set first, one more at each change.
    pub version: i32,
    /// Given as the file `/run/secrets/<name>` rather than an environment variable.
    pub file: bool,
    /// When it was first set.
    pub created_at: DateTime<Utc>,
    /// When it was last set.
    pub updated_at: DateTime<Utc>,
}

/// Who the caller is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The caller's tenant.
    pub tenant: Tenant,
    /// The token in use.
    pub token_id: Uuid,
    /// Its scopes.
    pub scopes: Vec<Scope>,
    /// Its expiry.
    pub expires_at: DateTime<Utc>,
}

/// A port in a request: a spec string such as `"443:8080"` or `"8443:8080/tls"`, or an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PortInput {
    /// The string grammar `PUBLIC[:DEST][/HANDLER[+HANDLER]]`.
    Spec(String),
    /// The structured form.
    Object(PortSpec),
}

impl<'de> Deserialize<'de> for PortInput {
    // Untagged enums lose the inner error ("did not match any variant"): dispatch by JSON type instead, so an
    // unknown field or a bad number in the object form is named, with its path.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl<'de> serde::de::Visitor<'de> for PortVisitor {
            type Value = PortInput;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a port spec string such as \"443:8080\" or an object {\"port\", \"destination_port\", \"handlers\"}",
                )
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortInput, E> {
                Ok(PortInput::Spec(s.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<PortInput, A::Error> {
                PortSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(PortInput::Object)
            }
        }
        d.deserialize_any(PortVisitor)
    }
}

/// A domain name attached to a service.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Domain {
    /// The fully qualified name, without trailing dot.
    pub name: String,
    /// True for a domain outside the platform's zone, which needs an ownership check.
    pub custom: bool,
    /// True once the platform may route it (always true for platform subdomains).
    pub verified: bool,
    /// Where the domain stands; only `verified` is routed.
    pub state: DomainState,
    /// For an unverified custom domain: when the claim lapses unless verified before.
    pub expires_at: Option<DateTime<Utc>>,
    /// For a pending custom domain: the DNS records to create.
    pub verification: Option<DomainVerification>,
}

/// Where a service's domain stands. An unverified claim holds nothing: several tenants may claim one name, and
/// the first to prove ownership gets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// Routed: a platform subdomain, or a custom domain whose ownership was proven by this tenant.
    Verified,
    /// A custom domain waiting for its TXT record, checked until `expires_at`.
    Pending,
    /// Another tenant proved ownership of this name first: this claim is neither routed nor checked. It becomes
    /// pending again if that tenant lets the name go before `expires_at`.
    Taken,
    /// Not verified before `expires_at`: no longer checked, and removed shortly. Listing the domain again
    /// claims it anew, with a new token.
    Expired,
}

/// The DNS records that prove ownership of a custom domain and route it to the platform.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DomainVerification {
    /// Name of the TXT record to create.
    pub txt_name: String,
    /// Value of the TXT record.
    pub txt_value: String,
    /// The CNAME target to route the domain (or use A/AAAA records to the edge addresses for an apex).
    pub cname_target: String,
}

/// A brief view of an instance inside a service.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceSummary {
    /// Instance id.
    pub id: Uuid,
    /// Instance name.
    pub name: String,
    /// Observed state.
    pub state: InstanceState,
    /// Private IP.
    #[schema(value_type = String)]
    pub private_ip: IpAddr,
}

/// A service: a public name with port mappings, load-balancing over its instances.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Service {
    /// Unique id.
    pub id: Uuid,
    /// Name, unique per tenant.
    pub name: String,
    /// Generated public FQDN, globally unique.
    pub fqdn: String,
    /// Expanded port mappings.
    pub ports: Vec<PortMapping>,
    /// In-flight requests (http) or connections (tcp) per instance above which others are preferred.
    pub soft_limit: Option<u32>,
    /// In-flight requests or connections per instance above which requests are refused (503).
    pub hard_limit: Option<u32>,
    /// Seconds without a request after which the service's instances are stopped; the edge starts them again
    /// on the next request, which waits meanwhile. Absent: instances run until stopped.
    pub scale_to_zero_after: Option<u32>,
    /// False for services created by `deploy -p`, deleted with their last instance.
    pub persistent: bool,
    /// Extra names routed to this service.
    pub domains: Vec<Domain>,
    /// How the platform adds and removes instances on load; absent: it does not.
    pub autoscale: Option<Autoscale>,
    /// The service's instances.
    pub instances: Vec<InstanceSummary>,
    /// Private name `<service>.internal`.
    pub private_fqdn: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Create a service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    /// Name; a generated `<adjective>-<noun>` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Port specs, e.g. `["443:8080"]`.
    #[serde(default)]
    pub ports: Vec<PortInput>,
    /// Soft limit per instance.
    #[serde(default, deserialize_with = "int::optional::<_, _, 1, { int::MAX_I32 }>")]
    #[schema(minimum = 1, maximum = 2147483647)]
    pub soft_limit: Option<u32>,
    /// Hard limit per instance.
    #[serde(default, deserialize_with = "int::optional::<_, _, 1, { int::MAX_I32 }>")]
    #[schema(minimum = 1, maximum = 2147483647)]
    pub hard_limit: Option<u32>,
    /// Scale to zero after this many idle seconds (1 to 604800, a week).
    #[serde(default, deserialize_with = "int::optional::<_, _, 1, { service::MAX_SCALE_TO_ZERO_SECS }>")]
    #[schema(minimum = 1, maximum = 604800)]
    pub scale_to_zero_after: Option<u32>,
    /// Extra names: `name` for `name.<region>.<base_domain>`, or a fully qualified custom domain with a
    /// trailing dot (`www.example.com.`, `*.example.com.`) outside the platform's base domain. At most 50 per
    /// service, within the tenant's `max_domains`.
    #[serde(default)]
    pub domains: Vec<String>,
}

/// Change a service; absent fields stay as they are, `null` clears a limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateService {
    /// Replaces all port mappings.
    #[serde(default)]
    pub ports: Option<Vec<PortInput>>,
    /// New soft limit, or `null` to remove it.
    #[serde(default, deserialize_with = "int::clearable::<_, _, 1, { int::MAX_I32 }>")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 2147483647)]
    pub soft_limit: Option<Option<u32>>,
    /// New hard limit, or `null` to remove it.
    #[serde(default, deserialize_with = "int::clearable::<_, _, 1, { int::MAX_I32 }>")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 2147483647)]
    pub hard_limit: Option<Option<u32>>,
    /// New scale-to-zero idle time (1 to 604800 seconds), or `null` to keep instances running.
    #[serde(default, deserialize_with = "int::clearable::<_, _, 1, { service::MAX_SCALE_TO_ZERO_SECS }>")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 604800)]
    pub scale_to_zero_after: Option<Option<u32>>,
    /// Replaces all extra names (same forms and limits as at creation). A domain listed again keeps its
    /// verification and token; an expired claim listed again is claimed anew.
    #[serde(default)]
    pub domains: Option<Vec<String>>,
}

/// A service's autoscale policy: between `min` and `max` instances, aiming at `target_in_flight` requests (or
/// connections) in flight per instance, as the edges count them. Instances are added as soon as the load stays
/// above the target, and drained away one cooldown after the last change once it stays below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    /// Fewest instances (0 to 64); with 0 and `scale_to_zero_after`, the last instance still stops when idle.
    #[serde(deserialize_with = "int::exact::<_, _, 0, 64>")]
    #[schema(minimum = 0, maximum = 64)]
    pub min: u32,
    /// Most instances (1 to 64, at least `min`).
    #[serde(deserialize_with = "int::exact::<_, _, 1, 64>")]
    #[schema(minimum = 1, maximum = 64)]
    pub max: u32,
    /// Requests in flight per instance to aim at (1 to 100000).
    #[serde(deserialize_with = "int::exact::<_, _, 1, 100_000>")]
    #[schema(minimum = 1, maximum = 100000)]
    pub target_in_flight: u32,
    /// Seconds after a change before instances are removed (0 to 86400, default 30).
    #[serde(default = "default_cooldown", deserialize_with = "int::exact::<_, _, 0, 86_400>")]
    #[schema(minimum = 0, maximum = 86400)]
    pub cooldown_seconds: u32,
}

fn default_cooldown() -> u32 {
    30
}

/// Start a rollout: new instances for a service, each running before an old one drains.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// Image name or id of the new instances; absent: the image the service's newest instance runs (a rolling
    /// restart, e.g. after a secret changed).
    #[serde(default)]
    pub image: Option<String>,
    /// What happens to the old instances (default `replace`).
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// How many new instances (1 to 64); default: as many as the service runs now, at least 1.
    #[serde(default, deserialize_with = "int::optional::<_, _, 1, 64>")]
    #[schema(minimum = 1, maximum = 64)]
    pub replicas: Option<u32>,
    /// New instances started ahead of the old ones' removal (1 to 64, default 1).
    #[serde(default, deserialize_with = "int::optional::<_, _, 1, 64>")]
    #[schema(minimum = 1, maximum = 64)]
    pub max_surge: Option<u32>,
    /// Seconds a new instance gets to run and listen before the rollout fails (1 to 3600, default 120).
    #[serde(default, deserialize_with = "int::optional::<_, _, 1, 3600>")]
    #[schema(minimum = 1, maximum = 3600)]
    pub ready_timeout_seconds: Option<u32>,
    /// Environment of the new instances; absent: that of the service's newest instance.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Arguments of the new instances; absent: those of the service's newest instance.
    #[serde(default)]
    pub args: Option<Vec<String>>,
}

/// A rollout and how far it got.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    /// Unique id.
    pub id: Uuid,
    /// The service rolled out.
    pub service: String,
    /// Image of the new instances.
    pub image: String,
    /// Its digest.
    pub image_digest: String,
    /// What happens to the old instances.
    pub strategy: RolloutStrategy,
    /// Where it is.
    pub state: RolloutState,
    /// Why it failed or was cancelled; for a running one, what it waits for.
    pub state_reason: Option<String>,
    /// New instances wanted.
    pub replicas: u32,
    /// New instances started ahead of the old ones' removal.
    pub max_surge: u32,
    /// Seconds a new instance gets to become ready.
    pub ready_timeout_seconds: u32,
    /// The instances it replaces, as they are now (gone ones are left out).
    pub old_instances: Vec<InstanceSummary>,
    /// The instances it made, as they are now.
    pub new_instances: Vec<InstanceSummary>,
    /// Old instances still to drain or stop.
    pub old_remaining: u32,
    /// New instances running.
    pub new_ready: u32,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// The service an instance belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceRef {
    /// Service id.
    pub id: Uuid,
    /// Service name.
    pub name: String,
    /// Service FQDN.
    pub fqdn: String,
}

/// An instance: one running copy of an image with a private IP.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    /// Unique id.
    pub id: Uuid,
    /// Name, unique per tenant.
    pub name: String,
    /// Image name.
    pub image: String,
    /// Image digest.
    pub image_digest: String,
    /// The service it serves, if any.
    pub service: Option<ServiceRef>,
    /// What the tenant asked for.
    pub desired_state: DesiredState,
    /// What the platform observes.
    pub state: InstanceState,
    /// Why it is in this state (failures, restarts).
    pub state_reason: Option<String>,
    /// Private IP in the tenant's network.
    #[schema(value_type = String)]
    pub private_ip: IpAddr,
    /// `<instance>.internal`, resolvable from the tenant's own instances.
    pub private_fqdn: String,
    /// `<instance>.<tenant>.internal`.
    pub tenant_private_fqdn: String,
    /// Node running it, once scheduled.
    pub node: Option<String>,
    /// The port it listens on (given to it as `PORT`): its image's unless it was created with another.
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// Arguments appended to the image's command.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Memory limit, MiB.
    pub memory_mb: u32,
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// Restarts so far.
    pub restart_count: u32,
    /// Exit code of the last run.
    pub exit_code: Option<i32>,
    /// Create-to-ready time of the last start, in microseconds.
    pub boot_time_us: Option<u64>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Last start.
    pub started_at: Option<DateTime<Utc>>,
    /// Last stop.
    pub stopped_at: Option<DateTime<Utc>>,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// Create instances.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    /// Image name or id.
    pub image: String,
    /// Name; `<image>-<5 random>` when absent. With replicas > 1 a given name gets `-1`, `-2`, ... suffixes.
    #[serde(default)]
    pub name: Option<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Arguments appended to the image's command.
    #[serde(default)]
    pub args: Vec<String>,
    /// Attach to this service (name or id).
    #[serde(default)]
    pub service: Option<String>,
    /// Create an ephemeral service with these ports, deleted with its last instance. Excludes `service`.
    #[serde(default)]
    pub ports: Option<Vec<PortInput>>,
    /// How many instances to create (1 to 64).
    #[serde(default = "one", deserialize_with = "int::exact::<_, _, 1, 64>")]
    #[schema(minimum = 1, maximum = 64)]
    pub replicas: u32,
    /// Restart policy.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Memory limit in MiB, 16 to 65536 (default 128).
    #[serde(default, deserialize_with = "int::optional::<_, _, 16, 65_536>")]
    #[schema(minimum = 16, maximum = 65536)]
    pub memory_mb: Option<u32>,
    /// The port the instances listen on (given to them as `PORT`, and where readiness is checked), 1 to 65535.
    /// Default: the image's (an OCI image's first exposed TCP port, else 8080; a bundle's manifest port).
    #[serde(default, deserialize_with = "int::optional::<_, _, 1, 65_535>")]
    #[schema(minimum = 1, maximum = 65535)]
    pub port: Option<u16>,
    /// Start at once (default true); false leaves the instances stopped.
    #[serde(default = "yes")]
    pub start: bool,
}

/// The result of creating instances.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedInstances {
    /// The new instances.
    pub instances: Vec<Instance>,
    /// Their service, when attached to one (including an auto-created ephemeral one).
    pub service: Option<Service>,
}

/// How an image is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// An OCI image (uploaded as an OCI or docker archive, or pulled from a registry).
    Oci,
    /// A directory bundle (tar.gz with `manifest.json`), run on the platform's minimal base.
    Bundle,
}

impl ImageFormat {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oci => "oci",
            Self::Bundle => "bundle",
        }
    }
}

/// An image: an OCI image or a directory bundle, content-addressed, with the command and port it runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Unique id.
    pub id: Uuid,
    /// Name, unique per tenant (built-in images are shared by all tenants).
    pub name: String,
    /// `sha256:<hex>`: of the manifest for an OCI image, of the archive for a bundle.
    pub digest: String,
    /// Bytes stored (an OCI image's compressed layers and config; a bundle's archive).
    pub size_bytes: u64,
    /// The command it runs (an OCI image's Entrypoint then Cmd).
    pub command: Vec<String>,
    /// The port it listens on (an OCI image's first exposed TCP port, else 8080).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// How it is stored.
    pub format: ImageFormat,
    /// Where it came from: `upload`, or the registry reference it was pulled from.
    pub source: String,
    /// True for the platform's built-in images.
    pub builtin: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Pull an image from an OCI registry (Docker Hub, GHCR, a self-hosted `registry`, ...) and store it under a name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// Image name; pulling to an existing name replaces its image.
    pub name: String,
    /// `[host[:port]/]repository[:tag][@sha256:<hex>]`, e.g. `127.0.0.1:5000/hello:v1` or `ghcr.io/org/app@sha256:...`;
    /// no host means Docker Hub, no tag `latest`.
    pub reference: String,
}

/// An uploaded image, as raw bytes: an OCI image layout in a tar (`skopeo copy ... oci-archive:`, `podman save
/// --format oci-archive`), a `docker save` archive, either plain or gzipped, or a directory bundle (a tar.gz with
/// `manifest.json` at its root). The content decides which.
#[derive(Debug, Clone, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ImageArchive(pub Vec<u8>);

/// A certificate the edge serves for one of the tenant's custom domains (its key is never returned).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Certificate {
    /// Unique id.
    pub id: Uuid,
    /// The domain it is served for.
    pub domain: String,
    /// The names the certificate carries.
    pub names: Vec<String>,
    /// `upload` or `acme`.
    pub source: String,
    /// `pending`, `valid` or `error`.
    pub state: String,
    /// Why it is in `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// Start of validity.
    pub not_before: Option<DateTime<Utc>>,
    /// End of validity.
    pub not_after: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A certificate and its key, uploaded for a verified custom domain of the tenant. It replaces the domain's
/// current certificate only once checked; until then the old one stays in service.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadCertificate {
    /// The custom domain (one of the tenant's services' verified domains).
    pub domain: String,
    /// PEM: the domain's certificate first, then its intermediates (the root may follow).
    pub chain_pem: String,
    /// PEM: the unencrypted PKCS#8 private key of the first certificate.
    pub key_pem: String,
}

/// The manifest inside an image bundle, as `manifest.json` at its root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    /// The command and its arguments, relative to the bundle's root or on the node's PATH.
    pub command: Vec<String>,
    /// The port the command listens on (also given to it as `PORT`).
    pub port: u16,
}

/// What kind of change an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventAction {
    /// The resource was created.
    Created,
    /// The resource changed.
    Updated,
    /// The resource was deleted.
    Deleted,
}

/// One committed change, as streamed by `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Position in the change feed; resume with `since=<version>`.
    pub version: i64,
    /// `tenant`, `token`, `join_token`, `service`, `instance`, `image`, `certificate` or `exec` (a command run in
    /// an instance: who ran what, for the audit).
    pub resource_type: String,
    /// The resource's id.
    pub resource_id: Uuid,
    /// What happened.
    pub action: EventAction,
    /// The resource after the change (before it, for deletions).
    pub resource: serde_json::Value,
    /// Commit time.
    pub created_at: DateTime<Utc>,
}

/// One line of an instance's output, as served by `GET /v1/instances/{instance}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// Position in the instance's log; pass it as `after` to continue.
    pub seq: i64,
    /// When the node read it.
    pub at: DateTime<Utc>,
    /// `stdout`, `stderr`, or `system` for the platform's own notes (starts, exits, failures).
    pub stream: String,
    /// The text, without its newline.
    pub line: String,
}
