//! `cloud-bench edge`: our edge beside nginx doing the same job on the same machine in one run: TLS termination,
//! HTTP/1.1 and HTTP/2 downstream, keep-alive to one `hello` backend, X-Forwarded-* headers. h2load drives both
//! (it lets us pick the SNI); per-request latencies come from its log file. Then the route table at scale: the
//! same requests with 100k services loaded, the memory a route costs, and create-to-routable latency.
//!
//! Needs nginx and h2load (`apt-get install nginx-light nghttp2-client`); the backend is the built-in `hello` image's program.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cloud_domain::api::QuotasPatch;
use cloud_edge::{CertStore, EdgeConfig, ServedCert};
use cloud_store::{ChangeFeed, NewService, Store};

/// One load run's results.
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
}

fn h2load(
    target: SocketAddr,
    url: &str,
    h2: bool,
    connections: usize,
    seconds: u64,
    log: &Path,
) -> anyhow::Result<Run> {
    let mut cmd = Command::new("h2load");
    cmd.args(["-t", "2", "-c", &connections.to_string(), "-D", &seconds.to_string()])
        .arg(format!("--connect-to={target}"))
        .arg(format!("--log-file={}", log.display()));
    if h2 {
        cmd.args(["-m", "8"]);
    } else {
        cmd.arg("--h1");
    }
    let out =
        cmd.arg(url).stderr(Stdio::inherit()).output().context("running h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1)?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("h2load said: {text}"))?;
    let failed = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with("failed"))?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mut lat: Vec<u64> =
        std::fs::read_to_string(log)?.lines().filter_map(|l| l.split('\t').nth(2)?.parse().ok()).collect();
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).map_or(0.0, |us| *us as f64 / 1000.0);
    Ok(Run { rps, p50_ms: pct(0.5), p99_ms: pct(0.99), failed })
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A CA and the wildcard of the zone, as PEM files for nginx and parsed for our edge.
fn wildcard(zone: &str, dir: &Path) -> anyhow::Result<ServedCert> {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};
    let dn = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = dn("bench CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let name = format!("*.{zone}");
    let mut leaf = CertificateParams::new(vec![name.clone()])?;
    leaf.distinguished_name = dn(&name);
    let cert = leaf.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(ServedCert::from_pem(vec![name], &cert.pem(), &key.serialize_pem())?)
}

