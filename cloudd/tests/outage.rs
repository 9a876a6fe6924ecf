//! PostgreSQL frozen under a running platform, as a hung host or a paused VM leaves it: every process of the
//! server stopped (SIGSTOP), its TCP connections open and silent, so no error ends a wait. The API answers 503 in
//! bounded time, the edge and the DNS keep answering from their snapshots, the node agent and the certificate
//! manager keep trying, and after SIGCONT everything carries on by itself.
//!
//! A test binary of its own, on a cluster of its own: a frozen server would freeze every test sharing it.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_embedded_pg::{EmbeddedPg, Options};
use cloud_runtime::{Isolation, NodeConfig};
use cloud_store::{ChangeFeed, Settings, Store};
use cloud_tests::TestApi;
use serde_json::{Value, json};
use sqlx::Connection;

/// How long the roles wait for PostgreSQL here (the configured bound; the default is 5 s).
const BOUND: Duration = Duration::from_secs(2);
/// What a busy 2-core machine may add to the bound before the answer is back (scheduling, a debug build); the
/// bound plus this stays within 5 s, the default bound.
const SLACK: Duration = Duration::from_secs(2);
/// How long `/readyz` may take, whatever PostgreSQL does.
const READYZ_WITHIN: Duration = Duration::from_secs(1);
/// Generous, for what the platform does in its own time (starting an instance, catching up).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Every process of a PostgreSQL server, stopped until thawed (or dropped, so a failing test frees it).
struct Frozen(Vec<String>);

impl Frozen {
    /// Stops the postmaster first, so that it starts no new backend, then each of its children.
    fn freeze(pg: &EmbeddedPg) -> Self {
        let pid_file = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
        let postmaster = pid_file.lines().next().unwrap().trim().to_owned();
        signal("-STOP", &postmaster);
        let mut pids = vec![postmaster.clone()];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // pid (comm) state ppid ...: the name may hold spaces and parentheses, the fields after it do not.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid == Some(postmaster.as_str()) {
                let pid = entry.file_name().to_string_lossy().into_owned();
                signal("-STOP", &pid);
                pids.push(pid);
            }
        }
        assert!(pids.len() > 2, "the postmaster and its backends: {pids:?}");
        Self(pids)
    }

    fn thaw(mut self) {
        for pid in self.0.drain(..) {
            signal("-CONT", &pid);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in self.0.drain(..) {
            signal("-CONT", &pid);
        }
    }
}

