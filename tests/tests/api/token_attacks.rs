//! Attacks on tokens: replaying another token's idempotent response, a revoked token's replay, a JWT re-signed with
//! more scopes than its record, signing with what a copy of the database holds; and the upgrade of a signing key
//! that an earlier version left in clear.

use chrono::{Duration, Utc};
use cloud_api::auth::Claims;
use cloud_api::{ApiConfig, AppState, StartError, TokenSigner};
use cloud_domain::api::Scope;
use cloud_tests::TestApi;
use serde_json::{Value, json};

use crate::{Res, delete, get, post};

/// POSTs `body` to `path` with an Idempotency-Key; the response and whether it was a replay.
async fn post_once(api: &TestApi, path: &str, token: Option<&str>, key: &str, body: &Value) -> (Res, bool) {
    let mut req = reqwest::Client::new().post(api.url(path)).header("Idempotency-Key", key).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.expect("request sent");
    let replayed = res.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    (crate::into_res(res).await, replayed)
}

/// The tokens of the test tenant with this description.
async fn tokens_described(api: &TestApi, description: &str) -> Vec<Value> {
    let listed = get(api, "/v1/tokens?limit=100", &api.token).await;
    let items = listed.body["items"].as_array().expect("a page").clone();
    items.into_iter().filter(|t| t["description"] == description).collect()
}

