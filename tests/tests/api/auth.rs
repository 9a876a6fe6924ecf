//! Tokens: missing, malformed, forged, expired and revoked tokens; scopes.

use chrono::{Duration, Utc};
use cloud_domain::api::Scope;
use cloud_tests::TestApi;
use reqwest::Method;
use serde_json::json;

use crate::{call, delete, get, post};

#[tokio::test]
async fn requests_without_a_valid_token_are_refused_with_named_reasons() {
    let api = TestApi::start().await;
    let res = call(&api, Method::GET, "/v1/services", None, None).await;
    res.problem(401, "missing_token", "Bearer");
    let res =
        reqwest::Client::new().get(api.url("/v1/services")).header("authorization", "Basic abc").send().await.unwrap();
    crate::into_res(res).await.problem(401, "invalid_token", "Bearer");
    get(&api, "/v1/services", "not-a-jwt").await.problem(401, "invalid_token", "signature");

    // A token signed with another key.
    let forged = cloud_api::TokenSigner::new(b"some other key").sign(&cloud_api::auth::Claims {
        sub: api.tenant.id,
        jti: uuid::Uuid::new_v4(),
        iat: Utc::now().timestamp(),
        exp: (Utc::now() + Duration::hours(1)).timestamp(),
    });
    get(&api, "/v1/services", &forged).await.problem(401, "invalid_token", "signature");
}

#[tokio::test]
async fn expired_and_revoked_tokens_stop_working() {
    let api = TestApi::start().await;
    // An expired token: a real record and a correctly signed JWT whose expiry has passed.
    let past = Utc::now() - Duration::seconds(5);
    let record = api.store.create_token(api.tenant.id, &[Scope::Read], past, "expired").await.unwrap();
    let expired = api.signer.sign(&cloud_api::auth::Claims {
        sub: api.tenant.id,
        jti: record.id,
        iat: past.timestamp() - 60,
        exp: past.timestamp(),
    });
    get(&api, "/v1/services", &expired).await.problem(401, "token_expired", "expired");

    let created = post(&api, "/v1/tokens", &api.token, json!({"scopes": ["read"], "description": "ci"})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let jwt = created.body["jwt"].as_str().unwrap().to_owned();
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(get(&api, "/v1/services", &jwt).await.status, 200);
    let listed = get(&api, "/v1/tokens", &api.token).await;
    assert!(listed.body["items"].as_array().unwrap().iter().any(|t| t["id"] == id.as_str() && t.get("jwt").is_none()));

    let revoked = delete(&api, &format!("/v1/tokens/{id}"), &api.token).await;
    assert_eq!(revoked.status, 200);
    assert!(revoked.body["revoked_at"].is_string());
    get(&api, "/v1/services", &jwt).await.problem(401, "token_revoked", "revoked");
}

#[tokio::test]
async fn scopes_limit_what_a_token_may_do() {
    let api = TestApi::start().await;
    let (_, reader) = api.tenant("readonly", &[Scope::Read]).await;
    assert_eq!(get(&api, "/v1/services", &reader).await.status, 200);
    post(&api, "/v1/services", &reader, json!({})).await.problem(403, "insufficient_scope", "write");
    let (_, writer) = api.tenant("writer", &[Scope::Read, Scope::Write]).await;
    post(&api, "/v1/tenants", &writer, json!({"name": "x"})).await.problem(403, "insufficient_scope", "admin");
    post(&api, "/v1/tokens", &writer, json!({"scopes": ["admin"]})).await.problem(403, "insufficient_scope", "admin");
    post(&api, "/v1/tokens", &writer, json!({"expires_in_seconds": 5})).await.problem(
        400,
        "invalid_json",
        "expires_in_seconds",
    );

    let me = get(&api, "/v1/whoami", &writer).await;
    assert_eq!(me.body["tenant"]["name"], "writer");
    assert_eq!(me.body["scopes"], json!(["read", "write"]));
}
