//! The change feed: versions increase, commit in order, and a follower can load a snapshot and resume.

use std::time::Duration;

use cloud_domain::api::QuotasPatch;
use cloud_store::{ChangeFeed, NewService};

fn service(name: &str) -> NewService {
    NewService {
        name: Some(name.into()),
        ports: vec![],
        soft_limit: None,
        hard_limit: None,
        scale_to_zero_after: None,
        domains: vec![],
        persistent: true,
    }
}

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
        writers.push(tokio::spawn(async move { store.create_service(tenant.id, service(&format!("s{i}"))).await }));
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
