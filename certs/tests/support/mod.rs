//! A real ACME CA on loopback for the tests: Debian's pebble (`/usr/bin/pebble`, scripts/setup installs it) with a
//! listener certificate made here (the package ships none), a tiny DNS it resolves every name through
//! ([`TxtServer`] answering A 127.0.0.1 for any name, TXT from a table), and a responder answering http-01 on pebble's `httpPort` and dns-01
//! in that DNS. Each test starts its own: no shared state, nothing but loopback traffic.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cloud_certs::acme::{ChallengeResponder, ResponderError};
use cloud_tests::txt_server::TxtServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A running pebble (see [`cloud_tests::pebble`]) with the DNS it resolves through (A 127.0.0.1 for every name,
/// where pebble connects for http-01, and TXT from a table) and its http-01 port.
pub struct Pebble {
    inner: cloud_tests::pebble::Pebble,
    /// The DNS pebble resolves through.
    pub dns: Arc<TxtServer>,
    /// Bound on pebble's `httpPort`, for the responder's server.
    http: Option<TcpListener>,
}

impl std::ops::Deref for Pebble {
    type Target = cloud_tests::pebble::Pebble;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Pebble {
    /// Starts pebble with a DNS of the test's and a listener for the responder on its `httpPort`.
    pub async fn start() -> Self {
        let dns = Arc::new(TxtServer::start_with_address(Ipv4Addr::LOCALHOST).await);
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inner = cloud_tests::pebble::Pebble::start(dns.addr(), http.local_addr().unwrap().port()).await;
        Self { inner, dns, http: Some(http) }
    }

    /// A responder serving http-01 on pebble's `httpPort` (once per pebble) and dns-01 through [`Self::dns`].
    pub fn responder(&mut self) -> Arc<TestResponder> {
        let responder = Arc::new(TestResponder {
            dns: self.dns.clone(),
            http: Mutex::default(),
            calls: Mutex::default(),
            wrong_value: Mutex::default(),
        });
        let listener = self.http.take().expect("one responder per pebble");
        tokio::spawn(serve_http01(listener, responder.clone()));
        responder
    }
}

/// Answers both challenge kinds, records what it was asked, and can be told to publish wrong values.
pub struct TestResponder {
    dns: Arc<TxtServer>,
    http: Mutex<HashMap<String, String>>,
    /// Every publish and withdraw, in order: `publish http-01 www.example.test <token>`, ...
    pub calls: Mutex<Vec<String>>,
    /// Publish this instead of the right value.
    pub wrong_value: Mutex<Option<String>>,
}

impl TestResponder {
    fn value(&self, right: &str) -> String {
        self.wrong_value.lock().unwrap().clone().unwrap_or_else(|| right.to_owned())
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    /// The http-01 tokens served now.
    pub fn tokens(&self) -> Vec<String> {
        self.http.lock().unwrap().keys().cloned().collect()
    }
}

#[async_trait]
impl ChallengeResponder for TestResponder {
    async fn publish_http01(&self, domain: &str, token: &str, key_authorization: &str) -> Result<(), ResponderError> {
        self.record(format!("publish http-01 {domain} {token}"));
        self.http.lock().unwrap().insert(token.to_owned(), self.value(key_authorization));
        Ok(())
    }

    async fn withdraw_http01(&self, domain: &str, token: &str) -> Result<(), ResponderError> {
        self.record(format!("withdraw http-01 {domain} {token}"));
        self.http.lock().unwrap().remove(token);
        Ok(())
    }

    async fn publish_dns01(&self, record: &str, value: &str) -> Result<(), ResponderError> {
        self.record(format!("publish dns-01 {record} {value}"));
        self.dns.add(record, &self.value(value));
        Ok(())
    }

    async fn withdraw_dns01(&self, record: &str, value: &str) -> Result<(), ResponderError> {
        self.record(format!("withdraw dns-01 {record} {value}"));
        self.dns.remove(record, &self.value(value));
        Ok(())
    }
}

/// HTTP/1.1, one request per connection: `GET /.well-known/acme-challenge/<token>` answers the key
/// authorization, anything else 404.
async fn serve_http01(listener: TcpListener, responder: Arc<TestResponder>) {
    while let Ok((mut conn, _)) = listener.accept().await {
        let responder = responder.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            let path = head.split_whitespace().nth(1).unwrap_or_default();
            let body = path
                .strip_prefix("/.well-known/acme-challenge/")
                .and_then(|token| responder.http.lock().unwrap().get(token).cloned());
            let response = match body {
                Some(body) => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                ),
                None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
            };
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}