fn nginx_conf(dir: &Path, listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
         upstream backend {{ server {backend}; keepalive 64; }}\n\
         server {{\n    listen {listen} ssl http2;\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
         location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
         proxy_set_header Host $host;\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         proxy_set_header X-Forwarded-Proto https;\n      proxy_set_header X-Request-Id $request_id;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

async fn start_edge(store: &Store, certs: Arc<CertStore>) -> anyhow::Result<cloud_edge::EdgeHandle> {
    let config = EdgeConfig {
        https_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        ports_ip: "127.0.0.1".parse()?,
        ..EdgeConfig::default()
    };
    let feed = ChangeFeed::start(store.clone()).await?;
    Ok(cloud_edge::start(store.clone(), feed, certs, config).await?)
}

pub async fn run(seconds: u64, connections: usize, routes: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cloud-bench-edge-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = cloud_tests::fresh_store().await;
    let zone = store.settings().zone();
    let quotas = QuotasPatch { max_services: Some(u32::MAX / 2), ..QuotasPatch::default() };
    let tenant = store.create_tenant("bench", quotas).await?;

    // The backend both proxies share: the built-in hello, on loopback.
    let backend_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
    let mut hello = Command::new(crate::hello_program()?)
        .env("PORT", backend_port.to_string())
        .env("PRIVATE_IP", "127.0.0.1")
        .env("INSTANCE", "bench-1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the hello program")?;
    let ports = cloud_domain::ports::parse_specs(&[format!("443:{backend_port}")], &Default::default())?;
    let new = |name: &str| NewService {
        name: Some(name.into()),
        ports: ports.clone(),
        soft_limit: None,
        hard_limit: None,
        scale_to_zero_after: None,
        domains: vec![],
        persistent: true,
    };
    let svc = store.create_service(tenant.id, new("bench")).await?;
    // The instance the node agent would run, recorded as running at the backend's address.
    sqlx::query(
        "INSERT INTO instances (id, tenant_id, service_id, image_id, image_digest, name, memory_mb, restart_policy,
                                desired_state, state, private_ip, port)
         SELECT gen_random_uuid(), $1, $2, id, digest, 'bench-1', 128, 'never', 'running', 'running', '127.0.0.1', port
         FROM images WHERE name = 'hello' AND tenant_id IS NULL",
    )
    .bind(tenant.id)
    .bind(svc.id)
    .execute(store.pool())
    .await?;

    let certs = Arc::new(CertStore::default());
    certs.replace(vec![wildcard(&zone, &dir)?]);
    let edge = start_edge(&store, certs.clone()).await?;
    let nginx_addr =
        SocketAddr::from(([127, 0, 0, 1], std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()));
    std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, nginx_addr, backend))?;
    let mut nginx = Command::new("nginx")
        .args([
            "-p",
            &dir.display().to_string(),
            "-c",
            &dir.join("nginx.conf").display().to_string(),
            "-g",
            "daemon off;",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting nginx (apt-get install nginx-light)")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = format!("https://{}/", svc.fqdn);

    println!(
        "edge vs nginx {} on {} cores: {connections} connections, {seconds} s per run, hello backend",
        nginx_version(),
        cores()
    );
    println!("{:<28} {:>10} {:>9} {:>9} {:>7}", "run", "req/s", "p50 ms", "p99 ms", "failed");
    let mut ratios = Vec::new();
    let mut small_h1_rps = 0.0;
    for (label, h2) in [("HTTP/1.1 over TLS", false), ("HTTP/2 over TLS", true)] {
        let ours = h2load(edge.https_addr(), &url, h2, connections, seconds, &dir.join("ours.log"))?;
        let theirs = h2load(nginx_addr, &url, h2, connections, seconds, &dir.join("nginx.log"))?;
        for (who, r) in [("edge", &ours), ("nginx", &theirs)] {
            println!(
                "{:<28} {:>10.0} {:>9.2} {:>9.2} {:>7}",
                format!("{label}, {who}"),
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.failed
            );
        }
        if !h2 {
            small_h1_rps = ours.rps;
        }
        ratios.push((label, ours.rps / theirs.rps, ours.p99_ms / theirs.p99_ms.max(0.001)));
    }
    for (label, rps, p99) in &ratios {
        println!("ratio edge/nginx, {label}: throughput {rps:.2}x, p99 latency {p99:.2}x");
    }
    // SIGTERM, not SIGKILL: a killed master leaves its workers running.
    let _ = Command::new("kill").args(["-TERM", &nginx.id().to_string()]).status();
    let _ = nginx.wait();

    // The route table at scale: many services, then the same requests, memory per route, create-to-routable.
    let small = edge.table().len();
    edge.shutdown().await;
    sqlx::query(
        "INSERT INTO services (id, tenant_id, name, fqdn)
         SELECT gen_random_uuid(), $1, 's' || i, 's' || i || '-00000000.' || $2 FROM generate_series(1, $3) AS i",
    )
    .bind(tenant.id)
    .bind(&zone)
    .bind(routes as i64)
    .execute(store.pool())
    .await?;
    sqlx::query(
        "INSERT INTO service_ports (service_id, port, destination_port, handlers)
         SELECT id, 443, 8080, ARRAY['tls', 'http'] FROM services WHERE name LIKE 's%' AND tenant_id = $1",
    )
    .bind(tenant.id)
    .execute(store.pool())
    .await?;
    let before = rss_kb();
    let t0 = Instant::now();
    let data = store.route_data().await?;
    let read = t0.elapsed();
    let table = cloud_edge::RouteTable::load(data, None);
    let built = t0.elapsed() - read;
    let per_route = (rss_kb().saturating_sub(before) * 1024) as f64 / table.len() as f64;
    drop(table);
    let edge = start_edge(&store, certs).await?;
    let big = edge.table().len();
    let scaled = h2load(edge.https_addr(), &url, false, connections, seconds, &dir.join("big.log"))?;
    println!(
        "route table: {big} services: HTTP/1.1 {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms (vs {small} services: {:.2}x throughput)",
        scaled.rps,
        scaled.p50_ms,
        scaled.p99_ms,
        scaled.rps / small_h1_rps.max(1.0),
    );
    println!(
        "route table load: {:.0} ms reading, {:.0} ms building; ~{per_route:.0} bytes per route (RSS)",
        read.as_secs_f64() * 1000.0,
        built.as_secs_f64() * 1000.0
    );

    // Create-to-routable with the big table: a service created through the store, until the edge routes it.
    let mut lat = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        let s = store.create_service(tenant.id, new(&format!("late{i}"))).await?;
        while edge.table().by_host(&s.fqdn).is_none() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{} never became routable", s.fqdn);
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "create-to-routable with {big} services: median {:.1} ms, max {:.1} ms (20 services)",
        lat[10].as_secs_f64() * 1000.0,
        lat[19].as_secs_f64() * 1000.0
    );
    edge.shutdown().await;
    let _ = hello.kill();
    let _ = hello.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().trim_start_matches("nginx version: ").to_owned())
        .unwrap_or_default()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
