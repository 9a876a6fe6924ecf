//! The platform's only state: PostgreSQL.
//!
//! This crate owns every SQL statement, the migrations, the change feed and the log feed. Each public operation is one
//! transaction that either commits whole or leaves nothing behind, and appends its events to the change feed in
//! the same transaction. Invariants that races could break (unique names, disjoint networks, unique private IPs,
//! unique raw TCP ports) are database constraints; the code here turns their violations into [`StoreError`]s.
//!
//! Callers validate tenant input with `cloud-domain` first; the store trusts validated values and checks what
//! only the database can know (existence, uniqueness, quotas).

mod autoscale;
mod bundle;
mod certificates;
mod domains;
mod drain;
mod exec;
mod feed;
mod idempotency;
mod images;
mod instances;
mod join_tokens;
mod log_feed;
mod nodes;
mod page;
mod platform_certificates;
mod rollouts;
mod routes;
mod secrets;
mod services;
mod tenants;
mod tokens;
mod zone;

use std::time::Duration;

use cloud_domain::service::LimitsError;
use cloud_domain::state::StateError;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use autoscale::AutoscaleInput;
pub use bundle::{BundleError, parse_bundle, special_file};
pub use certificates::{DueDomain, NewCertificate, ServedCertificate};
pub use domains::{PendingDomain, txt_name as ownership_txt_name, txt_value as ownership_txt_value};
pub use exec::{ExecClaim, ExecTarget, NewExec};
pub use feed::{CHANGES_CHANNEL, ChangeFeed};
pub use idempotency::IdempotencyBegin;
pub use instances::NewInstances;
pub use join_tokens::JoinGrant;
pub use log_feed::{LOGS_CHANNEL, LogFeed, LogFollower, LogUpdate};
pub use nodes::{Assignment, LOG_BYTES_KEPT, LOG_LINES_KEPT, NodeRegistration, Observation, Peer, Registered};
pub use page::Cursor;
pub use platform_certificates::{DuePlatformCertificate, PlatformCertificate};
pub use rollouts::NewRollout;
pub use routes::{RouteBackend, RouteChanges, RouteData, ServiceRoute};
pub use services::{NewService, ServiceChange};
pub use tokens::TokenStatus;
pub use zone::{ZoneChanges, ZoneData, ZoneDomain, ZoneInstance, ZonePatch, ZoneService, ZoneTenant};

