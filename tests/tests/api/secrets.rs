//! Secrets: set, versioned, listed by name only, scoped to a service, another tenant's invisible; the value never
//! in a response, an event or a database column in clear; bad names and oversized values refused.

use cloud_domain::api::Scope;
use cloud_tests::TestApi;
use reqwest::Method;
use serde_json::json;

use crate::{call, create_service, delete, get};

#[tokio::test]
async fn a_secret_is_kept_sealed_and_never_shown_again() {
    let api = TestApi::start().await;
    let t = &api.token;
    let put = async |name: &str, body: serde_json::Value| {
        call(&api, Method::PUT, &format!("/v1/secrets/{name}"), Some(t), Some(body)).await
    };
    let value = "s3cr3t-Value-that-must-not-leak";
    let res = put("API_KEY", json!({ "value": value })).await;
    assert_eq!((res.status, res.body["version"].as_i64()), (200, Some(1)), "{}", res.body);
    assert!(!res.body.to_string().contains(value));
    let again = put("API_KEY", json!({ "value": format!("{value}-2") })).await;
    assert_eq!(again.body["version"], 2);
    create_service(&api, t, json!({"name": "web", "ports": ["443:8080"]})).await;
    let scoped = put("API_KEY", json!({ "value": "for-web", "service": "web", "file": true })).await;
    assert_eq!((scoped.status, scoped.body["service"].as_str()), (200, Some("web")));
    assert_eq!((scoped.body["file"].as_bool(), again.body["file"].as_bool()), (Some(true), Some(false)));

    let listed = get(&api, "/v1/secrets", t).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 2);
    assert!(!listed.body.to_string().contains(value) && !listed.body.to_string().contains("for-web"));
    // Nowhere in clear: not in events, not in the table.
    let events: Vec<(String,)> =
        sqlx::query_as("SELECT payload::text FROM events").fetch_all(api.store.pool()).await.unwrap();
    assert!(events.iter().all(|(p,)| !p.contains(value) && !p.contains("for-web")), "an event holds a value");
    let sealed: Vec<(Vec<u8>,)> =
        sqlx::query_as("SELECT value_sealed FROM secrets").fetch_all(api.store.pool()).await.unwrap();
    let clear = value.as_bytes();
    assert!(sealed.iter().all(|(v,)| !v.windows(clear.len()).any(|w| w == clear)), "a value stored in clear");
    let dump: (String,) = sqlx::query_as("SELECT string_agg(row_to_json(s)::text, '') FROM secrets s")
        .fetch_one(api.store.pool())
        .await
        .unwrap();
    assert!(!dump.0.contains(value));

    // Another tenant sees none of them and cannot delete them.
    let (_, other) = api.tenant("hooli", &[Scope::Read, Scope::Write]).await;
    assert_eq!(get(&api, "/v1/secrets", &other).await.body["items"], json!([]));
    delete(&api, "/v1/secrets/API_KEY", &other).await.problem(404, "not_found", "API_KEY");

    // Bad input: a name that is no environment variable's, a value over 64 KiB, a service that is not there.
    for bad in ["1ABC", "A-B", "A%20B"] {
        put(bad, json!({ "value": "x" })).await.problem(400, "invalid_name", "environment variable");
    }
    put("BIG", json!({ "value": "x".repeat(64 * 1024 + 1) })).await.problem(400, "invalid_request", "64 KiB");
    delete(&api, "/v1/secrets/A?service=%00", t).await.problem(404, "not_found", "service");
    put("X", json!({ "value": "x", "service": "nope" })).await.problem(404, "not_found", "nope");
    put("X", json!({ "value": "a\0b" })).await.problem(400, "invalid_request", "NUL");
    assert_eq!(get(&api, "/v1/secrets", t).await.body["items"].as_array().unwrap().len(), 2, "nothing half-written");

    // Deleted: the service's one, then the tenant's.
    assert_eq!(delete(&api, "/v1/secrets/API_KEY?service=web", t).await.status, 204);
    assert_eq!(delete(&api, "/v1/secrets/API_KEY", t).await.status, 204);
    delete(&api, "/v1/secrets/API_KEY", t).await.problem(404, "not_found", "API_KEY");
}
