//! Services: FQDNs, port rules, CRUD, pagination, concurrency and atomicity.

use std::collections::HashSet;

use cloud_tests::TestApi;
use serde_json::{Value, json};

use crate::{create_service, delete, get, patch, post};

fn is_fqdn_of(fqdn: &str, name: &str) -> bool {
    let Some(rest) = fqdn.strip_prefix(&format!("{name}-")) else {
        return false;
    };
    let Some(suffix) = rest.strip_suffix(".dev.cloud.localhost") else {
        return false;
    };
    suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[tokio::test]
async fn create_expands_443_8080_and_generates_the_fqdn() {
    let api = TestApi::start().await;
    let s = create_service(&api, &api.token, json!({"name": "my-service", "ports": ["443:8080"]})).await;
    assert!(is_fqdn_of(s["fqdn"].as_str().unwrap(), "my-service"), "{}", s["fqdn"]);
    assert_eq!(
        s["ports"],
        json!([
            {"port": 80, "destination_port": 443, "handlers": ["http", "redirect"], "proxy": false},
            {"port": 443, "destination_port": 8080, "handlers": ["tls", "http"], "proxy": false},
        ])
    );
    assert_eq!(s["persistent"], true);
    assert_eq!(s["private_fqdn"], "my-service.internal");
    assert_eq!(s["instances"], json!([]));
    assert!(s["created_at"].is_string());

    // FQDNs are unique even for the same name in two tenants.
    let (_, other) = api.tenant("globex", &[cloud_domain::api::Scope::Read, cloud_domain::api::Scope::Write]).await;
    let t = create_service(&api, &other, json!({"name": "my-service"})).await;
    assert_ne!(t["fqdn"], s["fqdn"]);
    assert!(is_fqdn_of(t["fqdn"].as_str().unwrap(), "my-service"));
}

#[tokio::test]
async fn an_unnamed_service_gets_an_adjective_noun_name() {
    let api = TestApi::start().await;
    let s = create_service(&api, &api.token, json!({})).await;
    let name = s["name"].as_str().unwrap();
    let (adjective, noun) = name.split_once('-').expect("adjective-noun");
    assert!(!adjective.is_empty() && !noun.is_empty() && !noun.contains('-'), "{name}");
    assert!(is_fqdn_of(s["fqdn"].as_str().unwrap(), name));
}

#[tokio::test]
async fn port_specs_in_both_forms_and_their_rules() {
    let api = TestApi::start().await;
    let t = &api.token;
    let ok: [(Value, Value); 4] = [
        (
            json!(["8443:8080/tls"]),
            json!([{"port": 8443, "destination_port": 8080, "handlers": ["tls"], "proxy": false}]),
        ),
        (
            json!([{"port": 443, "destination_port": 8080, "handlers": ["tls", "http"]}]),
            json!([{"port": 443, "destination_port": 8080, "handlers": ["tls", "http"], "proxy": false}]),
        ),
        (
            json!(["30001:5432/tcp+proxy"]),
            json!([{"port": 30001, "destination_port": 5432, "handlers": ["tcp"], "proxy": true}]),
        ),
        (json!(["80:8080"]), json!([{"port": 80, "destination_port": 8080, "handlers": ["http"], "proxy": false}])),
    ];
    for (ports, want) in ok {
        let s = create_service(&api, t, json!({"ports": ports})).await;
        assert_eq!(s["ports"], want, "{ports}");
    }
    // A raw TCP port given as 0 is allocated from the range, and is then taken platform-wide.
    let s = create_service(&api, t, json!({"ports": ["0:6379/tcp"]})).await;
    let allocated = s["ports"][0]["port"].as_u64().unwrap();
    assert!((30000..=32767).contains(&allocated), "{allocated}");
    assert_ne!(allocated, 30001);
    let res = post(&api, "/v1/services", t, json!({"ports": [format!("{allocated}:6379/tcp")]})).await;
    res.problem(409, "port_conflict", &allocated.to_string());
    // The lowest free port is allocated, but never one the same list gives explicitly, even after the 0.
    let next = (30000..=32767).find(|p| *p != allocated && *p != 30001).unwrap();
    let s = create_service(&api, t, json!({"ports": ["0:6380/tcp", format!("{next}:6381/tcp")]})).await;
    let ports: Vec<u64> = s["ports"].as_array().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
    assert!(ports.contains(&next) && ports.iter().all(|p| (30000..=32767).contains(p)), "{ports:?}");
    assert_ne!(ports[0], ports[1]);

    // Each spec is valid alone; two claiming one public port conflict.
    let res = post(&api, "/v1/services", t, json!({"ports": ["443:8080", "443:9090"]})).await;
    res.problem(409, "port_conflict", "already mapped");

    let bad: [(Value, &str, &str); 8] = [
        (json!(["80:8080/tls"]), "invalid_port_spec", "80:8080/tls"),
        (json!(["443:8080/http"]), "invalid_port_spec", "443"),
        (json!(["8080/http"]), "invalid_port_spec", "8080/http"),
        (json!(["8443:80/http+redirect"]), "invalid_port_spec", "redirect"),
        (json!(["70000:80"]), "invalid_port_spec", "70000"),
        (json!(["443:8080/bogus"]), "invalid_port_spec", "bogus"),
        (json!(["0443:8080"]), "invalid_port_spec", "leading zero"),
        (json!([{"port": 443, "nope": 1}]), "invalid_json", "nope"),
    ];
    for (ports, code, needle) in bad {
        let res = post(&api, "/v1/services", t, json!({"ports": ports})).await;
        assert_eq!(res.status, 400, "{ports}: {}", res.body);
        res.problem(400, code, needle);
    }
    // Nothing was left behind by the refusals.
    let list = get(&api, "/v1/services", t).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn name_rules() {
    let api = TestApi::start().await;
    let cases = [
        ("My-App", "invalid_name", "invalid character"),
        ("-app", "invalid_name", "start or end"),
        ("app-", "invalid_name", "start or end"),
        ("a_b", "invalid_name", "invalid character"),
        ("", "invalid_name", "empty"),
        ("internal", "reserved_name", "reserved"),
        ("localhost", "reserved_name", "reserved"),
        ("123e4567-e89b-12d3-a456-426614174000", "invalid_name", "UUID"),
    ];
    for (name, code, needle) in cases {
        post(&api, "/v1/services", &api.token, json!({"name": name})).await.problem(400, code, needle);
    }
    let long = "a".repeat(64);
    post(&api, "/v1/services", &api.token, json!({"name": long})).await.problem(400, "invalid_name", "63");
    let max = "a".repeat(63);
    let s = create_service(&api, &api.token, json!({"name": max})).await;
    let label = s["fqdn"].as_str().unwrap().split('.').next().unwrap().len();
    assert!(label <= 63, "first label of the FQDN is {label} long");
}

#[tokio::test]
async fn crud_by_name_and_id_with_stable_pagination() {
    let api = TestApi::start().await;
    let t = &api.token;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(create_service(&api, t, json!({"name": format!("svc-{i}"), "ports": ["443:8080"]})).await);
    }
    post(&api, "/v1/services", t, json!({"name": "svc-3"})).await.problem(409, "already_exists", "svc-3");

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/services?limit=3&cursor={c}"),
            None => "/v1/services?limit=3".into(),
        };
        let page = get(&api, &path, t).await;
        assert_eq!(page.status, 200, "{}", page.body);
        pages += 1;
        for item in page.body["items"].as_array().unwrap() {
            seen.push(item["name"].as_str().unwrap().to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..7).map(|i| format!("svc-{i}")).collect();
    assert_eq!(seen, want, "creation order, each once");

    let by_name = get(&api, "/v1/services/svc-2", t).await;
    let by_id = get(&api, &format!("/v1/services/{}", created[2]["id"].as_str().unwrap()), t).await;
    assert_eq!(by_name.body, by_id.body);
    assert_eq!(by_name.body["fqdn"], created[2]["fqdn"]);

    let updated = patch(
        &api,
        "/v1/services/svc-2",
        t,
        json!({"ports": ["8443:9000/tls"], "soft_limit": 10, "hard_limit": 20, "domains": ["shop", "www.example.com."]}),
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.body);
    let s = &updated.body;
    assert_eq!(s["ports"], json!([{"port": 8443, "destination_port": 9000, "handlers": ["tls"], "proxy": false}]));
    assert_eq!((s["soft_limit"].as_u64(), s["hard_limit"].as_u64()), (Some(10), Some(20)));
    assert_eq!(s["fqdn"], created[2]["fqdn"], "the FQDN never changes");
    let domains = s["domains"].as_array().unwrap();
    let shop = domains.iter().find(|d| d["name"] == "shop.dev.cloud.localhost").expect("platform subdomain");
    assert_eq!((shop["custom"].as_bool(), shop["verified"].as_bool()), (Some(false), Some(true)));
    let www = domains.iter().find(|d| d["name"] == "www.example.com").expect("custom domain");
    assert_eq!(www["verified"], false);
    assert_eq!(www["verification"]["txt_name"], "_cloud-challenge.www.example.com");
    assert!(www["verification"]["txt_value"].as_str().unwrap().starts_with("cloud-verify="));
    assert_eq!(www["verification"]["cname_target"], created[2]["fqdn"]);

    // null clears a limit; absent fields stay.
    let cleared = patch(&api, "/v1/services/svc-2", t, json!({"soft_limit": null})).await;
    assert_eq!(cleared.body["soft_limit"], Value::Null);
    assert_eq!(cleared.body["hard_limit"], 20);
    assert_eq!(cleared.body["domains"].as_array().unwrap().len(), 2);
    patch(&api, "/v1/services/svc-2", t, json!({"soft_limit": 30})).await.problem(409, "limits_conflict", "hard_limit");

    // Scale to zero: set, refused out of range, turned off with null.
    let lazy = patch(&api, "/v1/services/svc-2", t, json!({"scale_to_zero_after": 300})).await;
    assert_eq!(lazy.body["scale_to_zero_after"], 300);
    for bad in [0, 604_801] {
        patch(&api, "/v1/services/svc-2", t, json!({"scale_to_zero_after": bad})).await.problem(
            400,
            "invalid_json",
            "scale_to_zero_after",
        );
    }
    let eager = patch(&api, "/v1/services/svc-2", t, json!({"scale_to_zero_after": null})).await;
    assert_eq!(eager.body["scale_to_zero_after"], Value::Null);

    // A domain is attached to one service only.
    patch(&api, "/v1/services/svc-3", t, json!({"domains": ["shop"]})).await.problem(409, "domain_taken", "shop");

    assert_eq!(delete(&api, "/v1/services/svc-2", t).await.status, 204);
    get(&api, "/v1/services/svc-2", t).await.problem(404, "not_found", "svc-2");
    delete(&api, "/v1/services/svc-2", t).await.problem(404, "not_found", "svc-2");
}

#[tokio::test]
async fn fifty_concurrent_creates_of_one_name_give_one_201() {
    let api = TestApi::start().await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = api.url("/v1/services");
        let token = api.token.clone();
        tasks.push(tokio::spawn(async move {
            let res = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"name": "contended", "ports": ["443:8080"]}))
                .send()
                .await
                .unwrap();
            crate::into_res(res).await
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let res = t.await.unwrap();
        if res.status == 409 {
            assert_eq!(res.code(), "already_exists");
        }
        statuses.push(res.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 49, "{statuses:?}");
    let list = get(&api, "/v1/services", &api.token).await;
    let names: HashSet<_> = list.body["items"].as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names.len(), 1);
}

