//! `GET /v1/instances/{instance}/logs?follow=true`: an instance's new lines as Server-Sent Events, announced by
//! PostgreSQL rather than polled for, with keepalives, resumable with `Last-Event-ID`, ending with the instance.
//!
//! Lines are appended as node agents append them: by another process's connection (a store of its own here).
//! What followers cost the database is counted with `pg_stat_statements`: the reads of log lines it ran.

use std::time::Duration;

use cloud_api::ApiConfig;
use cloud_store::{LogFeed, LogUpdate, Store};
use cloud_tests::TestApi;
use serde_json::json;
use uuid::Uuid;

use crate::sse::Reader;
use crate::{into_res, post};

const KEEPALIVE: Duration = Duration::from_millis(200);

async fn start() -> TestApi {
    let api = TestApi::start_with(ApiConfig { stream_keepalive: KEEPALIVE, ..Default::default() }).await;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(api.store.pool()).await.unwrap();
    api
}

/// A store of its own over the API's database, as a node agent has.
async fn agent(api: &TestApi) -> Store {
    let opts = (*api.store.pool().connect_options()).clone();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_with(opts).await.unwrap();
    Store::new(pool, api.store.settings().clone())
}

async fn instance(api: &TestApi, name: &str) -> Uuid {
    let res = post(api, "/v1/instances", &api.token, json!({"image": "hello", "name": name})).await;
    assert_eq!(res.status, 201, "{}", res.body);
    res.body["instances"][0]["id"].as_str().unwrap().parse().unwrap()
}

async fn append(agent: &Store, id: Uuid, texts: &[String]) {
    let lines: Vec<_> = texts.iter().map(|t| (chrono::Utc::now(), "stdout", t.clone())).collect();
    agent.append_logs(id, &lines).await.unwrap();
}

fn texts(range: std::ops::RangeInclusive<i64>) -> Vec<String> {
    range.map(|i| format!("line {i}")).collect()
}

fn request(api: &TestApi, name: &str, query: &str, last_event_id: Option<&str>) -> reqwest::RequestBuilder {
    let url = api.url(&format!("/v1/instances/{name}/logs?follow=true{query}"));
    let req = reqwest::Client::new().get(url).bearer_auth(&api.token);
    match last_event_id {
        Some(id) => req.header("last-event-id", id),
        None => req,
    }
}

async fn follow(api: &TestApi, name: &str, query: &str, last_event_id: Option<&str>) -> Reader {
    Reader::new(request(api, name, query, last_event_id).send().await.unwrap())
}

/// The reads of log lines the test's database has run: what followers cost it (appends read none).
async fn log_reads(api: &TestApi) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query LIKE 'SELECT seq, at, stream, line FROM instance_logs%'",
    )
    .fetch_one(api.store.pool())
    .await
    .expect("pg_stat_statements (the test cluster loads it; an external DATABASE_URL server must too)")
}

#[tokio::test]
async fn an_idle_follower_gets_keepalives_and_costs_the_database_nothing() {
    let api = start().await;
    let id = instance(&api, "web").await;
    let agent = agent(&api).await;
    append(&agent, id, &texts(1..=1)).await;

    let mut s = follow(&api, "web", "", None).await;
    let first = s.event().await;
    assert_eq!((first.seq(), first.json()["line"].clone()), (1, json!("line 1")));

    // Idle for five keepalive periods (or their time, if none comes).
    let before = log_reads(&api).await;
    let mut idle = Vec::new();
    let _ = tokio::time::timeout(KEEPALIVE * 10, async {
        while idle.len() < 5 {
            idle.push(s.block().await);
        }
    })
    .await;
    let reads = log_reads(&api).await - before;
    assert_eq!(reads, 0, "an idle follower made the database read the log {reads} times");
    assert_eq!(idle.len(), 5, "an idle stream gets a keepalive every {KEEPALIVE:?}: {idle:?}");
    for b in &idle {
        assert_eq!((b.comments.as_slice(), &b.data), (&["keepalive".to_owned()][..], &None));
    }

    // A new line arrives without waiting for a poll.
    append(&agent, id, &texts(2..=2)).await;
    assert_eq!(s.event().await.json()["line"], "line 2");
    assert_eq!(s.skipped[0].id.as_deref(), Some("0"), "the stream opens with the position it starts after");
}

#[tokio::test]
async fn many_followers_cost_the_database_what_one_does() {
    let api = start().await;
    let id = instance(&api, "web").await;
    let agent = agent(&api).await;
    let mut one = follow(&api, "web", "", None).await;

    let appended = 5;
    let before = log_reads(&api).await;
    for i in 1..=appended {
        append(&agent, id, &texts(i..=i)).await;
        assert_eq!(one.event().await.seq(), i);
    }
    let with_one = log_reads(&api).await - before;

    let mut many = Vec::new();
    for _ in 0..20 {
        let mut s = follow(&api, "web", "&limit=1", None).await;
        assert_eq!(s.event().await.seq(), appended, "a new follower starts with the last line");
        many.push(s);
    }
    let before = log_reads(&api).await;
    for i in appended + 1..=2 * appended {
        append(&agent, id, &texts(i..=i)).await;
        assert_eq!(one.event().await.seq(), i);
        for s in &mut many {
            assert_eq!(s.event().await.seq(), i);
        }
    }
    let with_many = log_reads(&api).await - before;
    assert!(
        with_one <= appended && with_many <= with_one,
        "for {appended} appends, one follower made the database read the log {with_one} times, 21 followers \
         {with_many} times"
    );
}

