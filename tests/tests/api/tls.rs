//! The API's own TLS with the operator's certificate (`api.tls = "files"`): served over HTTP/2 and HTTP/1.1 to
//! clients that trust the operator's CA, pinned by the leaf's fingerprint, and refused clearly when the files are
//! missing or are not a certificate and key.

use std::sync::Arc;

use cloud_api::tls::{TlsError, TlsMode, prepare};
use cloud_api::{ApiConfig, AppState};
use cloud_tests::pki::TestCa;
use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn the_operators_certificate_is_served_and_bad_files_are_named() {
    let store = cloud_tests::fresh_store().await;
    let key = Arc::new(cloud_tests::random_secret_key());
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("operator CA");
    let (chain, leaf_key) = ca.leaf(&["api.example.test", "127.0.0.1"], -1, 30);
    let (cert_file, key_file) = (dir.path().join("api.crt"), dir.path().join("api.key"));
    std::fs::write(&cert_file, &chain).unwrap();
    std::fs::write(&key_file, &leaf_key).unwrap();
    let config = ApiConfig {
        tls: TlsMode::Files,
        tls_cert_file: Some(cert_file.clone()),
        tls_key_file: Some(key_file.clone()),
        secret_key: Some(key.clone()),
        ..ApiConfig::default()
    };
    let served = prepare(&config, &store, &key).await.unwrap().expect("TLS");
    let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).next().unwrap().unwrap();
    assert_eq!(served.pin, Some(cloud_domain::join::fingerprint(&leaf)), "clients pin the configured leaf");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::new(store.clone(), config.clone()).await.unwrap();
    let server =
        cloud_api::serve(actix_web::web::Data::new(state), listener, Some(served.server_config.clone())).unwrap();
    let handle = server.handle();
    tokio::spawn(server);
    for http1 in [false, true] {
        let mut client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
            .resolve("api.example.test", addr);
        if http1 {
            client = client.http1_only();
        }
        let res = client.build().unwrap().get(format!("https://api.example.test:{}/healthz", addr.port())).send().await;
        let res = res.unwrap();
        let want = if http1 { reqwest::Version::HTTP_11 } else { reqwest::Version::HTTP_2 };
        assert_eq!((res.status().as_u16(), res.version()), (200, want));
    }
    // A client that trusts only public roots refuses it.
    assert!(reqwest::get(format!("https://127.0.0.1:{}/healthz", addr.port())).await.is_err());
    handle.stop(false).await;

    // Missing, unreadable and mismatched files are refused before anything serves.
    let without = ApiConfig { tls_key_file: None, ..config.clone() };
    assert!(matches!(prepare(&without, &store, &key).await, Err(TlsError::MissingFiles)));
    let absent = ApiConfig { tls_cert_file: Some(dir.path().join("nope.crt")), ..config.clone() };
    let e = prepare(&absent, &store, &key).await.unwrap_err();
    assert!(e.to_string().contains("nope.crt"), "{e}");
    let swapped = ApiConfig { tls_cert_file: Some(key_file.clone()), ..config.clone() };
    let e = prepare(&swapped, &store, &key).await.unwrap_err();
    assert!(matches!(e, TlsError::Pem { what: "certificate", .. }), "{e}");
    let (_, other_key) = ca.leaf(&["x.test"], -1, 30);
    std::fs::write(&key_file, other_key).unwrap();
    assert!(matches!(prepare(&config, &store, &key).await, Err(TlsError::Key(_))), "a key that is not the leaf's");
}
