//! Custom domains: recorded unverified with the records to create, verified only once the owner's TXT record
//! holds the token, and routed only then; the background pass verifies pending domains too. An unverified claim
//! holds nothing (the first proof wins), lapses after a week, and is bounded per service and per tenant; names
//! inside the platform's own domain are not custom domains.

use cloud_api::ApiConfig;
use cloud_domain::api::Scope;
use cloud_store::{Settings, StoreError};
use cloud_tests::TestApi;
use cloud_tests::txt_server::TxtServer;
use serde_json::{Value, json};
use uuid::Uuid;

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
    let pass = checker.verify_pending(&api.store, 100).await.unwrap();
    assert_eq!((pass.checked, pass.verified, pass.expired), (2, 1, 0));
    let pending: Vec<String> = api.store.pending_claims().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(pending, vec!["b.example.test".to_owned()]);
    assert_eq!(routed_hosts(&api.store.route_data().await.unwrap()), vec!["a.example.test".to_owned()]);
}

fn rw() -> [Scope; 2] {
    [Scope::Read, Scope::Write]
}

/// `(domain, txt name, txt value)` of a service's pending domains.
fn records(service: &Value) -> Vec<(String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    service["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (text(&d["name"]), text(&d["verification"]["txt_name"]), text(&d["verification"]["txt_value"])))
        .collect()
}

/// A squatter claims a name first; the real owner, another tenant, claims it too, publishes its TXT record and
/// verifies: the owner gets the name. The squatter's claim then can neither verify nor route, and no part of the
/// platform (edge routes, DNS, ACME, uploads) serves the name for the squatter.
#[tokio::test]
async fn a_squatters_claim_does_not_keep_the_owner_from_verifying_and_never_routes() {
    let dns = TxtServer::start().await;
    let config = ApiConfig { resolver: Some(dns.addr()), ..ApiConfig::default() };
    let api = TestApi::start_with_settings(Settings::default(), config).await;
    let (squatter_tenant, squatter) = api.tenant("squatter", &rw()).await;
    let (owner_tenant, owner) = api.tenant("owner", &rw()).await;
    let name = "shop.example.test";

    let grab = create_service(
        &api,
        &squatter,
        json!({"name": "grab", "ports": ["443:8080"], "domains": [format!("{name}.")]}),
    )
    .await;
    let res = post(
        &api,
        "/v1/services",
        &owner,
        json!({"name": "shop", "ports": ["443:8080"], "domains": [format!("{name}.")]}),
    )
    .await;
    assert_eq!(res.status, 201, "the owner's claim must be accepted despite the squatter's: {}", res.body);
    assert_eq!(res.body["domains"][0]["state"], "pending");
    let (_, record, value) = records(&res.body).remove(0);
    let (_, squatter_record, squatter_value) = records(&grab).remove(0);
    assert_eq!(record, squatter_record);
    assert_ne!(value, squatter_value, "each claim has its own token");

    // The owner publishes its token at its DNS provider and verifies: it wins.
    dns.set(&record, &[&value]);
    let r = post(&api, &format!("/v1/services/shop/domains/{name}/verify"), &owner, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["domains"][0]["state"], "verified");

    // The squatter's claim says why it cannot verify, shows no records to create, and stays so even with its own
    // token published next to the owner's: neither its verify call nor the background pass gets it.
    let taken = get(&api, "/v1/services/grab", &squatter).await.body;
    assert_eq!(taken["domains"][0]["state"], "taken", "{taken}");
    assert_eq!(taken["domains"][0]["verified"], false);
    assert!(taken["domains"][0]["verification"].is_null());
    dns.set(&record, &[&value, &squatter_value]);
    let verify = format!("/v1/services/grab/domains/{name}/verify");
    post(&api, &verify, &squatter, json!({})).await.problem(409, "domain_taken", "is verified by another tenant");
    let checker = cloud_certs::ownership::OwnershipChecker::new(Some(dns.addr()));
    checker.verify_pending(&api.store, 100).await.unwrap();
    assert_eq!(get(&api, "/v1/services/grab", &squatter).await.body["domains"][0]["state"], "taken");
    // The database itself refuses a second proof of the name.
    let claim = api.store.tenant_domain(squatter_tenant.id, name).await.unwrap();
    let second = api.store.mark_domain_verified(claim.id).await;
    assert!(matches!(second, Err(StoreError::DomainTaken { .. })), "{second:?}");

    // Only the owner's service has the name: edge routes, DNS zone, ACME orders.
    let routes = api.store.route_data().await.unwrap();
    let routed: Vec<(Uuid, String)> =
        routes.services.iter().flat_map(|s| s.domains.iter().map(|d| (s.tenant_id, d.clone()))).collect();
    assert_eq!(routed, [(owner_tenant.id, name.to_owned())]);
    let zone = api.store.zone_data().await.unwrap();
    let served: Vec<(Uuid, String)> = zone
        .services
        .iter()
        .flat_map(|s| s.domains.iter().filter(|d| d.custom).map(|d| (s.tenant_id, d.name.clone())))
        .collect();
    assert_eq!(served, [(owner_tenant.id, name.to_owned())]);
    let day = std::time::Duration::from_secs(86400);
    let due = api.store.acme_due(day, day, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| (d.tenant_id, d.domain.as_str())).collect::<Vec<_>>(), [(owner_tenant.id, name)]);
    // The squatter cannot upload a certificate for it.
    post(&api, "/v1/certificates", &squatter, json!({"domain": name, "chain_pem": "x", "key_pem": "y"})).await.problem(
        422,
        "domain_not_verified",
        name,
    );

    // A name verified by a tenant is public (its DNS points here): a new claim on it is refused, saying so.
    let (_, third) = api.tenant("third", &rw()).await;
    post(&api, "/v1/services", &third, json!({"domains": [format!("{name}.")]})).await.problem(
        409,
        "domain_taken",
        "is verified by another tenant",
    );

    // Once the owner lets the name go, the squatter's claim is pending again: only its own TXT record counts.
    assert_eq!(crate::patch(&api, "/v1/services/shop", &owner, json!({"domains": []})).await.status, 200);
    let again = get(&api, "/v1/services/grab", &squatter).await.body;
    assert_eq!(again["domains"][0]["state"], "pending", "{again}");
    assert!(routed_hosts(&api.store.route_data().await.unwrap()).is_empty());
}

