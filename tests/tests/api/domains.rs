//! Custom domains: recorded unverified with the records to create, verified only once the owner's TXT record
//! holds the token, and routed only then; the background pass verifies pending domains too.

use cloud_api::ApiConfig;
use cloud_store::Settings;
use cloud_tests::TestApi;
use cloud_tests::txt_server::TxtServer;
use serde_json::{Value, json};

use crate::{create_service, get, post};

fn routed_hosts(routes: &cloud_store::RouteData) -> Vec<String> {
    routes.services.iter().flat_map(|s| s.domains.clone()).collect()
}

#[tokio::test]
async fn a_custom_domain_is_verified_by_its_txt_record_and_only_then_routed() {
    let dns = TxtServer::start().await;
    let config = ApiConfig { resolver: Some(dns.addr()), ..ApiConfig::default() };
    let api = TestApi::start_with_settings(Settings::default(), config).await;
    let t = &api.token;
    let s =
        create_service(&api, t, json!({"name": "shop", "ports": ["443:8080"], "domains": ["www.example.test."]})).await;
    let domain: &Value = &s["domains"][0];
    assert_eq!(domain["name"], "www.example.test");
    assert_eq!(domain["verified"], false);
    let record = domain["verification"]["txt_name"].as_str().unwrap().to_owned();
    let value = domain["verification"]["txt_value"].as_str().unwrap().to_owned();
    assert_eq!(record, "_cloud-challenge.www.example.test");
    assert!(value.starts_with("cloud-verify=") && value.len() > 20, "{value}");
    assert_eq!(domain["verification"]["cname_target"], s["fqdn"]);
    assert!(routed_hosts(&api.store.route_data().await.unwrap()).is_empty(), "unverified: not routed");

    // Nothing published yet, then a wrong value: refused, naming the record, the value expected and what is there.
    let path = "/v1/services/shop/domains/www.example.test/verify";
    let r = post(&api, path, t, json!({})).await;
    r.problem(422, "domain_not_verified", "no TXT record");
    assert!(
        r.body["detail"].as_str().unwrap().contains(&record) && r.body["detail"].as_str().unwrap().contains(&value)
    );
    dns.set(&record, &["cloud-verify=somebody-elses"]);
    post(&api, path, t, json!({})).await.problem(422, "domain_not_verified", "\"cloud-verify=somebody-elses\"");
    assert!(routed_hosts(&api.store.route_data().await.unwrap()).is_empty());

    // Another tenant cannot verify (or even see) it; unknown domains are not found.
    let (_, other) = api.tenant("globex", &[cloud_domain::api::Scope::Read, cloud_domain::api::Scope::Write]).await;
    post(&api, path, &other, json!({})).await.problem(404, "not_found", "www.example.test");
    post(&api, "/v1/services/shop/domains/api.example.test/verify", t, json!({})).await.problem(
        404,
        "not_found",
        "api.example.test",
    );

    // The right value among others (TXT records are shared with other uses): verified, routed, and said so.
    dns.set(&record, &["v=spf1 -all", &value]);
    let r = post(&api, path, t, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["domains"][0]["verified"], true);
    assert!(r.body["domains"][0]["verification"].is_null());
    assert_eq!(routed_hosts(&api.store.route_data().await.unwrap()), vec!["www.example.test".to_owned()]);
    assert_eq!(get(&api, "/v1/services/shop", t).await.body["domains"][0]["verified"], true);
    // Verifying again is harmless.
    assert_eq!(post(&api, path, t, json!({})).await.status, 200);
}

#[tokio::test]
async fn the_background_pass_verifies_pending_domains_and_leaves_the_others() {
    let dns = TxtServer::start().await;
    let api = TestApi::start().await;
    let t = &api.token;
    let s = create_service(&api, t, json!({"name": "a", "domains": ["a.example.test.", "b.example.test."]})).await;
    let value_of = |name: &str| {
        s["domains"].as_array().unwrap().iter().find(|d| d["name"] == name).unwrap()["verification"]["txt_value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    dns.set("_cloud-challenge.a.example.test", &[&value_of("a.example.test")]);
    let checker = cloud_certs::ownership::OwnershipChecker::new(Some(dns.addr()));
    assert_eq!(checker.verify_pending(&api.store, 100).await.unwrap(), 1);
    let pending: Vec<String> = api.store.unverified_domains(100).await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(pending, vec!["b.example.test".to_owned()]);
    assert_eq!(routed_hosts(&api.store.route_data().await.unwrap()), vec!["a.example.test".to_owned()]);
}
