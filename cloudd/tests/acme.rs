//! ACME end to end against Debian's pebble on loopback: the certificate manager orders certificates for verified
//! custom domains, pebble validates http-01 through our edge and dns-01 through our DNS (it resolves every name
//! through our DNS, which sends the custom domains to the edge), the edge then serves what was obtained, and curl
//! verifies it against pebble's root. No root needed: nothing runs behind the service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cloud_certs::acme::{AcmeConfig, ChallengeKind};
use cloud_certs::manager::{CertManager, ManagerConfig};
use cloud_certs::ownership::OwnershipChecker;
use cloud_certs::seal::SecretKey;
use cloud_edge::{CertStore, EdgeConfig};
use cloud_store::ChangeFeed;
use cloud_tests::TestApi;
use cloud_tests::pebble::Pebble;
use serde_json::json;

/// Verifies `https://<name>` on the edge with curl against `root_pem` only; returns what the edge answered.
fn curl(root: &std::path::Path, name: &str, https: SocketAddr) -> Result<String, String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(root)
        .arg("--resolve")
        .arg(format!("{name}:{}:{}", https.port(), https.ip()))
        .arg(format!("https://{name}:{}/", https.port()))
        .output()
        .expect("curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Our DNS on a loopback port, following the store: what pebble resolves every name through.
async fn start_dns(store: &cloud_store::Store) -> (cloud_dns::DnsHandle, SocketAddr) {
    let config = cloud_dns::DnsConfig {
        public_listen: vec!["127.0.0.1:0".parse().unwrap()],
        rate_limit: None,
        ..cloud_dns::DnsConfig::default()
    };
    let dns = cloud_dns::start(store.clone(), ChangeFeed::start(store.clone()).await.unwrap(), config).await.unwrap();
    let addr = dns.public_addrs()[0];
    (dns, addr)
}

fn leaf_of(chain: &str) -> String {
    chain.split_inclusive("-----END CERTIFICATE-----").next().unwrap().trim().to_owned()
}

// curl runs synchronously: the edge needs other threads meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_obtained_via_http_01_through_the_edge_and_dns_01_through_our_dns_and_served() {
    let key = Arc::new(SecretKey::from_bytes(&[5; 32]));
    let api = TestApi::start_with_settings(
        Default::default(),
        cloud_api::ApiConfig { secret_key: Some(key.clone()), ..Default::default() },
    )
    .await;
    let store = api.store.clone();
    let (dns, dns_addr) = start_dns(&store).await;
    let edge_config = EdgeConfig {
        https_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        ports_ip: "127.0.0.1".parse().unwrap(),
        grace_period: Duration::from_secs(1),
        resync_interval: Duration::from_secs(2),
        secret_key: Some(key.clone()),
        ..EdgeConfig::default()
    };
    let feed = ChangeFeed::start(store.clone()).await.unwrap();
    let edge = cloud_edge::start(store.clone(), feed, Arc::new(CertStore::default()), edge_config).await.unwrap();
    // Pebble validates http-01 on the edge's plain-http port, at the address our DNS gives the domain.
    let pebble = Pebble::start(dns_addr, edge.http_addr().port()).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pebble-root.pem");
    std::fs::write(&root, pebble.issuer_root_pem().await).unwrap();

    let t = &api.token;
    let body = json!({"name": "shop", "ports": ["443:8080"],
                      "domains": ["www.example.test.", "api.example.test.", "nope.example.test."]});
    let res = reqwest::Client::new().post(api.url("/v1/services")).bearer_auth(t).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 201);
    // Pebble resolves the domain through our DNS, which learns of the verification from the change feed: the
    // challenge waits until the DNS serves it.
    let verify = |domain: &'static str| {
        let store = store.clone();
        let tenant = api.tenant.id;
        let dns = &dns;
        async move {
            let d = store.tenant_domain(tenant, domain).await.unwrap();
            store.mark_domain_verified(d.id).await.unwrap();
            let version = store.current_version().await.unwrap();
            tokio::time::timeout(Duration::from_secs(30), dns.wait_for_version(version))
                .await
                .unwrap_or_else(|_| panic!("our DNS never served version {version} ({domain} verified)"));
        }
    };
    verify("www.example.test").await;

    let acme = || {
        let mut a = AcmeConfig::new(pebble.directory_url.clone());
        a.root_pem = Some(pebble.listener_ca_pem.clone());
        a.timeout = Duration::from_secs(60);
        a
    };
    let manager = |challenge: ChallengeKind, renew_before: Duration| {
        CertManager::new(
            store.clone(),
            key.clone(),
            OwnershipChecker::new(Some("127.0.0.1:9".parse().unwrap())),
            ManagerConfig {
                acme: Some(acme()),
                challenge,
                renew_before,
                dns_servers: vec![dns_addr],
                holder: "test".into(),
                ..ManagerConfig::default()
            },
        )
    };

    // http-01, answered by the edge on port 80.
    let mut http01 = manager(ChallengeKind::Http01, Duration::from_secs(86400));
    let report = http01.pass().await.unwrap();
    assert_eq!((report.issued.as_slice(), report.failed.as_slice()), (&["www.example.test".to_owned()][..], &[][..]));
    assert!(http01.metrics_text().contains("certs_acme_orders_total{result=\"issued\"} 1"));
    let first = store.served_certificates().await.unwrap();
    assert_eq!(first.len(), 1);
    pebble.openssl_verify(&first[0].chain_pem, "www.example.test").await;
    // The edge serves it (verified by curl against pebble's root); nothing runs behind the service yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let answer = loop {
        match curl(&root, "www.example.test", edge.https_addr()) {
            Ok(a) => break a,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "curl never verified: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer, "no instance of this service is running\n");
    // An unverified domain gets neither a certificate nor a route.
    assert!(curl(&root, "nope.example.test", edge.https_addr()).is_err());
    assert!(store.served_certificates().await.unwrap().iter().all(|c| c.domain != "nope.example.test"));

    // dns-01, answered by our DNS.
    verify("api.example.test").await;
    let mut dns01 = manager(ChallengeKind::Dns01, Duration::from_secs(86400));
    let report = dns01.pass().await.unwrap();
    assert_eq!(report.issued, ["api.example.test"]);
    let served = store.served_certificates().await.unwrap();
    let api_cert = served.iter().find(|c| c.domain == "api.example.test").unwrap();
    pebble.openssl_verify(&api_cert.chain_pem, "api.example.test").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while curl(&root, "api.example.test", edge.https_addr()).is_err() {
        assert!(tokio::time::Instant::now() < deadline, "api.example.test never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leftover = store.zone_data().await.unwrap().acme_challenges;
    assert!(leftover.is_empty(), "challenge records withdrawn: {leftover:?}");

    // Nothing more is due; a renewal window longer than the validity renews, and the edge serves the new one.
    assert!(http01.pass().await.unwrap().issued.is_empty());
    let mut renewing = manager(ChallengeKind::Http01, Duration::from_secs(100 * 365 * 86400));
    let report = renewing.pass().await.unwrap();
    assert_eq!(report.issued.len(), 2, "{report:?}");
    let renewed = store.served_certificates().await.unwrap();
    let www = renewed.iter().find(|c| c.domain == "www.example.test").unwrap();
    assert_ne!(leaf_of(&www.chain_pem), leaf_of(&first[0].chain_pem));
    assert!(curl(&root, "www.example.test", edge.https_addr()).is_ok());
    edge.shutdown().await;
    dns.shutdown().await;
}

// curl runs synchronously: the API needs other threads meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_certificate_comes_from_the_acme_ca_through_the_certificate_manager() {
    let key = Arc::new(SecretKey::from_bytes(&[6; 32]));
    // A zone under a name pebble validates (names under `.localhost` never validated here).
    let settings = cloud_store::Settings { base_domain: "cloud.example.test".into(), ..Default::default() };
    let store = cloud_tests::fresh_store_with(settings).await;
    let (dns, dns_addr) = start_dns(&store).await;
    // Nothing is validated over http-01 here.
    let pebble = Pebble::start(dns_addr, 9).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pebble-root.pem");
    std::fs::write(&root, pebble.issuer_root_pem().await).unwrap();

    // The API's name is in the platform's zone, which our DNS answers: dns-01 works for it.
    let name = "api.dev.cloud.example.test";
    let config = cloud_api::ApiConfig {
        tls: cloud_api::tls::TlsMode::Acme,
        tls_names: vec![name.into()],
        secret_key: Some(key.clone()),
        ..Default::default()
    };
    let without = cloud_api::ApiConfig { tls_names: vec!["10.0.0.1".into()], ..config.clone() };
    let refused = cloud_api::tls::prepare(&without, &store, &key).await.unwrap_err();
    assert!(refused.to_string().contains("needs a DNS name"), "{refused}");
    let tls = cloud_api::tls::prepare(&config, &store, &key).await.unwrap().unwrap();
    assert_eq!(tls.pin, None, "a publicly trusted certificate is not pinned");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let state = cloud_api::AppState::new(store.clone(), config.clone()).await.unwrap();
    let server = cloud_api::serve(actix_web::web::Data::new(state), listener, Some(tls.server_config.clone())).unwrap();
    let handle = server.handle();
    tokio::spawn(server);
    let healthz = |ca: &std::path::Path| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(ca)
            .arg("--resolve")
            .arg(format!("{name}:{}:127.0.0.1", addr.port()))
            .arg(format!("https://{name}:{}/healthz", addr.port()))
            .output()
            .expect("curl");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Serving at once, with the platform CA's certificate until the manager has ordered one.
    let platform_ca = dir.path().join("platform-ca.pem");
    std::fs::write(&platform_ca, cloud_certs::PlatformCa::stored_certificate(&store).await.unwrap().unwrap()).unwrap();
    assert_eq!(healthz(&platform_ca).as_deref(), Some("ok\n"));
    assert_eq!(healthz(&root), None);

    let mut acme = AcmeConfig::new(pebble.directory_url.clone());
    acme.root_pem = Some(pebble.listener_ca_pem.clone());
    acme.timeout = Duration::from_secs(60);
    let mut manager = CertManager::new(
        store.clone(),
        key.clone(),
        OwnershipChecker::new(Some("127.0.0.1:9".parse().unwrap())),
        ManagerConfig {
            acme: Some(acme),
            challenge: ChallengeKind::Http01,
            dns_servers: vec![dns_addr],
            holder: "test".into(),
            ..ManagerConfig::default()
        },
    );
    let report = manager.pass().await.unwrap();
    let (_, error) = store.platform_certificate("api").await.unwrap();
    assert_eq!(
        (report.platform_issued.as_slice(), report.failed.as_slice()),
        (&["api".to_owned()][..], &[][..]),
        "{error:?}"
    );
    // The API follows the store: the ACME certificate, verified against the ACME CA's root alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while healthz(&root).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the API never served its ACME certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(manager.pass().await.unwrap().platform_issued.is_empty(), "nothing more is due");
    let leftover = store.zone_data().await.unwrap().acme_challenges;
    assert!(leftover.is_empty(), "challenge records withdrawn: {leftover:?}");
    handle.stop(false).await;
    dns.shutdown().await;
}
