//! The real `cloudctl` against a real `cloudd dev` (embedded PostgreSQL, API, node agent), each in its own
//! process, as a user would run them. `cloudd` must be built beside `cloudctl` (`cargo test --workspace` does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Dev {
    child: Child,
    home: tempfile::TempDir,
    api: String,
    /// The DNS a custom domain's owner publishes records in, as the platform's resolver sees it.
    owner_dns: cloud_tests::txt_server::TxtServer,
    _runtime: tokio::runtime::Runtime,
}

impl Drop for Dev {
    fn drop(&mut self) {
        // Ctrl-C: cloudd stops its instances, the node agent and PostgreSQL in order.
        unsafe_free_kill(self.child.id(), "INT");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_free_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill").args([format!("-{signal}"), pid.to_string()]).status();
}

fn bin(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_cloudctl")).parent().unwrap().to_path_buf();
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build the workspace first (cargo build --workspace)", path.display());
    path
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

impl Dev {
    /// The edge's https address, as `cloudd dev` prints it.
    fn edge_https(&self) -> std::net::SocketAddr {
        let t0 = Instant::now();
        loop {
            let log = std::fs::read_to_string(self.home.path().join("cloudd.log")).unwrap_or_default();
            if let Some(addr) = log.lines().find_map(|l| {
                l.trim().strip_prefix("edge:")?.split_whitespace().next()?.strip_prefix("https://")?.parse().ok()
            }) {
                return addr;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "cloudd dev printed no edge address: {log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn start_dev() -> Dev {
    start_dev_with(210, "")
}

/// `cloudd dev` with its tenants' networks in `10.<octet>.0.0/16` (`127.<octet>` without root), so that
/// several may run at once, and `config` as its configuration file.
fn start_dev_with(octet: u8, config: &str) -> Dev {
    start_dev_on(octet, config, None)
}

/// [`start_dev_with`] on a PostgreSQL database of the test's (`DATABASE_URL`) instead of the embedded one, so that
/// other roles can join it.
fn start_dev_on(octet: u8, config: &str, database_url: Option<&str>) -> Dev {
    let home = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let api = format!("https://127.0.0.1:{port}");
    let pool = if is_root() { format!("10.{octet}.0.0/16") } else { format!("127.{octet}.0.0/16") };
    let config_file = home.path().join("cloudd.toml");
    std::fs::write(&config_file, config).unwrap();
    let log = std::fs::File::create(home.path().join("cloudd.log")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let owner_dns = runtime.block_on(cloud_tests::txt_server::TxtServer::start());
    let child = Command::new(bin("cloudd"))
        .arg("dev")
        .arg("--config")
        .arg(&config_file)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("CLOUD_DATA_DIR", home.path().join("data"))
        .env("CLOUD_API_LISTEN", format!("127.0.0.1:{port}"))
        .env("CLOUD_TENANT_POOL", &pool)
        .env("CLOUD_DNS_LISTEN", "127.0.0.1:0")
        .env("CLOUD_DNS_PRIVATE_LISTEN", "127.0.0.1:0")
        .env("CLOUD_EDGE_HTTPS_LISTEN", "127.0.0.1:0")
        .env("CLOUD_EDGE_HTTP_LISTEN", "127.0.0.1:0")
        .env("CLOUD_RESOLVER", owner_dns.addr().to_string())
        .env_remove("DATABASE_URL")
        .envs(database_url.map(|url| ("DATABASE_URL", url)))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let dev = Dev { child, home, api, owner_dns, _runtime: runtime };
    // Ready when cloudd has written cloudctl's `local` remote (after the API listens).
    let config = dev.home.path().join("config/cloudctl/config.toml");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&config).is_ok_and(|c| c.contains("[remotes.local]")) {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "cloudd dev did not come up: {}",
            std::fs::read_to_string(dev.home.path().join("cloudd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    dev
}

/// Runs cloudctl with the dev environment.
fn ctl(dev: &Dev, args: &[&str]) -> Output {
    cloudctl_in(dev.home.path(), args)
}

/// Runs cloudctl as a user whose home (and so configuration) is `home`, without the overriding variables.
fn cloudctl_in(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("cloudctl"))
        .args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("CLOUD_API_URL")
        .env_remove("CLOUD_TOKEN")
        .env_remove("CLOUD_REMOTE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs cloudctl and asserts success; returns stdout.
#[track_caller]
fn ok(dev: &Dev, args: &[&str]) -> String {
    let out = ctl(dev, args);
    assert!(
        out.status.success(),
        "cloudctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs cloudctl and asserts a failure whose message mentions `needle`; returns stderr.
#[track_caller]
fn fails(dev: &Dev, args: &[&str], needle: &str) -> String {
    let out = ctl(dev, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "cloudctl {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains(needle), "cloudctl {args:?}: {stderr:?} should mention {needle:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one-line error: {stderr}");
    stderr
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn the_cli_drives_a_real_platform() {
    let dev = start_dev();

    // Remotes: `cloudd dev` registered `local` as the default.
    let remotes = json(&ok(&dev, &["remote", "list", "-o", "json"]));
    assert_eq!(remotes["local"]["url"], dev.api.as_str());
    assert_eq!(remotes["local"]["default"], true);
    ok(&dev, &["remote", "add", "elsewhere", "http://127.0.0.1:9", "--token", "x"]);
    ok(&dev, &["remote", "switch", "elsewhere"]);
    fails(&dev, &["whoami"], "cannot reach remote \"elsewhere\" at http://127.0.0.1:9");
    ok(&dev, &["remote", "switch", "local"]);
    ok(&dev, &["remote", "remove", "elsewhere"]);
    assert_eq!(ok(&dev, &["remote", "list", "-o", "name"]), "local\n");
    ok(&dev, &["remote", "add", "tokenless", &dev.api, "--accept-certificate"]);
    fails(&dev, &["--remote", "tokenless", "service", "list"], "has no token");
    ok(&dev, &["remote", "rm", "tokenless"]);
    assert!(ok(&dev, &["whoami"]).contains("tenant: default"));

    // The mission's first command.
    let created = ok(&dev, &["service", "create", "my-service", "443:8080"]);
    let fqdn = created.split_whitespace().nth(3).unwrap().to_owned();
    assert!(created.starts_with("created service my-service my-service-"), "{created}");
    assert!(fqdn.ends_with(".dev.cloud.localhost"), "{created}");
    assert!(created.contains("443:8080/tls+http") && created.contains("80:443/http+redirect"), "{created}");

    // Reads in every format.
    let list = json(&ok(&dev, &["service", "list", "-o", "json"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["fqdn"], fqdn.as_str());
    assert_eq!(json(&ok(&dev, &["service", "get", "my-service", "-o", "json"]))["name"], "my-service");
    assert!(ok(&dev, &["service", "get", "my-service", "-o", "yaml"]).contains(&format!("fqdn: {fqdn}")));
    assert_eq!(ok(&dev, &["service", "list", "-o", "name"]), "my-service\n");
    let table = ok(&dev, &["service", "list"]);
    assert!(table.starts_with("NAME") && table.contains("my-service") && table.contains(&fqdn), "{table}");

    // A custom domain: recorded unverified, with exactly the records to create; verified once the TXT is there.
    let updated = ok(&dev, &["service", "update", "my-service", "--domain", "www.example.test."]);
    assert!(updated.contains("domain www.example.test: unverified"), "{updated}");
    assert!(updated.contains(&format!("www.example.test CNAME {fqdn}")), "{updated}");
    assert!(updated.contains("then: cloudctl service verify my-service www.example.test"), "{updated}");
    let value = updated
        .split("_cloud-challenge.www.example.test TXT \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no TXT record to create in {updated}"));
    assert!(value.starts_with("cloud-verify="), "{updated}");
    fails(
        &dev,
        &["service", "verify", "my-service", "www.example.test"],
        "(found: no TXT record) (domain_not_verified)",
    );
    dev.owner_dns.set("_cloud-challenge.www.example.test", &[value]);
    let verified = ok(&dev, &["service", "verify", "my-service", "www.example.test"]);
    assert_eq!(verified, format!("domain www.example.test verified: routed to service my-service ({fqdn})\n"));
    assert!(ok(&dev, &["service", "get", "my-service"]).contains("domain www.example.test: verified"));

    // The mission's second command: instances behind the service, running, with private names.
    let deployed = ok(&dev, &["deploy", "--service", "my-service", "--image", "hello"]);
    assert!(deployed.contains(&format!("https://{fqdn}\n")), "{deployed}");
    let line = deployed.lines().find(|l| l.starts_with("instance: ")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (instance, state, ip, private_fqdn) = (fields[1], fields[2], fields[3], fields[4]);
    assert!(instance.starts_with("hello-") && state == "running", "{line}");
    assert!(ip.starts_with(if is_root() { "10.210." } else { "127.210." }), "{line}");
    assert_eq!(private_fqdn, format!("{instance}.internal"));
    let instances = json(&ok(&dev, &["instance", "list", "-o", "json"]));
    assert_eq!(instances[0]["service"]["name"], "my-service");

    // The printed URL answers through the edge, verified against the platform CA as `cloudctl ca` prints it
    // (the same one `cloudd dev` wrote next to its data).
    let edge = dev.edge_https();
    let pem = ok(&dev, &["ca"]);
    assert_eq!(pem, std::fs::read_to_string(dev.home.path().join("data/ca.pem")).unwrap());
    let ca = dev.home.path().join("from-cloudctl.pem");
    std::fs::write(&ca, &pem).unwrap();
    let out = curl_through_edge(&ca, &fqdn, edge);
    let answer = String::from_utf8_lossy(&out.stdout);
    assert_eq!(answer, format!("hello from {instance} ({ip})\n"), "{}", String::from_utf8_lossy(&out.stderr));

    // deploy -p: an ephemeral service that goes with its instance.
    let eph_table = ok(&dev, &["deploy", "-p", "443:8080", "--image", "hello", "--name", "eph"]);
    assert!(eph_table.starts_with("https://eph-") && eph_table.contains("service (ephemeral"), "{eph_table}");
    assert!(eph_table.contains("instance: eph  running") && eph_table.contains("eph.internal"), "{eph_table}");
    ok(&dev, &["instance", "rm", "eph"]);
    fails(&dev, &["service", "get", "eph"], "not found");
    let eph = json(&ok(&dev, &["deploy", "-p", "443:8080", "--image", "hello", "-o", "json"]));
    let svc = eph["service"]["name"].as_str().unwrap().to_owned();
    assert_eq!(eph["service"]["persistent"], false);
    assert_eq!(eph["instances"][0]["state"], "running");
    let inst = eph["instances"][0]["name"].as_str().unwrap().to_owned();
    assert!(ok(&dev, &["service", "list", "-o", "name"]).contains(&svc));
    ok(&dev, &["instance", "delete", &inst]);
    fails(&dev, &["service", "get", &svc], "not found");

    // Bad input: one line naming the problem, and nothing created.
    fails(&dev, &["service", "create", "bad", "80:8080/tls"], "port spec \"80:8080/tls\": port 80 serves plain http");
    fails(&dev, &["service", "create", "Bad", "443"], "invalid character 'B'");
    fails(&dev, &["service", "get", "nope"], "service \"nope\" not found (not_found)");
    fails(&dev, &["deploy"], "nothing to deploy");
    fails(&dev, &["deploy", "--image", "nope"], "image \"nope\" not found");
    let conflict = ctl(&dev, &["deploy", "--service", "my-service", "-p", "443"]);
    assert_eq!(conflict.status.code(), Some(2), "clap refuses --service with -p");
    fails(&dev, &["service", "delete", "my-service"], "service_has_instances");
    assert_eq!(ok(&dev, &["service", "list", "-o", "name"]), "my-service\n");

    // Logs of the running instance. The agent's note reaches PostgreSQL in the log shipper's own batches, not
    // with the report that the instance runs.
    let t0 = Instant::now();
    loop {
        let logs = ok(&dev, &["instance", "logs", instance]);
        if logs.contains("sys listening on") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{logs}");
        std::thread::sleep(Duration::from_millis(100));
    }

    ok(&dev, &["service", "delete", "my-service", "--force"]);
    assert_eq!(ok(&dev, &["service", "list", "-o", "name"]), "");
    assert_eq!(json(&ok(&dev, &["instance", "list", "-o", "json"])), Value::Array(vec![]));
}

/// Images from where users have them: a directory, archives written by skopeo (OCI and docker, gzipped or not),
/// and a registry (a real `docker-registry` on loopback, configured as insecure), pulled by `deploy --image REF`.
/// The instances are created stopped: what is checked is what the CLI and the API guarantee (the image stored,
/// the instance created with it and its port), not the node's running of it.
#[test]
fn images_are_pushed_from_paths_and_pulled_by_reference() {
    use cloud_tests::registry::{self, ArchiveFormat, Registry, sample_image};

    let reg = Registry::start();
    let reference = reg.push(&sample_image(9000, "pulled"), "team/web:v1");
    let dev = start_dev_with(211, &format!("[api]\ninsecure_registries = [\"{}\"]\n", reg.host));
    let files = tempfile::tempdir().unwrap();

    // A directory with manifest.json: packed as a bundle, named after the directory.
    let app = files.path().join("my-app");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(app.join("manifest.json"), r#"{"command": ["./run"], "port": 8081}"#).unwrap();
    std::fs::write(app.join("run"), "#!/bin/sh\necho hi\n").unwrap();
    let pushed = json(&ok(&dev, &["image", "push", app.to_str().unwrap(), "-o", "json"]));
    assert_eq!(
        (&pushed["name"], &pushed["format"], &pushed["port"]),
        (&"my-app".into(), &"bundle".into(), &8081.into())
    );

    // An OCI archive as skopeo writes it: named after the file.
    let oci = registry::skopeo_archive(&sample_image(9000, "oci"), files.path(), ArchiveFormat::Oci);
    let pushed = json(&ok(&dev, &["image", "push", oci.to_str().unwrap(), "-o", "json"]));
    assert_eq!((&pushed["name"], &pushed["format"], &pushed["port"]), (&"oci".into(), &"oci".into(), &9000.into()));
    assert_eq!(pushed["command"], serde_json::json!(["/bin/serve", "--quiet"]));

    // A docker archive, gzipped as `docker save | gzip` leaves it, under a name of our choosing.
    let docker = registry::skopeo_archive(&sample_image(9000, "docker"), files.path(), ArchiveFormat::Docker);
    let gz = files.path().join("saved.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &std::fs::read(&docker).unwrap()).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    let pushed = json(&ok(&dev, &["image", "push", gz.to_str().unwrap(), "--name", "from-docker", "-o", "json"]));
    assert_eq!(
        (&pushed["name"], &pushed["format"], &pushed["source"]),
        (&"from-docker".into(), &"oci".into(), &"upload".into())
    );
    let table = ok(&dev, &["image", "list"]);
    assert!(table.contains("from-docker") && table.contains("FORMAT"), "{table}");

    // A file that is no image: refused before anything is sent, saying what is accepted.
    let notes = files.path().join("notes.txt");
    std::fs::write(&notes, "not an image").unwrap();
    fails(&dev, &["image", "push", notes.to_str().unwrap()], "is neither an OCI image archive");

    // deploy --image REF: pulled first as `web` (the repository's last component), then the instance, on the
    // port the deploy asks for.
    let deployed =
        json(&ok(&dev, &["deploy", "--image", &reference, "--no-start", "--internal-port", "9001", "-o", "json"]));
    let instance = &deployed["instances"][0];
    assert_eq!((&instance["image"], &instance["port"]), (&"web".into(), &9001.into()), "{deployed}");
    let web = json(&ok(&dev, &["image", "get", "web", "-o", "json"]));
    assert_eq!(
        (&web["source"], &web["format"], &web["port"]),
        (&reference.as_str().into(), &"oci".into(), &9000.into())
    );
    assert_eq!(instance["image_digest"], web["digest"]);
    let named = json(&ok(&dev, &["deploy", "--image", &reference, "--image-name", "site", "--no-start", "-o", "json"]));
    assert_eq!((&named["instances"][0]["image"], &named["instances"][0]["port"]), (&"site".into(), &9000.into()));

    // image pull, and a registry's refusal in one line with its code.
    let pulled = json(&ok(&dev, &["image", "pull", &reference, "--name", "pulled", "-o", "json"]));
    assert_eq!(pulled["digest"], web["digest"]);
    fails(&dev, &["image", "pull", &format!("{}/team/none:v1", reg.host)], "(image_not_found)");
    fails(&dev, &["deploy", "--image", "hello", "--image-name", "x"], "--image-name names a pulled image");
}

/// `--help` output is part of the interface: it changes only on purpose (UPDATE_SNAPSHOTS=1 rewrites).
#[test]
fn help_matches_its_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    for (file, args) in [
        ("help.txt", vec!["--help"]),
        ("help-service-create.txt", vec!["service", "create", "--help"]),
        ("help-deploy.txt", vec!["deploy", "--help"]),
        ("help-image-push.txt", vec!["image", "push", "--help"]),
        ("help-ca.txt", vec!["ca", "--help"]),
        ("help-instance-copy.txt", vec!["instance", "copy", "--help"]),
    ] {
        let out = Command::new(bin("cloudctl")).args(&args).env_remove("CLOUD_REMOTE").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let path = dir.join(file);
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        assert_eq!(
            text,
            std::fs::read_to_string(&path).unwrap_or_default(),
            "{file} changed; UPDATE_SNAPSHOTS=1 rewrites it"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin("cloudctl")).args(["completion", shell]).output().unwrap();
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success() && script.contains("cloudctl") && script.contains("deploy"), "{shell}");
    }
}

/// A self-signed certificate from openssl, for `openssl s_server`: the peer a self-hosted platform looks like.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let out =
        Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(&cert).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let fp = text.trim().rsplit('=').next().unwrap().to_owned();
    (cert, key, format!("SHA256:{fp}"))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls_server(cert: &Path, key: &Path, port: u16) -> Server {
    let child = Command::new("openssl")
        .args(["s_server", "-www", "-quiet", "-accept", &format!("127.0.0.1:{port}"), "-cert"])
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "openssl s_server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

#[test]
fn an_unknown_certificate_is_pinned_only_when_accepted() {
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| cloudctl_in(home.path(), args);
    let (cert, key, fp) = self_signed(home.path(), "first");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("https://127.0.0.1:{port}");
    let server = tls_server(&cert, &key, port);

    // Not a terminal, no --accept-certificate: refused, showing the fingerprint to check.
    let out = run(&["remote", "add", "lab", &url, "--token", "t"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not signed by a known authority") && err.contains(&fp), "{err}");
    assert!(!String::from_utf8_lossy(&run(&["remote", "list", "-o", "name"]).stdout).contains("lab"));

    let out = run(&["remote", "add", "lab", &url, "--token", "t", "--accept-certificate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = std::fs::read_to_string(home.path().join("config/cloudctl/config.toml")).unwrap();
    assert!(config.contains(&format!("fingerprint = \"{fp}\"")), "{config}");

    // The pinned server is trusted: TLS works (s_server then answers HTML, not the API).
    let out = run(&["--remote", "lab", "whoami"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("certificate") && !err.contains("cannot reach"), "{err}");

    // Another certificate on the same address is refused.
    drop(server);
    let (cert2, key2, fp2) = self_signed(home.path(), "second");
    let _server = tls_server(&cert2, &key2, port);
    let out = run(&["--remote", "lab", "whoami"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&fp2) && err.contains("is not the pinned"), "{err}");
}

/// `https://<fqdn>/` through an edge, verified against `ca` only, retried while the instance starts.
fn curl_through_edge(ca: &Path, fqdn: &str, edge: std::net::SocketAddr) -> Output {
    Command::new("curl")
        .args(["-sS", "--fail", "--retry", "10", "--retry-delay", "1", "--max-time", "20", "--cacert"])
        .arg(ca)
        .arg("--connect-to")
        .arg(format!("{fqdn}:443:{}:{}", edge.ip(), edge.port()))
        .arg(format!("https://{fqdn}/"))
        .output()
        .expect("curl")
}

/// The config file of a home, empty when there is none.
fn config_of(home: &Path) -> String {
    std::fs::read_to_string(home.join("config/cloudctl/config.toml")).unwrap_or_default()
}

/// Runs cloudctl in `home` and asserts a one-line failure mentioning `needle`, with nothing written to the
/// configuration.
#[track_caller]
fn refused(home: &Path, args: &[&str], needle: &str) {
    let before = config_of(home);
    let out = cloudctl_in(home, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(needle), "cloudctl {args:?}: {err:?} should mention {needle:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert_eq!(config_of(home), before, "a refused `remote add` wrote to the configuration");
}

#[test]
fn a_join_token_adds_a_pinned_remote_once_without_a_prompt() {
    let dev = start_dev_with(212, "");
    ok(&dev, &["service", "create", "my-service", "443:8080"]);
    let join = ok(&dev, &["token", "create", "--join", "--scope", "read", "--scope", "write", "--description", "bob"]);
    let join = join.trim();
    let pin = json(&ok(&dev, &["remote", "list", "-o", "json"]))["local"]["fingerprint"].as_str().unwrap().to_owned();

    // A teammate's fresh home, no terminal: the token alone adds the remote, pinned to the platform CA.
    let bob = tempfile::tempdir().unwrap();
    let out = cloudctl_in(bob.path(), &["remote", "add", "prod", join]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let remotes = json(&String::from_utf8(cloudctl_in(bob.path(), &["remote", "list", "-o", "json"]).stdout).unwrap());
    assert_eq!(remotes["prod"]["url"], dev.api.as_str());
    assert_eq!(
        (remotes["prod"]["fingerprint"].as_str(), remotes["prod"]["auth"].as_str()),
        (Some(&*pin), Some("token"))
    );
    let table = String::from_utf8(cloudctl_in(bob.path(), &["remote", "list"]).stdout).unwrap();
    assert!(table.starts_with("NAME") && table.contains("AUTH") && table.contains(&pin[..20]), "{table}");
    let yaml = String::from_utf8(cloudctl_in(bob.path(), &["remote", "list", "-o", "yaml"]).stdout).unwrap();
    assert!(yaml.contains(&format!("fingerprint: {pin}")), "{yaml}");
    let value =
        String::from_utf8(cloudctl_in(bob.path(), &["remote", "list", "-o", "value=prod.auth"]).stdout).unwrap();
    assert_eq!(value, "token\n");

    // It works, by --remote and by REMOTE:NAME, with the scopes granted.
    let list = |args: &[&str]| {
        let out = cloudctl_in(bob.path(), args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(list(&["--remote", "prod", "service", "list", "-o", "name"]), "my-service\n");
    assert_eq!(list(&["service", "list", "prod:", "-o", "name"]), "my-service\n");
    assert_eq!(list(&["service", "get", "prod:my-service", "-o", "value=name"]), "my-service\n");
    assert!(list(&["whoami", "--remote", "prod"]).contains("scopes: read,write"));
    let listed = json(&ok(&dev, &["token", "list", "--join", "-o", "json"]));
    assert_eq!((listed[0]["state"].as_str(), listed[0]["description"].as_str()), (Some("used"), Some("bob")));

    // Used once: a second home is refused and keeps no remote.
    let eve = tempfile::tempdir().unwrap();
    refused(eve.path(), &["remote", "add", "prod", join], "join_token_used");
    // A name that clashes is refused before the secret is spent; the token then still works elsewhere.
    let next = ok(&dev, &["token", "create", "--join"]);
    refused(bob.path(), &["remote", "add", "prod", next.trim()], "exists already");
    let carol = tempfile::tempdir().unwrap();
    assert!(cloudctl_in(carol.path(), &["remote", "add", "prod", next.trim()]).status.success());

    // Revoked before use.
    let revoked = ok(&dev, &["token", "create", "--join", "-o", "json"]);
    let revoked = json(&revoked);
    ok(&dev, &["token", "revoke", "--join", revoked["id"].as_str().unwrap()]);
    refused(eve.path(), &["remote", "add", "prod", revoked["join_token"].as_str().unwrap()], "join_token_revoked");

    // Expired, forged, mangled.
    let fresh = ok(&dev, &["token", "create", "--join"]);
    let mut token = cloud_domain::join::JoinToken::decode(fresh.trim(), chrono::Utc::now()).unwrap();
    token.expires_at = chrono::Utc::now() - chrono::Duration::seconds(1);
    refused(eve.path(), &["remote", "add", "prod", &token.encode()], "expired");
    token.expires_at = chrono::Utc::now() + chrono::Duration::hours(1);
    token.secret = cloud_domain::join::new_secret();
    refused(eve.path(), &["remote", "add", "prod", &token.encode()], "join_token_invalid");
    refused(eve.path(), &["remote", "add", "prod", "eyJub3QiOiJpdCJ9"], "not a join token");

    // Another server at the same URL (the platform gone, something else on its port): refused before the secret
    // is sent, showing the certificate it presented.
    let port: u16 = dev.api.rsplit(':').next().unwrap().parse().unwrap();
    drop(dev);
    let (cert, key, other) = self_signed(eve.path(), "impostor");
    let t0 = Instant::now();
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the API's port was not released");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _impostor = tls_server(&cert, &key, port);
    refused(eve.path(), &["remote", "add", "prod", fresh.trim()], &other);
    let out = cloudctl_in(eve.path(), &["remote", "add", "prod", fresh.trim()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("is not the pinned {pin}")));
}

#[test]
fn an_instance_moves_to_another_node_and_the_service_keeps_answering_through_the_edge() {
    let Some((runtime, database, dev)) = dev_on_a_database(215, "two node agents on one host need root") else {
        return;
    };
    ok(&dev, &["service", "create", "web", "443:8080"]);
    ok(&dev, &["deploy", "--service", "web", "--image", "hello", "-R", "2"]);
    let instances = json(&ok(&dev, &["instance", "list", "-o", "json"]));
    let first_node = instances[0]["node"].as_str().unwrap().to_owned();
    let (name, ip) = (instances[0]["name"].as_str().unwrap().to_owned(), instances[0]["private_ip"].clone());

    // A second node agent joins the platform's database.
    let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dev.home.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"second\"\nstate_dir = \"{}\"\nops_listen = \"127.0.0.1:{ops}\"\n",
            dev.home.path().join("second").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dev.home.path().join("second.log")).unwrap();
    let second = Command::new(bin("cloudd"))
        .arg("--config")
        .arg(&config)
        .arg("node")
        .env("DATABASE_URL", &database)
        .env("CLOUD_SECRET_KEY_FILE", dev.home.path().join("data/secret.key"))
        .env("CLOUD_TENANT_POOL", "10.215.0.0/16")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _second = Stopped(second);
    runtime.block_on(async {
        let t0 = Instant::now();
        while !reqwest::get(format!("http://127.0.0.1:{ops}/readyz")).await.is_ok_and(|r| r.status() == 200) {
            assert!(t0.elapsed() < Duration::from_secs(60), "the second node agent did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Requests through the edge all along the move: none fails, and afterwards the moved instance answers.
    let fqdn = ok(&dev, &["service", "get", "web", "-o", "value=fqdn"]).trim().to_owned();
    let client = edge_client(&dev, &fqdn);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = runtime.spawn(load_loops(client.clone(), fqdn.clone(), "/", 1, stop.clone(), answered.clone()));
    // The loop runs before the move starts, and goes on through it.
    let t0 = Instant::now();
    while answered.load(std::sync::atomic::Ordering::Relaxed) < 5 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the edge does not answer");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = answered.load(std::sync::atomic::Ordering::Relaxed);
    let moved = ok(&dev, &["instance", "move", &name, "--node", "second", "-o", "json"]);
    let during = answered.load(std::sync::atomic::Ordering::Relaxed) - before;
    let moved = json(&moved);
    assert_eq!((moved["node"].as_str(), moved["state"].as_str()), (Some("second"), Some("running")), "{moved}");
    assert_eq!(moved["private_ip"], ip, "the instance keeps its private IP");
    let seen_after = runtime.block_on(async {
        let t0 = Instant::now();
        loop {
            let body = get_through_edge(&client, &fqdn).await.unwrap_or_default();
            if body.starts_with(&format!("hello from {name} ")) {
                return true;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return false;
            }
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failures, _) = runtime.block_on(load).unwrap();
    assert!(seen_after, "the moved instance never answered through the edge");
    assert!(during > 0, "no request was answered while the instance moved");
    assert_eq!(failures, Vec::<String>::new(), "requests failed during the move ({served} served, {during} during it)");

    // An unknown node and a missing instance are refused; the node it is on is where it stays.
    fails(&dev, &["instance", "move", &name, "--node", "nowhere"], "node \"nowhere\" not found");
    let again = ctl(&dev, &["instance", "move", &name, "--node", "second"]);
    assert!(again.status.success(), "moving it where it is changes nothing");
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.ends_with(&format!("instance {name} is on node second already\n")), "{said}");
    fails(&dev, &["instance", "move", "missing", "--node", &first_node], "not found");
}

/// As root: a runtime, a database of the test's own and `cloudd dev` on it (see [`start_dev_on`]); otherwise
/// `None`, saying why the test is skipped.
fn dev_on_a_database(octet: u8, why_root: &str) -> Option<(tokio::runtime::Runtime, String, Dev)> {
    if !is_root() {
        eprintln!("skipped: {why_root}");
        return None;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let database = runtime.block_on(cloud_tests::fresh_database());
    let dev = start_dev_on(octet, "", Some(&database));
    Some((runtime, database, dev))
}

/// Kills and reaps a child when dropped.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        unsafe_free_kill(self.0.id(), "TERM");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client of the dev's edge for `fqdn`, trusting only its platform CA.
fn edge_client(dev: &Dev, fqdn: &str) -> reqwest::Client {
    let ca = std::fs::read(dev.home.path().join("data/ca.pem")).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve(fqdn, dev.edge_https())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One request through the edge; the body of a 200, else what went wrong.
async fn get_through_edge(client: &reqwest::Client, fqdn: &str) -> Result<String, String> {
    let res = client.get(format!("https://{fqdn}/")).send().await.map_err(|e| cloud_domain::error_chain(&e))?;
    let status = res.status();
    let body = res.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    Ok(body)
}

/// Runs cloudctl in `home` with extra environment and `input` on stdin.
fn cloudctl_with(home: &Path, args: &[&str], env: &[(&str, &str)], input: &str) -> Output {
    let mut cmd = Command::new(bin("cloudctl"));
    cmd.args(args);
    with_input(cmd, home, env, input)
}

/// Runs `cmd` as a user whose home is `home`, with none of the overriding variables but those of `env`, with
/// `input` on stdin.
fn with_input(mut cmd: Command, home: &Path, env: &[(&str, &str)], input: &str) -> Output {
    let mut child = cmd
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("CLOUD_API_URL")
        .env_remove("CLOUD_TOKEN")
        .env_remove("CLOUD_REMOTE")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn exec_runs_commands_inside_the_sandbox_interactively_and_never_across_tenants() {
    let Some((runtime, database, dev)) = dev_on_a_database(216, "sandboxes (and so exec) need root here") else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let app = files.path().join("box");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(app.join("manifest.json"), r#"{"command": ["./run"], "port": 8080}"#).unwrap();
    std::fs::write(app.join("run"), "#!/bin/sh\nexec busybox httpd -f -p \"$PRIVATE_IP:$PORT\"\n").unwrap();
    std::fs::set_permissions(app.join("run"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // A secret of the tenant: in the instance's environment, nowhere else.
    let secret = "sealed-Token-9f2c";
    ok(&dev, &["secret", "set", &format!("SHOP_TOKEN={secret}")]);
    // And one as a file: /run/secrets/TLS_KEY, the instance user's alone, read-only, not in the environment.
    let file_secret = "file-Secret-77b1";
    ok(&dev, &["secret", "set", "--file", &format!("TLS_KEY={file_secret}")]);
    ok(&dev, &["deploy", app.to_str().unwrap(), "-p", "443:8080", "--name", "box", "-e", "GREETING=from-env"]);
    let home = dev.home.path();
    let listed = ok(&dev, &["secret", "list", "-o", "json"]);
    assert!(listed.contains("SHOP_TOKEN") && !listed.contains(secret), "{listed}");
    let out = cloudctl_with(home, &["instance", "exec", "box", "--", "sh", "-c", "echo $SHOP_TOKEN"], &[], "");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{secret}\n"));
    let script = "cat /run/secrets/TLS_KEY; echo; stat -c '%U %a' /run/secrets/TLS_KEY; echo ${TLS_KEY:-unset}; \
                  echo x > /run/secrets/TLS_KEY || echo read-only";
    let out = cloudctl_with(home, &["instance", "exec", "box", "--", "sh", "-c", script], &[], "");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        format!("{file_secret}\nnobody 400\nunset\nread-only\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for shown in [ok(&dev, &["instance", "get", "box", "-o", "json"]), ok(&dev, &["instance", "logs", "box"])] {
        assert!(!shown.contains(secret) && !shown.contains(file_secret), "{shown}");
    }
    // Nor in the platform's own log (every role of cloudd dev writes there).
    let log = std::fs::read_to_string(dev.home.path().join("cloudd.log")).unwrap();
    assert!(!log.contains(secret) && !log.contains(file_secret), "a secret is in cloudd's log");

    // A command: its output apart from its errors, its exit code cloudctl's, inside the sandbox.
    let out = cloudctl_with(home, &["instance", "exec", "box", "--", "id"], &[], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "uid=65534(nobody) gid=65534(nobody)\n", "the image's user");
    let script = "echo $GREETING; hostname; cat /proc/self/uid_map; ps -o comm; echo oops >&2; exit 7";
    let out = cloudctl_with(home, &["instance", "exec", "box", "--", "sh", "-c", script], &[], "");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!((out.status.code(), stderr.as_ref()), (Some(7), "oops\n"), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(&lines[..2], ["from-env", "box"], "the instance's environment and hostname: {stdout}");
    let map: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(
        map.len() == 3 && map[1] != "0" && map[2] == "65536",
        "its own range of host ids, not the host's: {stdout}"
    );
    // Its own pid namespace: the sandbox's init, its program and this command, nothing of the host.
    assert!(!stdout.contains("cloudd") && !stdout.contains("postgres"), "{stdout}");
    // Standard input reaches it, and its end too.
    let out = cloudctl_with(home, &["instance", "exec", "box", "--", "sh", "-c", "wc -l"], &[], "a\nb\nc\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    fails(&dev, &["instance", "exec", "box", "--", "/nonexistent"], "cannot run /nonexistent");

    // Interactive: a shell on a terminal, driven through a pseudo-terminal as a user's would be.
    let command = format!("{} instance exec box", bin("cloudctl").display());
    let out = cloudctl_script(home, &command, "stty size; echo hi-$((6*7)); exit 3\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("hi-42"), "{text}");
    // The terminal's size reached the instance's terminal (script's pty is 24x80 when it has no terminal).
    assert!(text.lines().any(|l| l.split_whitespace().count() == 2 && l.trim().ends_with(" 80")), "{text}");

    // Another tenant's token cannot exec into it, nor can a read-only token of its own.
    ok(&dev, &["tenant", "create", "other"]);
    let other = ok(&dev, &["token", "create", "--tenant", "other"]);
    let out = cloudctl_with(home, &["instance", "exec", "box", "--", "id"], &[("CLOUD_TOKEN", other.trim())], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not found") && out.stdout.is_empty(), "{err}");
    let reader = ok(&dev, &["token", "create", "--scope", "read"]);
    let out = cloudctl_with(home, &["instance", "exec", "box", "--", "id"], &[("CLOUD_TOKEN", reader.trim())], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("insufficient_scope"), "{err}");

    // Each exec is in the tenant's events: who ran what in which instance.
    let audited: Vec<(serde_json::Value,)> = runtime.block_on(async {
        let pool = cloud_store::connect(&database, 1).await.unwrap();
        sqlx::query_as("SELECT payload FROM events WHERE resource_type = 'exec' ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap()
    });
    assert_eq!(audited.len(), 7, "{audited:?}");
    // The API reached the node over TLS with a certificate of the platform CA for the node's address.
    let exec_address: (String,) = runtime.block_on(async {
        let pool = cloud_store::connect(&database, 1).await.unwrap();
        sqlx::query_as("SELECT exec_address FROM nodes").fetch_one(&pool).await.unwrap()
    });
    assert!(exec_address.0.starts_with("wss://127.0.0.1:"), "{exec_address:?}");
    // The secrets are in no event and no column in clear.
    for value in [secret, file_secret] {
        let leaked: (i64,) = runtime.block_on(async {
            let pool = cloud_store::connect(&database, 1).await.unwrap();
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM events WHERE payload::text LIKE '%' || $1 || '%')
                      + (SELECT count(*) FROM secrets WHERE position(convert_to($1, 'UTF8') in value_sealed) > 0)
                      + (SELECT count(*) FROM instances WHERE env::text LIKE '%' || $1 || '%')",
            )
            .bind(value)
            .fetch_one(&pool)
            .await
            .unwrap()
        });
        assert_eq!(leaked.0, 0, "a secret in clear in the database");
    }
    assert_eq!(
        (&audited[2].0["instance"], &audited[2].0["command"]),
        (&serde_json::json!("box"), &serde_json::json!(["id"]))
    );
    assert_eq!(audited[6].0["tty"], serde_json::json!(true));
}

/// Runs `command` under `script`, which gives it a pseudo-terminal and types `input` into it.
fn cloudctl_script(home: &Path, command: &str, input: &str) -> Output {
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", command, "/dev/null"]);
    with_input(cmd, home, &[], input)
}

/// Runs cloudctl and asserts success; returns stdout and stderr (where progress goes).
#[track_caller]
fn ok_with_progress(dev: &Dev, args: &[&str]) -> (String, String) {
    let out = ctl(dev, args);
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    assert!(out.status.success(), "cloudctl {args:?} failed: {stdout}{stderr}");
    (stdout, stderr)
}

/// `instance copy` between two platforms, as `lxc copy foo:c1 local:` between two LXD hosts: the second platform
/// is a remote of the first one's user, added with a join token; an instance is made again there from its
/// image (sent along when missing), with its settings and its service's ports, and answers through that
/// platform's edge.
#[test]
fn instances_are_copied_to_another_platform() {
    use cloud_tests::registry::{self, ArchiveFormat, web_image};

    let a = start_dev_with(213, "");
    let b = start_dev_with(214, "");
    let join = ok(&b, &["token", "create", "--join"]);
    ok(&a, &["remote", "add", "b", join.trim()]);

    // On a: hello behind an ephemeral service, and an image of the user's own behind none.
    let web = json(&ok(
        &a,
        &["deploy", "-p", "443:8080", "--image", "hello", "--name", "web", "-e", "MODE=copy", "-o", "json"],
    ));
    let service = web["service"]["name"].as_str().unwrap().to_owned();
    assert_eq!(web["service"]["persistent"], false);
    let files = tempfile::tempdir().unwrap();
    let archive = registry::skopeo_archive(&web_image(8080, "a page"), files.path(), ArchiveFormat::Oci);
    ok(&a, &["image", "push", archive.to_str().unwrap(), "--name", "site"]);
    let page = json(&ok(&a, &["deploy", "--image", "site", "--name", "page", "-e", "A=1", "-m", "64", "-o", "json"]));
    let site_v1 = page["instances"][0]["image_digest"].as_str().unwrap().to_owned();

    // hello is built into b as well, the same build: nothing to send. The ephemeral service is made on b as a
    // persistent one with the same ports.
    let (copied, progress) = ok_with_progress(&a, &["instance", "copy", "local:web", "b:web2"]);
    assert!(progress.contains("image hello: remote \"b\" has it already"), "{progress}");
    assert!(progress.contains(&format!("created service {service} ")), "{progress}");
    let on_b = json(&ok(&b, &["instance", "get", "web2", "-o", "json"]));
    assert_eq!(on_b["state"], "running", "{on_b}");
    assert_eq!(on_b["env"], serde_json::json!({"MODE": "copy"}));
    assert_eq!((&on_b["image"], &on_b["image_digest"]), (&"hello".into(), &web["instances"][0]["image_digest"]));
    assert_eq!((&on_b["port"], &on_b["restart_policy"]), (&web["instances"][0]["port"], &"never".into()));
    assert_eq!(on_b["service"]["name"], service.as_str());
    let service_b = json(&ok(&b, &["service", "get", &service, "-o", "json"]));
    assert_eq!((&service_b["ports"], &service_b["persistent"]), (&web["service"]["ports"], &true.into()));
    let (fqdn, ip) = (service_b["fqdn"].as_str().unwrap(), on_b["private_ip"].as_str().unwrap());
    assert_ne!(fqdn, web["service"]["fqdn"].as_str().unwrap(), "b names its own service");
    assert!(ip.starts_with(if is_root() { "10.214." } else { "127.214." }), "{on_b}");
    assert!(copied.contains(&format!("https://{fqdn}\n")) && copied.contains("instance: web2  running"), "{copied}");

    // It answers through b's edge, under b's CA.
    let edge = b.edge_https();
    let out = curl_through_edge(&b.home.path().join("data/ca.pem"), fqdn, edge);
    let answer = String::from_utf8_lossy(&out.stdout);
    assert_eq!(answer, format!("hello from web2 ({ip})\n"), "{}", String::from_utf8_lossy(&out.stderr));

    // b lacks the user's image: it is sent along, keeps its digest, and runs there; once there, it is not sent
    // again.
    let (_, progress) = ok_with_progress(&a, &["instance", "copy", "local:page", "b:"]);
    assert!(progress.contains("copying image site (sha256:") && progress.contains("to remote \"b\""), "{progress}");
    let on_b = json(&ok(&b, &["instance", "get", "page", "-o", "json"]));
    assert_eq!((&on_b["state"], &on_b["image_digest"]), (&"running".into(), &site_v1.as_str().into()), "{on_b}");
    assert_eq!(
        (&on_b["env"], &on_b["memory_mb"], &on_b["service"]),
        (&serde_json::json!({"A": "1"}), &64.into(), &Value::Null)
    );
    assert_eq!(json(&ok(&b, &["image", "get", "site", "-o", "json"]))["digest"], site_v1.as_str());
    let (_, progress) = ok_with_progress(&a, &["instance", "copy", "page", "b:page-2"]);
    assert!(progress.contains("image site: remote \"b\" has it already"), "{progress}");

    // Within one remote, without prefixes: the copy joins the instance's own service.
    ok(&a, &["instance", "copy", "web", "web-copy"]);
    let copy = json(&ok(&a, &["instance", "get", "web-copy", "-o", "json"]));
    assert_eq!((&copy["state"], &copy["service"]["name"]), (&"running".into(), &service.as_str().into()), "{copy}");

    // The image pushed again: copies still run the version the instance runs, which needs a name of its own
    // where the name now holds the new one.
    let archive = registry::skopeo_archive(&web_image(8080, "another page"), files.path(), ArchiveFormat::Oci);
    ok(&a, &["image", "push", archive.to_str().unwrap(), "--name", "site"]);
    fails(&a, &["instance", "copy", "page", "page-old"], "has another image named site");
    ok(&a, &["instance", "copy", "page", "page-old", "--image-name", "site-v1", "--no-start"]);
    let old = json(&ok(&a, &["instance", "get", "page-old", "-o", "json"]));
    assert_eq!((&old["image"], &old["image_digest"]), (&"site-v1".into(), &site_v1.as_str().into()), "{old}");

    // Refusals, in one line, before anything is made.
    let before = ok(&b, &["instance", "list", "-o", "name"]);
    fails(&a, &["instance", "copy", "local:nope", "b:"], "instance \"nope\" not found");
    fails(&a, &["instance", "copy", "local:web", "b:web2"], "remote \"b\" has an instance web2 already");
    fails(&a, &["instance", "copy", "local:web", "c:web"], "no remote \"c\"");
    fails(&a, &["instance", "copy", "web", "local:"], "would be instance web itself");
    fails(&a, &["instance", "copy", "web", "b:Web"], "invalid character 'W'");
    assert_eq!(ok(&b, &["instance", "list", "-o", "name"]), before);
    assert_eq!(ok(&b, &["service", "list", "-o", "name"]), format!("{service}\n"));

    // b refuses the instance itself (its tenant is at its quota): the service made for it goes again, and the
    // error, after the progress lines, says so.
    ok(&a, &["service", "create", "other", "443:8080"]);
    ok(&a, &["deploy", "--service", "other", "--image", "hello", "--name", "o1", "--no-start"]);
    let count = before.lines().count().to_string();
    ok(&b, &["tenant", "update", "default", "--max-instances", &count]);
    let out = ctl(&a, &["instance", "copy", "o1", "b:"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("created service other "), "{err}");
    let last = err.trim_end().lines().last().unwrap();
    assert!(last.starts_with("error: creating instance o1 on remote \"b\": quota exceeded"), "{err}");
    assert!(last.ends_with("(quota_exceeded); service other, made for it, was removed"), "{err}");
    assert_eq!(ok(&b, &["service", "list", "-o", "name"]), format!("{service}\n"));
}

/// Names of the service's instances that are wanted running, from `instance list`.
fn serving_instances(dev: &Dev, service: &str) -> Vec<String> {
    let all = json(&ok(dev, &["instance", "list", "-o", "json"]));
    all.as_array()
        .unwrap()
        .iter()
        .filter(|i| i["service"]["name"] == service && i["state"] == "running")
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `path` through the edge from `loops` concurrent request loops until `stop`: how many were answered, and the
/// failures, with the instance names that answered.
async fn load_loops(
    client: reqwest::Client,
    fqdn: String,
    path: &'static str,
    loops: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> (usize, Vec<String>, std::collections::BTreeSet<String>) {
    let mut tasks = Vec::new();
    for _ in 0..loops {
        let (client, fqdn, stop, answered) = (client.clone(), fqdn.clone(), stop.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let (mut served, mut failures, mut names) = (0, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let res = client.get(format!("https://{fqdn}{path}")).send().await;
                match res {
                    Ok(r) if r.status() == 200 => match r.text().await {
                        Ok(body) => {
                            served += 1;
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let name = body.strip_prefix("hello from ").and_then(|b| b.split_whitespace().next());
                            names.extend(name.map(str::to_owned));
                        }
                        // The answer broke off: its instance went while it was in flight.
                        Err(e) => failures.push(format!("body: {}", cloud_domain::error_chain(&e))),
                    },
                    Ok(r) => failures.push(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => failures.push(cloud_domain::error_chain(&e)),
                }
            }
            (served, failures, names)
        }));
    }
    let (mut served, mut failures, mut names) = (0, Vec::new(), std::collections::BTreeSet::new());
    for t in tasks {
        let (s, f, n) = t.await.unwrap();
        served += s;
        failures.extend(f);
        names.extend(n);
    }
    (served, failures, names)
}

/// Day-2 deploys through the real edge: a rollout replaces a service's instances under a steady request loop
/// without a failed request, a rollout to an image that cannot start leaves the old instances serving, and a
/// deletion under load drains the instance first.
#[test]
fn rollouts_and_deletions_under_load_lose_no_request() {
    let Some((runtime, _database, dev)) = dev_on_a_database(217, "sandboxes need root here") else {
        return;
    };
    ok(&dev, &["service", "create", "web", "443:8080"]);
    ok(&dev, &["deploy", "--service", "web", "--image", "hello", "-R", "2"]);
    let old = serving_instances(&dev, "web");
    assert_eq!(old.len(), 2, "{old:?}");
    let fqdn = ok(&dev, &["service", "get", "web", "-o", "value=fqdn"]).trim().to_owned();
    let client = edge_client(&dev, &fqdn);

    // A rollout under a steady loop of requests: none fails, and at the end only new instances answer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = runtime.spawn(load_loops(client.clone(), fqdn.clone(), "/", 2, stop.clone(), answered.clone()));
    let t0 = Instant::now();
    let (out, progress) =
        ok_with_progress(&dev, &["deploy", "--service", "web", "--image", "hello", "--rollout", "replace"]);
    let new = serving_instances(&dev, "web");
    // The loop goes on until the old instances have drained and gone.
    loop {
        let listed = ok(&dev, &["instance", "list", "-o", "name"]);
        if !old.iter().any(|o| listed.lines().any(|l| l == o)) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "old instances still there: {listed}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failures, _) = runtime.block_on(load).unwrap();
    assert_eq!(failures, Vec::<String>::new(), "requests failed during the rollout ({served} served)");
    let rate = served as f64 / t0.elapsed().as_secs_f64();
    assert!(rate >= 20.0, "the loop made {rate:.1} requests/s: too few to show anything");
    assert!(progress.contains("rolling out hello to service web") && progress.contains("rolled out"), "{progress}");
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(new.len(), 2, "as many new instances as old ones: {new:?}");
    assert!(new.iter().all(|n| !old.contains(n)), "old {old:?} still serve beside {new:?}");
    let after = runtime.block_on(async {
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let body = get_through_edge(&client, &fqdn).await.unwrap();
            names.insert(body.split_whitespace().nth(2).unwrap().to_owned());
        }
        names
    });
    assert!(after.iter().all(|n| new.contains(n)), "answered by {after:?}, not only by the new {new:?}");
    let history = json(&ok(&dev, &["service", "rollouts", "web", "-o", "json"]));
    assert_eq!(history[0]["state"], "succeeded", "{history}");

    // An image whose program exits at once: the rollout fails, saying why, and the instances serve on.
    let files = tempfile::tempdir().unwrap();
    let app = files.path().join("broken");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(app.join("manifest.json"), r#"{"command": ["./run"], "port": 8080}"#).unwrap();
    std::fs::write(app.join("run"), "#!/bin/sh\necho cannot start >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(app.join("run"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    ok(&dev, &["image", "push", app.to_str().unwrap()]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = runtime.spawn(load_loops(client.clone(), fqdn.clone(), "/", 2, stop.clone(), answered.clone()));
    let failed = ctl(&dev, &["deploy", "--service", "web", "--image", "broken", "--rollout-wait", "20"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failures, names) = runtime.block_on(load).unwrap();
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "a rollout to a broken image succeeded: {said}");
    assert!(said.contains("rollout of broken to service web failed: new instance broken-"), "{said}");
    assert!(said.contains("2 instance(s) keep serving"), "{said}");
    assert_eq!(failures, Vec::<String>::new(), "requests failed during the failed rollout ({served} served)");
    assert!(names.iter().all(|n| new.contains(n)), "answered by {names:?}");
    assert_eq!(serving_instances(&dev, "web"), new, "the failed rollout left the serving instances as they were");
    let listed = json(&ok(&dev, &["instance", "list", "-o", "json"]));
    assert!(
        listed.as_array().unwrap().iter().all(|i| i["image"] != "broken"),
        "the failed new instance was removed: {listed}"
    );

    // Deleting an instance while slow requests are in flight on it: they finish, and nothing new reaches it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = runtime.spawn(load_loops(client.clone(), fqdn.clone(), "/sleep/400", 6, stop.clone(), answered.clone()));
    // Once every loop has had an answer, six requests are in flight at any moment, spread over both instances.
    let t0 = Instant::now();
    while answered.load(std::sync::atomic::Ordering::Relaxed) < 12 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the slow requests are not answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, progress) = ok_with_progress(&dev, &["instance", "delete", &new[0]]);
    assert!(progress.contains("draining"), "the deletion drained first: {progress}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failures, _) = runtime.block_on(load).unwrap();
    assert_eq!(failures, Vec::<String>::new(), "requests failed as an instance was deleted ({served} served)");
    assert_eq!(serving_instances(&dev, "web"), vec![new[1].clone()]);
    fails(&dev, &["instance", "get", &new[0]], "not found");

    // A secret set with --restart: a rolling restart hands it to a new instance.
    let (_, progress) = ok_with_progress(&dev, &["secret", "set", "--service", "web", "API_KEY=k1", "--restart"]);
    assert!(
        progress.contains("set secret API_KEY") && progress.contains("rolled out hello to service web"),
        "{progress}"
    );
    let restarted = serving_instances(&dev, "web");
    assert!(restarted.len() == 1 && restarted[0] != new[1], "{restarted:?} replaced {}", new[1]);
}

/// Autoscale on the edges' in-flight counts: a sustained load of slow requests made here adds instances up to the
/// maximum, and once it stops they drain away to the minimum, with no failed request on the way down.
#[test]
fn autoscale_follows_the_load_up_and_down() {
    let Some((runtime, _database, dev)) = dev_on_a_database(218, "sandboxes need root here") else {
        return;
    };
    ok(&dev, &["service", "create", "web", "443:8080"]);
    ok(&dev, &["deploy", "--service", "web", "--image", "hello"]);
    fails(&dev, &["service", "autoscale", "web", "--min", "3", "--max", "2", "--target", "2"], "min 3 is above max 2");
    fails(&dev, &["service", "autoscale", "web", "--min", "1", "--max", "3", "--target", "0"], "target_in_flight");
    let set =
        ok(&dev, &["service", "autoscale", "web", "--min", "1", "--max", "3", "--target", "2", "--cooldown", "2"]);
    assert_eq!(set.trim(), "service web: 1 to 3 instances, 2 requests in flight per instance, cooldown 2s");
    let fqdn = ok(&dev, &["service", "get", "web", "-o", "value=fqdn"]).trim().to_owned();
    let client = edge_client(&dev, &fqdn);

    // Eight slow requests always in flight, at a target of 2 per instance: up to the maximum, 3.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = runtime.spawn(load_loops(client.clone(), fqdn.clone(), "/sleep/300", 8, stop.clone(), answered));
    let t0 = Instant::now();
    let mut seen = 1;
    while seen < 3 {
        seen = serving_instances(&dev, "web").len();
        assert!(t0.elapsed() < Duration::from_secs(90), "autoscale did not reach 3 instances: {seen}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let grown = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failures, names) = runtime.block_on(load).unwrap();
    assert_eq!(failures, Vec::<String>::new(), "requests failed while scaling up ({served} served)");
    assert!(names.len() >= 2, "the added instances took requests: {names:?}");
    let events = ok(&dev, &["service", "get", "web", "-o", "json"]);
    assert_eq!(json(&events)["autoscale"]["max"], 3);

    // No load: one at a time after each cooldown, down to the minimum; the surplus instances drain and go.
    let t1 = Instant::now();
    while ok(&dev, &["instance", "list", "-o", "name"]).lines().count() > 1 {
        assert!(t1.elapsed() < Duration::from_secs(90), "autoscale did not come back down to 1 (grew in {grown:?})");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(serving_instances(&dev, "web").len(), 1, "the minimum stays");
    ok(&dev, &["service", "autoscale", "web", "--off"]);
    assert_eq!(json(&ok(&dev, &["service", "get", "web", "-o", "json"]))["autoscale"], Value::Null);
}
