//! A real ACME CA on loopback for the tests: Debian's pebble (`/usr/bin/pebble`, scripts/setup installs it) with a
//! listener certificate made here (the package ships none), a tiny DNS it resolves every name through (A
//! 127.0.0.1 for any name, TXT from a table), and a responder answering http-01 on pebble's `httpPort` and dns-01
//! in that DNS. Each test starts its own: no shared state, nothing but loopback traffic.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cloud_certs::acme::{ChallengeResponder, ResponderError};
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// A running pebble (see [`cloud_tests::pebble`]) with the DNS it resolves through and its http-01 port.
pub struct Pebble {
    inner: cloud_tests::pebble::Pebble,
    /// The DNS pebble resolves through.
    pub dns: Arc<TestDns>,
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
        let dns = Arc::new(TestDns::start().await);
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inner = cloud_tests::pebble::Pebble::start(dns.addr, http.local_addr().unwrap().port()).await;
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

/// A DNS on a loopback UDP port: A 127.0.0.1 for every name (where pebble connects for http-01), TXT from a
/// table, empty answers for other types.
pub struct TestDns {
    /// Where pebble sends its questions.
    pub addr: SocketAddr,
    txt: Arc<Mutex<HashMap<String, Vec<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    async fn start() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let txt: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
        let table = txt.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let Some(question) = query.queries.first().cloned() else { continue };
                let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
                reply.metadata.message_type = MessageType::Response;
                reply.metadata.authoritative = true;
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                reply.add_query(question.clone());
                let name = question.name().clone();
                match question.query_type() {
                    RecordType::A => {
                        reply.add_answer(Record::from_rdata(name, 60, RData::A(A(Ipv4Addr::LOCALHOST))));
                    }
                    RecordType::TXT => {
                        let values = table.lock().unwrap().get(&key(&name.to_ascii())).cloned().unwrap_or_default();
                        for v in values {
                            reply.add_answer(Record::from_rdata(name.clone(), 0, RData::TXT(TXT::new(vec![v]))));
                        }
                    }
                    _ => {}
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = sock.send_to(&bytes, from).await;
                }
            }
        });
        Self { addr, txt, task }
    }

    /// The TXT values at `name` now.
    pub fn txt(&self, name: &str) -> Vec<String> {
        self.txt.lock().unwrap().get(&key(name)).cloned().unwrap_or_default()
    }

    fn add_txt(&self, name: &str, value: &str) {
        let mut table = self.txt.lock().unwrap();
        let values = table.entry(key(name)).or_default();
        if !values.iter().any(|v| v == value) {
            values.push(value.to_owned());
        }
    }

    fn remove_txt(&self, name: &str, value: &str) {
        let mut table = self.txt.lock().unwrap();
        if let Some(values) = table.get_mut(&key(name)) {
            values.retain(|v| v != value);
            if values.is_empty() {
                table.remove(&key(name));
            }
        }
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Answers both challenge kinds, records what it was asked, and can be told to publish wrong values.
pub struct TestResponder {
    dns: Arc<TestDns>,
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
        self.dns.add_txt(record, &self.value(value));
        Ok(())
    }

    async fn withdraw_dns01(&self, record: &str, value: &str) -> Result<(), ResponderError> {
        self.record(format!("withdraw dns-01 {record} {value}"));
        self.dns.remove_txt(record, &self.value(value));
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
