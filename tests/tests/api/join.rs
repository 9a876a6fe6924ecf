//! Join tokens: created for a tenant with scopes the creator holds, exchanged once for a working token, refused
//! with a reason when used, revoked, expired, forged or orphaned by a deleted tenant, and guessed at only slowly.

use chrono::Utc;
use cloud_domain::api::Scope;
use cloud_domain::join::JoinToken;
use cloud_tests::TestApi;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{Res, call, delete, get, post};

/// Creates a join token; its record and the secret it carries.
async fn create(api: &TestApi, token: &str, body: Value) -> (Value, String) {
    let res = post(api, "/v1/join-tokens", token, body).await;
    assert_eq!(res.status, 201, "{}", res.body);
    let join = JoinToken::decode(res.body["join_token"].as_str().unwrap(), Utc::now()).unwrap();
    (res.body, join.secret)
}

async fn exchange(api: &TestApi, secret: &str) -> Res {
    call(api, Method::POST, "/v1/join", None, Some(json!({ "secret": secret }))).await
}

#[tokio::test]
async fn a_join_token_works_once_and_every_refusal_names_its_reason() {
    let api = TestApi::start().await;
    let (created, secret) =
        create(&api, &api.token, json!({"scopes": ["read"], "description": "alice's laptop"})).await;
    assert_eq!((created["state"].as_str(), created["tenant"].as_str()), (Some("pending"), Some("acme")));
    let token = JoinToken::decode(created["join_token"].as_str().unwrap(), Utc::now()).unwrap();
    let wait = token.expires_at - Utc::now();
    assert!((3590..=3600).contains(&wait.num_seconds()), "an hour by default: {wait}");

    // Only the hash of the secret is stored.
    let stored: Vec<(Vec<u8>,)> =
        sqlx::query_as("SELECT secret_hash FROM join_tokens").fetch_all(api.store.pool()).await.unwrap();
    assert_eq!(stored, [(cloud_domain::join::secret_hash(&secret),)]);
    let dump: (String,) =
        sqlx::query_as("SELECT row_to_json(j)::text FROM join_tokens j").fetch_one(api.store.pool()).await.unwrap();
    assert!(!dump.0.contains(&secret));

    // The exchange needs no token and yields a working one with exactly the granted scopes.
    let joined = exchange(&api, &secret).await;
    assert_eq!(joined.status, 201, "{}", joined.body);
    assert_eq!(joined.body["scopes"], json!(["read"]));
    assert_eq!(joined.body["description"], "alice's laptop");
    let jwt = joined.body["jwt"].as_str().unwrap();
    let me = get(&api, "/v1/whoami", jwt).await;
    assert_eq!((me.status, me.body["tenant"]["name"].as_str()), (200, Some("acme")));
    post(&api, "/v1/services", jwt, json!({"name": "web"})).await.problem(403, "insufficient_scope", "write");

    // Once only; the record says when and for which token.
    exchange(&api, &secret).await.problem(401, "join_token_used", "works once");
    let listed = get(&api, "/v1/join-tokens", &api.token).await;
    let item = &listed.body["items"][0];
    assert_eq!((item["state"].as_str(), &item["token_id"]), (Some("used"), &joined.body["id"]));
    delete(&api, &format!("/v1/join-tokens/{}", item["id"].as_str().unwrap()), &api.token).await.problem(
        400,
        "invalid_request",
        "revoke the token it yielded",
    );

    // Revoked before use.
    let (revoked, secret) = create(&api, &api.token, json!({})).await;
    let res = delete(&api, &format!("/v1/join-tokens/{}", revoked["id"].as_str().unwrap()), &api.token).await;
    assert_eq!((res.status, res.body["state"].as_str()), (200, Some("revoked")));
    exchange(&api, &secret).await.problem(401, "join_token_revoked", "revoked");

    // Expired: its time passed (moved into the past here rather than waited for).
    let (expired, secret) = create(&api, &api.token, json!({"expires_in_seconds": 60})).await;
    sqlx::query("UPDATE join_tokens SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(uuid::Uuid::parse_str(expired["id"].as_str().unwrap()).unwrap())
        .execute(api.store.pool())
        .await
        .unwrap();
    exchange(&api, &secret).await.problem(401, "join_token_expired", "expired");

    // Forged: a secret of the right shape that was never issued, and one of another shape.
    exchange(&api, &cloud_domain::join::new_secret()).await.problem(401, "join_token_invalid", "not valid here");
    exchange(&api, "x").await.problem(401, "join_token_invalid", "not valid here");
    call(&api, Method::POST, "/v1/join", None, Some(json!({"secret": ""}))).await.problem(
        400,
        "invalid_request",
        "secret",
    );
}

#[tokio::test]
async fn a_join_token_grants_no_more_than_its_creator_holds_and_dies_with_its_tenant() {
    let api = TestApi::start().await;
    let (_, writer) = api.tenant("initech", &[Scope::Read, Scope::Write]).await;
    post(&api, "/v1/join-tokens", &writer, json!({"scopes": ["admin"]})).await.problem(
        403,
        "insufficient_scope",
        "admin",
    );
    // Another tenant is not found for a non-admin, as everywhere.
    post(&api, "/v1/join-tokens", &writer, json!({"tenant": "acme"})).await.problem(404, "not_found", "acme");
    let (_, reader) = api.tenant("umbrella", &[Scope::Read]).await;
    post(&api, "/v1/join-tokens", &reader, json!({})).await.problem(403, "insufficient_scope", "write");
    // Bounds of the body.
    for body in [json!({"expires_in_seconds": 59}), json!({"expires_in_seconds": 2_592_001}), json!({"scopes": []})] {
        let res = post(&api, "/v1/join-tokens", &writer, body.clone()).await;
        assert_eq!(res.status, 400, "{body}: {}", res.body);
    }
    // A tenant's join tokens are its own: another tenant neither lists nor revokes them.
    let (created, secret) = create(&api, &writer, json!({})).await;
    let id = created["id"].as_str().unwrap();
    assert_eq!(get(&api, "/v1/join-tokens", &api.token).await.body["items"], json!([]));
    let (_, other) = api.tenant("hooli", &[Scope::Read, Scope::Write]).await;
    delete(&api, &format!("/v1/join-tokens/{id}"), &other).await.problem(404, "not_found", id);

    // An admin makes one for another tenant; that tenant is deleted before it is used.
    let (created, orphan) = create(&api, &api.token, json!({"tenant": "hooli"})).await;
    assert_eq!(created["tenant"], "hooli");
    let res = delete(&api, "/v1/tenants/hooli", &api.token).await;
    assert!(res.status < 300, "{}", res.body);
    exchange(&api, &orphan).await.problem(401, "join_token_tenant_deleted", "\"hooli\"");
    // The live one still works.
    assert_eq!(exchange(&api, &secret).await.status, 201);
}

#[tokio::test]
async fn guessing_secrets_is_rate_limited_per_source() {
    let api = TestApi::start().await;
    let (_, secret) = create(&api, &api.token, json!({})).await;
    for _ in 0..10 {
        exchange(&api, &cloud_domain::join::new_secret()).await.problem(401, "join_token_invalid", "not valid");
    }
    let res = reqwest::Client::new().post(api.url("/v1/join")).json(&json!({ "secret": secret })).send().await.unwrap();
    let retry = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let res = crate::into_res(res).await;
    res.problem(429, "too_many_requests", "too many join attempts from 127.0.0.1");
    assert!(retry.parse::<u64>().is_ok_and(|s| (1..=6).contains(&s)), "Retry-After: {retry:?}");
}
