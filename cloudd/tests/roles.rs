//! Roles run as their own `cloudd` processes on a shared PostgreSQL, as production runs them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Role(Child);

impl Drop for Role {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn cloudd_dns_serves_the_zone_and_its_operations_endpoints() {
    let url = cloud_tests::fresh_database().await;
    let (dns_port, ops_port) = (free_port(), free_port());
    let _dns = Role(
        Command::new(env!("CARGO_BIN_EXE_cloudd"))
            .arg("dns")
            .env("DATABASE_URL", &url)
            .env("CLOUD_DNS_LISTEN", format!("127.0.0.1:{dns_port}"))
            .env("CLOUD_DNS_OPS_LISTEN", format!("127.0.0.1:{ops_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ops = format!("http://127.0.0.1:{ops_port}");
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        if let Ok(res) = client.get(format!("{ops}/readyz")).send().await
            && res.status() == 200
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "cloudd dns did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
        .create_service(
            tenant.id,
            cloud_store::NewService {
                name: Some("web".into()),
                ports,
                soft_limit: None,
                hard_limit: None,
                scale_to_zero_after: None,
                domains: vec![],
                persistent: true,
            },
        )
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
    let _edge = Role(
        Command::new(env!("CARGO_BIN_EXE_cloudd"))
            .arg("edge")
            .env("DATABASE_URL", &url)
            .env("CLOUD_SECRET_KEY_FILE", &key_file)
            .env("CLOUD_EDGE_HTTPS_LISTEN", format!("127.0.0.1:{https}"))
            .env("CLOUD_EDGE_HTTP_LISTEN", format!("127.0.0.1:{http}"))
            .env("CLOUD_EDGE_OPS_LISTEN", format!("127.0.0.1:{ops_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ops = format!("http://127.0.0.1:{ops_port}");
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        if let Ok(res) = client.get(format!("{ops}/readyz")).send().await
            && res.status() == 200
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "cloudd edge did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let url = cloud_tests::fresh_database().await;
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
    let _certs = Role(
        Command::new(env!("CARGO_BIN_EXE_cloudd"))
            .args(["--config", &dir.path().join("cloudd.toml").display().to_string(), "certs"])
            .env("DATABASE_URL", &url)
            .env("CLOUD_SECRET_KEY_FILE", &key_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ops = format!("http://127.0.0.1:{ops_port}");
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        if let Ok(res) = client.get(format!("{ops}/readyz")).send().await
            && res.status() == 200
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "cloudd certs never completed a pass");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = client.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("certs_last_pass_ok 1"), "{metrics}");
}
