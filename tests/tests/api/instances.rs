//! Instances: private IPs and FQDNs, ephemeral services, state transitions, quotas and atomicity.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use cloud_tests::TestApi;
use serde_json::json;

use crate::{create_service, delete, get, patch, post};

#[tokio::test]
async fn instances_get_private_ips_from_the_tenant_network_and_private_fqdns() {
    let api = TestApi::start().await;
    let res = post(&api, "/v1/instances", &api.token, json!({"image": "hello", "replicas": 3})).await;
    assert_eq!(res.status, 201, "{}", res.body);
    let net: ipnet_lite::Net = api.tenant.network.parse().unwrap();
    let mut ips = HashSet::new();
    for i in res.body["instances"].as_array().unwrap() {
        let name = i["name"].as_str().unwrap();
        let (image, suffix) = name.rsplit_once('-').unwrap();
        assert_eq!(image, "hello");
        assert_eq!(suffix.len(), 5);
        assert_eq!(i["private_fqdn"], format!("{name}.internal"));
        assert_eq!(i["tenant_private_fqdn"], format!("{name}.acme.internal"));
        assert_eq!((i["state"].as_str(), i["desired_state"].as_str()), (Some("pending"), Some("running")));
        let ip: Ipv4Addr = i["private_ip"].as_str().unwrap().parse().unwrap();
        assert!(net.contains(ip), "{ip} in {}", api.tenant.network);
        assert_ne!(ip, net.gateway(), "the gateway is the bridge's");
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 3, "unique private IPs");

    // A second tenant's network is disjoint.
    let (other, token) = api.tenant("globex", &[cloud_domain::api::Scope::Read, cloud_domain::api::Scope::Write]).await;
    let o: ipnet_lite::Net = other.network.parse().unwrap();
    assert!(!o.contains(net.addr) && !net.contains(o.addr));
    let res = post(&api, "/v1/instances", &token, json!({"image": "hello", "name": "web"})).await;
    let ip: Ipv4Addr = res.body["instances"][0]["private_ip"].as_str().unwrap().parse().unwrap();
    assert!(o.contains(ip));
}

/// A deleted instance's IP is not handed out again while held (an edge or DNS cache may still mean the old
/// instance); addresses go round the network, so a released one comes back last.
#[tokio::test]
async fn released_private_ips_are_held_then_reused_last() {
    let ip_of = |b: &serde_json::Value| b["instances"][0]["private_ip"].as_str().unwrap().to_owned();
    for (hold, reused) in [(std::time::Duration::from_secs(60), false), (std::time::Duration::ZERO, true)] {
        // A /29: five instance addresses (.2 to .6; .1 is the gateway).
        let settings = cloud_store::Settings {
            tenant_pool: "10.77.0.0/24".parse().unwrap(),
            tenant_prefix: 29,
            ip_hold: hold,
            ..Default::default()
        };
        let api = TestApi::start_with_settings(settings, Default::default()).await;
        let t = &api.token;
        let mut ips = Vec::new();
        for i in 0..5 {
            let res = post(&api, "/v1/instances", t, json!({"image": "hello", "name": format!("i{i}")})).await;
            assert_eq!(res.status, 201, "{}", res.body);
            ips.push(ip_of(&res.body));
        }
        assert_eq!(ips, ["10.77.0.2", "10.77.0.3", "10.77.0.4", "10.77.0.5", "10.77.0.6"], "handed out in order");
        assert_eq!(delete(&api, "/v1/instances/i1", t).await.status, 204);
        let res = reqwest::Client::new()
            .post(api.url("/v1/instances"))
            .bearer_auth(t)
            .json(&json!({"image": "hello", "name": "late"}))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await.unwrap();
        if reused {
            assert_eq!(status, 201, "{body}");
            assert_eq!(ip_of(&body), "10.77.0.3", "the only free address, once its hold is over");
        } else {
            // The tenant's network is full until the hold ends: retry later.
            assert_eq!((status, body["code"].as_str()), (503, Some("capacity_exhausted")), "{body}");
        }
    }
}

