//! Debian's `pebble` (the ACME test CA) on loopback, as the reference peer of our ACME tests: it resolves names
//! through the DNS the test names and validates http-01 on the port the test names. The package ships no listener
//! certificate, so one is generated here (with a CA of its own, whose name differs from the leaf's).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::process::{Child, Command};

const PEBBLE: &str = "/usr/bin/pebble";

/// A running pebble.
pub struct Pebble {
    _child: Child,
    dir: tempfile::TempDir,
    /// The ACME directory.
    pub directory_url: String,
    /// The CA of pebble's listener certificate: what the ACME client must trust.
    pub listener_ca_pem: String,
    management: SocketAddr,
}

impl Pebble {
    /// Starts pebble resolving through `dns` and validating http-01 on `http_port` (retrying on the rare port
    /// taken between our probe and its bind), and waits for its directory.
    pub async fn start(dns: SocketAddr, http_port: u16) -> Self {
        assert!(Path::new(PEBBLE).exists(), "{PEBBLE} is missing: run scripts/setup (Debian package pebble)");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (ca_pem, cert_pem, key_pem) = listener_certificate();
        std::fs::write(dir.path().join("cert.pem"), cert_pem).expect("writable");
        std::fs::write(dir.path().join("key.pem"), key_pem).expect("writable");
        for attempt in 1..=3 {
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
            std::fs::write(&config_path, config.to_string()).expect("writable");
            let log_path = dir.path().join(format!("pebble-{attempt}.log"));
            let log = std::fs::File::create(&log_path).expect("writable");
            let mut child = Command::new(PEBBLE)
                .arg("-config")
                .arg(&config_path)
                .arg("-dnsserver")
                .arg(dns.to_string())
                // No random 0-15 s wait before validating, no random bad-nonce rejections.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log.try_clone().expect("a file"))
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("starting pebble");
            let directory_url = format!("https://127.0.0.1:{listen}/dir");
            let client = https_client(&ca_pem);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().expect("waitable") {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("address already in use") && attempt < 3 {
                        break;
                    }
                    panic!("pebble exited ({status}):\n{log}");
                }
                if client.get(&directory_url).send().await.is_ok_and(|r| r.status().is_success()) {
                    return Self {
                        _child: child,
                        dir,
                        directory_url,
                        listener_ca_pem: ca_pem,
                        management: SocketAddr::from((Ipv4Addr::LOCALHOST, management)),
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
        let rsp = https_client(&self.listener_ca_pem).get(url).send().await.expect("pebble's management API");
        assert!(rsp.status().is_success(), "{}", rsp.status());
        rsp.text().await.expect("a body")
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
        std::fs::write(path("root.pem"), self.issuer_root_pem().await).expect("writable");
        std::fs::write(path("leaf.pem"), &certs[0]).expect("writable");
        std::fs::write(path("intermediates.pem"), certs[1..].concat()).expect("writable");
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
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("bound").port()
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("PEM"))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a client")
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A CA and a leaf for 127.0.0.1 and localhost signed by it: (CA PEM, leaf PEM, leaf key PEM).
fn listener_certificate() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("a key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = dn("pebble listener test CA");
    let ca_pem = ca.self_signed(&ca_key).expect("self-signed").pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("a key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    leaf.subject_alt_names.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    leaf.distinguished_name = dn("pebble listener");
    let cert = leaf.signed_by(&key, &issuer).expect("signed");
    (ca_pem, cert.pem(), key.serialize_pem())
}