#[tokio::test]
async fn idempotency_key_replays_the_first_response() {
    let api = TestApi::start().await;
    let send = |key: &'static str, body: Value| {
        let url = api.url("/v1/services");
        let token = api.token.clone();
        async move {
            let res = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let replayed = res.headers().contains_key("idempotent-replayed");
            (crate::into_res(res).await, replayed)
        }
    };
    let (first, replayed) = send("key-1", json!({"ports": ["443:8080"]})).await;
    assert_eq!((first.status, replayed), (201, false));
    let (again, replayed) = send("key-1", json!({"ports": ["443:8080"]})).await;
    assert_eq!((again.status, replayed), (201, true));
    assert_eq!(again.body, first.body, "same service, same generated name and FQDN");
    let (other, _) = send("key-1", json!({"ports": ["8443:8080/tls"]})).await;
    other.problem(422, "idempotency_key_reused", "different request");
    // Refusals are answers too: replayed, not re-run.
    let (bad, _) = send("key-2", json!({"name": "Bad"})).await;
    let (bad_again, replayed) = send("key-2", json!({"name": "Bad"})).await;
    assert_eq!((bad.status, bad_again.status, replayed), (400, 400, true));
    let list = get(&api, "/v1/services", &api.token).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_persistent_service_with_instances_is_deleted_only_when_forced() {
    let api = TestApi::start().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "web", "ports": ["443:8080"]})).await;
    let res = post(&api, "/v1/instances", t, json!({"image": "hello", "service": "web", "replicas": 2})).await;
    assert_eq!(res.status, 201, "{}", res.body);
    let svc = get(&api, "/v1/services/web", t).await;
    assert_eq!(svc.body["instances"].as_array().unwrap().len(), 2);

    delete(&api, "/v1/services/web", t).await.problem(409, "service_has_instances", "2 instance");
    // Deleting one instance of a persistent service leaves the service.
    let first = res.body["instances"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(delete(&api, &format!("/v1/instances/{first}"), t).await.status, 204);
    assert_eq!(get(&api, "/v1/services/web", t).await.status, 200);
    assert_eq!(delete(&api, "/v1/services/web?force=true", t).await.status, 204);
    let left = get(&api, "/v1/instances", t).await;
    assert_eq!(left.body["items"], json!([]), "force deletes the instances too");
}
