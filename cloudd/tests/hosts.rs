//! The platform across hosts: three hosts as network namespaces on an underlay switch the test builds, each
//! running `cloudd node` and `cloudd dns` (two also `cloudd edge`) against one PostgreSQL, reached over the
//! underlay. Instances of one tenant reach each other across hosts through the encrypted overlay, every edge
//! reaches every instance, other tenants reach nothing, and a lost host's instances come back elsewhere. Needs
//! root (namespaces, TUN, nftables); skipped otherwise.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cloud_tests::hosts::{Capture, Netns, Proc, Roles, Underlay, ip, ready};

fn underlay(i: u8) -> Ipv4Addr {
    Underlay::address(i)
}

/// What a host's kernel and overlay make of its traffic, for a failure's message.
async fn diagnose(hosts: &[Netns]) -> String {
    let mut out = String::new();
    for (i, ns) in hosts.iter().enumerate() {
        let run = |args: &[&str]| {
            let o = Command::new("ip").args(["netns", "exec", &ns.0]).args(args).output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        out.push_str(&format!("--- host {}\n{}{}", i + 1, run(&["ip", "route"]), run(&["ip", "neigh"])));
        let metrics = reqwest::get(format!("http://{}:9154/metrics", underlay(i as u8 + 1))).await;
        let metrics = match metrics {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        metrics.lines().filter(|l| l.starts_with("cloud_node_overlay")).for_each(|l| out.push_str(&format!("{l}\n")));
    }
    out
}

/// An instance that fetches what it is asked to from inside its sandbox (busybox httpd and wget):
/// `/cgi-bin/fetch?HOST:PORT/PATH` answers the page, or `error`; `/cgi-bin/big` answers 1 MiB, far over the overlay's
/// MTU.
const PROBER: &[(&str, &str)] = &[
    ("manifest.json", r#"{"command": ["httpd", "-f", "-p", "9000", "-h", "/app/www"], "port": 9000}"#),
    (
        "www/cgi-bin/big",
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nyes 0123456789abcde | head -c 1048576\n",
    ),
    (
        "www/cgi-bin/fetch",
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\ntimeout 3 wget -q -O - \"http://$QUERY_STRING\" 2>/dev/null || echo error\n",
    ),
];

struct Tenant {
    token: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_serve_one_platform_through_an_encrypted_overlay() {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        eprintln!("skipped: hosts need root");
        return;
    }
    let tag = std::process::id() % 10_000;
    // The underlay: a switch, the test's leg into it, three hosts.
    let net = Underlay::build(&format!("hs{tag}"), 3);
    let (switch, hosts) = (&net.switch, &net.hosts);

    // PostgreSQL, migrated, relayed onto the underlay.
    let direct = cloud_tests::fresh_database().await;
    let out = Command::new(env!("CARGO_BIN_EXE_cloudd")).arg("migrate").env("DATABASE_URL", &direct).output().unwrap();
    assert!(out.status.success(), "cloudd migrate: {}", String::from_utf8_lossy(&out.stderr));
    let store = cloud_store::Store::new(cloud_store::connect(&direct, 2).await.unwrap(), Default::default());
    let opts = store.pool().connect_options();
    let pg = SocketAddr::new(opts.get_host().parse().unwrap(), opts.get_port());
    let relay = cloud_tests::relay::Relay::start_on(SocketAddr::from((Underlay::leg_address(), 0)), pg).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secret.key");
    std::fs::write(&key_file, "3c".repeat(32)).unwrap();
    let p = Roles {
        cloudd: env!("CARGO_BIN_EXE_cloudd").into(),
        dir: dir.path().to_owned(),
        url: direct.replacen(&pg.to_string(), &relay.addr.to_string(), 1),
        key_file,
        pool: format!("10.{}.0.0/16", 160 + std::process::id() % 10),
    };
    assert_ne!(p.url, direct, "the database URL names {pg}");

    // The API in the test's namespace; a tenant and another one.
    let api_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let api_url = format!("http://127.0.0.1:{api_port}");
    // Plain HTTP, as behind a TLS proxy: the API's own TLS is the roles test's and the README's.
    let api_env = [("CLOUD_API_LISTEN", format!("127.0.0.1:{api_port}")), ("CLOUD_API_TLS", "off".into())];
    let _api = p.start("api", None, "api", "", &api_env);
    p.wait("the API ready", Duration::from_secs(60), async || ready(([127, 0, 0, 1], api_port).into()).await).await;
    let tenant = |name: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_cloudd"))
            .args(["bootstrap", "--tenant", name])
            .env("DATABASE_URL", &direct)
            .env("CLOUD_SECRET_KEY_FILE", &p.key_file)
            .env("CLOUD_TENANT_POOL", &p.pool)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Tenant { token: String::from_utf8(out.stdout).unwrap().trim().to_owned() }
    };
    let (acme, other) = (tenant("initech"), tenant("globex"));

    // Every host: a DNS for its instances' private names, a node agent on the overlay; two of them an edge.
    let mut roles: HashMap<String, Proc> = HashMap::new();
    let mut ops = Vec::new();
    for (i, ns) in hosts.iter().enumerate() {
        let (i, addr) = (i + 1, underlay(i as u8 + 1));
        let dns_env = [
            ("CLOUD_DNS_LISTEN", "127.0.0.1:5300".to_owned()),
            ("CLOUD_DNS_PRIVATE_LISTEN", "127.0.0.1:5301".to_owned()),
            ("CLOUD_DNS_OPS_LISTEN", format!("{addr}:9153")),
        ];
        roles.insert(format!("dns{i}"), p.start(&format!("h{i}-dns"), Some(ns), "dns", "", &dns_env));
        let node = format!(
            "[node]\nname = \"h{i}\"\nstate_dir = \"{}\"\nmemory_mb = 4096\nops_listen = \"0.0.0.0:9154\"\n\
             underlay_address = \"{addr}\"\ndns = \"127.0.0.1:5301\"\nheartbeat_seconds = 1\n\
             live_window_seconds = 3\nlost_after_seconds = 5\nmin_backoff_seconds = 1\n",
            p.dir.join(format!("h{i}-state")).display()
        );
        roles.insert(format!("node{i}"), p.start(&format!("h{i}-node"), Some(ns), "node", &node, &[]));
        ops.extend([SocketAddr::from((addr, 9153)), SocketAddr::from((addr, 9154))]);
        if i <= 2 {
            let edge =
                format!("[edge]\nports_ip = \"{addr}\"\ngrace_period_seconds = 1\nops_listen = \"{addr}:9156\"\n");
            let env =
                [("CLOUD_EDGE_HTTPS_LISTEN", format!("{addr}:443")), ("CLOUD_EDGE_HTTP_LISTEN", format!("{addr}:80"))];
            roles.insert(format!("edge{i}"), p.start(&format!("h{i}-edge"), Some(ns), "edge", &edge, &env));
            ops.push(SocketAddr::from((addr, 9156)));
        }
    }
    for addr in ops {
        p.wait(&format!("ready on {addr}"), Duration::from_secs(120), async || ready(addr).await).await;
    }

    let client = reqwest::Client::new();
    let call = |t: &Tenant, method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = client.request(method, format!("{api_url}{path}")).bearer_auth(&t.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap_or_default())
        }
    };
    let post = async |t: &Tenant, path: &str, body: Value| {
        let (status, v) = call(t, reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(status, 201, "POST {path}: {v}");
        v
    };
    for t in [&acme, &other] {
        let res = client
            .post(format!("{api_url}/v1/images?name=prober"))
            .bearer_auth(&t.token)
            .header("content-type", "application/gzip")
            .body(cloud_tests::bundle(PROBER))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
    }
    let web = post(&acme, "/v1/services", json!({"name": "web", "ports": ["443:8080"]})).await;
    let probe = post(&acme, "/v1/services", json!({"name": "probe", "ports": ["443:9000"]})).await;
    let other_probe = post(&other, "/v1/services", json!({"name": "probe", "ports": ["443:9000"]})).await;
    let fqdn = |s: &Value| s["fqdn"].as_str().unwrap().to_owned();
    let (web_fqdn, probe_fqdn, other_probe_fqdn) = (fqdn(&web), fqdn(&probe), fqdn(&other_probe));
    post(
        &acme,
        "/v1/instances",
        json!({"image": "hello", "service": "web", "replicas": 3, "restart_policy": "always"}),
    )
    .await;
    post(
        &acme,
        "/v1/instances",
        json!({"image": "prober", "service": "probe", "name": "prober", "restart_policy": "always"}),
    )
    .await;
    post(
        &other,
        "/v1/instances",
        json!({"image": "prober", "service": "probe", "name": "prober", "restart_policy": "always"}),
    )
    .await;
    let instances = async |t: &Tenant| call(t, reqwest::Method::GET, "/v1/instances", None).await.1["items"].clone();
    let all_running =
        |v: &Value, n: usize| v.as_array().is_some_and(|a| a.len() == n && a.iter().all(|i| i["state"] == "running"));
    p.wait("every instance running", Duration::from_secs(120), async || {
        all_running(&instances(&acme).await, 4) && all_running(&instances(&other).await, 1)
    })
    .await;
    let acme_instances = instances(&acme).await;
    let field = |i: &Value, k: &str| i[k].as_str().unwrap().to_owned();
    let webs: Vec<&Value> =
        acme_instances.as_array().unwrap().iter().filter(|i| i["service"]["id"] == web["id"]).collect();
    let web_nodes: BTreeSet<String> = webs.iter().map(|i| field(i, "node")).collect();
    assert_eq!(web_nodes.len(), 3, "the service's instances spread over the three hosts: {acme_instances}");

    // Through each edge, verified with the platform CA, every instance answers, on whatever host it runs; and
    // what crosses between hosts meanwhile is sealed.
    let pcap = p.dir.join("underlay.pcap");
    // What crosses between hosts, not the test's own leg.
    let tcpdump = Capture::start(switch, &pcap, &["not", "host", &Underlay::leg_address().to_string()]);
    let ca = reqwest::get(format!("{api_url}/v1/ca.pem")).await.unwrap().text().await.unwrap();
    let via = |edge: u8, name: &str| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .tls_built_in_root_certs(false)
            .resolve(name, SocketAddr::from((underlay(edge), 443)))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let get = async |edge: u8, name: &str, path: &str| -> Option<String> {
        let res = via(edge, name).get(format!("https://{name}{path}")).send().await.ok()?;
        if res.status() != 200 {
            return None;
        }
        res.text().await.ok()
    };
    let web_names: BTreeSet<String> = webs.iter().map(|i| field(i, "name")).collect();
    for edge in [1, 2] {
        let mut seen = BTreeSet::new();
        p.wait(&format!("edge {edge} reaching every instance"), Duration::from_secs(60), async || {
            if let Some(body) = get(edge, &web_fqdn, "/").await {
                seen.extend(body.split_whitespace().nth(2).map(str::to_owned));
            }
            seen == web_names
        })
        .await;
    }

    // Same tenant, other host: by private IP and by private name, from inside a sandbox.
    let prober = acme_instances.as_array().unwrap().iter().find(|i| i["name"] == "prober").unwrap().clone();
    let target = *webs.iter().find(|i| i["node"] != prober["node"]).unwrap();
    let (target_name, target_ip) = (field(target, "name"), field(target, "private_ip"));
    for (how, address) in [("private IP", target_ip.clone()), ("private name", format!("{target_name}.internal"))] {
        let body = get(1, &probe_fqdn, &format!("/cgi-bin/fetch?{address}:8080/")).await.unwrap_or_default();
        assert!(
            body.starts_with(&format!("hello from {target_name} ")),
            "{} {} on {} could not reach {target_name} {target_ip} on {} by {how}: {body:?}\n{}",
            prober["name"],
            prober["private_ip"],
            prober["node"],
            target["node"],
            diagnose(hosts).await
        );
    }
    // A large response crosses the overlay whole (TCP clamped to its MTU), from an edge on another host.
    let edge = if prober["node"] == "h1" { 2 } else { 1 };
    let big = get(edge, &probe_fqdn, "/cgi-bin/big").await.unwrap_or_default();
    assert_eq!(big.len(), 1 << 20, "1 MiB from {} through edge {edge}", prober["node"]);
    assert!(big.lines().all(|l| l == "0123456789abcde" || "0123456789abcde".starts_with(l)));

    // No platform port of another host is in an instance's reach (the agents' operations endpoints listen on every
    // address): not through the overlay (the host's overlay address), not through the underlay.
    let other_host = ["h1", "h2", "h3"].into_iter().find(|h| prober["node"] != *h).unwrap();
    let overlay_address: String = sqlx::query_scalar("SELECT host(overlay_address) FROM nodes WHERE name = $1")
        .bind(other_host)
        .fetch_one(store.pool())
        .await
        .unwrap();
    let underlay_address = underlay(other_host[1..].parse().unwrap());
    assert!(ready(SocketAddr::from((underlay_address, 9154))).await, "{other_host}'s agent answers the test");
    for address in [overlay_address, underlay_address.to_string()] {
        let body = get(1, &probe_fqdn, &format!("/cgi-bin/fetch?{address}:9154/healthz")).await;
        assert_eq!(body.as_deref(), Some("error\n"), "an instance reached {other_host}'s agent at {address}");
    }

    // Another tenant's instance reaches nothing of this tenant's on another host.
    let stranger = instances(&other).await[0].clone();
    let victim = *webs.iter().find(|i| i["node"] != stranger["node"]).unwrap();
    let body = get(2, &other_probe_fqdn, &format!("/cgi-bin/fetch?{}:8080/", field(victim, "private_ip"))).await;
    assert_eq!(body.as_deref(), Some("error\n"), "another tenant reached {} across hosts", victim["name"]);

    let size = || std::fs::metadata(&pcap).map_or(0, |m| m.len());
    p.wait("the capture holding traffic between hosts", Duration::from_secs(30), async || size() > 4096).await;
    drop(tcpdump);
    let captured = std::fs::read(&pcap).unwrap();
    for plain in [&b"hello from "[..], b"GET /", b"HTTP/1.1"] {
        assert!(
            !captured.windows(plain.len()).any(|w| w == plain),
            "plaintext {:?} crossed the underlay",
            String::from_utf8_lossy(plain)
        );
    }

    // An instance moves to another host: stopped on its own, then started on the other with its private IP, and
    // every edge reaches it there.
    let mover = webs.iter().find(|i| i["node"] == "h1").expect("a web instance on h1");
    let (name, private_ip) = (field(mover, "name"), field(mover, "private_ip"));
    let path = format!("/v1/instances/{name}");
    let (status, moved) =
        call(&acme, reqwest::Method::POST, &format!("{path}/move"), Some(json!({"node": "h2"}))).await;
    assert_eq!(status, 200, "{moved}");
    p.wait("the moved instance running on h2", Duration::from_secs(60), async || {
        let i = call(&acme, reqwest::Method::GET, &path, None).await.1;
        i["node"] == "h2" && i["state"] == "running" && i["private_ip"] == private_ip.as_str()
    })
    .await;
    for edge in [1, 2] {
        p.wait(&format!("edge {edge} reaching {name} on h2"), Duration::from_secs(60), async || {
            get(edge, &web_fqdn, "/").await.is_some_and(|b| b.split_whitespace().nth(2) == Some(name.as_str()))
        })
        .await;
    }

    // Host 3 dies: its agent is killed and its underlay cut. Its instances come back on the other hosts and every
    // edge serves them again within 30 s.
    let lost = Instant::now();
    for role in ["node3", "dns3"] {
        let mut proc = roles.remove(role).unwrap();
        proc.0.kill().unwrap();
        proc.0.wait().unwrap();
    }
    ip(&["-n", &hosts[2].0, "link", "set", "eth0", "down"]);
    let left = Duration::from_secs(30).saturating_sub(lost.elapsed());
    let t0 = Instant::now();
    loop {
        let now = instances(&acme).await;
        if all_running(&now, 4) && now.as_array().unwrap().iter().all(|i| i["node"] != "h3") {
            break;
        }
        let states: Vec<String> = now
            .as_array()
            .unwrap()
            .iter()
            .map(|i| format!("{} {} on {} ({})", i["name"], i["state"], i["node"], i["state_reason"]))
            .collect();
        assert!(t0.elapsed() < left, "host 3's instances not running elsewhere: {states:#?}\n{}", p.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for edge in [1, 2] {
        let left = Duration::from_secs(30).saturating_sub(lost.elapsed());
        let mut seen = BTreeSet::new();
        p.wait(&format!("edge {edge} serving every instance again"), left, async || {
            if let Some(body) = get(edge, &web_fqdn, "/").await {
                seen.extend(body.split_whitespace().nth(2).map(str::to_owned));
            }
            seen.len() == 3
        })
        .await;
    }

    // Host 3 comes back: its agent removes what the killed one left (namespaces, sandboxes) and rejoins.
    ip(&["-n", &hosts[2].0, "link", "set", "eth0", "up"]);
    let config = std::fs::read_to_string(p.dir.join("h3-node.toml")).unwrap();
    roles.insert("node3".into(), p.start("h3-node-back", Some(&hosts[2]), "node", &config, &[]));
    let back = SocketAddr::from((underlay(3), 9154));
    p.wait("host 3 back", Duration::from_secs(60), async || ready(back).await).await;

    // Nothing is left behind: stopped agents remove their instances' namespaces, and the hosts' namespaces take
    // their devices (TUN, veths, bridges) with them.
    let nodes: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM nodes").fetch_all(store.pool()).await.unwrap();
    let instance_ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM instances").fetch_all(store.pool()).await.unwrap();
    // Every role stops at once (each drop then waits for its own).
    for proc in roles.values() {
        let _ = Command::new("kill").args(["-TERM", &proc.0.id().to_string()]).stderr(Stdio::null()).status();
    }
    drop(roles);
    drop(_api);
    let leg = net.leg.clone();
    drop(net);
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains(&format!("hs{tag}-")), "a host namespace is left: {netns}");
    for node in nodes {
        let prefix = format!("cloud-{}-", &node.simple().to_string()[..8]);
        assert!(!netns.contains(&prefix), "an instance namespace of {node} is left: {netns}\n{}", p.logs());
    }
    // Nothing of the hosts' reached the test's own namespace.
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(": co0:") && !links.contains(&format!(": {leg}@")),
        "left in the test's namespace: {links}"
    );
    for id in instance_ids {
        let veth = format!("cv{}", &id.simple().to_string()[..12]);
        assert!(!links.contains(&format!(": {veth}")), "instance veth {veth} in the test's namespace: {links}");
    }
}
