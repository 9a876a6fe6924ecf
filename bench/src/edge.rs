//! `cloud-bench edge`: our edge beside nginx and haproxy doing the same job on the same machine in one run: TLS
//! termination, HTTP/1.1 and HTTP/2 downstream, keep-alive to one `hello` backend, the same forwarding headers
//! (X-Forwarded-For/-Proto/-Host, Forwarded, X-Real-IP, a request id sent up and back), an access log line per
//! request. h2load drives all three (it lets us pick the SNI); per-request latencies come from its log file, CPU
//! time from `/proc` (user + system time of each proxy's processes over the run, divided by its requests). Runs
//! are repeated (`--runs`, the order rotated each time) and reported as medians with their spread. Then the route
//! table at scale: the same requests with 100k services loaded, the memory a route costs, and create-to-routable.
//!
//! Needs nginx, haproxy and h2load (`apt-get install nginx-light haproxy nghttp2-client`); the backend is the
//! built-in `hello` image's program. Our edge runs in this process with the access log on, as `cloudd` writes it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cloud_domain::api::QuotasPatch;
use cloud_edge::{AccessLog, CertStore, EdgeConfig, LogTarget, ServedCert};
use cloud_store::{ChangeFeed, NewService, Store};

/// One load run's results.
pub(crate) struct Run {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: u64,
    /// Requests that succeeded.
    pub done: u64,
    /// What was negotiated: TLS version, cipher and application protocol.
    tls: String,
}

/// A proxy under test: where it listens and the processes whose CPU time it spends.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    pids: Vec<u32>,
}

pub(crate) fn h2load(
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
    let count = |what: &str| {
        text.lines()
            .find(|l| l.starts_with("requests:"))
            .and_then(|l| l.split(", ").find(|p| p.ends_with(what))?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let (failed, done) = (count("failed"), count("succeeded"));
    let tls = ["TLS Protocol:", "Cipher:", "Application protocol:"]
        .iter()
        .filter_map(|k| text.lines().find(|l| l.starts_with(k))?.split_once(':').map(|(_, v)| v.trim().to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut lat: Vec<u64> =
        std::fs::read_to_string(log)?.lines().filter_map(|l| l.split('\t').nth(2)?.parse().ok()).collect();
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).map_or(0.0, |us| *us as f64 / 1000.0);
    Ok(Run { rps, p50_ms: pct(0.5), p99_ms: pct(0.99), failed, done, tls })
}

/// CPU time (user + system) spent so far by these processes, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // The kernel counts in clock ticks of 1/100 s on Linux (USER_HZ).
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name, which is in parentheses and may hold spaces: utime and stime are
            // fields 14 and 15 of the line, 12 and 13 after the state.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / 100.0
}

/// A process and its children (nginx's master and workers).
fn with_children(pid: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid).chain(children.split_whitespace().filter_map(|c| c.parse().ok())).collect()
}

/// The median of some figures, and their smallest and largest.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    (median, v[0], v[v.len() - 1])
}

/// Waits until something accepts connections at `addr`.
async fn listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{what} does not listen on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
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
    std::fs::write(dir.join("haproxy.pem"), format!("{}{}", cert.pem(), key.serialize_pem()))?;
    Ok(ServedCert::from_pem(vec![name], &cert.pem(), &key.serialize_pem())?)
}

