//! Tenants, quotas and isolation between tenants on every endpoint.

use cloud_domain::api::Scope;
use cloud_tests::TestApi;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{call, create_service, delete, get, patch, post};

#[tokio::test]
async fn admins_manage_tenants_and_quotas() {
    let api = TestApi::start().await;
    let t = &api.token;
    let created = post(&api, "/v1/tenants", t, json!({"name": "initech", "quotas": {"max_services": 1}})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["quotas"]["max_services"], 1);
    assert_eq!(created.body["quotas"]["max_instances"], 200, "defaults for the rest");
    assert_ne!(created.body["network"], api.tenant.network.as_str());
    post(&api, "/v1/tenants", t, json!({"name": "initech"})).await.problem(409, "already_exists", "initech");
    post(&api, "/v1/tenants", t, json!({"name": "Bad Name"})).await.problem(400, "invalid_name", "Bad Name");

    let token = post(&api, "/v1/tokens", t, json!({"tenant": "initech", "scopes": ["read", "write"]})).await;
    assert_eq!(token.status, 201, "{}", token.body);
    let initech = token.body["jwt"].as_str().unwrap().to_owned();
    create_service(&api, &initech, json!({})).await;
    post(&api, "/v1/services", &initech, json!({})).await.problem(403, "quota_exceeded", "max_services is 1");
    let raised = patch(&api, "/v1/tenants/initech", t, json!({"quotas": {"max_services": 2}})).await;
    assert_eq!(raised.body["quotas"]["max_services"], 2);
    assert_eq!(raised.body["usage"]["services"], 1);
    create_service(&api, &initech, json!({})).await;

    delete(&api, "/v1/tenants/initech", t).await.problem(409, "tenant_not_empty", "2 service(s)");
    let list = get(&api, "/v1/tenants", t).await;
    let names: Vec<&str> = list.body["items"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme", "initech"]);
}

/// Creates one of everything for tenant A, then checks that tenant B can neither see nor touch any of it.
#[tokio::test]
async fn another_tenants_resources_are_not_found_on_every_endpoint() {
    let api = TestApi::start().await;
    let a = &api.token;
    let svc = create_service(&api, a, json!({"name": "secret", "ports": ["443:8080"]})).await;
    let inst = post(&api, "/v1/instances", a, json!({"image": "hello", "name": "hidden", "service": "secret"})).await;
    let inst_id = inst.body["instances"][0]["id"].as_str().unwrap().to_owned();
    let img =
        crate::images::upload(&api, a, "private-img", &crate::images::bundle(r#"{"command":["./run"],"port":80}"#))
            .await;
    assert_eq!(img.status, 201, "{}", img.body);
    let img_id = img.body["id"].as_str().unwrap().to_owned();
    let tok = post(&api, "/v1/tokens", a, json!({"scopes": ["read"]})).await;
    let tok_id = tok.body["id"].as_str().unwrap().to_owned();

    let (_, b) = api.tenant("intruder", &[Scope::Read, Scope::Write]).await;
    let svc_id = svc["id"].as_str().unwrap();
    let probes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/services/secret".into(), None),
        (Method::GET, format!("/v1/services/{svc_id}"), None),
        (Method::PATCH, "/v1/services/secret".into(), Some(json!({"hard_limit": 1}))),
        (Method::DELETE, format!("/v1/services/{svc_id}?force=true"), None),
        (Method::GET, "/v1/instances/hidden".into(), None),
        (Method::GET, format!("/v1/instances/{inst_id}"), None),
        (Method::POST, "/v1/instances/hidden/stop".into(), Some(json!({}))),
        (Method::POST, format!("/v1/instances/{inst_id}/start"), Some(json!({}))),
        (Method::DELETE, "/v1/instances/hidden".into(), None),
        (Method::GET, "/v1/images/private-img".into(), None),
        (Method::GET, format!("/v1/images/{img_id}"), None),
        (Method::DELETE, "/v1/images/private-img".into(), None),
        (Method::DELETE, format!("/v1/tokens/{tok_id}"), None),
        (Method::GET, "/v1/tenants/acme".into(), None),
        (Method::POST, "/v1/instances".into(), Some(json!({"image": "private-img"}))),
        (Method::POST, "/v1/instances".into(), Some(json!({"image": "hello", "service": "secret"}))),
        (Method::POST, "/v1/instances".into(), Some(json!({"image": "hello", "service": svc_id}))),
        (Method::POST, "/v1/tokens".into(), Some(json!({"tenant": "acme"}))),
    ];
    for (method, path, body) in probes {
        let res = call(&api, method.clone(), &path, Some(&b), body).await;
        assert_eq!(res.status, 404, "{method} {path}: {}", res.body);
        assert_eq!(res.code(), "not_found");
    }
    // Lists show nothing of A's.
    for path in ["/v1/services", "/v1/instances", "/v1/tokens"] {
        let list = get(&api, path, &b).await;
        let text = list.body.to_string();
        assert!(!text.contains("secret") && !text.contains("hidden") && !text.contains(&tok_id), "{path}: {text}");
    }
    let images = get(&api, "/v1/images", &b).await;
    let names: Vec<&str> =
        images.body["items"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hello"], "built-in images only");
    // And A's resources are intact.
    assert_eq!(get(&api, "/v1/services/secret", a).await.body["hard_limit"], Value::Null);
    assert_eq!(get(&api, "/v1/instances/hidden", a).await.body["state"], "pending");
}
