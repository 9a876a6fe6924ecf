//! The node agent with real instances: sandboxes through runc, network namespaces, veths, bridges, nftables,
//! the built-in `hello` image and uploaded bundles (busybox scripts). Needs root, as the agent does; CI runs as
//! root. Tests share the host's network stack, so they take turns.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cloud_domain::api::Scope;
use cloud_runtime::{NodeConfig, NodeHandle};
use cloud_store::{ChangeFeed, Settings};
use cloud_tests::TestApi;
use cloud_tests::relay::Relay;
use serde_json::{Value, json};
use tokio::sync::Mutex;

static HOST: Mutex<()> = Mutex::const_new(());
static POOL: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// An API whose tenants get networks from a pool no other test (nor a `cloudd dev` on this machine) uses.
async fn api() -> TestApi {
    let k = POOL.fetch_add(1, Ordering::SeqCst) + std::process::id() % 8 * 4;
    let settings = Settings {
        tenant_pool: format!("10.{}.{}.0/20", 200 + k / 16 % 50, (k % 16) * 16).parse().unwrap(),
        ..Settings::default()
    };
    let mut api = TestApi::start_with_settings(settings, Default::default()).await;
    api.start_controller();
    api
}

/// One state directory for every agent of these tests, on every run: each agent removes what the agents of
/// earlier tests and runs left there (their sandboxes' mounts and cgroups), and layers are unpacked once.
fn state_dir() -> PathBuf {
    std::env::temp_dir().join("cloud-node-test")
}

/// A node of this test process. Every agent of the host shares the default id range directory, as they must.
fn config(name: &str) -> NodeConfig {
    let mut c = NodeConfig::new(name.into(), state_dir());
    c.memory_mb = 4096;
    c.heartbeat = Duration::from_millis(200);
    c.live_window = Duration::from_secs(2);
    c.lost_after = Duration::from_secs(2);
    c.min_backoff = Duration::from_millis(200);
    c.max_backoff = Duration::from_secs(1);
    c.stop_grace = Duration::from_secs(2);
    c
}

/// The host lock and an API, or `None` (the test is skipped) without root, which the agent needs.
async fn as_root() -> Option<(tokio::sync::MutexGuard<'static, ()>, TestApi)> {
    if !is_root() {
        eprintln!("skipped: the node agent needs root");
        return None;
    }
    let host = HOST.lock().await;
    Some((host, api().await))
}

/// [`as_root`] plus a node agent with the test configuration.
async fn with_node(name: &str) -> Option<(tokio::sync::MutexGuard<'static, ()>, TestApi, NodeHandle)> {
    let (host, api) = as_root().await?;
    let node = node(&api, config(name)).await;
    Some((host, api, node))
}

async fn node(api: &TestApi, cfg: NodeConfig) -> NodeHandle {
    let feed = ChangeFeed::start(api.store.clone()).await.unwrap();
    cloud_runtime::start(api.store.clone(), feed, cfg).await.expect("node agent")
}

/// An agent announcing an underlay address that another live node holds does not start, and says which key to
/// change. It fails at registration, before touching the host, so it needs neither root nor the host lock.
#[tokio::test]
async fn an_agent_announcing_a_held_underlay_address_does_not_start_and_names_the_key() {
    let api = api().await;
    let held = Ipv4Addr::new(192, 0, 2, 10);
    let holder = cloud_store::NodeRegistration {
        name: "holder",
        address: "127.0.0.1",
        memory_mb: 1024,
        underlay_address: Some(held),
        public_key: Some([1; 32]),
    };
    api.store.register(&holder, Duration::from_secs(60)).await.unwrap();
    let feed = ChangeFeed::start(api.store.clone()).await.unwrap();
    let cfg = NodeConfig { underlay_address: Some(held), ..config("newcomer") };
    let err = cloud_runtime::start(api.store.clone(), feed, cfg).await.unwrap_err().to_string();
    for needle in ["node.underlay_address", "CLOUD_NODE_UNDERLAY_ADDRESS", "192.0.2.10", "\"holder\""] {
        assert!(err.contains(needle), "{err:?} should name {needle}");
    }
    let (nodes,): (i64,) = sqlx::query_as("SELECT count(*) FROM nodes").fetch_one(api.store.pool()).await.unwrap();
    assert_eq!(nodes, 1, "the newcomer was not registered");
}

