//! `GET /v1/events`: the tenant's changes as Server-Sent Events, resumable, never another tenant's.

use std::time::Duration;

use cloud_domain::api::Scope;
use cloud_tests::TestApi;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::{create_service, get};

/// Reads SSE frames until `n` events have arrived (keepalive comments are skipped).
async fn read_events(res: reqwest::Response, n: usize) -> Vec<(String, String, Value)> {
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let chunk = tokio::time::timeout_at(deadline, stream.next()).await.expect("events in time").unwrap().unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (String::new(), String::new(), Value::Null);
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.into();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = v.into();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).unwrap();
                }
            }
            if !id.is_empty() {
                out.push((id, event, data));
            }
        }
    }
    out
}

async fn open(api: &TestApi, token: &str, query: &str) -> reqwest::Response {
    let res =
        reqwest::Client::new().get(api.url(&format!("/v1/events{query}"))).bearer_auth(token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    res
}

#[tokio::test]
async fn a_tenant_streams_its_own_changes_and_can_resume() {
    let api = TestApi::start().await;
    let (_, other) = api.tenant("globex", &[Scope::Read, Scope::Write]).await;
    let live = open(&api, &api.token, "").await;
    let spy = open(&api, &other, "").await;

    create_service(&api, &other, json!({"name": "theirs"})).await;
    create_service(&api, &api.token, json!({"name": "mine"})).await;
    crate::delete(&api, "/v1/services/mine", &api.token).await;

    let events = read_events(live, 2).await;
    assert_eq!(events[0].1, "service.created");
    assert_eq!(events[0].2["resource"]["name"], "mine");
    assert_eq!(events[1].1, "service.deleted");
    let first: i64 = events[0].0.parse().unwrap();
    let second: i64 = events[1].0.parse().unwrap();
    assert!(second > first);

    // The other tenant sees only its own change.
    let theirs = read_events(spy, 1).await;
    assert_eq!(theirs[0].2["resource"]["name"], "theirs");

    // Resume after the first event: the second one is replayed.
    let resumed = read_events(open(&api, &api.token, &format!("?since={first}")).await, 1).await;
    assert_eq!(resumed[0].0, second.to_string());
    // Last-Event-ID does the same.
    let res = reqwest::Client::new()
        .get(api.url("/v1/events"))
        .bearer_auth(&api.token)
        .header("last-event-id", first.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(read_events(res, 1).await[0].0, second.to_string());

    get(&api, "/v1/events?since=-1", &api.token).await.problem(400, "invalid_query", "since");
    get(&api, "/v1/events?since=abc", &api.token).await.problem(400, "invalid_query", "");
}
