//! How the DNS scales with 100k services and 100k instances: load and build time of the first snapshot, the memory
//! it takes, the time from a change to it being served (through the incremental patch path), and a rough
//! single-machine UDP query rate.
//!
//! Not a pass/fail test (ignored by default); run it in release and read the numbers:
//! `cargo test -p cloud-dns --release --test scale -- --ignored --nocapture`. Results are recorded in docs/dns.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cloud_dns::DnsConfig;
use cloud_domain::api::QuotasPatch;
use cloud_store::{ChangeFeed, NewService, Settings};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;

const N: i64 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: run it in release with --ignored --nocapture"]
async fn load_patch_and_query_rate_with_100k_names() {
    let settings = Settings { tenant_pool: "10.0.0.0/8".parse().unwrap(), tenant_prefix: 12, ..Settings::default() };
    let store = cloud_tests::fresh_store_with(settings).await;
    let tenant = store
        .create_tenant("acme", QuotasPatch { max_services: Some(N as u32 + 1000), ..QuotasPatch::default() })
        .await
        .unwrap();
    let base: std::net::Ipv4Addr = tenant.network.split('/').next().unwrap().parse().unwrap();
    let inserted = Instant::now();
    cloud_tests::insert_services(&store, tenant.id, N, "abcdefgh.dev.cloud.localhost").await.unwrap();
    sqlx::query(
        "INSERT INTO instances (id, tenant_id, service_id, image_id, image_digest, name, memory_mb, restart_policy,
                                desired_state, state, private_ip, port)
         SELECT gen_random_uuid(), $1, s.id, img.id, img.digest, 'i' || s.name, 64, 'never', 'running', 'running',
                $3::inet + row_number() OVER (), img.port
         FROM services s, (SELECT id, digest, port FROM images WHERE tenant_id IS NULL LIMIT 1) img
         WHERE s.tenant_id = $1 LIMIT $2",
    )
    .bind(tenant.id)
    .bind(N)
    .bind(std::net::IpAddr::V4(base))
    .execute(store.pool())
    .await
    .unwrap();
    println!("inserted {N} services and {N} instances in {:?}", inserted.elapsed());

    let loaded = Instant::now();
    let data = store.zone_data().await.unwrap();
    println!(
        "zone_data(): {:?} ({} services, {} instances)",
        loaded.elapsed(),
        data.services.len(),
        data.instances.len()
    );
    drop(data);

    let rss_before = cloud_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0);
    let feed = ChangeFeed::start(store.clone()).await.unwrap();
    let config = DnsConfig {
        public_listen: vec!["127.0.0.1:0".parse().unwrap()],
        private_listen: vec![],
        rate_limit: None,
        // No periodic full load in the middle of the measurements.
        resync_interval: Duration::from_secs(3600),
        ..DnsConfig::default()
    };
    let started = Instant::now();
    let dns = cloud_dns::start(store.clone(), feed, config).await.unwrap();
    println!("start (load + build): {:?}", started.elapsed());
    println!(
        "RSS growth with the snapshot: {} MiB",
        (cloud_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0).saturating_sub(rss_before)) / 1024
    );

    let metric = |text: &str, series: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
    };
    let loads_before = metric(&dns.metrics_text(), "dns_snapshot_loads_total{result=\"ok\"}");
    let changed = Instant::now();
    store.create_service(tenant.id, NewService::named("late")).await.unwrap();
    dns.wait_for_version(store.current_version().await.unwrap()).await;
    println!("change to served (one new service, commit included): {:?}", changed.elapsed());

    // One change at a time, each waited for: what a tenant creating services one after another sees.
    let rounds = 200;
    let (mut total, mut after_return) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for i in 0..rounds {
        let new = NewService::named(format!("late{i}"));
        let started = Instant::now();
        store.create_service(tenant.id, new).await.unwrap();
        let returned = Instant::now();
        dns.wait_for_version(store.current_version().await.unwrap()).await;
        total.push(started.elapsed());
        after_return.push(returned.elapsed());
    }
    for (what, waits) in [("from the API call", &mut total), ("from the API call's return", &mut after_return)] {
        waits.sort();
        println!(
            "{rounds} more services one by one, change to served {what}: p50 {:?}, p99 {:?}, max {:?}",
            waits[rounds / 2],
            waits[rounds * 99 / 100],
            waits[rounds - 1]
        );
    }
    // An instance stopping: `<service>.internal` loses its address (private view of a tenant with 100k names).
    let started = Instant::now();
    store.stop_instance(tenant.id, "is2").await.unwrap();
    dns.wait_for_version(store.current_version().await.unwrap()).await;
    println!("change to served (an instance stopping): {:?}", started.elapsed());
    let metrics = dns.metrics_text();
    println!(
        "full loads after start: {}, patches: {}",
        metric(&metrics, "dns_snapshot_loads_total{result=\"ok\"}") - loads_before,
        metric(&metrics, "dns_snapshot_patches_total{result=\"ok\"}")
    );

    let server: SocketAddr = dns.public_addrs()[0];
    let answered = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_secs(5);
    let clients = 8;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            sock.connect(server).await.unwrap();
            let mut buf = vec![0u8; 1500];
            let mut i = c;
            while t0.elapsed() < run_for {
                let mut m = Message::query();
                let name = format!("s{}-abcdefgh.dev.cloud.localhost.", i % N as usize + 1);
                m.add_query(Query::query(Name::from_ascii(&name).unwrap(), RecordType::A));
                sock.send(&m.to_vec().unwrap()).await.unwrap();
                if tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await.is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                i += clients;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let qps = answered.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    println!("UDP, {clients} closed-loop clients in-process on the same cores: {qps:.0} answers/s");
    let metrics = dns.metrics_text();
    let shown = [
        "dns_snapshot_load_seconds_sum",
        "dns_snapshot_patch_seconds_sum",
        "dns_snapshot_patch_seconds_count",
        "dns_zone_records",
    ];
    for line in metrics.lines().filter(|l| shown.iter().any(|s| l.starts_with(s))) {
        println!("{line}");
    }
    dns.shutdown().await;
}
