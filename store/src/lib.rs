//! The platform's only state: PostgreSQL.
//!
//! This crate owns every SQL statement, the migrations and the change feed. Each public operation is one
//! transaction that either commits whole or leaves nothing behind, and appends its events to the change feed in
//! the same transaction. Invariants that races could break (unique names, disjoint networks, unique private IPs,
//! unique raw TCP ports) are database constraints; the code here turns their violations into [`StoreError`]s.
//!
//! Callers validate tenant input with `cloud-domain` first; the store trusts validated values and checks what
//! only the database can know (existence, uniqueness, quotas).

mod bundle;
mod certificates;
mod domains;
mod feed;
mod idempotency;
mod images;
mod instances;
mod nodes;
mod page;
mod routes;
mod services;
mod tenants;
mod tokens;
mod zone;

use std::ops::RangeInclusive;
use std::time::Duration;

use cloud_domain::state::StateError;
use ipnet::Ipv4Net;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use bundle::{BundleError, parse_bundle, special_file};
pub use certificates::{DueDomain, NewCertificate, ServedCertificate};
pub use domains::{PendingDomain, txt_name as ownership_txt_name, txt_value as ownership_txt_value};
pub use feed::{CHANGES_CHANNEL, ChangeFeed};
pub use idempotency::IdempotencyBegin;
pub use instances::NewInstances;
pub use nodes::{Assignment, LOG_BYTES_KEPT, LOG_LINES_KEPT, Observation};
pub use page::Cursor;
pub use routes::{RouteBackend, RouteChanges, RouteData, ServiceRoute};
pub use services::{NewService, ServiceChange};
pub use tokens::TokenStatus;
pub use zone::{ZoneChanges, ZoneData, ZoneDomain, ZoneInstance, ZonePatch, ZoneService, ZoneTenant};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Platform-wide settings the store needs to generate names and allocate resources.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Region label in service FQDNs.
    pub region: String,
    /// Base domain in service FQDNs.
    pub base_domain: String,
    /// The pool tenants' private networks are carved from.
    pub tenant_pool: Ipv4Net,
    /// Prefix length of each tenant's network.
    pub tenant_prefix: u8,
    /// Public ports raw TCP services are allocated from.
    pub tcp_ports: RangeInclusive<u16>,
    /// How long a deleted instance's private IP stays unallocated: longer than any edge or DNS cache may still
    /// route to it and than the node takes to tear the old sandbox down, so the address never reaches a newcomer
    /// while something still means the old instance.
    pub ip_hold: Duration,
    /// How long an unverified custom-domain claim lasts: long enough for an owner to publish a TXT record, short
    /// enough that an abandoned or squatting claim does not linger.
    pub domain_claim_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            region: "dev".into(),
            base_domain: "cloud.localhost".into(),
            tenant_pool: "10.96.0.0/12".parse().expect("valid literal"),
            tenant_prefix: 22,
            tcp_ports: 30000..=32767,
            ip_hold: Duration::from_secs(60),
            domain_claim_ttl: Duration::from_secs(7 * 86400),
        }
    }
}

