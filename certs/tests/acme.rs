//! ACME orders against a real pebble on loopback (see `support`): http-01 and dns-01 end to end, account
//! restore, and failed challenges reported with pebble's reason and withdrawn.

mod support;

use async_trait::async_trait;
use cloud_certs::acme::{AcmeClient, AcmeConfig, AcmeError, ChallengeKind, ChallengeResponder, ResponderError};
use support::{Pebble, TestResponder};
use time::OffsetDateTime;

fn config(pebble: &Pebble) -> AcmeConfig {
    let mut config = AcmeConfig::new(&pebble.directory_url);
    config.contact = vec!["mailto:ops@example.test".to_owned()];
    config.root_pem = Some(pebble.listener_ca_pem.clone());
    config.timeout = std::time::Duration::from_secs(60);
    config
}

fn calls(responder: &TestResponder) -> Vec<String> {
    responder.calls.lock().unwrap().clone()
}

#[tokio::test]
async fn http01_order_gives_a_chain_that_verifies_for_the_name() {
    let mut pebble = Pebble::start().await;
    let responder = pebble.responder();
    let client = AcmeClient::create(config(&pebble)).await.unwrap();

    let names = vec!["www.example.test".to_owned()];
    let issued = client.order(&names, ChallengeKind::Http01, &*responder).await.unwrap();

    pebble.openssl_verify(&issued.chain_pem, "www.example.test").await;
    assert!(issued.not_after > OffsetDateTime::now_utc() + time::Duration::days(1), "{}", issued.not_after);
    assert!(issued.key_pem.contains("BEGIN PRIVATE KEY"));
    let calls = calls(&responder);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].starts_with("publish http-01 www.example.test "), "{calls:?}");
    assert!(calls[1].starts_with("withdraw http-01 www.example.test "), "{calls:?}");
    assert!(responder.tokens().is_empty(), "the token is withdrawn");
}

#[tokio::test]
async fn dns01_order_from_a_restored_account_covers_a_name_and_its_wildcard() {
    let mut pebble = Pebble::start().await;
    let responder = pebble.responder();
    let created = AcmeClient::create(config(&pebble)).await.unwrap();
    let stored = created.credentials_json().to_owned();
    let client = AcmeClient::restore(config(&pebble), &stored).await.unwrap();
    assert_eq!(client.account_id(), created.account_id());

    // A name and its wildcard share `_acme-challenge.shop.example.test`: two TXT values at once.
    let names = vec!["*.shop.example.test".to_owned(), "shop.example.test".to_owned()];
    let issued = client.order(&names, ChallengeKind::Dns01, &*responder).await.unwrap();

    pebble.openssl_verify(&issued.chain_pem, "shop.example.test").await;
    pebble.openssl_verify(&issued.chain_pem, "cart.shop.example.test").await;
    let calls = calls(&responder);
    let published = calls.iter().filter(|c| c.starts_with("publish dns-01 _acme-challenge.shop.example.test ")).count();
    let withdrawn =
        calls.iter().filter(|c| c.starts_with("withdraw dns-01 _acme-challenge.shop.example.test ")).count();
    assert_eq!((published, withdrawn), (2, 2), "{calls:?}");
    assert!(pebble.dns.values("_acme-challenge.shop.example.test").is_empty(), "the TXT values are withdrawn");
}

#[tokio::test]
async fn wrong_answers_fail_naming_the_challenge_and_pebbles_reason_and_are_withdrawn() {
    let mut pebble = Pebble::start().await;
    let responder = pebble.responder();
    *responder.wrong_value.lock().unwrap() = Some("not-the-key-authorization".to_owned());
    let client = AcmeClient::create(config(&pebble)).await.unwrap();

    let err = client.order(&["bad.example.test".to_owned()], ChallengeKind::Http01, &*responder).await.unwrap_err();
    let AcmeError::ChallengeFailed { name, kind, reason } = &err else { panic!("{err:?}") };
    assert_eq!((name.as_str(), *kind), ("bad.example.test", ChallengeKind::Http01));
    // Pebble's verdict, quoting what it fetched.
    assert!(reason.contains("not-the-key-authorization"), "{reason}");
    assert!(err.to_string().starts_with("the http-01 challenge for bad.example.test failed: "), "{err}");
    assert!(responder.tokens().is_empty(), "withdrawn after the failure");
    assert!(calls(&responder).last().unwrap().starts_with("withdraw http-01 bad.example.test "));

    let err = client.order(&["txt.example.test".to_owned()], ChallengeKind::Dns01, &*responder).await.unwrap_err();
    let AcmeError::ChallengeFailed { name, kind, reason } = &err else { panic!("{err:?}") };
    assert_eq!((name.as_str(), *kind), ("txt.example.test", ChallengeKind::Dns01));
    assert!(reason.contains("urn:ietf:params:acme:error:unauthorized"), "{reason}");
    assert!(pebble.dns.values("_acme-challenge.txt.example.test").is_empty(), "withdrawn after the failure");

    // http-01 cannot prove a wildcard: pebble offers only dns-01 for it, and nothing is published.
    let before = calls(&responder).len();
    let err = client.order(&["*.wild.example.test".to_owned()], ChallengeKind::Http01, &*responder).await.unwrap_err();
    assert!(
        matches!(&err, AcmeError::ChallengeUnavailable { name, kind: ChallengeKind::Http01, offered }
            if name == "*.wild.example.test" && offered.contains("dns-01")),
        "{err:?}"
    );
    assert_eq!(calls(&responder).len(), before);

    // A responder for http-01 only (the edge's kind) asked for dns-01: its default says so.
    let err = client.order(&["dns.example.test".to_owned()], ChallengeKind::Dns01, &HttpOnly).await.unwrap_err();
    assert!(matches!(&err, AcmeError::Publish { name, kind: ChallengeKind::Dns01, .. } if name == "dns.example.test"));
    let source = std::error::Error::source(&err).expect("the responder's error").to_string();
    assert!(source.contains("does not answer dns-01"), "{source}");
}

struct HttpOnly;

#[async_trait]
impl ChallengeResponder for HttpOnly {
    async fn publish_http01(&self, _: &str, _: &str, _: &str) -> Result<(), ResponderError> {
        Ok(())
    }
}
