//! Pulling from a real registry (Debian's `docker-registry`, the reference distribution implementation) on
//! loopback, with images pushed by skopeo.

use std::process::{Child, Command, Stdio};

use cloud_oci::build::{self, LayerBuilder};
use cloud_oci::registry::{Registries, RegistryAccess};
use cloud_oci::{Image, ImageConfig, Limits, OciError, Reference};

struct Registry {
    child: Child,
    host: String,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn insecure(host: &str) -> RegistryAccess {
    RegistryAccess { insecure: vec![host.to_owned()], ..Default::default() }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry is installed by scripts/setup");
    let host = format!("127.0.0.1:{port}");
    let url = format!("http://{host}/v2/");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "docker-registry did not start");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Registry { child, host, dir }
}

fn sample() -> Image {
    let config = ImageConfig {
        entrypoint: vec!["/bin/serve".into()],
        exposed_ports: vec![9000],
        working_dir: "/".into(),
        ..Default::default()
    };
    build::image(&config, &[LayerBuilder::new().dir("bin", 0o755).file("bin/serve", 0o755, b"#!/bin/sh\n").into_tar()])
}

fn push(image: &Image, dest: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("image.tar");
    std::fs::write(&src, build::oci_archive(image, "v1")).unwrap();
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci-archive:{}", src.display()),
            &format!("docker://{dest}"),
        ])
        .output()
        .expect("skopeo is installed by scripts/setup");
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn an_image_pushed_to_a_registry_pulls_back_verified() {
    let reg = registry().await;
    let image = sample();
    push(&image, &format!("{}/team/hello:v1", reg.host));
    let client = Registries::new(insecure(&reg.host), Limits::default());
    let pulled = client.pull(&Reference::parse(&format!("{}/team/hello:v1", reg.host)).unwrap()).await.unwrap();
    assert_eq!(pulled.config, image.config);
    assert_eq!(pulled.layers[0].diff_id, image.layers[0].diff_id);
    // Pinned by digest: the same manifest.
    let pinned = Reference::parse(&format!("{}/team/hello@{}", reg.host, pulled.digest)).unwrap();
    assert_eq!(client.pull(&pinned).await.unwrap().digest, pulled.digest);

    // A tag that does not exist.
    let e = client.pull(&Reference::parse(&format!("{}/team/hello:v2", reg.host)).unwrap()).await.unwrap_err();
    assert!(matches!(e, OciError::NotFound { .. }), "{e}");
    // On loopback and not allowed there.
    let strict = Registries::new(RegistryAccess::default(), Limits::default());
    let e = strict.pull(&Reference::parse(&format!("{}/team/hello:v1", reg.host)).unwrap()).await.unwrap_err();
    assert!(matches!(e, OciError::RegistryNotAllowed { .. }), "{e}");
    // Allowed there, but plain http and not configured as insecure.
    let private =
        Registries::new(RegistryAccess { private: vec![reg.host.clone()], ..Default::default() }, Limits::default());
    let e = private.pull(&Reference::parse(&format!("{}/team/hello:v1", reg.host)).unwrap()).await.unwrap_err();
    assert!(matches!(e, OciError::InsecureRegistry { .. }), "{e}");
    // Over the size limit.
    let small = Registries::new(insecure(&reg.host), Limits { max_stored_bytes: 64, ..Limits::default() });
    let e = small.pull(&Reference::parse(&format!("{}/team/hello:v1", reg.host)).unwrap()).await.unwrap_err();
    assert!(matches!(e, OciError::TooLarge { .. }), "{e}");

    // A layer altered in the registry's storage: the pull refuses it.
    let hex = image.layer_blobs[0].digest.hex();
    let data = reg.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let e = client.pull(&Reference::parse(&format!("{}/team/hello:v1", reg.host)).unwrap()).await.unwrap_err();
    assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
}

#[tokio::test]
async fn unreachable_and_refusing_registries_say_so() {
    let closed = format!("127.0.0.1:{}", free_port());
    let client = Registries::new(insecure(&closed), Limits::default());
    let e = client.pull(&Reference::parse(&format!("{closed}/a:b")).unwrap()).await.unwrap_err();
    assert!(matches!(e, OciError::RegistryUnavailable { .. }), "{e}");

    // A registry that wants credentials we do not have.
    let host = answering("www-authenticate: Basic realm=\"reg\"").await;
    let client = Registries::new(insecure(&host), Limits::default());
    let e = client.pull(&Reference::parse(&format!("{host}/private/app:v1")).unwrap()).await.unwrap_err();
    assert!(matches!(e, OciError::RegistryDenied { status: 401, .. }), "{e}");

    // A registry that sends us for a token to a private address, or over plain http.
    let host = answering("www-authenticate: Bearer realm=\"https://169.254.169.254/token\",service=\"x\"").await;
    let client = Registries::new(insecure(&host), Limits::default());
    let e = client.pull(&Reference::parse(&format!("{host}/app:v1")).unwrap()).await.unwrap_err();
    assert!(matches!(e, OciError::RegistryNotAllowed { .. }), "{e}");
    let host = answering("www-authenticate: Bearer realm=\"http://auth.example/token\"").await;
    let client = Registries::new(insecure(&host), Limits::default());
    let e = client.pull(&Reference::parse(&format!("{host}/app:v1")).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("not https"), "{e}");
}

/// A stand-in registry that answers every request 401 with the given challenge header.
async fn answering(challenge: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let answer = format!("HTTP/1.1 401 Unauthorized\r\n{challenge}\r\ncontent-length: 0\r\n\r\n");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(answer.as_bytes()).await;
        }
    });
    host
}