impl Settings {
    /// The zone service FQDNs live in: `<region>.<base_domain>`.
    pub fn zone(&self) -> String {
        format!("{}.{}", self.region, self.base_domain)
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such resource for this tenant (another tenant's resources are not found either).
    #[error("{kind} \"{key}\" not found")]
    NotFound {
        /// Resource type, e.g. `service`.
        kind: &'static str,
        /// The name or id asked for.
        key: String,
    },
    /// The name is taken within the tenant (or platform-wide for tenants).
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists {
        /// Resource type.
        kind: &'static str,
        /// The taken name.
        name: String,
    },
    /// The domain is attached to another service, or verified by another tenant.
    #[error("domain \"{name}\" {why}")]
    DomainTaken {
        /// The domain.
        name: String,
        /// Who holds it, e.g. `is verified by another tenant`.
        why: &'static str,
    },
    /// An unverified custom-domain claim lapsed before it was verified.
    #[error(
        "the claim on domain \"{name}\" expired before it was verified; list it in the service's domains again for a new token"
    )]
    ClaimExpired {
        /// The domain.
        name: String,
    },
    /// The raw TCP public port belongs to another service.
    #[error("tcp port {port} is already used by another service")]
    PortTaken {
        /// The port.
        port: u16,
    },
    /// A persistent service still has instances.
    #[error("service \"{name}\" has {count} instance(s); delete them first or force the deletion")]
    ServiceHasInstances {
        /// Service name.
        name: String,
        /// How many.
        count: i64,
    },
    /// The image is referenced by instances.
    #[error("image \"{name}\" is used by {count} instance(s); delete them first")]
    ImageInUse {
        /// Image name.
        name: String,
        /// How many.
        count: i64,
    },
    /// The tenant still owns resources.
    #[error("tenant \"{name}\" still has {what}; delete them first")]
    TenantNotEmpty {
        /// Tenant name.
        name: String,
        /// What remains, e.g. `2 service(s)`.
        what: String,
    },
    /// A quota would be exceeded.
    #[error("quota exceeded: {detail}")]
    QuotaExceeded {
        /// Which quota, its limit and the current use.
        detail: String,
    },
    /// A platform-wide pool ran out.
    #[error("no {what} left")]
    CapacityExhausted {
        /// What ran out.
        what: &'static str,
    },
    /// An instance state change that its current state does not allow.
    #[error(transparent)]
    State(#[from] StateError),
    /// A request that is well-formed but contradicts itself or the stored state.
    #[error("{0}")]
    Invalid(String),
    /// A service's soft limit would exceed its hard limit (given together, or one against the one stored).
    #[error("soft_limit {soft} must not exceed hard_limit {hard}")]
    LimitsConflict {
        /// The soft limit.
        soft: u32,
        /// The hard limit.
        hard: u32,
    },
    /// An image that cannot be run as it is (e.g. it names no program).
    #[error("{0}")]
    InvalidImage(String),
    /// The database failed or is unreachable.
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl StoreError {
    /// True when the database could not be reached (as opposed to refusing the operation).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed))
    }
}

/// A client's value for an `integer` column, refused rather than changed when it does not fit. The API checks
/// the documented bounds first; this keeps every other caller from storing something else than it asked for.
fn int_column(field: &str, v: u32) -> Result<i32, StoreError> {
    i32::try_from(v).map_err(|_| StoreError::Invalid(format!("{field} {v} exceeds the largest value, {}", i32::MAX)))
}

/// A client's value for a `bigint` column, refused rather than changed when it does not fit.
fn bigint_column(field: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{field} {v} exceeds the largest value, {}", i64::MAX)))
}

/// The name of the constraint a database error violated, if it is a unique or exclusion violation.
fn violated_constraint(e: &sqlx::Error) -> Option<String> {
    let db = e.as_database_error()?;
    match db.code().as_deref() {
        // unique_violation, exclusion_violation
        Some("23505") | Some("23P01") => Some(db.constraint().unwrap_or_default().to_owned()),
        _ => None,
    }
}

/// Connects a pool with timeouts suited to an API: fail fast when PostgreSQL is down rather than hang.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(5)).connect(url).await
}

/// Access to the platform state.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    settings: Settings,
}

impl Store {
    /// A store over an existing pool.
    pub fn new(pool: PgPool, settings: Settings) -> Self {
        Self { pool, settings }
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Applies pending migrations and registers the built-in images. Safe to run from several replicas at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::Database(e),
            other => StoreError::Database(sqlx::Error::Migrate(Box::new(other))),
        })?;
        self.ensure_builtin_images().await
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// The platform secret `name`, if stored.
    pub async fn stored_platform_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT value FROM platform_secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(v,)| v))
    }

    /// Removes the platform secret `name`.
    pub async fn delete_platform_secret(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM platform_secrets WHERE name = $1").bind(name).execute(&self.pool).await?;
        Ok(())
    }

    /// The platform secret `name`; the first caller's `fresh` value wins when several replicas race. Values are
    /// stored as given: callers seal what must not be readable from a copy of the database.
    pub async fn platform_secret_or(&self, name: &str, fresh: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        sqlx::query("INSERT INTO platform_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(&fresh)
            .execute(&self.pool)
            .await?;
        let (value,): (Vec<u8>,) = sqlx::query_as("SELECT value FROM platform_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }
}

/// Appends one event to the change feed inside the caller's transaction.
async fn record_event<T: serde::Serialize>(
    conn: &mut sqlx::PgConnection,
    tenant: Option<uuid::Uuid>,
    resource_type: &str,
    resource_id: uuid::Uuid,
    action: cloud_domain::api::EventAction,
    resource: &T,
) -> Result<i64, StoreError> {
    let action = match action {
        cloud_domain::api::EventAction::Created => "created",
        cloud_domain::api::EventAction::Updated => "updated",
        cloud_domain::api::EventAction::Deleted => "deleted",
    };
    let payload = serde_json::to_value(resource).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let (version,): (i64,) = sqlx::query_as("SELECT record_event($1, $2, $3, $4, $5)")
        .bind(tenant)
        .bind(resource_type)
        .bind(resource_id)
        .bind(action)
        .bind(payload)
        .fetch_one(conn)
        .await?;
    Ok(version)
}

/// `Some(uuid)` when `key` is a UUID, so lookups can match a name or an id with one query.
fn as_uuid(key: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(key).ok()
}
