//! `cloud-bench hosts`: what the overlay between hosts costs a request. Two hosts as network namespaces on an
//! underlay switch, each running `cloudd node` against one PostgreSQL; host 1 also runs `cloudd edge`. One service
//! has its instance on host 1 (beside the edge), another on host 2 (behind the overlay); h2load drives both
//! through the same edge over HTTPS, alternately, `runs` times each, and the medians are compared.
//!
//! Needs root, h2load (`apt-get install nghttp2-client`) and a release `cloudd` beside this binary:
//! `cargo build --release -p cloudd -p cloud-bench && sudo target/release/cloud-bench hosts`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use cloud_tests::hosts::{Proc, Roles, Underlay, ready};
use serde_json::{Value, json};

pub async fn run(seconds: u64, connections: usize, runs: usize) -> anyhow::Result<()> {
    let cloudd = std::env::current_exe()?.with_file_name("cloudd");
    if !cloudd.exists() {
        bail!("{} is missing: cargo build --release -p cloudd", cloudd.display());
    }
    let dir = std::env::temp_dir().join(format!("cloud-bench-hosts-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let net = Underlay::build(&format!("hb{}", std::process::id() % 10_000), 2);

    // One PostgreSQL, migrated, relayed onto the underlay for the hosts.
    let direct = cloud_tests::fresh_database().await;
    let store = cloud_store::Store::new(cloud_store::connect(&direct, 2).await?, Default::default());
    store.migrate().await?;
    let opts = store.pool().connect_options();
    let pg = SocketAddr::new(opts.get_host().parse()?, opts.get_port());
    let relay = cloud_tests::relay::Relay::start_on(SocketAddr::from((Underlay::leg_address(), 0)), pg).await;
    let key_file = dir.join("secret.key");
    std::fs::write(&key_file, "b3".repeat(32))?;
    let roles = Roles {
        cloudd: cloudd.clone(),
        dir: dir.clone(),
        url: direct.replacen(&pg.to_string(), &relay.addr.to_string(), 1),
        key_file: key_file.clone(),
        pool: "10.190.0.0/16".into(),
    };

    let api_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let api = format!("http://127.0.0.1:{api_port}");
    // Plain HTTP, as behind a TLS proxy: the API's own TLS is the roles test's and the README's.
    let api_env = [("CLOUD_API_LISTEN", format!("127.0.0.1:{api_port}")), ("CLOUD_API_TLS", "off".into())];
    let _api = roles.start("api", None, "api", "", &api_env);
    roles.wait("the API ready", Duration::from_secs(60), async || ready(([127, 0, 0, 1], api_port).into()).await).await;
    let out = Command::new(&cloudd)
        .args(["bootstrap", "--tenant", "bench"])
        .env("DATABASE_URL", &direct)
        .env("CLOUD_SECRET_KEY_FILE", &key_file)
        .env("CLOUD_TENANT_POOL", &roles.pool)
        .output()?;
    if !out.status.success() {
        bail!("cloudd bootstrap: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    let client = reqwest::Client::new();
    let post = async |path: &str, body: Value| -> anyhow::Result<Value> {
        let res = client.post(format!("{api}{path}")).bearer_auth(&token).json(&body).send().await?;
        if res.status() != 201 {
            bail!("POST {path}: {}", res.text().await?);
        }
        Ok(res.json().await?)
    };
    // Host 2 offers more memory: once it is up, the scheduler places everything new there, behind the overlay.
    let node = |i: u8| {
        let addr = Underlay::address(i);
        let config = format!(
            "[node]\nname = \"h{i}\"\nstate_dir = \"{}\"\nmemory_mb = {}\nops_listen = \"{addr}:9154\"\n\
             underlay_address = \"{addr}\"\n",
            dir.join(format!("h{i}-state")).display(),
            4096 * u32::from(i)
        );
        (roles.start(&format!("h{i}-node"), Some(&net.hosts[usize::from(i) - 1]), "node", &config, &[]), addr)
    };
    let running_on = async |name: &str, host: &str| {
        let res = client.get(format!("{api}/v1/instances/{name}")).bearer_auth(&token).send().await;
        let Ok(res) = res else { return false };
        let v: Value = res.json().await.unwrap_or_default();
        v["state"] == "running" && v["node"] == host
    };

    // The near instance first, while host 1 is the only host; then host 2, which takes the far one.
    let (_n1, a1) = node(1);
    roles.wait("host 1 ready", Duration::from_secs(60), async || ready((a1, 9154).into()).await).await;
    let near = post("/v1/services", json!({"name": "near", "ports": ["443:8080"]})).await?;
    post("/v1/instances", json!({"image": "hello", "service": "near", "name": "near-1"})).await?;
    roles.wait("near-1 running on h1", Duration::from_secs(60), async || running_on("near-1", "h1").await).await;
    let (_n2, a2) = node(2);
    roles.wait("host 2 ready", Duration::from_secs(60), async || ready((a2, 9154).into()).await).await;
    let far = post("/v1/services", json!({"name": "far", "ports": ["443:8080"]})).await?;
    post("/v1/instances", json!({"image": "hello", "service": "far", "name": "far-1"})).await?;
    roles.wait("far-1 running on h2", Duration::from_secs(60), async || running_on("far-1", "h2").await).await;
    let edge_config = format!("[edge]\nports_ip = \"{a1}\"\nops_listen = \"{a1}:9156\"\n");
    let env = [("CLOUD_EDGE_HTTPS_LISTEN", format!("{a1}:443")), ("CLOUD_EDGE_HTTP_LISTEN", format!("{a1}:80"))];
    let _edge: Proc = roles.start("h1-edge", Some(&net.hosts[0]), "edge", &edge_config, &env);
    roles.wait("the edge ready", Duration::from_secs(60), async || ready((a1, 9156).into()).await).await;
    let edge = SocketAddr::from((a1, 443));
    let fqdn = |s: &Value| s["fqdn"].as_str().unwrap_or_default().to_owned();
    let (near, far) = (fqdn(&near), fqdn(&far));
    for name in [&near, &far] {
        // h2load checks no certificate either: what is measured is the path, not the trust.
        let via = reqwest::Client::builder().danger_accept_invalid_certs(true).resolve(name, edge).build()?;
        let serves = async || via.get(format!("https://{name}/")).send().await.is_ok_and(|r| r.status() == 200);
        roles.wait(&format!("the edge serving {name}"), Duration::from_secs(60), serves).await;
    }

    let log = dir.join("h2load.log");
    let (mut near_runs, mut far_runs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for (name, into) in [(&near, &mut near_runs), (&far, &mut far_runs)] {
            let run = crate::edge::h2load(edge, &format!("https://{name}/"), false, connections, seconds, &log)?;
            if run.failed > 0 {
                bail!("{} of {} requests to {name} failed", run.failed, run.failed + run.done);
            }
            into.push(run);
        }
    }
    let median = |runs: &[crate::edge::Run], f: fn(&crate::edge::Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (near_rps, far_rps) = (median(&near_runs, |r| r.rps), median(&far_runs, |r| r.rps));
    let (near_p99, far_p99) = (median(&near_runs, |r| r.p99_ms), median(&far_runs, |r| r.p99_ms));
    let (near_p50, far_p50) = (median(&near_runs, |r| r.p50_ms), median(&far_runs, |r| r.p50_ms));
    println!(
        "edge to instance, HTTPS h1 keep-alive, {connections} connections, {seconds} s x {runs} runs each, medians:"
    );
    println!("  same host:    {near_rps:>9.0} req/s   p50 {near_p50:.2} ms   p99 {near_p99:.2} ms");
    println!("  other host:   {far_rps:>9.0} req/s   p50 {far_p50:.2} ms   p99 {far_p99:.2} ms");
    println!("  other/same:   {:.2}x throughput, {:.2}x p99", far_rps / near_rps, far_p99 / near_p99);

    // A new instance on host 2: when the edge on host 1 first serves it, against when the API says it runs.
    let fresh = fqdn(&post("/v1/services", json!({"name": "fresh", "ports": ["443:8080"]})).await?);
    let via = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve(&fresh, edge)
        .timeout(Duration::from_secs(1))
        .build()?;
    let created = std::time::Instant::now();
    post("/v1/instances", json!({"image": "hello", "service": "fresh", "name": "fresh-1"})).await?;
    let (mut running, mut served) = (None, None);
    while (running.is_none() || served.is_none()) && created.elapsed() < Duration::from_secs(60) {
        if running.is_none() && running_on("fresh-1", "h2").await {
            running = Some(created.elapsed());
        }
        if served.is_none() && via.get(format!("https://{fresh}/")).send().await.is_ok_and(|r| r.status() == 200) {
            served = Some(created.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (running, served) = (running.context("fresh-1 never ran")?, served.context("fresh-1 never served")?);
    println!(
        "  a new instance on the other host: running {:.0} ms after its creation, served through the edge {:.0} ms \
         after it was running",
        running.as_secs_f64() * 1000.0,
        (served.as_secs_f64() - running.as_secs_f64()) * 1000.0
    );
    let stats = |i: u8| {
        let url = format!("http://{}:9154/metrics", Underlay::address(i));
        let client = client.clone();
        async move {
            let text = client.get(url).send().await.ok()?.text().await.ok()?;
            Some(
                text.lines()
                    .filter(|l| l.starts_with("cloud_node_overlay_packets_total"))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        }
    };
    println!("  overlay, host 2: {}", stats(2).await.context("host 2's metrics")?);
    Ok(())
}
