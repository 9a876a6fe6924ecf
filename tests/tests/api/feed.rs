//! The change feed: versions increase, commit in order, and a follower can load a snapshot and resume.

use std::time::Duration;

use cloud_domain::api::QuotasPatch;
use cloud_store::{ChangeFeed, NewService};

#[tokio::test]
async fn concurrent_writers_produce_a_gapless_ordered_feed_that_followers_resume() {
    let store = cloud_tests::fresh_store().await;
    let tenant = store.create_tenant("acme", QuotasPatch::default()).await.unwrap();
    let feed = ChangeFeed::start(store.clone()).await.unwrap();
    let mut latest = feed.subscribe();

    // A follower takes a snapshot: the services it sees and the version that snapshot includes.
    let (mut snap, version) = store.begin_snapshot().await.unwrap();
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM services").fetch_one(&mut *snap).await.unwrap();
    snap.commit().await.unwrap();
    assert_eq!(count, 0);

    let mut writers = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        writers.push(tokio::spawn(
            async move { store.create_service(tenant.id, NewService::named(format!("s{i}"))).await },
        ));
    }
    for w in writers {
        w.await.unwrap().unwrap();
    }
    // The notification arrives without polling the database ourselves.
    let target = store.current_version().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), latest.wait_for(|v| *v >= target)).await.unwrap().unwrap();

    // Resuming from the snapshot's version yields exactly the 20 creations, in increasing order, no gaps.
    let events = store.events_since(None, version, 1000).await.unwrap();
    let created: Vec<_> = events.iter().filter(|e| e.resource_type == "service").collect();
    assert_eq!(created.len(), 20);
    let versions: Vec<i64> = events.iter().map(|e| e.version).collect();
    assert!(versions.windows(2).all(|w| w[1] == w[0] + 1), "{versions:?}");
    assert_eq!(*versions.last().unwrap(), target);
    // Tenant filtering.
    let other = store.create_tenant("other", QuotasPatch::default()).await.unwrap();
    assert!(store.events_since(Some(other.id), version, 1000).await.unwrap().iter().all(|e| e.resource_id == other.id));
}

/// A transaction that records an event and then waits for a row held by another that records an event too: both
/// commit, in the order they commit. When the first event took the event lock until commit, the second waited for
/// that lock while holding the row, and PostgreSQL aborted one of them as a deadlock (an API request answered 500
/// while a node agent scheduled instances).
#[tokio::test]
async fn writers_that_wait_for_each_others_rows_do_not_deadlock_on_the_feed() {
    let store = cloud_tests::fresh_store().await;
    let tenant = store.create_tenant("acme", QuotasPatch::default()).await.unwrap();
    let before = store.current_version().await.unwrap();
    let pool = store.pool().clone();
    let record = "SELECT record_event($1, 'tenant', $1, 'updated', $2)";

    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE").bind(tenant.id).execute(&mut *holder).await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            sqlx::query(record).bind(tenant.id).bind(serde_json::json!({"by": "waiter"})).execute(&mut *tx).await?;
            sqlx::query("UPDATE tenants SET updated_at = now() WHERE id = $1")
                .bind(tenant.id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
    });
    // The waiter has recorded its event and waits for the row.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the second transaction never waited for the row");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query(record).bind(tenant.id).bind(serde_json::json!({"by": "holder"})).execute(&mut *holder).await.unwrap();
    holder.commit().await.unwrap();
    waiter.await.unwrap().unwrap();

    let by: Vec<String> = store
        .events_since(None, before, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.resource["by"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(by, ["holder", "waiter"], "events in commit order");
}