#[tokio::test]
async fn an_ephemeral_service_is_deleted_with_its_last_instance() {
    let api = TestApi::start().await;
    let t = &api.token;
    let res = post(&api, "/v1/instances", t, json!({"image": "hello", "ports": ["443:8080"]})).await;
    assert_eq!(res.status, 201, "{}", res.body);
    let service = &res.body["service"];
    assert_eq!(service["persistent"], false);
    let first = res.body["instances"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(service["name"], first, "named after its instance");
    assert_eq!(res.body["instances"][0]["service"]["fqdn"], service["fqdn"]);

    // A second instance joins it; deleting one keeps the service, deleting the last removes it.
    let svc = service["name"].as_str().unwrap().to_owned();
    let second = post(&api, "/v1/instances", t, json!({"image": "hello", "service": svc})).await;
    let second = second.body["instances"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(delete(&api, &format!("/v1/instances/{first}"), t).await.status, 204);
    assert_eq!(get(&api, &format!("/v1/services/{svc}"), t).await.status, 200);
    assert_eq!(delete(&api, &format!("/v1/instances/{second}"), t).await.status, 204);
    get(&api, &format!("/v1/services/{svc}"), t).await.problem(404, "not_found", &svc);

    // A persistent service stays when its last instance goes.
    create_service(&api, t, json!({"name": "keep", "ports": ["443:8080"]})).await;
    let only = post(&api, "/v1/instances", t, json!({"image": "hello", "service": "keep", "name": "only"})).await;
    assert_eq!(only.status, 201);
    assert_eq!(delete(&api, "/v1/instances/only", t).await.status, 204);
    assert_eq!(get(&api, "/v1/services/keep", t).await.body["instances"], json!([]));
}

#[tokio::test]
async fn concurrent_deletes_of_the_last_two_instances_remove_the_ephemeral_service_once() {
    let api = TestApi::start().await;
    let t = &api.token;
    for round in 0..5 {
        let res = post(&api, "/v1/instances", t, json!({"image": "hello", "ports": ["443:8080"], "replicas": 2})).await;
        assert_eq!(res.status, 201, "{}", res.body);
        let svc = res.body["service"]["name"].as_str().unwrap().to_owned();
        let names: Vec<String> =
            res.body["instances"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().into()).collect();
        let deletes = names.iter().map(|n| {
            let url = api.url(&format!("/v1/instances/{n}"));
            let token = t.clone();
            tokio::spawn(async move { reqwest::Client::new().delete(url).bearer_auth(token).send().await.unwrap() })
        });
        for d in deletes.collect::<Vec<_>>() {
            assert_eq!(d.await.unwrap().status(), 204);
        }
        get(&api, &format!("/v1/services/{svc}"), t).await.problem(404, "not_found", &svc);
        let _ = round;
    }
}

#[tokio::test]
async fn state_transitions_follow_the_rules() {
    let api = TestApi::start().await;
    let t = &api.token;
    let res = post(&api, "/v1/instances", t, json!({"image": "hello", "name": "web"})).await;
    assert_eq!(res.body["instances"][0]["state"], "pending");
    let start = post(&api, "/v1/instances/web/start", t, json!({})).await;
    start.problem(409, "invalid_state_transition", "");
    let stopped = post(&api, "/v1/instances/web/stop", t, json!({})).await;
    assert_eq!(stopped.status, 200, "{}", stopped.body);
    assert_eq!(
        (stopped.body["state"].as_str(), stopped.body["desired_state"].as_str()),
        (Some("stopped"), Some("stopped"))
    );
    post(&api, "/v1/instances/web/stop", t, json!({})).await.problem(409, "invalid_state_transition", "stopped");
    let started = post(&api, "/v1/instances/web/start", t, json!({})).await;
    assert_eq!(
        (started.body["state"].as_str(), started.body["desired_state"].as_str()),
        (Some("pending"), Some("running"))
    );

    let idle = post(&api, "/v1/instances", t, json!({"image": "hello", "name": "idle", "start": false})).await;
    assert_eq!(idle.body["instances"][0]["state"], "stopped");
    post(&api, "/v1/instances/nope/start", t, json!({})).await.problem(404, "not_found", "nope");
}

#[tokio::test]
async fn bad_instance_requests_are_refused_and_leave_nothing() {
    let api = TestApi::start().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "web", "ports": ["443:8080"]})).await;
    let cases = [
        (json!({"image": "nope"}), 404, "not_found", "nope"),
        (json!({"image": "hello", "service": "missing"}), 404, "not_found", "missing"),
        (json!({"image": "hello", "service": "web", "ports": ["443:8080"]}), 400, "invalid_request", "not both"),
        (json!({"image": "hello", "replicas": 0}), 400, "invalid_json", "replicas"),
        (json!({"image": "hello", "memory_mb": 1}), 400, "invalid_json", "memory_mb"),
        (json!({"image": "hello", "env": {"PORT": "1"}}), 400, "invalid_request", "PORT"),
        (json!({"image": "hello", "env": {"1X": "1"}}), 400, "invalid_request", "1X"),
        (json!({"image": "hello", "name": "Web"}), 400, "invalid_name", "Web"),
        (json!({"image": "hello", "ports": ["80:80/tls"]}), 400, "invalid_port_spec", "80:80/tls"),
        (json!({"image": "hello", "restart_policy": "sometimes"}), 400, "invalid_json", "sometimes"),
    ];
    for (body, status, code, needle) in cases {
        post(&api, "/v1/instances", t, body).await.problem(status, code, needle);
    }
    post(&api, "/v1/instances", t, json!({"image": "hello", "name": "one"})).await;
    post(&api, "/v1/instances", t, json!({"image": "hello", "name": "one"})).await.problem(
        409,
        "already_exists",
        "one",
    );

    // Over quota with an ephemeral service: neither the instances nor the service are created.
    patch(&api, "/v1/tenants/acme", t, json!({"quotas": {"max_instances": 2}})).await;
    let res = post(&api, "/v1/instances", t, json!({"image": "hello", "ports": ["443:8080"], "replicas": 2})).await;
    res.problem(403, "quota_exceeded", "max_instances");
    let services = get(&api, "/v1/services", t).await;
    assert_eq!(services.body["items"].as_array().unwrap().len(), 1, "only 'web'");
    let instances = get(&api, "/v1/instances", t).await;
    assert_eq!(instances.body["items"].as_array().unwrap().len(), 1, "only 'one'");

    patch(&api, "/v1/tenants/acme", t, json!({"quotas": {"max_instances": 10, "max_memory_mb": 300}})).await;
    post(&api, "/v1/instances", t, json!({"image": "hello", "memory_mb": 256})).await.problem(
        403,
        "quota_exceeded",
        "max_memory_mb",
    );
}

