//! Malformed requests get 4xx problem documents that name the problem, never 5xx.

use cloud_tests::TestApi;
use reqwest::Method;

use crate::{call, get, into_res};

async fn raw(api: &TestApi, method: Method, path: &str, content_type: &str, body: &'static str) -> crate::Res {
    let res = reqwest::Client::new()
        .request(method, api.url(path))
        .bearer_auth(&api.token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    into_res(res).await
}

#[tokio::test]
async fn malformed_bodies_queries_and_paths() {
    let api = TestApi::start().await;
    let json = "application/json";
    let cases: Vec<(Method, &str, &str, &'static str, u16, &str, &str)> = vec![
        (Method::POST, "/v1/services", json, "{", 400, "invalid_json", "EOF"),
        (Method::POST, "/v1/services", json, "42", 400, "invalid_json", "invalid type"),
        (Method::POST, "/v1/services", json, r#"{"name": 5}"#, 400, "invalid_json", "invalid type"),
        (Method::POST, "/v1/services", json, r#"{"nmae": "x"}"#, 400, "invalid_json", "nmae"),
        (Method::POST, "/v1/services", json, r#"{"ports": [443]}"#, 400, "invalid_json", "spec string"),
        (Method::POST, "/v1/services", json, r#"{"soft_limit": -1}"#, 400, "invalid_json", "-1"),
        (Method::POST, "/v1/services", "text/plain", "{}", 415, "unsupported_media_type", "application/json"),
        (Method::POST, "/v1/instances", json, r#"{"replicas": 2}"#, 400, "invalid_json", "image"),
        (Method::PATCH, "/v1/services/x", json, r#"{"ports": "443"}"#, 400, "invalid_json", "invalid type"),
        (Method::POST, "/v1/tokens", json, r#"{"scopes": ["root"]}"#, 400, "invalid_json", "root"),
    ];
    for (method, path, ct, body, status, code, needle) in cases {
        let res = raw(&api, method.clone(), path, ct, body).await;
        assert_eq!(res.status, status, "{method} {path} {body}: {}", res.body);
        res.problem(status, code, needle);
    }
    let big = format!(r#"{{"name": "{}"}}"#, "a".repeat(300 * 1024));
    let res = reqwest::Client::new()
        .post(api.url("/v1/services"))
        .bearer_auth(&api.token)
        .header("content-type", json)
        .body(big)
        .send()
        .await
        .unwrap();
    into_res(res).await.problem(413, "payload_too_large", "limit");

    get(&api, "/v1/services?limit=0", &api.token).await.problem(400, "invalid_query", "limit");
    get(&api, "/v1/services?limit=abc", &api.token).await.problem(400, "invalid_query", "limit");
    get(&api, "/v1/services?cursor=garbage", &api.token).await.problem(400, "invalid_cursor", "cursor");
    get(&api, "/v1/services?colour=red", &api.token).await.problem(400, "invalid_query", "colour");
    get(&api, "/v1/nothing-here", &api.token).await.problem(404, "route_not_found", "/v1/nothing-here");
    let res = call(&api, Method::DELETE, "/v1/tokens/not-a-uuid", Some(&api.token), None).await;
    res.problem(404, "not_found", "not-a-uuid");
    let res = raw(&api, Method::POST, "/v1/services", json, "{}").await;
    assert_eq!(res.status, 201);
    let res = reqwest::Client::new()
        .post(api.url("/v1/services"))
        .bearer_auth(&api.token)
        .header("idempotency-key", "x".repeat(300))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    into_res(res).await.problem(400, "invalid_request", "Idempotency-Key");
}

#[tokio::test]
async fn health_readiness_metrics_and_docs() {
    let api = TestApi::start().await;
    let client = reqwest::Client::new();
    let text = |path: &'static str| {
        let client = client.clone();
        let url = api.url(path);
        async move {
            let res = client.get(url).send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    assert_eq!(text("/healthz").await, (200, "ok\n".into()));
    assert_eq!(text("/readyz").await, (200, "ready\n".into()));
    get(&api, "/v1/services", &api.token).await;
    let (status, metrics) = text("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"cloud_api_requests_total{method="GET",route="/v1/services",status="200"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("cloud_api_database_up 1"), "{metrics}");
    let (status, docs) = text("/docs/").await;
    assert_eq!(status, 200);
    assert!(docs.contains("swagger"), "an offline docs page");
    let (status, spec) = text("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(spec.contains("\"/v1/services\""));

    // The platform CA, public: the certificate only, never the key, the same for every replica. The first to ask
    // (the API holds the platform secret key too) creates it.
    let res = client.get(api.url("/v1/ca.pem")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/x-pem-file");
    let pem = res.text().await.unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----") && !pem.contains("PRIVATE KEY"), "{pem}");
    let ca = cloud_certs::PlatformCa::load_or_create(&api.store, &api.secret_key).await.unwrap();
    assert_eq!(pem, ca.cert_pem());
    assert_eq!(text("/v1/ca.pem").await.1, pem, "stable across requests");
}

/// What the document allows is accepted as it says, and what it rules out is refused, never changed: a quota
/// past its bound is refused by name (it was stored as 2147483647), an integral number written `5.0` is the integer
/// 5 (JSON Schema says so), and a method a path does not have is `405` with the ones it has.
#[tokio::test]
async fn the_server_keeps_to_the_document() {
    let api = TestApi::start().await;
    let t = &api.token;
    let before = get(&api, "/v1/tenants/acme", t).await;
    let res =
        crate::patch(&api, "/v1/tenants/acme", t, serde_json::json!({"quotas": {"max_images": 2147483648u64}})).await;
    res.problem(400, "invalid_json", "quotas.max_images");
    assert_eq!(get(&api, "/v1/tenants/acme", t).await.body["quotas"], before.body["quotas"], "nothing changed");
    let res = crate::patch(&api, "/v1/tenants/acme", t, serde_json::json!({"quotas": {"max_images": 39880.0}})).await;
    assert_eq!((res.status, &res.body["quotas"]["max_images"]), (200, &serde_json::json!(39880)), "{}", res.body);
    let res = raw(&api, Method::POST, "/v1/services", "application/json", r#"{"soft_limit": 5.5}"#).await;
    res.problem(400, "invalid_json", "soft_limit");

    for (method, path, allow) in [
        (Method::PUT, "/v1/services", "GET, POST"),
        (Method::POST, "/v1/services/web", "GET, DELETE, PATCH"),
        (Method::DELETE, "/v1/events", "GET"),
    ] {
        let res = reqwest::Client::new().request(method.clone(), api.url(path)).bearer_auth(t).send().await.unwrap();
        let allowed = res.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
        let res = into_res(res).await;
        res.problem(405, "method_not_allowed", method.as_str());
        assert_eq!(allowed.as_deref(), Some(allow), "{method} {path}");
    }
}
