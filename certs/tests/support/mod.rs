//! A real ACME CA on loopback for the tests: Debian's pebble (`/usr/bin/pebble`, scripts/setup installs it) with a
//! listener certificate made here (the package ships none), a tiny DNS it resolves every name through (A
//! 127.0.0.1 for any name, TXT from a table), and a responder answering http-01 on pebble's `httpPort` and dns-01
//! in that DNS. Each test starts its own: no shared state, nothing but loopback traffic.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cloud_certs::acme::{ChallengeResponder, ResponderError};
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{RData, Record, RecordType};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::process::{Child, Command};

const PEBBLE: &str = "/usr/bin/pebble";

/// A running pebble, its DNS and its http-01 port.
pub struct Pebble {
    _child: Child,
    dir: tempfile::TempDir,
    /// The ACME directory.
    pub directory_url: String,
    /// The CA of pebble's listener certificate: what the ACME client must trust.
    pub listener_ca_pem: String,
    management: SocketAddr,
    /// The DNS pebble resolves through.
    pub dns: Arc<TestDns>,
    /// Bound on pebble's `httpPort`, for the responder's server.
    http: Option<TcpListener>,
}

impl Pebble {
    /// Starts pebble (retrying on the rare port taken between our probe and its bind) and waits for its directory.
    pub async fn start() -> Self {
        assert!(Path::new(PEBBLE).exists(), "{PEBBLE} is missing: run scripts/setup (Debian package pebble)");
        let dns = Arc::new(TestDns::start().await);
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, cert_pem, key_pem) = listener_certificate();
        std::fs::write(dir.path().join("cert.pem"), cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), key_pem).unwrap();
        for attempt in 1..=3 {
            let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let http_port = http.local_addr().unwrap().port();
            let (listen, management, tls) = (free_port(), free_port(), free_port());
            let config = serde_json::json!({
                "pebble": {
                    "listenAddress": format!("127.0.0.1:{listen}"),
                    "managementListenAddress": format!("127.0.0.1:{management}"),
                    "certificate": dir.path().join("cert.pem"),
                    "privateKey": dir.path().join("key.pem"),
                    "httpPort": http_port,
                    "tlsPort": tls,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": false
                }
            });
            let config_path = dir.path().join("pebble.json");
            std::fs::write(&config_path, config.to_string()).unwrap();
            let log_path = dir.path().join(format!("pebble-{attempt}.log"));
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(PEBBLE)
                .arg("-config")
                .arg(&config_path)
                .arg("-dnsserver")
                .arg(dns.addr.to_string())
                // No random 0-15 s wait before validating, no random bad-nonce rejections.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("starting pebble");
            let directory_url = format!("https://127.0.0.1:{listen}/dir");
            let client = https_client(&ca_pem);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("address already in use") && attempt < 3 {
                        break;
                    }
                    panic!("pebble exited ({status}):\n{log}");
                }
                let ready = client.get(&directory_url).send().await.is_ok_and(|r| r.status().is_success());
                if ready {
                    return Self {
                        _child: child,
                        dir,
                        directory_url,
                        listener_ca_pem: ca_pem,
                        management: SocketAddr::from((Ipv4Addr::LOCALHOST, management)),
                        dns,
                        http: Some(http),
                    };
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "pebble's directory did not answer within 20 s:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// The root pebble issues under (it makes a new one at every start).
    pub async fn issuer_root_pem(&self) -> String {
        let url = format!("https://{}/roots/0", self.management);
        let rsp = https_client(&self.listener_ca_pem).get(url).send().await.unwrap();
        assert!(rsp.status().is_success(), "{}", rsp.status());
        rsp.text().await.unwrap()
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

    /// Checks `chain_pem` (leaf then intermediates) with `openssl verify` against pebble's root for `name`.
    pub async fn openssl_verify(&self, chain_pem: &str, name: &str) {
        let certs: Vec<String> = chain_pem
            .split_inclusive("-----END CERTIFICATE-----")
            .filter(|c| c.contains("BEGIN CERTIFICATE"))
            .map(|c| format!("{}\n", c.trim()))
            .collect();
        assert!(certs.len() >= 2, "a leaf and at least one intermediate:\n{chain_pem}");
        let path = |file: &str| -> PathBuf { self.dir.path().join(file) };
        std::fs::write(path("root.pem"), self.issuer_root_pem().await).unwrap();
        std::fs::write(path("leaf.pem"), &certs[0]).unwrap();
        std::fs::write(path("intermediates.pem"), certs[1..].concat()).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["verify", "-CAfile", "root.pem", "-untrusted", "intermediates.pem", "-verify_hostname", name])
            .arg("leaf.pem")
            .current_dir(self.dir.path())
            .output()
            .expect("openssl (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "openssl verify for {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A CA and a leaf for 127.0.0.1 and localhost signed by it: (CA PEM, leaf PEM, leaf key PEM). Distinct subjects,
/// or the leaf would look self-signed (FACTS).
fn listener_certificate() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = dn("pebble listener test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    leaf.distinguished_name = dn("pebble listener");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
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
