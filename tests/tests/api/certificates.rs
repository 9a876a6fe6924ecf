//! Certificate uploads for custom domains: checked before anything is stored, keys sealed, one valid certificate
//! per domain, replaced only by a valid one; another tenant's domain is out of reach.

use std::sync::Arc;

use cloud_api::ApiConfig;
use cloud_certs::seal::SecretKey;
use cloud_store::Settings;
use cloud_tests::TestApi;
use cloud_tests::pki::TestCa;
use serde_json::json;

use crate::{create_service, delete, get, post};

async fn api_with_key() -> (TestApi, Arc<SecretKey>) {
    let key = Arc::new(SecretKey::from_bytes(&[42; 32]));
    let config = ApiConfig { secret_key: Some(key.clone()), ..ApiConfig::default() };
    (TestApi::start_with_settings(Settings::default(), config).await, key)
}

async fn verify(api: &TestApi, domain: &str) {
    let d = api.store.tenant_domain(api.tenant.id, domain).await.unwrap();
    api.store.mark_domain_verified(d.id).await.unwrap();
}

#[tokio::test]
async fn uploads_are_checked_sealed_and_replace_the_domains_certificate() {
    let (api, key) = api_with_key().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "shop", "domains": ["www.example.test."]})).await;
    let ca = TestCa::new("owner CA");
    let (chain, leaf_key) = ca.leaf(&["www.example.test"], -1, 60);
    let upload = |chain: &str, key: &str| json!({"domain": "www.example.test", "chain_pem": chain, "key_pem": key});

    // Not before the domain is proven to be the tenant's.
    post(&api, "/v1/certificates", t, upload(&chain, &leaf_key)).await.problem(
        422,
        "domain_not_verified",
        "_cloud-challenge.www.example.test",
    );
    verify(&api, "www.example.test").await;

    // Each bad upload is refused with its own code, and leaves nothing behind.
    let (_, other_key) = ca.leaf(&["www.example.test"], -1, 60);
    post(&api, "/v1/certificates", t, upload(&chain, &other_key)).await.problem(
        422,
        "certificate_key_mismatch",
        "does not match",
    );
    let (expired, expired_key) = ca.leaf(&["www.example.test"], -90, -1);
    post(&api, "/v1/certificates", t, upload(&expired, &expired_key)).await.problem(
        422,
        "certificate_chain_invalid",
        "not valid now",
    );
    let stranger = TestCa::new("owner CA");
    let broken = chain.replace(&ca.pem, &stranger.pem);
    post(&api, "/v1/certificates", t, upload(&broken, &leaf_key)).await.problem(
        422,
        "certificate_chain_invalid",
        "not signed by the next one",
    );
    let (other_name, other_name_key) = ca.leaf(&["shop.example.test"], -1, 60);
    post(&api, "/v1/certificates", t, upload(&other_name, &other_name_key)).await.problem(
        422,
        "certificate_name_mismatch",
        "(shop.example.test) do not cover www.example.test",
    );
    post(&api, "/v1/certificates", t, upload("garbage", &leaf_key)).await.problem(
        400,
        "invalid_certificate",
        "BEGIN CERTIFICATE",
    );
    post(&api, "/v1/certificates", t, upload(&chain, "garbage")).await.problem(400, "invalid_certificate", "PKCS#8");
    post(&api, "/v1/certificates", t, json!({"domain": "api.example.test", "chain_pem": chain, "key_pem": leaf_key}))
        .await
        .problem(404, "not_found", "api.example.test");
    let (_, other) = api.tenant("globex", &[cloud_domain::api::Scope::Read, cloud_domain::api::Scope::Write]).await;
    post(&api, "/v1/certificates", &other, upload(&chain, &leaf_key)).await.problem(
        404,
        "not_found",
        "www.example.test",
    );
    assert!(get(&api, "/v1/certificates", t).await.body["items"].as_array().unwrap().is_empty());

    // A SAN-only certificate (no common name) is accepted; the key is stored sealed and never returned.
    let r = post(&api, "/v1/certificates", t, upload(&chain, &leaf_key)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["names"], json!(["www.example.test"]));
    assert_eq!((r.body["state"].as_str(), r.body["source"].as_str()), (Some("valid"), Some("upload")));
    assert!(!r.body.to_string().contains("PRIVATE KEY"));
    let first = r.body["id"].as_str().unwrap().to_owned();
    let served = api.store.served_certificates().await.unwrap();
    assert_eq!(served.len(), 1);
    assert!(!served[0].key_sealed.windows(7).any(|w| w == b"PRIVATE"), "sealed at rest");
    assert_eq!(key.open(&served[0].key_sealed).unwrap(), leaf_key.as_bytes());

    // A new valid certificate replaces it; the other tenant sees none of it.
    let (chain2, key2) = ca.leaf(&["*.example.test"], -1, 90);
    let r = post(&api, "/v1/certificates", t, upload(&chain2, &key2)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let items = get(&api, "/v1/certificates", t).await.body["items"].clone();
    assert_eq!(items.as_array().unwrap().len(), 1);
    assert_eq!(items[0]["id"], r.body["id"]);
    get(&api, &format!("/v1/certificates/{first}"), t).await.problem(404, "not_found", &first);
    let second = r.body["id"].as_str().unwrap();
    get(&api, &format!("/v1/certificates/{second}"), &other).await.problem(404, "not_found", second);
    assert_eq!(delete(&api, &format!("/v1/certificates/{second}"), &other).await.status, 404);
    assert_eq!(api.store.served_certificates().await.unwrap()[0].chain_pem, chain2);

    // Deleting it stops serving it.
    assert_eq!(delete(&api, &format!("/v1/certificates/{second}"), t).await.status, 204);
    assert!(api.store.served_certificates().await.unwrap().is_empty());
}