/// A tiny IPv4 network type, so the tests check addresses independently of the code under test.
mod ipnet_lite {
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    pub struct Net {
        pub addr: Ipv4Addr,
        prefix: u32,
    }

    impl FromStr for Net {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            let (a, p) = s.split_once('/').ok_or("no prefix")?;
            Ok(Net { addr: a.parse().map_err(|_| "addr")?, prefix: p.parse().map_err(|_| "prefix")? })
        }
    }

    impl Net {
        fn mask(&self) -> u32 {
            if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) }
        }
        pub fn contains(&self, ip: Ipv4Addr) -> bool {
            u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
        }
        pub fn gateway(&self) -> Ipv4Addr {
            Ipv4Addr::from((u32::from(self.addr) & self.mask()) + 1)
        }
    }
}

#[tokio::test]
async fn nul_in_an_environment_value_or_an_argument_is_refused_before_anything_is_stored() {
    let api = TestApi::start().await;
    let t = &api.token;
    for body in [
        json!({"image": "hello", "name": "a", "env": {"X": "a\u{0}b"}}),
        json!({"image": "hello", "name": "a", "args": ["a\u{0}b"]}),
    ] {
        let res = crate::post(&api, "/v1/instances", t, body.clone()).await;
        res.problem(400, "invalid_request", "NUL");
    }
    assert_eq!(crate::get(&api, "/v1/instances", t).await.body["items"], json!([]));
}