/// nginx as an operator would set it up for this: a worker per core, the access log on (buffered, as is usual
/// in production), keep-alive to the backend, the edge's forwarding headers and request id.
fn nginx_conf(dir: &Path, listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log {d}/nginx-access.log combined buffer=64k flush=1s;\n  keepalive_requests 100000000;\n\
         client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
         upstream backend {{ server {backend}; keepalive 1024; keepalive_requests 100000000; keepalive_timeout 60s; }}\n\
         server {{\n    listen {listen} ssl http2;\n    ssl_protocols TLSv1.2 TLSv1.3;\n\
         ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
         location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
         proxy_set_header Host $host;\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         proxy_set_header Forwarded \"for=$remote_addr;proto=https;host=$host\";\n\
         proxy_set_header X-Real-IP $remote_addr;\n      proxy_set_header X-Forwarded-Proto https;\n\
         proxy_set_header X-Forwarded-Host $host;\n      proxy_set_header X-Request-Id $request_id;\n\
         add_header X-Request-Id $request_id always;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

/// haproxy likewise: a thread per core, a log line per request (to its stdout, a file here), connections to the
/// backend reused, the same headers and request id, and the cipher the others negotiate (its default prefers
/// AES-256).
fn haproxy_conf(dir: &Path, listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "global\n  nbthread 2\n  maxconn 4096\n  log stdout format raw local0\n\
         ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256\n\
         defaults\n  mode http\n  log global\n  option httplog\n  http-reuse always\n\
         timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n\
         frontend edge\n  bind {listen} ssl crt {d}/haproxy.pem alpn h2,http/1.1\n\
         unique-id-format %[uuid()]\n  unique-id-header X-Request-Id\n  option forwardfor\n\
         http-request set-header X-Real-IP %[src]\n  http-request set-header X-Forwarded-Proto https\n\
         http-request set-header X-Forwarded-Host %[req.hdr(host)]\n\
         http-request set-header Forwarded for=%[src];proto=https;host=%[req.hdr(host)]\n\
         http-response set-header X-Request-Id %[unique-id]\n  default_backend hello\n\
         backend hello\n  server hello {backend}\n",
        d = dir.display()
    )
}

/// Logs as `cloudd` does in production (the edge's access log on at `info`, one line written per event), into
/// a file instead of stderr.
fn log_as_cloudd_does(file: &Path) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLOUD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hickory_server=warn"));
    let writer = std::sync::Mutex::new(std::fs::File::create(file)?);
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(false).init();
    Ok(())
}

async fn start_edge(store: &Store, certs: Arc<CertStore>, dir: &Path) -> anyhow::Result<cloud_edge::EdgeHandle> {
    let config = EdgeConfig {
        https_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        ports_ip: "127.0.0.1".parse()?,
        access_log: AccessLog { target: LogTarget::File(dir.join("edge-access.log")), json: false },
        ..EdgeConfig::default()
    };
    let feed = ChangeFeed::start(store.clone()).await?;
    Ok(cloud_edge::start(store.clone(), feed, certs, config).await?)
}

pub async fn run(seconds: u64, connections: usize, routes: usize, runs: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cloud-bench-edge-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    log_as_cloudd_does(&dir.join("edge.log"))?;
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
    let new = |name: &str| NewService { ports: ports.clone(), ..NewService::named(name) };
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
    let edge = start_edge(&store, certs.clone(), &dir).await?;
    let free = || -> anyhow::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())))
    };
    let (nginx_addr, haproxy_addr) = (free()?, free()?);
    std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, nginx_addr, backend))?;
    std::fs::write(dir.join("haproxy.cfg"), haproxy_conf(&dir, haproxy_addr, backend))?;
    let mut nginx = Command::new("nginx")
        .args(["-p", &dir.display().to_string(), "-c", &dir.join("nginx.conf").display().to_string()])
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting nginx (apt-get install nginx-light)")?;
    let mut haproxy = Command::new("haproxy")
        .args(["-f", &dir.join("haproxy.cfg").display().to_string()])
        .stdout(std::fs::File::create(dir.join("haproxy-access.log"))?)
        .spawn()
        .context("starting haproxy (apt-get install haproxy)")?;
    listening(nginx_addr, "nginx").await?;
    listening(haproxy_addr, "haproxy").await?;
    let targets = [
        Target { name: "edge", addr: edge.https_addr(), pids: vec![std::process::id()] },
        Target { name: "nginx", addr: nginx_addr, pids: with_children(nginx.id()) },
        Target { name: "haproxy", addr: haproxy_addr, pids: vec![haproxy.id()] },
    ];
    let url = format!("https://{}/", svc.fqdn);

    println!(
        "edge vs nginx {} and haproxy {} on {} cores: {connections} connections, {seconds} s per run, {runs} runs \
         (order rotated), hello backend, access logs on",
        nginx_version(),
        haproxy_version(),
        cores()
    );
    println!(
        "{:<30} {:>9} {:>8} {:>8} {:>10} {:>7}  negotiated",
        "run", "req/s", "p50 ms", "p99 ms", "CPU us/req", "failed"
    );
    let protocols = [("HTTP/1.1 over TLS", false), ("HTTP/2 over TLS", true)];
    // results[protocol][target]: one (req/s, p99 ms, CPU us/request) per run.
    let mut results = vec![vec![Vec::new(); targets.len()]; protocols.len()];
    for run in 0..runs {
        for (p, (label, h2)) in protocols.iter().enumerate() {
            let mut negotiated = Vec::new();
            for k in 0..targets.len() {
                let t = &targets[(run + k) % targets.len()];
                let i = (run + k) % targets.len();
                let cpu = cpu_seconds(&t.pids);
                let r = h2load(t.addr, &url, *h2, connections, seconds, &dir.join(format!("{}.log", t.name)))?;
                let cpu_us = (cpu_seconds(&t.pids) - cpu) * 1e6 / r.done.max(1) as f64;
                println!(
                    "{:<30} {:>9.0} {:>8.2} {:>8.2} {:>10.1} {:>7}  {}",
                    format!("{}. {label}, {}", run + 1, t.name),
                    r.rps,
                    r.p50_ms,
                    r.p99_ms,
                    cpu_us,
                    r.failed,
                    r.tls
                );
                negotiated.push(r.tls.clone());
                results[p][i].push((r.rps, r.p99_ms, cpu_us));
            }
            if negotiated.iter().any(|n| *n != negotiated[0]) {
                bail!("the proxies negotiated different TLS parameters or protocols: {negotiated:?}");
            }
        }
    }
    println!("medians of {runs} runs (smallest-largest):");
    let mut small_h1_rps = 0.0;
    for (p, (label, _)) in protocols.iter().enumerate() {
        let stat = |i: usize, f: fn(&(f64, f64, f64)) -> f64| spread(results[p][i].iter().map(f).collect());
        for (i, t) in targets.iter().enumerate() {
            let (rps, rps_lo, rps_hi) = stat(i, |r| r.0);
            let (p99, p99_lo, p99_hi) = stat(i, |r| r.1);
            let (cpu, cpu_lo, cpu_hi) = stat(i, |r| r.2);
            println!(
                "  {label}, {}: {rps:.0} req/s ({rps_lo:.0}-{rps_hi:.0}), p99 {p99:.2} ms ({p99_lo:.2}-{p99_hi:.2}), \
                 CPU {cpu:.1} us/req ({cpu_lo:.1}-{cpu_hi:.1})",
                t.name
            );
        }
        let (edge_rps, edge_p99, edge_cpu) = (stat(0, |r| r.0).0, stat(0, |r| r.1).0, stat(0, |r| r.2).0);
        if p == 0 {
            small_h1_rps = edge_rps;
        }
        for (i, t) in targets.iter().enumerate().skip(1) {
            println!(
                "  ratio edge/{}, {label}: throughput {:.2}x, p99 latency {:.2}x, CPU per request {:.2}x",
                t.name,
                edge_rps / stat(i, |r| r.0).0,
                edge_p99 / stat(i, |r| r.1).0.max(0.001),
                edge_cpu / stat(i, |r| r.2).0.max(0.001),
            );
        }
    }
    // SIGTERM, not SIGKILL: a killed nginx master leaves its workers running.
    for child in [&mut nginx, &mut haproxy] {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let _ = child.wait();
    }

    // The route table at scale: many services, then the same requests, memory per route, create-to-routable.
    let small = edge.table().len();
    edge.shutdown().await;
    cloud_tests::insert_services(&store, tenant.id, routes as i64, &format!("00000000.{zone}")).await?;
    sqlx::query(
        "INSERT INTO service_ports (service_id, port, destination_port, handlers)
         SELECT id, 443, 8080, ARRAY['tls', 'http'] FROM services WHERE name LIKE 's%' AND tenant_id = $1",
    )
    .bind(tenant.id)
    .execute(store.pool())
    .await?;
    crate::heap::start();
    let t0 = Instant::now();
    let data = store.route_data().await?;
    let read = t0.elapsed();
    let table = cloud_edge::RouteTable::load(data, None);
    let built = t0.elapsed() - read;
    let per_route = crate::heap::stop() as f64 / table.len() as f64;
    drop(table);
    let edge = start_edge(&store, certs, &dir).await?;
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
        "route table load: {:.0} ms reading, {:.0} ms building; ~{per_route:.0} bytes per route (heap)",
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

fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_default()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