/// Tenants proving one name at the same moment: the database lets exactly one have it.
#[tokio::test]
async fn when_tenants_prove_one_name_at_once_exactly_one_gets_it() {
    let dns = TxtServer::start().await;
    let config = ApiConfig { resolver: Some(dns.addr()), ..ApiConfig::default() };
    let api = TestApi::start_with_settings(Settings::default(), config).await;
    let names: Vec<String> = (0..5).map(|i| format!("race{i}.example.test")).collect();
    let mut claimants = Vec::new();
    for t in ["red", "blue", "green"] {
        let (_, token) = api.tenant(t, &rw()).await;
        let domains: Vec<String> = names.iter().map(|n| format!("{n}.")).collect();
        let s = create_service(&api, &token, json!({"name": "site", "domains": domains})).await;
        for (_, record, value) in records(&s) {
            dns.add(&record, &value);
        }
        claimants.push(token);
    }
    for name in &names {
        let calls = claimants.iter().map(|token| {
            let url = api.url(&format!("/v1/services/site/domains/{name}/verify"));
            let token = token.clone();
            tokio::spawn(async move {
                let res = reqwest::Client::new().post(url).bearer_auth(token).json(&json!({})).send().await.unwrap();
                crate::into_res(res).await
            })
        });
        let mut statuses = Vec::new();
        for call in calls.collect::<Vec<_>>() {
            let res = call.await.unwrap();
            if res.status != 200 {
                assert_eq!(res.code(), "domain_taken", "{}", res.body);
            }
            statuses.push(res.status);
        }
        statuses.sort();
        assert_eq!(statuses, [200, 409, 409], "{name}");
    }
    let routed = routed_hosts(&api.store.route_data().await.unwrap());
    assert_eq!(routed.len(), names.len(), "each name routed once: {routed:?}");
}

#[tokio::test]
async fn more_domains_than_a_service_may_have_are_refused_whole() {
    let api = TestApi::start().await;
    let t = &api.token;
    let many: Vec<String> = (0..3000).map(|i| format!("d{i}.example.test.")).collect();
    post(&api, "/v1/services", t, json!({"name": "greedy", "ports": ["443:8080"], "domains": many})).await.problem(
        400,
        "too_many_domains",
        "a service may have at most 50 domains; this request lists 3000",
    );
    get(&api, "/v1/services/greedy", t).await.problem(404, "not_found", "greedy");

    let fifty: Vec<String> = (0..50).map(|i| format!("d{i}.example.test.")).collect();
    let full = create_service(&api, t, json!({"name": "full", "domains": fifty})).await;
    assert_eq!(full["domains"].as_array().unwrap().len(), 50);
    let mut more = fifty.clone();
    more.push("shop".into());
    crate::patch(&api, "/v1/services/full", t, json!({"domains": more})).await.problem(
        400,
        "too_many_domains",
        "lists 51",
    );
    let after = get(&api, "/v1/services/full", t).await.body;
    assert_eq!(after["domains"], full["domains"], "unchanged");
}