#[tokio::test]
async fn a_read_only_token_repeating_a_write_tokens_request_and_key_is_refused_not_replayed() {
    let api = TestApi::start().await;
    let writer = api.issue_token(&api.tenant, &[Scope::Read, Scope::Write]).await.jwt;
    let reader = api.issue_token(&api.tenant, &[Scope::Read]).await.jwt;
    let body = json!({"scopes": ["read", "write"], "description": "deploy bot"});

    let (first, _) = post_once(&api, "/v1/tokens", Some(&writer), "k-1", &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(first.body["jwt"].is_string());

    // The reader sends the very same request with the same key: it must get what the handler gives a read-only
    // token, not the writer's response with its read+write JWT.
    let (stolen, replayed) = post_once(&api, "/v1/tokens", Some(&reader), "k-1", &body).await;
    assert!(!replayed, "a replay to another token: {}", stolen.body);
    assert!(stolen.body.get("jwt").is_none(), "another token's JWT leaked: {}", stolen.body);
    stolen.problem(403, "insufficient_scope", "write");
    // Asking again does not change it.
    let (again, _) = post_once(&api, "/v1/tokens", Some(&reader), "k-1", &body).await;
    again.problem(403, "insufficient_scope", "write");
    assert_eq!(tokens_described(&api, "deploy bot").await.len(), 1, "created once");
}

#[tokio::test]
async fn a_revoked_token_repeating_its_request_gets_401_and_a_valid_one_its_replay() {
    let api = TestApi::start().await;
    let writer = api.issue_token(&api.tenant, &[Scope::Read, Scope::Write]).await;
    let body = json!({"scopes": ["read"], "description": "ci"});

    let (first, replayed) = post_once(&api, "/v1/tokens", Some(&writer.jwt), "k-2", &body).await;
    assert_eq!((first.status, replayed), (201, false), "{}", first.body);
    // The legitimate retry gets the first response.
    let (retry, replayed) = post_once(&api, "/v1/tokens", Some(&writer.jwt), "k-2", &body).await;
    assert_eq!((retry.status, replayed), (201, true), "{}", retry.body);
    assert_eq!(retry.body, first.body);
    assert_eq!(tokens_described(&api, "ci").await.len(), 1, "created once");

    // Without a valid token, the same request and key get the handler's 401, never the response.
    let (res, _) = post_once(&api, "/v1/tokens", None, "k-2", &body).await;
    res.problem(401, "missing_token", "Bearer");
    let expired = api.signer.sign(&Claims {
        sub: api.tenant.id,
        jti: writer.token.id,
        iat: (Utc::now() - Duration::hours(2)).timestamp(),
        exp: (Utc::now() - Duration::hours(1)).timestamp(),
    });
    let (res, _) = post_once(&api, "/v1/tokens", Some(&expired), "k-2", &body).await;
    res.problem(401, "token_expired", "expired");

    assert_eq!(delete(&api, &format!("/v1/tokens/{}", writer.token.id), &api.token).await.status, 200);
    let (after, replayed) = post_once(&api, "/v1/tokens", Some(&writer.jwt), "k-2", &body).await;
    assert!(!replayed && after.body.get("jwt").is_none(), "a revoked token got a replay: {}", after.body);
    after.problem(401, "token_revoked", "revoked");
}

#[tokio::test]
async fn stored_responses_hold_no_token_in_clear() {
    let api = TestApi::start().await;
    let body = json!({"scopes": ["read"], "description": "ci"});
    let (first, _) = post_once(&api, "/v1/tokens", Some(&api.token), "k-3", &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let jwt = first.body["jwt"].as_str().unwrap();
    // What a copy of the database holds of the response (kept for replays) is sealed.
    let stored: Vec<(Vec<u8>,)> =
        sqlx::query_as("SELECT body_sealed FROM idempotency_requests").fetch_all(api.store.pool()).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert!(!stored[0].0.windows(jwt.len()).any(|w| w == jwt.as_bytes()), "the JWT in clear in the database");
    let (again, replayed) = post_once(&api, "/v1/tokens", Some(&api.token), "k-3", &body).await;
    assert_eq!((again.body, replayed), (first.body, true));
}

#[tokio::test]
async fn a_token_re_signed_with_more_scopes_gets_only_its_records_scopes() {
    let api = TestApi::start().await;
    let created = post(&api, "/v1/tokens", &api.token, json!({"scopes": ["read"], "description": "viewer"})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let reader = created.body["jwt"].as_str().unwrap().to_owned();

    // The attacker holds the signing key (as a copy of an old database would give it) and the token's id, and
    // signs the claims of the read-only token with the admin scope, as tokens of earlier versions carried it.
    let now = Utc::now().timestamp();
    let forged = api.signer.sign(&json!({
        "sub": api.tenant.id, "jti": id, "scopes": ["read", "write", "admin"], "iat": now, "exp": now + 3600,
    }));
    get(&api, "/v1/tenants", &forged).await.problem(403, "insufficient_scope", "admin");
    post(&api, "/v1/tenants", &forged, json!({"name": "evil"})).await.problem(403, "insufficient_scope", "admin");
    post(&api, "/v1/services", &forged, json!({})).await.problem(403, "insufficient_scope", "write");
    let me = get(&api, "/v1/whoami", &forged).await;
    assert_eq!((me.status, &me.body["scopes"]), (200, &json!(["read"])), "{}", me.body);

    // Another tenant in the claims than in the record is refused outright.
    let (other, _) = api.tenant("other", &[Scope::Read]).await;
    let moved = api.signer.sign(&json!({"sub": other.id, "jti": id, "iat": now, "exp": now + 3600}));
    get(&api, "/v1/services", &moved).await.problem(401, "invalid_token", "record");

    // The real token and the listing show what the record grants.
    let me = get(&api, "/v1/whoami", &reader).await;
    assert_eq!((&me.body["scopes"], &me.body["token_id"]), (&json!(["read"]), &json!(id)));
    let me = get(&api, "/v1/whoami", &api.token).await;
    assert_eq!(me.body["scopes"], json!(["read", "write", "admin"]));
    let listed = tokens_described(&api, "viewer").await;
    assert_eq!(listed[0]["scopes"], json!(["read"]));
}

#[tokio::test]
async fn no_value_stored_in_platform_secrets_signs_a_token_the_api_accepts() {
    let api = TestApi::start().await;
    // Every secret the platform keeps: the signing key and the platform CA.
    assert_eq!(reqwest::get(api.url("/v1/ca.pem")).await.unwrap().status(), 200);
    let record = api.issue_token(&api.tenant, &[Scope::Read]).await.token;
    let now = Utc::now().timestamp();
    let claims = Claims { sub: api.tenant.id, jti: record.id, iat: now, exp: now + 3600 };
    assert_eq!(get(&api, "/v1/whoami", &api.signer.sign(&claims)).await.status, 200, "the claims are valid");

    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT name, value FROM platform_secrets").fetch_all(api.store.pool()).await.unwrap();
    assert!(rows.iter().any(|(name, _)| name.starts_with("jwt")), "the signing key is among them: {rows:?}");
    for (name, value) in rows {
        let jwt = TokenSigner::new(&value).sign(&claims);
        let res = get(&api, "/v1/whoami", &jwt).await;
        assert_eq!(res.status, 401, "platform_secrets.{name} signs tokens the API accepts: {}", res.body);
        res.problem(401, "invalid_token", "signature");
    }
}

#[tokio::test]
async fn a_signing_key_left_in_clear_is_sealed_at_start_and_its_tokens_keep_working() {
    // The database of the previous version: its signing key in clear, a token it issued (with a scopes claim).
    let store = cloud_tests::fresh_store().await;
    let clear = uuid::Uuid::new_v4().as_bytes().repeat(2);
    store.platform_secret_or("jwt-hs256", clear.clone()).await.unwrap();
    let tenant = store.create_tenant("legacy", Default::default()).await.unwrap();
    let expires = Utc::now() + Duration::days(1);
    let record = store.create_token(tenant.id, &[Scope::Read, Scope::Write], expires, "old").await.unwrap();
    let old_jwt = TokenSigner::new(&clear).sign(&json!({
        "sub": tenant.id, "jti": record.id, "scopes": ["read", "write"],
        "iat": Utc::now().timestamp(), "exp": expires.timestamp(),
    }));

    let api = TestApi::start_on(store.clone(), ApiConfig::default()).await;
    assert_eq!(store.stored_platform_secret("jwt-hs256").await.unwrap(), None, "no clear copy left");
    let sealed = store.stored_platform_secret("jwt-hs256-sealed").await.unwrap().expect("a sealed key");
    assert!(!sealed.windows(clear.len()).any(|w| w == clear), "the key in clear in the sealed value");
    assert_eq!(api.secret_key.open(&sealed).unwrap(), clear, "the same key, sealed");

    let me = get(&api, "/v1/whoami", &old_jwt).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!((&me.body["tenant"]["name"], &me.body["scopes"]), (&json!("legacy"), &json!(["read", "write"])));
    // Another replica (or a restart) gets the same key.
    let again = TokenSigner::load(&store, &api.secret_key).await.unwrap();
    let claims = Claims { sub: tenant.id, jti: record.id, iat: Utc::now().timestamp(), exp: expires.timestamp() };
    assert_eq!(again.sign(&claims), TokenSigner::new(&clear).sign(&claims));
}

#[tokio::test]
async fn the_api_needs_the_platform_secret_key_that_sealed_its_signing_key() {
    let api = TestApi::start().await;
    let e = AppState::new(api.store.clone(), ApiConfig::default()).await.unwrap_err();
    assert!(matches!(e, StartError::NoSecretKey) && e.to_string().contains("platform.secret_key_file"), "{e}");
    let other = std::sync::Arc::new(cloud_tests::random_secret_key());
    let e = AppState::new(api.store.clone(), ApiConfig { secret_key: Some(other), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, StartError::Open(_)) && e.to_string().contains("platform.secret_key_file"), "{e}");
}

#[tokio::test]
async fn a_tokens_grant_cannot_change_in_the_database() {
    let api = TestApi::start().await;
    let record = api.issue_token(&api.tenant, &[Scope::Read]).await.token;
    let (other, _) = api.tenant("other", &[Scope::Read]).await;
    for change in [
        "UPDATE tokens SET scopes = ARRAY['read', 'admin'] WHERE id = $1",
        "UPDATE tokens SET expires_at = expires_at + interval '1 year' WHERE id = $1",
    ] {
        let e = sqlx::query(change).bind(record.id).execute(api.store.pool()).await.unwrap_err();
        assert!(e.to_string().contains("cannot change"), "{change}: {e}");
    }
    let e = sqlx::query("UPDATE tokens SET tenant_id = $2 WHERE id = $1")
        .bind(record.id)
        .bind(other.id)
        .execute(api.store.pool())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot change"), "{e}");
    // Revocation is the one change a token sees.
    api.store.revoke_token(api.tenant.id, record.id).await.unwrap();
}
