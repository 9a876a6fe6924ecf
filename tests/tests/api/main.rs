//! API integration tests: the real API on port 0 over a fresh real PostgreSQL database per test.

mod auth;
mod certificates;
mod domains;
mod events;
mod feed;
mod hosts;
mod images;
mod instances;
mod join;
mod logs;
mod malformed;
mod oci;
mod openapi;
mod rollouts;
mod secrets;
mod services;
mod sse;
mod tenants;
mod tls;
mod token_attacks;

use cloud_tests::TestApi;
use reqwest::Method;
use serde_json::Value;

/// A response as the tests look at it.
pub struct Res {
    pub status: u16,
    pub body: Value,
    pub content_type: String,
}

impl Res {
    /// The problem document's code; panics with the body when this is not a problem document.
    #[track_caller]
    pub fn code(&self) -> &str {
        assert_eq!(self.content_type, "application/problem+json", "not a problem: {} {}", self.status, self.body);
        self.body["code"].as_str().expect("problem has a code")
    }

    /// Asserts a status and problem code, and that the detail mentions `needle`.
    #[track_caller]
    pub fn problem(&self, status: u16, code: &str, needle: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.code(), code, "{}", self.body);
        let detail = self.body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(needle), "detail {detail:?} should mention {needle:?}");
    }
}

/// Sends a request with an optional bearer token and JSON body.
pub async fn call(api: &TestApi, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Res {
    let client = reqwest::Client::new();
    let mut req = client.request(method, api.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("request sent");
    into_res(res).await
}

pub async fn into_res(res: reqwest::Response) -> Res {
    let status = res.status().as_u16();
    let content_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let bytes = res.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    assert!(status < 500, "server error {status}: {body}");
    Res { status, body, content_type }
}

pub async fn get(api: &TestApi, path: &str, token: &str) -> Res {
    call(api, Method::GET, path, Some(token), None).await
}

pub async fn post(api: &TestApi, path: &str, token: &str, body: Value) -> Res {
    call(api, Method::POST, path, Some(token), Some(body)).await
}

pub async fn patch(api: &TestApi, path: &str, token: &str, body: Value) -> Res {
    call(api, Method::PATCH, path, Some(token), Some(body)).await
}

pub async fn delete(api: &TestApi, path: &str, token: &str) -> Res {
    call(api, Method::DELETE, path, Some(token), None).await
}

/// Creates a service and returns its JSON, asserting 201.
pub async fn create_service(api: &TestApi, token: &str, body: Value) -> Value {
    let res = post(api, "/v1/services", token, body).await;
    assert_eq!(res.status, 201, "{}", res.body);
    res.body
}
