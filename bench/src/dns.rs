//! `cloud-bench dns`: our authoritative DNS against Knot DNS serving the same public zone, both queried by
//! dnsperf with the same query list on loopback in one run. Reports QPS and latency ratios, and memory per record.
//! Needs `knotd` and `dnsperf` (Debian packages `knot` and `dnsperf`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use cloud_domain::api::QuotasPatch;

/// What dnsperf measured.
struct Run {
    qps: f64,
    avg_ms: f64,
    lost: String,
}

fn dnsperf(addr: SocketAddr, queries: &Path, seconds: u64) -> anyhow::Result<Run> {
    let out = Command::new("dnsperf")
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-l", &seconds.to_string()])
        .args(["-c", "4", "-Q", "200000", "-d"])
        .arg(queries)
        .output()
        .context("running dnsperf (apt-get install dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let find = |key: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    };
    let qps = find("Queries per second").and_then(|v| v.parse().ok()).context(format!("dnsperf output: {text}"))?;
    let avg = find("Average Latency (s)").and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(Run { qps, avg_ms: avg * 1000.0, lost: find("Queries lost").unwrap_or_default() })
}

pub async fn run(names: usize, seconds: u64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cloud-bench-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = cloud_tests::fresh_store().await;
    let settings = store.settings().clone();
    let zone = settings.zone();
    let tenant = store.create_tenant("bench", QuotasPatch::default()).await?;
    // Services inserted in bulk: the API's per-request cost is not what this measures.
    cloud_tests::insert_services(&store, tenant.id, names as i64, &format!("00000000.{zone}")).await?;
    let mut queries = String::new();
    for i in 0..names.min(100_000) {
        let n = (i * 7919) % names + 1;
        queries.push_str(&format!("s{n}-00000000.{zone} A\n"));
    }
    let query_file = dir.join("queries.txt");
    std::fs::write(&query_file, queries)?;

    // Knot with the same zone.
    let mut zonefile = format!(
        "$ORIGIN {zone}.\n$TTL 60\n@ 3600 SOA ns1 hostmaster 1 3600 600 86400 10\n@ 3600 NS ns1\nns1 A 127.0.0.1\n"
    );
    for i in 1..=names {
        zonefile.push_str(&format!("s{i}-00000000 A 127.0.0.1\n"));
    }
    std::fs::write(dir.join("zone"), zonefile)?;
    let knot_port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n  rundir: {d}\n  listen: 127.0.0.1@{knot_port}\n  background-workers: 1\n  udp-workers: 2\n  tcp-workers: 1\n\
             database:\n  storage: {d}\nzone:\n  - domain: {zone}\n    storage: {d}\n    file: zone\n    journal-content: none\n",
            d = dir.display()
        ),
    )?;
    let mut knot = Command::new("knotd")
        .arg("-c")
        .arg(dir.join("knot.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting knotd (apt-get install knot)")?;
    let knot_addr: SocketAddr = format!("127.0.0.1:{knot_port}").parse()?;

    let before = cloud_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0);
    let feed = cloud_store::ChangeFeed::start(store.clone()).await?;
    let config =
        cloud_dns::DnsConfig { public_listen: vec!["127.0.0.1:0".parse()?], rate_limit: None, ..Default::default() };
    let ours = cloud_dns::start(store, feed, config).await?;
    let ours_addr = ours.public_addrs()[0];
    let ours_kb = cloud_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0).saturating_sub(before);

    // Both answer before measuring.
    let probe = dir.join("probe.txt");
    std::fs::write(&probe, format!("s1-00000000.{zone} A\n"))?;
    let mut ready = false;
    for _ in 0..100 {
        if dnsperf(knot_addr, &probe, 1).is_ok_and(|r| r.qps > 0.0) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !ready {
        let _ = knot.kill();
        bail!("knotd did not answer on {knot_addr}");
    }
    let knot_kb = cloud_tests::proc_status_kib(knot.id(), "VmRSS").unwrap_or(0);

    // The servers take turns with the machine's two cores; dnsperf runs on them too, alike for both.
    let ours_run = dnsperf(ours_addr, &query_file, seconds)?;
    let knot_run = dnsperf(knot_addr, &query_file, seconds)?;
    let _ = knot.kill();
    let _ = knot.wait();
    ours.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    println!("authoritative DNS, {names} service names, dnsperf {seconds}s each, UDP on loopback");
    println!("| | QPS | avg latency ms | lost | RSS for the zone |");
    println!("|---|---|---|---|---|");
    println!(
        "| ours | {:.0} | {:.3} | {} | {} KiB ({:.0} B per name) |",
        ours_run.qps,
        ours_run.avg_ms,
        ours_run.lost,
        ours_kb,
        ours_kb as f64 * 1024.0 / names as f64
    );
    println!(
        "| Knot DNS {} | {:.0} | {:.3} | {} | {} KiB ({:.0} B per name, whole process) |",
        knot_version(),
        knot_run.qps,
        knot_run.avg_ms,
        knot_run.lost,
        knot_kb,
        knot_kb as f64 * 1024.0 / names as f64
    );
    println!(
        "| ratio (ours / Knot) | {:.2}x | {:.2}x | | |",
        ours_run.qps / knot_run.qps,
        ours_run.avg_ms / knot_run.avg_ms.max(1e-9)
    );
    Ok(())
}

fn knot_version() -> String {
    Command::new("knotd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().last().map(str::to_owned))
        .unwrap_or_default()
}