fn signal(signal: &str, pid: &str) {
    let status = Command::new("kill").args([signal, pid]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// A store of its own for each role, as separate processes have, bounded like them.
async fn role_store(url: &str, settings: &Settings, connections: u32) -> Store {
    let pool = cloud_store::connect_with_timeout(url, connections, settings.database_timeout).await.unwrap();
    Store::new(pool, settings.clone())
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
    took: Duration,
}

async fn get(url: &str, token: &str) -> Answer {
    send(url, token, None).await
}

/// A GET, or a POST of a JSON body under an `Idempotency-Key`.
async fn send(url: &str, token: &str, post: Option<(&str, &Value)>) -> Answer {
    let started = Instant::now();
    let client = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let req = match post {
        None => client.get(url),
        Some((key, body)) => client.post(url).header("idempotency-key", key).json(body),
    };
    let res = req.bearer_auth(token).send().await.unwrap();
    let status = res.status().as_u16();
    let retry_after = res.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let body = res.json().await.unwrap_or(Value::Null);
    Answer { status, retry_after, body, took: started.elapsed() }
}

async fn post(api: &TestApi, path: &str, body: Value) -> Value {
    let res = reqwest::Client::new().post(api.url(path)).bearer_auth(&api.token).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 201, "{path}: {body}");
    body
}

/// The 503 of a database that did not answer, within `within` of the request's start.
fn assert_database_unavailable(what: &str, a: &Answer, within: Duration) {
    assert_eq!((a.status, a.body["code"].as_str()), (503, Some("database_unavailable")), "{what}: {}", a.body);
    assert!(a.retry_after.as_deref().is_some_and(|s| s.parse::<u32>().is_ok()), "{what}: Retry-After");
    assert!(a.took < within, "{what} took {:?}, more than {within:?}", a.took);
}

/// Polls `check` until it holds (at most [`TIMEOUT`]).
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the edge answers for `host` on its http listener.
async fn through_edge(edge: &cloud_edge::EdgeHandle, host: &str) -> (u16, String) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let res = client.get(format!("http://{}/", edge.http_addr())).header("host", host).send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// The A records our DNS gives for `name`, asked with dig (scripts/setup installs it).
fn resolve(dns: &cloud_dns::DnsHandle, name: &str) -> String {
    let server = dns.public_addrs()[0];
    let out = Command::new("dig")
        .args([&format!("@{}", server.ip()), "-p", &server.port().to_string(), name, "A", "+short"])
        .args(["+norec", "+time=2", "+tries=1"])
        .output()
        .expect("dig (scripts/setup installs bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The process of a loopback-mode instance, found by the environment the agent gave it.
fn instance_pid(name: &str) -> String {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        if environ.split(|b| *b == 0).any(|e| e == format!("INSTANCE={name}").as_bytes()) {
            return entry.file_name().to_string_lossy().into_owned();
        }
    }
    panic!("no process of instance {name}");
}

async fn metrics(api: &TestApi) -> String {
    reqwest::get(api.url("/metrics")).await.unwrap().text().await.unwrap()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_postgresql_costs_bounded_503s_and_nothing_after_it_thaws() {
    // Searchable by the postgres account when the test runs as root.
    let dir = tempfile::Builder::new().prefix("cloud-outage-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pg = EmbeddedPg::start_ephemeral(Options::new(dir.path().join("pg"))).await.unwrap();
    let admin = cloud_store::connect(&pg.url("postgres"), 1).await.unwrap();
    sqlx::query("CREATE DATABASE cloud").execute(&admin).await.unwrap();
    admin.close().await;
    let url = pg.url("cloud");
    let settings = Settings {
        // Loopback addresses of this test alone: the node agent runs instances as host processes (loopback mode).
        tenant_pool: "127.180.0.0/16".parse().unwrap(),
        database_timeout: BOUND,
        ..Settings::default()
    };

    let api_store = role_store(&url, &settings, 10).await;
    api_store.migrate().await.unwrap();
    let api = TestApi::start_on(api_store, cloud_api::ApiConfig::default()).await;
    let node_store = role_store(&url, &settings, 4).await;
    let mut node_config = NodeConfig::new("n-outage".into(), dir.path().join("node"));
    node_config.isolation = Isolation::Loopback;
    node_config.memory_mb = 4096;
    node_config.heartbeat = Duration::from_millis(200);
    let node_feed = ChangeFeed::start(node_store.clone()).await.unwrap();
    let node = cloud_runtime::start(node_store, node_feed, node_config).await.unwrap();
    let edge_store = role_store(&url, &settings, 2).await;
    let edge_config = cloud_edge::EdgeConfig {
        https_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        ports_ip: [127, 0, 0, 1].into(),
        health_interval: Duration::from_millis(200),
        resync_interval: Duration::from_secs(2),
        retry_interval: Duration::from_millis(100),
        grace_period: Duration::from_secs(1),
        ..Default::default()
    };
    let edge_feed = ChangeFeed::start(edge_store.clone()).await.unwrap();
    let edge = cloud_edge::start(edge_store, edge_feed, Default::default(), edge_config).await.unwrap();
    let dns_store = role_store(&url, &settings, 2).await;
    let dns_config = cloud_dns::DnsConfig {
        public_listen: vec!["127.0.0.1:0".parse().unwrap()],
        rate_limit: None,
        ..Default::default()
    };
    let dns_feed = ChangeFeed::start(dns_store.clone()).await.unwrap();
    let dns = cloud_dns::start(dns_store, dns_feed, dns_config).await.unwrap();
    let manager = cloud_certs::manager::CertManager::new(
        role_store(&url, &settings, 2).await,
        Arc::new(cloud_tests::random_secret_key()),
        cloud_certs::ownership::OwnershipChecker::new(None),
        cloud_certs::manager::ManagerConfig { interval: Duration::from_millis(200), ..Default::default() },
    );
    let certs = manager.probe();
    let certs_task = tokio::spawn(manager.run());

    let web = post(&api, "/v1/services", json!({"name": "web", "ports": ["80:8080"]})).await;
    let fqdn = web["fqdn"].as_str().unwrap().to_owned();
    post(&api, "/v1/instances", json!({"image": "hello", "service": "web", "restart_policy": "never"})).await;
    post(&api, "/v1/instances", json!({"image": "hello", "name": "victim", "restart_policy": "never"})).await;
    until("the edge routes to the service's instance", async || {
        let (status, body) = through_edge(&edge, &fqdn).await;
        status == 200 && body.starts_with("hello from hello-")
    })
    .await;
    until("the victim runs", async || {
        get(&api.url("/v1/instances/victim"), &api.token).await.body["state"] == "running"
    })
    .await;
    assert_eq!(resolve(&dns, &fqdn), "127.0.0.1");
    until("the agent and the certificate manager are healthy", async || node.is_healthy() && certs.is_healthy()).await;
    // Nobody asked /readyz: the background probe says the database is up.
    until("cloud_api_database_up 1", async || metric(&metrics(&api).await, "cloud_api_database_up") == Some(1.0)).await;

    // A request in flight when the server freezes: its statement waits (for its tenant's row, locked here) when
    // the server stops.
    let mut locker = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT 1 FROM tenants WHERE name = 'acme' FOR UPDATE").execute(&mut locker).await.unwrap();
    let create = json!({"name": "in-flight", "ports": ["80:8080"]});
    let in_flight = {
        let (url, token, body) = (api.url("/v1/services"), api.token.clone(), create.clone());
        tokio::spawn(async move { send(&url, &token, Some(("key-1", &body))).await })
    };
    let monitor = cloud_store::connect(&url, 1).await.unwrap();
    until("the request waits in PostgreSQL", async || {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM tenants WHERE id = $1 FOR UPDATE'",
        )
        .fetch_one(&monitor)
        .await
        .unwrap();
        waiting > 0
    })
    .await;

    let frozen = Frozen::freeze(&pg);
    // Nobody asks /readyz: the background probe notices.
    until("cloud_api_database_up 0", async || metric(&metrics(&api).await, "cloud_api_database_up") == Some(0.0)).await;
    let ready = get(&api.url("/readyz"), &api.token).await;
    assert_database_unavailable("/readyz", &ready, READYZ_WITHIN);
    let listed = get(&api.url("/v1/services"), &api.token).await;
    assert_database_unavailable("a service list", &listed, BOUND + SLACK);
    let cut = in_flight.await.unwrap();
    assert_database_unavailable("the request in flight", &cut, BOUND + SLACK);

    // The edge and the DNS serve their snapshots.
    for _ in 0..5 {
        let (status, body) = through_edge(&edge, &fqdn).await;
        assert_eq!(status, 200, "the edge keeps routing: {body}");
        assert!(body.starts_with("hello from hello-"), "{body}");
        assert_eq!(resolve(&dns, &fqdn), "127.0.0.1", "the DNS keeps answering");
    }
    // The agent's heartbeats and the manager's passes fail in bounded time rather than hang...
    until("the agent notices", async || !node.is_healthy()).await;
    until("the certificate manager notices", async || !certs.is_healthy()).await;
    // ...and what the agent observes meanwhile waits for the database.
    signal("-KILL", &instance_pid("victim"));
    until("the agent holds the victim's end", async || {
        let m = node.metrics_text();
        metric(&m, "cloud_node_instance_ends_total{outcome=\"failed\"}") == Some(1.0)
            && metric(&m, "cloud_node_reports_pending").is_some_and(|n| n >= 1.0)
    })
    .await;

    frozen.thaw();
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    until("/readyz answers 200 again", async || get(&api.url("/readyz"), &api.token).await.status == 200).await;
    let listed = get(&api.url("/v1/services"), &api.token).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.body["items"][0]["name"], "web");
    // A background probe that started during the freeze may still record its timeout after /readyz's answer.
    until("cloud_api_database_up 1 again", async || metric(&metrics(&api).await, "cloud_api_database_up") == Some(1.0))
        .await;
    // The request cut short did nothing, and its Idempotency-Key is free again (not claimed for a day): its retry
    // runs.
    until("the cut request's key is released", async || {
        let retried = send(&api.url("/v1/services"), &api.token, Some(("key-1", &create))).await;
        assert!(matches!(retried.status, 201 | 409), "{}", retried.body);
        retried.status == 201
    })
    .await;
    until("the agent and the certificate manager recover", async || node.is_healthy() && certs.is_healthy()).await;
    until("the victim's end is recorded", async || {
        get(&api.url("/v1/instances/victim"), &api.token).await.body["state"] == "failed"
    })
    .await;
    // The writer updates the gauge on its next turn, after the report the API already shows.
    until("cloud_node_reports_pending 0", async || {
        metric(&node.metrics_text(), "cloud_node_reports_pending") == Some(0.0)
    })
    .await;
    // Changes flow again, through the change feed, to the edge and the DNS.
    let after = post(&api, "/v1/services", json!({"name": "after", "ports": ["80:8080"]})).await;
    let after_fqdn = after["fqdn"].as_str().unwrap().to_owned();
    until("the DNS serves the new service", async || resolve(&dns, &after_fqdn) == "127.0.0.1").await;
    until("the edge knows the new service", async || through_edge(&edge, &after_fqdn).await.0 == 503).await;

    certs_task.abort();
    node.shutdown().await;
    edge.shutdown().await;
    dns.shutdown().await;
    drop(api);
    pg.stop().await.unwrap();
}