async fn call(api: &TestApi, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, api.url(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn create(api: &TestApi, token: &str, body: Value) -> Value {
    let (status, body) = call(api, reqwest::Method::POST, "/v1/instances", token, Some(body)).await;
    assert_eq!(status, 201, "{body}");
    body["instances"][0].clone()
}

/// Polls an instance until `pred` holds (30 s at most, generous for a busy machine).
async fn wait_for(api: &TestApi, token: &str, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        let (_, body) = call(api, reqwest::Method::GET, &format!("/v1/instances/{name}"), token, None).await;
        if pred(&body) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("instance {name} never became {what}: {last}");
}

async fn running(api: &TestApi, token: &str, name: &str) -> Value {
    wait_for(api, token, name, "running", |i| i["state"] == "running").await
}

async fn http_get(ip: &str, port: u16) -> Result<String, String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let res = client.get(format!("http://{ip}:{port}/")).send().await.map_err(|e| e.to_string())?;
    res.text().await.map_err(|e| e.to_string())
}

/// How long a connection expected to succeed may take, starting bash in the namespace included: a busy machine
/// may take seconds to start it.
const REACHABLE_WITHIN: Duration = Duration::from_secs(10);
/// How long a connection expected to fail is given. The firewall drops (rather than rejects) what it refuses, so
/// each such check waits the whole time: ten seconds would add some 40 s to the suite. A check that times out
/// because bash started slowly passes too, which only weakens it on an overloaded machine, never fails it.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(2);

/// Whether a TCP connection from inside an instance's namespace to `ip:port` succeeds within `within`.
fn connects_from(netns: &str, ip: &str, port: u16, within: Duration) -> bool {
    let secs = within.as_secs().to_string();
    Command::new("ip")
        .args(["netns", "exec", netns, "timeout", &secs, "bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn netns_of(node: &NodeHandle, instance: &Value) -> String {
    cloud_runtime::netns_name(node.node, instance["id"].as_str().unwrap().parse().unwrap())
}

fn namespaces_of(node: &NodeHandle) -> HashSet<String> {
    let prefix = cloud_runtime::netns_name(node.node, uuid::Uuid::nil());
    let prefix = prefix.trim_end_matches('0');
    std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|n: &String| n.starts_with(prefix))
        .collect()
}

/// A bundle's server on the base layer's busybox: a page naming the instance, served by busybox httpd.
const SERVE_SH: &str = r#"mkdir -p /tmp/www
echo "bundle $INSTANCE $GREETING" > /tmp/www/index.html
echo serving
exec httpd -f -p "$PORT" -h /tmp/www
"#;

/// What a sandbox of `instance` left on the host, by what each would be: its runc bundle directory, its mounts,
/// its cgroups, its held id range.
fn sandbox_traces(node: uuid::Uuid, instance: &Value) -> Vec<String> {
    let id = cloud_runtime::sandbox_id(node, instance["id"].as_str().unwrap().parse().unwrap());
    let dir = state_dir().join("sandboxes").join(node.simple().to_string()).join(&id);
    let mut traces = Vec::new();
    if dir.exists() {
        traces.push(format!("directory {}", dir.display()));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    traces.extend(mounts.lines().filter(|l| l.contains(&id)).map(|l| format!("mount {l}")));
    for controller in ["memory", "pids", "cpu", "unified", ""] {
        let cgroup = PathBuf::from("/sys/fs/cgroup").join(controller).join("cloud-sandbox").join(&id);
        if cgroup.exists() {
            traces.push(format!("cgroup {}", cgroup.display()));
        }
    }
    for range in std::fs::read_dir(cloud_sandbox_ids()).into_iter().flatten().flatten() {
        let owner = std::fs::read_to_string(range.path()).unwrap_or_default();
        let free = Command::new("flock").args(["-n", "-x"]).arg(range.path()).arg("true").status().unwrap().success();
        if owner.lines().next() == Some(id.as_str()) && !free {
            traces.push(format!("id range {}", range.path().display()));
        }
    }
    traces
}

fn cloud_sandbox_ids() -> PathBuf {
    config("any").ids_dir
}

#[tokio::test]
async fn hello_and_an_uploaded_bundle_run_and_answer_on_their_private_ips() {
    let Some((_host, api, node)) = with_node("n-hello").await else { return };
    let t = &api.token;

    create(&api, t, json!({"image": "hello", "name": "web-1"})).await;
    let hello = running(&api, t, "web-1").await;
    assert_eq!(hello["node"], "n-hello");
    assert!(hello["boot_time_us"].as_u64().unwrap() > 0);
    let ip = hello["private_ip"].as_str().unwrap();
    let answer = http_get(ip, 8080).await.unwrap();
    assert_eq!(answer, format!("hello from web-1 ({ip})\n"));
    // The memory limit (128 MiB by default) is the sandbox's cgroup's (v1 here, v2 where a host has it).
    let id = cloud_runtime::sandbox_id(node.node, hello["id"].as_str().unwrap().parse().unwrap());
    let v1 = format!("/sys/fs/cgroup/memory/cloud-sandbox/{id}/memory.limit_in_bytes");
    let v2 = format!("/sys/fs/cgroup/cloud-sandbox/{id}/memory.max");
    let limit = std::fs::read_to_string(&v1).or_else(|_| std::fs::read_to_string(&v2)).expect("a memory cgroup");
    assert_eq!(limit.trim(), (128u64 << 20).to_string());

    api.upload_image(
        t,
        "shweb",
        &[("manifest.json", r#"{"command": ["sh", "serve.sh"], "port": 9000}"#), ("serve.sh", SERVE_SH)],
    )
    .await;
    create(&api, t, json!({"image": "shweb", "name": "sh-1", "env": {"GREETING": "hi"}})).await;
    let web = running(&api, t, "sh-1").await;
    let web_ip = web["private_ip"].as_str().unwrap();
    let metrics = node.metrics_text();
    assert!(metrics.contains("cloud_node_instances_running 2"), "{metrics}");
    assert!(metrics.contains("cloud_node_instance_starts_total 2"), "{metrics}");
    assert!(metrics.contains("cloud_node_boot_seconds_count 2"), "{metrics}");
    assert!(node.is_healthy());
    assert_ne!(web_ip, ip);
    assert_eq!(http_get(web_ip, 9000).await.unwrap(), "bundle sh-1 hi\n");

    // Its output and the platform's notes are served by the API: the program's line and the agent's, which the
    // agent may write after the program's (wait for both, not for the first).
    wait_for_log(&api, t, "sh-1", "the program's output and the agent's note", |lines| {
        lines.iter().any(|(s, l)| s == "stdout" && l == "serving")
            && lines.iter().any(|(s, l)| s == "system" && l.starts_with("listening on"))
    })
    .await;
    // follow=true streams the same lines as Server-Sent Events.
    let res =
        reqwest::Client::new().get(api.url("/v1/instances/sh-1/logs?follow=true")).bearer_auth(t).send().await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut stream = res.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"line\":\"serving\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut stream)).await;
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("log lines in time").unwrap().unwrap()));
    }
    // It opens with the position it starts after, then the first line.
    assert!(seen.starts_with(": log of instance sh-1\nid: 0\n\nid: 1\ndata: "), "{seen}");

    // Stop and start again.
    let (status, _) = call(&api, reqwest::Method::POST, "/v1/instances/web-1/stop", t, Some(json!({}))).await;
    assert_eq!(status, 200);
    wait_for(&api, t, "web-1", "stopped", |i| i["state"] == "stopped").await;
    assert!(http_get(ip, 8080).await.is_err(), "a stopped instance does not answer");
    call(&api, reqwest::Method::POST, "/v1/instances/web-1/start", t, Some(json!({}))).await;
    running(&api, t, "web-1").await;
    assert_eq!(http_get(ip, 8080).await.unwrap(), format!("hello from web-1 ({ip})\n"), "same private IP");
    node.shutdown().await;
}

#[tokio::test]
async fn tenants_cannot_reach_each_other_and_instances_cannot_reach_the_host() {
    let Some((_host, api, node)) = with_node("n-iso").await else { return };
    let (_, other) = api.tenant("globex", &[Scope::Read, Scope::Write]).await;
    let a1 = create(&api, &api.token, json!({"image": "hello", "name": "a1"})).await;
    create(&api, &api.token, json!({"image": "hello", "name": "a2"})).await;
    create(&api, &other, json!({"image": "hello", "name": "b1"})).await;
    running(&api, &api.token, "a1").await;
    let a2 = running(&api, &api.token, "a2").await;
    let b1 = running(&api, &other, "b1").await;
    let ns = netns_of(&node, &a1);
    let a2_ip = a2["private_ip"].as_str().unwrap();
    let b1_ip = b1["private_ip"].as_str().unwrap();

    assert!(connects_from(&ns, a2_ip, 8080, REACHABLE_WITHIN), "same tenant: reachable");
    assert!(!connects_from(&ns, b1_ip, 8080, UNREACHABLE_AFTER), "another tenant: unreachable");
    assert!(http_get(b1_ip, 8080).await.is_ok(), "the host (where the edge runs) reaches every instance");

    // A service of the host listening on every address, and the database: out of reach from instances.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let gateway: Ipv4Addr = {
        let net: ipnet::Ipv4Net = api.tenant.network.parse().unwrap();
        Ipv4Addr::from(u32::from(net.network()) + 1)
    };
    assert!(std::net::TcpStream::connect((gateway, port)).is_ok(), "control: the host reaches its own port");
    assert!(!connects_from(&ns, &gateway.to_string(), port, UNREACHABLE_AFTER), "instances cannot reach host ports");
    let db_port: u16 = api.store.pool().connect_options().get_port();
    assert!(!connects_from(&ns, &gateway.to_string(), db_port, UNREACHABLE_AFTER), "nor PostgreSQL");
    assert!(!connects_from(&ns, "127.0.0.1", db_port, UNREACHABLE_AFTER), "loopback is the instance's own");
    node.shutdown().await;
}

#[tokio::test]
async fn restart_policies_restart_with_backoff_or_fail_with_the_reason() {
    let Some((_host, api, node)) = with_node("n-restart").await else { return };
    let t = &api.token;
    api.upload_image(
        t,
        "crash",
        &[("manifest.json", r#"{"command": ["sh", "crash.sh"], "port": 9000}"#), ("crash.sh", "echo boom\nexit 3\n")],
    )
    .await;

    create(&api, t, json!({"image": "crash", "name": "never", "restart_policy": "never"})).await;
    let failed = wait_for(&api, t, "never", "failed", |i| i["state"] == "failed").await;
    let reason = failed["state_reason"].as_str().unwrap();
    assert!(reason.contains("exited with code 3 before listening on port 9000"), "{reason}");
    assert!(reason.contains("boom"), "the reason carries the output tail: {reason}");
    assert_eq!(failed["exit_code"], 3);
    assert_eq!(failed["restart_count"], 0);

    create(&api, t, json!({"image": "crash", "name": "again", "restart_policy": "on-failure"})).await;
    wait_for(&api, t, "again", "restarted 3 times", |i| i["restart_count"].as_u64() >= Some(3)).await;
    // The delay doubles: 0.2 s, 0.4 s, 0.8 s, then stays at the 1 s cap. (Log lines reach the API in batches.)
    let mut logs = String::new();
    for _ in 0..100 {
        logs = call(&api, reqwest::Method::GET, "/v1/instances/again/logs?limit=200", t, None).await.1.to_string();
        if logs.contains("(restart 3)") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for step in ["restarting in 0.2s (restart 1)", "restarting in 0.4s (restart 2)", "restarting in 0.8s (restart 3)"] {
        assert!(logs.contains(step), "{step} in {logs}");
    }
    let (status, _) = call(&api, reqwest::Method::DELETE, "/v1/instances/again", t, None).await;
    assert_eq!(status, 204);

    // A clean exit with on-failure is a stop, not a failure.
    api.upload_image(t, "done", &[("manifest.json", r#"{"command": ["true"], "port": 9000}"#)]).await;
    create(&api, t, json!({"image": "done", "name": "done", "restart_policy": "on-failure"})).await;
    let done = wait_for(&api, t, "done", "stopped", |i| i["state"] == "stopped").await;
    assert_eq!(done["exit_code"], 0);
    node.shutdown().await;
}

#[tokio::test]
async fn a_crashed_agent_leaves_nothing_behind_and_delete_cleans_everything() {
    let Some((_host, api)) = as_root().await else { return };
    let t = &api.token;
    let first = node(&api, config("n-crash")).await;
    create(&api, t, json!({"image": "hello", "name": "survivor"})).await;
    let inst = running(&api, t, "survivor").await;
    let ip = inst["private_ip"].as_str().unwrap().to_owned();
    let ns = netns_of(&first, &inst);
    assert!(http_get(&ip, 8080).await.is_ok());
    let running_traces = sandbox_traces(first.node, &inst);
    for what in ["directory", "mount", "cgroup", "id range"] {
        assert!(running_traces.iter().any(|t| t.starts_with(what)), "{what} in {running_traces:?}");
    }

    // Crash: the sandbox ends with the agent; its namespace, mounts and cgroups stay.
    let first_node = first.node;
    let pids = host_pids(&first, &inst);
    first.abort();
    let mut dead = false;
    for _ in 0..100 {
        if http_get(&ip, 8080).await.is_err() {
            dead = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dead, "the instance's sandbox ended with its agent");
    let t0 = std::time::Instant::now();
    while pids.iter().any(|p| PathBuf::from(format!("/proc/{p}")).exists()) {
        assert!(t0.elapsed() < Duration::from_secs(10), "its processes were never reaped: {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(PathBuf::from(format!("/run/netns/{ns}")).exists());
    let left = sandbox_traces(first_node, &inst);
    assert!(left.iter().any(|t| t.starts_with("mount")), "what a crash leaves: {left:?}");
    assert!(!left.iter().any(|t| t.starts_with("id range")), "a range is free once its sandbox ended: {left:?}");

    // The restarted agent cleans up and starts the instance again, at the same address.
    let second = node(&api, config("n-crash")).await;
    let mut answered = false;
    for _ in 0..100 {
        if http_get(&ip, 8080).await.is_ok_and(|b| b.contains("survivor")) {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered);
    assert_eq!(namespaces_of(&second), HashSet::from([ns.clone()]), "exactly one namespace, no leftovers");
    let again = sandbox_traces(second.node, &inst);
    assert_eq!(again.len(), running_traces.len(), "one sandbox, nothing of the first: {again:?}");

    let tenant_bridge = format!("cb-{}", &api.tenant.id.simple().to_string()[..12]);
    assert!(PathBuf::from(format!("/sys/class/net/{tenant_bridge}")).exists());
    let veth = format!("cv{}", &inst["id"].as_str().unwrap().replace('-', "")[..12]);
    let (status, _) = call(&api, reqwest::Method::DELETE, "/v1/instances/survivor", t, None).await;
    assert_eq!(status, 202, "it runs: it drains first (no edge here holds it up)");
    let mut clean = false;
    for _ in 0..100 {
        clean = namespaces_of(&second).is_empty()
            && !PathBuf::from(format!("/sys/class/net/{veth}")).exists()
            && !PathBuf::from(format!("/sys/class/net/{tenant_bridge}")).exists()
            && sandbox_traces(second.node, &inst).is_empty();
        if clean {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        clean,
        "sandbox, namespace, veth and bridge are gone after delete: {:?}",
        sandbox_traces(second.node, &inst)
    );
    // The address is released but held (routes to it may still be cached): the next instance gets another.
    let next = create(&api, t, json!({"image": "hello", "name": "next", "start": false})).await;
    assert_ne!(next["private_ip"], ip.as_str());
    second.shutdown().await;
}

#[tokio::test]
async fn a_lost_nodes_instances_are_rescheduled_per_restart_policy() {
    let Some((_host, api)) = as_root().await else { return };
    let t = &api.token;
    let mut big = config("n-big");
    big.memory_mb = 8192;
    let lost = node(&api, big).await;
    let spare = node(&api, config("n-spare")).await;
    create(&api, t, json!({"image": "hello", "name": "moves", "restart_policy": "always"})).await;
    create(&api, t, json!({"image": "hello", "name": "stays-down", "restart_policy": "never"})).await;
    let moves = running(&api, t, "moves").await;
    assert_eq!(moves["node"], "n-big", "the node with the most free memory");
    running(&api, t, "stays-down").await;

    // The machine vanishes: agent, processes and namespaces gone.
    let leftovers = namespaces_of(&lost);
    lost.abort();
    for ns in leftovers {
        Command::new("ip").args(["netns", "del", &ns]).status().unwrap();
    }
    let moved =
        wait_for(&api, t, "moves", "running elsewhere", |i| i["state"] == "running" && i["node"] == "n-spare").await;
    let ip = moved["private_ip"].as_str().unwrap();
    assert_eq!(ip, moves["private_ip"].as_str().unwrap(), "it keeps its private IP");
    assert!(http_get(ip, 8080).await.unwrap().contains("moves"));
    let down = wait_for(&api, t, "stays-down", "failed", |i| i["state"] == "failed").await;
    assert!(down["state_reason"].as_str().unwrap().contains("node n-big was lost"), "{down}");
    // The machine comes back: its agent removes what its sandboxes left.
    let back = node(&api, config("n-big")).await;
    assert!(sandbox_traces(back.node, &down).is_empty(), "{:?}", sandbox_traces(back.node, &down));
    back.shutdown().await;
    spare.shutdown().await;
}

/// An outage of PostgreSQL longer than the lost-node time costs no instance: every node is silent during it, and
/// an agent judges another lost only after having been heard itself for that long, by when the others are too.
#[tokio::test]
async fn a_database_outage_loses_no_node() {
    let Some((_host, api)) = as_root().await else { return };
    let t = &api.token;
    let (mut nodes, mut relays) = (Vec::new(), Vec::new());
    for name in ["n-first", "n-second"] {
        let (relay, store) = Relay::store_through(&api.store).await;
        let mut cfg = config(name);
        cfg.lost_after = Duration::from_secs(4);
        let feed = ChangeFeed::start(store.clone()).await.unwrap();
        nodes.push(cloud_runtime::start(store, feed, cfg).await.expect("node agent"));
        relays.push(relay);
    }
    create(&api, t, json!({"image": "hello", "name": "one", "restart_policy": "never"})).await;
    create(&api, t, json!({"image": "hello", "name": "two", "restart_policy": "never"})).await;
    let before = [running(&api, t, "one").await, running(&api, t, "two").await];
    assert_ne!(before[0]["node"], before[1]["node"], "one instance per node");

    relays.iter().for_each(Relay::cut);
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The first node is back a second before the second: it must not take the second's silence for a loss.
    relays[0].restore();
    tokio::time::sleep(Duration::from_secs(1)).await;
    relays[1].restore();
    tokio::time::sleep(Duration::from_secs(5)).await;

    for was in &before {
        let name = was["name"].as_str().unwrap();
        let (_, now) = call(&api, reqwest::Method::GET, &format!("/v1/instances/{name}"), t, None).await;
        assert_eq!(
            (&now["state"], &now["node"], &now["restart_count"]),
            (&was["state"], &was["node"], &was["restart_count"]),
            "{now}"
        );
        assert!(http_get(now["private_ip"].as_str().unwrap(), 8080).await.unwrap().contains(name));
    }
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn an_instance_no_node_can_hold_waits_with_the_reason() {
    let Some((_host, api, node)) = with_node("n-small").await else { return };
    create(&api, &api.token, json!({"image": "hello", "name": "huge", "memory_mb": 8192})).await;
    let waiting = wait_for(&api, &api.token, "huge", "waiting", |i| !i["state_reason"].is_null()).await;
    assert_eq!(waiting["state"], "pending");
    assert_eq!(waiting["node"], Value::Null);
    assert_eq!(waiting["state_reason"], "waiting for a node with 8192 MiB free");
    // Others still run.
    create(&api, &api.token, json!({"image": "hello", "name": "small"})).await;
    running(&api, &api.token, "small").await;
    node.shutdown().await;
}

/// Without root, the agent runs instances in the host's network, each bound to its own 127.x private IP.
/// Nothing here needs root, so it runs everywhere.
#[tokio::test]
async fn loopback_mode_runs_instances_on_their_own_127_addresses() {
    let _host = HOST.lock().await;
    let k = POOL.fetch_add(1, Ordering::SeqCst);
    let settings = Settings {
        tenant_pool: format!("127.{}.{}.0/20", 200 + k / 16 % 50, (k % 16) * 16).parse().unwrap(),
        ..Settings::default()
    };
    let mut api = TestApi::start_with_settings(settings, Default::default()).await;
    api.start_controller();
    let mut cfg = config("n-loopback");
    cfg.isolation = cloud_runtime::Isolation::Loopback;
    let node = node(&api, cfg).await;
    create(&api, &api.token, json!({"image": "hello", "name": "lo-1"})).await;
    create(&api, &api.token, json!({"image": "hello", "name": "lo-2"})).await;
    for name in ["lo-1", "lo-2"] {
        let i = running(&api, &api.token, name).await;
        let ip = i["private_ip"].as_str().unwrap();
        assert!(ip.starts_with("127."), "{ip}");
        // Same port, different addresses: both answer, each for itself.
        assert_eq!(http_get(ip, 8080).await.unwrap(), format!("hello from {name} ({ip})\n"));
    }
    assert!(namespaces_of(&node).is_empty(), "no namespaces in loopback mode");

    // No isolation is claimed, but no exec gains privilege either.
    let script = "grep NoNewPrivs /proc/self/status\nexec busybox httpd -f -p \"$PRIVATE_IP:$PORT\"\n";
    api.upload_image(
        &api.token,
        "nnp",
        &[("manifest.json", r#"{"command": ["sh", "nnp.sh"], "port": 9000}"#), ("nnp.sh", script)],
    )
    .await;
    create(&api, &api.token, json!({"image": "nnp", "name": "lo-nnp"})).await;
    let lines = wait_for_log(&api, &api.token, "lo-nnp", "NoNewPrivs", |l| {
        l.iter().any(|(s, l)| s == "stdout" && l.starts_with("NoNewPrivs:"))
    })
    .await;
    assert!(lines.contains(&("stdout".into(), "NoNewPrivs:\t1".into())), "{lines:?}");
    node.shutdown().await;
}

/// An instance answering over HTTP what its resolver makes of a name (busybox httpd, CGI scripts, nslookup
/// reading the instance's /etc/resolv.conf): `/cgi-bin/resolve?NAME` gives the addresses, or `error ...`.
const RESOLVER: &[(&str, &str)] = &[
    ("manifest.json", r#"{"command": ["httpd", "-f", "-p", "9000", "-h", "/app/www"], "port": 9000}"#),
    (
        "www/cgi-bin/resolve",
        r#"#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
out=$(nslookup "$QUERY_STRING" 2>&1)
ips=$(echo "$out" | awk '/^Name:/ { n = 1; next } n && /^Address/ { print $NF }' | sort | tr '\n' ' ')
if [ -n "$ips" ]; then printf '%s' "${ips% }"; else printf 'error %s' "$(echo "$out" | tail -n 1)"; fi
"#,
    ),
    ("www/cgi-bin/resolv.conf", "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\ncat /etc/resolv.conf\n"),
];

#[tokio::test]
async fn instances_resolve_their_tenants_private_names_through_their_gateway() {
    let Some((_host, api)) = as_root().await else { return };
    let dns_config = cloud_dns::DnsConfig {
        public_listen: vec!["127.0.0.1:0".parse().unwrap()],
        private_listen: vec!["127.0.0.1:0".parse().unwrap()],
        rate_limit: None,
        ..cloud_dns::DnsConfig::default()
    };
    let dns = cloud_dns::start(api.store.clone(), ChangeFeed::start(api.store.clone()).await.unwrap(), dns_config)
        .await
        .unwrap();
    let std::net::SocketAddr::V4(private) = dns.private_addrs()[0] else { panic!("an IPv4 listener") };
    let mut cfg = config("n-dns");
    cfg.dns = Some(private);
    let node = node(&api, cfg).await;
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").ok();

    let (_, other) = api.tenant("initech", &[Scope::Read, Scope::Write]).await;
    let t = &api.token;
    api.upload_image(t, "resolver", RESOLVER).await;
    create(&api, t, json!({"image": "hello", "name": "peer"})).await;
    let asker = create(&api, t, json!({"image": "resolver", "name": "asker"})).await;
    create(&api, &other, json!({"image": "hello", "name": "stranger"})).await;
    let peer_ip = running(&api, t, "peer").await["private_ip"].as_str().unwrap().to_owned();
    let asker_ip = running(&api, t, "asker").await["private_ip"].as_str().unwrap().to_owned();
    running(&api, &other, "stranger").await;
    let resolve = |name: &str| {
        let url = format!("http://{asker_ip}:9000/cgi-bin/resolve?{name}");
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };

    let gateway = {
        let net: ipnet::Ipv4Net = api.tenant.network.parse().unwrap();
        Ipv4Addr::from(u32::from(net.network()) + 1)
    };
    let conf = reqwest::get(format!("http://{asker_ip}:9000/cgi-bin/resolv.conf")).await.unwrap().text().await.unwrap();
    assert!(conf.contains(&format!("nameserver {gateway}\n")) && conf.contains("search internal"), "{conf}");
    assert_eq!(std::fs::read_to_string("/etc/resolv.conf").ok(), host_resolv, "the host's resolv.conf is untouched");

    // The instance's own resolver (through its /etc/resolv.conf) asks our DNS via its gateway.
    assert_eq!(resolve("peer.internal").await, peer_ip);
    assert_eq!(resolve("peer").await, peer_ip, "search domain internal");
    assert_eq!(resolve(&format!("peer.{}.internal", api.tenant.name)).await, peer_ip);
    assert_eq!(resolve("asker.internal").await, asker_ip);
    // Another tenant's instance does not exist for this one, by either name.
    assert!(resolve("stranger.internal").await.starts_with("error"), "another tenant's name");
    assert!(resolve("stranger.initech.internal").await.starts_with("error"), "another tenant's full name");

    // Only DNS is forwarded: the DNS listener itself, and every other host port, stay out of reach.
    let ns = netns_of(&node, &asker);
    assert!(connects_from(&ns, &gateway.to_string(), 53, REACHABLE_WITHIN), "DNS over TCP through the gateway");
    assert!(
        !connects_from(&ns, &gateway.to_string(), private.port(), UNREACHABLE_AFTER),
        "the listener's own port is not open"
    );
    let db_port: u16 = api.store.pool().connect_options().get_port();
    assert!(!connects_from(&ns, &gateway.to_string(), db_port, UNREACHABLE_AFTER), "nor PostgreSQL");
    node.shutdown().await;
    dns.shutdown().await;
}

/// The lines of an instance's log (the newest 2000), as `(stream, line)`.
async fn log_lines(api: &TestApi, token: &str, name: &str) -> Vec<(String, String)> {
    let (status, logs) =
        call(api, reqwest::Method::GET, &format!("/v1/instances/{name}/logs?limit=2000"), token, None).await;
    assert_eq!(status, 200, "{logs}");
    logs.as_array()
        .unwrap()
        .iter()
        .map(|l| (l["stream"].as_str().unwrap().to_owned(), l["line"].as_str().unwrap().to_owned()))
        .collect()
}

/// Polls an instance's log until `pred` holds (60 s at most: some of these instances first print a lot).
async fn wait_for_log(
    api: &TestApi,
    token: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    for _ in 0..600 {
        lines = log_lines(api, token, name).await;
        if pred(&lines) {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the log of {name} never showed {what}: {lines:?}");
}

/// A bundle packed entry by entry, as an attacker would: any kind, mode and owner (root).
fn raw_bundle(entries: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, kind, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        if kind.is_character_special() {
            // 1:3 is /dev/null; any device would do.
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        tar.append_data(&mut h, path, *data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// Tries what a tenant's image could do with privileged files, reports it, then serves.
const PRIVILEGE_SH: &str = r#"#!/bin/sh
echo "setuid: $(./suid/id)"
echo "setgid: $(./sgid/id)"
echo "write: $( (echo pwned > shared.txt) 2>&1 && echo wrote)"
echo "create: $( (echo x > open-dir/new) 2>&1 && echo created)"
grep NoNewPrivs /proc/self/status
awk '$5 == "/" { print "mount: " $6 }' /proc/self/mountinfo
echo "checked"
exec httpd -f -p "$PORT"
"#;

/// Issue 14, item 1: a copy of `id` with mode 4755 in a bundle ran as euid 0.
#[tokio::test]
async fn a_setuid_or_setgid_file_in_an_image_never_runs_as_root() {
    let Some((_host, api, node)) = with_node("n-suid").await else { return };
    let t = &api.token;
    // Static, so that it runs in the sandbox; named `id`, so that busybox runs its `id`.
    let id = std::fs::read("/bin/busybox").unwrap();
    let bundle = raw_bundle(&[
        ("manifest.json", tar::EntryType::Regular, 0o644, br#"{"command": ["./run.sh"], "port": 9000}"#),
        ("run.sh", tar::EntryType::Regular, 0o755, PRIVILEGE_SH.as_bytes()),
        ("suid/id", tar::EntryType::Regular, 0o4755, &id),
        ("sgid/id", tar::EntryType::Regular, 0o2755, &id),
        // Unpacked images are shared by every instance of the digest, whatever its tenant.
        ("shared.txt", tar::EntryType::Regular, 0o666, b"original\n"),
        ("open-dir/", tar::EntryType::Directory, 0o777, b""),
    ]);
    let res = reqwest::Client::new()
        .post(api.url("/v1/images?name=privileged"))
        .bearer_auth(t)
        .header("content-type", "application/gzip")
        .body(bundle)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "setuid bits are stripped, not refused");
    let digest = res.json::<Value>().await.unwrap()["digest"].as_str().unwrap().to_owned();
    create(&api, t, json!({"image": "privileged", "name": "suid-1"})).await;
    running(&api, t, "suid-1").await;
    let lines = wait_for_log(&api, t, "suid-1", "its checks", |l| l.iter().any(|(_, l)| l == "checked")).await;
    let out: Vec<&str> = lines.iter().filter(|(s, _)| s == "stdout").map(|(_, l)| l.as_str()).collect();
    let line = |prefix: &str| out.iter().find(|l| l.starts_with(prefix)).copied().unwrap_or_default();
    assert!(line("setuid: ").starts_with("setuid: uid=65534"), "{out:?}");
    assert!(!line("setuid: ").contains("euid="), "the setuid copy ran with another effective uid: {out:?}");
    assert!(line("setgid: ").starts_with("setgid: uid=65534"), "{out:?}");
    assert!(!line("setgid: ").contains("egid="), "the setgid copy ran with another effective gid: {out:?}");
    assert!(!line("write: ").contains("wrote"), "a file of the shared image was writable: {out:?}");
    assert!(!line("create: ").contains("created"), "a directory of the shared image was writable: {out:?}");
    // Each layer on its own would have stopped it: no_new_privs, a nosuid view, the modes, and the shared layer
    // read-only beneath the sandbox's own writable one.
    assert_eq!(line("NoNewPrivs:"), "NoNewPrivs:\t1", "{out:?}");
    let mount = line("mount: ");
    for flag in ["nosuid", "nodev"] {
        assert!(mount.trim_start_matches("mount: ").split(',').any(|f| f == flag), "{flag} in {mount:?} ({out:?})");
    }
    let inst = call(&api, reqwest::Method::GET, "/v1/instances/suid-1", t, None).await.1;
    let layers: Vec<String> = sandbox_traces(node.node, &inst)
        .into_iter()
        .filter(|t| t.split_whitespace().nth(5).is_some_and(|at| at.rsplit('/').nth(1) == Some("l")))
        .collect();
    assert!(!layers.is_empty());
    for l in &layers {
        let options = l.split_whitespace().nth(6).unwrap_or_default();
        for flag in ["ro", "nosuid", "nodev"] {
            assert!(options.split(',').any(|f| f == flag), "{flag} in {l}");
        }
    }
    let hex = digest.trim_start_matches("sha256:");
    let dir = config("n-suid").state_dir.join("layers").join(format!("bundle-{hex}")).join("app");
    for (file, mode) in [("suid/id", 0o755), ("sgid/id", 0o755), ("shared.txt", 0o644), ("open-dir", 0o755)] {
        let meta = std::fs::symlink_metadata(dir.join(file)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (mode, 0), "{file}: mode {:o}", meta.mode());
    }
    assert_eq!(std::fs::read_to_string(dir.join("shared.txt")).unwrap(), "original\n");
    node.shutdown().await;
}

/// Device nodes (and FIFOs) are refused at upload, and by the node for a bundle stored before that check.
#[tokio::test]
async fn device_nodes_in_an_image_are_refused() {
    let Some((_host, api, node)) = with_node("n-dev").await else { return };
    let t = &api.token;
    let manifest = br#"{"command": ["sh", "-c", "cat null; echo read; echo x > null && echo wrote; exec httpd -f -p $PORT"], "port": 9000}"#;
    let bundle = raw_bundle(&[
        ("manifest.json", tar::EntryType::Regular, 0o644, manifest),
        ("null", tar::EntryType::Char, 0o666, b""),
    ]);
    let res = reqwest::Client::new()
        .post(api.url("/v1/images?name=devices"))
        .bearer_auth(t)
        .header("content-type", "application/gzip")
        .body(bundle.clone())
        .send()
        .await
        .unwrap();
    let status = res.status();
    let problem: Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "invalid_image");
    assert!(problem["detail"].as_str().unwrap().contains("\"null\" is a character device"), "{problem}");

    // As if uploaded before the check: the node refuses to unpack it.
    let parsed: cloud_domain::api::ImageManifest = serde_json::from_slice(manifest).unwrap();
    api.store.put_image(api.tenant.id, "devices", &parsed, &bundle).await.unwrap();
    create(&api, t, json!({"image": "devices", "name": "dev-1", "restart_policy": "never"})).await;
    let failed = wait_for(&api, t, "dev-1", "failed", |i| i["state"] == "failed").await;
    let reason = failed["state_reason"].as_str().unwrap();
    assert!(reason.contains("\"null\" is a character device"), "{reason}");
    node.shutdown().await;
}

/// Stored log bytes (line text) of an instance.
async fn stored_log_bytes(api: &TestApi, instance: &Value) -> i64 {
    let id: uuid::Uuid = instance["id"].as_str().unwrap().parse().unwrap();
    let (bytes,): (i64,) =
        sqlx::query_as("SELECT coalesce(sum(octet_length(line)), 0)::bigint FROM instance_logs WHERE instance_id = $1")
            .bind(id)
            .fetch_one(api.store.pool())
            .await
            .unwrap();
    bytes
}

/// What the platform documents as each instance's stored log (docs/configuration.md).
const LOG_BUDGET: i64 = 1 << 20;
/// Where lines are cut (docs/configuration.md).
const MAX_LINE: usize = 16 * 1024;

/// Issue 14, item 4: one 400 MB line took the agent from 45 MB to 2.8 GB. The agent runs in this process, so its
/// peak resident memory is this process's (`VmHWM`, reset first): nothing else runs meanwhile (the host lock).
#[tokio::test]
async fn a_400_mb_log_line_is_cut_and_leaves_the_agents_memory_alone() {
    let Some((_host, api, node)) = with_node("n-flood").await else { return };
    let t = &api.token;
    let flood = "head -c 400000000 /dev/zero | tr '\\0' A; echo\necho 'after the flood'\nexec httpd -f -p \"$PORT\"\n";
    api.upload_image(
        t,
        "flood",
        &[("manifest.json", r#"{"command": ["sh", "flood.sh"], "port": 9000}"#), ("flood.sh", flood)],
    )
    .await;
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = cloud_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap();
    let started = std::time::Instant::now();
    let inst = create(&api, t, json!({"image": "flood", "name": "flood-1"})).await;
    let lines = wait_for_log(&api, t, "flood-1", "the line after the flood", |l| {
        l.iter().any(|(s, l)| s == "stdout" && l == "after the flood")
    })
    .await;
    let peak = cloud_tests::proc_status_kib(std::process::id(), "VmHWM").unwrap();
    eprintln!("flood read in {:?}; RSS {before} KiB before, peak {peak} KiB", started.elapsed());
    assert!(peak < before + 8 * 1024, "the agent's peak RSS grew from {before} KiB to {peak} KiB");

    let out: Vec<&str> = lines.iter().filter(|(s, _)| s == "stdout").map(|(_, l)| l.as_str()).collect();
    let expected = format!("{}… [line cut: {} more bytes]", "A".repeat(MAX_LINE), 400_000_000 - MAX_LINE);
    assert_eq!(out.len(), 2, "{:?}", out.iter().map(|l| &l[..l.len().min(80)]).collect::<Vec<_>>());
    assert!(
        out[0] == expected,
        "the cut line: {} bytes, ends {:?}",
        out[0].len(),
        &out[0][out[0].len().saturating_sub(60)..]
    );
    assert_eq!(out[1], "after the flood", "the next line is intact");
    let stored = stored_log_bytes(&api, &inst).await;
    assert!(stored <= LOG_BUDGET, "{stored} bytes stored");
    let ip = running(&api, t, "flood-1").await["private_ip"].as_str().unwrap().to_owned();
    assert!(http_get(&ip, 9000).await.is_ok(), "it still serves");
    node.shutdown().await;
}

/// An instance printing as fast as it can loses lines beyond its rate (with a note saying how many), and its
/// neighbour's lines all arrive meanwhile.
#[tokio::test]
async fn a_flooding_instance_is_limited_and_does_not_crowd_out_its_neighbour() {
    let Some((_host, api, node)) = with_node("n-noisy").await else { return };
    let t = &api.token;
    let noisy = "(while :; do yes 'flood flood flood flood' | head -c 1000000; sleep 0.1; done) &\nexec httpd -f -p \"$PORT\"\n";
    let quiet = "for i in $(seq 1 300); do echo \"quiet $i\"; done\nexec httpd -f -p \"$PORT\"\n";
    for (name, script) in [("noisy", noisy), ("quiet", quiet)] {
        let manifest = format!(r#"{{"command": ["sh", "{name}.sh"], "port": 9000}}"#);
        api.upload_image(t, name, &[("manifest.json", &manifest), (&format!("{name}.sh"), script)]).await;
    }
    let noisy = create(&api, t, json!({"image": "noisy", "name": "noisy-1"})).await;
    running(&api, t, "noisy-1").await;
    // The flood goes on while the neighbour starts and prints.
    create(&api, t, json!({"image": "quiet", "name": "quiet-1"})).await;
    running(&api, t, "quiet-1").await;
    let want: Vec<String> = (1..=300).map(|i| format!("quiet {i}")).collect();
    let lines =
        wait_for_log(&api, t, "quiet-1", "its 300 lines", |l| l.iter().filter(|(s, _)| s == "stdout").count() >= 300)
            .await;
    let out: Vec<String> = lines.into_iter().filter(|(s, _)| s == "stdout").map(|(_, l)| l).collect();
    assert_eq!(out, want);
    let lines = wait_for_log(&api, t, "noisy-1", "a note of dropped lines", |l| {
        l.iter().any(|(s, l)| s == "system" && l.starts_with("dropped "))
    })
    .await;
    let note = lines.iter().find(|(s, l)| s == "system" && l.starts_with("dropped ")).unwrap();
    assert!(note.1.contains("over this instance's log rate"), "{note:?}");
    assert!(stored_log_bytes(&api, &noisy).await <= LOG_BUDGET);
    node.shutdown().await;
}

/// Retention keeps each instance's newest lines within its byte budget, and a read returns at most `limit` lines.
/// Needs no root: the lines are stored as a node agent would. Takes the host lock all the same, as the flood test
/// measures this process's memory.
#[tokio::test]
async fn stored_logs_stay_within_the_byte_budget_newest_first() {
    let _host = HOST.lock().await;
    let api = TestApi::start().await;
    let t = &api.token;
    let inst = create(&api, t, json!({"image": "hello", "name": "chatty", "start": false})).await;
    let id: uuid::Uuid = inst["id"].as_str().unwrap().parse().unwrap();
    let long = "x".repeat(MAX_LINE);
    for batch in 0..10 {
        let lines: Vec<(chrono::DateTime<chrono::Utc>, &str, String)> =
            (0..20).map(|i| (chrono::Utc::now(), "stdout", format!("{batch:02}-{i:02} {long}"))).collect();
        api.store.append_logs(id, &lines).await.unwrap();
        assert!(stored_log_bytes(&api, &inst).await <= LOG_BUDGET, "after batch {batch}");
    }
    let stored = log_lines(&api, t, "chatty").await;
    let kept = stored.len();
    assert!(kept >= (LOG_BUDGET as usize / (MAX_LINE + 6)) - 1, "{kept} lines kept");
    assert!(stored.last().unwrap().1.starts_with("09-19 "), "the newest line is kept");
    let names: Vec<&str> = stored.iter().map(|(_, l)| &l[..5]).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "oldest first, no gaps from the newest back");

    let (status, page) = call(&api, reqwest::Method::GET, "/v1/instances/chatty/logs?limit=3", t, None).await;
    assert_eq!(status, 200);
    assert_eq!(page.as_array().unwrap().len(), 3);
    for bad in ["0", "2001"] {
        let (status, problem) =
            call(&api, reqwest::Method::GET, &format!("/v1/instances/chatty/logs?limit={bad}"), t, None).await;
        assert_eq!((status, problem["code"].as_str()), (400, Some("invalid_query")), "limit={bad}");
    }
}

/// The processes of an instance, as the host sees them (whatever runs in its network namespace).
fn host_pids(node: &NodeHandle, instance: &Value) -> Vec<u32> {
    let out = Command::new("ip").args(["netns", "pids", &netns_of(node, instance)]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// A process's real, effective, saved and filesystem uids, as the host sees them.
fn host_uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
    line.split_whitespace().skip(1).filter_map(|u| u.parse().ok()).collect()
}

/// Tenant A's instance: a secret in its environment and one in a file of its image, serving that image's
/// directory with busybox httpd (on the host's busybox too, so that the attack can be run on runtimes that ran
/// instances on the host's userland).
const VAULT: &[(&str, &str)] = &[
    ("manifest.json", r#"{"command": ["busybox", "httpd", "-f", "-p", "9000"], "port": 9000}"#),
    ("secret.txt", "alpha-file-secret-4242\n"),
    ("index.html", "vault\n"),
];

/// What tenant B's instance tries against A (whose pids, file and the node's directories it is told), one line
/// per attack that worked, then serves.
const PROBE_SH: &str = r#"
# Controls: the same means work on what is the instance's own.
tr '\0' '\n' < /proc/$$/environ | grep -q '^A_PIDS=' && echo "control: read its own environment"
kill -0 $$ && echo "control: signalled itself"
( exec 3< /proc/$$/mem ) && echo "control: opened its own memory"
echo "pids: $(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ')"
for p in $A_PIDS; do
    [ -d /proc/$p ] && echo "attack: sees A's process $p"
    cat /proc/$p/environ 2>/dev/null | tr '\0' '\n' | grep -q alpha-env-secret && echo "attack: read A's environment through /proc/$p/environ"
    cat /proc/$p/cwd/secret.txt 2>/dev/null | grep -q alpha-file && echo "attack: read A's file through /proc/$p/cwd"
    kill -0 $p 2>/dev/null && echo "attack: signalled A's process $p"
    ( exec 3< /proc/$p/mem ) 2>/dev/null && echo "attack: opened A's memory for ptrace (/proc/$p/mem)"
done
for f in /proc/[0-9]*/environ; do
    tr '\0' '\n' < $f 2>/dev/null | grep -q alpha-env-secret && echo "attack: read A's environment through $f"
done
cat "$A_FILE" 2>/dev/null | grep -q alpha-file && echo "attack: read A's file $A_FILE"
[ -n "$(ls -A "$STATE_DIR" 2>/dev/null)" ] && echo "attack: listed the node's state directory $STATE_DIR"
[ -n "$(ls -A "$DATA_DIR" 2>/dev/null)" ] && echo "attack: listed the platform's data directory $DATA_DIR"
[ -n "$(head -n 1 /etc/shadow 2>/dev/null)" ] && echo "attack: read /etc/shadow"
mkdir -p /tmp/m && mount -t tmpfs none /tmp/m 2>/dev/null && echo "attack: mounted a tmpfs"
mknod /tmp/null c 1 3 2>/dev/null && echo "attack: created a device node"
echo "probe: done"
exec busybox httpd -f -p "$PORT"
"#;

/// Issue 15: tenant B's instance walked /proc to tenant A's environment, read A's image files, and could signal
/// A. Attacked from inside B, with A on the same node.
#[tokio::test]
async fn another_tenants_instance_cannot_see_read_signal_or_share_ids_with_an_instance() {
    let Some((_host, api, node)) = with_node("n-attack").await else { return };
    let (_, mallory) = api.tenant("mallory", &[Scope::Read, Scope::Write]).await;
    api.upload_image(&api.token, "vault", VAULT).await;
    let a = create(
        &api,
        &api.token,
        json!({"image": "vault", "name": "vault", "env": {"SECRET": "alpha-env-secret-4242"}}),
    )
    .await;
    running(&api, &api.token, "vault").await;
    let a_pids = host_pids(&node, &a);
    assert!(!a_pids.is_empty());
    // Where the node unpacked A's image (not the view of it its sandbox mounts).
    let a_file = walk(&state_dir())
        .into_iter()
        .find(|p| p.ends_with("secret.txt") && !p.to_string_lossy().contains("/sandboxes/"))
        .expect("A's image on the node");
    let data_dir = std::env::temp_dir().join(format!("cloud-tests-pg-{}", std::process::id()));

    api.upload_image(
        &mallory,
        "probe",
        &[("manifest.json", r#"{"command": ["sh", "probe.sh"], "port": 9000}"#), ("probe.sh", PROBE_SH)],
    )
    .await;
    let env = json!({
        "A_PIDS": a_pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
        "A_FILE": a_file.display().to_string(),
        "STATE_DIR": state_dir().display().to_string(),
        "DATA_DIR": data_dir.display().to_string(),
    });
    let b = create(&api, &mallory, json!({"image": "probe", "name": "probe", "env": env})).await;
    let lines =
        wait_for_log(&api, &mallory, "probe", "the probe's end", |l| l.iter().any(|(_, l)| l == "probe: done")).await;
    let controls = lines.iter().filter(|(_, l)| l.starts_with("control: ")).count();
    assert_eq!(controls, 3, "the probe's means work on itself: {lines:?}");
    let mut worked: Vec<String> =
        lines.iter().filter_map(|(_, l)| l.strip_prefix("attack: ")).map(str::to_owned).collect();
    let visible = lines.iter().find_map(|(_, l)| l.strip_prefix("pids: ")).unwrap_or_default();
    let visible: Vec<u32> = visible.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    // Its own pid namespace: its init, its shell and the commands of that line, nothing else.
    if visible.len() > 6 {
        worked.push(format!("saw {} processes in /proc: {visible:?}", visible.len()));
    }

    // From the host: each instance's processes run as host uids of their own, which no other process has.
    running(&api, &mallory, "probe").await;
    let b_pids = host_pids(&node, &b);
    let uids_of = |pids: &[u32]| pids.iter().flat_map(|p| host_uids(*p)).collect::<HashSet<u32>>();
    let (a_uids, b_uids) = (uids_of(&a_pids), uids_of(&b_pids));
    for (who, uids, own) in [("A", &a_uids, &a_pids), ("B", &b_uids, &b_pids)] {
        for uid in uids.iter().filter(|u| [0, 65534].contains(*u)) {
            worked.push(format!("{who} runs as host uid {uid}"));
        }
        let others: Vec<u32> = walk_pids()
            .into_iter()
            .filter(|p| !own.contains(p))
            .filter(|p| host_uids(*p).iter().any(|u| uids.contains(u)))
            .collect();
        if !others.is_empty() {
            worked.push(format!("{who}'s host uids {uids:?} are also those of processes {others:?}"));
        }
    }
    assert!(worked.is_empty(), "attacks on another tenant's instance worked: {worked:#?}");
    node.shutdown().await;
}

/// Every file under a directory (not following links).
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => files.extend(walk(&e.path())),
            Ok(_) => files.push(e.path()),
            Err(_) => {}
        }
    }
    files
}

/// Every live process of the host (a zombie has ended: it holds no uid any more).
fn walk_pids() -> Vec<u32> {
    let live = |pid: &u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X']))
    };
    let pids = std::fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse().ok());
    pids.filter(live).collect()
}

/// The limit a process's cgroup sets in `file` of the v1 `controller` (or of the unified hierarchy), with the
/// cgroup's path; `None` for no limit.
fn cgroup_limit(pid: u32, controller: &str, file: &str) -> (String, Option<u64>) {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let dir = if controllers.split(',').any(|c| c == controller) {
            PathBuf::from("/sys/fs/cgroup").join(controller)
        } else if controllers.is_empty() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            continue;
        };
        let limit = std::fs::read_to_string(dir.join(path.trim_start_matches('/')).join(file));
        if let Some(value) = limit.ok().and_then(|v| v.trim().parse().ok()) {
            return (path.to_owned(), Some(value));
        }
    }
    (String::new(), None)
}

/// Waits for the instance at `ip` to answer a connection (and closes it).
async fn knock(ip: &str, port: u16) {
    let t0 = std::time::Instant::now();
    while tokio::net::TcpStream::connect((ip, port)).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "{ip}:{port} never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 15: a process that forks without end or allocates without end hurts only its own instance. Tenant B
/// runs both; tenant A on the same node keeps answering, and so does the host.
#[tokio::test]
async fn a_fork_bomb_and_a_memory_hog_hurt_only_their_own_instance() {
    let Some((_host, api, node)) = with_node("n-bomb").await else { return };
    let (_, mallory) = api.tenant("mallory", &[Scope::Read, Scope::Write]).await;
    api.upload_image(&api.token, "vault", VAULT).await;
    create(&api, &api.token, json!({"image": "vault", "name": "vault"})).await;
    let a_ip = running(&api, &api.token, "vault").await["private_ip"].as_str().unwrap().to_owned();
    let a_answers = async || {
        for _ in 0..5 {
            assert_eq!(http_get(&a_ip, 9000).await.as_deref(), Ok("vault\n"), "A stopped answering");
        }
    };
    a_answers().await;

    // The bomb waits for a second connection (the first is the node's readiness check): it goes off only once
    // the test has seen it is held by a limit of its own, so that a runtime without one is never bombed.
    let bomb = "busybox nc -l -p \"$PORT\" </dev/null\nbusybox nc -l -p \"$PORT\" </dev/null\necho bombing\n\
                bomb() { bomb | bomb & }\nbomb\nexec busybox nc -l -p \"$PORT\" </dev/null\n";
    api.upload_image(
        &mallory,
        "bomb",
        &[("manifest.json", r#"{"command": ["sh", "bomb.sh"], "port": 9000}"#), ("bomb.sh", bomb)],
    )
    .await;
    let b = create(&api, &mallory, json!({"image": "bomb", "name": "bomb", "restart_policy": "never"})).await;
    let b_ip = running(&api, &mallory, "bomb").await["private_ip"].as_str().unwrap().to_owned();
    let b_pid = host_pids(&node, &b)[0];
    let (cgroup, limit) = cgroup_limit(b_pid, "pids", "pids.max");
    let (own, _) = cgroup_limit(std::process::id(), "pids", "pids.max");
    if limit.is_none_or(|l| l > 512) || cgroup == own {
        node.shutdown().await;
        panic!("B's processes are held by no process limit of their own (pids cgroup {cgroup:?}, limit {limit:?})");
    }
    knock(&b_ip, 9000).await;
    let t0 = std::time::Instant::now();
    loop {
        let current = std::fs::read_to_string(format!("/sys/fs/cgroup/pids{cgroup}/pids.current"))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup{cgroup}/pids.current")))
            .map_or(0, |c| c.trim().parse::<u64>().unwrap_or(0));
        if current + 16 >= limit.unwrap() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the bomb never reached its limit ({current})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a_answers().await;
    assert!(Command::new("true").status().unwrap().success(), "the host can still start processes");

    // Allocating without end: the sandbox's memory limit ends it, and it alone.
    let hog = "echo hogging\nx=0123456789abcdef\nwhile :; do x=\"$x$x\"; done\n";
    api.upload_image(
        &mallory,
        "hog",
        &[("manifest.json", r#"{"command": ["sh", "hog.sh"], "port": 9000}"#), ("hog.sh", hog)],
    )
    .await;
    create(&api, &mallory, json!({"image": "hog", "name": "hog", "memory_mb": 32, "restart_policy": "never"})).await;
    let hog = wait_for(&api, &mallory, "hog", "failed", |i| i["state"] == "failed").await;
    let reason = hog["state_reason"].as_str().unwrap();
    assert!(reason.contains("exited with code 137"), "killed for its memory: {reason}");
    a_answers().await;
    assert_eq!(running(&api, &mallory, "bomb").await["state"], "running", "the bomb is held, not ended");
    node.shutdown().await;
}

/// A busybox layer for OCI images built in tests, with an `app` account.
fn busybox_layer() -> cloud_oci::build::LayerBuilder {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let mut l = cloud_oci::build::LayerBuilder::new().dir("bin", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "httpd", "id", "pwd", "echo"] {
        l = l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l.dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/www:/bin/sh\n")
        .dir("tmp", 0o1777)
}

/// OCI images run as their config says (Entrypoint, Cmd replaced by an instance's args, Env under the
/// instance's, WorkingDir, User, ExposedPorts), on their layers stacked (a whiteout hides a lower file), and a
/// layer two images share, whatever their tenants, is unpacked once on the node.
#[tokio::test]
async fn oci_images_run_as_their_config_says_on_layers_unpacked_once_and_shared() {
    let Some((_host, api, node)) = with_node("n-oci").await else { return };
    let (other, other_token) = api.tenant("initech", &[Scope::Read, Scope::Write]).await;
    let base = busybox_layer()
        .dir("www", 0o755)
        .file("www/index.html", 0o644, b"base\n")
        .file("www/gone.txt", 0o644, b"hidden above\n")
        .into_tar();
    let config = cloud_oci::ImageConfig {
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["echo \"user=$(id -u) dir=$(pwd) greeting=$GREETING\"; exec httpd -f -p \"$PORT\" -h /www".into()],
        env: vec!["GREETING=from-image".into(), "PATH=/bin".into()],
        working_dir: "/www".into(),
        user: "app".into(),
        exposed_ports: vec![8081],
    };
    let top_a =
        cloud_oci::build::LayerBuilder::new().file("www/.wh.gone.txt", 0o644, b"").file("www/a.txt", 0o644, b"alpha\n");
    let image_a = cloud_oci::build::image(&config, &[base.clone(), top_a.into_tar()]);
    let top_b = cloud_oci::build::LayerBuilder::new().file("www/b.txt", 0o644, b"beta\n");
    let image_b = cloud_oci::build::image(&config, &[base, top_b.into_tar()]);
    api.store.put_oci_image(api.tenant.id, "site", &image_a, "upload").await.unwrap();
    api.store.put_oci_image(other.id, "site", &image_b, "upload").await.unwrap();

    create(&api, &api.token, json!({"image": "site", "name": "site-a", "env": {"GREETING": "from-instance"}})).await;
    let args = json!(["echo args; exec httpd -f -p \"$PORT\" -h /www"]);
    create(&api, &other_token, json!({"image": "site", "name": "site-b", "args": args})).await;
    let a_ip = running(&api, &api.token, "site-a").await["private_ip"].as_str().unwrap().to_owned();
    let b_ip = running(&api, &other_token, "site-b").await["private_ip"].as_str().unwrap().to_owned();
    let get = async |ip: &str, path: &str| {
        let res = reqwest::get(format!("http://{ip}:8081/{path}")).await.unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    };
    assert_eq!(get(&a_ip, "index.html").await, (200, "base\n".into()));
    assert_eq!(get(&a_ip, "a.txt").await, (200, "alpha\n".into()));
    assert_eq!(get(&a_ip, "gone.txt").await.0, 404, "the whiteout hides the lower layer's file");
    assert_eq!(get(&b_ip, "gone.txt").await, (200, "hidden above\n".into()));
    assert_eq!(get(&b_ip, "b.txt").await, (200, "beta\n".into()));
    let a_log = wait_for_log(&api, &api.token, "site-a", "its line", |l| l.iter().any(|(s, _)| s == "stdout")).await;
    assert!(a_log.contains(&("stdout".into(), "user=1000 dir=/www greeting=from-instance".into())), "{a_log:?}");
    let b_log = wait_for_log(&api, &other_token, "site-b", "its line", |l| l.iter().any(|(s, _)| s == "stdout")).await;
    assert!(b_log.contains(&("stdout".into(), "args".into())), "args replace Cmd: {b_log:?}");

    let layers = state_dir().join("layers");
    for layer in image_a.layers.iter().chain(&image_b.layers) {
        assert!(layers.join(layer.diff_id.hex()).is_dir(), "{} unpacked", layer.diff_id);
    }
    assert_eq!(image_a.layers[0].diff_id, image_b.layers[0].diff_id, "one base layer");
    node.shutdown().await;
}

/// A node agent that is not root: `cloudd node` as `nobody` runs instances as rootless sandboxes (its own pid,
/// mount and user namespaces on a read-only image, in the host's network on 127.x addresses), and says what is
/// missing when it starts.
#[tokio::test]
async fn an_unprivileged_node_runs_instances_as_rootless_sandboxes() {
    if !is_root() {
        eprintln!("skipped: the test starts a node as nobody, which needs root");
        return;
    }
    let _host = HOST.lock().await;
    let k = POOL.fetch_add(1, Ordering::SeqCst);
    let pool = format!("127.{}.{}.0/20", 200 + (k + 25) / 16 % 50, (k % 16) * 16);
    let url = cloud_tests::fresh_database().await;
    let store = cloud_store::Store::new(
        cloud_store::connect(&url, 5).await.unwrap(),
        Settings { tenant_pool: pool.parse().unwrap(), ..Settings::default() },
    );
    store.migrate().await.unwrap();
    let mut api = TestApi::start_on(store, Default::default()).await;
    api.start_controller();

    // Everything the agent touches belongs to nobody, its binary included (ours may sit under /root).
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let exe = dir.path().join("cloudd");
    std::fs::copy(env!("CARGO_BIN_EXE_cloudd"), &exe).unwrap();
    let config = dir.path().join("node.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"rootless-n\"\nstate_dir = \"{}\"\nmemory_mb = 1024\nops_listen = \"127.0.0.1:0\"\n",
            state.display()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(&exe);
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    let mut agent = cmd
        .args(["--config", &config.display().to_string(), "node"])
        .env("DATABASE_URL", &url)
        .env("CLOUD_TENANT_POOL", &pool)
        .env_remove("HOME")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();

    create(&api, &api.token, json!({"image": "hello", "name": "rl-hello"})).await;
    let script = "id -u\ncat /proc/self/uid_map\nls /proc | grep -c '^[0-9]'\n\
                  exec busybox httpd -f -p \"$PRIVATE_IP:$PORT\"\n";
    api.upload_image(
        &api.token,
        "probe",
        &[("manifest.json", r#"{"command": ["sh", "probe.sh"], "port": 9000}"#), ("probe.sh", script)],
    )
    .await;
    create(&api, &api.token, json!({"image": "probe", "name": "rl-probe"})).await;
    let hello = running(&api, &api.token, "rl-hello").await;
    let ip = hello["private_ip"].as_str().unwrap();
    assert!(ip.starts_with("127."), "{ip}");
    assert_eq!(http_get(ip, 8080).await.unwrap(), format!("hello from rl-hello ({ip})\n"));
    let lines = wait_for_log(&api, &api.token, "rl-probe", "the probe's output", |l| {
        l.iter().filter(|(s, _)| s == "stdout").count() >= 3
    })
    .await;
    let out: Vec<&str> = lines.iter().filter(|(s, _)| s == "stdout").map(|(_, l)| l.trim()).collect();
    assert_eq!(out[0], "0", "root inside: {out:?}");
    assert!(out[1].split_whitespace().eq(["0", "65534", "1"]), "root inside is nobody outside: {out:?}");
    // Its init, the shell, ls and grep: none of the host's processes, nor hello's.
    assert!(out[2].parse::<u32>().unwrap() <= 4, "its own pid namespace: {out:?}");
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(text.contains("rootless sandboxes"), "the agent says what is missing: {text}");

    let _ = agent.kill();
    let _ = agent.wait();
}
