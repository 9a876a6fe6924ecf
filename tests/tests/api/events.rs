//! `GET /v1/events`: the tenant's changes as Server-Sent Events, resumable, never another tenant's.

use std::time::Duration;

use cloud_api::ApiConfig;
use cloud_domain::api::Scope;
use cloud_tests::TestApi;
use serde_json::{Value, json};

use crate::sse::Reader;
use crate::{create_service, get};

/// The next `n` events (comments and id-only blocks skipped): id, event type, data.
async fn read_events(res: reqwest::Response, n: usize) -> Vec<(String, String, Value)> {
    let mut s = Reader::new(res);
    let mut out = Vec::new();
    while out.len() < n {
        let e = s.event().await;
        out.push((e.id.clone().expect("an id"), e.event.clone().expect("an event type"), e.json()));
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

/// What schemathesis checks (ST108): each event as an SSE client parses it (`id`, `event`, `data`) against the
/// schema the OpenAPI document gives the stream, and `data` against its `contentSchema`.
#[tokio::test]
async fn every_event_matches_the_documented_schema() {
    let api = TestApi::start().await;
    create_service(&api, &api.token, json!({"name": "mine"})).await;
    crate::delete(&api, "/v1/services/mine", &api.token).await;
    let doc: Value = reqwest::get(api.url("/openapi.json")).await.unwrap().json().await.unwrap();
    let schema = &doc["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"];

    let mut s = Reader::new(open(&api, &api.token, "?since=0").await);
    for n in 0..2 {
        let e = s.event().await;
        let parsed = json!({"id": e.id, "event": e.event.clone().unwrap_or_else(|| "message".into()), "data": e.data});
        conforms(&doc, schema, &parsed, &format!("event #{n}"));
    }
}

/// The schema a `$ref` points to (or the schema itself).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/")) {
        Some(name) => &doc["components"]["schemas"][name],
        None => schema,
    }
}

/// Checks the parts of JSON Schema our documents use for events: required properties, string and object types,
/// and string-encoded JSON content.
#[track_caller]
fn conforms(doc: &Value, schema: &Value, value: &Value, what: &str) {
    let schema = resolve(doc, schema);
    assert!(schema.is_object(), "{what}: no schema documented");
    match schema["type"].as_str() {
        Some("object") => assert!(value.is_object(), "{what} is not an object: {value}"),
        Some("string") => assert!(value.is_string(), "{what} is not a string: {value}"),
        _ => {}
    }
    for required in schema["required"].as_array().into_iter().flatten() {
        let name = required.as_str().unwrap();
        assert!(!value[name].is_null(), "{what} lacks `{name}`, which the documented schema requires: {value}");
    }
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        let Some(v) = value.get(name).filter(|v| !v.is_null()) else { continue };
        let what = format!("{what}.{name}");
        conforms(doc, property, v, &what);
        let property = resolve(doc, property);
        if let Some(content) = property.get("contentSchema") {
            assert_eq!(property["contentMediaType"], "application/json");
            let inner: Value = serde_json::from_str(v.as_str().unwrap()).expect("JSON content");
            conforms(doc, content, &inner, &what);
        }
    }
}

/// The stream opens with the version it starts after as its last event id, so a client that loses the connection
/// before any event still resumes where it started.
#[tokio::test]
async fn a_client_that_reconnects_before_any_event_misses_nothing() {
    let api = TestApi::start().await;
    let mut s = Reader::new(open(&api, &api.token, "").await);
    let position = s.block().await.id.expect("the opening block carries the position");
    drop(s);
    create_service(&api, &api.token, json!({"name": "meanwhile"})).await;
    let res = reqwest::Client::new()
        .get(api.url("/v1/events"))
        .bearer_auth(&api.token)
        .header("last-event-id", &position)
        .send()
        .await
        .unwrap();
    let events = read_events(res, 1).await;
    assert_eq!((events[0].1.as_str(), &events[0].2["resource"]["name"]), ("service.created", &json!("meanwhile")));
}

#[tokio::test]
async fn an_idle_stream_gets_keepalives() {
    let keepalive = Duration::from_millis(200);
    let api = TestApi::start_with(ApiConfig { stream_keepalive: keepalive, ..Default::default() }).await;
    let mut s = Reader::new(open(&api, &api.token, "").await);
    s.block().await;
    let b = tokio::time::timeout(keepalive * 25, s.block()).await.expect("a keepalive");
    assert_eq!((b.comments, b.data), (vec!["keepalive".to_owned()], None));
}
