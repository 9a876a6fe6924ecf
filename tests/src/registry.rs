//! Images as users bring them: a real OCI registry (Debian's `docker-registry`, the reference distribution
//! implementation) on a loopback port of its own, skopeo (the reference tool) to push to it and to write OCI and
//! docker archives, and a stand-in registry that answers every request with one fixed status.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloud_oci::build::{self, LayerBuilder};
use cloud_oci::{Image, ImageConfig};

/// A `docker-registry` serving plain http on `127.0.0.1`, its storage in a temporary directory; stopped on drop.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:<port>`, as references name it.
    pub host: String,
    /// Its configuration, log and storage (`data/`).
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    /// Starts a registry on a port the kernel picks, and waits until it listens (it logs the address).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
                dir.path().join("data").display()
            ),
        )
        .expect("writing the registry's configuration");
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).expect("the registry's log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed by scripts/setup");
        let t0 = Instant::now();
        let host = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = text.split("msg=\"listening on ").nth(1).and_then(|rest| rest.split('"').next()) {
                break addr.to_owned();
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "docker-registry did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { host, dir, child }
    }

    /// Pushes an image with skopeo as `<host>/<repository_tag>` and returns that reference.
    pub fn push(&self, image: &Image, repository_tag: &str) -> String {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let src = dir.path().join("image.tar");
        std::fs::write(&src, build::oci_archive(image, "latest")).expect("writing the archive");
        let reference = format!("{}/{repository_tag}", self.host);
        skopeo_copy(&format!("oci-archive:{}", src.display()), &format!("docker://{reference}"));
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `skopeo copy SRC DEST` (plain-http registries allowed), panicking with skopeo's message when it fails.
pub fn skopeo_copy(src: &str, dest: &str) {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false", src, dest])
        .output()
        .expect("skopeo is installed by scripts/setup");
    assert!(out.status.success(), "skopeo copy {src} {dest}: {}", String::from_utf8_lossy(&out.stderr));
}

/// How skopeo writes an archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// `oci-archive:`, as `podman save --format oci-archive` also writes.
    Oci,
    /// `docker-archive:`, as `docker save` writes.
    Docker,
}

/// The image written by skopeo as an archive of `format` into `dir`; returns the archive's path.
pub fn skopeo_archive(image: &Image, dir: &Path, format: ArchiveFormat) -> std::path::PathBuf {
    let src = dir.join("built.tar");
    std::fs::write(&src, build::oci_archive(image, "v1")).expect("writing the archive");
    let (dest, transport) = match format {
        ArchiveFormat::Oci => (dir.join("oci.tar"), "oci-archive"),
        ArchiveFormat::Docker => (dir.join("docker.tar"), "docker-archive"),
    };
    let _ = std::fs::remove_file(&dest);
    let tag = if format == ArchiveFormat::Docker { ":app:v1" } else { ":v1" };
    skopeo_copy(&format!("oci-archive:{}", src.display()), &format!("{transport}:{}{tag}", dest.display()));
    dest
}

/// An image that runs `/bin/serve` on `port`, made of a base layer and a layer of its own (`marker` in
/// `/srv/marker`, so that images with different markers share their base layer and differ in the other).
pub fn sample_image(port: u16, marker: &str) -> Image {
    let config = ImageConfig {
        entrypoint: vec!["/bin/serve".into()],
        cmd: vec!["--quiet".into()],
        env: vec!["PATH=/bin".into()],
        working_dir: "/srv".into(),
        exposed_ports: vec![port],
        ..Default::default()
    };
    build::image(&config, &[base_layer(), LayerBuilder::new().file("srv/marker", 0o644, marker.as_bytes()).into_tar()])
}

/// An image that serves `page` over HTTP on `port` with the host's static busybox (`httpd`), as a tenant's own
/// image would: it runs in a sandbox, where nothing of the host is there.
pub fn web_image(port: u16, page: &str) -> Image {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed by scripts/setup");
    let layer = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .dir("www", 0o755)
        .file("www/index.html", 0o644, format!("{page}\n").as_bytes())
        .into_tar();
    let config = ImageConfig {
        entrypoint: vec!["/bin/busybox".into(), "httpd".into(), "-f".into(), "-h".into(), "/www".into()],
        cmd: vec!["-p".into(), port.to_string()],
        working_dir: "/www".into(),
        user: "65534:65534".into(),
        exposed_ports: vec![port],
        ..Default::default()
    };
    build::image(&config, &[layer])
}

/// The layer every [`sample_image`] shares.
pub fn base_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/serve", 0o755, b"#!/bin/sh\necho serving\n")
        .dir("srv", 0o755)
        .into_tar()
}

/// A stand-in registry on a loopback port that answers every request with `status_line` (e.g. `401
/// Unauthorized`) and `headers`; returns its `127.0.0.1:<port>`. It lives as long as the test's runtime.
pub async fn answering(status_line: &'static str, headers: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let host = listener.local_addr().expect("bound").to_string();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let answer =
                    format!("HTTP/1.1 {status_line}\r\n{headers}content-length: 0\r\nconnection: close\r\n\r\n");
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    host
}
