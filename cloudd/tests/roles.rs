//! Roles run as their own `cloudd` processes on a shared PostgreSQL, as production runs them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloud_tests::hosts::Proc as Role;

/// Starts a role with its output discarded.
fn quiet(cmd: &mut Command) -> Role {
    Role(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

/// Polls `<ops>/readyz` until it answers 200 (a minute at most).
async fn wait_ready(ops: &str, what: &str) {
    let t0 = Instant::now();
    while !reqwest::get(format!("{ops}/readyz")).await.is_ok_and(|r| r.status() == 200) {
        assert!(t0.elapsed() < Duration::from_secs(60), "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A client of an API serving over TLS with a certificate of the platform CA: it trusts that CA and nothing else.
/// The CA is read from the database (created now if no role has yet, as the API would), so the client exists
/// before the API does.
async fn api_client(url: &str, key_file: &std::path::Path) -> reqwest::Client {
    let store = cloud_store::Store::new(cloud_store::connect(url, 1).await.unwrap(), Default::default());
    let key = cloud_certs::seal::SecretKey::from_file(key_file).unwrap();
    let ca = cloud_certs::PlatformCa::load_or_create(&store, &key).await.unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// The platform CA's certificate, as the API serves it at `/v1/ca.pem`.
async fn ca_pem(url: &str) -> String {
    let store = cloud_store::Store::new(cloud_store::connect(url, 1).await.unwrap(), Default::default());
    cloud_certs::PlatformCa::stored_certificate(&store).await.unwrap().unwrap()
}

/// A fresh database with the schema applied by `cloudd migrate`, as an operator does before starting roles.
async fn migrated_database() -> String {
    let url = cloud_tests::fresh_database().await;
    let out = Command::new(env!("CARGO_BIN_EXE_cloudd")).arg("migrate").env("DATABASE_URL", &url).output().unwrap();
    assert!(out.status.success(), "cloudd migrate: {}", String::from_utf8_lossy(&out.stderr));
    url
}

#[tokio::test]
async fn a_role_refuses_a_schema_that_is_behind_and_names_cloudd_migrate() {
    let url = cloud_tests::fresh_database().await;
    let run = |role: &str, env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudd"));
        cmd.arg(role).env("DATABASE_URL", &url).env("CLOUD_DNS_LISTEN", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run("dns", &[]);
    assert!(!out.status.success(), "cloudd dns started on an empty database");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("run `cloudd migrate` first"), "{said}");
    assert!(said.contains("migrate_on_start"), "{said}");
    // Nothing was applied behind the operator's back.
    let pool = cloud_store::connect(&url, 1).await.unwrap();
    let store = cloud_store::Store::new(pool, Default::default());
    assert_eq!(store.pending_migrations().await.unwrap().len(), cloud_store::MIGRATOR.iter().count());
    let out = run("migrate", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(store.pending_migrations().await.unwrap(), Vec::<i64>::new());
}

#[tokio::test]
async fn cloudd_dns_serves_the_zone_and_its_operations_endpoints() {
    let url = migrated_database().await;
    let (dns_port, ops_port) = (free_port(), free_port());
    let _dns = quiet(
        Command::new(env!("CARGO_BIN_EXE_cloudd"))
            .arg("dns")
            .env("DATABASE_URL", &url)
            .env("CLOUD_DNS_LISTEN", format!("127.0.0.1:{dns_port}"))
            .env("CLOUD_DNS_OPS_LISTEN", format!("127.0.0.1:{ops_port}")),
    );
    let ops = format!("http://127.0.0.1:{ops_port}");
    let client = reqwest::Client::new();
    wait_ready(&ops, "cloudd dns did not become ready").await;
    assert_eq!(client.get(format!("{ops}/healthz")).send().await.unwrap().text().await.unwrap(), "ok\n");

    // A real resolver client asks for the zone's SOA over UDP.
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &dns_port.to_string(), "dev.cloud.localhost", "SOA", "+norec", "+short"])
        .output()
        .expect("dig (scripts/setup installs bind9-dnsutils)");
    let soa = String::from_utf8_lossy(&out.stdout);
    assert!(soa.starts_with("ns1.dev.cloud.localhost. hostmaster.dev.cloud.localhost."), "{soa}");

    let metrics = client.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("dns_queries_total{"), "{metrics}");
    assert!(metrics.contains("dns_snapshot_stale 0"), "{metrics}");
}

#[tokio::test]
async fn cloudd_edge_routes_by_host_and_serves_its_operations_endpoints() {
    let url = cloud_tests::fresh_database().await;
    let store = cloud_store::Store::new(cloud_store::connect(&url, 2).await.unwrap(), Default::default());
    store.migrate().await.unwrap();
    let tenant = store.create_tenant("acme", Default::default()).await.unwrap();
    let ports = cloud_domain::ports::parse_specs(&["80:8080"], &Default::default()).unwrap();
    let svc = store
        .create_service(tenant.id, cloud_store::NewService { ports, ..cloud_store::NewService::named("web") })
        .await
        .unwrap();
    let (https, http, ops_port) = (free_port(), free_port(), free_port());
    // Without the platform secret key the edge cannot open the CA's key: it says so and stops.
    let out = Command::new(env!("CARGO_BIN_EXE_cloudd"))
        .arg("edge")
        .env("DATABASE_URL", &url)
        .env("CLOUD_EDGE_HTTPS_LISTEN", "127.0.0.1:0")
        .env("CLOUD_EDGE_HTTP_LISTEN", "127.0.0.1:0")
        .env_remove("CLOUD_SECRET_KEY_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("platform.secret_key_file"), "{said}");
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secret.key");
    std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).unwrap();
    let _edge = quiet(
        Command::new(env!("CARGO_BIN_EXE_cloudd"))
            .arg("edge")
            .env("DATABASE_URL", &url)
            .env("CLOUD_SECRET_KEY_FILE", &key_file)
            .env("CLOUD_EDGE_HTTPS_LISTEN", format!("127.0.0.1:{https}"))
            .env("CLOUD_EDGE_HTTP_LISTEN", format!("127.0.0.1:{http}"))
            .env("CLOUD_EDGE_OPS_LISTEN", format!("127.0.0.1:{ops_port}")),
    );
    let ops = format!("http://127.0.0.1:{ops_port}");
    let client = reqwest::Client::new();
    wait_ready(&ops, "cloudd edge did not become ready").await;
    let get = |host: String| {
        let client = client.clone();
        async move {
            let res = client.get(format!("http://127.0.0.1:{http}/")).header("host", host).send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    assert_eq!(get("nobody.dev.cloud.localhost".into()).await.0, 404);
    // The service exists but nothing runs behind it yet.
    let (status, body) = get(svc.fqdn.clone()).await;
    assert_eq!((status, body.as_str()), (503, "no instance of this service is running\n"));
    let metrics = client.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("edge_route_table_services 1"), "{metrics}");
    assert!(metrics.contains("edge_route_table_stale 0"), "{metrics}");
}

#[tokio::test]
async fn cloudd_certs_runs_passes_and_serves_its_operations_endpoints() {
    let url = migrated_database().await;
    // Without the platform secret key it cannot seal certificate keys: it says so and stops.
    let out = Command::new(env!("CARGO_BIN_EXE_cloudd"))
        .arg("certs")
        .env("DATABASE_URL", &url)
        .env_remove("CLOUD_SECRET_KEY_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("platform.secret_key_file"));

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secret.key");
    std::fs::write(&key_file, "cd".repeat(32)).unwrap();
    let ops_port = free_port();
    std::fs::write(dir.path().join("cloudd.toml"), format!("[certs]\nops_listen = \"127.0.0.1:{ops_port}\"\n"))
        .unwrap();
    let _certs = quiet(
        Command::new(env!("CARGO_BIN_EXE_cloudd"))
            .args(["--config", &dir.path().join("cloudd.toml").display().to_string(), "certs"])
            .env("DATABASE_URL", &url)
            .env("CLOUD_SECRET_KEY_FILE", &key_file),
    );
    let ops = format!("http://127.0.0.1:{ops_port}");
    let client = reqwest::Client::new();
    wait_ready(&ops, "cloudd certs never completed a pass").await;
    let metrics = client.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("certs_last_pass_ok 1"), "{metrics}");
}

#[tokio::test]
async fn cloudd_api_and_bootstrap_need_the_secret_key_that_seals_the_token_signing_key() {
    let url = migrated_database().await;
    let run = |args: &[&str], key: Option<&std::path::Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudd"));
        cmd.args(args).env("DATABASE_URL", &url).env("CLOUD_API_LISTEN", "127.0.0.1:0");
        match key {
            Some(k) => cmd.env("CLOUD_SECRET_KEY_FILE", k),
            None => cmd.env_remove("CLOUD_SECRET_KEY_FILE"),
        };
        cmd
    };
    for role in [&["api"][..], &["bootstrap", "--tenant", "initech"]] {
        let out = run(role, None).output().unwrap();
        assert!(!out.status.success(), "{role:?} ran without the secret key");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("platform.secret_key_file"), "{role:?}: {said}");
    }

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secret.key");
    std::fs::write(&key_file, "7e".repeat(32)).unwrap();
    let out = run(&["bootstrap", "--tenant", "initech"], Some(&key_file)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let port = free_port();
    let _api = quiet(run(&["api"], Some(&key_file)).env("CLOUD_API_LISTEN", format!("127.0.0.1:{port}")));
    // Over TLS by default, with a certificate of the platform CA for the loopback address; HTTP/2 and HTTP/1.1.
    let api = format!("https://127.0.0.1:{port}");
    let client = api_client(&url, &key_file).await;
    let t0 = Instant::now();
    while !client.get(format!("{api}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(t0.elapsed() < Duration::from_secs(60), "cloudd api did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let me = client.get(format!("{api}/v1/whoami")).bearer_auth(&token).send().await.unwrap();
    assert_eq!((me.status().as_u16(), me.version()), (200, reqwest::Version::HTTP_2));
    let h1 = reqwest::Client::builder()
        .http1_only()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem(&url).await.as_bytes()).unwrap())
        .build()
        .unwrap();
    let res = h1.get(format!("{api}/healthz")).send().await.unwrap();
    assert_eq!((res.status().as_u16(), res.version()), (200, reqwest::Version::HTTP_11));
    // Plain HTTP on the TLS port gets nothing, and a client that trusts only public roots refuses the certificate.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    assert!(reqwest::get(format!("{api}/healthz")).await.is_err());
    let me: serde_json::Value = me.json().await.unwrap();
    assert_eq!(
        (&me["tenant"]["name"], &me["scopes"]),
        (&"initech".into(), &serde_json::json!(["read", "write", "admin"]))
    );
    // The database holds the signing key sealed only.
    let store = cloud_store::Store::new(cloud_store::connect(&url, 1).await.unwrap(), Default::default());
    assert!(store.stored_platform_secret("jwt-hs256").await.unwrap().is_none());
    assert!(store.stored_platform_secret("jwt-hs256-sealed").await.unwrap().is_some());
}

/// A scaled-out platform on one shared PostgreSQL, every role its own process: one API, two edges, one DNS, two
/// node agents. Logs go to files in `dir` (printed when a wait fails).
struct Platform {
    dir: tempfile::TempDir,
    /// Every role process started, by log name, for [`Platform::logs`].
    started: std::sync::Mutex<Vec<(String, u32)>>,
    url: String,
    key_file: std::path::PathBuf,
    pool: String,
    api_port: u16,
}

impl Platform {
    fn role(&self, name: &str, role: &str, config: &str, env: &[(&str, String)]) -> Role {
        let config_path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudd"));
        cmd.args(["--config", &config_path.display().to_string(), role])
            .env("DATABASE_URL", &self.url)
            .env("CLOUD_SECRET_KEY_FILE", &self.key_file)
            .env("CLOUD_TENANT_POOL", &self.pool)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        self.started.lock().unwrap().push((name.to_owned(), child.id()));
        Role(child)
    }

    fn api(&self) -> Role {
        self.role("api", "api", "", &[("CLOUD_API_LISTEN", format!("127.0.0.1:{}", self.api_port))])
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out.push_str(&format!("--- {}\n", e.path().display()));
                tail.iter().rev().for_each(|l| out.push_str(&format!("{l}\n")));
            }
        }
        // A role that logged nothing either hangs or died: say which, and where its threads wait.
        for (name, pid) in self.started.lock().unwrap().iter() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(')').next().unwrap_or("").split_whitespace().next().unwrap_or("gone");
            let waits: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("wchan")).ok())
                .collect();
            out.push_str(&format!("--- {name} (pid {pid}): state {state}, threads waiting in {waits:?}\n"));
        }
        out
    }

    async fn wait(&self, what: &str, mut ok: impl AsyncFnMut() -> bool) {
        let t0 = Instant::now();
        while !ok().await {
            assert!(t0.elapsed() < Duration::from_secs(120), "never {what}:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn ready(port: u16) -> bool {
    let url = format!("http://127.0.0.1:{port}/readyz");
    reqwest::get(url).await.is_ok_and(|r| r.status() == 200)
}

#[tokio::test]
async fn a_scaled_out_platform_serves_from_every_edge_reschedules_a_killed_node_and_survives_an_api_restart() {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        eprintln!("skipped: node agents need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secret.key");
    std::fs::write(&key_file, "5a".repeat(32)).unwrap();
    let p = Platform {
        url: migrated_database().await,
        key_file,
        pool: format!("10.{}.0.0/16", 150 + std::process::id() % 10),
        api_port: free_port(),
        dir,
        started: Default::default(),
    };
    let mut api = p.api();
    let api_url = format!("https://127.0.0.1:{}", p.api_port);
    let client = api_client(&p.url, &p.key_file).await;
    p.wait("the API ready", async || {
        client.get(format!("{api_url}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let out = Command::new(env!("CARGO_BIN_EXE_cloudd"))
        .args(["bootstrap", "--tenant", "initech"])
        .env("DATABASE_URL", &p.url)
        .env("CLOUD_SECRET_KEY_FILE", &p.key_file)
        .env("CLOUD_TENANT_POOL", &p.pool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let mut edges = Vec::new();
    for i in 1..=2 {
        let (https, http, ops) = (free_port(), free_port(), free_port());
        let role = p.role(
            &format!("edge{i}"),
            "edge",
            &format!("[edge]\nports_ip = \"127.0.88.{i}\"\ngrace_period_seconds = 1\n"),
            &[
                ("CLOUD_EDGE_HTTPS_LISTEN", format!("127.0.0.1:{https}")),
                ("CLOUD_EDGE_HTTP_LISTEN", format!("127.0.0.1:{http}")),
                ("CLOUD_EDGE_OPS_LISTEN", format!("127.0.0.1:{ops}")),
            ],
        );
        edges.push((role, https, ops));
    }
    let (dns_port, dns_ops) = (free_port(), free_port());
    let _dns = p.role(
        "dns",
        "dns",
        "",
        &[
            ("CLOUD_DNS_LISTEN", format!("127.0.0.1:{dns_port}")),
            ("CLOUD_DNS_OPS_LISTEN", format!("127.0.0.1:{dns_ops}")),
        ],
    );
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let ops = free_port();
        let state = p.dir.path().join(format!("node{i}"));
        let config = format!(
            "[node]\nname = \"scaled-n{i}\"\nstate_dir = \"{}\"\nmemory_mb = 4096\nops_listen = \"127.0.0.1:{ops}\"\n",
            state.display()
        );
        nodes.push((p.role(&format!("node{i}"), "node", &config, &[]), ops));
    }
    for port in edges.iter().map(|e| e.2).chain([dns_ops]).chain(nodes.iter().map(|n| n.1)) {
        p.wait(&format!("ready on {port}"), async || ready(port).await).await;
    }

    let call = |method: reqwest::Method, path: &str, body: Option<serde_json::Value>| {
        let mut req = client.request(method, format!("{api_url}{path}")).bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    let (status, svc) =
        call(reqwest::Method::POST, "/v1/services", Some(serde_json::json!({"name": "web", "ports": ["443:8080"]})))
            .await;
    assert_eq!(status, 201, "{svc}");
    let fqdn = svc["fqdn"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"image": "hello", "service": "web", "replicas": 2, "restart_policy": "always"});
    let (status, created) = call(reqwest::Method::POST, "/v1/instances", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    let instances = async || call(reqwest::Method::GET, "/v1/instances", None).await.1["items"].clone();
    p.wait("two instances running", async || {
        instances().await.as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|i| i["state"] == "running"))
    })
    .await;

    // Every edge serves the service, verified against the platform CA the API publishes.
    let ca = client.get(format!("{api_url}/v1/ca.pem")).send().await.unwrap().text().await.unwrap();
    let via = |https: u16| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .tls_built_in_root_certs(false)
            .resolve(&fqdn, std::net::SocketAddr::from(([127, 0, 0, 1], https)))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let serves = |https: u16| {
        let (c, url) = (via(https), format!("https://{fqdn}/"));
        async move {
            match c.get(url).send().await {
                Ok(r) => r.text().await.unwrap_or_default().starts_with("hello from hello-"),
                Err(_) => false,
            }
        }
    };
    for (_, https, _) in &edges {
        p.wait(&format!("edge :{https} serving {fqdn}"), async || serves(*https).await).await;
    }
    // The DNS answers the service's name.
    let out =
        Command::new("dig").args(["@127.0.0.1", "-p", &dns_port.to_string(), &fqdn, "A", "+short"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "127.0.0.1\n");

    // Kill (-9) the node running the first instance: its instances come back on the other node.
    let victim_name = instances().await[0]["node"].as_str().unwrap().to_owned();
    let victim = if victim_name == "scaled-n1" { 0 } else { 1 };
    let survivor = format!("scaled-n{}", 2 - victim);
    let (mut killed, _) = nodes.remove(victim);
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    p.wait("instances rescheduled on the surviving node", async || {
        instances().await.as_array().is_some_and(|a| {
            a.len() == 2 && a.iter().all(|i| i["state"] == "running" && i["node"] == survivor.as_str())
        })
    })
    .await;
    for (_, https, _) in &edges {
        p.wait(&format!("edge :{https} serving after the reschedule"), async || serves(*https).await).await;
    }
    // The killed node comes back under its name and removes what its processes left (namespaces, veths).
    let killed_config = std::fs::read_to_string(p.dir.path().join(format!("node{}.toml", victim + 1))).unwrap();
    let ops = killed_config.split("127.0.0.1:").nth(1).unwrap().trim_end_matches(['"', '\n']).parse().unwrap();
    let _back = p.role(&format!("node{}", victim + 1), "node", &killed_config, &[]);
    p.wait("the killed node back", async || ready(ops).await).await;

    // Restarting the API loses nothing.
    let before = call(reqwest::Method::GET, "/v1/services/web", None).await.1;
    drop(api);
    api = p.api();
    // The restarted API has a new certificate of the same CA: clients that trust the CA keep working.
    p.wait("the API back", async || {
        client.get(format!("{api_url}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let after = call(reqwest::Method::GET, "/v1/services/web", None).await.1;
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["fqdn"], before["fqdn"]);
    assert_eq!(instances().await.as_array().unwrap().len(), 2);
    drop(api);
}