/// (An API without the platform secret key does not start: `token_attacks.rs`.)
#[tokio::test]
async fn a_certificate_is_not_served_once_its_domain_leaves_the_service() {
    let (chain, key) = TestCa::new("owner CA").leaf(&["www.example.test"], -1, 60);
    let body = json!({"domain": "www.example.test", "chain_pem": chain, "key_pem": key});
    let (api, _) = api_with_key().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "shop", "domains": ["www.example.test."]})).await;
    verify(&api, "www.example.test").await;
    assert_eq!(post(&api, "/v1/certificates", t, body).await.status, 201);
    assert_eq!(api.store.served_certificates().await.unwrap().len(), 1);
    crate::patch(&api, "/v1/services/shop", t, json!({"domains": []})).await;
    assert!(api.store.served_certificates().await.unwrap().is_empty(), "the domain left the service");
}

#[tokio::test]
async fn acme_work_is_due_for_verified_domains_leased_to_one_replica_and_backs_off_after_errors() {
    use std::time::Duration;
    let (api, key) = api_with_key().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "shop", "domains": ["www.example.test.", "new.example.test."]})).await;
    let store = &api.store;
    let due = |renew: u64, retry: u64| async move {
        let d = store.acme_due(Duration::from_secs(renew), Duration::from_secs(retry), 10).await.unwrap();
        d.into_iter().map(|d| d.domain).collect::<Vec<_>>()
    };
    assert!(due(0, 0).await.is_empty(), "nothing verified, nothing ordered");
    verify(&api, "www.example.test").await;
    assert_eq!(due(0, 0).await, ["www.example.test"]);

    // One replica at a time; a lease can be renewed by its holder and taken over once given back or expired.
    let long = Duration::from_secs(600);
    assert!(store.take_acme_lease("www.example.test", "a", long).await.unwrap());
    assert!(!store.take_acme_lease("www.example.test", "b", long).await.unwrap());
    assert!(store.take_acme_lease("www.example.test", "a", long).await.unwrap());
    store.release_acme_lease("www.example.test", "a").await.unwrap();
    assert!(store.take_acme_lease("www.example.test", "b", Duration::ZERO).await.unwrap());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(store.take_acme_lease("www.example.test", "c", long).await.unwrap(), "an expired lease is taken over");

    // An order under way is shown as pending; a failed one with its reason, and it waits before the next attempt.
    store.record_acme_pending(api.tenant.id, "www.example.test").await.unwrap();
    let listed = get(&api, "/v1/certificates", t).await.body["items"].clone();
    assert_eq!((listed.as_array().unwrap().len(), listed[0]["state"].as_str()), (1, Some("pending")));
    store.record_acme_error(api.tenant.id, "www.example.test", "urn:ietf:params:acme:error:connection").await.unwrap();
    assert!(due(0, 3600).await.is_empty());
    assert_eq!(due(0, 0).await, ["www.example.test"]);
    let listed = get(&api, "/v1/certificates", t).await.body["items"].clone();
    assert_eq!((listed[0]["state"].as_str(), listed[0]["source"].as_str()), (Some("error"), Some("acme")));
    assert!(listed[0]["state_reason"].as_str().unwrap().contains("connection"));

    // An ACME certificate is renewed only within the renewal window; success clears the error.
    let (chain, leaf_key) = TestCa::new("ACME CA").leaf(&["www.example.test"], -1, 60);
    let now = chrono::Utc::now();
    store
        .put_certificate(
            api.tenant.id,
            cloud_store::NewCertificate {
                domain: "www.example.test".into(),
                names: vec!["www.example.test".into()],
                source: "acme",
                chain_pem: chain.clone(),
                key_sealed: key.seal(leaf_key.as_bytes()).unwrap(),
                not_before: now,
                not_after: now + chrono::Duration::days(60),
            },
        )
        .await
        .unwrap();
    assert!(due(30 * 86400, 0).await.is_empty());
    let renewing = store.acme_due(Duration::from_secs(90 * 86400), Duration::ZERO, 10).await.unwrap();
    assert_eq!(renewing.len(), 1);
    assert!(renewing[0].not_after.is_some());
    let listed = get(&api, "/v1/certificates", t).await.body["items"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 1, "the error is gone: {listed}");

    // An uploaded certificate is the tenant's to renew.
    let r = post(
        &api,
        "/v1/certificates",
        t,
        json!({"domain": "www.example.test", "chain_pem": chain, "key_pem": leaf_key}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(due(90 * 86400, 0).await.is_empty());
}