#[tokio::test]
async fn last_event_id_resumes_after_that_line_however_far_behind() {
    let api = start().await;
    let id = instance(&api, "web").await;
    let agent = agent(&api).await;
    append(&agent, id, &texts(1..=10)).await;

    // The header wins over `after`; `limit` only bounds each read, every line after 3 comes.
    let mut s = follow(&api, "web", "&after=1&limit=2", Some("3")).await;
    for seq in 4..=10 {
        let e = s.event().await;
        assert_eq!((e.seq(), e.json()["line"].clone()), (seq, json!(format!("line {seq}"))), "resuming after 3");
    }
    // The stream opened with that position: a client losing it before any line would resume there.
    assert_eq!(s.skipped[0].id.as_deref(), Some("3"));
    append(&agent, id, &texts(11..=11)).await;
    assert_eq!(s.event().await.seq(), 11);

    for bad in ["abc", "-1", "1.5"] {
        let res = into_res(request(&api, "web", "", Some(bad)).send().await.unwrap()).await;
        res.problem(400, "invalid_request", "Last-Event-ID");
    }
}

/// A client resuming after an id beyond the newest line (a stale or made-up one) waits for that id; the other
/// followers of the instance are neither held up by it nor made to read the database over and over.
#[tokio::test]
async fn a_follower_resuming_past_the_end_holds_up_no_other() {
    let api = start().await;
    let id = instance(&api, "web").await;
    let agent = agent(&api).await;
    append(&agent, id, &texts(1..=3)).await;
    let mut ahead = follow(&api, "web", "", Some("1000")).await;
    assert_eq!(ahead.block().await.id.as_deref(), Some("1000"));
    let mut s = follow(&api, "web", "", None).await;
    for seq in 1..=3 {
        assert_eq!(s.event().await.seq(), seq);
    }

    // Both idle for two keepalive periods: nothing to read.
    let before = log_reads(&api).await;
    for _ in 0..2 {
        assert_eq!(s.block().await.comments, ["keepalive"]);
    }
    let reads = log_reads(&api).await - before;
    assert!(reads <= 1, "an idle follower made the database read the log {reads} times");

    append(&agent, id, &texts(4..=4)).await;
    assert_eq!(s.event().await.seq(), 4);
}

#[tokio::test]
async fn a_follow_ends_when_the_instance_is_deleted() {
    let api = start().await;
    let id = instance(&api, "web").await;
    let agent = agent(&api).await;
    let mut s = follow(&api, "web", "", None).await;
    append(&agent, id, &texts(1..=2)).await;
    assert_eq!(s.event().await.seq(), 1);
    assert_eq!(s.event().await.seq(), 2);
    crate::delete(&api, "/v1/instances/web", &api.token).await;
    assert!(s.ends().await);
    // Reconnecting finds it gone.
    let res = into_res(request(&api, "web", "", Some("2")).send().await.unwrap()).await;
    res.problem(404, "not_found", "web");
}

#[tokio::test]
async fn lines_appended_while_the_listener_reconnects_still_arrive() {
    let api = start().await;
    let id = instance(&api, "web").await;
    let agent = agent(&api).await;
    let mut s = follow(&api, "web", "", None).await;
    append(&agent, id, &texts(1..=1)).await;
    assert_eq!(s.event().await.seq(), 1);

    // The API's listener loses its connection; a line is appended before it listens again (or after).
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%cloud_instance_logs%'",
    )
    .fetch_all(agent.pool())
    .await
    .unwrap();
    assert_eq!(cut, [true], "one listener of log notifications");
    append(&agent, id, &texts(2..=3)).await;
    assert_eq!(s.event().await.seq(), 2);
    assert_eq!(s.event().await.seq(), 3);
}

#[tokio::test]
async fn the_feed_forgets_an_instance_when_its_last_follower_goes() {
    let api = start().await;
    let id = instance(&api, "web").await;
    let agent = agent(&api).await;
    let feed = LogFeed::start(api.store.clone()).await.unwrap();
    let mut a = feed.follow(id);
    a.start_after(0, None);
    let b = feed.follow(id);
    assert_eq!(feed.followed_instances(), 1);
    append(&agent, id, &texts(1..=2)).await;
    let next = tokio::time::timeout(Duration::from_secs(30), a.next()).await.unwrap().unwrap();
    assert_eq!(next, LogUpdate::Lines(api.store.logs(api.tenant.id, "web", Some(0), 10).await.unwrap().1));
    drop(a);
    assert_eq!(feed.followed_instances(), 1);
    drop(b);
    assert_eq!(feed.followed_instances(), 0);
}