#[tokio::test]
async fn a_tenant_over_its_domain_quota_is_refused_and_nothing_is_half_written() {
    let api = TestApi::start().await;
    let admin = &api.token;
    let (_, t) = api.tenant("initech", &rw()).await;
    let names =
        |prefix: &str, n: usize| -> Vec<String> { (0..n).map(|i| format!("{prefix}{i}.example.test.")).collect() };

    // 95 names over two services, then a request for 6 more: over the default quota of 100 (platform subdomains
    // count too), refused whole.
    let mut first = names("a", 44);
    first.push("initech-shop".into());
    create_service(&api, &t, json!({"name": "a", "domains": first})).await;
    create_service(&api, &t, json!({"name": "b", "domains": names("b", 50)})).await;
    post(&api, "/v1/services", &t, json!({"name": "c", "domains": names("c", 6)})).await.problem(
        403,
        "quota_exceeded",
        "max_domains is 100",
    );
    get(&api, "/v1/services/c", &t).await.problem(404, "not_found", "c");
    create_service(&api, &t, json!({"name": "c", "domains": names("c", 5)})).await;
    let mut grown = first.clone();
    grown.push("new.example.test.".into());
    crate::patch(&api, "/v1/services/a", &t, json!({"domains": grown})).await.problem(
        403,
        "quota_exceeded",
        "max_domains is 100",
    );
    let a = get(&api, "/v1/services/a", &t).await.body;
    assert_eq!(a["domains"].as_array().unwrap().len(), 45, "unchanged");
    let tenant = get(&api, "/v1/tenants/initech", admin).await.body;
    assert_eq!((tenant["usage"]["domains"].as_u64(), tenant["quotas"]["max_domains"].as_u64()), (Some(100), Some(100)));

    // Admins set the quota, at creation or later.
    let raised = crate::patch(&api, "/v1/tenants/initech", admin, json!({"quotas": {"max_domains": 101}})).await;
    assert_eq!(raised.body["quotas"]["max_domains"], 101);
    let r = crate::patch(&api, "/v1/services/a", &t, json!({"domains": grown})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let small = post(&api, "/v1/tenants", admin, json!({"name": "hooli", "quotas": {"max_domains": 0}})).await;
    assert_eq!((small.status, small.body["quotas"]["max_domains"].as_u64()), (201, Some(0)), "{}", small.body);
}

#[tokio::test]
async fn names_inside_the_platforms_own_domain_are_refused_as_custom_domains() {
    let api = TestApi::start().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "site"})).await;
    for bad in [
        "prod.cloud.localhost.",
        "*.cloud.localhost.",
        "cloud.localhost.",
        "*.dev.cloud.localhost.",
        "x.eu.cloud.localhost.",
    ] {
        let needle = "is inside the platform's own domain cloud.localhost";
        post(&api, "/v1/services", t, json!({"domains": [bad]})).await.problem(400, "invalid_domain", needle);
        crate::patch(&api, "/v1/services/site", t, json!({"domains": [bad]})).await.problem(
            400,
            "invalid_domain",
            needle,
        );
    }
    let list = get(&api, "/v1/services", t).await.body;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["items"][0]["domains"].as_array().unwrap().is_empty());

    // A claim recorded before these names were refused can never be proven.
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO domains (id, tenant_id, service_id, name, custom, verification_token, expires_at)
         SELECT $1, tenant_id, id, 'prod.cloud.localhost', true, 'legacy', now() + interval '1 day'
         FROM services WHERE name = 'site'",
    )
    .bind(id)
    .execute(api.store.pool())
    .await
    .unwrap();
    let refused = api.store.mark_domain_verified(id).await;
    assert!(matches!(&refused, Err(StoreError::Invalid(m)) if m.contains("platform's own domain")), "{refused:?}");
}