/// The platform settings are a domain type; they are re-exported here because every role hands them to the store.
pub use cloud_domain::settings::{DEFAULT_DATABASE_TIMEOUT, Settings};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The slowest transfer of image data an operation is given time for, on top of [`Settings::database_timeout`]:
/// storing or reading a 256 MiB image may take half a minute more, not forever.
pub const BULK_BYTES_PER_SECOND: u64 = 8 << 20;

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
    /// A node announced an underlay address that another live node holds: two hosts cannot end one tunnel.
    #[error("underlay address {address} is held by node \"{node}\", which is live")]
    UnderlayAddressTaken {
        /// The address announced.
        address: std::net::Ipv4Addr,
        /// The live node holding it.
        node: String,
    },
    /// A platform-wide pool ran out.
    #[error("no {what} left")]
    CapacityExhausted {
        /// What ran out.
        what: &'static str,
    },
    /// The instance must run for this (exec).
    #[error("instance {name} is {state}: it must be running")]
    NotRunning {
        /// The instance.
        name: String,
        /// Its state.
        state: String,
    },
    /// The node an instance should move to cannot take it now.
    #[error("node {node} cannot take the instance: {why}")]
    NodeUnavailable {
        /// The node.
        node: String,
        /// Why not.
        why: String,
    },
    /// The service has a rollout under way.
    #[error("service {service} has a rollout under way ({rollout}): wait for it to end")]
    RolloutInProgress {
        /// The service.
        service: String,
        /// The rollout under way.
        rollout: uuid::Uuid,
    },
    /// An instance state change that its current state does not allow.
    #[error(transparent)]
    State(#[from] StateError),
    /// A request that is well-formed but contradicts itself or the stored state.
    #[error("{0}")]
    Invalid(String),
    /// A service's limits contradict each other (given together, or one against the one stored).
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// An image that cannot be run as it is (e.g. it names no program).
    #[error("{0}")]
    InvalidImage(String),
    /// A join token's secret was refused.
    #[error(transparent)]
    JoinRefused(#[from] cloud_domain::join::JoinRefusal),
    /// The database failed or is unreachable.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// The database did not finish the operation in time: frozen, overloaded or cut off. What the operation did
    /// is rolled back unless it had committed, which the caller cannot tell: a retry must be safe to repeat.
    #[error("the database did not answer within {waited:?}")]
    Unresponsive {
        /// How long the operation waited.
        waited: Duration,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl StoreError {
    /// True when the database could not be reached or did not answer in time (as opposed to refusing the
    /// operation): a later retry may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Unresponsive { .. }
                | Self::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed)
        )
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

/// Connects a pool that waits at most [`DEFAULT_DATABASE_TIMEOUT`] for PostgreSQL; see [`connect_with_timeout`].
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    connect_with_timeout(url, max_connections, DEFAULT_DATABASE_TIMEOUT).await
}

/// Connects a pool that fails rather than hangs when PostgreSQL does not answer: taking a connection (opening
/// one, or checking an idle one) gives up after `timeout`, and so does checking a connection given back.
///
/// A connection comes back mid-statement when an operation was abandoned at its bound; sqlx then waits for the
/// server to finish the statement before reusing the connection, and on a frozen server that wait never ends
/// and holds a slot of the pool. Here a connection that does not answer within `timeout` is closed instead (a
/// new one is opened when needed), so an outage leaves neither hung slots nor half-read connections behind.
pub async fn connect_with_timeout(url: &str, max_connections: u32, timeout: Duration) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .after_release(move |conn, _| {
            Box::pin(async move {
                match tokio::time::timeout(timeout, sqlx::Connection::ping(conn)).await {
                    Ok(answered) => answered.map(|()| true),
                    // An error (not `false`) makes sqlx drop the connection without a goodbye it may not take.
                    Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("a connection given back did not answer within {timeout:?}; closing it"),
                    ))),
                }
            })
        })
        .connect(url)
        .await
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

    /// Versions of the migrations this build has that the database has not applied (all of them on an empty
    /// database), without changing anything: a process that does not migrate checks the schema it will use.
    pub async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let applied: Vec<i64> = self
            .bounded(async {
                let (exists,): (bool,) =
                    sqlx::query_as("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(&self.pool).await?;
                if !exists {
                    return Ok(Vec::new());
                }
                Ok(sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(&self.pool)
                    .await?)
            })
            .await?;
        Ok(MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
            .map(|m| m.version)
            .collect())
    }

    /// True when the database answers within `wait` (taking a connection included).
    pub async fn ping_within(&self, wait: Duration) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(tokio::time::timeout(wait, ping).await, Ok(Ok(_)))
    }

    /// Runs one operation within [`Settings::database_timeout`]. Every operation callers wait on goes through
    /// here (or [`bounded_for`](Self::bounded_for)), so no caller waits longer on a database that stopped
    /// answering; the snapshot reads of the edge and the DNS, which serve their last snapshot meanwhile, do not.
    async fn bounded<T>(&self, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.bounded_for(self.settings.database_timeout, op).await
    }

    /// Runs one operation within `waited`. Abandoning it drops its connection mid-transaction: PostgreSQL rolls
    /// back what was not committed, and the pool closes the connection unless it answers
    /// ([`connect_with_timeout`]).
    async fn bounded_for<T>(
        &self,
        waited: Duration,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(waited, op).await.unwrap_or(Err(StoreError::Unresponsive { waited }))
    }

    /// [`Settings::database_timeout`] plus the time to move `bytes` of image data.
    fn bulk_timeout(&self, bytes: u64) -> Duration {
        self.settings.database_timeout + Duration::from_secs(bytes / BULK_BYTES_PER_SECOND)
    }

    /// The platform secret `name`, if stored.
    pub async fn stored_platform_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.bounded(async {
            let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT value FROM platform_secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
            Ok(row.map(|(v,)| v))
        })
        .await
    }

    /// Removes the platform secret `name`.
    pub async fn delete_platform_secret(&self, name: &str) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("DELETE FROM platform_secrets WHERE name = $1").bind(name).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// The platform secret `name`; the first caller's `fresh` value wins when several replicas race. Values are
    /// stored as given: callers seal what must not be readable from a copy of the database.
    pub async fn platform_secret_or(&self, name: &str, fresh: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.bounded(async {
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
        })
        .await
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
) -> Result<(), StoreError> {
    let action = match action {
        cloud_domain::api::EventAction::Created => "created",
        cloud_domain::api::EventAction::Updated => "updated",
        cloud_domain::api::EventAction::Deleted => "deleted",
    };
    let payload = serde_json::to_value(resource).map_err(|e| StoreError::Invalid(e.to_string()))?;
    // Its version is given at commit (migrations/0020_events_numbered_at_commit.sql).
    sqlx::query("SELECT record_event($1, $2, $3, $4, $5)")
        .bind(tenant)
        .bind(resource_type)
        .bind(resource_id)
        .bind(action)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}
