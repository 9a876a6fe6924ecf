//! The change feed: every committed change has a version (see `record_event` in the migrations), and a
//! NOTIFY on [`CHANGES_CHANNEL`] announces it. Followers load a snapshot with the version it includes, then read
//! events after that version whenever the feed moves.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloud_domain::api::{Event, EventAction};
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use uuid::Uuid;

use crate::{Store, StoreError};

/// The NOTIFY channel carrying new versions.
pub const CHANGES_CHANNEL: &str = "cloud_changes";

/// How often the feed re-reads the newest version even without a notification: the safety net for a
/// notification lost while the listener reconnected.
const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The newest committed version, kept current by one background listener per process.
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    latest: watch::Receiver<i64>,
}

impl ChangeFeed {
    /// Starts following the database. The task ends when every subscriber is gone.
    pub async fn start(store: Store) -> Result<Self, StoreError> {
        let (tx, rx) = watch::channel(store.current_version().await?);
        tokio::spawn(follow(store, tx));
        Ok(Self { latest: rx })
    }

    /// A receiver that wakes whenever the newest version changes.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.latest.clone()
    }
}

async fn follow(store: Store, tx: watch::Sender<i64>) {
    let advance = |v: i64| {
        tx.send_if_modified(|cur| {
            let moved = v > *cur;
            if moved {
                *cur = v;
            }
            moved
        });
    };
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(store.pool()).await?;
            l.listen(CHANGES_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = tx.closed() => return,
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "change feed: cannot listen; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Anything committed while we were not listening.
        if let Ok(v) = store.current_version().await {
            advance(v);
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                n = listener.recv() => match n {
                    Ok(n) => {
                        if let Ok(v) = n.payload().parse() {
                            advance(v);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "change feed: listener failed; reconnecting");
                        break;
                    }
                },
                _ = tokio::time::sleep(POLL_INTERVAL) => {
                    if let Ok(v) = store.current_version().await {
                        advance(v);
                    }
                }
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    version: i64,
    resource_type: String,
    resource_id: Uuid,
    action: String,
    payload: serde_json::Value,
    created_at: DateTime<Utc>,
}

impl Store {
    /// The newest committed version (0 before any change).
    pub async fn current_version(&self) -> Result<i64, StoreError> {
        let (v,): (Option<i64>,) = sqlx::query_as("SELECT max(version) FROM events").fetch_one(&self.pool).await?;
        Ok(v.unwrap_or(0))
    }

    /// Up to `limit` events after `since`, oldest first; only the tenant's when `tenant` is given.
    pub async fn events_since(&self, tenant: Option<Uuid>, since: i64, limit: i64) -> Result<Vec<Event>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT version, resource_type, resource_id, action, payload, created_at FROM events
             WHERE version > $1 AND ($2::uuid IS NULL OR tenant_id = $2) ORDER BY version LIMIT $3",
        )
        .bind(since)
        .bind(tenant)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Event {
                version: r.version,
                resource_type: r.resource_type,
                resource_id: r.resource_id,
                action: match r.action.as_str() {
                    "created" => EventAction::Created,
                    "deleted" => EventAction::Deleted,
                    _ => EventAction::Updated,
                },
                resource: r.payload,
                created_at: r.created_at,
            })
            .collect())
    }

    /// A consistent read-only snapshot and the version it includes: read the state through the transaction,
    /// then follow events after the version.
    pub async fn begin_snapshot(&self) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, i64), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let (v,): (Option<i64>,) = sqlx::query_as("SELECT max(version) FROM events").fetch_one(&mut *tx).await?;
        Ok((tx, v.unwrap_or(0)))
    }
}