#[tokio::test]
async fn an_expired_claim_no_longer_holds_nor_is_checked_and_can_be_claimed_anew() {
    let dns = TxtServer::start().await;
    let config = ApiConfig { resolver: Some(dns.addr()), ..ApiConfig::default() };
    let api = TestApi::start_with_settings(Settings::default(), config).await;
    let t = &api.token;
    let s = create_service(&api, t, json!({"name": "late", "domains": ["late.example.test."]})).await;
    let d = &s["domains"][0];
    let expires = d["expires_at"].as_str().unwrap_or_else(|| panic!("a pending claim shows when it lapses: {d}"));
    let expires: chrono::DateTime<chrono::Utc> = expires.parse().unwrap();
    let created: chrono::DateTime<chrono::Utc> = s["created_at"].as_str().unwrap().parse().unwrap();
    let week = chrono::Duration::days(7);
    assert!((expires - created - week).num_seconds().abs() < 60, "a week after the claim: {expires} vs {created}");
    let (_, record, value) = records(&s).remove(0);

    // A week passes without a proof (moved in the database); the record appears only now.
    sqlx::query("UPDATE domains SET expires_at = now() - interval '1 second' WHERE name = 'late.example.test'")
        .execute(api.store.pool())
        .await
        .unwrap();
    dns.set(&record, &[&value]);
    let lapsed = get(&api, "/v1/services/late", t).await.body;
    assert_eq!(lapsed["domains"][0]["state"], "expired", "{lapsed}");
    assert!(lapsed["domains"][0]["verification"].is_null());
    assert_eq!(get(&api, "/v1/tenants/acme", t).await.body["usage"]["domains"], 0, "a lapsed claim does not count");
    post(&api, "/v1/services/late/domains/late.example.test/verify", t, json!({})).await.problem(
        422,
        "domain_not_verified",
        "expired",
    );
    let checker = cloud_certs::ownership::OwnershipChecker::new(Some(dns.addr()));
    let pass = checker.verify_pending(&api.store, 100).await.unwrap();
    assert_eq!((pass.expired, pass.checked, pass.verified), (1, 0, 0));
    assert!(get(&api, "/v1/services/late", t).await.body["domains"].as_array().unwrap().is_empty(), "removed");
    assert!(routed_hosts(&api.store.route_data().await.unwrap()).is_empty());

    // Listing it again claims it anew, with a new token and a new week.
    let again = crate::patch(&api, "/v1/services/late", t, json!({"domains": ["late.example.test."]})).await.body;
    assert_eq!(again["domains"][0]["state"], "pending");
    let (_, _, new_value) = records(&again).remove(0);
    assert_ne!(new_value, value);
    let expires: chrono::DateTime<chrono::Utc> = again["domains"][0]["expires_at"].as_str().unwrap().parse().unwrap();
    assert!(expires > chrono::Utc::now() + chrono::Duration::days(6));
}

/// 200 claims that never verify, made first by four tenants, then an owner's 50 with their records published:
/// with a batch of 100, three passes check all 250 and verify the owner's, newest as they are.
#[tokio::test]
async fn every_pending_claim_is_checked_within_ceil_n_over_batch_passes_whatever_its_age_or_tenant() {
    let dns = TxtServer::start().await;
    let api = TestApi::start().await;
    let names = |prefix: &str| -> Vec<String> { (0..50).map(|i| format!("{prefix}{i}.example.test.")).collect() };
    for i in 0..4 {
        let (_, t) = api.tenant(&format!("junk{i}"), &rw()).await;
        create_service(&api, &t, json!({"name": "junk", "domains": names(&format!("junk{i}-"))})).await;
    }
    let (_, owner) = api.tenant("owner", &rw()).await;
    let mine = create_service(&api, &owner, json!({"name": "mine", "domains": names("mine")})).await;
    for (_, record, value) in records(&mine) {
        dns.set(&record, &[&value]);
    }
    let checker = cloud_certs::ownership::OwnershipChecker::new(Some(dns.addr()));
    for _ in 0..3 {
        checker.verify_pending(&api.store, 100).await.unwrap();
    }
    let mine = get(&api, "/v1/services/mine", &owner).await.body;
    let verified = mine["domains"].as_array().unwrap().iter().filter(|d| d["verified"] == true).count();
    assert_eq!(verified, 50, "250 pending claims and a batch of 100: the owner's are verified within 3 passes");
    // One queue: every claim was looked up in those passes.
    let (checked,): (i64,) = sqlx::query_as("SELECT count(*) FROM domains WHERE checked_at IS NOT NULL")
        .fetch_one(api.store.pool())
        .await
        .unwrap();
    assert_eq!(checked, 250);
}
